"""Exact search over a memory-mapped retrieval set: block by block (what `RetrievalIndex.search` does) against the
rows joined into one tensor first (what it did before: `index.embeddings` at the first search), and block by block
over shards read into memory (`mmap=False`).

    python -m benchmarks.bench_exact_blocks                 # 500,000 rows of 256-d fp16 in 100,000-row shards
    python -m benchmarks.bench_exact_blocks --rows 100000   # quick run

The set is saved once to a temporary folder; each way is measured in its own process (a fresh
`from_pretrained(..., mmap=True)`): the anonymous memory (`RssAnon`, not the file pages the mapping brings in, which
the kernel can drop) that the first search adds, and the median time of 3 searches of 32 queries after it. Every way
must give the same rows. Writes benchmarks/results/exact_blocks.md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "exact_blocks.md")


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def make_set(folder: str, rows: int, dim: int, shard_rows: int) -> None:
    from gill_pipeline.retrieval import RetrievalIndex

    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    records = [{"id": f"r{i}", "path": f"{i}.png"} for i in range(rows)]
    index = RetrievalIndex(embeddings.half(), records, {"retrieval_dim": dim}, {})
    index.save_pretrained(folder, max_shard_rows=shard_rows)


def measure(folder: str, way: str, queries: int) -> dict:
    from gill_pipeline.retrieval import ExactSearcher, RetrievalIndex

    index = RetrievalIndex.from_pretrained(folder, mmap=way != "block-wise, read into memory", image_root=folder)
    generator = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(queries, index.dim, generator=generator), dim=-1)
    before = rss_anon_mib()
    if way == "joined":
        searcher = ExactSearcher(index.embeddings)  # the rows joined into one tensor, as the search did before

        def search():
            return searcher.search(q, 10)
    else:
        def search():
            return index.search(q, k=10)

    result = search()
    added = rss_anon_mib() - before
    times = []
    for _ in range(3):
        start = time.perf_counter()
        search()
        times.append(time.perf_counter() - start)
    return {"rss_anon_added_mib": added, "ms": sorted(times)[1] * 1e3, "rows": result.rows.tolist(),
            "blocks": len([b for b in index._blocks if b.shape[0]])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.queries)))
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), REPO]))
    with tempfile.TemporaryDirectory() as folder:
        make_set(folder, args.rows, args.dim, args.shard_rows)
        out = {}
        for way in ("joined", "block-wise", "block-wise, read into memory"):
            run = subprocess.run([sys.executable, "-m", "benchmarks.bench_exact_blocks", "--queries", str(args.queries),
                                  "--measure", folder, way], env=env, cwd=REPO, capture_output=True, text=True,
                                 check=True)
            out[way] = json.loads(run.stdout.strip().splitlines()[-1])
    same = all(r["rows"] == out["joined"]["rows"] for r in out.values())
    joined_ms = out["joined"]["ms"]
    lines = [
        "## Exact search of a memory-mapped set: block by block vs joined",
        "",
        f"{args.rows:,} rows of {args.dim}-d fp16 in {out['block-wise']['blocks']} memory-mapped shards of "
        f"{args.shard_rows:,}; {args.queries} queries, k=10. Machine: {platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs: times are noisy), torch {torch.__version__}, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| way | anonymous memory added by the first search | search (median of 3) | vs joined |",
        "| --- | ---: | ---: | ---: |",
    ]
    for way, r in out.items():
        lines.append(f"| {way} | {r['rss_anon_added_mib']:.0f} MiB | {r['ms']:.0f} ms | {r['ms'] / joined_ms:.2f}x |")
    size_mib = args.rows * args.dim * 2 / 2**20
    lines += ["", f"Same rows every way: {same}. The set's rows are {size_mib:.0f} MiB. The last "
              "way loads the shards with `mmap=False` (their memory is taken at load, before the first search): "
              "it separates the cost of searching memory-mapped pages from that of going block by block."]
    text = "\n".join(lines) + "\n"
    print(text)
    from benchmarks.results_file import replace_section

    replace_section(RESULTS, lines[0], text)
    if not same:
        raise SystemExit("the ways gave different rows")


if __name__ == "__main__":
    main()
