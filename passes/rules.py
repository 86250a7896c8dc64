"""One abstract rule per ATen op: the exact value of the op's result from the values of
its arguments (terms.py), for a result whose dims have the given roles.

Add an op: write ``@rule(aten.op) def _op(it, n, roles): ...`` here, returning a
piecewise value; the interpreter applies the node's dtype (arith.py) afterwards.
Ops without a rule are taken as opaque data (allowed only at one position)."""
import dataclasses
import math

import torch

from . import terms as T
from .contractions import bcast
from .errors import Unproven
from .graph import aten, is_one, packet, same, shape, val
from .interpreter import POS

RULES = {}  # op packet -> (rule, whether the op rounds: it computes new values)


def rule(*packets, rounds=True):
    """Registers an op's rule.  ``rounds=False`` for ops that only select, move or
    create exact values (views, selects, negation, cumsum atoms): their results are
    eager's values of their inputs, so no rounding is added (constants still are)."""
    def deco(fn):
        for p in packets:
            RULES[p] = (fn, rounds)
        return fn
    return deco


def _args(it, n, roles, k):
    return [it.arg(a, roles) for a in n.args[:k]]


# ---------------------------------------------------------------- arithmetic


@rule(aten.add, aten.sub, aten.rsub)
def _addsub(it, n, roles):
    a, b = _args(it, n, roles, 2)
    alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
    if not isinstance(alpha, (int, float)):
        raise Unproven("add/sub with a non-constant alpha")
    if alpha != 1:
        b = T.pw_mul(b, T.pw_const(T.num(alpha)))
    p = packet(n)
    if p == aten.add:
        return T.pw_add(a, b)
    if p == aten.rsub:
        a, b = b, a
    return T.pw_add(a, T.pw_neg(b))


@rule(aten.mul)
def _mul(it, n, roles):
    return T.pw_mul(*_args(it, n, roles, 2))


@rule(aten.div, aten.true_divide)
def _div(it, n, roles):
    if n.kwargs.get("rounding_mode") is not None:
        raise Unproven("division with rounding")
    a, b = _args(it, n, roles, 2)
    return T.pw_mul(a, T.pw_recip(b))


@rule(aten.reciprocal)
def _recip(it, n, roles):
    return T.pw_recip(it.arg(n.args[0], roles))


@rule(aten.neg, rounds=False)
def _neg(it, n, roles):
    return T.pw_neg(it.arg(n.args[0], roles))


@rule(aten.exp)
def _exp(it, n, roles):
    return T.pw_exp(it.arg(n.args[0], roles))


@rule(aten.exp2)
def _exp2(it, n, roles):
    return T.pw_map(lambda lo, hi, t: T.t_exp(t, math.log(2.0)), it.arg(n.args[0], roles))


@rule(aten.log)
def _log(it, n, roles):
    return T.pw_log(it.arg(n.args[0], roles))


@rule(aten.pow)
def _pow(it, n, roles):
    return T.pw_pow(*_args(it, n, roles, 2))


@rule(aten.abs, rounds=False)
def _abs(it, n, roles):
    def one(lo, hi, t):
        if isinstance(t, T.Row):
            return T.row_fn("abs", t)
        if isinstance(t, T.Num):
            return T.num(abs(t.x))
        return [(a, b, t if c.x else T.t_neg(t)) for a, b, c in T.t_cmp("ge", t, T.ZERO, lo, hi)]

    return T.pw_map(one, it.arg(n.args[0], roles))


@rule(aten.sqrt)
def _sqrt(it, n, roles):
    def one(t):
        if isinstance(t, T.Row):
            return T.row_fn("sqrt", t)
        if isinstance(t, T.Num):
            return T.num(math.sqrt(t.x) if t.x >= 0 else math.nan)
        raise Unproven(f"sqrt of {T.kind(t)}")
    return T.lift(one)(it.arg(n.args[0], roles))


