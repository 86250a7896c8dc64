"""leet_compile.passes: the decay-attention rewrite pass on ATen IR.

:func:`rewrite_decay_attention` is the entry point used by the "leet" torch.compile
backend and by ``leet_compile.export``.
"""
import torch

from .decay_attention import RewriteReport, Site, analyze, is_contraction, source_of
from .symbolic import Unproven

__all__ = ["RewriteReport", "Site", "rewrite_decay_attention"]


def rewrite_decay_attention(gm: torch.fx.GraphModule) -> RewriteReport:
    """Rewrites every proven ``(q @ k^T) * M @ v`` in ``gm`` (ATen IR: make_fx
    pre-dispatch graphs, torch.export training or inference IR; placeholders carry
    meta["val"]) into ``torch.ops.leet.decay_attn``, in place.

    Returns a :class:`RewriteReport` of the rewritten sites and of the near misses
    (attention-like sites left alone, with the reason).  Each rewrite increments
    ``torch._dynamo.utils.counters["leet"]["decay_attn_rewrites"]``.
    """
    from torch._dynamo.utils import counters

    from .rewrite import build

    report = RewriteReport()
    graph = gm.graph
    for n in list(graph.nodes):
        if n.graph is not graph or not is_contraction(n) or not n.users:
            continue
        order = {x: k for k, x in enumerate(graph.nodes)}
        where = source_of(n)
        try:
            match = analyze(n, order)
            if match is None:
                continue
            # build on a copy of the node list: a failure leaves the graph as it was
            before = set(graph.nodes)
            try:
                scale = build(gm, match)
            except Exception:
                for x in reversed(list(graph.nodes)):
                    if x not in before and not x.users:
                        graph.erase_node(x)
                raise
        except Unproven as e:
            report.near_misses.append(Site(n.name, where, False, reason=str(e.args[0])))
            continue
        except Exception as e:  # an analysis bug must never break compilation
            report.near_misses.append(Site(n.name, where, False, reason=f"internal error: {e!r}"))
            continue
        report.rewrites.append(Site(n.name, where, True, decay=match.decay.describe(), scale=scale))
        counters["leet"]["decay_attn_rewrites"] += 1
        _remove_dead(graph, match.interp.nodes | {n})
    if report.rewrites:
        graph.lint()
        gm.recompile()
    return report


def _remove_dead(graph, candidates):
    """Erases the now unused nodes of a rewritten site (only pure ATen ops)."""
    changed = True
    while changed:
        changed = False
        for x in list(candidates):
            if x.graph is graph and x.op == "call_function" and not x.users and not _impure(x):
                graph.erase_node(x)
                candidates.discard(x)
                changed = True


def _impure(n):
    t = n.target
    return not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable
