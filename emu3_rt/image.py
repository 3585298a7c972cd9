"""Images in and out, bit-identical to Transformers' Emu3ImageProcessor (numpy + Pillow only).

in:  PIL image -> RGB (alpha onto white) -> smart_resize + PIL bicubic -> x/255 (float64 -> float32)
     -> (x - mean)/std in float32 -> pixel_values (3, H, W) float32 for the VQ encoder
out: VQ decoder pixels (B, 3, H, W) -> x*std + mean -> x*255 (float64 -> float32) -> clip -> uint8 (truncates)
     -> B RGB PIL images
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An input image that cannot be used (unreadable, corrupt, a decompression bomb, extreme aspect ratio)."""


# the largest image file load_image reads (compressed size; Pillow's pixel limit guards the decoded size)
MAX_IMAGE_BYTES = 256 << 20
# the raster formats an image for Emu3 comes in; Pillow never tries its other plugins (EPS hands the file to
# Ghostscript; PSD, FITS, PCX, ... are attack surface nobody feeds a VQ encoder)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# decoded pixels one prompt's images may hold in all, read from their headers before anything is decoded (one
# image alone: Pillow's MAX_IMAGE_PIXELS); decoding is one image at a time, so memory peaks at one image
MAX_PROMPT_PIXELS = 100_000_000


