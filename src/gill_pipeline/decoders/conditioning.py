"""Conditioning read from the decoder itself: its layout, the targets for captions, and its default negatives.

Everything here goes through the family's own `encode_prompt`, called with the settings its stock `__call__` uses
by default (read from the `__call__` signature), so the tensors are the ones the stock pipeline would make from
`prompt=`. Needs the decoder's text encoders; inference afterwards does not.
"""

import inspect
import json
import re
from typing import Any

import torch
from diffusers.utils import logging

from .families import DecoderFamily, family_for_pipeline
from .layout import MASK, PADDING_ATTENDED, PADDING_MASKED, POOLED, SEQUENCE, ConditioningLayout, ConditioningTensor

logger = logging.get_logger(__name__)

NEGATIVE_PREFIX = "negative_"
# `encode_prompt` arguments that GILL sets itself rather than taking from the `__call__` defaults.
_SET_BY_CALLER = {"prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance", "lora_scale"}


def _call_defaults(pipe) -> dict[str, Any]:
    return {
        name: param.default
        for name, param in inspect.signature(type(pipe).__call__).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


def encode_settings(pipe, **overrides) -> dict[str, Any]:
    """The `encode_prompt` settings the stock `__call__` uses by default (e.g. `max_sequence_length`), plus overrides.

    Read from the two signatures: every `encode_prompt` argument that `__call__` also takes with a default, except
    the prompt itself, precomputed tensors and what GILL sets per call.
    """
    call_defaults = _call_defaults(pipe)
    settings = {}
    for name in inspect.signature(pipe.encode_prompt).parameters:
        if name in _SET_BY_CALLER or re.fullmatch(r"prompt_\d", name) or name.endswith(("_embeds", "_mask")):
            continue
        if name in call_defaults:
            settings[name] = call_defaults[name]
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(
            f"{type(pipe).__name__}.encode_prompt takes no setting {unknown} through GILL; it takes {sorted(settings)}."
        )
    settings.update(overrides)
    return settings


def _check_text_side(pipe, family: DecoderFamily):
    missing = [name for name in family.text_components if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(
            f"{type(pipe).__name__} was loaded without {missing}: conditioning targets, default negatives and the "
            f"layout are read from the decoder's own text encoders. Load them once (e.g. at assembly or to precompute "
            f"training targets); inference runs from the stored layout and negatives without them."
        )


@torch.no_grad()  # a T5 forward with autograd on differs from one under no_grad by ~1e-5: targets use no_grad
def _encode(pipe, captions: list[str], device, do_classifier_free_guidance: bool, overrides) -> dict[str, torch.Tensor]:
    family = family_for_pipeline(pipe)
    _check_text_side(pipe, family)
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions) or len(captions) == 0:
        raise ValueError(f"`captions` must be a non-empty list of strings, got {captions!r}.")
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs = encode_settings(pipe, **overrides)
    kwargs["prompt"] = list(captions)
    for name in params:
        if re.fullmatch(r"prompt_\d", name):
            kwargs[name] = None  # the secondary prompts default to the main one, as in the stock `__call__`
    kwargs["device"] = device if device is not None else pipe._execution_device
    if "num_images_per_prompt" in params:
        kwargs["num_images_per_prompt"] = 1
    if "do_classifier_free_guidance" in params:
        kwargs["do_classifier_free_guidance"] = do_classifier_free_guidance
    # SanaPipeline sets `tokenizer.padding_side = "right"` on every call: put shared tokenizers back as they were.
    tokenizers = [getattr(pipe, name) for name in family.text_components if name.startswith("tokenizer")]
    sides = [tokenizer.padding_side for tokenizer in tokenizers]
    try:
        outputs = pipe.encode_prompt(**kwargs)
    finally:
        for tokenizer, side in zip(tokenizers, sides):
            tokenizer.padding_side = side
    if len(outputs) != len(family.encode_outputs):
        raise RuntimeError(
            f"{type(pipe).__name__}.encode_prompt returned {len(outputs)} values; {family!r} expects "
            f"{family.encode_outputs}. The diffusers version may have changed this pipeline."
        )
    named = zip(family.encode_outputs, outputs)
    return {name: value for name, value in named if name is not None and value is not None}


def encode_conditioning(pipe, captions: list[str], *, device=None, **encode_overrides) -> dict[str, torch.Tensor]:
    """The conditioning the stock pipeline makes from `prompt=captions`: `{__call__ argument: (N, ...) tensor}`.

    These are GILL's generation targets (sequence embeddings, pooled embeddings, attention masks), computed under
    `no_grad` by the family's own `encode_prompt` with its stock `__call__` defaults.

    Args:
        pipe: A loaded stock pipeline of a supported family, with its text encoders.
        captions (`list[str]`): The captions.
        device (`torch.device`, *optional*): Where to run the text encoders; defaults to the pipeline's device.
        encode_overrides: Settings that differ from the stock defaults, e.g. `max_sequence_length=128` for Flux.
    """
    outputs = _encode(pipe, captions, device, False, encode_overrides)
    return {name: value for name, value in outputs.items() if not name.startswith(NEGATIVE_PREFIX)}


def default_negative_conditioning(pipe, *, device=None, **encode_overrides) -> dict[str, torch.Tensor]:
    """What the stock pipeline uses as negatives when given none, keyed by the POSITIVE names, batch 1.

    This is the family's own `encode_prompt` with guidance on and the stock default `negative_prompt`: the empty
    prompt for most families, zeros for SDXL with `force_zeros_for_empty_prompt`, the empty prompt WITHOUT Sana's
    complex human instruction. `{}` for families without negatives (Flux).
    """
    outputs = _encode(pipe, [""], device, True, encode_overrides)
    return {
        name[len(NEGATIVE_PREFIX):]: value for name, value in outputs.items() if name.startswith(NEGATIVE_PREFIX)
    }


def _kind(name: str, value: torch.Tensor) -> str:
    if name.endswith("attention_mask"):
        return MASK
    return POOLED if value.ndim == 2 else SEQUENCE


def latent_space(vae) -> dict:
    """What defines the latent space a denoiser was trained in, from its VAE's config (recorded in the layout)."""
    return {
        "vae_class": type(vae).__name__,
        "latent_channels": vae.config.get("latent_channels"),
        "scaling_factor": vae.config.get("scaling_factor"),
        "shift_factor": vae.config.get("shift_factor"),
    }


def read_conditioning_layout(pipe, **encode_overrides) -> ConditioningLayout:
    """The [`ConditioningLayout`] of a loaded decoder, read from its `encode_prompt` outputs on the empty prompt.

    Sizes come from the loaded text encoders and tokenizers (through their outputs), and are checked against the
    denoiser's config (e.g. the UNet's `cross_attention_dim`, the transformer's `joint_attention_dim`). A pipeline
    class with no adapter is refused with an error naming it.
    """
    family = family_for_pipeline(pipe)
    positives = encode_conditioning(pipe, [""], **encode_overrides)
    negatives = default_negative_conditioning(pipe, **encode_overrides)
    call_params = inspect.signature(type(pipe).__call__).parameters
    tensors = []
    for name, value in positives.items():
        if name not in call_params:
            raise ValueError(f"{type(pipe).__name__}.__call__ takes no `{name}`, which its `encode_prompt` returns.")
        kind = _kind(name, value)
        negative_name = NEGATIVE_PREFIX + name if name in negatives else None
        if negative_name is not None and negative_name not in call_params:
            raise ValueError(f"{type(pipe).__name__}.__call__ takes no `{negative_name}`.")
        tensors.append(
            ConditioningTensor(
                name=name,
                kind=kind,
                shape=list(value.shape[1:]),
                dtype=str(value.dtype).removeprefix("torch."),
                negative_name=negative_name,
                masks=name.replace("attention_mask", "embeds") if kind == MASK else None,
            )
        )
    layout = ConditioningLayout(
        family=family.name,
        pipeline_class=type(pipe).__name__,
        tensors=tensors,
        guidance=family.guidance(pipe.components),
        padding=PADDING_MASKED if any(t.kind == MASK for t in tensors) else PADDING_ATTENDED,
        encode_kwargs=_jsonable(encode_settings(pipe, **encode_overrides)),
        latent_space=latent_space(pipe.vae) if getattr(pipe, "vae", None) is not None else None,
    )
    denoiser = getattr(pipe, family.denoiser)
    for name, config_key in family.width_checks.items():
        expected = denoiser.config[config_key]
        if layout.tensor(name).width != expected:
            raise ValueError(
                f"{type(pipe).__name__}'s text side gives `{name}` of width {layout.tensor(name).width}, but its "
                f"{family.denoiser} expects `{config_key}`={expected}: the text encoders do not belong to this "
                f"{family.denoiser}."
            )
    family.check_text_side(pipe)
    return layout


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for name, value in settings.items():
        try:
            json.dumps(value)
        except TypeError:
            kind = type(value).__name__
            logger.warning(f"The `encode_prompt` setting `{name}` ({kind}) is not recorded in the layout.")
            continue
        kept[name] = value
    return kept
