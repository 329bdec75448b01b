"""Saving a torchao-quantized diffusers model shard by shard, without a second copy of its quantized weights.

diffusers 0.42's `save_pretrained` of a torchao model flattens its WHOLE state dict first with torchao's
`flatten_tensor_state_dict`, which clones every quantized tensor (`value.detach().clone()`): saving holds two copies
of the int8 weights (measured: the process's own memory grew by the model's int8 bytes during the save, for diffusers
and transformers alike). For Flux's transformer that is 11.9 GB on top of 11.9 GB. Here each shard is flattened and
written alone, so the extra memory is one shard. The files are what diffusers writes (flattened tensor names, torchao
metadata in each shard's header, the index); diffusers' loader merges the shards' metadata, so each shard carries the
full `tensor_names` list.
"""

import json
import os

import torch
from safetensors.torch import save_file

WEIGHTS = "diffusion_pytorch_model"


def save_quantized_sharded(model, folder: str, shard_bytes: int = 1024**3) -> int:
    """Writes `model` (a diffusers model quantized with torchao) to `folder` as diffusers would, one shard in memory at
    a time; returns the bytes of tensors written."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    state = model.state_dict()
    groups, group, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * (1 if type(tensor) is not torch.Tensor else tensor.element_size())
        if group and size + nbytes > shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += nbytes
    groups.append(group)
    names = json.dumps(list(state))
    weight_map, total = {}, 0
    for index, keys in enumerate(groups):
        filename = f"{WEIGHTS}-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        data, metadata = flatten_tensor_state_dict({key: state[key] for key in keys})
        metadata = {key: str(value) for key, value in {**metadata, "tensor_names": names}.items()}
        data = {key: value.contiguous() for key, value in data.items()}
        save_file(data, os.path.join(folder, filename), metadata={"format": "pt", **metadata})
        weight_map.update({key: filename for key in data})
        total += sum(value.numel() * value.element_size() for value in data.values())
        del data  # this shard's clones
    with open(os.path.join(folder, f"{WEIGHTS}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total
