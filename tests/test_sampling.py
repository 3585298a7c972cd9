"""The filter chain: hand-checked small vectors, properties (hypothesis), and equality with Transformers' processors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from emu3_rt.sampling import (
    ClassifierFreeGuidance,
    DecodeState,
    Greedy,
    Sample,
    Temperature,
    TopK,
    TopP,
    VisualGridConstraint,
    apply_chain,
    build_chain,
    image_token_count,
    log_softmax,
)

NEG, INF, NAN = -np.inf, np.inf, np.nan
LN2 = math.log(2)


def state(n: int = 0, rows: int = 1) -> DecodeState:
    return DecodeState(np.zeros((rows, n), dtype=np.int64))


def f32(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


# vocabulary of 12: visual ids 4..9 (sorted, a range here but not assumed), specials around them
VOCAB, VISUAL = 12, np.array([4, 5, 6, 7, 8, 9])
PAD, EOF, EOI, EOS, EOL = 0, 1, 2, 3, 10


def grid(heights, widths) -> VisualGridConstraint:
    return VisualGridConstraint(heights=np.atleast_1d(heights), widths=np.atleast_1d(widths), visual_ids=VISUAL,
                                eol=EOL, eof=EOF, eoi=EOI, eos=EOS, pad=PAD, vocab_size=VOCAB)


def expected_id_kind(j: int, h: int, w: int):
    """Transformers' rule for the j-th generated id (off = j + 1), written out independently: a set of ids."""
    off, n = j + 1, (w + 1) * h
    if off % (w + 1) == 0:
        return {EOL}
    return {n + 1: {EOF}, n + 2: {EOI}, n + 3: {EOS}}.get(off, {PAD} if off > n + 3 else set(VISUAL.tolist()))


# ---- hand-checked vectors ----

def test_log_softmax_small_rows_and_all_neg_inf_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = log_softmax(f32([0, 0, NEG, 0, 0], [NEG] * 5, [5, 3, 3, NEG, 1]))
    assert out.dtype == np.float32
    assert np.allclose(out[0], [-2 * LN2, -2 * LN2, NEG, -2 * LN2, -2 * LN2])
    assert (out[1] == NEG).all()
    lse = 5 + math.log(1 + 2 * math.exp(-2) + math.exp(-4))
    assert np.allclose(out[2], [5 - lse, 3 - lse, 3 - lse, NEG, 1 - lse], atol=1e-6)


def test_cfg_hand_checked():
    # p_cond = (1/2, 1/4, 1/4), p_uncond = (1/4, 1/2, 1/4), logits shifted by arbitrary constants
    cond, uncond = np.log([0.5, 0.25, 0.25]) + 7, np.log([0.25, 0.5, 0.25]) - 3
    logits = f32(cond, uncond)
    # scale 2: 2 log p_c - log p_u = (0, -3 ln2, -2 ln2)
    assert np.allclose(ClassifierFreeGuidance(2.0)(logits, state()), [[0, -3 * LN2, -2 * LN2]], atol=1e-6)
    assert np.allclose(ClassifierFreeGuidance(1.0)(logits, state()), [np.log([0.5, 0.25, 0.25])], atol=1e-6)
    assert np.allclose(ClassifierFreeGuidance(0.0)(logits, state()), [np.log([0.25, 0.5, 0.25])], atol=1e-6)
    # batch 2: rows 0, 1 are cond, rows 2, 3 uncond
    two = f32(cond, uncond, uncond, cond)
    out = ClassifierFreeGuidance(2.0)(two, state(rows=2))
    assert out.shape == (2, 3) and np.allclose(out[0], [0, -3 * LN2, -2 * LN2], atol=1e-6)


def test_cfg_extreme_logits_are_finite_or_neg_inf():
    # float32 x - max overflows to -inf: log-probs (0, -inf, -inf) and (-inf, 0, -inf), i.e. disjoint supports
    logits = f32([3e38, -3e38, -3e38], [-3e38, 3e38, -3e38])
    big = ClassifierFreeGuidance(3.0)(logits, state())
    assert big[0, 0] == np.finfo(np.float32).max and big[0, 1] == NEG and big[0, 2] == NEG
    small = ClassifierFreeGuidance(0.5)(logits, state())
    assert (small == NEG).all()                               # a geometric mix of disjoint supports is empty
    assert (ClassifierFreeGuidance(0.0)(logits, state()) == [[NEG, 0, NEG]]).all()


