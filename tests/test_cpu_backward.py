"""The fused CPU backward (leet::_decay_attn_backward, csrc/cpu/chunked_cpu_backward.cpp)
against float64 autograd of the recurrence, on fresh random inputs: every decay form,
with and without initial state and grad_state, odd T, K != V, strided and half inputs,
resets and extreme decays, NaN causality, empty shapes, gradcheck and opcheck. Every test
runs three times: with the automatic sequence-split rule (these shapes are too short to
split), with the sequence forced into 3 segments (LEET_CPU_SPLIT=3, chunked_cpu_split.cpp),
and on the kernels' baseline build instead of their AVX2 one (LEET_CPU_ISA=baseline,
chunk_common.h; the same as the first where the CPU lacks AVX2).
Kernel outputs are NaN-filled first (LEET_POISON_OUTPUTS), so unwritten elements show."""
import pytest
import torch

from leet_compile import decay_attn
from leet_compile.ops import decay_attn as op_module
from reference import decay_attn_reference_grads as ref_grads, make_inputs, rel_err

BWD = torch.ops.leet._decay_attn_backward.default
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True, params=["auto", "3", "baseline"], ids=["split-auto", "split-3", "isa-baseline"])
def split(request, monkeypatch):
    monkeypatch.setenv("LEET_CPU_SPLIT", "auto" if request.param == "baseline" else request.param)
    monkeypatch.setenv("LEET_CPU_ISA", "baseline" if request.param == "baseline" else "auto")


def fused_grads(q, k, v, a, s0, go, gs, scale):
    return BWD(go, gs, q, k, v, a, scale, s0)


def check(ours, ref, tol, names="q k v log_decay initial_state".split()):
    for name, g, r in zip(names, ours, ref):
        if r is None:
            assert g.numel() == 0, name
            continue
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        # relative, with a floor: some gradients are exactly 0 in exact arithmetic (the
        # log decay's at T = 1 without state: q.dq - k.dk cancels) but not after rounding
        err = (g.double() - r).norm().item() / max(r.norm().item(), 1.0)
        assert err < tol, (name, err)


@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("grad_state", [False, True])
@pytest.mark.parametrize("T", [1, 31, 32, 33, 97])
def test_matches_float64_autograd(decay, state, grad_state, T):
    q, k, v, a, s0 = make_inputs(B=2, H=3, T=T, K=8, V=12, decay=decay, state=state)
    go = torch.randn(2, 3, T, 12)
    gs = torch.randn(2, 3, 8, 12) if grad_state else None
    ours = fused_grads(q, k, v, a, s0, go, gs, 0.6)
    check(ours, ref_grads(q, k, v, a, s0, go, gs, 0.6), 2e-5)


@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_float64_inputs_compute_in_float64(decay):
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=70, K=5, V=7, decay=decay, state=True, dtype=torch.float64)
    a = None if a is None else a.double()
    s0 = s0.double()
    go, gs = torch.randn(1, 2, 70, 7, dtype=torch.float64), torch.randn(1, 2, 5, 7, dtype=torch.float64)
    ours = fused_grads(q, k, v, a, s0, go, gs, 0.8)
    assert all(g.dtype == torch.float64 for g in ours)
    check(ours, ref_grads(q, k, v, a, s0, go, gs, 0.8), 1e-12)


