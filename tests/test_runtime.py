"""The runtime on the embedded tiny bundle, without torch: API, CLI contract, outputs, isolation."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import emu3_rt
from emu3_rt.generation import check_image_tokens
from emu3_rt.options import SamplingOptions
from emu3_rt.prompt import calculate_generate_size, make_batch

from .conftest import REPO, TINY_BUNDLE, cli

GREEDY = SamplingOptions(greedy=True)


@pytest.fixture(scope="module")
def model():
    return emu3_rt.load(TINY_BUNDLE)


# ---- API ----

def test_generate_image_api(model):
    r = model.generate_image("a red cat", seed=3, cfg_scale=3.0)
    (h, w), = r.grids
    assert (h, w) == (8, 8) and r.images[0].size == (64, 64) and r.images[0].mode == "RGB"
    assert len(r.tokens[0]) == h * (w + 1) + 3 and r.seed == 3 and r.cfg_scale == 3.0
    check_image_tokens(np.array(r.tokens[0]), h, w, model.bundle)
    assert r.negative_prompt == model.bundle.search["negative_prompt"]


def test_chat_history_renders_the_earlier_turns_through_the_template(model):
    """Earlier turns (emu3_rt.Turn) go through the bundle's chat template, images in message order: the same ids
    as the conversation the template renders, typed as a raw prompt; a conversation past the context is refused."""
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    history = [emu3_rt.Turn("user", "Describe.", images=1), emu3_rt.Turn("assistant", "A cat.")]
    turns = model.chat("What color?", images=[photo], history=history, sampling=GREEDY, max_new_tokens=6)
    raw = model.chat("USER: <image>Describe. ASSISTANT: A cat. USER: What color? ASSISTANT:", images=[photo],
                     raw=True, sampling=GREEDY, max_new_tokens=6)
    assert turns.prompt_ids == raw.prompt_ids and turns.tokens == raw.tokens
    # a batch: one history per prompt, and the prompt without history is the plain one
    both = model.chat(["What color?", "hi"], images=[[photo], []], history=[history, None], sampling=GREEDY,
                      max_new_tokens=6)
    assert both.prompt_ids[0] == raw.prompt_ids[0]
    assert both.prompt_ids[1] == model.chat("hi", sampling=GREEDY, max_new_tokens=1).prompt_ids[0]
    with pytest.raises(emu3_rt.PromptError, match="the conversation is .* tokens .*context is 1024: drop earlier"):
        model.chat("x", history=[emu3_rt.Turn("user", "a " * 600), emu3_rt.Turn("assistant", "b " * 600)])
    with pytest.raises(emu3_rt.PromptError, match="earlier turns hold 1 image"):
        model.chat("x", history=history)
    with pytest.raises(emu3_rt.PromptError, match="assistant turn cannot hold images"):
        emu3_rt.Turn("assistant", "x", images=1)
    with pytest.raises(TypeError, match="history must hold emu3_rt.Turn"):
        model.chat("x", history=[{"role": "user", "content": "a"}])


def test_chat_api_streams_text(model):
    img = Image.new("RGB", (50, 70), (200, 10, 10))
    deltas = []
    r = model.chat("what is this?", images=[img], sampling=GREEDY, max_new_tokens=12,
                   on_text=lambda row, d: deltas.append(d))
    assert r.seed is None and len(r.tokens[0]) <= 12
    assert "".join(deltas) == r.texts[0]


def test_chat_never_loads_the_vq_decoder(model):
    fresh = emu3_rt.load(TINY_BUNDLE)
    fresh.chat("hello", sampling=GREEDY, max_new_tokens=3)
    assert fresh.engines["vq_decoder"]._session is None
    assert fresh.engines["vq_encoder"]._session is None


def test_progressive_preview(model):
    previews = []
    r = model.generate_image("a tree", seed=1, preview_every=3, on_preview=lambda row, rows, im: previews.append(
        (rows, np.asarray(im))))
    assert [rows for rows, _ in previews] == [3, 6, 8]
    rows3 = previews[0][1]
    assert (rows3[3 * 8:] == 128).all(), "ungenerated rows must be grey"
    assert np.array_equal(previews[-1][1], np.asarray(r.images[0]))


def test_one_model_is_safe_across_threads(model):
    """Calls on one Emu3 are serialized by its lock: concurrent results equal sequential ones."""
    expected = [model.generate_image("a red cat", seed=s, cfg_scale=1.0).tokens for s in range(3)]
    results = [None] * 3

    def work(s):
        results[s] = model.generate_image("a red cat", seed=s, cfg_scale=1.0).tokens

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_generate_size_matches_reference_examples():
    assert calculate_generate_size("1:1", 518400, 8) == (90, 90)
    assert calculate_generate_size("16:9", 518400, 8) == (68, 120)
    assert calculate_generate_size("4:3", 518400, 8) == (78, 104)


def test_cfg_batch_positions():
    """cond rows count from their first real token; uncond rows count over their own padded width."""
    b = make_batch([[5, 6, 7], [8]], [[1, 2], [3, 4]], pad_id=0)
    assert b.ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2], [0, 3, 4]]
    assert b.mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1], [0, 1, 1]]
    assert b.positions[:, -1].tolist() == [2, 0, 1, 1]
    assert b.positions[2:, 1:].tolist() == [[0, 1], [0, 1]]


# ---- CLI ----

def test_cli_generate_image_writes_png_with_metadata(capsys, tmp_path):
    out = tmp_path / "cat.png"
    code, stdout, err = cli(capsys, "generate-image", "--prompt", "a red cat", "-o", str(out), "--seed", "5",
                            "--quiet")
    assert code == 0, err
    assert stdout.strip() == str(out)
    info = Image.open(out).text
    params = json.loads(info["parameters"])
    assert params["prompt"] == "a red cat" and params["seed"] == 5 and params["cfg_scale"] == 3.0
    assert params["bundle_sha256"] == emu3_rt.load_bundle(TINY_BUNDLE).sha256
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob("*.partial.png"))
    assert out.stat().st_mode & 0o044 == 0o044, "readable like any file the user writes"


def test_cli_prints_random_seed(capsys, tmp_path):
    code, stdout, err = cli(capsys, "generate-image", "--prompt", "x", "-o", str(tmp_path / "x.png"), "--json")
    assert code == 0
    seed = json.loads(stdout)["seed"]
    assert f"seed: {seed}" in err


def test_cli_chat_json(capsys):
    code, stdout, err = cli(capsys, "chat", "--prompt", "hi", "--greedy", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    out = json.loads(stdout)
    assert set(out) >= {"text", "prompt_ids", "tokens", "seed"} and len(out["tokens"][0]) <= 4


@pytest.mark.parametrize("command", [["chat", "--prompt", "hi", "--max-new-tokens", "6"],
                                     ["generate-image", "--prompt", "a cat", "-o", "{tmp}/x.png"]])
def test_cli_temperature_zero_is_greedy(tmp_path, command):
    """`--temperature 0` decodes greedily, as OpenAI's temperature 0 (SamplingOptions.from_bundle), through the
    installed entry point; no seed is drawn or printed for it."""
    def run(*extra):
        argv = [a.replace("{tmp}", str(tmp_path)) for a in command] + ["--json", *extra]
        out = subprocess.run(["emu3-rt", *argv], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout), out.stderr

    (zero, err), (greedy, _) = run("--temperature", "0"), run("--greedy")
    assert zero["tokens"] == greedy["tokens"] and zero["seed"] is None and "seed: " not in err


@pytest.mark.parametrize("argv,needle", [
    (["generate-image", "--prompt", "x", "--top-k", "0"], "--top-k"),
    (["generate-image", "--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate-image", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate-image", "--prompt", "x", "--cfg-scale", "-2"], "--cfg-scale"),
    (["generate-image", "--prompt", "x", "--cfg-scale", "nan"], "--cfg-scale: expected a finite number"),
    (["generate-image", "--prompt", "x", "--ratio", "wide"], "ratio"),
    (["generate-image", "--prompt", "x", "--ratio", "0:1"], "ratio"),
    (["generate-image", "--prompt", "x", "--image-area", "100000000"], "context"),
    (["generate-image", "--prompt", "   "], "empty"),
    (["generate-image", "--prompt", "x", "--image-area", "256"], "too narrow"),
    (["chat", "--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
    (["chat", "--prompt", "x", "--image", "/nonexistent.png"], "nonexistent.png"),
    (["chat", "--prompt", "x", "--bundle", "/nonexistent-bundle"], "no such bundle"),
    (["chat", "--raw-prompt", "--prompt", "x<image>"], "placeholder"),
    (["chat", "--prompt", "x", "--device", "cuda"], "CUDAExecutionProvider"),
])
def test_cli_errors_are_one_line_exit_2(capsys, tmp_path, argv, needle):
    code, stdout, err = cli(capsys, *argv, "--quiet", *(["-o", str(tmp_path / "o.png")]
                                                        if argv[0] == "generate-image" else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_cli_subprocess_invalid_utf8_and_verbose(tmp_path):
    r = subprocess.run([sys.executable, "-m", "emu3_rt", "chat", "--prompt", b"caf\xe9".decode("utf-8",
                        "surrogateescape")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid UTF-8" in r.stderr
    r = subprocess.run([sys.executable, "-m", "emu3_rt", "chat", "--prompt", "x", "--top-p", "2", "-v"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr


# ---- isolation ----

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_works_without_torch_or_transformers(tmp_path):
    """Chat and text-to-image end to end with torch/transformers/onnx made unimportable."""
    code = BLOCK + f"""
