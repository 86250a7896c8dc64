"""Index-expression abstract interpretation of mask subgraphs.

A tensor that takes part in ``(q @ k^T) * M @ v`` is interpreted as a function of
symbolic indices: batch roles (``b``, ``h``, ``bh`` for a merged B*H dim) and the two
positions ``i`` (query) and ``j`` (key).  The value of every element is described
piecewise over ``d = i - j``: a sorted list of integer intervals of d, each with a
*term*.  Terms (plain tuples, compared structurally):

* ``("num", x)``: a Python number (bools are numbers too; may be inf or nan).
* ``("aff", c0, atoms)``: ``c0 + sum(coef * atom)``, finite.  Atoms are ``("i",)``,
  ``("j",)``, ``("cum", key, pos)`` (a cumsum over positions of a graph tensor,
  read at ``pos``) and ``("leaf", key, pos)`` (a graph tensor read at one position).
  ``c0`` and the coefficients are *coefficients*: floats or recipes (below).
* ``("exp", m, aff)``: ``m * exp(aff)`` with m a nonzero coefficient; it may
  overflow to inf (never nan).
* ``("zn",)``: zero, or nan where an exp overflowed (``0 * exp(...)``).
* ``("isnan", term, positive, src)``: the boolean ``isnan(term)`` (or its negation) of
  the graph node ``src`` (a "zn" term says where nan may be, not where it is: two
  tensors with equal "zn" terms can have nan at different places).
* ``("scores", term)``: the attention scores ``q_i . k_j`` times ``term``.

A *recipe* is a position-independent graph expression: ``("node", node, roles)``,
``("mul", float, recipe)``, ``("add", r1, r2)``, ``("prod", r1, r2)``, ``("log", r)``,
``("exp", r)``, ``("recip", r)``, ``("detach", r)``.  Recipes become graph nodes
when the rewrite builds ``log_decay`` and never contain i or j.

Assumptions (documented in docs/backend.md): graph inputs (q, k, v, parameters,
buffers) are finite; a base of ``pow`` that is a tensor is positive (otherwise the
derived ``log`` is nan and the output is nan: loud, not silent).  Anything outside
these rules raises :class:`Unproven` with a reason.
"""
import math
import operator

import torch

aten = torch.ops.aten
INF = math.inf
POS = ("i", "j")


class Unproven(Exception):
    """The value cannot be described (the mask is not proven); args[0] is the reason."""


# ---------------------------------------------------------------- coefficients


def is_float(c):
    return isinstance(c, (int, float, bool)) and not isinstance(c, tuple)


def _split(c):
    """(scale, base) with c == scale * base; base None for a plain float."""
    if is_float(c):
        return float(c), None
    if c[0] == "mul":
        return c[1], c[2]
    return 1.0, c


def cmul(a, b):
    if is_float(a) and is_float(b):
        return a * b
    if is_float(b):
        a, b = b, a
    if is_float(a):
        if a == 0:
            return 0.0
        if a == 1:
            return b
        s, base = _split(b)
        return ("mul", a * s, base) if a * s != 1 else base
    sa, ba = _split(a)
    sb, bb = _split(b)
    return cmul(sa * sb, ("prod", ba, bb))


def cadd(a, b):
    if is_float(a) and is_float(b):
        return a + b
    if is_float(a) and a == 0:
        return b
    if is_float(b) and b == 0:
        return a
    sa, ba = _split(a)
    sb, bb = _split(b)
    if ba is not None and ba == bb:
        return cmul(sa + sb, ba)
    return ("add", a, b)


def cneg(a):
    return cmul(-1.0, a)


def clog(a):
    if is_float(a):
        if a <= 0:
            raise Unproven(f"log of the non-positive constant {a}")
        return math.log(a)
    if a[0] == "exp":
        return a[1]
    return ("log", a)


def cexp(a):
    if is_float(a):
        return math.exp(a) if a < 700 else INF
    if a[0] == "log":
        return a[1]
    return ("exp", a)


def crecip(a):
    if is_float(a):
        if a == 0:
            raise Unproven("division by zero")
        return 1.0 / a
    s, base = _split(a)
    return cmul(1.0 / s, ("recip", base))


def cdetach(a):
    return a if is_float(a) else ("detach", a)


def recipe_nodes(c, out=None):
    """The (node, roles) leaves of a coefficient recipe."""
    out = [] if out is None else out
    if is_float(c):
        return out
    if c[0] == "node":
        out.append((c[1], c[2]))
    else:
        for x in c[1:]:
            if isinstance(x, tuple):
                recipe_nodes(x, out)
    return out


