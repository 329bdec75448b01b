"""The metadata records of a retrieval set, without holding them as Python objects: a read-only sequence of record
dicts with an id -> row lookup, for sets of 100M rows.

A saved set's records stay in its JSON Lines files (the source of truth). Beside each one, a small safetensors file
(`metadata-XXXXX.rows.safetensors`, the shard's `"row_index"` in `retrieval_index.json`) holds where every line
starts (uint64 byte offsets) and a 64-bit hash of every id, with the fingerprint of the JSON Lines file it describes
(size and SHA-256; the file is hashed at load only when it was modified after its row index). The id hashes of all
rows, sorted, with their rows (`records-sorted-ids.safetensors`, the config's `"sorted_ids"`) are written by
`save_pretrained` with the fingerprints of the record files they come from. Loading memory-maps the offsets and
those sorted ids (or, without a matching sorted-ids file, sorts the hashes: about 12 bytes per row in memory),
against about 560 bytes per row for a list of dicts and a dict of ids (`benchmarks/results/records_scale.md`). A
record is parsed when it is read. A shard without that file (saved by an older version), or whose file no longer matches its JSON Lines
file, is read once, streamed, to make the same arrays in memory (and checked as it goes); the next `save_pretrained`
into that folder writes the missing files. Two ids with one hash are told apart by reading their records.
"""

import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from diffusers.utils import logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .files import RetrievalIndexError, atomic_write
from .image_loading import is_url


logger = logging.get_logger(__name__)

ROW_INDEX_SUFFIX = ".rows.safetensors"
ROW_INDEX_FORMAT = "gill-record-rows"
ROW_INDEX_VERSION = "1"
ROW_INDEX_METADATA_KEY = "gill_record_rows"
RECORD_REQUIRED_KEYS = ("id", "path")
# The id hashes of every saved row, sorted, with their rows: written by `save_pretrained` beside the shards so that a
# load memory-maps them instead of sorting (100M rows: 34 s and 3.1 GiB at load otherwise).
SORTED_IDS_FILE = "records-sorted-ids.safetensors"
SORTED_IDS_FORMAT = "gill-sorted-ids"
SORTED_IDS_METADATA_KEY = "gill_sorted_ids"
SORTED_IDS_SPOT_CHECKS = 64
# Bytes hashed per `update` when checking a JSON Lines file against the SHA-256 its row index recorded.
HASH_BLOCK_BYTES = 1 << 24


