"""The values the prover computes with: coefficients, terms and piecewise values.

A tensor in a mask subgraph is described as a function of symbolic indices (batch
roles and the two positions ``i``, ``j``), *piecewise over* ``d = i - j``: a sorted
list of ``(lo, hi, term)`` pieces covering the integers (``lo``/``hi`` may be -inf/inf).

Terms (small frozen classes, compared structurally):

* :class:`Num`: a number (ints stay exact Python ints; may be inf or nan).
* :class:`Aff`: ``c0 + sum(coef * atom)`` with atoms :class:`Pos` (i or j),
  :class:`Cum` (a cumsum over positions of a graph tensor, read at i or j) and
  :class:`Leaf` (a graph tensor read at one position), and an error bound
  ``rel * |value| + abs`` against the exact value (machine rounding, see arith.py).
* :class:`Exp`: ``m * exp(x)`` with ``x`` an Aff.  Eager overflows to inf where x
  exceeds ``x_max_ok`` and underflows where x is below ``x_min_ok`` (the tightest
  limits over the dtypes and factors of the nodes it went through, see arith.py);
  ``amp`` is the product of the constant factors above 1 it was scaled by, ``rel`` the
  relative error eager's rounding of the value itself adds.
* :class:`ZeroOrNan`: 0, or nan where an exp overflowed (``0 * exp(...)``).
* :class:`IsNan`: the boolean ``isnan(term)`` (or its negation) of graph node ``src``.
* :class:`Scores`: the attention scores ``q_i . k_j`` times a term.

A coefficient is a number or a :class:`Recipe`, a position-independent graph
expression that the rewrite turns back into graph nodes (``log_decay``).  Nothing here
knows the graph's dtypes: arith.py applies each node's machine arithmetic.
"""
import dataclasses
import math
import operator
from fractions import Fraction
from typing import Any

from .errors import Unproven

INF = math.inf


# ---------------------------------------------------------------- coefficients


class Recipe:
    """A position-independent graph expression (becomes nodes of log_decay)."""


@dataclasses.dataclass(frozen=True)
class RNode(Recipe):
    node: Any  # a graph node (tensor, or SymInt / SymFloat scalar)
    roles: tuple


@dataclasses.dataclass(frozen=True)
class RScaled(Recipe):
    k: float
    r: Recipe


@dataclasses.dataclass(frozen=True)
class RSum(Recipe):
    a: Any
    b: Any


@dataclasses.dataclass(frozen=True)
class RProd(Recipe):
    a: Any
    b: Any


@dataclasses.dataclass(frozen=True)
class RFn(Recipe):
    fn: str  # "log", "exp", "recip", "detach", "sqrt", "abs"
    r: Any


@dataclasses.dataclass(frozen=True)
class RClamp(Recipe):
    r: Any
    lo: Any  # a number or None
    hi: Any


@dataclasses.dataclass(frozen=True)
class RRowSum(Recipe):
    """A row sum of a proven mask, per (b, h, i): sum over j <= i of
    m * exp(coef * (i - j) + sum_k w_k (C_k[i] - C_k[j])), times the scores q_i . k_j
    if ``scores``.  Not position-free: it may only scale a mask (Exp.m) or another row
    statistic (see :class:`Row`); the rewrite computes it with decay_attn on a column of
    ones, in O(T)."""
    m: Any
    coef: Any
    cums: tuple  # ((cumsum key, weight), ...)
    scores: bool


def is_number(c):
    return isinstance(c, (int, float)) and not isinstance(c, bool) or isinstance(c, bool)


def _split(c):
    if is_number(c):
        return c, None
    if isinstance(c, RScaled):
        return c.k, c.r
    return 1, c


def cmul(a, b):
    if is_number(a) and is_number(b):
        return a * b
    if is_number(b):
        a, b = b, a
    if is_number(a):
        if a == 0:
            return 0
        if a == 1:
            return b
        s, base = _split(b)
        return RScaled(a * s, base) if a * s != 1 else base
    sa, ba = _split(a)
    sb, bb = _split(b)
    return cmul(sa * sb, RProd(ba, bb))


def cadd(a, b):
    if is_number(a) and is_number(b):
        return a + b
    if is_number(a) and a == 0:
        return b
    if is_number(b) and b == 0:
        return a
    sa, ba = _split(a)
    sb, bb = _split(b)
    if ba is not None and ba == bb:
        return cmul(sa + sb, ba)
    return RSum(a, b)


def cneg(a):
    return cmul(-1, a)


def clog(a):
    if is_number(a):
        if a <= 0:
            raise Unproven(f"log of the non-positive constant {a}")
        return math.log(a)
    if isinstance(a, RFn) and a.fn == "exp":
        return a.r
    return RFn("log", a)


def cexp(a):
    if is_number(a):
        return math.exp(a) if a < 700 else INF
    if isinstance(a, RFn) and a.fn == "log":
        return a.r
    return RFn("exp", a)


def crecip(a):
    if is_number(a):
        if a == 0:
            raise Unproven("division by zero")
        return 1.0 / a
    s, base = _split(a)
    return cmul(1.0 / s, RFn("recip", base))


