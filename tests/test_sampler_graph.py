"""The sampler graph (export/sampler_graph.py) run by onnxruntime CPU against the numpy chain (emu3_rt.sampling):
hand-picked edge cases, hypothesis properties on small vocabularies, and the measured mismatch rate of sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from emu3_rt.bundle import GraphSpec, TensorSpec
from emu3_rt.engines.ort import OrtEngine, OrtOptions
from emu3_rt.graph_sampler import GraphSampler
from emu3_rt.sampling import DecodeState, Greedy, Sample, VisualGridConstraint, apply_chain, build_chain

# building the graphs needs onnx (the export extra): the quick loop (-m "not export") deselects this module, and
# without onnx it is skipped at collection instead of failing it
pytest.importorskip("onnx")
from export.sampler_graph import column_kinds, sampler_io, write_sampler_graph  # noqa: E402

pytestmark = pytest.mark.export

NEG, INF, NAN = -np.inf, np.inf, np.nan
# the layout of test_sampling.py: pad 0, eof 1, eoi 2, eos 3, visual ids 4..V-2, eol V-1
SPECIALS = dict(pad=0, eof=1, eoi=2, eos=3)
VOCABS = (6, 12, 40)


def layout(v: int) -> dict:
    return dict(visual_ids=np.arange(4, v - 1), eol=v - 1, **SPECIALS)


class FixedKinds(VisualGridConstraint):
    """The numpy grid filter with given kinds per row; rows of kind -1 pass untouched (no grid for them)."""

    def __init__(self, kinds, v: int):
        super().__init__(heights=np.ones(len(kinds)), widths=np.ones(len(kinds)), vocab_size=v, **layout(v))
        self.fixed = np.asarray(kinds, dtype=np.int64)

    def kinds(self, step: int) -> np.ndarray:
        return self.fixed

    def __call__(self, logits, state):
        out, on = logits.copy(), self.fixed >= 0
        if on.any():
            out[on] = VisualGridConstraint.__call__(FixedKinds(self.fixed[on], logits.shape[1]), logits[on], state)
        return out


class _Fixed:
    def __init__(self, x: float):
        self.x = x

    def random(self):
        return self.x


def Uniforms(u) -> list:  # noqa: N802 -- reads as the rng it stands in for
    """Per-row rng stand-ins handing out given uniforms, so numpy's Sample and the graph see the same draws."""
    return [_Fixed(float(x)) for x in np.asarray(u, dtype=np.float64).reshape(-1)]


def engine(path, vocab: int, positions=False) -> OrtEngine:
    """The graph's engine, declared as write_bundle declares it (the logits width fixed by the graph's table)."""
    io = sampler_io(positions)
    spec = GraphSpec(path, *(tuple(TensorSpec(t["name"], t["dtype"], tuple(vocab if d == "vocab" else d
                                                                            for d in t["dims"])) for t in io[side])
                             for side in ("inputs", "outputs")))
    return OrtEngine(spec, OrtOptions(threads=1))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampler")
    return {v: engine(write_sampler_graph(d / f"sampler_{v}.onnx", column_kinds(v, **layout(v))), v) for v in VOCABS}


def numpy_choose(logits, kinds, *, cfg_scale, temperature=1.0, top_k=0, top_p=1.0, greedy, uniforms=None):
    """The reference: build_chain + Greedy / Sample; ValueError where the chain raises."""
    v = logits.shape[1]
    grid = None if (np.asarray(kinds) < 0).all() else FixedKinds(kinds, v)
    chain = build_chain(cfg_scale=cfg_scale, grid=grid, temperature=temperature, top_k=top_k, top_p=top_p,
                        greedy=greedy)
    with np.errstate(all="ignore"):
        scores = apply_chain(chain, logits, DecodeState(np.zeros((len(kinds), 0), dtype=np.int64)))
        return scores, (Greedy() if greedy else Sample(Uniforms(uniforms)))(scores)


def graph_choose(eng, logits, kinds, *, cfg_scale, temperature=1.0, top_k=0, top_p=1.0, greedy, uniforms=None):
    grid = FixedKinds(kinds, logits.shape[1])
    sampler = GraphSampler(eng, cfg_scale=cfg_scale, grid=grid, temperature=temperature, top_k=top_k,
                           top_p=top_p, greedy=greedy, rng=None if greedy else Uniforms(uniforms))
    return sampler(logits, 0)


