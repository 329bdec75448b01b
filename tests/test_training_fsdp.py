"""FSDP2 training (training/sharding.py): 2 CPU processes on gloo against DDP, the LM sharded, exact resume, and the
settings refused before any model loads."""

import json
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIG
from multiprocess_run import REPO, kill_process_tree, run_two_processes, two_process_command, two_process_env
from training import train_gill
from training.checkpoint import CHECKPOINTS_DIR, LATEST_FILE
from training.sharding import FSDP_CONFIG, launcher_engine, resolve_sharding

GILL_WEIGHTS = os.path.join("gill", "diffusion_pytorch_model.safetensors")
LORA_WEIGHTS = os.path.join("llm_lora", "adapter_model.safetensors")
LOSSES = ("caption", "img_token", "retrieval", "generation", "total")


def run_args(output_dir, steps, *extra):
    """LoRA on (a trainable tensor inside the sharded layers), 2 micro-steps per step (FSDP's no-sync path)."""
    return [
        "--config", TINY_CONFIG, "--output-dir", str(output_dir), "--report-to", "none", "--progress-bar", "false",
        "--log-every", "1", "--max-steps", steps, "--batch-size", 3, "--synthetic-size", 12, "--val-every", 0,
        "--lora", "true", "--lora-dropout", 0.1, "--grad-accum-steps", 2, "--warmup-steps", 0, *map(str, extra),
    ]


