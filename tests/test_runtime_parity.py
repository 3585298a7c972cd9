"""emu3_rt against Transformers, token for token (greedy), through the CLI's --json output.

Each case builds the same prompt both ways: Emu3Processor + model.generate on the tiny checkpoint, and
`emu3-rt ... --json` on the bundle exported from it. Presets: "tiny" (GQA, small vocab) and "tiny-realvocab"
(the real 184,622-id layout and 32,768-code codebook).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from emu3_rt.cli import main

from . import hf_reference as hf

pytestmark = pytest.mark.export
PRESETS = ["tiny", "tiny-realvocab"]


def run_cli(capsys, *argv) -> dict:
    capsys.readouterr()
    code = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Odd-sized test images saved as files (the CLI reads paths)."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(57, 91), (40, 30), (64, 64)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[: h // 2] //= 2  # some structure, so codes are not all alike
        path = root / f"p{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _setup(bundles, checkpoints, preset, kv_cache="buffer"):
    out, manifest, _ = bundles(preset, kv_cache=kv_cache)
    assert manifest["model"]["decoder"]["kv_cache"] == kv_cache
    return str(out), str(checkpoints(preset))


# KV layouts under test: the buffer growing as it does by default (kv_cache.capacity_for: 32-position blocks at
# these lengths), the buffer growing every 7 positions (odd, so growth lands inside prefill chunks and between
# decode steps), and concat.
KV_CASES = [("buffer", 256), ("buffer", 7), ("concat", 256)]


@pytest.mark.parametrize("preset", PRESETS)
def test_chat_one_image_templated(bundles, checkpoints, capsys, pictures, preset):
    bundle, ck = _setup(bundles, checkpoints, preset)
    text = "Please describe the image."
    got = run_cli(capsys, "chat", "--bundle", bundle, "--prompt", text, "--image", str(pictures[0]),
                  "--system", "You are a helpful assistant.", "--greedy", "--max-new-tokens", "12")
    prompt = hf.template(ck, text, 1, system="You are a helpful assistant.")
    ids, tokens = hf.chat(ck, [prompt], [Image.open(pictures[0])], 12)
    assert got["prompt_ids"] == ids
    assert got["tokens"] == tokens


def test_chat_two_images_raw(bundles, checkpoints, capsys, pictures):
    bundle, ck = _setup(bundles, checkpoints, "tiny")
    text = "What do you see in this image?<image>and this one<image>"
    got = run_cli(capsys, "chat", "--bundle", bundle, "--raw-prompt", "--prompt", text, "--image", str(pictures[0]),
                  "--image", str(pictures[1]), "--greedy", "--max-new-tokens", "10")
    ids, tokens = hf.chat(ck, [text], [Image.open(pictures[0]), Image.open(pictures[1])], 10)
    assert got["prompt_ids"] == ids and got["tokens"] == tokens


def test_chat_two_images_templated(bundles, checkpoints, capsys, pictures):
    bundle, ck = _setup(bundles, checkpoints, "tiny")
    got = run_cli(capsys, "chat", "--bundle", bundle, "--prompt", "compare them", "--image", str(pictures[1]),
                  "--image", str(pictures[2]), "--greedy", "--max-new-tokens", "10")
    ids, tokens = hf.chat(ck, [hf.template(ck, "compare them", 2)], [Image.open(pictures[1]),
                                                                       Image.open(pictures[2])], 10)
    assert got["prompt_ids"] == ids and got["tokens"] == tokens


def test_chat_multi_turn_through_the_template(bundles, checkpoints, pictures):
    """A conversation (system, user with an image, assistant, user with an image) through the Python API's
    history: the processor's apply_chat_template of the same messages, with the images in message order."""
    import emu3_rt

    bundle, ck = _setup(bundles, checkpoints, "tiny")
    images = [Image.open(pictures[0]), Image.open(pictures[1])]
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A striped square."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]}]
    _, processor = hf.load(ck)
    ids, tokens = hf.chat(ck, [processor.apply_chat_template(messages, add_generation_prompt=True)], images, 10)
    got = emu3_rt.load(bundle).chat(
        "And this one?", images=images, system="Be brief.", max_new_tokens=10,
        sampling=emu3_rt.SamplingOptions(greedy=True),
        history=[emu3_rt.Turn("user", "What is this?", images=1), emu3_rt.Turn("assistant", "A striped square.")])
    assert got.prompt_ids == ids and got.tokens == tokens


