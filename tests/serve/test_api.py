"""The HTTP API on loopback: OpenAI-style answers, 4xx/429, disconnects, hot load/unload, a bounded load test."""

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from rankwise.serve.api import EngineRunner, create_app
from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.engine import Engine, Request

ADAPTERS = ["r4", "mixed", "dora"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from rankwise.serve.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"))


def _engine(demo, **kw):
    cfg = dict(max_num_seqs=8, max_model_len=128, block_size=8, max_num_batched_tokens=256)
    cfg.update(kw)
    return Engine.from_pretrained(demo / "model", EngineConfig(**cfg), adapter_dir=demo / "adapters")


class GatedRunner(EngineRunner):
    """Does not step the engine until `gate` is set (to hold requests in the queue); then steps every `delay` s."""

    def __init__(self, engine, delay=0.0):
        super().__init__(engine)
        self.gate = threading.Event()
        step = engine.step

        def slow_step():
            time.sleep(delay)
            return step()

        engine.step = slow_step

    def _loop(self):
        while not self.gate.wait(0.01):
            if self._stop:
                return
        super()._loop()


@contextmanager
def serve(engine, runner=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, served_model_name="base", runner=runner)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _idle(engine, timeout=10.0):
    """Wait until the engine holds nothing; True when every row, block and adapter reference is free."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        refs = sum(engine.adapters.describe(n).get("in_use", 0) for n in ADAPTERS)
        if s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] and refs == 0 \
                and engine.num_requests() == 0:
            return True
        time.sleep(0.02)
    return False


def test_completions_chat_streaming_models_metrics(demo):
    engine = _engine(demo)
    with serve(engine) as url, httpx.Client(base_url=url, timeout=30) as c:
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models == ["base"] + sorted(ADAPTERS)
        body = {"model": "mixed", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        ids = engine.tokenizer("Hello")["input_ids"]
        expected = _engine(demo).generate([Request(ids, "mixed", SamplingParams(max_tokens=6))])[0]
        assert out["choices"][0]["token_ids"] == expected.output_ids and out["choices"][0]["text"] == expected.text
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
        assert out["choices"][0]["finish_reason"] == "length"
        base = c.post("/v1/completions", json={**body, "model": "base"}).json()
        assert base["choices"][0]["token_ids"] != out["choices"][0]["token_ids"]
        chunks = []
        with c.stream("POST", "/v1/chat/completions", json={"model": "dora", "stream": True, "max_tokens": 5,
                                                             "messages": [{"role": "user", "content": "hi"}]}) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
        assert chunks[-1] == "[DONE]"
        events = [json.loads(x) for x in chunks[:-1]]
        assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 5
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["requests_finished"] >= 3
        metrics = c.get("/metrics").text
        assert "rankwise_generated_tokens_total" in metrics and 'rankwise_http_responses_total{code="200"}' in metrics


def test_bad_requests_get_4xx_with_a_message(demo):
    engine = _engine(demo)
    with serve(engine) as url, httpx.Client(base_url=url, timeout=30) as c:
        cases = [
            (c.post("/v1/completions", content=b'{"model": "r4", "prompt": ', headers={"content-type": "application/json"}),
             400, "not valid JSON"),
            (c.post("/v1/completions", json={"prompt": "x"}), 400, "model"),
            (c.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "not found"),
            (c.post("/v1/completions", json={"model": "../adapters/r4", "prompt": "x"}), 400, "not valid"),
            (c.post("/v1/completions", json={"model": "/etc", "prompt": "x"}), 400, "not valid"),
            (c.post("/v1/completions", json={"model": "r4", "prompt": "x" * 100, "max_tokens": 50}), 400,
             "max_model_len=128"),
            (c.post("/v1/completions", json={"model": "r4", "prompt": "x", "temperature": -1}), 400, "temperature"),
            (c.post("/v1/completions", json={"model": "r4", "prompt": "x", "n": 2}), 400, "n=1"),
            (c.post("/v1/completions", json={"model": "r4", "prompt": [1, 999]}), 400, "[0, 258)"),
            (c.post("/v1/chat/completions", json={"model": "r4", "messages": []}), 400, "messages"),
            (c.post("/v1/adapters/load", json={"name": "../../model"}), 400, "not valid"),
        ]
        for r, status, text in cases:
            assert r.status_code == status, (r.status_code, r.text)
            assert text in r.json()["error"]["message"], r.text
    assert _idle(engine)


def test_queue_limit_answers_429_and_queued_requests_still_complete(demo):
    engine = _engine(demo, max_queue=2)
    runner = GatedRunner(engine)

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "r4", "prompt": "ab", "max_tokens": 3}
            held = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(2)]
            while engine.num_requests() < 2:
                await asyncio.sleep(0.01)
            extra = await c.post("/v1/completions", json=body)
            runner.gate.set()
            return extra, await asyncio.gather(*held)

    with serve(engine, runner) as url:
        extra, held = asyncio.run(scenario(url))
    assert extra.status_code == 429 and "max_queue=2" in extra.json()["error"]["message"]
    assert [r.status_code for r in held] == [200, 200]


def test_disconnected_clients_free_their_slots(demo):
    engine = _engine(demo)
    runner = GatedRunner(engine, delay=0.02)
    with serve(engine, runner) as url:
        with httpx.Client(base_url=url, timeout=0.5) as c:  # non-streaming client that gives up
            with pytest.raises(httpx.TimeoutException):
                c.post("/v1/completions", json={"model": "mixed", "prompt": "abc", "max_tokens": 100,
                                                   "ignore_eos": True})
        deadline = time.monotonic() + 5
        while not engine._aborts and time.monotonic() < deadline:  # the server noticed the disconnect
            time.sleep(0.01)
        runner.gate.set()
        with httpx.Client(base_url=url, timeout=30) as c:  # streaming client that leaves after one chunk
            with c.stream("POST", "/v1/completions", json={"model": "r4", "prompt": "abc", "max_tokens": 100,
                                                           "stream": True, "ignore_eos": True}) as s:
                next(s.iter_lines())
        assert _idle(engine), engine.stats()
        assert engine.stats()["requests_aborted"] == 2, str(engine.stats())
        assert engine.stats()["generated_tokens"] < 100


def test_load_pin_unload_at_run_time(demo):
    engine = _engine(demo)
    with serve(engine) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/adapters/load", json={"name": "dora", "pin": True})
        assert r.status_code == 200 and r.json()["pinned"] and r.json()["dora"]
        deadline = time.monotonic() + 10
        while c.get("/v1/adapters").json()["data"][0]["state"] != "gpu" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.adapters.describe("dora")["state"] == "gpu"
        assert c.post("/v1/adapters/unload", json={"name": "dora"}).json()["unloaded"]
        assert engine.adapters.describe("dora")["state"] == "disk"
        assert c.post("/v1/adapters/unload", json={"name": "ghost"}).status_code == 404


def test_bounded_load_test_on_loopback(demo):
    engine = _engine(demo, max_queue=64)
    seconds, clients = 4.0, 24
    results = {"ok": 0, "errors": []}

    async def client(c, i):
        deadline = time.monotonic() + seconds
        k = 0
        while time.monotonic() < deadline:
            model = (["base"] + ADAPTERS)[(i + k) % 4]
            body = {"model": model, "prompt": "load test " * (1 + k % 3), "max_tokens": 1 + (i * 7 + k) % 12,
                    "temperature": 0.7 * (k % 2), "stream": k % 3 == 0, "ignore_eos": True}
            k += 1
            try:
                if body["stream"]:
                    async with c.stream("POST", "/v1/completions", json=body) as s:
                        lines = [line async for line in s.aiter_lines() if line]
                    assert s.status_code == 200 and lines[-1] == "data: [DONE]"
                else:
                    r = await c.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    assert r.json()["usage"]["completion_tokens"] == body["max_tokens"]
                results["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                results["errors"].append(repr(exc))

    async def main(url):
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
            await asyncio.wait_for(asyncio.gather(*(client(c, i) for i in range(clients))), seconds + 60)

    with serve(engine) as url:
        asyncio.run(main(url))
        assert _idle(engine), engine.stats()
    assert results["errors"] == [] and results["ok"] >= clients
    stats = engine.stats()
    assert stats["requests_failed"] == 0 and stats["requests_finished"] == results["ok"]