@dataclass(frozen=True)
class ImageConfig:
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    min_pixels: int = 512 * 512
    max_pixels: int = 1024 * 1024
    spatial_factor: int = 8
    resample: str = "bicubic"  # lower-case name of a PIL.Image.Resampling member

    def __post_init__(self):
        # normalize divides by std in float32 and postprocess by 1/std: a zero std (or an absurd value) would turn
        # pixels into inf/NaN with numpy warnings, so refuse it here. Real processors: mean in [0, 1], std in (0, 1].
        if len(self.image_mean) != 3 or not all(math.isfinite(m) and abs(m) <= 1e3 for m in self.image_mean):
            raise ValueError(f"image_mean must be 3 numbers in [-1000, 1000], got {list(self.image_mean)}")
        if len(self.image_std) != 3 or not all(math.isfinite(s) and 1e-6 <= abs(s) <= 1e3 for s in self.image_std):
            raise ValueError(f"image_std must be 3 non-zero numbers with 1e-6 <= |std| <= 1000, got "
                             f"{list(self.image_std)}")
        if not (math.isfinite(self.rescale_factor) and 1e-6 <= self.rescale_factor <= 1):
            raise ValueError(f"rescale_factor must be in [1e-6, 1], got {self.rescale_factor}")

    @classmethod
    def from_manifest(cls, d: dict) -> ImageConfig:
        resample = d.get("resample", "bicubic")
        name = Image.Resampling(int(resample)).name if not isinstance(resample, str) else resample
        if name.upper() not in Image.Resampling.__members__:
            raise ValueError(f"unknown resample filter {resample!r}")
        return cls(tuple(float(x) for x in d["image_mean"]), tuple(float(x) for x in d["image_std"]),
                   float(d["rescale_factor"]), int(d["min_pixels"]), int(d["max_pixels"]), int(d["spatial_factor"]),
                   name.lower())

    @property
    def pil_resample(self) -> Image.Resampling:
        return Image.Resampling[self.resample.upper()]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Transformers' Emu3 smart_resize, line for line: sides multiples of `factor`, area within [min, max] pixels."""
    if height < 1 or width < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if (ratio := max(height, width) / min(height, width)) > 200:
        raise ImageError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor  # Python round: half to even, as transformers
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for PIL input.

    Anything with an "A" band (RGBA, LA, PA, and also LAB) or a "transparency" entry (P/L/RGB with tRNS) goes to
    RGBA and is alpha-composited onto opaque white; every other mode is a plain Pillow convert("RGB") (CMYK naive,
    I;16/I/F saturate to 0..255 and truncate, 1 -> 0/255, RGBa un-premultiplies).
    """
    try:
        if img.mode == "RGB" and img.info.get("transparency") is None:
            img.load()
            return img  # convert("RGB") would copy the same pixels: a second full-size image in memory
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as e:  # e.g. mode "La": Pillow has no conversion, transformers fails the same way
        raise ImageError(f"cannot convert a {img.mode} image to RGB ({e})") from None


def preprocess(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """One image -> pixel_values (3, H, W) float32, H and W multiples of spatial_factor."""
    rgb = to_rgb(img)
    if rgb.height in (1, 3):
        # Transformers guesses channels-first for an (H, W, 3) array whose H is 1 or 3: a 1-row image raises there,
        # a 3-row one comes out scrambled (rows taken as colour channels). Refuse both rather than guess.
        raise ImageError(f"image is {rgb.height} pixel(s) tall ({rgb.width}x{rgb.height}); need 2 or at least 4")
    h, w = smart_resize(rgb.height, rgb.width, cfg.spatial_factor, cfg.min_pixels, cfg.max_pixels)
    if h < 1 or w < 1:  # only with min_pixels <= 0: transformers would hand Pillow an empty size
        raise ImageError(f"image {rgb.width}x{rgb.height} resizes to nothing ({w}x{h})")
    x = np.asarray(rgb.resize((w, h), resample=cfg.pil_resample))         # (H, W, 3) uint8
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)      # rescale: upcast, multiply, downcast
    mean = np.array(cfg.image_mean, dtype=np.float32)                       # normalize runs in float32, channels last
    std = np.array(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))     # (3, H, W)


def preprocess_batch(images: list, cfg: ImageConfig, names: list[str] | None = None) -> list[np.ndarray]:
    """One (3, H_i, W_i) array per image (a PIL image or an ImageFile), unpadded (transformers zero-pads
    bottom/right to the batch max). ImageFiles are decoded one at a time and each full-size image is dropped as
    soon as it is resized, so memory peaks at one decoded image; the heap is then given back to the system. An
    object given twice (a request's images on each of its n rows) is processed once. names: what an image's
    error is prefixed with, unless it names its file already."""
    done: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        for i, im in enumerate(images):
            if id(im) in done:
                continue
            try:
                if isinstance(im, ImageFile):
                    decoded += im.pixels
                    done[id(im)] = preprocess(im.decode(), cfg)
                else:
                    done[id(im)] = preprocess(im, cfg)
            except ImageError as e:
                if names is None or str(e).startswith(f"{names[i]}:"):
                    raise
                raise ImageError(f"{names[i]}: {e}") from None
        return [done[id(im)] for im in images]
    finally:
        if decoded >= _TRIM_PIXELS:
            give_back_memory()


def postprocess(pixels: np.ndarray, cfg: ImageConfig) -> list[Image.Image]:
    """(B, 3, H, W) decoder pixels -> B RGB images; out-of-range values clip, fractions truncate (no rounding)."""
    pixels = np.asarray(pixels)
    if not np.issubdtype(pixels.dtype, np.floating):  # normalize casts non-floats to float32, keeps float dtypes
        pixels = pixels.astype(np.float32)
    # unnormalize = normalize with mean' = -mean/std, std' = 1/std (Python floats, then cast to the pixel dtype)
    mean = np.array([-m / s for m, s in zip(cfg.image_mean, cfg.image_std)], dtype=pixels.dtype)
    std = np.array([1 / s for s in cfg.image_std], dtype=pixels.dtype)
    scale = 1.0 / cfg.rescale_factor
    out = []
    for chw in pixels:
        with np.errstate(over="ignore"):  # a huge decoder value overflows to +-inf, which the clip makes 0 or 255
            x = ((chw.T - mean) / std).T                                    # (3, H, W); .T puts channels last
            x = (x.astype(np.float64) * scale).astype(np.float32)           # rescale: upcast, multiply, downcast
        out.append(Image.fromarray(x.clip(0, 255).astype(np.uint8).transpose(1, 2, 0)))  # (H, W, 3)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_regular_file(path: str | os.PathLike, name: str) -> bytes:
    """The file's bytes; refused unless a regular file of at most MAX_IMAGE_BYTES (a FIFO or device never blocks)."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever before fstat can refuse it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or _one_line(e)})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{name}: is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{name}: not a regular file (a FIFO, socket or device), not an image")
        if st.st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{name}: {st.st_size} bytes is over the {MAX_IMAGE_BYTES >> 20} MiB image file limit")
        # bounded even if the file grows while it is read: at most one byte past the limit
        chunks, left = [], MAX_IMAGE_BYTES + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or _one_line(e)})") from None
    finally:
        os.close(fd)
    if left <= 0:
        raise ImageError(f"{name}: over the {MAX_IMAGE_BYTES >> 20} MiB image file limit")
    return b"".join(chunks)


