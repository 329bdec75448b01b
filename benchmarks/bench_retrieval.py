"""Retrieval benchmark: search latency (exact vs FAISS) and index build throughput.

    python -m benchmarks.bench_retrieval                 # full run (about 4 minutes on 2 CPU cores)
    python -m benchmarks.bench_retrieval --sizes 10000   # quick run

Search: random L2-normalised 256-wide rows (GILL's retrieval width), 10k / 100k / 1M rows, top-10, one query and a
batch of 32, median of repeated runs, all methods measured side by side in one process with the same thread count.
Random rows have no cluster structure, so they are the worst case for approximate indexes: their recall is reported.
Build: `build_retrieval_index` over a folder of PNG images with the tiny random pipeline of `gill_pipeline.testing`.
Writes benchmarks/results/retrieval.md and retrieval.json.
"""

import argparse
import json
import math
import os
import platform
import tempfile
import time

import numpy as np
import torch

from gill_pipeline.retrieval import ExactSearcher, FaissSearcher, build_retrieval_index
from gill_pipeline.retrieval.search import import_faiss
from benchmarks.timing import median_seconds

DIM = 256
K = 10
BATCH = 32
HERE = os.path.dirname(os.path.abspath(__file__))


def unit_rows(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(n, DIM)
    for start in range(0, n, 100_000):  # chunked, so 1M rows do not need a second 1 GB temporary
        block = torch.randn(min(100_000, n - start), DIM, generator=generator)
        out[start : start + block.shape[0]] = torch.nn.functional.normalize(block, dim=-1)
    return out


def recall(reference: torch.Tensor, rows: torch.Tensor) -> float:
    """Mean fraction of the exact top-k found by the method."""
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(reference.tolist(), rows.tolist())]))


def bench_search(sizes: list[int], hnsw_max_rows: int) -> list[dict]:
    queries = unit_rows(BATCH, seed=1)
    results = []
    for n in sizes:
        rows = unit_rows(n, seed=0)
        repeats_single = 30 if n <= 100_000 else 7
        repeats_batch = 10 if n <= 100_000 else 3
        nlist = min(1024, int(4 * math.sqrt(n)))
        # (name, how to make the searcher; None: retune the previous one, which costs no setup)
        methods = [
            ("exact fp32 (torch, chunked)", lambda: ExactSearcher(rows)),
            ("exact fp16 (torch, chunked, fp32 re-score)", lambda: ExactSearcher(rows.half())),
            ("FAISS Flat (exact)", lambda: FaissSearcher(rows, "Flat")),
            (f"FAISS IVF{nlist},Flat nprobe=32", lambda: FaissSearcher(rows, f"IVF{nlist},Flat", nprobe=32,
                                                                     train_size=40 * nlist)),
            (f"FAISS IVF{nlist},Flat nprobe=256", lambda s: s.set_search_params(nprobe=256)),
        ]
        if n <= hnsw_max_rows:
            methods += [
                ("FAISS HNSW32 efSearch=64", lambda: FaissSearcher(rows, "HNSW32", ef_search=64)),
                ("FAISS HNSW32 efSearch=512", lambda s: s.set_search_params(ef_search=512)),
            ]
        reference = ExactSearcher(rows).search(queries, K).rows
        searcher = None
        for name, make in methods:
            start = time.perf_counter()
            if make.__code__.co_argcount:
                make(searcher)
                setup = 0.0
            else:
                searcher = make()
                setup = time.perf_counter() - start
            single = median_seconds(lambda: searcher.search(queries[:1], K), repeats_single)
            batch = median_seconds(lambda: searcher.search(queries, K), repeats_batch)
            entry = {
                "rows": n,
                "method": name,
                "setup_s": setup,
                "one_query_ms": single * 1e3,
                "batch32_ms": batch * 1e3,
                "recall_at_10": recall(reference, searcher.search(queries, K).rows),
            }
            results.append(entry)
            print(f"{n:>8} {name:<46} setup {setup:7.2f}s  1q {single * 1e3:8.2f}ms  32q {batch * 1e3:8.2f}ms  "
                  f"recall {entry['recall_at_10']:.3f}", flush=True)
        del searcher, rows
    return results


