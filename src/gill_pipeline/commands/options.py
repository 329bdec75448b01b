"""What every `gill` subcommand shares: the parser and its error rule, argument types, the options declared once
(`--model`, `--device`, `--dtype`, `--quantize`, `--verbose`, the retrieval index, the settings of an answer), and the model loader.

A subcommand module imports this one and no other command module; `gill_pipeline.commands` registers them all.

Errors (docs/cli.md, "Errors and exit codes"): a user error prints one line `gill <command>: error: ...` and exits
with code 2; any other exception is a bug or a failure of the machine (out of memory): its traceback is printed and
the exit code is 1. `--verbose` prints the traceback of user errors too.
"""

import argparse
import logging
import math
import os
import sys
import traceback

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from ..bundled import BUNDLED_INDEX, BUNDLED_PIPELINE, bundle_available, load_bundled_pipeline
from ..bundled.presets import EXAMPLE_IMAGE_ITEM, PRESETS, RANDOM_MODEL, SHAPES_MODEL, example_image
from ..constants import IMAGE_MODES
from ..demo.settings import CALL_ARGUMENTS, call_defaults
from ..utils.image_io import MAX_IMAGE_PIXELS, ImageTooLargeError, UnreadableImageError, read_image
from ..pipeline import GILLPipeline
from ..pipeline.inputs import MAX_SEED
from ..serialization.folder import DTYPE_NAMES, resolve_dtype
from ..serialization.paths import looks_like_local_path
from ..serialization.quantization import QUANTIZE_CHOICES, quantization_preset
from ..testing import build_tiny_gill_pipeline
from ..utils.distributed import current_workers

logger = logging.getLogger("gill_pipeline.commands")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

EXIT_OK, EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """An error in plain words for the user of the command line; `prog` is the (sub)command it concerns."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


# The exceptions a user causes and can correct by changing the command, its files or the installed extras; each is
# shown as one line (exit code 2). `CLIError`: the commands' own checks and argparse's. `ValueError`: the library's
# checks of a value (they name the argument), unreadable or malformed files (JSON, UTF-8, refused pickles,
# mismatched indexes). `OSError`: missing or refused files and folders (`PipelineFolderError`), the Hub and the
# network (`HubLoadError`, huggingface_hub's HTTP errors), a full disk. `ImportError`: an optional extra not
# installed (the library names the `pip install`; module-level imports run before a command starts, so an import
# bug never reaches this rule). Not here, so shown with their traceback (exit code 1): `TypeError` (every value a
# command passes is typed by its parser, so one coming back is a bug of the command), `RuntimeError` (out of memory,
# torch failures), `KeyError`, `IndexError`, `AttributeError`, `AssertionError`, `MemoryError`, ...
USER_ERRORS = (CLIError, ValueError, OSError, ImportError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a [`CLIError`]: one line on stderr and exit code 2, like every other user
    error (argparse's own `error` prints the whole usage first)."""

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
    return _number(text, int, "an integer seed in [0, 2**63)", lambda v: 0 <= v < MAX_SEED)


def port(text: str) -> int:
    return _number(text, int, "a port number in [1, 65535]", lambda v: 1 <= v <= 65535)


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


# ----------------------------------------------------------------------------------------------------------------
# Options declared once, used by several subcommands
# ----------------------------------------------------------------------------------------------------------------
def add_subcommand(subparsers, name: str, summary: str, description: str, run=None, verbose: bool = True):
    """Adds subcommand `name` (`summary` in `gill --help`, `description` in its own) that calls `run(args)`; every
    runnable subcommand takes `--verbose`."""
    p = subparsers.add_parser(name, help=summary, description=description)
    if verbose:
        p.add_argument(
            "--verbose", action="store_true",
            help="show the libraries' notices and loading progress bars, and the traceback of every error",
        )
    if run is not None:
        p.set_defaults(func=run)
    return p


def default_model() -> str:
    """The model used where `--model` may be left out: the bundled shapes-world GILL when it is installed."""
    return SHAPES_MODEL if bundle_available() else RANDOM_MODEL


