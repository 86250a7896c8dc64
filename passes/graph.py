"""Small facts about FX nodes: fake values, shapes, op packets, contractions."""
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .errors import Unproven

aten = torch.ops.aten
CONTRACTIONS = {aten.matmul, aten.bmm, aten.mm, aten.einsum}


def val(n):
    """The fake value of a node (make_fx / export: "val"; dynamo: "example_value")."""
    if not isinstance(n, torch.fx.Node):
        return n
    return n.meta.get("val", n.meta.get("example_value"))


def shape(n):
    v = val(n)
    if not isinstance(v, torch.Tensor):
        raise Unproven(f"no tensor metadata on {getattr(n, 'name', n)}")
    return tuple(v.shape)


def is_one(s):
    return isinstance(s, int) and s == 1 or (not isinstance(s, int) and statically_known_true(s == 1))


def same(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def packet(n):
    t = getattr(n, "target", None)
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else None


def is_contraction(n):
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and packet(n) in CONTRACTIONS


def is_mutating(n):
    t = getattr(n, "target", None)
    return isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


def upper_bound(s):
    """An int upper bound of a size (int or SymInt), or None when unbounded."""
    if isinstance(s, int):
        return s
    try:
        node = s.node
        r = node.shape_env.bound_sympy(node.expr)
        hi = r.upper
        return int(hi) if hi.is_finite else None
    except Exception:  # no shape env (plain make_fx): unknown
        return None


def fake_mode_of(graph):
    """The graph's fake mode (its symbolic sizes live there), found from the
    placeholders (else any node); a fresh one if the graph has none."""
    from torch._guards import detect_fake_mode

    for nodes in ([n for n in graph.nodes if n.op == "placeholder"], graph.nodes):
        mode = detect_fake_mode([v for v in map(val, nodes) if isinstance(v, torch.Tensor)])
        if mode is not None:
            return mode
    return torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
