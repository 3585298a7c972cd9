"""The Ray Serve service (runtime/serve) on the embedded tiny bundle: a local Ray (2 CPUs, no dashboard), HTTP on
loopback only, every wait bounded. Results are compared with the direct API (emu3_rt.load()) in this process.

Needs the `serve` and `serve-test` extras; skipped without them. Run: python -m pytest -m serve tests/test_serve.py
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import emu3_rt
from emu3_rt import SamplingOptions
from runtime.serve.batcher import Stats, drive
from runtime.serve.client import Client, ServiceError, data_uri, decode_png, user_message
from runtime.serve.protocol import image_job

pytestmark = pytest.mark.serve

REPO = Path(__file__).resolve().parents[1]
BATCH_WAIT = 0.5   # seconds: long enough that requests sent together on a busy 2-core machine share a batch


# ---- helpers ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body, timeout: float = 60) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def sse_events(raw: bytes) -> list:
    """The data of each SSE event, JSON-decoded ([DONE] kept as the string)."""
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def together(calls: list) -> list:
    """Run the calls at the same moment from threads; their results (or the exception raised) in order."""
    results, start = [None] * len(calls), threading.Barrier(len(calls))

    def run(i, call):
        start.wait()
        try:
            results[i] = call()
        except Exception as e:  # noqa: BLE001 - handed to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    """The process's command line ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def stats(url: str) -> dict:
    return get(f"{url}/v1/stats")


def image_body(prompt: str, seed: int, **extra) -> dict:
    return {"prompt": prompt, "seed": seed, **extra}


# ---- the batcher alone (no Ray) ----

def _drive(model, jobs: list, stats: Stats, leave_after: int | None = None) -> dict:
    """Run drive() to the end like @serve.batch would: per job, its events, stopping at StopAsyncIteration.
    leave_after: every job's client leaves after that many rounds."""
    events: dict = {id(j): [] for j in jobs}

    async def run():
        rounds = 0
        async for out in drive(model, jobs, stats):
            for job, item in zip(jobs, out):
                if item is not StopAsyncIteration:
                    events[id(job)] += item
            rounds += 1
            if leave_after is not None and rounds == leave_after:
                for job in jobs:
                    job.gone = True

    asyncio.run(run())
    return {id(j): events[id(j)] for j in jobs}


def test_batcher_groups_by_key_isolates_bad_requests_and_matches_the_direct_api(direct):
    bodies = [image_body("a dog", 5), image_body("a cat", 6, cfg_scale=2.0), image_body("cat " * 2000, 7),
              image_body("a bird", 8, n=2)]
    jobs = [image_job(b, direct, 8) for b in bodies]
    stats = Stats()
    events = _drive(direct, jobs, stats)
    # two keys (cfg 3 and cfg 2): two generations; the overlong prompt fails alone and its key-mates still batch
    assert stats.snapshot()["generations"] == 2 and sorted(stats.snapshot()["generation_rows"]) == [1, 3]
    bad = events[id(jobs[2])]
    assert [e["type"] for e in bad] == ["error"] and isinstance(bad[0]["error"], emu3_rt.PromptError)
    for job, body in zip(jobs, bodies):
        if job is jobs[2]:
            continue
        (result,) = [e for e in events[id(job)] if e["type"] == "result"]
        alone = direct.generate_image([body["prompt"]] * job.rows, seed=body["seed"],
                                      cfg_scale=body.get("cfg_scale"))
        for i, r in enumerate(result["rows"]):
            assert result["result"].tokens[r] == alone.tokens[i]


class _FailingAt:
    """A model whose image generations with cfg_scale 2 fail at their third step, as a broken engine would."""

    def __init__(self, model):
        self.model = model

    def start_image(self, *args, **kwargs):
        gen = self.model.start_image(*args, **kwargs)
        if kwargs["cfg_scale"] != 2.0:
            return gen
        step, calls = gen.step, []

        def failing_step():
            calls.append(1)
            if len(calls) == 3:
                raise emu3_rt.EngineError("decode step 2: decoder_step.onnx: run failed (injected)")
            return step()

        gen.step = failing_step
        return gen