# plain greedy picks with numpy's argmax on the CPU by default; "graph" runs the sampler graph's greedy branch
@pytest.mark.parametrize("sampler", ["default", "graph"])
@pytest.mark.parametrize("raw", [False, True])
def test_chat_text_only(bundles, checkpoints, capsys, raw, sampler):
    bundle, ck = _setup(bundles, checkpoints, "tiny")
    text = "hello world, what is a red cat?"
    flags = (["--raw-prompt"] if raw else []) + (["--sampler", "graph"] if sampler == "graph" else [])
    got = run_cli(capsys, "chat", "--bundle", bundle, *flags, "--prompt", text, "--greedy",
                  "--max-new-tokens", "15")
    ids, tokens = hf.chat(ck, [text if raw else hf.template(ck, text, 0)], None, 15)
    assert got["prompt_ids"] == ids and got["tokens"] == tokens


@pytest.mark.parametrize("sampler", ["default", "graph"])
@pytest.mark.parametrize("preset", PRESETS)
def test_chat_batch_of_two_lengths(bundles, checkpoints, capsys, pictures, preset, sampler):
    bundle, ck = _setup(bundles, checkpoints, preset)
    a, b = "a dog", "please describe the picture of the old house at night in detail"
    flags = ["--sampler", "graph"] if sampler == "graph" else []
    got = run_cli(capsys, "chat", "--bundle", bundle, "--raw-prompt", "--prompt", a, "--prompt", b, *flags,
                  "--greedy", "--max-new-tokens", "9")
    ids, tokens = hf.chat(ck, [a, b], None, 9)
    assert got["prompt_ids"] == ids and got["tokens"] == tokens


@pytest.mark.parametrize("kv_cache,block", KV_CASES)
def test_chat_batch_with_images(bundles, checkpoints, capsys, pictures, monkeypatch, kv_cache, block):
    """Images of one call are zero-padded into one VQ batch, as Emu3ImageProcessor does."""
    monkeypatch.setattr("emu3_rt.kv_cache.KV_BLOCK", block)
    bundle, ck = _setup(bundles, checkpoints, "tiny", kv_cache)
    a, b = "<image>what is it?", "and<image>here"
    got = run_cli(capsys, "chat", "--bundle", bundle, "--raw-prompt", "--prompt", a, "--image", str(pictures[0]),
                  "--prompt", b, "--image", str(pictures[1]), "--greedy", "--max-new-tokens", "8")
    ids, tokens = hf.chat(ck, [a, b], [Image.open(pictures[0]), Image.open(pictures[1])], 8)
    assert got["prompt_ids"] == ids and got["tokens"] == tokens


def _check_image(got, ck, tokens, grids, pixels, tmp_path):
    assert got["tokens"] == tokens and got["grid"] == [list(g) for g in grids]
    for path, px in zip(got["images"], pixels):
        ours = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        ref = np.asarray(hf.postprocess(ck, px), dtype=np.int16)
        # VQ pixels agree to <= 1e-4 (export parity); after x255 and truncation that is at most one level
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1


@pytest.mark.parametrize("preset", PRESETS)
def test_text_to_image_without_cfg(bundles, checkpoints, capsys, tmp_path, preset):
    bundle, ck = _setup(bundles, checkpoints, preset)
    area = 4096 if preset == "tiny" else 48 * 48
    got = run_cli(capsys, "generate-image", "--bundle", bundle, "--prompt", "a red cat", "--cfg-scale", "1",
                  "--greedy", "--image-area", str(area), "-o", str(tmp_path / "cat.png"))
    ids, tokens, grids, pixels = hf.text_to_image(ck, ["a red cat"], ["1:1"], area, None, None)
    assert got["prompt_ids"] == ids
    _check_image(got, ck, tokens, grids, pixels, tmp_path)


@pytest.mark.parametrize("preset", PRESETS)
def test_text_to_image_with_cfg(bundles, checkpoints, capsys, tmp_path, preset):
    bundle, ck = _setup(bundles, checkpoints, preset)
    area = 4096 if preset == "tiny" else 48 * 48
    neg = "lowres, bad anatomy, blurry."
    got = run_cli(capsys, "generate-image", "--bundle", bundle, "--prompt", "a dog running under the rain",
                  "--negative-prompt", neg, "--cfg-scale", "3", "--greedy", "--image-area", str(area),
                  "-o", str(tmp_path / "dog.png"))
    ids, tokens, grids, pixels = hf.text_to_image(ck, ["a dog running under the rain"], ["1:1"], area, 3.0, neg)
    _check_image(got, ck, tokens, grids, pixels, tmp_path)


