"""`python -m export.build_trt --bundle models/NAME`: build TensorRT plans for a bundle's graphs, on the target GPU.

Plans are executables tied to one GPU architecture and one TensorRT version, so they are built where they run
and recorded in `trt/plans.json` inside the bundle (GPU compute capability, TensorRT version, sha256 of each
plan and of the ONNX it came from). The runtime loads a plan only from that directory and only when all match.

The decoder step gets two optimization profiles: prefill (seq 1..prefill_chunk, past 0..context) and decode
(seq 1, past 0..context); rows up to --max-batch (2 x prompts under CFG).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from emu3_rt.bundle import sha256_file
from emu3_rt.kv_cache import KV_BLOCK


def _profiles(manifest: dict, graph: str, max_batch: int, max_side: int) -> list[dict[str, tuple]]:
    """Per profile: input name -> (min, opt, max) shapes."""
    model = manifest["model"]
    opt_side = min(512, max_side)
    if graph == "vq_encoder":
        return [{"pixel_values": ((1, 3, 8, 8), (1, 3, opt_side, opt_side), (max_batch, 3, max_side, max_side))}]
    if graph == "vq_decoder":
        return [{"codes": ((1, 1, 1), (1, opt_side // 8, opt_side // 8), (max_batch, max_side // 8, max_side // 8))}]
    dec = model[graph]  # "decoder", or "image_decoder" (the same geometry and names, a narrower logits output)
    ctx, chunk = model["context_length"], manifest["search"]["prefill_chunk"]
    kv, d = dec["num_key_value_heads"], dec["head_size"]
    past_names = [dec["inputs"][f"past_{k}_names"] % i
                  for i in range(dec["num_hidden_layers"]) for k in ("key", "value")]
    # past = the filled cache (concat), or the runtime's buffer, whose capacity is a multiple of KV_BLOCK
    top = -(-ctx // KV_BLOCK) * KV_BLOCK if dec["kv_cache"] == "buffer" else ctx - 1
    profiles = []
    # rows (min, opt, max): opt is CFG's two rows, never above max (--max-batch 1: one row without CFG)
    rows = (1, min(2, max_batch), max_batch)
    # (min, opt, max) of the new tokens and of the past: a prefill profile and a decode profile
    for seq, past in (((1, chunk, chunk), (0, 0, top)), ((1, 1, 1), (1, min(1024, top), top))):
        p = {"input_ids": tuple((b, s) for b, s in zip(rows, seq)),
             "position_ids": tuple((b, s) for b, s in zip(rows, seq)),
             "attention_mask": tuple((b, s + q) for b, s, q in zip(rows, seq, past))}
        for name in past_names:
            p[name] = tuple((b, kv, q, d) for b, q in zip(rows, past))
        profiles.append(p)
    return profiles


def build_plan(onnx_path: Path, plan_path: Path, profiles: list[dict], workspace_gb: int = 8) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TRT 10; TRT 11 is strongly typed always
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path.name}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path.name}: TensorRT build failed (see the log above)")
    plan_path.write_bytes(bytes(plan))


def plan_record(plan: Path, onnx_path: Path) -> dict:
    """plans.json's entry for a plan: its sha256 and that of the ONNX file it was compiled from, hashed from the
    file itself (the manifest's hash would vouch for a graph file changed since it was written; the runtime then
    compares this with bundle.json and refuses a plan built from another graph)."""
    return {"filename": plan.name, "sha256": sha256_file(plan), "onnx_sha256": sha256_file(onnx_path)}


GRAPHS = ("decoder_step", "decoder_step_visual", "vq_encoder", "vq_decoder")
# graph -> its block under bundle.json's "model" (and key in plans.json, as emu3_rt.engines.trt.plan_for reads it)
KEYS = {"decoder_step": "decoder", "decoder_step_visual": "image_decoder", "vq_encoder": "vq_encoder",
        "vq_decoder": "vq_decoder"}


def main(argv: list[str] | None = None) -> int:
    from emu3_rt.cli import int_in, tool_parser

    from .build import StageLog

    ap = tool_parser("python -m export.build_trt", __doc__)
    ap.add_argument("--bundle", required=True, type=Path, help="bundle directory written by python -m export")
    ap.add_argument("--graphs", nargs="+", default=None, choices=GRAPHS, metavar="GRAPH",
                    help=f"graphs to build plans for, among {', '.join(GRAPHS)} (default: every one the bundle has; "
                         "decoder_step_visual is the image step graph of a --head both bundle)")
    ap.add_argument("--max-batch", type=int_in(1, 1024), default=2,
                    help="most rows per call: 2 x prompts under CFG (default: 2, one prompt with CFG)")
    ap.add_argument("--max-image-side", type=int_in(8, 8192), default=1024,
                    help="largest image side in pixels, a multiple of 8 (the VQ graphs' profile)")
    ap.add_argument("--device-id", type=int_in(0, 1023), default=0,
                    help="the GPU to build on (and whose architecture the plans record; the runtime's device_id)")
    ap.add_argument("--workspace-gb", type=int_in(1, 1024), default=8, help="TensorRT builder workspace in GiB")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only errors")
    args = ap.parse_args(argv)
    if args.max_image_side % 8:
        ap.error(f"argument --max-image-side: must be a multiple of 8, got {args.max_image_side}")
    error = f"{ap.prog}: error:"
    if not args.bundle.is_dir():
        print(f"{error} {args.bundle}: bundle directory does not exist", file=sys.stderr)
        return 2
    if not (args.bundle / "bundle.json").is_file():
        print(f"{error} {args.bundle}: no bundle.json; expected a bundle written by python -m export", file=sys.stderr)
        return 2
    manifest = json.loads((args.bundle / "bundle.json").read_text())
    present = [g for g in GRAPHS if KEYS[g] in manifest.get("model", {})]
    missing = [g for g in args.graphs or [] if g not in present]
    if missing:
        print(f"{error} {args.bundle} has no {missing[0]} graph (model.{KEYS[missing[0]]} in bundle.json)",
              file=sys.stderr)
        return 2
    args.graphs = args.graphs or present
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError:
        print(f"{error} needs the trt extra (tensorrt + cuda-python) and a GPU", file=sys.stderr)
        return 2
    err, prop = cudart.cudaGetDeviceProperties(args.device_id)
    if int(err) == 0:
        (err,) = cudart.cudaSetDevice(args.device_id)   # TensorRT builds on the current device
    if int(err) != 0:
        print(f"{error} no CUDA device ({err})", file=sys.stderr)
        return 2
    sm = f"{prop.major}.{prop.minor}"
    out_dir = args.bundle / "trt"
    out_dir.mkdir(exist_ok=True)
    record = {"tensorrt": trt.__version__, "sm": sm, "gpu": prop.name.decode(errors="replace").strip("\x00"),
              "plans": {}}
    log = StageLog("build_trt", args.quiet)
    try:
        # a plan takes minutes to build on a real bundle: a line before and after each
        for i, graph in enumerate(args.graphs, 1):
            key = KEYS[graph]
            onnx_path = args.bundle / manifest["model"][key]["filename"]
            plan_path = out_dir / f"{graph}.sm{sm.replace('.', '')}.trt{trt.__version__}.plan"
            t = time.perf_counter()
            log(f"{graph} ({i}/{len(args.graphs)}) ...")
            build_plan(onnx_path, plan_path, _profiles(manifest, key, args.max_batch, args.max_image_side),
                       args.workspace_gb)
            log(f"{graph} ({i}/{len(args.graphs)}) ... {time.perf_counter() - t:.1f} s")
            record["plans"][key] = plan_record(plan_path, onnx_path)
    except KeyboardInterrupt:
        log.close()
        print(f"{ap.prog}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        log.close()
        print(f"{error} {e}".splitlines()[0], file=sys.stderr)
        return 2
    (out_dir / "plans.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out_dir / 'plans.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
