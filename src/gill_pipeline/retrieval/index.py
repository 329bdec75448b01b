"""A retrieval index: normalised image embeddings in GILL's retrieval space, their metadata, and the weights they
were built with. Saved as safetensors shards plus JSON Lines metadata; loaded from a folder or the Hub."""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import logging
from huggingface_hub import HfApi, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..constants import LIBRARY_NAME
from ..serialization.hub import HUB_KWARGS
from .fingerprint import check_same_weights, probe_embeddings, weights_fingerprint
from .image_loading import ImageLoadError, is_url, load_record_image, resolve_local_path
from .search import ExactSearcher, FaissSearcher, SearchResult


logger = logging.get_logger(__name__)

INDEX_CONFIG_FILE = "retrieval_index.json"
PROBE_FILE = "probe.safetensors"
EMBEDDINGS_SHARD_TEMPLATE = "embeddings-{:05d}.safetensors"
METADATA_SHARD_TEMPLATE = "metadata-{:05d}.jsonl"
EMBEDDINGS_KEY = "embeddings"
FORMAT_NAME = "gill-retrieval-index"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_ROWS = 100_000
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Stored rows must have unit norm up to fp16 rounding.
NORM_TOLERANCE = 1e-2
# Candidates fetched per [IMG] group before deepening the search; failed loads before giving up on a group.
DEFAULT_NUM_CANDIDATES = 8
DEFAULT_MAX_LOAD_ATTEMPTS = 16
# Key in `PIL.Image.info` that marks an image as retrieved from an index, so that giving it back as input excludes it.
RETRIEVAL_ID_INFO_KEY = "gill_retrieval_id"
RECORD_REQUIRED_KEYS = ("id", "path")


class RetrievalIndexError(ValueError):
    """A retrieval index folder or its contents are malformed."""


