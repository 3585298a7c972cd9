"""The logits-filter chain applied at every decode step, then one selector that picks the next ids:
CFG -> visual-grid constraint -> temperature -> top-k -> top-p -> selector (Greedy or Sample), in Transformers' order.
Filters return a new array; they never modify their input. Disallowed tokens are -inf; selectors never pick NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

NEG_INF = np.float32(-np.inf)


# ---- decode state and the filter protocol ----

@dataclass(frozen=True)
class DecodeState:
    """What a filter may look at: the ids generated so far, (B, n) int64 (n = 0 at the first step)."""

    generated: np.ndarray

    @property
    def step(self) -> int:
        return int(self.generated.shape[1])


class LogitsFilter(Protocol):
    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray: ...


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis in float32, as Transformers computes it; an all -inf row stays all -inf."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        m = np.where(np.isneginf(m), np.float32(0), m)                   # all -inf row: avoid -inf - -inf
        lse = np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
        # x = -inf must give -inf even when the whole row is -inf (there lse = -inf and x - m - lse would be NaN)
        return np.where(np.isneginf(x), NEG_INF, x - m - lse)


# ---- guidance and the visual-grid constraint ----

@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """(2B, V) logits, B cond rows then B uncond rows -> (B, V) guided log-probs, in float32:
    scale * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond), as UnbatchedClassifierFreeGuidance.
    """

    scale: float

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"cfg_scale must be finite and >= 0, got {self.scale}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        b = logits.shape[0] // 2
        c, u = log_softmax(logits[:b]), log_softmax(logits[b:])           # (B, V) each, values in [-inf, 0]
        if self.scale == 1:
            return c
        s = np.float32(min(self.scale, float(np.finfo(np.float32).max)))  # a scale past float32 (1e300) saturates
        with np.errstate(invalid="ignore", over="ignore"):
            out = s * (c - u) + u
            # NaN only comes from a -inf log-prob (extreme logits): take the limit of s*c + (1-s)*u instead
            c_ok, u_ok = c > NEG_INF, u > NEG_INF
            limit = np.select([c_ok & ~u_ok, ~c_ok & u_ok], [np.float32(np.inf if s > 1 else -np.inf), u], NEG_INF)
            out = np.where(np.isnan(out), limit, out)
        # an overflow to +inf saturates, so the result is always finite or -inf
        return np.minimum(out, np.finfo(np.float32).max)


def image_token_count(h: int, w: int) -> int:
    """Ids Emu3 generates for an h x w grid: h rows of (w visual ids + EOL), then EOF, EOI, EOS."""
    return h * (w + 1) + 3


class VisualGridConstraint:
    """Emu3's prefix constraint (Transformers' docs), vectorized, with its own grid (h, w) per batch row.

    off = generated count + 1 (the prompt ends with the image wrapper token), rules checked in this order:
    off % (w+1) == 0 -> EOL; off == (w+1)h+1 -> EOF; +2 -> EOI; +3 -> EOS; beyond -> PAD; else visual ids.
    """

    VISUAL, EOL, EOF, EOI, EOS, PAD = range(6)

    def __init__(self, *, heights: np.ndarray, widths: np.ndarray, visual_ids: np.ndarray, eol: int, eof: int,
                 eoi: int, eos: int, pad: int, vocab_size: int):
        self.heights = np.asarray(heights, dtype=np.int64).reshape(-1)   # (B,)
        self.widths = np.asarray(widths, dtype=np.int64).reshape(-1)     # (B,)
        # (6, V) allowed-id table, one row per kind: each step is then a row gather, no loop over the vocabulary
        table = np.zeros((6, vocab_size), dtype=bool)
        table[self.VISUAL, np.asarray(visual_ids, dtype=np.int64)] = True
        for kind, token in ((self.EOL, eol), (self.EOF, eof), (self.EOI, eoi), (self.EOS, eos), (self.PAD, pad)):
            table[kind, token] = True
        self.table = table
        # kind -> the one id it allows (-1: VISUAL, a choice)
        self._single = np.array([-1, eol, eof, eoi, eos, pad], dtype=np.int64)

    def kinds(self, step: int) -> np.ndarray:
        """(B,) kind code of the id generated at `step` (0-based) in each row."""
        off, w1 = step + 1, self.widths + 1
        past = off - w1 * self.heights            # 1: EOF, 2: EOI, 3: EOS, more: PAD
        # the rules by offset past the grid, then EOL over them (it is tested first); called twice a step, so
        # plain arithmetic rather than np.select (4x slower on a few rows)
        kinds = np.where(past > 0, np.minimum(past, 4) + (self.EOF - 1), self.VISUAL)
        return np.where(off % w1 == 0, self.EOL, kinds)

    def allowed(self, step: int) -> np.ndarray:
        return self.table[self.kinds(step)]                               # (B, V) bool

    def forced(self, step: int) -> np.ndarray:
        """(B,) the id each row is forced to at `step` (EOL, EOF, EOI, EOS, PAD: the chain keeps only it whatever
        the logits), -1 where the row picks a visual id."""
        return self._single[self.kinds(step)]

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        allowed = self.allowed(state.step)
        # like logits + mask(0 / -inf) on every finite input, but a NaN never survives as an allowed candidate
        out = np.where(allowed & ~np.isnan(logits), logits, NEG_INF)
        # Transformers: if every allowed id is -inf, the row becomes the bare mask (uniform over allowed ids)
        dead = ~(out > NEG_INF).any(axis=-1, keepdims=True)               # (B, 1)
        return np.where(dead, np.where(allowed, np.float32(0), NEG_INF), out)


# ---- warpers (applied only when sampling) ----

@dataclass(frozen=True)
class Temperature:
    t: float

    def __post_init__(self):
        # greedy decoding is a selector, never temperature 0
        if not (math.isfinite(self.t) and self.t > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.t}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            t = np.asarray(self.t, dtype=logits.dtype)                    # the cast itself can overflow or flush
            out = logits / t                                             # as Transformers: in the logits' dtype
            if np.isfinite(t) and t > 0 and np.array_equal(np.isfinite(out), np.isfinite(logits)):
                return out
            # t (1e-45, 1e300) or x / t left the float range: take the limit instead. Softmax and top-k ignore a
            # per-row shift, so divide x - (row's finite max) in float64: as t -> 0 the best ids stay 0 and the
            # rest go to -inf (greedy's choice); as t -> inf every finite score goes to 0 (uniform). +-inf and NaN
            # scores keep their meaning.
            x = logits.astype(np.float64)
            top = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)   # (B, 1)
            top = np.where(np.isneginf(top), 0.0, top)
            return ((x - top) / self.t).astype(logits.dtype)


@dataclass(frozen=True)
class TopK:
    """TopKLogitsWarper: -inf where a score is below the row's k-th largest (ties at the threshold stay)."""

    k: int

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.k}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        v = logits.shape[-1]
        k = min(self.k, v)
        kth = np.partition(logits, v - k, axis=-1)[..., v - k: v - k + 1]  # (B, 1)
        return np.where(logits < kth, NEG_INF, logits)


