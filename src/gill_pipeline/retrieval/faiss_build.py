"""A FAISS index for a retrieval set already saved, however large: its embedding shards are streamed from disk
(memory-mapped, a chunk at a time), never all in memory, and the index files and their `"faiss"` block are added to
the folder. The way to index a set of 100M images built by `build_retrieval_index` or `gill index build`."""

import json
import os

import numpy as np
import torch
from diffusers.utils import logging

from .faiss_params import (DEFAULT_RECALL_QUERIES, check_memory_mapped, choose_faiss_params, measure_recall,
                           tune_and_measure_recall)
from .faiss_shards import (
    DEFAULT_TRAIN_SIZE,
    FaissSettings,
    FaissShardWriter,
    faiss_files,
    read_faiss_files,
    train_index,
)
from .files import RetrievalIndexError, atomic_write
from .search import gather_rows
from .serialization import (
    EMBEDDINGS_KEY,
    INDEX_CONFIG_FILE,
    SHARD_FILE_PATTERN,
    RetrievalIndexSerializationMixin,
    _mmap_safetensors,
)


logger = logging.get_logger(__name__)

# Rows read from the memory-mapped shards per FAISS `add` call.
ADD_CHUNK_ROWS = 250_000
DEFAULT_MAX_ROWS_PER_FILE = 10_000_000
# Random rows of the set read to choose the index's parameters and to train it.
DEFAULT_SAMPLE_ROWS = 200_000


