"""The decode loop: prefill -> [step -> pick (filter chain + selector) -> append] until EOS or the token budget.

A step whose token the image grid forces in every row (EOL, EOF, EOI, EOS) runs no model: the chain would keep
that one id whatever the logits, so the token is appended at once and rides into the model with the next step's
(an S = 2 step), and the last row's EOL, EOF, EOI and EOS never run at all (a 16x16 image: 256 model runs for
275 tokens). Same tokens, same K/V; the selector still draws its uniforms at such a step, so seeds are unchanged.

Rows: B sequences, or 2B under classifier-free guidance (cond rows, then uncond rows) that go through the step
engine together, one call per step. Filters reduce (R, V) logits to (B, V) scores; the selector picks (B,) ids,
which are appended to every stream of their sequence. The KV cache belongs to the decode state (engines/state.py:
`engine.new_state(...)`, the same DecodeState on every engine); the loop hands it ids, mask and positions.
With the bundle's sampler graph (graph_sampler.GraphSampler) the state runs it on the step's logits where they
are (state.step_and_pick), so only the chosen ids come back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .engines import EngineError
from .engines.base import BoundEngine, StepEngine
from .engines.state import DecodeState
from .graph_sampler import GraphSampler
from .kv_cache import ConcatCache
from .prompt import Batch
from .sampling import VisualGridConstraint

# on_token(step, ids): called after every step with the (B,) ids just chosen
OnToken = Callable[[int, np.ndarray], None]


class Pick(Protocol):
    """The whole sampling chain, run by numpy (sampling.ChainPicker, the reference) or by the bundle's sampler
    graph (graph_sampler.GraphSampler)."""

    def __call__(self, logits: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """(R, V) logits and the (B, n) ids so far -> (B,) chosen logits columns."""

    def skip(self, sequences: int) -> None:
        """A step the grid forces, which runs no model: the draws the selector would make, and nothing else."""


# a sampler graph chained onto the step: (its engine, its small feeds for this step) -> state.step_and_pick
Chained = tuple[BoundEngine, dict[str, np.ndarray]]
# the step engine's decode state (ConcatCache: bundles exported with the legacy concat layout)
StepState = DecodeState | ConcatCache


@dataclass(frozen=True)
class LoopOptions:
    # tokens generated at most per row (the loop also stops when every row has produced EOS)
    max_new_tokens: int
    # id that ends a row, and the id finished rows keep receiving (as Transformers' generate does)
    eos_id: int
    pad_id: int
    # prompt tokens per prefill call: long one-shot prefill materialises (S, S) masks (export-notes 5)
    prefill_chunk: int = 512
    # rows per sequence: 1, or 2 under CFG (the batch holds B cond rows, then B uncond rows)
    streams: int = 1
    # logits column -> token id, when the step graph has a reduced (visual-only) head
    logit_ids: np.ndarray | None = None
    # the image grid (in logits columns), whose forced steps run no model (see above); None: every step runs
    grid: VisualGridConstraint | None = None


def _run(engine: StepEngine, state: StepState, ids, mask, pos, where: str, chained: Chained | None) -> np.ndarray:
    """One step-graph call on (R, S) new tokens through the state: the last position's logits (R, V), or with a
    chained sampler graph its (B,) chosen columns. Errors name `where`."""
    try:
        if chained is None:
            return state.step(engine, ids, mask, pos)
        return state.step_and_pick(engine, ids, mask, pos, *chained)
    except EngineError as e:
        raise EngineError(f"{where}: {e}") from None


def prefill(engine: StepEngine, state: StepState, batch: Batch, chunk: int,
            chained: Chained | None = None) -> np.ndarray:
    """Run the prompt through the step graph in chunks; returns the last position's logits (R, V), or the chained
    sampler's (B,) columns on them."""
    starts = range(0, batch.ids.shape[1], chunk)
    for start in starts:
        sl = slice(start, start + chunk)
        ids, mask, pos = batch.ids[:, sl], batch.mask[:, sl], batch.positions[:, sl]
        out = _run(engine, state, ids, mask, pos, f"prefill of prompt tokens {start}..{start + ids.shape[1]}",
                   chained if start == starts[-1] else None)
    return out


def decode_step(engine: StepEngine, state: StepState, ids: np.ndarray, step: int,
                chained: Chained | None = None) -> np.ndarray:
    """Feed the new tokens of every row, (R,) or (R, S) (S = 2: a forced token and the one before it), and return
    the next logits (R, V), or the chained sampler's (B,) columns."""
    ids = ids.astype(np.int64).reshape(ids.shape[0], -1)
    pos = state.next_positions[:, None] + np.arange(ids.shape[1])
    return _run(engine, state, ids, np.ones_like(ids), pos, f"decode step {step}", chained)


