"""`gill serve` under bad input and bad clients: each gets its status and one line naming the field and value, and the
server keeps serving; plus `gill serve`'s command line."""

import base64
import json
import logging
import socket
import threading

import httpx
import pytest

from conftest import header_bomb_png, random_image
from gill_pipeline.commands import main
from gill_pipeline.commands import serve as serve_command
from gill_pipeline.serving.server import bind_socket
from serve_helpers import MODEL_ID, assert_error, png_data_url, served, sse_events, wait_until

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 2 * 1024 * 1024  # the fault server's body limit
GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "max_images": 0}


@pytest.fixture(scope="module")
def server(opt_pipe):
    with served(opt_pipe, api_key=KEY, max_body_bytes=LIMIT, max_images_per_request=2, max_tokens_cap=3000,
                max_queue=1) as server:
        yield server


def post(server, body, headers=AUTH, path="/v1/chat/completions", **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kwargs)


def assert_still_serving(server):
    answer = post(server, GOOD)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def with_content(*parts):
    return {**GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, *parts]}]}


def bomb_url(tmp_path_factory):
    path = header_bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 20000, 20000)
    data = open(path, "rb").read()
    assert len(data) < 2000  # a few hundred bytes declaring 400 MP
    return "data:image/png;base64," + base64.b64encode(data).decode()


