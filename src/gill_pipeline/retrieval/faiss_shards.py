"""FAISS indexes that outlive the process: trained once, written to disk beside the retrieval set, read back
memory-mapped without a rebuild, in one file or in several (shards searched together, top-k merged by score), with
an optional exact re-ranking of the candidates on the stored rows.

The saved form is a JSON block (in `retrieval_index.json` under `"faiss"`) plus one file per shard written by
`faiss.write_index` (FAISS' own binary format, not a pickle). The block records the factory string, the metric, the
search parameters, the recall measured when the parameters were chosen, and what each file must hold; a file that
does not match it is refused.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import logging

from .files import RetrievalIndexError, atomic_write
from .search import SearchResult, _check_k, _check_queries, gather_rows, import_faiss


logger = logging.get_logger(__name__)

FAISS_FILE_TEMPLATE = "faiss-{:05d}.index"
# The trained index without rows (centroids, codebooks): new shards are copies of it, so rows added after a load
# need no training.
FAISS_TRAINED_FILE = "faiss-trained.index"
METRIC = "inner_product"
# Rows sampled to train an index that needs training (IVF centroids, PQ codebooks).
DEFAULT_TRAIN_SIZE = 100_000


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def describe_index(index) -> dict:
    """What a FAISS index is made of, comparable between the index that was saved and the file read back: its
    classes (outermost first), width, inverted lists and bytes per stored code."""
    faiss = import_faiss()
    classes, nlist, code_size = [], None, None
    node = faiss.downcast_index(index)
    while node is not None:
        # A "Flat" factory index is an IndexFlat that reads back as IndexFlatIP: the same thing.
        classes.append({"IndexFlatIP": "IndexFlat", "IndexFlatL2": "IndexFlat"}.get(type(node).__name__,
                                                                                 type(node).__name__))
        if isinstance(node, faiss.IndexIVF):
            nlist, code_size = int(node.nlist), int(node.code_size)
        elif code_size is None and hasattr(node, "code_size"):
            code_size = int(node.code_size)
        inner = getattr(node, "index", None) if isinstance(node, faiss.IndexPreTransform) else None
        inner = inner if inner is not None else getattr(node, "base_index", None)
        node = faiss.downcast_index(inner) if inner is not None else None
    return {"classes": classes, "dim": int(index.d), "nlist": nlist, "code_size": code_size}


def make_index(dim: int, factory: str):
    """An empty (untrained) FAISS index with the inner-product metric; a ValueError for a bad factory string.

    8-bit IVF-PQ indexes skip FAISS' polysemous training (as the factory's `np` suffix asks): it only serves Hamming
    pre-filtering, which these searches never use, and it was 95% of their training time (30 s against 1.4 s for
    `IVF64,PQ16` on 3000 rows)."""
    faiss = import_faiss()
    if not isinstance(factory, str) or not factory:
        raise ValueError(f"`factory` must be a FAISS index_factory string such as 'IVF1024,PQ32', got {factory!r}.")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"`factory`={factory!r} is not a FAISS index_factory string: {error}") from error
    ivf = _ivf_of(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False
    return index


def _ivf_of(index):
    """The inverted-file part of a FAISS index (through OPQ/pre-transforms), or None."""
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def train_index(dim: int, factory: str, sample, train_size: int = DEFAULT_TRAIN_SIZE, seed: int = 0):
    """An empty index of `factory`, trained on at most `train_size` rows drawn from `sample` when it needs training
    (raised to 39 rows per inverted list, FAISS' own minimum for its k-means, when `sample` has them: fewer leave
    the coarse quantizer under-trained and the recall measured on the sample would not hold)."""
    index = make_index(dim, factory)
    if not index.is_trained:
        sample = _as_numpy(sample)
        if sample.shape[0] == 0:
            raise ValueError(f"The FAISS index `factory`={factory!r} needs training rows, but none were given.")
        nlist = getattr(_ivf_of(index), "nlist", 0)
        train_size = max(train_size, 39 * nlist)
        if sample.shape[0] > train_size:
            pick = np.random.default_rng(seed).choice(sample.shape[0], train_size, replace=False)
            sample = sample[np.sort(pick)]
        logger.info(f"Training FAISS index {factory!r} on {sample.shape[0]} rows.")
        index.train(sample)
    return index


def set_search_params(index, factory: str, nprobe: int | None = None, ef_search: int | None = None) -> None:
    faiss = import_faiss()
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        try:
            params.set_index_parameter(index, name, value)
        except RuntimeError as error:
            raise ValueError(f"The FAISS index {factory!r} has no parameter `{name}`: {error}") from error


@dataclass
class FaissSettings:
    """How the FAISS index of a set was made and is searched; saved as the `"faiss"` block of the set's config.

    `rerank`: candidates fetched per wanted result (`k * rerank`) and re-scored exactly on the stored rows when the set
    has them (1: no re-ranking). `recall_at_10`: measured by [`measure_recall`] on the full index that was built and
    saved (rows of the set as queries, exact search over every row as the truth; `None` when not measured), with
    `recall_measurement` saying on what; `choice`: what [`choose_faiss_params`] tried and found on its tuning sample
    (its own `tuning_recall_at_10` there, on `tuning_sample_rows` rows).
    """

    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int = 1
    max_rows_per_file: int | None = None
    recall_at_10: float | None = None
    choice: dict | None = None
    recall_measurement: dict | None = None

    def __post_init__(self):
        if not isinstance(self.rerank, int) or isinstance(self.rerank, bool) or self.rerank < 1:
            raise ValueError(f"`rerank` must be an integer >= 1, got {self.rerank!r}.")
        if self.max_rows_per_file is not None and (not isinstance(self.max_rows_per_file, int)
                                                   or self.max_rows_per_file <= 0):
            raise ValueError(f"`max_rows_per_file` must be a positive integer or None, got {self.max_rows_per_file!r}.")


class ShardedFaissSearcher:
    r"""
    One or more FAISS indexes over consecutive runs of rows (shard `i` holds rows `first_rows[i]` onwards), searched
    together: each shard's top candidates, shifted to global rows, merged by score. With `rows_of` (a function from
    global rows to their stored embeddings) the best `k * settings.rerank` candidates are re-scored exactly.

    Build one with [`ShardedFaissSearcher.build`] or read one with [`read_faiss_files`].
    """

    name = "faiss"

    def __init__(self, indexes: list, first_rows: list[int], settings: FaissSettings, trained=None, rows_of=None):
        self.indexes, self.first_rows, self.settings = list(indexes), list(first_rows), settings
        self.trained = trained  # an empty trained index that new shards are copies of
        self.rows_of = rows_of
        self.dirty = True  # rows or files changed since the last save
        # Per shard, its saved file entry while the shard is unchanged since it was read or written: a save into the
        # same folder keeps those files. Shards read from files are memory-mapped and never grow.
        self.saved_files: list[dict | None] = [None] * len(self.indexes)
        self.saved_folder: str | None = None
        for index in self.indexes:
            set_search_params(index, settings.factory, settings.nprobe, settings.ef_search)

    @classmethod
    def build(cls, embeddings, settings: FaissSettings, train_size: int = DEFAULT_TRAIN_SIZE, seed: int = 0,
              rows_of=None) -> "ShardedFaissSearcher":
        """Trains once on a sample of `embeddings` and adds every row, `settings.max_rows_per_file` rows per shard.
        `embeddings` may be a list of blocks laid end to end (e.g. a memory-mapped set's shards): only the training
        sample and one block at a time are then in memory as float32."""
        blocks = [embeddings] if not isinstance(embeddings, (list, tuple)) else list(embeddings)
        blocks = [b for b in blocks if b.shape[0]] or blocks[:1]
        dim, num_rows = blocks[0].shape[1], sum(int(b.shape[0]) for b in blocks)
        # The rows `train_index` would sample from all the rows joined, read from the blocks.
        needs = make_index(dim, settings.factory)
        wanted = max(train_size, 39 * getattr(_ivf_of(needs), "nlist", 0)) if not needs.is_trained else 0
        if len(blocks) == 1 or num_rows <= wanted:
            sample = blocks[0] if len(blocks) == 1 else torch.cat([torch.as_tensor(b) for b in blocks])
        elif wanted:
            pick = np.sort(np.random.default_rng(seed).choice(num_rows, wanted, replace=False))
            sample = gather_rows([torch.as_tensor(b) for b in blocks], torch.from_numpy(pick))
        else:
            sample = blocks[0][:0]
        trained = train_index(dim, settings.factory, sample, train_size=train_size, seed=seed)
        searcher = cls([], [], settings, trained=trained, rows_of=rows_of)
        first = 0
        for block in blocks:
            searcher.add(block, first_row=first)
            first += int(block.shape[0])
        return searcher

    @property
    def ntotal(self) -> int:
        return sum(int(index.ntotal) for index in self.indexes)

    @property
    def dim(self) -> int:
        return int((self.indexes[0] if self.indexes else self.trained).d)

    def add(self, embeddings, first_row: int = 0) -> None:
        """Adds the rows not yet indexed: `embeddings` holds the set's rows from `first_row` on (the indexed rows are
        a prefix of the set). Fills the last shard up to `max_rows_per_file` rows, then opens new ones; shards read
        from files are memory-mapped and never grow."""
        faiss = import_faiss()
        if first_row > self.ntotal:
            raise ValueError(f"Rows {self.ntotal}..{first_row} are missing: `first_row`={first_row} is past the "
                             f"{self.ntotal} rows indexed.")
        end = first_row + embeddings.shape[0]
        start = self.ntotal
        limit = self.settings.max_rows_per_file or float("inf")
        while start < end:
            if not self.indexes or self.indexes[-1].ntotal >= limit or self.saved_files[-1] is not None:
                self.indexes.append(faiss.clone_index(self.trained))
                self.first_rows.append(start)
                self.saved_files.append(None)
                set_search_params(self.indexes[-1], self.settings.factory, self.settings.nprobe,
                                  self.settings.ef_search)
            room = limit - self.indexes[-1].ntotal
            stop = int(min(end, start + room))
            self.indexes[-1].add(_as_numpy(embeddings[start - first_row : stop - first_row]))
            start = stop
            self.dirty = True

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Changes the recall/speed trade-off without rebuilding; saved with the set."""
        for index in self.indexes:
            set_search_params(index, self.settings.factory, nprobe, ef_search)
        if nprobe is not None:
            self.settings.nprobe = nprobe
        if ef_search is not None:
            self.settings.ef_search = ef_search
        self.dirty = True

    def search(self, queries: torch.Tensor, k: int, rerank: bool = True) -> SearchResult:
        _check_k(k)
        queries = _check_queries(queries, self.dim)
        q = _as_numpy(queries)
        want = k * self.settings.rerank if (rerank and self.rows_of is not None) else k
        scores, rows = [], []
        for index, first in zip(self.indexes, self.first_rows):
            d, i = index.search(q, min(want, max(int(index.ntotal), 1)))
            scores.append(np.where(i >= 0, d, -np.inf).astype(np.float32))
            rows.append(np.where(i >= 0, i + first, -1))
        if not scores:
            scores, rows = [np.full((q.shape[0], 0), -np.inf, np.float32)], [np.full((q.shape[0], 0), -1)]
        scores, rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
        scores = torch.from_numpy(np.take_along_axis(scores, order, axis=1).copy())
        rows = torch.from_numpy(np.take_along_axis(rows, order, axis=1).astype(np.int64))
        if want > k:
            scores, rows = self._rerank(queries, scores, rows, k)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            scores = torch.cat([scores, torch.full((q.shape[0], pad), float("-inf"))], dim=1)
            rows = torch.cat([rows, torch.full((q.shape[0], pad), -1, dtype=torch.long)], dim=1)
        return SearchResult(scores=scores[:, :k], rows=rows[:, :k])

    def _rerank(self, queries, scores, rows, k):
        """Exact cosine similarities of the candidates, from the stored rows; the best `k` of them."""
        valid = rows >= 0
        vectors = self.rows_of(rows.clamp(min=0).reshape(-1)).float().reshape(*rows.shape, -1)
        exact = torch.einsum("qkd,qd->qk", vectors, queries.float().cpu()).masked_fill(~valid, float("-inf"))
        top = exact.topk(min(k, exact.shape[1]), dim=1)
        return top.values, rows.gather(1, top.indices).masked_fill(top.values == float("-inf"), -1)

    # ----------------------------------------------------------------------------------------------------------
    # Files
    # ----------------------------------------------------------------------------------------------------------
    def write_files(self, folder: str, in_use: set[str]) -> dict:
        """Writes the shards (all of them, or in the folder they were last saved to or read from only the new ones)
        under names the folder's current config does not read, each atomically, and returns the `"faiss"` block that
        describes them. The caller writes the config last."""
        faiss = import_faiss()
        same_folder = self.saved_folder == os.path.realpath(folder)
        files = []
        for i, (index, first) in enumerate(zip(self.indexes, self.first_rows)):
            if same_folder and self.saved_files[i] is not None and self.saved_files[i]["file"] in in_use:
                files.append(self.saved_files[i])
                continue
            name = free_faiss_file_name(i, in_use | {f["file"] for f in files})
            atomic_write(os.path.join(folder, name), lambda p, index=index: faiss.write_index(index, p))
            files.append({"file": name, "first_row": first, "num_rows": int(index.ntotal),
                          "index": describe_index(index)})
        trained = FAISS_TRAINED_FILE if FAISS_TRAINED_FILE not in in_use else FAISS_TRAINED_FILE.replace(
            ".index", "-r1.index")
        atomic_write(os.path.join(folder, trained), lambda p: faiss.write_index(self.trained, p))
        block = faiss_block(self.settings, self.dim, files, trained)
        self.saved_files, self.saved_folder, self.dirty = list(files), os.path.realpath(folder), False
        return block


