"""`gill demo`: load a pipeline, build the chat page, serve it on this machine (see docs/demo.md)."""

import shutil
import sys

from ..bundled.presets import RANDOM_MODEL
from ..demo import DEFAULT_HOST, build_demo, serve
from .options import (
    CLIError,
    add_image_limit_option,
    add_model_options,
    add_retrieval_options,
    add_subcommand,
    add_turn_options,
    load_model,
    model_name,
    port,
    run,
    settings_from_args,
)


def run_demo(args) -> int:
    try:  # the optional extra, checked before the model is loaded (the page imports it when built)
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError("gradio is not installed; install the demo extra: pip install 'gill-pipeline[demo]'") from None
    settings = {**settings_from_args(args), "seed": args.seed}
    pipe = load_model(args)
    demo = build_demo(pipe, model=model_name(args), settings=settings, max_image_pixels=args.max_image_pixels)
    try:
        serve(demo, host=args.host, port=args.port, block=True)
    finally:
        shutil.rmtree(demo.gill_backend.images_dir, ignore_errors=True)  # the answers' display copies
    return 0


def add_parser(subparsers) -> None:
    p = add_subcommand(
        subparsers,
        "demo",
        "Serve a web page to chat with a GILL pipeline (needs the demo extra: gradio).",
        "Serve a chat page (gradio) on this machine: upload images, type messages, see GILL's streamed text and its "
        "generated and retrieved images with their source and decision probabilities; settings and a reset button on "
        "the page. Without --model, uses the bundled shapes-world model when installed, else "
        f"{RANDOM_MODEL!r}. Nothing is shared publicly and gradio's analytics are off.",
        run=run_demo,
    )
    add_model_options(p)
    add_retrieval_options(p)
    add_turn_options(p)
    add_image_limit_option(p)
    p.add_argument(
        "--host", default=DEFAULT_HOST,
        help="address to serve on; 0.0.0.0 makes the page reachable from other machines (default: %(default)s)",
    )
    p.add_argument("--port", type=port, default=None, help="port to serve on (default: the first free one from 7860)")


def main(argv: list[str] | None = None) -> int:
    """`gill demo ARGS` alone (the same exit codes as every `gill` command)."""
    return run([add_parser], ["demo", *(sys.argv[1:] if argv is None else argv)])
