"""Command-line options shared by `gill chat` and `gill demo`: which model, and the settings of each turn.

Types, help texts and defaults come from `gill generate`'s (`cli.py`), so an option means the same in all three.
"""

import os

from .. import cli
from ..constants import IMAGE_MODES
from ..serialization.paths import looks_like_local_path


def add_model_options(p) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"pipeline folder or Hub repo id, or {cli.SHAPES_MODEL!r} or {cli.RANDOM_MODEL!r} "
        f"(default: {cli.default_model()!r})",
    )
    p.add_argument(
        "--retrieval-index",
        default=None,
        help="retrieval index folder or Hub repo id to retrieve images from (see docs/retrieval.md)",
    )
    p.add_argument("--allow-urls", action="store_true", help="let the retrieval index download images from URLs")
    p.add_argument(
        "--device", type=cli.device, default="cpu",
        help="torch device to run on, checked to exist here: cpu, cuda, cuda:1, mps (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", type=cli.dtype_name, default=None,
        help=f"weights dtype, one of {sorted(cli.DTYPE_NAMES)} (default: the dtype the model is loaded in, float32)",
    )
    p.add_argument("--verbose", action="store_true", help="also show the libraries' notices and loading progress bars")


def add_turn_options(p) -> None:
    """The settings of every turn; unset ones take the built-in model's preset, else the pipeline's defaults."""
    defaults = cli.call_defaults()
    p.add_argument(
        "--max-new-tokens", type=cli.positive_int, default=None,
        help="most tokens per answer " + cli._default_help("max_new_tokens", defaults),
    )
    p.add_argument(
        "--min-text-tokens", type=cli.non_negative_int, default=None,
        help="text tokens before an image is allowed " + cli._default_help("min_text_tokens", defaults),
    )
    p.add_argument(
        "--img-logit-scale", type=cli.positive_float, default=None,
        help="makes images more likely when above 1 " + cli._default_help("img_logit_scale", defaults),
    )
    p.add_argument(
        "--max-images", type=cli.non_negative_int, default=None,
        help="most images per answer " + cli._default_help("max_images", defaults),
    )
    p.add_argument(
        "--image-mode", default=None, choices=list(IMAGE_MODES),
        help="let the decision head choose, always generate / retrieve, or make both "
        + cli._default_help("image_mode", defaults),
    )
    p.add_argument(
        "--steps", type=cli.positive_int, default=None, help="denoising steps " + cli._default_help("steps", defaults)
    )
    p.add_argument(
        "--guidance-scale", type=cli.non_negative_float, default=None,
        help="classifier-free guidance " + cli._default_help("guidance_scale", defaults),
    )
    p.add_argument("--seed", type=cli.seed, default=0, help="random seed of each turn (default: %(default)s)")


def port(text: str) -> int:
    return cli._number(text, int, "a port number in [1, 65535]", lambda v: 1 <= v <= 65535)


def model_name(args) -> str:
    return args.model or cli.default_model()


def settings_from_args(args) -> dict:
    """The turn options the user gave (option name -> value); the rest are left to the preset and defaults."""
    return {name: getattr(args, name) for name in cli.CALL_ARGUMENTS if getattr(args, name) is not None}


def load_model(args):
    """Checks the paths given, then loads the pipeline (and its retrieval index) the options name."""
    if args.retrieval_index and looks_like_local_path(args.retrieval_index) and not os.path.isdir(args.retrieval_index):
        raise cli.CLIError(f"--retrieval-index: no such folder: {args.retrieval_index}")
    pipe = cli.load_pipeline(model_name(args), args.device, args.dtype)
    if args.retrieval_index:
        pipe.load_retrieval_index(args.retrieval_index, allow_urls=args.allow_urls)
    pipe.set_progress_bar_config(disable=True)
    return pipe
