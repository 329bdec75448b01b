"""`gill generate`: answer one interleaved prompt; write the text, the images as PNG and a Markdown page."""

import os

from ..bundled.presets import PRESETS, RANDOM_MODEL, SHAPES_MODEL
from ..demo.settings import call_kwargs, preset_settings
from ..pipeline import GILLImage
from .options import (
    add_image_limit_option,
    add_model_options,
    add_retrieval_options,
    add_subcommand,
    add_turn_options,
    check_output_dir,
    default_model,
    load_model,
    model_name,
    parse_interleaved_items,
    positive_float,
    probability,
    settings_from_args,
)


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
    for name, content in (("answer.txt", " ".join(text_parts) + "\n"), ("answer.md", "\n".join(md))):
        path = os.path.join(output_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        written.append(path)
    return written


def run_generate(args) -> int:
    model = model_name(args)
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
        "--temperature", type=positive_float, default=1.0,
        help="sampling temperature (default: 1.0; with --top-p 1 too, decoding is greedy)",
    )
    p.add_argument(
        "--top-p", type=probability, default=1.0,
        help="nucleus sampling threshold (default: 1.0; with --temperature 1 too, decoding is greedy)",
    )
