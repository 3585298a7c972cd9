"""bundle.json schema, path safety and hash checks, on the checked-in tiny bundle (no torch needed)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emu3_rt
from emu3_rt import integrity
from emu3_rt.bundle import BundleError, load_bundle
from emu3_rt.engines.base import EngineError
from emu3_rt.prompt import PromptError

from .conftest import REPO, TINY_BUNDLE, finishes, refresh_hash


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
        for key in ("decoder", "image_decoder"):   # the image step graph shares the decoder's KV layout
            m["model"][key]["kv_cache"] = "concat"
            for t in m["model"][key]["io"]["outputs"][1:]:
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
    for verify in (False, True):  # checked by default, not only with --verify
        with pytest.raises(BundleError, match="vq_decoder.onnx: sha256 does not match"):
            load_bundle(bundle_copy, verify=verify)


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


# ---- geometry: every size checked against bounds and the graphs' declared I/O, before anything is allocated ----

def _set(path, value):
    def edit(m):
        *parents, leaf = path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return edit


GEOMETRY = [
    ("model.vocab_size", 10**12, r"'model.vocab_size' must be in \[1, 2097152\], got 1000000000000"),
    ("model.vocab_size", 1068, r"decoder output 'logits' must be \(batch, 1068\)"),
    ("model.vocab_size", True, "'model.vocab_size' must be a int"),
    ("model.context_length", 0, "'model.context_length' must be in"),
    ("model.decoder.num_hidden_layers", 10**9, "'model.decoder.num_hidden_layers' must be in"),
    ("model.decoder.num_hidden_layers", 3, r"io.inputs does not match num_hidden_layers=3 .*past_key_values.2.key"),
    ("model.decoder.num_hidden_layers", 1, r"io.inputs does not match num_hidden_layers=1 .*unexpected"),
    ("model.decoder.num_key_value_heads", 4, r"'past_key_values.0.key' must be float32 \(batch, 4, length, 16\)"),
    ("model.decoder.head_size", 10**6, "'model.decoder.head_size' must be in"),
    ("model.decoder.head_size", 32, r"must be float32 \(batch, 2, length, 32\)"),
    ("model.decoder.inputs.past_key_names", "past_key_values.%d.%d", "one %d and no other %"),
    ("model.decoder.inputs.past_key_names", "past.%s", "one %d and no other %"),
    ("model.decoder.inputs.past_key_names", "past.%999999999d", "one %d and no other %"),
    ("model.decoder.inputs.past_value_names", "past_key_values.%d.key", "or a name repeated"),
    ("model.decoder.io.outputs.0.dims", ["batch_size", 2**40], r"io.outputs\[0\]' needs a name"),
    ("model.decoder.io.inputs.3.dtype", "float16", "'past_key_values.1.key' must be float16"),
    ("emu3.codebook_size", 10**10, "'emu3.codebook_size' must be in"),
    ("emu3.codebook_size", 255, r"visual_token_runs\[0\]' must be \[first, first_id, count\]"),
    ("emu3.visual_token_runs", [[0, 811, 2**40]], r"visual_token_runs\[0\]' must be"),
    ("emu3.visual_token_runs", [[0, 811, True]], r"visual_token_runs\[0\]' must be"),
    ("emu3.visual_token_runs", [[0, 811, 1]] * 100000, "must be a list of 1 to 65536 runs"),
    ("emu3.visual_token_runs", [[0, 811, 128], [129, 939, 127]], "must map each of the 256 codes once"),
    ("emu3.visual_token_runs", [[0, 811, 128], [128, 811, 128]], "maps two codes to one id"),
    ("emu3.spatial_factor", 16, r"emu3.spatial_factor != image_processor.spatial_factor"),
    ("image_processor.min_pixels", 8192, "min_pixels > max_pixels"),
    ("image_processor.max_pixels", 2**40, "'image_processor.max_pixels' must be in"),
    ("image_processor.image_std", [0.5, 0.5], "image_mean/image_std must be 3 numbers"),
    ("search.max_new_tokens", 2048, "max_new_tokens exceeds model.context_length"),
    ("search.top_k", -1, "'search.top_k' must be in"),
    ("search.top_p", 0, "search needs 0 < top_p <= 1"),
    ("search.ratio", "1:0", "search.ratio must be W:H"),
    ("search.image_area", 10**15, "'search.image_area' must be in"),
    ("search.prefill_chunk", 0, "'search.prefill_chunk' must be in"),
    ("model.decoder.logit_id_runs", [[0, 0, 10**9]], None),  # ignored: head is "full"
]


@pytest.mark.parametrize("path, value, message", GEOMETRY, ids=[f"{p}={str(v)[:20]}" for p, v, _ in GEOMETRY])
def test_geometry_is_checked_before_allocating(bundle_copy, path, value, message):
    if path == "model.decoder.logit_id_runs":
        _edit(bundle_copy, lambda m: m["model"]["decoder"].update(logit_id_runs=value))
        assert load_bundle(bundle_copy).logit_ids is None
        return
    _edit(bundle_copy, _set(path, value))
    tracemalloc.start()   # numpy reports its buffers to tracemalloc: a geometry sized before checking shows here
    try:
        with pytest.raises(BundleError, match=message) as e:
            load_bundle(bundle_copy)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20   # nothing sized by the huge value (a clock here would only measure the machine's load)
    assert "\n" not in str(e.value)


def test_visual_head_geometry(bundle_copy):
    """A visual head's logits have one column per listed id: the column count must match the graph's."""
    def visual(m):
        m["model"]["decoder"].update(head="visual", logit_id_runs=[[0, 803, 8], [8, 811, 256]])
        m["model"]["decoder"]["io"]["outputs"][0]["dims"][1] = 264
        m["model"]["sampler"]["io"]["inputs"][0]["dims"][1] = 264   # the sampler reads the same columns
    _edit(bundle_copy, visual)
    assert list(load_bundle(bundle_copy).logit_ids[:9]) == [803, 804, 805, 806, 807, 808, 809, 810, 811]
    for runs, message in [([[0, 803, 8], [9, 811, 256]], "contiguous columns"),
                          ([[0, 811, 256], [256, 803, 8]], "increasing ids"),
                          ([[0, 803, 2**40]], r"logit_id_runs\[0\]' must be")]:
        _edit(bundle_copy, lambda m, runs=runs: m["model"]["decoder"].update(logit_id_runs=runs))
        with pytest.raises(BundleError, match=message):
            load_bundle(bundle_copy)
    _edit(bundle_copy, lambda m: m["model"]["decoder"].update(logit_id_runs=[[0, 803, 8], [8, 811, 255]]))
    with pytest.raises(BundleError, match=r"'logits' must be \(batch, 263\)"):
        load_bundle(bundle_copy)


# ---- ids: consistent with each other and with the tokenizer ----

IDS = [
    (_set("emu3.tokens.pad.id", 807), "emu3.tokens.eos and emu3.tokens.pad share the id 807"),
    (_set("emu3.tokens.eol.id", 811), "emu3.tokens.eol id 811 is inside the visual token range"),
    (_set("emu3.tokens.eof.id", 1066), "emu3.tokens.eof id 1066 is inside the visual token range"),
    (_set("emu3.tokens.bos.id", True), "field 'emu3.tokens.bos' needs a text and an id"),
    (_set("emu3.tokens.boi.id", 5000), "field 'emu3.tokens.boi' needs a text and an id in"),
    (_set("emu3.tokens.boi.text", "<|image end|>"), "share the text '<|image end|>'"),
    (_set("model.eos_token_id", 5), "model.eos_token_id 5 != emu3.tokens.eos.id 807"),
]


@pytest.mark.parametrize("edit, message", IDS, ids=[m[:30] for _, m in IDS])
def test_inconsistent_ids_are_refused(bundle_copy, edit, message):
    _edit(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


TOKENIZER_IDS = [
    (_set("emu3.tokens.boi.text", "<|extra_5|>"),
     r"emu3.tokens.boi '<\|extra_5\|>' is 608 \(tokenized as \[608\]\) .* says 809"),
    (_set("emu3.tokens.boi.id", 605), r"emu3.tokens.boi '<\|image start\|>' is 809 .* bundle.json says 605"),
    (_set("emu3.visual_token_runs", [[0, 812, 255], [255, 811, 1]]),
     r"id 812 is '<\|visual token 000001\|>', but emu3.visual_token_runs maps code 0 to it"),
]


@pytest.mark.parametrize("edit, message", TOKENIZER_IDS, ids=["text", "id", "visual"])
def test_ids_must_agree_with_the_tokenizer(bundle_copy, edit, message):
    _edit(bundle_copy, edit)
    load_bundle(bundle_copy)  # consistent on its own: only the tokenizer can tell
    with pytest.raises(BundleError, match=f"tokenizer.json: {message}"):
        emu3_rt.load(bundle_copy)


def test_id_checks_are_remembered_per_manifest(bundle_copy, monkeypatch, tmp_path):
    """The tokenizer's id checks run once per bundle.json version: a second load skips them, an edited
    manifest (another sha256) is checked again."""
    from emu3_rt import tokenizer

    monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(tmp_path))
    calls = []
    real = tokenizer._check_ids
    monkeypatch.setattr(tokenizer, "_check_ids", lambda tk, b: (calls.append(b.sha256), real(tk, b)))
    emu3_rt.load(bundle_copy)
    model = emu3_rt.load(bundle_copy)
    assert len(calls) == 1
    # the special ids remembered with the verdict are the tokenizer's own
    tk, specials, _ = tokenizer.load_tokenizer(model.bundle)
    assert len(calls) == 1 and specials == tokenizer._special_set(tk) != frozenset()
    _edit(bundle_copy, _set("emu3.tokens.boi.id", 605))
    with pytest.raises(BundleError, match="bundle.json says 605"):
        emu3_rt.load(bundle_copy)
    assert len(calls) == 2


# ---- files: only regular files inside the bundle, bounded, all listed ----

def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _directory(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("name", ["bundle.json", "tokenizer.json", "chat_template.jinja", "decoder_step.onnx"])
@pytest.mark.parametrize("make", [_fifo, _directory], ids=["fifo", "directory"])
def test_only_regular_files_are_read(bundle_copy, name, make):
    make(bundle_copy / name)
    err = finishes(lambda: emu3_rt.load(bundle_copy).chat("hi", max_new_tokens=1,
                                                           sampling=emu3_rt.SamplingOptions(greedy=True)))
    assert isinstance(err, BundleError) and f"{name}: not a regular file" in str(err), err


def test_symlink_to_a_device_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(BundleError, match="symlink that leaves the bundle"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("module, limit, name", [("emu3_rt.bundle", "MAX_MANIFEST", "bundle.json"),
                                                 ("emu3_rt.tokenizer", "MAX_TOKENIZER", "tokenizer.json"),
                                                 ("emu3_rt.chat_template", "MAX_SOURCE", "chat_template.jinja")])
def test_file_size_bounds(bundle_copy, monkeypatch, module, limit, name):
    import importlib

    monkeypatch.setattr(importlib.import_module(module), limit, 500)
    with pytest.raises(BundleError, match=f"{name}: .* over the 500-byte limit"):
        model = emu3_rt.load(bundle_copy)
        model.prompts.render_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_used_files_must_be_listed(bundle_copy):
    _edit(bundle_copy, lambda m: m["files"].pop("chat_template.jinja"))
    with pytest.raises(BundleError, match="chat_template.jinja is used but not listed under 'files'"):
        load_bundle(bundle_copy)


def test_external_data_must_be_listed(bundle_copy):
    """onnxruntime opens a graph's external data by itself: the runtime reads the locations from the graph."""
    onnx = pytest.importorskip("onnx")
    graph = bundle_copy / "decoder_step.onnx"
    onnx.save(onnx.load(graph), graph, save_as_external_data=True, location="weights.bin", size_threshold=4096)
    refresh_hash(bundle_copy, "decoder_step.onnx")
    with pytest.raises(BundleError, match="weights.bin, external data of decoder_step.onnx, is not listed"):
        load_bundle(bundle_copy)
    refresh_hash(bundle_copy, "weights.bin")
    model = emu3_rt.load(bundle_copy)
    assert model.chat("hi", max_new_tokens=2, sampling=emu3_rt.SamplingOptions(greedy=True)).tokens


