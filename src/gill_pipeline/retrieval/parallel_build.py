"""Building a new retrieval set as 1 or N workers (`gill index build`, alone or under `accelerate launch`).

The source's records are cut into parts of `part_rows` records, fixed by the source alone. Each worker embeds a
contiguous run of parts (`Workers.share`), in batches of `batch_size` cut inside each part, and writes each part as
two files under `output_dir/.build/` (records, then the float32 embeddings carrying a hash of both: a part is
there or it is not). Worker 0 then concatenates the parts in order into a [`RetrievalIndex`] and saves it with
`save_pretrained`; the parts are removed. Since the parts and their batches do not depend on the number of workers,
N workers give the rows, order and bits of one. A rerun with `resume=True` keeps every part that reads back whole
and matches the plan (`plan.json`: the source's ids, the model's fingerprint, the batch and part sizes), and embeds
the rest: a killed worker's share is redone.
"""

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch
from diffusers.utils import logging
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..utils.distributed import Workers, atomic_write_text, current_workers
from .build import embed_images
from .fingerprint import weights_fingerprint
from .image_loading import ImageLoadError, load_record_image
from .index import RetrievalIndex
from .search import import_faiss
from .serialization import DEFAULT_MAX_SHARD_ROWS, INDEX_CONFIG_FILE, dtype_name
from .sources import as_source


logger = logging.get_logger(__name__)

BUILD_DIR = ".build"
PLAN_FILE = "plan.json"
PART_TEMPLATE = "part-{:06d}"
PLAN_FORMAT = "gill-retrieval-build"
DEFAULT_PART_ROWS = 4096


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ids_hash(records: list[dict]) -> str:
    return _sha256("\n".join(r["id"] for r in records))


def check_faiss_factory(factory: str, dim: int) -> None:
    """Raises a ValueError naming `factory` unless FAISS can build an index from it for `dim`-wide rows, or it is
    `"auto"` (`use_faiss("auto")`: chosen by measured recall@10); an ImportError when FAISS is not installed. Checked
    before anything is embedded."""
    faiss = import_faiss()
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"`faiss_factory` must be a FAISS index_factory string such as 'IVF1024,Flat' or 'auto', got "
                         f"{factory!r}.")
    if factory == "auto":
        return
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f"`faiss_factory`={factory!r} is not a FAISS index_factory string for {dim}-d rows: "
                         f"{first}") from None


def source_records(source) -> list[dict]:
    """The records of a source in its order; a repeated id keeps its first record (as `build_retrieval_index`)."""
    records, seen = [], set()
    for record in source:
        if record["id"] not in seen:
            seen.add(record["id"])
            records.append(record)
    if len(records) == 0:
        raise ValueError(f"`source`={getattr(source, 'root', source)!r} holds no image.")
    return records


