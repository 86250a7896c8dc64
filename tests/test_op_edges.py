"""decay_attn at the edges (issue 11): causality under NaN/inf, hard resets, extreme
decays, empty shapes, aliasing, the argument contract (eager == fake == compiled),
scale=None, the [B, T, H, D] layout, and the check ops every path shares.

Every numerical check is against the float64 recurrence of tests/reference.py.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import leet_compile
from leet_compile import decay_attn
from leet_compile.ops import decay_attn as op_module
from reference import decay_attn_reference, make_inputs, rel_err

NAN, INF = float("nan"), float("inf")
# every (method, backend) pair that runs on CPU
KERNELS = [(m, "aten") for m in ("naive", "recurrent", "chunked", "fleet", "recursive")] + [
    ("chunked", "cpu"), ("auto", "auto")]
OP = torch.ops.leet.decay_attn.default


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


def run(q, k, v, a, s0, method, backend, scale=1.0):
    return decay_attn(q, k, v, a, scale=scale, initial_state=s0, output_final_state=True,
                      method=method, backend=backend)


# ---------------------------------------------------------------- 1. causality


def test_reference_is_causal_under_nan():
    """The reference itself: a NaN at j reaches outputs i >= j only."""
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=12, decay="position", state=True, seed=1)
    k[0, 0, 7, 0] = NAN
    o, _ = decay_attn_reference(q, k, v, a, 1.0, s0)
    assert torch.isfinite(o[0, 0, :7]).all() and not torch.isfinite(o[0, 0, 7:]).any()


# where the bad value goes: (tensor, position); T = 100 spans chunks of 16, 32 and 64
POISON = [("k", 39), ("v", 35), ("q", 50), ("v", 64), ("k", 99), ("log_decay", 70)]


@pytest.mark.parametrize("method,backend", KERNELS)
@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_later_nonfinite_never_reaches_earlier_outputs(method, backend, decay, bad):
    q, k, v, a, s0 = make_inputs(B=1, H=len(POISON), T=100, K=8, V=8, decay=decay, state=True, seed=2)
    if decay == "head":  # a per-head decay cannot be poisoned at one position: per position then
        a = a.view(1, -1, 1).expand(1, len(POISON), 100).clone()
    clean, _ = decay_attn_reference(q, k, v, a, 1.0, s0)
    inputs = dict(q=q, k=k, v=v, log_decay=a)
    for h, (name, t) in enumerate(POISON):
        if inputs[name] is None:
            continue
        if name == "log_decay":
            inputs[name][0, h, t] = bad if bad != INF else NAN  # log_decay lives in [-inf, inf)
        else:
            inputs[name][0, h, t, 3] = bad
    o, _ = run(q, k, v, a, s0, method, backend)
    for h, (name, t) in enumerate(POISON):
        if inputs[name] is None:
            continue
        assert torch.isfinite(o[0, h, :t]).all(), (name, t)
        assert rel_err(o[0, h, :t], clean[0, h, :t]) < 1e-5, (name, t)


@pytest.mark.parametrize("method,backend", KERNELS)
def test_right_padded_batch_with_garbage(method, backend):
    """The everyday case: padding holds NaN; the valid prefix is exact."""
    q, k, v, a, _ = make_inputs(B=2, H=2, T=70, K=8, V=8, decay="position", seed=3)
    lengths = [45, 70]
    clean, _ = decay_attn_reference(q, k, v, a)
    for b, n in enumerate(lengths):
        for t in (q, k, v):
            t[b, :, n:] = NAN
        a[b, :, n:] = NAN
    o, _ = run(q, k, v, a, None, method, backend)
    for b, n in enumerate(lengths):
        assert rel_err(o[b, :, :n], clean[b, :, :n]) < 1e-5


# ---------------------------------------------------------------- 2, 3, 4. extreme decays


def _reset_inputs(seed=4):
    q, k, v, a, s0 = make_inputs(B=1, H=3, T=100, K=8, V=6, decay="position", state=True, seed=seed)
    a[:, 0, [0, 37, 38, 64]] = -INF  # resets, one at t = 0 (drops the initial state), two in a row
    a[:, 1, 70] = -INF
    a[:, 2, 31] = -1e20  # very strong, finite: the small decays after it must survive
    a[:, 2, 90] = -1e20
    return q, k, v, a, s0


@pytest.mark.parametrize("method,backend", KERNELS)
def test_hard_reset_and_huge_decay_forward(method, backend):
    q, k, v, a, s0 = _reset_inputs()
    o, sf = run(q, k, v, a, s0, method, backend, scale=0.5)
    ro, rs = decay_attn_reference(q, k, v, a, 0.5, s0)
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert rel_err(o, ro) < 1e-5 and rel_err(sf, rs) < 1e-5
    # a reset forgets everything before it: the outputs after it do not depend on it
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 0, :37] = torch.randn_like(t[:, 0, :37])
    o2, _ = run(q2, k2, v2, a, s0, method, backend, scale=0.5)
    torch.testing.assert_close(o2[:, 0, 37:], o[:, 0, 37:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decay", ["head", "position"])
def test_hard_reset_per_head(decay):
    """log_decay = -inf for a whole head: every output is q_t k_t^T v_t alone."""
    q, k, v, _, s0 = make_inputs(B=1, H=2, T=40, K=4, V=4, decay=None, state=True, seed=5)
    a = torch.tensor([-INF, -0.1])
    if decay == "position":
        a = a.view(1, 2, 1).expand(1, 2, 40).contiguous()
    ro, rs = decay_attn_reference(q, k, v, a, 1.0, s0)
    for method, backend in KERNELS:
        o, sf = run(q, k, v, a, s0, method, backend)
        assert rel_err(o, ro) < 1e-5 and rel_err(sf, rs) < 1e-5, (method, backend)


def _autograd_reference(q, k, v, a, s0, scale):
    B, H, T, K = q.shape
    S, outs = s0, []
    for t in range(T):
        S = S * a[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2) * scale, S


@pytest.mark.parametrize("method,backend", KERNELS)
def test_hard_reset_and_huge_decay_backward(method, backend):
    q, k, v, a, s0 = _reset_inputs(seed=6)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, a, s0)]
    o, sf = run(*leaves, method, backend, scale=0.5)
    go, gs = torch.randn_like(o), torch.randn_like(sf)
    grads = torch.autograd.grad((o * go).sum() + (sf * gs).sum(), leaves)
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v, a, s0)]
    ro, rs = _autograd_reference(*ref, 0.5)
    ref_grads = torch.autograd.grad((ro * go.double()).sum() + (rs * gs.double()).sum(), ref)
    finite_a = torch.isfinite(a)
    for name, g, r in zip(["q", "k", "v", "log_decay", "initial_state"], grads, ref_grads):
        if name == "log_decay":  # the derivative at -inf is 0 * (...) there: compare elsewhere
            g, r = g[finite_a], r[finite_a]
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 1e-4, name


@pytest.mark.parametrize("method,backend", KERNELS)
@pytest.mark.parametrize("state", [False, True])
def test_growing_decay_does_not_overflow_early(method, backend, state):
    """+50 per step, T = 2: weights e^50 (the answer is ~1e21), finite in float32 (with
    a state, +30: the state's weight e^60 still fits)."""
    q, k, v, _, s0 = make_inputs(B=1, H=2, T=2, K=4, V=4, decay=None, state=state, seed=7)
    a = torch.full((2,), 30.0 if state else 50.0)
    o, sf = run(q, k, v, a, s0, method, backend)
    ro, rs = decay_attn_reference(q, k, v, a, 1.0, s0)
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert rel_err(o, ro) < 1e-5 and rel_err(sf, rs) < 1e-5


# ---------------------------------------------------------------- 5, 7, 8. empty shapes, aliasing


@pytest.mark.parametrize("method,backend", KERNELS)
def test_empty_sequence_does_not_alias(method, backend):
    q, k, v, a, s0 = make_inputs(B=2, H=3, T=0, K=4, V=5, decay="position", state=True)
    o, sf = run(q, k, v, a, s0, method, backend)
    assert o.shape == (2, 3, 0, 5)
    torch.testing.assert_close(sf, s0)
    assert sf.data_ptr() != s0.data_ptr() and not sf._is_view()


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_opcheck_at_t0(state, decay):
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=0, K=4, V=5, decay=decay, state=state, requires_grad=True)
    for final in (False, True):
        torch.library.opcheck(OP, (q, k, v, a, 0.5, s0, final, "auto", "auto"))


