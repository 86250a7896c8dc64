"""The machine's arithmetic: what each node's dtype does to the exact values.

The rules (rules.py) compute exact values; :func:`in_dtype` then applies the node's
dtype to every piece, over the whole proven range of positions (terms.Facts):

* float: constants are rounded to the dtype (1e-60 is 0 in float32, 1e300 is inf); an
  index expression is exact only while it is an integer combination of positions whose
  magnitude stays within the dtype's exact integers (2**24 in float32, 2**53 in
  float64, 256 in bfloat16, 2048 in float16); otherwise it carries one more relative
  rounding (``rel += u``) and, through cancellation, absolute error (terms.t_add).
  Comparisons need exact values; exponents need a small error.  An exponential's
  magnitude bounds decide whether eager overflows to inf or underflows somewhere.
* integer: every value must be an exact integer in the dtype's range (no wrap, no
  truncation).
* bool: saturating (True + True is True).
"""
import math

import torch

from . import terms as T
from .errors import Unproven

INF = math.inf

# significand bits (implicit bit included): integers up to 2**p are exact
_PRECISION = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}

# A decay weight may differ from eager's by at most this many units of roundoff of the
# site's output dtype (relative), besides the |x| * u any two float implementations of
# exp(x) differ by: lower-precision mask arithmetic (bf16 exponents in a float32 model,
# a mask cast to float16) changes eager's result beyond that and is left alone.
WEIGHT_TOL_ULPS = 16
# ... of the output dtype, or of float32 (the operator's own accumulation), whichever is larger
FLOAT32_ROUNDOFF = 2.0 ** -24


def unit_roundoff(dtype):
    return 2.0 ** -_PRECISION[dtype]


def _round(x, dtype):
    """x as dtype stores it (round to nearest; overflow to inf; underflow to 0)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return x
    if math.isnan(x) or math.isinf(x):
        return x
    try:
        return torch.tensor(float(x), dtype=torch.float64).to(dtype).item()
    except (RuntimeError, OverflowError):
        return math.copysign(math.inf, x)


def _integral(c):
    return isinstance(c, int) or isinstance(c, float) and math.isfinite(c) and c.is_integer()


def in_dtype(dtype, pw, rounds=True):
    """pw (exact values) as the values a node of ``dtype`` holds in eager.  ``rounds``:
    the op computed new values (else it only selected or moved its inputs' values)."""
    if dtype == torch.bool:
        return T.lift(_as_bool)(pw)
    if dtype.is_complex:
        raise Unproven("a complex mask")
    if dtype.is_floating_point:
        return T.pw_map(lambda lo, hi, t: _in_float(t, dtype, lo, hi, rounds), pw)
    return T.pw_map(lambda lo, hi, t: _in_int(t, dtype, lo, hi), pw)


def _as_bool(t):
    if isinstance(t, T.Num):
        return T.num(bool(t.x))  # nan is True
    if isinstance(t, T.IsNan):
        return t
    raise Unproven(f"a bool tensor holding {T.kind(t)}")


def _in_float(t, dtype, lo, hi, rounds):
    fin = torch.finfo(dtype)
    u = unit_roundoff(dtype)
    if isinstance(t, T.Num):
        return T.num(_round(t.x, dtype))
    if isinstance(t, T.Aff) and rounds and t.atoms:  # (a position-free one is a coefficient: a graph value)
        low, high = T.bounds(t, lo, hi)
        mag = max(abs(low), abs(high))
        if math.isfinite(mag) and mag > fin.max:
            raise Unproven(f"an index expression overflows {dtype} (inf in eager)")
        coefs = [t.c0, *t.coefs().values()]
        exact = t.exact and all(_integral(c) for c in coefs) and \
            all(isinstance(a, T.Pos) for a in t.coefs()) and mag <= 2 ** _PRECISION[dtype]
        if exact:
            return t
        if T.has_positions(t) and all(_integral(c) for c in coefs) and t.exact and \
                all(isinstance(a, T.Pos) for a in t.coefs()):
            # integer positions beyond the exact range: eager rounds them apart
            return T.Aff(t.c0, t.atoms, t.rel + u, t.abs + 0.5 * _ulp(mag, dtype))
        return T.Aff(t.c0, t.atoms, t.rel + 2 * u, t.abs)  # the product/sum and its constant
    if isinstance(t, T.Row):  # a row sum and functions of it: one more rounding
        return T.Row(t.r, t.lo, t.hi, t.rel + u) if rounds else t
    if isinstance(t, T.Exp):
        t = _exp_in_float(t, dtype, lo, hi)
        return T.Exp(t.m, t.x, t.x_max_ok, t.x_min_ok, t.amp, t.rel + u) if rounds else t
    return t


def _ulp(mag, dtype):
    if not math.isfinite(mag):
        return math.inf
    return 2.0 ** (math.frexp(mag)[1] - _PRECISION[dtype])


def _exp_in_float(t, dtype, lo, hi):
    """Tightens the exponent limits where eager's m * exp(x) overflows or underflows."""
    fin = torch.finfo(dtype)
    m = t.m
    if T.is_number(m):
        m = _round(m, dtype)
        if m == 0 or not math.isfinite(m):
            raise Unproven(f"an exponential scaled by {m} in {dtype}")
        x_max = math.log(fin.max) - math.log(abs(m))
        x_min = math.log(fin.tiny) - math.log(abs(m))
        mag = abs(m)
    else:  # a graph value of unknown (finite) magnitude: safe only while exp(x) <= 1
        x_max, x_min, mag = 0.0, INF, None
    t = T.Exp(m, t.x, min(t.x_max_ok, x_max), max(t.x_min_ok, x_min), t.amp, t.rel)
    if t.amp > 1 and T.may_underflow(t, lo, hi) and \
            (mag is None or fin.tiny * t.amp > unit_roundoff(dtype) * mag):
        raise Unproven(f"values of an exponential that underflow in {dtype} are then scaled up "
                       f"by {t.amp:.3g} (eager loses them)")
    return t


def _in_int(t, dtype, lo, hi):
    info = torch.iinfo(dtype)
    if isinstance(t, T.Num):
        x = t.x
        if isinstance(x, float) and not (math.isfinite(x) and x.is_integer()) or \
                not info.min <= x <= info.max:
            raise Unproven(f"the constant {x} in {dtype} (integer arithmetic wraps or truncates)")
        return T.num(int(x))
    if isinstance(t, T.Aff):
        coefs = t.coefs()
        if not t.exact or not all(isinstance(a, T.Pos) for a in coefs) or \
                not all(_integral(c) for c in coefs.values()):
            raise Unproven(f"an index expression in {dtype} that is not an exact integer combination "
                           "of positions")
        if T.is_number(t.c0):
            if not _integral(t.c0):
                raise Unproven(f"a non-integer offset in {dtype}")
            low, high = T.bounds(t, lo, hi)
            if low < info.min or high > info.max:
                raise Unproven(f"positions in {dtype} wrap around for the lengths proven "
                               f"(values up to {max(abs(low), abs(high)):.4g})")
        elif dtype != torch.int64:
            raise Unproven(f"a symbolic offset in {dtype} (may wrap)")
        return t
    raise Unproven(f"{T.kind(t)} in {dtype} (integer arithmetic may wrap or truncate)")
