"""Builds the replacement of a proven site: ``torch.ops.leet.decay_attn`` on q, k, v
in [B, H, T, D] layout, with ``log_decay`` built as a graph expression from the
model's own tensors (so learnable decays keep their gradients).  Facts the proof
assumed about values become a run-time check with the original computation as the
fallback (guard.py); symbolic lengths beyond the proven range fail a run-time assert."""
import math
import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import terms as T
from .errors import Unproven
from .graph import is_one, same, shape, val

aten = torch.ops.aten


class Builder:
    """Emits nodes before ``anchor``; every new node gets meta["val"] (fake
    propagation) and the anchor's stack trace."""

    def __init__(self, gm, match, fake_mode):
        self.g = gm.graph
        self.m = match
        self.anchor = match.out
        self.fake_mode = fake_mode
        interp = match.interp
        q, rq, k, rk, _ = interp.scores
        names = tuple(r for r in match.out_roles if r not in (None, "i", "e"))
        self.split = names == ("bh",) and interp.h_split is not None
        if names == ("bh",) and not self.split:
            self.batch = ["b", "bh"]  # B' = 1, H' = B*H
        elif len(names) > 2:
            self.batch = list(names)  # b, b1, ..., h: merged into B' = b * b1 * ... at the call
        else:
            self.batch = ["b", "h"]
        self.extra = self.batch[1:-1]  # batch roles between b and h
        # (node, roles) pairs where sizes can be read
        self.sources = [(q, rq), (k, rk), (match.v, match.v_roles)]
        self.emitted = []
        self.row_sums = {}  # (RRowSum, dims) -> node
        self.sel_index = None  # chunk-batched call (_chunk_batched): Sel(index) dims become role "n"

    # -- emission
    def emit(self, target, *args, **kwargs):
        with self.g.inserting_before(self.anchor):
            n = self.g.call_function(target, args, kwargs)
        n.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        self.emitted.append(n)
        fargs, fkw = torch.fx.node.map_arg((args, kwargs), lambda a: val(a))
        ctx = self.fake_mode if self.fake_mode is not None else torch._subclasses.FakeTensorMode()
        try:
            with ctx:
                n.meta["val"] = target(*fargs, **fkw)
        except Exception as e:  # a node that cannot run (wrong shapes) is a bug: undo the site
            raise RuntimeError(f"the replacement does not type-check ({target}: {e})") from e
        return n

    def size(self, node, d):
        s = shape(node)[d]
        return s if isinstance(s, int) else self.emit(aten.sym_size.int, node, d)

    def size_of(self, role):
        """The size of a batch role as an int or a SymInt node (1 when absent)."""
        if role == "h" and self.split:
            return self.h_size()
        for node, roles in self.sources:
            if role in roles:
                return self.size(node, roles.index(role))
        if role == "b" and self.split:
            for node, roles in self.sources:
                if "bh" in roles:
                    bh = self.size(node, roles.index("bh"))
                    h = self.h_size()
                    if isinstance(bh, int) and isinstance(h, int):
                        return bh // h
                    return self.emit(operator.floordiv, bh, h)
        return 1

    def h_size(self):
        h = self.m.interp.h_split
        if isinstance(h, int):
            return h
        for node, roles in self.sources:  # a node with an h dim gives it as a graph value
            if "h" in roles:
                return self.size(node, roles.index("h"))
        expr = h.node.expr
        for n in self.g.nodes:
            if n.op == "placeholder" and isinstance(val(n), torch.SymInt) and val(n).node.expr == expr:
                return n
        raise Unproven("the B*H split size is not available as a graph value")

    # -- layout
    def materialize(self, x, roles, want):
        """x with dims in the order of ``want`` (missing roles as size-1 dims)."""
        from .interpreter import Sel

        roles = ["n" if isinstance(r, Sel) and r.index == self.sel_index else r for r in roles]
        for d in reversed([d for d, r in enumerate(roles) if isinstance(r, Sel)]):
            x = self.emit(aten.select.int, x, d, roles[d].index)  # the index the proof read
        roles = [r for r in roles if not isinstance(r, Sel)]
        if "bh" in roles and "b" in want and "h" in want:
            d = roles.index("bh")
            sizes = [self.size(x, k) if k != d else -1 for k in range(len(roles))]
            sizes[d:d + 1] = [-1, self.h_size()]
            x = self.emit(aten.reshape.default, x, sizes)
            roles[d:d + 1] = ["b", "h"]
        if len(roles) == len(want) and all(r in (w, None) for r, w in zip(roles, want)):
            return x  # already in order (size-1 dims stand for the missing roles)
        if any(r is not None and r not in want for r in roles):
            raise Unproven(f"cannot lay out dims {roles} as {want}")
        drop = [d for d, r in enumerate(roles) if r is None]
        if drop:
            x = self.emit(aten.squeeze.dims, x, drop)
            roles = [r for r in roles if r is not None]
        present = [r for r in want if r in roles]
        perm = [roles.index(r) for r in present]
        if perm != list(range(len(perm))):
            x = self.emit(aten.permute.default, x, perm)
        for d, r in enumerate(want):
            if r not in roles:
                x = self.emit(aten.unsqueeze.default, x, d)
        return x

    def full(self, x, want, keep):
        """x expanded to the full batch sizes (keep: trailing dims left as they are)."""
        nb = len(want) - keep
        have = shape(x)[:nb]
        sizes = [self.size_of(r) for r in want[:nb]]
        if all(isinstance(s, int) and s == 1 or not is_one(h) for s, h in zip(sizes, have)):
            return x  # no size-1 dim to broadcast
        sizes += [-1] * keep
        return self.emit(aten.expand.default, x, sizes)

    # -- coefficients (position-independent recipes)
    def coef(self, c, want):
        """A coefficient as a float or a graph node laid out with dims ``want``."""
        if T.is_number(c):
            return float(c)
        if isinstance(c, T.RNode):
            n, roles = c.node, c.roles
            if not isinstance(val(n), torch.Tensor):
                n = self.emit(aten.scalar_tensor.default, n)
                roles = ()
            return self.materialize(n, roles, want)
        if isinstance(c, T.RRowSum):
            return self.row_sum(c, want)
        if isinstance(c, T.RClamp):
            return self.emit(aten.clamp.default, self.coef(c.r, want), c.lo, c.hi)
        if isinstance(c, T.RScaled):
            return self.emit(aten.mul.Tensor, self.coef(c.r, want), float(c.k))
        if isinstance(c, (T.RProd, T.RSum)):
            a, b = self.coef(c.a, want), self.coef(c.b, want)
            if isinstance(a, float) and isinstance(b, float):
                return a * b if isinstance(c, T.RProd) else a + b
            if isinstance(a, float):
                a, b = b, a
            return self.emit(aten.mul.Tensor if isinstance(c, T.RProd) else aten.add.Tensor, a, b)
        fn = {"log": aten.log.default, "exp": aten.exp.default, "recip": aten.reciprocal.default,
              "detach": aten.detach.default, "sqrt": aten.sqrt.default, "abs": aten.abs.default}[c.fn]
        return self.emit(fn, self.coef(c.r, want))

    # -- the operator's inputs
    def layout(self, x, roles):
        """A q / k / v operand as [B, H, T, D] (full batch sizes)."""
        ren = {"i": "t", "j": "t", "c": "d", "e": "d"}
        want = self.batch + ["t", "d"]
        return self.full(self.materialize(x, [ren.get(r, r) for r in roles], want), want, 2)

    def qk(self):
        q, rq, k, rk, _ = self.m.interp.scores
        return self.layout(q, rq), self.layout(k, rk)

    def scaled_q(self, qn, m):
        """(q, scale): a constant scale m stays the operator's scale; a tensor (per head,
        or per query row: a row sum) is folded into q."""
        if T.is_number(m):
            return qn, m
        return self.emit(aten.mul.Tensor, qn, self.emit(aten.unsqueeze.default, self.row_factor(m), -1)), 1.0

    def row_factor(self, m):
        """A per-row or per-head coefficient m laid out as batch + [t] (size 1 along t
        for a per-head one)."""
        if T.is_row(m):
            return self.coef(m, self.batch + ["t"])
        return self.emit(aten.unsqueeze.default, self.coef(m, self.batch), -1)

    def flat(self, x):
        """An operand laid out as batch + [t, ...] with the extra batch dims (b, b1, ...)
        merged into the operator's B' = b * b1 * ... (a view where the strides allow)."""
        return self.emit(aten.flatten.using_ints, x, 0, len(self.extra)) if self.extra else x

    def log_decay(self, decay, qn):
        """log_decay for ``decay`` (q laid out as batch + [t, d]): [H] for a per-head
        constant, [B', H, T] for per-position decays, None for none."""
        bw = self.batch
        cdt = torch.float64 if val(qn).dtype == torch.float64 else torch.float32
        has_b = any(r in bw[:-1] for n, roles in T.recipe_nodes(decay.coef) for r in roles) and bw[0] == "b"
        if decay.cums or has_b:
            td = len(bw)  # the t dim of q and of the decay data
            t_len = self.size(qn, td)
            parts = []
            for (node, roles, det), w in decay.cums.items():
                a = self.materialize(node, roles, bw + ["t"])
                if not is_one(shape(a)[td]) and not same(shape(a)[td], val(qn).shape[td]):
                    # cumsum(a)[..., :T] (a prefix slice after the cumsum) reads a[..., :T]
                    a = self.emit(aten.slice.Tensor, a, td, 0, t_len)
                if det:
                    a = self.emit(aten.detach.default, a)
                if not (T.is_number(w) and w == 1):
                    wn = self.coef(w, bw)
                    a = self.emit(aten.mul.Tensor, a, wn if isinstance(wn, float) else self.emit(aten.unsqueeze.default, wn, -1))
                parts.append(a)
            if not (T.is_number(decay.coef) and decay.coef == 0):
                c = self.coef(decay.coef, bw)
                parts.append(self.emit(aten.unsqueeze.default, c, -1) if not isinstance(c, float) else c)
            ld = parts[0]
            for p in parts[1:]:
                ld = self.emit(aten.add.Tensor, ld, p)
            if isinstance(ld, float):
                ld = self.emit(aten.full.default, [1] * (len(bw) + 1), ld, dtype=cdt)
            ld = self.emit(aten.expand.default, ld, [self.size_of(r) for r in bw] + [t_len])
            return self.flat(self.as_float(ld, cdt))
        if T.is_number(decay.coef) and decay.coef == 0:
            return None
        H = self.size_of(bw[-1])
        c = self.coef(decay.coef, bw[-1:])
        if isinstance(c, float):
            return self.emit(aten.full.default, [H], c, dtype=cdt)
        return self.as_float(self.emit(aten.expand.default, c, [H]), cdt)

    def row_sum(self, c, want):
        """An RRowSum as a graph value with dims ``want``: decay_attn of the scores (or of
        ones) on a column of ones, [B, H, T]."""
        from .canonical import Decay

        bw = self.batch
        if "t" not in want:
            raise Unproven("a row sum where a per-head value is needed")
        key = (c, tuple(want))
        if key in self.row_sums:  # the same sum scales the mask and the scores' row sum
            return self.row_sums[key]
        qn, kn = self.qk()
        ones_shape = [self.size_of(r) for r in bw] + [self.size(qn, len(bw)), 1]
        if not c.scores:  # the mask alone: q = k = 1 (K = 1)
            qn = kn = self.emit(aten.new_ones.default, qn, ones_shape)
        cdt = torch.float64 if val(qn).dtype == torch.float64 else torch.float32
        # The sum is computed in float64 (a float64 ones column: the operator computes in
        # float64 when any input is), then rounded to cdt. A row sum of signed scores may
        # cancel, which amplifies its rounding; eager sums the rounded products one by one,
        # the operator through its states: in float32 the rewrite's error against float64
        # was up to 7x eager's (fuzz seed 46522, tests/test_pass_fuzz.py); in float64 it is
        # far below eager's. On CPU the operator reads q and k as they are (no float64
        # copies) in its O(T K) recurrent kernel (csrc/cpu/recurrent_cpu.cpp), faster than
        # the float32 chunked kernel on these V = 1 sums.
        ones = self.emit(aten.new_ones.default, qn, ones_shape, dtype=torch.float64)
        ld = self.log_decay(Decay(1, c.coef, dict(c.cums)), ones)  # in float64, as the sum
        op = self.emit(torch.ops.leet.decay_attn.default, self.flat(qn), self.flat(kn), self.flat(ones), ld,
                       float(c.m) if T.is_number(c.m) else 1.0, None, False, "auto", "auto")
        s = self.emit(aten.squeeze.dim, self.emit(operator.getitem, op, 0), -1)
        if self.extra:
            s = self.emit(aten.unflatten.int, s, 0, [self.size_of(r) for r in bw[:-1]])
        if not T.is_number(c.m):
            # A per-head or per-row factor m scales the sum (sum_j m_i s_ij = m_i sum_j s_ij):
            # applied to it in float64, not folded into q (a float64 copy of q, and q and k in
            # two dtypes, which the recurrent kernel does not take).
            s = self.emit(aten.mul.Tensor, s, self.row_factor(c.m))
        s = self.as_float(s, cdt)
        self.row_sums[key] = self.materialize(s, bw + ["t"], want)
        return self.row_sums[key]

    def all_true(self, x):
        """A 0-d bool node: whether every element of bool node x is true."""
        return self.emit(aten.all.default, x)

    def as_float(self, x, dtype):
        if val(x) is not None and val(x).dtype == dtype:
            return x
        return self.emit(aten._to_copy.default, x, dtype=dtype)


