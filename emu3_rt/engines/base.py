"""The engine protocols, so the decode loop and its state never see onnxruntime or TensorRT.

* Engine: a graph behind `run(feeds) -> dict` (feeds and results are name -> np.ndarray, names and dtypes as in
  the bundle manifest): the VQ graphs, and any graph run once per call.
* BoundEngine: a graph that also runs on tensors already in a memory backend (engines/memory.py): `bind` names the
  buffers once (onnxruntime IOBinding, TensorRT tensor addresses), `execute` runs it on them, ordered on the
  binding's stream, `unbind` frees what the binding held, `release(stream)` what a state's stream held (TensorRT
  execution contexts). The sampler graph chained onto a step is one.
* StepEngine: a BoundEngine for the decoder step that makes decode states (engines/state.py) on its `memory`.

Every method here is what the loop and the state call: nothing is found by getattr.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..bundle import GraphSpec


class EngineError(RuntimeError):
    """An engine could not be created or failed to run; the message names the graph. One line."""


class Engine(Protocol):
    spec: GraphSpec

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class BoundEngine(Engine, Protocol):
    @property
    def closed(self) -> bool: ...

    # inputs / outputs: name -> memory.Buffer in `memory`. graph: this binding is replayed many times with the same
    # addresses (a one-token decode step), so an engine may capture it (onnxruntime CUDA graphs)
    def bind(self, memory, stream, inputs: dict, outputs: dict, graph: bool = False): ...

    # runs after the work queued on the binding's stream so far; its outputs are ready for work queued after it
    def execute(self, binding) -> None: ...

    def unbind(self, binding) -> None: ...

    def release(self, stream) -> None: ...


class StepEngine(BoundEngine, Protocol):
    memory: object   # engines/memory.Memory: where its decode states live

    # engines/state.DecodeState (or kv_cache.ConcatCache for a concat-layout bundle)
    def new_state(self, layout, rows: int, capacity_hint: int = 0, memory=None): ...


def check_io(spec: GraphSpec, inputs: dict[str, tuple[str, tuple]], outputs: dict[str, tuple[str, tuple]]) -> None:
    """Compare a loaded graph's I/O, name -> (dtype, dims: an int per static axis, a str or None per dynamic one),
    with the manifest; raise EngineError on any mismatch. Every static size bundle.json declares (the logits width
    above all: a full-head and a visual-head step graph differ only there) must be the graph's, and an axis it
    declares dynamic must not be fixed in the graph (dynamo can freeze one silently)."""
    for side, found, wanted in (("input", inputs, spec.inputs), ("output", outputs, spec.outputs)):
        want = {t.name: t for t in wanted}
        if set(found) != set(want):
            missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
            raise EngineError(f"{spec.path.name}: graph {side}s do not match bundle.json "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, t in want.items():
            dtype, dims = found[name]
            if (dtype, len(dims)) != (t.dtype, len(t.dims)):
                raise EngineError(f"{spec.path.name}: {side} {name!r} is {dtype} rank {len(dims)}, "
                                  f"bundle.json says {t.dtype} rank {len(t.dims)}")
            for axis, (have, declared) in enumerate(zip(dims, t.dims)):
                static = isinstance(have, int) and not isinstance(have, bool)
                if (static or isinstance(declared, int)) and have != declared:
                    raise EngineError(f"{spec.path.name}: {side} {name!r} is {_shape(dims)}, bundle.json says "
                                      f"{_shape(t.dims)} (axis {axis}); is it another bundle's graph?")


def _shape(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
