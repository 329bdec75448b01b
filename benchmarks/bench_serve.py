"""Load benchmark of `gill serve`'s engine (issue 19): dynamic batching vs one job at a time, under 1-64 clients.

The bundled shapes-world model answers an image of its world: a sampled description (text-only rows: `max_images=0`)
or the description then an image, retrieved and generated (`image_mode="both"`, 20 denoising steps: the preset of
`gill run --model shapes-world`). Side by side in one run, for each kind of answer, the same requests (request `i`
has seed `i`) go through the engine one job per call (`max_batch_size=1`) and with dynamic batching; every batched
answer is checked against its one-at-a-time answer (texts equal, images within one 8-bit level). Each client streams
its requests one after the other: time to first token is the first streamed event, latency the whole answer.

Also measured: 64 clients against a queue of 32 (`QueueFull` answers, i.e. HTTP 429s, and errors; clients wait the
`retry_after` they are given), the prefix cache on three-turn dialogues that resend their history, and the process's
resident memory over many requests (no leak).

    python -m benchmarks.bench_serve [--levels 1,4,16,64] [--requests-per-client 2] [--leak-requests 10000]
    python -m benchmarks.bench_serve --url http://127.0.0.1:8000   # the same load through `gill serve`'s HTTP API

Writes benchmarks/results/serve.md (engine mode only).
"""

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from gill_pipeline.serving.engine import GILLEngine
from gill_pipeline.serving.jobs import ChatJob, Finished, ImageReady, QueueFull, TextDelta

RESULTS = os.path.join(os.path.dirname(__file__), "results", "serve.md")
# benchmarks/bench_serve_replicas.py writes this section of the same results file; a run of this script keeps it.
REPLICAS_HEADING = "## Several replicas over HTTP (benchmarks/bench_serve_replicas.py)"
DIALOGUE_TURNS = ["", "make it blue", "now the same shape in green"]


def world_images():
    """Eight distinct pictures of the shapes world (the example image, flipped and rotated)."""
    from PIL import Image

    from gill_pipeline.bundled.presets import SHAPES_MODEL, example_image

    image = example_image(SHAPES_MODEL)
    ops = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
           Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE]
    return [image if op is None else image.transpose(op) for op in ops]


def world_pngs() -> list[bytes]:
    """`world_images()` as PNG files, as an HTTP client sends them."""
    pngs = []
    for image in world_images():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def answer_options(kind: str, steps: int) -> dict:
    if kind == "text":
        return dict(max_new_tokens=8, max_images=0, do_sample=True, temperature=0.7)
    return dict(max_new_tokens=8, img_logit_scale=2.0, max_images=1, image_mode="both", num_inference_steps=steps,
                guidance_scale=5.0, do_sample=True, temperature=0.7)


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fingerprint(result):
    return [p["text"] if p["type"] == "text" else np.asarray(p["image"], dtype=np.int16) for p in result.message["content"]]


def same_answer(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, str) != isinstance(y, str):
            return False
        if isinstance(x, str) and x != y:
            return False
        if not isinstance(x, str) and (x.shape != y.shape or np.abs(x - y).max() > 1):
            return False
    return True


class Tally:
    def __init__(self):
        self.latency, self.ttft, self.full, self.errors, self.answers = [], [], 0, [], {}


async def client(engine, indices, make_job, tally: Tally):
    """Sends its requests one after the other (streamed or not, as each job says); on `QueueFull` waits the
    `retry_after` it is given and retries."""
    for i in indices:
        while True:
            start, first = time.perf_counter(), None
            try:
                job = make_job(i)
                if job.stream:
                    result = None
                    async for event in engine.stream(job):
                        if first is None and isinstance(event, (TextDelta, ImageReady)):
                            first = time.perf_counter() - start
                        if isinstance(event, Finished):
                            result = event.result
                else:
                    result = await engine.submit(job)
            except QueueFull as error:
                tally.full += 1
                await asyncio.sleep(error.retry_after)
                continue
            except Exception as error:  # counted, never hidden: the target is zero
                tally.errors.append(f"{type(error).__name__}: {error}")
                break
            elapsed = time.perf_counter() - start
            tally.latency.append(elapsed)
            tally.ttft.append(first if first is not None else elapsed)
            tally.answers[i] = fingerprint(result)
            break


