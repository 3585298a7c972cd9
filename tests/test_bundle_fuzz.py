"""Fuzzing bundle.json: random edits to the tiny bundle's manifest either load and run, or fail with a one-line
typed error, in bounded work (engine runs) and memory, touching nothing outside the bundle copy and the temp
directories."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emu3_rt
from emu3_rt import BundleError, EngineError, PromptError

from .conftest import REPO, TINY_BUNDLE, engine_runs

MANIFEST = json.loads((TINY_BUNDLE / "bundle.json").read_text())
PEAK_BYTES = 256 << 20
# the work bound, counted rather than timed: "hi" is 19 prompt ids with the tiny template; at worst (prefill_chunk 1)
# every position runs the step graph and the sampler graph once, for the prompt and the 2 new tokens
MAX_ENGINE_RUNS = 2 * (19 + 2)


def _paths(node, prefix=()):
    """Every key path in the manifest, containers included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


PATHS = sorted(_paths(MANIFEST), key=repr)

REPLACEMENTS = st.sampled_from([
    0, -1, 1, 2, 3, True, False, None, 2**31, 2**40, 10**12, 2**63, -(2**63), 1.5, float("inf"), "", "%d", "%s",
    "%d%d", "past_key_values.%d.key", "present.%d.value", "../x", "x" * 300, "logits", "1:0", [], {}, [[0, 0, 1]],
    [[0, 811, 2**40]], ["batch_size", 2**40],
])


@st.composite
def edits(draw):
    """1-3 of: replace a value, delete a key, truncate a list, tweak an int."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        kind = draw(st.sampled_from(["replace", "delete", "truncate", "tweak"]))
        arg = draw(REPLACEMENTS) if kind == "replace" else draw(st.integers(-3, 3))
        out.append((path, kind, arg))
    return out


def _has(node, key) -> bool:
    """Whether `node[key]` exists (an earlier edit may have replaced a dict by a list or a number)."""
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and key < len(node)


def _apply(manifest, edit) -> None:
    path, kind, arg = edit
    node = manifest
    for key in path[:-1]:
        if not _has(node, key):
            return  # an earlier edit removed the way there
        node = node[key]
    key = path[-1]
    if not _has(node, key):
        return
    if kind == "replace":
        node[key] = arg
    elif kind == "delete":
        node.pop(key)
    elif kind == "truncate" and isinstance(node[key], list):
        node[key] = node[key][: max(arg, 0)]
    elif kind == "tweak" and type(node[key]) is int:
        node[key] += arg


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(TINY_BUNDLE, dst)
    return dst


@pytest.fixture
def runs(monkeypatch):
    return engine_runs(monkeypatch)


def _snapshot(root):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=edits())
def test_edited_manifest_loads_or_fails_cleanly(fuzz_bundle, runs, changes):
    runs.clear()   # the fixture is set up once for all of hypothesis' examples
    manifest = json.loads(json.dumps(MANIFEST))
    for edit in changes:
        _apply(manifest, edit)
    (fuzz_bundle / "bundle.json").write_text(json.dumps(manifest))
    before = (_snapshot(fuzz_bundle), _snapshot(TINY_BUNDLE), sorted(os.listdir(REPO)))
    tracemalloc.start()
    try:
        model = emu3_rt.load(fuzz_bundle)
        model.chat("hi", max_new_tokens=2, sampling=emu3_rt.SamplingOptions(greedy=True))
    except (BundleError, EngineError, PromptError, ValueError) as e:
        assert "\n" not in str(e), str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # bounded by memory, not a clock: on a shared machine a clock measures the load (4.7 s for a refused
    # manifest at load average 13), not the runtime
    assert len(runs) <= MAX_ENGINE_RUNS, (changes, len(runs))
    assert peak < PEAK_BYTES, (changes, peak)
    assert (_snapshot(fuzz_bundle), _snapshot(TINY_BUNDLE), sorted(os.listdir(REPO))) == before
