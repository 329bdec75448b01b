"""`gill evaluate <protocol>`: the GILL paper's evaluations from the command line (see docs/evaluation.md).

Registered by `gill_pipeline.cli`; every protocol delegates to its `evaluate_*` function in this package.
"""

import os

from ..cli import (
    PRESETS,
    SHAPES_MODEL,
    default_model,
    device,
    dtype_name,
    load_pipeline,
    non_negative_float,
    non_negative_int,
    positive_int,
    seed,
)
from .records import SUMMARY_JSON, SUMMARY_MARKDOWN

# Sampling where the user gives none: the paper's (50 DDIM/PNDM steps, guidance 7.5), or the built-in model's.
PAPER_SAMPLING = dict(steps=50, guidance_scale=7.5)
LPIPS_NETS = ("vgg", "alex", "squeeze")


def _sampling(args) -> dict:
    preset = PRESETS.get(args.model or default_model(), {}).get("settings", {})
    steps = args.steps if args.steps is not None else preset.get("steps", PAPER_SAMPLING["steps"])
    guidance = args.guidance_scale if args.guidance_scale is not None else preset.get("guidance_scale", PAPER_SAMPLING["guidance_scale"])
    return dict(num_inference_steps=steps, guidance_scale=guidance)


def _common(args) -> dict:
    return dict(limit=args.limit, batch_size=args.batch_size, progress=not args.no_progress)


def _pipeline(args):
    pipe = load_pipeline(args.model or default_model(), args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)  # the evaluation shows one bar per protocol and system instead
    return pipe


def _report(summary: dict, output_dir: str) -> int:
    with open(os.path.join(output_dir, SUMMARY_MARKDOWN), encoding="utf-8") as f:
        print(f.read())
    print(f"Wrote {os.path.join(output_dir, SUMMARY_JSON)}, {SUMMARY_MARKDOWN} and records.jsonl (rerun to resume).")
    return 0


def run_vist(args) -> int:
    from .clip_features import ImageEmbedder
    from .lpips import LPIPS, VisionTransformerFeatures, torchmetrics_lpips
    from .vist import evaluate_vist

    clip = ImageEmbedder.from_pretrained(args.clip, args.clip_processor)
    lpips = None
    if args.lpips_features:
        lpips = LPIPS(VisionTransformerFeatures.from_pretrained(args.lpips_features, args.lpips_processor))
    elif args.lpips_net:
        lpips = torchmetrics_lpips(args.lpips_net)
    pipe = _pipeline(args)
    summary = evaluate_vist(
        pipe, args.stories, args.images, args.output_dir, clip=clip, lpips=lpips,
        baseline_text_encoder=args.baseline_text_encoder, num_captions=args.num_captions,
        include_images=not args.no_context_images, image_pattern=args.image_pattern or "{id}.jpg", seed=args.seed,
        **_sampling(args), **_common(args),
    )
    return _report(summary, args.output_dir)


def run_visdial(args) -> int:
    from .retrieval_eval import evaluate_visdial

    summary = evaluate_visdial(
        _pipeline(args), args.dialogs, args.images, args.output_dir, num_rounds=args.num_rounds,
        caption_template=args.caption_template, round_template=args.round_template, clip_baseline=args.clip,
        image_pattern=args.image_pattern or "VisualDialog_val2018_{id:012d}.jpg", **_common(args),
    )
    return _report(summary, args.output_dir)


def run_retrieval(args) -> int:
    from .retrieval_eval import evaluate_caption_retrieval

    summary = evaluate_caption_retrieval(
        _pipeline(args), args.captions, args.images, args.output_dir, data_format=args.format, clip_baseline=args.clip,
        image_pattern=args.image_pattern or "{id}", **_common(args),
    )
    return _report(summary, args.output_dir)


def run_decision(args) -> int:
    from .decision import evaluate_decision

    summary = evaluate_decision(_pipeline(args), args.decisions, args.output_dir, **_common(args))
    return _report(summary, args.output_dir)


def run_text_to_image(args) -> int:
    from .clip_features import ImageEmbedder
    from .text_to_image import evaluate_text_to_image

    fid = ImageEmbedder.from_pretrained(args.fid_features, args.fid_processor) if args.fid_features else None
    summary = evaluate_text_to_image(
        _pipeline(args), args.captions, args.images, args.output_dir, data_format=args.format, fid_features=fid,
        clip_scorer=args.clip_score, baseline_text_encoder=args.baseline_text_encoder,
        image_pattern=args.image_pattern or "{id}", seed=args.seed, **_sampling(args), **_common(args),
    )
    return _report(summary, args.output_dir)


