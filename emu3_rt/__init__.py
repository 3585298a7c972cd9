"""emu3_rt: run an exported Emu3 bundle (chat and text-to-image) with numpy + onnxruntime/TensorRT, no torch.

    import emu3_rt
    model = emu3_rt.load("models/emu3-gen")            # default: the embedded tiny bundle
    image = model.generate_image("a red cat", seed=0).images[0]
    answer = model.chat("What is in this picture?", images=[image]).texts[0]
"""

__version__ = "0.1.0"

from .bundle import Bundle, BundleError, load_bundle  # noqa: E402
from .engines import EngineError  # noqa: E402
from .pipeline import ChatResult, Emu3, GenerationError, ImageResult, SamplingOptions, load  # noqa: E402
from .prompt import PromptError  # noqa: E402

__all__ = ["Bundle", "BundleError", "ChatResult", "Emu3", "EngineError", "GenerationError", "ImageResult",
           "PromptError", "SamplingOptions", "load", "load_bundle"]
