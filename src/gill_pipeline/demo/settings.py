"""Call settings of an answer: the user's choice, else the built-in model's preset, else the pipeline's defaults.

One vocabulary of settings (`CALL_ARGUMENTS`: option name -> `GILLPipeline.__call__` argument) is shared by the web
page, `gill generate`, `gill chat` and `gill demo`, so they answer alike for the same model and settings. It lives with
the page's settings, not in `pipeline/`: the option names (`steps` for `num_inference_steps`) are those of the
surfaces, and the pipeline knows nothing of them. The presets' values are the bundled models'
(`gill_pipeline.bundled.presets`).
"""

import inspect

from ..bundled.presets import PRESETS
from ..pipeline import GILLPipeline
from ..pipeline.inputs import seeded_generator

# Option name -> `GILLPipeline.__call__` argument. Options left unset take the built-in model's preset, else the
# pipeline's own default (read from its signature, so help texts cannot drift from it).
CALL_ARGUMENTS = dict(
    max_new_tokens="max_new_tokens", min_text_tokens="min_text_tokens", img_logit_scale="img_logit_scale",
    max_images="max_images", image_mode="image_mode", steps="num_inference_steps", guidance_scale="guidance_scale",
)
# The settings the web page lets the user change (option names of `CALL_ARGUMENTS`, plus the seed).
PAGE_SETTINGS = ("image_mode", "steps", "guidance_scale", "max_new_tokens")
DEFAULT_SEED = 0


def call_defaults() -> dict:
    """The pipeline's defaults for the options of `CALL_ARGUMENTS`."""
    parameters = inspect.signature(GILLPipeline.__call__).parameters
    return {option: parameters[name].default for option, name in CALL_ARGUMENTS.items()}


def preset_settings(model: str | None) -> dict:
    """Option name -> value for `model` (a built-in model name, or any other id): its preset over the defaults."""
    preset = PRESETS.get(model or "", {}).get("settings", {})
    return {option: preset.get(option, default) for option, default in call_defaults().items()}


def call_kwargs(settings: dict, seed: int | None = DEFAULT_SEED) -> dict:
    """Option names (`CALL_ARGUMENTS` keys) -> `GILLPipeline.__call__` keyword arguments; a seed becomes a fresh CPU
    generator, so each turn is reproducible on its own."""
    if not isinstance(settings, dict):
        raise TypeError(f"`settings` must be a dict of option name -> value, got {type(settings).__name__} {settings!r:.100}.")
    unknown = sorted(set(settings) - set(CALL_ARGUMENTS))
    if unknown:
        raise ValueError(f"`settings` has unknown options {unknown}; known: {sorted(CALL_ARGUMENTS)}.")
    kwargs = {CALL_ARGUMENTS[option]: value for option, value in settings.items()}
    if seed is not None:
        kwargs["generator"] = seeded_generator(seed, "seed")
    return kwargs