import emu3_rt, PIL.Image
m = emu3_rt.load({str(TINY_BUNDLE)!r}, verify=True)
r = m.generate_image('a red cat', seed=0)
c = m.chat('what?', images=[PIL.Image.new('RGB', (40, 40))], max_new_tokens=5, seed=0)
assert r.images[0].size == (64, 64) and c.tokens
bad = [n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', 'onnx')]
assert not bad, bad
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = subprocess.run([sys.executable, "-c", BLOCK + "from emu3_rt.cli import main; raise SystemExit(main(["
                        "'generate-image', '--prompt', 'a', '-o', 'a.png', '--quiet']))"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").is_file()


def test_readme_main_command_uses_the_cli():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- main-command -->")[1].split("<!-- /main-command -->")[0]
    assert "emu3-rt generate-image" in block


def test_chunked_prefill_gives_the_same_tokens():
    """The prompt through the step graph in 3-token chunks or in one call: the same greedy tokens."""
    one = emu3_rt.load(TINY_BUNDLE, prefill_chunk=4096)
    small = emu3_rt.load(TINY_BUNDLE, prefill_chunk=3)
    img = Image.new("RGB", (40, 56), (20, 200, 30))
    a = one.chat("describe it", images=[img], sampling=GREEDY, max_new_tokens=10)
    b = small.chat("describe it", images=[img], sampling=GREEDY, max_new_tokens=10)
    assert a.tokens == b.tokens
    assert (one.generate_image(["a", "bb"], cfg_scale=3.0, sampling=GREEDY).tokens
            == small.generate_image(["a", "bb"], cfg_scale=3.0, sampling=GREEDY).tokens)


def test_cli_error_while_sessions_open_in_background_exits_cleanly(tmp_path):
    """The CLI opens its sessions in a background thread; an error at once must still exit 2, never abort."""
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "emu3_rt", "generate-image", "--prompt", "x", "--top-p", "2",
                            "-o", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and "terminate called" not in r.stderr, r.stderr
