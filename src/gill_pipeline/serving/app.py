"""The HTTP layer of `gill serve`: OpenAI's routes over any `Engine` (docs/serve.md).

`create_app(engine, settings)` returns a FastAPI app. Each route is thin: check the key, read the body within its
size limit, parse it into a `ChatJob` (`requests.py`), hand it to the engine, write OpenAI's JSON or server-sent
events (`responses.py`). Every refusal is OpenAI's error JSON with its status and one line naming the field
(`errors.py`); an unexpected error is logged here with its traceback and answered 500 with one line. A client that
goes away cancels its job; a request still unanswered after `request_timeout_s` is cancelled and answered 504.
"""

import asyncio
import hmac
import json
import logging
import math
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError, bad_request, error_body, one_line
from .files import ImageStore
from .jobs import ChatJob, EngineClosed, Finished, ImageReady, JobCancelled, QueueFull, TextDelta
from .requests import parse_chat_request, parse_image_generation_request
from .responses import chunk_json, completion_json, data_url, first_image, image_part, images_json, png_bytes, sse
from .settings import ServeSettings

logger = logging.getLogger(__name__)

# How often a waiting request checks that its client is still there (seconds).
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client closed its connection; nobody reads an answer."""


def engine_error(error: BaseException) -> ApiError:
    """An error the engine raised for one job -> the status and one line the client gets."""
    if isinstance(error, QueueFull):
        retry = max(1, math.ceil(error.retry_after))
        return ApiError(429, f"The server is busy: {error} Retry after {retry} s.", code="queue_full",
                        headers={"Retry-After": str(retry)})
    if isinstance(error, (EngineClosed, JobCancelled)):
        return ApiError(503, f"The server is shutting down: {error}.", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(error, (ValueError, TypeError)):  # the pipeline's checks name the argument
        return ApiError(400, str(error), code="invalid_value")
    if isinstance(error, asyncio.TimeoutError):
        return ApiError(504, "The request took longer than the server's --request-timeout and was cancelled.",
                        code="timeout")
    raise error


def error_response(error: ApiError) -> JSONResponse:
    headers = dict(error.headers)
    if error.status == 413:
        headers["Connection"] = "close"  # the rest of the body is never read
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class ServerState:
    """What the routes share: the engine, the settings, the stored answer images, whether shutdown began."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.store = ImageStore(settings.max_stored_images)
        self.closing = False
        self._shutdown_done = False

    async def begin_shutdown(self) -> None:
        """Refuses new requests (503, /health too, so a load balancer moves on) and lets the engine finish or cancel
        what it holds within `shutdown_grace_s`."""
        self.closing = True
        if not self._shutdown_done:
            self._shutdown_done = True
            logger.warning(f"Shutting down: new requests get 503; running ones have {self.settings.shutdown_grace_s:g} s "
                           "to finish.")
            await self.engine.shutdown(self.settings.shutdown_grace_s)
            logger.warning("Shut down.")

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def image_to_url(self, request: Request):
        if not self.settings.image_urls:
            return data_url
        base = str(request.base_url).rstrip("/")
        return lambda image: f"{base}/v1/files/{self.store.put(png_bytes(image))}"

    async def read_json(self, request: Request):
        """The body as JSON, refused with 413 as soon as it passes `max_body_bytes` (never buffered whole)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = ApiError(413, f"The request body is larger than the server's limit of {limit} bytes "
                             "(--max-body-bytes).", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise bad_request(None, "The request body is empty: send a JSON object.", "invalid_json")
        try:
            return json.loads(raw, parse_constant=_refuse_constant)
        except UnicodeDecodeError:
            raise bad_request(None, "The request body is not UTF-8 text.", "invalid_json") from None
        except RecursionError:  # e.g. 100,000 nested arrays in a few hundred KB
            raise bad_request(None, "The request body's JSON is nested too deeply.", "invalid_json") from None
        except json.JSONDecodeError as error:
            raise bad_request(None, f"The request body is not valid JSON: {error.msg} at line {error.lineno} column "
                              f"{error.colno}.", "invalid_json") from None

    async def run(self, request: Request, job: ChatJob):
        """The job's result; cancels it when its client goes away or the timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        task = asyncio.ensure_future(self.engine.submit(job))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(DISCONNECT_POLL_S, max(deadline - loop.time(), 0)))
                if done:
                    try:
                        return task.result()
                    except Exception as error:  # noqa: BLE001 (mapped to its status, or raised again)
                        raise engine_error(error) from error
                if await request.is_disconnected():
                    raise ClientGone()
                if loop.time() >= deadline:
                    raise engine_error(asyncio.TimeoutError())
        finally:
            if not task.done():
                job.cancelled.set()
                task.cancel()


def _refuse_constant(name: str):
    raise bad_request(None, f"The request body is not valid JSON: {name} is not a JSON number.", "invalid_json")


