"""What the first call costs, without and with onnxruntime's optimized-graph cache (OrtOptions.cache_optimized).

    python -m benchmarks.startup [--bundle DIR ...] [--mid] [--repeats N] [--image-area PIXELS] [--json OUT]
    python -m benchmarks.startup --bundle DIR --chat N --hf CHECKPOINT [--hf-dtype fp32|fp16] [--json OUT]

Each figure comes from a fresh process: process start -> `import emu3_rt`, `load()`, session creation per graph,
the first chat token (prefill + sampler) and the first VQ run next to the second one (the warm-up), and the wall
time of `emu3-rt generate-image` (process start to PNG). Three modes, in one run on one machine:
  off   - no cache (what every load cost before it);
  cold  - the cache enabled but empty: this load writes it (paid once per graph, onnxruntime and CPU);
  warm  - the cache written by an earlier load.
The integrity stamps are warm in every mode (one load() first), so only session costs differ. --mid uses the mid
checkpoint's bundle (the real 184,622-id vocabulary; built once into benchmarks/.cache/ by benchmarks.e2e).

--chat N (big bundles, e.g. a real-geometry slice from benchmarks.scale): the CLI's `emu3-rt chat` of N tokens
as a process (the bundle's default sampling chain) in each mode, instead of generate-image, with --hf the same
prompt through Transformers as a process: import, `from_pretrained` at --hf-dtype and `generate` of N new tokens
(the checkpoint's sampling, exactly N). The ratio is Transformers' process over emu3-rt's, measured in one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("off", "cold", "warm")
PROMPT = "a red apple on a wooden table"


# ---- the probe: one fresh process, one mode ----

def probe(bundle: str, mode: str, spawned: float, prepack: bool = True) -> dict:
    """Seconds of each start-up stage in this process; `spawned` is the parent's time.time() at the spawn.
    prepack=False: the step graphs open as the CLI's one-prompt chat opens them (load(prepack=False))."""
    import emu3_rt
    t_import = time.time() - spawned

    import numpy as np

    from emu3_rt.engines import OrtEngine

    t = time.perf_counter()
    model = emu3_rt.load(bundle, prepack=prepack)
    t_load = time.perf_counter() - t
    if mode == "off":  # load() has no switch for the cache: the same engines, built with it off
        model.engines = {k: OrtEngine(e.spec, dataclasses.replace(e.options, cache_optimized=False))
                         for k, e in model.engines.items()}
    sessions = {}
    for key in ("decoder", "sampler", "vq_encoder", "vq_decoder"):
        if key in model.engines:
            t = time.perf_counter()
            _ = model.engines[key].session
            sessions[key] = time.perf_counter() - t
    runs = {}
    for name, call in (("chat 1 token", lambda: model.chat(PROMPT, max_new_tokens=1, seed=0)),
                       ("vq_decoder", lambda: model.engines["vq_decoder"].run(
                           {"codes": np.zeros((1, 4, 4), np.int64)})),
                       ("vq_encoder", lambda: model.engines["vq_encoder"].run(
                           {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}))):
        times = []
        for _ in range(2):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        runs[name] = times
    first_token = t_load + sessions["decoder"] + sessions.get("sampler", 0.0) + runs["chat 1 token"][0]
    return {"import": t_import, "load": t_load, "sessions": sessions, "runs": runs,
            "load_to_first_token": first_token, "start_to_first_token": t_import + first_token}


