"""HTTP JSON <-> generation jobs: OpenAI-shaped request bodies checked and turned into `Job`s for the batcher
(batcher.py), and the response bodies and SSE frames built from their results. No Ray here.

    POST /v1/images/generations  {"prompt", "n", "size": "WxH" | "ratio" + "image_area", "seed", ...} -> PNGs
    POST /v1/chat/completions    {"messages": [system?, user], "max_tokens", "temperature", "seed", ...}

Checks name the JSON field in one line; numbers go through emu3_rt's own checks (argcheck, SamplingOptions), so
a bad value gets the library's message. Every error becomes {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from PIL import Image
from PIL.PngImagePlugin import PngInfo

import emu3_rt
from emu3_rt.argcheck import as_flag, as_int, as_real, as_seed, as_text, kind
from emu3_rt.options import random_seed

# size "WxH": each side at most this many pixels (the grid then comes from ratio W:H and area W*H)
MAX_SIDE = 16384
SSE_DONE = b"data: [DONE]\n\n"


class RequestError(ValueError):
    """A request body this service does not accept (HTTP 400); one line naming the field."""


class ModelNotFound(RequestError):
    """The request names a model this service does not serve (HTTP 404, as OpenAI answers)."""


@dataclass(eq=False)
class Job:
    """One request's rows as the batcher sees them. Jobs with the same `key` can share one generation: each row
    keeps its own seed, so a row's tokens are the same as when its request runs alone."""
    task: str                       # "image" or "chat"
    prompts: list[str]              # one per row
    seeds: list[int] | None         # one per row; None for greedy decoding
    per_row: dict[str, list]        # start_* arguments with one entry per row: "ratio", "image_area"; "images"
    options: dict                   # start_* keyword arguments shared by every row of a generation (hashable)
    stream: bool = False
    preview_every: int = 0          # image streams: a partial PNG every this many grid rows (0: none)
    include_usage: bool = False     # chat streams: a last chunk with token counts
    created: int = field(default_factory=lambda: int(time.time()))
    gone: bool = False              # the client left: its rows are not wanted any more

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> tuple:
        return (self.task, tuple(sorted(self.options.items())))


def model_id(model) -> str:
    return model.bundle.root.name


def _body(body, allowed: frozenset[str], model) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_kind(body)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unsupported field {unknown[0]!r}; accepted: {', '.join(sorted(allowed))}")
    name = body.get("model")
    if name is not None and name != model_id(model):
        raise ModelNotFound(f"model {name!r:.80} not found: this service serves {model_id(model)!r}")
    return body


