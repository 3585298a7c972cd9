"""Seeded random Emu3 checkpoints in the Transformers `-hf` format, for tests and benchmarks.

`build_checkpoint(out_dir, preset)` writes what `Emu3ForConditionalGeneration.save_pretrained` and
`Emu3Processor.save_pretrained` write for a real checkpoint: config (with vocabulary_map), safetensors,
generation_config, tokenizer.json/config, preprocessor and chat template.

The tokenizer is a real byte-level BPE trained on a synthetic corpus, followed by Emu3's special tokens in the
real order (pad, im_start, im_end, 205 extras with extra_0 renamed `<image>`, IMG, BOI, EOI, then one
`<|visual token NNNNNN|>` per code), so every id relation of the real 184,622-id layout holds.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The converter's llava-style template, as shipped with the -hf checkpoints (see the transformers processor tests).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

NUM_EXTRAS = 205  # <|extra_0|> .. <|extra_204|>


@dataclass(frozen=True)
class Preset:
    # text model
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 1024
    rope_theta: float = 10000.0
    # BPE merges learnt on the synthetic corpus (the vocab is BPE + specials + codebook)
    bpe_vocab: int = 600
    # grow the BPE to exactly this many ids with synthetic merges (151643 = Qwen's ranks: the real id layout)
    pad_bpe_to: int | None = None
    # VQ
    codebook: int = 256
    base_channels: int = 32
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (3,)
    temporal_factor: int = 4
    # image processor: tiny images keep tests fast
    min_pixels: int = 32 * 32
    max_pixels: int = 64 * 64
    image_area: int = 64 * 64
    extra: dict = field(default_factory=dict)


PRESETS = {
    # GQA 4/2, codebook 256: the checked-in default bundle.
    "tiny": Preset(),
    # plain MHA, another vocab and codebook, a different VQ layout.
    "tiny-mha": Preset(
        layers=3, hidden=48, heads=3, kv_heads=3, intermediate=96, bpe_vocab=700, codebook=300,
        base_channels=32, channel_multiplier=(1, 2, 1, 2), attn_resolutions=(3,), rope_theta=1e6,
    ),
    # the real 184,622-id layout (151,643 BPE ids + 3 + 205 + 3 + 32,768 visual) on a very small network.
    "tiny-realvocab": Preset(
        layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64, pad_bpe_to=151643, codebook=32768,
        max_positions=9216, rope_theta=1e6,
    ),
    # benchmark model: real codebook size and roughly the real vocab size.
    "mid": Preset(
        layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1792, max_positions=9216, rope_theta=1e6,
        pad_bpe_to=151643, codebook=32768, base_channels=64, channel_multiplier=(1, 1, 2, 2),
        min_pixels=64 * 64, max_pixels=256 * 256, image_area=128 * 128,
    ),
}

WORDS = (
    "a red cat sits on the mat the dog runs under rain portrait of young girl masterpiece film grained best "
    "quality what do you see in this image please describe picture sky blue green tree house car bird flying "
    "over mountain river city at night sunset beach ocean wave flower garden robot painting photo of small big "
    "old new happy sad lowres bad anatomy hands text error missing fingers extra digit fewer digits cropped worst "
    "low normal jpeg artifacts signature watermark username blurry hello world yes no one two three"
).split()


def special_tokens(codebook: int) -> list[str]:
    """Emu3's special strings in id order (first id = pad)."""
    extras = ["<image>" if n == 0 else f"<|extra_{n}|>" for n in range(NUM_EXTRAS)]
    visual = [f"<|visual token {k:06d}|>" for k in range(codebook)]
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extras,
            "<|image token|>", "<|image start|>", "<|image end|>", *visual]


