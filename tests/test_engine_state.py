"""The decode state API (engines/state.py) on the embedded tiny bundle, CPU onnxruntime: the host KVCache and the
device path (DeviceState over IOBinding, here on host OrtValues) give the same logits, grow in blocks keeping
their rows, re-bind only after growth, count only ids / positions / mask / logits as traffic, and refuse to run
on an engine that is not theirs or is closed. With the sampler graph chained onto the step (step_and_pick), both
states choose the ids GraphSampler.pick and the numpy chain choose, and the device state sends back only ids."""

from __future__ import annotations

import gc

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import emu3_rt  # noqa: E402
from emu3_rt import kv_cache  # noqa: E402
from emu3_rt.bundle import load_bundle  # noqa: E402
from emu3_rt.engines import EngineError, OrtEngine  # noqa: E402
from emu3_rt.engines.device_state import DeviceState  # noqa: E402
from emu3_rt.engines.memory import HostMemory  # noqa: E402
from emu3_rt.engines.state import KVLayout  # noqa: E402
from emu3_rt.generate import decode_step, prefill  # noqa: E402
from emu3_rt.pipeline import Emu3  # noqa: E402
from emu3_rt.prompt import make_batch  # noqa: E402

from .conftest import TINY_BUNDLE  # noqa: E402

PROMPTS = [[5, 9, 2, 7, 11, 3], [4, 4, 8]]   # row 1 is left-padded by three


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(TINY_BUNDLE)


@pytest.fixture
def engine(bundle):
    return OrtEngine(bundle.decoder)


def run(engine, state, bundle, steps: int, chunk: int = 4) -> list[np.ndarray]:
    """Prefill logits and `steps` decode steps' logits, each (2, V), on fixed ids."""
    out = [prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), chunk)]
    for i in range(steps):
        out.append(decode_step(engine, state, np.array([6 + i, 10 + i]), i))
    return out


