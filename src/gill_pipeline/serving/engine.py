"""The engine behind `gill serve`: one worker thread runs the pipeline; asyncio callers submit jobs and await them.

The pipeline is not thread-safe, so one thread owns it. Jobs wait in a bounded queue; the worker takes the jobs that
arrived together (waiting at most `batch_wait_ms` after the first, up to `max_batch_size`), answers those with equal
options in one `pipe(...)` call (`batching.py`: a batch answers exactly as its jobs alone; streamed jobs too, their
text streamed row by row), and runs a job that continues a cached prefix (`prefix_cache.py`) in a call of its own.
Every waiter is woken on every path: its result, its own error, `JobCancelled`, `TimeoutError`, or `EngineClosed`.
"""

import asyncio
import math
import threading
import time
from collections import deque

import torch

from diffusers.utils import logging

from ..pipeline.chat import answer_to_message
from ..pipeline.streaming import GILLStreamer
from .batching import job_generator, plan_groups
from .jobs import ChatJob, ChatResult, EngineClosed, Finished, ImageReady, JobCancelled, QueueFull, TextDelta
from .prefix_cache import PrefixCache, conversation_keys


logger = logging.get_logger(__name__)

DEFAULT_PREFIX_CACHE_BYTES = 256 * 1024 * 1024


class _Pending:
    """A job in the engine: where its answer goes (a future, or a stream's event queue), woken from the worker thread
    through the caller's event loop. Only the first outcome counts: later ones (a worker finishing a job that
    shutdown already cancelled) are dropped."""

    def __init__(self, job: ChatJob, loop: asyncio.AbstractEventLoop, timeout_s: float | None, streamed: bool):
        self.job = job
        self.streamed = streamed  # asked through `stream` (events) rather than `submit` (one result)
        self.loop = loop
        self.enqueued_at = time.monotonic()
        self.deadline = None if timeout_s is None else self.enqueued_at + timeout_s
        self.future = None if streamed else loop.create_future()
        self.events = asyncio.Queue() if streamed else None
        self.keys = None  # the rendered conversation's position keys (prompt tokens, cache lookup)
        self.text_sent = 0  # characters of text streamed so far
        self.skip_text = 0  # characters a rerun must not stream again
        self.past = None  # a cached prefix this job continues
        self.done = False
        self._lock = threading.Lock()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def stopped(self) -> BaseException | None:
        """Why the job must not run (on): cancelled, or past its deadline."""
        if self.job.cancelled.is_set():
            return JobCancelled(f"Job {self.job.request_id} was cancelled.")
        if self.expired():
            return TimeoutError(f"Job {self.job.request_id} ran past its timeout.")
        return None

    def _finish(self) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True

    def _call(self, callback, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the caller's loop is closed: nobody waits any more
            pass

    def emit(self, event) -> None:
        if self.events is not None and not self.done:
            self._call(self.events.put_nowait, event)

    def resolve(self, result: ChatResult) -> None:
        if not self._finish():
            return
        if self.future is not None:
            self._call(_set_result, self.future, result)
        else:
            self._call(self.events.put_nowait, Finished(result))

    def fail(self, error: BaseException) -> None:
        if not self._finish():
            return
        if self.future is not None:
            self._call(_set_exception, self.future, error)
        else:
            self._call(self.events.put_nowait, error)


def _set_result(future, result) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future, error) -> None:
    if not future.done():
        future.set_exception(error)


class _CancelWatch:
    """A streamer for a job that runs alone: the call stops at the job's next token (or denoising step) once it is
    cancelled or past its deadline (the pipeline ends the call with that error)."""

    def __init__(self, item: _Pending):
        self.item = item

    def check(self) -> None:
        error = self.item.stopped()
        if error is not None:
            raise error

    def put(self, value) -> None:
        self.check()

    def end(self) -> None:
        pass

    def on_denoising_step(self, step: int, total: int) -> None:
        self.check()


