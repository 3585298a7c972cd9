"""The sampler graph: emu3_rt.sampling's chain (CFG -> grid -> temperature -> top-k -> top-p -> greedy | sample)
as ONNX ops (opset 18, onnx.helper only), so that only the chosen ids (and their log-probs) leave the engine.

I/O (R = B, or 2B under CFG: B cond rows then B uncond rows; V = logits width, fixed at export):
  logits (R, V) f32 · cfg_scale f64 [] · guided bool [] · kinds (B,) i64 (grid kind per row, -1 = no grid) ·
  temperature f64 [] · top_k i64 [] (0 or >= V: off) · top_p f64 [] (1: off) · greedy bool [] ·
  uniforms (B,) f64 (one rng.random() per row, ignored when greedy)  ->  ids (B,) i64 (logits columns; -1 for a
  row where nothing is allowed, which the runtime turns into sampling's ValueError) · logprobs (B,) f32 (the
  chosen id under the processed distribution: softmax of the final scores).
cfg_scale, temperature and top_p are float64 so that `scale == 1`, np.float32(1 - p) and the temperature's
out-of-range limit are computed exactly as numpy does.

Order of work (candidate-first): CFG, grid and temperature are elementwise over (N, V) (N = rows after CFG);
greedy is one ArgMax. Sampling takes the k-th largest score with TopK, counts the scores >= it on the whole row
(ties at the k-th value all stay, as TopK's `logits < kth` rule), takes that many candidates, sorts them back into
id order, and does top-p and the inverse-CDF draw on (N, K2) candidates only. Removed ids have weight 0 in numpy's
cumulative sum, so summing candidates only in id order gives the same float64 partial sums.

Where results may differ from numpy (fp32 boundary ties): exp/log/sum are onnxruntime's, not numpy's (they differ
in the last ulp), so CFG's log-softmax can move by an ulp (greedy can differ only where the two best guided scores
are within a few ulps), top-p can differ where a cumulative probability is within ~1e-7 of 1 - p, and a draw
where u lands within ~1e-16 of a CDF step. tests/test_sampler_graph.py measures the rates.

Speculative (Jacobi) decoding is an addition: `build_sampler_graph(positions=True)` already declares logits
(R, S, V), kinds/uniforms/ids/logprobs (B, S); rows are flattened to N = B*S after CFG, so every op above is
unchanged. Draft verification adds one input `draft_ids` (B, S) i64 and one output `draft_probs` (B, S) f32:
GatherElements of the normalised candidate weights at the draft id's candidate slot (0 when it is not a
candidate), computed from the same `w`/`total` the draw uses; the residual resample for a greedy (one-hot) draft
is the same draw with that one candidate's weight set to 0 (a Where before the CumSum).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
# the grid kind codes of emu3_rt.sampling.VisualGridConstraint, and the column code for "in no kind's table"
VISUAL, EOL, EOF, EOI, EOS, PAD = range(6)
NO_KIND = 127
F32, F64, I64, BOOL = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
FLT_MAX = float(np.finfo(np.float32).max)


def column_kinds(vocab_size: int, *, visual_ids, eol: int, eof: int, eoi: int, eos: int, pad: int) -> np.ndarray:
    """(V,) int8: the grid kind whose table holds each logits column, NO_KIND for the rest."""
    kinds = np.full(vocab_size, NO_KIND, dtype=np.int8)
    groups = [(VISUAL, np.asarray(visual_ids, dtype=np.int64).reshape(-1))]
    groups += [(kind, np.array([i], dtype=np.int64)) for kind, i in ((EOL, eol), (EOF, eof), (EOI, eoi),
                                                                     (EOS, eos), (PAD, pad))]
    for kind, ids in groups:
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"grid ids of kind {kind} must be columns in [0, {vocab_size}), "
                             f"got {ids.min()}..{ids.max()}")
        if (kinds[ids] != NO_KIND).any():
            raise ValueError(f"grid kind {kind} shares column {int(ids[kinds[ids] != NO_KIND][0])} with another kind")
        kinds[ids] = kind
    return kinds


# ---- a small graph builder: unique names, constants, nested If branches ----

class _Builder:
    def __init__(self, counter: list[int]):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._counter = counter

    def name(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{hint}_{self._counter[0]}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, hint: str | None = None, **attrs):
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype) -> str:
        name = self.name("c")
        self.nodes.append(helper.make_node("Constant", [], [name], name=self.name("Constant"),
                                           value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name)))
        return name

    def init(self, array: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def branch(self, outputs: list[tuple[str, int]]) -> onnx.GraphProto:
        """This builder's nodes as an If branch returning `outputs` ((name, elem_type) pairs)."""
        outs = [helper.make_tensor_value_info(n, t, None) for n, t in outputs]
        return helper.make_graph(self.nodes, self.name("branch"), [], outs, initializer=self.inits)

    def if_(self, cond: str, then: onnx.GraphProto, other: onnx.GraphProto, n_out: int, hint: str):
        return self.op("If", cond, n_out=n_out, hint=hint, then_branch=then, else_branch=other)

    # shorthands over the last axis of (N, K) tensors
    def rmax(self, x: str) -> str:
        return self.op("ReduceMax", x, self.const([-1], np.int64), keepdims=1)

    def rsum(self, x: str) -> str:
        return self.op("ReduceSum", x, self.const([-1], np.int64), keepdims=1)

    def where(self, c: str, a: str, b: str) -> str:
        return self.op("Where", c, a, b)

    def neg_inf(self, x: str) -> str:
        return self.op("IsInf", x, detect_positive=0)

    def any(self, mask: str, keepdims: int = 0) -> str:
        """bool: any True (over everything, or per row with keepdims=1)."""
        reduced = self.rmax(self.op("Cast", mask, to=F32)) if keepdims else \
            self.op("ReduceMax", self.op("Cast", mask, to=F32), keepdims=0)
        return self.op("Cast", reduced, to=BOOL)

    def count(self, mask: str) -> str:
        """(N, 1) int64 count of True per row (summed in float32: exact below 2^24 columns, and fast)."""
        return self.op("Cast", self.rsum(self.op("Cast", mask, to=F32)), to=I64)

    def finite(self, x: str) -> str:
        return self.op("Not", self.op("Or", self.op("IsInf", x), self.op("IsNaN", x)))

    def cond(self, flag: str, then, other, types: list[int], hint: str):
        """If(flag): then/other(builder) -> output name(s); the rare branch keeps full-row Wheres off the hot path."""
        branches = []
        for fn in (then, other):
            b = _Builder(self._counter)
            outs = fn(b)
            outs = [outs] if isinstance(outs, str) else list(outs)
            # a branch output must be produced inside the branch
            outs = [b.op("Identity", o) for o in outs]
            branches.append(b.branch(list(zip(outs, types))))
        return self.if_(flag, *branches, len(types), hint)


