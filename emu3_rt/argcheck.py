"""Argument checks at the API boundary: one TypeError / ValueError line naming the argument.

Nothing is coerced from another kind (b"x" never becomes "b'x'", 2.5 never becomes 2); numpy scalars are accepted
and turned into Python ints and floats, so options stay JSON-serialisable for the PNG metadata.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from . import image as imaging
from .prompt import PromptError, Turn


def kind(value) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def shown(value) -> str:
    """A number for a one-line message: a huge int (10**400) by its size, not its 400 digits."""
    return f"a {value.bit_length()}-bit number" if isinstance(value, int) and abs(value) >= 10**18 else str(value)


def as_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {kind(value)}")
    value = int(value)
    if hi is not None and not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {shown(value)}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {shown(value)}")
    return value


def as_real(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """A finite float (NaN and infinities are refused everywhere: a NaN slips through every `<` check), within
    [lo, hi] when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {kind(value)}")
    try:
        x = float(value)
    except OverflowError:  # an int past float range (10**400)
        raise ValueError(f"{name} is out of float range") from None
    if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        bound = f" in [{lo}, {hi}]" if lo is not None and hi is not None else \
            f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {x}")
    return x


def as_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {kind(value)}")
    return bool(value)


def as_text(name: str, value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be str or None, got {kind(value)}")
    return value


def as_texts(name: str, value) -> list[str]:
    """str, or a sequence (list, tuple) of str -> list[str]."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name} must be str or a sequence of str, got {kind(value)}")
    for x in value:
        if not isinstance(x, str):
            raise TypeError(f"{name} must be str or a sequence of str, got a {kind(value)} holding {kind(x)}")
    return list(value)


def as_callback(name: str, value):
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {kind(value)}")
    return value


def as_seed(value, rows: int = 1) -> int | list[int] | None:
    """None (random), one 32-bit int (row i draws from seed + i), or one 32-bit int per row. 32 bits: what the CLI
    prints and the PNG metadata records."""
    if value is None or isinstance(value, numbers.Integral):
        return None if value is None else as_int("seed", value, 0, 2**32 - 1)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"seed must be an int, a sequence of ints or None, got {kind(value)}")
    if len(value) != rows:
        raise ValueError(f"seed holds {len(value)} seeds for {rows} prompts")
    return [as_int("seed", x, 0, 2**32 - 1) for x in value]


def as_prompts(value) -> list[str]:
    prompts = as_texts("prompts", value)
    if not prompts or any(not p.strip() for p in prompts):
        raise PromptError("the prompt is empty")
    return prompts


def is_image_like(value) -> bool:
    return isinstance(value, (Image.Image, imaging.ImageFile, str, os.PathLike))


def image_lists(images, n: int) -> list[list]:
    """`images` of chat -> one list per prompt of PIL images, ImageFiles or paths (str / os.PathLike), types
    checked only.

    One prompt: None, one image or path, or a sequence of them. A batch: None, or one entry per prompt, each
    None, one image or path, or a sequence of them.
    """
    def one(x) -> list:
        if x is None:
            return []
        if is_image_like(x):
            return [x]
        if not isinstance(x, Sequence) or isinstance(x, (bytes, bytearray)):
            raise TypeError(f"images must be a PIL image, a file path or a sequence of them, got {kind(x)}")
        for im in x:
            if not is_image_like(im):
                raise TypeError(f"images must hold PIL images or file paths (str, os.PathLike), got {kind(im)}")
        return list(x)

    if n == 1 or images is None or (isinstance(images, (list, tuple)) and not images):  # [] for a batch: none
        return [one(images)] + [[] for _ in range(n - 1)]
    if is_image_like(images) or not isinstance(images, Sequence) or isinstance(images, (bytes, bytearray)):
        raise TypeError(f"images for {n} prompts must be a sequence with one entry per prompt, got {kind(images)}")
    if len(images) != n:
        raise PromptError(f"{n} prompts but {len(images)} image lists")
    return [one(x) for x in images]


def history_lists(history, n: int) -> list[tuple[Turn, ...]]:
    """`history` of chat -> the earlier turns of each of the n prompts. One prompt: None or a sequence of Turn.
    A batch: None, or one entry per prompt, each None or a sequence of Turn."""
    def one(x) -> tuple[Turn, ...]:
        if x is None:
            return ()
        if not isinstance(x, Sequence) or isinstance(x, (str, bytes, bytearray)):
            raise TypeError(f"history must be a sequence of emu3_rt.Turn, got {kind(x)}")
        for t in x:
            if not isinstance(t, Turn):
                raise TypeError(f"history must hold emu3_rt.Turn (role, text, images), got {kind(t)}")
        return tuple(x)

    if n == 1 or history is None:
        return [one(history)] + [() for _ in range(n - 1)]
    if not isinstance(history, Sequence) or isinstance(history, (str, bytes, bytearray)) or \
            any(isinstance(h, Turn) for h in history):
        raise TypeError(f"history for {n} prompts must be a sequence with one list of turns per prompt, got "
                        f"{kind(history)}")
    if len(history) != n:
        raise PromptError(f"{n} prompts but {len(history)} histories")
    return [one(x) for x in history]


def open_image(x) -> Image.Image | imaging.ImageFile:
    """A path read into an ImageFile (header checked, not decoded); PIL images and ImageFiles as they are."""
    return x if isinstance(x, (Image.Image, imaging.ImageFile)) else imaging.read_image(x)
