"""The GILL paper's evaluations as a library (and as `gill evaluate`; see docs/evaluation.md).

Each protocol reads data in its original dataset's format, runs GILL and its baseline, appends one record per
example to `records.jsonl` (a rerun skips what is done) and writes `summary.json` and `summary.md`:
- `evaluate_vist`: contextual image generation on VIST stories (CLIP similarity, LPIPS; decoder baseline);
- `evaluate_visdial`: dialogue-conditioned image retrieval on VisDial (recall@1/5/10; CLIP baseline);
- `evaluate_caption_retrieval`: text-to-image and image-to-text recall@k on CC3M or COCO captions;
- `evaluate_decision`: the retrieve-or-generate decision on the PartiPrompts decision files;
- `evaluate_text_to_image`: FID and CLIP score of generated images (decoder baseline).
Every model a metric needs (a CLIP, an LPIPS or FID feature network, the baseline's text encoder) is passed in.
"""

from .clip_features import CLIPTextImageScorer, ImageEmbedder
from .datasets import (
    read_captions,
    read_cc3m_captions,
    read_coco_captions,
    read_partiprompts_decisions,
    read_visdial,
    read_vist_stories,
)
from .decision import evaluate_decision
from .lpips import LPIPS, VisionTransformerFeatures, load_lpips_linear_weights, torchmetrics_lpips
from .metrics import clip_score, cosine_similarity, decision_report, frechet_distance, rank_of_first_match, recall_at_k
from .retrieval_eval import evaluate_caption_retrieval, evaluate_visdial
from .systems import CLIPRetrievalBaseline, DecoderBaseline, GILLSystem
from .text_to_image import evaluate_text_to_image
from .vist import evaluate_vist

__all__ = [
    "evaluate_vist",
    "evaluate_visdial",
    "evaluate_caption_retrieval",
    "evaluate_decision",
    "evaluate_text_to_image",
    "GILLSystem",
    "DecoderBaseline",
    "CLIPRetrievalBaseline",
    "ImageEmbedder",
    "CLIPTextImageScorer",
    "LPIPS",
    "VisionTransformerFeatures",
    "load_lpips_linear_weights",
    "torchmetrics_lpips",
    "recall_at_k",
    "rank_of_first_match",
    "decision_report",
    "cosine_similarity",
    "frechet_distance",
    "clip_score",
    "read_vist_stories",
    "read_visdial",
    "read_cc3m_captions",
    "read_coco_captions",
    "read_captions",
    "read_partiprompts_decisions",
]
