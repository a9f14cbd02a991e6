"""finequant serve under load: throughput and latency for 1, 4 and 16 concurrent clients vs one at a time.

    python bench/bench_serve.py [--quick] [--threads 2] [--model DIR] [--requests 32]

The model: SmolLM2-135M-Instruct quantized w8a8 (`finequant quantize ~/.cache/finequant/models/
SmolLM2-135M-Instruct -o /tmp/... --scheme w8a8`, cached under the temp dir), or --model. The server is
`finequant serve` in its own process (--slots 16, --threads as given); clients are threads of this
process posting streaming /v1/completions requests (greedy, `ignore_eos` so every request makes exactly
its max_tokens). The same requests (prompts of 24-40 tokens, 64 new tokens; quick: 8 and 8) are served:
  serial       Engine.generate in this process, one request after the other (no server, no batching);
  c=1, 4, 16   through the server by c clients at once, each taking the next request when done.
Per mode: tokens/s (new tokens / wall time of all requests), request latency p50/p90/p99 and time to
the first token p50/p90/p99; ratio = tokens/s / serial tokens/s. Every mode's tokens equal serial's.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import common

SMOLLM2 = os.path.join(os.path.expanduser("~"), ".cache", "finequant", "models", "SmolLM2-135M-Instruct")
CONCURRENCY = (1, 4, 16)
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and cloth. Over the centuries the market grew into a town, the town into a city, and the "
        "city into the capital of a region known for its bridges, its libraries and its long winters. ")


def quantized_smollm2() -> str:
    out = os.path.join(tempfile.gettempdir(), "finequant-bench-serve", "SmolLM2-135M-Instruct-w8a8")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        if not os.path.isdir(SMOLLM2):
            raise SystemExit(f"{SMOLLM2} is missing (scripts/prepare_models.py makes it); or pass --model DIR")
        subprocess.run([sys.executable, "-m", "finequant", "quantize", SMOLLM2, "-o", out, "--scheme", "w8a8",
                        "--quiet"], check=True, env=common.python_env())
    return out


def percentiles(xs) -> dict:
    return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)}


class ServerProcess:
    def __init__(self, model: str, threads: int, slots: int):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.proc = subprocess.Popen([sys.executable, "-m", "finequant", "serve", model, "--port", str(self.port),
                                      "--slots", str(slots), "--threads", str(threads), "--name", "bench",
                                      "--max-length", "512"], env=common.python_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"finequant serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("finequant serve did not start in 120 s")
            time.sleep(0.2)

    def complete(self, ids, max_tokens: int):
        """Streams one greedy completion -> (token count, latency s, time to first token s)."""
        body = json.dumps({"model": "bench", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]}")
        first, tokens, text = None, None, []
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - start
            text += [c["text"] for c in event["choices"]]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        conn.close()
        return tokens, time.perf_counter() - start, first, "".join(text)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_clients(server: ServerProcess, requests, clients: int, max_tokens: int):
    """`clients` threads take requests in order until none are left -> (wall s, per-request results)."""
    results = [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = server.complete(requests[i], max_tokens)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", help="finequant model directory (default: SmolLM2-135M-Instruct w8a8, made here)")
    p.add_argument("--requests", type=int, help="requests per mode (default 32, quick 8)")
    p.add_argument("--clients", help="comma-separated concurrency levels (default 1,4,16; quick 1,4)")
    args = p.parse_args()
    common.finish_args(args)
    model = args.model or quantized_smollm2()
    n_requests = args.requests or (8 if args.quick else 32)
    new = 8 if args.quick else 64
    concurrency = (1, 4) if args.quick else CONCURRENCY
    if args.clients:
        concurrency = tuple(int(c) for c in args.clients.split(","))

    import finequant

    engine = finequant.Engine(model, threads=args.threads)
    tok = engine.tokenizer
    ids = engine.tokenizer.encode(TEXT * 4).ids
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(n_requests):  # different prompts of 24-40 tokens from the text
        start, length = int(rng.integers(0, len(ids) - 40)), int(rng.integers(24, 41))
        requests.append(ids[start:start + length])
    print(f"finequant serve, {os.path.basename(model.rstrip('/'))} ({engine.scheme}), threads={args.threads}, "
          f"{n_requests} requests of {new} new tokens (greedy), prompts 24-40 tokens; load average now "
          f"{os.getloadavg()[0]:.2f}")

    # serial: Engine.generate, one request at a time
    engine.generate(requests[0], max_new_tokens=4, stop_tokens=[])  # warm-up
    latencies, serial_tokens = [], []
    start = time.perf_counter()
    for r in requests:
        t0 = time.perf_counter()
        serial_tokens.append(engine.generate(r, max_new_tokens=new, stop_tokens=[]))
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    serial_tps = n_requests * new / wall
    rows = [("serial generate", serial_tps, percentiles(latencies), None)]
    res = common.Results(args.out, "serve", args, {"requests": n_requests, "new_tokens": new, "model": model,
                                                   "scheme": engine.scheme})
    res.add(mode="serial", clients=1, tokens_per_s=serial_tps, latency_s=percentiles(latencies))
    del engine

    server = ServerProcess(model, args.threads, slots=max(concurrency))
    try:
        server.complete(requests[0], 4)  # warm-up
        for c in concurrency:
            wall, results = run_clients(server, requests, c, new)
            for (tokens, _, _, text), ref in zip(results, serial_tokens):
                if tokens != new:
                    raise RuntimeError(f"a request made {tokens} tokens, expected {new}")
            # the server's text equals the serial tokens' text (same tokens)
            mismatch = sum(r[3] != tok.decode(ref) for r, ref in zip(results, serial_tokens))
            tps = n_requests * new / wall
            lat = percentiles([r[1] for r in results])
            ttft = percentiles([r[2] for r in results])
            rows.append((f"server, {c} client{'s' if c > 1 else ''}", tps, lat, ttft))
            res.add(mode="server", clients=c, tokens_per_s=tps, latency_s=lat, ttft_s=ttft,
                    ratio_vs_serial=tps / serial_tps, text_mismatches=mismatch)
            if mismatch:
                print(f"  warning: {mismatch} of {n_requests} texts differ from serial generate's")
    finally:
        server.close()

    print(f"{'mode':<20} {'tokens/s':>9} {'ratio':>7}   latency p50/p90/p99 s   first token p50/p90/p99 s")
    for name, tps, lat, ttft in rows:
        first = "-" if ttft is None else f"{ttft['p50']:.3f} / {ttft['p90']:.3f} / {ttft['p99']:.3f}"
        print(f"{name:<20} {tps:9.1f} {tps / serial_tps:6.2f}x   {lat['p50']:.2f} / {lat['p90']:.2f} / "
              f"{lat['p99']:.2f}        {first}")
    print(f"load average after: {os.getloadavg()[0]:.2f}; results appended to {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
