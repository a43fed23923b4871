"""A small load check of `lockstep serve`: N concurrent clients, each sending M chat requests
one after the other, against a real server on 127.0.0.1, non-streaming and streaming.

    .venv/bin/python bench/serve_load.py [--model builtin:tiny] [--clients 1 4 8]
                                         [--requests 8] [--max-tokens 32]

The default model is the demo's (builtin:tiny, 3.4M parameters); its random weights rarely end
a reply early, so every reply is about --max-tokens tokens and the numbers measure the server,
not the model's answer lengths (a trained run: --model runs/demo). Prompts are the demo's eval
prompts, greedy. Records requests/s, completion tokens/s, p50/p95 latency and, streaming, the
time to the first token, for each number of clients; prints a table and writes
bench/serve_load.json. Standard library only (urllib), so the client costs little next to the
server; the server is started with this checkout's lockstep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "src" / "lockstep" / "examples" / "data" / "demo_eval.jsonl"


def prompts() -> list[str]:
    """The demo's eval prompts, as its alpaca records render them (instruction, blank, input)."""
    records = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines()]
    return [f"{r['instruction']}\n\n{r['input']}" for r in records]


def start(model: str) -> tuple[subprocess.Popen, str]:
    """`lockstep serve MODEL --port 0`, once it prints its URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "lockstep", "serve", model, "--port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    found = re.search(r"at (http://\S+/v1) ", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, found.group(1)


def request(url: str, body: dict, stream: bool) -> dict:
    """One chat completion; its latency, time to the first token and completion tokens."""
    data = json.dumps({**body, "stream": stream, "stream_options": {"include_usage": True}}
                      if stream else body).encode()  # fmt: skip
    req = urllib.request.Request(
        f"{url}/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    begin = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as response:
        if not stream:
            tokens = json.loads(response.read())["usage"]["completion_tokens"]
        else:
            tokens = 0
            for line in response:
                text = line.decode().strip()
                if not text.startswith("data: {"):
                    continue
                chunk = json.loads(text[6:])
                content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if content and first is None:
                    first = time.perf_counter() - begin
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - begin, "ttft": first, "tokens": tokens}


def load(url: str, model: str, clients: int, per_client: int, max_tokens: int,
         stream: bool) -> dict:  # fmt: skip
    """`clients` threads, each sending `per_client` requests in turn; the numbers of them all."""
    texts = prompts()

    def client(c: int) -> list[dict]:
        out = []
        for i in range(per_client):
            prompt = texts[(c * per_client + i) % len(texts)]
            body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
            out.append(request(url, body, stream))
        return out

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - begin
    latencies = sorted(r["latency"] for r in done)
    row = {
        "clients": clients, "requests": len(done), "stream": stream, "wall_s": round(wall, 3),
        "requests_per_s": round(len(done) / wall, 3),
        "completion_tokens_per_s": round(sum(r["tokens"] for r in done) / wall, 1),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
    }  # fmt: skip
    if stream:
        firsts = sorted(r["ttft"] for r in done if r["ttft"] is not None)
        row["ttft_p50_s"] = round(percentile(firsts, 50), 3) if firsts else None
        row["ttft_p95_s"] = round(percentile(firsts, 95), 3) if firsts else None
    return row


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile, interpolated between the nearest ranks."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny", help="what to serve (default builtin:tiny)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "serve_load.json")
    args = ap.parse_args()
    proc, url = start(args.model)
    try:
        name = json.loads(urllib.request.urlopen(f"{url}/models", timeout=60).read())["data"][0]
        load(url, name["id"], 1, 2, args.max_tokens, False)  # warm-up
        rows = [
            load(url, name["id"], n, args.requests, args.max_tokens, stream)
            for stream in (False, True)
            for n in args.clients
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(), "max_tokens": args.max_tokens,
        "loadavg_after": os.getloadavg(),  # other users' work on the machine included
        "rows": rows,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        "| clients | stream | requests | req/s | tokens/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ttft = f"{r['ttft_p50_s']} | {r['ttft_p95_s']}" if r["stream"] else "- | -"
        print(f"| {r['clients']} | {'yes' if r['stream'] else 'no'} | {r['requests']} | "
              f"{r['requests_per_s']} | {r['completion_tokens_per_s']} | {r['latency_p50_s']} | "
              f"{r['latency_p95_s']} | {ttft} |")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
