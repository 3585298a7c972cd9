"""Generations driven step by step (Emu3.start_chat / start_image): the same results as chat / generate_image,
streaming text deltas, row progress and previews, cancellation that releases the state, per-prompt seeds, and
several generations interleaved on one model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import emu3_rt
from emu3_rt import GenerationError, SamplingOptions

from .conftest import TINY_BUNDLE, engine_runs

GREEDY = SamplingOptions(greedy=True)
IMAGE = dict(cfg_scale=3.0, image_area=64 * 64, ratio=["1:1", "3:2"])


@pytest.fixture(scope="module")
def model():
    return emu3_rt.load(TINY_BUNDLE)


def test_stepping_a_chat_equals_chat(model):
    gen = model.start_chat(["hello there", "what is this?"], max_new_tokens=10, seed=3)
    deltas = ["", ""]
    steps = 0
    while (ids := gen.step()) is not None:
        assert ids.shape == (2,) and gen.steps == steps + 1
        steps += 1
        for r, d in enumerate(gen.text_deltas()):
            deltas[r] += d
    assert gen.done and gen.step() is None
    result = gen.result()
    assert result == model.chat(["hello there", "what is this?"], max_new_tokens=10, seed=3)
    assert deltas == result.texts


def test_stepping_an_image_equals_generate_image(model):
    gen = model.start_image(["a red cat", "a blue car"], seed=5, **IMAGE)
    progress = []
    while gen.step() is not None:
        progress.append(gen.rows_done())
    direct = model.generate_image(["a red cat", "a blue car"], seed=5, **IMAGE)
    result = gen.result()
    assert result.tokens == direct.tokens and result.seeds == direct.seeds == [5, 6]
    assert [np.asarray(im).tolist() for im in result.images] == [np.asarray(im).tolist() for im in direct.images]
    assert progress[-1] == [h for h, _ in gen.grids]
    assert all(a <= b for p, q in zip(progress, progress[1:]) for a, b in zip(p, q))   # rows only grow


def test_preview_is_grey_below_the_rows_done(model):
    gen = model.start_image("a cat", seed=1, cfg_scale=1.0, image_area=64 * 64)
    (h, w), = gen.grids
    while gen.rows_done()[0] < 3:
        gen.step()
    f = model.bundle.spatial_factor
    pixels = np.asarray(gen.preview(0))
    assert pixels.shape == (h * f, w * f, 3)
    assert (pixels[3 * f:] == 128).all() and not (pixels[: 3 * f] == 128).all()
    gen.cancel()


def test_cancel_releases_state_and_result_refuses(model):
    gen = model.start_image("a cat", **{**IMAGE, "ratio": "1:1"})
    gen.step()
    gen.step()
    gen.cancel()
    assert gen.done and gen.step() is None and gen._decoding.cache is None
    with pytest.raises(GenerationError, match="cancelled"):
        gen.result()


def test_per_prompt_seeds_equal_each_prompt_alone(model):
    prompts = ["a red cat", "a blue car", "a green tree"]
    batch = model.generate_image(prompts, seed=[40, 7, 99], cfg_scale=3.0, image_area=64 * 64)
    assert batch.seeds == [40, 7, 99]
    for prompt, seed, tokens in zip(prompts, [40, 7, 99], batch.tokens):
        assert model.generate_image(prompt, seed=seed, cfg_scale=3.0, image_area=64 * 64).tokens == [tokens]
    with pytest.raises(ValueError, match="seed holds 2 seeds for 3 prompts"):
        model.start_image(prompts, seed=[1, 2])


def test_interleaved_generations_on_one_model(model):
    """Two generations stepped alternately, and four in threads: each equals its sequential run."""
    a = model.start_chat("hello", max_new_tokens=8, seed=1)
    b = model.start_image("a cat", seed=2, **{**IMAGE, "ratio": "1:1"})
    while not (a.done and b.done):
        a.step()
        b.step()
    assert a.result() == model.chat("hello", max_new_tokens=8, seed=1)
    assert b.result().tokens == model.generate_image("a cat", seed=2, **{**IMAGE, "ratio": "1:1"}).tokens

    results = {}

    def work(i):
        results[i] = model.generate_image(f"prompt {i}", seed=i, cfg_scale=3.0, image_area=64 * 64).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[i] == model.generate_image(f"prompt {i}", seed=i, cfg_scale=3.0,
                                                  image_area=64 * 64).tokens for i in range(4))


def test_a_failing_step_releases_the_state(model, monkeypatch):
    gen = model.start_chat("hello", sampling=GREEDY, max_new_tokens=8)
    gen.step()
    engine = model.route("chat").step
    monkeypatch.setattr(engine, "execute", lambda binding: (_ for _ in ()).throw(emu3_rt.EngineError("boom")))
    with pytest.raises(emu3_rt.EngineError, match="boom"):
        gen.step()
    assert gen.done and gen._decoding.cache is None


def test_one_batch_mixes_image_sizes(model):
    """Per-prompt ratio and area: each row keeps its own grid and equals its prompt alone."""
    prompts, ratios, areas = ["a cat", "a car", "a tree"], ["1:1", "2:1", "1:3"], [64 * 64, 96 * 48, 48 * 144]
    batch = model.generate_image(prompts, ratio=ratios, image_area=areas, seed=[1, 2, 3], cfg_scale=3.0)
    assert len(set(batch.grids)) == 3
    for i in range(3):
        alone = model.generate_image(prompts[i], ratio=ratios[i], image_area=areas[i], seed=i + 1, cfg_scale=3.0)
        assert alone.tokens[0] == batch.tokens[i] and alone.grids[0] == batch.grids[i]
    with pytest.raises(ValueError, match="image_area holds 2 values for 3 prompts"):
        model.start_image(prompts, image_area=[4096, 4096])


@pytest.mark.parametrize("sampler", ["graph", "numpy"])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingOptions(top_k=50)], ids=["greedy", "sampled"])
def test_forced_steps_skip_the_model_and_change_nothing(monkeypatch, sampler, sampling):
    """The grid's forced tokens (EOL, EOF, EOI, EOS, and pad of finished rows) run no model of their own: the same
    tokens (greedy and seeded sampling, so the draws are the same too) as a loop that runs every step, with mixed
    grids in one CFG batch, and fewer step-graph runs."""
    from emu3_rt.pipeline import Emu3

    model = emu3_rt.load(TINY_BUNDLE, sampler=sampler)
    args = dict(ratio=["1:1", "2:1", "1:3"], image_area=[64 * 64, 96 * 48, 48 * 144], seed=[1, 2, 3], cfg_scale=3.0,
                sampling=sampling)
    runs, real_decoding = engine_runs(monkeypatch), Emu3._decoding
    folded = model.generate_image(["a cat", "a car", "a tree"], **args)
    folded_runs, runs[:] = runs.count("decoder_step_visual.onnx"), []
    monkeypatch.setattr(Emu3, "_decoding", lambda self, *a: real_decoding(self, *a[:5]))  # no grid: every step
    every = model.generate_image(["a cat", "a car", "a tree"], **args)
    assert folded.tokens == every.tokens and folded.grids == every.grids
    assert runs.count("decoder_step_visual.onnx") == max(len(t) for t in every.tokens)
    # a step runs when some row picks a visual id: the widest grid's EOLs ride along, its last 4 tokens never run
    assert folded_runs < runs.count("decoder_step_visual.onnx") - 4
