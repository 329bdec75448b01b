"""Trains GILL on top of the shapes world's base models, with the package's own tools:

1. writes the world's image-caption data (train / validation TSVs; held-out combinations excluded) and, with
   `--context-ratio`, interleaved documents of context chains and image-text-image sequences;
2. assembles a new GILL pipeline from the world's LM, SD folder and CLIP vision tower
   (`GILLPipeline.from_base_models`);
3. trains GILL's learned parts with `training/train_gill.py` (base models frozen);
4. builds a retrieval index over world images with `gill_pipeline.build_retrieval_index`;
5. trains the decision head with `training/train_decision.py` on labels that are real in this world: retrieve when
   the requested shape is one the retrieval set holds (circles and squares), generate otherwise (triangles).

    python -m training.shapes.train_world_gill --base shapes_base --out shapes_gill
    python -m training.shapes.train_world_gill --base /tmp/b --out /tmp/g --scale 0.01   # a few steps (tests)
"""

import argparse
import csv
import json
import logging
import os
import random
import time

import torch

from .dialogue import dialogue_segments, drawing, held_out_signatures, training_conversation
from .models import SIZES
from .world import context_example, context_text, draw, training_scenes

logger = logging.getLogger("shapes.gill")

# Shapes whose images are in the retrieval set: prompts for them are labelled `ret`, the others `gen`.
RETRIEVABLE_SHAPES = ("circle", "square")

# GILL's learned-part sizes for this world (the reference sizes are for a 4096-wide LM).
GILL_SIZES = dict(
    num_img_tokens=4,
    num_visual_tokens=4,
    retrieval_dim=64,
    mapper_hidden_dim=128,
    mapper_encoder_layers=2,
    mapper_decoder_layers=2,
    mapper_heads=4,
)


def write_caption_set(folder: str, name: str, scenes, seed: int) -> str:
    """Draws `scenes` into `folder/images/` and writes `folder/<name>.tsv` (`caption<TAB>image`)."""
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    path = os.path.join(folder, f"{name}.tsv")
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["caption", "image"])
        for i, scene in enumerate(scenes):
            file_name = f"{name}_{i:05d}.png"
            draw(scene, SIZES.image_size, jitter=1, seed=rng.randrange(1 << 30)).save(os.path.join(images, file_name))
            writer.writerow([scene.caption(), file_name])
    return path


CONTEXT_KINDS = ("text", "image", "describe", "image_first", "text_answer", "image_first_answer", "dialogue")


def write_context_documents(
    folder: str, name: str, count: int, seed: int, kinds=("text", "image"), phrasings: str = "world",
    dialogue_reword: float = 0.0, vary_rate: float = 0.0,
) -> str:
    """Interleaved training documents (`training/interleaved.py`) of the world's context chains, written to
    `folder/<name>.jsonl` with their images in `folder/images/`; held-out combinations never appear, and neither do
    held-out phrasings (`phrasings` is "world" or "training", see `world.context_example`).

    Document i is of kind `kinds[i % len(kinds)]`:
    - "text": `[there is <first> . <instruction> :][image of the target]`;
    - "image": `[there is][image of the first (context only)][. <instruction> :][image of the target]`, the form of
      the evaluation's "input image" prompts;
    - "describe": `[image of a scene (context only)][its caption][another drawing of that scene]`, the form of the
      README demo (GILL describes an input image, then answers with an image of it);
    - "image_first": `[image of the first (context only)][<instruction> :][image of the target]`, the form a chat or
      the demo page sends (an uploaded image, then the request).
    - "text_answer", "image_first_answer": as "text" and "image_first", with the answer written out before its image
      (`... <instruction> : <answer caption> .`): GILL writes its answer, then draws it, as a chat turn does. With a
      LoRA adapter on the LM the prose is learnt too, and without these the adapted LM answers a request with `[IMG]`
      only (its text after `:` drifts).
    - "dialogue": a chat of 1-5 turns as `GILLConversation` sends it (`dialogue.dialogue_segments`): the start
      image, then each request followed by its answer (`<caption>` then its image, or `<caption> .` for a question),
      earlier answers' images given back as input images; the last answer's image is the target. Never one of the
      dialogue test set's conversations.
    A kind may be listed more than once to weigh it (e.g. "text,image,describe,text,image_first,describe").
    The target image's caption (its generation target) is the answer's caption, so `[IMG]` states after a context
    learn the answer's SD conditioning.
    """
    from training.interleaved import write_documents

    unknown = set(kinds) - set(CONTEXT_KINDS)
    if unknown or not kinds:
        raise ValueError(f"`kinds` must be a non-empty subset of {CONTEXT_KINDS}, got {kinds!r}")
    if phrasings == "held_out":
        raise ValueError("`phrasings` must not be 'held_out': held-out phrasings stay out of every training stage")
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(seed)
    documents = []
    excluded = held_out_signatures() if "dialogue" in kinds else frozenset()
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "dialogue":
            documents.append(dialogue_document(folder, name, i, rng, excluded, reword_rate=dialogue_reword,
                                               vary_rate=vary_rate))
            continue
        first, instruction, target = context_example(rng, phrasings=phrasings)
        if kind == "describe":
            target = first
        files = [f"{name}_{i:05d}_first.png", f"{name}_{i:05d}_target.png"]
        for scene, file_name, given_image in zip((first, target), files, (True, False)):
            drawing(scene, rng, vary_rate if given_image else 0.0, SIZES.image_size).save(os.path.join(images, file_name))
        answer = {"image": f"images/{files[1]}", "caption": target.caption()}
        given = {"image": f"images/{files[0]}", "caption": first.caption(), "target": False}
        if kind == "text":
            segments = [{"text": context_text(first, instruction)}, answer]
        elif kind == "image":
            segments = [{"text": "there is"}, given, {"text": f". {instruction} :"}, answer]
        elif kind == "image_first":
            segments = [given, {"text": f"{instruction} :"}, answer]
        elif kind == "text_answer":
            segments = [{"text": f"{context_text(first, instruction)} {target.caption()} ."}, answer]
        elif kind == "image_first_answer":
            segments = [given, {"text": f"{instruction} : {target.caption()} ."}, answer]
        else:
            segments = [given, {"text": first.caption()}, answer]
        documents.append({"id": f"{name}-{i}", "segments": segments})
    path = os.path.join(folder, f"{name}.jsonl")
    write_documents(path, documents)
    return path


