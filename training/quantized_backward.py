"""Backpropagating through a frozen torchao-quantized LM without a full-precision copy of its weights.

GILL's learned parts sit on both sides of the frozen LM (the `[IMG]` input rows before it, the mapper after it), so
every training step backpropagates through the LM to its inputs. torchao's weight-only linear (`Int8Tensor`, 0.18)
computes `x @ qdata.t().to(x.dtype) * scale` at `__torch_function__` level: autograd then saves that bf16 copy of
the int8 values for the backward of the matrix product. One step keeps a bf16 copy of every quantized layer until
`backward()`: measured here, the saved tensors of an int8 Qwen2-shaped LM equal those of the bf16 LM (for a
Qwen2.5-7B-shaped LM, about 13 GB on top of its 8.7 GB of int8 weights).

[`lean_quantized_backward`] routes those layers through an autograd function that saves the quantized weight itself
(no new memory) and dequantizes one layer at a time in the backward: the same gradients, no full copy. It changes
nothing for layers whose weight is a plain tensor, and nothing for inference (it is a context manager).
"""

import contextlib

import torch
from torch import nn


def _is_quantized(weight) -> bool:
    return type(weight) is not torch.Tensor and type(weight) is not nn.Parameter and hasattr(weight, "dequantize")


class _QuantizedLinear(torch.autograd.Function):
    """`F.linear` with a frozen quantized weight: saves the weight as stored, dequantizes it in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
        if qdata is not None and scale is not None and scale.numel() == qdata.shape[0]:
            # One scale per output row (W = diag(scale) @ qdata): the forward's own formula, transposed; only this
            # layer's int8 values are widened, and freed when this returns.
            grad_input = (grad_output * scale.flatten().to(grad_output.dtype)) @ qdata.to(grad_output.dtype)
        else:
            grad_input = grad_output @ weight.dequantize().to(grad_output.dtype)
        return grad_input.to(ctx.input_dtype), None, None


def _lean_forward(module: nn.Linear):
    def forward(x):
        if not torch.is_grad_enabled() or not x.requires_grad:
            return nn.functional.linear(x, module.weight, module.bias)
        return _QuantizedLinear.apply(x, module.weight, module.bias)

    return forward


@contextlib.contextmanager
def lean_quantized_backward(model: nn.Module):
    """Within the block, `model`'s `nn.Linear` layers with a frozen quantized weight save that weight (not a dense copy)
    for the backward. Layers with a trainable weight (and plain weights) are left as they are. Yields the number of
    layers routed."""
    routed = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and _is_quantized(weight) and not weight.requires_grad:
            if "forward" in module.__dict__:  # already wrapped (e.g. an offload hook): leave it alone
                continue
            routed.append(module)
            module.forward = _lean_forward(module)
    try:
        yield len(routed)
    finally:
        for module in routed:
            del module.forward  # back to the class's forward