def build(gm, match, emitted, order=None, fake_mode=None, checks=None):
    """Inserts the operator call for ``match`` (guarded when the proof assumed facts
    about values) and redirects the users of the site's output.  Returns
    (scale, preconditions as text).

    ``checks`` (a dict kept by the caller for one graph) shares run-time checks between
    sites: a check another site already emitted (earlier in the graph) is reused, so
    sites with the same precondition get the same predicate node (guard.merge_guards
    then puts them under one torch.cond)."""
    import leet_compile.ops  # noqa: F401  (registers torch.ops.leet)

    b = Builder(gm, match, fake_mode)
    b.emitted = emitted
    b.checks = {} if checks is None else checks
    b.order = order
    for size, cap in match.length_checks:
        _assert_length(b, size, cap)
    pred, described = _preconditions(b, match)
    full = _chunk_batched(b, match, order)
    n_pre = len(b.emitted)
    if full is not None:  # this site's chunk of the call over every chunk
        # a copy (index_select), not a view: torch.cond's outputs may not alias each other
        # (several sites' chunks under one cond) nor its operands (the shared call)
        index = b.emit(aten.full.default, [1], b.sel_index, dtype=torch.int64, device=val(full).device)
        o = b.emit(aten.squeeze.dims, b.emit(aten.index_select.default, full, 1, index), [1])
        if b.batch[1] == "bh":  # B' = 1
            o, dims = b.emit(aten.squeeze.dims, o, [0]), ["bh", "i", "e"]
        else:
            dims = ["b", "h", "i", "e"]
        o, scale = _output(b, match, o, dims), match.decay.m
        b.sel_index = None
    else:
        o, scale = _operator_call(b, match)
    have, want = val(o).shape, val(match.out).shape
    if len(have) != len(want) or not all(statically_known_true(x == y) for x, y in zip(have, want)):
        raise Unproven(f"the mask broadcasts the result to {list(want)}, larger than q, k, v give "
                       f"({list(have)})")
    if pred is None:
        match.out.replace_all_uses_with(o)
    else:
        from .guard import guard

        fast = b.emitted[n_pre:]
        guard(gm, match.out, fast, o, [pred], _original_nodes(match, fast), order=order, recompile=False,
              fake_mode=fake_mode)
    if not T.is_number(match.decay.m):  # folded into q: say what it is
        scale = T.recipe_str(match.decay.m)
    return scale, described