# ---- the graphs' static sizes, checked when their sessions open ----

def _swap(root, a, b):
    data_a, data_b = (root / a).read_bytes(), (root / b).read_bytes()
    (root / a).write_bytes(data_b)
    (root / b).write_bytes(data_a)
    refresh_hash(root, a)
    refresh_hash(root, b)


def _vq_channels_dynamic(root):
    _edit(root, lambda m: m["model"]["vq_encoder"]["io"]["inputs"][0]["dims"].__setitem__(1, "channels"))


GRAPH_MIXUPS = [
    # full- and visual-head step graphs: the same names, dtypes and ranks, only the logits width differs
    (lambda root: _swap(root, "decoder_step.onnx", "decoder_step_visual.onnx"), "greedy",
     r"decoder_step.onnx: output 'logits' is \(batch_size, 261\), bundle.json says \(batch_size, 1067\) \(axis 1\)"),
    (lambda root: _swap(root, "sampler.onnx", "sampler_visual.onnx"), "sample",
     r"sampler.onnx: input 'logits' is \(rows, 261\), bundle.json says \(rows, 1067\)"),
    # an axis bundle.json calls dynamic that the graph fixes
    (_vq_channels_dynamic, "image", r"vq_encoder.onnx: input 'pixel_values' is \(batch_size, 3, height, width\), "
                                    r"bundle.json says \(batch_size, channels, height, width\) \(axis 1\)"),
]


