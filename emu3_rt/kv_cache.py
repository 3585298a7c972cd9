"""KVCache: the host (numpy) decode state: the one owner of the step's KV cache for onnxruntime CPU and for any
engine that only has `run(feeds)` (engines/state.py gives the state API; device engines own DeviceStates instead).

It holds, for R rows (cond rows then uncond rows under CFG): K/V per layer (R, kv_heads, T, head_dim), the
attention mask over those T positions (R, T) and each row's next position id (R,). `feeds()` builds the step
graph's inputs for S new tokens, `advance()` takes its outputs back. Tensor names come from bundle.json.

Two layouts, named by the bundle's `model.decoder.kv_cache`:
* "buffer": K/V live in preallocated arrays (R, kv_heads, C, head_dim) whose capacity C grows in blocks
  (capacity_for). The graph reads the whole buffer (empty slots under mask 0) and returns only the S new
  rows, which are written in place: per step the host copies R * 2L * S rows instead of the whole cache.
* "concat": the graph returns past + new (R, kv_heads, T + S, head_dim), which becomes the next past.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .engines.state import SAMPLER_IDS, SAMPLER_LOGITS, KVLayout, Owner, Traffic

_NUMPY_KV = {"float32": np.float32, "float16": np.float16}

# Buffer capacity grows in blocks of at most this many positions (device states: exactly this, one CUDA graph per
# capacity). Attention reads the whole buffer, so a step pays for up to a block of empty slots; growing copies the
# cache once per block.
KV_BLOCK = 256


def capacity_for(needed: int) -> int:
    """The host buffer's capacity for `needed` positions: rounded up to a block of 32 positions below 512, 64
    below 1,024, 128 below 2,048, then KV_BLOCK. Short buffers waste few empty slots (a 16x16 image, ~320
    positions: 3 % faster than 256-position blocks), long ones copy the cache less often. Every block divides
    KV_BLOCK, so no capacity exceeds the KV_BLOCK multiple that TensorRT profiles are built for."""
    block = KV_BLOCK
    for limit, size in ((512, 32), (1024, 64), (2048, 128)):
        if needed < limit:
            block = min(size, KV_BLOCK)
            break
    return -(-needed // block) * block


class KVCache:
    """Host state for R rows. `owner`: the engine whose new_state() made it (refused once that engine is closed or
    gone); any engine with run() steps it (wrappers that time or count runs). capacity_hint: positions to allocate
    up front."""

    def __init__(self, layout: KVLayout | Bundle, rows: int, capacity_hint: int = 0, owner=None):
        layout = KVLayout.from_bundle(layout) if isinstance(layout, Bundle) else layout
        if layout.dtype not in _NUMPY_KV:
            raise ValueError(f"a {layout.dtype} KV cache cannot live in numpy; use a float32 or float16 bundle, "
                             f"or a GPU engine (device='cuda')")
        self.rows = rows
        self.layout = layout.kind
        self.names = layout
        self.past_names, self.present_names = list(layout.past_names), list(layout.present_names)
        self._shape = (rows, layout.kv_heads, 0, layout.head_size)
        self._dtype = _NUMPY_KV[layout.dtype]
        # past[i]: (R, KV, C, D) with C = capacity (buffer) or C = length (concat)
        self.past: list[np.ndarray] = [np.zeros(self._shape, self._dtype)] * len(self.past_names)
        self.slot_mask = np.zeros((rows, 0), dtype=np.int64)   # (R, C): 1 = a filled, attended position
        self.length = 0                                          # filled positions
        self.next_positions = np.zeros(rows, dtype=np.int64)
        self.traffic = Traffic()
        self._owner = None if owner is None else Owner(owner)
        if capacity_hint and self.layout == "buffer":
            self._reserve(capacity_hint)

    @property
    def capacity(self) -> int:
        return self.slot_mask.shape[1]

    def _reserve(self, needed: int) -> None:
        """Grow the buffers to hold `needed` positions (rounded up by capacity_for), keeping the filled ones."""
        if needed <= self.capacity:
            return
        cap = capacity_for(needed)
        n = self.length
        grown = []
        for old in self.past:
            new = np.zeros((*self._shape[:2], cap, self._shape[3]), self._dtype)
            new[:, :, :n] = old[:, :, :n]
            grown.append(new)
        self.past = grown
        mask = np.zeros((self.rows, cap), dtype=np.int64)
        mask[:, :n] = self.slot_mask[:, :n]
        self.slot_mask = mask

    def feeds(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs for new tokens ids/mask/positions (R, S): the mask input covers the past slots + new, (R, C + S)."""
        if self.layout == "buffer":
            self._reserve(self.length + ids.shape[1])
        feeds = {self.names.input_ids: ids, self.names.position_ids: positions,
                 self.names.attention_mask: np.concatenate([self.slot_mask, mask], axis=1)}
        feeds.update(zip(self.past_names, self.past))
        return feeds

    def advance(self, outputs: dict[str, np.ndarray], mask: np.ndarray, positions: np.ndarray) -> None:
        """Take the step's presents: the new rows (buffer) or the whole new past (concat)."""
        s, n = mask.shape[1], self.length
        if self.layout == "buffer":
            for buf, name in zip(self.past, self.present_names):
                buf[:, :, n: n + s] = outputs[name]          # (R, KV, S, D) into the buffer, in place
            self.slot_mask[:, n: n + s] = mask
        else:
            self.past = [outputs[name] for name in self.present_names]
            self.slot_mask = np.concatenate([self.slot_mask, mask], axis=1)
        self.length = n + s
        self.next_positions = positions[:, -1] + 1

    def step(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run `engine` on (R, S) new tokens, keep their K/V, return the last position's logits (R, V). Traffic
        counts what a device engine would have to move: the feeds the host builds (ids, positions, mask) and the
        logits it reads; the K/V stay in this cache (host memory is the engine's memory here)."""
        logits, sent = self._run(engine, ids, mask, positions)
        self.traffic.add(sent, logits.nbytes)
        return logits

    def step_and_pick(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, sampler,
                      feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The step, then `sampler` on its logits: the (B,) chosen columns. The step's logits come back as host
        numpy (onnxruntime CPU returns its outputs so), so by this class's rule they count as read (d2h) and again
        as handed to the sampler (h2d), with the sampler's small feeds (h2d) and its ids (d2h)."""
        logits, sent = self._run(engine, ids, mask, positions)
        chosen = sampler.run({SAMPLER_LOGITS: logits, **feeds})[SAMPLER_IDS]
        self.traffic.add(sent + logits.nbytes + sum(np.asarray(v).nbytes for v in feeds.values()),
                         logits.nbytes + chosen.nbytes)
        return chosen

    def _run(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, int]:
        """One step-graph run: (logits (R, V), bytes of the feeds the host built)."""
        if self._owner is not None:
            self._owner.check(engine, same=False)
        if self.past is None:
            raise ValueError("this decode state was closed")
        feeds = self.feeds(ids, mask, positions)
        outputs = engine.run(feeds)
        self.advance(outputs, mask, positions)
        sent = sum(feeds[n].nbytes for n in (self.names.input_ids, self.names.position_ids, self.names.attention_mask))
        return outputs[self.names.logits], sent

    def close(self) -> None:
        """Release the buffers (idempotent)."""
        self.past = None


def new_state(engine, layout: KVLayout | Bundle, rows: int, capacity_hint: int = 0):
    """The engine's own decode state (engine.new_state) or, for an engine with only run(), a host KVCache."""
    layout = KVLayout.from_bundle(layout) if isinstance(layout, Bundle) else layout
    make = getattr(engine, "new_state", None)
    return make(layout, rows, capacity_hint) if make is not None else KVCache(layout, rows, capacity_hint)
