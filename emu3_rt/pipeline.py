"""The Python API: `load(bundle_dir)` -> `Emu3` with `.chat(...)` and `.generate_image(...)`.

chat:            images -> VQ encoder -> codes -> prompt ids -> generate -> text
generate_image:  prompt ids (+ negative prompt ids under CFG) -> generate with the grid constraint
                 -> tokens -> (h, w) codes -> VQ decoder -> PIL images
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import image as imaging
from .argcheck import (
    as_callback,
    as_flag,
    as_int,
    as_prompts,
    as_real,
    as_seed,
    as_text,
    as_texts,
    history_lists,
    image_lists,
    kind,
    open_image,
    shown,
)
from .bundle import Bundle, BundleError, load_bundle
from .engines import Engine, OrtEngine, OrtOptions
from .engines.base import BoundEngine, StepEngine
from .engines.ort import check_threads
from .engines.state import KVLayout
from .generate import Decoding, LoopOptions
from .generation import ChatGeneration, ChatResult, GenerationError, ImageGeneration, ImageResult, check_image_tokens  # noqa: F401
from .graph_sampler import GraphSampler
from .options import SamplingOptions, sampling_options, seeded
from .prompt import Batch, PromptEncoder, PromptError, calculate_generate_size, largest_image_area, make_batch
from .sampling import ChainPicker, VisualGridConstraint, build_chain, guided

# The embedded tiny bundle: models/emu3-tiny in a checkout, emu3_rt/models/emu3-tiny in an installed wheel.
_HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = next((p for p in (_HERE.parent / "models" / "emu3-tiny", _HERE / "models" / "emu3-tiny")
                       if (p / "bundle.json").is_file()), _HERE / "models" / "emu3-tiny")


def _per_prompt(name: str, value, n: int) -> list[int] | None:
    """None, one whole number >= 1 for every prompt, or one per prompt -> a list of n (None stays None)."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        if len(value) != n:
            raise ValueError(f"{name} holds {len(value)} values for {n} prompts")
        return [as_int(name, v, 1) for v in value]
    return [as_int(name, value, 1)] * n


def _as_list(x) -> list:
    return [x] if isinstance(x, str) else list(x)


@dataclass(frozen=True)
class Route:
    """What one task decodes with: the step graph, the sampler graph over its logits (None: the numpy chain), and
    its logits column -> token id table (None: the columns are the vocabulary)."""
    step: StepEngine
    sampler: BoundEngine | None
    logit_ids: np.ndarray | None
    # logits width of the step graph
    columns: int


