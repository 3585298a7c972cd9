"""The optimized-graph cache of OrtEngine (emu3_rt/engines/ort.py): written under EMU3_RT_CACHE_DIR, reused by the
next session, keyed by graph sha256 / onnxruntime version / CPU, replaced when corrupt, off on request, and the
outputs are the same bits with and without it. All on the checked-in tiny bundle (CPU onnxruntime)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import onnxruntime  # noqa: E402

import emu3_rt  # noqa: E402
from emu3_rt import integrity  # noqa: E402
from emu3_rt.bundle import load_bundle  # noqa: E402
from emu3_rt.engines import EngineError, OrtEngine, OrtOptions  # noqa: E402
from emu3_rt.engines import ort as ort_engine  # noqa: E402
from emu3_rt.generate import decode_step, prefill  # noqa: E402
from emu3_rt.kv_cache import new_state  # noqa: E402
from emu3_rt.prompt import make_batch  # noqa: E402

from .conftest import TINY_BUNDLE, finishes  # noqa: E402

OFF = OrtOptions(cache_optimized=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh per-user cache directory for this test (stamps and optimized graphs)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(path))
    return path


@pytest.fixture
def bundle(cache):
    return load_bundle(TINY_BUNDLE)  # after `cache`: its integrity stamps land in the test's directory


@pytest.fixture
def opened(monkeypatch):
    """The model paths onnxruntime.InferenceSession is called with, in order."""
    paths: list[str] = []
    real = onnxruntime.InferenceSession

    def spy(path, *args, **kwargs):
        paths.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return paths


def open_session(spec, options: OrtOptions = OrtOptions()):
    return OrtEngine(spec, options).session


def entries(cache) -> dict[str, list[str]]:
    root = cache / "ort"
    return {e.name: sorted(f.name for f in e.iterdir()) for e in sorted(root.iterdir())} if root.is_dir() else {}


@pytest.fixture
def embedded_decoder(bundle, tmp_path):
    """The tiny step graph with its weights inside the graph file (as bundles exported before shared external
    weights store them): the layout the cache exists for."""
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "decoder_step.onnx"
    onnx.save(onnx.load(str(bundle.decoder.path)), str(path))
    assert not integrity.external_data(path)
    return dataclasses.replace(bundle.decoder, path=path)


def step(engine, bundle) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits (2, V) and one decode step's logits (2, V) on fixed ids."""
    kv = new_state(engine, bundle, 2)
    batch = make_batch([[5, 9, 2, 7, 11, 3], [4, 4, 8]], None, bundle.tokens.pad)
    first = prefill(engine, kv, batch, 4)
    return first, decode_step(engine, kv, np.array([6, 10]), 0)


def pixels(engine) -> np.ndarray:
    codes = np.arange(2 * 4 * 4, dtype=np.int64).reshape(2, 4, 4) % 64
    return engine.run({"codes": codes})["pixel_values"]


def test_written_under_the_cache_dir_and_reused(cache, bundle, opened):
    open_session(bundle.vq_decoder)
    (name,) = entries(cache)
    assert name.startswith("vq_decoder-")
    assert entries(cache)[name] == ["graph.onnx", "graph.onnx.data", "stamp.json"]
    entry = cache / "ort" / name
    mtimes = {f.name: f.stat().st_mtime_ns for f in entry.iterdir()}
    assert opened == [str(bundle.vq_decoder.path)]

    open_session(bundle.vq_decoder)                                 # a new engine, as in a new process
    assert opened[1:] == [str(entry / "graph.onnx")]                # the cached graph, not the bundle's
    assert {f.name: f.stat().st_mtime_ns for f in entry.iterdir()} == mtimes  # read, not rewritten


def test_outputs_equal_bit_for_bit(cache, bundle, embedded_decoder, opened):
    reference = step(OrtEngine(embedded_decoder, OFF), bundle)
    writing = step(OrtEngine(embedded_decoder), bundle)             # the session that writes the entry
    cached = step(OrtEngine(embedded_decoder), bundle)              # the session on the cached graph
    assert opened[-1].endswith("graph.onnx")
    for got in (writing, cached):
        for a, b in zip(reference, got):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    images = [pixels(OrtEngine(bundle.vq_decoder, o)) for o in (OFF, OrtOptions(), OrtOptions())]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    assert opened[-1].endswith("graph.onnx")
    assert len(entries(cache)) == 2