@rule(aten.rsqrt)
def _rsqrt(it, n, roles):
    def one(lo, hi, t):
        if isinstance(t, T.Row):
            return T.t_recip(T.row_fn("sqrt", t))
        if isinstance(t, T.Num) and t.x > 0:
            return T.num(1 / math.sqrt(t.x))
        raise Unproven(f"rsqrt of {T.kind(t)}")
    return T.pw_map(one, it.arg(n.args[0], roles))


# ---------------------------------------------------------------- row sums


_PEEL = (aten.detach, aten.alias, aten.clone, aten.contiguous)


@rule(aten.sum)
def _sum(it, n, roles):
    """A sum over the key positions j of a proven mask (or of the masked scores): a row
    statistic of (b, h, i), which the rewrite computes in O(T) (terms.RRowSum)."""
    from .arith import FLOAT32_ROUNDOFF, unit_roundoff
    from .canonical import canonical, mask_pieces

    if n.target != aten.sum.dim_IntList or n.kwargs.get("dtype") is not None:
        raise Unproven("a sum that is not over one dim")
    x, dims = n.args[0], n.args[1]
    keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
    nd = len(shape(x))
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or nd == 0:
        raise Unproven("a sum over several dims")
    d = dims[0] % nd
    r = list(roles)
    if keep:
        if r[d] not in (None, "j"):
            raise Unproven("a sum whose result is read along the summed dim")
        r[d] = "j"
    else:
        r.insert(d, "j")
    if r.count("j") != 1 or "i" not in r or is_one(shape(x)[r.index("i")]) or \
            not same(shape(x)[d], shape(x)[r.index("i")]):
        raise Unproven("a sum that is not a row sum over the key positions")
    base, detached = x, False
    while isinstance(base, torch.fx.Node) and packet(base) in _PEEL:
        detached = detached or packet(base) == aten.detach
        it.nodes.add(base)
        base = base.args[0]
    mask, scores = mask_pieces(it.ev(base, r))
    # A row sum of the (signed) scores may cancel, which amplifies any difference between
    # eager's weights and the operator's: the weights must then be as exact as the sum's
    # own dtype (no float32 floor: a float32 mask in a float64 sum is left alone).
    decay = canonical(T.merge(mask), unit_roundoff(val(n).dtype), floor=0.0 if scores else FLOAT32_ROUNDOFF)
    lo, hi = -T.INF, T.INF
    if not scores and T.is_number(decay.m) and decay.m > 0:
        lo = decay.m  # the diagonal's term, the others are >= 0
        if _nonincreasing(decay):
            hi = decay.m * (T.facts().ti + 1)
    elif not scores:
        raise Unproven("a row sum of a mask with a scale that is not a positive constant")
    row = T.Row(T.RRowSum(decay.m, decay.coef, tuple(sorted(decay.cums.items(), key=repr)), scores),
                lo, hi)
    return T.pw_const(T.row_fn("detach", row) if detached else row)


def _nonincreasing(decay):
    """Whether every weight of the mask is at most its diagonal's (a decay, proven or
    assumed; a growing one would make the row sums' range unknown)."""
    f = T.facts()
    c = decay.coef
    if T.is_number(c):
        ok = c <= 0
    else:
        known = f.coef_range(c)
        ok = known[1] <= 0 if known is not None else \
            T.NonPositive(c) in f.assumed or T.Negative(c) in f.assumed
    return ok and all(T.NonPositiveCum(key, w) in f.assumed for key, w in decay.cums.items())


@rule(aten.clamp, aten.clamp_min, aten.clamp_max, rounds=False)
def _clamp(it, n, roles):
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
    return T.pw_clamp(it.arg(n.args[0], roles), lo, hi)


