"""Evaluates graph nodes as piecewise index expressions (terms.py).

``ev(node, roles)`` gives the value of ``node`` whose dims have the given roles (see
contractions.py).  Each op's rule (rules.py) computes the exact value from its
arguments' values; the node's dtype is then applied (arith.in_dtype).  The
interpreter records the scores contraction it meets (``scores``), the size of h when a
view splits a merged B*H dim (``h_split``), the nodes it evaluated (``nodes``) and those
it took as they are (``opaque``: graph values, per-position data)."""
import dataclasses
import operator

import torch

from . import terms as T
from .arith import in_dtype
from .contractions import bcast, contraction_roles
from .errors import Unproven
from .graph import CONTRACTIONS, aten, packet, shape, val

POS = ("i", "j")


@dataclasses.dataclass(frozen=True)
class Sel:
    """The role of a dim of which one index is read (``x.select(dim, index)``, e.g. fla's
    per-chunk ``L_mask[:, :, i]``): a batch dim fixed at ``index``.  No rule gives a value
    that varies along it (arange, cumsum and tril refuse it), so a value along a Sel dim is
    read where it is: the rewrite selects the same index of the tensors it reads."""

    index: int


class MaskInterpreter:
    def __init__(self):
        self.memo = {}
        self.scores = None
        self.h_split = None
        self.nodes = set()
        self.opaque = set()
        self.values = {}  # node -> constant value (constant_value's memo)

    def ev(self, n, roles):
        if not isinstance(n, torch.fx.Node):
            if isinstance(n, (int, float, bool)):
                return T.pw_const(T.num(n))
            raise Unproven(f"unsupported argument {n!r}")
        roles = tuple(roles)
        key = (n, roles)
        if key not in self.memo:
            self.memo[key] = self._ev(n, roles)
            self.nodes.add(n)
        return self.memo[key]

    def arg(self, a, out_roles):
        """An argument's value, broadcast to the result's roles."""
        if isinstance(a, torch.fx.Node) and not isinstance(val(a), torch.Tensor):
            return T.pw_const(T.aff(T.RNode(a, ())))  # a SymInt / SymFloat scalar
        return self.ev(a, bcast(a, out_roles) if isinstance(a, torch.fx.Node) else ())

    def _ev(self, n, roles):
        from .rules import RULES

        if not any(r in POS for r in roles):
            c = self.constant(n)
            if c is None:
                self.opaque.add(n)
            return T.pw_const(T.num(c) if c is not None else T.aff(T.RNode(n, roles)))
        if n.op != "call_function":
            if n.op == "get_attr":
                c = self.constant(n)
                if c is not None:
                    return T.pw_const(T.num(c))
                ramp = self.constant_ramp(n, roles)
                if ramp is not None:
                    return ramp
                raise Unproven(f"{n.name} is a constant [T, T] tensor: a mask read from a buffer "
                               "cannot be proven (build it in forward from torch.arange)")
            return self.leaf(n, roles)
        if n.target is operator.getitem and packet(n.args[0]) == aten.meshgrid:
            return self.meshgrid_item(n, roles)
        p = packet(n)
        if p in RULES:
            rule, rounds = RULES[p]
            v = val(n)
            pw = rule(self, n, roles)
            return in_dtype(v.dtype, pw, rounds) if isinstance(v, torch.Tensor) else pw
        if p in CONTRACTIONS:
            return self.scores_contraction(n, roles)
        return self.leaf(n, roles)

    def leaf(self, n, roles):
        """A value taken as it is: data at one position (a graph tensor read at i or j)."""
        pos = [r for r in roles if r in POS]
        if len(pos) != 1:
            if n.op == "placeholder":
                raise Unproven(f"the mask {n.name} is an input of this graph: it was computed outside it "
                               "(before a graph break, e.g. from .item(), or in Python), so it cannot be proven")
            raise Unproven(f"{n.target} gives a value that depends on both positions i and j "
                           "(a data-dependent mask cannot be proven)")
        self.opaque.add(n)
        key = (n, tuple("t" if r in POS else r for r in roles), False)
        return T.pw_const(T.aff(0, {T.Leaf(key, pos[0]): 1}))

    def constant(self, n):
        """The value of a one-element constant (full, scalar_tensor, lifted constant), as
        the node's dtype stores it, or None."""
        p = packet(n)
        if n.op == "get_attr":
            owner = n.graph.owning_module
            t = getattr(owner, n.target, None) if owner is not None else None
            if isinstance(t, torch.Tensor) and t.numel() == 1 and not isinstance(
                    t, torch._subclasses.FakeTensor):
                return t.item()
            return None
        if p in (aten.lift_fresh_copy, aten.lift_fresh, aten.clone, aten.detach) and \
                isinstance(n.args[0], torch.fx.Node):
            return self.constant(n.args[0])
        c = None
        if p in (aten.full, aten.full_like, aten.new_full) and isinstance(n.args[-1], (int, float, bool)):
            c = n.args[-1]
        if p in (aten.ones, aten.ones_like, aten.new_ones):
            c = 1
        if p in (aten.zeros, aten.zeros_like, aten.new_zeros):
            c = 0
        if p == aten.scalar_tensor and isinstance(n.args[0], (int, float, bool)):
            c = n.args[0]
        if c is None or not isinstance(val(n), torch.Tensor):
            return c
        try:  # the value eager stores: full(0.5, dtype=int64) holds 0
            return torch.full((), c, dtype=val(n).dtype).item()
        except (RuntimeError, TypeError, OverflowError):
            return None

    def meshgrid_item(self, n, roles):
        """torch.meshgrid(a, b, ...)[k]: element [x0, x1, ...] is t_k[x_k] ('ij'), with the
        first two dims swapped for indexing='xy'."""
        grid, k = n.args
        tensors = grid.args[0]
        indexing = grid.kwargs.get("indexing", grid.args[1] if len(grid.args) > 1 else "ij")
        if indexing not in ("ij", "xy") or any(len(shape(t)) != 1 for t in tensors):
            raise Unproven("a meshgrid of other than 1-D tensors")
        dims = list(range(len(tensors)))
        if indexing == "xy" and len(dims) >= 2:
            dims[0], dims[1] = 1, 0
        self.nodes.add(grid)
        return self.ev(tensors[k], (roles[dims.index(k)],))

    def constant_value(self, n, budget=64):
        """n's value when the graph fixes it (computed from constant tensors and literals
        only, a small subgraph), as a real tensor; else None."""
        if n in self.values:
            return self.values[n]
        self.values[n] = None
        if not isinstance(n, torch.fx.Node) or budget <= 0:
            return None
        value = None
        if n.op == "get_attr":
            owner = n.graph.owning_module
            t = getattr(owner, n.target, None) if owner is not None else None
            if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor) and t.numel() <= 4096:
                value = t
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
                not n.target._schema.is_mutable or n.target is aten.detach_.default:
            args = []
            for a in n.args:
                if isinstance(a, torch.fx.Node):
                    a = self.constant_value(a, budget - 1)
                    if a is None:
                        return None
                elif isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
                    return None
                args.append(a)
            if any(isinstance(x, torch.fx.Node) for x in n.kwargs.values()):
                return None
            try:
                target = aten.detach.default if n.target is aten.detach_.default else n.target
                value = target(*args, **n.kwargs)
            except Exception:  # an op that cannot run on real tensors here: not a constant
                value = None
            if not isinstance(value, torch.Tensor) or value.numel() > 4096:
                value = None
        self.values[n] = value
        return value

    def constant_ramp(self, n, roles):
        """A constant 1-D tensor that holds start + step * i exactly (q.new_tensor(range(T))),
        as that index expression; else None."""
        owner = n.graph.owning_module
        t = getattr(owner, n.target, None) if owner is not None else None
        pos = [r for r in roles if r in POS]
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor) or \
                t.dim() != 1 or len(pos) != 1 or t.numel() < 2 or t.dtype == torch.bool or t.is_complex():
            return None
        start, step = t[0].item(), (t[1] - t[0]).item()
        if not all(float(x).is_integer() for x in (start, step)):
            return None
        start, step = int(start), int(step)
        ramp = torch.arange(t.numel(), dtype=torch.float64) * step + start
        if not torch.equal(t.to(torch.float64), ramp):
            return None
        return T.pw_const(T.aff(start, {T.Pos(pos[0]): step}))

    def scores_contraction(self, n, roles):
        """The scores q . k (a contraction whose result depends on both positions)."""
        pos = [r for r in roles if r in POS]
        if len(pos) < 2:
            return self.leaf(n, roles)
        (a, ra), (b, rb), contracted = contraction_roles(n, roles)
        if contracted == 0:  # an einsum that contracts nothing is a product
            return in_dtype(val(n).dtype, T.pw_mul(self.ev(a, ra), self.ev(b, rb)))
        if contracted != 1:
            raise Unproven("the scores contract over more than one dim")
        pa = [r for r in ra if r in POS]
        pb = [r for r in rb if r in POS]
        if sorted(pa + pb) != ["i", "j"] or len(pa) != 1:
            raise Unproven(f"{n.name} is a contraction but not q @ k^T over positions")
        if pa == ["j"]:
            (a, ra), (b, rb) = (b, rb), (a, ra)
        found = (a, ra, b, rb, n)
        if self.scores is not None and self.scores != found:
            raise Unproven("two different scores contractions")
        self.scores = found
        return T.pw_const(T.Scores(T.ONE))
