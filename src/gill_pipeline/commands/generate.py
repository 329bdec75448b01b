"""`gill generate`: answer one interleaved prompt; write the text, the images as PNG and a Markdown page.

`gill generate --prompts FILE` answers every prompt of a file (one per line, or JSON Lines), each into
`line-NNNNNN/` named by its line number, resumably; under `accelerate launch --num_processes N -m gill_pipeline
generate --prompts FILE ...` N workers split the prompts and the outputs are those of one process.
"""

import hashlib
import json
import logging
import os

from ..bundled.presets import PRESETS, RANDOM_MODEL, SHAPES_MODEL
from ..demo.settings import call_kwargs, preset_settings
from ..pipeline import GILLImage
from ..utils.distributed import atomic_write_text, current_workers
from .options import (
    CLIError,
    add_image_limit_option,
    add_model_options,
    add_retrieval_options,
    add_subcommand,
    add_turn_options,
    check_output_dir,
    default_model,
    is_image_path,
    load_model,
    model_name,
    parse_interleaved_items,
    positive_float,
    probability,
    settings_from_args,
)

logger = logging.getLogger("gill_pipeline.commands")


def write_answer(answer: list, output_dir: str, prompt: list) -> list[str]:
    """Writes each image as PNG, the text as `answer.txt` and the conversation as `answer.md`; returns the paths."""
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
    # answer.md last and whole (renamed in): `--prompts` takes it as the sign that the answer is complete.
    for name, content in (("answer.txt", " ".join(text_parts) + "\n"), ("answer.md", "\n".join(md))):
        path = os.path.join(output_dir, name)
        atomic_write_text(path, content)
        written.append(path)
    return written


# Bulk generation: the manifest that makes an output folder this run's, the done marker of one answer (written last
# by `write_answer`), the answers of the whole file in order.
BULK_MANIFEST = "prompts_run.json"
ANSWER_DONE_FILE = "answer.md"
BULK_ANSWERS = "answers.jsonl"
LINE_DIR_TEMPLATE = "line-{:06d}"


