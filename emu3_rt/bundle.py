"""bundle.json -> a validated, frozen `Bundle`: the first stage of the runtime.

Every later stage reads ids, shapes and file paths from here and nowhere else. Validation names the field that
is wrong; file names must stay inside the bundle directory; `verify_files` checks sizes and sha256 hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

# 2: the step graph may use the "buffer" KV layout (present = the new rows only). A runtime that reads only 1
# would feed such a graph as if present were the whole cache, so the version changed with it.
SCHEMA_VERSIONS = (1, 2)
MANIFEST = "bundle.json"


class BundleError(ValueError):
    """The bundle is missing, malformed, tampered with or incomplete. The message is one line."""


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
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


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
        """Identity of the bundle: the hash of its manifest (which holds every file's hash)."""
        return hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()


def _inside(root: Path, name: str, field: str) -> Path:
    """A manifest file name -> a path that provably stays inside the bundle directory."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or len(pure.parts) != 1:
        raise BundleError(f"bundle.json: {field} {name!r} must be a plain file name inside the bundle")
    path = root / name
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"bundle.json: {field} {name!r} is a symlink that leaves the bundle directory")
    return path


def _graph(manifest: dict, root: Path, key: str) -> GraphSpec:
    block = manifest["model"][key]
    io = block["io"]
    specs = {}
    for side in ("inputs", "outputs"):
        tensors = io.get(side)
        if not isinstance(tensors, list) or not tensors:
            raise BundleError(f"bundle.json: field 'model.{key}.io.{side}' must be a non-empty list")
        parsed = []
        for i, t in enumerate(tensors):
            where = f"model.{key}.io.{side}[{i}]"
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("dtype") in DTYPES
                    and isinstance(t.get("dims"), list)
                    and all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                            for d in t["dims"])):
                raise BundleError(f"bundle.json: field {where!r} needs name, a dtype in {DTYPES} and dims")
            parsed.append(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])))
        specs[side] = tuple(parsed)
    return GraphSpec(_inside(root, block["filename"], f"model.{key}.filename"), specs["inputs"], specs["outputs"])


def _check_kv_layout(bundle: Bundle) -> None:
    """The declared layout must match the step graph's present K/V length: the new tokens' (buffer) or the
    whole mask's (concat). A mismatch would otherwise surface as a numpy broadcast or a silent ONNX one."""
    dec = bundle.manifest["model"]["decoder"]
    try:
        present = bundle.decoder.output(dec["outputs"]["present_key_names"] % 0).dims
        new = bundle.decoder.input(dec["inputs"]["input_ids"]).dims
        total = bundle.decoder.input(dec["inputs"]["attention_mask"]).dims
    except (StopIteration, TypeError):  # a name not in io, or a per-layer pattern without its %d
        raise BundleError("bundle.json: model.decoder.io lacks input_ids, attention_mask or present K/V") from None
    want = new[1:2] if bundle.kv_cache == "buffer" else total[1:2]
    if len(present) != 4 or (present[2],) != want:
        raise BundleError(f"bundle.json: model.decoder.kv_cache is {bundle.kv_cache!r} but the graph's present "
                          f"K/V length is {present[2:3]}, not {want}")


def _tokens(manifest: dict, vocab_size: int) -> Tokens:
    block = manifest["emu3"]["tokens"]
    ids, text = {}, {}
    for role in TOKEN_ROLES:
        entry = block.get(role)
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), int) and isinstance(entry.get("text"), str)
                and 0 <= entry["id"] < vocab_size):
            raise BundleError(f"bundle.json: field 'emu3.tokens.{role}' needs a text and an id in [0, {vocab_size})")
        ids[role], text[role] = entry["id"], entry["text"]
    return Tokens(**ids, text=text)


def _visual_ids(manifest: dict, vocab_size: int) -> np.ndarray:
    codebook = manifest["emu3"]["codebook_size"]
    table = np.full(codebook, -1, dtype=np.int64)
    for i, run in enumerate(manifest["emu3"]["visual_token_runs"]):
        if not (isinstance(run, list) and len(run) == 3 and all(isinstance(x, int) for x in run)
                and run[2] > 0 and 0 <= run[0] and run[0] + run[2] <= codebook
                and 0 <= run[1] and run[1] + run[2] <= vocab_size):
            raise BundleError(f"bundle.json: field 'emu3.visual_token_runs[{i}]' must be [first_code, first_id, "
                              f"count] inside the codebook and vocabulary")
        table[run[0]: run[0] + run[2]] = np.arange(run[1], run[1] + run[2])
    if (table < 0).any():
        raise BundleError(f"bundle.json: field 'emu3.visual_token_runs' leaves {(table < 0).sum()} codes unmapped")
    return table


