"""Run-time preconditions for rewrites (DESIGN.md, "The pass's contract").

A fact about a tensor's *values* that the graph cannot prove (a decay buffer is
positive, say) must not be assumed.  :func:`guard` turns it into a cheap check in the
rewritten graph: ``cond(pred, fast, slow, operands)``, where ``slow`` is the original
computation, so the result equals eager's whichever branch runs.  Works on make_fx
pre-dispatch graphs (the "leet" backend) and on torch.export graphs, for training
(grad through both branches) and inference, with static or symbolic shapes.

Nothing is registered at import time; the helper op ``leet::_contiguous_grad`` is
defined on first use (training graphs only).
"""
import functools
import operator

import torch

from .graph import fake_mode_of

__all__ = ["emit", "guard", "guarded_sites", "merge_guards", "outline"]

aten = torch.ops.aten
Node = torch.fx.Node


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else n


def _propagate(gm, node, fake_mode=None):
    """Sets node.meta["val"] by running its target on the fake values of its inputs
    (get_attr nodes stand for the attribute itself, e.g. a branch GraphModule)."""

    def fake(a):
        if a.op == "get_attr" and "val" not in a.meta:
            obj = gm
            for part in a.target.split("."):
                obj = getattr(obj, part)
            return obj
        return a.meta["val"]

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fake)
    with fake_mode if fake_mode is not None else fake_mode_of(gm.graph):
        node.meta["val"] = node.target(*args, **kwargs)
    return node


def emit(gm: torch.fx.GraphModule, before: Node, target, *args, **kwargs) -> Node:
    """Inserts ``target(*args, **kwargs)`` before ``before``, with meta["val"] (fake
    propagation under the graph's fake mode) and ``before``'s stack trace, so later
    passes, Inductor and torch.export see a well-formed node."""
    with gm.graph.inserting_before(before):
        n = gm.graph.call_function(target, args, kwargs)
    n.meta["stack_trace"] = before.meta.get("stack_trace")
    return _propagate(gm, n)


def outline(gm: torch.fx.GraphModule, nodes: list[Node], out: Node, inputs: list[Node]) -> torch.fx.GraphModule:
    """A new GraphModule computing ``(out,)`` from ``inputs`` (placeholders in that
    order, meta["val"] copied) by copying ``nodes`` (in graph order, whatever order
    they are given in).  The output is a 1-tuple, the form torch.cond's branches take.

    Raises ValueError when a copied node reads a node that is neither in ``nodes``
    nor in ``inputs`` (the subgraph would not be closed), or when ``out`` is in neither.
    """
    graph = gm.graph
    node_set, input_set = set(nodes), set(inputs)
    if len(input_set) != len(inputs):
        raise ValueError("outline: inputs contain duplicates")
    if node_set & input_set:
        raise ValueError(f"outline: {sorted(x.name for x in node_set & input_set)} are both nodes and inputs")
    for n in node_set | input_set:
        if n.graph is not graph:
            raise ValueError(f"outline: {n.name} is not a node of gm's graph")
    if out not in node_set and out not in input_set:
        raise ValueError(f"outline: out ({out.name}) is neither in nodes nor in inputs")
    order = {n: i for i, n in enumerate(graph.nodes)}
    ordered = sorted(node_set, key=order.__getitem__)
    for n in ordered:
        if n.op in ("placeholder", "output"):
            raise ValueError(f"outline: cannot copy {n.op} node {n.name}; pass it as an input")
        for a in n.all_input_nodes:
            if a not in node_set and a not in input_set:
                raise ValueError(f"outline: {n.name} reads {a.name}, which is neither in nodes nor in inputs")
    sub = torch.fx.Graph()
    env = _placeholders(sub, inputs)
    for n in ordered:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output((env[out],))
    return torch.fx.GraphModule(gm, sub)  # root=gm: copies the attributes get_attr nodes read


def _placeholders(sub, nodes):
    """A placeholder of ``sub`` per node of ``nodes`` (same name, same fake value): the
    map from each node to its placeholder."""
    env = {}
    for x in nodes:
        p = sub.placeholder(x.name)
        if "val" in x.meta:
            p.meta["val"] = x.meta["val"]
        env[x] = p
    return env


