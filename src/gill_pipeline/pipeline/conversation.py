"""Multi-turn dialogue: a conversation object that keeps the LM's KV cache between turns.

Each turn renders the whole conversation (with the LM's chat template when it has one) and reuses the cached
prefix that the new rendering shares with what the LM already read: earlier turns, and the text of the last answer.
Only the new tokens run through the LM. Images GILL showed in earlier answers come back in later turns as visual
prefix, as in the paper's dialogue examples (so the cache is reused up to the first of them in the last answer).
"""

import inspect
from dataclasses import dataclass, field
from typing import Any

from diffusers.utils import logging

from .chat import check_message
from .inputs import is_image
from .unknown_words import warned_once


logger = logging.get_logger(__name__)


@dataclass
class GILLPast:
    """What the LM has read so far in a conversation: its KV cache and one key per cached position.

    A call given `past=` reuses the cache for the longest prefix whose keys (token ids; image contents) agree with the
    new input, and runs only the rest; that call changes the cache, so a past serves one call (a second one
    recomputes). `owner` ties it to the pipeline (LM and learned weights) that made it.
    """

    cache: Any
    keys: list[tuple] = field(default_factory=list)
    owner: tuple = ()
    reused: int = 0  # positions the call that made it took from the past it was given
    spent: bool = False  # set once a call has used (and so changed) its cache

    def __post_init__(self):
        if not isinstance(self.keys, list) or not all(isinstance(key, tuple) for key in self.keys):
            raise TypeError(
                f"`GILLPast.keys` must be a list of position keys (tuples), got {type(self.keys).__name__} "
                f"{self.keys!r:.80}. A past comes from a call's output (`out.past`); it is not built by hand."
            )
        if not isinstance(self.owner, tuple):
            raise TypeError(f"`GILLPast.owner` must be a tuple, got {type(self.owner).__name__}.")

    def __len__(self) -> int:
        return len(self.keys)

    def shared_prefix(self, keys: list[tuple]) -> int:
        n = 0
        for a, b in zip(self.keys, keys):
            if a != b:
                break
            n += 1
        return n


def past_owner(llm, gill, img_token_ids, device=None) -> tuple:
    """What ties a `GILLPast` to the pipeline that made it: its LM, learned weights and `[IMG]` ids, and the dtype and
    device the LM ran in (a cache made in float32 on one device cannot continue in bfloat16 or on another)."""
    dtype = llm.get_input_embeddings().weight.dtype
    return (id(llm), id(gill), tuple(img_token_ids), str(dtype), str(device))


def check_past(past, batch, use_cache: bool, owner: tuple) -> None:
    """Refuses, naming `past`, a past that cannot continue this call (another pipeline's, or several inputs)."""
    if past is None:
        return
    if not isinstance(past, GILLPast):
        raise TypeError(f"`past` must be the `past` of an earlier call's output, got {type(past).__name__}.")
    if len(batch) != 1 or not use_cache:
        raise ValueError(
            f"`past` continues one input decoded with a cache, got {len(batch)} inputs and `use_cache`="
            f"{use_cache}."
        )
    if past.cache is None:
        raise ValueError("`past` holds no cache (`past.cache` is None): pass the `past` of an earlier call's output.")
    if tuple(past.owner[:3]) != owner[:3]:
        raise ValueError(
            "`past` was made by another pipeline (another LM or other learned weights); its cache cannot be "
            "reused here. Start the conversation again without it."
        )
    if tuple(past.owner[3:]) != owner[3:]:
        made, now = " on ".join(past.owner[3:]), " on ".join(owner[3:])
        raise ValueError(
            f"`past` was made while the LM ran in {made}, and it now runs in {now} (the pipeline was moved or cast "
            "since): its cache cannot be reused. Start the conversation again without it."
        )


def reusable_past(past: GILLPast | None, keys: list[tuple] | None):
    """`(cache, length)`: `past`'s cache cut back to the prefix it shares with `keys`, or `(None, 0)`."""
    if past is None or keys is None:
        return None, 0
    if past.spent:
        logger.warning("This `past` was already used by a call; its cache is not reused (the answer is the same).")
        return None, 0
    past.spent = True
    # At least one position must run, to give the logits of the first new token.
    length = min(past.shared_prefix(keys), len(keys) - 1)
    cache = past.cache
    if length <= 0 or not hasattr(cache, "crop") or any(getattr(cache, "is_linear", [])):
        return None, 0  # recurrent states cannot be cut back: the whole input runs
    try:
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)  # transformers 5: a negative count of positions to remove from the end
    except Exception as error:  # e.g. a sliding-window layer that no longer holds the prefix
        logger.info(f"The cache of `past` cannot be cut back to {length} positions ({error}); recomputing.")
        return None, 0
    if cache.get_seq_length() != length:
        return None, 0
    return cache, length


def next_past(cache, keys: list[tuple], sequence, reused: int, owner: tuple) -> GILLPast:
    """The `past` a call hands on: its cache, and the keys of what the LM read (input, then the answer's tokens that
    were run through it; a last text token never is)."""
    fed = sequence.token_ids[: len(sequence.hidden_states)]
    return GILLPast(cache=cache, keys=keys + [("token", int(t)) for t in fed], owner=owner, reused=reused)


