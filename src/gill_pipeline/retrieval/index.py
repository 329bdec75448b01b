"""A retrieval index: normalised image embeddings in GILL's retrieval space, their metadata, and the weights they
were built with; exact or FAISS search over them, and loading the images of the best matches.

Saving and loading live in `serialization.py` (a mixin of [`RetrievalIndex`]), the similarity floor's checks and
calibration in `calibration.py`."""

from dataclasses import dataclass, field

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import logging

from .calibration import check_min_similarity
from .fingerprint import check_same_weights, probe_embeddings, weights_fingerprint
from .image_loading import ImageLoadError, load_record_image
from .faiss_params import check_memory_mapped, choose_faiss_params, tune_and_measure_recall
from .faiss_shards import DEFAULT_TRAIN_SIZE, FaissSettings, ShardedFaissSearcher
from .files import RetrievalIndexError as _RetrievalIndexError
from .record_table import RecordTable
from .search import ExactSearcher, FaissSearcher, SearchResult, gather_rows
from .serialization import RetrievalIndexSerializationMixin, check_records, dtype_name

# Names that moved out of this module, importable from here as before.
from .calibration import calibrate_min_similarity  # noqa: E402, F401, I001
from .serialization import (  # noqa: E402, F401, I001
    DEFAULT_MAX_SHARD_ROWS,
    INDEX_CONFIG_FILE,
    PROBE_FILE,
    RetrievalIndexError,
)


logger = logging.get_logger(__name__)
AUTO_MIN_ROWS = 300  # `choose_faiss_params` holds out 200 queries and needs 100 rows more to measure on

# Candidates fetched per [IMG] group before deepening the search; failed loads before giving up on a group.
DEFAULT_NUM_CANDIDATES = 8
DEFAULT_MAX_LOAD_ATTEMPTS = 16
# Key in `PIL.Image.info` that marks an image as retrieved from an index, so that giving it back as input excludes it.
RETRIEVAL_ID_INFO_KEY = "gill_retrieval_id"
# Rows of the set that `use_faiss("auto")` measures candidates on at most.
AUTO_SAMPLE_ROWS = 1_000_000


@dataclass
class RetrievedImage:
    """One retrieved image: the loaded RGB image, its metadata record, its row and cosine similarity to the query,
    and the ids of better candidates that could not be loaded (skipped with a warning)."""

    image: PIL.Image.Image
    record: dict
    row: int
    similarity: float
    rank: int
    skipped_ids: list[str] = field(default_factory=list)


