"""The decoding steps torch.ops.leet.decay_attn_step / decay_attn_step_ (issue 6):
against the float64 reference, prefill + steps == the whole sequence, chunked
prefill == one-shot prefill, in-place without reallocation, argument errors on the
eager and fake paths, opcheck, autograd, and torch.compile without graph breaks."""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import leet_compile
from reference import decay_attn_reference, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand_step(B, H, K, V, decay, dtype=torch.float32, seed=0):
    """q, k, v for one token, a log decay (None, [H] or [B, H]) and a float32 state."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, K, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, V, generator=g).to(dtype)
    a = {None: None, "head": -torch.rand(H, generator=g) * 0.3,
         "batch_head": -torch.rand(B, H, generator=g) * 0.3}[decay]
    state = torch.randn(B, H, K, V, generator=g)
    return q, k, v, a, state


def step_reference(q, k, v, a, state, scale):
    """One step through the float64 reference: a sequence of length 1."""
    a_seq = None if a is None else (a if a.dim() == 1 else a.unsqueeze(-1))
    o, s = decay_attn_reference(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), a_seq, scale, state)
    return o.squeeze(2), s


# (B, H, K, V): odd sizes, K != V, a single head, a single feature
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 2, 16, 9), (1, 4, 33, 17)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay", [None, "head", "batch_head"])
def test_step_matches_reference(shape, decay):
    q, k, v, a, state = rand_step(*shape, decay)
    o_ref, s_ref = step_reference(q, k, v, a, state, 0.7)
    o, s = leet_compile.decay_attn_step(q, k, v, a, state, scale=0.7)
    assert o.shape == v.shape and o.dtype == v.dtype and o.is_contiguous()
    assert s.shape == state.shape and s.dtype == torch.float32 and s.is_contiguous()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    # the functional step leaves its state alone; the in-place one agrees with it
    before = state.clone()
    o2 = leet_compile.decay_attn_step_(q, k, v, a, state, scale=0.7)
    assert torch.equal(o2, o) and torch.equal(state, s) and not torch.equal(state, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_step_dtypes(dtype):
    q, k, v, a, state = rand_step(2, 3, 8, 6, "head", dtype)
    if dtype == torch.float64:
        state = state.double()
    o_ref, s_ref = step_reference(q, k, v, a, state, 1.0)
    o, s = leet_compile.decay_attn_step(q, k, v, a, state, scale=1.0)
    assert o.dtype == dtype and s.dtype == state.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-2  # 16-bit: the output rounding
    assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < max(tol, 1e-6)


def test_default_state_is_zeros():
    q, k, v, a, _ = rand_step(2, 3, 4, 5, "head")
    o, s = leet_compile.decay_attn_step(q, k, v, a, scale=1.0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, k.unsqueeze(-1) * v.unsqueeze(-2))
    torch.testing.assert_close(o, torch.einsum("bhk,bhkv->bhv", q, s))


def sequence(B, H, T, K, V, decay, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g).to(dtype)
    a = {None: None, "head": -torch.rand(H, generator=g) * 0.2,
         "position": -torch.rand(B, H, T, generator=g) * 0.5}[decay]
    return q, k, v, a


def token_decay(a, t):
    """The log decay of position t for a step: None and [H] stay, [B, H, T] gives [B, H]."""
    return a if a is None or a.dim() == 1 else a[:, :, t]


def prompt_decay(a, T0):
    return None if a is None else (a if a.dim() == 1 else a[:, :, :T0])


@pytest.mark.parametrize("decay", [None, "head", "position"])
@pytest.mark.parametrize("inplace", [False, True])
def test_prefill_then_steps_equals_full_sequence(decay, inplace):
    B, H, T0, T, K, V, scale = 2, 3, 37, 50, 12, 10, 0.3
    q, k, v, a = sequence(B, H, T, K, V, decay)
    o_ref, s_ref = decay_attn_reference(q, k, v, a, scale)
    o_full = leet_compile.decay_attn(q, k, v, a, scale=scale)

    o0, state = leet_compile.decay_attn(
        q[:, :, :T0], k[:, :, :T0], v[:, :, :T0], prompt_decay(a, T0), scale=scale, output_final_state=True
    )
    outs = [o0]
    for t in range(T0, T):
        at = token_decay(a, t)
        if inplace:
            outs.append(leet_compile.decay_attn_step_(q[:, :, t], k[:, :, t], v[:, :, t], at, state, scale=scale).unsqueeze(2))
        else:
            o_t, state = leet_compile.decay_attn_step(q[:, :, t], k[:, :, t], v[:, :, t], at, state, scale=scale)
            outs.append(o_t.unsqueeze(2))
    o = torch.cat(outs, 2)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(state, s_ref) < 1e-5
    assert rel_err(o[:, :, T0:], o_full[:, :, T0:]) < 1e-5


def test_prefill_then_steps_bf16():
    B, H, T0, T, K, V = 1, 2, 20, 30, 16, 16
    q, k, v, a = sequence(B, H, T, K, V, "position", torch.bfloat16)
    o_ref, _ = decay_attn_reference(q, k, v, a)
    _, state = leet_compile.decay_attn(q[:, :, :T0], k[:, :, :T0], v[:, :, :T0], a[:, :, :T0], scale=1.0,
                                   output_final_state=True)
    for t in range(T0, T):
        o_t = leet_compile.decay_attn_step_(q[:, :, t], k[:, :, t], v[:, :, t], a[:, :, t], state, scale=1.0)
        assert o_t.dtype == torch.bfloat16
        assert rel_err(o_t, o_ref[:, :, t]) < 1e-2


@pytest.mark.parametrize("decay", [None, "head", "position"])
def test_chunked_prefill_equals_one_shot(decay):
    B, H, T, K, V = 2, 2, 203, 8, 11
    q, k, v, a = sequence(B, H, T, K, V, decay)
    o_one, s_one = leet_compile.decay_attn(q, k, v, a, scale=1.0, output_final_state=True)
    state, outs = None, []
    for lo, hi in [(0, 64), (64, 65), (65, 150), (150, 203)]:  # odd and single-token pieces
        a_piece = None if a is None else (a if a.dim() == 1 else a[:, :, lo:hi])
        o, state = leet_compile.decay_attn(
            q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], a_piece, scale=1.0, initial_state=state,
            output_final_state=True
        )
        outs.append(o)
    assert rel_err(torch.cat(outs, 2), o_one) < 1e-5 and rel_err(state, s_one) < 1e-5
    o_ref, s_ref = decay_attn_reference(q, k, v, a)
    assert rel_err(torch.cat(outs, 2), o_ref) < 1e-5 and rel_err(state, s_ref) < 1e-5


def test_inplace_does_not_reallocate():
    q, k, v, a, state = rand_step(2, 3, 8, 5, "batch_head")
    o_f, s_f = leet_compile.decay_attn_step(q, k, v, a, state)
    ptr, version = state.data_ptr(), state._version
    o = leet_compile.decay_attn_step_(q, k, v, a, state)
    assert state.data_ptr() == ptr and state._version > version  # mutated, visibly to autograd
    assert torch.equal(o, o_f) and torch.equal(state, s_f)
    for _ in range(3):
        leet_compile.decay_attn_step_(q, k, v, a, state)
        assert state.data_ptr() == ptr


def test_inplace_refuses_autograd():
    """The in-place step has no derivative: a clear error instead of silent wrong grads."""
    q, k, v, a, state = rand_step(1, 2, 3, 4, "head")
    state = state.requires_grad_().clone()
    with pytest.raises(RuntimeError, match="decay_attn_step_: the in-place step does not support autograd"):
        leet_compile.decay_attn_step_(q, k, v, a, state)
    with torch.no_grad():
        leet_compile.decay_attn_step_(q, k, v, a, state)


def test_inplace_strided_state_view():
    """The state may be a view into a larger cache (a slot of a [L, B, H, K, V] buffer
    with padded V): only that view changes, in place."""
    B, H, K, V = 2, 3, 4, 5
    q, k, v, a, _ = rand_step(B, H, K, V, "head")
    cache = torch.randn(2, B, H, K, V + 3)
    state = cache[1, ..., :V]
    assert not state.is_contiguous()
    before = cache.clone()
    o_ref, s_ref = leet_compile.decay_attn_step(q, k, v, a, state.clone())
    o = leet_compile.decay_attn_step_(q, k, v, a, state)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(cache[1, ..., :V], s_ref)
    assert torch.equal(cache[0], before[0]) and torch.equal(cache[1, ..., V:], before[1, ..., V:])


# (arguments changed from good ones, exception type, message fragment)
BAD = [
    (dict(q=torch.randn(2, 3, 1, 4)), ValueError, r"q must be a 3-D tensor \[B, H, K\]"),
    (dict(v=torch.randn(2, 3)), ValueError, r"v must be a 3-D tensor \[B, H, V\]"),
    (dict(k=torch.randn(2, 3, 5)), ValueError, r"k must have the shape of q \[B, H, K\]"),
    (dict(v=torch.randn(2, 4, 6)), ValueError, r"v must have shape \[B, H, V\]"),
    (dict(state=torch.randn(2, 3, 4, 5)), ValueError, r"state must have shape \[B, H, K, V\] = \[2, 3, 4, 6\]"),
    (dict(state=torch.randn(2, 3, 4, 6).bfloat16()), TypeError, r"state must be float32"),
    (dict(q=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, r"q must be a floating-point tensor"),
    (dict(log_decay=torch.zeros(3, 1)), ValueError, r"log_decay must have shape \[H\] = \[3\] or \[B, H\] = \[2, 3\]"),
    (dict(log_decay=torch.zeros(2, 3, 1)), ValueError, r"log_decay must have shape \[H\]"),
]


@pytest.mark.parametrize("op_name", ["decay_attn_step", "decay_attn_step_"])
@pytest.mark.parametrize("bad, exc, msg", BAD)
def test_argument_errors_eager_and_fake(op_name, bad, exc, msg):
    args = dict(q=torch.randn(2, 3, 4), k=torch.randn(2, 3, 4), v=torch.randn(2, 3, 6),
                log_decay=torch.zeros(3), state=torch.zeros(2, 3, 4, 6))
    args.update(bad)
    op = getattr(torch.ops.leet, op_name)
    call = list(args.values())
    with pytest.raises(exc, match=f"{op_name}: {msg}"):
        op(*call)
    with FakeTensorMode() as mode, pytest.raises(exc, match=f"{op_name}: {msg}"):
        op(*[mode.from_tensor(t) for t in call])


def test_opcheck_functional():
    for decay in [None, "head", "batch_head"]:
        q, k, v, a, state = rand_step(2, 3, 5, 7, decay, torch.float64)
        args = [t if t is None else t.double().requires_grad_() for t in (q, k, v, a, state)]
        torch.library.opcheck(torch.ops.leet.decay_attn_step.default, (*args, 0.5))
        torch.library.opcheck(torch.ops.leet.decay_attn_step.default, (q, k, v, a, state, 0.5))


def test_opcheck_inplace():
    for decay in [None, "head", "batch_head"]:
        q, k, v, a, state = rand_step(2, 3, 5, 7, decay, torch.bfloat16)
        # the autograd-registration check needs an input that requires grad: not
        # meaningful for an in-place inference op on a state buffer
        torch.library.opcheck(
            torch.ops.leet.decay_attn_step_.default, (q, k, v, a, state, 0.5),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@pytest.mark.parametrize("decay", [None, "head", "batch_head"])
def test_gradcheck(decay):
    q, k, v, a, state = rand_step(2, 3, 4, 3, decay, torch.float64)
    args = [t if t is None else t.double().requires_grad_() for t in (q, k, v, a, state)]
    fn = lambda *xs: torch.ops.leet.decay_attn_step(*xs, 0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_gradient_through_prefill_and_steps():
    """Gradients through prefill + steps equal those of the full operator."""
    B, H, T0, T, K, V = 1, 2, 9, 13, 4, 5
    q, k, v, a = sequence(B, H, T, K, V, "position", torch.float64)
    for t in (q, k, v, a):
        t.requires_grad_()
    o_full = leet_compile.decay_attn(q, k, v, a, method="recurrent")
    o0, state = leet_compile.decay_attn(q[:, :, :T0], k[:, :, :T0], v[:, :, :T0], a[:, :, :T0],
                                        method="recurrent", output_final_state=True)
    outs = [o0]
    for t in range(T0, T):
        o_t, state = leet_compile.decay_attn_step(q[:, :, t], k[:, :, t], v[:, :, t], a[:, :, t], state)
        outs.append(o_t.unsqueeze(2))
    w = torch.randn_like(o_full)
    g_full = torch.autograd.grad((o_full * w).sum(), (q, k, v, a))
    g_step = torch.autograd.grad((torch.cat(outs, 2) * w).sum(), (q, k, v, a))
    for x, y in zip(g_step, g_full):
        torch.testing.assert_close(x, y)


def test_compiled_decode_loop_has_no_graph_break():
    """A decode loop (both variants) compiles to one graph: no host sync, no break."""
    torch._dynamo.reset()
    q, k, v, a, state = rand_step(2, 3, 8, 8, "batch_head")

    def loop(q, k, v, a, state, n: int = 4):
        outs = []
        for _ in range(n):
            o, state = torch.ops.leet.decay_attn_step(q, k, v, a, state, 0.5)
            outs.append(o)
            outs.append(torch.ops.leet.decay_attn_step_(q, k, v, a, state, 0.5))
        return torch.stack(outs), state

    expected = loop(q, k, v, a, state.clone())
    got = torch.compile(loop, backend="aot_eager", fullgraph=True)(q, k, v, a, state.clone())
    torch.testing.assert_close(got, expected)


def test_generate_example_runs():
    """examples/generate.py: eager and compiled decoding give the quadratic reference's tokens."""
    cmd = [sys.executable, os.path.join(ROOT, "examples", "generate.py"), "--tokens", "6", "--prompt-len", "12",
           "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens match the quadratic reference" in result.stdout, result.stdout
