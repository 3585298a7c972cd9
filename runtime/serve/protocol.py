"""HTTP JSON <-> generation jobs: OpenAI-shaped request bodies checked and turned into `Job`s for the batcher
(batcher.py), and the response bodies and SSE frames built from their results. No Ray here.

    POST /v1/images/generations  {"prompt", "n", "size": "WxH" | "ratio" + "image_area", "seed", ...} -> PNGs
    POST /v1/chat/completions    {"messages": [system?, user, assistant, ..., user], "max_tokens", "seed", ...}

Checks name the JSON field in one line; numbers go through emu3_rt's own checks (argcheck, SamplingOptions), so
a bad value gets the library's message. Every error becomes {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from PIL import Image
from PIL.PngImagePlugin import PngInfo

import emu3_rt
from emu3_rt.argcheck import as_flag, as_int, as_real, as_seed, as_text, kind
from emu3_rt.image import ImageFile, read_image
from emu3_rt.options import random_seed
from emu3_rt.scheduler import Full

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
    partial_images: int = 0         # image streams: this many partial PNGs, evenly spaced (OpenAI's partial_images)
    include_usage: bool = False     # chat streams: a last chunk with token counts
    created: int = field(default_factory=lambda: int(time.time()))
    gone: bool = False              # the client left: its rows are not wanted any more

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> tuple:
        return (self.task, tuple(sorted(self.options.items())))

    def preview_at(self, rows_done: int, height: int) -> bool:
        """Whether the stream gets a partial image once rows_done of an image's height grid rows are done:
        with partial_images, at evenly spaced rows before the last (fewer on short grids: the final image is the
        completed event), as OpenAI sends them; with preview_every, every that many rows and at the last one."""
        if self.partial_images:
            n = self.partial_images
            return rows_done < height and rows_done in {-(-height * k // (n + 1)) for k in range(1, n + 1)}
        return bool(self.preview_every) and (rows_done % self.preview_every == 0 or rows_done == height)


def parse_request(body: bytes | bytearray, parse, model, max_rows: int) -> Job:
    """A request body -> its Job through parse (image_job, chat_job). Whatever the client's data makes go wrong
    here is the client's error (400): nesting past the parser's recursion limit (RecursionError), a number past
    what a computation holds (ArithmeticError), besides the checks' own ValueError / TypeError."""
    try:
        return parse(parse_json(body), model, max_rows)
    except RecursionError:
        raise RequestError("the request body nests too deeply") from None
    except ArithmeticError as e:
        raise RequestError(f"a number in the request is out of range ({e})") from None


def parse_json(body: bytes | bytearray):
    """JSON text -> value; NaN, Infinity and numbers past float range (1e400) are refused, not read as nan / inf."""
    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise RequestError(f"the request body holds the number {text[:40]}, which is out of float range")
        return value

    def constant(name: str):
        raise RequestError(f"the request body is not valid JSON ({name} is not a JSON value)")

    try:
        return json.loads(body, parse_float=finite, parse_constant=constant)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, an int of over 4300 digits, not UTF-8
        raise RequestError(f"the request body is not valid JSON ({str(e).splitlines()[0][:200]})") from None


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


def _sampling(b: dict, model) -> emu3_rt.SamplingOptions:
    """The body's sampling fields: OpenAI's range for temperature, [0, 2], where 0 is greedy decoding (read so by
    SamplingOptions.from_bundle, as the CLI's --temperature 0); then emu3_rt's checks (top_k >= 1, top_p in (0, 1])."""
    t = b.get("temperature")
    if t is not None and not 0 <= as_real("temperature", t) <= 2:
        raise RequestError(f"temperature must be in [0, 2] (0: greedy decoding), got {t!r:.40}")
    sampling = emu3_rt.SamplingOptions.from_bundle(model.bundle, temperature=t, top_k=b.get("top_k"),
                                                   top_p=b.get("top_p"))
    sampling.validate()
    return sampling


# ---- images ----

IMAGE_FIELDS = frozenset({"model", "prompt", "n", "size", "ratio", "image_area", "seed", "negative_prompt",
                          "cfg_scale", "top_k", "temperature", "top_p", "response_format", "stream",
                          "partial_images", "preview_every", "output_format", "user"})
