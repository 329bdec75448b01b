"""Streaming an answer: text token by token, each image when it is ready, denoising progress in between.

`GILLStreamer` is a transformers `TextIteratorStreamer` (so the usual pattern works: run the call in a thread and
iterate the streamer) whose iterator also yields the answer's [`GILLImage`]s. Any transformers streamer (`put` /
`end`, e.g. `TextStreamer`) can be passed as `streamer=` too; it then gets the text only.
"""

from queue import Queue

import torch
from diffusers import DiffusionPipeline
from transformers import TextIteratorStreamer

from .inputs import is_number


class GILLStreamer(TextIteratorStreamer):
    r"""
    Iterates over an answer while the pipeline makes it: `str` pieces of text as tokens are decoded (whole words, as
    `TextIteratorStreamer` gives them), then each `GILLImage` when it is ready. `progress` holds `(step, total)` of
    the denoising loop under way (`None` before the first step).

    Args:
        tokenizer: The pipeline's tokenizer (`pipe.tokenizer`).
        timeout (`float`, *optional*): Seconds the iterator waits for the next item before raising `queue.Empty`.
        decode_kwargs: Passed to `tokenizer.decode` (defaults to `skip_special_tokens=True`).

    Example:
        ```py
        >>> from threading import Thread
        >>> streamer = GILLStreamer(pipe.tokenizer)
        >>> Thread(target=pipe, args=(["Draw a red circle."],), kwargs={"streamer": streamer}).start()
        >>> for item in streamer:
        ...     print(item if isinstance(item, str) else f"<{item.source} image>")
        ```
    """

    def __init__(self, tokenizer, timeout: float | None = None, **decode_kwargs):
        # A pipeline has a `decode` too (GILL's decoding loop): refuse it by name, not at the first token.
        if isinstance(tokenizer, DiffusionPipeline) or not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(
                f"`tokenizer` must be the pipeline's tokenizer (`pipe.tokenizer`), got {type(tokenizer).__name__} "
                f"{str(tokenizer)!r:.100}."
            )
        if timeout is not None and not (is_number(timeout) and timeout > 0):
            raise ValueError(f"`timeout` must be a positive number of seconds or None, got {timeout!r:.100}.")
        decode_kwargs.setdefault("skip_special_tokens", True)
        super().__init__(tokenizer, skip_prompt=False, timeout=timeout, **decode_kwargs)
        self.text_queue = Queue()
        self.progress: tuple[int, int] | None = None
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Ends the stream with `error`: the iterator raises it after the items already delivered (the pipeline calls
        this when the call fails, so a consumer never waits for an end that will not come)."""
        self.error = error
        self.end()

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise self.error
            raise

    def put_image(self, image) -> None:
        """Delivers one `GILLImage` (after the text decoded so far)."""
        self._flush_text()
        self.text_queue.put(image, timeout=self.timeout)

    def on_denoising_step(self, step: int, total: int) -> None:
        self.progress = (int(step), int(total))

    def _flush_text(self) -> None:
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len :]
            self.token_cache, self.print_len = [], 0
            if printable:
                self.text_queue.put(printable, timeout=self.timeout)


def end_stream(streamer, error: BaseException | None = None) -> None:
    """Ends a stream however the call ends: with `error`, a streamer that can carry it (`GILLStreamer.fail`) raises it
    to its consumer; any other streamer is ended. Nothing is done for an object that is not a streamer."""
    if streamer is None:
        return
    if error is not None and callable(getattr(streamer, "fail", None)):
        streamer.fail(error)
    elif callable(getattr(streamer, "end", None)):
        streamer.end()


def stream_tokens(streamer, token_ids: list[int]) -> None:
    """Sends text token ids to any transformers-style streamer (`put` takes a tensor of ids)."""
    if streamer is not None and token_ids:
        streamer.put(torch.tensor(token_ids, dtype=torch.long))


def check_streamer(streamer, batch) -> None:
    """Refuses, naming `streamer`, anything but a streamer of one answer."""
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(
            f"`streamer` must be a streamer with `put` and `end` (e.g. `GILLStreamer`, transformers' "
            f"`TextIteratorStreamer`), got {type(streamer).__name__} {streamer!r:.100}."
        )
    if len(batch) != 1:
        raise ValueError(f"`streamer` streams one answer, but {len(batch)} inputs were given.")


def stream_retrieved(streamer, requests, retrieve, retrieved, image_mode) -> set[int]:
    """Step 6c: retrieved images are final already, so a `GILLStreamer` gets those shown before any image is
    generated. Returns the ids of the images delivered."""
    delivered = set()
    if streamer is None or not hasattr(streamer, "put_image") or image_mode == "both":
        return delivered
    shown_retrieved = {key for key, chosen in zip(requests, retrieve) if chosen}
    for key, image in retrieved.items():
        if key not in shown_retrieved:
            continue  # below the set's similarity floor: the generated image is shown instead
        streamer.put_image(image)
        delivered.add(id(image))
    return delivered


def with_progress(callback, streamer):
    """A step-end callback that also reports denoising progress to the streamer."""

    def with_progress(pipe, step, timestep, callback_kwargs):
        streamer.on_denoising_step(step + 1, pipe.num_timesteps)
        return callback(pipe, step, timestep, callback_kwargs) if callback is not None else callback_kwargs

    return with_progress
