"""Side-by-side CPU benchmark: Transformers `generate` vs emu3_rt on the same seeded checkpoint, in one run.

    python -m benchmarks.e2e [--config tiny|mid] [--grid H W] [--variant opset18|opset23|concat] [--threads N]
                             [--json OUT] [--plot OUT.png]

The checkpoint (mid: 8 layers, hidden 512, 8/4 heads, the real 184,622-id vocabulary and 32,768-code codebook)
is built and exported once into benchmarks/.cache/. Every emu3_rt result is asserted token-equal to Transformers
(greedy) before its time is reported. Needs the export extra (torch + transformers) for the reference side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
SECTIONS = ("image", "chat", "prefill", "steps")
CONFIGS = ["tiny", "mid", "mid-trained"]  # mid-trained: mid fitted to local text (benchmarks.train)
NEGATIVE = "lowres, bad anatomy, bad hands, text, error, blurry."


# bundle variants of the e2e run -> export options (the default export: opset 18, KV buffer)
E2E_VARIANTS = {"opset18": dict(opset=18), "opset23": dict(opset=23), "concat": dict(opset=18, kv_cache="concat")}


def checkpoint_for(config: str) -> Path:
    """The seeded checkpoint of a config, built on first use: tiny, mid, or mid-trained (benchmarks.train)."""
    from export.tiny import build_checkpoint

    ck = CACHE / config / "checkpoint"
    if not (ck / "config.json").is_file():
        print(f"building {config} checkpoint in {ck}", file=sys.stderr)
        if config == "mid-trained":
            from .train import train

            train(checkpoint_for("mid"), ck, log=lambda m: print(m, file=sys.stderr, flush=True))
        else:
            build_checkpoint(ck, config, seed=0)
    return ck


def cached_bundle(ck: Path, out: Path, **options) -> Path:
    """The bundle exported from `ck` into the cache; (re-)exported when missing or when this runtime refuses
    it (a cache left by an older version)."""
    from emu3_rt.bundle import BundleError, load_bundle
    from export.build import ExportOptions, build_bundle

    try:
        load_bundle(out)
        return out
    except BundleError as e:
        print(f"exporting {out} ({e})", file=sys.stderr)
    build_bundle(ck, out, ExportOptions(overwrite=True, **options), log=lambda m: print(m, file=sys.stderr))
    return out


def prepare(config: str, variant: str) -> tuple[Path, Path]:
    ck = checkpoint_for(config)
    return ck, cached_bundle(ck, CACHE / config / f"bundle-{variant}", **E2E_VARIANTS[variant])


class TimedEngine:
    """Wraps a step or sampler engine (engines/base.StepEngine) and accumulates the time spent inside its runs:
    run() and execute() (a decode state's bound run). Its decode states are the inner engine's kind, bound to the
    inner engine's session, so what is timed is what users run."""

    def __init__(self, inner):
        self.inner, self.spec, self.seconds, self.calls = inner, inner.spec, 0.0, 0
        self.memory = inner.memory

    @property
    def closed(self):
        return self.inner.closed

    def _timed(self, fn, arg):
        t = time.perf_counter()
        out = fn(arg)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out

    def run(self, feeds):
        return self._timed(self.inner.run, feeds)

    def execute(self, binding):
        return self._timed(self.inner.execute, binding)

    def bind(self, *args, **kwargs):
        return self.inner.bind(*args, **kwargs)

    def unbind(self, binding):
        self.inner.unbind(binding)

    def release(self, stream):
        self.inner.release(stream)

    def new_state(self, layout, rows, capacity_hint=0, memory=None):
        from emu3_rt.engines.state import DecodeState
        from emu3_rt.kv_cache import capacity_for

        return DecodeState(self, layout, rows, self.spec.output(layout.logits).dims[1], capacity_hint,
                           memory or self.memory, capacity_for)


def best_of(n: int, fn):
    times, result = [], None
    for _ in range(n):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


# ---- the measurements ----

def bench_image(hf_model, processor, model, grid, repeats, visual=None):
    from tests import hf_reference as ref

    h, w = grid
    ratio, area = f"{w}:{h}", 64 * h * w
    prompt = "a portrait of young girl. masterpiece, film grained, best quality."
    t_hf, (_, hf_tokens, grids, _) = best_of(repeats, lambda: ref.text_to_image(
        str(ref_ck), [prompt], [ratio], area, 3.0, NEGATIVE))
    assert grids == [(h, w)], grids
    from emu3_rt import SamplingOptions

    greedy = SamplingOptions(greedy=True)
    t_rt, r = best_of(repeats, lambda: model.generate_image(prompt, negative_prompt=NEGATIVE, cfg_scale=3.0,
                                                             ratio=ratio, image_area=area, sampling=greedy))
    assert r.tokens == hf_tokens, "emu3_rt and Transformers disagree on the image tokens"
    # what users run: the bundle's default chain (CFG 3 -> grid -> top-k 2048 -> seeded sample)
    default = SamplingOptions.from_bundle(model.bundle)
    t_def, _ = best_of(repeats, lambda: model.generate_image(prompt, negative_prompt=NEGATIVE, cfg_scale=3.0,
                                                              ratio=ratio, image_area=area, sampling=default, seed=0))
    out = {"grid": [h, w], "tokens": len(r.tokens[0]), "hf_s": t_hf, "emu3_rt_s": t_rt, "speedup": t_hf / t_rt,
           "default_chain_s": t_def, "default_vs_greedy": t_def / t_rt, "default_speedup": t_hf / t_def,
           "cli_s": cli_image_seconds(model.bundle.root, prompt, ratio, area), "sampler": sampler_kind(model)}
    out["cli_speedup"] = t_hf / out["cli_s"]
    if visual is not None:  # the same image through a --head visual bundle
        t_v, rv = best_of(repeats, lambda: visual.generate_image(prompt, negative_prompt=NEGATIVE, cfg_scale=3.0,
                                                                  ratio=ratio, image_area=area, sampling=greedy))
        assert rv.tokens == hf_tokens, "the visual-head bundle and Transformers disagree on the image tokens"
        out.update(visual_head_s=t_v, visual_head_speedup=t_hf / t_v)
    return out


def sampler_kind(model) -> str:
    return "graph" if "sampler" in model.engines else "numpy"


def cli_image_seconds(bundle: Path, prompt: str, ratio: str, area: int, repeats: int = 2) -> float:
    """Wall time of `emu3-rt generate-image` with the bundle's defaults (CFG 3, top-k 2048, sampling), process
    start, imports, load and the PNG write included: what a user waits for."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "emu3_rt", "generate-image", "--bundle", str(bundle), "--prompt", prompt,
               "--ratio", ratio, "--image-area", str(area), "--negative-prompt", NEGATIVE, "--cfg-scale", "3",
               "--seed", "0", "-o", str(Path(tmp) / "x.png"), "-q"]
        return best_of(repeats, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))[0]


def bench_chat(model, new_tokens, repeats):
    from tests import hf_reference as ref

    text = "please describe the picture of the old house at night in detail, with the river and the trees"
    t_hf, (_, hf_tokens) = best_of(repeats, lambda: ref.chat(str(ref_ck), [ref.template(str(ref_ck), text, 0)], None,
                                                            new_tokens))
    from emu3_rt import SamplingOptions

    t_rt, r = best_of(repeats, lambda: model.chat(text, sampling=SamplingOptions(greedy=True),
                                                  max_new_tokens=new_tokens))
    assert r.tokens == hf_tokens, "emu3_rt and Transformers disagree on the chat tokens"
    n = len(r.tokens[0])
    return {"new_tokens": n, "hf_tok_s": n / t_hf, "emu3_rt_tok_s": n / t_rt, "speedup": t_hf / t_rt}


def bench_prefill(hf_model, model, length, repeats):
    import torch

    from emu3_rt.generate import prefill
    from emu3_rt.kv_cache import new_state
    from emu3_rt.prompt import make_batch

    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.bundle.vocab_size, length).tolist()
    batch = make_batch([ids], None, model.bundle.tokens.pad)
    chunk = model.bundle.search["prefill_chunk"]
    engine = model.engines["decoder"]
    t_rt, logits = best_of(repeats, lambda: prefill(engine, new_state(engine, model.bundle, 1), batch, chunk))

    def hf():
        with torch.no_grad():
            return hf_model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[:, -1].float().numpy()

    t_hf, ref_logits = best_of(repeats, hf)
    assert np.argmax(logits) == np.argmax(ref_logits)
    return {"prompt": length, "hf_ms": 1e3 * t_hf, "emu3_rt_ms": 1e3 * t_rt, "speedup": t_hf / t_rt}


def bench_steps(hf_model, model, context, rows=1, hf_steps=16, greedy=False):
    """ms per decode step at a given context, split into engine time and host (numpy) time; and HF's.

    emu3_rt runs KV_BLOCK steps, so the one buffer growth per block (a copy of the whole cache) is in the
    average as it is in a real run; Transformers' step has no such period, 16 steps are enough.

    rows=2 is a CFG step: emu3_rt runs cond + uncond as one 2-row call; Transformers runs the unconditional
    forward separately with its own cache (UnbatchedClassifierFreeGuidanceLogitsProcessor), so two calls.

    Sampling is the bundle's default chain, as users get it (plain: top-k 2048 + sample, as chat; CFG: CFG 3 ->
    16x16 grid -> top-k 2048 -> sample, as an image), on the model's sampler (graph or numpy); greedy=True times
    the argmax chain instead. "sampler" is the sampler graph's own run time, "host" everything else outside the
    step graph (numpy chain when there is no graph, KV writes, feeds).
    """
    import torch
    from transformers import DynamicCache

    from emu3_rt import SamplingOptions
    from emu3_rt.generate import Decoding, LoopOptions
    from emu3_rt.kv_cache import KV_BLOCK, new_state
    from emu3_rt.prompt import make_batch
    from emu3_rt.sampling import VisualGridConstraint

    steps = KV_BLOCK
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.bundle.vocab_size, context).tolist()
    # the engines a user's request runs on: an image's (the visual-head graph of a --head both bundle) for the
    # CFG step, chat's for the plain one; both wrapped to time them
    route = model.route("image" if rows == 2 else "chat")
    engine = TimedEngine(route.step)
    sampler = TimedEngine(route.sampler) if route.sampler is not None else None
    route = dataclasses.replace(route, step=engine, sampler=sampler)
    sampling = SamplingOptions(greedy=True) if greedy else SamplingOptions.from_bundle(model.bundle)
    grid = None
    if rows == 2:   # an image's step: CFG and the visual grid (16x16: a new row every 17 tokens)
        t, col = model.bundle.tokens, lambda ids: model._column(route, ids)
        grid = VisualGridConstraint(heights=np.array([16]), widths=np.array([16]),
                                    visual_ids=col(np.sort(model.bundle.visual_ids)), eol=col(t.eol),
                                    eof=col(t.eof), eoi=col(t.eoi), eos=col(t.eos), pad=col(t.pad),
                                    vocab_size=route.columns)
    pick, _, _ = model._picker(sampling, 3.0 if rows == 2 else 1.0, grid, 0, 1 if rows == 2 else rows, route)
    # the decode loop users run (Decoding: the sampler graph chained by the decode state), EOS never ends it
    opts = LoopOptions(max_new_tokens=steps + 1, eos_id=-1, pad_id=model.bundle.tokens.pad, prefill_chunk=512,
                       streams=2 if rows == 2 else 1, logit_ids=route.logit_ids)
    batch = make_batch([ids] * rows, None, model.bundle.tokens.pad)
    run = Decoding(engine, new_state(engine, model.bundle, rows), batch, pick, opts)
    run.step()   # the prefill and the first pick
    engine.seconds = 0.0
    if sampler is not None:
        sampler.seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        run.step()
    total = (time.perf_counter() - t0) / steps
    eng = engine.seconds / steps
    smp = (sampler.seconds / steps) if sampler is not None else 0.0

    caches = [DynamicCache(config=hf_model.config.text_config) for _ in range(rows)]
    with torch.no_grad():
        nxt = []
        for c in caches:
            out = hf_model(input_ids=torch.tensor([ids]), past_key_values=c, use_cache=True, logits_to_keep=1)
            nxt.append(out.logits[:, -1].argmax(-1, keepdim=True))

        def hf_step():
            for i, c in enumerate(caches):
                out = hf_model(input_ids=nxt[i], past_key_values=c, use_cache=True, logits_to_keep=1)
                nxt[i] = out.logits[:, -1].argmax(-1, keepdim=True)

        hf_step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(hf_steps):
            hf_step()
        hf_ms = 1e3 * (time.perf_counter() - t0) / hf_steps
    return {"context": context, "rows": rows, "chain": "greedy" if greedy else "default",
            "sampler": sampler_kind(model), "emu3_rt_ms": 1e3 * total, "engine_ms": 1e3 * eng,
            "sampler_ms": 1e3 * smp, "host_ms": 1e3 * (total - eng - smp), "host_share": (total - eng - smp) / total,
            "hf_ms": hf_ms, "speedup": hf_ms / (1e3 * total)}


def attention_only_ms(bundle, context: int, rows: int, threads: int, repeats: int = 20) -> float:
    """ms of a decode step's attention alone, in onnxruntime: for every layer, one query per head against
    `context` cached positions (q·Kᵀ + mask bias, softmax, p·V), GQA grouped as in the step graph. This is the
    part of a step that must grow with context; the rest of the step should not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    dec = bundle.manifest["model"]["decoder"]
    layers, kv, d = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    g = dec["num_attention_heads"] // kv
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f32, ["r", kv, g, d]),
              helper.make_tensor_value_info("bias", f32, ["r", 1, 1, "c"])]
    nodes, outputs = [], []
    for i in range(layers):
        inputs += [helper.make_tensor_value_info(f"k{i}", f32, ["r", kv, "c", d]),
                   helper.make_tensor_value_info(f"v{i}", f32, ["r", kv, "c", d])]
        nodes += [helper.make_node("Transpose", [f"k{i}"], [f"kt{i}"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["q", f"kt{i}"], [f"s{i}"]),
                  helper.make_node("Add", [f"s{i}", "bias"], [f"b{i}"]),
                  helper.make_node("Softmax", [f"b{i}"], [f"p{i}"], axis=-1),
                  helper.make_node("MatMul", [f"p{i}", f"v{i}"], [f"o{i}"])]
        outputs.append(helper.make_tensor_value_info(f"o{i}", f32, ["r", kv, g, d]))
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((rows, kv, g, d), dtype=np.float32),
             "bias": np.zeros((rows, 1, 1, context), np.float32)}
    for i in range(layers):
        for kind in "kv":
            feeds[f"{kind}{i}"] = rng.standard_normal((rows, kv, context, d), dtype=np.float32)
    sess.run(None, feeds)
    return 1e3 * min(best_of(1, lambda: sess.run(None, feeds))[0] for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    global ref_ck
    from emu3_rt.cli import int_in, tool_parser
    from emu3_rt.engines.ort import MAX_THREADS

    ap = tool_parser("python -m benchmarks.e2e", __doc__)
    ap.add_argument("--config", choices=CONFIGS, default="mid",
                    help="seeded checkpoint: tiny, mid (real vocabulary and codebook), or mid-trained "
                         "(python -m benchmarks.train)")
    ap.add_argument("--grid", nargs=2, type=int_in(1, 1024), default=[16, 16], metavar=("H", "W"),
                    help="image size in VQ codes, rows and columns (default: 16 16)")
    ap.add_argument("--variant", choices=sorted(E2E_VARIANTS), default="opset18",
                    help="bundle to time: opset18 (what python -m export writes), opset23 (fused attention), "
                         "concat (KV returned as past + new)")
    ap.add_argument("--threads", type=int_in(1, MAX_THREADS), default=2,
                    help="CPU threads for both torch and onnxruntime")
    ap.add_argument("--chat-tokens", type=int_in(1), default=64, help="new tokens per chat reply")
    ap.add_argument("--contexts", type=int_in(1), nargs="+", default=[64, 1024, 4096, 8192], metavar="N",
                    help="context lengths at which to time one decode step (default: 64 1024 4096 8192)")
    ap.add_argument("--repeats", type=int_in(1), default=2, help="runs per measurement; the best one counts")
    ap.add_argument("--visual-head", action="store_true", help="also time images on a --head visual bundle")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="PART",
                    help=f"time only these parts ({', '.join(SECTIONS)}; default: all)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")
    ap.add_argument("--plot", default=None, metavar="OUT.png",
                    help="PNG of ms/step vs context (needs matplotlib: the bench extra)")
    ap.add_argument("--from-json", default=None, metavar="IN",
                    help="only redraw the plot from an earlier run's --json output, into --plot or steps.png")
    args = ap.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        plot(report["steps"], args.plot or "steps.png", report["config"])
        return 0

    import torch

    import emu3_rt
    from tests import hf_reference as ref

    torch.set_num_threads(args.threads)
    ref_ck, bundle = prepare(args.config, args.variant)
    hf_model, processor = ref.load(str(ref_ck))
    hf_model.set_attn_implementation("eager")   # "eager, CFG as Transformers does it"
    model = emu3_rt.load(bundle, threads=args.threads)

    report = {"config": args.config, "variant": args.variant, "threads": args.threads,
              "machine": f"{os.cpu_count()} cpus", "torch": torch.__version__}
    visual = None
    if args.visual_head:
        from .variants import export_variant

        visual = emu3_rt.load(export_variant(args.config, "visual"), threads=args.threads)
    if "image" in args.only:
        report["image"] = bench_image(hf_model, processor, model, tuple(args.grid), args.repeats, visual)
    if "chat" in args.only:
        report["chat"] = bench_chat(model, args.chat_tokens, args.repeats)
    if "prefill" in args.only:
        report["prefill"] = [bench_prefill(hf_model, model, n, 1) for n in (1024, 4096)]
    if "steps" in args.only:
        report["steps"] = [bench_steps(hf_model, model, c, rows) for rows in (1, 2) for c in args.contexts]
        report["greedy_steps"] = [bench_steps(hf_model, model, c, rows, hf_steps=4, greedy=True)
                                  for rows in (1, 2) for c in args.contexts]
        for s in report["steps"]:  # the capacity the runtime's host buffer has at this context (capacity_for)
            s["attention_ms"] = attention_only_ms(model.bundle, _capacity(s["context"]), s["rows"], args.threads)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot and "steps" in report:
        plot(report["steps"], args.plot, args.config)
    return 0


