"""In-place writes that would make the proof or the operator see other values than eager.

Aliasing is read from the op schemas (every argument with alias info: views,
split/unbind/chunk, a no-op ``to``, the written input of in-place and out= ops), so no
list of view ops can miss one."""
import bisect
import operator

import torch

from .errors import Unproven
from .graph import is_mutating


def written_arg(n):
    """The argument an in-place op writes (its first mutable argument)."""
    for k, a in enumerate(n.target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return n.args[k] if k < len(n.args) else n.kwargs.get(a.name)
    return None


def alias_base(x):
    """The node x may share storage with, or None."""
    if not isinstance(x, torch.fx.Node) or x.op != "call_function":
        return None
    if x.target is operator.getitem:  # an element of split / unbind / chunk
        src = x.args[0]
        return src if alias_base(src) is not None else None
    if not isinstance(x.target, torch._ops.OpOverload):
        return None
    for k, a in enumerate(x.target._schema.arguments):
        if a.alias_info is not None:
            arg = x.args[k] if k < len(x.args) else x.kwargs.get(a.name)
            return arg if isinstance(arg, torch.fx.Node) else None
    return None


def alias_class(n):
    """Nodes that may share storage with n (connected through alias_base)."""
    seen, todo = {n}, [n]
    while todo:
        x = todo.pop()
        nbrs = [u for u in x.users if alias_base(u) is x]
        b = alias_base(x)
        if b is not None:
            nbrs.append(b)
        for y in nbrs:
            if y not in seen:
                seen.add(y)
                todo.append(y)
    return seen


class Writes:
    """The in-place ops of a graph in order, computed once per pass (linear time)."""

    def __init__(self, order):
        self.order = order
        # detach_ changes autograd metadata, not values
        self.nodes = sorted((n for n in order if is_mutating(n) and n.target is not torch.ops.aten.detach_.default),
                            key=order.__getitem__)
        self.keys = [order[n] for n in self.nodes]

    def before(self, anchor):
        return self.nodes[:bisect.bisect_left(self.keys, self.order[anchor])]


def check_mutations(writes, modeled, opaque, reads, anchor):
    """Unproven if an in-place op may change what the site computes.

    ``modeled``: nodes whose values the proof computed (nothing may write them from
    their creation to their last use in the site); ``opaque``: nodes taken as they are
    (nothing may write them between their first and last use there); ``reads``: what
    the operator reads at ``anchor`` (q, k, v, decay tensors), whose values must stay
    as the site saw them up to the anchor.  Graph inputs may alias each other at run
    time, so for a node viewing an input, a write to any input counts."""
    order = writes.order
    ws = writes.before(anchor)
    if not ws:
        return
    end = order[anchor]
    inside = modeled | opaque | {anchor}
    for x in modeled | opaque | reads:
        uses = [order[u] for u in x.users if u in inside and u in order]
        if not uses:
            continue
        first = order[x] if x in modeled else min(uses)
        last = end if x in reads else max(uses)
        cls = alias_class(x)
        from_input = any(y.op == "placeholder" for y in cls)
        for u in ws:
            if u is x or not first < order[u] < last:
                continue
            w = written_arg(u)
            if w in cls or (from_input and isinstance(w, torch.fx.Node) and
                            any(y.op == "placeholder" for y in alias_class(w))):
                raise Unproven(f"{x.name} is mutated in place by {u.name} while the attention reads it")
