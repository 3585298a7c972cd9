"""emu3_rt.scheduler: continuous batching of image requests on the embedded tiny bundle (no torch). A request's
tokens and pixels are the same alone and joined into a running decode state at any step, with other options and
sizes beside it; cancelled and finished rows give their rows and KV slots back; admission is bounded."""

from __future__ import annotations

import numpy as np
import pytest

import emu3_rt
from emu3_rt.scheduler import Full, ImageScheduler, SchedulerLimits, Ticket


@pytest.fixture(scope="module")
def model():
    return emu3_rt.load()


# different CFG scales (guided: 2 rows, unguided: 1), negative prompts, sampling options, greedy, sizes and seeds
REQUESTS = [
    dict(prompts="a red cat", seed=7, ratio="1:1", image_area=48 * 48),
    dict(prompts="a blue car", seed=9, ratio="2:1", image_area=64 * 32, cfg_scale=1.0),
    dict(prompts="green", seed=3, ratio="1:2", image_area=48 * 48, cfg_scale=5.0, negative_prompt="ugly",
         sampling=emu3_rt.SamplingOptions(top_k=50, top_p=0.9, temperature=0.7)),
    dict(prompts=["x", "y"], sampling=emu3_rt.SamplingOptions(greedy=True), image_area=40 * 40),
]


def _drive(model, sched, requests, at, cancel_at=None):
    """Submit requests[i] before iteration at[i]; cancel ticket k at iteration cancel_at[k]; run until idle."""
    tickets, i, it, peak = [], 0, 0, 0
    cancel_at = cancel_at or {}
    while i < len(requests) or not sched.idle:
        while i < len(requests) and at[i] <= it:
            tickets.append(sched.submit(model.start_image(**requests[i])))
            i += 1
        for k, when in cancel_at.items():
            if when == it:
                tickets[k].cancel()
        sched.step()
        peak = max(peak, sched.snapshot()["running_rows"])
        it += 1
    return tickets, peak


def _same(a, b) -> bool:
    return a.tokens == b.tokens and all(np.array_equal(np.asarray(x), np.asarray(y))
                                        for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("at", [(0, 0, 0, 0), (0, 3, 10, 25), (30, 0, 7, 1)])
def test_joined_requests_get_what_they_get_alone(model, at):
    alone = [model.generate_image(**r) for r in REQUESTS]
    sched = ImageScheduler(model, SchedulerLimits(max_rows=8, prefill_chunk=8))   # prompts take 2+ chunks
    tickets, peak = _drive(model, sched, REQUESTS, at)
    assert peak > 2   # they did share the state
    assert len({t.joined_at for t in tickets}) > 1 or at == (0, 0, 0, 0)
    for a, t in zip(alone, tickets):
        assert _same(a, t.result())
    stats = sched.snapshot()
    assert stats["completed"] == 4 and stats["decode_rows"] > stats["decode_steps"]
    assert sched.state is None and stats["kv_slots_allocated"] == 0


def test_cancelled_row_leaves_and_frees_its_slots(model):
    alone = [model.generate_image(**r) for r in REQUESTS[:3]]
    sched = ImageScheduler(model, SchedulerLimits(max_rows=8))
    memory = model.route("image").step.memory
    before = memory.counts.buffers
    rows_at = {}

    tickets, i = [], 0
    for it in range(10_000):
        if it in (0, 2, 4) and i < 3:
            tickets.append(sched.submit(model.start_image(**REQUESTS[i])))
            i += 1
        if it == 20:
            rows_at["before"] = sched.snapshot()
            tickets[0].cancel()   # the guided one: 2 rows
        sched.step()
        if it == 20:
            rows_at["after"] = sched.snapshot()
        if sched.idle and i == 3:
            break
    assert rows_at["before"]["running_rows"] - rows_at["after"]["running_rows"] == 2
    assert rows_at["after"]["kv_slots_in_use"] < rows_at["before"]["kv_slots_in_use"]
    assert tickets[0].state == Ticket.DONE and tickets[0].gen.cancelled
    with pytest.raises(emu3_rt.GenerationError):
        tickets[0].result()
    for a, t in zip(alone[1:], tickets[1:]):   # the others are untouched
        assert _same(a, t.result())
    assert sched.state is None and memory.counts.buffers == before   # no KV buffer left behind


def test_admission_is_bounded_in_rows_and_queue(model):
    sched = ImageScheduler(model, SchedulerLimits(max_rows=3, max_waiting=1))
    guided = dict(prompts="a", seed=1, image_area=40 * 40)               # 2 rows
    a = sched.submit(model.start_image(**guided))
    b = sched.submit(model.start_image(**guided))
    with pytest.raises(Full):
        sched.submit(model.start_image(**guided))
    sched.step()
    assert a.state != Ticket.WAITING and b.state == Ticket.WAITING      # 2 + 2 rows > 3
    assert sched.snapshot()["waiting_rows"] == 2
    while not a.finished.is_set():
        sched.step()
    sched.step()
    assert b.state != Ticket.WAITING
    with pytest.raises(ValueError, match="at most 3 rows"):
        sched.submit(model.start_image(prompts=["a", "b"], seed=1, image_area=40 * 40))   # 4 rows never fit
    sched.close()
    assert b.finished.is_set() and sched.state is None


def test_running_rows_keep_stepping_while_a_prompt_prefills(model):
    sched = ImageScheduler(model, SchedulerLimits(max_rows=8, prefill_chunk=4))
    first = sched.submit(model.start_image(prompts="a red cat", seed=1, image_area=40 * 40))
    while first.state != Ticket.RUNNING:
        sched.step()
    late = sched.submit(model.start_image(prompts="a long prompt " * 6, seed=2, image_area=40 * 40))
    steps = sched.counts["decode_steps"]
    sched.step()
    assert late.state == Ticket.PREFILL and late.prefilled == 4   # one chunk of its prompt this iteration ...
    assert sched.counts["decode_steps"] == steps + 1               # ... and the running row still stepped
    sched.close()
