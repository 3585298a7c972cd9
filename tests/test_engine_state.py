"""The one decode state (engines/state.DecodeState) on the embedded tiny bundle, CPU onnxruntime over host memory:
the same class a CUDA engine makes. Its logits equal a cache-free recomputation, it grows in blocks keeping its
rows, re-binds only after growth, counts only ids / positions / mask / logits as traffic, refuses a foreign or
closed engine, holds rows of different lengths, rolls rows back, releases and adds rows, and frees every stream and
buffer it made. Over tests/async_memory.AsyncMemory (copies land only at sync) the same steps give the same
logits, and a failing chained sampler leaves no copy in flight on freed buffers (bug 2 of issue 20)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import emu3_rt  # noqa: E402
from emu3_rt import kv_cache  # noqa: E402
from emu3_rt.bundle import load_bundle  # noqa: E402
from emu3_rt.engines import EngineError, OrtEngine, OrtOptions  # noqa: E402
from emu3_rt.engines.memory import HostMemory  # noqa: E402
from emu3_rt.engines.ort import GraphIds  # noqa: E402
from emu3_rt.engines.state import DecodeState, HostStepEngine, KVLayout  # noqa: E402
from emu3_rt.generate import decode_step, prefill  # noqa: E402
from emu3_rt.pipeline import Emu3  # noqa: E402
from emu3_rt.prompt import make_batch  # noqa: E402

from .async_memory import AsyncMemory, UseAfterFree  # noqa: E402
from .conftest import TINY_BUNDLE, in_threads  # noqa: E402

PROMPTS = [[5, 9, 2, 7, 11, 3], [4, 4, 8]]   # row 1 is left-padded by three


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(TINY_BUNDLE)


@pytest.fixture
def engine(bundle):
    return OrtEngine(bundle.decoder)


@pytest.fixture
def layout(bundle):
    return KVLayout.from_bundle(bundle)


def run(engine, state, bundle, steps: int, chunk: int = 4) -> list[np.ndarray]:
    """Prefill logits and `steps` decode steps' logits, each (2, V), on fixed ids."""
    out = [prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), chunk)]
    for i in range(steps):
        out.append(decode_step(engine, state, np.array([6 + i, 10 + i]), i))
    return out


def recomputed(engine, layout, bundle, prompts) -> np.ndarray:
    """The last position's logits of each prompt, one fresh state each, the whole prompt in one prefill."""
    out = []
    for p in prompts:
        state = engine.new_state(layout, 1)
        out.append(prefill(engine, state, make_batch([p], None, bundle.tokens.pad), 4096)[0])
        state.close()
    return np.stack(out)


def kv_numpy(state, i: int) -> np.ndarray:
    return state.memory.host_view(state.kv[i])


def test_cpu_default_is_the_decode_state_the_gpu_runs():
    """The model's CPU decode path: DecodeState over HostMemory, bound to onnxruntime by address (IOBinding), as
    on CUDA; a run()-only engine (HostStepEngine) gets the same class."""
    model = emu3_rt.load(TINY_BUNDLE)
    gen = model.start_image("a red square", image_area=24 * 24, seed=1)
    gen.step()
    state = gen._decoding.cache
    assert type(state) is DecodeState and type(state.memory) is HostMemory
    assert all(type(io.binding).__name__ == "_Binding" for io in state._ios.values())
    gen.cancel()
    wrapped = HostStepEngine(model.engines["decoder"])
    assert type(wrapped.new_state(KVLayout.from_bundle(model.bundle), 2)) is DecodeState


