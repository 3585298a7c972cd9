"""Where a DeviceState's buffers live, and the copies it needs: host <-> buffer and buffer -> buffer, as 2-D
(rows of `width` bytes, `pitch` bytes apart) so a KV buffer (R, KV, C, D) takes S new rows per (row, head) at
slot n in one call. HostMemory: plain host memory (onnxruntime CPU; what the tests run). CudaMemory: a CUDA
device through cuda.bindings (the gpu extra), on its own stream. Addresses are ints (OrtValue.data_ptr(),
cudaMalloc, ndarray.ctypes.data).
"""

from __future__ import annotations

import ctypes

import numpy as np

from .base import EngineError


def _strided(ptr: int, pitch: int, width: int, height: int) -> np.ndarray:
    """A (height, width) uint8 view of host memory at ptr whose rows are pitch bytes apart."""
    span = pitch * (height - 1) + width
    flat = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(ptr))
    return np.lib.stride_tricks.as_strided(flat, (height, width), (pitch, 1))


class HostMemory:
    device_type = "cpu"
    device_id = 0

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        if width and height:
            _strided(dst, dpitch, width, height)[...] = _strided(src, spitch, width, height)

    def zero(self, ptr: int, nbytes: int) -> None:
        ctypes.memset(ptr, 0, nbytes)

    def alloc(self, nbytes: int):
        """(address, keep-alive handle) of nbytes of zeroed memory."""
        buf = np.zeros(max(nbytes, 1), np.uint8)
        return buf.ctypes.data, buf

    def sync(self) -> None:
        pass


def check(result):
    """The values of a cuda.bindings call ((err, *values)), or EngineError naming the CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


class _DeviceAllocation:
    def __init__(self, ptr: int, cudart):
        self.ptr, self._cudart = ptr, cudart

    def __del__(self):
        self._cudart.cudaFree(self.ptr)


class CudaMemory:
    """CUDA device `device_id`. Copies are queued on one stream; sync() waits for them. cudaMemcpyDefault lets
    the driver tell host from device addresses (unified addressing), so one copy2d serves every direction."""
    device_type = "cuda"

    def __init__(self, device_id: int):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise EngineError("device decode state needs cuda-python: pip install 'emu3-bundle[gpu]'") from None
        self.device_id, self._rt = device_id, cudart
        check(cudart.cudaSetDevice(device_id))
        self.stream = check(cudart.cudaStreamCreate())

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        if width and height:
            check(self._rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                             self._rt.cudaMemcpyKind.cudaMemcpyDefault, self.stream))

    def zero(self, ptr: int, nbytes: int) -> None:
        check(self._rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream))

    def alloc(self, nbytes: int):
        ptr = int(check(self._rt.cudaMalloc(max(nbytes, 1))))
        check(self._rt.cudaMemsetAsync(ptr, 0, max(nbytes, 1), self.stream))
        return ptr, _DeviceAllocation(ptr, self._rt)

    def sync(self) -> None:
        check(self._rt.cudaStreamSynchronize(self.stream))
