"""Several `gill serve` replicas on one machine (issue 19, section 4): real server processes, driven over HTTP.

Starts `--replicas` (2) `gill serve` processes of the bundled model on free ports, each with `--threads` (1) torch
thread(s), and waits for their `/health`. Then asyncio + httpx clients (`--clients`, 16) send OpenAI streamed chat
completions, spread round-robin over the replicas in the order requests are sent: the role of a load balancer.
Side by side in one run, for each kind of answer (as in bench_serve.py: `text`, a sampled description of the input
picture; `image`, the description then an image, retrieved and generated, with `--steps` denoising steps), the same
requests (request `i` has seed `i`) go to one replica, then to all of them; `--rounds` repeats this, the order
alternated, against the machine's noise. Every answer is checked against the first one-replica answer to the same
request (texts equal, images within one 8-bit level).

The servers are always stopped: SIGTERM (a graceful shutdown), then SIGKILL to their process group after
`--stop-timeout` seconds; on an error, on Ctrl+C and on SIGTERM to this script too.

    python -m benchmarks.bench_serve_replicas [--replicas 2] [--clients 16[,32]] [--requests-per-client 30] [--steps 4]

Writes the "Several replicas" section of benchmarks/results/serve.md (the rest of the file is left as it is).
"""

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.bench_serve import (
    REPLICAS_HEADING,
    RESULTS,
    Tally,
    decoded_answer,
    http_client,
    percentile,
    read_text,
    replace_section,
    same_answer,
    world_pngs,
)

logger = logging.getLogger("benchmarks.bench_serve_replicas")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    from gill_pipeline.serving.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists and has not ended (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Replicas:
    """`count` `gill serve` processes on free ports of 127.0.0.1, each in a session of its own (so a Ctrl+C in the
    terminal reaches this script only, and this script stops them in order). A context manager: leaving the `with`
    block, by any path, stops every one of them.

    Args:
        count (`int`): how many servers.
        model (`str`): the `--model` of each (the model name requests send).
        threads (`int`): the `--threads` of each.
        serve_args (`list[str]`): more `gill serve` options, the same for each.
        start_timeout (`float`): seconds to wait for every `/health` before giving up.
        stop_timeout (`float`): seconds a server has to end after SIGTERM before it is killed.
    """

    def __init__(self, count: int, model: str, threads: int = 1, serve_args=(), start_timeout: float = 600.0,
                 stop_timeout: float = 30.0):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"`count` must be a positive integer, got {count!r}.")
        self.count, self.model, self.threads, self.serve_args = count, model, threads, list(serve_args)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.processes: list[subprocess.Popen] = []
        self.logs: list = []
        self.urls: list[str] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "gill_pipeline", "serve", "--model", self.model, "--port", str(port),
                "--threads", str(self.threads), *self.serve_args]

    def start(self) -> "Replicas":
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        try:
            for _ in range(self.count):
                port = free_port()
                log = tempfile.TemporaryFile()  # not a pipe: a pipe nobody reads would block the server once full
                self.logs.append(log)
                self.processes.append(subprocess.Popen(
                    self.command(port), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=REPO,
                ))
                self.urls.append(f"http://127.0.0.1:{port}")
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, k: int, chars: int = 2000) -> str:
        self.logs[k].seek(0)
        return self.logs[k].read().decode(errors="replace")[-chars:]

    def wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.start_timeout
        waiting = set(range(self.count))
        while waiting:
            for k in sorted(waiting):
                if self.processes[k].poll() is not None:
                    raise RuntimeError(f"replica {k} ({self.urls[k]}) ended while starting, exit status "
                                       f"{self.processes[k].returncode}; its log ends with:\n{self.log_tail(k)}")
                try:
                    if httpx.get(self.urls[k] + "/health", timeout=2.0).status_code == 200:
                        waiting.discard(k)
                except httpx.HTTPError:
                    pass
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"replicas {sorted(waiting)} did not answer /health within {self.start_timeout} s")
            if waiting:
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to each server's process group, then SIGKILL to those still there after `stop_timeout` seconds;
        every process is waited for (no zombie, no orphan), even if this is interrupted."""
        try:
            for process in self.processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            for process in self.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        finally:
            for process in self.processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the group: anything the server started goes too
                process.wait()
            for log in self.logs:
                log.close()
            self.logs = []

    def health(self) -> list[dict]:
        import httpx

        return [httpx.get(url + "/health", timeout=10.0).json() for url in self.urls]

    def cpu_seconds(self) -> list[float]:
        """User + system CPU time each server has used so far (from /proc)."""
        ticks = os.sysconf("SC_CLK_TCK")
        seconds = []
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds.append((int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
        return seconds

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


async def drive(urls, kind, clients, requests, steps, pngs, model, api_key=None) -> tuple[Tally, float]:
    """`requests` requests from `clients` clients, each sent to the next of `urls` in turn (round-robin)."""
    import httpx

    tally, turn = Tally(), itertools.cycle(urls)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256)) as http:
        start = time.perf_counter()
        await asyncio.gather(*[
            http_client(http, lambda: next(turn), range(c, requests, clients), kind, steps, pngs, tally, api_key, model)
            for c in range(clients)
        ])
        return tally, time.perf_counter() - start


def batch_counts(health: list[dict]) -> tuple[float, float]:
    """(calls, jobs) the replicas' engines ran so far, from their /health counters."""
    calls = sum(h["engine"].get("batches_run", 0) for h in health)
    jobs = sum(h["engine"].get("batches_run", 0) * h["engine"].get("mean_batch_size", 0.0) for h in health)
    return calls, jobs


