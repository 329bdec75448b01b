"""benchmarks/bench_shapes_protocols.py: the shapes world's protocol figures come from the `gill evaluate` commands.
Run at a tiny scale with the bundled pipeline and a CLIP of the world's shape (random weights, `world_clip_folder`)."""

import importlib.util
import json
import os

import pytest

from gill_pipeline.bundled import BUNDLED_PIPELINE, bundle_available
from training.shapes.protocol_data import context_stories, write_vist
from training.shapes.world import context_text

# Each run: the `gill evaluate` subcommand it calls and the protocol its summary names.
COMMANDS = {
    "decision": ("decision", "decision"),
    "retrieval": ("retrieval", "caption_retrieval"),
    "visdial": ("visdial", "visdial"),
    "vist": ("vist", "vist"),
    "vist_held_out": ("vist", "vist"),
    "vist_text_only": ("vist", "vist"),
    "text_to_image": ("text-to-image", "text_to_image"),
}
BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_shapes_protocols.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_shapes_protocols", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_context_stories_are_the_world_chains(tmp_path):
    stories = context_stories(6, seed=0)
    assert all(len(story) == 2 and not any(scene.held_out for _, scene in story) for story in stories)
    (opening, first), (change, target) = stories[0]
    # The decoder baseline reads the captions joined: exactly the world's context text; the target differs in one way.
    assert f"{opening} {change}" == context_text(first, change[2:-2])
    assert sum(a != b for a, b in zip(first.key, target.key)) == 1
    assert all(story[-1][1].held_out for story in context_stories(5, seed=1, held_out=True))
    assert context_stories(6, seed=0) == stories  # fixed seeds give the same data
    with open(write_vist(str(tmp_path), stories[:1])) as f:
        texts = sorted((a[0]["worker_arranged_photo_order"], a[0]["text"]) for a in json.load(f)["annotations"])
    assert [t for _, t in texts] == [opening, change]
    with pytest.raises(ValueError, match="`n` must be a positive integer, got 0"):
        context_stories(0, seed=0)


@pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world pipeline is not installed")
def test_benchmark_runs_every_protocol_through_the_cli(world_clip_folder, tmp_path):
    bench = load_bench()
    work, out = str(tmp_path / "work"), str(tmp_path / "results" / "shapes_protocols")
    argv = ["--model", BUNDLED_PIPELINE, "--clip", world_clip_folder, "--work", work, "--scale", "0.02", "--out", out]
    results = bench.main(argv)

    with open(out + ".json") as f:
        saved = json.load(f)
    assert set(saved["protocols"]) == set(bench.TABLE) and saved["scale"] == 0.02
    markdown = open(out + ".md").read()
    for name, entry in saved["protocols"].items():
        baseline, metrics = bench.TABLE[name]
        found = entry["summary"]["results"]
        systems = {"gill"} if name in bench.DATA_OF else {"gill", baseline}
        assert set(found) == systems, name
        assert entry["n"] == bench.scaled(bench.DATA_OF.get(name, name), 0.02) >= bench.MIN_SIZE
        # The figures are the command's own summary.json, from the folder named in the command.
        command, protocol = COMMANDS[name]
        assert entry["command"].startswith(f"gill evaluate {command} ") and entry["summary"]["protocol"] == protocol
        output_dir = entry["command"].split("--output-dir ")[1].split()[0]
        with open(os.path.join(output_dir, "summary.json")) as f:
            assert json.load(f) == entry["summary"]
        assert bench.portable(entry["command"], results["work"]) in markdown and f"| {name} | {entry['n']} |" in markdown
        assert results["work"] not in markdown  # the page names no local work folder
        for system in systems:
            r = found[system]
            for key, value in r.items():
                if "recall" in key or key in ("accuracy", "f1_macro"):
                    assert 0.0 <= value <= 1.0, (name, system, key)
            if "clip_similarity" in r:
                assert -1.0 <= r["clip_similarity"] <= 1.0 and r["lpips_clip_features"] >= 0.0 and "lpips" not in r
            if "fid" in r:
                assert r["fid"] >= 0.0 and 0.0 <= r["clip_score"] <= 100.0
            assert r.get("n", entry["n"]) == entry["n"], (name, system)
    assert saved["protocols"]["decision"]["summary"]["results"]["majority"]["accuracy"] < 1.0
    assert saved["protocols"]["vist_text_only"]["summary"]["settings"]["include_images"] is False

    # Rerunning with the same work folder resumes: every command skips its done examples, the figures are the same.
    again = bench.main(argv)
    assert {k: v["summary"]["results"] for k, v in again["protocols"].items()} == {
        k: v["summary"]["results"] for k, v in results["protocols"].items()
    }
    with pytest.raises(ValueError, match="`--work`"):
        bench.main(["--model", BUNDLED_PIPELINE, "--clip", str(tmp_path), "--work", work, "--out", out])
