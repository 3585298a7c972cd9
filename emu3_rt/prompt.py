"""Prompts -> token ids, identical to Transformers' Emu3Processor (with the `tokenizers` library only).

Chat:           BOS + (rendered chat template | raw text), each `<image>` expanded to
                BOI "h*w" IMG, h rows of (w visual ids + EOL), EOF, EOI   (codes from the VQ encoder)
Text-to-image:  BOS + text + BOI "h*w" IMG                                 (the model draws the rest)
Batches are left-padded; `Batch` carries ids, mask and position ids (R, L) for the decoder step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from dataclasses import dataclass

import numpy as np

from . import chat_template
from .bundle import Bundle, BundleError
from .integrity import read_regular
from .tokenizer import MAX_NORMALIZED, load_tokenizer

IMAGE_PLACEHOLDER = "<image>"
# (text, from_user): a prompt in pieces, so special-token strings the user typed can be kept literal
Fragment = tuple[str, bool]


class PromptError(ValueError):
    """A prompt that cannot be built (image count mismatch, empty prompt, bad ratio). One line."""


@dataclass(frozen=True)
class Turn:
    """An earlier message of a chat, rendered by the bundle's chat template before the prompt: role "user" or
    "assistant", its text, and how many of the chat's images it holds (user turns only). A chat's images come in
    message order: the earlier turns' first, then the prompt's."""
    role: str
    text: str
    images: int = 0

    def __post_init__(self):
        if self.role not in ("user", "assistant"):
            raise PromptError(f"a chat turn's role must be 'user' or 'assistant', got {self.role!r:.40}")
        if not isinstance(self.text, str):
            raise TypeError(f"a chat turn's text must be str, got {type(self.text).__name__}")
        if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 0:
            raise TypeError(f"a chat turn's images must be an int >= 0 (how many images it holds), got "
                            f"{self.images!r:.40}")
        if self.role == "assistant" and self.images:
            raise PromptError("an assistant turn cannot hold images")


# ---- chat template ----

# Transformers' Jinja setup, sandboxed and bounded (time, sizes): see chat_template.py
compile_chat_template = chat_template.compile_chat_template


def calculate_generate_size(ratio: str, image_area: int, spatial_factor: int) -> tuple[int, int]:
    """`ratio` "W:H" and an area in pixels -> the (h, w) token grid, exactly as Emu3Processor computes it."""
    try:
        width, height = map(int, ratio.split(":"))
    except ValueError:
        raise PromptError(f"ratio must look like W:H with positive integers, got {ratio!r}") from None
    if width <= 0 or height <= 0:
        raise PromptError(f"ratio must look like W:H with positive integers, got {ratio!r}")
    target = (image_area / (width * height)) ** 0.5
    h, w = int(round(height * target / spatial_factor)), int(round(width * target / spatial_factor))
    if h < 1 or w < 1:
        raise PromptError(f"image area {image_area} at ratio {ratio} gives an empty {h}x{w} token grid")
    return h, w


def largest_image_area(ratio: str, room: int, spatial_factor: int, upto: int) -> tuple[int, tuple[int, int]]:
    """The largest image area (pixels, at most `upto`) at `ratio` whose token grid fits in `room` positions (an
    h x w grid takes h*(w+1)+3: rows with their EOL, then EOF, EOI, EOS), with that grid; (0, (0, 0)) if none."""
    def fits(area: int) -> bool:
        h, w = calculate_generate_size(ratio, area, spatial_factor)
        return h * (w + 1) + 3 <= room

    lo, hi = 0, upto            # the grid only grows with the area: bisect on it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            ok = fits(mid)
        except PromptError:     # an empty grid: smaller than one token
            ok = False
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return (lo, calculate_generate_size(ratio, lo, spatial_factor)) if lo else (0, (0, 0))


# ---- batches ----

@dataclass(frozen=True)
class Batch:
    ids: np.ndarray        # (R, L) int64, left-padded with pad ids
    mask: np.ndarray       # (R, L) int64, 0 on padding
    positions: np.ndarray  # (R, L) int64
    lengths: tuple[int, ...]  # unpadded length per row

    @property
    def rows(self) -> int:
        return self.ids.shape[0]


def left_pad(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, seqs)) if width is None else width
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = s
            mask[r, width - len(s):] = 1
    return ids, mask


def make_batch(cond: list[list[int]], uncond: list[list[int]] | None, pad_id: int) -> Batch:
    """Rows [cond..., uncond...] left-padded to one width, with the position ids Transformers would use.

    cond rows: generate's cumsum(mask) - 1.  uncond rows: Transformers runs the negative prompts as a separate
    left-padded batch with no position ids, so the model counts arange over *that* batch's padded width,
    padding included (emu3-reference 4.3); we reproduce those positions inside the wider shared batch.
    """
    rows = cond + (uncond or [])
    ids, mask = left_pad(rows, pad_id)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    if uncond:
        neg_width = max(map(len, uncond))
        offset = ids.shape[1] - neg_width
        positions[len(cond):] = np.maximum(np.arange(ids.shape[1]) - offset, 0)
    return Batch(ids, mask, positions.astype(np.int64), tuple(map(len, rows)))


# ---- the encoder ----

class PromptEncoder:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.tokens = bundle.tokens
        # checked against bundle.json (BundleError names the file), and its special ids
        # _max_tokenized: the longest text its vetted normalizers may be given (tokenizer.py's growth bound)
        self.tokenizer, self._specials, self._max_tokenized = load_tokenizer(bundle)
        self._template = None
        self._literal_tokenizer = None
        self._max_chars: int | None = None   # the context's bound (max_chars), computed on first use

    # text

    @property
    def max_chars(self) -> int:
        """The most characters a prompt can have and still fit the context: context_length tokens of at most the
        longest token's length each, x4 for a normalizer that composes characters (NFC joins at most 4 code points
        into one). A user character is at least one byte, and the vetted pre-tokenizers drop no text."""
        if self._max_chars is None:
            longest = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
            self._max_chars = self.bundle.context_length * max(longest, 1) * 4
        return self._max_chars

    def check_length(self, *texts: str, name: str = "the prompt") -> None:
        """Refuse, before it is tokenized, a prompt (the texts that go into it: message, system, earlier turns) too
        long for the context whatever its tokens: a 20 MB prompt would otherwise hold the tokenizer (and the GIL)
        for many seconds only to be refused after."""
        size = sum(map(len, texts))
        if size > self.max_chars:
            raise PromptError(f"{name} is {size} characters; the model's {self.bundle.context_length}-position "
                              f"context cannot hold more than {self.max_chars} (checked before tokenizing)")

    def encode_text(self, text: str) -> list[int]:
        """Trusted text (our own control strings included): special-token strings become their ids."""
        return self.tokenizer.encode(self._bounded(text), add_special_tokens=False).ids

    def _bounded(self, text: str) -> str:
        """`text`, if the tokenizer's normalizers can grow it only within the library's bound (tokenizer.py)."""
        if len(text) > self._max_tokenized:
            raise PromptError(f"the prompt has {len(text)} characters; this bundle's tokenizer.json can grow a "
                              f"text {MAX_NORMALIZED // self._max_tokenized}-fold while tokenizing, so at most "
                              f"{self._max_tokenized} are tokenized")
        return text

    def encode_fragments(self, fragments: list[Fragment], allow_special_tokens: bool = False) -> list[int]:
        """Ids of the concatenated fragments; a special-token string typed by the user stays literal text.

        The whole string is tokenized at once (Transformers' ids whenever the user typed no special string). A
        special token whose characters overlap user text is forged: then the string is re-tokenized with only the
        trusted specials as split points and every run between them encoded as plain text. `<image>` never
        reaches this point inside user text: it is the documented placeholder and was expanded before.
        """
        text = "".join(t for t, _ in fragments)
        enc = self.tokenizer.encode(self._bounded(text), add_special_tokens=False)
        if allow_special_tokens:
            return enc.ids
        user, at = [], 0
        for t, from_user in fragments:
            if from_user and t:
                user.append((at, at + len(t)))
            at += len(t)
        special = self._specials
        forged = lambda a, b: any(a < ue and us < b for us, ue in user)  # noqa: E731 - span overlap test
        trusted = [(i, a, b) for i, (a, b) in zip(enc.ids, enc.offsets) if i in special and not forged(a, b)]
        if len(trusted) == sum(i in special for i in enc.ids):
            return enc.ids
        ids, at = [], 0
        for i, a, b in trusted + [(None, len(text), len(text))]:
            if a > at:
                ids += self._literal().encode(text[at:a], add_special_tokens=False).ids
            if i is not None:
                ids.append(i)
            at = b
        return ids

    def _literal(self):
        """A second tokenizer that reads special-token strings as ordinary text (built on first forged prompt)."""
        if self._literal_tokenizer is None:
            from tokenizers import Tokenizer

            self._literal_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
            self._literal_tokenizer.encode_special_tokens = True
        return self._literal_tokenizer

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`processor.apply_chat_template(messages, add_generation_prompt=True)`, as a string."""
        import jinja2

        path = self.bundle.chat_template_path
        if self._template is None:
            data = read_regular(path, chat_template.MAX_SOURCE)
            # read on first use, maybe long after load_bundle checked it: the bytes used are the bytes listed
            if hashlib.sha256(data).hexdigest() != self.bundle.manifest["files"][path.name]["sha256"]:
                raise BundleError(f"{path}: changed since the bundle was loaded (sha256 no longer matches "
                                  f"bundle.json)")
            try:
                source = data.decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError(f"{path}: not UTF-8 text") from None
            if not source.strip():
                raise PromptError("this bundle has no chat template; pass the prompt as is (--raw-prompt)")
            try:
                self._template = chat_template.ChatTemplate(source)
            except jinja2.TemplateSyntaxError as e:
                raise BundleError(f"{path}: line {e.lineno}: {e.message}") from None
            except RecursionError:
                raise BundleError(f"{path}: nested too deeply to compile") from None
        t = self.tokens.text
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=t["bos"], eos_token=t["eos"], pad_token=t["pad"])
        except (chat_template.TemplateLimitError, jinja2.TemplateError, RecursionError, ArithmeticError,
                TypeError, ValueError, LookupError, AttributeError) as e:
            # the template's raise_exception, a limit, or a template bug meeting these messages: one line
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise PromptError(f"{path.name}: cannot render the chat ({reason})") from None

    # images inside a prompt

    def image_block(self, codes: np.ndarray) -> list[int]:
        """(h, w) codes -> the ids that replace one expanded `<image>`: visual ids with an EOL after each row."""
        h, w = codes.shape
        grid = np.empty((h, w + 1), dtype=np.int64)
        grid[:, :w] = self.bundle.visual_ids[codes]
        grid[:, w] = self.tokens.eol
        return grid.reshape(-1).tolist()

    def chat_fragments(self, text: str, n_images: int, *, system: str | None = None, raw: bool = False,
                       allow_special_tokens: bool = False, history: tuple[Turn, ...] = ()) -> list[Fragment]:
        """A chat prompt as (text, from_user) fragments: the bundle's template (system, the earlier turns of
        `history`, USER: images + text, ASSISTANT:) rendered around the caller's strings, or with raw=True the
        user's text as is (`<image>` marks images). n_images: the images of this prompt (history's turns count
        their own).

        The template is rendered with sentinels in place of the caller's strings (every turn's text: all of them
        came from the client), so we know which characters were typed; a template that transforms message text
        cannot be tracked and is refused.
        """
        if raw:
            if history:
                raise PromptError("earlier chat turns need the chat template; a raw prompt is the whole text")
            return [(text, True)]
        if allow_special_tokens:  # Transformers' behaviour: the rendered string is tokenized as a whole
            return [(self.render_chat(_chat_messages(text, n_images, system, history)), False)]
        nonce = secrets.token_hex(8)
        texts = [text, system, *(t.text for t in history)]
        user = {f"\ue000{nonce}:{k}\ue001": value for k, value in enumerate(texts)}
        marks = list(user)
        turns = tuple(dataclasses.replace(t, text=m) for t, m in zip(history, marks[2:]))
        rendered = self.render_chat(_chat_messages(marks[0], n_images, marks[1] if system else None, turns))
        pieces = re.split(f"(\ue000{nonce}:\\d+\ue001)", rendered)
        fragments = [(user[p], True) if p in user else (p, False) for p in pieces if p]
        seen = [p for p in pieces if p in user]
        expected = marks[:1] + marks[1:2] * bool(system) + marks[2:]
        if sorted(seen) != sorted(expected) or any("\ue000" in t for t, u in fragments if not u):
            raise PromptError("the bundle's chat template rewrites the message text, so user text cannot be kept "
                              "literal; pass allow_special_tokens=True (--allow-special-tokens) or a raw prompt")
        return fragments

    def encode_chat(self, prompt: str | list[Fragment], image_codes: list[np.ndarray],
                    allow_special_tokens: bool = False) -> list[int]:
        """BOS + the prompt with each `<image>` expanded, placeholders filled with the images' codes, in order.

        `prompt`: fragments from `chat_fragments`, or a str taken as user text (a raw prompt).
        """
        fragments = [(prompt, True)] if isinstance(prompt, str) else prompt
        n = sum(t.count(IMAGE_PLACEHOLDER) for t, _ in fragments)
        if n != len(image_codes):
            raise PromptError(f"the prompt has {n} <image> placeholder(s) but {len(image_codes)} image(s) were given")
        t = self.tokens.text
        expanded: list[Fragment] = [(t["bos"], False)]
        blocks = iter(image_codes)
        for text, from_user in fragments:
            parts = text.split(IMAGE_PLACEHOLDER)
            expanded.append((parts[0], from_user))
            for rest in parts[1:]:
                h, w = next(blocks).shape
                expanded += [(f"{t['boi']}{h}*{w}{t['image_wrapper']}" + IMAGE_PLACEHOLDER * (h * (w + 1))
                              + f"{t['eof']}{t['eoi']}", False), (rest, from_user)]
        ids = np.asarray(self.encode_fragments(expanded, allow_special_tokens), dtype=np.int64)
        slots = np.flatnonzero(ids == self.tokens.image)
        fill = [i for codes in image_codes for i in self.image_block(codes)]
        if len(slots) != len(fill):
            raise PromptError(f"the prompt text itself contains image placeholder ids ({len(slots)} slots for "
                              f"{len(fill)} image tokens)")
        ids[slots] = fill
        return ids.tolist()

    def encode_image_prompt(self, text: str, h: int, w: int, allow_special_tokens: bool = False) -> list[int]:
        """Text-to-image prompt: BOS + text + BOI "h*w" IMG (Emu3Processor, return_for_image_generation)."""
        t = self.tokens.text
        fragments = [(t["bos"], False), (text, True), (f"{t['boi']}{h}*{w}{t['image_wrapper']}", False)]
        return self.encode_fragments(fragments, allow_special_tokens)


def _chat_messages(text: str, n_images: int, system: str | None, history: tuple[Turn, ...] = ()) -> list[dict]:
    """An optional system message, the earlier turns, then the user's turn; each turn's images first, then its
    text, as Transformers' processor lays out messages."""
    def message(role: str, text: str, images: int) -> dict:
        return {"role": role, "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}

    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return messages + [message(t.role, t.text, t.images) for t in history] + [message("user", text, n_images)]
