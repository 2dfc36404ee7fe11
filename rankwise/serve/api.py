"""OpenAI-compatible HTTP API over the engine (FastAPI).

    POST /v1/completions, /v1/chat/completions   `model` names an adapter (a folder of --adapters) or the base;
                                                  `stream: true` answers with server-sent events
    GET  /v1/models                               the base and every adapter on disk or in memory
    GET  /v1/adapters; POST /v1/adapters/load {"name", "pin"}; POST /v1/adapters/unload {"name"}
    GET  /health, /metrics (Prometheus text format)

The engine runs in one background thread (`EngineRunner`); each HTTP request puts its `Request` in the engine's
intake and awaits its outputs on an asyncio queue fed from that thread. Errors are JSON
{"error": {"message", "type", "code"}}: 400 malformed or impossible requests, 404 unknown adapters, 429 when
`max_queue` requests are already in, 500 when the device step failed. A client that disconnects has its request
aborted, which frees its row, KV blocks and adapter reference at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from rankwise.serve.adapter_cache import AdapterError
from rankwise.serve.config import SamplingParams
from rankwise.serve.engine import Engine, QueueFullError, Request, RequestOutput
from rankwise.serve.tokenizer import encode_chat, encode_prompt

log = logging.getLogger("rankwise.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class EngineRunner:
    """Steps the engine in a background thread while it has work; sleeps on an event otherwise."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="rankwise-engine", daemon=True)
        self.alive = False

    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.alive = False

    def submit(self, request: Request, on_output) -> str:
        rid = self.engine.add_request(request, on_output)
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self.engine.adapters.poll()  # pinned adapters move up even while no request runs
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # a failed device step must not hang the clients: fail their requests
                log.exception("engine step failed")
                self.engine.fail_all(f"The engine failed: {type(exc).__name__}: {exc}")


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[int] | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    pin: bool = False


class _StatusCounter:
    """Pure ASGI middleware counting responses by status (BaseHTTPMiddleware would hide client disconnects)."""

    def __init__(self, app, counts: dict):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] = self.counts.get(message["status"], 0) + 1
            await send(message)

        return await self.app(scope, receive, counting_send)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class _Metrics:
    def __init__(self):
        self.http = {}
        self.ttft_sum = self.ttft_count = 0.0
        self.e2e_sum = self.e2e_count = 0.0

    def observe(self, out: RequestOutput) -> None:
        if out.first_token_time is not None:
            self.ttft_sum += out.first_token_time - out.arrival_time
            self.ttft_count += 1
        if out.finish_time is not None:
            self.e2e_sum += out.finish_time - out.arrival_time
            self.e2e_count += 1


