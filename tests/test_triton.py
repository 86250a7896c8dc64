"""The Triton kernels (ops/triton_kernels.py) and the CUDA dispatch (ops/gpu.py),
on CPU under TRITON_INTERPRET=1, against the float64 reference.

TRITON_INTERPRET must be set before triton is first imported (triton's own
tl.zeros & co. are jitted at import). Run directly as
``TRITON_INTERPRET=1 pytest tests/test_triton.py``; in a run without it (the whole
suite, where triton may already be imported), test_interpreted_suite reruns this file
in a subprocess with it. The interpreter is slow: shapes are small and the cases are an
explicit table covering every feature at least once.
"""
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from reference import decay_attn_reference, rel_err

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

import leet_compile  # noqa: E402,F401
from leet_compile.ops import decay_attn as op_module  # noqa: E402
from leet_compile.ops import gpu  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _interpreted_only(request):
    if not INTERPRETED and request.node.originalname != "test_interpreted_suite":
        pytest.skip("runs in test_interpreted_suite's TRITON_INTERPRET=1 subprocess")


def test_interpreted_suite():
    """This file, in a fresh interpreter with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("already interpreted")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    out = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def tk():
    """ops.triton_kernels (interpreted kernels), with outputs allocated NaN-filled so
    that an element a kernel forgets to write fails the finiteness checks."""
    if not INTERPRETED:
        pytest.skip("runs in test_interpreted_suite's TRITON_INTERPRET=1 subprocess")
    from leet_compile.ops import triton_kernels as module

    assert module._INTERPRET
    alloc = module._alloc
    module._alloc = lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype)
    yield module
    module._alloc = alloc


def make_inputs(B, H, T, K, V, decay, dtype, s0, strided, seed=0, decay_scale=0.5):
    """q, k, v (permuted views of [B, T, H, *] when strided), log_decay, initial_state."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    if strided:  # the common fused-projection layout, v also non-unit last stride
        q = rnd(B, T, H, K).transpose(1, 2)
        k = rnd(B, T, H, K).transpose(1, 2)
        v = rnd(B, H, V, T).transpose(2, 3)
    else:
        q, k, v = rnd(B, H, T, K), rnd(B, H, T, K), rnd(B, H, T, V)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    if decay is None:
        a = None
    elif decay == "head":
        a = -rnd(H).abs() * decay_scale
    elif decay == "pos":
        a = rnd(B, T, H).transpose(1, 2) * decay_scale if strided else rnd(B, H, T) * decay_scale
    else:  # a constant, e.g. strong (-30) or growing (+0.3)
        a = torch.full((B, H, T), float(decay))
    state = None
    if s0:
        state = rnd(B, H, V, K).transpose(2, 3) if strided else rnd(B, H, K, V)
    return q, k, v, a, state


def tol(dtype):
    # bf16/fp16: the output is rounded to it (the interpreter's dots are fp32)
    return {torch.float32: 1e-5, torch.float16: 1e-3}.get(dtype, 8e-3)


def check_forward(tk, method, B, H, T, K, V, decay, dtype, s0, strided, **kw):
    q, k, v, a, state = make_inputs(B, H, T, K, V, decay, dtype, s0, strided, **kw)
    scale = K ** -0.5
    o, st = tk.decay_attn_fwd(q, k, v, a, scale, state, True, method)
    ro, rs = decay_attn_reference(q, k, v, a, scale, state)
    assert o.shape == (B, H, T, V) and o.dtype == dtype and o.is_contiguous()
    assert st.shape == (B, H, K, V) and st.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(st).all()  # also: every element written
    assert rel_err(o, ro) < tol(dtype), rel_err(o, ro)
    assert rel_err(st, rs) < 1e-5, rel_err(st, rs)
    o2, st2 = tk.decay_attn_fwd(q, k, v, a, scale, state, False, method)
    assert st2.numel() == 0 and torch.equal(o2, o)


F32, BF16 = torch.float32, torch.bfloat16

