"""One chat turn, streamed: `conversation.send` runs in a worker thread and the caller iterates what it delivers.

Both front ends (`gill chat`, `gill demo`) consume the same events, so they show text, images and denoising
progress in the same order the pipeline produces them.
"""

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..pipeline import GILLStreamer

# How often the caller wakes up while nothing arrives, to report denoising progress (seconds).
POLL_SECONDS = 0.2


@dataclass
class TurnEvent:
    r"""
    Something a streamed turn delivered.

    Args:
        kind (`str`):
            `"text"` (a decoded text chunk), `"image"` (a `GILLImage`, as soon as it is ready), `"progress"`
            (`(step, total)` of the denoising loop running now) or `"done"` (the assistant message, last).
        value (`Any`):
            The chunk, image, progress pair or message.
    """

    kind: str
    value: Any


def stream_turn(conversation, content: Any, tokenizer, poll_seconds: float = POLL_SECONDS, **call_kwargs) -> Iterator[
    TurnEvent
]:
    """Sends `content` to `conversation` with a streamer and yields [`TurnEvent`]s until the answer is complete.

    An error in the worker is raised here, in the caller's thread, after what was streamed before it. Closing the
    generator early does not stop the worker; it finishes its turn in the background.
    """
    streamer = GILLStreamer(tokenizer, timeout=poll_seconds)
    outcome: dict[str, Any] = {}

    def work():
        try:
            outcome["message"] = conversation.send(content, streamer=streamer, **call_kwargs)
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    worker = threading.Thread(target=work, name="gill-turn", daemon=True)
    worker.start()
    items, last_progress, worker_done = iter(streamer), None, False
    while True:
        try:
            item = next(items)
        except StopIteration:
            break
        except queue.Empty:
            # Nothing new: report denoising progress. A worker that ended without closing the stream (an error before
            # the streamer's end) gets one more wait, which drains what it put just before it ended.
            progress = getattr(streamer, "progress", None)
            if progress is not None and progress != last_progress:
                last_progress = progress
                yield TurnEvent("progress", tuple(progress))
            if worker_done:
                break
            worker_done = not worker.is_alive()
            continue
        yield TurnEvent("text" if isinstance(item, str) else "image", item)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield TurnEvent("done", outcome["message"])
