"""Continuous batching in the service: the replica's image requests run through one emu3_rt.scheduler
ImageScheduler, stepped by one thread of the replica; each request gets the same events as through batcher.drive.

    request -> Emu3.start_image (a bad prompt: its 400) -> scheduler.submit (queue full: 503 + Retry-After)
            -> the stepping thread: one iteration at a time (requests join and leave at every step boundary)
            -> per request, through its asyncio queue: "rows" progress (streams), then its end
            -> "result" (VQ decode in the request's own thread, off the stepping thread) or "error"

A client that leaves cancels only its own ticket: its rows are released at the next step boundary, the others
keep running. Chat requests keep window batching (batcher.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from emu3_rt.scheduler import Full, ImageScheduler, SchedulerLimits, Ticket

from .batcher import Stats, _start
from .protocol import Job, png_base64

# what a 503 from a full queue tells the client to wait (seconds), as Serve's own backpressure answer
RETRY_AFTER_S = 2


class ImageQueue:
    """One replica's continuous image batching: the scheduler, its stepping thread and each request's listener."""

    def __init__(self, model, limits: SchedulerLimits, stats: Stats):
        self.model, self.stats = model, stats
        self.scheduler = ImageScheduler(model, limits)
        self._wake = threading.Condition()
        self._stop = False
        # ticket -> (its loop, its queue, its job, grid rows already reported per image)
        self._listeners: dict[Ticket, tuple] = {}
        self._thread = threading.Thread(target=self._loop, name="emu3-serve-scheduler", daemon=True)
        self._thread.start()

    # ---- the request's side ----

    async def events(self, job: Job) -> AsyncIterator[list[dict]]:
        """As batcher.drive for one job: [{"type": "started"}] or [{"type": "error"}] first, then lists of
        "rows" events (streams) and the last one: [{"type": "result", ...}] or [{"type": "error"}]."""
        try:
            gen = await asyncio.to_thread(_start, self.model, [job])
        except Exception as e:  # noqa: BLE001 - this request's own error (400)
            self.stats.add("failed_requests")
            yield [{"type": "error", "error": e}]
            return
        queue: asyncio.Queue = asyncio.Queue()
        try:
            with self._wake:
                if self._stop:
                    raise RuntimeError("the replica is shutting down")
                ticket = self.scheduler.submit(gen)
                self._listeners[ticket] = (asyncio.get_running_loop(), queue, job, [0] * job.rows)
                self._wake.notify()
        except Exception as e:  # noqa: BLE001 - Full (503) or a request past the bounds (400)
            gen.cancel()
            self.stats.add("rejected_requests" if isinstance(e, Full) else "failed_requests")
            yield [{"type": "error", "error": e}]
            return
        self.stats.add("requests")
        try:
            yield [{"type": "started"}]
            while (events := await queue.get()) is not None:
                yield [await self._with_preview(ticket, e) if e.get("preview") else e for e in events]
            if ticket.error is not None:
                self.stats.add("failed_requests")
                yield [{"type": "error", "error": ticket.error}]
            elif not ticket.gen.cancelled:
                result = await asyncio.to_thread(ticket.result)   # checks and VQ-decodes its tokens
                yield [{"type": "result", "result": result, "rows": range(job.rows)}]
        finally:   # the client left (or the stream ended): leave at the next step boundary
            ticket.cancel()
            with self._wake:
                self._wake.notify()

    async def _with_preview(self, ticket: Ticket, event: dict) -> dict:
        preview = await asyncio.to_thread(ticket.gen.preview, event["index"], event["rows_done"])
        event = {k: v for k, v in event.items() if k != "preview"}
        return {**event, "b64_json": png_base64(preview, {"emu3_rt_preview": "1"}),
                "size": f"{preview.width}x{preview.height}"}

    # ---- the stepping thread ----

    def _loop(self) -> None:
        sched = self.scheduler
        try:
            while True:
                with self._wake:
                    while sched.idle and not self._stop:
                        self._wake.wait()
                    if self._stop:
                        return
                try:
                    sched.step()
                except Exception as e:  # noqa: BLE001 - a scheduler failure: every request in it gets it
                    for ticket in list(self._listeners):
                        ticket.error = ticket.error or e
                    sched.close()
                self._dispatch()
        finally:
            sched.close()
            self._dispatch()

    def _dispatch(self) -> None:
        """Each listener's progress since the last iteration; None to those whose ticket has ended."""
        for ticket, (loop, queue, job, shown) in list(self._listeners.items()):
            events = []
            if job.stream and ticket.state == Ticket.RUNNING or ticket.finished.is_set():
                done, grids = ticket.gen.rows_done(), ticket.gen.grids
                for i in range(job.rows if job.stream and not ticket.gen.cancelled else 0):
                    if done[i] > shown[i]:
                        shown[i], height = done[i], grids[i][0]
                        events.append({"type": "rows", "index": i, "rows_done": done[i], "rows": height,
                                       "preview": job.preview_at(done[i], height)})
            ended = ticket.finished.is_set()
            if ended:
                del self._listeners[ticket]
                if ticket.gen.cancelled and ticket.error is None:
                    self.stats.add("cancelled_rows", job.rows)
            for item in ([events] if events else []) + ([None] if ended else []):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:   # the request's event loop is gone (replica shutting down)
                    pass

    def close(self) -> None:
        """Stop the thread; every ticket is cancelled and every state released."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def snapshot(self) -> dict:
        return self.scheduler.snapshot()
