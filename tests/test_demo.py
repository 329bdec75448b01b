"""`gill chat` and the `gill demo` page's callbacks, on the tiny random pipeline and the bundled model (no browser:
see test_demo_browser.py)."""

import importlib.util
import io
import os
import re
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import random_image
from gill_pipeline.bundled.presets import SHAPES_MODEL, example_image
from gill_pipeline.bundled import bundle_available
from gill_pipeline.commands import build_parser, main
from gill_pipeline.commands.chat import TerminalChat, parse_line
from gill_pipeline.commands.chat import main as chat_main
from gill_pipeline.commands.options import CLIError
from gill_pipeline.demo import ChatBackend
from gill_pipeline.demo.rendering import DISPLAY_MIN_SIZE, describe_image, save_for_display
from gill_pipeline.demo.settings import call_defaults, call_kwargs, preset_settings
from gill_pipeline.pipeline import GILLConversation, GILLImage

# The tiny random model's preset makes an image likely after a few words; 2 steps and 6 tokens keep turns short.
TINY = dict(steps=2, max_new_tokens=6)
IMAGE_LINE = re.compile(r"\[image: (\S+) \((?:alternative: )?(generated|retrieved) image, p\(generate\)=(\d\.\d\d), p\(retrieve\)=(\d\.\d\d)")


def page_settings(**changes):
    # The page's settings, in the order `answer` takes them: image mode, steps, guidance, seed, max tokens.
    values = dict(image_mode="generate", steps=2.0, guidance_scale=7.5, seed=0.0, max_new_tokens=6.0) | changes
    return list(values.values())