def user_message(content: Any, role: str = "user") -> dict:
    """What `GILLConversation.send` accepts -> one message in the transformers chat format: a string, a list of
    parts, or an interleaved list of strings and images."""
    if isinstance(content, dict) and "role" in content:
        check_message(content, "content")
        return content
    if isinstance(content, str) or is_image(content):
        content = [content]
    if not isinstance(content, (list, tuple)) or not content:
        raise ValueError(f"`content` must be text, an image, or a non-empty list of them, got {content!r:.100}.")
    parts = []
    for element in content:
        if isinstance(element, dict):
            parts.append(element)
        elif isinstance(element, str):
            parts.append({"type": "text", "text": element})
        elif is_image(element):
            parts.append({"type": "image", "image": element})
        else:
            raise TypeError(
                f"`content` elements must be text, images or message parts, got {type(element).__name__}."
            )
    message = {"role": role, "content": parts}
    check_message(message, "content")
    return message


# Call arguments a conversation sets itself on every turn.
CONVERSATION_ARGUMENTS = ("prompt", "inputs", "past", "streamer")


def check_messages(messages: Any, name: str) -> list[dict]:
    """A list of messages (or None), each checked; a str, a single dict or anything else is refused by name."""
    if messages is None:
        return []
    if not isinstance(messages, (list, tuple)):
        raise TypeError(
            f"`{name}` must be a list of messages [{{'role': ..., 'content': ...}}] or None, got "
            f"{type(messages).__name__} {messages!r:.100}."
        )
    for i, message in enumerate(messages):
        check_message(message, f"{name}[{i}]")
    return list(messages)


def check_call_settings(pipe, settings: dict, where: str) -> None:
    """Refuses, by name, settings the pipeline's call does not take and those the conversation sets itself."""
    own = sorted(set(settings) & set(CONVERSATION_ARGUMENTS))
    if own:
        raise TypeError(
            f"`{where}` got {own}, which the conversation sets on every turn: pass the message to `send`, and a "
            "streamer as `send(..., streamer=...)`."
        )
    parameters = inspect.signature(pipe.__call__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(settings) - set(parameters))
        if unknown:
            known = sorted(set(parameters) - set(CONVERSATION_ARGUMENTS) - {"self"})
            raise TypeError(f"`{where}` got unknown call settings {unknown}; `pipe(...)` takes {known}.")


class GILLConversation:
    r"""
    A multi-turn dialogue with a [`GILLPipeline`] that keeps the LM's KV cache between turns, so turn N runs only
    its new tokens.

    Args:
        pipe ([`GILLPipeline`]): The pipeline to talk to.
        messages (`list[dict]`, *optional*): Earlier messages (e.g. a system message) in the transformers chat format.
        call_defaults: Settings for every turn (`max_new_tokens`, `image_mode`, `num_inference_steps`, ...); a turn's
            own keyword arguments override them.

    Example:
        ```py
        >>> conv = GILLConversation(pipe, max_new_tokens=32)
        >>> answer = conv.send(["What is in this picture?", image])
        >>> answer = conv.send("Show me the same thing in blue.")   # reuses the cache of the first turn
        >>> conv.messages                                          # the whole dialogue, answers' images included
        ```
    """

    def __init__(self, pipe, messages: list[dict] | None = None, **call_defaults):
        if not callable(pipe) or not hasattr(pipe, "tokenizer") or not hasattr(pipe, "img_token_ids"):
            raise TypeError(f"`pipe` must be a `GILLPipeline`, got {type(pipe).__name__} {pipe!r:.100}.")
        self.pipe = pipe
        self.messages = check_messages(messages, "messages")
        check_call_settings(pipe, call_defaults, "call_defaults")
        self.call_defaults = call_defaults
        self.past: GILLPast | None = None
        self.last_output = None
        # Unknown words already named in this conversation: each turn re-sends the earlier ones, named once only.
        self.warned_words: set[str] = set()

    def send(self, content: Any, streamer=None, **call_kwargs) -> dict:
        """Adds a user turn, answers it, and returns the assistant message (also appended to `messages`)."""
        check_call_settings(self.pipe, call_kwargs, "send")
        message = user_message(content)
        if message["role"] == "assistant":
            # The pipeline would continue it (`continue_final_message`), leaving two assistant messages in a row.
            raise ValueError(
                "`content` is an 'assistant' message, but `send` adds a user turn. To continue an assistant message, "
                "call `pipe(conversation.messages + [message])`."
            )
        settings = {**self.call_defaults, **call_kwargs}
        with warned_once(self.warned_words):
            output = self.pipe(self.messages + [message], streamer=streamer, past=self.past, **settings)
        answer = output.messages[0]
        self.messages += [message, answer]
        self.past, self.last_output = output.past, output
        return answer

    def reset(self, messages: list[dict] | None = None) -> None:
        """Forgets the dialogue (and its cache)."""
        self.messages = check_messages(messages, "messages")
        self.past = None
        self.last_output = None
        self.warned_words = set()