def check_shares(parser, args, names=("dialogue_reword", "vary_given_images")) -> None:
    """Refuses a share option outside [0, 1] (NaN included), naming it."""
    for name in names:
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")


def dialogue_document(folder: str, name: str, i: int, rng: random.Random, excluded: frozenset,
                      max_turns: int = 5, reword_rate: float = 0.0, vary_rate: float = 0.0) -> dict:
    """One "dialogue" document (see `write_context_documents`), its images drawn into `folder/images/`;
    `reword_rate` of its changes reworded (`dialogue.next_turn`), its start image drawn varied at `vary_rate`."""
    conv = training_conversation(rng, max_turns, excluded, reword_rate)
    scenes = [conv.start] + [turn.target for turn in conv.turns]
    files = []
    for t, scene in enumerate(scenes):
        file_name = f"{name}_{i:05d}_{t}.png"
        if t == 0 or conv.turns[t - 1].wants_image:
            drawing(scene, rng, vary_rate if t == 0 else 0.0, SIZES.image_size).save(os.path.join(folder, "images", file_name))
        files.append(f"images/{file_name}")
    return {"id": f"{name}-{i}", "segments": dialogue_segments(conv, files)}


def write_index_images(folder: str, seed: int) -> int:
    """One image per retrievable training scene, with a caption sidecar (the index builder's folder format)."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    count = 0
    for scene in training_scenes():
        if scene.shape not in RETRIEVABLE_SHAPES:
            continue
        stem = "_".join(scene.key)
        draw(scene, SIZES.image_size, jitter=0, seed=rng.randrange(1 << 30)).save(os.path.join(folder, f"{stem}.png"))
        with open(os.path.join(folder, f"{stem}.txt"), "w", encoding="utf-8") as f:
            f.write(scene.caption())
        count += 1
    return count


def decision_label(scene) -> str:
    """The world's real retrieve-or-generate label: `ret` when the retrieval set holds the shape, else `gen`."""
    return "ret" if scene.shape in RETRIEVABLE_SHAPES else "gen"


def write_decision_tsv(path: str, scenes, extra_rows=()) -> int:
    """PartiPrompts-format TSV (Prompt, Category, Challenge, Note, Decision): one labelled row per scene, then
    `extra_rows` as (prompt, decision) pairs."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["Prompt", "Category", "Challenge", "Note", "Decision"])
        rows = [(scene.caption(), decision_label(scene)) for scene in scenes] + list(extra_rows)
        for prompt, decision in rows:
            writer.writerow([prompt, "Shapes", "Basic", "shapes world", decision])
    return len(rows)


def write_decision_labels(path: str) -> int:
    """The decision head's training labels, over the training scenes."""
    return write_decision_tsv(path, training_scenes())