@functools.cache
def _contiguous_grad():
    """``leet::_contiguous_grad``: identity (a clone) whose backward makes the grad
    contiguous.  torch.cond's backward requires both branches' gradients w.r.t. an
    operand to have the same strides; passing every differentiable operand through
    this op in both branches gives both the same (contiguous) ones.  Python-only: it
    appears in training graphs only, never in what AOTInductor packages."""
    name = "leet::_contiguous_grad"
    try:

        @torch.library.custom_op(name, mutates_args=())
        def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

    except RuntimeError:  # already defined in this process (e.g. module reloaded)
        return torch.ops.leet._contiguous_grad.default

    @contiguous_grad.register_fake
    def _(x):
        return torch.empty_like(x)

    def backward(ctx, grad):
        return grad.contiguous()

    contiguous_grad.register_autograd(backward)
    return torch.ops.leet._contiguous_grad.default


def _requires_grad(n, memo=None):
    """Whether autograd tracks n's value.  make_fx stores detached meta["val"]s, so the
    truth is in meta["tensor_meta"] (set from the traced tensor); nodes added by a pass
    have only "val", and then follow their inputs."""
    memo = {} if memo is None else memo
    if n not in memo:
        memo[n] = False
        v, tm = _val(n), n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "requires_grad"):
            memo[n] = bool(tm.requires_grad)
        elif isinstance(v, torch.Tensor):
            memo[n] = v.requires_grad or (n.op == "call_function" and (v.is_floating_point() or v.is_complex())
                                          and any(_requires_grad(a, memo) for a in n.all_input_nodes))
    return memo[n]


