"""TrtEngine: a TensorRT plan built on this GPU by `python -m export.build_trt`, run with cuda.bindings.

Plans are executables: one is loaded only from the bundle's own `trt/` directory, only when `trt/plans.json`
records this GPU's compute capability and this TensorRT version, and only when its sha256 and the sha256 of the
ONNX it was built from match. tensorrt and cuda-python are imported on first use (`pip install emu3-bundle[trt]`).

`run(feeds)` (VQ graphs, samplers): host numpy in, host numpy out, copied per call. The step graph decodes through
`new_state()`: a DeviceState whose KV buffers stay on the GPU, bound to the plan's decode profile (S = 1) or prefill
profile by tensor address, set again only when another I/O set ran last. Not run on a GPU in this project yet.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from ..bundle import Bundle, GraphSpec, sha256_file
from .base import EngineError, check_io
from .memory import check as _check

# TensorRT DataType names -> bundle dtypes (bf16 has no numpy type; only device states hold it)
_TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


def plan_for(bundle: Bundle, key: str) -> Path:
    """The verified plan path for graph `key` ("decoder", "image_decoder", "vq_encoder", "vq_decoder"), or
    EngineError. A `--head both` bundle needs a plan for its image step graph too (export.build_trt builds every
    graph the bundle has)."""
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EngineError("TensorRT needs the trt extra: pip install 'emu3-bundle[trt]'") from None
    trt_dir = bundle.root / "trt"
    try:
        record = json.loads((trt_dir / "plans.json").read_text())
        entry = record["plans"][key]
    except (OSError, ValueError, KeyError):
        graph = getattr(bundle, key).path.stem
        raise EngineError(f"{trt_dir}: no TensorRT plan for {key} ({graph}); run python -m export.build_trt "
                          f"--bundle {bundle.root}") from None
    prop = _check(cudart.cudaGetDeviceProperties(0))
    sm = f"{prop.major}.{prop.minor}"
    if record.get("sm") != sm or record.get("tensorrt") != trt.__version__:
        raise EngineError(f"{trt_dir}: plans are for sm {record.get('sm')} / TensorRT {record.get('tensorrt')}, "
                          f"this is sm {sm} / TensorRT {trt.__version__}; rebuild them")
    name = entry.get("filename", "")
    path = trt_dir / name
    if not name or Path(name).name != name or path.is_symlink() or not path.is_file():
        raise EngineError(f"{trt_dir}: plan {name!r} must be a regular file inside the bundle's trt/ directory")
    spec_file = getattr(bundle, key).path.name
    if entry.get("onnx_sha256") != bundle.manifest["files"][spec_file]["sha256"]:
        raise EngineError(f"{path.name}: built from another {spec_file}; rebuild the plans")
    if sha256_file(path) != entry.get("sha256"):
        raise EngineError(f"{path.name}: sha256 does not match trt/plans.json; refusing to load it")
    return path


class TrtEngine:
    def __init__(self, spec: GraphSpec, plan: Path, device_id: int = 0):
        self.spec, self.plan, self.device_id = spec, plan, device_id
        self._lock = threading.Lock()
        self._engine = None
        self.closed = False
        self._bound: dict[int, object] = {}   # context index -> the I/O set whose addresses it holds

    def _load(self):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        _check(cudart.cudaSetDevice(self.device_id))
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            raise EngineError(f"{self.plan.name}: TensorRT could not deserialize the plan")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        kinds = {n: _TRT_TYPES.get(engine.get_tensor_dtype(n).name, str(engine.get_tensor_dtype(n))) for n in names}
        self._dtype = {n: np.dtype(k) for n, k in kinds.items() if k != "bfloat16"}
        # -1: an axis the plan's optimization profiles keep dynamic
        io = {n: (kinds[n], tuple(d if d >= 0 else None for d in engine.get_tensor_shape(n))) for n in names}
        check_io(self.spec, {n: io[n] for n in self._inputs}, {n: io[n] for n in self._outputs})
        # one execution context per optimization profile (the step graph has prefill and decode profiles)
        self._contexts = []
        for p in range(engine.num_optimization_profiles):
            ctx = engine.create_execution_context()
            self._stream = getattr(self, "_stream", None) or _check(cudart.cudaStreamCreate())
            ctx.set_optimization_profile_async(p, self._stream)
            self._contexts.append(ctx)
        self._engine = engine

    def _profile(self, feeds) -> int:
        ids = feeds.get("input_ids")
        past = feeds.get(self._inputs[-1]) if len(self._inputs) > 3 else None
        decode = ids is not None and ids.shape[1] == 1 and past is not None and past.shape[2] > 0
        return 1 if decode and len(self._contexts) > 1 else 0

    def _ready(self):
        if self.closed:
            raise EngineError(f"{self.plan.name}: the engine is closed")
        if self._engine is None:
            self._load()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as cudart

        with self._lock:
            self._ready()
            if any(n not in self._dtype for n in self._inputs + self._outputs):
                raise EngineError(f"{self.plan.name}: bf16 tensors cannot cross as numpy; decode with new_state()")
            ctx = self._contexts[self._profile(feeds)]
            self._bound.clear()   # the addresses set below replace any decode state's
            buffers = []
            try:
                for name in self._inputs:
                    host = np.ascontiguousarray(feeds[name], dtype=self._dtype[name])
                    ctx.set_input_shape(name, host.shape)
                    dev = _check(cudart.cudaMallocAsync(max(host.nbytes, 1), self._stream))
                    buffers.append(dev)
                    _check(cudart.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
                    ctx.set_tensor_address(name, int(dev))
                out = {}
                for name in self._outputs:
                    out[name] = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype[name])
                    dev = _check(cudart.cudaMallocAsync(max(out[name].nbytes, 1), self._stream))
                    buffers.append(dev)
                    ctx.set_tensor_address(name, int(dev))
                if not ctx.execute_async_v3(self._stream):
                    raise EngineError(f"{self.plan.name}: TensorRT execution failed")
                for name, dev in zip(self._outputs, buffers[len(self._inputs):]):
                    _check(cudart.cudaMemcpyAsync(out[name].ctypes.data, dev, out[name].nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
                _check(cudart.cudaStreamSynchronize(self._stream))
                return out
            finally:
                for dev in buffers:
                    cudart.cudaFreeAsync(dev, self._stream)

    # ---- decode states (engines/state.py) ----

    def new_state(self, layout, rows: int, capacity_hint: int = 0):
        """One generation's decode state: KV buffers and step I/O in device memory (DeviceState)."""
        from .. import kv_cache
        from .device_state import DeviceState
        from .memory import CudaMemory

        if layout.kind != "buffer":   # legacy concat bundles keep the host cache
            return kv_cache.KVCache(layout, rows, capacity_hint, owner=self)
        with self._lock:
            self._ready()
        runner = _TrtRunner(self, CudaMemory(self.device_id))
        return DeviceState(self, runner, layout, rows, self.spec.output(layout.logits).dims[1], capacity_hint)

    def close(self) -> None:
        """Drop the plan and contexts; states made by this engine are refused from now on (idempotent)."""
        with self._lock:
            self.closed, self._engine, self._contexts, self._bound = True, None, [], {}