MAX_PARTIAL_IMAGES = 3   # OpenAI's bound


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
    if b.get("output_format", "png") != "png":
        raise RequestError(f"output_format must be 'png' (the PNG carries the generation's metadata), got "
                           f"{b['output_format']!r:.40}")
    stream = as_flag("stream", b.get("stream", False))
    partial = as_int("partial_images", b.get("partial_images", 0), 0, MAX_PARTIAL_IMAGES)
    every = as_int("preview_every", b.get("preview_every", 0), 0)
    if (partial or every) and not stream:
        raise RequestError("partial_images and preview_every need stream: true")
    if partial and every:
        raise RequestError("give partial_images or preview_every, not both")
    ratio, area = as_text("ratio", b.get("ratio")), b.get("image_area")
    if b.get("size") not in (None, "auto"):
        if ratio is not None or area is not None:
            raise RequestError("give size, or ratio and image_area, not both")
        ratio, area = _size(b["size"])
    sampling = _sampling(b, model)
    cfg = b.get("cfg_scale")
    options = dict(negative_prompt=as_text("negative_prompt", b.get("negative_prompt")),
                   cfg_scale=as_real("cfg_scale", s["cfg_scale"] if cfg is None else cfg, 0),
                   sampling=sampling)
    # ratio and area go per row: requests of different sizes share one generation (each row keeps its grid)
    area = model.check_image_area(s["image_area"] if area is None else area)
    per_row = {"ratio": [ratio or s["ratio"]] * n, "image_area": [area] * n}
    return Job("image", [prompt] * n, _seeds(b, n, sampling.greedy), per_row, options, stream=stream,
               preview_every=every, partial_images=partial)


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


def image_usage(result, row: int) -> dict:
    """OpenAI's image usage: the prompt's tokens in, the image's tokens (grid rows with their EOLs, EOF, EOI, EOS)
    out."""
    prompt, out = len(result.prompt_ids[row]), len(result.tokens[row])
    return {"input_tokens": prompt, "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0},
            "output_tokens": out, "total_tokens": prompt + out}


def image_event(kind_: str, i: int, size: str, b64: str, **extra) -> dict:
    """One event of an image stream, with the fields of OpenAI's image_generation.partial_image / .completed
    (which the openai package's ImageGenStreamEvent reads), plus image_index: which of the request's n images."""
    return {"type": f"image_generation.{kind_}", "image_index": i, "b64_json": b64, "created_at": int(time.time()),
            "output_format": "png", "size": size, "quality": "auto", "background": "opaque", **extra}


def image_response(job: Job, items: list[dict], model) -> dict:
    return {"created": job.created, "model": model_id(model), "output_format": "png", "data": items,
            "seeds": job.seeds}


# ---- chat ----

CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                         "top_k", "seed", "stream", "stream_options", "n", "user"})


def chat_job(body, model, max_rows: int) -> Job:
    """POST /v1/chat/completions body -> Job (images' headers read here, decoded when it starts). Optional system
    messages, then the conversation (user and assistant turns, rendered by the bundle's chat template), ending
    with the user message the model answers; images are data: URIs in user messages."""
    b = _body(body, CHAT_FIELDS, model)
    if "messages" not in b:
        raise RequestError("missing field 'messages'")
    system, text, images, history = _messages(b["messages"])
    model.check_images(images)   # count (from the context) and decoded pixels (from the headers): nothing decoded
    n = as_int("n", b.get("n", 1), 1, max_rows)
    max_new = b.get("max_completion_tokens", b.get("max_tokens"))
    max_new = model.bundle.search["max_new_tokens"] if max_new is None else as_int("max_tokens", max_new, 1)
    sampling = _sampling(b, model)
    stream = as_flag("stream", b.get("stream", False))
    usage = b.get("stream_options") or {}
    if not isinstance(usage, dict) or set(usage) - {"include_usage"} or (usage and not stream):
        raise RequestError("stream_options must be {\"include_usage\": true|false}, and only with stream: true")
    return Job("chat", [text] * n, _seeds(b, n, sampling.greedy), {"images": [images] * n, "history": [history] * n},
               dict(system=system, max_new_tokens=max_new, sampling=sampling), stream=stream,
               include_usage=as_flag("stream_options.include_usage", usage.get("include_usage", False)))


