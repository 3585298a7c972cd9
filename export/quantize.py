"""Weight-only quantization of the decoder step with onnxruntime's MatMulNBits quantizer.

Every weight MatMul becomes MatMulNBits (int4 or int8 blocks with per-block scales); the lm_head is kept at
int8 or better (it decides every token). The exporter writes lm_head as a Gemm(transB=1): it is rewritten
to a MatMul over the transposed weight first, so that the quantizer can take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4               # body weights: 4 or 8
    block_size: int = 32        # weights per quantization block (a power of two >= 16)
    lm_head_bits: int = 8       # never below 8
    accuracy_level: int = 4     # MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = fp32
    embeddings: bool = False    # also the token embedding table, as int4 GatherBlockQuantized (the only width)

    def __post_init__(self):
        if self.bits not in (4, 8) or self.lm_head_bits != 8:
            raise ValueError(f"bits must be 4 or 8 and the lm_head 8, got {self.bits}/{self.lm_head_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {self.block_size}")

    def to_json(self) -> dict:
        return {"method": "MatMulNBits", "weights": f"int{self.bits}", "block_size": self.block_size,
                "lm_head": f"int{self.lm_head_bits}", "accuracy_level": self.accuracy_level,
                "embeddings": "int4" if self.embeddings else "float32"}


def _gemm_to_matmul(model: onnx.ModelProto, logits_name: str) -> str:
    """Rewrite Gemm(A, W, transB=1) nodes with a constant W into MatMul(A, W^T); return the lm_head node name."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    head = None
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA", 0) and len(node.input) == 2
        if node.op_type == "Gemm" and plain and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB", 0):
                w = np.ascontiguousarray(w.T)
            name = node.input[1] + "_t"
            model.graph.initializer.append(numpy_helper.from_array(w, name))
            node = onnx.helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
        if node.op_type == "MatMul" and logits_name in node.output:
            head = node.name
        nodes.append(node)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    if head is None:
        raise RuntimeError(f"no MatMul produces {logits_name!r}; cannot find the lm_head to keep at int8")
    return head


def quantize_step(src: Path, dst: Path, options: QuantOptions, logits_name: str = "logits") -> None:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    model = onnx.load(str(src))
    head = _gemm_to_matmul(model, logits_name)
    passes = [(options.bits, {"nodes_to_exclude": [head]}),
              (options.lm_head_bits, {"nodes_to_include": [head], "op_types_to_quantize": ("_",)})]
    if options.embeddings:  # the embedding rows are gathered, so quantize along the hidden axis
        passes.append((4, {"op_types_to_quantize": ("Gather",), "quant_axes": (("Gather", 1),)}))
    for bits, select in passes:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=options.block_size, is_symmetric=True,
                                 accuracy_level=options.accuracy_level, **select)
        # An all-zero weight block has scale 0; the quantizer maps it to 0 with np.where, but numpy still
        # evaluates (and warns about) the discarded 0/0.
        with np.errstate(invalid="ignore"):
            q.process()
        model = q.model.model
    big = sum(i.ByteSize() for i in model.graph.initializer) > (1 << 30)
    onnx.save(model, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)