def bench_build(num_images: int) -> dict:
    from PIL import Image

    from gill_pipeline.testing import build_tiny_gill_pipeline

    pipe = build_tiny_gill_pipeline("opt")
    pipe.set_progress_bar_config(disable=True)
    size = pipe.image_encoder.config.image_size
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.RandomState(0)
        for i in range(num_images):
            Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))
        start = time.perf_counter()
        index = build_retrieval_index(pipe, folder, folder, batch_size=64, progress=False)
        seconds = time.perf_counter() - start
    encoder = pipe.image_encoder.config
    return {
        "images": len(index),
        "seconds": seconds,
        "images_per_s": len(index) / seconds,
        "encoder": f"tiny random CLIPVisionModel from gill_pipeline.testing (width {encoder.hidden_size}, "
        f"{encoder.num_hidden_layers} layers, patch {encoder.patch_size}, {size}x{size} input), "
        f"retrieval_dim {pipe.gill.config.retrieval_dim}, fp16 storage, batch 64, 4 loader threads",
    }


def write_report(search: list[dict], build: dict, threads: int, path_md: str, seconds: float) -> None:
    lines = [
        "# Retrieval benchmark",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU; torch "
        f"{torch.__version__}, faiss {import_faiss().__version__}; {threads} thread(s) for torch and FAISS alike.",
        f"Written by `python -m benchmarks.bench_retrieval` in {seconds:.0f} s. One run on a machine shared with "
        "other work: single figures vary up to about 2x between runs; compare rows of the same run.",
        "",
        f"## Search: top-{K} over random normalised {DIM}-wide rows",
        "",
        "Median latency; `setup` is building the searcher (FAISS copy, training, graph; 0 for a row that only "
        "retunes the row above with `set_search_params`); recall@10 against exact search on the fp32 rows. "
        "Ratio = exact fp32 time / method time (above 1: faster than exact fp32).",
        "",
        "Notes: uniformly random rows have no cluster structure, the worst case for IVF and HNSW: their recall here "
        "is a lower bound, measure it on your own embeddings before choosing one. The fp16 index searches its "
        "stored values exactly; its rare misses against the fp32 rows come from fp16 rounding of the rows "
        "themselves (near-ties). This CPU has no fast fp16 matrix product for batches: on a CPU keep fp32 rows "
        "(`dtype=torch.float32` or `index.to(dtype=torch.float32)`) or use FAISS; fp16 pays off on a GPU.",
        "",
        "| rows | method | setup (s) | 1 query (ms) | ratio | 32 queries (ms) | ratio | recall@10 |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {(r["rows"]): r for r in search if r["method"].startswith("exact fp32")}
    for r in search:
        b = base[r["rows"]]
        lines.append(
            f"| {r['rows']:,} | {r['method']} | {r['setup_s']:.2f} | {r['one_query_ms']:.2f} | "
            f"{b['one_query_ms'] / r['one_query_ms']:.2f}x | {r['batch32_ms']:.1f} | "
            f"{b['batch32_ms'] / r['batch32_ms']:.2f}x | {r['recall_at_10']:.3f} |"
        )
    lines += [
        "",
        "## Index build throughput",
        "",
        f"{build['images']} PNG images from a folder -> `build_retrieval_index` (load, encode, project, save): "
        f"{build['seconds']:.2f} s, **{build['images_per_s']:.0f} images/s**.",
        f"Encoder: {build['encoder']}. This measures the build's own overhead (reading, decoding, batching, "
        "saving) with a negligible encoder; a real CLIP ViT-L/14 costs orders of magnitude more per image, so the "
        "encoder bounds real builds (use a GPU).",
        "",
    ]
    with open(path_md, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--hnsw-max-rows", type=int, default=100_000, help="HNSW graph building is slow beyond this")
    parser.add_argument("--build-images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)
    start = time.perf_counter()
    search = bench_search(args.sizes, args.hnsw_max_rows)
    build = bench_build(args.build_images)
    print(f"build: {build['images_per_s']:.0f} images/s", flush=True)
    os.makedirs(args.output, exist_ok=True)
    seconds = time.perf_counter() - start
    with open(os.path.join(args.output, "retrieval.json"), "w") as f:
        json.dump({"threads": args.threads, "search": search, "build": build, "seconds": seconds}, f, indent=2)
    write_report(search, build, args.threads, os.path.join(args.output, "retrieval.md"), seconds)


if __name__ == "__main__":
    main()