def _run_probe(bundle: Path, mode: str, env: dict, prepack: bool = True) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.startup", "--probe", mode, str(time.time()), "--bundle", str(bundle)]
    cmd += [] if prepack else ["--chat", "1"]   # the probe of a --chat run opens the step graph as the CLI does
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _cli_seconds(bundle: Path, mode: str, env: dict, area: int) -> float:
    """Wall time of `emu3-rt generate-image` (CFG 3, the bundle's sampling chain, a small image so start-up
    dominates). Mode off runs the same CLI with the cache switched off in load()'s options."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["generate-image", "--bundle", str(bundle), "--prompt", PROMPT, "--image-area", str(area),
                "--seed", "0", "-o", str(Path(tmp) / "x.png"), "-q"]
        if mode == "off":
            code = ("import functools, sys; import emu3_rt.pipeline as p; "
                    "p.OrtOptions = functools.partial(p.OrtOptions, cache_optimized=False); "
                    "from emu3_rt.cli import main; sys.exit(main(sys.argv[1:]))")
            cmd = [sys.executable, "-c", code, *args]
        else:
            cmd = [sys.executable, "-m", "emu3_rt", *args]
        return _process_seconds(cmd, env)


def _cli_chat_seconds(bundle: Path, mode: str, env: dict, tokens: int) -> float:
    """Wall time of `emu3-rt chat --max-new-tokens N` as a process (mode off: the cache switched off in load();
    mode "prepacked": the step graph's weights packed when its session opens, as before the CLI's one-row chat
    stopped asking for it)."""
    args = ["chat", "--bundle", str(bundle), "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--seed", "0",
            "-q"]
    if mode in ("off", "prepacked"):
        change = ("p.OrtOptions = functools.partial(p.OrtOptions, cache_optimized=False)" if mode == "off" else
                  "real = p.load; p.load = lambda *a, **k: real(*a, **{**k, 'prepack': True})")
        code = f"import functools, sys; import emu3_rt.pipeline as p; {change}; from emu3_rt.cli import run; run()"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "emu3_rt", *args]
    return _process_seconds(cmd, env)


def _process_seconds(cmd: list[str], env: dict) -> float:
    """Wall time of one CLI process, start to exit (its output discarded)."""
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def hf_probe(checkpoint: str, dtype: str, tokens: int, spawned: float) -> dict:
    """Transformers in this process: imports, from_pretrained at `dtype`, generate of exactly `tokens` new tokens
    with the checkpoint's generation config (its sampling), on the chat template's prompt."""
    import torch
    from transformers import AutoProcessor, Emu3ForConditionalGeneration

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    t_import = time.time() - spawned
    t = time.perf_counter()
    model = Emu3ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtypes[dtype]).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    t_load = time.perf_counter() - t
    content = [{"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], return_tensors="pt")
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
    t_generate = time.perf_counter() - t
    return {"import": t_import, "load": t_load, "generate": t_generate, "total": time.time() - spawned}


def _run_hf(checkpoint: Path, dtype: str, tokens: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.startup", "--hf-probe", str(checkpoint), dtype, str(tokens),
           str(time.time())]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _best(values: list):
    """The element-wise minimum of probe results (dicts of floats, dicts and lists)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _best([v[k] for v in values]) for k in first}
    if isinstance(first, list):
        return [_best([v[i] for v in values]) for i in range(len(first))]
    return min(values)


def measure(bundle: Path, repeats: int, area: int, chat: int = 0, cache_root: str | None = None) -> dict:
    """{mode: best probe figures + cli seconds} for one bundle, cache in a fresh temporary directory (under
    cache_root: a big bundle's cache entries hold a copy of its weights). chat > 0: the CLI runs chat of that many
    tokens instead of generate-image."""
    with tempfile.TemporaryDirectory(prefix="emu3-startup-", dir=cache_root) as cache:
        env = {**os.environ, "EMU3_RT_CACHE_DIR": cache}
        ort_cache = Path(cache) / "ort"
        subprocess.run([sys.executable, "-c", f"import emu3_rt; emu3_rt.load({str(bundle)!r})"], env=env,
                       check=True)  # the integrity stamps, so that no mode pays for hashing the bundle
        result = {}
        for mode in MODES:
            probes, cli = [], []
            for _ in range(repeats):
                if mode == "cold":
                    shutil.rmtree(ort_cache, ignore_errors=True)
                probes.append(_run_probe(bundle, mode, env, prepack=not chat))
                if mode == "cold":
                    shutil.rmtree(ort_cache, ignore_errors=True)
                cli.append(_cli_chat_seconds(bundle, mode, env, chat) if chat
                           else _cli_seconds(bundle, mode, env, area))
            result[mode] = {**_best(probes), "cli": min(cli), "cli_runs": cli}
        result["cache_bytes"] = sum(f.stat().st_size for f in ort_cache.rglob("*") if f.is_file())
        result["cli_command"] = f"chat {chat} tokens" if chat else "generate-image"
        if chat:
            result["cli_prepacked"] = min(_cli_chat_seconds(bundle, "prepacked", env, chat) for _ in range(repeats))
    return result


# ---- report ----

def _rows(r: dict) -> list[tuple[str, list[float]]]:
    rows = [("process start -> import emu3_rt", [r[m]["import"] for m in MODES]),
            ("load()", [r[m]["load"] for m in MODES])]
    rows += [(f"session {k}", [r[m]["sessions"][k] for m in MODES]) for k in r["off"]["sessions"]]
    for name in r["off"]["runs"]:
        rows.append((f"first run {name}", [r[m]["runs"][name][0] for m in MODES]))
        rows.append((f"  warm-up (first - second) {name}", [r[m]["runs"][name][0] - r[m]["runs"][name][1]
                                                           for m in MODES]))
    rows += [("load() -> first token", [r[m]["load_to_first_token"] for m in MODES]),
             ("process start -> first token", [r[m]["start_to_first_token"] for m in MODES]),
             (f"CLI {r.get('cli_command', 'generate-image')} wall", [r[m]["cli"] for m in MODES])]
    return rows


