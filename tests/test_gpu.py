"""decay_attn on a CUDA GPU through every backend, against the float64 reference:
forward and backward, every decay form, states, odd sizes, K != V, strided inputs,
NaN-poisoned outputs. Skipped without a GPU (CI has none); run it on a lent one:

    python -m pytest -q tests/test_gpu.py tests/test_cuda_kernels.py
"""
import pytest
import torch

import leet_compile
from reference import decay_attn_reference, make_inputs, rel_err

if not torch.cuda.is_available():  # one skip for the module, not one per case
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

BACKENDS = ["triton", "aten"] + (["cuda"] if torch._C._dispatch_has_kernel_for_dispatch_key(
    "leet::_decay_attn_cuda", "CUDA") else [])
CASES = [(T, K, V) for T in (1, 63, 65, 1000) for K, V in ((64, 64), (80, 48), (128, 256))]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("LEET_POISON_OUTPUTS", "1")


def to_cuda(*xs):
    return [None if x is None else x.cuda() for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["chunked", "recurrent"])
@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("T,K,V", CASES)
def test_forward(backend, method, decay, T, K, V):
    q, k, v, a, s0 = make_inputs(B=2, H=3, T=T, K=K, V=V, decay=decay, state=True, strided=True)
    o, sf = leet_compile.decay_attn(*to_cuda(q, k, v, a), scale=0.5, initial_state=s0.cuda(),
                                    output_final_state=True, method=method, backend=backend)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, 0.5, s0)
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert rel_err(o, o_ref) < 1e-4 and rel_err(sf, s_ref) < 1e-4  # tf32-free fp32 expected ~1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_bf16_error_at_most_twice_naive(backend, decay):
    q, k, v, a, _ = make_inputs(B=2, H=4, T=1000, K=128, V=128, decay=decay, dtype=torch.bfloat16)
    o = leet_compile.decay_attn(*to_cuda(q, k, v, a), scale=1.0, backend=backend)
    o_ref, _ = decay_attn_reference(q, k, v, a)
    A = torch.zeros(2, 4, 1000, dtype=torch.float64) if a is None else (
        a.double().view(1, 4, 1).expand(2, 4, 1000) if a.dim() == 1 else a.double())
    A = A.cumsum(-1)
    mask = torch.exp((A[..., :, None] - A[..., None, :]).masked_fill(
        torch.ones(1000, 1000, dtype=torch.bool).triu(1), float("-inf")))
    qc, kc, vc = to_cuda(q, k, v)
    naive = ((qc @ kc.transpose(-1, -2)) * mask.to(torch.bfloat16).cuda()) @ vc
    assert rel_err(o, o_ref) <= 2 * rel_err(naive, o_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_backward(backend, decay):
    q, k, v, a, s0 = make_inputs(B=2, H=2, T=130, K=64, V=48, decay=decay, state=True)
    leaves = [x.cuda().requires_grad_(True) for x in (q, k, v, a, s0) if x is not None]
    it = iter(leaves)
    qc, kc, vc = next(it), next(it), next(it)
    ac = next(it) if a is not None else None
    sc = next(it)
    o, sf = leet_compile.decay_attn(qc, kc, vc, ac, initial_state=sc, output_final_state=True, backend=backend)
    go, gs = torch.randn_like(o), torch.randn_like(sf)
    grads = torch.autograd.grad((o * go).sum() + (sf * gs).sum(), leaves)
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in leaves]
    it = iter(ref_leaves)
    rq, rk, rv = next(it), next(it), next(it)
    ra = next(it) if a is not None else None
    rs = next(it)
    ro, rsf = leet_compile.decay_attn(rq, rk, rv, ra, initial_state=rs, output_final_state=True,
                                      method="recurrent", backend="aten")
    ref = torch.autograd.grad((ro * go.cpu().double()).sum() + (rsf * gs.cpu().double()).sum(), ref_leaves)
    for name, g, r in zip("q k v log_decay initial_state".split(), grads, ref):
        assert rel_err(g, r) < 1e-4, name


def test_compile_sees_triton_kernels():
    """Under torch.compile the Triton path is traced into its kernels (no opaque op)."""
    from torch._inductor.utils import run_and_get_code

    q, k, v, a, _ = to_cuda(*make_inputs(B=1, H=2, T=256, K=64, V=64, decay="head"))
    f = torch.compile(lambda q, k, v, a: leet_compile.decay_attn(q, k, v, a, scale=1.0, backend="triton"), fullgraph=True)
    out, code = run_and_get_code(f, q, k, v, a)
    assert "chunked_fwd_kernel" in "\n".join(code)
    assert rel_err(out, decay_attn_reference(q, k, v, a)[0]) < 1e-4