def _json_kind(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _seeds(body: dict, rows: int, greedy: bool) -> list[int] | None:
    """One seed per row: `seed` is an int (row i draws from seed + i mod 2**32, as emu3-rt's batches do) or a list
    of n ints; none: a random one, reported back. None for greedy decoding."""
    seed = as_seed(body.get("seed"), rows)
    if greedy:
        return None
    if isinstance(seed, list):
        return seed
    seed = random_seed() if seed is None else seed
    return [(seed + i) % 2**32 for i in range(rows)]


# ---- images ----

IMAGE_FIELDS = frozenset({"model", "prompt", "n", "size", "ratio", "image_area", "seed", "negative_prompt",
                          "cfg_scale", "top_k", "temperature", "top_p", "response_format", "stream",
                          "preview_every", "user"})


def image_job(body, model, max_rows: int) -> Job:
    """POST /v1/images/generations body -> Job. `size` "WxH" is ratio W:H with area W*H (Emu3 draws the closest
    grid of its spatial factor); `ratio`/`image_area` give them directly; neither: the bundle's defaults."""
    b, s = _body(body, IMAGE_FIELDS, model), model.bundle.search
    if "prompt" not in b:
        raise RequestError("missing field 'prompt'")
    prompt = b["prompt"]
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be str, got {kind(prompt)}")
    n = as_int("n", b.get("n", 1), 1, max_rows)
    if b.get("response_format", "b64_json") != "b64_json":
        raise RequestError(f"response_format must be 'b64_json' (images come back in the response; this service "
                           f"hosts no URLs), got {b['response_format']!r:.40}")
    ratio, area = as_text("ratio", b.get("ratio")), b.get("image_area")
    if b.get("size") not in (None, "auto"):
        if ratio is not None or area is not None:
            raise RequestError("give size, or ratio and image_area, not both")
        ratio, area = _size(b["size"])
    sampling = emu3_rt.SamplingOptions.from_bundle(model.bundle, top_k=b.get("top_k"),
                                                   temperature=b.get("temperature"), top_p=b.get("top_p"))
    sampling.validate()
    cfg = b.get("cfg_scale")
    options = dict(negative_prompt=as_text("negative_prompt", b.get("negative_prompt")),
                   cfg_scale=as_real("cfg_scale", s["cfg_scale"] if cfg is None else cfg),
                   sampling=sampling)
    # ratio and area go per row: requests of different sizes share one generation (each row keeps its grid)
    area = as_int("image_area", s["image_area"] if area is None else area, 1)
    per_row = {"ratio": [ratio or s["ratio"]] * n, "image_area": [area] * n}
    return Job("image", [prompt] * n, _seeds(b, n, sampling.greedy), per_row, options,
               stream=as_flag("stream", b.get("stream", False)),
               preview_every=as_int("preview_every", b.get("preview_every", 0), 0))


def _size(size) -> tuple[str, int]:
    if not isinstance(size, str):
        raise TypeError(f"size must be str, got {kind(size)}")
    m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size)
    if not m or not all(1 <= int(x) <= MAX_SIDE for x in m.groups()):
        raise RequestError(f"size must look like WxH with sides of 1 to {MAX_SIDE} pixels, got {size!r:.40}")
    w, h = map(int, m.groups())
    return f"{w}:{h}", w * h


def png_base64(image: Image.Image, metadata: dict) -> str:
    """The PNG as emu3-rt writes it (text chunk "parameters" = all metadata as JSON, plus one chunk a key)."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return base64.b64encode(out.getvalue()).decode("ascii")


def image_item(job: Job, i: int, result, row: int, model) -> dict:
    """The job's image i (row `row` of the batched result) as one entry of the response's "data". The PNG records
    what the CLI records: running its prompt alone with its seed reproduces it."""
    image, seed = result.images[row], (job.seeds[i] if job.seeds else None)
    metadata = {"prompt": job.prompts[i], "negative_prompt": result.negative_prompt, "cfg_scale": result.cfg_scale,
                "seed": seed, "grid": list(result.grids[row]), "sampling": dataclasses.asdict(job.options["sampling"]),
                "bundle_sha256": model.bundle.sha256, "emu3_rt": emu3_rt.__version__}
    return {"b64_json": png_base64(image, metadata), "revised_prompt": None, "seed": seed,
            "size": f"{image.width}x{image.height}", "grid": list(result.grids[row])}


def image_response(job: Job, items: list[dict], model) -> dict:
    return {"created": job.created, "model": model_id(model), "output_format": "png", "data": items,
            "seeds": job.seeds}


# ---- chat ----

CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                         "top_k", "seed", "stream", "stream_options", "n", "user"})


def chat_job(body, model, max_rows: int) -> Job:
    """POST /v1/chat/completions body -> Job (images decoded here: call it off the event loop). One user message,
    after optional system messages; its images are data: URIs. temperature 0 means greedy, as OpenAI's API."""
    b = _body(body, CHAT_FIELDS, model)
    if "messages" not in b:
        raise RequestError("missing field 'messages'")
    system, text, images = _messages(b["messages"])
    n = as_int("n", b.get("n", 1), 1, max_rows)
    max_new = b.get("max_completion_tokens", b.get("max_tokens"))
    max_new = model.bundle.search["max_new_tokens"] if max_new is None else as_int("max_tokens", max_new, 1)
    temperature = b.get("temperature")
    greedy = temperature is not None and as_real("temperature", temperature) == 0
    sampling = emu3_rt.SamplingOptions.from_bundle(
        model.bundle, greedy=greedy or None, temperature=None if greedy else temperature, top_p=b.get("top_p"),
        top_k=b.get("top_k"))
    sampling.validate()
    stream = as_flag("stream", b.get("stream", False))
    usage = b.get("stream_options") or {}
    if not isinstance(usage, dict) or set(usage) - {"include_usage"} or (usage and not stream):
        raise RequestError("stream_options must be {\"include_usage\": true|false}, and only with stream: true")
    return Job("chat", [text] * n, _seeds(b, n, sampling.greedy), {"images": [images] * n},
               dict(system=system, max_new_tokens=max_new, sampling=sampling), stream=stream,
               include_usage=as_flag("stream_options.include_usage", usage.get("include_usage", False)))