IMG = "messages[0].content[1].image_url.url"
CASES = {
    # name: (body, status, param, words the message must hold)
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None, ["not valid JSON", "line 1"]),
    "JSON not an object": (b"[1, 2]", 400, None, ["JSON object", "[1, 2]"]),
    "NaN": (b'{"messages": [], "temperature": NaN}', 400, None, ["NaN"]),
    "empty body": (b"", 400, None, ["empty"]),
    "JSON nested too deeply": (b"[" * 100_000 + b"]" * 100_000, 400, None, ["nested too deeply"]),
    "unknown field": ({**GOOD, "frobnicate": 3}, 400, "frobnicate", ["frobnicate", "3"]),
    "pipe name of an OpenAI field": ({**GOOD, "max_new_tokens": 4}, 400, "max_new_tokens", ["max_new_tokens", "send max_tokens"]),
    "wrong type max_tokens": ({**GOOD, "max_tokens": "ten"}, 400, "max_tokens", ['"ten"']),
    "wrong type temperature": ({**GOOD, "temperature": "hot"}, 400, "temperature", ['"hot"']),
    "temperature out of range": ({**GOOD, "temperature": 7}, 400, "temperature", ["7"]),
    "wrong type guidance_scale": ({**GOOD, "guidance_scale": [1]}, 400, "guidance_scale", ["[1]"]),
    "bad image_mode": ({**GOOD, "image_mode": "sometimes"}, 400, "image_mode", ['"sometimes"', "generate"]),
    "n above 1": ({**GOOD, "n": 2}, 400, "n", ["2"]),
    "stream not a bool": ({**GOOD, "stream": "yes"}, 400, "stream", ['"yes"']),
    "negative seed": ({**GOOD, "seed": -1}, 400, "seed", ["-1"]),
    "max_tokens above the cap": ({**GOOD, "max_tokens": 5000}, 400, "max_tokens", ["5000", "3000"]),
    "unsupported stop": ({**GOOD, "stop": ["\n"]}, 400, "stop", ["not supported"]),
    "unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "model", ['"gpt-4o"', MODEL_ID]),
    "messages missing": ({"model": MODEL_ID}, 400, "messages", ["required"]),
    "empty messages": ({**GOOD, "messages": []}, 400, "messages", ["empty"]),
    "messages not a list": ({**GOOD, "messages": "hi"}, 400, "messages", ['"hi"']),
    "bad role": ({**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", ['"tool"']),
    "content a number": ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", ["5"]),
    "unknown part type": (with_content({"type": "audio"}), 400, "messages[0].content[1]", ['"audio"']),
    "image part without data": (with_content({"type": "image_url", "image_url": {}}), 400, IMG, ["missing"]),
    "image part with an empty data URL": (with_content(image_part("data:image/png;base64,")), 400, IMG, ["no image data"]),
    "image not base64": (with_content(image_part("data:image/png;base64,@@@")), 400, IMG, ["base64"]),
    "image not an image": (with_content(image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())),
                           422, IMG, ["cannot", "decode"]),
    "http URL without --allow-urls": (with_content(image_part("http://example.com/dog.png")), 400, IMG,
                                      ["--allow-urls", "http://example.com/dog.png"]),
    "other URL scheme": (with_content(image_part("file:///etc/passwd")), 400, IMG, ["file:///etc/passwd"]),
    "too many images": (with_content(*[image_part(png_data_url(random_image(i, 8))) for i in range(3)]), 400,
                        "messages[0].content[3]", ["more than 2 images"]),
    # Refused by the pipeline's own checks (through the engine): the argument is named as in pipe(...).
    "height the decoder cannot make": ({**GOOD, "max_images": 1, "img_logit_scale": 1000.0, "height": 33}, 400, None,
                                       ["height", "33"]),
    "height the decoder cannot make, streamed": ({**GOOD, "max_images": 1, "img_logit_scale": 1000.0, "height": 33,
                                                  "stream": True}, 400, None, ["height", "33"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_its_status_and_one_line(server, name):
    body, status, param, words = CASES[name]
    assert_error(post(server, body), status, param, *words)


def test_decompression_bomb_is_refused_before_decoding(server, tmp_path_factory):
    response = post(server, with_content(image_part(bomb_url(tmp_path_factory))))
    assert_error(response, 400, IMG, "20000x20000", "400,000,000", "--max-image-pixels")
    assert response.json()["error"]["code"] == "image_too_large"
    assert_still_serving(server)


def test_images_endpoint_bad_input(server):
    path = "/v1/images/generations"
    assert_error(post(server, {"model": MODEL_ID}, path=path), 400, "prompt", "prompt")
    assert_error(post(server, {"prompt": "x", "size": "big"}, path=path), 400, "size", '"big"')
    assert_error(post(server, {"prompt": "x", "response_format": "gif"}, path=path), 400, "response_format", '"gif"')
    assert_error(post(server, {"prompt": "x", "n": 3}, path=path), 400, "n", "3")
    assert_error(post(server, {"prompt": "x", "num_inference_steps": 0}, path=path), 400, "num_inference_steps", "0")


def test_api_key(server):
    assert_error(post(server, GOOD, headers={}), 401, None, "Authorization: Bearer")
    assert_error(post(server, GOOD, headers={"Authorization": "Bearer wrong"}), 401, None, "Incorrect API key")
    assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic abc"}), 401, None)
    assert httpx.get(server.url + "/health").status_code == 200  # load balancers probe without a key


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404, None, "/v1/nothing")
    assert_error(httpx.get(server.url + "/v1/chat/completions", headers=AUTH), 405, None)
    assert_error(httpx.get(server.url + "/v1/files/file-nope", headers=AUTH), 404, "file_id", "file-nope")


def raw_request(server, head: bytes, body_part: bytes) -> bytes:
    """Sends the request line, headers and part of a body on a raw socket, then reads the whole answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + body_part)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_50_mb_body_is_refused_before_it_is_read(server):
    """Content-Length says 50 MB; 1 KB is sent: the 413 comes at once, so the body is never waited for or buffered."""
    size = 50 * 1024 * 1024
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
    answer = raw_request(server, head, b"{" + b" " * 1023)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413 "), answer[:200]
    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert str(LIMIT) in error["message"] and error["code"] == "body_too_large"
    assert_still_serving(server)


def test_chunked_body_over_the_limit_is_refused_while_reading(server):
    """No Content-Length (chunked): the limit is counted as the body arrives."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b" " * 65536
    chunks = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(LIMIT // len(piece) + 1))
    answer = raw_request(server, head, chunks)  # no final chunk: the server answers without the end of the body
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert_still_serving(server)


def long_stream_body():
    # Thousands of tokens, no image: a job that runs until cancelled.
    return {**GOOD, "max_tokens": 3000, "stream": True}


def test_client_killed_mid_stream_cancels_its_job(server):
    before = server.engine.stats()["cancelled"]
    body = json.dumps(long_stream_body()).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(head + body)
    received = b""
    while received.count(b"data: ") < 3:  # the role chunk and some text: the job is running
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()  # the client dies mid-stream
    wait_until(lambda: server.engine.stats()["cancelled"] == before + 1 and server.engine.stats()["active"] == 0,
               what="the stream's job to be cancelled")
    assert_still_serving(server)


def test_full_queue_answers_429_with_retry_after(server):
    """One job running, one waiting (max_queue=1): the next request gets 429 and Retry-After, not a wait."""
    hold = []

    def long_request():
        hold.append(post(server, {**GOOD, "max_tokens": 3000}))

    threads = [threading.Thread(target=long_request) for _ in range(2)]
    threads[0].start()
    wait_until(lambda: server.engine.stats()["active"] == 1 and server.engine.stats()["waiting"] == 0, what="running")
    threads[1].start()
    wait_until(lambda: server.engine.stats()["waiting"] == 1, what="one waiting")
    response = post(server, GOOD)
    assert_error(response, 429, None, "queue is full")
    assert int(response.headers["retry-after"]) >= 1
    for t in threads:
        t.join()
    assert [r.status_code for r in hold] == [200, 200]
    assert_still_serving(server)


def test_timeout_cancels_the_request(opt_pipe):
    # An answer that cannot end within the timeout: the tiny LM's greedy text ends (EOS) after ~125 tokens, fast on an
    # idle machine, so the answer opens with a forced image of 200 denoising steps instead.
    slow = {**GOOD, "max_tokens": 3000, "max_images": 1, "img_logit_scale": 1e9, "min_text_tokens": 0,
            "image_mode": "generate", "num_inference_steps": 200}
    with served(opt_pipe, request_timeout_s=0.3, max_tokens_cap=3000) as server:
        response = post(server, slow, headers={})
        assert_error(response, 504, None, "--request-timeout")
        wait_until(lambda: server.engine.stats()["active"] == 0, what="the job to stop")
        assert server.engine.stats()["cancelled"] == 1


def test_request_after_shutdown_began_gets_503_while_running_ones_finish(opt_pipe):
    with served(opt_pipe, max_tokens_cap=3000, shutdown_grace_s=120) as server:
        running = []
        thread = threading.Thread(target=lambda: running.append(post(server, {**GOOD, "max_tokens": 300}, headers={})))
        thread.start()
        wait_until(lambda: server.engine.stats()["active"] == 1, what="a running request")
        shutdown = threading.Thread(target=lambda: server.call(server.app.state.gill.begin_shutdown()))
        shutdown.start()
        wait_until(lambda: server.app.state.gill.closing, what="shutdown to begin")
        response = post(server, GOOD, headers={})
        assert_error(response, 503, None, "shutting down")
        assert response.headers["retry-after"]
        assert httpx.get(server.url + "/health").status_code == 503
        thread.join()
        shutdown.join()
        assert running[0].status_code == 200  # the request under way when shutdown began was finished
        assert server.engine.stats()["closed"]


class BrokenEngine:
    """An engine whose jobs fail with a bug (not a user error); any object with the `Engine` protocol is served."""

    def __init__(self, fail_after_text: bool = False):
        self.fail_after_text = fail_after_text

    async def start(self):
        pass

    async def submit(self, job):
        raise RuntimeError("secret internal detail\nTraceback (most recent call last): ...")

    async def stream(self, job):
        from gill_pipeline.serving.jobs import TextDelta

        yield TextDelta("partial ")
        raise RuntimeError("secret internal detail")

    async def shutdown(self, grace_s=10.0):
        pass

    def stats(self):
        return {"engine": "broken"}


def test_engine_bug_is_a_one_line_500_and_an_error_event_mid_stream(opt_pipe, caplog):
    with served(opt_pipe, engine=BrokenEngine()) as server:
        with caplog.at_level(logging.ERROR, logger="gill_pipeline.serving.app"):
            response = post(server, GOOD, headers={})
        error = assert_error(response, 500, None, "RuntimeError", "server log")
        assert "secret" not in error["message"]
        assert "secret internal detail" in caplog.text  # the traceback is in the server's log
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**GOOD, "stream": True}) as streamed:
            assert streamed.status_code == 200
            events = sse_events(b"".join(streamed.iter_bytes()))
        assert events[1]["choices"][0]["delta"] == {"content": "partial "}
        assert events[-2]["error"]["type"] == "server_error" and "secret" not in events[-2]["error"]["message"]
        assert events[-1] == "[DONE]"
        assert httpx.get(server.url + "/health").status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------
def test_serve_help(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("/v1/chat/completions", "--api-key", "--allow-urls", "--image-urls", "--max-queue", "--engine"):
        assert word in out


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], ["--port", "70000"]),
    (["--port", "0"], ["--port", "'0'"]),
    (["--port", "http"], ["--port", "'http'"]),
    (["--max-queue", "0"], ["--max-queue", "'0'"]),
    (["--max-batch-size", "-2"], ["--max-batch-size", "'-2'"]),
    (["--batch-wait-ms", "nan"], ["--batch-wait-ms", "'nan'"]),
    (["--request-timeout", "0"], ["--request-timeout", "'0'"]),
    (["--engine", "turbo"], ["--engine", "'turbo'"]),
    (["--image-mode", "sometimes"], ["--image-mode", "'sometimes'"]),
    (["--api-key", " "], ["api_key"]),
    (["--threads", "0"], ["--threads", "'0'"]),
    (["--threads", "two"], ["--threads", "'two'"]),
])
def test_bad_command_line_values(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(serve_command, "load_model", lambda args: pytest.fail("the model must not load"))
    assert main(["serve", "--model", "tiny-random", "--engine", "serial", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gill serve: error:") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_taken_port_is_refused_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(serve_command, "load_model", lambda args: pytest.fail("the model must not load"))
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", "tiny-random", "--engine", "serial", "--port", port]) == 2
    finally:
        taken.close()
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_warns_when_exposed_without_a_key_and_serves_the_app(caplog, monkeypatch, opt_pipe):
    import gill_pipeline.serving.server as server_module

    ran = {}

    def fake_serve_forever(app, settings, sock, log_level):
        ran.update(app=app, settings=settings, port=sock.getsockname()[1])

    monkeypatch.setattr(server_module, "serve_forever", fake_serve_forever)
    monkeypatch.setattr(serve_command, "load_model", lambda args: opt_pipe)
    monkeypatch.delenv("GILL_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="gill_pipeline.commands"):
        code = main(["serve", "--model", "tiny-random", "--engine", "serial", "--host", "0.0.0.0", "--port",
                     str(free_port()), "--steps", "1"])
    assert code == 0
    assert "WITHOUT an API key" in caplog.text
    settings = ran["settings"]
    assert settings.host == "0.0.0.0" and settings.api_key is None and settings.model_id == "tiny-random"
    assert settings.defaults["num_inference_steps"] == 1 and settings.defaults["img_logit_scale"] == 100.0  # preset
    assert ran["app"].state.gill.engine.stats()["engine"] == "serial"


def test_threads_are_set_before_the_model_loads(monkeypatch, opt_pipe):
    """`--threads N`: torch runs N intra-op threads in the server (one per replica when replicas share the cores)."""
    import torch

    import gill_pipeline.serving.server as server_module

    seen = {}

    def load(args):
        seen["at_load"] = torch.get_num_threads()
        return opt_pipe

    monkeypatch.setattr(server_module, "serve_forever", lambda app, settings, sock, log_level: None)
    monkeypatch.setattr(serve_command, "load_model", load)
    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    try:
        assert main(["serve", "--model", "tiny-random", "--engine", "serial", "--port", str(free_port()),
                     "--threads", str(target)]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen["at_load"] == target


def test_api_key_from_the_environment(monkeypatch, opt_pipe):
    import gill_pipeline.serving.server as server_module

    ran = {}
    monkeypatch.setattr(server_module, "serve_forever", lambda app, settings, sock, log_level: ran.update(s=settings))
    monkeypatch.setattr(serve_command, "load_model", lambda args: opt_pipe)
    monkeypatch.setenv("GILL_API_KEY", "from-env")
    assert main(["serve", "--model", "tiny-random", "--engine", "serial", "--port", str(free_port())]) == 0
    assert ran["s"].api_key == "from-env"


def free_port() -> int:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.slow
def test_gill_serve_process_answers_and_stops_on_sigterm(tmp_path):
    """The real command in its own process: it answers the openai client; SIGTERM shuts it down gracefully, then the
    process ends by the signal, as uvicorn re-raises it (exit status -15; SIGINT gives exit code 130)."""
    import os
    import signal
    import subprocess
    import sys

    import openai

    port = free_port()
    env = {**os.environ, "GILL_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "gill_pipeline", "serve", "--model", "tiny-random", "--engine", "serial", "--port",
         str(port), "--steps", "1", "--max-new-tokens", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, process.stdout.read().decode()
                return False

        wait_until(healthy, timeout=300, what="gill serve to start")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].finish_reason in ("stop", "length")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM
        log = process.stdout.read().decode()
        assert "Shutting down" in log and "Shut down." in log and "Traceback" not in log, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_allow_urls_downloads_images_within_the_body_limit(opt_pipe, monkeypatch):
    """With --allow-urls an http image URL is downloaded (capped at the body limit); without it, refused (CASES)."""
    import http.server
    import io as io_module

    buffer = io_module.BytesIO()
    random_image(5, 24).save(buffer, format="PNG")
    files = {"/dog.png": buffer.getvalue(), "/huge.png": b"\0" * (LIMIT + 10)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    try:
        with served(opt_pipe, allow_urls=True, max_body_bytes=LIMIT) as server:
            assert post(server, with_content(image_part(base + "/dog.png")), headers={}).status_code == 200
            assert_error(post(server, with_content(image_part(base + "/huge.png")), headers={}), 413, IMG, str(LIMIT))
            assert_error(post(server, with_content(image_part(base + "/missing.png")), headers={}), 400, IMG,
                         "cannot download", "/missing.png")
    finally:
        images.shutdown()
