"""Checkpoints survive a kill at any moment (training/checkpoint.py), and the loop shuts distributed down in order."""

import os
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint
from training.checkpoint import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    TRAINABLE_FILE,
    clean_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)



class OneProcess:
    """The part of `accelerate.Accelerator` that checkpoint.py uses, for one process."""

    is_main_process = True
    process_index = 0

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


class Crash(Exception):
    """Stands for a kill: the save stops dead at this point."""


def make_state(value: float):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    return model, optimizer, scheduler


def save(output_dir, step: int, value: float, keep: int = 2):
    model, optimizer, scheduler = make_state(value)
    return save_checkpoint(OneProcess(), str(output_dir), model, optimizer, scheduler, {"step": step}, keep, skips={})


def weight_of(folder) -> float:
    return float(load_file(os.path.join(folder, TRAINABLE_FILE))["weight"][0, 0])


def next_start(output_dir):
    """What a restarted run does before training: repair, then find `latest`."""
    clean_stale_temporaries(str(output_dir))
    return resolve_resume(str(output_dir), "latest")


class CrashAt:
    """Counts the file-system steps of a save (renames, deletions, file writes) and raises at step `at`."""

    def __init__(self, monkeypatch, at: int):
        self.at, self.count = at, 0
        for owner, name in ((os, "replace"), (shutil, "rmtree"), (checkpoint, "save_file"), (torch, "save")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, function):
        def step(*args, **kwargs):
            self.count += 1
            if self.count == self.at:
                raise Crash(f"killed at step {self.at}: {function.__name__}{args[:2]}")
            return function(*args, **kwargs)

        return step


@pytest.mark.parametrize("scenario", ["resave_latest_step", "save_after_resuming_older", "plain_next_save"])
def test_a_kill_at_any_step_of_a_save_leaves_a_resumable_run(tmp_path, monkeypatch, scenario):
    # Before: checkpoints 4 (weights 4.0) and 6 (weights 6.0), `latest` -> 6. The run resumed from checkpoint 4 and
    # now saves step 6 again (weights 60.0), or step 5 with keep=1, or an ordinary next step 8.
    step, value, keep = {"resave_latest_step": (6, 60.0, 2), "save_after_resuming_older": (5, 50.0, 1),
                         "plain_next_save": (8, 80.0, 2)}[scenario]
    pristine = tmp_path / "pristine"
    save(pristine, 4, 4.0)
    save(pristine, 6, 6.0)
    at, outcomes = 1, set()
    while True:
        run = tmp_path / f"run-{at}"
        shutil.copytree(pristine, run)
        with monkeypatch.context() as patch:
            crash = CrashAt(patch, at)
            try:
                save(run, step, value, keep)
                finished = True
            except Crash:
                finished = False
        folder = next_start(run)  # never raises: `latest` names a complete checkpoint
        outcomes.add((os.path.basename(folder), weight_of(folder)))
        assert weight_of(folder) in (6.0, value)  # the old latest, or the new one once it is complete
        root = run / CHECKPOINTS_DIR
        names = sorted(os.listdir(root))
        assert all(not n.startswith(".") for n in names), names  # repaired: nothing half-done is left
        complete = {n: weight_of(root / n) for n in names if n.startswith("checkpoint-")}
        if scenario == "resave_latest_step":
            # checkpoint 6 exists in exactly one complete copy, old or new; checkpoint 4 is never lost.
            assert complete["checkpoint-4"] == 4.0 and complete["checkpoint-6"] in (6.0, 60.0)
        elif scenario == "save_after_resuming_older":
            # keep=1 must not prune the checkpoint `latest` names, nor the later one of the run resumed from.
            assert complete["checkpoint-6"] == 6.0
        if finished:
            assert crash.count >= 4 and folder.endswith(f"checkpoint-{step}")
            break
        at += 1
    assert (f"checkpoint-{step}", value) in outcomes and len(outcomes) == 2 and at > 4
    # A save after the repair works as usual.
    save(tmp_path / "run-1", step + 10, 1.0)
    assert next_start(tmp_path / "run-1").endswith(f"checkpoint-{step + 10}")


def test_non_finite_weights_are_never_saved(tmp_path):
    save(tmp_path, 2, 2.0)
    model, optimizer, scheduler = make_state(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        save_checkpoint(OneProcess(), str(tmp_path), model, optimizer, scheduler, {"step": 3}, 2)
    assert (tmp_path / CHECKPOINTS_DIR / LATEST_FILE).read_text().strip() == "checkpoint-2"
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["checkpoint-2", LATEST_FILE]


def test_resume_names_the_complete_checkpoints_when_latest_is_gone(tmp_path):
    save(tmp_path, 2, 2.0)
    shutil.rmtree(tmp_path / CHECKPOINTS_DIR / "checkpoint-2")
    save(tmp_path / "other", 1, 1.0)
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint.*complete ones in .*: none"):
        resolve_resume(str(tmp_path), "latest")


def test_shutdown_frees_ddp_before_destroying_the_process_group(monkeypatch):
    """gloo can hang at exit when DDP's reducer destroys the process group during interpreter shutdown: the loop frees
    the DDP model first, then destroys the group explicitly."""
    import torch.distributed as dist
    from accelerate import Accelerator

    from training.train_gill import shutdown

    accelerator = Accelerator(cpu=True)
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()  # a live reducer
    accelerator._models.append(model)  # as `accelerator.prepare` keeps it
    alive = weakref.ref(model)
    del model
    seen = []
    destroy = dist.destroy_process_group

    def recording_destroy(*args, **kwargs):
        seen.append(alive() is None)
        return destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", recording_destroy)
    try:
        shutdown(accelerator, together=True)
    finally:
        if dist.is_initialized():
            destroy()
    assert seen and seen[0] is True  # the DDP model (and its reducer) was gone when the group was destroyed
    assert not dist.is_initialized()