def _known_contiguous(t):
    """True when t is contiguous for every value of its symbolic sizes (no guards added)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    expected = 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if not statically_known_true(size == 1) and not statically_known_true(stride == expected):
            return False
        expected = expected * size
    return True


def _pullable(n):
    """A view or a cheap elementwise op: copied into both branches rather than passed
    in.  Inductor lowers each branch for its operands' recorded strides, but realizes
    a view, or an elementwise result that keeps its input's strides, with strides of its
    own choosing; operands that are graph inputs or results of matmuls and other
    kernels with fixed layouts arrive as recorded."""
    t = n.target
    if n.op == "call_function" and isinstance(_val(n), (torch.SymFloat, torch.SymBool)):
        return True  # a Python scalar computed from sizes: cond takes no such operand
    if n.op == "call_function" and t is operator.getitem:  # an element of split / chunk / unbind
        return isinstance(n.args[0], Node) and _pullable(n.args[0])
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable:
        return False
    if any(a.alias_info is not None for a in t._schema.returns):
        return True  # a view
    # constant_pad_nd (F.pad: fla pads T to a multiple of the chunk) is lowered like a
    # pointwise op: Inductor realizes it in its input's layout, not the recorded one
    return torch.Tag.pointwise in t.tags or t in (aten.constant_pad_nd.default, aten.pad.default)


def _operands(ext, inside):
    """(operands, nodes pulled into both branches): the external inputs, with views and
    elementwise producers followed back to graph inputs or fixed-layout results."""
    operands, pulled, todo = set(), [], list(ext)
    seen = set(inside)
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if _pullable(x) and all(isinstance(a, Node) or not isinstance(a, torch.Tensor) for a in x.args):
            pulled.append(x)
            todo.extend(x.all_input_nodes)
        else:
            operands.add(x)
    return operands, pulled


def _contiguous_strides(shape):
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc = acc * size
    return tuple(reversed(strides))


def _exactly_contiguous(t):
    """True when t has the strides of a fresh contiguous tensor, size-1 dims included
    (torch.cond compares the stride order of both branches' outputs, those dims too)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    expected = 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if not statically_known_true(stride == expected):
            return False
        expected = expected * size
    return True


def _external_inputs(node_set, order):
    """Nodes read by node_set but not in it, in graph order."""
    ext = {a for n in node_set for a in n.all_input_nodes if a not in node_set}
    return sorted(ext, key=order.__getitem__)


def _check_no_input_mutation(node_set, what):
    """torch.cond branches must not mutate their operands (in place, or through a view)."""
    for n in node_set:
        t = n.target
        if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not t._schema.is_mutable:
            continue
        for arg, a in zip(t._schema.arguments, n.args):
            if not (arg.alias_info is not None and arg.alias_info.is_write and isinstance(a, Node)):
                continue
            base = a
            while base in node_set and isinstance(base.target, torch._ops.OpOverload) and base.args and (
                    base.target._schema.returns and base.target._schema.returns[0].alias_info is not None):
                base = base.args[0]  # a view: follow it to what it aliases
            if base not in node_set:
                raise ValueError(f"guard: {what} node {n.name} mutates {base.name}, an input of the branch")


def _prepare_branch(branch, fake_mode, wrap, stack_trace, flat=False):
    """Makes the branches agree where torch.cond needs it: the operands flagged in
    ``wrap`` (differentiable ones, training only) go through _contiguous_grad, the
    output is made contiguous (and 1-D with ``flat``)."""
    g = branch.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    if any(wrap):
        op = _contiguous_grad()
        last = placeholders[-1]
        for p, flag in zip(placeholders, wrap):
            if not (flag and p.users):
                continue
            with g.inserting_after(last):
                w = g.call_function(op, (p,))
            last = w
            p.replace_all_uses_with(w, delete_user_cb=lambda u, w=w: u is not w)
            w.meta["stack_trace"] = stack_trace
            _propagate(branch, w, fake_mode)
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    (res,) = out_node.args[0]
    from .mutation import alias_base

    base = res
    while alias_base(base) is not None:
        base = alias_base(base)
    if not _exactly_contiguous(_val(res)) or base.op == "placeholder":  # cond's output may not alias its operands
        with g.inserting_before(out_node):
            c = g.call_function(aten.clone.default, (res,), {"memory_format": torch.contiguous_format})
        c.meta["stack_trace"] = stack_trace
        _propagate(branch, c, fake_mode)
        out_node.args = ((c,),)
        res = c
    if flat:
        with g.inserting_before(out_node):
            c = g.call_function(aten.reshape.default, (res, [-1]))
        c.meta["stack_trace"] = stack_trace
        _propagate(branch, c, fake_mode)
        out_node.args = ((c,),)
    g.lint()
    branch.recompile()


def _view_flat_operands(branch, inputs, flat_ops, fake_mode, stack_trace):
    """The placeholders of the operands in ``flat_ops`` take their 1-D views, viewed back
    to their shapes (sizes: ints and placeholders of the SymInt operands) first thing."""
    g = branch.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    ph = dict(zip(inputs, placeholders))
    for x, (xf, sz) in flat_ops.items():
        p = ph[x]
        p.meta["val"] = _val(xf)
        with g.inserting_after(placeholders[-1]):
            v = g.call_function(aten.view.default, (p, [ph[z] if isinstance(z, Node) else z for z in sz]))
        v.meta["stack_trace"] = stack_trace
        p.replace_all_uses_with(v, delete_user_cb=lambda u, v=v: u is not v)
        _propagate(branch, v, fake_mode)


def _needs_flat(t):
    """Whether t's contiguous strides hold a Max(1, size) (a size the shape environment
    does not simplify as >= 1, such as T // 8): torch.cond cannot merge them."""
    from torch._prims_common import make_contiguous_strides_for
    from torch.utils._sympy.functions import Max

    return t.dim() > 1 and any(isinstance(s, torch.SymInt) and s.node.expr.has(Max)
                               for s in make_contiguous_strides_for(t.shape))


def _flat_sizes(t, graph, add):
    """t's sizes as ints and nodes computing them from the graph's placeholders (their
    SymInt values and tensor sizes), or None where a size is not such an expression."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    symbols = {}  # sympy symbol -> a SymInt placeholder, or (tensor placeholder, dim)
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        v = _val(n)
        if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
            symbols.setdefault(v.node.expr, n)
        elif isinstance(v, torch.Tensor):
            for d, z in enumerate(v.shape):
                if isinstance(z, torch.SymInt) and isinstance(z.node.expr, sympy.Symbol):
                    symbols.setdefault(z.node.expr, (n, d))

    def build(e):
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            x = symbols.get(e)
            if x is None:
                raise KeyError(e)
            if isinstance(x, tuple):
                x = add(aten.sym_size.int, x[0], x[1])
                x.meta["val"] = _val(x.args[0]).shape[x.args[1]]
            return x
        ops = {sympy.Add: operator.add, sympy.Mul: operator.mul, FloorDiv: operator.floordiv}
        op = next((f for cls, f in ops.items() if isinstance(e, cls)), None)
        if op is None:
            raise KeyError(e)
        args = [build(a) for a in e.args]
        acc = args[0]
        for y in args[1:]:
            if isinstance(acc, int) and isinstance(y, int):
                acc = op(acc, y)
                continue
            node = add(op, acc, y)
            node.meta["val"] = op(_val(acc), _val(y))
            acc = node
        return acc

    made = []

    def add(target, *args, _add=add):
        made.append(_add(target, *args))
        return made[-1]

    try:
        return [s if isinstance(s, int) else build(s.node.expr) for s in t.shape]
    except KeyError:  # the nodes made so far are unused: gone again
        for n in reversed(made):
            graph.erase_node(n)
        return None


def _same_shape(a, b):
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _unique_index(gm):
    i = 0
    while hasattr(gm, f"leet_fast_{i}") or hasattr(gm, f"leet_slow_{i}"):
        i += 1
    return i


def guard(gm: torch.fx.GraphModule, anchor: Node, fast_nodes: list[Node], fast_out: Node,
          preconditions: list[Node], slow_nodes: list[Node], order=None, recompile=True,
          fake_mode=None) -> Node:
    """Replaces the uses of ``anchor`` by
    ``torch.ops.higher_order.cond(all(preconditions), fast, slow, operands)[0]``.

    Args:
        anchor: the original site's output node (in ``slow_nodes``).
        fast_nodes: new nodes the caller inserted in gm (before anchor) computing
            ``fast_out``, which must have anchor's shape and dtype; erased afterwards.
        preconditions: 0-d bool tensor nodes already in gm, before anchor.
        slow_nodes: the original computation of anchor, anchor included; they stay
            in gm (the caller removes the dead ones).

    Both branches take the same operands: the external inputs of both node sets, in
    graph order (tensors and SymInts); a non-contiguous one is passed as a contiguous
    copy (Inductor lowers the branches for the operands' recorded strides but may
    realize a view operand with other ones).  ``order`` (node -> position) and
    ``recompile=False`` let a pass that guards many sites stay linear in graph size.  Returns the getitem node now used instead of
    anchor.  Raises ValueError (gm unchanged) when the pieces do not fit together.
    """
    graph = gm.graph
    fast, slow = set(fast_nodes), set(slow_nodes)
    for n in [anchor, fast_out, *fast, *slow, *preconditions]:
        if n.graph is not graph:
            raise ValueError(f"guard: {n.name} is not a node of gm's graph")
    if anchor not in slow:
        raise ValueError("guard: anchor must be one of slow_nodes")
    if fast_out not in fast:
        raise ValueError("guard: fast_out must be one of fast_nodes")
    if fast & slow:
        raise ValueError(f"guard: {sorted(n.name for n in fast & slow)} are in both fast_nodes and slow_nodes")
    if not preconditions:
        raise ValueError("guard: no precondition given (replace anchor directly instead)")
    if order is None:
        order = {n: i for i, n in enumerate(graph.nodes)}
    for p in preconditions:
        v = _val(p)
        if not (isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 0):
            raise ValueError(f"guard: precondition {p.name} is not a 0-d bool tensor")
    for n in fast:
        for u in n.users:
            if u not in fast:
                raise ValueError(f"guard: fast node {n.name} is used by {u.name}, outside fast_nodes")
    a_val, f_val = _val(anchor), _val(fast_out)
    if not (isinstance(a_val, torch.Tensor) and isinstance(f_val, torch.Tensor)):
        raise ValueError("guard: anchor and fast_out need tensor meta['val']")
    if a_val.dtype != f_val.dtype or not _same_shape(a_val, f_val):
        raise ValueError(f"guard: fast_out is {f_val.dtype}{list(f_val.shape)}, "
                         f"anchor is {a_val.dtype}{list(a_val.shape)}")
    fast_ext, slow_ext = _external_inputs(fast, order), _external_inputs(slow, order)
    if anchor in fast_ext:
        raise ValueError("guard: fast_nodes read anchor")
    operands, pulled = _operands(set(fast_ext) | set(slow_ext), fast | slow)
    operands = sorted(operands, key=order.__getitem__)
    for x in operands:
        if not isinstance(_val(x), (torch.Tensor, torch.SymInt, int)):
            raise ValueError(f"guard: operand {x.name} is not a tensor or SymInt ({type(_val(x)).__name__})")
    for x in [*operands, *preconditions]:
        if order[x] > order[anchor]:
            raise ValueError(f"guard: {x.name} comes after anchor {anchor.name}")
    _check_no_input_mutation(fast, "fast")
    _check_no_input_mutation(slow, "slow")

    fake_mode = fake_mode if fake_mode is not None else fake_mode_of(gm.graph)
    stack_trace = anchor.meta.get("stack_trace")
    # Only where a backward will run through the cond (never in inference graphs)
    memo = {}
    needs_grad = _requires_grad(anchor, memo)
    wrap = [needs_grad and isinstance(_val(x), torch.Tensor) and _requires_grad(x, memo) for x in operands]
    # sizes such as T // L (dynamic shapes) give contiguous strides holding Max(1, size),
    # which torch.cond cannot merge: in its backward too, where the branches return the
    # operands' gradients.  Then every differentiable operand enters the branches 1-D
    # (its gradient is 1-D) and is viewed back to its shape there.
    flat_grads = needs_grad and any(isinstance(_val(x), torch.Tensor) and _needs_flat(_val(x))
                                    for x in fast | slow)
    i = _unique_index(gm)
    names = (f"leet_fast_{i}", f"leet_slow_{i}")
    new = []

    def add(target, *args, **kwargs):
        with graph.inserting_before(anchor):
            n = graph.call_function(target, args, kwargs)
        n.meta["stack_trace"] = stack_trace
        new.append(n)
        return n

    # torch.cond cannot merge the strides of a contiguous output whose strides hold Max(1,
    # size): such an output leaves the branches 1-D and is viewed back to its shape here,
    # its sizes computed from the placeholders' sizes
    sizes = _flat_sizes(a_val, graph, add) if _needs_flat(a_val) else None
    flat_ops = {}  # operand -> (its 1-D view, its sizes as ints and SymInt nodes)
    if flat_grads:
        for x, w in zip(operands, wrap):
            v = _val(x)
            if not (w and v.dim() > 1):
                continue
            sz = _flat_sizes(v, graph, add)
            if sz is None:
                for n in reversed(new):
                    graph.erase_node(n)
                from .errors import Unproven

                raise Unproven("a run-time check (torch.cond) in a training graph with sizes such as T // L "
                               "(dynamic shapes): an operand's sizes are not expressions of the inputs' sizes")
            flat_ops[x] = (_propagate(gm, add(aten.reshape.default, x, [-1]), fake_mode), sz)
    size_ops = []
    for _, sz in flat_ops.values():
        size_ops.extend(z for z in sz if isinstance(z, Node) and z not in size_ops and z not in operands)
    branches = (outline(gm, fast_nodes + pulled, fast_out, operands + size_ops),
                outline(gm, slow_nodes + pulled, anchor, operands + size_ops))
    for branch in branches:
        if flat_ops:
            _view_flat_operands(branch, operands + size_ops, flat_ops, fake_mode, stack_trace)
        _prepare_branch(branch, fake_mode, wrap + [False] * len(size_ops), stack_trace, flat=sizes is not None)
    operands = [flat_ops[x][0] if x in flat_ops else x for x in operands] + size_ops

    pred = preconditions[0]
    for p in preconditions[1:]:
        pred = _propagate(gm, add(aten.logical_and.default, pred, p), fake_mode)
    for name, branch in zip(names, branches):
        gm.register_module(name, branch)
    with graph.inserting_before(anchor):
        attrs = [graph.get_attr(name) for name in names]
    for a in attrs:
        a.meta["stack_trace"] = stack_trace
    c = add(torch.ops.higher_order.cond, pred, attrs[0], attrs[1], tuple(operands))
    try:
        with torch.no_grad():  # fake-run the forward only; grad-mode cond would trace joint graphs
            _propagate(gm, c, fake_mode)
    except Exception:  # cond could not be fake-run (a pred from a symbolic float): its output is anchor's
        shp = (a_val.numel(),) if sizes is not None else a_val.shape
        with fake_mode:
            c.meta["val"] = (torch.empty_strided(shp, _contiguous_strides(shp), dtype=a_val.dtype,
                                                 device=a_val.device),)
    if needs_grad:
        c.meta["val"] = tuple(t.requires_grad_(True) for t in c.meta["val"])
    r = _propagate(gm, add(operator.getitem, c, 0), fake_mode)
    if sizes is not None:
        r = _propagate(gm, add(aten.view.default, r, sizes), fake_mode)
    anchor.replace_all_uses_with(r, delete_user_cb=lambda u: u not in new)
    for n in sorted(fast, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    if recompile:
        graph.lint()
        gm.recompile()
    return r


def guarded_sites(gm: torch.fx.GraphModule) -> list[Node]:
    """The cond nodes :func:`guard` put in gm's graph (for reports and tests, which
    then need not name torch's private higher-order op)."""
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.higher_order.cond
            and n.args[1].op == "get_attr" and n.args[1].target.startswith("leet_fast_")]