@pytest.mark.parametrize("block,chunk", [(4, 4), (3, 2), (256, 512)])
def test_logits_equal_a_cache_free_recomputation(bundle, engine, layout, monkeypatch, block, chunk):
    """Across growths (every 3 or 4 positions, or never) and prefill chunkings, each step's logits are those of the
    whole sequence prefilled at once in a new state; the run() adapter's state gives the same."""
    monkeypatch.setattr(kv_cache, "KV_BLOCK", block)
    grow = kv_cache.block_capacity
    state = DecodeState(engine, layout, 2, engine.spec.output("logits").dims[1], grow=grow)
    got = run(engine, state, bundle, 5, chunk)
    seqs = [list(p) for p in PROMPTS]
    for i, logits in enumerate(got):
        np.testing.assert_allclose(logits, recomputed(engine, layout, bundle, seqs), rtol=1e-4, atol=1e-5)
        seqs[0].append(6 + i)
        seqs[1].append(10 + i)
    assert state.length == 6 + 5 and state.capacity % block == 0
    wrapped = HostStepEngine(engine)
    for a, b in zip(got, run(wrapped, wrapped.new_state(layout, 2), bundle, 5, chunk)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_growth_keeps_rows_and_rebinds_only_then(bundle, engine, layout, monkeypatch):
    monkeypatch.setattr(kv_cache, "KV_BLOCK", 4)
    state = DecodeState(engine, layout, 2, engine.spec.output("logits").dims[1], grow=kv_cache.block_capacity)
    run(engine, state, bundle, 1)                       # 7 positions: capacity 8
    binding, kv = state._ios[1].binding, state.kv[0]
    decode_step(engine, state, np.array([1, 2]), 1)      # 8: same block, same bindings and buffers
    assert state.capacity == 8 and state._ios[1].binding is binding and state.kv[0] is kv
    rows = np.array(kv_numpy(state, 3)[:, :, :8])
    decode_step(engine, state, np.array([1, 2]), 2)      # 9: grows to 12, re-bound, rows kept
    assert state.capacity == 12 and state._ios[1].binding is not binding
    np.testing.assert_array_equal(kv_numpy(state, 3)[:, :, :8], rows)
    assert (kv_numpy(state, 3)[:, :, 9:] == 0).all()   # empty slots stay zero (masked, never NaN)


def test_capacity_hint_allocates_up_front(bundle, engine, layout):
    """whole=True (a device state's default): the hinted slots are allocated at once, and filling them never
    grows the buffers. Host memory's default grows (attention on the CPU reads every slot of the capacity)."""
    state = DecodeState(engine, layout, 2, engine.spec.output("logits").dims[1], capacity_hint=40, whole=True)
    assert state.capacity == kv_cache.capacity_for(40)
    kv = state.kv[0]
    run(engine, state, bundle, 30)
    assert state.capacity == kv_cache.capacity_for(40) and state.kv[0] is kv
    host = engine.new_state(layout, 2, capacity_hint=200)
    assert host.memory.device_type == "cpu" and host.capacity == kv_cache.capacity_for(1)
    run(engine, host, bundle, 30)
    assert host.capacity == kv_cache.capacity_for(host.length) < kv_cache.capacity_for(200)


def test_an_image_state_gets_its_hint_and_grows_on_the_host(monkeypatch):
    """The pipeline hints prompt + the grid's exact token count; on the CPU the state grows to it instead of
    starting there, and the token array is preallocated."""
    hints = []
    real = DecodeState.__init__

    def spy(self, *args, **kwargs):
        hints.append(kwargs.get("capacity_hint", args[4] if len(args) > 4 else 0))
        real(self, *args, **kwargs)

    monkeypatch.setattr(DecodeState, "__init__", spy)
    model = emu3_rt.load(TINY_BUNDLE)
    gen = model.start_image("a red square", image_area=48 * 48, cfg_scale=3.0, seed=1)
    gen.step()
    state = gen._decoding.cache
    first = state.capacity
    while gen.step() is not None:
        pass
    need = gen._decoding.batch.ids.shape[1] + gen.steps
    assert hints[-1] == need and first < need <= state.capacity == kv_cache.capacity_for(need)


def test_traffic_counts_feeds_and_logits_never_the_cache(bundle, engine, layout):
    """A decode step of R rows sends ids, positions, the slot filled last step and its own mask column ((R,) int64
    each) and takes back (R, V) float32 logits; the K/V is in neither count."""
    columns = bundle.decoder.output("logits").dims[1]
    state = engine.new_state(layout, 2)
    run(engine, state, bundle, 3)
    t = state.traffic
    assert t.calls == 2 + 3 and t.last_d2h == 2 * columns * 4 and t.last_h2d == 4 * 2 * 8
    kv_bytes = len(layout.past_names) * 2 * layout.kv_heads * state.capacity * layout.head_size * 4
    assert t.last_h2d < kv_bytes


def test_a_state_runs_only_on_its_own_open_engine(bundle, layout):
    first, other = OrtEngine(bundle.decoder), OrtEngine(bundle.decoder)
    state = first.new_state(layout, 2)
    with pytest.raises(EngineError, match="belongs to another engine"):
        prefill(other, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    first.close()
    with pytest.raises(EngineError, match="engine was closed"):
        prefill(first, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    with pytest.raises(EngineError, match="engine is closed"):
        first.run({})
    gone = OrtEngine(bundle.decoder)
    state = gone.new_state(layout, 2)
    del gone
    gc.collect()
    with pytest.raises(EngineError, match="no longer exists"):
        state.step(other, np.zeros((2, 1), np.int64), np.ones((2, 1), np.int64), np.zeros((2, 1), np.int64))


def test_closed_state_is_refused(bundle, engine, layout):
    state = engine.new_state(layout, 2)
    run(engine, state, bundle, 1)
    state.close()
    state.close()
    with pytest.raises(ValueError, match="state was closed"):
        decode_step(engine, state, np.array([1, 2]), 1)


def test_bf16_kv_lives_in_the_backend_and_binds_by_onnx_type(bundle, engine):
    """numpy has no bfloat16: the state allocates it as bytes in its backend (bound by onnx type 16); the concat
    layout's host cache refuses it."""
    import dataclasses

    layout = dataclasses.replace(KVLayout.from_bundle(bundle), dtype="bfloat16")
    state = DecodeState(engine, layout, 2, 8)
    assert state.kv[0].dtype == "bfloat16" and state.kv[0].shape == (2, layout.kv_heads, 32, layout.head_size)
    assert state.kv[0].nbytes == 2 * layout.kv_heads * 32 * layout.head_size * 2
    with pytest.raises(ValueError, match="bfloat16 KV cache cannot live in numpy"):
        kv_cache.ConcatCache(dataclasses.replace(layout, kind="concat"), 2)


def test_memory_copy2d_moves_strided_rows():
    """HostMemory.copy2d: (height) rows of width bytes between pitched buffers, what KV writes and growth use."""
    src = np.arange(24, dtype=np.uint8).reshape(4, 6)
    dst = np.zeros((4, 10), np.uint8)
    memory = HostMemory()
    memory.copy2d(dst.ctypes.data + 3, 10, src.ctypes.data + 1, 6, 4, 4, memory.stream())
    expected = np.zeros((4, 10), np.uint8)
    expected[:, 3:7] = src[:, 1:5]
    np.testing.assert_array_equal(dst, expected)


# ---- streams and buffers (bug 1 of issue 20: a stream leaked per generation) ----

def test_generations_free_their_streams_and_buffers():
    """Every generation makes one stream in its engine's backend and destroys it when it ends, is cancelled, fails,
    or is dropped unclosed; no buffer outlives its state."""
    model = emu3_rt.load(TINY_BUNDLE)
    memory = model.engines["image_decoder"].memory
    for _ in range(3):
        model.generate_image("a red square", image_area=24 * 24, cfg_scale=3.0, seed=1)
    gen = model.start_image("a red square", image_area=24 * 24, seed=1)
    gen.step()
    gen.cancel()
    gen = model.start_image("a red square", image_area=24 * 24, seed=1)
    gen.step()
    assert memory.counts.streams == 1 and memory.counts.buffers > 0
    del gen
    gc.collect()
    assert memory.counts.streams_made == 5
    assert memory.counts.streams == 0 and memory.counts.buffers == 0


# ---- rows of different lengths, rollback, release and add (issues 22 and 23 build on them) ----

def test_rows_of_different_lengths_and_rollback(bundle, engine, layout):
    """Row 1 rolls back two of its three decoded tokens (a speculative step's rejected drafts) and continues
    from there while row 0 keeps all of its: each row's logits are those of its own sequence recomputed."""
    state = engine.new_state(layout, 2)
    prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    for i in range(3):
        decode_step(engine, state, np.array([20 + i, 30 + i]), i)
    state.rollback(1, 2)
    assert state.lengths.tolist() == [9, 7] and state.next_positions.tolist() == [9, 4]
    logits = decode_step(engine, state, np.array([23, 40]), 3)   # positions per row: 9 and 4
    want = recomputed(engine, layout, bundle, [PROMPTS[0] + [20, 21, 22, 23], PROMPTS[1] + [30, 40]])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert state.lengths.tolist() == [10, 8]
    # a multi-token step over rows of different lengths (S = 3 drafts per row), then a rollback of one draft each
    ids = np.array([[24, 25, 26], [41, 42, 43]])
    pos = state.next_positions[:, None] + np.arange(3)
    state.step(engine, ids, np.ones_like(ids), pos)
    state.rollback(np.array([0, 1]), [1, 2])
    logits = decode_step(engine, state, np.array([27, 44]), 5)
    want = recomputed(engine, layout, bundle, [PROMPTS[0] + [20, 21, 22, 23, 24, 25, 27],
                                               PROMPTS[1] + [30, 40, 41, 44]])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot roll back"):
        state.rollback(0, 99)


def test_release_and_add_rows(bundle, engine, layout):
    """Row 0 finishes and is released; a new sequence takes its row (add_rows reuses it) and decodes next to row 1,
    which never notices; a third sequence grows the state by a row, keeping both."""
    state = engine.new_state(layout, 2)
    prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    decode_step(engine, state, np.array([20, 30]), 0)
    state.release_rows(0)
    assert state.add_rows(1).tolist() == [0] and state.lengths.tolist() == [0, 7]
    fresh, one = [50, 51, 52], [30]
    for i, tok in enumerate(fresh):   # the new row's prompt, a token per step, beside row 1's decoding
        logits = decode_step(engine, state, np.array([tok, 31 + i]), 1 + i)
        one.append(31 + i)
    want = recomputed(engine, layout, bundle, [fresh, PROMPTS[1] + one])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    kv = state.kv[0]
    assert state.add_rows(1).tolist() == [2] and state.rows == 3 and state.kv[0] is not kv
    logits = decode_step(engine, state, np.array([53, 40, 60]), 4)
    want = recomputed(engine, layout, bundle, [fresh + [53], PROMPTS[1] + one + [40], [60]])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


# ---- the asynchronous double (tests/async_memory.py) ----

def test_async_memory_gives_the_same_logits(bundle, engine, layout):
    """Every copy lands only at sync: a missing sync before a run, a read or a free shows as other logits or an
    error here (removing the sync in OrtEngine.execute, or the one after reading the logits, fails this test)."""
    host = run(engine, engine.new_state(layout, 2), bundle, 6)
    memory = AsyncMemory()
    state = engine.new_state(layout, 2, memory=memory)
    for a, b in zip(host, run(engine, state, bundle, 6)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    state.close()
    assert not memory.violations and memory.counts.streams == 0 and memory.counts.buffers == 0


class FailingSampler:
    """A sampler engine whose bound run raises (a device fault in the chained sampler)."""

    def __init__(self, inner):
        self.inner, self.spec, self.closed = inner, inner.spec, False

    def run(self, feeds):
        return self.inner.run(feeds)

    def bind(self, *args, **kwargs):
        return self.inner.bind(*args, **kwargs)

    def execute(self, binding):
        raise EngineError(f"{self.spec.path.name}: run failed (injected)")

    def unbind(self, binding):
        self.inner.unbind(binding)

    def release(self, stream):
        pass


def test_a_failing_chained_sampler_frees_nothing_in_flight(bundle, engine, layout):
    """Bug 2 of issue 20: the sampler raises after the step queued its K/V copies; the state syncs before it
    raises and before it frees, so closing it (as the generation does) frees no buffer with copies in flight."""
    from emu3_rt.graph_sampler import GraphSampler

    memory = AsyncMemory()
    sampler = FailingSampler(OrtEngine(bundle.sampler))
    graph = GraphSampler(sampler, cfg_scale=None, grid=None, temperature=1.0, top_k=0, top_p=1.0, greedy=True)
    state = engine.new_state(layout, 2, memory=memory)
    prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    with pytest.raises(EngineError, match="injected"):
        decode_step(engine, state, np.array([1, 2]), 0, (sampler, graph.feeds(0, 2)))
    assert memory.pending() == 0
    state.close()
    assert not memory.violations and memory.counts.buffers == 0


def test_the_async_double_catches_a_free_in_flight():
    memory = AsyncMemory()
    stream, buf = memory.stream(), memory.alloc((4,), "int64")
    src = np.arange(4, dtype=np.int64)
    memory.copy2d(buf.ptr, 32, src.ctypes.data, 32, 32, 1, stream)
    assert not memory.host_view(buf).any()          # not landed yet
    with pytest.raises(UseAfterFree):
        memory.free(buf)
    memory.sync(stream)
    assert memory.host_view(buf).tolist() == [0, 1, 2, 3]
    memory.free(buf)


# ---- the sampler graph chained onto the step ----

def image_tokens(monkeypatch, picker: str, cfg_scale: float, sampling) -> tuple[np.ndarray, list]:
    """A 3x3 image on the tiny bundle's visual route: (its (1, 15) ids, the decode states made). picker "chained":
    the sampler graph run by the state (step_and_pick); "graph-on-logits": GraphSampler.pick on the state's
    logits (step); "numpy": the reference ChainPicker."""
    states, real_state, real_picker = [], OrtEngine.new_state, Emu3._picker

    def new_state(self, *args, **kwargs):
        states.append(real_state(self, *args, **kwargs))
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
    """CFG (or none) with the visual grid, greedy or seeded top-k sampling: the ids the chained sampler graph picks
    are GraphSampler.pick's on the state's logits and the numpy chain's."""
    sampling = emu3_rt.SamplingOptions(greedy=True) if greedy else emu3_rt.SamplingOptions(top_k=40)
    runs = {}
    for picker in ("chained", "graph-on-logits", "numpy"):
        with monkeypatch.context() as m:
            runs[picker], _ = image_tokens(m, picker, cfg_scale, sampling)
    want = runs["numpy"]
    assert want.shape == (1, 3 * 4 + 3)
    for key, tokens in runs.items():
        np.testing.assert_array_equal(tokens, want, err_msg=key)


def test_chained_traffic_is_ids_and_small_feeds(monkeypatch):
    """A CFG image step, chained: the state sends ids, positions, two mask columns (R,) int64 each and the
    sampler's feeds that changed since the last step (kinds and uniforms (B,) 8 bytes each; the six scalars, 34
    bytes, only on the first chained step), and takes back (B,) int64 ids; neither the (R, V) logits nor the K/V."""
    [state] = image_tokens(monkeypatch, "chained", 3.0, emu3_rt.SamplingOptions(top_k=40))[1]
    rows, seqs = 2, 1
    columns = load_bundle(TINY_BUNDLE).image_decoder.output("logits").dims[1]
    layout = KVLayout.from_bundle(load_bundle(TINY_BUNDLE))
    kv = len(layout.past_names) * rows * layout.kv_heads * state.capacity * layout.head_size * 4
    t = state.traffic
    # one prefill chunk, then a step per visual token after the first: the grid's forced EOL, EOF, EOI and EOS run
    # no model of their own (an EOL rides with the next row's first step; generate.py)
    assert t.calls == 1 + (3 * 3 - 1)
    # the last step's kinds equal the step before's (both visual positions): only its uniforms are sent
    assert (t.last_h2d, t.last_d2h) == (4 * rows * 8 + 8 * seqs, 8 * seqs)
    assert t.last_d2h < rows * columns * 4 and t.last_h2d < kv


def test_a_closed_sampler_is_refused_before_the_step(bundle, engine, layout):
    state = engine.new_state(layout, 2)
    prefill(engine, state, make_batch(PROMPTS, None, bundle.tokens.pad), 4)
    sampler = OrtEngine(bundle.sampler)
    sampler.close()
    with pytest.raises(EngineError, match="engine is closed"):
        decode_step(engine, state, np.array([1, 2]), 0, (sampler, {}))
    assert state.length == 6


# ---- CUDA graph ids (bug 7 of issue 20) ----

def test_graph_ids_are_reused_per_signature_and_freed_with_the_state(bundle, layout):
    """Under cuda_graph, one-token bindings take a graph id per binding signature (names, addresses, shapes): a
    state made after another closed lands on the same reused blocks and replays its graph id; states alive at
    once hold distinct ids; closing returns them. (The CPU runs the bookkeeping; the capture needs CUDA.)"""
    ids = GraphIds()
    a, b = ids.take(("x", 1)), ids.take(("x", 1))
    assert a != b and ids.in_use == 2
    ids.give(a)
    assert ids.take(("x", 1)) == a and ids.take(("y", 1)) == 3 and ids.made == 3

    options = OrtOptions()
    object.__setattr__(options, "cuda_graph", True)   # the CUDA option, on the CPU session (its EP ignores ids)
    engine = OrtEngine(bundle.decoder, options)
    engine._memory = HostMemory(reuse=True)           # what CudaMemory(reuse=True) does under cuda_graph
    made = []
    for _ in range(6):                                 # sequential generations: the same few graphs, replayed
        state = engine.new_state(layout, 2)
        run(engine, state, bundle, 3)
        state.close()
        made.append(engine._graph_ids.made)
    assert made[1] <= 2 and made[-1] == made[1] and engine._graph_ids.in_use == 0
    live = [engine.new_state(layout, 2) for _ in range(3)]   # concurrent: one each
    for state in live:
        run(engine, state, bundle, 2)
    assert engine._graph_ids.in_use == 3 and engine._graph_ids.made <= made[-1] + 3
    for state in live:
        state.close()
    assert engine._graph_ids.in_use == 0


def test_states_stepped_from_two_threads(bundle, engine, layout):
    """The serve batcher steps generations concurrently: two states on one engine, stepped by two threads, give
    what each gives alone."""
    want = run(engine, engine.new_state(layout, 2), bundle, 12)
    got = in_threads(2, lambda i: run(engine, engine.new_state(layout, 2), bundle, 12))
    for i in range(2):
        for a, b in zip(want, got[i]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


class OverlapProbe:
    """A session stand-in that forwards to the real one and records whether two runs ever overlapped."""

    def __init__(self, session):
        self.session, self.active, self.overlapped = session, 0, False
        self._lock = threading.Lock()

    def io_binding(self):
        return self.session.io_binding()

    def run_with_iobinding(self, binding, options=None):
        import time

        with self._lock:
            self.active += 1
            self.overlapped |= self.active > 1
        try:
            time.sleep(0.002)   # widens the window two unserialized threads would meet in
            return self.session.run_with_iobinding(binding, options)
        finally:
            with self._lock:
                self.active -= 1


def test_a_graph_capturing_session_runs_one_step_at_a_time(bundle, layout):
    """Bug 7 of issue 20: onnxruntime runs a session that captures CUDA graphs one Run at a time; states stepped
    from several threads (the serve batcher) take turns, and get what they get alone."""
    options = OrtOptions()
    object.__setattr__(options, "cuda_graph", True)
    engine = OrtEngine(bundle.decoder, options)
    want = run(engine, engine.new_state(layout, 2), bundle, 6)
    probe = OverlapProbe(engine.session)
    engine._session = probe
    got = in_threads(3, lambda i: run(engine, engine.new_state(layout, 2), bundle, 6))
    assert not probe.overlapped
    for i in range(3):
        for a, b in zip(want, got[i]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