# ---- the stages ----

def _log_softmax(g: _Builder, x: str, ninf: str) -> str:
    """sampling.log_softmax: NaN-propagating max, an all -inf row's max taken as 0, -inf stays -inf."""
    # ReduceMax's NaN handling is unspecified: take the max, then NaN for rows holding a NaN
    m = g.where(g.any(g.op("IsNaN", x), keepdims=1), g.const(np.nan, np.float32), g.rmax(x))   # (N, 1)
    m = g.where(g.neg_inf(m), g.const(0, np.float32), m)
    d = g.op("Sub", x, m)
    lse = g.op("Log", g.rsum(g.op("Exp", d)))
    out = g.op("Sub", d, lse)
    # x = -inf already gives -inf unless lse is not finite (a row with NaN, +inf, or nothing but -inf)
    return g.cond(g.any(g.op("Not", g.finite(lse))), lambda b: b.where(b.neg_inf(x), ninf, out), lambda b: out,
                  [F32], "log_softmax")


def _cfg(counter, logits: str, scale64: str) -> onnx.GraphProto:
    """ClassifierFreeGuidance: (2B, ...) -> (B, ...) guided log-probs, with its NaN limits and finfo.max clamp."""
    g = _Builder(counter)
    ninf, pinf = g.const(-np.inf, np.float32), g.const(np.inf, np.float32)
    rows = g.op("Shape", logits, start=0, end=1)
    half = g.op("Div", rows, g.const([2], np.int64))
    axis0, big = g.const([0], np.int64), g.const([np.iinfo(np.int64).max], np.int64)
    c = _log_softmax(g, g.op("Slice", logits, g.const([0], np.int64), half, axis0), ninf)
    u = _log_softmax(g, g.op("Slice", logits, half, big, axis0), ninf)

    def guided(b: _Builder) -> str:
        s = b.op("Cast", b.op("Min", scale64, b.const(FLT_MAX, np.float64)), to=F32)     # 1e300 saturates
        out = b.op("Add", b.op("Mul", s, b.op("Sub", c, u)), u)
        nan = b.op("IsNaN", out)

        def limit(r: _Builder) -> str:  # NaN only from a -inf log-prob: the limit of s*c + (1-s)*u
            c_ok, u_ok = r.op("Greater", c, ninf), r.op("Greater", u, ninf)
            above = r.where(r.op("Greater", s, r.const(1, np.float32)), pinf, ninf)
            lim = r.where(r.op("And", c_ok, r.op("Not", u_ok)), above,
                          r.where(r.op("And", r.op("Not", c_ok), u_ok), u, ninf))
            return r.where(nan, lim, out)

        out = b.cond(b.any(nan), limit, lambda r: out, [F32], "cfg_limit")
        return b.op("Min", out, b.const(FLT_MAX, np.float32))

    result = g.cond(g.op("Equal", scale64, g.const(1.0, np.float64)), lambda b: c, guided, [F32], "cfg_scale")
    return g.branch([(result, F32)])