def test_batcher_fails_only_the_generation_whose_engine_failed(direct):
    jobs = [image_job(image_body("a dog", 5, cfg_scale=2.0), direct, 8),
            image_job(image_body("a cat", 6, cfg_scale=2.0), direct, 8), image_job(image_body("a cow", 7), direct, 8)]
    events = _drive(_FailingAt(direct), jobs, Stats())
    for job in jobs[:2]:
        assert [e["type"] for e in events[id(job)]] == ["started", "error"]
        assert str(events[id(job)][-1]["error"]).endswith("(injected)")
    assert [e["type"] for e in events[id(jobs[2])]] == ["started", "result"]


def test_batcher_cancels_a_generation_whose_clients_left(direct):
    jobs = [image_job(image_body("a dog", 5, stream=True), direct, 8),
            image_job(image_body("a cat", 6, stream=True), direct, 8)]
    stats = Stats()
    # the clients leave after "started" and the first grid row (an 8x8 grid: 9 steps, the EOL included)
    events = _drive(direct, jobs, stats, leave_after=2)
    snap = stats.snapshot()
    assert snap["cancelled_rows"] == 2 and snap["decode_steps"] == 9
    assert [e["type"] for e in events[id(jobs[0])]] == ["started", "rows"]


# ---- the service ----

@pytest.fixture(scope="module")
def direct():
    return emu3_rt.load()


@pytest.fixture(scope="module")
def service():
    """The main app at / (window batching, 8 rows), a continuous-batching one at /cb and a tight one at /tight (1
    request at a time, 1 queued, no batching) for overload and replica failure. Shut down by the last test, or
    here. Ray in its single-machine mode, as `emu3-rt serve` runs it: every Ray port on loopback (when Ray is
    first imported here)."""
    loopback = "ray" not in sys.modules and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray, serve = pytest.importorskip("ray"), pytest.importorskip("ray.serve")
    from runtime.serve.app import Emu3Service

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = dict(ray_actor_options={"num_cpus": 0}, health_check_period_s=1, health_check_timeout_s=10)
        serve.run(Emu3Service.options(**options).bind(batch_wait_s=BATCH_WAIT, max_batch_rows=8,
                                                      scheduling="window"), name="emu3", route_prefix="/")
        # continuous batching, small bounds: 6 step-graph rows (3 guided images), 2 waiting, short prefill chunks
        serve.run(Emu3Service.options(**options).bind(max_running_rows=6, max_waiting=2, prefill_chunk=16),
                  name="cb", route_prefix="/cb")
        serve.run(Emu3Service.options(**options, max_ongoing_requests=1, max_queued_requests=1).bind(batching=False),
                  name="tight", route_prefix="/tight")
        yield f"http://127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if loopback:
            del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]


# ---- tests ----

def test_health_and_models(service, direct):
    assert get(f"{service}/healthz") == {"status": "ok", "model": "emu3-tiny"}
    (model,) = get(f"{service}/v1/models")["data"]
    assert model["id"] == "emu3-tiny" and model["sha256"] == direct.bundle.sha256


def test_four_concurrent_images_are_one_batched_decode_and_equal_the_direct_api(service, direct):
    # different prompts, seeds, sizes and areas (64x64 is an 8x8 grid, 128x32 a 4x16 one, 96x48 a 6x12 one), the
    # same guidance and sampling: every row keeps its own grid inside the one generation
    requests = [("a red cat", 11, "64x64"), ("a blue car", 12, "128x32"), ("a tree", 13, "96x48"),
                ("the sea at night", 14, "128x32")]
    before = stats(service)
    answers = together([lambda r=r: post(f"{service}/v1/images/generations", image_body(r[0], r[1], size=r[2]))
                        for r in requests])
    after = stats(service)
    assert [a[0] for a in answers] == [200] * 4, [a[2][:200] for a in answers]
    assert after["generations"] - before["generations"] == 1 and after["generation_rows"][-1] == 4
    grids = [(8, 8), (4, 16), (6, 12)]
    # one generation steps until its longest image is done: h*(w+1)+3 tokens, one step graph run per token
    assert after["decode_steps"] - before["decode_steps"] == max(h * (w + 1) + 3 for h, w in grids)
    for (prompt, seed, size), (_, _, raw) in zip(requests, answers):
        (item,) = json.loads(raw)["data"]
        w, h = map(int, size.split("x"))
        alone = direct.generate_image(prompt, ratio=f"{w}:{h}", image_area=w * h, seed=seed)
        image = decode_png(item["b64_json"])
        assert item["seed"] == seed and np.array_equal(pixels(image), pixels(alone.images[0]))
        meta = json.loads(image.text["parameters"])
        assert meta["seed"] == seed and meta["prompt"] == prompt and meta["bundle_sha256"] == direct.bundle.sha256