# (B, H, T, K, V, decay, dtype, initial state, strided)
CHUNKED_CASES = [
    (1, 2, 1, 16, 16, None, F32, False, False),
    (2, 2, 63, 48, 80, "pos", F32, True, True),
    (2, 2, 65, 80, 48, "head", F32, True, False),
    (1, 2, 130, 32, 64, None, F32, True, True),
    (1, 3, 130, 96, 40, "pos", BF16, False, True),
    (2, 1, 65, 64, 32, "head", BF16, True, True),
    (1, 2, 64, 24, 72, "pos", F32, False, False),
    (1, 1, 33, 192, 20, "head", F32, True, False),
    (1, 1, 17, 20, 256, "pos", BF16, True, False),
    (2, 2, 1, 48, 80, "pos", BF16, True, True),
    (1, 2, 63, 32, 48, None, BF16, False, False),
    (1, 2, 130, 40, 24, "head", F32, False, True),
    (1, 2, 65, 32, 32, "pos", torch.float16, True, True),
]


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_chunked_forward(tk, case):
    check_forward(tk, "chunked", *case)


RECURRENT_CASES = [
    (1, 1, 1, 16, 16, None, F32, True, False),
    (1, 2, 20, 48, 80, "pos", F32, True, True),
    (2, 1, 17, 80, 24, "head", BF16, False, True),
    (1, 1, 9, 96, 40, None, BF16, True, False),
    (2, 1, 1, 32, 48, "pos", BF16, True, True),
]