_THROUGH = ("unsqueeze", "squeeze", "view", "reshape", "expand", "slice", "clone", "contiguous",
            "_to_copy", "to", "alias", "lift_fresh_copy", "_unsafe_view")


def root_name(n):
    """The name of the tensor a node views (through reshapes and casts), for reports."""
    while n.op == "call_function" and getattr(getattr(n.target, "overloadpacket", None), "__name__", "") \
            in _THROUGH and isinstance(n.args[0], torch.fx.Node):
        n = n.args[0]
    return n.name


def recipe_str(c):
    """A short human-readable form of a coefficient, for reports."""
    if is_float(c):
        return f"{c:.6g}"
    op = c[0]
    if op == "node":
        return root_name(c[1])
    if op == "mul":
        return f"{c[1]:.6g}*{recipe_str(c[2])}"
    if op == "prod":
        return f"{recipe_str(c[1])}*{recipe_str(c[2])}"
    if op == "add":
        return f"({recipe_str(c[1])} + {recipe_str(c[2])})"
    return f"{op}({recipe_str(c[1])})"


# ---------------------------------------------------------------- terms

ZERO = ("num", 0.0)
ONE = ("num", 1.0)


def num(x):
    return ("num", float(x) if not isinstance(x, bool) else float(x))


INEXACT = ("inexact",)


def _integral(c):
    return is_float(c) and math.isfinite(c) and float(c).is_integer()


def aff(c0, atoms=None):
    atoms = {k: v for k, v in (atoms or {}).items() if not (is_float(v) and v == 0)}
    # Index values (i, j) are exact integers in eager only while every coefficient is
    # an integer; once a non-integer one took part (0.1 * i, p / T), eager rounds, and
    # a comparison can flip at its boundary.  INEXACT marks such values for good
    # (sticky through + and *); exp forms ignore it (rounding is harmless there).
    if any(k in POS_ATOMS for k in atoms):
        if INEXACT in atoms or not _integral(c0) or \
                not all(_integral(v) for k, v in atoms.items() if k in POS_ATOMS):
            atoms[INEXACT] = 1.0
    else:
        atoms.pop(INEXACT, None)
    if not atoms and is_float(c0):
        return num(c0)
    return ("aff", c0, frozenset(atoms.items()))


POS_ATOMS = (("i",), ("j",))


def as_aff(t):
    """(c0, atoms dict) of a num or aff term, else None."""
    if t[0] == "num":
        return t[1], {}
    if t[0] == "aff":
        return t[1], dict(t[2])
    return None


def t_add(a, b):
    if a[0] == "num" and b[0] == "num":
        return num(a[1] + b[1])
    if b[0] == "num" and b[1] == 0:
        return a
    if a[0] == "num" and a[1] == 0:
        return b
    for x, y in ((a, b), (b, a)):  # finite + inf = inf
        if x[0] == "num" and not math.isfinite(x[1]) and y[0] == "aff":
            return x
    fa, fb = as_aff(a), as_aff(b)
    if fa is not None and fb is not None:
        atoms = dict(fa[1])
        for k, v in fb[1].items():
            atoms[k] = cadd(atoms.get(k, 0.0), v)
        return aff(cadd(fa[0], fb[0]), atoms)
    if a[0] == "scores" or b[0] == "scores":
        raise Unproven("the scores are added to something (not a product with a mask)")
    raise Unproven(f"cannot add {kind(a)} and {kind(b)}")


def kind(t):
    return {"num": "a constant", "aff": "an index expression", "exp": "an exponential",
            "zn": "0*inf (nan)", "isnan": "an isnan test", "scores": "the scores"}[t[0]]


def _scale(t, c):
    """t * c for a finite nonzero coefficient c."""
    if t[0] == "num":
        if is_float(c):
            return num(t[1] * c)
        if t[1] == 0 or not math.isfinite(t[1]):
            return t if t[1] == 0 else _bad_inf()
        return aff(cmul(t[1], c))
    if t[0] == "aff":
        return aff(cmul(t[1], c), {k: cmul(v, c) for k, v in t[2]})
    if t[0] == "exp":
        return ("exp", cmul(t[1], c), t[2])
    if t[0] == "zn":
        return t
    if t[0] == "scores":
        return ("scores", _scale(t[1], c))
    raise Unproven(f"cannot multiply {kind(t)}")


