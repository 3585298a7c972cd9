"""Hostile inputs to the library, the CLI and the service's request parsing (issue 19), each class at its mechanism:
only raster formats are opened (no EPS -> Ghostscript), image count and decoded pixels are checked from headers
before anything is decoded (and the heap is given back after), prompts longer than the context can hold are refused
before tokenizing, non-finite and out-of-range numbers are refused everywhere, and whatever a request body makes go
wrong while it is parsed is a 400 in the {"error": ...} shape. Memory-heavy cases run in a child process under an
address-space rlimit; nothing is timed."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

import emu3_rt
from emu3_rt import image as imaging
from emu3_rt.image import ImageError, ImageFile, load_image, read_image
from emu3_rt.options import SamplingOptions
from emu3_rt.prompt import PromptError

from .conftest import REPO, cli

GREEDY = SamplingOptions(greedy=True)


@pytest.fixture(scope="module")
def model():
    return emu3_rt.load()


def _encoded(fmt: str, size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) \
        .convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 16x16 PNG whose header (IHDR, CRC fixed) claims width x height: reading its header is cheap, decoding it
    would fail as truncated, so an error about its size proves nothing was decoded."""
    data = bytearray(_encoded("PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encoded("BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encoded("GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _chat_body(images: list[bytes], text: str = "What is this?", **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": _data_uri(d)}} for d in images]
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}], **extra}


def _in_child(code: str, limit_mb: int = 1536, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `code` in a child Python whose address space is limited to limit_mb (a decode that slipped through
    fails with MemoryError instead of taking the machine); its stdout is its verdict."""
    prelude = ("import resource\n"
               f"resource.setrlimit(resource.RLIMIT_AS, ({limit_mb << 20}, {limit_mb << 20}))\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


# ---- 12: only the raster formats the model needs ----

READ = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]
REFUSED = ["EPS", "PCX", "TGA", "ICO", "PPM", "SGI", "IM"]


@pytest.mark.parametrize("fmt", READ)
def test_the_raster_formats_are_read(fmt):
    f = read_image(_encoded(fmt))
    assert isinstance(f, ImageFile) and f.format == fmt and (f.width, f.height) == (16, 16)
    assert f.decode().size == (16, 16)


def test_a_multi_picture_jpeg_from_a_phone_is_read():
    buf = io.BytesIO()
    frames = [Image.new("RGB", (32, 24), (40 * i, 0, 0)) for i in range(2)]
    frames[0].save(buf, format="MPO", save_all=True, append_images=frames[1:])
    f = read_image(buf.getvalue())
    assert f.format == "MPO" and f.decode().getpixel((0, 0)) == (0, 0, 0)


@pytest.fixture
def stand_in_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that records being run (Pillow's EPS plugin runs Ghostscript to decode)."""
    bin_dir, mark = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho ran >> {mark}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return mark


@pytest.mark.parametrize("fmt", REFUSED)
def test_other_formats_are_never_opened_from_files_bytes_chat_or_the_service(fmt, tmp_path, model, stand_in_gs):
    from runtime.serve.protocol import chat_job

    data = _encoded(fmt, mode="RGB")
    assert Image.open(io.BytesIO(data)).format == fmt    # Pillow itself would open it
    path = tmp_path / f"picture.{fmt.lower()}"
    path.write_bytes(data)
    for call in (lambda: load_image(path), lambda: read_image(data),
                 lambda: model.chat("what?", images=[str(path)], sampling=GREEDY, max_new_tokens=1),
                 lambda: chat_job(_chat_body([data]), model, 8)):
        with pytest.raises(ImageError, match="not an image in a format this runtime reads"):
            call()
    assert not stand_in_gs.exists()


def test_eps_from_the_cli_never_runs_ghostscript(capsys, tmp_path, stand_in_gs):
    path = tmp_path / "page.eps"
    path.write_bytes(_encoded("EPS"))
    code, _, err = cli(capsys, "chat", "--prompt", "what is it?", "--image", str(path), "--max-new-tokens", "1")
    errors = [line for line in err.splitlines() if line.startswith("emu3-rt: error:")]
    assert code == 2 and len(errors) == 1 and "not an image in a format this runtime reads" in errors[0], err
    assert not stand_in_gs.exists()


# ---- 2: image limits from the headers, before decoding ----

@pytest.mark.parametrize("claim", [_png_claiming, _bmp_claiming, _gif_claiming])
def test_a_bomb_is_refused_from_its_header_in_bounded_memory(claim):
    # 30000 x 30000 would decode to 2.7 GB: refused from the header under a 1.5 GB address-space limit
    data = claim(30000, 30000)
    r = _in_child(f"""
        from emu3_rt.image import ImageError, read_image
        try:
            read_image({data!r})
        except ImageError as e:
            print("refused:", e)
    """)
    assert r.returncode == 0 and "refused:" in r.stdout and "decompression bomb" in r.stdout, r.stdout + r.stderr


def test_decoded_pixels_per_prompt_are_checked_before_decoding(model, tmp_path):
    from runtime.serve.protocol import chat_job

    # each 8000 x 7000 (56 Mpx) is under Pillow's per-image limit; two pass the 100 Mpx a prompt may decode.
    # Decoding them would fail (truncated): the pixel error proves they were judged from their headers
    big = _png_claiming(8000, 7000)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"big{i}.png")
        paths[-1].write_bytes(big)
    for call in (lambda: model.chat("compare", images=[str(p) for p in paths], sampling=GREEDY, max_new_tokens=1),
                 lambda: model.chat(["a", "b"], images=[[str(paths[0]), str(paths[1])], []], sampling=GREEDY),
                 lambda: chat_job(_chat_body([big, big]), model, 8)):
        with pytest.raises(ImageError, match="megapixels; at most 100 are decoded per prompt"):
            call()
    # one of them is within the budget: then it is decoded, and fails as what it is
    with pytest.raises(ImageError, match="truncated"):
        model.chat("one", images=[str(paths[0])], sampling=GREEDY, max_new_tokens=1)


