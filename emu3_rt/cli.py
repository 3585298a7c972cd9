"""emu3-rt: chat about images and generate images with an exported Emu3 bundle (no PyTorch).

stdout carries the result (text, image paths, or one JSON object with --json); stderr carries the progress bar,
the seed when it was drawn at random, a summary line, and errors: one line and exit code 2 (-v shows the
traceback). Ctrl-C exits 130, SIGTERM 143, SIGHUP 129, removing what the run wrote; a closed pipe on stdout
(`| head`) ends the run quietly with 141, as Unix tools do. A closed or full stderr drops the progress bar, notes
and error lines; results are still written and the exit code is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from . import __version__


class _Parser(argparse.ArgumentParser):
    """argparse with no abbreviations (`--image` is never read as `--image-area`), usage errors as one line on
    stderr (exit 2) like every other error, and a "did you mean" for a mistyped option, subcommand or choice."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:   # suggestions from the options of the subcommand that was chosen, not from every subcommand
            options = [o for a in self.chosen(namespace)._actions for o in a.option_strings]
            hints = [h for x in extras if x.startswith("-") and (h := _closest(x.split("=", 1)[0], options))]
            self.error(f"unrecognized arguments: {' '.join(extras)}"
                       + (f"; did you mean {', '.join(hints)}?" if hints else ""))
        return namespace

    def chosen(self, namespace) -> argparse.ArgumentParser:
        """The subcommand's parser the arguments selected (this parser when there is none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                name = getattr(namespace, action.dest, None)
                if name in action.choices:
                    return action.choices[name]
        return self

    def error(self, message):
        # argparse's wording: "argument X: invalid choice: 'chta' (choose from 'chat', 'generate-image')"
        m = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)$", message)
        if m and (hint := _closest(m.group(1), [c.strip(" '") for c in m.group(2).split(",")])):
            message += f"; did you mean {hint}?"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _closest(typed: str, candidates: list[str]) -> str | None:
    import difflib  # on errors only

    close = difflib.get_close_matches(typed, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's default appears once: appended unless the help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or hidden or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


class _Ordered(argparse.Action):
    """Keeps --prompt and --image in command-line order (see _prompts_and_images for the rule)."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = getattr(namespace, "items", None) or []
        items.append((self.dest, value))
        namespace.items = items


def int_in(low: int, high: int | None = None):
    """An argparse type for whole numbers in [low, high]; its errors name the range, never a Python function."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _threads(text: str) -> int:
    from .engines.ort import MAX_THREADS  # the engine's bound (imported on use: numpy is not needed for --help)

    return int_in(0, MAX_THREADS)(text)


def number(text: str) -> float:
    """An argparse type for finite numbers: nan, inf and 1e999 are refused here, before any range check they
    would slip through (every comparison with NaN is false)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def number_in(low: float, high: float | None = None):
    """An argparse type for finite numbers in [low, high]."""

    def parse(text: str) -> float:
        value = number(text)
        if value < low or (high is not None and value > high):
            bounds = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value:g}")
        return value

    return parse


def invoked_as(prog: str) -> str:
    """The program name as the user typed it: the exporter's `python -m export...` (its name in the repository)
    is `python -m emu3_export...` or `emu3-export` where it was started under its installed name."""
    if not prog.startswith("python -m export"):
        return prog
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        name = spec.name.removesuffix(".__main__")
        return f"python -m {name}" if name.split(".")[0] == "emu3_export" else prog
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if script == "emu3-export" and prog == "python -m export" else prog


def tool_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser every command of the project uses (export, benchmarks): its real program name, no
    abbreviations, one-line usage errors, each option's default shown once."""
    return _Parser(prog=invoked_as(prog), description=description, formatter_class=_Help)


SEED_MAX = 2**32 - 1   # seeds are 32-bit: what PNG metadata records and numpy's generators take


