"""The shapes world: its scripts stay alive (a reduced run of every stage) and the bundled GILL really works."""

import json
import random
import os

import numpy as np
import pytest
import torch

from gill_pipeline import GILLPipeline
from gill_pipeline.bundled import BUNDLED_CLASSIFIER, bundle_available, load_bundled_pipeline
from training.shapes.world import (
    HELD_OUT,
    Scene,
    all_scenes,
    context_example,
    draw,
    held_out_scenes,
    training_scenes,
    vocabulary,
)


def test_world_is_deterministic_and_holds_combinations_out():
    scene = Scene("triangle", "blue", "left", "large")
    a, b = np.asarray(draw(scene, 32, 1, seed=5)), np.asarray(draw(scene, 32, 1, seed=5))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(draw(scene.replace(colour="red"), 32, 1, seed=5)))
    assert len(all_scenes()) == 180 and len(held_out_scenes()) == len(HELD_OUT) == 9
    assert not any(s.held_out for s in training_scenes())
    assert scene.caption() == "a large blue triangle on the left"
    assert set(scene.caption().split()) <= set(vocabulary())


def test_context_documents_are_valid_chains_and_image_text_image_sequences(tmp_path):
    from training.interleaved import read_documents
    from training.shapes.train_world_gill import write_context_documents

    path = write_context_documents(str(tmp_path), "context", 6, seed=0)
    documents = read_documents(path)
    assert len(documents) == 6
    for i, (_, segments) in enumerate(documents):
        target = segments[-1]
        assert target.get("target", True) and os.path.isfile(tmp_path / target["image"])
        assert target["caption"] not in {scene.caption() for scene in held_out_scenes()}
        if i % 2 == 0:
            assert [list(s) for s in segments] == [["text"], ["image", "caption"]]
            assert segments[0]["text"].startswith("there is ") and segments[0]["text"].endswith(" :")
        else:
            assert segments[0] == {"text": "there is"} and segments[1]["target"] is False
            assert segments[2]["text"].startswith(". now ")


def test_context_examples_change_exactly_one_attribute():
    import random

    rng = random.Random(0)
    for _ in range(50):
        first, instruction, target = context_example(rng)
        changed = [a for a in ("shape", "colour", "position", "size") if getattr(first, a) != getattr(target, a)]
        assert len(changed) == 1 and not target.held_out and instruction.startswith("now")


def test_phrasings_use_the_world_vocabulary_and_held_out_ones_stay_out_of_training(tmp_path):
    import random

    from training.interleaved import read_documents
    from training.shapes.train_world_gill import write_context_documents
    from training.shapes.world import HELD_OUT_PHRASINGS, TRAINING_PHRASINGS, change_instruction, corpus

    vocab = set(vocabulary())
    # The world's own wording is the first training phrasing; "world" draws nothing extra from the generator, so the
    # examples (and the bundled model's corpus) are the ones made before phrasings existed.
    assert change_instruction("colour", "blue") == "now the same shape in blue"
    assert change_instruction("position", "top") == "now move it at the top"
    a, b = random.Random(3), random.Random(3)
    assert [context_example(a)[1] for _ in range(20)] == [
        change_instruction(*pick) for pick in (_world_pick(b) for _ in range(20))
    ]
    held = {t.split("{")[0] for templates in HELD_OUT_PHRASINGS.values() for t in templates}
    trained = {t.split("{")[0] for templates in TRAINING_PHRASINGS.values() for t in templates}
    assert not held & trained
    rng = random.Random(0)
    for phrasings, templates in (("training", TRAINING_PHRASINGS), ("held_out", HELD_OUT_PHRASINGS)):
        seen = set()
        for _ in range(400):
            first, instruction, target = context_example(rng, phrasings=phrasings)
            assert set(instruction.split()) <= vocab, instruction
            seen.add(instruction.rsplit(" ", 1)[0])
        assert len(seen) > len(templates)  # more than one wording per attribute is drawn
    lines = corpus(2000, seed=1, phrasings="training")
    assert any("make it a " in line for line in lines)
    assert not any(" now it is " in line or "now the shape is" in line for line in lines)

    path = write_context_documents(str(tmp_path), "context", 30, seed=0, phrasings="training")
    texts = " ".join(s["text"] for _, segments in read_documents(path) for s in segments if "text" in s)
    assert "now it is" not in texts and "now the shape is" not in texts
    with pytest.raises(ValueError, match="held-out phrasings"):
        write_context_documents(str(tmp_path), "bad", 2, seed=0, phrasings="held_out")
    with pytest.raises(ValueError, match="phrasings"):
        context_example(rng, phrasings="new")


