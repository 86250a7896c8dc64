"""Spellings the pass understands since the prover was rebuilt (issue 10): each must be
rewritten and equal eager, statically and with dynamic shapes; and the run-time checks
(guarded rewrites) must fall back to the original computation when they fail."""
import pytest
import torch
from torch._dynamo.utils import counters

import leet_compile


def _pos(T):
    n = torch.arange(T)
    return n[:, None], n[None, :]


def retnet_decay(T, gamma=0.9, dtype=torch.float64):
    i, j = _pos(T)
    return torch.where(i >= j, gamma ** (i - j).clamp(min=0).to(dtype), 0.0)


def inplace_fill(q, k, v):  # yet-another-retnet: in-place writes on freshly built tensors
    T = q.shape[-2]
    i, j = _pos(T)
    D = 0.9 ** (i - j).abs().to(q.dtype)
    future = torch.ones_like(D, dtype=torch.bool).triu_(1)
    D.masked_fill_(future, 0)
    s = q @ k.transpose(-1, -2)
    s *= D
    return s @ v


def three_operand_einsum(q, k, v):  # fla naive_retention: the mask as an einsum operand
    T = q.shape[-2]
    s = torch.einsum("bhqd,bhkd,qk->bhqk", q, k, retnet_decay(T, dtype=q.dtype))
    return torch.einsum("bhqk,bhkd->bhqd", s, v)


def constant_ramp(q, k, v):  # q.new_tensor(range(T)): a constant tensor holding arange
    n = q.new_tensor(range(q.shape[-2]))
    D = torch.exp((n[:, None] - n[None, :]) * -0.1) * (n[:, None] >= n[None, :])
    return ((q @ k.transpose(-1, -2)) * D) @ v


def meshgrid_positions(q, k, v):
    n = torch.arange(q.shape[-2])
    i, j = torch.meshgrid(n, n, indexing="ij")
    D = torch.where(i >= j, 0.8 ** (i - j).clamp(min=0).to(q.dtype), 0.0)
    return ((q @ k.transpose(-1, -2)) * D) @ v


def transposed_product(q, k, v):  # (v^T P^T)^T, with .mT
    P = (q @ k.mT) * retnet_decay(q.shape[-2], dtype=q.dtype)
    return (v.mT @ P.mT).mT


def tensor_scale(q, k, v):  # a 0-d tensor scale on the mask
    D = retnet_decay(q.shape[-2], dtype=q.dtype) * torch.tensor(0.5, dtype=q.dtype)
    return ((q @ k.transpose(-1, -2)) * D) @ v


def extra_leading_dim(q, k, v):  # a mask with a size-1 leading dim: a 5-D product
    D = retnet_decay(q.shape[-2], dtype=q.dtype)[None, None, None]
    return (((q @ k.transpose(-1, -2))[None] * D) @ v[None])[0]


def heads_after_time(q, k, v):  # Mamba2 / fla layout [B, T, H, D]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", qt, kt) * retnet_decay(q.shape[-2], dtype=q.dtype)
    return torch.einsum("bhij,bjhd->bihd", s, vt).transpose(1, 2)


def repeated_per_head(q, k, v):  # repeat (of size-1 and new dims only) instead of expand
    i, j = _pos(q.shape[-2])
    d = (i - j).repeat(q.shape[1], 1, 1)
    D = torch.where(d >= 0, 0.9 ** d.clamp(min=0).to(q.dtype), 0.0)
    return ((q @ k.transpose(-1, -2)) * D) @ v


SPELLINGS = [inplace_fill, three_operand_einsum, constant_ramp, meshgrid_positions, transposed_product,
             tensor_scale, extra_leading_dim, heads_after_time, repeated_per_head]


def test_repeat_that_tiles_positions_is_left_alone():
    """repeat(1, 2) of a [T, T] mask tiles the key positions: the index wraps around."""
    def fn(q, k, v):
        T = q.shape[-2]
        D = torch.ones(T, T // 2, dtype=q.dtype).tril().repeat(1, 2)
        return ((q @ k.transpose(-1, -2)) * D) @ v

    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    torch._dynamo.reset()
    counters.clear()
    torch.testing.assert_close(torch.compile(fn, backend="leet")(q, k, v), fn(q, k, v))
    assert counters["leet"]["decay_attn_rewrites"] == 0


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("fn", SPELLINGS, ids=[f.__name__ for f in SPELLINGS])
def test_spelling_is_rewritten_and_matches_eager(fn, dynamic):
    if fn is constant_ramp and dynamic:
        pytest.skip("a constant tensor of length T specialises T")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64) for _ in range(3))
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(fn, backend="leet", dynamic=dynamic)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 1, str(leet_compile.explain(fn, q, k, v))
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-10, atol=1e-10)


class Buffered(torch.nn.Module):
    """gamma ** (i - j) with gamma a buffer: rewritten under the checks gamma > 0 and
    log(gamma) <= 0; any other gamma runs the original computation."""

    def __init__(self, gamma):
        super().__init__()
        self.register_buffer("gamma", gamma)

    def forward(self, q, k, v):
        i, j = _pos(q.shape[-2])
        D = torch.where(i >= j, self.gamma[:, None, None] ** (i - j).clamp(min=0).to(q.dtype), 0.0)
        return ((q @ k.transpose(-1, -2)) * D) @ v


@pytest.mark.parametrize("gamma", [[0.9, 0.5, 0.99], [0.9, 0.0, 0.5], [0.9, -0.5, 0.5], [1.1, 0.5, 0.9]],
                         ids=["decay", "zero", "negative", "growing"])
def test_guarded_rewrite_falls_back_when_a_check_fails(gamma):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 3, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    model = Buffered(torch.tensor([0.9, 0.5, 0.99], dtype=torch.float64))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="leet")
    compiled(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 1
    model.gamma.copy_(torch.tensor(gamma, dtype=torch.float64))  # the same compiled graph
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-10, atol=1e-10, equal_nan=True)
    report = leet_compile.explain(model, q, k, v)
    assert "checked at run time" in report.rewrites[0].decay


def test_symbolic_length_is_asserted():
    """With a dynamic length the proof covers T <= 2**24 and the graph asserts it."""
    from leet_compile.backend import trace_to_aten
    from leet_compile.passes import rewrite_decay_attention

    graphs = []

    def capture(gm, example_inputs):
        aten_gm = trace_to_aten(gm, example_inputs)
        rewrite_decay_attention(aten_gm)
        graphs.append(aten_gm)
        return aten_gm

    fn = SPELLINGS[-1]
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=torch.float64) for _ in range(3))
    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=True)(q, k, v)
    code = graphs[0].print_readable(print_output=False)  # the op may sit in a guarded branch
    assert "leet.decay_attn" in code and "_assert_scalar" in code and str(2 ** 24) in code