def create_app(engine, settings: ServeSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (anything with the `Engine` protocol of `jobs.py`). Its lifespan
    starts the engine, and on shutdown refuses new requests and shuts the engine down."""
    settings = settings or ServeSettings()
    state = ServerState(engine, settings)

    @asynccontextmanager
    async def lifespan(app):
        await engine.start()
        yield
        await state.begin_shutdown()

    app = FastAPI(title="gill serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gill = state

    async def guarded(request: Request, work, needs_key: bool = True):
        try:
            if needs_key:
                state.check_key(request)
            if state.closing:
                raise engine_error(EngineClosed("no new request is taken"))
            return await work()
        except ApiError as error:
            return error_response(error)
        except ClientGone:
            logger.info(f"{request.url.path}: the client went away; its request was cancelled.")
            return Response(status_code=499)
        except Exception as error:  # noqa: BLE001 (logged with its traceback here; the client gets one line)
            logger.exception(f"{request.method} {request.url.path} failed")
            return error_response(ApiError(500, f"Internal server error ({type(error).__name__}); the server log has "
                                           "the details.", code="internal_error"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        async def work():
            body = await state.read_json(request)
            job = await asyncio.to_thread(parse_chat_request, body, settings)  # images decoded off the event loop
            if job.stream:
                return await stream_chat(request, job)
            result = await state.run(request, job)
            answer = await asyncio.to_thread(completion_json, job, result, settings.model_id, state.image_to_url(request))
            return JSONResponse(answer)

        return await guarded(request, work)

    async def stream_chat(request: Request, job: ChatJob):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout_s
        events = engine.stream(job).__aiter__()
        to_url = state.image_to_url(request)

        async def next_event():
            return await asyncio.wait_for(events.__anext__(), timeout=max(deadline - loop.time(), 0.001))

        try:  # the first event decides the status: a full queue is a 429, not a stream that fails
            first = await next_event()
        except Exception as error:  # noqa: BLE001
            job.cancelled.set()
            raise engine_error(error) from error
        created = int(time.time())

        def chunk(delta, finish_reason=None, result=None):
            return sse(chunk_json(job, settings.model_id, created, delta, finish_reason, result))

        async def body():
            finished = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                event = first
                while True:
                    if isinstance(event, TextDelta):
                        yield chunk({"content": event.text})
                    elif isinstance(event, ImageReady):
                        part = await asyncio.to_thread(image_part, event.part, to_url)
                        yield chunk({"content": "", "image": part})
                    elif isinstance(event, Finished):
                        yield chunk({}, event.result.finish_reason, event.result)
                        yield sse("[DONE]")
                        finished = True
                        return
                    event = await next_event()
            except Exception as error:  # noqa: BLE001 (the status is sent already: the error goes in the stream)
                try:
                    api_error = engine_error(error)
                except Exception:  # noqa: BLE001
                    logger.exception(f"stream of {job.request_id} failed")
                    api_error = ApiError(500, f"Internal server error ({type(error).__name__}).", code="internal_error")
                yield sse(api_error.body())
                yield sse("[DONE]")
            finally:
                if not finished:  # the client went away, or the stream failed
                    job.cancelled.set()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        async def work():
            body = await state.read_json(request)
            job, response_format = await asyncio.to_thread(parse_image_generation_request, body, settings)
            result = await state.run(request, job)
            if first_image(result) is None:
                raise ApiError(500, "The model answered without an image (can this pipeline generate images?).",
                               code="no_image")
            if response_format == "url":
                to_url = lambda image: f"{str(request.base_url).rstrip('/')}/v1/files/{state.store.put(png_bytes(image))}"  # noqa: E731
            else:
                to_url = data_url
            return JSONResponse(await asyncio.to_thread(images_json, result, response_format, to_url))

        return await guarded(request, work)

    @app.get("/v1/models")
    async def list_models(request: Request):
        async def work():
            return JSONResponse({"object": "list", "data": [model_card(settings)]})

        return await guarded(request, work)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str):
        async def work():
            if model_id != settings.model_id:
                raise ApiError(404, f"The model {model_id!r} does not exist here; this server serves "
                               f"{settings.model_id!r}.", param="model", code="model_not_found")
            return JSONResponse(model_card(settings))

        return await guarded(request, work)

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str):
        async def work():
            png = state.store.get(file_id)
            if png is None:
                raise ApiError(404, f"No file {file_id!r} here (answer images are kept for the last "
                               f"{settings.max_stored_images} answers).", param="file_id", code="file_not_found")
            return Response(png, media_type="image/png")

        return await guarded(request, work)

    @app.get("/health")
    async def health():
        if state.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": settings.model_id, "engine": engine.stats()})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = f"No route {request.method} {request.url.path}."
        elif error.status_code == 405:
            message = f"{request.url.path} does not take {request.method} requests."
        else:
            message = str(error.detail)
        return JSONResponse(error_body(error.status_code, message), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return JSONResponse(error_body(422, one_line(error.errors())), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.exception(f"{request.method} {request.url.path} failed")
        return JSONResponse(error_body(500, f"Internal server error ({type(error).__name__})."), status_code=500)

    return app


def model_card(settings: ServeSettings) -> dict:
    return {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "gill_pipeline"}