def check_min_similarity(value, name: str) -> float | None:
    """`value` as a cosine-similarity floor (a real number in [-1, 1]) or None; else a ValueError naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be None or a cosine similarity in [-1, 1], got {value!r:.100}.")
    return float(value)


def calibrate_min_similarity(present: torch.Tensor, absent: torch.Tensor) -> float:
    """The similarity floor that best tells answers the retrieval set holds from answers it does not.

    Args:
        present (`torch.Tensor`): Best-match similarities of queries whose answer is in the set.
        absent (`torch.Tensor`): Best-match similarities of queries whose answer is not (for instance the same
            queries with their answer excluded, see `RETRIEVAL_ID_INFO_KEY`).

    Returns:
        `float`: The threshold with the highest balanced accuracy (mean of the two recalls), midway between the two
        neighbouring scores; ties go to the lower threshold (retrieval kept where it is as good).
    """
    present, absent = torch.as_tensor(present).float().flatten(), torch.as_tensor(absent).float().flatten()
    if present.numel() == 0 or absent.numel() == 0:
        raise ValueError(f"`present` and `absent` must both be non-empty, got {present.numel()} and {absent.numel()}.")
    if not (torch.isfinite(present).all() and torch.isfinite(absent).all()):
        raise ValueError("`present` and `absent` must be finite similarities.")
    scores = torch.cat([present, absent]).unique()  # sorted
    candidates = torch.cat([scores[:1] - 1e-6, (scores[1:] + scores[:-1]) / 2, scores[-1:] + 1e-6])
    kept = (present[None, :] >= candidates[:, None]).float().mean(1)
    refused = (absent[None, :] < candidates[:, None]).float().mean(1)
    balanced = (kept + refused) / 2
    best = int(torch.nonzero(balanced == balanced.max())[0])
    return float(candidates[best].clamp(-1.0, 1.0))


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


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in STORAGE_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"`dtype` must be one of {list(STORAGE_DTYPES.values())}, got {dtype!r}.")


def _check_records(records: list[dict], where: str) -> None:
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise RetrievalIndexError(f"Record {i} of {where} must be a JSON object, got {record!r:.200}.")
        for key in RECORD_REQUIRED_KEYS:
            if not isinstance(record.get(key), str) or not record[key]:
                raise RetrievalIndexError(
                    f"Record {i} of {where} needs a non-empty string `{key}`, got {record!r:.200}."
                )


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


class RetrievalIndex:
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
        _dtype_name(embeddings.dtype)
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
        self.records: list[dict] = []
        self._row_of_id: dict[str, int] = {}
        self._searcher = None
        self._searcher_rows = 0
        self._searcher_factory = ExactSearcher
        # (folder, rows per shard) of the last save or load, for incremental saves.
        self._saved_folder: str | None = None
        self._saved_shards: list[int] = []
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

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row_of_id

    def row_of(self, image_id: str) -> int:
        if image_id not in self._row_of_id:
            raise KeyError(f"No image with id {image_id!r} in the index.")
        return self._row_of_id[image_id]

    def add_embeddings(self, embeddings: torch.Tensor, records: list[dict]) -> None:
        """Appends rows (normalised here) and their records. Ids already in the index are an error."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"`embeddings` must have shape (n, {self.dim}), got {tuple(embeddings.shape)}.")
        if embeddings.shape[0] != len(records):
            raise ValueError(f"Got {embeddings.shape[0]} embeddings but {len(records)} `records`.")
        _check_records(records, "`records`")
        new_ids = {}
        for record in records:
            image_id = record["id"]
            if image_id in self._row_of_id or image_id in new_ids:
                raise ValueError(f"The id {image_id!r} is already in the index; ids must be unique.")
            new_ids[image_id] = len(self.records) + len(new_ids)
        if not len(records):
            return
        rows = F.normalize(embeddings.detach().float(), dim=-1).to(device=self.device, dtype=self.dtype)
        self._blocks.append(rows)
        self.records.extend(dict(r) for r in records)
        self._row_of_id.update(new_ids)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "RetrievalIndex":
        """Moves (and/or casts) the embeddings, e.g. `index.to("cuda")` for fast exact search on a GPU."""
        if dtype is not None:
            _dtype_name(dtype)
        self._blocks = [self.embeddings.to(device=device, dtype=dtype)]
        if self._searcher_factory is ExactSearcher:
            self._searcher = None
        return self

    # ----------------------------------------------------------------------------------------------------------
    # Search
    # ----------------------------------------------------------------------------------------------------------
    @property
    def search_backend(self) -> str:
        return getattr(self._searcher_factory, "name", "faiss")

    def use_faiss(self, factory: str = "Flat", nprobe: int | None = None, ef_search: int | None = None, **kwargs):
        """Searches with FAISS from now on (see [`FaissSearcher`] for the arguments); builds the FAISS index now.

        `"Flat"` gives exact results; `"IVF1024,Flat"` (with `nprobe`) or `"HNSW32"` (with `ef_search`) trade recall
        for speed on millions of rows. Needs `faiss-cpu` (`pip install gill-pipeline[faiss]`).
        """

        def make(embeddings):
            return FaissSearcher(embeddings, factory=factory, nprobe=nprobe, ef_search=ef_search, **kwargs)

        make.name = f"faiss:{factory}"
        self._searcher, self._searcher_rows = make(self.embeddings), len(self)
        self._searcher_factory = make
        return self

    def use_exact(self):
        """Searches exactly (chunked matrix product) from now on; the default."""
        self._searcher_factory, self._searcher = ExactSearcher, None
        return self

    def _current_searcher(self):
        if self._searcher is None:
            self._searcher = self._searcher_factory(self.embeddings)
        elif self._searcher_rows != len(self):
            self._searcher.add(self.embeddings)
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
            excluded_rows = [{self._row_of_id[i] for i in ids if i in self._row_of_id} for ids in exclude_ids]
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
            shown[owner] = {self._row_of_id[i] for i in ids if i in self._row_of_id}
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

    # ----------------------------------------------------------------------------------------------------------
    # Saving and loading
    # ----------------------------------------------------------------------------------------------------------
    def _image_root_for(self, folder: str) -> str | None:
        """The image root relative to `folder` when it lies inside it (then it travels with the folder), else None."""
        if self.image_root is None:
            return None
        root, folder = os.path.realpath(self.image_root), os.path.realpath(folder)
        if os.path.commonpath([root, folder]) != folder:
            return None
        return os.path.relpath(root, folder).replace(os.sep, "/")

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS) -> None:
        """Writes `retrieval_index.json`, `probe.safetensors`, and shards of at most `max_shard_rows` rows
        (`embeddings-XXXXX.safetensors` + `metadata-XXXXX.jsonl`).

        Saving again into the folder the index was last saved to or loaded from writes only the new rows, as new
        shards: that is how a build checkpoints and how images are added to a large index cheaply. The config is
        written last, so an interrupted save leaves the previous index intact.
        """
        if not isinstance(max_shard_rows, int) or max_shard_rows <= 0:
            raise ValueError(f"`max_shard_rows` must be a positive integer, got {max_shard_rows!r}.")
        folder = str(save_directory)
        os.makedirs(folder, exist_ok=True)
        incremental = (
            self._saved_folder is not None
            and os.path.realpath(folder) == self._saved_folder
            and os.path.isfile(os.path.join(folder, INDEX_CONFIG_FILE))
        )
        shards = list(self._saved_shards) if incremental else []
        start = sum(shards)
        embeddings = self.embeddings.cpu() if len(self) > start else None
        while start < len(self):
            stop = min(start + max_shard_rows, len(self))
            i = len(shards)
            tensor = embeddings[start:stop].contiguous()
            _atomic_write(
                os.path.join(folder, EMBEDDINGS_SHARD_TEMPLATE.format(i)),
                lambda p, t=tensor: save_file({EMBEDDINGS_KEY: t}, p, metadata={"format": "pt"}),
            )

            def write_metadata(path, records=self.records[start:stop]):
                with open(path, "w", encoding="utf-8") as f:
                    for record in records:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")

            _atomic_write(os.path.join(folder, METADATA_SHARD_TEMPLATE.format(i)), write_metadata)
            shards.append(stop - start)
            start = stop
        _atomic_write(os.path.join(folder, PROBE_FILE), lambda p: save_file(self.probes, p, metadata={"format": "pt"}))
        image_root = self._image_root_for(folder)
        has_local = any(not is_url(r["path"]) for r in self.records)
        if image_root is None and has_local:
            logger.warning(
                f"The index's images ({self.image_root}) are not inside {folder}: pass `image_root=` when loading it."
            )
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_images": len(self),
            "dim": self.dim,
            "dtype": _dtype_name(self.dtype),
            "normalized": True,
            "image_root": image_root,
            "min_similarity": self.min_similarity,
            "weights": self.fingerprint,
            "shards": [
                {
                    "embeddings": EMBEDDINGS_SHARD_TEMPLATE.format(i),
                    "metadata": METADATA_SHARD_TEMPLATE.format(i),
                    "num_rows": n,
                }
                for i, n in enumerate(shards)
            ],
        }

        def write_config(path):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")

        _atomic_write(os.path.join(folder, INDEX_CONFIG_FILE), write_config)
        self._saved_folder, self._saved_shards = os.path.realpath(folder), shards

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        allow_urls: bool = False,
        device: str | torch.device | None = None,
        repo_type: str | None = None,
        **hub_kwargs,
    ) -> "RetrievalIndex":
        r"""
        Loads an index from a local folder, or from a Hub repository (downloaded with `snapshot_download`).

        Args:
            path_or_repo_id (`str` or `os.PathLike`): A folder written by [`~RetrievalIndex.save_pretrained`] or a Hub
                repo id.
            image_root (`str`, *optional*): Folder that the records' local paths are relative to. Defaults to the
                folder the index recorded when it was saved (its own folder or one inside it).
            allow_urls (`bool`, *optional*, defaults to `False`): Allow downloading records whose path is a URL.
            device (`str` or `torch.device`, *optional*): Where to put the embeddings (CPU by default).
            repo_type (`str`, *optional*): `"model"` (default) or `"dataset"`, for Hub repos.
            hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`.
        """
        name = str(path_or_repo_id)
        unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(f"Unexpected keyword arguments {unknown}; Hub arguments are {list(HUB_KWARGS)}.")
        link_root = None
        if os.path.isdir(name):
            folder = name
        else:
            kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
            try:
                folder = snapshot_download(name, repo_type=repo_type, library_name=LIBRARY_NAME, **kwargs)
            except Exception as error:
                raise OSError(
                    f"`path_or_repo_id`={name!r} is neither a local folder nor a reachable Hub repository: {error}"
                ) from error
            # <cache>/<repo folder>/snapshots/<commit>: the snapshot's files link to <cache>/<repo folder>/blobs.
            link_root = os.path.dirname(os.path.dirname(os.path.realpath(folder)))
        config = cls._read_config(folder)
        probe_path = os.path.join(folder, PROBE_FILE)
        probes = cls._load_safetensors(probe_path)
        blocks, records = [], []
        for shard in config["shards"]:
            emb_path = os.path.join(folder, shard["embeddings"])
            tensors = cls._load_safetensors(emb_path)
            embeddings = tensors.get(EMBEDDINGS_KEY)
            if embeddings is None or embeddings.ndim != 2 or embeddings.shape[1] != config["dim"]:
                raise RetrievalIndexError(f"{emb_path} must hold `{EMBEDDINGS_KEY}` of shape (n, {config['dim']}).")
            if embeddings.dtype != STORAGE_DTYPES[config["dtype"]] or embeddings.shape[0] != shard["num_rows"]:
                raise RetrievalIndexError(
                    f"{emb_path} holds {embeddings.shape[0]} rows of {embeddings.dtype}; {INDEX_CONFIG_FILE} says "
                    f"{shard['num_rows']} rows of {config['dtype']}."
                )
            norms = embeddings.float().norm(dim=-1)
            if embeddings.shape[0] and (norms - 1).abs().max() > NORM_TOLERANCE:
                raise RetrievalIndexError(f"{emb_path} holds rows that are not normalised (norms {norms.min():.3f}.."
                                          f"{norms.max():.3f}).")
            shard_records = cls._read_jsonl(os.path.join(folder, shard["metadata"]))
            if len(shard_records) != shard["num_rows"]:
                raise RetrievalIndexError(
                    f"{shard['metadata']} has {len(shard_records)} records but {shard['embeddings']} has "
                    f"{shard['num_rows']} rows."
                )
            blocks.append(embeddings.to(device) if device is not None else embeddings)
            records.extend(shard_records)
        if image_root is None and config.get("image_root") is not None:
            # The recorded root must stay inside the index folder: an index from elsewhere cannot point at /.
            image_root = resolve_local_path(folder, config["image_root"]) if config["image_root"] != "." else folder
        empty = torch.empty(0, config["dim"], dtype=STORAGE_DTYPES[config["dtype"]], device=device)
        try:
            min_similarity = check_min_similarity(config.get("min_similarity"), "min_similarity")
        except ValueError as error:
            raise RetrievalIndexError(f"{os.path.join(folder, INDEX_CONFIG_FILE)}: {error}") from error
        index = cls(empty, [], config["weights"], probes, image_root=None if image_root is None else str(image_root),
                    allow_urls=allow_urls, min_similarity=min_similarity)
        if blocks:
            index._blocks = [empty] + blocks
            _check_records(records, folder)
            row_of_id = {}
            for row, record in enumerate(records):
                if record["id"] in row_of_id:
                    raise RetrievalIndexError(f"The id {record['id']!r} appears twice in {folder}.")
                row_of_id[record["id"]] = row
            index.records, index._row_of_id = records, row_of_id
        index._link_root = link_root
        index._saved_folder = os.path.realpath(folder)
        index._saved_shards = [s["num_rows"] for s in config["shards"]]
        num_urls = sum(is_url(r["path"]) for r in records)
        if num_urls and not allow_urls:
            logger.warning(
                f"{num_urls} of the {len(records)} images of the index are URLs, which will not be downloaded: load it "
                "with `allow_urls=True` to allow downloads."
            )
        if image_root is None and num_urls < len(records):
            logger.warning(f"The index {name} has local image paths but no image root: pass `image_root=`.")
        return index

    @staticmethod
    def _read_config(folder: str) -> dict:
        path = os.path.join(folder, INDEX_CONFIG_FILE)
        if not os.path.isfile(path):
            raise RetrievalIndexError(f"{folder} is not a retrieval index: it has no {INDEX_CONFIG_FILE}.")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RetrievalIndexError(f"Corrupted JSON file: {path} ({error})") from error
        if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
            raise RetrievalIndexError(
                f"{path} is not a {FORMAT_NAME} version {FORMAT_VERSION} file (format={config.get('format')!r}, "
                f"format_version={config.get('format_version')!r})."
            )
        if config.get("dtype") not in STORAGE_DTYPES:
            raise RetrievalIndexError(
                f"{path}: `dtype` must be one of {list(STORAGE_DTYPES)}, got {config.get('dtype')!r}."
            )
        for shard in config.get("shards", []):
            for key in ("embeddings", "metadata"):
                name = shard.get(key)
                # Shard names are plain file names: an index must not read files outside its folder.
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    raise RetrievalIndexError(f"{path}: shard file names must be plain file names, got {name!r}.")
        return config

    @staticmethod
    def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
        if not os.path.isfile(path):
            raise RetrievalIndexError(f"Missing file of the retrieval index: {path}")
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise RetrievalIndexError(f"Corrupted safetensors file: {path} ({error})") from error

    @staticmethod
    def _read_jsonl(path: str) -> list[dict]:
        if not os.path.isfile(path):
            raise RetrievalIndexError(f"Missing file of the retrieval index: {path}")
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise RetrievalIndexError(f"{path}, line {n}: not JSON ({error}).") from error
        return records

    def push_to_hub(
        self,
        repo_id: str,
        include_images: bool = False,
        repo_type: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload GILL retrieval index",
        max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS,
    ) -> str:
        """Uploads the index to a Hub repo (created if needed); with `include_images=True` its local images go too,
        under the same relative paths, so the repo is self-contained. Returns the commit URL."""
        api = HfApi(token=token, library_name=LIBRARY_NAME)
        with tempfile.TemporaryDirectory() as folder:
            copy = RetrievalIndex.__new__(RetrievalIndex)
            copy.__dict__.update(self.__dict__)
            copy._saved_folder, copy._saved_shards = None, []
            if include_images:
                for path in sorted({r["path"] for r in self.records if not is_url(r["path"])}):
                    source = resolve_local_path(self.image_root, path, link_root=self._link_root)
                    target = os.path.join(folder, path)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(source, target)
                copy.image_root = folder
            copy.save_pretrained(folder, max_shard_rows=max_shard_rows)
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, repo_type=repo_type, commit_message=commit_message
            )
        return str(getattr(commit, "commit_url", commit))
