"""`gill index build`: a retrieval set from a folder of images, a caption TSV/CSV or webdataset shards, as one
process or as N under `accelerate launch` (docs/retrieval.md, "Building a set on N workers").

The source, the output folder and the FAISS factory string are checked before any image is embedded; the source and
the folder before the model loads.
"""

import logging
import os

from ..retrieval.parallel_build import BUILD_DIR, DEFAULT_PART_ROWS, build_retrieval_set
from ..retrieval.serialization import INDEX_CONFIG_FILE
from ..retrieval.sources import as_source
from ..serialization.folder import resolve_dtype
from ..utils.distributed import current_workers
from .options import CLIError, add_model_options, add_subcommand, load_pipeline, non_negative_int, positive_int

logger = logging.getLogger("gill_pipeline.commands")

STORAGE_DTYPES = ("float16", "float32")


def check_output_dir_before_loading(output_dir: str, resume: bool) -> None:
    """What can be said of --output-dir without the model (the rest, against this build's plan, is checked by
    `check_output_dir` before any image is embedded): a file, a folder of other files, or a build or set there
    without --resume is refused before the model loads."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CLIError(f"--output-dir: {output_dir} exists and is not a folder")
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    ours = {BUILD_DIR, INDEX_CONFIG_FILE}
    if not ours & set(entries) and entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise CLIError(f"--output-dir: {output_dir} is not empty ({shown}): a build writes only into a new or empty "
                       "folder, so that none of your files is overwritten")
    if ours & set(entries) and not resume:
        what = "a retrieval set" if INDEX_CONFIG_FILE in entries else "an unfinished build"
        raise CLIError(f"--output-dir: {output_dir} already holds {what}: pass --resume to finish or check it, or "
                       "another folder")


def run_build(args) -> int:
    workers = current_workers()
    try:
        source = as_source(args.source)
    except ValueError as error:
        raise CLIError(f"SOURCE: {error}") from None
    check_output_dir_before_loading(args.output_dir, args.resume)
    pipe = load_pipeline(args.model, workers.device(args.device), args.dtype)
    pipe.set_progress_bar_config(disable=True)
    index = build_retrieval_set(
        pipe, source, args.output_dir, batch_size=args.batch_size, part_rows=args.part_rows,
        dtype=resolve_dtype(args.storage_dtype, "--storage-dtype"), faiss_factory=args.faiss, resume=args.resume,
        allow_urls=args.allow_urls, num_workers=args.read_threads, workers=workers, progress=not args.no_progress,
    )
    if index is not None:
        search = f", searched with FAISS {args.faiss!r}" if args.faiss else ""
        print(f"Retrieval set of {len(index)} images in {args.output_dir} ({workers.world_size} worker(s){search}).")
    return 0


def add_parser(subparsers) -> None:
    p = add_subcommand(
        subparsers, "index", "Build a retrieval set (alone, or as N workers under `accelerate launch`).",
        "Retrieval sets from the command line. Run as `accelerate launch --num_processes N -m gill_pipeline index "
        "build ...` to split the work over N workers (one machine, or several with --num_machines); the set is the "
        "same, bit for bit, as one process makes.",
        verbose=False,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = add_subcommand(actions, "build", "embed the images of SOURCE into a new retrieval set", None, run=run_build)
    b.add_argument("source", help="a folder of images (captions in NAME.txt beside them), a caption .tsv/.csv "
                   "(header caption<TAB>image), or webdataset .tar shards (a file, a glob, or a folder of them)")
    add_model_options(b, required=True)
    b.add_argument("--output-dir", required=True, help="a new or empty folder for the set (its own with --resume)")
    b.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call (default: %(default)s)")
    b.add_argument("--part-rows", type=positive_int, default=DEFAULT_PART_ROWS, help="images per part: the unit each "
                   "worker takes, saves and resumes (default: %(default)s)")
    b.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default="float16", help="dtype of the stored rows "
                   "(default: %(default)s)")
    b.add_argument("--faiss", default=None, metavar="FACTORY", help="also build a FAISS index from this index_factory "
                   "string (e.g. 'IVF1024,Flat', 'HNSW32'; or 'auto': chosen by measured recall@10; needs faiss-cpu), "
                   "saved with the set")
    b.add_argument("--resume", action="store_true", help="finish the build in --output-dir (parts already embedded "
                   "are kept)")
    b.add_argument("--allow-urls", action="store_true", help="download images given as URLs")
    b.add_argument("--read-threads", type=non_negative_int, default=4, help="threads per worker reading images (0: none) "
                   "(default: %(default)s)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
