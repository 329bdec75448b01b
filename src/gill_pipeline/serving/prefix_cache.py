"""The prefix cache: the LM caches (`GILLPast`s) of recent conversations, reused when a client resends its history.

An OpenAI client resends the whole conversation every turn. The pipeline already reuses a `GILLPast` for the
longest prefix whose position keys (token ids; image contents) agree with the new input (`conversation.reusable_past`,
as `GILLConversation` does between turns); this module keeps those pasts between requests, in an LRU bounded by the
bytes of their tensors, and finds the one that shares the longest prefix with a new conversation.

A past serves one call (the call crops and extends its cache in place), so a hit hands out a copy and the entry stays
for other conversations with the same prefix (a shared system prompt, a retried request).
"""

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..pipeline.chat import is_chat, normalize_conversations, render_conversations
from ..pipeline.chat import has_chat_template
from ..pipeline.conversation import GILLPast
from ..pipeline.inputs import check_interleaved_sample


def past_nbytes(past: GILLPast) -> int:
    """Bytes of the tensors a past holds (its LM cache: every layer's keys and values, or recurrent states)."""
    seen: set[int] = set()

    def walk(value, depth: int = 0) -> int:
        if depth > 4 or id(value) in seen:
            return 0
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(walk(v, depth + 1) for v in value)
        if isinstance(value, dict):
            return sum(walk(v, depth + 1) for v in value.values())
        if hasattr(value, "__dict__"):
            return sum(walk(v, depth + 1) for v in vars(value).values())
        return 0

    return walk(past.cache)


def conversation_keys(pipe, messages: list[dict]) -> list[tuple]:
    """The position keys the pipeline will give `messages` (one per LM position of the rendered conversation), as
    `GILLPipeline.encode_prompt` computes them: what a cached past is matched against."""
    if not is_chat(messages):
        raise ValueError(f"`messages` must be chat messages, got {messages!r:.100}.")
    conversations, _ = normalize_conversations(messages, "prompt")
    sample = check_interleaved_sample(render_conversations(pipe.tokenizer, conversations, "prompt", False)[0], "prompt")
    add_bos = not has_chat_template(pipe.tokenizer)
    pieces = pipe.processor.tokenize_interleaved(sample, "prompt", add_bos)
    return pipe.processor.piece_keys(pieces)


@dataclass
class _Entry:
    past: GILLPast
    nbytes: int


class PrefixCache:
    """An LRU of `GILLPast`s with a cap on the bytes of their tensors.

    Args:
        max_bytes (`int`): Most bytes of cached tensors; the least recently used pasts are dropped beyond it (a past
            larger than the cap alone is not kept). 0 disables the cache.
        min_shared (`int`, *optional*, defaults to 2): Fewest shared positions for a hit (one shared BOS is no hit).
    """

    def __init__(self, max_bytes: int, min_shared: int = 2):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"`prefix_cache_bytes` must be an int >= 0, got {max_bytes!r:.100}.")
        self.max_bytes = max_bytes
        self.min_shared = min_shared
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self._next_id = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: list[tuple]) -> GILLPast | None:
        """A fresh copy of the cached past sharing the longest prefix with `keys`, or None (counted as a miss)."""
        with self._lock:
            best, best_shared = None, 0
            for entry_id, entry in self._entries.items():
                shared = entry.past.shared_prefix(keys)
                if shared > best_shared:
                    best, best_shared = entry_id, shared
            if best is None or best_shared < self.min_shared:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            past = self._entries[best].past
        # Copied outside the lock: the copy is the caller's to spend (cropped and extended in place by the call).
        return GILLPast(cache=copy.deepcopy(past.cache), keys=list(past.keys), owner=past.owner)

    def insert(self, past: GILLPast | None) -> None:
        """Keeps `past` (the `out.past` of a call), dropping least recently used pasts beyond the byte cap. A past
        whose keys are a prefix of the new one's (the same conversation one turn earlier) is replaced by it."""
        if past is None or past.cache is None or self.max_bytes == 0:
            return
        nbytes = past_nbytes(past)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            for entry_id, entry in list(self._entries.items()):
                if len(entry.past) <= len(past) and entry.past.shared_prefix(past.keys) == len(entry.past):
                    self._drop(entry_id)
            self._entries[self._next_id] = _Entry(past, nbytes)
            self._next_id += 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _drop(self, entry_id: int) -> None:
        self.bytes -= self._entries.pop(entry_id).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict:
        return {
            "cache_entries": len(self._entries),
            "cache_bytes": self.bytes,
            "cache_max_bytes": self.max_bytes,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_evictions": self.evictions,
        }
