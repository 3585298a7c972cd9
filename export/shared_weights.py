"""One external-data file under several step graphs: every initializer whose bytes another graph already stored
is stored once (compared by sha256 of the raw bytes, whatever the tensor's name), so a bundle with the full and
the visual-head step graphs holds the body weights once and adds only the visual lm_head rows.

`share_weights([full.onnx, visual.onnx], "decoder_step.data")` rewrites the graphs in place: tensors of at least
MIN_EXTERNAL bytes point into the shared file, smaller ones stay inline. The layout is deterministic (the graphs'
initializer order, first occurrence wins) and aligned as onnxruntime aligns its own external data: tensors of
ALIGN_THRESHOLD bytes or more start on a 64 KiB boundary (the mmap granularity Windows needs), the rest on 64 bytes.
Tensors are streamed one at a time (mmap of the source files), so a real checkpoint never sits in memory twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

MIN_EXTERNAL = 1024            # bytes: onnx's own size_threshold; smaller tensors (shapes, scalars) stay inline
ALIGN_THRESHOLD = 1 << 20      # onnxruntime's OffsetAlignmentInfo.align_threshold
ALIGN_LARGE, ALIGN_SMALL = 1 << 16, 64


@dataclass(frozen=True)
class SharedWeights:
    file: str
    size: int                   # bytes of the shared file, padding included
    stored: dict[str, int]      # graph file -> tensors it added to the shared file
    reused: dict[str, int]      # graph file -> tensors it found already stored (by content)


class _Sources:
    """Read-only maps of the external-data files the graphs point at today, opened once each."""

    def __init__(self, root: Path):
        self.root, self.maps = root, {}

    def read(self, tensor: onnx.TensorProto) -> memoryview:
        info = {e.key: e.value for e in tensor.external_data}
        path = self.root / info["location"]
        if path not in self.maps:
            with open(path, "rb") as f:
                self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(self.maps[path]) - offset
        return memoryview(self.maps[path])[offset: offset + length]

    def close(self) -> None:
        for m in self.maps.values():
            with contextlib.suppress(BufferError):  # a view still held by an exception's frame: closed at collection
                m.close()


def _raw(tensor: onnx.TensorProto, sources: _Sources) -> bytes | memoryview:
    """The tensor's little-endian bytes, wherever they are stored (external, raw_data or the typed fields)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return sources.read(tensor)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def share_weights(graphs: list[Path], name: str) -> SharedWeights:
    """Rewrite `graphs` (one directory) so that their initializers live once each in `name` next to them.
    External-data files they pointed at before and no longer use are removed."""
    root = graphs[0].parent
    target, tmp = root / name, root / (name + ".tmp")
    models = [onnx.load(str(g), load_external_data=False) for g in graphs]
    before = {e.value for m in models for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    sources = _Sources(root)
    where: dict[str, tuple[int, int]] = {}          # sha256 of the bytes -> (offset, length) in the shared file
    stored, reused = {}, {}
    try:
        with open(tmp, "wb") as out:
            for graph, model in zip(graphs, models):
                stored[graph.name] = reused[graph.name] = 0
                for tensor in model.graph.initializer:
                    if tensor.data_type == onnx.TensorProto.STRING:
                        continue
                    data = _raw(tensor, sources)
                    if len(data) < MIN_EXTERNAL:
                        if tensor.data_location == onnx.TensorProto.EXTERNAL:   # small but stored outside: inline
                            raw = bytes(data)
                            del tensor.external_data[:]
                            tensor.data_location = onnx.TensorProto.DEFAULT
                            tensor.raw_data = raw
                        continue
                    key = hashlib.sha256(data).hexdigest()
                    if key in where:
                        reused[graph.name] += 1
                    else:
                        align = ALIGN_LARGE if len(data) >= ALIGN_THRESHOLD else ALIGN_SMALL
                        out.write(b"\0" * (-out.tell() % align))
                        where[key] = (out.tell(), len(data))
                        out.write(data)
                        stored[graph.name] += 1
                    _point(tensor, name, *where[key])
                    del data
        for graph, model in zip(graphs, models):
            # the proto alone: every tensor of MIN_EXTERNAL bytes or more now points into the shared file
            graph.write_bytes(model.SerializeToString())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        sources.close()
    os.replace(tmp, target)
    for location in before - {name}:
        (root / location).unlink(missing_ok=True)
    return SharedWeights(name, target.stat().st_size, stored, reused)
