"""Training survives bad data and divergence: malformed rows of every reader are skipped, located and counted; skip
counts cover every process, once per example; non-finite steps never reach the weights or a checkpoint."""

import io
import json
import math
import os
import subprocess
import tarfile

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG, write_image
from multiprocess_run import run_two_processes

from training import precompute, train_gill
from training.checkpoint import CHECKPOINTS_DIR, LATEST_FILE, TRAINABLE_FILE
from training.data import (
    SKIP_ROW,
    Collator,
    EpochBatchSampler,
    ExampleReader,
    build_dataset,
    iterate_records,
)
from training.params import parse_config
from training.setup_models import build_tiny_models
from training.train_decision import read_decisions

BAD_UTF8 = b"caf\xe9 au lait"  # Latin-1, not UTF-8


def png_bytes(color="red"):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (20, 20), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path, samples):
    """`samples`: (key, {extension: bytes}) in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def train_args(output_dir, *extra):
    return [str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", output_dir, "--report-to", "none", "--progress-bar", "false",
        "--val-every", 0, "--checkpoint-every", 0, "--export-pipeline", "false", "--log-every", 1, *extra,
    ]]


def test_every_reader_skips_malformed_rows_naming_file_and_line(tmp_path, tiny, caplog):
    reader = ExampleReader(tiny.pipe.feature_extractor)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        write_image(images / f"{i}.jpg", i)

    # TSV: a UTF-8 BOM before the header (spreadsheet export) and CRLF line ends are fine; a Latin-1 row and a row
    # without an image column are skipped.
    tsv = tmp_path / "data.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfcaption\timage\r\n" + b"a picture\t0.jpg\r\n" + BAD_UTF8 + b"\t1.jpg\r\n"
                    + b"no image column\r\n" + b"another picture\t1.jpg\r\n")
    dataset = build_dataset(str(tsv), "auto", str(images), reader, 0, 32, 0)
    assert [r[:2] for r in dataset.records] == [("0.jpg#2", "a picture"), ("1.jpg#5", "another picture")]
    assert dataset.malformed_rows == 2
    assert f"{tsv}, line 3): not valid UTF-8 (byte 0xe9 at column 4)" in caplog.text
    assert f"{tsv}, line 4): expected a caption and an image" in caplog.text
    # precompute.py reads the same rows: targets for the good ones, the malformed ones counted.
    summary = precompute.main(["--tiny-random", "opt", "--data", str(tsv), "--image-folder", str(images),
                               "--output", str(tmp_path / "targets"), "--dtype", "float32"])
    assert (summary["count"], summary["malformed_rows"]) == (2, 2)

    # captions.jsonl: a broken JSON line is reported at ITS line (not "line 1" of the JSON text), and skipped with
    # the non-UTF-8 line, the non-object and the one without a caption.
    folder = tmp_path / "folder"
    folder.mkdir()
    write_image(folder / "a.png", 0)
    lines = [json.dumps({"image": "a.png", "caption": "good"}).encode(), b'{"image": "a.png", "caption": "cut',
             b'{"image": "a.png", "caption": "' + BAD_UTF8 + b'"}', b"[1, 2]", b'{"image": "a.png"}',
             json.dumps({"image": "a.png", "caption": "good again"}).encode()]
    (folder / "captions.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    caplog.clear()
    dataset = build_dataset(str(folder), "folder", None, reader, 0, 32, 0)
    assert [r[1] for r in dataset.records] == ["good", "good again"] and dataset.malformed_rows == 4
    index = folder / "captions.jsonl"
    for line, problem in ((2, "not valid JSON"), (3, "not valid UTF-8"), (4, "expected a JSON object, got list"),
                          (5, "needs `image` (a path) and `caption`")):
        assert f"{index}, line {line}): {problem}" in caplog.text

    # Sidecar captions: a Latin-1 .txt is skipped, naming the file and the line of the bad byte.
    sidecars = tmp_path / "sidecars"
    sidecars.mkdir()
    for name, caption in (("a", b"fine"), ("b", b"line one\n" + BAD_UTF8)):
        write_image(sidecars / f"{name}.png", 0)
        (sidecars / f"{name}.txt").write_bytes(caption)
    caplog.clear()
    dataset = build_dataset(str(sidecars), "auto", None, reader, 0, 32, 0)
    assert [r[:2] for r in dataset.records] == [("a.png", "fine")] and dataset.malformed_rows == 1
    assert f"{sidecars / 'b.txt'}): line 2: not valid UTF-8" in caplog.text

    # webdataset: a sample whose caption is not UTF-8, or that has none, is a skipped example naming shard and key.
    shard = tmp_path / "shard-000.tar"
    write_shard(shard, [("k0", {"png": png_bytes(), "txt": b"red"}), ("k1", {"png": png_bytes(), "txt": BAD_UTF8}),
                        ("k2", {"png": png_bytes()}), ("k3", {"png": png_bytes(), "txt": b"also red"})])
    examples = list(build_dataset(str(shard), "auto", None, reader, 0, 32, 0))
    assert [(e["key"], e["skipped"]) for e in examples] == [("k0", False), ("k1", True), ("k2", True), ("k3", False)]
    assert examples[1]["skip_kind"] == SKIP_ROW and str(shard) in examples[1]["skip_reason"]
    assert "sample 'k1': line 1: not valid UTF-8" in examples[1]["skip_reason"]
    assert "sample 'k2': no caption" in examples[2]["skip_reason"]
    batch = Collator(tiny.pipe.tokenizer, len(tiny.pipe.img_token_ids), 16)(examples)
    assert batch["keys"] == ["k0", "k3"] and [s[0] for s in batch["skipped_examples"]] == ["k1", "k2"]
    # precompute.py reads the same samples and leaves the malformed ones out.
    assert [r[0] for r in iterate_records(str(shard), "auto", None, 0, 32, 0)] == ["k0", "k3"]

    # The decisions TSV of train_decision.py: BOM header, one Latin-1 row skipped with its line.
    decisions = tmp_path / "decisions.tsv"
    decisions.write_bytes(b"\xef\xbb\xbfPrompt\tCategory\tChallenge\tNote\tDecision\n" + b"a photo\tX\tB\t-\tret\n"
                          + BAD_UTF8 + b"\tX\tB\t-\tgen\n" + b"a dream\tX\tB\t-\tgen\n")
    caplog.clear()
    assert read_decisions(str(decisions)) == (["a photo", "a dream"], [1, 0])
    assert f"{decisions}, line 3): not valid UTF-8" in caplog.text


def test_webdataset_with_a_bad_caption_trains_resumes_and_counts_it_once(tmp_path):
    shard = tmp_path / "shard-000.tar"
    colours = ["red", "green", "blue", "yellow", "white"]
    samples = [(f"k{i}", {"png": png_bytes(c), "txt": f"a {c} picture".encode()}) for i, c in enumerate(colours)]
    samples.insert(2, ("bad", {"png": png_bytes(), "txt": BAD_UTF8}))
    write_shard(shard, samples)
    # 6 samples, batches of 2: 3 batches an epoch; 6 steps read the bad sample twice, once after the resume.
    common = ("--train-data", shard, "--train-data-type", "webdataset", "--val-data-type", "auto", "--batch-size", 2,
              "--max-steps", 6, "--checkpoint-every", 3)
    first = train_gill.main(train_args(tmp_path / "run", *common, "--exit-after-steps", 3))
    assert first["state"]["step"] == 3 and first["state"]["malformed_rows"] == 1
    second = train_gill.main(train_args(tmp_path / "run", *common, "--resume", "latest"))
    state = second["state"]
    assert state["step"] == 6 and state["epoch"] == 1
    assert (state["malformed_rows"], state["skipped_images"], state["skipped"]) == (1, 0, 1)
    assert second["history"][-1]["data/malformed_rows_total"] == 1


def nan_targets(tmp_path, bad_keys):
    """Precomputed targets for the 8 synthetic examples, NaN for `bad_keys`: data that makes the loss NaN."""
    out = tmp_path / "targets"
    precompute.main(["--tiny-random", "opt", "--data-type", "synthetic", "--synthetic-size", "8", "--output", str(out),
                     "--dtype", "float32"])
    index = json.loads((out / "index.json").read_text())
    for shard in index["shards"]:
        path = str(out / shard["file"])
        tensors = load_file(path)
        for row, key in enumerate(shard["keys"]):
            if key in bad_keys:
                tensors["target"][row] = float("nan")
        save_file(tensors, path)
    return out


def assert_finite_checkpoints(run_dir):
    root = run_dir / CHECKPOINTS_DIR
    folders = [n for n in os.listdir(root) if n.startswith("checkpoint-")]
    assert folders
    for name in folders:
        for key, tensor in load_file(str(root / name / TRAINABLE_FILE)).items():
            assert torch.isfinite(tensor).all(), f"{name}/{key}"
    return sorted(folders)


def test_non_finite_steps_are_skipped_or_stop_the_run_and_never_reach_the_weights(tmp_path):
    second_batch = list(EpochBatchSampler(8, 4, seed=0, epoch=0))[1]
    targets = nan_targets(tmp_path, {f"synthetic-{second_batch[0]}"})  # step 2 is the first with a NaN target
    # Half of the batches hold the NaN target: those steps are skipped and counted, the others train.
    common = ("--train-targets", targets, "--synthetic-size", 8, "--batch-size", 4, "--warmup-steps", 0,
              "--val-data-type", "auto")
    result = train_gill.main(train_args(tmp_path / "run", *common, "--max-steps", 6, "--checkpoint-every", 2,
                                        "--export-pipeline", "true"))
    history, state = result["history"], result["state"]
    skipped = [i for i, h in enumerate(history) if math.isnan(h["train/generation_loss"])]
    assert len(skipped) == state["nonfinite_steps"] == 3 and state["step"] == 6  # one of the 2 batches per epoch
    assert history[-1]["train/nonfinite_steps_total"] == 3
    assert_finite_checkpoints(tmp_path / "run")
    gill = load_file(os.path.join(result["export_dir"], "gill", "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in gill.values())
    initial = build_tiny_models("opt", seed=0).pipe.gill.state_dict()
    assert not torch.equal(gill["mapper.fc.weight"], initial["mapper.fc.weight"])  # the finite steps did train

    # With `max_nonfinite_steps` 1 the first NaN step stops the run with a clear error; the checkpoints written
    # before it are finite, and the run resumes from the last of them.
    first_bad = skipped[0] + 1
    assert first_bad == 2
    with pytest.raises(train_gill.NonFiniteTrainingError, match=f"up to step {first_bad}.*Last checkpoint: "):
        train_gill.main(train_args(tmp_path / "stop", *common, "--max-steps", 6, "--checkpoint-every", 1,
                                   "--max-nonfinite-steps", 1))
    assert assert_finite_checkpoints(tmp_path / "stop")[-1] == f"checkpoint-{first_bad - 1}"
    assert (tmp_path / "stop" / CHECKPOINTS_DIR / LATEST_FILE).read_text().strip() == f"checkpoint-{first_bad - 1}"


@pytest.mark.parametrize("setting", ["lr", "eps", "beta2", "weight_decay", "grad_clip", "caption_weight",
                                     "concat_prob", "lora_alpha", "lora_dropout", "decay_gamma"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_settings_are_refused(setting, value):
    with pytest.raises(ValueError, match=f"`{setting}` must be a"):
        parse_config(["--config", TINY_CONFIG, f"--{setting.replace('_', '-')}={value}"])


def test_non_finite_settings_in_a_config_file_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {tiny_random: opt}\ndata: {train_data_type: synthetic}\noptim: {lr: .inf}\n")
    with pytest.raises(ValueError, match="`lr` must be a finite number, got inf"):
        parse_config(["--config", str(config)])
    config.write_text("model: {tiny_random: opt}\ndata: {train_data_type: synthetic}\noptim: {beta1: '0.9'}\n")
    with pytest.raises(ValueError, match="`beta1` must be a number, got '0.9'"):
        parse_config(["--config", str(config)])


def test_two_processes_count_every_process_skips_once_and_exit_after_a_resume(tmp_path):
    """Two gloo processes: skipped images are counted over both (rank 1 holds them here), once each although every
    epoch reads them, a malformed row once, and both processes exit after a resumed run (rank 1 used to hang)."""
    images = tmp_path / "images"
    images.mkdir()
    rank1 = list(EpochBatchSampler(8, 2, seed=0, epoch=0, rank=1, world_size=2))
    missing = {rank1[0][0], rank1[1][0]}  # one in each of rank 1's batches of epoch 0: no batch is empty
    lines = [b"caption\timage"]
    for i in range(8):
        if i in missing:
            lines.append(f"a lost picture {i}\tmissing{i}.jpg".encode())
        else:
            write_image(images / f"{i}.jpg", i)
            lines.append(f"a picture number {i}\t{i}.jpg".encode())
    lines.append(BAD_UTF8 + b"\t0.jpg")  # last, so the rows' indices are as above
    (tmp_path / "data.tsv").write_bytes(b"\n".join(lines) + b"\n")
    common = train_args(tmp_path / "run", "--train-data", tmp_path / "data.tsv", "--train-data-type", "tsv",
                        "--image-folder", images,
                        "--val-data-type", "auto", "--batch-size", 2, "--max-steps", 4, "--checkpoint-every", 2)
    for extra in (["--exit-after-steps", "2"], ["--resume", "latest"]):
        try:
            completed = run_two_processes(common + extra, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the 2-process run {extra} did not exit within 240 s (its processes were killed)")
        assert completed.returncode == 0, completed.stderr[-4000:]
    with open(tmp_path / "run" / train_gill.METRICS_FILE) as f:
        records = [json.loads(line) for line in f]
    by_step = {r["step"]: r for r in records if "data/skipped_total" in r}
    assert sorted(by_step) == [1, 2, 3, 4]
    # After epoch 0 (step 2) both missing images were seen, on rank 1; epoch 1 reads them again: still 2.
    for step in (2, 4):
        assert by_step[step]["data/skipped_images_total"] == 2, by_step[step]
        assert by_step[step]["data/malformed_rows_total"] == 1
        assert by_step[step]["data/skipped_total"] == 3
