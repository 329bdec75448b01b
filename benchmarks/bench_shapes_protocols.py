"""The shapes world's figures for the GILL paper's protocols, made by the `gill evaluate` commands themselves.

    python -m benchmarks.bench_shapes_protocols      # bundled model -> benchmarks/results/shapes_protocols.{json,md}
    python -m benchmarks.bench_shapes_protocols --model PIPELINE --clip CLIP --work /tmp/w --out /tmp/r/shapes_protocols
    python -m benchmarks.bench_shapes_protocols --scale 0.05 --work /tmp/w --out /tmp/w/results   # tiny (tests)

1. Writes the world's evaluation data in each dataset's own format (`training/shapes/protocol_data.py`, fixed seeds):
   PartiPrompts decisions, CC3M captions, VisDial dialogues, VIST stories made of the world's context chains (seen
   combinations, and targets held out of training), CC3M captions for text-to-image.
2. Runs every protocol through the command line entry, `gill_pipeline.commands.main(["evaluate", ...])`, with the world's
   sampling (DDIM 20 steps, guidance 5) and the world's whole CLIP (`--clip`) as the CLIP baseline, the CLIP
   similarity / LPIPS / FID features, the CLIP score model and the decoder baseline's text encoder (its text tower is
   the text encoder the world's UNet was trained with).
3. Collects each protocol's `summary.json` into `<out>.json` and a Markdown table `<out>.md` (GILL vs the baseline,
   the exact commands, the data sizes, seconds).

`--work` keeps the data and each protocol's output folder; rerunning with the same folder resumes (the commands skip
done examples). A work folder is tied to one model and CLIP: another model is refused there.
About 4-5 minutes on 2 CPU cores at `--scale 1` (one torch thread).
"""

import argparse
import json
import logging
import os
import platform
import random
import shlex
import tempfile
import time

import torch

from gill_pipeline.bundled import BUNDLED_CLIP, BUNDLED_PIPELINE
from gill_pipeline.commands import main as gill_main
from training.shapes import protocol_data as data
from training.shapes.train_world_gill import RETRIEVABLE_SHAPES
from training.shapes.world import HELD_OUT, all_scenes, training_scenes

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

logger = logging.getLogger("bench.shapes_protocols")

DEFAULT_OUT = os.path.join(HERE, "results", "shapes_protocols")
WORK_MARKER = "benchmark.json"
# The world's sampling (the CLI's shapes-world preset; a model given by folder would otherwise get the paper's 50/7.5).
SAMPLING = ["--steps", "20", "--guidance-scale", "5"]
BATCH_SIZE = 16
# Examples per protocol at --scale 1, and the least any scale keeps (FID and recall need at least 2).
SIZES = dict(decision=180, retrieval=114, visdial=120, vist=240, vist_held_out=90, text_to_image=270)
MIN_SIZE = 2
# Runs that read another run's data: the VIST stories again, without their context images.
DATA_OF = {"vist_text_only": "vist"}
# The metrics shown in the Markdown table, and the baseline each protocol reports beside GILL.
TABLE = {
    "decision": ("majority", ("accuracy", "f1_macro")),
    "retrieval": ("clip", ("t2i_recall@1", "t2i_recall@5", "i2t_recall@1", "i2t_recall@5")),
    "visdial": ("clip", ("recall@1", "recall@5", "recall@10")),
    "vist": ("sd", ("clip_similarity", "lpips_clip_features")),
    "vist_held_out": ("sd", ("clip_similarity", "lpips_clip_features")),
    "vist_text_only": ("sd", ("clip_similarity", "lpips_clip_features")),
    "text_to_image": ("sd", ("fid", "clip_score")),
}


def scaled(name: str, scale: float) -> int:
    return max(MIN_SIZE, round(SIZES[name] * scale))