class FaissShardWriter:
    r"""
    Builds the FAISS files of a set too large for memory: rows come in chunks (in the set's order), each shard of
    `settings.max_rows_per_file` rows is written to `folder` as soon as it is full and dropped from memory. `close()`
    writes the trained index and returns the `"faiss"` block for the set's config ([`read_faiss_files`] reads it).

    Args:
        folder (`str`): Where the files go (existing files of the same names are replaced atomically).
        trained: An empty trained FAISS index ([`train_index`] on a sample of the set).
        settings ([`FaissSettings`]): Factory string, search parameters, rows per file.
    """

    def __init__(self, folder: str, trained, settings: FaissSettings, in_use: set[str] = frozenset()):
        self.folder, self.trained, self.settings = folder, trained, settings
        self.in_use = set(in_use)  # names the folder's current config reads: never written over
        self.files: list[dict] = []
        self.current, self.rows = None, 0

    def add(self, chunk) -> None:
        faiss = import_faiss()
        chunk = _as_numpy(chunk)
        limit = self.settings.max_rows_per_file or float("inf")
        start = 0
        while start < chunk.shape[0]:
            if self.current is None:
                self.current, self.first_row = faiss.clone_index(self.trained), self.rows
            stop = int(min(chunk.shape[0], start + limit - self.current.ntotal))
            self.current.add(chunk[start:stop])
            self.rows += stop - start
            start = stop
            if self.current.ntotal >= limit:
                self._flush()

    def _flush(self) -> None:
        faiss = import_faiss()
        name = free_faiss_file_name(len(self.files), self.in_use)
        index = self.current
        atomic_write(os.path.join(self.folder, name), lambda p: faiss.write_index(index, p))
        self.files.append({"file": name, "first_row": self.first_row, "num_rows": int(index.ntotal),
                           "index": describe_index(index)})
        self.current = None

    def close(self) -> dict:
        faiss = import_faiss()
        if self.current is not None and self.current.ntotal:
            self._flush()
        trained = FAISS_TRAINED_FILE if FAISS_TRAINED_FILE not in self.in_use else FAISS_TRAINED_FILE.replace(
            ".index", "-r1.index")
        atomic_write(os.path.join(self.folder, trained), lambda p: faiss.write_index(self.trained, p))
        return faiss_block(self.settings, int(self.trained.d), self.files, trained)


