"""Training data sources, precomputed targets and settings (training/data.py, precompute.py, params.py)."""

import copy
import io
import json
import os
import tarfile

import PIL.Image
import pytest
import torch

from conftest import REPO, TINY_CONFIG, write_image
from training import precompute, train_gill
from training.data import Collator, ExampleReader, build_dataset
from training.precompute import precompute_targets
from training.params import parse_config
from training.setup_models import build_tiny_models
from training.targets import TargetMismatchError, TargetStore, encode_captions



def make_tsv_set(folder, good=6):
    """`good` readable images (named without extension, as in CC3M), one missing and one corrupted."""
    images = folder / "images"
    images.mkdir()
    lines = ["caption\timage"]
    for i in range(good):
        write_image(images / f"{i}_img.jpg", i)
        lines.append(f"a picture number {i}\t{i}_img")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    lines += ["a missing picture\tmissing.jpg", "a broken picture\tbroken.jpg"]
    (folder / "data.tsv").write_text("\n".join(lines) + "\n")
    return folder / "data.tsv", images


def read_all(dataset):
    return [dataset[i] for i in range(len(dataset))] if hasattr(dataset, "__len__") else list(dataset)


def test_tsv_folder_and_webdataset_sources_skip_bad_images(tmp_path, tiny):
    reader = ExampleReader(tiny.pipe.feature_extractor)
    tsv, images = make_tsv_set(tmp_path)
    examples = read_all(build_dataset(str(tsv), "auto", str(images), reader, 0, 32, 0))
    assert [e["skipped"] for e in examples] == [False] * 6 + [True, True]
    assert examples[0]["pixel_values"].shape == (3, 32, 32)

    folder = tmp_path / "folder"
    folder.mkdir()
    write_image(folder / "a.png", 1)
    (folder / "a.txt").write_text("a sidecar caption")
    examples = read_all(build_dataset(str(folder), "auto", None, reader, 0, 32, 0))
    assert [(e["key"], e["caption"]) for e in examples] == [("a.png", "a sidecar caption")]
    with open(folder / "captions.jsonl", "w") as f:
        f.write(json.dumps({"image": "a.png", "caption": "from jsonl"}) + "\n")
    assert read_all(build_dataset(str(folder), "folder", None, reader, 0, 32, 0))[0]["caption"] == "from jsonl"

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, payload in (("k0", None), ("k1", b"garbage")):
            buffer = io.BytesIO()
            if payload is None:
                PIL.Image.new("RGB", (20, 20), "red").save(buffer, format="PNG")
                payload = buffer.getvalue()
            for name, data in ((f"{key}.png", payload), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    examples = read_all(build_dataset(str(shard), "auto", None, reader, 0, 32, 0))
    assert [(e["key"], e["skipped"]) for e in examples] == [("k0", False), ("k1", True)]

    collator = Collator(tiny.pipe.tokenizer, len(tiny.pipe.img_token_ids), 16)
    batch = collator(examples)
    assert int(batch["num_skipped"]) == 1 and batch["pixel_values"].shape[0] == 1


def test_training_counts_and_logs_skipped_images(tmp_path, caplog):
    tsv, images = make_tsv_set(tmp_path)
    result = train_gill.main([str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", tmp_path / "run", "--report-to", "none", "--progress-bar", "false",
        "--train-data", tsv, "--train-data-type", "auto", "--image-folder", images, "--val-data-type", "synthetic",
        "--batch-size", 4, "--max-steps", 2, "--val-every", 0, "--checkpoint-every", 0, "--export-pipeline", "false",
    ]])
    assert result["state"]["skipped"] == result["state"]["skipped_images"] == 2  # the missing and the corrupted image
    assert "Skipped 2 examples in total (2 images missing or unreadable, 0 malformed rows)" in caplog.text
    assert "missing.jpg' is missing" in caplog.text and "broken.jpg' is unreadable" in caplog.text