# ---------------------------------------------------------------- one cond for many sites


def _movable(x):
    """A pure ATen node that may be computed inside the branches instead of before them."""
    t = x.target
    if x.op == "call_function" and t is operator.getitem:  # an output of a movable op
        return isinstance(x.args[0], Node) and _movable(x.args[0]) and isinstance(_val(x), torch.Tensor)
    if x.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable:
        return False
    v = _val(x)
    outs = v if isinstance(v, (tuple, list)) else [v]
    if torch.Tag.nondeterministic_seeded in t.tags or not any(isinstance(y, torch.Tensor) for y in outs) or \
            not all(isinstance(y, torch.Tensor) or y is None for y in outs):
        return False  # (an op returning nothing, such as an assert, is never moved nor dropped)
    return all(isinstance(a, Node) or not isinstance(a, torch.Tensor) for a in x.args)


def _hashable(a):
    if isinstance(a, (list, tuple)):
        items = tuple(_hashable(y) for y in a)
        return None if any(y is _UNHASHABLE for y in items) else (type(a).__name__, items)
    if isinstance(a, dict):
        return _hashable(sorted(a.items()))
    if isinstance(a, slice):
        return _hashable((a.start, a.stop, a.step))
    try:
        hash(a)
    except TypeError:
        return _UNHASHABLE
    if isinstance(a, float) and a != a:
        return _UNHASHABLE  # nan != nan
    return (type(a).__name__, a)


