"""The generation loss against a decoder family's own conditioning: every learned tensor, masks respected."""

import torch

from .layout import MASK, SEQUENCE, ConditioningLayout


def conditioning_mse(
    predicted: dict[str, torch.Tensor], target: dict[str, torch.Tensor], layout: ConditioningLayout
) -> dict[str, torch.Tensor]:
    """Mean squared error of predicted conditioning against targets from [`encode_conditioning`], per tensor.

    Every tensor of `layout.learned_tensors` is compared (sequence embeddings and pooled embeddings alike). Where the
    family masks its text (PixArt, Sana), positions the TARGET's mask marks as padding are left out: the denoiser
    never sees them. Where it attends to every position (SD, SDXL, SD3, Flux), padded positions count like the rest,
    since their states carry the caption.

    Returns:
        `{name: loss}` for each learned tensor, plus `"total"`: their sum.
    """
    masks = {t.masks: t.name for t in layout.tensors if t.kind == MASK}
    losses = {}
    for tensor in layout.learned_tensors:
        for source, name in ((predicted, "predicted"), (target, "target")):
            if tensor.name not in source:
                raise ValueError(f"`{name}` has no `{tensor.name}`; the layout of {layout.pipeline_class} needs it.")
        error = (predicted[tensor.name].float() - target[tensor.name].float()) ** 2
        if tensor.kind == SEQUENCE and tensor.name in masks:
            keep = target[masks[tensor.name]].to(error.dtype)[..., None]  # (N, L, 1): 1 on real positions
            losses[tensor.name] = (error * keep).sum() / (keep.sum() * error.shape[-1]).clamp(min=1)
        else:
            losses[tensor.name] = error.mean()
    losses["total"] = sum(losses.values())
    return losses