def _grid(g: _Builder, x: str, kinds: str, kind_of: str, ninf: str) -> str:
    """VisualGridConstraint on (N, V) rows; rows of kind -1 pass through untouched (numpy: no grid filter)."""
    k = g.op("Unsqueeze", kinds, g.const([1], np.int64))                       # (N, 1)
    free = g.op("Less", k, g.const(0, np.int64))

    def constrain(b: _Builder) -> str:
        allowed = b.op("Equal", kind_of, b.op("Cast", k, to=TensorProto.INT8))   # (N, V)
        out = b.where(b.op("And", allowed, b.op("Not", b.op("IsNaN", x))), x, ninf)
        alive = b.any(b.op("Greater", out, ninf), keepdims=1)                  # (N, 1)
        # Transformers' fallback: a row with no allowed finite score becomes the bare mask (0 where allowed)
        out = b.cond(b.any(b.op("Not", alive)),
                     lambda r: r.where(alive, out, r.where(allowed, r.const(0, np.float32), ninf)), lambda r: out,
                     [F32], "grid_fallback")
        return b.cond(b.any(free), lambda r: r.where(free, x, out), lambda r: out, [F32], "grid_free")

    return g.cond(g.any(g.op("Not", free)), constrain, lambda b: x, [F32], "grid")


def _greedy(counter, x: str) -> onnx.GraphProto:
    """Greedy on (N, V): first maximum, NaN never chosen; log-prob under softmax(x) in float32."""
    g = _Builder(counter)
    ninf = g.const(-np.inf, np.float32)
    nan = g.op("IsNaN", x)
    xs = g.cond(g.any(nan), lambda b: b.where(nan, ninf, x), lambda b: x, [F32], "greedy_nan")
    ids = g.op("ArgMax", xs, axis=-1, keepdims=1)                              # (N, 1), first maximum
    top = g.rmax(xs)
    chosen = g.op("GatherElements", xs, ids, axis=-1)
    # log-sum-exp. Exp with a subnormal or zero result is onnxruntime's slow path (0.7 ms on 150k masked ids vs
    # 0.04): clamp at -87 (exp = 1.6e-38); V such terms add < 4e-33, far below float32's resolution at the max's 1
    d = g.op("Max", g.op("Sub", xs, top), g.const(-87.0, np.float32))
    lp = g.op("Sub", g.op("Sub", chosen, top), g.op("Log", g.rsum(g.op("Exp", d))))
    pos_inf = g.op("IsInf", top, detect_negative=0)
    # +inf scores share all the mass: log(1 / their count)
    lp = g.cond(g.any(pos_inf), lambda b: b.where(pos_inf, b.op("Neg", b.op("Log", b.op("Cast", b.count(
        b.op("IsInf", xs, detect_negative=0)), to=F32))), lp), lambda b: lp, [F32], "greedy_inf")
    ids = g.where(g.op("Greater", top, ninf), ids, g.const(-1, np.int64))
    axis = g.const([-1], np.int64)
    return g.branch([(g.op("Squeeze", ids, axis), I64), (g.op("Squeeze", lp, axis), F32)])