async def drive(engine, clients: int, requests: int, make_job) -> tuple[Tally, float]:
    tally = Tally()
    start = time.perf_counter()
    await asyncio.gather(*[client(engine, range(c, requests, clients), make_job, tally) for c in range(clients)])
    return tally, time.perf_counter() - start


async def bench_levels(pipe, kind, levels, per_client, steps, max_batch_size):
    """The same requests, one job per call then batched, at each number of clients."""
    images = world_images()
    options = answer_options(kind, steps)

    def make_job(i):
        return ChatJob([{"role": "user", "content": [{"type": "image", "image": images[i % len(images)]}]}],
                       dict(options), seed=i, stream=True)

    rows, answers = [], {}
    engines = {
        name: GILLEngine(pipe, max_batch_size=batch, batch_wait_ms=10, max_queue=256, prefix_cache_bytes=0)
        for name, batch in (("one at a time", 1), ("batched", max_batch_size))
    }
    for engine in engines.values():
        await engine.start()
        await drive(engine, 1, 1, make_job)  # warm-up
    for clients in levels:
        for name, engine in engines.items():  # side by side at each level, so machine noise hits both alike
            before = engine.stats()
            requests = max(clients * per_client, 8)
            tally, wall = await drive(engine, clients, requests, make_job)
            after = engine.stats()
            calls = after["batches_run"] - before["batches_run"]
            jobs = after["mean_batch_size"] * after["batches_run"] - before["mean_batch_size"] * before["batches_run"]
            rows.append(dict(
                kind=kind, engine=name, clients=clients, requests=requests, rps=len(tally.latency) / wall,
                p50=percentile(tally.latency, 50), p99=percentile(tally.latency, 99),
                ttft50=percentile(tally.ttft, 50), ttft99=percentile(tally.ttft, 99),
                batch=jobs / calls if calls else 0.0, errors=len(tally.errors), full=tally.full,
            ))
            answers[(name, clients)] = tally.answers
            print(f"{kind:5} {name:13} clients {clients:3}: {rows[-1]['rps']:.2f} req/s, p50 {rows[-1]['p50']:.2f} s, "
                  f"ttft p50 {rows[-1]['ttft50']:.2f} s, mean batch {rows[-1]['batch']:.1f}, errors {len(tally.errors)}",
                  flush=True)
            for error in tally.errors[:3]:
                print("   error:", error)
    for engine in engines.values():
        await engine.shutdown(grace_s=30)
    checked = mismatched = 0
    for clients in levels:
        ref = answers[("one at a time", clients)]
        for i, answer in answers[("batched", clients)].items():
            checked += 1
            mismatched += not (i in ref and same_answer(answer, ref[i]))
    return rows, checked, mismatched


async def bench_queue(pipe, steps, clients=64, max_queue=32, per_client=2, max_batch_size=8):
    images = world_images()
    options = answer_options("text", steps)
    engine = GILLEngine(pipe, max_batch_size=max_batch_size, max_queue=max_queue, prefix_cache_bytes=0)
    make_job = lambda i: ChatJob([{"role": "user", "content": [{"type": "image", "image": images[i % 8]}]}],  # noqa
                                 dict(options), seed=i, stream=True)
    tally, wall = await drive(engine, clients, clients * per_client, make_job)
    stats = engine.stats()
    await engine.shutdown(grace_s=30)
    return dict(clients=clients, max_queue=max_queue, requests=clients * per_client, served=len(tally.latency),
                full=tally.full, errors=len(tally.errors), wall=wall, rejected=stats["jobs_rejected"])


