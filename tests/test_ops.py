"""decay_attn against the float64 reference: every method and backend, every decay
form, odd sizes, K != V, strided inputs, states, dtypes, gradients, opcheck, vmap,
bad input, and numerical stability."""
import itertools

import pytest
import torch

import leet_compile
from leet_compile import decay_attn
from reference import decay_attn_reference, make_inputs, rel_err

METHODS = [m for m in leet_compile.METHODS if m != "auto"]
# (method, backend) pairs that exist on CPU: every method in ATen, chunked fused.
CPU_KERNELS = [(m, "aten") for m in METHODS] + [("chunked", "cpu"), ("auto", "auto")]
DECAYS = [None, "head", "position"]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernels fill new outputs with NaN first, so unwritten elements show up."""
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


def run(q, k, v, a, s0, method, backend, scale=1.0, final=True):
    return decay_attn(q, k, v, a, scale=scale, initial_state=s0, output_final_state=final,
                      method=method, backend=backend)


@pytest.mark.parametrize("method,backend", CPU_KERNELS)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("state", [False, True])
def test_forward_matches_reference(method, backend, decay, T, state):
    q, k, v, a, s0 = make_inputs(T=T, K=16, V=24, decay=decay, state=state)
    o, sf = run(q, k, v, a, s0, method, backend, scale=0.7)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, 0.7, s0)
    assert o.dtype == v.dtype and o.shape == o_ref.shape and sf.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert rel_err(o, o_ref) < 2e-6
    assert rel_err(sf, s_ref) < 2e-6


@pytest.mark.parametrize("method,backend", CPU_KERNELS)
def test_long_odd_sequence_strided_inputs(method, backend):
    """T = 1000 with q, k, v as permuted views of one fused qkv tensor."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=1000, K=13, V=20, decay="position", state=True, strided=True)
    assert not q.is_contiguous()
    o, sf = run(q, k, v, a, s0, method, backend)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, 1.0, s0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(sf, s_ref) < 1e-5


