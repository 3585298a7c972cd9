"""The offline tools' command lines (export, export.tiny, export.build_trt, benchmarks.*), run as a user runs them.

Fast checks (no torch): real program names, every option described with its default once, no abbreviations,
usage and path errors in one line naming the flag or path, `--help` without importing torch. The `export`-marked
test runs the tiny checkpoint through `python -m export.tiny` and `python -m export` and reads the progress lines.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

TOOLS = ["export", "export.tiny", "export.build_trt", "benchmarks.e2e", "benchmarks.soak", "benchmarks.train",
         "benchmarks.variants", "benchmarks.serve", "benchmarks.startup", "benchmarks.gpu"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _entries(help_text: str) -> list[str]:
    """The help's argument entries (an entry starts at a line indented by exactly two spaces), -h excluded."""
    body = help_text.split("\noptions:\n", 1)[1] if "\noptions:\n" in help_text else help_text
    if "\npositional arguments:\n" in help_text:
        body = help_text.split("\npositional arguments:\n", 1)[1]
    entries: list[str] = []
    for line in body.splitlines():
        if re.match(r"^  \S", line):
            entries.append(line.strip())
        elif line.startswith("   ") and entries:
            entries[-1] += "  " + line.strip()
    return [e for e in entries if not e.startswith("-h, --help")]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_names_the_program_and_states_each_default_once(tool):
    r = _run(tool, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m {tool} "), r.stdout.splitlines()[0]
    assert "(default: None)" not in r.stdout
    entries = _entries(r.stdout)
    assert entries, r.stdout
    for entry in entries:
        flag, _, text = entry.partition("  ")
        assert len(text.split()) >= 2, f"{tool} {flag}: no help text"
        assert entry.lower().count("default") <= 1, f"{tool} {flag}: default stated twice: {entry}"


INSTALLED = """
import importlib.util, json
from importlib.metadata import entry_points
spec = importlib.util.find_spec("emu3_export")
print(json.dumps({"script": bool(entry_points(group="console_scripts", name="emu3-export")),
                  "package": spec.origin if spec else None}))
"""


@pytest.mark.parametrize("command", [["emu3-export"], ["-m", "emu3_export"], ["-m", "emu3_export.tiny"],
                                     ["-m", "emu3_export.build_trt"]], ids=" ".join)
def test_installed_exporter_runs_from_any_directory(tmp_path, command):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # what the install provides, not the checkout
    r = subprocess.run([sys.executable, "-c", INSTALLED], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=60)
    installed = json.loads(r.stdout)
    if not installed["script"]:   # an editable install made before emu3-export existed; a fresh one (CI) has it
        pytest.skip("the installed emu3-bundle predates emu3-export: reinstall it (pip install -e .)")
    where = Path(installed["package"] or "").parent
    if where.name == "export" and where != REPO / "export":
        pytest.skip(f"emu3_export is installed from another checkout ({where})")
    assert installed["package"], "emu3-export is declared but the emu3_export package is not installed"
    script = Path(sys.executable).with_name("emu3-export")
    argv = [str(script)] if command == ["emu3-export"] else [sys.executable, *command]
    r = subprocess.run([*argv, "--help"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    name = "emu3-export" if command == ["emu3-export"] else f"python -m {command[1]}"
    assert r.stdout.startswith(f"usage: {name} "), r.stdout.splitlines()[:1]


# a prefix of a real option must be refused, not read as that option (argparse's allow_abbrev)
ABBREVIATED = [
    ("export", ["--checkpoint", "/x", "--out", "y", "--overw"], "--overw"),
    ("export", ["--check", "/x", "--checkpoint", "/x", "--out", "y"], "--check"),
    ("export.tiny", ["--pre", "tiny", "out"], "--pre"),
    ("export.build_trt", ["--bundle", "b", "--max-b", "2"], "--max-b"),
    ("benchmarks.e2e", ["--conf", "tiny"], "--conf"),
    ("benchmarks.soak", ["--image", "3"], "--image"),
    ("benchmarks.train", ["--step", "3"], "--step"),
    ("benchmarks.variants", ["--variant", "int8"], "--variant"),
]


@pytest.mark.parametrize("tool,args,typed", ABBREVIATED)
def test_abbreviations_are_refused(tool, args, typed):
    r = _run(tool, *args)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"python -m {tool}: error: unrecognized arguments: ") and typed in lines[0]


# bad values: the error names the flag the user typed and the accepted range, never a Python function or type
BAD_VALUES = [
    ("export", ["--checkpoint", "c", "--out", "o", "--block-size", "x"], "argument --block-size: expected a whole"),
    ("export", ["--checkpoint", "c", "--out", "o", "--block-size", "48"], "--block-size: must be a power of two"),
    ("export", ["--checkpoint", "c", "--out", "o", "--opset", "x"], "argument --opset: expected a whole number"),
    ("export", ["--checkpoint", "c", "--out", "o", "--image-area", "0"], "argument --image-area: must be >= 64"),
    ("export.tiny", ["out", "--seed", "-1"], "argument --seed: must be between 0 and"),
    ("export.build_trt", ["--bundle", "b", "--max-batch", "0"], "argument --max-batch: must be between 1 and 1024"),
    ("export.build_trt", ["--bundle", "b", "--max-image-side", "100"], "--max-image-side: must be a multiple of 8"),
    ("benchmarks.e2e", ["--threads", "two"], "argument --threads: expected a whole number, got 'two'"),
    ("benchmarks.e2e", ["--grid", "16", "0"], "argument --grid: must be between 1 and 1024, got 0"),
    ("benchmarks.soak", ["--images", "-5"], "argument --images: must be >= 1, got -5"),
    ("benchmarks.train", ["--steps", "1.5"], "argument --steps: expected a whole number, got '1.5'"),
    ("benchmarks.variants", ["--contexts", "64", "0"], "argument --contexts: must be >= 1, got 0"),
]


@pytest.mark.parametrize("tool,args,message", BAD_VALUES)
def test_bad_values_name_the_flag(tool, args, message):
    r = _run(tool, *args)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "invalid" not in lines[0] and "function" not in lines[0]


def _checkpoint_errors(tmp_path):
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    original = tmp_path / "orig"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"model_type": "Emu3"}))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    return [
        (tmp_path / "missing", "checkpoint directory does not exist"),
        (a_file, "not a directory"),
        (no_config, "no config.json; expected a Transformers Emu3 -hf checkpoint directory"),
        (llama, "config.json has model_type 'llama', not 'emu3'"),
        (original, "config.json has model_type 'Emu3', not 'emu3' (an original remote-code release: "
                   "use its -hf conversion)"),
    ]