def test_concurrent_chats_batch_and_equal_the_direct_api(service, direct):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    chats = [("Describe it.", [photo], 5, 12), ("Hello there", [], 6, 12), ("Why is the sky blue?", [], 7, 12)]
    before = stats(service)
    answers = together([lambda c=c: Client(service).post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "text", "text": c[0]}] + [
            {"type": "image_url", "image_url": {"url": data_uri(im)}} for im in c[1]]}],
        "seed": c[2], "max_tokens": c[3]}) for c in chats])
    after = stats(service)
    assert after["generations"] - before["generations"] == 1 and after["generation_rows"][-1] == 3
    for (text, images, seed, max_tokens), answer in zip(chats, answers):
        alone = direct.chat(text, images=images or None, seed=seed, max_new_tokens=max_tokens)
        assert answer["choices"][0]["message"]["content"] == alone.texts[0]
        assert answer["usage"]["completion_tokens"] == len(alone.tokens[0]) and answer["seeds"] == [seed]


def test_a_bad_request_fails_alone_and_the_rest_still_batch(service, direct):
    too_long = "cat " * 2000   # over the tiny model's 1024-position context: PromptError when it starts
    before = stats(service)
    answers = together([lambda p=p: post(f"{service}/v1/images/generations", image_body(p, 3))
                        for p in ("a dog", too_long, "a bird")])
    after = stats(service)
    with pytest.raises(emu3_rt.PromptError) as alone:
        direct.generate_image(too_long, seed=3)
    assert answers[1][0] == 400 and json.loads(answers[1][2])["error"]["message"] == str(alone.value)
    assert answers[0][0] == answers[2][0] == 200
    assert after["generations"] - before["generations"] == 1 and after["generation_rows"][-1] == 2


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/images/generations", {"prompt": " "}, 400, lambda m: str(_raises(lambda: m.generate_image(" ")))),
    ("/v1/images/generations", {"prompt": "x", "seed": -1}, 400,
     lambda m: str(_raises(lambda: m.generate_image("x", seed=-1)))),
    ("/v1/images/generations", {"prompt": "x", "seed": "7"}, 400,
     lambda m: str(_raises(lambda: m.generate_image("x", seed="7")))),
    ("/v1/images/generations", {"prompt": "x", "top_k": 0}, 400,
     lambda m: str(_raises(lambda: m.generate_image("x", sampling=SamplingOptions(top_k=0))))),
    ("/v1/images/generations", {"prompt": "x", "cfg_scale": -1}, 400,
     lambda m: str(_raises(lambda: m.generate_image("x", cfg_scale=-1)))),
    ("/v1/images/generations", {"prompt": "x", "ratio": "wide"}, 400,
     lambda m: str(_raises(lambda: m.generate_image("x", ratio="wide")))),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, 400, "n must be in [1, 8], got 9"),
    ("/v1/images/generations", {"prompt": "x", "seed": [1, 2]}, 400,
     lambda m: str(_raises(lambda: m.generate_image("x", seed=[1, 2])))),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size must look like WxH"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "response_format must be"),
    ("/v1/images/generations", {"prompt": "x", "style": "vivid"}, 400, "unsupported field 'style'"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, "model 'dall-e-3' not found"),
    ("/v1/images/generations", b"{not json", 400, "the request body is not valid JSON"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "yo"}]}, 400,
     "the last message must be a user message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                                           {"role": "user", "content": "yo"}]}, 400, "must come before"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role 'tool' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zy8+"}}]}]}, 400,
     "unsupported image type 'image/svg+xml'"),
    ("/v1/images/generations", {"prompt": "x", "size": "720x720"}, 400,
     lambda m: str(_raises(lambda: m.generate_image("x", ratio="720:720", image_area=720 * 720)))),
    ("/v1/images/generations", {"prompt": "x", "partial_images": 4, "stream": True}, 400,
     "partial_images must be in [0, 3], got 4"),
    ("/v1/images/generations", {"prompt": "x", "partial_images": 1}, 400, "need stream: true"),
    ("/v1/images/generations", {"prompt": "x", "temperature": 2.5}, 400, "temperature must be in [0, 2]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "data: URI"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}, 400,
     lambda m: str(_raises(lambda: emu3_rt.load_image(b"not an image")))),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
     "temperature must be in [0, 2] (0: greedy decoding), got -1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400,
     lambda m: str(_raises(lambda: m.chat("hi", sampling=SamplingOptions(top_p=0))))),
])
def test_bad_requests_get_the_runtime_message(service, direct, path, body, status, message):
    code, _, raw = post(service + path, body)
    got = json.loads(raw)["error"]["message"]
    assert code == status
    # the library's own message, word for word; the service's own checks name the field
    assert got == message(direct) if callable(message) else message in got, got