class Decoding:
    """One generation's decode loop, driven by its caller: step() runs one step for every row (the first one
    prefills the prompt). It owns its decode state (the KV cache) and closes it when the rows finish or on close(),
    so a server can interleave, stream and cancel generations; `generate` below is the same loop run to the end.
    pick: a Pick on host logits, or a GraphSampler, which the decode state runs next to the step."""

    def __init__(self, engine: StepEngine, state: StepState, batch: Batch, pick: Pick | GraphSampler,
                 opts: LoopOptions):
        # cache: the decode state (engines/state.py), None once closed
        self.engine, self.cache, self.batch, self.pick, self.opts = engine, state, batch, pick, opts
        self.sampler = pick if isinstance(pick, GraphSampler) else None
        b = batch.rows // opts.streams
        self._tokens = np.full((b, opts.max_new_tokens), opts.pad_id, dtype=np.int64)  # (B, budget), allocated once
        self._n = 0                                                                   # ids generated per row
        self.done = np.zeros(b, dtype=bool)                                           # (B,) rows past their EOS
        self.finished = False
        self._fed: list[np.ndarray] | None = None  # (B,) ids chosen since the model last ran; None: no prefill yet

    def step(self) -> np.ndarray | None:
        """One step: the (B,) ids chosen for every row, or None once finished (EOS everywhere, the token budget,
        or close()). The model runs lazily, so a generation closed after a step never pays for the next one."""
        if self.finished:
            return None
        forced = self.forced()
        if forced is not None:
            self.pick.skip(len(self.done))     # no model run (module docstring)
            columns = np.maximum(forced, 0)       # finished rows get pad in record()
        else:
            columns = self._run_model(self._n)
        return self.record(columns)

    def forced(self) -> np.ndarray | None:
        """(B,) the logits columns the grid forces at the next step in every unfinished row (-1 in finished ones),
        or None where some row picks (or before the prefill): then the model must run."""
        opts = self.opts
        forced = None if opts.grid is None or self._fed is None else opts.grid.forced(self._n)
        return forced if forced is not None and ((forced >= 0) | self.done).all() else None

    def pick_host(self, logits: np.ndarray) -> np.ndarray:
        """(R, V) logits of this generation's rows on the host -> the (B,) columns chosen for the next step (the
        numpy chain, or the sampler graph run on them: the same draws as chained onto the step)."""
        return (self.pick if self.sampler is None else self.sampler.pick)(logits, self.tokens)

    @property
    def pending(self) -> list[np.ndarray]:
        """The (B,) ids chosen since the model last ran (fed to it with the next run); [] before the prefill."""
        return self._fed or []

    def fed_to_model(self) -> None:
        """The pending ids were run by a caller stepping this generation's rows itself (a shared decode state)."""
        self._fed = []

    def record(self, columns: np.ndarray) -> np.ndarray:
        """The (B,) columns chosen for the next step -> its ids (pad in finished rows), appended to the tokens
        and the pending ids; closes the generation at EOS everywhere or the token budget."""
        opts, n = self.opts, self._n
        chosen = columns if opts.logit_ids is None else opts.logit_ids[columns]
        ids = np.where(self.done, opts.pad_id, chosen)                         # finished rows get pad
        self._tokens[:, n] = ids
        self._n = n + 1
        self.done |= ids == opts.eos_id
        self._fed = (self._fed or []) + [ids]
        if self.done.all() or n + 1 == opts.max_new_tokens:
            self.close()
        return ids

    @property
    def tokens(self) -> np.ndarray:
        """(B, n) ids generated so far (a view of the preallocated array)."""
        return self._tokens[:, : self._n]

    def _run_model(self, n: int) -> np.ndarray:
        """Prefill, or the ids fed since the last run: the (B,) logits columns chosen for step n."""
        opts = self.opts
        chained = None if self.sampler is None else (self.sampler.engine, self.sampler.feeds(n, self.batch.rows))
        if self._fed is None:
            out = prefill(self.engine, self.cache, self.batch, opts.prefill_chunk, chained)
        else:   # every stream of a sequence (CFG's cond and uncond rows) gets the ids: (R, S)
            out = decode_step(self.engine, self.cache, np.tile(np.stack(self._fed, axis=1), (opts.streams, 1)),
                              n - 1, chained)
            self._fed = []
        # (R, V) logits through the host picker, or the chained sampler's columns: (B,) logits columns
        return self.pick(out, self.tokens) if chained is None else self.sampler.checked(out)

    def close(self) -> None:
        """Finish now and release the decode state's KV cache (idempotent)."""
        self.finished = True
        if self.cache is not None:
            self.cache.close()
        self.cache = None


def generate(engine: StepEngine, state: StepState, batch: Batch, pick: Pick | GraphSampler, opts: LoopOptions,
             on_token: OnToken | None = None) -> np.ndarray:
    """Generate up to opts.max_new_tokens ids per sequence; returns (B, n) including EOS and pad after it."""
    run = Decoding(engine, state, batch, pick, opts)
    try:
        while (ids := run.step()) is not None:
            if on_token is not None:
                on_token(run.tokens.shape[1] - 1, ids)
    finally:
        run.close()
    return run.tokens
