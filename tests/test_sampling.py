"""The filter chain on small hand-checked vectors, against Transformers' processors, and as properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
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
    log_softmax,
)

NEG = -np.inf
S0 = DecodeState(np.zeros((1, 0), dtype=np.int64))


def state(n: int, rows: int = 1) -> DecodeState:
    return DecodeState(np.zeros((rows, n), dtype=np.int64))


# vocabulary of 12: visual ids 4..9, specials below
VOCAB, VISUAL = 12, np.arange(4, 10)
EOL, EOF, EOI, EOS, PAD = 10, 1, 2, 3, 0


def grid(h, w):
    return VisualGridConstraint(heights=np.atleast_1d(h), widths=np.atleast_1d(w), visual_ids=VISUAL, eol=EOL,
                                eof=EOF, eoi=EOI, eos=EOS, pad=PAD, vocab_size=VOCAB)


# ---- hand-checked ----

def test_topk_keeps_ties_at_threshold():
    x = np.array([[1.0, 3.0, 2.0, 3.0, 0.5]], dtype=np.float32)
    assert TopK(2)(x, S0).tolist() == [[NEG, 3.0, NEG, 3.0, NEG]]
    assert TopK(3)(x, S0).tolist() == [[NEG, 3.0, 2.0, 3.0, NEG]]
    assert np.array_equal(TopK(100)(x, S0), x)


def test_topp_keeps_smallest_nucleus():
    p = np.array([[0.5, 0.3, 0.15, 0.05]])
    x = np.log(p).astype(np.float32)
    kept = np.isfinite(TopP(0.8)(x, S0))
    assert kept.tolist() == [[True, True, False, False]]
    assert np.isfinite(TopP(0.81)(x, S0)).sum() == 3
    assert np.isfinite(TopP(0.01)(x, S0)).sum() == 1


def test_temperature_and_cfg_formula():
    x = np.array([[2.0, 0.0, -2.0]], dtype=np.float32)
    assert np.allclose(Temperature(2.0)(x, S0), [[1.0, 0.0, -1.0]])
    cond, uncond = np.array([[3.0, 1.0, 0.0]]), np.array([[0.0, 2.0, 1.0]])
    out = ClassifierFreeGuidance(3.0)(np.concatenate([cond, uncond]).astype(np.float32), S0)
    c, u = log_softmax(cond), log_softmax(uncond)
    assert np.allclose(out, 3.0 * (c - u) + u, atol=1e-6)
    assert np.allclose(ClassifierFreeGuidance(1.0)(np.concatenate([cond, uncond]).astype(np.float32), S0), c)


def test_grid_walk_per_row_sizes():
    """Two rows with different grids, walked greedily through a whole image."""
    g = grid([2, 3], [3, 1])
    tokens = np.zeros((2, 0), dtype=np.int64)
    for _ in range(20):
        scores = g(np.zeros((2, VOCAB), dtype=np.float32), DecodeState(tokens))
        tokens = np.concatenate([tokens, Greedy()(scores)[:, None]], axis=1)
    for row, (h, w) in enumerate([(2, 3), (3, 1)]):
        seq = tokens[row].tolist()
        n = h * (w + 1)
        for j in range(n):
            assert (seq[j] == EOL) == ((j + 1) % (w + 1) == 0)
            assert seq[j] in VISUAL or seq[j] == EOL
        # then EOF, EOI, EOS and PAD, except where the EOL rule fires first (Transformers' order): with w = 1
        # the EOI slot is even, so Transformers' own rule emits EOL there
        tail = [EOF, EOI, EOS] + [PAD] * (20 - n - 3)
        assert seq[n:] == [EOL if (j + 1) % (w + 1) == 0 else t for j, t in zip(range(n, 20), tail)]
    assert tokens[1, 3 * 2 + 1] == EOL


def test_chain_order_and_validation():
    chain = build_chain(cfg_scale=3.0, grid=grid(1, 1), temperature=0.7, top_k=5, top_p=0.9, greedy=False)
    assert [type(f).__name__ for f in chain] == ["ClassifierFreeGuidance", "VisualGridConstraint", "Temperature",
                                                 "TopK", "TopP"]
    assert [type(f).__name__ for f in build_chain(cfg_scale=1.0, grid=None, temperature=0.7, top_k=5, top_p=0.9,
                                                  greedy=True)] == []
    for bad in (lambda: TopK(0), lambda: TopP(0.0), lambda: TopP(1.5), lambda: Temperature(0),
                lambda: Temperature(float("nan")), lambda: ClassifierFreeGuidance(-1), lambda: ClassifierFreeGuidance(
                    float("inf"))):
        with pytest.raises(ValueError):
            bad()


def test_selectors_reject_rows_with_nothing_allowed():
    x = np.array([[NEG, NEG], [np.nan, NEG]])
    for sel in (Greedy(), Sample(np.random.default_rng(0))):
        with pytest.raises(ValueError, match="no token is allowed in row 0"):
            sel(x)


def test_sample_is_seeded():
    x = np.zeros((4, 50), dtype=np.float32)
    a = [Sample(np.random.default_rng(1))(x).tolist() for _ in range(2)]
    b = Sample(np.random.default_rng(2))(x).tolist()
    assert a[0] == a[1] and a[0] != b


def test_sample_follows_the_distribution():
    x = np.array([[np.log(0.7), np.log(0.2), np.log(0.1), NEG]], dtype=np.float32)
    draws = np.concatenate([Sample(np.random.default_rng(s))(np.repeat(x, 500, 0)) for s in range(4)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert abs(freq[0] - 0.7) < 0.03 and abs(freq[2] - 0.1) < 0.03 and freq[3] == 0


# ---- properties ----

logit_values = st.floats(allow_nan=True, allow_infinity=True, width=32)
logit_rows = arrays(np.float32, (2, VOCAB), elements=logit_values)


@settings(max_examples=300, deadline=None)
@given(logits=logit_rows, h=st.integers(1, 4), w=st.integers(1, 4), step=st.integers(0, 30), seed=st.integers(0, 99))
def test_grid_never_allows_a_wrong_token(logits, h, w, step, seed):
    g = grid([h, h], [w, w])
    out = g(logits, state(step, rows=2))
    allowed = g.table[g.kinds(step)]
    assert not np.isnan(out).any()
    assert (out[~allowed] == NEG).all()
    usable = allowed & ~np.isnan(logits) & (logits > NEG)
    for sel in (Greedy(), Sample(np.random.default_rng(seed))):
        if usable.any(axis=1).all():
            ids = sel(out)
            assert allowed[np.arange(2), ids].all() and usable[np.arange(2), ids].all()
        else:
            with pytest.raises(ValueError):
                sel(out)


@settings(max_examples=300, deadline=None)
@given(logits=arrays(np.float32, (4, 6), elements=st.floats(-2.0**126, 2.0**126, width=32)),
       scale=st.floats(0, 100))
def test_cfg_never_nan_or_positive_inf(logits, scale):
    out = ClassifierFreeGuidance(scale)(logits, S0)
    assert out.shape == (2, 6)
    assert not np.isnan(out).any() and not np.isposinf(out).any()
    assert np.isfinite(out).any(axis=1).all()


@settings(max_examples=200, deadline=None)
@given(logits=arrays(np.float32, (3, 9), elements=st.floats(-50, 50, width=32)), k=st.integers(1, 12),
       p=st.floats(0.01, 1.0), seed=st.integers(0, 99))
def test_sampler_returns_a_kept_token(logits, k, p, seed):
    scores = apply_chain([TopK(k), TopP(p)], logits, S0)
    ids = Sample(np.random.default_rng(seed))(scores)
    assert np.isfinite(scores[np.arange(3), ids]).all()


# ---- against Transformers ----

@pytest.mark.export
@settings(max_examples=100, deadline=None)
@given(logits=arrays(np.float32, (3, 17), elements=st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 2.0, 7.0])
                     | st.floats(-20, 20, width=32)), k=st.integers(1, 20))
def test_topk_equals_transformers_with_ties(logits, k):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper

    ref = TopKLogitsWarper(top_k=k)(None, torch.from_numpy(logits.copy())).numpy()
    assert np.array_equal(TopK(k)(logits, S0), ref)


@pytest.mark.export
@settings(max_examples=100, deadline=None)
@given(logits=arrays(np.float32, (3, 17), elements=st.floats(-20, 20, width=32), unique=True),
       p=st.floats(0.05, 0.99))
def test_topp_equals_transformers(logits, p):
    """Distinct logits: with ties, which tied token torch's sort puts first is unspecified."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopPLogitsWarper

    ref = TopPLogitsWarper(top_p=p)(None, torch.from_numpy(logits.copy())).numpy()
    assert np.array_equal(TopP(p)(logits, S0), ref)


@pytest.mark.export
def test_cfg_equals_transformers_processor():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(0, 5, (2, 30)).astype(np.float32), rng.normal(0, 5, (2, 30)).astype(np.float32)

    class Fake:  # the processor calls model(...).logits for the unconditional stream
        def __call__(self, *a, **k):
            from transformers.modeling_outputs import CausalLMOutputWithPast

            return CausalLMOutputWithPast(logits=torch.from_numpy(uncond)[:, None, :])

    proc = UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, Fake(), unconditional_ids=torch.zeros(2, 1).long())
    ref = proc(torch.zeros(2, 1).long(), torch.from_numpy(cond)).numpy()  # uses logits[:, -1]
    ours = ClassifierFreeGuidance(3.0)(np.concatenate([cond, uncond]), S0)
    assert np.allclose(ours, ref, atol=1e-5, rtol=1e-6)
