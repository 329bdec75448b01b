"""Offloading for `GILLPipeline`: diffusers' three modes, with what GILL needs on top.

diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload` turn `device="cpu"` into `cpu:0`, and since
torch 2.14 `tensor.to("cpu:0")` copies a CPU tensor instead of returning it. accelerate's hooks then (sequential)
put a plain `Tensor` where a `Parameter` was and fail on the next offload ("new() received an invalid combination of
arguments"), or (model offload) copy every weight of a component on each forward. The hooks are set back to the plain
`cpu` device here, so offloading on a CPU-only machine (what tests and small machines run) works and costs nothing.

`gill` is never offloaded (`_exclude_from_cpu_offload`): its parts are called outside its `forward`, where hooks
would not run. `enable_group_offload` keeps it out the same way.
"""

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

_CPU = torch.device("cpu")


def _hooks(module: torch.nn.Module):
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        if hook is not None:
            yield from getattr(hook, "hooks", None) or [hook]


class OffloadMixin:
    """diffusers' offload methods with the CPU device kept plain (`cpu`, never `cpu:0`) and `gill` kept onloaded."""

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        """See diffusers' [`DiffusionPipeline.enable_model_cpu_offload`]; `device="cpu"` runs the hooks on the CPU."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self._plain_cpu_hooks()

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        """See diffusers' [`DiffusionPipeline.enable_sequential_cpu_offload`]; `device="cpu"` runs the hooks on the
        CPU (weights stay on `meta` between calls, as on an accelerator)."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        self._plain_cpu_hooks()

    def enable_group_offload(self, onload_device: torch.device, *args, exclude_modules=None, **kwargs):
        """See diffusers' [`DiffusionPipeline.enable_group_offload`]; `gill` is always among `exclude_modules`."""
        if isinstance(exclude_modules, str):
            exclude_modules = [exclude_modules]
        exclude_modules = list(exclude_modules or [])
        for name in self._exclude_from_cpu_offload:
            if name not in exclude_modules:
                exclude_modules.append(name)
        super().enable_group_offload(torch.device(onload_device), *args, exclude_modules=exclude_modules, **kwargs)

    def _plain_cpu_hooks(self):
        offload_device = getattr(self, "_offload_device", None)
        if offload_device is None or torch.device(offload_device).type != "cpu":
            return
        self._offload_device = _CPU
        for component in self.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            for hook in _hooks(component):
                device = getattr(hook, "execution_device", None)
                if device is not None and torch.device(device).type == "cpu":
                    hook.execution_device = _CPU
