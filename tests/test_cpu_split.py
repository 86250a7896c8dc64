"""The sequence split of the fused CPU forward and backward (csrc/cpu/chunked_cpu_split.cpp):
segments of the sequence in parallel, then the states joined and the outputs corrected (the
forward), or the states entering and the state gradients leaving every segment found first
(the backward). Forced with LEET_CPU_SPLIT=N (N segments) and compared with the float64
reference and with the unsplit kernels (LEET_CPU_SPLIT=0): odd T, K != V, strided inputs,
every decay form, initial and final states, -inf / -1e20 / positive log decays, non-finite
inputs, bf16, gradients; and the automatic rule (B * H below the thread count). Outputs are
NaN-filled first (LEET_POISON_OUTPUTS), so unwritten elements show. (tests/test_cpu_backward.py
runs all of its backward tests with LEET_CPU_SPLIT=3 too.)"""
import contextlib
import os

import pytest
import torch

from leet_compile import decay_attn
from reference import decay_attn_reference, decay_attn_reference_grads, make_inputs, rel_err

NAN, INF = float("nan"), float("inf")
BWD = torch.ops.leet._decay_attn_backward.default
# (B, H, T, K, V, segments): T not a multiple of 32 nor of P, K != V, odd K
SHAPES = [(1, 1, 97, 16, 24, 3), (1, 2, 300, 13, 7, 2), (2, 1, 161, 8, 20, 4), (1, 1, 1000, 32, 32, 7)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


@pytest.fixture
def threads():
    """torch.set_num_threads(n) inside the test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@contextlib.contextmanager
def split_setting(split):
    """LEET_CPU_SPLIT=split inside ("0": unsplit; the kernels read it at every call)."""
    old = os.environ.get("LEET_CPU_SPLIT")
    os.environ["LEET_CPU_SPLIT"] = str(split)
    try:
        yield
    finally:
        if old is None:
            del os.environ["LEET_CPU_SPLIT"]
        else:
            os.environ["LEET_CPU_SPLIT"] = old


def run(split, q, k, v, a=None, s0=None, scale=0.5, final=True):
    """decay_attn on the fused CPU kernel with LEET_CPU_SPLIT=split ("0": unsplit)."""
    with split_setting(split):
        return decay_attn(q, k, v, a, scale=scale, initial_state=s0, output_final_state=final,
                          method="chunked", backend="cpu")


def backward(split, go, gs, q, k, v, a=None, s0=None, scale=0.5):
    """The fused CPU backward with LEET_CPU_SPLIT=split: (dq, dk, dv, d log_decay, d initial_state)."""
    with split_setting(split):
        return BWD(go, gs, q, k, v, a, scale, s0)


def check_backward(q, k, v, a, s0, P, grad_state=True, scale=0.5, tol=2e-5, seed=0):
    """The backward split into P segments: against float64 autograd and the unsplit kernel,
    the same dtypes and shapes; every element written and finite."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, V = v.shape
    go = torch.randn(B, H, T, V, generator=g).to(v.dtype)
    gs = torch.randn(B, H, q.shape[-1], V, generator=g) if grad_state else None
    ours, unsplit = backward(P, go, gs, q, k, v, a, s0, scale), backward(0, go, gs, q, k, v, a, s0, scale)
    ref = decay_attn_reference_grads(q, k, v, a, s0, go, gs, scale)
    scales = [None if r is None else max(r.norm().item(), 1.0) for r in ref]  # a floor of 1
    if a is not None and a.dim() == 1:
        # A per-head decay's gradient is a sum over positions that cancels to a small value
        # (0.8 of terms summing to 1000 in magnitude): measure its error against those terms.
        per_position = a.view(1, H, 1).expand(B, H, T).contiguous()
        terms = decay_attn_reference_grads(q, k, v, per_position, s0, go, gs, scale)[3]
        scales[3] = terms.abs().sum((0, 2)).norm().item()
    for name, x, x0, r, size in zip("q k v log_decay initial_state".split(), ours, unsplit, ref, scales):
        assert x.dtype == x0.dtype and x.shape == x0.shape, name
        if r is None:
            assert x.numel() == 0, name
            continue
        assert torch.isfinite(x).all(), name
        err = (x.double() - r).norm().item() / size
        assert err < tol, (name, err)
        assert (x.double() - x0.double()).norm().item() / size < tol, name
    return ours


def check(q, k, v, a, s0, P, scale=0.5, tol=1e-5):
    """Split into P segments: against the float64 reference and the unsplit kernel, the
    same dtypes, shapes and contiguity; every element written and finite."""
    o, sf = run(P, q, k, v, a, s0, scale)
    o0, sf0 = run(0, q, k, v, a, s0, scale)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, scale, s0)
    assert o.dtype == o0.dtype == v.dtype and sf.dtype == sf0.dtype
    assert o.shape == o0.shape and sf.shape == sf0.shape and o.is_contiguous() and sf.is_contiguous()
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert rel_err(o, o_ref) < tol and rel_err(sf, s_ref) < tol, (rel_err(o, o_ref), rel_err(sf, s_ref))
    assert rel_err(o, o0) < tol and rel_err(sf, sf0) < tol
    return o, sf


