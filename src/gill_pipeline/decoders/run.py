"""Running a family's STOCK diffusers pipeline from precomputed conditioning, with no text encoder.

The denoising loop, schedulers, guidance and VAE decoding stay diffusers' own; this file only builds the stock
pipeline over the decoder's modules with its text side set to None, and works around the traps of feeding it
precomputed tensors (see `docs/decoders.md`).
"""

import inspect
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline

from .conditioning import NEGATIVE_PREFIX
from .families import DecoderFamily, family_by_name, family_for_components, family_for_pipeline
from .layout import GUIDANCE_CFG, ConditioningLayout


def _resolve_family(decoder, family, layout) -> DecoderFamily:
    if family is None and layout is not None:
        family = layout.pipeline_class
    if isinstance(family, DecoderFamily):
        return family
    if isinstance(family, str):
        return family_by_name(family)
    if isinstance(decoder, DiffusionPipeline):
        return family_for_pipeline(decoder)
    return family_for_components(decoder)


def build_decoder_pipeline(decoder, *, family: str | DecoderFamily | None = None, layout=None) -> DiffusionPipeline:
    """The family's stock pipeline over `decoder`'s modules, text encoders and tokenizers set to None.

    Args:
        decoder: A stock pipeline, or a dict of its components (at least the denoiser, `vae` and `scheduler`).
        family (`str`, *optional*): The family name or pipeline class name; read from `layout` or from the
            decoder when not given.
        layout ([`ConditioningLayout`], *optional*): Names the family when `family` is not given.
    """
    family = _resolve_family(decoder, family, layout)
    source = decoder if isinstance(decoder, DiffusionPipeline) else None
    components = dict(decoder.components if source is not None else decoder)
    for name in family.text_components:
        components[name] = None
    kwargs = {}
    for name, param in inspect.signature(family.pipeline_class.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in components:
            kwargs[name] = components[name]
        elif param.default is inspect.Parameter.empty:
            kwargs[name] = None  # required modules GILL does not use (e.g. SD's safety checker)
    kwargs.update(family.init_kwargs(source))
    missing = [name for name in (family.denoiser, "vae", "scheduler") if kwargs.get(name) is None]
    if missing:
        raise ValueError(f"`decoder` must provide {missing} to run a {family.pipeline_class.__name__}.")
    pipe = family.pipeline_class(**kwargs)
    if source is not None:
        pipe.set_progress_bar_config(**getattr(source, "_progress_bar_config", {}))
    return pipe


def _batch(value: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if value.shape[0] == size:
        return value
    if value.shape[0] == 1:
        return value.expand(size, *value.shape[1:])
    raise ValueError(f"`{name}` has batch size {value.shape[0]}; expected 1 or {size} (the number of prompts).")


def _check_conditioning(family: DecoderFamily, conditioning: dict, layout: ConditioningLayout | None):
    expected = [n for n in family.encode_outputs if n is not None and not n.startswith(NEGATIVE_PREFIX)]
    if layout is not None:
        expected = layout.names
    if sorted(conditioning) != sorted(expected):
        raise ValueError(
            f"`conditioning` must hold exactly {expected} for {family.pipeline_class.__name__}, got "
            f"{sorted(conditioning)}."
        )
    if layout is not None:
        for tensor in layout.tensors:
            got = list(conditioning[tensor.name].shape[1:])
            if got != tensor.shape:
                raise ValueError(
                    f"`conditioning['{tensor.name}']` has per-prompt shape {got}; the layout expects {tensor.shape}."
                )


@torch.no_grad()
def run_decoder(
    decoder,
    conditioning: dict[str, torch.Tensor],
    negative_conditioning: dict[str, torch.Tensor] | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    callback_on_step_end: Callable | None = None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    layout: ConditioningLayout | None = None,
    family: str | None = None,
    progress_bar_config: dict | None = None,
    return_pipeline: bool = False,
    **decoder_kwargs: Any,
):
    r"""
    Images from precomputed conditioning, denoised by the family's stock diffusers pipeline.

    Args:
        decoder: A stock pipeline of a supported family (its text encoders may be absent), or a dict of its
            components.
        conditioning (`dict[str, torch.Tensor]`): `{__call__ argument: (N, ...)}`, as [`encode_conditioning`]
            returns it or a GILL mapper produces it.
        negative_conditioning (`dict[str, torch.Tensor]`, *optional*): The negatives under the same (positive) keys,
            batch 1 or N, as [`default_negative_conditioning`] returns them. Required for classifier-free guidance
            (`guidance_scale > 1` in the CFG families); ignored by Flux unless `true_cfg_scale > 1` is passed.
        height, width (`int`, *optional*): Image size; the stock default when None (Sana: the transformer's own
            sample size instead of its fixed 1024).
        num_inference_steps (`int`, *optional*): Denoising steps; the stock default when None.
        guidance_scale (`float`, *optional*): CFG scale, or Flux-dev's guidance embedding; the stock default when None.
        generator, latents, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs: As in the stock
            pipeline. `latents` holds one entry per image (`N * num_images_per_prompt`).
        num_images_per_prompt (`int`, *optional*, defaults to 1): Images per prompt. The conditioning is repeated
            here (c0, c0, c1, c1, ...) and the stock pipeline is called with 1: SD3 and Flux do not repeat
            precomputed embeddings, and Sana pairs them with the wrong masks.
        layout ([`ConditioningLayout`], *optional*): When given, names the family and the shapes are checked.
        family (`str`, *optional*): Family or pipeline class name, when `decoder` is a dict of components.
        progress_bar_config (`dict`, *optional*): For the stock pipeline's progress bar (e.g. `{"disable": True}`);
            by default a pipeline `decoder`'s own.
        return_pipeline (`bool`, *optional*, defaults to `False`): Also return the stock pipeline that ran (its
            `num_timesteps` and other call state).
        decoder_kwargs: Any other stock `__call__` argument (e.g. `true_cfg_scale`, `use_resolution_binning`).

    Returns:
        The stock output's `images` (a tensor for `output_type="pt"` or `"latent"`, PIL images for `"pil"`); with
        `return_pipeline`, `(images, pipeline)`.
    """
    family = _resolve_family(decoder, family, layout)
    # A bare stock pipeline of the family (text side None, e.g. the one `GILLPipeline.__call__` builds once per call)
    # runs as it is; anything else is rebuilt over its modules.
    bare = type(decoder) is family.pipeline_class and all(
        getattr(decoder, name, None) is None for name in family.text_components
    )
    pipe = decoder if bare else build_decoder_pipeline(decoder, family=family)
    if progress_bar_config is not None:
        pipe.set_progress_bar_config(**progress_bar_config)
    call_params = inspect.signature(type(pipe).__call__).parameters
    _check_conditioning(family, conditioning, layout)
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")

    num_prompts = next(iter(conditioning.values())).shape[0]
    guidance_kind = family.guidance(pipe.components)
    if guidance_scale is None:
        guidance_scale = call_params["guidance_scale"].default
    if guidance_kind == GUIDANCE_CFG and guidance_scale > 1 and not negative_conditioning:
        raise ValueError(
            f"{family.pipeline_class.__name__} guides with classifier-free guidance at `guidance_scale`="
            f"{guidance_scale}: pass `negative_conditioning` (the stored empty-prompt conditioning), or a "
            f"`guidance_scale` of 1 or less."
        )

    device = pipe._execution_device
    dtype = getattr(pipe, family.denoiser).dtype

    def prepare(name, value):
        value = _batch(value, num_prompts, name).repeat_interleave(num_images_per_prompt, dim=0)
        kind_is_mask = name.endswith("attention_mask")
        return value.to(device=device) if kind_is_mask else value.to(device=device, dtype=dtype)

    kwargs = {name: prepare(name, value) for name, value in conditioning.items()}
    if negative_conditioning:
        # A partial set would let the stock pipeline fill the rest its own way (e.g. SDXL's zero pooled negative).
        expected = sorted(name for name in conditioning if NEGATIVE_PREFIX + name in call_params)
        if sorted(negative_conditioning) != expected:
            raise ValueError(
                f"`negative_conditioning` must hold {expected} for {family.pipeline_class.__name__}, got "
                f"{sorted(negative_conditioning)}."
            )
        for name, value in negative_conditioning.items():
            kwargs[NEGATIVE_PREFIX + name] = prepare(NEGATIVE_PREFIX + name, value)

    size = family.default_size(pipe)
    kwargs.update(
        height=height if height is not None else size,
        width=width if width is not None else size,
        guidance_scale=guidance_scale,
        generator=generator,
        latents=latents,
        num_images_per_prompt=1,
        output_type=output_type,
        return_dict=True,
    )
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if callback_on_step_end is not None:
        if "callback_on_step_end" not in call_params:
            raise ValueError(
                f"{family.pipeline_class.__name__}.__call__ takes no `callback_on_step_end`; run without it."
            )
        kwargs["callback_on_step_end"] = callback_on_step_end
        if callback_on_step_end_tensor_inputs is not None:
            kwargs["callback_on_step_end_tensor_inputs"] = callback_on_step_end_tensor_inputs
    kwargs.update(family.call_overrides)
    kwargs.update(decoder_kwargs)
    unknown = sorted(set(kwargs) - set(call_params))
    if unknown:
        raise ValueError(f"{family.pipeline_class.__name__}.__call__ takes no {unknown}.")
    images = pipe(**kwargs).images
    return (images, pipe) if return_pipeline else images

