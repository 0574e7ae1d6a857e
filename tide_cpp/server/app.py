"""The FastAPI application: OpenAI's routes over one model, plus the web page at `/`.

    GET  /health                 liveness, the model, the queue
    GET  /v1/models              the one model, under its alias
    POST /v1/chat/completions    chat, streamed (server-sent events) or not
    POST /v1/completions         raw text completion, streamed or not
    GET  /                       the web page (tide_cpp/server/web/)

Every error is OpenAI-shaped (errors.py); a bad request is a 400 naming its field, never a 500.
A body over max_body_bytes is refused (413) as it arrives, so no request can fill the memory.
Browsers on other origins may call the API only when cors_origins names them ("*": any).
"""

import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import completions, sse
from .engine import Engine
from .errors import MAX_BODY_BYTES, APIError, too_large, unauthorized
from .schemas import parse_completion, parse_json

WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8"}
DISCONNECT_POLL_S = 0.25   # how often a non-streamed request checks that its client is still there


async def read_body(request, limit):
    """The request body, refused (413) as soon as it is known to exceed limit bytes: up front
    from Content-Length when the client sends one, else while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        parts.append(chunk)
    return b"".join(parts)


def create_app(model, model_alias, defaults, api_key=None, max_queue=16,
               max_body_bytes=MAX_BODY_BYTES, cors_origins=()):
    """The application for an open tide_cpp.Model. defaults: generation settings for fields a
    request leaves out (keyword arguments of tide_cpp.generation.generate). cors_origins: the
    web origins (scheme://host[:port], or "*") whose pages may call the API from a browser."""
    facts = completions.ModelFacts(model)
    completions.check_defaults(facts, defaults)   # a bad option fails now, not every request
    engine = Engine(model, max_queue=max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped listening and waited for open requests (its graceful timeout);
        # whatever still runs is cancelled at its next step and the worker is joined.
        await run_in_threadpool(engine.close, 0.0)

    app = FastAPI(title="tide.cpp", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["*"])   # the openai JS client adds its own

    # ---- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request, e):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        body = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise unauthorized()

    # ---- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_alias, "queue": engine.status()}

    model_card = {"id": model_alias, "object": "model", "created": created,
                  "owned_by": "tide.cpp"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name != model_alias:
            raise APIError(404, f"model: {name!r} is not served here (this server has "
                                f"{model_alias!r})", type="not_found_error", param="model",
                           code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, "chat")

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        return await _complete(request, "text")

    async def _complete(request, kind):
        authorize(request)
        req = parse_completion(parse_json(await read_body(request, max_body_bytes)), kind,
                               defaults)
        ids = await run_in_threadpool(completions.prepare, facts, req)   # template, tokenizer
        events = asyncio.Queue()
        job = engine.submit(completions.work(req, ids), asyncio.get_running_loop(), events)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        meta = {"id": prefix + uuid.uuid4().hex, "created": int(time.time()),
                "model": model_alias}
        if req.stream:
            return StreamingResponse(_stream(job, req, meta), media_type="text/event-stream",
                                     headers=sse.HEADERS)
        return await _whole(request, job, req, meta)

    # ---- one answer, whole ----------------------------------------------------------------
    async def _whole(request, job, req, meta):
        parts, summary = [], None
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)   # nobody reads it; the job is cancelled
                    continue
                if kind == "delta":
                    parts.append(payload)
                elif kind == "finish":
                    summary = payload
                elif kind == "error":
                    raise APIError(500, f"generation failed: {payload}", type="server_error")
                elif kind == "cancelled":
                    raise APIError(503, "the generation was cancelled: the server is stopping",
                                   type="server_error", code="cancelled")
                elif kind == "end":
                    break
        finally:
            job.cancel()   # no-op when it finished; otherwise the client is gone
        text = "".join(parts)
        if req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": summary["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": summary["finish_reason"]}
            obj = "text_completion"
        return {"id": meta["id"], "object": obj, "created": meta["created"],
                "model": meta["model"], "choices": [choice], "usage": summary["usage"],
                "tide": summary["tide"]}

    # ---- one answer, streamed -------------------------------------------------------------
    def _chunk(req, meta, content=None, finish=None, role=False):
        if req.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": content} if content is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None,
                      "finish_reason": finish}
            obj = "text_completion"
        out = {"id": meta["id"], "object": obj, "created": meta["created"],
               "model": meta["model"], "choices": [choice]}
        if req.include_usage:
            out["usage"] = None
        return out

    async def _stream(job, req, meta):
        try:
            if req.kind == "chat":
                yield sse.event(_chunk(req, meta, role=True))
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield sse.event(_chunk(req, meta, content=payload))
                elif kind == "step":
                    yield sse.event(payload, "tide.step")
                elif kind == "finish":
                    yield sse.event(_chunk(req, meta, finish=payload["finish_reason"]))
                    if req.include_usage:   # OpenAI's usage chunk: no choices, then [DONE]
                        yield sse.event({"id": meta["id"], "object": _chunk(req, meta)["object"],
                                         "created": meta["created"], "model": meta["model"],
                                         "choices": [], "usage": payload["usage"]})
                    yield sse.event(payload["tide"], "tide.stats")
                elif kind == "error":
                    yield sse.event(APIError(500, f"generation failed: {payload}",
                                             type="server_error").body())
                elif kind == "cancelled":
                    yield sse.event(APIError(503, "the generation was cancelled: the server is "
                                                  "stopping", type="server_error",
                                             code="cancelled").body())
                elif kind == "end":
                    break
            yield sse.DONE
        finally:
            job.cancel()   # the client hung up (or we are done): stop at the next step

    # ---- the web page ---------------------------------------------------------------------
    web = resources.files("tide_cpp.server") / "web"

    @app.get("/")
    async def index():
        return _web_file("index.html")

    @app.get("/web/{name}")
    async def web_file(name: str):
        if name not in WEB_FILES:
            raise APIError(404, f"no such file: /web/{name}", type="not_found_error")
        return _web_file(name)

    def _web_file(name):
        return Response((web / name).read_bytes(), media_type=WEB_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    return app
