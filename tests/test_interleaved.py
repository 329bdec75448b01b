"""Interleaved training documents (training/interleaved.py, convert_data.py) and GILL's losses at every image."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, write_image
from training import convert_data, precompute, train_gill
from training.data import ExampleReader, iterate_records
from training.records import RowProblems
from training.interleaved import InterleavedCollator, InterleavedDataset, read_documents, write_documents
from training.losses import IGNORE_INDEX, generation_l2_loss
from training.model_forward import GILLTrainingModel
from training.params import DataArgs
from training.targets import encode_captions

COLOURS = ("red", "green", "blue", "yellow")


def story(index: int) -> dict:
    """A three-image document: text, image, text, image, context-only image, text, image."""
    a, b = COLOURS[index % 4], COLOURS[(index + 1) % 4]
    return {"id": f"doc-{index}", "segments": [
        {"text": f"first a {a} square"},
        {"image": f"img/{index}-0.png", "caption": f"a {a} square"},
        {"text": "then the same in"},
        {"text": f" {b}"},
        {"image": f"img/{index}-1.png", "caption": f"a {b} square"},
        {"image": f"img/{index}-2.png", "caption": "an input picture", "target": False},
        {"text": "and a circle"},
        {"image": f"img/{index}-3.png", "caption": f"a {b} circle"},
    ]}


def make_documents(folder, count=4) -> str:
    (folder / "img").mkdir()
    documents = [story(i) for i in range(count)]
    for d, document in enumerate(documents):
        for s, segment in enumerate(document["segments"]):
            if "image" in segment:
                write_image(folder / segment["image"], d * 10 + s)
    path = folder / "docs.jsonl"
    write_documents(str(path), documents)
    return str(path)


def training_model(pipe):
    pad = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else 0
    return GILLTrainingModel(
        pipe.llm, pipe.gill, pipe.image_encoder, pipe.img_token_ids, pad_token_id=pad,
        bos_token_id=pipe.tokenizer.bos_token_id,
    )


def collated(tiny, path, max_length=256, count=None):
    pipe = tiny.pipe
    dataset = InterleavedDataset(path, ExampleReader(pipe.feature_extractor))
    collator = InterleavedCollator(pipe.tokenizer, len(pipe.img_token_ids), pipe.gill.config.num_visual_tokens,
                                   max_length, 32)
    batch = collator([dataset[i] for i in range(count or len(dataset))])
    batch["targets"] = encode_captions(tiny.text_encoder, tiny.text_tokenizer, batch["captions"],
                                       pipe.gill.config.cond_length).float()
    return batch


# ------------------------------------------------------------------------------------------------------------------
# The format and the converters
# ------------------------------------------------------------------------------------------------------------------
def test_documents_round_trip_and_malformed_lines_are_skipped(tmp_path):
    documents = [story(0), story(1)]
    path = tmp_path / "docs.jsonl"
    assert write_documents(str(path), documents) == 2
    assert read_documents(str(path)) == [(d["id"], d["segments"]) for d in documents]

    bad = [
        "not json",
        json.dumps({"segments": []}),
        json.dumps({"segments": [{"text": "only words"}]}),
        json.dumps({"segments": [{"image": "a.png"}]}),  # a target image needs a caption
        json.dumps({"segments": [{"image": "a.png", "caption": "x", "target": False}]}),  # nothing to learn
        json.dumps({"segments": [{"text": "x", "image": "a.png"}]}),
    ]
    good = json.dumps({"segments": [{"text": "a"}, {"image": "a.png", "caption": "a red square"}]})
    path.write_text("\n".join(bad + [good]) + "\n", encoding="utf-8")
    problems = RowProblems()
    assert read_documents(str(path), problems) == [("line7", json.loads(good)["segments"])]
    assert [line for _, line, _ in problems] == [1, 2, 3, 4, 5, 6]
    assert "needs a non-empty `caption`" in problems[3][2]

    with pytest.raises(ValueError, match="no target image"):
        write_documents(str(path), [{"segments": [{"image": "a.png", "caption": "x", "target": False}]}])
    path.write_text(json.dumps(story(0)) + "\n" + json.dumps(story(0)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="occurs twice"):
        read_documents(str(path))


def test_vist_stories_convert_in_the_workers_order(tmp_path):
    def storylet(story_id, order, photo, text):
        return [{"story_id": story_id, "worker_arranged_photo_order": order, "photo_flickr_id": photo,
                 "original_text": text, "text": text.lower(), "album_id": "1", "storylet_id": "x"}]

    sis = {"images": [], "annotations": [
        storylet("45", 1, "p2", "Then we ate."), storylet("45", 0, "p1", "We arrived."),
        storylet("46", 0, "p9", "A new day."), storylet("45", 2, "p3", "We left."),
    ]}
    (tmp_path / "sis.json").write_text(json.dumps(sis), encoding="utf-8")
    out = tmp_path / "vist.jsonl"
    count = convert_data.main(["vist", "--input", str(tmp_path / "sis.json"), "--output", str(out),
                               "--image-template", "images/{id}.jpg"])
    assert count == 2
    documents = read_documents(str(out))
    assert [key for key, _ in documents] == ["vist-45", "vist-46"]
    assert documents[0][1] == [
        {"text": "We arrived."}, {"image": "images/p1.jpg", "caption": "We arrived."},
        {"text": "Then we ate."}, {"image": "images/p2.jpg", "caption": "Then we ate."},
        {"text": "We left."}, {"image": "images/p3.jpg", "caption": "We left."},
    ]
    # VIST's normalised text on request
    convert_data.main(["vist", "--input", str(tmp_path / "sis.json"), "--output", str(out), "--text-field", "text"])
    assert read_documents(str(out))[1][1][0] == {"text": "a new day."}


def test_mmc4_images_follow_their_matched_sentence(tmp_path):
    documents = [
        {"url": "u1", "text_list": ["Intro.", "A dog runs.", "The end."], "image_info": [
            {"image_name": "b.jpg", "matched_text_index": 2, "matched_sim": 0.3},
            {"image_name": "a.jpg", "matched_text_index": 1, "matched_sim": 0.31},
            {"image_name": "weak.jpg", "matched_text_index": 0, "matched_sim": 0.1},
        ]},
        {"url": "u2", "text_list": ["No pictures here."], "image_info": []},
    ]
    shard = tmp_path / "docs_shard_0.jsonl"
    shard.write_text("\n".join(json.dumps(d) for d in documents) + "\n{broken\n", encoding="utf-8")
    out = tmp_path / "mmc4.jsonl"
    count = convert_data.main(["mmc4", "--input", str(shard), "--output", str(out), "--image-dir", str(tmp_path / "im"),
                               "--min-similarity", "0.2"])
    assert count == 1  # the document without images is left out, the broken line skipped
    (key, segments), = read_documents(str(out))
    assert key == "docs_shard_0-1"
    assert segments == [
        {"text": "Intro."},
        {"text": "A dog runs."}, {"image": os.path.join("im", "a.jpg"), "caption": "A dog runs."},
        {"text": "The end."}, {"image": os.path.join("im", "b.jpg"), "caption": "The end."},
    ]


def test_precompute_stores_one_target_per_image(tmp_path):
    path = make_documents(tmp_path, count=2)
    records = list(iterate_records(path, "auto", None, 0, 20, 0))
    assert [r[:2] for r in records[:4]] == [
        ("doc-0/1", "a red square"), ("doc-0/4", "a green square"), ("doc-0/5", "an input picture"),
        ("doc-0/7", "a green circle")]
    summary = precompute.main(["--tiny-random", "opt", "--data", path, "--data-type", "interleaved",
                               "--output", str(tmp_path / "targets"), "--dtype", "float32"])
    assert summary["count"] == 8 and summary["malformed_rows"] == 0
    with pytest.raises(ValueError, match="interleaved_data"):
        DataArgs(train_data=path, train_data_type="interleaved")


# ------------------------------------------------------------------------------------------------------------------
# Losses at every image position
# ------------------------------------------------------------------------------------------------------------------
def test_rows_put_img_tokens_after_the_text_before_each_target_image(tiny):
    pipe = tiny.pipe
    model = training_model(pipe)
    words = lambda text: pipe.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    bos, img = pipe.tokenizer.bos_token_id, pipe.img_token_ids
    k = pipe.gill.config.num_visual_tokens
    document = [("text", words("first a red square")), ("image", 0, True, words("a red square")),
                ("text", words("then")), ("image", 1, False, words("an input")), ("image", 2, True, words("a circle"))]
    rows, labels, slots, where = model.interleaved_img_rows([document])
    P = -1
    expected = [bos] + words("first a red square") + img + [P] * k + words("then") + [P] * k + img + [P] * k
    assert rows[0] == expected
    first = 1 + len(words("first a red square"))
    second = first + len(img) + k + len(words("then")) + k
    assert where == [(0, first), (0, second)]
    assert labels[0][first : first + len(img)] == img[:1] + [IGNORE_INDEX] * (len(img) - 1)
    assert [s for s in slots[0] if s] == [(i, j) for i in (0, 1, 2) for j in range(k)]
    # Captioning: [prefix_0][BOS caption_0][prefix_1][caption_1]..., captions the only targets.
    rows, labels, slots = model.interleaved_caption_rows([document])
    captions = [bos] + words("a red square"), words("an input"), words("a circle")
    assert rows[0] == [P] * k + captions[0] + [P] * k + captions[1] + [P] * k + captions[2]
    assert [t for t in labels[0] if t != IGNORE_INDEX] == captions[0] + captions[1] + captions[2]


def test_each_image_is_generated_from_its_context_and_its_own_caption(tiny, tmp_path):
    pipe = tiny.pipe
    model = training_model(pipe).eval()
    path = make_documents(tmp_path, count=2)
    batch = collated(tiny, path)
    assert batch["captions"] == ["a red square", "a green square", "a green circle",
                                 "a green square", "a blue square", "a blue circle"]
    assert batch["pixel_values"].shape[0] == 8  # every image, the context-only ones too
    with torch.no_grad():
        out = model(batch)
        # The [IMG] hidden states of image i are those of the LM run on everything before it: the same values when the
        # row is cut right after image i's [IMG] group (nothing later leaks in) ...
        rows, labels, slots, where = model.interleaved_img_rows(batch["documents"])
        prefix = pipe.gill.encode_visual_prefix(model.image_features(batch))
        r = len(pipe.img_token_ids)
        for i, (b, start) in enumerate(where):
            cut = [rows[b][: start + r]], [labels[b][: start + r]], [slots[b][: start + r]]
            embeds, _, mask = model._embed_rows(*cut, prefix)
            _, hidden = model.run_lm(embeds, mask)
            torch.testing.assert_close(out["img_hidden"][i], hidden[0, start:], atol=1e-5, rtol=1e-5)
        # ... and another text before it changes them.
        changed = [list(d) for d in batch["documents"]]
        changed[0][0] = ("text", pipe.tokenizer("first a blue square", add_special_tokens=False).input_ids)
        other = model({**batch, "documents": changed})
    assert not torch.allclose(other["img_hidden"][2], out["img_hidden"][2])
    torch.testing.assert_close(other["img_hidden"][3:], out["img_hidden"][3:])  # the other document is untouched
    # The generation loss compares image i's mapper output with the SD encoding of image i's own caption.
    prediction = pipe.gill.map_to_prompt_embeds(out["img_hidden"])
    torch.testing.assert_close(out["generation"], generation_l2_loss(prediction, batch["targets"]))
    swapped = batch["targets"][[1, 0, 2, 3, 4, 5]]
    assert not torch.isclose(generation_l2_loss(prediction, swapped), out["generation"])
    # Retrieval: one text and one image embedding per target image, the context-only one left out.
    assert out["text_embeds"].shape[0] == out["image_embeds"].shape[0] == 6
    for name in ("caption", "img_token", "retrieval", "generation"):
        assert torch.isfinite(out[name])


def test_long_documents_are_cut_at_a_segment_and_kept_only_with_a_target(tiny, tmp_path):
    pipe = tiny.pipe
    path = make_documents(tmp_path, count=1)
    dataset = InterleavedDataset(path, ExampleReader(pipe.feature_extractor))
    k, r = pipe.gill.config.num_visual_tokens, len(pipe.img_token_ids)
    words = len(pipe.tokenizer("first a red square", add_special_tokens=False).input_ids)
    room = 1 + words + r + k  # the first text and the first image, nothing more
    cut = InterleavedCollator(pipe.tokenizer, r, k, room, 32)([dataset[0]])
    assert [p[0] for p in cut["documents"][0]] == ["text", "image"] and cut["captions"] == ["a red square"]
    none = InterleavedCollator(pipe.tokenizer, r, k, room - 1, 32)([dataset[0]])
    assert none["documents"] == [] and none["skipped_examples"][0][1] == "row"
    os.remove(tmp_path / "img" / "0-2.png")  # a missing image skips its whole document
    assert dataset[0]["skipped"] and "0-2.png" in dataset[0]["skip_reason"]


# ------------------------------------------------------------------------------------------------------------------
# Training: mixed with caption pairs at a ratio
# ------------------------------------------------------------------------------------------------------------------
def test_mixing_ratio_is_respected():
    for ratio in (0.0, 0.25, 0.5, 1.0):
        draws = [train_gill.interleaved_draw(0, step, 0, ratio) for step in range(4000)]
        assert abs(sum(draws) / len(draws) - ratio) < 0.025, ratio
    assert [train_gill.interleaved_draw(3, s, 1, 0.5) for s in range(20)] == [
        train_gill.interleaved_draw(3, s, 1, 0.5) for s in range(20)]


def test_training_steps_on_interleaved_documents_mixed_with_pairs(tmp_path):
    path = make_documents(tmp_path, count=4)
    targets = tmp_path / "targets"
    precompute.main(["--tiny-random", "opt", "--data", path, "--data-type", "interleaved", "--output", str(targets),
                     "--dtype", "float32"])
    args = [str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", tmp_path / "run", "--report-to", "none", "--progress-bar", "false",
        "--synthetic-size", 8, "--batch-size", 2, "--max-steps", 8, "--val-every", 0, "--checkpoint-every", 0,
        "--export-pipeline", "false", "--warmup-steps", 0, "--interleaved-data", path, "--interleaved-ratio", 0.5,
        "--interleaved-targets", targets,
    ]]
    result = train_gill.main(args)
    history, state = result["history"], result["state"]
    drawn = [train_gill.interleaved_draw(0, step, 0, 0.5) for step in range(8)]
    assert [h["train/interleaved"] for h in history] == [float(d) for d in drawn]
    assert 0 < sum(drawn) < 8
    # every interleaved step read the next batch of documents (2 batches of 2 per epoch), every other step a pair batch
    assert state["interleaved_epoch"] * 2 + state["interleaved_batch_in_epoch"] == sum(drawn)
    assert state["epoch"] * 4 + state["batch_in_epoch"] == 8 - sum(drawn)
    for record in history:
        for name in ("caption", "img_token", "retrieval", "generation"):
            assert np.isfinite(record[f"train/{name}_loss"])


def test_a_resumed_mixed_run_continues_both_data_streams_exactly(tmp_path):
    path = make_documents(tmp_path, count=6)
    common = [str(x) for x in [
        "--config", TINY_CONFIG, "--report-to", "none", "--progress-bar", "false", "--synthetic-size", 8,
        "--batch-size", 2, "--max-steps", 8, "--val-every", 0, "--checkpoint-every", 0, "--export-pipeline", "false",
        "--warmup-steps", 0, "--interleaved-data", path, "--interleaved-ratio", 0.5,
    ]]
    straight = train_gill.main(common + ["--output-dir", str(tmp_path / "straight")])
    first = train_gill.main(common + ["--output-dir", str(tmp_path / "resumed"), "--exit-after-steps", "5"])
    assert first["state"]["interleaved_batch_in_epoch"] + first["state"]["batch_in_epoch"] > 0
    second = train_gill.main(common + ["--output-dir", str(tmp_path / "resumed"), "--resume", "latest"])
    assert second["state"] == straight["state"]
    for name in ("caption", "img_token", "retrieval", "generation", "interleaved"):
        key = f"train/{name}_loss" if name != "interleaved" else "train/interleaved"
        assert [h[key] for h in straight["history"][5:]] == [h[key] for h in second["history"]], name


def test_two_processes_train_on_interleaved_documents(tmp_path):
    from multiprocess_run import run_two_processes

    path = make_documents(tmp_path, count=4)
    completed = run_two_processes([str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", tmp_path / "run", "--report-to", "none", "--progress-bar", "false",
        "--log-every", 1, "--synthetic-size", 8, "--batch-size", 1, "--max-steps", 2, "--val-every", 0,
        "--checkpoint-every", 0, "--export-pipeline", "false", "--interleaved-data", path, "--interleaved-ratio", 1.0,
    ]], timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    with open(tmp_path / "run" / train_gill.METRICS_FILE) as f:
        records = [json.loads(line) for line in f if "train/global_batch" in line]
    # Retrieval negatives span both processes: one document each, three target images per document.
    assert len(records) == 2 and all(r["train/global_batch"] == 6 and r["train/interleaved"] == 1.0 for r in records)


def test_documents_without_stored_targets_get_them_from_the_text_encoder(tmp_path):
    # Pair targets are stored, document targets are not: the SD text encoder must still be loaded for the documents.
    pairs = tmp_path / "pair_targets"
    precompute.main(["--tiny-random", "opt", "--data-type", "synthetic", "--synthetic-size", "8",
                     "--output", str(pairs), "--dtype", "float32"])
    path = make_documents(tmp_path, count=2)
    result = train_gill.main([str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", tmp_path / "run", "--report-to", "none", "--progress-bar", "false",
        "--synthetic-size", 8, "--batch-size", 2, "--max-steps", 2, "--val-every", 0, "--checkpoint-every", 0,
        "--export-pipeline", "false", "--train-targets", pairs, "--interleaved-data", path, "--interleaved-ratio", 1.0,
    ]])
    assert all(h["train/interleaved"] == 1.0 and np.isfinite(h["train/generation_loss"]) for h in result["history"])


def test_a_bom_and_a_line_that_is_not_utf8_are_read_as_the_other_readers_do(tmp_path):
    good = json.dumps(story(0)).encode()
    path = tmp_path / "docs.jsonl"
    bad = b'{"segments": "\xff"}\n'
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + bad + json.dumps(story(1)).encode() + b"\n")
    problems = RowProblems()
    assert [key for key, _ in read_documents(str(path), problems)] == ["doc-0", "doc-1"]
    assert [(line, "UTF-8" in problem) for _, line, problem in problems] == [(2, True)]


def test_validation_on_documents_reports_the_metrics_at_every_image(tmp_path):
    path = make_documents(tmp_path, count=4)
    result = train_gill.main([str(x) for x in [
        "--config", TINY_CONFIG, "--output-dir", tmp_path / "run", "--report-to", "none", "--progress-bar", "false",
        "--synthetic-size", 8, "--batch-size", 2, "--max-steps", 2, "--val-every", 0, "--checkpoint-every", 0,
        "--export-pipeline", "false", "--interleaved-data", path, "--interleaved-val-data", path,
    ]])
    val = result["val"]
    assert "val/caption_loss" in val  # the pairs' validation as before
    # three target images per document, four documents: recall over all 12 images, each in its context
    assert val["val_interleaved/examples"] == 12
    for key in ("caption_loss", "img_token_loss", "generation_l2", "text_to_image_recall@1"):
        assert np.isfinite(val[f"val_interleaved/{key}"]), key


def test_document_retrieval_weight_scales_only_document_batches():
    from training.model_forward import total_loss
    from training.params import LossArgs

    out = {"caption": torch.tensor(1.0), "img_token": torch.tensor(2.0), "retrieval": torch.tensor(3.0),
           "generation": torch.tensor(4.0)}
    args = LossArgs(interleaved_retrieval_weight=0.0)
    assert float(total_loss(out, args, interleaved=False)) == 10.0  # caption pairs: every loss, weight 1
    assert float(total_loss(out, args, interleaved=True)) == 7.0  # documents: retrieval left out
    assert float(total_loss(out, LossArgs(interleaved_retrieval_weight=0.5), interleaved=True)) == 8.5
    with pytest.raises(ValueError, match="interleaved_retrieval_weight"):
        LossArgs(interleaved_retrieval_weight=-1.0)


@pytest.mark.parametrize("prefix_grad", [True, False])
def test_context_prefix_grad_decides_what_trains_the_visual_prefix(tiny, tmp_path, prefix_grad):
    pipe = tiny.pipe
    model = training_model(pipe)
    model.context_prefix_grad = prefix_grad
    batch = collated(tiny, make_documents(tmp_path, count=2))
    out = model(batch)
    params = list(pipe.gill.visual_prefix.parameters())
    grads = torch.autograd.grad(out["img_token"] + out["retrieval"] + out["generation"], params, allow_unused=True,
                                retain_graph=True)
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == prefix_grad  # detached: the document [IMG] losses leave the projection alone
    # Captioning trains it either way.
    caption_grads = torch.autograd.grad(out["caption"], params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in caption_grads)


def test_length_buckets_give_the_losses_and_gradients_of_one_forward(tiny, tmp_path):
    """Documents of different lengths run through the LM in groups of similar length: each row still sees exactly its
    own tokens, so every loss and gradient is that of one forward over the padded batch."""
    path = make_documents(tmp_path, count=4)
    documents = [story(i) for i in range(4)]
    documents[1]["segments"] = documents[1]["segments"][:2]  # a short document beside long ones
    documents[2]["segments"] = documents[2]["segments"][:5]
    write_documents(path, documents)
    batch = collated(tiny, path)
    lengths = [len(row) for row in training_model(tiny.pipe).interleaved_img_rows(batch["documents"])[0]]
    assert len(set(lengths)) > 2  # the buckets really cut the rows to different lengths
    params = [p for p in tiny.pipe.gill.parameters() if p.requires_grad]
    results = []
    for buckets in (1, 3):
        model = training_model(tiny.pipe)
        model.length_buckets = buckets
        out = model(batch)
        total = out["caption"] + out["img_token"] + out["retrieval"] + out["generation"]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        results.append((out, grads))
    (one, one_grads), (bucketed, bucketed_grads) = results
    for key in ("caption", "img_token", "retrieval", "generation", "caption_correct", "img_token_count"):
        torch.testing.assert_close(bucketed[key], one[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bucketed["img_hidden"], one["img_hidden"], rtol=1e-5, atol=1e-5)
    for a, b in zip(bucketed_grads, one_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_interleaved_length_buckets_are_checked_before_anything_loads():
    from training.params import LossArgs

    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match=f"`interleaved_length_buckets`.*{bad!r}"):
            LossArgs(interleaved_length_buckets=bad)
