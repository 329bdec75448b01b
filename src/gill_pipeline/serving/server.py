"""Running the app under uvicorn: in the foreground (`gill serve`, stopped by SIGINT/SIGTERM) or in a background
thread on a free port (tests, benchmarks, notebooks).

uvicorn handles the signals: it stops accepting connections, lets running requests finish for `shutdown_grace_s`,
then runs the app's lifespan end, which refuses new requests and shuts the engine down (`app.ServerState`).
"""

import asyncio
import socket
import threading

import uvicorn

from .settings import ServeSettings


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port` (port 0: a free one), or an `OSError` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, settings: ServeSettings, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=settings.shutdown_grace_s, lifespan="on",
        # The body limit is enforced by the app while it reads; h11's own cap on a single header block stays.
    )


def serve_forever(app, settings: ServeSettings, sock: socket.socket | None = None, log_level: str = "info") -> None:
    """Serves `app` until SIGINT/SIGTERM (graceful: see the module docstring)."""
    sock = sock or bind_socket(settings.host, settings.port)
    server = uvicorn.Server(uvicorn_config(app, settings, log_level))
    server.run(sockets=[sock])


class BackgroundServer:
    """`app` served by uvicorn in a daemon thread on `host` and a free port, for tests and benchmarks.

    Example:
        ```py
        >>> with BackgroundServer(create_app(engine, settings), settings) as server:
        ...     client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
        ```
    """

    def __init__(self, app, settings: ServeSettings | None = None, host: str = "127.0.0.1", log_level: str = "warning"):
        self.app, self.settings = app, settings or ServeSettings()
        self.sock = bind_socket(host, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, self.settings, log_level))
        self.server.install_signal_handlers = lambda: None  # not the main thread: the test runner keeps its signals
        self.thread = threading.Thread(target=self._run, name="gill-serve", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self):
        asyncio.run(self._serve())

    async def _serve(self):
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped while starting (see its log)")
            if waited > timeout:
                raise TimeoutError(f"the server on {self.url} did not start within {timeout} s")
            threading.Event().wait(0.02)
            waited += 0.02
        return self

    def call(self, coroutine, timeout: float | None = None):
        """Runs `coroutine` on the server's event loop (e.g. `app.state.gill.begin_shutdown()`) and returns its
        result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
