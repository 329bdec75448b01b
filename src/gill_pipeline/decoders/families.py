"""One small adapter per stock diffusers text-to-image pipeline class: only what cannot be read from the decoder.

What an adapter says: how to call the family's `encode_prompt` (the names of the values it returns), which
components are its text side, which denoiser config entry each conditioning width must equal, how it guides, and
the fixed `__call__` settings that let the stock pipeline run from precomputed conditioning (the traps in
`docs/decoders.md`). Every size is read from the loaded models by `read_conditioning_layout`.
"""

import inspect
from typing import Any

from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging

from .layout import GUIDANCE_CFG, GUIDANCE_EMBEDDING, GUIDANCE_NONE
from .schedulers import is_flow_matching_scheduler

logger = logging.get_logger(__name__)

# What SDXL's and SD3's `encode_prompt` return, and PixArt's and Sana's.
_EMBEDS_AND_POOLED = (
    "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"
)
_EMBEDS_AND_MASKS = (
    "prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"
)


class DecoderFamily:
    """Base adapter. Subclasses set the class attributes; override a method only where a family differs."""

    name: str
    pipeline_class: type
    denoiser: str = "transformer"  # the component holding the denoising network
    denoiser_class: type
    text_components: tuple[str, ...] = ("text_encoder", "tokenizer")
    # Names of the values `encode_prompt` returns, in order; None for values `__call__` does not take.
    encode_outputs: tuple[str | None, ...]
    # Conditioning tensor -> the denoiser config entry its width must equal (catches mismatched text encoders).
    width_checks: dict[str, str] = {}
    # Fixed `__call__` settings for running from precomputed conditioning.
    call_overrides: dict[str, Any] = {}
    # What the stock `__call__` does that no config says (read by `decoders/fit.py`):
    # - `latent_packing`: side of the latent patches packed into one token before the denoiser (Flux packs 2x2);
    # - `size_multiple`: the multiple of 8 or 32 the stock `check_inputs` asks of height and width, whatever the VAE;
    # - `vae_shift_factor`: whether decoding adds the VAE's `shift_factor` (SD3 and Flux latents are shifted);
    # - `scheduler_mu`: when `set_timesteps` is given `mu`: "always" (Flux), "dynamic" (SD3: when the scheduler's
    #   config has `use_dynamic_shifting`) or "never";
    # - `scheduler_sigmas`: whether `set_timesteps` is always given `sigmas` (Flux, unless `use_flow_sigmas`).
    latent_packing: int = 1
    size_multiple: int = 8
    vae_shift_factor: bool = False
    scheduler_mu: str = "never"
    scheduler_sigmas: bool = False
    # Whether the denoiser is a flow-matching model; None: read from the scheduler type the stock pipeline's
    # `__init__` annotates (`flow_matching`). Sana annotates `DPMSolverMultistepScheduler`, configured for flow.
    _flow_matching: bool | None = None

    def matches(self, components: dict[str, Any]) -> bool:
        """Whether a set of pipeline components (text encoders may be absent) is this family's."""
        return isinstance(components.get(self.denoiser), self.denoiser_class)

    def guidance(self, components: dict[str, Any]) -> str:
        return GUIDANCE_CFG

    def init_kwargs(self, source_pipe) -> dict[str, Any]:
        """Non-module `__init__` settings of the stock pipeline built over a source pipeline's (or None's) modules."""
        return {}

    def check_text_side(self, pipe):
        """Warn about text-side settings the stock pipeline accepts silently but that lose information."""

    def default_size(self, pipe) -> int | None:
        """Default height and width when the caller gives none; None keeps the stock default."""
        return None

    @property
    def flow_matching(self) -> bool:
        """Whether the family's denoiser is a flow-matching model (it needs a flow-matching scheduler)."""
        if self._flow_matching is not None:
            return self._flow_matching
        return is_flow_matching_scheduler(self.init_annotation("scheduler"))

    def init_annotation(self, name: str):
        """The type the stock pipeline's `__init__` annotates for component `name` (a class, or an enum of
        scheduler names such as `KarrasDiffusionSchedulers`)."""
        return inspect.signature(self.pipeline_class.__init__).parameters[name].annotation

    def __repr__(self):
        return f"{type(self).__name__}({self.pipeline_class.__name__})"


class StableDiffusionFamily(DecoderFamily):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    denoiser = "unet"
    denoiser_class = UNet2DConditionModel
    encode_outputs = ("prompt_embeds", "negative_prompt_embeds")
    width_checks = {"prompt_embeds": "cross_attention_dim"}

    def matches(self, components):
        unet = components.get("unet")
        return isinstance(unet, UNet2DConditionModel) and unet.config.get("addition_embed_type") != "text_time"

    def init_kwargs(self, source_pipe):
        # The stock pipeline is built without SD's safety checker (it would never see GILL's images, which are
        # post-processed by GILLPipeline); GILLPipeline warns that none runs and takes its own optional check
        # (`set_safety_checker`, see docs/security.md) on generated and retrieved images.
        return {"requires_safety_checker": False}


