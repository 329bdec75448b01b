"""Why `training/checkpoint.py` keeps its own save instead of `Accelerator.save_state`, measured side by side.

The model is bench_training.py's small OPT-shaped setting (a frozen LM and GILL's learned parts, as in a real run),
after one optimizer step, prepared by an `Accelerator` as `train_gill.py` prepares it, the scheduler registered.
1. What is written: `Accelerator.save_state` vs `training.checkpoint.save_checkpoint` (files and bytes).
2. A kill -9 in the middle of a save: a child process saves and is SIGKILLed just before the save's k-th file-system
   step (a file written, a folder made, renamed or removed; seen by audit and profile hooks, no library code is
   patched), for every k. Then: does the newest
   checkpoint folder load, and does any complete checkpoint remain? For accelerate, with
   `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=1)` after one complete save, as a run keeping
   one checkpoint would use it; for ours, `keep_checkpoints` 1 likewise.

    python -m benchmarks.bench_checkpoint_state      # writes benchmarks/results/checkpoint_state.md
"""

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from benchmarks.bench_training import SMALL, build
from training.checkpoint import clean_stale_temporaries, load_checkpoint, resolve_resume, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("accelerate", "ours")


def prepared(kind: str, folder: str):
    """(accelerator, model, optimizer, scheduler) after one training step, prepared as train_gill.py prepares them."""
    from training.model_forward import total_loss
    from training.params import LossArgs

    model, batch, optimizer = build(dict(SMALL, batch=4), torch.device("cpu"), torch.float32)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    total_loss(model(batch, concat_caption=False, concat_img=False), LossArgs()).backward()
    optimizer.step()
    scheduler.step()
    config = ProjectConfiguration(project_dir=folder, automatic_checkpoint_naming=True, total_limit=1)
    accelerator = Accelerator(cpu=True, project_config=config if kind == "accelerate" else None)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # accelerate saves a scheduler only once registered
    return accelerator, model, optimizer, scheduler


def save(kind: str, folder: str, parts, step: int) -> None:
    accelerator, model, optimizer, scheduler = parts
    if kind == "accelerate":
        accelerator.save_state()
    else:
        save_checkpoint(accelerator, folder, model, optimizer, scheduler, {"step": step}, keep=1)


# Python functions that write a file (torch and safetensors write from C++/Rust, which no audit event reports).
WRITERS = {("torch.serialization", "save"), ("safetensors.torch", "save_file"), ("shutil", "rmtree")}
FS_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir")


def kill_at_step(folder: str, k: int) -> None:
    """SIGKILLs this process just before the k-th file-system step of a save under `folder`: a file opened for
    writing, a folder made, renamed or removed (audit events), or a call of torch.save / safetensors' save_file /
    shutil.rmtree (seen by a profile hook). No library code is patched."""
    steps = [0]

    def step():
        steps[0] += 1
        if steps[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    def audit(event, args):
        if event == "open" and str(args[0]).startswith(folder):
            mode, flags = args[1], args[2]
            if (mode is not None and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR)):
                step()
        elif event in FS_EVENTS and str(args[0]).startswith(folder):
            step()

    def profile(frame, event, arg):
        if event == "call" and (frame.f_globals.get("__name__"), frame.f_code.co_name) in WRITERS:
            step()

    sys.addaudithook(audit)
    sys.setprofile(profile)


def child(kind: str, folder: str, kill_at: int) -> None:
    parts = prepared(kind, folder)
    save(kind, folder, parts, step=1)  # one complete checkpoint first
    if kill_at:
        kill_at_step(folder, kill_at)
    save(kind, folder, parts, step=2)
    print("completed")


