"""Loading a decoder checkpoint WITHOUT its text encoders (what GILL inference needs)."""

import inspect

from diffusers import DiffusionPipeline

from .families import DecoderFamily, family_by_name, family_for_pipeline

# Modules GILL never runs. SD's safety checker is not applied to GILL's images here: GILLPipeline post-processes them
# itself and runs only the optional check set with `GILLPipeline.set_safety_checker` (see docs/security.md).
_NEVER_LOADED = ("safety_checker", "feature_extractor", "image_encoder")


def load_decoder(
    pretrained_model_name_or_path, *, family: str | DecoderFamily | None = None, text_encoders: bool = False, **kwargs
) -> DiffusionPipeline:
    """Loads a stock decoder pipeline, by default with every text encoder and tokenizer set to None.

    SD3, Flux and Sana pipelines saved without their text encoders record `[null, null]` entries that a plain
    `from_pretrained(dir)` refuses ("expected [...] but only {...} were passed"); passing the text components as
    None explicitly loads them, and it skips the multi-GB text encoders of a full checkpoint.

    Args:
        pretrained_model_name_or_path: A local folder or Hub repo of a stock pipeline of a supported family.
        family (`str`, *optional*): Family or pipeline class name; read from `model_index.json` when not given.
        text_encoders (`bool`, *optional*, defaults to `False`): Load the text encoders too (to make targets).
        kwargs: Passed to `from_pretrained` (e.g. `torch_dtype`, `variant`).
    """
    if family is None:
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
        family = family_for_pipeline(config["_class_name"])
    elif not isinstance(family, DecoderFamily):
        family = family_by_name(family)
    skipped = {} if text_encoders else {name: None for name in family.text_components}
    init_params = inspect.signature(family.pipeline_class.__init__).parameters
    skipped.update({name: None for name in _NEVER_LOADED if name in init_params})
    skipped.update(kwargs)
    return family.pipeline_class.from_pretrained(pretrained_model_name_or_path, **skipped)


def _hub_kwargs(kwargs):
    keys = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
    return {key: kwargs[key] for key in keys if key in kwargs}