def add_model_options(p, required: bool = False) -> None:
    """`--model`, `--device`, `--dtype`, `--quantize`, `--compile-decoding`. `required`: no default model (for commands whose results would be
    meaningless for the built-in toy models unless named on purpose)."""
    default = "required" if required else f"default: {default_model()!r}"
    p.add_argument(
        "--model", required=required, default=None,
        help=f"pipeline folder or Hub repo id, or a built-in model: {SHAPES_MODEL!r} or {RANDOM_MODEL!r} ({default})",
    )
    p.add_argument(
        "--device", type=device, default="cpu",
        help="torch device to run on, checked to exist here: cpu, cuda, cuda:1, mps (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", type=dtype_name, default=None,
        help=f"weights dtype, one of {sorted(DTYPE_NAMES)} (default: the dtype the model is loaded in, float32)",
    )
    p.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, default="none",
        help="quantize the LM's weights with torchao as it loads (the learned GILL parts never are); costs and "
        "figures in docs/quantization.md (default: %(default)s)",
    )
    p.add_argument(
        "--compile-decoding", action="store_true",
        help="decode with a static KV cache and the LM compiled by torch.compile (pipe.enable_compiled_decoding()): "
        "the same answers, faster tokens after a first call that compiles; LMs it does not apply to decode as before "
        "(docs/pipeline.md, 'Compiled decoding')",
    )


def add_image_limit_option(p) -> None:
    """`--max-image-pixels`: the largest image file read (docs/security.md); larger ones are refused unread."""
    p.add_argument(
        "--max-image-pixels", type=positive_int, default=MAX_IMAGE_PIXELS,
        help="largest image read from a file, in pixels (width x height); larger ones are refused before they are "
        "decoded (default: %(default)s, 64 MP)",
    )


def add_retrieval_options(p) -> None:
    p.add_argument(
        "--retrieval-index", default=None,
        help="retrieval index folder or Hub repo id to retrieve images from (see docs/retrieval.md)",
    )
    p.add_argument("--allow-urls", action="store_true", help="let the retrieval index download images from URLs")


# The settings of an answer (option names of `CALL_ARGUMENTS`): type and what it does; the default is appended.
TURN_OPTIONS = dict(
    max_new_tokens=(positive_int, "most tokens per answer"),
    min_text_tokens=(non_negative_int, "text tokens before an image is allowed"),
    img_logit_scale=(positive_float, "makes images more likely when above 1"),
    max_images=(non_negative_int, "most images per answer"),
    image_mode=(str, "let the decision head choose, always generate / retrieve, or make both"),
    steps=(positive_int, "denoising steps"),
    guidance_scale=(non_negative_float, "classifier-free guidance"),
)


def add_turn_options(p) -> None:
    """The settings of an answer and `--seed`; unset ones take the built-in model's preset, else the pipeline's
    defaults (`settings_from_args`)."""
    defaults = call_defaults()
    for option, (kind, what) in TURN_OPTIONS.items():
        choices = list(IMAGE_MODES) if option == "image_mode" else None
        p.add_argument(
            "--" + option.replace("_", "-"), type=kind, default=None, choices=choices,
            help=f"{what} {default_help(option, defaults)}",
        )
    p.add_argument("--seed", type=seed, default=0, help="random seed of each answer (default: %(default)s)")


def default_help(option: str, defaults: dict) -> str:
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


def settings_from_args(args) -> dict:
    """The answer settings the user gave (option name -> value); the rest are left to the preset and defaults."""
    return {name: getattr(args, name) for name in CALL_ARGUMENTS if getattr(args, name) is not None}


def model_name(args) -> str:
    return args.model or default_model()


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the model
# ----------------------------------------------------------------------------------------------------------------
def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag}: {path} exists and is not a folder")


def is_image_path(text: str) -> bool:
    return text.lower().endswith(IMAGE_EXTENSIONS)


def read_image_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """The RGB image in the file `path`, or a one-line [`CLIError`]: missing, unreadable, or above `max_pixels`."""
    if not os.path.isfile(path):
        raise CLIError(f"image file not found: {path}")
    try:
        return read_image(path, max_pixels=max_pixels)
    except ImageTooLargeError as error:
        raise CLIError(f"{error} Raise --max-image-pixels to read it anyway.") from error
    except UnreadableImageError as error:
        raise CLIError(f"cannot read image {path}: {error.reason}") from error
    except OSError as error:  # a folder named like an image, no permission
        raise CLIError(f"cannot read image {path}: {error.strerror or error}") from error


def parse_interleaved_items(items: list[str], model: str = RANDOM_MODEL, max_pixels: int = MAX_IMAGE_PIXELS) -> list:
    """Command-line items -> interleaved input: image file paths become images (`@example-image` the model's example
    image), the rest text. Images above `max_pixels` are refused before they are decoded."""
    inputs = []
    for item in items:
        if item == EXAMPLE_IMAGE_ITEM:
            inputs.append(example_image(model))
        elif is_image_path(item):
            inputs.append(read_image_file(item, max_pixels))
        else:
            inputs.append(item)
    return inputs


