"""`gill evaluate <protocol>`: the GILL paper's evaluations from the command line (see docs/evaluation.md).

Every protocol delegates to its `evaluate_*` function of `gill_pipeline.evaluation`. `--model` is required: the
built-in toy models would be scored on real datasets otherwise. Each protocol reads and checks its data file first
and loads models only after: a malformed file is one line naming the file, the row and the field (exit code 2), not a
traceback after minutes of loading.
"""

import os

from ..bundled.presets import PRESETS
from ..evaluation import (
    LPIPS,
    ImageEmbedder,
    VisionTransformerFeatures,
    evaluate_caption_retrieval,
    evaluate_decision,
    evaluate_text_to_image,
    evaluate_visdial,
    evaluate_vist,
    read_captions,
    read_partiprompts_decisions,
    read_visdial,
    read_vist_stories,
    torchmetrics_lpips,
)
from ..evaluation.records import SUMMARY_JSON, SUMMARY_MARKDOWN
from ..evaluation.vist import select_stories
from ..utils.distributed import current_workers
from .options import (
    add_image_limit_option,
    add_model_options,
    add_subcommand,
    load_model,
    non_negative_float,
    non_negative_int,
    positive_int,
    seed,
)

# Sampling where the user gives none: the paper's (50 DDIM/PNDM steps, guidance 7.5), or the built-in model's.
PAPER_SAMPLING = dict(steps=50, guidance_scale=7.5)
LPIPS_NETS = ("vgg", "alex", "squeeze")


def _sampling(args) -> dict:
    preset = PRESETS.get(args.model, {}).get("settings", {})
    steps = args.steps if args.steps is not None else preset.get("steps", PAPER_SAMPLING["steps"])
    guidance = args.guidance_scale if args.guidance_scale is not None else preset.get("guidance_scale", PAPER_SAMPLING["guidance_scale"])
    return dict(num_inference_steps=steps, guidance_scale=guidance)


def _common(args, dataset) -> dict:
    return dict(limit=args.limit, batch_size=args.batch_size, progress=not args.no_progress, dataset=dataset)


def _images(args) -> dict:
    return dict(image_pattern=args.image_pattern, max_image_pixels=args.max_image_pixels)


def _report(summary: dict, output_dir: str) -> int:
    if not current_workers().is_main:  # worker 0 writes and shows the summary
        return 0
    with open(os.path.join(output_dir, SUMMARY_MARKDOWN), encoding="utf-8") as f:
        print(f.read())
    print(f"Wrote {os.path.join(output_dir, SUMMARY_JSON)}, {SUMMARY_MARKDOWN} and records.jsonl (rerun to resume).")
    return 0


def run_vist(args) -> int:
    args.image_pattern = args.image_pattern or "{id}.jpg"
    stories = read_vist_stories(args.stories, args.images, args.image_pattern)
    select_stories(stories, args.num_captions, args.limit, args.stories)
    clip = ImageEmbedder.from_pretrained(args.clip, args.clip_processor)
    # Two LPIPS, two keys: the published network (`lpips`) and the formula over a CLIP's layers.
    lpips = torchmetrics_lpips(args.lpips_net) if args.lpips_net else None
    lpips_clip_features = None
    if args.lpips_features:
        lpips_clip_features = LPIPS(VisionTransformerFeatures.from_pretrained(args.lpips_features, args.lpips_processor))
    # The pipeline without its progress bar: the evaluation shows one per protocol and system instead.
    summary = evaluate_vist(
        load_model(args), args.stories, args.images, args.output_dir, clip=clip, lpips=lpips,
        lpips_clip_features=lpips_clip_features,
        baseline_text_encoder=args.baseline_text_encoder, num_captions=args.num_captions,
        include_images=not args.no_context_images, seed=args.seed, **_images(args), **_sampling(args),
        **_common(args, stories),
    )
    return _report(summary, args.output_dir)


def run_visdial(args) -> int:
    args.image_pattern = args.image_pattern or "VisualDialog_val2018_{id:012d}.jpg"
    dialogs = read_visdial(args.dialogs, args.images, args.image_pattern)
    summary = evaluate_visdial(
        load_model(args), args.dialogs, args.images, args.output_dir, num_rounds=args.num_rounds,
        caption_template=args.caption_template, round_template=args.round_template, clip_baseline=args.clip,
        **_images(args), **_common(args, dialogs),
    )
    return _report(summary, args.output_dir)


def run_retrieval(args) -> int:
    args.image_pattern = args.image_pattern or "{id}"
    captions = read_captions(args.captions, args.images, args.format, args.image_pattern)
    summary = evaluate_caption_retrieval(
        load_model(args), args.captions, args.images, args.output_dir, data_format=args.format, clip_baseline=args.clip,
        **_images(args), **_common(args, captions),
    )
    return _report(summary, args.output_dir)


def run_decision(args) -> int:
    prompts = read_partiprompts_decisions(args.decisions)
    summary = evaluate_decision(load_model(args), args.decisions, args.output_dir, **_common(args, prompts))
    return _report(summary, args.output_dir)


def run_text_to_image(args) -> int:
    args.image_pattern = args.image_pattern or "{id}"
    captions = read_captions(args.captions, args.images, args.format, args.image_pattern)
    fid = ImageEmbedder.from_pretrained(args.fid_features, args.fid_processor) if args.fid_features else None
    summary = evaluate_text_to_image(
        load_model(args), args.captions, args.images, args.output_dir, data_format=args.format, fid_features=fid,
        clip_scorer=args.clip_score, baseline_text_encoder=args.baseline_text_encoder, seed=args.seed,
        **_images(args), **_sampling(args), **_common(args, captions),
    )
    return _report(summary, args.output_dir)


