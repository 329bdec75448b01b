"""GILL's learned weights on their own: a few MB that fit recorded base models.

A learned-weights folder (or Hub repo) holds::

    gill_learned_weights.json   the manifest: format, base models (Hub ids + revisions), [IMG] token ids
    gill/                       GILLModel: config.json + diffusion_pytorch_model.safetensors
    tokenizer/                  the LM's tokenizer with the [IMG] tokens (a few small files)
    feature_extractor/          the vision encoder's image processor (a JSON file), if the pipeline has one
    scheduler/                  the diffusion scheduler's config (a JSON file), if the pipeline has one
    llm_lora/                   the LM's LoRA adapter (peft format), if the LM has one
    README.md                   the model card (written on push)

[`load_learned_weights_pipeline`] (reached through `GILLPipeline.from_pretrained`) loads the recorded base models,
or takes them from the caller (`llm=`, `vae=`, `unet=`, `image_encoder=`, ...).
"""

import functools
import json
import os

import diffusers
import transformers
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from diffusers.utils import logging
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..constants import (
    FEATURE_EXTRACTOR_COMPONENT,
    GILL_COMPONENT,
    IMAGE_ENCODER_COMPONENT,
    LLM_COMPONENT,
    LEARNED_WEIGHTS_MANIFEST_FILE,
    LIBRARY_VERSION,
    LORA_FOLDER,
    MODEL_CONFIG_FILE,
    MODEL_INDEX_FILE,
    SCHEDULER_COMPONENT,
    TOKENIZER_COMPONENT,
    TRANSFORMER_COMPONENT,
    UNET_COMPONENT,
    VAE_COMPONENT,
)
from ..decoders import check_decoder_fits, family_by_name, load_decoder
from ..models.dims import lm_dims, lm_dims_from_config, vision_feature_dim
from ..models.gill_model import GILLModel
from .base_models import BASE_MODEL_ROLES, DEFAULT_IMAGE_ENCODER_CLASS, normalize_base_models
from .components import default_image_processor, pipeline_from_parts
from .folder import (
    check_fit,
    check_img_tokens,
    check_model_kind,
    pop_dtype,
    read_json_object,
    refuse_remote_code,
    refuse_unsafe_files,
    validate_component,
)
from .hub import HubLoadError, hub_download_kwargs
from .lora import check_lora_folder, is_peft_model, load_llm_lora
from .quantization import (
    component_quantization,
    decoder_quantization,
    refuse_quantizing_passed,
    resolve_quantization_config,
)

logger = logging.get_logger(__name__)

