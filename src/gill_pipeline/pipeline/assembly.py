"""Assembling a new, untrained GILL pipeline from any causal LM, image decoder (a stock diffusers text-to-image
pipeline of a supported family) and CLIP vision encoder."""

import copy
import os
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

from ..constants import (
    DEFAULT_MAPPER_DECODER_LAYERS,
    DEFAULT_MAPPER_ENCODER_LAYERS,
    DEFAULT_MAPPER_HEADS,
    DEFAULT_MAPPER_WIDTH,
    DEFAULT_NUM_IMG_TOKENS,
    DEFAULT_NUM_VISUAL_TOKENS,
    DEFAULT_RETRIEVAL_DIM,
    IMG_TOKEN_TEMPLATE,
)
from ..decoders import (
    ConditioningLayout,
    default_negative_conditioning,
    family_for_pipeline,
    load_decoder,
    read_conditioning_layout,
)
from ..decoders.families import StableDiffusionFamily
from ..decoders.layout import SEQUENCE
from ..models.dims import lm_dims, vision_feature_dim
from ..models.gill_model import GILLModel
from ..models.placement import stored_weight
from ..serialization.base_models import record_base_models
from ..serialization.components import default_image_processor, pipeline_from_parts
from ..serialization.folder import PipelineFolderError, pop_dtype, refuse_remote_code
from ..serialization.paths import looks_like_local_path
from ..serialization.quantization import (
    component_quantization,
    decoder_quantization,
    refuse_quantizing_passed,
    release_freed_memory,
    resolve_quantization_config,
)


logger = logging.get_logger(__name__)


@torch.no_grad()
def encode_empty_prompt(text_encoder, tokenizer, length: int) -> torch.Tensor:
    """The SD text encoder's embedding of the empty prompt, as diffusers' SD pipeline computes it for guidance."""
    ids = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0].float().cpu()


