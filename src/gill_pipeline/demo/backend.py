"""What the web page does, without gradio: turn the page's input into a chat turn, stream the answer into chat
history entries, reset. `app.build_demo` wires these methods to the page; tests call them directly.

The page's chat history uses gradio's messages format: `{"role": "user" | "assistant", "content": ...}` where content
is a string (Markdown), or a file `{"path": ..., "alt_text": ...}`.
"""

import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import PIL.Image

from ..constants import IMAGE_MODES
from ..utils.image_io import UnreadableImageError, check_max_pixels, read_image
from ..pipeline import GILLConversation, GILLImage
from ..pipeline.chat import GILL_IMAGE_PART_KEYS
from .rendering import describe_image, save_for_display
from .settings import DEFAULT_SEED, PAGE_SETTINGS, call_kwargs, preset_settings
from .streaming import stream_turn



class ChatBackend:
    r"""
    The callbacks of the demo page for one pipeline, shared by every browser session (each session keeps its own
    conversation in the page's state).

    Args:
        pipe ([`GILLPipeline`]):
            The pipeline every session talks to, one turn at a time.
        model (`str`, *optional*):
            The built-in model's name (`"shapes-world"`, `"tiny-random"`), whose preset gives the starting settings.
        settings (`dict`, *optional*):
            Option name (`settings.CALL_ARGUMENTS` keys) -> value, over the preset; `seed` sets the page's starting seed.
        images_dir (`str`, *optional*):
            Where the answer's images are written for the page (default: a new temporary folder).
        max_image_pixels (`int`, *optional*):
            Largest uploaded image accepted, in pixels (default: `gill_pipeline.utils.image_io.MAX_IMAGE_PIXELS`, 64 MP);
            larger ones are refused before they are decoded.
    """

    def __init__(
        self, pipe, model: str | None = None, settings: dict | None = None, images_dir: str | None = None,
        max_image_pixels: int | None = None,
    ):
        self.max_image_pixels = check_max_pixels(max_image_pixels, "max_image_pixels")
        settings = dict(settings or {})
        self.pipe = pipe
        self.seed = settings.pop("seed", DEFAULT_SEED)
        self.settings = {**preset_settings(model), **settings}
        if self.settings["image_mode"] not in IMAGE_MODES:
            raise ValueError(f"`settings['image_mode']` must be one of {IMAGE_MODES}, got {self.settings['image_mode']!r}.")
        call_kwargs(self.settings, seed=None)  # unknown option names fail here, not at the first turn
        self.images_dir = images_dir or tempfile.mkdtemp(prefix="gill_demo_")
        self._image_numbers = itertools.count()

    def page_defaults(self) -> dict:
        """The starting value of each setting on the page (`PAGE_SETTINGS` and `seed`)."""
        return {**{name: self.settings[name] for name in PAGE_SETTINGS}, "seed": self.seed}

    # ------------------------------------------------------------------------------------------------------------
    # Callbacks
    # ------------------------------------------------------------------------------------------------------------
    def user_message(self, message: dict | str | None, history: list) -> tuple[list, None, dict | None]:
        """The multimodal box's value (`{"text": ..., "files": [paths]}`) -> the history with the user's entries, an
        emptied box, and the turn waiting for `answer` (None when the box was empty)."""
        text, files = _text_and_files(message)
        if not text and not files:
            return history, None, None
        history = list(history or [])
        history += [{"role": "user", "content": {"path": path}} for path in files]
        if text:
            history.append({"role": "user", "content": text})
        return history, None, {"text": text, "files": files}

    def answer(
        self,
        pending: dict | None,
        history: list,
        conversation: Any,
        image_mode: str,
        steps: float,
        guidance_scale: float,
        seed: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[list, Any, str]]:
        """Streams GILL's answer to the waiting turn: yields (history, conversation, status line) as text, images and
        denoising progress arrive. The first turn of a session starts its conversation."""
        history = list(history or [])
        if pending is None:
            yield history, conversation, ""
            return
        if conversation is None:
            fixed = {k: v for k, v in self.settings.items() if k not in PAGE_SETTINGS}
            conversation = GILLConversation(self.pipe, **call_kwargs(fixed, seed=None))
        page = dict(
            image_mode=image_mode, steps=_whole(steps, "steps"), guidance_scale=float(guidance_scale),
            max_new_tokens=_whole(max_new_tokens, "max_new_tokens"),
        )
        content = [_load_image(path, self.max_image_pixels) for path in pending["files"]]
        if pending["text"]:
            content.append(pending["text"])
        start, shown, on_page = time.perf_counter(), [], {}
        yield history, conversation, "Thinking..."
        events = stream_turn(
            conversation, content, self.pipe.tokenizer, output_type="pil", **call_kwargs(page, seed=_whole(seed, "seed"))
        )
        for event in events:
            if event.kind == "text":
                if not event.value:
                    continue
                _add_text(shown, event.value)
                status = "Writing..."
            elif event.kind == "image":
                entries = self._image_entries(event.value)
                on_page[id(event.value.image)] = entries
                shown += entries
                status = "Writing..."
            elif event.kind == "progress":
                step, total = event.value
                status = f"Making an image: denoising step {step}/{total}"
            else:
                # Images are ready only after the text decoded around them, so they streamed in late; the finished
                # message puts everything in the answer's own order.
                shown = self._message_entries(event.value, on_page)
                status = f"Answered in {time.perf_counter() - start:.1f} s."
                warnings = getattr(getattr(conversation, "last_output", None), "warnings", None) or [[]]
                if warnings[0]:
                    status += " " + " ".join(warnings[0])
            turn = [{"role": "assistant", "content": entry["content"]} for entry in shown]
            yield history + turn, conversation, status

    def reset(self) -> tuple[list, None, str, None]:
        """Forgets the session's conversation: empty history, no conversation (a new one starts on the next turn)."""
        return [], None, "", None

    # ------------------------------------------------------------------------------------------------------------
    def _image_entries(self, image) -> list[dict]:
        """A `GILLImage` -> history entries: the image with its description, then its alternatives (`image_mode=
        "both"`), each labelled."""
        entries = []
        for label, shown in [("", image)] + [("alternative: ", alt) for alt in image.alternatives or []]:
            description = label + describe_image(shown)
            path = save_for_display(shown.image, self.images_dir, f"image_{next(self._image_numbers)}_{shown.source}")
            entries.append({"kind": "image", "content": {"path": path, "alt_text": description}})
            entries.append({"kind": "caption", "content": f"*{description}*"})
        return entries

    def _message_entries(self, message: dict, on_page: dict) -> list[dict]:
        """The assistant message -> history entries in its order, reusing the images already shown."""
        entries = []
        for part in message["content"]:
            if part["type"] == "text":
                if part["text"]:
                    _add_text(entries, part["text"])
            elif id(part["image"]) in on_page:
                entries += on_page[id(part["image"])]
            else:
                fields = {key: part[key] for key in GILL_IMAGE_PART_KEYS if key in part}
                entries += self._image_entries(GILLImage(image=part["image"], **fields))
        return entries


