"""OrtEngine: one ONNX graph in an onnxruntime session (CPU, CUDA or the TensorRT execution provider).

The session is created on the first `run`, so chat never loads the VQ decoder. A requested provider that
onnxruntime cannot load raises instead of silently falling back to the CPU. On the CPU, the optimized graph is kept
in the per-user cache (see "optimized-graph cache" below): later sessions skip parsing weights stored inside the graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import integrity
from ..bundle import GraphSpec
from .base import EngineError, check_io

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(bool)": "bool"}
# intra-op threads beyond this only thrash (and 100000 stalls the machine while onnxruntime spawns them)
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def check_threads(threads) -> int:
    """`threads` as an int in [0, MAX_THREADS] (0: onnxruntime's default); TypeError / ValueError otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be an int, got {type(threads).__name__}")
    if not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be in [0, {MAX_THREADS}] (0: one per physical core), got {threads}")
    return int(threads)


@dataclass(frozen=True)
class OrtOptions:
    # "cpu", "cuda" or "tensorrt" (the TensorRT execution provider, with CUDA then CPU for unsupported nodes)
    device: str = "cpu"
    # intra-op threads; 0 lets onnxruntime use one per physical core
    threads: int = 0
    # GPU ordinal for cuda / tensorrt
    device_id: int = 0
    # directory for TensorRT engine and timing caches (inside the bundle by default: see OrtEngine)
    trt_cache_dir: str | None = None
    # device "cpu": keep each graph's optimized form in the per-user cache and load that next time (a graph whose
    # weights are already external data is never copied: it has nothing to gain). Ignored on other devices.
    cache_optimized: bool = True
    # device "cuda": decode steps replay CUDA graphs (onnxruntime's enable_cuda_graph; one graph per decode state
    # and KV capacity block, kept by onnxruntime until the engine closes, so meant for a dedicated decode process).
    # A graph onnxruntime cannot capture (nodes outside the CUDA EP) raises EngineError when the session opens.
    cuda_graph: bool = False
    # device "cpu": onnxruntime copies every MatMul / Gemm weight into MLAS's packed layout when the session opens
    # ("prepacking"). Packed weights make steps of 2+ rows and prefill faster (a CFG step of the 2-layer
    # real-geometry slice: 3x), but cost ~3-4 s per GB at session creation and a heap copy of the weights (2-layer
    # slice, fp32: 32 s and 4.6 GB). False leaves them in the external data file onnxruntime maps (page cache,
    # shared between processes): the session opens in 0.3 s and a one-row step (chat) is as fast (MLAS's GEMV
    # reads the weights as stored). See benchmarks/startup.py.
    prepack: bool = True
    # intra-op workers spin while waiting for work (onnxruntime's default). The sampler graph turns it off: it runs
    # right after every step in its own session, and its spinning workers would take the cores from the next
    # step's (chat on mid: 29 tok/s with, 47 without; the step's own spinning is worth ~10 %)
    spinning: bool = True

    def __post_init__(self):
        object.__setattr__(self, "threads", check_threads(self.threads))
        for name in ("cache_optimized", "prepack"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {type(getattr(self, name)).__name__}")
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, numbers.Integral):
            raise TypeError(f"device_id must be an int, got {type(self.device_id).__name__}")
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {type(self.cuda_graph).__name__}")
        if self.cuda_graph and self.device != "cuda":
            raise ValueError(f"cuda_graph needs device 'cuda', got {self.device!r}")


def import_onnxruntime():
    # onnxruntime >= 1.2x on Linux writes a telemetry database under ~/.cache/Microsoft when it is imported; the
    # variable must be set before the import (disable_telemetry_events covers an onnxruntime imported earlier).
    # An explicit ORT_DISABLE_TELEMETRY=0 from the user is kept.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError:
        raise EngineError("onnxruntime is not installed: pip install 'emu3-bundle[cpu]' (or [gpu])") from None
    if hasattr(onnxruntime, "disable_telemetry_events") and os.environ["ORT_DISABLE_TELEMETRY"] != "0":
        onnxruntime.disable_telemetry_events()
    return onnxruntime


# ---- optimized-graph cache ----
# Creating a session from a graph that stores its weights inline costs protobuf parsing of every weight byte: 1.4 s
# of the 2.0 s for an 870 MB step graph (benchmarks/startup.py; graph optimization itself is ~1 %). onnxruntime
# saves the optimized graph with its weights as external data, which later sessions read without that parse.
# A graph saved at level ALL may hold fused and layout-specific nodes (NCHWc blocks sized for this CPU's vector
# width), valid only for the same onnxruntime, execution provider and CPU, so all of them key the entry; the
# graph's sha256 is the one bundle.json lists (integrity.graph_digest reuses the stamp of the load's check).
# An entry is a directory written whole and renamed into place; its stamp.json holds the (size, mtime, ctime,
# inode) of its files, so a file changed since is never loaded. An entry that fails to load is deleted and
# rebuilt from the bundle's graph.

CACHE_FORMAT = 1
_GRAPH, _DATA, _STAMP = "graph.onnx", "graph.onnx.data", "stamp.json"


def _cpu_id() -> str:
    """The machine and a digest of its CPU feature flags (/proc/cpuinfo), which decide MLAS kernels and layouts."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features", "isa"):  # x86, ARM, RISC-V
                flags.update(value.split())
    detail = " ".join(sorted(flags)) or platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(detail.encode()).hexdigest()[:16]}"


def cache_key(ort, graph_sha256: str, provider: str, level: str) -> str:
    """The hex digest naming a cache entry: everything the saved graph depends on."""
    fields = {"format": CACHE_FORMAT, "graph": graph_sha256, "ort": ort.__version__,
              "build": ort.get_build_info(), "provider": provider, "level": level, "cpu": _cpu_id()}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _file_stamps(entry: Path) -> dict[str, list[int]]:
    stamps = {}
    for f in sorted(entry.iterdir()):
        if f.name != _STAMP:
            st = f.stat()
            stamps[f.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return stamps


def _entry_intact(entry: Path) -> bool:
    """The entry's files are exactly those stamped when it was written, unchanged (a stat each)."""
    stamps = integrity.load_cached_json(entry / _STAMP, 1 << 16)
    try:
        return isinstance(stamps, dict) and stamps == _file_stamps(entry) and _GRAPH in stamps
    except OSError:
        return False


def _drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# Entries being written by this process: temporary directories named .tmp-<host>-<pid>-*, where onnxruntime writes
# the optimized graph (and its weights: GBs for a big bundle) from whatever thread opens the session. A process that
# leaves while such a thread is still inside onnxruntime (the CLI ends with os._exit: an early error, Ctrl-C, TERM)
# never reaches that thread's cleanup, so the CLI calls remove_partial_entries() on its way out; a writer that was
# killed (SIGKILL, a crash) leaves one behind, which the next writer on the same host removes.
_partial: set[Path] = set()
_partial_lock = threading.Lock()
_leaving = False   # set by remove_partial_entries: no new temporary entry from then on


def _tmp_prefix(pid: int | None = None) -> str:
    host = hashlib.sha256(platform.node().encode()).hexdigest()[:8]
    return f".tmp-{host}-{os.getpid() if pid is None else pid}-"


def _writer_gone(tmp: Path) -> bool:
    """A temporary entry whose writer is a dead process on this host, or any older than a day (another host's)."""
    with contextlib.suppress(OSError):
        if tmp.stat().st_mtime < time.time() - 86400:
            return True
    pid = tmp.name.split("-")[2] if tmp.name.count("-") >= 3 else ""
    if not pid.isdigit() or not tmp.name.startswith(_tmp_prefix(int(pid))) or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:   # alive, another user's
        pass
    return False


def remove_partial_entries() -> None:
    """Delete the temporary cache entries this process is still writing (threads inside onnxruntime keep going
    until the process ends: a file they create afterwards has no directory to go to)."""
    global _leaving
    with _partial_lock:
        _leaving = True
        pending = list(_partial)
    for tmp in pending:
        for _ in range(5):   # a writer may add a file between rmtree's listing and its rmdir
            _drop(tmp)
            if not tmp.exists():
                break


# ---- fp16 graphs on the CPU ----
# onnxruntime's CPU provider has no fp16 MatMul / Gemm kernels: it wraps them in Casts and converts their weights to
# fp32 copies on the heap when the session opens (measured on the 2-layer real-geometry slice: 38 s and 4.8 GB for
# 4.2 GB of fp16 weights, against 0.3 s for the fp32 bundle's mapped weights), then computes in fp32. An fp16 bundle
# whose copies cannot fit in memory is refused before onnxruntime tries (the 8B needs ~2x its 16 GB).

def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, None where there is none (not Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_fp16_fits(spec: GraphSpec) -> None:
    """EngineError when `spec` is an fp16 graph (its KV inputs are float16) whose fp32 weight copies, up to twice
    its external data, exceed the memory available now."""
    if not any(t.dtype == "float16" for t in spec.inputs):
        return
    _, locations = integrity.graph_digest(spec.path)
    data = sum((spec.path.parent / name).stat().st_size for name in locations if (spec.path.parent / name).is_file())
    available = _mem_available()
    if available is not None and 2 * data > available:
        raise EngineError(f"{spec.path.name}: an fp16 graph runs on onnxruntime's CPU through fp32 copies of its "
                          f"weights (up to {2 * data / 1e9:.1f} GB, {available / 1e9:.1f} GB available); export "
                          f"--dtype fp32 for the CPU (its weights stay mapped) or --quantize int8 / int4, or run "
                          f"it on a GPU (--device cuda)")


class GraphIds:
    """CUDA graph ids for one session. onnxruntime keeps every graph it captured until the session closes, and a
    graph replays the addresses it was captured with, so an id is handed out per binding signature (the bound
    names, addresses and shapes) and returned when the binding goes: a later state whose buffers land at the same
    addresses (CudaMemory(reuse=True) hands freed blocks back in order) replays the same graph instead of
    capturing a new one. Ids start at 1 (0 is onnxruntime's default graph, -1 means none)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[tuple, list[int]] = {}   # signature -> ids captured for it, not in use
        self._taken: dict[int, tuple] = {}
        self.made = 0

    def take(self, signature: tuple) -> int:
        with self._lock:
            free = self._free.get(signature)
            if free:
                gid = free.pop()
            else:
                self.made += 1
                gid = self.made
            self._taken[gid] = signature
            return gid

    def give(self, gid: int) -> None:
        with self._lock:
            self._free.setdefault(self._taken.pop(gid), []).append(gid)

    @property
    def in_use(self) -> int:
        return len(self._taken)


class OrtEngine:
    def __init__(self, spec: GraphSpec, options: OrtOptions = OrtOptions()):
        if options.device not in PROVIDERS:
            raise EngineError(f"unknown onnxruntime device {options.device!r}; choose one of {sorted(PROVIDERS)}")
        self.spec = spec
        self.options = options
        self._session = None
        self._lock = threading.Lock()
        self.closed = False
        self._memory = None
        self._graph_ids = GraphIds()
        self._graph_lock = threading.Lock()

    def _providers(self, ort) -> list:
        wanted = PROVIDERS[self.options.device]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise EngineError(f"{wanted[0]} is not available in this onnxruntime ({', '.join(available)}); "
                              f"install emu3-bundle[gpu] on a machine with CUDA")
        opts = {"device_id": self.options.device_id}
        providers: list = []
        for name in wanted:
            if name == "TensorrtExecutionProvider":
                cache = self.options.trt_cache_dir or str(self.spec.path.parent / "trt_cache")
                providers.append((name, {**opts, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                         "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}))
            elif name == "CUDAExecutionProvider":
                graph = {"enable_cuda_graph": "1"} if self.options.cuda_graph else {}
                providers.append((name, {**opts, **graph}))
            else:
                providers.append(name)
        return providers

    @property
    def session(self):
        # a timed wait: another thread (a warm-up thread) may hold the lock while it opens the session, which takes
        # a minute for a big bundle, and a signal the kernel hands to one of onnxruntime's worker threads reaches
        # Python's handler only when the main thread runs Python again: polling lets Ctrl-C / SIGTERM act at once
        while not self._lock.acquire(timeout=0.1):
            pass
        try:
            if self.closed:
                raise EngineError(f"{self.spec.path.name}: the engine is closed")
            if self._session is None:
                self._session = self._create()
        finally:
            self._lock.release()
        return self._session

    def _create(self):
        ort = import_onnxruntime()
        if hasattr(ort, "preload_dlls") and self.options.device != "cpu":
            ort.preload_dlls()  # NVIDIA runtime wheels, when onnxruntime-gpu[cuda] installed them
        path = self.spec.path
        if not path.is_file():
            raise EngineError(f"{path}: graph file is missing")
        integrity.recheck(self.spec.files)  # the files may have changed since load_bundle checked them
        providers = self._providers(ort)
        if self.options.device == "cpu":
            check_fp16_fits(self.spec)
        entry = self._cache_entry(ort)
        sess = self._open_cached(ort, entry, providers) if entry is not None else None
        if sess is None:
            sess = self._open_saving(ort, entry, providers) if entry is not None else None
        if sess is None:
            sess = self._open(ort, path, self._session_options(ort, "ORT_ENABLE_ALL"), providers)
            self._check(sess)
        self._output_names = [o.name for o in sess.get_outputs()]
        self.ort = ort
        # bound runs without a captured graph; -1 tells a cuda_graph session not to capture or replay one
        self._run_options = ort.RunOptions()
        if self.options.cuda_graph:
            self._run_options.add_run_config_entry("gpu_graph_id", "-1")
        return sess

    def _session_options(self, ort, level: str):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        if not self.options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self.options.prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        return so

    def _open(self, ort, path: Path, so, providers):
        try:
            return ort.InferenceSession(str(path), so, providers=providers)
        except EngineError:
            raise
        except Exception as e:  # ORT raises its own exception types for corrupt or truncated models
            if self.options.cuda_graph:
                raise EngineError(f"{path.name}: onnxruntime cannot capture this graph as a CUDA graph "
                                  f"({str(e).splitlines()[0][:200]}); run without cuda_graph") from None
            raise EngineError(f"{path.name}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None

    def _check(self, sess) -> None:
        """The session runs on the requested provider and its I/O is what bundle.json declares."""
        name = self.spec.path.name
        if sess.get_providers()[0] != PROVIDERS[self.options.device][0]:
            raise EngineError(f"{name}: onnxruntime fell back to {sess.get_providers()[0]} instead of "
                              f"{PROVIDERS[self.options.device][0]}")
        io = {side: {a.name: (_ORT_TYPES.get(a.type, a.type), tuple(a.shape)) for a in args}
              for side, args in (("in", sess.get_inputs()), ("out", sess.get_outputs()))}
        check_io(self.spec, io["in"], io["out"])

    # ---- the optimized-graph cache (see the banner above the class) ----

    def _cache_entry(self, ort) -> Path | None:
        """Where this graph's optimized form is kept, or None when it is not cached: the cache is off, the device
        is not the CPU, or the graph's weights are external data already (saving would copy them for nothing)."""
        if not self.options.cache_optimized or self.options.device != "cpu":
            return None
        sha, external = integrity.graph_digest(self.spec.path)
        if external:
            return None
        key = cache_key(ort, sha, PROVIDERS["cpu"][0], "ORT_ENABLE_ALL")
        return integrity.cache_dir() / "ort" / f"{self.spec.path.stem}-{key[:32]}"

    def _open_cached(self, ort, entry: Path, providers):
        """A session on the cached optimized graph (already optimized: loaded at level DISABLE_ALL), or None on a
        miss. An entry that is changed, fails to load or does not match bundle.json is deleted."""
        if not entry.is_dir():
            return None
        if _entry_intact(entry):
            try:
                sess = ort.InferenceSession(str(entry / _GRAPH), self._session_options(ort, "ORT_DISABLE_ALL"),
                                            providers=providers)
                self._check(sess)
                return sess
            except Exception:  # any failure means a bad entry: it is rebuilt from the bundle's graph
                pass
        _drop(entry)
        return None

    def _open_saving(self, ort, entry: Path, providers):
        """A session on the bundle's graph that also writes the cache entry (into a temporary directory renamed
        into place, so readers never see half an entry). None when the entry cannot be written: the caller then
        opens the graph without saving, and a broken graph raises there."""
        try:
            entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            for stale in entry.parent.glob(".tmp-*"):  # left by a writer that was killed
                if _writer_gone(stale):
                    _drop(stale)
            with _partial_lock:
                if _leaving:
                    return None
                tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=_tmp_prefix()))
                _partial.add(tmp)
        except OSError:
            return None
        so = self._session_options(ort, "ORT_ENABLE_ALL")
        so.optimized_model_filepath = str(tmp / _GRAPH)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", _DATA)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            try:
                sess = ort.InferenceSession(str(self.spec.path), so, providers=providers)
                (tmp / _STAMP).write_text(json.dumps(_file_stamps(tmp)))
            except Exception:  # disk full, or a broken graph: opened again without saving, which says why
                return None
            self._check(sess)
            with contextlib.suppress(OSError):  # another process renamed its entry into place first
                os.rename(tmp, entry)
            return sess
        finally:
            _drop(tmp)  # nothing left there once renamed
            with _partial_lock:
                _partial.discard(tmp)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session
        try:
            values = sess.run(self._output_names, feeds)
        except Exception as e:
            raise EngineError(f"{self.spec.path.name}: run failed ({str(e).splitlines()[0][:200]})") from None
        return dict(zip(self._output_names, values))

    # ---- bound runs and decode states (engines/base.py's BoundEngine and StepEngine) ----

    @property
    def memory(self):
        """Where this engine's decode states live: host memory on the CPU, the CUDA device otherwise (made once)."""
        with self._lock:
            if self._memory is None:
                from .memory import CudaMemory, HostMemory

                self._memory = HostMemory() if self.options.device == "cpu" else CudaMemory(
                    self.options.device_id, reuse=self.options.cuda_graph)
        return self._memory

    def new_state(self, layout, rows: int, capacity_hint: int = 0, memory=None):
        """One generation's decode state on this engine (engines/state.DecodeState over self.memory, or `memory`);
        a concat-layout bundle gets kv_cache.ConcatCache. CUDA graphs: capacities grow in KV_BLOCK multiples, so a
        generation captures few graphs."""
        from .. import kv_cache
        from .state import DecodeState

        if layout.kind != "buffer":
            return kv_cache.ConcatCache(layout, rows, owner=self)
        _ = self.session   # first: a missing provider is the error to report
        grow = kv_cache.block_capacity if self.options.cuda_graph else kv_cache.capacity_for
        return DecodeState(self, layout, rows, self.spec.output(layout.logits).dims[1], capacity_hint,
                           memory if memory is not None else self.memory, grow)

    def bind(self, memory, stream, inputs: dict, outputs: dict, graph: bool = False) -> _Binding:
        """An IOBinding of memory.Buffers (by address, so onnxruntime reads and writes them in place)."""
        from .memory import ONNX_TYPE

        b = self.session.io_binding()
        for side, bind in ((inputs, b.bind_input), (outputs, b.bind_output)):
            for name, buf in side.items():
                bind(name, memory.device_type, memory.device_id, ONNX_TYPE[buf.dtype], list(buf.shape), buf.ptr)
        graph_id = None
        if graph and self.options.cuda_graph:
            graph_id = self._graph_ids.take(tuple((n, buf.ptr, buf.shape) for side in (inputs, outputs)
                                                  for n, buf in sorted(side.items())))
        return _Binding(b, memory, stream, graph_id, inputs, outputs)

    def execute(self, binding: _Binding) -> None:
        """Wait for the stream's queued copies (onnxruntime runs on its own stream and synchronizes it when the run
        ends), then run. Under cuda_graph every run holds the engine's lock: a session that captures graphs runs
        one Run at a time (its captured graphs share the session's memory), whichever threads step the states."""
        binding.memory.sync(binding.stream)
        sess = self.session
        try:
            if not self.options.cuda_graph:   # no RunOptions: onnxruntime's wrapper probes them (~10 us a run)
                sess.run_with_iobinding(binding.io)
                return
            opts = self._run_options
            if binding.graph_id is not None:
                opts = self.ort.RunOptions()
                opts.add_run_config_entry("gpu_graph_id", str(binding.graph_id))
            with self._graph_lock:
                sess.run_with_iobinding(binding.io, opts)
        except Exception as e:
            raise EngineError(f"{self.spec.path.name}: run failed ({str(e).splitlines()[0][:200]})") from None

    def unbind(self, binding: _Binding) -> None:
        if binding.graph_id is not None:
            self._graph_ids.give(binding.graph_id)
            binding.graph_id = None
        binding.io = None

    def release(self, stream) -> None:
        pass

    def close(self) -> None:
        """Drop the session; states made by this engine are refused from now on (idempotent)."""
        with self._lock:
            self.closed, self._session = True, None


class _Binding:
    """An onnxruntime IOBinding with the memory and stream its buffers' copies are queued on; graph_id: the CUDA
    graph it replays (one-token steps of one capacity under cuda_graph), None otherwise."""

    def __init__(self, io, memory, stream, graph_id: int | None, inputs: dict, outputs: dict):
        self.io, self.memory, self.stream, self.graph_id = io, memory, stream, graph_id
        self.inputs, self.outputs = inputs, outputs   # name -> memory.Buffer