@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("B,H,T,K,V,P", SHAPES)
def test_matches_reference_and_unsplit(decay, state, B, H, T, K, V, P):
    """T not a multiple of 32 nor of P, K != V, odd K."""
    q, k, v, a, s0 = make_inputs(B=B, H=H, T=T, K=K, V=V, decay=decay, state=state, seed=T + K)
    check(q, k, v, a, s0, P)


@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_without_final_state(decay, monkeypatch):
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=130, K=8, V=12, decay=decay, state=True, seed=1)
    outs = []
    for split in ("3", "0"):
        monkeypatch.setenv("LEET_CPU_SPLIT", split)
        outs.append(torch.ops.leet.decay_attn(q, k, v, a, 0.5, s0, False, "chunked", "cpu"))
    (o, sf), (o0, sf0) = outs
    assert sf.shape == sf0.shape == (0,) and sf.dtype == sf0.dtype
    assert rel_err(o, o0) < 1e-6 and torch.isfinite(o).all()


@pytest.mark.parametrize("P", [2, 5, 100])
def test_segment_counts(P):
    """More segments than chunks: one per chunk (the last one partial); T <= 32: no split."""
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=70, K=8, V=8, decay="position", state=True, seed=2)
    check(q, k, v, a, s0, P)
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=32, K=8, V=8, decay="position", state=True, seed=2)
    assert torch.equal(run(P, q, k, v, a, s0)[0], run(0, q, k, v, a, s0)[0])


def test_strided_and_permuted_inputs():
    """q, k, v as permuted views of one fused qkv tensor, v transposed in its last dims
    (copied by the kernel), log_decay and initial state non-contiguous."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=301, K=20, V=12, decay="position", state=True, strided=True,
                                 seed=3)
    assert not q.is_contiguous()
    check(q, k, v, a, s0, 3)
    v_t = v.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)
    s0_t = s0.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert v_t.stride(-1) != 1 and not s0_t.is_contiguous()
    check(q, k, v_t, a_t, s0_t, 4)


def test_float64_computes_in_float64():
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=200, K=8, V=6, decay="position", state=True, dtype=torch.float64,
                                 seed=4)
    s0 = s0.double()
    o, sf = check(q, k, v, a, s0, 3, tol=1e-12)
    assert o.dtype == sf.dtype == torch.float64


@pytest.mark.parametrize("state", [False, True])
def test_resets_huge_and_positive_decays(state):
    """-inf (resets, at and next to segment starts: with 3 segments of T = 200 they start at
    96 and 160), -1e20, -30 per step, positive decays, and a reset followed by growth."""
    q, k, v, a, s0 = make_inputs(B=1, H=5, T=200, K=8, V=6, decay="position", state=state, seed=5)
    a[:, 0, [0, 95, 96, 160]] = -INF
    a[:, 1, [31, 100, 159]] = -1e20
    a[:, 2] = -30.0
    a[:, 3] = torch.rand(200) * 0.09  # growth, up to e^9
    a[:, 4, 40] = -INF  # a reset, then every later step grows
    a[:, 4, 41:] = 0.05
    o, sf = check(q, k, v, a, s0, 3)
    # per-head forms: -inf (every step a reset), -1e20, positive
    check(q, k, v, torch.tensor([-INF, -1e20, 0.03, -30.0, 0.0]), s0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_decays_and_negative_scale(dtype):
    """Decays whose weights across a segment fall below the smallest normal number (those
    rows' corrections are 0, not subnormal), and a negative scale."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=1200, K=8, V=8, decay="position", state=True, dtype=dtype,
                                 decay_range=(-2.0, -0.5), seed=15)
    s0 = s0.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    check(q, k, v, a, s0, 2, scale=-0.7, tol=tol)
    check(q, k, v, torch.tensor([-0.6, -0.1]), s0, 3, scale=-0.7, tol=tol)


