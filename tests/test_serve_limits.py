"""The service under hostile clients (issue 19), on a local Ray (2 CPUs) and HTTP on 127.0.0.1 only: request bodies
are counted as they stream in (413 past the limit, chunked or not, before they finish), a body must arrive within
a deadline (408), /healthz is its own application and never waits for the model's request slots, and image bombs,
overlong prompts and hostile JSON are 400s. Then all of it at once while normal requests keep being answered.
Every wait is bounded; nothing is timed.

Needs the `serve` and `serve-test` extras; skipped without them."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_serve import free_port, get, post

pytestmark = pytest.mark.serve

BODY_TIMEOUT = 6.0       # seconds: the service's body deadline here (the default is 30)
LIMIT = 64 << 20         # app.MAX_BODY_BYTES
ROUTES = ["/v1/chat/completions", "/v1/images/generations"]


@pytest.fixture(scope="module")
def service():
    """The model application at / (32 request slots, 64 queued) and the Health application at /healthz. Ray in its
    single-machine mode, every port on loopback (when Ray is first imported here), as in test_serve.py."""
    loopback = "ray" not in sys.modules and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray, serve = pytest.importorskip("ray"), pytest.importorskip("ray.serve")
    from runtime.serve.app import Emu3Service, Health
    from runtime.serve.proxy import CALLBACK, ENV

    port = free_port()
    old = os.environ.get(ENV)
    os.environ[ENV] = CALLBACK    # as emu3-rt serve sets it: the proxy stops reading a body past the limit
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Emu3Service.options(ray_actor_options={"num_cpus": 0}).bind(body_timeout_s=BODY_TIMEOUT),
                  name="emu3", route_prefix="/")
        serve.run(Health.bind(app="emu3"), name="emu3-health", route_prefix="/healthz")
        yield port
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
        if loopback:
            del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]


# ---- raw HTTP on loopback ----

def _connect(port: int, path: str, headers: dict, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", "Content-Type": "application/json",
                                                  **headers}.items())
    s.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + first)
    return s


def _response(s: socket.socket, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of the response on s."""
    s.settimeout(timeout)
    r = http.client.HTTPResponse(s, method="POST")
    r.begin()
    raw = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw)


def _answered(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0)[0])


def upload(port: int, path: str, total: int, chunked: bool = True) -> tuple[int, dict, int]:
    """POST `total` bytes of body (chunked, or with Content-Length) in 256 KiB pieces, stopping as soon as the
    response starts: (status, JSON body, bytes sent)."""
    piece = b"x" * (256 << 10)
    headers = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(total)}
    s = _connect(port, path, headers)
    sent = 0
    with contextlib.closing(s):
        s.settimeout(0.5)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < total and not _answered(s):
                frame = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
                try:
                    s.sendall(frame)
                except TimeoutError:   # the server stopped reading: its answer should be on the way
                    continue
                sent += len(piece)
        status, _, body = _response(s)
    return status, body, sent


