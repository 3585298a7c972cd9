"""torch.onnx.export (dynamo) of the three wrappers, with named dynamic dims, checked after export.

Each graph's dims are renamed to the names the manifest uses (Optimum's for the decoder step), and every dim
meant to be dynamic is asserted symbolic: the dynamo exporter can freeze one silently (export-notes 4a).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from .wrappers import DecoderStep, DecoderStepBuffered, VQDecoder, VQEncoder

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which the graph keeps them in a side file

# Symbolic dim names, as written into the graphs and bundle.json.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
HEIGHT, WIDTH, GRID_H, GRID_W = "height", "width", "grid_height", "grid_width"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name
    dims: tuple[int | str, ...]     # ints are static, strings symbolic

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


KV_CACHES = ("buffer", "concat")


def step_specs(num_layers: int, kv_heads: int, head_dim: int, vocab: int, kv_dtype: str,
               kv_cache: str = "buffer", file: str = "decoder_step.onnx") -> GraphSpec:
    """buffer: past = the runtime's KV buffer (PAST = its capacity), present = the S new rows.
    concat: past = the filled cache, present = past + new (TOTAL rows)."""
    new_rows = SEQ if kv_cache == "buffer" else TOTAL
    past = [TensorSpec(f"past_key_values.{i}.{kind}", kv_dtype, (BATCH, kv_heads, PAST, head_dim))
            for i in range(num_layers) for kind in ("key", "value")]
    present = [TensorSpec(f"present.{i}.{kind}", kv_dtype, (BATCH, kv_heads, new_rows, head_dim))
               for i in range(num_layers) for kind in ("key", "value")]
    inputs = (TensorSpec("input_ids", "int64", (BATCH, SEQ)),
              TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
              TensorSpec("position_ids", "int64", (BATCH, SEQ)), *past)
    return GraphSpec(file, inputs, (TensorSpec("logits", "float32", (BATCH, vocab)), *present))


def vq_encoder_specs() -> GraphSpec:
    return GraphSpec("vq_encoder.onnx", (TensorSpec("pixel_values", "float32", (BATCH, 3, HEIGHT, WIDTH)),),
                     (TensorSpec("codes", "int64", (BATCH, GRID_H, GRID_W)),))


def vq_decoder_specs() -> GraphSpec:
    return GraphSpec("vq_decoder.onnx", (TensorSpec("codes", "int64", (BATCH, GRID_H, GRID_W)),),
                     (TensorSpec("pixel_values", "float32", (BATCH, 3, HEIGHT, WIDTH)),))


# ---- patches for export ----

@contextlib.contextmanager
def _quiet():
    """Hide, during one export only, the warnings the exporter raises that we cannot act on: deprecations inside
    torch's pytree and tracer, and torch.onnx's notes that several inputs share a Dim (intended here). Warnings
    raised from export/ itself still show."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|onnxscript|onnx|transformers)(\.|$)")
        yield


def _export(module, args, spec: GraphSpec, out_dir: Path, dynamic_shapes, opset: int, weight_bytes: int) -> Path:
    path = out_dir / spec.file
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            module, args, input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, optimize=True, verbose=False,
            external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD,
        )
        prog.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
    _rename_and_check_dims(path, spec)
    return path


