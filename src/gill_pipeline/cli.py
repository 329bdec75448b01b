"""The `gill` command line: `gill generate`, `gill convert-original`, `gill push`, `gill chat`, `gill demo` (see
docs/cli.md; docs/demo.md for chat and demo).

Subcommands register themselves in `SUBCOMMANDS`; user errors print one line and exit with code 2.
"""

import argparse
import inspect
import logging
import math
import os
import sys

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from .constants import IMAGE_MODES
from .serialization.folder import DTYPE_NAMES, resolve_dtype
from .serialization.paths import looks_like_local_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHAPES_MODEL = "shapes-world"
RANDOM_MODEL = "tiny-random"
# Built-in models: the prompt used when no items are given, and call settings used where the user gave none.
PRESETS = {
    # Trained by this project on the shapes world (src/gill_pipeline/bundled/; docs/shapes_world.md).
    SHAPES_MODEL: dict(
        # An image of the world in; GILL describes it (the world's captions are 7 words), then answers with an image:
        # retrieved and generated ("both"); the decision head, overruled by the retrieval set's similarity floor,
        # picks the one shown. A mild [IMG0] boost (2) lets the [IMG] group come right after the description, and
        # 8 new tokens stop the answer there.
        prompt=["@example-image"],
        settings=dict(
            max_new_tokens=8, min_text_tokens=0, img_logit_scale=2.0, max_images=1, image_mode="both", steps=20,
            guidance_scale=5.0,
        ),
    ),
    # Random weights: the random LM would rarely pick [IMG0] itself, so an image is made likely after a few words.
    RANDOM_MODEL: dict(
        prompt=["This is my dog.", "@example-image", "Show me what he would look like in the snow."],
        settings=dict(min_text_tokens=4, img_logit_scale=100.0, max_images=1),
    ),
}
# CLI option -> `GILLPipeline.__call__` argument; options left unset take the built-in model's preset, else the
# pipeline's own default (read from its signature, so the help text cannot drift from it).
CALL_ARGUMENTS = dict(
    max_new_tokens="max_new_tokens", min_text_tokens="min_text_tokens", img_logit_scale="img_logit_scale",
    max_images="max_images", image_mode="image_mode", steps="num_inference_steps", guidance_scale="guidance_scale",
)


def call_defaults() -> dict:
    """The pipeline's defaults for the options of `CALL_ARGUMENTS`."""
    from .pipeline import GILLPipeline

    parameters = inspect.signature(GILLPipeline.__call__).parameters
    return {option: parameters[name].default for option, name in CALL_ARGUMENTS.items()}


def default_model() -> str:
    from .bundled import bundle_available

    return SHAPES_MODEL if bundle_available() else RANDOM_MODEL

logger = logging.getLogger("gill_pipeline.cli")


class CLIError(Exception):
    """An error in plain words for the user of the command line; `prog` is the (sub)command it concerns."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a [`CLIError`]: one line on stderr and exit code 2, like every other error
    (argparse's own `error` prints the whole usage first)."""

    def error(self, message):
        raise CLIError(message, prog=self.prog)


# ----------------------------------------------------------------------------------------------------------------
# Argument types: a bad value is named by argparse ("argument --steps: ...") with our reason.
# ----------------------------------------------------------------------------------------------------------------
def _number(text: str, kind, what: str, check) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _number(text, int, "a non-negative integer", lambda v: v >= 0)


def seed(text: str) -> int:
    return _number(text, int, "an integer seed in [0, 2**63)", lambda v: 0 <= v < 2**63)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive finite number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a non-negative finite number", lambda v: v >= 0)


