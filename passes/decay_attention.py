"""Finds ``(q @ k^T) * M @ v`` on ATen IR, proves M is a causal decay mask, and
rewrites the site into ``torch.ops.leet.decay_attn``.

Matching is structural only for the two contractions (matmul, bmm, mm, einsum).
Everything between them -- the product of the scores with the mask, scales, casts,
views -- and the whole producer subgraph of the mask is *interpreted* by
:class:`MaskInterpreter` as a function of symbolic indices (see symbolic.py).  The
site is rewritten only if the interpretation yields, for every b, h, i, j::

    P[b, h, i, j] = scores(q_i, k_j) * m * [j <= i] * exp(c_h * (i - j) + C_{b,h,i} - C_{b,h,j})

with C a cumsum over positions of a graph tensor.  ``log_decay`` is then built as a
graph expression (``c_h`` as [H], or ``a + c_h`` as [B, H, T] when C = cumsum(a)).
"""
import dataclasses
import math
import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import symbolic as S
from .symbolic import Unproven

aten = torch.ops.aten
CONTRACTIONS = {aten.matmul, aten.bmm, aten.mm, aten.einsum}
POS = ("i", "j")


# ---------------------------------------------------------------- small helpers


def val(n):
    """The fake value of a node (make_fx / export: "val"; dynamo: "example_value")."""
    if not isinstance(n, torch.fx.Node):
        return n
    return n.meta.get("val", n.meta.get("example_value"))


def shape(n):
    v = val(n)
    if not isinstance(v, torch.Tensor):
        raise Unproven(f"no tensor metadata on {getattr(n, 'name', n)}")
    return tuple(v.shape)


def is_one(s):
    return isinstance(s, int) and s == 1 or (not isinstance(s, int) and statically_known_true(s == 1))


