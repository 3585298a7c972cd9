"""KV capacities, and the decode state of the legacy concat layout.

Every buffer-layout bundle decodes through engines/state.DecodeState (one state for every engine). This module
keeps what is not a state: how a buffer's capacity grows (capacity_for, KV_BLOCK), and ConcatCache, the host
state of bundles exported with `--kv-cache concat`, whose graph returns past + new (R, kv_heads, T + S, head_dim)
as the next past: a layout whose cache is a new tensor every step cannot live in preallocated buffers.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .engines.state import SAMPLER_IDS, SAMPLER_LOGITS, KVLayout, Owner, Traffic

_NUMPY_KV = {"float32": np.float32, "float16": np.float16}

# Buffer capacity grows in blocks of at most this many positions (states whose one-token steps are captured CUDA
# graphs: exactly this, one graph per capacity). Attention reads the whole buffer, so a step pays for up to a
# block of empty slots; growing copies the cache once per block.
KV_BLOCK = 256


def capacity_for(needed: int) -> int:
    """The capacity for `needed` positions: rounded up to a block of 32 positions below 512, 64 below 1,024, 128
    below 2,048, then KV_BLOCK. Short buffers waste few empty slots (a 16x16 image, ~320 positions: 3 % faster
    than 256-position blocks), long ones copy the cache less often. Every block divides KV_BLOCK, so no capacity
    exceeds the KV_BLOCK multiple that TensorRT profiles are built for."""
    block = KV_BLOCK
    for limit, size in ((512, 32), (1024, 64), (2048, 128)):
        if needed < limit:
            block = min(size, KV_BLOCK)
            break
    return -(-needed // block) * block


def block_capacity(needed: int) -> int:
    """KV_BLOCK multiples: the capacities of states whose steps are captured as CUDA graphs (few distinct ones)."""
    return -(-needed // KV_BLOCK) * KV_BLOCK


class ConcatCache:
    """Host state for R rows of a concat-layout bundle: K/V per layer (R, kv_heads, T, head_dim) with T the filled
    length, the mask over those T positions (R, T), each row's next position id (R,). owner: the engine whose
    new_state() made it (the only one that may step it)."""

    def __init__(self, layout: KVLayout | Bundle, rows: int, owner=None):
        layout = KVLayout.from_bundle(layout) if isinstance(layout, Bundle) else layout
        if layout.kind != "concat":
            raise ValueError(f"ConcatCache holds the concat layout, not {layout.kind!r} (engines/state.DecodeState)")
        if layout.dtype not in _NUMPY_KV:
            raise ValueError(f"a {layout.dtype} KV cache cannot live in numpy; use a float32 or float16 bundle, "
                             f"or a GPU engine (device='cuda')")
        self.rows, self.names = rows, layout
        self.past: list[np.ndarray] | None = [np.zeros((rows, layout.kv_heads, 0, layout.head_size),
                                                       _NUMPY_KV[layout.dtype])] * len(layout.past_names)
        self.slot_mask = np.zeros((rows, 0), dtype=np.int64)
        self.next_positions = np.zeros(rows, dtype=np.int64)
        self.traffic = Traffic()
        self._owner = None if owner is None else Owner(owner)

    @property
    def length(self) -> int:
        return self.slot_mask.shape[1]

    capacity = length

    def _run(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, int]:
        if self.past is None:
            raise ValueError("this decode state was closed")
        if self._owner is not None:
            self._owner.check(engine)
        lay = self.names
        feeds = {lay.input_ids: ids, lay.position_ids: positions,
                 lay.attention_mask: np.concatenate([self.slot_mask, mask], axis=1),
                 **dict(zip(lay.past_names, self.past))}
        outputs = engine.run(dict(feeds))
        self.past = [outputs[name] for name in lay.present_names]
        self.slot_mask = feeds[lay.attention_mask]
        self.next_positions = positions[:, -1] + 1
        sent = sum(feeds[n].nbytes for n in (lay.input_ids, lay.position_ids, lay.attention_mask))
        return outputs[lay.logits], sent

    def step(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits, sent = self._run(engine, ids, mask, positions)
        self.traffic.add(sent, logits.nbytes)
        return logits

    def step_and_pick(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, sampler,
                      feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The step, then the sampler's run() on the host logits (counted out and back in)."""
        logits, sent = self._run(engine, ids, mask, positions)
        chosen = sampler.run({SAMPLER_LOGITS: logits, **feeds})[SAMPLER_IDS]
        self.traffic.add(sent + logits.nbytes + sum(np.asarray(v).nbytes for v in feeds.values()),
                         logits.nbytes + chosen.nbytes)
        return chosen

    def close(self) -> None:
        self.past = None


def new_state(engine, bundle: Bundle, rows: int, capacity_hint: int = 0):
    """The step engine's decode state for `rows` rows of this bundle (engine.new_state with the bundle's layout)."""
    return engine.new_state(KVLayout.from_bundle(bundle), rows, capacity_hint)