@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_backward_at_t0(decay):
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=0, K=4, V=5, decay=decay, state=True, requires_grad=True)
    o, sf = decay_attn(q, k, v, a, initial_state=s0, output_final_state=True)
    gs = torch.randn_like(sf)
    inputs = [t for t in (q, k, v, a, s0) if t is not None]
    grads = torch.autograd.grad(o.sum() + (sf * gs).sum(), inputs)
    torch.testing.assert_close(grads[-1], gs)  # the state passes straight through
    for g, t in zip(grads[:-1], inputs[:-1]):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("shape", [(0, 2), (2, 0), (0, 0)], ids=["B0", "H0", "B0H0"])
@pytest.mark.parametrize("method,backend", KERNELS)
def test_zero_batch_or_heads(shape, method, backend):
    B, H = shape
    q, k, v, a, s0 = make_inputs(B=B, H=H, T=9, K=4, V=5, decay="position", state=True, requires_grad=True)
    o, sf = run(q, k, v, a, s0, method, backend)
    assert o.shape == (B, H, 9, 5) and sf.shape == (B, H, 4, 5)
    grads = torch.autograd.grad(o.sum() + sf.sum(), [q, k, v, a, s0])
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v, a, s0)]


def test_zero_batch_vmap_and_zero_head_dims():
    q, k, v, _, _ = make_inputs(B=0, H=2, T=9, K=4, V=5, decay=None)
    out = torch.vmap(lambda q: decay_attn(q, k, v))(q.unsqueeze(0).expand(3, *q.shape))
    assert out.shape == (3, 0, 2, 9, 5)
    q, k, v, _, _ = make_inputs(B=1, H=2, T=9, K=0, V=5, decay="head")
    assert not decay_attn(q, k, v).any()  # an empty sum