def _add_text(entries: list[dict], text: str) -> None:
    # Text that follows text extends the same chat bubble.
    if entries and entries[-1]["kind"] == "text":
        entries[-1]["content"] += text
    else:
        entries.append({"kind": "text", "content": text})


def _text_and_files(message: dict | str | None) -> tuple[str, list[str]]:
    if message is None:
        return "", []
    if isinstance(message, str):
        return message.strip(), []
    files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
    return (message.get("text") or "").strip(), [f for f in files if f]


def _load_image(path: str, max_pixels: int) -> PIL.Image.Image:
    # A ValueError is shown on the page as one line (app._user_errors); the upload is named as the user knows it.
    name = repr(os.path.basename(path))
    try:
        return read_image(path, max_pixels=max_pixels, name=name)  # above the limit: ImageTooLargeError, a ValueError
    except UnreadableImageError as error:
        raise ValueError(f"cannot read the uploaded image {name}: {error.reason}") from None
    except OSError as error:
        raise ValueError(f"cannot read the uploaded image {name}: {error.strerror or error}") from None


def _whole(value: float, name: str) -> int:
    # Sliders and number boxes deliver floats; the pipeline wants whole numbers for these.
    if value is None or float(value) != int(value):
        raise ValueError(f"`{name}` must be a whole number, got {value!r}.")
    return int(value)
