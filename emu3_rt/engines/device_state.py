"""DeviceState: a decode state whose KV buffers and step I/O live where the engine computes (engines/state.py).

Per layer, K and V buffers (R, KV, C, D) of capacity C (grown in kv_cache.KV_BLOCK blocks) stay in the engine's
memory. For each new-token count S the state keeps one bound I/O set: ids/positions (R, S), the attention mask
(R, C + S), the presents (R, KV, S, D) and the logits (R, V), bound once (onnxruntime IOBinding or TensorRT
tensor addresses) and re-bound only after growth. A step writes ids, positions and the mask columns that changed,
runs the graph, copies the S present rows into the buffers at slot n on the device, and reads the logits back;
or, chained (step_and_pick), runs the sampler graph on the logits buffer in place and reads back only the ids.
Buffer-layout bundles only: the concat layout keeps the host KVCache.
"""

from __future__ import annotations

import numpy as np

from .. import kv_cache
from .base import EngineError
from .state import SAMPLER_IDS, SAMPLER_LOGITS, KVLayout, Owner, Traffic

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
# onnx TensorProto element types: OrtValues are made from these, so bf16 never needs a numpy dtype
ONNX_TYPE = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7}


class _Io:
    """The bound tensors of one (capacity, S) shape. mask_upto: slot columns [0, mask_upto) of the device mask
    hold the host's slot mask (the rest are zero, as allocated)."""

    def __init__(self, state: DeviceState, s: int):
        r, c, lay, alloc = state.rows, state.capacity, state.layout, state.runner.alloc
        self.s = s
        self.ids, self.pos = alloc((r, s), "int64"), alloc((r, s), "int64")
        self.mask = alloc((r, c + s), "int64")
        self.presents = [alloc((r, lay.kv_heads, s, lay.head_size), lay.dtype) for _ in lay.present_names]
        self.logits = alloc((r, state.columns), "float32")
        self.mask_upto = 0
        # (sampler session, its IOBinding with logits bound to self.logits): made on the first chained step
        self.pick: tuple | None = None
        inputs = {lay.input_ids: self.ids, lay.position_ids: self.pos, lay.attention_mask: self.mask,
                  **dict(zip(lay.past_names, state.kv))}
        outputs = {lay.logits: self.logits, **dict(zip(lay.present_names, self.presents))}
        self.binding = state.runner.bind(inputs, outputs, s, c)
        # onnxruntime CUDA graphs: one-token steps of this capacity replay one captured graph (0: no graph, for
        # prefill chunks and the S = 2 step after a forced token)
        self.graph_id = state.runner.graph_id() if s == 1 else 0