def test_precomputed_targets_are_used_and_checked(tmp_path, tiny):
    out = tmp_path / "targets"
    summary = precompute.main(["--tiny-random", "opt", "--data-type", "synthetic", "--synthetic-size", "8",
                               "--output", str(out), "--image-features", "--shard-size", "3", "--dtype", "float32"])
    assert summary == {"count": 8, "skipped": 0, "shards": 3, "malformed_rows": 0}
    store = TargetStore(str(out))
    store.validate(tiny.pipe.gill, tiny.text_encoder, tiny.text_tokenizer, tiny.pipe.image_encoder)
    expected = encode_captions(tiny.text_encoder, tiny.text_tokenizer, ["a green circle on a red background"], 16)
    item = store.get("synthetic-0")
    assert item["target"].shape == expected.shape[1:] and item["image_features"].shape == (32,)

    # A run reads them (no text or vision encoder work per step) ...
    result = train_gill.main([str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", tmp_path / "run", "--report-to", "none", "--progress-bar", "false",
        "--train-targets", out, "--synthetic-size", 8, "--batch-size", 4, "--max-steps", 2, "--val-every", 0,
        "--checkpoint-every", 0, "--export-pipeline", "false",
    ]])
    assert result["state"]["step"] == 2

    # ... and targets of another SD text encoder are an error, not silent garbage.
    other = build_tiny_models("opt", seed=1)
    with pytest.raises(TargetMismatchError, match="another SD text encoder"):
        store.validate(tiny.pipe.gill, other.text_encoder, tiny.text_tokenizer)
    with pytest.raises(TargetMismatchError, match="another SD text encoder"):
        store.validate(other.pipe.gill)  # even without a text encoder: the pipeline's empty-prompt embedding differs
    with pytest.raises(TargetMismatchError):
        store.validate(tiny.pipe.gill, tiny.text_encoder, tiny.text_tokenizer, other.pipe.image_encoder)


def train_args(output_dir, *extra):
    return [str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", output_dir, "--report-to", "none", "--progress-bar", "false",
        "--val-every", 0, "--checkpoint-every", 0, "--export-pipeline", "false", *extra,
    ]]


@pytest.mark.parametrize("frozen_dtype", ["bfloat16", "float16"])
def test_float32_targets_serve_a_run_with_frozen_weights_in_lower_precision(tmp_path, tiny, frozen_dtype):
    out = tmp_path / "targets"
    precompute.main(["--tiny-random", "opt", "--data-type", "synthetic", "--synthetic-size", "8", "--output", str(out),
                     "--dtype", "float32"])
    result = train_gill.main(train_args(tmp_path / "run", "--train-targets", out, "--frozen-dtype", frozen_dtype,
                                        "--synthetic-size", 8, "--batch-size", 4, "--max-steps", 1,
                                        "--val-data-type", "auto"))
    assert result["state"]["step"] == 1

    # The fingerprint rounds to bfloat16: a bfloat16 copy is the same encoder, a changed weight is another one.
    store = TargetStore(str(out))
    store.validate(tiny.pipe.gill, copy.deepcopy(tiny.text_encoder).to(torch.bfloat16), tiny.text_tokenizer)
    changed = copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        changed.get_input_embeddings().weight[5, 0] += 0.25
    for encoder in (changed, copy.deepcopy(changed).to(torch.bfloat16)):
        with pytest.raises(TargetMismatchError, match="another SD text encoder"):
            store.validate(tiny.pipe.gill, encoder, tiny.text_tokenizer)


def test_every_caption_row_of_an_image_gets_its_own_target(tmp_path, tiny):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "cat.jpg", 0)
    tsv = tmp_path / "coco.tsv"
    tsv.write_text("caption\timage\na cat on a mat\tcat.jpg\na sleeping cat\tcat.jpg\n")  # one image, two captions
    out = tmp_path / "targets"
    summary = precompute.main(["--tiny-random", "opt", "--data", str(tsv), "--image-folder", str(images),
                               "--output", str(out), "--dtype", "float32"])
    assert summary["count"] == 2
    store = TargetStore(str(out))
    examples = read_all(build_dataset(str(tsv), "auto", str(images), ExampleReader(tiny.pipe.feature_extractor, store),
                                      0, 32, 0))
    assert [e["caption"] for e in examples] == ["a cat on a mat", "a sleeping cat"]
    assert len({e["key"] for e in examples}) == 2 and len(store) == 2
    length = tiny.pipe.gill.config.cond_length
    for example in examples:
        expected = encode_captions(tiny.text_encoder, tiny.text_tokenizer, [example["caption"]], length)[0]
        torch.testing.assert_close(example["target"], expected)

    # Duplicate keys are errors: in a data set (webdataset `__key__`s), and in a store's index.
    with pytest.raises(ValueError, match="'k' occurs twice"):
        precompute_targets([("k", "a cat", None), ("k", "a dog", None)], tiny.text_encoder, tiny.text_tokenizer,
                           str(tmp_path / "dup"), length)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["keys"][1] = index["shards"][0]["keys"][0]
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds example key .* twice"):
        TargetStore(str(out))


