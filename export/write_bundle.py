"""bundle.json: the manifest a numpy runtime needs to drive the graphs, shaped like onnxruntime-genai's
genai_config.json (`model.decoder` + sibling `vq_encoder`/`vq_decoder` blocks, a `search` block) plus an `emu3`
block for the special ids and the visual-token mapping, file hashes and export provenance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from emu3_rt.bundle import sha256_file

from .export_onnx import GraphSpec
from .sampler_graph import OPSET as SAMPLER_OPSET
from .sampler_graph import column_kinds, sampler_io, write_sampler_graph

SCHEMA_VERSION = 2  # emu3_rt.bundle.SCHEMA_VERSIONS says what changed
BUNDLE_FORMAT = "emu3-bundle"

# BAAI's image_generation.py default negative prompt.
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
VISUAL_TOKEN = re.compile(r"^<\|visual token (\d{6})\|>$")


def visual_token_runs(vocab: dict[str, int], codebook_size: int) -> list[list[int]]:
    """code -> token id as runs [first_code, first_id, count]; one run for every real checkpoint.

    Parsed like Transformers' Emu3ImageVocabularyMapping: the 6 digits of `<|visual token NNNNNN|>`.
    """
    code_to_id = {}
    for name, tid in vocab.items():
        m = VISUAL_TOKEN.match(name)
        if m:
            code_to_id[int(m.group(1))] = tid
    missing = [c for c in range(codebook_size) if c not in code_to_id]
    if missing:
        raise ValueError(f"vocabulary has no visual token for codes {missing[:5]}... "
                         f"({len(missing)} of {codebook_size} missing)")
    runs: list[list[int]] = []
    for code in range(codebook_size):
        tid = code_to_id[code]
        if runs and runs[-1][0] + runs[-1][2] == code and runs[-1][1] + runs[-1][2] == tid:
            runs[-1][2] += 1
        else:
            runs.append([code, tid, 1])
    return runs


def id_runs(ids: list[int]) -> list[list[int]]:
    """Sorted ids -> runs [first_column, first_id, count] of consecutive ids."""
    runs: list[list[int]] = []
    for col, tid in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == tid:
            runs[-1][2] += 1
        else:
            runs.append([col, tid, 1])
    return runs


def _io(spec: GraphSpec) -> dict:
    return {"inputs": [t.to_json() for t in spec.inputs], "outputs": [t.to_json() for t in spec.outputs]}


def build_manifest(*, model, processor, checkpoint: Path, out_dir: Path, specs: dict[str, GraphSpec],
                   variant: str, opset: int, dtype: str, image_area: int, versions: dict,
                   head_ids: list[int] | None = None, quantization: dict | None = None,
                   kv_cache: str = "buffer", head: str | None = None, image_quantization: dict | None = None) -> dict:
    """head: "full", "visual" (head_ids scored by the one step graph) or "both" (specs["decoder_step_visual"]
    scores head_ids, listed as model.image_decoder with its own sampler); None: "full" or "visual" by head_ids."""
    head = head or ("full" if head_ids is None else "visual")
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vq_config
    tok = processor.tokenizer
    vocab = tok.get_vocab()

    def token(name: str) -> dict:
        if name not in vocab:
            raise ValueError(f"tokenizer has no {name!r} token")
        return {"text": name, "id": vocab[name]}

    ip = processor.image_processor
    gen = model.generation_config
    context = int(tc.max_position_embeddings)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    step = specs["decoder_step"]
    manifest = {
        "format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": {
            "type": "emu3",
            "bos_token_id": vocab[tok.bos_token],
            "eos_token_id": vocab[tok.eos_token],
            "pad_token_id": vocab[tok.pad_token],
            "vocab_size": int(tc.vocab_size),
            "context_length": context,
            "decoder": {
                "filename": step.file,
                "variant": variant,
                "opset": opset,
                "dtype": dtype,
                "num_hidden_layers": int(tc.num_hidden_layers),
                "num_attention_heads": int(tc.num_attention_heads),
                "num_key_value_heads": int(tc.num_key_value_heads),
                "head_size": int(head_dim),
                "hidden_size": int(tc.hidden_size),
                "intermediate_size": int(tc.intermediate_size),
                "rms_norm_eps": float(tc.rms_norm_eps),
                "rope": {"type": rope.get("rope_type", "default"), "theta": float(rope.get("rope_theta", 1e4))},
                "logits": "last_position",
                "quantization": quantization,
                # "full": logits over the whole vocabulary; "visual": column j scores the id from logit_id_runs
                "head": "visual" if head == "visual" else "full",
                **({"logit_id_runs": id_runs(head_ids)} if head == "visual" else {}),
                # "buffer": past = the runtime's preallocated KV buffer (mask 0 on empty slots), present = the new
                # rows only; "concat": past = the filled cache, present = past + new
                "kv_cache": kv_cache,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "io": _io(step),
            },
            "vq_encoder": {"filename": specs["vq_encoder"].file, "dtype": "float32", "io": _io(specs["vq_encoder"])},
            "vq_decoder": {"filename": specs["vq_decoder"].file, "dtype": "float32", "io": _io(specs["vq_decoder"])},
        },
        "emu3": {
            "tokens": {
                "bos": token(tok.bos_token), "eos": token(tok.eos_token), "pad": token(tok.pad_token),
                "image": token(tok.image_token), "boi": token(tok.boi_token), "eoi": token(tok.eoi_token),
                "image_wrapper": token(tok.image_wrapper_token), "eol": token("<|extra_200|>"),
                "eof": token(tok.eof_token),
            },
            "codebook_size": int(vc.codebook_size),
            # code -> token id: id = first_id + (code - first_code) within each run
            "visual_token_runs": visual_token_runs(vocab, int(vc.codebook_size)),
            "spatial_factor": 2 ** (len(vc.channel_multiplier) - 1),
            "temporal_factor": int(vc.temporal_downsample_factor),
        },
        "image_processor": {
            "image_mean": [float(x) for x in ip.image_mean],
            "image_std": [float(x) for x in ip.image_std],
            "rescale_factor": float(ip.rescale_factor),
            "min_pixels": int(ip.min_pixels),
            "max_pixels": int(ip.max_pixels),
            "spatial_factor": int(ip.spatial_factor),
            "resample": "bicubic" if int(ip.resample) == 3 else int(ip.resample),
        },
        "tokenizer": {"filename": "tokenizer.json", "chat_template": "chat_template.jinja"},
        "search": {
            "do_sample": True,
            "top_k": 2048,
            "top_p": 1.0,
            "temperature": 1.0,
            "cfg_scale": 3.0,
            "negative_prompt": NEGATIVE_PROMPT,
            "ratio": "1:1",
            "image_area": int(image_area),
            "max_new_tokens": int(min(gen.max_new_tokens or context, context)),
            "prefill_chunk": 512,
        },
        "export": {
            **versions,
            "exporter": "torch.onnx.export(dynamo=True)",
            "checkpoint": checkpoint.name,
            "source_config_sha256": sha256_file(checkpoint / "config.json"),
        },
    }
    if head == "both":
        # images: the same step over the same weights file, scoring only the visual + control ids; every field
        # but the file, head, logits width and quantization report equals the decoder's (emu3_rt/bundle.py checks)
        visual = specs["decoder_step_visual"]
        manifest["model"]["image_decoder"] = {
            **manifest["model"]["decoder"], "filename": visual.file, "quantization": image_quantization,
            "head": "visual", "logit_id_runs": id_runs(head_ids), "io": _io(visual)}
    manifest["model"]["sampler"] = write_sampler(out_dir, manifest, head_ids if head == "visual" else None)
    if head == "both":
        manifest["model"]["image_sampler"] = write_sampler(out_dir, manifest, head_ids, "sampler_visual.onnx")
    manifest["files"] = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != "bundle.json"
    }
    return manifest


def write_sampler(out_dir: Path, manifest: dict, head_ids: list[int] | None, file: str = "sampler.onnx") -> dict:
    """sampler.onnx: the decode step's sampling chain as a graph over the step graph's logits columns (the whole
    vocabulary, or the visual head's columns), with the grid kinds of Emu3's ids baked in; its manifest block."""
    tokens = {role: entry["id"] for role, entry in manifest["emu3"]["tokens"].items()}
    visual = [i for first, tid, n in manifest["emu3"]["visual_token_runs"] for i in range(tid, tid + n)]
    ids = list(range(manifest["model"]["vocab_size"])) if head_ids is None else list(head_ids)
    column = {tid: col for col, tid in enumerate(ids)}                 # token id -> logits column
    kinds = column_kinds(len(ids), visual_ids=[column[i] for i in visual],
                         **{role: column[tokens[role]] for role in ("eol", "eof", "eoi", "eos", "pad")})
    path = write_sampler_graph(out_dir / file, kinds)
    io = sampler_io()
    for t in io["inputs"]:   # the width is fixed by the table baked into the graph
        t["dims"] = [len(ids) if d == "vocab" else d for d in t["dims"]]
    return {"filename": path.name, "opset": SAMPLER_OPSET, "io": io}


def write_manifest(manifest: dict, out_dir: Path) -> Path:
    path = out_dir / "bundle.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