def test_temperature_hand_checked():
    x = f32([2, 0, -2, NEG, 5])
    assert Temperature(2.0)(x, state()).tolist() == [[1, 0, -1, NEG, 2.5]]
    assert Temperature(0.5)(x, state()).tolist() == [[4, 0, -4, NEG, 10]]


def test_topk_hand_checked_with_ties():
    x = f32([1, 3, 2, 3, 0.5, NEG])
    assert TopK(1)(x, state()).tolist() == [[NEG, 3, NEG, 3, NEG, NEG]]    # both tied maxima stay
    assert TopK(2)(x, state()).tolist() == [[NEG, 3, NEG, 3, NEG, NEG]]
    assert TopK(3)(x, state()).tolist() == [[NEG, 3, 2, 3, NEG, NEG]]
    assert TopK(100)(x, state()).tolist() == x.tolist()                      # k > V keeps everything


def test_topp_hand_checked():
    x = np.log(f32([0.5, 0.3, 0.15, 0.05]))
    # ascending cumulative: 0.05, 0.2, 0.5, 1.0; ids with cum <= 1 - p go
    assert np.isfinite(TopP(0.75)(x, state())).tolist() == [[True, True, False, False]]
    assert np.isfinite(TopP(0.85)(x, state())).tolist() == [[True, True, True, False]]
    assert np.isfinite(TopP(0.01)(x, state())).tolist() == [[True, False, False, False]]   # the best always stays
    assert np.array_equal(TopP(1.0)(x, state()), x)
    # ties: uniform over 4, cum 0.25, 0.5, ... (exact); p = 0.5 drops the first two in stable ascending order
    assert np.isfinite(TopP(0.5)(f32([1, 1, 1, 1]), state())).tolist() == [[False, False, True, True]]


def test_greedy_hand_checked():
    x = f32([1, 3, 3, NAN, NEG], [NAN, NEG, -5, NEG, NEG], [0, INF, 1, INF, NAN])
    assert Greedy()(x).tolist() == [1, 2, 1]                  # first max on ties; NaN is never a candidate


def test_sample_hand_checked_support():
    rng = np.random.default_rng(0)
    x = np.repeat(f32([0, INF, NAN, INF, 100], [NAN, NEG, -3, NEG, NAN]), 200, axis=0)
    ids = Sample(rng)(x).reshape(2, 200)
    assert set(ids[0].tolist()) == {1, 3}                     # +inf ids share all the mass
    assert set(ids[1].tolist()) == {2}


