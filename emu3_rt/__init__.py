"""emu3_rt: run an exported Emu3 bundle (chat and text-to-image) with numpy + onnxruntime/TensorRT, no torch."""

from .bundle import Bundle, BundleError, load_bundle

__all__ = ["Bundle", "BundleError", "load_bundle"]
__version__ = "0.1.0"
