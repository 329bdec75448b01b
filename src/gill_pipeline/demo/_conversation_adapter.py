"""Stand-in for `GILLConversation` / `GILLStreamer` while they are being written (issue 13, sections 2-3).

TEMPORARY: once `gill_pipeline` exports them, this module only re-exports them. The stand-in resends the whole chat
every turn (no KV cache) and delivers the answer to the streamer only when the turn is complete.
"""

import queue

try:
    from .. import GILLConversation, GILLStreamer
except ImportError:
    GILLConversation = GILLStreamer = None

from ..pipeline import GILLImage
from ..pipeline.chat import answer_to_message, content_elements


class _StandInStreamer:
    def __init__(self, tokenizer, timeout: float | None = None):
        self.tokenizer, self.timeout = tokenizer, timeout
        self.progress = None
        self._queue: queue.Queue = queue.Queue()

    def put_item(self, item):
        self._queue.put(item)

    def end(self):
        self._queue.put(StopIteration)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get(timeout=self.timeout)
        if item is StopIteration:
            raise StopIteration
        return item


class _StandInConversation:
    def __init__(self, pipe, **call_defaults):
        self.pipe, self.call_defaults, self.messages = pipe, call_defaults, []

    def reset(self):
        self.messages = []

    def send(self, content, streamer=None, **call_kwargs):
        if isinstance(content, str):
            content = [content]
        parts = [{"type": "text", "text": x} if isinstance(x, str) else x if isinstance(x, dict) else
                 {"type": "image", "image": x} for x in content]
        self.messages.append({"role": "user", "content": parts})
        sample = [e for m in self.messages for e in content_elements(m["content"])]
        output = self.pipe(sample, **{**self.call_defaults, **call_kwargs})
        answer = output.outputs[0]
        message = answer_to_message(answer)
        self.messages.append(message)
        if streamer is not None:
            for element in answer:
                streamer.put_item(element if isinstance(element, (str, GILLImage)) else str(element))
            streamer.end()
        return message


def new_conversation(pipe, **call_defaults):
    factory = GILLConversation if GILLConversation is not None else _StandInConversation
    return factory(pipe, **call_defaults)


def new_streamer(tokenizer, timeout: float | None = None):
    factory = GILLStreamer if GILLStreamer is not None else _StandInStreamer
    return factory(tokenizer, timeout=timeout)
