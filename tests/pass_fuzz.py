"""Checking the decay-attention pass against eager, and a seeded generator of random
mask programs (true causal decay masks and near misses) to check it with.

The one rule (a *false rewrite* is silent corruption, the worst bug of the project):
for every program, either the pass leaves the site alone, or the rewritten graph's
result equals eager's: same shape and dtype, the same NaN and +-inf positions, and the
finite values close with a tolerance set by the dtypes the program computes in -- or,
where only the values differ, at most twice eager's error against the same program
run on float64 inputs (the rewrite may be more exact than eager, e.g. where eager's
float32 cumsum differences cancel, but never less).  A rewritten graph that raises where eager does not, or a pass that raises, is a crash.
An ``internal error`` near miss (an analysis bug swallowed by the pass) is reported too.

Programs are generated as Python *source code* (``Program.source``), so a failure
prints the program exactly, ready to paste into a reproducer.  The graph the pass
sees is the ATen pre-dispatch graph that the "leet" backend builds (make_fx with
``pre_dispatch=True`` under fake tensors), with buffers/parameters passed as graph
inputs as dynamo lifts them; :func:`check_compiled` runs the same program through
dynamo + the backend's own ``trace_to_aten`` for the end-to-end variant.
"""
import copy
import dataclasses
import math
import random

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from leet_compile.passes import rewrite_decay_attention

__all__ = ["Program", "Outcome", "check_fn", "check_compiled", "compare", "generate", "make_inputs", "shrink"]


# ---------------------------------------------------------------- comparison


def compare(out, ref, rtol):
    """None if ``out`` equals eager's ``ref`` under the rule above, else the reason."""
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return f"not tensors: {type(out)} vs {type(ref)}"
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != eager {tuple(ref.shape)}"
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype} != eager {ref.dtype}"
    o, r = out.detach().double(), ref.detach().double()
    if not torch.equal(o.isnan(), r.isnan()):
        return (f"NaN pattern differs: {int(o.isnan().sum())} NaN in the rewrite, "
                f"{int(r.isnan().sum())} in eager")
    if not torch.equal(o.isposinf(), r.isposinf()) or not torch.equal(o.isneginf(), r.isneginf()):
        return (f"inf pattern differs: {int(o.isinf().sum())} inf in the rewrite, "
                f"{int(r.isinf().sum())} in eager")
    fin = r.isfinite()
    if not fin.any():
        return None
    o, r = o.where(fin, 0.0), r.where(fin, 0.0)
    # per (..., row) scale: an error in a small row is not hidden by a large one
    scale = r.abs().amax(dim=-1, keepdim=True) if r.dim() else r.abs()
    bad = (o - r).abs() > rtol * r.abs() + rtol * scale + 1e-300
    if bad.any():
        err = ((o - r).abs() / (r.abs() + scale).clamp_min(1e-300)).max().item()
        return f"values differ: max rel err {err:.3g} (rtol {rtol:g}) at {int(bad.sum())} of {r.numel()} elements"
    return None


def default_rtol(*dtypes):
    """Tolerance for comparing with eager: set by the least precise dtype of q/k/v."""
    rt = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
    return max(rt.get(d, 1e-4) for d in dtypes)


@dataclasses.dataclass
class Outcome:
    rewrites: int = 0
    reasons: list = dataclasses.field(default_factory=list)  # near-miss reasons
    failure: str = ""  # "" when sound
    kind: str = ""  # "false rewrite", "crash", "internal error", "eager error"

    @property
    def ok(self):
        return not self.failure


def _clone(xs):
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in xs]


