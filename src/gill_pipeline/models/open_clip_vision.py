"""An open_clip vision tower as a pipeline component (`pip install "gill-pipeline[open_clip]"`).

The component's config holds the tower's whole architecture (open_clip's `vision_cfg` after every override), so a
saved pipeline loads without the original model name being registered with open_clip, and without open_clip's
`create_model`, which moves weights between devices inside construction and so cannot run on the meta device diffusers
builds modules on while loading.
"""

import copy
import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput, logging

from .open_clip_processor import OpenCLIPImageProcessor


logger = logging.get_logger(__name__)

# open_clip's names for the two places a model config can come from besides its own registry.
_OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")
# The file open_clip's `local-dir:` schema reads a model config from, and the checkpoint names it looks for first.
_OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
_OPEN_CLIP_CHECKPOINT_FILES = {".safetensors": "open_clip_model.safetensors", "": "open_clip_pytorch_model.bin"}
# `precision` values of `open_clip.create_model` and the dtype each one builds the tower's norms for.
_CAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


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

    GILL reads its pooled output (`model.visual(pixels)`, width `hidden_size`). Build one with pretrained weights
    through [`OpenCLIPVisionModel.from_open_clip`], which also returns the matching image processor; or build a
    randomly initialised one from an open_clip model config (the `vision_cfg` part of open_clip's model JSON).

    Args:
        embed_dim (`int`):
            open_clip's `embed_dim`: the width the tower projects to.
        vision_cfg (`dict`):
            open_clip's vision config (`layers`, `width`, `patch_size`, `image_size`, ... or `timm_model_name`), with
            every override (`force_image_size`, `force_patch_dropout`, model keywords) already applied.
        quick_gelu (`bool`, *optional*, defaults to `False`):
            QuickGELU activations, as OpenAI's CLIP weights were trained with (`force_quick_gelu` in open_clip).
        cast_dtype (`str`, *optional*):
            `"float16"` or `"bfloat16"` when the tower was built for that precision (its layer norms then compute in
            float32), as open_clip's `precision="fp16"`/`"bf16"` does.
        hidden_size (`int`, *optional*):
            Width of the pooled output; defaults to `embed_dim` (differs only for timm towers without a projection).
        model_name (`str`, *optional*):
            The open_clip name the architecture came from; a record only, loading never looks it up.
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict,
        quick_gelu: bool = False,
        cast_dtype: str | None = None,
        hidden_size: int | None = None,
        model_name: str | None = None,
    ):
        super().__init__()
        open_clip = _import_open_clip()
        if cast_dtype not in (None, *_CAST_DTYPES.values()):
            raise ValueError(
                f"`cast_dtype` must be one of {sorted(_CAST_DTYPES.values())} or None, got {cast_dtype!r}."
            )
        if vision_cfg.get("timm_model_pretrained"):
            # The weights come from this component's own file; a pretrained timm trunk would be downloaded and
            # then overwritten.
            raise ValueError("`vision_cfg` asks for `timm_model_pretrained`=True; load weights with from_pretrained.")
        try:
            vision_config = open_clip.CLIPVisionCfg(**vision_cfg)
        except TypeError as error:
            raise ValueError(
                f"`vision_cfg` has keys this open_clip ({open_clip.__version__}) does not know: {error}. It was "
                "probably saved with a newer open_clip_torch; upgrade it."
            ) from error
        # open_clip builds a tower from its config with this function (CLIP, CustomTextCLIP and CoCa all call it);
        # calling it directly builds no text tower and moves nothing between devices, so it also runs on meta.
        self.visual = open_clip.model._build_vision_tower(
            embed_dim, vision_config, quick_gelu, getattr(torch, cast_dtype) if cast_dtype else None
        )
        if vision_config.timm_model_name:
            self._resize_timm_trunk(vision_config.image_size)
        width = getattr(self.visual, "output_dim", hidden_size or embed_dim)
        if hidden_size is None:
            hidden_size = width
            self.register_to_config(hidden_size=hidden_size)
        if width != hidden_size:
            raise ValueError(f"`hidden_size`={hidden_size} does not match the tower's output width {width}.")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if model.config.cast_dtype is not None:
            # A tower built for a low precision computes its norms in float32 (open_clip's `LayerNormFp32`), which
            # needs float32 norm weights whatever `torch_dtype` the rest was loaded in.
            norm_class = _import_open_clip().transformer.LayerNormFp32
            for module in model.visual.modules():
                if isinstance(module, norm_class):
                    module.float()
        return model

    def _resize_timm_trunk(self, image_size):
        # open_clip builds a timm trunk at timm's default input size and resizes it (`set_input_size`) only after
        # loading weights when `force_image_size` is given; the saved `image_size` is the final one, so a trunk whose
        # patch embedding expects another size is resized the same way here.
        patch_embed = getattr(self.visual.trunk, "patch_embed", None)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if patch_embed is not None and tuple(getattr(patch_embed, "img_size", size)) != size:
            self.visual.set_input_size(size)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images the tower reads."""
        size = self.config.vision_cfg.get("image_size", _open_clip_default_image_size())
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True):
        # A tower built for a low `precision` keeps its norms in float32 (so its first parameter's dtype says
        # nothing); its inputs must match its first layer, as open_clip's own training casts them.
        first_layer = next(m for m in self.visual.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        pooled = self.visual(pixel_values.to(first_layer.weight.dtype))
        if isinstance(pooled, tuple):  # towers with `output_tokens` (CoCa's) return (pooled, tokens)
            pooled = pooled[0]
        return OpenCLIPVisionOutput(pooler_output=pooled) if return_dict else (pooled,)

    @classmethod
    def from_open_clip(cls, model_name: str | dict, pretrained: str | None = None, **kwargs):
        r"""
        The vision tower of an open_clip model, with its weights, and the image processor open_clip would use.

        The model is created by `open_clip.create_model` and its tower copied into a component whose config holds
        the whole architecture, so the keywords that change it (`force_quick_gelu`, `force_image_size`,
        `force_patch_dropout`, `precision`, extra model keywords) are kept by `save_pretrained`, and a custom model
        config need not be registered again to load. The copy is checked: it must load the tower's weights strictly
        and give the same features, or this raises instead of saving an architecture that differs.

        Args:
            model_name (`str` or `dict`):
                An open_clip model name (`"ViT-B-32"`, a name registered with `open_clip.add_model_config`,
                `"hf-hub:..."`, `"local-dir:..."`), or an open_clip model config as a dict (`embed_dim`,
                `vision_cfg`, `text_cfg`, ...; or the `{"model_cfg": ..., "preprocess_cfg": ...}` of an
                `open_clip_config.json`).
            pretrained (`str`, *optional*):
                open_clip's pretrained tag (e.g. `"laion2b_s34b_b79k"`, downloaded by open_clip) or a checkpoint
                file. With a config dict only a file is possible.
            kwargs:
                Passed on to `open_clip.create_model`.

        Returns:
            (`OpenCLIPVisionModel`, `OpenCLIPImageProcessor`): the encoder in eval mode and its preprocessing.
        """
        open_clip = _import_open_clip()
        if kwargs.get("jit"):
            raise ValueError("`jit`=True builds a TorchScript model, which cannot be copied into a component.")
        if isinstance(model_name, dict):
            with tempfile.TemporaryDirectory() as folder:
                name = _write_local_model_dir(model_name, pretrained, folder)
                source = open_clip.create_model(name, **kwargs)
                base_config = open_clip.get_model_config(name)
            record = None
        else:
            source = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
            base_config = _lookup_model_config(open_clip, model_name)
            record = model_name

        visual = source.visual.eval()
        config = _final_model_config(open_clip, base_config, kwargs)
        encoder = cls(**config, model_name=record)
        input_dtype = open_clip.model.get_input_dtype(kwargs.get("precision", "fp32")) or torch.float32
        width = _copy_and_check(encoder, visual, config, input_dtype)
        if width != encoder.config.hidden_size:  # a timm trunk without a projection: the trunk's own width
            encoder.register_to_config(hidden_size=width)
        processor = OpenCLIPImageProcessor.from_open_clip_preprocess(visual.preprocess_cfg)
        return encoder.eval(), processor


def _open_clip_default_image_size() -> int:
    return _import_open_clip().CLIPVisionCfg().image_size


def _lookup_model_config(open_clip, model_name: str) -> dict:
    # `create_model` looks a registered name up with "/" replaced by "-" (names like "ViT-B/32").
    lookup = model_name if model_name.startswith(_OPEN_CLIP_SCHEMAS) else model_name.replace("/", "-")
    config = open_clip.get_model_config(lookup)
    if config is None:  # create_model succeeded, so this would be an open_clip change worth hearing about
        raise ValueError(f"open_clip has no model config for `model_name`={model_name!r}.")
    return config


def _write_local_model_dir(model_config: dict, pretrained: str | None, folder: str) -> str:
    """Lays a config dict (and a checkpoint file) out as open_clip's `local-dir:` schema reads them, so the dict goes
    through `create_model` like any named model, without adding it to open_clip's registry."""
    content = model_config if "model_cfg" in model_config else {"model_cfg": model_config}
    missing = [key for key in ("embed_dim", "vision_cfg") if key not in content["model_cfg"]]
    if missing:
        raise ValueError(f"`model_name` is a config dict without {missing}: got keys {sorted(content['model_cfg'])}.")
    with open(os.path.join(folder, _OPEN_CLIP_CONFIG_FILE), "w", encoding="utf-8") as file:
        json.dump(content, file)
    if pretrained is not None:
        if not os.path.isfile(pretrained):
            raise ValueError(
                f"With a config dict as `model_name`, `pretrained` must be a checkpoint file, got {pretrained!r}."
            )
        suffix = ".safetensors" if pretrained.endswith(".safetensors") else ""
        os.symlink(os.path.abspath(pretrained), os.path.join(folder, _OPEN_CLIP_CHECKPOINT_FILES[suffix]))
    return f"local-dir:{folder}"


