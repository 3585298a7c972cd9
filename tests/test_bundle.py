"""bundle.json schema, path safety and hash checks, on the checked-in tiny bundle (no torch needed)."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu3_rt.bundle import BundleError, load_bundle

from .conftest import TINY_BUNDLE


def _edit(root, fn):
    m = json.loads((root / "bundle.json").read_text())
    fn(m)
    (root / "bundle.json").write_text(json.dumps(m))


def test_checked_in_bundle_hashes_match():
    b = load_bundle(TINY_BUNDLE, verify=True)
    assert b.manifest["schema_version"] == 2
    assert b.decoder.path.name == "decoder_step.onnx" and b.num_layers == 2
    assert b.tokens.eol == b.manifest["emu3"]["tokens"]["eol"]["id"]
    assert len(b.visual_ids) == b.manifest["emu3"]["codebook_size"]


def test_checked_in_bundle_geometry_matches_graph_io():
    b = load_bundle(TINY_BUNDLE)
    dec = b.manifest["model"]["decoder"]
    names = [t.name for t in b.decoder.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(names) == 3 + 2 * dec["num_hidden_layers"]
    past = b.decoder.input("past_key_values.0.key")
    assert past.dims == ("batch_size", dec["num_key_value_heads"], "past_sequence_length", dec["head_size"])
    assert b.decoder.outputs[0].dims == ("batch_size", b.vocab_size)


def test_unknown_schema_version(bundle_copy):
    _edit(bundle_copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="unsupported schema_version 99"):
        load_bundle(bundle_copy)


def test_schema_1_bundle_must_be_concat(bundle_copy):
    """Version 1 predates the buffer layout: an older runtime would misread its presents, so a buffer graph is
    version 2 only. A version-1 concat bundle still loads."""
    _edit(bundle_copy, lambda m: m.update(schema_version=1))
    with pytest.raises(BundleError, match="schema_version 1 has only the concat KV layout"):
        load_bundle(bundle_copy)

    def as_concat(m):
        m["model"]["decoder"]["kv_cache"] = "concat"
        for t in m["model"]["decoder"]["io"]["outputs"][1:]:
            t["dims"][2] = "total_sequence_length"

    _edit(bundle_copy, as_concat)
    assert load_bundle(bundle_copy).kv_cache == "concat"


def test_kv_layout_must_match_the_graph(bundle_copy):
    _edit(bundle_copy, lambda m: m["model"]["decoder"].update(kv_cache="concat"))
    with pytest.raises(BundleError, match="kv_cache is 'concat' but the graph's present K/V length is "
                                          r"\('sequence_length',\)"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("path", ["model.decoder.filename", "model.decoder.outputs.present_key_names", "emu3.tokens",
                                  "search.top_k", "files"])
def test_missing_field_is_named(bundle_copy, path):
    def drop(m):
        *parents, leaf = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        del node[leaf]

    _edit(bundle_copy, drop)
    with pytest.raises(BundleError, match=f"missing field '{path}'"):
        load_bundle(bundle_copy)


def test_wrong_type_is_named(bundle_copy):
    _edit(bundle_copy, lambda m: m["model"].update(vocab_size="many"))
    with pytest.raises(BundleError, match="'model.vocab_size' must be a int"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["/etc/passwd", "../decoder_step.onnx", "sub/../../x.onnx", "a\\b.onnx", ""])
def test_file_names_must_stay_inside(bundle_copy, name):
    _edit(bundle_copy, lambda m: m["model"]["decoder"].update(filename=name))
    with pytest.raises(BundleError, match="plain file name inside the bundle"):
        load_bundle(bundle_copy)


def test_symlink_escaping_the_bundle_is_rejected(bundle_copy, tmp_path):
    outside = tmp_path / "evil.onnx"
    shutil.copyfile(bundle_copy / "decoder_step.onnx", outside)
    (bundle_copy / "decoder_step.onnx").unlink()
    (bundle_copy / "decoder_step.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="symlink that leaves the bundle"):
        load_bundle(bundle_copy)


def test_tampered_file_fails_hash_check(bundle_copy):
    path = bundle_copy / "vq_decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    load_bundle(bundle_copy)  # cheap load does not hash
    with pytest.raises(BundleError, match="vq_decoder.onnx: sha256 does not match"):
        load_bundle(bundle_copy, verify=True)


def test_truncated_file_fails_size_check(bundle_copy):
    path = bundle_copy / "decoder_step.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"decoder_step.onnx: size 1000 != \d+ in bundle.json \(truncated\?\)"):
        load_bundle(bundle_copy, verify=True)


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["model", "model.decoder", "model.decoder.io", "emu3", "emu3.tokens",
                             "emu3.visual_token_runs", "search", "files", "image_processor", "tokenizer", ""]),
       value=_json)
def test_fuzzed_manifest_only_raises_bundle_error(bundle_copy, path, value):
    """Replacing any block of bundle.json with junk gives a BundleError or a valid bundle, never a crash."""
    original = (TINY_BUNDLE / "bundle.json").read_text()
    m = json.loads(original)
    if path:
        *parents, leaf = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        node[leaf] = value
    else:
        m = value
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    try:
        load_bundle(bundle_copy)
    except BundleError as e:
        assert "\n" not in str(e)
