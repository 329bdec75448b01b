"""Tiny GILL pipelines and decoders with RANDOM weights, built offline from configs, for tests, examples and
benchmarks (as `diffusers.utils.testing_utils` serves diffusers' tests). Nothing downloads; every builder seeds
itself, so two calls give equal weights.

    from gill_pipeline.testing import build_tiny_gill_pipeline, build_tiny_decoder
    pipe = build_tiny_gill_pipeline("opt")      # OPT-shaped LM, tiny Stable Diffusion, CLIP vision encoder
    flux = build_tiny_decoder("flux-dev")       # any decoder family GILL drives

- `tiny.py`: tokenizer, LMs (`LM_TYPES`), Stable Diffusion, vision encoder, whole GILL pipelines.
- `tiny_decoders.py`: one tiny pipeline per decoder family (`TINY_DECODER_BUILDERS`) and GILL over each.
"""

from .tiny import (
    LM_TYPES,
    SCHEDULERS,
    TINY_GILL_SIZES,
    assemble_tiny_gill_pipeline,
    build_tiny_clip_text_encoder,
    build_tiny_clip_tokenizer,
    build_tiny_gill_pipeline,
    build_tiny_lm,
    build_tiny_stable_diffusion,
    build_tiny_tokenizer,
    build_tiny_vision_encoder,
)
from .tiny_decoders import (
    TINY_CLIP_LENGTH,
    TINY_DECODER_BUILDERS,
    build_tiny_decoder,
    build_tiny_gemma_tokenizer,
    build_tiny_gill_pipeline_with_decoder,
    build_tiny_t5_tokenizer,
)

__all__ = [
    "LM_TYPES",
    "SCHEDULERS",
    "TINY_CLIP_LENGTH",
    "TINY_DECODER_BUILDERS",
    "TINY_GILL_SIZES",
    "assemble_tiny_gill_pipeline",
    "build_tiny_clip_text_encoder",
    "build_tiny_clip_tokenizer",
    "build_tiny_decoder",
    "build_tiny_gemma_tokenizer",
    "build_tiny_gill_pipeline",
    "build_tiny_gill_pipeline_with_decoder",
    "build_tiny_lm",
    "build_tiny_stable_diffusion",
    "build_tiny_t5_tokenizer",
    "build_tiny_tokenizer",
    "build_tiny_vision_encoder",
]
