"""Retrieval at scale: a FAISS index chosen by measurement, built streamed, saved, read back memory-mapped, searched.

    python -m benchmarks.bench_retrieval_scale --sizes 1000000            # about 10 minutes on 2 shared cores
    python -m benchmarks.bench_retrieval_scale --sizes 10000000           # streamed; never all rows in memory

For each size N, rows of `benchmarks/synthetic_clip.py` (clustered, CLIP-like, 256-d; see its docstring) are made
chunk by chunk from a seed and never held all at once:
1. `choose_faiss_params` on the first `--sample-rows` rows (200 of them held out as queries) picks the factory,
   nprobe and re-ranking depth within 64 bytes per image for recall@10 >= 0.95.
2. One pass over the N rows: the index is trained on a sample (the first rows), every chunk is added
   (`FaissShardWriter`: shards of `--rows-per-file` rows written as they fill), the exact top-10 of 200 fresh queries
   (100 to tune nprobe, 100 to report) is kept up to date, and, when the chosen index re-ranks, the rows are written
   to an fp16 memory-mapped file for it.
3. `read_faiss_files` reads the files back memory-mapped, nprobe and re-ranking are re-tuned on the tuning queries
   (`tune_search_params`), the load is measured in fresh processes (time, RSS; with and without `IO_FLAG_MMAP`), and
   recall@10 and latency (1 thread) are measured on the other 100, with the sample's settings and the re-tuned ones.
Appends to benchmarks/results/retrieval_scale.json and rewrites retrieval_scale.md from it.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from benchmarks.synthetic_clip import BASIS_GROUPS, CONE, NOISE, SPREAD, ZIPF, ClusteredEmbeddings
from gill_pipeline.retrieval import FaissParams, choose_faiss_params, read_faiss_files
from gill_pipeline.retrieval.faiss_params import RERANK_CANDIDATES, default_nlist, tune_search_params
from gill_pipeline.retrieval.faiss_shards import FaissShardWriter, train_index
from gill_pipeline.retrieval.search import gather_rows, import_faiss

K = 10
HERE = os.path.dirname(os.path.abspath(__file__))
QUERY_CHUNK = 10**9  # chunk indices far past any set: fresh rows of the same distribution
TARGET_RECALL = 0.95
MAX_BYTES = 64


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, truth)]))


class RunningTop:
    """Exact top-k of fixed queries over rows seen chunk by chunk."""

    def __init__(self, queries: np.ndarray):
        self.queries = torch.from_numpy(queries)
        self.scores = torch.full((len(queries), K), float("-inf"))
        self.rows = torch.full((len(queries), K), -1, dtype=torch.long)

    def update(self, chunk: np.ndarray, start: int) -> None:
        top = (self.queries @ torch.from_numpy(chunk).t()).topk(K, dim=1)
        scores = torch.cat([self.scores, top.values], 1)
        rows = torch.cat([self.rows, top.indices + start], 1)
        best = scores.topk(K, dim=1)
        self.scores, self.rows = best.values, rows.gather(1, best.indices)


LOAD_SCRIPT = """
import json, sys, time, numpy as np, torch
from gill_pipeline.retrieval import read_faiss_files
from gill_pipeline.retrieval.search import gather_rows, import_faiss
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 2**20
folder, n, mmap = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
import_faiss().omp_set_num_threads(1)
block = json.load(open(folder + "/faiss.json"))
queries = torch.from_numpy(np.load(folder + "/queries.npy"))
base = rss()
start = time.perf_counter()
searcher = read_faiss_files(folder, block, "faiss.json", num_rows=n, mmap=mmap)
load_s = time.perf_counter() - start
loaded = rss()
searcher.search(queries, 10)
print(json.dumps({"load_s": load_s, "rss_gib": loaded - base, "rss_after_100_queries_gib": rss() - base}))
"""


def measure_load(folder: str, n: int, mmap: bool, queries: np.ndarray) -> dict:
    """Load time and resident memory of reading the FAISS files, in a fresh process (codes only: no re-ranking)."""
    np.save(os.path.join(folder, "queries.npy"), queries)
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, folder, str(n), "1" if mmap else "0"],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(n: int, args, workdir: str, earlier: list[dict]) -> dict:
    faiss = import_faiss()
    gen = ClusteredEmbeddings(seed=args.seed, chunk_rows=args.chunk_rows)
    queries = gen.chunk(QUERY_CHUNK, rows=200)
    tune_q, eval_q = queries[:100], queries[100:]
    nlist = min(default_nlist(n), args.max_nlist)
    entry = {"rows": n, "nlist": nlist, "chunk_rows": args.chunk_rows}

    # 1. Parameters chosen on the set's own first rows. Every size starts with the same rows: a choice made on the
    # same sample with the same nlist by an earlier run is the same choice, and is reused.
    start = time.perf_counter()
    sample = np.concatenate([c for _, c in gen.rows(min(args.sample_rows, n))])
    same = [e for e in earlier if e["nlist"] == nlist and e["choice"]["sample_rows"] == sample.shape[0] - 200
            and e.get("seed", 0) == args.seed and e["choice"].get("memory_mapped", False) == args.memory_mapped]
    if same:
        params = FaissParams(**same[0]["choice"])
        entry["choice_reused_from"] = same[0]["rows"]
    else:
        params = choose_faiss_params(sample, target_recall=TARGET_RECALL, max_bytes_per_image=MAX_BYTES, nlist=nlist,
                                     seed=args.seed, memory_mapped=args.memory_mapped)
    entry["choose_s"] = time.perf_counter() - start if not same else same[0]["choose_s"]
    entry["seed"] = args.seed
    entry["choice"] = {k: v for k, v in params.__dict__.items()}
    print(f"{n:>11,} chose {params.factory} nprobe={params.nprobe} rerank={params.rerank} recall "
          f"{params.recall_at_10:.3f} ({entry['choose_s']:.0f} s)", flush=True)

    # 2. One streamed pass: train on the first rows, add chunk by chunk, exact top-k kept on the way.
    folder = os.path.join(workdir, f"set-{n}{'-mapped' if args.memory_mapped else ''}")
    os.makedirs(folder, exist_ok=True)
    settings = params.settings(max_rows_per_file=args.rows_per_file)
    start = time.perf_counter()
    trained = train_index(sample.shape[1], params.factory, sample, train_size=max(65_536, 64 * nlist),
                          seed=args.seed)
    entry["train_s"] = time.perf_counter() - start
    del sample
    writer = FaissShardWriter(folder, trained, settings)
    truth = RunningTop(queries)
    store = None
    if params.rerank > 1:
        store = np.lib.format.open_memmap(os.path.join(folder, "rows-fp16.npy"), mode="w+", dtype=np.float16,
                                          shape=(n, gen.dim))
    add_s = gen_s = 0.0
    t0 = time.perf_counter()
    for first, chunk in gen.rows(n):
        gen_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        writer.add(chunk)
        add_s += time.perf_counter() - t1
        truth.update(chunk, first)
        if store is not None:
            store[first : first + chunk.shape[0]] = chunk
        t0 = time.perf_counter()
    block = writer.close()
    if store is not None:
        store.flush()
        del store
    entry.update(add_s=add_s, generate_s=gen_s, build_s=entry["train_s"] + add_s, build_peak_rss_gib=peak_rss_gib())
    index_bytes = sum(os.path.getsize(os.path.join(folder, f["file"])) for f in block["files"])
    entry["index_bytes_per_image"] = index_bytes / n
    entry["files"] = len(block["files"])
    with open(os.path.join(folder, "faiss.json"), "w") as f:
        json.dump(block, f, indent=2)
    print(f"{n:>11,} built in {entry['build_s']:.0f} s (+{gen_s:.0f} s generating), "
          f"{entry['index_bytes_per_image']:.1f} bytes/image", flush=True)

    # 3. Read back memory-mapped; tune nprobe on the tuning queries; measure on the others.
    del writer, trained
    rows_of = None
    if params.rerank > 1:
        # Read as a memory-mapped set's stored rows are: `gather_rows` (only the candidates' pages, no readahead).
        # Mapped read-only (shared): a private copy-on-write map of 51 GB is refused by the kernel's overcommit check.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable; it is only read
            rows_fp16 = torch.from_numpy(np.load(os.path.join(folder, "rows-fp16.npy"), mmap_mode="r"))
        entry["rerank_bytes_per_image"] = rows_fp16.element_size() * gen.dim

        def rows_of(rows):
            return gather_rows([rows_fp16], rows)

    searcher = read_faiss_files(folder, block, "faiss.json", num_rows=n, mmap=True, rows_of=rows_of)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    tune_truth, eval_truth = truth.rows[:100].numpy(), truth.rows[100:].numpy()
    # nprobe and re-ranking re-tuned on the full index, as `add_faiss_index(..., "auto")` does (the sample's choice
    # does not hold at N rows), on the 100 tuning queries; both settings are reported on the other 100.
    tuning = tune_search_params(searcher, torch.from_numpy(tune_q), [set(r.tolist()) for r in tune_truth],
                                TARGET_RECALL, rerank_candidates=RERANK_CANDIDATES if rows_of else (1,))
    sweep = tuning["tried"]
    # The load as a user's: the files with the tuned nprobe, each way in a fresh process (this one's freed memory
    # would hide what a load takes).
    with open(os.path.join(folder, "faiss.json"), "w") as f:
        json.dump({**block, "nprobe": tuning["nprobe"], "rerank": tuning["rerank"]}, f, indent=2)
    for mmap in (True, False):
        entry["load_mmap" if mmap else "load_no_mmap"] = measure_load(folder, n, mmap, eval_q)
    entry["load_s"], entry["load_rss_gib"] = entry["load_mmap"]["load_s"], entry["load_mmap"]["rss_gib"]
    settings_measured = [(params.nprobe, params.rerank, False), (tuning["nprobe"], tuning["rerank"], True)]
    results = []
    for nprobe, rerank, tuned in settings_measured:
        searcher.set_search_params(nprobe=nprobe)
        searcher.settings.rerank = rerank
        found = searcher.search(torch.from_numpy(eval_q), K).rows.numpy()
        pq_only = searcher.search(torch.from_numpy(eval_q), K, rerank=False).rows.numpy()
        one = []
        for q in eval_q:
            t = time.perf_counter()
            searcher.search(torch.from_numpy(q[None]), K)
            one.append(time.perf_counter() - t)
        batch = []
        for _ in range(5):
            t = time.perf_counter()
            searcher.search(torch.from_numpy(eval_q[:32]), K)
            batch.append(time.perf_counter() - t)
        results.append({"nprobe": nprobe, "rerank": rerank, "tuned": tuned, "recall_at_10": recall(found, eval_truth),
                        "recall_at_10_codes_only": recall(pq_only, eval_truth),
                        "one_query_ms": statistics.median(one) * 1e3, "batch32_ms": statistics.median(batch) * 1e3})
        print(f"{n:>11,} nprobe={nprobe} rerank={rerank}: recall@10 {results[-1]['recall_at_10']:.3f} (codes only "
              f"{results[-1]['recall_at_10_codes_only']:.3f}), 1q {results[-1]['one_query_ms']:.2f} ms, 32q "
              f"{results[-1]['batch32_ms']:.1f} ms", flush=True)
    entry.update(sweep=sweep, search=results, search_rss_gib=rss_gib(), peak_rss_gib=peak_rss_gib())
    faiss.omp_set_num_threads(args.threads)
    if not args.keep:
        shutil.rmtree(folder)
    return entry


def write_report(entries: list[dict], path_md: str) -> None:
    faiss = import_faiss()
    lines = [
        "# Retrieval at scale: FAISS chosen by measurement, built streamed, read back memory-mapped",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with up to 6 other jobs, no GPU; torch "
        f"{torch.__version__}, faiss {faiss.__version__}. Written by `python -m benchmarks.bench_retrieval_scale`. "
        "Latencies on 1 thread (`faiss.omp_set_num_threads(1)`), median over 100 single queries and 5 batches of 32; "
        "on this loaded machine single figures vary up to about 2x between runs.",
        "",
        "**Rows**: `benchmarks/synthetic_clip.py`, 256-d, a mixture of 4096 anisotropic Gaussian clusters on the unit "
        f"sphere: centres `normalize({CONE} m + g/sqrt(d))` around a shared direction `m` (CLIP's cone), cluster sizes "
        f"Zipf({ZIPF}), a rank-16 spread per cluster (singular values {SPREAD}/sqrt(i+1), {BASIS_GROUPS} bases shared "
        f"among the clusters) plus isotropic noise {NOISE}/sqrt(d), then L2-normalised. Made chunk by chunk from a "
        "seed (chunk t from `seed * 1_000_003 + t`): random pairs have cosine ~0.16, a query's nearest row ~0.74 at "
        "100k rows. Queries are 200 fresh rows of the same distribution (not in the set): 100 tune nprobe, 100 are "
        "reported. Ground truth: exact top-10 over all N rows, kept in the same streamed pass that builds the index.",
        "",
        "**Steps per size**: `choose_faiss_params` on the first 100k rows (200 held out) picks factory, nprobe and "
        "re-ranking within 64 bytes/image for recall@10 >= 0.95; the index is trained on the first rows, rows are "
        "added chunk by chunk with `FaissShardWriter` (files written as they fill), then `read_faiss_files(..., "
        "mmap=True)` reads them back (no training), `tune_search_params` re-tunes nprobe and the re-ranking depth on "
        "the full index with the 100 tuning queries (as `add_faiss_index(..., \"auto\")` does), and the reported "
        "queries are measured with the sample's choice and with the re-tuned settings. `nlist` is capped at 2048 "
        "(k-means cost on 2 cores); with more cores use about 4 sqrt(N) (`default_nlist`).",
        "",
        "| rows | index chosen | nprobe | re-rank | tuned on | build (s) | index bytes/image | load (s) | load RSS (GiB) | "
        "1 query (ms) | 32 queries (ms) | recall@10 | recall@10 codes only | peak RSS (GiB) |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        c = e["choice"]
        for r in e["search"]:
            lines.append(
                f"| {e['rows']:,} | {c['factory']} | {r['nprobe']} | {r.get('rerank', c['rerank'])}x | "
                f"{'full index' if r['tuned'] else 'sample'} | {e['build_s']:.0f} | {e['index_bytes_per_image']:.1f} | {e['load_s']:.2f} | "
                f"{e['load_rss_gib']:.2f} | {r['one_query_ms']:.2f} | {r['batch32_ms']:.1f} | "
                f"{r['recall_at_10']:.3f} | {r['recall_at_10_codes_only']:.3f} | {e['peak_rss_gib']:.2f} |"
            )
    lines += ["", "Recall@10 is over 100 queries (+-0.01 is noise); the re-tuned settings reached the target on 100 "
              "other queries, which the reported ones may miss by that much. Load RSS: resident memory of a fresh "
              "process after reading the FAISS files (below). 4-bit fast-scan IVF indexes keep their codes in "
              "FAISS' block inverted lists, which `IO_FLAG_MMAP` does not map: they are read into memory whatever "
              "the flag (8-bit `PQ` codes are mapped; re-ranking rows are memory-mapped numpy)."]
    lines += ["", "## Loading: memory-mapped or read into memory (each in a fresh process, FAISS files only)", "",
              "| rows | index | mmap | load (s) | RSS after load (GiB) | RSS after 100 queries (GiB) |",
              "| ---: | --- | --- | ---: | ---: | ---: |"]
    for e in entries:
        for key, label in (("load_mmap", "yes (IO_FLAG_MMAP)"), ("load_no_mmap", "no")):
            if key in e:
                m = e[key]
                lines.append(f"| {e['rows']:,} | {e['choice']['factory']} | {label} | {m['load_s']:.2f} | {m['rss_gib']:.3f} | "
                             f"{m['rss_after_100_queries_gib']:.3f} |")
    lines += ["", "## What the chooser measured (on the sample)", ""]
    for e in entries:
        c = e["choice"]
        how = (f"the choice of the {e['choice_reused_from']:,}-row run, same sample and nlist" if
               "choice_reused_from" in e else f"chosen in {e['choose_s']:.0f} s")
        lines.append(f"- {e['rows']:,} rows (nlist {e['nlist']}, {how}; build: train "
                     f"{e['train_s']:.0f} s + add {e['add_s']:.0f} s, generating the rows {e['generate_s']:.0f} s "
                     f"more; {e['files']} file(s)"
                     + (f"; re-ranking reads fp16 rows, {e['rerank_bytes_per_image']} bytes/image on disk, "
                        "memory-mapped" if "rerank_bytes_per_image" in e else "") + "):")
        for t in c["tried"]:
            if "recall_at_10" in t:
                lines.append(f"  - {t['factory']} nprobe={t['nprobe']} rerank={t['rerank']}: recall@10 "
                             f"{t['recall_at_10']:.3f}, {t['bytes_per_image']:.0f} bytes/image, "
                             f"{t['ms_per_query']:.2f} ms/query")
            else:
                lines.append(f"  - {t['factory']}: {t['bytes_per_image']:.0f} bytes/image, {t['skipped']}")
        tuned = [t for t in e.get("sweep", []) if "rerank" in t]
        if tuned:
            lines.append(f"  - then on the full {e['rows']:,}-row index (`tune_search_params`, 100 queries): " + "; ".join(
                f"nprobe={t['nprobe']} rerank={t['rerank']}: {t['recall_at_10']:.3f}, {t['ms_per_query']:.2f} ms"
                for t in tuned))
    lines.append("")
    with open(path_md, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--sample-rows", type=int, default=100_000)
    parser.add_argument("--chunk-rows", type=int, default=250_000)
    parser.add_argument("--rows-per-file", type=int, default=10_000_000)
    parser.add_argument("--max-nlist", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/gill_retrieval_scale")
    parser.add_argument("--keep", action="store_true", help="keep the built files")
    parser.add_argument("--memory-mapped", action="store_true", help="choose among codes a load memory-maps (8-bit PQ)")
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)
    path_json = os.path.join(args.output, "retrieval_scale.json")
    entries = []
    if os.path.isfile(path_json):
        with open(path_json) as f:
            entries = json.load(f)
    for n in args.sizes:
        entry = bench_size(n, args, args.workdir, entries)
        def key(e):
            return e["rows"], e["choice"].get("memory_mapped", False)

        entries = sorted([e for e in entries if key(e) != key(entry)] + [entry], key=key)
        with open(path_json, "w") as f:
            json.dump(entries, f, indent=2)
        write_report(entries, os.path.join(args.output, "retrieval_scale.md"))


if __name__ == "__main__":
    main()