def _messages(messages) -> tuple[str | None, str, list[ImageFile], tuple[emu3_rt.Turn, ...]]:
    """[system..., (user | assistant)..., user] -> (system text or None, the last user message's text, every
    image of the conversation in message order, the earlier turns as emu3_rt.Turn)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array")
    system, turns, images = [], [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where} must be an object with a role")
        role = m["role"]
        if role in ("system", "developer"):
            if turns:
                raise RequestError(f"{where}: a {role} message must come before the conversation's first turn")
            system.append(_text_only(m.get("content"), where, role))
        elif role == "user":
            text, ims = _user_content(m.get("content"), where)
            turns.append(emu3_rt.Turn("user", text, len(ims)))
            images += ims
        elif role == "assistant":
            turns.append(emu3_rt.Turn("assistant", _text_only(m.get("content"), where, role)))
        else:
            raise RequestError(f"{where}: role {role!r:.20} is not supported (system, developer, user, assistant)")
    if not turns or turns[-1].role != "user":
        raise RequestError("the last message must be a user message: the model answers it")
    return ("\n".join(system) if system else None), turns[-1].text, images, tuple(turns[:-1])


def _text_only(content, where: str, role: str) -> str:
    if content is None:
        raise RequestError(f"{where}: a {role} message needs text content (tool calls are not supported)")
    text, images = _user_content(content, where)
    if images:
        raise RequestError(f"{where}: only user messages can hold images, not {role} messages")
    return text


def _user_content(content, where: str) -> tuple[str, list[ImageFile]]:
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


# the raster formats a chat image may come in: data: URI media type -> what Pillow must find in the bytes (an MPO
# is a camera JPEG with extra frames; Pillow names it apart)
IMAGE_TYPES = {"image/png": {"PNG"}, "image/jpeg": {"JPEG", "MPO"}, "image/jpg": {"JPEG", "MPO"},
               "image/webp": {"WEBP"}, "image/gif": {"GIF"}, "image/bmp": {"BMP"}, "image/tiff": {"TIFF"}}


def _data_uri_image(url, where: str) -> ImageFile:
    """data:image/...;base64,... -> its ImageFile (emu3_rt's read_image: size bound, raster formats only, bomb guard
    from the header), decoded only when its generation starts, one image at a time. The media type must be one of
    IMAGE_TYPES; the bytes decide how they are decoded, and must be one of those formats."""
    m = re.fullmatch(r"data:([^;,]*)((?:;[\w.+=-]+)*);base64,(.*)", url or "", re.DOTALL) \
        if isinstance(url, str) else None
    if not m:
        raise RequestError(f"{where}: image_url must be a data: URI with base64 content (the server fetches no "
                           f"URLs), got {str(url)[:40]!r}")
    media = m.group(1).strip().lower()
    if media not in IMAGE_TYPES:
        raise RequestError(f"{where}: unsupported image type {media or 'none'!r:.40} in the data: URI; accepted: "
                           f"{', '.join(t for t in IMAGE_TYPES if t != 'image/jpg')}")
    try:
        data = base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the data: URI is not valid base64") from None
    image = read_image(data)
    if image.format not in {f for formats in IMAGE_TYPES.values() for f in formats}:
        raise RequestError(f"{where}: the data: URI holds a {image.format} image; accepted: "
                           f"{', '.join(t for t in IMAGE_TYPES if t != 'image/jpg')}")
    return image


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
    unknown model, 503 for a full scheduler queue, 500 for the rest (EngineError, GenerationError: the server's
    fault)."""
    if isinstance(e, ModelNotFound):
        return 404
    if isinstance(e, Full):   # the replica's scheduler queue (the service adds Retry-After)
        return 503
    return 400 if isinstance(e, (ValueError, TypeError)) else 500


def error_body(e: BaseException) -> dict:
    status, text = error_status(e), str(e).strip().splitlines()
    return error_json(status, text[0] if text else type(e).__name__,
                      {404: "model_not_found", 503: "queue_full"}.get(status, type(e).__name__))


def error_json(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind_ = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "param": None, "type": kind_, "code": code or str(status)}}
