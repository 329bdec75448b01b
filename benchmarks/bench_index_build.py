"""Index-build throughput on 1, 2 and 4 workers (`gill index build` under `accelerate launch`, gloo on the CPU).

    python -m benchmarks.bench_index_build                       # full run (about 6 minutes on 2 shared CPU cores)
    python -m benchmarks.bench_index_build --images 32 --workers 1 2   # quick run

Two encoders: the bundled shapes-world model's CLIP (tiny, 64 px) and a CLIP ViT-B/16-shaped vision tower (random
weights, built from its config: 224 px, 12 layers of width 768, 86M parameters) in a tiny GILL pipeline. The same
folder of random 256x256 PNGs is embedded by each; every worker runs torch on ONE thread (`OMP_NUM_THREADS=1`).
Each configuration is one `accelerate launch` job whose workers load the model, meet at a barrier, then run
`build_retrieval_set`; worker 0 reports the time from that barrier to the saved, merged set (embedding, part files,
merge and save; process start and model loading excluded, reported apart as the whole job's wall time). The sets of
2 and 4 workers are checked to be byte-identical to 1 worker's. Writes benchmarks/results/index_build.md and .json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# openai/clip-vit-base-patch16 (vision tower)
CLIP_VIT_B_16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu")
ENCODERS = {"shapes-world (bundled)": "bundled", "CLIP ViT-B/16 shape": "vit_b16"}


def write_images(folder: str, n: int, size: int = 256) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        PIL.Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))


def save_vit_b16_pipeline(folder: str) -> None:
    """A tiny GILL pipeline (LM, decoder) around a ViT-B/16-shaped vision tower with random weights."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from gill_pipeline import GILLPipeline
    from gill_pipeline.testing import tiny

    torch.manual_seed(0)
    tokenizer = tiny.build_tiny_tokenizer()
    pipe = GILLPipeline.from_base_models(
        language_model=tiny.build_tiny_lm("opt", len(tokenizer), tokenizer), tokenizer=tokenizer,
        stable_diffusion=tiny.build_tiny_stable_diffusion(32, "ddim"),
        image_encoder=CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_B_16)), feature_extractor=CLIPImageProcessor(),
        **{**tiny.TINY_GILL_SIZES, "retrieval_dim": 256},
    )
    pipe.save_pretrained(folder)


def worker(model: str, source: str, output_dir: str, batch_size: int, part_rows: int, report: str) -> None:
    """One worker of a launched job (see the module docstring)."""
    import torch

    from gill_pipeline import GILLPipeline
    from gill_pipeline.bundled import load_bundled_pipeline
    from gill_pipeline.retrieval.parallel_build import build_retrieval_set
    from gill_pipeline.utils.distributed import current_workers

    torch.set_num_threads(1)
    workers = current_workers()
    pipe = load_bundled_pipeline(with_index=False) if model == "bundled" else GILLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    # Warm-up outside the timing: the first encoder call pays for lazy initialisation (allocator, kernels).
    from gill_pipeline.retrieval import embed_images

    embed_images(pipe, [PIL.Image.new("RGB", (256, 256))] * batch_size)
    workers.barrier()
    start = time.perf_counter()
    index = build_retrieval_set(pipe, source, output_dir, batch_size=batch_size, part_rows=part_rows, num_workers=0,
                                workers=workers, progress=False)
    if workers.is_main:
        with open(report, "w") as f:
            json.dump({"seconds": time.perf_counter() - start, "rows": len(index)}, f)


def launch(num_processes: int, args: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(REPO, "src"), REPO, env.get("PYTHONPATH")) if p)
    if num_processes == 1:
        command = [sys.executable, "-m", "benchmarks.bench_index_build", "--worker", *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "benchmarks.bench_index_build", "--worker", *args]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def same_files(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in names)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images for the ViT-B/16 encoder")
    parser.add_argument("--bundled-images", type=int, default=512, help="images for the (50x faster) bundled one")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--part-rows", type=int, default=8)
    parser.add_argument("--worker", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model, source, output_dir, batch_size, part_rows, report = args.worker
        return worker(model, source, output_dir, int(batch_size), int(part_rows), report)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"vit_b16": os.path.join(tmp, "images"), "bundled": os.path.join(tmp, "bundled_images")}
        write_images(sources["vit_b16"], args.images)
        write_images(sources["bundled"], args.bundled_images)
        vit = os.path.join(tmp, "vit_b16_pipeline")
        save_vit_b16_pipeline(vit)
        for name, kind in ENCODERS.items():
            model, source = (vit if kind == "vit_b16" else "bundled"), sources[kind]
            base = None
            for n in args.workers:
                out, report = os.path.join(tmp, f"{kind}-{n}"), os.path.join(tmp, f"{kind}-{n}.json")
                load_before = round(os.getloadavg()[0], 1)
                wall = launch(n, [model, source, out, str(args.batch_size), str(args.part_rows), report])
                result = json.load(open(report))
                rate = result["rows"] / result["seconds"]
                base = rate if base is None else base
                identical = same_files(out, os.path.join(tmp, f"{kind}-{args.workers[0]}"))
                rows.append(dict(encoder=name, workers=n, images=result["rows"], build_s=round(result["seconds"], 2),
                                 images_per_s=round(rate, 2), speedup=round(rate / base, 2),
                                 efficiency=round(rate / base / n * args.workers[0], 2), job_wall_s=round(wall, 1),
                                 identical_to_first=identical, load_before=load_before))
                print(rows[-1], flush=True)
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "index_build.json"), "w") as f:
        json.dump({"rows": rows, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()},
                  f, indent=2)
    lines = [
        "# Index build on 1, 2 and 4 workers",
        "",
        f"`python -m benchmarks.bench_index_build` (random 256x256 PNGs: {args.bundled_images} for the bundled encoder, "
        f"{args.images} for ViT-B/16; batch {args.batch_size}, parts of {args.part_rows} images; `accelerate launch "
        f"--multi_gpu --num_processes N`, gloo, CPU only). Machine: {os.cpu_count()} CPU cores SHARED with other jobs "
        "running at the same time; every worker runs torch on one thread. build: from the workers' barrier (models "
        "loaded, one warm-up batch embedded) to the merged set saved by worker 0; job: the whole `accelerate launch` "
        "wall time (process start, imports, model loading included). Efficiency = speed-up / "
        "workers.",
        "",
        "| encoder | workers | images | build (s) | images/s | speed-up | efficiency | job wall (s) | set identical to 1 worker's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['workers']} | {r['images']} | {r['build_s']} | {r['images_per_s']} | "
                     f"{r['speedup']} | {r['efficiency']} | {r['job_wall_s']} | {'yes' if r['identical_to_first'] else 'NO'} |")
    lines += [
        "",
        f"Load average (1 min) before each job: {', '.join(str(r['load_before']) for r in rows)}. When other jobs "
        "keep the cores busy, the kernel shares CPU time per runnable thread, so N single-threaded workers take up to "
        "N slices of the contended machine: speed-ups above the core count and efficiencies above 1 then measure the "
        "contention, not the engine. What these figures do show: the work splits and merges correctly (every set "
        "byte-identical to 1 worker's) and the shares are even (equal parts, a contiguous run per worker); the serial "
        "steps are worker 0's merge and save. Scaling on dedicated cores or GPUs was not measured here.",
    ]
    with open(os.path.join(HERE, "results", "index_build.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