@pytest.mark.parametrize("where", ["v", "k", "q", "log_decay"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("p", [70, 100, 165])
def test_non_finite_stays_causal(where, bad, p):
    """A NaN / inf at position p (in segment 0, 1 or 2 of [0, 96), [96, 160), [160, 200))
    changes no output before p: those equal the clean inputs' (and the unsplit kernel's)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=200, K=8, V=12, decay="position", state=True, seed=6)
    clean, _ = run(3, q, k, v, a, s0)
    args = {"q": q, "k": k, "v": v, "log_decay": a}
    x = args[where].clone()
    if where == "log_decay":
        x[:, :, p] = bad if bad != bad else -bad  # NaN, or a reset (-inf)
    else:
        x[:, :, p, 3] = bad
    args[where] = x
    o, sf = run(3, args["q"], args["k"], args["v"], args["log_decay"], s0)
    o0, _ = run(0, args["q"], args["k"], args["v"], args["log_decay"], s0)
    assert torch.isfinite(o[:, :, :p]).all()
    assert rel_err(o[:, :, :p], clean[:, :, :p]) < 1e-5
    assert torch.equal(torch.isfinite(o), torch.isfinite(o0))  # the same rows poisoned as unsplit
    finite = torch.isfinite(o0)
    assert rel_err(o[finite], o0[finite]) < 1e-5


@pytest.mark.parametrize("path", ["units", "upcast"])
@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("state", [False, True])
def test_bf16(path, decay, state, monkeypatch):
    """bf16 inputs (the matrix-unit path, and the float32 copies of LEET_CPU_BF16=0): bf16
    output, float32 state, the error within 2x the unsplit kernel's against float64."""
    if path == "upcast":
        monkeypatch.setenv("LEET_CPU_BF16", "0")
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=301, K=32, V=40, decay=decay, state=state, dtype=torch.bfloat16,
                                 seed=7)
    o, sf = run(3, q, k, v, a, s0)
    o0, sf0 = run(0, q, k, v, a, s0)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, 0.5, s0)
    assert o.dtype == torch.bfloat16 and sf.dtype == sf0.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert rel_err(o, o_ref) <= 2 * rel_err(o0, o_ref) + 1e-4, (rel_err(o, o_ref), rel_err(o0, o_ref))
    assert rel_err(sf, s_ref) <= 2 * rel_err(sf0, s_ref) + 1e-4, (rel_err(sf, s_ref), rel_err(sf0, s_ref))


def test_mixed_dtypes():
    """float32 q, k and bf16 v: computed in float32, the output in v's dtype."""
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=150, K=8, V=8, decay="head", state=True, seed=8)
    v = v.bfloat16()
    o, sf = run(2, q, k, v, a, s0)
    o0, sf0 = run(0, q, k, v, a, s0)
    assert o.dtype == torch.bfloat16 and sf.dtype == sf0.dtype == torch.float32
    assert rel_err(o, o0) < 1e-2 and rel_err(sf, sf0) < 1e-5


def test_outputs_are_fresh():
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=100, K=8, V=8, decay="position", state=True, seed=9)
    o, sf = run(3, q, k, v, a, s0)
    for t in (q, k, v, a, s0):
        assert o.data_ptr() != t.data_ptr() and sf.data_ptr() != t.data_ptr()
    assert o.untyped_storage().nbytes() == o.numel() * o.element_size()
    assert sf.untyped_storage().nbytes() == sf.numel() * sf.element_size()