def _world_pick(rng):
    """What context_example draws for the world's own wording: (attribute, value) of a training target."""
    from training.shapes.world import CHANGEABLE

    while True:
        first = rng.choice(all_scenes(False))
        attribute = rng.choice(list(CHANGEABLE))
        value = rng.choice([v for v in CHANGEABLE[attribute] if v != getattr(first, attribute)])
        if not first.replace(**{attribute: value}).held_out:
            return attribute, value


def test_describe_documents_show_the_input_scene_again(tmp_path):
    from training.interleaved import read_documents
    from training.shapes.train_world_gill import write_context_documents

    path = write_context_documents(str(tmp_path), "context", 6, seed=0, kinds=("describe",))
    for _, segments in read_documents(path):
        given, text, answer = segments
        assert given["target"] is False and text["text"] == given["caption"] == answer["caption"]
        assert answer.get("target", True) and given["image"] != answer["image"]
    with pytest.raises(ValueError, match="kinds"):
        write_context_documents(str(tmp_path), "bad", 2, seed=0, kinds=("story",))


def test_answer_documents_write_the_answer_before_its_image(tmp_path):
    """"text_answer" / "image_first_answer": the request, then the answer's caption in words, then its image."""
    from training.interleaved import read_documents
    from training.shapes.train_world_gill import write_context_documents

    path = write_context_documents(str(tmp_path), "context", 4, seed=0, kinds=("text_answer", "image_first_answer"))
    for i, (_, segments) in enumerate(read_documents(path)):
        answer = segments[-1]
        text = segments[-2]["text"]
        assert text.endswith(f" : {answer['caption']} .") and answer.get("target", True)
        if i % 2 == 0:
            assert len(segments) == 2 and text.startswith("there is ")
        else:
            assert len(segments) == 3 and segments[0]["target"] is False and text.startswith("now ")


def test_captioning_error_directions_flag_a_collapsed_attribute():
    from training.shapes.evaluate_world import error_directions, one_directional

    scenes = [Scene("circle", "red", "left", "small")] * 3 + [Scene("circle", "red", "right", "small")]
    collapsed = torch.tensor([scenes[0].replace(position="right").labels()] * 3 + [scenes[3].labels()])
    directions = error_directions(collapsed, scenes)
    assert directions == {"shape": {}, "position": {"left->right": 3}} and one_directional(directions)
    noisy = torch.tensor([scenes[0].replace(position="right").labels()] * 3 + [scenes[0].labels()])
    assert not one_directional(error_directions(noisy, scenes))  # right->left too


def test_every_world_script_runs_on_a_reduced_setting(tmp_path):
    from training.shapes.retrain_all import main

    summary = main(["--work", str(tmp_path / "work"), "--scale", "0.002", "--bundle-out", str(tmp_path / "bundle"),
                    "--results", str(tmp_path / "results"), "--threads", "1", "--context-ratio", "0.5",
                    # the dialogue recipe's options (issue 23): chat transcripts and chat words, dialogue documents
                    "--dialogue-corpus", "8000", "--context-kinds", "text,image,dialogue,describe"])
    assert summary["bundle_mb"] < 25
    # GILL read context-chain documents too (steps 1 and 4 of 4 draw documents at this seed and ratio)
    with open(tmp_path / "work" / "gill" / "run" / "metrics.jsonl") as f:
        drawn = [json.loads(line)["train/interleaved"] for line in f if "train/interleaved" in line]
    assert drawn and drawn[0] == 1.0
    for name in ("clip", "sd", "lm", "classifier"):
        assert os.path.isdir(tmp_path / "work" / "base" / name)
    # The LM knows a chat's words (issue 23); the CLIP tokenizer (the SD text encoder's) keeps the world's ids.
    from transformers import AutoTokenizer

    from training.shapes.dialogue import CHAT_WORDS

    lm_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "work" / "base" / "lm")
    clip_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "work" / "base" / "clip")
    assert lm_tokenizer.unk_token_id not in lm_tokenizer("What is this ? please make it red and small", add_special_tokens=False).input_ids
    assert set(CHAT_WORDS) <= set(lm_tokenizer.get_vocab())
    assert {w: i for w, i in lm_tokenizer.get_vocab().items() if w in clip_tokenizer.get_vocab()} == clip_tokenizer.get_vocab()
    pipe = GILLPipeline.from_pretrained(tmp_path / "bundle" / "shapes_pipeline", dtype=torch.float32)
    pipe.load_retrieval_index(tmp_path / "bundle" / "shapes_index")  # built from the fp16 round-tripped weights
    results = json.loads((tmp_path / "results.json").read_text())
    new = {"context_new_phrasings", "colour_change_world", "colour_change_new_phrasings"}
    assert {"generation", "retrieval", "decision", "context", "captioning", *new} <= set(results["in_distribution"])
    assert {"generation", "decision", "context", "captioning", *new} <= set(results["held_out"])
    assert results["readme_demo"]["n"] >= 2 and 0 <= results["readme_demo"]["right"] <= 1
    assert all({"what", "value", "target", "met"} <= set(row) for row in results["targets"])


