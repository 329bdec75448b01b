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

import json
import os

from diffusers.utils import logging

from . import __version__
from .constants import GILL_COMPONENT, MODEL_INDEX_FILE, TOKENIZER_COMPONENT
from .hub import BASE_MODEL_ROLES, DEFAULT_IMAGE_ENCODER_CLASS, HubLoadError, hub_download_kwargs, normalize_base_models
from .lora import LORA_FOLDER, is_peft_model, load_llm_lora

logger = logging.get_logger(__name__)

LEARNED_WEIGHTS_MANIFEST_FILE = "gill_learned_weights.json"
LEARNED_WEIGHTS_FORMAT = "gill_pipeline.learned_weights"
LEARNED_WEIGHTS_FORMAT_VERSION = 1
FEATURE_EXTRACTOR_FOLDER = "feature_extractor"
SCHEDULER_FOLDER = "scheduler"
SD_VAE_SUBFOLDER = "vae"
SD_UNET_SUBFOLDER = "unet"
SD_SCHEDULER_SUBFOLDER = "scheduler"
# Components a caller may pass to `from_pretrained` instead of loading them from the recorded base models.
PASSABLE_COMPONENTS = ("llm", "tokenizer", "gill", "vae", "unet", "scheduler", "image_encoder", "feature_extractor")


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
        feature_extractor.save_pretrained(os.path.join(save_directory, FEATURE_EXTRACTOR_FOLDER))
    if scheduler is not None:
        scheduler.save_pretrained(os.path.join(save_directory, SCHEDULER_FOLDER))
    if llm is not None and is_peft_model(llm):
        llm.save_pretrained(os.path.join(save_directory, LORA_FOLDER))
    manifest = {
        "format": LEARNED_WEIGHTS_FORMAT,
        "format_version": LEARNED_WEIGHTS_FORMAT_VERSION,
        "gill_pipeline_version": __version__,
        "base_models": record,
        "img_token_ids": [int(i) for i in img_token_ids],
        "img_tokens": tokenizer.convert_ids_to_tokens([int(i) for i in img_token_ids]),
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
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise HubLoadError(f"Cannot read the learned-weights manifest {path}: {error}") from error
    if manifest.get("format") != LEARNED_WEIGHTS_FORMAT:
        raise HubLoadError(f"{path} is not a GILL learned-weights manifest (format {manifest.get('format')!r}).")
    if manifest.get("format_version", 0) > LEARNED_WEIGHTS_FORMAT_VERSION:
        raise HubLoadError(
            f"{path} has format version {manifest['format_version']}; this gill_pipeline ({__version__}) reads up to "
            f"{LEARNED_WEIGHTS_FORMAT_VERSION}. Upgrade gill_pipeline."
        )
    manifest["base_models"] = normalize_base_models(manifest.get("base_models"), argument=path)
    return manifest


def _required_entry(manifest: dict, role: str, source: str, hint: str) -> dict:
    entry = manifest["base_models"][role]
    if entry is None:
        raise ValueError(
            f"The learned weights {source!r} record no base {role.replace('_', ' ')}; pass {hint} to `from_pretrained`."
        )
    return entry


def _load_base(what: str, entry: dict, source: str, load):
    """Runs `load()`; a failure names the base model, its revision and the learned weights that need it."""
    try:
        return load()
    except OSError as error:
        raise HubLoadError(
            f"Cannot load the base {what} {entry['repo_id']!r} (revision {entry.get('revision') or 'main'!r}) that "
            f"the learned weights {source!r} fit: {error}"
        ) from error


def load_learned_weights_pipeline(pipeline_class, folder: str, source: str, **kwargs):
    """Builds a pipeline from a learned-weights folder plus its base models (loaded, or passed in `kwargs`).

    `kwargs`: `dtype` (or `torch_dtype`), the download arguments (`token`, `cache_dir`, `local_files_only`,
    `force_download`, `proxies`; `revision` was the learned-weights repo's own and is dropped here),
    `llm_kwargs` (extra arguments for the LM's `from_pretrained`, e.g. `quantization_config`), and components to use
    as they are (`llm`, `tokenizer`, `gill`, `vae`, `unet`, `scheduler`, `image_encoder`, `feature_extractor`;
    `vae=None, unet=None` loads no image decoder, `image_encoder=None` no vision encoder).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor

    from .models.gill_model import GILLModel
    from .pipeline.assembly import lm_dims, vision_feature_dim

    manifest = read_manifest(folder)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    llm_kwargs = dict(kwargs.pop("llm_kwargs", None) or {})
    download = hub_download_kwargs(kwargs)
    kwargs.pop("revision", None)
    passed = {name: kwargs.pop(name) for name in PASSABLE_COMPONENTS if name in kwargs}
    for name in download:
        kwargs.pop(name)
    if kwargs:
        raise TypeError(
            f"Unexpected arguments {sorted(kwargs)} for loading the learned weights {source!r}; accepted: dtype, "
            f"llm_kwargs, revision, token, cache_dir, local_files_only, and the components {list(PASSABLE_COMPONENTS)}."
        )
    typed = {"dtype": dtype} if dtype is not None else {}

    def entry_kwargs(entry):
        extra = {"revision": entry.get("revision")} if entry.get("revision") else {}
        return {**download, **typed, **extra}

    # The learned parts and the small files saved with them.
    gill = passed.get("gill") or GILLModel.from_pretrained(os.path.join(folder, GILL_COMPONENT))
    if dtype is not None and "gill" not in passed:
        gill = gill.to(dtype)
    tokenizer = passed.get("tokenizer") or AutoTokenizer.from_pretrained(os.path.join(folder, TOKENIZER_COMPONENT))

    # The language model.
    if "llm" in passed:
        llm = passed["llm"]
    else:
        entry = _required_entry(manifest, "llm", source, "`llm=` (a loaded causal LM)")
        llm = _load_base(
            "LM",
            entry,
            source,
            lambda: AutoModelForCausalLM.from_pretrained(entry["repo_id"], **entry_kwargs(entry), **llm_kwargs),
        )
    if llm is None:
        raise ValueError("`llm` cannot be None: a GILL pipeline needs its language model.")

    # The image decoder.
    if "vae" in passed or "unet" in passed:
        vae, unet = passed.get("vae"), passed.get("unet")
        if (vae is None) != (unet is None):
            raise ValueError("Pass both `vae` and `unet` (or both None for a pipeline without an image decoder).")
    else:
        entry = _required_entry(manifest, "stable_diffusion", source, "`vae=` and `unet=` (or both None)")
        sub = entry.get("subfolder")
        vae = _load_base(
            "Stable Diffusion VAE",
            entry,
            source,
            lambda: AutoencoderKL.from_pretrained(
                entry["repo_id"], subfolder=_join(sub, SD_VAE_SUBFOLDER), **entry_kwargs(entry)
            ),
        )
        unet = _load_base(
            "Stable Diffusion UNet",
            entry,
            source,
            lambda: UNet2DConditionModel.from_pretrained(
                entry["repo_id"], subfolder=_join(sub, SD_UNET_SUBFOLDER), **entry_kwargs(entry)
            ),
        )
    if "scheduler" in passed:
        scheduler = passed["scheduler"]
    elif unet is None:
        scheduler = None
    elif os.path.isdir(os.path.join(folder, SCHEDULER_FOLDER)):
        scheduler = _load_scheduler(os.path.join(folder, SCHEDULER_FOLDER), {})
    else:
        entry = _required_entry(manifest, "stable_diffusion", source, "`scheduler=`")
        scheduler = _load_base(
            "Stable Diffusion scheduler",
            entry,
            source,
            lambda: _load_scheduler(
                entry["repo_id"],
                {"subfolder": _join(entry.get("subfolder"), SD_SCHEDULER_SUBFOLDER), **download,
                 **({"revision": entry["revision"]} if entry.get("revision") else {})},
            ),
        )

    # The vision encoder.
    if "image_encoder" in passed:
        image_encoder = passed["image_encoder"]
    else:
        entry = _required_entry(manifest, "image_encoder", source, "`image_encoder=` (or None)")
        import transformers

        class_name = entry.get("class_name") or DEFAULT_IMAGE_ENCODER_CLASS
        encoder_class = getattr(transformers, class_name, None)
        if encoder_class is None:
            raise ValueError(f"The learned weights {source!r} record an unknown vision encoder class {class_name!r}.")
        sub = {"subfolder": entry["subfolder"]} if entry.get("subfolder") else {}
        image_encoder = _load_base(
            "vision encoder",
            entry,
            source,
            lambda: encoder_class.from_pretrained(entry["repo_id"], **sub, **entry_kwargs(entry)),
        )
    if "feature_extractor" in passed:
        feature_extractor = passed["feature_extractor"]
    elif image_encoder is None:
        feature_extractor = None
    elif os.path.isdir(os.path.join(folder, FEATURE_EXTRACTOR_FOLDER)):
        feature_extractor = CLIPImageProcessor.from_pretrained(os.path.join(folder, FEATURE_EXTRACTOR_FOLDER))
    else:
        size = image_encoder.config.image_size
        feature_extractor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    _check_fit(gill, tokenizer, llm, unet, image_encoder, manifest, source, lm_dims, vision_feature_dim)
    from .pipeline.assembly import pipeline_from_parts

    pipe = pipeline_from_parts(
        pipeline_class, tokenizer, llm, gill, vae, unet, scheduler, image_encoder, feature_extractor,
        manifest["img_token_ids"], manifest["base_models"],
    )
    load_llm_lora(pipe, folder)
    return pipe


def _join(subfolder: str | None, name: str) -> str:
    return f"{subfolder}/{name}" if subfolder else name


def _load_scheduler(path_or_repo: str, kwargs: dict):
    """A scheduler of the class its config names (`_class_name`), from a folder or a Hub repo."""
    import diffusers

    # Any scheduler class reads the config file; the class it names is then built from it.
    config = diffusers.DDPMScheduler.load_config(path_or_repo, **kwargs)
    scheduler_class = getattr(diffusers, config.get("_class_name", ""), None)
    if scheduler_class is None:
        raise ValueError(f"Unknown scheduler class {config.get('_class_name')!r} in {path_or_repo}.")
    return scheduler_class.from_config(config)


def _check_fit(gill, tokenizer, llm, unet, image_encoder, manifest, source, lm_dims, vision_feature_dim):
    """Raises a clear error when a base model does not fit the learned weights (widths, token ids)."""
    config = gill.config
    ids = tokenizer.convert_tokens_to_ids(manifest.get("img_tokens") or [])
    if manifest.get("img_tokens") and ids != manifest["img_token_ids"]:
        raise ValueError(
            f"The tokenizer gives the [IMG] tokens {manifest['img_tokens']} the ids {ids}, but the learned weights "
            f"{source!r} were saved with {manifest['img_token_ids']}: use the tokenizer saved with them."
        )
    lm_input, lm_hidden, tied = lm_dims(llm)
    if (lm_input, lm_hidden) != (config.lm_input_dim, config.lm_hidden_dim):
        raise ValueError(
            f"The LM ({type(llm).__name__}) has input/hidden widths {lm_input}/{lm_hidden}, but the learned weights "
            f"{source!r} fit {config.lm_input_dim}/{config.lm_hidden_dim}: it is not the LM they were trained with."
        )
    if tied != config.tie_img_embeddings:
        raise ValueError(
            f"The LM ({type(llm).__name__}) has {'tied' if tied else 'untied'} embeddings, but the learned weights "
            f"{source!r} were made for an LM with {'tied' if config.tie_img_embeddings else 'untied'} ones."
        )
    if unet is not None and unet.config.cross_attention_dim != config.cond_dim:
        raise ValueError(
            f"The UNet's cross-attention width is {unet.config.cross_attention_dim}, but the learned weights "
            f"{source!r} map to width {config.cond_dim}: it is not the Stable Diffusion they were trained for."
        )
    if image_encoder is not None and vision_feature_dim(image_encoder) != config.vision_dim:
        raise ValueError(
            f"The vision encoder's feature width is {vision_feature_dim(image_encoder)}, but the learned weights "
            f"{source!r} read width {config.vision_dim}: it is not the vision encoder they were trained with."
        )