def test_image_count_is_checked_from_the_context_before_any_file_is_read(model, tmp_path, capsys):
    from runtime.serve.protocol import chat_job

    n = model.max_images + 1
    assert 1 < model.max_images < 1000
    missing = [str(tmp_path / f"absent{i}.png") for i in range(n)]   # never opened: the count comes first
    with pytest.raises(PromptError, match=f"{n} images in one prompt; .* holds at most {model.max_images}"):
        model.chat("so many", images=missing, sampling=GREEDY)
    small = _encoded("PNG", (8, 8))
    with pytest.raises(PromptError, match="holds at most"):
        chat_job(_chat_body([small] * n), model, 8)
    args = [a for p in missing for a in ("--image", p)]
    code, _, err = cli(capsys, "chat", "--prompt", "x", *args)
    assert code == 2 and f"{n} images in one prompt" in err, err
    # the bound is sound: the fewest positions an image can take times max_images fits the context
    cfg = model.image_config
    assert model.max_images * (imaging.min_codes(cfg) + 6) + 2 <= model.bundle.context_length


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_images_are_decoded_one_at_a_time_and_the_memory_given_back(tmp_path, mode):
    # a 4000 x 4000 image (48 MB decoded as RGB) from a file: a chat with two of it peaks where a chat with one does
    # (decoded one at a time, each dropped once resized), and after three such chats memory is back near where it
    # started (the freed heap of decoded images is given back to the system)
    path = tmp_path / "big.png"
    Image.new(mode, (4000, 4000), (90, 20, 200, 128)[: len(mode)]).save(path)
    r = _in_child(f"""
        import emu3_rt
        from PIL import Image
        from emu3_rt.options import SamplingOptions
        def rss(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) >> 10
        def peak_of(call):
            open("/proc/self/clear_refs", "w").write("5")   # VmHWM := VmRSS
            call()
            return rss("VmHWM:")
        m = emu3_rt.load(); g = SamplingOptions(greedy=True)
        small = Image.new("RGB", (40, 40), (9, 9, 9))
        m.chat("warm", images=[small, small], sampling=g, max_new_tokens=1)
        before = rss("VmRSS:")
        one = peak_of(lambda: m.chat("one", images=[{str(path)!r}], sampling=g, max_new_tokens=1))
        two = max(peak_of(lambda: m.chat("two", images=[{str(path)!r}] * 2, sampling=g, max_new_tokens=1))
                  for _ in range(3))
        print(before, one, two, rss("VmRSS:"))
    """, limit_mb=4096)
    assert r.returncode == 0, r.stderr
    before, one, two, after = map(int, r.stdout.split())
    image = 4000 * 4000 * len(mode) >> 20
    assert one - before > 0.9 * image, (before, one, two, after)   # the measure sees a decoded image
    assert two - one < 0.5 * image, (before, one, two, after)      # a second image decoded alongside would add one
    assert after - before < 0.4 * image, (before, one, two, after)