def _final_model_config(open_clip, base_config: dict, kwargs: dict[str, Any]) -> dict:
    """Our config for the tower `create_model(**kwargs)` builds: its model config with the same overrides applied,
    in the same order (force_* keywords, then the remaining keywords as model config entries)."""
    model_config = copy.deepcopy(base_config)
    vision_cfg = model_config["vision_cfg"]
    if kwargs.get("force_quick_gelu"):
        model_config["quick_gelu"] = True
    if kwargs.get("force_patch_dropout") is not None:
        vision_cfg["patch_dropout"] = kwargs["force_patch_dropout"]
    if kwargs.get("force_image_size") is not None:
        vision_cfg["image_size"] = kwargs["force_image_size"]
    create_model_keywords = inspect.signature(open_clip.create_model).parameters
    model_config.update({key: value for key, value in kwargs.items() if key not in create_model_keywords})
    vision_cfg = dict(model_config["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # the weights are copied from the created model instead
    image_size = vision_cfg.get("image_size")
    if isinstance(image_size, tuple):
        vision_cfg["image_size"] = list(image_size)  # as it comes back from the JSON config
    return dict(
        embed_dim=int(model_config["embed_dim"]),
        vision_cfg=vision_cfg,
        quick_gelu=bool(model_config.get("quick_gelu", False)),
        cast_dtype=_CAST_DTYPES.get(kwargs.get("precision", "fp32")),
    )


def _copy_and_check(
    encoder: OpenCLIPVisionModel, visual: torch.nn.Module, config: dict, input_dtype: torch.dtype
) -> int:
    """Copies the created tower's weights (and dtypes) into `encoder` and checks it computes the same features: a
    `create_model` keyword that changes the architecture in a way our config does not record fails here, at build
    time, instead of after a save and load. Returns the width of the features."""
    parameter = next(visual.parameters())
    encoder.to(device=parameter.device)
    try:
        encoder.visual.load_state_dict(visual.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"The open_clip tower could not be rebuilt from its config {config}: {error}. A keyword passed to "
            "`from_open_clip` changes the architecture in a way this component does not record."
        ) from error
    # Low precisions keep some tensors (layer norms) in float32: copy each tensor's dtype, not one dtype.
    theirs = dict(visual.named_parameters()) | dict(visual.named_buffers())
    for name, tensor in list(encoder.visual.named_parameters()) + list(encoder.visual.named_buffers()):
        if tensor.dtype != theirs[name].dtype:
            tensor.data = tensor.data.to(theirs[name].dtype)
    encoder.eval()
    height, width = encoder.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, height, width, generator=generator).to(parameter.device, input_dtype)
    with torch.no_grad():
        expected = visual(pixels)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = encoder(pixels).pooler_output
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"The open_clip tower could not be rebuilt from its config {config}: its features differ (largest "
            "difference "
            f"{(got - expected).abs().max().item() if got.shape == expected.shape else 'in shape'}). A keyword "
            "passed to `from_open_clip` changes the architecture in a way this component does not record."
        )
    return int(got.shape[-1])