def f32(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


# ---- hand-picked edge cases: ids must be equal ----

V12 = 12
CASES = {  # name: (logits (R, 12), kinds (B,), chain parameters)
    "ties lowest id": (f32([0, 0, 0, 0, 3, 3, 1, 3, 0, 0, 0, 0]), [0], dict(cfg_scale=None)),
    "nan and -inf": (f32([NAN, 0, 0, 0, NAN, NEG, 2, NAN, 2, 1, 0, 0]), [0], dict(cfg_scale=None)),
    "no grid nan +inf": (f32([NAN, INF, 0, INF, NAN, NEG, 2, NAN, 2, 1, 0, 0]), [-1], dict(cfg_scale=None)),
    "all allowed -inf": (f32([9, 9, 9, 9, NEG, NEG, NEG, NEG, NEG, NEG, 9, 9]), [0], dict(cfg_scale=None)),
    "all allowed nan": (f32([9] * 4 + [NAN] * 6 + [9, 9]), [0], dict(cfg_scale=None)),
    "eol row": (f32(list(range(12))), [1], dict(cfg_scale=None)),
    "huge and tiny": (f32([3e38, 0, 0, 0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1e-38, 0, 0, 0]), [0],
                      dict(cfg_scale=None)),
    "cfg 3 two rows": (np.random.default_rng(1).normal(0, 3, (4, 12)).astype(np.float32), [0, -1],
                       dict(cfg_scale=3.0)),
    "cfg extreme": (f32([3e38, -3e38, -3e38, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                        [-3e38, 3e38, -3e38, 8, 7, 6, 5, 4, 3, 2, 1, 0]), [-1], dict(cfg_scale=3.0)),
    "cfg scale 1e300": (np.random.default_rng(3).normal(0, 3, (2, 12)).astype(np.float32), [0],
                        dict(cfg_scale=1e300)),
    "cfg 0.5 disjoint": (f32([0, NEG, 0, 0, 5, NEG, 1, 2, 3, 4, 0, 0], [NEG, 0, 0, 0, NEG, 5, 1, 2, 3, 4, 0, 0]),
                         [0], dict(cfg_scale=0.5)),
    "cfg nan row": (f32([NAN] + [0] * 11, list(range(12))), [-1], dict(cfg_scale=2.0)),
    "cfg scale 0": (f32(list(range(12)), list(range(12))[::-1]), [0], dict(cfg_scale=0.0)),
    "kinds differ": (np.random.default_rng(2).normal(0, 1, (6, 12)).astype(np.float32), [0, 4, -1, 5, 2, 3],
                     dict(cfg_scale=None)),
}
SAMPLING = {
    "top-k > V": dict(top_k=100), "top-k 1 ties": dict(top_k=1), "top-k 3": dict(top_k=3),
    "top-p 1": dict(top_p=1.0), "top-p tiny": dict(top_p=1e-9), "top-p 0.5 k 4 t 0.7": dict(top_p=0.5, top_k=4,
                                                                                        temperature=0.7),
    "temperature 100": dict(temperature=100.0), "temperature 1e-3": dict(temperature=1e-3),
    "temperature 1e-45": dict(temperature=1e-45), "temperature 1e300": dict(temperature=1e300, top_k=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("params", [{"greedy": True}] + [dict(greedy=False, **p) for p in SAMPLING.values()],
                         ids=["greedy"] + list(SAMPLING))
def test_edge_cases_equal_the_numpy_chain(engines, case, params):
    logits, kinds, chain = CASES[case]
    b = len(kinds)
    for u in (np.zeros(b), np.full(b, 0.5), np.full(b, np.nextafter(1, 0)), np.linspace(0.1, 0.9, b)):
        kw = dict(chain, **params, uniforms=u)
        try:
            _, want = numpy_choose(logits, kinds, **kw)
        except ValueError as e:
            with pytest.raises(ValueError, match=str(e)):
                graph_choose(engines[V12], logits, kinds, **kw)
            continue
        got = graph_choose(engines[V12], logits, kinds, **kw)
        assert got.ids.tolist() == want.tolist(), (case, kw)


def test_logprobs_are_the_processed_distribution(engines):
    logits = np.log(f32([0.1, 0.2, 0.3, 0.4] + [1e-30] * 8)) + 5
    got = graph_choose(engines[V12], logits, [-1], cfg_scale=None, greedy=True)
    assert got.ids.tolist() == [3] and np.isclose(got.logprobs[0], np.log(0.4), atol=1e-6)
    # sampling after top-k 2: the kept ids 2, 3 share the mass 3:4
    for u, (i, p) in ((0.1, (2, 3 / 7)), (0.9, (3, 4 / 7))):
        got = graph_choose(engines[V12], logits, [-1], cfg_scale=None, top_k=2, greedy=False, uniforms=[u])
        assert got.ids.tolist() == [i] and np.isclose(got.logprobs[0], np.log(p), atol=1e-6)
    inf = graph_choose(engines[V12], f32([INF, 0, INF] + [0] * 9), [-1], cfg_scale=None, greedy=True)
    assert inf.ids.tolist() == [0] and np.isclose(inf.logprobs[0], np.log(0.5))


# ---- properties on small vocabularies ----

tie_prone = st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 7.0, NEG]) | st.floats(-30, 30, width=32)
any_f32 = st.floats(allow_nan=True, allow_infinity=True, width=32)


def explained(logits, kinds, kw, want, got) -> bool:
    """A documented fp32 boundary: CFG's guided scores (onnxruntime's exp/log vs numpy's) with two different
    inputs within 1e-5 of each other, or a top-p cumulative probability within 1e-6 of 1 - p."""
    b = len(kinds)
    if kw["cfg_scale"] not in (None, 1.0):
        from emu3_rt.sampling import ClassifierFreeGuidance
        with np.errstate(all="ignore"):
            g = ClassifierFreeGuidance(kw["cfg_scale"])(logits, DecodeState(np.zeros((b, 0))))
        pairs = np.stack([logits[:b], logits[b:]], axis=-1)
        for r in range(b):
            fin = np.flatnonzero(np.isfinite(g[r]))
            for i in fin:
                for j in fin:
                    differ = not np.array_equal(pairs[r, i], pairs[r, j], equal_nan=True)
                    if i < j and differ and abs(g[r, i] - g[r, j]) <= 1e-5 * max(1.0, abs(g[r, i])):
                        return True
    if not kw["greedy"] and kw["top_p"] < 1:
        pre = dict(kw, top_p=1.0)
        scores, _ = numpy_choose(logits, kinds, **pre)
        with np.errstate(all="ignore"):
            s = np.sort(scores, axis=-1)
            e = np.exp(s - s[:, -1:])
            cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
        return bool((np.abs(cum - (1 - kw["top_p"])) < 1e-6).any())
    return False


@settings(max_examples=600, deadline=None)
@given(data=st.data(), v=st.sampled_from(VOCABS), b=st.integers(1, 3), guided=st.booleans(),
       scale=st.sampled_from([0.0, 0.5, 1.0, 3.0]) | st.floats(0, 20), greedy=st.booleans(),
       temperature=st.sampled_from([1.0, 0.5, 2.0]) | st.floats(0.01, 50), top_k=st.integers(0, 45),
       top_p=st.sampled_from([1.0, 1e-7, 0.5, 0.9]) | st.floats(1e-6, 1.0))
def test_graph_equals_numpy_chain(engines, data, v, b, guided, scale, greedy, temperature, top_k, top_p):
    rows = 2 * b if guided else b
    logits = data.draw(arrays(np.float32, (rows, v), elements=tie_prone | any_f32))
    kinds = data.draw(st.lists(st.integers(-1, 5), min_size=b, max_size=b))
    u = np.array(data.draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=b, max_size=b)))
    kw = dict(cfg_scale=scale if guided else None, temperature=temperature, top_k=top_k, top_p=top_p,
              greedy=greedy, uniforms=u)
    if guided and scale == 1.0:
        return  # build_chain has no CFG filter for scale 1: the rows would not be paired
    try:
        _, want = numpy_choose(logits, kinds, **kw)
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)):
            graph_choose(engines[v], logits, kinds, **kw)
        return
    got = graph_choose(engines[v], logits, kinds, **kw)
    assert got.ids.tolist() == want.tolist() or explained(logits, kinds, kw, want, got.ids), kw
    assert np.all(got.logprobs <= 1e-6) and not np.isnan(got.logprobs).any()


