"""Parity of the exported graphs (onnxruntime CPU) against the Transformers model, at shapes other than the
tracing samples: batch 1 and 3, non-square images, past lengths 0, 1 and 37, multi-token continuation and a
left-padded batch. The references are Transformers' own entry points (`vqmodel.encode`, `vqmodel.decode`, the
model forward with a DynamicCache), not our wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Tolerances per step-graph dtype: (logits, present K/V), each relative to the reference's scale max(1, max |x|):
# trained checkpoints carry K/V of magnitude 10-100, where float32 rounding alone exceeds an absolute 1e-5.
STEP_TOLERANCE = {"float32": (1e-4, 1e-5), "float16": (2e-2, 1e-2), "bfloat16": (1e-1, 5e-2)}
PIXEL_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Check:
    graph: str
    case: str
    metric: str
    value: float
    limit: float

    @property
    def ok(self) -> bool:
        return bool(self.value <= self.limit)


DEVICE = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}
_device = "cpu"


def set_device(device: str) -> None:
    """onnxruntime device for the parity checks: "cpu", or "cuda" (bf16 graphs have no CPU kernels)."""
    global _device
    import onnxruntime as ort

    if DEVICE[device][0] not in ort.get_available_providers():
        raise RuntimeError(f"{DEVICE[device][0]} is not available to verify on; install onnxruntime-gpu")
    _device = device


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=DEVICE[_device])


def verify_vq(vqmodel, out_dir: Path, seed: int = 0) -> list[Check]:
    checks = []
    g = torch.Generator().manual_seed(seed)
    enc = _session(out_dir / "vq_encoder.onnx")
    for b, h, w in ((1, 64, 64), (3, 48, 80), (2, 40, 24)):
        x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
        with torch.no_grad():
            ref = torch.stack(vqmodel.encode(x, torch.tensor([[h, w]] * b)).image_tokens).numpy()
        got = enc.run(["codes"], {"pixel_values": x.numpy()})[0]
        mismatches = got.size if got.shape != ref.shape else int((got != ref).sum())
        checks.append(Check("vq_encoder", f"B={b} {h}x{w}", "codes differing", mismatches, 0))
    dec = _session(out_dir / "vq_decoder.onnx")
    k = vqmodel.config.codebook_size
    for b, h, w in ((1, 8, 8), (3, 5, 7), (2, 3, 6)):
        codes = torch.randint(0, k, (b, h, w), generator=g)
        with torch.no_grad():
            ref = vqmodel.decode(codes).float().numpy()
        got = dec.run(["pixel_values"], {"codes": codes.numpy()})[0]
        diff = np.inf if got.shape != ref.shape else float(np.abs(got - ref).max())
        checks.append(Check("vq_decoder", f"B={b} {h}x{w}", "max |d pixel|", diff, PIXEL_TOLERANCE))
    return checks


def _positions(mask: np.ndarray) -> np.ndarray:
    """Transformers' generate positions: cumsum(mask) - 1, pads at 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def verify_decoder_step(model, out_dir: Path, seed: int = 0, head_ids: list[int] | None = None,
                        kv_cache: str = "buffer", file: str = "decoder_step.onnx") -> list[Check]:
    """The step graph `file` (its checks are named after it); head_ids: the graph scores only these vocabulary
    columns (a visual-only head).

    kv_cache "buffer": the past goes in as a buffer with `spare` empty slots after the P filled ones, holding
    random values under mask 0 (they must not leak), and the presents are compared with the S new rows.
    """
    from transformers import DynamicCache

    tc = model.config.text_config
    dtype = next(model.parameters()).dtype
    logit_tol, kv_tol = STEP_TOLERANCE[str(dtype).removeprefix("torch.")]
    sess = _session(out_dir / file)
    graph = Path(file).stem
    out_names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(seed)
    checks = []
    # (batch, past, seq, left pad of row 1, empty buffer slots)
    cases = ((1, 0, 7, 0, 0), (3, 0, 5, 0, 4), (3, 1, 1, 0, 0), (1, 37, 1, 0, 11), (3, 37, 4, 0, 2),
             (2, 0, 9, 3, 0), (2, 6, 1, 3, 5))
    for b, p, s, pad, spare in cases:
        spare = spare if kv_cache == "buffer" else 0
        ids = rng.integers(0, tc.vocab_size, (b, p + s))
        mask = np.ones((b, p + s), dtype=np.int64)
        if pad:
            mask[1, :pad] = 0
        pos = _positions(mask)
        t = torch.from_numpy
        cache = DynamicCache(config=tc)
        with torch.no_grad():
            if p:
                model(input_ids=t(ids[:, :p]), attention_mask=t(mask[:, :p]), position_ids=t(pos[:, :p]),
                      past_key_values=cache, use_cache=True)
            past = [x for layer in cache.layers for x in (layer.keys, layer.values)] if p else \
                [torch.zeros(b, tc.num_key_value_heads, 0, _head_dim(tc), dtype=dtype)] * (2 * tc.num_hidden_layers)
            # the graph's mask: P filled slots, `spare` empty ones, then the S new tokens
            graph_mask = np.concatenate([mask[:, :p], np.zeros((b, spare), np.int64), mask[:, p:]], axis=1)
            feeds = {"input_ids": ids[:, p:], "attention_mask": graph_mask, "position_ids": pos[:, p:]}
            for i in range(tc.num_hidden_layers):
                for kind, x in (("key", past[2 * i]), ("value", past[2 * i + 1])):
                    junk = torch.from_numpy(rng.standard_normal((b, x.shape[1], spare, x.shape[3]))).to(x.dtype)
                    feeds[f"past_key_values.{i}.{kind}"] = _np(torch.cat([x, junk], dim=2))
            ref = model(input_ids=t(ids[:, p:]), attention_mask=t(mask), position_ids=t(pos[:, p:]),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        got = dict(zip(out_names, sess.run(out_names, feeds)))
        ref_logits = ref.logits[:, -1].float().numpy()
        if head_ids is not None:
            ref_logits = ref_logits[:, head_ids]
        scale = max(1.0, float(np.abs(ref_logits).max()))
        case = f"B={b} P={p} S={s}" + (f" leftpad={pad}" if pad else "") + (f" empty={spare}" if spare else "")
        checks.append(Check(graph, case, "max |d logit| / scale",
                            float(np.abs(got["logits"] - ref_logits).max()) / scale, logit_tol))
        # Positions under mask == 0 (left padding) hold values no output ever reads: a fully masked query row
        # is NaN-guarded differently by sdpa and the ONNX graph, so only attended positions are compared.
        # A buffer graph returns only the new rows.
        first = p if kv_cache == "buffer" else 0
        keep = mask[:, first:].astype(bool)[:, None, :, None]
        kv_diff = 0.0
        for i, layer in enumerate(cache.layers[: tc.num_hidden_layers]):
            for kind, ref_kv in (("key", layer.keys), ("value", layer.values)):
                g = got[f"present.{i}.{kind}"].astype(np.float32)
                r = ref_kv[:, :, first:].float().numpy()
                scale = max(1.0, float(np.abs(np.where(keep, r, 0)).max()))
                diff = np.inf if g.shape != r.shape else float(np.abs(np.where(keep, g - r, 0)).max()) / scale
                kv_diff = max(kv_diff, diff)
        checks.append(Check(graph, case, "max |d present| / scale", kv_diff, kv_tol))
    return checks


def _head_dim(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def _np(x: torch.Tensor) -> np.ndarray:
    """Torch -> numpy, bf16 through its raw bits (numpy has no bfloat16; ml_dtypes reads them back)."""
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.contiguous().numpy()


def format_table(checks: list[Check]) -> str:
    rows = [("graph", "case", "metric", "value", "limit", "")]
    rows += [(c.graph, c.case, c.metric, f"{c.value:.3g}", f"{c.limit:.0e}" if c.limit else "0",
              "ok" if c.ok else "FAIL") for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def compare_graphs(reference: Path, candidate: Path, seed: int = 0) -> dict:
    """Logits of two step graphs with the same I/O on random prompts: mean |d logit| and top-1 agreement."""
    a, b = _session(reference), _session(candidate)
    inputs = {i.name: i for i in a.get_inputs()}
    kv = inputs["past_key_values.0.key"].shape
    vocab = a.get_outputs()[0].shape[1]
    rng = np.random.default_rng(seed)
    diffs, agree, total = [], 0, 0
    for b_, s in ((1, 7), (3, 16), (2, 33)):
        feeds = {"input_ids": rng.integers(0, vocab, (b_, s)), "attention_mask": np.ones((b_, s), np.int64),
                 "position_ids": np.tile(np.arange(s), (b_, 1))}
        for name in inputs:
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((b_, kv[1], 0, kv[3]), np.float32)
        la, lb = a.run(["logits"], feeds)[0], b.run(["logits"], feeds)[0]
        diffs.append(np.abs(la - lb).mean())
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        total += b_
    return {"mean_abs_logit_diff": float(np.mean(diffs)), "top1_agreement": agree / total}
