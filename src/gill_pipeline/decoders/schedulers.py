"""Which kind of denoising a scheduler does, read from diffusers itself rather than from a list of class names.

A flow-matching denoiser (SD3, Flux, Sana) predicts a velocity and its stock pipeline never scales latents by
`init_noise_sigma`; a noise-prediction denoiser (SD 1.x/2.x, SDXL, PixArt) needs a scheduler that does. diffusers
says which is which in three places, all read here: the flow-matching scheduler classes (`FlowMatch...`, and the
classes that list one of them in `_compatibles`), and the multistep solvers configured for flow
(`prediction_type="flow_prediction"` or `use_flow_sigmas=True`, as Sana's `DPMSolverMultistepScheduler` is).
"""

import enum
import inspect

FLOW_PREDICTION = "flow_prediction"


def _is_flow_class(cls) -> bool:
    names = [cls.__name__, *getattr(cls, "_compatibles", [])]
    return any(str(name).startswith(("FlowMatch", "FlowMap")) for name in names)


def is_flow_matching_scheduler(scheduler) -> bool:
    """Whether `scheduler` (an instance, a class, or an enum of scheduler class names such as diffusers'
    `KarrasDiffusionSchedulers`, which are all noise-prediction schedulers) denoises by flow matching."""
    if isinstance(scheduler, type) and issubclass(scheduler, enum.Enum):
        return False
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    if _is_flow_class(cls):
        return True
    config = getattr(scheduler, "config", None) if not isinstance(scheduler, type) else None
    if config is None:
        return False
    return config.get("prediction_type") == FLOW_PREDICTION or bool(config.get("use_flow_sigmas"))


def set_timesteps_takes(scheduler, name: str) -> bool:
    """Whether the scheduler's `set_timesteps` accepts the keyword `name` (e.g. `sigmas`, `mu`)."""
    parameters = inspect.signature(scheduler.set_timesteps).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