@pytest.fixture
def upload(tmp_path):
    path = tmp_path / "my dog.png"
    random_image(seed=1, size=32).save(path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# The page's callbacks
# ----------------------------------------------------------------------------------------------------------------
def test_a_turn_streams_into_the_chat_history(opt_pipe, upload, tmp_path):
    backend = ChatBackend(opt_pipe, model="tiny-random", settings=TINY, images_dir=str(tmp_path / "shown"))
    os.makedirs(backend.images_dir)
    history, box, pending = backend.user_message({"text": " This is my dog. ", "files": [upload]}, [])
    assert box is None and pending == {"text": "This is my dog.", "files": [upload]}
    assert history == [{"role": "user", "content": {"path": upload}}, {"role": "user", "content": "This is my dog."}]

    steps = list(backend.answer(pending, history, None, *page_settings()))
    statuses = [status for _, _, status in steps]
    assert statuses[0] == "Thinking..." and re.fullmatch(r"Answered in \d+\.\d s\.", statuses[-1])
    final, conversation = steps[-1][0], steps[-1][1]
    assert final[:2] == history
    # The conversation holds the turn; its answer is what the page shows, text and image in order.
    user, answer = conversation.messages
    assert user["role"] == "user" and answer["role"] == "assistant"
    shown = final[2:]
    texts = [part["text"] for part in answer["content"] if part["type"] == "text"]
    images = [part for part in answer["content"] if part["type"] == "image"]
    assert images and images[0]["source"] == "generated"
    assert [e["content"] for e in shown if isinstance(e["content"], str) and not e["content"].startswith("*")] == texts
    files = [e["content"] for e in shown if isinstance(e["content"], dict)]
    p_generate, p_retrieve = images[0]["decision_probs"]
    description = f"generated image, p(generate)={p_generate:.2f}, p(retrieve)={p_retrieve:.2f}"
    assert files[0]["alt_text"] == description and {"role": "assistant", "content": f"*{description}*"} in shown
    with PIL.Image.open(files[0]["path"]) as on_page:
        assert min(on_page.size) >= DISPLAY_MIN_SIZE
    # The first turn answers as the pipeline does for the same input and settings.
    direct = opt_pipe(
        [random_image(seed=1, size=32), "This is my dog."],
        **call_kwargs({**preset_settings("tiny-random"), **TINY, "image_mode": "generate"}, seed=0),
    )
    assert "".join(texts) == direct.texts[0]
    # Streaming: the history only grows, never rewrites what was shown.
    for (before, _, _), (after, _, _) in zip(steps, steps[1:]):
        assert len(after) >= len(before)


def test_the_next_turn_continues_the_conversation_and_reset_forgets_it(opt_pipe, tmp_path):
    backend = ChatBackend(opt_pipe, model="tiny-random", settings=TINY, images_dir=str(tmp_path))
    history, conversation = [], None
    for text in ("Hello.", "And now?"):
        history, _, pending = backend.user_message({"text": text, "files": []}, history)
        *_, (history, conversation, _) = backend.answer(pending, history, conversation, *page_settings())
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[2]["content"][0]["text"] == "And now?"
    assert backend.reset() == ([], None, "", None)


def test_an_empty_box_sends_nothing(opt_pipe, tmp_path):
    backend = ChatBackend(opt_pipe, images_dir=str(tmp_path))
    history = [{"role": "user", "content": "earlier"}]
    assert backend.user_message({"text": "   ", "files": []}, history) == (history, None, None)
    assert list(backend.answer(None, history, None, *page_settings())) == [(history, None, "")]


def test_bad_settings_and_uploads_are_named(opt_pipe, tmp_path):
    backend = ChatBackend(opt_pipe, images_dir=str(tmp_path))
    pending = {"text": "hi", "files": []}
    with pytest.raises(ValueError, match=r"`seed` must be a whole number, got 1\.5"):
        list(backend.answer(pending, [], None, *page_settings(seed=1.5)))
    # The pipeline's own check, raised in the worker thread, reaches the page's thread.
    with pytest.raises(ValueError, match="image_mode"):
        list(backend.answer(pending, [], None, *page_settings(image_mode="sometimes")))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read the uploaded image 'broken.png'"):
        list(backend.answer({"text": "", "files": [str(broken)]}, [], None, *page_settings()))
    with pytest.raises(ValueError, match="`settings\\['image_mode'\\]`"):
        ChatBackend(opt_pipe, settings={"image_mode": "sometimes"})
    with pytest.raises(ValueError, match="unknown options \\['num_steps'\\]"):
        ChatBackend(opt_pipe, settings={"num_steps": 3})


def test_page_defaults_follow_the_preset_then_the_user():
    class NoPipe:  # the defaults never touch the pipeline
        pass

    bundled = ChatBackend(NoPipe(), model="shapes-world").page_defaults()
    assert bundled == dict(image_mode="both", steps=20, guidance_scale=5.0, max_new_tokens=8, seed=0)
    other = ChatBackend(NoPipe(), model="someone/gill", settings={"steps": 3, "seed": 7}).page_defaults()
    defaults = call_defaults()
    assert other == dict(
        image_mode=defaults["image_mode"], steps=3, guidance_scale=defaults["guidance_scale"],
        max_new_tokens=defaults["max_new_tokens"], seed=7,
    )


def test_call_kwargs_names_pipeline_arguments_and_seeds_each_turn():
    kwargs = call_kwargs({"steps": 3, "image_mode": "both"}, seed=5)
    assert kwargs["num_inference_steps"] == 3 and kwargs["image_mode"] == "both"
    again = call_kwargs({}, seed=5)["generator"]
    assert torch.equal(torch.rand(4, generator=kwargs["generator"]), torch.rand(4, generator=again))
    with pytest.raises(ValueError, match="unknown options \\['num_steps'\\]"):
        call_kwargs({"num_steps": 3})


def test_images_are_described_and_enlarged_without_invented_detail(tmp_path):
    small = random_image(seed=2, size=32)
    image = GILLImage(image=small, source="retrieved", decision_probs=(0.25, 0.75), metadata={"caption": "a red dot"})
    assert describe_image(image) == "retrieved image, p(generate)=0.25, p(retrieve)=0.75, retrieved caption 'a red dot'"
    assert describe_image(GILLImage(image=small, source="generated")) == "generated image"
    with PIL.Image.open(save_for_display(small, str(tmp_path), "x")) as shown:
        big = np.asarray(shown)
    factor = -(-DISPLAY_MIN_SIZE // 32)
    assert big.shape == (32 * factor, 32 * factor, 3)
    np.testing.assert_array_equal(big, np.asarray(small).repeat(factor, 0).repeat(factor, 1))
    with pytest.raises(TypeError, match="output_type='pil'"):
        save_for_display(np.asarray(small), str(tmp_path), "y")


# ----------------------------------------------------------------------------------------------------------------
# gill chat
# ----------------------------------------------------------------------------------------------------------------
def test_parse_line_reads_image_paths_in_place(upload, tmp_path):
    assert parse_line(upload)[0].size == (32, 32)  # a whole line that is a path, spaces and all
    other = tmp_path / "snow.png"
    random_image(seed=4).save(other)
    content = parse_line(f"  This is  him: {other} in the snow. ")
    assert content[0] == "This is him:" and content[2] == "in the snow."
    assert isinstance(content[1], PIL.Image.Image)
    with pytest.raises(CLIError, match="image file not found: nowhere.png"):
        parse_line("look at nowhere.png")


def test_chat_cli_on_the_tiny_random_model(upload, tmp_path, monkeypatch, capsys):
    other = tmp_path / "snow.png"
    random_image(seed=4).save(other)
    lines = [
        upload,
        f"This is my dog. {other} Show me him in the snow.",
        "/bogus",
        "missing.png",
        "/tmp/no/such/image.png",
        "/reset",
        "Hello again.",
        "/quit",
        "never read",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out_dir = tmp_path / "chat"
    assert chat_main(["--model", "tiny-random", "--steps", "2", "--max-new-tokens", "6", "--output-dir", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.count("gill> ") == 3 and "(conversation reset)" in out
    written = IMAGE_LINE.findall(out)
    assert written, out
    for path, source, p_generate, p_retrieve in written:
        assert os.path.isfile(path) and os.path.basename(path).startswith("turn") and source == "generated"
        assert abs(float(p_generate) + float(p_retrieve) - 1) <= 0.011
    errors = [line for line in err.splitlines() if line.startswith("gill chat: error:")]
    assert [e.split(": ", 2)[2][:32] for e in errors] == [
        "unknown command '/bogus'; Comman", "image file not found: missing.pn", "image file not found: /tmp/no/su"
    ]


def test_chat_session_reset_and_end_of_input(opt_pipe, tmp_path):
    settings = {**preset_settings("tiny-random"), **TINY}
    stdin, stdout, stderr = io.StringIO("First.\n/reset\nSecond.\n"), io.StringIO(), io.StringIO()
    chat = TerminalChat(opt_pipe, settings, 0, str(tmp_path), stdin=stdin, stdout=stdout, stderr=stderr)
    assert chat.run() == 0  # end of input quits
    # After /reset only the last turn is remembered.
    assert [m["role"] for m in chat.conversation.messages] == ["user", "assistant"]
    assert chat.conversation.messages[0]["content"][0]["text"] == "Second."
    assert stderr.getvalue() == ""


def test_a_user_error_in_a_turn_is_one_line_and_any_other_ends_the_chat(opt_pipe, tmp_path, monkeypatch):
    failures = iter([ValueError("`max_images` must be a non-negative integer, got -1."), RuntimeError("CUDA out of memory")])

    def answer(self, content):
        raise next(failures)

    monkeypatch.setattr(TerminalChat, "_answer", answer)
    settings = {**preset_settings("tiny-random"), **TINY}
    stdin, stdout, stderr = io.StringIO("First.\nSecond.\nNever read.\n"), io.StringIO(), io.StringIO()
    chat = TerminalChat(opt_pipe, settings, 0, str(tmp_path), stdin=stdin, stdout=stdout, stderr=stderr)
    # The user error is one line and the chat goes on; out of memory is no user error: it leaves the chat (and
    # `gill chat` prints its traceback, exit code 1).
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        chat.run()
    assert stderr.getvalue() == "gill chat: error: `max_images` must be a non-negative integer, got -1.\n"
    assert stdin.readline() == "Never read.\n"


@pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world model is not installed")
def test_chat_cli_on_the_bundled_model(tmp_path, monkeypatch, capsys):
    """The README's example conversation through `gill chat`: every turn's words are exactly the answer's caption and
    the image shown is the answer, judged by the world's classifier; the last turn asks for words only."""
    from gill_pipeline.bundled import BUNDLED_CLASSIFIER
    from training.shapes.classifier import AttributeClassifier
    from training.shapes.world import Scene

    example = tmp_path / "example.png"
    example_image(SHAPES_MODEL).save(example)
    turns = [
        ("now the same shape in blue :", Scene("circle", "blue", "left", "small")),
        ("now make it large :", Scene("circle", "blue", "left", "large")),
        ("now a triangle :", Scene("triangle", "blue", "left", "large")),
        ("what is it now ?", None),  # words only: the scene of the turn before
    ]
    lines = [f"{example} {turns[0][0]}"] + [text for text, _ in turns[1:]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert chat_main(["--steps", "20", "--output-dir", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "error" not in err, err
    answers = [line[len("gill> "):].strip() for line in out.splitlines() if line.startswith("gill> ")]
    targets = [scene or turns[i - 1][1] for i, (_, scene) in enumerate(turns)]
    assert [a.removesuffix(" .") for a in answers] == [t.caption() for t in targets], out
    # Image mode "both": the decision head's pick and, as the alternative, the other kind, for the three requests;
    # none for the question.
    written = IMAGE_LINE.findall(out)
    assert len(written) == 6 and {source for _, source, _, _ in written} == {"generated", "retrieved"}, out
    assert all(os.path.isfile(path) for path, *_ in written)
    shown = [path for path, *_ in written if "alternative" not in os.path.basename(path)]
    assert len(shown) == 3, written
    classifier = AttributeClassifier.from_pretrained(BUNDLED_CLASSIFIER).eval()
    pixels = torch.stack([torch.from_numpy(np.asarray(PIL.Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32)).permute(2, 0, 1) / 255 for p in shown])
    assert classifier.predict(pixels).tolist() == [list(t.labels()) for t in targets[:3]], (shown, out)
    assert "\n\n" not in out


@pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world model is not installed")
def test_a_streamed_turn_reports_denoising_progress_before_the_image():
    from gill_pipeline.bundled import load_bundled_pipeline
    from gill_pipeline.demo.streaming import stream_turn

    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = {**preset_settings(SHAPES_MODEL), "steps": 40, "image_mode": "generate"}
    content = [example_image(SHAPES_MODEL), "now a triangle :"]
    # A short poll (the default is 0.2 s) sees the progress of even a fast denoising loop.
    events = list(stream_turn(GILLConversation(pipe), content, pipe.tokenizer, poll_seconds=0.002, **call_kwargs(settings)))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and "image" in kinds and "text" in kinds
    progress = [e.value for e in events if e.kind == "progress"]
    assert progress and all(total == 40 for _, total in progress), progress
    assert [step for step, _ in progress] == sorted(step for step, _ in progress)
    assert kinds.index("progress") < kinds.index("image")


def test_chat_and_demo_are_gill_subcommands(capsys, monkeypatch):
    help_text = build_parser().format_help()
    assert "chat" in help_text and "demo" in help_text
    assert main(["demo", "--port", "70000"]) == 2
    assert main(["chat", "--steps", "0"]) == 2
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    assert main(["demo", "--model", "tiny-random"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and "--port" in errors[0] and "--steps" in errors[1]
    assert errors[2] == (
        "gill demo: error: gradio is not installed; install the demo extra: pip install 'gill-pipeline[demo]'"
    )


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed (the demo extra)")
def test_gill_demo_serves_the_page_offline_on_loopback(monkeypatch, caplog):
    import gradio

    launched = {}

    def record_launch(self, **kwargs):  # gradio's server is exercised by test_demo_browser.py
        launched.update(kwargs, demo=self)
        return None, f"http://{kwargs['server_name']}:{kwargs['server_port']}/", None

    monkeypatch.setattr(gradio.Blocks, "launch", record_launch)
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    from gill_pipeline.commands.demo import main as demo_main

    with caplog.at_level("WARNING"):
        assert demo_main(["--model", "tiny-random", "--port", "7999", "--steps", "3", "--image-mode", "generate"]) == 0
    assert "The GILL demo is served on http://127.0.0.1:7999/" in caplog.text
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["share"] is False and launched["ssr_mode"] is False and launched["inbrowser"] is False
    backend = launched["demo"].gill_backend
    assert launched["allowed_paths"] == [backend.images_dir]
    assert backend.page_defaults()["steps"] == 3 and backend.page_defaults()["image_mode"] == "generate"
    assert not os.path.exists(backend.images_dir), "the display copies are removed when the server stops"