@pytest.mark.parametrize("BH", [1, 2])
def test_automatic_rule(BH, threads):
    """2 threads: B * H = 1 splits on its own at T >= 2 * 512 (its rounding differs from the
    unsplit kernel's), B * H = 2 does not (bit for bit the unsplit result); 1 thread never."""
    threads(2)
    q, k, v, a, s0 = make_inputs(B=1, H=BH, T=1100, K=16, V=16, decay="position", state=True, seed=10)
    o0, s_0 = run(0, q, k, v, a, s0)
    o, s = run("auto", q, k, v, a, s0)
    assert rel_err(o, o0) < 1e-5 and rel_err(s, s_0) < 1e-5
    assert torch.equal(o, o0) == (BH == 2)
    o_short, _ = run("auto", q[:, :, :1000], k[:, :, :1000], v[:, :, :1000], a[:, :, :1000], s0)
    assert torch.equal(o_short, run(0, q[:, :, :1000], k[:, :, :1000], v[:, :, :1000], a[:, :, :1000], s0)[0])
    threads(1)
    assert torch.equal(run("auto", q, k, v, a, s0)[0], o0)


@pytest.mark.parametrize("P", [2, 3])
def test_forced_split_on_two_threads(P, threads):
    """B * H = 1 and 2 on 2 threads: the segments run on both (the kernel's own loop inline)."""
    threads(2)
    for H in (1, 2):
        q, k, v, a, s0 = make_inputs(B=1, H=H, T=257, K=16, V=24, decay="position", state=True, seed=11)
        check(q, k, v, a, s0, P)


def test_bad_setting():
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=100, K=8, V=8, seed=12)
    with pytest.raises(ValueError, match="LEET_CPU_SPLIT"):
        run("two", q, k, v, a, s0)


def test_gradients_through_the_split_forward(threads):
    """gradcheck of float64 decay_attn with forward and backward split (the numerical
    derivatives come from the split forward, the analytical ones from the split backward),
    and float32 gradients equal to those of the unsplit kernels."""
    threads(2)
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=70, K=3, V=4, decay="position", state=True, dtype=torch.float64,
                                 requires_grad=True, seed=13)
    a, s0 = (t.detach().double().requires_grad_(True) for t in (a, s0))
    with split_setting(3):
        assert torch.autograd.gradcheck(
            lambda q, k, v, a, s0: torch.ops.leet.decay_attn(q, k, v, a, 0.9, s0, True, "chunked", "cpu"),
            (q, k, v, a, s0))
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=200, K=8, V=8, decay="position", state=True, requires_grad=True,
                                 seed=14)
    s0.requires_grad_(True)
    go, gs = torch.randn(1, 2, 200, 8), torch.randn(1, 2, 8, 8)
    grads = []
    for split in (3, 0):
        o, sf = run(split, q, k, v, a, s0)
        grads.append(torch.autograd.grad((o * go).sum() + (sf * gs).sum(), (q, k, v, a, s0)))
    for g, g0 in zip(*grads):
        assert rel_err(g, g0) < 1e-5


# ---------------------------------------------------------------- the backward's split


@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("B,H,T,K,V,P", SHAPES)
def test_backward_matches_reference_and_unsplit(decay, state, B, H, T, K, V, P):
    """With and without initial state and grad_state; T not a multiple of 32 nor of P."""
    q, k, v, a, s0 = make_inputs(B=B, H=H, T=T, K=K, V=V, decay=decay, state=state, seed=T + K)
    check_backward(q, k, v, a, s0, P, grad_state=state)
    check_backward(q, k, v, a, s0, P, grad_state=not state, seed=1)


@pytest.mark.parametrize("P", [2, 5, 100])
def test_backward_segment_counts(P):
    """More segments than chunks: one per chunk; T <= 32: no split (bit for bit unsplit)."""
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=70, K=8, V=8, decay="position", state=True, seed=2)
    check_backward(q, k, v, a, s0, P)
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=32, K=8, V=8, decay="position", state=True, seed=2)
    go, gs = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 8, 8)
    for x, x0 in zip(backward(P, go, gs, q, k, v, a, s0), backward(0, go, gs, q, k, v, a, s0)):
        assert torch.equal(x, x0)