@rule(aten.nan_to_num, rounds=False)
def _nan_to_num(it, n, roles):
    args = list(n.args[1:]) + [None] * 3
    kw = n.kwargs
    nan = kw.get("nan", args[0] if args[0] is not None else 0.0)
    posinf = kw.get("posinf", args[1])
    neginf = kw.get("neginf", args[2])
    fin = torch.finfo(val(n).dtype) if val(n).dtype.is_floating_point else None
    posinf = posinf if posinf is not None else (fin.max if fin else T.INF)
    neginf = neginf if neginf is not None else (fin.min if fin else -T.INF)
    return T.pw_map(lambda lo, hi, t: T.t_nan_to_num(t, nan, posinf, neginf, lo, hi), it.arg(n.args[0], roles))


# ---------------------------------------------------------------- comparisons and selects


@rule(aten.ge, aten.gt, aten.le, aten.lt, aten.eq, aten.ne, rounds=False)
def _cmp(it, n, roles):
    op = packet(n).__name__.split(".")[-1]
    a0, a1 = n.args[0], n.args[1]
    if a0 is a1 and op in ("eq", "ne"):  # x != x is isnan(x)
        return T.pw_map(lambda lo, hi, t: T.t_isnan(t, op == "ne", a0), it.arg(a0, roles))
    return T.pw_cmp(op, it.arg(a0, roles), it.arg(a1, roles))


@rule(aten.isnan, rounds=False)
def _isnan(it, n, roles):
    return T.pw_map(lambda lo, hi, t: T.t_isnan(t, True, n.args[0]), it.arg(n.args[0], roles))


@rule(aten.logical_not, aten.bitwise_not, rounds=False)
def _not(it, n, roles):
    if val(n).dtype != torch.bool:
        raise Unproven("bitwise not of a non-bool tensor")
    return T.pw_not(it.arg(n.args[0], roles))


@rule(aten.logical_and, aten.bitwise_and, aten.logical_or, aten.bitwise_or, rounds=False)
def _andor(it, n, roles):
    is_and = packet(n) in (aten.logical_and, aten.bitwise_and)
    if packet(n) in (aten.bitwise_and, aten.bitwise_or) and val(n).dtype != torch.bool:
        raise Unproven("bitwise op on a non-bool tensor")

    def one(a, b):
        if not isinstance(a, T.Num) or not isinstance(b, T.Num):
            raise Unproven("logical op on a non-constant condition")
        return T.num(bool(a.x) and bool(b.x) if is_and else bool(a.x) or bool(b.x))

    return T.lift(one)(*_args(it, n, roles, 2))


def _cleans_itself(cond, x):
    """Unproven unless every isnan test in cond is of node x, the tensor whose nan the
    select replaces (where(isnan(X), 0, Y) with X != Y keeps Y's nan)."""
    for _, _, t in cond:
        if isinstance(t, T.IsNan) and t.src is not x:
            raise Unproven("a select on isnan of another tensor than the one it cleans")


@rule(aten.where, rounds=False)
def _where(it, n, roles):
    if len(n.args) != 3:
        raise Unproven("where with one argument")
    c, a, b = (it.arg(x, roles) for x in n.args)
    if any(isinstance(t, T.IsNan) for _, _, t in c):
        kept = [x for x, pw in ((n.args[1], a), (n.args[2], b))
                if not all(isinstance(t, T.Num) for _, _, t in pw)]
        _cleans_itself(c, kept[0] if len(kept) == 1 else None)
    return T.pw_where(c, a, b)


@rule(aten.masked_fill, rounds=False)
def _masked_fill(it, n, roles):
    x, m, v = (it.arg(a, roles) for a in n.args[:3])
    _cleans_itself(m, n.args[0])
    return T.pw_where(m, v, x)


