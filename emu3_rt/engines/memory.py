"""Memory backends: where a decode state's buffers live and how bytes move between them and the host.

A backend allocates zeroed buffers, makes streams (ordered queues of work) and queues 2-D copies on them (`height`
rows of `width` bytes, `pitch` bytes apart, so a KV buffer (R, KV, C, D) takes S new rows per (row, head) at slot
n in one call). Work queued on a stream has landed only after `sync(stream)`; a buffer is freed only once no work
on it is in flight. Addresses are ints (ndarray.ctypes.data, cudaMalloc).

* HostMemory: host memory (onnxruntime CPU, the default; every CPU test runs it). Copies land at once, streams
  are tokens, but it counts streams and allocations like a device does, so leaks show on the CPU.
* CudaMemory: a CUDA device through cuda.bindings (the gpu extra): cudaMalloc, cudaMemcpy2DAsync on the state's
  stream, cudaStreamSynchronize.

tests/async_memory.py holds the asynchronous double (copies land only at sync) that checks the states' syncs.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .base import EngineError

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "float64": 8, "bool": 1}
# onnx TensorProto element types (bf16 has no numpy dtype; engines bind buffers by these)
ONNX_TYPE = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7, "float64": 11, "bool": 9}


@dataclass(eq=False)
class Buffer:
    """A tensor in a backend's memory: address, shape (elements), dtype name. `keep` holds the allocation."""
    ptr: int
    shape: tuple[int, ...]
    dtype: str
    keep: object = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * ITEMSIZE[self.dtype]


class Memory(Protocol):
    device_type: str     # onnxruntime's name for it: "cpu" or "cuda"
    device_id: int

    def alloc(self, shape, dtype: str) -> Buffer: ...   # zeroed

    def free(self, buf: Buffer) -> None: ...

    def stream(self): ...

    def close_stream(self, stream) -> None: ...

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None: ...

    def sync(self, stream) -> None: ...

    def host_view(self, buf: Buffer) -> np.ndarray | None: ...   # host memory only: buf as numpy (no copy)


def _strided(ptr: int, pitch: int, width: int, height: int) -> np.ndarray:
    """A (height, width) uint8 view of host memory at ptr whose rows are pitch bytes apart."""
    span = pitch * (height - 1) + width
    flat = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(ptr))
    return np.lib.stride_tricks.as_strided(flat, (height, width), (pitch, 1))


_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "float64": np.float64, "bool": np.bool_}


class Counts:
    """Streams and buffers a backend has open: what a test reads to find leaks (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.streams = self.buffers = 0
        self.streams_made = 0

    def add(self, streams: int = 0, buffers: int = 0) -> None:
        with self._lock:
            self.streams += streams
            self.buffers += buffers
            self.streams_made += max(streams, 0)


class _Blocks:
    """Freed blocks by size, handed back first-freed first (reuse=True): a state made after another closed gets
    the same addresses in the same order, so the CUDA graphs captured on them replay (ort.GraphIds)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[int, collections.deque] = {}

    def take(self, nbytes: int):
        with self._lock:
            free = self._free.get(nbytes)
            return free.popleft() if free else None

    def give(self, nbytes: int, block) -> None:
        with self._lock:
            self._free.setdefault(nbytes, collections.deque()).append(block)