def add_img_tokens(tokenizer, num_img_tokens: int) -> tuple[Any, list[int]]:
    """Returns a COPY of `tokenizer` with `[IMG0]`..`[IMG{r-1}]` added, and their ids."""
    tokenizer = copy.deepcopy(tokenizer)
    tokens = [IMG_TOKEN_TEMPLATE.format(i=i) for i in range(num_img_tokens)]
    tokenizer.add_tokens(tokens, special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids(tokens)


def _check_local_source(value, argument: str) -> None:
    """A name that can only be a local path must be an existing folder (else transformers would call it a bad
    repo id)."""
    if isinstance(value, str) and looks_like_local_path(value) and not os.path.isdir(value):
        raise PipelineFolderError(f"`{argument}`: no such folder {value!r}.")


def _load_lm(language_model, tokenizer, load_kwargs):
    if isinstance(language_model, str):
        llm = AutoModelForCausalLM.from_pretrained(language_model, **load_kwargs)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(language_model)
        return llm, tokenizer
    if tokenizer is None:
        raise ValueError("`tokenizer` is required when `language_model` is a model object rather than a name/path.")
    return language_model, tokenizer


def _load_sd(stable_diffusion, load_kwargs, text_encoders: bool = True):
    """A decoder checkpoint of any supported family WITH its text encoders (needed once, to read the layout and
    store the negatives); the family is read from its `model_index.json`, an unsupported class is refused.
    `text_encoders=False` (the layout and negatives given) skips them for families other than SD 1.x/2.x: Flux's T5
    is 9.5 GB in bf16, never needed in memory together with the denoiser."""
    if not isinstance(stable_diffusion, str):
        return stable_diffusion
    config = StableDiffusionPipeline.load_config(
        stable_diffusion,
        **{k: load_kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision") if k in load_kwargs},
    )
    family = family_for_pipeline(config["_class_name"])
    if isinstance(family, StableDiffusionFamily):
        return StableDiffusionPipeline.from_pretrained(
            # GILL never runs the checkpoint's own checker (its images do not pass through the stock pipeline's
            # post-processing); the pipeline's optional check is `GILLPipeline.set_safety_checker`.
            stable_diffusion, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **load_kwargs
        )
    return load_decoder(stable_diffusion, family=family, text_encoders=text_encoders, **load_kwargs)


def _needs_text_encoders(conditioning_layout, negative_conditioning) -> bool:
    """Whether a decoder given by name must be loaded with its text encoders: only to read what was not given."""
    if conditioning_layout is None:
        return True
    if isinstance(conditioning_layout, dict):
        conditioning_layout = ConditioningLayout.from_dict(conditioning_layout)
    return negative_conditioning is None and conditioning_layout.has_negatives


def _decoder_conditioning(sd, family, conditioning_layout, negative_conditioning):
    """The decoder's layout and default negatives: given, or read once from its text encoders."""
    missing_text = [name for name in family.text_components if getattr(sd, name, None) is None]
    if conditioning_layout is None:
        if missing_text:
            raise ValueError(
                f"`decoder` ({type(sd).__name__}) has no {missing_text}: GILL needs the decoder's text "
                f"encoders once at assembly, to read the conditioning layout and store the empty-prompt negatives. "
                f"Pass the pipeline with its text encoders, or `conditioning_layout` and `negative_conditioning` "
                f"(from `read_conditioning_layout` and `default_negative_conditioning` on the full pipeline)."
            )
        conditioning_layout = read_conditioning_layout(sd)
    elif isinstance(conditioning_layout, dict):
        conditioning_layout = ConditioningLayout.from_dict(conditioning_layout)
    if conditioning_layout.pipeline_class != type(sd).__name__:
        raise ValueError(
            f"`conditioning_layout` is for {conditioning_layout.pipeline_class}, but `decoder` is a "
            f"{type(sd).__name__}."
        )
    if negative_conditioning is None:
        if conditioning_layout.has_negatives and missing_text:
            raise ValueError(
                f"`negative_conditioning` is required when `decoder` ({type(sd).__name__}) has no "
                f"{missing_text}: pass `default_negative_conditioning(full_pipeline)`."
            )
        negative_conditioning = default_negative_conditioning(sd) if conditioning_layout.has_negatives else {}
    return conditioning_layout, {name: value.float().cpu() for name, value in negative_conditioning.items()}


def _load_vision(image_encoder, feature_extractor, load_kwargs):
    if isinstance(image_encoder, str):
        encoder = CLIPVisionModel.from_pretrained(image_encoder, **load_kwargs)
        return encoder, feature_extractor or CLIPImageProcessor.from_pretrained(image_encoder)
    if image_encoder is not None and feature_extractor is None:
        feature_extractor = default_image_processor(image_encoder)
    return image_encoder, feature_extractor


# Marks an argument not given (None is a value some callers pass on purpose).
_NOT_GIVEN = object()


def _decoder_argument(decoder, stable_diffusion):
    """`decoder`, or its old name `stable_diffusion` (from the SD-only era; kept as an alias)."""
    if decoder is not _NOT_GIVEN and stable_diffusion is not _NOT_GIVEN:
        raise ValueError(
            "Pass the image decoder once: as `decoder` (or its old name `stable_diffusion`), not both; got "
            f"`decoder`={type(decoder).__name__} and `stable_diffusion`={type(stable_diffusion).__name__}."
        )
    if decoder is _NOT_GIVEN:
        decoder = stable_diffusion
    if decoder is _NOT_GIVEN:
        raise TypeError("`from_base_models` needs the image decoder: pass `decoder=` (a checkpoint id, path or pipeline).")
    return decoder


def assemble_gill_pipeline(
    pipeline_class,
    language_model,
    decoder=_NOT_GIVEN,
    image_encoder=_NOT_GIVEN,
    tokenizer=None,
    feature_extractor=None,
    num_img_tokens: int = DEFAULT_NUM_IMG_TOKENS,
    num_visual_tokens: int = DEFAULT_NUM_VISUAL_TOKENS,
    retrieval_dim: int = DEFAULT_RETRIEVAL_DIM,
    mapper_hidden_dim: int = DEFAULT_MAPPER_WIDTH,
    mapper_encoder_layers: int = DEFAULT_MAPPER_ENCODER_LAYERS,
    mapper_decoder_layers: int = DEFAULT_MAPPER_DECODER_LAYERS,
    mapper_heads: int = DEFAULT_MAPPER_HEADS,
    cond_length: int | None = None,
    mapper_num_queries: int | None = None,
    conditioning_layout: ConditioningLayout | dict | None = None,
    negative_conditioning: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    base_models: dict | None = None,
    allow_pickle: bool = False,
    stable_diffusion=_NOT_GIVEN,
    **load_kwargs,
):
    r"""
    Assembles a NEW, untrained GILL pipeline: the starting point of training.

    Every size of the learned parts comes from the given models: the LM's embedding and hidden widths, the vision
    encoder's pooled width, and the decoder's conditioning layout (read from its own `encode_prompt`: the sequence
    length and width, the pooled width, masks), for any supported decoder family (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline`, `PixArtSigmaPipeline`,
    `SanaPipeline`). The `[IMG]` tokens are
    added to a copy of the tokenizer; the LM itself is not changed (no resized embedding matrix).

    Args:
        language_model (`str` or [`~transformers.PreTrainedModel`]):
            Any causal LM: a Hub id or path (loaded with `AutoModelForCausalLM`), or a loaded model.
        decoder (`str` or [`~diffusers.DiffusionPipeline`]):
            The image decoder (`stable_diffusion=` is its old name, still accepted): a decoder checkpoint (id or path) of a supported family, or a loaded pipeline; its text encoders are used
            once, to read the conditioning layout and store the empty-prompt negatives, and are not part of the GILL
            pipeline. Another pipeline class is refused, naming it.
        image_encoder (`str` or [`~transformers.CLIPVisionModel`]):
            A CLIP vision encoder (id or path) or a loaded one.
        tokenizer, feature_extractor (*optional*):
            Needed when the LM / vision encoder are passed as objects (a default CLIP image processor of the
            encoder's image size is made otherwise).
        num_img_tokens, num_visual_tokens, retrieval_dim, mapper_*:
            GILL's sizes (reference values by default).
        cond_length (`int`, *optional*):
            Stable Diffusion 1.x/2.x only: length of the mapper's output; defaults to the SD tokenizer's
            `model_max_length` (77). Other families take the length of their layout.
        mapper_num_queries (`int`, *optional*):
            Learned queries of the mapper; None (default) gives one per output position. See docs/decoders.md.
        conditioning_layout ([`ConditioningLayout`] or `dict`, *optional*), negative_conditioning (`dict`, *optional*):
            The decoder's layout and default negatives, for a `decoder` given without its text encoders;
            read from the text encoders otherwise. With them given (negatives only where the family has some), a
            `decoder` checkpoint other than SD 1.x/2.x is loaded WITHOUT its text encoders (Flux's T5 and the
            quantized transformer are then never in memory together; see docs/quantization.md).
        seed (`int`, *optional*, defaults to 0):
            Seed for the initial weights of the learned parts.
        dtype (`torch.dtype` or `str`, *optional*):
            Cast the whole pipeline to this dtype at the end (a dtype or a name such as `"bfloat16"`, `"fp16"`). Also
            passed to loaders when models are given by name.
        base_models (`dict`, *optional*):
            The record of the base models' Hub ids and revisions (`{"llm": ..., "stable_diffusion": ...,
            "image_encoder": ...}`, see `gill_pipeline.serialization.hub`), saved with the learned weights. By default it is made
            from the names given (or the `name_or_path` of loaded models when it is a Hub id).
        allow_pickle (`bool`, *optional*, defaults to `False`):
            Models given by name are read from safetensors only; `True` also accepts pickled weight files, read with
            `torch.load(weights_only=True)`. See docs/security.md.
        quantization_config (`PipelineQuantizationConfig` or `dict`, *optional*, in `load_kwargs`):
            Quantizes the base models given by name as they load, each with its component's entry (`llm`,
            `image_encoder`, `unet`/`transformer`, `vae`); see docs/quantization.md. The learned parts are never
            quantized; a model passed already loaded must be quantized by the caller.
        load_kwargs:
            Passed to every `from_pretrained` (e.g. `revision`, `cache_dir`, `local_files_only`, `token`). Remote code
            (`trust_remote_code`, `custom_pipeline`) is refused.
    """
    refuse_remote_code(load_kwargs, "from_base_models")
    stable_diffusion = _decoder_argument(decoder, stable_diffusion)
    if image_encoder is _NOT_GIVEN:
        raise TypeError("`from_base_models` needs `image_encoder` (a CLIP vision encoder id, path or model, or None).")
    dtype = pop_dtype({"dtype": dtype, "torch_dtype": load_kwargs.pop("torch_dtype", None)})
    if not isinstance(allow_pickle, bool):
        raise TypeError(f"`allow_pickle` must be a bool, got {allow_pickle!r}.")
    if not allow_pickle:
        load_kwargs["use_safetensors"] = True
    for value, argument in (
        (language_model, "language_model"), (stable_diffusion, "decoder"), (image_encoder, "image_encoder")
    ):
        _check_local_source(value, argument)
    if base_models is None:
        base_models = record_base_models(language_model, stable_diffusion, image_encoder, load_kwargs.get("revision"))
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    quantization = resolve_quantization_config(load_kwargs.pop("quantization_config", None))
    loaded = {
        "llm": not isinstance(language_model, str), "image_encoder": not isinstance(image_encoder, str),
        "unet": not isinstance(stable_diffusion, str), "transformer": not isinstance(stable_diffusion, str),
        "vae": not isinstance(stable_diffusion, str),
    }
    refuse_quantizing_passed(quantization, [name for name, is_loaded in loaded.items() if is_loaded], "`from_base_models`")

    def quantized(name):
        config = component_quantization(quantization, name)
        return {"quantization_config": config} if config is not None else {}

    llm, tokenizer = _load_lm(language_model, tokenizer, {**load_kwargs, **quantized("llm")})
    sd = _load_sd(
        stable_diffusion, {**load_kwargs, **decoder_quantization(quantization)},
        text_encoders=_needs_text_encoders(conditioning_layout, negative_conditioning),
    )
    image_encoder, feature_extractor = _load_vision(
        image_encoder, feature_extractor, {**load_kwargs, **quantized("image_encoder")}
    )
    if quantization is not None:
        release_freed_memory()

    family = family_for_pipeline(sd)
    for name in (family.denoiser, "vae", "scheduler"):
        if getattr(sd, name, None) is None:
            raise ValueError(f"`decoder` must provide a `{name}`; this {type(sd).__name__} has none.")
    # Stable Diffusion 1.x/2.x with its text encoder keeps the config GILL always had (no recorded layout): the
    # same learned parts and bit-identical outputs as before other families existed.
    legacy = isinstance(family, StableDiffusionFamily) and conditioning_layout is None and sd.text_encoder is not None
    sizes = dict(
        num_img_tokens=num_img_tokens,
        num_visual_tokens=num_visual_tokens,
        retrieval_dim=retrieval_dim,
        mapper_hidden_dim=mapper_hidden_dim,
        mapper_encoder_layers=mapper_encoder_layers,
        mapper_decoder_layers=mapper_decoder_layers,
        mapper_heads=mapper_heads,
        mapper_num_queries=mapper_num_queries,
    )
    if legacy:
        return _assemble_sd(
            pipeline_class, llm, tokenizer, sd, image_encoder, feature_extractor,
            cond_length=cond_length, seed=seed, base_models=base_models, dtype=dtype, sizes=sizes,
        )
    if cond_length is not None:
        raise ValueError(
            f"`cond_length`={cond_length} applies to Stable Diffusion 1.x/2.x only; a {type(sd).__name__} takes the "
            f"length of its conditioning layout."
        )
    layout, negatives = _decoder_conditioning(sd, family, conditioning_layout, negative_conditioning)
    sequence = next(t for t in layout.tensors if t.kind == SEQUENCE)
    tokenizer, img_token_ids = add_img_tokens(tokenizer, num_img_tokens)
    gill = _new_gill(
        llm, image_encoder, seed, sizes,
        cond_dim=sequence.width, cond_length=sequence.length, conditioning_layout=layout.to_dict(),
    )
    gill.set_negative_conditioning(negatives)
    denoiser = {family.denoiser: getattr(sd, family.denoiser)}
    pipe = pipeline_from_parts(
        pipeline_class, dtype, tokenizer=tokenizer, llm=llm, gill=gill, vae=sd.vae, scheduler=sd.scheduler,
        image_encoder=image_encoder, feature_extractor=feature_extractor, img_token_ids=img_token_ids,
        base_models=base_models, **denoiser,
    )
    logger.info(
        "Assembled an untrained GILL pipeline: LM %s (width %d, tied=%s), vision width %d, decoder %s.",
        type(llm).__name__, gill.config.lm_hidden_dim, gill.config.tie_img_embeddings, gill.config.vision_dim,
        layout.describe(),
    )
    return pipe


def _new_gill(llm, image_encoder, seed: int, sizes: dict, **conditioning) -> GILLModel:
    """The learned parts, sized from the LM, the vision encoder, GILL's `sizes` and the decoder's `conditioning`
    (`cond_dim`, `cond_length`, and `conditioning_layout` for families other than SD 1.x/2.x), initialised from
    `seed`; the `[IMG]` rows start from the LM's own rows' statistics."""
    lm_input_dim, lm_hidden_dim, tied = lm_dims(llm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gill = GILLModel(
            lm_input_dim=lm_input_dim,
            lm_hidden_dim=lm_hidden_dim,
            vision_dim=vision_feature_dim(image_encoder),
            tie_img_embeddings=tied,
            **sizes,
            **conditioning,
        )
    # `stored_weight`: an LM loaded with `device_map` may keep these rows offloaded (on `meta` here).
    gill.init_img_embeddings_from(
        stored_weight(llm.get_input_embeddings()), None if tied else stored_weight(llm.get_output_embeddings())
    )
    return gill


def _assemble_sd(
    pipeline_class, llm, tokenizer, sd, image_encoder, feature_extractor, *, cond_length, seed, base_models, dtype,
    sizes,
):
    """Stable Diffusion 1.x/2.x with its text encoder, as GILL always assembled it."""
    if sd.tokenizer is None:
        raise ValueError(f"`decoder` must provide a `tokenizer`; this {type(sd).__name__} has none.")
    if cond_length is None:
        cond_length = int(sd.tokenizer.model_max_length)
        if cond_length > 10_000:  # tokenizers without a set length report a huge sentinel
            cond_length = int(sd.text_encoder.config.max_position_embeddings)

    tokenizer, img_token_ids = add_img_tokens(tokenizer, sizes["num_img_tokens"])
    gill = _new_gill(llm, image_encoder, seed, sizes, cond_dim=sd.unet.config.cross_attention_dim, cond_length=cond_length)
    uncond = encode_empty_prompt(sd.text_encoder, sd.tokenizer, cond_length)
    if uncond.shape[1:] != gill.uncond_prompt_embeds.shape[1:]:
        raise ValueError(
            f"The SD text encoder's output {tuple(uncond.shape)} does not match the UNet's conditioning "
            f"(length {cond_length}, width {sd.unet.config.cross_attention_dim})."
        )
    gill.uncond_prompt_embeds.copy_(uncond)
    pipe = pipeline_from_parts(
        pipeline_class, dtype, tokenizer=tokenizer, llm=llm, gill=gill, vae=sd.vae, unet=sd.unet,
        scheduler=sd.scheduler, image_encoder=image_encoder, feature_extractor=feature_extractor,
        img_token_ids=img_token_ids, base_models=base_models,
    )
    logger.info(
        "Assembled an untrained GILL pipeline: LM %s (width %d, tied=%s), vision width %d, UNet conditioning %dx%d.",
        type(llm).__name__,
        gill.config.lm_hidden_dim,
        gill.config.tie_img_embeddings,
        gill.config.vision_dim,
        cond_length,
        gill.config.cond_dim,
    )
    return pipe