@pytest.fixture(scope="module")
def bundled():
    if not bundle_available():
        pytest.fail("The bundled shapes-world pipeline is missing: run `python -m training.shapes.retrain_all`.")
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundle_names_no_path_of_the_machine_that_trained_it():
    from gill_pipeline.bundled import BUNDLED_ROOT

    for directory, _, files in os.walk(BUNDLED_ROOT):
        for name in files:
            if name.endswith((".json", ".md", ".txt")):
                text = open(os.path.join(directory, name), encoding="utf-8").read()
                assert "/tmp/" not in text and "/work/" not in text and "/home/" not in text, os.path.join(directory, name)


def test_bundle_is_small_and_loads(bundled):
    from gill_pipeline.bundled import BUNDLED_ROOT

    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(BUNDLED_ROOT) for f in fs)
    assert size < 25 * 2**20
    assert bundled.retrieval_index is not None and len(bundled.retrieval_index) > 0


@pytest.mark.parametrize(
    "scene",
    [Scene("circle", "red", "center", "large"), Scene("square", "blue", "left", "large"), Scene("triangle", "yellow", "right", "large")],
)
def test_bundled_gill_draws_what_the_prompt_says(bundled, scene):
    from training.shapes.classifier import AttributeClassifier

    classifier = AttributeClassifier.from_pretrained(BUNDLED_CLASSIFIER).eval()
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    out = bundled(
        [[scene.caption()]] * 4, generator=generators, image_mode="generate", output_type="pt", max_new_tokens=1,
        img_logit_scale=1e4, num_inference_steps=20, guidance_scale=5.0,
    )
    images = torch.stack([answer[0].image for answer in out.gill_images])
    predicted = classifier.predict(images)
    correct = (predicted == torch.tensor(scene.labels())).all(-1)
    assert int(correct.sum()) >= 3, (scene, predicted.tolist())


def test_readme_default_answers_with_text_a_generated_and_a_retrieved_image(bundled, tmp_path, capsys):
    """The README's first command: the bundled GILL describes the example image and answers with both images."""
    from gill_pipeline.commands import main

    assert main(["generate", "--output-dir", str(tmp_path)]) == 0
    page = (tmp_path / "answer.md").read_text()
    assert "circle" in page  # the example is a small red circle: the description names its shape
    # One image shown, the other kind as its alternative (which one is shown is the decision head's and the retrieval
    # set's similarity floor's pick; the demo's accuracy is test_readme_demo_shows_the_input_scene's business).
    shown = {p.name for p in tmp_path.glob("image_0_*.png") if not p.name.endswith("_alternative.png")}
    alternative = {p.name for p in tmp_path.glob("image_0_*_alternative.png")}
    assert (shown, alternative) in (
        ({"image_0_retrieved.png"}, {"image_0_generated_alternative.png"}),
        ({"image_0_generated.png"}, {"image_0_retrieved_alternative.png"}),
    ), (shown, alternative)
    assert "Wrote:" in capsys.readouterr().out


def test_readme_demo_shows_the_input_scene(bundled):
    """The README demo's settings (`gill generate`'s preset) on images of the world: the image shown (retrieved or
    generated, as the decision head and the retrieval set's similarity floor pick) is the input scene. The full
    measurement over all 180 scenes is in benchmarks/results/shapes_world.md."""
    from training.shapes.classifier import AttributeClassifier
    from training.shapes.evaluate_world import readme_demo
    from training.shapes.world import all_scenes

    assert bundled.retrieval_index.min_similarity is not None, "the bundled retrieval set carries its calibrated floor"
    classifier = AttributeClassifier.from_pretrained(BUNDLED_CLASSIFIER).eval()
    scenes = random.Random(3).sample(all_scenes(), 12)
    report = readme_demo(bundled, classifier, scenes, seed=5)
    assert report["right"] >= 10 / 12, report
    assert report["description_exact"] >= 10 / 12, report