def same(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def packet(n):
    t = getattr(n, "target", None)
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else None


def is_contraction(n):
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and packet(n) in CONTRACTIONS


def bcast(n, out_roles):
    """Roles of tensor n's dims when n is broadcast to a result with out_roles."""
    if not isinstance(n, torch.fx.Node):
        return ()
    shp = shape(n)
    k = len(out_roles) - len(shp)
    if k < 0:
        raise Unproven("broadcast to fewer dims")
    return tuple(None if is_one(s) else out_roles[k + d] for d, s in enumerate(shp))


_VIEW_NOOP = {aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy, aten.lift_fresh}
_CASTS = {aten._to_copy, aten.to, aten.type_as}


def _is_mutating(n):
    t = getattr(n, "target", None)
    return isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


def _written_arg(n):
    """The argument an in-place op writes (its first mutable argument)."""
    for k, a in enumerate(n.target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return n.args[k] if k < len(n.args) else n.kwargs.get(a.name)
    return None


def _alias_base(x):
    """The node x may share storage with, or None.  Read from the op schema (any
    argument with alias info: views, split/unbind/chunk, a no-op ``to``, the written
    input of in-place and out= ops), so no list of view ops can miss one."""
    if not isinstance(x, torch.fx.Node) or x.op != "call_function":
        return None
    if x.target is operator.getitem:  # an element of split / unbind / chunk
        src = x.args[0]
        return src if _alias_base(src) is not None else None
    if not isinstance(x.target, torch._ops.OpOverload):
        return None
    for k, a in enumerate(x.target._schema.arguments):
        if a.alias_info is not None:
            arg = x.args[k] if k < len(x.args) else x.kwargs.get(a.name)
            return arg if isinstance(arg, torch.fx.Node) else None
    return None


def _alias_class(n):
    """Nodes that may share storage with n (connected through _alias_base)."""
    seen, todo = {n}, [n]
    while todo:
        x = todo.pop()
        nbrs = [u for u in x.users if _alias_base(u) is x]
        b = _alias_base(x)
        if b is not None:
            nbrs.append(b)
        for y in nbrs:
            if y not in seen:
                seen.add(y)
                todo.append(y)
    return seen


def check_mutations(modeled, opaque, reads, anchor, order):
    """Unproven if an in-place op may make the proof or the operator see a value that
    eager did not.

    ``modeled``: nodes whose values the proof computed from their producers (from
    their creation to their last use in the site, nothing may write them);
    ``opaque``: nodes the proof took as they are (graph values, data), read by the site
    (nothing may write them between their first and last use there); ``reads``: the
    nodes the operator call reads at ``anchor`` (q, k, v, decay tensors), whose values
    must stay as the site saw them up to the anchor.  Graph inputs may alias each
    other at run time, so for a node viewing an input, a write to any input counts."""
    end = order[anchor]
    writes = [u for u in anchor.graph.nodes if order.get(u, end) < end and _is_mutating(u)]
    if not writes:
        return
    inside = modeled | opaque | {anchor}
    for x in modeled | opaque | reads:
        uses = [order[u] for u in x.users if u in inside]
        if not uses:
            continue
        first = order[x] if x in modeled else min(uses)
        last = end if x in reads else max(uses)
        cls = _alias_class(x)
        from_input = any(y.op == "placeholder" for y in cls)
        for u in writes:
            if u is x or not first < order[u] < last:
                continue
            w = _written_arg(u)
            if w in cls or (from_input and isinstance(w, torch.fx.Node) and
                            any(y.op == "placeholder" for y in _alias_class(w))):
                raise Unproven(f"{x.name} is mutated in place by {u.name} while the site reads it")


# ---------------------------------------------------------------- interpreter


class MaskInterpreter:
    """Evaluates graph nodes as piecewise index expressions (symbolic.py).

    ``ev(node, roles)`` gives the value of ``node`` whose dims have the given roles
    (b, h, bh, i, j or None for a broadcast size-1 dim).  It records the scores
    contraction it meets (``self.scores``) and the size of h when a view splits a
    merged B*H dim (``self.h_split``)."""

    def __init__(self, order):
        self.order = order
        self.memo = {}
        self.scores = None
        self.h_split = None
        self.nodes = set()
        self.opaque = set()  # nodes taken as they are (graph values, per-position data)

    # -- entry points
    def ev(self, n, roles):
        if not isinstance(n, torch.fx.Node):
            if isinstance(n, (int, float, bool)):
                return S.pw_const(S.num(n))
            raise Unproven(f"unsupported argument {n!r}")
        roles = tuple(roles)
        key = (n, roles)
        if key not in self.memo:
            self.memo[key] = self._ev(n, roles)
            self.nodes.add(n)
        return self.memo[key]

    def arg(self, a, out_roles):
        if isinstance(a, torch.fx.Node) and not isinstance(val(a), torch.Tensor):
            return S.pw_const(S.aff(("node", a, ())))  # a SymInt / SymFloat scalar
        return self.ev(a, bcast(a, out_roles) if isinstance(a, torch.fx.Node) else ())

    def _ev(self, n, roles):
        has_pos = any(r in POS for r in roles)
        if not has_pos:
            c = self._constant(n)
            if c is None:
                self.opaque.add(n)
            return S.pw_const(S.num(c) if c is not None else S.aff(("node", n, roles)))
        if n.op != "call_function":
            if n.op == "get_attr":
                c = self._constant(n)
                if c is not None:
                    return S.pw_const(S.num(c))
                raise Unproven(f"{n.name} is a constant tensor that depends on positions")
            return self._leaf(n, roles)
        p = packet(n)
        h = _HANDLERS.get(p)
        if h is not None:
            return in_dtype(n, h(self, n, roles))
        if p in CONTRACTIONS:
            return self._contraction(n, roles)
        return self._leaf(n, roles)

    def _leaf(self, n, roles):
        pos = [r for r in roles if r in POS]
        if len(pos) != 1:
            what = n.target if n.op == "call_function" else f"the input {n.name}"
            raise Unproven(f"{what} gives a value that depends on both i and j (data-dependent mask)")
        self.opaque.add(n)
        key = (n, tuple("t" if r in POS else r for r in roles), False)
        return S.pw_const(S.aff(0.0, {("leaf", key, pos[0]): 1.0}))

    def _constant(self, n):
        """The value of a one-element constant (full, scalar_tensor, lifted constant)."""
        p = packet(n)
        if n.op == "get_attr":
            t = getattr(n.graph.owning_module, n.target, None) if n.graph.owning_module is not None else None
            if isinstance(t, torch.Tensor) and t.numel() == 1 and not isinstance(
                    t, torch._subclasses.FakeTensor):
                return t.item()
            return None
        if p in (aten.lift_fresh_copy, aten.lift_fresh, aten.clone, aten.detach) and isinstance(n.args[0], torch.fx.Node):
            return self._constant(n.args[0])
        c = None
        if p in (aten.full, aten.full_like, aten.new_full) and isinstance(n.args[-1], (int, float, bool)):
            c = n.args[-1]
        if p in (aten.ones, aten.ones_like, aten.new_ones):
            c = 1.0
        if p in (aten.zeros, aten.zeros_like, aten.new_zeros):
            c = 0.0
        if p == aten.scalar_tensor and isinstance(n.args[0], (int, float, bool)):
            c = n.args[0]
        if c is None or not isinstance(val(n), torch.Tensor):
            return c
        try:  # the value eager stores: full(0.5, dtype=int64) holds 0
            return torch.full((), c, dtype=val(n).dtype).item()
        except (RuntimeError, TypeError, OverflowError):
            return None

    # -- the scores contraction q . k
    def _contraction(self, n, roles):
        pos = [r for r in roles if r in POS]
        if len(pos) < 2:
            return self._leaf(n, roles)
        (a, ra), (b, rb), contracted = contraction_roles(n, roles)
        if contracted != 1:
            raise Unproven("the scores contract over more than one dim")
        pa = [r for r in ra if r in POS]
        pb = [r for r in rb if r in POS]
        if sorted(pa + pb) != ["i", "j"] or len(pa) != 1:
            raise Unproven(f"{n.name} is a contraction but not q @ k^T over positions")
        if pa == ["j"]:
            (a, ra), (b, rb) = (b, rb), (a, ra)
        found = (a, ra, b, rb, n)
        if self.scores is not None and self.scores != found:
            raise Unproven("two different scores contractions")
        self.scores = found
        return S.pw_const(("scores", S.ONE))


def _index_atoms(t):
    return t[0] == "aff" and any(k in S.POS_ATOMS for k, _ in t[2])


def _t_bool(t):
    if t[0] == "num":
        return S.num(bool(t[1]))  # nan is True
    if t[0] == "isnan":
        return t
    raise Unproven(f"a bool tensor holding {S.kind(t)}")


def in_dtype(n, pw):
    """pw as a value of n's dtype (the interpretation computes in exact math).

    bool results saturate (True + True is True); integer results must be exact
    integers in range (no wrap, no truncation, no integer exp/pow overflow); positions
    are exact only in int32/int64 and float32/64 (a 16-bit float keeps distances
    i - j, not positions)."""
    v = val(n)
    if not isinstance(v, torch.Tensor):
        return pw
    dt = v.dtype
    if dt == torch.bool:
        return S.lift(_t_bool)(pw)
    if dt.is_complex:
        raise Unproven("a complex mask")
    if dt.is_floating_point:
        def overflow(t):  # a constant too large for the dtype is inf in eager
            if t[0] == "num" and math.isfinite(t[1]) and \
                    math.isinf(torch.tensor(t[1], dtype=torch.float64).to(dt).item()):
                return S.num(math.copysign(S.INF, t[1]))
            return t

        pw = S.lift(overflow)(pw)
        if dt.itemsize >= 4:
            return pw

        def narrow(t):
            # 16-bit floats round integers above 256 (bf16) / 2048 (fp16).  A distance
            # d = i - j may pass: rounding keeps its order and the small integers where
            # a causal mask has its boundary.  Positions i, j may not: rounded apart,
            # i > j can come out as i == j.
            if not _index_atoms(t):
                return t
            c0, atoms = S.as_aff(t)
            if not (S.is_float(c0) and c0 == 0 and
                    S.cadd(atoms.get(("i",), 0.0), atoms.get(("j",), 0.0)) == 0.0):
                raise Unproven(f"positions in {dt} (not exact beyond 256 or 2048)")
            return t

        return S.lift(narrow)(pw)
    info = torch.iinfo(dt)
    wide = dt in (torch.int32, torch.int64)
    for lo, hi, t in pw:
        if t[0] == "num":
            ok = math.isfinite(t[1]) and t[1] == int(t[1]) and info.min <= t[1] <= info.max
        elif t[0] == "aff":
            c0, atoms = S.as_aff(t)
            ok = (wide or not _index_atoms(t)) and S.INEXACT not in atoms and \
                all(not S.is_float(c) or c == int(c) for c in [c0, *atoms.values()])  # recipes: int graph values
        else:
            ok = False
        if not ok:
            raise Unproven(f"{S.kind(t)} in {dt} (integer arithmetic may wrap or truncate)")
    return pw


def contraction_roles(n, out_roles):
    """((a, roles_a), (b, roles_b), number of contracted dims) of a contraction node
    with the given output roles; the contracted dim has role "c"."""
    p = packet(n)
    if p == aten.einsum:
        eq, ops = n.args[0], n.args[1]
        if len(ops) != 2:
            raise Unproven("einsum with other than two operands")
        ins, out = _einsum_letters(eq, [len(shape(o)) for o in ops])
        letter_role = dict(zip(out, out_roles))
        contracted = (set(ins[0]) & set(ins[1])) - set(out)
        if (set(ins[0]) ^ set(ins[1])) - set(out) or len(set(ins[0])) != len(ins[0]) or \
                len(set(ins[1])) != len(ins[1]):
            raise Unproven("einsum with a summed or repeated index")
        res = []
        for o, letters in zip(ops, ins):
            shp = shape(o)
            res.append((o, tuple("c" if L in contracted else (None if is_one(s) else letter_role[L])
                                 for L, s in zip(letters, shp))))
        return res[0], res[1], len(contracted)
    a, b = n.args[0], n.args[1]
    sa, sb = shape(a), shape(b)
    if len(sa) < 2 or len(sb) < 2:
        raise Unproven("matmul of a vector")
    batch = out_roles[:-2]
    ra = bcast_batch(sa[:-2], batch) + (out_roles[-2], "c")
    rb = bcast_batch(sb[:-2], batch) + ("c", out_roles[-1])
    return (a, ra), (b, rb), 1


def bcast_batch(shp, batch):
    k = len(batch) - len(shp)
    return tuple(None if is_one(s) else batch[k + d] for d, s in enumerate(shp))


def _einsum_letters(eq, ndims):
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    spare = iter(L for L in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if L not in eq)  # never a letter of eq
    # the ellipsis stands for the most dims any operand gives it, right-aligned
    n_ell = max((nd - (len(s) - 3) for s, nd in zip(ins, ndims) if "..." in s), default=None)
    ell = None if n_ell is None else [next(spare) for _ in range(n_ell)]
    res = []
    for s, nd in zip(ins, ndims):
        if "..." in s:
            k = nd - (len(s) - 3)
            s = s.replace("...", "".join(ell[len(ell) - k:]))
        res.append(s)
    if "->" not in eq:
        letters = "".join(res)
        ell_letters = "".join(ell or [])  # implicit output: the ellipsis dims, then the sorted single letters
        rhs = ell_letters + "".join(sorted(L for L in set(letters) if letters.count(L) == 1 and L not in ell_letters))
    elif "..." in rhs:
        rhs = rhs.replace("...", "".join(ell or []))
    return res, rhs


# ---------------------------------------------------------------- op handlers

_HANDLERS = {}


def handles(*packets):
    def deco(fn):
        for p in packets:
            _HANDLERS[p] = fn
        return fn
    return deco


def _binary(fn):
    def h(self, n, roles):
        a = self.arg(n.args[0], roles)
        b = self.arg(n.args[1], roles)
        return fn(self, n, a, b)
    return h


@handles(aten.add, aten.sub, aten.rsub)
def _h_addsub(self, n, roles):
    a, b = self.arg(n.args[0], roles), self.arg(n.args[1], roles)
    alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
    if not isinstance(alpha, (int, float)):
        raise Unproven("non-constant alpha")
    if alpha != 1:
        b = S.pw_mul(b, S.pw_const(S.num(alpha)))
    p = packet(n)
    if p == aten.add:
        return S.pw_add(a, b)
    if p == aten.rsub:
        a, b = b, a
    return S.pw_add(a, S.pw_neg(b))


@handles(aten.mul)
def _h_mul(self, n, roles):
    return S.pw_mul(self.arg(n.args[0], roles), self.arg(n.args[1], roles))


@handles(aten.div, aten.true_divide)
def _h_div(self, n, roles):
    if n.kwargs.get("rounding_mode") is not None:
        raise Unproven("division with rounding")
    return S.pw_mul(self.arg(n.args[0], roles), S.pw_recip(self.arg(n.args[1], roles)))


@handles(aten.reciprocal)
def _h_recip(self, n, roles):
    return S.pw_recip(self.arg(n.args[0], roles))


@handles(aten.neg)
def _h_neg(self, n, roles):
    return S.pw_neg(self.arg(n.args[0], roles))


@handles(aten.exp)
def _h_exp(self, n, roles):
    return S.pw_exp(self.arg(n.args[0], roles))


@handles(aten.exp2)
def _h_exp2(self, n, roles):
    return S.pw_map(lambda lo, hi, t: S.t_exp(t, math.log(2.0)), self.arg(n.args[0], roles))


@handles(aten.log)
def _h_log(self, n, roles):
    return S.pw_log(self.arg(n.args[0], roles))


@handles(aten.pow)
def _h_pow(self, n, roles):
    return S.pw_pow(self.arg(n.args[0], roles), self.arg(n.args[1], roles))


@handles(aten.ge, aten.gt, aten.le, aten.lt, aten.eq, aten.ne)
def _h_cmp(self, n, roles):
    op = packet(n).__name__.split(".")[-1]
    a0, a1 = n.args[0], n.args[1]
    if a0 is a1 and op in ("eq", "ne"):  # x != x is isnan(x)
        x = self.arg(a0, roles)
        return S.pw_map(lambda lo, hi, t: S.t_isnan(t, op == "ne", a0), x)
    return S.pw_cmp(op, self.arg(a0, roles), self.arg(a1, roles))


@handles(aten.isnan)
def _h_isnan(self, n, roles):
    return S.pw_map(lambda lo, hi, t: S.t_isnan(t, True, n.args[0]), self.arg(n.args[0], roles))


@handles(aten.logical_not, aten.bitwise_not)
def _h_not(self, n, roles):
    if val(n).dtype != torch.bool:
        raise Unproven("bitwise not of a non-bool tensor")
    return S.pw_not(self.arg(n.args[0], roles))


@handles(aten.logical_and, aten.bitwise_and, aten.logical_or, aten.bitwise_or)
def _h_andor(self, n, roles):
    is_and = packet(n) in (aten.logical_and, aten.bitwise_and)
    if packet(n) in (aten.bitwise_and, aten.bitwise_or) and val(n).dtype != torch.bool:
        raise Unproven("bitwise op on a non-bool tensor")

    def one(a, b):
        if a[0] != "num" or b[0] != "num":
            raise Unproven("logical op on a non-constant condition")
        return S.num(bool(a[1]) and bool(b[1]) if is_and else bool(a[1]) or bool(b[1]))

    return S.lift(one)(self.arg(n.args[0], roles), self.arg(n.args[1], roles))


def _cleans_itself(cond, x):
    """Unproven unless every isnan test in cond is of node x, the tensor whose nan
    the select replaces (where(isnan(X), 0, Y) with X != Y keeps Y's nan)."""
    for _, _, t in cond:
        if t[0] == "isnan" and t[3] is not x:
            raise Unproven("a select on isnan of another tensor than the one it cleans")


@handles(aten.where)
def _h_where(self, n, roles):
    if len(n.args) != 3:
        raise Unproven("where with one argument")
    c, a, b = (self.arg(x, roles) for x in n.args)
    if any(t[0] == "isnan" for _, _, t in c):
        kept = [x for x, pw in ((n.args[1], a), (n.args[2], b))
                if not all(t[0] == "num" for _, _, t in pw)]
        _cleans_itself(c, kept[0] if len(kept) == 1 else None)
    return S.pw_where(c, a, b)


@handles(aten.masked_fill)
def _h_masked_fill(self, n, roles):
    x, m, v = (self.arg(a, roles) for a in n.args[:3])
    _cleans_itself(m, n.args[0])
    return S.pw_where(m, v, x)


@handles(aten.index_put, aten.index_put_)
def _h_index_put(self, n, roles):
    x, idx, v = n.args[0], n.args[1], n.args[2]
    acc = n.kwargs.get("accumulate", n.args[3] if len(n.args) > 3 else False)
    if acc or len(idx) != 1 or not isinstance(idx[0], torch.fx.Node) or val(idx[0]).dtype != torch.bool \
            or len(shape(idx[0])) != len(shape(x)) or len(shape(v)) not in (0,) and not isinstance(v, (int, float)):
        raise Unproven("index_put that is not x[bool_mask] = scalar")
    if not all(same(a, b) for a, b in zip(shape(idx[0]), shape(x))):
        raise Unproven("index_put with a broadcast mask")
    cond = self.arg(idx[0], roles)
    _cleans_itself(cond, x)
    return S.pw_where(cond, self.arg(v, roles), self.arg(x, roles))


@handles(aten.nan_to_num)
def _h_nan_to_num(self, n, roles):
    args = list(n.args[1:]) + [None] * 3
    kw = n.kwargs
    nan = kw.get("nan", args[0] if args[0] is not None else 0.0)
    posinf = kw.get("posinf", args[1])
    neginf = kw.get("neginf", args[2])
    fin = torch.finfo(val(n).dtype) if val(n).dtype.is_floating_point else None
    posinf = posinf if posinf is not None else (fin.max if fin else S.INF)
    neginf = neginf if neginf is not None else (fin.min if fin else -S.INF)
    return S.pw_map(lambda lo, hi, t: S.t_nan_to_num(t, nan, posinf, neginf), self.arg(n.args[0], roles))


@handles(aten.clamp, aten.clamp_min, aten.clamp_max)
def _h_clamp(self, n, roles):
    p = packet(n)
    lo = hi = None
    if p == aten.clamp:
        lo = n.kwargs.get("min", n.args[1] if len(n.args) > 1 else None)
        hi = n.kwargs.get("max", n.args[2] if len(n.args) > 2 else None)
    elif p == aten.clamp_min:
        lo = n.args[1]
    else:
        hi = n.args[1]
    if not all(b is None or isinstance(b, (int, float)) for b in (lo, hi)):
        raise Unproven("clamp with tensor bounds")
    return S.pw_clamp(self.arg(n.args[0], roles), lo, hi)


@handles(aten.abs)
def _h_abs(self, n, roles):
    x = self.arg(n.args[0], roles)

    def one(lo, hi, t):
        if t[0] == "num":
            return S.num(abs(t[1]))
        out = []
        for a, b, c in S.t_cmp("ge", t, S.ZERO, lo, hi):
            out.append((a, b, t if c[1] else S.t_neg(t)))
        return out

    return S.pw_map(one, x)


def _tri(self, n, roles, lower):
    k = n.kwargs.get("diagonal", n.args[1] if len(n.args) > 1 else 0)
    if not isinstance(k, int):
        raise Unproven("tril/triu with a symbolic diagonal")
    row, col = roles[-2], roles[-1]
    x = self.arg(n.args[0], roles)
    if (row, col) == ("i", "j"):  # keep col - row <= k  <=>  d >= -k (tril)
        return S.pw_select_d(x, -k, S.INF) if lower else S.pw_select_d(x, -S.INF, -k)
    if (row, col) == ("j", "i"):  # col - row = d
        return S.pw_select_d(x, -S.INF, k) if lower else S.pw_select_d(x, k, S.INF)
    raise Unproven("tril/triu over dims that are not the two positions")


@handles(aten.tril)
def _h_tril(self, n, roles):
    return _tri(self, n, roles, True)


@handles(aten.triu)
def _h_triu(self, n, roles):
    return _tri(self, n, roles, False)


@handles(aten.arange)
def _h_arange(self, n, roles):
    args = [a for a in n.args]
    if n.target == aten.arange.default:
        start, step = 0, 1
    elif n.target == aten.arange.start:
        start, step = args[0], 1
    elif n.target == aten.arange.start_step:
        start = args[0]
        step = n.kwargs.get("step", args[2] if len(args) > 2 else 1)
    else:
        raise Unproven(f"unsupported {n.target}")
    if not isinstance(start, (int, float)) or not isinstance(step, (int, float)) or roles[0] not in POS:
        raise Unproven("arange with a symbolic start or step")
    return S.pw_const(S.aff(float(start), {(roles[0],): float(step)}))


@handles(aten.full, aten.full_like, aten.new_full, aten.ones, aten.ones_like, aten.new_ones,
         aten.zeros, aten.zeros_like, aten.new_zeros, aten.scalar_tensor)
def _h_fill(self, n, roles):
    c = self._constant(n)
    if c is None:
        raise Unproven("a fill with a non-constant value")
    return S.pw_const(S.num(c))


@handles(*_VIEW_NOOP)
def _h_noop(self, n, roles):
    return self.ev(n.args[0], roles)


@handles(aten.detach)
def _h_detach(self, n, roles):
    return S.pw_map(lambda lo, hi, t: _t_detach(t), self.ev(n.args[0], roles))


def _t_detach(t):
    if t[0] == "aff":
        atoms = {}
        for k, v in t[2]:
            if k[0] in ("cum", "leaf"):
                k = (k[0], (k[1][0], k[1][1], True), k[2])
            atoms[k] = S.cdetach(v)
        return S.aff(S.cdetach(t[1]), atoms)
    if t[0] == "exp":
        return ("exp", S.cdetach(t[1]), _t_detach(t[2]))
    if t[0] == "scores":
        raise Unproven("the scores are detached")
    return t


@handles(*_CASTS)
def _h_cast(self, n, roles):
    x = self.ev(n.args[0], bcast(n.args[0], roles) if packet(n) != aten.type_as else roles)
    dt = val(n).dtype
    if dt == torch.bool:
        def to_bool(t):
            if t[0] != "num":
                raise Unproven("a cast to bool of a non-constant")
            return S.num(bool(t[1]))
        return S.lift(to_bool)(x)
    if not dt.is_floating_point:
        def to_int(t):
            if t[0] == "num" and math.isfinite(t[1]) and t[1] == int(t[1]):
                return t
            f = S.as_aff(t)
            if f is not None and all(S.is_float(v) and v == int(v) for v in [f[0], *f[1].values()]) \
                    and all(k in (("i",), ("j",)) for k in f[1]):
                return t
            raise Unproven("a cast to an integer type that may truncate")
        return S.lift(to_int)(x)
    return x


@handles(aten.unsqueeze)
def _h_unsqueeze(self, n, roles):
    d = n.args[1] % len(roles)
    return self.ev(n.args[0], roles[:d] + roles[d + 1:])


@handles(aten.squeeze)
def _h_squeeze(self, n, roles):
    shp = shape(n.args[0])
    if len(n.args) == 1:
        dims = [d for d, s in enumerate(shp) if is_one(s)]
    else:
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        dims = [d % len(shp) for d in dims if is_one(shp[d % len(shp)])]
    it = iter(roles)
    return self.ev(n.args[0], tuple(None if d in dims else next(it) for d in range(len(shp))))


@handles(aten.expand)
def _h_expand(self, n, roles):
    return self.ev(n.args[0], bcast(n.args[0], roles))


@handles(aten.permute)
def _h_permute(self, n, roles):
    perm = [p % len(roles) for p in n.args[1]]
    r = [None] * len(roles)
    for k, p in enumerate(perm):
        r[p] = roles[k]
    return self.ev(n.args[0], r)


@handles(aten.transpose, aten.t)
def _h_transpose(self, n, roles):
    a, b = (n.args[1] % len(roles), n.args[2] % len(roles)) if len(n.args) > 1 else (0, 1)
    r = list(roles)
    r[a], r[b] = r[b], r[a]
    return self.ev(n.args[0], r)


@handles(aten.slice)
def _h_slice(self, n, roles):
    x = n.args[0]
    shp = shape(x)
    dim = (n.args[1] if len(n.args) > 1 else 0) % len(shp)
    start = n.args[2] if len(n.args) > 2 else None
    end = n.args[3] if len(n.args) > 3 else None
    step = n.args[4] if len(n.args) > 4 else 1
    full_end = end is None or (isinstance(end, int) and end >= 2 ** 62) or same(end, shp[dim])
    if start in (None, 0) and step == 1 and (full_end or roles[dim] in POS):
        return self.ev(x, roles)  # a prefix keeps each element's index
    raise Unproven("a slice that shifts positions")


@handles(aten.view, aten.reshape, aten._unsafe_view)
def _h_view(self, n, roles):
    x = n.args[0]
    return self.ev(x, view_in_roles(self, shape(x), shape(n), roles))


def view_in_roles(self, in_shape, out_shape, out_roles):
    """Roles of a view's input dims given its output roles (merging/splitting only
    size-1 dims and a B*H dim)."""
    ins = [(s, d) for d, s in enumerate(in_shape) if not is_one(s)]
    outs = [(s, r) for s, r in zip(out_shape, out_roles) if not is_one(s)]
    res = [None] * len(in_shape)
    a = b = 0
    while a < len(ins) and b < len(outs):
        (si, di), (so, ro) = ins[a], outs[b]
        if same(si, so):
            res[di] = ro
            a, b = a + 1, b + 1
        elif a + 1 < len(ins) and same(si * ins[a + 1][0], so) and ro in ("bh", None):
            res[di], res[ins[a + 1][1]] = "b", "h"
            _record_split(self, ins[a + 1][0])
            a, b = a + 2, b + 1
        elif b + 1 < len(outs) and same(so * outs[b + 1][0], si) and (ro, outs[b + 1][1]) == ("b", "h"):
            res[di] = "bh"
            _record_split(self, outs[b + 1][0])
            a, b = a + 1, b + 2
        else:
            raise Unproven("a view that mixes positions with other dims")
    if a != len(ins) or b != len(outs):
        raise Unproven("an unsupported view")
    return tuple(res)


def _record_split(self, h):
    if self.h_split is not None and not same(self.h_split, h):
        raise Unproven("inconsistent B*H splits")
    self.h_split = h


def _only_at(t, r, other):
    """Whether term t is a value of one position r (no other position, no scores)."""
    if t[0] == "num":
        return True
    if t[0] == "exp":
        return _only_at(t[2], r, other)
    f = S.as_aff(t)
    if f is None:
        return False
    return all((k[0] in ("leaf", "cum") and k[2] == r) or k in ((r,), S.INEXACT) for k in f[1])


@handles(aten.cumsum)
def _h_cumsum(self, n, roles):
    dim = n.args[1] % len(roles)
    r = roles[dim]
    if r not in POS:
        raise Unproven("cumsum over a dim that is not a position")
    x = self.ev(n.args[0], roles)
    other = "j" if r == "i" else "i"
    if len(x) == 1 and _only_at(x[0][2], r, other) and other not in roles:
        # a cumsum over positions of a per-position tensor a: C_r
        key = (n.args[0], tuple("t" if q in POS else q for q in roles), False)
        return S.pw_const(S.aff(0.0, {("cum", key, r): 1.0}))
    # the stable segment sum: x[i, j] = a_i * [i - j >= 1], summed over i
    if r == "i" and len(x) == 2 and x[0][1] == 0 and x[0][2] == S.ZERO and x[1][0] == 1:
        f = S.as_aff(x[1][2])
        if f is not None and S.is_float(f[0]) and f[0] == 0 and f[1] and \
                all(k[0] == "leaf" and k[2] == "i" for k, v in f[1].items()):
            atoms = {}
            for k, v in f[1].items():
                atoms[("cum", k[1], "i")] = v
                atoms[("cum", k[1], "j")] = S.cneg(v)
            return [(-S.INF, 0, S.ZERO), (1, S.INF, S.aff(0.0, atoms))]
    raise Unproven("cumsum of a masked value that is not a segment sum")


# ---------------------------------------------------------------- the canonical form


@dataclasses.dataclass
class Decay:
    """A proven mask: m * [j <= i] * exp(coef * (i - j) + sum_k w_k (C_k[i] - C_k[j]))."""

    m: object  # coefficient: float or recipe
    coef: object  # per-step log decay (coefficient)
    cums: dict  # key (node, roles, detached) -> weight (float)

    def describe(self):
        parts = []
        if not (S.is_float(self.coef) and self.coef == 0):
            parts.append(S.recipe_str(self.coef) + " (per head)")
        for (node, _, det), w in self.cums.items():
            parts.append((S.recipe_str(w) + "*" if w != 1 else "") + S.root_name(node) + (".detach()" if det else "") +
                         " (per position, cumsum)")
        return " + ".join(parts) if parts else "none (plain causal linear attention)"


def canonical(pw):
    """The :class:`Decay` of a mask given piecewise over d, or Unproven."""
    body = None
    diag = None
    for lo, hi, t in pw:
        if hi < 0:
            if t[0] == "zn":
                raise Unproven("0 * inf above the diagonal: the mask multiplies an overflowing "
                               "exp/pow by 0 (nan in eager at long lengths); use masked_fill or where")
            if t != S.ZERO and not (t[0] == "num" and t[1] == 0):
                raise Unproven(f"the mask is not zero above the diagonal (j > i) at d in [{lo}, {hi}]: "
                               f"{S.kind(t)}")
            continue
        if lo < 0:
            raise Unproven("the mask has the same value above the diagonal and on it "
                           "(not causal, or a diagonal offset)")
        if t[0] == "num" and t[1] == 0:
            raise Unproven(f"the mask is zero for d in [{lo}, {hi}] (a diagonal offset)")
        if lo == 0 and hi == 0:
            diag = t
            continue
        form = _exp_form(t)
        if body is None:
            body = form
        elif form != body:
            raise Unproven("the mask has different decay forms below the diagonal")
    if body is None:
        if diag is None:
            raise Unproven("the mask is zero everywhere")
        raise Unproven("the mask is only the diagonal")
    m, c0, coef, cums = body
    if diag is not None:
        dm, dc0, _, _ = _exp_form(diag, diag_only=True)
        if (dm, dc0) != (m, c0) and not (S.is_float(dm) and S.is_float(m) and S.is_float(dc0) and S.is_float(c0)
                                         and math.isclose(dm * math.exp(dc0), m * math.exp(c0), rel_tol=1e-12)):
            raise Unproven("the diagonal of the mask does not match its decay")
    return Decay(S.cmul(m, S.cexp(c0)), coef, cums)


def _exp_form(t, diag_only=False):
    """(m, c0, coef, cums) with t == m * exp(c0 + coef*(i - j) + sum w (C_i - C_j))."""
    if t[0] == "num":
        if not (t[1] > 0 and math.isfinite(t[1])):
            raise Unproven(f"the mask has the value {t[1]} below the diagonal")
        return t[1], 0.0, 0.0, {}
    if t[0] != "exp":
        raise Unproven(f"the mask is {S.kind(t)} below the diagonal, not a decay")
    m = t[1]
    f = S.as_aff(t[2])
    c0, atoms = f
    atoms.pop(S.INEXACT, None)  # rounding of the exponent only changes values slightly
    ci = atoms.pop(("i",), 0.0)
    cj = atoms.pop(("j",), 0.0)
    if S.cadd(ci, cj) != 0.0:
        raise Unproven("the decay exponent is not a function of i - j")
    cums = {}
    for (k, v) in atoms.items():
        if k[0] != "cum":
            raise Unproven("the decay exponent depends on data at one position only")
        cums.setdefault(k[1], {})[k[2]] = v
    out = {}
    for key, ws in cums.items():
        wi, wj = ws.get("i", 0.0), ws.get("j", 0.0)
        if S.cadd(wi, wj) != 0.0:
            raise Unproven("a cumsum that is not a segment sum C_i - C_j")
        out[key] = wi
    if diag_only:
        return m, c0, None, None
    return m, c0, ci, out


# ---------------------------------------------------------------- reports


@dataclasses.dataclass
class Site:
    """One rewritten site or near miss."""

    node: str
    source: str
    rewritten: bool
    reason: str = ""
    decay: str = ""
    scale: object = None

    def __str__(self):
        head = f"{'rewritten' if self.rewritten else 'left alone'}: {self.node}"
        if self.source:
            head += f" at {self.source}"
        if self.rewritten:
            return f"{head}\n    log_decay = {self.decay}; scale = {self.scale}"
        return f"{head}\n    reason: {self.reason}"


@dataclasses.dataclass
class RewriteReport:
    """What :func:`rewrite_decay_attention` did: ``rewrites`` and ``near_misses``."""

    rewrites: list = dataclasses.field(default_factory=list)
    near_misses: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"leet decay-attention pass: {len(self.rewrites)} rewritten, "
                 f"{len(self.near_misses)} left alone"]
        lines += ["  " + str(s).replace("\n", "\n  ") for s in self.rewrites + self.near_misses]
        return "\n".join(lines)

    def extend(self, other):
        self.rewrites += other.rewrites
        self.near_misses += other.near_misses


def source_of(n):
    """'file:line: code' of a node's innermost user frame, from its stack trace."""
    st = n.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in st.strip().splitlines()]
    for k in range(len(lines) - 1, -1, -1):
        if lines[k].startswith("File "):
            loc = lines[k]
            code = lines[k + 1] if k + 1 < len(lines) and not lines[k + 1].startswith("File ") else ""
            try:
                fname = loc.split('"')[1]
                line = loc.split("line ")[1].split(",")[0]
                loc = f"{fname}:{line}"
            except IndexError:
                pass
            return f"{loc}: {code}" if code else loc
    return ""


