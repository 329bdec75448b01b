"""Where a pipeline comes from: a local folder or a Hugging Face Hub repository."""

import os

from huggingface_hub import snapshot_download

LIBRARY_NAME = "gill_pipeline"
# `from_pretrained` keyword arguments that concern downloading rather than loading.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")


def resolve_pipeline_folder(name_or_path: str, **hub_kwargs) -> str:
    """A local folder is returned as it is; anything else is taken as a Hub repo id and downloaded (or read from
    the cache). diffusers 0.42 cannot load custom components straight from a repo id, hence the snapshot."""
    if os.path.isdir(name_or_path):
        return name_or_path
    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    return snapshot_download(name_or_path, library_name=LIBRARY_NAME, **kwargs)
