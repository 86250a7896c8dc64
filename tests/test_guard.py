"""passes/guard.py: a value precondition (here gamma > 0, so that log(gamma) is the
log decay) guards the rewritten site with torch.cond, the original computation as
the fallback.  The site is rewritten by hand (not by the pass) so that these tests
check the guard alone: forward, gradients, fallback, dynamic shapes, export + AOTI,
and no training-only op in inference graphs."""
import operator
import re
import time

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import leet_compile  # noqa: F401  (registers torch.ops.leet)
from leet_compile.backend import trace_to_aten
from leet_compile.passes.guard import emit, guard, guarded_sites, outline

aten = torch.ops.aten
B, H, T, D = 1, 2, 8, 4


def model(q, k, v, gamma):
    """Naive retention: ((q k^T) * D) v with D[h, i, j] = gamma_h^(i-j), j <= i."""
    n = q.shape[2]
    i = torch.arange(n, device=q.device)
    d = i[:, None] - i[None, :]
    mask = torch.where(d >= 0, gamma[:, None, None] ** d, 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


class Model(torch.nn.Module):
    def forward(self, q, k, v, gamma):
        return model(q, k, v, gamma)


def inputs(t=T, requires_grad=False, gamma=(0.9, 0.6)):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for _ in range(3))
    gm = torch.tensor(gamma)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, gm)]


def ancestors(node, stop=()):
    """The nodes `node` depends on, `node` included, up to placeholders and `stop`."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n in stop or n.op == "placeholder":
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def next_site(g):
    """(anchor, q, k, v) of the first unrewritten `((q @ k^T) * mask) @ v`, or None."""
    for n in g.nodes:
        if n.target != aten.matmul.default or not n.users or n.args[0].target != aten.mul.Tensor:
            continue
        scores = n.args[0].args[0]
        if scores.target == aten.matmul.default and scores.args[1].target == aten.transpose.int:
            return n, scores.args[0], scores.args[1].args[0], n.args[1]
    return None


def rewrite_site(gm, max_gamma=None, transposed_out=False):
    """Replaces every site by decay_attn(q, k, v, log(gamma)) guarded by
    (gamma > 0).all() (and (gamma <= max_gamma).all() if given), the way the pass
    will call guard().  transposed_out: the fast result is a non-contiguous view
    (strides of a [B, H, D, T] tensor), as after a layout change.  Returns the
    getitem nodes."""
    g = gm.graph
    # dynamo: l_gamma_; make_fx: gamma_1; torch.export: gamma
    gamma = next(n for n in g.nodes if n.op == "placeholder" and re.sub(r"^l_|_$|_\d+$", "", n.name) == "gamma")
    results = []
    while (site := next_site(g)) is not None:
        anchor, q, k, v = site
        slow = ancestors(anchor, stop={q, k, v, gamma})
        preconditions = [emit(gm, anchor, aten.all.default, emit(gm, anchor, aten.gt.Scalar, gamma, 0.0))]
        if max_gamma is not None:
            le = emit(gm, anchor, aten.le.Scalar, gamma, max_gamma)
            preconditions.append(emit(gm, anchor, aten.all.default, le))
        ld = emit(gm, anchor, aten.log.default, gamma)
        op = emit(gm, anchor, torch.ops.leet.decay_attn.default, q, k, v, ld, 1.0, None, False, "auto", "auto")
        fast = [ld, op, emit(gm, anchor, operator.getitem, op, 0)]
        if transposed_out:
            fast.append(emit(gm, anchor, aten.transpose.int, fast[-1], 2, 3))
            fast.append(emit(gm, anchor, aten.clone.default, fast[-1], memory_format=torch.contiguous_format))
            fast.append(emit(gm, anchor, aten.transpose.int, fast[-1], 2, 3))
        results.append(guard(gm, anchor, fast, fast[-1], preconditions, list(slow)))
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return results


class Backend:
    """A torch.compile backend: ATen pre-dispatch trace, hand rewrite, Inductor.
    Keeps the rewritten graphs for inspection."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        a = trace_to_aten(gm, example_inputs)
        rewrite_site(a)
        self.graphs.append(a)
        return compile_fx(a, example_inputs)


def targets(gm):
    """Call targets of gm and of every submodule (the cond branches)."""
    return [n.target for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"]


def has_contiguous_grad(gm):
    return any("_contiguous_grad" in str(t) for t in targets(gm))


def compiled(dynamic=False):
    torch._dynamo.reset()
    backend = Backend()
    return torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=True), backend


TOL = dict(rtol=1e-5, atol=1e-5)


def test_forward_matches_eager():
    f, backend = compiled()
    x = inputs()
    torch.testing.assert_close(f(*x), model(*x), **TOL)
    (gm,) = backend.graphs
    assert len(guarded_sites(gm)) == 1
    assert torch.ops.leet.decay_attn.default in targets(gm.leet_fast_0)
    assert torch.ops.leet.decay_attn.default not in targets(gm.leet_slow_0)
    assert aten.clone.default not in targets(gm)  # both results contiguous already: no copy