class HostMemory:
    """Host memory. Streams are ids (work lands at once, so sync has nothing to wait for). reuse: keep freed
    blocks for later allocations of the same size (as CudaMemory does under CUDA graphs)."""
    device_type = "cpu"
    device_id = 0

    def __init__(self, reuse: bool = False):
        self.counts = Counts()
        self._ids = itertools.count(1)
        self._blocks = _Blocks() if reuse else None

    def alloc(self, shape, dtype: str) -> Buffer:
        nbytes = max(int(np.prod(shape)) * ITEMSIZE[dtype], 1)
        raw = None if self._blocks is None else self._blocks.take(nbytes)
        if raw is None:
            raw = np.zeros(nbytes, np.uint8)
        else:
            raw.fill(0)
        self.counts.add(buffers=1)
        return Buffer(raw.ctypes.data, tuple(int(x) for x in shape), dtype, raw)

    def free(self, buf: Buffer) -> None:
        if buf.keep is not None:
            if self._blocks is not None:
                self._blocks.give(buf.keep.nbytes, buf.keep)
            buf.keep = None
            self.counts.add(buffers=-1)

    def stream(self):
        self.counts.add(streams=1)
        return next(self._ids)

    def close_stream(self, stream) -> None:
        self.counts.add(streams=-1)

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        if not (width and height):
            return
        if height == 1 or (dpitch == spitch == width):   # one contiguous run
            ctypes.memmove(dst, src, width * height)
        elif height <= 64:   # a state's (rows x heads) runs: a memmove each beats building strided views (~20x)
            move = ctypes.memmove
            for i in range(height):
                move(dst + i * dpitch, src + i * spitch, width)
        else:
            _strided(dst, dpitch, width, height)[...] = _strided(src, spitch, width, height)

    def sync(self, stream) -> None:
        pass

    def host_view(self, buf: Buffer) -> np.ndarray | None:
        """buf as a numpy array over its memory, no copy (bf16: None, numpy has no such dtype)."""
        if buf.dtype not in _NUMPY:
            return None
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(buf.nbytes, 1)).from_address(buf.ptr))
        return raw[: buf.nbytes].view(_NUMPY[buf.dtype]).reshape(buf.shape)


def check(result):
    """The values of a cuda.bindings call ((err, *values)), or EngineError naming the CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


class CudaMemory:
    """CUDA device `device_id`. Each decode state gets its own stream (made by stream(), destroyed by
    close_stream()); cudaMemcpyDefault lets the driver tell host from device addresses (unified addressing), so one
    copy2d serves every direction. reuse: freed blocks are kept for later allocations of the same size (in the
    order freed), so CUDA graphs captured on them replay for the next state (ort.GraphIds); they go back to the
    driver only with the process."""
    device_type = "cuda"

    def __init__(self, device_id: int, reuse: bool = False):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise EngineError("device decode state needs cuda-python: pip install 'emu3-bundle[gpu]'") from None
        self.device_id, self._rt = device_id, cudart
        self.counts = Counts()
        self._blocks = _Blocks() if reuse else None
        check(cudart.cudaSetDevice(device_id))

    def alloc(self, shape, dtype: str) -> Buffer:
        nbytes = max(int(np.prod(shape)) * ITEMSIZE[dtype], 1)
        check(self._rt.cudaSetDevice(self.device_id))
        ptr = None if self._blocks is None else self._blocks.take(nbytes)
        if ptr is None:
            ptr = int(check(self._rt.cudaMalloc(nbytes)))
        check(self._rt.cudaMemset(ptr, 0, nbytes))
        self.counts.add(buffers=1)
        return Buffer(ptr, tuple(int(x) for x in shape), dtype, nbytes)

    def free(self, buf: Buffer) -> None:
        if buf.keep is not None:
            if self._blocks is not None:
                self._blocks.give(buf.keep, buf.ptr)
            else:
                check(self._rt.cudaFree(buf.ptr))
            buf.keep = None
            self.counts.add(buffers=-1)

    def stream(self):
        check(self._rt.cudaSetDevice(self.device_id))
        s = check(self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking))
        self.counts.add(streams=1)
        return s

    def close_stream(self, stream) -> None:
        check(self._rt.cudaStreamDestroy(stream))
        self.counts.add(streams=-1)

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        if width and height:
            check(self._rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                             self._rt.cudaMemcpyKind.cudaMemcpyDefault, stream))

    def sync(self, stream) -> None:
        check(self._rt.cudaStreamSynchronize(stream))

    def host_view(self, buf: Buffer) -> np.ndarray | None:
        return None
