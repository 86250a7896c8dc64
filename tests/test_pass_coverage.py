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


# ---------------------------------------------------------------- several batch dims, per-chunk selects (issue 10)


def _segsum(x):  # Mamba2's stable segment sum over the last dim: [..., L] -> [..., L, L]
    L = x.size(-1)
    x = x[..., None].expand(*x.shape, L)
    x = x.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(-1), 0)
    return x.cumsum(-2).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -torch.inf)


def ssd_chunks(q, k, v, L=4):  # ssd_minimal's diagonal blocks: batch dims b, c (chunks), h
    B, H, T, D = q.shape
    a = -torch.nn.functional.softplus(k.sum(-1))  # [B, H, T]: negative log decays
    C, Bm, X = (x.transpose(1, 2).reshape(B, T // L, L, H, D) for x in (q, k, v))  # b c l h d
    A = a.reshape(B, H, T // L, L)  # b h c l: T split into chunks (a view of per-position data)
    Y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, Bm, torch.exp(_segsum(A)), X)
    return Y.reshape(B, T, H, D).transpose(1, 2)


def chunked_heads(q, k, v, L=4):  # a 5-D product [B, C, H, L, D] with a per-head mask: [H] decay
    B, H, T, D = q.shape
    qc, kc, vc = (x.reshape(B, H, T // L, L, D).transpose(1, 2) for x in (q, k, v))
    i, j = _pos(L)
    g = (1 - 2.0 ** (-2 - torch.arange(H, dtype=q.dtype)))[:, None, None]
    M = torch.where(i >= j, g ** (i - j).clamp(min=0).to(q.dtype), 0.0)  # [H, L, L]
    return (((qc @ kc.transpose(-1, -2)) * M) @ vc).transpose(1, 2).reshape(B, H, T, D)


def per_chunk_gamma(q, k, v, L=4):  # a decay that depends on the chunk (a graph value per chunk)
    B, H, T, D = q.shape
    qc, kc, vc = (x.reshape(B, H, T // L, L, D).transpose(1, 2) for x in (q, k, v))  # b c h l d
    gamma = torch.sigmoid(q.mean((0, 1, 3)).reshape(T // L, L).mean(-1))  # [C], in (0, 1)
    i, j = _pos(L)
    M = torch.where(i >= j, gamma[:, None, None, None] ** (i - j).clamp(min=0).to(q.dtype), 0.0)  # [C, 1, L, L]
    return (((qc @ kc.transpose(-1, -2)) * M) @ vc).transpose(1, 2).reshape(B, H, T, D)


def chunk_selects(q, k, v, BT=4):  # fla naive_chunk_simple_gla: L_mask for all chunks, selected per chunk
    B, H, T, D = q.shape
    g = torch.nn.functional.logsigmoid(k.mean(-1) + 1.0) / 4  # [B, H, T], negative
    qc, kc, vc = (x.reshape(B, H, T // BT, BT, D) for x in (q, k, v))
    decay = g.reshape(B, H, T // BT, BT).cumsum(-1)
    L_mask = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).tril().exp().tril()
    o = torch.zeros_like(vc)
    for n in range(T // BT):
        attn = qc[:, :, n] @ kc[:, :, n].transpose(-1, -2) * L_mask[:, :, n]
        o[:, :, n] = attn @ vc[:, :, n]
    return o.reshape(B, H, T, D)


CHUNKED = [(ssd_chunks, 1), (chunked_heads, 1), (per_chunk_gamma, 1), (chunk_selects, 3)]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("fn,sites", CHUNKED, ids=[f.__name__ for f, _ in CHUNKED])
def test_chunked_spelling_is_rewritten_and_matches_eager(fn, sites, dynamic):
    """Extra batch dims (Mamba2's chunks) merged into the operator's B, and per-chunk
    selects of a mask built for all chunks (fla): rewritten and equal to eager; static:
    gradients too; dynamic: inference at two lengths (one graph)."""
    if fn is chunk_selects and dynamic:
        pytest.skip("the chunk loop unrolls over T: each length is its own graph")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 4, generator=g, dtype=torch.float64, requires_grad=not dynamic)
               for _ in range(3))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="leet", dynamic=dynamic)
    with torch.set_grad_enabled(not dynamic):
        out = compiled(q, k, v)
        want = fn(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == sites, str(leet_compile.explain(fn, q, k, v))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    if dynamic:  # the same graph at another length
        q2, k2, v2 = (torch.randn(2, 3, 20, 4, generator=g, dtype=torch.float64) for _ in range(3))
        with torch.no_grad():
            torch.testing.assert_close(compiled(q2, k2, v2), fn(q2, k2, v2), rtol=1e-10, atol=1e-10)
        return
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_chunked_guarded_site_in_dynamic_training_is_rewritten():
    """A guarded rewrite (run-time sign check, torch.cond) in a training graph whose sizes
    are T // L expressions: torch.cond's backward cannot merge the strides of gradients
    holding Max(1, T // L), so the differentiable operands enter the cond 1-D (guard.py);
    the site is rewritten and the result and gradients are eager's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(ssd_chunks, backend="leet", dynamic=True)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 1
    want = ssd_chunks(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(got, torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
