"""The bundle's sampler graph drives the decode loop: same tokens as the numpy reference chain (greedy and seeded
sampling, CFG, grids of different sizes in one batch, chat), one sampler call per step, clear refusals."""

from __future__ import annotations

import json

import pytest

import emu3_rt
from emu3_rt.bundle import BundleError, load_bundle
from emu3_rt.engines import ort

from .conftest import TINY_BUNDLE, engine_runs

GREEDY = emu3_rt.SamplingOptions(greedy=True)
SAMPLED = [emu3_rt.SamplingOptions(), emu3_rt.SamplingOptions(top_k=5, top_p=0.8, temperature=0.7),
           emu3_rt.SamplingOptions(top_k=1)]


@pytest.fixture(scope="module")
def models():
    return emu3_rt.load(TINY_BUNDLE), emu3_rt.load(TINY_BUNDLE, sampler="numpy")


def test_checked_in_bundle_has_a_sampler_graph(models):
    graph, numpy = models
    assert "sampler" in graph.engines and "sampler" not in numpy.engines


@pytest.mark.parametrize("sampling", [GREEDY] + SAMPLED)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_images_equal_numpy_chain(models, sampling, cfg):
    graph, numpy = models
    kw = dict(cfg_scale=cfg, ratio=["1:1", "3:2"], image_area=64 * 64, sampling=sampling, seed=11)
    a = graph.generate_image(["a red cat", "a blue car"], **kw)
    b = numpy.generate_image(["a red cat", "a blue car"], **kw)
    assert a.tokens == b.tokens and a.seeds == b.seeds


@pytest.mark.parametrize("sampling", [GREEDY] + SAMPLED)
def test_chat_equals_numpy_chain(models, sampling):
    graph, numpy = models
    a = graph.chat(["hello there", "a longer question about things"], sampling=sampling, max_new_tokens=12, seed=4)
    b = numpy.chat(["hello there", "a longer question about things"], sampling=sampling, max_new_tokens=12, seed=4)
    assert a.tokens == b.tokens


def test_one_sampler_call_per_step_and_no_logits_chain_on_host(models, monkeypatch):
    graph, _ = models
    calls = engine_runs(monkeypatch)
    real = ort.OrtEngine.execute

    def execute(self, binding):
        if self.spec.path.name == "sampler_visual.onnx":   # images: the visual head's sampler, on the step's logits
            assert set(binding.outputs) == {"ids", "logprobs"} and binding.outputs["ids"].shape == (1,)
            assert binding.inputs["logits"].shape == (2, self.spec.input("logits").dims[1])
        return real(self, binding)

    monkeypatch.setattr(ort.OrtEngine, "execute", execute)
    r = graph.generate_image("x", cfg_scale=3.0, image_area=64 * 64, sampling=emu3_rt.SamplingOptions(), seed=1)
    (h, w), = r.grids
    assert len(r.tokens[0]) == h * (w + 1) + 3
    # one run per visual token (the prefill chunk, then a step per visual token after the first): the grid's forced
    # EOL, EOF, EOI and EOS run no model (generate.py)
    assert calls.count("sampler_visual.onnx") == h * w
    assert calls.count("decoder_step_visual.onnx") == h * w


def test_graph_sampler_refused_without_a_graph(bundle_copy):
    m = json.loads((bundle_copy / "bundle.json").read_text())
    del m["model"]["sampler"]
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    assert load_bundle(bundle_copy).sampler is None
    assert "sampler" not in emu3_rt.load(bundle_copy).engines           # older bundles: the numpy chain
    with pytest.raises(ValueError, match="needs a bundle exported with a sampler graph"):
        emu3_rt.load(bundle_copy, sampler="graph")
    with pytest.raises(ValueError, match="sampler must be"):
        emu3_rt.load(bundle_copy, sampler="gpu")


def test_sampler_io_must_match_the_step_graph(bundle_copy):
    m = json.loads((bundle_copy / "bundle.json").read_text())
    m["model"]["sampler"]["io"]["inputs"][0]["dims"][-1] = 7
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="the sampler reads float32 logits of width"):
        load_bundle(bundle_copy)


def test_engine_failure_in_the_sampler_names_the_step(models, monkeypatch):
    graph, _ = models
    real = ort.OrtEngine.execute

    calls = []

    def execute(self, binding):
        if self.spec.path.name == "sampler_visual.onnx":
            calls.append(1)
            if len(calls) == 3:
                raise emu3_rt.EngineError("sampler_visual.onnx: run failed (injected)")
        return real(self, binding)

    monkeypatch.setattr(ort.OrtEngine, "execute", execute)
    with pytest.raises(emu3_rt.EngineError, match="sampler_visual.onnx"):
        graph.generate_image("x", cfg_scale=1.0, image_area=64 * 64, sampling=GREEDY)


def test_cli_sampler_choice_gives_the_same_image(tmp_path, capsys):
    from emu3_rt.cli import main

    for choice in ("graph", "numpy"):
        assert main(["generate-image", "--prompt", "x", "--seed", "9", "--image-area", "4096", "--sampler", choice,
                     "-o", str(tmp_path / f"{choice}.png"), "-q"]) == 0
    assert (tmp_path / "graph.png").read_bytes() != b""
    assert (tmp_path / "graph.png").read_bytes().replace(b"graph", b"") == (tmp_path / "numpy.png").read_bytes(
    ).replace(b"numpy", b"")


def test_plain_greedy_on_the_cpu_picks_on_the_host(monkeypatch):
    """Chat's default (greedy, no CFG, no grid) on onnxruntime CPU takes numpy's argmax of the logits already on
    the host instead of a sampler-graph run; sampler="graph" still runs the graph; the tokens are the same."""
    calls = engine_runs(monkeypatch)
    prompts = ["hello there", "a longer question about things"]
    auto = emu3_rt.load().chat(prompts, sampling=GREEDY, max_new_tokens=8)
    assert "sampler.onnx" not in calls and calls.count("decoder_step.onnx") == 8
    calls.clear()
    forced = emu3_rt.load(sampler="graph").chat(prompts, sampling=GREEDY, max_new_tokens=8)
    assert calls.count("sampler.onnx") == 8
    assert auto.tokens == forced.tokens
    calls.clear()   # CFG or the grid is never plain: an image still runs its sampler graph
    emu3_rt.load().generate_image("x", image_area=64 * 64, cfg_scale=3.0, sampling=GREEDY)
    assert calls.count("sampler_visual.onnx") == calls.count("decoder_step_visual.onnx") > 0