def bench(replicas: Replicas, kinds, levels, per_client, steps, rounds, api_key=None):
    """Rows of (kind, clients, replicas used, round) side by side, and the check of every answer against the first
    one-replica answer to the same request."""
    pngs = world_pngs()
    rows, reference, checked, mismatched = [], {kind: {} for kind in kinds}, 0, []
    for url in replicas.urls:  # warm-up: each server's first call of each kind pays one-off costs
        for kind in kinds:
            tally, _ = asyncio.run(drive([url], kind, 1, 1, steps, pngs, replicas.model, api_key))
            if tally.errors:
                raise RuntimeError(f"warm-up request to {url} failed: {tally.errors[0]}")
    for kind, clients, round_ in itertools.product(kinds, levels, range(rounds)):
        requests = clients * per_client
        order = (1, replicas.count) if round_ % 2 == 0 else (replicas.count, 1)
        for used in order:
            urls = replicas.urls[:used]
            cpu_before, (calls_before, jobs_before) = replicas.cpu_seconds(), batch_counts(replicas.health())
            driver_before = time.process_time()
            tally, wall = asyncio.run(drive(urls, kind, clients, requests, steps, pngs, replicas.model, api_key))
            driver = (time.process_time() - driver_before) / wall
            cpu_after, (calls_after, jobs_after) = replicas.cpu_seconds(), batch_counts(replicas.health())
            calls = calls_after - calls_before
            rows.append(dict(
                kind=kind, clients=clients, replicas=used, round=round_ + 1, requests=requests,
                rps=len(tally.latency) / wall,
                p50=percentile(tally.latency, 50), p99=percentile(tally.latency, 99),
                ttft50=percentile(tally.ttft, 50), errors=len(tally.errors), full=tally.full,
                batch=(jobs_after - jobs_before) / calls if calls else 0.0,
                cores=(sum(cpu_after) - sum(cpu_before)) / wall,  # cores busy on average, servers only
                driver=driver,  # cores the clients (this process) kept busy
                load=os.getloadavg()[0],
            ))
            logger.warning(f"{kind:5} {clients} clients, {used} replica(s), round {round_ + 1}: "
                           f"{rows[-1]['rps']:.2f} req/s, "
                           f"p50 {rows[-1]['p50']:.2f} s, p99 {rows[-1]['p99']:.2f} s, mean batch "
                           f"{rows[-1]['batch']:.1f}, server cores {rows[-1]['cores']:.2f}, client cores "
                           f"{rows[-1]['driver']:.2f}, errors {len(tally.errors)}")
            for error in tally.errors[:3]:
                logger.warning(f"   error: {error}")
            for i, answer in tally.answers.items():
                if i not in reference[kind] and used == 1:  # the first one-replica answer to request i
                    reference[kind][i] = decoded_answer(answer)
                    continue
                checked += 1
                if i not in reference[kind] or not same_answer(decoded_answer(answer), reference[kind][i]):
                    mismatched.append((kind, clients, used, round_ + 1, i))
    return rows, checked, mismatched


def ratios(rows) -> list[tuple[str, int, int, int, float]]:
    """(kind, clients, round, replicas, N replicas / 1 replica in req/s)."""
    by = {(r["kind"], r["clients"], r["round"], r["replicas"]): r["rps"] for r in rows}
    out = []
    for kind, clients, round_, used in sorted(k for k in by if k[3] > 1):
        one = by.get((kind, clients, round_, 1))
        if one:
            out.append((kind, clients, round_, used, by[(kind, clients, round_, used)] / one))
    return out


def per_core(row) -> float:
    """Requests per second per core the servers kept busy: what the replicas made of the cores they got."""
    return row["rps"] / row["cores"] if row["cores"] > 0 else float("nan")


