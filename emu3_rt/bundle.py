"""bundle.json -> a validated, frozen `Bundle`: the first stage of the runtime.

Every later stage reads ids, shapes and file paths from here and nowhere else. Every size is checked against
the graphs' declared I/O and sane bounds before anything is allocated; ids are checked against each other;
every file the runtime opens must be listed, and listed files are checked against their sha256 (integrity.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import integrity
from .integrity import MAX_NAME, BundleError, inside, sha256_file

# 2: the step graph may use the "buffer" KV layout (present = the new rows only). A runtime that reads only 1
# would feed such a graph as if present were the whole cache, so the version changed with it.
SCHEMA_VERSIONS = (1, 2)
MANIFEST = "bundle.json"
MAX_MANIFEST = 16 << 20
__all__ = ["BundleError", "Bundle", "GraphSpec", "TensorSpec", "Tokens", "load_bundle", "sha256_file",
           "verify_files"]

# ---- schema ----

# (dotted path, expected type): the fields the runtime reads. Types are checked, extra fields are allowed.
_INT, _NUM, _STR, _LIST, _DICT, _BOOL = int, (int, float), str, list, dict, bool
SCHEMA: tuple[tuple[str, Any], ...] = (
    ("schema_version", _INT),
    ("model.type", _STR), ("model.vocab_size", _INT), ("model.context_length", _INT),
    ("model.bos_token_id", _INT), ("model.eos_token_id", _INT), ("model.pad_token_id", _INT),
    ("model.decoder.filename", _STR), ("model.decoder.dtype", _STR), ("model.decoder.variant", _STR),
    ("model.decoder.num_hidden_layers", _INT), ("model.decoder.num_key_value_heads", _INT),
    ("model.decoder.head_size", _INT), ("model.decoder.io", _DICT), ("model.decoder.kv_cache", _STR),
    ("model.decoder.inputs.input_ids", _STR), ("model.decoder.inputs.attention_mask", _STR),
    ("model.decoder.inputs.position_ids", _STR), ("model.decoder.inputs.past_key_names", _STR),
    ("model.decoder.inputs.past_value_names", _STR), ("model.decoder.outputs.present_key_names", _STR),
    ("model.decoder.outputs.present_value_names", _STR),
    ("model.vq_encoder.filename", _STR), ("model.vq_encoder.io", _DICT),
    ("model.vq_decoder.filename", _STR), ("model.vq_decoder.io", _DICT),
    ("emu3.tokens", _DICT), ("emu3.codebook_size", _INT), ("emu3.visual_token_runs", _LIST),
    ("emu3.spatial_factor", _INT),
    ("image_processor.image_mean", _LIST), ("image_processor.image_std", _LIST),
    ("image_processor.rescale_factor", _NUM), ("image_processor.min_pixels", _INT),
    ("image_processor.max_pixels", _INT), ("image_processor.spatial_factor", _INT),
    ("tokenizer.filename", _STR), ("tokenizer.chat_template", _STR),
    ("search.top_k", _INT), ("search.top_p", _NUM), ("search.temperature", _NUM), ("search.cfg_scale", _NUM),
    ("search.negative_prompt", _STR), ("search.ratio", _STR), ("search.image_area", _INT),
    ("search.max_new_tokens", _INT), ("search.prefill_chunk", _INT),
    ("files", _DICT),
)
KV_CACHES = ("buffer", "concat")
TOKEN_ROLES = ("bos", "eos", "pad", "image", "boi", "eoi", "image_wrapper", "eol", "eof")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")

# Bounds on the sizes the runtime allocates by, far above any Emu3 (vocab 184,622; 32 layers of 8 KV heads x 128;
# codebook 32,768; context 131,072; 720x720 images): past them a manifest is broken, and is refused before a
# numpy table or KV buffer is sized by it. (field, lowest, highest)
MAX_VOCAB, MAX_CONTEXT, MAX_PIXELS = 1 << 21, 1 << 21, 1 << 28
RANGES = (
    ("model.vocab_size", 1, MAX_VOCAB), ("model.context_length", 1, MAX_CONTEXT),
    ("model.decoder.num_hidden_layers", 1, 1024), ("model.decoder.num_key_value_heads", 1, 1024),
    ("model.decoder.head_size", 1, 4096), ("emu3.codebook_size", 1, 1 << 20), ("emu3.spatial_factor", 1, 64),
    ("image_processor.spatial_factor", 1, 64), ("image_processor.min_pixels", 1, MAX_PIXELS),
    ("image_processor.max_pixels", 1, MAX_PIXELS), ("search.top_k", 1, MAX_VOCAB),
    ("search.image_area", 1, MAX_PIXELS), ("search.max_new_tokens", 1, MAX_CONTEXT),
    ("search.prefill_chunk", 1, MAX_CONTEXT),
)
MAX_TENSORS = 4096
# a per-layer tensor name: exactly one %d, no other % (so `pattern % i` can neither fail nor grow)
_LAYER_PATTERN = re.compile(r"[^%]*%d[^%]*")
_RATIO = re.compile(r"[1-9][0-9]{0,4}:[1-9][0-9]{0,4}")


def _get(manifest: dict, path: str) -> Any:
    node: Any = manifest
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BundleError(f"bundle.json: missing field {path!r}")
        node = node[part]
    return node


def _typed(manifest: dict, path: str, kind) -> Any:
    value = _get(manifest, path)
    bad_bool = isinstance(value, bool) and kind is not _BOOL
    if bad_bool or not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
        name = kind.__name__ if isinstance(kind, type) else "number"
        raise BundleError(f"bundle.json: field {path!r} must be a {name}, got {value!r:.60}")
    return value


# ---- parts ----

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple[int | str, ...]  # ints are static, strings symbolic


@dataclass(frozen=True)
class GraphSpec:
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # the graph file and its external data as load_bundle checked them: checked again when a session opens
    files: tuple[integrity.FileCheck, ...] = ()

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class Tokens:
    bos: int
    eos: int
    pad: int
    image: int
    boi: int
    eoi: int
    image_wrapper: int
    eol: int
    eof: int
    text: dict[str, str]  # role -> special string, e.g. "boi" -> "<|image start|>"


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict
    decoder: GraphSpec
    vq_encoder: GraphSpec
    vq_decoder: GraphSpec
    tokens: Tokens
    visual_ids: np.ndarray      # (codebook,) int64: code -> token id
    logit_ids: np.ndarray | None  # (V_head,) int64: logits column -> token id, for a visual-only head; None = full
    tokenizer_path: Path
    chat_template_path: Path
    manifest_sha256: str = ""
    # the sampling chain as a graph (export/sampler_graph.py): (R, V) logits + per-row inputs -> (B,) ids
    sampler: GraphSpec | None = None
    # `--head both` bundles: the step graph for images (the decoder's I/O, logits over the visual + control ids
    # only, same weights file), its (V_image,) column -> token id table and its sampler graph; None otherwise
    image_decoder: GraphSpec | None = None
    image_logit_ids: np.ndarray | None = None
    image_sampler: GraphSpec | None = None

    @property
    def num_layers(self) -> int:
        return self.manifest["model"]["decoder"]["num_hidden_layers"]

    @property
    def kv_cache(self) -> str:
        """KV layout of the step graph: "buffer" (reads a preallocated buffer, returns new rows) or "concat"."""
        return self.manifest["model"]["decoder"]["kv_cache"]

    @property
    def context_length(self) -> int:
        return self.manifest["model"]["context_length"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["model"]["vocab_size"]

    @property
    def search(self) -> dict:
        return self.manifest["search"]

    @property
    def spatial_factor(self) -> int:
        return self.manifest["emu3"]["spatial_factor"]

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the hash of its manifest as loaded (which holds every file's hash)."""
        return self.manifest_sha256


