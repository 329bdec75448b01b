"""Loading the models a training run starts from: a GILL pipeline plus SD's text encoder (for the targets)."""

import logging
import os
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

from gill_pipeline import GILLPipeline
from gill_pipeline.serialization.folder import (
    PipelineFolderError,
    read_json_object,
    refuse_unsafe_files,
    resolve_component_class,
    validate_component,
)
from gill_pipeline.serialization.hub import resolve_pipeline_folder
from gill_pipeline.serialization.learned_weights import is_learned_weights_folder

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A random LM initialised with std 0.02 gives near-uniform logits that no input can move, unlike a trained LM.
# The tiny LM's word embeddings (input and output) are scaled by this factor, and OPT's output projection by the
# second one (its random last hidden states are ~10x smaller than other LMs'), so that the tiny LM's predictions
# depend on its input, as a trained LM's do, and GILL's losses can fall within a smoke test.
TINY_EMBEDDING_SCALE = 4.0
TINY_OPT_PROJECT_OUT_SCALE = 10.0


@dataclass
class Models:
    pipe: GILLPipeline
    # SD's text encoder and tokenizer: None when the targets are precomputed and no SD checkpoint was named.
    text_encoder: object | None
    text_tokenizer: object | None
    # Training never runs the image decoder (UNet, VAE, scheduler): loaded from a pipeline folder, it is left out and
    # read again from this folder at export time (`attach_image_decoder`), so the export stays a complete pipeline.
    image_decoder_source: str | None = None
    # Decoders other than SD 1.x/2.x: the decoder's stock pipeline WITH its text encoders (its denoiser and VAE may
    # be None), whose own `encode_prompt` makes the targets (`training.targets.encode_family_targets`).
    decoder: DiffusionPipeline | None = None


IMAGE_DECODER_COMPONENTS = ("unet", "transformer", "vae", "scheduler")
# The kind of class each decoder component must be: names in model_index.json (which may come from the Hub) are
# resolved to diffusers classes by name and checked, never imported from anywhere else.
IMAGE_DECODER_KINDS = {"unet": ModelMixin, "transformer": ModelMixin, "vae": ModelMixin, "scheduler": SchedulerMixin}


def build_tiny_models(lm_type: str, seed: int = 0, decoder: str = "sd") -> Models:
    """The tiny random pipeline of `gill_pipeline.testing`, keeping the SD text encoder that assembly drops; with
    `decoder` (a name of `gill_pipeline.testing.TINY_DECODER_BUILDERS`), over that tiny decoder family."""
    from gill_pipeline.testing import (
        TINY_GILL_SIZES,
        build_tiny_lm,
        build_tiny_stable_diffusion,
        build_tiny_tokenizer,
        build_tiny_vision_encoder,
    )

    family_decoder = None
    if decoder != "sd":
        from gill_pipeline.testing import build_tiny_decoder

        family_decoder = build_tiny_decoder(decoder)  # seeded on its own; the global RNG is left alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        llm = build_tiny_lm(lm_type, len(tokenizer), tokenizer)
        sd = build_tiny_stable_diffusion() if family_decoder is None else family_decoder
        image_encoder, processor = build_tiny_vision_encoder()
    with torch.no_grad():
        llm.get_input_embeddings().weight.mul_(TINY_EMBEDDING_SCALE)
        output = llm.get_output_embeddings()
        if output.weight.data_ptr() != llm.get_input_embeddings().weight.data_ptr():
            output.weight.mul_(TINY_EMBEDDING_SCALE)
        project_out = getattr(getattr(getattr(llm, "model", None), "decoder", None), "project_out", None)
        if project_out is not None:
            project_out.weight.mul_(TINY_OPT_PROJECT_OUT_SCALE)
    pipe = GILLPipeline.from_base_models(
        language_model=llm,
        tokenizer=tokenizer,
        stable_diffusion=sd,
        image_encoder=image_encoder,
        feature_extractor=processor,
        seed=seed,
        **TINY_GILL_SIZES,
    )
    if family_decoder is not None:
        return Models(pipe, None, None, decoder=family_decoder)
    return Models(pipe, sd.text_encoder, sd.tokenizer)


def decoder_family_of(path: str):
    """The decoder family adapter of a checkpoint (from its `model_index.json`); unsupported classes are refused."""
    from gill_pipeline.decoders import family_for_pipeline

    return family_for_pipeline(DiffusionPipeline.load_config(path)["_class_name"])


def load_decoder_text_side(path: str) -> DiffusionPipeline:
    """A decoder checkpoint's stock pipeline with its text encoders only (denoiser and VAE left out: training never
    runs them), for the family's own `encode_prompt`."""
    from gill_pipeline.decoders import load_decoder

    family = decoder_family_of(path)
    return load_decoder(path, family=family, text_encoders=True, **{family.denoiser: None, "vae": None})


def load_sd_text_encoder(stable_diffusion: str):
    from transformers import AutoTokenizer, CLIPTextModel

    return (
        CLIPTextModel.from_pretrained(stable_diffusion, subfolder="text_encoder"),
        AutoTokenizer.from_pretrained(stable_diffusion, subfolder="tokenizer"),
    )