def faiss_block(settings: FaissSettings, dim: int, files: list[dict], trained_file: str) -> dict:
    """The `"faiss"` entry of a set's config: how the index was made, how to search it, what its files hold."""
    return {
        "factory": settings.factory,
        "metric": METRIC,
        "dim": dim,
        "num_rows": sum(f["num_rows"] for f in files),
        "nprobe": settings.nprobe,
        "efSearch": settings.ef_search,
        "rerank": settings.rerank,
        "max_rows_per_file": settings.max_rows_per_file,
        "recall_at_10": settings.recall_at_10,
        "recall_measurement": settings.recall_measurement,
        "choice": settings.choice,
        "faiss_version": import_faiss().__version__,
        "trained_file": trained_file,
        "files": files,
    }


def free_faiss_file_name(i: int, in_use: set[str]) -> str:
    """`faiss-0000i.index`, or `-r1`, `-r2`, ... when the folder's config still reads that name."""
    name, rewrite = FAISS_FILE_TEMPLATE.format(i), 0
    while name in in_use:
        rewrite += 1
        name = FAISS_FILE_TEMPLATE.format(i).replace(".index", f"-r{rewrite}.index")
    return name


def faiss_files(block: dict | None) -> set[str]:
    """The files a `"faiss"` block reads."""
    names = {f["file"] for f in (block or {}).get("files", []) if isinstance(f, dict)}
    return names | ({block["trained_file"]} if isinstance((block or {}).get("trained_file"), str) else set())


