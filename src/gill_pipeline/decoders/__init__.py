"""The decoder layer: any stock diffusers text-to-image pipeline fed GILL's precomputed conditioning.

- [`ConditioningLayout`]: what a decoder takes instead of a prompt, read from the decoder itself.
- [`encode_conditioning`] / [`default_negative_conditioning`]: targets and stored negatives, from the family's own
  `encode_prompt`.
- [`run_decoder`]: images from conditioning through the family's stock pipeline, no text encoder needed.
- [`conditioning_mse`]: the generation loss against those targets, masks respected.
"""

from .conditioning import default_negative_conditioning, encode_conditioning, encode_settings, read_conditioning_layout
from .families import (
    DECODER_FAMILIES,
    SUPPORTED_PIPELINE_CLASSES,
    DecoderFamily,
    family_by_name,
    family_for_components,
    family_for_pipeline,
)
from .fit import check_decoder_fits
from .layout import ConditioningLayout, ConditioningTensor
from .loading import load_decoder
from .loss import conditioning_mse
from .run import build_decoder_pipeline, run_decoder

__all__ = [
    "ConditioningLayout",
    "ConditioningTensor",
    "DECODER_FAMILIES",
    "DecoderFamily",
    "SUPPORTED_PIPELINE_CLASSES",
    "build_decoder_pipeline",
    "check_decoder_fits",
    "conditioning_mse",
    "default_negative_conditioning",
    "encode_conditioning",
    "encode_settings",
    "family_by_name",
    "family_for_components",
    "family_for_pipeline",
    "load_decoder",
    "read_conditioning_layout",
    "run_decoder",
]
