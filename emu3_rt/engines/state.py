"""DecodeState: one generation's KV cache and step I/O, where the engine computes; the one decode state of every
engine (onnxruntime CPU / CUDA, TensorRT), over a memory backend (engines/memory.py: HostMemory on the CPU, so
every CPU test runs the code a GPU runs).

`engine.new_state(layout, rows)` makes one; `state.step(engine, ids, mask, positions)` runs the step graph on
(R, S) new tokens, writes their K/V rows into the state's buffers and returns the last position's logits (R, V)
on the host; `state.step_and_pick(engine, ids, mask, positions, sampler, feeds)` chains the sampler graph
(export/sampler_graph.py) onto the step on the logits where the step wrote them: only its (B,) ids come back.

Parts, for R rows (cond rows then uncond rows under CFG):
* slots (host): each row's filled length, next position id and slot mask (R, C): 1 = a filled, attended slot.
  Rows have their own lengths: a row rolls back k positions (speculative decoding drops its rejected drafts),
  rows are released and added (continuous batching) without touching the others.
* KV buffers: per layer K and V (R, KV, C, D), capacity C grown by `grow` (kv_cache.capacity_for on the CPU;
  KV_BLOCK multiples when every capacity is a captured CUDA graph); in device memory allocated whole from
  capacity_hint (an image's exact length), in host memory grown (see DecodeState.__init__).
* I/O sets: per new-token count S, ids / positions (R, S), the mask (R, C + S), presents (R, KV, S, D), logits
  (R, V), bound once to the engine and re-bound only after growth; and, chained, the sampler's inputs / outputs.

A step writes ids, positions and the mask columns that changed since that I/O set last ran, executes, copies each
row's S presents into its buffers at the row's length on the engine's memory, and reads the logits (or ids) back,
all on the state's own stream; the state syncs that stream before the host reads, before it frees anything, and
on every failure. Buffer layout only: kv_cache.ConcatCache keeps the legacy concat layout.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from .base import EngineError
from .memory import _NUMPY, ITEMSIZE, Buffer, HostMemory

# the sampler graph's logits input (R, V) float32, chosen-columns output (B,) int64 and log-probs (B,) float32
# (export/sampler_graph.py); its uniforms input is (B,), one per sequence
SAMPLER_LOGITS, SAMPLER_IDS, SAMPLER_LOGPROBS, SAMPLER_UNIFORMS = "logits", "ids", "logprobs", "uniforms"


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
    also counts the sampler's small feeds (h2d) and its ids (d2h); the logits never leave the engine."""
    h2d: int = 0
    d2h: int = 0
    calls: int = 0
    last_h2d: int = 0
    last_d2h: int = 0

    def add(self, h2d: int, d2h: int) -> None:
        self.h2d, self.d2h, self.calls = self.h2d + h2d, self.d2h + d2h, self.calls + 1
        self.last_h2d, self.last_d2h = h2d, d2h


class Owner:
    """A state's tie to the engine that made it: refuses another engine, a closed one, or a collected one."""

    def __init__(self, engine):
        self._ref = weakref.ref(engine)

    def get(self):
        owner = self._ref()
        if owner is None:
            raise EngineError("this decode state's engine no longer exists; start a new generation")
        return owner

    def check(self, engine):
        owner = self.get()
        if engine is not owner:
            raise EngineError(f"this decode state belongs to another engine ({owner.spec.path.name}); a state "
                              f"runs only on the engine whose new_state() made it")
        if owner.closed:
            raise EngineError(f"{owner.spec.path.name}: the engine was closed after this decode state was made; "
                              f"start a new generation")
        return owner