def _sample(counter, x: str, temperature: str, top_k: str, top_p: str, uniforms: str, vocab: int) -> onnx.GraphProto:
    """Temperature, top-k, top-p and the inverse-CDF draw on (N, V), candidate-first."""
    g = _Builder(counter)
    ninf = g.const(-np.inf, np.float32)
    axis, one = g.const([-1], np.int64), g.const([1], np.int64)
    xt = g.cond(g.op("Equal", temperature, g.const(1.0, np.float64)), lambda b: x,
                lambda b: _temperature(b, x, temperature), [F32], "temperature")
    nan = g.op("IsNaN", xt)
    rows = g.op("Shape", xt, start=0, end=1)
    zeros = g.op("Unsqueeze", g.op("Expand", g.const(0, np.int64), rows), axis)              # (N, 1)
    # ranking values with NaN as -inf, and the NaN count per row
    xr, n_nan = g.cond(g.any(nan), lambda b: (b.where(nan, ninf, xt), b.count(nan)), lambda b: (xt, zeros),
                       [F32, I64], "nan")
    # top-k: numpy partitions with NaN last (largest), so the k-th value is the (k - #NaN)-th of the rest
    k = g.op("Reshape", top_k, one)
    on = g.op("And", g.op("Greater", k, g.const([0], np.int64)), g.op("Less", k, g.const([vocab], np.int64)))
    on = g.op("Squeeze", on, g.const([0], np.int64))

    def kth_of(b: _Builder):
        vals, idx = b.op("TopK", xr, k, n_out=2, axis=-1)                      # (N, k) descending
        kk = b.op("Sub", k, n_nan)                                             # (N, 1)
        kth = b.op("GatherElements", vals, b.op("Max", b.op("Sub", kk, one), b.const([0], np.int64)), axis=-1)
        return b.where(b.op("Greater", kk, b.const([0], np.int64)), kth, ninf), vals, idx

    def no_kth(b: _Builder):
        return b.op("Cast", zeros, to=F32), b.op("Cast", zeros, to=F32), zeros   # kth = 0 - inf below

    kth, vals, idx = g.cond(on, kth_of, no_kth, [F32, F32, I64], "kth")
    kth = g.where(on, kth, ninf)
    # candidates: every usable score >= the k-th value (> -inf: the lowest float32); K2 = the most any row has
    cand = g.op("GreaterOrEqual", xr, g.op("Max", kth, g.const(-FLT_MAX, np.float32)))
    n_cand = g.count(cand)                                                     # (N, 1)
    k2 = g.op("Max", g.op("ReduceMax", n_cand, keepdims=0), g.const(1, np.int64))
    k2 = g.op("Reshape", k2, one)
    # without ties past the k-th value, the first TopK's output already holds them
    reuse = g.op("And", on, g.op("Squeeze", g.op("Equal", k2, k), g.const([0], np.int64)))
    cv, ci = g.cond(reuse, lambda b: (vals, idx), lambda b: b.op("TopK", xr, k2, n_out=2, axis=-1),
                    [F32, I64], "candidates")                                  # (N, K2) descending
    is_c = g.op("Less", g.op("Range", g.const(0, np.int64), g.op("Squeeze", k2, g.const([0], np.int64)),
                             g.const(1, np.int64)), n_cand)                    # the first n_cand are candidates
    # back into id order (padding after the candidates)
    key = g.where(is_c, ci, g.op("Add", ci, g.const(vocab, np.int64)))
    order = g.op("TopK", key, k2, n_out=2, axis=-1, largest=0)[1]
    ids = g.op("GatherElements", ci, order, axis=-1)
    # keys of candidates are < V <= keys of padding, so in id order the candidates are still the first n_cand
    v = g.where(is_c, g.op("GatherElements", cv, order, axis=-1), ninf)        # (N, K2) f32, id order
    v = _top_p(g, v, n_nan, top_p, counter)
    # the draw, float64: weights exp(s - max) (or the +inf ids), CDF in id order, u times the unnormalised total
    s = g.op("Cast", v, to=F64)
    top = g.rmax(s)
    w = g.where(g.op("IsInf", top, detect_negative=0), g.op("Cast", g.op("IsInf", s, detect_negative=0), to=F64),
                g.op("Exp", g.op("Sub", s, top)))
    cdf = g.op("CumSum", w, g.const(-1, np.int64))
    total = g.op("Slice", cdf, axis, g.const([np.iinfo(np.int64).max], np.int64), axis)      # (N, 1)
    ut = g.op("Mul", g.op("Unsqueeze", uniforms, axis), total)
    n_le = g.count(g.op("LessOrEqual", cdf, ut))
    last = g.op("ArgMax", g.op("Cast", g.op("Greater", w, g.const(0, np.float64)), to=F32), axis=-1, keepdims=1,
                select_last_index=1)
    pos = g.op("Min", n_le, last)
    chosen = g.op("GatherElements", ids, pos, axis=-1)
    # log-prob of the chosen id: log(w / total)
    lp_w = g.op("Log", g.op("Div", g.op("GatherElements", w, pos, axis=-1), total))
    usable = g.op("Greater", top, g.const(-np.inf, np.float64))
    chosen = g.where(usable, chosen, g.const(-1, np.int64))
    chosen, lp = g.op("Squeeze", chosen, axis), g.op("Squeeze", g.op("Cast", lp_w, to=F32), axis)
    return g.branch([(chosen, I64), (lp, F32)])


