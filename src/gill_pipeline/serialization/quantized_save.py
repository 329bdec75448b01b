"""Writing a torchao-quantized component (LM, UNet, DiT transformer, ...) as its library writes it, one shard at a time.

Two gaps of the libraries this package saves with (torchao 0.18, transformers 5.24, diffusers 0.42), fixed as one:

- **A second copy of the quantized weights while saving.** transformers' and diffusers' `save_pretrained` flatten the
  WHOLE state dict first with torchao's `flatten_tensor_state_dict`, which clones every quantized tensor: saving an
  8 GB int8 LM held 8 GB more until the last shard was written. Here each shard is flattened, written and dropped
  alone: the extra memory is one shard's clones (`max_shard_size`).
- **An LM loaded from a torchao folder could not be saved at all**: transformers' `save_pretrained` reverses the
  conversions it applied on loading, and the torchao one (`TorchAoDeserialize`) has no reverse (`NotImplementedError`).
  The quantized tensors in memory are already what is saved, so nothing needs reversing; other conversions (renamed
  or fused weights, e.g. Mixtral's experts) are left to the library's own save.

The files are the library's: the config (`config.json`, and `generation_config.json` for a transformers LM that
generates), the weights as `model.safetensors` / `diffusion_pytorch_model.safetensors` or numbered shards with their
`.index.json`, every shard's header carrying the torchao metadata of every tensor (`tensor_names` and one entry per
tensor, as the libraries write it), and tied weights written once. Each library's own `from_pretrained` reads them back
quantized. Components quantized otherwise (bitsandbytes, GGUF) are saved by their library as before.
"""

import contextlib
import inspect
import json
import os
import re

import torch
from diffusers import ModelMixin
from diffusers.utils import logging
from transformers import PreTrainedModel

from .quantization import quantization_summary

logger = logging.get_logger(__name__)

# The libraries' default is 10GB, which would leave a 7B int8 LM in one shard: one shard's copy would be all of it.
DEFAULT_MAX_SHARD_SIZE = "2GB"
# Weight file stems of each library: `<stem>.safetensors`, or `<stem>-00001-of-00002.safetensors`, ... and
# `<stem>.safetensors.index.json`.
TRANSFORMERS_WEIGHTS = "model"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_PLAIN_TENSOR_METADATA = json.dumps({"_type": "Tensor"})


def is_torchao_quantized(model) -> bool:
    """Whether `model` (a transformers or diffusers model) records a torchao quantization."""
    summary = quantization_summary(model)
    return summary is not None and summary.get("quant_method") == "torchao"


def max_shard_bytes(max_shard_size) -> int:
    """`max_shard_size` (bytes, or a size such as "2GB" or "500MB") in bytes; a clear error for anything else."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise TypeError(f"`max_shard_size` must be a number of bytes or a size such as '5GB', got {max_shard_size!r}.")
    try:
        size = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    except ValueError as error:
        raise ValueError(
            f"`max_shard_size` must be a number of bytes or a size such as '5GB', got {max_shard_size!r} ({error})."
        ) from None
    if size <= 0:
        raise ValueError(f"`max_shard_size` must be positive, got {max_shard_size!r}.")
    return size


def _data_tensors(tensor) -> list:
    """The plain tensors a torchao tensor is written as (its qdata, scale, ...), or the tensor itself."""
    if type(tensor) is torch.Tensor:
        return [tensor]
    names = list(tensor.tensor_data_names) + list(getattr(tensor, "optional_tensor_data_names", []))
    return [value for value in (getattr(tensor, name) for name in names) if isinstance(value, torch.Tensor)]


def stored_bytes(tensor) -> int:
    """The bytes `tensor` takes in a safetensors file (a torchao tensor: the sum of its data tensors)."""
    return sum(part.numel() * part.element_size() for part in _data_tensors(tensor))


def torchao_metadata(state: dict) -> dict[str, str]:
    """The safetensors header metadata torchao's `flatten_tensor_state_dict` gives `state`, without copying a tensor."""
    from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    metadata = {}
    for name, tensor in state.items():
        plain = type(tensor) is torch.Tensor
        metadata[name] = _PLAIN_TENSOR_METADATA if plain else json.dumps(tensor, cls=TensorSubclassAttributeJSONEncoder)
    metadata["tensor_names"] = json.dumps(list(state))
    return metadata