def test_gradients_match_eager():
    f, backend = compiled()
    x = inputs(requires_grad=True)
    y = inputs(requires_grad=True)
    grad_out = torch.randn(B, H, T, D)
    f(*x).backward(grad_out)
    model(*y).backward(grad_out)
    for a, b in zip(x, y):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    assert has_contiguous_grad(backend.graphs[0])  # the training graph does need it


@pytest.mark.parametrize("gamma", [(0.9, 0.0), (-0.5, 0.6)], ids=["zero", "negative"])
def test_failed_precondition_takes_the_original_computation(gamma):
    """log(0) = -inf and log(-0.5) = nan: the fast branch would differ from eager (NaN
    for the negative decay), the original computation is exact."""
    f, _ = compiled()
    x = inputs(gamma=gamma)
    out, ref = f(*x), model(*x)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dynamic_shapes_training():
    """One graph serves both lengths, forward and backward, fast branch and fallback."""
    f, backend = compiled(dynamic=True)
    for t, gamma in ((8, (0.9, 0.6)), (13, (0.9, 0.6)), (13, (-0.5, 0.6))):
        x, y = inputs(t, True, gamma), inputs(t, True, gamma)
        out = f(*x)
        torch.testing.assert_close(out, model(*y), **TOL)
        out.sum().backward()
        model(*y).sum().backward()
        for a, b in zip(x, y):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    assert len(backend.graphs) == 1


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "no_grad"])
def test_inference_graph_has_no_contiguous_grad(requires_grad):
    f, backend = compiled()
    x = inputs(requires_grad=requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(f(*x), model(*x), **TOL)
    (gm,) = backend.graphs
    assert len(guarded_sites(gm)) == 1
    assert not has_contiguous_grad(gm)


def rewrite_exported(ep):
    """The rewrite applied to an exported program, as leet_compile.export does it:
    functional inference IR (run_decompositions with an empty table), then the
    graph module is rewritten in place.  The site here is the program's output, so
    the signature's output names follow the new output node (the verifier checks them)."""
    ep = ep.run_decompositions({})
    gm = ep.graph_module
    rewrite_site(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for spec, node in zip(ep.graph_signature.output_specs, out.args[0]):
        if isinstance(spec.arg, torch.export.graph_signature.TensorArgument):
            spec.arg.name = node.name
    return ep


def exported():
    """Model exported with a dynamic sequence length, then rewritten."""
    dim_t = torch.export.Dim("T", min=2, max=64)
    shapes = ({2: dim_t}, {2: dim_t}, {2: dim_t}, None)
    return rewrite_exported(torch.export.export(Model(), tuple(inputs()), dynamic_shapes=shapes))


CASES = ((8, (0.9, 0.6)), (21, (0.9, 0.6)), (21, (0.9, 0.0)), (21, (-0.5, 0.6)))


def test_export_rewritten():
    ep = exported()
    ep.validate()  # the export verifier accepts the rewritten graph
    gm = ep.graph_module
    assert len(guarded_sites(gm)) == 1
    assert torch.ops.leet.decay_attn.default in targets(gm.leet_fast_0)
    assert not has_contiguous_grad(gm)  # inference IR, although grad mode is on here
    for t, gamma in CASES:
        x = inputs(t, gamma=gamma)
        torch.testing.assert_close(ep.module()(*x), model(*x), **TOL)


@pytest.mark.slow  # aoti_compile_and_package alone takes about 56 s on 2 shared cores
def test_aoti_package(tmp_path):
    ep = exported()
    start = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "guard.pt2"))
    print(f"aoti_compile_and_package: {time.perf_counter() - start:.1f} s")
    runner = leet_compile.load_package(path)
    for t, gamma in CASES:
        x = inputs(t, gamma=gamma)
        torch.testing.assert_close(runner(*x), model(*x), **TOL)


def test_outline_raises_on_missing_input():
    gm = torch.fx.symbolic_trace(lambda a, b: (a + b).relu())
    a, b = (n for n in gm.graph.nodes if n.op == "placeholder")
    add = next(n for n in gm.graph.nodes if n.target == operator.add)
    relu = next(iter(add.users))
    with pytest.raises(ValueError, match="reads b"):
        outline(gm, [relu, add], relu, [a])
    sub = outline(gm, [relu, add], relu, [a, b])  # nodes given out of order
    x, y = torch.randn(3), torch.randn(3)
    (res,) = sub(x, y)
    torch.testing.assert_close(res, (x + y).relu())