# ---------------------------------------------------------------- 6, 9. the decoding steps


def _step_args(B=2, H=3, K=4, V=6):
    return torch.randn(B, H, K), torch.randn(B, H, K), torch.randn(B, H, V), -torch.rand(H), torch.zeros(B, H, K, V)


def _eager_and_fake(op, args, exc, match):
    with pytest.raises(exc, match=match):
        op(*args)
    with FakeTensorMode() as mode, pytest.raises(exc, match=match):
        op(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args])


def test_inplace_step_rejects_state_sharing_memory_with_inputs():
    q, k, v, a, _ = _step_args()
    buf = torch.zeros(2 * 3 * 4 * 6)
    for name, pos in (("q", 0), ("k", 1), ("v", 2)):
        args = [q, k, v, a, buf.view(2, 3, 4, 6)]
        args[pos] = buf[: args[pos].numel()].view(args[pos].shape)
        _eager_and_fake(torch.ops.leet.decay_attn_step_, args, ValueError, f"state shares memory with {name}")
    # one buffer, disjoint slices: fine
    big = torch.zeros(200)
    q2 = big[:24].view(2, 3, 4)
    o = torch.ops.leet.decay_attn_step_(q2, k, v, a, big[50:194].view(2, 3, 4, 6))
    assert o.shape == (2, 3, 6)


def test_step_with_none_state():
    q, k, v, a, _ = _step_args()
    for op in (torch.ops.leet.decay_attn_step, torch.ops.leet.decay_attn_step_):
        _eager_and_fake(op, [q, k, v, a, None], ValueError, r"state must be a \[B, H, K, V\] = \[2, 3, 4, 6\]")
    o, s = leet_compile.decay_attn_step(q, k, v, a, None)  # the wrapper's None means zeros
    assert not s.isnan().any() and o.shape == (2, 3, 6)


def test_inplace_step_names_state_for_expanded_and_inference_tensors():
    q, k, v, a, _ = _step_args()
    expanded = torch.zeros(1, 3, 4, 6).expand(2, 3, 4, 6)
    _eager_and_fake(torch.ops.leet.decay_attn_step_, [q, k, v, a, expanded], ValueError,
                    "state has overlapping elements")
    with torch.inference_mode():
        frozen = torch.zeros(2, 3, 4, 6)
    with pytest.raises(ValueError, match="state is an inference tensor"):
        torch.ops.leet.decay_attn_step_(q, k, v, a, frozen)
    with torch.inference_mode():  # inside inference mode it is the right tool
        torch.ops.leet.decay_attn_step_(q, k, v, a, frozen)
    assert frozen.any()