def test_matches_the_decay_attn_backward():
    """Against the previous backward (three decay_attn calls), taken by create_graph=True."""
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=75, K=16, V=8, decay="position", state=True, requires_grad=True)
    o, sf = decay_attn(q, k, v, a, scale=0.3, initial_state=s0, output_final_state=True)
    go, gs = torch.randn_like(o), torch.randn_like(sf)
    loss = (o * go).sum() + (sf * gs).sum()
    fused = torch.autograd.grad(loss, [q, k, v, a, s0], retain_graph=True)
    composed = torch.autograd.grad(loss, [q, k, v, a, s0], create_graph=True)  # the decay_attn formulas
    for g, r in zip(fused, composed):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_autograd_uses_the_fused_kernel(decay, monkeypatch):
    calls = []
    real = op_module._fused_cpu_backward
    monkeypatch.setattr(op_module, "_fused_cpu_backward", lambda *a: calls.append(real(*a)) or calls[-1])
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=40, K=4, V=6, decay=decay, state=True, requires_grad=True)
    o, sf = decay_attn(q, k, v, a, initial_state=s0, output_final_state=True)
    go, gs = torch.randn_like(o), torch.randn_like(sf)
    inputs = [t for t in (q, k, v, a, s0) if t is not None]
    grads = torch.autograd.grad((o * go).sum() + (sf * gs).sum(), inputs)
    assert calls == [True]
    ref = [r for r in ref_grads(q, k, v, a, s0, go, gs, 4 ** -0.5) if r is not None]
    for g, r in zip(grads, ref):
        assert rel_err(g, r) < 2e-5
    # other methods and backends keep the decay_attn formulas
    calls.clear()
    o = decay_attn(q, k, v, a, method="recurrent", backend="aten")
    torch.autograd.grad(o.sum(), [q])
    assert calls == [False]


@pytest.mark.parametrize("decay", ["head", "position"])
def test_strided_inputs_and_expanded_grad(decay):
    """q, k, v as permuted views of one fused qkv tensor; grad_o a broadcast (stride 0)."""
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=81, K=6, V=10, decay=decay, state=True, strided=True)
    assert not q.is_contiguous()
    go = torch.randn(1, 1, 1, 10).expand(2, 2, 81, 10)
    ours = fused_grads(q, k, v, a, s0, go, None, 1.0)
    check(ours, ref_grads(q, k, v, a, s0, go, None, 1.0), 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", ["head", "position"])
def test_half_inputs(dtype, decay):
    """Half inputs: gradients in the input dtype, computed in float32 from the rounded
    inputs; the error is the final rounding's (about 2^-8 for bf16)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=100, K=16, V=16, decay=decay, state=True, dtype=dtype)
    go, gs = torch.randn(1, 2, 100, 16).to(dtype), torch.randn(1, 2, 16, 16)
    ours = fused_grads(q, k, v, a, s0, go, gs, 0.25)
    assert [g.dtype for g in ours[:3]] == [dtype] * 3 and ours[3].dtype == a.dtype
    ref = ref_grads(q, k, v, a, s0, go, gs, 0.25)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for name, g, r in zip("q k v".split(), ours[:3], ref[:3]):
        assert rel_err(g, r) < tol, name
    for name, g, r in zip(["log_decay", "initial_state"], ours[3:], ref[3:]):  # float32 outputs
        assert rel_err(g, r) < 1e-4, name


def test_mixed_dtypes():
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=40, K=4, V=6, decay="position", state=True)
    go = torch.randn(1, 2, 40, 6)
    ours = fused_grads(q, k.double(), v.bfloat16(), a, s0, go, None, 1.0)
    assert [g.dtype for g in ours[:3]] == [torch.float32, torch.float64, torch.bfloat16]
    check(ours[:2] + ours[3:], [r for i, r in enumerate(ref_grads(q, k, v.bfloat16(), a, s0, go, None, 1.0))
                                if i != 2], 2e-5, names=["q", "k", "log_decay", "initial_state"])


def test_resets_and_huge_decays():
    """log_decay = -inf (a reset, one at t = 0 dropping the initial state), -1e20, and -30
    per step (every weight across a chunk underflows)."""
    q, k, v, a, s0 = make_inputs(B=1, H=4, T=100, K=8, V=6, decay="position", state=True, seed=3)
    a[:, 0, [0, 37, 38, 64]] = -INF
    a[:, 1, 70] = -INF
    a[:, 2, [31, 90]] = -1e20
    a[:, 3] = -30.0
    go, gs = torch.randn(1, 4, 100, 6), torch.randn(1, 4, 8, 6)
    ours = list(fused_grads(q, k, v, a, s0, go, gs, 0.5))
    ref = ref_grads(q, k, v, a, s0, go, gs, 0.5)
    finite = torch.isfinite(a)  # the derivative at -inf is 0 * (...): compare elsewhere
    ours[3], ref[3] = ours[3][finite], ref[3][finite]
    check(ours, ref, 1e-4)


@pytest.mark.parametrize("state", [False, True])
def test_growing_decay(state):
    """Positive log decays (weights up to e^12 across the sequence)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=130, K=8, V=8, decay="position", decay_range=(0.0, 0.09),
                                 state=state)
    go, gs = torch.randn(1, 2, 130, 8), torch.randn(1, 2, 8, 8)
    check(fused_grads(q, k, v, a, s0, go, gs, 1.0), ref_grads(q, k, v, a, s0, go, gs, 1.0), 1e-4)