def _graph(manifest: dict, root: Path, key: str) -> GraphSpec:
    # optional graphs (sampler, image_decoder, image_sampler) are not in SCHEMA: every graph block is typed here
    for field, kind in (("", _DICT), (".filename", _STR), (".io", _DICT)):
        _typed(manifest, f"model.{key}{field}", kind)
    block = manifest["model"][key]
    io = block["io"]
    specs = {}
    for side in ("inputs", "outputs"):
        tensors = io.get(side)
        if not isinstance(tensors, list) or not 0 < len(tensors) <= MAX_TENSORS:
            raise BundleError(f"bundle.json: field 'model.{key}.io.{side}' must be a non-empty list "
                              f"of at most {MAX_TENSORS} tensors")
        parsed = []
        for i, t in enumerate(tensors):
            where = f"model.{key}.io.{side}[{i}]"
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and 0 < len(t["name"]) <= MAX_NAME
                    and t.get("dtype") in DTYPES and isinstance(t.get("dims"), list) and len(t["dims"]) <= 8
                    and all((isinstance(d, str) and len(d) <= MAX_NAME) or (type(d) is int and 0 <= d < 1 << 31)
                            for d in t["dims"])):
                raise BundleError(f"bundle.json: field {where!r} needs a name, a dtype in {DTYPES} and dims")
            parsed.append(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])))
        if len({t.name for t in parsed}) != len(parsed):
            raise BundleError(f"bundle.json: field 'model.{key}.io.{side}' names a tensor twice")
        specs[side] = tuple(parsed)
    return GraphSpec(inside(root, block["filename"], f"model.{key}.filename"), specs["inputs"], specs["outputs"])


