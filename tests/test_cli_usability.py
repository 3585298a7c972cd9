"""The emu3-rt CLI behaves as diffusers / llama.cpp users expect: no abbreviations, one rule for which prompt an
image belongs to, per-image seeds that reproduce from the file's own metadata, formats by extension, help
that states each default once, and a summary line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from emu3_rt.cli import build_parser

from .conftest import REPO, cli

FAST = ["--image-area", "4096"]   # an 8x8 grid


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, size in enumerate([(40, 40), (64, 32)]):
        p = root / f"p{i}.png"
        Image.new("RGB", size, (40 * i, 100, 200)).save(p)
        paths.append(str(p))
    return paths


# ---- parsing ----

@pytest.mark.parametrize("argv,needle", [
    (["generate-image", "--prompt", "x", "--image", "photo.png"], "unrecognized arguments: --image photo.png"),
    (["generate-image", "--prompt", "x", "--image-are", "4096"], "unrecognized arguments: --image-are"),
    (["generate-image", "--prompt", "x", "--image-area", "big"], "argument --image-area: expected a whole number"),
    (["generate-image", "--prompt", "x", "--seed", str(2**32)], "argument --seed: must be between -1 and"),
    (["generate-image", "--prompt", "x", "--seed", "-2"], "argument --seed: must be between -1 and"),
    (["chat", "--prompt", "x", "--threads", "100000"], "argument --threads: must be between 0 and"),
    (["chat", "--prompt", "x", "--threads", "-1"], "argument --threads: must be between 0 and"),
    (["chat", "--prompt", "x", "--top-p", "lots"], "argument --top-p: expected a number"),
])
def test_usage_errors_name_the_flag_typed(capsys, argv, needle):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not re.search(r"_\w+ value|int_in|parse|number value", err)


def test_no_command_prints_usage_and_commands(capsys):
    code, out, err = cli(capsys)
    assert code == 2 and "usage: emu3-rt" in err and "chat" in err and "generate-image" in err


def test_help_states_each_default_once():
    for name in ("chat", "generate-image"):
        text = build_parser()._subparsers._group_actions[0].choices[name].format_help()
        assert "(default: None)" not in text
        # argparse wraps each option's help; group the lines per option before counting
        options = re.split(r"\n(?=  -|\S)", text)
        for block in options:
            assert block.count("default") <= 1, block


# ---- which prompt an image belongs to ----

def _boi_count(ids, capsys):
    return sum(1 for i in ids if i == _tokens().boi)


def _tokens():
    import emu3_rt

    return emu3_rt.load_bundle(REPO / "models" / "emu3-tiny").tokens


def test_images_follow_their_prompt_in_a_batch(capsys, pictures):
    code, out, err = cli(capsys, "chat", "--prompt", "first", "--image", pictures[0], "--image", pictures[1],
                         "--prompt", "second", "--greedy", "--max-new-tokens", "2", "--json", "-q")
    assert code == 0, err
    ids = json.loads(out)["prompt_ids"]
    assert [row.count(_tokens().boi) for row in ids] == [2, 0]


def test_image_before_the_first_of_several_prompts_is_refused(capsys, pictures):
    code, out, err = cli(capsys, "chat", "--image", pictures[0], "--prompt", "first", "--image", pictures[1],
                         "--prompt", "second", "--greedy", "--max-new-tokens", "2", "-q")
    assert code == 2 and "before any --prompt" in err and err.count("\n") == 1


def test_one_prompt_owns_every_image_in_any_order(capsys, pictures):
    a = cli(capsys, "chat", "--image", pictures[0], "--prompt", "what?", "--image", pictures[1], "--greedy",
            "--max-new-tokens", "2", "--json", "-q")
    b = cli(capsys, "chat", "--prompt", "what?", "--image", pictures[0], "--image", pictures[1], "--greedy",
            "--max-new-tokens", "2", "--json", "-q")
    assert a[0] == b[0] == 0 and json.loads(a[1])["prompt_ids"] == json.loads(b[1])["prompt_ids"]


# ---- seeds and reproducibility ----

def test_batch_image_reproduces_alone_from_its_metadata(capsys, tmp_path):
    prompts = ["a red cat", "a blue car", "a green tree"]
    argv = [a for p in prompts for a in ("--prompt", p)]
    code, out, err = cli(capsys, "generate-image", *argv, "--cfg-scale", "3", "--seed", "77", *FAST,
                         "-o", str(tmp_path / "batch.png"), "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["seeds"] == [77, 78, 79]
    params = json.loads(Image.open(tmp_path / "batch-1.png").text["parameters"])
    assert params["seed"] == 78 and params["prompt"] == "a blue car"
    code, out, err = cli(capsys, "generate-image", "--prompt", params["prompt"], "--cfg-scale",
                         str(params["cfg_scale"]), "--seed", str(params["seed"]), *FAST,
                         "-o", str(tmp_path / "alone.png"), "-q")
    assert code == 0, err
    assert (tmp_path / "alone.png").read_bytes() == (tmp_path / "batch-1.png").read_bytes()


def test_seed_minus_one_is_random_and_printed_before_generation(capsys, tmp_path, monkeypatch):
    from emu3_rt.generation import ImageGeneration

    seen = []
    real = ImageGeneration.step

    def spy(self, *a, **k):
        if not seen:
            seen.append(capsys.readouterr().err)     # what stderr held when the first step started
        return real(self, *a, **k)

    monkeypatch.setattr(ImageGeneration, "step", spy)
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--seed", "-1", *FAST,
                         "-o", str(tmp_path / "x.png"), "--json")
    seed = json.loads(out)["seed"]
    assert code == 0 and f"seed: {seed}" in seen[0] and 0 <= seed < 2**32


# ---- conventions ----

def test_jpeg_and_webp_by_extension_with_metadata(capsys, tmp_path):
    for ext, fmt in ((".jpg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")):
        path = tmp_path / f"x{ext}"
        code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--seed", "3", *FAST, "-o", str(path), "-q")
        assert code == 0, err
        with Image.open(path) as im:
            assert im.format == fmt
            meta = im.text["parameters"] if fmt == "PNG" else im.getexif()[0x010E]
            assert json.loads(meta)["seed"] == 3


def test_unknown_extension_is_refused_before_generation(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", *FAST, "-o", str(tmp_path / "x.gif"), "-q")
    assert code == 2 and "unknown image extension '.gif'" in err and not list(tmp_path.iterdir())


def test_negative_prompt_without_cfg_is_refused(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--negative-prompt", "blurry", "--cfg-scale", "1",
                         *FAST, "-o", str(tmp_path / "x.png"), "-q")
    assert code == 2 and "--negative-prompt needs classifier-free guidance: --cfg-scale is 1" in err


def test_summary_line_and_tiny_bundle_note(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--seed", "5", *FAST, "-o", str(tmp_path / "x.png"))
    assert code == 0
    lines = err.strip().splitlines()
    assert "random weights" in lines[0]
    assert re.fullmatch(r"emu3-rt: 75 tokens in [\d.]+ s \([\d.]+ tok/s\), seed 5, wrote .*x\.png", lines[-1])
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--seed", "5", *FAST, "-o", str(tmp_path / "x.png"),
                         "-q")
    assert code == 0 and err == ""


def test_ctrl_c_during_import_has_no_traceback():
    # SIGINT raised while the package is importing: exit 130 with one line, as anywhere else
    code = ("import signal, os, builtins\n"
            "real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'numpy':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "from emu3_rt.cli import main\n"
            "raise SystemExit(main(['chat', '--prompt', 'x']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 130 and r.stderr == "emu3-rt: interrupted\n", r.stderr


def test_checkpoint_given_as_bundle_suggests_export(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, out, err = cli(capsys, "chat", "--bundle", str(tmp_path), "--prompt", "x", "-q")
    assert code == 2 and "python -m export --checkpoint" in err and err.count("\n") == 1
