"""The CLI in the details a daily user meets: what a terminal is shown, pipes and closed streams, suggestions for
typos, errors in the flags' own names, the same engine options everywhere, and images that carry (and re-run)
their own request. Through the entry point: conftest.cli in-process, subprocesses where a real terminal, pipe or
file descriptor is the point."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import emu3_rt

from .conftest import REPO, cli, engine_runs

FAST = ["--image-area", "4096"]   # an 8x8 grid
CLI = [sys.executable, "-m", "emu3_rt"]
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# ---- what a terminal is shown ----

@pytest.fixture(scope="module")
def control_seed():
    """A seed whose 40-token answer from the tiny model holds a control character (its weights are random)."""
    model = emu3_rt.load()
    for seed in range(64):
        text = model.chat("hi", seed=seed, max_new_tokens=40).texts[0]
        if CONTROL.search(text):
            return seed, text
    pytest.fail("no answer of the tiny model in 64 seeds holds a control character")


def _on_a_terminal(argv: list[str]) -> tuple[int, bytes]:
    """Run with stdout on a pseudo-terminal: (exit code, what the terminal received)."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:   # EIO: the child closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=120), out


def test_control_characters_are_escaped_on_a_terminal_only(control_seed):
    seed, text = control_seed
    argv = CLI + ["chat", "--prompt", "hi", "--seed", str(seed), "--max-new-tokens", "40", "-q"]
    code, shown = _on_a_terminal(argv)
    answer = shown.decode("utf-8", "replace").replace("\r\n", "\n")   # the tty turns \n into \r\n
    assert code == 0 and not CONTROL.search(answer.rstrip("\n")), repr(answer)
    assert answer == CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) + "\n"
    # a pipe, and --json on a terminal, get the text exactly (JSON escapes it its own way)
    piped = subprocess.run(argv, cwd=REPO, capture_output=True)
    assert piped.returncode == 0 and piped.stdout.decode("utf-8", "replace") == text + "\n"
    code, shown = _on_a_terminal(argv + ["--json"])
    assert code == 0 and json.loads(shown)["text"] == [text]


# ---- stdout and stderr that go away ----

@pytest.mark.parametrize("argv", [["chat", "--prompt", "hi", "--greedy", "--max-new-tokens", "30"],
                                  ["chat", "--prompt", "a", "--prompt", "b", "--greedy", "--max-new-tokens", "5"],
                                  ["generate-image", "--prompt", "x", "--seed", "1", *FAST, "-o", "{tmp}/x.png"]])