def test_sample_follows_the_distribution():
    x = f32(np.log([0.7, 0.2, 0.1]).tolist() + [NEG])
    draws = Sample(np.random.default_rng(3))(np.repeat(x, 4000, axis=0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert abs(freq[0] - 0.7) < 0.03 and abs(freq[2] - 0.1) < 0.02 and freq[3] == 0


def test_sample_is_seeded():
    flat = np.zeros((8, 1000), dtype=np.float32)
    a, b = (Sample(np.random.default_rng(11))(flat) for _ in range(2))
    c = Sample(np.random.default_rng(12))(flat)
    assert a.dtype == np.int64 and a.tolist() == b.tolist() and a.tolist() != c.tolist()
    sel = Sample(np.random.default_rng(11))
    assert [sel(flat).tolist() for _ in range(3)] != [a.tolist()] * 3    # the generator advances per call


def test_selectors_reject_rows_with_nothing_allowed():
    x = f32([0, 1], [NEG, NAN])
    for sel in (Greedy(), Sample(np.random.default_rng(0))):
        with pytest.raises(ValueError, match="no token is allowed in row 1"):
            sel(x)


def test_grid_kinds_hand_checked():
    g = grid(2, 3)                                            # 2 rows of 3 visual ids + EOL, then EOF EOI EOS
    kinds = [int(g.kinds(step)[0]) for step in range(15)]
    V, L, F, I, S, P = range(6)                               # noqa: E741 -- kind codes, in the table's order
    assert kinds == [V, V, V, L, V, V, V, L, F, I, S, L, P, P, P]
    assert image_token_count(2, 3) == 11


def test_grid_rule_order_eol_first():
    # Transformers checks EOL first: with w = 1 every even off is EOL, the EOI slot (off = 2h + 2) included
    g = grid(2, 1)
    assert [int(g.kinds(s)[0]) for s in range(4, 8)] == [g.EOF, g.EOL, g.EOS, g.EOL]


def test_grid_walk_two_rows_with_different_grids():
    """Per-row (h, w), greedy choices on random logits fed back through DecodeState, through a whole image."""
    shapes = [(2, 3), (3, 4)]
    g = grid([h for h, _ in shapes], [w for _, w in shapes])
    rng = np.random.default_rng(5)
    total = max(image_token_count(h, w) for h, w in shapes) + 6
    tokens = np.zeros((2, 0), dtype=np.int64)
    for _ in range(total):
        scores = g(rng.normal(size=(2, VOCAB)).astype(np.float32), DecodeState(tokens))
        tokens = np.concatenate([tokens, Greedy()(scores)[:, None]], axis=1)
    for row, (h, w) in enumerate(shapes):
        seq, n = tokens[row].tolist(), (w + 1) * h
        for j in range(n):
            assert (seq[j] == EOL) == ((j + 1) % (w + 1) == 0)
            assert seq[j] == EOL or seq[j] in VISUAL
        assert seq[n: n + 3] == [EOF, EOI, EOS] and len(seq[: n + 3]) == image_token_count(h, w)
        # after EOS: PAD, except where Transformers' EOL rule (checked first) fires
        assert seq[n + 3:] == [EOL if (j + 1) % (w + 1) == 0 else PAD for j in range(n + 3, total)]
    assert len(set(tokens[1, :4].tolist())) > 1               # the visual ids really came from the logits


def test_grid_uses_only_the_given_visual_ids():
    g = VisualGridConstraint(heights=np.array([1]), widths=np.array([4]), visual_ids=np.array([2, 5, 11]),
                             eol=0, eof=1, eoi=3, eos=4, pad=6, vocab_size=VOCAB)
    out = g(np.zeros((1, VOCAB), dtype=np.float32), state())
    assert np.flatnonzero(np.isfinite(out[0])).tolist() == [2, 5, 11]


def test_filters_do_not_modify_their_input():
    x = np.random.default_rng(0).normal(size=(2, VOCAB)).astype(np.float32)
    x[0, 3], x[1, 5] = NAN, NEG
    x.setflags(write=False)                                   # any in-place write would raise
    filters = [ClassifierFreeGuidance(3.0), grid([1, 2], [3, 3]), Temperature(0.7), TopK(3), TopP(0.5), TopP(1.0)]
    for f in filters:
        out = f(x, state(2, rows=2))
        assert out is not x and not np.shares_memory(out, x)


# ---- the chain and validation ----

def names(chain) -> list[str]:
    return [type(f).__name__ for f in chain]


def test_build_chain_order():
    kw = dict(temperature=0.7, top_k=5, top_p=0.9)
    assert names(build_chain(cfg_scale=3.0, grid=grid(1, 1), greedy=False, **kw)) == [
        "ClassifierFreeGuidance", "VisualGridConstraint", "Temperature", "TopK", "TopP"]
    assert names(build_chain(cfg_scale=3.0, grid=grid(1, 1), greedy=True, **kw)) == [
        "ClassifierFreeGuidance", "VisualGridConstraint"]
    assert names(build_chain(cfg_scale=1.0, grid=None, temperature=1.0, top_k=0, top_p=1.0, greedy=False)) == []
    assert names(build_chain(cfg_scale=None, grid=None, temperature=1.0, top_k=2048, top_p=1.0, greedy=False)) == [
        "TopK"]


def test_apply_chain_runs_in_order():
    logits = f32([2, 1, 0, 5, 0, 0, 0, 0, 0, 0, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    chain = build_chain(cfg_scale=2.0, grid=grid(1, 2), temperature=0.5, top_k=1, top_p=0.9, greedy=False)
    out = apply_chain(chain, logits, state(2))                # step 2: off 3 = w + 1 -> only EOL
    assert out.shape == (1, VOCAB) and np.flatnonzero(np.isfinite(out[0])).tolist() == [EOL]


@pytest.mark.parametrize("make, message", [
    (lambda: TopK(0), "top_k must be >= 1, got 0"),
    (lambda: TopP(0.0), "top_p must be in"),
    (lambda: TopP(1.5), "top_p must be in"),
    (lambda: TopP(float("nan")), "top_p must be in"),
    (lambda: Temperature(0), "temperature must be finite and > 0, got 0"),
    (lambda: Temperature(-1.0), "temperature"),
    (lambda: Temperature(float("inf")), "temperature"),
    (lambda: Temperature(float("nan")), "temperature"),
    (lambda: ClassifierFreeGuidance(-1.0), "cfg_scale must be finite and >= 0"),
    (lambda: ClassifierFreeGuidance(float("inf")), "cfg_scale"),
    (lambda: build_chain(cfg_scale=float("nan"), grid=None, temperature=1, top_k=1, top_p=1, greedy=True), "cfg"),
])
def test_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- properties ----

any_float32 = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=300, deadline=None)
@given(logits=arrays(np.float32, (2, VOCAB), elements=any_float32), hs=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       ws=st.tuples(st.integers(1, 5), st.integers(1, 5)), step=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_grid_never_allows_a_wrong_token(logits, hs, ws, step, seed):
    g = grid(list(hs), list(ws))
    out = g(logits, state(step, rows=2))
    allowed = np.array([[i in expected_id_kind(step, h, w) for i in range(VOCAB)] for h, w in zip(hs, ws)])
    assert not np.isnan(out).any() and (out[~allowed] == NEG).all()
    usable = allowed & (logits > NEG)                         # NaN compares False: never usable
    for r in range(2):
        if usable[r].any():   # as logits + mask, with NaN made -inf
            assert np.array_equal(out[r, usable[r]], logits[r, usable[r]])
            assert (out[r, allowed[r] & ~usable[r]] == NEG).all()
        else:                 # Transformers' fallback: the bare mask, uniform over the allowed ids
            assert (out[r, allowed[r]] == 0).all()
    for sel in (Greedy(), Sample(np.random.default_rng(seed))):
        ids = sel(out)
        rows = np.arange(2)
        assert allowed[rows, ids].all()
        has = usable.any(axis=1)
        assert usable[rows, ids][has].all()
        plus = (allowed & (logits == INF)).any(axis=1)
        assert (logits[rows, ids][plus] == INF).all()


@settings(max_examples=300, deadline=None)
@given(scores=arrays(np.float32, (3, 7), elements=any_float32), seed=st.integers(0, 2**32 - 1))
def test_selectors_pick_a_usable_id_or_raise(scores, seed):
    usable = scores > NEG
    for sel in (Greedy(), Sample(np.random.default_rng(seed))):
        if usable.any(axis=1).all():
            ids = sel(scores)
            assert ids.shape == (3,) and ids.dtype == np.int64 and usable[np.arange(3), ids].all()
        else:
            with pytest.raises(ValueError, match="no token is allowed in row"):
                sel(scores)


@settings(max_examples=300, deadline=None)
@given(logits=arrays(np.float32, (4, 6), elements=st.floats(-2.0**126, 2.0**126, width=32)), scale=st.floats(0, 100))
def test_cfg_is_finite_or_neg_inf_for_extreme_logits(logits, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ClassifierFreeGuidance(scale)(logits, state(rows=2))
    c, u = log_softmax(logits[:2]), log_softmax(logits[2:])
    assert out.shape == (2, 6) and out.dtype == np.float32
    assert not np.isnan(out).any() and not np.isposinf(out).any()
    if scale >= 1:
        assert np.isfinite(out).any(axis=1).all()             # the cond argmax (log-prob 0) stays finite
    with np.errstate(all="ignore"):
        plain = c if scale == 1 else np.float32(scale) * (c - u) + u   # scale 1: log_softmax(cond), as Transformers
    ok = np.isfinite(plain)
    assert np.array_equal(out[ok], plain[ok])                 # wherever the plain formula is finite, it is used
    assert (out[plain == NEG] == NEG).all()                   # -inf: a -inf log-prob, or a negative overflow


@settings(max_examples=200, deadline=None)
@given(logits=arrays(np.float32, (3, 9), elements=st.floats(-50, 50, width=32)), k=st.integers(1, 12),
       p=st.floats(0.01, 1.0), t=st.floats(0.05, 5), seed=st.integers(0, 2**32 - 1))
def test_sampler_returns_a_kept_token(logits, k, p, t, seed):
    scores = apply_chain([Temperature(t), TopK(k), TopP(p)], logits, state(rows=3))
    assert (np.isfinite(scores).sum(axis=1) >= 1).all()
    for sel in (Greedy(), Sample(np.random.default_rng(seed))):
        assert np.isfinite(scores[np.arange(3), sel(scores)]).all()


# ---- against Transformers (the export extra) ----

# few distinct values make ties likely; V = 16 because above 16 torch's CPU sort stops being stable on ties
tie_prone = st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 7.0, NEG]) | st.floats(-20, 20, width=32)


@pytest.mark.export
@settings(max_examples=150, deadline=None)
@given(logits=arrays(np.float32, (3, 16), elements=tie_prone), k=st.integers(1, 20))
def test_topk_equals_transformers(logits, k):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper

    ref = TopKLogitsWarper(top_k=k)(None, torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_array_equal(TopK(k)(logits, state(rows=3)), ref)


@pytest.mark.export
@settings(max_examples=150, deadline=None)
@given(logits=arrays(np.float32, (3, 16), elements=tie_prone), p=st.floats(0.01, 0.99))
def test_topp_equals_transformers(logits, p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopPLogitsWarper

    assume(np.isfinite(logits).any(axis=1).all())
    t = torch.from_numpy(logits.copy())
    # the cut compares float32 cumulative sums with 1 - p: skip cases within round-off of it, where the last
    # ulp of torch's softmax (not reproducible in numpy) decides
    cum = torch.sort(t)[0].softmax(-1).cumsum(-1).numpy()
    gap = np.abs(cum - np.float32(1 - p))
    assume(not ((gap > 0) & (gap < 1e-6)).any())
    ref = TopPLogitsWarper(top_p=p)(None, t).numpy()
    np.testing.assert_array_equal(TopP(p)(logits, state(rows=3)), ref)


@pytest.mark.export
@settings(max_examples=50, deadline=None)
@given(cond=arrays(np.float32, (2, 30), elements=st.floats(-30, 30, width=32)),
       uncond=arrays(np.float32, (2, 30), elements=st.floats(-30, 30, width=32)), scale=st.floats(0, 20))
def test_cfg_equals_the_transformers_formula(cond, uncond, scale):
    torch = pytest.importorskip("torch")
    lsm = torch.nn.functional.log_softmax
    c, u = lsm(torch.from_numpy(cond), dim=-1), lsm(torch.from_numpy(uncond), dim=-1)
    ref = (scale * (c - u) + u).numpy()
    ours = ClassifierFreeGuidance(scale)(np.concatenate([cond, uncond]), state(rows=2))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * max(1.0, scale))


@pytest.mark.export
def test_cfg_equals_the_transformers_processor():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor
    from transformers.modeling_outputs import CausalLMOutputWithPast

    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(0, 5, (2, 30)).astype(np.float32), rng.normal(0, 5, (2, 30)).astype(np.float32)

    def uncond_model(*args, **kwargs):  # the processor asks a model for the unconditional logits
        return CausalLMOutputWithPast(logits=torch.from_numpy(uncond)[:, None, :])

    proc = UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, uncond_model, unconditional_ids=torch.zeros(2, 1).long())
    ref = proc(torch.zeros(2, 1).long(), torch.from_numpy(cond)).numpy()
    ours = ClassifierFreeGuidance(3.0)(np.concatenate([cond, uncond]), state(rows=2))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.export
@settings(max_examples=100, deadline=None)
@given(logits=arrays(np.float32, (2, VOCAB), elements=st.floats(-2.0**127, 2.0**127, width=32) | st.just(NEG)),
       hs=st.tuples(st.integers(1, 3), st.integers(1, 3)), ws=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       step=st.integers(0, 30))
def test_grid_equals_transformers_prefix_processor(logits, hs, ws, step):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    wrapper = 11                                              # the prompt's last token, then `step` generated ids
    ids = torch.tensor([[5, wrapper] + [4] * step] * 2)

    def allowed(batch_id, sent):                              # Transformers' Emu3 docs example, per-row grid
        h, w = hs[batch_id], ws[batch_id]
        offset = sent.shape[0] - torch.nonzero(sent == wrapper, as_tuple=True)[0][0]
        return sorted(expected_id_kind(int(offset) - 1, h, w))

    ref = PrefixConstrainedLogitsProcessor(allowed, num_beams=1)(ids, torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_array_equal(grid(list(hs), list(ws))(logits, state(step, rows=2)), ref)