def _original_nodes(match, fast):
    """The nodes that compute the site's output in eager (the fallback): the site's
    nodes that only it uses.  A value that anything else reads too (the fast branch,
    or the rest of the model: torchscale's positions feed both the mask and the rotary
    embedding) is computed once, outside, and passed to both branches."""
    inside = (match.interp.nodes - match.interp.opaque) | {match.out}
    slow, todo = set(), [match.out]
    while todo:
        x = todo.pop()
        if x in slow or x not in inside or x.op != "call_function":
            continue
        slow.add(x)
        todo.extend(x.all_input_nodes)
    def outside(u):  # a user that stays (not a dead node, e.g. the n-ary einsum a chain replaced)
        return u not in slow and (u.users or u.op == "output")

    todo = [x for x in slow if x is not match.out and any(outside(u) for u in x.users)]
    while todo:
        x = todo.pop()
        if x not in slow:
            continue
        slow.discard(x)
        todo.extend(a for a in x.all_input_nodes if a in slow)
    return list(slow)


def _assert_length(b, size, cap):
    """A run-time assert that a symbolic length is within the range the proof covers."""
    node = None
    for n, roles in b.sources:
        for d, s in enumerate(shape(n)):
            if not isinstance(s, int) and same(s, size):
                node = b.size(n, d)
                break
        if node is not None:
            break
    if node is None:
        raise Unproven("the sequence length is not available as a graph value")
    ok = b.emit(operator.le, node, cap)
    b.emit(torch.ops.aten._assert_scalar.default, ok,
           f"leet_compile: the rewritten decay attention was proven for sequence lengths up to {cap}")