def _run_and_compare(fn, gm, report, inputs, rtol):
    res = Outcome(rewrites=len(report.rewrites), reasons=[s.reason for s in report.near_misses])
    ref = fn(*_clone(inputs))
    try:
        out = gm(*_clone(inputs))
    except Exception as e:  # eager ran: the rewritten graph must too
        res.failure, res.kind = f"the rewritten graph raised {e!r}", "crash"
        return res
    if isinstance(out, (tuple, list)):
        out = out[0]
    why = compare(out, ref, rtol)
    if why and why.startswith("values differ") and res.rewrites and _closer_to_float64(fn, inputs, out, ref):
        why = None  # eager's own float32 rounding (e.g. a cumsum that cancels), not the rewrite's
    if why:
        res.failure = why
        res.kind = "false rewrite" if res.rewrites else "wrong result without a rewrite"
        return res
    internal = [r for r in res.reasons if r.startswith("internal error")]
    if internal:
        res.failure, res.kind = internal[0], "internal error"
    return res


def _closer_to_float64(fn, inputs, out, ref):
    """Whether the rewrite's error against the same program run on float64 inputs is at
    most twice eager's (flash-attention's rule): the rewrite may be more exact than
    eager, never less."""
    wide = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in _clone(inputs)]
    try:
        exact = fn(*wide).double()
    except Exception:
        return False
    if not torch.isfinite(exact).all():
        return False

    def err(x):
        return ((x.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()

    return err(out) <= 2 * err(ref) + 1e-12


def trace(fn, inputs):
    """The ATen pre-dispatch graph of ``fn(*inputs)``, as the backend traces it."""
    return make_fx(fn, tracing_mode="fake", pre_dispatch=True)(*_clone(inputs))


def check_fn(fn, inputs, rtol=None):
    """Traces ``fn`` (q, k, v, *buffers) to ATen, runs the pass, runs the rewritten
    graph on ``inputs`` and compares it with eager ``fn``.  Returns an :class:`Outcome`."""
    if rtol is None:
        rtol = default_rtol(*[x.dtype for x in inputs[:3]])
    try:
        fn(*_clone(inputs))
    except Exception as e:
        return Outcome(failure=f"eager raised {e!r}", kind="eager error")
    gm = trace(fn, inputs)
    try:
        report = rewrite_decay_attention(gm)
    except Exception as e:
        return Outcome(failure=f"rewrite_decay_attention raised {e!r}", kind="crash")
    return _run_and_compare(fn, gm, report, inputs, rtol)


def check_compiled(fn, inputs, rtol=None, dynamic=False):
    """Same as :func:`check_fn` through dynamo: the backend's ``trace_to_aten`` on the
    dynamo graph, then the pass (what ``torch.compile(backend="leet")`` does, without
    Inductor).  Buffers are inputs of ``fn`` here; dynamo lifts them the same way."""
    from leet_compile.backend import trace_to_aten

    if rtol is None:
        rtol = default_rtol(*[x.dtype for x in inputs[:3]])
    ref = fn(*_clone(inputs))
    reports = []

    def capture(gm, ex):
        g = trace_to_aten(gm, ex)
        reports.append(rewrite_decay_attention(g))
        return g

    torch._dynamo.reset()
    try:
        out = torch.compile(fn, backend=capture, dynamic=dynamic, fullgraph=True)(*_clone(inputs))
    except Exception as e:
        return Outcome(failure=f"compile raised {e!r}", kind="crash")
    res = Outcome(rewrites=sum(len(r.rewrites) for r in reports),
                  reasons=[s.reason for r in reports for s in r.near_misses])
    why = compare(out, ref, rtol)
    if why and why.startswith("values differ") and res.rewrites and _closer_to_float64(fn, inputs, out, ref):
        why = None  # eager's own float32 rounding, not the rewrite's
    if why:
        res.failure, res.kind = why, "false rewrite" if res.rewrites else "wrong result without a rewrite"
    return res


def make_inputs(B, H, T, D, dtype=torch.float64, seed=0, buffers=()):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    return qkv + [b.clone() for b in buffers]


# ---------------------------------------------------------------- the generator

_DT = {
    torch.int32: "torch.int32", torch.int64: "torch.int64", torch.float16: "torch.float16",
    torch.bfloat16: "torch.bfloat16", torch.float32: "torch.float32", torch.float64: "torch.float64",
}
# where a dtype holds consecutive integers exactly
_EXACT = {torch.int32: 2**31 - 1, torch.int64: 2**63 - 1, torch.float16: 2048,
          torch.bfloat16: 256, torch.float32: 2**24, torch.float64: 2**53}


@dataclasses.dataclass
class Program:
    """A generated mask program: ``source`` defines ``fn(q, k, v, *bufs)``."""

    source: str
    shape: tuple  # (B, H, T, D)
    dtype: torch.dtype  # of q, k, v
    buffers: list  # tensors passed after q, k, v
    hazards: list  # why this program may not be an exact causal decay mask
    seed: int = 0
    rtol: float = 1e-4  # float64 all through: 1e-6; any float32 or 16-bit step: 1e-4 (strict)
    uncounted: list = dataclasses.field(default_factory=list)  # why a true mask is left out of the rate

    @property
    def true_mask(self):
        """The generator built an exact causal decay mask, safe in its dtypes."""
        return not self.hazards

    @property
    def counts_for_rate(self):
        """A true mask that a complete prover should rewrite (counted in the rewrite rate)."""
        return self.true_mask and not self.uncounted

    def fn(self):
        env = {"torch": torch, "F": F, "math": math, "inf": math.inf, "nan": math.nan}
        exec(compile(self.source, f"<fuzz program {self.seed}>", "exec"), env)
        return env["fn"]

    def inputs(self):
        B, H, T, D = self.shape
        return make_inputs(B, H, T, D, self.dtype, seed=self.seed, buffers=self.buffers)

    def describe(self):
        B, H, T, D = self.shape
        bufs = ", ".join(f"torch.tensor({b.tolist()}, dtype={_DT.get(b.dtype, b.dtype)})"
                         for b in self.buffers)
        return (f"# seed {self.seed}; q, k, v: randn({B}, {H}, {T}, {D}, dtype={_DT[self.dtype]})"
                + (f"; bufs = [{bufs}]" if bufs else "")
                + (f"\n# hazards: {'; '.join(self.hazards)}" if self.hazards else "\n# a true causal decay mask")
                + "\n" + self.source)

    def check(self, compiled=False):
        fn = self.fn()
        inputs = self.inputs()
        return check_compiled(fn, inputs, self.rtol) if compiled else check_fn(fn, inputs, self.rtol)


class _Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)
        # the row normalisations draw from their own stream: the programs of earlier
        # versions of the generator (and the pinned seeds) stay as they were
        self.r_rows = random.Random(seed * 7919 + 1)
        self.seed = seed
        self.lines = []
        self.hazards = []
        self.uncounted = []  # sound programs left out of the rewrite rate
        self.buffers = []

    def pick(self, *opts, w=None):
        return self.r.choices(opts, weights=w)[0]

    def chance(self, p):
        return self.r.random() < p

    def emit(self, line):
        self.lines.append("    " + line)

    def hazard(self, why):
        self.hazards.append(why)

    def buffer(self, t):
        self.buffers.append(t)
        return f"bufs[{len(self.buffers) - 1}]"

    # -- positions i, j as broadcastable [T, 1] and [1, T] (or [T, T] meshgrid) tensors
    def positions(self, T):
        dt = self.pick(torch.int64, torch.int32, torch.float32, torch.float64, torch.float16, torch.bfloat16,
                       w=[8, 2, 4, 3, 1, 1])
        offset = self.pick(0, 3, 1000, "huge", w=[8, 1, 1, 1])
        scale = self.pick(1, 2, 3, "huge", w=[12, 1, 1, 1])
        how = self.pick("arange_dtype", "arange_to")
        if how == "arange_dtype":
            self.emit(f"n = torch.arange(T, dtype={_DT[dt]})")
        else:
            self.emit(f"n = torch.arange(T).to({_DT[dt]})")
        top = T - 1
        if scale == "huge":
            scale = self.pick(2**20, 2**24, 2**30, 2**40 if not dt.is_floating_point or dt == torch.float64 else 2**24)
        if offset == "huge":
            offset = {torch.int32: self.pick(2**31 - 4, 2**30), torch.int64: self.pick(2**60, 2**62, 2**53 + 1),
                      torch.float32: self.pick(2**24, 2**23 + 0.5, 2**30), torch.float64: self.pick(2**53, 2**52 + 0.5),
                      torch.float16: 2048, torch.bfloat16: 256}[dt]
        if scale != 1:
            self.emit(f"n = n * {scale}")
        if offset:
            self.emit(f"n = n + {offset}")
        hi = abs(offset) + top * scale
        step_exact = (scale == int(scale)) and (offset == int(offset))
        if dt.is_floating_point:
            if hi > _EXACT[dt] or not step_exact:
                self.hazard(f"positions up to {hi} in {dt} are not exact")
        else:
            if hi > _EXACT[dt]:
                self.hazard(f"positions up to {hi} wrap in {dt}")
        if T > _EXACT[dt]:
            self.hazard(f"T={T} beyond exact {dt}")
        form = self.pick("bcast", "view", "meshgrid", "swapped", w=[8, 3, 1, 1])
        if form == "bcast":
            self.emit("i, j = n[:, None], n[None, :]")
        elif form == "view":
            self.emit("i, j = n.view(-1, 1), n.view(1, -1)")
        elif form == "meshgrid":
            self.emit("i, j = torch.meshgrid(n, n, indexing='ij')")
        else:
            self.emit("j, i = n[:, None], n[None, :]  # swapped: anti-causal")
            self.hazard("i and j swapped (anti-causal)")
        return dt, hi, scale

    # -- the causal condition (a bool tensor) over i, j; returns its name
    def condition(self, T, scale):
        kind = self.pick("cmp", "cmp", "cmp", "tri", "tri")
        if kind == "tri":
            diag = self.pick(0, -1, 1, w=[8, 1, 1])
            sp = self.pick("tril", "not_triu", "triu_T", "tril_bool", w=[3, 3, 1, 3])
            if sp == "tril":
                self.emit(f"c = torch.ones(T, T).tril({diag}).bool()" if diag else "c = torch.ones(T, T).tril().bool()")
            elif sp == "tril_bool":
                self.emit(f"c = torch.ones(T, T, dtype=torch.bool).tril(diagonal={diag})")
            elif sp == "not_triu":
                self.emit(f"c = ~torch.ones(T, T, dtype=torch.bool).triu({diag + 1})")
            else:
                self.emit(f"c = torch.ones(T, T, dtype=torch.bool).triu({-diag}).T")
            if diag:
                self.hazard(f"diagonal {diag}")
            return "c", False
        d1 = self.pick(0, 1, -1, w=[10, 1, 1])
        op = self.pick(">=", "<=", ">", "<", "==", w=[6, 3, 2, 2, 1])
        # the exact condition on integers is i - j >= 0 ...
        if op == ">=":
            expr, off = "i >= j", 0
        elif op == "<=":
            expr, off = "j <= i", 0
        elif op == ">":
            expr, off = self.pick(("i > j - 1", 0), ("i + 1 > j", 0), ("i > j", 1)) if scale == 1 else ("i > j", 1)
        elif op == "<":
            expr, off = self.pick(("j < i + 1", 0), ("j < i", 1)) if scale == 1 else ("j < i", 1)
        else:
            expr, off = "(i - j).clamp(min=-1) == (i - j)", 0  # == -1 above: not exact for non-causal
            self.hazard("== based condition (i - j) >= -1")
            off = -1
        if d1:
            expr = f"i + {d1} >= j" if op != "<=" else f"j - {d1} <= i"
            off = math.ceil(-d1 / scale)
        self.emit(f"c = {expr}")
        if off:
            self.hazard(f"condition is i - j >= {off}, not i >= j")
        return "c", True

    # -- the decay weights as a float tensor (before masking)
    def decay(self, T, H, scale, qdt):
        kind = self.pick("none", "pow_const", "pow_buf", "exp_const", "exp2", "alibi", "exp_param", "segsum",
                         "exp_cleaned", w=[2, 2, 3, 2, 1, 2, 2, 2, 2])
        if kind == "none":
            self.emit(self.pick("w = torch.ones(T, T)", "w = torch.ones(T, T, dtype=torch.float64)",
                                "w = torch.ones((), dtype=torch.float64).expand(T, T)"))
            return "w", torch.float64 if "64" in self.lines[-1] else torch.float32, None
        if kind == "segsum":  # a data-dependent per-position log decay
            self.emit("a = -F.softplus(q.sum(-1))")
            self.emit("cs = torch.cumsum(a, dim=-1)")
            if self.chance(0.5):
                self.emit("w = torch.exp(cs[..., :, None] - cs[..., None, :])")
            else:
                self.emit("w = torch.exp(cs[..., None, :] - cs[..., :, None]).transpose(-1, -2)")
            return "w", qdt, "BH"
        fdt = self.pick(torch.float32, torch.float64, torch.float16, torch.bfloat16, w=[6, 6, 1, 1])
        dist = self.pick("i - j", "(i - j).clamp(min=0)", "-(j - i)", "(i - j).abs()", "i + j", w=[6, 3, 2, 1, 1])
        if dist == "i + j":
            self.hazard("decay on i + j")
        self.emit(f"d = ({dist}).to({_DT[fdt]})")
        if scale * (T - 1) > _EXACT[fdt]:
            self.hazard(f"distances up to {scale * (T - 1)} are not exact in {fdt}")
        if fdt in (torch.float16, torch.bfloat16):
            self.hazard(f"decay computed in {fdt}")
        lim = {torch.float32: 88, torch.float64: 709, torch.float16: 11, torch.bfloat16: 88}[fdt]
        dmax = scale * (T - 1)
        if kind == "pow_const":
            g = self.pick(0.9, 0.5, 0.99, 1.0, 1.5, 0.0, -0.5, w=[6, 2, 2, 1, 1, 1, 1])
            if g <= 0:
                self.hazard(f"pow base {g}")
            if g > 1 and dmax * math.log(g) > lim:
                self.hazard("pow overflows")
            if self.chance(0.5):
                self.emit(f"w = {g} ** d")
            else:
                self.emit(f"w = torch.pow(torch.tensor({g}, dtype=d.dtype), d)")
            return "w", fdt, None
        if kind == "pow_buf":
            vals = self.pick("retnet", "with_zero", "with_negative", "above_one", w=[6, 1, 1, 1])
            if vals == "retnet":
                g = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
            elif vals == "with_zero":
                g = torch.tensor(([0.9, 0.0, 0.5, 1.0] * H)[:H], dtype=torch.float64)
                if H > 1:
                    self.hazard("gamma buffer holds 0")
            elif vals == "with_negative":
                g = torch.tensor(([-0.5, 0.9, 0.5, 0.7] * H)[:H], dtype=torch.float64)
                self.hazard("gamma buffer holds a negative value")
            else:
                g = torch.tensor(([1.1, 0.9, 1.01, 0.5] * H)[:H], dtype=torch.float64)
                if dmax * math.log(1.1) > lim:
                    self.hazard("gamma > 1 overflows")
            if vals == "retnet" and self.chance(0.2):  # a 0-d gamma buffer
                b = self.buffer(g[0].to(self.pick(torch.float32, torch.float64)))
                self.emit(f"w = {b}.to(d.dtype) ** d")
                return "w", fdt, None
            b = self.buffer(g.to(self.pick(torch.float32, torch.float64)))
            self.emit(f"w = {b}.to(d.dtype)[:, None, None] ** d")
            return "w", fdt, "H"
        if kind == "exp_const":
            c = self.pick(-0.05, -0.3, -1.0, 0.1, 3.0, -200.0, w=[3, 2, 1, 1, 1, 1])
            if c * dmax > lim:
                self.hazard("exp overflows")
            self.emit(f"w = torch.exp({c} * d)")
            return "w", fdt, None
        if kind == "exp_cleaned":  # a growing exp whose overflow is "cleaned" (changes eager's values)
            c = self.pick(12.0, 3.0, 0.5, w=[3, 2, 1])
            self.emit(f"w = torch.exp({c} * d)")
            cleanup = self.pick("w = torch.nan_to_num(w, posinf=0.0)", "w = torch.nan_to_num(w)",
                                "w = torch.where(torch.isinf(w), 0.0, w)", "w = w.clamp(max=1e30)", w=[3, 2, 1, 1])
            if fdt == torch.float16:  # a bound float16 holds (eager raises on 1e30 there)
                cleanup = cleanup.replace("1e30", "6e4")
            self.emit(cleanup)
            self.uncounted.append("a cleanup of exp overflow (nan_to_num / isinf / clamp)")
            if c * dmax > lim:
                self.hazard("exp overflow, then cleaned")
            return "w", fdt, None
        if kind == "exp2":
            c = self.pick(-0.25, -1.0, -0.01, 0.5)
            if c * dmax > lim * 1.44:
                self.hazard("exp2 overflows")
            self.emit(f"w = torch.exp2({c} * d)")
            return "w", fdt, None
        if kind == "alibi":
            self.emit(f"slopes = 2.0 ** (-8.0 * torch.arange(1, {H} + 1, dtype=d.dtype) / {H})")
            self.emit("w = torch.exp(-slopes[:, None, None] * d)")
            return "w", fdt, "H"
        p = torch.linspace(-3, 1, H, dtype=torch.float64).to(torch.float32)
        b = self.buffer(p)
        self.emit(f"w = torch.exp(-F.softplus({b}).to(d.dtype)[:, None, None] * d)")
        return "w", fdt, "H"

    # -- torchscale's row normalisations (issue 10): of the mask, and of the scores
    def row_normalisation(self):
        how = self.r_rows.choices([None, "sum", "sqrt", "eps", "cols", "partial", "minus1"],
                                  weights=[14, 2, 2, 1, 1, 1, 1])[0]
        if how == "sum":
            self.emit("M = M / M.sum(dim=-1, keepdim=True)")
        elif how == "sqrt":
            self.emit("M = M / M.sum(dim=-1, keepdim=True).sqrt()")
        elif how == "eps":
            self.emit("M = M / (M.sum(-1, keepdim=True) + 1e-6)")
        elif how == "cols":
            self.emit("M = M / M.sum(dim=-2, keepdim=True).clamp(min=1e-6)")
            self.hazard("normalised by column sums")
        elif how == "partial":
            self.emit("M = M / (M[..., :1].sum(-1, keepdim=True) + 1)")
            self.uncounted.append("a row factor from one column of the mask")
        elif how == "minus1":
            self.emit("M = M / (M.sum(-1, keepdim=True) - 1)")
            self.hazard("row sum - 1 is 0 in row 0")

    def scores_normalisation(self, prod):
        how = self.r_rows.choices([None, "detach_abs_clamp", "abs_clamp", "abs_sum", "abs_only"],
                                  weights=[12, 2, 1, 1, 1])[0]
        if how is None:
            return prod
        self.emit(f"P = {prod}")
        if how == "detach_abs_clamp":
            self.emit("P = P / P.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)")
        elif how == "abs_clamp":
            self.emit("P = P / P.sum(-1, keepdim=True).abs().clamp(min=1)")
        elif how == "abs_sum":
            self.emit("P = P / P.detach().abs().sum(-1, keepdim=True).clamp(min=1)")
            self.uncounted.append("a row sum of |scores| (not bilinear in q, k)")
        else:
            self.emit("P = P / P.sum(-1, keepdim=True).abs()")
            self.uncounted.append("division by |row sum of the scores|, which may be 0")
        return "P"

    def program(self):
        T = self.pick(1, 2, 5, 17, 64, 300, w=[1, 2, 3, 4, 3, 1])
        H = self.pick(1, 2, 4, w=[1, 1, 3])
        B = self.pick(1, 2, w=[1, 1])
        D = self.pick(2, 4, 8)
        qdt = self.pick(torch.float64, torch.float32, w=[4, 1])
        self.emit(f"T = q.shape[2]")
        pos_dt, hi, scale = self.positions(T)
        cond, _ = self.condition(T, scale)
        w, wdt, per = self.decay(T, H, scale, qdt)
        cdts = [qdt, wdt]
        # combine weights and condition
        how = self.pick("where", "masked_fill", "mul_bool", "mul_float", "exp_where_log", "exp_fill_log",
                        "tril_of_w", "fill_inf_nan_to_num", w=[6, 5, 1, 1, 1, 1, 1, 1])
        if how == "where":
            self.emit(f"M = torch.where({cond}, {w}, 0.0)")
        elif how == "masked_fill":
            self.emit(f"M = {w}.masked_fill(~{cond}, 0)")
        elif how in ("mul_bool", "mul_float"):
            self.emit(f"M = {w} * {cond}" if how == "mul_bool" else f"M = {w} * {cond}.to({w}.dtype)")
            self.uncounted.append("w * mask: 0 * inf above the diagonal unless w is bounded there")
        elif how == "exp_where_log":
            self.emit(f"M = torch.exp(torch.where({cond}, torch.log({w}), -inf))")
        elif how == "exp_fill_log":
            self.emit(f"M = torch.exp(torch.log({w}).masked_fill(~{cond}, -inf))")
        elif how == "tril_of_w":
            self.emit(f"M = torch.where({cond}, {w}, 0.0).tril()")
        else:
            self.emit(f"M = torch.nan_to_num({w}.masked_fill(~{cond}, inf), posinf=0.0)")
        # scaling
        sc = self.pick(None, None, 0.125, 1e30, 1e-30, "tensor", "pair", w=[6, 0, 2, 1, 1, 1, 1])
        if sc == 1e-30 and wdt == torch.float16:
            self.hazard("1e-30 underflows in float16")
        if sc == "tensor":
            self.emit("M = M * torch.tensor(0.5)")
        elif sc == "pair":
            self.emit("M = M * 1e-30 * 1e-30 * 1e30 * 1e30")
            if wdt != torch.float64:
                self.hazard("constant product underflows")
        elif sc is not None:
            self.emit(f"M = M * {sc}")
            if sc == 1e30 and wdt == torch.float16:
                self.hazard("scale overflows 16 bits")
        # post ops
        post = self.pick(None, "nan_to_num", "clamp0", "clamp_nan", "cast16", "cast32", "cast64",
                         w=[12, 1, 1, 1, 1, 1, 1])
        if post == "nan_to_num":
            self.emit("M = torch.nan_to_num(M)")
        elif post == "clamp0":
            self.emit("M = M.clamp(min=0)")
        elif post == "clamp_nan":
            self.emit("M = M.clamp(min=nan)")
            self.hazard("clamp(min=nan)")
        elif post == "cast16":
            dt = self.pick(torch.float16, torch.bfloat16)
            self.emit(f"M = M.to({_DT[dt]})")
            self.hazard(f"mask values cast to {dt}")
            cdts.append(dt)
        elif post == "cast32":
            self.emit("M = M.float()")
            cdts.append(torch.float32)
        elif post == "cast64":
            self.emit("M = M.double()")
        self.row_normalisation()
        # batch shape of the mask
        bs = self.pick("as_is", "unsqueeze", "expand_B", "expand_bigger", "ones_batch", w=[5, 2, 2, 1, 1])
        if bs == "unsqueeze":
            self.emit("M = M.unsqueeze(0)")
        elif bs == "expand_B":
            self.emit("M = M.expand(q.shape[0], q.shape[1], T, T)" if per != "BH" else "M = M.expand(q.shape[0], q.shape[1], T, T)")
        elif bs == "expand_bigger":
            if B == 1:
                self.emit("M = M.expand(3, q.shape[1], T, T)")
            else:
                self.emit("M = M.expand(q.shape[0], q.shape[1], T, T)[None].expand(2, -1, -1, -1, -1)")
            self.hazard("mask batch larger than q's")
        elif bs == "ones_batch":
            self.emit("M = M * torch.ones(2, 1, 1, 1)" if B == 1 else "M = M * torch.ones(2, 1, 1, 1, 1)")
            self.hazard("mask batch larger than q's")
        if qdt == torch.float32:
            self.emit(self.pick("M = M.to(q.dtype)", "M = M.type_as(q)"))
        # scores and output
        sv = self.pick("matmul", "mT", "einsum", "scale_q", "scale_s", "div_s")
        if sv == "matmul":
            self.emit("s = q @ k.transpose(-1, -2)")
        elif sv == "mT":
            self.emit("s = torch.matmul(q, k.mT)")
        elif sv == "einsum":
            self.emit("s = torch.einsum('bhid,bhjd->bhij', q, k)")
        elif sv == "scale_q":
            self.emit("s = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)")
        elif sv == "scale_s":
            self.emit("s = (q @ k.transpose(-1, -2)) * 0.25")
        else:
            self.emit("s = (q @ k.transpose(-1, -2)) / 3.0")
        order = self.pick("s*M", "M*s")
        prod = "s * M" if order == "s*M" else "M * s"
        prod = self.scores_normalisation(prod)
        if self.chance(0.2):
            five_d = bs in ("expand_bigger", "ones_batch") or (per == "BH" and bs == "unsqueeze")
            eq = "'...ij,...jd->...id'" if five_d or self.chance(0.3) else "'bhij,bhjd->bhid'"
            self.emit(f"return torch.einsum({eq}, {prod}, v)")
        else:
            self.emit(f"return ({prod}) @ v")
        src = "def fn(q, k, v, *bufs):\n" + "\n".join(self.lines) + "\n"
        rtol = 1e-6 if all(d == torch.float64 for d in cdts) else 1e-4
        if T == 1:
            self.uncounted.append("T = 1")
        return Program(src, (B, H, T, D), qdt, self.buffers, self.hazards, self.seed, rtol, self.uncounted)




def shrink(p, budget=200):
    """A smaller program of the same failure kind: drops body lines one at a time
    (keeping each drop that still fails the same way), then tries smaller shapes."""
    import itertools

    def fails(q):
        try:
            o = q.check()
        except Exception:
            return False
        return not o.ok and o.kind == kind

    kind = p.check().kind
    if not kind:
        return p
    lines = p.source.splitlines()
    k, tries = 2, 0
    while k < len(lines) - 1 and tries < budget:
        cand = lines[:k] + lines[k + 1:]
        q = dataclasses.replace(p, source="\n".join(cand) + "\n")
        tries += 1
        if fails(q):
            lines, p = cand, q
        else:
            k += 1
    if p.hazards and not p.hazards[0].startswith("(before shrinking)"):
        p = dataclasses.replace(p, hazards=["(before shrinking) " + h for h in p.hazards])
    B, H, T, D = p.shape
    for b, t, d in itertools.product(sorted({1, B}), sorted({2, 5, 8, T}), sorted({2, D})):
        if (b, t, d) >= (B, T, D) or t > T:
            continue
        q = dataclasses.replace(p, shape=(b, H, t, d))
        if fails(q):
            return q
    return p


def generate(seed):
    """The program of one seed (deterministic)."""
    return _Gen(seed).program()


def main(argv=None):
    """A long fuzz run from the command line, with progress: every program of the seeds
    [start, stop) through check(); each unsound one is printed as source.

        python tests/pass_fuzz.py 20000 60000      # about 25 programs/s on one core
    """
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("start", type=int)
    ap.add_argument("stop", type=int)
    ap.add_argument("--every", type=int, default=500, help="print progress every N programs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, bad, rewritten = time.time(), 0, 0
    for n, seed in enumerate(range(args.start, args.stop), 1):
        p = generate(seed)
        o = p.check()
        rewritten += o.rewrites > 0
        if not o.ok:
            bad += 1
            print(f"seed {seed}: {o.kind}: {o.failure}\n{p.describe()}\n", flush=True)
        if n % args.every == 0 or seed == args.stop - 1:
            print(f"[{n} programs, {rewritten} rewritten, {bad} unsound, {time.time() - t0:.0f} s]", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
