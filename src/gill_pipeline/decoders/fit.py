"""Whether learned weights fit a decoder: the same family and conditioning layout they were trained for."""

from .families import family_for_components
from .layout import ConditioningLayout


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
