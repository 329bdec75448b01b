"""The FAISS files of a retrieval set loaded where faiss cannot be imported: kept as they are and copied through by a
save, never lost (see `RetrievalIndexSerializationMixin`)."""

import json
import os
import shutil
from dataclasses import dataclass

from .faiss_shards import FAISS_TRAINED_FILE, faiss_files, free_faiss_file_name
from .files import RetrievalIndexError, atomic_write as _atomic_write

FAISS_EXTRA_HINT = 'pip install "gill_pipeline[faiss]"'


@dataclass(frozen=True)
class UnreadFaiss:
    """The FAISS index of a set loaded where faiss could not be imported: its `"faiss"` block, the folder its files
    are in and what they were at load (size, mtime), so that a save copies them through unchanged, never loses them."""

    folder: str
    block: dict
    stats: dict

    @classmethod
    def of(cls, folder: str, block: dict) -> "UnreadFaiss":
        stats = {}
        for name in sorted(faiss_files(block)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise RetrievalIndexError(f"Missing file of the retrieval index: {path}")
            stat = os.stat(path)
            stats[name] = (stat.st_size, stat.st_mtime_ns)
        return cls(os.path.realpath(folder), json.loads(json.dumps(block)), stats)

    def check_unchanged(self, num_rows: int) -> None:
        """Raises ValueError (before a save writes anything) when the files cannot be copied through as they are."""
        if self.block.get("num_rows") != num_rows:
            raise ValueError(
                f"This set was loaded from {self.folder} where faiss could not be imported, so its FAISS index "
                f"({self.block.get('num_rows')} rows) could not take the rows added since (now {num_rows}): install "
                f"faiss ({FAISS_EXTRA_HINT}) and load it again, or call `drop_faiss_index()` to save it without one."
            )
        for name, stat in self.stats.items():
            path = os.path.join(self.folder, name)
            now = os.stat(path) if os.path.isfile(path) else None
            if now is None or (now.st_size, now.st_mtime_ns) != stat:
                raise ValueError(
                    f"The FAISS file {path} of this set (loaded where faiss could not be imported) is gone or was "
                    f"changed since the load, so it cannot be copied through: install faiss ({FAISS_EXTRA_HINT}) "
                    "and load the set again, or call `drop_faiss_index()` to save it without one."
                )

    def copy_to(self, folder: str, in_use: set[str]) -> "UnreadFaiss":
        """The files copied (unchanged, each atomically) into `folder` under names its current config does not read
        (in the folder they came from: kept as they are); the copy there."""
        if os.path.realpath(folder) == self.folder:
            return self
        block = json.loads(json.dumps(self.block))
        taken = set(in_use)
        for i, entry in enumerate(block["files"]):
            entry["file"] = self._copy(entry["file"], folder, free_faiss_file_name(i, taken))
            taken.add(entry["file"])
        trained = FAISS_TRAINED_FILE if FAISS_TRAINED_FILE not in taken else FAISS_TRAINED_FILE.replace(
            ".index", "-r1.index")
        block["trained_file"] = self._copy(block["trained_file"], folder, trained)
        return UnreadFaiss.of(folder, block)

    def _copy(self, name: str, folder: str, target: str) -> str:
        _atomic_write(os.path.join(folder, target),
                      lambda p: shutil.copyfile(os.path.join(self.folder, name), p))
        return target
