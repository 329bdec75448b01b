"""A `ChatResult` -> OpenAI's JSON: `chat.completion`, the `chat.completion.chunk`s of a stream, and the answer of
`/v1/images/generations` (docs/serve.md, "Answers").

The answer is one assistant message whose `content` is a list of parts in answer order: `{"type": "text", ...}` and
`{"type": "image_url", "image_url": {"url": ...}, "gill": {...}}`, where `gill` carries what GILL knows of the image
(source, the decision head's probabilities, the retrieved record's caption, scores, the other image with
`image_mode="both"`). In a stream, an image arrives as a chunk whose delta has `"content": ""` and `"image": <the
part>` (a separate field, as OpenAI streams audio: clients that join `delta.content` strings keep working).
"""

import base64
import io
import json
import math
import time
from typing import Any, Callable

from .jobs import ChatJob, ChatResult

ImageToUrl = Callable[[Any], str]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def json_safe(value):
    """GILL's metadata as JSON can hold it: tuples -> lists, non-finite floats -> None, tensors/arrays -> lists or
    numbers, images and other objects left out (None)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and getattr(value, "ndim", 2) <= 1:  # numpy / torch scalars and vectors
        return json_safe(value.tolist())
    return None


def _field(image, key: str, default=None):
    return image.get(key, default) if isinstance(image, dict) else getattr(image, key, default)


def gill_metadata(image) -> dict:
    """What GILL knows of one answer image (a message part dict or a `GILLImage`)."""
    probs = _field(image, "decision_probs")
    metadata = json_safe(_field(image, "metadata") or {})
    return {
        "source": _field(image, "source"),
        "decision_probs": None if probs is None else {"generate": float(probs[0]), "retrieve": float(probs[1])},
        "caption": metadata.get("caption"),
        "metadata": metadata,
        "scores": json_safe(_field(image, "scores") or {}),
    }


def image_part(image, image_to_url: ImageToUrl) -> dict:
    """One answer image -> `{"type": "image_url", "image_url": {"url": ...}, "gill": {...}}`."""
    gill = gill_metadata(image)
    alternatives = _field(image, "alternatives") or []
    if alternatives:
        gill["alternatives"] = [image_part(other, image_to_url) for other in alternatives]
    return {"type": "image_url", "image_url": {"url": image_to_url(_field(image, "image"))}, "gill": gill}


def content_parts(message: dict, image_to_url: ImageToUrl) -> list[dict]:
    parts = []
    for part in message.get("content") or []:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if part.get("type") == "text":
            if part.get("text"):
                parts.append({"type": "text", "text": part["text"]})
        else:
            parts.append(image_part(part, image_to_url))
    return parts


def usage(result: ChatResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion_json(job: ChatJob, result: ChatResult, model: str, image_to_url: ImageToUrl, created: int | None = None) -> dict:
    return {
        "id": job.request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content_parts(result.message, image_to_url), "refusal": None},
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }],
        "usage": usage(result),
        "system_fingerprint": None,
        "gill": {"warnings": list(result.warnings)},
    }


def chunk_json(job: ChatJob, model: str, created: int, delta: dict, finish_reason: str | None = None,
               result: ChatResult | None = None) -> dict:
    chunk = {
        "id": job.request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if result is not None:  # the last chunk: usage (as with stream_options.include_usage) and GILL's warnings
        chunk["usage"] = usage(result)
        chunk["gill"] = {"warnings": list(result.warnings)}
    return chunk


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends the stream)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")


def first_image(result: ChatResult):
    for part in result.message.get("content") or []:
        if isinstance(part, dict) and part.get("type") == "image":
            return part
    return None


def images_json(result: ChatResult, response_format: str, image_to_url: ImageToUrl, created: int | None = None) -> dict:
    """The answer of `/v1/images/generations`: `data[0]` holds `b64_json` (PNG) or `url`, with GILL's metadata."""
    part = first_image(result)
    item = {"b64_json": base64.b64encode(png_bytes(part["image"])).decode("ascii")} if response_format == "b64_json" else {
        "url": image_to_url(part["image"])}
    item["revised_prompt"] = None
    item["gill"] = gill_metadata(part)
    return {"created": created or int(time.time()), "data": [item]}
