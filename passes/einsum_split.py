"""n-ary einsums read as chains of two-operand ones, which the pass proves on."""
import contextlib

from .contractions import einsum_letters
from .graph import aten, packet, shape, val


def split_einsum(graph, n, fake_mode):
    """Inserts before n a left-to-right chain of two-operand einsums that computes n's
    value (the order torch.einsum itself contracts in without opt_einsum) and returns
    its nodes (the last one gives the value); n is left as it is (the caller keeps the
    chain only if it proves a site).  [] when n is not an einsum of three or more
    operands."""
    if packet(n) != aten.einsum or len(n.args[1]) < 3:
        return []
    ops = list(n.args[1])
    try:
        ins, out = einsum_letters(n.args[0], [len(shape(o)) for o in ops])
    except Exception:
        return []
    chain = []
    acc, letters = ops[0], ins[0]
    for k in range(1, len(ops)):
        later = set(out).union(*ins[k + 1:])
        new = out if k == len(ops) - 1 else "".join(dict.fromkeys(L for L in letters + ins[k] if L in later))
        eq = f"{letters},{ins[k]}->{new}"
        with graph.inserting_before(n):
            node = graph.call_function(aten.einsum.default, (eq, [acc, ops[k]]))
        node.meta = {key: value for key, value in n.meta.items() if key not in ("val", "tensor_meta")}
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            node.meta["val"] = aten.einsum.default(eq, [val(acc), val(ops[k])])
        acc, letters = node, new
        chain.append(node)
    return chain