# ---- geometry: sizes against bounds and the graphs' declared I/O, before anything is sized by them ----

def _check_numbers(manifest: dict) -> None:
    for field, lo, hi in RANGES:
        value = _get(manifest, field)
        if not lo <= value <= hi:
            raise BundleError(f"bundle.json: field {field!r} must be in [{lo}, {hi}], got {value}")
    m, e, ip, s = manifest["model"], manifest["emu3"], manifest["image_processor"], manifest["search"]
    checks = (
        (e["codebook_size"] <= m["vocab_size"], "emu3.codebook_size must not exceed model.vocab_size"),
        (e["spatial_factor"] == ip["spatial_factor"], "emu3.spatial_factor != image_processor.spatial_factor"),
        (ip["min_pixels"] <= ip["max_pixels"], "image_processor.min_pixels > max_pixels"),
        (s["max_new_tokens"] <= m["context_length"], "search.max_new_tokens exceeds model.context_length"),
        (0 < s["top_p"] <= 1 and s["temperature"] > 0 and s["cfg_scale"] >= 0,
         "search needs 0 < top_p <= 1, temperature > 0 and cfg_scale >= 0"),
        (_RATIO.fullmatch(s["ratio"]) is not None, f"search.ratio must be W:H, got {s['ratio']!r:.40}"),
        (len(s["negative_prompt"]) <= 1 << 16, "search.negative_prompt is over 65536 characters"),
        (isinstance(s.get("do_sample", True), bool), "search.do_sample must be true or false"),
        (all(len(ip[k]) == 3 and all(type(x) in (int, float) and math.isfinite(x) for x in ip[k])
             for k in ("image_mean", "image_std")), "image_processor.image_mean/image_std must be 3 numbers"),
    )
    for ok, message in checks:
        if not ok:
            raise BundleError(f"bundle.json: {message}")