# where the bad value goes: (tensor, position), inside and across chunks of 32
POISON = [("k", 39), ("v", 35), ("q", 50), ("k", 64), ("q", 63), ("grad_o", 70)]


@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_input_stays_where_it_belongs(decay, bad):
    """A non-finite value at position p reaches only the gradients that depend on it:
    dq_t needs positions <= t; dk_t, dv_t need q, dO, log_decay at positions >= t but no
    other k or v; d initial_state needs no k or v. (d log_decay = a sum over positions
    >= t of terms that include S_t: poisoned at t <= p, as by the previous backward.)"""
    H, T = len(POISON), 100
    q, k, v, a, s0 = make_inputs(B=1, H=H, T=T, K=8, V=8, decay=decay, state=True, seed=2)
    go, gs = torch.randn(1, H, T, 8), torch.randn(1, H, 8, 8)
    clean = ref_grads(q, k, v, a, s0, go, gs, 1.0)
    inputs = dict(q=q, k=k, v=v, grad_o=go)
    for h, (name, t) in enumerate(POISON):
        inputs[name][0, h, t, 3] = bad
    dq, dk, dv, _, ds0 = fused_grads(q, k, v, a, s0, go, gs, 1.0)
    for h, (name, p) in enumerate(POISON):
        assert rel_err(dq[0, h, :p], clean[0][0, h, :p]) < 1e-5, (name, p)
        if name in ("k", "v"):  # the backward-in-time gradients never see k, v of other positions
            for g, r in ((dk, clean[1]), (dv, clean[2])):
                rows = torch.arange(T) != p
                assert rel_err(g[0, h, rows], r[0, h, rows]) < 1e-5, (name, p)
            assert rel_err(ds0[0, h], clean[4][0, h]) < 1e-5, (name, p)
        else:  # q, dO at p reach dk, dv at t <= p only
            assert rel_err(dk[0, h, p + 1:], clean[1][0, h, p + 1:]) < 1e-5, (name, p)
            assert rel_err(dv[0, h, p + 1:], clean[2][0, h, p + 1:]) < 1e-5, (name, p)


def test_nan_log_decay_does_not_reach_earlier_dq():
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=100, K=8, V=8, decay="position", state=True, seed=4)
    go = torch.randn(1, 1, 100, 8)
    clean = ref_grads(q, k, v, a, s0, go, None, 1.0)
    a[0, 0, 70] = NAN
    dq = fused_grads(q, k, v, a, s0, go, None, 1.0)[0]
    assert rel_err(dq[0, 0, :70], clean[0][0, 0, :70]) < 1e-5


@pytest.mark.parametrize("shape", [(2, 3, 0, 4, 5), (0, 3, 9, 4, 5), (2, 0, 9, 4, 5), (2, 3, 9, 0, 5),
                                   (2, 3, 9, 4, 0)], ids=["T0", "B0", "H0", "K0", "V0"])
