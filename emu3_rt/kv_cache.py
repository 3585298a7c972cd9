"""KVCache: the one owner of the decoder step's state between calls.

It holds, for R rows (cond rows then uncond rows under CFG): K/V per layer (R, kv_heads, T, head_dim), the
attention mask over those T positions (R, T) and each row's next position id (R,). `feeds()` builds the step
graph's inputs for S new tokens, `advance()` takes its outputs back. Tensor names come from bundle.json.

Two layouts, named by the bundle's `model.decoder.kv_cache`:
* "buffer": K/V live in preallocated arrays (R, kv_heads, C, head_dim) whose capacity C grows in blocks of
  KV_BLOCK positions. The graph reads the whole buffer (empty slots under mask 0) and returns only the S new
  rows, which are written in place: per step the host copies R * 2L * S rows instead of the whole cache.
* "concat": the graph returns past + new (R, kv_heads, T + S, head_dim), which becomes the next past.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle

_NUMPY_KV = {"float32": np.float32, "float16": np.float16}

# Buffer capacity grows in steps of this many positions. Attention reads the whole buffer, so a step pays for at
# most KV_BLOCK - 1 empty slots; growing copies the cache once per KV_BLOCK positions.
KV_BLOCK = 256


class KVCache:
    def __init__(self, bundle: Bundle, rows: int):
        dec = bundle.manifest["model"]["decoder"]
        dtype = bundle.decoder.input(dec["inputs"]["past_key_names"] % 0).dtype
        if dtype not in _NUMPY_KV:
            raise ValueError(f"a {dtype} KV cache cannot live in numpy; use a float32 or float16 bundle")
        self.rows = rows
        self.layout = bundle.kv_cache
        self.past_names = [dec["inputs"][f"past_{kind}_names"] % i
                           for i in range(dec["num_hidden_layers"]) for kind in ("key", "value")]
        self.present_names = [dec["outputs"][f"present_{kind}_names"] % i
                              for i in range(dec["num_hidden_layers"]) for kind in ("key", "value")]
        self.io = dec["inputs"]
        self._shape = (rows, dec["num_key_value_heads"], 0, dec["head_size"])
        self._dtype = _NUMPY_KV[dtype]
        # past[i]: (R, KV, C, D) with C = capacity (buffer) or C = length (concat)
        self.past: list[np.ndarray] = [np.zeros(self._shape, self._dtype)] * len(self.past_names)
        self.slot_mask = np.zeros((rows, 0), dtype=np.int64)   # (R, C): 1 = a filled, attended position
        self.length = 0                                          # filled positions
        self.next_positions = np.zeros(rows, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return self.slot_mask.shape[1]

    def _reserve(self, needed: int) -> None:
        """Grow the buffers to hold `needed` positions (rounded up to KV_BLOCK), keeping the filled ones."""
        if needed <= self.capacity:
            return
        cap = -(-needed // KV_BLOCK) * KV_BLOCK
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
        feeds = {self.io["input_ids"]: ids, self.io["position_ids"]: positions,
                 self.io["attention_mask"]: np.concatenate([self.slot_mask, mask], axis=1)}
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