def _check_decoder_io(manifest: dict, graph: GraphSpec, logit_columns: int, key: str = "decoder") -> None:
    """The step graph's declared I/O must be exactly what the runtime feeds and reads: ids, mask and positions
    (R, S) plus one past K/V pair per layer in; logits (R, columns) plus one present pair per layer out; every
    K/V (R, kv_heads, T, head_size), T of the presents = S (buffer layout) or the mask's length (concat).
    Geometry and names are model.decoder's; `key` names the graph's block (an image_decoder shares them)."""
    dec = manifest["model"]["decoder"]
    layers, heads, head_size = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    if dec["outputs"].get("logits", "logits") != "logits":
        raise BundleError("bundle.json: field 'model.decoder.outputs.logits' must be 'logits'")
    kv = {}
    for side, kind in (("inputs", "past"), ("outputs", "present")):
        kv[side] = []
        for part in ("key", "value"):
            pattern = dec[side][f"{kind}_{part}_names"]
            if len(pattern) > MAX_NAME or not _LAYER_PATTERN.fullmatch(pattern):
                raise BundleError(f"bundle.json: field 'model.decoder.{side}.{kind}_{part}_names' must hold "
                                  f"one %d and no other %, got {pattern!r:.60}")
            kv[side] += [pattern % i for i in range(layers)]
    fixed = [dec["inputs"][k] for k in ("input_ids", "attention_mask", "position_ids")]
    declared = {"inputs": {t.name: t for t in graph.inputs}, "outputs": {t.name: t for t in graph.outputs}}
    for side, want in (("inputs", fixed + kv["inputs"]), ("outputs", ["logits"] + kv["outputs"])):
        have = declared[side]
        if len(set(want)) != len(want) or set(want) != set(have):
            missing, extra = sorted(set(want) - set(have))[:2], sorted(set(have) - set(want))[:2]
            raise BundleError(f"bundle.json: model.{key}.io.{side} does not match num_hidden_layers={layers} "
                              f"and the tensor names (missing {missing}, unexpected {extra}, or a name repeated)")
    ids, mask, _ = (declared["inputs"][n] for n in fixed)
    if any(len(t.dims) != 2 for t in (ids, mask, declared["inputs"][fixed[2]])):
        raise BundleError(f"bundle.json: model.{key} input_ids, attention_mask and position_ids must be rank 2")
    new_len = ids.dims[1] if dec["kv_cache"] == "buffer" else mask.dims[1]
    kv_dtype = declared["inputs"][kv["inputs"][0]].dtype
    for side in ("inputs", "outputs"):
        for t in (declared[side][n] for n in kv[side]):
            d = t.dims
            if t.dtype != kv_dtype or len(d) != 4 or any(isinstance(x, int) and x != want
                                                         for x, want in ((d[1], heads), (d[3], head_size))):
                raise BundleError(f"bundle.json: K/V tensor {t.name!r} must be {kv_dtype} (batch, {heads}, length, "
                                  f"{head_size}) as num_key_value_heads and head_size say, got {t.dtype} {list(d)}")
            if side == "outputs" and d[2] != new_len:
                raise BundleError(f"bundle.json: model.decoder.kv_cache is {dec['kv_cache']!r} but the graph's "
                                  f"present K/V length is {d[2:3]}, not {(new_len,)}")
    logits = declared["outputs"]["logits"].dims
    if len(logits) != 2 or logits[1] != logit_columns:
        raise BundleError(f"bundle.json: {key} output 'logits' must be (batch, {logit_columns}) for this "
                          f"vocab_size and head, got {list(logits)}")


# what an image step graph shares with the decoder: one KVCache (named and shaped by model.decoder) feeds both
_SAME_AS_DECODER = ("dtype", "variant", "num_hidden_layers", "num_key_value_heads", "head_size", "kv_cache",
                    "inputs", "outputs")


def _check_image_decoder(manifest: dict, decoder: GraphSpec, image: GraphSpec, logit_columns: int) -> None:
    """model.image_decoder is the decoder's step with a visual head: the same geometry, KV layout, tensor names and
    declared I/O but for the logits width, checked like the decoder's."""
    dec, img = manifest["model"]["decoder"], manifest["model"]["image_decoder"]
    for field in _SAME_AS_DECODER:
        if img.get(field) != dec[field]:
            raise BundleError(f"bundle.json: field 'model.image_decoder.{field}' must equal model.decoder.{field}")
    kv = lambda tensors: [t for t in tensors if t.name != "logits"]  # noqa: E731
    if image.inputs != decoder.inputs or kv(image.outputs) != kv(decoder.outputs):
        raise BundleError("bundle.json: model.image_decoder.io must equal model.decoder.io but for the logits width")
    _check_decoder_io(manifest, image, logit_columns, "image_decoder")


