"""Where an evaluation writes: one JSONL record per (example, system), appended as they finish, and a summary.

A rerun with the same output folder reads the records back and skips what is done, so a long run that stops (a
crash, a closed laptop) resumes where it was. The summary is always recomputed from every record, old and new, and
written as `summary.json` and `summary.md` (a Markdown table, one row per system).
"""

import json
import os
from dataclasses import dataclass, field
from typing import Callable

from diffusers.utils import logging


logger = logging.get_logger(__name__)

RECORDS_FILE = "records.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MARKDOWN = "summary.md"
IMAGES_DIR = "images"
EMBEDDINGS_DIR = "embeddings"
SETTINGS_FILE = "settings.json"
SETTINGS_KEY = "settings"


@dataclass
class RecordLog:
    """The records of one evaluation run in `output_dir`; `done` holds the (example id, system) pairs already there."""

    output_dir: str
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        os.makedirs(self.output_dir, exist_ok=True)
        path = self.path
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        # Only the last line can be cut short (a run killed while writing); it is redone.
                        logger.warning(f"{path}:{n}: an unreadable record is ignored and its example redone.")
            if self.records:
                logger.info(f"Resuming: {len(self.records)} records already in {path}.")

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
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)

    def of(self, system: str) -> list[dict]:
        return [r for r in self.records if r["system"] == system]

    def image_path(self, system: str, example_id: str) -> str:
        folder = os.path.join(self.output_dir, IMAGES_DIR, system)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{_safe_name(example_id)}.png")


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
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if read_old is not None:
            before = read_old(before, settings)
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(
                f"`output_dir` {output_dir!r} holds a run with other settings ({', '.join(changed)}); pass another "
                "folder, or delete this one to start again."
            )
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


class EmbeddingStore:
    """Embeddings computed batch by batch and saved as safetensors shards under `output_dir/embeddings/`, so a
    retrieval run that stops resumes at the batch it was in (the ranking needs every embedding at the end)."""

    def __init__(self, output_dir: str):
        self.folder = os.path.join(output_dir, EMBEDDINGS_DIR)

    def compute(self, key: str, ids: list[str], items: list, embed, batch_size: int, progress: bool = True):
        """`(len(ids), E)` embeddings of `items` (in order), by `embed(list_of_items) -> (n, E)`, reusing shards of
        an earlier run under the name `key`."""
        import torch
        from safetensors.torch import load_file, save_file
        from tqdm.auto import tqdm

        folder = os.path.join(self.folder, _safe_name(key))
        os.makedirs(folder, exist_ok=True)
        found = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                shard = load_file(os.path.join(folder, name))
                with open(os.path.join(folder, name[: -len(".safetensors")] + ".json"), encoding="utf-8") as f:
                    shard_ids = json.load(f)
                found.update(zip(shard_ids, shard["embeddings"]))
        todo = [i for i, example_id in enumerate(ids) if example_id not in found]
        batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc=f"embedding {key}", disable=not progress or not batches):
            embeddings = embed([items[i] for i in batch]).float().cpu().contiguous()
            name = f"{len(os.listdir(folder)):06d}"
            # The ids first: a shard without its ids file is never read back.
            with open(os.path.join(folder, name + ".json"), "w", encoding="utf-8") as f:
                json.dump([ids[i] for i in batch], f)
            save_file({"embeddings": embeddings}, os.path.join(folder, name + ".safetensors"))
            found.update(zip((ids[i] for i in batch), embeddings))
        return torch.stack([found[example_id] for example_id in ids])


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
    with open(os.path.join(output_dir, SUMMARY_JSON), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, SUMMARY_MARKDOWN), "w", encoding="utf-8") as f:
        f.write(markdown_table(f"{protocol}", results, notes))
    return summary