_UNHASHABLE = object()


def _cse_key(n, args, kwargs):
    """A key under which two nodes compute the same value (pure ATen ops only), or None."""
    t = n.target
    if n.op != "call_function":
        return None
    if isinstance(t, torch._ops.OpOverload):
        if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
            return None
    elif t is not operator.getitem:
        return None
    key = _hashable((args, kwargs))
    return None if key is _UNHASHABLE else (t, key)


def _merged_branch(gm, branches, operand_lists, operands, copied, out_index):
    """One branch computing the outputs of ``branches`` (GraphModules, each reading its
    operand list) as one tuple, from ``operands``; the main-graph nodes ``copied`` are
    computed first (in graph order).  Identical pure nodes are computed once."""
    sub = torch.fx.Graph()
    root = {}
    env = _placeholders(sub, operands)
    cse = {}
    mutating = any(getattr(n, "target", None) is not None and isinstance(n.target, torch._ops.OpOverload)
                   and n.target._schema.is_mutable for br in branches for n in br.graph.nodes)

    def copy(n, lookup, prefix, src=None):
        if n.op == "get_attr":
            obj = src
            for part in n.target.split("."):
                obj = getattr(obj, part)
            name = f"{prefix}{n.target.replace('.', '_')}"
            root[name] = obj
            new = sub.get_attr(name)
            new.meta.update(n.meta)
            return new
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lookup)
        key = None if mutating else _cse_key(n, args, kwargs)
        if key is not None and key in cse:
            return cse[key]
        new = sub.node_copy(n, lookup)
        if key is not None:
            cse[key] = new
        return new

    for x in sorted(copied, key=lambda n: out_index[n]):
        env[x] = copy(x, env.__getitem__, "")
    outs = []
    for k, (br, ops) in enumerate(zip(branches, operand_lists)):
        local = {}
        phs = [n for n in br.graph.nodes if n.op == "placeholder"]
        for p, x in zip(phs, ops):
            local[p] = env[x]
        for n in br.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outs.extend(local[a] for a in n.args[0])
                continue
            local[n] = copy(n, local.__getitem__, f"site{k}_", br)
    # torch.cond's outputs may alias neither its operands nor each other: of the outputs
    # that view one tensor (chunks of one batched call), all but the first are copies
    from .mutation import alias_base

    seen = set()
    for k, r in enumerate(outs):
        base = r
        while alias_base(base) is not None:
            base = alias_base(base)
        if base in seen or base.op == "placeholder":
            with sub.inserting_before(None):
                c = sub.call_function(aten.clone.default, (r,), {"memory_format": torch.contiguous_format})
            c.meta.update(r.meta)
            c.meta["val"] = aten.clone.default(r.meta["val"], memory_format=torch.contiguous_format)
            outs[k] = c
        else:
            seen.add(base)
    sub.output(tuple(outs))
    sub.eliminate_dead_code()
    return torch.fx.GraphModule(root, sub)


