"""Whether learned weights fit a decoder: the same family and conditioning layout they were trained for, and decoder
modules (denoiser, VAE, scheduler) that fit each other and the family's stock pipeline, all read from configs."""

import math

from diffusers import AutoencoderKL, AutoencoderTiny

from .families import DecoderFamily, family_by_name, family_for_components
from .layout import ConditioningLayout
from .schedulers import is_flow_matching_scheduler, set_timesteps_takes


def check_decoder_fits(layout: ConditioningLayout, components: dict, learned: str) -> None:
    """Raises a `ValueError` naming both sides when the decoder modules in `components` (`unet` or `transformer`,
    plus `vae`/`scheduler`) are not of the family and conditioning layout `layout` that `learned` were trained for.

    Checked from configs only: the family (pipeline class), every width the family ties to a denoiser config entry
    (e.g. SDXL's `cross_attention_dim`, Flux's `joint_attention_dim` and `pooled_projection_dim`), and the guidance
    kind (Flux-dev's guidance embedding against Flux-schnell's none).
    """
    denoisers = {name: value for name, value in components.items() if name in ("unet", "transformer") and value is not None}
    if not denoisers:
        return
    family = family_for_components(denoisers)
    decoder = f"{family.pipeline_class.__name__} ({type(next(iter(denoisers.values()))).__name__})"
    if family.pipeline_class.__name__ != layout.pipeline_class:
        raise ValueError(
            f"The decoder is a {decoder}, but {learned} were trained for {layout.describe()}. Load them onto a "
            f"{layout.pipeline_class} decoder (the base checkpoint they record), or assemble and train new learned "
            f"weights for this decoder."
        )
    denoiser = denoisers[family.denoiser]
    for name, config_key in family.width_checks.items():
        tensor = next((t for t in layout.tensors if t.name == name), None)
        expected = denoiser.config.get(config_key)
        if tensor is None or tensor.width != expected:
            raise ValueError(
                f"The decoder {decoder} has `{config_key}`={expected}, but {learned} produce "
                f"{layout.describe()}: another conditioning layout."
            )
    guidance = family.guidance(denoisers)
    if guidance != layout.guidance:
        raise ValueError(
            f"The decoder {decoder} guides with {guidance!r}, but {learned} were trained for {layout.describe()}: "
            f"another conditioning layout."
        )


def vae_scale_factor(vae, default: int = 8) -> int:
    """Pixels per latent, as the stock pipelines compute it (AutoencoderDC names its widths
    `encoder_block_out_channels`); `default` without a VAE."""
    if vae is None:
        return default
    blocks = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else default


def decoder_size_multiple(family: DecoderFamily, denoiser, vae) -> int:
    """What generated image sides must be a multiple of: one latent patch in pixels (the VAE scale factor times the
    denoiser's `patch_size`, times 2 where Flux packs 2x2 latents), and whatever the stock `check_inputs` asks."""
    patch = denoiser.config.get("patch_size") if denoiser is not None else None
    patch = patch if isinstance(patch, int) and patch > 0 else 1
    return math.lcm(family.size_multiple, vae_scale_factor(vae) * patch * family.latent_packing)


def _describe(value) -> str:
    return "None" if value is None else type(value).__name__


