"""`emu3-rt` / `python -m emu3_rt`: chat and generate-image on a bundle (default: the embedded tiny bundle).

stdout carries the result (text, image paths, or one JSON object with --json); stderr carries the progress bar,
the seed when none was given, and errors: one line and exit code 2 (-v shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from . import __version__


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr (exit 2) like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Ordered(argparse.Action):
    """Keeps --prompt and --image in command-line order: each image belongs to the prompt before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = getattr(namespace, "items", None) or []
        items.append((self.dest, value))
        namespace.items = items


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _threads(text: str) -> int:
    value = int(text)
    limit = max(64, 4 * (os.cpu_count() or 1))
    if not 0 <= value <= limit:
        raise argparse.ArgumentTypeError(f"must be between 0 and {limit}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = _Parser(prog="emu3-rt", description=__doc__.splitlines()[0], formatter_class=fmt)
    ap.add_argument("--version", action="version", version=f"emu3-rt {__version__}")
    common = _Parser(add_help=False)
    g = common.add_argument_group("bundle / engine")
    g.add_argument("-m", "--bundle", type=Path, default=None, help="bundle directory (default: the tiny bundle)")
    g.add_argument("--engine", choices=["ort", "trt"], default="ort",
                   help="onnxruntime, or the bundle's TensorRT plans (python -m export.build_trt)")
    g.add_argument("--device", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="onnxruntime execution provider (tensorrt: ORT's TensorRT EP)")
    g.add_argument("--device-id", type=int, default=0, help="GPU ordinal")
    g.add_argument("--threads", type=_threads, default=0, help="intra-op threads (0: onnxruntime's default)")
    g.add_argument("--verify", action="store_true", help="check every bundle file's sha256 before loading")
    s = common.add_argument_group("sampling")
    s.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling options)")
    s.add_argument("--temperature", type=float, default=None, help="default: the bundle's")
    s.add_argument("--top-k", type=int, default=None, help="default: the bundle's (2048)")
    s.add_argument("--top-p", type=float, default=None, help="default: the bundle's (1.0)")
    s.add_argument("--seed", type=int, default=None, help="random seed (printed on stderr when not given)")
    s.add_argument("--allow-special-tokens", action="store_true",
                   help="read special-token strings typed in prompts as control tokens (Transformers' behaviour); "
                        "by default they are literal text")
    o = common.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    o.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    chat = sub.add_parser("chat", parents=[common], formatter_class=fmt, help="answer a prompt about images")
    chat.add_argument("--prompt", action=_Ordered, required=True, help="prompt text (repeat for a batch)")
    chat.add_argument("--image", action=_Ordered, help="image file for the preceding --prompt (repeatable)")
    chat.add_argument("--raw-prompt", action="store_true", help="no chat template; <image> marks each image")
    chat.add_argument("--system", default=None, help="system message for the chat template")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: the bundle's")

    gen = sub.add_parser("generate-image", parents=[common], formatter_class=fmt, help="draw images from text")
    gen.add_argument("--prompt", action=_Ordered, required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--negative-prompt", default=None, help="default under CFG: the bundle's")
    gen.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance; 1 disables it")
    gen.add_argument("--ratio", action="append", default=None, help="W:H, once or once per prompt (default 1:1)")
    gen.add_argument("--image-area", type=_positive_int, default=None, help="pixels (default: the bundle's)")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                     help="PNG path; several prompts write STEM-0.png, STEM-1.png, ...")
    gen.add_argument("--preview-every", type=int, default=0, metavar="ROWS",
                     help="write STEM.partial.png every ROWS grid rows (grey where not generated yet)")
    return ap


def _check_utf8(argv: list[str]) -> None:
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"argument {arg.encode('utf-8', 'replace')[:40]!r} is not valid UTF-8") from None


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a TTY (logs, CI)
    return tqdm(total=total, unit="tok", disable=True if quiet else None, file=sys.stderr, leave=False)


def _sampling(args, bundle):
    from .pipeline import SamplingOptions

    return SamplingOptions.from_bundle(bundle, greedy=True if args.greedy else None, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p)


def _prompts_and_images(items):
    prompts: list[str] = []
    images: list[list[str]] = []
    pending: list[str] = []  # images given before any prompt belong to the first one
    for kind, value in items:
        if kind == "prompt":
            prompts.append(value)
            images.append(pending)
            pending = []
        elif prompts:
            images[-1].append(value)
        else:
            pending.append(value)
    return prompts, images