def _shared(b, key, make, reads=()):
    """The check node for ``key``: one an earlier site emitted (still in the graph, before
    this site, and no in-place op in between may write what it reads), or ``make()``'s,
    remembered for the next sites."""
    from .guard import _writes_between

    def alive(n):
        return n.graph is b.g and not getattr(n, "_erased", False)

    hit = b.checks.get(key)
    if hit is not None and b.order is not None:
        n, first = hit
        nodes = n if isinstance(n, list) else [n]
        if all(alive(x) for x in nodes + [first]) and all(b.order[x] < b.order[b.anchor] for x in nodes) and \
                not _writes_between(b.g, b.order, b.order[first], b.order[b.anchor], list(reads)):
            return n
    start = len(b.emitted)
    n = make()
    b.checks[key] = (n, b.emitted[start] if len(b.emitted) > start else (n if not isinstance(n, list) else n[0]))
    return n


def _cum_checks(b, fact, bw):
    """[w * a <= 0 (all), isfinite(w * a) (all)] for the data ``a`` of a segment sum.

    With a constant w, the check reads every element of the data node, not only the
    ones this site reads (its Sel dims, e.g. fla's chunk i): a stronger check (it
    implies this site's), and the same node for every site that reads the same data, so
    that a chunked model's sites share one predicate."""
    node, roles, _ = fact.key
    if T.is_number(fact.w):
        def make():
            aw = b.emit(aten.mul.Tensor, node, float(fact.w))
            return [b.all_true(b.emit(aten.le.Scalar, aw, 0)), b.all_true(b.emit(aten.isfinite.default, aw))]

        return _shared(b, ("cum", node, float(fact.w)), make, [node])
    a = b.materialize(node, roles, bw + ["t"])
    w = b.coef(fact.w, bw)
    if not isinstance(w, float):
        w = b.emit(aten.unsqueeze.default, w, -1)
    aw = b.emit(aten.mul.Tensor, a, w)
    return [b.all_true(b.emit(aten.le.Scalar, aw, 0)), b.all_true(b.emit(aten.isfinite.default, aw))]


