"""Both LM heads in one bundle (`--head both`): the full-vocabulary step graph for chat, the visual-head step graph
for images, over one shared weights file.

Fast tests run on the checked-in tiny bundle (which is a `both` export): which graph each task runs, that chat
never touches the image graphs, that images give the same tokens as on the full graph, the manifest checks, and
the shared-weights writer on hand-built graphs. Export tests build fresh bundles from a tiny checkpoint: parity
with a full-head bundle and Transformers, the size bound, and the shared file's listing.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import emu3_rt
from emu3_rt import SamplingOptions
from emu3_rt.bundle import BundleError, load_bundle
from emu3_rt.engines.state import HostStepEngine
from emu3_rt.integrity import external_data
from emu3_rt.pipeline import Emu3

from .conftest import TINY_BUNDLE

GREEDY = SamplingOptions(greedy=True)
IMAGE_GRAPHS = ("decoder_step_visual.onnx", "sampler_visual.onnx")
CHAT_GRAPHS = ("decoder_step.onnx", "sampler.onnx")


BOUND = ("decoder", "image_decoder", "sampler", "image_sampler")


class Counted:
    """An engine that counts its runs by graph file name and records any other use of it."""

    def __init__(self, engine, calls: dict, touched: set):
        self.engine, self.spec, self.calls, self.touched = engine, engine.spec, calls, touched

    def run(self, feeds):
        self.calls[self.spec.path.name] = self.calls.get(self.spec.path.name, 0) + 1
        return self.engine.run(feeds)

    def __getattr__(self, name):
        if name != "new_state":   # the decode loop's state comes from the engine; its steps still go through run()
            self.touched.add(self.spec.path.name)
        return getattr(self.engine, name)


def _counted(bundle_dir=None, drop=()):
    """A model whose engines count their runs (and lack the `drop` keys); returns (model, calls, touched)."""
    loaded = emu3_rt.load(bundle_dir)
    calls, touched = {}, set()
    # step and sampler graphs: the same decode state over Counted's run() (engines.state.HostStepEngine)
    engines = {k: HostStepEngine(Counted(e, calls, touched)) if k in BOUND else Counted(e, calls, touched)
               for k, e in loaded.engines.items() if k not in drop}
    return Emu3(loaded.bundle, engines), calls, touched


def _images(model, **kw):
    return model.generate_image(["a portrait of young girl", "sunset"], ratio=["4:3", "1:2"], cfg_scale=3.0,
                                negative_prompt="ugly", **kw)


# ---- the checked-in tiny bundle (a --head both export) ----

def test_tiny_bundle_has_both_heads():
    b = load_bundle(TINY_BUNDLE, verify=True)
    assert b.logit_ids is None and b.decoder.path.name == "decoder_step.onnx"
    assert (b.image_decoder.path.name, b.image_sampler.path.name) == ("decoder_step_visual.onnx",
                                                                     "sampler_visual.onnx")
    # the visual head: every visual id plus EOL, EOF, EOI, EOS, PAD, sorted
    t = b.tokens
    assert list(b.image_logit_ids) == sorted({*b.visual_ids.tolist(), t.eol, t.eof, t.eoi, t.eos, t.pad})
    assert b.image_decoder.output("logits").dims == ("batch_size", len(b.image_logit_ids))
    assert b.image_decoder.inputs == b.decoder.inputs


def test_image_runs_the_visual_graph_and_chat_the_full_one():
    model, calls, touched = _counted()
    _images(model, sampling=GREEDY)
    image_calls = dict(calls)
    assert all(image_calls.get(g, 0) > 0 for g in IMAGE_GRAPHS), image_calls
    assert not any(g in image_calls for g in CHAT_GRAPHS), image_calls
    model.chat("hello there", sampling=GREEDY, max_new_tokens=4)
    assert all(calls.get(g, 0) > 0 for g in CHAT_GRAPHS), calls
    assert all(calls[g] == image_calls[g] for g in IMAGE_GRAPHS)   # chat added no image-graph run
    assert not touched & set(CHAT_GRAPHS + IMAGE_GRAPHS)          # only run() was ever used


def test_chat_never_uses_the_image_graphs():
    model, calls, touched = _counted()
    model.chat("hello there", sampling=GREEDY, max_new_tokens=4)
    # no run, and no other use (a session is created on first use)
    assert not set(calls) & set(IMAGE_GRAPHS) and not touched & set(IMAGE_GRAPHS)


@pytest.mark.parametrize("sampling", [GREEDY, None], ids=["greedy", "bundle-sampling"])
def test_visual_graph_gives_the_full_graphs_image_tokens(sampling):
    """Images on the visual head vs the same bundle with its image graphs taken away (the full graph decodes)."""
    visual, calls_v, _ = _counted()
    full, calls_f, _ = _counted(drop=("image_decoder", "image_sampler"))
    a, b = _images(visual, sampling=sampling, seed=5), _images(full, sampling=sampling, seed=5)
    assert a.tokens == b.tokens and a.grids == b.grids
    assert "decoder_step_visual.onnx" in calls_v and "decoder_step_visual.onnx" not in calls_f
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_numpy_chain_on_the_visual_graph():
    """sampler='numpy': the image route has no sampler graph; columns map back through image_logit_ids."""
    a = emu3_rt.load(sampler="numpy")
    assert "image_sampler" not in a.engines and a.route("image").sampler is None
    b = emu3_rt.load()
    assert _images(a, sampling=GREEDY).tokens == _images(b, sampling=GREEDY).tokens


# ---- bundle.json checks on the image blocks ----

def _edit(root, fn):
    m = json.loads((root / "bundle.json").read_text())
    fn(m)
    (root / "bundle.json").write_text(json.dumps(m))


def _logits_width(block, width):
    block["io"]["outputs"][0]["dims"][1] = width


BAD_IMAGE_BLOCKS = [
    (lambda m: m["model"]["image_decoder"].update(kv_cache="concat"), r"'model.image_decoder.kv_cache' must equal"),
    (lambda m: m["model"]["image_decoder"].update(num_hidden_layers=3), "num_hidden_layers' must equal"),
    (lambda m: m["model"]["image_decoder"]["inputs"].update(input_ids="ids"), r"image_decoder.inputs' must equal"),
    (lambda m: m["model"]["image_decoder"]["io"]["inputs"][3].update(name="past.0.key"),
     "image_decoder.io must equal model.decoder.io"),
    (lambda m: m["model"]["image_decoder"]["io"]["outputs"][1]["dims"].__setitem__(1, 3),
     "image_decoder.io must equal model.decoder.io"),
    (lambda m: _logits_width(m["model"]["image_decoder"], 260),
     r"image_decoder output 'logits' must be \(batch, 261\)"),
    (lambda m: m["model"]["image_decoder"].update(head="full"), r"'model.image_decoder.head' must be 'visual'"),
    (lambda m: m["model"]["image_decoder"].update(logit_id_runs=[[0, 600, 1], [2, 803, 4]]), "contiguous columns"),
    (lambda m: m["model"]["image_decoder"].pop("filename"), "missing field 'model.image_decoder.filename'"),
    (lambda m: m["model"]["image_decoder"].update(filename="../x.onnx"), "must be a plain file name"),
    (lambda m: m["model"].pop("image_sampler"), "needs a model.image_sampler"),
    (lambda m: m["model"].pop("image_decoder"), "model.image_sampler needs a model.image_decoder"),
    (lambda m: m["model"]["image_sampler"]["io"]["inputs"][0]["dims"].__setitem__(1, 1067),
     r"model.image_sampler reads float32 logits of width \(1067,\), the step graph writes float32 of width \(261,\)"),
    (lambda m: m["model"]["image_sampler"]["io"]["outputs"].pop(), "model.image_sampler.io must have"),
    (lambda m: m["files"].pop("decoder_step_visual.onnx"), "decoder_step_visual.onnx is used but not listed"),
    (lambda m: m["files"].pop("decoder_step.data"), "decoder_step.data, external data of decoder_step.onnx"),
]


@pytest.mark.parametrize("edit,message", BAD_IMAGE_BLOCKS)
def test_image_blocks_are_checked(bundle_copy, edit, message):
    _edit(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_shared_weights_are_hashed(bundle_copy):
    data = bundle_copy / "decoder_step.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"decoder_step.data: sha256 does not match"):
        load_bundle(bundle_copy, verify=True)


def test_bundle_without_image_blocks_decodes_images_on_the_decoder(bundle_copy):
    """A bundle exported with --head full (no image blocks): images run the full graph, as before."""
    def full_only(m):
        del m["model"]["image_decoder"], m["model"]["image_sampler"]
    _edit(bundle_copy, full_only)
    model, calls, _ = _counted(bundle_copy)
    assert model.route("image") == model.route("chat")
    _images(model, sampling=GREEDY)
    assert calls["decoder_step.onnx"] > 0 and not set(calls) & set(IMAGE_GRAPHS)


def test_build_trt_refuses_a_graph_the_bundle_lacks(bundle_copy, capsys):
    from export.build_trt import main

    def full_only(m):
        del m["model"]["image_decoder"], m["model"]["image_sampler"]
    _edit(bundle_copy, full_only)
    assert main(["--bundle", str(bundle_copy), "--graphs", "decoder_step_visual"]) == 2
    assert "has no decoder_step_visual graph (model.image_decoder" in capsys.readouterr().err


# ---- the shared-weights writer, on hand-built graphs (onnx only) ----

def _graph(path, weights: dict, out_width: int):
    """x (1, 8) -> MatMul with each weight in turn (8, 8) ... then (8, out_width); weights: name -> array."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    names, nodes, x = list(weights), [], "x"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("MatMul", [x, name], [f"h{i}"]))
        x = f"h{i}"
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_width])],
                          [numpy_helper.from_array(w, n) for n, w in weights.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _share_two(root):
    from export.shared_weights import share_weights

    rng = np.random.default_rng(0)
    body = [rng.standard_normal((8, 8), dtype=np.float32) * 0.3 for _ in range(2)]
    big = rng.standard_normal((8, 40), dtype=np.float32)                              # 1280 bytes: external
    full = {"a": body[0], "b": body[1], "head": big, "tiny": np.eye(40, 2, dtype=np.float32)[:40, :2]}
    # the other export names the same tensors differently, and its head keeps only some rows' columns
    visual = {"w0": body[0].copy(), "w1": body[1].copy(), "head_v": np.ascontiguousarray(big[:, :36]),
              "tiny2": np.eye(36, 2, dtype=np.float32)}
    root.mkdir()
    _graph(root / "full.onnx", full, 2)
    _graph(root / "visual.onnx", visual, 2)
    return share_weights([root / "full.onnx", root / "visual.onnx"], "w.data"), full, visual


def _assert_chains(ort, root, full, visual, x):
    """Each written graph computes x times its weight matrices in order."""
    for name, weights in (("full", full), ("visual", visual)):
        y = x
        for w in weights.values():
            y = y @ w
        got = ort.InferenceSession(str(root / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(got.run(None, {"x": x})[0], y, rtol=1e-5, atol=1e-6)


def test_share_weights_stores_common_tensors_once(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from export.shared_weights import ALIGN_SMALL, MIN_EXTERNAL

    x = np.random.default_rng(1).standard_normal((1, 8), dtype=np.float32)
    shared, full, visual = _share_two(tmp_path / "a")
    _assert_chains(ort, tmp_path / "a", full, visual, x)
    # body a/b only 256 bytes each: inline in both graphs; the heads (1280 and 1152 bytes) stored once each
    big = [w for w in [*full.values(), *visual.values()] if w.nbytes >= MIN_EXTERNAL]
    assert shared.stored == {"full.onnx": 1, "visual.onnx": 1} and shared.reused == {"full.onnx": 0,
                                                                                     "visual.onnx": 0}
    assert shared.size == -(-big[0].nbytes // ALIGN_SMALL) * ALIGN_SMALL + big[1].nbytes
    offsets = [int({e.key: e.value for e in t.external_data}["offset"])
               for g in ("full", "visual") for t in onnx.load(str(tmp_path / "a" / f"{g}.onnx"),
                                                              load_external_data=False).graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert offsets == [0, 1280 + (-1280 % ALIGN_SMALL)]
    # deterministic: the same graphs give the same bytes
    _share_two(tmp_path / "b")
    for name in ("full.onnx", "visual.onnx", "w.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_share_weights_dedupes_by_content_across_names(tmp_path, monkeypatch):
    """With every tensor external, the body weights (named a/b and w0/w1) are stored once."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")   # export.shared_weights rewrites the graphs with onnx (the export extra)
    import export.shared_weights as sw

    monkeypatch.setattr(sw, "MIN_EXTERNAL", 1)
    shared, full, visual = _share_two(tmp_path / "a")
    assert shared.stored == {"full.onnx": 4, "visual.onnx": 2} and shared.reused == {"full.onnx": 0,
                                                                                     "visual.onnx": 2}
    assert external_data(tmp_path / "a" / "full.onnx") == external_data(tmp_path / "a" / "visual.onnx") == {"w.data"}
    x = np.ones((1, 8), np.float32)
    _assert_chains(ort, tmp_path / "a", full, visual, x)


# ---- fresh exports (torch + transformers) ----

@pytest.mark.export
def test_both_bundle_image_tokens_equal_full_bundle_and_transformers(bundles, checkpoints):
    from . import hf_reference as hf

    both, manifest, checks = bundles("tiny", head="both")
    full, _, _ = bundles("tiny", head="full")
    assert all(c.ok for c in checks) and {"decoder_step", "decoder_step_visual"} <= {c.graph for c in checks}
    prompts, ratios = ["a portrait of young girl", "sunset"], ["4:3", "1:2"]
    got = [emu3_rt.load(b).generate_image(prompts, ratio=ratios, cfg_scale=3.0, negative_prompt="ugly",
                                          sampling=GREEDY) for b in (both, full)]
    _, tokens, grids, _ = hf.text_to_image(str(checkpoints("tiny")), prompts, ratios, 4096, 3.0, "ugly")
    assert got[0].tokens == got[1].tokens == tokens and got[0].grids == grids


@pytest.mark.export
def test_both_bundle_chat_equals_full_bundle(bundles):
    both, _, _ = bundles("tiny", head="both")
    full, _, _ = bundles("tiny", head="full")
    rng = np.random.default_rng(0)
    from PIL import Image

    picture = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    answers = [emu3_rt.load(b).chat(["Describe it.", "hello world"], images=[[picture], None], sampling=GREEDY,
                                    max_new_tokens=12) for b in (both, full)]
    assert answers[0].tokens == answers[1].tokens and answers[0].prompt_ids == answers[1].prompt_ids


@pytest.mark.export
def test_both_bundle_grows_by_the_visual_rows_only(bundles):
    """size(both) - size(full) <= visual lm_head rows + the visual sampler + the visual graph's own proto (its
    nodes, no weights: every tensor of 1 KiB or more lives in the shared file) + alignment padding."""
    onnx = pytest.importorskip("onnx")
    from export.shared_weights import ALIGN_SMALL, MIN_EXTERNAL

    both, manifest, _ = bundles("tiny", head="both")
    full, full_manifest, _ = bundles("tiny", head="full")
    size = lambda m: sum(f["size"] for f in m["files"].values())  # noqa: E731
    growth = size(manifest) - size(full_manifest)
    dec = manifest["model"]["decoder"]
    rows = sum(n for _, _, n in manifest["model"]["image_decoder"]["logit_id_runs"])
    row_bytes = rows * dec["hidden_size"] * np.dtype(dec["dtype"]).itemsize
    visual = onnx.load(str(both / "decoder_step_visual.onnx"), load_external_data=False)
    inline = [t for t in visual.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < MIN_EXTERNAL for t in inline)
    padding = ALIGN_SMALL * len(visual.graph.initializer)
    proto = (both / "decoder_step_visual.onnx").stat().st_size
    # the visual graph's proto is the full graph's structure (module names per node), not weights
    assert proto <= (both / "decoder_step.onnx").stat().st_size + 1024
    bound = row_bytes + manifest["files"]["sampler_visual.onnx"]["size"] + proto + padding
    assert row_bytes < growth <= bound, (growth, bound, row_bytes)


@pytest.mark.export
def test_shared_weights_file_is_referenced_by_both_graphs_and_listed(bundles):
    both, manifest, _ = bundles("tiny", head="both")
    assert external_data(both / "decoder_step.onnx") == external_data(both / "decoder_step_visual.onnx") == \
        {"decoder_step.data"}
    entry = manifest["files"]["decoder_step.data"]
    data = (both / "decoder_step.data").read_bytes()
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest["model"]["image_sampler"]["filename"] == "sampler_visual.onnx"
    assert sorted(manifest["files"]) == sorted(p.name for p in both.iterdir() if p.name != "bundle.json")
    load_bundle(both, verify=True)
