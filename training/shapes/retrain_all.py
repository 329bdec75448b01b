"""Retrains the whole shapes world from scratch and rewrites the package's bundled default:

1. base models (CLIP, VAE, UNet = a real SD pipeline, causal LM, attribute classifier);
2. GILL on top (caption pairs mixed with context documents, assembly, `training/train_gill.py`, retrieval index,
   `training/train_decision.py`);
3. the bundle (fp16 pipeline + retrieval set with its calibrated similarity floor + classifier + the world's CLIP)
   in src/gill_pipeline/bundled/;
4. the figures (benchmarks/results/shapes_world.md).

    python -m training.shapes.retrain_all --work shapes_work          # everything (see docs/shapes_world.md)
    python -m training.shapes.retrain_all --work /tmp/w --scale 0.002 --bundle-out /tmp/w/bundle   # smoke run
"""

import argparse
import json
import logging
import os
import time

from gill_pipeline.bundled import BUNDLED_ROOT

logger = logging.getLogger("shapes.retrain")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="working folder for base models, data and runs")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies steps and data sizes (smoke runs: small)")
    parser.add_argument("--bundle-out", default=BUNDLED_ROOT, help="where the bundle goes (default: the package's)")
    parser.add_argument("--results", default=None, help="results path without extension (default: benchmarks/results)")
    parser.add_argument("--skip-base", action="store_true", help="reuse the base models already in --work/base")
    parser.add_argument("--threads", type=int, default=2)
    # The defaults are the recipe of the bundled model (docs/shapes_world.md, "Context training").
    parser.add_argument("--context-ratio", type=float, default=0.5,
                        help="GILL's share of context-chain documents (train_world_gill.py; 0: caption pairs only)")
    parser.add_argument("--context-kinds", default="text,image,describe,text,dialogue,describe,dialogue,text_answer,dialogue",
                        help="train_world_gill.py --context-kinds (a kind listed twice is drawn twice as often)")
    parser.add_argument("--gill-steps", type=int, default=3000, help="train_world_gill.py --steps")
    parser.add_argument("--gill-batch-size", type=int, default=64, help="train_world_gill.py --batch-size")
    parser.add_argument("--caption-weight", type=float, default=2.0, help="train_world_gill.py --caption-weight")
    parser.add_argument("--document-retrieval-weight", type=float, default=1.0,
                        help="train_world_gill.py --document-retrieval-weight")
    parser.add_argument("--context-prefix-grad", default="true", choices=("true", "false"),
                        help="train_world_gill.py --context-prefix-grad")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (base models, GILL's data and init)")
    parser.add_argument("--gill-seed", type=int, default=None, help="train_world_gill.py --seed (default: --seed)")
    parser.add_argument("--lora-rank", type=int, default=8,
                        help="train_world_gill.py --lora-rank: a LoRA adapter on the LM trains with GILL (0: LM frozen)")
    parser.add_argument("--clip-vision-rounds", type=int, default=2, help="pretrain_base.py --clip-vision-rounds")
    parser.add_argument("--phrasings", default="training", choices=("world", "training"),
                        help="instruction wordings in the LM's corpus and GILL's context documents (world.py)")
    parser.add_argument("--dialogue-corpus", type=int, default=8000,
                        help="pretrain_base.py --dialogue-corpus: chat transcripts in the LM's corpus, chat words in its "
                        "vocabulary (0: neither)")
    parser.add_argument("--dialogue-reword", type=float, default=0.3,
                        help="train_world_gill.py --dialogue-reword (share of dialogue changes reworded)")
    parser.add_argument("--vary-given-images", type=float, default=0.3,
                        help="train_world_gill.py --vary-given-images (share of given images drawn varied)")
    parser.add_argument("--vary-clip-images", type=float, default=0.5,
                        help="pretrain_base.py --vary-clip-images (share of CLIP vision refinement images drawn varied)")
    args = parser.parse_args(argv)
    from .train_world_gill import check_shares

    check_shares(parser, args, ("dialogue_reword", "vary_given_images", "vary_clip_images"))  # before the base models train, not 25 minutes in
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from . import bundle, evaluate_world, pretrain_base, train_world_gill

    base, gill = os.path.join(args.work, "base"), os.path.join(args.work, "gill")
    times, start = {}, time.time()
    threads = ["--threads", str(args.threads)]
    small = args.scale < 1.0
    if not args.skip_base:
        t = time.time()
        pretrain_base.main(["--out", base, "--scale", str(args.scale), *threads, "--seed", str(args.seed), "--phrasings", args.phrasings,
                            "--clip-vision-rounds", str(args.clip_vision_rounds), "--vary-clip-images", str(args.vary_clip_images),
                            "--dialogue-corpus", str(int(args.dialogue_corpus * min(1.0, args.scale * 20)))]
                           + (["--batch-scale", str(max(args.scale * 20, 0.05))] if small else []))
        times["base_models"] = round(time.time() - t, 1)
    t = time.time()
    train_world_gill.main(["--base", base, "--out", gill, "--scale", str(args.scale), *threads,
                           "--context-ratio", str(args.context_ratio), "--context-kinds", args.context_kinds,
                           "--context-phrasings", args.phrasings, "--steps", str(args.gill_steps), "--batch-size", str(args.gill_batch_size), "--seed", str(args.seed if args.gill_seed is None else args.gill_seed),
                           "--context-prefix-grad", args.context_prefix_grad,
                           "--caption-weight", str(args.caption_weight),
                           "--document-retrieval-weight", str(args.document_retrieval_weight),
                           "--lora-rank", str(args.lora_rank), "--dialogue-reword", str(args.dialogue_reword),
                           "--vary-given-images", str(args.vary_given_images)])
    times["gill"] = round(time.time() - t, 1)
    t = time.time()
    bundled = bundle.main(["--pipeline", os.path.join(gill, "run", "pipeline"), "--index-images",
                           os.path.join(gill, "index_images"), "--classifier", os.path.join(base, "classifier"),
                           "--clip", os.path.join(base, "clip"),
                           "--out", args.bundle_out])
    times["bundle"] = round(time.time() - t, 1)
    t = time.time()
    eval_args = ["--base", base, "--pipeline", os.path.join(args.bundle_out, "shapes_pipeline"),
                 "--index", os.path.join(args.bundle_out, "shapes_index"), *threads]
    if args.results:
        eval_args += ["--out", args.results]
    if small:
        eval_args += ["--scale", "0.03"]
    evaluate_world.main(eval_args)
    times["evaluation"] = round(time.time() - t, 1)
    times["total"] = round(time.time() - start, 1)
    summary = {"seconds": times, **bundled}
    with open(os.path.join(args.work, "retrain_all.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("Retrained the shapes world: %s", summary)
    return summary


if __name__ == "__main__":
    main()
