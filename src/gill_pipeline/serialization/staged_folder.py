"""Saving into a folder so that a failed save leaves what was there: written aside first, then moved in.

`GILLPipeline.save_pretrained` writes into a new hidden folder inside the target (`.saving-*`: same disk, so the moves
are renames, and no write access to the target's parent is needed); only when every component is written are its
entries moved into the target, each replacing the entry of the same name (a component folder is replaced whole, so
no stale shard of an earlier save is left in it). Entries of the target that the save does not write (a retrieval
set, a README) stay. If writing or moving fails, the target is left as it was (a target the save created is removed).
Replacing by renaming also keeps a pipeline loaded from the same folder working: its memory-mapped files are
unlinked, not overwritten. The cost: while saving, the disk holds the old and the new copy.
"""

import contextlib
import os
import shutil
import tempfile

from diffusers.utils import logging

logger = logging.get_logger(__name__)

STAGING_PREFIX = ".saving-"
REPLACED_PREFIX = ".replaced-"


def _move_in(staging: str, target: str, backup: str, owned=()) -> None:
    """Moves every entry of `staging` into `target`, the replaced ones (and those of `owned` that `staging` lacks) into
    `backup`; undoes it all on failure."""
    written = sorted(os.listdir(staging))
    moved = []
    try:
        for entry in written + sorted(set(owned) - set(written)):
            destination = os.path.join(target, entry)
            replaced = os.path.lexists(destination)
            if replaced:
                os.replace(destination, os.path.join(backup, entry))
            moved.append((entry, replaced))
            if entry in written:
                os.replace(os.path.join(staging, entry), destination)
    except BaseException:
        for entry, replaced in reversed(moved):
            destination = os.path.join(target, entry)
            if os.path.lexists(destination) and not os.path.lexists(os.path.join(staging, entry)):
                os.replace(destination, os.path.join(staging, entry))
            if replaced:
                os.replace(os.path.join(backup, entry), destination)
        raise


@contextlib.contextmanager
def staged_folder(save_directory: str | os.PathLike, owned: tuple[str, ...] = ()):
    """Yields a new empty folder to write into; on success its entries replace those of `save_directory` (created
    if needed), on failure it is deleted and `save_directory` is left as it was.

    `owned`: entries that belong to what is saved even when this save does not write them (the LoRA adapter of an
    earlier save, which would otherwise be applied to the LM saved now): removed on success.
    """
    target = os.fspath(save_directory)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"`save_directory` {target!r} is a file, not a folder.")
    created = not os.path.exists(target)
    os.makedirs(target, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target)
    try:
        yield staging
        backup = tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=target)
        try:
            _move_in(staging, target, backup, owned)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(backup)  # empty once the replaced entries are moved back; kept otherwise
            raise
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        logger.info("Saving to %s failed: nothing there was changed.", target)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)  # a failed save into a new folder leaves no empty folder behind