class _Buffer:
    def __init__(self, ptr: int, keep, shape):
        self.ptr, self._keep, self.shape = ptr, keep, tuple(shape)


class _TrtRunner:
    """DeviceState's bindings on a TrtEngine: one I/O set = (context index, name -> buffer)."""

    def __init__(self, engine: TrtEngine, memory):
        self.engine, self.memory = engine, memory

    def alloc(self, shape, dtype: str) -> _Buffer:
        from .device_state import ITEMSIZE

        ptr, keep = self.memory.alloc(int(np.prod(shape)) * ITEMSIZE[dtype])
        return _Buffer(ptr, keep, shape)

    def bind(self, inputs: dict, outputs: dict, s: int, capacity: int):
        # the decode profile takes S = 1 over any past the runtime makes (tests/test_kv_cache.py checks the ranges)
        index = 1 if s == 1 and len(self.engine._contexts) > 1 else 0
        return index, inputs, outputs

    def graph_id(self) -> int:
        return 0

    def run(self, binding, graph_id: int) -> None:
        index, inputs, outputs = binding
        e = self.engine
        with e._lock:
            e._ready()
            ctx = e._contexts[index]
            if e._bound.get(index) is not binding:   # another I/O set (or state) ran on this context last
                for name, buf in inputs.items():
                    ctx.set_input_shape(name, buf.shape)
                    ctx.set_tensor_address(name, buf.ptr)
                for name, buf in outputs.items():
                    ctx.set_tensor_address(name, buf.ptr)
                e._bound[index] = binding
            if not ctx.execute_async_v3(self.memory.stream):
                raise EngineError(f"{e.plan.name}: TensorRT execution failed")