def _check_vq_io(graph: GraphSpec, key: str, source: tuple[str, int], result: tuple[str, int]) -> None:
    """VQ graphs take and give one tensor each: pixels (N, 3, H, W) <-> codes (N, h, w)."""
    for side, tensors, (name, rank) in (("inputs", graph.inputs, source), ("outputs", graph.outputs, result)):
        if [(t.name, len(t.dims)) for t in tensors] != [(name, rank)]:
            raise BundleError(f"bundle.json: model.{key}.io.{side} must be one rank-{rank} tensor {name!r}")


# ---- ids ----

def _check_sampler_io(sampler: GraphSpec, decoder: GraphSpec, key: str = "sampler") -> None:
    """The sampler (`key`) reads its step graph's logits as they are: same width, same dtype."""
    want = {"logits", "cfg_scale", "guided", "kinds", "temperature", "top_k", "top_p", "greedy", "uniforms"}
    names = {t.name for t in sampler.inputs}
    if names != want or {t.name for t in sampler.outputs} != {"ids", "logprobs"}:
        raise BundleError(f"bundle.json: model.{key}.io must have inputs {sorted(want)} and outputs ids, logprobs")
    logits, step = sampler.input("logits"), decoder.output("logits")
    if (logits.dtype, logits.dims[-1:]) != (step.dtype, step.dims[-1:]):
        what = "the sampler" if key == "sampler" else f"model.{key}"
        raise BundleError(f"bundle.json: {what} reads {logits.dtype} logits of width {logits.dims[-1:]}, the step "
                          f"graph writes {step.dtype} of width {step.dims[-1:]}")


def _tokens(manifest: dict, vocab_size: int) -> Tokens:
    block = manifest["emu3"]["tokens"]
    ids, text = {}, {}
    for role in TOKEN_ROLES:
        entry = block.get(role)
        if not (isinstance(entry, dict) and type(entry.get("id")) is int and 0 <= entry["id"] < vocab_size
                and isinstance(entry.get("text"), str) and 0 < len(entry["text"]) <= MAX_NAME):
            raise BundleError(f"bundle.json: field 'emu3.tokens.{role}' needs a text and an id in [0, {vocab_size})")
        ids[role], text[role] = entry["id"], entry["text"]
    # Emu3's nine roles are nine tokens (pad 151643, eol 151846, eof 151847, bos 151849, eos 151850, img 151851,
    # boi 151852, eoi 151853, <image> 151646): a shared one (pad = eos) would end or misparse grids silently.
    for values, what in ((ids, "id"), (text, "text")):
        first: dict = {}
        for role, v in values.items():
            if v in first:
                raise BundleError(f"bundle.json: emu3.tokens.{first[v]} and emu3.tokens.{role} share the {what} {v!r}")
            first[v] = role
    for role in ("bos", "eos", "pad"):
        if manifest["model"][f"{role}_token_id"] != ids[role]:
            raise BundleError(f"bundle.json: model.{role}_token_id {manifest['model'][f'{role}_token_id']} != "
                              f"emu3.tokens.{role}.id {ids[role]}")
    return Tokens(**ids, text=text)


MAX_RUNS = 1 << 16  # a real checkpoint has one run of 32,768


