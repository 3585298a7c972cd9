"""Bundle variants against the default bundle (fp32, opset 18, KV buffer) of the same checkpoint, in one run.

    python -m benchmarks.variants [--config mid] [--variants concat opset23 visual int8 int4] [--json OUT]

For each variant: bundle size, seconds per image (CFG 3, greedy, and with the bundle's default chain: top-k 2048,
sampled), chat tokens/s, ms per decode step at short and long context, and fidelity against the fp32 bundle:
greedy token agreement (chat and image) and the mean |d logit| of the first step. Variants are exported once
into benchmarks/.cache/<config>/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .e2e import CACHE, CONFIGS, NEGATIVE, best_of, cached_bundle, prepare

VARIANTS = {
    "base": dict(opset=18),
    "concat": dict(opset=18, kv_cache="concat"),
    "opset23": dict(opset=23),
    "visual": dict(opset=18, head="visual"),
    "int8": dict(opset=18, quantize="int8"),
    "int4": dict(opset=18, quantize="int4"),
    "int4-emb": dict(opset=18, quantize="int4", quantize_embeddings=True),
}
CHATS = ["please describe the picture of the old house at night in detail", "what is a red cat doing on the mat?",
         "tell me about the mountain river at sunset", "hello world, one two three"]


def export_variant(config: str, name: str) -> Path:
    ck, base = prepare(config, "opset18")
    if name == "base":
        return base
    return cached_bundle(ck, CACHE / config / f"bundle-{name}", **VARIANTS[name])


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".onnx", ".data")) / 1e6


def teacher_forced_top1(model, reference) -> float:
    """Feed the reference's greedy chat tokens step by step; fraction of steps whose argmax equals them."""
    from emu3_rt.generate import decode_step, prefill
    from emu3_rt.kv_cache import new_state
    from emu3_rt.prompt import make_batch

    same = total = 0
    for prompt_ids, tokens in reference:
        cache = new_state(model.engines["decoder"], model.bundle, 1)
        logits = prefill(model.engines["decoder"], cache, make_batch([prompt_ids], None, model.bundle.tokens.pad),
                         512)
        for step, tok in enumerate(tokens):
            same += int(np.argmax(logits[0]) == tok)
            total += 1
            logits = decode_step(model.engines["decoder"], cache, np.array([tok]), step)
    return same / max(total, 1)


