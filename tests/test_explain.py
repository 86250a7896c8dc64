"""leet_compile.explain and what the pass tells people.

explain leaves torch.compile's caches as they were (any number of calls, before or
after a compile, with or without graph breaks); reports name tensors as the model
does and read as sentences with hints; near misses and internal errors are logged
and counted; the "leet" backend says once when it rewrote nothing.

Only one test runs Inductor (the real backend="leet" after explain calls); the
others compile with a backend that runs the same tracing and pass as "leet"."""
import inspect
import logging
import os
import sys

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import leet_compile
from leet_compile import backend
from leet_compile.passes import report as R

sys.path.insert(0, os.path.dirname(__file__))
from _decay_models import Fn, buffer_mask, pow_masked_fill, retnet_gamma, softmax_attn  # noqa: E402

LOGGER = "leet_compile"


def qkv(T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, T, 8, generator=g) for _ in range(3)]


class Retention(nn.Module):
    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for name, t in buffers.items():
            self.register_buffer(name, t)

    def forward(self, q, k, v):
        return self.fn(self, q, k, v)


class Block(nn.Module):
    def __init__(self, retention):
        super().__init__()
        self.retention = retention

    def forward(self, q, k, v):
        return self.retention(q, k, v)


class Net(nn.Module):
    """blocks.0 is proven (gamma ** (i - j)); blocks.1 reads a [T, T] buffer mask."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([
            Block(Retention(pow_masked_fill, gamma=retnet_gamma())),
            Block(Retention(buffer_mask, mask=torch.ones(64, 64).tril())),
        ])

    def forward(self, q, k, v):
        for b in self.blocks:
            q = b(q, k, v)
        return q


class GraphBreak(nn.Module):
    """Two proven sites with a graph break between them: dynamo compiles forward's
    own frame (and a resume function), not only explain's entry frame."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", retnet_gamma())

    def forward(self, q, k, v):
        o = pow_masked_fill(self, q, k, v)
        torch._dynamo.graph_break()
        return pow_masked_fill(self, o, k, v)


class Counting:
    """A backend doing what "leet" does up to Inductor (trace, pass), then running
    the rewritten graph; counts the graphs it compiled."""

    def __init__(self):
        self.graphs = 0
        self.rewrites = 0
        self.dynamic = False

    def __call__(self, gm, example_inputs):
        aten_gm, report = backend.rewrite(gm, example_inputs)
        self.graphs += 1
        self.rewrites += len(report.rewrites)
        self.dynamic |= any(isinstance(d, torch.SymInt) for x in example_inputs
                            if isinstance(x, torch.Tensor) for d in x.shape)
        return aten_gm


# ---------------------------------------------------------------- compile caches


def test_explain_repeated_then_compile_rewrites():
    """The measured defect: the 9th explain call came back empty and a later
    torch.compile(model, backend="leet") ran eager with 0 rewrites."""
    torch._dynamo.reset()
    model = Fn(pow_masked_fill, gamma=retnet_gamma())
    inputs = qkv()
    for _ in range(10):
        report = leet_compile.explain(model, *inputs)
        assert len(report.rewrites) == 1 and not report.near_misses, str(report)
    # models sharing one forward code object (Fn.forward) are not spent either
    for s in range(9):
        report = leet_compile.explain(Fn(pow_masked_fill, gamma=retnet_gamma() ** (s + 1)), *inputs)
        assert len(report.rewrites) == 1, str(report)
    counters.clear()
    out = torch.compile(model, backend="leet")(*inputs)
    assert counters["leet"]["decay_attn_rewrites"] == 1
    torch.testing.assert_close(out, model(*inputs), rtol=1e-4, atol=1e-4)


def test_explain_with_graph_breaks_before_and_after_compile():
    torch._dynamo.reset()
    from leet_compile.explainer import _CompileStateGuard

    model = GraphBreak()
    for s in range(9):  # one more than dynamo's recompile_limit, at changing lengths
        assert len(leet_compile.explain(model, *qkv(T=12 + s)).rewrites) == 2
    assert _CompileStateGuard._count(GraphBreak.forward.__code__) == 0  # forward's cache: empty
    assert not _CompileStateGuard._pgo_state()[1]  # nor any shape history (it persists across runs)
    inputs = qkv(T=24)
    be = Counting()
    compiled = torch.compile(model, backend=be)
    out = compiled(*inputs)
    assert (be.graphs, be.rewrites) == (2, 2)  # compiled, not spent by explain
    assert not be.dynamic  # explain's lengths are not in dynamo's automatic-dynamic history
    torch.testing.assert_close(out, model(*inputs), rtol=1e-4, atol=1e-4)
    for _ in range(3):  # explain after the user's compile: full reports ...
        assert len(leet_compile.explain(model, *inputs).rewrites) == 2
    compiled(*inputs)
    assert be.graphs == 2  # ... and the user's compiled code is still used as it was


