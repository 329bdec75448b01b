"""Choosing a FAISS index for a retrieval set by measurement, as autofaiss does: candidates within a memory budget are
built on the set's own rows, their recall@10 measured against exact search for held-out rows of the set, and the
fastest one that meets the target recall is kept, with what was measured."""

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from diffusers.utils import logging

from .faiss_shards import FaissSettings, ShardedFaissSearcher, _as_numpy, make_index
from .search import ExactSearcher, gather_rows, import_faiss


logger = logging.get_logger(__name__)

# IVF indexes keep an 8-byte id beside each code.
IVF_ID_BYTES = 8
NPROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EF_SEARCH_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)
# Re-ranking depths (candidates fetched per wanted result). Deeper ones matter at scale: at 10M clustered rows 4-bit
# codes alone find 0.42 of the true top-10 and re-ranking 10x reaches 0.88, 50x 0.97 (benchmarks/results).
RERANK_CANDIDATES = (1, 4, 10, 20, 50, 100)
# A sweep of nprobe / efSearch stops once doubling it gains less recall than this (codes-only recall plateaus).
PLATEAU_GAIN = 0.002
# Codes tried by default, smallest first: 4-bit fast-scan PQ with 16, 8, 4 and 2 dimensions per byte. Fast-scan is
# the fastest PQ search on CPUs (at 10M rows 1.4 ms against 3.4 ms for 8-bit PQ of the same bytes, same recall);
# pass `factories=` to try others (OPQ, HNSW, ...).
CODE_CANDIDATES = ("PQ{m16}x4fs", "PQ{m8}x4fs", "PQ{m4}x4fs", "PQ{m2}x4fs")
# With `memory_mapped=True`: 8-bit PQ codes, whose inverted lists `IO_FLAG_MMAP` maps (fast-scan codes live in block
# inverted lists that FAISS reads into memory whatever the flag). At 10M rows they search about 2x slower.
MAPPED_CODE_CANDIDATES = ("PQ{m16}", "PQ{m8}", "PQ{m4}", "PQ{m2}")
# Rows of the set used as queries when the recall of a built index is measured on the full set.
DEFAULT_RECALL_QUERIES = 200
# Below this many rows the rows outside the tuning sample are listed; above, drawn at random and the sample's rejected.
LIST_FREE_ROWS_BELOW = 4_000_000


@dataclass
class FaissParams:
    """What [`choose_faiss_params`] chose and measured; `settings()` gives the [`FaissSettings`] to build it with."""

    factory: str
    nprobe: int
    rerank: int
    recall_at_10: float
    bytes_per_image: float
    ms_per_query: float
    met_target: bool
    tried: list[dict] = field(default_factory=list)
    sample_rows: int = 0
    held_out_queries: int = 0
    target_recall: float = 0.95
    max_bytes_per_image: float = 64
    memory_mapped: bool = False

    def settings(self, max_rows_per_file: int | None = None) -> FaissSettings:
        """The settings to build the chosen index with. What was measured on the tuning sample goes in `choice`
        (`tuning_recall_at_10`, `tuning_sample_rows`); the settings' own `recall_at_10` stays `None` until
        [`measure_recall`] measures it on the full index that is built."""
        renamed = {"recall_at_10": "tuning_recall_at_10", "sample_rows": "tuning_sample_rows"}
        choice = {renamed.get(k, k): v for k, v in asdict(self).items() if k not in ("factory", "nprobe", "rerank")}
        return FaissSettings(self.factory, nprobe=self.nprobe, rerank=self.rerank, max_rows_per_file=max_rows_per_file,
                             choice=choice)


