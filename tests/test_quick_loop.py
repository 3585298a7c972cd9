"""The README's quick developer loop (`python -m pytest -m "not export and not serve"`, no torch or Ray needed)
collects without the export and serve extras, and no test asserts wall time (speed lives in benchmarks/)."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import REPO

# what the export and serve extras bring; the runtime's base install + cpu + test has none of them
EXTRAS_ONLY = ("torch", "transformers", "onnx", "onnxscript", "ml_dtypes", "ray", "fastapi", "openai")

COLLECT = f"""
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)

sys.meta_path.insert(0, NotInstalled())
import pytest
sys.exit(pytest.main(["-m", "not export and not serve", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"]))
"""


def test_quick_loop_collects_without_the_export_and_serve_extras():
    r = subprocess.run([sys.executable, "-c", COLLECT], cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0 and "error" not in r.stdout.splitlines()[-1].lower(), tail
    assert "test_quick_loop.py::test_quick_loop_collects" in r.stdout, tail


_CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns", "process_time"}


def _reads_a_clock(node: ast.AST, derived: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr in _CLOCKS \
                and isinstance(sub.func.value, ast.Name) and sub.func.value.id == "time":
            return True
        if isinstance(sub, ast.Name) and sub.id in derived:
            return True
    return False


def timed_assertions(source: str) -> list[int]:
    """Line numbers of the `assert`s whose condition reads a clock, directly or through a name assigned from one
    (`elapsed = time.perf_counter() - start`; `end = time.monotonic() + 60` in a wait loop counts too)."""
    tree = ast.parse(source)
    derived: set[str] = set()
    for _ in range(3):   # start -> elapsed -> ...: a few rounds of propagation cover what tests write
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _reads_a_clock(node.value, derived):
                derived |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)
            and _reads_a_clock(node.test, derived)]


def test_no_test_asserts_wall_time():
    found = {p.name: lines for p in sorted((REPO / "tests").glob("*.py"))
             if (lines := timed_assertions(p.read_text()))}
    assert not found, f"timed assertions (measure speed in benchmarks/, bound work or memory in tests): {found}"


def test_the_timed_assertion_check_sees_the_usual_forms():
    assert timed_assertions("import time\nstart = time.perf_counter()\nf()\nassert time.perf_counter() - start < 1\n")
    assert timed_assertions("import time\nt0 = time.time()\nf()\nelapsed = time.time() - t0\nassert elapsed < 2\n")
    assert timed_assertions("end = time.monotonic() + 60\nwhile x:\n    assert time.monotonic() < end\n")
    assert not timed_assertions("import time\nt0 = time.time()\nassert x < 2\ntime.sleep(0.1)\n")