def _bad_inf():
    raise Unproven("inf times a value of unknown sign")


def t_mul(a, b):
    if a[0] == "scores" and b[0] == "scores":
        raise Unproven("the scores are multiplied by themselves")
    if b[0] == "scores":
        a, b = b, a
    if a[0] == "scores":
        return ("scores", t_mul(a[1], b))
    if a[0] == "num" and b[0] == "num":
        return num(a[1] * b[1])
    if b[0] == "num":
        a, b = b, a
    if a[0] == "num":
        x = a[1]
        if math.isnan(x):
            return a
        if x == 0:
            if b[0] in ("aff",):
                return ZERO
            if b[0] in ("exp", "zn"):
                return ("zn",)
        if not math.isfinite(x):
            raise Unproven("inf times a value of unknown sign")
        if b[0] == "isnan":
            raise Unproven("arithmetic on an isnan test")
        return _scale(b, x) if x != 0 else ZERO
    if a[0] == "zn" or b[0] == "zn":
        if "isnan" in (a[0], b[0]):
            raise Unproven("arithmetic on an isnan test")
        return ("zn",)
    fa, fb = as_aff(a), as_aff(b)
    if fa is not None and not fa[1]:  # position-independent coefficient
        return _scale(b, fa[0])
    if fb is not None and not fb[1]:
        return _scale(a, fb[0])
    if a[0] == "exp" and b[0] == "exp":
        if not _grow_together(a[2], b[2]):
            raise Unproven("a product of exponentials that can overflow and underflow at once "
                           "(inf * 0 = nan in eager at long lengths, e.g. exp(g_i) * exp(-g_j)); "
                           "write one exp of the sum")
        return ("exp", cmul(a[1], b[1]), t_add(a[2], b[2]))
    raise Unproven(f"cannot multiply {kind(a)} by {kind(b)} (not a decay form)")


def _grow_together(a, b):
    """Whether exp(a) * exp(b) is never inf * 0: one exponent is position-free, or
    the position part of b is a positive multiple of that of a (both grow together)."""
    pa = {k: v for k, v in as_aff(a)[1].items() if k != INEXACT}
    pb = {k: v for k, v in as_aff(b)[1].items() if k != INEXACT}
    if not pa or not pb:
        return True
    if pa.keys() != pb.keys():
        return False
    ratios = []
    for k in pa:
        if pa[k] == pb[k]:
            ratios.append(1.0)
        elif is_float(pa[k]) and is_float(pb[k]):
            ratios.append(pb[k] / pa[k])
        else:
            return False  # recipes of unknown relative sign
    return ratios[0] > 0 and all(math.isclose(r, ratios[0], rel_tol=1e-9) for r in ratios)


def t_neg(a):
    return t_mul(a, num(-1.0))


def t_recip(a):
    if a[0] == "num":
        return num(math.inf if a[1] == 0 else 1.0 / a[1]) if a[1] != 0 else _recip_zero()
    f = as_aff(a)
    if f is not None and not f[1]:
        return aff(crecip(f[0]))
    if a[0] == "exp":
        return ("exp", crecip(a[1]), t_neg(a[2]))
    raise Unproven(f"cannot divide by {kind(a)}")


def _recip_zero():
    raise Unproven("division by zero")


def t_exp(a, base_log=1.0):
    """exp(base_log * a)."""
    if a[0] == "num":
        x = a[1] * base_log
        return num(0.0 if x == -INF else (math.exp(x) if x < 700 else INF))
    if a[0] == "aff":
        return ("exp", 1.0, t_mul(a, num(base_log)))
    raise Unproven(f"exp of {kind(a)}")


def t_log(a):
    if a[0] == "num":
        x = a[1]
        if x < 0 or math.isnan(x):
            return num(math.nan)
        return num(-INF if x == 0 else math.log(x))
    if a[0] == "exp":
        return t_add(a[2], aff(clog(a[1])))
    f = as_aff(a)
    if f is not None and not f[1]:
        return aff(clog(f[0]))
    raise Unproven(f"log of {kind(a)}")


