"""GraphSampler: drives export/sampler_graph.py's graph (an Engine) once per decode step, in place of
apply_chain + Greedy/Sample: (R, V) logits in, (B,) chosen logits columns out (and their log-probs).

Feeds are scalars and (B,) vectors only: the grid kind of each row (VisualGridConstraint.kinds) and one uniform
per row per step drawn from the caller's generator(s) by sampling.Sample.uniforms, so the draws are identical.
`feeds(step, rows)` gives them without the logits, for a decode state that runs the graph where the logits are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .engines import Engine
from .engines.state import SAMPLER_IDS, SAMPLER_LOGITS
from .sampling import Sample, VisualGridConstraint, build_chain, guided

NO_GRID = -1  # kinds value of a row without the grid constraint


@dataclass(frozen=True)
class Chosen:
    # (B,) int64 logits columns (token ids for a full head)
    ids: np.ndarray
    # (B,) float32 log-probability of each chosen column under the processed distribution
    logprobs: np.ndarray


class GraphSampler:
    """The same parameters as sampling.build_chain; rng is required unless greedy."""

    def __init__(self, engine: Engine, *, cfg_scale: float | None, grid: VisualGridConstraint | None,
                 temperature: float, top_k: int, top_p: float, greedy: bool,
                 rng: np.random.Generator | Sequence[np.random.Generator] | None = None):
        build_chain(cfg_scale=cfg_scale, grid=None, temperature=temperature, top_k=top_k, top_p=top_p,
                    greedy=greedy)  # the numpy chain's validation and messages
        if not greedy and rng is None:
            raise ValueError("rng is required for sampling (greedy=False)")
        self.engine, self.grid = engine, grid
        # Sample's own draws (one generator shared by the rows, or one per row), so the uniforms are identical
        self.draws = None if greedy else Sample(rng)
        self.guided = guided(cfg_scale)
        self.greedy = greedy
        self._scalars = {
            "cfg_scale": np.array(1.0 if cfg_scale is None else cfg_scale, dtype=np.float64),
            "guided": np.array(self.guided),
            "temperature": np.array(1.0 if greedy else temperature, dtype=np.float64),
            # any k >= V means "off", so a k beyond int64 (Python ints are unbounded) is clamped, not refused
            "top_k": np.array(0 if greedy else min(top_k, np.iinfo(np.int64).max), dtype=np.int64),
            "top_p": np.array(1.0 if greedy else top_p, dtype=np.float64),
            "greedy": np.array(greedy),
        }

    def feeds(self, step: int, rows: int) -> dict[str, np.ndarray]:
        """The graph's small inputs for decode step `step` (0-based) over `rows` logits rows: the grid kinds (B,),
        one uniform per sequence (B,) float64 (drawn here: call once per step) and the scalars. Every input but
        the logits, so a decode state can run the graph on logits that stay in the engine (step_and_pick)."""
        if self.guided and rows % 2:
            raise ValueError(f"logits must have 2B rows under CFG (cond then uncond), got {rows}")
        b = rows // 2 if self.guided else rows
        if self.grid is None:
            kinds = np.full(b, NO_GRID, dtype=np.int64)
        else:
            kinds = self.grid.kinds(step).astype(np.int64)
            if kinds.shape != (b,):
                raise ValueError(f"the grid has {kinds.shape[0]} rows but the logits hold {b} sequences")
        # Sample draws one uniform per row per step; greedy draws nothing
        uniforms = np.zeros(b) if self.draws is None else self.draws.uniforms(b)
        return {"kinds": kinds, "uniforms": uniforms, **self._scalars}

    def skip(self, sequences: int) -> None:
        """A step the grid forces (generate.Decoding runs no model for it): only this step's draws."""
        if self.draws is not None:
            self.draws.uniforms(sequences)

    @staticmethod
    def checked(ids: np.ndarray) -> np.ndarray:
        """The graph's (B,) ids output as int64 columns; a row with nothing allowed (-1) raises ValueError."""
        if (ids < 0).any():
            i = int(np.flatnonzero(ids < 0)[0])
            raise ValueError(f"no token is allowed in row {i}: every score is -inf or NaN")
        return ids.astype(np.int64)

    def __call__(self, logits: np.ndarray, step: int) -> Chosen:
        """logits (R, V) float32 of decode step `step` (0-based) -> the chosen columns of the B sequences."""
        feeds = self.feeds(step, logits.shape[0])
        out = self.engine.run({SAMPLER_LOGITS: np.ascontiguousarray(logits, dtype=np.float32), **feeds})
        return Chosen(self.checked(out[SAMPLER_IDS]), out["logprobs"])

    def pick(self, logits: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """The decode loop's picker on host logits: (R, V) logits and the (B, n) ids so far -> (B,) chosen columns.
        generate.Decoding instead chains the graph onto the step (state.step_and_pick), with the same feeds."""
        return self(logits, generated.shape[1]).ids