def traced(fn=model, requires_grad=False):
    """fn as a make_fx pre-dispatch graph (fake tracing: meta["val"] on every node)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def tupled(q, k, v, gamma):
        return (fn(q, k, v, gamma),)  # a tuple output, as in dynamo and export graphs

    return make_fx(tupled, tracing_mode="fake", pre_dispatch=True)(*inputs(requires_grad=requires_grad))


def two_sites(q, k, v, gamma):
    return model(model(q, k, v, gamma), k, v, gamma)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_guarded_graph_runs_eagerly():
    """No compiler: the cond runs as is and picks the branch by the preconditions."""
    gm = traced()
    rewrite_site(gm, max_gamma=1.0)  # two preconditions
    targets_ = [n.target for n in gm.graph.nodes]
    assert len(guarded_sites(gm)) == 1 and targets_.count(aten.logical_and.default) == 1
    assert aten.pow.Tensor_Tensor not in targets_  # the caller removed the dead slow nodes
    fast, slow = count_calls(gm.leet_fast_0), count_calls(gm.leet_slow_0)
    for gamma, branch in (((0.9, 0.6), fast), ((0.9, 0.0), slow), ((-0.5, 0.6), slow), ((1.5, 0.6), slow)):
        x = inputs(gamma=gamma)
        n = len(branch)
        torch.testing.assert_close(gm(*x)[0], model(*x), **TOL)
        assert len(branch) == n + 1, gamma
    assert len(fast) == 1 and len(slow) == 3


def test_two_sites_backward_eagerly():
    """Two guarded sites, the second reading the first's result: unique branch
    names, the differentiable operands (the first cond's output included) wrapped,
    and eager autograd through both conds matches the model's."""
    gm = traced(two_sites, requires_grad=True)
    rewrite_site(gm)
    assert len(guarded_sites(gm)) == 2
    assert {"leet_fast_0", "leet_slow_0", "leet_fast_1", "leet_slow_1"} <= {name for name, _ in gm.named_children()}
    for i in (0, 1):
        for branch in (gm.get_submodule(f"leet_fast_{i}"), gm.get_submodule(f"leet_slow_{i}")):
            wrapped = [n.args[0].name for n in branch.graph.nodes if "_contiguous_grad" in str(n.target)]
            assert len(wrapped) == 4, (branch.code, wrapped)  # q (or the first result), k, v, gamma
    grad_out = torch.randn(B, H, T, D)
    for gamma in ((0.9, 0.6), (-0.5, 0.6)):
        x, y = inputs(requires_grad=True, gamma=gamma), inputs(requires_grad=True, gamma=gamma)
        out = gm(*x)[0]
        torch.testing.assert_close(out, two_sites(*y), **TOL)
        out.backward(grad_out)
        two_sites(*y).backward(grad_out)
        for a, b in zip(x, y):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_branch_outputs_get_the_same_strides():
    """A non-contiguous fast result is made contiguous, like the slow one (torch.cond
    requires the same stride order); forward and backward still match."""
    gm = traced(requires_grad=True)
    rewrite_site(gm, transposed_out=True)
    last = [n for n in gm.leet_fast_0.graph.nodes if n.op == "output"][0].args[0][0]
    assert last.target == aten.clone.default and last.kwargs["memory_format"] == torch.contiguous_format
    assert aten.clone.default not in targets(gm.leet_slow_0)
    for gamma in ((0.9, 0.6), (-0.5, 0.6)):
        x, y = inputs(requires_grad=True, gamma=gamma), inputs(requires_grad=True, gamma=gamma)
        out = gm(*x)[0]
        assert out.is_contiguous()
        torch.testing.assert_close(out, model(*y), **TOL)
        out.sum().backward()
        model(*y).sum().backward()
        for a, b in zip(x, y):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_guard_rejects_mismatched_pieces():
    gm = traced()
    g = gm.graph
    gamma = [n for n in g.nodes if n.op == "placeholder"][3]
    anchor = next(n for n in g.nodes if n.op == "output").args[0][0]
    slow = list(ancestors(anchor))
    pred = emit(gm, anchor, aten.all.default, emit(gm, anchor, aten.gt.Scalar, gamma, 0.0))
    wrong = emit(gm, anchor, aten.log.default, gamma)  # [H], not the anchor's shape
    before = gm.code
    with pytest.raises(ValueError, match="fast_out is"):
        guard(gm, anchor, [wrong], wrong, [pred], slow)
    with pytest.raises(ValueError, match="0-d bool"):
        guard(gm, anchor, [wrong], wrong, [gamma], slow)
    with pytest.raises(ValueError, match="anchor must be one of slow_nodes"):
        guard(gm, anchor, [wrong], wrong, [pred], [])
    assert gm.code == before and not hasattr(gm, "leet_fast_0")


def test_guard_rejects_a_branch_that_mutates_its_operand():
    """torch.cond branches must be functional: an in-place op on (a view of) an
    operand inside the original computation cannot be outlined."""

    def mutating(q, k, v, gamma):
        kt = k.transpose(-1, -2)
        kt.mul_(1.0)
        return q @ kt @ v

    gm = traced(mutating)
    q, k, v, gamma = (n for n in gm.graph.nodes if n.op == "placeholder")
    anchor = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    pred = emit(gm, anchor, aten.all.default, emit(gm, anchor, aten.gt.Scalar, gamma, 0.0))
    fast = emit(gm, anchor, aten.mul.Tensor, v, 2.0)
    with pytest.raises(ValueError, match="mutates k"):
        guard(gm, anchor, [fast], fast, [pred], list(ancestors(anchor)))