def assemble(base: str, out: str, seed: int) -> str:
    from diffusers import StableDiffusionPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPModel

    from gill_pipeline import GILLPipeline

    clip = CLIPModel.from_pretrained(os.path.join(base, "clip"))
    vision = clip.vision_model  # a CLIPVisionModel: its pooled output is what GILL reads
    sd = StableDiffusionPipeline.from_pretrained(
        os.path.join(base, "sd"), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe = GILLPipeline.from_base_models(
        language_model=AutoModelForCausalLM.from_pretrained(os.path.join(base, "lm")),
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(base, "lm")),
        stable_diffusion=sd,
        image_encoder=vision,
        feature_extractor=CLIPImageProcessor.from_pretrained(os.path.join(base, "clip")),
        seed=seed,
        **GILL_SIZES,
    )
    folder = os.path.join(out, "assembled")
    pipe.save_pretrained(folder)
    return folder


def precompute_stores(args, assembled: str, data: str, train_tsv: str, val_tsv: str, context_args: list) -> list:
    """SD text-encoder targets and CLIP image features of every training image, once, in float32 (the values
    `train_gill.py` would compute at every step: its frozen encoders are the assembled pipeline's and the world's
    SD). -> train_gill.py's `--*-targets` arguments."""
    from training.precompute import main as precompute

    stores = os.path.join(args.out, "targets")
    common = ["--stable-diffusion", os.path.join(args.base, "sd"), "--image-features", "--image-encoder", assembled,
              "--dtype", "float32", "--device", "cpu"]
    sets = [("train", train_tsv, "tsv", os.path.join(data, "images")), ("val", val_tsv, "tsv", os.path.join(data, "images"))]
    if context_args:
        sets.append(("interleaved", context_args[context_args.index("--interleaved-data") + 1], "interleaved", data))
    out = []
    for name, path, data_type, images in sets:
        folder = os.path.join(stores, name)
        precompute(["--data", path, "--data-type", data_type, "--image-folder", images, "--output", folder, *common])
        out += [f"--{name}-targets", folder]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="folder written by training.shapes.pretrain_base")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies steps and data sizes (tests: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--context-ratio", type=float, default=0.0,
        help="fraction of GILL's micro-batches drawn from context-chain documents (0: caption pairs only, as the "
        "bundled model was trained)",
    )
    parser.add_argument("--steps", type=int, default=1500, help="GILL's training steps, before --scale")
    parser.add_argument("--batch-size", type=int, default=64, help="GILL's micro-batch (pairs or documents)")
    parser.add_argument("--caption-weight", type=float, default=1.0, help="train_gill.py --caption-weight")
    parser.add_argument(
        "--context-prefix-grad", default="true", choices=("true", "false"),
        help="train_gill.py --interleaved-context-prefix-grad (false: only captioning trains the visual prefix)",
    )
    parser.add_argument(
        "--document-retrieval-weight", type=float, default=1.0,
        help="train_gill.py --interleaved-retrieval-weight (0: retrieval learns from caption pairs only)",
    )
    parser.add_argument(
        "--cache-images", type=int, default=16384,
        help="train_gill.py --cache-images: the world's images are decoded once, then kept in memory (0: off)",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=0,
        help="train_gill.py --lora-rank: a LoRA adapter of this rank on the LM's linear layers trains too (0: LM frozen)",
    )
    parser.add_argument(
        "--precompute", default="true", choices=("true", "false"),
        help="compute the frozen encoders' outputs (SD text-encoder targets, CLIP image features) once with "
        "training/precompute.py instead of at every step (same values; false: on the fly)",
    )
    parser.add_argument(
        "--context-kinds", default="text,image",
        help=f"comma-separated kinds of context documents, from {CONTEXT_KINDS} (see write_context_documents)",
    )
    parser.add_argument(
        "--context-phrasings", default="world", choices=("world", "training"),
        help="instruction wordings of the context documents (world.TRAINING_PHRASINGS; held-out ones never)",
    )
    parser.add_argument(
        "--dialogue-reword", type=float, default=0.0,
        help="share of the dialogue documents' changes worded as filler words + the value words (dialogue.next_turn)",
    )
    parser.add_argument(
        "--vary-given-images", type=float, default=0.0,
        help="share of the context documents' given (input) images drawn varied: size, position and background "
        "(dialogue.draw_varied; a narrower variation than the off-grid test's)",
    )
    args = parser.parse_args(argv)
    check_shares(parser, args)
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be 0 (no adapter) or a positive rank, got {args.lora_rank}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    n = lambda x: max(8, int(x * args.scale))  # noqa: E731
    report, start = {}, time.time()

    # 1. Data (held-out combinations never appear)
    rng = random.Random(args.seed)
    pool = training_scenes()
    data = os.path.join(args.out, "data")
    train_tsv = write_caption_set(data, "train", [rng.choice(pool) for _ in range(n(4000))], args.seed + 1)
    val_tsv = write_caption_set(data, "val", [rng.choice(pool) for _ in range(n(256))], args.seed + 2)
    context_args = []
    if args.context_ratio > 0:
        documents = write_context_documents(
            data, "context", n(4000), args.seed + 4, tuple(args.context_kinds.split(",")), args.context_phrasings,
            dialogue_reword=args.dialogue_reword, vary_rate=args.vary_given_images,
        )
        context_args = ["--interleaved-data", documents, "--interleaved-ratio", str(args.context_ratio),
                        # a five-turn dialogue document (six images, five requests and answers) fits whole
                        "--interleaved-max-length", "112" if "dialogue" in args.context_kinds else "64",
                        "--interleaved-retrieval-weight", str(args.document_retrieval_weight),
                        "--interleaved-context-prefix-grad", args.context_prefix_grad]

    # 2. A new, untrained GILL on the world's frozen base models
    assembled = assemble(args.base, args.out, args.seed)

    # 3. GILL's learned parts, with the package's training script; the frozen encoders' outputs computed once
    from training.train_gill import main as train_gill

    target_args = precompute_stores(args, assembled, data, train_tsv, val_tsv, context_args) if args.precompute == "true" else []
    run_dir = os.path.join(args.out, "run")
    steps = max(4, int(args.steps * args.scale))
    metrics = train_gill(
        [
            "--pipeline", assembled,
            "--stable-diffusion", os.path.join(args.base, "sd"),
            "--train-data", train_tsv,
            "--image-folder", os.path.join(data, "images"),
            "--val-data", val_tsv,
            "--val-image-folder", os.path.join(data, "images"),
            "--max-length", "24",
            "--num-workers", "0",
            "--cache-images", str(args.cache_images),
            "--val-max-samples", "256",
            "--lr", "1e-3",
            "--warmup-steps", str(max(1, steps // 15)),
            "--decay-every", str(max(2, int(steps * 0.7))),
            "--decay-gamma", "0.1",
            "--batch-size", str(min(args.batch_size, n(args.batch_size))),
            "--max-steps", str(steps),
            "--output-dir", run_dir,
            "--seed", str(args.seed),
            "--mixed-precision", "no",
            "--log-every", str(max(1, steps // 20)),
            "--val-every", "0",
            "--checkpoint-every", str(max(2, steps // 3)),
            "--report-to", "tensorboard",
            "--export-pipeline", "true",
            "--progress-bar", "false",
            "--caption-weight", str(args.caption_weight),
            *context_args,
            *target_args,
            *(["--lora", "true", "--lora-rank", str(args.lora_rank), "--lora-alpha", str(2.0 * args.lora_rank)]
              if args.lora_rank > 0 else []),
        ]
    )
    report["train_gill"] = metrics
    pipeline_dir = os.path.join(run_dir, "pipeline")

    # 4. The retrieval index over world images (circles and squares)
    from gill_pipeline import GILLPipeline, build_retrieval_index

    index_images = os.path.join(args.out, "index_images")
    report["index_images"] = write_index_images(index_images, args.seed + 3)
    pipe = GILLPipeline.from_pretrained(pipeline_dir)
    build_retrieval_index(pipe, index_images, output_dir=os.path.join(args.out, "index"))

    # 5. The decision head
    from training.train_decision import main as train_decision

    labels = os.path.join(data, "decisions.tsv")
    write_decision_labels(labels)
    report["decision"] = train_decision(
        ["--pipeline", pipeline_dir, "--data", labels, "--steps", str(max(4, int(1000 * args.scale))),
         "--val-fraction", "0.3", "--seed", str(args.seed)]
    )
    report["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(args.out, "train_world_gill.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    logger.info("GILL on the shapes world: %s", json.dumps(report, default=str)[:2000])
    return report


if __name__ == "__main__":
    main()
