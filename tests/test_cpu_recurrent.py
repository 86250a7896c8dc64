"""The recurrent CPU kernel (csrc/cpu/recurrent_cpu.cpp): method "auto" on the cpu backend
for float64 compute with at most 32 value columns (the backend's row sums of normalised
retention, passes/rewrite.py, use V = 1). q and k are read in their own dtype, everything
else is float64. Against the float64 reference on both builds (LEET_CPU_ISA=auto and
baseline): every decay form, with and without state, T = 1 and odd T, odd K, strided
inputs, q and k in float64 / float32 / bf16 / fp16; -inf / -1e20 / positive decays; NaN and
inf inputs (the same outputs poisoned as the chunked kernel's); gradients and opcheck.
Outputs are NaN-filled first (LEET_POISON_OUTPUTS), so unwritten elements show."""
import pytest
import torch

from leet_compile import decay_attn
from reference import decay_attn_reference, decay_attn_reference_grads, make_inputs, rel_err

NAN, INF = float("nan"), float("inf")
OP = torch.ops.leet.decay_attn.default
MAX_V = 32  # kRecurrentMaxV (csrc/decay_attn.h)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


def run(q, k, v, a=None, s0=None, scale=0.7, method="auto"):
    return decay_attn(q, k, v, a, scale=scale, initial_state=s0, output_final_state=True, method=method,
                      backend="cpu")


def inputs(T=97, K=13, V=5, decay="position", state=True, qk_dtype=torch.float64, strided=False, seed=0):
    """make_inputs with q, k in qk_dtype and v, s0 in float64 (float64 compute)."""
    q, k, v, a, s0 = make_inputs(B=2, H=3, T=T, K=K, V=V, decay=decay, state=state, dtype=qk_dtype,
                                 strided=strided, seed=seed)
    return q, k, v.double(), a, None if s0 is None else s0.double()


@pytest.mark.parametrize("isa", ["auto", "baseline"])
@pytest.mark.parametrize("qk_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("T,V,strided", [(1, 1, False), (97, 1, True), (97, 5, False), (64, MAX_V, True)])
def test_matches_reference(isa, qk_dtype, decay, state, T, V, strided, monkeypatch):
    monkeypatch.setenv("LEET_CPU_ISA", isa)
    q, k, v, a, s0 = inputs(T=T, V=V, decay=decay, state=state, qk_dtype=qk_dtype, strided=strided)
    o, sf = run(q, k, v, a, s0)
    ref_o, ref_s = decay_attn_reference(q, k, v, a, 0.7, s0)  # of q, k as given (their rounding included)
    assert o.dtype == sf.dtype == torch.float64 and sf.shape == (2, 3, 13, V)
    assert rel_err(o, ref_o) < 1e-13 and rel_err(sf, ref_s) < 1e-13, (rel_err(o, ref_o), rel_err(sf, ref_s))


def test_auto_takes_it_up_to_max_v():
    """Method auto runs this kernel up to MAX_V columns (its rounding differs from the
    chunked kernel's) and the chunked kernel beyond (bit for bit the same)."""
    for V, recurrent in [(MAX_V, True), (MAX_V + 1, False)]:
        q, k, v, a, s0 = inputs(T=200, V=V)
        (o, sf), (oc, sc) = run(q, k, v, a, s0), run(q, k, v, a, s0, method="chunked")
        assert torch.equal(o, oc) != recurrent, V
        assert rel_err(o, oc) < 1e-13


def test_float32_compute_stays_chunked():
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=100, K=8, V=1, decay="head", state=True, seed=1)
    assert torch.equal(run(q, k, v, a, s0)[0], run(q, k, v, a, s0, method="chunked")[0])


def test_mixed_qk_dtypes():
    """q and k in different dtypes go to the chunked kernel (which copies both to float64)."""
    q, k, v, a, s0 = inputs(T=80, V=2, qk_dtype=torch.float32, seed=2)
    o, sf = run(q, k.bfloat16(), v, a, s0)
    ref_o, ref_s = decay_attn_reference(q, k.bfloat16(), v, a, 0.7, s0)
    assert rel_err(o, ref_o) < 1e-13 and rel_err(sf, ref_s) < 1e-13