def sample(scenes: list, n: int, seed: int) -> list:
    """`n` scenes in a seeded order: each once while they last, then again."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        out += rng.sample(scenes, len(scenes))
    return out[:n]


def shapes_in_turn(scenes: list, n: int, seed: int) -> list:
    """`n` scenes from seeded passes over `scenes` (each once per pass), taken with the shapes in turn: a small
    scale still holds every shape (both decision labels)."""
    passes = sample(scenes, len(scenes) * -(-n // len(scenes)), seed)
    count: dict[str, int] = {}
    turn = []
    for scene in passes:
        count[scene.shape] = count.get(scene.shape, 0) + 1
        turn.append(count[scene.shape])
    order = sorted(range(len(passes)), key=lambda i: (turn[i], i))
    return [passes[i] for i in order[:n]]


def write_data(work: str, scale: float) -> dict[str, dict]:
    """Writes each protocol's data under `work/data/<protocol>_<size>/` (kept when already there); returns, per
    protocol, its file, image folder and a description of what it holds."""
    root = os.path.join(work, "data")
    retrievable = [s for s in training_scenes() if s.shape in RETRIEVABLE_SHAPES]
    plans = {
        "decision": (data.DECISIONS_FILE, lambda folder, n: data.write_decisions(folder, shapes_in_turn(all_scenes(), n, 0)),
                     "prompts: every scene's caption, held-out combinations included; ret for circles and squares, "
                     "gen for triangles; one extra `same` row, recorded but not scored"),
        "retrieval": (data.CC3M_FILE, lambda folder, n: data.write_cc3m(folder, sample(retrievable, n, 1)),
                      "captions and drawn images (CC3M format) of circles and squares, the shapes the retrieval set holds"),
        "visdial": (data.VISDIAL_FILE, lambda folder, n: data.write_visdial(folder, sample(training_scenes(), n, 2)),
                    "dialogues (VisDial format): a caption with size and position, two rounds giving shape and colour"),
        "vist": (data.VIST_FILE, lambda folder, n: data.write_vist(folder, data.context_stories(n, 3)),
                 "two-step stories (VIST format): 'there is <scene>' + its image, then a change ('. now the same shape "
                 "in blue :'); the target is the changed scene's image; no held-out combination"),
        "vist_held_out": (data.VIST_FILE, lambda folder, n: data.write_vist(folder, data.context_stories(n, 4, held_out=True)),
                          f"the same, every target one of the {len(HELD_OUT)} combinations held out of training"),
        "text_to_image": (data.CC3M_FILE, lambda folder, n: data.write_cc3m(folder, shapes_in_turn(all_scenes(), n, 5)),
                          "captions and drawn images (CC3M format) of all shapes, held-out combinations included"),
    }
    written = {}
    for name, (file_name, write, what) in plans.items():
        n = scaled(name, scale)
        folder = os.path.join(root, f"{name}_{n}")
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            write(folder, n)
        written[name] = dict(file=path, images=folder, n=n, what=what)
    return written


def commands(written: dict[str, dict], model: str, clip: str, work: str) -> dict[str, list[str]]:
    """Each run's `gill` arguments; every output goes to `work/out/<run>_<size>/`. A run reads the data of the
    protocol it is named after (`vist_text_only`: the `vist` stories)."""

    def common(name):
        out = os.path.join(work, "out", f"{name}_{written[DATA_OF.get(name, name)]['n']}")
        return ["--output-dir", out, "--model", model, "--batch-size", str(BATCH_SIZE), "--no-progress"]

    def vist(name):
        stories = written[DATA_OF.get(name, name)]
        return ["evaluate", "vist", "--stories", stories["file"], "--images", stories["images"], "--image-pattern",
                "{id}.png", "--num-captions", "2", "--clip", clip, "--lpips-features", clip, *SAMPLING]

    return {
        "decision": ["evaluate", "decision", "--decisions", written["decision"]["file"], *common("decision")],
        "retrieval": ["evaluate", "retrieval", "--captions", written["retrieval"]["file"], "--images",
                      written["retrieval"]["images"], "--clip", clip, *common("retrieval")],
        "visdial": ["evaluate", "visdial", "--dialogs", written["visdial"]["file"], "--images", written["visdial"]["images"],
                    "--caption-template", "{caption} .", "--round-template", " {question} {answer} .", "--clip", clip,
                    *common("visdial")],
        "vist": [*vist("vist"), "--baseline-text-encoder", clip, *common("vist")],
        "vist_held_out": [*vist("vist_held_out"), "--baseline-text-encoder", clip, *common("vist_held_out")],
        # The paper's "captions only" ablation: the same stories without the first image (no baseline: it is the
        # `vist` row's, which never sees images).
        "vist_text_only": [*vist("vist_text_only"), "--no-context-images", *common("vist_text_only")],
        "text_to_image": ["evaluate", "text-to-image", "--captions", written["text_to_image"]["file"], "--images",
                          written["text_to_image"]["images"], "--fid-features", clip, "--clip-score", clip,
                          "--baseline-text-encoder", clip, *SAMPLING, *common("text_to_image")],
    }


def claim_work_folder(work: str, model: str, clip: str) -> None:
    """Records which model and CLIP the folder's outputs come from; refuses another pair (the commands would resume
    from the other model's records)."""
    os.makedirs(work, exist_ok=True)
    marker = os.path.join(work, WORK_MARKER)
    mine = {"model": os.path.abspath(model), "clip": os.path.abspath(clip)}
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            theirs = json.load(f)
        if theirs != mine:
            raise ValueError(f"`--work` {work!r} holds results of {theirs}, not of {mine}: give another folder.")
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(mine, f, indent=2)