@pytest.mark.parametrize("mixup, run, message", GRAPH_MIXUPS, ids=["step-heads", "sampler-heads", "frozen-axis"])
def test_graph_static_dims_must_match_the_manifest(bundle_copy, mixup, run, message):
    from PIL import Image

    mixup(bundle_copy)
    model = emu3_rt.load(bundle_copy)  # bundle.json is consistent and every hash matches
    kwargs = {"greedy": dict(sampling=emu3_rt.SamplingOptions(greedy=True)), "sample": dict(seed=0),
              "image": dict(images=[Image.new("RGB", (32, 32))], sampling=emu3_rt.SamplingOptions(greedy=True))}[run]
    with pytest.raises(EngineError, match=message):
        model.chat("hi", max_new_tokens=2, **kwargs)


# ---- integrity by default: hashed once per file version, remembered per user ----

def _count_hashes(monkeypatch):
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(p.name) or real(p))
    return calls


def test_hashes_are_remembered(bundle_copy, monkeypatch, tmp_path):
    monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(tmp_path / "cache"))
    calls = _count_hashes(monkeypatch)
    load_bundle(bundle_copy)
    assert sorted(calls) == sorted(json.loads((bundle_copy / "bundle.json").read_text())["files"])
    calls.clear()
    load_bundle(bundle_copy)
    assert calls == []                       # stamps match: nothing re-read
    load_bundle(bundle_copy, verify=True)
    assert len(calls) == len(json.loads((bundle_copy / "bundle.json").read_text())["files"])  # --verify: all
    calls.clear()
    (bundle_copy / "chat_template.jinja").touch()
    load_bundle(bundle_copy)
    assert calls == ["chat_template.jinja"]  # only the file that changed