class _Resources:
    """What a state holds in its memory backend: freed by close(), or when the state is collected unclosed (a
    dropped generation must not leak a stream or device memory). Syncs the stream before freeing anything."""

    def __init__(self, memory, stream, owner: Owner):
        self.memory, self.stream, self.owner = memory, stream, owner
        self.buffers: list[Buffer] = []
        self.bindings: list = []      # (engine, binding)
        self.engines: list = []       # engines that ran on this stream (release(stream) at the end)
        self.open = True

    def alloc(self, shape, dtype: str) -> Buffer:
        buf = self.memory.alloc(shape, dtype)
        self.buffers.append(buf)
        return buf

    def alloc_split(self, count: int, shape, dtype: str) -> tuple[Buffer, list[Buffer]]:
        """One block (count, *shape) and its `count` consecutive tensors: every layer's K and V in one allocation,
        so one pitched copy moves a step's new rows of all layers (one call instead of 2 x layers)."""
        block = self.alloc((count, *shape), dtype)
        step = block.nbytes // max(count, 1)
        return block, [Buffer(block.ptr + i * step, tuple(shape), dtype) for i in range(count)]

    def free(self, buffers, bindings=()) -> None:
        """Free some buffers and bindings now (growth): after the work in flight on them."""
        self.memory.sync(self.stream)
        for engine, binding in bindings:
            engine.unbind(binding)
            self.bindings.remove((engine, binding))
        for buf in buffers:
            self.memory.free(buf)
            self.buffers.remove(buf)

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self.memory.sync(self.stream)   # copies in flight read or write these buffers
        finally:
            for engine, binding in self.bindings:
                engine.unbind(binding)
            for engine in self.engines:
                engine.release(self.stream)
            for buf in self.buffers:
                self.memory.free(buf)
            self.buffers, self.bindings, self.engines = [], [], []
            self.memory.close_stream(self.stream)


class _Io:
    """The bound tensors of one (rows, capacity, S) shape. mirror: the slot columns [0, C) of self.mask as last
    written (R, C), so a step sends only the columns that changed."""

    def __init__(self, state: DecodeState, engine, s: int):
        res, r, c, lay = state._res, state.rows, state.capacity, state.layout
        self.s = s
        self.ids, self.pos = res.alloc((r, s), "int64"), res.alloc((r, s), "int64")
        self.mask = res.alloc((r, c + s), "int64")
        # (2L, R, KV, S, D): one block, so the presents of every layer sit at one pitch (DecodeState._store)
        self.present_block, self.presents = res.alloc_split(len(lay.present_names),
                                                            (r, lay.kv_heads, s, lay.head_size), lay.dtype)
        self.logits = res.alloc((r, state.columns), "float32")
        self.mirror = np.zeros((r, c), np.int64)
        inputs = {lay.input_ids: self.ids, lay.position_ids: self.pos, lay.attention_mask: self.mask,
                  **dict(zip(lay.past_names, state.kv))}
        outputs = {lay.logits: self.logits, **dict(zip(lay.present_names, self.presents))}
        # one-token steps of one capacity replay the same addresses: an engine may capture them (CUDA graphs)
        self.binding = engine.bind(res.memory, res.stream, inputs, outputs, graph=s == 1)
        res.bindings.append((engine, self.binding))
        self.engine = engine
        # chained sampler (made on first use): (its engine, binding, input buffers by name, ids buffer)
        self.pick: tuple | None = None

    def buffers(self) -> list[Buffer]:
        out = [self.ids, self.pos, self.mask, self.present_block, self.logits]
        if self.pick is not None:
            out += [*self.pick[2].values(), *self.pick[3]]
        return out

    def bindings(self) -> list:
        out = [(self.engine, self.binding)]
        return out + ([(self.pick[0], self.pick[1])] if self.pick is not None else [])


