"""Generations driven step by step: what `Emu3.start_chat` and `Emu3.start_image` return.

    gen = model.start_image(["a red cat", "a blue car"], seed=[7, 9])
    while (ids := gen.step()) is not None:     # (B,) ids per step; stream, preview or gen.cancel() in between
        progress.append(gen.rows_done())
    result = gen.result()                      # ImageResult (VQ-decoded images)

Each generation owns its KV cache (released when it finishes, is cancelled or fails), so several can run on one
model from several threads; `Emu3.chat` / `generate_image` are these objects run to the end with callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .bundle import Bundle
from .generate import Decoding
from .prompt import PromptEncoder


class GenerationError(RuntimeError):
    """Generation finished but its output is not what the model must produce (e.g. a broken image grid), or a
    cancelled generation was asked for its result."""


@dataclass(frozen=True)
class ChatResult:
    texts: list[str]
    prompt_ids: list[list[int]]
    tokens: list[list[int]]     # generated ids per row, EOS included when reached
    seed: int | None
    seeds: list[int] | None = None  # per row: running prompt i alone with seeds[i] reproduces it


@dataclass(frozen=True)
class ImageResult:
    images: list[Image.Image]
    prompt_ids: list[list[int]]
    tokens: list[list[int]]     # h*(w+1)+3 ids per row: visual rows with EOL, then EOF, EOI, EOS
    grids: list[tuple[int, int]]
    seed: int | None
    negative_prompt: str | None
    cfg_scale: float
    seeds: list[int] | None = None  # per image: running prompt i alone with seeds[i] reproduces it


class _Generation:
    """The part chat and images share: stepping, cancelling, running to the end."""

    def __init__(self, decoding: Decoding, prompt_ids: list[list[int]], seed: int | None, seeds: list[int] | None):
        self._decoding = decoding
        self.prompt_ids, self.seed, self.seeds = prompt_ids, seed, seeds
        self.cancelled = False

    @property
    def rows(self) -> int:
        return self._decoding.tokens.shape[0]

    @property
    def model_rows(self) -> int:
        """Rows the step graph runs for this generation: B, or 2B under CFG (cond, then uncond rows)."""
        return self._decoding.batch.rows

    @property
    def steps(self) -> int:
        """Steps run so far."""
        return self._decoding.tokens.shape[1]

    @property
    def done(self) -> bool:
        return self._decoding.finished

    def step(self) -> np.ndarray | None:
        """One decode step for every row: the (B,) ids chosen, or None once finished or cancelled. A failing step
        releases the state before it raises."""
        try:
            ids = self._decoding.step()
        except BaseException:
            self._decoding.close()
            raise
        if ids is not None:
            self._observe(ids)
        return ids

    def cancel(self) -> None:
        """Stop now and release the KV cache; later steps return None and result() raises GenerationError."""
        self.cancelled = True
        self._decoding.close()

    close = cancel   # contextlib.closing(gen): an exception while driving it releases the state

    def _finish(self) -> np.ndarray:
        """Run the remaining steps; the (B, n) generated ids."""
        while self.step() is not None:
            pass
        if self.cancelled:
            raise GenerationError("the generation was cancelled")
        return self._decoding.tokens

    def _observe(self, ids: np.ndarray) -> None:
        pass


# ---- chat ----

class ChatGeneration(_Generation):
    def __init__(self, prompts: PromptEncoder, eos: int, decoding: Decoding, prompt_ids, seed, seeds):
        super().__init__(decoding, prompt_ids, seed, seeds)
        self._prompts, self._eos = prompts, eos
        self._text = _TextStream(prompts, self.rows, eos)

    def _observe(self, ids: np.ndarray) -> None:
        self._text.feed(ids)

    def text_deltas(self) -> list[str]:
        """Per row, the text added since the last call: whole UTF-8 characters only while the row runs, and the
        rest (an unfinished character's replacement mark included) once the generation is done, so the deltas
        always add up to result().texts."""
        return self._text.take(final=self.done)

    def result(self) -> ChatResult:
        rows = [_until_eos(t, self._eos) for t in self._finish()]
        return ChatResult([self._prompts.decode(r) for r in rows], self.prompt_ids, rows, self.seed, self.seeds)


def _until_eos(tokens: np.ndarray, eos: int) -> list[int]:
    hits = np.flatnonzero(tokens == eos)
    return tokens[: hits[0] + 1].tolist() if len(hits) else tokens.tolist()


class _TextStream:
    """Per-step ids -> text deltas per row (decoding the whole row each time keeps UTF-8 characters whole)."""

    def __init__(self, prompts: PromptEncoder, rows: int, eos: int):
        self.prompts, self.eos = prompts, eos
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.text = [""] * rows
        self.pending = [""] * rows
        self.done = [False] * rows

    def feed(self, new: np.ndarray) -> None:
        for r, tok in enumerate(new.tolist()):
            if self.done[r]:
                continue
            self.done[r] = tok == self.eos
            self.ids[r].append(tok)
            text = self.prompts.decode(self.ids[r])
            if len(text) > len(self.text[r]) and not text.endswith("\ufffd"):
                self.pending[r] += text[len(self.text[r]):]
                self.text[r] = text

    def take(self, final: bool = False) -> list[str]:
        if final:   # nothing more will come: hand out what was held back at an unfinished character
            for r, ids in enumerate(self.ids):
                text = self.prompts.decode(ids)
                self.pending[r] += text[len(self.text[r]):]
                self.text[r] = text
        out, self.pending = self.pending, [""] * len(self.pending)
        return out


# ---- images ----

class ImageGeneration(_Generation):
    def __init__(self, model, decoding: Decoding, prompt_ids, grids: list[tuple[int, int]], seed, seeds,
                 negative_prompt: str | None, cfg_scale: float):
        super().__init__(decoding, prompt_ids, seed, seeds)
        self._model, self.grids = model, grids
        self.negative_prompt, self.cfg_scale = negative_prompt, cfg_scale

    def rows_done(self) -> list[int]:
        """Completed grid rows per image (a row is complete with its EOL)."""
        n = self.steps
        return [min(h, n // (w + 1)) for h, w in self.grids]

    def preview(self, i: int, rows: int | None = None) -> Image.Image:
        """Image i as generated so far (or its first `rows` grid rows, at most those done), full size, grey where
        its rows are not generated yet."""
        h, w = self.grids[i]
        done, f = self.rows_done()[i], self._model.bundle.spatial_factor
        rows = done if rows is None else min(rows, done)
        canvas = Image.new("RGB", (w * f, h * f), (128, 128, 128))
        if rows:
            tokens = self._decoding.tokens[i: i + 1, : rows * (w + 1)]
            canvas.paste(self._model.decode_image(tokens, rows, w)[0], (0, 0))
        return canvas

    def result(self) -> ImageResult:
        tokens, bundle = self._finish(), self._model.bundle
        images: list[Image.Image | None] = [None] * len(self.grids)
        for h, w in sorted(set(self.grids)):   # one VQ decoder call per grid size
            idx = [i for i, g in enumerate(self.grids) if g == (h, w)]
            for i in idx:
                check_image_tokens(tokens[i], h, w, bundle)
            for i, im in zip(idx, self._model.decode_image(tokens[idx], h, w)):
                images[i] = im
        rows = [tokens[i, : h * (w + 1) + 3].tolist() for i, (h, w) in enumerate(self.grids)]
        return ImageResult(images, self.prompt_ids, rows, self.grids, self.seed, self.negative_prompt,
                           self.cfg_scale, self.seeds)


def check_image_tokens(tokens: np.ndarray, h: int, w: int, bundle: Bundle) -> None:
    """h*(w+1)+3 tokens: w visual ids and an EOL per row, then EOF, EOI, EOS. Raises GenerationError otherwise."""
    t, n = bundle.tokens, h * (w + 1)
    if len(tokens) < n + 3:
        raise GenerationError(f"the image stopped after {len(tokens)} of {n + 3} tokens")
    grid = np.asarray(tokens[:n]).reshape(h, w + 1)
    visual = np.isin(grid[:, :w], bundle.visual_ids)
    if not (grid[:, w] == t.eol).all() or not visual.all() or list(tokens[n: n + 3]) != [t.eof, t.eoi, t.eos]:
        raise GenerationError(f"the generated tokens do not form a {h}x{w} image grid (EOL per row, EOF, EOI, EOS)")
