"""`gill push`: upload a GILL pipeline folder, or only its learned weights, to a Hugging Face Hub repo."""

import os

from ..constants import MODEL_CARD_FILE
from ..pipeline import GILLPipeline
from ..serialization.folder import validate_pipeline_folder
from ..serialization.hub import push_folder_to_hub
from ..serialization.learned_weights import is_learned_weights_folder
from ..serialization.model_card import ModelCardInfo, write_model_card
from .options import CLIError, add_subcommand


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
    folder = args.folder
    if not os.path.isdir(folder):
        raise CLIError(f"folder not found: {folder}")
    info = ModelCardInfo(
        datasets=args.dataset or [], metrics=_parse_metrics(args.metric or []), license=args.license,
        metrics_source=args.metrics_source,
    )
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
        pipe = GILLPipeline.from_pretrained(folder)
        url = pipe.push_learned_weights(args.repo_id, card_info=info, **push_kwargs)
    else:
        if not learned:
            validate_pipeline_folder(folder)
        if info.to_dict() or not os.path.isfile(os.path.join(folder, MODEL_CARD_FILE)):
            path = write_model_card(folder, repo_id=args.repo_id, info=info)
            print(f"Wrote the model card {path}")
        url = push_folder_to_hub(folder, args.repo_id, **push_kwargs)
    what = "learned weights" if args.learned_weights_only or learned else "pipeline"
    print(f"Pushed the GILL {what} to {args.repo_id}: {url}")
    return 0


def add_parser(subparsers) -> None:
    p = add_subcommand(
        subparsers,
        "push",
        "Upload a GILL pipeline folder, or only its learned weights, to a Hugging Face Hub repo.",
        "Upload a saved GILL pipeline folder or learned-weights folder to a Hub repo (created if needed), with a model "
        "card. With --learned-weights-only, a whole pipeline folder is loaded and only its learned weights (MBs) and "
        "the record of its base models are pushed. Log in first (`hf auth login`) or pass --token.",
        run=run_push,
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
