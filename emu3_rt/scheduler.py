"""Iteration-level scheduling (continuous batching) of image generations on one model: requests join and leave
one running decode state at every step boundary.

    sched = ImageScheduler(model, SchedulerLimits(max_rows=16))
    ticket = sched.submit(model.start_image("a red cat", seed=7))    # Full when the queue is full
    while not sched.idle:
        sched.step()                       # one iteration (below); tickets progress, finish or fail
    ticket.result()                        # ImageResult: what the request gets run alone, same seed

One iteration (`step`):
1. cancelled tickets leave: their rows are released in the shared state (DecodeState.release_rows);
2. waiting tickets are admitted in order while rows and KV slots are free (the bounds of SchedulerLimits): each
   gets a decode state of its own, sized to its prompt;
3. one prefill chunk (at most `prefill_chunk` prompt tokens over all prefilling tickets), so a long prompt costs
   the running rows a few short stalls instead of one long one; a ticket whose prompt is done picks its first
   token from the prefill's logits;
4. prefilled tickets join the shared state: add_rows + DecodeState.adopt (their K/V rows copied in; the others'
   rows are untouched), when the running tickets' pending ids are one step (see 5);
5. one run of the step graph for every row of the shared state (R, S): each ticket's pending ids, tiled over its
   cond / uncond rows; released rows get a pad id attending to itself only. Then every ticket picks its next ids
   from its own rows of the logits with its own chain and seeded streams (generate.Decoding.pick_host), so a
   request's tokens depend on its own prompt, options and seed only. When every running ticket's next token is
   forced by its grid (EOL, EOF, ...), no model runs (as generate.Decoding): the forced ids ride with the next run
   (S = 2), and a ticket that just joined waits for that run. Finished tickets leave (their rows released).
The shared state is closed once no ticket holds a row in it (its memory goes back), and rebuilt smaller when
released rows outnumber the live ones.

Options per row: CFG scale (a guided request takes 2 rows, an unguided one 1), negative prompt, temperature,
top-k, top-p, greedy, size and seed are each request's own: its picker runs on its slice of the logits (the
bundle's sampler graph on the host logits, or the numpy chain; export/sampler_graph.py's options are scalars, so
it runs once per request, not once per step). Not thread-safe: one thread steps a scheduler (the service's).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np

from .engines.state import DecodeState
from .generation import GenerationError, ImageGeneration, ImageResult


class Full(RuntimeError):
    """The scheduler's waiting queue is full: try again later (the service answers 503 + Retry-After)."""


@dataclass(frozen=True)
class SchedulerLimits:
    # rows of the shared decode state (a guided image takes 2: cond + uncond)
    max_rows: int = 16
    # KV slots (positions x rows) held at once by the shared state's rows and the prefilling tickets' states;
    # 0: max_rows x the context length (then only max_rows bounds)
    max_kv_slots: int = 0
    # tickets waiting for rows (beyond those the free rows admit at the next boundary); one more raises Full
    max_waiting: int = 64
    # prompt tokens prefilled per iteration, over all prefilling tickets
    prefill_chunk: int = 128

    def __post_init__(self):
        for name in ("max_rows", "max_waiting", "prefill_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r:.40}")
        if not isinstance(self.max_kv_slots, int) or self.max_kv_slots < 0:
            raise ValueError(f"max_kv_slots must be an int >= 0, got {self.max_kv_slots!r:.40}")


class Ticket:
    """One request (an ImageGeneration from Emu3.start_image, not stepped yet) inside a scheduler. Read `gen`
    (rows_done, preview) from the stepping thread only; cancel() from any thread."""

    WAITING, PREFILL, READY, RUNNING, DONE = "waiting", "prefill", "ready", "running", "done"

    def __init__(self, gen: ImageGeneration):
        self.gen = gen
        self.dec = gen._decoding
        self.state = Ticket.WAITING
        self.rows = self.dec.batch.rows                 # state rows: B, or 2B under CFG (cond, then uncond)
        # positions each row holds at the end: the padded prompt, then every generated token
        self.slots = self.dec.batch.ids.shape[1] + self.dec.opts.max_new_tokens
        self.own: DecodeState | None = None             # its own state while prefilling
        self.prefilled = 0                              # prompt columns run so far
        self.where: np.ndarray | None = None            # its rows in the shared state (RUNNING)
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self.finished = threading.Event()               # set once DONE (result, error or cancelled)
        self.joined_at: int | None = None               # the shared state's step count when it joined

    def cancel(self) -> None:
        """Leave at the next step boundary (any thread): the rows and KV slots go back."""
        self.cancelled.set()

    def result(self) -> ImageResult:
        if self.error is not None:
            raise self.error
        if not self.finished.is_set():
            raise GenerationError("the request has not finished")
        return self.gen.result()    # the decoding is finished: this only checks and VQ-decodes its tokens