def build_tokenizer(bpe_vocab: int, codebook: int, seed: int, pad_bpe_to: int | None = None):
    """A byte-level BPE (GPT-2 pre-tokenizer, as the -hf converter writes) with Emu3's specials appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!,")
              for _ in range(2000)]
    corpus += [f"{h}*{w}" for h in range(1, 200) for w in (h, h + 1)]  # size headers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if pad_bpe_to:
        tok = _grow_bpe(tok, pad_bpe_to)
    tok.add_special_tokens(special_tokens(codebook))
    return tok


def _grow_bpe(tok, size: int):
    """Append merges (a, b) -> a+b of existing tokens until the BPE has `size` ids; still a valid BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    state = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    base = sorted(vocab, key=vocab.get)
    for a in base:
        for b in base:
            if len(vocab) >= size:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    grown = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    grown.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    grown.decoder = decoders.ByteLevel()
    return grown


def build_checkpoint(out_dir: str | Path, preset: str | Preset = "tiny", seed: int = 0) -> Path:
    """Write a seeded random Emu3 `-hf` checkpoint (model + processor) to out_dir and return it."""
    import torch
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3ImageProcessor,
        Emu3Processor,
        GenerationConfig,
        GPT2TokenizerFast,
    )

    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw = build_tokenizer(p.bpe_vocab, p.codebook, seed, p.pad_bpe_to)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=raw,
        bos_token="<|extra_203|>", eos_token="<|extra_204|>", pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>",
        },
    )
    vocab = tokenizer.get_vocab()
    ids = {name: vocab[name] for name in ("<|endoftext|>", "<|extra_203|>", "<|extra_204|>")}
    image_processor = Emu3ImageProcessor(
        min_pixels=p.min_pixels, max_pixels=p.max_pixels, spatial_factor=8,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Emu3Processor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)

    vq_hidden = p.base_channels * p.channel_multiplier[-1]
    config = Emu3Config(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=p.hidden, intermediate_size=p.intermediate,
            num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
            max_position_embeddings=p.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
            pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|extra_203|>"], eos_token_id=ids["<|extra_204|>"],
        ),
        vq_config=dict(
            codebook_size=p.codebook, base_channels=p.base_channels, channel_multiplier=list(p.channel_multiplier),
            num_res_blocks=p.num_res_blocks, attn_resolutions=list(p.attn_resolutions), hidden_size=vq_hidden,
            num_attention_heads=1, temporal_downsample_factor=p.temporal_factor,
        ),
        vocabulary_map=vocab,
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    _randomize_batchnorm(model, seed)
    model.generation_config = GenerationConfig(
        do_sample=True, top_k=2048, max_new_tokens=p.max_positions,
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|extra_203|>"], eos_token_id=ids["<|extra_204|>"],
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _randomize_batchnorm(model, seed: int) -> None:
    """Give the VQ's BatchNorm3d layers non-trivial running stats, so that folding them is actually tested."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def main(argv: list[str] | None = None) -> int:
    from emu3_rt.cli import SEED_MAX, int_in, tool_parser

    from .build import quiet_third_party

    ap = tool_parser("python -m export.tiny", __doc__.split("\n\n")[0] + " Its weights are random: "
                     "bundles exported from it produce noise, by design.")
    ap.add_argument("out", type=Path, help="checkpoint directory to write (created; files in it are replaced)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="network and vocabulary sizes: tiny (the checked-in bundle's), tiny-mha, tiny-realvocab "
                         "(the real 184,622-id layout), mid (benchmarks)")
    ap.add_argument("--seed", type=int_in(0, SEED_MAX), default=0,
                    help="seeds the tokenizer corpus and the weights (default: 0)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and transformers' progress bars")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"argument out: {args.out} exists and is not a directory")
    try:
        with contextlib.nullcontext() if args.verbose else quiet_third_party():
            build_checkpoint(args.out, args.preset, args.seed)
    except KeyboardInterrupt:
        print(f"{ap.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line and exit 2, as every tool of the project
        if args.verbose:
            raise
        print(f"{ap.prog}: error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