@rule(aten.index_put, aten.index_put_, rounds=False)
def _index_put(it, n, roles):
    x, idx, v = n.args[0], n.args[1], n.args[2]
    acc = n.kwargs.get("accumulate", n.args[3] if len(n.args) > 3 else False)
    if acc or len(idx) != 1 or not isinstance(idx[0], torch.fx.Node) or val(idx[0]).dtype != torch.bool \
            or len(shape(idx[0])) != len(shape(x)) or len(shape(v)) not in (0,) and not isinstance(v, (int, float)):
        raise Unproven("index_put that is not x[bool_mask] = scalar")
    if not all(same(a, b) for a, b in zip(shape(idx[0]), shape(x))):
        raise Unproven("index_put with a broadcast mask")
    cond = it.arg(idx[0], roles)
    _cleans_itself(cond, x)
    return T.pw_where(cond, it.arg(v, roles), it.arg(x, roles))


def _tri(it, n, roles, lower):
    k = n.kwargs.get("diagonal", n.args[1] if len(n.args) > 1 else 0)
    if not isinstance(k, int):
        raise Unproven("tril/triu with a symbolic diagonal")
    row, col = roles[-2], roles[-1]
    x = it.arg(n.args[0], roles)
    if (row, col) == ("i", "j"):  # keep col - row <= k  <=>  d >= -k (tril)
        return T.pw_select_d(x, -k, T.INF) if lower else T.pw_select_d(x, -T.INF, -k)
    if (row, col) == ("j", "i"):  # col - row = d
        return T.pw_select_d(x, -T.INF, k) if lower else T.pw_select_d(x, k, T.INF)
    raise Unproven("tril/triu over dims that are not the two positions")


@rule(aten.tril, rounds=False)
def _tril(it, n, roles):
    return _tri(it, n, roles, True)


@rule(aten.triu, rounds=False)
def _triu(it, n, roles):
    return _tri(it, n, roles, False)


# ---------------------------------------------------------------- sources


@rule(aten.arange)
def _arange(it, n, roles):
    args = list(n.args)
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
    return T.pw_const(T.aff(start, {T.Pos(roles[0]): step}))


@rule(aten.full, aten.full_like, aten.new_full, aten.ones, aten.ones_like, aten.new_ones,
      aten.zeros, aten.zeros_like, aten.new_zeros, aten.scalar_tensor, rounds=False)
def _fill(it, n, roles):
    c = it.constant(n)
    if c is None:
        raise Unproven("a fill with a non-constant value")
    return T.pw_const(T.num(c))


@rule(aten.cumsum, rounds=False)
def _cumsum(it, n, roles):
    dim = n.args[1] % len(roles)
    r = roles[dim]
    if r not in POS:
        raise Unproven("cumsum over a dim that is not a position")
    x = it.ev(n.args[0], roles)
    other = "j" if r == "i" else "i"
    y = T.merge(x, keep_cuts=False)
    if T.uniform(x) is not None and _only_at(T.uniform(x), r) and other not in roles:
        # a cumsum over positions of a per-position tensor a: C_r
        key = (n.args[0], tuple("t" if q in POS else q for q in roles), False)
        return T.pw_const(T.aff(0, {T.Cum(key, r): 1}))
    # the stable segment sum: x[i, j] = a_i * [i - j >= 1], summed over i
    if r == "i" and len(y) == 2 and y[0][1] == 0 and y[0][2] == T.ZERO and y[1][0] == 1:
        f = T.as_aff(y[1][2])
        # (a rounding error of a_i is eager's own: log_decay recomputes a_i from the same data)
        if f is not None and T.is_number(f[0]) and f[0] == 0 and f[1] and \
                all(isinstance(k, T.Leaf) and k.p == "i" for k in f[1]):
            atoms = {}
            for k, v in f[1].items():
                atoms[T.Cum(k.key, "i")] = v
                atoms[T.Cum(k.key, "j")] = T.cneg(v)
            return [(-T.INF, -1, T.ZERO), (0, 0, T.ZERO), (1, T.INF, T.aff(0, atoms))]
    raise Unproven("cumsum of a masked value that is not a segment sum")