def _temperature(g: _Builder, x: str, t64: str) -> str:
    """Temperature: x / float32(t); where that cast or any x / t leaves the float range (over the whole (N, V)
    batch, as numpy checks it), the float64 limit (x - row's finite max) / t instead."""
    t32 = g.op("Cast", t64, to=F32)
    out = g.op("Div", x, t32)
    same = g.op("Equal", g.op("IsInf", out), g.op("IsInf", x))    # finite pattern: NaN stays NaN either way
    ok = g.op("Cast", g.op("ReduceMin", g.op("Cast", same, to=F32), keepdims=0), to=BOOL)
    ok = g.op("And", ok, g.op("And", g.op("Greater", t32, g.const(0, np.float32)), g.op("Not", g.op("IsInf", t32))))

    def limit(b: _Builder) -> str:
        x64 = b.op("Cast", x, to=F64)
        top = b.rmax(b.where(b.finite(x64), x64, b.const(-np.inf, np.float64)))
        top = b.where(b.neg_inf(top), b.const(0.0, np.float64), top)
        return b.op("Cast", b.op("Div", b.op("Sub", x64, top), t64), to=F32)

    return g.cond(ok, lambda b: out, limit, [F32], "temperature_limit")


def _top_p(g: _Builder, v: str, n_nan: str, top_p: str, counter) -> str:
    """TopP on (N, K2) id-ordered candidates (-inf padding): stable ascending order, float32 probabilities
    cumulated in float64, drop cum <= float32(1 - p) but never the best; skipped for p >= 1 and (like numpy,
    whose probabilities turn NaN) for rows with NaN, +inf or nothing finite."""
    t = _Builder(counter)
    ninf = t.const(-np.inf, np.float32)
    m = t.rmax(v)
    e = t.op("Exp", t.op("Sub", v, m))
    probs = t.op("Div", e, t.rsum(e))
    k2 = t.op("Shape", v, start=1, end=2)
    asc = t.op("TopK", v, k2, n_out=2, axis=-1, largest=0)[1]                  # ties: lower id first, as stable
    cum = t.op("CumSum", t.op("Cast", t.op("GatherElements", probs, asc, axis=-1), to=F64), t.const(-1, np.int64))
    cut = t.op("Cast", t.op("Sub", t.const(1.0, np.float64), top_p), to=F32)
    # cum is non-decreasing, so the removed ids are the first n_rm in ascending order (never the last one)
    n_rm = t.count(t.op("LessOrEqual", t.op("Cast", cum, to=F32), cut))
    n_rm = t.op("Min", n_rm, t.op("Sub", k2, t.const([1], np.int64)))
    rank = t.op("ScatterElements", t.op("Mul", asc, t.const(0, np.int64)), asc,
                t.op("Expand", t.op("Range", t.const(0, np.int64), t.op("Squeeze", k2, t.const([0], np.int64)),
                                    t.const(1, np.int64)), t.op("Shape", asc)), axis=-1)
    finite = t.op("And", t.op("Greater", m, ninf), t.op("Not", t.op("IsInf", m)))
    active = t.op("And", finite, t.op("Equal", n_nan, t.const(0, np.int64)))
    remove = t.op("And", t.op("Less", rank, n_rm), active)
    out = t.where(remove, ninf, v)
    off = _Builder(counter)
    same = off.op("Identity", v)
    on = g.op("Less", top_p, g.const(1.0, np.float64))
    return g.if_(on, t.branch([(out, F32)]), off.branch([(same, F32)]), 1, "top_p")


