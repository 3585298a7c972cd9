"""tokenizer.json -> a `tokenizers.Tokenizer` that agrees with bundle.json, or a BundleError naming the file.

Read as a bounded regular file; regex patterns limited to vetted ones; normalizers, pre-tokenizers, decoders and
post-processors vetted for how much they can grow a text; the library's Rust panics turned into BundleError;
every control token's text checked to be its id, and every visual id to be its code's token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math

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


# The library normalizes and pre-tokenizes a whole text in Rust, keeping two offsets per byte (a 1 MB prompt
# peaks at ~170 MB): a normalizer that multiplies the text (a Replace of " " by 100 KB) ran an 8,000-word prompt
# out of memory, and the allocation failure aborts the process. So every component's growth is bounded at load,
# from its settings (MAX_GROWTH: output characters per input character), and a text is tokenized only while its
# length times that growth stays under MAX_NORMALIZED (PromptError otherwise).
MAX_GROWTH = 256
MAX_NORMALIZED = 1 << 23
MAX_ADDED_IDS = 1024  # ids a post-processor may add to a sequence
# Unicode's bounds on normalization (UAX #15: NFC x3, NFD x4, NFKC/NFKD x18 code points); case mappings at most x3
_NORMALIZERS = {"NFC": 3, "NFD": 4, "NFKC": 18, "NFKD": 18, "Lowercase": 3, "Strip": 1, "StripAccents": 1,
                "Nmt": 1, "BertNormalizer": 9, "ByteLevel": 4}
# ByteLevel: a character of k UTF-8 bytes becomes k characters; Metaspace may add a "▁" before every split
_PRE_TOKENIZERS = {"ByteLevel": 4, "Metaspace": 2, "Split": 1, "Whitespace": 1, "WhitespaceSplit": 1,
                   "Punctuation": 1, "Digits": 1, "BertPreTokenizer": 1, "UnicodeScripts": 1,
                   "CharDelimiterSplit": 1, "FixedLength": 1}
_DECODERS = {"ByteLevel": 1, "WordPiece": 1, "Metaspace": 1, "BPEDecoder": 1, "CTC": 1, "ByteFallback": 1,
             "Fuse": 1, "Strip": 1}


def _replace_growth(node: dict) -> int:
    """A Replace's content per character it replaces: an empty pattern (or a regex that may match empty) inserts
    the content between characters."""
    pattern, content = node.get("pattern") or {}, node.get("content")
    if not isinstance(content, str):
        return math.inf
    if isinstance(pattern.get("String"), str) and pattern["String"]:
        return max(1, math.ceil(len(content) / len(pattern["String"])))
    return 1 + len(content)


def _precompiled_growth(node: dict) -> int:
    """SentencePiece's precompiled charsmap: a trie (u32 size, then the trie) and a pool of NUL-ended
    replacements; a character becomes at most the longest replacement."""
    try:
        blob = base64.b64decode(node.get("precompiled_charsmap") or "")
        if not blob:
            return 1
        pool = blob[4 + int.from_bytes(blob[:4], "little"):]
        return max([1] + [len(r.decode("utf-8", "replace")) for r in pool.split(b"\0")])
    except (ValueError, TypeError):
        return math.inf


def _growth(node, table: dict, what: str) -> float:
    """The most characters one input character can become through a component (a Sequence multiplies)."""
    kind = node.get("type") if isinstance(node, dict) else None
    if kind == "Sequence":
        parts = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return math.prod(_growth(p, table, what) for p in parts)
    if kind == "Replace":
        return _replace_growth(node)
    if kind == "Prepend" and what == "normalizer":
        return 1 + len(node.get("prepend") or "")
    if kind == "Precompiled" and what == "normalizer":
        return _precompiled_growth(node)
    if kind not in table:
        return math.inf
    return table[kind]


def _added_ids(node) -> float:
    """The most ids a post-processor adds to one sequence (or a pair)."""
    kind = node.get("type") if isinstance(node, dict) else None
    if kind == "Sequence":
        return sum(_added_ids(p) for p in node.get("processors") or [])
    if kind == "TemplateProcessing":
        specials = node.get("special_tokens") or {}
        added = 0
        for piece in (node.get("single") or []) + (node.get("pair") or []):
            token = piece.get("SpecialToken") if isinstance(piece, dict) else None
            if token is not None:
                added += len((specials.get(token.get("id")) or {}).get("ids") or [])
        return added
    return {"ByteLevel": 0, "BertProcessing": 3, "RobertaProcessing": 4}.get(kind, math.inf)


def _vet_growth(path, normalizer, pre_tokenizer, decoder, post_processor) -> int:
    """The text growth of normalizer x pre-tokenizer (each JSON or None), checked with the decoder's and the
    post-processor's against the limits; BundleError naming the component otherwise."""
    growths = {}
    for what, node, table in (("normalizer", normalizer, _NORMALIZERS), ("pre-tokenizer", pre_tokenizer,
                                                                          _PRE_TOKENIZERS),
                              ("decoder", decoder, _DECODERS)):
        growths[what] = 1 if node is None else _growth(node, table, what)
        if growths[what] > MAX_GROWTH:
            kind = node.get("type") if isinstance(node, dict) else node
            how = "an unknown amount" if math.isinf(growths[what]) else f"up to {growths[what]}-fold"
            raise BundleError(f"{path}: its {what} ({kind!s:.40}) can grow a text {how} (limit {MAX_GROWTH}; "
                              f"see emu3_rt/tokenizer.py)")
    text = growths["normalizer"] * growths["pre-tokenizer"]
    if text > MAX_GROWTH:
        raise BundleError(f"{path}: its normalizer and pre-tokenizer together can grow a text up to {text}-fold "
                          f"(limit {MAX_GROWTH})")
    added = 0 if post_processor is None else _added_ids(post_processor)
    if added > MAX_ADDED_IDS:
        how = "an unknown number of" if math.isinf(added) else f"{added}"
        raise BundleError(f"{path}: its post-processor adds {how} ids to a sequence (limit {MAX_ADDED_IDS})")
    return int(text)


def _regexes(node) -> list[str]:
    """Every {"Regex": pattern} in a component's JSON."""
    if isinstance(node, dict):
        found = [node["Regex"]] if isinstance(node.get("Regex"), str) else []
        return found + [p for v in node.values() for p in _regexes(v)]
    if isinstance(node, list):
        return [p for v in node for p in _regexes(v)]
    return []


def load_tokenizer(bundle: Bundle):
    """(the checked `tokenizers.Tokenizer`, the ids of its special added tokens: Emu3's control and visual ones,
    the longest text it may be given: MAX_NORMALIZED over its vetted growth)."""
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
    components = [None if c is None else json.loads(c.__getstate__()) for c in
                  (tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder, tokenizer.post_processor)]
    for component in components[:3]:
        for p in _regexes(component) if component is not None else []:
            if p not in VETTED_REGEXES:
                raise BundleError(f"{path}: regex {p!r:.80} is not a vetted pre-tokenizer pattern (a "
                                  f"backtracking regex can hang on a short prompt; see emu3_rt/tokenizer.py)")
    max_chars = MAX_NORMALIZED // _vet_growth(path, *components)
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
        return tokenizer, specials, max_chars
    return tokenizer, frozenset(i for lo, hi in facts["special_runs"] for i in range(lo, hi)), max_chars


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