def test_step_scale_default_is_inverse_sqrt_k():
    q, k, v, a, s = _step_args(K=16)
    o_default, _ = torch.ops.leet.decay_attn_step(q, k, v, a, s)
    o_explicit, _ = torch.ops.leet.decay_attn_step(q, k, v, a, s, 0.25)
    torch.testing.assert_close(o_default, o_explicit)


# ---------------------------------------------------------------- 10, 11. errors that name things


def test_causal_linear_decoder_gamma_errors_name_gamma():
    q, k, v, _, _ = make_inputs(B=1, H=2, T=4)
    with pytest.raises(ValueError, match=r"gamma must have shape \[heads\] = \[2\], got \[3\]"):
        leet_compile.causal_linear_decoder(q, k, v, True, torch.ones(3))
    with pytest.raises(ValueError, match=r"gamma must have shape \[heads\]"):
        leet_compile.causal_linear_decoder(q, k, v, True, torch.ones(2, 1), False)


@pytest.mark.parametrize("decay", ["head", "position"])
@pytest.mark.parametrize("method,backend", [("auto", "auto"), ("recurrent", "aten")])
def test_forward_mode_ad(decay, method, backend):
    """torch.func.jvp: every tangent is itself a decay_attn (in float64, against the
    recurrence's own forward-mode derivative)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=23, K=4, V=3, decay=decay, state=True, dtype=torch.float64, seed=9)
    a, s0 = a.double(), s0.double()
    if decay == "position":
        a[..., 5] = -INF  # a reset on the way
    primals = (q, k, v, a, s0)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def ours(q, k, v, a, s0):
        return decay_attn(q, k, v, a, scale=0.5, initial_state=s0, output_final_state=True,
                          method=method, backend=backend)

    def ref(q, k, v, a, s0):
        aa = a.view(1, -1, 1).expand(1, 2, 23) if a.dim() == 1 else a
        return _autograd_reference(q, k, v, aa, s0, 0.5)

    (o, sf), (do, dsf) = torch.func.jvp(ours, primals, tangents)
    (ro, rsf), (rdo, rdsf) = torch.func.jvp(ref, primals, tangents)
    assert rel_err(o, ro) < 1e-12 and rel_err(do, rdo) < 1e-10 and rel_err(dsf, rdsf) < 1e-10


# ---------------------------------------------------------------- 12. one contract: eager == fake == compiled


def _two_bad():
    q, k, v = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 5)
    # (args, kwargs, the first bad argument's message)
    yield (q, k.long(), v[:, :, :7]), {}, "k must be a floating-point tensor"
    yield (q, k, v, torch.zeros(2)), dict(initial_state=torch.zeros(1), method="fast"), "log_decay must have shape"
    yield (q, k, v), dict(method="fast", backend="gpu"), "unknown method 'fast'"
    yield (q, k, v), dict(backend="triton"), "backend 'triton' needs CUDA tensors; q is on cpu"
    yield (q, k, v), dict(backend="cuda"), "backend 'cuda' needs CUDA tensors"
    yield (q, k, v), dict(method="fleet", backend="cpu"), "backend 'cpu' implements methods auto, chunked; got 'fleet'"
    yield (q.double(), k, v), dict(method="naive", backend="cpu"), "backend 'cpu' implements methods"


CASES = list(_two_bad())


@pytest.mark.parametrize("args,kwargs,match", CASES, ids=[c[2][:30] for c in CASES])
def test_eager_fake_and_compiled_fail_alike(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match) as eager:
        decay_attn(*args, **kwargs)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        fake_kw = {n: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
        with pytest.raises(eager.type) as faked:
            decay_attn(*fake, **fake_kw)
    assert str(faked.value) == str(eager.value)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: decay_attn(*a, **kwargs), backend="eager", fullgraph=True)
    with pytest.raises(Exception) as traced:
        compiled(*args)
    # dynamo reports what the fake kernel raised: eager's error, word for word
    assert repr(eager.value) in str(traced.value)


def test_gpu_policy_is_the_cpp_one():
    """ops/gpu.py's select() is a binding of plan_call (csrc/backends.cpp), and the method
    names it returns are the contract's."""
    from leet_compile.ops import gpu

    with pytest.raises(ValueError) as err:
        op_module.check_inputs(*[torch.empty(1, 1, 1, 1)] * 3, None, None, "?", "auto")
    assert str(err.value).endswith("expected one of " + ", ".join(leet_compile.METHODS))
    q = torch.empty(1, 2, 40, 8)
    assert gpu.select(q, q, q, "auto", "aten") == ("aten", "auto")
    assert gpu.select(q[:, :, :16], q[:, :, :16], q[:, :, :16], "auto", "cuda") == ("cuda", "recurrent")
    assert gpu.select(q, q, q, "auto", "cuda") == ("cuda", "chunked")
    assert gpu.select(q, q, q, "fleet", "auto") == ("aten", "fleet")
    # meta tensors: the rules without the device ones; the table's GPU rows
    x = torch.empty(1, 2, 5, 4, device="meta")
    for backend in ("triton", "cuda"):
        for method in leet_compile.METHODS:
            ok = True
            try:
                op_module.check_inputs(x, x, x, None, None, method, backend)
            except ValueError:
                ok = False
            assert ok == (method in ("auto", "chunked", "recurrent")), (backend, method)


