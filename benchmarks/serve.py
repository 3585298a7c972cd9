"""Load benchmark of the Ray Serve service against the single-process API: throughput and p50/p95 latency for
1, 2, 4 and 8 concurrent clients, with batching on and off.

    python -m benchmarks.serve [--bundle DIR] [--task image|chat] [--clients 1 2 4 8] [--requests 8] [--json OUT]

Modes, measured in one run on one machine (each client sends --requests requests one after another):
  direct    - threads calling one shared `emu3_rt.load()` model (generations run side by side, no batching);
  serve     - HTTP to one replica with batching (@serve.batch: concurrent requests become one generation);
  unbatched - HTTP to one replica with batching off (every request its own generation, stepped side by side).
Every request has its own prompt and seed. Needs the serve extra; Ray runs locally, HTTP on loopback.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.request

import numpy as np

MODES = ("direct", "serve", "unbatched")


def _post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()


def _request(task: str, i: int, args) -> dict:
    if task == "image":
        return {"prompt": f"a red cat number {i}", "seed": i, "size": args.size}
    return {"messages": [{"role": "user", "content": f"Tell me about the number {i}."}], "seed": i,
            "max_tokens": args.max_tokens}


def _call(mode: str, task: str, i: int, args, model, base: str):
    """One request of `mode`: a function that runs it to the end."""
    body = _request(task, i, args)
    if mode == "direct":
        if task == "image":
            w, h = map(int, args.size.split("x"))
            return lambda: model.generate_image(body["prompt"], ratio=f"{w}:{h}", image_area=w * h, seed=i)
        return lambda: model.chat(body["messages"][0]["content"], seed=i, max_new_tokens=args.max_tokens)
    path = "/v1/images/generations" if task == "image" else "/v1/chat/completions"
    prefix = "" if mode == "serve" else "/unbatched"
    return lambda: _post(base + prefix + path, body)


def run_level(mode: str, task: str, clients: int, args, model, base: str) -> dict:
    """`clients` threads, each sending args.requests requests in a row; latencies and the wall time."""
    latencies: list[float] = []
    lock, start = threading.Lock(), threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for k in range(args.requests):
            call = _call(mode, task, 1000 * c + k, args, model, base)
            t = time.perf_counter()
            call()
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"mode": mode, "task": task, "clients": clients, "requests": len(lat), "seconds": wall,
            "throughput": len(lat) / wall, "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    from emu3_rt.cli import int_in, number, tool_parser

    ap = tool_parser("python -m benchmarks.serve", __doc__)
    ap.add_argument("--bundle", default=None, metavar="DIR",
                    help="bundle directory (default: the embedded tiny bundle)")
    ap.add_argument("--task", choices=("image", "chat"), default="image", help="what every request asks for")
    ap.add_argument("--clients", type=int_in(1), nargs="+", default=[1, 2, 4, 8], metavar="N",
                    help="concurrency levels")
    ap.add_argument("--requests", type=int_in(1), default=8, help="requests each client sends, one after another")
    ap.add_argument("--size", default="64x64", help="image size WxH (64x64: the tiny bundle's own area)")
    ap.add_argument("--max-tokens", type=int_in(1), default=64, help="chat answer length (tokens)")
    ap.add_argument("--batch-wait", type=number, default=0.05, help="the service's batch_wait_s")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to measure")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON to OUT")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    import emu3_rt
    from runtime.serve.app import Emu3Service

    model = emu3_rt.load(args.bundle)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = dict(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, max_queued_requests=-1)
        rows_cap = max(args.clients)
        serve.run(Emu3Service.options(**options).bind(bundle=args.bundle, max_batch_rows=rows_cap,
                                                      batch_wait_s=args.batch_wait), name="serve", route_prefix="/")
        serve.run(Emu3Service.options(**options).bind(bundle=args.bundle, batching=False), name="unbatched",
                  route_prefix="/unbatched")
        for mode in args.modes:
            _call(mode, args.task, 0, args, model, base)()   # warm-up: sessions open lazily
            for clients in args.clients:
                rows.append(run_level(mode, args.task, clients, args, model, base))
                r = rows[-1]
                print(f"{r['mode']:9} {r['task']:5} clients {r['clients']:2d}: {r['throughput']:6.2f} req/s, "
                      f"p50 {r['p50']:6.3f} s, p95 {r['p95']:6.3f} s ({r['requests']} requests)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("\n| mode | clients | req/s | p50 s | p95 s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['throughput']:.2f} | {r['p50']:.3f} | {r['p95']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