class StableDiffusionXLFamily(DecoderFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    denoiser = "unet"
    denoiser_class = UNet2DConditionModel
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    encode_outputs = _EMBEDS_AND_POOLED
    width_checks = {"prompt_embeds": "cross_attention_dim"}

    def matches(self, components):
        unet = components.get("unet")
        return isinstance(unet, UNet2DConditionModel) and unet.config.get("addition_embed_type") == "text_time"

    def init_kwargs(self, source_pipe):
        # `force_zeros_for_empty_prompt` decides the stock default negatives: keep the source's choice. The
        # watermarker changes pixels: keep it only when the source pipeline has one.
        if source_pipe is None:
            return {"add_watermarker": False}
        return {
            "add_watermarker": getattr(source_pipe, "watermark", None) is not None,
            "force_zeros_for_empty_prompt": source_pipe.config.force_zeros_for_empty_prompt,
        }


class StableDiffusion3Family(DecoderFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_class = SD3Transformer2DModel
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    encode_outputs = _EMBEDS_AND_POOLED
    width_checks = {"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"}
    vae_shift_factor = True
    scheduler_mu = "dynamic"

    def check_text_side(self, pipe):
        # SD3 zero-pads the two CLIP sequences (concatenated along the width) up to the T5 width; a T5 narrower
        # than both CLIP widths together silently cuts CLIP features off.
        clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        t5_width = pipe.text_encoder_3.config.d_model
        if clip_width > t5_width:
            logger.warning(
                f"StableDiffusion3Pipeline: the CLIP widths together ({clip_width}) exceed the T5 width ({t5_width}); "
                f"the stock pipeline truncates the CLIP features, and so do the targets."
            )


class FluxFamily(DecoderFamily):
    name = "flux"
    pipeline_class = FluxPipeline
    denoiser_class = FluxTransformer2DModel
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    encode_outputs = ("prompt_embeds", "pooled_prompt_embeds", None)  # the third value is `text_ids`
    width_checks = {"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"}
    latent_packing = 2
    vae_shift_factor = True
    scheduler_mu = "always"
    scheduler_sigmas = True

    def guidance(self, components):
        # Flux-dev is guidance-distilled (the scale is an input of the transformer); Flux-schnell takes no guidance.
        return GUIDANCE_EMBEDDING if components["transformer"].config.get("guidance_embeds") else GUIDANCE_NONE


class _CaptionMaskFamily(DecoderFamily):
    """PixArt-Sigma and Sana: one text encoder, its sequence with an attention mask, its width `caption_channels`."""

    encode_outputs = _EMBEDS_AND_MASKS
    width_checks = {"prompt_embeds": "caption_channels"}
    # `negative_prompt` defaults to "" and is refused together with `negative_prompt_embeds`; resolution binning
    # maps the requested size to the model's trained bins and rejects small models: GILL denoises the size asked.
    call_overrides = {"negative_prompt": None, "use_resolution_binning": False}


class PixArtSigmaFamily(_CaptionMaskFamily):
    name = "pixart-sigma"
    pipeline_class = PixArtSigmaPipeline
    denoiser_class = PixArtTransformer2DModel


class SanaFamily(_CaptionMaskFamily):
    name = "sana"
    pipeline_class = SanaPipeline
    denoiser_class = SanaTransformer2DModel
    size_multiple = 32
    _flow_matching = True

    def default_size(self, pipe):
        # SanaPipeline defaults to 1024 x 1024 whatever the model; use the transformer's own sample size.
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor


DECODER_FAMILIES: tuple[DecoderFamily, ...] = (
    StableDiffusionFamily(),
    StableDiffusionXLFamily(),
    StableDiffusion3Family(),
    FluxFamily(),
    PixArtSigmaFamily(),
    SanaFamily(),
)
SUPPORTED_PIPELINE_CLASSES = tuple(family.pipeline_class.__name__ for family in DECODER_FAMILIES)


def family_for_pipeline(pipe_or_class) -> DecoderFamily:
    """The adapter of a stock pipeline (instance or class, or its class name); refuses any other class clearly."""
    if isinstance(pipe_or_class, str):
        name = pipe_or_class
    else:
        name = (pipe_or_class if isinstance(pipe_or_class, type) else type(pipe_or_class)).__name__
    for family in DECODER_FAMILIES:
        if family.pipeline_class.__name__ == name:
            return family
    raise ValueError(
        f"`{name}` cannot serve as a GILL decoder: GILL feeds a decoder precomputed text conditioning through its "
        f"`encode_prompt` outputs and `__call__(prompt_embeds=...)`, and no adapter describes those for `{name}`. "
        f"Supported pipeline classes: {', '.join(SUPPORTED_PIPELINE_CLASSES)}."
    )


def family_for_components(components: dict[str, Any]) -> DecoderFamily:
    """The adapter whose denoiser matches `components` (used when only vae/denoiser/scheduler are at hand)."""
    for family in DECODER_FAMILIES:
        if family.matches(components):
            return family
    denoisers = {key: type(value).__name__ for key, value in components.items() if key in ("unet", "transformer")}
    raise ValueError(
        f"No supported decoder family has the denoiser {denoisers or 'of these components'} (components: "
        f"{sorted(components)}). Supported pipeline classes: {', '.join(SUPPORTED_PIPELINE_CLASSES)}."
    )


def family_by_name(name: str) -> DecoderFamily:
    for family in DECODER_FAMILIES:
        if name in (family.name, family.pipeline_class.__name__):
            return family
    raise ValueError(
        f"`family` must be one of {[f.name for f in DECODER_FAMILIES]} or a pipeline class among "
        f"{SUPPORTED_PIPELINE_CLASSES}, got {name!r}."
    )