# ---------------------------------------------------------------- 13. scale=None and the fla layout


def test_scale_none_is_inverse_sqrt_k():
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=19, K=9, V=5, decay="head", state=True)
    schema_default = [x for x in OP._schema.arguments if x.name == "scale"][0]
    assert str(schema_default.type) == "Optional[float]" and schema_default.default_value is None
    ref, _ = decay_attn_reference(q, k, v, a, 9 ** -0.5, s0)
    for method, backend in KERNELS:
        o, _ = OP(q, k, v, a, None, s0, False, method, backend)
        assert rel_err(o, ref) < 1e-5
        assert rel_err(decay_attn(q, k, v, a, initial_state=s0, method=method, backend=backend), ref) < 1e-5
    assert op_module.resolve_scale(None, 9) == 9 ** -0.5 and op_module.resolve_scale(0.3, 9) == 0.3


def test_scale_none_gradients():
    q, k, v, a, _ = make_inputs(B=1, H=2, T=7, K=4, V=3, decay="head", requires_grad=True, dtype=torch.float64)
    a = a.double().detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k, v, a: OP(q, k, v, a)[0], (q, k, v, a))


@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_bthd_layout(decay):
    """fla's [B, T, H, D] tensors, read in place: same numbers as the permuted call."""
    B, T, H, K, V = 2, 37, 3, 8, 6
    qkv = torch.randn(B, T, H, 2 * K + V)
    q, k, v = qkv.split([K, K, V], dim=-1)  # views of a fused projection, [B, T, H, D]
    g = None if decay is None else (-torch.rand(H) if decay == "head" else -torch.rand(B, T, H))
    s0 = torch.randn(B, H, K, V)
    o, sf = decay_attn(q, k, v, g, initial_state=s0, output_final_state=True, layout="bthd")
    g_bh = g if g is None or g.dim() == 1 else g.transpose(1, 2)
    ro, rs = decay_attn_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g_bh, K ** -0.5, s0)
    assert o.shape == (B, T, H, V)
    assert rel_err(o.transpose(1, 2), ro) < 1e-5 and rel_err(sf, rs) < 1e-5
    with pytest.raises(ValueError, match="layout must be 'bhtd'"):
        decay_attn(q, k, v, layout="bhdt")


# ---------------------------------------------------------------- the contract's seams


def test_fake_kernel_runs_the_cpp_checks():
    """The fake kernel's rules are the C++ ones: the check op raises what eager raises."""
    q, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5)
    with pytest.raises(ValueError, match="unknown method 'x'"):
        torch.ops.leet._check_decay_attn(q, q, v, None, None, "x", "auto")
    assert torch.ops.leet._check_decay_attn(q, q, v, None, None, "auto", "auto") is None
    assert torch.ops.leet._check_decay_attn_step(
        "decay_attn_step", q[:, :, 0], q[:, :, 0], v[:, :, 0], None, torch.zeros(1, 2, 4, 5)) is None