def add_faiss_index(
    folder: str | os.PathLike,
    factory: str = "auto",
    nprobe: int | None = None,
    ef_search: int | None = None,
    rerank: int = 1,
    target_recall: float = 0.95,
    max_bytes_per_image: float = 64,
    max_rows_per_file: int | None = DEFAULT_MAX_ROWS_PER_FILE,
    sample_rows: int | None = None,
    train_size: int = DEFAULT_TRAIN_SIZE,
    recall_queries: int | None = DEFAULT_RECALL_QUERIES,
    seed: int = 0,
    memory_mapped: bool = False,
) -> FaissSettings:
    r"""
    Trains a FAISS index on a sample of a saved set and adds every row to it, streamed from the set's embedding
    shards, then writes its files (`max_rows_per_file` rows each) and its `"faiss"` entry into the folder's
    `retrieval_index.json` (config last, atomically: an interrupted call leaves the set as it was). The set then
    loads with `RetrievalIndex.from_pretrained(folder, mmap=True)` and searches with it, without a rebuild.

    Args:
        folder (`str`): A folder written by `save_pretrained` / `build_retrieval_index` with its embeddings.
        factory (`str`, *optional*, defaults to `"auto"`): A FAISS `index_factory` string, or `"auto"` to choose one
            by measurement on `sample_rows` random rows of the set ([`choose_faiss_params`], `target_recall`,
            `max_bytes_per_image`).
        nprobe, ef_search, rerank: As in [`~RetrievalIndex.use_faiss`] (ignored with `"auto"`, which chooses them).
        max_rows_per_file (`int`, *optional*, defaults to 10M): Rows per FAISS file (several files are searched
            together and merged).
        sample_rows (`int`, *optional*, defaults to 200,000 (`DEFAULT_SAMPLE_ROWS`)): Random rows read for choosing
            and training.
        recall_queries (`int`, *optional*, defaults to 200): Rows of the set, outside that sample, searched with the
            full index once it is written and with exact search over every row (streamed block by block) to measure
            the recall@10 recorded in the config (`recall_at_10`, with `recall_measurement`); what `"auto"` measured
            on the sample is kept apart as `choice.tuning_recall_at_10`. `None` or 0: not measured (`null`). With
            `"auto"`, `nprobe` and the re-ranking depth are first re-tuned on the full index to `target_recall`
            ([`tune_and_measure_recall`]: half the queries tune, the other half measure).
        memory_mapped (`bool`, *optional*, defaults to `False`): With `"auto"`, only codes a load memory-maps (8-bit
            PQ; see [`choose_faiss_params`]).
    """
    check_memory_mapped(memory_mapped, factory)
    folder = str(folder)
    config = RetrievalIndexSerializationMixin._read_config(folder)
    config_path = os.path.join(folder, INDEX_CONFIG_FILE)
    shards = config.get("shards", [])
    if not shards or any(shard.get("embeddings") is None for shard in shards):
        raise RetrievalIndexError(f"{config_path}: `add_faiss_index` needs a set saved with its embeddings.")
    sample_rows = DEFAULT_SAMPLE_ROWS if sample_rows is None else sample_rows
    if not isinstance(sample_rows, int) or isinstance(sample_rows, bool) or sample_rows <= 0:
        raise ValueError(f"`sample_rows` must be a positive integer, got {sample_rows!r}.")
    if recall_queries is not None and (not isinstance(recall_queries, int) or isinstance(recall_queries, bool)
                                       or recall_queries < 0):
        raise ValueError(f"`recall_queries` must be a non-negative integer or None, got {recall_queries!r}.")
    blocks = [_mmap_safetensors(os.path.join(folder, shard["embeddings"]))[EMBEDDINGS_KEY] for shard in shards]
    sizes = np.array([b.shape[0] for b in blocks])
    num_rows = int(sizes.sum())
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(num_rows, size=min(sample_rows, num_rows), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(np.cumsum(sizes), picked, side="right")
    sample = torch.cat([blocks[b][torch.from_numpy(picked[which == b] - starts[b])].float()
                        for b in np.unique(which)]).numpy()
    if factory == "auto":
        params = choose_faiss_params(sample, target_recall=target_recall, max_bytes_per_image=max_bytes_per_image,
                                     seed=seed, memory_mapped=memory_mapped)
        settings = params.settings(max_rows_per_file=max_rows_per_file)
    else:
        settings = FaissSettings(factory, nprobe=nprobe, ef_search=ef_search, rerank=rerank,
                                 max_rows_per_file=max_rows_per_file)
    trained = train_index(sample.shape[1], settings.factory, sample, train_size=train_size, seed=seed)
    del sample
    previous = faiss_files(config.get("faiss"))
    writer = FaissShardWriter(folder, trained, settings, in_use=previous)
    for block in blocks:
        for start in range(0, block.shape[0], ADD_CHUNK_ROWS):
            writer.add(block[start : start + ADD_CHUNK_ROWS].float())
        logger.info(f"FAISS index of {folder}: {writer.rows} of {num_rows} rows added.")
    block = writer.close()
    if recall_queries and num_rows >= 2:  # a row's neighbours other than itself: none in a set of one
        # On the full index as saved (memory-mapped), never the tuning sample's recall.
        searcher = read_faiss_files(folder, block, config_path, num_rows=num_rows,
                                    rows_of=lambda rows: gather_rows(blocks, rows))
        if factory == "auto":  # nprobe and re-ranking re-tuned on the full index: the sample's do not hold
            measured = tune_and_measure_recall(searcher, blocks, target_recall=target_recall,
                                               num_queries=recall_queries, avoid_rows=picked, seed=seed)
            tuned = searcher.settings
            settings.nprobe, settings.ef_search, settings.rerank = tuned.nprobe, tuned.ef_search, tuned.rerank
            block["nprobe"], block["efSearch"], block["rerank"] = tuned.nprobe, tuned.ef_search, tuned.rerank
        else:
            measured = measure_recall(searcher, blocks, num_queries=recall_queries, avoid_rows=picked, seed=seed)
        settings.recall_at_10 = measured.pop("recall_at_10")
        settings.recall_measurement = {**measured, "tuning_sample_rows": int(picked.shape[0])}
        block["recall_at_10"], block["recall_measurement"] = settings.recall_at_10, settings.recall_measurement
        logger.info(f"FAISS index of {folder}: recall@10 {settings.recall_at_10:.3f} on the full set "
                    f"({measured['queries']} queries, {num_rows} rows).")
        del searcher
    config["faiss"] = block

    def write_config(path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    atomic_write(config_path, write_config)
    for name in sorted(previous - faiss_files(config["faiss"])):
        if SHARD_FILE_PATTERN.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    return settings