def test_empty_micro_batches_are_skipped_counted_and_logged(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    lines = ["caption\timage"]
    for i in range(2):
        write_image(images / f"{i}.jpg", i)
        lines += [f"a picture number {i}\t{i}.jpg", f"a missing picture {i}\tmissing{i}.jpg"]
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    # One example per batch: every batch holding a missing image is empty.
    common = ("--train-data", tmp_path / "data.tsv", "--train-data-type", "auto", "--image-folder", images,
              "--val-data-type", "auto",
              "--batch-size", 1, "--max-steps", 4)
    result = train_gill.main(train_args(tmp_path / "run", *common))
    state = result["state"]
    assert state["step"] == 4 and state["samples"] == 4
    # Two epochs were read: each missing image made an empty batch twice, but is one skipped example.
    assert state["skipped_batches"] == 4 and state["skipped"] == state["skipped_images"] == 2
    assert result["history"][-1]["data/skipped_batches_total"] == state["skipped_batches"]
    assert "Skipping micro-batch" in caplog.text

    (tmp_path / "none.tsv").write_text("caption\timage\na missing picture\tmissing.jpg\nanother\tgone.jpg\n")
    with pytest.raises(RuntimeError, match="A whole epoch of micro-batches had no readable image"):
        train_gill.main(train_args(tmp_path / "none", "--train-data", tmp_path / "none.tsv", "--train-data-type",
                                   "auto", "--image-folder", images, "--val-data-type", "auto", "--batch-size", 1,
                                   "--max-steps", 1))


def test_config_file_overrides_and_errors(tmp_path):
    config = parse_config(["--config", TINY_CONFIG, "--lr", "0.01", "--lora", "true", "--lora-target-modules", "q_proj,v_proj"])
    assert config.optim.lr == 0.01 and config.optim.batch_size == 8 and config.model.tiny_random == "opt"
    assert config.lora.lora and config.lora.lora_target_modules == ["q_proj", "v_proj"]
    paper = parse_config(["--config", os.path.join(REPO, "training", "configs", "paper_opt6.7b_cc3m.yaml"),
                          "--train-data", "x.tsv"])
    assert (paper.optim.lr, paper.optim.beta2, paper.optim.warmup_steps, paper.data.max_length) == (1e-3, 0.95, 2000, 32)
    assert paper.model.language_model == "facebook/opt-6.7b" and paper.run.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="`lr` must be a positive number, got -1.0"):
        parse_config(["--config", TINY_CONFIG, "--lr", "-1"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match="Unknown setting `optim.learning_rate`"):
        parse_config(["--config", str(bad), "--tiny-random", "opt", "--train-data-type", "synthetic"])
    with pytest.raises(ValueError, match="exactly one model source"):
        parse_config(["--train-data-type", "synthetic"])


def test_image_cache_returns_the_same_pixels_and_keeps_at_most_its_size(tmp_path, tiny):
    """`cache_images`: each file is decoded once (a cached file deleted afterwards still reads), the tensors equal the
    uncached reader's, the least recently used file leaves first, and an unreadable file is never cached."""
    paths = []
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i)
        paths.append(str(tmp_path / f"{i}.png"))
    plain = ExampleReader(tiny.pipe.feature_extractor)
    cached = ExampleReader(tiny.pipe.feature_extractor, cache_images=2)
    expected = [plain(f"k{i}", "c", p)["pixel_values"] for i, p in enumerate(paths)]
    for i in (0, 1, 0):  # 1 is now the least recently used of the two kept
        assert torch.equal(cached(f"k{i}", "c", paths[i])["pixel_values"], expected[i])
    assert torch.equal(cached("k2", "c", paths[2])["pixel_values"], expected[2])  # drops 1
    for p in paths:
        os.remove(p)
    assert torch.equal(cached("k0", "c", paths[0])["pixel_values"], expected[0])
    assert torch.equal(cached("k2", "c", paths[2])["pixel_values"], expected[2])
    assert cached("k1", "c", paths[1])["skipped"]  # not kept, and gone from disk: skipped as missing
    assert plain("k0", "c", paths[0])["skipped"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert cached("bad", "c", str(tmp_path / "bad.png"))["skipped"]
    assert str(tmp_path / "bad.png") not in cached._cache


def test_image_cache_size_is_checked():
    with pytest.raises(ValueError, match=r"`cache_images` must be a non-negative number, got -1"):
        parse_config(["--config", TINY_CONFIG, "--cache-images=-1"])
