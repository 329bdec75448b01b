"""Saving and loading a retrieval set: safetensors shards of embeddings, JSON Lines metadata, the probe embeddings
and `retrieval_index.json` in a folder; loading from a folder or the Hub; pushing to the Hub.

[`RetrievalIndexSerializationMixin`] gives [`RetrievalIndex`] its `save_pretrained`, `from_pretrained` and
`push_to_hub`, as diffusers' `ModelMixin` does for models.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import logging
from huggingface_hub import HfApi, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..constants import LIBRARY_NAME
from ..serialization.hub import HUB_KWARGS
from ..serialization.folder import PipelineFolderError, read_json_object
from ..serialization.paths import looks_like_local_path, missing_folder_reason, name_or_path
from .calibration import check_min_similarity
from .faiss_shards import (
    ShardedFaissSearcher,
    check_faiss_block,
    faiss_files,
    read_faiss_files,
)
from .files import RetrievalIndexError, atomic_write as _atomic_write
from .unread_faiss import FAISS_EXTRA_HINT, UnreadFaiss
from .image_loading import is_url, resolve_local_path
from .record_table import (RECORD_REQUIRED_KEYS, SORTED_IDS_FILE, JsonlShard, RecordTable, row_index_file_name,
                           write_jsonl_shard)
from .search import import_faiss


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
# The files of one shard in `retrieval_index.json`: its embeddings (None when saved without them), its records and
# their row index (`record_table.py`; None in folders saved before it existed).
SHARD_FILE_KEYS = ("embeddings", "metadata", "row_index")
# Files a save may remove when its new config no longer reads them (shard `i`, written again `-rN`).
SHARD_FILE_PATTERN = re.compile(
    r"embeddings-\d{5}(-r\d+)?\.safetensors|metadata-\d{5}(-r\d+)?(\.jsonl|\.rows\.safetensors)"
    r"|faiss-(\d{5}|trained)(-r\d+)?\.index"
)
# With `mmap=True`, rows whose norm is checked at load (first and last of each shard): reading every row would page
# the whole file in.
MMAP_NORM_CHECK_ROWS = 1000


def dtype_name(dtype: torch.dtype) -> str:
    """The name a storage dtype has in `retrieval_index.json`; a ValueError for a dtype an index cannot store."""
    for name, value in STORAGE_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"`dtype` must be one of {list(STORAGE_DTYPES.values())}, got {dtype!r}.")


def check_records(records: list[dict], where: str) -> None:
    """Raises [`RetrievalIndexError`] unless every record is a JSON object with a non-empty string `id` and `path`."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise RetrievalIndexError(f"Record {i} of {where} must be a JSON object, got {record!r:.200}.")
        for key in RECORD_REQUIRED_KEYS:
            if not isinstance(record.get(key), str) or not record[key]:
                raise RetrievalIndexError(
                    f"Record {i} of {where} needs a non-empty string `{key}`, got {record!r:.200}."
                )


def _shard_file_names(i: int, rewrite: int) -> tuple[str, str]:
    """The files of shard `i`; a rewrite of an index in place writes under other names (`-r1`, ...) than the ones
    the folder's config reads, so that the old index stays readable until the new config replaces it."""
    embeddings_file, metadata_file = EMBEDDINGS_SHARD_TEMPLATE.format(i), METADATA_SHARD_TEMPLATE.format(i)
    if rewrite:
        embeddings_file = embeddings_file.replace(".safetensors", f"-r{rewrite}.safetensors")
        metadata_file = metadata_file.replace(".jsonl", f"-r{rewrite}.jsonl")
    return embeddings_file, metadata_file


def _free_shard_file_names(i: int, in_use: set[str]) -> tuple[str, str]:
    rewrite = 0
    while in_use & set(_shard_file_names(i, rewrite)):
        rewrite += 1
    return _shard_file_names(i, rewrite)


def _shard_files(config: dict | None) -> set[str]:
    """The shard files a config reads."""
    files = {shard.get(key) for shard in (config or {}).get("shards", []) for key in SHARD_FILE_KEYS}
    return (files - {None}) | faiss_files((config or {}).get("faiss"))