def _logit_ids(manifest: dict, vocab_size: int) -> np.ndarray | None:
    dec = manifest["model"]["decoder"]
    head = dec.get("head", "full")
    if head == "full":
        return None
    runs = dec.get("logit_id_runs")
    if head != "visual" or not isinstance(runs, list) or not runs:
        raise BundleError("bundle.json: field 'model.decoder.head' must be 'full', or 'visual' with logit_id_runs")
    cols = []
    for i, run in enumerate(runs):
        if not (isinstance(run, list) and len(run) == 3 and all(isinstance(x, int) for x in run) and run[2] > 0
                and run[0] == len(cols) and 0 <= run[1] and run[1] + run[2] <= vocab_size):
            raise BundleError(f"bundle.json: field 'model.decoder.logit_id_runs[{i}]' must be [first_column, "
                              f"first_id, count], contiguous columns, ids inside the vocabulary")
        cols.extend(range(run[1], run[1] + run[2]))
    ids = np.asarray(cols, dtype=np.int64)
    if (np.diff(ids) <= 0).any():
        raise BundleError("bundle.json: field 'model.decoder.logit_id_runs' must list increasing ids")
    return ids


def load_bundle(path: str | Path, verify: bool = False) -> Bundle:
    """Read and validate `path/bundle.json`. `verify=True` also checks every file's size and sha256."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root}: no {MANIFEST}; not a bundle directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{root / MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{root / MANIFEST}: top level must be an object")
    version = manifest.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise BundleError(f"bundle.json: unsupported schema_version {version!r} (this runtime reads "
                          f"{', '.join(map(str, SCHEMA_VERSIONS))}); re-export or upgrade emu3-bundle")
    for field, kind in SCHEMA:
        _typed(manifest, field, kind)
    kv_cache = manifest["model"]["decoder"]["kv_cache"]
    if kv_cache not in KV_CACHES:
        raise BundleError(f"bundle.json: field 'model.decoder.kv_cache' must be one of {KV_CACHES}, "
                          f"got {kv_cache!r:.40}")
    if version == 1 and kv_cache != "concat":
        raise BundleError(f"bundle.json: schema_version 1 has only the concat KV layout, got {kv_cache!r}")
    vocab = manifest["model"]["vocab_size"]
    for name, entry in manifest["files"].items():
        _inside(root, name, "files key")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int)):
            raise BundleError(f"bundle.json: field 'files.{name}' needs sha256 and size")
    bundle = Bundle(
        root=root, manifest=manifest,
        decoder=_graph(manifest, root, "decoder"), vq_encoder=_graph(manifest, root, "vq_encoder"),
        vq_decoder=_graph(manifest, root, "vq_decoder"), tokens=_tokens(manifest, vocab),
        visual_ids=_visual_ids(manifest, vocab), logit_ids=_logit_ids(manifest, vocab),
        tokenizer_path=_inside(root, manifest["tokenizer"]["filename"], "tokenizer.filename"),
        chat_template_path=_inside(root, manifest["tokenizer"]["chat_template"], "tokenizer.chat_template"),
    )
    _check_kv_layout(bundle)
    for p in (bundle.decoder.path, bundle.vq_encoder.path, bundle.vq_decoder.path, bundle.tokenizer_path):
        if p.name not in manifest["files"]:
            raise BundleError(f"bundle.json: {p.name} is used but not listed under 'files'")
    if verify:
        verify_files(bundle)
    return bundle


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(bundle: Bundle) -> None:
    """Check every listed file's size and sha256 (reads every byte: about 1 s per GB)."""
    for name, entry in bundle.manifest["files"].items():
        path = bundle.root / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in bundle.json but missing")
        if path.stat().st_size != entry["size"]:
            raise BundleError(f"{path}: size {path.stat().st_size} != {entry['size']} in bundle.json (truncated?)")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 does not match bundle.json (modified or corrupt)")
