"""`emu3-rt serve` (also `python -m runtime.serve`): start Ray on this machine, or join a cluster with --address,
deploy the service and keep it up until Ctrl-C or SIGTERM, then shut Serve and Ray down.

    emu3-rt serve --bundle models/emu3-gen --port 8000 --replicas 2 --replica-gpus 1

Ray is imported only after the arguments are read, so --help and argument errors are immediate.
"""

from __future__ import annotations

import signal
import sys
import threading

from emu3_rt.cli import int_in, number, tool_parser


def build_parser():
    ap = tool_parser("emu3-rt serve", __doc__)
    ap.add_argument("--bundle", default=None, metavar="DIR",
                    help="bundle directory (default: the embedded tiny bundle)")
    ap.add_argument("--engine", choices=("ort", "trt"), default="ort", help="inference engine")
    ap.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu", help="onnxruntime device")
    ap.add_argument("--threads", type=int_in(0), default=0, help="onnxruntime threads per replica (0: its choice)")
    ap.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (0.0.0.0: every "
                                                        "interface; the API has no authentication)")
    ap.add_argument("--port", type=int_in(1, 65535), default=8000, help="HTTP port")
    ap.add_argument("--replicas", type=int_in(1), default=1, help="replicas, each loading the bundle once")
    ap.add_argument("--replica-cpus", type=number, default=1.0, help="CPUs Ray reserves per replica")
    ap.add_argument("--replica-gpus", type=number, default=0.0, help="GPUs Ray reserves per replica (1 with "
                                                                     "--device cuda)")
    ap.add_argument("--max-batch-rows", type=int_in(1), default=8,
                    help="images or answers one batched generation may hold (a request's n is at most this)")
    ap.add_argument("--batch-wait", type=number, default=0.05,
                    help="seconds a batch waits for more requests after its first one")
    ap.add_argument("--no-batching", action="store_true", help="run every request as its own generation")
    ap.add_argument("--max-ongoing-requests", type=int_in(1), default=32,
                    help="requests one replica holds at once (running or in its batch queue)")
    ap.add_argument("--max-queued-requests", type=int_in(1), default=64,
                    help="requests waiting for a replica; beyond this the answer is 503 with Retry-After")
    ap.add_argument("--address", default=None,
                    help="an existing Ray cluster to join (e.g. auto, or HEAD:6379); default: a local Ray")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        from emu3_rt import load_bundle
        from emu3_rt.pipeline import DEFAULT_BUNDLE

        load_bundle(DEFAULT_BUNDLE if args.bundle is None else args.bundle)   # a bad bundle fails here, in one line
        import ray
        from ray import serve

        from .app import Emu3Service
    except ImportError as e:
        print(f"emu3-rt serve: error: {e.msg}; install the serve extra: pip install -e '.[cpu,serve]'",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - BundleError and friends: one line, as emu3-rt does
        print(f"emu3-rt serve: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2

    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum, frame):
        caught.append(signum)
        stop.set()

    previous = {}
    try:
        ray.init(address=args.address, include_dashboard=False if args.address is None else None,
                 log_to_driver=False)
        # after ray.init, which installs its own fatal-signal handler for SIGTERM: ours shuts down cleanly
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": args.host, "port": args.port})
        app = Emu3Service.options(
            num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests,
            ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        ).bind(bundle=args.bundle, engine=args.engine, device=args.device, threads=args.threads,
               max_batch_rows=args.max_batch_rows, batch_wait_s=args.batch_wait, batching=not args.no_batching)
        serve.run(app, name="emu3", route_prefix="/")
        print(f"emu3-rt serve: http://{args.host}:{args.port} ({args.replicas} replica(s)); Ctrl-C stops",
              file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except Exception as e:  # noqa: BLE001
        print(f"emu3-rt serve: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    print("emu3-rt serve: stopped", file=sys.stderr)
    return 128 + caught[0] if caught else 0


if __name__ == "__main__":
    raise SystemExit(main())