def cdetach(a):
    return a if is_number(a) else RFn("detach", a)


def recipe_nodes(c, out=None):
    """The (node, roles) leaves of a coefficient."""
    out = [] if out is None else out
    if isinstance(c, RNode):
        out.append((c.node, c.roles))
    elif isinstance(c, RRowSum):
        recipe_nodes(c.m, out)
        recipe_nodes(c.coef, out)
        for (node, roles, _), w in c.cums:
            out.append((node, roles))
            recipe_nodes(w, out)
    elif isinstance(c, Recipe):
        for f in dataclasses.fields(c):
            recipe_nodes(getattr(c, f.name), out)
    return out


def is_row(c):
    """Whether coefficient c depends on the query position (holds a row sum)."""
    if isinstance(c, RRowSum):
        return True
    return isinstance(c, Recipe) and not isinstance(c, RNode) and any(
        is_row(getattr(c, f.name)) for f in dataclasses.fields(c))


def cabs_bound(c):
    """An upper bound of |c| (inf for a graph value)."""
    return abs(c) if is_number(c) else INF


# ---------------------------------------------------------------- atoms and terms


@dataclasses.dataclass(frozen=True)
class Pos:
    p: str  # "i" or "j"


I, J = Pos("i"), Pos("j")


@dataclasses.dataclass(frozen=True)
class Cum:
    key: tuple  # (node, roles with positions as "t", detached)
    p: str


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: tuple
    p: str


@dataclasses.dataclass(frozen=True)
class Num:
    x: Any


@dataclasses.dataclass(frozen=True)
class Aff:
    c0: Any
    atoms: frozenset  # of (atom, coefficient)
    rel: float = 0.0  # |computed - exact| <= rel * |exact| + abs
    abs: float = 0.0

    def coefs(self):
        return dict(self.atoms)

    @property
    def exact(self):
        return self.rel == 0 and self.abs == 0


@dataclasses.dataclass(frozen=True)
class Exp:
    m: Any  # nonzero coefficient
    x: Aff
    x_max_ok: float = INF
    x_min_ok: float = -INF
    amp: float = 1.0
    rel: float = 0.0  # relative error of the value from rounding it (not its exponent)


def exp_range(t, lo, hi):
    """Bounds of an Exp's exponent on [lo, hi], its rounding error included."""
    xlo, xhi = bounds(t.x, lo, hi, decay=True)
    return xlo - t.x.abs, xhi + t.x.abs


def may_overflow(t, lo, hi):
    return exp_range(t, lo, hi)[1] > t.x_max_ok


def may_underflow(t, lo, hi):
    return exp_range(t, lo, hi)[0] < t.x_min_ok


@dataclasses.dataclass(frozen=True)
class ZeroOrNan:
    pass


@dataclasses.dataclass(frozen=True)
class IsNan:
    t: Any
    positive: bool
    src: Any


@dataclasses.dataclass(frozen=True)
class Scores:
    t: Any


@dataclasses.dataclass(frozen=True)
class Row:
    """A statistic of one query row (b, h, i): the recipe ``r`` holds a row sum
    (RRowSum) and functions of it, its value is finite and within [lo, hi], and eager's
    rounding of it is at most ``rel`` relative.  It may scale a mask or the scores
    (torchscale's ``mask / mask.sum(-1).sqrt()``, ``qk / qk.sum(-1).abs().clamp(1)``)."""
    r: Any
    lo: float = -math.inf
    hi: float = math.inf
    rel: float = 0.0


ZERO, ONE = Num(0), Num(1)


def num(x):
    if isinstance(x, bool):
        return Num(int(x))
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 2 ** 63:
        return Num(int(x))
    return Num(x)


def aff(c0, atoms=None, rel=0.0, abs_=0.0):
    atoms = {k: v for k, v in (atoms or {}).items() if not (is_number(v) and v == 0)}
    if not atoms and is_number(c0) and rel == 0 and abs_ == 0:
        return num(c0)
    return Aff(c0, frozenset(atoms.items()), rel, abs_)


def as_aff(t):
    """(c0, atoms dict, rel, abs) of a Num or Aff term, else None."""
    if isinstance(t, Num):
        return t.x, {}, 0.0, 0.0
    if isinstance(t, Aff):
        return t.c0, t.coefs(), t.rel, t.abs
    return None


def kind(t):
    return {Num: "a constant", Aff: "an index expression", Exp: "an exponential",
            ZeroOrNan: "0*inf (nan)", IsNan: "an isnan test", Scores: "the scores",
            Row: "a row sum"}[type(t)]


def has_positions(t):
    return isinstance(t, Aff) and any(isinstance(a, Pos) for a, _ in t.atoms)


# ---------------------------------------------------------------- ranges