def add_bundle_options(parser: argparse.ArgumentParser, threads_help: str = "intra-op threads") -> None:
    """Which bundle and engine: the same options on every subcommand (`emu3-rt serve` too, per replica), passed to
    `emu3_rt.load` as bundle, engine, device, device_id, threads, sampler, verify."""
    g = parser.add_argument_group("bundle / engine")
    g.add_argument("-m", "--bundle", type=Path, default=None,
                   help="bundle directory (default: the embedded tiny bundle, random weights)")
    g.add_argument("--engine", choices=["ort", "trt"], default="ort",
                   help="onnxruntime, or the bundle's TensorRT plans (python -m export.build_trt)")
    g.add_argument("--device", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="onnxruntime execution provider (tensorrt: ORT's TensorRT EP)")
    g.add_argument("--device-id", type=int_in(0), default=0, help="GPU ordinal (default: 0)")
    g.add_argument("--threads", type=_threads, default=0,
                   help=f"{threads_help}, at most max(64, 4 x CPUs) (default: 0, onnxruntime's choice)")
    g.add_argument("--sampler", choices=["graph", "numpy"], default=None,
                   help="where the sampling chain runs: the bundle's sampler graph, next to the step (default when "
                        "the bundle has one and --engine is ort), or numpy on the host (the reference)")
    g.add_argument("--verify", action="store_true",
                   help="re-hash every bundle file (by default only files changed since their last check are)")


DEFAULT_OUTPUT = "out.png"


def build_parser() -> argparse.ArgumentParser:
    ap = tool_parser("emu3-rt", __doc__)
    ap.add_argument("--version", action="version", version=f"emu3-rt {__version__}")
    common = _Parser(add_help=False)
    add_bundle_options(common)
    s = common.add_argument_group("sampling (defaults: the bundle's search section)")
    s.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling options)")
    s.add_argument("--temperature", type=number, default=None, help="default: the bundle's (usually 1.0)")
    s.add_argument("--top-k", type=int_in(1), default=None, help="default: the bundle's (usually 2048)")
    s.add_argument("--top-p", type=number, default=None, help="default: the bundle's (usually 1.0)")
    s.add_argument("--seed", type=int_in(-1, SEED_MAX), default=None,
                   help=f"0..{SEED_MAX}; default -1: random, printed on stderr before generation starts")
    s.add_argument("--allow-special-tokens", action="store_true",
                   help="read special-token strings typed in prompts as control tokens (Transformers' behaviour); "
                        "by default they are literal text")
    o = common.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    o.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar, notes, drawn seed or summary line (--json and PNGs still record the seed)")
    o.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    chat = sub.add_parser("chat", parents=[common], formatter_class=_Help, help="answer a prompt about images",
                          description="Answer prompts about images. With one --prompt, every --image belongs to "
                                      "it; with several, each --image belongs to the --prompt before it.")
    chat.add_argument("--prompt", action=_Ordered, required=True, help="prompt text (repeat for a batch)")
    chat.add_argument("--image", action=_Ordered, help="image file (repeatable; see above for which prompt)")
    chat.add_argument("--raw-prompt", action="store_true", help="no chat template; <image> marks each image")
    chat.add_argument("--system", default=None, help="system message for the chat template")
    chat.add_argument("--max-new-tokens", type=int_in(1), default=None, help="default: the bundle's")

    gen = sub.add_parser("generate-image", parents=[common], formatter_class=_Help, help="draw images from text",
                         description="Draw one image per --prompt.")
    gen.add_argument("--prompt", action=_Ordered, help="prompt text (repeat for a batch); required unless --from")
    gen.add_argument("--from", dest="from_image", type=Path, default=None, metavar="IMAGE",
                     help="re-run the request an image written by emu3-rt records (prompt, negative prompt, CFG "
                          "scale, seed, sampling, ratio, image area); options given as well replace its values")
    gen.add_argument("--negative-prompt", default=None,
                     help="what to steer away from; needs CFG (default: the bundle's under CFG)")
    gen.add_argument("--cfg-scale", type=number, default=None,
                     help="classifier-free guidance; 1 disables it (default: the bundle's, usually 3.0)")
    gen.add_argument("--ratio", action="append", default=None, help="W:H, once or once per prompt (default: 1:1)")
    gen.add_argument("--image-area", type=int_in(1), default=None, help="pixels (default: the bundle's)")
    gen.add_argument("-o", "--output", default=DEFAULT_OUTPUT,
                     help="image path, .png, .jpg/.jpeg or .webp; several prompts write STEM-0.EXT, STEM-1.EXT, ...; "
                          f"a directory gets {DEFAULT_OUTPUT} inside it")
    gen.add_argument("--preview-every", type=int_in(0), default=0, metavar="ROWS",
                     help="write STEM.partial.png every ROWS grid rows, grey where not generated yet (default: 0, "
                          "off)")
    for command in (chat, gen):
        command.set_defaults(items=None)   # --prompt / --image in command-line order (_Ordered)
    # `emu3-rt serve` (runtime/serve, the serve extra) is dispatched before parsing; listed here for --help
    sub.add_parser("serve", add_help=False, help="HTTP service on Ray Serve (the serve extra): emu3-rt serve --help")
    return ap