def probability(text: str) -> float:
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def dtype_name(text: str) -> str:
    try:
        resolve_dtype(text, "--dtype")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def device(text: str) -> str:
    """A torch device this machine has (checked before any model is loaded)."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cpu":
        return text
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    module = backend.get(parsed.type)
    if module is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device to run on here (use cpu, cuda, mps or xpu)")
    if not module.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: {parsed.type} is not available on this machine (use --device cpu)")
    count = getattr(module, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {parsed.type} device(s)")
    return text


def quiet_libraries(verbose: bool) -> None:
    """diffusers' and transformers' notices and loading bars concern library developers, not the CLI user; errors
    still show. The denoising progress bar stays."""
    if verbose:
        return
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def parse_interleaved_items(items: list[str], model: str = RANDOM_MODEL) -> list:
    """Command-line items -> interleaved input: paths of existing image files become images, the rest text."""
    from PIL import Image

    inputs = []
    for item in items:
        if item == "@example-image":
            inputs.append(example_image(model))
        elif item.lower().endswith(IMAGE_EXTENSIONS):
            if not os.path.isfile(item):
                raise CLIError(f"image file not found: {item}")
            try:
                with Image.open(item) as image:
                    inputs.append(image.convert("RGB"))
            except OSError as error:
                raise CLIError(f"cannot read image {item}: {error}") from error
        else:
            inputs.append(item)
    return inputs


def example_image(model: str = RANDOM_MODEL):
    """The default example's input image: a picture of the shapes world for the bundled model, else a small drawn
    'dog' (a brown blob on grass). No file is needed."""
    from PIL import Image, ImageDraw

    if model == SHAPES_MODEL:
        from .bundled import BUNDLED_EXAMPLE_IMAGE

        with Image.open(BUNDLED_EXAMPLE_IMAGE) as image:
            return image.convert("RGB")

    image = Image.new("RGB", (64, 64), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 44, 63, 63], fill=(70, 150, 60))
    draw.ellipse([16, 26, 44, 46], fill=(120, 80, 40))
    draw.ellipse([38, 20, 52, 34], fill=(120, 80, 40))
    return image


def load_pipeline(model: str, device: str, dtype: str | None):
    from .pipeline import GILLPipeline

    torch_dtype = resolve_dtype(dtype, "--dtype")
    if model == SHAPES_MODEL:
        from .bundled import load_bundled_pipeline

        logger.warning(
            "Using the embedded default: GILL trained by this project on the SHAPES WORLD (tiny models of coloured "
            "shapes; see docs/shapes_world.md). Pass --model PATH_OR_HUB_ID for another GILL pipeline."
        )
        try:
            pipe = load_bundled_pipeline()
        except FileNotFoundError as error:
            raise CLIError(str(error)) from error
    elif model == RANDOM_MODEL:
        from .testing import build_tiny_gill_pipeline

        logger.warning(
            "Using the embedded default: a TINY GILL PIPELINE WITH RANDOM WEIGHTS, built locally from configs. Its "
            "text and images are meaningless; pass --model PATH_OR_HUB_ID for a trained GILL pipeline."
        )
        pipe = build_tiny_gill_pipeline("opt")
    else:
        try:
            pipe = GILLPipeline.from_pretrained(model, dtype=torch_dtype)
        except OSError as error:
            raise CLIError(f"cannot load the GILL pipeline {model!r}: {error}") from error
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    return pipe.to(device)


def write_answer(answer: list, output_dir: str, prompt: list) -> list[str]:
    """Writes each image as PNG, the text as `answer.txt` and the conversation as `answer.md`; returns the paths."""
    from .pipeline import GILLImage

    os.makedirs(output_dir, exist_ok=True)
    written, text_parts, md = [], [], ["# GILL conversation", "", "## Input", ""]
    for i, element in enumerate(prompt):
        if isinstance(element, str):
            md.append(element)
        else:
            path = os.path.join(output_dir, f"input_{i}.png")
            element.save(path)
            written.append(path)
            md.append(f"![input image {i}](input_{i}.png)")
        md.append("")
    md += ["## Answer", ""]
    image_index = 0
    for element in answer:
        if isinstance(element, GILLImage):
            name = f"image_{image_index}_{element.source}.png"
            element.image.save(os.path.join(output_dir, name))
            written.append(os.path.join(output_dir, name))
            probs = element.decision_probs
            text_parts.append(f"[image {image_index}: {name}]")
            md.append(f"![{element.source} image {image_index}]({name})")
            if probs is not None:
                md.append(f"*{element.source}; decision p(generate)={probs[0]:.3f}, p(retrieve)={probs[1]:.3f}*")
            for alt in getattr(element, "alternatives", None) or []:
                alt_name = f"image_{image_index}_{alt.source}_alternative.png"
                alt.image.save(os.path.join(output_dir, alt_name))
                written.append(os.path.join(output_dir, alt_name))
                md.append(f"![{alt.source} alternative {image_index}]({alt_name})")
            image_index += 1
        else:
            text_parts.append(element)
            md.append(element)
        md.append("")
    for name, content in (("answer.txt", " ".join(text_parts) + "\n"), ("answer.md", "\n".join(md))):
        path = os.path.join(output_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        written.append(path)
    return written


def run_generate(args) -> int:
    model = args.model or default_model()
    preset = PRESETS.get(model, {})
    items = args.items or preset.get("prompt") or PRESETS[RANDOM_MODEL]["prompt"]
    prompt = parse_interleaved_items(items, model)
    if args.retrieval_index and looks_like_local_path(args.retrieval_index) and not os.path.isdir(args.retrieval_index):
        raise CLIError(f"--retrieval-index: no such folder: {args.retrieval_index}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise CLIError(f"--output-dir: {args.output_dir} exists and is not a folder")
    # Settings: the user's, else the built-in model's, else the pipeline's defaults.
    settings = {
        name: getattr(args, name) if getattr(args, name) is not None else preset.get("settings", {}).get(name, default)
        for name, default in call_defaults().items()
    }
    pipe = load_pipeline(model, args.device, args.dtype)
    if args.retrieval_index:
        pipe.load_retrieval_index(args.retrieval_index, allow_urls=args.allow_urls)
    output = pipe(
        prompt,
        max_new_tokens=settings["max_new_tokens"],
        do_sample=args.top_p < 1.0 or args.temperature != 1.0,
        temperature=args.temperature,
        top_p=args.top_p,
        min_text_tokens=settings["min_text_tokens"],
        img_logit_scale=settings["img_logit_scale"],
        max_images=settings["max_images"],
        image_mode=settings["image_mode"],
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance_scale"],
        generator=torch.Generator().manual_seed(args.seed),
    )
    paths = write_answer(output.outputs[0], args.output_dir, prompt)
    print(f"Answer: {output.texts[0]!r} with {len(output.gill_images[0])} image(s)")
    print("Wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


def _default_help(option: str, defaults: dict) -> str:
    """'(default: X with the built-in shapes-world model, ..., Y otherwise)': the values a run really uses."""
    general = defaults[option]
    general_text = "no limit" if general is None else general
    special = [
        f"{preset['settings'][option]} with {name!r}"
        for name, preset in PRESETS.items()
        if preset["settings"].get(option, general) != general
    ]
    if not special:
        return f"(default: {general_text})"
    return f"(default: {', '.join(special)}; {general_text} with other models)"


def add_generate_parser(subparsers) -> None:
    defaults = call_defaults()
    bundled = default_model() == SHAPES_MODEL
    p = subparsers.add_parser(
        "generate",
        help="Answer an interleaved prompt of text and images; writes text, PNGs and a Markdown page.",
        description=(
            "Answer an interleaved prompt. Each ITEM is text, or the path of an image file (.png, .jpg, ...). "
            + (
                f"Without --model, uses the bundled GILL trained on the shapes world ({SHAPES_MODEL!r}, offline); "
                if bundled
                else f"Without --model, uses {RANDOM_MODEL!r} (the bundled shapes-world model is not installed); "
            )
            + f"--model {RANDOM_MODEL} gives a tiny pipeline with RANDOM weights. Options left unset take the "
            "built-in model's settings, else the pipeline's defaults."
        ),
    )
    items_default = (
        f"an example picture of the shapes world with the bundled {SHAPES_MODEL} model; a drawn dog and two "
        "sentences with other models"
        if bundled
        else "a drawn dog and two sentences"
    )
    p.add_argument("items", nargs="*", help=f"text segments and image paths, in order (default: {items_default})")
    p.add_argument(
        "--model",
        default=None,
        help=f"pipeline folder or Hub repo id, or {SHAPES_MODEL!r} or {RANDOM_MODEL!r} (default: {default_model()!r})",
    )
    p.add_argument("--output-dir", default="gill_outputs", help="where to write the answer (default: %(default)s)")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=None,
        help="most tokens to produce " + _default_help("max_new_tokens", defaults),
    )
    p.add_argument(
        "--temperature", type=positive_float, default=1.0,
        help="sampling temperature (default: 1.0; with --top-p 1 too, decoding is greedy)",
    )
    p.add_argument(
        "--top-p", type=probability, default=1.0,
        help="nucleus sampling threshold (default: 1.0; with --temperature 1 too, decoding is greedy)",
    )
    p.add_argument(
        "--min-text-tokens", type=non_negative_int, default=None,
        help="text tokens before an image is allowed " + _default_help("min_text_tokens", defaults),
    )
    p.add_argument(
        "--img-logit-scale", type=positive_float, default=None,
        help="makes images more likely when above 1 " + _default_help("img_logit_scale", defaults),
    )
    p.add_argument(
        "--max-images", type=non_negative_int, default=None,
        help="most images in the answer " + _default_help("max_images", defaults),
    )
    p.add_argument(
        "--image-mode",
        default=None,
        choices=list(IMAGE_MODES),
        help="let the decision head choose, always generate / retrieve, or make both "
        + _default_help("image_mode", defaults),
    )
    p.add_argument(
        "--retrieval-index",
        default=None,
        help="retrieval index folder or Hub repo id to retrieve images from (see docs/retrieval.md)",
    )
    p.add_argument("--allow-urls", action="store_true", help="let the retrieval index download images from URLs")
    p.add_argument(
        "--steps", type=positive_int, default=None, help="denoising steps " + _default_help("steps", defaults)
    )
    p.add_argument(
        "--guidance-scale", type=non_negative_float, default=None,
        help="classifier-free guidance " + _default_help("guidance_scale", defaults),
    )
    p.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--device", type=device, default="cpu",
        help="torch device to run on, checked to exist here: cpu, cuda, cuda:1, mps (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", type=dtype_name, default=None,
        help=f"weights dtype, one of {sorted(DTYPE_NAMES)} (default: the dtype the model is loaded in, float32)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also show the libraries' notices and loading progress bars"
    )
    p.set_defaults(func=run_generate)


# ----------------------------------------------------------------------------------------------------------------
# gill convert-original
# ----------------------------------------------------------------------------------------------------------------
def run_convert_original(args) -> int:
    from .serialization.convert_original import (
        REFERENCE_ARGS_FILE,
        REFERENCE_CHECKPOINT_FILE,
        REFERENCE_DECISION_FILE,
        convert_original_to_folder,
    )

    release = args.release_dir
    if release is not None and not os.path.isdir(release):
        raise CLIError(f"--release-dir {release!r} is not a folder")
    model_args = args.model_args or (release and os.path.join(release, REFERENCE_ARGS_FILE))
    checkpoint = args.checkpoint or (release and os.path.join(release, REFERENCE_CHECKPOINT_FILE))
    decision = args.decision_model
    if decision is None and release and os.path.isfile(os.path.join(release, REFERENCE_DECISION_FILE)):
        decision = os.path.join(release, REFERENCE_DECISION_FILE)
    if not model_args or not checkpoint:
        raise CLIError("give --release-dir, or both --model-args and --checkpoint")
    for flag, path in (("--model-args", model_args), ("--checkpoint", checkpoint), ("--decision-model", decision)):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{flag}: file not found: {path}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise CLIError(f"--output-dir: {args.output_dir} exists and is not a folder")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise CLIError(f"--output-dir {args.output_dir!r} is not empty (pass --overwrite to write into it anyway)")
    if decision is None:
        logger.warning("No decision model: the converted decision head (generate or retrieve) stays random.")
    load_kwargs = {k: v for k, v in (("cache_dir", args.cache_dir), ("token", args.token), ("revision", args.revision)) if v}
    if args.local_files_only:
        load_kwargs["local_files_only"] = True
    convert_original_to_folder(
        args.output_dir,
        model_args,
        checkpoint,
        decision,
        learned_weights_only=args.learned_weights_only,
        language_model=args.language_model,
        stable_diffusion=args.stable_diffusion,
        image_encoder=args.image_encoder,
        mapper_heads=args.mapper_heads,
        dtype=resolve_dtype(args.dtype, "--dtype"),
        **load_kwargs,
    )
    what = "learned weights" if args.learned_weights_only else "pipeline"
    print(f"Converted the reference GILL release into a {what} folder: {args.output_dir}")
    print(f"Load it with GILLPipeline.from_pretrained({args.output_dir!r}); share it with `gill push`.")
    return 0


def add_convert_original_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-original",
        help="Convert the reference GILL release (kohjingyu/gill) into a pipeline or learned-weights folder.",
        description=(
            "Convert the reference GILL release (model_args.json, pretrained_ckpt.pth.tar, decision_model.pth.tar) "
            "into this package's format. Pickled files are read with torch.load(weights_only=True) only. The base "
            "models (LM, Stable Diffusion, CLIP) are loaded once to check that they fit; by default they are those "
            "of the release (model_args.json names the LM and vision encoder)."
        ),
    )
    p.add_argument("--release-dir", help="folder holding the release files under their original names")
    p.add_argument("--model-args", help="path of model_args.json (default: in --release-dir)")
    p.add_argument("--checkpoint", help="path of pretrained_ckpt.pth.tar (default: in --release-dir)")
    p.add_argument("--decision-model", help="path of decision_model.pth.tar (default: in --release-dir, if there)")
    p.add_argument("--output-dir", required=True, help="folder to write the converted weights to")
    p.add_argument(
        "--learned-weights-only",
        action="store_true",
        help="write only the learned weights (MBs) and the record of the base models, not a whole pipeline",
    )
    p.add_argument("--language-model", help="LM Hub id or folder (default: `opt_version` of model_args.json)")
    p.add_argument(
        "--stable-diffusion", help="Stable Diffusion Hub id or folder (default: stable-diffusion-v1-5, as the release)"
    )
    p.add_argument("--image-encoder", help="CLIP vision Hub id or folder (default: `visual_encoder` of model_args.json)")
    p.add_argument("--revision", help="revision of the base models on the Hub (default: main)")
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: the standard cache)")
    p.add_argument("--token", help="Hugging Face token for gated or private base models")
    p.add_argument("--local-files-only", action="store_true", help="do not download; use the cache only")
    p.add_argument(
        "--dtype", type=dtype_name, help=f"dtype of the saved weights, one of {sorted(DTYPE_NAMES)} (default: float32)"
    )
    p.add_argument(
        "--mapper-heads", type=positive_int, default=4, help="attention heads of the mapper (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")
    p.set_defaults(func=run_convert_original)


# ----------------------------------------------------------------------------------------------------------------
# gill push
# ----------------------------------------------------------------------------------------------------------------
def _parse_metrics(items: list[str]) -> dict[str, float]:
    metrics = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            metrics[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise CLIError(f"--metric must look like NAME=NUMBER, got {item!r}")
    return metrics


def run_push(args) -> int:
    from .constants import MODEL_CARD_FILE
    from .serialization.hub import push_folder_to_hub
    from .serialization.learned_weights import is_learned_weights_folder
    from .serialization.model_card import ModelCardInfo, write_model_card

    folder = args.folder
    if not os.path.isdir(folder):
        raise CLIError(f"folder not found: {folder}")
    info = ModelCardInfo(
        datasets=args.dataset or [], metrics=_parse_metrics(args.metric or []), license=args.license,
        metrics_source=args.metrics_source,
    )
    card_given = bool(info.to_dict())
    push_kwargs = dict(
        token=args.token,
        private=args.private or None,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        revision=args.branch,
        delete_remote_files=args.delete_remote_files,
        overwrite_model_card=args.overwrite_model_card,
    )
    learned = is_learned_weights_folder(folder)
    if args.learned_weights_only and not learned:
        # A whole pipeline folder: load it and push only its learned parts.
        from .pipeline import GILLPipeline

        pipe = GILLPipeline.from_pretrained(folder)
        url = pipe.push_learned_weights(args.repo_id, card_info=info, **push_kwargs)
    else:
        from .serialization.folder import validate_pipeline_folder

        if not learned:
            validate_pipeline_folder(folder)
        has_card = os.path.isfile(os.path.join(folder, MODEL_CARD_FILE))
        if card_given or not has_card:
            path = write_model_card(folder, repo_id=args.repo_id, info=info)
            print(f"Wrote the model card {path}")
        url = push_folder_to_hub(folder, args.repo_id, **push_kwargs)
    what = "learned weights" if args.learned_weights_only or learned else "pipeline"
    print(f"Pushed the GILL {what} to {args.repo_id}: {url}")
    return 0


def add_push_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="Upload a GILL pipeline folder, or only its learned weights, to a Hugging Face Hub repo.",
        description=(
            "Upload a saved GILL pipeline folder or learned-weights folder to a Hub repo (created if needed), with "
            "a model card. With --learned-weights-only, a whole pipeline folder is loaded and only its learned "
            "weights (MBs) and the record of its base models are pushed. Log in first (`hf auth login`) or pass "
            "--token."
        ),
    )
    p.add_argument("folder", help="a folder written by save_pretrained, save_learned_weights or convert-original")
    p.add_argument("repo_id", help="the Hub repo to push to, e.g. your-name/gill-opt")
    p.add_argument("--learned-weights-only", action="store_true", help="push only the learned weights")
    p.add_argument("--token", help="Hugging Face token with write access (default: the logged-in token)")
    p.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    p.add_argument("--branch", help="branch to push to (default: main)")
    p.add_argument("--commit-message", help="commit message (default: a generic one)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    remote = p.add_mutually_exclusive_group()
    remote.add_argument(
        "--delete-remote-files",
        action="store_true",
        help="delete the repo files that are not in the folder (each is named first; default: they are kept)",
    )
    remote.add_argument("--keep-existing-files", action="store_true", help="the default now; kept for old scripts")
    p.add_argument(
        "--overwrite-model-card",
        action="store_true",
        help="replace the repo's README.md with the folder's card (default: a card already on the Hub is kept)",
    )
    p.add_argument("--dataset", action="append", help="training dataset (Hub id) for the model card; repeatable")
    p.add_argument("--metric", action="append", help="NAME=VALUE for the model card's metrics; repeatable")
    p.add_argument("--metrics-source", help="where the metrics come from, for the model card")
    p.add_argument("--license", help="license id for the model card, e.g. apache-2.0 or other")
    p.set_defaults(func=run_push)


def add_evaluate_parser(subparsers) -> None:
    # `gill evaluate` lives with the evaluation code, which imports this module's helpers: imported when needed.
    from .evaluation.command import add_evaluate_parser as add

    add(subparsers)


# ----------------------------------------------------------------------------------------------------------------
# gill chat, gill demo: defined beside the terminal chat and the web page (imported only when the parser is built)
# ----------------------------------------------------------------------------------------------------------------
def add_chat_parser(subparsers) -> None:
    from .chat_cli import add_chat_parser as add

    add(subparsers)


def add_demo_parser(subparsers) -> None:
    from .demo.launch import add_demo_parser as add

    add(subparsers)


# Each entry adds one subcommand to the parser; other modules append to it.
SUBCOMMANDS = [
    add_generate_parser, add_convert_original_parser, add_push_parser, add_evaluate_parser, add_chat_parser,
    add_demo_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gill", description="GILL: interleaved images and text with a causal LM.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    # Library messages may span lines (transformers' hints); the CLI promises one line per error.
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand. Every user error (bad argument, path, number, model, device, refused file) prints one
    line `gill <command>: error: ...` on stderr and returns 2; `--help` returns 0."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
    except CLIError as error:
        print(f"{error.prog or 'gill'}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    quiet_libraries(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"gill {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
