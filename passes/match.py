"""Finds ``(q @ k^T) * M @ v`` at a contraction and proves M (the straight walk:
candidate roles -> interpret P -> canonical form -> in-place checks -> Match)."""
import dataclasses

import torch

from . import terms as T
from .canonical import Decay, canonical, mask_pieces
from .contractions import contraction_roles, einsum_letters
from .errors import Unproven
from .graph import aten, is_contraction, packet, same, shape, upper_bound
from .interpreter import MaskInterpreter
from .mutation import check_mutations

# Positions are bounded by this when a length is symbolic; the rewritten graph checks it.
SYMBOLIC_LENGTH_CAP = 2 ** 24


@dataclasses.dataclass
class Match:
    out: torch.fx.Node  # the output contraction P @ v
    out_roles: tuple
    v: torch.fx.Node
    v_roles: tuple
    interp: MaskInterpreter
    decay: Decay
    facts: T.Facts
    length_checks: list  # (SymInt size, cap): sizes the rewritten graph asserts


#: most batch dims (not of size 1) a site may have: b, the extra ones, h
MAX_BATCH_DIMS = 5


def _batch_names(sizes):
    """Roles of an output's batch dims: None for a size-1 dim; the others are b, h (or
    one merged bh), and with three or more, b, b1, b2, ..., h: the extra dims (Mamba2's
    chunks) are batch dims of their own, which the rewrite merges into the operator's B
    (every value the proof reads keeps them as dims of their own, so a decay that
    depends on one is read per element of it).  None overall for more than
    MAX_BATCH_DIMS."""
    from .graph import is_one

    big = [k for k, s in enumerate(sizes) if not is_one(s)]
    if len(big) > MAX_BATCH_DIMS:
        return None
    names = {0: (), 1: ("bh",), 2: ("b", "h")}.get(len(big)) or \
        ("b",) + tuple(f"b{k}" for k in range(1, len(big) - 1)) + ("h",)
    roles = [None] * len(sizes)
    for k, name in zip(big, names):
        roles[k] = name
    return tuple(roles)


def _candidates(n):
    """(index of P among the operands, output roles) for each reading of n as P @ v."""
    nd = len(shape(n))
    if packet(n) != aten.einsum:
        names = _batch_names(shape(n)[:-2])
        # P @ v, or the transposed product v^T @ P^T (= (P @ v)^T)
        return [] if names is None else [(0, names + ("i", "e")), (1, names + ("e", "i"))]
    try:
        ins, out = einsum_letters(n.args[0], [len(shape(o)) for o in n.args[1]])
    except Exception:
        return []
    if len(ins) != 2:
        return []
    free = [L for L in out if not (L in ins[0] and L in ins[1])]
    batch_letters = [L for L in out if L in ins[0] and L in ins[1]]
    if len(free) != 2 or len(batch_letters) != nd - 2:
        return []
    names = _batch_names([shape(n)[out.index(L)] for L in batch_letters])
    if names is None:
        return []
    res = []
    for p_idx in (0, 1):
        i_letter = next((L for L in free if L in ins[p_idx]), None)
        e_letter = next((L for L in free if L in ins[1 - p_idx]), None)
        if i_letter is None or e_letter is None:
            continue
        bn = dict(zip(batch_letters, names))
        res.append((p_idx, tuple(bn[L] if L in bn else ("i" if L == i_letter else "e") for L in out)))
    return res


def _position_range(size):
    """(largest position, check): exact for a static size; for a symbolic one its known
    bound, else SYMBOLIC_LENGTH_CAP with a run-time check."""
    if isinstance(size, int):
        return size - 1, None
    hi = upper_bound(size)
    if hi is not None and hi <= SYMBOLIC_LENGTH_CAP:
        return hi - 1, None
    return SYMBOLIC_LENGTH_CAP - 1, (size, SYMBOLIC_LENGTH_CAP)