def replica_rss_mib(port: int) -> float:
    pid = get(f"http://127.0.0.1:{port}/v1/stats")["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def png_claiming(width: int, height: int) -> bytes:
    """A 16x16 PNG whose header says width x height (decoding it would fail as truncated)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def chat_with(images: list[bytes], text: str = "What is it?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(d).decode()}}
             for d in images]
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}], "max_tokens": 2,
            "temperature": 0}


# ---- tests ----

def test_healthz_is_its_own_application(service):
    assert get(f"http://127.0.0.1:{service}/healthz") == {"status": "ok", "model": "emu3-tiny"}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_body_over_the_limit_is_refused_before_it_finishes(service, route, chunked):
    # a declared Content-Length over the limit is refused before a byte is read; a chunked body (no length) once
    # the running count passes the limit. The replica keeps no copy of it
    before = replica_rss_mib(service)
    status, body, sent = upload(service, route, 3 * LIMIT, chunked=chunked)
    assert status == 413 and body["error"]["message"] == "the request body is over 64 MiB", body
    assert sent < 2 * LIMIT if chunked else sent < LIMIT
    assert replica_rss_mib(service) - before < 96


def test_bodies_that_do_not_arrive_in_time_get_408(service):
    """Both routes, a stalled body and one trickled a byte every 0.2 s (the deadline is for the whole body, not
    between bytes), all at once."""
    stop = threading.Event()
    clients = [(_connect(service, route, {"Content-Length": "100000"}, b'{"prompt": "'), pace)
               for route in ROUTES for pace in ("stalled", "trickled")]

    def trickle(s):
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                s.sendall(b"a")

    threads = [threading.Thread(target=trickle, args=(s,)) for s, pace in clients if pace == "trickled"]
    for t in threads:
        t.start()
    try:
        answers = [_response(s, timeout=BODY_TIMEOUT * 5) for s, _ in clients]
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for s, _ in clients:
            s.close()
    message = f"the request body did not arrive within {BODY_TIMEOUT:g} s"
    assert [(status, body["error"]["message"]) for status, _, body in answers] == [(408, message)] * 4


@pytest.mark.parametrize("body, needle", [
    (chat_with([png_claiming(8000, 7000)] * 2), "megapixels; at most 100 are decoded per prompt"),
    (chat_with([png_claiming(30000, 30000)]), "decompression bomb"),
    (chat_with([png_claiming(8, 8)] * 47), "47 images in one prompt"),
    ({"messages": [{"role": "user", "content": "x" * (8 << 20)}]}, "checked before tokenizing"),
    ({"prompt": "x" * (8 << 20)}, "checked before tokenizing"),
    (b'{"prompt": "x", "image_area": 1' + b"0" * 400 + b"}", "image_area must be at most"),
    (b"[" * 200_000, "nests too deeply"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON value"),
    (b'{"prompt": "x", "cfg_scale": 1e400}', "out of float range"),
])
def test_image_bombs_long_prompts_and_hostile_json_are_400s(service, body, needle):
    route = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/images/generations"
    code, _, raw = post(f"http://127.0.0.1:{service}{route}", body)
    error = json.loads(raw)["error"]
    assert code == 400 and needle in error["message"] and error["type"] == "invalid_request_error", error


def test_under_attack_health_and_normal_requests_are_still_answered(service):
    """Bounded load on loopback, all at once: 34 clients stall their bodies (more than the replica's 32 slots),
    two 192 MiB chunked uploads, three image bombs and an overlong prompt; meanwhile /healthz answers while every
    stalled client is still waiting, and four normal requests (two chats, two images) get their 200s."""
    url = f"http://127.0.0.1:{service}"
    stalled = [_connect(service, ROUTES[i % 2], {"Content-Length": "1000"}, b"{") for i in range(34)]
    results: dict[str, object] = {}

    def run(name, call):
        try:
            results[name] = call()
        except Exception as e:  # noqa: BLE001 - handed to the assertions
            results[name] = e

    calls = {
        **{f"upload{i}": (lambda r=r: upload(service, r, 3 * LIMIT)[0]) for i, r in enumerate(ROUTES)},
        "pixels": lambda: post(f"{url}/v1/chat/completions", chat_with([png_claiming(8000, 7000)] * 2))[0],
        "count": lambda: post(f"{url}/v1/chat/completions", chat_with([png_claiming(8, 8)] * 60))[0],
        "bomb": lambda: post(f"{url}/v1/chat/completions", chat_with([png_claiming(40000, 40000)]))[0],
        "prompt": lambda: post(f"{url}/v1/images/generations", {"prompt": "y" * (4 << 20)})[0],
        "chat0": lambda: post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                                             "max_tokens": 4, "temperature": 0}, timeout=120),
        "chat1": lambda: post(f"{url}/v1/chat/completions", chat_with([_small_png()]) | {"max_tokens": 4},
                              timeout=120),
        "image0": lambda: post(f"{url}/v1/images/generations", {"prompt": "a cat", "size": "64x64", "seed": 1},
                               timeout=120),
        "image1": lambda: post(f"{url}/v1/images/generations", {"prompt": "a dog", "size": "32x64", "seed": 2},
                               timeout=120),
    }
    # a request behind them needs a slot: it cannot be answered before the first stalled body times out
    behind = threading.Thread(target=run, args=("models", lambda: get(f"{url}/v1/models")))
    try:
        time.sleep(1.0)   # let the proxy hand the stalled requests to the replica first
        behind.start()
        time.sleep(1.0)
        # /healthz while the stalled bodies hold every slot (the request behind them is still waiting)
        health = get(f"{url}/healthz")
        waiting = sum(not _answered(s) for s in stalled)
        queued = "models" not in results
        threads = [threading.Thread(target=run, args=item) for item in calls.items()]
        for t in threads:
            t.start()
        polls = [get(f"{url}/healthz")["status"] for _ in range(5)]
        for t in [*threads, behind]:
            t.join(180)
        answers = [_response(s, timeout=BODY_TIMEOUT * 6)[0] for s in stalled]
    finally:
        for s in stalled:
            s.close()
    assert health == {"status": "ok", "model": "emu3-tiny"} and waiting == 34 and queued
    assert results.pop("models")["data"][0]["id"] == "emu3-tiny"
    assert polls == ["ok"] * 5
    assert answers == [408] * 34
    codes = {name: (r[0] if isinstance(r, tuple) else r) for name, r in results.items()}
    assert codes == {"upload0": 413, "upload1": 413, "pixels": 400, "count": 400, "bomb": 400, "prompt": 400,
                     "chat0": 200, "chat1": 200, "image0": 200, "image1": 200}, codes
    assert get(f"{url}/healthz")["status"] == "ok"


def _small_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
