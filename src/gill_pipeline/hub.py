"""Where a pipeline comes from and goes to: local folders and Hugging Face Hub repositories.

- [`resolve_pipeline_folder`]: a local folder as it is, a Hub repo id as a snapshot in the cache (diffusers 0.42
  cannot load custom components straight from a repo id), with errors that name the repo, revision and file.
- [`record_base_models`]: the record of which base LM, Stable Diffusion checkpoint and vision encoder (Hub ids and
  revisions) a pipeline's learned weights fit; stored in the pipeline config as `base_models`.
- [`push_folder_to_hub`], [`push_pipeline_to_hub`]: uploads, with our model card.
"""

import os
import tempfile
from typing import Any

from diffusers.utils import logging
from huggingface_hub import constants as hf_constants
from huggingface_hub import create_repo, snapshot_download, upload_folder
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = logging.get_logger(__name__)

LIBRARY_NAME = "gill_pipeline"
# `from_pretrained` keyword arguments that concern downloading rather than loading.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
# The roles of the frozen base models a GILL pipeline is built from (keys of the `base_models` record).
BASE_MODEL_ROLES = ("llm", "stable_diffusion", "image_encoder")
DEFAULT_IMAGE_ENCODER_CLASS = "CLIPVisionModel"
MODEL_CARD_FILE = "README.md"


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


def resolve_pipeline_folder(name_or_path: str, **hub_kwargs) -> str:
    """A local folder is returned as it is; anything else is taken as a Hub repo id and downloaded (or read from
    the cache). diffusers 0.42 cannot load custom components straight from a repo id, hence the snapshot.

    Raises [`HubLoadError`] naming the repo and revision when it is neither a folder nor reachable.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    revision = kwargs.get("revision") or "main"
    try:
        return snapshot_download(name_or_path, library_name=LIBRARY_NAME, **kwargs)
    except LocalEntryNotFoundError as error:
        cache = kwargs.get("cache_dir") or hf_constants.HF_HUB_CACHE
        raise HubLoadError(
            f"Cannot load {name_or_path!r} (revision {revision!r}): it is not a local folder, it is not in the Hub "
            f"cache {cache}, and downloading is off ({_offline_reason(bool(kwargs.get('local_files_only')))}). "
            "Download it once with network access (the cache then serves it offline), or pass a local folder."
        ) from error
    except GatedRepoError as error:
        raise HubLoadError(
            f"Cannot load {name_or_path!r}: the repo is gated; accept its terms on the Hub and pass `token=`."
        ) from error
    except RepositoryNotFoundError as error:
        raise HubLoadError(
            f"Cannot load {name_or_path!r}: no local folder of that name, and no Hub repo with that id (or it is "
            "private: pass `token=`)."
        ) from error
    except RevisionNotFoundError as error:
        raise HubLoadError(f"Cannot load {name_or_path!r}: it has no revision {revision!r}.") from error


def hub_download_kwargs(kwargs: dict) -> dict:
    """The download arguments among `kwargs` (without `revision`, which belongs to one repo), None values dropped."""
    return {k: kwargs[k] for k in HUB_KWARGS if k != "revision" and kwargs.get(k) is not None}


# --------------------------------------------------------------------------------------------------------------
# The record of base models
# --------------------------------------------------------------------------------------------------------------
def _looks_like_repo_id(name: Any) -> bool:
    return isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name) and " " not in name


def base_model_entry(
    source: Any, revision: str | None = None, subfolder: str | None = None, class_name: str | None = None
) -> dict | None:
    """One entry of the `base_models` record: `{"repo_id", "revision"[, "subfolder", "class_name"]}`, or None.

    `source` is a Hub repo id, a local path (not recorded: it cannot be shared) or a loaded model/pipeline (its
    `name_or_path` is used when it is a Hub id; a transformers model also gives the exact commit it came from).
    """
    name, commit = source, None
    if not isinstance(source, str) and source is not None:
        config = getattr(source, "config", None)
        name = getattr(source, "name_or_path", None) or getattr(config, "_name_or_path", None)
        if name is None and isinstance(config, dict):
            name = config.get("_name_or_path")
        commit = getattr(config, "_commit_hash", None)
    if not _looks_like_repo_id(name):
        if isinstance(source, str):
            logger.warning(
                "The base model %r is a local path, so the learned weights cannot record where it comes from; pass "
                "`base_models=` with its Hub id to record it.",
                source,
            )
        return None
    entry = {"repo_id": name, "revision": revision or commit}
    if subfolder:
        entry["subfolder"] = subfolder
    if class_name:
        entry["class_name"] = class_name
    return entry


def record_base_models(language_model, stable_diffusion, image_encoder, revision: str | None = None) -> dict:
    """The `base_models` record of a pipeline assembled from these sources (ids, paths or loaded objects)."""
    encoder_class = (
        type(image_encoder).__name__ if image_encoder is not None and not isinstance(image_encoder, str) else None
    )
    return {
        "llm": base_model_entry(language_model, revision),
        "stable_diffusion": base_model_entry(stable_diffusion, revision),
        "image_encoder": base_model_entry(
            image_encoder, revision, class_name=encoder_class or DEFAULT_IMAGE_ENCODER_CLASS
        ),
    }


def normalize_base_models(base_models: dict | None, argument: str = "base_models") -> dict:
    """Checks a `base_models` record (entries may be a repo id string, a dict or None) and returns it complete."""
    if base_models is None:
        return {role: None for role in BASE_MODEL_ROLES}
    if not isinstance(base_models, dict):
        raise TypeError(f"`{argument}` must be a dict with keys {BASE_MODEL_ROLES}, got {type(base_models).__name__}.")
    unknown = sorted(set(base_models) - set(BASE_MODEL_ROLES))
    if unknown:
        raise ValueError(f"`{argument}` has unknown keys {unknown}; the keys are {list(BASE_MODEL_ROLES)}.")
    record = {}
    for role in BASE_MODEL_ROLES:
        entry = base_models.get(role)
        if isinstance(entry, str):
            entry = {"repo_id": entry, "revision": None}
        if entry is not None and (not isinstance(entry, dict) or not isinstance(entry.get("repo_id"), str)):
            raise ValueError(
                f"`{argument}[{role!r}]` must be a repo id, a dict with a `repo_id`, or None; got {entry!r}."
            )
        if entry is not None:
            entry = {"repo_id": entry["repo_id"], "revision": entry.get("revision"), **{
                k: v for k, v in entry.items() if k in ("subfolder", "class_name") and v
            }}
        record[role] = entry
    return record


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


def push_pipeline_to_hub(
    pipe,
    repo_id: str,
    *,
    learned_weights_only: bool = False,
    card_info=None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    replace: bool = True,
    **save_kwargs,
) -> str:
    """Saves `pipe` (whole, or its learned weights only) with a model card and uploads it; returns the commit URL."""
    from .learned_weights import save_learned_weights
    from .model_card import write_model_card

    with tempfile.TemporaryDirectory() as tmp:
        if learned_weights_only:
            save_learned_weights(pipe, tmp, **save_kwargs)
        else:
            pipe.save_pretrained(tmp, **save_kwargs)
        write_model_card(tmp, repo_id=repo_id, info=card_info)
        return push_folder_to_hub(
            tmp,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message
            or ("Upload GILL learned weights" if learned_weights_only else "Upload GILL pipeline"),
            create_pr=create_pr,
            revision=revision,
            replace=replace,
        )