def _rename_and_check_dims(path: Path, spec: GraphSpec) -> None:
    """Rewrite the graph's I/O dims to the spec's names; raise if any dim is not what the spec says.

    The exporter names dims after the torch Dims ("batch", "s0 + s1", ...); we map each exported symbol to the
    spec's symbol by position, and fail loudly if a dim meant to be symbolic came out as a number.
    """
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    renames: dict[str, str] = {}
    problems = []
    for values, specs in ((g.input, spec.inputs), (g.output, spec.outputs)):
        by_name = {v.name: v for v in values}
        if set(by_name) != {t.name for t in specs}:
            raise RuntimeError(f"{spec.file}: graph I/O {sorted(by_name)} != expected {[t.name for t in specs]}")
        for t in specs:
            dims = by_name[t.name].type.tensor_type.shape.dim
            if len(dims) != len(t.dims):
                problems.append(f"{t.name}: rank {len(dims)} != {len(t.dims)}")
                continue
            for axis, (d, want) in enumerate(zip(dims, t.dims)):
                if isinstance(want, int):
                    if d.HasField("dim_param") or d.dim_value != want:
                        problems.append(f"{t.name}[{axis}] = {d.dim_param or d.dim_value}, expected {want}")
                elif not d.HasField("dim_param"):
                    problems.append(f"{t.name}[{axis}] was frozen to {d.dim_value}, expected symbolic {want!r}")
                else:
                    prev = renames.setdefault(d.dim_param, want)
                    if prev != want:
                        problems.append(f"{t.name}[{axis}]: symbol {d.dim_param!r} maps to {prev!r} and {want!r}")
    if problems:
        raise RuntimeError(f"{spec.file}: exported dims do not match the spec: " + "; ".join(problems))
    for vi in [*g.input, *g.output, *g.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in renames:
                d.dim_param = renames[d.dim_param]
    _drop_stack_traces(g)
    # torch prints the exported program's range constraints in set order, which follows PYTHONHASHSEED: dropped
    # (debug text only), so that the same checkpoint always gives the same bytes
    kept = [p for p in g.metadata_props if p.key != "pkg.torch.export.ExportedProgram.range_constraints"]
    del g.metadata_props[:]
    g.metadata_props.extend(kept)
    onnx.save(model, str(path), save_as_external_data=False) if not _has_external(model) else \
        onnx.save(model, str(path))


def _drop_stack_traces(graph) -> None:
    """Remove the exporter's per-node Python stack traces: they hold the exporting machine's file paths (and
    make the file's hash depend on where the export ran). Module scopes and names stay for profiling."""
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                _drop_stack_traces(sub)


def _has_external(model) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---- the three graphs ----

def export_vq_encoder(vqmodel, out_dir: Path, opset: int) -> GraphSpec:
    spec = vq_encoder_specs()
    sample = torch.rand(2, 3, 48, 72) * 2 - 1
    hh, ww = Dim("grid_h", min=1, max=1024), Dim("grid_w", min=1, max=1024)
    dyn = {"pixel_values": {0: Dim("batch", min=1, max=1024), 2: 8 * hh, 3: 8 * ww}}
    _export(VQEncoder(vqmodel).eval(), (sample,), spec, out_dir, dyn, opset, _weight_bytes(vqmodel))
    return spec


def export_vq_decoder(vqmodel, out_dir: Path, opset: int) -> GraphSpec:
    spec = vq_decoder_specs()
    sample = torch.randint(0, vqmodel.config.codebook_size, (2, 5, 7))
    dyn = {"codes": {0: Dim("batch", min=1, max=1024), 1: Dim("grid_h", min=1, max=1024),
                     2: Dim("grid_w", min=1, max=1024)}}
    _export(VQDecoder(vqmodel).eval(), (sample,), spec, out_dir, dyn, opset, _weight_bytes(vqmodel))
    return spec


def export_decoder_step(model, out_dir: Path, opset: int, head_ids: list[int] | None = None,
                        kv_cache: str = "buffer", file: str = "decoder_step.onnx") -> GraphSpec:
    """The step graph as `file`: logits over the whole vocabulary, or over `head_ids` only (a visual head)."""
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    dtype = next(model.parameters()).dtype
    spec = step_specs(tc.num_hidden_layers, tc.num_key_value_heads, head_dim,
                      tc.vocab_size if head_ids is None else len(head_ids), str(dtype).removeprefix("torch."),
                      kv_cache, file)
    # B=2, S=3, P=5 so that no dim is 0 or 1 at trace time
    b, s, p = 2, 3, 5
    ids = torch.randint(0, tc.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).repeat(b, 1)
    past = [torch.randn(b, tc.num_key_value_heads, p, head_dim, dtype=dtype) for _ in range(2 * tc.num_hidden_layers)]
    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=1 << 20)
    past_len, total = Dim("past", min=0, max=1 << 20), Dim("total", min=1, max=1 << 21)
    # forward(*past) is a varargs parameter: its dims go in as one tuple
    dyn = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
    wrapper = {"buffer": DecoderStepBuffered, "concat": DecoderStep}[kv_cache]
    path = _export(wrapper(model, head_ids).eval(), (ids, mask, pos, *past), spec, out_dir, dyn, opset,
                   _weight_bytes(model) - _weight_bytes(model.model.vqmodel))
    _rms_norm_as_div(path)
    return spec


def _rms_norm_as_div(path: Path) -> int:
    """Rewrite `x * Reciprocal(Sqrt(v))` (how torch.rsqrt in Emu3's RMSNorm exports) as `Div(x, Sqrt(v))`.

    onnxruntime fuses Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul into one SimplifiedLayerNormalization, but
    not the Reciprocal form: on the mid step graph 571 -> 469 nodes after optimization, logits within 1e-6, the
    step 2 % faster. Plain opset-18 ops either way (TensorRT reads both). Returns the number rewritten."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    made_by = {out: n for n in nodes for out in n.output}
    users: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            users.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    rewritten, drop, replace = 0, set(), {}
    for n in nodes:
        sqrt = made_by.get(n.input[0]) if n.op_type == "Reciprocal" else None
        readers = users.get(n.output[0], []) if sqrt is not None else []
        if sqrt is None or sqrt.op_type != "Sqrt" or len(readers) != 1 or n.output[0] in graph_outputs:
            continue
        mul = readers[0]
        if mul.op_type != "Mul" or list(mul.input).count(n.output[0]) != 1:
            continue
        x = next(i for i in mul.input if i != n.output[0])
        replace[id(mul)] = onnx.helper.make_node("Div", [x, sqrt.output[0]], list(mul.output), name=f"{mul.name}_div")
        drop.add(id(n))
        rewritten += 1
    if rewritten:
        kept = [replace.get(id(n), n) for n in nodes if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        onnx.save(model, str(path))
    return rewritten