@dataclasses.dataclass
class Facts:
    """What the proof knows and assumes about one site: the largest query and key
    positions (``ti``, ``tj``: T - 1, exact or an upper bound), and the value facts it
    had to assume (``assumed``: coefficients taken to be <= 0, which the rewritten
    graph checks at run time)."""

    ti: int
    tj: int
    assumed: set = dataclasses.field(default_factory=set)
    value_of: Any = None  # node -> its constant value (a tensor) when the graph fixes it, else None

    def coef_range(self, c):
        """(low, high) over the elements of a coefficient whose value the graph fixes
        (a number, or a recipe of constant tensors), else None."""
        if is_number(c):
            return c, c
        t = self._eval(c)
        if t is None or t.numel() == 0 or not bool(t.isfinite().all()):
            return None
        return t.min().item(), t.max().item()

    def _eval(self, c):
        import torch

        if isinstance(c, RNode):
            return self.value_of(c.node) if self.value_of is not None else None
        if isinstance(c, RScaled):
            t = self._eval(c.r)
            return None if t is None else t * c.k
        if isinstance(c, (RSum, RProd)):
            a, b = (x if is_number(x) else self._eval(x) for x in (c.a, c.b))
            if a is None or b is None:
                return None
            try:  # the two sides may index different dims: their elementwise ranges
                return (a + b) if isinstance(c, RSum) else (a * b)
            except RuntimeError:
                return None
        if isinstance(c, RFn):
            t = self._eval(c.r)
            if t is None:
                return None
            return {"log": torch.log, "exp": torch.exp, "recip": torch.reciprocal,
                    "detach": lambda x: x}[c.fn](t)
        return None


_facts = []