# ---- 13: prompts longer than the context are refused before tokenizing ----

class _NoTokenizer:
    """Stands in for the tokenizer: any use means the length check came too late."""

    def __getattr__(self, name):
        raise AssertionError(f"the tokenizer was used ({name}) before the length check")


@pytest.mark.parametrize("where", ["chat", "system", "image", "negative", "chat batch"])
def test_a_prompt_longer_than_the_context_is_refused_before_tokenizing(model, where, monkeypatch):
    limit = model.prompts.max_chars
    long = "x" * (limit + 1) if where != "chat batch" else "y " * (limit // 2 + 1)
    monkeypatch.setattr(model.prompts, "tokenizer", _NoTokenizer())
    calls = {
        "chat": lambda: model.chat(long, sampling=GREEDY),
        "system": lambda: model.chat("hi", system=long, sampling=GREEDY),
        "image": lambda: model.generate_image(long, cfg_scale=1.0),
        "negative": lambda: model.generate_image("a cat", negative_prompt=long, cfg_scale=3.0),
        "chat batch": lambda: model.chat(["short", long], sampling=GREEDY),
    }
    with pytest.raises(PromptError, match="checked before tokenizing"):
        calls[where]()


def test_the_length_bound_never_refuses_a_prompt_that_fits(model):
    # the longest token, repeated (each one id with special tokens allowed): as many characters per position as
    # any text can have, and well inside the bound
    longest = max(model.prompts.tokenizer.get_vocab(with_added_tokens=True), key=len)
    text = longest * 100
    assert len(text) < model.prompts.max_chars
    ids = model.prompts.encode_text(text)
    assert len(ids) * len(longest) >= len(text)


# ---- 14: non-finite and out-of-range numbers are refused everywhere ----

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "NaN"])
@pytest.mark.parametrize("argv", [["chat", "--prompt", "x", "--temperature"], ["chat", "--prompt", "x", "--top-p"],
                                  ["generate-image", "--prompt", "x", "--cfg-scale"]])
