"""Nearest-neighbour search over normalised embeddings: exact (chunked matrix product) or FAISS, one interface."""

from dataclasses import dataclass

import torch
from diffusers.utils import logging

from .page_advice import random_access


logger = logging.get_logger(__name__)

# Most similarity scores held in memory at once by the exact search (queries x rows of one chunk): 16 MB in fp32.
DEFAULT_MAX_SCORES_IN_MEMORY = 1 << 22
# Rows re-scored in float32 beyond `k` when the embeddings are stored in a lower precision: ranks near the k-th
# score can swap in fp16, and a re-score of a few extra rows makes the final order that of float32.
LOW_PRECISION_RESCORE_MARGIN = 16
FAISS_INSTALL_HINT = "FAISS search needs the `faiss-cpu` package: `pip install gill-pipeline[faiss]`."


@dataclass
class SearchResult:
    """`scores[q, j]`: similarity of query `q` to its `j`-th best row `rows[q, j]`, best first.

    Where fewer than `k` rows exist (or an approximate index found fewer), `rows` is -1 and `scores` is -inf.
    """

    scores: torch.Tensor
    rows: torch.Tensor


def _check_queries(queries: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"`queries` must be a torch.Tensor, got {type(queries).__name__}.")
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"`queries` must have shape (num_queries, {dim}), got {tuple(queries.shape)}.")
    return queries


def _check_k(k) -> None:
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")


def _pad(result: SearchResult, k: int) -> SearchResult:
    missing = k - result.rows.shape[1]
    if missing <= 0:
        return result
    q = result.rows.shape[0]
    scores = torch.cat([result.scores, torch.full((q, missing), float("-inf"))], dim=1)
    rows = torch.cat([result.rows, torch.full((q, missing), -1, dtype=torch.long)], dim=1)
    return SearchResult(scores=scores, rows=rows)


def gather_rows(blocks: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (global row numbers of the blocks laid end to end) as float32 on the CPU, shape `rows.shape + (D,)`;
    reads only those rows of each block (which may be memory-mapped files), never joins the blocks."""
    blocks = [b for b in blocks if b.shape[0]]
    flat = rows.reshape(-1).cpu()
    if len(blocks) == 1:
        with random_access(blocks):  # scattered rows of a memory-mapped file: no readahead
            return blocks[0][flat.to(blocks[0].device)].float().cpu().reshape(*rows.shape, -1)
    ends = torch.tensor([b.shape[0] for b in blocks]).cumsum(0)
    which = torch.searchsorted(ends, flat, right=True)
    out = torch.empty(flat.shape[0], blocks[0].shape[1])
    for b in which.unique().tolist():
        mask = which == b
        start = int(ends[b]) - blocks[b].shape[0]
        with random_access([blocks[b]]):
            out[mask] = blocks[b][(flat[mask] - start).to(blocks[b].device)].float().cpu()
    return out.reshape(*rows.shape, -1)


def _top_in_order(scores: torch.Tensor, rows: torch.Tensor | None, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `keep` of each query's candidates, ordered by score (descending) then row (ascending): the same
    answer whatever order the candidates came in and however the rows were split into chunks or blocks, ties
    included (`topk` alone keeps an arbitrary one of equal scores). `rows=None`: the rows are the columns."""
    keep = min(keep, scores.shape[1])
    # One more than kept: a query whose next candidate scores as its last kept one has a tie at the cut.
    top = scores.topk(min(keep + 1, scores.shape[1]), dim=1)
    values, indices = top.values[:, :keep], top.indices[:, :keep]
    picked = indices if rows is None else rows.gather(1, indices)
    if top.values.shape[1] > keep:
        tied = top.values[:, keep] >= values[:, -1]
    else:
        tied = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    # Such a query gets all its candidates at least that score (a few, not its whole row), ordered by row before the
    # cut below.
    if tied.any():
        counts = (scores[tied] >= values[tied][:, -1:]).sum(dim=1)
        wide = scores[tied].topk(int(counts.max()), dim=1)
        wide_rows = wide.indices if rows is None else rows[tied].gather(1, wide.indices)
        by_row = wide_rows.sort(dim=1, stable=True)
        wide_scores = wide.values.gather(1, by_row.indices)
        order = wide_scores.sort(dim=1, descending=True, stable=True).indices[:, :keep]
        values, picked = values.clone(), picked.clone()
        values[tied], picked[tied] = wide_scores.gather(1, order), by_row.values.gather(1, order)
    by_row = picked.sort(dim=1, stable=True)
    values = values.gather(1, by_row.indices)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), by_row.values.gather(1, order)


