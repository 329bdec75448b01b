"""What `gill serve` is configured with: address, key, limits, queue and batching (docs/serve.md, "Limits").

One dataclass, checked when built, so a bad value is refused before the model loads (`gill serve` passes its
options here; tests build it directly).
"""

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from ..utils.image_io import MAX_IMAGE_PIXELS

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (a warning is due when a server binds elsewhere unkeyed)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


@dataclass
class ServeSettings:
    r"""
    Settings of one `gill serve` process.

    Args:
        host (`str`, defaults to `"127.0.0.1"`): address to bind; loopback by default.
        port (`int`, defaults to 8000): port to bind, in [0, 65535] (0: a free one, for tests).
        api_key (`str`, *optional*): when set, every `/v1/...` request needs `Authorization: Bearer <key>`.
        model_id (`str`, defaults to `"gill"`): the model name `/v1/models` lists and requests must name.
        allow_urls (`bool`): accept `http(s)` image URLs in messages (the server then downloads them); off by default.
        image_urls (`bool`): answer images as URLs of `/v1/files/<id>` instead of inline `data:` URLs.
        max_body_bytes (`int`, defaults to 16 MiB): largest request body, enforced while reading (413 beyond).
        max_image_pixels (`int`, defaults to 64 MP): largest input image, checked in its header before decoding.
        max_images_per_request (`int`, defaults to 8): most image parts in one request's messages.
        max_tokens_cap (`int`, defaults to 512): largest `max_tokens` a request may ask for.
        max_inference_steps (`int`, defaults to 200): largest `num_inference_steps` a request may ask for.
        max_image_side (`int`, defaults to 2048): largest `height` / `width` a request may ask for.
        request_timeout_s (`float`, defaults to 300): a request still unanswered after this is cancelled (504).
        max_batch_size (`int`, defaults to 8), batch_wait_ms (`float`, defaults to 10), max_queue (`int`, defaults
            to 64): the engine's dynamic batching and its queue (a full queue answers 429 with Retry-After).
        shutdown_grace_s (`float`, defaults to 10): on shutdown, how long running requests may finish.
        defaults (`dict`): `pipe(...)` options used where a request sets none (the built-in model's preset).
        max_stored_images (`int`, defaults to 256): with `image_urls`, how many answer images `/v1/files` keeps
            (oldest dropped first).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_id: str = "gill"
    allow_urls: bool = False
    image_urls: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_images_per_request: int = 8
    max_tokens_cap: int = 512
    max_inference_steps: int = 200
    max_image_side: int = 2048
    request_timeout_s: float = 300.0
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    shutdown_grace_s: float = 10.0
    defaults: dict[str, Any] = field(default_factory=dict)
    max_stored_images: int = 256

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"`host` must be a non-empty address, got {self.host!r:.100}.")
        _check_int(self.port, "port", 0, 65535)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("`api_key` must be a non-empty string or None (an empty key would accept anyone).")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"`model_id` must be a non-empty string, got {self.model_id!r:.100}.")
        for name in ("max_body_bytes", "max_image_pixels", "max_tokens_cap", "max_inference_steps", "max_image_side",
                     "max_batch_size", "max_queue", "max_stored_images"):
            _check_int(getattr(self, name), name, 1)
        _check_int(self.max_images_per_request, "max_images_per_request", 0)
        for name in ("request_timeout_s", "batch_wait_ms", "shutdown_grace_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative finite number, got {value!r:.100}.")
        if self.request_timeout_s == 0:
            raise ValueError("`request_timeout_s` must be above 0 (seconds), got 0.")
        if not isinstance(self.defaults, dict):
            raise TypeError(f"`defaults` must be a dict of `pipe(...)` options, got {type(self.defaults).__name__}.")

    @property
    def exposed_without_key(self) -> bool:
        """Bound beyond this machine with no API key: anyone who reaches the port can use the model."""
        return self.api_key is None and not is_loopback(self.host)


def _check_int(value, name: str, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r:.100}.")
