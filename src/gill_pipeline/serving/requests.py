"""An OpenAI request body -> a checked `ChatJob` (docs/serve.md, "Fields").

Everything a client sends is checked here, before the engine sees it: each field's type and range, the messages and
their parts, and every image, whose declared size is read from its header before it is decoded (a 20000x20000 PNG
is a few hundred bytes). A refusal is an `ApiError` naming the field (`messages[0].content[1].image_url.url`) and
showing the value.

OpenAI's fields map to `pipe(...)` as follows: `max_completion_tokens` (or `max_tokens`) -> `max_new_tokens`;
`temperature` / `top_p` -> `do_sample`, `temperature`, `top_p`, where an unset or zero temperature is greedy decoding
(GILL's default; OpenAI's default of 1 would make every answer random) and any other value samples; `seed` -> the
job's `torch.Generator`. GILL's own options are extra top-level fields named as in `pipe(...)`. Unknown fields are
refused with 400, as OpenAI's API refuses them ("Unrecognized request argument supplied").
"""

import base64
import binascii
import math
import re
import urllib.request

from ..constants import IMAGE_MODES
from ..pipeline.inputs import MAX_SEED
from ..utils.image_io import ImageTooLargeError, UnreadableImageError, read_image
from .errors import ApiError, bad_request, show
from .jobs import ChatJob
from .settings import ServeSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI fields accepted and ignored: they change nothing in an answer.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "modalities")
# OpenAI fields this server cannot honour: accepted only when they ask for nothing (absent, null or the default).
NEUTRAL_VALUES = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
    "stop": ([],), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
    "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "reasoning_effort": (),
    "prediction": (), "audio": (), "web_search_options": (),
}
# `pipe(...)` arguments that OpenAI's own fields set: named in the refusal.
OPENAI_NAMES = {"max_new_tokens": "max_tokens (or max_completion_tokens)", "do_sample": "temperature",
                "generator": "seed", "steps": "num_inference_steps", "prompt": "messages"}
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def _int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"`{name}` must be an integer, got {show(value)}.", "invalid_type")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise bad_request(name, f"`{name}` must be {bound}, got {value}.")
    return value


def _number(value, name: str, minimum: float | None = None, maximum: float | None = None, above: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(name, f"`{name}` must be a number, got {show(value)}.", "invalid_type")
    low_ok = minimum is None or (value > minimum if above else value >= minimum)
    if not low_ok or (maximum is not None and value > maximum):
        low = f"{'>' if above else '>='} {minimum}" if minimum is not None else ""
        high = f"<= {maximum}" if maximum is not None else ""
        raise bad_request(name, f"`{name}` must be {' and '.join(x for x in (low, high) if x)}, got {value}.")
    return float(value)


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(name, f"`{name}` must be true or false, got {show(value)}.", "invalid_type")
    return value


def _str(value, name: str) -> str:
    if not isinstance(value, str):
        raise bad_request(name, f"`{name}` must be a string, got {show(value)}.", "invalid_type")
    return value


def _choice(value, name: str, choices) -> str:
    if value not in choices:
        raise bad_request(name, f"`{name}` must be one of {list(choices)}, got {show(value)}.")
    return value


def gill_fields(settings: ServeSettings) -> dict:
    """GILL's own request fields (named as in `pipe(...)`) -> their check."""
    return dict(
        image_mode=lambda v, n: _choice(v, n, IMAGE_MODES),
        num_inference_steps=lambda v, n: _int(v, n, 1, settings.max_inference_steps),
        guidance_scale=lambda v, n: _number(v, n, 0.0, 100.0),
        guidance_rescale=lambda v, n: _number(v, n, 0.0, 1.0),
        img_logit_scale=lambda v, n: _number(v, n, 0.0, above=True),
        height=lambda v, n: _int(v, n, 1, settings.max_image_side),
        width=lambda v, n: _int(v, n, 1, settings.max_image_side),
        min_text_tokens=lambda v, n: _int(v, n, 0, settings.max_tokens_cap),
        max_images=lambda v, n: _int(v, n, 0),
        stop_at_newline=_bool,
        num_images_per_prompt=lambda v, n: _int(v, n, 1, 8),
        eta=lambda v, n: _number(v, n, 0.0, 1.0),
    )


def check_object(body, name: str = "body") -> dict:
    if not isinstance(body, dict):
        raise bad_request(None, f"The request {name} must be a JSON object, got {show(body)}.", "invalid_type")
    return body


def check_model(body: dict, settings: ServeSettings) -> None:
    model = body.get("model")
    if model is None:
        return
    _str(model, "model")
    if model != settings.model_id:
        raise ApiError(404, f"The model {show(model)} does not exist here; this server serves {settings.model_id!r}.",
                       param="model", code="model_not_found")


def refuse_unknown(body: dict, known) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED_FIELDS:
            continue
        if name in NEUTRAL_VALUES:
            if value is None or value in NEUTRAL_VALUES[name]:
                continue
            raise bad_request(name, f"`{name}` is not supported by this server, got {show(value)}.", "unsupported_parameter")
        hint = f"; send {OPENAI_NAMES[name]} instead" if name in OPENAI_NAMES and name not in known else ""
        raise bad_request(name, f"Unrecognized request argument supplied: {name} (value {show(value)}){hint}.",
                          "unknown_parameter")


def parse_chat_request(body, settings: ServeSettings) -> ChatJob:
    """A `/v1/chat/completions` body -> a checked `ChatJob` (images decoded), or an `ApiError`."""
    body = check_object(body)
    gill = gill_fields(settings)
    known = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stream",
             *gill}
    refuse_unknown(body, known)
    check_model(body, settings)
    if body.get("n") is not None and _int(body["n"], "n", 1) != 1:
        raise bad_request("n", f"`n` must be 1 on this server (one answer per request; send n requests), got {body['n']}.")
    stream = _bool(body["stream"], "stream") if body.get("stream") is not None else False
    messages = parse_messages(body.get("messages"), settings)
    options = {**settings.defaults}
    for name, check in gill.items():
        if body.get(name) is not None:
            options[name] = check(body[name], name)
    options["max_new_tokens"] = parse_max_tokens(body, settings)
    options.update(parse_sampling(body))
    seed = _int(body["seed"], "seed", 0, MAX_SEED - 1) if body.get("seed") is not None else None
    return ChatJob(messages=messages, options=options, seed=seed, stream=stream)