def t_pow(base, e):
    if base[0] == "num" and e[0] == "num":
        try:
            return num(math.pow(base[1], e[1]))
        except (OverflowError, ValueError, ZeroDivisionError):
            return num(torch.tensor(base[1]).pow(e[1]).item())
    fb = as_aff(base)
    if fb is not None and not fb[1] and as_aff(e) is not None:
        return t_exp(t_mul(e, aff(clog(fb[0]))))  # gamma ** x == exp(x log gamma)
    if base[0] == "exp" and e[0] == "num":
        if is_float(base[1]) and base[1] <= 0:
            raise Unproven("power of a negative exponential")
        return ("exp", cexp(cmul(e[1], clog(base[1]))), t_mul(base[2], e))
    raise Unproven(f"{kind(base)} to the power {kind(e)}")


def t_nan_to_num(t, nan, posinf, neginf):
    if t[0] == "num":
        x = t[1]
        if math.isnan(x):
            return num(nan)
        if x == INF:
            return num(posinf)
        if x == -INF:
            return num(neginf)
        return t
    if t[0] == "zn":
        if nan == 0:
            return ZERO
        raise Unproven("nan_to_num of 0*inf with a nonzero nan value")
    if t[0] in ("aff", "exp"):
        return t  # finite, or an exp overflow in the kept region (same in both)
    raise Unproven(f"nan_to_num of {kind(t)}")


def t_isnan(t, positive=True, src=None):
    if t[0] == "num":
        return num(math.isnan(t[1]) == positive)
    if t[0] in ("aff", "exp"):
        return num(not positive)
    if t[0] == "zn":
        return ("isnan", t, positive, src)
    raise Unproven(f"isnan of {kind(t)}")


def t_not(t):
    if t[0] == "num":
        return num(not t[1])
    if t[0] == "isnan":
        return ("isnan", t[1], not t[2], t[3])
    raise Unproven(f"logical not of {kind(t)}")


def t_where(c, a, b):
    if c[0] == "num":
        if math.isnan(c[1]):
            raise Unproven("where on a nan condition")
        return a if c[1] else b
    if c[0] == "isnan":
        if not c[2]:
            a, b = b, a
        # where(isnan(x), v, x) == nan_to_num(x, nan=v)
        if b == c[1] and a[0] == "num":
            return t_nan_to_num(b, a[1], INF, -INF)
        raise Unproven("select on an isnan test that is not nan_to_num")
    raise Unproven(f"select on {kind(c)} (not a function of i - j)")


def _d_linear(t):
    """(alpha, c) with t == alpha * (i - j) + c, for index-only terms."""
    f = as_aff(t)
    if f is None or not is_float(f[0]):
        return None
    if INEXACT in f[1]:
        raise Unproven("a comparison of index values computed with non-integer factors "
                       "(eager rounding may move its boundary)")
    ci = f[1].pop(("i",), 0.0)
    cj = f[1].pop(("j",), 0.0)
    if f[1] or not (is_float(ci) and is_float(cj)) or ci + cj != 0:
        return None
    return float(ci), float(f[0])


CMP = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt,
       "eq": operator.eq, "ne": operator.ne}


def t_cmp(op, a, b, lo, hi):
    """a op b on the d-interval [lo, hi]: a list of (lo, hi, bool-term) pieces."""
    if a[0] == "num" and b[0] == "num":
        return [(lo, hi, num(CMP[op](a[1], b[1])))]
    if a[0] in ("num", "aff") and b[0] in ("num", "aff"):
        lin = _d_linear(t_add(a, t_neg(b)))
        if lin is None:
            raise Unproven("a comparison that is not a function of i - j")
        alpha, c = lin
        if alpha == 0:
            return [(lo, hi, num(CMP[op](c, 0.0)))]
        return _solve(op, alpha, c, lo, hi)
    raise Unproven(f"comparison of {kind(a)} with {kind(b)}")


def _solve(op, alpha, c, lo, hi):
    """Integer d in [lo, hi] with alpha*d + c op 0, as pieces."""
    x = -c / alpha  # alpha*d + c == 0 at d == x
    if alpha < 0:  # flip so that the expression grows with d
        op = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}.get(op, op)
    if op in ("eq", "ne"):
        if x != math.floor(x):
            cut = None
        else:
            cut = int(x)
        pieces = []
        if cut is None:
            return [(lo, hi, num(op == "ne"))]
        for a_, b_, v in ((lo, cut - 1, op == "ne"), (cut, cut, op == "eq"), (cut + 1, hi, op == "ne")):
            a_, b_ = max(a_, lo), min(b_, hi)
            if a_ <= b_:
                pieces.append((a_, b_, num(v)))
        return pieces
    # after the flip: "ge"/"gt": true for d >= first; "le"/"lt": true for d <= last
    if op == "ge":
        first = math.ceil(x)
        return _two(lo, hi, first, False, True)
    if op == "gt":
        first = math.floor(x) + 1
        return _two(lo, hi, first, False, True)
    if op == "le":
        first = math.floor(x) + 1
        return _two(lo, hi, first, True, False)
    first = math.ceil(x)  # lt
    return _two(lo, hi, first, True, False)