async def bench_dialogues(pipe, dialogues=8, steps=20, max_batch_size=8):
    """Three-turn dialogues (each turn resends the history, the answer's images included), all clients at once."""
    images = world_images()
    options = answer_options("image", steps)
    configs = [
        ("one at a time, no cache", dict(max_batch_size=1, prefix_cache_bytes=0)),
        ("one at a time, cache", dict(max_batch_size=1)),
        ("batched, no cache", dict(max_batch_size=max_batch_size, prefix_cache_bytes=0)),
        ("batched, cache for lone jobs (default)", dict(max_batch_size=max_batch_size)),
        ("batched, cache hits run alone", dict(max_batch_size=max_batch_size, cache_hits_alone=True)),
    ]
    rows, transcripts = [], {}
    for name, kwargs in configs:
        engine = GILLEngine(pipe, batch_wait_ms=10, **kwargs)

        async def dialogue(d):
            messages, answers = [], []
            for turn, text in enumerate(DIALOGUE_TURNS):
                content = [{"type": "image", "image": images[(d + turn) % 8]}]
                if text:
                    content.append({"type": "text", "text": text})
                messages = messages + [{"role": "user", "content": content}]
                result = await engine.submit(ChatJob(messages, dict(options), seed=100 * d + turn))
                messages = messages + [result.message]
                answers.append(fingerprint(result))
            return answers

        start = time.perf_counter()
        results = await asyncio.gather(*[dialogue(d) for d in range(dialogues)], return_exceptions=True)
        wall = time.perf_counter() - start
        stats = engine.stats()
        await engine.shutdown(grace_s=30)
        errors = [r for r in results if isinstance(r, BaseException)]
        transcripts[name] = results
        rows.append(dict(config=name, turns=dialogues * len(DIALOGUE_TURNS), wall=wall,
                         rps=dialogues * len(DIALOGUE_TURNS) / wall, hits=stats["cache_hits"],
                         misses=stats["cache_misses"], batch=stats["mean_batch_size"], errors=len(errors)))
        print(f"dialogues {name:40}: {rows[-1]['rps']:.2f} turns/s, hits {stats['cache_hits']}, "
              f"mean batch {stats['mean_batch_size']:.1f}, errors {len(errors)}", flush=True)
    reference = transcripts[configs[0][0]]
    same = {
        name: all(
            not isinstance(a, BaseException) and all(same_answer(x, y) for x, y in zip(a, b))
            for a, b in zip(results, reference)
        )
        for name, results in transcripts.items()
    }
    return rows, same


async def bench_memory(pipe, requests, clients=16, max_batch_size=8):
    images = world_images()
    options = answer_options("text", 20)
    engine = GILLEngine(pipe, max_batch_size=max_batch_size, max_queue=256)
    make_job = lambda i: ChatJob([{"role": "user", "content": [{"type": "image", "image": images[i % 8]}]}],  # noqa
                                 dict(options), seed=i, stream=bool(i % 2))
    warm_up = min(200, requests)
    await drive(engine, clients, warm_up, make_job)  # the allocator and caches settle
    samples = [(0, rss_mib())]
    done, errors, start = 0, 0, time.perf_counter()
    chunk = max(requests // 10, 1)
    while done < requests:
        n = min(chunk, requests - done)
        tally, _ = await drive(engine, clients, n, lambda i, base=done: make_job(base + i))
        errors += len(tally.errors)
        done += n
        samples.append((done, rss_mib()))
        print(f"memory: {done} requests, RSS {samples[-1][1]:.0f} MiB", flush=True)
    wall = time.perf_counter() - start
    stats = engine.stats()
    await engine.shutdown(grace_s=30)
    return dict(requests=requests, samples=samples, errors=errors, wall=wall, cache_bytes=stats["cache_bytes"])


# ----------------------------------------------------------------------------------------------------------------
# The same load through the HTTP API (OpenAI's chat completions, streamed), for a running `gill serve`.
# ----------------------------------------------------------------------------------------------------------------
def http_body(i, kind, steps, image_png: bytes, model: str = "shapes-world") -> dict:
    options = answer_options(kind, steps)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image_png).decode()}},
        ]}],
        "max_tokens": options.pop("max_new_tokens"),
        "temperature": options.pop("temperature"),
        "seed": i,
        "stream": True,
    }
    options.pop("do_sample")
    body.update(options)  # GILL's own options, as top-level fields named as in `pipe(...)`
    return body


