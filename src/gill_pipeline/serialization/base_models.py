"""The record of which frozen base models (Hub ids and revisions) a GILL pipeline's learned weights fit.

It is stored in the pipeline config (`model_index.json`, key `base_models`) and in a learned-weights manifest:
`{"llm": entry, "stable_diffusion": entry, "image_encoder": entry}`, each entry `{"repo_id", "revision"[,
"subfolder", "class_name"]}` or None.
"""

from typing import Any

from diffusers.utils import logging

from .paths import looks_like_local_path

logger = logging.get_logger(__name__)

# The roles of the frozen base models a GILL pipeline is built from (keys of the record).
BASE_MODEL_ROLES = ("llm", "stable_diffusion", "image_encoder")
DEFAULT_IMAGE_ENCODER_CLASS = "CLIPVisionModel"


def _looks_like_repo_id(name: Any) -> bool:
    return isinstance(name, str) and name.count("/") == 1 and " " not in name and not looks_like_local_path(name)


def base_model_entry(
    source: Any, revision: str | None = None, subfolder: str | None = None, class_name: str | None = None
) -> dict | None:
    """One entry of the record: `{"repo_id", "revision"[, "subfolder", "class_name"]}`, or None.

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
    """The record of a pipeline assembled from these sources (ids, paths or loaded objects)."""
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
    """Checks a record (entries may be a repo id string, a dict or None) and returns it complete."""
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
            extra = {k: v for k, v in entry.items() if k in ("subfolder", "class_name") and v}
            entry = {"repo_id": entry["repo_id"], "revision": entry.get("revision"), **extra}
        record[role] = entry
    return record
