"""Export of differently shaped tiny checkpoints: parity at untraced shapes, symbolic dims, manifest contents."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from emu3_rt.bundle import load_bundle

from .conftest import REPO, TINY_BUNDLE

pytestmark = pytest.mark.export

# preset -> (layers, heads, kv heads, vocab, codebook)
SHAPES = {
    "tiny": (2, 4, 2, 1067, 256),
    "tiny-mha": (3, 3, 3, 1211, 300),
    "tiny-realvocab": (2, 2, 1, 184622, 32768),
}


def _dims(path, names):
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for v in [*g.input, *g.output]:
        if v.name in names:
            out[v.name] = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return out


@pytest.mark.parametrize("preset", sorted(SHAPES))
def test_export_parity_and_geometry(bundles, preset):
    out, manifest, checks = bundles(preset)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    cases = {c.case.split(" empty=")[0] for c in checks if c.graph == "decoder_step"}
    # the shapes the issue names: batch 1 and 3, past 0/1/37, continuation, left padding
    assert {"B=1 P=0 S=7", "B=3 P=1 S=1", "B=1 P=37 S=1", "B=3 P=37 S=4", "B=2 P=0 S=9 leftpad=3"} <= cases
    # the KV buffer is checked with empty slots holding random values under mask 0, with and without padding
    assert {"B=1 P=37 S=1 empty=11", "B=2 P=6 S=1 leftpad=3 empty=5"} <= {c.case for c in checks}
    assert any("x" in c.case and c.case.split()[1].split("x")[0] != c.case.split()[1].split("x")[1]
               for c in checks if c.graph == "vq_encoder"), "no non-square encoder case"

    layers, heads, kv, vocab, codebook = SHAPES[preset]
    dec = manifest["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"]) == (layers, heads, kv)
    assert manifest["model"]["vocab_size"] == vocab and manifest["emu3"]["codebook_size"] == codebook
    bundle = load_bundle(out, verify=True)
    assert len(bundle.visual_ids) == codebook and len(np.unique(bundle.visual_ids)) == codebook


def test_real_id_layout(bundles):
    """The 184,622-id layout gives exactly the real checkpoints' special ids (emu3-reference section 0)."""
    out, manifest, _ = bundles("tiny-realvocab")
    ids = {role: t["id"] for role, t in manifest["emu3"]["tokens"].items()}
    assert ids == {"pad": 151643, "image": 151646, "eol": 151846, "eof": 151847, "bos": 151849, "eos": 151850,
                   "image_wrapper": 151851, "boi": 151852, "eoi": 151853}
    assert manifest["emu3"]["visual_token_runs"] == [[0, 151854, 32768]]


def test_dynamic_dims_are_symbolic(bundles):
    out, manifest, _ = bundles("tiny")
    step = _dims(out / "decoder_step.onnx", {"input_ids", "attention_mask", "past_key_values.1.value",
                                             "logits", "present.0.key"})
    assert step == {
        "input_ids": ["batch_size", "sequence_length"],
        "attention_mask": ["batch_size", "total_sequence_length"],
        "past_key_values.1.value": ["batch_size", 2, "past_sequence_length", 16],
        "logits": ["batch_size", 1067],
        "present.0.key": ["batch_size", 2, "sequence_length", 16],  # a buffer graph returns the new rows only
    }
    assert _dims(out / "vq_encoder.onnx", {"pixel_values", "codes"}) == {
        "pixel_values": ["batch_size", 3, "height", "width"], "codes": ["batch_size", "grid_height", "grid_width"]}
    assert _dims(out / "vq_decoder.onnx", {"pixel_values", "codes"}) == {
        "codes": ["batch_size", "grid_height", "grid_width"], "pixel_values": ["batch_size", 3, "height", "width"]}
    # and the manifest says the same
    io = manifest["model"]["decoder"]["io"]
    assert io["inputs"][3] == {"name": "past_key_values.0.key", "dtype": "float32",
                               "dims": ["batch_size", 2, "past_sequence_length", 16]}


def test_concat_kv_layout(bundles):
    """--kv-cache concat: present = past + new (Optimum's layout), verified the same way, recorded in the manifest."""
    out, manifest, checks = bundles("tiny", kv_cache="concat")
    assert all(c.ok for c in checks) and manifest["model"]["decoder"]["kv_cache"] == "concat"
    assert not any("empty=" in c.case for c in checks)
    assert _dims(out / "decoder_step.onnx", {"present.1.value"}) == {
        "present.1.value": ["batch_size", 2, "total_sequence_length", 16]}


def test_frozen_dim_is_rejected(bundles, tmp_path):
    """A graph whose batch dim came out static (the dynamo trap) fails the post-export check."""
    import onnx

    from export.export_onnx import _rename_and_check_dims, vq_decoder_specs

    out, _, _ = bundles("tiny")
    model = onnx.load(str(out / "vq_decoder.onnx"))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    path = tmp_path / "vq_decoder.onnx"
    onnx.save(model, str(path))
    with pytest.raises(RuntimeError, match=r"codes\[0\] was frozen to 1"):
        _rename_and_check_dims(path, vq_decoder_specs())