def measure(model, grid, chat_tokens, contexts, is_visual) -> dict:
    from emu3_rt import SamplingOptions
    from emu3_rt.generate import decode_step, prefill
    from emu3_rt.kv_cache import new_state
    from emu3_rt.prompt import make_batch

    greedy = SamplingOptions(greedy=True)
    h, w = grid
    t_img, img = best_of(2, lambda: model.generate_image("a portrait of young girl", negative_prompt=NEGATIVE,
                                                         cfg_scale=3.0, ratio=f"{w}:{h}", image_area=64 * h * w,
                                                         sampling=greedy))
    # what users run: the bundle's default chain (CFG 3 -> grid -> top-k 2048 -> seeded sample)
    default = SamplingOptions.from_bundle(model.bundle)
    t_def, _ = best_of(2, lambda: model.generate_image("a portrait of young girl", negative_prompt=NEGATIVE,
                                                       cfg_scale=3.0, ratio=f"{w}:{h}", image_area=64 * h * w,
                                                       sampling=default, seed=0))
    res = {"image_s": t_img, "image_tokens": img.tokens[0], "image_default_chain_s": t_def}
    if not is_visual:
        t_chat, chats = best_of(2, lambda: [model.chat(c, sampling=greedy, max_new_tokens=chat_tokens) for c in CHATS])
        res["chat_tok_s"] = sum(len(c.tokens[0]) for c in chats) / t_chat
        res["chat_tokens"] = [c.tokens[0] for c in chats]
        res["chat_pairs"] = [(c.prompt_ids[0], c.tokens[0]) for c in chats]
    rng = np.random.default_rng(0)
    engine = model.engines["decoder"]
    for rows, key in ((1, "step_ms"), (2, "cfg_step_ms")):   # one row, and CFG's two rows in one call
        for ctx in contexts:
            ids = rng.integers(0, 30000, ctx).tolist()
            cache = new_state(engine, model.bundle, rows)
            logits = prefill(engine, cache, make_batch([ids] * rows, None, model.bundle.tokens.pad), 512)
            if ctx == contexts[0] and rows == 1:
                res["first_logits"] = logits[0]
            t = time.perf_counter()
            for step in range(12):
                decode_step(engine, cache, np.full(rows, int(rng.integers(0, 30000))), step)
            res[f"{key}_{ctx}"] = 1e3 * (time.perf_counter() - t) / 12
    return res


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Free-running greedy agreement: fraction of equal positions over the shorter row (after a first
    difference the two continue from different prefixes, so this is stricter than teacher-forced top-1)."""
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        same += sum(int(p == q) for p, q in zip(x[:n], y[:n]))
        total += n
    return same / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    from emu3_rt.cli import int_in, tool_parser
    from emu3_rt.engines.ort import MAX_THREADS

    ap = tool_parser("python -m benchmarks.variants", __doc__)
    ap.add_argument("--config", choices=CONFIGS, default="mid",
                    help="seeded checkpoint: tiny, mid (real vocabulary and codebook), or mid-trained "
                         "(python -m benchmarks.train)")
    choices = [v for v in VARIANTS if v != "base"]
    ap.add_argument("--variants", nargs="+", default=["concat", "opset23", "visual", "int8", "int4"],
                    choices=choices, metavar="VARIANT",
                    help=f"bundles to compare with the base one (fp32, opset 18, KV buffer), among "
                         f"{', '.join(choices)} (default: concat opset23 visual int8 int4)")
    ap.add_argument("--grid", nargs=2, type=int_in(1, 1024), default=[16, 16], metavar=("H", "W"),
                    help="image size in VQ codes, rows and columns (default: 16 16)")
    ap.add_argument("--chat-tokens", type=int_in(1), default=32, help="new tokens per chat reply")
    ap.add_argument("--contexts", nargs="+", type=int_in(1), default=[64, 1024, 8192], metavar="N",
                    help="context lengths at which to time one decode step (default: 64 1024 8192)")
    ap.add_argument("--threads", type=int_in(1, MAX_THREADS), default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")
    args = ap.parse_args(argv)

    import emu3_rt

    names = ["base", *args.variants]
    paths = {n: export_variant(args.config, n) for n in names}
    rows = {}
    for n in names:
        model = emu3_rt.load(paths[n], threads=args.threads)
        model.generate_image("warm-up", cfg_scale=1.0, image_area=1024, seed=0)  # sessions are created lazily
        rows[n] = measure(model, tuple(args.grid), args.chat_tokens, args.contexts, n == "visual")
        rows[n]["size_mb"] = size_mb(paths[n])
        if n != "visual":
            rows[n]["chat_tf_top1"] = teacher_forced_top1(model, rows["base"]["chat_pairs"])
    base = rows["base"]
    print(f"\n{args.config}: variants vs the default bundle (fp32, opset 18, KV buffer), {args.threads} threads, "
          "one run; ms@N: ms per decode step at context N, cfg@N: the same with CFG's 2 rows")
    head = (f"{'variant':8} {'MB':>7} {'s/image':>8} {'x':>5} {'default':>8} {'chat tok/s':>10} {'x':>5} "
            + " ".join(f"{'ms@' + str(c):>8}" for c in args.contexts)
            + " ".join(f"{'cfg@' + str(c):>9}" for c in args.contexts) + f" {'chat top1':>9} {'chat agree':>10} "
            f"{'img agree':>9} {'|d logit|':>9}")
    print(head)
    report = {}
    for n in names:
        r = rows[n]
        chat_agree = agreement(base["chat_tokens"], r["chat_tokens"]) if "chat_tokens" in r else float("nan")
        img_agree = agreement([base["image_tokens"]], [r["image_tokens"]])
        dlogit = (float(np.abs(base["first_logits"] - r["first_logits"]).mean())
                  if r["first_logits"].shape == base["first_logits"].shape else float("nan"))
        report[n] = {"size_mb": r["size_mb"], "image_s": r["image_s"], "image_speedup": base["image_s"] / r["image_s"],
                     "image_default_chain_s": r["image_default_chain_s"],
                     "chat_tok_s": r.get("chat_tok_s"), "chat_agreement": chat_agree, "image_agreement": img_agree,
                     "chat_teacher_forced_top1": r.get("chat_tf_top1"),
                     "mean_abs_logit_diff": dlogit, **{k: v for k, v in r.items() if "step_ms" in k}}
        chat = r.get("chat_tok_s")
        print(f"{n:8} {r['size_mb']:7.0f} {r['image_s']:8.2f} {base['image_s'] / r['image_s']:5.2f} "
              f"{r['image_default_chain_s']:8.2f} "
              f"{chat if chat else float('nan'):10.1f} {(chat or np.nan) / base['chat_tok_s']:5.2f} "
              + " ".join(f"{r[f'step_ms_{c}']:8.2f}" for c in args.contexts)
              + " ".join(f"{r[f'cfg_step_ms_{c}']:9.2f}" for c in args.contexts)
              + f" {100 * r.get('chat_tf_top1', np.nan):8.1f}% {100 * chat_agree:9.1f}% {100 * img_agree:8.1f}%"
              f" {dlogit:9.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
