"""Where an evaluation writes: one JSONL record per (example, system), appended as they finish, and a summary.

A rerun with the same output folder reads the records back and skips what is done, so a long run that stops (a
crash, a closed laptop) resumes where it was. The summary is always recomputed from every record, old and new, and
written as `summary.json` and `summary.md` (a Markdown table, one row per system).

Run as N workers (`accelerate launch --num_processes N -m gill_pipeline evaluate ...`), each worker appends the
records of its share to `records.part-RANK.jsonl`; worker 0 folds them into `records.jsonl` in example order after
every worker is done (the file a single process writes, byte for byte) and alone writes the shared files. A part
left by a killed worker is read back on the rerun, so its examples are not done again.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable

from diffusers.utils import logging

from ..utils.distributed import Workers, atomic_write_text, current_workers


logger = logging.get_logger(__name__)

RECORDS_FILE = "records.jsonl"
RECORDS_PART_TEMPLATE = "records.part-{:05d}.jsonl"
RECORDS_PART_PREFIX, RECORDS_PART_SUFFIX = "records.part-", ".jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MARKDOWN = "summary.md"
IMAGES_DIR = "images"
EMBEDDINGS_DIR = "embeddings"
SETTINGS_FILE = "settings.json"
SETTINGS_KEY = "settings"
# Embedding shards: `ids-<first characters of the SHA-256 of their ids>-<rows>.safetensors` + `.json`.
EMBEDDING_SHARD_PREFIX = "ids-"
EMBEDDING_SHARD_HASH_CHARS = 20


@dataclass
class RecordLog:
    r"""
    The records of one evaluation run in `output_dir`; `done` holds the (example id, system) pairs already there.

    Args:
        output_dir (`str`): the run's folder.
        fields (`tuple[str, ...]`): the keys every record of this protocol has besides `id` and `system`.
        upgrade (`Callable[[dict], dict]`, *optional*): reads a record written by an older version as it would be
            written now (in memory; the file is left as it was), before it is checked.
        workers ([`Workers`], *optional*): the workers of this run (default: from `accelerate launch`'s environment).

    A line of an earlier run that is not such a record (cut short by a killed run, `{}`, `[1, 2]`, a record without
    its metric) is left out with a warning naming the file and line, and counted in `ignored`: its example is done
    again.
    """

    output_dir: str
    fields: tuple[str, ...] = ()
    upgrade: Callable[[dict], dict] | None = None
    records: list[dict] = field(default_factory=list)
    ignored: int = 0
    workers: Workers = field(default_factory=current_workers)

    def __post_init__(self):
        os.makedirs(self.output_dir, exist_ok=True)
        self.reload()
        if self.records:
            logger.info(f"Resuming: {len(self.records)} records already in {self.path} (and its parts).")

    def _read_file(self, path: str, skip: set | None = None) -> list[dict]:
        records = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                problem = self._problem(line)
                if problem is None:
                    record = self._read(line)
                    if skip is None or (record["id"], record["system"]) not in skip:
                        records.append(record)
                else:
                    self.ignored += 1
                    logger.warning(f"{path}, line {n}: {problem}; it is ignored and its example done again.")
        return records

    def part_paths(self) -> list[str]:
        """The records files of workers not folded into `records.jsonl` yet, by rank."""
        names = [n for n in os.listdir(self.output_dir) if n.startswith(RECORDS_PART_PREFIX) and n.endswith(RECORDS_PART_SUFFIX)]
        return [os.path.join(self.output_dir, n) for n in sorted(names)]

    def _part_records(self, done: set) -> list[dict]:
        records = []
        for path in self.part_paths():
            for record in self._read_file(path, skip=done):
                done.add((record["id"], record["system"]))
                records.append(record)
        return records

    def reload(self) -> None:
        """Reads `records.jsonl` and the workers' parts again (after other workers wrote theirs)."""
        self.records, self.ignored = [], 0
        if os.path.isfile(self.path):
            self.records = self._read_file(self.path)
        self.records += self._part_records(self.done)

    def fold_parts(self, order: dict[str, int]) -> bool:
        """Worker 0, while no other writes: appends the records of the parts that `records.jsonl` lacks, in example
        order (`order`: example id -> place), then removes the parts. Returns whether there were any."""
        parts = self.part_paths()
        if not parts:
            return False
        done = set()
        if os.path.isfile(self.path):
            done = {(r["id"], r["system"]) for r in self._read_file(self.path)}
        new = self._part_records(done)
        new.sort(key=lambda r: order.get(r["id"], len(order)))  # stable: other systems' records keep their order
        self._write(self.path, new)
        for path in parts:
            os.remove(path)
        return True

    @staticmethod
    def _write(path: str, records: list[dict]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _read(self, line: str) -> dict:
        record = json.loads(line)
        return self.upgrade(record) if self.upgrade is not None and isinstance(record, dict) else record

    def _problem(self, line: str) -> str | None:
        try:
            record = self._read(line)
        except json.JSONDecodeError:
            return "not a JSON line (a run stopped while writing it?)"
        if not isinstance(record, dict):
            return f"expected a JSON object, got {line.strip()[:80]}"
        absent = [k for k in ("id", "system", *self.fields) if k not in record]
        if absent:
            return f"the record has no field `{absent[0]}`"
        if not isinstance(record["id"], str) or not isinstance(record["system"], str):
            return "the fields `id` and `system` must be strings"
        return None

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, RECORDS_FILE)

    @property
    def done(self) -> set[tuple[str, str]]:
        return {(r["id"], r["system"]) for r in self.records}

    def todo(self, examples: list, system: str) -> list:
        done = self.done
        return [e for e in examples if (e.id, system) not in done]

    def append(self, records: list[dict]) -> None:
        """Adds records every worker computed alike; worker 0 writes them."""
        if self.workers.is_main:
            self._write(self.path, records)
        self.records.extend(records)

    def append_share(self, records: list[dict]) -> None:
        """Adds records of this worker's share: to `records.jsonl` alone, to this worker's part among several."""
        if not self.workers.distributed:
            return self.append(records)
        self._write(os.path.join(self.output_dir, RECORDS_PART_TEMPLATE.format(self.workers.rank)), records)
        self.records.extend(records)

    def of(self, system: str) -> list[dict]:
        return [r for r in self.records if r["system"] == system]

    def image_path(self, system: str, example_id: str) -> str:
        folder = os.path.join(self.output_dir, IMAGES_DIR, system)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{_safe_name(example_id)}.png")

    def saved_image(self, record: dict) -> str:
        """The path of a record's generated image, which must lie in this run's `images/` folder."""
        images = os.path.abspath(os.path.join(self.output_dir, IMAGES_DIR))
        path = os.path.normpath(os.path.join(self.output_dir, str(record.get("image"))))
        if os.path.commonpath([images, os.path.abspath(path)]) != images:
            raise ValueError(f"{self.path}: the record of {record['id']!r} names the image {record.get('image')!r}, "
                             f"outside {images}.")
        return path


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def check_settings(output_dir: str, settings: dict, read_old: Callable[[dict, dict], dict] | None = None) -> None:
    """Records the run's settings in `settings.json`, or refuses to resume a run made with other settings: its
    records would be mixed with incomparable ones. `read_old(before, settings)`, when given, reads the settings of a
    run written by an older version as they would be written now (the file itself is left as it was)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))  # as JSON reads it back (tuples become lists)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} is not the settings file of a run ({error}); delete it, or pass another `output_dir`."
            ) from None
        if not isinstance(before, dict):
            raise ValueError(f"{path} is not the settings file of a run (not a JSON object); delete it, or pass "
                             "another `output_dir`.")
        if read_old is not None:
            before = read_old(before, settings)
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(
                f"`output_dir` {output_dir!r} holds a run with other settings ({', '.join(changed)}); pass another "
                "folder, or delete this one to start again."
            )
        return
    if current_workers().is_main:
        atomic_write_text(path, json.dumps(settings, indent=2))


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(ids).encode("utf-8")).hexdigest()


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EmbeddingStore:
    """Embeddings computed batch by batch and saved as safetensors shards under `output_dir/embeddings/`, so a
    retrieval run that stops resumes at the batch it was in (the ranking needs every embedding at the end).

    A shard is named by a hash of the ids of the rows it holds (`ids-<hash>-<rows>`), so a run over the examples in
    another order or another batching never writes over a shard of other rows. Its `.safetensors` file is written
    first (under a temporary name, then renamed), its `.json` last, the same way, as the commit marker: the ids, their
    hash, and the SHA-256 of the `.safetensors` file it goes with. A shard is read back only when all three agree; one
    that does not (cut short, its json missing or unreadable, its embeddings not the ones its json was written for,
    another width, a shard of an older version without a commit marker) is left out with a warning and counted in
    `ignored`, and its embeddings are computed again."""

    def __init__(self, output_dir: str, workers: Workers | None = None):
        self.folder = os.path.join(output_dir, EMBEDDINGS_DIR)
        self.ignored = 0
        self.workers = current_workers() if workers is None else workers

    @staticmethod
    def shard_name(ids: list[str]) -> str:
        """The name (without extension) of the shard holding the rows of `ids`, in this order."""
        return f"{EMBEDDING_SHARD_PREFIX}{_ids_digest(ids)[:EMBEDDING_SHARD_HASH_CHARS]}-{len(ids):06d}"

    def _read_shard(self, folder: str, name: str):
        """(ids, (n, E) embeddings) of one shard, or raises ValueError saying what is wrong with it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = os.path.join(folder, name)
        try:
            with open(path[: -len(".safetensors")] + ".json", encoding="utf-8") as f:
                marker = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"its ids file is missing or unreadable ({error})") from None
        if isinstance(marker, list):
            raise ValueError("it was written by an older version, without a commit marker")
        if not isinstance(marker, dict) or not isinstance(marker.get("ids"), list):
            raise ValueError("its ids file is not a JSON object with a list of `ids`")
        ids = marker["ids"]
        if not all(isinstance(i, str) for i in ids):
            raise ValueError("its ids are not all strings")
        if marker.get("ids_sha256") != _ids_digest(ids) or name != self.shard_name(ids) + ".safetensors":
            raise ValueError("its ids are not the ones its name and hash were made for")
        try:
            if marker.get("embeddings_sha256") != _file_digest(path):
                raise ValueError("its embeddings are not the ones its ids file was written for")
            embeddings = load_file(path)["embeddings"]
        except (SafetensorError, OSError, KeyError) as error:
            raise ValueError(f"unreadable ({type(error).__name__}: {error})") from None
        if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
            raise ValueError(f"{embeddings.ndim}-D embeddings of {embeddings.shape[0] if embeddings.ndim else 0} rows "
                             f"for {len(ids)} ids")
        return ids, embeddings

    def _read_all(self, folder: str) -> dict:
        found, width = {}, None
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".safetensors"):
                continue
            try:
                shard_ids, shard = self._read_shard(folder, name)
                if width is not None and shard.shape[1] != width:
                    raise ValueError(f"{shard.shape[1]} wide, the others {width}")
            except ValueError as problem:
                self.ignored += 1
                logger.warning(f"{os.path.join(folder, name)}: {problem}; the shard is ignored and its embeddings "
                               "computed again.")
                continue
            width = shard.shape[1]
            found.update(zip(shard_ids, shard))
        return found

    def _write_shard(self, folder: str, ids: list[str], embeddings) -> None:
        """The embeddings first, then the ids file that commits them; each under a temporary name and renamed, so
        a killed worker leaves either no shard or a whole one."""
        from safetensors.torch import save_file

        name = self.shard_name(ids)
        path = os.path.join(folder, name + ".safetensors")
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            save_file({"embeddings": embeddings}, tmp)
            digest = _file_digest(tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        marker = {"ids": list(ids), "ids_sha256": _ids_digest(ids), "embeddings_sha256": digest}
        atomic_write_text(os.path.join(folder, name + ".json"), json.dumps(marker))

    def compute(self, key: str, ids: list[str], items: list, embed, batch_size: int, progress: bool = True):
        """`(len(ids), E)` embeddings of `items` (in order), by `embed(list_of_items) -> (n, E)`, reusing shards of
        an earlier run under the name `key` (only for the ids they were made for). Among N workers each embeds a
        contiguous run of the batches; all then read every shard."""
        import torch
        from tqdm.auto import tqdm

        if not ids:
            raise ValueError(f"Nothing to embed for {key!r}: the evaluated examples are empty.")
        folder = os.path.join(self.folder, _safe_name(key))
        os.makedirs(folder, exist_ok=True)
        found = self._read_all(folder)
        # Every worker has read the same shards before any writes one.
        self.workers.barrier()
        width = next(iter(found.values())).shape[0] if found else None
        todo = [i for i, example_id in enumerate(ids) if example_id not in found]
        batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
        mine = [batches[b] for b in self.workers.share(len(batches))]
        for batch in tqdm(mine, desc=f"embedding {key}", disable=not progress or not mine):
            embeddings = embed([items[i] for i in batch]).float().cpu().contiguous()
            if width is not None and embeddings.shape[1] != width:
                raise ValueError(
                    f"The embeddings saved in {folder} are {width} wide, the model gives {embeddings.shape[1]}; delete "
                    "the folder to compute them again."
                )
            width = embeddings.shape[1]
            batch_ids = [ids[i] for i in batch]
            self._write_shard(folder, batch_ids, embeddings)
            found.update(zip(batch_ids, embeddings))
        if self.workers.distributed:
            self.workers.barrier()
            found = self._read_all(folder)
        return torch.stack([found[example_id] for example_id in ids])


def ignored_notes(log: RecordLog, store: EmbeddingStore | None = None) -> list[str]:
    """Summary notes counting what an earlier run left that could not be read back (and was done again)."""
    notes = []
    if log.ignored:
        notes.append(f"{log.ignored} unreadable line(s) of {log.path} were ignored and their examples done again.")
    if store is not None and store.ignored:
        notes.append(f"{store.ignored} unreadable embedding shard(s) in {store.folder} were ignored and computed again.")
    return notes


def markdown_table(title: str, rows: dict[str, dict], notes: list[str] | None = None) -> str:
    """A Markdown table with one row per system and one column per metric (numbers to 4 digits)."""
    columns = []
    for values in rows.values():
        columns += [k for k in values if k not in columns]
    lines = [f"# {title}", "", "| system | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for system, values in rows.items():
        cells = []
        for c in columns:
            value = values.get(c, "")
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes or []]) + "\n"


def write_summary(output_dir: str, protocol: str, results: dict[str, dict], settings: dict, notes: list[str]) -> dict:
    """Writes `summary.json` and `summary.md`; returns the summary."""
    summary = {"protocol": protocol, "results": results, SETTINGS_KEY: settings, "notes": notes}
    if current_workers().is_main:  # every worker computed the same summary
        atomic_write_text(os.path.join(output_dir, SUMMARY_JSON), json.dumps(summary, indent=2))
        atomic_write_text(os.path.join(output_dir, SUMMARY_MARKDOWN), markdown_table(f"{protocol}", results, notes))
    return summary
