"""The challenge API over HTTP: POST /process, /tokenize, /decode; GET /health; the OpenAPI page at /docs.

Every error body is `{error, error_type}` with a message naming the field, the limit and the value (TGI style);
the status table is `birbal.serve.errors.STATUS_TABLE` (422 validation, 413 body too large, 503 loading or out
of memory). Bad input never gets a 500: a 500 means a bug in this server, and it keeps serving after one.

Concurrency: one worker thread runs every generation, so concurrent requests queue in arrival order on the one
GPU; tokenize and decode run on a second thread so they do not wait behind a long generation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from birbal.config.serve import ServeConfig
from birbal.errors import ServeError
from birbal.serve.engine import Engine
from birbal.serve.errors import CancelledError, NotReadyError, PayloadTooLargeError, RequestError
from birbal.serve.schemas import (
    DecodeRequest,
    DecodeResponse,
    ErrorResponse,
    ProcessRequest,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
)

log = logging.getLogger("birbal.serve")

EngineFactory = Callable[[], Engine]
_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((413, "Body over serve.max_body_bytes"), (503, "Model loading, or out of GPU memory"))
}


class EngineSlot:
    """The engine, or why there is none yet: loading in the background, or failed to load, or refused.

    `gate` (the serve stage's `startup.BackgroundCheck`, the re-hash of the served files, which runs beside the
    load): the loaded, warmed-up engine is served only once it has passed; if it fails, the slot is refused at
    once, even while the model is still loading, and never serves."""

    def __init__(self, engine_or_factory: Engine | EngineFactory, serve_cfg: ServeConfig, gate=None):
        self._factory: EngineFactory | None = None
        self._cfg = serve_cfg
        self._gate = gate
        self._lock = threading.Lock()
        self._started = False
        self.engine: Engine | None = None
        self.error: str | None = None
        self.refused = False  # the error is the gate's: the files are not the record's
        self.loaded = threading.Event()
        if isinstance(engine_or_factory, Engine):
            if gate is not None:
                raise ServeError("EngineSlot: a gate applies to an engine still to be loaded (give a factory)")
            self.engine = engine_or_factory
            self.loaded.set()
        else:
            self._factory = engine_or_factory
        if gate is not None:
            gate.when_failed(self._refuse)

    def _refuse(self, err: BaseException) -> None:
        with self._lock:
            if self.error is None and self.engine is None:
                self.error, self.refused = str(err), True
                log.error("model refused: %s", self.error)
        self.loaded.set()

    def start_loading(self) -> None:
        with self._lock:
            if self._factory is None or self.loaded.is_set() or self._started:
                return
            self._started = True
        threading.Thread(target=self._load, name="birbal-model-load", daemon=True).start()

    def _load(self) -> None:
        from birbal.serve.startup import PHASES

        assert self._factory is not None
        try:
            t0 = time.perf_counter()
            engine = self._factory()
            if engine.cfg != self._cfg:
                raise ServeError("the engine factory built an engine with another ServeConfig than the app's")
            loaded_s = time.perf_counter() - t0
            with PHASES.span("warm_up"):
                engine.warm_up()  # before `self.engine` is set: /health says ready only once requests run at speed
            if self._gate is not None:
                self._gate.wait()  # the re-hash of what is served: raises if a file is not the record's
            with self._lock:
                if self.error is None:
                    self.engine = engine
            if self.engine is engine:
                PHASES.mark("ready")
                fused = engine.fused or {}
                log.info("model loaded in %.1f s from %s (decode: %s, attention: %s, products: %s, warm-up %.1f s)",
                         loaded_s, engine.source, engine.decode_mode, engine.attention,
                         fused.get("gemv_kernel", f"decode_gemv {fused.get('gemv', 'cublas')}"), engine.warmup_s)
                log.info("%s", PHASES.summary())
        except BaseException as err:  # noqa: BLE001 - a failed load is reported by /health, not lost in a thread
            with self._lock:
                if self.error is None:
                    refused = self._gate is not None and err is self._gate.error
                    self.error = str(err) if refused else f"{type(err).__name__}: {err}"
                    self.refused = refused
                    log.error("model %s: %s", "refused" if refused else "failed to load", self.error)
        finally:
            self.loaded.set()

    def ready(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            what = "was refused" if self.refused else "failed to load"
            raise NotReadyError(f"the model {what}: {self.error}")
        raise NotReadyError("the model is still loading; poll GET /health until it answers 200")


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, or as soon as a chunked body passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return f"request body must be at most {self.max_bytes} bytes (serve.max_body_bytes); given {size}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = _error_response(PayloadTooLargeError(self._message(f"{int(declared)} bytes"), field="body"))
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing unchanged (anything else becomes 400).
                    raise StarletteHTTPException(413, self._message(f"more than {self.max_bytes} bytes"))
            return message

        await self.app(scope, limited, send)


class RequestCounter:
    """Counts responses by path and status, for the stage record and GET /health."""

    def __init__(self, app: ASGIApp, counts: Counter):
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counts[f"{scope['path']} {message['status']}"] += 1
            await send(message)

        await self.app(scope, receive, counting)


class InternalErrors:
    """A bug in this server (any exception no handler took) becomes one logged traceback and a 500 with the error
    body, answered here, inside RequestCounter, so that it is counted. (Starlette's own last-resort handler sits
    outside every middleware, where the count misses it, and re-raises, so uvicorn logs the traceback again.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as err:  # noqa: BLE001 - the last resort: logged once, answered, the server keeps serving
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = JSONResponse(status_code=500, content={
                    "error": f"internal server error: {type(err).__name__}: {err}", "error_type": "internal"})
                await response(scope, receive, send)


def _error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={"error": str(err), "error_type": err.error_type})