class DecodeState:
    """R rows of one generation on `engine` (a base.StepEngine) in `memory` (the engine's by default). columns:
    the logits width V. grow(needed) -> the capacity to allocate for `needed` positions."""

    def __init__(self, engine, layout: KVLayout, rows: int, columns: int, capacity_hint: int = 0,
                 memory=None, grow: Callable[[int], int] | None = None, whole: bool | None = None):
        from ..kv_cache import capacity_for

        if layout.kind != "buffer":
            raise EngineError("a decode state needs a buffer-layout bundle (kv_cache 'buffer'); "
                              "kv_cache.ConcatCache runs the concat layout")
        if layout.dtype not in ITEMSIZE:
            raise EngineError(f"no KV cache for dtype {layout.dtype}")
        if rows < 1:
            raise ValueError(f"a decode state needs at least one row, got {rows}")
        self.layout, self.columns = layout, columns
        self.memory = engine.memory if memory is None else memory
        self._owner = Owner(engine)
        self._grow = grow or capacity_for
        self._res = _Resources(self.memory, self.memory.stream(), self._owner)
        self._finalizer = weakref.finalize(self, self._res.close)
        self.traffic = Traffic()
        self.rows = rows
        self.kv: list[Buffer] = []                       # per layer K, V (R, KV, C, D): views of one block
        self._kv_block: Buffer | None = None             # (2L, R, KV, C, D)
        self.lengths = np.zeros(rows, np.int64)          # (R,) filled slots per row
        self.next_positions = np.zeros(rows, np.int64)   # (R,) position id of each row's next token
        self.live = np.ones(rows, bool)                  # (R,) rows in use (release_rows / add_rows)
        self.slot_mask = np.zeros((rows, 0), np.int64)   # (R, C) 1 = filled and attended
        self._ios: dict[int, _Io] = {}
        self._keep: list[np.ndarray] = []                # host arrays of copies in flight
        # whole: allocate capacity_hint's slots now (device memory: one allocation, no growth copies, one CUDA
        # graph per generation). Host memory grows instead: onnxruntime's CPU attention reads every slot of the
        # capacity, so a 32x32 CFG image on the mid checkpoint ran 11 % slower with its whole capacity from the
        # first step (A/B in docs/performance.md), while growth copies cost ~nothing there.
        whole = self.memory.device_type != "cpu" if whole is None else whole
        self._resize(rows, self._grow(max(capacity_hint if whole else 1, 1)))

    # ---- sizes ----

    @property
    def capacity(self) -> int:
        return self.slot_mask.shape[1]

    @property
    def length(self) -> int:
        """The longest row's filled slots."""
        return int(self.lengths.max(initial=0))

    @property
    def closed(self) -> bool:
        return not self._res.open

    @property
    def stream(self):
        return self._res.stream

    def reserve(self, needed: int) -> None:
        """Hold at least `needed` slots per row (grown by `grow`): new zeroed buffers with the filled slots copied
        on the engine's memory, the bindings re-made on next use."""
        if needed > self.capacity:
            self._resize(self.rows, self._grow(needed))

    def _resize(self, rows: int, cap: int) -> None:
        lay, old, old_cap, keep = self.layout, self.kv, self.capacity, min(self.rows, rows)
        row = lay.head_size * ITEMSIZE[lay.dtype]       # bytes of one position of one head
        n = self.length
        block, grown = self._res.alloc_split(len(lay.past_names), (rows, lay.kv_heads, cap, lay.head_size), lay.dtype)
        if old and keep == self.rows == rows:   # every layer's (R x KV) runs of n slots at once, old pitch -> new
            self.memory.copy2d(block.ptr, cap * row, self._kv_block.ptr, old_cap * row, n * row,
                               len(old) * rows * lay.kv_heads, self.stream)
        else:
            for new, buf in zip(grown, old):   # (kept rows x KV) runs of n slots
                self.memory.copy2d(new.ptr, cap * row, buf.ptr, old_cap * row, n * row, keep * lay.kv_heads,
                                   self.stream)
        self._drop_ios()
        self._res.free([self._kv_block] if self._kv_block is not None else [])   # syncs: the copies have landed
        self.kv, self._kv_block = grown, block
        mask = np.zeros((rows, cap), np.int64)
        mask[:keep, :old_cap] = self.slot_mask[:keep]
        self.slot_mask = mask
        if rows != self.rows:
            pad = rows - self.rows
            self.lengths = np.concatenate([self.lengths, np.zeros(pad, np.int64)])[:rows]
            self.next_positions = np.concatenate([self.next_positions, np.zeros(pad, np.int64)])[:rows]
            self.live = np.concatenate([self.live, np.zeros(pad, bool)])[:rows]
            self.rows = rows

    def _drop_ios(self, keep: Callable[[int], bool] = lambda s: False) -> None:
        drop = [io for s, io in self._ios.items() if not keep(s)]
        self._ios = {s: io for s, io in self._ios.items() if keep(s)}
        self._res.free([b for io in drop for b in io.buffers()], [b for io in drop for b in io.bindings()])

    # ---- rows: per-row lengths, rollback, release and add ----

    def rollback(self, rows, k) -> None:
        """Forget the last k positions of `rows` (an index, indices or a mask; k: one count or one per row): their
        slots are unmasked and refilled by the next step, their position ids reused."""
        idx = np.arange(self.rows)[rows]
        k = np.broadcast_to(np.asarray(k, np.int64), np.shape(idx))
        if (k < 0).any() or (k > self.lengths[idx]).any():
            raise ValueError(f"cannot roll back {k.tolist()} positions of rows holding {self.lengths[idx].tolist()}")
        for r, n in zip(np.atleast_1d(idx), np.atleast_1d(k)):
            end = self.lengths[r]
            self.slot_mask[r, end - n: end] = 0
            self.lengths[r] -= n
            self.next_positions[r] -= n

    def release_rows(self, rows) -> None:
        """Free `rows` for reuse by add_rows: emptied (length 0, nothing attended); steps no longer store their
        K/V, and the other rows are untouched."""
        idx = np.atleast_1d(np.arange(self.rows)[rows])
        self.live[idx] = False
        self.lengths[idx] = self.next_positions[idx] = 0
        self.slot_mask[idx] = 0

    def add_rows(self, n: int) -> np.ndarray:
        """n empty rows (released ones first, then new ones: the buffers grow by rows, keeping every row): their
        indices (n,). A new row starts at length 0 and position 0; the next steps feed it with the others."""
        free = np.flatnonzero(~self.live)[:n]
        if len(free) < n:
            extra = n - len(free)
            self._resize(self.rows + extra, self.capacity)
            free = np.concatenate([free, np.arange(self.rows - extra, self.rows)])
        self.live[free] = True
        self.lengths[free] = self.next_positions[free] = 0
        self.slot_mask[free] = 0
        return free

    def adopt(self, src: DecodeState, src_rows, dst_rows) -> None:
        """Copy rows of another state (same layout, same memory backend) into live rows of this one: their filled
        K/V slots, lengths, next positions and slot masks. A request prefilled in a state of its own joins a
        running generation this way (continuous batching) without the other rows running its prompt."""
        src_rows, dst_rows = np.atleast_1d(src_rows), np.atleast_1d(dst_rows)
        if src.layout != self.layout or src.memory is not self.memory:
            raise EngineError("adopt needs a state of the same layout in the same memory")
        if len(src_rows) != len(dst_rows) or not self.live[dst_rows].all():
            raise ValueError("adopt copies into as many live rows (add_rows) as it is given source rows")
        lay, kvh = self.layout, self.layout.kv_heads
        row = lay.head_size * ITEMSIZE[lay.dtype]       # bytes of one position of one head
        self.reserve(int(src.lengths[src_rows].max(initial=0)))
        c, sc = self.capacity, src.capacity
        for s, d in zip(src_rows.tolist(), dst_rows.tolist()):
            n = int(src.lengths[s])
            for buf, sbuf in zip(self.kv, src.kv):   # (KV, n) slots of row s -> row d
                self.memory.copy2d(buf.ptr + d * kvh * c * row, c * row, sbuf.ptr + s * kvh * sc * row, sc * row,
                                   n * row, kvh, self.stream)
            self.lengths[d], self.next_positions[d] = n, src.next_positions[s]
            self.slot_mask[d] = 0
            self.slot_mask[d, :n] = src.slot_mask[s, :n]
        self._sync()   # the copies have landed before the caller closes src

    # ---- steps ----

    def _write(self, buf: Buffer, column: int, width: int, host: np.ndarray) -> int:
        """Host (R, w) columns into buf (R, width) at `column`, queued on the stream; returns the bytes sent."""
        host = np.ascontiguousarray(host, dtype=_NUMPY[buf.dtype])
        item, w = ITEMSIZE[buf.dtype], host.shape[1] if host.ndim == 2 else 1
        if host.size:
            self.memory.copy2d(buf.ptr + item * column, item * width, host.ctypes.data, item * w, item * w,
                               host.shape[0] if host.ndim else 1, self.stream)
            self._keep.append(host)   # alive until the stream is synchronized
        return host.nbytes

    def _read(self, buf: Buffer) -> np.ndarray:
        """buf copied to a new host array, queued (valid after sync)."""
        out = np.empty(buf.shape, _NUMPY[buf.dtype])
        self.memory.copy2d(out.ctypes.data, out.nbytes, buf.ptr, out.nbytes, out.nbytes, 1, self.stream)
        return out

    def _sync(self) -> None:
        if self._res.open:   # a closed state's stream is gone (and its work was synchronized at close)
            self.memory.sync(self.stream)
        self._keep = []

    def _run(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[_Io, int]:
        """Write the step's inputs, execute and queue the K/V copies: (its I/O set, bytes sent). The caller syncs."""
        if self.closed:
            raise ValueError("this decode state was closed")
        self._owner.check(engine)
        if ids.shape[0] != self.rows:
            raise ValueError(f"ids must have {self.rows} rows (this state's), got {ids.shape[0]}")
        if engine not in self._res.engines:
            self._res.engines.append(engine)
        s = ids.shape[1]
        self.reserve(int(self.lengths[self.live].max(initial=0)) + s)
        if s <= 2 and any(k > 2 for k in self._ios):   # decoding (S = 2: a forced token rides with the next)
            self._drop_ios(lambda k: k <= 2)            # drops the prefill chunk's scratch
        io = self._ios.get(s) or self._ios.setdefault(s, _Io(self, engine, s))
        c = self.capacity
        # host -> engine: ids, positions, the slot columns changed since this I/O set last ran, the new columns
        sent = self._write(io.ids, 0, s, ids) + self._write(io.pos, 0, s, positions)
        changed = np.flatnonzero((io.mirror != self.slot_mask).any(axis=0))
        if changed.size:
            lo, hi = int(changed[0]), int(changed[-1]) + 1
            sent += self._write(io.mask, lo, c + s, self.slot_mask[:, lo:hi])
            io.mirror[:, lo:hi] = self.slot_mask[:, lo:hi]
        sent += self._write(io.mask, c, c + s, mask)
        engine.execute(io.binding)
        self._store(io, s, mask, positions)
        return io, sent

    def _store(self, io: _Io, s: int, mask: np.ndarray, positions: np.ndarray) -> None:
        """Each live row's S presents (KV, S, D) -> its buffers at its own length, on the engine's memory: one copy
        per run of consecutive rows of equal length ((rows x KV) rows of S positions)."""
        lay, c = self.layout, self.capacity
        row, kvh = lay.head_size * ITEMSIZE[lay.dtype], lay.kv_heads
        n = int(self.lengths[0])
        if self.live.all() and (self.lengths == n).all():   # the usual step: all layers and rows in one copy
            self.memory.copy2d(self._kv_block.ptr + n * row, c * row, io.present_block.ptr, s * row, s * row,
                               len(self.kv) * self.rows * kvh, self.stream)
            self.slot_mask[:, n: n + s] = mask
            self.lengths += s
            self.next_positions = positions[:, -1] + 1
            return
        r = 0
        while r < self.rows:
            if not self.live[r]:
                r += 1
                continue
            n, end = int(self.lengths[r]), r + 1
            while end < self.rows and self.live[end] and self.lengths[end] == n:
                end += 1
            for buf, present in zip(self.kv, io.presents):
                self.memory.copy2d(buf.ptr + (r * kvh * c + n) * row, c * row, present.ptr + r * kvh * s * row,
                                   s * row, s * row, (end - r) * kvh, self.stream)
            self.slot_mask[r:end, n: n + s] = mask[r:end]
            r = end
        self.lengths[self.live] += s
        self.next_positions[self.live] = positions[self.live, -1] + 1

    def step(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run the step on (R, S) new tokens, keep their K/V, return the last position's logits (R, V)."""
        try:
            io, sent = self._run(engine, ids, mask, positions)
            logits = self._read(io.logits)
        finally:
            self._sync()
        self.traffic.add(sent, logits.nbytes)
        return logits

    def step_and_pick(self, engine, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, sampler,
                      feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The step, then `sampler` (a base.BoundEngine) with its logits input bound to the step's logits buffer:
        the logits never leave the engine and are not counted. Only the sampler's small feeds that changed since
        the last step (h2d: the per-row kinds and uniforms; the scalars once) and its (B,) ids (d2h) cross, next to
        the step's ids / positions / mask slots. Unchecked ids (GraphSampler.checked)."""
        if sampler.closed:   # before the step runs
            raise EngineError(f"{sampler.spec.path.name}: the engine is closed")
        small = {name: np.asarray(value) for name, value in feeds.items()}
        try:
            io, sent = self._run(engine, ids, mask, positions)
            if sampler not in self._res.engines:
                self._res.engines.append(sampler)
            pick = self._pick(io, sampler, small)
            last = pick[5]
            for name, value in small.items():   # only what changed since the last step (the scalars stay put)
                raw = value.tobytes()
                if last.get(name) == raw:
                    continue
                sent += self._write(pick[2][name], 0, max(value.size, 1), value.reshape(1, -1))
                last[name] = raw
            sampler.execute(pick[1])
            chosen = self._read(pick[3][0])
        finally:
            self._sync()
        self.traffic.add(sent, chosen.nbytes)
        return chosen

    def _pick(self, io: _Io, sampler, small: dict[str, np.ndarray]) -> tuple:
        """The chained sampler's binding on this I/O set (made once; re-made after growth or for another sampler):
        (sampler, binding, input buffers, (ids, logprobs) buffers)."""
        shapes = {name: (v.shape, v.dtype) for name, v in small.items()}
        if io.pick is not None and io.pick[0] is sampler and io.pick[4] == shapes:
            return io.pick
        if io.pick is not None:
            old, io.pick = io.pick, None
            self._res.free([*old[2].values(), *old[3]], [(old[0], old[1])])
        b = small[SAMPLER_UNIFORMS].shape[0]
        inputs = {name: self._res.alloc(shape, dtype.name) for name, (shape, dtype) in shapes.items()}
        outputs = (self._res.alloc((b,), "int64"), self._res.alloc((b,), "float32"))
        binding = sampler.bind(self.memory, self.stream, {SAMPLER_LOGITS: io.logits, **inputs},
                               {SAMPLER_IDS: outputs[0], SAMPLER_LOGPROBS: outputs[1]})
        self._res.bindings.append((sampler, binding))
        io.pick = (sampler, binding, inputs, outputs, shapes, {})   # {}: the feeds as last written
        return io.pick

    def close(self) -> None:
        """Release the buffers, bindings and stream, after the work in flight on them (idempotent)."""
        self._ios, self.kv, self._kv_block, self._keep = {}, [], None, []
        self._finalizer()


# ---- an engine with only run(feeds), as a step engine ----

class _FeedsBinding:
    def __init__(self, memory, stream, inputs: dict, outputs: dict):
        self.memory, self.stream, self.inputs, self.outputs = memory, stream, inputs, outputs
        self.results: dict = {}   # the last run's outputs: alive until the copies out of them have landed


class HostStepEngine:
    """A base.StepEngine over any engine with run(feeds) (a wrapper that counts, times or fails runs): its states
    are DecodeStates in host memory, and execute() hands the bound buffers to run() as numpy views and copies the
    results into the bound outputs. The same state, copies and syncs as onnxruntime's own binding."""

    def __init__(self, inner):
        self.inner, self.spec = inner, inner.spec
        self.memory = HostMemory()

    @property
    def closed(self) -> bool:
        return False

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.run(feeds)

    def new_state(self, layout: KVLayout, rows: int, capacity_hint: int = 0, memory=None):
        from ..kv_cache import ConcatCache

        if layout.kind != "buffer":
            return ConcatCache(layout, rows, owner=self)
        return DecodeState(self, layout, rows, self.spec.output(layout.logits).dims[1], capacity_hint, memory)

    def bind(self, memory, stream, inputs: dict, outputs: dict, graph: bool = False) -> _FeedsBinding:
        if memory.host_view(next(iter(inputs.values()))) is None:
            raise EngineError(f"{self.spec.path.name}: a run() engine needs its tensors in host memory (numpy)")
        return _FeedsBinding(memory, stream, inputs, outputs)

    def execute(self, binding: _FeedsBinding) -> None:
        mem = binding.memory
        mem.sync(binding.stream)   # the inputs queued so far have landed
        results = self.inner.run({name: mem.host_view(buf) for name, buf in binding.inputs.items()})
        binding.results = {}
        for name, buf in binding.outputs.items():
            value = np.ascontiguousarray(results[name], dtype=mem.host_view(buf).dtype)
            if value.shape != buf.shape:
                raise EngineError(f"{self.spec.path.name}: output {name!r} is {value.shape}, bound {buf.shape}")
            binding.results[name] = value
            mem.copy2d(buf.ptr, value.nbytes, value.ctypes.data, value.nbytes, value.nbytes, 1, binding.stream)

    def unbind(self, binding) -> None:
        pass

    def release(self, stream) -> None:
        pass
