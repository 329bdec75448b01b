"""The paper's evaluations (`gill_pipeline.evaluation`, `gill evaluate`): each metric against a value computed by
hand, each reader on files in its dataset's format, and each protocol end to end on shapes-world data written in those
formats, run with the bundled shapes-world GILL (tiny sizes, 2 denoising steps)."""

import json
import math
import os
import random

import pytest
import torch

from gill_pipeline.bundled import BUNDLED_PIPELINE, bundle_available, load_bundled_pipeline
from gill_pipeline.evaluation import (
    LPIPS,
    CLIPTextImageScorer,
    ImageEmbedder,
    VisionTransformerFeatures,
    clip_score,
    cosine_similarity,
    decision_report,
    evaluate_caption_retrieval,
    evaluate_decision,
    evaluate_text_to_image,
    evaluate_visdial,
    evaluate_vist,
    frechet_distance,
    rank_of_first_match,
    read_partiprompts_decisions,
    read_visdial,
    read_vist_stories,
    recall_at_k,
)
from gill_pipeline.evaluation.datasets import DataFileError, majority_label, read_cc3m_captions, read_coco_captions
from gill_pipeline.evaluation.records import RECORDS_FILE, SUMMARY_JSON, SUMMARY_MARKDOWN
from gill_pipeline.evaluation.runner import to_tensor
from training.shapes.protocol_data import write_cc3m, write_coco, write_decisions, write_visdial, write_vist
from training.shapes.world import Scene, draw, training_scenes

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gill_original")
CONFIDENT = os.path.join(SHARED_DATA, "PartiPromptsDecisionsConfident.tsv")
ALIGNMENT = os.path.join(SHARED_DATA, "PartiPromptsAllDecisions_Alignment.tsv")
CLIP_VISION = os.path.join(BUNDLED_PIPELINE, "image_encoder")
CLIP_PROCESSOR = os.path.join(BUNDLED_PIPELINE, "feature_extractor")
FAST = dict(num_inference_steps=2, guidance_scale=5.0, progress=False)

needs_bundle = pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world pipeline is not installed")


def needs_shared_file(path: str):
    return pytest.mark.skipif(
        not os.path.isfile(path), reason=f"needs {os.path.normpath(path)} (../shared beside the checkout, as in CI)"
    )


def read_records(folder) -> list[dict]:
    with open(os.path.join(folder, RECORDS_FILE)) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------
# Metrics, against values computed by hand
# ---------------------------------------------------------------------------------------------------------------
def test_ranks_and_recall_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2],  # correct 0: best -> rank 1
            [0.9, 0.1, 0.5, 0.2],  # correct 2: below 0.9 -> rank 2
            [0.3, 0.3, 0.1, 0.0],  # correct 1, tied with a wrong one: ties count against -> rank 2
            [0.1, 0.2, 0.3, 0.4],  # correct {0, 2}: the better one (0.3) is below 0.4 -> rank 2
        ]
    )
    ranks = rank_of_first_match(scores, [[0], [2], [1], [0, 2]])
    assert ranks == [1, 2, 2, 2]
    assert recall_at_k(ranks, (1, 2, 5)) == {"recall@1": 0.25, "recall@2": 1.0, "recall@5": 1.0}
    assert recall_at_k([1, 6, 11, 3]) == {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75}
    with pytest.raises(ValueError, match="at least one correct"):
        rank_of_first_match(scores[:1], [[]])


def test_decision_report_by_hand():
    predicted = ["ret", "ret", "gen", "gen", "gen"]
    labels = ["ret", "gen", "gen", "gen", "ret"]
    report = decision_report(predicted, labels)
    # ret: tp 1, predicted 2, true 2 -> P 0.5, R 0.5, F1 0.5; gen: tp 2, predicted 3, true 3 -> 2/3 each.
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["f1_ret"] == pytest.approx(0.5) and report["f1_gen"] == pytest.approx(2 / 3)
    assert report["f1_macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert report["n"] == 5 and report["n_ret"] == 2 and report["n_gen"] == 3
    with pytest.raises(ValueError, match="`predicted` has 1"):
        decision_report(["ret"], ["ret", "gen"])


def test_cosine_similarity_by_hand():
    a, b = torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [6.0, 8.0]])
    assert torch.allclose(cosine_similarity(a, b), torch.tensor([1 / math.sqrt(2), 1.0]))


