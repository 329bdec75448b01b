"""Where a folder comes from and goes to: local folders and Hugging Face Hub repositories.

- [`resolve_pipeline_folder`]: a local folder as it is, a Hub repo id as a snapshot in the cache (diffusers 0.42
  cannot load custom components straight from a repo id), with errors that name the folder, repo, revision and file.
- [`push_folder_to_hub`]: uploads a folder as a repo's content.

Saving a pipeline with its model card and pushing it is one level up, in `gill_pipeline.serialization.push`.
"""

import os

from diffusers.utils import logging
from huggingface_hub import constants as hf_constants
from huggingface_hub import create_repo, snapshot_download, upload_folder
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..constants import LIBRARY_NAME
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
def push_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    replace: bool = True,
) -> str:
    """Uploads a folder as the content of `repo_id` (created if needed) and returns the commit URL.

    With `replace=True` (default) files of the repo that are not in the folder are deleted in the same commit, so
    a repo never mixes a whole pipeline with learned weights only (`.gitattributes` is kept).
    """
    if not os.path.isdir(folder):
        raise ValueError(f"`folder` must be an existing folder, got {folder!r}.")
    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        commit_message=commit_message or "Upload GILL weights with gill_pipeline",
        create_pr=create_pr,
        revision=revision,
        delete_patterns="*" if replace else None,
    )
    logger.info("Pushed %s to %s", folder, commit)
    return str(commit)