class Emu3:
    """One loaded bundle. Safe to share between threads: every call (and every generation from start_chat /
    start_image) owns its own decode state; the engines are thread-safe, so nothing is locked for a whole image."""

    def __init__(self, bundle: Bundle, engines: dict[str, Engine], prefill_chunk: int | None = None,
                 host_argmax: bool = False):
        self.bundle = bundle
        self.engines = engines
        # plain greedy (no CFG, no grid: chat's default) picks by numpy's argmax on the step's logits even with a
        # sampler graph: onnxruntime CPU hands the logits over as numpy anyway, and its ArgMax over Emu3's 184,622
        # ids costs 0.6 ms a step against numpy's 0.01 ms (load() sets it for onnxruntime CPU, sampler=None)
        self.host_argmax = host_argmax
        # prompt tokens per prefill call (the bundle's default: 512)
        chunk = bundle.search["prefill_chunk"] if prefill_chunk is None else prefill_chunk
        self.prefill_chunk = as_int("prefill_chunk", chunk, 1)
        self.prompts = PromptEncoder(bundle)
        try:
            self.image_config = imaging.ImageConfig.from_manifest(bundle.manifest["image_processor"])
        except (TypeError, ValueError) as e:
            raise BundleError(f"image_processor: {e}") from None
        # id -> code table for decoding generated images (-1 for non-visual ids)
        self._id_to_code = np.full(bundle.vocab_size, -1, dtype=np.int64)
        self._id_to_code[bundle.visual_ids] = np.arange(len(bundle.visual_ids))

    def route(self, task: str) -> Route:
        """The engines a task decodes with. "chat": the decoder (full vocabulary). "image": the image step graph
        when the bundle has one (`--head both`: the same weights, logits over the visual + control ids only, the
        same tokens), else the decoder too. Read from `engines` at each call, so a swapped engine takes effect."""
        if task not in ("chat", "image"):
            raise ValueError(f"task must be 'chat' or 'image', got {task!r:.40}")
        e, b = self.engines, self.bundle
        if task == "image" and "image_decoder" in e:
            return Route(e["image_decoder"], e.get("image_sampler"), b.image_logit_ids,
                         b.image_decoder.output("logits").dims[1])
        return Route(e["decoder"], e.get("sampler"), b.logit_ids, b.decoder.output("logits").dims[1])

    @staticmethod
    def _column(route: Route, ids):
        """Token ids -> the route's logits columns: identity for a full head, positions in logit_ids for a visual
        one."""
        if route.logit_ids is None:
            return ids
        cols = np.searchsorted(route.logit_ids, ids)
        if not np.array_equal(route.logit_ids[cols], ids):
            raise ValueError("the bundle's visual head does not score every id image generation needs")
        return cols if np.ndim(ids) else int(cols)

    # image_area past this is refused before any grid is computed: no context holds such an image, and Emu3's grid
    # arithmetic (a float square root of area / ratio) stops being exact past 2**53 and fails past 1e308 (10**400)
    MAX_IMAGE_AREA = 1 << 48

    def check_image_area(self, area: int) -> int:
        """image_area as an int in [1, MAX_IMAGE_AREA] (a smaller one that does not fit is refused later, naming
        the largest area that fits beside the prompt)."""
        area = as_int("image_area", area, 1)
        if area > self.MAX_IMAGE_AREA:
            raise PromptError(f"image_area must be at most 2**48 pixels (no model's context holds more), got "
                              f"{shown(area)}")
        return area

    # ---- stages ----

    @property
    def max_images(self) -> int:
        """The most images one chat prompt can hold: each takes at least min_codes + one EOL + 5 control and size
        tokens (BOI, "h*w", IMG, EOF, EOI) of the context, after BOS and with room for one answer token."""
        return max(0, (self.bundle.context_length - 2) // (imaging.min_codes(self.image_config) + 6))

    def check_images(self, images: Sequence) -> None:
        """One prompt's images (PIL images or ImageFiles) against the limits, before any is decoded: their count
        against the context (max_images) and their decoded pixels (image.MAX_PROMPT_PIXELS, from the headers)."""
        if len(images) > self.max_images:
            raise PromptError(f"{len(images)} images in one prompt; the model's {self.bundle.context_length}-position "
                              f"context holds at most {self.max_images}")
        imaging.check_pixels(list(images))

    def encode_images(self, images: Sequence, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """PIL images or ImageFiles -> (h, w) code grids. As Emu3ImageProcessor + vqmodel.encode: one zero-padded
        batch, cropped. ImageFiles are decoded here, one at a time (image.preprocess_batch). names: what an image's
        error is prefixed with (its file), so the one of several that fails is named."""
        if not images:
            return []
        pixels = imaging.preprocess_batch(list(images), self.image_config, names)      # [(3, H_i, W_i)]
        hmax, wmax = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
        batch = np.zeros((len(pixels), 3, hmax, wmax), dtype=np.float32)
        for i, p in enumerate(pixels):
            batch[i, :, : p.shape[1], : p.shape[2]] = p
        codes = self.engines["vq_encoder"].run({"pixel_values": batch})["codes"]  # (N, hmax/8, wmax/8)
        f = self.bundle.spatial_factor
        return [codes[i, : p.shape[1] // f, : p.shape[2] // f] for i, p in enumerate(pixels)]

    def decode_image(self, tokens: np.ndarray, h: int, w: int) -> list[Image.Image]:
        """(N, >= h*(w+1)) generated ids of same-size images -> PIL images (VQ decoder + postprocess)."""
        grid = tokens[:, : h * (w + 1)].reshape(-1, h, w + 1)[:, :, :w]
        codes = self._id_to_code[grid]
        if (codes < 0).any():
            raise GenerationError("a generated image holds non-visual tokens inside its grid")
        pixels = self.engines["vq_decoder"].run({"codes": codes})["pixel_values"]
        return imaging.postprocess(pixels, self.image_config)

    def _picker(self, sampling: SamplingOptions, cfg_scale: float, grid: VisualGridConstraint | None,
                seed: int | None, rows: int, route: Route | None = None):
        """The step's sampling chain (CFG -> grid -> temperature -> top-k -> top-p -> selector), with the seed used
        and the per-row seeds: run by the route's sampler graph when it has one (a GraphSampler, which Decoding
        chains onto the step: only the chosen ids leave the engine), else by numpy (a ChainPicker). Both give the
        same ids (tests/test_sampler_graph.py, tests/test_engine_state.py). Route: chat's by default."""
        route = route or self.route("chat")
        select, seed, seeds = seeded(sampling, seed, rows)
        params = dict(cfg_scale=cfg_scale, grid=grid, temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p, greedy=sampling.greedy)
        plain_greedy = sampling.greedy and grid is None and not guided(cfg_scale)
        if route.sampler is not None and not (plain_greedy and self.host_argmax):
            rngs = None if sampling.greedy else select.rngs
            return GraphSampler(route.sampler, **params, rng=rngs), seed, seeds
        return ChainPicker(build_chain(**params), select), seed, seeds

    def _decoding(self, route: Route, batch: Batch, pick, max_new_tokens: int, streams: int,
                  grid: VisualGridConstraint | None = None) -> Decoding:
        opts = LoopOptions(max_new_tokens=max_new_tokens, eos_id=self.bundle.tokens.eos,
                           pad_id=self.bundle.tokens.pad, prefill_chunk=self.prefill_chunk,
                           streams=streams, logit_ids=route.logit_ids, grid=grid)
        # the step engine's own decode state (engines/state.py: device buffers on GPU engines, host memory on the
        # CPU). An image's length is exact (the prompt, then its grid's tokens): the hint lets a device state
        # allocate it whole now and never grow (host states grow: state.py says why); a reply's length is not
        # known (EOS), so chat's state grows as it goes.
        hint = batch.ids.shape[1] + max_new_tokens if grid is not None else 0
        state = route.step.new_state(KVLayout.from_bundle(self.bundle), batch.rows, capacity_hint=hint)
        return Decoding(route.step, state, batch, pick, opts)

    # ---- chat ----

    def start_chat(self, prompts: str | Sequence[str], images: Sequence | None = None, *, system: str | None = None,
                   raw: bool = False, max_new_tokens: int | None = None, sampling: SamplingOptions | None = None,
                   seed: int | Sequence[int] | None = None, allow_special_tokens: bool = False,
                   history: Sequence | None = None) -> ChatGeneration:
        """Check the arguments, encode the images and prompts, and return the generation ready to step (see
        generation.py); `chat` runs it to the end. Arguments as `chat`."""
        prompts = as_prompts(prompts)
        per_prompt = image_lists(images, len(prompts))
        histories = history_lists(history, len(prompts))
        for ims, turns in zip(per_prompt, histories):
            if sum(t.images for t in turns) > len(ims):
                raise PromptError(f"the earlier turns hold {sum(t.images for t in turns)} image(s) but "
                                  f"{len(ims)} were given")
        system, raw = as_text("system", system), as_flag("raw", raw)
        allow_special_tokens = as_flag("allow_special_tokens", allow_special_tokens)
        sampling, seed = sampling_options(sampling, self.bundle), as_seed(seed, len(prompts))
        max_new = self.bundle.search["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        max_new = as_int("max_new_tokens", max_new, 1)
        if self.bundle.logit_ids is not None:
            raise ValueError("this bundle was exported with --head visual: it generates images only, not text")
        # lengths, then image counts: nothing is tokenized or read for what cannot fit
        for text, turns in zip(prompts, histories):
            self.prompts.check_length(text, system or "", *(t.text for t in turns),
                                      name="the conversation" if turns else "the prompt")
        for ims in per_prompt:
            if len(ims) > self.max_images:
                self.check_images(ims)
        sources = [x for ims in per_prompt for x in ims]
        names = [os.fsdecode(x) if isinstance(x, (str, os.PathLike)) else f"image {k + 1}" for k, x in
                 enumerate(sources)]
        per_prompt = [[open_image(x) for x in ims] for ims in per_prompt]  # paths -> ImageFiles: headers only
        for ims in per_prompt:
            self.check_images(ims)
        codes = self.encode_images([im for ims in per_prompt for im in ims], names)
        ids, k = [], 0
        for text, ims, turns in zip(prompts, per_prompt, histories):
            prompt = self.prompts.chat_fragments(text, len(ims) - sum(t.images for t in turns), system=system,
                                                 raw=raw, allow_special_tokens=allow_special_tokens, history=turns)
            ids.append(self.prompts.encode_chat(prompt, codes[k: k + len(ims)], allow_special_tokens))
            k += len(ims)
        longest = max(map(len, ids))
        room = self.bundle.context_length - longest
        if room < 1:
            if any(histories):
                raise PromptError(f"the conversation is {longest} tokens (images included); the model's context "
                                  f"is {self.bundle.context_length}: drop earlier turns")
            raise PromptError(f"the prompt is {longest} tokens; the model's context is {self.bundle.context_length}")
        route = self.route("chat")
        pick, seed, seeds = self._picker(sampling, 1.0, None, seed, len(prompts), route)
        decoding = self._decoding(route, make_batch(ids, None, self.bundle.tokens.pad), pick, min(max_new, room), 1)
        return ChatGeneration(self.prompts, self.bundle.tokens.eos, decoding, ids, seed, seeds)

    def chat(self, prompts: str | Sequence[str], images: Sequence | None = None, *, system: str | None = None,
             raw: bool = False, max_new_tokens: int | None = None, sampling: SamplingOptions | None = None,
             seed: int | Sequence[int] | None = None, on_token: Callable[[int, np.ndarray], None] | None = None,
             on_text: Callable[[int, str], None] | None = None, allow_special_tokens: bool = False,
             history: Sequence | None = None, on_start: Callable[[], None] | None = None) -> ChatResult:
        """Answer one prompt or a batch. `images`: for one prompt a list of images; for a batch, a list per prompt.
        An image is a PIL image or a file path (str / os.PathLike, read with `load_image`).

        raw=False renders the bundle's chat template (system, then USER: images + text, then ASSISTANT:);
        raw=True uses the text as is, with one `<image>` placeholder per image. on_text(row, delta) streams text.
        Special-token strings typed in prompts or the system message stay literal text (`<image>` excepted);
        allow_special_tokens=True turns them into control ids, as Transformers' processor does.
        seed: one int (row i draws from seed + i) or one per prompt.
        history: the earlier turns of a conversation (emu3_rt.Turn: role, text, how many images), rendered by the
        chat template before the prompt; for a batch, one list per prompt. `images` then holds every image of the
        conversation in message order: the earlier turns' first, then the prompt's.
        on_start() runs once every argument is checked and the inputs are encoded, before the first step (the CLI
        prints a drawn seed there).
        """
        on_token, on_text = as_callback("on_token", on_token), as_callback("on_text", on_text)
        on_start = as_callback("on_start", on_start)
        gen = self.start_chat(prompts, images, system=system, raw=raw, max_new_tokens=max_new_tokens,
                              sampling=sampling, seed=seed, allow_special_tokens=allow_special_tokens,
                              history=history)
        with closing(gen):
            if on_start:
                on_start()
            while (ids := gen.step()) is not None:
                for row, delta in enumerate(gen.text_deltas() if on_text else ()):
                    if delta:
                        on_text(row, delta)
                if on_token:
                    on_token(gen.steps - 1, ids)
            return gen.result()

    # ---- text to image ----

    def start_image(self, prompts: str | Sequence[str], *, negative_prompt: str | None = None,
                    cfg_scale: float | None = None, ratio: str | Sequence[str] | None = None,
                    image_area: int | Sequence[int] | None = None, sampling: SamplingOptions | None = None,
                    seed: int | Sequence[int] | None = None, allow_special_tokens: bool = False) -> ImageGeneration:
        """Check the arguments, encode the prompts, and return the generation ready to step (see generation.py);
        `generate_image` runs it to the end. Arguments as `generate_image`."""
        prompts = as_prompts(prompts)
        negative_prompt = as_text("negative_prompt", negative_prompt)
        cfg_scale = None if cfg_scale is None else as_real("cfg_scale", cfg_scale, 0)
        if ratio is not None and not as_texts("ratio", ratio):
            raise ValueError("ratio must be a \"W:H\" string or a non-empty sequence of them, got an empty one")
        areas = _per_prompt("image_area", image_area, len(prompts))
        sampling, seed = sampling_options(sampling, self.bundle), as_seed(seed, len(prompts))
        allow_special_tokens = as_flag("allow_special_tokens", allow_special_tokens)
        s = self.bundle.search
        cfg = s["cfg_scale"] if cfg_scale is None else cfg_scale
        if not (math.isfinite(cfg) and cfg >= 0):
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
        ratios = _as_list(ratio or s["ratio"])
        if len(ratios) == 1:
            ratios *= len(prompts)
        if len(ratios) != len(prompts):
            raise PromptError(f"{len(prompts)} prompts but {len(ratios)} ratios")
        areas = [self.check_image_area(a) for a in areas or [s["image_area"]] * len(prompts)]
        grids = [calculate_generate_size(r, a, self.bundle.spatial_factor) for r, a in zip(ratios, areas)]
        if min(w for _, w in grids) < 3:
            # Emu3's rule tests "end of row" first, so with w + 1 = 2 or 3 the EOI or EOS slot becomes an EOL
            raise PromptError(f"a {grids[0][0]}x{min(w for _, w in grids)} grid is too narrow: Emu3's layout "
                              f"needs at least 3 tokens per row (a larger image_area, or another ratio)")
        use_cfg = guided(cfg)
        if negative_prompt is not None and not use_cfg:
            # without guidance the negative prompt would be silently ignored
            raise ValueError("negative_prompt needs classifier-free guidance: cfg_scale is 1, so it would be ignored")
        negative = (negative_prompt if negative_prompt is not None else s["negative_prompt"]) if use_cfg else None

        for text in prompts:
            self.prompts.check_length(text)
        if negative is not None:
            self.prompts.check_length(negative, name="the negative prompt")
        encode = lambda text, h, w: self.prompts.encode_image_prompt(text, h, w, allow_special_tokens)  # noqa: E731
        cond = [encode(p, h, w) for p, (h, w) in zip(prompts, grids)]
        uncond = [encode(negative, h, w) for h, w in grids] if use_cfg else None
        needs = [len(c) + h * (w + 1) + 3 for c, (h, w) in zip(cond + (uncond or []), grids * 2)]
        if max(needs) > self.bundle.context_length:
            raise self._too_large(needs, [len(c) for c in cond + (uncond or [])], ratios * 2, areas * 2, grids * 2)
        n_new = max(h * (w + 1) + 3 for h, w in grids)
        t, route = self.bundle.tokens, self.route("image")
        col = lambda ids: self._column(route, ids)  # noqa: E731 - token id -> logits column of the image route
        grid = VisualGridConstraint(
            heights=np.array([h for h, _ in grids]), widths=np.array([w for _, w in grids]),
            visual_ids=col(np.sort(self.bundle.visual_ids)), eol=col(t.eol), eof=col(t.eof), eoi=col(t.eoi),
            eos=col(t.eos), pad=col(t.pad), vocab_size=route.columns)
        pick, seed, seeds = self._picker(sampling, cfg, grid, seed, len(prompts), route)
        decoding = self._decoding(route, make_batch(cond, uncond, self.bundle.tokens.pad), pick, n_new,
                                  2 if use_cfg else 1, grid)
        return ImageGeneration(self, decoding, cond, grids, seed, seeds, negative, cfg)

    def _too_large(self, needs, lengths, ratios, areas, grids) -> PromptError:
        """The context error of the row that needs the most positions, in pixels: what it asked for, and the
        largest image area at its ratio that fits beside its prompt."""
        k, context, sf = int(np.argmax(needs)), self.bundle.context_length, self.bundle.spatial_factor
        (h, w), ratio = grids[k], ratios[k]
        fits, (fh, fw) = largest_image_area(ratio, context - lengths[k], sf, areas[k])
        room = (f"at ratio {ratio} an image_area of at most {fits} pixels fits ({fw * sf}x{fh * sf} pixels)"
                if fits and fw >= 3 else "the prompt leaves no room for an image at this ratio")
        return PromptError(f"prompt plus a {w * sf}x{h * sf}-pixel image ({h}x{w} tokens) needs {needs[k]} "
                           f"positions; the model's context is {context}: {room}")

    def generate_image(self, prompts: str | Sequence[str], *, negative_prompt: str | None = None,
                       cfg_scale: float | None = None, ratio: str | Sequence[str] | None = None,
                       image_area: int | Sequence[int] | None = None, sampling: SamplingOptions | None = None,
                       seed: int | Sequence[int] | None = None,
                       on_token: Callable[[int, np.ndarray], None] | None = None,
                       on_preview: Callable[[int, int, Image.Image], None] | None = None,
                       preview_every: int = 0, allow_special_tokens: bool = False,
                       on_start: Callable[[], None] | None = None) -> ImageResult:
        """Draw one image per prompt. Under CFG (cfg_scale != 1) the negative prompt defaults to the bundle's.

        ratio is "W:H" and image_area in pixels, each one for all prompts or one per prompt (a batch may mix
        sizes: every row keeps its own grid). on_preview(row,
        rows_done, image) gets the partial image every `preview_every` grid rows (ungenerated rows grey).
        Special-token strings in the prompts stay literal text unless allow_special_tokens=True (Transformers' way).
        seed: one int (image i draws from seed + i) or one per prompt. on_start() as in `chat`.
        """
        on_token, on_preview = as_callback("on_token", on_token), as_callback("on_preview", on_preview)
        on_start = as_callback("on_start", on_start)
        preview_every = as_int("preview_every", preview_every, 0)
        gen = self.start_image(prompts, negative_prompt=negative_prompt, cfg_scale=cfg_scale, ratio=ratio,
                               image_area=image_area, sampling=sampling, seed=seed,
                               allow_special_tokens=allow_special_tokens)
        shown = [0] * gen.rows
        with closing(gen):
            if on_start:
                on_start()
            while (ids := gen.step()) is not None:
                for i, rows in enumerate(gen.rows_done() if on_preview and preview_every else ()):
                    if rows > shown[i] and (rows % preview_every == 0 or rows == gen.grids[i][0]):
                        shown[i] = rows
                        on_preview(i, rows, gen.preview(i))
                if on_token:
                    on_token(gen.steps - 1, ids)
            return gen.result()


def load(bundle_dir: str | Path | None = None, *, engine: str = "ort", device: str = "cpu", threads: int = 0,
         verify: bool = False, device_id: int = 0, prefill_chunk: int | None = None,
         sampler: str | None = None, warm: Sequence[str] = (), prepack: bool = True) -> Emu3:
    """Load a bundle (default: the embedded tiny one).

    engine "ort": onnxruntime on `device` "cpu", "cuda" or "tensorrt" (its TensorRT execution provider);
    engine "trt": the bundle's own TensorRT plans (built by `python -m export.build_trt`), checked before use.
    Graph sessions are created lazily on first use: a `--head both` bundle's image step graph (and its sampler)
    decode images only, so a process that only chats never opens them (Emu3.route). Every file's sha256 is
    checked against bundle.json once per file version and remembered (emu3_rt.integrity); verify=True re-hashes
    everything (about 1 s per GB).
    sampler "graph": the bundle's sampler graph runs the sampling chain next to the step (only ids leave it);
    "numpy": the reference chain on the host; None: the graph when the bundle has one and the engine is "ort",
    except plain greedy (no CFG, no grid) on the CPU, which is numpy's argmax on the logits already on the host.
    warm: tasks ("chat", "image") whose graph sessions open in a background thread while the tokenizer is parsed
    (the CLI passes the command's task: a start-up cost paid in parallel instead of at the first step).
    prepack=False: the step graphs' weights stay in the mapped external data file instead of being copied into
    onnxruntime's packed layout when their sessions open (OrtOptions.prepack): a big bundle opens in a fraction of a
    second instead of ~3 s per GB, one-row decoding (one chat prompt) is as fast, steps of 2+ rows (CFG, batches)
    and prefill are slower. The CLI's chat with one prompt passes False.
    """
    # every argument is checked before the bundle is read
    if bundle_dir is not None and not isinstance(bundle_dir, (str, os.PathLike)):
        raise TypeError(f"bundle_dir must be a path (str or os.PathLike) or None, got {kind(bundle_dir)}")
    for name, value in (("engine", engine), ("device", device)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be str, got {kind(value)}")
    if engine not in ("ort", "trt"):
        raise ValueError(f"engine must be 'ort' or 'trt', got {engine!r}")
    if isinstance(warm, str) or not all(task in TASK_GRAPHS for task in warm):
        raise ValueError(f"warm must be a sequence of tasks from {sorted(TASK_GRAPHS)}, got {warm!r:.60}")
    if sampler not in (None, "graph", "numpy"):
        raise ValueError(f"sampler must be 'graph', 'numpy' or None, got {sampler!r:.40}")
    threads, verify, prepack = check_threads(threads), as_flag("verify", verify), as_flag("prepack", prepack)
    device_id = as_int("device_id", device_id, 0)
    prefill_chunk = None if prefill_chunk is None else as_int("prefill_chunk", prefill_chunk, 1)
    bundle = load_bundle(DEFAULT_BUNDLE if bundle_dir is None else bundle_dir, verify=verify)
    if sampler == "graph" and (bundle.sampler is None or engine != "ort"):
        raise ValueError("sampler='graph' needs a bundle exported with a sampler graph and engine 'ort'"
                         if bundle.sampler is None else "the sampler graph runs on engine 'ort' only (for now)")
    use_graph = sampler == "graph" or (sampler is None and bundle.sampler is not None and engine == "ort")
    keys = ("decoder", "vq_encoder", "vq_decoder") + (("sampler",) if use_graph else ())
    if bundle.image_decoder is not None:  # images decode with it (Emu3.route); its sessions open on first use
        keys += ("image_decoder",) + (("image_sampler",) if use_graph else ())
    if engine == "ort":
        opts = OrtOptions(device=device, threads=threads, device_id=device_id)
        # the small sampler graphs: one thread, no spinning (see OrtOptions.spinning)
        light = dataclasses.replace(opts, threads=1, spinning=False) if device == "cpu" else opts
        step = dataclasses.replace(opts, prepack=prepack)
        engines = {key: OrtEngine(getattr(bundle, key), light if key.endswith("sampler") else
                                  step if key in ("decoder", "image_decoder") else opts) for key in keys}
    else:
        from .engines.trt import TrtEngine, plan_for

        engines = {key: TrtEngine(getattr(bundle, key), plan_for(bundle, key, device_id), device_id) for key in keys}
    _open_in_background(engines, warm)
    return Emu3(bundle, engines, prefill_chunk, host_argmax=sampler is None and engine == "ort" and device == "cpu")


# graphs each task opens (an image falls back to the decoder and its sampler without an image head: Emu3.route)
TASK_GRAPHS = {"chat": ("decoder", "sampler"), "image": ("image_decoder", "image_sampler", "vq_decoder")}


def _open_in_background(engines: dict[str, Engine], tasks: Sequence[str]) -> None:
    """Open the sessions the tasks will run, one thread each: onnxruntime builds a session without the GIL, so
    they overlap the tokenizer's parse. That parse holds the GIL for its whole 0.3-0.5 s, so a thread still in
    Python when it starts waits for its end: this returns once every thread is on its way into onnxruntime (plus
    a few ms for the last Python lines). A failure is left for the first run, which opens the session again and
    raises as usual."""
    keys = [k for task in tasks for k in TASK_GRAPHS[task] if k in engines]
    if "image" in tasks and "image_decoder" not in engines:
        keys += [k for k in TASK_GRAPHS["chat"] if k in engines]

    def open_one(key: str, started: threading.Event):
        started.set()
        try:
            getattr(engines[key], "session", None)
        except Exception:  # noqa: BLE001 - reported by the first run instead (see above)
            pass

    events = []
    for key in dict.fromkeys(keys):
        events.append(threading.Event())
        # not a daemon: the interpreter waits for it at exit, as a process leaving while onnxruntime builds a
        # session in another thread aborts ("terminate called without an active exception", exit -6)
        threading.Thread(target=open_one, args=(key, events[-1]), name=f"emu3-rt-warm-{key}").start()
    if events:
        for started in events:
            started.wait(0.5)
        time.sleep(0.01)
