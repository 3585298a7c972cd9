"""The logits filter chain, applied to every decode step's logits, then one selector picks the ids.

Order as in Transformers' generate for Emu3: CFG -> visual-grid constraint -> temperature -> top-k -> top-p
-> selector (Greedy or Sample). Filters take (R, V) float logits and return (B, V) scores; they return a new
array and never modify their input. Disallowed tokens are -inf; NaN is never allowed through a constraint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class DecodeState:
    generated: np.ndarray  # (B, n) int64 ids generated so far (n = 0 at the first step)

    @property
    def step(self) -> int:
        return self.generated.shape[1]


class LogitsFilter(Protocol):
    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray: ...


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (as Transformers computes it); all -inf rows stay all -inf."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0).astype(np.float32)
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


# ---- guidance and constraint ----

@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """(2B, V) logits, cond rows then uncond rows -> (B, V): g * (log_softmax(c) - log_softmax(u)) + log_softmax(u).

    Transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor, on log-probabilities (not raw logits).
    """

    scale: float

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.scale}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        b = logits.shape[0] // 2
        cond, uncond = log_softmax(logits[:b]), log_softmax(logits[b:])
        if self.scale == 1:
            return cond
        with np.errstate(invalid="ignore", over="ignore"):
            out = np.float32(self.scale) * (cond - uncond) + uncond
        # computed in float32 like Transformers; then made safe for extreme logits: -inf - -inf (NaN) means the
        # token is impossible -> -inf, and an overflow to +inf saturates at the largest float32
        out = np.where(np.isnan(out), -np.inf, out)
        return np.where(np.isposinf(out), np.finfo(np.float32).max, out).astype(np.float32)


class VisualGridConstraint:
    """Emu3's image layout, per row (h, w): w visual ids then EOL for h rows, then EOF, EOI, EOS, then PAD.

    `off` counts from the IMG token that ends the prompt (1 = first generated token); rules in Transformers'
    order: off % (w+1) == 0 -> EOL; off == (w+1)h + 1 -> EOF; + 2 -> EOI; + 3 -> EOS; beyond -> PAD; else visual.
    """

    VISUAL, EOL, EOF, EOI, EOS, PAD = range(6)

    def __init__(self, *, heights: np.ndarray, widths: np.ndarray, visual_ids: np.ndarray, eol: int, eof: int,
                 eoi: int, eos: int, pad: int, vocab_size: int):
        self.heights = np.asarray(heights, dtype=np.int64)
        self.widths = np.asarray(widths, dtype=np.int64)
        # (6, V) allowed-token table, one row per kind: each step is a row gather, no loop over the vocabulary
        table = np.zeros((6, vocab_size), dtype=bool)
        table[self.VISUAL, np.asarray(visual_ids)] = True
        for kind, token in ((self.EOL, eol), (self.EOF, eof), (self.EOI, eoi), (self.EOS, eos), (self.PAD, pad)):
            table[kind, token] = True
        self.table = table

    def kinds(self, step: int) -> np.ndarray:
        """(B,) kind of the token at generation step `step` (0-based) for each row."""
        off, n = step + 1, (self.widths + 1) * self.heights
        return np.select([off % (self.widths + 1) == 0, off == n + 1, off == n + 2, off == n + 3, off > n + 3],
                         [self.EOL, self.EOF, self.EOI, self.EOS, self.PAD], self.VISUAL)

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        allowed = self.table[self.kinds(state.step)]                   # (B, V)
        return np.where(allowed & ~np.isnan(logits), logits, -np.inf).astype(np.float32)


def image_token_count(h: int, w: int) -> int:
    return h * (w + 1) + 3


# ---- warpers ----

@dataclass(frozen=True)
class Temperature:
    value: float

    def __post_init__(self):
        if not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"temperature must be > 0, got {self.value}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        return logits / np.float32(self.value)


@dataclass(frozen=True)
class TopK:
    """Keep scores >= the k-th largest per row (ties at the threshold stay), like TopKLogitsWarper."""

    k: int

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.k}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        k = min(self.k, logits.shape[-1])
        kth = np.partition(logits, -k, axis=-1)[:, -k:].min(axis=-1, keepdims=True)
        return np.where(logits >= kth, logits, -np.inf)


@dataclass(frozen=True)
class TopP:
    """Nucleus filtering as TopPLogitsWarper: drop the low tail whose probability mass is <= 1 - p."""

    p: float

    def __post_init__(self):
        if not (0 < self.p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.p}")

    def __call__(self, logits: np.ndarray, state: DecodeState) -> np.ndarray:
        order = np.argsort(logits, axis=-1, kind="stable")              # ascending
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(log_softmax(sorted_logits))
        remove_sorted = np.cumsum(probs, axis=-1) <= (1 - self.p)
        remove_sorted[:, -1] = False                                      # keep at least the best token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, -np.inf, logits)


# ---- selectors ----

def _check_rows(scores: np.ndarray) -> None:
    ok = (~np.isnan(scores) & (scores > -np.inf)).any(axis=-1)
    if not ok.all():
        raise ValueError(f"no token is allowed in row {int(np.flatnonzero(~ok)[0])} (all -inf or NaN)")


class Greedy:
    def __call__(self, scores: np.ndarray) -> np.ndarray:
        _check_rows(scores)
        return np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=-1).astype(np.int64)


class Sample:
    """Multinomial draw from softmax(scores) in float64, one uniform number per row per step from `rng`."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        _check_rows(scores)
        s = np.where(np.isnan(scores), -np.inf, scores).astype(np.float64)
        top = s.max(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore"):
            # +inf entries (if any) share all the mass; otherwise a plain stable softmax
            weights = np.where(np.isposinf(top), np.isposinf(s).astype(np.float64), np.exp(s - top))
        cdf = np.cumsum(weights, axis=-1)
        u = self.rng.random(len(s)) * cdf[:, -1]
        ids = (cdf <= u[:, None]).sum(axis=-1)
        # float round-off can land on a zero-weight tail: step back to the last token with weight
        last = weights.shape[-1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=-1)
        return np.minimum(ids, last).astype(np.int64)


# ---- the chain ----

def build_chain(*, cfg_scale: float, grid: VisualGridConstraint | None, temperature: float, top_k: int,
                top_p: float, greedy: bool) -> list[LogitsFilter]:
    """CFG (only for scale != 1, as Transformers) -> grid -> and when sampling: temperature, top-k, top-p."""
    chain: list[LogitsFilter] = []
    if cfg_scale != 1.0:
        chain.append(ClassifierFreeGuidance(cfg_scale))
    if grid is not None:
        chain.append(grid)
    if not greedy:
        if temperature != 1.0:
            chain.append(Temperature(temperature))
        chain.append(TopK(top_k))
        if top_p < 1.0:
            chain.append(TopP(top_p))
    return chain


def apply_chain(chain: list[LogitsFilter], logits: np.ndarray, state: DecodeState) -> np.ndarray:
    for f in chain:
        logits = f(logits, state)
    return logits