def test_backward_strided_float64_and_negative_scale():
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=301, K=20, V=12, decay="position", state=True, strided=True, seed=3)
    assert not q.is_contiguous()
    check_backward(q, k, v, a, s0, 3, scale=-0.7)
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=200, K=8, V=6, decay="head", state=True, dtype=torch.float64, seed=4)
    ours = check_backward(q, k, v, a.double(), s0.double(), 3, tol=1e-12)
    assert all(x.dtype == torch.float64 for x in ours)


@pytest.mark.parametrize("state", [False, True])
def test_backward_resets_huge_and_positive_decays(state):
    """As the forward's test: -inf at and next to segment starts (3 segments of T = 200
    start at 96 and 160), -1e20, -30 per step, growth, a reset followed by growth."""
    q, k, v, a, s0 = make_inputs(B=1, H=5, T=200, K=8, V=6, decay="position", state=state, seed=5)
    a[:, 0, [0, 95, 96, 160]] = -INF
    a[:, 1, [31, 100, 159]] = -1e20
    a[:, 2] = -30.0
    a[:, 3] = torch.rand(200) * 0.09
    a[:, 4, 40] = -INF
    a[:, 4, 41:] = 0.05
    # -inf / -1e20 entries have no finite gradient in exact arithmetic either: compare the rest
    go, gs = torch.randn(1, 5, 200, 6), torch.randn(1, 5, 8, 6)
    ours, unsplit = backward(3, go, gs, q, k, v, a, s0), backward(0, go, gs, q, k, v, a, s0)
    ref = decay_attn_reference_grads(q, k, v, a, s0, go, gs, 0.5)
    for name, x, x0, r in zip("q k v".split(), ours, unsplit, ref):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, r) < 2e-5 and rel_err(x, x0) < 2e-5, name
    assert torch.equal(torch.isfinite(ours[3]), torch.isfinite(unsplit[3]))
    finite = torch.isfinite(unsplit[3])
    assert rel_err(ours[3][finite], unsplit[3][finite]) < 2e-5


@pytest.mark.parametrize("where", ["v", "k", "q", "grad_o"])
@pytest.mark.parametrize("p", [70, 100, 165])
def test_backward_non_finite_as_unsplit(where, p):
    """A NaN at position p (in segment 0, 1 or 2): the same gradient entries are NaN as in the
    unsplit kernel, and the finite ones agree (q, dO at p reach dk, dv at t <= p; k, v at p
    reach dq at i >= p)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=200, K=8, V=12, decay="position", state=True, seed=6)
    go, gs = torch.randn(1, 2, 200, 12), torch.randn(1, 2, 8, 12)
    args = {"q": q, "k": k, "v": v, "grad_o": go}
    x = args[where].clone()
    x[:, :, p, 3] = NAN
    args[where] = x
    inputs = (args["grad_o"], gs, args["q"], args["k"], args["v"], a, s0)
    ours, unsplit = backward(3, *inputs), backward(0, *inputs)
    for g, g0 in zip(ours[:3] + ours[4:], unsplit[:3] + unsplit[4:]):
        assert torch.equal(torch.isfinite(g), torch.isfinite(g0))
        finite = torch.isfinite(g0)
        assert rel_err(g[finite], g0[finite]) < 2e-5
    # d log_decay: the unsplit kernel's rule (sums of q.dq - k.dk over all later positions)
    # is NaN at every t <= p once a later dq is; the split's is finite in earlier segments,
    # where the exact gradient is (float64 autograd's), and agrees with it there.
    da, da0 = ours[3], unsplit[3]
    assert (torch.isfinite(da) | ~torch.isfinite(da0)).all()
    ref = decay_attn_reference_grads(args["q"], args["k"], args["v"], a, s0, args["grad_o"], gs, 0.5)[3]
    finite = torch.isfinite(da)
    assert torch.isfinite(ref[finite]).all() and rel_err(da[finite], ref[finite]) < 2e-5


@pytest.mark.parametrize("path", ["units", "upcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_half(path, dtype, monkeypatch):
    """Half inputs: gradients in the input dtype, within 2x the unsplit kernel's error."""
    if path == "upcast":
        monkeypatch.setenv("LEET_CPU_BF16", "0")
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=301, K=32, V=40, decay="position", state=True, dtype=dtype, seed=7)
    go, gs = torch.randn(1, 2, 301, 40).to(dtype), torch.randn(1, 2, 32, 40)
    ours, unsplit = backward(3, go, gs, q, k, v, a, s0), backward(0, go, gs, q, k, v, a, s0)
    ref = decay_attn_reference_grads(q, k, v, a, s0, go, gs, 0.5)
    for name, x, x0, r in zip("q k v log_decay initial_state".split(), ours, unsplit, ref):
        assert x.dtype == x0.dtype and torch.isfinite(x).all(), name
        assert rel_err(x, r) <= 2 * rel_err(x0, r) + 1e-4, (name, rel_err(x, r), rel_err(x0, r))