@pytest.mark.parametrize("change", ["graph sha256", "onnxruntime version", "onnxruntime build", "cpu"])
def test_key_covers_what_the_saved_graph_depends_on(cache, bundle, opened, monkeypatch, change):
    open_session(bundle.sampler)
    before = set(entries(cache))
    if change == "graph sha256":
        real = integrity.graph_digest
        monkeypatch.setattr(integrity, "graph_digest", lambda p: ("0" * 64, real(p)[1]))
    elif change == "onnxruntime version":
        monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    elif change == "onnxruntime build":
        monkeypatch.setattr(onnxruntime, "get_build_info", lambda: "another build")
    else:
        monkeypatch.setattr(ort_engine, "_cpu_id", lambda: "riscv64-0000")
    open_session(bundle.sampler)
    assert opened == [str(bundle.sampler.path)] * 2                 # built from the bundle's graph both times
    assert len(set(entries(cache)) - before) == 1 and before <= set(entries(cache))


def _truncate_data(entry):
    data = entry / "graph.onnx.data"
    data.write_bytes(data.read_bytes()[:100])


def _flip_data_bytes(entry):
    # same size, still loads, wrong weights: only the stamp (mtime, ctime) tells
    data = entry / "graph.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[: len(raw) // 2] = bytes(len(raw) // 2)
    data.write_bytes(bytes(raw))


def _garbage_graph_restamped(entry):
    # the stamp matches, so only onnxruntime can object: the entry must still be dropped and rebuilt
    (entry / "graph.onnx").write_bytes(b"\x08\x07garbage" * 50)
    (entry / "stamp.json").write_text(json.dumps(ort_engine._file_stamps(entry)))


def _stamp_missing(entry):
    (entry / "stamp.json").unlink()


def _wrong_io_restamped(entry):
    # a loadable graph with other I/O (the sampler's) under the decoder's key
    other = next(e for e in entry.parent.iterdir() if e.name.startswith("sampler-"))
    for f in ("graph.onnx", "graph.onnx.data"):
        (entry / f).write_bytes((other / f).read_bytes())
    (entry / "stamp.json").write_text(json.dumps(ort_engine._file_stamps(entry)))


@pytest.mark.parametrize("damage", [_truncate_data, _flip_data_bytes, _garbage_graph_restamped, _stamp_missing,
                                    _wrong_io_restamped])
def test_a_damaged_entry_is_replaced(cache, bundle, opened, damage):
    reference = pixels(OrtEngine(bundle.vq_decoder, OFF))
    open_session(bundle.sampler)
    open_session(bundle.vq_decoder)
    entry = next(e for e in (cache / "ort").iterdir() if e.name.startswith("vq_decoder-"))
    damage(entry)

    assert np.array_equal(pixels(OrtEngine(bundle.vq_decoder)), reference)  # from the bundle's graph
    assert opened[-1] == str(bundle.vq_decoder.path)
    assert ort_engine._entry_intact(entry)                          # rebuilt
    del opened[:]
    assert np.array_equal(pixels(OrtEngine(bundle.vq_decoder)), reference)
    assert opened == [str(entry / "graph.onnx")]


def test_off_writes_nothing(cache, bundle, opened):
    for spec in (bundle.decoder, bundle.sampler, bundle.vq_encoder, bundle.vq_decoder):
        open_session(spec, OFF)
    assert not (cache / "ort").exists()
    assert opened == [str(s.path) for s in (bundle.decoder, bundle.sampler, bundle.vq_encoder, bundle.vq_decoder)]


def test_graph_with_external_data_is_not_copied(cache, bundle, tmp_path, opened):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle.sampler.path))
    path = tmp_path / "sampler_ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="sampler_ext.data", size_threshold=0)
    assert integrity.external_data(path) == {"sampler_ext.data"}
    open_session(dataclasses.replace(bundle.sampler, path=path))
    assert opened == [str(path)] and not (cache / "ort").exists()


def test_unwritable_cache_still_loads(tmp_path, monkeypatch, opened):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(blocker))           # mkdir under a regular file fails
    bundle = load_bundle(TINY_BUNDLE)
    reference = pixels(OrtEngine(bundle.vq_decoder, OFF))
    assert np.array_equal(pixels(OrtEngine(bundle.vq_decoder)), reference)
    assert opened == [str(bundle.vq_decoder.path)] * 2


def test_chat_caches_no_vq_graph(cache):
    model = emu3_rt.load()
    model.chat("hello", max_new_tokens=2, seed=0)
    names = {n.rsplit("-", 1)[0] for n in entries(cache)}
    assert "sampler" in names and names <= {"decoder_step", "sampler"}   # the step graph: when weights are inline
    assert model.engines["vq_decoder"]._session is None and model.engines["vq_encoder"]._session is None


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_cache_optimized_must_be_a_bool(value):
    with pytest.raises(TypeError, match="cache_optimized"):
        OrtOptions(cache_optimized=value)


