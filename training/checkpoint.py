"""Resumable checkpoints that no kill can break.

A checkpoint folder `checkpoints/checkpoint-<step>/` holds the trainable tensors (safetensors), the optimizer and
scheduler states, every process's RNG states, `trainer_state.json` (step and data position) and the keys of the
examples skipped so far. `checkpoints/latest` (a one-line text file, replaced atomically) names the newest one.

Whatever moment a run is killed at, the next start finds `latest` naming a complete checkpoint, and never deletes
the only complete copy of one:
1. a checkpoint is written to `.tmp-checkpoint-<step>` and renamed into place only when complete (a `.tmp-` folder
   is incomplete by definition, and removed at the next start);
2. re-saving a step that exists (after resuming from an older checkpoint) first moves the old copy aside to
   `.replaced-checkpoint-<step>`, a complete copy that the next start puts back if the new one never arrived;
3. `latest` is rewritten only once the folder it names is in place;
4. old checkpoints are pruned last, by renaming them to `.tmp-` first (a half-deleted folder never looks complete),
   and never the one `latest` names or one of a later step (they belong to the run that was resumed from earlier).
Everything is loaded with `weights_only=True` or from safetensors/JSON.
"""

import json
import logging
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.sharding import full_optimizer_state, full_tensor, is_sharded, local_part, shard_optimizer_state

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"
SKIPS_FILE = "skipped_examples.json"
RNG_TEMPLATE = "rng-rank{rank}.pt"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole (sharded ones gathered: with FSDP every process must call this, in step)."""
    return {
        name: full_tensor(p.detach()).contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad
    }


def is_model_sharded(model) -> bool:
    """Whether some trainable tensor is a shard (FSDP): saving and loading then involve every process."""
    return any(is_sharded(p) for p in model.parameters() if p.requires_grad)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def read_latest(output_dir: str) -> str | None:
    """The checkpoint name `latest` holds, or None when there is none."""
    pointer = os.path.join(output_dir, CHECKPOINTS_DIR, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        return f.read().strip() or None


def _is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE_FILE))


def _step_of(name: str) -> int | None:
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def _remove(root: str, name: str) -> None:
    """Deletes `root/name`, first renamed to a `.tmp-` name: a deletion cut short leaves nothing that looks complete."""
    doomed = os.path.join(root, TMP_PREFIX + "deleting-" + name)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(os.path.join(root, name), doomed)
    shutil.rmtree(doomed)


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuses to save weights with NaN or inf: a checkpoint must always be one to go back to."""
    bad = [name for name, p in tensors.items() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"Not saving a checkpoint: trainable weights are not finite ({bad[:5]}).")


