"""The fused CPU kernel on bf16 / fp16 inputs: the bf16 / fp16 units path
(csrc/cpu/chunked_cpu_lowp.cpp, where the CPU has AMX, or AVX512-BF16 for bf16) and the
float32 path (csrc/cpu/chunked_cpu.cpp, the inputs converted a chunk at a time: with
LEET_CPU_BF16=0, and on every CPU without such units), each against the float64 reference
with the bound "at most twice the error of PyTorch's own naive computation in that dtype"."""
import pytest
import torch

from leet_compile import decay_attn
from reference import decay_attn_reference, make_inputs, rel_err

PATHS = ["units", "upcast"]  # LEET_CPU_BF16 unset / "0" (upcast: float32 products)
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernels fill new outputs with NaN first, so unwritten elements show up."""
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "upcast":
        monkeypatch.setenv("LEET_CPU_BF16", "0")
    else:
        monkeypatch.delenv("LEET_CPU_BF16", raising=False)
    return request.param


def naive_lowp(q, k, v, a, scale, s0):
    """What users write, in the inputs' dtype: ((q k^T) * scale * D) v (plus the decayed
    initial state), and the final state (k * w)^T v; D and w exact, then cast."""
    B, H, T, _ = q.shape
    dt = q.dtype
    if a is None:
        a = torch.zeros(B, H, T, dtype=torch.float64)
    else:
        a = a.double().view(1, H, 1).expand(B, H, T) if a.dim() == 1 else a.double()
    L = a.cumsum(-1)  # L_i = sum_{t <= i} a_t
    i = torch.arange(T)
    causal = i[:, None] >= i[None, :]
    D = torch.where(causal, torch.exp(torch.where(causal, L[..., :, None] - L[..., None, :], 0.0)), 0.0)
    o = ((q @ k.transpose(-1, -2)) * (scale * D).to(dt)) @ v
    w = torch.exp(L[..., -1:] - L)[..., None].to(dt)  # weight of k_j in the final state
    s = (k * w).transpose(-1, -2) @ v
    if s0 is not None:
        o = o + (q * (scale * torch.exp(L))[..., None].to(dt)) @ s0.to(dt)
        s = s.float() + torch.exp(L[..., -1])[..., None, None].float() * s0
    return o, s


def check(q, k, v, a, s0, scale):
    o, sf = decay_attn(q, k, v, a, scale=scale, initial_state=s0, output_final_state=True,
                       method="chunked", backend="cpu")
    o_ref, s_ref = decay_attn_reference(q, k, v, a, scale, s0)
    o_naive, s_naive = naive_lowp(q, k, v, a, scale, s0)
    assert o.dtype == v.dtype and sf.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert rel_err(o, o_ref) <= 2 * rel_err(o_naive, o_ref), (rel_err(o, o_ref), rel_err(o_naive, o_ref))
    assert rel_err(sf, s_ref) <= 2 * rel_err(s_naive, s_ref), (rel_err(sf, s_ref), rel_err(s_naive, s_ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("T,K,V", [(1, 16, 24), (65, 16, 24), (97, 13, 7), (64, 64, 64), (40, 32, 130), (84, 48, 64)])
def test_error_at_most_twice_naive(path, dtype, decay, state, T, K, V):
    """Odd sizes, K != V, an odd K (padded reduction), V over one 64-column panel; K^T packed
    in 16 x 16 blocks with rows and words left over (T = 84: a last chunk of 20, K = 48)."""
    q, k, v, a, s0 = make_inputs(B=2, H=3, T=T, K=K, V=V, decay=decay, state=state, dtype=dtype)
    check(q, k, v, a, s0, scale=K ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(path, dtype):
    """q, k, v as permuted views of one fused qkv tensor: read in place, not copied."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=301, K=20, V=12, decay="position", state=True, strided=True,
                                 dtype=dtype)
    assert not q.is_contiguous()
    check(q, k, v, a, s0, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["v", "k", "q"])
def test_non_finite_stays_causal(path, dtype, bad, where):
    """A NaN / inf at position p (right padding) changes no output before p, and the outputs
    before p equal those of the clean inputs."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=100, K=16, V=24, decay="head", state=True, dtype=dtype)
    clean = decay_attn(q, k, v, a, initial_state=s0, method="chunked", backend="cpu")
    p = 70  # inside a chunk (chunks of 32: rows 64..95)
    x = {"q": q, "k": k, "v": v}[where].clone()
    x[:, :, p, 3] = bad
    args = {"q": q, "k": k, "v": v, where: x}
    o = decay_attn(args["q"], args["k"], args["v"], a, initial_state=s0, method="chunked", backend="cpu")
    assert torch.isfinite(o[:, :, :p]).all()
    # (equal up to rounding: the chunk holding a non-finite value sums row by row)
    assert rel_err(o[:, :, :p], clean[:, :, :p]) < 1e-3
    assert torch.equal(o[:, :, :64], clean[:, :, :64])  # earlier chunks: the same computation
    assert not torch.isfinite(o[:, :, p]).all()  # (the non-finite input reaches its own row)


def test_paths_differ_only_by_rounding():
    """Both paths run here and agree closely (a switch that did nothing would pass the
    tests above twice on one path; where the units exist their results differ in bits)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=77, K=16, V=24, decay="position", state=True,
                                 dtype=torch.bfloat16)
    o1, s1 = decay_attn(q, k, v, a, initial_state=s0, output_final_state=True, method="chunked", backend="cpu")
    import os
    old = os.environ.get("LEET_CPU_BF16")
    os.environ["LEET_CPU_BF16"] = "0"
    try:
        o0, s0_ = decay_attn(q, k, v, a, initial_state=s0, output_final_state=True, method="chunked",
                             backend="cpu")
    finally:
        if old is None:
            del os.environ["LEET_CPU_BF16"]
        else:
            os.environ["LEET_CPU_BF16"] = old
    assert rel_err(o1, o0.double()) < 2e-2 and rel_err(s1, s0_.double()) < 2e-2
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        flags = []
    if "amx_bf16" in flags or "avx512_bf16" in flags:  # the units path ran (its rounding differs)
        assert not torch.equal(o1, o0)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's own, from mkldnn.flags
def test_mkldnn_disabled_takes_the_upcast_path():
    """torch.backends.mkldnn off: oneDNN's kernels are off, the kernel must not call them."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=40, K=16, V=24, decay="head", state=True, dtype=torch.bfloat16)
    with torch.backends.mkldnn.flags(enabled=False):
        check(q, k, v, a, s0, scale=0.25)
