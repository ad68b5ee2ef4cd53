"""The ASGI application: routes, API-key check, access log, errors in OpenAI's JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Literal

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from candle_phi import Phi3Generator
from candle_phi.server.errors import APIError, bad_request
from candle_phi.server.requests import parse, read_json
from candle_phi.server.responses import Reply
from candle_phi.server.runner import Generation, Runner
from candle_phi.server.settings import ServerSettings

log = logging.getLogger("candle_phi.server")

# Paths anyone may read: the liveness probe, and the chat page (static; it holds no data and
# asks for the key itself, since a browser cannot send a bearer header when navigating).
OPEN_PATHS = frozenset({"/health", "/"})
MAX_IDLE_WAIT_S = 600.0


def create_app(generator: Phi3Generator, settings: ServerSettings | None = None) -> Starlette:
    """The OpenAI-compatible app serving ``generator``, with ``settings``' limits."""
    settings = settings or ServerSettings()
    runner = Runner(generator, settings)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        runner.shutdown()

    async def completions(request: Request, kind: Literal["chat", "completion"]) -> Response:
        job = parse(await read_json(request, settings.max_body_bytes), kind, settings)
        generation = await runner.start(job)
        reply = Reply(job, settings.model_name, generator)
        if job.stream:
            return EventSourceResponse(_sse(generation, reply), sep="\n", ping=15)
        return await _whole(request, generation, reply)

    async def chat_completions(request: Request) -> Response:
        return await completions(request, "chat")

    async def text_completions(request: Request) -> Response:
        return await completions(request, "completion")

    def model_card() -> dict[str, Any]:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "candle-phi",
            "context_length": generator.context_length,
        }

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["name"] != settings.model_name:
            name = request.path_params["name"]
            raise APIError(
                404,
                f"no model {name!r}; this server serves {settings.model_name!r}",
                code="model_not_found",
                param="model",
            )
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        # ?wait_idle=S answers once nothing runs or waits (or after S seconds): a replica
        # drained before a restart, or a test waiting for cancelled requests to end.
        wait = request.query_params.get("wait_idle")
        if wait is not None:
            try:
                seconds = float(wait)
            except ValueError:
                seconds = math.nan
            if not 0 <= seconds <= MAX_IDLE_WAIT_S:
                raise bad_request("wait_idle", f"wait_idle must be 0 to {MAX_IDLE_WAIT_S} s")
            await runner.idle(seconds)
        return JSONResponse(
            {
                "status": "ok",
                "running": runner.running,
                "waiting": runner.waiting,
                "active_streams": generator.active_streams,
            }
        )

    page = resources.files("candle_phi.server").joinpath("static/chat.html").read_text("utf-8")

    async def chat_page(request: Request) -> Response:
        return HTMLResponse(page.replace("{{MODEL}}", html.escape(settings.model_name)))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", text_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", chat_page, methods=["GET"]),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        middleware=[Middleware(_AccessLog), Middleware(_ApiKey, key=settings.api_key)],
        lifespan=lifespan,
    )
    app.state.runner = runner
    app.state.settings = settings
    return app


async def _sse(generation: Generation, reply: Reply) -> AsyncIterator[dict[str, str]]:
    stream = generation.stream
    first = reply.first_chunk()
    if first is not None:
        yield {"data": json.dumps(first)}
    try:
        async for event in generation.events():
            if event.text or event.logprobs:
                yield {"data": json.dumps(reply.chunk(event.text, event.logprobs))}
    except APIError as err:
        # The status line has gone out; OpenAI's streams report such errors in the data.
        yield {"data": json.dumps(err.body())}
        return
    yield {"data": json.dumps(reply.last_chunk(stream))}
    if reply.job.include_usage:
        yield {"data": json.dumps(reply.usage_chunk(stream))}
    yield {"data": "[DONE]"}


async def _whole(request: Request, generation: Generation, reply: Reply) -> Response:
    async def cancel_on_disconnect() -> None:
        # The body is read, so the next message is the client leaving.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        generation.stream.cancel()

    watcher = asyncio.ensure_future(cancel_on_disconnect())
    try:
        async for event in generation.events():
            reply.add(event.text, event.logprobs)
    finally:
        watcher.cancel()
    return JSONResponse(reply.whole(generation.stream))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else None
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message, code=kind, headers=dict(exc.headers or {})).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return APIError(
        500, "internal server error; see the server's log", type="server_error"
    ).response()


class _ApiKey:
    """Every path but OPEN_PATHS needs ``Authorization: Bearer <key>`` when a key is set."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = None if key is None else key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        error = APIError(
            401,
            "a valid API key is needed: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)


class _AccessLog:
    """One line per request, when it ends: method, path, status, bytes out, seconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0
        sent = 0

        async def record(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info(
                '%s "%s %s" %d %d %.3fs',
                client[0],
                scope["method"],
                scope["path"],
                status or 500,  # none sent: the error handler outside us answered
                sent,
                time.perf_counter() - start,
            )
