"""tools/dialogue_transcript.py: the README's example conversation on the bundled model, as a PNG strip."""

import PIL.Image
import pytest

from gill_pipeline.bundled import bundle_available
from tools import dialogue_transcript


@pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world model is not installed")
def test_the_readme_conversation_is_right_at_every_turn_and_drawn_as_a_strip(tmp_path):
    png, md = tmp_path / "d.png", tmp_path / "d.md"
    records = dialogue_transcript.main(["--png", str(png), "--md", str(md)])
    turns = dialogue_transcript.README_CONVERSATION.turns
    assert [r["target"] for r in records] == [t.target.caption() for t in turns]
    assert all(r["words_right"] and r["image_right"] for r in records), records
    # An image for every request, none for the question.
    assert [r["image"] is not None for r in records] == [t.wants_image for t in turns]
    with PIL.Image.open(png) as strip:
        assert strip.width > 500 and strip.height >= 4 * 32 * dialogue_transcript.SCALE
    text = md.read_text()
    assert text.count("gill> ") == len(turns) and "words WRONG" not in text and "d.png" in text


@pytest.mark.parametrize("option", ["--pipeline", "--index", "--classifier"])
def test_a_folder_that_is_not_there_is_named_before_anything_loads(option, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("gill_pipeline.bundled.load_bundled_pipeline", no_load)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_info:
        dialogue_transcript.main([option, missing, "--png", str(tmp_path / "d.png")])
    assert exit_info.value.code == 2
    assert f"{option} must be a folder, got {missing!r}" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()
