"""Briefly train the mid checkpoint on local English text, so that fidelity numbers see realistic logit margins.

    python -m benchmarks.train [--steps 600] [--seed 0]      # (re)writes benchmarks/.cache/mid-trained/checkpoint

(`--config mid-trained` in benchmarks.e2e / benchmarks.variants builds it with the defaults when missing.)

Why: with random weights the mid model's logits are nearly flat (median top-1 minus top-2 gap 0.03), so any
weight noise flips greedy tokens, and int4's agreement with fp32 measures that flatness more than the
quantizer. A trained language model is confident on most tokens. This script fits the transformer layers of
the seeded mid checkpoint to Python's own documentation text (`pydoc_data.topics`: offline, in every CPython)
for a few hundred steps on the CPU. Only the corpus's rows of the embeddings and lm_head train (the softmax runs
over those ids plus sampled frozen negatives, which keeps a step near a second); the vocabulary stays the real
184,622-id layout.
`benchmarks.variants --config mid-trained` then measures every variant on it. Not a useful model: a
calibration target for quantization fidelity, built by code, seeded, no download.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .e2e import CACHE, checkpoint_for


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def train(src: Path, dst: Path, steps: int = 600, seed: int = 0, batch: int = 8, length: int = 64,
          negatives: int = 2048, lr: float = 3e-3, log=print) -> dict:
    import torch
    from transformers import AutoTokenizer, Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Emu3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    ids = np.asarray(tok(corpus())["input_ids"], dtype=np.int64)
    text_model, embed, head = model.model.text_model, model.model.text_model.embed_tokens.weight, model.lm_head.weight
    vocab = head.shape[0]
    for p in model.parameters():
        p.requires_grad_(False)
    # Only the corpus's rows of the embedding and lm_head train (as their own small parameters, written back at
    # the end); every other row keeps its seeded random value, so the negatives stay the frozen random rows.
    seen = np.unique(ids)
    column = np.full(vocab, -1, dtype=np.int64)
    column[seen] = np.arange(len(seen))
    seen_t = torch.from_numpy(seen)
    embed_rows = torch.nn.Parameter(embed[seen_t].clone())
    head_rows = torch.nn.Parameter(head[seen_t].clone())
    body = [*text_model.layers.parameters(), *text_model.norm.parameters()]
    for p in body:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([*body, embed_rows, head_rows], lr=lr, weight_decay=0.0)
    text_model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        starts = rng.integers(0, len(ids) - length - 1, batch)
        window = column[np.stack([ids[s: s + length + 1] for s in starts])]     # (B, T + 1) corpus columns
        x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
        extra = rng.integers(0, vocab, negatives)
        negative_rows = head[torch.from_numpy(extra[column[extra] < 0])]
        hidden = text_model(inputs_embeds=embed_rows[x]).last_hidden_state     # (B, T, E)
        logits = hidden @ torch.cat([head_rows, negative_rows]).T              # (B, T, seen + negatives)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}: loss {np.mean(losses[-50:]):.3f} ({time.perf_counter() - t0:.0f} s)")
    text_model.eval()
    with torch.no_grad():
        embed[seen_t] = embed_rows
        head[seen_t] = head_rows
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(dst)
    return {"steps": steps, "final_loss": float(np.mean(losses[-50:])), "corpus_tokens": int(len(ids))}


def margins(checkpoint: Path, prompts: list[str], tokens: int = 32) -> float:
    """Median top-1 minus top-2 logit over greedy continuations of the prompts (Transformers, fp32)."""
    import torch
    from transformers import AutoTokenizer, Emu3ForConditionalGeneration

    model = Emu3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    gaps = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(**tok([p], return_tensors="pt"), max_new_tokens=tokens, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
            for s in out.scores:
                top = torch.topk(s[0], 2).values
                gaps.append(float(top[0] - top[1]))
    return float(np.median(gaps))


def main(argv: list[str] | None = None) -> int:
    from emu3_rt.cli import SEED_MAX, int_in, tool_parser

    ap = tool_parser("python -m benchmarks.train", __doc__)
    ap.add_argument("--steps", type=int_in(1), default=600, help="optimizer steps (about a second each on a CPU)")
    ap.add_argument("--seed", type=int_in(0, SEED_MAX), default=0,
                    help="seeds the batches and sampled negatives (default: 0)")
    args = ap.parse_args(argv)
    from .variants import CHATS

    src, ck = checkpoint_for("mid"), CACHE / "mid-trained" / "checkpoint"
    train(src, ck, steps=args.steps, seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"median top-1 - top-2 logit gap on greedy chat continuations: random mid {margins(src, CHATS):.3f}, "
          f"trained mid {margins(ck, CHATS):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