class DeviceState:
    def __init__(self, engine, runner, layout: KVLayout, rows: int, columns: int, capacity_hint: int = 0):
        if layout.kind != "buffer":
            raise EngineError("a device decode state needs a buffer-layout bundle (kv_cache 'buffer')")
        if layout.dtype not in ITEMSIZE:
            raise EngineError(f"no device KV cache for dtype {layout.dtype}")
        self.rows, self.layout, self.columns, self.runner = rows, layout, columns, runner
        self.memory = runner.memory
        self.kv: list = []
        self.slot_mask = np.zeros((rows, 0), dtype=np.int64)   # host mirror (R, C): 1 = filled, attended
        self.length = 0
        self.next_positions = np.zeros(rows, dtype=np.int64)
        self.traffic = Traffic()
        self._owner = Owner(engine)
        self._ios: dict[int, _Io] = {}
        self._closed = False
        self._keep: list[np.ndarray] = []   # host arrays of copies in flight
        self._reserve(max(capacity_hint, 1))

    @property
    def capacity(self) -> int:
        return self.slot_mask.shape[1]

    def _reserve(self, needed: int) -> None:
        """Grow to hold `needed` positions (a multiple of KV_BLOCK): new zeroed buffers, the filled rows copied
        on the device, every binding dropped (re-bound on next use)."""
        if needed <= self.capacity:
            return
        cap, old_cap, n = -(-needed // kv_cache.KV_BLOCK) * kv_cache.KV_BLOCK, self.capacity, self.length
        row = self.layout.head_size * ITEMSIZE[self.layout.dtype]        # bytes of one position of one head
        shape = (self.rows, self.layout.kv_heads, cap, self.layout.head_size)
        grown = [self.runner.alloc(shape, self.layout.dtype) for _ in self.layout.past_names]
        for new, old in zip(grown, self.kv):   # (R * KV) rows of n positions, old pitch -> new pitch
            self.memory.copy2d(new.ptr, cap * row, old.ptr, old_cap * row, n * row, self.rows * self.layout.kv_heads)
        self.memory.sync()
        self.kv, self._ios = grown, {}
        mask = np.zeros((self.rows, cap), dtype=np.int64)
        mask[:, :n] = self.slot_mask[:, :n]
        self.slot_mask = mask

    def _write(self, buf, column: int, width: int, host: np.ndarray) -> int:
        """Host (R, w) int64 columns into buf (R, width) at `column`; returns the bytes sent."""
        host = np.ascontiguousarray(host, dtype=np.int64)
        w = host.shape[1]
        self.memory.copy2d(buf.ptr + 8 * column, 8 * width, host.ctypes.data, 8 * w, 8 * w, host.shape[0])
        self._keep.append(host)   # alive until the copies are synchronized
        return host.nbytes

    def step(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        io, sent = self._run(engine, ids, mask, positions)
        logits = np.empty((self.rows, self.columns), np.float32)
        self.memory.copy2d(logits.ctypes.data, logits.nbytes, io.logits.ptr, logits.nbytes, logits.nbytes, 1)
        self.memory.sync()
        self.traffic.add(sent, logits.nbytes)
        return logits

    def step_and_pick(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, sampler,
                      feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The step, then `sampler` (an onnxruntime engine on this state's device) with its logits input bound to
        the step's logits buffer: the logits never leave the engine and are not counted. Only the sampler's small
        feeds (h2d) and its (B,) ids (d2h) cross, next to the step's ids / positions / mask slots."""
        session = getattr(sampler, "session", None)   # first: a closed sampler fails before the step runs
        if session is None:
            raise EngineError(f"the sampler chained to a device decode state must be an onnxruntime engine, got "
                              f"{type(sampler).__name__}")
        io, sent = self._run(engine, ids, mask, positions)
        if io.pick is None or io.pick[0] is not session:   # bound once per I/O set (re-made after growth)
            binding = session.io_binding()
            binding.bind_input(SAMPLER_LOGITS, self.memory.device_type, self.memory.device_id, np.float32,
                               [self.rows, self.columns], io.logits.ptr)
            binding.bind_output(SAMPLER_IDS, "cpu")
            io.pick = (session, binding)
        binding = io.pick[1]
        small = {name: np.ascontiguousarray(value) for name, value in feeds.items()}   # alive until the run ends
        for name, value in small.items():
            binding.bind_cpu_input(name, value)
        try:
            session.run_with_iobinding(binding)
        except Exception as e:
            raise EngineError(f"{sampler.spec.path.name}: run failed ({str(e).splitlines()[0][:200]})") from None
        chosen = binding.copy_outputs_to_cpu()[0]
        self.memory.sync()   # the K/V copies of the step
        self.traffic.add(sent + sum(v.nbytes for v in small.values()), chosen.nbytes)
        return chosen

    def _run(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[_Io, int]:
        """Write the step's inputs, run it and queue the K/V copies (the caller syncs): (its I/O set, bytes sent)."""
        self._owner.check(engine)
        if self._closed:
            raise ValueError("this decode state was closed")
        if ids.shape[0] != self.rows:
            raise ValueError(f"ids must have {self.rows} rows (this state's), got {ids.shape[0]}")
        s, n = ids.shape[1], self.length
        self._reserve(n + s)
        if s <= 2:   # decoding (S = 2: a forced token rides with the next, generate.py): drop prefill scratch
            self._ios = {k: v for k, v in self._ios.items() if k <= 2}
        io = self._ios.get(s) or self._ios.setdefault(s, _Io(self, s))
        c, self._keep = self.capacity, []
        # host -> engine: ids, positions, the slot columns filled since this I/O set last ran, the new columns
        sent = self._write(io.ids, 0, s, ids) + self._write(io.pos, 0, s, positions)
        sent += self._write(io.mask, io.mask_upto, c + s, self.slot_mask[:, io.mask_upto:n])
        sent += self._write(io.mask, c, c + s, mask)
        io.mask_upto = n
        self.memory.sync()
        self._keep = []
        self.runner.run(io.binding, io.graph_id)
        # presents (R, KV, S, D) -> buffers at slot n, on the device: (R * KV) rows of S positions
        row = self.layout.head_size * ITEMSIZE[self.layout.dtype]
        for buf, present in zip(self.kv, io.presents):
            self.memory.copy2d(buf.ptr + n * row, c * row, present.ptr, s * row, s * row,
                               self.rows * self.layout.kv_heads)
        self.slot_mask[:, n: n + s] = mask
        self.length = n + s
        self.next_positions = positions[:, -1] + 1
        return io, sent

    def close(self) -> None:
        """Release the buffers and bindings (idempotent)."""
        self._closed, self.kv, self._ios = True, [], {}


# ---- onnxruntime: IOBinding over OrtValues ----

class _Value:
    """An OrtValue, its address and shape."""

    def __init__(self, value, shape):
        self.value, self.ptr, self.shape = value, value.data_ptr(), tuple(shape)


class OrtRunner:
    """Binds a DeviceState's tensors to one onnxruntime session on `memory` ("cpu" or "cuda") and runs it.
    cuda_graph: decode steps run under CUDA graphs (the session must have been made with enable_cuda_graph); every
    (state, capacity) gets its own graph id, because a captured graph holds its buffers' addresses."""

    def __init__(self, ort, session, memory, name: str, graph_ids=None):
        self.ort, self.session, self.memory, self.name, self._graph_ids = ort, session, memory, name, graph_ids

    def alloc(self, shape, dtype: str) -> _Value:
        v = self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), ONNX_TYPE[dtype], self.memory.device_type,
                                                           self.memory.device_id)
        out = _Value(v, shape)
        self.memory.zero(out.ptr, int(np.prod(shape)) * ITEMSIZE[dtype])
        return out

    def bind(self, inputs: dict, outputs: dict, s: int, capacity: int):
        b = self.session.io_binding()
        for name, v in inputs.items():
            b.bind_ortvalue_input(name, v.value)
        for name, v in outputs.items():
            b.bind_ortvalue_output(name, v.value)
        return b

    def graph_id(self) -> int:
        return 0 if self._graph_ids is None else next(self._graph_ids)

    def run(self, binding, graph_id: int) -> None:
        opts = self.ort.RunOptions()
        if self._graph_ids is not None:   # -1: prefill chunks run without a graph
            opts.add_run_config_entry("gpu_graph_id", str(graph_id or -1))
        try:
            self.session.run_with_iobinding(binding, opts)
        except Exception as e:
            raise EngineError(f"{self.name}: run failed ({str(e).splitlines()[0][:200]})") from None
