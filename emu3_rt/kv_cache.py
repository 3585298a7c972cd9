"""KVCache: the one owner of the decoder step's state between calls.

It holds, for R rows (cond rows then uncond rows under CFG): past K/V per layer (R, kv_heads, T, head_dim),
the attention mask over those T positions (R, T) and each row's next position id (R,). `feeds()` builds the
step graph's inputs for new tokens, `advance()` takes the presents back. Tensor names come from bundle.json.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle

_NUMPY_KV = {"float32": np.float32, "float16": np.float16}


class KVCache:
    def __init__(self, bundle: Bundle, rows: int):
        dec = bundle.manifest["model"]["decoder"]
        dtype = bundle.decoder.input(dec["inputs"]["past_key_names"] % 0).dtype
        if dtype not in _NUMPY_KV:
            raise ValueError(f"a {dtype} KV cache cannot live in numpy; use a float32 or float16 bundle")
        self.rows = rows
        self.past_names = [dec["inputs"][f"past_{kind}_names"] % i
                           for i in range(dec["num_hidden_layers"]) for kind in ("key", "value")]
        self.present_names = [dec["outputs"][f"present_{kind}_names"] % i
                              for i in range(dec["num_hidden_layers"]) for kind in ("key", "value")]
        self.io = dec["inputs"]
        empty = np.zeros((rows, dec["num_key_value_heads"], 0, dec["head_size"]), dtype=_NUMPY_KV[dtype])
        self.past: list[np.ndarray] = [empty] * len(self.past_names)
        self.mask = np.zeros((rows, 0), dtype=np.int64)
        self.next_positions = np.zeros(rows, dtype=np.int64)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def feeds(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs for new tokens ids/mask/positions (R, S): the mask input covers past + new, (R, T + S)."""
        feeds = {self.io["input_ids"]: ids, self.io["attention_mask"]: np.concatenate([self.mask, mask], axis=1),
                 self.io["position_ids"]: positions}
        feeds.update(zip(self.past_names, self.past))
        return feeds

    def advance(self, outputs: dict[str, np.ndarray], mask: np.ndarray, positions: np.ndarray) -> None:
        """Take the presents (R, kv_heads, T + S, head_dim) as the new past."""
        self.past = [outputs[name] for name in self.present_names]
        self.mask = np.concatenate([self.mask, mask], axis=1)
        self.next_positions = positions[:, -1] + 1