@pytest.mark.parametrize("decay", ["head", "position"])
def test_empty_shapes(shape, decay):
    B, H, T, K, V = shape
    q, k, v, a, s0 = make_inputs(B=B, H=H, T=T, K=K, V=V, decay=decay, state=True)
    go, gs = torch.randn(B, H, T, V), torch.randn(B, H, K, V)
    dq, dk, dv, da, ds0 = fused_grads(q, k, v, a, s0, go, gs, 1.0)
    assert [g.shape for g in (dq, dk, dv, da, ds0)] == [t.shape for t in (q, k, v, a, s0)]
    assert not dq.any() and not dk.any() and not dv.any() and not da.any()
    if T == 0:  # the initial state passes straight through
        torch.testing.assert_close(ds0, gs)
        assert ds0.data_ptr() != gs.data_ptr()
    else:
        assert not ds0.any()


def test_gradcheck_through_autograd():
    """gradcheck of decay_attn in float64 (first derivatives through the fused kernel)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=37, K=3, V=4, decay="position", state=True,
                                 dtype=torch.float64, requires_grad=True)
    a, s0 = (t.detach().double().requires_grad_(True) for t in (a, s0))

    def f(q, k, v, a, s0):
        return torch.ops.leet.decay_attn(q, k, v, a, 0.9, s0, True, "chunked", "cpu")

    assert torch.autograd.gradcheck(f, (q, k, v, a, s0))
    ah = -torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, a: decay_attn(q, k.detach(), v.detach(), a), (q, ah))


def test_backward_memory_is_linear_in_time():
    q, k, v, a, _ = make_inputs(B=1, H=1, T=4096, K=8, V=8, decay="position", requires_grad=True)
    o = decay_attn(q, k, v, a)
    with torch.profiler.profile(profile_memory=True) as prof:
        o.sum().backward()
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest < 4096 * 4096 * 4 / 64, biggest


OPCHECK = [(None, False, False), ("head", True, True), ("position", True, False), ("position", False, True)]


@pytest.mark.parametrize("decay,state,grad_state", OPCHECK)
def test_opcheck(decay, state, grad_state):
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=45, K=4, V=5, decay=decay, state=state)
    go = torch.randn(2, 2, 45, 5)
    gs = torch.randn(2, 2, 4, 5) if grad_state else None
    torch.library.opcheck(BWD, (go, gs, q, k, v, a, 0.5, s0))


def test_bad_arguments():
    q, k, v, _, _ = make_inputs(B=1, H=2, T=8, K=4, V=5, decay=None)
    with pytest.raises(ValueError, match=r"grad_o must have the output's shape"):
        BWD(torch.randn(1, 2, 8, 4), None, q, k, v, None, 1.0, None)
    with pytest.raises(ValueError, match=r"grad_state must have the state's shape"):
        BWD(torch.randn(1, 2, 8, 5), torch.randn(1, 2, 5, 4), q, k, v, None, 1.0, None)
    with pytest.raises(ValueError, match=r"log_decay must have shape"):
        BWD(torch.randn(1, 2, 8, 5), None, q, k, v, torch.zeros(3), 1.0, None)


def test_compiled_training_step(monkeypatch):
    """torch.compile traces the fused backward (its fake kernel) into the backward graph."""
    calls = []
    real = op_module._fused_cpu_backward
    monkeypatch.setattr(op_module, "_fused_cpu_backward", lambda *a: calls.append(real(*a)) or calls[-1])
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=40, K=4, V=6, decay="position", state=True, requires_grad=True)

    def f(q, k, v, a, s0):
        o, sf = decay_attn(q, k, v, a, initial_state=s0, output_final_state=True)
        return o.square().sum() + sf.sum()

    torch.compiler.reset()  # trace afresh: the other split parametrization compiled f's code too
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v, a, s0), [q, k, v, a, s0])
    assert calls and all(calls)
    ref = torch.autograd.grad(f(q, k, v, a, s0), [q, k, v, a, s0])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