def test_explain_of_a_compiled_model_and_kwargs():
    torch._dynamo.reset()
    model = Fn(pow_masked_fill, gamma=retnet_gamma())
    q, k, v = qkv()
    assert len(leet_compile.explain(torch.compile(model, backend=Counting()), q, k, v=v).rewrites) == 1
    assert len(leet_compile.explain(lambda q, k, v: model(q, k, v), q, k, v).rewrites) == 1


def test_explain_leaves_counters_alone():
    model = Net()
    counters.clear()
    counters["leet"]["decay_attn_rewrites"] = 3
    before = {k: dict(v) for k, v in counters.items()}
    leet_compile.explain(model, *qkv())
    assert {k: dict(v) for k, v in counters.items() if v} == {k: v for k, v in before.items() if v}


# ---------------------------------------------------------------- what the report says


def test_report_uses_the_users_names_and_lines():
    report = leet_compile.explain(Net(), *qkv())
    text = str(report)
    assert "l_self" not in text and "l_q_" not in text, text
    (hit,) = report.rewrites
    assert "blocks.0.retention.gamma" in hit.decay
    assert hit.source.startswith(os.path.join(os.path.dirname(__file__), "_decay_models.py"))
    (miss,) = report.near_misses
    assert "_decay_models.py" in miss.source and "m.mask" in miss.source
    assert "blocks.1.retention.mask" in miss.reason, miss.reason
    assert "arange" in miss.hint
    assert "why: " in text and "hint: " in text


def test_report_sentences():
    report = leet_compile.explain(Fn(softmax_attn), *qkv())
    (miss,) = report.near_misses
    text = str(miss)
    why = next(line for line in text.splitlines() if "why:" in line)
    assert why.split("why: ")[1][0].isupper() and why.endswith(".")
    assert "softmax" in miss.hint


