"""What a retrieval set's records cost to load and hold: the record table (row index files) against the list of dicts
that earlier versions loaded, side by side in one run.

    python -m benchmarks.bench_records --sizes 1000000 10000000      # about 3 minutes on 2 shared cores
    python -m benchmarks.bench_records --sizes 1000000 10000000 100000000   # 15 more, 10 GB of disk at 100M

For each size N a saved set is written straight to a folder: N realistic records (`id` + `path`, about 70 bytes of
JSON each), in shards of 100,000 rows as `save_pretrained` writes them (`write_jsonl_shard` + its row index file),
and memory-mapped-sized fp16 embeddings 8 wide (unit rows; the loader needs embeddings or a FAISS index, and `mmap=True`
reads neither into memory). Then, each in a fresh process (RSS measured there, after `import gill_pipeline`):
- `new`: `RetrievalIndex.from_pretrained(folder, mmap=True)` reading the row index files;
- `new, no row index`: the same folder without them (as saved by older versions): one streamed pass over the records;
- `old` (sizes up to `--old-max-rows`): the loader of `--old-ref` (the version before the record table; its package
  exported with `git archive`): a list of dicts and a dict of ids.
(`new, no row index` up to `--plain-max-rows`.) Each then does 1000 random `records[row]` and 1000 random
`row_of(id)`. Writes benchmarks/results/records_scale.md (and the raw figures in records_scale.json).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

from gill_pipeline.retrieval.record_table import (SORTED_IDS_FILE, RecordTable, id_hashes, row_index_file_name,
                                                 write_jsonl_shard)
from gill_pipeline.retrieval.serialization import (
    EMBEDDINGS_KEY,
    EMBEDDINGS_SHARD_TEMPLATE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_CONFIG_FILE,
    METADATA_SHARD_TEMPLATE,
    PROBE_FILE,
)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DIM = 8
SHARD_ROWS = 100_000
LOOKUPS = 1000


def record_line(i: int) -> bytes:
    return json.dumps({"id": f"laion2b-{i:010d}", "path": f"images/{i // 10_000:05d}/{i:010d}.jpg"}).encode()


def write_set(folder: str, n: int) -> dict:
    """A saved set of `n` records written shard by shard; the seconds spent on the records and their row indexes."""
    os.makedirs(folder, exist_ok=True)
    shards, seconds, jsonl_bytes, index_bytes, tables = [], 0.0, 0, 0, []
    for s, start in enumerate(range(0, n, SHARD_ROWS)):
        stop = min(start + SHARD_ROWS, n)
        metadata, embeddings = METADATA_SHARD_TEMPLATE.format(s), EMBEDDINGS_SHARD_TEMPLATE.format(s)
        tick = time.perf_counter()
        lines = [record_line(i) for i in range(start, stop)]
        hashes = id_hashes(f"laion2b-{i:010d}" for i in range(start, stop))
        shard = write_jsonl_shard(os.path.join(folder, metadata), ((t, int(h), False) for t, h in zip(lines, hashes)))
        shard.write_row_index(os.path.join(folder, row_index_file_name(metadata)))
        seconds += time.perf_counter() - tick
        tables.append(shard)
        jsonl_bytes += os.path.getsize(os.path.join(folder, metadata))
        index_bytes += os.path.getsize(os.path.join(folder, row_index_file_name(metadata)))
        rows = torch.zeros(stop - start, DIM, dtype=torch.float16)
        rows[:, 0] = 1
        save_file({EMBEDDINGS_KEY: rows}, os.path.join(folder, embeddings), metadata={"format": "pt"})
        shards.append({"embeddings": embeddings, "metadata": metadata, "row_index": row_index_file_name(metadata),
                       "num_rows": stop - start})
    # The sorted ids, as `save_pretrained` writes them once the shards are written.
    tick = time.perf_counter()
    RecordTable.from_shards(tables, folder).write_sorted_ids(os.path.join(folder, SORTED_IDS_FILE))
    sorted_ids_s = time.perf_counter() - tick
    sorted_ids_bytes = os.path.getsize(os.path.join(folder, SORTED_IDS_FILE))
    del tables
    save_file({"probe": torch.zeros(1, DIM)}, os.path.join(folder, PROBE_FILE), metadata={"format": "pt"})
    config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "num_images": n, "dim": DIM,
              "dtype": "float16", "normalized": True, "image_root": ".", "min_similarity": None,
              "weights": {"retrieval_dim": DIM}, "shards": shards, "sorted_ids": SORTED_IDS_FILE}
    with open(os.path.join(folder, INDEX_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return {"write_s": seconds, "jsonl_bytes": jsonl_bytes, "row_index_bytes": index_bytes,
            "sorted_ids_s": sorted_ids_s, "sorted_ids_bytes": sorted_ids_bytes}


def without_row_index(folder: str, target: str, keep_row_index: bool = False) -> None:
    """The same set as older versions saved it: links to the same files, a config without `sorted_ids` and (unless
    `keep_row_index`) without `row_index`."""
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(folder, INDEX_CONFIG_FILE)) as f:
        config = json.load(f)
    config.pop("sorted_ids")
    for shard in config["shards"]:
        if not keep_row_index:
            shard.pop("row_index")
        for key in ("embeddings", "metadata") + (("row_index",) if keep_row_index else ()):
            os.link(os.path.join(folder, shard[key]), os.path.join(target, shard[key]))
    os.link(os.path.join(folder, PROBE_FILE), os.path.join(target, PROBE_FILE))
    with open(os.path.join(target, INDEX_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


LOAD_SCRIPT = """
import json, logging, sys, time, numpy as np
def rss():
    # Private memory (RssAnon) and file pages mapped in (RssFile: the JSON Lines and row index pages read; clean,
    # shared with the page cache, dropped first under memory pressure).
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:", "VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out
from gill_pipeline.retrieval import RetrievalIndex
import gill_pipeline.retrieval.serialization as serialization
folder, n, lookups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = rss()
tick = time.perf_counter()
index = RetrievalIndex.from_pretrained(folder, mmap=True)
load = time.perf_counter() - tick
after_load = rss()
rng = np.random.default_rng(0)
rows = rng.integers(0, n, lookups).tolist()
tick = time.perf_counter()
records = [index.records[r] for r in rows]
get_s = time.perf_counter() - tick
ids = [f"laion2b-{r:010d}" for r in rng.integers(0, n, lookups).tolist()]
tick = time.perf_counter()
found = [index.row_of(i) for i in ids]
find_s = time.perf_counter() - tick
assert len(index) == n and all(rec["id"] == f"laion2b-{r:010d}" for rec, r in zip(records, rows))
assert found == [int(i.split("-")[1]) for i in ids]
print(json.dumps({"load_s": load, "base": base, "after_load": after_load, "after_lookups": rss(),
                  "get_us": get_s / lookups * 1e6, "row_of_us": find_s / lookups * 1e6,
                  "module": serialization.__file__}))
