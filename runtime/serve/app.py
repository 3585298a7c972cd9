"""The Ray Serve application: one deployment (`Emu3`) that loads a bundle once per replica and serves an
OpenAI-shaped HTTP API through FastAPI; concurrent requests are batched by @serve.batch (batcher.py).

    POST /v1/images/generations   POST /v1/chat/completions   GET /v1/models[/{id}]   GET /healthz   GET /v1/stats

Every error answers OpenAI's {"error": {...}} shape, FastAPI's own 404/405/422 included.
Requests flow: JSON -> protocol.Job (checked: 400 on a bad field) -> the replica's batch queue (bounded by
max_ongoing_requests; beyond it Serve queues max_queued_requests, then answers 503 with Retry-After) -> one
generation per compatible group -> the response, or SSE events with `stream: true`. A client that leaves marks
its job gone; a generation whose clients have all left is cancelled.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at run time
import asyncio
import contextlib
import inspect
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

import emu3_rt
from emu3_rt.argcheck import as_flag, as_int, as_real
from emu3_rt.image import give_back_memory
from emu3_rt.scheduler import SchedulerLimits

from . import protocol
from .batcher import Stats, batch_rows, drive
from .continuous import RETRY_AFTER_S, ImageQueue
from .protocol import SSE_DONE, Job, RequestError, sse

# request bodies above this are refused (413) as soon as the running count of received bytes passes it, with or
# without Content-Length (chunked): nothing past it is kept. One image inside is bounded by emu3_rt
MAX_BODY_BYTES = 64 << 20
# a request body must have arrived within this many seconds of its handler starting to read it (408 otherwise): a
# request holds one of the replica's max_ongoing_requests slots while its body trickles in
BODY_TIMEOUT_S = 30.0
MAX_BODY_TIMEOUT_S = 3600.0
# batch_wait_s above this would hold every batch's first request that long
MAX_BATCH_WAIT_S = 60.0

api = FastAPI(title="emu3-rt", version=emu3_rt.__version__,
              description="Emu3 text-to-image and chat from an exported bundle, OpenAI-shaped.")


class _TooLarge(Exception):
    """The request body is over MAX_BODY_BYTES (413)."""


# FastAPI's own answers (no such route 404, wrong method 405, validation 422, an unexpected failure 500) in the
# same {"error": ...} shape as every other error, as OpenAI's clients expect
@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):
    allow = (e.headers or {}).get("Allow")
    reason = f"{e.detail}" + (f" (this route takes {allow})" if allow else "")
    return JSONResponse(protocol.error_json(e.status_code, f"{request.method} {request.url.path}: {reason}"),
                        status_code=e.status_code, headers=e.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    first = (e.errors() or [{}])[0]
    where = ".".join(str(x) for x in first.get("loc", ()))
    return JSONResponse(protocol.error_json(422, f"{where}: {first.get('msg', 'invalid request')}"), status_code=422)


@api.exception_handler(Exception)
async def _server_error(request: Request, e: Exception):
    return _error(e if isinstance(e, RuntimeError) else RuntimeError(f"internal error ({type(e).__name__})"))


async def read_body(request: Request, limit: int, timeout_s: float) -> bytearray:
    """The request body, read as it streams in with a running count: _TooLarge as soon as it passes `limit` (a
    declared Content-Length over it: before anything is read), TimeoutError if it has not all arrived within
    timeout_s."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _TooLarge()
    body, size = bytearray(), 0
    async with asyncio.timeout(timeout_s):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge()
            body += chunk
    return body   # json.loads reads a bytearray: no second copy of a large body



async def _final_event(job: Job, events) -> dict:
    """A non-streamed response's one event: this request's result or its error (the rows are done either way)."""
    try:
        async for event in events:
            if event["type"] in ("error", "result"):
                return event
    finally:
        job.gone = True
        await events.aclose()
    raise RuntimeError("the batch ended without a result for this request")


def _error(e: BaseException) -> JSONResponse:
    status = protocol.error_status(e)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(protocol.error_body(e), status_code=status, headers=headers)


