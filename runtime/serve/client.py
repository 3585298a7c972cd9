"""A small client for the emu3-rt service, standard library + Pillow only (any OpenAI client works too).

    from runtime.serve.client import Client, user_message
    c = Client("http://127.0.0.1:8000")
    images = c.generate_image("a red cat", n=2, size="240x240", seed=7)       # PIL images; .text holds metadata
    text = c.chat("What is in this picture?", images=[images[0]], max_tokens=64, temperature=0)
    more = c.chat("And its colors?", history=[user_message("What is in this picture?", [images[0]]),
                                              {"role": "assistant", "content": text}])
    for delta in c.stream_chat("Tell me a story.", max_tokens=256):
        print(delta, end="")

Errors are ServiceError(status, message, retry_after); a 503 (the service is full) is retried `retries` times
after the Retry-After the service sends.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from PIL import Image

# the longest Retry-After this client waits before retrying a 503
MAX_RETRY_WAIT_S = 60.0


class ServiceError(RuntimeError):
    """The service answered with an error: HTTP status, its one-line message, Retry-After seconds (503/429)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


def data_uri(image: Image.Image | str | os.PathLike) -> str:
    """A PIL image or an image file -> a data: URI: PNG for PIL images; a file's own bytes, labelled with the
    media type of the format Pillow finds in them (not the file name's), or ValueError if it finds none."""
    if isinstance(image, Image.Image):
        out = io.BytesIO()
        image.save(out, format="PNG")
        data, mime = out.getvalue(), "image/png"
    else:
        with open(image, "rb") as f:
            data = f.read()
        mime = _media_type(data, os.fsdecode(image))
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _media_type(data: bytes, name: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:   # reads the header only
            fmt = im.format
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not an image Pillow can read ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
    # an MPO is a camera JPEG with extra frames: a JPEG to every server
    return "image/jpeg" if fmt == "MPO" else Image.MIME.get(fmt, f"image/{fmt.lower()}")


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def user_message(text: str, images=()) -> dict:
    """One user message: the text and the images as data: URIs (OpenAI's content parts)."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    return {"role": "user", "content": parts}


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0, retries: int = 3):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.base_url, self.timeout, self.retries = base_url.rstrip("/"), float(timeout), retries

    # ---- transport ----

    def _open(self, path: str, body: dict | None):
        # allow_nan=False: NaN / Infinity are not JSON (the service refuses them); refused here, before sending
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                return urllib.request.urlopen(req, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                error = _service_error(e)
                if e.code != 503 or attempt == self.retries:
                    raise error from None
                time.sleep(min(error.retry_after or 1.0, MAX_RETRY_WAIT_S))
        raise AssertionError("unreachable")

    def get(self, path: str) -> dict:
        with self._open(path, None) as r:
            return json.load(r)

    def post(self, path: str, body: dict) -> dict:
        with self._open(path, body) as r:
            return json.load(r)

    def events(self, path: str, body: dict) -> Iterator[dict]:
        """POST with stream: true; yields each SSE event's JSON until [DONE]. An error event raises."""
        with self._open(path, {**body, "stream": True}) as r:
            for line in r:
                line = line.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return
                event = json.loads(line[6:])
                if "error" in event:
                    raise ServiceError(500, event["error"]["message"])
                yield event

    # ---- the API ----

    def health(self) -> dict:
        return self.get("/healthz")

    def models(self) -> list[dict]:
        return self.get("/v1/models")["data"]

    def generate_image(self, prompt: str, **fields) -> list[Image.Image]:
        """fields: n, size ("WxH") or ratio + image_area, seed, negative_prompt, cfg_scale, top_k, temperature,
        top_p. Each PNG carries its prompt, seed and sampling options (image.text)."""
        out = self.post("/v1/images/generations", {"prompt": prompt, **fields})
        return [decode_png(item["b64_json"]) for item in out["data"]]

    def stream_image(self, prompt: str, **fields) -> Iterator[dict]:
        """image_generation.rows / .partial_image (with preview_every) / .completed events, as dicts."""
        return self.events("/v1/images/generations", {"prompt": prompt, **fields})

    def chat(self, text: str, images=(), system: str | None = None, history=(), **fields) -> str:
        """The answer to `text` (with its images: PIL images or files). history: the conversation so far, as
        OpenAI messages ({"role": "user" | "assistant", "content": ...}; user_message() builds one with images).
        fields: max_tokens, temperature (0: greedy), top_p, top_k, seed."""
        return self.post("/v1/chat/completions", _chat_body(text, images, system, history, fields))["choices"][0][
            "message"]["content"]

    def stream_chat(self, text: str, images=(), system: str | None = None, history=(), **fields) -> Iterator[str]:
        """The answer's text deltas as they are generated."""
        for chunk in self.events("/v1/chat/completions", _chat_body(text, images, system, history, fields)):
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    yield choice["delta"]["content"]


def _chat_body(text: str, images, system: str | None, history, fields: dict) -> dict:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": messages + list(history) + [user_message(text, images)], **fields}


def _service_error(e: urllib.error.HTTPError) -> ServiceError:
    body = e.read().decode("utf-8", "replace")
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):   # Serve's own answers (503 when full) are plain text
        message = body.strip().splitlines()[0] if body.strip() else e.reason
    retry = e.headers.get("Retry-After")
    return ServiceError(e.code, str(message), float(retry) if retry and retry.isdigit() else None)
