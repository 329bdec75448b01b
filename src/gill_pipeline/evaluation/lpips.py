"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018) over a
feature network the user passes.

The published LPIPS reads ImageNet-trained AlexNet/VGG16 features that its libraries download on first use. Nothing
can be downloaded here, so the formula takes any network that maps images to a list of feature maps:
- the published metric: `torchmetrics_lpips("vgg")` (torchmetrics + torchvision, with the torchvision backbone
  weights placed once in the torch hub cache; the LPIPS linear layers ship inside torchmetrics), or this class over
  your own VGG16 slices with `load_lpips_linear_weights`;
- fully offline: `VisionTransformerFeatures` over the CLIP the evaluation already has (every layer's token states,
  unit weights: LPIPS's "baseline" variant on CLIP features). Its values are not comparable with published LPIPS.
"""

import torch
from torch import nn

from .clip_features import to_pil_images


def _as_maps(features: torch.Tensor) -> torch.Tensor:
    # Channels on dim 1 and positions after: CNN maps (N, C, H, W) stay; transformer tokens (N, T, C) become (N, C, T).
    if features.ndim == 4:
        return features.flatten(2)
    if features.ndim == 3:
        return features.transpose(1, 2)
    raise ValueError(f"Feature maps must be (N, C, H, W) or tokens (N, T, C), got {tuple(features.shape)}.")


class LPIPS(nn.Module):
    r"""
    LPIPS distance: per layer, unit-normalise the features over channels, square the difference, weight the channels
    (`linear_weights`, or 1 for the "baseline" variant), sum over channels, average over positions; sum over layers.

    Args:
        feature_network (`Callable`): images `(N, 3, H, W)` in [0, 1] -> a list of feature tensors, each
            `(N, C, H', W')` or `(N, T, C)`.
        linear_weights (`list[torch.Tensor]`, *optional*): per layer, non-negative channel weights `(C,)` (LPIPS's
            learned 1x1 convolutions). Defaults to 1 for every channel.
    """

    def __init__(self, feature_network, linear_weights: list[torch.Tensor] | None = None, eps: float = 1e-10):
        super().__init__()
        self.feature_network = feature_network
        self.linear_weights = None if linear_weights is None else [w.flatten().float() for w in linear_weights]
        self.eps = eps

    @torch.no_grad()
    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """Distances `(N,)` between two image batches of the same shape, in [0, 1]."""
        if images_a.shape != images_b.shape:
            raise ValueError(f"LPIPS compares images of the same shape, got {tuple(images_a.shape)} and {tuple(images_b.shape)}.")
        features_a, features_b = self.feature_network(images_a), self.feature_network(images_b)
        if self.linear_weights is not None and len(self.linear_weights) != len(features_a):
            raise ValueError(
                f"`linear_weights` has {len(self.linear_weights)} layers but the feature network gives {len(features_a)}."
            )
        total = torch.zeros(images_a.shape[0])
        for layer, (a, b) in enumerate(zip(features_a, features_b)):
            a, b = _as_maps(a.float()), _as_maps(b.float())
            a = a / (a.norm(dim=1, keepdim=True) + self.eps)
            b = b / (b.norm(dim=1, keepdim=True) + self.eps)
            squared = (a - b) ** 2
            if self.linear_weights is not None:
                squared = squared * self.linear_weights[layer].to(squared.device)[None, :, None]
            total += squared.sum(1).mean(-1).cpu()
        return total


def load_lpips_linear_weights(path: str) -> list[torch.Tensor]:
    """The linear layers of a published LPIPS (`vgg.pth`, `alex.pth` of the `lpips` package or torchmetrics):
    a state dict `lin{i}.model.1.weight` of shape `(1, C, 1, 1)`, read with `weights_only=True`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = sorted((k for k in state if k.startswith("lin") and k.endswith(".weight")), key=lambda k: int(k[3:].split(".")[0]))
    if not keys:
        raise ValueError(f"{path!r} holds no LPIPS linear layers (`lin0.model.1.weight`, ...).")
    return [state[k].flatten() for k in keys]


class VisionTransformerFeatures(nn.Module):
    r"""
    A CLIP vision tower (or any transformers vision model with `output_hidden_states`) as an LPIPS feature network:
    the token states after every layer, from images preprocessed by the model's own image processor.
    """

    def __init__(self, model, image_processor):
        super().__init__()
        self.model, self.image_processor = model.eval(), image_processor

    @classmethod
    def from_pretrained(cls, path: str, processor_path: str | None = None, dtype: torch.dtype = torch.float32):
        from .clip_features import ImageEmbedder

        embedder = ImageEmbedder.from_pretrained(path, processor_path, dtype=dtype)
        model = getattr(embedder.model, "vision_model", embedder.model)
        return cls(model, embedder.image_processor)

    @torch.no_grad()
    def forward(self, images) -> list[torch.Tensor]:
        pixel_values = self.image_processor(images=to_pil_images(images), return_tensors="pt").pixel_values
        parameter = next(self.model.parameters())
        output = self.model(pixel_values=pixel_values.to(device=parameter.device, dtype=parameter.dtype), output_hidden_states=True)
        return list(output.hidden_states[1:])


def torchmetrics_lpips(net_type: str = "vgg"):
    """The published LPIPS through torchmetrics, as a callable `(images_a, images_b) -> (N,)` on [0, 1] images.

    Needs torchvision, and its ImageNet backbone weights in the torch hub cache (`$TORCH_HOME/hub/checkpoints/`,
    e.g. `vgg16-397923af.pth`): copy them there once where there is network; torchmetrics then loads them offline.
    """
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError:
        raise ImportError("The published LPIPS needs torchmetrics and torchvision: `pip install gill-pipeline[eval] torchvision`.") from None
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True, reduction="sum")

    def distance(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        values = []
        for a, b in zip(images_a, images_b):
            metric.reset()
            values.append(float(metric(a[None].float(), b[None].float())))
        return torch.tensor(values)

    return distance
