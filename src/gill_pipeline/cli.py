"""The `gill` command line: `gill generate ...` (more subcommands register themselves in `SUBCOMMANDS`)."""

import argparse
import logging
import os
import sys

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MODEL = "tiny-random"
DEFAULT_PROMPT = ["This is my dog.", "@example-image", "Show me what he would look like in the snow."]

logger = logging.getLogger("gill_pipeline.cli")


class CLIError(Exception):
    """An error in plain words for the user of the command line."""


def parse_interleaved_items(items: list[str]) -> list:
    """Command-line items -> interleaved input: paths of existing image files become images, the rest text."""
    from PIL import Image

    inputs = []
    for item in items:
        if item == "@example-image":
            inputs.append(example_image())
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


def example_image():
    """A small drawn picture (a brown 'dog' blob on grass) used by the default example: no file needed."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 44, 63, 63], fill=(70, 150, 60))
    draw.ellipse([16, 26, 44, 46], fill=(120, 80, 40))
    draw.ellipse([38, 20, 52, 34], fill=(120, 80, 40))
    return image


def load_pipeline(model: str, device: str, dtype: str | None):
    import torch

    from .pipeline import GILLPipeline

    torch_dtype = getattr(torch, dtype) if dtype else None
    if model == DEFAULT_MODEL:
        from .tiny import build_tiny_gill_pipeline

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
    import torch

    items = args.items or DEFAULT_PROMPT
    prompt = parse_interleaved_items(items)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    random_default = args.model == DEFAULT_MODEL
    output = pipe(
        prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.top_p < 1.0 or args.temperature != 1.0,
        temperature=args.temperature,
        top_p=args.top_p,
        # The random default would rarely pick [IMG0] by itself: make it show an image after a few words.
        min_text_tokens=4 if random_default and args.min_text_tokens is None else (args.min_text_tokens or 0),
        img_logit_scale=100.0 if random_default and args.img_logit_scale is None else (args.img_logit_scale or 1.0),
        max_images=1 if random_default and args.max_images is None else args.max_images,
        image_mode=args.image_mode,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    )
    paths = write_answer(output.outputs[0], args.output_dir, prompt)
    print(f"Answer: {output.texts[0]!r} with {len(output.images[0])} image(s)")
    print("Wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="Answer an interleaved prompt of text and images; writes text, PNGs and a Markdown page.",
        description=(
            "Answer an interleaved prompt. Each ITEM is text, or the path of an image file (.png, .jpg, ...). "
            "Without --model, uses a tiny pipeline with RANDOM weights (for trying the command offline)."
        ),
    )
    p.add_argument("items", nargs="*", help="text segments and image paths, in order (default: a dog example)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or Hub repo id (default: %(default)s)")
    p.add_argument("--output-dir", default="gill_outputs", help="where to write the answer (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to produce (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: greedy)")
    p.add_argument("--min-text-tokens", type=int, default=None, help="text tokens before an image is allowed")
    p.add_argument("--img-logit-scale", type=float, default=None, help="make images more likely when above 1")
    p.add_argument("--max-images", type=int, default=None, help="most images in the answer (default: no limit)")
    p.add_argument("--image-mode", default="auto", choices=["auto", "generate", "retrieve"])
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weights dtype")
    p.set_defaults(func=run_generate)


# Each entry adds one subcommand to the parser; other modules append to it.
SUBCOMMANDS = [add_generate_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gill", description="GILL: interleaved images and text with a causal LM.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError) as error:
        print(f"gill {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