@pytest.mark.parametrize("state", [False, True])
def test_resets_huge_and_positive_decays(state):
    q, k, v, a, s0 = inputs(T=200, V=3, state=state, seed=3)
    a = a[:1].repeat(2, 1, 1)
    a[:, 0, [0, 95, 96, 160]] = -INF
    a[:, 1, [31, 100, 159]] = -1e20
    a[:, 2] = torch.rand(200, dtype=torch.float64) * 0.09  # growth, up to e^9
    o, sf = run(q, k, v, a, s0)
    ref_o, ref_s = decay_attn_reference(q, k, v, a, 0.7, s0)
    assert rel_err(o, ref_o) < 1e-13 and rel_err(sf, ref_s) < 1e-13
    for ah in ([-INF, -1e20, 0.03], [-30.0, 0.0, -0.1]):  # per-head forms
        ah = torch.tensor(ah, dtype=torch.float64)
        (o, sf), (oc, sc) = run(q, k, v, ah, s0), run(q, k, v, ah, s0, method="chunked")
        assert rel_err(o, oc) < 1e-13 and rel_err(sf, sc) < 1e-13


@pytest.mark.parametrize("where", ["q", "k", "v", "log_decay"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_non_finite_stays_causal(where, bad):
    """A NaN / inf at position 70 changes no earlier output and poisons the same outputs as
    the chunked kernel (a log decay's bad value: NaN, or a reset, -inf)."""
    q, k, v, a, s0 = inputs(T=150, V=4, seed=4)
    clean, _ = run(q, k, v, a, s0)
    args = {"q": q, "k": k, "v": v, "log_decay": a}
    x = args[where].clone()
    if where == "log_decay":
        x[:, :, 70] = bad if bad != bad else -bad
    else:
        x[:, :, 70, 1] = bad
    args[where] = x
    o, _ = run(*args.values(), s0)
    oc, _ = run(*args.values(), s0, method="chunked")
    assert torch.equal(o[:, :, :70], clean[:, :, :70])
    assert torch.equal(torch.isfinite(o), torch.isfinite(oc))
    finite = torch.isfinite(oc)
    assert rel_err(o[finite], oc[finite]) < 1e-13


def test_outputs_are_fresh():
    q, k, v, a, s0 = inputs(T=1, K=1, V=1, seed=5)
    o, sf = run(q, k, v, a, s0)
    for x in (q, k, v, a, s0):
        assert o.data_ptr() != x.data_ptr() and sf.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_gradients(decay):
    """Autograd through method auto (the fused CPU backward) against float64 autograd of
    the recurrence, q and k in float32 (their gradients in float32)."""
    q, k, v, a, s0 = inputs(T=70, V=2, decay=decay, qk_dtype=torch.float32, seed=6)
    leaves = [None if x is None else x.clone().requires_grad_(True) for x in (q, k, v, a, s0)]
    o, sf = run(*leaves)
    go, gs = torch.randn_like(o), torch.randn_like(sf)
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad((o * go).sum() + (sf * gs).sum(), present))
    ours = [None if x is None else next(grads) for x in leaves]
    ref = decay_attn_reference_grads(q, k, v, a, s0, go, gs, 0.7)
    for name, g, r, x in zip("q k v log_decay s0".split(), ours, ref, leaves):
        if x is not None:
            assert g.dtype == x.dtype and rel_err(g, r) < 1e-5, (name, rel_err(g, r))


@pytest.mark.parametrize("qk_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("state", [False, True])
def test_opcheck(qk_dtype, state):
    q, k, v, a, s0 = inputs(T=19, K=4, V=2, qk_dtype=qk_dtype, state=state, seed=7)
    torch.library.opcheck(OP, (q, k, v, a, 0.5, s0, True, "auto", "cpu"))