def test_same_size_edit_with_mtime_restored_is_caught(bundle_copy, monkeypatch, tmp_path):
    monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(tmp_path / "cache"))
    load_bundle(bundle_copy)
    path = bundle_copy / "vq_decoder.onnx"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves
    with pytest.raises(BundleError, match="vq_decoder.onnx: sha256 does not match"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("cache", ["garbage", "[1, 2]", '{"decoder_step.onnx": 7}', "not a dir"])
def test_corrupt_or_unusable_cache_means_rehash(bundle_copy, monkeypatch, tmp_path, cache):
    root = tmp_path / "cache"
    monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(root))
    load_bundle(bundle_copy)
    (stamp,) = (root / "stamps").iterdir()
    if cache == "not a dir":  # a cache location that cannot be written: loads still check every hash
        monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(stamp))
    else:
        stamp.write_text(cache)
    calls = _count_hashes(monkeypatch)
    load_bundle(bundle_copy)
    assert len(calls) == len(json.loads((bundle_copy / "bundle.json").read_text())["files"])


CORRUPT = {"deep-list": "[" * 100_000 + "]" * 100_000, "deep-object": '{"a":' * 50_000 + "1" + "}" * 50_000,
           "int-digits": "9" * 5000, "not-utf8": b"\xff\xfe{".decode("latin-1")}