def train_records(output_dir) -> dict[int, dict]:
    """The last training record of each step (a resumed run logs again the steps after its checkpoint)."""
    with open(os.path.join(output_dir, train_gill.METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r for r in records if "train/total_loss" in r}


def shard_record(output_dir) -> dict:
    with open(os.path.join(output_dir, train_gill.METRICS_FILE)) as f:
        return next(r for r in map(json.loads, f) if "sharding/lm_values" in r)


def launch(output_dir, steps, sharding, *extra, timeout=400, config_file=None):
    completed = run_two_processes(
        run_args(output_dir, steps, "--sharding", sharding, *extra), timeout=timeout, config_file=config_file
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return output_dir


def learned(output_dir) -> dict[str, torch.Tensor]:
    """The exported learned parts and LoRA adapter: DDP exports them inside `pipeline/`, FSDP beside it."""
    tensors = {}
    for relative in (GILL_WEIGHTS, LORA_WEIGHTS):
        for folder in (output_dir, os.path.join(output_dir, train_gill.EXPORT_DIR)):
            if os.path.exists(os.path.join(folder, relative)):
                tensors.update({f"{relative}:{k}": v for k, v in load_file(os.path.join(folder, relative)).items()})
                break
        else:
            raise AssertionError(f"{relative} was not exported in {output_dir}")
    return tensors


def assert_same_training(a, b, steps, exact=False):
    records_a, records_b = train_records(a), train_records(b)
    assert sorted(records_a) == sorted(records_b) == list(range(1, steps + 1))
    for step in records_a:
        for name in LOSSES:
            x, y = records_a[step][f"train/{name}_loss"], records_b[step][f"train/{name}_loss"]
            assert x == y if exact else x == pytest.approx(y, rel=1e-4, abs=1e-5), (step, name, x, y)
    weights_a, weights_b = learned(a), learned(b)
    assert sorted(weights_a) == sorted(weights_b)
    assert any(":lora" in k or "lora_" in k for k in weights_a)
    for name in weights_a:
        if exact:
            assert torch.equal(weights_a[name], weights_b[name]), name
        else:
            x, y = without_key_bias(name, weights_a[name]), without_key_bias(name, weights_b[name])
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """An attention's key bias (the middle third of `in_proj_bias`) shifts every score of a query equally, so the
    softmax removes it and its gradient is zero up to rounding: AdamW turns that rounding noise into steps of about
    `lr`, whose signs differ between any two summation orders (DDP and FSDP reduce in different buckets). The rest is
    compared to fp32 tolerance."""
    if not name.endswith("in_proj_bias"):
        return tensor
    third = tensor.shape[0] // 3
    return torch.cat([tensor[:third], tensor[2 * third :]])


def assert_lm_halved(output_dir, sharded: bool):
    record = shard_record(output_dir)
    total = record["sharding/lm_values"]
    held = [record["sharding/lm_values_rank0"], record["sharding/lm_values_rank1"]]
    if sharded:  # each process holds about half of the LM (odd row counts put one row more on the first)
        assert sum(held) == total
        assert all(0.45 * total <= h <= 0.55 * total for h in held), held
    else:
        assert held == [total, total]


# ------------------------------------------------------------------------------------------------------------------
# Default suite: 3 steps (checkpoint at 2), FSDP against DDP (2 launches: ~2 min on 2 busy cores)
# ------------------------------------------------------------------------------------------------------------------
def test_fsdp_on_two_processes_matches_ddp_and_holds_half_the_lm(tmp_path):
    # With gradient checkpointing: each layer is recomputed in the backward from FSDP's gathered weights.
    ddp = launch(tmp_path / "ddp", 3, "ddp", "--checkpoint-every", 2, "--gradient-checkpointing", "true")
    # FSDP as docs/training.md starts it: the accelerate config file, `sharding: auto` following it.
    fsdp = launch(tmp_path / "fsdp", 3, "auto", "--checkpoint-every", 2, "--gradient-checkpointing", "true",
                  config_file=FSDP_CONFIG)
    assert_same_training(ddp, fsdp, 3)
    assert_lm_halved(fsdp, sharded=True)
    assert_lm_halved(ddp, sharded=False)
    # The checkpoint holds whole tensors in the DDP format: same names and shapes, close values.
    for name in ("trainable.safetensors",):
        a = load_file(str(ddp / CHECKPOINTS_DIR / "checkpoint-2" / name))
        b = load_file(str(fsdp / CHECKPOINTS_DIR / "checkpoint-2" / name))
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        for key in a:
            x, y = without_key_bias(key, a[key]), without_key_bias(key, b[key])
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=key)
    opt_a = torch.load(ddp / CHECKPOINTS_DIR / "checkpoint-2" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(fsdp / CHECKPOINTS_DIR / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert sorted(opt_a["state"]) == sorted(opt_b["state"])
    for index, entry in opt_a["state"].items():
        for key, value in entry.items():
            assert type(opt_b["state"][index][key]) is torch.Tensor  # a whole plain tensor, never a DTensor shard
            assert opt_b["state"][index][key].shape == value.shape
    assert opt_a["state"][0]["step"] == opt_b["state"][0]["step"] == 2


# ------------------------------------------------------------------------------------------------------------------
# Slow: 20 steps, and kill -9 + resume
# ------------------------------------------------------------------------------------------------------------------
STEPS = 20


@pytest.fixture(scope="module")
def twenty_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp20")
    return {
        "ddp": launch(root / "ddp", STEPS, "ddp", "--checkpoint-every", 5),
        "fsdp": launch(root / "fsdp", STEPS, "fsdp", "--checkpoint-every", 5),
        "root": root,
    }


@pytest.mark.slow
def test_fsdp_matches_ddp_after_twenty_steps(twenty_steps):
    assert_same_training(twenty_steps["ddp"], twenty_steps["fsdp"], STEPS)
    assert_lm_halved(twenty_steps["fsdp"], sharded=True)


@pytest.mark.slow
def test_fsdp_killed_with_sigkill_resumes_bit_identical(twenty_steps):
    out = twenty_steps["root"] / "killed"
    args = run_args(out, STEPS, "--sharding", "fsdp", "--checkpoint-every", 5)
    process = subprocess.Popen(
        two_process_command(args), cwd=REPO,
        env=two_process_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    latest = out / CHECKPOINTS_DIR / LATEST_FILE
    deadline = time.monotonic() + 400
    try:
        while not (latest.exists() and latest.read_text().strip() not in ("", f"checkpoint-{STEPS}")):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            time.sleep(0.2)
    finally:
        kill_process_tree(process.pid)  # SIGKILL to every process of the job, mid-run
        process.wait()
    killed_at = latest.read_text().strip()
    assert not (out / "gill").exists()  # it never finished
    completed = run_two_processes(args + ["--resume", "latest"], timeout=400)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"Resumed from {out / CHECKPOINTS_DIR / killed_at}" in completed.stderr
    assert_same_training(twenty_steps["fsdp"], out, STEPS, exact=True)


# ------------------------------------------------------------------------------------------------------------------
# Bad settings: refused with the setting named, before any model loads
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(train_gill, "load_models", refuse)
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION", "FSDP_IGNORED_MODULES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def tiny_args(*extra):
    return ["--config", TINY_CONFIG, "--report-to", "none", "--progress-bar", "false", *map(str, extra)]


def test_unknown_sharding_is_refused(no_model_loads, tmp_path):
    with pytest.raises(ValueError, match=r"`sharding` must be one of .*got 'zero3'"):
        train_gill.main(tiny_args("--output-dir", tmp_path, "--sharding", "zero3"))


def test_fsdp_on_one_process_is_refused_before_models_load(no_model_loads, tmp_path):
    with pytest.raises(ValueError, match=r"`sharding`='fsdp' .* 1 process.*accelerate launch --config_file"):
        train_gill.main(tiny_args("--output-dir", tmp_path, "--sharding", "fsdp"))


def test_ddp_against_a_launcher_that_asks_for_fsdp_is_refused(no_model_loads, tmp_path):
    no_model_loads.setenv("ACCELERATE_USE_FSDP", "true")
    no_model_loads.setenv("WORLD_SIZE", "2")
    assert launcher_engine() == "fsdp"
    with pytest.raises(ValueError, match=r"`sharding`='ddp', but the launcher's accelerate config asks for fsdp"):
        train_gill.main(tiny_args("--output-dir", tmp_path, "--sharding", "ddp"))
    # `auto` follows the launcher.
    assert resolve_sharding("auto") == "fsdp"


def test_fsdp_version_one_from_the_launcher_is_refused(no_model_loads, tmp_path):
    no_model_loads.setenv("ACCELERATE_USE_FSDP", "true")
    no_model_loads.setenv("WORLD_SIZE", "2")
    no_model_loads.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP version '1'.*FSDP2 only"):
        train_gill.main(tiny_args("--output-dir", tmp_path))


def test_ignored_modules_from_the_launcher_are_refused(no_model_loads, tmp_path):
    no_model_loads.setenv("ACCELERATE_USE_FSDP", "true")
    no_model_loads.setenv("WORLD_SIZE", "2")
    no_model_loads.setenv("FSDP_VERSION", "2")
    no_model_loads.setenv("FSDP_IGNORED_MODULES", "llm")
    with pytest.raises(ValueError, match=r"`fsdp_ignored_modules`='llm'"):
        train_gill.main(tiny_args("--output-dir", tmp_path, "--sharding", "fsdp"))


def test_deepspeed_config_without_deepspeed_sharding_is_refused(no_model_loads, tmp_path):
    with pytest.raises(ValueError, match=r"`deepspeed_config`='ds.json' is only read with `sharding: deepspeed`"):
        train_gill.main(tiny_args("--output-dir", tmp_path, "--deepspeed-config", "ds.json"))


def test_auto_without_a_launcher_config_is_ddp(no_model_loads):
    assert resolve_sharding("auto") == "ddp"


# ------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3: needs the package and CUDA
# ------------------------------------------------------------------------------------------------------------------
def test_deepspeed_without_the_package_or_cuda_is_refused(no_model_loads, tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None and torch.cuda.is_available():
        pytest.skip("deepspeed and CUDA are both present: nothing to refuse")
    with pytest.raises(ValueError, match=r"`sharding`='deepspeed'"):
        train_gill.main(tiny_args("--output-dir", tmp_path, "--sharding", "deepspeed",
                                  "--deepspeed-config", "training/configs/deepspeed_zero3.json"))


@pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("importlib").util.find_spec("deepspeed") is None,
    reason="DeepSpeed ZeRO-3 needs CUDA devices and the deepspeed package (neither is on the CPU test machines)",
)
def test_deepspeed_zero3_trains_two_steps(tmp_path):
    completed = run_two_processes(
        run_args(tmp_path, 2, "--sharding", "deepspeed", "--deepspeed-config",
                 "training/configs/deepspeed_zero3.json", "--checkpoint-every", 1, "--grad-accum-steps", 1),
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert sorted(train_records(tmp_path)) == [1, 2]
    assert os.path.exists(tmp_path / GILL_WEIGHTS)