async def http_client(http, next_url, indices, kind, steps, pngs, tally: Tally, api_key=None, model="shapes-world"):
    """Sends its requests one after the other to `next_url()` (a fixed server, or the next replica: the role of a load
    balancer); a 429/503 is retried after its Retry-After. Keeps each answer as `(text, image parts)` in
    `tally.answers` (the images still PNG `data:` URLs, decoded only when answers are compared)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for i in indices:
        while True:
            start, first, text, images, failed = time.perf_counter(), None, [], [], None
            try:
                body = http_body(i, kind, steps, pngs[i % len(pngs)], model)
                url = next_url()
                async with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
                    if response.status_code in (429, 503):
                        tally.full += 1
                        await response.aread()
                        await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                        continue
                    if response.status_code != 200:
                        tally.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                        break
                    async for line in response.aiter_lines():
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        if "error" in chunk:  # an error after the stream started
                            failed = f"stream error: {chunk['error'].get('message')}"
                            continue
                        delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
                        if first is None and (delta.get("content") or delta.get("image")):
                            first = time.perf_counter() - start
                        text.append(delta.get("content") or "")
                        if delta.get("image"):
                            images.append(delta["image"])
            except Exception as error:
                tally.errors.append(f"{type(error).__name__}: {error}")
                break
            if failed:
                tally.errors.append(failed)
                break
            elapsed = time.perf_counter() - start
            tally.latency.append(elapsed)
            tally.ttft.append(first if first is not None else elapsed)
            tally.answers[i] = ("".join(text), images)
            break


def decoded_answer(answer) -> list:
    """An HTTP answer `(text, image parts)` -> `fingerprint`'s form: the text, then each image (and its alternatives,
    with `image_mode="both"`) as an int16 array, so `same_answer` compares it."""
    from PIL import Image

    text, parts = answer
    arrays = []
    for part in parts:
        for image in [part, *part.get("gill", {}).get("alternatives", [])]:
            data = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
            with Image.open(io.BytesIO(data)) as png:
                arrays.append(np.asarray(png.convert("RGB"), dtype=np.int16))
    return [text, *arrays]


async def bench_http(url, kinds, levels, per_client, steps, api_key=None, transport=None):
    """The load of `bench_levels` through `gill serve`'s HTTP API at `url` (`transport`: an httpx transport, for
    tests)."""
    import httpx

    pngs = world_pngs()
    rows = []
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, transport=transport) as http:
        for kind in kinds:
            for clients in levels:
                tally, requests = Tally(), max(clients * per_client, 8)
                start = time.perf_counter()
                await asyncio.gather(*[
                    http_client(http, lambda: url.rstrip("/"), range(c, requests, clients), kind, steps, pngs, tally,
                                api_key)
                    for c in range(clients)
                ])
                wall = time.perf_counter() - start
                rows.append(dict(kind=kind, engine="http", clients=clients, requests=requests,
                                 rps=len(tally.latency) / wall, p50=percentile(tally.latency, 50),
                                 p99=percentile(tally.latency, 99), ttft50=percentile(tally.ttft, 50),
                                 ttft99=percentile(tally.ttft, 99), batch=float("nan"), errors=len(tally.errors),
                                 full=tally.full))
                print(f"http {kind:5} clients {clients:3}: {rows[-1]['rps']:.2f} req/s, p50 {rows[-1]['p50']:.2f} s, "
                      f"ttft p50 {rows[-1]['ttft50']:.2f} s, 429/503 {tally.full}, errors {len(tally.errors)}",
                      flush=True)
                for error in tally.errors[:3]:
                    print("   error:", error)
    return rows


# ----------------------------------------------------------------------------------------------------------------
def level_table(rows) -> list[str]:
    lines = ["| answer | engine | clients | requests | req/s | p50 latency (s) | p99 latency (s) | p50 TTFT (s) | "
             "p99 TTFT (s) | mean batch | QueueFull | errors |", "|" + " --- |" * 12]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['engine']} | {r['clients']} | {r['requests']} | {r['rps']:.2f} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} | {r['ttft50']:.2f} | {r['ttft99']:.2f} | {r['batch']:.1f} | "
                     f"{r['full']} | {r['errors']} |")
    return lines


def speedups(rows) -> list[str]:
    lines = ["| answer | clients | batched / one at a time (req/s) |", "| --- | --- | --- |"]
    by = {(r["kind"], r["engine"], r["clients"]): r["rps"] for r in rows}
    for kind, _, clients in sorted({(r["kind"], 0, r["clients"]) for r in rows}):
        one, batched = by.get((kind, "one at a time", clients)), by.get((kind, "batched", clients))
        if one and batched:
            lines.append(f"| {kind} | {clients} | {batched / one:.2f}x |")
    return lines


def read_text(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def section(text: str, heading: str) -> list[str]:
    """The lines of `text` from the line `heading` to the next `## ` heading (or the end); [] when absent."""
    lines = text.splitlines()
    if heading not in lines:
        return []
    start = lines.index(heading)
    end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return lines[start:end]


def replace_section(text: str, heading: str, new: list[str]) -> str:
    """`text` with its section `heading` replaced by the lines `new` (which start with `heading`), or with `new`
    appended when it has no such section."""
    lines, old = text.splitlines(), section(text, heading)
    if old:
        start = lines.index(heading)
        lines[start:start + len(old)] = new + ([""] if start + len(old) < len(lines) else [])
    else:
        lines += ([""] if lines else []) + new
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,16,64", help="numbers of concurrent clients")
    parser.add_argument("--kinds", default="text,image", help="text: max_images=0; image: text then an image")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the image answers")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--queue-clients", type=int, default=64, help="clients of the full-queue part (queue of half as "
                        "many); 0 skips")
    parser.add_argument("--dialogues", type=int, default=8, help="three-turn dialogues of the prefix-cache part; 0 skips")
    parser.add_argument("--leak-requests", type=int, default=10000, help="requests of the memory part; 0 skips")
    parser.add_argument("--threads", type=int, default=1, help="1 is the most stable setting on a shared machine")
    parser.add_argument("--url", help="drive a running `gill serve` at this URL instead of the engine in-process")
    parser.add_argument("--api-key", default=os.environ.get("GILL_API_KEY"))
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in ("text", "image")]
    if bad:
        parser.error(f"--kinds takes 'text' and 'image', got {bad}")
    torch.set_num_threads(args.threads)

    if args.url:
        rows = asyncio.run(bench_http(args.url, kinds, levels, args.requests_per_client, args.steps, args.api_key))
        print("\n".join(level_table(rows)))
        return {"http": rows}

    from gill_pipeline.bundled import load_bundled_pipeline

    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    started = time.time()
    level_rows, identity = [], {}
    for kind in kinds:
        rows, checked, mismatched = asyncio.run(
            bench_levels(pipe, kind, levels, args.requests_per_client, args.steps, args.max_batch_size)
        )
        level_rows += rows
        identity[kind] = (checked, mismatched)
    queue = None
    if args.queue_clients:
        queue = asyncio.run(bench_queue(pipe, args.steps, clients=args.queue_clients,
                                        max_queue=max(args.queue_clients // 2, 1), max_batch_size=args.max_batch_size))
        print(f"queue: {queue}", flush=True)
    dialogue_rows, dialogue_same = (
        asyncio.run(bench_dialogues(pipe, args.dialogues, args.steps, args.max_batch_size)) if args.dialogues else ([], {})
    )
    memory = asyncio.run(bench_memory(pipe, args.leak_requests)) if args.leak_requests else None
    minutes = (time.time() - started) / 60

    lines = [
        "# `gill serve` engine under load (benchmarks/bench_serve.py)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
        f"(load average at the end {os.getloadavg()[0]:.1f}), no GPU; torch {torch.__version__}, "
        f"{args.threads} torch thread(s). Model: the bundled shapes-world GILL (float32). Whole run {minutes:.0f} min.",
        "",
        f"Command: `python -m benchmarks.bench_serve --levels {args.levels} --kinds {args.kinds} --requests-per-client "
        f"{args.requests_per_client} --steps {args.steps} --max-batch-size {args.max_batch_size} "
        f"--queue-clients {args.queue_clients} --dialogues "
        f"{args.dialogues} --leak-requests {args.leak_requests} --threads {args.threads}`",
        "",
        "Every client streams its requests one after the other through `GILLEngine.stream` (asyncio, in-process: no "
        "HTTP). `text`: a sampled description of the input picture (`max_images=0`, 8 tokens); `image`: the "
        f"description then an image, retrieved and generated (`image_mode='both'`, {args.steps} denoising steps). "
        "One at a time is `max_batch_size=1`; batched is dynamic batching (`batch_wait_ms=10`, "
        f"`max_batch_size={args.max_batch_size}`). TTFT: the first streamed event (text).",
        "",
        "## Throughput and latency",
        "",
        *level_table(level_rows),
        "",
        *speedups(level_rows),
        "",
        "Every batched answer against its one-at-a-time answer (same request, same seed; texts equal, images within "
        "one 8-bit level): "
        + "; ".join(f"{kind}: {checked - bad} of {checked} identical" for kind, (checked, bad) in identity.items())
        + ".",
    ]
    if queue:
        lines += [
            "",
            "## A full queue",
            "",
            f"{queue['clients']} clients, `max_queue={queue['max_queue']}`, `max_batch_size={args.max_batch_size}`, "
            f"text answers, {queue['requests']} requests; a client given `QueueFull` (HTTP 429) waits its "
            "`retry_after` and retries.",
            "",
            "| requests | served | QueueFull (429) answers | errors | wall (s) |",
            "| --- | --- | --- | --- | --- |",
            f"| {queue['requests']} | {queue['served']} | {queue['full']} | {queue['errors']} | {queue['wall']:.1f} |",
        ]
    if dialogue_rows:
        lines += [
            "",
            "## Prefix cache: three-turn dialogues that resend their history",
            "",
            f"{args.dialogues} dialogues at once; each turn sends the whole conversation (the answers' images "
            "included) plus a new picture; image answers as above. `past=` continues one input and only a call of one "
            "input gives back a `past`, so the cache is filled and used by calls that hold one job: with every "
            "dialogue in step, batched calls hold several and the cache stays empty (0 hits), by design.",
            "",
            "| engine | turns | turns/s | cache hits | cache misses | mean batch | errors | answers = one at a time, "
            "no cache |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in dialogue_rows:
            lines.append(f"| {r['config']} | {r['turns']} | {r['rps']:.2f} | {r['hits']} | {r['misses']} | "
                         f"{r['batch']:.1f} | {r['errors']} | {'yes' if dialogue_same[r['config']] else 'NO'} |")
    if memory:
        samples = memory["samples"]
        lines += [
            "",
            "## Memory over many requests",
            "",
            f"{memory['requests']} text requests from 16 clients through the batched engine (half streamed, half "
            f"not), after {min(200, memory['requests'])} warm-up requests; {memory['errors']} errors; {memory['wall']:.0f} s.",
            "",
            "| requests | RSS (MiB) |",
            "| --- | --- |",
            *[f"| {n} | {rss:.0f} |" for n, rss in samples],
            "",
            f"RSS start {samples[0][1]:.0f} MiB, end {samples[-1][1]:.0f} MiB "
            f"({samples[-1][1] - samples[0][1]:+.0f} MiB).",
        ]
    kept = section(read_text(args.output), REPLICAS_HEADING)
    with open(args.output, "w") as f:
        f.write("\n".join(lines + ([""] + kept if kept else [])) + "\n")
    print(f"wrote {args.output}")
    return {"levels": level_rows, "identity": identity, "queue": queue, "dialogues": dialogue_rows,
            "dialogue_same": dialogue_same, "memory": memory}


if __name__ == "__main__":
    main()