@pytest.mark.parametrize("corrupt", CORRUPT.values(), ids=CORRUPT.keys())
@pytest.mark.parametrize("cache", ["stamps", "checked", "ort"])
def test_a_cache_file_that_does_not_parse_is_discarded(bundle_copy, monkeypatch, tmp_path, cache, corrupt):
    """Hash stamps, the tokenizer's remembered checks and the optimized-graph entries' stamps: a file the JSON
    parser refuses (nesting too deep for it included) is an empty cache, replaced by this run, never an error."""
    root = tmp_path / "cache"
    monkeypatch.setenv("EMU3_RT_CACHE_DIR", str(root))
    from PIL import Image

    # an image: the VQ encoder's session opens, and with it an optimized-graph entry
    greedy = dict(images=[Image.new("RGB", (32, 32), (9, 99, 199))], max_new_tokens=3,
                  sampling=emu3_rt.SamplingOptions(greedy=True))
    want = emu3_rt.load(bundle_copy).chat("hi", **greedy).tokens
    files = sorted((root / cache).rglob("stamp.json" if cache == "ort" else "*"))
    assert files
    for f in files:
        f.write_bytes(corrupt.encode("latin-1"))
    assert emu3_rt.load(bundle_copy).chat("hi", **greedy).tokens == want
    for f in files:
        json.loads(f.read_text())   # rewritten by the run that discarded it


# ---- files used after load (sessions open on first use): checked again then ----

def _flip_byte(path):
    """Change one byte, keeping the size and the mtime (only ctime tells)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_file(path):
    """A new file renamed over the old one (a new inode), same size."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(b"\0" * path.stat().st_size)
    os.replace(tmp, path)


def _rewrite_same(path):
    path.write_bytes(path.read_bytes())  # a new stat, the same bytes: re-hashed and accepted


LATE_CHANGES = [
    ("decoder_step.onnx", _flip_byte, "text"),
    ("decoder_step.data", _flip_byte, "text"),      # external data, opened by onnxruntime itself
    ("vq_encoder.onnx", _replace_file, "image"),
    ("chat_template.jinja", _flip_byte, "text"),    # read on first render
    ("decoder_step.onnx", _rewrite_same, "text"),
    ("vq_encoder.onnx", _rewrite_same, "image"),
]


@pytest.mark.parametrize("name, change, prompt", LATE_CHANGES,
                         ids=[f"{n}-{c.__name__.strip('_')}" for n, c, _ in LATE_CHANGES])
def test_files_changed_after_load_are_refused_when_used(bundle_copy, name, change, prompt):
    from PIL import Image

    kwargs = dict(max_new_tokens=3, sampling=emu3_rt.SamplingOptions(greedy=True),
                  images=[Image.new("RGB", (32, 32), (200, 30, 90))] if prompt == "image" else None)
    want = emu3_rt.load(bundle_copy).chat("hi", **kwargs).tokens
    model = emu3_rt.load(bundle_copy)   # every hash matches now; no session is open yet
    change(bundle_copy / name)
    if change is _rewrite_same:
        assert model.chat("hi", **kwargs).tokens == want
        return
    with pytest.raises(BundleError, match=f"{name}: changed since the bundle was loaded") as e:
        model.chat("hi", **kwargs)
    assert "\n" not in str(e.value)


# ---- tokenizer.json: panics, regexes, ids ----

def _edit_tokenizer(root, fn):
    t = json.loads((root / "tokenizer.json").read_text())
    fn(t)
    (root / "tokenizer.json").write_text(json.dumps(t))
    refresh_hash(root, "tokenizer.json")


