"""Image in/out against Emu3ImageProcessor (bit-exact), and every way an input file can be bad."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from emu3_rt.image import ImageConfig, ImageError, load_image, postprocess, preprocess, smart_resize

TINY = ImageConfig((0.5,) * 3, (0.5,) * 3, 1 / 255, 32 * 32, 64 * 64, 8)
REAL = ImageConfig((0.5,) * 3, (0.5,) * 3, 1 / 255, 512 * 512, 1024 * 1024, 8)
MODES = ["RGB", "RGBA", "LA", "L", "P", "P-transparent", "CMYK", "I;16", "1", "F"]


def _reference(cfg: ImageConfig):
    pytest.importorskip("transformers")
    from transformers import Emu3ImageProcessor

    return Emu3ImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, spatial_factor=8,
                              image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


def _image(h, w, mode, seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        return Image.merge("RGBA", (*rgb.split(), alpha))
    if mode == "P-transparent":
        p = rgb.convert("P")
        p.info["transparency"] = 0
        return p
    return rgb.convert(mode)


@pytest.mark.export
@pytest.mark.parametrize("size", [(57, 91), (100, 80), (30, 50), (200, 200), (13, 7), (640, 8), (8, 640)])
@pytest.mark.parametrize("mode", MODES)
def test_pixel_values_identical(size, mode):
    img = _image(*size, mode)
    ref = _reference(TINY)(images=img, return_tensors="np")["pixel_values"][0]
    got = preprocess(img, TINY)
    assert got.dtype == np.float32 and np.array_equal(got, ref)


@pytest.mark.export
@pytest.mark.parametrize("size", [(333, 517), (1200, 90), (2048, 2048)])
def test_pixel_values_identical_real_settings(size):
    img = _image(*size, "RGB")
    ref = _reference(REAL)(images=img, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(preprocess(img, REAL), ref)


@pytest.mark.export
def test_postprocess_identical_with_truncation():
    rng = np.random.default_rng(1)
    px = rng.normal(0, 0.9, (2, 3, 24, 40)).astype(np.float32)  # includes values outside [-1, 1]
    ref = _reference(TINY).postprocess(list(px), return_tensors="PIL.Image.Image")["pixel_values"]
    got = postprocess(px, TINY)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, ref))
    assert got[0].mode == "RGB" and got[0].size == (40, 24)


@pytest.mark.export
@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 4000), w=st.integers(1, 4000), setting=st.sampled_from([(32 * 32, 64 * 64),
                                                                              (512 * 512, 1024 * 1024)]))
def test_smart_resize_equals_transformers(h, w, setting):
    pytest.importorskip("transformers")
    from transformers.models.emu3.image_processing_emu3 import smart_resize as ref

    try:
        want = ref(h, w, 8, *setting)
    except ValueError:
        with pytest.raises(ImageError):
            smart_resize(h, w, 8, *setting)
        return
    assert smart_resize(h, w, 8, *setting) == want


def test_one_pixel_image_is_upscaled():
    """Transformers fails on a 1x1 image (channel-dimension guess); we resize it like any small image."""
    x = preprocess(Image.new("RGB", (1, 1), (255, 0, 0)), TINY)
    assert x.shape == (3, 32, 32) and np.allclose(x[0], 1.0) and np.allclose(x[1], -1.0)


def test_extreme_aspect_ratio_is_rejected():
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess(Image.new("RGB", (2010, 10)), TINY)


def _png_bytes(h=40, w=30) -> bytes:
    buf = io.BytesIO()
    _image(h, w, "RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case,content,needle", [
    ("empty.png", b"", "not an image"),
    ("truncated.png", _png_bytes()[: len(_png_bytes()) // 2], "truncated"),
    ("noise.png", bytes(range(256)) * 8, "not an image"),
    ("notes.txt", b"hello, not an image\n", "not an image"),
])
def test_bad_files_give_one_line_errors(tmp_path, case, content, needle):
    path = tmp_path / case
    path.write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_image(path)
    msg = str(e.value)
    assert case in msg and needle in msg and "\n" not in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="bomb.png: refused as a decompression bomb"):
        load_image(path)


def test_good_file_and_bytes_load(tmp_path):
    data = _png_bytes()
    (tmp_path / "ok.png").write_bytes(data)
    assert load_image(tmp_path / "ok.png").size == (30, 40)
    assert load_image(data).size == (30, 40)
