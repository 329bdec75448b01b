"""The embedded default: a GILL pipeline trained by this project on the shapes world, with its retrieval set.

Every part is small and real: a CLIP, VAE, UNet and causal LM pretrained from scratch on synthetic images of shapes
(`training/shapes/`), and GILL's learned parts trained on top with `training/train_gill.py`. It needs no download.
`load_bundled_pipeline()` returns it with its retrieval index loaded, or raises if the bundle is not present.
Its name for the `gill` commands and its call settings are in `presets.py`.
"""

import os

BUNDLED_ROOT = os.path.dirname(os.path.abspath(__file__))
BUNDLED_PIPELINE = os.path.join(BUNDLED_ROOT, "shapes_pipeline")
BUNDLED_INDEX = os.path.join(BUNDLED_ROOT, "shapes_index")
# The world's attribute classifier (a judge for tests and evaluation; loaded by training/shapes/classifier.py).
BUNDLED_CLASSIFIER = os.path.join(BUNDLED_ROOT, "shapes_classifier")
# The world's whole CLIP with its tokenizer and image processor, for `gill evaluate` (GILL itself does not read it
# whole): its text tower is the SD text encoder the UNet was trained with (the decoder-alone baseline's
# `--baseline-text-encoder`), and both towers give CLIP similarity, CLIP score and the CLIP retrieval baseline.
BUNDLED_CLIP = os.path.join(BUNDLED_ROOT, "shapes_clip")
# The input image of the README's example: a small red circle on the left.
BUNDLED_EXAMPLE_IMAGE = os.path.join(BUNDLED_ROOT, "example_input.png")


def bundle_available() -> bool:
    return os.path.isfile(os.path.join(BUNDLED_PIPELINE, "model_index.json"))


def load_bundled_pipeline(with_index: bool = True):
    """The shapes-world GILL pipeline (float32, CPU), with its retrieval index loaded when `with_index`."""
    import torch

    from ..pipeline import GILLPipeline

    if not bundle_available():
        raise FileNotFoundError(
            f"The bundled shapes-world pipeline is missing from {BUNDLED_PIPELINE}; retrain it with "
            "`python -m training.shapes.retrain_all` (see docs/shapes_world.md)."
        )
    pipe = GILLPipeline.from_pretrained(BUNDLED_PIPELINE, dtype=torch.float32)
    if with_index and os.path.isdir(BUNDLED_INDEX):
        pipe.load_retrieval_index(BUNDLED_INDEX)
    return pipe