def report(rows, checked, mismatched, args, minutes, load_start, load_end) -> list[str]:
    lines = [
        REPLICAS_HEADING,
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
        f"(load average {load_start:.1f} at the start, {load_end:.1f} at the end), no GPU. {args.replicas} real "
        f"`gill serve` processes (`--model {args.model} --threads {args.threads} --max-batch-size "
        f"{args.max_batch_size}`, batched engine), each on its own port, started and stopped by the script. Whole run "
        f"{minutes:.1f} min.",
        "",
        f"Command: `python -m benchmarks.bench_serve_replicas --replicas {args.replicas} --clients {args.clients} "
        f"--requests-per-client {args.requests_per_client} --steps {args.steps} --rounds {args.rounds} --kinds "
        f"{args.kinds} --threads {args.threads}`",
        "",
        "This is also the load run over HTTP against real `gill serve` processes (the issue's section 3): "
        f"asyncio + httpx clients ({', then '.join(map(str, args.levels))} at once) send OpenAI streamed chat "
        "completions (`stream=true`, an image of the "
        "world as a `data:` URL, GILL's options as extra fields), each client one request after the other, "
        "spread round-robin over the replicas used (the role of a load balancer). `text`: a sampled description "
        "(`max_images=0`, 8 tokens); `image`: the description then an image, retrieved and generated "
        f"(`image_mode='both'`, {args.steps} denoising steps). Server cores: the servers' CPU seconds over the wall "
        "time; client cores: the same for the clients (this script's process). Both share the machine's cores with "
        "the other jobs (the load average).",
        "",
        "| answer | clients | replicas | round | requests | req/s | p50 latency (s) | p99 latency (s) | p50 TTFT (s) | "
        "mean batch | server cores | req/s per server core | client cores | load avg | 429/503 | errors |",
        "|" + " --- |" * 16,
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['clients']} | {r['replicas']} | {r['round']} | {r['requests']} | "
                     f"{r['rps']:.2f} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} | {r['ttft50']:.2f} | {r['batch']:.1f} | {r['cores']:.2f} | "
                     f"{per_core(r):.1f} | {r['driver']:.2f} | {r['load']:.1f} | {r['full']} | {r['errors']} |")
    lines += ["", "| answer | clients | round | replicas / 1 replica (req/s) | server cores, N / 1 | req/s per server "
              "core, N / 1 |", "| --- | --- | --- | --- | --- | --- |"]
    by = {(r["kind"], r["clients"], r["round"], r["replicas"]): r for r in rows}
    for kind, clients, round_, used, ratio in ratios(rows):
        one, many = by[(kind, clients, round_, 1)], by[(kind, clients, round_, used)]
        cores = many["cores"] / one["cores"] if one["cores"] else float("nan")
        efficiency = per_core(many) / per_core(one) if per_core(one) else float("nan")
        lines.append(f"| {kind} | {clients} | {round_} | {used}: {ratio:.2f}x | {cores:.2f}x | {efficiency:.2f}x |")
    lines += [
        "",
        f"Every answer of the other runs against the first one-replica answer to the same request (same seed; texts "
        f"equal, images within one 8-bit level): {checked - len(mismatched)} of {checked} identical"
        + (f"; different: {mismatched[:10]}" if mismatched else "") + ".",
    ]
    return lines


def check_args(parser, args) -> None:
    for name in ("replicas", "requests_per_client", "steps", "rounds", "threads", "max_batch_size"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    try:
        args.levels = [int(x) for x in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients takes numbers of clients separated by commas, got {args.clients!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error(f"--clients takes positive numbers of clients, got {args.clients!r}")
    if args.replicas < 2:
        parser.error(f"--replicas must be at least 2 (one replica is measured in the same run), got {args.replicas}")
    bad = [k for k in args.kinds.split(",") if k not in ("text", "image")]
    if bad:
        parser.error(f"--kinds takes 'text' and 'image', got {bad}")


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl+C, so the servers are stopped on the way out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2, help="servers started; 1 and all of them are measured")
    parser.add_argument("--model", default="shapes-world", help="the --model of every server")
    parser.add_argument("--kinds", default="text,image", help="text: max_images=0; image: text then an image")
    parser.add_argument("--clients", default="16", help="concurrent clients; several numbers, comma-separated, are "
                        "measured in turn")
    parser.add_argument("--requests-per-client", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the image answers")
    parser.add_argument("--rounds", type=int, default=2, help="1 replica then all, repeated (order alternated)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--max-batch-size", type=int, default=8, help="each server's --max-batch-size")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the servers' /health")
    parser.add_argument("--output", default=RESULTS, help="results file whose replicas section is (re)written")
    args = parser.parse_args(argv)
    check_args(parser, args)
    kinds = args.kinds.split(",")
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm) if threading_main() else None
    started, load_start = time.time(), os.getloadavg()[0]
    try:
        serve_args = ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(4 * max(args.levels))]
        replicas = Replicas(args.replicas, args.model, args.threads, serve_args, start_timeout=args.start_timeout)
        with replicas:
            logger.warning(f"{args.replicas} replicas up: {', '.join(replicas.urls)}")
            pids = replicas.pids
            rows, checked, mismatched = bench(replicas, kinds, args.levels, args.requests_per_client, args.steps,
                                              args.rounds)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    lines = report(rows, checked, mismatched, args, (time.time() - started) / 60, load_start, os.getloadavg()[0])
    text = replace_section(read_text(args.output), REPLICAS_HEADING, lines)  # read before the file is rewritten
    with open(args.output, "w") as f:
        f.write(text)
    print("\n".join(lines))
    print(f"wrote {args.output}")
    return {"rows": rows, "checked": checked, "mismatched": mismatched, "pids": pids, "ratios": ratios(rows)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    main()