def _writes_between(graph, order, lo, hi, nodes):
    """Whether an in-place op strictly between positions lo and hi may write a tensor
    that shares storage with one of ``nodes`` (graph inputs may alias each other at
    run time: a write to anything viewing an input counts for nodes viewing one)."""
    from .graph import is_mutating
    from .mutation import alias_class, written_arg

    classes = [alias_class(x) for x in nodes]
    from_input = any(y.op == "placeholder" for cls in classes for y in cls)
    for u in graph.nodes:
        if not (lo < order[u] < hi) or not is_mutating(u) or u.target is aten.detach_.default:
            continue
        w = written_arg(u)
        if not isinstance(w, Node):
            return True
        wcls = alias_class(w)
        if any(wcls & cls for cls in classes):
            return True
        if from_input and any(y.op == "placeholder" for y in wcls):
            return True
    return False


def merge_guards(gm: torch.fx.GraphModule, fake_mode=None) -> int:
    """Puts the guarded sites that share a predicate node under one torch.cond (inference
    graphs only): ``cond(p, (fast_1, ..., fast_n), (slow_1, ..., slow_n))`` computes what
    the n conds computed, whichever branch runs, with one predicate read (.item()) and
    one subgraph call instead of n.  The merged cond sits where the first one was; a site
    joins only when its operands exist there and no in-place op between the two may
    change them.  Then every operand that only the cond reads (a mask the slow branches
    share, fla's chunked L_mask) is computed inside the branches, not before them: when
    the fast branch runs, it is not computed at all.  Returns the number of conds removed."""
    graph = gm.graph
    conds = guarded_sites(gm)
    if len(conds) < 2:
        return 0
    fake_mode = fake_mode if fake_mode is not None else fake_mode_of(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}

    def trains(c):
        return any(isinstance(v, torch.Tensor) and v.requires_grad for v in c.meta.get("val", ()))

    groups, open_group = [], {}
    for c in conds:
        if trains(c) or any(u.target is not operator.getitem for u in c.users):
            continue
        pred, ops = c.args[0], list(c.args[3])
        g = open_group.get(pred)
        if g is not None:
            c0 = g[0]
            if all(order[x] < order[c0] for x in ops) and not _writes_between(graph, order, order[c0], order[c], ops):
                g.append(c)
                continue
        open_group[pred] = [c]
        groups.append(open_group[pred])
    removed = 0
    for g in groups:
        if len(g) < 2:
            continue
        removed += _merge(gm, g, order, fake_mode)
    if removed:
        graph.lint()
        gm.recompile()
    return removed


