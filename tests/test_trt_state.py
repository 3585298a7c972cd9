"""TrtEngine's decode-state path on the CPU (bugs 3, 4, 6 and 8 of issue 20), without TensorRT or a GPU.

TensorRT cannot run here, so FakePlan stands in for a deserialized plan: the ICudaEngine / IExecutionContext calls
TrtEngine makes, over tests/async_memory.AsyncMemory. As on a GPU, a context's profile switch and executions are
queued on a stream and happen when that stream is synchronized; an execution runs the real step graph (onnxruntime
CPU) on the addresses bound at enqueue time, and refuses to run before its profile switch landed or while another
execution on its context is in flight. plan_for's checks run against stand-in tensorrt / cuda.bindings modules.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import threading
import types

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from emu3_rt import integrity  # noqa: E402
from emu3_rt.bundle import load_bundle  # noqa: E402
from emu3_rt.engines import EngineError, OrtEngine  # noqa: E402
from emu3_rt.engines.state import KVLayout  # noqa: E402
from emu3_rt.engines.trt import TrtEngine, plan_for  # noqa: E402
from emu3_rt.generate import decode_step, prefill  # noqa: E402
from emu3_rt.prompt import make_batch  # noqa: E402

from .async_memory import AsyncMemory  # noqa: E402
from .conftest import TINY_BUNDLE, in_threads  # noqa: E402

PROMPTS = [[5, 9, 2, 7, 11, 3], [4, 4, 8]]
_TYPES = {"tensor(float)": ("FLOAT", np.float32), "tensor(int64)": ("INT64", np.int64)}


def _view(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_uint8 * max(n, 1)).from_address(ptr), np.uint8)[:n].view(dtype).reshape(shape)


class _Named:
    def __init__(self, name: str):
        self.name = name


class FakePlan:
    """A plan of the step graph with two profiles (prefill, decode), executed by onnxruntime CPU."""

    def __init__(self, engine: OrtEngine, memory: AsyncMemory):
        self.ort, self.memory = engine, memory
        sess = engine.session
        # a plan keeps the graph's static axes (KV heads, head size, logits width); -1 where a profile ranges
        dims = lambda a: tuple(d if isinstance(d, int) else -1 for d in a.shape)  # noqa: E731
        self.io = [(a.name, "INPUT", a.type, dims(a)) for a in sess.get_inputs()]
        self.io += [(a.name, "OUTPUT", a.type, dims(a)) for a in sess.get_outputs()]
        self.num_io_tensors, self.num_optimization_profiles = len(self.io), 2
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _entry(self, name):
        return next(e for e in self.io if e[0] == name)

    def get_tensor_mode(self, name):
        return _Named(self._entry(name)[1])

    def get_tensor_dtype(self, name):
        return _Named(_TYPES[self._entry(name)[2]][0])

    def get_tensor_shape(self, name):
        return self._entry(name)[3]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, plan: FakePlan):
        self.plan, self.profile, self.wanted = plan, None, None
        self.shapes, self.addresses, self.streams = {}, {}, set()
        self.in_flight = 0
        self._lock = threading.Lock()

    def set_optimization_profile_async(self, profile, stream):
        self.wanted = profile
        self.plan.memory.enqueue(stream, lambda: setattr(self, "profile", profile))

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        with self._lock:
            if self.in_flight:
                raise AssertionError("two executions in flight on one execution context (its device memory)")
            self.in_flight += 1
        self.streams.add(stream)
        shapes, addresses, wanted = dict(self.shapes), dict(self.addresses), self.wanted
        self.plan.memory.enqueue(stream, lambda: self._execute(shapes, addresses, wanted))
        return True

    def _execute(self, shapes, addresses, wanted):
        try:
            if self.profile != wanted:
                raise AssertionError(f"execution before its profile switch landed ({self.profile} != {wanted})")
            ins = [e for e in self.plan.io if e[1] == "INPUT"]
            feeds = {n: _view(addresses[n], shapes[n], _TYPES[t][1]).copy() for n, _, t, _ in ins}
            out = self.plan.ort.run(feeds)
            for name, value in out.items():
                ctypes.memmove(addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(TINY_BUNDLE)


def trt_engine(bundle):
    memory = AsyncMemory()
    engine = TrtEngine(bundle.decoder, TINY_BUNDLE / "decoder_step.onnx", memory=memory)
    plan = FakePlan(OrtEngine(bundle.decoder), memory)
    engine._adopt(plan)
    return engine, plan, memory


def run(engine, state, bundle, steps):
    out = [prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)]
    return out + [decode_step(engine, state, np.array([6 + i, 10 + i]), i) for i in range(steps)]


def test_a_plan_state_gives_onnxruntimes_logits(bundle):
    """Bug 6: the decode profile's switch is queued on the state's own stream, ahead of its executions, so it has
    landed when they run (queued on another stream and never synchronized, the fake plan refuses to execute)."""
    ort = OrtEngine(bundle.decoder)
    layout = KVLayout.from_bundle(bundle)
    want = run(ort, ort.new_state(layout, 2), bundle, 8)
    engine, plan, memory = trt_engine(bundle)
    state = engine.new_state(layout, 2)
    for a, b in zip(want, run(engine, state, bundle, 8)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert {c.profile for c in plan.contexts} == {0, 1}
    state.close()
    assert engine.state_contexts == 0 and not memory.violations and memory.counts.streams == 0


def test_two_states_from_two_threads_use_their_own_contexts(bundle):
    """Bug 3: the serve batcher steps generations from several threads; each state executes on contexts of its
    own (a context only ever runs on one stream, so never twice at once), destroyed when the state closes, and
    each gets what it gets alone."""
    layout = KVLayout.from_bundle(bundle)
    ort = OrtEngine(bundle.decoder)
    want = run(ort, ort.new_state(layout, 2), bundle, 10)
    engine, plan, memory = trt_engine(bundle)

    def work(i):
        state = engine.new_state(layout, 2)
        out = run(engine, state, bundle, 10)
        state.close()
        return out

    got = in_threads(3, work, 120)
    for i in range(3):
        for a, b in zip(want, got[i]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert len(plan.contexts) == 3 * 2 and all(len(c.streams) == 1 for c in plan.contexts)
    assert engine.state_contexts == 0 and memory.counts.streams == 0


# ---- plan_for (bugs 4 and 8) ----

@pytest.fixture
def fake_gpu(monkeypatch):
    """tensorrt 10.0 and two GPUs (device 0: sm 8.0, device 1: sm 9.0) as plan_for sees them."""
    asked = []

    def props(device):
        asked.append(device)
        return 0, types.SimpleNamespace(major=8 + device, minor=0)

    runtime = types.SimpleNamespace(cudaGetDeviceProperties=props)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = runtime, bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime),
                         ("tensorrt", types.SimpleNamespace(__version__="10.0"))):
        monkeypatch.setitem(sys.modules, name, module)
    return asked


def write_plan(bundle_dir, sm="9.0"):
    plan = bundle_dir / "trt" / "decoder_step.plan"
    plan.parent.mkdir(exist_ok=True)
    plan.write_bytes(b"plan bytes")
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    entry = {"filename": plan.name, "sha256": hashlib.sha256(b"plan bytes").hexdigest(),
             "onnx_sha256": manifest["files"]["decoder_step.onnx"]["sha256"]}
    (plan.parent / "plans.json").write_text(json.dumps({"sm": sm, "tensorrt": "10.0", "plans": {"decoder": entry}}))
    return plan


def test_plan_check_reads_the_requested_gpu(bundle_copy, fake_gpu):
    """Bug 4: plans built for device 1's architecture load on device 1, and are refused on device 0."""
    write_plan(bundle_copy, sm="9.0")
    b = load_bundle(bundle_copy)
    assert plan_for(b, "decoder", 1).name == "decoder_step.plan" and fake_gpu[-1] == 1
    with pytest.raises(EngineError, match="plans are for sm 9.0 / TensorRT 10.0, this is sm 8.0"):
        plan_for(b, "decoder", 0)