def _preconditions(b, match):
    """(0-d bool node or None, texts): the value facts the proof assumed, as checks."""
    bw = b.batch
    checks, alls, texts = [], [], []
    assumed = match.facts.assumed
    # c < 0 implies c <= 0: check the stronger fact once
    assumed = {f for f in assumed if not (isinstance(f, T.NonPositive) and T.Negative(f.c) in assumed)}
    for fact in sorted(assumed, key=repr):
        if isinstance(fact, (T.NonPositive, T.Negative, T.Positive)):
            c = b.coef(fact.c, bw)
            if isinstance(c, float):
                ok = {T.NonPositive: c <= 0, T.Negative: c < 0, T.Positive: c > 0}[type(fact)]
                if not ok or (not isinstance(fact, T.Positive) and not math.isfinite(c)):
                    raise Unproven("a decay coefficient has the wrong sign")
                continue
            if not isinstance(fact, T.Positive):  # finite too: eager's exp(-inf * 0) is nan
                less = aten.le.Scalar if isinstance(fact, T.NonPositive) else aten.lt.Scalar
                checks.append(b.emit(less, c, 0))
                checks.append(b.emit(aten.isfinite.default, c))
                texts.append(f"{T.recipe_str(fact.c)} {'<=' if isinstance(fact, T.NonPositive) else '<'} 0 "
                             "and finite")
            else:
                checks.append(b.emit(aten.gt.Scalar, c, 0))
                texts.append(f"{T.recipe_str(fact.c)} > 0")
        else:  # NonPositiveCum: w * a <= 0 for the data a of a segment sum
            alls.extend(_cum_checks(b, fact, bw))
            node = fact.key[0]
            texts.append(f"{T.recipe_str(fact.w)}*{T.root_name(node)} <= 0 and finite")
    alls = [b.all_true(c) for c in checks] + alls
    if not alls:
        return None, texts

    def combine():
        pred = alls[0]
        for c in alls[1:]:
            pred = b.emit(aten.logical_and.default, pred, c)
        return pred

    return _shared(b, ("and", *alls), combine, [x for c in alls for x in c.all_input_nodes]), texts


