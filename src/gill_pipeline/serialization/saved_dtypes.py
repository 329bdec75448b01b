"""The dtype each component of a pipeline folder was saved in, read from its safetensors headers.

diffusers' `from_pretrained` loads a model without `torch_dtype` in float32 whatever its files hold; transformers 5
keeps the saved dtype. A GILL folder mixes both libraries, so a pipeline saved in bf16 came back half in float32: the
UNet and the VAE of a paper-size GILL (OPT-6.7B + SD 1.5) were copied to 3.7 GB of float32 memory at load instead of
staying 1.9 GB of memory-mapped bf16 pages, and denoised in another dtype than they were saved in. Loading every
component in the dtype it was saved in (transformers' `dtype="auto"`) is what a user who saved in bf16 expects.
"""

import os

import torch
from safetensors import safe_open

_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _file_float_dtypes(path: str) -> set | None:
    """The floating dtypes of a safetensors file's tensors; None when its header cannot be read (the loader then
    names the corrupted file, as without this scan)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {f.get_slice(name).get_dtype() for name in f.keys()} & set(_FLOATS)
    except Exception:  # a corrupted or truncated file: not this scan's error to raise
        return None


def saved_component_dtypes(folder: str, components) -> dict[str, torch.dtype]:
    """`{component: dtype}` for each of `components` whose safetensors files hold one floating dtype only (mixed or
    quantized components, and those without weight files, are left to their library's default)."""
    found = {}
    for name in components:
        subfolder = os.path.join(folder, name)
        if not os.path.isdir(subfolder):
            continue
        files = sorted(f for f in os.listdir(subfolder) if f.endswith(".safetensors"))
        config_path = os.path.join(subfolder, "config.json")
        if not files or (os.path.isfile(config_path) and '"quantization_config"' in open(config_path).read()):
            continue
        dtypes = set()
        for file in files:
            found_in_file = _file_float_dtypes(os.path.join(subfolder, file))
            if found_in_file is None:
                dtypes = set()
                break
            dtypes |= found_in_file
        if len(dtypes) == 1:
            found[name] = _FLOATS[dtypes.pop()]
    return found