def _add_protocol(protocols, name: str, summary: str, run, generates: bool):
    """Adds protocol `name` with the options every protocol takes (and those of protocols that generate images)."""
    p = add_subcommand(protocols, name, summary, None, run=run)
    add_model_options(p, required=True)
    p.add_argument("--output-dir", required=True, help="folder for records.jsonl, summary.json/.md (and images); "
                   "rerunning with the same folder resumes")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch (default: %(default)s)")
    p.add_argument("--image-pattern", default=None, help="image file name under --images, with {id} (see docs)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    if name != "decision":
        add_image_limit_option(p)
    if generates:
        p.add_argument("--baseline-text-encoder", default=None, help="folder of the decoder's text encoder and "
                       "tokenizer (a Stable Diffusion folder, or a CLIP text encoder folder): adds the decoder-alone row")
        p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: 50; 20 with the "
                       "shapes-world model)")
        p.add_argument("--guidance-scale", type=non_negative_float, default=None, help="classifier-free guidance "
                       "(default: 7.5; 5.0 with the shapes-world model)")
        p.add_argument("--seed", type=seed, default=0, help="base seed; example i uses seed + i (default: 0)")
    return p


def _add_captions(p, images: str) -> None:
    p.add_argument("--captions", required=True, help="CC3M-style TSV (caption<TAB>image) or COCO captions JSON")
    p.add_argument("--format", choices=("cc3m", "coco"), default="cc3m", help="caption file format (default: cc3m)")
    p.add_argument("--images", required=True, help=images)


def add_parser(subparsers) -> None:
    p = add_subcommand(
        subparsers,
        "evaluate",
        "Run one of the GILL paper's evaluations on data in its original format; JSON + Markdown results.",
        "Run one of the GILL paper's evaluations. Every model a metric needs is given as a local folder; nothing is "
        "downloaded. Results go to --output-dir as records.jsonl (one line per example; a rerun skips done examples), "
        "summary.json and summary.md.",
        verbose=False,  # each protocol takes it
    )
    protocols = p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")

    v = _add_protocol(protocols, "vist", "contextual image generation on VIST stories: CLIP similarity, LPIPS",
                      run_vist, generates=True)
    v.add_argument("--stories", required=True, help="VIST story-in-sequence JSON (e.g. sis/val.story-in-sequence.json)")
    v.add_argument("--images", required=True, help="folder of the VIST images (default name: {id}.jpg)")
    v.add_argument("--clip", required=True, help="CLIP folder (whole or vision tower) for the image-image similarity")
    v.add_argument("--clip-processor", default=None, help="its image processor folder (default: --clip)")
    lpips = v.add_mutually_exclusive_group()
    lpips.add_argument("--lpips-features", default=None, help="CLIP vision folder: LPIPS over its layers (offline)")
    lpips.add_argument("--lpips-net", choices=LPIPS_NETS, default=None, help="the published LPIPS via torchmetrics "
                       "(needs torchvision and its backbone weights in the torch hub cache)")
    v.add_argument("--lpips-processor", default=None, help="image processor folder for --lpips-features")
    v.add_argument("--num-captions", type=positive_int, default=5, help="captions of context (default: 5)")
    v.add_argument("--no-context-images", action="store_true", help="give GILL the captions only")

    d = _add_protocol(protocols, "visdial", "dialogue-conditioned image retrieval on VisDial: recall@1/5/10",
                      run_visdial, generates=False)
    d.add_argument("--dialogs", required=True, help="VisDial v1.0 JSON (e.g. visdial_1.0_val.json)")
    d.add_argument("--images", required=True, help="folder of its images (default name: VisualDialog_val2018_{id:012d}.jpg)")
    d.add_argument("--num-rounds", type=non_negative_int, default=None, help="dialogue rounds given (default: all)")
    d.add_argument("--caption-template", default="{caption}.", help="how the caption is written (default: %(default)r)")
    d.add_argument("--round-template", default=" Q: {question}? A: {answer}.", help="how a round is written "
                   "(default: %(default)r)")
    d.add_argument("--clip", default=None, help="whole CLIP folder: adds the CLIP retrieval row")

    r = _add_protocol(protocols, "retrieval", "text-to-image and image-to-text recall@k on CC3M or COCO captions",
                      run_retrieval, generates=False)
    _add_captions(r, images="folder of the images")
    r.add_argument("--clip", default=None, help="whole CLIP folder: adds the CLIP retrieval row")

    c = _add_protocol(protocols, "decision", "the retrieve-or-generate decision on PartiPrompts decision files",
                      run_decision, generates=False)
    c.add_argument("--decisions", required=True, help="PartiPromptsDecisionsConfident.tsv or PartiPromptsAllDecisions_*.tsv")

    t = _add_protocol(protocols, "text-to-image", "images from captions: FID and CLIP score, GILL vs the decoder",
                      run_text_to_image, generates=True)
    _add_captions(t, images="folder of the real images (FID reference)")
    t.add_argument("--fid-features", default=None, help="CLIP folder whose image features FID compares (CLIP-FID)")
    t.add_argument("--fid-processor", default=None, help="image processor folder for --fid-features")
    t.add_argument("--clip-score", default=None, help="whole CLIP folder for CLIP score")
