"""What every protocol does the same way: examples in batches with a progress bar, records appended per batch,
images read from disk and saved per example."""

import os
from typing import Callable

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..pipeline.inputs import MAX_SEED, check_seed
from ..utils.image_io import read_image
from .datasets import Loaded
from .records import RecordLog


def load_rgb(path: str, max_pixels: int | None = None) -> PIL.Image.Image:
    """An image of the dataset or a generated one, RGB; above `max_pixels` (default: `image_io.MAX_IMAGE_PIXELS`) or
    undecodable it is a `ValueError` naming the file (the run stops; its records so far are kept for the rerun)."""
    return read_image(path, max_pixels=max_pixels)


def dataset_or_read(dataset: Loaded | None, read, *args) -> Loaded:
    """`dataset` (examples the caller read already, e.g. `gill evaluate` before loading any model), or `read(*args)`."""
    if dataset is None:
        return read(*args)
    if not isinstance(dataset, Loaded):
        raise TypeError(f"`dataset` must be the `Loaded` a reader of `evaluation.datasets` returns, got {type(dataset).__name__}.")
    return dataset


def to_tensor(images: list[PIL.Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images -> `(N, 3, H, W)` in [0, 1], resized to `size` (width, height) when given (bicubic)."""
    import numpy as np

    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), PIL.Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def limit_examples(examples: list, limit: int | None) -> list:
    if limit is None:
        return examples
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"`limit` must be a positive integer or None, got {limit!r}.")
    return examples[:limit]


def run_batches(
    log: RecordLog,
    examples: list,
    system: str,
    work: Callable[[list, list[int]], list[dict]],
    batch_size: int,
    seed: int,
    progress: bool = True,
    desc: str = "",
) -> None:
    """Runs `work(batch, seeds) -> records` over the examples `system` has not done yet, appending each batch's
    records. An example's seed is `seed` plus its place in the whole example list, so it does not depend on which
    examples a resumed run still had to do.

    Among N workers (`log.workers`) the batches are cut as one process cuts them, each worker runs a contiguous run
    of them, and worker 0 folds their records into `records.jsonl` in example order: the same file, images and seeds
    as one process."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    check_seed(seed, "seed")
    if examples and not check_seed(seed) + len(examples) - 1 < MAX_SEED:  # example i runs with seed + i
        raise ValueError(f"`seed`={seed!r} leaves no room for {len(examples)} examples' seeds below 2**63.")
    place = {example.id: i for i, example in enumerate(examples)}
    if len(place) != len(examples):
        raise ValueError("Example ids must be unique; the data file repeats one.")
    workers = log.workers
    # Records a killed worker left in its part: folded in first, so that every worker reads the same state.
    workers.barrier()
    folded = log.fold_parts(place) if workers.is_main else False
    workers.barrier()
    if folded or workers.distributed:
        log.reload()
    workers.barrier()
    todo = log.todo(examples, system)
    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    mine = [batches[b] for b in workers.share(len(batches))]
    for batch in tqdm(mine, desc=f"{desc} [{system}]", disable=not progress or not mine):
        records = work(batch, [seed + place[e.id] for e in batch])
        for record in records:
            record["system"] = system
        log.append_share(records)
    if workers.distributed:
        workers.barrier()
        if workers.is_main:
            log.fold_parts(place)
        workers.barrier()
        log.reload()


def save_image(log: RecordLog, system: str, example_id: str, image: PIL.Image.Image) -> str:
    """Saves a generated image; returns its path relative to the output folder (as records keep it)."""
    path = log.image_path(system, example_id)
    image.save(path)
    return os.path.relpath(path, log.output_dir)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
