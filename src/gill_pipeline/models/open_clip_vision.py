"""An open_clip vision tower as a pipeline component (`pip install "gill-pipeline[open_clip]"`)."""

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput


def _import_open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "open_clip vision encoders need the `open_clip_torch` package: pip install \"gill-pipeline[open_clip]\""
        ) from error
    return open_clip


@dataclass
class OpenCLIPVisionOutput(BaseOutput):
    """`pooler_output`: the tower's pooled (projected) image embedding, the feature GILL reads."""

    pooler_output: torch.Tensor


class OpenCLIPVisionModel(ModelMixin, ConfigMixin):
    r"""
    The vision tower of an open_clip model, saved and loaded like any pipeline component (config + safetensors).

    GILL reads its pooled output (`model.visual(pixels)`, width `hidden_size` = the tower's `output_dim`). Build one
    with pretrained weights through [`OpenCLIPVisionModel.from_open_clip`], which also returns the matching
    `CLIPImageProcessor`.

    Args:
        model_name (`str`): An open_clip architecture name, e.g. `"ViT-B-32"`.
        hidden_size (`int`): Width of the pooled output (the tower's `output_dim`).
        image_size (`int`): Input resolution.
    """

    @register_to_config
    def __init__(self, model_name: str, hidden_size: int, image_size: int):
        super().__init__()
        open_clip = _import_open_clip()
        self.visual = open_clip.create_model(model_name, pretrained=None).visual
        if getattr(self.visual, "output_dim", hidden_size) != hidden_size:
            raise ValueError(
                f"`hidden_size`={hidden_size} does not match the output width {self.visual.output_dim} of open_clip "
                f"model {model_name!r}."
            )

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True):
        pooled = self.visual(pixel_values)
        return OpenCLIPVisionOutput(pooler_output=pooled) if return_dict else (pooled,)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None = None, **kwargs):
        """(encoder, image processor) for an open_clip model, with its `pretrained` weights (e.g. `"laion2b_s34b_b79k"`)
        downloaded by open_clip. Extra `kwargs` go to `open_clip.create_model`."""
        from transformers import CLIPImageProcessor

        open_clip = _import_open_clip()
        source = open_clip.create_model(model_name, pretrained=pretrained, **kwargs).visual
        size = source.image_size if isinstance(source.image_size, int) else source.image_size[0]
        encoder = cls(model_name=model_name, hidden_size=int(source.output_dim), image_size=int(size))
        encoder.visual.load_state_dict(source.state_dict())
        config = getattr(source, "preprocess_cfg", None) or {}
        mean = list(config.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = list(config.get("std", open_clip.OPENAI_DATASET_STD))
        processor = CLIPImageProcessor(
            size={"shortest_edge": int(size)},
            crop_size={"height": int(size), "width": int(size)},
            image_mean=mean,
            image_std=std,
        )
        return encoder.eval(), processor