def _messages(messages) -> tuple[str | None, str, list[Image.Image]]:
    """[system..., user] -> (system text or None, user text, user images). The model answers one user turn."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array")
    system, user = [], None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where} must be an object with a role")
        role = m["role"]
        if role in ("system", "developer") and user is None:
            system.append(_text_only(m.get("content"), where))
        elif role == "user" and user is None:
            user = _user_content(m.get("content"), where)
        else:
            raise RequestError(f"{where}: got role {role!r:.20} here, but this service answers one user message "
                               f"after optional system messages (multi-turn conversations are not supported)")
    if user is None:
        raise RequestError("messages hold no user message")
    return ("\n".join(system) if system else None), user[0], user[1]


def _text_only(content, where: str) -> str:
    text, images = _user_content(content, where)
    if images:
        raise RequestError(f"{where}: a system message cannot hold images")
    return text


def _user_content(content, where: str) -> tuple[str, list[Image.Image]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or an array of parts")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind_ = part.get("type") if isinstance(part, dict) else None
        if kind_ == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind_ == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(_data_uri_image(url, at))
        else:
            raise RequestError(f"{at} must be {{\"type\": \"text\", \"text\": ...}} or "
                               f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:...\"}}}}")
    return "\n".join(texts), images


def _data_uri_image(url, where: str) -> Image.Image:
    """data:image/...;base64,... -> a decoded PIL image (emu3_rt.load_image: size bound, bomb guard)."""
    m = re.fullmatch(r"data:([\w.+/-]*)((?:;[\w.+=-]+)*);base64,(.*)", url or "", re.DOTALL) \
        if isinstance(url, str) else None
    if not m:
        raise RequestError(f"{where}: image_url must be a data: URI with base64 content (the server fetches no "
                           f"URLs), got {str(url)[:40]!r}")
    try:
        data = base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the data: URI is not valid base64") from None
    return emu3_rt.load_image(data)


def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(tokens: list[int], model) -> str:
    return "stop" if tokens and tokens[-1] == model.bundle.tokens.eos else "length"


def usage(result, rows: range) -> dict:
    prompt = sum(len(result.prompt_ids[r]) for r in rows)
    completion = sum(len(result.tokens[r]) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def fingerprint(model) -> str:
    return f"emu3-rt-{model.bundle.sha256[:12]}"


def chat_response(job: Job, cid: str, result, rows: range, model) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": result.texts[r]}, "logprobs": None,
                "finish_reason": finish_reason(result.tokens[r], model)} for i, r in enumerate(rows)]
    return {"id": cid, "object": "chat.completion", "created": job.created, "model": model_id(model),
            "system_fingerprint": fingerprint(model), "choices": choices, "usage": usage(result, rows),
            "seeds": job.seeds}


def chat_chunk(job: Job, cid: str, model, choices: list[dict], **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": job.created, "model": model_id(model),
            "system_fingerprint": fingerprint(model), "choices": choices, **extra}


# ---- framing and errors ----

def sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def error_status(e: BaseException) -> int:
    """400 for what the request got wrong (emu3_rt's PromptError, ImageError, ValueError, TypeError), 404 for an
    unknown model, 500 for the rest (EngineError, GenerationError: the server's fault)."""
    if isinstance(e, ModelNotFound):
        return 404
    return 400 if isinstance(e, (ValueError, TypeError)) else 500


def error_body(e: BaseException) -> dict:
    status, text = error_status(e), str(e).strip().splitlines()
    return {"error": {"message": text[0] if text else type(e).__name__, "param": None,
                      "type": {400: "invalid_request_error", 404: "invalid_request_error"}.get(status, "server_error"),
                      "code": {404: "model_not_found"}.get(status, type(e).__name__)}}
