"""Decode steps on the engine's own state (engines/state.py): ms per step for one row and CFG's two rows at several
contexts, the bytes the host sends and takes back per step, next to Transformers eager on the same device in the
same run and the memory roofline (weights + KV bytes / a measured device-to-device copy bandwidth).

    python -m benchmarks.gpu --device cuda --json gpu.json             # the mid checkpoint (benchmarks.e2e's)
    python -m benchmarks.gpu --device cuda --slice-8b                  # + the Emu3-Gen geometry, 2 and 4 layers, fp16

Steps run on the full-vocabulary step graph (the logits read back are (R, 184,622) float32). When the bundle has a
sampler graph, every step is also run with it chained (state.step_and_pick; CFG 3 over two rows, top-k 2048,
sampled): `chained_*` figures, and the report's top-level bytes are those. What counts as traffic: the decode state
(the same DecodeState on the CPU's host memory and on CUDA) counts only the step's ids / positions / mask slots and
the sampler's small feeds in, the ids out (the logits never leave the engine); `bytes_logits_*`: the top-level
figures without the sampler, logits read back. The 8B slice's 32-layer step is extrapolated as
fixed part + 32 x the per-layer slope between the 2- and 4-layer slices.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from emu3_rt.cli import int_in, tool_parser

from .e2e import CACHE, cached_bundle, prepare


def slice_8b(layers: int) -> tuple[Path, Path]:
    """(checkpoint, fp16 bundle) of the Emu3-Gen layer geometry with `layers` layers (random weights)."""
    from export.tiny import Preset, build_checkpoint

    ck = CACHE / f"slice8b-{layers}" / "checkpoint"
    if not (ck / "config.json").is_file():
        print(f"building the 8B slice with {layers} layers in {ck}", file=sys.stderr)
        build_checkpoint(ck, Preset(layers=layers, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                                    max_positions=9216, rope_theta=1e6, pad_bpe_to=151643, codebook=32768))
    return ck, cached_bundle(ck, ck.parent / "bundle-fp16", dtype="fp16", head="full")


def copy_bandwidth(device: str, device_id: int) -> float:
    """Bytes per second of a plain 256 MB device-to-device copy (read + write counted)."""
    n = 256 << 20
    if device == "cpu":
        a, b = np.ones(n, np.uint8), np.empty(n, np.uint8)
        copy = lambda: np.copyto(b, a)  # noqa: E731
        sync = lambda: None  # noqa: E731
    else:
        from emu3_rt.engines.memory import CudaMemory

        mem = CudaMemory(device_id)
        src, dst, stream = mem.alloc((n,), "bool"), mem.alloc((n,), "bool"), mem.stream()   # alive while timed
        copy = lambda: mem.copy2d(dst.ptr, n, src.ptr, n, n, 1, stream)  # noqa: E731
        sync = lambda: mem.sync(stream)  # noqa: E731
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n / best


def emu3_steps(engine, layout, vocab: int, rows: int, context: int, steps: int, sampler=None) -> dict:
    """ms per decode step and bytes per step on engine's own state, after a prefill of `context` random ids: the
    logits read back and argmax'ed on the host, or with `sampler` (the sampler graph's engine) chained onto the
    step, the bundle's chain (CFG 3 when rows == 2) picking in the engine."""
    from emu3_rt.generate import decode_step, prefill
    from emu3_rt.graph_sampler import GraphSampler
    from emu3_rt.prompt import make_batch

    ids = np.random.default_rng(1).integers(0, vocab, context).tolist()
    state = engine.new_state(layout, rows, capacity_hint=context + steps + 2)
    if sampler is None:   # (R, V) logits -> each row's argmax (R,)
        chained, fed = (lambda step: None), (lambda logits: logits.argmax(-1))
    else:                 # (B,) columns -> every stream of its sequence (R,)
        graph = GraphSampler(sampler, cfg_scale=3.0 if rows == 2 else None, grid=None, temperature=1.0, top_k=2048,
                             top_p=1.0, greedy=False, rng=np.random.default_rng(0))
        chained, fed = (lambda step: (sampler, graph.feeds(step, rows))), (lambda ids: np.tile(ids, rows // len(ids)))
    out = prefill(engine, state, make_batch([ids] * rows, None, 0), 512, chained(0))
    out = decode_step(engine, state, fed(out), 0, chained(1))   # warm-up (and CUDA graph capture)
    h2d, d2h = state.traffic.h2d, state.traffic.d2h
    t = time.perf_counter()
    for step in range(steps):
        out = decode_step(engine, state, fed(out), step + 1, chained(step + 2))
    ms = 1e3 * (time.perf_counter() - t) / steps
    prefix = "" if sampler is None else "chained_"
    result = {"state": type(state).__name__, f"{prefix}emu3_rt_ms": ms,
              f"{prefix}bytes_h2d_per_step": (state.traffic.h2d - h2d) / steps,
              f"{prefix}bytes_d2h_per_step": (state.traffic.d2h - d2h) / steps}
    state.close()
    return result


def hf_steps(hf_model, device: str, vocab: int, rows: int, context: int, steps: int) -> float:
    """ms per Transformers eager step: CFG's rows run as separate forwards with their own caches, as generate does."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([np.random.default_rng(1).integers(0, vocab, context).tolist()], device=device)
    caches = [DynamicCache(config=hf_model.config.text_config) for _ in range(rows)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        nxt = [hf_model(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
               for c in caches]

        def step():
            for i, c in enumerate(caches):
                nxt[i] = hf_model(input_ids=nxt[i], past_key_values=c, use_cache=True,
                                  logits_to_keep=1).logits[:, -1:].argmax(-1)

        step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
    return 1e3 * (time.perf_counter() - t) / steps


def bench(name: str, ck: Path, bundle_dir: Path, args, bandwidth: float) -> list[dict]:
    import emu3_rt
    from emu3_rt.engines.state import KVLayout

    model = emu3_rt.load(bundle_dir, device=args.device, threads=args.threads, device_id=args.device_id)
    engine, sampler = model.engines["decoder"], model.engines.get("sampler")
    if args.cuda_graph:
        from emu3_rt.engines import OrtEngine, OrtOptions

        engine = OrtEngine(model.bundle.decoder, OrtOptions(device="cuda", device_id=args.device_id, cuda_graph=True))
    layout, vocab = KVLayout.from_bundle(model.bundle), model.bundle.vocab_size
    hf_model = None
    if not args.no_hf:
        from tests import hf_reference as ref

        hf_model = ref.load(str(ck))[0].to(args.device)
        hf_model.set_attn_implementation("eager")
    dec = model.bundle.manifest["model"]["decoder"]
    weights = sum(p.stat().st_size for p in model.bundle.root.glob("decoder_step*")) if hf_model is None else sum(
        p.numel() * p.element_size() for n, p in hf_model.named_parameters() if "vqmodel" not in n and "embed" not in n)
    rows_out = []
    for rows in (1, 2):
        for context in args.contexts:
            where = (engine, layout, vocab, rows, context, args.steps)
            r = {"rows": rows, "context": context, **emu3_steps(*where)}
            if sampler is not None:   # the same step with the sampler graph chained: chained_* figures
                r.update(emu3_steps(*where, sampler))
            kv = rows * 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * context * dec["head_size"] * (
                4 if layout.dtype == "float32" else 2)
            r.update(model=name, roofline_ms=1e3 * (weights + kv) / bandwidth)
            if hf_model is not None:
                r["hf_ms"] = hf_steps(hf_model, args.device, vocab, rows, context, args.steps)
                r["speedup"] = r["hf_ms"] / r["emu3_rt_ms"]
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
            rows_out.append(r)
    return rows_out


def main(argv: list[str] | None = None) -> int:
    ap = tool_parser("python -m benchmarks.gpu", __doc__)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the engines and Transformers run")
    ap.add_argument("--device-id", type=int_in(0), default=0, help="CUDA device ordinal")
    ap.add_argument("--threads", type=int_in(0), default=2, help="CPU threads for onnxruntime and torch")
    ap.add_argument("--contexts", type=int_in(1), nargs="+", default=[64, 1024, 4096, 8192], metavar="N",
                    help="context lengths at which to time decode steps")
    ap.add_argument("--steps", type=int_in(1), default=16, help="decode steps timed per measurement")
    ap.add_argument("--cuda-graph", action="store_true", help="replay decode steps as CUDA graphs (device cuda)")
    ap.add_argument("--slice-8b", action="store_true",
                    help="also time the Emu3-Gen geometry with 2 and 4 layers (fp16) and extrapolate 32 layers")
    ap.add_argument("--no-hf", action="store_true", help="skip Transformers (no torch needed)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write every figure as JSON to OUT")
    args = ap.parse_args(argv)
    if args.cuda_graph and args.device != "cuda":
        ap.error("--cuda-graph needs --device cuda")
    if not args.no_hf:
        import torch

        torch.set_num_threads(max(args.threads, 1))
    bandwidth = copy_bandwidth(args.device, args.device_id)
    report = {"device": args.device, "copy_bandwidth_gb_s": bandwidth / 1e9, "steps": []}
    ck, bundle_dir = prepare("mid", "opset18")
    report["steps"] += bench("mid", ck, bundle_dir, args, bandwidth)
    at_1k = [r for r in report["steps"] if r["rows"] == 2 and r["context"] == 1024]
    if at_1k:   # the acceptance figure: mid, CFG, context 1k (with the sampler chained when the bundle has one)
        prefix = "chained_" if "chained_bytes_h2d_per_step" in at_1k[0] else ""
        report["bytes_state"], report["bytes_sampler_chained"] = at_1k[0]["state"], bool(prefix)
        report["bytes_h2d_per_step"] = at_1k[0][f"{prefix}bytes_h2d_per_step"]
        report["bytes_d2h_per_step"] = at_1k[0][f"{prefix}bytes_d2h_per_step"]
        report["bytes_logits_h2d_per_step"] = at_1k[0]["bytes_h2d_per_step"]
        report["bytes_logits_d2h_per_step"] = at_1k[0]["bytes_d2h_per_step"]
    if args.slice_8b:
        slices = {n: bench(f"8b-slice-{n}", *slice_8b(n), args, bandwidth) for n in (2, 4)}
        report["steps"] += slices[2] + slices[4]
        report["extrapolated_32_layers"] = []
        for a, b in zip(slices[2], slices[4]):
            per_layer = {k: (b[k] - a[k]) / 2 for k in ("emu3_rt_ms", "hf_ms", "roofline_ms") if k in a}
            row = {k: a[k] + 30 * v for k, v in per_layer.items()}
            report["extrapolated_32_layers"].append({"rows": a["rows"], "context": a["context"], **row})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
