"""Any error of a streamed call, from the first argument check to the last image, ends the stream and reaches the
consumer iterating it (issue 22: "a stream that never ends")."""

import threading

import numpy as np
import pytest
from transformers import TextIteratorStreamer

from gill_pipeline import GILLStreamer

# A consumer that waits longer than this is a hang: the streamer's own timeout turns it into queue.Empty.
WAIT = 20


def consume(pipe, streamer, *args, **kwargs):
    """Runs the call in a thread as users do, iterates the streamer, returns (items, consumer error, call error)."""
    result = {}

    def run():
        try:
            result["out"] = pipe(*args, streamer=streamer, **kwargs)
        except BaseException as error:  # noqa: BLE001 - the call's error is what the test compares
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    items, consumer_error = [], None
    try:
        for item in streamer:
            items.append(item)
    except BaseException as error:  # noqa: BLE001
        consumer_error = error
    thread.join(timeout=WAIT)
    assert not thread.is_alive(), "the call did not finish"
    return items, consumer_error, result.get("error")


BAD_CALLS = {  # (prompt, other arguments)
    "bad argument": (["a red circle"], dict(max_new_tokens=-1)),
    "batch of two with a streamer": ([["a red circle"], ["a blue square"]], {}),
    "unreadable image": (["look", np.zeros((4, 4), dtype=np.float64)], {}),
    "prompt and inputs both": (["a red circle"], dict(inputs=["a blue square"])),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_a_refused_call_ends_the_stream_with_its_error(opt_pipe, case):
    args, kwargs = BAD_CALLS[case]
    streamer = GILLStreamer(opt_pipe.tokenizer, timeout=WAIT)
    items, consumer_error, call_error = consume(opt_pipe, streamer, args, **{"max_new_tokens": 4, **kwargs})
    assert isinstance(call_error, (ValueError, TypeError)), call_error
    assert consumer_error is call_error  # the consumer gets the same error, not a hang (queue.Empty) or a silent end
    assert "".join(items) == ""  # nothing but the end-of-stream flush


def test_an_error_while_decoding_reaches_the_consumer_after_what_was_streamed(opt_pipe, monkeypatch):
    def failing_decode(*args, **kwargs):
        kwargs["on_token"](0, 5)  # one token streamed, then the LM fails
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(opt_pipe, "decode", failing_decode)
    streamer = GILLStreamer(opt_pipe.tokenizer, timeout=WAIT)
    items, consumer_error, call_error = consume(opt_pipe, streamer, ["a red circle"], max_new_tokens=4)
    assert isinstance(call_error, RuntimeError) and consumer_error is call_error
    assert "".join(items) == opt_pipe.tokenizer.decode([5], skip_special_tokens=True)


def test_a_transformers_streamer_is_ended_on_error(opt_pipe):
    streamer = TextIteratorStreamer(opt_pipe.tokenizer, timeout=WAIT)
    items, consumer_error, call_error = consume(opt_pipe, streamer, ["a red circle"], max_new_tokens=-1)
    assert isinstance(call_error, ValueError)
    assert consumer_error is None and "".join(items) == ""  # ended (it cannot carry the error), not left waiting


def test_a_successful_stream_still_ends_normally(opt_pipe):
    streamer = GILLStreamer(opt_pipe.tokenizer, timeout=WAIT)
    items, consumer_error, call_error = consume(opt_pipe, streamer, ["a red circle"], max_new_tokens=4, max_images=0)
    assert consumer_error is None and call_error is None
    assert streamer.error is None