def _raises(call) -> BaseException:
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    return e.value


def test_chat_stream_deltas_add_up_to_the_answer(service):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story."}],
            "seed": 21, "max_tokens": 40, "n": 2}
    code, _, raw = post(f"{service}/v1/chat/completions", {**body, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    whole = json.loads(post(f"{service}/v1/chat/completions", body)[2])
    events = sse_events(raw)
    assert code == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    for i, choice in enumerate(whole["choices"]):
        deltas = [ch["delta"] for c in chunks for ch in c["choices"] if ch["index"] == i]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("content", "") for d in deltas) == choice["message"]["content"]
        ends = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["index"] == i and ch["finish_reason"]]
        assert ends == [choice["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_image_stream_reports_rows_in_order_then_the_images(service):
    body = image_body("a lighthouse", 31, n=2, size="90x45")
    events = list(Client(service).stream_image(**body, preview_every=3))
    whole = json.loads(post(f"{service}/v1/images/generations", body)[2])
    for i in range(2):
        rows = [e["rows_done"] for e in events if e["type"] == "image_generation.rows" and e["image_index"] == i]
        assert rows == list(range(1, 7))   # a 6x11 grid: every row, in order
        partial = [e for e in events if e["type"] == "image_generation.partial_image" and e["image_index"] == i]
        assert [e["rows_done"] for e in partial] == [3, 6]
        assert decode_png(partial[0]["b64_json"]).size == decode_png(whole["data"][i]["b64_json"]).size
        (done,) = [e for e in events if e["type"] == "image_generation.completed" and e["image_index"] == i]
        assert np.array_equal(pixels(decode_png(done["b64_json"])), pixels(decode_png(whole["data"][i]["b64_json"])))
    assert events[-1]["type"] == "image_generation.completed"


def test_the_official_openai_client_works_unchanged(service, direct):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="emu3-tiny", prompt="a red cat", response_format="b64_json",
                                    size="64x64", n=1, extra_body={"seed": 41})
    alone = direct.generate_image("a red cat", ratio="64:64", image_area=64 * 64, seed=41)
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert np.array_equal(pixels(image), pixels(alone.images[0]))

    photo = alone.images[0]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": data_uri(photo)}}]}]
    answer = client.chat.completions.create(model="emu3-tiny", messages=messages, max_tokens=16, seed=42)
    expected = direct.chat("What is this?", images=[photo], seed=42, max_new_tokens=16).texts[0]
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(model="emu3-tiny", messages=messages, max_tokens=16, seed=42,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


@pytest.fixture(scope="module")
def openai_client(service):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=60)


FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
           "TIFF": "image/tiff"}


def test_the_client_sends_image_files_the_server_reads(service, direct, tmp_path):
    """Real files in every raster format the service takes, named without their extension: data_uri labels them
    from their bytes, and the answer is the direct API's for the same file."""
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    client = Client(service)
    for i, (fmt, mime) in enumerate(FORMATS.items()):
        path = tmp_path / f"picture{i}"
        photo.save(path, format=fmt)
        assert data_uri(path).startswith(f"data:{mime};base64,")
        got = client.chat("Describe.", images=[path], seed=i, max_tokens=6)
        assert got == direct.chat("Describe.", images=[path], seed=i, max_new_tokens=6).texts[0], fmt
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt: not an image Pillow can read"):
        data_uri(tmp_path / "notes.txt")
    # a format Pillow reads but the service does not take, whatever the label says
    photo.save(tmp_path / "x.ppm")
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "x.ppm").read_bytes()).decode()
    with pytest.raises(ServiceError, match="not an image in a format this runtime reads") as e:
        client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]})
    assert e.value.status == 400


