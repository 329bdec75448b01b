"""The warning about words the LM's tokenizer does not know: once per call, and once per conversation.

A call names the unknown words of its prompt in one warning. A conversation re-sends every earlier turn on each turn,
so the same words would be named again at every later turn; `GILLConversation` therefore runs its turns inside
`warned_once(seen)`, which names each word once per conversation (`seen` holds those already named). The set is
thread-local: conversations served on other threads keep their own.
"""

import threading
from contextlib import contextmanager

from diffusers.utils import logging

logger = logging.get_logger(__name__)
_state = threading.local()


def unknown_words_message(words: list[str], unk_token) -> str:
    return (
        f"The prompt contains words this model's tokenizer does not know: {', '.join(map(repr, words))}. "
        f"The LM reads each as its unknown token {unk_token!r}; rephrase with words it knows."
    )


def warn_unknown_words(words: list[str], unk_token) -> None:
    """Logs one warning naming `words`, leaving out those already named in the current `warned_once` block."""
    seen = getattr(_state, "seen", None)
    if seen is not None:
        words = [word for word in words if word not in seen]
        seen.update(words)
    if words:  # the LM reads these as its unknown token, which silently changes the answer
        logger.warning(unknown_words_message(words, unk_token))


@contextmanager
def warned_once(seen: set):
    """Inside this block (on this thread), a word in `seen` is not named again, and each word named is added."""
    previous = getattr(_state, "seen", None)
    _state.seen = seen
    try:
        yield
    finally:
        _state.seen = previous