def _operator_call(b, match):
    """The decay_attn call in the original output's layout and dtype: (node, scale)."""
    qn, kn = b.qk()
    vn = b.layout(match.v, match.v_roles)
    qn, scale = b.scaled_q(qn, match.decay.m)
    ld = b.log_decay(match.decay, qn)
    qn, kn, vn = (b.flat(x) for x in (qn, kn, vn))
    op = b.emit(torch.ops.leet.decay_attn.default, qn, kn, vn, ld, float(scale), None, False, "auto", "auto")
    o = b.emit(operator.getitem, op, 0)
    return _output(b, match, o), scale


def _output(b, match, o, dims=None):
    """The operator's result o back in the layout and dtype of the original output
    (size-1 batch dims unsqueezed); ``dims``: o's roles when already known."""
    names = tuple(r for r in match.out_roles if r not in (None, "i", "e"))
    if dims is not None:
        pass
    elif b.extra:
        o = b.emit(aten.unflatten.int, o, 0, [b.size_of(r) for r in b.batch[:-1]])
        dims = b.batch + ["i", "e"]
    elif names == ("b", "h"):
        dims = ["b", "h", "i", "e"]
    elif names == ("bh",):
        o = b.emit(aten.flatten.using_ints, o, 0, 1) if b.split else b.emit(aten.squeeze.dims, o, [0])
        dims = ["bh", "i", "e"]
    else:
        o = b.emit(aten.squeeze.dims, o, [0, 1])
        dims = ["i", "e"]
    perm = [dims.index(r) for r in match.out_roles if r is not None]
    if perm != list(range(len(perm))):
        o = b.emit(aten.permute.default, o, perm)
    for d, r in enumerate(match.out_roles):
        if r is None:
            o = b.emit(aten.unsqueeze.default, o, d)
    want_dt = val(match.out).dtype
    if val(o) is not None and val(o).dtype != want_dt:
        o = b.emit(aten._to_copy.default, o, dtype=want_dt)
    return o


def _lift(x, roles):
    """(base, roles) with x = views of ``select(base, d, index)`` (transpose / permute of
    it): base's roles, Sel(index) at d.  None when x is no such view."""
    from .interpreter import Sel

    roles = list(roles)
    while isinstance(x, torch.fx.Node) and x.op == "call_function":
        t, a = x.target, x.args
        if t is aten.select.int and isinstance(a[2], int) and len(a) == 3:
            d = a[1] % (len(roles) + 1)
            return a[0], tuple(roles[:d] + [Sel(a[2])] + roles[d:])
        if t is aten.transpose.int and len(a) == 3:
            d0, d1 = a[1] % len(roles), a[2] % len(roles)
            roles[d0], roles[d1] = roles[d1], roles[d0]
        elif t is aten.permute.default and len(a) == 2:
            new = [None] * len(roles)
            for k, p in enumerate(a[1]):
                new[p % len(roles)] = roles[k]
            roles = new
        else:
            return None
        x = a[0]
    return None


