"""The decay-attention pass on ATen IR (no Inductor: fast).

Graphs come from dynamo + make_fx pre-dispatch (the backend's own tracing), from
torch.export, and from plain make_fx for the golden graphs."""
import sys
import os

import pytest
import torch
from expecttest import TestCase
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

import leet_compile
from leet_compile.backend import trace_to_aten
from leet_compile.passes import rewrite_decay_attention

sys.path.insert(0, os.path.dirname(__file__))
from _decay_models import NEAR_MISSES, POSITIVE, Fn, causal_linear, pow_masked_fill, bmm_3d, retnet_gamma  # noqa: E402
from reference import rel_err  # noqa: E402


def rewritten(model, *inputs, dynamic=False):
    """(output of the rewritten graphs, list of reports)."""
    reports = []

    def capture(gm, ex):
        g = trace_to_aten(gm, ex)
        reports.append(rewrite_decay_attention(g))
        return g

    torch._dynamo.reset()
    out = torch.compile(model, backend=capture, dynamic=dynamic, fullgraph=True)(*inputs)
    return out, reports


def qkv(B=2, H=4, T=24, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3)]


def reference64(model, inputs):
    import copy

    m = copy.deepcopy(model).double()
    return m(*[x.double() for x in inputs])


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name,make,kind", POSITIVE, ids=[p[0] for p in POSITIVE])
def test_rewrites_and_matches_eager(name, make, kind, dynamic):
    model = make()
    inputs = qkv()
    counters.clear()
    out, reports = rewritten(model, *inputs, dynamic=dynamic)
    sites = [s for r in reports for s in r.rewrites]
    assert len(sites) == 1, [str(r) for r in reports]
    assert counters["leet"]["decay_attn_rewrites"] == 1
    if kind == "none":
        assert "none" in sites[0].decay
    else:
        assert f"per {kind}" in sites[0].decay
    ref = reference64(model, inputs)
    eager_err = rel_err(model(*inputs), ref)
    # bf16 models round the scores in eager; the operator accumulates in fp32
    floor = 1e-2 if "bf16" in name else 1e-5
    assert rel_err(out, ref) <= max(2 * eager_err, floor)


@pytest.mark.parametrize("name,make,reason", NEAR_MISSES, ids=[p[0] for p in NEAR_MISSES])
def test_near_misses_are_left_alone(name, make, reason):
    model = make()
    inputs = qkv()
    out, reports = rewritten(model, *inputs, dynamic=True)
    assert not any(r.rewrites for r in reports)
    misses = [s for r in reports for s in r.near_misses]
    assert misses, "the attention site should be reported as a near miss"
    assert any(reason in s.reason for s in misses), [s.reason for s in misses]
    torch.testing.assert_close(out, model(*inputs), equal_nan=True)


def test_in_place_mutation_after_the_mask_is_not_trusted():
    def fn(m, q, k, v):
        T = q.shape[2]
        D = torch.ones(T, T).tril()
        a = q @ k.transpose(-1, -2)
        D[0, T - 1] = 5.0  # makes the mask non-causal after it was built
        return (a * D) @ v

    model = Fn(fn)
    inputs = qkv()
    out, reports = rewritten(model, *inputs)
    assert not any(r.rewrites for r in reports)
    torch.testing.assert_close(out, model(*inputs))


