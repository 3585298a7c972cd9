"""OrtEngine: one ONNX graph in an onnxruntime session (CPU, CUDA or the TensorRT execution provider).

The session is created on the first `run`, so chat never loads the VQ decoder. A requested provider that
onnxruntime cannot load raises instead of silently falling back to the CPU.
"""

from __future__ import annotations

import numbers
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..bundle import GraphSpec
from .base import EngineError, check_io

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(bool)": "bool"}
# intra-op threads beyond this only thrash (and 100000 stalls the machine while onnxruntime spawns them)
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def check_threads(threads) -> int:
    """`threads` as an int in [0, MAX_THREADS] (0: onnxruntime's default); TypeError / ValueError otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be an int, got {type(threads).__name__}")
    if not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be in [0, {MAX_THREADS}] (0: one per physical core), got {threads}")
    return int(threads)


@dataclass(frozen=True)
class OrtOptions:
    # "cpu", "cuda" or "tensorrt" (the TensorRT execution provider, with CUDA then CPU for unsupported nodes)
    device: str = "cpu"
    # intra-op threads; 0 lets onnxruntime use one per physical core
    threads: int = 0
    # GPU ordinal for cuda / tensorrt
    device_id: int = 0
    # directory for TensorRT engine and timing caches (inside the bundle by default: see OrtEngine)
    trt_cache_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "threads", check_threads(self.threads))
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, numbers.Integral):
            raise TypeError(f"device_id must be an int, got {type(self.device_id).__name__}")
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")


def import_onnxruntime():
    # onnxruntime >= 1.2x on Linux writes a telemetry database under ~/.cache/Microsoft when it is imported; the
    # variable must be set before the import (disable_telemetry_events covers an onnxruntime imported earlier).
    # An explicit ORT_DISABLE_TELEMETRY=0 from the user is kept.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError:
        raise EngineError("onnxruntime is not installed: pip install 'emu3-bundle[cpu]' (or [gpu])") from None
    if hasattr(onnxruntime, "disable_telemetry_events") and os.environ["ORT_DISABLE_TELEMETRY"] != "0":
        onnxruntime.disable_telemetry_events()
    return onnxruntime


class OrtEngine:
    def __init__(self, spec: GraphSpec, options: OrtOptions = OrtOptions()):
        if options.device not in PROVIDERS:
            raise EngineError(f"unknown onnxruntime device {options.device!r}; choose one of {sorted(PROVIDERS)}")
        self.spec = spec
        self.options = options
        self._session = None
        self._lock = threading.Lock()

    def _providers(self, ort) -> list:
        wanted = PROVIDERS[self.options.device]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise EngineError(f"{wanted[0]} is not available in this onnxruntime ({', '.join(available)}); "
                              f"install emu3-bundle[gpu] on a machine with CUDA")
        opts = {"device_id": self.options.device_id}
        providers: list = []
        for name in wanted:
            if name == "TensorrtExecutionProvider":
                cache = self.options.trt_cache_dir or str(self.spec.path.parent / "trt_cache")
                providers.append((name, {**opts, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                         "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}))
            elif name == "CUDAExecutionProvider":
                providers.append((name, opts))
            else:
                providers.append(name)
        return providers

    @property
    def session(self):
        with self._lock:
            if self._session is None:
                self._session = self._create()
        return self._session

    def _create(self):
        ort = import_onnxruntime()
        if hasattr(ort, "preload_dlls") and self.options.device != "cpu":
            ort.preload_dlls()  # NVIDIA runtime wheels, when onnxruntime-gpu[cuda] installed them
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        path = self.spec.path
        if not path.is_file():
            raise EngineError(f"{path}: graph file is missing")
        try:
            sess = ort.InferenceSession(str(path), so, providers=self._providers(ort))
        except EngineError:
            raise
        except Exception as e:  # ORT raises its own exception types for corrupt or truncated models
            raise EngineError(f"{path.name}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        if sess.get_providers()[0] != PROVIDERS[self.options.device][0]:
            raise EngineError(f"{path.name}: onnxruntime fell back to {sess.get_providers()[0]} instead of "
                              f"{PROVIDERS[self.options.device][0]}")
        io = {side: {a.name: (_ORT_TYPES.get(a.type, a.type), len(a.shape)) for a in args}
              for side, args in (("in", sess.get_inputs()), ("out", sess.get_outputs()))}
        check_io(self.spec, io["in"], io["out"])
        self._output_names = [o.name for o in sess.get_outputs()]
        return sess

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session
        try:
            values = sess.run(self._output_names, feeds)
        except Exception as e:
            raise EngineError(f"{self.spec.path.name}: run failed ({str(e).splitlines()[0][:200]})") from None
        return dict(zip(self._output_names, values))