def _shards(state: dict, max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names of at most `max_bytes` each (a larger tensor alone), as huggingface_hub splits."""
    groups, group, size = [], [], 0
    for name, tensor in state.items():
        nbytes = stored_bytes(tensor)
        if group and size + nbytes > max_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        groups.append(group)
    return groups


def _without_tied_weights(state: dict, model: PreTrainedModel) -> dict:
    """transformers' own removal of tied weights (and of `_keys_to_ignore_on_save`), on a state dict holding torchao
    tensors: each is stood in for by a small plain tensor (the same one for the same object), since safetensors cannot
    read a storage pointer off a torchao tensor."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    state = {name: tensor for name, tensor in state.items() if name not in ignored}
    stand_ins = {}
    proxy = {
        name: tensor if type(tensor) is torch.Tensor else stand_ins.setdefault(id(tensor), torch.empty(1))
        for name, tensor in state.items()
    }
    kept = remove_tied_weights_from_state_dict(proxy, model)
    return {name: state[name] for name in state if name in kept}


def _renames_weights_on_save(model: PreTrainedModel) -> bool:
    """Whether transformers would rename or re-fuse weights when saving `model` (conversions other than torchao's)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # as transformers' `revert_weight_conversion` decides for a model not loaded from files
        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    torchao_ops = "transformers.integrations.torchao"
    return any(
        not any(type(op).__module__ == torchao_ops for op in getattr(conversion, "operations", []) or [])
        for conversion in conversions or []
    )


def _remove_stale_weights(folder: str, stem: str, written: set[str]) -> None:
    """A previous save's weight files that this one does not replace (else the loader could read both)."""
    pattern = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?")
    for name in os.listdir(folder):
        if pattern.fullmatch(name) and name not in written and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def _write_config(model, folder: str) -> None:
    if isinstance(model, PreTrainedModel):
        # What transformers' `save_pretrained` records: the dtype of the unquantized tensors, the class.
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
    else:
        model.save_config(folder)


def save_quantized_component(
    model, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> int:
    """Writes a torchao-quantized transformers or diffusers `model` to `folder` in its library's format, flattening one
    shard at a time (peak extra memory: one shard's copies, at most `max_shard_size` bytes unless one tensor is
    larger); returns the bytes of tensors written.

    A transformers model whose weights transformers renames or re-fuses when saving is handed to its own
    `save_pretrained` (which holds the whole copy, and raises for such a model loaded from a torchao folder).
    """
    if not isinstance(model, (PreTrainedModel, ModelMixin)):
        raise TypeError(f"`model` must be a transformers or diffusers model, got {type(model).__name__}.")
    if not is_torchao_quantized(model):
        raise ValueError(
            f"`model` ({type(model).__name__}) is not quantized with torchao (its quantization: "
            f"{quantization_summary(model)}); save it with its own `save_pretrained`."
        )
    max_bytes = max_shard_bytes(max_shard_size)
    folder = os.fspath(folder)
    transformers_model = isinstance(model, PreTrainedModel)
    if transformers_model and _renames_weights_on_save(model):
        logger.warning(
            "%s renames or fuses weights when saved: saved by transformers' own `save_pretrained` (one whole copy of "
            "the quantized weights in memory meanwhile).", type(model).__name__,
        )
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return sum(stored_bytes(t) for t in model.state_dict().values())
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    os.makedirs(folder, exist_ok=True)
    _write_config(model, folder)
    state = model.state_dict()  # references, not copies
    metadata = {"format": "pt", **torchao_metadata(state)}  # of every tensor, tied ones too, in every shard
    if transformers_model:
        state = _without_tied_weights(state, model)
    stem = TRANSFORMERS_WEIGHTS if transformers_model else DIFFUSERS_WEIGHTS
    groups = _shards(state, max_bytes)
    weight_map, total, written = {}, 0, set()
    for index, names in enumerate(groups):
        suffix = "" if len(groups) == 1 else f"-{index + 1:05d}-of-{len(groups):05d}"
        file_name = f"{stem}{suffix}.safetensors"
        total += _write_shard({name: state[name] for name in names}, os.path.join(folder, file_name), metadata,
                              flatten_tensor_state_dict, weight_map)
        written.add(file_name)
    if len(groups) > 1:
        index_name = f"{stem}.safetensors.index.json"
        if transformers_model:
            index_metadata = {"total_parameters": model.num_parameters(), "total_size": total}
        else:
            index_metadata = {"total_size": total, **{k: v for k, v in metadata.items() if k != "format"}}
        with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
            f.write(json.dumps({"metadata": index_metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        written.add(index_name)
    _remove_stale_weights(folder, stem, written)
    return total


def _write_shard(shard: dict, path: str, metadata: dict, flatten, weight_map: dict) -> int:
    """Flattens one shard (torchao clones its quantized tensors here), writes it, and lets the clones go on return."""
    from safetensors.torch import save_file

    data, _ = flatten(shard)
    data = {name: tensor.contiguous() for name, tensor in data.items()}
    save_file(data, path, metadata=metadata)
    weight_map.update({name: os.path.basename(path) for name in data})
    return sum(tensor.numel() * tensor.element_size() for tensor in data.values())


# Arguments diffusers' pipeline save may pass a component's `save_pretrained` that this writer follows or may ignore.
_HANDLED_ARGUMENTS = ("max_shard_size", "safe_serialization", "variant", "save_peft_format")


def _save_method(model, own_save):
    """A `save_pretrained` for one quantized component: this module's writer, or `own_save` for what it does not do.

    It shows `own_save`'s signature, so diffusers passes it exactly the arguments it would pass the library's method.
    """

    def save(save_directory, **kwargs):
        variant, safe = kwargs.get("variant"), kwargs.get("safe_serialization", True)
        if variant is not None or not safe or set(kwargs) - set(_HANDLED_ARGUMENTS):
            return own_save(save_directory, **kwargs)  # file names or formats this writer does not produce
        save_quantized_component(model, save_directory, kwargs.get("max_shard_size") or DEFAULT_MAX_SHARD_SIZE)

    save.__signature__ = inspect.signature(own_save)
    return save


@contextlib.contextmanager
def saving_quantized_components(pipe):
    """While a pipeline is saved, its torchao-quantized components are written by [`save_quantized_component`]
    instead of their library's `save_pretrained` (which diffusers' pipeline save calls for each component).

    With `variant=` or `safe_serialization=False` (file names or formats this writer does not produce) the library's
    own save is used.
    """
    patched = []
    for module in pipe.components.values():
        module = getattr(module, "_orig_mod", module)  # a compiled module is saved through its original
        if not isinstance(module, (PreTrainedModel, ModelMixin)) or not is_torchao_quantized(module):
            continue
        # On this instance only (the class's method is left alone), for the length of the save.
        module.__dict__["save_pretrained"] = _save_method(module, module.save_pretrained)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("save_pretrained", None)
