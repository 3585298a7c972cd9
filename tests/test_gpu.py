"""GPU engines on the tiny bundle: the same greedy tokens as onnxruntime CPU. Skipped cleanly without a GPU."""

from __future__ import annotations

import shutil

import pytest

import emu3_rt
from emu3_rt import SamplingOptions

from .conftest import TINY_BUNDLE

GREEDY = SamplingOptions(greedy=True)


def _cpu_reference():
    cpu = emu3_rt.load(TINY_BUNDLE)
    return (cpu.generate_image(["a red cat", "a dog"], ratio=["1:1", "4:3"], sampling=GREEDY).tokens,
            cpu.chat("hello there", sampling=GREEDY, max_new_tokens=16).tokens)


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu with a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_ort_gpu_tokens_equal_cpu(device):
    images, chat = _cpu_reference()
    try:
        model = emu3_rt.load(TINY_BUNDLE, device=device)
        got = model.generate_image(["a red cat", "a dog"], ratio=["1:1", "4:3"], sampling=GREEDY).tokens
    except emu3_rt.EngineError as e:
        if device == "tensorrt" and "not available" in str(e):
            pytest.skip(str(e))
        raise
    assert got == images
    assert model.chat("hello there", sampling=GREEDY, max_new_tokens=16).tokens == chat


@pytest.mark.trt
def test_tensorrt_plans_tokens_equal_cpu(tmp_path):
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda.bindings")
    from export.build_trt import main as build_trt

    bundle = tmp_path / "tiny"
    shutil.copytree(TINY_BUNDLE, bundle)
    assert build_trt(["--bundle", str(bundle), "--max-batch", "4", "--max-image-side", "128"]) == 0
    images, chat = _cpu_reference()
    model = emu3_rt.load(bundle, engine="trt")
    assert model.generate_image(["a red cat", "a dog"], ratio=["1:1", "4:3"], sampling=GREEDY).tokens == images
    assert model.chat("hello there", sampling=GREEDY, max_new_tokens=16).tokens == chat
    # a plan whose bytes changed is refused
    plan = next((bundle / "trt").glob("decoder_step*.plan"))
    plan.write_bytes(plan.read_bytes()[:-1] + b"\0")
    with pytest.raises(emu3_rt.EngineError, match="sha256 does not match"):
        emu3_rt.load(bundle, engine="trt")


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu with a CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_device_state_logits_equal_cpu(cuda_graph):
    """The CUDA decode state (device KV, IOBinding; optionally CUDA graphs) gives the CPU host cache's logits on
    the tiny bundle, with only ids / positions / mask slots sent per decode step."""
    pytest.importorskip("cuda.bindings")
    import numpy as np

    from emu3_rt.bundle import load_bundle
    from emu3_rt.engines import OrtEngine, OrtOptions
    from emu3_rt.engines.state import KVLayout
    from emu3_rt.generate import decode_step, prefill
    from emu3_rt.prompt import make_batch

    bundle = load_bundle(TINY_BUNDLE)
    layout, batch = KVLayout.from_bundle(bundle), make_batch([[5, 9, 2, 7, 11, 3], [4, 4, 8]], None, 0)
    logits = []
    for engine in (OrtEngine(bundle.decoder), OrtEngine(bundle.decoder, OrtOptions(device="cuda",
                                                                                   cuda_graph=cuda_graph))):
        try:
            state = engine.new_state(layout, 2)
            out = [prefill(engine, state, batch, 4)]
            out += [decode_step(engine, state, np.array([6 + i, 10]), i) for i in range(300)]  # crosses a block
        except emu3_rt.EngineError as e:
            if cuda_graph and "cannot capture" in str(e):
                pytest.skip(str(e))
            raise
        logits.append(out)
    for a, b in zip(*logits):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    assert state.traffic.last_h2d == 4 * 2 * 8
