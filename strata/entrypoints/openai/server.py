"""The OpenAI-compatible HTTP server: FastAPI routes, errors in OpenAI's body, API keys,
Server-Sent Events for streams, Prometheus metrics and the web chat page."""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import strata
from strata.engine.async_engine import AsyncEngine
from strata.entrypoints.openai import protocol as P
from strata.entrypoints.openai.serving import APIError, OpenAIServing, error_kind
from strata.metrics import EngineMetrics

STATIC = Path(__file__).parent / "static"


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=_utf8(message), type=kind or error_kind(status),
                                             param=_utf8(param), code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _utf8(text: str | None) -> str | None:
    # Error texts may quote the client (a dict key in a validation path): a lone surrogate in it
    # would fail the UTF-8 encoding of the body and turn a 400 into a 500.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The first error that says most about the request, as an OpenAI 400 naming the parameter."""
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request")
    # A value that fits none of a union's branches yields one error per branch; the branch that
    # got past the type check (a list too long, a bad item) says more than "should be a string".
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {first.get('msg', '')}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    if not loc:   # the body as a whole: missing, not JSON, or not an object
        content_type = request.headers.get("content-type", "")
        if first.get("type") == "missing":
            return error_response(400, "the request body is empty: send a JSON object")
        if first.get("type") in ("model_attributes_type", "dict_type"):
            if "json" not in content_type:   # FastAPI reads a body as JSON only when told it is
                return error_response(400, f"the body must be a JSON object sent with Content-Type: "
                                           f"application/json (got {content_type or 'no Content-Type'!r})")
            return error_response(400, "the request body must be a JSON object")
        return error_response(400, f"invalid request body: {first.get('msg', 'invalid value')}")
    param = ".".join(loc)
    return error_response(400, f"invalid request: {param}: {first.get('msg', 'invalid value')}", param)


# pydantic names the union branch it tried inside an error's location: 'str', 'list[int]', 'TextPart'.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"} | {
    name for name, value in vars(P).items() if isinstance(value, type) and issubclass(value, P.BaseModel)}


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


class APIKeyMiddleware:
    """401 for /v1 calls without `Authorization: Bearer <key>`.

    Plain ASGI on purpose: FastAPI's @app.middleware("http") wraps `receive`, after which
    `request.is_disconnected()` never sees the client leave, so an abandoned non-streaming request
    would run to its last token instead of being aborted."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"].startswith("/v1")
                and not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected)):
            response = error_response(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                      kind="AuthenticationError")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="strata", version=strata.__version__,
                  description="OpenAI-compatible API served by strata")
    metrics = EngineMetrics(engine.engine.stats)
    serving = OpenAIServing(engine, model_name, metrics)
    app.state.engine = engine
    app.state.serving = serving

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return _validation_error(request, exc)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return error_response(503, f"engine stopped: {engine.error}")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version():
        return {"version": strata.__version__}

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=model_name, max_model_len=serving.max_model_len)])

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", response_model=P.CompletionResponse)
    async def completions(body: P.CompletionRequest, request: Request):
        return await _respond(request, serving.completions(body), body.stream)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
    async def chat(body: P.ChatCompletionRequest, request: Request):
        return await _respond(request, serving.chat(body), body.stream)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


async def _respond(request: Request, work, stream: bool):
    """Run one API call; a client that goes away cancels it, which aborts its requests."""
    if stream:
        events = await work
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return error_response(499, "client closed the request")
    return task.result()


def run_server(args) -> None:
    """`strata serve`: build the engine, then serve until interrupted."""
    import logging

    import uvicorn

    from strata import LLM
    from strata.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**{k: v for k, v in vars(engine_args).items() if k != "extra"})
    async_engine = AsyncEngine(llm.llm_engine)
    name = args.served_model_name or _default_name(llm.llm_engine.source.name)
    api_key = args.api_key or os.environ.get("STRATA_API_KEY")
    app = build_app(async_engine, name, api_key)
    logging.getLogger("strata").info(f"serving {name} on http://{args.host}:{args.port} "
                                     f"(OpenAI API under /v1, chat page at /)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    finally:
        async_engine.shutdown()


def _default_name(source: str) -> str:
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else (path.name or source)
