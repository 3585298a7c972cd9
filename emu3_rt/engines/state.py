"""The decode state an engine owns: one generation's KV cache plus the step's I/O, where the engine computes.

`engine.new_state(layout, rows)` makes one; `state.step(engine, ids, mask, positions)` runs the step graph on
(R, S) new tokens, writes their K/V rows into the state's buffers in place and returns the last position's
logits (R, V) on the host. The host hands over only ids, positions and mask slots; the KV never crosses.
`state.step_and_pick(engine, ids, mask, positions, sampler, feeds)` chains the sampler graph (export/sampler_graph.py)
onto the step: it reads the step's logits where the step wrote them, and only its (B,) chosen ids come back.
Implementations: kv_cache.KVCache (host numpy: onnxruntime CPU, any `run()` engine), device_state.DeviceState
(onnxruntime IOBinding on CUDA or CPU memory, TensorRT bindings).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..bundle import Bundle
from .base import EngineError

# the sampler graph's logits input (R, V) float32 and chosen-columns output (B,) int64 (export/sampler_graph.py)
SAMPLER_LOGITS, SAMPLER_IDS = "logits", "ids"


@dataclass(frozen=True)
class KVLayout:
    """The step graph's state I/O, read from bundle.json's model.decoder (the image step graph shares it)."""
    # "buffer": past (R, KV, C, D) with capacity C, presents are the S new rows; "concat": present = past + new
    kind: str
    input_ids: str
    attention_mask: str
    position_ids: str
    logits: str
    # per layer: key then value
    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    kv_heads: int
    head_size: int
    # "float32", "float16" or "bfloat16"
    dtype: str

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> KVLayout:
        dec = bundle.manifest["model"]["decoder"]
        layers = range(dec["num_hidden_layers"])
        past = tuple(dec["inputs"][f"past_{k}_names"] % i for i in layers for k in ("key", "value"))
        present = tuple(dec["outputs"][f"present_{k}_names"] % i for i in layers for k in ("key", "value"))
        return cls(bundle.kv_cache, dec["inputs"]["input_ids"], dec["inputs"]["attention_mask"],
                   dec["inputs"]["position_ids"], dec["outputs"]["logits"], past, present,
                   dec["num_key_value_heads"], dec["head_size"], bundle.decoder.input(past[0]).dtype)


@dataclass
class Traffic:
    """Bytes the host handed to the engine (h2d) and took back (d2h): totals over `calls` step calls, and the
    last call's. The KV cache is never counted: it stays in the state's buffers. A chained step (step_and_pick)
    also counts the sampler's small feeds (h2d) and its ids (d2h); whether the logits count depends on the state:
    see KVCache.step_and_pick (host) and DeviceState.step_and_pick (they never leave the engine)."""
    h2d: int = 0
    d2h: int = 0
    calls: int = 0
    last_h2d: int = 0
    last_d2h: int = 0

    def add(self, h2d: int, d2h: int) -> None:
        self.h2d, self.d2h, self.calls = self.h2d + h2d, self.d2h + d2h, self.calls + 1
        self.last_h2d, self.last_d2h = h2d, d2h


class StepState(Protocol):
    rows: int
    length: int                   # filled positions
    next_positions: np.ndarray    # (R,) position id of each row's next token
    traffic: Traffic

    @property
    def capacity(self) -> int: ...

    def step(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray: ...

    # the step, then `sampler` (an onnxruntime engine of the sampler graph) on its logits plus `feeds` (the small
    # per-step inputs, graph_sampler.GraphSampler.feeds): the (B,) chosen columns, unchecked
    def step_and_pick(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, sampler,
                      feeds: dict[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


class Owner:
    """A state's tie to the engine that made it: refuses another engine, a closed one, or a collected one."""

    def __init__(self, engine):
        self._ref = weakref.ref(engine)

    def check(self, engine, same: bool = True) -> None:
        """same=False (host states): any engine may run the state, as long as its maker is still open; host memory
        is bound to no session, so wrappers that time or count an engine's runs step it too."""
        owner = self._ref()
        if owner is None:
            raise EngineError("this decode state's engine no longer exists; start a new generation")
        if same and engine is not owner:
            raise EngineError(f"this decode state belongs to another engine ({owner.spec.path.name}); a state "
                              f"runs only on the engine whose new_state() made it")
        if getattr(owner, "closed", False):
            raise EngineError(f"{owner.spec.path.name}: the engine was closed after this decode state was made; "
                              f"start a new generation")
