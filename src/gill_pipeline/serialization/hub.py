"""Where a folder comes from and goes to: local folders and Hugging Face Hub repositories.

- [`resolve_pipeline_folder`]: a local folder as it is, a Hub repo id as a snapshot in the cache (diffusers 0.42
  cannot load custom components straight from a repo id), with errors that name the folder, repo, revision and file.
- [`push_folder_to_hub`]: uploads a folder into a repo, keeping what the repo holds unless asked to delete it.

Saving a pipeline with its model card and pushing it is one level up, in `gill_pipeline.serialization.push`.
"""

import glob
import os
import warnings

from diffusers.utils import logging
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..constants import LEARNED_WEIGHTS_MANIFEST_FILE, LIBRARY_NAME, LORA_FOLDER, MODEL_CARD_FILE, MODEL_INDEX_FILE
from .folder import PipelineFolderError
from .paths import looks_like_local_path

logger = logging.get_logger(__name__)

# `from_pretrained` keyword arguments that concern downloading rather than loading.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")


class HubLoadError(OSError):
    """A repo or file could not be found on the Hub or in the local cache; the message names it."""


# --------------------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------------------
def _offline_reason(local_files_only: bool) -> str:
    if local_files_only:
        return "`local_files_only=True`"
    if hf_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    return "the Hub could not be reached"


def _partial_path_hint(name: str) -> str:
    """When the first part of `org/name` exists here, the user most likely meant a local path."""
    head = name.split("/")[0]
    if "/" in name and head and os.path.isdir(head):
        return f" (there is a local folder {head!r}, but not {name!r})"
    return ""


def resolve_pipeline_folder(name_or_path: str, **hub_kwargs) -> str:
    """A local folder is returned as it is; anything else is taken as a Hub repo id and downloaded (or read from
    the cache). diffusers 0.42 cannot load custom components straight from a repo id, hence the snapshot.

    Raises [`PipelineFolderError`] ("No such folder") for a name that can only be a local path, and
    [`HubLoadError`] naming the repo and revision when it is neither a folder nor reachable.
    """
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    if looks_like_local_path(name_or_path):
        what = "it is a file" if os.path.isfile(name_or_path) else "it does not exist"
        raise PipelineFolderError(
            f"No such folder: {name_or_path!r} ({what}); a local pipeline is a folder written by `save_pretrained`."
        )
    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    revision = kwargs.get("revision") or "main"
    try:
        return snapshot_download(name_or_path, library_name=LIBRARY_NAME, **kwargs)
    except LocalEntryNotFoundError as error:
        cache = kwargs.get("cache_dir") or hf_constants.HF_HUB_CACHE
        raise HubLoadError(
            f"Cannot load {name_or_path!r} (revision {revision!r}): it is not a local folder"
            f"{_partial_path_hint(name_or_path)}, it is not in the Hub "
            f"cache {cache}, and downloading is off ({_offline_reason(bool(kwargs.get('local_files_only')))}). "
            "Download it once with network access (the cache then serves it offline), or pass a local folder."
        ) from error
    except GatedRepoError as error:
        raise HubLoadError(
            f"Cannot load {name_or_path!r}: the repo is gated; accept its terms on the Hub and pass `token=`."
        ) from error
    except RepositoryNotFoundError as error:
        raise HubLoadError(
            f"Cannot load {name_or_path!r}: no local folder of that name{_partial_path_hint(name_or_path)}, and no "
            "Hub repo with that id (or it is private: pass `token=`)."
        ) from error
    except HFValidationError as error:
        raise HubLoadError(
            f"Cannot load {name_or_path!r}: no local folder of that name{_partial_path_hint(name_or_path)}, and it is "
            "not a Hub repo id (`name` or `org/name`)."
        ) from error
    except RevisionNotFoundError as error:
        raise HubLoadError(f"Cannot load {name_or_path!r}: it has no revision {revision!r}.") from error


def hub_download_kwargs(kwargs: dict) -> dict:
    """The download arguments among `kwargs` (without `revision`, which belongs to one repo), None values dropped."""
    return {k: kwargs[k] for k in HUB_KWARGS if k != "revision" and kwargs.get(k) is not None}


# --------------------------------------------------------------------------------------------------------------
# Uploading
# --------------------------------------------------------------------------------------------------------------
# Files whose copy left over from an earlier push would change how the pushed folder loads: the two kinds of folder
# (a whole pipeline's `model_index.json` would win over a learned-weights manifest) and the LM's LoRA adapter (loaded
# whenever the folder is there).
FORMAT_FILES = (MODEL_INDEX_FILE, LEARNED_WEIGHTS_MANIFEST_FILE)
FORMAT_FOLDERS = (LORA_FOLDER,)
# The Hub keeps this file in every repo; it is never deleted.
GITATTRIBUTES_FILE = ".gitattributes"


