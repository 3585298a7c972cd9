"""The runtime's import boundary and the project's lint rules, checked the way CI sees them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, TINY_BUNDLE

FORBIDDEN = ("torch", "transformers", "onnx", "export", "emu3_export", "runtime")


def test_import_emu3_rt_pulls_no_torch():
    code = (
        "import sys, emu3_rt\n"
        f"b = emu3_rt.load_bundle({str(TINY_BUNDLE)!r}, verify=True)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("tool,args", [("ruff", ["check", "."]), ("lint-imports", [])])
def test_lint(tool, args):
    # the running interpreter's own venv first: its python may be run without activating the venv
    beside = Path(sys.executable).with_name(tool)
    exe = str(beside) if beside.is_file() else shutil.which(tool) or str(REPO / ".venv" / "bin" / tool)
    r = subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