# ---- the measured mismatch rate, realistic widths ----

@pytest.mark.parametrize("params", [dict(greedy=True), dict(greedy=False, top_k=256),
                                    dict(greedy=False, top_k=256, top_p=0.9)], ids=["greedy", "top-k", "top-p"])
def test_mismatch_rate_on_random_logits(tmp_path, params):
    """CFG 3 -> grid (VISUAL: 1/4 of the ids) -> chain, 8000 draws: at most 1 in 10^4 may differ (measured: 0)."""
    v, b, calls = 4096, 500, 16
    lay = dict(visual_ids=np.arange(3072, v), eol=5, eof=1, eoi=2, eos=3, pad=0)
    eng = engine(write_sampler_graph(tmp_path / "s.onnx", column_kinds(v, **lay)), v)
    rng = np.random.default_rng(7)
    differ = 0
    for _ in range(calls):
        logits = (rng.normal(0, 4, (2 * b, v)) + rng.normal(0, 2, (1, v))).astype(np.float32)
        u = rng.random(b)
        kw = dict(cfg_scale=3.0, greedy=params["greedy"], top_k=params.get("top_k", 0),
                  top_p=params.get("top_p", 1.0), uniforms=u)
        grid = VisualGridConstraint(heights=np.ones(b), widths=np.full(b, 4), vocab_size=v, **lay)
        chain = build_chain(cfg_scale=3.0, grid=grid, temperature=1.0, top_k=kw["top_k"], top_p=kw["top_p"],
                            greedy=kw["greedy"])
        scores = apply_chain(chain, logits, DecodeState(np.zeros((b, 0), dtype=np.int64)))
        want = Greedy()(scores) if kw["greedy"] else Sample(Uniforms(u))(scores)
        sampler = GraphSampler(eng, cfg_scale=3.0, grid=grid, temperature=1.0, top_k=kw["top_k"],
                               top_p=kw["top_p"], greedy=kw["greedy"], rng=Uniforms(u))
        differ += int((sampler(logits, 0).ids != want).sum())
    assert differ <= b * calls // 10_000, f"{differ} of {b * calls} ids differ"