BAD_TOKENIZERS = [
    (lambda t: t["model"]["merges"].insert(0, ["zz", "qq"]), "the tokenizers library cannot load it"),
    (lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated",
                                       "invert": False}), r"regex '\(a\+\)\+\$' is not a vetted"),
    (lambda t: t.update(normalizer={"type": "Replace", "pattern": {"Regex": "(x|xx)+y"}, "content": ""}),
     r"regex '\(x\|xx\)\+y' is not a vetted"),
    (lambda t: t["added_tokens"].append({"id": 5000, "content": "<|far|>", "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True}),
     r"has id \d+, outside model.vocab_size 1067"),
]


@pytest.mark.parametrize("edit, message", BAD_TOKENIZERS, ids=["merge", "split-regex", "replace-regex", "far-id"])
def test_bad_tokenizer_is_a_bundle_error(bundle_copy, edit, message):
    _edit_tokenizer(bundle_copy, edit)
    with pytest.raises(BundleError, match=f"tokenizer.json: {message}"):
        emu3_rt.load(bundle_copy)


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
_CHARSMAP = base64.b64encode((0).to_bytes(4, "little") + b"x" * 1000 + b"\0").decode()  # empty trie, 1000-char pool
_SPECIAL = {"id": "[S]", "ids": list(range(5000)), "tokens": ["[S]"] * 5000}
GROWING_TOKENIZERS = {
    "replace-100k": ({"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "x" * 100_000}},
                     r"its normalizer \(Replace\) can grow a text up to 100000-fold"),
    "replace-regex": ({"normalizer": {"type": "Replace", "pattern": {"Regex": _GPT2}, "content": "x" * 500}},
                      r"its normalizer \(Replace\) can grow a text up to 501-fold"),
    "sequence": ({"normalizer": {"type": "Sequence", "normalizers": [
                     {"type": "NFKC"}, {"type": "Lowercase"},
                     {"type": "Replace", "pattern": {"String": " "}, "content": "x" * 10}]}},
                 r"its normalizer \(Sequence\) can grow a text up to 540-fold"),
    "prepend": ({"normalizer": {"type": "Prepend", "prepend": "\u2581" * 1000}},
                r"its normalizer \(Prepend\) can grow a text up to 1001-fold"),
    "precompiled": ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": _CHARSMAP}},
                    r"its normalizer \(Precompiled\) can grow a text up to 1000-fold"),
    # 65-fold alone, 260-fold after the ByteLevel pre-tokenizer
    "with-pre-tokenizer": ({"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "x" * 65}},
                           r"its normalizer and pre-tokenizer together can grow a text up to 260-fold"),
    "metaspaces": ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [_METASPACE] * 9}},
                   r"its pre-tokenizer \(Sequence\) can grow a text up to 512-fold"),
    "decoder": ({"decoder": {"type": "Replace", "pattern": {"String": "\u0120"}, "content": "x" * 10_000}},
                r"its decoder \(Replace\) can grow a text up to 10000-fold"),
    "post-processor": ({"post_processor": {"type": "TemplateProcessing", "single": [
                           {"SpecialToken": {"id": "[S]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                        "special_tokens": {"[S]": _SPECIAL}}}, r"its post-processor adds 5000 ids"),
}


@pytest.mark.parametrize("edit, message", GROWING_TOKENIZERS.values(), ids=GROWING_TOKENIZERS.keys())
def test_tokenizer_components_that_grow_the_text_are_refused(bundle_copy, edit, message):
    """Vetted at load from the components' settings: nothing is tokenized, so nothing is allocated here."""
    _edit_tokenizer(bundle_copy, lambda t: t.update(edit))
    with pytest.raises(BundleError, match=f"tokenizer.json: {message}") as e:
        emu3_rt.load(bundle_copy)
    assert "\n" not in str(e.value)


_ENCODE_LONG = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # an allocation failure in Rust aborts the process
from emu3_rt.bundle import load_bundle
from emu3_rt.prompt import PromptEncoder, PromptError
prompts = PromptEncoder(load_bundle(sys.argv[1]))
assert prompts.encode_text("a few words") and prompts.encode_fragments([("a few", True), (" words", False)])
for encode in (prompts.encode_text, lambda text: prompts.encode_fragments([(text, True)])):
    try:
        encode("word " * int(sys.argv[2]))
        print("tokenized")
    except PromptError as e:
        print(e)
"""


@pytest.mark.parametrize("content, words", [(" " * 60, 8000), ("ab" * 31, 100_000)], ids=["spaces", "letters"])
def test_a_growing_tokenizer_tokenizes_only_bounded_texts(bundle_copy, content, words):
    """A growth under the limit (60- and 62-fold, times 4 for the ByteLevel pre-tokenizer) loads; a text is
    tokenized only while its length times that growth stays under MAX_NORMALIZED. In a child under RLIMIT_AS 2 GiB."""
    from emu3_rt import tokenizer

    _edit_tokenizer(bundle_copy, lambda t: t.update(normalizer={"type": "Replace", "pattern": {"String": " "},
                                                                "content": content}))
    child = subprocess.run([sys.executable, "-c", _ENCODE_LONG, str(bundle_copy), str(words)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    growth = 4 * len(content)
    limit = tokenizer.MAX_NORMALIZED // growth
    assert child.stdout.splitlines() == [f"the prompt has {5 * words} characters; this bundle's tokenizer.json can "
                                         f"grow a text {growth}-fold while tokenizing, so at most {limit} are "
                                         f"tokenized"] * 2


def test_tokenizer_panic_is_a_bundle_error(bundle_copy, monkeypatch):
    """The library's Rust panics surface as pyo3's PanicException, a BaseException the CLI would not catch."""
    import tokenizers

    real = tokenizers.Tokenizer

    def panic(text):
        spec = json.loads((TINY_BUNDLE / "tokenizer.json").read_text())
        spec["truncation"] = {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 5}
        real.from_str(json.dumps(spec)).encode("a b c")  # the library panics: stride must be below max_length

    with pytest.raises(BaseException) as raw:
        panic("")
    assert not isinstance(raw.value, Exception)  # what `except Exception` would let through

    class Exploding:
        from_buffer = staticmethod(panic)

    monkeypatch.setattr(tokenizers, "Tokenizer", Exploding)
    with pytest.raises(BundleError, match=r"tokenizer.json: the tokenizers library cannot load it \(`stride`"):
        emu3_rt.load(bundle_copy)


def test_truncation_in_tokenizer_json_is_ignored(bundle_copy):
    """Transformers never truncates from tokenizer.json; the library would panic on this setting at encode."""
    _edit_tokenizer(bundle_copy, lambda t: t.update(truncation={"direction": "Right", "max_length": 1,
                                                                 "strategy": "LongestFirst", "stride": 5}))
    model = emu3_rt.load(bundle_copy)
    assert len(model.prompts.encode_text("a b c d e")) > 1


# ---- the chat template: sandboxed and bounded ----

TEMPLATES = [
    ("{% for i in range(1000000) %}{% endfor %}", "range"),
    ("{{ 'x' * 100000000 }}", "repeated string"),
    ("{{ 2 ** 100000 }}", "integer over"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "concat"),
    ("{% set ns = namespace(s=['a']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "concat|in all"),
    ("{{ 'a'|center(100000000) }}", "center"),
    ("{{ ('x' * 1000000)|replace('x', 'yyyyyyyy') }}", "replace"),
    ("{{ ('x' * 1000000).replace('x', 'yyyyyyyy') }}", "call"),
    ("{{ '%099999999d' % 1 }}", "formatted"),
    ("{{ '{:>99999999}'.format(1) }}", "formatted"),
    ("{{ [1, 2]|tojson(indent=100000000) }}", "tojson"),
    ("{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}", "did not finish"),
    ("{% for i in range(9999) %}{{ 'x' * 4000000 }}{% endfor %}", "rendered prompt"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
]


@pytest.mark.parametrize("source, message", TEMPLATES, ids=[m for _, m in TEMPLATES])
def test_chat_template_is_bounded(bundle_copy, monkeypatch, source, message):
    from emu3_rt import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    (bundle_copy / "chat_template.jinja").write_text(source)
    refresh_hash(bundle_copy, "chat_template.jinja")
    model = emu3_rt.load(bundle_copy)
    # the message names the bound that stopped it (the clock for "did not finish"): no wall-time assertion
    with pytest.raises(PromptError, match=f"chat_template.jinja: cannot render the chat .*(?i:{message})") as e:
        model.prompts.render_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert "\n" not in str(e.value)


# Library calls that run in C or in untraced Python, past the checks between template lines: each would take
# gigabytes or minutes (expandtabs 4 GB, indent 10 GB, sum(start=[]) quadratic, lipsum a loop in Python, str()
# of a list of big strings 4 GB), so such templates render in the worker (RLIMIT_AS, RLIMIT_CPU, a wall clock).
# The vetted ones render here, bounded by the checks: many big values in all, captured output.
_DOUBLING = "{% set s0 = 'x' %}" + "".join(f"{{% set s{i} = s{i - 1} ~ s{i - 1} %}}" for i in range(1, 22))
LIBRARY_TEMPLATES = [
    ("{{ ('\t' * 1000).expandtabs(4000000) }}", "expandtabs", "needs over 512 MiB|did not finish"),
    ("{{ ('a\n' * 100000)|indent(100000) }}", "indent", "needs over 512 MiB|did not finish"),
    ("{{ ([[0]] * 100000)|sum(start=[]) }}", "sum", "did not finish|needs over"),
    ("{{ lipsum(100000000) }}", "lipsum", "did not finish|needs over"),
    ("{% set s = 'x' * 4000000 %}{{ '%s' % ([s] * 1000) }}", "Mul", "needs over 512 MiB|did not finish"),
    ("{{ [('x' * 4000000)] * 1000 }}", "Mul", "needs over 512 MiB|did not finish"),
    (_DOUBLING + "".join(f"{{% set t{j} = s21 ~ s21 %}}" for j in range(20)), None, "over 33554432 characters in all"),
    (_DOUBLING + "{% generation %}{% for i in range(10000) %}{{ s21 }}{% endfor %}{% endgeneration %}", None,
     "captured block"),
]
_RENDER_ALL = """
import json, sys, resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a template that escaped would fail this process
resource.setrlimit(resource.RLIMIT_CPU, (300, 300))
from emu3_rt import chat_template
from emu3_rt.bundle import load_bundle
from emu3_rt.prompt import PromptEncoder, PromptError
from tests.conftest import refresh_hash
from pathlib import Path
chat_template.RENDER_SECONDS = 0.5
root = Path(sys.argv[1])
for source in json.loads(sys.argv[2]):
    (root / "chat_template.jinja").write_text(source)
    refresh_hash(root, "chat_template.jinja")
    prompts = PromptEncoder(load_bundle(root))
    try:
        prompts.render_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        print(json.dumps({"rendered": True}), flush=True)
    except PromptError as e:
        print(json.dumps({"error": str(e), "worker": prompts._template.worker_reason}), flush=True)
"""


def test_chat_template_library_calls_are_bounded(bundle_copy):
    """In a child process under RLIMIT_AS 3 GiB (one escaped allocation fails it) and RLIMIT_CPU: every template
    gets its one-line PromptError, and the next one renders in a fresh worker after one was killed."""
    sources = [source for source, _, _ in LIBRARY_TEMPLATES]
    child = subprocess.run([sys.executable, "-c", _RENDER_ALL, str(bundle_copy), json.dumps(sources)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    results = [json.loads(line) for line in child.stdout.splitlines()]
    assert len(results) == len(LIBRARY_TEMPLATES)
    for (source, routed, message), got in zip(LIBRARY_TEMPLATES, results):
        assert re.search(f"chat_template.jinja: cannot render the chat .*({message})", got.get("error", "")), got
        assert "\n" not in got["error"]
        assert (got["worker"] is None) if routed is None else routed in got["worker"], (source[:60], got)


def test_emu3_template_renders_here_and_the_worker_agrees():
    """Emu3's template is vetted: rendered in this process, no worker started (start-up pays nothing). The worker
    renders it to the same string."""
    from emu3_rt import chat_template

    template = chat_template.ChatTemplate((TINY_BUNDLE / "chat_template.jinja").read_text())
    assert template.worker_reason is None
    messages = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
                {"role": "user", "content": [{"type": "text", "text": "\udcff and \ue000?"}]}]
    here = template.render(messages=messages, add_generation_prompt=True)
    assert here.startswith("be brief USER: <image>what is it? ASSISTANT: a cat USER:")
    assert chat_template._WORKER.render(template, {"messages": messages, "add_generation_prompt": True}) == here


@pytest.mark.parametrize("source, message", [("{% for %}", "line 1: "),
                                             ("{{ " + "(" * 20000 + "1" + ")" * 20000 + " }}", "nested too deeply"),
                                             ("{% if 1 %}" * 5000 + "{% endif %}" * 5000, "nested too deeply")])
def test_chat_template_syntax_error_names_the_file(bundle_copy, source, message):
    (bundle_copy / "chat_template.jinja").write_text(source)
    refresh_hash(bundle_copy, "chat_template.jinja")
    with pytest.raises(BundleError, match=f"chat_template.jinja: {message}"):
        emu3_rt.load(bundle_copy).prompts.render_chat([])