# ---- the graph ----

def sampler_io(positions: bool = False) -> dict:
    """bundle.json's io block for the sampler graph (the same shape as the step graph's)."""
    rows, pos = (["rows"], ["batch_size"]) if not positions else (["rows", "positions"], ["batch_size", "positions"])
    t = lambda name, dtype, dims: {"name": name, "dtype": dtype, "dims": dims}  # noqa: E731
    return {"inputs": [t("logits", "float32", rows + ["vocab"]), t("cfg_scale", "float64", []),
                       t("guided", "bool", []), t("kinds", "int64", pos), t("temperature", "float64", []),
                       t("top_k", "int64", []), t("top_p", "float64", []), t("greedy", "bool", []),
                       t("uniforms", "float64", pos)],
            "outputs": [t("ids", "int64", pos), t("logprobs", "float32", pos)]}


def build_sampler_graph(kind_of: np.ndarray, *, positions: bool = False) -> onnx.ModelProto:
    """The sampler for logits of width V = len(kind_of) (see column_kinds). positions=True: logits (R, S, V)."""
    kind_of = np.asarray(kind_of, dtype=np.int8).reshape(1, -1)
    vocab = kind_of.shape[1]
    counter = [0]
    g = _Builder(counter)
    io = sampler_io(positions)
    types = {"float32": F32, "float64": F64, "int64": I64, "bool": BOOL}
    dims = {t["name"]: [vocab if d == "vocab" else d for d in t["dims"]] for t in io["inputs"] + io["outputs"]}
    inputs = [helper.make_tensor_value_info(t["name"], types[t["dtype"]], dims[t["name"]]) for t in io["inputs"]]
    outputs = [helper.make_tensor_value_info(t["name"], types[t["dtype"]], dims[t["name"]]) for t in io["outputs"]]

    plain = _Builder(counter)
    same = plain.op("Identity", "logits")
    scores = g.if_("guided", _cfg(counter, "logits", "cfg_scale"), plain.branch([(same, F32)]), 1, "guided")
    x = g.op("Reshape", scores, g.const([-1, vocab], np.int64))                # (N, V)
    kinds = g.op("Reshape", "kinds", g.const([-1], np.int64))                  # (N,)
    ninf = g.const(-np.inf, np.float32)
    x = _grid(g, x, kinds, g.init(kind_of, "column_kinds"), ninf)
    u = g.op("Reshape", "uniforms", g.const([-1], np.int64))
    ids, lp = g.if_("greedy", _greedy(counter, x),
                    _sample(counter, x, "temperature", "top_k", "top_p", u, vocab), 2, "chosen")
    shape = g.op("Shape", "kinds")
    g.nodes.append(helper.make_node("Reshape", [ids, shape], ["ids"], name=g.name("Reshape")))
    g.nodes.append(helper.make_node("Reshape", [lp, shape], ["logprobs"], name=g.name("Reshape")))
    graph = helper.make_graph(g.nodes, "emu3_sampler", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="emu3-bundle")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    onnx.checker.check_model(model, full_check=True)
    return model


def write_sampler_graph(path: str | Path, kind_of: np.ndarray, *, positions: bool = False) -> Path:
    """Build and save; the bytes depend only on kind_of and positions (no timestamps, no random names)."""
    path = Path(path)
    onnx.save_model(build_sampler_graph(kind_of, positions=positions), str(path))
    return path