def test_export_names_a_wrong_checkpoint_in_one_line(tmp_path):
    """Checked before torch loads, so each answer is quick; nothing is written to --out."""
    for path, message in _checkpoint_errors(tmp_path):
        r = _run("export", "--checkpoint", str(path), "--out", str(tmp_path / "bundle"))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"python -m export: error: {path}: {message}"), r.stderr
        assert not (tmp_path / "bundle").exists()


def test_build_trt_names_a_wrong_bundle_in_one_line(tmp_path):
    for path, message in [(tmp_path / "missing", "bundle directory does not exist"),
                          (tmp_path, "no bundle.json; expected a bundle written by python -m export")]:
        r = _run("export.build_trt", "--bundle", str(path))
        assert r.returncode == 2
        assert r.stderr.splitlines() == [f"python -m export.build_trt: error: {path}: {message}"], r.stderr


def test_help_does_not_import_torch():
    """`--help` must stay instant: no tool imports torch or transformers before it parses its arguments."""
    code = (
        "import contextlib, importlib, io, sys\n"
        f"for name in {TOOLS!r}:\n"
        "    module = importlib.import_module(name + ('.build' if name == 'export' else ''))\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        module.main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnxscript') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# (terminal?, quiet?) -> what StageLog writes for a stage's start line, its end line, and a one-off line
STAGE_LOG = [
    (False, False, "export: vq_encoder (1/3) ...\nexport: vq_encoder (1/3) ... 6.5 s\nexport: wrote b\n"),
    (True, False, "export: vq_encoder (1/3) ... 6.5 s\nexport: wrote b\n"),
    (False, True, ""),
    (True, True, ""),
]


@pytest.mark.parametrize("tty,quiet,expected", STAGE_LOG)
def test_stage_log(monkeypatch, tty, quiet, expected):
    from export.build import StageLog

    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    log = StageLog("export", quiet)
    log("vq_encoder (1/3) ...")
    log("vq_encoder (1/3) ... 6.5 s")
    log("wrote b")
    assert err.getvalue() == expected


def test_stage_log_ends_an_open_line_before_an_error(monkeypatch):
    from export.build import StageLog

    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    log = StageLog("export")
    log("decoder_step (3/3) ...")
    log.close()
    assert err.getvalue() == "export: decoder_step (3/3) ...\n"


@pytest.mark.export
def test_export_cli_reports_each_graph_and_hides_third_party_noise(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ck, out = tmp_path / "ck", tmp_path / "bundle"
    r = _run("export.tiny", str(ck), timeout=300)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr
    r = _run("export", "--checkpoint", str(ck), "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    graphs = ["vq_encoder", "vq_decoder", "decoder_step", "decoder_step_visual"]  # --head both by default
    for i, graph in enumerate(graphs, 1):
        start = lines.index(f"export: {graph} ({i}/4) ...")
        assert re.fullmatch(rf"export: {graph} \({i}/4\) \.\.\. \d+\.\d s", lines[start + 1]), lines[start + 1]
    assert re.fullmatch(rf"export: wrote {re.escape(str(out))} in \d+\.\d s", lines[-1])
    # progress bars, torch.onnx's registry log lines and warnings stay hidden; the parity table shows
    noise = [ln for ln in lines if re.search(r"Warning|torchvision|Loading weights|it/s\]|^W\d{4}", ln)]
    assert noise == []
    assert any(ln.startswith("decoder_step ") and ln.endswith(" ok") for ln in lines)
    assert (out / "bundle.json").is_file() and r.stdout == ""
