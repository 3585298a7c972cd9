"""What a caller chooses about randomness: SamplingOptions (greedy, or temperature -> top-k -> top-p -> a seeded
draw) and the seeds, one stream per batch row so a row reproduces alone."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .argcheck import as_flag, as_int, as_real, kind
from .bundle import Bundle
from .sampling import Greedy, Sample


@dataclass(frozen=True)
class SamplingOptions:
    # argmax decoding; when False, temperature -> top-k -> top-p -> a seeded multinomial draw
    greedy: bool = False
    temperature: float = 1.0
    # candidates kept per step (Emu3's reference: 2048)
    top_k: int = 2048
    top_p: float = 1.0

    def __post_init__(self):
        # types here; ranges in validate(), which checks them only when sampling
        object.__setattr__(self, "greedy", as_flag("greedy", self.greedy))
        object.__setattr__(self, "temperature", as_real("temperature", self.temperature))
        object.__setattr__(self, "top_k", as_int("top_k", self.top_k))
        object.__setattr__(self, "top_p", as_real("top_p", self.top_p))

    @classmethod
    def from_bundle(cls, bundle: Bundle, **overrides) -> SamplingOptions:
        """The bundle's search defaults with a caller's overrides (None: the default). A temperature override of 0
        means greedy decoding, as OpenAI's API and llama.cpp read it: the CLI's --temperature 0 and the service's
        "temperature": 0 both come through here (constructed directly, SamplingOptions(temperature=0) is refused)."""
        s = bundle.search
        base = dict(greedy=not s.get("do_sample", True), temperature=s["temperature"], top_k=s["top_k"],
                    top_p=s["top_p"])
        overrides = {k: v for k, v in overrides.items() if v is not None}
        t = overrides.get("temperature")
        if isinstance(t, numbers.Real) and not isinstance(t, (bool, np.bool_)) and t == 0:
            overrides["greedy"] = True
            del overrides["temperature"]
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        if not self.greedy:
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {self.top_k}")
            if not (0 < self.top_p <= 1):
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sampling_options(value, bundle: Bundle) -> SamplingOptions:
    if value is None:
        value = SamplingOptions.from_bundle(bundle)
    elif not isinstance(value, SamplingOptions):
        raise TypeError(f"sampling must be a SamplingOptions or None, got {kind(value)}")
    value.validate()
    return value


def random_seed() -> int:
    """A fresh 32-bit seed (the range PNG metadata and the CLI record)."""
    return int(np.random.SeedSequence().entropy % 2**32)


def row_seeds(seed: int, rows: int) -> list[int]:
    """Row i of a batch draws from seed + i (mod 2**32): its own stream, so one prompt run alone with that
    seed reproduces the row (as A1111/diffusers batches do)."""
    return [(seed + i) % 2**32 for i in range(rows)]


def seeded(options: SamplingOptions, seed: int | list[int] | None, rows: int):
    """The selector, the seed actually used and the per-row seeds (None, None for greedy decoding). A list gives
    each row its own seed (a server batching requests); the reported seed is then the first row's."""
    if options.greedy:
        return Greedy(), None, None
    seed = random_seed() if seed is None else seed
    seeds = list(seed) if isinstance(seed, list) else row_seeds(seed, rows)
    seed = seeds[0]
    return Sample([np.random.default_rng(s) for s in seeds]), seed, seeds