def run_child(kind: str, folder: str, kill_at: int) -> bool:
    """True when the child finished its second save, False when it was killed in it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_checkpoint_state", "--child", kind, "--dir", folder,
                          "--kill-at", str(kill_at)], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"child {kind} failed:\n{out.stderr[-3000:]}")
    return out.returncode == 0


def folder_bytes(folder: str) -> tuple[int, int]:
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return len(files), sum(os.path.getsize(f) for f in files)


def loads(kind: str, folder: str) -> tuple[list[str], str]:
    """(checkpoint folders left, what loading the newest gives: 'step N' or the error)."""
    if kind == "accelerate":
        root = os.path.join(folder, "checkpoints")
        left = sorted(os.listdir(root)) if os.path.isdir(root) else []
        if not left:
            return left, "nothing to load"
        newest = max(left, key=lambda name: int(name.rsplit("_", 1)[-1]))
        accelerator, model, optimizer, _ = prepared(kind, tempfile.mkdtemp())
        try:
            accelerator.load_state(os.path.join(root, newest))
        except Exception as error:  # noqa: BLE001 - the measurement is which error a half-written folder gives
            return left, f"{newest}: {type(error).__name__}"
        return left, f"{newest}: loads"
    root = os.path.join(folder, "checkpoints")
    clean_stale_temporaries(folder)
    left = sorted(n for n in os.listdir(root) if n != "latest") if os.path.isdir(root) else []
    accelerator, model, optimizer, scheduler = prepared(kind, tempfile.mkdtemp())
    try:
        state = load_checkpoint(accelerator, resolve_resume(folder, "latest"), model, optimizer, scheduler)
    except Exception as error:  # noqa: BLE001
        return left, f"latest: {type(error).__name__}"
    return left, f"latest (step {state['step']}): loads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "checkpoint_state.md"))
    parser.add_argument("--child", choices=KINDS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.dir, args.kill_at)
        return None
    torch.manual_seed(0)

    sizes = {}
    for kind in KINDS:
        with tempfile.TemporaryDirectory() as folder:
            parts = prepared(kind, folder)
            save(kind, folder, parts, step=1)
            checkpoint = os.path.join(folder, "checkpoints", "checkpoint_0" if kind == "accelerate" else "checkpoint-1")
            sizes[kind] = (*folder_bytes(checkpoint), sorted(os.listdir(checkpoint)))
    model = prepared("ours", tempfile.mkdtemp())[1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)

    rows = {}
    for kind in KINDS:
        rows[kind] = []
        for k in range(1, 30):
            with tempfile.TemporaryDirectory() as folder:
                completed = run_child(kind, folder, k)
                left, loaded = loads(kind, folder)
            rows[kind].append((k, completed, left, loaded))
            if completed:  # the save opened fewer than k files: every moment has been tried
                break

    lines = [
        "# Checkpoint state: `Accelerator.save_state` vs `training/checkpoint.py`",
        "",
        f"Written by `python -m benchmarks.bench_checkpoint_state`; accelerate {accelerate.__version__}, torch "
        f"{torch.__version__}, {platform.machine()}. Model: bench_training.py's small setting, {frozen:,} frozen and "
        f"{trainable:,} trainable parameters, AdamW after one step.",
        "",
        "## What one checkpoint holds",
        "",
        "| save | files | bytes | contents |",
        "| --- | --- | --- | --- |",
    ]
    for kind, (count, size, names) in sizes.items():
        lines.append(f"| {kind} | {count} | {size:,} | {', '.join(names)} |")
    lines += [
        "",
        "## A kill -9 during the second save (one complete checkpoint before it, one kept)",
        "",
        "The process is killed just before the save's k-th file-system step (a file written, a folder made, renamed or "
        "removed). `left`: the checkpoint folders on disk "
        "afterwards (for ours, after the next start's repair); `newest`: what loading the newest one gives.",
        "",
        "| save | k | finished | left | newest |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, results in rows.items():
        for k, completed, left, loaded in results:
            lines.append(f"| {kind} | {k} | {'yes' if completed else 'killed'} | {', '.join(left) or '-'} | {loaded} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return {"sizes": sizes, "kills": rows}


if __name__ == "__main__":
    main()