@pytest.mark.parametrize("block,chunk", [(4, 4), (3, 2), (256, 512)])
def test_device_state_equals_host_state(bundle, engine, monkeypatch, block, chunk):
    """Across block growths (every 3 or 4 positions, or never) and prefill chunkings, the device path's logits are
    the host cache's; both hold the same filled rows."""
    monkeypatch.setattr(kv_cache, "KV_BLOCK", block)
    layout = KVLayout.from_bundle(bundle)
    host, device = engine.new_state(layout, 2), engine.new_state(layout, 2, bound=True)
    assert isinstance(host, kv_cache.KVCache) and isinstance(device, DeviceState)
    for a, b in zip(run(engine, host, bundle, 9, chunk), run(engine, device, bundle, 9, chunk)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert host.length == device.length == 6 + 9
    # the device state grows by KV_BLOCK (one CUDA graph per capacity); the host by kv_cache.capacity_for
    assert device.capacity % block == 0 and host.capacity == kv_cache.capacity_for(host.length)
    assert device.capacity >= host.capacity >= host.length
    np.testing.assert_array_equal(host.slot_mask, device.slot_mask[:, : host.capacity])
    assert not device.slot_mask[:, host.capacity:].any()
    np.testing.assert_array_equal(host.next_positions, device.next_positions)


def test_growth_keeps_rows_and_rebinds_only_then(bundle, engine, monkeypatch):
    monkeypatch.setattr(kv_cache, "KV_BLOCK", 4)
    state = engine.new_state(KVLayout.from_bundle(bundle), 2, bound=True)
    run(engine, state, bundle, 1)                       # 7 positions: capacity 8
    binding, kv = state._ios[1].binding, state.kv[0]
    decode_step(engine, state, np.array([1, 2]), 1)      # 8: same block, same bindings and buffers
    assert state.capacity == 8 and state._ios[1].binding is binding and state.kv[0] is kv
    rows = np.array(state.kv[3].value.numpy()[:, :, :8])
    decode_step(engine, state, np.array([1, 2]), 2)      # 9: grows to 12, re-bound, rows kept
    assert state.capacity == 12 and state._ios[1].binding is not binding
    np.testing.assert_array_equal(state.kv[3].value.numpy()[:, :, :8], rows)
    assert (state.kv[3].value.numpy()[:, :, 9:] == 0).all()   # empty slots stay zero (masked, never NaN)


def test_capacity_hint_allocates_up_front(bundle, engine, monkeypatch):
    monkeypatch.setattr(kv_cache, "KV_BLOCK", 4)
    layout = KVLayout.from_bundle(bundle)
    for bound in (False, True):
        state = engine.new_state(layout, 2, capacity_hint=10, bound=bound)
        assert state.capacity == 12
        run(engine, state, bundle, 3)
        assert state.capacity == 12


def test_traffic_counts_feeds_and_logits_never_the_cache(bundle, engine):
    """A decode step of R rows sends ids, positions and mask slots and takes back (R, V) float32 logits; the K/V
    (2 layers x K,V x R x KV x C x D) is in neither count."""
    layout = KVLayout.from_bundle(bundle)
    columns = bundle.decoder.output("logits").dims[1]
    for bound in (False, True):
        state = engine.new_state(layout, 2, bound=bound)
        run(engine, state, bundle, 3)
        t = state.traffic
        assert t.calls == 2 + 3 and t.last_d2h == 2 * columns * 4
        if bound:   # ids, positions, the slot filled last step and this step's own column: (R,) int64 each
            assert t.last_h2d == 4 * 2 * 8
        else:       # the host hands the whole mask it builds, (R, C + 1)
            assert t.last_h2d == 2 * 8 * 2 + 2 * (state.capacity + 1) * 8
        kv_bytes = len(layout.past_names) * 2 * layout.kv_heads * state.capacity * layout.head_size * 4
        assert t.last_h2d < kv_bytes


def test_a_state_runs_only_on_its_own_open_engine(bundle):
    layout = KVLayout.from_bundle(bundle)
    first, other = OrtEngine(bundle.decoder), OrtEngine(bundle.decoder)
    state = first.new_state(layout, 2, bound=True)   # bound to first's session
    with pytest.raises(EngineError, match="belongs to another engine"):
        prefill(other, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    host = first.new_state(layout, 2)                  # host memory: any run() engine may step it ...
    prefill(other, host, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    first.close()                                       # ... while its maker is open
    with pytest.raises(EngineError, match="engine was closed"):
        decode_step(other, host, np.array([1, 2]), 0)
    with pytest.raises(EngineError, match="engine was closed"):
        prefill(first, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    with pytest.raises(EngineError, match="engine is closed"):
        first.run({})
    gone = OrtEngine(bundle.decoder)
    state = gone.new_state(layout, 2)
    del gone
    gc.collect()
    with pytest.raises(EngineError, match="no longer exists"):
        state.step(first, np.zeros((2, 1), np.int64), np.ones((2, 1), np.int64), np.zeros((2, 1), np.int64))


def test_closed_state_is_refused(bundle, engine):
    state = engine.new_state(KVLayout.from_bundle(bundle), 2, bound=True)
    run(engine, state, bundle, 1)
    state.close()
    with pytest.raises(ValueError, match="state was closed"):
        decode_step(engine, state, np.array([1, 2]), 1)


def test_bf16_kv_is_refused_on_the_host_only(bundle):
    """numpy has no bfloat16: the host cache says so; device states allocate bf16 OrtValues by onnx type."""
    import dataclasses

    layout = dataclasses.replace(KVLayout.from_bundle(bundle), dtype="bfloat16")
    with pytest.raises(ValueError, match="bfloat16 KV cache cannot live in numpy"):
        kv_cache.KVCache(layout, 2)
    import onnxruntime as ort

    from emu3_rt.engines.device_state import OrtRunner

    engine = OrtEngine(bundle.decoder)
    runner = OrtRunner(ort, engine.session, HostMemory(), "decoder_step.onnx")
    state = DeviceState(engine, runner, layout, 2, 8)
    assert state.kv[0].value.element_type() == 16 and state.kv[0].shape == (2, layout.kv_heads, 256,
                                                                           layout.head_size)


def test_memory_copy2d_moves_strided_rows():
    """HostMemory.copy2d: (height) rows of width bytes between pitched buffers, what KV writes and growth use."""
    src = np.arange(24, dtype=np.uint8).reshape(4, 6)
    dst = np.zeros((4, 10), np.uint8)
    HostMemory().copy2d(dst.ctypes.data + 3, 10, src.ctypes.data + 1, 6, 4, 4)
    expected = np.zeros((4, 10), np.uint8)
    expected[:, 3:7] = src[:, 1:5]
    np.testing.assert_array_equal(dst, expected)


def test_generation_closes_its_state(monkeypatch):
    """The pipeline decodes through the step engine's state and closes it when the generation ends."""
    model = emu3_rt.load(TINY_BUNDLE)
    closed = []
    real = kv_cache.KVCache.close
    monkeypatch.setattr(kv_cache.KVCache, "close", lambda self: (closed.append(self), real(self)))
    model.chat("hello", sampling=emu3_rt.SamplingOptions(greedy=True), max_new_tokens=3)
    assert len(closed) == 1 and closed[0].past is None and closed[0].traffic.calls >= 1


# ---- the sampler graph chained onto the step ----

def image_tokens(monkeypatch, bound: bool, picker: str, cfg_scale: float, sampling) -> tuple[np.ndarray, list]:
    """A 3x3 image on the tiny bundle's visual route: (its (1, 15) ids, the decode states made). picker "chained":
    the sampler graph run by the state (step_and_pick); "graph-on-logits": GraphSampler.pick on the state's
    logits (step); "numpy": the reference ChainPicker. bound: the device state (IOBinding on host OrtValues)."""
    states, real_state, real_picker = [], OrtEngine.new_state, Emu3._picker

    def new_state(self, layout, rows, capacity_hint=0, bound_=None):
        states.append(real_state(self, layout, rows, capacity_hint, bound=bound))
        return states[-1]

    class OnLogits:   # the GraphSampler's pick as a plain Pick: the loop does not chain it
        def __init__(self, sampler):
            self.sampler = sampler

        def __call__(self, logits, generated):
            return self.sampler.pick(logits, generated)

        def skip(self, sequences):
            self.sampler.skip(sequences)

    def on_logits(self, *args, **kwargs):
        sampler, *rest = real_picker(self, *args, **kwargs)
        return OnLogits(sampler), *rest

    monkeypatch.setattr(OrtEngine, "new_state", new_state)
    if picker == "graph-on-logits":
        monkeypatch.setattr(Emu3, "_picker", on_logits)
    model = emu3_rt.load(TINY_BUNDLE, sampler="numpy" if picker == "numpy" else "graph")
    gen = model.start_image("a red square", cfg_scale=cfg_scale, image_area=24 * 24, sampling=sampling, seed=7)
    while gen.step() is not None:
        pass
    return gen._decoding.tokens, states


@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
@pytest.mark.parametrize("greedy", [True, False])
def test_chained_sampler_picks_what_the_host_pickers_pick(monkeypatch, cfg_scale, greedy):
    """CFG (or none) with the visual grid, greedy or seeded top-k sampling: the ids the chained sampler graph picks on
    either state are GraphSampler.pick's on the state's logits and the numpy chain's."""
    sampling = emu3_rt.SamplingOptions(greedy=True) if greedy else emu3_rt.SamplingOptions(top_k=40)
    runs = {}
    for bound, picker in ((True, "chained"), (True, "graph-on-logits"), (False, "chained"), (False, "numpy")):
        with monkeypatch.context() as m:
            runs[bound, picker], _ = image_tokens(m, bound, picker, cfg_scale, sampling)
    want = runs[False, "numpy"]
    assert want.shape == (1, 3 * 4 + 3)
    for key, tokens in runs.items():
        np.testing.assert_array_equal(tokens, want, err_msg=str(key))


def test_chained_traffic_is_ids_and_small_feeds(monkeypatch):
    """A CFG image step, chained: the device state sends ids, positions, two mask columns (R,) int64 each and the
    sampler's feeds (kinds and uniforms (B,) 8 bytes each, six scalars: 34 bytes), and takes back (B,) int64 ids;
    neither the (R, V) logits nor the K/V. The host state reads its logits as numpy and hands them to the sampler,
    so it counts them both ways (KVCache.step_and_pick)."""
    sampling = emu3_rt.SamplingOptions(top_k=40)
    states = {}
    for bound in (True, False):
        with monkeypatch.context() as m:
            [states[bound]] = image_tokens(m, bound, "chained", 3.0, sampling)[1]
    device, host = states[True], states[False]
    rows, seqs = 2, 1
    columns = load_bundle(TINY_BUNDLE).image_decoder.output("logits").dims[1]
    layout = KVLayout.from_bundle(load_bundle(TINY_BUNDLE))
    kv = len(layout.past_names) * rows * layout.kv_heads * device.capacity * layout.head_size * 4
    feeds = 16 * seqs + 34
    t = device.traffic
    # one prefill chunk, then a step per visual token after the first: the grid's forced EOL, EOF, EOI and EOS run
    # no model of their own (an EOL rides with the next row's first step; generate.py)
    assert t.calls == 1 + (3 * 3 - 1)
    assert (t.last_h2d, t.last_d2h) == (4 * rows * 8 + feeds, 8 * seqs)
    assert t.last_h2d + t.last_d2h <= 64 * 1024 and t.last_d2h < rows * columns * 4 and t.last_h2d < kv
    t = host.traffic
    assert t.last_h2d == 2 * rows * 8 + rows * (host.capacity + 1) * 8 + rows * columns * 4 + feeds
    assert t.last_d2h == rows * columns * 4 + 8 * seqs


def test_device_state_refuses_a_sampler_it_cannot_bind(bundle, engine):
    """Chaining needs an onnxruntime sampler session; anything else is refused before the step runs."""
    state = engine.new_state(KVLayout.from_bundle(bundle), 2, bound=True)
    prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    with pytest.raises(EngineError, match="must be an onnxruntime engine"):
        decode_step(engine, state, np.array([1, 2]), 0, (object(), {}))
    assert state.length == 6
