"""The dims of a contraction's operands (matmul/bmm/mm/einsum) given its output's dims.

A dim's *role* names what it indexes: batch roles ``b``, ``h`` (``bh`` for a merged
B*H dim), positions ``i`` / ``j``, feature dims, ``c`` for the contracted dim, or None
for a broadcast size-1 dim."""
from .errors import Unproven
from .graph import aten, is_one, packet, shape


def bcast(n, out_roles):
    """Roles of tensor n's dims when n is broadcast to a result with out_roles."""
    import torch

    if not isinstance(n, torch.fx.Node):
        return ()
    shp = shape(n)
    k = len(out_roles) - len(shp)
    if k < 0:
        raise Unproven("broadcast to fewer dims")
    return tuple(None if is_one(s) else out_roles[k + d] for d, s in enumerate(shp))


def bcast_batch(shp, batch):
    k = len(batch) - len(shp)
    return tuple(None if is_one(s) else batch[k + d] for d, s in enumerate(shp))


def contraction_roles(n, out_roles):
    """((a, roles_a), (b, roles_b), number of contracted dims) of a two-operand
    contraction node with the given output roles."""
    if packet(n) == aten.einsum:
        eq, ops = n.args[0], n.args[1]
        if len(ops) != 2:
            raise Unproven("einsum with other than two operands")
        ins, out = einsum_letters(eq, [len(shape(o)) for o in ops])
        letter_role = dict(zip(out, out_roles))
        contracted = (set(ins[0]) & set(ins[1])) - set(out)
        if (set(ins[0]) ^ set(ins[1])) - set(out) or len(set(ins[0])) != len(ins[0]) or \
                len(set(ins[1])) != len(ins[1]):
            raise Unproven("einsum with a summed or repeated index")
        res = []
        for o, letters in zip(ops, ins):
            res.append((o, tuple("c" if L in contracted else (None if is_one(s) else letter_role[L])
                                 for L, s in zip(letters, shape(o)))))
        return res[0], res[1], len(contracted)
    a, b = n.args[0], n.args[1]
    sa, sb = shape(a), shape(b)
    if len(sa) < 2 or len(sb) < 2:
        raise Unproven("matmul of a vector")
    batch = out_roles[:-2]
    ra = bcast_batch(sa[:-2], batch) + (out_roles[-2], "c")
    rb = bcast_batch(sb[:-2], batch) + ("c", out_roles[-1])
    return (a, ra), (b, rb), 1


def einsum_letters(eq, ndims):
    """(input letter strings, output letters) with ellipses spelled out."""
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
        ell_letters = "".join(ell or [])  # implicit output: the ellipsis dims, then sorted single letters
        rhs = ell_letters + "".join(sorted(L for L in set(letters) if letters.count(L) == 1 and L not in ell_letters))
    elif "..." in rhs:
        rhs = rhs.replace("...", "".join(ell or []))
    return res, rhs
