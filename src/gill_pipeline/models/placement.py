"""Where a module computes, when offloading may have put its weights somewhere else.

Under accelerate's sequential CPU offload and big-model inference (`device_map` with disk or CPU offload) a module's
weights sit on `meta` between calls and its hooks move them in; under diffusers' group offloading they sit on the
offload device. So `next(module.parameters()).device` is not where the module runs, and moving inputs there fails
("Cannot copy out of meta tensor"). The hooks know the execution device: read it from them first.
"""

import contextlib

import torch


def _hook_execution_device(module: torch.nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    # accelerate chains hooks in a `SequentialHook`; any of them may carry the execution device.
    for each in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(each, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def compute_device(module: torch.nn.Module, weights: bool = True) -> torch.device | None:
    """The device `module` computes on: the onload device of diffusers' group offloading, else the execution device
    of an accelerate hook on it or on any submodule, else (with `weights=True`) its weights' device; `None` when its
    weights are on `meta` and no hook says (the caller then leaves its inputs where they are)."""
    try:
        from diffusers.hooks.group_offloading import _get_group_onload_device

        return torch.device(_get_group_onload_device(module))
    except (ImportError, ValueError):
        pass
    for submodule in module.modules():
        device = _hook_execution_device(submodule)
        if device is not None:
            return device
    if not weights:
        return None
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type == "meta":
        return None
    return parameter.device


def disk_group_holding(root: torch.nn.Module, module: torch.nn.Module):
    """The diffusers group-offloading group, offloaded to disk, that holds `module` without a hook on `module` itself
    (block-level offloading puts an LM's embeddings in the group of the top module), or None."""
    try:
        from diffusers.hooks.group_offloading import _GROUP_OFFLOADING
    except ImportError:
        return None
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(_GROUP_OFFLOADING) is not None:
        return None
    weights = {id(p) for p in module.parameters(recurse=False)}
    for submodule in root.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        group = getattr(hook, "group", None)
        if group is None or not getattr(group, "offload_to_disk_path", None):
            continue
        if any(m is module for m in group.modules) or weights & {id(p) for p in group.parameters}:
            return group
    return None


@contextlib.contextmanager
def onloaded(group):
    """Runs a module directly (outside its root's forward) with its weights in place; `group` is what
    `disk_group_holding` found for it (None: nothing to do).

    Group offloading to disk leaves uninitialised placeholders in an offloaded group's weights and reads them back only
    when the group's hook runs; a submodule called on its own (GILL looks up the LM's input embeddings itself) would
    read the placeholders. Its group is onloaded for the call and offloaded again after.
    """
    if group is None:
        yield
        return
    group.onload_()
    try:
        yield
    finally:
        group.offload_()


def stored_weight(module: torch.nn.Module) -> torch.Tensor:
    """`module.weight`, or, when offloading left it on `meta`, the tensor accelerate's hook keeps for it (in memory,
    or read from the offload folder / the checkpoint's safetensors). For reading a module's values outside its forward
    (GILL starts its `[IMG]` rows from the statistics of the LM's embedding rows)."""
    weight = module.weight
    if weight.device.type != "meta":
        return weight
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights_map = getattr(each, "weights_map", None)
        if weights_map is not None and "weight" in weights_map:
            return weights_map["weight"]
    raise ValueError(
        f"The weight of {type(module).__name__} is on the `meta` device and no offload hook holds its values: load "
        "the model's weights (or dispatch it with accelerate) first."
    )