class facts_for:
    """Context: the Facts of the site being proven (term functions read them)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        _facts.append(self.f)
        return self.f

    def __exit__(self, *exc):
        _facts.pop()


def facts():
    return _facts[-1]


@dataclasses.dataclass(frozen=True)
class NonPositive:
    """Assumed: the graph coefficient ``c`` is <= 0 (a decay, not a growth)."""
    c: Any


@dataclasses.dataclass(frozen=True)
class NonPositiveCum:
    """Assumed: ``w * a <= 0`` for the data ``a`` of a cumsum (key): a decaying segment sum."""
    key: tuple
    w: Any


@dataclasses.dataclass(frozen=True)
class Negative:
    """Assumed: the graph coefficient ``c`` is < 0 and finite (``inf * c`` is ``-inf``)."""
    c: Any


@dataclasses.dataclass(frozen=True)
class Positive:
    """Assumed: the graph coefficient ``c`` is > 0 (the base of a power)."""
    c: Any


def bounds(t, lo, hi, decay=False):
    """(low, high) of an Aff/Num term's exact value for d in [lo, hi].

    With ``decay`` (the term is an exponent), a graph coefficient of i - j, and a
    cumsum difference, are *assumed* to be <= 0 per step (a decay); the assumption is
    recorded in facts().assumed and becomes a run-time precondition."""
    if isinstance(t, Num):
        return (t.x, t.x) if not math.isnan(t.x) else (-INF, INF)
    f = facts()
    c0, atoms = t.c0, t.coefs()
    if not is_number(c0):
        return -INF, INF
    ci, cj = atoms.pop(I, 0), atoms.pop(J, 0)
    dlo, dhi = max(lo, -f.tj), min(hi, f.ti)
    if dlo > dhi:  # no element of the tensor lies on this piece
        return 0, 0
    low = high = c0
    # ci*i + cj*j: a multiple of d = i - j when cj == -ci, else i in [0, ti], j in [0, tj]
    if is_number(ci) and is_number(cj):
        spans = [(ci, dlo, dhi)] if ci + cj == 0 else [(ci, 0, f.ti), (cj, 0, f.tj)]
        for coef, a, b in spans:
            if coef != 0:
                x, y = coef * a, coef * b
                low, high = low + min(x, y), high + max(x, y)
    elif cadd(ci, cj) == 0 and f.coef_range(ci) is not None:  # a coefficient the graph fixes
        cl, ch = f.coef_range(ci)
        prods = [x * y for x in (cl, ch) for y in (dlo, dhi) if math.isfinite(y) or x != 0]
        low, high = low + min(prods), high + max(prods)
    elif decay and cadd(ci, cj) == 0:
        f.assumed.add(NonPositive(ci))  # ci * d <= 0 for d >= 0
        low, high = low + (-INF if dhi > 0 else 0), high + (INF if dlo < 0 else 0)
    else:
        return -INF, INF
    cums = {}
    for a, w in atoms.items():
        if not isinstance(a, Cum):
            return -INF, INF
        cums.setdefault(a.key, {})[a.p] = w
    for key, ws in cums.items():
        wi, wj = ws.get("i", 0), ws.get("j", 0)
        if not decay or cadd(wi, wj) != 0:
            return -INF, INF
        f.assumed.add(NonPositiveCum(key, wi))  # w * sum of the data over (j, i] <= 0 for i >= j
        low, high = low + (-INF if dhi > 0 else 0), high + (INF if dlo < 0 else 0)
    return low, high


def magnitude(t, lo, hi):
    """An upper bound of |t| on [lo, hi] (Aff/Num)."""
    a, b = bounds(t, lo, hi)
    return max(abs(a), abs(b))


# ---------------------------------------------------------------- term arithmetic


def _err_add(a, b, lo, hi):
    """The (rel, abs) error bound of a + b from those of a and b."""
    fa, fb = as_aff(a), as_aff(b)
    ra, aa, rb, ab = fa[2], fa[3], fb[2], fb[3]
    if ra == 0 and rb == 0:
        return 0.0, aa + ab
    # rel_a |a| <= rel_a (|a + b| + |b|): cancellation turns relative error absolute
    if rb == 0:
        return ra, aa + ab + ra * magnitude(b, lo, hi)
    if ra == 0:
        return rb, aa + ab + rb * magnitude(a, lo, hi)
    r = max(ra, rb)
    return r, aa + ab + 2 * r * min(magnitude(a, lo, hi), magnitude(b, lo, hi))


def t_add(a, b, lo=-INF, hi=INF):
    if isinstance(a, Num) and isinstance(b, Num):
        return num(a.x + b.x)
    if isinstance(b, Num) and b.x == 0:
        return a
    if isinstance(a, Num) and a.x == 0:
        return b
    for x, y in ((a, b), (b, a)):  # finite + inf = inf
        if isinstance(x, Num) and not math.isfinite(x.x) and isinstance(y, Aff):
            return x
    fa, fb = as_aff(a), as_aff(b)
    if fa is not None and fb is not None:
        atoms = dict(fa[1])
        for k, v in fb[1].items():
            atoms[k] = cadd(atoms.get(k, 0), v)
        rel, ab = _err_add(a, b, lo, hi)
        return aff(cadd(fa[0], fb[0]), atoms, rel, ab)
    if isinstance(b, Row):
        a, b = b, a
    if isinstance(a, Row):
        if isinstance(b, Row):
            return Row(cadd(a.r, b.r), a.lo + b.lo, a.hi + b.hi, max(a.rel, b.rel))
        if isinstance(b, Num) and math.isfinite(b.x):
            return Row(cadd(a.r, b.x), a.lo + b.x, a.hi + b.x, a.rel)
        raise Unproven(f"a row sum plus {kind(b)}")
    if isinstance(a, Scores) or isinstance(b, Scores):
        raise Unproven("the scores are added to something (a mask must multiply the scores)")
    raise Unproven(f"cannot add {kind(a)} and {kind(b)}")


def _inf_times(x, c):
    """x * c for x = +-inf and a graph coefficient c: its sign must be known, from the
    values the graph fixes, else it is *assumed* negative (a decay, as torchscale's
    ``exp(inf * decay)`` needs; a run-time precondition). 0 would give nan: unproven."""
    r = facts().coef_range(c)
    if r is None:
        facts().assumed.add(Negative(c))
        return num(-x)
    if r[0] > 0:
        return num(x)
    if r[1] < 0:
        return num(-x)
    raise Unproven("inf times a value that can be 0 or change sign")


def _scale(t, c):
    """t * c for a finite nonzero coefficient c."""
    if isinstance(t, Num):
        if is_number(c):
            return num(t.x * c)
        if t.x == 0:
            return t
        if not math.isfinite(t.x):
            return _inf_times(t.x, c)
        return aff(cmul(t.x, c))
    if isinstance(t, Aff):
        ab = t.abs * cabs_bound(c) if t.abs else 0.0
        return aff(cmul(t.c0, c), {k: cmul(v, c) for k, v in t.atoms}, t.rel, ab)
    if isinstance(t, Exp):
        amp = t.amp * abs(c) if is_number(c) and abs(c) > 1 else t.amp
        return dataclasses.replace(t, m=cmul(t.m, c), amp=amp)
    if isinstance(t, ZeroOrNan):
        return t
    if isinstance(t, Scores):
        return Scores(_scale(t.t, c))
    if isinstance(t, Row):
        if is_number(c):
            lo, hi = sorted((_mul0(t.lo, c), _mul0(t.hi, c)))
            return Row(cmul(c, t.r), lo, hi, t.rel)
        return Row(cmul(c, t.r), -INF, INF, t.rel)
    raise Unproven(f"cannot multiply {kind(t)}")


def t_mul(a, b, lo=-INF, hi=INF):
    if isinstance(a, Scores) and isinstance(b, Scores):
        raise Unproven("the scores are multiplied by themselves")
    if isinstance(b, Scores):
        a, b = b, a
    if isinstance(a, Scores):
        return Scores(t_mul(a.t, b, lo, hi))
    if isinstance(a, Num) and isinstance(b, Num):
        return num(a.x * b.x)
    if isinstance(b, Num):
        a, b = b, a
    if isinstance(a, Num):
        x = a.x
        if math.isnan(x):
            return a
        if x == 0:
            if isinstance(b, (Aff, Row)):  # a row sum is finite
                return ZERO
            if isinstance(b, Exp):
                return ZeroOrNan() if may_overflow(b, lo, hi) else ZERO
            if isinstance(b, ZeroOrNan):
                return b
        if not math.isfinite(x):
            fb = as_aff(b)
            if fb is not None and not fb[1] and fb[2] == 0 and fb[3] == 0:  # a coefficient
                return _inf_times(x, fb[0])
            raise Unproven("inf times a value of unknown sign")
        if isinstance(b, IsNan):
            raise Unproven("arithmetic on an isnan test")
        return _scale(b, x)
    if isinstance(a, ZeroOrNan) or isinstance(b, ZeroOrNan):
        if isinstance(a, IsNan) or isinstance(b, IsNan):
            raise Unproven("arithmetic on an isnan test")
        return ZeroOrNan()
    fa, fb = as_aff(a), as_aff(b)
    if fa is not None and not fa[1] and fa[2] == 0 and fa[3] == 0:  # position-free coefficient
        return _scale(b, fa[0])
    if fb is not None and not fb[1] and fb[2] == 0 and fb[3] == 0:
        return _scale(a, fb[0])
    if isinstance(b, Row):
        a, b = b, a
    if isinstance(a, Row):
        return _row_times(a, b)
    if isinstance(a, Exp) and isinstance(b, Exp):
        if not _grow_together(a.x, b.x):
            raise Unproven("a product of exponentials that can overflow and underflow at once "
                           "(inf * 0 = nan in eager at long lengths, e.g. exp(g_i) * exp(-g_j)); "
                           "write one exp of the sum")
        # each factor's limits stay (its own value overflows or underflows in eager)
        # a factor that underflows makes the product smaller still; one that overflows is inf
        if may_overflow(a, lo, hi) or may_overflow(b, lo, hi):
            raise Unproven("a product of exponentials one of which overflows in eager")
        return Exp(cmul(a.m, b.m), t_add(a.x, b.x, lo, hi), amp=max(a.amp, b.amp), rel=a.rel + b.rel)
    raise Unproven(f"cannot multiply {kind(a)} by {kind(b)} (not a decay form)")


def _mul0(x, c):
    """x * c with 0 * inf taken as 0 (bounds)."""
    return 0.0 if x == 0 or c == 0 else x * c


def _row_times(r, t):
    """A row statistic r times t (not a number: _scale does those)."""
    if isinstance(t, Row):
        prods = [_mul0(x, y) for x in (r.lo, r.hi) for y in (t.lo, t.hi)]
        return Row(cmul(r.r, t.r), min(prods), max(prods), r.rel + t.rel)
    if isinstance(t, Exp):  # m_i * exp(x): a mask whose rows are scaled
        amp = max(t.amp, t.amp * max(abs(r.lo), abs(r.hi)))
        return dataclasses.replace(t, m=cmul(t.m, r.r), amp=amp, rel=t.rel + r.rel)
    raise Unproven(f"a row sum times {kind(t)} (only a mask or the scores may be scaled by one)")


def row_fn(fn, t):
    """sqrt / abs / detach of a row statistic (with its bounds)."""
    if fn == "sqrt":
        if t.lo < 0:
            raise Unproven("the square root of a row sum that can be negative")
        return Row(RFn("sqrt", t.r), math.sqrt(t.lo), math.sqrt(t.hi), t.rel)
    if fn == "abs":
        lo = 0.0 if t.lo <= 0 <= t.hi else min(abs(t.lo), abs(t.hi))
        return Row(RFn("abs", t.r), lo, max(abs(t.lo), abs(t.hi)), t.rel)
    if fn == "detach":
        return Row(cdetach(t.r), t.lo, t.hi, t.rel)
    raise AssertionError(fn)


def row_clamp(t, lo_v, hi_v):
    lo, hi = t.lo, t.hi
    if lo_v is not None:
        lo, hi = max(lo, lo_v), max(hi, lo_v)
    if hi_v is not None:
        lo, hi = min(lo, hi_v), min(hi, hi_v)
    return Row(RClamp(t.r, lo_v, hi_v), lo, hi, t.rel)


def _grow_together(a, b):
    """Whether exp(a) * exp(b) is never inf * 0: one exponent is position-free, or the
    position part of b is a positive multiple of that of a."""
    pa, pb = dict(a.atoms) if isinstance(a, Aff) else {}, dict(b.atoms) if isinstance(b, Aff) else {}
    if not pa or not pb:
        return True
    if pa.keys() != pb.keys():
        return False
    ratios = []
    for k in pa:
        if pa[k] == pb[k]:
            ratios.append(1.0)
        elif is_number(pa[k]) and is_number(pb[k]):
            ratios.append(pb[k] / pa[k])
        else:
            return False
    return ratios[0] > 0 and all(math.isclose(r, ratios[0], rel_tol=1e-9) for r in ratios)


def t_neg(a, lo=-INF, hi=INF):
    return t_mul(a, Num(-1), lo, hi)


def t_recip(a, lo=-INF, hi=INF):
    if isinstance(a, Row):
        if not (a.lo > 0 or a.hi < 0):
            raise Unproven("division by a row sum that can be 0")
        return Row(crecip(a.r), 1.0 / a.hi, 1.0 / a.lo, a.rel)
    if isinstance(a, Num):
        if a.x == 0:
            raise Unproven("division by zero")
        return Num(1.0 / a.x)
    f = as_aff(a)
    if f is not None and not f[1] and f[2] == 0 and f[3] == 0:
        return aff(crecip(f[0]))
    if isinstance(a, Exp):
        if may_underflow(a, lo, hi) or may_overflow(a, lo, hi):
            raise Unproven("1 / an exponential that underflows to 0 or overflows in eager")
        x = a.x
        return Exp(crecip(a.m), aff(cneg(x.c0), {k: cneg(v) for k, v in x.atoms}, x.rel, x.abs),
                   amp=a.amp, rel=a.rel)
    raise Unproven(f"cannot divide by {kind(a)}")


def t_exp(a, base_log=1.0):
    """exp(base_log * a)."""
    if isinstance(a, Num):
        x = a.x * base_log
        return Num(0.0 if x == -INF else (math.exp(x) if x < 700 else INF))
    if isinstance(a, Aff):
        return Exp(1, a if base_log == 1.0 else _scale(a, base_log))
    raise Unproven(f"exp of {kind(a)}")


def t_log(a, lo=-INF, hi=INF):
    if isinstance(a, Num):
        x = a.x
        if x < 0 or math.isnan(x):
            return Num(math.nan)
        return Num(-INF if x == 0 else math.log(x))
    if isinstance(a, Exp):
        if may_overflow(a, lo, hi) or may_underflow(a, lo, hi):
            raise Unproven("log of an exponential that overflows or underflows in eager")
        if is_row(a.m):
            raise Unproven("log of a mask scaled by a row sum")
        return t_add(a.x, aff(clog(a.m)))
    f = as_aff(a)
    if f is not None and not f[1] and f[2] == 0 and f[3] == 0:
        return aff(clog(f[0]))
    raise Unproven(f"log of {kind(a)}")


def t_pow(base, e, lo=-INF, hi=INF):
    if isinstance(base, Row) and isinstance(e, Num) and e.x in (0.5, -0.5):
        root = row_fn("sqrt", base)
        return root if e.x > 0 else t_recip(root)
    if isinstance(base, Num) and isinstance(e, Num):
        try:
            return num(math.pow(base.x, e.x))
        except (OverflowError, ValueError, ZeroDivisionError):
            import torch

            return num(torch.tensor(float(base.x), dtype=torch.float64).pow(float(e.x)).item())
    fb = as_aff(base)
    if fb is not None and not fb[1] and fb[2] == 0 and fb[3] == 0 and as_aff(e) is not None:
        b = fb[0]
        known = facts().coef_range(b)
        if known is not None and known[0] <= 0:
            raise Unproven(f"a power of a base that is {known[0]:.3g} somewhere (eager: 0, 1 or "
                           "alternating signs)")
        if known is None:
            facts().assumed.add(Positive(b))  # log(b) needs b > 0: a run-time check
        return t_exp(t_mul(e, aff(clog(b)), lo, hi))  # b ** x == exp(x log b)
    if isinstance(base, Exp) and isinstance(e, Num):
        if is_number(base.m) and base.m <= 0:
            raise Unproven("power of a negative exponential")
        if may_overflow(base, lo, hi) or may_underflow(base, lo, hi):
            raise Unproven("power of an exponential that overflows or underflows in eager")
        return Exp(cexp(cmul(e.x, clog(base.m))), _scale(base.x, e.x), rel=base.rel * abs(e.x))
    raise Unproven(f"{kind(base)} to the power {kind(e)}")


def t_nan_to_num(t, nan, posinf, neginf, lo=-INF, hi=INF):
    if isinstance(t, Num):
        x = t.x
        if math.isnan(x):
            return num(nan)
        if x == INF:
            return num(posinf)
        if x == -INF:
            return num(neginf)
        return t
    if isinstance(t, ZeroOrNan):
        if nan == 0:
            return ZERO
        raise Unproven("nan_to_num of 0*inf with a nonzero nan value")
    if isinstance(t, Aff):
        return t
    if isinstance(t, Exp):
        if posinf != INF and may_overflow(t, lo, hi):
            raise Unproven("nan_to_num replaces an exponential where it overflows (eager changes "
                           "those weights; the operator would not)")
        return t
    raise Unproven(f"nan_to_num of {kind(t)}")


def t_isnan(t, positive=True, src=None):
    if isinstance(t, Num):
        return num(math.isnan(t.x) == positive)
    if isinstance(t, (Aff, Exp)):
        return num(not positive)
    if isinstance(t, ZeroOrNan):
        return IsNan(t, positive, src)
    raise Unproven(f"isnan of {kind(t)}")


def t_not(t):
    if isinstance(t, Num):
        return num(not t.x)
    if isinstance(t, IsNan):
        return IsNan(t.t, not t.positive, t.src)
    raise Unproven(f"logical not of {kind(t)}")


def t_where(c, a, b, lo=-INF, hi=INF):
    if isinstance(c, Num):
        if math.isnan(c.x):
            raise Unproven("where on a nan condition")
        return a if c.x else b
    if isinstance(c, IsNan):
        if not c.positive:
            a, b = b, a
        # where(isnan(x), v, x) == nan_to_num(x, nan=v)
        if b == c.t and isinstance(a, Num):
            return t_nan_to_num(b, a.x, INF, -INF, lo, hi)
        raise Unproven("select on an isnan test that is not nan_to_num")
    raise Unproven(f"select on {kind(c)} (not a function of i - j)")


def _d_linear(t):
    """(alpha, c) with t == alpha * (i - j) + c exactly, for index-only terms."""
    f = as_aff(t)
    if f is None or not is_number(f[0]):
        return None
    if f[2] or f[3]:
        raise Unproven("a comparison of index values that eager rounds (positions beyond the "
                       "dtype's exact integers, e.g. 256 in bfloat16 or 2**24 in float32, or scaled "
                       "by non-integer factors): its boundary may move")
    atoms = dict(f[1])
    ci, cj = atoms.pop(I, 0), atoms.pop(J, 0)
    if atoms or not (is_number(ci) and is_number(cj)) or ci + cj != 0:
        return None
    return ci, f[0]


CMP = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt,
       "eq": operator.eq, "ne": operator.ne}


def t_cmp(op, a, b, lo, hi):
    """a op b on the d-interval [lo, hi]: a list of (lo, hi, bool term) pieces."""
    if isinstance(a, Num) and isinstance(b, Num):
        return [(lo, hi, num(CMP[op](a.x, b.x)))]
    if as_aff(a) is not None and as_aff(b) is not None:
        lin = _d_linear(t_add(a, t_neg(b)))
        if lin is None:
            raise Unproven("a comparison that is not a function of i - j")
        alpha, c = lin
        if alpha == 0:
            return [(lo, hi, num(CMP[op](c, 0)))]
        return _solve(op, alpha, c, lo, hi)
    raise Unproven(f"comparison of {kind(a)} with {kind(b)}")


def _exact(x):
    return Fraction(x) if isinstance(x, (int, float)) and math.isfinite(x) else x


def _solve(op, alpha, c, lo, hi):
    """Integer d in [lo, hi] with alpha*d + c op 0, as pieces (exact rationals)."""
    x = -_exact(c) / _exact(alpha)  # alpha*d + c == 0 at d == x
    if alpha < 0:  # flip so that the expression grows with d
        op = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}.get(op, op)
    if op in ("eq", "ne"):
        if x != math.floor(x):
            return [(lo, hi, num(op == "ne"))]
        cut = int(x)
        pieces = []
        for a_, b_, v in ((lo, cut - 1, op == "ne"), (cut, cut, op == "eq"), (cut + 1, hi, op == "ne")):
            a_, b_ = max(a_, lo), min(b_, hi)
            if a_ <= b_:
                pieces.append((a_, b_, num(v)))
        return pieces
    first = {"ge": math.ceil(x), "gt": math.floor(x) + 1, "le": math.floor(x) + 1, "lt": math.ceil(x)}[op]
    below = op in ("le", "lt")
    return _two(lo, hi, first, below, not below)


def _two(lo, hi, cut, below, above):
    pieces = []
    if lo <= cut - 1:
        pieces.append((lo, min(hi, cut - 1), num(below)))
    if max(lo, cut) <= hi:
        pieces.append((max(lo, cut), hi, num(above)))
    return pieces


# ---------------------------------------------------------------- piecewise values


# Pieces always break at the diagonal: above it (d <= -1), on it (d = 0), below it
# (d >= 1).  A fact that holds on one side only (an exponential that overflows above
# the diagonal, where the mask later discards it) is then decided there only.
_FIXED_CUTS = (0, 1)


def pw_const(t):
    return [(-INF, -1, t), (0, 0, t), (1, INF, t)]


def uniform(pw):
    """The term of a piecewise value that is the same everywhere, or None."""
    return pw[0][2] if all(t == pw[0][2] for _, _, t in pw) else None


def _cuts(*pws):
    cuts = sorted({p[0] for pw in pws for p in pw} | {p[1] + 1 for pw in pws for p in pw if p[1] != INF})
    return [c for c in cuts if c != -INF]


def _at(pw, d):
    for lo, hi, t in pw:
        if lo <= d <= hi:
            return t
    raise AssertionError("piecewise value does not cover d")


def pw_map(fn, *pws):
    """Applies fn(lo, hi, *terms) piece by piece on the common refinement; fn returns a
    term or a list of (lo, hi, term) pieces inside [lo, hi]."""
    bounds_ = [-INF] + _cuts(*pws)
    out = []
    for n, lo in enumerate(bounds_):
        hi = bounds_[n + 1] - 1 if n + 1 < len(bounds_) else INF
        probe = lo if lo != -INF else (hi if hi != INF else 0)
        r = fn(lo, hi, *[_at(pw, probe) for pw in pws])
        out.extend(r if isinstance(r, list) else [(lo, hi, r)])
    return merge(out)


def merge(pw, keep_cuts=True):
    """Joins adjacent pieces with equal terms (not across the diagonal's cuts)."""
    out = []
    for p in pw:
        if out and out[-1][2] == p[2] and not (keep_cuts and p[0] in _FIXED_CUTS):
            out[-1] = (out[-1][0], p[1], p[2])
        else:
            out.append(p)
    return out


def lift(fn):
    """A piecewise version of a term function (fn(*terms))."""
    return lambda *pws: pw_map(lambda lo, hi, *ts: fn(*ts), *pws)


def lift_d(fn):
    """A piecewise version of a term function that needs the piece (fn(*terms, lo, hi))."""
    return lambda *pws: pw_map(lambda lo, hi, *ts: fn(*ts, lo, hi), *pws)


pw_add = lift_d(t_add)
pw_mul = lift_d(t_mul)
pw_neg = lift_d(t_neg)
pw_recip = lift_d(t_recip)
pw_exp = lift(t_exp)
pw_log = lift_d(t_log)
pw_pow = lift_d(t_pow)
pw_where = lift_d(t_where)
pw_not = lift(t_not)


def pw_cmp(op, a, b):
    return pw_map(lambda lo, hi, x, y: t_cmp(op, x, y, lo, hi), a, b)


def pw_clamp(x, lo_v, hi_v):
    if any(v is not None and math.isnan(v) for v in (lo_v, hi_v)):
        raise Unproven("clamp with a nan bound (nan everywhere in eager)")

    def one(lo, hi, t):
        if isinstance(t, Row):
            return row_clamp(t, lo_v, hi_v)
        if isinstance(t, Num):
            v = t.x
            if math.isnan(v):
                return t
            if lo_v is not None:
                v = max(v, lo_v)
            if hi_v is not None:
                v = min(v, hi_v)
            return num(v)
        if isinstance(t, (Exp, ZeroOrNan)) and hi_v is None and lo_v is not None and lo_v <= 0 and \
                (not isinstance(t, Exp) or is_number(t.m) and t.m > 0):
            return t  # m * exp(...) >= 0 already
        lin = _d_linear(t)
        if lin is None:
            raise Unproven(f"clamp of {kind(t)}")
        pieces = [(lo, hi, t)]
        for bound, op in ((lo_v, "lt"), (hi_v, "gt")):
            if bound is None:
                continue
            new = []
            for a_, b_, tt in pieces:
                if as_aff(tt) is None:
                    new.append((a_, b_, tt))
                    continue
                for c_lo, c_hi, c in t_cmp(op, tt, num(bound), a_, b_):
                    new.append((c_lo, c_hi, num(bound) if c.x else tt))
            pieces = new
        return pieces

    return pw_map(one, x)


def pw_select_d(x, keep_lo, keep_hi):
    """Keeps x where keep_lo <= d <= keep_hi, zero elsewhere (tril / triu)."""
    keep = [(lo, hi, num(lo >= keep_lo and hi <= keep_hi)) for lo, hi in _intervals(keep_lo, keep_hi)]
    return pw_where(keep, x, pw_const(ZERO))


def _intervals(a, b):
    out = []
    if a != -INF:
        out.append((-INF, a - 1))
    out.append((a, b))
    if b != INF:
        out.append((b + 1, INF))
    return out


# ---------------------------------------------------------------- text (for reports)

_THROUGH = ("unsqueeze", "squeeze", "view", "reshape", "expand", "slice", "clone", "contiguous",
            "_to_copy", "to", "alias", "lift_fresh_copy", "_unsafe_view")


def root_name(n):
    """The name of the tensor a node views (through reshapes and casts)."""
    while n.op == "call_function" and getattr(getattr(n.target, "overloadpacket", None), "__name__", "") \
            in _THROUGH and hasattr(n.args[0], "op"):
        n = n.args[0]
    return n.name


def recipe_str(c):
    """A short readable form of a coefficient."""
    if is_number(c):
        return f"{c:.6g}"
    if isinstance(c, RNode):
        return root_name(c.node)
    if isinstance(c, RScaled):
        return f"{c.k:.6g}*{recipe_str(c.r)}"
    if isinstance(c, RProd):
        return f"{recipe_str(c.a)}*{recipe_str(c.b)}"
    if isinstance(c, RRowSum):
        return "rowsum(" + ("scores*" if c.scores else "") + "mask)"
    if isinstance(c, RClamp):
        bounds_ = ", ".join(f"{k}={v:g}" for k, v in (("min", c.lo), ("max", c.hi)) if v is not None)
        return f"clamp({recipe_str(c.r)}, {bounds_})"
    if isinstance(c, RSum):
        return f"({recipe_str(c.a)} + {recipe_str(c.b)})"
    if c.fn == "recip":
        return f"1/{recipe_str(c.r)}"
    if c.fn == "abs":
        return f"|{recipe_str(c.r)}|"
    if c.fn == "detach":
        return f"{recipe_str(c.r)}.detach()"
    return f"{c.fn}({recipe_str(c.r)})"