def check_decoder_modules(layout: ConditioningLayout, components: dict, learned: str = "the learned weights") -> None:
    """Every decoder fact checkable from configs, before anything runs: raises a `ValueError` naming the component
    (`unet`/`transformer`, `vae`, `scheduler`), its value and what fits the family of `layout`.

    - the denoiser is the family's, of the widths and guidance `learned` produce (`check_decoder_fits`), and the
      other denoiser slot is empty;
    - the VAE is of the class the stock pipeline takes, its `latent_channels` (times Flux's 2x2 packing) equal the
      denoiser's `in_channels`, and its `shift_factor` is there exactly when the family's decoding adds it;
    - the scheduler is of the family's kind (flow matching or noise prediction, see `decoders/schedulers.py`) and
      its `set_timesteps` takes what the stock pipeline passes (`mu`, `sigmas`).
    Modules that are None are not checked (the pipeline then cannot generate and says so).
    """
    family = family_by_name(layout.pipeline_class)
    other = "transformer" if family.denoiser == "unet" else "unet"
    if components.get(other) is not None:
        raise ValueError(
            f"`{other}` is of class {_describe(components[other])}, but {learned} were trained for a {layout.pipeline_class}, "
            f"whose denoiser is `{family.denoiser}`: set `{other}` to None (and `{family.denoiser}` to a "
            f"{family.denoiser_class.__name__} of that family)."
        )
    denoiser = components.get(family.denoiser)
    if denoiser is not None:
        if not family.matches({family.denoiser: denoiser}):
            described = f"{_describe(denoiser)}"
            try:
                described += f" of a {family_for_components({family.denoiser: denoiser}).pipeline_class.__name__}"
            except ValueError:
                pass
            raise ValueError(
                f"`{family.denoiser}` is of class {described}, but {learned} were trained for a {layout.pipeline_class}: "
                f"pass that family's {family.denoiser_class.__name__} (the base checkpoint they record)."
            )
        try:
            check_decoder_fits(layout, {family.denoiser: denoiser}, learned)
        except ValueError as error:  # the same check as at load; here the component is named too
            raise ValueError(f"`{family.denoiser}` does not fit: {error}") from None
    vae = components.get("vae")
    if vae is not None:
        _check_vae(family, vae, denoiser)
        _check_latent_space(layout, vae, learned)
    scheduler = components.get("scheduler")
    if scheduler is not None:
        _check_scheduler(family, scheduler)


def _check_vae(family: DecoderFamily, vae, denoiser) -> None:
    name = family.pipeline_class.__name__
    expected = family.init_annotation("vae")
    # diffusers documents the tiny autoencoders (TAESD, TAESDXL, TAESD3, TAEF1) as drop-ins for AutoencoderKL.
    accepted = (expected, AutoencoderTiny) if expected is AutoencoderKL else (expected,)
    if not isinstance(vae, accepted):
        raise ValueError(
            f"`vae` is of class {_describe(vae)}, but a {name} decodes with "
            f"{' or '.join(c.__name__ for c in accepted)}: pass the VAE of the decoder's own checkpoint."
        )
    channels = vae.config.get("latent_channels")
    if denoiser is not None:
        in_channels = denoiser.config.get("in_channels")
        packed = family.latent_packing**2
        if channels is None or in_channels != channels * packed:
            rule = f"{packed} x latent_channels (its {family.latent_packing}x{family.latent_packing} packing)" if packed > 1 else "latent_channels"
            raise ValueError(
                f"`vae` ({_describe(vae)}) has latent_channels={channels}, but the {family.denoiser} "
                f"({_describe(denoiser)}) has in_channels={in_channels}; a {name} needs in_channels = {rule}: "
                f"pass the VAE of the decoder's own checkpoint."
            )
    shift = vae.config.get("shift_factor")
    if family.vae_shift_factor and shift is None:
        raise ValueError(
            f"`vae` ({_describe(vae)}) has no `shift_factor`, but a {name} decodes latents as latents / scaling_factor "
            f"+ shift_factor: its VAE is of another family (SD 1.x/2.x, SDXL or PixArt); pass the {name}'s own VAE."
        )
    if not family.vae_shift_factor and shift:
        raise ValueError(
            f"`vae` ({_describe(vae)}) has shift_factor={shift}, but a {name} never adds a shift when decoding: the "
            f"VAE is of a family with shifted latents (SD3 or Flux); pass the {name}'s own VAE."
        )