def test_opset23_variant(bundles):
    import onnx

    out, manifest, checks = bundles("tiny", opset=23)
    assert all(c.ok for c in checks)
    assert manifest["model"]["decoder"]["variant"] == "opset23-fused"
    ops = {n.op_type for n in onnx.load(str(out / "decoder_step.onnx")).graph.node}
    assert {"RMSNormalization", "RotaryEmbedding"} <= ops, ops
    # the buffer layout's split attention is plain MatMul/Softmax; the concat layout uses ONNX Attention
    out, _, checks = bundles("tiny", opset=23, kv_cache="concat")
    assert all(c.ok for c in checks)
    assert "Attention" in {n.op_type for n in onnx.load(str(out / "decoder_step.onnx")).graph.node}


def test_manifest_provenance_and_defaults(bundles, checkpoints):
    out, manifest, _ = bundles("tiny")
    for key in ("torch", "transformers", "onnx", "onnxscript", "exporter", "source_config_sha256"):
        assert manifest["export"][key]
    search = manifest["search"]
    assert (search["top_k"], search["cfg_scale"]) == (2048, 3.0)
    assert search["negative_prompt"].startswith("lowres, bad anatomy")
    ip = manifest["image_processor"]
    assert ip["image_mean"] == [0.5] * 3 and ip["resample"] == "bicubic" and ip["spatial_factor"] == 8
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != "bundle.json")
    template = (out / "chat_template.jinja").read_text()
    assert "ASSISTANT:" in template
    ck = checkpoints("tiny")
    assert (out / "tokenizer.json").read_bytes() == (ck / "tokenizer.json").read_bytes()


def test_cli_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "checkpoint directory does not exist" in lines[0], r.stderr
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_overwrite(bundles, checkpoints):
    from export.build import ExportError, ExportOptions, build_bundle

    out, _, _ = bundles("tiny")
    before = json.loads((out / "bundle.json").read_text())
    with pytest.raises(ExportError, match="--overwrite"):
        build_bundle(checkpoints("tiny"), out, ExportOptions())
    assert json.loads((out / "bundle.json").read_text()) == before


@pytest.mark.parametrize("bits,embeddings", [("int4", True), ("int8", False)])
def test_quantized_bundle_runs(checkpoints, tmp_path, bits, embeddings):
    """--quantize: MatMulNBits body, int8 lm_head, drift recorded in bundle.json, and the runtime uses it."""
    import onnx

    import emu3_rt
    from export.build import ExportOptions, build_bundle

    out = tmp_path / bits
    manifest, _ = build_bundle(checkpoints("tiny"), out, ExportOptions(quantize=bits, quantize_embeddings=embeddings))
    q = manifest["model"]["decoder"]["quantization"]
    assert q["weights"] == bits and q["lm_head"] == "int8" and q["top1_agreement"] >= 0.5
    nodes = onnx.load(str(out / "decoder_step.onnx")).graph.node
    bits_of = {n.output[0]: next(a.i for a in n.attribute if a.name == "bits") for n in nodes
               if n.op_type == "MatMulNBits"}
    assert bits_of.pop("logits") == 8 and set(bits_of.values()) == {int(bits[3:])}
    assert any(n.op_type == "GatherBlockQuantized" for n in nodes) == embeddings
    assert q["embeddings"] == ("int4" if embeddings else "float32")
    model = emu3_rt.load(out, verify=True)
    assert model.generate_image("a red cat", seed=0).images[0].size == (64, 64)


def test_fp16_bundle_verifies_and_runs(checkpoints, tmp_path):
    """fp16 step graph and KV cache: parity against the fp16 model, and the runtime keeps a float16 cache."""
    import emu3_rt
    from export.build import ExportOptions, build_bundle

    out = tmp_path / "fp16"
    manifest, checks = build_bundle(checkpoints("tiny"), out, ExportOptions(dtype="fp16"))
    assert all(c.ok for c in checks) and manifest["model"]["decoder"]["dtype"] == "float16"
    assert manifest["model"]["decoder"]["io"]["inputs"][3]["dtype"] == "float16"
    model = emu3_rt.load(out)
    r = model.generate_image(["a red cat", "a dog"], ratio=["1:1", "4:3"], seed=0)
    assert [im.size for im in r.images] == [(64, 64), (72, 56)]


def test_rms_norm_exports_in_the_form_onnxruntime_fuses(bundles, tmp_path):
    """Every RMSNorm of both step graphs reads x / Sqrt(..) (not x * Reciprocal(Sqrt(..))), so onnxruntime's
    optimizer makes each one a single SimplifiedLayerNormalization (2 per layer + the final norm)."""
    import onnx
    import onnxruntime as ort

    out, manifest, _ = bundles("tiny")
    layers = manifest["model"]["decoder"]["num_hidden_layers"]
    for name in ("decoder_step.onnx", "decoder_step_visual.onnx"):
        ops = [n.op_type for n in onnx.load(str(out / name), load_external_data=False).graph.node]
        assert "Reciprocal" not in ops, name
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(str(out / name), so, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(str(tmp_path / name), load_external_data=False).graph.node]
        assert fused.count("SimplifiedLayerNormalization") == 2 * layers + 1, name


