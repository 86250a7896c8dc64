"""The sequence split of the fused CPU forward (csrc/cpu/chunked_cpu_split.cpp): segments of
the sequence in parallel, then the states joined and the outputs corrected. Forced with
LEET_CPU_SPLIT=N (N segments) and compared with the float64 reference and with the unsplit
kernel (LEET_CPU_SPLIT=0): odd T, K != V, strided inputs, every decay form, initial and final
states, -inf / -1e20 / positive log decays, non-finite inputs, bf16, gradients; and the
automatic rule (B * H below the thread count). Outputs are NaN-filled first
(LEET_POISON_OUTPUTS), so unwritten elements show."""
import os

import pytest
import torch

from leet_compile import decay_attn
from reference import decay_attn_reference, make_inputs, rel_err

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


@pytest.fixture
def threads():
    """torch.set_num_threads(n) inside the test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def run(split, q, k, v, a=None, s0=None, scale=0.5, final=True):
    """decay_attn on the fused CPU kernel with LEET_CPU_SPLIT=split ("0": unsplit)."""
    old = os.environ.get("LEET_CPU_SPLIT")
    os.environ["LEET_CPU_SPLIT"] = str(split)
    try:
        return decay_attn(q, k, v, a, scale=scale, initial_state=s0, output_final_state=final,
                          method="chunked", backend="cpu")
    finally:
        if old is None:
            del os.environ["LEET_CPU_SPLIT"]
        else:
            os.environ["LEET_CPU_SPLIT"] = old


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
@pytest.mark.parametrize("B,H,T,K,V,P", [(1, 1, 97, 16, 24, 3), (1, 2, 300, 13, 7, 2), (2, 1, 161, 8, 20, 4),
                                         (1, 1, 1000, 32, 32, 7)])
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
    """The backward (the fused kernel's) is unchanged: gradcheck of float64 decay_attn with
    the forward split (its numerical derivatives come from the split forward), and float32
    gradients equal to those of the unsplit forward."""
    threads(2)
    q, k, v, a, s0 = make_inputs(B=1, H=1, T=70, K=3, V=4, decay="position", state=True, dtype=torch.float64,
                                 requires_grad=True, seed=13)
    a, s0 = (t.detach().double().requires_grad_(True) for t in (a, s0))
    old = os.environ.get("LEET_CPU_SPLIT")
    os.environ["LEET_CPU_SPLIT"] = "3"
    try:
        assert torch.autograd.gradcheck(
            lambda q, k, v, a, s0: torch.ops.leet.decay_attn(q, k, v, a, 0.9, s0, True, "chunked", "cpu"),
            (q, k, v, a, s0))
    finally:
        if old is None:
            del os.environ["LEET_CPU_SPLIT"]
        else:
            os.environ["LEET_CPU_SPLIT"] = old
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