@pytest.mark.parametrize("method,backend", CPU_KERNELS)
def test_positive_log_decay(method, backend):
    """Growing weights (up to e^12 here) are computed as faithfully as fp32 allows."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=130, decay="position", decay_range=(0.0, 0.18), state=True)
    o, sf = run(q, k, v, a, s0, method, backend)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, 1.0, s0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(sf, s_ref) < 1e-5


@pytest.mark.parametrize("method,backend", CPU_KERNELS)
def test_strong_decay_no_overflow(method, backend):
    """log_decay = -30 per step: exp(-30 * 64) underflows; nothing may become inf/NaN."""
    q, k, v, _, s0 = make_inputs(B=1, H=2, T=200, decay=None, state=True)
    a = torch.full((2,), -30.0)
    o, sf = run(q, k, v, a, s0, method, backend)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, 1.0, s0)
    assert torch.isfinite(o).all()
    assert rel_err(o, o_ref) < 1e-6 and rel_err(sf, s_ref) < 1e-6


@pytest.mark.parametrize("decay", DECAYS)
def test_all_methods_agree_in_float64(decay):
    """float64 inputs compute in float64: every method equals the reference to ~1e-12."""
    q, k, v, a, s0 = make_inputs(T=77, decay=decay, state=True, dtype=torch.float64)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, 1.0, s0)
    for method, backend in CPU_KERNELS:
        o, sf = run(q, k, v, a, None if s0 is None else s0.double(), method, backend)
        assert o.dtype == torch.float64 and sf.dtype == torch.float64
        assert rel_err(o, o_ref) < 1e-12, method
        assert rel_err(sf, s_ref) < 1e-12, method


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,backend", [("chunked", "cpu"), ("recurrent", "aten"), ("recursive", "aten")])
def test_low_precision_error_at_most_naive_torch(dtype, method, backend):
    """Half inputs: our error is at most the error of the naive form in that dtype."""
    q, k, v, a, _ = make_inputs(B=1, H=2, T=128, K=32, V=32, decay="head", dtype=dtype)
    o = run(q, k, v, a, None, method, backend, final=False)
    o_ref, _ = decay_attn_reference(q, k, v, a)
    i = torch.arange(128)
    D = torch.where(i[:, None] >= i[None, :], torch.exp(a[:, None, None] * (i[:, None] - i[None, :])), 0)
    naive = ((q @ k.transpose(-1, -2)) * D.to(dtype)) @ v
    assert o.dtype == dtype
    assert rel_err(o, o_ref) <= 2 * rel_err(naive, o_ref)


def test_empty_sequence():
    q, k, v, a, s0 = make_inputs(T=0, decay="head", state=True)
    for method, backend in CPU_KERNELS:
        o, sf = run(q, k, v, a, s0, method, backend)
        assert o.shape == (2, 3, 0, 24)
        torch.testing.assert_close(sf, s0)


def test_final_state_only_when_asked():
    q, k, v, a, _ = make_inputs(T=10)
    o = decay_attn(q, k, v, a)
    assert isinstance(o, torch.Tensor)
    _, empty = torch.ops.leet.decay_attn(q, k, v, a)
    assert empty.shape == (0,)


# ---------------------------------------------------------------- gradients


def _ref_autograd(q, k, v, a, s0, scale):
    """The reference recurrence with autograd (the one in reference.py detaches)."""
    B, H, T, K = q.shape
    aa = torch.zeros(B, H, T, dtype=torch.float64) if a is None else (a.view(1, H, 1).expand(B, H, T) if a.dim() == 1 else a)
    S = s0 if s0 is not None else torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(T):
        S = S * aa[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2) * scale, S


@pytest.mark.parametrize("method,backend", CPU_KERNELS)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("state", [False, True])
def test_backward_matches_reference(method, backend, decay, state):
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=37, K=8, V=12, decay=decay, state=state, requires_grad=True)
    o, sf = run(q, k, v, a, s0, method, backend, scale=0.5)
    go, gs = torch.randn_like(o), torch.randn_like(sf)
    inputs = [t for t in (q, k, v, a, s0) if t is not None]
    grads = torch.autograd.grad((o * go).sum() + (sf * gs).sum(), inputs)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    it = iter(ref_leaves)
    rq, rk, rv = next(it), next(it), next(it)
    ra = next(it) if a is not None else None
    rs = next(it) if s0 is not None else None
    ro, rsf = _ref_autograd(rq, rk, rv, ra, rs, 0.5)
    ref_grads = torch.autograd.grad((ro * go.double()).sum() + (rsf * gs.double()).sum(), ref_leaves)
    for name, g, r in zip("q k v log_decay initial_state".split(), grads, ref_grads):
        assert rel_err(g, r) < 2e-5, name


@pytest.mark.parametrize("method,backend", [("chunked", "cpu"), ("naive", "aten"), ("recursive", "aten")])
def test_gradcheck_float64(method, backend):
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=9, K=3, V=4, decay="position", state=True,
                                 dtype=torch.float64, requires_grad=True)
    s0 = s0.double().detach().requires_grad_(True)

    def f(q, k, v, a, s0):
        return torch.ops.leet.decay_attn(q, k, v, a, 0.9, s0, True, method, backend)

    assert torch.autograd.gradcheck(f, (q, k, v, a.double().detach().requires_grad_(True), s0))


def test_backward_is_linear_in_time():
    """The backward of the chunked method does not build T x T intermediates."""
    q, k, v, a, _ = make_inputs(B=1, H=1, T=4096, K=8, V=8, decay="head", requires_grad=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        decay_attn(q, k, v, a).sum().backward()
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest < 4096 * 4096 * 4 / 8, biggest  # far below one T x T float32 matrix


# ---------------------------------------------------------------- opcheck, vmap, grad


OPCHECK_CASES = [
    dict(decay=None, state=False, final=False, method="auto", backend="auto"),
    dict(decay="head", state=True, final=True, method="chunked", backend="cpu"),
    dict(decay="position", state=True, final=True, method="recursive", backend="aten"),
    dict(decay="head", state=False, final=True, method="fleet", backend="aten"),
    dict(decay="position", state=False, final=False, method="naive", backend="aten"),
    dict(decay="head", state=True, final=False, method="recurrent", backend="aten"),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c['method']}-{c['decay']}-{c['state']}")
def test_opcheck(case):
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=17, K=4, V=5, decay=case["decay"], state=case["state"],
                                 requires_grad=True)
    torch.library.opcheck(
        torch.ops.leet.decay_attn.default,
        (q, k, v, a, 0.5, s0, case["final"], case["method"], case["backend"]),
    )


def test_vmap_extra_batch_dim():
    N = 3
    qs, ks, vs = torch.randn(N, 2, 2, 20, 4), torch.randn(N, 2, 2, 20, 4), torch.randn(N, 2, 2, 20, 5)
    a_heads = -torch.rand(N, 2)  # a different per-head decay for each vmapped item
    s0 = torch.randn(2, 2, 4, 5)  # shared initial state
    out, state = torch.vmap(
        lambda q, k, v, a: decay_attn(q, k, v, a, scale=1.0, initial_state=s0, output_final_state=True)
    )(qs, ks, vs, a_heads)
    for n in range(N):
        o_ref, s_ref = decay_attn_reference(qs[n], ks[n], vs[n], a_heads[n], 1.0, s0)
        assert rel_err(out[n], o_ref) < 1e-5 and rel_err(state[n], s_ref) < 1e-5


def test_vmap_position_decay_and_in_dims():
    q, k, v, a, _ = make_inputs(B=2, H=2, T=11, decay="position")
    a_batched = torch.stack([a, 2 * a], dim=1)  # vmapped over dim 1
    out = torch.vmap(lambda a: decay_attn(q, k, v, a, scale=1.0), in_dims=1)(a_batched)
    assert rel_err(out[1], decay_attn_reference(q, k, v, 2 * a)[0]) < 1e-5


def test_func_grad():
    q, k, v, a, _ = make_inputs(B=1, H=2, T=21, decay="head")
    g = torch.func.grad(lambda a: decay_attn(q, k, v, a, scale=1.0).square().sum())(a)
    a2 = a.detach().double().requires_grad_(True)
    o, _ = _ref_autograd(q.double(), k.double(), v.double(), a2, None, 1.0)
    (r,) = torch.autograd.grad(o.square().sum(), a2)
    assert rel_err(g, r) < 1e-5


# ---------------------------------------------------------------- bad input


def _bad_inputs():
    q, k, v = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 5)
    yield "q must be a 4-D", ValueError, (q[0], k, v), {}
    yield "v must have the same [B, H, T]", ValueError, (q, k, v[:, :, :7]), {}
    yield "k must have the same [B, H, T]", ValueError, (q, k[:1], v), {}
    yield "same head dim K", ValueError, (q, k[..., :3], v), {}
    yield "floating-point", TypeError, (q, k.long(), v), {}
    yield "log_decay must have shape [H] = [3]", ValueError, (q, k, v, torch.zeros(2)), {}
    yield "log_decay must have shape", ValueError, (q, k, v, torch.zeros(2, 3, 7)), {}
    yield "initial_state must have shape [B, H, K, V] = [2, 3, 4, 5]", ValueError, (q, k, v), dict(initial_state=torch.zeros(2, 3, 5, 4))
    yield "unknown method 'fast'", ValueError, (q, k, v), dict(method="fast")
    yield "unknown backend 'gpu'", ValueError, (q, k, v), dict(backend="gpu")
    yield "all tensors must be on one device", ValueError, (q, k.to("meta"), v), {}


BAD = list(_bad_inputs())


@pytest.mark.parametrize("match,err,args,kwargs", BAD, ids=[b[0] for b in BAD])
def test_bad_input_eager(match, err, args, kwargs):
    with pytest.raises(err, match=match.replace("[", r"\[").replace("]", r"\]")):
        decay_attn(*args, **kwargs)


@pytest.mark.parametrize("match,err,args,kwargs", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fake(match, err, args, kwargs):
    """The same errors from the fake kernel (what torch.compile and export trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        fake_kwargs = {n: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
        with pytest.raises(err, match=match.replace("[", r"\[").replace("]", r"\]")):
            decay_attn(*fake, **fake_kwargs)


def test_backend_errors():
    q, k, v, a, _ = make_inputs(T=5)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        decay_attn(q, k, v, a, backend="triton")
    with pytest.raises(ValueError, match="backend 'cpu' implements methods auto, chunked; got 'fleet'"):
        decay_attn(q, k, v, a, method="fleet", backend="cpu")


# ---------------------------------------------------------------- numerical stability


@pytest.mark.parametrize("log_decay", [-5.0, -1e-4])
@pytest.mark.parametrize("method,backend", [("chunked", "cpu"), ("chunked", "aten"), ("recursive", "aten"), ("fleet", "aten")])
def test_long_sequence_stability(log_decay, method, backend):
    """T = 16384, strong and weak decay: finite and within 1e-5 of float64 (fp32)."""
    q, k, v, _, _ = make_inputs(B=1, H=2, T=16384, K=8, V=8, decay=None, seed=0)
    a = torch.full((2,), log_decay)
    o, sf = run(q, k, v, a, None, method, backend)
    o_ref, s_ref = _REF_CACHE.setdefault(log_decay, decay_attn_reference(q, k, v, a))
    assert torch.isfinite(o).all()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(sf, s_ref) < 1e-5


_REF_CACHE = {}


# ---------------------------------------------------------------- LeetDecoding drop-in


@pytest.mark.parametrize("attn_method", [None, "vanilla", "lightningAttention2_torch", "FleetAttention",
                                         "causal_dot_product", "recursion", "block-based"])
def test_causal_linear_decoder(attn_method):
    q, k, v, _, _ = make_inputs(B=1, H=2, T=40)
    gamma = torch.tensor([0.1, 0.5])
    o = leet_compile.causal_linear_decoder(q, k, v, True, gamma, True, attn_method)
    assert rel_err(o, decay_attn_reference(q, k, v, -gamma)[0]) < 1e-5
    o = leet_compile.causal_linear_decoder(q, k, v, True, torch.exp(-gamma), False, attn_method)
    assert rel_err(o, decay_attn_reference(q, k, v, -gamma)[0]) < 1e-5
    o = leet_compile.causal_linear_decoder(q, k, v, attn_method=attn_method)
    assert rel_err(o, decay_attn_reference(q, k, v)[0]) < 1e-5


def test_causal_linear_decoder_errors():
    q, k, v, _, _ = make_inputs(B=1, H=2, T=4)
    with pytest.raises(ValueError, match="is_mask_weight=False"):
        leet_compile.causal_linear_decoder(q, k, v, False, torch.ones(2))
    with pytest.raises(ValueError, match="must be positive"):
        leet_compile.causal_linear_decoder(q, k, v, True, torch.tensor([0.5, -0.1]), False)
    with pytest.raises(ValueError, match="unknown attn_method"):
        leet_compile.causal_linear_decoder(q, k, v, attn_method="nope")
