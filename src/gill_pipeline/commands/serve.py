"""`gill serve`: an OpenAI-compatible HTTP server in front of a GILL pipeline (docs/serve.md).

Checks every option, binds the address, then loads the model: a bad value or a taken port costs no loading time.
SIGINT / SIGTERM stop it gracefully (running requests finish within --shutdown-grace seconds, then the engine shuts
down).
"""

import importlib.util
import logging
import os
import sys

from ..bundled.presets import RANDOM_MODEL
from ..constants import IMAGE_MODES
from ..demo.settings import CALL_ARGUMENTS, call_defaults, preset_settings
from .options import (
    CLIError,
    TURN_OPTIONS,
    add_image_limit_option,
    add_model_options,
    add_subcommand,
    default_help,
    load_model,
    model_name,
    non_negative_float,
    port,
    positive_float,
    positive_int,
    run,
    settings_from_args,
)

logger = logging.getLogger("gill_pipeline.commands")

API_KEY_ENV = "GILL_API_KEY"
ENGINES = ("batched", "serial")


def default_engine() -> str:
    """The batched engine (dynamic batching, prefix cache) where this install has it, else one job at a time."""
    return "batched" if importlib.util.find_spec("gill_pipeline.serving.engine") is not None else "serial"


def build_engine(kind: str, pipe, settings):
    """The engine `--engine` names, over `pipe`, configured by `settings` (a `ServeSettings`)."""
    if kind == "serial":
        from ..serving.serial_engine import SerialEngine

        return SerialEngine(pipe, max_queue=settings.max_queue)
    try:
        from ..serving.engine import GILLEngine
    except ImportError as error:
        raise CLIError(f"--engine batched is not available in this install ({error}); use --engine serial") from None
    return GILLEngine(pipe, max_batch_size=settings.max_batch_size, batch_wait_ms=settings.batch_wait_ms,
                      max_queue=settings.max_queue)


def serve_settings(args):
    """The `ServeSettings` the options give (a bad combination is a `ValueError` naming the setting)."""
    from ..serving.settings import ServeSettings

    defaults = {CALL_ARGUMENTS[k]: v for k, v in {**preset_settings(model_name(args)), **settings_from_args(args)}.items()
                if v is not None}
    return ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key or None, model_id=args.model_id or model_name(args),
        allow_urls=args.allow_urls, image_urls=args.image_urls, max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels, max_images_per_request=args.max_images_per_request,
        max_tokens_cap=args.max_tokens_cap, request_timeout_s=args.request_timeout,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
        shutdown_grace_s=args.shutdown_grace, defaults=defaults,
    )


def set_threads(threads: int | None) -> None:
    """`--threads`: torch's intra-op threads in this process. Several replicas on one machine each take their share of
    the cores (one thread each on a 2-core machine); unset, torch takes one per core, and two replicas would fight
    over them."""
    if threads is None:
        return
    cores = os.cpu_count() or 1
    if threads > cores:
        logger.warning(f"--threads {threads} is more than this machine's {cores} cores: the threads will take turns.")
    import torch

    torch.set_num_threads(threads)


def run_serve(args) -> int:
    try:  # the optional extra, checked before anything is loaded
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CLIError("fastapi and uvicorn are not installed; install the serve extra: pip install "
                       "'gill-pipeline[serve]'") from None
    from ..serving.app import create_app
    from ..serving.server import bind_socket, serve_forever

    if args.engine == "batched" and default_engine() != "batched":
        raise CLIError("--engine batched is not available in this install; use --engine serial")
    settings = serve_settings(args)
    sock = bind_socket(settings.host, settings.port)  # a taken port is refused before the model loads
    try:
        if settings.exposed_without_key:
            logger.warning(
                f"Serving on {settings.host}, reachable from other machines, WITHOUT an API key: anyone who reaches "
                f"port {settings.port} can use the model. Set --api-key or ${API_KEY_ENV} (docs/serve.md, Security)."
            )
        set_threads(args.threads)
        pipe = load_model(args)
        engine = build_engine(args.engine, pipe, settings)
        app = create_app(engine, settings)
        logger.warning(f"gill serve: {settings.model_id!r} on http://{settings.host}:{settings.port}/v1 "
                       f"({args.engine} engine); Ctrl+C stops it.")
        serve_forever(app, settings, sock, log_level="info" if args.verbose else "warning")
    finally:
        sock.close()
    return 0


def add_parser(subparsers) -> None:
    p = add_subcommand(
        subparsers,
        "serve",
        "Serve a GILL pipeline over OpenAI's HTTP API (chat completions with text and image answers).",
        "An OpenAI-compatible server (needs the serve extra: fastapi, uvicorn): POST /v1/chat/completions (answers "
        "mix text and images; stream=true for server-sent events), POST /v1/images/generations, GET /v1/models, GET "
        "/health. Listens on this machine only unless --host says otherwise. Without --model, uses the bundled "
        f"shapes-world model when installed, else {RANDOM_MODEL!r}. See docs/serve.md.",
        run=run_serve,
    )
    add_model_options(p)
    p.add_argument("--retrieval-index", default=None,
                   help="retrieval index folder or Hub repo id to retrieve images from (see docs/retrieval.md)")
    p.add_argument("--allow-urls", action="store_true",
                   help="accept http(s) image URLs in requests (the server downloads them) and let the retrieval "
                   "index download images from URLs; off by default: requests send images as data: URLs")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 makes the server reachable from other machines (then set an "
                   "API key) (default: %(default)s)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--model-id", default=None,
                   help="the model name /v1/models lists and requests send (default: the --model value)")
    p.add_argument("--engine", choices=ENGINES, default=default_engine(),
                   help="batched: dynamic batching and a prefix cache; serial: one request at a time "
                   "(default: %(default)s)")
    p.add_argument("--image-urls", action="store_true",
                   help="answer images as URLs of /v1/files/ID served here, instead of inline data: URLs")
    add_image_limit_option(p)
    p.add_argument("--max-body-bytes", type=positive_int, default=16 * 1024 * 1024,
                   help="largest request body; larger ones get 413 before they are read whole (default: %(default)s)")
    p.add_argument("--max-images-per-request", type=positive_int, default=8,
                   help="most image parts in one request (default: %(default)s)")
    p.add_argument("--max-tokens-cap", type=positive_int, default=512,
                   help="largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--request-timeout", type=positive_float, default=300.0,
                   help="seconds before an unanswered request is cancelled and answered 504 (default: %(default)s)")
    p.add_argument("--max-batch-size", type=positive_int, default=8,
                   help="most requests decoded together by the batched engine (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=10.0,
                   help="how long the batched engine waits for more requests to join a batch (default: %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting beyond those running; more get 429 with Retry-After (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of this server; with several replicas on one machine, give each its share of "
                   "the cores (default: torch's choice, one per core)")
    p.add_argument("--shutdown-grace", type=non_negative_float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds running requests may finish (default: %(default)s)")
    defaults = call_defaults()
    for option, (kind, what) in TURN_OPTIONS.items():
        choices = list(IMAGE_MODES) if option == "image_mode" else None
        p.add_argument("--" + option.replace("_", "-"), type=kind, default=None, choices=choices,
                       help=f"{what}, for requests that do not set it {default_help(option, defaults)}")


def main(argv: list[str] | None = None) -> int:
    """`gill serve ARGS` alone (the same exit codes as every `gill` command)."""
    return run([add_parser], ["serve", *(sys.argv[1:] if argv is None else argv)])
