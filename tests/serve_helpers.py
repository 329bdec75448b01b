"""What the `gill serve` tests share: a server on a free port in this process, images as data: URLs, error checks."""

import base64
import contextlib
import io
import json
import time

from gill_pipeline.serving.app import create_app
from gill_pipeline.serving.serial_engine import SerialEngine
from gill_pipeline.serving.server import BackgroundServer
from gill_pipeline.serving.settings import ServeSettings

MODEL_ID = "tiny"
# The tiny random pipeline answers a few words then an image (a strong [IMG0] boost), 32x32, 1 denoising step.
TINY_DEFAULTS = dict(
    max_new_tokens=6, min_text_tokens=2, img_logit_scale=100.0, max_images=1, num_inference_steps=1, height=32, width=32,
)


@contextlib.contextmanager
def served(pipe, engine=None, **settings):
    """A `gill serve` app over `pipe` (one-at-a-time engine unless `engine`), on a free port, for the `with` block."""
    settings = ServeSettings(**{"model_id": MODEL_ID, "defaults": dict(TINY_DEFAULTS), **settings})
    engine = engine or SerialEngine(pipe, max_queue=settings.max_queue)
    server = BackgroundServer(create_app(engine, settings), settings)
    with server:
        server.engine = engine
        yield server


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_data_url(url: str):
    import PIL.Image

    assert url.startswith("data:image/png;base64,"), url[:40]
    return PIL.Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def assert_error(response, status: int, param=None, *words):
    """OpenAI's error JSON, one line, with `status`, naming `param`, and every word of `words` in its message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    message = error["message"]
    assert "\n" not in message and "Traceback" not in message and len(message) < 600, message
    assert error["param"] == param, error
    for word in words:
        assert word in message, (word, message)
    return error


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    """Polls `condition()` until true (a state the server reaches, never a duration asserted)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sse_events(raw: bytes) -> list:
    """A raw SSE body -> its `data:` payloads (JSON parsed; `[DONE]` kept as the string)."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-80:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
