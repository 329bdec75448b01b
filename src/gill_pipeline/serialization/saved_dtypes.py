"""The dtype each component of a pipeline folder was saved in, read from its config and safetensors headers.

diffusers' `from_pretrained` loads a model without `torch_dtype` in float32 whatever its files hold; transformers 5
keeps the saved dtype. A GILL folder mixes both libraries, so a pipeline saved in bf16 came back half in float32: the
UNet and the VAE of a paper-size GILL (OPT-6.7B + SD 1.5) were copied to 3.7 GB of float32 memory at load instead of
staying 1.9 GB of memory-mapped bf16 pages, and denoised in another dtype than they were saved in. Loading every
component in the dtype it was saved in (transformers' `dtype="auto"`) is what a user who saved in bf16 expects.

A quantized component holds integer weights beside its unquantized tensors (embeddings, norms, biases); the dtype is
that of the unquantized ones, which the folder records: transformers writes it in `config.json` (`dtype`, formerly
`torch_dtype`), and torchao's safetensors metadata marks each plain tensor (`{"_type": "Tensor"}`) and records each
quantized tensor's original dtype. Without it, diffusers' pipeline loader handed the quantized components float32:
an int8 + bf16 folder reloaded as int8 + float32.
"""

import json
import os

import torch
from safetensors import safe_open

_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_NAMES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}


def _file_float_dtypes(path: str) -> set | None:
    """The floating dtypes of a safetensors file's tensors; None when its header cannot be read (the loader then
    names the corrupted file, as without this scan)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {_FLOATS[d] for d in (f.get_slice(name).get_dtype() for name in f.keys()) if d in _FLOATS}
    except Exception:  # a corrupted or truncated file: not this scan's error to raise
        return None


def _torchao_file_dtypes(path: str) -> set | None:
    """The dtypes of a torchao-quantized safetensors file's unquantized tensors and of its quantized tensors'
    originals (not the dtypes of their scales); None without torchao metadata or a readable header."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata, names = f.metadata() or {}, set(f.keys())
            if "tensor_names" not in metadata:
                return None
            dtypes = set()
            for name in json.loads(metadata["tensor_names"]):
                entry = json.loads(metadata.get(name, "{}"))
                if entry.get("_type") == "Tensor":
                    if name in names:  # tied weights are listed but written once
                        dtypes.add(f.get_slice(name).get_dtype())
                else:
                    recorded = ((entry.get("_data") or {}).get("dtype") or {}).get("_data")
                    dtypes.add(recorded)
    except Exception:  # a corrupted header or metadata: the loader names it
        return None
    return {_FLOATS.get(d) or _DTYPE_NAMES.get(d) for d in dtypes} - {None} if dtypes else set()


def _quantized_dtype(subfolder: str, config: dict, files: list[str]) -> torch.dtype | None:
    """The dtype of a quantized component's unquantized tensors, as its folder records it (None when it does not)."""
    recorded = config.get("dtype") or config.get("torch_dtype")  # transformers writes it; diffusers does not
    if isinstance(recorded, str) and recorded.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[recorded.removeprefix("torch.")]
    dtypes = set()
    for file in files:
        found = _torchao_file_dtypes(os.path.join(subfolder, file))
        if found is None:
            return None
        dtypes |= found
    return dtypes.pop() if len(dtypes) == 1 else None


def saved_component_dtypes(folder: str, components) -> dict[str, torch.dtype]:
    """`{component: dtype}` for each of `components` whose safetensors files hold one floating dtype only, or, for a
    quantized component, whose folder records the dtype of its unquantized tensors (mixed components, and those
    without weight files, are left to their library's default)."""
    found = {}
    for name in components:
        subfolder = os.path.join(folder, name)
        if not os.path.isdir(subfolder):
            continue
        files = sorted(f for f in os.listdir(subfolder) if f.endswith(".safetensors"))
        if not files:
            continue
        config_path = os.path.join(subfolder, "config.json")
        config = _read_config(config_path) if os.path.isfile(config_path) else {}
        if "quantization_config" in config:
            dtype = _quantized_dtype(subfolder, config, files)
            if dtype is not None:
                found[name] = dtype
            continue
        dtypes = set()
        for file in files:
            found_in_file = _file_float_dtypes(os.path.join(subfolder, file))
            if found_in_file is None:
                dtypes = set()
                break
            dtypes |= found_in_file
        if len(dtypes) == 1:
            found[name] = dtypes.pop()
    return found


def _read_config(path: str) -> dict:
    """A component's `config.json` as a dict ({} when it is not one: the folder checks name that file)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
