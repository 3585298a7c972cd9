"""AsyncMemory: a host-memory backend whose work lands only at sync(stream), as a CUDA stream's does.

Copies (and any work a test engine enqueues) wait in their stream's queue until that stream is synchronized, so a
decode state that reads a result, runs an engine or frees a buffer before syncing sees stale bytes or fails here,
on the CPU. Freeing a buffer that queued work still touches raises (a device use-after-free).
"""

from __future__ import annotations

import threading

from emu3_rt.engines.memory import HostMemory


class UseAfterFree(AssertionError):
    pass


class AsyncMemory(HostMemory):
    def __init__(self):
        super().__init__()
        self._queues: dict[int, list] = {}
        self._lock = threading.Lock()
        self.violations: list[str] = []

    def stream(self):
        s = super().stream()
        with self._lock:
            self._queues[s] = []
        return s

    def close_stream(self, stream) -> None:
        with self._lock:
            pending = self._queues.pop(stream)
        if pending:
            self.violations.append(f"stream {stream} destroyed with {len(pending)} operations never synchronized")
        super().close_stream(stream)

    def enqueue(self, stream, fn, spans=()) -> None:
        """Queue fn() on `stream`; spans: the (address, nbytes) it reads or writes (checked by free)."""
        with self._lock:
            self._queues[stream].append((fn, tuple(spans)))

    def copy2d(self, dst, dpitch, src, spitch, width, height, stream) -> None:
        copy = HostMemory.copy2d
        span = (lambda p, pitch: (p, pitch * max(height - 1, 0) + width))
        self.enqueue(stream, lambda: copy(self, dst, dpitch, src, spitch, width, height, stream),
                     (span(dst, dpitch), span(src, spitch)))

    def sync(self, stream) -> None:
        with self._lock:
            work, self._queues[stream] = self._queues[stream], []
        for fn, _ in work:
            fn()

    def pending(self, stream=None) -> int:
        with self._lock:
            queues = self._queues.values() if stream is None else [self._queues[stream]]
            return sum(len(q) for q in queues)

    def free(self, buf) -> None:
        lo, hi = buf.ptr, buf.ptr + max(buf.nbytes, 1)
        with self._lock:
            hits = [s for s, q in self._queues.items() for _, spans in q
                    for p, n in spans if p < hi and lo < p + n]
        if hits:
            self.violations.append(f"buffer {buf.shape} {buf.dtype} freed with work in flight on stream {hits[0]}")
            raise UseAfterFree(self.violations[-1])
        super().free(buf)