class _EventSink:
    """Where `GILLStreamer` puts text and images: turned into the job's stream events."""

    def __init__(self, item: _Pending):
        self.item = item

    def put(self, value, timeout=None) -> None:
        if value is None:  # the streamer's stop signal: `Finished` follows from the engine
            return
        if isinstance(value, str):
            # A job run again alone after its batch failed decodes the same text (exact batching): what its stream
            # already got is not sent twice.
            skip = min(self.item.skip_text, len(value))
            self.item.skip_text -= skip
            value = value[skip:]
            if value:
                self.item.text_sent += len(value)
                self.item.emit(TextDelta(value))
        else:
            self.item.emit(ImageReady(answer_to_message([value])["content"][0]))


class _EventStreamer(GILLStreamer):
    """`GILLStreamer` (whole words, images when ready) feeding a job's stream; stops the call when the job is
    cancelled or past its deadline."""

    def __init__(self, tokenizer, item: _Pending):
        super().__init__(tokenizer)
        self.item = item
        self.text_queue = _EventSink(item)
        self.watch = _CancelWatch(item)

    def put(self, value) -> None:
        self.watch.check()
        super().put(value)

    def drop_pending(self) -> None:
        """Forgets the tokens not yet streamed (an unfinished word): the job's rerun streams them."""
        self.token_cache, self.print_len = [], 0

    def put_token(self, token: int) -> None:
        """One token of a batched row (a cancelled row stops at its next choice: `GILLEngine._call`)."""
        super().put(torch.tensor([token], dtype=torch.long))

    def on_denoising_step(self, step: int, total: int) -> None:
        self.watch.check()
        super().on_denoising_step(step, total)


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r:.100}.")
    return value


