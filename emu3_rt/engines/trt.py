"""TrtEngine: a TensorRT plan built on this GPU by `python -m export.build_trt`, run with cuda.bindings.

Plans are executables: one is loaded only from the bundle's own `trt/` directory, only when `trt/plans.json`
records this GPU's compute capability and this TensorRT version, and only when its sha256 and the sha256 of the
ONNX it was built from match. tensorrt and cuda-python are imported on first use (`pip install emu3-bundle[trt]`).

`run(feeds)` (VQ graphs, samplers): host numpy in, host numpy out, copied per call. The step graph decodes through
`new_state()`: the engines/state.DecodeState every engine uses, its KV buffers on the GPU (CudaMemory), bound by
tensor address to execution contexts of the state's own (the decode profile for S = 1, else the prefill one).
Not run on a GPU in this project yet; tests/test_trt_state.py runs this code on the CPU against a stand-in plan.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from .. import integrity
from ..bundle import Bundle, GraphSpec
from .base import EngineError, check_io
from .memory import check as _check

# TensorRT DataType names -> bundle dtypes (bf16 has no numpy type; only device states hold it)
_TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


def plan_for(bundle: Bundle, key: str, device_id: int = 0) -> Path:
    """The verified plan path for graph `key` ("decoder", "image_decoder", "vq_encoder", "vq_decoder") on GPU
    `device_id`, or EngineError. A `--head both` bundle needs a plan for its image step graph too (export.build_trt
    builds every graph the bundle has). The plan's sha256 comes from the per-user stamp cache when the file is
    unchanged since it was last hashed (integrity.cached_sha256), as bundle files do."""
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
    prop = _check(cudart.cudaGetDeviceProperties(device_id))
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
    if integrity.cached_sha256(path) != entry.get("sha256"):
        raise EngineError(f"{path.name}: sha256 does not match trt/plans.json; refusing to load it")
    return path


class TrtEngine:
    """A plan on GPU `device_id`. Decode states (new_state) run on execution contexts of their own, one per
    optimization profile, made on the state's stream (the profile switch is queued there, so it lands before the
    state's executions) and destroyed with the state: a context's device memory is never used by two executions
    at once, whichever threads step the states. run() has its own contexts, serialized by the engine's lock."""

    def __init__(self, spec: GraphSpec, plan: Path, device_id: int = 0, memory=None):
        self.spec, self.plan, self.device_id = spec, plan, device_id
        self._lock = threading.Lock()
        self._engine = None
        self._memory = memory
        self.closed = False
        self._state_contexts: dict[tuple, object] = {}   # (stream key, profile) -> execution context
        self._bound: dict[tuple, _Binding] = {}          # (stream key, profile) -> the binding its addresses hold

    @property
    def memory(self):
        with self._lock:
            if self._memory is None:
                from .memory import CudaMemory

                self._memory = CudaMemory(self.device_id)
        return self._memory

    def _load(self):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        _check(cudart.cudaSetDevice(self.device_id))
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            raise EngineError(f"{self.plan.name}: TensorRT could not deserialize the plan")
        self._adopt(engine)
        # run(): one context per profile on the engine's own stream (the switch is ordered before its executions)
        self._stream = _check(cudart.cudaStreamCreate())
        self._contexts = []
        for p in range(engine.num_optimization_profiles):
            ctx = engine.create_execution_context()
            ctx.set_optimization_profile_async(p, self._stream)
            self._contexts.append(ctx)
        _check(cudart.cudaStreamSynchronize(self._stream))

    def _adopt(self, engine) -> None:
        """Check a deserialized engine's I/O against the manifest and keep it."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n).name == "INPUT"]
        self._outputs = [n for n in names if n not in self._inputs]
        kinds = {n: _TRT_TYPES.get(engine.get_tensor_dtype(n).name, str(engine.get_tensor_dtype(n))) for n in names}
        self._dtype = {n: np.dtype(k) for n, k in kinds.items() if k != "bfloat16"}
        # -1: an axis the plan's optimization profiles keep dynamic
        io = {n: (kinds[n], tuple(d if d >= 0 else None for d in engine.get_tensor_shape(n))) for n in names}
        check_io(self.spec, {n: io[n] for n in self._inputs}, {n: io[n] for n in self._outputs})
        self._profiles = engine.num_optimization_profiles
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

    # ---- bound runs and decode states (engines/base.py's BoundEngine and StepEngine) ----

    def new_state(self, layout, rows: int, capacity_hint: int = 0, memory=None):
        """One generation's decode state: KV buffers and step I/O in device memory (engines/state.DecodeState)."""
        from .. import kv_cache
        from .state import DecodeState

        if layout.kind != "buffer":   # legacy concat bundles keep the host cache
            return kv_cache.ConcatCache(layout, rows, owner=self)
        with self._lock:
            self._ready()
        return DecodeState(self, layout, rows, self.spec.output(layout.logits).dims[1], capacity_hint,
                           memory if memory is not None else self.memory)

    def bind(self, memory, stream, inputs: dict, outputs: dict, graph: bool = False) -> _Binding:
        # the decode profile takes S = 1 over any past the runtime makes (tests/test_kv_cache.py checks the ranges)
        ids = inputs.get("input_ids")
        profile = 1 if ids is not None and ids.shape[1] == 1 and self._profiles > 1 else 0
        return _Binding(profile, inputs, outputs, memory, stream)

    def _context(self, binding: _Binding):
        """The binding's stream's own context for its profile, made on first use; its profile switch is queued
        on that stream, ahead of the executions that need it."""
        key = (_stream_key(binding.stream), binding.profile)
        with self._lock:
            self._ready()
            ctx = self._state_contexts.get(key)
            if ctx is None:
                ctx = self._engine.create_execution_context()
                ctx.set_optimization_profile_async(binding.profile, binding.stream)
                self._state_contexts[key] = ctx
        return key, ctx

    def execute(self, binding: _Binding) -> None:
        key, ctx = self._context(binding)
        if self._bound.get(key) is not binding:   # another I/O set of this state ran on this context last
            for name, buf in binding.inputs.items():
                ctx.set_input_shape(name, buf.shape)
                ctx.set_tensor_address(name, buf.ptr)
            for name, buf in binding.outputs.items():
                ctx.set_tensor_address(name, buf.ptr)
            self._bound[key] = binding
        if not ctx.execute_async_v3(binding.stream):
            raise EngineError(f"{self.plan.name}: TensorRT execution failed")

    def unbind(self, binding: _Binding) -> None:
        key = (_stream_key(binding.stream), binding.profile)
        if self._bound.get(key) is binding:
            del self._bound[key]

    def release(self, stream) -> None:
        """Destroy the contexts of a state's stream (the state synchronized it first)."""
        key = _stream_key(stream)
        with self._lock:
            for k in [k for k in self._state_contexts if k[0] == key]:
                del self._state_contexts[k]
                self._bound.pop(k, None)

    @property
    def state_contexts(self) -> int:
        return len(self._state_contexts)

    def close(self) -> None:
        """Drop the plan and contexts; states made by this engine are refused from now on (idempotent)."""
        with self._lock:
            self.closed, self._engine, self._contexts, self._state_contexts, self._bound = True, None, [], {}, {}


def _stream_key(stream) -> int:
    return int(stream)


class _Binding:
    """A decode state's I/O set on a plan: its profile and name -> memory.Buffer, run on the state's stream."""

    def __init__(self, profile: int, inputs: dict, outputs: dict, memory, stream):
        self.profile, self.inputs, self.outputs, self.memory, self.stream = profile, inputs, outputs, memory, stream