def save_checkpoint(
    accelerator, output_dir, model, optimizer, scheduler, trainer_state: dict, keep: int, skips: dict | None = None
) -> str:
    """Writes `checkpoint-<step>` (every process writes its RNG state), points `latest` at it and prunes old ones."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    name = f"{CHECKPOINT_PREFIX}{trainer_state['step']}"
    tmp = os.path.join(root, TMP_PREFIX + name)
    unwrapped = accelerator.unwrap_model(model)
    # Sharded (FSDP): every process gathers the trainable tensors and the optimizer moments (collectives), so all
    # of them refuse non-finite weights together. Otherwise the main process alone reads its own copy.
    sharded = is_model_sharded(unwrapped)
    tensors = trainable_state(unwrapped) if sharded or accelerator.is_main_process else None
    optimizer_state = full_optimizer_state(optimizer) if sharded else None
    if tensors is not None:
        check_finite(tensors)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, RNG_TEMPLATE.format(rank=accelerator.process_index)))
    if accelerator.is_main_process:
        save_file(tensors, os.path.join(tmp, TRAINABLE_FILE))
        torch.save(optimizer_state or optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE))
        if skips is not None:
            with open(os.path.join(tmp, SKIPS_FILE), "w", encoding="utf-8") as f:
                json.dump(skips, f)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:  # written last: marks completeness
            json.dump(trainer_state, f, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _install(root, name)
        _prune(root, keep, trainer_state["step"])
        logger.info("Saved checkpoint %s", os.path.join(root, name))
    accelerator.wait_for_everyone()
    return os.path.join(root, name)


def _install(root: str, name: str) -> None:
    """Moves the complete `.tmp-<name>` into place and points `latest` at it; see the module docstring for why each
    step comes where it does."""
    final, aside = os.path.join(root, name), os.path.join(root, REPLACED_PREFIX + name)
    _settle_replaced(root, name)  # normally done at start; here too, so that `aside` is free
    if os.path.isdir(final):
        os.replace(final, aside)
    os.replace(os.path.join(root, TMP_PREFIX + name), final)
    _write_latest(root, name)
    if os.path.isdir(aside):
        _remove(root, REPLACED_PREFIX + name)


def _prune(root: str, keep: int, step: int) -> None:
    """Keeps the `keep` newest checkpoints up to `step`; never the latest one, never one of a later step."""
    latest = read_latest(os.path.dirname(root))
    steps = sorted(s for s in map(_step_of, os.listdir(root)) if s is not None and s <= step)
    for old in steps[:-keep]:
        if f"{CHECKPOINT_PREFIX}{old}" != latest:
            _remove(root, f"{CHECKPOINT_PREFIX}{old}")


def _settle_replaced(root: str, name: str) -> None:
    """After an interrupted re-save of `name`: keeps the new copy if it arrived, else puts the old one back."""
    aside = REPLACED_PREFIX + name
    if not os.path.isdir(os.path.join(root, aside)):
        return
    if _is_complete(os.path.join(root, name)):
        logger.warning("Removing the old copy of %s that an interrupted save had replaced.", name)
        _remove(root, aside)
        return
    logger.warning("Restoring %s: an interrupted save had moved it aside.", name)
    if os.path.isdir(os.path.join(root, name)):
        _remove(root, name)
    os.replace(os.path.join(root, aside), os.path.join(root, name))


def clean_stale_temporaries(output_dir: str) -> None:
    """Repairs what an interrupted save left: puts back a checkpoint moved aside whose replacement never arrived, and
    removes incomplete `.tmp-` folders. Run on the main process before any process resolves `resume`."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        if name.startswith(REPLACED_PREFIX):
            _settle_replaced(root, name[len(REPLACED_PREFIX) :])
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            logger.warning("Removing an incomplete checkpoint left by an interrupted run: %s", name)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def resolve_resume(output_dir: str, resume: str) -> str:
    """'latest' -> the newest complete checkpoint folder in `output_dir`; a path is checked and returned."""
    if resume == "latest":
        name = read_latest(output_dir)
        if name is None:
            raise FileNotFoundError(
                f"`resume`='latest', but {os.path.join(output_dir, CHECKPOINTS_DIR, LATEST_FILE)} does not exist: no "
                "checkpoint was saved yet."
            )
        folder = os.path.join(output_dir, CHECKPOINTS_DIR, name)
    else:
        folder = resume
    if not _is_complete(folder):
        root = os.path.join(output_dir, CHECKPOINTS_DIR)
        found = sorted(n for n in os.listdir(root) if _is_complete(os.path.join(root, n))) if os.path.isdir(root) else []
        raise FileNotFoundError(
            f"`resume`={resume!r}: {folder} is not a complete checkpoint (no {STATE_FILE}); complete ones in {root}: "
            f"{found or 'none'}."
        )
    return folder


def load_skips(folder: str) -> dict | None:
    """The skipped-example counts saved with a checkpoint, or None (a checkpoint written before they were saved)."""
    path = os.path.join(folder, SKIPS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(accelerator, folder, model, optimizer, scheduler) -> dict:
    """Restores weights, optimizer, scheduler and this process's RNG states; returns the trainer state."""
    tensors = load_file(os.path.join(folder, TRAINABLE_FILE))
    params = {name: p for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(
            f"Checkpoint {folder} does not match this run's trainable weights (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}). Was it written with other settings (e.g. `lora`)?"
        )
    with torch.no_grad():
        for name, p in params.items():  # a sharded (FSDP) tensor takes this process's part of the saved one
            p.copy_(local_part(tensors[name].to(dtype=p.dtype), p))
    saved = torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(shard_optimizer_state(optimizer, saved))
    scheduler.load_state_dict(torch.load(os.path.join(folder, SCHEDULER_FILE), weights_only=True))
    rng_file = os.path.join(folder, RNG_TEMPLATE.format(rank=accelerator.process_index))
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("No RNG state for process %d in %s (different process count?).", accelerator.process_index, folder)
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)