def test_user_name():
    assert R.user_name("l_self_modules_blocks_modules_0_modules_retention_buffers_gamma_") == "blocks.0.retention.gamma"
    assert R.user_name("l_self_modules_attn_parameters_log_gamma_") == "attn.log_gamma"
    assert R.user_name("l_q_") == "q"
    names = []

    def capture(gm, example_inputs):
        names.extend(R.user_name(n) for n in gm.graph.nodes if n.op == "placeholder")
        aten = backend.trace_to_aten(gm, example_inputs)
        names.extend(R.user_name(n) for n in aten.graph.nodes if n.op == "placeholder")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Net(), backend=capture)(*qkv())
    assert "blocks.0.retention.gamma" in names and "blocks.1.retention.mask" in names
    assert {"q", "k", "v"} <= set(names)
    assert names[: len(names) // 2] == names[len(names) // 2:]  # the ATen graph keeps them


def test_user_names_of_an_exported_program():
    ep = torch.export.export(Net(), tuple(qkv()))
    R.name_exported_inputs(ep)
    names = set(R.user_names(ep.graph_module).values())
    assert {"blocks.0.retention.gamma", "blocks.1.retention.mask"} <= names


def _node(stack_trace, name="matmul_1"):
    g = torch.fx.Graph()
    n = g.placeholder(name)
    n.meta["stack_trace"] = stack_trace
    return n


def test_source_of_is_the_users_line():
    torch_file = os.path.join(os.path.dirname(torch.__file__), "nn", "functional.py")
    ours = R.__file__
    st = (f'  File "/home/me/model.py", line 10, in forward\n    y = self.attn(x)\n'
          f'  File "/home/me/attn.py", line 42, in forward\n    return F.thing(q @ k.mT * D)\n'
          f'           ^^^^^^^^^^^^^^^^^^\n'
          f'  File "{torch_file}", line 5, in thing\n    return torch.matmul(a, b)\n'
          f'  File "{ours}", line 1, in helper\n    x\n')
    assert R.source_of(_node(st)) == "/home/me/attn.py:42: return F.thing(q @ k.mT * D)"
    assert R.source_of(_node(f'  File "{torch_file}", line 5, in thing\n    z\n')) == f"{torch_file}:5: z"
    assert R.source_of(_node("")) == ""


def test_hint_for():
    assert "arange" in R.hint_for("the input mask gives a value that depends on both i and j (data-dependent mask)")
    assert "tril" in R.hint_for("the mask is not zero above the diagonal (j > i)")
    assert "bug in leet_compile" in R.hint_for("internal error: KeyError: 3")
    assert R.hint_for("something nobody wrote a hint for") == ""


# ---------------------------------------------------------------- logging and counting


@pytest.mark.allow_internal_errors
def test_near_miss_and_internal_error_are_logged_and_counted(caplog):
    st = '  File "/home/me/attn.py", line 42, in forward\n    return (q @ k.mT * D) @ v\n'
    g = torch.fx.Graph()
    gamma = g.placeholder("l_self_modules_blocks_modules_0_modules_retention_buffers_gamma_")
    n = g.call_function(torch.ops.aten.mm.default, (gamma, gamma))
    n.meta["stack_trace"] = st
    report = R.RewriteReport()
    counters.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        s = report.near_miss(n, f"the input {gamma.name} gives a value that depends on both i and j")
        e = report.internal_error(n, KeyError("boom"))
    assert s.reason == "the input blocks.0.retention.gamma gives a value that depends on both i and j"
    assert s.source == "/home/me/attn.py:42: return (q @ k.mT * D) @ v"
    assert e.reason.startswith("internal error") and "boom" in e.reason
    assert counters["leet"]["internal_errors"] == 1 and counters["leet"]["near_misses"] == 1
    levels = {r.levelno for r in caplog.records if "attn.py:42" in r.getMessage()}
    assert levels == {logging.DEBUG, logging.WARNING}
    assert "1 by an internal error" in str(report)


@pytest.mark.allow_internal_errors
def test_a_failing_pass_is_an_internal_error_and_the_graph_is_left_alone(monkeypatch, caplog):
    import leet_compile.passes as passes

    def broken(gm):
        raise RuntimeError("analysis bug")

    monkeypatch.setattr(passes, "rewrite_decay_attention", broken)
    model = Fn(pow_masked_fill, gamma=retnet_gamma())
    inputs = qkv()
    counters.clear()
    torch._dynamo.reset()
    be = Counting()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = torch.compile(model, backend=be)(*inputs)
        report = leet_compile.explain(model, *inputs)
    assert be.graphs == 1 and be.rewrites == 0
    torch.testing.assert_close(out, model(*inputs))  # compiled as written
    assert not report.rewrites and "analysis bug" in report.near_misses[0].reason
    assert counters["leet"]["internal_errors"] == 2  # explain keeps this count
    assert counters["leet"]["decay_attn_rewrites"] == 0
    assert sum("internal error" in r.getMessage() for r in caplog.records) == 2


def _return_line(fn):
    """The line of fn's return statement (where the attention site is)."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(k for k, line in enumerate(lines) if line.strip().startswith("return"))


def test_the_pass_logs_every_near_miss(caplog):
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        report = leet_compile.explain(Net(), *qkv())
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno == logging.DEBUG]
    assert len(report.near_misses) == 1
    assert any("left" in m and f"_decay_models.py:{_return_line(buffer_mask)}" in m for m in msgs), msgs


# ---------------------------------------------------------------- the backend's warning


@pytest.fixture
def no_inductor(monkeypatch):
    """leet_backend with Inductor replaced by running the rewritten graph (fast)."""
    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, **kw: gm)
    monkeypatch.setattr(backend, "_warned", set())


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "leet_compile.explain" in r.getMessage()]


def test_backend_warns_once_when_nothing_is_rewritten(no_inductor, caplog):
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        compiled = torch.compile(Fn(softmax_attn), backend="leet")
        for T in (12, 16, 20):  # recompiles: still one warning
            compiled(*qkv(T))
        torch.compile(Fn(softmax_attn), backend="leet")(*qkv())  # another instance, same code
    (w,) = _warnings(caplog)
    msg = w.getMessage()
    assert "not rewritten" in msg and "softmax" in msg and f"_decay_models.py:{_return_line(softmax_attn)}" in msg


def test_backend_is_quiet_when_something_is_rewritten(no_inductor, caplog):
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        torch.compile(Net(), backend="leet")(*qkv())  # one rewrite, one near miss
    assert not _warnings(caplog)