def _chunk_batched(b, match, order):
    """Chunked models (fla's chunked simple GLA: a Python loop over chunks, unrolled by
    dynamo) have one site per chunk, each reading chunk i (a select) of the same q, k, v
    and decays.  In an inference graph, the sites' calls are one call over every chunk
    (the chunk dim merged into the operator's batch, [B * n, H, C, D]), emitted once and
    shared: each site selects its chunk of the result.  Each (batch, head) is an
    independent attention, so chunk i of that call is this site's call.  Returns the
    shared [B, n, H, C, V] node (b.sel_index set), or None where this does not apply:
    training graphs (a backward through the whole call whichever branch runs), row
    sums, per-row scales, other batch layouts, operands not all read at the same index."""
    from .guard import _requires_grad, _writes_between
    from .interpreter import Sel

    names = tuple(r for r in match.out_roles if r not in (None, "i", "e"))
    if (b.batch, names) not in ((["b", "h"], ("b", "h")), (["b", "bh"], ("bh",))) or b.split or \
            not T.is_number(match.decay.m) or _requires_grad(match.out):
        return None
    q, rq, k, rk, _ = match.interp.scores
    lifted = [_lift(x, r) for x, r in ((q, rq), (k, rk), (match.v, match.v_roles))]
    if any(x is None for x in lifted):
        return None
    roles_all = [r for _, r in lifted] + [r for (_, r, _) in match.decay.cums] + \
        [r for _, r in T.recipe_nodes(match.decay.coef)]
    sels = {x for r in roles_all for x in r if isinstance(x, Sel)}
    if len(sels) != 1 or any(sum(isinstance(x, Sel) for x in r) != 1 for r in roles_all[:3]) or \
            any(sum(isinstance(x, Sel) for x in r) > 1 for r in roles_all[3:]):
        return None
    (sel,) = sels
    sizes = [shape(n)[list(r).index(sel)] for (n, r) in lifted] + \
        [shape(n)[list(r).index(sel)] for (n, r, _) in match.decay.cums if sel in r]
    if not all(statically_known_true(z == sizes[0]) for z in sizes[1:]):
        return None
    if sel.index < 0:  # the site's chunk is taken with index_select: indices in [0, n)
        return None

    def strip(r):
        return tuple("n" if x == sel else x for x in r)

    try:
        key = ("chunks", *((n, strip(r)) for n, r in lifted),
               tuple(sorted(((n, strip(r), d, w) for (n, r, d), w in match.decay.cums.items()), key=repr)),
               match.decay.coef, float(match.decay.m), val(match.out).dtype)
        hash(key)
    except TypeError:
        return None
    reads = [n for n, _ in lifted] + [n for (n, _, _) in match.decay.cums] + \
        [n for n, _ in T.recipe_nodes(match.decay.coef)]
    hit = b.checks.get(key)
    if hit is not None:
        full, first = hit
        alive = all(x.graph is b.g and not getattr(x, "_erased", False) for x in (full, first))
        if alive and order is not None and order[full] < order[b.anchor] and \
                not _writes_between(b.g, order, order[first], order[b.anchor], reads):
            b.sel_index = sel.index
            return full
    saved = b.batch, b.extra, b.sources
    b.sel_index = sel.index
    b.batch, b.extra = ["b", "n", b.batch[1]], ["n"]
    b.sources = [(n, strip(r)) for n, r in lifted]
    start = len(b.emitted)
    try:
        qn, kn, vn = (b.layout(n, r) for n, r in lifted)
        ld = b.log_decay(match.decay, qn)
        qn, kn, vn = (b.flat(x) for x in (qn, kn, vn))
        op = b.emit(torch.ops.leet.decay_attn.default, qn, kn, vn, ld, float(match.decay.m), None, False,
                    "auto", "auto")
        o = b.emit(operator.getitem, op, 0)
        full = b.emit(aten.unflatten.int, o, 0, [b.size_of("b"), b.size_of("n")])
    except Unproven:  # a layout the batched call cannot take: the per-site call instead
        for x in reversed(b.emitted[start:]):
            if not x.users:
                b.g.erase_node(x)
        del b.emitted[start:]
        b.sel_index = None
        return None
    finally:
        b.batch, b.extra, b.sources = saved
    b.checks[key] = (full, b.emitted[start] if len(b.emitted) > start else full)
    return full