def check_faiss_block(block: dict, where: str) -> None:
    """Raises [`RetrievalIndexError`] unless `block` is a `"faiss"` entry naming plain files (needs no faiss)."""
    if not isinstance(block, dict) or not isinstance(block.get("factory"), str) or not isinstance(
            block.get("files"), list):
        raise RetrievalIndexError(f"{where}: the `faiss` entry must name a `factory` and list its `files`, got "
                                  f"{block!r:.300}.")
    if block.get("metric") != METRIC:
        raise RetrievalIndexError(f"{where}: the FAISS `metric` must be {METRIC!r}, got {block.get('metric')!r}.")
    for entry in block["files"] + [{"file": block.get("trained_file")}]:
        name = entry.get("file") if isinstance(entry, dict) else None
        # File names are plain names: an index must not read files outside its folder.
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise RetrievalIndexError(f"{where}: FAISS file names must be plain file names, got {name!r}.")


def read_faiss_files(folder: str, block: dict, where: str, num_rows: int | None = None, mmap: bool = True,
                     rows_of=None) -> ShardedFaissSearcher:
    """The searcher of a saved `"faiss"` block, its files read memory-mapped (`mmap=True`: IVF inverted lists stay on
    disk and are paged in as searches touch them). Nothing is trained or rebuilt. A file whose width, row count or
    structure is not what the block and its factory string say is refused with an error naming the file."""
    faiss = import_faiss()
    check_faiss_block(block, where)
    settings = FaissSettings(
        factory=block["factory"], nprobe=block.get("nprobe"), ef_search=block.get("efSearch"),
        rerank=block.get("rerank") or 1, max_rows_per_file=block.get("max_rows_per_file"),
        recall_at_10=block.get("recall_at_10"), choice=block.get("choice"),
        recall_measurement=block.get("recall_measurement"),
    )
    dim = block.get("dim")
    expected = describe_index(make_index(dim, settings.factory)) if isinstance(dim, int) and dim > 0 else None
    if expected is None:
        raise RetrievalIndexError(f"{where}: the FAISS `dim` must be a positive integer, got {dim!r}.")
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    trained = _read_checked(os.path.join(folder, block["trained_file"]), 0, expected, settings.factory, dim, 0, where)
    indexes, first_rows, next_row = [], [], 0
    for entry in block["files"]:
        path = os.path.join(folder, entry["file"])
        index = _read_checked(path, flags, expected, settings.factory, dim, entry.get("num_rows"), where,
                              entry.get("first_row"), next_row)
        indexes.append(index)
        first_rows.append(next_row)
        next_row += int(index.ntotal)
    if num_rows is not None and next_row != num_rows:
        raise RetrievalIndexError(f"{where}: the FAISS files hold {next_row} rows, but the set has {num_rows}.")
    searcher = ShardedFaissSearcher(indexes, first_rows, settings, trained=trained, rows_of=rows_of)
    searcher.saved_files, searcher.saved_folder = list(block["files"]), os.path.realpath(folder)
    searcher.dirty = False
    return searcher


def _read_checked(path, flags, expected, factory, dim, num_rows, where, first_row=0, next_row=0):
    faiss = import_faiss()
    if not os.path.isfile(path):
        raise RetrievalIndexError(f"Missing file of the retrieval index: {path}")
    try:
        index = faiss.read_index(path, flags)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        raise RetrievalIndexError(f"Corrupted FAISS index file: {path} ({reason})") from error
    got = describe_index(index)
    structure = {key: got[key] for key in ("classes", "nlist", "code_size")}
    wanted = {key: expected[key] for key in ("classes", "nlist", "code_size")}
    if got["dim"] != dim or int(index.ntotal) != num_rows or structure != wanted or first_row != next_row:
        raise RetrievalIndexError(
            f"{path} does not match {where}: the file holds {index.ntotal} rows of width {got['dim']} "
            f"({structure}); the config says factory {factory!r} ({wanted}), {num_rows} rows of width {dim} "
            f"from row {first_row} (expected from row {next_row})."
        )
    return index
