"""Outputs never clobber what is not ours: checked before generating, all-or-nothing batches, cleanup on every
exit path (errors, SIGTERM, SIGHUP, Ctrl-C), and a closed or full stdout is one error line."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from emu3_rt import output
from emu3_rt.output import ImageOutputs, OutputError

from .conftest import REPO, cli, engine_runs

QUICK = ["--image-area", "4096", "--cfg-scale", "1", "--greedy", "--quiet"]   # an 8x8 grid, one row per image


# ---- targets that must never be replaced ----

def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _dir(p: Path) -> Path:
    p.mkdir()
    return p


def _symlink(p: Path) -> Path:
    (p.parent / "real.png").write_bytes(b"precious")
    p.symlink_to(p.parent / "real.png")
    return p


@pytest.mark.parametrize("make,kind", [(_fifo, "FIFO"), (_dir, "directory"), (_symlink, "symbolic link")])
def test_non_regular_target_is_refused_before_generation(capsys, tmp_path, monkeypatch, make, kind):
    target = make(tmp_path / "out.png")
    calls = engine_runs(monkeypatch)
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "-o", str(target), *QUICK)
    assert code == 2 and kind in err and err.count("\n") == 1, err
    assert calls == [] and (stat.S_ISFIFO(os.lstat(target).st_mode) if kind == "FIFO" else True)
    assert target.is_dir() if kind == "directory" else True
    assert target.is_symlink() if kind == "symbolic link" else True
    assert not list(tmp_path.glob(".*tmp"))


def test_device_file_is_refused():
    with pytest.raises(OutputError, match="a device, not a regular file"):
        output.check_target(Path("/dev/null"))


@pytest.mark.parametrize("where,needle", [("missing/out.png", "does not exist"), ("file.txt/out.png", "not a dir")])
def test_bad_directory_is_named_before_generation(capsys, tmp_path, monkeypatch, where, needle):
    (tmp_path / "file.txt").write_text("x")
    calls = engine_runs(monkeypatch)
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "-o", str(tmp_path / where), *QUICK)
    assert code == 2 and needle in err and str(Path(tmp_path / where).parent) in err, err
    assert calls == [] and ".tmp" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_directory_is_named_before_generation(capsys, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    calls = engine_runs(monkeypatch)
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "-o", str(ro / "o.png"), *QUICK)
    assert code == 2 and "not writable" in err and calls == []


def test_existing_regular_file_is_replaced(capsys, tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "-o", str(target), *QUICK)
    assert code == 0, err
    assert Image.open(target).size == (64, 64)


# ---- previews ----

def test_foreign_partial_file_is_never_removed(capsys, tmp_path):
    target = tmp_path / "out.png"
    foreign = tmp_path / "out.partial.png"
    foreign.write_bytes(b"my own notes")
    # no preview requested: the file is not ours and is left alone, on success and on failure
    assert cli(capsys, "generate-image", "--prompt", "x", "-o", str(target), *QUICK)[0] == 0
    assert cli(capsys, "generate-image", "--prompt", "  ", "-o", str(target), *QUICK)[0] == 2
    assert foreign.read_bytes() == b"my own notes"
    # a preview requested over it: refused before generating
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "-o", str(target), "--preview-every", "2",
                         *QUICK)
    assert code == 2 and "not an emu3-rt preview" in err and foreign.read_bytes() == b"my own notes"


def test_stale_emu3_preview_is_replaced_and_cleaned(capsys, tmp_path):
    target = tmp_path / "out.png"
    with ImageOutputs(target, 1, previews=True) as out:
        out.preview(0, Image.new("RGB", (8, 8)), 1)
        os.link(out.previews[0], tmp_path / "stale.png")      # what a killed run leaves behind
    os.replace(tmp_path / "stale.png", tmp_path / "out.partial.png")
    code, _, err = cli(capsys, "generate-image", "--prompt", "x", "-o", str(target), "--preview-every", "2", *QUICK)
    assert code == 0, err
    assert not (tmp_path / "out.partial.png").exists()


# ---- batches ----

def test_failed_batch_leaves_nothing(tmp_path, monkeypatch):
    old = tmp_path / "out-0.png"
    old.write_bytes(b"previous run")
    real = output._stage
    seen = []

    def flaky(image, path, meta):
        seen.append(path)
        if len(seen) == 2:
            raise OSError(28, "No space left on device")
        return real(image, path, meta)

    monkeypatch.setattr(output, "_stage", flaky)
    outs = ImageOutputs(tmp_path / "out.png", 3, previews=False)
    with pytest.raises(OSError):
        outs.commit([Image.new("RGB", (8, 8))] * 3, [{}] * 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png"] and old.read_bytes() == b"previous run"


def test_batch_names_are_checked_before_generation(capsys, tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "out-1.png")
    calls = engine_runs(monkeypatch)
    code, out, err = cli(capsys, "generate-image", "--prompt", "a", "--prompt", "b", "-o", str(tmp_path / "out.png"),
                         *QUICK)
    assert code == 2 and "out-1.png" in err and calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png"]


# ---- signals and stdout (subprocesses) ----

SLOW_RUN = [sys.executable, "-m", "emu3_rt", "generate-image", "--prompt", "x", "--image-area", "57600",
            "--cfg-scale", "3", "--preview-every", "1", "--greedy", "--quiet", "-o"]


def _wait_for(path: Path, proc) -> None:
    """Until `path` appears; no clock: the run always ends, and ending without writing it fails the test."""
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)


EXIT = {signal.SIGINT: (130, "emu3-rt: interrupted"), signal.SIGTERM: (143, "emu3-rt: terminated by SIGTERM"),
        signal.SIGHUP: (129, "emu3-rt: terminated by SIGHUP")}


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGHUP], [signal.SIGINT],
                                     [signal.SIGINT, signal.SIGINT], [signal.SIGTERM, signal.SIGHUP],
                                     [signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGTERM]],
                         ids=lambda sigs: "+".join(signal.Signals(s).name for s in sigs))
def test_signal_mid_generation_cleans_up(tmp_path, signals):
    # a 30x30 grid with a preview after every row: the signal lands while the decode loop runs (a 16x16 one could
    # finish between the first preview and the signal on a busy machine)
    # SIGINT at its default in the child: a test run started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python (so the CLI) then keeps ignoring it, as a background job should
    proc = subprocess.Popen(SLOW_RUN + [str(tmp_path / "out.png")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(tmp_path / "out.partial.png", proc)
    for sig in signals:   # back to back: the later ones land while the first one's cleanup runs (or with it)
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    # the first signal the process takes decides; signals pending together are taken lowest number first
    taken = [EXIT[s] for s in signals if EXIT[s][0] == proc.returncode]
    assert taken, (proc.returncode, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == taken[0][1], err
    assert err.count("emu3-rt: ") == 1, err
    assert list(tmp_path.iterdir()) == [], "no preview, temp file or image left behind"


@pytest.mark.parametrize("argv", [["chat", "--prompt", "hi", "--greedy", "--max-new-tokens", "3", "-q"],
                                  ["chat", "--prompt", "hi", "--greedy", "--max-new-tokens", "3", "--json", "-q"]])
def test_full_stdout_is_one_error_line(argv):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "emu3_rt", *argv], cwd=REPO, stdout=full, stderr=subprocess.PIPE,
                           text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["emu3-rt: error: cannot write the result to stdout "
                                             "(No space left on device)"]


def test_closed_stdout_is_one_error_line():
    r = subprocess.run(f"{sys.executable} -m emu3_rt chat --prompt hi --greedy --max-new-tokens 3 --json -q >&-",
                       shell=True, cwd=REPO, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "stdout" in r.stderr, r.stderr
