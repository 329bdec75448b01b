"""Call settings of a chat turn: the user's choice, else the built-in model's preset, else the pipeline's defaults.

`gill chat` and `gill demo` read the same table as `gill generate` (`cli.PRESETS`, `cli.CALL_ARGUMENTS`), so the
three commands answer alike for the same model and options.
"""

import torch

from ..cli import CALL_ARGUMENTS, PRESETS, call_defaults

# The settings the web page lets the user change (option names of `cli.CALL_ARGUMENTS`, plus the seed).
PAGE_SETTINGS = ("image_mode", "steps", "guidance_scale", "max_new_tokens")
DEFAULT_SEED = 0


def preset_settings(model: str | None) -> dict:
    """Option name -> value for `model` (a built-in model name, or any other id): its preset over the defaults."""
    preset = PRESETS.get(model or "", {}).get("settings", {})
    return {option: preset.get(option, default) for option, default in call_defaults().items()}


def call_kwargs(settings: dict, seed: int | None = DEFAULT_SEED) -> dict:
    """Option names (`cli.CALL_ARGUMENTS` keys) -> `GILLPipeline.__call__` keyword arguments; a seed becomes a fresh
    CPU generator, so each turn is reproducible on its own."""
    unknown = sorted(set(settings) - set(CALL_ARGUMENTS))
    if unknown:
        raise ValueError(f"`settings` has unknown options {unknown}; known: {sorted(CALL_ARGUMENTS)}.")
    kwargs = {CALL_ARGUMENTS[option]: value for option, value in settings.items()}
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(int(seed))
    return kwargs