def print_report(report: dict) -> None:
    print(f"\n{report['config']} bundle ({report['variant']}), {report['threads']} threads; tokens equal to "
          f"Transformers in every row")
    if "image" in report:
        im = report["image"]
        print(f"image {im['grid'][0]}x{im['grid'][1]} ({im['tokens']} tokens, CFG 3, greedy): HF {im['hf_s']:.2f} s, "
              f"emu3_rt {im['emu3_rt_s']:.2f} s  -> {im['speedup']:.2f}x")
        print(f"same image, the bundle's default chain (top-k 2048, sampled; {im['sampler']} sampler): "
              f"{im['default_chain_s']:.2f} s ({im['default_vs_greedy']:.2f}x the greedy time) -> "
              f"{im['default_speedup']:.2f}x HF")
        print(f"CLI generate-image, default chain, process start + load + PNG: {im['cli_s']:.2f} s -> "
              f"{im['cli_speedup']:.2f}x HF generate")
        if "visual_head_s" in im:
            print(f"image on the --head visual bundle: {im['visual_head_s']:.2f} s -> "
                  f"{im['visual_head_speedup']:.2f}x")
    if "chat" in report:
        ch = report["chat"]
        print(f"chat ({ch['new_tokens']} tokens): HF {ch['hf_tok_s']:.1f} tok/s, emu3_rt {ch['emu3_rt_tok_s']:.1f} "
              f"tok/s  -> {ch['speedup']:.2f}x")
    for p in report.get("prefill", []):
        print(f"prefill {p['prompt']}: HF {p['hf_ms']:.0f} ms, emu3_rt {p['emu3_rt_ms']:.0f} ms -> {p['speedup']:.2f}x")
    if "steps" in report:
        print_steps(report)