def _describe_validation(err: RequestValidationError) -> str:
    problems = []
    for item in err.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        given = item.get("input")
        shown = ""
        if item.get("type") != "missing" and not isinstance(given, dict):
            text = repr(given)
            shown = f" (given {text[:80]}{'...' if len(text) > 80 else ''})"
        message = item.get("msg", "invalid")
        if item.get("type") == "json_invalid":
            message = f"body is not valid JSON: {item.get('ctx', {}).get('error', message)}"
        problems.append(f"{where}: {message}{shown}")
    return "; ".join(problems)


def create_app(engine: Engine | EngineFactory, serve_cfg: ServeConfig,
               identity: dict[str, Any] | None = None, gate=None) -> FastAPI:
    """The FastAPI app around a loaded `Engine`, or around a factory that loads one in the background.

    With a factory, /health answers 503 until the model is loaded and /process answers 503 meanwhile.
    `serve_cfg` must be the one the engine was built with: the engine enforces its token limits, the app its
    body size limit. `identity` (`run_id`, `model_digest`, `model_stage`: which run's model this is) is reported
    by GET /health, so a client can prove it talks to the server of its own run. `gate`: see `EngineSlot`.
    """
    if isinstance(engine, Engine) and engine.cfg != serve_cfg:
        raise ServeError("create_app: the engine was built with another ServeConfig than the app's; the limits "
                         "would disagree (build the engine with the same serve config)")
    slot = EngineSlot(engine, serve_cfg, gate)
    generation = ThreadPoolExecutor(max_workers=1, thread_name_prefix="birbal-generate")
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="birbal-tokenize")
    counts: Counter = Counter()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        slot.start_loading()
        try:
            yield
        finally:
            generation.shutdown(wait=True, cancel_futures=True)
            tokenizing.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="birbal submission server", version="1", lifespan=lifespan,
                  description="The NeurIPS 2023 LLM Efficiency Challenge API (POST /process, /tokenize, /decode).")
    app.state.slot = slot
    app.state.request_counts = counts
    app.state.serve_cfg = serve_cfg

    async def run(executor: ThreadPoolExecutor, fn: Callable, request: Any):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, request)

    @app.exception_handler(RequestError)
    async def _request_error(_, err: RequestError) -> JSONResponse:
        # a 503 while loading is what every /health poll gets until ready: not worth a line each
        (log.debug if isinstance(err, NotReadyError) and slot.error is None else log.info)(
            "request refused (%s): %s", err.error_type, err)
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, err: RequestValidationError) -> JSONResponse:
        message = _describe_validation(err)
        log.info("request refused (validation): %s", message)
        return JSONResponse(status_code=422, content={"error": message, "error_type": "validation",
                                                      "detail": jsonable_errors(err)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, err: StarletteHTTPException) -> JSONResponse:
        error_type = _HTTP_ERROR_TYPES.get(err.status_code, "http")
        return JSONResponse(status_code=err.status_code, content={"error": str(err.detail), "error_type": error_type})

    cancelled_counts: Counter = Counter()
    app.state.cancelled = cancelled_counts

    @app.post("/process", response_model=ProcessResponse, responses=_ERROR_RESPONSES)
    async def process(request: ProcessRequest, raw: Request) -> ProcessResponse:
        """Runs on the generation thread; a client that disconnects meanwhile has its generation cancelled: a
        queued one never starts, a running one stops at its next token."""
        engine = slot.ready()
        stop = threading.Event()
        started = threading.Event()

        def generate() -> ProcessResponse:
            started.set()
            return engine.process(request, stop)

        future = asyncio.get_running_loop().run_in_executor(generation, generate)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.05)
            if done:
                return future.result()
            if await raw.is_disconnected():
                stop.set()
                where = "running" if started.is_set() else "queued"
                if where == "queued":
                    future.cancel()  # not started: the executor drops it
                cancelled_counts[where] += 1
                log.info("client went away: %s generation cancelled", where)
                raise CancelledError(f"the client went away: {where} generation cancelled")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        return await run(tokenizing, slot.ready().tokenize, request)

    @app.post("/decode", response_model=DecodeResponse, responses=_ERROR_RESPONSES)
    async def decode(request: DecodeRequest) -> DecodeResponse:
        return await run(tokenizing, slot.ready().decode, request)

    @app.get("/health", responses=_ERROR_RESPONSES)
    async def health() -> dict[str, Any]:
        engine = slot.ready()
        return {"status": "ready", **(identity or {"run_id": None, "model_digest": None}),
                "model": engine.source, "load_s": engine.load_s,
                "device": str(engine.device), "decode": engine.decode_mode, "postprocess": engine.policy.name,
                "requests": engine.stats.requests}

    app.add_middleware(BodySizeLimit, max_bytes=serve_cfg.max_body_bytes)
    app.add_middleware(InternalErrors)
    app.add_middleware(RequestCounter, counts=counts)  # added last = outermost: it sees the 413s and 500s too
    return app


def jsonable_errors(err: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's own `detail` list (the spec's HTTPValidationError), made JSON-safe."""
    out = []
    for item in err.errors():
        out.append({"loc": [str(p) for p in item.get("loc", ())], "msg": str(item.get("msg", "")),
                    "type": str(item.get("type", ""))})
    return out


def serve_stage(recipe, run_dir, host: str | None = None, port: int | None = None, cache_dir=None) -> None:
    """The serve stage (the CLI's entry point); defined in `birbal.serve.stage`, which imports this module."""
    from birbal.serve.stage import serve_stage as run_stage

    run_stage(recipe, run_dir, host, port, cache_dir)