def test_openai_multi_turn_chat_goes_through_the_chat_template(service, openai_client, direct):
    import openai

    photo = Image.fromarray(np.random.default_rng(5).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                             {"type": "image_url", "image_url": {"url": data_uri(photo)}}]},
                {"role": "assistant", "content": "A small picture."},
                {"role": "user", "content": "What colors?"}]
    history = [emu3_rt.Turn("user", "Describe it.", images=1), emu3_rt.Turn("assistant", "A small picture.")]
    expected = direct.chat("What colors?", images=[photo], system="Be brief.", history=history, seed=8,
                           max_new_tokens=12)
    answer = openai_client.chat.completions.create(model="emu3-tiny", messages=messages, max_tokens=12, seed=8)
    assert answer.choices[0].message.content == expected.texts[0]
    assert answer.usage.prompt_tokens == len(expected.prompt_ids[0])
    stream = openai_client.chat.completions.create(model="emu3-tiny", messages=messages, max_tokens=12, seed=8,
                                                   stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.texts[0]
    ours = Client(service).chat("What colors?", system="Be brief.", seed=8, max_tokens=12, history=[
        user_message("Describe it.", [photo]), {"role": "assistant", "content": "A small picture."}])
    assert ours == expected.texts[0]
    # past the context: the library's message, naming the conversation
    long = [{"role": "user", "content": "a " * 600}, {"role": "assistant", "content": "b " * 600},
            {"role": "user", "content": "and?"}]
    with pytest.raises(openai.BadRequestError, match=r"the conversation is \d+ tokens .* drop earlier turns"):
        openai_client.chat.completions.create(model="emu3-tiny", messages=long, max_tokens=4)


def test_openai_temperature_zero_is_greedy_on_both_routes_and_openai_ranges_hold(openai_client, direct):
    import openai

    greedy = SamplingOptions(greedy=True)
    answer = openai_client.chat.completions.create(
        model="emu3-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == direct.chat("hi", sampling=greedy, max_new_tokens=8).texts[0]
    result = openai_client.images.generate(prompt="a red cat", size="64x64", extra_body={"temperature": 0})
    alone = direct.generate_image("a red cat", ratio="64:64", image_area=64 * 64, sampling=greedy)
    assert np.array_equal(pixels(decode_png(result.data[0].b64_json)), pixels(alone.images[0]))
    # a size past the tiny bundle's context: said in pixels, with what fits (no CLI flag)
    with pytest.raises(openai.BadRequestError, match=r"1024x1024-pixel image .* context is 1024: at ratio 1024:1024 "
                                                     r"an image_area of at most \d+ pixels fits \(240x240 pixels\)"):
        openai_client.images.generate(prompt="a red cat", size="1024x1024")
    with pytest.raises(openai.BadRequestError, match=r"temperature must be in \[0, 2\]"):
        openai_client.chat.completions.create(model="emu3-tiny", messages=[{"role": "user", "content": "hi"}],
                                              temperature=2.5)


def test_openai_image_stream_sends_partial_images(openai_client):
    """images.generate(stream=True, partial_images=2): the SDK's events, partial_image_index counted per image,
    then the completed image, the same as without streaming."""
    stream = openai_client.images.generate(prompt="a lighthouse", size="90x45", stream=True, partial_images=2,
                                           extra_body={"seed": 31})
    events = list(stream)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    (done,) = [e for e in events if e.type == "image_generation.completed"]
    whole = openai_client.images.generate(prompt="a lighthouse", size="90x45", extra_body={"seed": 31})
    assert [e.partial_image_index for e in partial] == [0, 1]
    assert [e.rows_done for e in partial] == [2, 4]   # a 6x11 grid: evenly spaced before the last row
    assert all(e.output_format == "png" and e.size == "88x48" for e in partial + [done])
    assert decode_png(partial[0].b64_json).size == (88, 48)
    assert np.array_equal(pixels(decode_png(done.b64_json)), pixels(decode_png(whole.data[0].b64_json)))
    assert done.usage.output_tokens == 6 * 12 + 3 and events[-1] is done


def test_every_error_has_openais_shape(service, openai_client):
    import openai

    for method, path, status in [("GET", "/v1/chat/completions", 405), ("GET", "/v1/nowhere", 404),
                                 ("POST", "/v1/models", 405)]:
        req = urllib.request.Request(service + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        body = json.loads(e.value.read())
        assert e.value.code == status and set(body) == {"error"}, body
        assert body["error"]["message"].startswith(f"{method} {path}: ") and body["error"]["type"]
    with pytest.raises(openai.NotFoundError, match="model 'dall-e-3' not found: this service serves 'emu3-tiny'"):
        openai_client.models.retrieve("dall-e-3")
    assert openai_client.models.retrieve("emu3-tiny").id == "emu3-tiny"
    assert [m.id for m in openai_client.models.list()] == ["emu3-tiny"]


def test_a_client_that_disconnects_cancels_its_rows(service):
    before = stats(service)
    conn = http.client.HTTPConnection(service.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "Go on forever."}], "seed": 1, "max_tokens": 1000,
        "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    while b"content" not in response.readline():   # the first content delta: it is generating
        pass
    conn.close()
    after = wait_until(lambda: (s := stats(service))["cancelled_rows"] > before["cancelled_rows"] and s, 20,
                       "the generation to be cancelled")
    time.sleep(1.0)
    assert stats(service)["decode_steps"] == after["decode_steps"]   # nothing steps it any more
    assert after["decode_steps"] - before["decode_steps"] < 1000


def test_continuous_requests_with_mixed_options_join_and_equal_the_direct_api(service, direct):
    # different CFG scales, negative prompts, sampling options and sizes, arriving spread over the first one's run:
    # they join its decode state at different steps, and each gets what it gets alone
    bodies = [image_body("a red cat", 11, size="128x128"),
              image_body("a blue car", 12, size="96x48", cfg_scale=1.0, top_k=40, temperature=0.8),
              image_body("a tree", 13, size="64x64", negative_prompt="blurry", cfg_scale=5.0, top_p=0.9),
              image_body("the sea", 14, size="64x32", temperature=0, cfg_scale=1.0, stream=True,
                         partial_images=1)]
    before = stats(f"{service}/cb")
    at = lambda t, call: lambda: (time.sleep(t), call())[1]  # noqa: E731
    answers = together([at(0.3 * i, lambda b=b: post(f"{service}/cb/v1/images/generations", b))
                        for i, b in enumerate(bodies)])
    after = stats(f"{service}/cb")
    assert [a[0] for a in answers] == [200] * 4, [a[2][:200] for a in answers]
    for body, (_, _, raw) in zip(bodies, answers):
        w, h = map(int, body["size"].split("x"))
        sampling = SamplingOptions.from_bundle(direct.bundle, temperature=body.get("temperature"),
                                               top_k=body.get("top_k"), top_p=body.get("top_p"))
        alone = direct.generate_image(body["prompt"], ratio=f"{w}:{h}", image_area=w * h, seed=body["seed"],
                                      cfg_scale=body.get("cfg_scale"), negative_prompt=body.get("negative_prompt"),
                                      sampling=sampling)
        if body.get("stream"):
            events = [e for e in sse_events(raw) if isinstance(e, dict)]
            assert events[-1]["type"] == "image_generation.completed"
            assert sum(e["type"] == "image_generation.partial_image" for e in events) == 1
            b64 = events[-1]["b64_json"]
        else:
            b64 = json.loads(raw)["data"][0]["b64_json"]
        assert np.array_equal(pixels(decode_png(b64)), pixels(alone.images[0])), body
    assert after["scheduling"] == "continuous"
    steps, rows = after["decode_steps"] - before["decode_steps"], after["decode_rows"] - before["decode_rows"]
    assert rows > steps > 0   # runs held several requests' rows
    assert after["running_rows"] == after["waiting_rows"] == after["kv_slots_in_use"] == 0


def test_continuous_queue_full_gives_503_and_a_leaving_client_frees_only_its_rows(service, direct):
    url = f"{service}/cb/v1/images/generations"
    long = image_body("busy", 1, size="240x240")   # a 30x30 grid under CFG: 933 steps, 2 rows each
    before = stats(f"{service}/cb")
    # 6 rows run (3 requests), 2 wait, the other 2 are refused at once
    answers = together([lambda: post(url, long)] * 7)
    assert sorted(a[0] for a in answers) == [200] * 5 + [503] * 2, [a[:2] for a in answers]
    refused = [a for a in answers if a[0] == 503]
    assert all(a[1].get("retry-after") == "2" for a in refused)
    assert all(json.loads(a[2])["error"]["code"] == "queue_full" for a in refused)
    mid = stats(f"{service}/cb")
    assert mid["rejected_requests"] - before["rejected_requests"] == 2

    # a streaming client leaves after its first grid row; a request beside it still gets its image
    conn = http.client.HTTPConnection(service.removeprefix("http://"), timeout=60)
    conn.request("POST", "/cb/v1/images/generations", json.dumps({**long, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    other = []
    beside = threading.Thread(target=lambda: other.append(post(url, image_body("a dog", 5, size="64x64"))))
    beside.start()
    while b"image_generation.rows" not in response.readline():
        pass
    conn.close()
    beside.join(120)
    wait_until(lambda: stats(f"{service}/cb")["cancelled_rows"] > mid["cancelled_rows"], 60,
               "the left request to be cancelled")
    assert other and other[0][0] == 200
    alone = direct.generate_image("a dog", ratio="1:1", image_area=64 * 64, seed=5)
    assert np.array_equal(pixels(decode_png(json.loads(other[0][2])["data"][0]["b64_json"])),
                          pixels(alone.images[0]))
    settled = wait_until(lambda: (s := stats(f"{service}/cb"))["running_rows"] == 0 and s, 60, "rows to leave")
    assert settled["kv_slots_in_use"] == settled["kv_slots_allocated"] == settled["waiting_rows"] == 0


def test_overload_gives_503_with_retry_after(service):
    # /tight holds one request and queues one more: with two long images in (a 30x30 grid, all 933 steps), the
    # requests that come next are refused at once, also through the client told not to retry
    url = f"{service}/tight/v1/images/generations"
    long = image_body("busy", 1, size="240x240")
    at = lambda t, call: lambda: (time.sleep(t), call())[1]  # noqa: E731 - Serve's queue count races at one instant
    answers = together([at(0, lambda: post(url, long)), at(0.3, lambda: post(url, long))]
                       + [at(0.8, lambda: post(url, image_body("late", 2)))] * 2
                       + [at(0.8, lambda: Client(service + "/tight", retries=0).generate_image("late"))])
    *posts, refused = answers
    assert [a[0] for a in posts] == [200, 200, 503, 503], answers
    assert all(a[1].get("retry-after") == "2" for a in posts[2:])
    assert isinstance(refused, ServiceError) and refused.status == 503 and refused.retry_after == 2, refused


def test_a_killed_replica_is_restarted_and_a_retry_succeeds(service):
    old = stats(f"{service}/tight")["pid"]
    url = f"{service}/tight/v1/images/generations"
    first = []   # four 30x30 images, 933 steps each: seconds of work, killed one second in
    in_flight = threading.Thread(target=lambda: first.append(post(url, image_body("busy", 3, size="240x240", n=4))))
    in_flight.start()
    time.sleep(1.0)
    os.kill(old, signal.SIGKILL)
    in_flight.join(60)
    assert first and first[0][0] >= 500, first   # the request it was serving fails
    ok = wait_until(lambda: post(url, image_body("again", 4))[0] == 200, 90,
                    "a retried request to succeed on a restarted replica")
    assert ok and stats(f"{service}/tight")["pid"] != old


def test_serve_command_line_joins_a_cluster_and_leaves_its_serve_running(service):
    """--address: the service deploys into that cluster as its own application, and on SIGTERM deletes only that
    application: the cluster's Serve and its other applications keep serving."""
    import ray

    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--address", ray.get_runtime_context().gcs_address,
                             "--app-name", "joined", "--route-prefix", "/joined", "--replica-cpus", "0"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: _healthy_at(f"{service}/joined"), 120, "the joined service to answer")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "emu3-rt serve: stopped" in proc.stderr.read()
    assert get(f"{service}/healthz")["status"] == "ok" and stats(f"{service}/tight")["pid"]
    with pytest.raises(urllib.error.HTTPError) as e:   # now the root application's: no such route
        urllib.request.urlopen(f"{service}/joined/healthz", timeout=30)
    assert e.value.code == 404


def test_shutdown_leaves_no_processes(service):
    import ray
    from ray import serve

    # Ray's own processes only (its binaries and Python scripts under .../ray/, its workers named ray::...): in the
    # full suite this process also has children of earlier tests (emu3_rt's chat-template worker lives as long as
    # the process that rendered a sandboxed template), which Ray's shutdown has no reason to stop
    started = {p for p in descendants(os.getpid()) if "/ray/" in command_line(p) or command_line(p).startswith("ray::")}
    assert started, "Ray should run its processes below this one"
    serve.shutdown()
    ray.shutdown()
    # a deadline for a hang, not a speed bound: at the end of this file the cluster holds the model and health
    # applications plus what the joined-cluster test deployed, and on a slow 2-core CI machine their exit took over
    # 30 s once (it takes a few seconds alone)
    left = lambda: {p: command_line(p) for p in started if alive(p)}  # noqa: E731
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not left(), 120, "Ray's processes to exit")
    assert not left(), f"still running 120 s after ray.shutdown(): {left()}"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{service}/healthz", timeout=5)


def test_serve_command_line_starts_serves_and_stops(tmp_path):
    """A Ray of its own (RAY_ADDRESS is not followed), every Ray process listening on loopback only with --host
    127.0.0.1, one console line per request, SIGTERM stops it all."""
    pytest.importorskip("ray.serve")
    openai = pytest.importorskip("openai")
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}   # nothing there: joining it would fail
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--port", str(port), "--replica-cpus", "0"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_until(lambda: _healthy(port), 120, "emu3-rt serve to answer /healthz")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.chat.completions.create(model="emu3-tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0).choices[0].message.content is not None
        below = descendants(proc.pid)
        listening = _listening(below | {proc.pid})
        # the one socket Ray does not let us place: each Serve replica's inter-deployment gRPC server, which Ray
        # Serve binds to [::]:0 in its own code (the README says so)
        wide = [(addr, _cmdline(pid)) for addr, pid in listening if not _loopback(addr)]
        assert len(listening) > 5 and all(cmd.startswith("ray::ServeReplica") for _, cmd in wide), wide
        assert f"127.0.0.1:{port}" in [addr for addr, _ in listening]
        wait_until(lambda: "POST /v1/chat/completions 200" in (tmp_path / "serve.log").read_text(), 30,
                   "the request's log line on the console")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        wait_until(lambda: not any(alive(p) for p in below), 30, "the service's processes to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
    text = log.read()
    assert "emu3-rt serve: stopped" in text and text.count("POST /v1/chat/completions") == 1, text[-2000:]


def test_serve_command_line_stops_at_once_while_connecting(tmp_path):
    """SIGTERM while ray.init waits on a cluster that does not answer (it retries for most of a minute inside
    native code): the command stops without waiting for it."""
    pytest.importorskip("ray.serve")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--address", "127.0.0.1:1"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "Connecting to existing Ray cluster" in log.read_text(), 60, "ray.init to connect")
        time.sleep(1.0)   # inside the connection attempt
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "emu3-rt serve: stopped while starting (SIGTERM)" in log.read_text()


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket the processes hold (ss -ltnp)."""
    if not shutil.which("ss"):
        pytest.skip("needs ss (iproute2)")
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((fields[3], pid))
    return found


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    return "?"


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
    return host != "*" and ipaddress.ip_address(host).is_loopback


def _healthy_at(url: str) -> bool:
    with contextlib.suppress(OSError):
        return get(f"{url}/healthz")["status"] == "ok"
    return False


def _healthy(port: int) -> bool:
    with contextlib.suppress(OSError):
        return get(f"http://127.0.0.1:{port}/healthz")["status"] == "ok"
    return False


def test_serve_command_line_refuses_a_bad_bundle_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "runtime.serve", "--bundle", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("emu3-rt serve: error: ")
    assert len(out.stderr.strip().splitlines()) == 1
