"""What every file of a saved retrieval set shares: its error type and the atomic write (a reader sees the old file
or the new one, never half of one). Lower than `serialization.py` and `faiss_shards.py`, which both use it."""

import os


class RetrievalIndexError(ValueError):
    """A retrieval index folder or its contents are malformed."""


def atomic_write(path: str, write) -> None:
    """Writes `path` under a temporary name and renames it: a reader sees the old file or the new one, never half."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