class RetrievalIndex(RetrievalIndexSerializationMixin):
    r"""
    Images in GILL's retrieval space: an `(N, retrieval_dim)` matrix of L2-normalised image embeddings (fp16 or fp32)
    with one metadata record per row (`id`, `path` (relative to the image root) or URL, `caption`), and the
    fingerprint of the weights that made them.

    Build one with [`build_retrieval_index`], load one with [`RetrievalIndex.from_pretrained`], and give it to a
    pipeline with `pipe.load_retrieval_index(...)`. Search is exact (chunked matrix product) unless
    [`~RetrievalIndex.use_faiss`] switches to a FAISS index.

    Args:
        embeddings (`torch.Tensor`): `(N, D)` image embeddings; normalised on the way in.
        records (`list[dict]`): One record per row, each with unique string `id` and a `path`.
        fingerprint (`dict`): What [`weights_fingerprint`] returned for the pipeline that made the embeddings.
        probes (`dict[str, torch.Tensor]`): What [`probe_embeddings`] returned for that pipeline.
        image_root (`str`, *optional*): Folder that local `path`s are relative to.
        allow_urls (`bool`, *optional*, defaults to `False`): Whether records whose `path` is a URL may be downloaded.
        min_similarity (`float`, *optional*): The cosine similarity below which a best match is not a match for this
            set: a pipeline whose decision head chose retrieval (`image_mode="auto"` or `"both"`) shows the generated
            image instead when the retrieved one scores lower. `None` (default): no such floor. Saved with the
            index; [`calibrate_min_similarity`] finds one from queries whose answer is or is not in the set.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        records: list[dict],
        fingerprint: dict,
        probes: dict[str, torch.Tensor],
        image_root: str | None = None,
        allow_urls: bool = False,
        min_similarity: float | None = None,
    ):
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
            raise ValueError(f"`embeddings` must be a 2-d tensor (N, dim), got {type(embeddings).__name__} "
                             f"{tuple(getattr(embeddings, 'shape', ()))}.")
        dtype_name(embeddings.dtype)
        if embeddings.shape[1] != fingerprint.get("retrieval_dim"):
            raise ValueError(
                f"`embeddings` are {embeddings.shape[1]} wide but `fingerprint` says retrieval_dim="
                f"{fingerprint.get('retrieval_dim')}."
            )
        self.fingerprint = dict(fingerprint)
        self.probes = {k: v.float().cpu() for k, v in probes.items()}
        self.image_root = image_root
        self.allow_urls = bool(allow_urls)
        self.min_similarity = min_similarity
        # Where symbolic links under the image root may point: the repo's Hub cache folder for downloaded indexes.
        self._link_root: str | None = None
        self._blocks: list[torch.Tensor] = [embeddings[:0]]
        # The records, one per row: a list in memory for rows added here, read from the saved files (parsed as
        # they are read) for a loaded set; see `record_table.py`.
        self.records = RecordTable()
        self._searcher = None
        self._searcher_rows = 0
        self._searcher_factory = ExactSearcher
        # False for a set loaded from a folder saved without its embeddings: it searches with its FAISS index only.
        self.has_embeddings = True
        # The FAISS index of a set loaded where faiss could not be imported: searched exactly, its files kept for saves.
        self._unread_faiss = None
        self.add_embeddings(embeddings, records)

    @property
    def min_similarity(self) -> float | None:
        return self._min_similarity

    @min_similarity.setter
    def min_similarity(self, value: float | None) -> None:
        self._min_similarity = check_min_similarity(value, "min_similarity")

    @classmethod
    @torch.no_grad()
    def empty(cls, pipe, dtype: torch.dtype = torch.float16, image_root: str | None = None) -> "RetrievalIndex":
        """An index with no rows for the retrieval space of `pipe` (sizes from `pipe.gill.config`)."""
        dim = pipe.gill.config.retrieval_dim
        embeddings = torch.empty(0, dim, dtype=dtype)
        return cls(embeddings, [], weights_fingerprint(pipe), probe_embeddings(pipe), image_root=image_root)

    # ----------------------------------------------------------------------------------------------------------
    # Contents
    # ----------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"RetrievalIndex(num_images={len(self)}, dim={self.dim}, dtype={self.dtype}, device={self.device}, "
                f"search={self.search_backend!r}, image_root={self.image_root!r})")

    @property
    def embeddings(self) -> torch.Tensor:
        self._require_embeddings("its embeddings")
        if len(self._blocks) > 1:
            self._blocks = [torch.cat(self._blocks, dim=0)]
        return self._blocks[0]

    @property
    def dim(self) -> int:
        return self._blocks[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self._blocks[0].device

    def _require_embeddings(self, what: str) -> None:
        if not self.has_embeddings:
            raise _RetrievalIndexError(
                f"This set of {len(self)} images was saved without its embeddings (`save_embeddings=False`) and "
                f"searches with its FAISS index only; {what} needs them: load a copy saved with them."
            )

    def _row_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows `start..stop` of the set, without joining the stored blocks (which may be memory-mapped files)."""
        parts, offset = [], 0
        for block in self._blocks:
            lo, hi = max(start - offset, 0), min(stop - offset, block.shape[0])
            if lo < hi:
                parts.append(block[lo:hi])
            offset += block.shape[0]
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def _rows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored embeddings of the given rows, float32 on the CPU (for re-ranking FAISS candidates)."""
        return gather_rows(self._blocks, rows)

    @property
    def ids(self) -> list[str]:
        """Every id, in row order (reads every record: for a large set, prefer `row_of` and `in`)."""
        return list(self.records.ids())

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.records

    def row_of(self, image_id: str) -> int:
        return self.records.row_of(image_id)

    def _rows_of_ids(self, ids) -> set[int]:
        """The rows of those of `ids` that the set has."""
        rows = (self.records.get_row(i) for i in ids)
        return {row for row in rows if row is not None}

    def add_embeddings(self, embeddings: torch.Tensor, records: list[dict]) -> None:
        """Appends rows (normalised here) and their records. Ids already in the index are an error."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"`embeddings` must have shape (n, {self.dim}), got {tuple(embeddings.shape)}.")
        if embeddings.shape[0] != len(records):
            raise ValueError(f"Got {embeddings.shape[0]} embeddings but {len(records)} `records`.")
        check_records(records, "`records`")
        if len(records):
            self._require_embeddings("adding images")
        self.records.check_new(records)
        if not len(records):
            return
        rows = F.normalize(embeddings.detach().float(), dim=-1).to(device=self.device, dtype=self.dtype)
        self._blocks.append(rows)
        self.records.append(records, checked=True)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "RetrievalIndex":
        """Moves (and/or casts) the embeddings, e.g. `index.to("cuda")` for fast exact search on a GPU."""
        if dtype is not None:
            dtype_name(dtype)
            if dtype != self.dtype:
                self._saved = None  # every stored row changed: the next save writes them all
        self._require_embeddings("moving its embeddings")
        # Block by block: a memory-mapped set stays in its blocks (a block already where it should be is not copied).
        self._blocks = [block.to(device=device, dtype=dtype) for block in self._blocks]
        if self._searcher_factory is ExactSearcher:
            self._searcher = None
        return self

    # ----------------------------------------------------------------------------------------------------------
    # Search
    # ----------------------------------------------------------------------------------------------------------
    @property
    def search_backend(self) -> str:
        return getattr(self._searcher_factory, "name", "faiss")

    def use_faiss(
        self,
        factory: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int = 1,
        max_rows_per_file: int | None = None,
        target_recall: float = 0.95,
        max_bytes_per_image: float = 64,
        train_size: int = DEFAULT_TRAIN_SIZE,
        seed: int = 0,
        memory_mapped: bool = False,
    ):
        r"""Searches with FAISS from now on: trains and fills the FAISS index now; `save_pretrained` saves it with the
        set and `from_pretrained` reads it back memory-mapped, without training again.

        Args:
            factory (`str`, *optional*, defaults to `"Flat"`): A FAISS `index_factory` string (`"Flat"` is exact;
                `"IVF4096,PQ32x4fs"`, `"OPQ32,IVF4096,PQ32"`, `"HNSW32"`, ... trade recall for speed and memory),
                or `"auto"`: [`choose_faiss_params`] measures candidates on this set's own rows and picks the fastest
                that reaches `target_recall` within `max_bytes_per_image` (what it measured is saved with the set);
                a set of fewer than 300 rows is searched exactly (`"Flat"`).
            nprobe (`int`, *optional*): Inverted lists visited per query by IVF indexes (FAISS' default is 1).
            ef_search (`int`, *optional*): Candidate list size of HNSW indexes (FAISS' default is 16).
            rerank (`int`, *optional*, defaults to 1): Fetch `k * rerank` candidates and re-score them exactly on the
                stored embeddings (1: the FAISS scores as they are). A set saved without embeddings skips it.
            max_rows_per_file (`int`, *optional*): Rows per FAISS index at most; a larger set gets several indexes
                (saved as several files), searched together and merged by score.
            target_recall (`float`, *optional*, defaults to 0.95), max_bytes_per_image (`float`, *optional*,
                defaults to 64): What `"auto"` aims for; it then re-tunes `nprobe` and `rerank` on the full index
                ([`tune_and_measure_recall`]). `memory_mapped=True`: `"auto"` tries only codes that a load
                memory-maps (8-bit PQ, see [`choose_faiss_params`]).
            train_size (`int`, *optional*, defaults to 100,000), seed (`int`, *optional*, defaults to 0): Rows
                sampled (with this seed) to train indexes that need training.

        Needs `faiss-cpu` (`pip install gill-pipeline[faiss]`).
        """
        self._require_embeddings("building a FAISS index")
        check_memory_mapped(memory_mapped, factory)
        if factory == "auto" and len(self) < AUTO_MIN_ROWS:
            # Too few rows to hold out queries and measure; exact search over so few rows is also the fastest.
            logger.info(f"use_faiss('auto'): {len(self)} rows (< {AUTO_MIN_ROWS}) are searched exactly ('Flat').")
            settings = FaissSettings("Flat", max_rows_per_file=max_rows_per_file)
        elif factory == "auto":
            tuning_rows = None  # every row
            if len(self) > AUTO_SAMPLE_ROWS:
                pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:AUTO_SAMPLE_ROWS]
                tuning_rows = pick.sort().values
                sample = self._rows_of(tuning_rows)
            else:
                sample = self._row_range(0, len(self))
            params = choose_faiss_params(sample, target_recall=target_recall, max_bytes_per_image=max_bytes_per_image,
                                         seed=seed, memory_mapped=memory_mapped)
            settings = params.settings(max_rows_per_file=max_rows_per_file)
        else:
            settings = FaissSettings(factory, nprobe=nprobe, ef_search=ef_search, rerank=rerank,
                                     max_rows_per_file=max_rows_per_file)

        def make(embeddings):
            return ShardedFaissSearcher.build(embeddings, settings, train_size=train_size, seed=seed,
                                              rows_of=self._rows_of)

        make.name = f"faiss:{settings.factory}"
        searcher = make(self._blocks)
        if factory == "auto" and len(self) >= AUTO_MIN_ROWS:
            # The recall recorded is that of the full index just built, not the tuning sample's (kept in `choice`).
            avoid = None if tuning_rows is None else tuning_rows.numpy()
            # nprobe and re-ranking re-tuned on the full index (the sample's do not hold for a larger set).
            measured = tune_and_measure_recall(searcher, self._blocks, target_recall=target_recall, avoid_rows=avoid,
                                               seed=seed)
            settings.recall_at_10 = measured.pop("recall_at_10")
            settings.recall_measurement = {**measured, "tuning_sample_rows": min(len(self), AUTO_SAMPLE_ROWS)}
        self._searcher, self._searcher_rows = searcher, len(self)
        self._searcher_factory = make
        self._unread_faiss = None  # replaced by the one just built
        return self

    @property
    def faiss_settings(self) -> FaissSettings | None:
        """How the FAISS index in use was made and is searched (factory, nprobe, recall measured...), else None."""
        return getattr(self._searcher, "settings", None)

    def use_exact(self):
        """Searches exactly (chunked matrix product) from now on; the default."""
        self._searcher_factory, self._searcher = ExactSearcher, None
        return self

    def drop_faiss_index(self):
        """Searches exactly from now on and forgets the FAISS index: the next `save_pretrained` writes none (not even
        the files of a set loaded where faiss could not be imported, which a save otherwise copies through)."""
        self._unread_faiss = None
        return self.use_exact()

    def _current_searcher(self):
        # Never `self.embeddings`: exact search reads the stored blocks one at a time (a memory-mapped set of 100M
        # rows is never joined into one tensor in memory).
        exact = self._searcher_factory is ExactSearcher
        if exact:
            self._require_embeddings("exact search")
        if self._searcher is None:
            self._searcher = (ExactSearcher if exact else self._searcher_factory)(self._blocks)
        elif self._searcher_rows != len(self):
            if isinstance(self._searcher, ShardedFaissSearcher):
                start = self._searcher.ntotal
                self._searcher.add(self._row_range(start, len(self)), first_row=start)
            else:
                self._searcher.add(self._blocks)
        self._searcher_rows = len(self)
        return self._searcher

    def search(
        self, queries: torch.Tensor, k: int = 10, exclude_ids: list[set[str]] | set[str] | None = None
    ) -> SearchResult:
        """Top-`k` rows by cosine similarity for each normalised query `(Q, D)`, best first.

        Args:
            queries (`torch.Tensor`): `(Q, D)` or `(D,)` query embeddings, e.g. `pipe.gill.text_retrieval_embeds(h)`.
            k (`int`, *optional*, defaults to 10): Rows per query. Missing rows are -1 with score -inf.
            exclude_ids (`set[str]` or `list[set[str]]`, *optional*):
                Ids never returned: one set for every query, or one set per query.
        """
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"`k` must be a positive integer, got {k!r}.")
        queries = queries[None] if queries.ndim == 1 else queries
        if exclude_ids is None:
            excluded_rows = None
        else:
            if isinstance(exclude_ids, (set, frozenset)):
                exclude_ids = [exclude_ids] * queries.shape[0]
            if len(exclude_ids) != queries.shape[0]:
                raise ValueError(f"`exclude_ids` has {len(exclude_ids)} sets for {queries.shape[0]} queries.")
            excluded_rows = [self._rows_of_ids(ids) for ids in exclude_ids]
        extra = max((len(e) for e in excluded_rows), default=0) if excluded_rows else 0
        result = self._current_searcher().search(queries, k + extra)
        if not extra:
            return SearchResult(result.scores[:, :k], result.rows[:, :k])
        scores = torch.full((queries.shape[0], k), float("-inf"))
        rows = torch.full((queries.shape[0], k), -1, dtype=torch.long)
        for q, excluded in enumerate(excluded_rows):
            keep = [j for j, row in enumerate(result.rows[q].tolist()) if row >= 0 and row not in excluded][:k]
            scores[q, : len(keep)], rows[q, : len(keep)] = result.scores[q, keep], result.rows[q, keep]
        return SearchResult(scores, rows)

    # ----------------------------------------------------------------------------------------------------------
    # Retrieval for a pipeline
    # ----------------------------------------------------------------------------------------------------------
    def check_compatible(self, pipe, where: str | None = None) -> None:
        """Raises [`IndexWeightsMismatchError`] if `pipe` does not embed images the way this index's builder did."""
        check_same_weights(self.fingerprint, self.probes, pipe, where or f"({len(self)} images)")

    def load_image(self, record: dict) -> PIL.Image.Image:
        """The image of a record, RGB; raises [`ImageLoadError`] when missing, unreadable or refused."""
        image = load_record_image(record, self.image_root, allow_urls=self.allow_urls, link_root=self._link_root)
        image.info[RETRIEVAL_ID_INFO_KEY] = record["id"]
        return image

    def _candidates(self, query: torch.Tensor, first: SearchResult | None):
        """Rows for one query in order of similarity, searching deeper as they run out."""
        seen, k = set(), DEFAULT_NUM_CANDIDATES
        result = first
        while True:
            if result is None:
                result = self.search(query, k=k)
            for score, row in zip(result.scores[0].tolist(), result.rows[0].tolist()):
                if row >= 0 and row not in seen:
                    seen.add(row)
                    yield row, score
            if result.rows.shape[1] >= len(self):
                return
            k, result = min(2 * max(k, result.rows.shape[1]), len(self)), None

    @torch.no_grad()
    def retrieve(
        self,
        queries: torch.Tensor,
        owners: list[int] | None = None,
        exclude_ids: dict[int, set[str]] | None = None,
        max_load_attempts: int = DEFAULT_MAX_LOAD_ATTEMPTS,
        allow_missing: bool = False,
    ) -> list[RetrievedImage | None]:
        """One loaded image per query, never one already shown in the same answer.

        Args:
            queries (`torch.Tensor`): `(Q, D)` normalised query embeddings, in the order the images appear.
            owners (`list[int]`, *optional*): The answer each query belongs to; an image retrieved for a query is
                not retrieved again for a later query of the same answer. Defaults to one answer for all.
            exclude_ids (`dict[int, set[str]]`, *optional*): Ids never to retrieve for an answer (e.g. its inputs).
            max_load_attempts (`int`, *optional*, defaults to 16):
                Images that fail to load (missing, unreadable, refused) for one query before giving up with an error.
            allow_missing (`bool`, *optional*, defaults to `False`): Give `None` (and log why) for a query with no
                image left to show, instead of raising, so the other queries' results are kept.
        """
        if len(self) == 0:
            raise ValueError("The retrieval index is empty.")
        owners = [0] * queries.shape[0] if owners is None else list(owners)
        if len(owners) != queries.shape[0]:
            raise ValueError(f"`owners` has {len(owners)} entries for {queries.shape[0]} queries.")
        shown: dict[int, set[int]] = {}
        for owner, ids in (exclude_ids or {}).items():
            shown[owner] = self._rows_of_ids(ids)
        per_owner = max(owners.count(o) + len(shown.get(o, ())) for o in set(owners))
        first = self.search(queries, k=min(DEFAULT_NUM_CANDIDATES + per_owner, len(self)))
        results = []
        for q, owner in enumerate(owners):
            excluded = shown.setdefault(owner, set())
            skipped = []
            head = SearchResult(first.scores[q : q + 1], first.rows[q : q + 1])
            for rank, (row, score) in enumerate(self._candidates(queries[q : q + 1], head)):
                if row in excluded:
                    continue
                record = self.records[row]
                try:
                    image = self.load_image(record)
                except ImageLoadError as error:
                    logger.warning(f"Skipping retrieval candidate {record['id']!r}: {error}")
                    skipped.append(record["id"])
                    if len(skipped) >= max_load_attempts:
                        message = (
                            f"None of the {len(skipped)} best images for a query could be loaded ({skipped[:5]}...): "
                            "check the index's `image_root` and `allow_urls`."
                        )
                        if not allow_missing:
                            raise ImageLoadError(message) from error
                        logger.warning(message)
                        results.append(None)
                        break
                    continue
                excluded.add(row)
                results.append(RetrievedImage(image, dict(record), row, score, rank, skipped))
                break
            else:
                message = (
                    f"No image left to retrieve: all {len(self)} images of the index were already shown in this "
                    f"answer or could not be loaded ({len(skipped)} failed)."
                )
                if not allow_missing:
                    raise ImageLoadError(message)
                logger.warning(message)
                results.append(None)
        return results
