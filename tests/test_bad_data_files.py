"""`gill evaluate` on imperfect data files (issue 22): every malformed file, row or field is one line naming the file,
the row and the field (exit code 2), found before any model is loaded; a resumed run's unreadable records and
embedding shards are left out, counted and redone.

Each case starts from a good file in its dataset's format (training/shapes/protocol_data.py) and breaks one thing.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import header_bomb_png
from gill_pipeline.commands import evaluate as evaluate_command
from gill_pipeline.commands import main
from gill_pipeline.evaluation.records import EMBEDDINGS_DIR, RECORDS_FILE, EmbeddingStore, RecordLog
from training.shapes.protocol_data import write_cc3m, write_coco, write_decisions, write_visdial, write_vist
from training.shapes.world import training_scenes

SCENES = [s for s in training_scenes() if s.shape != "triangle"][:4]


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _write_text(path, text: str | bytes):
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def _vist_annotation(data, **change):
    # The first annotation in file order (the writer shuffles them), changed.
    data["annotations"][0][0].update(change)
    for key, value in change.items():
        if value is None:
            del data["annotations"][0][0][key]


def vist(folder, edit=None):
    path = write_vist(folder, [SCENES[:3]])
    return path if edit is None else _edit_json(path, edit)


def visdial(folder, edit=None):
    path = write_visdial(folder, SCENES[:2])
    return path if edit is None else _edit_json(path, edit)


def cc3m(folder, lines=None):
    path = write_cc3m(folder, SCENES[:2])  # lines 2 and 3: "caption<TAB>0_1000", "caption<TAB>1_1001"
    return path if lines is None else _write_text(path, "caption\timage\n" + "".join(line + "\n" for line in lines))


def coco(folder, edit=None):
    path = write_coco(folder, SCENES[:2])
    return path if edit is None else _edit_json(path, edit)


def decisions(folder, text=None):
    path = write_decisions(folder, SCENES[:2])
    return path if text is None else _write_text(path, text)


def _del(data, *keys):
    for key in keys[:-1]:
        data = data[key]
    del data[keys[-1]]


def _set(data, *keys_and_value):
    *keys, value = keys_and_value
    for key in keys[:-1]:
        data = data[key]
    data[keys[-1]] = value


NOT_UTF8 = b"caption\timage\nun caf\xe9\t0_1000\n"
# (case id, protocol, writer(folder) -> data file, extra arguments, what the one-line error must contain)
CASES = [
    # VIST
    ("vist-no-order", "vist", lambda d: vist(d, lambda x: _vist_annotation(x, worker_arranged_photo_order=None)), [],
     ["annotations[0][0]", "field `worker_arranged_photo_order`", "is missing"]),
    ("vist-order-not-int", "vist", lambda d: vist(d, lambda x: _vist_annotation(x, worker_arranged_photo_order="x")), [],
     ["annotations[0][0]", "field `worker_arranged_photo_order`", "must be an integer"]),
    ("vist-no-text", "vist", lambda d: vist(d, lambda x: _vist_annotation(x, text="  ")), [],
     ["annotations[0][0]", "field `text`", "non-empty text"]),
    ("vist-empty-object", "vist", lambda d: vist(d, lambda x: _set(x, "annotations", 1, {})), [],
     ["annotations[1]", "field `story_id`", "is missing"]),
    ("vist-list-of-two", "vist", lambda d: vist(d, lambda x: _set(x, "annotations", 0, [1, 2])), [],
     ["annotations[0]", "one annotation, got 2"]),
    ("vist-number-entry", "vist", lambda d: vist(d, lambda x: _set(x, "annotations", 0, [7])), [],
     ["annotations[0][0]", "expected an object, got 7"]),
    ("vist-no-annotations", "vist", lambda d: vist(d, lambda x: _del(x, "annotations")), [], ["field `annotations`"]),
    ("vist-empty", "vist", lambda d: vist(d, lambda x: _set(x, "annotations", [])), [], ["has no VIST stories"]),
    ("vist-escaping-id", "vist", lambda d: vist(d, lambda x: _vist_annotation(x, photo_flickr_id="../outside")), [],
     ["annotations[0][0]", "field `photo_flickr_id`", "'../outside.jpg' is outside the image folder"]),
    ("vist-all-images-missing", "vist", vist, ["--image-pattern", "img_{id}.jpg"],
     ["none of its 1 VIST stories has its images", "--image-pattern"]),
    ("vist-bad-pattern", "vist", vist, ["--image-pattern", "{idx}.jpg"], ["`image_pattern` (--image-pattern)", "{idx}.jpg"]),
    ("vist-too-few-steps", "vist", vist, ["--num-captions", "5"], ["no story has 5 steps (the longest has 3)"]),
    ("vist-not-json", "vist", lambda d: _write_text(os.path.join(d, "s.json"), '{"annotations": [\n  [{]]}'), [],
     ["s.json, line 2, column", "is not valid JSON"]),
    # VisDial
    ("visdial-no-image-id", "visdial", lambda d: visdial(d, lambda x: _del(x, "data", "dialogs", 1, "image_id")), [],
     ["data.dialogs[1]", "field `image_id`", "is missing"]),
    ("visdial-question-out-of-range", "visdial",
     lambda d: visdial(d, lambda x: _set(x, "data", "dialogs", 0, "dialog", 1, "question", 99)), [],
     ["data.dialogs[0].dialog[1]", "field `question`", "is 99, outside the list it indexes (0..1)"]),
    ("visdial-negative-answer", "visdial",
     lambda d: visdial(d, lambda x: _set(x, "data", "dialogs", 1, "dialog", 0, "answer", -1)), [],
     ["data.dialogs[1].dialog[0]", "field `answer`", "is -1"]),
    ("visdial-no-caption", "visdial", lambda d: visdial(d, lambda x: _set(x, "data", "dialogs", 0, "caption", None)), [],
     ["data.dialogs[0]", "field `caption`"]),
    ("visdial-list-entry", "visdial", lambda d: visdial(d, lambda x: _set(x, "data", "dialogs", 0, [1, 2])), [],
     ["data.dialogs[0]", "expected an object, got [1, 2]"]),
    ("visdial-no-data", "visdial", lambda d: visdial(d, lambda x: _del(x, "data")), [], ["field `data`"]),
    ("visdial-empty", "visdial", lambda d: visdial(d, lambda x: _set(x, "data", "dialogs", [])), [],
     ["has no VisDial dialogues"]),
    ("visdial-id-not-in-pattern", "visdial", lambda d: visdial(d, lambda x: _set(x, "data", "dialogs", 0, "image_id", "a")),
     [], ["data.dialogs[0]", "field `image_id`", "the id 'a' does not fit --image-pattern"]),
    ("visdial-absolute-pattern", "visdial", visdial, ["--image-pattern", "/etc/{id}"],
     ["data.dialogs[0]", "field `image_id`", "'/etc/1' is outside the image folder"]),
    ("visdial-two-fields-pattern", "visdial", visdial, ["--image-pattern", "{id}_{0}.jpg"], ["--image-pattern"]),
    ("visdial-unbalanced-pattern", "visdial", visdial, ["--image-pattern", "{id.jpg"], ["--image-pattern", "not a valid"]),
    # CC3M captions (retrieval and text-to-image read the same files)
    ("cc3m-empty-caption", "retrieval", lambda d: cc3m(d, ["a red circle\t0_1000", "\t1_1001"]), [],
     ["line 3", "field `caption`", "non-empty text"]),
    ("cc3m-no-tab", "text-to-image", lambda d: cc3m(d, ["a red circle"]), [], ["line 2", "field `image`", "fewer cells"]),
    ("cc3m-no-image", "retrieval", lambda d: cc3m(d, ["a red circle\t"]), [], ["line 2", "field `image`"]),
    ("cc3m-header-only", "text-to-image", lambda d: cc3m(d, []), [], ["has no caption rows"]),
    ("cc3m-repeated-id", "retrieval", lambda d: cc3m(d, ["a\t0_1000", "b\t0_1000"]), [],
     ["line 3", "repeats the id '0_1000' of line 2"]),
    ("cc3m-escaping-id", "text-to-image", lambda d: cc3m(d, ["a\t0_1000", "b\t../../x"]), [],
     ["line 3", "field `image`", "outside the image folder"]),
    ("cc3m-not-utf8", "retrieval", lambda d: _write_text(os.path.join(d, "c.tsv"), NOT_UTF8), [],
     ["c.tsv, line 2", "is not UTF-8 text (byte 0xe9)"]),
    ("cc3m-bad-header", "retrieval", lambda d: cc3m(d) and _write_text(os.path.join(d, "h.tsv"), "text\tfile\nx\ty\n"), [],
     ["h.tsv, line 1", "`caption<TAB>image`"]),
    ("cc3m-all-images-missing", "text-to-image", cc3m, ["--image-pattern", "{id}_missing"],
     ["none of its 2 caption rows has its images", "--images"]),
    # COCO captions
    ("coco-empty-annotation", "retrieval", lambda d: coco(d, lambda x: _set(x, "annotations", 2, {})), ["--format", "coco"],
     ["annotations[2]", "field `image_id`", "is missing"]),
    ("coco-no-file-name", "text-to-image", lambda d: coco(d, lambda x: _del(x, "images", 1, "file_name")),
     ["--format", "coco"], ["images[1]", "field `file_name`"]),
    ("coco-absolute-file-name", "retrieval", lambda d: coco(d, lambda x: _set(x, "images", 0, "file_name", "/etc/hosts")),
     ["--format", "coco"], ["images[0]", "field `file_name`", "'/etc/hosts' is outside the image folder"]),
    ("coco-list-file", "retrieval", lambda d: _write_text(os.path.join(d, "c.json"), "[1, 2]"), ["--format", "coco"],
     ["c.json", "needs the lists `images` and `annotations`"]),
    # PartiPrompts decisions
    ("decision-empty-prompt", "decision", lambda d: decisions(d, "Prompt\tCategory\tDecision\nbond\tAbstract\tret\n"
                                                             "\tAbstract\tgen\n"), [], ["line 3", "field `Prompt`"]),
    ("decision-unknown-vote", "decision", lambda d: decisions(d, "Prompt\tDecisions\nbond\tret,generate,gen\n"), [],
     ["line 2", "field `Decisions`", "the vote 'generate'"]),
    ("decision-no-vote", "decision", lambda d: decisions(d, "Prompt\tDecision\nbond\t\n"), [], ["line 2", "field `Decision`"]),
    ("decision-no-decision-column", "decision", lambda d: decisions(d, "Prompt\tCategory\nbond\tAbstract\n"), [],
     ["line 1", "`Decision` or `Decisions`"]),
    ("decision-header-only", "decision", lambda d: decisions(d, "Prompt\tDecision\n"), [], ["has no prompts"]),
    ("decision-not-utf8", "decision", lambda d: decisions(d, b"Prompt\tDecision\nbond\tret\n\xff\xfe\tgen\n"), [],
     ["line 3", "is not UTF-8"]),
]

DATA_FLAG = {"vist": "--stories", "visdial": "--dialogs", "retrieval": "--captions", "text-to-image": "--captions",
             "decision": "--decisions"}


def _refuse_models(monkeypatch):
    def not_loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the data file was checked")

    monkeypatch.setattr(evaluate_command, "load_model", not_loaded)
    monkeypatch.setattr(evaluate_command.ImageEmbedder, "from_pretrained", not_loaded)


@pytest.mark.parametrize("protocol, write, extra, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_data_file_is_one_line_naming_file_row_and_field(protocol, write, extra, expected, tmp_path, capsys,
                                                               monkeypatch):
    _refuse_models(monkeypatch)
    folder = str(tmp_path / "data")
    os.makedirs(folder)
    path = write(folder)
    argv = ["evaluate", protocol, "--model", "tiny-random", DATA_FLAG[protocol], path, "--output-dir",
            str(tmp_path / "out"), *extra]
    if protocol != "decision":
        argv += ["--images", folder]
    if protocol == "vist":
        argv += ["--clip", str(tmp_path / "clip")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gill evaluate: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert os.path.basename(path) in err or "--image-pattern" in err, err
    for text in expected:
        assert text in err, err


def test_every_protocol_has_bad_file_cases():
    assert {c[1] for c in CASES} == set(DATA_FLAG)


def test_an_image_above_the_pixel_limit_stops_the_run_naming_it(tmp_path, opt_pipe, monkeypatch, capsys):
    # Images are decoded while the run goes (records so far are kept): one line naming the file and the limit.
    folder = str(tmp_path / "data")
    path = cc3m(folder)
    header_bomb_png(os.path.join(folder, "1_1001.png"))
    monkeypatch.setattr(evaluate_command, "load_model", lambda args: opt_pipe)
    argv = ["evaluate", "retrieval", "--model", "tiny-random", "--captions", path, "--images", folder,
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1_1001.png is 20000x20000 pixels" in err and "above the limit of 67,108,864 pixels" in err
    assert err.count("\n") == 1
    assert main(argv + ["--max-image-pixels", "100"]) == 2  # and the limit is the user's
    assert "above the limit of 100 pixels" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# What a resumed run reads back from its output folder
# ---------------------------------------------------------------------------------------------------------------
def test_records_that_are_not_records_are_ignored_counted_and_redone(tmp_path):
    good = {"id": "a", "system": "gill", "rank": 1}
    lines = [json.dumps(good), "{}", "[1, 2]", '{"id": "b", "system": "gill"}', '{"id": 3, "system": "gill", "rank": 1}',
             '{"id": "c", "sys']
    (tmp_path / RECORDS_FILE).write_text("\n".join(lines) + "\n")
    log = RecordLog(str(tmp_path), fields=("rank",))
    assert log.records == [good] and log.ignored == 5 and log.done == {("a", "gill")}


def test_a_corrupt_settings_file_is_named(tmp_path):
    from gill_pipeline.evaluation.records import check_settings

    (tmp_path / "settings.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="settings.json is not the settings file of a run"):
        check_settings(str(tmp_path), {"protocol": "decision"})
    (tmp_path / "settings.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="settings.json is not the settings file of a run"):
        check_settings(str(tmp_path), {"protocol": "decision"})


def test_truncated_embedding_shards_are_ignored_counted_and_recomputed(tmp_path):
    calls = []

    def embed(items):
        calls.append(list(items))
        return torch.tensor([[float(i), 1.0] for i in items])

    store = EmbeddingStore(str(tmp_path))
    first = store.compute("gill_images", ["a", "b", "c"], [1, 2, 3], embed, batch_size=2, progress=False)
    folder = os.path.join(tmp_path, EMBEDDINGS_DIR, "gill_images")
    # Shards are named by the ids of the rows they hold.
    shard = os.path.join(folder, EmbeddingStore.shard_name(["a", "b"]) + ".safetensors")
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])  # cut short
    os.remove(os.path.join(folder, EmbeddingStore.shard_name(["c"]) + ".json"))  # a shard without its ids
    calls.clear()
    again = EmbeddingStore(str(tmp_path))
    second = again.compute("gill_images", ["a", "b", "c"], [1, 2, 3], embed, batch_size=2, progress=False)
    assert again.ignored == 2 and calls == [[1, 2], [3]]
    torch.testing.assert_close(first, second)
    with pytest.raises(ValueError, match="Nothing to embed"):
        again.compute("gill_images", [], [], embed, batch_size=2, progress=False)


def _embed_counting(calls):
    def embed(items):
        calls.append(list(items))
        return torch.tensor([[float(i), 1.0, -float(i)] for i in items])

    return embed


def test_embedding_shards_are_reused_only_for_the_rows_they_were_made_for(tmp_path):
    ids, items = ["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5]
    clean = EmbeddingStore(str(tmp_path / "clean")).compute("k", ids, items, _embed_counting([]), 2, progress=False)
    store = EmbeddingStore(str(tmp_path / "run"))
    store.compute("k", ids, items, _embed_counting([]), batch_size=2, progress=False)
    folder = tmp_path / "run" / EMBEDDINGS_DIR / "k"
    ab, cd, e = (EmbeddingStore.shard_name(x) for x in (["a", "b"], ["c", "d"], ["e"]))
    assert sorted(os.listdir(folder)) == sorted(f"{n}.{x}" for n in (ab, cd, e) for x in ("json", "safetensors"))
    # A json cut short; a shard whose embeddings are another shard's (same row count: what a reuse of a name by
    # position could leave); a shard of an older version (a bare list of ids, no commit marker); a worker's leftover.
    (folder / f"{ab}.json").write_text((folder / f"{ab}.json").read_text()[:20])
    other = EmbeddingStore(str(tmp_path / "other"))
    other.compute("k", ["x", "y"], [8, 9], _embed_counting([]), batch_size=2, progress=False)
    xy = EmbeddingStore.shard_name(["x", "y"])
    shutil.copyfile(tmp_path / "other" / EMBEDDINGS_DIR / "k" / f"{xy}.safetensors", folder / f"{cd}.safetensors")
    save_file({"embeddings": torch.zeros(1, 3)}, str(folder / "rows-000000004-000001.safetensors"))
    (folder / "rows-000000004-000001.json").write_text(json.dumps(["e"]))
    (folder / f"{e}.safetensors.tmp123").write_bytes(b"half")
    calls = []
    again = EmbeddingStore(str(tmp_path / "run"))
    # Another order: the shards still serve the ids they were made for, and only those.
    order = [4, 3, 2, 1, 0]
    result = again.compute("k", [ids[i] for i in order], [items[i] for i in order], _embed_counting(calls), 2,
                           progress=False)
    assert again.ignored == 3
    assert sorted(sum(calls, [])) == [1, 2, 3, 4]  # "e" came from its shard; a..d were computed again
    torch.testing.assert_close(result, clean[order], atol=0, rtol=0)
    calls.clear()
    third = EmbeddingStore(str(tmp_path / "run"))
    torch.testing.assert_close(third.compute("k", ids, items, _embed_counting(calls), 2, progress=False), clean)
    # The shards written for (d, c) and (b, a) serve this order too; the three broken ones are still left out.
    assert calls == [] and third.ignored == 3


def test_a_worker_killed_between_the_embeddings_and_their_ids_leaves_no_shard(tmp_path, monkeypatch):
    from gill_pipeline.evaluation import records

    ids, items = ["a", "b", "c"], [1, 2, 3]
    clean = EmbeddingStore(str(tmp_path / "clean")).compute("k", ids, items, _embed_counting([]), 1, progress=False)
    real_write, written = records.atomic_write_text, []

    def killed(path, text):
        if written:
            raise KeyboardInterrupt  # killed after the second shard's embeddings, before its ids file
        written.append(path)
        real_write(path, text)

    monkeypatch.setattr(records, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        EmbeddingStore(str(tmp_path / "run")).compute("k", ids, items, _embed_counting([]), 1, progress=False)
    monkeypatch.setattr(records, "atomic_write_text", real_write)
    folder = tmp_path / "run" / EMBEDDINGS_DIR / "k"
    assert not [f for f in os.listdir(folder) if ".tmp" in f]
    calls = []
    store = EmbeddingStore(str(tmp_path / "run"))
    torch.testing.assert_close(store.compute("k", ids, items, _embed_counting(calls), 1, progress=False), clean)
    assert calls == [[2], [3]] and store.ignored == 1
