"""What the runtime may read from a bundle directory, and whether it is what bundle.json says.

`read_regular`: only regular files (never a FIFO, device or directory), with a size bound.
`external_data` lists the side files an ONNX graph makes onnxruntime open. `check_files` compares every listed
file with its sha256, remembering good results in a per-user stamp cache so later loads cost a stat per file;
`recheck` repeats the stat (and the hash if it changed) when a file is used long after load. Cache files that
do not parse are discarded (`load_cached_json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_FILES, MAX_NAME = 4096, 256
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(ValueError):
    """The bundle is missing, malformed, tampered with or incomplete. The message is one line."""


# ---- reading files ----

def _open_regular(path: Path, limit: int | None) -> tuple[int, os.stat_result]:
    """An fd on `path` after checking it is a regular file of at most `limit` bytes.
    O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer appears."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file (a FIFO, device or directory is never read)")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise BundleError(f"{path}: {st.st_size} bytes, over the {limit}-byte limit for this file")
    return fd, st


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a file growing while read is refused too)."""
    fd, _ = _open_regular(path, limit)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: over the {limit}-byte limit for this file")
    return data


def sha256_file(path: Path) -> str:
    fd, _ = _open_regular(path, None)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- the bundle directory ----

def inside(root: Path, name: str, field: str) -> Path:
    """A manifest file name -> a path that provably stays inside the bundle directory."""
    pure = PurePosixPath(name)
    if (not name or len(name) > MAX_NAME or pure.is_absolute() or ".." in pure.parts or "\\" in name
            or "\0" in name or len(pure.parts) != 1):
        raise BundleError(f"bundle.json: {field} {name!r:.80} must be a plain file name inside the bundle")
    path = root / name
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"bundle.json: {field} {name!r} is a symlink that leaves the bundle directory")
    return path


def read_manifest(root: Path, name: str, limit: int) -> tuple[dict, str]:
    """root/name parsed as a JSON object, and the sha256 of its bytes."""
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    path = root / name
    if not path.exists() and not path.is_symlink():
        if (root / "config.json").is_file() and any(root.glob("*.safetensors*")):
            # the usual mix-up: a Transformers checkpoint where an exported bundle belongs
            raise BundleError(f"{root}: a Transformers checkpoint, not a bundle; export it first: "
                              f"python -m export --checkpoint {root} --out models/NAME")
        raise BundleError(f"{root}: no {name}; not a bundle directory")
    data = read_regular(path, limit)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, or an int of 4300+ digits
        raise BundleError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: top level must be an object")
    return manifest, hashlib.sha256(data).hexdigest()


def listed_files(manifest: dict, root: Path) -> dict[str, dict]:
    """The manifest's `files` block: {plain name inside the bundle: {"sha256": 64 hex digits, "size": bytes}}."""
    files = manifest["files"]
    if len(files) > MAX_FILES:
        raise BundleError(f"bundle.json: field 'files' lists over {MAX_FILES} files")
    for name, entry in files.items():
        inside(root, name, "files key")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and _SHA256.fullmatch(entry["sha256"]) and type(entry.get("size")) is int and entry["size"] >= 0):
            raise BundleError(f"bundle.json: field 'files' entry {name!r:.80} needs a sha256 (64 hex digits) "
                              "and a size")
    return files


def check_listed(root: Path, files: dict[str, dict], used: list[Path], external: dict[str, list[str]]) -> None:
    """Every file the runtime opens is listed (and so hashed): the graphs, tokenizer and chat template (`used`),
    and the external data each graph names ({graph: locations}), which onnxruntime opens by itself."""
    for p in used:
        if p.name not in files:
            raise BundleError(f"bundle.json: {p.name} is used but not listed under 'files'")
    for graph, locations in external.items():
        for location in locations:
            if inside(root, location, f"external data of {graph}").name not in files:
                raise BundleError(f"bundle.json: {location}, external data of {graph}, is not listed under 'files'")