def test_lpips_formula_by_hand():
    # One layer that is the image itself (3 channels at 2 positions). Unit-normalised over channels:
    # a: (1,0,0) and (0,1,0); b: (0,0,1) and (0,1,0) -> squared differences 2 and 0 -> mean over positions 1.0.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[None, :, None, :]
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])[None, :, None, :]
    identity = lambda x: [x]  # noqa: E731
    assert LPIPS(identity)(a, b).item() == pytest.approx(1.0)
    # Channel weights (LPIPS's linear layers): (1-0)^2 * 2 + (0-1)^2 * 3 = 5 at the first position -> mean 2.5.
    assert LPIPS(identity, [torch.tensor([2.0, 7.0, 3.0])])(a, b).item() == pytest.approx(2.5)
    # Two layers add; transformer tokens (N, T, C) are read like maps.
    tokens = lambda x: [x, x.flatten(2).transpose(1, 2)]  # noqa: E731
    assert LPIPS(tokens)(a, b).item() == pytest.approx(2.0)
    assert LPIPS(identity)(a, a).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same shape"):
        LPIPS(identity)(a, b[..., :1])


def test_frechet_distance_by_hand():
    # 1-D features (the image mean): FID = (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2 with unbiased variances.
    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.float().mean(dim=(1, 2, 3))[:, None]

    def constant(values):
        return [torch.stack([torch.full((3, 4, 4), v) for v in values])]

    real, fake = constant([0.1, 0.3]), constant([0.5, 0.9])  # means 0.2 / 0.7, variances 0.02 / 0.08
    expected = 0.5**2 + (math.sqrt(0.02) - math.sqrt(0.08)) ** 2
    assert frechet_distance(Mean(), real, fake) == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(Mean(), real, real) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_counts_every_batch_of_any_iterable():
    # The fake set in two batches of one image: as a list, a generator (read once; its first batch once dropped
    # when the image size was peeked at), one tensor, and a tuple. Every form gives the hand-computed FID.
    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.float().mean(dim=(1, 2, 3))[:, None]

    def batch(values):
        return torch.stack([torch.full((3, 4, 4), v) for v in values])

    real = [batch([0.1, 0.3])]
    fake = [batch([0.5]), batch([0.9])]
    expected = 0.5**2 + (math.sqrt(0.02) - math.sqrt(0.08)) ** 2
    for form in (fake, (b for b in fake), torch.cat(fake), tuple(fake)):
        assert frechet_distance(Mean(), real, form) == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(Mean(), (b for b in real), iter(fake)) == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(Mean(), real[0], torch.cat(fake)) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="`fake_images` holds no images"):
        frechet_distance(Mean(), real, iter([]))
    with pytest.raises(ValueError, match=r"`real_images` must yield batches of images .*\(3, 4, 4\)"):
        frechet_distance(Mean(), [batch([0.1])[0]], fake)


def test_clip_score_by_hand(world_clip_folder):
    scorer = CLIPTextImageScorer.from_pretrained(world_clip_folder)
    scenes = [Scene("circle", "red", "left", "small"), Scene("square", "blue", "top", "large")]
    images = list(to_tensor([draw(s) for s in scenes]))
    texts = [s.caption() for s in scenes]
    cosine = cosine_similarity(scorer.image_embeds(images), scorer.text_embeds(texts))
    expected = max(float((100 * cosine).mean()), 0.0)
    assert clip_score(scorer.as_torchmetrics(), images, texts) == pytest.approx(expected, abs=1e-3)
    # A whole CLIP folder also serves as LPIPS features (its vision tower's layers) and as FID features.
    layers = VisionTransformerFeatures.from_pretrained(world_clip_folder)(images)
    assert len(layers) == 3 and layers[0].shape[0] == 2
    assert ImageEmbedder.from_pretrained(world_clip_folder)(images).shape == (2, 64)  # the projection width


