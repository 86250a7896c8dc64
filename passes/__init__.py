"""leet_compile.passes: the decay-attention rewrite pass on ATen IR.

Reading order (each file one job): match.py finds ``P @ v`` contractions and drives the
proof; interpreter.py evaluates P's producer subgraph with one rule per ATen op
(rules.py) over the term algebra (terms.py) in the machine's arithmetic (arith.py);
canonical.py reads the decay off the result; mutation.py rejects in-place writes;
rewrite.py builds the operator call, guarded by run-time checks (guard.py) where the
proof assumed facts about values.
"""
import torch

from .errors import Unproven
from .report import RewriteReport, Site

__all__ = ["RewriteReport", "Site", "Unproven", "rewrite_decay_attention"]


def rewrite_decay_attention(gm: torch.fx.GraphModule) -> RewriteReport:
    """Rewrites every proven ``(q @ k^T) * M @ v`` in ``gm`` (ATen IR: make_fx
    pre-dispatch graphs, torch.export training or inference IR; placeholders carry
    meta["val"]) into ``torch.ops.leet.decay_attn``, in place.

    Returns a :class:`RewriteReport` of the rewritten sites and of the near misses
    (attention-like sites left alone, with the reason); the report logs and counts
    each (``torch._dynamo.utils.counters["leet"]``: decay_attn_rewrites, near_misses,
    internal_errors).  Linear in the size of the graph: the node order and the
    in-place writes are computed once.
    """
    from .canonical import describe
    from .einsum_split import split_einsum
    from .functionalize import functionalize_fresh
    from .graph import fake_mode_of, is_contraction
    from .match import analyze
    from .mutation import Writes
    from .rewrite import build

    report = RewriteReport()
    graph = gm.graph
    gone = set()  # erased nodes (a node may be a candidate of several removals)
    order = _Order(graph)
    fake_mode = fake_mode_of(graph)
    changed = functionalize_fresh(graph, order)
    writes = Writes(order)
    # n-ary einsums as chains of two-operand ones (put back where nothing is rewritten)
    splits = []
    rewritten_nodes = set()
    checks = {}  # run-time checks shared by sites (rewrite.build)
    for n in list(graph.nodes):
        chain = split_einsum(graph, n, fake_mode) if n.users else []
        if chain:
            n.replace_all_uses_with(chain[-1])
            splits.append((n, chain))
    for n in list(graph.nodes):
        if n.graph is not graph or not is_contraction(n) or not n.users:
            continue
        try:
            match = analyze(n, writes)
            if match is None:
                continue
            emitted = []
            try:
                scale, pre = build(gm, match, emitted, order, fake_mode, checks)
            except Exception:
                for x in reversed(emitted):  # a failed build leaves the graph as it was
                    if x.graph is graph and not x.users:
                        graph.erase_node(x)
                raise
        except Unproven as e:
            report.near_miss(_origin(n, splits), e)
            continue
        except Exception as e:  # an analysis bug must never break compilation
            report.internal_error(_origin(n, splits), e)
            continue
        decay = describe(match.decay) + (f"; checked at run time: {', '.join(pre)}" if pre else "")
        report.rewritten(_origin(n, splits), decay=decay, scale=scale)
        _remove_dead(graph, match.interp.nodes | {n}, gone)
        rewritten_nodes |= match.interp.nodes
    for n, chain in splits:
        if chain[-1].users:  # not consumed by a rewrite: the einsum as the user wrote it
            chain[-1].replace_all_uses_with(n)
        _remove_dead(graph, set(chain) | ({n} if not n.users else set()), gone)
    if splits:  # a removed n-ary einsum was the last user of its sites' masks
        _remove_dead(graph, rewritten_nodes, gone)
    if report.rewrites:  # sites with the same run-time check: one torch.cond
        from .guard import merge_guards

        merge_guards(gm, fake_mode)
    if report.rewrites or changed or splits:
        graph.lint()
        gm.recompile()
    return report


def _origin(n, splits):
    """The einsum the user wrote, for a node of one of its two-operand chains."""
    for original, chain in splits:
        if n in chain:
            return original
    return n


class _Order(dict):
    """Node -> position, computed once.  Nodes inserted later (by a rewrite) get, on
    first lookup, positions spread evenly between the nearest positioned nodes before
    and after them."""

    def __init__(self, graph):
        super().__init__((x, float(k)) for k, x in enumerate(graph.nodes))

    def _known(self, x):
        return x.op != "root" and dict.__contains__(self, x)

    def __missing__(self, x):
        run, prev = [x], x.prev
        while prev.op != "root" and not self._known(prev):
            run.insert(0, prev)
            prev = prev.prev
        nxt = x.next
        while nxt.op != "root" and not self._known(nxt):
            run.append(nxt)
            nxt = nxt.next
        lo = dict.__getitem__(self, prev) if prev.op != "root" else -1.0
        hi = dict.__getitem__(self, nxt) if nxt.op != "root" else lo + 1.0
        for k, y in enumerate(run):
            dict.__setitem__(self, y, lo + (hi - lo) * (k + 1) / (len(run) + 1))
        return dict.__getitem__(self, x)


def _remove_dead(graph, candidates, gone):
    """Erases the now unused nodes of a rewritten site (only pure ATen ops)."""
    candidates = set(candidates) - gone
    changed = True
    while changed:
        changed = False
        for x in list(candidates):
            if x.graph is graph and x.op == "call_function" and not x.users and not _impure(x):
                graph.erase_node(x)
                gone.add(x)
                candidates.discard(x)
                changed = True


def _impure(n):
    t = n.target
    return not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable
