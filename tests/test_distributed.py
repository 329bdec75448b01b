"""`gill index build`, `gill evaluate` and `gill generate --prompts` as 1 and as N workers (`accelerate launch`, gloo
on the CPU): the same files bit for bit; a killed worker's share redone on the rerun; bad inputs named before any
image is embedded."""

import json
import os
import random

import pytest
import torch

from gill_pipeline.bundled import bundle_available
from gill_pipeline.commands import main
from gill_pipeline.retrieval import RetrievalIndex, build_retrieval_index, parallel_build
from gill_pipeline.retrieval.parallel_build import BUILD_DIR, build_retrieval_set
from gill_pipeline.testing import build_tiny_gill_pipeline
from gill_pipeline.utils.distributed import Workers
from tests.conftest import write_image
from tests.multiprocess_run import run_processes

NUM_IMAGES = 12
# Small batches and parts so that 12 images make 4 parts of 2 batches, split 2/2 (or 1/1/1/1) among the workers.
BUILD_OPTIONS = ["--model", "tiny-random", "--batch-size", "2", "--part-rows", "4", "--read-threads", "0",
                 "--no-progress"]
LAUNCH_TIMEOUT = 600


def files_of(folder) -> dict[str, bytes]:
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 images (some with a caption file) and one that cannot be read, which every build skips alike."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        write_image(folder / f"{i:03d}.png", seed=i)
        if i % 3 == 0:
            (folder / f"{i:03d}.txt").write_text(f"picture {i}")
    (folder / "broken.png").write_bytes(b"not a png")
    return str(folder)


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_tiny_gill_pipeline("opt")  # what `--model tiny-random` builds
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def one_worker_set(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "set")
    assert main(["index", "build", images, "--output-dir", out, *BUILD_OPTIONS]) == 0
    return out


def launch(module: str, args: list[str], num_processes: int):
    result = run_processes(module, args, num_processes, timeout=LAUNCH_TIMEOUT)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 0, "\n".join(errors) or result.stderr[-3000:]
    return result


def test_index_build_on_two_workers_is_bit_identical_to_one(images, one_worker_set, tiny_pipe, tmp_path):
    two = str(tmp_path / "two")
    launch("gill_pipeline", ["index", "build", images, "--output-dir", two, *BUILD_OPTIONS], 2)
    assert files_of(two) == files_of(one_worker_set)
    index = RetrievalIndex.from_pretrained(two, image_root=images)
    assert index.ids == [f"{i:03d}.png" for i in range(NUM_IMAGES)]  # source order; the broken image left out
    assert index.records[3]["caption"] == "picture 3" and index.dtype == torch.float16
    # The same rows as the one-process library call with the same batches.
    reference = build_retrieval_index(tiny_pipe, images, batch_size=2, num_workers=0, progress=False)
    assert reference.ids == index.ids and torch.equal(reference.embeddings, index.embeddings)


@pytest.mark.slow
def test_index_build_on_four_workers_is_bit_identical_to_one(images, one_worker_set, tmp_path):
    four = str(tmp_path / "four")
    launch("gill_pipeline", ["index", "build", images, "--output-dir", four, *BUILD_OPTIONS], 4)
    assert files_of(four) == files_of(one_worker_set)


def test_killed_worker_share_is_redone_and_the_set_is_the_same(images, tiny_pipe, tmp_path, monkeypatch):
    reference = str(tmp_path / "reference")
    kwargs = dict(batch_size=2, part_rows=4, num_workers=0, progress=False)
    build_retrieval_set(tiny_pipe, images, reference, **kwargs)
    out = str(tmp_path / "out")
    embedded, real = [], parallel_build._embed_part

    def killed_in_third_part(pipe, source, planned, *args):
        if len(embedded) == 2:
            raise KeyboardInterrupt  # the worker dies here
        embedded.append(planned[0]["id"])
        return real(pipe, source, planned, *args)

    monkeypatch.setattr(parallel_build, "_embed_part", killed_in_third_part)
    with pytest.raises(KeyboardInterrupt):
        build_retrieval_set(tiny_pipe, images, out, **kwargs)
    build_dir = os.path.join(out, BUILD_DIR)
    assert sorted(n for n in os.listdir(build_dir) if n.endswith(".safetensors")) == [
        "part-000000.safetensors", "part-000001.safetensors"]
    # A half-written part (a copy cut short) is not kept.
    part = os.path.join(build_dir, "part-000001.safetensors")
    with open(part, "rb") as f:
        data = f.read()
    with open(part, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unfinished build of this source"):
        build_retrieval_set(tiny_pipe, images, out, **kwargs)

    embedded.clear()
    monkeypatch.setattr(parallel_build, "_embed_part",
                        lambda pipe, source, planned, *args: embedded.append(planned[0]["id"]) or real(pipe, source, planned, *args))
    index = build_retrieval_set(tiny_pipe, images, out, resume=True, **kwargs)
    assert embedded == ["004.png", "008.png", "broken.png"]  # parts 1 (cut short), 2 and 3; part 0 kept
    assert not os.path.exists(build_dir) and len(index) == NUM_IMAGES
    assert files_of(out) == files_of(reference)
    # A finished set: `resume` finds nothing to do.
    embedded.clear()
    assert build_retrieval_set(tiny_pipe, images, out, resume=True, **kwargs).ids == index.ids and embedded == []


def test_a_worker_embeds_only_its_share(images, tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(Workers, "barrier", lambda self: None)  # the other worker is not running
    out = str(tmp_path / "out")
    result = build_retrieval_set(tiny_pipe, images, out, batch_size=2, part_rows=4, num_workers=0, progress=False,
                                 workers=Workers(rank=1, world_size=2))
    assert result is None
    parts = sorted(n for n in os.listdir(os.path.join(out, BUILD_DIR)) if n.endswith(".safetensors"))
    assert parts == ["part-000002.safetensors", "part-000003.safetensors"]


def test_index_build_reads_a_csv_and_builds_faiss(tmp_path):
    for i in (1, 2):
        write_image(tmp_path / f"{i:03d}.png", seed=i)
    csv = tmp_path / "captions.csv"
    csv.write_text('caption,image\n"a picture, with a comma",001.png\nanother,002.png\n')
    out = str(tmp_path / "out")
    assert main(["index", "build", str(csv), "--output-dir", out, "--faiss", "Flat", *BUILD_OPTIONS]) == 0
    index = RetrievalIndex.from_pretrained(out, image_root=str(tmp_path))
    assert [r["caption"] for r in index.records] == ["a picture, with a comma", "another"]


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_index_build_bad_inputs_are_named_before_any_embedding(images, one_worker_set, tiny_pipe, tmp_path, capsys,
                                                                monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("an image was embedded")

    monkeypatch.setattr(parallel_build, "embed_images", never)
    build = ["index", "build"]
    out = str(tmp_path / "out")
    assert "SOURCE" in error_of(capsys, build + [str(tmp_path / "nowhere"), "--output-dir", out, *BUILD_OPTIONS])
    assert "no such file" in error_of(capsys, build + [str(tmp_path / "none.tsv"), "--output-dir", out, *BUILD_OPTIONS]) \
        or "`tsv_path`" in error_of(capsys, build + [str(tmp_path / "none.tsv"), "--output-dir", out, *BUILD_OPTIONS])
    err = error_of(capsys, build + [images, "--output-dir", out, "--faiss", "IVFbogus", *BUILD_OPTIONS])
    assert "`faiss_factory`='IVFbogus'" in err
    assert "--part-rows" in error_of(capsys, build + [images, "--output-dir", out, *BUILD_OPTIONS, "--part-rows", "0"])
    assert "--model" in error_of(capsys, build + [images, "--output-dir", out])  # required: no toy default
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    assert "holds no image" in error_of(capsys, build + [str(empty_folder), "--output-dir", out, *BUILD_OPTIONS])
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"not a png")
    monkeypatch.undo()
    err = error_of(capsys, build + [str(unreadable), "--output-dir", str(tmp_path / "out_unreadable"), *BUILD_OPTIONS])
    assert "none of the 1 images" in err
    monkeypatch.setattr(parallel_build, "embed_images", never)

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert "is not a folder" in error_of(capsys, build + [images, "--output-dir", str(a_file), *BUILD_OPTIONS])
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    from gill_pipeline.commands import index as index_command

    with monkeypatch.context() as patched:  # these are refused before the model loads
        patched.setattr(index_command, "load_pipeline", never)
        assert "is not empty (notes.txt)" in error_of(capsys, build + [images, "--output-dir", str(users), *BUILD_OPTIONS])
        assert (users / "notes.txt").read_text() == "mine" and os.listdir(users) == ["notes.txt"]
        before = files_of(one_worker_set)
        err = error_of(capsys, build + [images, "--output-dir", one_worker_set, *BUILD_OPTIONS])
        assert "already holds a retrieval set" in err and "--resume" in err

    # A finished set: refused without --resume (above); with it, checked to be this build's, and nothing is embedded.
    assert main(build + [images, "--output-dir", one_worker_set, "--resume", *BUILD_OPTIONS]) == 0
    assert files_of(one_worker_set) == before
    # A set made with other weights.
    other = str(tmp_path / "other")
    monkeypatch.undo()
    build_retrieval_index(build_tiny_gill_pipeline("opt", seed=1), images, other, num_workers=0, progress=False)
    monkeypatch.setattr(parallel_build, "embed_images", never)
    err = error_of(capsys, build + [images, "--output-dir", other, "--resume", *BUILD_OPTIONS])
    assert "made with other weights" in err
    # An unfinished build of other settings.
    plan_dir = tmp_path / "unfinished" / BUILD_DIR
    plan_dir.mkdir(parents=True)
    plan = parallel_build._plan(tiny_pipe, parallel_build.as_source(images),
                                parallel_build.source_records(parallel_build.as_source(images)), 4, 4, torch.float16)
    (plan_dir / "plan.json").write_text(json.dumps(plan))
    err = error_of(capsys, build + [images, "--output-dir", str(tmp_path / "unfinished"), "--resume", *BUILD_OPTIONS])
    assert "differs in: batch_size" in err


# --------------------------------------------------------------------------------------------------------------
# gill evaluate and gill generate --prompts
# --------------------------------------------------------------------------------------------------------------
needs_bundle = pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world pipeline is not installed")


def evaluation_jobs(data: dict, root: str) -> list[list[str]]:
    model = ["--model", "shapes-world"]
    return [
        ["evaluate", "decision", *model, "--decisions", data["decisions"], "--output-dir", f"{root}/decision",
         "--batch-size", "2", "--no-progress"],
        ["evaluate", "retrieval", *model, "--captions", data["captions"], "--images", data["images"], "--output-dir",
         f"{root}/retrieval", "--batch-size", "2", "--no-progress"],
        ["generate", *model, "--prompts", data["prompts"], "--output-dir", f"{root}/generate", "--steps", "2",
         "--max-new-tokens", "4"],
    ]


@pytest.fixture(scope="module")
def evaluation_data(tmp_path_factory):
    from training.shapes.protocol_data import write_cc3m, write_decisions
    from training.shapes.world import training_scenes

    folder = tmp_path_factory.mktemp("evaluation_data")
    scenes = random.Random(0).sample(training_scenes(), 5)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(s.caption()) for s in scenes[:3]) + "\n\n" + json.dumps({"prompt": ["a red circle"]}) + "\n")
    return dict(decisions=write_decisions(str(folder / "decisions"), scenes),
                captions=write_cc3m(str(folder / "cc3m"), scenes), images=str(folder / "cc3m"), prompts=str(prompts))


@needs_bundle
def test_evaluate_and_bulk_generate_on_two_workers_match_one(evaluation_data, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for argv in evaluation_jobs(evaluation_data, one):
        assert main(argv) == 0, argv
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps(evaluation_jobs(evaluation_data, two)))
    launch("tests.distributed_jobs", [str(jobs)], 2)
    for name in ("decision", "retrieval", "generate"):
        expected = files_of(os.path.join(one, name))
        got = files_of(os.path.join(two, name))
        assert sorted(got) == sorted(expected), name
        # The manifest and settings name the output folder's inputs, the same in both runs.
        assert got == expected, [k for k in expected if got[k] != expected[k]]
    answers = [json.loads(line) for line in open(os.path.join(two, "generate", "answers.jsonl"))]
    assert [a["line"] for a in answers] == [1, 2, 3, 5] and answers[3]["folder"] == "line-000005"


@needs_bundle
def test_records_a_killed_worker_left_are_kept_and_folded_in(evaluation_data, tmp_path, monkeypatch):
    from gill_pipeline.evaluation import evaluate_decision
    from gill_pipeline.evaluation.records import RECORDS_FILE
    from gill_pipeline.evaluation.systems import GILLSystem
    from gill_pipeline.bundled import load_bundled_pipeline

    pipe = load_bundled_pipeline(with_index=False)
    pipe.set_progress_bar_config(disable=True)
    clean = str(tmp_path / "clean")
    evaluate_decision(pipe, evaluation_data["decisions"], clean, batch_size=2, progress=False)
    lines = open(os.path.join(clean, RECORDS_FILE)).read().splitlines()
    # A worker of an earlier run was killed after its batch (two records) and while writing a third line.
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "records.part-00001.jsonl"), "w") as f:
        f.write(lines[2] + "\n" + lines[3] + "\n" + lines[4][:20])
    asked, real = [], GILLSystem.decision_probs
    monkeypatch.setattr(GILLSystem, "decision_probs", lambda self, prompts: asked.extend(prompts) or real(self, prompts))
    summary = evaluate_decision(pipe, evaluation_data["decisions"], out, batch_size=2, progress=False)
    assert len(asked) == len(lines) - 2  # the two whole records are not done again; the cut one is
    assert not [n for n in os.listdir(out) if n.startswith("records.part-")]
    assert sorted(open(os.path.join(out, RECORDS_FILE)).read().splitlines()) == sorted(lines)
    assert summary["results"] == json.load(open(os.path.join(clean, "summary.json")))["results"]


def test_bulk_generate_resumes_and_refuses_what_it_would_overwrite(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A dog.\n\nA cat.\n")
    out = tmp_path / "out"
    argv = ["generate", "--model", "tiny-random", "--max-new-tokens", "2", "--steps", "1", "--prompts", str(prompts),
            "--output-dir", str(out)]
    assert main(argv) == 0
    first = files_of(out)
    assert {"line-000001/answer.md", "line-000003/answer.md", "answers.jsonl"} <= set(first)
    # A run killed while answering line 3: its folder lacks the last file; the rerun answers line 3 only, the same.
    os.remove(out / "line-000003" / "answer.md")
    os.utime(out / "line-000001" / "answer.txt", (0, 0))
    assert main(argv) == 0
    assert files_of(out) == first and os.stat(out / "line-000001" / "answer.txt").st_mtime == 0
    capsys.readouterr()

    assert "differs in: seed" in error_of(capsys, argv + ["--seed", "7"])
    assert "no such file" in error_of(capsys, argv[:-3] + [str(tmp_path / "none.txt"), "--output-dir", str(out)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert "holds no prompt" in error_of(capsys, argv[:-3] + [str(empty), "--output-dir", str(tmp_path / "o2")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"prompt": 3}\n')
    assert "bad.jsonl, line 2" in error_of(capsys, argv[:-3] + [str(bad), "--output-dir", str(tmp_path / "o3")])
    bad.write_text('"fine"\n\n{not json\n')
    assert "bad.jsonl, line 3: not JSON" in error_of(capsys, argv[:-3] + [str(bad), "--output-dir", str(tmp_path / "o3")])
    bad.write_text('["a photo", "missing.png"]\n')
    assert "image file not found" in error_of(capsys, argv[:-3] + [str(bad), "--output-dir", str(tmp_path / "o3")])
    # Every image of the file is checked before the model loads: one that cannot be read, one above the pixel limit.
    from gill_pipeline.commands import generate as generate_command

    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_image(tmp_path / "big.png", seed=0)
    bad.write_text('["a photo", "big.png"]\n"fine"\n["and", "broken.png"]\n')

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(generate_command, "load_model", never)
        err = error_of(capsys, argv[:-3] + [str(bad), "--output-dir", str(tmp_path / "o3")])
        assert "bad.jsonl, line 3: cannot read image" in err and "broken.png" in err
        err = error_of(capsys, argv[:-3] + [str(bad), "--output-dir", str(tmp_path / "o3"), "--max-image-pixels", "16"])
        assert "bad.jsonl, line 1: the image" in err and "above the limit of 16" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"precious")
    assert "is not empty" in error_of(capsys, argv[:-1] + [str(mine)])
    assert os.listdir(mine) == ["holiday.png"]
    assert "not both" in error_of(capsys, argv + ["A bird."])
    assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "o3")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shares_are_contiguous_and_cover_every_unit_once(world_size):
    for units in (0, 1, 5, 12, 13):
        shares = [Workers(rank, world_size).share(units) for rank in range(world_size)]
        assert [u for share in shares for u in share] == list(range(units))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="`rank`=2"):
        Workers(2, 2)


def test_index_build_faiss_auto_chooses_saves_and_searches_without_a_rebuild(images, tmp_path):
    # `--faiss auto`: the index chosen by measured recall@10 on the set's rows, recorded in the set's config and read
    # back from the saved FAISS files; a set this small (12 rows) is searched exactly.
    out = str(tmp_path / "set")
    assert main(["index", "build", images, "--output-dir", out, "--faiss", "auto", *BUILD_OPTIONS]) == 0
    index = RetrievalIndex.from_pretrained(out, image_root=images)
    assert index.faiss_settings is not None and index.faiss_settings.factory == "Flat"
