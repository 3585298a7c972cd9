"""The engine protocol: a graph behind `run(feeds) -> dict`, so the decode loop never sees ORT or TensorRT.

feeds and results are name -> np.ndarray, names and dtypes as in the bundle manifest.
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


def check_io(spec: GraphSpec, inputs: dict[str, tuple[str, int]], outputs: dict[str, tuple[str, int]]) -> None:
    """Compare a loaded graph's (name -> (dtype, rank)) I/O with the manifest; raise EngineError on any mismatch."""
    for side, found, wanted in (("input", inputs, spec.inputs), ("output", outputs, spec.outputs)):
        want = {t.name: (t.dtype, len(t.dims)) for t in wanted}
        if set(found) != set(want):
            missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
            raise EngineError(f"{spec.path.name}: graph {side}s do not match bundle.json "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, (dtype, rank) in want.items():
            if found[name] != (dtype, rank):
                raise EngineError(f"{spec.path.name}: {side} {name!r} is {found[name][0]} rank {found[name][1]}, "
                                  f"bundle.json says {dtype} rank {rank}")