def _check_latent_space(layout: ConditioningLayout, vae, learned: str) -> None:
    """A VAE of the recorded class must have the recorded scaling and shift: the denoiser was trained in that latent
    space (an SD3 decoder with Flux's VAE has 16 channels too, but another scale and shift). Another class (a tiny
    TAESD-style autoencoder, which decodes scaled latents with `scaling_factor` 1) is judged by `_check_vae` only."""
    recorded = layout.latent_space
    if not recorded or recorded.get("vae_class") != type(vae).__name__:
        return
    for key in ("latent_channels", "scaling_factor", "shift_factor"):
        want, got = recorded.get(key), vae.config.get(key)
        same = want == got or (
            isinstance(want, (int, float)) and isinstance(got, (int, float)) and math.isclose(want, got, rel_tol=1e-6)
        )
        if not same:
            raise ValueError(
                f"`vae` ({type(vae).__name__}) has {key}={got}, but the {layout.pipeline_class} decoder {learned} were "
                f"assembled on encodes with {key}={want} ({recorded}): its denoiser works in that latent space; pass "
                f"the VAE of that checkpoint (or one with the same latent space)."
            )


def _check_scheduler(family: DecoderFamily, scheduler) -> None:
    name, kind = family.pipeline_class.__name__, type(scheduler).__name__
    flow = is_flow_matching_scheduler(scheduler)
    if flow != family.flow_matching:
        wanted = (
            "a flow-matching scheduler (e.g. FlowMatchEulerDiscreteScheduler, or a multistep solver with "
            "`prediction_type='flow_prediction'`/`use_flow_sigmas=True`)"
            if family.flow_matching
            else "a noise-prediction scheduler (one of diffusers' KarrasDiffusionSchedulers, e.g. EulerDiscreteScheduler, "
            "DDIMScheduler, DPMSolverMultistepScheduler, or LCMScheduler)"
        )
        got = "a flow-matching" if flow else "a noise-prediction"
        raise ValueError(
            f"`scheduler` is {got} scheduler ({kind}), but a {name} denoises by "
            f"{'flow matching' if family.flow_matching else 'noise prediction'} and needs {wanted}."
        )
    config = scheduler.config
    if family.scheduler_mu == "always" or (family.scheduler_mu == "dynamic" and config.get("use_dynamic_shifting")):
        if not set_timesteps_takes(scheduler, "mu"):
            raise ValueError(
                f"`scheduler` ({kind}) takes no `mu` in `set_timesteps`, but a {name} passes the resolution-dependent "
                f"shift `mu` on every call; use FlowMatchEulerDiscreteScheduler or another scheduler that takes it."
            )
    elif family.scheduler_mu == "never" and config.get("use_dynamic_shifting"):
        raise ValueError(
            f"`scheduler` ({kind}) has use_dynamic_shifting=True, which needs the shift `mu` from the pipeline, but a "
            f"{name} passes none; configure it with use_dynamic_shifting=False (and a fixed `shift`)."
        )
    passes_sigmas = family.scheduler_sigmas and not config.get("use_flow_sigmas")
    if passes_sigmas and not set_timesteps_takes(scheduler, "sigmas"):
        raise ValueError(
            f"`scheduler` ({kind}) takes no `sigmas` in `set_timesteps`, but a {name} passes its own sigmas on every "
            f"call; use FlowMatchEulerDiscreteScheduler or another scheduler that takes them."
        )
    # Last, the stock pipeline's own `set_timesteps` call, tried on a fresh copy: schedulers have rules of their own
    # about what they are given (DPMSolverMultistepScheduler takes `mu` only with exponential dynamic shifting).
    kwargs = {}
    if family.scheduler_mu == "always" or (family.scheduler_mu == "dynamic" and config.get("use_dynamic_shifting")):
        kwargs["mu"] = 0.5
    steps = _DRY_RUN_STEPS
    if passes_sigmas:
        kwargs["sigmas"], steps = [1.0 - i / _DRY_RUN_STEPS for i in range(_DRY_RUN_STEPS)], None
    try:
        type(scheduler).from_config(config).set_timesteps(steps, **kwargs)
    except Exception as error:  # any library error here is the one the call would raise after the LM
        raise ValueError(
            f"`scheduler` ({kind}) cannot take the timesteps a {name} sets (`set_timesteps({steps}, "
            f"{', '.join(kwargs)})` fails: {type(error).__name__}: {error}); configure it as the family's checkpoints do, "
            f"or use FlowMatchEulerDiscreteScheduler."
        ) from error


_DRY_RUN_STEPS = 4
