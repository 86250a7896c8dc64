"""The fused CPU forward's two builds (csrc/cpu/chunk_common.h): the AVX2 one, which runs
where the CPU has AVX2, FMA and F16C, and the baseline one (LEET_CPU_ISA=baseline, read at
every call). Each against the float64 reference, and against each other: the same
arithmetic but for fused multiply-adds, so they agree to float32 rounding. Every decay
form, with and without state, odd T, K != V, strided inputs, float64, and bf16 / fp16 on
the float32 kernel (LEET_CPU_BF16=0). (tests/test_cpu_backward.py runs the backward's
tests on both builds.)"""
import pytest
import torch

from leet_compile import decay_attn
from reference import decay_attn_reference, make_inputs, rel_err

ISAS = ["auto", "baseline"]
NAN = float("nan")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernels fill new outputs with NaN first, so unwritten elements show up."""
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")
    monkeypatch.setenv("LEET_CPU_BF16", "0")  # bf16 / fp16 through the float32 kernel's two builds


def fused(isa, monkeypatch, q, k, v, a, s0, scale=0.5):
    monkeypatch.setenv("LEET_CPU_ISA", isa)
    return decay_attn(q, k, v, a, scale=scale, initial_state=s0, output_final_state=True,
                      method="chunked", backend="cpu")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("T,K,V", [(1, 16, 24), (63, 16, 24), (97, 32, 8)])
def test_both_builds_match_reference_and_each_other(dtype, tol, decay, state, T, K, V, monkeypatch):
    q, k, v, a, s0 = make_inputs(B=2, H=3, T=T, K=K, V=V, decay=decay, state=state, dtype=dtype)
    ref_o, ref_s = decay_attn_reference(q, k, v, a, 0.5, s0)
    outs = {}
    for isa in ISAS:
        o, sf = outs[isa] = fused(isa, monkeypatch, q, k, v, a, s0)
        assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(sf).all(), isa
        assert rel_err(o, ref_o) < tol and rel_err(sf, ref_s) < tol, (isa, rel_err(o, ref_o), rel_err(sf, ref_s))
    assert rel_err(outs["auto"][0], outs["baseline"][0]) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [None, "position"])
def test_half_inputs_on_both_builds(dtype, decay, monkeypatch):
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=75, K=16, V=40, decay=decay, state=True, dtype=dtype)
    ref_o, _ = decay_attn_reference(q, k, v, a, 0.5, s0)
    naive_err = rel_err((q.double() @ k.double().transpose(-1, -2)).to(dtype).double(),
                        q.double() @ k.double().transpose(-1, -2))  # one rounding to the dtype
    outs = [fused(isa, monkeypatch, q, k, v, a, s0)[0] for isa in ISAS]
    for isa, o in zip(ISAS, outs):
        assert o.dtype == dtype and torch.isfinite(o).all(), isa
        assert rel_err(o, ref_o) < 4 * naive_err, (isa, rel_err(o, ref_o), naive_err)
    assert rel_err(outs[0], outs[1]) < 4 * naive_err


def test_strided_inputs_on_both_builds(monkeypatch):
    qkv = torch.randn(2, 70, 3, 4, 16, dtype=torch.float32)  # a fused projection, permuted
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    a = -torch.rand(4) * 0.3
    ref_o, _ = decay_attn_reference(q, k, v, a, 0.5, None)
    for isa in ISAS:
        o, _ = fused(isa, monkeypatch, q, k, v, a, None)
        assert rel_err(o, ref_o) < 1e-5, isa


@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_value_stays_causal(isa, monkeypatch):
    q, k, v, a, _ = make_inputs(B=1, H=1, T=70, K=8, V=8, decay="head")
    v[0, 0, 40, 3] = NAN
    o, _ = fused(isa, monkeypatch, q, k, v, a, None)
    assert torch.isfinite(o[:, :, :40]).all() and torch.isnan(o[:, :, 40:]).any()


def test_bad_setting_is_named(monkeypatch):
    q, k, v, a, _ = make_inputs(B=1, H=1, T=8, K=4, V=4, decay="head")
    with pytest.raises(ValueError, match="LEET_CPU_ISA must be"):
        fused("avx9", monkeypatch, q, k, v, a, None)