def test_the_cli_refuses_non_finite_numbers(capsys, argv, value):
    *rest, flag = argv
    code, _, err = cli(capsys, *rest, f"{flag}={value}")
    assert code == 2 and "expected a finite number" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args,needle", [
    (["--batch-wait", "nan"], "argument --batch-wait: expected a finite number"),
    (["--batch-wait", "inf"], "argument --batch-wait: expected a finite number"),
    (["--batch-wait", "-1"], "argument --batch-wait: must be between 0 and 60"),
    (["--batch-wait", "1e6"], "argument --batch-wait: must be between 0 and 60"),
    (["--body-timeout", "nan"], "argument --body-timeout: expected a finite number"),
    (["--body-timeout", "0"], "argument --body-timeout: must be between"),
    (["--replica-cpus", "nan"], "argument --replica-cpus: expected a finite number"),
    (["--replica-gpus", "-1"], "argument --replica-gpus: must be >= 0"),
])
def test_serve_refuses_non_finite_and_out_of_range_numbers(args, needle):
    r = subprocess.run([sys.executable, "-m", "runtime.serve", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_the_api_refuses_non_finite_numbers(model, value):
    for call, name in [(lambda: SamplingOptions(temperature=value), "temperature"),
                       (lambda: SamplingOptions(top_p=value, greedy=True), "top_p"),
                       (lambda: model.generate_image("x", cfg_scale=value), "cfg_scale"),
                       (lambda: model.generate_image("x", cfg_scale=np.float32(value)), "cfg_scale")]:
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            call()


def test_the_service_arguments_refuse_non_finite_numbers_before_loading():
    pytest.importorskip("ray.serve")
    from runtime.serve.app import Emu3Service

    cls = Emu3Service.func_or_class   # Serve's ingress wrapper: its __init__ is a coroutine around ours
    for kwargs, needle in [({"batch_wait_s": float("nan")}, "batch_wait_s must be a finite number in [0"),
                           ({"batch_wait_s": 1e9}, "batch_wait_s must be a finite number in [0"),
                           ({"body_timeout_s": float("inf")}, "body_timeout_s must be a finite number"),
                           ({"body_timeout_s": 0}, "body_timeout_s must be a finite number")]:
        with pytest.raises(ValueError, match=re.escape(needle)):   # before the (missing) bundle is read
            asyncio.run(cls.__init__(object.__new__(cls), bundle="/nonexistent", **kwargs))


# ---- 15: every client error while parsing a request is a 400 in the {"error": ...} shape ----

def _deep(depth: int, open_: str, close: str, inner: str = "1") -> bytes:
    return (open_ * depth + inner + close * depth).encode()


HOSTILE_BODIES = [
    ("images", _deep(100_000, "[", "]")),
    ("images", _deep(100_000, '{"a":', "}")),
    ("chat", b'{"messages": ' + _deep(50_000, "[", "]") + b"}"),
    ("images", b'{"prompt": "x", "response_format": ' + _deep(900, "[", "]") + b"}"),
    ("images", b'{"prompt": "x", "image_area": 1' + b"0" * 400 + b"}"),
    ("images", b'{"prompt": "x", "image_area": 1' + b"0" * 5000 + b"}"),   # past Python's int-digits limit
    ("images", b'{"prompt": "x", "image_area": 262145}'),
    ("images", b'{"prompt": "x", "ratio": "1:1", "image_area": 1' + b"0" * 40 + b"}"),
    ("images", b'{"prompt": "x", "n": 1' + b"0" * 400 + b"}"),
    ("images", b'{"prompt": "x", "seed": 1' + b"0" * 400 + b"}"),
    ("images", b'{"prompt": "x", "cfg_scale": 1' + b"0" * 400 + b"}"),
    ("images", b'{"prompt": "x", "cfg_scale": 1e400}'),
    ("images", b'{"prompt": "x", "cfg_scale": NaN}'),
    ("images", b'{"prompt": "x", "temperature": Infinity}'),
    ("images", b'{"prompt": "x", "top_p": -Infinity}'),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}'),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "n": -1' + b"0" * 400 + b"}"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-400}'),
    ("chat", b'\xff\xfe{"messages": []}'),
]


@pytest.mark.parametrize("route,body", HOSTILE_BODIES, ids=lambda x: x[:40].decode("latin-1")
                         if isinstance(x, bytes) else x)
def test_hostile_bodies_are_client_errors(model, route, body):
    from runtime.serve import protocol

    parse = protocol.image_job if route == "images" else protocol.chat_job
    with pytest.raises((ValueError, TypeError)) as e:
        job = protocol.parse_request(body, parse, model, 8)
        # a body that parses is refused when its generation starts, as the batcher does it
        from runtime.serve.batcher import _start
        _start(model, [job]).cancel()
    assert protocol.error_status(e.value) == 400
    error = protocol.error_body(e.value)["error"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    assert len(error["message"]) < 400, error["message"]


def test_huge_numbers_are_named_by_size_not_printed(model):
    with pytest.raises(PromptError) as e:
        model.generate_image("x", image_area=10**400)
    assert "image_area must be at most 2**48" in str(e.value) and "1329-bit number" in str(e.value)


@pytest.mark.parametrize("kwargs, needle", [({"timeout": float("nan")}, "timeout must be a finite number"),
                                            ({"timeout": float("inf")}, "timeout must be a finite number"),
                                            ({"timeout": 0}, "timeout must be a finite number"),
                                            ({"retries": -1}, "retries must be an int >= 0")])
def test_the_client_refuses_non_finite_settings_and_never_sends_nan(kwargs, needle):
    from runtime.serve.client import Client

    with pytest.raises(ValueError, match=needle):
        Client("http://127.0.0.1:9", **kwargs)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        Client("http://127.0.0.1:9", retries=0).chat("hi", temperature=float("nan"))   # nothing is sent