def test_plan_hash_is_remembered_until_the_file_changes(bundle_copy, fake_gpu, monkeypatch):
    """Bug 8: a plan is hashed once, then vouched for by its stamp (a stat) as bundle files are; a rewritten plan
    is hashed again and refused."""
    plan = write_plan(bundle_copy)
    b = load_bundle(bundle_copy)
    hashed, real = [], integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    plan_for(b, "decoder", 1)
    plan_for(b, "decoder", 1)
    assert hashed == ["decoder_step.plan"]
    plan.write_bytes(b"other bytes")
    with pytest.raises(EngineError, match="sha256 does not match"):
        plan_for(b, "decoder", 1)
    assert hashed == ["decoder_step.plan"] * 2


def test_plan_record_hashes_the_compiled_onnx(tmp_path):
    """Bug 8: plans.json's onnx_sha256 is the hash of the file compiled, not the manifest's claim about it."""
    from export.build_trt import plan_record

    (tmp_path / "g.onnx").write_bytes(b"graph as compiled")
    (tmp_path / "g.plan").write_bytes(b"plan")
    record = plan_record(tmp_path / "g.plan", tmp_path / "g.onnx")
    assert record == {"filename": "g.plan", "sha256": hashlib.sha256(b"plan").hexdigest(),
                      "onnx_sha256": hashlib.sha256(b"graph as compiled").hexdigest()}