def row_index_file_name(metadata_file: str) -> str:
    """`metadata-00003.jsonl` -> `metadata-00003.rows.safetensors`."""
    return os.path.splitext(metadata_file)[0] + ROW_INDEX_SUFFIX


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """A stable 64-bit hash of each id (BLAKE2b, 8 bytes): the same in every process, unlike Python's `hash`."""
    digests = bytearray()
    for image_id in ids:
        digests += hashlib.blake2b(image_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return np.frombuffer(bytes(digests), dtype="<u8").astype(np.uint64)


def check_record(record, where: str) -> None:
    """Raises [`RetrievalIndexError`] unless `record` is a JSON object with a non-empty string `id` and `path`."""
    if not isinstance(record, dict):
        raise RetrievalIndexError(f"{where}: a record must be a JSON object, got {record!r:.200}.")
    for key in RECORD_REQUIRED_KEYS:
        if not isinstance(record.get(key), str) or not record[key]:
            raise RetrievalIndexError(f"{where}: a record needs a non-empty string `{key}`, got {record!r:.200}.")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


class JsonlShard:
    """One JSON Lines file of records, read by byte offset: `offsets[i]` is where record `i` starts, `offsets[-1]`
    the file's size; `hashes[i]` the hash of its id. The arrays are memory-mapped when read from a row index file."""

    def __init__(self, path: str, offsets: np.ndarray, hashes: np.ndarray, num_urls: int, sha256: str,
                 row_index: str | None = None):
        self.path = path
        self.offsets, self.hashes = offsets, hashes
        self.num_urls, self.sha256 = num_urls, sha256
        # The row index file this shard was read from and still matches (None: made by a streamed pass).
        self.row_index = row_index
        # Mapped now, not at the first read: a save that replaces the file (by renaming another over it) or removes
        # it leaves this set reading the records it was loaded with. No file descriptor stays open.
        self._map = self._open_map()

    def _open_map(self) -> mmap.mmap | None:
        if not len(self.hashes):
            return None  # an empty file cannot be mapped
        with open(self.path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __getstate__(self) -> dict:
        # A copy or a pickle (another process) maps the file again.
        return {**self.__dict__, "_map": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map = self._open_map()

    def __len__(self) -> int:
        return len(self.hashes)

    def line(self, i: int) -> bytes:
        """Record `i` as its JSON text, without the line end."""
        return self._map[int(self.offsets[i]) : int(self.offsets[i + 1])].strip()

    def record(self, i: int) -> dict:
        line = self.line(i)
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RetrievalIndexError(f"{self.path}: record {i} (bytes {self.offsets[i]}..) is not a JSON line "
                                      f"({error}); was the file changed after the set was loaded?") from error
        check_record(record, f"{self.path}, record {i}")
        return record

    @classmethod
    def scan(cls, path: str) -> "JsonlShard":
        """One streamed pass over a JSON Lines file: every record checked (errors name the file and line), its
        offsets and id hashes kept, nothing else."""
        if not os.path.isfile(path):
            raise RetrievalIndexError(f"Missing file of the retrieval index: {path}")
        starts, ids, num_urls, position = [], [], 0, 0
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for n, line in enumerate(f, start=1):
                digest.update(line)
                if line.strip():
                    where = f"{path}, line {n}"
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as error:
                        raise RetrievalIndexError(f"{where}: not a JSON line ({error}).") from error
                    check_record(record, where)
                    starts.append(position)
                    ids.append(record["id"])
                    num_urls += is_url(record["path"])
                position += len(line)
        offsets = np.array(starts + [position], dtype=np.uint64)
        return cls(path, offsets, id_hashes(ids), num_urls, digest.hexdigest())

    @classmethod
    def read(cls, path: str, row_index_path: str | None) -> "JsonlShard":
        """The shard from its row index file when that file is there and matches the JSON Lines file; else (with a
        warning naming the file) from one streamed pass."""
        if not os.path.isfile(path):
            raise RetrievalIndexError(f"Missing file of the retrieval index: {path}")
        if row_index_path is not None:
            problem = None
            try:
                shard = cls._from_row_index(path, row_index_path)
            except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
                shard, problem = None, f"it cannot be read ({error})"
            if isinstance(shard, str):
                shard, problem = None, shard
            if shard is not None:
                return shard
            logger.warning(f"Ignoring the row index {row_index_path}: {problem}. Reading {path} in full instead; "
                           "saving the set into its folder again writes a new row index.")
        return cls.scan(path)

    @classmethod
    def _from_row_index(cls, path: str, row_index_path: str) -> "JsonlShard | str":
        """The shard, or why the row index file does not describe the JSON Lines file as it is now."""
        if not os.path.isfile(row_index_path):
            return "it is missing"
        with safe_open(row_index_path, framework="np") as f:
            meta = json.loads((f.metadata() or {}).get(ROW_INDEX_METADATA_KEY, "{}"))
            keys = set(f.keys())
        if meta.get("format") != ROW_INDEX_FORMAT or meta.get("format_version") != ROW_INDEX_VERSION:
            return f"it is not a {ROW_INDEX_FORMAT} version {ROW_INDEX_VERSION} file"
        if keys != {"offsets", "hashes"}:
            return f"it holds {sorted(keys)}, not offsets and hashes"
        stat = os.stat(path)
        if int(meta["jsonl_size"]) != stat.st_size:
            return f"it describes a file of {meta['jsonl_size']} bytes, {path} has {stat.st_size}: it is stale"
        # Written after its JSON Lines file: one modified later is checked against the SHA-256 recorded (files
        # copied or downloaded, whose times say nothing, are checked too).
        if stat.st_mtime_ns > os.stat(row_index_path).st_mtime_ns and _file_sha256(path) != meta["jsonl_sha256"]:
            return f"{path} changed since it was written (its SHA-256 differs): it is stale"
        arrays = _mmap_safetensors_arrays(row_index_path)
        offsets, hashes = arrays["offsets"], arrays["hashes"]
        n = int(meta["num_rows"])
        if offsets.dtype != np.uint64 or hashes.dtype != np.uint64 or offsets.shape != (n + 1,) or \
                hashes.shape != (n,) or int(offsets[-1]) != stat.st_size:
            return f"its arrays ({offsets.dtype} {offsets.shape}, {hashes.dtype} {hashes.shape}) do not fit {n} rows"
        shard = cls(path, offsets, hashes, int(meta["num_urls"]), meta["jsonl_sha256"], row_index=row_index_path)
        # Two records read as a spot check (a row index copied from another file of the same size).
        for i in sorted({0, n - 1}) if n else ():
            try:
                same = id_hashes([shard.record(i)["id"]])[0] == hashes[i]
            except RetrievalIndexError:
                same = False
            if not same:
                return f"record {i} of {path} is not the one it describes: it is stale"
        return shard

    def write_row_index(self, row_index_path: str) -> None:
        """Writes this shard's row index file (atomically), with the fingerprint of its JSON Lines file (size and
        SHA-256; no time, so that the same records make the same bytes)."""
        meta = {
            "format": ROW_INDEX_FORMAT, "format_version": ROW_INDEX_VERSION, "num_rows": str(len(self)),
            "num_urls": str(self.num_urls), "jsonl_size": str(int(self.offsets[-1])), "jsonl_sha256": self.sha256,
        }
        arrays = {"offsets": np.ascontiguousarray(self.offsets, dtype=np.uint64),
                  "hashes": np.ascontiguousarray(self.hashes, dtype=np.uint64)}
        # One metadata entry (JSON, sorted keys): safetensors writes several in no fixed order.
        metadata = {ROW_INDEX_METADATA_KEY: json.dumps(meta, sort_keys=True)}
        atomic_write(row_index_path, lambda p: save_file(arrays, p, metadata=metadata))
        self.row_index = row_index_path


def write_jsonl_shard(path: str, lines: Iterable[tuple[bytes, int, bool]]) -> JsonlShard:
    """Writes records given as (JSON text, id hash, is a URL) to a JSON Lines file (atomically); the shard as
    written, its offsets and hashes in memory (write its row index with `write_row_index`)."""
    starts, hashes, num_urls, position = [], [], 0, 0
    digest = hashlib.sha256()

    def write(tmp):
        nonlocal num_urls, position
        with open(tmp, "wb") as f:
            for text, id_hash, url in lines:
                line = text + b"\n"
                f.write(line)
                digest.update(line)
                starts.append(position)
                hashes.append(id_hash)
                num_urls += url
                position += len(line)

    atomic_write(path, write)
    return JsonlShard(path, np.array(starts + [position], dtype=np.uint64), np.array(hashes, dtype=np.uint64),
                      num_urls, digest.hexdigest())


def _mmap_safetensors_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, memory-mapped read-only."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    size = os.path.getsize(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype({"U64": np.uint64, "U32": np.uint32, "I64": np.int64}[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + header_size + end > size:
            raise ValueError(f"{name}: {end - begin} bytes for shape {shape}")
        out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=shape)
                     if end > begin else np.empty(shape, dtype=dtype))
    return out


class RecordTable(Sequence):
    r"""
    The records of a retrieval set, one dict per row, read-only: `len(table)`, `table[row]` (a new dict each time),
    slices (a list), iteration, `table.row_of(id)` and `id in table`. Rows of saved JSON Lines files come first
    (parsed when read), then rows added in memory (kept as dicts; [`~RecordTable.append`]).

    Ids are unique: [`~RecordTable.from_shards`] and `append` refuse a repeated one, naming it.
    """

    def __init__(self):
        self._shards: list[JsonlShard] = []
        self._shard_starts = np.zeros(1, dtype=np.int64)  # first row of each shard, then the number of file rows
        self._sorted_hashes = np.empty(0, dtype=np.uint64)
        self._sorted_rows = np.empty(0, dtype=np.int64)
        self._memory: list[dict] = []
        self._memory_rows: dict[str, int] = {}
        self._sorted_ids_file: str | None = None  # the sorted-ids file the sorted arrays are mapped from

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "RecordTable":
        table = cls()
        table.append(records)
        return table

    @classmethod
    def from_shards(cls, shards: list[JsonlShard], where: str, sorted_ids: str | None = None) -> "RecordTable":
        """The records of saved shards, in order; a [`RetrievalIndexError`] naming the id if one repeats.
        `sorted_ids`: a file written by [`~RecordTable.write_sorted_ids`] for these shards, memory-mapped instead of
        sorting the hashes again when it matches them (else ignored, with a log line)."""
        table = cls()
        table._shards = list(shards)
        table._shard_starts = np.cumsum([0] + [len(s) for s in shards], dtype=np.int64)
        mapped = _read_sorted_ids(sorted_ids, table) if sorted_ids is not None else None
        if mapped is not None:  # checked for repeated ids when it was written
            table._sorted_hashes, table._sorted_rows = mapped
            table._sorted_ids_file = os.path.realpath(sorted_ids)
            return table
        hashes = np.concatenate([np.asarray(s.hashes) for s in shards]) if shards else np.empty(0, np.uint64)
        order = np.argsort(hashes, kind="stable")
        table._sorted_hashes = hashes[order]
        del hashes
        table._sorted_rows = order.astype(np.uint32 if len(order) < 2**32 else np.int64)
        del order
        table._check_unique(where)
        return table

    def write_sorted_ids(self, path: str) -> None:
        """Writes the sorted id hashes of the saved rows and their rows (atomically), with the fingerprints of the
        JSON Lines files they come from; [`~RecordTable.from_shards`] maps them back. Only for a table whose rows
        are all in files."""
        if self._memory:
            raise ValueError(f"{len(self._memory)} rows are not saved yet: save the set before writing its sorted ids.")
        if self._sorted_ids_file == os.path.realpath(path):
            return  # mapped from that very file, which matched these shards
        meta = {"format": SORTED_IDS_FORMAT, "format_version": "1", "num_rows": str(self.num_file_rows),
                "shards": _fingerprints(self._shards)}
        arrays = {"hashes": np.ascontiguousarray(self._sorted_hashes, dtype=np.uint64),
                  "rows": np.ascontiguousarray(self._sorted_rows)}
        metadata = {SORTED_IDS_METADATA_KEY: json.dumps(meta, sort_keys=True)}
        atomic_write(path, lambda p: save_file(arrays, p, metadata=metadata))

    def _check_unique(self, where: str) -> None:
        equal = np.flatnonzero(self._sorted_hashes[1:] == self._sorted_hashes[:-1])
        if not len(equal):
            return
        # Runs of one hash: the same id twice, or (rarely) two ids with one hash.
        for first in equal[np.r_[True, np.diff(equal) > 1]]:
            stop = first + 1
            while stop < len(self._sorted_hashes) and self._sorted_hashes[stop] == self._sorted_hashes[first]:
                stop += 1
            seen = {}
            for row in sorted(int(r) for r in self._sorted_rows[first:stop]):
                image_id = self[row]["id"]
                if image_id in seen:
                    raise RetrievalIndexError(
                        f"The id {image_id!r} appears twice in {where}: rows {seen[image_id]} "
                        f"({self._where(seen[image_id])}) and {row} ({self._where(row)})."
                    )
                seen[image_id] = row

    def _where(self, row: int) -> str:
        if row >= self.num_file_rows:
            return "added in memory"
        s = int(np.searchsorted(self._shard_starts, row, side="right")) - 1
        return f"{self._shards[s].path}, record {row - int(self._shard_starts[s])}"

    @property
    def num_file_rows(self) -> int:
        return int(self._shard_starts[-1])

    @property
    def shards(self) -> list[JsonlShard]:
        """The saved files the first rows are read from, in order."""
        return list(self._shards)

    @property
    def num_urls(self) -> int:
        return sum(s.num_urls for s in self._shards) + sum(is_url(r["path"]) for r in self._memory)

    def __len__(self) -> int:
        return self.num_file_rows + len(self._memory)

    def _locate(self, row: int) -> tuple[JsonlShard | None, int]:
        if row >= self.num_file_rows:
            return None, row - self.num_file_rows
        s = int(np.searchsorted(self._shard_starts, row, side="right")) - 1
        return self._shards[s], row - int(self._shard_starts[s])

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = _check_row(row, len(self))
        shard, i = self._locate(row)
        return dict(self._memory[i]) if shard is None else shard.record(i)

    def __iter__(self) -> Iterator[dict]:
        for shard in self._shards:
            for i in range(len(shard)):
                yield shard.record(i)
        for record in self._memory:
            yield dict(record)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (Sequence, RecordTable)) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"RecordTable(num_rows={len(self)}, files={len(self._shards)}, in_memory={len(self._memory)})"

    def ids(self) -> Iterator[str]:
        for record in self:
            yield record["id"]

    def row_hashes(self) -> np.ndarray:
        """The id hash of every row, in row order (the saved rows' from their row indexes: no record is parsed)."""
        parts = [np.asarray(s.hashes) for s in self._shards]
        parts.append(id_hashes(r["id"] for r in self._memory))
        return np.concatenate(parts)

    def is_ordered_subset_of(self, ids: Sequence[str]) -> bool:
        """Whether the rows' ids are `ids` (unique) with some left out, in their order, compared by id hash (64-bit:
        a different set compares equal with probability about 2**-64 per row). No record is parsed."""
        wanted = id_hashes(ids)
        held = self.row_hashes()
        if len(held) > len(wanted):
            return False
        if len(held) == len(wanted):
            return bool(np.array_equal(held, wanted))
        return bool(np.array_equal(wanted[np.isin(wanted, held)], held))

    def get_row(self, image_id: str) -> int | None:
        """The row of `image_id`, or None when no record has it."""
        if image_id in self._memory_rows:
            return self._memory_rows[image_id]
        if not isinstance(image_id, str) or not len(self._sorted_hashes):
            return None
        key = id_hashes([image_id])[0]
        j = int(np.searchsorted(self._sorted_hashes, key, side="left"))
        while j < len(self._sorted_hashes) and self._sorted_hashes[j] == key:
            row = int(self._sorted_rows[j])
            if self[row]["id"] == image_id:
                return row
            j += 1
        return None

    def row_of(self, image_id: str) -> int:
        row = self.get_row(image_id)
        if row is None:
            raise KeyError(f"No image with id {image_id!r} in the index.")
        return row

    def __contains__(self, image_id) -> bool:
        return isinstance(image_id, str) and self.get_row(image_id) is not None

    def check_new(self, records: list[dict]) -> None:
        """Raises ValueError naming an id of `records` that repeats, or that this table already has."""
        ids = [r["id"] for r in records]
        seen = set()
        for image_id in ids:
            if image_id in seen or image_id in self._memory_rows:
                raise ValueError(f"The id {image_id!r} is already in the index; ids must be unique.")
            seen.add(image_id)
        if len(self._sorted_hashes) and ids:
            # Binary search of each new hash (not `np.isin`, which sorts the whole set again for every batch).
            new = id_hashes(ids)
            at = np.minimum(np.searchsorted(self._sorted_hashes, new), len(self._sorted_hashes) - 1)
            maybe = self._sorted_hashes[at] == new
            for image_id in (i for i, m in zip(ids, maybe) if m):
                if self.get_row(image_id) is not None:
                    raise ValueError(f"The id {image_id!r} is already in the index; ids must be unique.")

    def append(self, records: Iterable[dict], checked: bool = False) -> None:
        """Adds records after the last row (kept in memory as copies); a repeated id is a ValueError (unless
        `checked`: the caller ran `check_new` on them)."""
        records = [dict(r) for r in records]
        if not checked:
            self.check_new(records)
        for record in records:
            self._memory_rows[record["id"]] = len(self)
            self._memory.append(record)

    def lines(self, start: int, stop: int) -> Iterator[tuple[bytes, int, bool]]:
        """Rows `start..stop` as (JSON text, id hash, is a URL), for writing them: saved rows are copied as they
        are in their files (not parsed again, except for the URL flag), rows in memory written with `json.dumps`."""
        row = start
        while row < min(stop, self.num_file_rows):
            shard, i = self._locate(row)
            end = min(len(shard), i + stop - row)
            for j in range(i, end):
                text = shard.line(j)
                yield text, int(shard.hashes[j]), bool(shard.num_urls) and is_url(json.loads(text)["path"])
            row += end - i
        memory = self._memory[max(start - self.num_file_rows, 0) : max(stop - self.num_file_rows, 0)]
        hashes = id_hashes(r["id"] for r in memory)
        for record, id_hash in zip(memory, hashes):
            yield json.dumps(record, ensure_ascii=False).encode("utf-8"), int(id_hash), is_url(record["path"])