def _local_files(folder: str) -> set[str]:
    files = set()
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".git"]
        files.update(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/") for name in names)
    return files


def _stale_files(remote: set[str], local: set[str]) -> list[str]:
    """Remote files not in the folder that would make the repo load differently from the folder: format files of
    the other kind (or of an adapter the folder no longer has), and leftovers inside a component folder the push
    rewrites (a component is saved whole, so its other files are from an older save)."""
    local_folders = {path.split("/")[0] for path in local if "/" in path}
    stale = []
    for path in sorted(remote - local):
        top = path.split("/")[0]
        if path in FORMAT_FILES or top in FORMAT_FOLDERS or ("/" in path and top in local_folders):
            stale.append(path)
    return stale


def _remote_files(api: HfApi, repo_id: str, revision: str | None) -> set[str]:
    try:
        return set(api.list_repo_files(repo_id, revision=revision))
    except RevisionNotFoundError as error:
        raise ValueError(f"`revision` {revision!r}: the repo {repo_id!r} has no such branch ({error}).") from error


def _shown(paths) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:20]) + (f" and {len(paths) - 20} more" if len(paths) > 20 else "")


def push_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    delete_remote_files: bool = False,
    overwrite_model_card: bool = False,
    replace: bool | None = None,
) -> str:
    """Uploads a folder into `repo_id` (created if needed) and returns the commit URL.

    Nothing the repo already holds is lost unless asked:

    - Files of the repo that are not in the folder are kept (a user's notes, other weights). With
      `delete_remote_files=True` they are deleted in the same commit (`.gitattributes` is kept), after a warning that
      names each of them.
    - The repo's model card (`README.md`) is kept when it has one; the folder's card is uploaded only where the repo
      has none, or with `overwrite_model_card=True`.
    - A push that would leave the repo loading differently from the folder is refused before any commit, naming the
      files: a whole pipeline's `model_index.json` beside learned weights (or a learned-weights manifest beside a
      pipeline), an `llm_lora/` adapter the folder does not have, older files inside a component folder the push
      rewrites. Pass `delete_remote_files=True`, or push to a new repo or branch.

    `replace` is the old name of `delete_remote_files` (deprecated).
    """
    if not os.path.isdir(folder):
        raise ValueError(f"`folder` must be an existing folder, got {folder!r}.")
    if replace is not None:
        warnings.warn(
            "`replace` is deprecated and will be removed; use `delete_remote_files` (default False: files of the repo "
            "that are not in the folder are kept).",
            FutureWarning,
            stacklevel=2,
        )
        delete_remote_files = bool(replace)
    for name, value in (("delete_remote_files", delete_remote_files), ("overwrite_model_card", overwrite_model_card)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    api = HfApi(token=token, library_name=LIBRARY_NAME)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    remote = _remote_files(api, repo_id, revision)
    local = _local_files(folder)
    where = f"{repo_id!r}" + (f" (branch {revision!r})" if revision else "")

    keep_card = MODEL_CARD_FILE in remote and not overwrite_model_card
    if keep_card and MODEL_CARD_FILE in local:
        # A card on the Hub may hold what its owner wrote there: it is never replaced without being asked.
        logger.warning(
            "%s already has a %s: it is kept, and the folder's card is not uploaded (to replace it, pass "
            "`overwrite_model_card=True`, or `gill push --overwrite-model-card`).", where, MODEL_CARD_FILE,
        )
    protected = {GITATTRIBUTES_FILE} | ({MODEL_CARD_FILE} if keep_card else set())
    extra = remote - local - protected
    if delete_remote_files:
        if extra:
            # Every file is named, however many: this is the last word before they go.
            logger.warning(
                "Deleting %d file(s) of %s that are not in %s: %s", len(extra), where, folder, ", ".join(sorted(extra))
            )
    else:
        stale = _stale_files(remote, local)
        if stale:
            raise ValueError(
                f"Refusing to push {folder} to {where}: the repo holds files that are not in the folder and would "
                f"change how it loads: {_shown(stale)}. Pass `delete_remote_files=True` (`gill push "
                "--delete-remote-files`) to delete every repo file that is not in the folder, or push to a new repo or "
                "branch."
            )
        if extra:
            logger.info("Keeping the files of %s that are not in %s: %s", where, folder, _shown(extra))
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload GILL weights with gill_pipeline",
        create_pr=create_pr,
        revision=revision,
        ignore_patterns=[MODEL_CARD_FILE] if keep_card else None,
        # Exact paths, escaped: a file name may hold `*`, `?` or `[`.
        delete_patterns=[glob.escape(path) for path in sorted(extra)] if delete_remote_files and extra else None,
    )
    logger.info("Pushed %s to %s", folder, commit)
    return str(commit)
