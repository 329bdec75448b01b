"""The simplest engine: one job at a time, in one worker thread, each job one `pipe(messages, ...)` call.

It is the one-at-a-time baseline the batched engine is measured against (benchmarks/bench_serve.py), and the engine
`gill serve --engine serial` runs. It keeps the `Engine` contract of `jobs.py`: a bounded queue (`QueueFull`), no
job taken once shutdown began (`EngineClosed`), a cancelled job dropped before it runs or stopped at its next token
or denoising step (`JobCancelled`), one job's error reaching that job's caller only.
"""

import asyncio
import logging
import queue
import threading
import time

import torch

from ..pipeline import GILLStreamer
from ..pipeline.chat import answer_to_message
from ..pipeline.pipeline_output import GILLImage
from .jobs import ChatJob, ChatResult, EngineClosed, Finished, ImageReady, JobCancelled, QueueFull, TextDelta

logger = logging.getLogger(__name__)


class _Forward:
    """Stands in for `GILLStreamer.text_queue`: each text piece or image goes straight to `callback` (the worker
    thread runs the call and delivers; nobody waits on a queue)."""

    def __init__(self, callback):
        self.callback = callback

    def put(self, item, timeout=None):
        if item is not None:  # None: the streamer's end marker
            self.callback(item)


class JobStreamer(GILLStreamer):
    """Counts the answer's text tokens, delivers its text and images to `on_item`, and stops the call at the next
    token or denoising step once `job.cancelled` is set."""

    def __init__(self, tokenizer, job: ChatJob, on_item):
        super().__init__(tokenizer)
        self.job, self.text_tokens = job, 0
        self.text_queue = _Forward(on_item)

    def _check(self):
        if self.job.cancelled.is_set():
            raise JobCancelled(f"request {self.job.request_id} was cancelled")

    def put(self, value):
        self._check()
        self.text_tokens += int(value.numel())
        super().put(value)

    def on_denoising_step(self, step, total):
        self._check()
        super().on_denoising_step(step, total)


def image_part(image: GILLImage) -> dict:
    """A streamed `GILLImage` -> the image part an answer message holds."""
    return answer_to_message([image])["content"][0]


def run_job(pipe, job: ChatJob, on_event=None) -> ChatResult:
    """Runs `job` through `pipe` alone; `on_event` gets each `TextDelta` / `ImageReady` as it is made."""

    def on_item(item):
        if on_event is None:
            return
        if isinstance(item, str):
            if item:
                on_event(TextDelta(item))
        else:
            on_event(ImageReady(image_part(item)))

    if job.cancelled.is_set():
        raise JobCancelled(f"request {job.request_id} was cancelled before it ran")
    streamer = JobStreamer(pipe.tokenizer, job, on_item)
    generator = torch.Generator()
    if job.seed is not None:
        generator.manual_seed(job.seed)
    else:
        generator.seed()
    output = pipe(job.messages, **job.options, generator=generator, streamer=streamer, output_type="pil")
    message = output.messages[0]
    images = len(output.gill_images[0])
    completion = streamer.text_tokens + images * pipe.num_img_tokens
    # The LM read the prompt and the answer's tokens but its last one when that is text (`next_past`).
    parts = message["content"]
    ends_with_image = bool(parts) and parts[-1].get("type") == "image"
    prompt = len(output.past.keys) - completion + (0 if ends_with_image else 1) if output.past is not None else 0
    budget = job.options.get("max_new_tokens", 32)
    finish = "length" if streamer.text_tokens + images >= budget else "stop"
    return ChatResult(message=message, prompt_tokens=max(prompt, 0), completion_tokens=completion,
                      finish_reason=finish, warnings=list(output.warnings[0]))


class _Sink:
    """Hands a job's outcome from the worker thread to the asyncio caller (a future, or a queue of events)."""

    def __init__(self, loop, future=None, events=None):
        self.loop, self.future, self.events = loop, future, events

    def _call(self, fn, *args):
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the caller's loop is gone
            pass

    def event(self, event):
        if self.events is not None:
            self._call(self.events.put_nowait, event)

    def done(self, result: ChatResult):
        if self.future is not None:
            self._call(lambda: self.future.done() or self.future.set_result(result))
        self.event(Finished(result))

    def fail(self, error: BaseException):
        if self.future is not None:
            self._call(lambda: self.future.done() or self.future.set_exception(error))
        self.event(error)


class SerialEngine:
    """Runs jobs one at a time in a worker thread (see the module docstring).

    Args:
        pipe: the `GILLPipeline`.
        max_queue (`int`, defaults to 64): jobs waiting beyond the one running; one more gets `QueueFull`.
        retry_after_s (`float`, defaults to 1.0): the Retry-After hint of `QueueFull`.
    """

    def __init__(self, pipe, max_queue: int = 64, retry_after_s: float = 1.0):
        self.pipe, self.max_queue, self.retry_after_s = pipe, max_queue, retry_after_s
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._jobs: dict[str, ChatJob] = {}  # waiting or running, by request id
        self._waiting = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._counts = {"served": 0, "failed": 0, "cancelled": 0}

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="gill-serial-engine", daemon=True)
            self._thread.start()

    def _admit(self, job: ChatJob, sink: _Sink) -> None:
        with self._lock:
            if self._closed or self._thread is None:
                raise EngineClosed("the server is shutting down and takes no new request")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)", retry_after=self.retry_after_s)
            self._waiting += 1
            self._jobs[job.request_id] = job
        self._queue.put((job, sink))

    async def submit(self, job: ChatJob) -> ChatResult:
        future = asyncio.get_running_loop().create_future()
        self._admit(job, _Sink(asyncio.get_running_loop(), future=future))
        try:
            return await future
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def stream(self, job: ChatJob):
        events: asyncio.Queue = asyncio.Queue()
        self._admit(job, _Sink(asyncio.get_running_loop(), events=events))
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    finished = True
                    return
        finally:
            if not finished:
                job.cancelled.set()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, sink = item
            with self._lock:
                self._waiting -= 1
            try:
                result = run_job(self.pipe, job, sink.event)
            except JobCancelled as error:
                self._count("cancelled")
                sink.fail(error)
            except BaseException as error:  # this job's error, for its caller only; the engine goes on
                self._count("failed")
                sink.fail(error)
            else:
                self._count("served")
                sink.done(result)
            finally:
                with self._lock:
                    self._jobs.pop(job.request_id, None)

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Takes no new job; lets those queued or running finish for `grace_s` seconds, then cancels the rest."""
        with self._lock:
            self._closed = True
        if self._thread is None:
            return
        deadline = time.monotonic() + grace_s
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            left = list(self._jobs.values())
        if left:
            # Queued jobs are answered with JobCancelled unrun; the running one stops at its next token or step.
            logger.warning(f"Shutdown: cancelling {len(left)} request(s) still queued or running.")
            for job in left:
                job.cancelled.set()
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def stats(self) -> dict:
        with self._lock:
            return {"engine": "serial", "waiting": self._waiting, "active": len(self._jobs), "closed": self._closed,
                    **self._counts}
