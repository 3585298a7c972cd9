"""What happens on a bad day: corrupt graphs, graphs that disagree with the manifest, engines that fail
mid-generation, broken image grids, prompts that cannot fit. Each gives one clear error and writes nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import emu3_rt
from emu3_rt.cli import main
from emu3_rt.engines import EngineError
from emu3_rt.engines.state import HostStepEngine
from emu3_rt.generation import GenerationError, check_image_tokens
from emu3_rt.options import SamplingOptions
from emu3_rt.prompt import PromptError

from .conftest import TINY_BUNDLE, refresh_hash

GREEDY = SamplingOptions(greedy=True)


def test_truncated_onnx_names_the_file(bundle_copy):
    path = bundle_copy / "decoder_step.onnx"
    path.write_bytes(path.read_bytes()[:5000])
    refresh_hash(bundle_copy, "decoder_step.onnx")
    model = emu3_rt.load(bundle_copy)
    with pytest.raises(EngineError, match=r"decoder_step.onnx: onnxruntime cannot load it"):
        model.chat("hi", sampling=GREEDY, max_new_tokens=2)


def test_graph_that_disagrees_with_manifest(bundle_copy):
    """bundle.json describes vq_encoder.onnx, but the file is the decoder: the I/O check catches it."""
    shutil.copyfile(bundle_copy / "vq_decoder.onnx", bundle_copy / "vq_encoder.onnx")
    refresh_hash(bundle_copy, "vq_encoder.onnx")
    model = emu3_rt.load(bundle_copy)
    from PIL import Image

    with pytest.raises(EngineError, match="vq_encoder.onnx: graph inputs do not match bundle.json"):
        model.chat("what?", images=[Image.new("RGB", (32, 32))], sampling=GREEDY, max_new_tokens=2)


def test_manifest_dtype_mismatch(bundle_copy):
    m = json.loads((bundle_copy / "bundle.json").read_text())
    m["model"]["vq_decoder"]["io"]["outputs"][0]["dtype"] = "float16"
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    model = emu3_rt.load(bundle_copy)
    with pytest.raises(EngineError, match="output 'pixel_values' is float32 rank 4, bundle.json says float16"):
        model.generate_image("x", seed=0)


class FailingEngine:
    """Wraps the real step engine and fails on its n-th call (run() only: engines.state.HostStepEngine makes it a
    step engine, over the same decode state)."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.spec, self.calls, self.fail_at = inner, inner.spec, 0, fail_at
        self.rows = []

    def run(self, feeds):
        self.calls += 1
        self.rows.append(feeds["input_ids"].shape[0])
        if self.calls == self.fail_at:
            raise EngineError(f"{self.spec.path.name}: run failed (injected)")
        return self.inner.run(feeds)


def test_engine_failure_names_the_step():
    model = emu3_rt.load()  # images run the bundle's image step graph (--head both)
    model.engines["image_decoder"] = HostStepEngine(FailingEngine(model.engines["image_decoder"], fail_at=6))
    with pytest.raises(EngineError, match=r"^decode step 4: decoder_step_visual.onnx: run failed"):
        model.generate_image("a cat", seed=0)


def test_engine_failure_in_cli_writes_nothing(tmp_path, capsys, monkeypatch):
    real_load = emu3_rt.pipeline.load

    def load_failing(*a, **k):
        model = real_load(*a, **k)
        model.engines["image_decoder"] = HostStepEngine(FailingEngine(model.engines["image_decoder"], fail_at=30))
        return model

    monkeypatch.setattr(emu3_rt.pipeline, "load", load_failing)
    out = tmp_path / "x.png"
    code = main(["generate-image", "--prompt", "x", "-o", str(out), "--preview-every", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    # the 30th step-graph call (prefill, then decode steps; a grid's forced EOL rides with the next step's token)
    assert code == 2 and len(err) == 1 and "decode step 31: decoder_step_visual.onnx: run failed" in err[0]
    assert list(tmp_path.iterdir()) == [], "no PNG, partial preview or temp file may remain"


def test_cfg_always_runs_the_unconditional_rows():
    """cfg_scale != 1 doubles the rows of every engine call; cfg_scale == 1 does not."""
    model = emu3_rt.load()
    spy = FailingEngine(model.engines["image_decoder"], fail_at=-1)
    model.engines["image_decoder"] = HostStepEngine(spy)
    model.generate_image(["a", "b"], cfg_scale=3.0, seed=0)
    assert set(spy.rows) == {4}
    spy.rows.clear()
    model.generate_image(["a", "b"], cfg_scale=1.0, seed=0)
    assert set(spy.rows) == {2}


def test_broken_grid_is_refused_before_vq_decode():
    b = emu3_rt.load_bundle(TINY_BUNDLE)
    t = b.tokens
    v = int(b.visual_ids[0])
    good = [v, v, t.eol] * 2 + [t.eof, t.eoi, t.eos]
    check_image_tokens(np.array(good), 2, 2, b)
    for bad in (good[:-1], [v, v, v] + good[3:], good[:5] + [t.eos, t.eoi, t.eof], [t.pad] + good[1:]):
        with pytest.raises(GenerationError):
            check_image_tokens(np.array(bad), 2, 2, b)


def test_chat_prompt_longer_than_context():
    model = emu3_rt.load()
    with pytest.raises(PromptError, match="context is 1024"):
        model.chat("cat " * 2000, sampling=GREEDY)


def test_chat_stops_at_the_context_limit():
    model = emu3_rt.load()
    text = "cat " * 505  # about 1015 prompt tokens with the template, so under 10 tokens of room
    r = model.chat(text, sampling=GREEDY, max_new_tokens=500)
    assert len(r.prompt_ids[0]) + len(r.tokens[0]) <= model.bundle.context_length


def test_trt_engine_without_tensorrt_says_what_to_install():
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    with pytest.raises(EngineError, match=r"pip install 'emu3-bundle\[trt\]'"):
        emu3_rt.load(engine="trt")


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": -3}])
def test_chat_rejects_zero_tokens(kwargs):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        emu3_rt.load().chat("hi", sampling=GREEDY, **kwargs)


def test_image_rejects_zero_area():
    with pytest.raises(ValueError, match="image_area must be >= 1"):
        emu3_rt.load().generate_image("hi", image_area=0)


def test_bundle_without_chat_template(bundle_copy):
    (bundle_copy / "chat_template.jinja").write_text("")
    refresh_hash(bundle_copy, "chat_template.jinja")
    model = emu3_rt.load(bundle_copy, verify=True)
    with pytest.raises(PromptError, match="no chat template"):
        model.chat("hi", sampling=GREEDY, max_new_tokens=2)
    assert model.chat("hi", raw=True, sampling=GREEDY, max_new_tokens=2).tokens