def test_bundled_tokenizer_normalises_case_and_punctuation(bundled):
    tokenizer = bundled.tokenizer

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    assert ids("There is a small RED Circle on the left. Now the same shape in Blue:") == ids(
        "there is a small red circle on the left . now the same shape in blue :"
    )
    assert tokenizer.unk_token_id not in ids("A blue square.")
    # Every text the world writes (captions, context chains, the LM's corpus) gets exactly the ids it got without the
    # normaliser (whitespace split, one id per word), so the bundled model and its figures are unchanged.
    import random

    from training.shapes.world import all_scenes, context_example, context_text, corpus

    vocab = tokenizer.get_vocab()
    rng = random.Random(0)
    texts = [s.caption() for s in all_scenes()] + corpus(300, seed=0)
    texts += [context_text(first, instruction) for first, instruction, _ in
              (context_example(rng, include_held_out=True) for _ in range(300))]
    for text in texts:
        assert ids(text) == [vocab.get(word, tokenizer.unk_token_id) for word in text.split()], text
        assert tokenizer.unk_token_id not in ids(text), text


def test_unknown_words_are_named_in_one_warning_per_call(bundled, caplog, tmp_path):
    settings = dict(max_new_tokens=1, img_logit_scale=1e4, image_mode="generate", num_inference_steps=1,
                    output_type="pt", generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        bundled([["Draw a blue square."], ["Paint a red SQUARE:"]], **settings)
    warnings = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert warnings == [
        "The prompt contains words this model's tokenizer does not know: 'Draw', 'Paint'. The LM reads each as its "
        "unknown token '<unk>'; rephrase with words it knows."
    ]
    caplog.clear()
    with caplog.at_level("WARNING"):
        bundled(["Make a blue square."], **settings)
    assert not [r for r in caplog.records if "does not know" in r.getMessage()]

    from gill_pipeline.commands import main

    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["generate", "Drw a blue square", "--output-dir", str(tmp_path), "--max-new-tokens", "1",
                     "--steps", "1"]) == 0
    assert [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()] == [
        "The prompt contains words this model's tokenizer does not know: 'Drw'. The LM reads each as its unknown "
        "token '<unk>'; rephrase with words it knows."
    ]


def test_a_negative_lora_rank_is_refused_by_name(capsys):
    from training.shapes.train_world_gill import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--base", "unused", "--out", "unused", "--lora-rank", "-2"])
    assert exit_info.value.code == 2
    assert "--lora-rank must be 0 (no adapter) or a positive rank, got -2" in capsys.readouterr().err


def test_a_message_longer_than_the_context_is_refused_before_the_unknown_word_scan(bundled, monkeypatch):
    def scan(*args, **kwargs):
        raise AssertionError("the unknown-word scan ran on an input that is refused for its length")

    monkeypatch.setattr(bundled.processor, "unknown_words", scan)
    monkeypatch.setattr(bundled.processor, "encode_image_features", scan)  # nor the vision encoder
    long_text = " ".join(["zzz", "a", "red", "Qqq"] * 25_000)  # 100k words, half of them unknown
    with pytest.raises(ValueError, match=r"`prompt` is \d+ LM positions long .* context of \d+ positions"):
        bundled([long_text], max_new_tokens=1)


def test_the_unknown_word_scan_is_each_word_once_in_order_and_linear(bundled):
    processor = bundled.processor
    words = [f"unknown{i % 500}" for i in range(40_000)] + ["a", "red", "Zebra", "unknown3"]
    found = processor.unknown_words([[" ".join(words)], ["Zebra again", "Yak"]])
    assert found == [f"unknown{i}" for i in range(500)] + ["Zebra", "again", "Yak"]
    # The same words as a word-by-word check finds them (the reference the linear sweep must agree with).
    sample = "Draw  a red\tsquare , Paint it ?"
    one_by_one = [w for w in sample.split() if processor.tokenizer.unk_token_id in processor.tokenizer(w).input_ids]
    assert processor.unknown_words([[sample]]) == one_by_one == ["Draw", ",", "Paint"]  # "?" is a chat word it knows


def _unknown_word_warnings(caplog) -> list[str]:
    return [r.getMessage().split(":")[1].split(".")[0].strip() for r in caplog.records if "does not know" in r.getMessage()]