def check_memory_mapped(memory_mapped, factory: str = "auto") -> None:
    """`memory_mapped` must be a bool, and True only where the factory is chosen (`"auto"`)."""
    if not isinstance(memory_mapped, bool):
        raise ValueError(f"`memory_mapped` must be True or False, got {memory_mapped!r}.")
    if memory_mapped and factory != "auto":
        raise ValueError(f"`memory_mapped=True` chooses the codes, so it needs `factory='auto'`, got {factory!r}: "
                         "pass a factory whose codes FAISS maps (e.g. 'IVF4096,PQ32') instead.")


def default_nlist(num_rows: int) -> int:
    """About 4 sqrt(N) inverted lists (a power of two), with at least 39 training rows per list in the set."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(num_rows, 1)), 1)))
    return int(max(1, min(nlist, 2 ** int(math.log2(max(num_rows // 39, 1))))))


def _code_candidates(dim: int, memory_mapped: bool = False) -> list[str]:
    out = []
    for pattern in MAPPED_CODE_CANDIDATES if memory_mapped else CODE_CANDIDATES:
        divisor = int(pattern[pattern.index("{m") + 2 : pattern.index("}")])
        if dim % divisor == 0 and (dim // divisor) % 2 == 0:  # fast-scan needs an even number of sub-quantizers
            out.append(pattern.format(m16=dim // 16, m8=dim // 8, m4=dim // 4, m2=dim // 2))
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(found, truth)]))


def choose_faiss_params(
    embeddings,
    target_recall: float = 0.95,
    max_bytes_per_image: float = 64,
    k: int = 10,
    num_queries: int = 200,
    nlist: int | None = None,
    factories: list[str] | None = None,
    rerank_candidates: tuple = RERANK_CANDIDATES,
    max_sample_rows: int = 1_000_000,
    seed: int = 0,
    memory_mapped: bool = False,
) -> FaissParams:
    r"""
    Picks a FAISS index (factory string, `nprobe`, re-ranking depth) for rows like `embeddings` by measuring.

    `num_queries` rows of `embeddings` are held out as queries; the rest (at most `max_sample_rows`) are indexed by
    each candidate, and recall@`k` (the fraction of the exact top-`k` found) is measured against exact search over
    the same rows, for every `nprobe` and re-ranking depth. Of the candidates that stay within `max_bytes_per_image`
    (codes + ids, as FAISS stores them) and reach `target_recall`, the fastest on one thread is returned; when none
    reaches it, the one with the highest recall, with `met_target=False` and a warning.

    Args:
        embeddings (`torch.Tensor` or `np.ndarray`): `(N, D)` normalised rows of the set (or a sample of them).
        target_recall (`float`, *optional*, defaults to 0.95): Wanted recall@`k` against exact search.
        max_bytes_per_image (`float`, *optional*, defaults to 64): Memory budget of the index per row.
        k (`int`, *optional*, defaults to 10): The `k` of recall@`k`.
        num_queries (`int`, *optional*, defaults to 200): Held-out rows used as queries.
        nlist (`int`, *optional*): Inverted lists; defaults to about 4 sqrt(N) of the sample. For a set larger than
            the sample, build with the same nlist/N ratio's nprobe fraction, and check recall on the full set.
        factories (`list[str]`, *optional*): Candidate factory strings instead of the IVF-PQ family tried by default.
        rerank_candidates (`tuple[int]`, *optional*): Re-ranking depths tried (1: none; >1 needs the set's embeddings
            kept at search time).
        max_sample_rows (`int`, *optional*, defaults to 1M): Rows of `embeddings` used at most.
        seed (`int`, *optional*, defaults to 0): Seed of the held-out split.
        memory_mapped (`bool`, *optional*, defaults to `False`): Try only codes that a load memory-maps (8-bit PQ:
            only the inverted lists a query visits are read from disk). The default 4-bit fast-scan codes search
            faster but are read into memory at load (40 bytes/image: 4 GB for 100M rows).
    """
    check_memory_mapped(memory_mapped)
    if not isinstance(target_recall, (int, float)) or not 0 < target_recall <= 1:
        raise ValueError(f"`target_recall` must be in (0, 1], got {target_recall!r}.")
    if not isinstance(max_bytes_per_image, (int, float)) or max_bytes_per_image <= 0:
        raise ValueError(f"`max_bytes_per_image` must be a positive number, got {max_bytes_per_image!r}.")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if not isinstance(num_queries, int) or num_queries <= 0:
        raise ValueError(f"`num_queries` must be a positive integer, got {num_queries!r}.")
    if any(not isinstance(r, int) or r < 1 for r in rerank_candidates) or not rerank_candidates:
        raise ValueError(f"`rerank_candidates` must be integers >= 1, got {rerank_candidates!r}.")
    rows = _as_numpy(embeddings)
    if rows.ndim != 2 or rows.shape[0] < num_queries + 100:
        raise ValueError(f"`embeddings` must be (N, D) with N >= num_queries + 100 = {num_queries + 100} rows, got "
                         f"{tuple(rows.shape)}.")
    faiss = import_faiss()
    rng = np.random.default_rng(seed)
    pick = rng.permutation(rows.shape[0])
    queries = rows[pick[:num_queries]]
    base = rows[np.sort(pick[num_queries : num_queries + max_sample_rows])]
    dim = base.shape[1]
    truth = _exact_top(base, queries, k)
    nlist = nlist or default_nlist(base.shape[0])
    # One coarse quantizer for every candidate: the k-means is the costly part of training.
    quantizer = faiss.IndexFlatIP(dim)
    kmeans = faiss.Kmeans(dim, nlist, niter=10, seed=seed, spherical=True, max_points_per_centroid=64)
    kmeans.train(base)
    quantizer.add(kmeans.centroids)
    tried = []
    for factory in factories or [f"IVF{nlist},{code}" for code in _code_candidates(dim, memory_mapped)]:
        index = make_index(dim, factory)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.nlist == nlist and not isinstance(index, faiss.IndexPreTransform):
            ivf.quantizer.add(kmeans.centroids)  # a trained quantizer: `train` then trains the codes only
        bytes_per_image = _bytes_per_image(index)
        if bytes_per_image > max_bytes_per_image:
            tried.append({"factory": factory, "bytes_per_image": bytes_per_image, "skipped": "over the budget"})
            continue
        if not index.is_trained:
            index.train(base[: max(65_536, 64 * nlist)])
        searcher = ShardedFaissSearcher([], [], FaissSettings(factory), trained=index,
                                        rows_of=lambda r: torch.from_numpy(base[r.numpy()]))
        searcher.add(base)
        probes = [p for p in NPROBE_CANDIDATES if p <= (ivf.nlist if ivf is not None else 1)]
        for rerank in rerank_candidates:
            searcher.settings.rerank = rerank
            for nprobe in probes:
                if ivf is not None:
                    searcher.set_search_params(nprobe=nprobe)
                result = searcher.search(torch.from_numpy(queries), k)
                recall = _recall(result.rows.numpy(), truth)
                if recall >= target_recall or nprobe == probes[-1]:
                    ms = _ms_per_query(searcher, queries, k)
                    tried.append({"factory": factory, "nprobe": nprobe, "rerank": rerank, "recall_at_10": recall,
                                  "bytes_per_image": bytes_per_image, "ms_per_query": ms})
                    logger.info(f"{factory} nprobe={nprobe} rerank={rerank}: recall@{k} {recall:.3f}, {ms:.2f} ms")
                    break
    measured = [t for t in tried if "recall_at_10" in t]
    if not measured:
        raise ValueError(f"No candidate index fits `max_bytes_per_image`={max_bytes_per_image}: tried {tried}.")
    meeting = [t for t in measured if t["recall_at_10"] >= target_recall]
    best = min(meeting, key=lambda t: (t["ms_per_query"], t["bytes_per_image"])) if meeting else max(
        measured, key=lambda t: t["recall_at_10"])
    if not meeting:
        logger.warning(f"No candidate reached recall@{k} {target_recall} within {max_bytes_per_image} bytes per image;"
                       f" the best reached {best['recall_at_10']:.3f} ({best['factory']}).")
    return FaissParams(best["factory"], best["nprobe"], best["rerank"], best["recall_at_10"],
                       best["bytes_per_image"], best["ms_per_query"], bool(meeting), tried, base.shape[0],
                       num_queries, float(target_recall), float(max_bytes_per_image), memory_mapped)


def _exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)[1]


def _bytes_per_image(index) -> float:
    """Bytes FAISS keeps per row: the code, plus the id of IVF indexes."""
    faiss = import_faiss()
    try:
        code = index.sa_code_size()
    except RuntimeError:
        code = index.d * 4
    ivf = faiss.try_extract_index_ivf(index)
    return float(code + (IVF_ID_BYTES if ivf is not None else 0) - (ivf.coarse_code_size() if ivf is not None else 0))


def _ms_per_query(searcher, queries: np.ndarray, k: int, repeats: int = 3) -> float:
    """Median time of one-query searches on one thread."""
    faiss = import_faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for q in queries[: max(repeats * 10, 1)]:
            start = time.perf_counter()
            searcher.search(torch.from_numpy(q[None]), k)
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(times) * 1e3)


def _query_rows(num_rows: int, num_queries: int, avoid: np.ndarray | None, rng) -> tuple[np.ndarray, bool]:
    """`num_queries` distinct rows of `range(num_rows)` outside `avoid` (the tuning sample) when there are enough of
    them, else from all rows; and whether they are outside it."""
    avoid = np.unique(np.asarray([] if avoid is None else avoid, dtype=np.int64))
    free = num_rows - avoid.shape[0]
    if avoid.shape[0] and free >= num_queries:
        if num_rows < LIST_FREE_ROWS_BELOW or free < 4 * num_queries:
            return np.sort(rng.choice(np.setdiff1d(np.arange(num_rows), avoid), num_queries, replace=False)), True
        picked = np.empty(0, dtype=np.int64)
        while picked.shape[0] < num_queries:  # most draws are outside a sample much smaller than the set
            draw = rng.integers(0, num_rows, size=2 * num_queries)
            picked = np.unique(np.concatenate([picked, draw[~np.isin(draw, avoid)]]))
        return np.sort(rng.choice(picked, num_queries, replace=False)), True
    return np.sort(rng.choice(num_rows, min(num_queries, num_rows), replace=False)), False


def _without(rows: torch.Tensor, own: np.ndarray, k: int) -> list[set]:
    """Per query, its first `k` rows other than the query's own row (and missing ones)."""
    out = []
    for q, found in enumerate(rows.tolist()):
        kept = [r for r in found if r >= 0 and r != own[q]]
        out.append(set(kept[:k]))
    return out