# ---- temporary entries: removed on every exit path of the CLI (issue 19, item 9) ----

# The CLI in a child whose cache-writing sessions stop inside onnxruntime right after the graph is written (as a
# big graph's weights are still being written when a run fails early): the entry's temp directory is on disk and
# its thread never gets back to clean it up. `ready` appears once that point is reached, and load() returns only
# then, so whatever the run does next (fail, be signalled) happens while the writer is inside onnxruntime.
_STALLED_WRITER = """
import os, sys, threading, time
import onnxruntime
ready = sys.argv[1]
real = onnxruntime.InferenceSession
def stalled(path, so=None, *args, **kwargs):
    session = real(path, so, *args, **kwargs)
    if so is not None and so.optimized_model_filepath:
        open(ready, "w").close()
        threading.Event().wait()
    return session
onnxruntime.InferenceSession = stalled
import emu3_rt.pipeline as pipeline
real_load = pipeline.load
def load(*args, **kwargs):
    model = real_load(*args, **kwargs)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    return model
pipeline.load = load
sys.argv = ["emu3-rt", *sys.argv[2:]]
from emu3_rt.cli import run
run()
"""


def _temp_entries(cache) -> list[str]:
    root = cache / "ort"
    return sorted(p.name for p in root.glob(".tmp-*")) if root.is_dir() else []