def _runs(value: Any, field: str, first_limit: int, vocab_size: int) -> list[tuple[int, int, int]]:
    """[[first, first_id, count], ...] with first + count <= first_limit and first_id + count <= vocab_size."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_RUNS:
        raise BundleError(f"bundle.json: field {field!r} must be a list of 1 to {MAX_RUNS} runs")
    for i, run in enumerate(value):
        if not (isinstance(run, list) and len(run) == 3 and all(type(x) is int for x in run) and run[2] > 0
                and 0 <= run[0] and run[0] + run[2] <= first_limit and 0 <= run[1] and run[1] + run[2] <= vocab_size):
            raise BundleError(f"bundle.json: field '{field}[{i}]' must be [first, first_id, count] inside "
                              f"[0, {first_limit}) and the vocabulary")
    return [tuple(run) for run in value]


def _table(runs: list[tuple[int, int, int]]) -> np.ndarray:
    """Runs sorted by their first column/code -> (total count,) int64 ids."""
    return np.concatenate([np.arange(first_id, first_id + n, dtype=np.int64) for _, first_id, n in sorted(runs)])


def _visual_runs(manifest: dict, tokens: Tokens) -> list[tuple[int, int, int]]:
    """Code -> id runs that map every code exactly once, to distinct ids, none of them a control id."""
    codebook, vocab = manifest["emu3"]["codebook_size"], manifest["model"]["vocab_size"]
    runs = _runs(manifest["emu3"]["visual_token_runs"], "emu3.visual_token_runs", codebook, vocab)
    by_code, by_id = sorted(runs), sorted(runs, key=lambda r: r[1])
    if sum(r[2] for r in runs) != codebook or any(a[0] + a[2] != b[0] for a, b in zip(by_code, by_code[1:])):
        raise BundleError(f"bundle.json: field 'emu3.visual_token_runs' must map each of the {codebook} codes once")
    if any(a[1] + a[2] > b[1] for a, b in zip(by_id, by_id[1:])):
        raise BundleError("bundle.json: field 'emu3.visual_token_runs' maps two codes to one id")
    starts = np.array([r[1] for r in by_id])
    ends = starts + np.array([r[2] for r in by_id])
    for role in TOKEN_ROLES:
        tid = getattr(tokens, role)
        k = np.searchsorted(starts, tid, side="right") - 1
        if k >= 0 and tid < ends[k]:
            raise BundleError(f"bundle.json: emu3.tokens.{role} id {tid} is inside the visual token range")
    return runs


def _logit_runs(manifest: dict, key: str = "decoder") -> list[tuple[int, int, int]] | None:
    """None for a full head; else column -> id runs, columns contiguous from 0, ids increasing. An image_decoder
    is always a visual head."""
    dec, vocab = manifest["model"][key], manifest["model"]["vocab_size"]
    head = dec.get("head", "full")
    if head == "full" and key == "decoder":
        return None
    if head != "visual" or not isinstance(dec.get("logit_id_runs"), list):
        allowed = "'full', or 'visual' with logit_id_runs" if key == "decoder" else "'visual' with logit_id_runs"
        raise BundleError(f"bundle.json: field 'model.{key}.head' must be {allowed}")
    runs = _runs(dec["logit_id_runs"], f"model.{key}.logit_id_runs", vocab, vocab)
    if runs[0][0] != 0 or any(a[0] + a[2] != b[0] or a[1] + a[2] > b[1] for a, b in zip(runs, runs[1:])):
        raise BundleError(f"bundle.json: field 'model.{key}.logit_id_runs' must list contiguous columns from 0 "
                          "and increasing ids")
    return runs


# ---- load ----

def _image_graphs(manifest: dict, root: Path, decoder: GraphSpec, sampler: GraphSpec | None):
    """model.image_decoder (optional, `--head both`) -> (its graph, its logit runs, its sampler graph), all None
    when absent. A bundle with a decoder sampler must give the image graph its own (the widths differ)."""
    model = manifest["model"]
    if "image_decoder" not in model:
        if "image_sampler" in model:
            raise BundleError("bundle.json: model.image_sampler needs a model.image_decoder")
        return None, None, None
    for field, kind in (("filename", _STR), ("io", _DICT)):
        _typed(manifest, f"model.image_decoder.{field}", kind)
    image = _graph(manifest, root, "image_decoder")
    runs = _logit_runs(manifest, "image_decoder")
    _check_image_decoder(manifest, decoder, image, sum(r[2] for r in runs))
    if sampler is not None and "image_sampler" not in model:
        raise BundleError("bundle.json: model.image_decoder needs a model.image_sampler (the bundle has a sampler)")
    image_sampler = None
    if "image_sampler" in model:
        _typed(manifest, "model.image_sampler.io", _DICT)
        image_sampler = _graph(manifest, root, "image_sampler")
        _check_sampler_io(image_sampler, image, "image_sampler")
    return image, runs, image_sampler


def load_bundle(path: str | Path, verify: bool = False) -> Bundle:
    """Read and validate `path/bundle.json`, then check every listed file's size and sha256: once per version of
    each file (remembered in the per-user stamp cache, see integrity.py), or every time with `verify=True`."""
    root = Path(path)
    manifest, digest = integrity.read_manifest(root, MANIFEST, MAX_MANIFEST)
    version = manifest.get("schema_version")
    if version not in SCHEMA_VERSIONS or type(version) is not int:
        raise BundleError(f"bundle.json: unsupported schema_version {version!r:.20} (this runtime reads "
                          f"{', '.join(map(str, SCHEMA_VERSIONS))}); re-export or upgrade emu3-bundle")
    for field, kind in SCHEMA:
        _typed(manifest, field, kind)
    kv_cache = manifest["model"]["decoder"]["kv_cache"]
    if kv_cache not in KV_CACHES:
        raise BundleError(f"bundle.json: field 'model.decoder.kv_cache' must be one of {KV_CACHES}, "
                          f"got {kv_cache!r:.40}")
    if version == 1 and kv_cache != "concat":
        raise BundleError(f"bundle.json: schema_version 1 has only the concat KV layout, got {kv_cache!r}")
    _check_numbers(manifest)
    vocab = manifest["model"]["vocab_size"]
    tokens = _tokens(manifest, vocab)
    decoder = _graph(manifest, root, "decoder")
    vq_encoder, vq_decoder = _graph(manifest, root, "vq_encoder"), _graph(manifest, root, "vq_decoder")
    visual, logit = _visual_runs(manifest, tokens), _logit_runs(manifest)
    _check_decoder_io(manifest, decoder, vocab if logit is None else sum(r[2] for r in logit))
    _check_vq_io(vq_encoder, "vq_encoder", ("pixel_values", 4), ("codes", 3))
    _check_vq_io(vq_decoder, "vq_decoder", ("codes", 3), ("pixel_values", 4))
    sampler = None
    if "sampler" in manifest["model"]:   # optional: bundles exported before it run the numpy chain
        sampler = _graph(manifest, root, "sampler")
        _check_sampler_io(sampler, decoder)
    image, image_logit, image_sampler = _image_graphs(manifest, root, decoder, sampler)
    files = integrity.listed_files(manifest, root)
    tokenizer_path = inside(root, manifest["tokenizer"]["filename"], "tokenizer.filename")
    chat_template_path = inside(root, manifest["tokenizer"]["chat_template"], "tokenizer.chat_template")
    graphs = [g.path for g in (decoder, vq_encoder, vq_decoder, sampler, image, image_sampler) if g is not None]
    integrity.check_listed(root, files, graphs + [tokenizer_path, chat_template_path], {})
    external, checked = integrity.check_files(root, files, [g.name for g in graphs], force=verify)
    integrity.check_listed(root, files, [], external)

    def checked_graph(g: GraphSpec | None) -> GraphSpec | None:
        if g is None:
            return None
        names = [g.path.name] + external[g.path.name]
        return dataclasses.replace(g, files=tuple(checked[n] for n in names))

    return Bundle(
        root=root, manifest=manifest, decoder=checked_graph(decoder), vq_encoder=checked_graph(vq_encoder),
        vq_decoder=checked_graph(vq_decoder), tokens=tokens,
        visual_ids=_table(visual), logit_ids=None if logit is None else _table(logit),
        tokenizer_path=tokenizer_path, chat_template_path=chat_template_path,
        manifest_sha256=digest, sampler=checked_graph(sampler), image_decoder=checked_graph(image),
        image_sampler=checked_graph(image_sampler),
        image_logit_ids=None if image_logit is None else _table(image_logit),
    )


def verify_files(bundle: Bundle) -> None:
    """Re-hash every listed file now, ignoring the stamp cache (reads every byte: about 1 s per GB)."""
    integrity.check_files(bundle.root, bundle.manifest["files"], [], force=True)