def _config_identity(folder: str) -> tuple[int, int, int]:
    """Changes whenever the config file is replaced (every save renames a new file in)."""
    stat = os.stat(os.path.join(folder, INDEX_CONFIG_FILE))
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


@dataclass(frozen=True)
class SavedCopy:
    """What the folder an index was last saved to or loaded from holds: an incremental save appends to it only
    while it is still exactly that (the same config file, dtype and width) and the index still has its rows."""

    folder: str
    config_identity: tuple[int, int, int]
    shards: list[dict]
    dtype: str
    dim: int

    @classmethod
    def of(cls, folder: str, config: dict) -> "SavedCopy":
        return cls(os.path.realpath(folder), _config_identity(folder), [dict(s) for s in config["shards"]],
                   config["dtype"], config["dim"])


class RetrievalIndexSerializationMixin:
    """`save_pretrained`, `from_pretrained` and `push_to_hub` of a [`RetrievalIndex`]."""

    # Set by `save_pretrained` and `from_pretrained`; reset by a change of the stored rows (`RetrievalIndex.to`).
    _saved: SavedCopy | None = None

    def _image_root_for(self, folder: str) -> str | None:
        """The image root relative to `folder` when it lies inside it (then it travels with the folder), else None."""
        if self.image_root is None:
            return None
        root, folder = os.path.realpath(self.image_root), os.path.realpath(folder)
        if os.path.commonpath([root, folder]) != folder:
            return None
        return os.path.relpath(root, folder).replace(os.sep, "/")

    def _can_append_to(self, folder: str, config: dict | None) -> bool:
        saved = self._saved
        return (
            saved is not None
            and config is not None
            and saved.folder == os.path.realpath(folder)
            and saved.config_identity == _config_identity(folder)
            and config.get("shards") == saved.shards
            and config.get("dtype") == saved.dtype == dtype_name(self.dtype)
            and config.get("dim") == saved.dim == self.dim
            and sum(shard["num_rows"] for shard in saved.shards) <= len(self)
        )

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS,
        save_embeddings: bool = True,
    ) -> None:
        """Writes `retrieval_index.json`, `probe.safetensors`, and shards of at most `max_shard_rows` rows
        (`embeddings-XXXXX.safetensors` + `metadata-XXXXX.jsonl`). With a FAISS index in use
        ([`~RetrievalIndex.use_faiss`]), its files too (`faiss-XXXXX.index`, one per FAISS shard, and
        `faiss-trained.index`, written by `faiss.write_index`) and its settings in the config's `"faiss"` entry.

        `save_embeddings=False` leaves the embeddings out (a FAISS index is then required): the loaded set searches
        with the FAISS codes alone, without exact re-ranking, and takes a fraction of the disk.

        Saving again into the folder the index was last saved to or loaded from writes only the new rows, as new
        shards: that is how a build checkpoints and how images are added to a large index cheaply. When that folder
        no longer matches the index (its dtype changed with [`~RetrievalIndex.to`], or another index was saved there
        since), every shard is written again. Every file is written under a temporary name and renamed, new shards
        never over a file the folder's config reads, and the config last: an interrupted save leaves the previous
        index readable. Shards the new config no longer reads are removed after it is in place.

        Rows and records already saved are not compared with the folder: after editing one in place, save into a
        new folder.
        """
        if not isinstance(max_shard_rows, int) or max_shard_rows <= 0:
            raise ValueError(f"`max_shard_rows` must be a positive integer, got {max_shard_rows!r}.")
        searcher = self._current_searcher() if self.search_backend.startswith("faiss") else None
        # A FAISS index loaded where faiss could not be imported: its files are copied through, never lost.
        unread = getattr(self, "_unread_faiss", None) if searcher is None else None
        if unread is not None:
            unread.check_unchanged(len(self))
        if not isinstance(searcher, ShardedFaissSearcher) and unread is None and not save_embeddings:
            raise ValueError("`save_embeddings=False` needs a FAISS index to search with: call `use_faiss(...)` first.")
        if save_embeddings and not self.has_embeddings:
            raise ValueError("This set has no embeddings to save (it was loaded from a copy saved without them): pass "
                             "`save_embeddings=False`.")
        folder = str(save_directory)
        os.makedirs(folder, exist_ok=True)
        try:
            previous = self._read_config(folder) if os.path.isfile(os.path.join(folder, INDEX_CONFIG_FILE)) else None
        except RetrievalIndexError:
            previous = None  # unreadable already: nothing to keep readable
        append = self._can_append_to(folder, previous) and all(
            (shard.get("embeddings") is not None) == save_embeddings for shard in previous["shards"])
        if not append and previous is not None and getattr(self._saved, "folder", None) == os.path.realpath(folder):
            logger.info(f"Writing every shard of the index in {folder} again: its dtype changed or another index was "
                        "saved there since it was loaded.")
        in_use = _shard_files(previous)
        shards = [dict(s) for s in self._saved.shards] if append else []
        if append:
            self._write_missing_row_indexes(folder, shards)
        loaded = {os.path.realpath(s.path): s for s in self.records.shards}
        saved_records = [loaded.get(os.path.realpath(os.path.join(folder, s["metadata"]))) for s in shards]
        start = sum(shard["num_rows"] for shard in shards)
        while start < len(self):
            stop = min(start + max_shard_rows, len(self))
            embeddings_file, metadata_file = _free_shard_file_names(len(shards), in_use)
            if save_embeddings:
                tensor = self._row_range(start, stop).cpu().contiguous()
                _atomic_write(
                    os.path.join(folder, embeddings_file),
                    lambda p, t=tensor: save_file({EMBEDDINGS_KEY: t}, p, metadata={"format": "pt"}),
                )
            else:
                embeddings_file = None
            jsonl = write_jsonl_shard(os.path.join(folder, metadata_file), self.records.lines(start, stop))
            row_index_file = row_index_file_name(metadata_file)
            jsonl.write_row_index(os.path.join(folder, row_index_file))
            saved_records.append(jsonl)
            shards.append({"embeddings": embeddings_file, "metadata": metadata_file, "row_index": row_index_file,
                           "num_rows": stop - start})
            start = stop
        _atomic_write(os.path.join(folder, PROBE_FILE), lambda p: save_file(self.probes, p, metadata={"format": "pt"}))
        image_root = self._image_root_for(folder)
        has_local = self.records.num_urls < len(self)
        if image_root is None and has_local:
            logger.warning(
                f"The index's images ({self.image_root}) are not inside {folder}: pass `image_root=` when loading it."
            )
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_images": len(self),
            "dim": self.dim,
            "dtype": dtype_name(self.dtype),
            "normalized": True,
            "image_root": image_root,
            "min_similarity": self.min_similarity,
            "weights": self.fingerprint,
            "shards": shards,
            # Before the config: a load checks it against the record files, so one left by a crash is ignored.
            "sorted_ids": self._write_sorted_ids(folder, saved_records),
        }
        if searcher is not None:
            config["faiss"] = searcher.write_files(folder, in_use)
        elif unread is not None:
            unread = unread.copy_to(folder, in_use)
            config["faiss"] = unread.block

        def write_config(path):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")

        _atomic_write(os.path.join(folder, INDEX_CONFIG_FILE), write_config)
        # Only files named like shards: a config edited by hand must not make a save delete an image.
        for name in sorted(in_use - _shard_files(config)):
            if SHARD_FILE_PATTERN.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        self._saved = SavedCopy.of(folder, config)
        if unread is not None:
            self._unread_faiss = unread

    def _write_sorted_ids(self, folder: str, saved_records: list) -> None:
        """Writes the sorted id hashes of the saved rows (`records-sorted-ids.safetensors`, which a load maps instead
        of sorting) and returns its name; None when a saved shard's records are not at hand."""
        if not saved_records or any(s is None for s in saved_records):
            return None
        same = len(self.records) == self.records.num_file_rows and [s.path for s in self.records.shards] == [
            s.path for s in saved_records]
        table = self.records if same else RecordTable.from_shards(saved_records, folder)
        table.write_sorted_ids(os.path.join(folder, SORTED_IDS_FILE))
        return SORTED_IDS_FILE

    def _write_missing_row_indexes(self, folder: str, shards: list[dict]) -> None:
        """Row index files for the shards kept by an incremental save that lack a valid one (a folder saved by an
        older version, or whose row index was stale at load): the next load reads them instead of every record."""
        loaded = {os.path.realpath(s.path): s for s in self.records.shards}
        for shard in shards:
            jsonl = loaded.get(os.path.realpath(os.path.join(folder, shard["metadata"])))
            if jsonl is None or jsonl.row_index is not None and shard.get("row_index") is not None:
                continue
            name = row_index_file_name(shard["metadata"])
            jsonl.write_row_index(os.path.join(folder, name))
            shard["row_index"] = name

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        allow_urls: bool = False,
        device: str | torch.device | None = None,
        repo_type: str | None = None,
        mmap: bool = False,
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
            mmap (`bool`, *optional*, defaults to `False`): Memory-map the embeddings instead of reading them into
                memory (for sets larger than memory: rows are paged in as searches re-rank them; norms are checked on
                the first and last rows of each shard only). A saved FAISS index is always memory-mapped.
            hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`.
        """
        name = name_or_path(path_or_repo_id, "path_or_repo_id")
        unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(f"Unexpected keyword arguments {unknown}; Hub arguments are {list(HUB_KWARGS)}.")
        link_root = None
        if os.path.isdir(name):
            folder = name
        elif looks_like_local_path(name):
            raise RetrievalIndexError(
                f"`path_or_repo_id`={name!r} is not a folder ({missing_folder_reason(name)}); a retrieval index is a "
                "folder written by `RetrievalIndex.save_pretrained` or `build_retrieval_index`."
            )
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
        blocks, record_shards = [], []
        has_embeddings = {shard.get("embeddings") is not None for shard in config["shards"]}
        if len(has_embeddings) > 1 or (has_embeddings == {False} and not config.get("faiss")):
            raise RetrievalIndexError(f"{os.path.join(folder, INDEX_CONFIG_FILE)}: every shard must have embeddings, "
                                      "or none and a `faiss` index to search with.")
        has_embeddings = has_embeddings != {False}
        faiss_error = None
        if config.get("faiss") is not None:
            try:
                import_faiss()
            except ImportError as error:
                faiss_error = error.__cause__ or error
                if not has_embeddings:
                    raise RetrievalIndexError(
                        f"The retrieval set in {folder} was saved without its embeddings and searches with its FAISS "
                        f"index only, but faiss cannot be imported ({faiss_error}): {FAISS_EXTRA_HINT}."
                    ) from error
                check_faiss_block(config["faiss"], os.path.join(folder, INDEX_CONFIG_FILE))
        for shard in config["shards"]:
            # The records stay in their file: their offsets and id hashes come from the row index file beside it
            # (or from one streamed pass over the records when it is missing or stale).
            row_index = None if shard.get("row_index") is None else os.path.join(folder, shard["row_index"])
            shard_records = JsonlShard.read(os.path.join(folder, shard["metadata"]), row_index)
            if len(shard_records) != shard["num_rows"]:
                raise RetrievalIndexError(
                    f"{shard['metadata']} has {len(shard_records)} records but {INDEX_CONFIG_FILE} says "
                    f"{shard['num_rows']} rows."
                )
            record_shards.append(shard_records)
            if not has_embeddings:
                continue
            emb_path = os.path.join(folder, shard["embeddings"])
            tensors = _mmap_safetensors(emb_path) if mmap else cls._load_safetensors(emb_path)
            embeddings = tensors.get(EMBEDDINGS_KEY)
            if embeddings is None or embeddings.ndim != 2 or embeddings.shape[1] != config["dim"]:
                raise RetrievalIndexError(f"{emb_path} must hold `{EMBEDDINGS_KEY}` of shape (n, {config['dim']}).")
            if embeddings.dtype != STORAGE_DTYPES[config["dtype"]] or embeddings.shape[0] != shard["num_rows"]:
                raise RetrievalIndexError(
                    f"{emb_path} holds {embeddings.shape[0]} rows of {embeddings.dtype}; {INDEX_CONFIG_FILE} says "
                    f"{shard['num_rows']} rows of {config['dtype']}."
                )
            checked = embeddings
            if mmap and embeddings.shape[0] > 2 * MMAP_NORM_CHECK_ROWS:
                checked = torch.cat([embeddings[:MMAP_NORM_CHECK_ROWS], embeddings[-MMAP_NORM_CHECK_ROWS:]])
            norms = checked.float().norm(dim=-1)
            if embeddings.shape[0] and (norms - 1).abs().max() > NORM_TOLERANCE:
                raise RetrievalIndexError(f"{emb_path} holds rows that are not normalised (norms {norms.min():.3f}.."
                                          f"{norms.max():.3f}).")
            blocks.append(embeddings.to(device) if device is not None else embeddings)
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
        index.has_embeddings = has_embeddings
        sorted_ids = config.get("sorted_ids")
        sorted_ids = os.path.join(folder, sorted_ids) if sorted_ids == SORTED_IDS_FILE else None
        records = RecordTable.from_shards(record_shards, folder, sorted_ids=sorted_ids)
        if len(records):
            index._blocks = [empty] + blocks
            index.records = records
        index._link_root = link_root
        if faiss_error is not None:
            index._unread_faiss = UnreadFaiss.of(folder, config["faiss"])
            logger.warning(
                f"The FAISS index saved with the retrieval set in {folder} is ignored and exact search is used "
                f"instead, because faiss cannot be imported ({faiss_error}); {FAISS_EXTRA_HINT} to search with it. Its files "
                "are kept: `save_pretrained` copies them through unchanged."
            )
        elif config.get("faiss") is not None:
            searcher = read_faiss_files(folder, config["faiss"], os.path.join(folder, INDEX_CONFIG_FILE),
                                        num_rows=len(records), rows_of=index._rows_of if has_embeddings else None)
            index._searcher, index._searcher_rows = searcher, len(records)
            index._searcher_factory = _loaded_faiss(searcher)
        index._saved = SavedCopy.of(folder, config)
        num_urls = records.num_urls
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
            config = read_json_object(path)
        except PipelineFolderError as error:
            raise RetrievalIndexError(str(error)) from error
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
            for key in SHARD_FILE_KEYS:
                name = shard.get(key)
                if key != "metadata" and name is None:
                    continue  # saved with `save_embeddings=False`, or before row index files existed
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
        with open(path, "rb") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except (json.JSONDecodeError, UnicodeDecodeError) as error:
                        raise RetrievalIndexError(f"{path}, line {n}: not a JSON line ({error}).") from error
                    if not isinstance(record, dict):
                        raise RetrievalIndexError(
                            f"{path}, line {n}: a record must be a JSON object, got {type(record).__name__}."
                        )
                    records.append(record)
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
            copy = type(self).__new__(type(self))
            copy.__dict__.update(self.__dict__)
            copy._saved = None
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


def _loaded_faiss(searcher):
    """The searcher factory of a set whose FAISS index was read from files: the same index, never a rebuild."""

    def make(embeddings):
        return searcher

    make.name = f"faiss:{searcher.settings.factory}"
    return make


def _mmap_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, memory-mapped (copy-on-write) rather than read: pages come from disk as
    rows are used."""
    if not os.path.isfile(path):
        raise RetrievalIndexError(f"Missing file of the retrieval index: {path}")
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size > os.path.getsize(path) - 8:
                raise ValueError(f"a header of {header_size} bytes in a file of {os.path.getsize(path)}")
            header = json.loads(f.read(header_size))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = {"F16": np.float16, "F32": np.float32}[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise ValueError(f"{name}: {end - begin} bytes for shape {shape}")
            if end == begin:
                out[name] = torch.empty(shape, dtype=torch.float16 if dtype is np.float16 else torch.float32)
                continue
            array = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_size + begin, shape=shape)
            out[name] = torch.from_numpy(array)
        return out
    except (KeyError, ValueError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RetrievalIndexError(f"Corrupted safetensors file: {path} ({error!r})") from error