async def _alone(model, job: Job, stats: Stats):
    """Without batching: the job runs as its own generation, with the same events as through @serve.batch."""
    async with contextlib.aclosing(drive(model, [job], stats)) as rounds:
        async for out in rounds:
            if out[0] is StopAsyncIteration:
                return
            yield out[0]


@serve.deployment(name="Emu3", max_ongoing_requests=32, max_queued_requests=64,
                  backpressure_config={"status_code": 503, "retry_after_s": 2}, health_check_period_s=5)
@serve.ingress(api)
class Emu3Service:
    """One replica: the model, its batch queues (one per task) and its counters."""

    def __init__(self, bundle: str | None = None, engine: str = "ort", device: str = "cpu", threads: int = 0,
                 verify: bool = False, max_batch_rows: int = 8, batch_wait_s: float = 0.05,
                 max_concurrent_batches: int = 2, batching: bool = True, device_id: int = 0,
                 sampler: str | None = None, body_timeout_s: float = BODY_TIMEOUT_S,
                 scheduling: str = "continuous", max_running_rows: int = 0, max_waiting: int = 32,
                 max_kv_slots: int = 0, prefill_chunk: int = 128):
        # the arguments first: a bad one fails in one line before the bundle loads
        wait = as_real("batch_wait_s", batch_wait_s, 0, MAX_BATCH_WAIT_S)
        self.body_timeout_s = as_real("body_timeout_s", body_timeout_s, 0.001, MAX_BODY_TIMEOUT_S)
        concurrent = as_int("max_concurrent_batches", max_concurrent_batches, 1)
        # rows (images or answers) one generation may hold; a request asking for more gets 400
        self.max_rows = as_int("max_batch_rows", max_batch_rows, 1)
        if scheduling not in ("continuous", "window"):
            raise ValueError(f"scheduling must be 'continuous' or 'window', got {scheduling!r:.40}")
        batching = as_flag("batching", batching)
        # continuous: the image step graph's rows (a guided image takes 2), by default 2 x max_batch_rows
        limits = SchedulerLimits(max_rows=as_int("max_running_rows", max_running_rows, 0) or 2 * self.max_rows,
                                 max_waiting=as_int("max_waiting", max_waiting, 1),
                                 max_kv_slots=as_int("max_kv_slots", max_kv_slots, 0),
                                 prefill_chunk=as_int("prefill_chunk", prefill_chunk, 1))
        self.model = emu3_rt.load(bundle, engine=engine, device=device, threads=threads, verify=verify,
                                  device_id=device_id, sampler=sampler)
        self.stats = Stats()
        self.batches = {task: self._batch_queue(wait, concurrent) for task in ("image", "chat")} \
            if batching else None
        # images at the iteration level (continuous.py); chat keeps the window batches
        self.images = ImageQueue(self.model, limits, self.stats) \
            if batching and scheduling == "continuous" and self.model.bundle.kv_cache == "buffer" else None

    def __del__(self):   # Serve calls it when the replica stops: the stepping thread ends, its states are released
        images = getattr(self, "images", None)
        if images is not None:
            images.close()

    def _batch_queue(self, wait_s: float, concurrent: int):
        """An @serve.batch queue: requests arriving within wait_s of each other, up to max_rows rows in all, are
        handed to drive() together; up to `concurrent` such batches run at once."""
        async def run(jobs: list[Job]):
            async for out in drive(self.model, jobs, self.stats):
                yield out

        return serve.batch(max_batch_size=self.max_rows, batch_wait_timeout_s=wait_s,
                           max_concurrent_batches=concurrent, batch_size_fn=batch_rows)(run)

    async def _events(self, job: Job):
        """The job's events one at a time; the job is marked gone however the consumer stops (a client that
        disconnects cancels the awaiting task, which lands here)."""
        if job.task == "image" and self.images is not None:
            source = self.images.events(job)
        else:
            source = self.batches[job.task](job) if self.batches else _alone(self.model, job, self.stats)
        try:
            async for events in source:
                if any(e["type"] in ("result", "error") for e in events):
                    # the job's last events: read the batch's end-of-job mark before handing them out, since the
                    # consumer stops at them (an unread mark is logged as a lost exception)
                    async for _ in source:
                        pass
                for event in events:
                    yield event
        finally:
            job.gone = True

    async def _submit(self, request: Request, parse):
        """Parse and queue a request: (job, its events) once its generation started, or an error response."""
        try:
            body = await read_body(request, MAX_BODY_BYTES, self.body_timeout_s)
            job = await asyncio.to_thread(protocol.parse_request, body, parse, self.model, self.max_rows)
        except _TooLarge:
            # what was read of it is freed: hand the heap back (its many small chunks would stay with the replica)
            await asyncio.to_thread(give_back_memory)
            # Connection: close: the rest of the upload is not read (the server drops the connection)
            return None, JSONResponse(protocol.error_body(RequestError(
                f"the request body is over {MAX_BODY_BYTES >> 20} MiB")), status_code=413,
                headers={"Connection": "close"})
        except TimeoutError:
            return None, JSONResponse(protocol.error_body(RequestError(
                f"the request body did not arrive within {self.body_timeout_s:g} s")), status_code=408,
                headers={"Connection": "close"})
        except Exception as e:  # noqa: BLE001 - a bad request: 400 with emu3_rt's one-line message
            return None, _error(e)
        events = self._events(job)
        first = await anext(events)   # "started", or the error that kept the job from starting
        if first["type"] == "error":
            await events.aclose()
            return None, _error(first["error"])
        return (job, events), None

    # ---- routes ----

    @api.get("/healthz")
    def healthz(self) -> dict:
        # answered here only where the Health application is not mounted at /healthz (it is by emu3-rt serve and
        # config.yaml): this route waits for a request slot like any other
        return {"status": "ok", "model": protocol.model_id(self.model)}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [self._model_entry()]}

    @api.get("/v1/models/{name}")
    def model_route(self, name: str):
        if name != protocol.model_id(self.model):
            return _error(protocol.ModelNotFound(f"model {name!r:.80} not found: this service serves "
                                                 f"{protocol.model_id(self.model)!r}"))
        return self._model_entry()

    def _model_entry(self) -> dict:
        bundle = self.model.bundle
        return {"id": protocol.model_id(self.model), "object": "model", "owned_by": "emu3-rt",
                "created": int(os.stat(bundle.root / "bundle.json").st_mtime), "sha256": bundle.sha256,
                "context_length": bundle.context_length}

    @api.get("/v1/stats")
    def stats_route(self) -> dict:
        snap = self.stats.snapshot()
        if self.images is not None:   # the scheduler's runs count as decode steps too; its rows, KV and queue
            rows = self.images.snapshot()
            snap["decode_steps"] += rows.pop("decode_steps")
            snap["decode_rows"] += rows.pop("decode_rows")
            snap.update(rows)
        return {**snap, "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "max_batch_rows": self.max_rows, "batching": self.batches is not None,
                "scheduling": "continuous" if self.images is not None else "window"}

    async def _respond(self, request: Request, parse, stream, finish):
        """Both generation routes: submit the request; then an SSE response of stream(job, events), or the final
        event as JSON through finish(job, event) (an error event: its status and one-line body)."""
        started, refusal = await self._submit(request, parse)
        if refusal is not None:
            return refusal
        job, events = started
        if job.stream:
            return StreamingResponse(stream(job, events), media_type="text/event-stream")
        event = await _final_event(job, events)
        if event["type"] == "error":
            return _error(event["error"])
        return await finish(job, event)

    @api.post("/v1/images/generations")
    async def images(self, request: Request):
        return await self._respond(request, protocol.image_job, self._image_stream, self._image_response)

    async def _image_response(self, job: Job, event: dict):
        items = await asyncio.to_thread(self._image_items, job, event)
        return protocol.image_response(job, items, self.model)

    def _image_items(self, job: Job, event: dict) -> list[dict]:
        return [protocol.image_item(job, i, event["result"], r, self.model) for i, r in enumerate(event["rows"])]

    async def _image_stream(self, job: Job, events):
        """SSE: image_generation.rows per completed grid row (in order); image_generation.partial_image with a
        preview (partial_images of them, or one every preview_every rows), numbered per image by
        partial_image_index; then image_generation.completed per image, then [DONE]. The partial and completed
        events carry the fields of OpenAI's image streaming events."""
        partials = [0] * job.rows
        try:
            async for event in events:
                if event["type"] == "rows":
                    i = event["index"]
                    rows = {"image_index": i, "rows_done": event["rows_done"], "rows": event["rows"]}
                    yield sse({"type": "image_generation.rows", **rows})
                    if "b64_json" in event:
                        preview = protocol.image_event("partial_image", i, event["size"], event["b64_json"],
                                                       partial_image_index=partials[i], **rows)
                        partials[i] += 1
                        yield sse(preview)
                elif event["type"] == "result":
                    items = await asyncio.to_thread(self._image_items, job, event)
                    for i, (item, r) in enumerate(zip(items, event["rows"])):
                        rest = {k: v for k, v in item.items() if k not in ("b64_json", "size")}
                        yield sse(protocol.image_event("completed", i, item["size"], item["b64_json"],
                                                       usage=protocol.image_usage(event["result"], r), **rest))
                elif event["type"] == "error":
                    yield sse(protocol.error_body(event["error"]))
            yield SSE_DONE
        finally:
            job.gone = True
            await events.aclose()

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._respond(request, protocol.chat_job, self._chat_stream, self._chat_response)

    async def _chat_response(self, job: Job, event: dict):
        return protocol.chat_response(job, protocol.chat_id(), event["result"], event["rows"], self.model)

    async def _chat_stream(self, job: Job, events):
        """SSE in OpenAI's chunk format: the role, content deltas (they add up to the full text), a last chunk per
        choice with its finish_reason, the usage chunk if asked for, then [DONE]; one id for all its chunks."""
        cid = protocol.chat_id()
        chunk = lambda choices, **extra: sse(protocol.chat_chunk(job, cid, self.model, choices, **extra))  # noqa: E731
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(job.rows)])
            async for event in events:
                if event["type"] == "delta":
                    yield chunk([{"index": event["index"], "delta": {"content": event["text"]},
                                  "finish_reason": None}])
                elif event["type"] == "result":
                    result, rows = event["result"], event["rows"]
                    yield chunk([{"index": i, "delta": {}, "finish_reason": protocol.finish_reason(
                        result.tokens[r], self.model)} for i, r in enumerate(rows)])
                    if job.include_usage:
                        yield chunk([], usage=protocol.usage(result, rows))
                elif event["type"] == "error":
                    yield sse(protocol.error_body(event["error"]))
            yield SSE_DONE
        finally:
            job.gone = True
            await events.aclose()