# decoding at least this many pixels in one call hands the freed heap back (glibc keeps large freed blocks)
_TRIM_PIXELS = 4_000_000
_malloc_trim = None   # libc's malloc_trim once looked up; False where there is none


def give_back_memory() -> None:
    """Return freed heap to the system. glibc raises its mmap threshold after the first large free, so the next
    decoded images land on the heap and stay there once freed: without this a replica that decoded six 9000x9000
    PNGs kept 1.6 GB. A no-op where the C library has no malloc_trim."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


@dataclass(frozen=True, eq=False)
class ImageFile:
    """An image file's bytes with its header read and checked (a format of FORMATS, its size within Pillow's
    bomb limit), not decoded: what `read_image` returns and chat accepts like a path. Pixel limits can be
    checked from `pixels` before anything is decoded; `decode()` gives the PIL image."""
    name: str
    data: bytes
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode(self) -> Image.Image:
        # FORMATS again, not (format,): a phone's multi-picture JPEG is opened by the JPEG plugin as format "MPO"
        return _open(self.data, self.name, FORMATS, load=True)


def _open(data: bytes, name: str, formats, load: bool) -> Image.Image:
    """Image.open over the bytes with only `formats` tried; with load, decoded too. Failures: one ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            if load:
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({_one_line(e)})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a format this runtime reads ({', '.join(FORMATS)}), or its "
                         f"header is corrupt") from None
    except Exception as e:  # untrusted bytes: Pillow's decoders raise many exception types on corrupt input
        raise ImageError(f"{name}: corrupt or truncated image ({_one_line(e)})") from None
    return img


def read_image(source: str | os.PathLike | bytes) -> ImageFile:
    """Read an image file (or bytes) and check its header, decoding nothing: an ImageFile. Only regular files of at
    most MAX_IMAGE_BYTES are read (a FIFO or /dev/zero is refused, never waited on); only FORMATS are recognised;
    Pillow's decompression-bomb guard is applied to the header's size (its warning counts as an error)."""
    if isinstance(source, (bytes, bytearray)):
        name, data = "<bytes>", bytes(source)
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"{name}: {len(data)} bytes is over the {MAX_IMAGE_BYTES >> 20} MiB image file limit")
    elif isinstance(source, (str, os.PathLike)):
        name = os.fsdecode(source)
        data = _read_regular_file(source, name)  # read whole: no file handle stays open behind the image
    else:
        raise TypeError(f"image source must be a path or bytes, got {type(source).__name__}")
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes), not an image")
    with _open(data, name, FORMATS, load=False) as img:
        return ImageFile(name, data, img.format, *img.size)


def check_pixels(images: list, where: str = "one prompt") -> None:
    """Refuse images whose decoded pixels together pass MAX_PROMPT_PIXELS, from their headers (ImageFiles; a PIL
    image is decoded already and costs nothing more)."""
    total = sum(im.pixels for im in images if isinstance(im, ImageFile))
    if total > MAX_PROMPT_PIXELS:
        raise ImageError(f"the images of {where} hold {total / 1e6:.1f} megapixels; at most "
                         f"{MAX_PROMPT_PIXELS / 1e6:.0f} are decoded per prompt (send them smaller)")


def min_codes(cfg: ImageConfig) -> int:
    """The fewest VQ codes smart_resize can give any image: its area is at least min_pixels, or at least a quarter of
    max_pixels when scaled down (flooring keeps at least half of each side), in cells of spatial_factor²."""
    area = min(cfg.min_pixels, cfg.max_pixels // 4)
    return max(1, -(-area // cfg.spatial_factor ** 2))


def load_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Read and fully decode an image file (or bytes); every failure is one ImageError line naming the file.

    Only regular files of at most MAX_IMAGE_BYTES are read (a FIFO or /dev/zero is refused, never waited on), and
    only the raster formats in FORMATS are recognised (no EPS: Pillow would hand it to Ghostscript).
    Pillow's decompression-bomb guard stays on and its warning (over Image.MAX_IMAGE_PIXELS) counts as an error.
    EXIF orientation is not applied, as transformers does not apply it.
    """
    return read_image(source).decode()
