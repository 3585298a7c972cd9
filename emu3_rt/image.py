"""Images in and out, identical to Transformers' Emu3ImageProcessor.

in:  PIL image -> RGB -> smart_resize (multiples of 8, area in [min, max]) -> bicubic -> x/255 -> (x - mean)/std
     -> pixel_values (3, H, W) float32 for the VQ encoder
out: VQ decoder pixels (B, 3, H, W) float32 in about [-1, 1] -> x*std + mean -> x255 -> clip -> uint8 (truncation)
     -> RGB PIL images
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


class ImageError(ValueError):
    """An input image that cannot be used (unreadable, corrupt, a decompression bomb, extreme aspect ratio)."""


@dataclass(frozen=True)
class ImageConfig:
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    min_pixels: int
    max_pixels: int
    spatial_factor: int
    resample: int = Image.BICUBIC

    @classmethod
    def from_manifest(cls, d: dict) -> ImageConfig:
        resample = d.get("resample", "bicubic")
        return cls(tuple(d["image_mean"]), tuple(d["image_std"]), float(d["rescale_factor"]), int(d["min_pixels"]),
                   int(d["max_pixels"]), int(d["spatial_factor"]),
                   RESAMPLE[resample] if isinstance(resample, str) else int(resample))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Transformers' Emu3 smart_resize: sides multiple of `factor`, area within [min_pixels, max_pixels]."""
    if height < 1 or width < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width):g}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """As transformers' convert_to_rgb: transparency is composited onto white, every other mode converted."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """One image -> (3, H, W) float32 with H, W multiples of spatial_factor."""
    rgb = to_rgb(img)
    h, w = smart_resize(rgb.height, rgb.width, cfg.spatial_factor, cfg.min_pixels, cfg.max_pixels)
    x = np.asarray(rgb.resize((w, h), resample=cfg.resample))              # (H, W, 3) uint8
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)      # rescale: float64, then down
    mean, std = np.array(cfg.image_mean, np.float32), np.array(cfg.image_std, np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def preprocess_batch(images: list[Image.Image], cfg: ImageConfig) -> list[np.ndarray]:
    return [preprocess(im, cfg) for im in images]


def postprocess(pixels: np.ndarray, cfg: ImageConfig) -> list[Image.Image]:
    """(B, 3, H, W) float pixels -> RGB images; out-of-range values clip, fractions truncate (no rounding)."""
    mean = np.array([-m / s for m, s in zip(cfg.image_mean, cfg.image_std)], np.float32)
    std = np.array([1 / s for s in cfg.image_std], np.float32)
    out = []
    for chw in np.asarray(pixels, dtype=np.float32):
        x = ((chw.T - mean) / std).T                                         # unnormalize, channels first
        x = (x.astype(np.float64) * (1.0 / cfg.rescale_factor)).astype(np.float32)
        out.append(Image.fromarray(x.clip(0, 255).astype(np.uint8).transpose(1, 2, 0)))
    return out


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image file (or bytes); every failure is one ImageError line naming the file.

    Pillow's decompression-bomb guard stays on, and its warning (over Image.MAX_IMAGE_PIXELS) counts as an error.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})".splitlines()[0]) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (empty, corrupt or another format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})".splitlines()[0]) from None
    return img