# ---------------------------------------------------------------------------------------------------------------
# Readers: the datasets' own formats
# ---------------------------------------------------------------------------------------------------------------
SCENES = [s for s in training_scenes() if s.shape != "triangle"]


def test_readers_read_the_original_formats(tmp_path):
    stories = [[SCENES[0], SCENES[5], SCENES[9]], [SCENES[1], SCENES[2], SCENES[3]]]
    loaded = read_vist_stories(write_vist(str(tmp_path), stories), str(tmp_path), "{id}.jpg")  # .png found too
    by_id = {s.id: s for s in loaded.examples}
    assert [by_id[str(50 + i)].captions for i in range(2)] == [[x.caption() for x in story] for story in stories]
    os.remove(by_id["51"].image_paths[0])
    again = read_vist_stories(os.path.join(tmp_path, "val.story-in-sequence.json"), str(tmp_path))
    assert len(again.examples) == 1 and again.skipped == 1

    dialogs = read_visdial(write_visdial(str(tmp_path), SCENES[:2]), str(tmp_path)).examples
    assert dialogs[1].id == "2" and dialogs[1].rounds == [("what shape", SCENES[1].shape), ("what colour", SCENES[1].colour)]

    cc3m = read_cc3m_captions(write_cc3m(str(tmp_path), SCENES[:3]), str(tmp_path)).examples
    assert [c.captions[0] for c in cc3m] == [s.caption() for s in SCENES[:3]] and cc3m[0].image_path.endswith(".png")
    coco = read_coco_captions(write_coco(str(tmp_path), SCENES[:2]), str(tmp_path)).examples
    assert len(coco) == 2 and len(coco[0].captions) == 2

    assert majority_label(["ret", "gen", "gen", "same", "gen"]) == "gen"
    assert majority_label(["ret", "same"]) == "ret" and majority_label(["ret", "gen"]) is None
    with pytest.raises(ValueError, match="caption<TAB>image"):
        bad = tmp_path / "bad.tsv"
        bad.write_text("text\tfile\nx\ty\n")
        read_cc3m_captions(str(bad), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image_dir"):
        read_visdial(str(tmp_path / "visdial_1.0_val.json"), str(tmp_path / "nowhere"))


@needs_shared_file(CONFIDENT)
def test_real_partiprompts_decision_files_are_read():
    confident = read_partiprompts_decisions(CONFIDENT).examples
    labels = [p.label for p in confident]
    assert len(confident) == 1632
    assert (labels.count("gen"), labels.count("ret"), labels.count(None)) == (592, 319, 721)
    assert confident[0].prompt == "bond" and confident[0].category == "Abstract"
    votes = read_partiprompts_decisions(ALIGNMENT).examples
    assert votes[0].votes == ["ret", "gen", "gen", "same", "gen"] and votes[0].label == "gen"


@needs_shared_file(os.path.join(SHARED_DATA, "cc3m_val.tsv"))
def test_real_cc3m_caption_file_is_read(tmp_path):
    with pytest.raises(DataFileError, match="none of its 4 caption rows has its images"):  # they are not shipped
        read_cc3m_captions(os.path.join(SHARED_DATA, "cc3m_val.tsv"), str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Protocols, end to end on shapes-world data with the bundled GILL
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_pipe():
    if not bundle_available():
        pytest.skip("the bundled shapes-world pipeline is not installed")
    pipe = load_bundled_pipeline(with_index=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@needs_bundle
def test_decision_protocol_on_world_labels_and_resume(world_pipe, tmp_path):
    rng = random.Random(0)
    scenes = rng.sample([s for s in training_scenes()], 12)
    path = write_decisions(str(tmp_path), scenes)
    out = str(tmp_path / "out")
    summary = evaluate_decision(world_pipe, path, out, batch_size=5, progress=False)
    gill = summary["results"]["gill"]
    assert gill["n"] == 12 and gill["accuracy"] == 1.0  # the bundled head is perfect in this world (shapes_world.md)
    assert summary["results"]["majority"]["accuracy"] < 1.0
    assert len(read_records(out)) == 13  # the `same` row is recorded, not scored
    assert "| gill |" in open(os.path.join(out, SUMMARY_MARKDOWN)).read()
    # Resume: nothing is redone, the summary is the same.
    again = evaluate_decision(world_pipe, path, out, progress=False)
    assert len(read_records(out)) == 13 and again["results"] == summary["results"]
    with pytest.raises(ValueError, match="other settings"):
        evaluate_decision(world_pipe, write_decisions(str(tmp_path / "x"), scenes), out)


@needs_bundle
@needs_shared_file(CONFIDENT)
def test_decision_protocol_runs_on_the_real_partiprompts_file(world_pipe, tmp_path):
    summary = evaluate_decision(world_pipe, CONFIDENT, str(tmp_path), limit=6, progress=False)
    assert summary["results"]["gill"]["n"] == sum(p.label is not None for p in read_partiprompts_decisions(CONFIDENT).examples[:6])


@needs_bundle
def test_caption_retrieval_cc3m_and_coco(world_pipe, world_clip_folder, tmp_path):
    scenes = random.Random(1).sample(SCENES, 12)
    cc3m = write_cc3m(str(tmp_path / "cc3m"), scenes)
    out = str(tmp_path / "out_cc3m")
    summary = evaluate_caption_retrieval(world_pipe, cc3m, str(tmp_path / "cc3m"), out, clip_baseline=world_clip_folder,
                                         batch_size=5, progress=False)
    gill = summary["results"]["gill"]
    assert gill["n_images"] == gill["n_captions"] == 12
    assert gill["t2i_recall@1"] >= 0.9 and gill["i2t_recall@1"] >= 0.9  # the bundled retrieval works in this world
    assert {"t2i_recall@1", "i2t_recall@10"} <= set(summary["results"]["clip"])
    assert len(read_records(out)) == 2 * (12 + 12)
    # Resume: the embeddings are read back, the records not written twice.
    assert evaluate_caption_retrieval(world_pipe, cc3m, str(tmp_path / "cc3m"), out, clip_baseline=world_clip_folder,
                                      progress=False)["results"] == summary["results"]
    assert len(read_records(out)) == 48

    coco = write_coco(str(tmp_path / "coco"), scenes[:6])
    summary = evaluate_caption_retrieval(world_pipe, coco, str(tmp_path / "coco"), str(tmp_path / "out_coco"),
                                         data_format="coco", progress=False)
    assert summary["results"]["gill"]["n_captions"] == 12 and set(summary["results"]) == {"gill"}


@needs_bundle
def test_visdial_protocol(world_pipe, world_clip_folder, tmp_path):
    scenes = random.Random(2).sample(SCENES, 8)
    path = write_visdial(str(tmp_path), scenes)
    summary = evaluate_visdial(world_pipe, path, str(tmp_path), str(tmp_path / "out"), num_rounds=2,
                               round_template=" {question} {answer} .", caption_template="{caption} .",
                               clip_baseline=world_clip_folder, batch_size=3, progress=False)
    for system in ("gill", "clip"):
        r = summary["results"][system]
        assert r["n"] == 8 and 0 <= r["recall@1"] <= r["recall@5"] <= r["recall@10"] == 1.0
    assert json.load(open(tmp_path / "out" / SUMMARY_JSON))["settings"]["num_rounds"] == 2


@needs_bundle
def test_vist_protocol_with_decoder_baseline_and_resume(world_pipe, world_clip_folder, tmp_path):
    rng = random.Random(3)
    stories = [rng.sample(SCENES, 3) for _ in range(3)]
    path = write_vist(str(tmp_path), stories)
    clip = ImageEmbedder.from_pretrained(CLIP_VISION, CLIP_PROCESSOR)
    lpips = LPIPS(VisionTransformerFeatures.from_pretrained(CLIP_VISION, CLIP_PROCESSOR))
    out = str(tmp_path / "out")
    kwargs = dict(clip=clip, lpips_clip_features=lpips, baseline_text_encoder=world_clip_folder, num_captions=3,
                  batch_size=2, **FAST)
    summary = evaluate_vist(world_pipe, path, str(tmp_path), out, limit=2, **kwargs)
    assert set(summary["results"]) == {"gill", "sd"} and summary["results"]["gill"]["n"] == 2
    for r in summary["results"].values():
        assert -1 <= r["clip_similarity"] <= 1 and r["lpips_clip_features"] >= 0 and "lpips" not in r
    records = read_records(out)
    assert len(records) == 4 and all(os.path.isfile(os.path.join(out, r["image"])) for r in records)
    # A larger limit resumes: only the third story is run, for both systems.
    summary = evaluate_vist(world_pipe, path, str(tmp_path), out, limit=3, **kwargs)
    assert len(read_records(out)) == 6 and summary["results"]["sd"]["n"] == 3
    # The same story gives the same image whatever batch it ran in (one seed per example).
    single = evaluate_vist(world_pipe, path, str(tmp_path), str(tmp_path / "single"), limit=3, **{**kwargs, "batch_size": 1})
    assert single["results"]["gill"]["clip_similarity"] == pytest.approx(summary["results"]["gill"]["clip_similarity"], abs=1e-5)


def mean_absolute_difference(images_a, images_b):
    """Stands in for the published LPIPS (its VGG weights are not here): any `(a, b) -> (N,)` distance."""
    return (images_a - images_b).abs().mean(dim=(1, 2, 3))


@needs_bundle
def test_vist_keeps_the_published_and_the_clip_feature_lpips_apart(world_pipe, tmp_path):
    path = write_vist(str(tmp_path), [SCENES[:2]])
    clip_lpips = LPIPS(VisionTransformerFeatures.from_pretrained(CLIP_VISION, CLIP_PROCESSOR))
    clip = ImageEmbedder.from_pretrained(CLIP_VISION, CLIP_PROCESSOR)
    kwargs = dict(clip=clip, num_captions=2, **FAST)
    out = tmp_path / "both"
    summary = evaluate_vist(world_pipe, path, str(tmp_path), str(out), lpips=mean_absolute_difference,
                            lpips_clip_features=clip_lpips, **kwargs)
    (record,) = read_records(out)
    gill = summary["results"]["gill"]
    assert gill["lpips"] == pytest.approx(record["lpips"]) and gill["lpips_clip_features"] == pytest.approx(
        record["lpips_clip_features"])
    assert record["lpips"] != pytest.approx(record["lpips_clip_features"], rel=1e-3)  # two metrics, two numbers
    header = (out / SUMMARY_MARKDOWN).read_text().splitlines()[2]
    assert "| lpips |" in header and "| lpips_clip_features |" in header
    assert any(n.startswith("lpips_clip_features:") and "not comparable" in n for n in summary["notes"])
    # The old way (the CLIP-feature LPIPS passed as `lpips`) still runs, and records it under its own key.
    with pytest.warns(FutureWarning, match="lpips_clip_features"):
        old_way = evaluate_vist(world_pipe, path, str(tmp_path), str(tmp_path / "old_way"), lpips=clip_lpips, **kwargs)
    assert set(old_way["results"]["gill"]) == {"clip_similarity", "lpips_clip_features", "n"}
    assert old_way["results"]["gill"]["lpips_clip_features"] == pytest.approx(gill["lpips_clip_features"], abs=1e-5)


@needs_bundle
def test_vist_resumes_a_run_written_before_the_two_lpips_keys(world_pipe, tmp_path):
    rng = random.Random(6)
    path = write_vist(str(tmp_path), [rng.sample(SCENES, 2) for _ in range(2)])
    clip_lpips = LPIPS(VisionTransformerFeatures.from_pretrained(CLIP_VISION, CLIP_PROCESSOR))
    kwargs = dict(clip=ImageEmbedder.from_pretrained(CLIP_VISION, CLIP_PROCESSOR), num_captions=2, **FAST)
    out = tmp_path / "out"
    evaluate_vist(world_pipe, path, str(tmp_path), str(out), limit=1, lpips_clip_features=clip_lpips, **kwargs)
    # Written as before: `lpips: true` in the settings and the CLIP-feature distance under `lpips` in the records.
    settings = json.loads((out / "settings.json").read_text())
    del settings["lpips_clip_features"]
    settings["lpips"] = True
    (out / "settings.json").write_text(json.dumps(settings))
    (old,) = read_records(out)
    old["lpips"] = old.pop("lpips_clip_features")
    old_lines = json.dumps(old) + "\n"
    (out / RECORDS_FILE).write_text(old_lines)

    summary = evaluate_vist(world_pipe, path, str(tmp_path), str(out), limit=2, lpips_clip_features=clip_lpips, **kwargs)
    gill = summary["results"]["gill"]
    new = read_records(out)[1]
    assert gill["n"] == 2 and "lpips" not in gill
    assert gill["lpips_clip_features"] == pytest.approx((old["lpips"] + new["lpips_clip_features"]) / 2)
    assert (out / RECORDS_FILE).read_text().startswith(old_lines)  # the old record is read, never rewritten
    # The old folder's one LPIPS cannot have been both: a run asking for both is refused.
    with pytest.raises(ValueError, match="other settings"):
        evaluate_vist(world_pipe, path, str(tmp_path), str(out), limit=2, lpips=mean_absolute_difference,
                      lpips_clip_features=clip_lpips, **kwargs)


@needs_bundle
def test_text_to_image_fid_and_clip_score(world_pipe, world_clip_folder, tmp_path):
    scenes = random.Random(4).sample(SCENES, 4)
    path = write_cc3m(str(tmp_path), scenes)
    summary = evaluate_text_to_image(
        world_pipe, path, str(tmp_path), str(tmp_path / "out"), fid_features=ImageEmbedder.from_pretrained(CLIP_VISION, CLIP_PROCESSOR),
        clip_scorer=world_clip_folder, baseline_text_encoder=world_clip_folder, batch_size=4, **FAST,
    )
    for system in ("gill", "sd"):
        r = summary["results"][system]
        assert r["n"] == 4 and r["fid"] >= 0 and 0 <= r["clip_score"] <= 100


@needs_bundle
def test_gill_evaluate_command(tmp_path, capsys):
    from gill_pipeline.commands import main

    scenes = random.Random(5).sample(training_scenes(), 4)
    path = write_decisions(str(tmp_path), scenes)
    out = str(tmp_path / "out")
    assert main(["evaluate", "decision", "--model", "shapes-world", "--decisions", path, "--output-dir", out,
                 "--no-progress"]) == 0
    assert "| gill |" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, SUMMARY_JSON)))["results"]["gill"]["n"] == 4
    assert main(["evaluate", "decision", "--model", "shapes-world", "--decisions", str(tmp_path / "none.tsv"),
                 "--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert "gill evaluate: error:" in err and "none.tsv" in err and len(err.strip().splitlines()) == 1


@needs_bundle
def test_bad_arguments_are_named(world_pipe, tmp_path):
    path = write_cc3m(str(tmp_path), SCENES[:2])
    with pytest.raises(ValueError, match="`data_format` must be one of"):
        evaluate_caption_retrieval(world_pipe, path, str(tmp_path), str(tmp_path / "a"), data_format="flickr")
    with pytest.raises(ValueError, match="`num_captions` must be a positive integer, got 0"):
        evaluate_vist(world_pipe, path, str(tmp_path), str(tmp_path / "b"), clip=None, num_captions=0)
    with pytest.raises(ValueError, match="`limit` must be a positive integer"):
        evaluate_decision(world_pipe, write_decisions(str(tmp_path), SCENES[:2]), str(tmp_path / "c"), limit=0)
    with pytest.raises(FileNotFoundError, match="CLIP folder"):
        ImageEmbedder.from_pretrained(str(tmp_path / "no_clip"))
    with pytest.raises(ValueError, match="not a whole CLIP"):
        CLIPTextImageScorer.from_pretrained(CLIP_VISION)