def _plan(pipe, source, records: list[dict], batch_size: int, part_rows: int, dtype: torch.dtype) -> dict:
    return {
        "format": PLAN_FORMAT,
        "source_root": os.path.abspath(source.root) if source.root is not None else None,
        "num_records": len(records),
        "ids_sha256": _ids_hash(records),
        "batch_size": batch_size,
        "part_rows": part_rows,
        "dtype": dtype_name(dtype),
        "weights": weights_fingerprint(pipe),
    }


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def check_output_dir(output_dir: str, plan: dict, resume: bool) -> str:
    """What `output_dir` holds, checked against this build: `"new"` (nothing yet), `"resume"` (an unfinished build
    of the same plan) or `"done"` (the finished set of the same plan). Anything else is a ValueError naming the
    folder: another build, another set, or files of the user that a build would mix with."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir`={output_dir!r} exists and is not a folder.")
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    plan_path = os.path.join(output_dir, BUILD_DIR, PLAN_FILE)
    has_set = INDEX_CONFIG_FILE in entries
    if os.path.isfile(plan_path):
        before = _read_json(plan_path)
        if not isinstance(before, dict) or before.get("format") != PLAN_FORMAT:
            raise ValueError(f"`output_dir`={output_dir!r}: {plan_path} is not the plan of a build; delete it.")
        changed = sorted(k for k in set(before) | set(plan) if before.get(k) != plan.get(k))
        if changed:
            raise ValueError(
                f"`output_dir`={output_dir!r} holds an unfinished build of another source, model or settings (differs "
                f"in: {', '.join(changed)}); pass another folder, or delete {os.path.join(output_dir, BUILD_DIR)}."
            )
        if not resume:
            raise ValueError(f"`output_dir`={output_dir!r} holds an unfinished build of this source: pass `resume=True` "
                             "(`--resume`) to finish it, or another folder.")
        return "resume"
    if has_set:
        config = _read_json(os.path.join(output_dir, INDEX_CONFIG_FILE)) or {}
        same = config.get("weights") == plan["weights"] and config.get("num_images") is not None
        if not resume or not same:
            why = "" if same else " made with other weights"
            raise ValueError(
                f"`output_dir`={output_dir!r} already holds a retrieval set{why} ({config.get('num_images')} images); "
                "pass another folder" + (", or `resume=True` (`--resume`) to check it is this build's." if same and
                                         not resume else ".")
            )
        return "done"
    others = [e for e in entries if e != BUILD_DIR]
    if others:
        raise ValueError(f"`output_dir`={output_dir!r} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                         "a build writes only into a new or empty folder, so that none of your files is overwritten.")
    return "new"


def _part_paths(build_dir: str, part: int) -> tuple[str, str]:
    base = os.path.join(build_dir, PART_TEMPLATE.format(part))
    return base + ".safetensors", base + ".jsonl"


def plan_hash(plan: dict) -> str:
    return _sha256(json.dumps(plan, sort_keys=True))


def read_part(build_dir: str, part: int, planned: list[dict], dim: int, plan: dict) -> tuple[torch.Tensor, list[dict]] | None:
    """The embeddings and records of a part written by this plan, or None when it is absent, cut short, or of
    another plan or other records (then it is embedded again)."""
    tensor_path, records_path = _part_paths(build_dir, part)
    if not (os.path.isfile(tensor_path) and os.path.isfile(records_path)):
        return None
    try:
        with open(records_path, encoding="utf-8") as f:
            text = f.read()
        with safe_open(tensor_path, framework="pt") as f:
            meta = f.metadata() or {}
            embeddings = f.get_tensor("embeddings")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, ValueError) as error:
        logger.warning(f"{tensor_path}: unreadable ({error}); the part is embedded again.")
        return None
    problem = None
    if meta.get("plan_sha256") != plan_hash(plan) or meta.get("ids_sha256") != _ids_hash(planned):
        problem = "written by another build (source, model or settings)"
    elif meta.get("records_sha256") != _sha256(text):
        problem = "its records file does not match it"
    elif embeddings.dtype != torch.float32 or embeddings.ndim != 2 or embeddings.shape != (len(records), dim):
        problem = f"holds {tuple(embeddings.shape)} {embeddings.dtype} for {len(records)} records of width {dim}"
    if problem is not None:
        logger.warning(f"{tensor_path}: {problem}; the part is embedded again.")
        return None
    return embeddings, records


def _write_part(build_dir: str, part: int, planned: list[dict], embeddings: torch.Tensor, records: list[dict],
                plan: dict):
    tensor_path, records_path = _part_paths(build_dir, part)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    # The records first, the embeddings (with the hash of the records) last: the embeddings file marks a part done.
    atomic_write_text(records_path, text)
    meta = {"format": "pt", "part": str(part), "plan_sha256": plan_hash(plan), "ids_sha256": _ids_hash(planned),
            "records_sha256": _sha256(text)}
    tmp = f"{tensor_path}.tmp{os.getpid()}"
    try:
        save_file({"embeddings": embeddings.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, tensor_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _embed_part(pipe, source, planned: list[dict], batch_size: int, pool, allow_urls: bool, device):
    def load(record):
        try:
            return load_record_image(record, source.root, allow_urls=allow_urls)
        except ImageLoadError as error:
            return error

    blocks, kept = [], []
    for start in range(0, len(planned), batch_size):
        batch = planned[start : start + batch_size]
        images = list(pool.map(load, batch)) if pool is not None else [load(r) for r in batch]
        good = []
        for record, image in zip(batch, images):
            if isinstance(image, ImageLoadError):
                logger.warning(f"Skipping {record['id']!r}: {image}")
            else:
                good.append((record, image))
        if good:
            blocks.append(embed_images(pipe, [image for _, image in good], device).float().cpu())
            kept.extend(record for record, _ in good)
    dim = pipe.gill.config.retrieval_dim
    return (torch.cat(blocks) if blocks else torch.empty(0, dim)), kept


def build_retrieval_set(
    pipe,
    source,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    part_rows: int = DEFAULT_PART_ROWS,
    dtype: torch.dtype = torch.float16,
    faiss_factory: str | None = None,
    resume: bool = False,
    allow_urls: bool = False,
    num_workers: int = 4,
    max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS,
    device: torch.device | None = None,
    workers: Workers | None = None,
    progress: bool = True,
) -> RetrievalIndex | None:
    r"""
    Embeds every image of `source` into a new retrieval set in `output_dir`, as this worker's share of the job (see
    the module docstring); the same call on 1 or N workers gives the same set, bit for bit.

    Args:
        pipe ([`GILLPipeline`]): Gives the vision encoder and the learned projection (and their fingerprint).
        source: What [`build_retrieval_index`] takes: a folder of images, a caption `.tsv`/`.csv`, webdataset `.tar`
            shards, or a source object.
        output_dir (`str`): A new or empty folder (or this build's, with `resume=True`); on a shared file system
            when the workers run on several machines.
        batch_size (`int`, *optional*, defaults to 32): Images per vision-encoder call.
        part_rows (`int`, *optional*, defaults to 4096): Records per part: the unit of work, of resuming and of
            merging. A multiple of `batch_size` gives the batches of [`build_retrieval_index`].
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): Storage dtype of the set.
        faiss_factory (`str`, *optional*): A FAISS `index_factory` string: after the merge, `use_faiss(faiss_factory)`
            builds the ANN index, and the set is saved with it. Checked before anything is embedded.
        resume (`bool`, *optional*, defaults to `False`): Finish the unfinished build in `output_dir`.
        allow_urls (`bool`, *optional*, defaults to `False`): Download images given as URLs.
        num_workers (`int`, *optional*, defaults to 4): Threads per worker that read and decode images.
        max_shard_rows (`int`, *optional*, defaults to 100_000): Rows per shard of the saved set.
        device (`torch.device`, *optional*): Where the vision encoder runs; defaults to the pipeline's device.
        workers ([`~gill_pipeline.utils.distributed.Workers`], *optional*): This worker's place; defaults to what
            `accelerate launch` set in the environment (one worker without it).

    Returns:
        [`RetrievalIndex`] on worker 0 (the saved set), `None` on the others.
    """
    for name, value in (("batch_size", batch_size), ("part_rows", part_rows), ("max_shard_rows", max_shard_rows)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
    dtype_name(dtype)
    if pipe.image_encoder is None or pipe.feature_extractor is None:
        raise ValueError("Building a retrieval set needs the pipeline's `image_encoder` and `feature_extractor`.")
    workers = current_workers() if workers is None else workers
    output_dir = str(output_dir)
    source = as_source(source)
    dim = pipe.gill.config.retrieval_dim
    if faiss_factory is not None:
        check_faiss_factory(faiss_factory, dim)
    records = source_records(source)
    plan = _plan(pipe, source, records, batch_size, part_rows, dtype)
    state = check_output_dir(output_dir, plan, resume)
    if state == "done":
        index = RetrievalIndex.from_pretrained(output_dir, image_root=source.root)
        # Images that could not be read are not in the set; every other is, in the source's order. Compared by id
        # hash from the row indexes: a finished 100M-row set is not parsed again.
        if not index.records.is_ordered_subset_of([r["id"] for r in records]):
            raise ValueError(f"`output_dir`={output_dir!r} holds a retrieval set of other images than `source`; pass "
                             "another folder.")
        logger.info(f"{output_dir} already holds this set ({len(index)} images): nothing to embed.")
        return _finish(index, output_dir, faiss_factory, max_shard_rows) if workers.is_main else None
    # Every worker has checked the same folder; nobody writes before all have.
    workers.barrier()
    build_dir = os.path.join(output_dir, BUILD_DIR)
    os.makedirs(build_dir, exist_ok=True)
    if workers.is_main and state == "new":
        atomic_write_text(os.path.join(build_dir, PLAN_FILE), json.dumps(plan, indent=2) + "\n")

    parts = [records[s : s + part_rows] for s in range(0, len(records), part_rows)]
    mine = workers.share(len(parts))
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        desc = f"Embedding images (worker {workers.rank + 1}/{workers.world_size})" if workers.distributed else "Embedding images"
        for part in tqdm(mine, desc=desc, unit="part", disable=not progress):
            if read_part(build_dir, part, parts[part], dim, plan) is not None:
                continue
            embeddings, kept = _embed_part(pipe, source, parts[part], batch_size, pool, allow_urls, device)
            _write_part(build_dir, part, parts[part], embeddings, kept, plan)
    finally:
        if pool is not None:
            pool.shutdown()
    workers.barrier()
    if not workers.is_main:
        return None

    index = RetrievalIndex.empty(pipe, dtype=dtype, image_root=source.root)
    for part, planned in enumerate(parts):
        found = read_part(build_dir, part, planned, dim, plan)
        if found is None:
            raise RuntimeError(f"Part {part} of the build in {build_dir} is missing after every worker finished; rerun "
                               "with `resume=True` (`--resume`) to embed it again.")
        index.add_embeddings(*found)
    failed = len(records) - len(index)
    if not len(index):
        raise ValueError(f"`source`={source.root!r}: none of the {len(records)} images could be read (see the warnings); "
                         f"the parts stay in {build_dir}.")
    if failed:
        logger.warning(f"{failed} of the {len(records)} images could not be read and are not in the set.")
    index.save_pretrained(output_dir, max_shard_rows=max_shard_rows)
    shutil.rmtree(build_dir)
    logger.info(f"Retrieval set: {len(index)} images in {output_dir} ({workers.world_size} worker(s)).")
    return _finish(index, output_dir, faiss_factory, max_shard_rows)


def _finish(index: RetrievalIndex, output_dir: str, faiss_factory: str | None, max_shard_rows: int) -> RetrievalIndex:
    """Builds the FAISS index when asked and saves the set with it (what `save_pretrained` keeps of it)."""
    if faiss_factory is None:
        return index
    try:
        index.use_faiss(faiss_factory)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"The set is saved in {output_dir}, but the FAISS index `faiss_factory`={faiss_factory!r} "
                         f"could not be built on its {len(index)} rows: {error}") from error
    index.save_pretrained(output_dir, max_shard_rows=max_shard_rows)
    return index