def _check_utf8(argv: list[str]) -> None:
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"argument {arg.encode('utf-8', 'replace')[:40]!r} is not valid UTF-8") from None


class _NoBar:
    """The progress bar under --quiet: tqdm is not even imported (14 ms of start-up)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def _progress(total: int, quiet: bool):
    if quiet:
        return _NoBar()
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a TTY (logs, CI)
    return tqdm(total=total, unit="tok", disable=None, file=sys.stderr, leave=False)


def _sampling(args, bundle):
    from .options import SamplingOptions

    return SamplingOptions.from_bundle(bundle, greedy=True if args.greedy else None, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p)


def _prompts_and_images(items) -> tuple[list[str], list[list[str]]]:
    """One --prompt: every --image is its own. Several: each --image belongs to the --prompt before it, and an
    --image before the first --prompt is ambiguous (refused rather than guessed)."""
    prompts = [value for kind, value in items if kind == "prompt"]
    if len(prompts) == 1:
        return prompts, [[value for kind, value in items if kind == "image"]]
    if items[0][0] == "image":
        raise ValueError("with several --prompt, each --image goes after the --prompt it belongs to "
                         f"(--image {items[0][1]} comes before any --prompt)")
    images: list[list[str]] = []
    for kind, value in items:
        if kind == "prompt":
            images.append([])
        else:
            images[-1].append(value)
    return prompts, images


def run_chat(args, model, seed: int | None, on_start) -> dict:
    prompts, image_paths = _prompts_and_images(args.items)
    sampling = _sampling(args, model.bundle)
    max_new = args.max_new_tokens or model.bundle.search["max_new_tokens"]
    # one prompt, plain output: stream the answer to stdout as it is generated (the bar would interleave)
    stream = len(prompts) == 1 and not args.json
    with _progress(max_new, args.quiet or stream) as bar:
        result = model.chat(prompts, image_paths if len(prompts) > 1 else image_paths[0], system=args.system,
                            raw=args.raw_prompt, max_new_tokens=max_new, sampling=sampling, seed=seed,
                            on_token=lambda step, ids: bar.update(1),
                            on_text=(lambda row, delta: _write_stdout(delta, args)) if stream else None,
                            allow_special_tokens=args.allow_special_tokens, on_start=on_start)
    if stream:
        _write_stdout("\n", args)
    return {"text": result.texts, "prompt_ids": result.prompt_ids, "tokens": result.tokens, "seed": result.seed,
            "seeds": result.seeds, "streamed": stream}


def _output_path(text: str) -> Path:
    """-o: a file path, or a directory that gets the default name inside it (as `cp FILE DIR` does): one written
    with a trailing slash, or an existing one whose name has no image extension (a directory named x.png is a
    target refused, not a place to write into)."""
    from .output import FORMATS

    path = Path(text)
    into = text.endswith(("/", os.sep)) or (path.is_dir() and path.suffix.lower() not in FORMATS)
    return path / DEFAULT_OUTPUT if into else path


def _recorded_request(args) -> None:
    """generate-image --from IMAGE: the image's recorded request fills every option not given on the command line."""
    from .output import read_request

    meta = read_request(args.from_image)
    if not args.items:
        args.items = [("prompt", meta["prompt"])]
    # the recorded negative prompt is the one CFG used: not for a run that turns CFG off with --cfg-scale 1
    if args.negative_prompt is None and args.cfg_scale != 1:
        args.negative_prompt = meta.get("negative_prompt")
    for dest in ("cfg_scale", "image_area"):
        if getattr(args, dest) is None:
            setattr(args, dest, meta.get(dest))
    if args.ratio is None and meta.get("ratio") is not None:
        args.ratio = [meta["ratio"]]
    if not args.greedy:   # a sampling option given asks for sampling; the others keep their recorded values
        sampling = meta["sampling"]
        given = any(getattr(args, k) is not None for k in ("temperature", "top_k", "top_p"))
        for key in ("temperature", "top_k", "top_p"):
            if getattr(args, key) is None:
                setattr(args, key, sampling[key])
        args.greedy = sampling["greedy"] and not given
    if args.seed is None and meta["seed"] is not None:
        args.seed = meta["seed"]
    args.recorded = meta


