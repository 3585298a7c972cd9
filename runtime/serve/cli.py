"""`emu3-rt serve` (also `python -m runtime.serve`): start a Ray of its own on this machine (never one that
RAY_ADDRESS or `ray start` point to), or join the cluster --address names; deploy the service and keep it up
until Ctrl-C or SIGTERM; then stop the Ray it started, or delete only its own application from the cluster.

    emu3-rt serve --bundle models/emu3-gen --port 8000 --replicas 2 --replica-gpus 1

Ray is imported only after the arguments are read, so --help and argument errors are immediate. Each request is
logged on the console as one line (Serve's access log: method, route, status, milliseconds).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading

from emu3_rt.cli import add_bundle_options, int_in, number_in, tool_parser


def build_parser():
    ap = tool_parser("emu3-rt serve", __doc__)
    add_bundle_options(ap, threads_help="intra-op threads per replica")   # as chat and generate-image have them
    ap.add_argument("--host", default="127.0.0.1",
                    help="address the HTTP proxy listens on, and with a Ray of its own, Ray's processes too where "
                         "Ray allows it (see the README; 0.0.0.0: every interface; the API has no authentication)")
    ap.add_argument("--port", type=int_in(1, 65535), default=8000, help="HTTP port")
    ap.add_argument("--replicas", type=int_in(1), default=1, help="replicas, each loading the bundle once")
    ap.add_argument("--replica-cpus", type=number_in(0), default=1.0, help="CPUs Ray reserves per replica")
    ap.add_argument("--replica-gpus", type=number_in(0), default=0.0, help="GPUs Ray reserves per replica (1 with "
                                                                     "--device cuda)")
    ap.add_argument("--max-batch-rows", type=int_in(1), default=8,
                    help="images or answers one batched generation may hold (a request's n is at most this)")
    ap.add_argument("--batch-wait", type=number_in(0, 60), default=0.05,
                    help="seconds a batch waits for more requests after its first one")
    ap.add_argument("--body-timeout", type=number_in(0.001, 3600), default=30.0,
                    help="seconds a request body may take to arrive (408 after; a trickling upload holds a slot)")
    ap.add_argument("--no-batching", action="store_true", help="run every request as its own generation")
    ap.add_argument("--scheduling", choices=("continuous", "window"), default="continuous",
                    help="images: requests join and leave one running generation at every step (continuous), or "
                         "batch only those arriving within --batch-wait with the same options (window)")
    ap.add_argument("--max-running-rows", type=int_in(0), default=0,
                    help="continuous: step-graph rows running at once per replica (a guided image takes 2; "
                         "0: 2 x --max-batch-rows)")
    ap.add_argument("--max-waiting", type=int_in(1), default=32,
                    help="continuous: requests waiting for rows per replica (beyond: 503 + Retry-After)")
    ap.add_argument("--max-ongoing-requests", type=int_in(1), default=32,
                    help="requests one replica holds at once (running or in its batch queue)")
    ap.add_argument("--max-queued-requests", type=int_in(1), default=64,
                    help="requests waiting for a replica; beyond this the answer is 503 with Retry-After")
    ap.add_argument("--address", default=None,
                    help="the Ray cluster to join (HEAD:6379, or auto: the one `ray start` or RAY_ADDRESS names); "
                         "default: a new local Ray, stopped on exit")
    ap.add_argument("--app-name", default="emu3", help="the Serve application's name (deleted on exit)")
    ap.add_argument("--route-prefix", default="/", help="the URL prefix of the service's routes")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    own = args.address is None
    try:
        ray_options = _ray_options(args.host) if own else {}   # before Ray is imported: it reads the environment
        from emu3_rt import load_bundle
        from emu3_rt.pipeline import DEFAULT_BUNDLE

        load_bundle(DEFAULT_BUNDLE if args.bundle is None else args.bundle)   # a bad bundle fails here, in one line
        import ray
        from ray import serve

        from .app import Emu3Service, Health
        from .proxy import CALLBACK as PROXY_CALLBACK
        from .proxy import ENV as PROXY_ENV
    except ImportError as e:
        print(f"emu3-rt serve: error: {e.msg}; install the serve extra: pip install -e '.[cpu,serve]'",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - BundleError and friends: one line, as emu3-rt does
        print(f"emu3-rt serve: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2

    stop, caught, serving, handled = threading.Event(), [], threading.Event(), threading.Event()

    def on_signal(signum, frame):
        handled.set()
        if signum not in caught:
            caught.append(signum)
        stop.set()
        if not serving.is_set():   # still starting: skip the rest of the start-up
            raise _Stopped()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _watch_start_up(serving, handled, caught)
    deployed = False
    try:
        if own:   # Serve's proxy (a process Ray spawns with this environment) stops reading a body past the limit
            os.environ.setdefault(PROXY_ENV, PROXY_CALLBACK)
        # address "local": a new Ray of our own even when RAY_ADDRESS is set or `ray start` ran on this machine
        ray.init(address="local" if own else args.address, include_dashboard=False if own else None,
                 log_to_driver=True, **ray_options)
        # ray.init installs its own SIGTERM handler (sys.exit): ours shuts down cleanly
        for s in previous:
            signal.signal(s, on_signal)
        if not own and {args.app_name, _health_name(args)} & set(serve.status().applications):
            raise RuntimeError(f"the cluster already runs a Serve application named {args.app_name!r}; pick another "
                               f"with --app-name (and --route-prefix)")
        serve.start(http_options={"host": args.host, "port": args.port})
        app = Emu3Service.options(
            num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests,
            ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        ).bind(bundle=args.bundle, engine=args.engine, device=args.device, threads=args.threads, verify=args.verify,
               device_id=args.device_id, sampler=args.sampler,
               max_batch_rows=args.max_batch_rows, batch_wait_s=args.batch_wait, batching=not args.no_batching,
               body_timeout_s=args.body_timeout, scheduling=args.scheduling,
               max_running_rows=args.max_running_rows, max_waiting=args.max_waiting)
        deployed = True
        serve.run(app, name=args.app_name, route_prefix=args.route_prefix)
        # /healthz from an application of its own: it never waits behind the model's request slots
        serve.run(Health.bind(app=args.app_name, bundle=args.bundle), name=_health_name(args),
                  route_prefix=f"{args.route_prefix.rstrip('/')}/healthz")
        serving.set()
        where = "a local Ray of its own" if own else f"the Ray cluster at {args.address}"
        print(f"emu3-rt serve: http://{args.host}:{args.port}{args.route_prefix.rstrip('/')} ({args.replicas} "
              f"replica(s), on {where}); Ctrl-C stops", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except _Stopped:
        pass
    except SystemExit as e:   # ray.init's own SIGTERM handler (sys.exit(signum)), if the signal came while it ran
        if e.code != signal.SIGTERM:
            raise
        caught.append(signal.SIGTERM)
    except Exception as e:  # noqa: BLE001
        print(f"emu3-rt serve: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        handled.set()
        serving.set()   # a second signal during the shutdown below only sets `stop` again
        try:
            if ray.is_initialized():
                if own:
                    serve.shutdown()
                elif deployed:   # someone else's cluster: remove our application only, never their Serve
                    serve.delete(args.app_name)
                    serve.delete(_health_name(args))
                ray.shutdown()   # stops the Ray we started; only disconnects from a cluster we joined
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    print("emu3-rt serve: stopped", file=sys.stderr)
    return 128 + caught[0] if caught else 0


def _health_name(args) -> str:
    return f"{args.app_name}-health"


def _watch_start_up(serving: threading.Event, handled: threading.Event, caught: list[int],
                    grace_s: float = 3.0) -> None:
    """Ctrl-C or SIGTERM while Ray is still starting or connecting: Python runs signal handlers only between
    bytecodes, and ray.init can sit in native code for most of a minute (a GCS that does not answer). The C-level
    handler writes the signal to a pipe at once (signal.set_wakeup_fd); this thread reads it, and if the main
    thread has not taken the signal within grace_s, exits the process there (nothing of ours to clean up: a Ray
    of our own is up in seconds, so a long wait is a connection to someone else's cluster)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch():
        while not serving.is_set():
            signums = os.read(r, 64)
            if serving.is_set() or handled.wait(grace_s):
                continue
            caught.extend(x for x in signums if x not in caught)
            print(f"emu3-rt serve: stopped while starting ({signal.Signals(signums[0]).name})", file=sys.stderr,
                  flush=True)
            os._exit(128 + signums[0])

    threading.Thread(target=watch, name="emu3-serve-signals", daemon=True).start()


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM while starting: skip the rest of the start-up, shut down what was started."""


def _ray_options(host: str) -> dict:
    """ray.init's options (and environment) for a Ray of our own whose processes listen on `host` where Ray
    allows it. Loopback: Ray's single-machine mode (the one it runs on macOS and Windows), in which GCS, raylet,
    workers and agents all bind 127.0.0.1; set before Ray is imported, and inherited by every process it starts.
    A specific address: Ray's node address, which its agents bind (GCS, raylet and workers still listen on every
    interface: Ray has no option for them). 0.0.0.0 or ::: Ray's defaults."""
    try:
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        raise ValueError(f"--host must be localhost or an IP address (127.0.0.1, 0.0.0.0, or one of this "
                         f"machine's), got {host!r:.60}") from None
    if ip.is_loopback:
        if "ray" in sys.modules:
            raise ValueError("Ray was imported before emu3-rt serve could keep it on loopback; start it afresh")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return {}
    return {} if ip.is_unspecified else {"_node_ip_address": host}


if __name__ == "__main__":
    raise SystemExit(main())
