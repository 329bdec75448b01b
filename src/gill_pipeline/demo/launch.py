"""`gill demo`: load a pipeline, build the page, serve it on this machine (see docs/demo.md)."""

import logging
import shutil

from .. import cli
from .options import add_model_options, add_turn_options, load_model, model_name, port, settings_from_args

DEFAULT_HOST = "127.0.0.1"
logger = logging.getLogger(__name__)


def serve(demo, host: str = DEFAULT_HOST, port: int | None = None, block: bool = True) -> str:
    """Serves a page from `build_demo` on `host:port` (port None: gradio's first free one from 7860), offline: no
    share link, no browser opened, server-side rendering off (it would need Node.js). Returns the page's address;
    with `block=True` only once the server stops (Ctrl+C), else at once (stop it with `demo.close()`)."""
    demo.queue()
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        allowed_paths=[demo.gill_backend.images_dir],
        prevent_thread_lock=True,
        quiet=True,  # gradio's banner suggests share=True; the address is logged below instead
    )
    logger.warning("The GILL demo is served on %s%s", url, " (Ctrl+C stops it)." if block else "")
    if block:
        demo.block_thread()
    return url


def run_demo(args) -> int:
    try:  # before the model is loaded
        import gradio  # noqa: F401
    except ImportError:
        raise cli.CLIError("gradio is not installed; install the demo extra: pip install 'gill-pipeline[demo]'") from None
    from .app import build_demo

    settings = settings_from_args(args)
    settings["seed"] = args.seed
    pipe = load_model(args)
    demo = build_demo(pipe, model=model_name(args), settings=settings)
    try:
        serve(demo, host=args.host, port=args.port, block=True)
    finally:
        shutil.rmtree(demo.gill_backend.images_dir, ignore_errors=True)  # the answers' display copies
    return 0


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="Serve a web page to chat with a GILL pipeline (needs the demo extra: gradio).",
        description=(
            "Serve a chat page (gradio) on this machine: upload images, type messages, see GILL's streamed text and "
            "its generated and retrieved images with their source and decision probabilities; settings and a reset "
            "button on the page. Without --model, uses the bundled shapes-world model when installed, else "
            f"{cli.RANDOM_MODEL!r}. Nothing is shared publicly and gradio's analytics are off."
        ),
    )
    add_model_options(p)
    add_turn_options(p)
    p.add_argument(
        "--host", default=DEFAULT_HOST,
        help="address to serve on; 0.0.0.0 makes the page reachable from other machines (default: %(default)s)",
    )
    p.add_argument(
        "--port", type=port, default=None, help="port to serve on (default: the first free one from 7860)"
    )
    p.set_defaults(func=run_demo)


def main(argv: list[str] | None = None) -> int:
    """`gill demo ARGS` (errors: one line, exit code 2, as every `gill` command)."""
    import sys

    return cli.main(["demo", *(sys.argv[1:] if argv is None else argv)])