def _fingerprints(shards: list[JsonlShard]) -> list[list]:
    return [[os.path.basename(s.path), len(s), s.sha256] for s in shards]


def _read_sorted_ids(path: str, table: RecordTable) -> tuple[np.ndarray, np.ndarray] | None:
    """The memory-mapped sorted hashes and rows of `path` when it describes `table`'s shards as they are (same files,
    rows and SHA-256s, in order; arrays of the right shape; spot checks against the shards' own hashes), else None."""
    if not os.path.isfile(path):
        return None
    problem = None
    try:
        with safe_open(path, framework="np") as f:
            meta = json.loads((f.metadata() or {}).get(SORTED_IDS_METADATA_KEY, "{}"))
        n = table.num_file_rows
        if meta.get("format") != SORTED_IDS_FORMAT or meta.get("format_version") != "1":
            problem = f"it is not a {SORTED_IDS_FORMAT} version 1 file"
        elif meta.get("shards") != _fingerprints(table._shards) or meta.get("num_rows") != str(n):
            problem = "it was written for other record files (the set was saved again since)"
        else:
            arrays = _mmap_safetensors_arrays(path)
            hashes, rows = arrays.get("hashes"), arrays.get("rows")
            if hashes is None or rows is None or hashes.dtype != np.uint64 or hashes.shape != (n,) or \
                    rows.shape != (n,) or rows.dtype not in (np.uint32, np.int64):
                problem = "its arrays do not fit the rows"
            elif n:
                at = np.unique(np.linspace(0, n - 1, min(n, SORTED_IDS_SPOT_CHECKS)).astype(np.int64))
                picked_rows = rows[at].astype(np.int64)
                shard_of = np.searchsorted(table._shard_starts, picked_rows, side="right") - 1
                if picked_rows.min() < 0 or picked_rows.max() >= n:
                    problem = "its rows are out of range"
                elif not np.array_equal(hashes[at], np.array([table._shards[s].hashes[r - table._shard_starts[s]]
                                                              for s, r in zip(shard_of, picked_rows)], np.uint64)):
                    problem = "its entries do not match the rows' id hashes"
                elif np.any(hashes[at][1:] < hashes[at][:-1]):
                    problem = "its hashes are not sorted"
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError) as error:
        problem = f"it cannot be read ({error})"
    if problem is not None:
        logger.info(f"Not using {path}: {problem}; sorting the id hashes instead.")
        return None
    return hashes, rows


def _check_row(row, length: int) -> int:
    if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)):
        raise TypeError(f"Records are indexed by row (an int) or a slice, got {type(row).__name__}.")
    row = int(row)
    if row < 0:
        row += length
    if not 0 <= row < length:
        raise IndexError(f"Row {row} is out of range for {length} records.")
    return row
