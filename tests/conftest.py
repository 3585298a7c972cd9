"""Shared fixtures: seeded tiny Emu3 checkpoints built with transformers and their exported bundles.

Both are built once per test session (a few seconds each) into a temporary directory; tests that need them
carry the `export` marker, because building needs torch + transformers (the `export` extra). CI installs it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_BUNDLE = REPO / "models" / "emu3-tiny"


def _needs_export():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """preset name -> checkpoint directory, built on first use."""
    _needs_export()
    from export.tiny import build_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in cache:
            cache[preset] = build_checkpoint(root / preset, preset, seed=0)
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, checkpoints):
    """(preset, opset, head, kv_cache) -> (bundle directory, manifest, parity checks), exported on first use."""
    from export.build import ExportOptions, build_bundle

    root = tmp_path_factory.mktemp("bundles")
    cache: dict[tuple, tuple] = {}

    def get(preset: str, opset: int = 18, head: str = "both", kv_cache: str = "buffer"):  # head: export's default
        key = (preset, opset, head, kv_cache)
        if key not in cache:
            out = root / f"{preset}-op{opset}-{head}-{kv_cache}"
            options = ExportOptions(opset=opset, head=head, kv_cache=kv_cache)
            manifest, checks = build_bundle(checkpoints(preset), out, options)
            cache[key] = (out, manifest, checks)
        return cache[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def stamp_cache(tmp_path_factory):
    """Bundle hash stamps (emu3_rt.integrity) go to a temporary directory, never the user's cache; subprocesses
    inherit the variable."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("emu3-rt-cache")
        mp.setenv("EMU3_RT_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def bundle_copy(tmp_path):
    """A writable copy of the checked-in tiny bundle."""
    dst = tmp_path / "bundle"
    shutil.copytree(TINY_BUNDLE, dst)
    return dst


def refresh_hash(root: Path, name: str) -> None:
    """Re-record a bundle file's size and sha256 after a test edits it, so only the check under test can object."""
    m = json.loads((root / "bundle.json").read_text())
    data = (root / name).read_bytes()
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (root / "bundle.json").write_text(json.dumps(m))


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `emu3-rt ARGV` in-process: (exit code, stdout, stderr)."""
    from emu3_rt.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def finishes(fn, seconds: float = 60.0):
    """Run fn in a daemon thread and hand back its exception (or None). A watchdog, never a speed bound: the calls
    it guards take milliseconds, and the failure it catches (a blocking open of a FIFO) never returns, so the test
    fails instead of hanging the suite."""
    box = {}

    def work():
        try:
            fn()
            box["err"] = None
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["err"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (blocked?)"
    return box["err"]


def in_threads(n: int, fn, seconds: float = 60.0) -> list:
    """fn(i) for i in range(n), each in its own thread started together: the results in order. Raises the first
    exception a thread raised, and fails a thread still running after `seconds` (a hang watchdog)."""
    got, errors = {}, []

    def work(i):
        try:
            got[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds)
    assert not any(t.is_alive() for t in threads), f"still running after {seconds} s (blocked?)"
    if errors:
        raise errors[0]
    return [got[i] for i in range(n)]


def engine_runs(monkeypatch) -> list[str]:
    """Every OrtEngine run from now on, one-shot (run) or on a decode state's bound buffers (execute), as the graph
    file's name (in order): to count steps and sampler calls."""
    from emu3_rt.engines import ort

    calls: list[str] = []
    real_run, real_execute = ort.OrtEngine.run, ort.OrtEngine.execute

    def run(self, feeds):
        calls.append(self.spec.path.name)
        return real_run(self, feeds)

    def execute(self, binding):
        calls.append(self.spec.path.name)
        return real_execute(self, binding)

    monkeypatch.setattr(ort.OrtEngine, "run", run)
    monkeypatch.setattr(ort.OrtEngine, "execute", execute)
    return calls