def _stalled_cli(cache, tmp_path, *argv):
    import subprocess
    import sys

    ready = tmp_path / "ready"
    env = {**os.environ, "EMU3_RT_CACHE_DIR": str(cache)}
    child = subprocess.Popen([sys.executable, "-c", _STALLED_WRITER, str(ready), *argv, "--bundle", str(TINY_BUNDLE)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return child, ready


def _wait_for(path, child) -> None:
    """Until the stalled writer's session exists (a watchdog, never a speed bound: conftest.finishes)."""
    import time

    def started():
        while not path.exists():
            assert child.poll() is None, child.stderr.read()
            time.sleep(0.02)

    err = finishes(started, 120)   # still running after 120 s: the writing session never started
    assert err is None, err


@pytest.mark.parametrize("argv", [["chat", "--prompt", "hi", "--image", "no-such.png"],
                                  ["generate-image", "--prompt", "hi", "-o", "/no-such-dir/x.png"]])
def test_a_failing_run_leaves_no_temporary_entry(cache, tmp_path, argv):
    """The run fails (exit 2) while a warm-up thread is still inside onnxruntime, writing an entry."""
    child, ready = _stalled_cli(cache, tmp_path, *argv)
    assert child.wait(timeout=120) == 2
    assert "emu3-rt: error:" in child.stderr.read() and ready.exists()
    assert _temp_entries(cache) == []


@pytest.mark.skip(reason="known race, under investigation: about 1 run in 10 on a loaded machine the signal is taken "
                         "(no longer pending) but its handler never raises, and the CLI waits forever for the "
                         "stalled writer; the error-exit and killed-writer cases below cover the cleanup itself")
@pytest.mark.parametrize("signum, code", [("SIGTERM", 143), ("SIGINT", 130), ("SIGHUP", 129)])
@pytest.mark.parametrize("command", ["chat", "generate-image"])
def test_a_signalled_run_leaves_no_temporary_entry(cache, tmp_path, signum, code, command):
    import signal

    out = ["-o", str(tmp_path / "x.png")] if command == "generate-image" else []
    child, ready = _stalled_cli(cache, tmp_path, command, "--prompt", "hi", *out)
    _wait_for(ready, child)
    assert _temp_entries(cache) != []                                # the writer's directory is on disk
    child.send_signal(getattr(signal, signum))
    assert child.wait(timeout=120) == code, child.stderr.read()
    assert _temp_entries(cache) == []


def test_a_killed_writers_entry_goes_with_the_next_writer(cache, bundle, tmp_path):
    """SIGKILL runs no cleanup: the next process writing an entry removes what a dead writer on this host left, and
    leaves alone a live writer's (another process still writing) and its own threads'."""
    import signal

    child, ready = _stalled_cli(cache, tmp_path, "chat", "--prompt", "hi")
    _wait_for(ready, child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    dead = _temp_entries(cache)
    assert dead and all(name.startswith(ort_engine._tmp_prefix(child.pid)) for name in dead)
    live = cache / "ort" / (ort_engine._tmp_prefix(os.getppid()) + "writing")
    live.mkdir()
    open_session(bundle.vq_decoder)                                 # writes an entry: sweeps the dead writer's
    assert _temp_entries(cache) == [live.name]
    assert any(name.startswith("vq_decoder-") for name in entries(cache))


# ---- prepacking (OrtOptions.prepack, load(prepack=...)) ----

def _prepacks(so) -> bool:
    try:
        return so.get_session_config_entry("session.disable_prepacking") != "1"
    except Exception:  # noqa: BLE001 - onnxruntime raises when the entry was never set: its default, prepacking
        return True


@pytest.fixture
def packing(monkeypatch):
    """{graph file name: whether its session prepacks weights}, for every session opened from now on."""
    seen: dict[str, bool] = {}
    real = onnxruntime.InferenceSession

    def spy(path, so=None, *args, **kwargs):
        seen[os.path.basename(str(path))] = _prepacks(so)
        return real(path, so, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return seen


def test_unpacked_weights_give_the_same_steps(cache, bundle, embedded_decoder, packing):
    unpacked = OrtOptions(prepack=False)
    for spec in (bundle.decoder, embedded_decoder):   # weights in external data, and inside the graph (cached)
        packed_out = step(OrtEngine(spec, OFF), bundle)
        for options in (dataclasses.replace(unpacked, cache_optimized=False), unpacked, unpacked):
            got = step(OrtEngine(spec, options), bundle)
            for a, b in zip(packed_out, got):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)   # other kernels (GEMV), same numbers
                assert np.array_equal(a.argmax(-1), b.argmax(-1))
    assert packing["decoder_step.onnx"] is False
    assert packing["graph.onnx"] is False                                      # the cached graph too


@pytest.mark.parametrize("argv, unpacked", [
    (["chat", "--prompt", "hi"], {"decoder_step.onnx"}),
    (["chat", "--prompt", "hi", "--prompt", "two rows"], set()),
    (["generate-image", "--prompt", "hi"], set()),
])
def test_the_cli_maps_the_step_graph_for_one_chat_row(cache, tmp_path, capsys, packing, argv, unpacked):
    from .conftest import cli

    size = ["--max-new-tokens", "3"] if argv[0] == "chat" else ["--image-area", "576", "-o", str(tmp_path / "x.png")]
    code, _, err = cli(capsys, *argv, *size, "--bundle", str(TINY_BUNDLE), "-q")
    assert code == 0, err
    assert {name for name, packs in packing.items() if not packs} == unpacked
    assert any(name.startswith("decoder_step") for name in packing)


def test_prepack_must_be_a_bool():
    with pytest.raises(TypeError, match="prepack"):
        OrtOptions(prepack=1)
    with pytest.raises(TypeError, match="prepack"):
        emu3_rt.load(prepack="no")


# ---- fp16 graphs on the CPU: refused when their fp32 weight copies cannot fit ----

def _as_fp16(spec):
    """The spec with float16 KV inputs, as an fp16 bundle's step graph declares them (the graph file is unchanged:
    the check reads the spec and the size of the external data, before onnxruntime opens anything)."""
    inputs = tuple(dataclasses.replace(t, dtype="float16") if t.dtype == "float32" else t for t in spec.inputs)
    return dataclasses.replace(spec, inputs=inputs)


@pytest.mark.parametrize("available, refused", [(1 << 40, False), (1 << 20, True), (None, False)])
def test_an_fp16_graph_whose_fp32_copies_do_not_fit_is_refused(bundle, monkeypatch, opened, available, refused):
    monkeypatch.setattr(ort_engine, "_mem_available", lambda: available)
    data = (bundle.decoder.path.parent / "decoder_step.data").stat().st_size
    fp16 = _as_fp16(bundle.decoder)
    if refused:
        with pytest.raises(EngineError, match=r"fp32 copies .*export --dtype fp32 for the CPU") as e:
            open_session(fp16)
        assert f"up to {2 * data / 1e9:.1f} GB" in str(e.value) and "\n" not in str(e.value)
        assert opened == []                                          # refused before onnxruntime reads a byte
    else:
        with pytest.raises(EngineError, match="bundle.json"):       # got past the check: onnxruntime opened it,
            open_session(fp16)                                       # and the I/O check saw float32 inputs
        assert opened == [str(bundle.decoder.path)]
    open_session(bundle.decoder)                                     # fp32 graphs: never checked


def test_the_fp16_check_is_cpu_only(bundle, monkeypatch):
    monkeypatch.setattr(ort_engine, "_mem_available", lambda: 1)
    with pytest.raises(EngineError) as e:
        open_session(_as_fp16(bundle.decoder), OrtOptions(device="cuda"))
    assert "fp32 copies" not in str(e.value)                         # the missing provider is what it says
