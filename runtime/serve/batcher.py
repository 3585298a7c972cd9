"""Batching across requests: the jobs (protocol.Job) that @serve.batch hands over run as few generations as fit.

    jobs --group by Job.key--> one model.start_image / start_chat per group (rows concatenated, one seed per row)
         --each round: one decode step of every generation, in threads--> events per job
         (image rows done and previews, text deltas, then the result or an error)

A row's tokens do not depend on the other rows of its generation (each row draws from its own seeded stream), so
a request gets the same tokens batched as alone. A request that cannot start (a bad prompt) is found by starting
its group's requests one at a time: it alone gets the error, the others still run as one generation.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .protocol import Job, png_base64


class Stats:
    """Per-replica counters (GET /v1/stats): requests (and those refused by a full scheduler queue: 503),
    generations started and their rows, decode steps (each one run of the step graph for all rows of a generation:
    what a batch saves), decode rows (the step graph's rows summed over those runs: 2 per guided image) and
    cancelled rows."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.Counter()
        self._rows = collections.deque(maxlen=64)   # rows of the latest generations, newest last

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def started(self, rows: int) -> None:
        with self._lock:
            self._counts["generations"] += 1
            self._rows.append(rows)

    def snapshot(self) -> dict:
        with self._lock:
            names = ("requests", "failed_requests", "rejected_requests", "generations", "decode_steps",
                     "decode_rows", "cancelled_rows")
            return {**{k: self._counts[k] for k in names}, "generation_rows": list(self._rows)}


def batch_rows(jobs: list[Job]) -> int:
    """@serve.batch's batch_size_fn: a batch is bounded in rows (images or answers), not requests."""
    return sum(job.rows for job in jobs)


# ---- starting generations ----

def _start(model, jobs: list[Job]):
    """One generation for `jobs` (same key): their rows concatenated in order, each row with its own seed."""
    prompts = [p for job in jobs for p in job.prompts]
    seeds = None if jobs[0].seeds is None else [s for job in jobs for s in job.seeds]
    per_row = {k: [x for job in jobs for x in job.per_row[k]] for k in jobs[0].per_row}
    if jobs[0].task == "image":
        return model.start_image(prompts, ratio=per_row["ratio"], image_area=per_row["image_area"], seed=seeds,
                                 **jobs[0].options)
    images, history = per_row["images"], per_row["history"]
    # start_chat takes one prompt's images and history flat, a batch's as one list per prompt
    if len(prompts) == 1:
        images, history = images[0], history[0]
    elif not any(images):
        images = None
    return model.start_chat(prompts, images, seed=seeds, history=history, **jobs[0].options)


@dataclass(eq=False)
class _Run:
    """One generation serving some jobs: job k owns the generation's rows spans[k]."""
    gen: object
    jobs: list[Job]
    spans: list[range]
    shown: list[int]        # per generation row: grid rows already reported (images)
    finished: bool = False

    @classmethod
    def of(cls, gen, jobs: list[Job]) -> _Run:
        spans, at = [], 0
        for job in jobs:
            spans.append(range(at, at + job.rows))
            at += job.rows
        return cls(gen, jobs, spans, [0] * at)


def start_runs(model, jobs: list[Job], stats: Stats) -> tuple[list[_Run], dict[Job, Exception]]:
    """Group the jobs by key and start one generation per group; the jobs that cannot start, with their error."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    runs, failed = [], {}
    for group in groups.values():
        try:
            runs.append(_Run.of(_start(model, group), group))
            continue
        except Exception as e:  # noqa: BLE001 - delivered to the request(s) it belongs to
            if len(group) == 1:
                failed[group[0]] = e
                continue
        good = []
        for job in group:   # which request broke the group: start each alone (and drop it at once)
            try:
                _start(model, [job]).cancel()
                good.append(job)
            except Exception as e:  # noqa: BLE001
                failed[job] = e
        if good:
            try:
                runs.append(_Run.of(_start(model, good), good))
            except Exception as e:  # noqa: BLE001 - each started alone, so this is not any one request's fault
                failed.update(dict.fromkeys(good, e))
    for run in runs:
        stats.started(len(run.shown))
    stats.add("failed_requests", len(failed))
    return runs, failed


# ---- stepping ----

def advance(run: _Run, stats: Stats) -> list[list[dict]]:
    """One decode step of the run's generation (blocking: call it in a thread) -> per job, its events: image
    rows done (with a preview PNG where job.preview_at says) or text deltas, for streaming jobs; a "result"
    event ({"result", "rows"}) for every job once the generation has finished."""
    gen = run.gen
    ids = gen.step()    # one run of the step graph for every row (the first one prefills)
    stats.add("decode_steps", ids is not None)
    stats.add("decode_rows", gen.model_rows if ids is not None else 0)
    run.finished = ids is None or gen.done
    events: list[list[dict]] = [[] for _ in run.jobs]
    if hasattr(gen, "text_deltas"):
        deltas = gen.text_deltas()   # taken every step: the deltas add up to the result's texts
        for k, (job, span) in enumerate(zip(run.jobs, run.spans)):
            events[k] += [{"type": "delta", "index": i, "text": deltas[r]}
                          for i, r in enumerate(span) if job.stream and deltas[r]]
    else:
        done = gen.rows_done()
        for k, (job, span) in enumerate(zip(run.jobs, run.spans)):
            for i, r in enumerate(span):
                if not job.stream or done[r] <= run.shown[r]:
                    continue
                run.shown[r], height = done[r], gen.grids[r][0]
                event = {"type": "rows", "index": i, "rows_done": done[r], "rows": height}
                if job.preview_at(done[r], height):
                    preview = gen.preview(r)
                    event["b64_json"] = png_base64(preview, {"emu3_rt_preview": "1"})
                    event["size"] = f"{preview.width}x{preview.height}"
                events[k].append(event)
    if run.finished:
        result = gen.result()
        for k, span in enumerate(run.spans):
            events[k].append({"type": "result", "result": result, "rows": span})
    return events


async def drive(model, jobs: list[Job], stats: Stats) -> AsyncIterator[list]:
    """The @serve.batch body. Yields, each round, one entry per job: its list of events, or StopAsyncIteration
    once it has had its last one. The first round gives every job {"type": "started"} or {"type": "error"}.
    A generation whose clients have all left is cancelled (its KV cache released) before its next step."""
    stats.add("requests", len(jobs))
    runs, failed = await asyncio.to_thread(start_runs, model, jobs, stats)
    over: set[Job] = set()
    yield [[{"type": "error", "error": failed[job]}] if job in failed else [{"type": "started"}] for job in jobs]
    if failed:   # end the failed jobs now, not after the next decode step of the others
        over |= set(failed)
        yield [StopAsyncIteration if job in over else [] for job in jobs]
    live = list(runs)
    try:
        while live:
            for run in [r for r in live if all(job.gone for job in r.jobs)]:
                run.gen.cancel()
                stats.add("cancelled_rows", len(run.shown))
                live.remove(run)
                over.update(run.jobs)
            outs = await asyncio.gather(*(asyncio.to_thread(advance, run, stats) for run in live),
                                        return_exceptions=True)
            events: dict[Job, list[dict]] = {}
            ended: set[Job] = set()
            for run, out in zip(live, outs):
                if isinstance(out, BaseException):   # an engine failure, a broken grid: every row of the run
                    run.gen.cancel()
                    run.finished = True
                    out = [[{"type": "error", "error": out}] for _ in run.jobs]
                events.update(zip(run.jobs, out))
                if run.finished:
                    ended.update(run.jobs)
            if any(events.values()):   # a round with nothing to hand out (no stream, no result) is not passed on
                yield [StopAsyncIteration if job in over else events.get(job, []) for job in jobs]
            live = [run for run in live if not run.finished]
            if ended and live:   # end the finished jobs now, not after the next decode step of the others
                over |= ended
                yield [StopAsyncIteration if job in over else [] for job in jobs]
    finally:
        for run in runs:   # the batch was cancelled (replica shutting down): release every KV cache
            run.gen.cancel()