@dataclass(frozen=True)
class TopP:
    """TopPLogitsWarper: sort ascending, drop ids whose cumulative probability is <= 1 - p, keep the best one."""

    p: float

    def __post_init__(self):
        if not (0 < self.p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.p}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        if self.p == 1:
            return logits.copy()
        order = np.argsort(logits, axis=-1, kind="stable")              # (B, V) ascending; torch's order on ties
        sorted_logits = np.take_along_axis(logits, order, axis=-1).astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            e = np.exp(sorted_logits - sorted_logits[..., -1:])
            probs = e / e.sum(axis=-1, keepdims=True)
        # torch's CPU cumsum accumulates float32 in float64
        cum = np.cumsum(probs, axis=-1, dtype=np.float64).astype(np.float32)
        remove_sorted = cum <= np.float32(1 - self.p)
        remove_sorted[..., -1] = False                                   # min_tokens_to_keep = 1
        remove = np.empty_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, NEG_INF, logits)


# ---- selectors: (B, V) scores -> (B,) int64 ids ----

def _usable(scores: np.ndarray) -> np.ndarray:
    """(B, V) bool: ids a selector may return (not NaN, not -inf); raises for a row without any."""
    ok = scores > -np.inf                                                # False for NaN as well
    rows = ok.any(axis=-1)
    if not rows.all():
        i = int(np.flatnonzero(~rows)[0])
        raise ValueError(f"no token is allowed in row {i}: every score is -inf or NaN")
    return ok