def test_dynamic_shapes_compile():
    """The checks read symbolic sizes: a dynamic-shape compile traces once for two lengths."""
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, a: decay_attn(q, k, v, a), backend="eager", dynamic=True, fullgraph=True)
    for T in (11, 23):
        q, k, v, a, _ = make_inputs(B=1, H=2, T=T, K=4, V=4, decay="position")
        assert rel_err(f(q, k, v, a), decay_attn_reference(q, k, v, a, 0.5)[0]) < 1e-5


# ---------------------------------------------------------------- torch-private APIs, one test each


def test_private_below_autograd():
    from leet_compile.ops import _torch_private as private

    x = torch.ones(2, requires_grad=True)
    with private.below_autograd():
        y = x * 2
    assert not y.requires_grad


def test_private_functorch_transforms_active():
    from leet_compile.ops import _torch_private as private

    assert not private.functorch_transforms_active()
    seen = []
    torch.func.grad(lambda x: (seen.append(private.functorch_transforms_active()), x.sum())[1])(torch.ones(2))
    assert seen == [True]


def test_private_forward_ad_active():
    import torch.autograd.forward_ad as fwAD
    from leet_compile.ops import _torch_private as private

    assert not private.forward_ad_active()
    with fwAD.dual_level():
        assert private.forward_ad_active()


def test_dual_tensors_keep_their_tangents():
    import torch.autograd.forward_ad as fwAD

    q, k, v, a, _ = make_inputs(B=1, H=2, T=9, K=4, V=3, decay="head", dtype=torch.float64)
    t = torch.randn_like(q)
    with fwAD.dual_level():
        o = decay_attn(fwAD.make_dual(q, t), k, v, a.double())
        tangent = fwAD.unpack_dual(o).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, decay_attn(t, k, v, a.double()))  # linear in q


def test_private_has_kernel():
    from leet_compile.ops import _torch_private as private

    assert private.has_kernel("leet::decay_attn", "CPU")
    assert private.has_kernel("leet::decay_attn", "CUDA")  # C++ (csrc/backends.cpp), any build
    assert not private.has_kernel("leet::decay_attn_step", "CUDA")  # composite, no CUDA-specific kernel


def test_private_has_fake_impl():
    from leet_compile.ops import _torch_private as private

    assert private.has_fake_impl("leet::decay_attn") and private.has_fake_impl("leet::_decay_attn_cuda")
    assert not private.has_fake_impl("leet::no_such_op")


def test_private_functional_tensor_mode_and_types():
    from leet_compile.ops import _torch_private as private

    mode = private.functional_tensor_mode()
    assert isinstance(mode, type) and mode.__name__ == "FunctionalTensorMode"
    types = private.plain_tensor_types()
    assert types[0] is torch.Tensor and issubclass(types[1], torch.Tensor) and issubclass(types[2], torch.Tensor)


def test_private_triton_decomposition_disabled():
    from leet_compile.ops import _torch_private as private

    assert private.triton_decomposition_disabled() is False


def test_private_list_triton_kernels():
    from leet_compile.ops import _torch_private as private
    import torch._library.triton as triton_library

    private.list_triton_kernels("leet::_test_only", ["k1"])
    try:
        assert triton_library.get_triton_kernels_for_op("leet::_test_only") == ["k1"]
    finally:
        triton_library.triton_ops_to_kernels.pop("leet::_test_only", None)


def test_no_other_private_torch_use_in_ops():
    """ops/ touches torch-private names only through ops/_torch_private.py."""
    import pathlib
    import re

    root = pathlib.Path(op_module.__file__).parent
    pattern = re.compile(r"torch\._(?!check)|from torch\._")
    offenders = [f"{p.name}:{i + 1}" for p in root.glob("*.py") if p.name != "_torch_private.py"
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not offenders, offenders


def test_step_errors_alike_under_compile():
    q, k, v, a, _ = _step_args()
    expanded = torch.zeros(1, 3, 4, 6).expand(2, 3, 4, 6)
    with pytest.raises(ValueError) as eager:
        torch.ops.leet.decay_attn_step_(q, k, v, a, expanded)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, a, s: torch.ops.leet.decay_attn_step_(q, k, v, a, s), backend="eager",
                      fullgraph=True)
    with pytest.raises(Exception) as traced:
        f(q, k, v, a, expanded)
    assert repr(eager.value) in str(traced.value)