def check_image_header(path: str, max_pixels: int) -> None:
    """Raises a ValueError unless `path` is an image whose header can be read and whose size is within `max_pixels`
    (the pixels are not decoded: a bulk run checks every image of its file before the model loads)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    if width * height > max_pixels:
        raise ValueError(f"the image {path} is {width}x{height} pixels ({width * height:,}), above the limit of "
                         f"{max_pixels:,} (--max-image-pixels)")


def read_prompts_file(path: str, max_pixels: int | None = None) -> list[tuple[int, list[str]]]:
    """`(line number, items)` for every prompt of `path`: a `.jsonl` file holds one JSON value per line (a string, a
    list of items (text, or image paths relative to the file's folder), or `{"prompt": one of those}`); any other
    file one text prompt per line. Blank lines are skipped (the numbers stay those of the file). With `max_pixels`,
    every image's header is read and its size checked now, before any model loads."""
    if not os.path.isfile(path):
        raise CLIError(f"--prompts: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as error:
        raise CLIError(f"--prompts: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    folder = os.path.dirname(os.path.abspath(path))
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.lower().endswith(".jsonl"):
            prompts.append((n, [line.strip()]))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise CLIError(f"--prompts: {path}, line {n}: not JSON ({error.msg})") from None
        if isinstance(value, dict):
            value = value.get("prompt")
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
            raise CLIError(f"--prompts: {path}, line {n}: expected a string, a non-empty list of strings, or "
                           f'{{"prompt": ...}}, got {line.strip()[:80]!r}')
        resolved = []
        for item in items:
            if is_image_path(item):
                item = item if os.path.isabs(item) else os.path.join(folder, item)
                if not os.path.isfile(item):
                    raise CLIError(f"--prompts: {path}, line {n}: image file not found: {item}")
                if max_pixels is not None:
                    try:
                        check_image_header(item, max_pixels)
                    except ValueError as error:
                        raise CLIError(f"--prompts: {path}, line {n}: {error}") from None
            resolved.append(item)
        prompts.append((n, resolved))
    if not prompts:
        raise CLIError(f"--prompts: {path} holds no prompt")
    return prompts


def _check_bulk_output_dir(output_dir: str, manifest: dict) -> None:
    """The folder must be new or empty, or hold this file's earlier run with the same settings (then it resumes):
    a bulk run never writes over files it did not make."""
    check_output_dir(output_dir)
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if not entries:
        return
    path = os.path.join(output_dir, BULK_MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict):
        raise CLIError(f"--output-dir: {output_dir} is not empty and holds no earlier run of --prompts "
                       f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); pass a new or empty folder")
    changed = sorted(k for k in set(before) | set(manifest) if before.get(k) != manifest.get(k))
    if changed:
        raise CLIError(f"--output-dir: {output_dir} holds a run of other prompts or settings (differs in: "
                       f"{', '.join(changed)}); pass a new or empty folder")


def run_bulk(args, model: str, settings: dict) -> int:
    """`gill generate --prompts FILE`: every prompt into `line-NNNNNN/`, done ones skipped, split among workers."""
    workers = current_workers()
    prompts = read_prompts_file(args.prompts, args.max_image_pixels)
    with open(args.prompts, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    manifest = dict(
        prompts_file=os.path.abspath(args.prompts), prompts_sha256=digest, model=model, settings=settings,
        seed=args.seed, temperature=args.temperature, top_p=args.top_p, retrieval_index=args.retrieval_index,
        dtype=args.dtype, quantize=args.quantize,
    )
    _check_bulk_output_dir(args.output_dir, manifest)

    def done(n):
        return os.path.isfile(os.path.join(args.output_dir, LINE_DIR_TEMPLATE.format(n), ANSWER_DONE_FILE))

    todo = [(n, items) for n, items in prompts if not done(n)]
    # Every worker has read the same folder before any writes to it.
    workers.barrier()
    if workers.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(args.output_dir, BULK_MANIFEST), json.dumps(manifest, indent=2) + "\n")
    mine = [todo[i] for i in workers.share(len(todo))]
    if mine:
        pipe = load_model(args)
        for n, items in mine:
            prompt = parse_interleaved_items(items, model, args.max_image_pixels)
            output = pipe(
                prompt, do_sample=args.top_p < 1.0 or args.temperature != 1.0, temperature=args.temperature,
                top_p=args.top_p, **call_kwargs(settings, seed=args.seed),
            )
            write_answer(output.outputs[0], os.path.join(args.output_dir, LINE_DIR_TEMPLATE.format(n)), prompt)
            logger.info(f"line {n}: {output.texts[0]!r}")
    workers.barrier()
    if not workers.is_main:
        return 0
    rows = []
    for n, items in prompts:
        folder = LINE_DIR_TEMPLATE.format(n)
        with open(os.path.join(args.output_dir, folder, "answer.txt"), encoding="utf-8") as f:
            rows.append(json.dumps({"line": n, "prompt": items, "answer": f.read().rstrip("\n"), "folder": folder}))
    atomic_write_text(os.path.join(args.output_dir, BULK_ANSWERS), "\n".join(rows) + "\n")
    print(f"Answered {len(prompts)} prompts ({len(prompts) - len(todo)} done before) with {workers.world_size} "
          f"worker(s): {os.path.join(args.output_dir, BULK_ANSWERS)}")
    return 0


def run_generate(args) -> int:
    model = model_name(args)
    if args.prompts is not None:
        if args.items:
            raise CLIError(f"--prompts: give the prompts in the file or as ITEMs, not both (got ITEMs {args.items[:3]})")
        return run_bulk(args, model, {**preset_settings(model), **settings_from_args(args)})
    items = args.items or PRESETS.get(model, PRESETS[RANDOM_MODEL])["prompt"]
    prompt = parse_interleaved_items(items, model, args.max_image_pixels)
    check_output_dir(args.output_dir)
    # Settings: the user's, else the built-in model's, else the pipeline's defaults.
    settings = {**preset_settings(model), **settings_from_args(args)}
    pipe = load_model(args, progress_bar=True)
    output = pipe(
        prompt,
        do_sample=args.top_p < 1.0 or args.temperature != 1.0,
        temperature=args.temperature,
        top_p=args.top_p,
        **call_kwargs(settings, seed=args.seed),
    )
    paths = write_answer(output.outputs[0], args.output_dir, prompt)
    print(f"Answer: {output.texts[0]!r} with {len(output.gill_images[0])} image(s)")
    print("Wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


def add_parser(subparsers) -> None:
    bundled = default_model() == SHAPES_MODEL
    p = add_subcommand(
        subparsers,
        "generate",
        "Answer an interleaved prompt of text and images; writes text, PNGs and a Markdown page.",
        "Answer an interleaved prompt. Each ITEM is text, or the path of an image file (.png, .jpg, ...). "
        + (
            f"Without --model, uses the bundled GILL trained on the shapes world ({SHAPES_MODEL!r}, offline); "
            if bundled
            else f"Without --model, uses {RANDOM_MODEL!r} (the bundled shapes-world model is not installed); "
        )
        + f"--model {RANDOM_MODEL} gives a tiny pipeline with RANDOM weights. Options left unset take the "
        "built-in model's settings, else the pipeline's defaults.",
        run=run_generate,
    )
    items_default = (
        f"an example picture of the shapes world with the bundled {SHAPES_MODEL} model; a drawn dog and two "
        "sentences with other models"
        if bundled
        else "a drawn dog and two sentences"
    )
    p.add_argument("items", nargs="*", help=f"text segments and image paths, in order (default: {items_default})")
    add_model_options(p)
    add_retrieval_options(p)
    add_turn_options(p)
    add_image_limit_option(p)
    p.add_argument("--output-dir", default="gill_outputs", help="where to write the answer (default: %(default)s)")
    p.add_argument(
        "--prompts", default=None, metavar="FILE",
        help="answer every prompt of FILE (one text per line, or .jsonl: a string or a list of items per line) into "
        "OUTPUT_DIR/line-NNNNNN/ and answers.jsonl; a rerun skips answered lines; split among N workers under "
        "`accelerate launch --num_processes N -m gill_pipeline generate --prompts FILE ...`",
    )
    p.add_argument(
        "--temperature", type=positive_float, default=1.0,
        help="sampling temperature (default: 1.0; with --top-p 1 too, decoding is greedy)",
    )
    p.add_argument(
        "--top-p", type=probability, default=1.0,
        help="nucleus sampling threshold (default: 1.0; with --temperature 1 too, decoding is greedy)",
    )