def print_steps(report: dict) -> None:
    print("per decode step; attention: the attention ops alone at that context (the part that must grow);")
    print("growth: (step - step at the first context) / (attention - attention at the first context)")
    print("sampling: the bundle's default chain (plain: top-k 2048 + sample; CFG: CFG 3 -> grid -> top-k 2048 ->"
          " sample); greedy steps below")
    print(f"{'step':>5} {'context':>8} {'HF ms/step':>11} {'emu3_rt':>8} {'x':>5} {'engine':>7} {'sampler':>7} "
          f"{'host':>6} {'host %':>7} {'attention':>9} {'growth':>6}")
    for s in report["steps"]:
        first = next(f for f in report["steps"] if f["rows"] == s["rows"])
        d_attn = s["attention_ms"] - first["attention_ms"]
        s["growth_vs_attention"] = (s["emu3_rt_ms"] - first["emu3_rt_ms"]) / d_attn if s is not first else None
        growth = f"{s['growth_vs_attention']:6.2f}" if s is not first else f"{'':6}"
        print(f"{'CFG' if s['rows'] == 2 else 'plain':>5} {s['context']:8d} {s['hf_ms']:11.2f} {s['emu3_rt_ms']:8.2f} "
              f"{s['speedup']:5.2f} {s['engine_ms']:7.2f} {s['sampler_ms']:7.2f} {s['host_ms']:6.2f} "
              f"{100 * s['host_share']:6.1f}% {s['attention_ms']:9.2f} {growth}")
    print("greedy steps (argmax chain):")
    for s in report["greedy_steps"]:
        print(f"{'CFG' if s['rows'] == 2 else 'plain':>5} {s['context']:8d} {s['hf_ms']:11.2f} {s['emu3_rt_ms']:8.2f} "
              f"{s['speedup']:5.2f} {s['engine_ms']:7.2f} {s['sampler_ms']:7.2f} {s['host_ms']:6.2f} "
              f"{100 * s['host_share']:6.1f}%")


def _capacity(context: int) -> int:
    from emu3_rt.kv_cache import capacity_for

    return capacity_for(context + 1)


def plot(steps, path, config):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for rows, style, what in ((1, "-", "plain step"), (2, "--", "CFG step")):
        part = [s for s in steps if s.get("rows", 1) == rows]
        if not part:
            continue
        ctx = [s["context"] for s in part]
        ax.plot(ctx, [s["hf_ms"] for s in part], "o" + style, color="C0", label=f"Transformers (eager), {what}")
        ax.plot(ctx, [s["emu3_rt_ms"] for s in part], "o" + style, color="C1", label=f"emu3_rt (ORT CPU), {what}")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{config} model, CPU; CFG: Transformers 2 forwards, emu3_rt 1 batched call", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


ref_ck: Path = CACHE

if __name__ == "__main__":
    sys.exit(main())