def _set_queries(blocks: list, num_queries: int, avoid_rows, seed: int, k: int):
    """Rows of the set drawn as queries (outside `avoid_rows` when there are enough), their vectors, and each one's
    exact top-`k` over every row other than itself (one pass over the blocks)."""
    num_rows = sum(int(b.shape[0]) for b in blocks)
    rows, outside = _query_rows(num_rows, num_queries, avoid_rows, np.random.default_rng(seed))
    queries = gather_rows(blocks, torch.from_numpy(rows))
    want = min(k + 1, num_rows)
    truth = _without(ExactSearcher(blocks).search(queries, want).rows, rows, k)
    return rows, outside, queries, truth


def _recall_against(searcher, queries, truth: list[set], k: int, own_rows=None) -> float:
    """Recall@`k` of `searcher` against `truth` (per query, its exact top-`k` rows); `own_rows`: each query's own row
    in the set, left out of what is found."""
    if own_rows is None:
        found = [set(r[r >= 0].tolist()) for r in searcher.search(queries, k).rows.numpy()]
    else:
        found = _without(searcher.search(queries, k + 1).rows, own_rows, k)
    return float(np.mean([len(f & t) / max(len(t), 1) for f, t in zip(found, truth)]))


def _search_knob(searcher) -> tuple[str | None, list]:
    """The speed/recall parameter of the index (`nprobe` of IVF, `ef_search` of HNSW, none) and the values tried."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(searcher.indexes[0] if searcher.indexes else searcher.trained)
    if ivf is not None:
        return "nprobe", [p for p in NPROBE_CANDIDATES if p <= ivf.nlist]
    if "HNSW" in searcher.settings.factory:
        return "ef_search", list(EF_SEARCH_CANDIDATES)
    return None, [None]


@torch.no_grad()
def tune_search_params(searcher, queries, truth: list[set], target_recall: float = 0.95, k: int = 10,
                       rerank_candidates: tuple = RERANK_CANDIDATES, own_rows=None) -> dict:
    r"""
    Sets the search parameters of a built FAISS index (`nprobe` or `ef_search`, and the re-ranking depth when the
    searcher has the stored rows) to the fastest ones on one thread whose recall@`k` against `truth` reaches
    `target_recall`; when none does, to the most accurate (with a warning). For each depth, smallest first, the
    parameter grows until the target is met or recall stops growing; a deeper depth is tried only with smaller
    values than a shallower one needed (anything else is slower).

    Args:
        searcher ([`ShardedFaissSearcher`]): The index as it is searched.
        queries (`torch.Tensor`): `(Q, D)` queries.
        truth (`list[set]`): Per query, its exact top-`k` rows.
        own_rows (*optional*): Per query, its own row when the queries are rows of the set (left out of the answers).

    Returns a dict: the chosen values, `recall_at_10` on these queries, `met_target` and everything `tried`.
    """
    if not isinstance(target_recall, (int, float)) or not 0 < target_recall <= 1:
        raise ValueError(f"`target_recall` must be in (0, 1], got {target_recall!r}.")
    if not rerank_candidates or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in rerank_candidates):
        raise ValueError(f"`rerank_candidates` must be integers >= 1, got {rerank_candidates!r}.")
    name, values = _search_knob(searcher)
    depths = sorted(set(rerank_candidates)) if searcher.rows_of is not None else [1]
    tried, limit = [], len(values)
    for rerank in depths:
        searcher.settings.rerank = rerank
        previous = None
        for i, value in enumerate(values[:limit]):
            if name is not None:
                searcher.set_search_params(**{name: value})
            recall = _recall_against(searcher, queries, truth, k, own_rows)
            met = recall >= target_recall
            if met or i == limit - 1 or (previous is not None and recall - previous < PLATEAU_GAIN):
                ms = _ms_per_query(searcher, queries.float().numpy(), k)
                tried.append({name or "parameter": value, "rerank": rerank, "recall_at_10": recall, "ms_per_query": ms})
                logger.info(f"{searcher.settings.factory} {name}={value} rerank={rerank}: recall@{k} {recall:.3f}, "
                            f"{ms:.2f} ms")
                limit = i + 1 if met else limit
                break
            previous = recall
    meeting = [t for t in tried if t["recall_at_10"] >= target_recall]
    best = min(meeting, key=lambda t: t["ms_per_query"]) if meeting else max(
        tried, key=lambda t: (t["recall_at_10"], -t["ms_per_query"]))
    if not meeting:
        logger.warning(f"The FAISS index {searcher.settings.factory!r} reaches recall@{k} {best['recall_at_10']:.3f} "
                       f"at best on the full set, under the target {target_recall}.")
    searcher.settings.rerank = best["rerank"]
    if name is not None:
        searcher.set_search_params(**{name: best[name]})
    return {**{key: best[key] for key in (name or "parameter", "rerank", "recall_at_10", "ms_per_query")},
            "target_recall": float(target_recall), "met_target": bool(meeting), "queries": len(truth), "tried": tried}


@torch.no_grad()
def tune_and_measure_recall(searcher, blocks: list, target_recall: float = 0.95, num_queries: int =
                            DEFAULT_RECALL_QUERIES, avoid_rows=None, seed: int = 0) -> dict:
    r"""
    [`tune_search_params`] on the full set, then [`measure_recall`] of what it chose on other queries: `2 *
    num_queries` rows of the set (outside `avoid_rows`) are drawn and their exact top-10 found in one pass over the
    blocks; the first half tunes, the second half measures (a recall never taken on the queries it was tuned on).

    A parameter choice made on a sample does not hold for a set much larger than it (at 10M rows the same `nprobe`
    and re-ranking lose 0.08 of recall@10 against the sample's measurement); this is what keeps the recorded recall
    at the target.

    Returns what [`measure_recall`] returns, with `search_tuning` (what [`tune_search_params`] chose and tried).
    """
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries <= 0:
        raise ValueError(f"`num_queries` must be a positive integer, got {num_queries!r}.")
    num_rows = sum(int(b.shape[0]) for b in blocks)
    if num_rows < 4:
        raise ValueError(f"Tuning and measuring recall needs at least 4 rows, the set has {num_rows}.")
    rows, outside, queries, truth = _set_queries(blocks, 2 * num_queries, avoid_rows, seed, 10)
    half = rows.shape[0] // 2
    tuning = tune_search_params(searcher, queries[:half], truth[:half], target_recall, own_rows=rows[:half])
    recall = _recall_against(searcher, queries[half:], truth[half:], 10, own_rows=rows[half:])
    return {"recall_at_10": recall, "rows": num_rows, "queries": int(rows.shape[0] - half),
            "queries_outside_tuning_sample": outside, "search_tuning": tuning}


@torch.no_grad()
def measure_recall(searcher, blocks: list, k: int = 10, num_queries: int = DEFAULT_RECALL_QUERIES,
                   avoid_rows=None, seed: int = 0) -> dict:
    r"""
    Recall@`k` of a built FAISS index over the full set it holds: `num_queries` rows of the set (outside
    `avoid_rows`, the tuning sample, when there are enough) are searched with it and with exact search over every row
    (block by block: the rows may be memory-mapped shards far larger than memory), each query's own row left out of
    both answers; recall is the fraction of the exact top-`k` that the index found.

    Args:
        searcher ([`ShardedFaissSearcher`]): The index as it is searched (with its `nprobe` and re-ranking).
        blocks (`list[torch.Tensor]`): The set's rows, in the index's order, as blocks laid end to end.
        k (`int`, *optional*, defaults to 10): The `k` of recall@`k`.
        num_queries (`int`, *optional*, defaults to 200): Rows used as queries.
        avoid_rows (*optional*): Rows the queries should not be drawn from (those the index was chosen or trained on).
        seed (`int`, *optional*, defaults to 0): Seed of the draw.

    Returns a dict: `recall_at_10` (for `k=10`; `recall_at_k` and `k` otherwise), `rows`, `queries`,
    `queries_outside_tuning_sample`.
    """
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries <= 0:
        raise ValueError(f"`num_queries` must be a positive integer, got {num_queries!r}.")
    num_rows = sum(int(b.shape[0]) for b in blocks)
    if num_rows < 2:
        raise ValueError(f"Measuring recall needs at least 2 rows, the set has {num_rows}.")
    rows, outside, queries, truth = _set_queries(blocks, num_queries, avoid_rows, seed, k)
    recall = _recall_against(searcher, queries, truth, k, own_rows=rows)
    key = "recall_at_10" if k == 10 else "recall_at_k"
    out = {key: recall, "rows": num_rows, "queries": int(rows.shape[0]), "queries_outside_tuning_sample": outside}
    return out if k == 10 else {**out, "k": k}