class ImageScheduler:
    """Continuous batching of image requests on `model`'s image step graph (see the module docstring)."""

    def __init__(self, model, limits: SchedulerLimits = SchedulerLimits()):
        self.model, self.limits = model, limits
        self.route = model.route("image")
        self.engine = self.route.step
        if model.bundle.kv_cache != "buffer":
            raise ValueError("continuous batching needs a buffer-layout bundle (kv_cache 'buffer')")
        self._layout = None
        self.state: DecodeState | None = None           # the shared decode state, None while no row runs
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.prefilling: list[Ticket] = []
        self.running: list[Ticket] = []
        self._lock = threading.Lock()                   # submit() from request threads vs. step()
        self.counts = collections.Counter()             # decode_steps, decode_rows, prefill_runs, ...
        self.max_slots = limits.max_kv_slots or limits.max_rows * model.bundle.context_length

    # ---- submitting ----

    def submit(self, gen: ImageGeneration) -> Ticket:
        """Queue a started, unstepped image generation (Emu3.start_image checked and encoded it). Raises Full
        when max_waiting tickets wait, ValueError when the request could never fit the bounds."""
        ticket = Ticket(gen)
        if gen.steps or gen.done:
            raise ValueError("submit a generation that has not been stepped")
        if ticket.rows > self.limits.max_rows or ticket.rows * ticket.slots > self.max_slots:
            raise ValueError(f"the request needs {ticket.rows} rows of {ticket.slots} positions; this scheduler "
                             f"holds at most {self.limits.max_rows} rows and {self.max_slots} KV slots")
        with self._lock:
            # the queue's head that fits the free rows and slots is admitted at the next boundary: only what waits
            # past it counts against max_waiting
            rows, slots, queued = self.rows_in_use(), self.slots_in_use(), 0
            for t in self.waiting:
                if queued or rows + t.rows > self.limits.max_rows or slots + t.rows * t.slots > self.max_slots:
                    queued += 1
                else:
                    rows, slots = rows + t.rows, slots + t.rows * t.slots
            if queued >= self.limits.max_waiting:
                raise Full(f"{queued} requests are waiting for rows already")
            # its own state (allocated by start_image for the whole generation) is not needed until admission
            gen._decoding.cache.close()
            gen._decoding.cache = None
            self.waiting.append(ticket)
            self.counts["submitted"] += 1
        return ticket

    # ---- sizes ----

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    def rows_in_use(self) -> int:
        return sum(t.rows for t in self.running + self.prefilling)

    def slots_in_use(self) -> int:
        """KV slots (positions x rows) reserved: the running tickets' and the prefilling tickets' whole need."""
        return sum(t.rows * t.slots for t in self.running + self.prefilling)

    def snapshot(self) -> dict:
        with self._lock:
            waiting = sum(t.rows for t in self.waiting)
        state = self.state
        return {**{k: self.counts[k] for k in ("decode_steps", "decode_rows", "prefill_runs", "submitted",
                                               "completed", "cancelled", "failed")},
                "running_rows": sum(t.rows for t in self.running), "prefilling_rows":
                sum(t.rows for t in self.prefilling), "waiting_rows": waiting,
                "kv_slots_in_use": 0 if state is None else int(state.lengths[state.live].sum()),
                "kv_slots_reserved": self.slots_in_use(),
                "kv_slots_allocated": 0 if state is None else state.rows * state.capacity,
                "max_rows": self.limits.max_rows, "max_kv_slots": self.max_slots}

    # ---- one iteration ----

    def step(self) -> None:
        """One iteration: leave, admit, one prefill chunk, join, one decode step (module docstring)."""
        self._leave_cancelled()
        self._admit()
        self._prefill_chunk()
        joined = self._join()
        self._decode(joined)
        self._retire_state()

    def _finish(self, ticket: Ticket, error: BaseException | None = None, cancelled: bool = False) -> None:
        if ticket.where is not None and self.state is not None:
            self.state.release_rows(ticket.where)
        ticket.where = None
        if ticket.own is not None:
            ticket.own.close()
            ticket.own = None
        if error is not None or cancelled:
            ticket.gen.cancel()
        ticket.error = error
        ticket.state = Ticket.DONE
        self.counts["failed" if error is not None else "cancelled" if cancelled else "completed"] += 1
        ticket.finished.set()

    def _leave_cancelled(self) -> None:
        with self._lock:
            gone = [t for t in self.waiting if t.cancelled.is_set()]
            for t in gone:
                self.waiting.remove(t)
        for group in (self.prefilling, self.running):
            gone += [t for t in group if t.cancelled.is_set()]
            group[:] = [t for t in group if not t.cancelled.is_set()]
        for t in gone:
            self._finish(t, cancelled=True)

    def _admit(self) -> None:
        from .engines.state import KVLayout

        while True:
            with self._lock:
                if not self.waiting:
                    return
                t = self.waiting[0]
                if (self.rows_in_use() + t.rows > self.limits.max_rows
                        or self.slots_in_use() + t.rows * t.slots > self.max_slots):
                    return   # in order: a large request is not overtaken forever by small ones
                self.waiting.popleft()
            self._layout = self._layout or KVLayout.from_bundle(self.model.bundle)
            try:
                t.own = self.engine.new_state(self._layout, t.rows, capacity_hint=t.dec.batch.ids.shape[1])
            except Exception as e:  # noqa: BLE001 - delivered to the request
                self._finish(t, error=e)
                continue
            t.state = Ticket.PREFILL
            self.prefilling.append(t)

    def _prefill_chunk(self) -> None:
        budget = self.limits.prefill_chunk
        for t in [t for t in self.prefilling if t.state == Ticket.PREFILL]:
            if budget <= 0:
                return
            batch = t.dec.batch
            lo = t.prefilled
            hi = min(batch.ids.shape[1], lo + budget)
            sl = slice(lo, hi)
            try:
                logits = t.own.step(self.engine, batch.ids[:, sl], batch.mask[:, sl], batch.positions[:, sl])
                self.counts["prefill_runs"] += 1
                budget -= hi - lo
                t.prefilled = hi
                if hi == batch.ids.shape[1]:
                    # the first token, from the prompt's last logits; pending for the first shared run
                    t.dec.record(t.dec.pick_host(logits))
                    t.state = Ticket.READY
                    if t.dec.finished:    # a one-token budget: nothing more to run
                        self.prefilling.remove(t)
                        self._finish(t)
            except Exception as e:  # noqa: BLE001 - this request's prompt or engine failure
                self.prefilling.remove(t)
                self._finish(t, error=e)

    def _join(self) -> bool:
        """Move the prefilled tickets into the shared state; whether any joined."""
        ready = [t for t in self.prefilling if t.state == Ticket.READY]
        if not ready or any(len(t.dec.pending) != 1 for t in self.running):
            return False
        if self.state is None:
            need = max(t.slots for t in ready)
            self.state = self.engine.new_state(self._layout, sum(t.rows for t in ready), capacity_hint=need)
            self.state.release_rows(slice(None))
        joined = False
        for t in ready:
            try:   # capacity grows with the longest row (onnxruntime's CPU attention reads every slot of it)
                t.where = self.state.add_rows(t.rows)
                self.state.adopt(t.own, np.arange(t.rows), t.where)
            except Exception as e:  # noqa: BLE001
                self.prefilling.remove(t)
                self._finish(t, error=e)
                continue
            t.own.close()
            t.own = None
            t.state = Ticket.RUNNING
            t.joined_at = self.counts["decode_steps"]
            self.prefilling.remove(t)
            self.running.append(t)
            joined = True
        return joined

    def _decode(self, joined: bool) -> None:
        if not self.running:
            return
        forced = [t.dec.forced() for t in self.running]
        if not joined and all(f is not None for f in forced):
            for t, f in zip(list(self.running), forced):   # no model run: the forced ids ride with the next one
                t.dec.pick.skip(len(t.dec.done))
                t.dec.record(np.maximum(f, 0))
                if t.dec.finished:
                    self.running.remove(t)
                    self._finish(t)
            return
        state, s = self.state, len(self.running[0].dec.pending)
        pad = self.model.bundle.tokens.pad
        ids = np.full((state.rows, s), pad, np.int64)
        for t in self.running:   # every stream of a sequence (cond and uncond rows) gets the ids
            ids[t.where] = np.tile(np.stack(t.dec.pending, axis=1), (t.dec.opts.streams, 1))
        positions = state.next_positions[:, None] + np.arange(s)
        try:
            logits = state.step(self.engine, ids, np.ones_like(ids), positions)
        except Exception as e:  # noqa: BLE001 - an engine failure: every running request gets it
            for t in self.running:
                self._finish(t, error=e)
            self.running = []
            return
        self.counts["decode_steps"] += 1
        self.counts["decode_rows"] += sum(t.rows for t in self.running)
        for t in list(self.running):
            t.dec.fed_to_model()
            try:
                t.dec.record(t.dec.pick_host(logits[t.where]))
            except Exception as e:  # noqa: BLE001 - e.g. a row with nothing allowed: this request only
                self.running.remove(t)
                self._finish(t, error=e)
                continue
            if t.dec.finished:
                self.running.remove(t)
                self._finish(t)

    def _retire_state(self) -> None:
        """Close the shared state once no row runs in it; rebuild it smaller when released rows outnumber the
        live ones (every run computes every row)."""
        state = self.state
        if state is None:
            return
        if not self.running:
            state.close()
            self.state = None
            return
        live = int(state.live.sum())
        if state.rows - live <= max(live, 2):
            return
        new = self.engine.new_state(self._layout, live, capacity_hint=max(t.slots for t in self.running))
        at = 0
        for t in self.running:
            where = np.arange(at, at + t.rows)
            new.adopt(state, t.where, where)
            t.where, at = where, at + t.rows
        state.close()
        self.state = new
        self.counts["compactions"] += 1

    def close(self) -> None:
        """Cancel every ticket and release every state."""
        for t in list(self.waiting) + self.prefilling + self.running:
            self._finish(t, cancelled=True)
        self.waiting.clear()
        self.prefilling, self.running = [], []
        if self.state is not None:
            self.state.close()
            self.state = None