def image_decoder_components(folder: str) -> dict[str, tuple[str, str]]:
    """`{name: (library, class name)}` of the UNet, VAE and scheduler a saved pipeline folder holds."""
    index = read_json_object(os.path.join(folder, DiffusionPipeline.config_name))
    return {
        name: tuple(index[name])
        for name in IMAGE_DECODER_COMPONENTS
        if isinstance(index.get(name), list) and None not in index[name]
    }


def attach_image_decoder(pipe: GILLPipeline, folder: str) -> None:
    """Loads the UNet, VAE and scheduler of the pipeline saved in `folder` into `pipe` (nothing else is read).

    Only diffusers classes of the right kind are accepted, and only safetensors weights: the folder may come from
    the Hub (see docs/security.md)."""
    refuse_unsafe_files(folder)
    where = os.path.join(folder, DiffusionPipeline.config_name)
    loaded = {}
    for name, (library, class_name) in image_decoder_components(folder).items():
        if library != "diffusers":
            raise PipelineFolderError(
                f"{where} (component `{name}`): refusing the class {class_name!r} of library {library!r}; the image "
                "decoder is made of diffusers classes only."
            )
        component_class = resolve_component_class(library, class_name, f"{where} (component `{name}`)")
        if not issubclass(component_class, IMAGE_DECODER_KINDS[name]):
            raise PipelineFolderError(
                f"{where} (component `{name}`): {class_name} is not a diffusers {IMAGE_DECODER_KINDS[name].__name__}."
            )
        validate_component(os.path.join(folder, name), name, component_class, listed_in=where)
        safe = {"use_safetensors": True} if issubclass(component_class, ModelMixin) else {}
        loaded[name] = component_class.from_pretrained(os.path.join(folder, name), **safe)
        if isinstance(loaded[name], torch.nn.Module):
            loaded[name].requires_grad_(False).eval()
    pipe.register_modules(**loaded)


def load_models(model_args, seed: int = 0, need_text_encoder: bool = True, need_image_decoder: bool = True) -> Models:
    """The pipeline to train (in the dtypes it was saved or built in; see `cast_frozen`) and, if `need_text_encoder`
    or an SD checkpoint is named, SD's text encoder.

    `need_image_decoder`: whether the run exports a complete pipeline. A pipeline folder's UNet, VAE and scheduler
    are never loaded for training; with `need_image_decoder`, `Models.image_decoder_source` says where to read them
    at export. (A learned-weights folder takes them from the base SD checkpoint, so they are loaded with it.)
    """
    if model_args.tiny_random:
        models = build_tiny_models(model_args.tiny_random, seed)
    elif model_args.pipeline:
        folder = resolve_pipeline_folder(model_args.pipeline)
        decoder_source = None
        if is_learned_weights_folder(folder) and need_image_decoder:
            pipe = GILLPipeline.from_pretrained(folder)
        else:
            pipe = GILLPipeline.from_pretrained(folder, **dict.fromkeys(IMAGE_DECODER_COMPONENTS))
            decoder_source = folder if need_image_decoder else None
        text_encoder = text_tokenizer = decoder = None
        if model_args.stable_diffusion and pipe.gill.conditioning_layout.family != "sd":
            decoder = load_decoder_text_side(model_args.stable_diffusion)
        elif model_args.stable_diffusion:
            text_encoder, text_tokenizer = load_sd_text_encoder(model_args.stable_diffusion)
        elif need_text_encoder:
            raise ValueError(
                f"`pipeline`={model_args.pipeline!r} holds no SD text encoder, so the generation targets need either "
                "`stable_diffusion` (the SD checkpoint the pipeline was assembled with) or precomputed "
                "`train_targets`/`val_targets` (precompute.py)."
            )
        models = Models(pipe, text_encoder, text_tokenizer, decoder_source, decoder=decoder)
    else:
        from diffusers import StableDiffusionPipeline
        from gill_pipeline.decoders import load_decoder
        from gill_pipeline.decoders.families import StableDiffusionFamily

        family = decoder_family_of(model_args.stable_diffusion)
        if isinstance(family, StableDiffusionFamily):
            sd = StableDiffusionPipeline.from_pretrained(
                model_args.stable_diffusion, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        else:
            sd = load_decoder(model_args.stable_diffusion, family=family, text_encoders=True)
        assemble = {
            name: getattr(model_args, name)
            for name in ("num_img_tokens", "num_visual_tokens", "retrieval_dim")
            if getattr(model_args, name) is not None
        }
        pipe = GILLPipeline.from_base_models(
            language_model=model_args.language_model,
            stable_diffusion=sd,
            image_encoder=model_args.image_encoder,
            seed=seed,
            **assemble,
        )
        if isinstance(family, StableDiffusionFamily):
            models = Models(pipe, sd.text_encoder, sd.tokenizer)
        else:
            models = Models(pipe, None, None, decoder=sd)
    return models


def cast_frozen(models: Models, frozen_dtype: str) -> None:
    """The frozen LM, vision encoder and SD text encoder to `frozen_dtype`; the learned parts stay float32.

    Call it after checking precomputed targets against these models (`TargetStore.validate`): a cast rounds the
    weights their fingerprints are taken from.
    """
    dtype = DTYPES[frozen_dtype]
    decoder_text = [getattr(models.decoder, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    for module in (models.pipe.llm, models.pipe.image_encoder, models.text_encoder, *decoder_text):
        if module is not None:
            module.to(dtype)