def analyze(n, writes):
    """Match and prove at the contraction n: a Match, None (not attention), or
    Unproven (a near miss, with the reason)."""
    first_error = None
    for p_idx, out_roles in _candidates(n):
        (a, ra), (b, rb), nc = contraction_roles(n, out_roles)
        if nc != 1:
            continue
        (p, rp), (v, rv) = ((a, ra), (b, rb)) if p_idx == 0 else ((b, rb), (a, ra))
        if "i" not in rp or "e" not in rv:
            continue
        rp = tuple("j" if r == "c" else r for r in rp)
        rv = tuple("j" if r == "c" else r for r in rv)
        ps = shape(p)
        ti, tj = ps[rp.index("i")], ps[rp.index("j")]
        if not same(ti, tj) or not _has_scores_upstream(p):
            continue
        try:
            return _prove(n, out_roles, p, rp, v, rv, ti, writes)
        except Unproven as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return None


def _prove(n, out_roles, p, rp, v, rv, size, writes):
    last, check = _position_range(size)
    interp = MaskInterpreter()
    facts = T.Facts(last, last, value_of=interp.constant_value)
    with T.facts_for(facts):
        pw = interp.ev(p, rp)
        if interp.scores is None:
            raise Unproven("no q @ k^T contraction found in the attention weights")
        mask, scores = mask_pieces(pw)
        if not scores:
            raise Unproven("the attention weights are not the scores times a mask")
        decay = canonical(T.merge(mask), _unit_roundoff(n))
        _check_operator_growth(decay, last, interp.scores[0])
    check_mutations(writes, interp.nodes - interp.opaque, interp.opaque, _operator_reads(interp, v, decay), n)
    return Match(n, out_roles, v, rv, interp, decay, facts, [check] if check else [])


# The longest chunk of any backend (the Triton kernel's BT is 32 or 64; the CPU kernel's 32).
_MAX_CHUNK = 64


def _check_operator_growth(decay, last, q):
    """A growing decay (per-step log decay g > 0) makes the operator's own intermediates,
    the weights inside a chunk and the states across chunks, as large as exp(g d) for d up
    to the chunk length: they must stay well inside its compute dtype (float32: exp(64),
    leaving ~1e10 for the data; float64: exp(640)) even where eager's mask does not
    overflow because a small constant scales it (fuzz seed 19487: exp(6 d) * 1e-30)."""
    from .graph import val

    known = T.facts().coef_range(decay.coef)
    if known is None or known[1] <= 0:
        return
    limit = 640.0 if val(q).dtype == torch.float64 else 64.0
    if known[1] * min(last, _MAX_CHUNK) >= limit:
        raise Unproven(f"the decay grows by exp({known[1]:g}) a step: the operator's weights and states "
                       f"would overflow its {'float64' if limit > 64 else 'float32'} arithmetic inside a chunk")


def _unit_roundoff(n):
    """The unit roundoff of the site's result: its dtype's, or that of the cast it goes
    through straight away (a float32 contraction whose result is cast to bf16 is a bf16
    result)."""
    from .arith import unit_roundoff
    from .graph import val

    u = 0.0
    for _ in range(8):
        v = val(n)
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            u = max(u, unit_roundoff(v.dtype))
        if len(n.users) != 1:
            break
        (n,) = n.users
        if packet(n) not in (aten._to_copy, aten.to, aten.view, aten.reshape, aten.transpose,
                             aten.permute, aten.contiguous, aten.clone):
            break
    return u or unit_roundoff(torch.float64)


def _operator_reads(interp, v, decay):
    """The nodes the operator call reads (at the site's output contraction)."""
    q, _, k, _, _ = interp.scores
    coefs = [decay.m, decay.coef, *decay.cums.values()]
    nodes = {q, k, v} | {n for c in coefs for n, _ in T.recipe_nodes(c)} | {key[0] for key in decay.cums}
    return {n for n in nodes if isinstance(n, torch.fx.Node)}


_BOUNDARIES = {aten.linear, aten.addmm, aten.baddbmm, aten.conv1d, aten.conv2d, aten.convolution}


def _has_scores_upstream(p, limit=2000):
    """Whether a contraction feeds p through non-contraction ops (keeps plain
    projections out of the near-miss report)."""
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
