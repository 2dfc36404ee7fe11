"""Start `rankwise serve` (the CLI, as a subprocess) on a real-shaped model and talk to it over HTTP.

    python bench/serve_http_check.py --work /tmp/http-check [--shape 1b|tiny]

Writes a random-weight Llama-3.2-1B-shaped checkpoint (no tokenizer: prompts are token ids) and three PEFT
adapters of ranks 8, 32, 64, starts the server, then checks /health, /v1/models, a completion per adapter and
the base, a streamed chat-less completion, a 404 and /metrics. Prints one line per check and the server's
start-up time; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402  (bench/serve.py: model shape and adapter writer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/rankwise-http-check")
    ap.add_argument("--shape", choices=["1b", "tiny"], default="1b" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--port", type=int, default=8711)
    args = ap.parse_args()
    import httpx

    if args.shape == "tiny":
        bench.SHAPE.update(bench.SMOKE_SHAPE)
    work = Path(args.work)
    model = bench.build_hf(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(work / "model")
    del model
    names = bench.write_adapters(work / "adapters", "a", 3, bench.QKVO, 16, b_scale=1.0)
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "rankwise.serve.cli", "--model", str(work / "model"),
                               "--adapters", str(work / "adapters"), "--port", str(args.port), "--max-model-len",
                               "1024"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url, ok = f"http://127.0.0.1:{args.port}", True
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.perf_counter() - t0 > 300:
                    print("FAIL: the server did not start")
                    return 1
                time.sleep(0.5)
            print(f"server up after {time.perf_counter() - t0:.1f} s (load, warm-up with CUDA graph capture)")

            def check(label, cond, detail=""):
                nonlocal ok
                ok &= bool(cond)
                print(f"{'ok  ' if cond else 'FAIL'} {label} {detail}")

            models = [m["id"] for m in c.get("/v1/models").json()["data"]]
            check("/v1/models", models == ["model"] + names, models)
            prompt = list(range(100, 164))
            outs = {}
            for name in ["model"] + names:
                t = time.perf_counter()
                r = c.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 32,
                                                    "temperature": 0, "ignore_eos": True})
                outs[name] = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.text
                check(f"completion {name}", r.status_code == 200 and len(outs[name]) == 32,
                      f"{1e3 * (time.perf_counter() - t):.0f} ms")
            check("adapters change the output", all(outs[n] != outs["model"] for n in names))
            with c.stream("POST", "/v1/completions", json={"model": names[2], "prompt": prompt, "max_tokens": 16,
                                                           "stream": True, "ignore_eos": True}) as s:
                events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
            got = [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]]
            check("stream", events[-1] == "[DONE]" and len(got) == 16, f"{len(events) - 1} events")
            check("404 for an unknown adapter", c.post("/v1/completions", json={"model": "nope", "prompt": [1]})
                  .status_code == 404)
            metrics = c.get("/metrics").text
            check("/metrics", "rankwise_generated_tokens_total" in metrics)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