# Written into every manifest and checked on reading: the name of the format, not a module path (the module moved
# to `gill_pipeline.serialization.learned_weights`; saved folders keep loading).
LEARNED_WEIGHTS_FORMAT = "gill_pipeline.learned_weights"
LEARNED_WEIGHTS_FORMAT_VERSION = 1
# Components a caller may pass to `from_pretrained` instead of loading them from the recorded base models.
PASSABLE_COMPONENTS = (
    "llm", "tokenizer", "gill", "vae", "unet", "transformer", "scheduler", "image_encoder", "feature_extractor"
)
# Causal LM families transformers knows by name: a recorded LM must be one of them (remote code is never run).
CAUSAL_LM_TYPES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def is_learned_weights_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, LEARNED_WEIGHTS_MANIFEST_FILE)) and not os.path.isfile(
        os.path.join(folder, MODEL_INDEX_FILE)
    )


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------
def write_learned_weights_folder(
    save_directory: str,
    gill,
    tokenizer,
    img_token_ids: list[int],
    base_models: dict | None,
    feature_extractor=None,
    scheduler=None,
    llm=None,
) -> str:
    """Writes a learned-weights folder from its parts (see the module docstring); returns the manifest path."""
    record = normalize_base_models(base_models)
    os.makedirs(save_directory, exist_ok=True)
    gill.save_pretrained(os.path.join(save_directory, GILL_COMPONENT))
    tokenizer.save_pretrained(os.path.join(save_directory, TOKENIZER_COMPONENT))
    if feature_extractor is not None:
        feature_extractor.save_pretrained(os.path.join(save_directory, FEATURE_EXTRACTOR_COMPONENT))
    if scheduler is not None:
        scheduler.save_pretrained(os.path.join(save_directory, SCHEDULER_COMPONENT))
    if llm is not None and is_peft_model(llm):
        llm.save_pretrained(os.path.join(save_directory, LORA_FOLDER))
    manifest = {
        "format": LEARNED_WEIGHTS_FORMAT,
        "format_version": LEARNED_WEIGHTS_FORMAT_VERSION,
        "gill_pipeline_version": LIBRARY_VERSION,
        "base_models": record,
        "img_token_ids": [int(i) for i in img_token_ids],
        "img_tokens": tokenizer.convert_ids_to_tokens([int(i) for i in img_token_ids]),
        # The decoder the mapper was trained for (the full layout is in gill/config.json).
        "decoder": {
            "family": gill.conditioning_layout.family,
            "pipeline_class": gill.conditioning_layout.pipeline_class,
            "base_checkpoint": record["stable_diffusion"]["repo_id"] if record.get("stable_diffusion") else None,
        },
    }
    path = os.path.join(save_directory, LEARNED_WEIGHTS_MANIFEST_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    missing = [role for role in BASE_MODEL_ROLES if record[role] is None]
    if missing:
        logger.warning(
            "The learned weights in %s record no base model for %s: loading them will need those passed in "
            "(e.g. `llm=`). Record them with `base_models={'llm': 'org/name', ...}`.",
            save_directory,
            missing,
        )
    return path


def save_learned_weights(pipe, save_directory: str | os.PathLike, base_models: dict | None = None) -> str:
    """Saves only `pipe`'s learned parts and the record of its base models; returns the folder.

    Args:
        pipe ([`GILLPipeline`]): The pipeline.
        save_directory (`str` or `os.PathLike`): Where to write (created if needed).
        base_models (`dict`, *optional*):
            The base models (`{"llm": "org/name" or {"repo_id", "revision"}, "stable_diffusion": ...,
            "image_encoder": ...}`); defaults to the pipeline config's `base_models` record.
    """
    save_directory = str(save_directory)
    if base_models is None:
        base_models = getattr(pipe.config, "base_models", None)
    write_learned_weights_folder(
        save_directory,
        gill=pipe.gill,
        tokenizer=pipe.tokenizer,
        img_token_ids=pipe.img_token_ids,
        base_models=base_models,
        feature_extractor=pipe.feature_extractor,
        scheduler=pipe.scheduler,
        llm=pipe.llm,
    )
    return save_directory


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, LEARNED_WEIGHTS_MANIFEST_FILE)
    manifest = read_json_object(path, "the learned-weights manifest")
    if manifest.get("format") != LEARNED_WEIGHTS_FORMAT:
        raise HubLoadError(f"{path} is not a GILL learned-weights manifest (format {manifest.get('format')!r}).")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version > LEARNED_WEIGHTS_FORMAT_VERSION:
        raise HubLoadError(
            f"{path} has format version {version!r}; this gill_pipeline ({LIBRARY_VERSION}) reads up to "
            f"{LEARNED_WEIGHTS_FORMAT_VERSION}. Upgrade gill_pipeline."
        )
    ids = manifest.get("img_token_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise HubLoadError(f"{path}: `img_token_ids` must be a list of integers, got {ids!r}.")
    manifest["base_models"] = normalize_base_models(manifest.get("base_models"), argument=path)
    return manifest


def validate_learned_weights_folder(folder: str, allow_pickle: bool = False, passed: tuple[str, ...] = ()) -> None:
    """Names the first missing, corrupted or unsafe file of a learned-weights folder, before anything is loaded.

    Components in `passed` (given by the caller) are not read from the folder, so they are not checked.
    """
    refuse_unsafe_files(folder, allow_pickle)
    if "gill" not in passed:
        validate_component(os.path.join(folder, GILL_COMPONENT), GILL_COMPONENT, GILLModel, allow_pickle)
    if "tokenizer" not in passed:
        validate_component(
            os.path.join(folder, TOKENIZER_COMPONENT), TOKENIZER_COMPONENT, transformers.PreTrainedTokenizerBase
        )
    for name, kind in ((FEATURE_EXTRACTOR_COMPONENT, CLIPImageProcessor), (SCHEDULER_COMPONENT, SchedulerMixin)):
        if name not in passed and os.path.isdir(os.path.join(folder, name)):
            validate_component(os.path.join(folder, name), name, kind)
    if os.path.isdir(os.path.join(folder, LORA_FOLDER)):
        check_lora_folder(os.path.join(folder, LORA_FOLDER), allow_pickle)


def _required_entry(manifest: dict, role: str, source: str, hint: str) -> dict:
    entry = manifest["base_models"][role]
    if entry is None:
        raise ValueError(
            f"The learned weights {source!r} record no base {role.replace('_', ' ')}; pass {hint} to `from_pretrained`."
        )
    return entry


def _load_base(what: str, entry: dict, source: str, load):
    """Runs `load()`; a failure names the base model, its revision and the learned weights that record it."""
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HubLoadError(
            f"Cannot load the base {what} {entry['repo_id']!r} (revision {entry.get('revision') or 'main'!r}) that "
            f"the learned weights {source!r} record: {error}"
        ) from error


def _join(subfolder: str | None, name: str) -> str:
    return f"{subfolder}/{name}" if subfolder else name


def _load_scheduler(path_or_repo: str, kwargs: dict):
    """A scheduler of the class its config names (`_class_name`, a diffusers scheduler), from a folder or a repo."""
    # Any scheduler class reads the config file; the class it names is then built from it.
    config = diffusers.DDPMScheduler.load_config(path_or_repo, **kwargs)
    scheduler_class = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not isinstance(scheduler_class, type) or not issubclass(scheduler_class, SchedulerMixin):
        raise ValueError(f"Unknown scheduler class {config.get('_class_name')!r} in {path_or_repo}.")
    return scheduler_class.from_config(config)


def _lm_config(entry: dict, kwargs: dict):
    """The recorded LM's config, checked to be a causal LM that transformers knows (no remote code)."""
    config_dict, _ = PretrainedConfig.get_config_dict(entry["repo_id"], **kwargs)
    model_type = config_dict.get("model_type")
    if model_type not in CAUSAL_LM_TYPES:
        raise ValueError(
            f"it is not a causal LM that transformers knows: its config.json has model_type {model_type!r} "
            f"(architectures {config_dict.get('architectures')})"
        )
    return transformers.AutoConfig.for_model(**config_dict)


def _check_decoder_config(model_class, entry: dict, subfolder: str, kwargs: dict) -> None:
    config = model_class.load_config(entry["repo_id"], subfolder=subfolder, **kwargs)
    check_model_kind(model_class, config, f"{entry['repo_id']}/{subfolder}/{MODEL_CONFIG_FILE}", subfolder)


def load_learned_weights_pipeline(pipeline_class, folder: str, source: str, **kwargs):
    """Builds a pipeline from a learned-weights folder plus its base models (loaded, or passed in `kwargs`).

    `kwargs`: `dtype` (or `torch_dtype`; a dtype or its name), `allow_pickle` (default False: pickled weights are
    refused), the download arguments (`token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`;
    `revision` was the learned-weights repo's own and is dropped here), `llm_kwargs` (extra arguments for the LM's
    `from_pretrained`), `quantization_config` (a diffusers `PipelineQuantizationConfig`: each base model is loaded
    with its component's entry, see `gill_pipeline.serialization.quantization`; `gill/` is never quantized), and
    components to use as they are (`llm`, `tokenizer`, `gill`,
    `vae`, `unet`, `scheduler`, `image_encoder`, `feature_extractor`; `vae=None, unet=None` loads no image decoder,
    `image_encoder=None` no vision encoder).
    """
    refuse_remote_code(kwargs)
    allow_pickle = bool(kwargs.pop("allow_pickle", False))
    dtype = pop_dtype(kwargs)
    llm_kwargs = dict(kwargs.pop("llm_kwargs", None) or {})
    refuse_remote_code(llm_kwargs, "from_pretrained(llm_kwargs=...)")
    quantization = resolve_quantization_config(kwargs.pop("quantization_config", None))
    if quantization is not None and "quantization_config" in llm_kwargs:
        raise ValueError(
            "Pass the LM's quantization once: in `quantization_config` (`quant_mapping={'llm': ...}`) or in "
            "`llm_kwargs['quantization_config']`, not both."
        )
    if component_quantization(quantization, LLM_COMPONENT) is not None:
        llm_kwargs["quantization_config"] = component_quantization(quantization, LLM_COMPONENT)
    download = hub_download_kwargs(kwargs)
    kwargs.pop("revision", None)
    passed = {name: kwargs.pop(name) for name in PASSABLE_COMPONENTS if name in kwargs}
    for name in download:
        kwargs.pop(name)
    if kwargs:
        raise TypeError(
            f"Unexpected arguments {sorted(kwargs)} for loading the learned weights {source!r}; accepted: dtype, "
            "allow_pickle, llm_kwargs, quantization_config, revision, token, cache_dir, local_files_only, force_download, proxies, and the "
            f"components {list(PASSABLE_COMPONENTS)}."
        )
    refuse_quantizing_passed(quantization, passed, f"loading the learned weights {source!r}")

    def quantized(name):
        config = component_quantization(quantization, name)
        return {"quantization_config": config} if config is not None else {}

    manifest = read_manifest(folder)
    validate_learned_weights_folder(folder, allow_pickle, tuple(passed))
    learned = f"the learned weights {source!r}"
    typed = {"dtype": dtype} if dtype is not None else {}
    # diffusers and transformers refuse pickled weights with `use_safetensors=True`; with `allow_pickle` they read
    # them with torch.load(weights_only=True).
    safe = {} if allow_pickle else {"use_safetensors": True}

    def entry_kwargs(entry):
        extra = {"revision": entry.get("revision")} if entry.get("revision") else {}
        return {**download, **extra}

    # The learned parts and the small files saved with them.
    gill = passed.get("gill") or GILLModel.from_pretrained(os.path.join(folder, GILL_COMPONENT), **safe)
    if dtype is not None and "gill" not in passed:
        gill = gill.to(dtype)
    tokenizer = passed.get("tokenizer") or AutoTokenizer.from_pretrained(os.path.join(folder, TOKENIZER_COMPONENT))
    check_img_tokens(
        tokenizer, manifest["img_token_ids"], gill.config.num_img_tokens,
        "The tokenizer" if "tokenizer" in passed else f"The tokenizer {os.path.join(folder, TOKENIZER_COMPONENT)}",
        learned, tokens=manifest.get("img_tokens"),
    )

    # The language model: its config is read and checked before any weight is downloaded.
    if "llm" in passed:
        llm = passed["llm"]
    else:
        entry = _required_entry(manifest, "llm", source, "`llm=` (a loaded causal LM)")
        config = _load_base("LM", entry, source, lambda: _lm_config(entry, entry_kwargs(entry)))
        lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        check_fit(gill.config, learned, lm=lm_dims_from_config(lm_class, config), lm_name=f"The base LM {entry['repo_id']!r}")
        llm = _load_base(
            "LM",
            entry,
            source,
            lambda: AutoModelForCausalLM.from_pretrained(
                entry["repo_id"], **entry_kwargs(entry), **typed, **safe, **llm_kwargs
            ),
        )
    if llm is None:
        raise ValueError("`llm` cannot be None: a GILL pipeline needs its language model.")

    # The image decoder: the family the learned weights were trained for (`gill.conditioning_layout`).
    layout = gill.conditioning_layout
    transformer = None
    if "vae" in passed or "unet" in passed or "transformer" in passed:
        vae, unet, transformer = passed.get("vae"), passed.get("unet"), passed.get("transformer")
        if (vae is None) != (unet is None and transformer is None):
            raise ValueError(
                "Pass both `vae` and the denoiser (`unet` or `transformer`), or both None for a pipeline without an "
                "image decoder."
            )
    elif family_by_name(layout.pipeline_class).denoiser == "transformer":
        entry = _required_entry(manifest, "stable_diffusion", source, "`vae=` and `transformer=` (or both None)")
        decoder = _load_base(
            f"{layout.pipeline_class} decoder",
            entry,
            source,
            lambda: load_decoder(
                entry["repo_id"], family=layout.pipeline_class, **entry_kwargs(entry),
                **({"torch_dtype": dtype} if dtype is not None else {}), **safe,
                **decoder_quantization(quantization),
            ),
        )
        vae, unet, transformer = decoder.vae, None, decoder.transformer
    else:
        entry = _required_entry(manifest, "stable_diffusion", source, "`vae=` and `unet=` (or both None)")
        sub = entry.get("subfolder")
        parts = ((AutoencoderKL, VAE_COMPONENT, "VAE"), (UNet2DConditionModel, UNET_COMPONENT, "UNet"))
        # Both configs are checked before either part's weights are read.
        for model_class, name, _ in parts:
            _load_base(
                f"Stable Diffusion {name}", entry, source,
                lambda: _check_decoder_config(model_class, entry, _join(sub, name), entry_kwargs(entry)),
            )
        vae, unet = (
            _load_base(
                f"Stable Diffusion {label}", entry, source,
                functools.partial(
                    model_class.from_pretrained, entry["repo_id"], subfolder=_join(sub, name), **entry_kwargs(entry),
                    **typed, **safe, **quantized(name),
                ),
            )
            for model_class, name, label in parts
        )
    if "scheduler" in passed:
        scheduler = passed["scheduler"]
    elif unet is None and transformer is None:
        scheduler = None
    elif os.path.isdir(os.path.join(folder, SCHEDULER_COMPONENT)):
        scheduler = _load_scheduler(os.path.join(folder, SCHEDULER_COMPONENT), {})
    else:
        entry = _required_entry(manifest, "stable_diffusion", source, "`scheduler=`")
        scheduler = _load_base(
            "Stable Diffusion scheduler",
            entry,
            source,
            lambda: _load_scheduler(
                entry["repo_id"], {"subfolder": _join(entry.get("subfolder"), SCHEDULER_COMPONENT), **entry_kwargs(entry)}
            ),
        )

    # The vision encoder: a transformers model class named in the record.
    if "image_encoder" in passed:
        image_encoder = passed["image_encoder"]
    else:
        entry = _required_entry(manifest, "image_encoder", source, "`image_encoder=` (or None)")
        class_name = entry.get("class_name") or DEFAULT_IMAGE_ENCODER_CLASS
        encoder_class = getattr(transformers, class_name, None)
        if not isinstance(encoder_class, type) or not issubclass(encoder_class, PreTrainedModel):
            raise ValueError(
                f"The learned weights {source!r} record the vision encoder class {class_name!r}, which is not a "
                "transformers model class."
            )
        sub = {"subfolder": entry["subfolder"]} if entry.get("subfolder") else {}

        def check_encoder_kind():
            config, _ = PretrainedConfig.get_config_dict(entry["repo_id"], **sub, **entry_kwargs(entry))
            check_model_kind(encoder_class, config, f"{entry['repo_id']}/{MODEL_CONFIG_FILE}", "image_encoder")

        _load_base("vision encoder", entry, source, check_encoder_kind)
        image_encoder = _load_base(
            "vision encoder",
            entry,
            source,
            lambda: encoder_class.from_pretrained(
                entry["repo_id"], **sub, **entry_kwargs(entry), **typed, **safe, **quantized(IMAGE_ENCODER_COMPONENT)
            ),
        )
    if "feature_extractor" in passed:
        feature_extractor = passed["feature_extractor"]
    elif image_encoder is None:
        feature_extractor = None
    elif os.path.isdir(os.path.join(folder, FEATURE_EXTRACTOR_COMPONENT)):
        feature_extractor = CLIPImageProcessor.from_pretrained(os.path.join(folder, FEATURE_EXTRACTOR_COMPONENT))
    else:
        feature_extractor = default_image_processor(image_encoder)

    check_fit(
        gill.config,
        learned,
        lm=lm_dims(llm),
        lm_name=f"The LM ({type(llm).__name__})",
        cross_attention_dim=unet.config.cross_attention_dim if unet is not None else None,
        vision_dim=vision_feature_dim(image_encoder) if image_encoder is not None else None,
    )
    check_decoder_fits(layout, {UNET_COMPONENT: unet, TRANSFORMER_COMPONENT: transformer}, learned)
    pipe = pipeline_from_parts(
        pipeline_class, tokenizer=tokenizer, llm=llm, gill=gill, vae=vae, unet=unet, scheduler=scheduler,
        image_encoder=image_encoder, feature_extractor=feature_extractor, img_token_ids=manifest["img_token_ids"],
        base_models=manifest["base_models"], transformer=transformer,
    )
    load_llm_lora(pipe, folder, allow_pickle)
    return pipe