def test_a_conversation_names_each_unknown_word_once_not_at_every_turn(bundled, caplog):
    # Each turn re-sends the earlier ones: 'Draw' was named again at every later turn (issue 23).
    from gill_pipeline import GILLConversation

    settings = dict(max_new_tokens=2, max_images=0, output_type="pt")
    conversation = GILLConversation(bundled, **settings)
    with caplog.at_level("WARNING"):
        conversation.send("Draw a blue square .")
        conversation.send("now make it red :")
        conversation.send("Paint it Draw :")
    assert _unknown_word_warnings(caplog) == ["'Draw'", "'Paint'"]
    caplog.clear()
    conversation.reset()
    with caplog.at_level("WARNING"):
        conversation.send("Draw a blue square .")
    assert _unknown_word_warnings(caplog) == ["'Draw'"], "a new conversation names its words again"


def test_gill_chat_names_an_unknown_word_once_per_conversation(bundled, caplog, tmp_path):
    import io

    from gill_pipeline.commands.chat import TerminalChat

    stdin = io.StringIO("Draw a blue square\nnow make it red :\n/reset\nDraw a red circle\n")
    chat = TerminalChat(bundled, dict(max_new_tokens=2, max_images=0), 0, str(tmp_path), stdin=stdin,
                        stdout=io.StringIO(), stderr=io.StringIO())
    with caplog.at_level("WARNING"):
        assert chat.run() == 0
    assert _unknown_word_warnings(caplog) == ["'Draw'", "'Draw'"]


def test_varied_given_images_only_at_their_rate_and_never_as_targets(tmp_path):
    import os

    from PIL import Image

    from training.interleaved import read_documents
    from training.shapes.train_world_gill import write_context_documents
    from training.shapes.world import BACKGROUND

    def corners(folder, varied_rate):
        path = write_context_documents(str(folder), "context", 18, seed=0, kinds=("image", "dialogue", "describe"),
                                       phrasings="training", vary_rate=varied_rate)
        given, targets = [], []
        for _, segments in read_documents(path):
            for s in segments:
                if "image" in s:
                    pixel = Image.open(os.path.join(folder, s["image"])).convert("RGB").getpixel((0, 0))
                    (targets if s.get("target", True) else given).append(pixel)
        return path, given, targets

    plain_path, given, targets = corners(tmp_path / "plain", 0.0)
    assert set(given) == set(targets) == {BACKGROUND}
    varied_path, given, targets = corners(tmp_path / "varied", 0.6)
    assert set(targets) == {BACKGROUND}  # what the model writes is always the world's own drawing
    assert 0 < sum(p != BACKGROUND for p in given) < len(given)
    assert len(read_documents(varied_path)) == len(read_documents(plain_path)) == 18


@pytest.mark.parametrize("option", ["--dialogue-reword", "--vary-given-images", "--vary-clip-images"])
@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_retrain_refuses_a_bad_share_before_any_stage_runs(tmp_path, option, value, capsys):
    from training.shapes.retrain_all import main

    with pytest.raises(SystemExit):
        main(["--work", str(tmp_path / "work"), option, value])
    assert f"{option} must be in [0, 1], got {float(value)}" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing was written: the base models never started


def test_clip_refinement_images_are_the_worlds_at_rate_0_and_varied_at_their_rate():
    from training.shapes.models import SIZES
    from training.shapes.pretrain_base import world_images
    from training.shapes.world import BACKGROUND, draw, training_scenes

    scenes = training_scenes()[:40]
    rng = random.Random(7)
    seeds = [rng.randrange(1 << 30) for _ in scenes]  # the world's own drawings: one seed each from the rng, jitter 1
    plain = [np.asarray(draw(s, SIZES.image_size, 1, seed)) for s, seed in zip(scenes, seeds)]
    assert all((a == np.asarray(b)).all() for a, b in zip(plain, world_images(scenes, 7)))
    assert all((a == np.asarray(b)).all() for a, b in zip(plain, world_images(scenes, 7, vary_rate=0.0)))
    corners = [image.getpixel((0, 0)) for image in world_images(scenes, 7, vary_rate=0.5)]
    assert 5 < sum(c != BACKGROUND for c in corners) < 35


@pytest.mark.parametrize("value", ["-0.5", "2", "nan"])
def test_pretrain_base_refuses_a_bad_clip_share_before_any_stage_runs(tmp_path, value, capsys):
    from training.shapes.pretrain_base import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "base"), "--vary-clip-images", value])
    assert f"--vary-clip-images must be in [0, 1], got {float(value)}" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()
