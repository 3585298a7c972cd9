"""emu3_rt: run an exported Emu3 bundle (chat and text-to-image) with numpy + onnxruntime/TensorRT, no torch.

    import emu3_rt
    model = emu3_rt.load("models/emu3-gen")            # default: the embedded tiny bundle
    image = model.generate_image("a red cat", seed=0).images[0]
    answer = model.chat("What is in this picture?", images=[image]).texts[0]

The public names are imported on first use (PEP 562), so `emu3-rt --help` and the CLI's start-up do not wait for
numpy, Pillow and tokenizers, and a Ctrl-C during those imports is handled by the CLI like any other.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Bundle": "bundle", "BundleError": "bundle", "load_bundle": "bundle",
    "EngineError": "engines",
    "ImageError": "image", "load_image": "image",
    "ChatResult": "generation", "ChatGeneration": "generation", "GenerationError": "generation",
    "ImageResult": "generation", "ImageGeneration": "generation", "Emu3": "pipeline",
    "SamplingOptions": "options", "load": "pipeline",
    "PromptError": "prompt", "Turn": "prompt",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .bundle import Bundle, BundleError, load_bundle  # noqa: F401
    from .engines import EngineError  # noqa: F401
    from .generation import ChatGeneration, ChatResult, GenerationError, ImageGeneration, ImageResult  # noqa: F401
    from .image import ImageError, load_image  # noqa: F401
    from .options import SamplingOptions  # noqa: F401
    from .pipeline import Emu3, load  # noqa: F401
    from .prompt import PromptError, Turn  # noqa: F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emu3_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