@pytest.mark.parametrize("case", RECURRENT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_recurrent_forward(tk, case):
    check_forward(tk, "recurrent", *case)


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
@pytest.mark.parametrize("decay", [-30.0, 0.3])
def test_extreme_decays(tk, method, decay):
    """Strong decay (exp(-30 t) underflows in a global cumsum; exp(+30 t) overflows) and
    growing weights: exponents relative to the chunk stay finite and exact."""
    T = 70 if method == "chunked" else 12
    check_forward(tk, method, 1, 1, T, 16, 32, decay, F32, True, False)


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_later_nonfinite_stays_out_of_earlier_outputs(tk, method, bad):
    """A NaN / inf at position j reaches outputs i >= j only (right-padded batches)."""
    T = 70
    q, k, v, a, s0 = make_inputs(1, 4, T, 16, 24, "pos", F32, True, False, seed=3)
    clean, _ = decay_attn_reference(q, k, v, a, 0.5, s0)
    where = [(v, 40), (k, 45), (q, 50), (v, 64)]
    for h, (x, t) in enumerate(where):
        x[0, h, t, 2] = bad
    o, _ = tk.decay_attn_fwd(q, k, v, a, 0.5, s0, True, method)
    for h, (_, t) in enumerate(where):
        assert torch.isfinite(o[0, h, :t]).all() and rel_err(o[0, h, :t], clean[0, h, :t]) < 1e-5


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_hard_resets_and_huge_decays(tk, method):
    """log_decay = -inf (a reset) and -1e20 among small decays; +50 growth from no state."""
    q, k, v, a, s0 = make_inputs(1, 2, 70, 16, 24, "pos", F32, True, False, seed=4)
    a[0, 0, [0, 20, 21, 40]] = float("-inf")
    a[0, 1, 33] = -1e20
    o, st = tk.decay_attn_fwd(q, k, v, a, 0.5, s0, True, method)
    ro, rs = decay_attn_reference(q, k, v, a, 0.5, s0)
    assert rel_err(o, ro) < 1e-5 and rel_err(st, rs) < 1e-5
    q, k, v, _, _ = make_inputs(1, 2, 2, 16, 16, None, F32, False, False, seed=5)
    a = torch.full((2,), 50.0)
    o, st = tk.decay_attn_fwd(q, k, v, a, 1.0, None, True, method)
    ro, rs = decay_attn_reference(q, k, v, a, 1.0, None)
    assert torch.isfinite(o).all() and rel_err(o, ro) < 1e-5 and rel_err(st, rs) < 1e-5


def test_empty_sequence(tk):
    q, k, v, a, s0 = make_inputs(1, 2, 0, 16, 24, "pos", F32, True, False)
    o, st = tk.decay_attn_fwd(q, k, v, a, 1.0, s0, True, "chunked")
    assert o.shape == (1, 2, 0, 24) and torch.equal(st, s0)


def test_mixed_dtypes(tk):
    q, k, v, a, s0 = make_inputs(1, 2, 40, 16, 24, "pos", F32, True, False)
    v = v.to(BF16)
    o, st = tk.decay_attn_fwd(q, k, v, a.to(BF16), 0.5, s0.to(BF16), True, "chunked")
    ro, rs = decay_attn_reference(q, k, v, a.to(BF16), 0.5, s0.to(BF16))
    assert o.dtype == BF16 and rel_err(o, ro) < 8e-3 and rel_err(st, rs) < 1e-5


# ---------------------------------------------------------------------------------
# Dispatch (ops/gpu.py): the CUDA kernel's logic, called with CPU tensors.


def small(dtype=F32, T=40):
    return make_inputs(1, 2, T, 16, 24, "pos", dtype, True, False)


@pytest.mark.parametrize(
    "method,backend,expected",
    [
        ("auto", "triton", ("triton", "chunked")),
        ("chunked", "triton", ("triton", "chunked")),
        ("recurrent", "triton", ("triton", "recurrent")),
        ("auto", "auto", ("triton", "chunked")),
        ("recurrent", "auto", ("triton", "recurrent")),
        ("naive", "auto", ("aten", "naive")),
        ("fleet", "aten", ("aten", "fleet")),
        ("chunked", "aten", ("aten", "chunked")),
    ],
)
def test_select(method, backend, expected):
    q, k, v, _, _ = small()
    assert gpu.select(q, k, v, method, backend) == expected


def _without_triton():
    """What "auto" picks without Triton: the C++ CUDA kernels when built (a CUDA torch
    with LEET_BUILD_CUDA), else aten."""
    return ("cuda", "chunked") if gpu.has_cuda_kernels() else ("aten", "auto")


def test_select_short_and_float64():
    q, k, v, _, _ = small(T=4)
    assert gpu.select(q, k, v, "auto", "auto") == ("triton", "recurrent")  # decoding, short T
    q, k, v, _, _ = small(torch.float64)
    # no Triton for float64: the C++ CUDA kernels where this build has them, else aten
    assert gpu.select(q, k, v, "auto", "auto") == _without_triton()
    with pytest.raises(ValueError, match="float64"):  # the contract's rule (meta: no device rules)
        op_module.check_inputs(q.to("meta"), k.to("meta"), v.to("meta"), None, None, "auto", "triton")
    q, k, v, _, _ = make_inputs(1, 2, 5, 0, 24, None, F32, False, False)
    assert gpu.select(q, k, v, "auto", "triton")[0] == "aten"  # nothing to launch


@pytest.mark.parametrize(
    "method,backend,match",
    [
        ("naive", "triton", "backend 'triton' implements methods auto, chunked, recurrent; got 'naive'"),
        ("fleet", "cuda", "backend 'cuda' implements methods auto, chunked, recurrent; got 'fleet'"),
    ],
)
def test_contract_errors_for_gpu_backends(method, backend, match):
    """What the GPU backends refuse is the contract's (csrc/contract.cpp) business, not
    select()'s: checked here on meta tensors (shapes and rules, no device)."""
    q, k, v, _, _ = small()
    with pytest.raises(ValueError, match=match):
        op_module.check_inputs(q.to("meta"), k.to("meta"), v.to("meta"), None, None, method, backend)


def test_select_without_triton(monkeypatch):
    q, k, v, _, _ = small()
    monkeypatch.setattr(gpu, "triton_available", lambda: False)
    assert gpu.select(q, k, v, "auto", "auto") == _without_triton()
    with pytest.raises(ValueError, match="pip install triton"):
        gpu.select(q, k, v, "auto", "triton")


@pytest.mark.parametrize("backend,method", [("triton", "auto"), ("auto", "recurrent"), ("aten", "fleet")])
def test_gpu_entry_point(tk, backend, method):
    """decay_attn_gpu (the op's CUDA kernel) end to end: Triton, and ATen by redispatch."""
    q, k, v, a, s0 = small(T=20)
    o, st = gpu.decay_attn_gpu(q, k, v, a, 0.5, s0, True, method, backend)
    ro, rs = decay_attn_reference(q, k, v, a, 0.5, s0)
    assert rel_err(o, ro) < 1e-5 and rel_err(st, rs) < 1e-5
    with pytest.raises(ValueError, match="unknown backend"):
        gpu.decay_attn_gpu(q, k, v, a, 0.5, s0, True, method, "tpu")


def test_registered_for_cuda():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("leet::decay_attn", "CUDA")
    # importing leet_compile does not import triton
    out = subprocess.run(
        [sys.executable, "-c", "import sys, leet_compile; print('triton' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------
# Backward: ops/decay_attn.py's _backward (three forward calls) with the Triton kernels.


def differentiable_reference(q, k, v, a, scale, s0):
    """The recurrence in float64 with autograd (reference.py's detaches its inputs)."""
    B, H, T, K = q.shape
    a = a.view(1, H, 1).expand(B, H, T) if a.dim() == 1 else a
    S, outs = s0, []
    for t in range(T):
        S = S * a[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2) * scale, S


@pytest.mark.parametrize("decay", ["pos", "head"])
def test_backward_through_triton_forward(tk, monkeypatch, decay):
    B, H, T, K, V = 1, 2, 37, 16, 24
    q, k, v, a, s0 = make_inputs(B, H, T, K, V, decay, F32, True, True, seed=1)
    scale = 0.7
    o, sf = tk.decay_attn_fwd(q, k, v, a, scale, s0, True, "chunked")
    g = torch.Generator().manual_seed(2)
    d_o, d_sf = torch.randn(B, H, T, V, generator=g), torch.randn(B, H, K, V, generator=g)

    # float64 reference gradients
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, a, s0)]
    ro, rs = differentiable_reference(*leaves[:4], scale, leaves[4])
    ref = torch.autograd.grad((ro * d_o.double()).sum() + (rs * d_sf.double()).sum(), leaves)

    calls = []

    def triton_op(q_, k_, v_, a_, scale_, s0_, ofs, method, backend):
        calls.append((method, backend))
        return tk.decay_attn_fwd(q_, k_, v_, a_, scale_, s0_, ofs, "chunked")

    monkeypatch.setattr(torch.ops.leet.decay_attn, "default", triton_op)
    ctx = types.SimpleNamespace(
        saved_tensors=(q, k, v, a, s0, sf), scale=scale, method="chunked", backend="triton",
        output_final_state=True, needs_input_grad=(True,) * 6 + (False,) * 3,
    )
    grads = op_module._backward(ctx, d_o, d_sf)
    assert len(calls) == 3
    for name, got, want in zip("q k v log_decay initial_state".split(), [grads[i] for i in (0, 1, 2, 3, 5)], ref):
        assert rel_err(got, want) < 1e-4, (name, rel_err(got, want))


# ---------------------------------------------------------------------------------
# Tracing: under FunctionalTensorMode (AOTAutograd) a CUDA call becomes its Triton
# kernel launches. Fake CUDA tensors need no GPU; the kernels must be jitted, not
# interpreted, so this runs in a fresh interpreter without TRITON_INTERPRET.

_TRACE_SCRIPT = textwrap.dedent(
    """
    import logging, torch, leet_compile
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._functorch.aot_autograd import aot_function
    logging.disable(logging.WARNING)  # no driver: Inductor's mutation analysis warns

    class Captured(Exception):
        pass

    def capture(gm, _):
        raise Captured(gm.code)

    def f(q, k, v, a, s0):
        return torch.ops.leet.decay_attn(q, k, v, a, 0.5, s0, True, METHOD, BACKEND)

    with FakeTensorMode():
        q = torch.empty(2, 3, 70, 80, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(2, 3, 70, 80, device="cuda", dtype=torch.bfloat16)
        v = torch.empty(2, 3, 70, 48, device="cuda", dtype=torch.bfloat16)
        a = torch.empty(3, device="cuda")
        s0 = torch.empty(2, 3, 80, 48, device="cuda")
        for METHOD, BACKEND in (("auto", "triton"), ("recurrent", "auto"), ("chunked", "aten")):
            try:
                aot_function(f, fw_compiler=capture)(q, k, v, a, s0)
            except Captured as e:
                code = str(e)
            print(METHOD, BACKEND, "kernel_idx" in code, "leet.decay_attn" in code)
    """
)


def test_functional_rule_decomposes_cuda_calls():
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert "auto triton True False" in lines, out.stdout
    assert "recurrent auto True False" in lines, out.stdout
    assert "chunked aten False True" in lines, out.stdout  # aten stays the op
