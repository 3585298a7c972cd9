"""The Python API's edges on the embedded tiny bundle: typed one-line errors for bad arguments, bounded image
reads, no deadlock from a callback, no numpy warnings at numeric extremes, no onnxruntime telemetry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

import emu3_rt
from emu3_rt import image as imaging
from emu3_rt.bundle import BundleError
from emu3_rt.engines.ort import MAX_THREADS, OrtOptions
from emu3_rt.generation import check_image_tokens
from emu3_rt.image import ImageConfig, ImageError, load_image
from emu3_rt.options import SamplingOptions
from emu3_rt.prompt import PromptError

from .conftest import REPO, TINY_BUNDLE, finishes

GREEDY = SamplingOptions(greedy=True)
CHAT = dict(sampling=GREEDY, max_new_tokens=2)
IMAGE = dict(sampling=GREEDY, cfg_scale=1.0)  # the tiny bundle's default area gives an 8x8 grid (75 steps)


@pytest.fixture(scope="module")
def model():
    return emu3_rt.load(TINY_BUNDLE)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (40, 56), (200, 10, 10)).save(path)
    return path


def _one_line(err: pytest.ExceptionInfo, needle: str) -> None:
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


# ---- bad arguments: TypeError / ValueError naming the argument, before anything runs ----

def _arr():
    return np.zeros((16, 16, 3), np.uint8)


BAD_CHAT = [
    ({"prompts": None}, TypeError, "prompts must be str or a sequence of str, got NoneType"),
    ({"prompts": b"hi"}, TypeError, "prompts must be str or a sequence of str, got bytes"),
    ({"prompts": 5}, TypeError, "prompts must be str or a sequence of str, got int"),
    ({"prompts": ["hi", b"x"]}, TypeError, "got a list holding bytes"),
    ({"prompts": []}, PromptError, "the prompt is empty"),
    ({"images": _arr()}, TypeError, "images must be a PIL image, a file path or a sequence of them, got numpy"),
    ({"images": [_arr()]}, TypeError, "images must hold PIL images or file paths"),
    ({"images": [b"\x89PNG"]}, TypeError, "images must hold PIL images or file paths"),
    ({"images": 7}, TypeError, "images must be a PIL image"),
    ({"prompts": ["a", "b"], "images": Image.new("RGB", (8, 8))}, TypeError, "one entry per prompt"),
    ({"prompts": ["a", "b"], "images": [[]]}, PromptError, "2 prompts but 1 image lists"),
    ({"prompts": ["a", "b"], "images": [None, [_arr()]]}, TypeError, "images must hold PIL images"),
    ({"system": b"sys"}, TypeError, "system must be str or None, got bytes"),
    ({"raw": "yes"}, TypeError, "raw must be True or False, got str"),
    ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int, got float"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int, got bool"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1, got 0"),
    ({"seed": -1}, ValueError, "seed must be in [0, 4294967295], got -1"),
    ({"seed": 2**32}, ValueError, "seed must be in [0, 4294967295]"),
    ({"seed": 1.5}, TypeError, "seed must be an int, a sequence of ints or None, got float"),
    ({"seed": "7"}, TypeError, "seed must be an int, a sequence of ints or None, got str"),
    ({"sampling": {"greedy": True}}, TypeError, "sampling must be a SamplingOptions or None, got dict"),
    ({"sampling": SamplingOptions(temperature=0.0)}, ValueError, "temperature must be > 0"),
    ({"on_token": "print"}, TypeError, "on_token must be callable or None, got str"),
    ({"on_text": 3}, TypeError, "on_text must be callable or None, got int"),
    ({"allow_special_tokens": "no"}, TypeError, "allow_special_tokens must be True or False"),
]

BAD_IMAGE = [
    ({"prompts": None}, TypeError, "prompts must be str or a sequence of str, got NoneType"),
    ({"prompts": b"a cat"}, TypeError, "prompts must be str or a sequence of str, got bytes"),
    ({"prompts": 3}, TypeError, "prompts must be str or a sequence of str, got int"),
    ({"negative_prompt": b"blurry"}, TypeError, "negative_prompt must be str or None, got bytes"),
    ({"cfg_scale": "3"}, TypeError, "cfg_scale must be a number, got str"),
    ({"cfg_scale": True}, TypeError, "cfg_scale must be a number, got bool"),
    ({"cfg_scale": float("nan")}, ValueError, "cfg_scale must be a finite number >= 0"),
    ({"cfg_scale": 10**400}, ValueError, "cfg_scale is out of float range"),
    ({"ratio": b"1:1"}, TypeError, "ratio must be str or a sequence of str, got bytes"),
    ({"ratio": 1.0}, TypeError, "ratio must be str or a sequence of str, got float"),
    ({"ratio": []}, ValueError, "ratio must be a \"W:H\" string or a non-empty sequence"),
    ({"image_area": 4096.0}, TypeError, "image_area must be an int, got float"),
    ({"image_area": 0}, ValueError, "image_area must be >= 1, got 0"),
    ({"seed": -5}, ValueError, "seed must be in [0, 4294967295], got -5"),
    ({"seed": np.float64(3)}, TypeError, "seed must be an int, a sequence of ints or None, got numpy.float64"),
    ({"on_token": 1}, TypeError, "on_token must be callable or None, got int"),
    ({"on_preview": "x"}, TypeError, "on_preview must be callable or None, got str"),
    ({"preview_every": -1}, ValueError, "preview_every must be >= 0, got -1"),
    ({"preview_every": 1.5}, TypeError, "preview_every must be an int, got float"),
    ({"sampling": SamplingOptions(top_k=0)}, ValueError, "top_k must be >= 1"),
]


@pytest.mark.parametrize("kwargs,exc,needle", BAD_CHAT, ids=[str(k) for k, _, _ in BAD_CHAT])
def test_chat_rejects_bad_arguments(model, kwargs, exc, needle):
    kwargs = {"prompts": "hi", **CHAT, **kwargs}
    with pytest.raises(exc) as e:
        model.chat(kwargs.pop("prompts"), **kwargs)
    _one_line(e, needle)


@pytest.mark.parametrize("kwargs,exc,needle", BAD_IMAGE, ids=[str(k) for k, _, _ in BAD_IMAGE])
def test_generate_image_rejects_bad_arguments(model, monkeypatch, kwargs, exc, needle):
    kwargs = {"prompts": "a cat", **IMAGE, **kwargs}
    decoder, calls = model.engines["decoder"], []
    monkeypatch.setattr(decoder, "run", lambda feeds, run=decoder.run: calls.append(1) or run(feeds))
    monkeypatch.setattr(decoder, "execute", lambda b, run=decoder.execute: calls.append(1) or run(b))
    with pytest.raises(exc) as e:
        model.generate_image(kwargs.pop("prompts"), **kwargs)
    _one_line(e, needle)
    assert not calls, "a bad argument must fail before the first decoder step"


@pytest.mark.parametrize("kwargs,exc,needle", [
    ({"greedy": 1}, TypeError, "greedy must be True or False, got int"),
    ({"temperature": "0.7"}, TypeError, "temperature must be a number, got str"),
    ({"temperature": None}, TypeError, "temperature must be a number, got NoneType"),
    ({"top_k": 2.5}, TypeError, "top_k must be an int, got float"),
    ({"top_k": True}, TypeError, "top_k must be an int, got bool"),
    ({"top_p": b"1"}, TypeError, "top_p must be a number, got bytes"),
])
def test_sampling_options_reject_bad_types(kwargs, exc, needle):
    with pytest.raises(exc) as e:
        SamplingOptions(**kwargs)
    _one_line(e, needle)


def test_sampling_options_store_python_numbers():
    """numpy scalars are fine, and stored as Python numbers (the CLI writes the options into PNG JSON metadata)."""
    s = SamplingOptions(temperature=np.float32(0.5), top_k=np.int64(7), top_p=np.float64(0.9), greedy=np.bool_(0))
    assert [type(v) for v in (s.temperature, s.top_k, s.top_p, s.greedy)] == [float, int, float, bool]
    json.dumps(s.__dict__)


@pytest.mark.parametrize("kwargs,exc,needle", [
    ({"threads": -1}, ValueError, f"threads must be in [0, {MAX_THREADS}]"),
    ({"threads": 100000}, ValueError, f"threads must be in [0, {MAX_THREADS}]"),
    ({"threads": True}, TypeError, "threads must be an int, got bool"),
    ({"threads": 2.0}, TypeError, "threads must be an int, got float"),
    ({"threads": "4"}, TypeError, "threads must be an int, got str"),
    ({"device_id": -1}, ValueError, "device_id must be >= 0"),
    ({"engine": 1}, TypeError, "engine must be str, got int"),
    ({"engine": "tensorflow"}, ValueError, "engine must be 'ort' or 'trt'"),
    ({"device": None}, TypeError, "device must be str, got NoneType"),
    ({"verify": "yes"}, TypeError, "verify must be True or False, got str"),
    ({"prefill_chunk": 0}, ValueError, "prefill_chunk must be >= 1, got 0"),
    ({"prefill_chunk": 1.5}, TypeError, "prefill_chunk must be an int, got float"),
    ({"bundle_dir": 5}, TypeError, "bundle_dir must be a path"),
    ({"bundle_dir": b"models/emu3-tiny"}, TypeError, "bundle_dir must be a path"),
])
def test_load_rejects_bad_arguments(kwargs, exc, needle):
    kwargs = {"bundle_dir": TINY_BUNDLE, **kwargs}
    with pytest.raises(exc) as e:
        emu3_rt.load(kwargs.pop("bundle_dir"), **kwargs)
    _one_line(e, needle)


@pytest.mark.parametrize("threads,ok", [(0, True), (1, True), (MAX_THREADS, True), (MAX_THREADS + 1, False),
                                        (-3, False), (2**40, False)])
def test_ort_options_bound_threads(threads, ok):
    if ok:
        assert OrtOptions(threads=threads).threads == threads
    else:
        with pytest.raises(ValueError, match="threads must be in"):
            OrtOptions(threads=threads)


def test_chat_takes_image_paths(model, png):
    """A str or os.PathLike goes through load_image; results equal passing the PIL image."""
    want = model.chat("what is this?", images=[load_image(png)], **CHAT)
    for images in ([str(png)], [png], png, str(png)):
        got = model.chat("what is this?", images=images, **CHAT)
        assert got.prompt_ids == want.prompt_ids and got.tokens == want.tokens
    batch = model.chat(["what is this?", "and this?"], images=[png, None], **CHAT)
    assert batch.prompt_ids[0] == want.prompt_ids[0]
    plain = model.chat(["what is this?", "and this?"], **CHAT).prompt_ids
    assert model.chat(["what is this?", "and this?"], images=[], **CHAT).prompt_ids == plain


def test_chat_image_path_errors_name_the_file(model, tmp_path):
    with pytest.raises(ImageError) as e:
        model.chat("what?", images=[tmp_path / "missing.png"], **CHAT)
    _one_line(e, "missing.png: no such file")


# ---- load_image reads only bounded regular files ----

def test_load_image_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    err = finishes(lambda: load_image(fifo))
    assert isinstance(err, ImageError) and "pipe.png: not a regular file" in str(err), err


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_load_image_refuses_devices(tmp_path, device):
    if not os.path.exists(device):
        pytest.skip(f"{device} is missing")
    link = tmp_path / "looks-like.png"
    link.symlink_to(device)
    for source in (device, link):
        err = finishes(lambda s=source: load_image(s))
        assert isinstance(err, ImageError) and "not a regular file" in str(err), err


def test_load_image_size_bound(tmp_path, monkeypatch, png):
    data = png.read_bytes()
    monkeypatch.setattr(imaging, "MAX_IMAGE_BYTES", len(data) - 1)
    with pytest.raises(ImageError) as e:
        load_image(png)
    _one_line(e, "red.png: ")
    assert "image file limit" in str(e.value)
    with pytest.raises(ImageError, match="image file limit"):
        load_image(data)
    monkeypatch.setattr(imaging, "MAX_IMAGE_BYTES", len(data))
    assert load_image(png).size == (40, 56)


def test_load_image_rejects_other_types():
    with pytest.raises(TypeError, match="image source must be a path or bytes, got ndarray"):
        load_image(_arr())


# ---- callbacks calling the model: no lock is held for a whole call, so nothing deadlocks ----

@pytest.mark.parametrize("outer,hook,inner", [
    ("chat", "on_token", "chat"),
    ("chat", "on_text", "generate_image"),
    ("generate_image", "on_token", "generate_image"),
    ("generate_image", "on_preview", "chat"),
])
def test_call_from_a_callback_runs_and_equals_a_direct_call(model, outer, hook, inner):
    def call(name, **extra):
        if name == "chat":  # 8 tokens: the tiny model's first text delta comes at the 5th
            return model.chat("hi", sampling=GREEDY, max_new_tokens=8, **extra)
        return model.generate_image("a cat", **IMAGE, **extra)

    nested = []

    def reenter(*_):
        if not nested:
            nested.append(call(inner))

    extra = {hook: reenter, **({"preview_every": 1} if hook == "on_preview" else {})}
    box = {}
    err = finishes(lambda: box.update(result=call(outer, **extra)), 60)   # fails instead of hanging
    assert err is None, err
    assert box["result"].tokens == call(outer).tokens and nested[0].tokens == call(inner).tokens


def test_threads_run_concurrently_with_sequential_results(model):
    """A second call started from another thread does not wait for the first: the two generations interleave
    (each owns its decode state) and give what they give alone."""
    order, box = [], {}

    def second():
        box["second"] = model.chat("hello", **CHAT, on_token=lambda *_: order.append("second"))

    def on_token(step, ids):
        if step == 0:
            box["thread"] = threading.Thread(target=second)
            box["thread"].start()
            box["thread"].join(60)   # would deadlock if a lock were held for the whole first call
        order.append("first")

    first = model.chat("hi", sampling=GREEDY, max_new_tokens=3, on_token=on_token)
    assert not box["thread"].is_alive() and box["second"].tokens
    assert order[0] == "second" and "first" in order
    assert first.tokens == model.chat("hi", sampling=GREEDY, max_new_tokens=3).tokens
    assert box["second"].tokens == model.chat("hello", **CHAT).tokens


# ---- numeric extremes: a sensible result or one clean error, never a numpy warning ----

@pytest.fixture
def no_warnings(capfd):
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    out, err = capfd.readouterr()
    assert err == "", err


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_tiny_temperature_samples_the_argmax(model, no_warnings, temperature):
    """As t -> 0 sampling becomes greedy decoding (ties aside), with and without CFG and the grid constraint."""
    cold = SamplingOptions(temperature=temperature, top_k=5, top_p=0.5)
    image = model.generate_image("a cat", sampling=GREEDY, cfg_scale=3.0).tokens
    text = model.chat("hi", sampling=GREEDY, max_new_tokens=4).tokens
    for seed in (0, 1):
        assert model.generate_image("a cat", sampling=cold, seed=seed, cfg_scale=3.0).tokens == image
        assert model.chat("hi", sampling=cold, seed=seed, max_new_tokens=4).tokens == text


@pytest.mark.parametrize("kwargs", [
    {"sampling": SamplingOptions(temperature=1e300)},
    {"sampling": SamplingOptions(temperature=1e-45, top_p=1e-45)},
    {"sampling": SamplingOptions(top_k=2**70)},
    {"cfg_scale": 1e300},
    {"cfg_scale": 1e-300},
])
def test_extreme_numbers_still_draw_an_image(model, no_warnings, kwargs):
    r = model.generate_image("a cat", seed=3, **{"cfg_scale": 3.0, **kwargs})
    (h, w), = r.grids
    check_image_tokens(np.array(r.tokens[0]), h, w, model.bundle)


def test_huge_temperature_is_uniform_over_allowed_ids(model, no_warnings):
    """t = 1e300 flattens every score to 0: different seeds draw different images (it is not stuck on one id)."""
    hot = SamplingOptions(temperature=1e300)
    draws = {tuple(model.generate_image("a cat", sampling=hot, seed=s, cfg_scale=1.0).tokens[0]) for s in range(3)}
    assert len(draws) == 3


@pytest.mark.parametrize("field,value,needle", [
    ("image_std", [0.0, 0.5, 0.5], "image_std must be 3 non-zero numbers"),
    ("image_std", [1e-30, 0.5, 0.5], "image_std must be 3 non-zero numbers"),
    ("image_std", [0.5, 0.5], "image_std must be 3 non-zero numbers"),
    ("image_mean", [0.5, 0.5, 1e300], "image_mean must be 3 numbers"),
    ("rescale_factor", 0.0, "rescale_factor must be in"),
])
def test_bad_image_processor_is_a_bundle_error(bundle_copy, no_warnings, field, value, needle):
    m = json.loads((bundle_copy / "bundle.json").read_text())
    m["image_processor"][field] = value
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:  # bundle.py or Emu3 (from ImageConfig): either way before any session
        emu3_rt.load(bundle_copy)
    _one_line(e, field)
    with pytest.raises(ValueError, match=re.escape(needle)):
        ImageConfig.from_manifest(m["image_processor"])


# ---- onnxruntime telemetry and the exported exceptions ----

def test_onnxruntime_writes_no_telemetry_under_home(tmp_path):
    """onnxruntime (1.2x+, Linux) writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ at import unless
    ORT_DISABLE_TELEMETRY is set; emu3_rt sets it before importing onnxruntime. The control run (the user's
    explicit ORT_DISABLE_TELEMETRY=0 is respected) shows this onnxruntime does write there."""
    code = ("import emu3_rt; from emu3_rt import SamplingOptions; "
            "emu3_rt.load().chat('hi', sampling=SamplingOptions(greedy=True), max_new_tokens=1)")

    def written(home, **env):
        home.mkdir()
        base = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
        subprocess.run([sys.executable, "-c", code], env={**base, "HOME": str(home), **env}, cwd=REPO,
                       check=True, timeout=120, capture_output=True)
        # ~/.cache/emu3-rt holds the runtime's own bundle-hash stamps
        return sorted(p.relative_to(home) for p in home.rglob("*")
                      if p.is_file() and not p.is_relative_to(home / ".cache" / "emu3-rt"))

    assert written(tmp_path / "default") == []
    if not written(tmp_path / "control", ORT_DISABLE_TELEMETRY="0"):
        pytest.skip("this onnxruntime writes no telemetry files even when allowed: nothing to compare")


def test_documented_exceptions_are_exported():
    limits = (REPO / "docs" / "limits.md").read_text()  # the "what happens when" page names the exceptions
    documented = set(re.findall(r"`(\w+Error)`", limits)) - {"ValueError", "TypeError", "RuntimeError"}
    assert {"BundleError", "EngineError", "PromptError", "GenerationError", "ImageError"} <= documented
    for name in documented:
        assert name in emu3_rt.__all__ and issubclass(getattr(emu3_rt, name), Exception), name
    from emu3_rt import ImageError as exported

    assert exported is ImageError