class ExactSearcher:
    r"""
    Exact maximum inner product search by a matrix product over chunks of rows, merging a running top-k: memory stays
    bounded by `max_scores_in_memory` scores whatever the number of rows.

    The rows may come as several blocks (e.g. the memory-mapped shards of a saved set): they are searched one block,
    one chunk at a time, never joined, with the same result (rows, scores, order and ties: equal scores are ordered
    by row) as one tensor. The product runs on the embeddings' device and in their dtype (fast for fp16 on GPUs and
    on recent CPUs); for embeddings stored below float32 the best `k + 16` rows are re-scored in float32 so the final
    order is exact.

    Args:
        embeddings (`torch.Tensor` or `list[torch.Tensor]`): `(N, D)` rows (normalised for cosine similarity), or
            blocks of rows laid end to end. Not copied.
        max_scores_in_memory (`int`, *optional*, defaults to 4M): bound on `num_queries x chunk_rows`.
    """

    name = "exact"

    def __init__(self, embeddings: torch.Tensor | list[torch.Tensor],
                 max_scores_in_memory: int = DEFAULT_MAX_SCORES_IN_MEMORY):
        if not isinstance(max_scores_in_memory, int) or max_scores_in_memory <= 0:
            raise ValueError(f"`max_scores_in_memory` must be a positive integer, got {max_scores_in_memory!r}.")
        self.add(embeddings)
        self.max_scores_in_memory = max_scores_in_memory

    def add(self, embeddings: torch.Tensor | list[torch.Tensor]) -> None:
        """The searcher reads the index's blocks; the index gives them again on `add` (see `RetrievalIndex`)."""
        blocks = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
        if not blocks or any(not isinstance(b, torch.Tensor) or b.ndim != 2 for b in blocks):
            raise ValueError("`embeddings` must be a 2-d tensor (N, dim) or a non-empty list of them.")
        self.blocks = [b for b in blocks if b.shape[0]] or blocks[:1]

    @property
    def embeddings(self) -> torch.Tensor:
        """The rows as one tensor (joins the blocks: for callers that need one; the search never does)."""
        return self.blocks[0] if len(self.blocks) == 1 else torch.cat(self.blocks)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        _check_k(k)
        first = self.blocks[0]
        queries = _check_queries(queries, first.shape[1]).to(first.device)
        num_rows, num_queries = sum(b.shape[0] for b in self.blocks), queries.shape[0]
        if num_rows == 0:
            return _pad(SearchResult(torch.empty(num_queries, 0), torch.empty(num_queries, 0, dtype=torch.long)), k)
        low_precision = any(b.dtype != torch.float32 for b in self.blocks)
        keep = min(num_rows, k + LOW_PRECISION_RESCORE_MARGIN if low_precision else k)
        chunk = max(keep, self.max_scores_in_memory // num_queries)
        best_scores = best_rows = None
        offset = 0
        for block in self.blocks:
            q = queries.to(device=block.device, dtype=block.dtype)
            for start in range(0, block.shape[0], chunk):
                scores = (q @ block[start : start + chunk].t()).float().to(first.device)
                top_scores, top_rows = _top_in_order(scores, None, keep)
                top_rows = top_rows + (offset + start)
                if best_scores is None:
                    best_scores, best_rows = top_scores, top_rows
                else:
                    best_scores, best_rows = _top_in_order(torch.cat([best_scores, top_scores], dim=1),
                                                           torch.cat([best_rows, top_rows], dim=1), keep)
            offset += block.shape[0]
        if low_precision:
            # Re-score the survivors in float32: (Q, keep, D) x (Q, D) -> (Q, keep).
            exact = torch.einsum("qkd,qd->qk", gather_rows(self.blocks, best_rows.cpu()), queries.float().cpu())
            best_scores, best_rows = _top_in_order(exact, best_rows.cpu(), k)
        else:
            best_scores, best_rows = best_scores[:, :k], best_rows[:, :k]
        return _pad(SearchResult(best_scores.cpu(), best_rows.cpu()), k)


def import_faiss():
    """Imports FAISS lazily, so the package works without it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(FAISS_INSTALL_HINT) from error
    return faiss


class FaissSearcher:
    r"""
    FAISS search over the same rows, with the same interface as [`ExactSearcher`]. Inner-product metric, so scores
    are cosine similarities for normalised rows.

    Args:
        embeddings (`torch.Tensor`): `(N, D)` rows; copied to float32 on the CPU for FAISS.
        factory (`str`, *optional*, defaults to `"Flat"`):
            A FAISS `index_factory` string: `"Flat"` (exact), `"IVF1024,Flat"`, `"HNSW32"`, `"IVF4096,PQ32"`, ...
        nprobe (`int`, *optional*): Clusters visited per query by IVF indexes (FAISS' default is 1).
        ef_search (`int`, *optional*): Candidate list size of HNSW indexes (FAISS' default is 16).
        train_size (`int`, *optional*, defaults to 100_000): Rows sampled to train indexes that need training.
        seed (`int`, *optional*, defaults to 0): Seed of that sample.
    """

    name = "faiss"

    def __init__(
        self,
        embeddings: torch.Tensor,
        factory: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        train_size: int = 100_000,
        seed: int = 0,
    ):
        faiss = import_faiss()
        if not isinstance(factory, str) or not factory:
            raise ValueError(f"`factory` must be a FAISS index_factory string such as 'Flat', got {factory!r}.")
        dim = embeddings.shape[1]
        try:
            self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(f"`factory`={factory!r} is not a FAISS index_factory string: {error}") from error
        self.factory = factory
        if not self.index.is_trained:
            if embeddings.shape[0] == 0:
                raise ValueError(f"The FAISS index `factory`={factory!r} needs training rows, but the index is empty.")
            generator = torch.Generator().manual_seed(seed)
            sample = torch.randperm(embeddings.shape[0], generator=generator)[:train_size]
            logger.info(f"Training FAISS index {factory!r} on {len(sample)} rows.")
            self.index.train(self._as_numpy(embeddings[sample.to(embeddings.device)]))
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)
        self.add(embeddings)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Changes the recall/speed trade-off of an approximate index without rebuilding it."""
        params = import_faiss().ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            if value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
            try:
                params.set_index_parameter(self.index, name, value)
            except RuntimeError as error:
                raise ValueError(f"The FAISS index {self.factory!r} has no parameter `{name}`: {error}") from error

    @staticmethod
    def _as_numpy(x: torch.Tensor):
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    def add(self, embeddings: torch.Tensor) -> None:
        """Adds the rows not yet in the FAISS index (the index's rows are a prefix of `embeddings`)."""
        new = embeddings[self.index.ntotal :]
        if new.shape[0]:
            self.index.add(self._as_numpy(new))

    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        _check_k(k)
        queries = _check_queries(queries, self.index.d)
        scores, rows = self.index.search(self._as_numpy(queries), k)
        rows = torch.from_numpy(rows).long()
        scores = torch.from_numpy(scores).float().masked_fill(rows < 0, float("-inf"))
        return SearchResult(scores=scores, rows=rows)