# ---- S positions per row (speculative decoding's shape) ----

def test_positions_variant_equals_per_position_rows(tmp_path):
    v, b, s = 12, 2, 3
    eng = engine(write_sampler_graph(tmp_path / "p.onnx", column_kinds(v, **layout(v)), positions=True), v, True)
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (2 * b, s, v)).astype(np.float32)
    kinds, u = np.array([[0, 1, -1], [4, 0, 0]]), rng.random((b, s))
    out = eng.run({"logits": logits, "cfg_scale": np.array(3.0), "guided": np.array(True), "kinds": kinds,
                   "temperature": np.array(1.0), "top_k": np.array(3), "top_p": np.array(0.9),
                   "greedy": np.array(False), "uniforms": u})
    assert out["ids"].shape == (b, s) and out["logprobs"].shape == (b, s)
    for j in range(s):
        _, want = numpy_choose(logits[:, j], kinds[:, j], cfg_scale=3.0, top_k=3, top_p=0.9, greedy=False,
                               uniforms=u[:, j])
        assert out["ids"][:, j].tolist() == want.tolist()


# ---- building and validation ----

def test_build_is_deterministic(tmp_path):
    kinds = column_kinds(40, **layout(40))
    a = write_sampler_graph(tmp_path / "a.onnx", kinds).read_bytes()
    assert a == write_sampler_graph(tmp_path / "b.onnx", kinds).read_bytes()


@pytest.mark.parametrize("kw, message", [
    (dict(visual_ids=[4, 5], eol=5, eof=1, eoi=2, eos=3, pad=0), "shares column 5"),
    (dict(visual_ids=[4, 12], eol=11, eof=1, eoi=2, eos=3, pad=0), r"must be columns in \[0, 12\)"),
])
def test_column_kinds_rejects_bad_layouts(kw, message):
    with pytest.raises(ValueError, match=message):
        column_kinds(12, **kw)


def test_graph_sampler_validation(engines):
    eng = engines[V12]
    with pytest.raises(ValueError, match="rng is required"):
        GraphSampler(eng, cfg_scale=None, grid=None, temperature=1.0, top_k=0, top_p=1.0, greedy=False)
    with pytest.raises(ValueError, match="top_p must be in"):
        GraphSampler(eng, cfg_scale=None, grid=None, temperature=1.0, top_k=0, top_p=0.0, greedy=False,
                     rng=np.random.default_rng(0))
    cfg = GraphSampler(eng, cfg_scale=3.0, grid=None, temperature=1.0, top_k=0, top_p=1.0, greedy=True)
    with pytest.raises(ValueError, match="2B rows under CFG"):
        cfg(np.zeros((3, V12), np.float32), 0)


def test_graph_sampler_draws_like_sample(engines):
    """One rng.random(B) per step, as Sample: the same seed gives the same ids through a whole walk."""
    v, b = V12, 2
    grid = VisualGridConstraint(heights=np.array([2, 3]), widths=np.array([3, 2]), vocab_size=v, **layout(v))
    logits = np.random.default_rng(4).normal(0, 2, (20, b, v)).astype(np.float32)
    kw = dict(cfg_scale=None, grid=grid, temperature=0.8, top_k=4, top_p=0.95, greedy=False)
    graph = GraphSampler(engines[v], rng=np.random.default_rng(9), **kw)
    chain, sample = build_chain(**kw), Sample(np.random.default_rng(9))
    tokens = np.zeros((b, 0), dtype=np.int64)
    for step, x in enumerate(logits):
        want = sample(apply_chain(chain, x, DecodeState(tokens)))
        assert graph(x, step).ids.tolist() == want.tolist()
        tokens = np.concatenate([tokens, want[:, None]], axis=1)
