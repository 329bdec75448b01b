"""`gill convert-original`: the reference GILL release (kohjingyu/gill) -> a pipeline or learned-weights folder."""

import logging
import os

from ..conversion.convert_original import (
    REFERENCE_ARGS_FILE,
    REFERENCE_CHECKPOINT_FILE,
    REFERENCE_DECISION_FILE,
    convert_original_to_folder,
)
from ..serialization.folder import DTYPE_NAMES, resolve_dtype
from .options import CLIError, add_subcommand, check_output_dir, dtype_name, positive_int

logger = logging.getLogger(__name__)


def _release_files(args) -> tuple[str, str, str | None]:
    """(model args, checkpoint, decision model or None): the paths given, else the release folder's files."""
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
    return model_args, checkpoint, decision


def run_convert_original(args) -> int:
    model_args, checkpoint, decision = _release_files(args)
    check_output_dir(args.output_dir)
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


def add_parser(subparsers) -> None:
    p = add_subcommand(
        subparsers,
        "convert-original",
        "Convert the reference GILL release (kohjingyu/gill) into a pipeline or learned-weights folder.",
        "Convert the reference GILL release (model_args.json, pretrained_ckpt.pth.tar, decision_model.pth.tar) into "
        "this package's format. Pickled files are read with torch.load(weights_only=True) only. The base models (LM, "
        "Stable Diffusion, CLIP) are loaded once to check that they fit; by default they are those of the release "
        "(model_args.json names the LM and vision encoder).",
        run=run_convert_original,
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