def parse_max_tokens(body: dict, settings: ServeSettings) -> int:
    given = {name: _int(body[name], name, 1) for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None}
    if len(set(given.values())) > 1:
        raise bad_request("max_tokens", f"`max_tokens` ({given['max_tokens']}) and `max_completion_tokens` "
                          f"({given['max_completion_tokens']}) differ; send one of them.")
    if not given:
        return min(settings.defaults.get("max_new_tokens", 32), settings.max_tokens_cap)
    name, value = next(iter(given.items()))
    if value > settings.max_tokens_cap:
        raise bad_request(name, f"`{name}` must be <= {settings.max_tokens_cap} on this server, got {value}.")
    return value


def parse_sampling(body: dict) -> dict:
    """`temperature` / `top_p` -> `pipe(...)`'s sampling options: greedy unless a temperature above 0 is sent, or a
    `top_p` below 1 without a zero temperature (then at temperature 1)."""
    temperature = _number(body["temperature"], "temperature", 0.0, 2.0) if body.get("temperature") is not None else None
    top_p = _number(body["top_p"], "top_p", 0.0, 1.0, above=True) if body.get("top_p") is not None else 1.0
    if temperature == 0.0 or (temperature is None and top_p == 1.0):
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature if temperature is not None else 1.0, "top_p": top_p}


