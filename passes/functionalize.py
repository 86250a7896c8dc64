"""In-place ops on fresh tensors, made out of place before the analysis.

``dm.masked_fill_(future, 0)``, ``s *= mask`` and ``ones(...).triu_(1)`` write a tensor
that the graph itself created and that nothing else aliases: replacing the write by
its out-of-place op, and every later read of the tensor by the result, computes the
same values, and lets the prover read the mask as a function of its producers.  A
write to a graph input, to a view, or to a tensor that has views is left as it is
(mutation.py then keeps the site unproven while the write can matter)."""
import torch

from .mutation import alias_base, written_arg


def _out_of_place(op):
    """The out-of-place overload of an in-place ATen op (masked_fill_.Scalar ->
    masked_fill.Scalar), or None."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    name = op.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    overload = getattr(packet, op._overloadname, None) if packet is not None else None
    if overload is None or overload._schema.is_mutable:
        return None
    return overload


def functionalize_fresh(graph, order):
    """Rewrites the in-place ops on fresh, unaliased tensors of ``graph`` out of place
    (in place; ``order`` maps nodes to positions).  Returns the number rewritten."""
    count = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or \
                not n.target._schema.is_mutable:
            continue
        pure = _out_of_place(n.target)
        x = written_arg(n)
        # x fresh (not a view, not an input) and without views of its own: every read of
        # x is then a read of its value before or after this write
        if pure is None or not isinstance(x, torch.fx.Node) or x is not n.args[0] or \
                x.op != "call_function" or alias_base(x) is not None or \
                any(u is not n and alias_base(u) is x for u in x.users):
            continue
        with graph.inserting_before(n):
            y = graph.call_function(pure, n.args, n.kwargs)
        y.meta = dict(n.meta)
        order[y] = order[n]
        at = order[n]
        n.replace_all_uses_with(y)
        for u in list(x.users):
            if u is not n and order[u] > at:
                u.replace_input_with(x, y)
        graph.erase_node(n)
        count += 1
    return count
