"""TrtEngine: a TensorRT plan built on this GPU by `python -m export.build_trt`, run with cuda.bindings.

Plans are executables: one is loaded only from the bundle's own `trt/` directory, only when `trt/plans.json`
records this GPU's compute capability and this TensorRT version, and only when its sha256 and the sha256 of the
ONNX it was built from match. tensorrt and cuda-python are imported on first use (`pip install emu3-bundle[trt]`).

Host numpy in, host numpy out: each run copies inputs to device buffers, executes on one stream and copies the
outputs back. (Keeping the KV cache on the device is the next step for long images; see README.)
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from ..bundle import Bundle, GraphSpec, sha256_file
from .base import EngineError, check_io


def _check(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


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
        self._dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        io = {n: (self._dtype[n].name, len(engine.get_tensor_shape(n))) for n in names}
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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as cudart

        with self._lock:
            if self._engine is None:
                self._load()
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