def parse_messages(messages, settings: ServeSettings) -> list[dict]:
    if messages is None:
        raise bad_request("messages", "`messages` is required: a non-empty list of {role, content} messages.", "missing")
    if not isinstance(messages, list):
        raise bad_request("messages", f"`messages` must be a list of messages, got {show(messages)}.", "invalid_type")
    if not messages:
        raise bad_request("messages", "`messages` is empty: send at least one message.")
    parsed, images = [], [0]
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict):
            raise bad_request(where, f"`{where}` must be an object with role and content, got {show(message)}.", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role", f"`{where}.role` must be one of {list(ROLES)}, got {show(role)}.")
        parsed.append({"role": ROLES[role], "content": parse_content(message.get("content"), f"{where}.content", settings, images)})
    return parsed


def parse_content(content, where: str, settings: ServeSettings, images: list[int]):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(where, f"`{where}` must be a string or a list of parts, got {show(content)}.", "invalid_type")
    parts = []
    for p, part in enumerate(content):
        name = f"{where}[{p}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _str(part.get("text"), f"{name}.text")})
        elif kind == "image_url":
            images[0] += 1
            if images[0] > settings.max_images_per_request:
                raise bad_request(name, f"`{name}`: more than {settings.max_images_per_request} images in one request "
                                  "(the server's --max-images-per-request).", "too_many_images")
            parts.append({"type": "image", "image": parse_image_part(part, name, settings)})
        else:
            raise bad_request(name, f"`{name}` must be a text part or an image_url part, got {show(part)}.")
    return parts


def parse_image_part(part: dict, name: str, settings: ServeSettings):
    """An `image_url` part -> a decoded RGB image; its size is checked from the header before decoding."""
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    where = f"{name}.image_url.url"
    if url is None or url == "":
        raise bad_request(where, f"`{where}` is missing: an image_url part needs a data: URL of the image.", "missing")
    _str(url, where)
    if url.startswith("data:"):
        data = decode_data_url(url, where)
    elif url.startswith(("http://", "https://")):
        if not settings.allow_urls:
            raise bad_request(where, f"`{where}`: http(s) image URLs are refused by this server (start it with "
                              f"--allow-urls to fetch them); send the image as a data: URL. Got {show(url)}.", "url_refused")
        data = download(url, where, settings.max_body_bytes)
    else:
        raise bad_request(where, f"`{where}` must be a data: URL (or http(s) with --allow-urls), got {show(url)}.")
    try:
        return read_image(data, max_pixels=settings.max_image_pixels, name=f"`{where}`")
    except ImageTooLargeError as error:
        raise bad_request(where, str(error).replace(" (`max_pixels`, or --max-image-pixels on the command line)",
                          " (the server's --max-image-pixels)"), "image_too_large") from None
    except UnreadableImageError as error:
        raise ApiError(422, f"`{where}` is not an image the server can decode: {error.reason}", where,
                       "unreadable_image") from None


def decode_data_url(url: str, where: str) -> bytes:
    match = DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise bad_request(where, f"`{where}` must be a base64 data: URL (data:image/png;base64,...), got {show(url, 60)}.")
    if match.group("mime") and not match.group("mime").startswith("image/"):
        raise bad_request(where, f"`{where}` has media type {match.group('mime')!r}; an image/* type is needed.")
    if not match.group("data"):
        raise bad_request(where, f"`{where}` holds no image data (an empty data: URL).", "missing")
    try:
        return base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(where, f"`{where}` is not valid base64: {show(match.group('data'), 40)}.") from None


def download(url: str, where: str, limit: int) -> bytes:
    """An image URL's bytes, at most `limit` of them (only with --allow-urls; docs/serve.md, "Security")."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (http(s) only, checked above)
            data = response.read(limit + 1)
    except (OSError, ValueError) as error:
        raise bad_request(where, f"`{where}`: cannot download {show(url)}: {error}", "download_failed") from None
    if len(data) > limit:
        raise ApiError(413, f"`{where}`: the image at {show(url)} is larger than {limit} bytes.", where, "image_too_large")
    return data


def parse_image_generation_request(body, settings: ServeSettings) -> tuple[ChatJob, str]:
    """A `/v1/images/generations` body -> a `ChatJob` whose answer is one generated image, and the response format
    (`"b64_json"` or `"url"`). The prompt is the user's message; `[IMG0]` is forced at once and generated."""
    body = check_object(body)
    gill = gill_fields(settings)
    extras = {k: gill[k] for k in ("num_inference_steps", "guidance_scale", "guidance_rescale", "eta", "num_images_per_prompt")}
    refuse_unknown(body, {"prompt", "model", "n", "size", "response_format", "seed", "quality", "style", *extras})
    check_model(body, settings)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt", f"`prompt` must be a non-empty string, got {show(prompt)}.",
                          "missing" if prompt is None else "invalid_value")
    if body.get("n") is not None and _int(body["n"], "n", 1) != 1:
        raise bad_request("n", f"`n` must be 1 on this server (one image per request), got {body['n']}.")
    for name in ("quality", "style"):
        if body.get(name) is not None:
            _str(body[name], name)
    response_format = body.get("response_format") or "b64_json"
    _choice(response_format, "response_format", ("b64_json", "url"))
    options = {k: settings.defaults[k] for k in ("num_inference_steps", "guidance_scale", "height", "width") if k in settings.defaults}
    options.update({name: check(body[name], name) for name, check in extras.items() if body.get(name) is not None})
    size = body.get("size")
    if size is not None and size != "auto":
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", _str(size, "size"))
        if match is None:
            raise bad_request("size", f"`size` must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {show(size)}.")
        options["width"] = _int(int(match.group(1)), "size", 1, settings.max_image_side)
        options["height"] = _int(int(match.group(2)), "size", 1, settings.max_image_side)
    # One [IMG] group at once (it counts as one token), generated by the decoder conditioned by GILL.
    options.update(image_mode="generate", img_logit_scale=math.inf, min_text_tokens=0, max_images=1, max_new_tokens=1,
                   do_sample=False)
    seed = _int(body["seed"], "seed", 0, MAX_SEED - 1) if body.get("seed") is not None else None
    job = ChatJob(messages=[{"role": "user", "content": prompt}], options=options, seed=seed)
    return job, response_format