def _only_at(t, r):
    """Whether term t is a value of one position r (no other position, no scores)."""
    if isinstance(t, T.Num):
        return True
    if isinstance(t, T.Exp):
        return _only_at(t.x, r)
    f = T.as_aff(t)
    if f is None:
        return False
    return all(isinstance(k, (T.Leaf, T.Cum)) and k.p == r or k == T.Pos(r) for k in f[1])


# ---------------------------------------------------------------- casts, detach, no-ops


_NOOPS = (aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy, aten.lift_fresh)


@rule(*_NOOPS, rounds=False)
def _noop(it, n, roles):
    return it.ev(n.args[0], roles)


@rule(aten.detach, aten.detach_, rounds=False)
def _detach(it, n, roles):
    return T.pw_map(lambda lo, hi, t: _t_detach(t), it.ev(n.args[0], roles))


def _t_detach(t):
    if isinstance(t, T.Aff):
        atoms = {}
        for k, v in t.atoms:
            if isinstance(k, (T.Cum, T.Leaf)):
                k = dataclasses.replace(k, key=(k.key[0], k.key[1], True))
            atoms[k] = T.cdetach(v)
        return T.Aff(T.cdetach(t.c0), frozenset(atoms.items()), t.rel, t.abs)
    if isinstance(t, T.Exp):
        return dataclasses.replace(t, m=T.cdetach(t.m), x=_t_detach(t.x))
    if isinstance(t, T.Scores):
        raise Unproven("the scores are detached outside a row sum (s.detach().sum(-1) is followed; "
                       "|s|, or other functions of detached scores, have no O(T) form)")
    if isinstance(t, T.Row):
        return T.row_fn("detach", t)
    return t


@rule(aten._to_copy, aten.to, aten.type_as)
def _cast(it, n, roles):
    # the value is exact math; arith.in_dtype applies the target dtype's rounding
    x = it.ev(n.args[0], bcast(n.args[0], roles) if packet(n) != aten.type_as else roles)
    dt = val(n).dtype
    if dt == torch.bool:
        def to_bool(t):
            if not isinstance(t, T.Num):
                raise Unproven("a cast to bool of a non-constant")
            return T.num(bool(t.x))
        return T.lift(to_bool)(x)
    if not dt.is_floating_point:
        def to_int(t):
            if isinstance(t, T.Num) and (isinstance(t.x, int) or math.isfinite(t.x) and t.x == int(t.x)):
                return t
            if isinstance(t, T.Aff) and t.exact:
                return t  # arith checks it is an exact integer in range
            raise Unproven("a cast to an integer type that may truncate")
        return T.lift(to_int)(x)
    return x


# ---------------------------------------------------------------- views


@rule(aten.unsqueeze, rounds=False)
def _unsqueeze(it, n, roles):
    d = n.args[1] % len(roles)
    return it.ev(n.args[0], roles[:d] + roles[d + 1:])


@rule(aten.squeeze, rounds=False)
def _squeeze(it, n, roles):
    shp = shape(n.args[0])
    if len(n.args) == 1:
        dims = [d for d, s in enumerate(shp) if is_one(s)]
    else:
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        dims = [d % len(shp) for d in dims if is_one(shp[d % len(shp)])]
    rest = iter(roles)
    return it.ev(n.args[0], tuple(None if d in dims else next(rest) for d in range(len(shp))))


@rule(aten.expand, rounds=False)
def _expand(it, n, roles):
    return it.ev(n.args[0], bcast(n.args[0], roles))


@rule(aten.repeat, rounds=False)
def _repeat(it, n, roles):
    """x.repeat(reps) that only tiles size-1 dims (and adds leading ones): an expand.
    Tiling a dim of size > 1 wraps its index around, which no role describes."""
    x, reps = n.args[0], list(n.args[1])
    shp = shape(x)
    new = len(reps) - len(shp)
    if new < 0 or any(not (isinstance(r, int) and r == 1) and not is_one(s) for r, s in zip(reps[new:], shp)):
        raise Unproven("repeat of a dim of size > 1 (the index wraps around); use expand")
    return it.ev(x, tuple(None if is_one(s) else r for r, s in zip(roles[new:], shp)))


