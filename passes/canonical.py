"""The canonical form of a proven mask: what the operator computes.

A mask given piecewise over d = i - j is a decay mask when, for every b, h, i, j::

    M = m * [j <= i] * exp(coef * (i - j) + sum_k w_k (C_k[i] - C_k[j]))

exactly: the number 0 on every piece with d < 0, the diagonal equal to m * exp(0),
and one and the same exponential form on every piece with d >= 1, which eager computes
without overflow and with a small error in its exponent (arith.py)."""
import dataclasses
import math

from . import terms as T
from .arith import FLOAT32_ROUNDOFF, WEIGHT_TOL_ULPS
from .errors import Unproven


@dataclasses.dataclass
class Decay:
    """A proven mask: m * [j <= i] * exp(coef * (i - j) + sum_k w_k (C_k[i] - C_k[j]))."""

    m: object  # coefficient: number or recipe
    coef: object  # per-step log decay (coefficient)
    cums: dict  # key (node, roles, detached) -> weight


def mask_pieces(pw):
    """(the mask's pieces, whether they multiply the scores) of attention weights given
    piecewise: the scores' factor where they are scores, zeros kept."""
    scores = any(isinstance(t, T.Scores) for _, _, t in pw)
    out = []
    for lo, hi, t in pw:
        if isinstance(t, T.Scores) and scores:
            out.append((lo, hi, t.t))
        elif isinstance(t, T.Num) and t.x == 0:
            out.append((lo, hi, T.ZERO))
        elif not scores:
            out.append((lo, hi, t))
        else:
            raise Unproven("the attention weights are not the scores times a mask "
                           f"({T.kind(t)} for i - j in [{lo}, {hi}])")
    return out, scores


def canonical(pw, u_out, floor=FLOAT32_ROUNDOFF):
    """The :class:`Decay` of a mask given piecewise over d, or Unproven; ``u_out`` is
    the unit roundoff of the site's output dtype; eager's rounding of the weights may be
    WEIGHT_TOL_ULPS units of the larger of it and ``floor`` (the operator's float32)."""
    body = None
    diag = None
    for lo, hi, t in pw:
        if hi < 0:
            if isinstance(t, T.ZeroOrNan):
                raise Unproven("the mask multiplies an exponential that overflows above the diagonal "
                               "by 0 (0 * inf = nan in eager at these lengths); use masked_fill or where")
            if not (isinstance(t, T.Num) and t.x == 0):
                raise Unproven(f"the mask is not zero above the diagonal (j > i) at i - j in [{lo}, {hi}]: "
                               f"{T.kind(t)}")
            continue
        if lo < 0:
            raise Unproven("the mask has the same value above the diagonal and on it "
                           "(not causal, or a diagonal offset)")
        if isinstance(t, T.Num) and t.x == 0:
            raise Unproven(f"the mask is zero for i - j in [{lo}, {hi}] (a diagonal offset)")
        if lo == 0 and hi == 0:
            diag = t
            continue
        form = _exp_form(t, lo, hi, u_out, floor)
        if body is None:
            body = form
        elif form != body:
            raise Unproven("the mask has different decay forms below the diagonal")
    if body is None:
        raise Unproven("the mask is zero everywhere" if diag is None else "the mask is only the diagonal")
    m, c0, coef, cums = body
    if T.is_row(coef) or any(T.is_row(w) for w in cums.values()):
        raise Unproven("the decay depends on a row sum")
    if diag is not None:
        dm, dc0, _, _ = _exp_form(diag, 0, 0, u_out, floor, diag_only=True)
        if (dm, dc0) != (m, c0) and not (T.is_number(dm) and T.is_number(m) and T.is_number(dc0)
                                         and T.is_number(c0) and
                                         math.isclose(dm * math.exp(dc0), m * math.exp(c0), rel_tol=1e-12)):
            raise Unproven("the diagonal of the mask does not match its decay")
    return Decay(T.cmul(m, T.cexp(c0)), coef, cums)


def _exp_form(t, lo, hi, u_out, floor, diag_only=False):
    """(m, c0, coef, cums) with t == m * exp(c0 + coef*(i - j) + sum w (C_i - C_j))."""
    if isinstance(t, T.Num):
        if not (t.x > 0 and math.isfinite(t.x)):
            raise Unproven(f"the mask has the value {t.x} below the diagonal")
        return t.x, 0, 0, {}
    if isinstance(t, T.Row):  # a row factor, no decay: m_i * exp(0)
        if not t.lo > 0:
            raise Unproven("the mask is a row sum that may be <= 0 below the diagonal")
        if t.rel > WEIGHT_TOL_ULPS * max(u_out, floor):
            raise Unproven("eager rounds the row-normalised weights more than the output's precision")
        return t.r, 0, 0, {}
    if not isinstance(t, T.Exp):
        raise Unproven(f"the mask is {T.kind(t)} below the diagonal, not a decay")
    if T.may_overflow(t, lo, hi):
        raise Unproven("the decay overflows to inf in eager for the lengths proven (a growing "
                       "exponential)")
    x = t.x
    tol = WEIGHT_TOL_ULPS * max(u_out, floor)
    if x.abs + t.rel > tol or x.rel > tol:
        raise Unproven("eager rounds the decay weights more than the output's precision (mask "
                       "arithmetic in a lower precision than the output, positions or distances "
                       "beyond the dtype's exact integers, or a difference of large scaled positions)")
    atoms = x.coefs()
    ci, cj = atoms.pop(T.I, 0), atoms.pop(T.J, 0)
    if T.cadd(ci, cj) != 0:
        raise Unproven("the decay exponent is not a function of i - j")
    cums = {}
    for k, v in atoms.items():
        if not isinstance(k, T.Cum):
            raise Unproven("the decay exponent depends on data at one position only")
        cums.setdefault(k.key, {})[k.p] = v
    out = {}
    for key, ws in cums.items():
        wi, wj = ws.get("i", 0), ws.get("j", 0)
        if T.cadd(wi, wj) != 0:
            raise Unproven("a cumsum that is not a segment sum C_i - C_j")
        out[key] = wi
    if diag_only:
        return t.m, x.c0, None, None
    return t.m, x.c0, ci, out


def describe(decay):
    """log_decay as text, for reports."""
    parts = []
    if not (T.is_number(decay.coef) and decay.coef == 0):
        parts.append(T.recipe_str(decay.coef) + " (per head)")
    for (node, _, det), w in decay.cums.items():
        parts.append((T.recipe_str(w) + "*" if w != 1 else "") + T.root_name(node) + (".detach()" if det else "") +
                     " (per position, cumsum)")
    return " + ".join(parts) if parts else "none (plain causal linear attention)"
