"""Image in/out against Emu3ImageProcessor (bit-exact), and every way an input file can be bad."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from emu3_rt.image import (
    ImageConfig,
    ImageError,
    load_image,
    postprocess,
    preprocess,
    preprocess_batch,
    smart_resize,
    to_rgb,
)

TINY = ImageConfig((0.5,) * 3, (0.5,) * 3, 1 / 255, 32 * 32, 64 * 64, 8)
REAL = ImageConfig((0.5,) * 3, (0.5,) * 3, 1 / 255, 512 * 512, 1024 * 1024, 8)
CLIP = ImageConfig((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 1 / 255, 32 * 32, 64 * 64)
MODES = ["RGB", "RGBA", "LA", "L", "P", "P-transparency", "P-png-trns", "PA", "CMYK", "I;16", "I", "1", "F",
         "RGB-transparency", "L-transparency", "RGBa", "RGBX", "YCbCr", "HSV", "LAB"]


def _reference(cfg: ImageConfig):
    pytest.importorskip("transformers")
    from transformers import Emu3ImageProcessor

    return Emu3ImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, spatial_factor=cfg.spatial_factor,
                              image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


def _ref_pixels(cfg: ImageConfig, img: Image.Image) -> np.ndarray:
    out = _reference(cfg)(images=img, return_tensors="np")["pixel_values"]
    assert out.shape[0] == 1  # one image: a batch of one, nothing padded
    return out[0]


def _image(h: int, w: int, mode: str, seed: int = 0) -> Image.Image:
    """A random h x w image in `mode`, with varied alpha / out-of-range values where the mode allows them."""
    rng = np.random.default_rng(seed)

    def u8(*c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, *c), dtype=np.uint8)

    rgb = Image.fromarray(u8(3))
    if mode in ("RGBA", "RGBa", "RGBX", "CMYK"):
        return Image.frombytes(mode, (w, h), u8(4).tobytes())
    if mode in ("LA", "PA"):
        first = rgb.convert("P") if mode == "PA" else rgb.convert("L")
        return Image.merge(mode, (first, Image.fromarray(u8())))  # PA shares the P image's palette
    if mode == "P-transparency":
        p = rgb.convert("P")
        p.info["transparency"] = int(np.asarray(p)[0, 0])
        return p
    if mode == "P-png-trns":  # a real palette PNG with per-entry alpha: Pillow reads tRNS back as bytes
        p = rgb.quantize(16)
        buf = io.BytesIO()
        p.save(buf, format="PNG", transparency=bytes(range(0, 256, 16)))
        return Image.open(io.BytesIO(buf.getvalue()))
    if mode in ("RGB-transparency", "L-transparency"):
        img = rgb if mode.startswith("RGB") else rgb.convert("L")
        img.info["transparency"] = tuple(np.asarray(rgb)[0, 0].tolist()) if img.mode == "RGB" else int(
            np.asarray(img)[0, 0])
        return img
    if mode == "I;16":  # values past 255 exercise Pillow's saturation
        return Image.frombytes("I;16", (w, h), rng.integers(0, 1000, (h, w), dtype=np.uint16).tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-50, 400, (h, w), dtype=np.int32))
    if mode == "F":  # fractions and out-of-range floats
        return Image.fromarray(rng.uniform(-20, 300, (h, w)).astype(np.float32))
    if mode in ("YCbCr", "HSV", "LAB"):
        return Image.frombytes(mode, (w, h), u8(3).tobytes())
    return rgb.convert(mode)


@pytest.mark.export
@pytest.mark.parametrize("size", [(57, 91), (100, 80), (30, 50), (200, 200), (13, 7), (640, 8), (8, 640), (2, 50),
                                  (50, 1), (50, 3)])
def test_pixel_values_identical_sizes(size):
    img = _image(*size, "RGB")
    got = preprocess(img, TINY)
    ref = _ref_pixels(TINY, img)
    assert got.dtype == ref.dtype == np.float32 and got.shape == ref.shape and np.array_equal(got, ref)


@pytest.mark.export
@pytest.mark.parametrize("mode", MODES)
def test_pixel_values_identical_modes(mode):
    img = _image(57, 91, mode, seed=1)
    assert img.mode == {"P-transparency": "P", "P-png-trns": "P", "RGB-transparency": "RGB",
                        "L-transparency": "L"}.get(mode, mode)
    assert np.array_equal(preprocess(img, TINY), _ref_pixels(TINY, img))
    assert np.array_equal(preprocess(img, CLIP), _ref_pixels(CLIP, img))


@pytest.mark.export
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparency", "CMYK", "I;16", "F", "1"])
def test_to_rgb_equals_convert_to_rgb(mode):
    pytest.importorskip("transformers")
    from transformers.image_transforms import convert_to_rgb

    img = _image(9, 11, mode, seed=2)
    assert np.array_equal(np.asarray(to_rgb(img)), convert_to_rgb(img, return_numpy=True))


@pytest.mark.export
@pytest.mark.parametrize("size", [(333, 517), (1200, 90), (2048, 2048), (512, 512)])
def test_pixel_values_identical_real_settings(size):
    img = _image(*size, "RGB", seed=3)
    assert np.array_equal(preprocess(img, REAL), _ref_pixels(REAL, img))


@pytest.mark.export
def test_batch_is_transformers_batch_without_padding():
    imgs = [_image(57, 91, "RGB", 4), _image(100, 80, "RGBA", 5)]
    ref = _reference(TINY)(images=imgs, return_tensors="np")["pixel_values"]  # (2, 3, Hmax, Wmax), zero-padded
    got = preprocess_batch(imgs, TINY)
    assert [g.shape for g in got] == [(3, 48, 80), (3, 64, 56)]
    for g, r in zip(got, ref):
        assert np.array_equal(g, r[:, : g.shape[1], : g.shape[2]])
        assert not r[:, g.shape[1]:].any() and not r[:, :, g.shape[2]:].any()


@pytest.mark.export
@pytest.mark.parametrize("size", [(1, 1), (1, 50), (3, 3), (3, 50)])
def test_one_or_three_rows_are_refused(size):
    """Transformers reads an (H, W, 3) array with H in {1, 3} as channels-first: H=1 raises, H=3 is scrambled."""
    img = _image(*size, "RGB")
    with pytest.raises(ImageError, match="pixel\\(s\\) tall"):
        preprocess(img, TINY)
    if size[0] == 1:
        with pytest.raises(ValueError, match="mean must have 1 elements"):
            _ref_pixels(TINY, img)
    else:  # transformers runs, but on the rows as colour channels: 3x50 comes out portrait
        ref = _ref_pixels(TINY, img)
        assert ref.shape == ((3, 32, 32) if size == (3, 3) else (3, 136, 8))


@pytest.mark.export
@pytest.mark.parametrize("cfg", [TINY, CLIP])
@pytest.mark.parametrize("shape,dtype", [((2, 3, 24, 40), np.float32), ((2, 3, 17, 29), np.float32),
                                         ((1, 3, 8, 3), np.float32), ((2, 3, 16, 8), np.float64),
                                         ((1, 3, 16, 16), np.float16)])
def test_postprocess_identical_with_truncation(cfg, shape, dtype):
    rng = np.random.default_rng(6)
    px = (rng.normal(0, 1.2, shape) + rng.choice([0, 1e-7, 1 / 255], shape)).astype(dtype)  # well outside [-1, 1]
    px.flat[:4] = [-1.0, 1.0, 0.0, 0.5]
    ref = _reference(cfg).postprocess(list(px), return_tensors="PIL.Image.Image")["pixel_values"]
    got = postprocess(px, cfg)
    assert len(got) == len(ref) == shape[0]
    for a, b in zip(got, ref):
        assert a.mode == b.mode == "RGB" and a.size == b.size == (shape[3], shape[2])
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_postprocess_truncates_and_clips():
    px = np.array([-1.0, -2.0, 1.0, 3.0, 0.999, -0.999], np.float32).reshape(1, 1, 1, 6).repeat(3, axis=1)
    assert np.asarray(postprocess(px, TINY)[0])[0, :, 0].tolist() == [0, 0, 255, 255, 254, 0]


SETTINGS = [(32 * 32, 64 * 64), (512 * 512, 1024 * 1024), (0, 64 * 64), (64 * 64, 64 * 64), (1, 10**9)]


@pytest.mark.export
@settings(max_examples=400, deadline=None)
@given(h=st.integers(1, 4000), w=st.integers(1, 4000), setting=st.sampled_from(SETTINGS))
@example(h=1, w=201, setting=SETTINGS[0]).via("ratio over 200")
@example(h=20, w=4000, setting=SETTINGS[1]).via("ratio exactly 200")
@example(h=1, w=1, setting=SETTINGS[2]).via("rounds to zero")
def test_smart_resize_equals_transformers(h, w, setting):
    pytest.importorskip("transformers")
    from transformers.models.emu3.image_processing_emu3 import smart_resize as ref

    try:
        want = ref(h, w, 8, *setting)
    except ValueError as e:
        with pytest.raises(ImageError) as got:
            smart_resize(h, w, 8, *setting)
        assert str(got.value) == str(e)
        return
    assert smart_resize(h, w, 8, *setting) == want


def test_smart_resize_rejects_empty_and_extreme():
    with pytest.raises(ImageError, match="no pixels"):
        smart_resize(0, 10, 8, 1024, 4096)
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess(Image.new("RGB", (2010, 10)), TINY)


def test_from_manifest():
    d = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "min_pixels": 1024,
         "max_pixels": 4096, "spatial_factor": 8, "resample": "bicubic"}
    assert ImageConfig.from_manifest(d) == TINY
    assert ImageConfig.from_manifest({**d, "resample": 3}).resample == "bicubic"
    assert ImageConfig.from_manifest({**d, "resample": 2}).pil_resample == Image.Resampling.BILINEAR
    with pytest.raises(ValueError):
        ImageConfig.from_manifest({**d, "resample": "sharpest"})


# ---- load_image: every bad input is one ImageError line naming the file ----

def _png_bytes(h: int = 40, w: int = 30) -> bytes:
    buf = io.BytesIO()
    _image(h, w, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _assert_one_line(err: pytest.ExceptionInfo, name: str, needle: str) -> None:
    msg = str(err.value)
    assert name in msg and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("case,content,needle", [
    ("empty.png", b"", "empty file"),
    ("truncated.png", _png_bytes()[: len(_png_bytes()) // 2], "truncated"),
    ("noise.png", np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
    ("notes.txt", b"hello, not an image\nsecond line\n", "not an image"),
    ("badcrc.png", _png_bytes()[:40] + b"\x00" * 20 + _png_bytes()[60:], "corrupt"),
])
def test_bad_files_give_one_line_errors(tmp_path, case, content, needle):
    path = tmp_path / case
    path.write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_image(path)
    _assert_one_line(e, case, needle)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.png")
    _assert_one_line(e, "nope.png", "no such file")
    with pytest.raises(ImageError) as e:
        load_image(str(tmp_path))
    _assert_one_line(e, str(tmp_path), "is a directory")


@pytest.mark.parametrize("side", [100, 40])  # 10000 px: over 2x the limit (Pillow error); 1600 px: its warning
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError) as e:
        load_image(path)
    _assert_one_line(e, "bomb.png", "decompression bomb")


def test_good_file_and_bytes_load(tmp_path):
    data = _png_bytes()
    (tmp_path / "ok.png").write_bytes(data)
    img = load_image(tmp_path / "ok.png")
    assert img.size == (30, 40) and np.array_equal(np.asarray(img), np.asarray(_image(40, 30, "RGB")))
    assert load_image(data).size == (30, 40)
    with pytest.raises(ImageError) as e:
        load_image(data[:100])
    _assert_one_line(e, "<bytes>", "truncated")


def test_exif_orientation_is_not_applied(tmp_path):
    """Parity: transformers feeds the stored pixels, whatever the EXIF Orientation tag says."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    _image(20, 30, "RGB").save(buf, format="PNG", exif=exif)
    img = load_image(buf.getvalue())
    assert img.size == (30, 20) and img.getexif().get(0x0112) == 6
