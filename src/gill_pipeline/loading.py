"""Checks a saved pipeline folder before diffusers loads it, so a broken file is named in the error."""

import json
import os

from safetensors import safe_open

from .constants import MODEL_INDEX_FILE


class PipelineFolderError(OSError):
    """A file of a saved GILL pipeline folder is missing or unreadable."""


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise PipelineFolderError(f"Missing file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineFolderError(f"Corrupted JSON file: {path} ({error})") from error


def validate_pipeline_folder(folder: str) -> None:
    """Raises [`PipelineFolderError`] naming the first missing or corrupted file of a saved pipeline folder.

    It reads `model_index.json`, checks that every listed component has its folder, parses every JSON file there
    and opens the header of every safetensors file (cheap: no tensor data is read).
    """
    index = _read_json(os.path.join(folder, MODEL_INDEX_FILE))
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2 or value[0] is None:
            continue
        component = os.path.join(folder, name)
        if not os.path.isdir(component):
            raise PipelineFolderError(
                f"Missing folder: {component} (component `{name}` listed in {os.path.join(folder, MODEL_INDEX_FILE)})"
            )
        files = os.listdir(component)
        if not files:
            raise PipelineFolderError(f"Empty component folder: {component}")
        if "config.json" in files and not any(f.endswith(".safetensors") for f in files):
            # A model component: its weights must be there, as safetensors (pickled weights are never loaded).
            raise PipelineFolderError(
                f"Missing weights: no .safetensors file in {component} (component `{name}`); files there: "
                f"{sorted(files)}"
            )
        for file_name in sorted(files):
            path = os.path.join(component, file_name)
            if file_name.endswith(".json"):
                _read_json(path)
            elif file_name.endswith(".safetensors"):
                try:
                    with safe_open(path, framework="pt") as f:
                        f.keys()
                except Exception as error:  # safetensors raises its own error types for bad headers
                    raise PipelineFolderError(f"Corrupted safetensors file: {path} ({error})") from error
            # Weight index files name the shards they need; a missing shard is named too.
            if file_name.endswith(".safetensors.index.json"):
                for shard in sorted(set(_read_json(path).get("weight_map", {}).values())):
                    if not os.path.isfile(os.path.join(component, shard)):
                        raise PipelineFolderError(f"Missing file: {os.path.join(component, shard)} (listed in {path})")