def report(name: str, r: dict) -> None:
    print(f"\n{name}  (cache written: {r['cache_bytes'] / 1e6:.1f} MB)")
    print(f"{'':42s} {'off':>9s} {'cold':>9s} {'warm':>9s}   off/warm  cold/off")
    for label, (off, cold, warm) in _rows(r):
        ratio = f"{off / warm:8.2f}x {cold / off:8.2f}x" if warm > 1e-4 and off > 1e-4 else ""
        print(f"{label:42s} {off * 1e3:7.1f}ms {cold * 1e3:7.1f}ms {warm * 1e3:7.1f}ms   {ratio}")
    if "cli_prepacked" in r:
        print(f"CLI {r['cli_command']} with the step graph prepacked (before): {r['cli_prepacked']:.2f} s "
              f"({r['cli_prepacked'] / r['warm']['cli']:.2f}x the warm run)")
    if "hf" in r:
        hf = r["hf"]
        print(f"Transformers {hf['dtype']} as a process: {hf['total']:.2f} s (imports {hf['import']:.2f}, "
              f"from_pretrained {hf['load']:.2f}, generate {hf['generate']:.2f})")
        print("  Transformers process / emu3-rt chat process: " +
              ", ".join(f"{m} {hf['total'] / r[m]['cli']:.2f}x" for m in MODES) +
              (f", prepacked {hf['total'] / r['cli_prepacked']:.2f}x" if "cli_prepacked" in r else ""))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from emu3_rt.cli import int_in, tool_parser
    from emu3_rt.pipeline import DEFAULT_BUNDLE

    ap = tool_parser("python -m benchmarks.startup", __doc__)
    ap.add_argument("--bundle", type=Path, action="append", default=None,
                    help="bundle directory, repeatable (default: the embedded tiny bundle)")
    ap.add_argument("--mid", action="store_true", help="also the mid bundle (exported once into benchmarks/.cache/)")
    ap.add_argument("--repeats", type=int_in(1), default=3, help="runs per mode; the best one counts")
    ap.add_argument("--image-area", type=int_in(64), default=4096, help="pixels of the CLI's image (small: start-up)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures (seconds) to this file")
    ap.add_argument("--chat", type=int_in(1), default=0,
                    help="time the CLI's chat of this many tokens (instead of generate-image)")
    ap.add_argument("--hf", type=Path, default=None,
                    help="with --chat: the checkpoint for Transformers' load + generate of as many tokens")
    ap.add_argument("--hf-dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                    help="Transformers' dtype (match the bundle's)")
    ap.add_argument("--cache-root", type=Path, default=None,
                    help="where the temporary cache directory goes (default: the system's temp directory)")
    ap.add_argument("--probe", nargs=2, default=None, help=argparse.SUPPRESS)  # MODE SPAWN-TIME: one child run
    ap.add_argument("--hf-probe", nargs=4, default=None, help=argparse.SUPPRESS)  # CKPT DTYPE N SPAWN-TIME
    args = ap.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe(str(args.bundle[0]), args.probe[0], float(args.probe[1]), prepack=not args.chat)))
        return 0
    if args.hf_probe is not None:
        ck, dtype, n, spawned = args.hf_probe
        print(json.dumps(hf_probe(ck, dtype, int(n), float(spawned))))
        return 0
    if args.hf is not None and not args.chat:
        ap.error("--hf needs --chat N")
    bundles = list(args.bundle or [DEFAULT_BUNDLE])
    if args.mid:
        from .e2e import prepare

        bundles.append(prepare("mid", "opset18")[1])
    import onnxruntime

    results = {"onnxruntime": onnxruntime.__version__, "cpus": os.cpu_count(), "bundles": {}}
    for bundle in bundles:
        r = measure(bundle, args.repeats, args.image_area, args.chat,
                    None if args.cache_root is None else str(args.cache_root))
        if args.hf is not None:
            runs = [_run_hf(args.hf, args.hf_dtype, args.chat, dict(os.environ)) for _ in range(args.repeats)]
            r["hf"] = {**_best(runs), "dtype": args.hf_dtype, "checkpoint": str(args.hf), "runs": runs}
        results["bundles"][str(bundle)] = r
        report(str(bundle), r)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