def test_checked_in_bundle_is_the_current_export(bundles):
    """models/emu3-tiny is `--preset tiny --seed 0` exported with the defaults. A fresh export must declare the
    same manifest and compute the same outputs, so an exporter change cannot leave the checked-in bundle stale.
    (Outputs, not file hashes: the bytes also depend on the exporter's version.)"""
    import onnxruntime as ort

    out, manifest, _ = bundles("tiny")
    checked = json.loads((TINY_BUNDLE / "bundle.json").read_text())
    unpinned = ("files", "export")  # hashes and tool versions
    assert {k: v for k, v in checked.items() if k not in unpinned} == \
        {k: v for k, v in manifest.items() if k not in unpinned}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, manifest["model"]["vocab_size"], (2, 3))
    codes = rng.integers(0, manifest["emu3"]["codebook_size"], (2, 3, 5))
    kv = manifest["model"]["decoder"]
    past = rng.standard_normal((2, kv["num_key_value_heads"], 4, kv["head_size"]), dtype=np.float32)
    feeds = {
        "decoder_step.onnx": {"input_ids": ids, "attention_mask": np.array([[0, 1, 1, 0, 1, 1, 1]] * 2),
                              "position_ids": np.array([[2, 3, 4]] * 2),
                              **{f"past_key_values.{i}.{t}": past for i in range(kv["num_hidden_layers"])
                                 for t in ("key", "value")}},
        "vq_decoder.onnx": {"codes": codes},
        "vq_encoder.onnx": {"pixel_values": rng.uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)},
    }
    for name, feed in feeds.items():
        got = [ort.InferenceSession(str(root / name)).run(None, feed) for root in (TINY_BUNDLE, out)]
        for a, b in zip(*got):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_fp16_buffer_attention_keeps_masked_rows_finite():
    """A left-pad query (every key masked) with large negative scores and no empty buffer slot (capacity 0):
    fp16 finfo.min plus the score would overflow to -inf and softmax to NaN, which the next layer spreads to
    the real rows through the pad's K/V. The masks are applied in float32, so every row stays finite."""
    import torch

    from export.wrappers import DecoderStepBuffered

    d = 8
    q = torch.full((1, 2, 2, d), 4.0, dtype=torch.float16)                # (B, H, S, D), 2 heads share 1 KV head
    k = torch.full((1, 1, 2, d), -4.0, dtype=torch.float16)               # scores -45 for every pair
    v = torch.randn(1, 1, 2, d).half()
    empty = torch.zeros(1, 1, 0, d, dtype=torch.float16)
    mask = torch.tensor([[0, 1]])                                          # (B, C + S): pad, then a real token
    bias_past, bias_new = DecoderStepBuffered._biases(mask, 2)
    out = DecoderStepBuffered._attend(q, k, v, empty, empty, bias_past, bias_new, d ** -0.5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # the real token attends only to itself
    torch.testing.assert_close(out[0, 1], v[0, 0, 1].repeat(2), rtol=0, atol=0)


def test_bf16_needs_a_gpu_to_verify(checkpoints, tmp_path):
    from export.build import ExportError, ExportOptions, build_bundle

    with pytest.raises(ExportError, match="bf16 graphs cannot run on onnxruntime's CPU"):
        build_bundle(checkpoints("tiny"), tmp_path / "bf16", ExportOptions(dtype="bf16"))
    assert not (tmp_path / "bf16").exists()


def test_external_data_bundle(checkpoints, tmp_path, monkeypatch):
    """Graphs above the size threshold keep weights in a side file, listed and hashed like every other file."""
    import emu3_rt
    from export import export_onnx
    from export.build import ExportOptions, build_bundle

    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    manifest, checks = build_bundle(checkpoints("tiny"), out, ExportOptions())
    assert all(c.ok for c in checks)
    side = sorted(p.name for p in out.iterdir() if p.name.endswith(".data"))
    # the two step graphs' side files (decoder_step.onnx.data, decoder_step_visual.onnx.data) became one shared file
    assert "decoder_step.data" in side and "decoder_step.onnx.data" not in side and set(side) <= set(manifest["files"])
    # the graphs hold their structure only; the weights are in the side files
    assert (out / "decoder_step.onnx").stat().st_size < (out / "decoder_step.data").stat().st_size // 2
    assert (out / "vq_decoder.onnx").stat().st_size < (out / "vq_decoder.onnx.data").stat().st_size // 2
    model = emu3_rt.load(out, verify=True)
    assert model.generate_image("a red cat", seed=0).images[0].size == (64, 64)
