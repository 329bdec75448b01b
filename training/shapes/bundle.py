"""Writes the trained shapes-world GILL as the package's embedded default: the pipeline in fp16 plus its retrieval
set (index shards and images), small enough to live in the repository.

    python -m training.shapes.bundle --pipeline shapes_gill/run/pipeline --index-images shapes_gill/index_images

The retrieval index is built AFTER the fp16 round trip, from the pipeline exactly as users will load it, so the
index's fingerprint matches the shipped weights; its similarity floor (`min_similarity`, see calibrate.py) is
calibrated on those weights too.
"""

import argparse
import json
import logging
import os
import shutil

import torch

from gill_pipeline.bundled import (
    BUNDLED_CLASSIFIER,
    BUNDLED_CLIP,
    BUNDLED_EXAMPLE_IMAGE,
    BUNDLED_INDEX,
    BUNDLED_PIPELINE,
    BUNDLED_ROOT,
)

from .calibrate import similarity_floor
from .models import SIZES
from .train_world_gill import RETRIEVABLE_SHAPES
from .world import Scene, draw

EXAMPLE_SCENE = Scene("circle", "red", "left", "small")

logger = logging.getLogger("shapes.bundle")
MAX_BUNDLE_BYTES = 25 * 1024 * 1024


def scrub_local_paths(folder: str) -> None:
    """Drops the paths of the machine that trained it from the bundle: `_name_or_path` entries of JSON configs, a LoRA
    adapter's `base_model_name_or_path` (informational: the pipeline applies the adapter to its own `llm/`), and the
    boilerplate model card peft writes beside an adapter (it names the same path)."""
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            if name == "README.md" and os.path.isfile(os.path.join(directory, "adapter_config.json")):
                os.remove(path)
                continue
            if not name.endswith(".json"):
                continue
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict):
                continue
            changed = "_name_or_path" in config
            config.pop("_name_or_path", None)
            if config.get("base_model_name_or_path"):
                config["base_model_name_or_path"] = None
                changed = True
            if changed:
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
                    f.write("\n")


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="the trained pipeline folder (train_world_gill's run/pipeline)")
    parser.add_argument("--index-images", required=True, help="folder of retrieval images with caption sidecars")
    parser.add_argument("--classifier", required=True, help="the world's attribute classifier folder (for tests)")
    parser.add_argument(
        "--clip", default=None, help="the world's whole CLIP folder, bundled for `gill evaluate` (baseline, metrics)"
    )
    parser.add_argument("--out", default=BUNDLED_ROOT, help="bundle folder (default: the package's bundled/)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the calibration queries' drawings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from gill_pipeline import GILLPipeline, build_retrieval_index

    pipeline_dir = os.path.join(args.out, os.path.basename(BUNDLED_PIPELINE))
    index_dir = os.path.join(args.out, os.path.basename(BUNDLED_INDEX))
    classifier_dir = os.path.join(args.out, os.path.basename(BUNDLED_CLASSIFIER))
    clip_dir = os.path.join(args.out, os.path.basename(BUNDLED_CLIP))
    for folder in (pipeline_dir, index_dir, classifier_dir, clip_dir):
        if os.path.isdir(folder):
            shutil.rmtree(folder)

    pipe = GILLPipeline.from_pretrained(args.pipeline)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(pipeline_dir)
    scrub_local_paths(pipeline_dir)

    shipped = GILLPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    shutil.copytree(args.index_images, index_dir)
    index = build_retrieval_index(shipped, index_dir, output_dir=index_dir, dtype=torch.float16)
    calibration = similarity_floor(shipped, index, RETRIEVABLE_SHAPES, seed=args.seed)
    index.min_similarity = calibration["min_similarity"]
    index.save_pretrained(index_dir)
    logger.info("Retrieval set's similarity floor: %s", calibration)
    shutil.copytree(args.classifier, classifier_dir)
    if args.clip is not None:
        shutil.copytree(args.clip, clip_dir)
        scrub_local_paths(clip_dir)
    draw(EXAMPLE_SCENE, SIZES.image_size, jitter=0, seed=0).save(
        os.path.join(args.out, os.path.basename(BUNDLED_EXAMPLE_IMAGE))
    )

    size = folder_bytes(args.out)
    logger.info("Bundle written to %s: %.1f MB", args.out, size / 2**20)
    if size > MAX_BUNDLE_BYTES:
        raise RuntimeError(f"The bundle is {size / 2**20:.1f} MB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MB limit.")
    return {"bundle_mb": round(size / 2**20, 2), "retrieval_floor": calibration}


if __name__ == "__main__":
    main()