def _add_common(p, generates: bool) -> None:
    p.add_argument("--output-dir", required=True, help="folder for records.jsonl, summary.json/.md (and images); "
                   "rerunning with the same folder resumes")
    p.add_argument("--model", default=None, help=f"GILL pipeline folder or Hub id, or {SHAPES_MODEL!r} (default: "
                   f"{default_model()!r})")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch (default: %(default)s)")
    p.add_argument("--device", type=device, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", type=dtype_name, default=None, help="weights dtype (default: as loaded, float32)")
    p.add_argument("--image-pattern", default=None, help="image file name under --images, with {id} (see docs)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' notices")
    if generates:
        p.add_argument("--baseline-text-encoder", default=None, help="folder of the decoder's text encoder and "
                       "tokenizer (a Stable Diffusion folder, or a CLIP text encoder folder): adds the decoder-alone row")
        p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: 50; 20 with the "
                       "shapes-world model)")
        p.add_argument("--guidance-scale", type=non_negative_float, default=None, help="classifier-free guidance "
                       "(default: 7.5; 5.0 with the shapes-world model)")
        p.add_argument("--seed", type=seed, default=0, help="base seed; example i uses seed + i (default: 0)")


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Run one of the GILL paper's evaluations on data in its original format; JSON + Markdown results.",
        description=(
            "Run one of the GILL paper's evaluations. Every model a metric needs is given as a local folder; nothing "
            "is downloaded. Results go to --output-dir as records.jsonl (one line per example; a rerun skips done "
            "examples), summary.json and summary.md."
        ),
    )
    protocols = p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")

    v = protocols.add_parser("vist", help="contextual image generation on VIST stories: CLIP similarity, LPIPS")
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
    _add_common(v, generates=True)
    v.set_defaults(func=run_vist)

    d = protocols.add_parser("visdial", help="dialogue-conditioned image retrieval on VisDial: recall@1/5/10")
    d.add_argument("--dialogs", required=True, help="VisDial v1.0 JSON (e.g. visdial_1.0_val.json)")
    d.add_argument("--images", required=True, help="folder of its images (default name: VisualDialog_val2018_{id:012d}.jpg)")
    d.add_argument("--num-rounds", type=non_negative_int, default=None, help="dialogue rounds given (default: all)")
    d.add_argument("--caption-template", default="{caption}.", help="how the caption is written (default: %(default)r)")
    d.add_argument("--round-template", default=" Q: {question}? A: {answer}.", help="how a round is written "
                   "(default: %(default)r)")
    d.add_argument("--clip", default=None, help="whole CLIP folder: adds the CLIP retrieval row")
    _add_common(d, generates=False)
    d.set_defaults(func=run_visdial)

    r = protocols.add_parser("retrieval", help="text-to-image and image-to-text recall@k on CC3M or COCO captions")
    r.add_argument("--captions", required=True, help="CC3M-style TSV (caption<TAB>image) or COCO captions JSON")
    r.add_argument("--format", choices=("cc3m", "coco"), default="cc3m", help="caption file format (default: cc3m)")
    r.add_argument("--images", required=True, help="folder of the images")
    r.add_argument("--clip", default=None, help="whole CLIP folder: adds the CLIP retrieval row")
    _add_common(r, generates=False)
    r.set_defaults(func=run_retrieval)

    c = protocols.add_parser("decision", help="the retrieve-or-generate decision on PartiPrompts decision files")
    c.add_argument("--decisions", required=True, help="PartiPromptsDecisionsConfident.tsv or PartiPromptsAllDecisions_*.tsv")
    _add_common(c, generates=False)
    c.set_defaults(func=run_decision)

    t = protocols.add_parser("text-to-image", help="images from captions: FID and CLIP score, GILL vs the decoder")
    t.add_argument("--captions", required=True, help="CC3M-style TSV (caption<TAB>image) or COCO captions JSON")
    t.add_argument("--format", choices=("cc3m", "coco"), default="cc3m", help="caption file format (default: cc3m)")
    t.add_argument("--images", required=True, help="folder of the real images (FID reference)")
    t.add_argument("--fid-features", default=None, help="CLIP folder whose image features FID compares (CLIP-FID)")
    t.add_argument("--fid-processor", default=None, help="image processor folder for --fid-features")
    t.add_argument("--clip-score", default=None, help="whole CLIP folder for CLIP score")
    _add_common(t, generates=True)
    t.set_defaults(func=run_text_to_image)