def test_backward_mixed_dtypes_not_split():
    """float32 q, k and bf16 v: the split declines (the unsplit kernel's result, bit for bit)."""
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=150, K=8, V=8, decay="head", state=True, seed=8)
    v = v.bfloat16()
    go, gs = torch.randn(1, 1, 150, 8).bfloat16(), torch.randn(1, 1, 8, 8)
    for x, x0 in zip(backward(2, go, gs, q, k, v, a, s0), backward(0, go, gs, q, k, v, a, s0)):
        assert torch.equal(x, x0)


def test_backward_outputs_are_fresh():
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=100, K=8, V=8, decay="position", state=True, seed=9)
    go, gs = torch.randn(1, 1, 100, 8), torch.randn(1, 1, 8, 8)
    outs = backward(3, go, gs, q, k, v, a, s0)
    inputs = (go, gs, q, k, v, a, s0)
    for o in outs:
        assert all(o.data_ptr() != t.data_ptr() for t in inputs)
        assert o.is_contiguous() and o.untyped_storage().nbytes() == o.numel() * o.element_size()


@pytest.mark.parametrize("BH", [1, 2])
def test_backward_automatic_rule(BH, threads):
    """2 threads: B * H = 1 splits at T >= 2 * 512 (its rounding differs from the unsplit
    kernel's), B * H = 2 does not; 1 thread never."""
    threads(2)
    q, k, v, a, s0 = make_inputs(B=1, H=BH, T=1100, K=16, V=16, decay="position", state=True, seed=10)
    go, gs = torch.randn(1, BH, 1100, 16), torch.randn(1, BH, 16, 16)
    g0 = backward(0, go, gs, q, k, v, a, s0)
    g = backward("auto", go, gs, q, k, v, a, s0)
    assert all(rel_err(x, x0) < 2e-5 for x, x0 in zip(g, g0))
    assert all(torch.equal(x, x0) for x, x0 in zip(g, g0)) == (BH == 2)
    threads(1)
    assert all(torch.equal(x, x0) for x, x0 in zip(backward("auto", go, gs, q, k, v, a, s0), g0))


def test_training_through_both_splits(threads):
    """decay_attn with autograd on 2 threads, B * H = 1, T = 1100: forward and backward split
    on their own; gradients of all five inputs as float64 autograd's."""
    threads(2)
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=1100, K=16, V=16, decay="position", state=True, seed=16,
                                 requires_grad=True)
    s0.requires_grad_(True)
    o, sf = decay_attn(q, k, v, a, scale=0.5, initial_state=s0, output_final_state=True)
    go, gs = torch.randn_like(o), torch.randn_like(sf)
    grads = torch.autograd.grad((o * go).sum() + (sf * gs).sum(), (q, k, v, a, s0))
    ref = decay_attn_reference_grads(q, k, v, a, s0, go, gs, 0.5)
    for name, x, r in zip("q k v log_decay initial_state".split(), grads, ref):
        assert (x.double() - r).norm().item() / max(r.norm().item(), 1.0) < 2e-5, name
