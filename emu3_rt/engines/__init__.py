"""Engines: graphs behind `run(feeds) -> dict` (onnxruntime here; TensorRT in trt.py, imported lazily)."""

from .base import Engine, EngineError
from .ort import OrtEngine, OrtOptions

__all__ = ["Engine", "EngineError", "OrtEngine", "OrtOptions"]