@rule(aten.permute, rounds=False)
def _permute(it, n, roles):
    perm = [p % len(roles) for p in n.args[1]]
    r = [None] * len(roles)
    for k, p in enumerate(perm):
        r[p] = roles[k]
    return it.ev(n.args[0], r)


@rule(aten.mT, aten.mH, aten.adjoint, rounds=False)
def _mt(it, n, roles):
    if val(n).is_complex():
        raise Unproven("a complex mask")
    return it.ev(n.args[0], tuple(roles[:-2]) + (roles[-1], roles[-2]))


@rule(aten.numpy_T, rounds=False)
def _numpy_t(it, n, roles):
    return it.ev(n.args[0], tuple(reversed(roles)))


@rule(aten.transpose, aten.t, rounds=False)
def _transpose(it, n, roles):
    a, b = (n.args[1] % len(roles), n.args[2] % len(roles)) if len(n.args) > 1 else (0, 1)
    r = list(roles)
    r[a], r[b] = r[b], r[a]
    return it.ev(n.args[0], r)


@rule(aten.slice, rounds=False)
def _slice(it, n, roles):
    x = n.args[0]
    shp = shape(x)
    dim = (n.args[1] if len(n.args) > 1 else 0) % len(shp)
    start = n.args[2] if len(n.args) > 2 else None
    end = n.args[3] if len(n.args) > 3 else None
    step = n.args[4] if len(n.args) > 4 else 1
    full_end = end is None or (isinstance(end, int) and end >= 2 ** 62) or same(end, shp[dim])
    if start in (None, 0) and step == 1 and (full_end or roles[dim] in POS):
        return it.ev(x, roles)  # a prefix keeps each element's index
    raise Unproven("a slice that shifts positions")


@rule(aten.select, rounds=False)
def _select(it, n, roles):
    """x.select(dim, index): x with that dim fixed at index (a Sel role)."""
    from .interpreter import Sel

    x, dim, index = n.args[0], n.args[1], n.args[2]
    shp = shape(x)
    dim %= len(shp)
    if not isinstance(index, int):
        raise Unproven("a select at a symbolic index")
    if index < 0:
        if not isinstance(shp[dim], int):
            raise Unproven("a select at a negative index of a symbolic size")
        index += shp[dim]
    return it.ev(x, tuple(roles[:dim]) + (Sel(index),) + tuple(roles[dim:]))


@rule(aten.view, aten.reshape, aten._unsafe_view, rounds=False)
def _view(it, n, roles):
    x = n.args[0]
    h_split = it.h_split
    try:
        in_roles = _view_in_roles(it, shape(x), shape(n), roles)
    except Unproven:
        if sum(r in POS for r in roles) != 1:
            raise
        # a value at one position (T split into chunks and positions in a chunk): the
        # view's own elements, read as data where they are (leaf), as eager computed them
        it.h_split = h_split
        return it.leaf(n, roles)
    return it.ev(x, in_roles)


def _view_in_roles(it, in_shape, out_shape, out_roles):
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
            _record_split(it, ins[a + 1][0])
            a, b = a + 2, b + 1
        elif b + 1 < len(outs) and same(so * outs[b + 1][0], si) and (ro, outs[b + 1][1]) == ("b", "h"):
            res[di] = "bh"
            _record_split(it, outs[b + 1][0])
            a, b = a + 1, b + 2
        else:
            raise Unproven("a view that mixes positions with other dims")
    if a != len(ins) or b != len(outs):
        raise Unproven("an unsupported view")
    return tuple(res)


def _record_split(it, h):
    if it.h_split is not None and not same(it.h_split, h):
        raise Unproven("inconsistent B*H splits")
    it.h_split = h