def test_text_to_image_cfg_uses_bundle_negative_prompt(bundles, checkpoints, capsys, tmp_path):
    bundle, ck = _setup(bundles, checkpoints, "tiny")
    got = run_cli(capsys, "generate-image", "--bundle", bundle, "--prompt", "a bird", "--greedy",
                  "-o", str(tmp_path / "bird.png"))  # cfg 3.0 and the negative prompt come from bundle.json
    from emu3_rt.bundle import load_bundle

    neg = load_bundle(bundle).search["negative_prompt"]
    _, tokens, grids, pixels = hf.text_to_image(ck, ["a bird"], ["1:1"], 4096, 3.0, neg)
    _check_image(got, ck, tokens, grids, pixels, tmp_path)


@pytest.mark.parametrize("kv_cache,block", KV_CASES)
def test_two_ratios_in_one_batch_with_cfg(bundles, checkpoints, capsys, tmp_path, monkeypatch, kv_cache, block):
    """Different grids per row (4:3 gives 7x9, 1:2 gives 11x6) and uncond rows of different lengths."""
    monkeypatch.setattr("emu3_rt.kv_cache.KV_BLOCK", block)
    bundle, ck = _setup(bundles, checkpoints, "tiny", kv_cache)
    prompts = ["a portrait of young girl", "sunset"]
    got = run_cli(capsys, "generate-image", "--bundle", bundle, "--prompt", prompts[0], "--prompt", prompts[1],
                  "--ratio", "4:3", "--ratio", "1:2", "--cfg-scale", "3", "--negative-prompt", "ugly", "--greedy",
                  "-o", str(tmp_path / "pair.png"))
    ids, tokens, grids, pixels = hf.text_to_image(ck, prompts, ["4:3", "1:2"], 4096, 3.0, "ugly")
    assert grids[0] != grids[1]
    assert got["prompt_ids"] == ids
    _check_image(got, ck, tokens, grids, pixels, tmp_path)


def test_same_seed_same_tokens(capsys, tmp_path):
    """Sampling (top-k 2048 default) on the embedded bundle: the seed fixes the image."""
    a = run_cli(capsys, "generate-image", "--prompt", "a red cat", "--seed", "7", "-o", str(tmp_path / "a.png"))
    b = run_cli(capsys, "generate-image", "--prompt", "a red cat", "--seed", "7", "-o", str(tmp_path / "b.png"))
    c = run_cli(capsys, "generate-image", "--prompt", "a red cat", "--seed", "8", "-o", str(tmp_path / "c.png"))
    assert a["tokens"] == b["tokens"] and a["seed"] == 7
    assert a["tokens"] != c["tokens"]
    assert (tmp_path / "a.png").read_bytes() != b"" and Image.open(tmp_path / "a.png").size == (64, 64)


def test_visual_head_bundle_same_image_tokens(bundles, checkpoints, capsys, tmp_path):
    """--head visual scores only visual + control ids: CFG and the grid constraint pick the same tokens."""
    out, manifest, checks = bundles("tiny", head="visual")
    ck = str(checkpoints("tiny"))
    assert manifest["model"]["decoder"]["head"] == "visual" and all(c.ok for c in checks)
    assert manifest["model"]["decoder"]["io"]["outputs"][0]["dims"] == ["batch_size", 256 + 5]
    prompts = ["a portrait of young girl", "sunset"]
    got = run_cli(capsys, "generate-image", "--bundle", str(out), "--prompt", prompts[0], "--prompt", prompts[1],
                  "--ratio", "4:3", "--ratio", "1:1", "--cfg-scale", "3", "--negative-prompt", "ugly", "--greedy",
                  "-o", str(tmp_path / "v.png"))
    ids, tokens, grids, pixels = hf.text_to_image(ck, prompts, ["4:3", "1:1"], 4096, 3.0, "ugly")
    _check_image(got, ck, tokens, grids, pixels, tmp_path)
    capsys.readouterr()
    assert main(["chat", "--bundle", str(out), "--prompt", "hi", "--quiet"]) == 2
    assert "generates images only" in capsys.readouterr().err