def _two(lo, hi, cut, below, above):
    pieces = []
    if lo <= cut - 1:
        pieces.append((lo, min(hi, cut - 1), num(below)))
    if max(lo, cut) <= hi:
        pieces.append((max(lo, cut), hi, num(above)))
    return pieces


# ---------------------------------------------------------------- piecewise values


def pw_const(t):
    return [(-INF, INF, t)]


def _cuts(*pws):
    cuts = sorted({p[0] for pw in pws for p in pw} | {p[1] + 1 for pw in pws for p in pw if p[1] != INF})
    return [c for c in cuts if c != -INF]


def _at(pw, d):
    for lo, hi, t in pw:
        if lo <= d <= hi:
            return t
    raise AssertionError("piecewise value does not cover d")


def pw_map(fn, *pws):
    """Applies fn(lo, hi, *terms) piece by piece on the common refinement.

    fn returns a term or a list of (lo, hi, term) pieces inside [lo, hi]."""
    bounds = [-INF] + _cuts(*pws)
    out = []
    for n, lo in enumerate(bounds):
        hi = bounds[n + 1] - 1 if n + 1 < len(bounds) else INF
        probe = lo if lo != -INF else (hi if hi != INF else 0)
        r = fn(lo, hi, *[_at(pw, probe) for pw in pws])
        out.extend(r if isinstance(r, list) else [(lo, hi, r)])
    return merge(out)


def merge(pw):
    out = []
    for p in pw:
        if out and out[-1][2] == p[2]:
            out[-1] = (out[-1][0], p[1], p[2])
        else:
            out.append(p)
    return out


def lift(fn):
    """A piecewise version of a term function of any arity."""
    return lambda *pws: pw_map(lambda lo, hi, *ts: fn(*ts), *pws)


pw_add = lift(t_add)
pw_mul = lift(t_mul)
pw_neg = lift(t_neg)
pw_recip = lift(t_recip)
pw_exp = lift(t_exp)
pw_log = lift(t_log)
pw_pow = lift(t_pow)
pw_where = lift(t_where)
pw_not = lift(t_not)


def pw_cmp(op, a, b):
    return pw_map(lambda lo, hi, x, y: t_cmp(op, x, y, lo, hi), a, b)


def pw_clamp(x, lo_v, hi_v):
    def one(lo, hi, t):
        if t[0] == "num":
            v = t[1]
            if lo_v is not None:
                v = max(v, lo_v)
            if hi_v is not None:
                v = min(v, hi_v)
            return num(v)
        if t[0] == "exp" and is_float(t[1]) and t[1] > 0 and hi_v is None and lo_v is not None and lo_v <= 0:
            return t  # exp(...) > 0 already
        if t[0] == "zn" and hi_v is None and lo_v is not None and lo_v <= 0:
            return t
        lin = _d_linear(t)
        if lin is None:
            raise Unproven(f"clamp of {kind(t)}")
        pieces = [(lo, hi, t)]
        for bound, op in ((lo_v, "lt"), (hi_v, "gt")):
            if bound is None:
                continue
            new = []
            for a_, b_, tt in pieces:
                if tt[0] != "aff" and tt[0] != "num":
                    new.append((a_, b_, tt))
                    continue
                for c_lo, c_hi, c in t_cmp(op, tt, num(bound), a_, b_):
                    new.append((c_lo, c_hi, num(bound) if c[1] else tt))
            pieces = new
        return pieces

    return pw_map(one, x)


def pw_select_d(x, keep_lo, keep_hi):
    """Keeps x where keep_lo <= d <= keep_hi, zero elsewhere (tril / triu)."""
    keep = [(lo, hi, num(lo >= keep_lo and hi <= keep_hi)) for lo, hi in
            _intervals(keep_lo, keep_hi)]
    return pw_where(keep, x, pw_const(ZERO))


def _intervals(a, b):
    out = []
    if a != -INF:
        out.append((-INF, a - 1))
    out.append((a, b))
    if b != INF:
        out.append((b + 1, INF))
    return out
