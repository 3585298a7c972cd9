"""tokenizer.json -> a `tokenizers.Tokenizer` that agrees with bundle.json, or a BundleError naming the file.

Read as a bounded regular file; regex patterns limited to vetted ones; the library's Rust panics turned into
BundleError; every control token's text checked to be its id, and every visual id to be its code's token.
"""

from __future__ import annotations

import hashlib
import json

from .bundle import Bundle, BundleError
from .integrity import cache_dir, load_cached_json, read_regular, save_cached_json

MAX_TOKENIZER = 64 << 20  # Emu3's is about 10 MB

# The tokenizers library runs `Regex` patterns (Split pre-tokenizers, Replace normalizers/decoders) with
# Oniguruma, a backtracking engine: a crafted pattern can take exponential time on a short prompt. No timeout is
# possible inside the library, so only these well-known patterns may appear (GPT-2's; cl100k's and QWen's, the
# latter Emu3's own vocabulary; the digit-per-token variant Emu3 uses). The -hf Emu3 tokenizer uses none: its
# ByteLevel pre-tokenizer carries GPT-2's pattern built in.
VETTED_REGEXES = frozenset({
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+",
})


def _regexes(node) -> list[str]:
    """Every {"Regex": pattern} in a component's JSON."""
    if isinstance(node, dict):
        found = [node["Regex"]] if isinstance(node.get("Regex"), str) else []
        return found + [p for v in node.values() for p in _regexes(v)]
    if isinstance(node, list):
        return [p for v in node for p in _regexes(v)]
    return []


def load_tokenizer(bundle: Bundle):
    """(the checked `tokenizers.Tokenizer`, the ids of its special added tokens: Emu3's control and visual ones)."""
    path = bundle.tokenizer_path
    data = read_regular(path, MAX_TOKENIZER)
    try:
        return _load(bundle, data)
    except BundleError:
        raise
    except BaseException as e:
        # pyo3's PanicException (a Rust panic on a malformed file) derives from BaseException, not Exception
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise BundleError(f"{path}: the tokenizers library cannot load it ({reason})") from None


def _load(bundle: Bundle, data: bytes):
    from tokenizers import Tokenizer

    path = bundle.tokenizer_path
    tokenizer = Tokenizer.from_buffer(data)   # the bytes as they are: no 20 ms str decode of Emu3's 16.8 MB
    for component in (tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder):
        for p in _regexes(json.loads(component.__getstate__())) if component is not None else []:
            if p not in VETTED_REGEXES:
                raise BundleError(f"{path}: regex {p!r:.80} is not a vetted pre-tokenizer pattern (a "
                                  f"backtracking regex can hang on a short prompt; see emu3_rt/tokenizer.py)")
    # Transformers' processor never pads or truncates from tokenizer.json (it passes its own settings), and the
    # library panics on some truncation settings (stride >= max_length) at encode time
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # the id checks read the whole vocabulary (0.15 s on Emu3's): their verdict is a function of bundle.json
    # (which holds the tokenizer's sha256, checked at load) and of the library's version, so it is remembered,
    # with the special ids, whose listing costs 26 ms more
    facts = _remembered(bundle)
    if facts is None:
        _check_ids(tokenizer, bundle)
        specials = _special_set(tokenizer)
        _remember(bundle, {"special_runs": _runs(specials)})
        return tokenizer, specials
    return tokenizer, frozenset(i for lo, hi in facts["special_runs"] for i in range(lo, hi))


def _special_set(tokenizer) -> frozenset[int]:
    return frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def _runs(ids) -> list[list[int]]:
    """Sorted ids as [first, last + 1) runs: Emu3's 33k special ids are a handful."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


# bump when _check_ids checks more or the remembered facts change
_CHECKS = 2


def _verdict_path(bundle: Bundle):
    import tokenizers

    key = f"{bundle.sha256}:{tokenizers.__version__}:{_CHECKS}"
    return cache_dir() / "checked" / hashlib.sha256(key.encode()).hexdigest()[:32]


def _remembered(bundle: Bundle) -> dict | None:
    """The facts stored after this bundle's tokenizer passed the id checks, or None (never checked, unreadable,
    or malformed: then everything is checked again)."""
    facts = load_cached_json(_verdict_path(bundle))
    try:
        runs = facts["special_runs"]
        if all(isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= bundle.vocab_size for lo, hi in runs):
            return facts
    except (ValueError, TypeError, KeyError):   # None, not a dict, or runs that are not [lo, hi] pairs
        pass
    return None


def _remember(bundle: Bundle, facts: dict) -> None:
    save_cached_json(_verdict_path(bundle), facts)


def _check_ids(tokenizer, bundle: Bundle) -> None:
    path, vocab = bundle.tokenizer_path, bundle.vocab_size
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= vocab:
        raise BundleError(f"{path}: has id {largest}, outside model.vocab_size {vocab}")
    for role, text in bundle.tokens.text.items():
        want = getattr(bundle.tokens, role)
        got = tokenizer.token_to_id(text)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if got != want or ids != [want]:
            raise BundleError(f"{path}: emu3.tokens.{role} {text!r} is {got} (tokenized as {ids[:4]}) in the "
                              f"tokenizer, bundle.json says {want}")
    # code k -> the id of "<|visual token {k:06d}|>", as Transformers' Emu3ImageVocabularyMapping reads the vocab
    for code, tid in enumerate(bundle.visual_ids.tolist()):
        if tokenizer.id_to_token(tid) != f"<|visual token {code:06d}|>":
            raise BundleError(f"{path}: id {tid} is {tokenizer.id_to_token(tid)!r}, but emu3.visual_token_runs maps "
                              f"code {code} to it")