def run_protocol(argv: list[str]) -> tuple[dict, float]:
    """Runs one `gill` command in this process; returns its summary.json and the seconds it took."""
    start = time.perf_counter()
    code = gill_main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"`gill {shlex.join(argv)}` failed with exit code {code} (its error is printed above)")
    output_dir = argv[argv.index("--output-dir") + 1]
    with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f), seconds


def number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def portable(text: str, work: str | None) -> str:
    """`text` with this checkout's paths made relative to the repository and the work folder shown as `WORK`, so the
    committed results page does not carry one machine's paths (the JSON keeps them as run)."""
    if work:
        text = text.replace(os.path.abspath(work), "WORK")
    return text.replace(REPO + os.sep, "")


def markdown(results: dict) -> str:
    work = results.get("work")
    lines = [
        "# The GILL paper's protocols on the shapes world, made by `gill evaluate`",
        "",
        f"Model: `{portable(results['model'], work)}`; CLIP: `{portable(results['clip'], work)}`; scale "
        f"{results['scale']}; DDIM 20 steps, guidance 5; "
        f"{results['threads']} torch thread(s), {results['machine']}; total {results['seconds']:.0f} s.",
        "Written by `python -m benchmarks.bench_shapes_protocols` (docs/evaluation.md, \"The shapes world's figures\").",
        "",
        "| protocol | examples | metric | GILL | baseline | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["protocols"].items():
        baseline, metrics = TABLE[name]
        found = entry["summary"]["results"]
        for metric in metrics:
            other = f"{baseline}: {number(found[baseline].get(metric))}" if baseline in found else "-"
            lines.append(
                f"| {name} | {entry['n']} | {metric} | {number(found['gill'].get(metric))} | {other} | "
                f"{entry['seconds']:.0f} |"
            )
    lines += ["", "Baselines: `majority` always answers the majority label; `clip` is the world's whole CLIP; `sd` is "
              "the decoder alone (the GILL pipeline's UNet, VAE and scheduler with the CLIP's text tower) given the "
              "same captions as one text. Higher is better except `lpips_clip_features` and `fid`. CLIP similarity, "
              "`lpips_clip_features` (the LPIPS formula on the CLIP vision tower's layers, not the published LPIPS) "
              "and FID (on CLIP image features) use the world's CLIP: they compare systems with each other and are "
              "not comparable with published numbers. Seconds are this run's: a resumed run "
              "counts only what it redid.", "", "## Data", ""]
    for name, entry in results["protocols"].items():
        lines.append(f"- `{name}` ({entry['n']}): {entry['what']}.")
    lines += ["", "## Commands run", "", "```bash"]
    lines += [portable(entry["command"], work) for entry in results["protocols"].values()]
    lines += ["```", ""]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BUNDLED_PIPELINE, help="GILL pipeline folder (default: the bundled one)")
    parser.add_argument("--clip", default=BUNDLED_CLIP, help="the world's whole CLIP folder (model, tokenizer, image "
                        "processor; default: the bundled one)")
    parser.add_argument("--work", default=None, help="folder for the data and each protocol's outputs; rerunning "
                        "with it resumes (default: a new temporary folder)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the data sizes (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results path without extension: writes .json and .md "
                        "(default: benchmarks/results/shapes_protocols)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    for flag, folder in (("--model", args.model), ("--clip", args.clip)):
        if not os.path.isdir(folder):
            parser.error(f"{flag}: no such folder: {folder}")
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="gill_shapes_protocols_")
    claim_work_folder(work, args.model, args.clip)
    start = time.perf_counter()
    written = write_data(work, args.scale)
    logger.info("data written under %s (%.0f s)", os.path.join(work, "data"), time.perf_counter() - start)
    results = {
        "model": args.model, "clip": args.clip, "work": os.path.abspath(work), "scale": args.scale,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}", "protocols": {},
    }
    for name, argv_ in commands(written, args.model, args.clip, work).items():
        logger.info("%s: gill %s", name, shlex.join(argv_))
        summary, seconds = run_protocol(argv_)
        data_name = DATA_OF.get(name, name)
        what = written[data_name]["what"] if data_name == name else f"the `{data_name}` stories without their images"
        results["protocols"][name] = dict(
            command=f"gill {shlex.join(argv_)}", n=written[data_name]["n"], what=what, seconds=seconds, summary=summary
        )
    results["seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(results))
    logger.info("wrote %s.json and %s.md (%.0f s in all)", args.out, args.out, results["seconds"])
    return results


if __name__ == "__main__":
    main()