def _merge(gm, group, order, fake_mode):
    graph = gm.graph
    c0, members = group[0], set(group)
    operands = {x for c in group for x in c.args[3]}
    # operands only the group reads, and views / pointwise ops of them: computed inside
    # sunk: read by the group only (removed from the main graph); pulled: views and
    # pointwise ops (as guard() does: computed in the branches, kept where read outside)
    sunk, pulled = set(), set()
    changed = True
    while changed:
        changed = False
        for x in sorted(operands | pulled, key=order.__getitem__, reverse=True):
            if x in sunk or not _movable(x):
                continue
            for u in list(x.users):  # a dead view the guard copied into a branch
                if not u.users and u not in members and _movable(u):
                    graph.erase_node(u)
            if all(u in members or u in sunk for u in x.users):
                pulled.discard(x)
                sunk.add(x)
            elif x in operands and _pullable(x):
                pulled.add(x)
            else:
                continue
            operands.discard(x)
            operands.update(a for a in x.all_input_nodes if a not in sunk and a not in pulled)
            changed = True
    copied = sunk | pulled
    if copied:
        lo = min(order[x] for x in copied)
        reads = [a for x in copied for a in x.all_input_nodes if a not in copied]
        if _writes_between(graph, order, lo, order[group[-1]], reads + list(copied)):
            operands = {x for c in group for x in c.args[3]}
            copied, sunk = set(), set()
    for x in operands:
        if not isinstance(_val(x), (torch.Tensor, torch.SymInt, int)):
            return 0
    operands = sorted(operands, key=order.__getitem__)
    branches = []
    for idx in (1, 2):
        subs = [getattr(gm, c.args[idx].target) for c in group]
        branches.append(_merged_branch(gm, subs, [list(c.args[3]) for c in group], operands, copied, order))
    i = _unique_index(gm)
    names = (f"leet_fast_{i}", f"leet_slow_{i}")
    for name, branch in zip(names, branches):
        gm.register_module(name, branch)
    stack_trace = c0.meta.get("stack_trace")
    with graph.inserting_before(c0):
        attrs = [graph.get_attr(name) for name in names]
        m = graph.call_function(torch.ops.higher_order.cond, (c0.args[0], attrs[0], attrs[1], tuple(operands)))
    for n in (*attrs, m):
        n.meta["stack_trace"] = stack_trace
    m.meta["val"] = tuple(v for c in group for v in c.meta["val"])
    offset = 0
    last = m
    for c in group:
        for u in list(c.users):
            with graph.inserting_after(last):
                r = graph.call_function(operator.getitem, (m, offset + u.args[1]))
            r.meta.update(u.meta)
            u.replace_all_uses_with(r)
            graph.erase_node(u)
            last = r
        offset += len(c.meta["val"])
        old = [c.args[1], c.args[2]]
        graph.erase_node(c)
        for a in old:
            if not a.users:
                target = a.target
                graph.erase_node(a)
                gm.delete_submodule(target)
    # the copied nodes nothing outside reads any more
    dead = set(sunk)
    changed = True
    while changed:
        changed = False
        for x in list(dead):
            if any(u not in dead for u in x.users):
                dead.discard(x)
                changed = True
    for x in sorted(dead, key=order.__getitem__, reverse=True):
        graph.erase_node(x)
    return len(group) - 1