# ---- ONNX external data, without onnx: a walk over the protobuf wire format ----

# message -> {field number: message of that field}, for the fields on a path to a TensorProto (onnx.proto3)
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNC, _TRAIN, _ENTRY = range(9)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAIN, 25: _FUNC},
    _TRAIN: {1: _GRAPH, 2: _GRAPH},
    _FUNC: {7: _NODE},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},   # external_data: StringStringEntryProto {key = 1, value = 2}
}
_MAX_DEPTH = 100  # protobuf's own nesting limit; subgraphs (If/Loop/Scan) are a few levels deep in practice


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _walk(buf, start: int, end: int, kind: int, depth: int, found: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    key = value = None
    i, groups = start, 0  # groups: open (deprecated) group fields, unknown to ONNX; their contents are skipped
    while i < end:
        tag, i = _varint(buf, i, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
        elif wire == 1 or wire == 5:
            i += 8 if wire == 1 else 4
        elif wire == 3 or wire == 4:
            groups += 1 if wire == 3 else -1
            if groups < 0:
                raise ValueError("unbalanced group")
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise ValueError("truncated field")
            child = None if groups else _CHILDREN.get(kind, {}).get(field)
            if child is not None:
                _walk(buf, i, i + n, child, depth + 1, found)
            elif kind == _ENTRY and not groups:
                text = bytes(buf[i: i + n]).decode("utf-8", "replace")
                key, value = (text, value) if field == 1 else (key, text) if field == 2 else (key, value)
            i += n
        else:
            raise ValueError(f"wire type {wire}")
    if kind == _ENTRY and key == "location":
        found.add(value or "")


def external_data(path: Path) -> set[str]:
    """The `location`s of every tensor stored outside `path` (initializers, Constant and subgraph tensors).

    The walk reads the wire format as protobuf does (groups included), so a file it cannot read (truncated, a
    bad varint) protobuf cannot parse either: onnxruntime then refuses the graph before opening any side file,
    and says so (EngineError) when the graph is first used. Locations found up to that point still count."""
    fd, st = _open_regular(path, None)
    with os.fdopen(fd, "rb") as f:
        if st.st_size == 0:
            return set()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:  # raw_data is skipped, never paged in
            found: set[str] = set()
            with contextlib.suppress(ValueError):
                _walk(buf, 0, len(buf), _MODEL, 0, found)
            return found


# ---- hashes, remembered per user ----

def cache_dir() -> Path:
    """EMU3_RT_CACHE_DIR, else $XDG_CACHE_HOME/emu3-rt, else ~/.cache/emu3-rt."""
    if os.environ.get("EMU3_RT_CACHE_DIR"):
        return Path(os.environ["EMU3_RT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emu3-rt"


def _stamp_path(root: Path) -> Path:
    return cache_dir() / "stamps" / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32] + ".json")


def load_cached_json(path: Path, limit: int = 1 << 20):
    """A per-user cache file's JSON value, or None when it is missing, unreadable, over `limit` or does not parse.
    A file that does not parse (not JSON, nested too deeply for the parser, an int of 4300+ digits) is deleted:
    a corrupt cache costs one recomputation, never a failure of every later run."""
    try:
        data = read_regular(path, limit)
    except (BundleError, OSError):
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # ValueError: JSON, UTF-8 or int digits; RecursionError: nesting depth
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


def _load_stamps(path: Path) -> dict:
    """{file name: stamp}; an unreadable or corrupt cache is an empty one (everything is re-hashed)."""
    stamps = load_cached_json(path)
    return stamps if isinstance(stamps, dict) else {}


def save_cached_json(path: Path, value) -> None:
    """Write a per-user cache file atomically (temp file + rename, in a 0700 directory). A cache that cannot be
    written only costs recomputing it next time, so errors are dropped."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.parent.name}-")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@dataclass(frozen=True)
class FileCheck:
    """A listed file as check_files found it good: its sha256 in bundle.json and its stat key then."""
    path: Path
    sha256: str
    key: tuple[int, ...]  # (size, mtime_ns, ctime_ns, inode, device)


def _key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def recheck(checks: tuple[FileCheck, ...]) -> None:
    """Files checked at load, checked again before use (a session opens at its first run, maybe hours later):
    a stat each; a file whose stat changed is re-hashed, and BundleError unless it still matches bundle.json."""
    for c in checks:
        fd, st = _open_regular(c.path, None)
        os.close(fd)
        if tuple(_key(st)) != c.key and (st.st_size != c.key[0] or sha256_file(c.path) != c.sha256):
            raise BundleError(f"{c.path}: changed since the bundle was loaded (size or sha256 no longer matches "
                              f"bundle.json)")


def check_files(root: Path, files: dict[str, dict], graphs: list[str],
                force: bool = False) -> tuple[dict[str, list[str]], dict[str, FileCheck]]:
    """Every listed file is a regular file of the listed size and sha256; returns each graph's external data
    locations, and each file's FileCheck (for `recheck`). A file whose (size, mtime, ctime, inode, device) match
    the stamp of an earlier good hash is not read again, unless `force`; ctime cannot be set back by a user, so a
    rewritten file is always re-hashed."""
    cache = _stamp_path(root)
    stamps = {} if force else _load_stamps(cache)
    fresh, external, checked = {}, {}, {}
    for name, entry in files.items():
        path = root / name
        fd, st = _open_regular(path, None)
        os.close(fd)
        if st.st_size != entry["size"]:
            raise BundleError(f"{path}: size {st.st_size} != {entry['size']} in bundle.json (truncated?)")
        key = _key(st) + [entry["sha256"]]
        stamp = stamps.get(name)
        if not (isinstance(stamp, list) and stamp[:6] == key):
            if sha256_file(path) != entry["sha256"]:
                raise BundleError(f"{path}: sha256 does not match bundle.json (modified or corrupt)")
            stamp = key + [sorted(external_data(path)) if name in graphs else None]
        if name in graphs and not (len(stamp) == 7 and isinstance(stamp[6], list)):
            stamp = key + [sorted(external_data(path))]
        fresh[name] = stamp
        checked[name] = FileCheck(path, entry["sha256"], tuple(key[:5]))
        if name in graphs:
            external[name] = [str(x) for x in stamp[6]]
    if fresh != stamps:
        save_cached_json(cache, fresh)
    return external, checked


def graph_digest(path: Path) -> tuple[str, list[str]]:
    """(sha256, external data locations) of a bundle graph: from the stamp of the check_files that vetted it when
    the file is unchanged since (a stat), else computed now (about 1 s per GB)."""
    fd, st = _open_regular(path, None)
    os.close(fd)
    stamp = _load_stamps(_stamp_path(path.parent)).get(path.name)
    key = _key(st)
    if isinstance(stamp, list) and len(stamp) == 7 and stamp[:5] == key and isinstance(stamp[6], list):
        return str(stamp[5]), [str(x) for x in stamp[6]]
    return sha256_file(path), sorted(external_data(path))


def cached_sha256(path: Path) -> str:
    """sha256 of a file outside the manifest (a TensorRT plan), remembered in the stamp cache of its directory:
    later calls on the unchanged file (size, mtime, ctime, inode, device) cost a stat instead of a read."""
    fd, st = _open_regular(path, None)
    os.close(fd)
    cache = _stamp_path(path.parent)
    stamps = _load_stamps(cache)
    key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    stamp = stamps.get(path.name)
    if isinstance(stamp, list) and len(stamp) == 6 and stamp[:5] == key and isinstance(stamp[5], str):
        return stamp[5]
    digest = sha256_file(path)
    save_cached_json(cache, {**stamps, path.name: key + [digest]})
    return digest