class Greedy:
    def __call__(self, scores: np.ndarray) -> np.ndarray:
        ok = _usable(scores)
        # first maximum on ties, as torch.argmax
        return np.argmax(np.where(ok, scores, -np.inf), axis=-1).astype(np.int64)


class Sample:
    """Draw from softmax(scores) (float64), by inverse CDF on one uniform per row per step.

    `rngs`: one generator per row (each row then depends on its own seed only, so it reproduces alone), or a
    single generator shared by the rows (rng.random(B) per step).
    """

    def __init__(self, rngs: np.random.Generator | Sequence[np.random.Generator]):
        self.rngs = rngs

    def uniforms(self, rows: int) -> np.ndarray:
        """(rows,) float64 in [0, 1): this step's draws (also drawn, and dropped, at a step the grid forces: a seed
        gives the same image whether or not the decode loop skips that step's model run)."""
        if isinstance(self.rngs, np.random.Generator):
            return self.rngs.random(rows)
        if len(self.rngs) != rows:
            raise ValueError(f"{len(self.rngs)} generators for {rows} rows")
        return np.array([g.random() for g in self.rngs], dtype=np.float64)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        ok = _usable(scores)
        s = np.where(ok, scores, -np.inf).astype(np.float64)
        top = s.max(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", over="ignore"):
            # rows with +inf scores: those share all the mass uniformly; else a stable softmax numerator
            weights = np.where(np.isposinf(top), np.isposinf(s), np.exp(s - top))
        cdf = np.cumsum(weights, axis=-1)                                # (B, V), unnormalised
        u = self.uniforms(len(s)) * cdf[:, -1]
        ids = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u)], dtype=np.int64)
        # round-off can put u at or past the total: fall back to the last id with weight
        last = weights.shape[-1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=-1)
        return np.minimum(ids, last).astype(np.int64)


# ---- the chain ----

def guided(cfg_scale: float | None) -> bool:
    """Whether classifier-free guidance applies: Transformers builds its CFG processor only for a scale != 1
    (None: no guidance), and then the rows are B cond + B uncond."""
    return cfg_scale is not None and cfg_scale != 1.0


def build_chain(*, cfg_scale: float | None, grid: VisualGridConstraint | None, temperature: float, top_k: int,
                top_p: float, greedy: bool) -> list[LogitsFilter]:
    """Transformers' processor order: CFG (when scale != 1), the grid constraint, then when sampling:
    temperature (!= 1), top-k (> 0), top-p (< 1)."""
    chain: list[LogitsFilter] = []
    if guided(cfg_scale):
        chain.append(ClassifierFreeGuidance(cfg_scale))
    if grid is not None:
        chain.append(grid)
    if not greedy:
        if temperature != 1.0:
            chain.append(Temperature(temperature))
        if top_k > 0:
            chain.append(TopK(top_k))
        if top_p < 1.0:
            chain.append(TopP(top_p))
    return chain


def apply_chain(chain: list[LogitsFilter], logits: np.ndarray, state: DecodeState) -> np.ndarray:
    for f in chain:
        logits = f(logits, state)
    return logits


class ChainPicker:
    """The numpy reference for one decode step: the filter chain, then the selector.
    pick(logits (R, V), generated (B, n)) -> (B,) chosen columns."""

    def __init__(self, chain: list[LogitsFilter], select):
        self.chain, self.select = chain, select

    def __call__(self, logits: np.ndarray, generated: np.ndarray) -> np.ndarray:
        return self.select(apply_chain(self.chain, logits, DecodeState(generated=generated)))

    def skip(self, sequences: int) -> None:
        """A step the grid forces (generate.Decoding runs no model for it): only the selector's draws."""
        if isinstance(self.select, Sample):
            self.select.uniforms(sequences)