def run_generate_image(args, model, seed: int | None, on_start) -> dict:
    from .output import ImageOutputs
    from .prompt import calculate_generate_size

    prompts, _ = _prompts_and_images(args.items)
    sampling = _sampling(args, model.bundle)
    f = model.bundle.spatial_factor
    recorded = getattr(args, "recorded", None)
    if recorded is not None:
        if args.ratio is None and args.image_area is None and recorded.get("grid"):
            # written before ratio and area were recorded: the grid gives both back exactly
            h, w = recorded["grid"]
            args.ratio, args.image_area = [f"{w}:{h}"], h * w * f * f
        if recorded.get("bundle_sha256") != model.bundle.sha256:
            _note(args, f"note: {args.from_image} was made with another bundle (sha256 "
                        f"{str(recorded.get('bundle_sha256'))[:12]}...), so this image will differ from it")
    ratios = args.ratio or [model.bundle.search["ratio"]]
    ratios = ratios * len(prompts) if len(ratios) == 1 else ratios
    area = args.image_area or model.bundle.search["image_area"]
    grids = [calculate_generate_size(r, area, f) for r in ratios]
    # every output path is checked before the first step; previews this run writes are removed on any exit
    with ImageOutputs(_output_path(args.output), len(prompts), previews=args.preview_every > 0) as out, \
            _progress(max(h * (w + 1) + 3 for h, w in grids), args.quiet) as bar:
        result = model.generate_image(
            prompts, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale, ratio=args.ratio,
            image_area=args.image_area, sampling=sampling, seed=seed,
            on_token=lambda step, ids: bar.update(1), preview_every=args.preview_every,
            on_preview=lambda row, rows, im: out.preview(row, im, rows),
            allow_special_tokens=args.allow_special_tokens, on_start=on_start)
        # each image records its own request: `--from` the file (or its values as options) reproduces it alone
        paths = out.commit(result.images, [{
            "prompt": prompts[i], "negative_prompt": result.negative_prompt, "cfg_scale": result.cfg_scale,
            "seed": result.seeds[i] if result.seeds else None, "grid": list(result.grids[i]),
            "ratio": ratios[i], "image_area": area,
            "sampling": dataclasses.asdict(sampling), "bundle_sha256": model.bundle.sha256, "emu3_rt": __version__,
        } for i in range(len(prompts))])
    return {"images": [str(p) for p in paths], "grid": [list(g) for g in result.grids],
            "prompt_ids": result.prompt_ids, "tokens": result.tokens, "seed": result.seed, "seeds": result.seeds}


# ---- signals: the first one ends the run through its cleanup; the ones after it wait ----

class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every cleanup (previews, temp files) still runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _SignalTrap:
    """While the command runs, the first SIGINT, SIGTERM or SIGHUP raises (KeyboardInterrupt, _Terminated) in the
    main thread, so every cleanup runs; from then on, and once the command is over, further signals are taken and
    dropped: a second Ctrl-C, or TERM then HUP, cannot interrupt the cleanup, leave a preview behind, print a
    traceback or change the exit code. A signal ignored when the process started (nohup, a background job) stays
    ignored."""

    def __init__(self):
        self.raising = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _SignalTrap:
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                sig = getattr(signal, name, None)
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        self.raising = True
        return self

    def _handle(self, signum, frame):
        if not self.raising:
            return
        self.raising = False   # before raising: a signal arriving while this one unwinds is dropped
        raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated(signum)

    def stop(self) -> None:
        self.raising = False

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- stdout: the result; stderr: everything else, never fatal ----

