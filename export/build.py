"""`python -m export`: a Transformers Emu3 `-hf` checkpoint -> a verified bundle in models/<name>/.

Stages: load (transformers) -> export the graphs (export_onnx: VQ encoder and decoder, the full step graph and,
with the default --head both, the visual-head step graph over one shared weights file: shared_weights) -> verify
against the checkpoint (verify) -> copy tokenizer + chat template -> bundle.json with hashes (write_bundle).
Everything is written to a temporary sibling directory and renamed into place only when verification passed, so
a failed export never leaves a bundle that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
VARIANTS = {18: "opset18", 23: "opset23-fused"}  # 23: ONNX Attention / RMSNormalization / RotaryEmbedding
HEADS = ("both", "full", "visual")
# --head both: the visual step graph, its sampler and the one weights file both step graphs read
VISUAL_STEP, VISUAL_SAMPLER, SHARED_WEIGHTS = "decoder_step_visual.onnx", "sampler_visual.onnx", "decoder_step.data"
EXPORT_EXTRA = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")  # what `.[export]` installs


class ExportError(RuntimeError):
    """The export ran but its result is not acceptable (frozen dims, parity failure, bad checkpoint)."""


@dataclass(frozen=True)
class ExportOptions:
    # ONNX opset of the decoder step: 18 is portable (TensorRT >= 10), 23 fuses attention for ORT CPU.
    opset: int = 18
    # dtype of the decoder step's weights and KV cache; the VQ graphs and logits stay float32.
    dtype: str = "fp32"
    # default image area (pixels) for text-to-image; None: min(720*720, the processor's max_pixels)
    image_area: int | None = None
    # replace an existing bundle directory
    overwrite: bool = False
    # "visual": the step graph scores only the visual ids + EOL/EOF/EOI/EOS/PAD (image generation only; CFG and the
    # grid constraint give the same tokens on that sub-vocabulary, with a much smaller lm_head per step);
    # "full": the whole vocabulary (chat and images); "both": the full graph for chat and the visual one for
    # images, over one shared weights file (the bundle grows by the visual lm_head rows only)
    head: str = "both"
    # weight-only quantization of the decoder step: None, "int8" or "int4" (MatMulNBits; lm_head int8)
    quantize: str | None = None
    # weights per quantization block
    block_size: int = 32
    # with --quantize: also store the token embeddings as int4 blocks (the largest tensor left in fp32)
    quantize_embeddings: bool = False
    # onnxruntime device for the parity checks: "cpu" or "cuda" (bf16 graphs have no CPU kernels)
    verify_device: str = "cpu"
    # KV cache of the step graph: "buffer" (reads the runtime's preallocated buffer, returns the new rows only)
    # or "concat" (returns past + new: copies the whole cache every step; ~3x slower per CFG step at 8k context)
    kv_cache: str = "buffer"


def _versions() -> dict:
    import onnx
    import onnxscript
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__}


def check_checkpoint(checkpoint: Path) -> None:
    """Fail in one line, before torch loads, when `checkpoint` is not a Transformers Emu3 -hf directory."""
    if not checkpoint.exists():
        raise ExportError(f"{checkpoint}: checkpoint directory does not exist")
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: not a directory; expected a Transformers Emu3 -hf checkpoint directory")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint}: no config.json; expected a Transformers Emu3 -hf checkpoint directory")
    try:
        model_type = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ExportError(f"{checkpoint}/config.json: not a JSON object ({e})") from None
    if model_type != "emu3":
        # the original BAAI/Emu3-* releases say "Emu3" and need trust_remote_code
        hint = " (an original remote-code release: use its -hf conversion)" if model_type == "Emu3" else ""
        raise ExportError(f"{checkpoint}: config.json has model_type {model_type!r}, not 'emu3'{hint}; expected a "
                          "Transformers Emu3 -hf checkpoint such as BAAI/Emu3-Gen-hf or BAAI/Emu3-Chat-hf")


def load_checkpoint(checkpoint: Path, dtype: str):
    import torch
    from transformers import AutoProcessor, Emu3ForConditionalGeneration

    torch_dtype = getattr(torch, DTYPES[dtype])
    model = Emu3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    # The VQ stays float32: it is small next to the text model, and its argmin codes are precision-sensitive.
    model.model.vqmodel.float()
    processor = AutoProcessor.from_pretrained(checkpoint)
    if model.config.model_type != "emu3":
        raise ExportError(f"{checkpoint}: model_type {model.config.model_type!r} is not 'emu3'")
    return model, processor


def _quantize(work: Path, spec, options: ExportOptions, log) -> dict:
    """Quantize the verified fp32 step graph in place; report its logits drift against fp32 (not a gate)."""
    from . import export_onnx, verify
    from .quantize import QuantOptions, quantize_step

    if options.quantize not in ("int8", "int4"):
        raise ExportError(f"--quantize must be int8 or int4, got {options.quantize!r}")
    if options.dtype != "fp32":
        raise ExportError("--quantize starts from fp32 weights; use it with --dtype fp32")

    q = QuantOptions(bits=int(options.quantize[3:]), block_size=options.block_size,
                     embeddings=options.quantize_embeddings)
    path = work / spec.file
    fp32 = work / ("fp32-" + spec.file)
    path.rename(fp32)
    quantize_step(fp32, path, q)
    export_onnx._rename_and_check_dims(path, spec)
    drift = verify.compare_graphs(fp32, path)
    fp32.unlink()
    log(f"quantized {spec.file} to {q.to_json()['weights']} (lm_head int8): mean |d logit| "
        f"{drift['mean_abs_logit_diff']:.3g}, top-1 agreement {100 * drift['top1_agreement']:.1f}% on random prompts")
    return {**q.to_json(), **drift}


def _share(work: Path, specs: dict, log):
    """Both step graphs over one weights file (export/shared_weights.py)."""
    from .shared_weights import share_weights

    shared = share_weights([work / specs["decoder_step"].file, work / specs["decoder_step_visual"].file],
                           SHARED_WEIGHTS)
    log(f"{shared.file}: {shared.size / 1e6:.1f} MB; {specs['decoder_step_visual'].file} reuses "
        f"{shared.reused[specs['decoder_step_visual'].file]} tensors and adds "
        f"{shared.stored[specs['decoder_step_visual'].file]} (its lm_head rows)")
    return shared


def visual_head_ids(model, processor) -> list[int]:
    """The ids image generation can ever produce: the visual tokens and EOL, EOF, EOI, EOS, PAD (sorted)."""
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    control = [vocab["<|extra_200|>"], vocab[tok.eof_token], vocab[tok.eoi_token], vocab[tok.eos_token],
               vocab[tok.pad_token]]
    return sorted(set(model.vocabulary_mapping.image_tokens) | set(control))


def build_bundle(checkpoint: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 log=lambda msg: None):
    """Export, verify and write a bundle; returns (manifest, checks). Raises ExportError on any failure."""
    from . import export_onnx, verify, write_bundle

    if options.opset not in VARIANTS:
        raise ExportError(f"--opset must be one of {sorted(VARIANTS)}, got {options.opset}")
    if options.head not in HEADS:
        raise ExportError(f"--head must be one of {HEADS}, got {options.head!r}")
    if options.dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {options.dtype!r}")
    if options.kv_cache not in export_onnx.KV_CACHES:
        raise ExportError(f"--kv-cache must be one of {export_onnx.KV_CACHES}, got {options.kv_cache!r}")
    if options.quantize_embeddings and not options.quantize:
        raise ExportError("--quantize-embeddings needs --quantize")
    if options.dtype == "bf16" and options.verify_device == "cpu":
        raise ExportError("bf16 graphs cannot run on onnxruntime's CPU, so they cannot be verified here: "
                          "use --verify-device cuda on a GPU machine, or --dtype fp16")
    verify.set_device(options.verify_device)
    checkpoint, out = Path(checkpoint), Path(out)
    check_checkpoint(checkpoint)
    if out.exists() and not options.overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")

    t0 = time.perf_counter()
    log(f"loading {checkpoint} ...")
    model, processor = load_checkpoint(checkpoint, options.dtype)
    log(f"loading {checkpoint} ... {time.perf_counter() - t0:.1f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work.chmod(0o755)  # mkdtemp makes it 0700
    try:
        vq = model.model.vqmodel
        head_ids = visual_head_ids(model, processor) if options.head in ("visual", "both") else None
        # (graph, its head ids): the step graph(s) to export and verify
        steps = {"full": [("decoder_step", None)], "visual": [("decoder_step", head_ids)],
                 "both": [("decoder_step", None), ("decoder_step_visual", head_ids)]}[options.head]
        specs = {}
        graphs = (("vq_encoder", lambda: export_onnx.export_vq_encoder(vq, work, 18)),
                  ("vq_decoder", lambda: export_onnx.export_vq_decoder(vq, work, 18)),
                  *((name, lambda name=name, ids=ids: export_onnx.export_decoder_step(
                      model, work, options.opset, ids, options.kv_cache, f"{name}.onnx")) for name, ids in steps))
        # each graph takes seconds to a minute on a tiny checkpoint and minutes on a real one: a line before and after
        for i, (name, fn) in enumerate(graphs, 1):
            t = time.perf_counter()
            log(f"{name} ({i}/{len(graphs)}) ...")
            specs[name] = fn()
            log(f"{name} ({i}/{len(graphs)}) ... {time.perf_counter() - t:.1f} s")
        shared = _share(work, specs, log) if options.head == "both" else None  # verified below as written
        t = time.perf_counter()
        log("parity checks against the checkpoint ...")
        checks = verify.verify_vq(vq, work)
        for name, ids in steps:
            checks += verify.verify_decoder_step(model, work, head_ids=ids, kv_cache=options.kv_cache,
                                                 file=specs[name].file)
        log(f"parity checks against the checkpoint ... {time.perf_counter() - t:.1f} s")
        log(verify.format_table(checks))
        failed = [c for c in checks if not c.ok]
        if failed:
            raise ExportError(f"parity failed in {len(failed)} check(s), first: {failed[0].graph} {failed[0].case} "
                              f"{failed[0].metric} = {failed[0].value:.3g} > {failed[0].limit:g}")
        quant = {}
        if options.quantize:
            for name, _ in steps:   # the same options give the same body weights in both graphs
                quant[name] = _quantize(work, specs[name], options, log)
            if shared:
                shared = _share(work, specs, log)
        if (checkpoint / "tokenizer.json").is_file():  # byte-identical to the checkpoint's
            shutil.copyfile(checkpoint / "tokenizer.json", work / "tokenizer.json")
        else:
            processor.tokenizer.backend_tokenizer.save(str(work / "tokenizer.json"))
        template = processor.chat_template or ""
        (work / "chat_template.jinja").write_text(template, encoding="utf-8")
        image_area = options.image_area or min(720 * 720, int(processor.image_processor.max_pixels))
        manifest = write_bundle.build_manifest(
            model=model, processor=processor, checkpoint=checkpoint, out_dir=work, specs=specs,
            variant=VARIANTS[options.opset], opset=options.opset, dtype=DTYPES[options.dtype],
            image_area=image_area, versions=_versions(), head_ids=head_ids, quantization=quant.get("decoder_step"),
            kv_cache=options.kv_cache, head=options.head, image_quantization=quant.get("decoder_step_visual"))
        write_bundle.write_manifest(manifest, work)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return manifest, checks


def quiet_third_party():
    """Silence, for the CLI's run only, what torch.onnx and transformers print that a user cannot act on: the
    torch.onnx registry's "torchvision is not installed" lines and transformers' load/save progress bars."""
    import logging

    import torch  # noqa: F401 - importing torch resets its loggers' levels, so it must come first
    from transformers.utils import logging as hf_logging

    stack = contextlib.ExitStack()
    onnx_log = logging.getLogger("torch.onnx")
    level, bars = onnx_log.level, hf_logging.is_progress_bar_enabled()
    onnx_log.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    stack.callback(onnx_log.setLevel, level)
    stack.callback(hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)
    return stack


class StageLog:
    """Prints a tool's progress lines on stderr. On a terminal the "name ... 12.3 s" line that ends a stage
    completes its "name ..." line instead of adding one; in a log file both lines stay."""

    def __init__(self, prog: str, quiet: bool = False):
        self.prog, self.quiet, self.tty, self.open = prog, quiet, sys.stderr.isatty(), None

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if self.open is not None and self.tty and msg.startswith(self.open):
            sys.stderr.write(msg[len(self.open):] + "\n")
        else:
            if self.open is not None and self.tty:
                sys.stderr.write("\n")
            starts = msg.endswith(" ...") and self.tty
            text = msg if "\n" in msg else f"{self.prog}: {msg}"  # tables (the parity checks) stay aligned
            sys.stderr.write(text + ("" if starts else "\n"))
        self.open = msg if msg.endswith(" ...") else None
        sys.stderr.flush()

    def close(self) -> None:
        """End an open "name ..." line (before an error message)."""
        if self.open is not None and self.tty and not self.quiet:
            sys.stderr.write("\n")
        self.open = None


def main(argv: list[str] | None = None) -> int:
    from emu3_rt.cli import int_in, tool_parser

    ap = tool_parser("python -m export", __doc__)
    ap.add_argument("--checkpoint", required=True, type=Path,
                    help="Transformers Emu3 -hf checkpoint directory (e.g. a download of BAAI/Emu3-Gen-hf)")
    ap.add_argument("--out", required=True, type=Path, help="bundle directory to write, e.g. models/emu3-gen")
    ap.add_argument("--opset", type=int_in(0), choices=sorted(VARIANTS), default=18,
                    help="ONNX opset of the decoder step: 18 is portable (TensorRT), 23 fuses attention for ORT CPU")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="decoder-step weights and KV cache (the VQ graphs and logits stay fp32)")
    ap.add_argument("--image-area", type=int_in(64), default=None,
                    help="text-to-image area in pixels when a request names none "
                         "(default: min(720*720, the processor's max_pixels))")
    ap.add_argument("--head", choices=HEADS, default="both",
                    help="both: a full-vocabulary step graph for chat and a visual-head one for images (scores only "
                         "visual + control ids), sharing one weights file; full: one graph for both; visual: an "
                         "image-generation-only bundle")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="weight-only MatMulNBits quantization of the decoder step (lm_head int8; default: none)")
    ap.add_argument("--block-size", type=int_in(16, 4096), default=32,
                    help="weights per quantization block, a power of two (with --quantize)")
    ap.add_argument("--quantize-embeddings", action="store_true",
                    help="with --quantize: also the token embeddings, as int4 blocks")
    ap.add_argument("--kv-cache", choices=["buffer", "concat"], default="buffer",
                    help="buffer: the step graph reads a preallocated KV buffer and returns only the new rows; "
                         "concat: it returns past + new (the layout of Transformers/Optimum exports)")
    ap.add_argument("--verify-device", choices=["cpu", "cuda"], default="cpu",
                    help="where the parity checks run (bf16 needs cuda)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines or parity table, only errors")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="show tracebacks, and the third-party progress bars and log lines export hides")
    args = ap.parse_args(argv)
    if args.block_size & (args.block_size - 1):
        ap.error(f"argument --block-size: must be a power of two, got {args.block_size}")
    options = ExportOptions(opset=args.opset, dtype=args.dtype, image_area=args.image_area, overwrite=args.overwrite,
                            head=args.head, quantize=args.quantize, block_size=args.block_size,
                            verify_device=args.verify_device, quantize_embeddings=args.quantize_embeddings,
                            kv_cache=args.kv_cache)
    log = StageLog("export", args.quiet)
    try:
        check_checkpoint(args.checkpoint)  # before torch loads: a wrong path fails in a blink
        with contextlib.nullcontext() if args.verbose else quiet_third_party():
            build_bundle(args.checkpoint, args.out, options, log=log)
    except KeyboardInterrupt:
        log.close()
        print(f"{ap.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line and exit 2
        if args.verbose:
            raise
        log.close()
        if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in EXPORT_EXTRA:
            message = f"needs the export extra (pip install -e '.[export]'): no module named {e.name!r}"
        else:
            message = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {e}"
        print(f"{ap.prog}: error: {message}".splitlines()[0], file=sys.stderr)
        return 2
    return 0