def load_pipeline(model: str, device: str, dtype: str | None, quantize: str = "none") -> GILLPipeline:
    """The pipeline `model` names (a built-in model name, a folder or a Hub repo id) on `device`, in `dtype`, its LM
    quantized as `quantize` names (one of `QUANTIZE_CHOICES`)."""
    torch_dtype = resolve_dtype(dtype, "--dtype")
    if quantize not in QUANTIZE_CHOICES:
        raise CLIError(f"--quantize must be one of {list(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize != "none" and model == RANDOM_MODEL:
        raise CLIError(
            f"--quantize {quantize}: the built-in {RANDOM_MODEL!r} model is built in memory, not loaded, so there is "
            "nothing to quantize on loading; use it with --quantize none, or pass --model PATH_OR_HUB_ID"
        )
    try:
        quantization = quantization_preset(quantize, device)
    except ImportError as error:
        raise CLIError(f"--quantize {quantize}: {error}") from error
    if quantization is not None:
        # Loaded quantized: the weights are not cast afterwards (`--dtype` goes to the loader instead).
        try:
            pipe = GILLPipeline.from_pretrained(
                BUNDLED_PIPELINE if model == SHAPES_MODEL else model, dtype=torch_dtype or torch.float32,
                quantization_config=quantization,
            )
        except OSError as error:
            raise CLIError(f"cannot load the GILL pipeline {model!r}: {error}") from error
        if model == SHAPES_MODEL and os.path.isdir(BUNDLED_INDEX):
            pipe.load_retrieval_index(BUNDLED_INDEX)
        return pipe.to(device)
    if model == SHAPES_MODEL:
        logger.warning(
            "Using the embedded default: GILL trained by this project on the SHAPES WORLD (tiny models of coloured "
            "shapes; see docs/shapes_world.md). Pass --model PATH_OR_HUB_ID for another GILL pipeline."
        )
        pipe = load_bundled_pipeline()
    elif model == RANDOM_MODEL:
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


def load_model(args, progress_bar: bool = False) -> GILLPipeline:
    """Checks the retrieval index path given, then loads the pipeline `--model` names and its retrieval index.
    `progress_bar`: keep the denoising progress bar (commands that stream or show their own progress hide it)."""
    index = getattr(args, "retrieval_index", None)
    if index and looks_like_local_path(index) and not os.path.isdir(index):
        raise CLIError(f"--retrieval-index: no such folder: {index}")
    # Under `accelerate launch`, `--device cuda` is each worker's own GPU.
    device = current_workers().device(args.device)
    pipe = load_pipeline(model_name(args), device, args.dtype, getattr(args, "quantize", "none"))
    if index:
        pipe.load_retrieval_index(index, allow_urls=args.allow_urls)
    if getattr(args, "compile_decoding", False):
        pipe.enable_compiled_decoding()
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Running a command: parser, library verbosity, errors -> exit codes
# ----------------------------------------------------------------------------------------------------------------
def build_parser(subcommands) -> ArgumentParser:
    """The `gill` parser with the subcommands each `add_parser(subparsers)` of `subcommands` adds."""
    parser = ArgumentParser(prog="gill", description="GILL: interleaved images and text with a causal LM.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in subcommands:
        add(subparsers)
    return parser


def quiet_libraries(verbose: bool) -> None:
    """diffusers' and transformers' notices and loading bars concern library developers, not the CLI user; errors
    still show. The denoising progress bar stays."""
    if verbose:
        return
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def one_line(error: BaseException) -> str:
    # Library messages may span lines (transformers' hints); the CLI promises one line per error.
    return " ".join(str(error).split()) or type(error).__name__


def report_error(error: BaseException, prog: str, verbose: bool = False, file=None) -> int:
    """Writes `error` for the user of `prog` and returns the exit code its kind gets (module docstring)."""
    file = file or sys.stderr
    if isinstance(error, USER_ERRORS):
        if verbose:
            traceback.print_exception(error, file=file)
        print(f"{getattr(error, 'prog', None) or prog}: error: {one_line(error)}", file=file, flush=True)
        return EXIT_USER_ERROR
    traceback.print_exception(error, file=file)
    print(
        f"{prog}: internal error: {type(error).__name__}: {one_line(error)} (not a usage error; the traceback above "
        "shows where)",
        file=file, flush=True,
    )
    return EXIT_INTERNAL_ERROR


def run(subcommands, argv: list[str] | None = None) -> int:
    """Parses `argv` (default: `sys.argv[1:]`) with `subcommands` and runs the command chosen; returns its exit code:
    0, 2 for a user error, 1 for any other error, 130 when interrupted. `--help` returns 0."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = build_parser(subcommands).parse_args(argv)
    except CLIError as error:
        return report_error(error, "gill")
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    verbose = getattr(args, "verbose", False)
    quiet_libraries(verbose)
    prog = f"gill {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 (every error gets its exit code; see `report_error`)
        return report_error(error, prog, verbose=verbose)
