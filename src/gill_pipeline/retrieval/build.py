"""Building (and growing, and resuming) a retrieval index with a pipeline's vision encoder."""

import os
from concurrent.futures import ThreadPoolExecutor

import PIL.Image
import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from .image_loading import ImageLoadError, is_url, load_record_image
from .index import RetrievalIndex
from .serialization import DEFAULT_MAX_SHARD_ROWS, INDEX_CONFIG_FILE
from .sources import as_source


logger = logging.get_logger(__name__)


@torch.no_grad()
def embed_images(pipe, images: list[PIL.Image.Image], device: torch.device | None = None) -> torch.Tensor:
    """RGB images -> normalised image-side retrieval embeddings `(N, retrieval_dim)` (vision encoder + projection)."""
    device = pipe._execution_device if device is None else device
    features = pipe.encode_image_features(images, device)
    gill_device = pipe.gill.ret_image_proj.weight.device
    return pipe.gill.image_retrieval_embeds(features.to(gill_device))


def _rebase(record: dict, source_root: str | None, index_root: str | None) -> dict:
    """Makes a record's local path relative to the index's image root when the source has another root."""
    if is_url(record["path"]) or source_root is None or index_root is None:
        return record
    if os.path.realpath(source_root) == os.path.realpath(index_root):
        return record
    full = os.path.realpath(os.path.join(source_root, record["path"]))
    root = os.path.realpath(index_root)
    if os.path.commonpath([full, root]) != root:
        raise ValueError(
            f"The image {full} is outside the index's image root {root}: an index reads images from one root. Put the "
            "new images under that root, or build a separate index."
        )
    return {**record, "path": os.path.relpath(full, root).replace(os.sep, "/")}


def build_retrieval_index(
    pipe,
    source,
    output_dir: str | os.PathLike | None = None,
    index: RetrievalIndex | None = None,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float16,
    max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS,
    allow_urls: bool = False,
    num_workers: int = 4,
    device: torch.device | None = None,
    progress: bool = True,
) -> RetrievalIndex:
    r"""
    Embeds the images of `source` with `pipe`'s vision encoder and image-side retrieval projection and adds them to
    an index, in batches, with a progress bar.

    Resumable and incremental: when `output_dir` already holds an index, it is loaded and only the images whose id
    it does not hold yet are embedded; every `max_shard_rows` new images are saved as a new shard. Run the same
    call again after an interruption, or after adding images to the source.

    Args:
        pipe ([`GILLPipeline`]): Gives the vision encoder and the learned projection (and their fingerprint).
        source: A folder of images, a CC3M-style `.tsv` caption file (header `caption<TAB>image`), webdataset `.tar`
            shards (a file, a glob, a list, or a folder of them), or a source object from
            `gill_pipeline.retrieval.sources`.
        output_dir (`str`, *optional*): Where the index is saved (and resumed from). Without it nothing is saved.
        index ([`RetrievalIndex`], *optional*): An in-memory index to add to (instead of loading `output_dir`).
        batch_size (`int`, *optional*, defaults to 32): Images per vision-encoder call.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): Storage dtype of a new index (fp16 or fp32).
        max_shard_rows (`int`, *optional*, defaults to 100_000): Rows per saved shard; also the checkpoint interval.
        allow_urls (`bool`, *optional*, defaults to `False`): Download images given as URLs.
        num_workers (`int`, *optional*, defaults to 4): Threads that read and decode images (0: in the main thread).
        device (`torch.device`, *optional*): Where the vision encoder runs; defaults to the pipeline's device.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        [`RetrievalIndex`]: The index, with the new images added. Unreadable images are skipped with a warning.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
    if pipe.image_encoder is None or pipe.feature_extractor is None:
        raise ValueError("Building a retrieval index needs the pipeline's `image_encoder` and `feature_extractor`.")
    source = as_source(source)
    output_dir = None if output_dir is None else str(output_dir)
    if index is None and output_dir is not None and os.path.isfile(os.path.join(output_dir, INDEX_CONFIG_FILE)):
        index = RetrievalIndex.from_pretrained(output_dir, image_root=source.root)
        logger.info(f"Adding to the index in {output_dir} ({len(index)} images); images already in it are skipped.")
    if index is None:
        index = RetrievalIndex.empty(pipe, dtype=dtype, image_root=source.root)
    else:
        index.check_compatible(pipe, where=output_dir)
        if index.image_root is None:
            index.image_root = source.root
        if dtype != index.dtype:
            logger.info(f"The index stores {index.dtype}; `dtype`={dtype} is ignored when adding to it.")

    try:
        total = len(source)
    except TypeError:
        total = None
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    stats = {"added": 0, "present": 0, "failed": 0}
    unsaved = 0

    def load(record):
        try:
            return load_record_image(record, source.root, allow_urls=allow_urls)
        except ImageLoadError as error:
            return error

    def flush(batch):
        nonlocal unsaved
        images = list(pool.map(load, batch)) if pool is not None else [load(r) for r in batch]
        good = []
        for record, image in zip(batch, images):
            if isinstance(image, ImageLoadError):
                logger.warning(f"Skipping {record['id']!r}: {image}")
                stats["failed"] += 1
            else:
                good.append((record, image))
        if good:
            embeds = embed_images(pipe, [image for _, image in good], device)
            index.add_embeddings(embeds, [_rebase(record, source.root, index.image_root) for record, _ in good])
            stats["added"] += len(good)
            unsaved += len(good)
        if output_dir is not None and unsaved >= max_shard_rows:
            index.save_pretrained(output_dir, max_shard_rows=max_shard_rows)
            unsaved = 0

    batch, pending_ids = [], set()
    try:
        bar = tqdm(source, total=total, desc="Embedding images", unit="img", disable=not progress)
        for record in bar:
            if record["id"] in index or record["id"] in pending_ids:
                stats["present"] += 1
                continue
            pending_ids.add(record["id"])
            batch.append(record)
            if len(batch) == batch_size:
                flush(batch)
                batch, pending_ids = [], set()
        if batch:
            flush(batch)
    finally:
        if pool is not None:
            pool.shutdown()
        # Save what was embedded, also when interrupted: a re-run then resumes after it.
        if output_dir is not None and (unsaved or not os.path.isfile(os.path.join(output_dir, INDEX_CONFIG_FILE))):
            index.save_pretrained(output_dir, max_shard_rows=max_shard_rows)
    logger.info(
        f"Retrieval index: {stats['added']} images added, {stats['present']} already present, {stats['failed']} "
        f"unreadable; {len(index)} in all."
    )
    return index