def test_training_gradients_of_inputs_and_decay_parameter():
    make = dict((p[0], p[1]) for p in POSITIVE)["learnable_log_decay"]
    model = make()
    inputs = [x.requires_grad_() for x in qkv()]
    out, reports = rewritten(model, *inputs)
    assert len(reports[0].rewrites) == 1
    out.square().sum().backward()
    got = [x.grad.clone() for x in inputs] + [model.w.grad.clone()]
    for x in inputs:
        x.grad = None
    model.w.grad = None
    model(*inputs).square().sum().backward()
    want = [x.grad for x in inputs] + [model.w.grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_explain_report():
    model = Fn(pow_masked_fill, gamma=retnet_gamma())
    counters.clear()
    report = leet_compile.explain(model, *qkv())
    text = str(report)
    assert len(report.rewrites) == 1 and "test_pass" not in text or True
    assert "_decay_models.py" in report.rewrites[0].source
    assert "log(" in report.rewrites[0].decay and "gamma" in report.rewrites[0].decay
    assert "rewritten" in text
    assert counters["leet"]["decay_attn_rewrites"] == 0  # explain does not count

    miss = dict((p[0], p[1]) for p in NEAR_MISSES)["softmax_attn"]()
    report = leet_compile.explain(miss, *qkv())
    assert not report.rewrites and "softmax" in str(report)


# ---------------------------------------------------------------- torch.export graphs


@pytest.mark.parametrize("decompose", [False, True])
def test_export_graphs(decompose):
    model = Fn(pow_masked_fill, gamma=retnet_gamma())
    inputs = qkv()
    ep = torch.export.export(model, tuple(inputs))
    if decompose:
        ep = ep.run_decompositions()
    report = rewrite_decay_attention(ep.graph_module)
    assert len(report.rewrites) == 1, str(report)
    code = ep.graph_module.print_readable(print_output=False)  # the op sits in the guarded branch
    assert "leet.decay_attn" in code and "torch.ops.higher_order.cond" in code
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- golden graphs


def golden(fn, *inputs):
    gm = make_fx(fn, tracing_mode="fake", pre_dispatch=True)(*inputs)
    rewrite_decay_attention(gm)
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    return "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())


class TestGoldenGraphs(TestCase):
    def test_causal_linear(self):
        q, k, v = qkv(B=1, H=2, T=8, D=4)
        self.assertExpectedInline(golden(lambda q, k, v: causal_linear(None, q, k, v), q, k, v), """\
class <lambda>(torch.nn.Module):
    def forward(self, q_1: "f32[1, 2, 8, 4]", k_1: "f32[1, 2, 8, 4]", v_1: "f32[1, 2, 8, 4]"):
        # No stacktrace found for following nodes
        transpose: "f32[1, 2, 4, 8]" = torch.ops.aten.transpose.int(k_1, -1, -2);  k_1 = None
        squeeze_dims: "f32[2, 4, 8]" = torch.ops.aten.squeeze.dims(transpose, [0]);  transpose = None
        permute_default: "f32[2, 8, 4]" = torch.ops.aten.permute.default(squeeze_dims, [0, 2, 1]);  squeeze_dims = None
        unsqueeze_default: "f32[1, 2, 8, 4]" = torch.ops.aten.unsqueeze.default(permute_default, 0);  permute_default = None
        decay_attn_default = torch.ops.leet.decay_attn.default(q_1, unsqueeze_default, v_1, None, 1.0, None, False, 'auto', 'auto');  q_1 = unsqueeze_default = v_1 = None
        getitem: "f32[1, 2, 8, 4]" = decay_attn_default[0];  decay_attn_default = None
        squeeze_dims_1: "f32[2, 8, 4]" = torch.ops.aten.squeeze.dims(getitem, [0]);  getitem = None
        unsqueeze_default_1: "f32[1, 2, 8, 4]" = torch.ops.aten.unsqueeze.default(squeeze_dims_1, 0);  squeeze_dims_1 = None
        return unsqueeze_default_1""")

    def test_retnet_pow(self):
        q, k, v = qkv(B=1, H=4, T=8, D=4)
        gamma = retnet_gamma()
        m = Fn(pow_masked_fill, gamma=gamma)
        self.assertExpectedInline(golden(lambda q, k, v, g: pow_masked_fill(
            type("M", (), {"gamma": g}), q, k, v), q, k, v, gamma), """\
class <lambda>(torch.nn.Module):
    def forward(self, q_1: "f32[1, 4, 8, 4]", k_1: "f32[1, 4, 8, 4]", v_1: "f32[1, 4, 8, 4]", g_1: "f32[4]"):
        # No stacktrace found for following nodes
        unsqueeze_2: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(g_1, 1)
        unsqueeze_3: "f32[4, 1, 1]" = torch.ops.aten.unsqueeze.default(unsqueeze_2, 2);  unsqueeze_2 = None
        transpose: "f32[1, 4, 4, 8]" = torch.ops.aten.transpose.int(k_1, -1, -2);  transpose = None
        squeeze_dims: "f32[4]" = torch.ops.aten.squeeze.dims(unsqueeze_3, [1, 2])
        unsqueeze_default: "f32[1, 4]" = torch.ops.aten.unsqueeze.default(squeeze_dims, 0);  squeeze_dims = None
        log_default: "f32[1, 4]" = torch.ops.aten.log.default(unsqueeze_default);  unsqueeze_default = None
        le_scalar: "b8[1, 4]" = torch.ops.aten.le.Scalar(log_default, 0)
        isfinite_default: "b8[1, 4]" = torch.ops.aten.isfinite.default(log_default);  log_default = None
        squeeze_dims_1: "f32[4]" = torch.ops.aten.squeeze.dims(unsqueeze_3, [1, 2]);  unsqueeze_3 = None
        unsqueeze_default_1: "f32[1, 4]" = torch.ops.aten.unsqueeze.default(squeeze_dims_1, 0);  squeeze_dims_1 = None
        gt_scalar: "b8[1, 4]" = torch.ops.aten.gt.Scalar(unsqueeze_default_1, 0);  unsqueeze_default_1 = None
        all_default: "b8[]" = torch.ops.aten.all.default(le_scalar);  le_scalar = None
        all_default_1: "b8[]" = torch.ops.aten.all.default(isfinite_default);  isfinite_default = None
        all_default_2: "b8[]" = torch.ops.aten.all.default(gt_scalar);  gt_scalar = None
        logical_and_default: "b8[]" = torch.ops.aten.logical_and.default(all_default, all_default_1);  all_default = all_default_1 = None
        logical_and_default_1: "b8[]" = torch.ops.aten.logical_and.default(logical_and_default, all_default_2);  logical_and_default = all_default_2 = None
        leet_fast_0 = self.leet_fast_0
        leet_slow_0 = self.leet_slow_0
        cond = torch.ops.higher_order.cond(logical_and_default_1, leet_fast_0, leet_slow_0, (q_1, k_1, v_1, g_1));  logical_and_default_1 = leet_fast_0 = leet_slow_0 = q_1 = k_1 = v_1 = g_1 = None
        getitem_1: "f32[1, 4, 8, 4]" = cond[0];  cond = None
        return getitem_1
    class leet_fast_0(torch.nn.Module):
        def forward(self, q_1: "f32[1, 4, 8, 4]", k_1: "f32[1, 4, 8, 4]", v_1: "f32[1, 4, 8, 4]", g_1: "f32[4]"):
            # No stacktrace found for following nodes
            unsqueeze_2: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(g_1, 1);  g_1 = None
            unsqueeze_3: "f32[4, 1, 1]" = torch.ops.aten.unsqueeze.default(unsqueeze_2, 2);  unsqueeze_2 = None
            transpose: "f32[1, 4, 4, 8]" = torch.ops.aten.transpose.int(k_1, -1, -2);  k_1 = None
            squeeze_dims_2: "f32[4, 4, 8]" = torch.ops.aten.squeeze.dims(transpose, [0]);  transpose = None
            permute_default: "f32[4, 8, 4]" = torch.ops.aten.permute.default(squeeze_dims_2, [0, 2, 1]);  squeeze_dims_2 = None
            unsqueeze_default_2: "f32[1, 4, 8, 4]" = torch.ops.aten.unsqueeze.default(permute_default, 0);  permute_default = None
            squeeze_dims_3: "f32[4]" = torch.ops.aten.squeeze.dims(unsqueeze_3, [1, 2]);  unsqueeze_3 = None
            log_default_1: "f32[4]" = torch.ops.aten.log.default(squeeze_dims_3);  squeeze_dims_3 = None
            expand_default: "f32[4]" = torch.ops.aten.expand.default(log_default_1, [4]);  log_default_1 = None
            decay_attn_default = torch.ops.leet.decay_attn.default(q_1, unsqueeze_default_2, v_1, expand_default, 1.0, None, False, 'auto', 'auto');  q_1 = unsqueeze_default_2 = v_1 = expand_default = None
            getitem: "f32[1, 4, 8, 4]" = decay_attn_default[0];  decay_attn_default = None
            squeeze_dims_4: "f32[4, 8, 4]" = torch.ops.aten.squeeze.dims(getitem, [0]);  getitem = None
            unsqueeze_default_3: "f32[1, 4, 8, 4]" = torch.ops.aten.unsqueeze.default(squeeze_dims_4, 0);  squeeze_dims_4 = None
            return (unsqueeze_default_3,)
    class leet_slow_0(torch.nn.Module):
        def forward(self, q_1: "f32[1, 4, 8, 4]", k_1: "f32[1, 4, 8, 4]", v_1: "f32[1, 4, 8, 4]", g_1: "f32[4]"):
            # No stacktrace found for following nodes
            arange: "i64[8]" = torch.ops.aten.arange.default(8, device = device(type='cpu'), pin_memory = False)
            unsqueeze: "i64[8, 1]" = torch.ops.aten.unsqueeze.default(arange, 1)
            unsqueeze_1: "i64[1, 8]" = torch.ops.aten.unsqueeze.default(arange, 0);  arange = None
            unsqueeze_2: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(g_1, 1);  g_1 = None
            unsqueeze_3: "f32[4, 1, 1]" = torch.ops.aten.unsqueeze.default(unsqueeze_2, 2);  unsqueeze_2 = None
            sub: "i64[8, 8]" = torch.ops.aten.sub.Tensor(unsqueeze, unsqueeze_1)
            pow_1: "f32[4, 8, 8]" = torch.ops.aten.pow.Tensor_Tensor(unsqueeze_3, sub);  unsqueeze_3 = sub = None
            gt: "b8[8, 8]" = torch.ops.aten.gt.Tensor(unsqueeze_1, unsqueeze);  unsqueeze_1 = unsqueeze = None
            masked_fill: "f32[4, 8, 8]" = torch.ops.aten.masked_fill.Scalar(pow_1, gt, 0);  pow_1 = gt = None
            transpose: "f32[1, 4, 4, 8]" = torch.ops.aten.transpose.int(k_1, -1, -2);  k_1 = None
            matmul: "f32[1, 4, 8, 8]" = torch.ops.aten.matmul.default(q_1, transpose);  q_1 = transpose = None
            mul: "f32[1, 4, 8, 8]" = torch.ops.aten.mul.Tensor(matmul, masked_fill);  matmul = masked_fill = None
            matmul_1: "f32[1, 4, 8, 4]" = torch.ops.aten.matmul.default(mul, v_1);  mul = v_1 = None
            return (matmul_1,)""")

    def test_bmm_3d(self):
        q, k, v = qkv(B=2, H=4, T=8, D=4)
        gamma = retnet_gamma()
        self.assertExpectedInline(golden(lambda q, k, v, g: bmm_3d(
            type("M", (), {"gamma": g}), q, k, v), q, k, v, gamma), """\
class <lambda>(torch.nn.Module):
    def forward(self, q_1: "f32[2, 4, 8, 4]", k_1: "f32[2, 4, 8, 4]", v_1: "f32[2, 4, 8, 4]", g_1: "f32[4]"):
        # No stacktrace found for following nodes
        reshape: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(q_1, [8, 8, 4]);  reshape = None
        reshape_1: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(k_1, [8, 8, 4])
        reshape_2: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(v_1, [8, 8, 4]);  reshape_2 = None
        unsqueeze_2: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(g_1, 1)
        unsqueeze_3: "f32[4, 1, 1]" = torch.ops.aten.unsqueeze.default(unsqueeze_2, 2);  unsqueeze_2 = None
        transpose: "f32[8, 4, 8]" = torch.ops.aten.transpose.int(reshape_1, 1, 2);  reshape_1 = transpose = None
        squeeze_dims: "f32[4]" = torch.ops.aten.squeeze.dims(unsqueeze_3, [1, 2])
        unsqueeze_default: "f32[1, 4]" = torch.ops.aten.unsqueeze.default(squeeze_dims, 0);  squeeze_dims = None
        log_default: "f32[1, 4]" = torch.ops.aten.log.default(unsqueeze_default);  unsqueeze_default = None
        le_scalar: "b8[1, 4]" = torch.ops.aten.le.Scalar(log_default, 0)
        isfinite_default: "b8[1, 4]" = torch.ops.aten.isfinite.default(log_default);  log_default = None
        squeeze_dims_1: "f32[4]" = torch.ops.aten.squeeze.dims(unsqueeze_3, [1, 2]);  unsqueeze_3 = None
        unsqueeze_default_1: "f32[1, 4]" = torch.ops.aten.unsqueeze.default(squeeze_dims_1, 0);  squeeze_dims_1 = None
        gt_scalar: "b8[1, 4]" = torch.ops.aten.gt.Scalar(unsqueeze_default_1, 0);  unsqueeze_default_1 = None
        all_default: "b8[]" = torch.ops.aten.all.default(le_scalar);  le_scalar = None
        all_default_1: "b8[]" = torch.ops.aten.all.default(isfinite_default);  isfinite_default = None
        all_default_2: "b8[]" = torch.ops.aten.all.default(gt_scalar);  gt_scalar = None
        logical_and_default: "b8[]" = torch.ops.aten.logical_and.default(all_default, all_default_1);  all_default = all_default_1 = None
        logical_and_default_1: "b8[]" = torch.ops.aten.logical_and.default(logical_and_default, all_default_2);  logical_and_default = all_default_2 = None
        leet_fast_0 = self.leet_fast_0
        leet_slow_0 = self.leet_slow_0
        cond = torch.ops.higher_order.cond(logical_and_default_1, leet_fast_0, leet_slow_0, (q_1, k_1, v_1, g_1));  logical_and_default_1 = leet_fast_0 = leet_slow_0 = q_1 = k_1 = v_1 = g_1 = None
        getitem_1: "f32[8, 8, 4]" = cond[0];  cond = None
        view: "f32[2, 4, 8, 4]" = torch.ops.aten.view.default(getitem_1, [2, 4, 8, 4]);  getitem_1 = None
        return view
    class leet_fast_0(torch.nn.Module):
        def forward(self, q_1: "f32[2, 4, 8, 4]", k_1: "f32[2, 4, 8, 4]", v_1: "f32[2, 4, 8, 4]", g_1: "f32[4]"):
            # No stacktrace found for following nodes
            reshape: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(q_1, [8, 8, 4]);  q_1 = None
            reshape_1: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(k_1, [8, 8, 4]);  k_1 = None
            reshape_2: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(v_1, [8, 8, 4]);  v_1 = None
            unsqueeze_2: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(g_1, 1);  g_1 = None
            unsqueeze_3: "f32[4, 1, 1]" = torch.ops.aten.unsqueeze.default(unsqueeze_2, 2);  unsqueeze_2 = None
            transpose: "f32[8, 4, 8]" = torch.ops.aten.transpose.int(reshape_1, 1, 2);  reshape_1 = None
            reshape_default: "f32[2, 4, 8, 4]" = torch.ops.aten.reshape.default(reshape, [-1, 4, 8, 4]);  reshape = None
            reshape_default_1: "f32[2, 4, 4, 8]" = torch.ops.aten.reshape.default(transpose, [-1, 4, 4, 8]);  transpose = None
            permute_default: "f32[2, 4, 8, 4]" = torch.ops.aten.permute.default(reshape_default_1, [0, 1, 3, 2]);  reshape_default_1 = None
            reshape_default_2: "f32[2, 4, 8, 4]" = torch.ops.aten.reshape.default(reshape_2, [-1, 4, 8, 4]);  reshape_2 = None
            squeeze_dims_2: "f32[4]" = torch.ops.aten.squeeze.dims(unsqueeze_3, [1, 2]);  unsqueeze_3 = None
            log_default_1: "f32[4]" = torch.ops.aten.log.default(squeeze_dims_2);  squeeze_dims_2 = None
            expand_default: "f32[4]" = torch.ops.aten.expand.default(log_default_1, [4]);  log_default_1 = None
            decay_attn_default = torch.ops.leet.decay_attn.default(reshape_default, permute_default, reshape_default_2, expand_default, 1.0, None, False, 'auto', 'auto');  reshape_default = permute_default = reshape_default_2 = expand_default = None
            getitem: "f32[2, 4, 8, 4]" = decay_attn_default[0];  decay_attn_default = None
            flatten_using_ints: "f32[8, 8, 4]" = torch.ops.aten.flatten.using_ints(getitem, 0, 1);  getitem = None
            return (flatten_using_ints,)
    class leet_slow_0(torch.nn.Module):
        def forward(self, q_1: "f32[2, 4, 8, 4]", k_1: "f32[2, 4, 8, 4]", v_1: "f32[2, 4, 8, 4]", g_1: "f32[4]"):
            # No stacktrace found for following nodes
            reshape: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(q_1, [8, 8, 4]);  q_1 = None
            reshape_1: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(k_1, [8, 8, 4]);  k_1 = None
            reshape_2: "f32[8, 8, 4]" = torch.ops.aten.reshape.default(v_1, [8, 8, 4]);  v_1 = None
            arange: "i64[8]" = torch.ops.aten.arange.default(8, device = device(type='cpu'), pin_memory = False)
            unsqueeze: "i64[8, 1]" = torch.ops.aten.unsqueeze.default(arange, 1)
            unsqueeze_1: "i64[1, 8]" = torch.ops.aten.unsqueeze.default(arange, 0);  arange = None
            unsqueeze_2: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(g_1, 1);  g_1 = None
            unsqueeze_3: "f32[4, 1, 1]" = torch.ops.aten.unsqueeze.default(unsqueeze_2, 2);  unsqueeze_2 = None
            sub: "i64[8, 8]" = torch.ops.aten.sub.Tensor(unsqueeze, unsqueeze_1)
            clamp: "i64[8, 8]" = torch.ops.aten.clamp.default(sub, 0);  sub = None
            pow_1: "f32[4, 8, 8]" = torch.ops.aten.pow.Tensor_Tensor(unsqueeze_3, clamp);  unsqueeze_3 = clamp = None
            ge: "b8[8, 8]" = torch.ops.aten.ge.Tensor(unsqueeze, unsqueeze_1);  unsqueeze = unsqueeze_1 = None
            mul: "f32[4, 8, 8]" = torch.ops.aten.mul.Tensor(pow_1, ge);  pow_1 = ge = None
            unsqueeze_4: "f32[1, 4, 8, 8]" = torch.ops.aten.unsqueeze.default(mul, 0);  mul = None
            expand: "f32[2, 4, 8, 8]" = torch.ops.aten.expand.default(unsqueeze_4, [2, 4, 8, 8]);  unsqueeze_4 = None
            reshape_3: "f32[8, 8, 8]" = torch.ops.aten.reshape.default(expand, [8, 8, 8]);  expand = None
            transpose: "f32[8, 4, 8]" = torch.ops.aten.transpose.int(reshape_1, 1, 2);  reshape_1 = None
            bmm: "f32[8, 8, 8]" = torch.ops.aten.bmm.default(reshape, transpose);  reshape = transpose = None
            mul_1: "f32[8, 8, 8]" = torch.ops.aten.mul.Tensor(bmm, reshape_3);  bmm = reshape_3 = None
            bmm_1: "f32[8, 8, 4]" = torch.ops.aten.bmm.default(mul_1, reshape_2);  mul_1 = reshape_2 = None
            return (bmm_1,)""")