def _check_seconds(value, name: str, allow_none: bool = True, allow_zero: bool = False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number of seconds {expected}, got {value!r:.100}.")
    return float(value)


class GILLEngine:
    r"""
    Runs `ChatJob`s on a `GILLPipeline` for many concurrent asyncio callers (the `Engine` of `serving/jobs.py`).

    Args:
        pipe ([`GILLPipeline`]): The pipeline; the engine's worker thread is the only one to call it.
        max_batch_size (`int`, *optional*, defaults to 8): Most jobs answered by one `pipe(...)` call.
        batch_wait_ms (`float`, *optional*, defaults to 10): Most time the first waiting job waits for others.
        max_queue (`int`, *optional*, defaults to 64): Most jobs waiting (not counting those running); beyond it
            `submit`/`stream` raise `QueueFull` at once.
        prefix_cache_bytes (`int`, *optional*, defaults to 256 MiB): Cap on the bytes of cached LM caches; 0 turns
            the prefix cache off.
        request_timeout_s (`float`, *optional*): Most seconds from submission to answer; then the job is cancelled
            and its caller gets `TimeoutError`.
        cache_hits_alone (`bool`, *optional*, defaults to `False`): Run every job that continues a cached prefix in a
            call of its own (`past=` takes one input) instead of batching it with others; by default the cache serves
            (and is filled by) the calls that hold one job anyway. See docs/serve_engine.md for the measured trade-off.
    """

    def __init__(
        self,
        pipe,
        max_batch_size: int = 8,
        batch_wait_ms: float = 10,
        max_queue: int = 64,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        request_timeout_s: float | None = None,
        cache_hits_alone: bool = False,
    ):
        if not callable(pipe) or not hasattr(pipe, "tokenizer"):
            raise TypeError(f"`pipe` must be a `GILLPipeline`, got {type(pipe).__name__} {pipe!r:.100}.")
        self.pipe = pipe
        self.max_batch_size = _check_positive_int(max_batch_size, "max_batch_size")
        self.batch_wait_s = _check_seconds(batch_wait_ms, "batch_wait_ms", allow_none=False, allow_zero=True) / 1000
        self.max_queue = _check_positive_int(max_queue, "max_queue")
        self.request_timeout_s = _check_seconds(request_timeout_s, "request_timeout_s")
        if not isinstance(cache_hits_alone, bool):
            raise TypeError(f"`cache_hits_alone` must be a bool, got {cache_hits_alone!r:.100}.")
        self.cache_hits_alone = cache_hits_alone
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # a server draws no progress bar per request
        self._queue: deque[_Pending] = deque()
        self._running: list[_Pending] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False  # no new job is taken
        self._stopping = False  # the worker ends once it has nothing left to run
        self._counts = dict(batches=0, batched_jobs=0, completed=0, failed=0, cancelled=0, rejected=0, timed_out=0)
        self._busy_s = 0.0

    # ------------------------------------------------------------------------------------------------------
    # The asyncio side
    # ------------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the worker thread (also done by the first `submit`/`stream`)."""
        self._start()

    def _start(self) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("The engine is shut down; it takes no new job.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="gill-engine", daemon=True)
                self._thread.start()

    def _enqueue(self, job: ChatJob, streamed: bool) -> _Pending:
        if not isinstance(job, ChatJob):
            raise TypeError(f"`job` must be a `ChatJob`, got {type(job).__name__} {job!r:.100}.")
        loop = asyncio.get_running_loop()
        self._start()
        item = _Pending(job, loop, self.request_timeout_s, streamed)
        with self._cond:
            if self._closed:
                raise EngineClosed("The engine is shutting down; it takes no new job.")
            if len(self._queue) >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(
                    f"The engine's queue is full ({self.max_queue} jobs waiting); retry later.",
                    retry_after=self._retry_after(),
                )
            self._queue.append(item)
            self._cond.notify_all()
        return item

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained by one call's worth (at least 1)."""
        batches = max(self._counts["batches"], 1)
        per_call = self._busy_s / batches if self._counts["batches"] else 1.0
        return float(min(60.0, max(1.0, math.ceil(per_call * (len(self._queue) / self.max_batch_size + 1)))))

    async def submit(self, job: ChatJob) -> ChatResult:
        """Answers `job`. Raises `QueueFull`/`EngineClosed` at once when it cannot be taken, the job's own error
        (`ValueError` for options the pipeline refuses), `JobCancelled`, or `TimeoutError` after
        `request_timeout_s`. Cancelling the awaiting task cancels the job."""
        item = self._enqueue(job, streamed=False)
        try:
            if self.request_timeout_s is None:
                return await item.future
            return await asyncio.wait_for(item.future, self.request_timeout_s)
        except asyncio.TimeoutError:
            self._time_out(item)
            raise TimeoutError(f"Job {job.request_id} took longer than {self.request_timeout_s} s.") from None
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    def stream(self, job: ChatJob):
        """Streams `job`'s answer: `TextDelta`s as decoded, `ImageReady` per image, `Finished` last. The job is
        queued when this is called (so `QueueFull`/`EngineClosed` are raised here, before any event); closing the
        iterator early (the client went away) cancels it. Batched with others, its text streams as its row decodes
        and its images come when the batch's are made; alone (a batch of one, or a cached prefix), each image comes
        when it is ready and a cancelled stream stops at its next token."""
        if not isinstance(job, ChatJob):
            raise TypeError(f"`job` must be a `ChatJob`, got {type(job).__name__} {job!r:.100}.")
        return self._events(self._enqueue(job, streamed=True))

    async def _events(self, item: _Pending):
        finished = False
        try:
            while True:
                remaining = None if item.deadline is None else max(item.deadline - time.monotonic(), 0.0)
                try:
                    event = await asyncio.wait_for(item.events.get(), remaining)
                except asyncio.TimeoutError:
                    self._time_out(item)
                    raise TimeoutError(f"Job {item.job.request_id} took longer than {self.request_timeout_s} s.")
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                yield event
                if isinstance(event, Finished):
                    finished = True
                    return
        finally:
            if not finished:
                item.job.cancelled.set()

    def _time_out(self, item: _Pending) -> None:
        """The caller stopped waiting at the job's deadline: the job is cancelled and counted once, as timed out."""
        item.job.cancelled.set()
        if item._finish():
            self._counts["timed_out"] += 1

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stops taking jobs (`EngineClosed`), lets queued and running jobs finish for up to `grace_s` seconds, then
        cancels the rest (their callers get `JobCancelled`) and stops the worker."""
        grace_s = _check_seconds(grace_s, "grace_s", allow_none=False, allow_zero=True)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self._queue or self._running):
            await asyncio.sleep(0.01)
        with self._cond:
            rest = list(self._queue) + list(self._running)
            self._queue.clear()
            self._stopping = True
            self._cond.notify_all()
        for item in rest:
            item.job.cancelled.set()
            item.fail(JobCancelled(f"Job {item.job.request_id} was cancelled: the server is shutting down."))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A running call stops at its next token (cancelled above); a batch call runs to its end, unawaited.
            await asyncio.to_thread(thread.join, 5.0)

    def stats(self) -> dict:
        counts = dict(self._counts)
        return {
            "queue_depth": len(self._queue),
            "running": len(self._running),
            "max_queue": self.max_queue,
            "max_batch_size": self.max_batch_size,
            "batches_run": counts["batches"],
            "mean_batch_size": counts["batched_jobs"] / counts["batches"] if counts["batches"] else 0.0,
            "jobs_completed": counts["completed"],
            "jobs_failed": counts["failed"],
            "jobs_cancelled": counts["cancelled"],
            "jobs_rejected": counts["rejected"],
            "jobs_timed_out": counts["timed_out"],
            "closed": self._closed,
            **self.prefix_cache.stats(),
        }

    # ------------------------------------------------------------------------------------------------------
    # The worker thread
    # ------------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while True:
                items = self._take()
                if items is None:
                    return
                self._run(items)
                with self._cond:
                    self._running = []
        except BaseException as error:  # the worker must never leave a waiter behind
            logger.error(f"The engine's worker stopped: {type(error).__name__}: {error}")
            with self._cond:
                self._closed = self._stopping = True
                rest = list(self._queue) + list(self._running)
                self._queue.clear()
            for item in rest:
                item.fail(EngineClosed(f"The engine stopped: {type(error).__name__}: {error}"))
            raise

    def _take(self) -> list[_Pending] | None:
        """The next jobs to run: waits for one, then at most `batch_wait_s` after its arrival for more."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = self._queue[0].enqueued_at + self.batch_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                return None
            items = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            self._running = list(items)
            return items

    def _run(self, items: list[_Pending]) -> None:
        items = [item for item in items if self._still_wanted(item)]
        for item in items:
            try:
                item.keys = conversation_keys(self.pipe, item.job.messages)
            except Exception as error:  # bad messages are this job's own error (ValueError/TypeError)
                self._fail(item, error)
        items = [item for item in items if not item.done]
        use_cache = self.prefix_cache.max_bytes > 0
        if use_cache and self.cache_hits_alone:
            for item in items:
                item.past = self.prefix_cache.lookup(item.keys)
        groups = plan_groups(items, self.max_batch_size, lambda item: item.past is not None)
        for group in groups:
            group_items = [item for item in group.items if self._still_wanted(item)]
            if not group_items:
                continue
            if len(group_items) == 1:
                item = group_items[0]
                if use_cache and not self.cache_hits_alone and item.past is None:
                    item.past = self.prefix_cache.lookup(item.keys)
                self._run_alone(item)
            else:
                self._run_batch(group_items)

    def _still_wanted(self, item: _Pending) -> bool:
        error = item.stopped()
        if error is not None:
            self._fail(item, error)
            return False
        return not item.done

    def _fail(self, item: _Pending, error: BaseException) -> None:
        if isinstance(error, JobCancelled):
            key = "cancelled"
        else:
            key = "timed_out" if isinstance(error, TimeoutError) else "failed"
        if not item.done:
            self._counts[key] += 1
        item.fail(error)

    def _run_batch(self, items: list[_Pending]) -> None:
        # Streamed jobs in a batch get their text as each row decodes it (the decoding step's per-row `on_token`);
        # their images come once the batch's images are made.
        streamers = {b: _EventStreamer(self.pipe.tokenizer, item) for b, item in enumerate(items) if item.streamed}
        try:
            output, rows = self._call(items, row_streamers=streamers)
        except Exception as error:
            # One bad job must not fail the others: each runs alone, and only the bad one gets the error (a stream
            # that already got text from the failed batch continues where it was).
            logger.warning(
                f"A batch of {len(items)} jobs failed ({type(error).__name__}: {error}); running each alone."
            )
            for b, item in enumerate(items):
                if self._still_wanted(item):
                    if b in streamers:
                        streamers[b].drop_pending()
                    item.skip_text = item.text_sent
                    self._run_alone(item)
            return
        for b, item in enumerate(items):
            if b in streamers and item.stopped() is None:
                streamers[b].end()  # the text still held back (an unfinished word)
                for part in output.messages[b]["content"]:
                    if part["type"] == "image":
                        item.emit(ImageReady(part))
            self._deliver(item, output, rows, b)

    def _run_alone(self, item: _Pending) -> None:
        streamer = _EventStreamer(self.pipe.tokenizer, item) if item.streamed else _CancelWatch(item)
        try:
            output, rows = self._call([item], streamer=streamer, past=item.past)
        except Exception as error:  # its own error, or JobCancelled / TimeoutError from the watch
            self._fail(item, error)
            return
        finally:
            item.past = None  # spent by the call (or not used): never kept with the job
        self.prefix_cache.insert(getattr(output, "past", None))
        self._deliver(item, output, rows, 0)

    def _call(self, items: list[_Pending], streamer=None, past=None, row_streamers=None):
        """One `pipe(...)` call for `items` (equal options); returns the output and each row's decoded sequence.
        `row_streamers` (batch row -> streamer) get the text tokens of the streamed rows of a batch."""
        decoded = []
        pipe = self.pipe
        decode = pipe.decode

        def on_token(row: int, token: int) -> None:
            row_streamer = row_streamers.get(row)
            if row_streamer is not None and row_streamer.item.stopped() is None:
                row_streamer.put_token(token)
            if all(item.stopped() is not None for item in items):
                raise JobCancelled("Every job of this batch was cancelled.")

        # The decoded rows say how many tokens each answer took and why it stopped (OpenAI's `usage` and
        # `finish_reason`), which the output does not carry: the call's own `decode` step (`GILLPipeline.decode`)
        # is wrapped, and given `on_token` for the streamed rows of a batch (the pipeline streams one input only).
        def should_stop(row: int) -> bool:
            if all(item.stopped() is not None for item in items):
                raise JobCancelled("Every job of this batch was cancelled.")
            return items[row].stopped() is not None

        def recording_decode(*args, **kwargs):
            if row_streamers is not None and kwargs.get("on_token") is None:
                kwargs["on_token"] = on_token
            if len(items) > 1 and kwargs.get("should_stop") is None:
                # A cancelled row of a batch stops at its next token and gets no image; the others run on, exact.
                kwargs["should_stop"] = should_stop
            result = decode(*args, **kwargs)
            decoded.append(result[0] if isinstance(result, tuple) else result)
            return result

        options = dict(items[0].job.options)
        prompt = items[0].job.messages if len(items) == 1 else [item.job.messages for item in items]
        generators = [job_generator(item.job) for item in items]
        started = time.monotonic()
        pipe.__dict__["decode"] = recording_decode
        try:
            output = pipe(
                prompt, generator=generators, output_type="pil", streamer=streamer, past=past, **options
            )
        finally:
            pipe.__dict__.pop("decode", None)
            self._busy_s += time.monotonic() - started
            self._counts["batches"] += 1
            self._counts["batched_jobs"] += len(items)
        return output, decoded[-1] if decoded else None

    def _deliver(self, item: _Pending, output, rows, b: int) -> None:
        error = item.stopped()
        if error is not None:  # cancelled while its batch ran: the answer is dropped
            self._fail(item, error)
            return
        row = rows[b] if rows is not None else None
        completion = len(row.token_ids) if row is not None else 0
        finished = row.finished if row is not None else True
        result = ChatResult(
            message=output.messages[b],
            prompt_tokens=len(item.keys or ()),
            completion_tokens=completion,
            finish_reason="stop" if finished else "length",
            warnings=list(output.warnings[b]) if output.warnings else [],
        )
        if not item.done:
            self._counts["completed"] += 1
        item.resolve(result)