# ---------------------------------------------------------------- matching


@dataclasses.dataclass
class Match:
    out: torch.fx.Node  # the output contraction P @ v
    out_roles: tuple
    v: torch.fx.Node
    v_roles: tuple
    interp: MaskInterpreter
    decay: Decay


def _batch_names(k):
    return {0: (), 1: ("bh",), 2: ("b", "h")}.get(k)


def analyze(n, order):
    """Match + prove at the contraction n; returns a Match, None (not attention) or
    raises Unproven (a near miss)."""
    nd = len(shape(n))
    names = _batch_names(nd - 2)
    if names is None:
        return None
    candidates = []
    if packet(n) == aten.einsum:
        try:
            ins, out = _einsum_letters(n.args[0], [len(shape(o)) for o in n.args[1]])
        except Exception:
            return None
        if len(ins) != 2:
            return None
        free = [L for L in out if not (L in ins[0] and L in ins[1])]
        if len(free) != 2:
            return None
        batch_letters = [L for L in out if L in ins[0] and L in ins[1]]
        if len(batch_letters) != nd - 2:
            return None
        for p_idx in (0, 1):
            i_letter = next((L for L in free if L in ins[p_idx]), None)
            e_letter = next((L for L in free if L in ins[1 - p_idx]), None)
            if i_letter is None or e_letter is None:
                continue
            bn = dict(zip(batch_letters, names))
            out_roles = tuple(bn.get(L) or ("i" if L == i_letter else "e") for L in out)
            candidates.append((p_idx, out_roles))
    else:
        candidates.append((0, names + ("i", "e")))
    first_error = None
    for p_idx, out_roles in candidates:
        (a, ra), (b, rb), nc = contraction_roles(n, out_roles)
        if nc != 1:
            continue
        (p, rp), (v, rv) = ((a, ra), (b, rb)) if p_idx == 0 else ((b, rb), (a, ra))
        if "i" not in rp or "e" not in rv:
            continue
        rp = tuple("j" if r == "c" else r for r in rp)
        rv = tuple("j" if r == "c" else r for r in rv)
        ps = shape(p)
        if not same(ps[rp.index("i")], ps[rp.index("j")]) or not _has_scores_upstream(p):
            continue
        interp = MaskInterpreter(order)
        try:
            pw = interp.ev(p, rp)
            if interp.scores is None:
                raise Unproven("no q @ k^T contraction found in the attention weights")
            mask = []
            for lo, hi, t in pw:
                if t[0] == "scores":
                    mask.append((lo, hi, t[1]))
                elif t[0] == "num" and t[1] == 0:
                    mask.append((lo, hi, S.ZERO))
                else:
                    raise Unproven("the attention weights are not scores times a mask "
                                   f"({S.kind(t)} for d in [{lo}, {hi}])")
            decay = canonical(S.merge(mask))
            check_mutations(interp.nodes - interp.opaque, interp.opaque, _operator_reads(interp, v, decay), n, order)
            return Match(n, out_roles, v, rv, interp, decay)
        except Unproven as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return None


def _operator_reads(interp, v, decay):
    """The nodes the operator call reads (at the site's output contraction)."""
    q, _, k, _, _ = interp.scores
    coefs = [decay.m, decay.coef, *decay.cums.values()]
    nodes = {q, k, v} | {n for c in coefs for n, _ in S.recipe_nodes(c)} | {key[0] for key in decay.cums}
    return {n for n in nodes if isinstance(n, torch.fx.Node)}


_BOUNDARIES = {aten.linear, aten.addmm, aten.baddbmm, aten.conv1d, aten.conv2d, aten.convolution}


def _has_scores_upstream(p, limit=2000):
    """Whether a contraction feeds p through non-contraction ops (cheap filter that
    keeps plain projections out of the near-miss report)."""
    seen, todo = set(), [p]
    while todo and len(seen) < limit:
        x = todo.pop()
        if x in seen or not isinstance(x, torch.fx.Node):
            continue
        seen.add(x)
        if is_contraction(x):
            return True
        if packet(x) in _BOUNDARIES:
            continue
        todo.extend(x.all_input_nodes)
    return False