@serve.deployment(name="Health", num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class Health:
    """GET /healthz as its own application, mounted at route prefix /healthz beside the model's: its own replica
    and request slots, so clients holding every slot of the model's replicas (slow uploads, long generations, a
    full queue) never delay it. It asks Serve's controller, not a model replica: 200 while the model application
    is RUNNING (its replicas pass Serve's health checks), else 503 with the application's status."""

    def __init__(self, app: str = "emu3", bundle: str | None = None):
        from emu3_rt.pipeline import DEFAULT_BUNDLE

        self.app = app
        self.model = emu3_rt.load_bundle(DEFAULT_BUNDLE if bundle is None else bundle).root.name

    async def __call__(self, request: Request) -> JSONResponse:
        status = (await asyncio.to_thread(serve.status)).applications.get(self.app)
        state = str(status.status.value if status is not None else "NOT_STARTED")
        ok = state == "RUNNING"
        return JSONResponse({"status": "ok" if ok else state.lower(), "model": self.model},
                            status_code=200 if ok else 503)


def build_health(args: dict | None = None):
    """The /healthz application of runtime/serve/config.yaml: `args` are Health's (app: the model application's
    name, bundle: the model's bundle, for the id it reports)."""
    return Health.bind(**dict(args or {}))


def build_app(args: dict | None = None):
    """The application `serve run runtime/serve/config.yaml` builds: `args` are Emu3Service's arguments (bundle,
    engine, device, threads, verify, max_batch_rows, batch_wait_s, max_concurrent_batches, batching); the
    deployment's own options (replicas, actor resources, queue bounds) come from the YAML's `deployments`."""
    args = dict(args or {})
    known = set(inspect.signature(Emu3Service.func_or_class).parameters)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application argument {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
    return Emu3Service.bind(**args)