"""


def measure(folder: str, n: int, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, folder, str(n), str(LOOKUPS)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_old(ref: str, target: str) -> str:
    """The package as it was at `ref` (before the record table), for its loader; its `src` folder."""
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "src/gill_pipeline"], check=True,
                             capture_output=True).stdout
    os.makedirs(target, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return os.path.join(target, "src")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--old-max-rows", type=int, default=1_000_000,
                        help="Measure the old loader (a list of dicts) up to this many rows.")
    parser.add_argument("--plain-max-rows", type=int, default=10_000_000,
                        help="Measure this version on the folder without row index files up to this many rows.")
    parser.add_argument("--old-ref", default="b24ff8b", help="The git revision whose loader is the old one.")
    parser.add_argument("--workdir", default=None, help="Where the sets are written (deleted after); a temp folder.")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "records_scale.md"))
    args = parser.parse_args(argv)
    if any(v <= 0 for v in args.sizes):
        parser.error(f"`--sizes` must be positive, got {args.sizes}.")
    earlier = []
    json_path = os.path.splitext(args.output)[0] + ".json"
    if os.path.isfile(json_path):  # sizes not run again keep their rows (rows of before the sorted ids renamed)
        with open(json_path) as f:
            earlier = [r for r in json.load(f)["rows"] if r["rows"] not in args.sizes]
        for r in earlier:
            if r["loader"] == "new" and "sorted_ids_s" not in r:
                r["loader"] = "new, no sorted ids"
    load_before = os.getloadavg()
    work = tempfile.mkdtemp(dir=args.workdir, prefix="bench_records-")
    new_path = os.path.join(REPO, "src")
    rows = []
    try:
        old_path = export_old(args.old_ref, os.path.join(work, "old"))
        for n in args.sizes:
            folder = os.path.join(work, f"set-{n}")
            written = write_set(folder, n)
            plain, unsorted = folder + "-plain", folder + "-unsorted"
            without_row_index(folder, plain)
            without_row_index(folder, unsorted, keep_row_index=True)
            runs = {"new": measure(folder, n, new_path), "new, no sorted ids": measure(unsorted, n, new_path)}
            if n <= args.plain_max_rows:
                runs["new, no row index"] = measure(plain, n, new_path)
            if n <= args.old_max_rows:
                runs["old"] = measure(plain, n, old_path)
                assert runs["old"]["module"].startswith(old_path), runs["old"]["module"]
            for name, run in runs.items():
                rows.append({"rows": n, "loader": name, **written, **run})
                print(json.dumps(rows[-1]), flush=True)
            for path in (folder, plain, unsorted):
                shutil.rmtree(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = sorted(earlier + rows, key=lambda r: r["rows"])
    write_markdown(args, rows, load_before, os.getloadavg())


def write_markdown(args, rows, load_before, load_after) -> None:
    gib = 2**30
    lines = [
        "# A retrieval set's records: the record table against a list of dicts",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; timings on this machine vary up to about 2x between "
        f"runs), Python {platform.python_version()}, numpy {np.__version__}. Written by "
        f"`python -m benchmarks.bench_records --sizes {' '.join(map(str, args.sizes))}`.",
        "",
        f"Records: `{record_line(123456789).decode()}` ({len(record_line(123456789))} bytes + newline), in shards of "
        f"{SHARD_ROWS:,} rows with 8-wide fp16 embeddings loaded with `mmap=True` (so that what is held is the "
        "records'). Each loader runs in a fresh process. \"Held\" is private memory (RssAnon) counted from after "
        f"`import gill_pipeline`, after the load and after {LOOKUPS} random `records[row]` and {LOOKUPS} random "
        "`row_of(id)`; \"file pages\" are the pages of memory-mapped files read in (RssFile: clean, shared with the "
        "page cache, dropped first under memory pressure); the peak is VmHWM less the RSS after the import. "
        f"`old` is the loader of `{args.old_ref}` (list of dicts + "
        "dict of ids), reading the same folder without row index files; `new, no row index` is this version on that "
        "folder (one streamed pass over the records); `new, no sorted ids` reads the row index files but not the "
        f"sorted id hashes (`{SORTED_IDS_FILE}`, which `new` memory-maps): it sorts the hashes at load, as versions "
        "before it did. Rows of a size not in this run's `--sizes` are kept from an earlier run.",
        "",
        "| rows | loader | load (s) | held after load (MiB) | held after lookups (MiB) | file pages after lookups "
        "(MiB) | peak RSS of the load (MiB) | bytes/row held | `records[row]` (us) | `row_of(id)` (us) | 100M rows would "
        "hold (GiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        held = r["after_lookups"]["RssAnon"] - r["base"]["RssAnon"]
        files = r["after_lookups"]["RssFile"] - r["base"]["RssFile"]
        lines.append(
            f"| {r['rows']:,} | {r['loader']} | {r['load_s']:.2f} | "
            f"{(r['after_load']['RssAnon'] - r['base']['RssAnon']) / 2**20:.0f} | {held / 2**20:.0f} | "
            f"{files / 2**20:.0f} | {(r['after_load']['VmHWM'] - r['base']['VmRSS']) / 2**20:.0f} | "
            f"{held / r['rows']:.1f} | {r['get_us']:.1f} | {r['row_of_us']:.1f} | "
            f"{held / r['rows'] * 1e8 / gib:.1f} |"
        )
    lines += ["", "Lookup times include page faults: a record read where its file's pages are not in the page cache costs "
              "one or two reads from disk (the offsets, then the line). The largest sets here do not stay cached on "
              "this machine (24 GiB shared with other jobs), so their lookups measure the disk, not the table."]
    lines += ["", "On disk per row: " + ", ".join(
        f"{r['rows']:,} rows: JSON Lines {r['jsonl_bytes'] / r['rows']:.1f} B, row index {r['row_index_bytes'] / r['rows']:.1f} B "
        f"(written in {r['write_s']:.0f} s with the records)"
        + (f", sorted ids {r['sorted_ids_bytes'] / r['rows']:.1f} B (sorted and written in {r['sorted_ids_s']:.1f} s)"
           if "sorted_ids_s" in r else "")
        for r in rows if r["loader"] in ("new", "new, no sorted ids") and "write_s" in r
        and (r["loader"] == "new" or not any(o["rows"] == r["rows"] and o["loader"] == "new" for o in rows))), ""]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:  # the raw figures
        json.dump({"load_average": [load_before[0], load_after[0]], "rows": rows}, f, indent=1)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