def run_chat(args, model) -> dict:
    from .image import load_image

    prompts, image_paths = _prompts_and_images(args.items)
    images = [[load_image(p) for p in paths] for paths in image_paths]
    sampling = _sampling(args, model.bundle)
    max_new = args.max_new_tokens or model.bundle.search["max_new_tokens"]
    # one prompt, plain output: stream the answer to stdout as it is generated (the bar would interleave)
    stream = len(prompts) == 1 and not args.json
    with _progress(max_new, args.quiet or stream) as bar:
        result = model.chat(prompts, images if len(prompts) > 1 else images[0], system=args.system,
                            raw=args.raw_prompt, max_new_tokens=max_new, sampling=sampling, seed=args.seed,
                            on_token=lambda step, ids: bar.update(1),
                            on_text=(lambda row, delta: _write_stdout(delta)) if stream else None,
                            allow_special_tokens=args.allow_special_tokens)
    if stream:
        _write_stdout("\n")
    return {"text": result.texts, "prompt_ids": result.prompt_ids, "tokens": result.tokens, "seed": result.seed,
            "streamed": stream}


def run_generate_image(args, model) -> dict:
    from .output import ImageOutputs
    from .prompt import calculate_generate_size

    prompts, _ = _prompts_and_images(args.items)
    sampling = _sampling(args, model.bundle)
    area = args.image_area or model.bundle.search["image_area"]
    grids = [calculate_generate_size(r, area, model.bundle.spatial_factor)
             for r in (args.ratio or [model.bundle.search["ratio"]])]
    # every output path is checked before the first step; previews this run writes are removed on any exit
    with ImageOutputs(args.output, len(prompts), previews=args.preview_every > 0) as out, \
            _progress(max(h * (w + 1) + 3 for h, w in grids), args.quiet) as bar:
        result = model.generate_image(
            prompts, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale, ratio=args.ratio,
            image_area=args.image_area, sampling=sampling, seed=args.seed,
            on_token=lambda step, ids: bar.update(1), preview_every=args.preview_every,
            on_preview=lambda row, rows, im: out.preview(row, im, rows),
            allow_special_tokens=args.allow_special_tokens)
        paths = out.commit(result.images, [{
            "prompt": prompts[i], "negative_prompt": result.negative_prompt, "cfg_scale": result.cfg_scale,
            "seed": result.seed, "grid": list(result.grids[i]), "sampling": dataclasses.asdict(sampling),
            "bundle_sha256": model.bundle.sha256, "emu3_rt": __version__} for i in range(len(prompts))])
    return {"images": [str(p) for p in paths], "grid": [list(g) for g in result.grids],
            "prompt_ids": result.prompt_ids, "tokens": result.tokens, "seed": result.seed}


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every cleanup (previews, temp files) still runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _trap_signals():
    """Turn SIGTERM/SIGHUP into _Terminated while main() runs; returns a function that restores the handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def raise_terminated(signum, frame):
        raise _Terminated(signum)

    wanted = [sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if sig]
    previous = {sig: signal.signal(sig, raise_terminated) for sig in wanted}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def _write_stdout(text: str) -> None:
    """Write the result; a closed or full stdout becomes one error line instead of a traceback."""
    if sys.stdout is None:  # started with fd 1 closed
        raise OSError("cannot write the result to stdout (it is closed)")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        # the interpreter flushes stdout again at exit: point it at /dev/null so that flush cannot fail too
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        raise OSError(f"cannot write the result to stdout ({e.strerror or e})") from None


def _print_result(args, out: dict) -> None:
    if args.json:
        out.pop("streamed", None)
        _write_stdout(json.dumps(out, ensure_ascii=False) + "\n")
    elif args.command == "chat":
        if not out["streamed"]:
            _write_stdout("\n".join(out["text"]) + "\n")
    else:
        _write_stdout("\n".join(out["images"]) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (already printed as one line), --help, --version
        return int(e.code or 0)
    restore_signals = _trap_signals()
    try:
        _check_utf8(argv)
        from .pipeline import load

        model = load(args.bundle, engine=args.engine, device=args.device, threads=args.threads, verify=args.verify,
                     device_id=args.device_id)
        out = run_chat(args, model) if args.command == "chat" else run_generate_image(args, model)
        if args.seed is None and out["seed"] is not None:
            print(f"seed: {out['seed']}", file=sys.stderr)
        _print_result(args, out)
    except KeyboardInterrupt:
        print("emu3-rt: interrupted", file=sys.stderr)
        return 130
    except _Terminated as e:
        print(f"emu3-rt: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:  # noqa: BLE001 - the CLI owns the one-line error contract
        if args.verbose:
            traceback.print_exc()
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"emu3-rt: error: {message}", file=sys.stderr)
        return 2
    finally:
        restore_signals()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    raise SystemExit(main())