def test_closed_pipe_on_stdout_ends_quietly(tmp_path, argv):
    """`emu3-rt ... | head`: the reader is gone before the first write; exit 141 (128 + SIGPIPE, what a shell shows
    for Unix tools ended by the pipe), nothing on stderr but notes."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.Popen(CLI + argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()   # like `| head -0`: no reader
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "error" not in err and "Broken pipe" not in err and "Traceback" not in err, err


STDERR_GONE = {"closed": "2>&-", "full": "2>/dev/full"}


@pytest.mark.parametrize("how", STDERR_GONE)
def test_unusable_stderr_drops_notes_and_keeps_results(tmp_path, how):
    redirect = STDERR_GONE[how]
    if how == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp_path / "x.png"

    def run(args: str) -> subprocess.CompletedProcess:
        return subprocess.run(f"{sys.executable} -m emu3_rt {args} {redirect}", shell=True, cwd=REPO,
                              stdout=subprocess.PIPE, text=True, timeout=120)

    # the progress bar, the drawn seed, the tiny-bundle note and the summary had nowhere to go: results did
    r = run(f"generate-image --prompt x {' '.join(FAST)} -o {out}")
    assert r.returncode == 0 and r.stdout == f"{out}\n", r.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and json.loads(im.text["parameters"])["prompt"] == "x"
    r = run("chat --prompt hi --greedy --max-new-tokens 5")
    alone = subprocess.run(CLI + ["chat", "--prompt", "hi", "--greedy", "--max-new-tokens", "5", "-q"], cwd=REPO,
                           capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == alone.stdout, (r.stdout, alone.stdout)
    # an error: the exit code still says so, and its line never lands on stdout
    r = run(f"generate-image --prompt x {' '.join(FAST)} -o {tmp_path}/x.gif")
    assert r.returncode == 2 and r.stdout == ""
    r = run("chat --prompt hi --no-such-flag")
    assert r.returncode == 2 and r.stdout == ""


# ---- arguments checked before a seed is drawn ----

@pytest.mark.parametrize("argv", [
    ["generate-image", "--prompt", "x", "--ratio", "1:1", "--ratio", "2:1", *FAST],
    ["generate-image", "--prompt", "x", "--ratio", "1:0", *FAST],
    ["generate-image", "--prompt", "x", "--negative-prompt", "y", "--cfg-scale", "1", *FAST],
    ["chat", "--image", "{img}", "--prompt", "a", "--prompt", "b"],
    ["chat", "--prompt", "x", "--top-p", "2"],
])
def test_argument_errors_come_before_the_seed(capsys, tmp_path, monkeypatch, argv):
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    calls = engine_runs(monkeypatch)
    code, out, err = cli(capsys, *[a.replace("{img}", str(img)) for a in argv], "-o", str(tmp_path / "o.png")) \
        if argv[0] == "generate-image" else cli(capsys, *[a.replace("{img}", str(img)) for a in argv])
    assert code == 2 and "emu3-rt: error: " in err and "seed" not in err, err
    assert [c for c in calls if "decoder_step" in c] == [], "no decode step may run"


def test_greedy_summary_says_greedy(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--greedy", *FAST, "-o", str(tmp_path / "x.png"))
    assert code == 0 and "seed: " not in err
    assert re.search(r"tok/s\), greedy, wrote ", err.splitlines()[-1]) and "None" not in err, err


# ---- typos: a suggestion, in the flag's own name ----

@pytest.mark.parametrize("argv,ending", [
    (["chta", "--prompt", "x"], "invalid choice: 'chta' (choose from 'chat', 'generate-image', 'serve'); did you "
                                "mean chat?"),
    (["generate-image", "--prompt", "x", "--seeed", "3"], "unrecognized arguments: --seeed 3; did you mean --seed?"),
    (["generate-image", "--prompt", "x", "--image-are=4096"], "--image-are=4096; did you mean --image-area?"),
    (["chat", "--prompt", "x", "--devic", "cpu", "--temprature", "1"], "did you mean --device, --temperature?"),
    (["chat", "--prompt", "x", "--device", "cdua"], "invalid choice: 'cdua' (choose from 'cpu', 'cuda', 'tensorrt'); "
                                                    "did you mean cuda?"),
    # generate-image's option typed to chat: the suggestion comes from chat's own options
    (["chat", "--prompt", "x", "--image-area", "9"], "unrecognized arguments: --image-area 9; did you mean --image?"),
    (["serve", "--verfy"], "unrecognized arguments: --verfy; did you mean --verify?"),
    (["serv"], "did you mean serve?"),
])
def test_typos_get_a_suggestion(capsys, argv, ending):
    if argv[0] == "serve":
        pytest.importorskip("runtime.serve.cli")
    code, out, err = cli(capsys, *argv)
    assert code == 2 and err.endswith(ending + "\n") and err.count("\n") == 1, err


def test_a_word_far_from_every_option_gets_no_guess(capsys):
    code, out, err = cli(capsys, "chat", "--prompt", "x", "--zzzzqqq")
    assert code == 2 and err.rstrip().endswith("unrecognized arguments: --zzzzqqq"), err


@pytest.mark.parametrize("argv,line", [
    (["chat", "--prompt", "x", "--top-p", "2"], "emu3-rt: error: --top-p must be in (0, 1], got 2.0"),
    (["generate-image", "--prompt", "x", "--ratio", "3", *FAST],
     "emu3-rt: error: --ratio must look like W:H with positive integers, got '3'"),
    (["generate-image", "--prompt", "x", "--negative-prompt", "y", "--cfg-scale", "1", *FAST],
     "emu3-rt: error: --negative-prompt needs classifier-free guidance: --cfg-scale is 1, so it would be ignored"),
])
def test_errors_name_the_flags(capsys, tmp_path, argv, line):
    extra = ["-o", str(tmp_path / "x.png")] if argv[0] == "generate-image" else []
    code, out, err = cli(capsys, *argv, *extra, "-q")
    assert code == 2 and err == line + "\n", err


def test_bundle_errors_keep_the_manifest_names(capsys, bundle_copy):
    m = json.loads((bundle_copy / "bundle.json").read_text())
    m["search"]["top_p"] = 0
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    code, out, err = cli(capsys, "chat", "--bundle", str(bundle_copy), "--prompt", "x", "-q")
    assert code == 2 and "top_p" in err and "--top-p" not in err, err


# ---- one set of bundle / engine options ----

def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_every_subcommand_has_the_bundle_and_engine_options():
    import argparse

    from emu3_rt.cli import add_bundle_options, build_parser

    shared = argparse.ArgumentParser(add_help=False)
    add_bundle_options(shared)
    expected = _options(shared)
    assert {"--bundle", "--verify", "--sampler", "--device-id", "--threads", "--engine", "--device"} <= expected
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("chat", "generate-image"):
        assert expected <= _options(commands[name]), name
    serve = pytest.importorskip("runtime.serve.cli")
    assert expected <= _options(serve.build_parser())
    # serve is the extra one: listed after the two commands every install has
    assert list(commands) == ["chat", "generate-image", "serve"]


def test_serve_passes_the_engine_options_to_the_service():
    import ast

    serve = pytest.importorskip("runtime.serve.cli")
    args = serve.build_parser().parse_args(["--verify", "--sampler", "numpy", "--device-id", "1", "-m", "b"])
    assert (args.verify, args.sampler, args.device_id, str(args.bundle)) == (True, "numpy", 1, "b")
    # the service takes them (read from its source: importing it would import Ray)
    tree = ast.parse((REPO / "runtime" / "serve" / "app.py").read_text())
    init = next(f for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "Emu3Service"
                for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assert {"verify", "sampler", "device_id"} <= {a.arg for a in init.args.args}


# ---- images that record their request, and re-run it ----

def _params(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["parameters"])


def test_metadata_records_ratio_and_area(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "a", "--prompt", "b", "--ratio", "2:1", "--ratio",
                         "1:2", *FAST, "--seed", "4", "-o", str(tmp_path / "x.png"), "-q")
    assert code == 0, err
    assert [(_params(tmp_path / f"x-{i}.png")["ratio"], _params(tmp_path / f"x-{i}.png")["image_area"])
            for i in range(2)] == [("2:1", 4096), ("1:2", 4096)]


def test_from_reruns_the_recorded_request(capsys, tmp_path):
    first = tmp_path / "batch.png"
    code, out, err = cli(capsys, "generate-image", "--prompt", "a red cat", "--prompt", "a blue car", "--ratio", "2:1",
                         "--cfg-scale", "2.5", "--top-k", "100", "--temperature", "0.9", "--seed", "11", *FAST,
                         "-o", str(first), "-q")
    assert code == 0, err
    source = tmp_path / "batch-1.png"
    code, out, err = cli(capsys, "generate-image", "--from", str(source), "-o", str(tmp_path / "again.png"), "-q")
    assert code == 0, err
    assert (tmp_path / "again.png").read_bytes() == source.read_bytes()
    # options given as well replace the recorded values
    code, out, err = cli(capsys, "generate-image", "--from", str(source), "--seed", "12", "-o",
                         str(tmp_path / "other.png"), "-q")
    assert code == 0 and _params(tmp_path / "other.png") == {**_params(source), "seed": 12}


def test_from_an_image_without_ratio_and_area_uses_its_grid(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--ratio", "3:2", *FAST, "--seed", "2",
                         "-o", str(tmp_path / "new.png"), "-q")
    assert code == 0, err
    meta = _params(tmp_path / "new.png")
    older = {k: v for k, v in meta.items() if k not in ("ratio", "image_area")}
    info = PngInfo()
    info.add_text("parameters", json.dumps(older))
    with Image.open(tmp_path / "new.png") as im:
        im.save(tmp_path / "old.png", pnginfo=info)
    code, out, err = cli(capsys, "generate-image", "--from", str(tmp_path / "old.png"), "-o",
                         str(tmp_path / "again.png"), "-q")
    assert code == 0, err
    with Image.open(tmp_path / "again.png") as a, Image.open(tmp_path / "new.png") as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("make,needle", [
    (lambda p: Image.new("RGB", (8, 8)).save(p), "records no request"),
    (lambda p: _png_with(p, {"emu3_rt_preview": "1", "partial_rows": 3}), "a preview (.partial.png)"),
    (lambda p: _png_with(p, "{not json"), "not valid JSON"),
    (lambda p: _png_with(p, {"prompt": 3, "sampling": {}}), "recorded prompt is 3, not str"),
    (lambda p: _png_with(p, {"prompt": "x", "cfg_scale": 3, "seed": "7", "sampling": {}}), "recorded seed is \"7\""),
    (lambda p: p.write_bytes(b"not an image"), "not an image in a format this runtime reads"),
])
def test_from_refuses_images_without_a_usable_request(capsys, tmp_path, monkeypatch, make, needle):
    source = tmp_path / "in.png"
    make(source)
    calls = engine_runs(monkeypatch)
    code, out, err = cli(capsys, "generate-image", "--from", str(source), "-o", str(tmp_path / "x.png"))
    assert code == 2 and needle in err and "in.png" in err and err.count("\n") == 1, err
    assert calls == []


def _png_with(path: Path, parameters) -> None:
    info = PngInfo()
    info.add_text("parameters", parameters if isinstance(parameters, str) else json.dumps(parameters))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def test_generate_image_needs_a_prompt_or_from(capsys):
    code, out, err = cli(capsys, "generate-image", "-q")
    assert code == 2 and "--prompt (or --from IMAGE)" in err


# ---- files named in errors, directories as -o ----

def test_image_error_names_which_of_several(capsys, tmp_path):
    good, tiny = tmp_path / "good.png", tmp_path / "tiny.png"
    Image.new("RGB", (40, 40)).save(good)
    Image.new("RGB", (1, 1)).save(tiny)
    code, out, err = cli(capsys, "chat", "--prompt", "x", "--image", str(good), "--image", str(tiny), "-q")
    assert code == 2 and f"error: {tiny}: image is 1 pixel(s) tall" in err, err


@pytest.mark.parametrize("form", ["slash", "existing"])
def test_output_directory_gets_the_default_name(capsys, tmp_path, form):
    (tmp_path / "outs").mkdir()
    target = str(tmp_path / "outs") + ("/" if form == "slash" else "")
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--prompt", "y", *FAST, "-o", target, "-q")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["out-0.png", "out-1.png"]


def test_missing_output_directory_is_named(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", *FAST, "-o", f"{tmp_path}/nowhere/", "-q")
    assert code == 2 and f"{tmp_path}/nowhere: output directory does not exist" in err, err


# ---- signals during cleanup ----

def test_signals_during_cleanup_are_dropped(capsys, tmp_path, monkeypatch):
    """SIGTERM mid-generation; while the cleanup runs, HUP, INT and TERM again: the cleanup finishes (no preview
    left), one line, exit 143 for the first signal."""
    from emu3_rt import output

    real_exit = output.ImageOutputs.__exit__

    def exit_under_fire(self, *exc):
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), sig)   # Python runs the handler at the next instruction: here, in the cleanup
        return real_exit(self, *exc)

    monkeypatch.setattr(output.ImageOutputs, "__exit__", exit_under_fire)
    previous = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)}
    steps = []

    def on_step(*_):
        steps.append(1)
        if len(steps) == 20:
            os.kill(os.getpid(), signal.SIGTERM)

    from emu3_rt.generation import ImageGeneration

    real_step = ImageGeneration.step
    monkeypatch.setattr(ImageGeneration, "step", lambda self: (on_step(), real_step(self))[1])
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", *FAST, "--preview-every", "1",
                         "-o", str(tmp_path / "x.png"), "-q")
    assert code == 143 and err == "emu3-rt: terminated by SIGTERM\n", err
    assert list(tmp_path.iterdir()) == [], "no preview, temp file or image left behind"
    assert {s: signal.getsignal(s) for s in previous} == previous, "handlers restored for an in-process caller"


def test_from_with_options_keeps_the_rest_of_the_request(capsys, tmp_path):
    code, out, err = cli(capsys, "generate-image", "--prompt", "x", "--seed", "3", "--top-k", "50", *FAST,
                         "-o", str(tmp_path / "a.png"), "-q")
    assert code == 0, err
    recorded = _params(tmp_path / "a.png")
    # CFG turned off: the recorded negative prompt (CFG's) is not carried into a run without CFG
    code, out, err = cli(capsys, "generate-image", "--from", str(tmp_path / "a.png"), "--cfg-scale", "1",
                         "-o", str(tmp_path / "b.png"), "-q")
    assert code == 0, err
    assert _params(tmp_path / "b.png") == {**recorded, "cfg_scale": 1.0, "negative_prompt": None}
    # one sampling option given: the others keep their recorded values
    code, out, err = cli(capsys, "generate-image", "--from", str(tmp_path / "a.png"), "--temperature", "0.5",
                         "-o", str(tmp_path / "c.png"), "-q")
    assert code == 0, err
    assert _params(tmp_path / "c.png")["sampling"] == {**recorded["sampling"], "temperature": 0.5}