class _StdoutClosed(Exception):
    """The reader of stdout went away (`| head`): the run ends quietly, as Unix tools do."""


SIGPIPE_EXIT = 128 + getattr(signal, "SIGPIPE", 13)
# C0 controls but tab and newline, DEL and C1: bytes that can move the cursor, retitle or reprogram a terminal
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _for_terminal(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _write_stdout(text: str, args=None) -> None:
    """Write the result; on a terminal (and without --json) control characters are shown escaped. A closed pipe
    raises _StdoutClosed; any other closed or full stdout becomes one error line instead of a traceback."""
    if sys.stdout is None:  # started with fd 1 closed
        raise OSError("cannot write the result to stdout (it is closed)")
    try:
        if not (args is not None and args.json) and sys.stdout.isatty():
            text = _for_terminal(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        # the interpreter flushes stdout again at exit: point it at /dev/null so that flush cannot fail too
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        if isinstance(e, BrokenPipeError):
            raise _StdoutClosed from None
        raise OSError(f"cannot write the result to stdout ({e.strerror or e})") from None


class _Stderr(io.TextIOBase):
    """sys.stderr while the CLI runs: a closed (`2>&-`) or full (`2>/dev/full`) stderr drops the progress bar,
    notes and error lines instead of failing the run (or, when closed, sending them to stdout: print(file=None)
    writes there). The first failed write drops everything after it."""

    def __init__(self, stream):
        self.stream = stream

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if self.stream is not None:
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                self.stream = None
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.stream = None

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise io.UnsupportedOperation("stderr is closed")
        return self.stream.fileno()


def _hold_fd2() -> None:
    """Started with fd 2 closed: put /dev/null there, so that the next file opened (an output image, a graph) cannot
    become fd 2 and receive what onnxruntime or Python write to stderr."""
    try:
        os.fstat(2)
    except OSError:
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            if fd != 2:
                os.dup2(fd, 2)
                os.close(fd)
        except OSError:
            pass


def _print_result(args, out: dict) -> None:
    if args.json:
        out.pop("streamed", None)
        _write_stdout(json.dumps(out, ensure_ascii=False) + "\n", args)
    elif args.command == "chat":
        if not out["streamed"]:
            _write_stdout("\n".join(out["text"]) + "\n", args)
    else:
        _write_stdout("\n".join(out["images"]) + "\n", args)


def _external_command(name: str, argv: list[str]) -> int:
    from importlib.metadata import entry_points

    found = entry_points(group="emu3_rt.commands", name=name)
    if not found:
        print(f"emu3-rt: error: '{name}' is not installed: pip install -e '.[cpu,{name}]'", file=sys.stderr)
        return 2
    return next(iter(found)).load()(argv)


def _note(args, text: str) -> None:
    if not args.quiet:
        print(f"emu3-rt: {text}", file=sys.stderr)


def _flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """An argument error from the library names its Python parameter (`top_p must be in (0, 1]`): say the flag the
    user typed instead (`--top-p must be in (0, 1]`). Parameters with an underscore are replaced anywhere (they
    are never English), one-word ones only as the subject that opens the message."""
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest}
    words = "|".join(re.escape(d) for d in sorted(flags, key=len, reverse=True) if "_" in d)
    if words:
        message = re.sub(rf"(?<![\w.'\"-])({words})(?![\w'\"])", lambda m: flags[m.group(1)], message)
    m = re.match(r"(\w+)(?= (must|needs) )", message)
    if m and m.group(1) in flags:
        message = flags[m.group(1)] + message[m.end():]
    return message


def _error_line(e: BaseException, parser, command_parser) -> str:
    from .image import ImageError
    from .prompt import PromptError

    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    # argument errors only: a bundle's, an image's or an output's message names files and manifest keys
    if type(e) in (ValueError, TypeError, PromptError) and not isinstance(e, ImageError):
        message = _flag_names(message, command_parser)
    return message


def main(argv: list[str] | None = None) -> int:
    """emu3-rt ARGV in this process: the exit code. Signal handlers and sys.stderr are restored on return."""
    return _main(sys.argv[1:] if argv is None else argv, exiting=False)


def _main(argv: list[str], exiting: bool) -> int:
    _hold_fd2()
    real_stderr = sys.stderr
    sys.stderr = _Stderr(real_stderr)
    try:
        if argv[:1] == ["serve"]:   # lives in runtime/ (emu3_rt never imports it): found through its entry point
            return _external_command("serve", argv[1:])
        return _command(argv, exiting)
    finally:
        sys.stderr = real_stderr


def _command(argv: list[str], exiting: bool) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (already printed as one line), --help, --version
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    trap = _SignalTrap().__enter__()
    try:
        try:
            return _generate(args, argv)
        finally:
            trap.stop()   # from here on a signal is dropped: the result (or the error) stands
    except KeyboardInterrupt:
        print("emu3-rt: interrupted", file=sys.stderr)
        return 130
    except _Terminated as e:
        print(f"emu3-rt: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except _StdoutClosed:
        return SIGPIPE_EXIT
    except Exception as e:  # noqa: BLE001 - the CLI owns the one-line error contract
        if args.verbose:
            traceback.print_exc()
        line = _error_line(e, parser, parser.chosen(args))
        print(f"emu3-rt: error: {_for_terminal(line) if sys.stderr.isatty() else line}", file=sys.stderr)
        return 2
    finally:
        if not exiting:   # in-process callers get their handlers back; the program keeps dropping until it exits
            trap.restore()


def _generate(args, argv: list[str]) -> int:
    _check_utf8(argv)
    if args.command == "generate-image":
        if args.from_image is not None:
            _recorded_request(args)   # before loading: a file without a recorded request fails at once
        elif not args.items:
            raise ValueError("the following arguments are required: --prompt (or --from IMAGE)")
    from .options import random_seed
    from .pipeline import load

    started = time.perf_counter()
    # one chat prompt decodes one row a step: its step graph's weights are read where onnxruntime maps them
    # instead of being packed when the session opens (pipeline.load's prepack)
    one_row = args.command == "chat" and sum(kind == "prompt" for kind, _ in args.items) == 1
    model = load(args.bundle, engine=args.engine, device=args.device, threads=args.threads, verify=args.verify,
                 device_id=args.device_id, sampler=args.sampler,
                 warm=["chat" if args.command == "chat" else "image"], prepack=not one_row)
    if args.bundle is None:
        _note(args, "note: the embedded tiny bundle has random weights, so its output is noise "
                    "(pass --bundle DIR for a real model)")
    greedy = args.greedy or args.temperature == 0   # SamplingOptions.from_bundle: temperature 0 is greedy
    drawn = not greedy and args.seed in (None, -1)
    seed = None if greedy else (random_seed() if drawn else args.seed)

    def announce() -> None:   # once every argument is checked, before the first step: survives a failure or Ctrl-C
        if drawn and not args.quiet:
            print(f"seed: {seed}", file=sys.stderr, flush=True)

    out = (run_chat if args.command == "chat" else run_generate_image)(args, model, seed, announce)
    seconds = time.perf_counter() - started
    _print_result(args, out)
    n = sum(len(t) for t in out["tokens"])
    where = f", wrote {', '.join(out['images'])}" if "images" in out else ""
    _note(args, f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tok/s), "
                f"{'greedy' if seed is None else f'seed {seed}'}{where}")
    return 0


def run() -> None:
    """The `emu3-rt` program. After chat or generate-image it leaves without the interpreter's teardown, which
    frees the sessions' weights, prepacked copies and arenas piece by piece (50-70 ms on the mid bundle) for a
    process that is ending: every output is written and closed by then, stdout and stderr are flushed here.
    `serve` exits normally (Ray shuts its workers down at exit)."""
    argv = sys.argv[1:]
    code = _main(argv, exiting=True)
    if argv[:1] == ["serve"]:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):   # closed, full or None: nothing more can be said there
            pass
    ort = sys.modules.get("emu3_rt.engines.ort")
    if ort is not None:   # session threads still writing an optimized-graph cache entry never reach their cleanup
        ort.remove_partial_entries()
    os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    run()