def create_app(engine: Engine, served_model_name: str = "base", runner: EngineRunner | None = None) -> FastAPI:
    """The FastAPI app; starts `runner` (a new EngineRunner by default) with the app and stops it after."""
    runner = runner or EngineRunner(engine)
    metrics = _Metrics()
    tok = engine.tokenizer

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="rankwise serve", lifespan=lifespan)
    app.state.engine, app.state.runner = engine, runner

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                return _error(400, f"The request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')}"
                                   f" at character {e.get('loc', ('', '?'))[-1]}).")
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(400, "Invalid request: " + "; ".join(parts))

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.kind)

    app.add_middleware(_StatusCounter, counts=metrics.http)

    def adapter_of(model: str) -> str | None:
        return None if model == served_model_name else model

    def sampling(body, max_tokens: int) -> SamplingParams:
        if body.n != 1:
            raise APIError(400, f"n={body.n}: only n=1 is supported.")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if stop and tok is None:
            raise APIError(400, "stop strings need a tokenizer, and this model has none.")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=stop, ignore_eos=body.ignore_eos)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    async def run(http: HTTPRequest, prompt: list[int], adapter: str | None, params: SamplingParams, stream: bool,
                  render):
        """Submit and answer: one JSON body, or an SSE stream of `render(delta_text, out, final)` chunks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        try:
            rid = runner.submit(Request(prompt, adapter, params, f"cmpl-{uuid.uuid4().hex}"),
                                lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except QueueFullError as exc:
            raise APIError(429, str(exc), "rate_limit_error") from exc
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), "not_found_error" if exc.status == 404 else
                           "invalid_request_error") from exc
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

        def check(out: RequestOutput) -> None:
            if out.finish_reason == "error":
                bad_adapter = out.error and out.error.startswith("Adapter ")
                raise APIError(400 if bad_adapter else 500, out.error or "failed",
                               "invalid_request_error" if bad_adapter else "server_error")

        async def next_output() -> RequestOutput | None:
            """The next output, or None (and the request aborted) once the client has gone."""
            while True:
                try:
                    return await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        runner.abort(rid)
                        return None
                except asyncio.CancelledError:
                    runner.abort(rid)
                    raise

        if not stream:
            out = await next_output()
            while out is not None and not out.finished:
                out = await next_output()
            if out is None:
                return JSONResponse({}, status_code=499)
            metrics.observe(out)
            check(out)
            return JSONResponse(render(_text(out), out, True))

        first = await next_output()  # errors known before streaming starts still get a status code
        if first is None:
            return JSONResponse({}, status_code=499)
        check(first)

        async def events():
            out, sent, done = first, "", False
            try:
                while True:
                    text = _text(out) if out.finished else _partial(out, params.stop)
                    delta, sent = text[len(sent):], text if len(text) >= len(sent) else sent
                    if delta or out.finished or tok is None:
                        yield f"data: {json.dumps(render(delta, out, out.finished))}\n\n"
                    if out.finished:
                        metrics.observe(out)
                        done = True
                        yield "data: [DONE]\n\n"
                        return
                    out = await queue.get()
            finally:
                if not done:
                    runner.abort(rid)

        return StreamingResponse(events(), media_type="text/event-stream")

    def _text(out: RequestOutput) -> str:
        return out.text if out.text is not None else ""

    def _partial(out: RequestOutput, stops: tuple[str, ...]) -> str:
        if tok is None:
            return ""
        text = tok.decode(out.output_ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            text = text[:-1]
        if stops:
            from rankwise.serve.sampling import holdback

            text = text[: len(text) - holdback(text, stops)]
        return text

    def usage(out: RequestOutput) -> dict:
        n_out = len(out.output_ids)
        return {"prompt_tokens": len(out.prompt_ids), "completion_tokens": n_out,
                "total_tokens": len(out.prompt_ids) + n_out}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "Send one prompt per request (a list of several prompts is not supported).")
            prompt = prompt[0]
        try:
            ids = encode_prompt(tok, prompt)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        params = sampling(body, body.max_tokens)
        created = int(time.time())

        def render(delta: str, out: RequestOutput, final: bool) -> dict:
            choice = {"index": 0, "text": delta, "logprobs": None,
                      "finish_reason": out.finish_reason if final else None}
            choice["token_ids"] = out.new_ids if body.stream else out.output_ids  # an extension of OpenAI's API
            body_out = {"id": out.request_id, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [choice]}
            if final:
                body_out["usage"] = usage(out)
            return body_out

        return await run(http, ids, adapter_of(body.model), params, body.stream, render)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        try:
            ids = encode_chat(tok, body.messages)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        except Exception as exc:  # the template rejected the messages
            raise APIError(400, f"The messages do not fit the chat template: {exc}") from exc
        params = sampling(body, body.max_completion_tokens or body.max_tokens or 16)
        created = int(time.time())

        def render(delta: str, out: RequestOutput, final: bool) -> dict:
            reason = out.finish_reason if final else None
            if body.stream:
                choice = {"index": 0, "delta": {"role": "assistant", "content": delta}, "finish_reason": reason}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "message": {"role": "assistant", "content": delta}, "finish_reason": reason}
                obj = "chat.completion"
            body_out = {"id": out.request_id, "object": obj, "created": created, "model": body.model,
                        "choices": [choice]}
            if final:
                body_out["usage"] = usage(out)
            return body_out

        return await run(http, ids, adapter_of(body.model), params, body.stream, render)

    @app.get("/v1/models")
    async def models():
        names = await run_in_threadpool(engine.adapters.available)
        data = [{"id": served_model_name, "object": "model", "owned_by": "rankwise", "root": served_model_name}]
        data += [{"id": n, "object": "model", "owned_by": "rankwise", "root": n, "parent": served_model_name}
                 for n in names]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def adapters():
        names = await run_in_threadpool(engine.adapters.available)
        return {"data": [engine.adapters.describe(n) for n in names]}

    @app.post("/v1/adapters/load")
    async def load(body: AdapterBody):
        try:
            return await run_in_threadpool(engine.adapters.load, body.name, body.pin)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc)) from exc

    @app.post("/v1/adapters/unload")
    async def unload(body: AdapterBody):
        try:
            await run_in_threadpool(engine.adapters.unload, body.name)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc)) from exc
        return {"id": body.name, "unloaded": True}

    @app.get("/health")
    async def health():
        if not runner.alive:
            return _error(503, "The engine thread is not running.", "server_error")
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(_prometheus(engine.stats(), metrics), media_type="text/plain; version=0.0.4")

    return app


_GAUGES = {"running": "requests running", "waiting": "requests waiting", "kv_blocks_free": "free KV cache blocks",
           "kv_blocks_total": "KV cache blocks", "adapters_on_device": "adapters resident on the device"}


def _prometheus(stats: dict, m: _Metrics) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP rankwise_{name} {help_}")
        lines.append(f"# TYPE rankwise_{name} {kind}")
        lines.extend(f"rankwise_{name}{labels} {value}" for labels, value in samples)

    for key, help_ in _GAUGES.items():
        metric(key, "gauge", help_, [("", stats[key])])
    for key in ("requests_finished", "requests_failed", "requests_aborted", "generated_tokens", "prompt_tokens", "steps_prefill",
                "steps_decode", "preemptions", "adapter_disk_loads", "adapter_gpu_loads", "adapter_gpu_evictions",
                "adapter_host_evictions"):
        metric(f"{key}_total", "counter", key.replace("_", " "), [("", stats[key])])
    metric("http_responses_total", "counter", "HTTP responses by status code",
           [(f'{{code="{c}"}}', n) for c, n in sorted(m.http.items())])
    metric("time_to_first_token_seconds", "summary", "time from arrival to the first token",
           [("_sum", m.ttft_sum), ("_count", m.ttft_count)])
    metric("request_seconds", "summary", "time from arrival to the end",
           [("_sum", m.e2e_sum), ("_count", m.e2e_count)])
    return "\n".join(lines) + "\n"
