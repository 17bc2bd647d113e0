"""An OpenAI-compatible HTTP server over a :class:`~peft_deltamem.agents.engine.ChatEngine`.

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events with ``"stream": true``), ``GET /v1/models``,
``GET /v1/sessions/{id}`` (counters), ``POST /v1/sessions/{id}/reset`` and ``DELETE /v1/sessions/{id}``,
``GET /health`` (200 once the model is loaded: the app is built after it) and ``GET /metrics`` (Prometheus). A
chat request names its session with the ``X-Session-Id`` header or the request's ``user`` field. With an API key
every ``/v1/`` request must carry ``Authorization: Bearer <key>`` (as OpenAI clients send it), or gets 401.
"""

from __future__ import annotations

import hmac
import json
import queue
import time
import uuid
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import BatchStats, ChatEngine, GenerationParams
from .session import RequestTooLarge
from .store import CorruptSession, InvalidSessionId, SessionBusy

MAX_REQUEST_BYTES = 1_000_000


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    user: str | None = None


def create_app(
    engine: ChatEngine, model_name: str, default_max_tokens: int = 256, api_key: str | None = None
) -> FastAPI:
    """The FastAPI application serving ``engine`` under the model id ``model_name``; with ``api_key``, ``/v1/``
    requests need ``Authorization: Bearer <api_key>``."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string (or None for no key)")
    app = FastAPI(title="peft-deltamem", description="OpenAI-compatible chat with per-session δ-mem memory")
    created = int(time.time())

    app.add_middleware(BoundedBody, limit=MAX_REQUEST_BYTES)

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
            return await call_next(request)

    metrics = _Metrics(engine)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(InvalidSessionId)
    async def invalid_session(request: Request, error: InvalidSessionId):
        return _error(400, str(error))

    @app.exception_handler(RequestTooLarge)
    async def too_large(request: Request, error: RequestTooLarge):
        return _error(413, str(error))

    @app.exception_handler(SessionBusy)
    async def busy(request: Request, error: SessionBusy):
        return _error(409, str(error))

    @app.exception_handler(CorruptSession)
    async def corrupt(request: Request, error: CorruptSession):
        return _error(500, str(error), "server_error")

    @app.exception_handler(ValueError)
    async def bad_request(request: Request, error: ValueError):
        return _error(400, str(error))

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "peft-deltamem"}],
        }

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest, x_session_id: str | None = Header(default=None)):
        session_id = x_session_id or body.user
        if not session_id:
            raise HTTPException(400, "name the session: send an X-Session-Id header or the request's 'user' field")
        params = GenerationParams(
            max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
        )
        messages = [m.model_dump() for m in body.messages]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not body.stream:
            result = engine.chat(session_id, messages, params)
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.reply},
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": _usage(result),
            }
        pieces: queue.Queue[Any] = queue.Queue()
        future = engine.submit(session_id, messages, params, on_text=pieces.put)  # errors before streaming: 4xx
        future.add_done_callback(lambda _: pieces.put(_DONE))
        return StreamingResponse(_events(pieces, future, completion_id, model_name), media_type="text/event-stream")

    @app.get("/v1/sessions/{session_id}/export")
    def export(session_id: str) -> dict:
        data = engine.export(session_id)
        if data is None:
            raise HTTPException(404, f"no session {session_id!r}")
        return data

    @app.post("/v1/sessions/{session_id}/import")
    def import_(session_id: str, data: dict[str, Any], overwrite: bool = False) -> dict:
        try:
            engine.import_session(session_id, data, overwrite=overwrite)
        except FileExistsError as error:
            raise HTTPException(409, str(error)) from error
        return {"session_id": session_id, "imported": True}

    @app.get("/v1/sessions/{session_id}")
    def session(session_id: str) -> dict:
        stats = engine.stats(session_id)
        if stats is None:
            raise HTTPException(404, f"no session {session_id!r}")
        return stats

    @app.post("/v1/sessions/{session_id}/reset")
    def reset(session_id: str) -> dict:
        if not engine.reset(session_id):
            raise HTTPException(404, f"no session {session_id!r}")
        return {"session_id": session_id, "reset": True}

    @app.delete("/v1/sessions/{session_id}")
    def delete(session_id: str) -> dict:
        if not engine.delete(session_id):
            raise HTTPException(404, f"no session {session_id!r}")
        return {"session_id": session_id, "deleted": True}

    return app


_DONE = object()


def _events(pieces: queue.Queue, future, completion_id: str, model_name: str):
    def chunk(delta: dict, finish: str | None = None) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while (piece := pieces.get()) is not _DONE:
        yield chunk({"content": piece})
    error = future.exception()
    if error is not None:
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': type(error).__name__}})}\n\n"
    else:
        yield chunk({}, future.result().finish_reason)
    yield "data: [DONE]\n\n"


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, engine: ChatEngine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        prefix = "peft_deltamem_"
        self.requests = Counter(
            prefix + "requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            prefix + "request_seconds", "HTTP request latency by route", ["route"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )  # fmt: skip
        batch = Histogram(
            prefix + "batch_sessions", "sessions per model batch", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )  # fmt: skip
        written = Counter(prefix + "tokens_written", "tokens written into memory", registry=self.registry)
        prompt = Counter(prefix + "prompt_tokens", "prompt tokens encoded (the window, every turn)",
                         registry=self.registry)  # fmt: skip
        generated = Counter(prefix + "generated_tokens", "reply tokens generated", registry=self.registry)
        phase = Histogram(
            prefix + "batch_phase_seconds",
            "time of one model batch by phase: write (messages that left the window, into memory), prefill "
            "(generate's start to its first new token: the window re-encoded), decode (the rest)",
            ["phase"], registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        sessions = Gauge(prefix + "sessions", "sessions in the store", registry=self.registry)
        sessions.set_function(lambda: len(engine.store.list()))

        def on_batch(stats: BatchStats) -> None:
            batch.observe(stats.sessions)
            written.inc(stats.tokens_written)
            prompt.inc(stats.prompt_tokens)
            generated.inc(stats.new_tokens)
            for name in ("write", "prefill", "decode"):
                phase.labels(name).observe(getattr(stats, name + "_s"))

        engine.on_batch = on_batch


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


class BoundedBody:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, however it arrives (with a Content-Length or
    chunked); at most ``limit`` bytes are read before the request is refused."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(f"request body of {int(length)} bytes", scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(f"request body of more than {size - len(chunk)} bytes", scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, what: str, scope, receive, send):
        await _error(413, f"{what}; the limit is {self.limit}")(scope, receive, send)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["create_app", "serve"]
