"""Resumable checkpoints, written atomically.

A checkpoint folder `checkpoints/checkpoint-<step>/` holds the trainable tensors (safetensors), the optimizer and
scheduler states, every process's RNG states, and `trainer_state.json` (step and data position). It is written to a
temporary folder first and renamed into place once complete; `checkpoints/latest` (a one-line text file, replaced
atomically) names the newest complete one. A crash mid-write leaves at most a stale temporary folder, never a broken
latest checkpoint. Everything is loaded with `weights_only=True` or from safetensors/JSON.
"""

import json
import logging
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"
RNG_TEMPLATE = "rng-rank{rank}.pt"
TMP_PREFIX = ".tmp-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


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


def save_checkpoint(accelerator, output_dir, model, optimizer, scheduler, trainer_state: dict, keep: int) -> str:
    """Writes `checkpoint-<step>` atomically (every process writes its RNG state) and prunes old ones."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    name = f"checkpoint-{trainer_state['step']}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, TMP_PREFIX + name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, RNG_TEMPLATE.format(rank=accelerator.process_index)))
    if accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(model)), os.path.join(tmp, TRAINABLE_FILE))
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:  # written last: marks completeness
            json.dump(trainer_state, f, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):  # the same step saved again (e.g. after a resume): move the old one out first
            trash = os.path.join(root, TMP_PREFIX + "old-" + name)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        _write_latest(root, name)
        _prune(root, keep)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(
        int(n.split("-")[1]) for n in os.listdir(root) if n.startswith("checkpoint-") and n.split("-")[1].isdigit()
    )
    for step in steps[:-keep]:
        shutil.rmtree(os.path.join(root, f"checkpoint-{step}"), ignore_errors=True)


def clean_stale_temporaries(output_dir: str) -> None:
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(TMP_PREFIX):
                logger.warning("Removing an incomplete checkpoint left by an interrupted run: %s", name)
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def resolve_resume(output_dir: str, resume: str) -> str:
    """'latest' -> the newest complete checkpoint folder in `output_dir`; a path is checked and returned."""
    if resume == "latest":
        pointer = os.path.join(output_dir, CHECKPOINTS_DIR, LATEST_FILE)
        if not os.path.isfile(pointer):
            raise FileNotFoundError(f"`resume`='latest', but {pointer} does not exist: no checkpoint was saved yet.")
        with open(pointer, encoding="utf-8") as f:
            folder = os.path.join(output_dir, CHECKPOINTS_DIR, f.read().strip())
    else:
        folder = resume
    if not os.path.isfile(os.path.join(folder, STATE_FILE)):
        raise FileNotFoundError(f"`resume`={resume!r}: {folder} is not a complete checkpoint (no {STATE_FILE}).")
    return folder


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
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(os.path.join(folder, SCHEDULER_FILE), weights_only=True))
    rng_file = os.path.join(folder, RNG_TEMPLATE.format(rank=accelerator.process_index))
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("No RNG state for process %d in %s (different process count?).", accelerator.process_index, folder)
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)
