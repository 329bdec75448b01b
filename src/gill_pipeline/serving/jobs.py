"""What the HTTP layer hands the engine, and what the engine gives back.

The HTTP layer parses and checks a request completely (fields, limits, images decoded and size-checked) and builds a
`ChatJob`; the engine never sees JSON. The engine runs jobs (alone or batched with others; a batch answers exactly
as its rows alone) and reports each job's result or stream events. Errors the engine raises for one job are that
job's alone: `QueueFull` -> 429/503 with Retry-After, `EngineClosed` -> 503, `JobCancelled` (the client went away),
`ValueError` (options the pipeline refuses) -> 400.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol


class QueueFull(RuntimeError):
    """The engine's queue is full; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine is shutting down or stopped: no new job is taken."""


class JobCancelled(RuntimeError):
    """The job was cancelled (its client disconnected, or the server shut down before it ran)."""


@dataclass
class ChatJob:
    """One request: a conversation in `GILLPipeline`'s chat format and the `pipe(...)` options for its answer.

    Args:
        messages: chat messages as `pipe(messages)` takes them (images already decoded to PIL images).
        options: keyword arguments of `pipe(...)` for this answer (`max_new_tokens`, `do_sample`, `temperature`,
            `top_p`, `image_mode`, `num_inference_steps`, `guidance_scale`, `img_logit_scale`, ...), already checked.
            Never `generator`, `streamer`, `past` or `output_type`: the engine sets those.
        seed: the request's seed; the engine builds the job's own `torch.Generator` from it (None: a fresh one).
        stream: whether the client asked for server-sent events.
        cancelled: set when the client goes away; the engine drops the job at its next chance.
    """

    messages: list[dict]
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    stream: bool = False
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class ChatResult:
    """One answer: the assistant message (as `GILLPipelineOutput.messages[0]`: text parts and image parts with
    `source`, `decision_probs`, ... and a PIL `image`), token counts as OpenAI counts them, and why it stopped
    (`"stop"` or `"length"`)."""

    message: dict
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class TextDelta:
    """Stream event: text decoded so far since the last event."""

    text: str


@dataclass
class ImageReady:
    """Stream event: one image part of the answer (the dict an answer message holds), in answer order."""

    part: dict


@dataclass
class Finished:
    """Stream event, always the last one of a stream that did not fail: the whole result."""

    result: ChatResult


StreamEvent = TextDelta | ImageReady | Finished


class Engine(Protocol):
    """What `serving/app.py` needs from an engine (`serving/engine.py` implements it)."""

    async def start(self) -> None: ...

    async def submit(self, job: ChatJob) -> ChatResult: ...

    def stream(self, job: ChatJob) -> AsyncIterator[StreamEvent]: ...

    async def shutdown(self, grace_s: float = 10.0) -> None: ...

    def stats(self) -> dict: ...
