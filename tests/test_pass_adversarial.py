"""Adversarial spellings for the decay-attention pass: models that look like decay
attention but are not (or only with a twist).  Each one was a false rewrite, a crash,
or a suspicious corner; the pass must either leave it alone (with the reason) or
rewrite it into something equal to eager.

Every case is checked against eager on float64 (float32/bf16 where the dtype is the
point) inputs, with the model and inputs copied (some models mutate them)."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from leet_compile.passes import rewrite_decay_attention

sys.path.insert(0, os.path.dirname(__file__))
from _decay_models import Fn, idx, retnet_gamma  # noqa: E402
from test_pass import rewritten  # noqa: E402


def S(q, k):
    return q @ k.transpose(-1, -2)


def tril(T, dtype=torch.float64):
    return torch.ones(T, T, dtype=dtype).tril()


def qkv(B=2, H=4, T=24, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3)]


def L_causal(seg):
    T = seg.shape[-1]
    return torch.exp(seg.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf))


# ---------------------------------------------------------------- dtype semantics


def bool_add(m, q, k, v):  # True + True is True in torch (was: scale 2)
    i, j = idx(q.shape[2])
    return (S(q, k) * ((i >= j) + (j <= i))) @ v


def uint8_positions(m, q, k, v):  # j > i wraps to a large positive distance
    n = torch.arange(q.shape[2], dtype=torch.uint8)
    d = n[:, None] - n[None, :]
    return (S(q, k) * torch.where(d >= 0, m.gamma[:, None, None] ** d.double(), 0.0)) @ v


def bf16_positions(m, q, k, v):  # beyond 256, i > j rounds to i == j
    n = torch.arange(q.shape[2]).to(torch.bfloat16)
    return (S(q, k) * torch.where(n[:, None] >= n[None, :], 1.0, 0.0).to(q.dtype)) @ v


def int_pow_overflow(m, q, k, v):  # 3 ** d in int64 wraps at d = 40
    i, j = idx(q.shape[2])
    return (S(q, k) * torch.where(i >= j, 3 ** (i - j).clamp(min=0), 0)) @ v


def int_fill_truncates(m, q, k, v):  # full(0.5, dtype=int64) holds 0 (was: scale 0.5)
    return (S(q, k) * (tril(q.shape[2]) * torch.full((), 0.5, dtype=torch.int64))) @ v


def uint8_scale_wraps(m, q, k, v):  # 300 is 44 in uint8
    return (S(q, k) * (torch.ones(q.shape[2], q.shape[2], dtype=torch.uint8).tril() * 100 * 3)) @ v


def fp16_scale_overflows(m, q, k, v):  # 70000 is inf in fp16
    M = torch.ones(q.shape[2], q.shape[2], dtype=torch.float16).tril() * 70000.0
    return (S(q, k) * M.to(q.dtype)) @ v


def bf16_distance(m, q, k, v):  # distances in bf16 round beyond 256: eager's weights differ
    i, j = idx(q.shape[2])
    d = (i - j).to(torch.bfloat16)
    D = torch.where(d >= 0, torch.exp(-0.05 * d.clamp(min=0).float()), 0.0)
    return (S(q, k) * D.to(q.dtype)) @ v


# ---------------------------------------------------------------- float rounding at a boundary


def scaled_positions(m, q, k, v):  # (0.1 i - 0.1 j + 0.1) * 10 > 0 is not i >= j in fp32
    p = torch.arange(q.shape[2], dtype=torch.float32)
    return (S(q, k) * ((p[:, None] * 0.1 - p[None, :] * 0.1 + 0.1) * 10 > 0).to(q.dtype)) @ v


def normalized_positions(m, q, k, v):  # p_i + 1/T > p_j with p = arange / T
    T = q.shape[2]
    p = torch.arange(T, dtype=torch.float32) / T
    return (S(q, k) * (p[:, None] + 1.0 / T > p[None, :]).to(q.dtype)) @ v


# ---------------------------------------------------------------- inf * 0 in the kept region


def factorized_segsum(m, q, k, v):  # exp(C_i) * exp(-C_j): inf * 0 = nan in eager
    c = (-4 * F.softplus(q.sum(-1))).cumsum(-1)
    T = c.shape[-1]
    L = torch.exp(c)[..., :, None] * torch.exp(-c)[..., None, :]
    return (S(q, k) * L.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0)) @ v


def exp_times_exp(m, q, k, v):  # exp(3d) * exp(-3.1d) overflows times underflows
    i, j = idx(q.shape[2])
    D = torch.where(i >= j, torch.exp(3.0 * (i - j)) * torch.exp(-3.1 * (i - j)), 0.0)
    return (S(q, k) * D) @ v


def nan_fix_of_another_tensor(m, q, k, v):  # where(isnan(X), 0, Y) keeps Y's nan
    i, j = idx(q.shape[2])
    X = torch.exp(1.0 * (j - i)) * (i >= j)  # 0 * inf only far above the diagonal (not at T=24)
    Y = torch.exp(100.0 * (j - i)) * (i >= j)  # 0 * inf from j - i = 8 on
    return (S(q, k) * torch.where(torch.isnan(X), 0.0, Y)) @ v


# ---------------------------------------------------------------- in-place mutation


def q_mutated(m, q, k, v):  # the operator would read q after the write
    i, j = idx(q.shape[2])
    s = S(q, k)
    q.mul_(2.0)
    return (s * (i >= j)) @ v


def k_mutated(m, q, k, v):
    i, j = idx(q.shape[2])
    s = q @ k.transpose(-1, -2)
    k.add_(1.0)
    return (s * (i >= j)) @ v


def gamma_mutated(m, q, k, v):  # log_decay would be read from the halved buffer
    i, j = idx(q.shape[2])
    D = (m.gamma[:, None, None] ** (i - j)).masked_fill(j > i, 0)
    m.gamma.mul_(0.5)
    return (S(q, k) * D) @ v


def log_decay_mutated(m, q, k, v):  # written after its cumsum: later reads see the new value only
    A = -F.softplus(q.sum(-1))
    c = torch.cumsum(A, -1)
    L = L_causal(c[..., :, None] - c[..., None, :])
    A.mul_(3.0)
    return (S(q, k) * L) @ v


def mask_written_through_split(m, q, k, v):  # split / unbind / chunk give views too
    M = tril(q.shape[2])
    M.split(1, dim=0)[0].fill_(5.0)
    return (S(q, k) * M) @ v


def mask_written_through_unbind(m, q, k, v):
    M = tril(q.shape[2])
    M.unbind(0)[0].fill_(5.0)
    return (S(q, k) * M) @ v


def mask_written_through_chunk(m, q, k, v):
    M = tril(q.shape[2])
    M.chunk(2, dim=0)[0].fill_(5.0)
    return (S(q, k) * M) @ v


# ---------------------------------------------------------------- einsum letters and layouts


def einsum_letter_collision(m, q, k, v):  # Z is summed; it must not be taken as an ellipsis dim
    s = torch.einsum("...id,Zjd->...ij", q, k[:, 0])
    return torch.einsum("...ij,...jd->...id", s * tril(q.shape[2]), v)


def einsum_implicit_output(m, q, k, v):  # implicit output: ellipsis dims first
    return torch.einsum("...ij,...jd", S(q, k) * tril(q.shape[2]), v)


def einsum_ellipsis_broadcast(m, q, k, v):  # the ellipsis is 1 dim in q, 2 in k
    s = torch.einsum("...id,...jd->...ij", q[1], k)
    return (s * tril(q.shape[2])) @ v


def k_not_transposed(m, q, k, v):  # q @ k with D == T: a different, but exact, contraction
    return ((q @ k) * tril(q.shape[2])) @ v


def head_major_mask_on_batch_major_scores(m, q, k, v):  # eager's (odd) math, kept exactly
    B, H, T, D = q.shape
    q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
    i, j = idx(T)
    dec = (m.gamma[:, None, None] ** (i - j)).masked_fill(j > i, 0)
    dec = dec[:, None].expand(H, B, T, T).reshape(B * H, T, T)
    return torch.bmm(torch.bmm(q3, k3.transpose(1, 2)) * dec, v3)


# ---------------------------------------------------------------- cumsum keys (were compile crashes)


def cumsum_then_prefix(m, q, k, v):  # log_decay is A2[..., :T]
    A = -F.softplus(q.sum(-1))
    T = A.shape[-1]
    c = torch.cumsum(torch.cat([A, A[..., :3]], -1), -1)[..., :T]
    return (S(q, k) * L_causal(c[..., :, None] - c[..., None, :])) @ v


def cumsum_of_a_square_tensor(m, q, k, v):
    A = -F.softplus(q.sum(-1))
    T = A.shape[-1]
    C = A[..., :, None].expand(*A.shape, T).cumsum(-2)
    return (S(q, k) * L_causal(C - C.transpose(-1, -2))) @ v


G = retnet_gamma().double()
SQ = dict(B=2, H=4, T=8, D=8)  # D == T
# (name, fn, buffers, qkv kwargs, expected: "rewrite" or a reason substring of the near miss)
CASES = [
    ("bool_add", bool_add, {}, {}, "rewrite"),
    ("uint8_positions", uint8_positions, {"gamma": G}, {}, "torch.uint8"),
    ("bf16_positions", bf16_positions, {}, dict(B=1, H=2, T=300, D=4), "256 in bfloat16"),
    ("int_pow_overflow", int_pow_overflow, {}, dict(T=48), "torch.int64"),
    ("int_fill_truncates", int_fill_truncates, {}, {}, ""),
    ("uint8_scale_wraps", uint8_scale_wraps, {}, {}, "torch.uint8"),
    ("fp16_scale_overflows", fp16_scale_overflows, {}, {}, "inf"),
    ("bf16_distance", bf16_distance, {}, dict(B=1, H=2, T=300, D=4), "256 in bfloat16"),  # distances > 256 round
    ("scaled_positions", scaled_positions, {}, {}, "non-integer factors"),
    ("normalized_positions", normalized_positions, {}, {}, "non-integer factors"),
    ("factorized_segsum", factorized_segsum, {}, {}, "overflow and underflow"),
    ("exp_times_exp", exp_times_exp, {}, dict(T=400, B=1, H=1, D=4), "overflow and underflow"),
    ("nan_fix_of_another_tensor", nan_fix_of_another_tensor, {}, {}, "0 * inf"),
    ("q_mutated", q_mutated, {}, {}, "mutated in place"),
    ("k_mutated", k_mutated, {}, {}, "mutated in place"),
    ("gamma_mutated", gamma_mutated, {"gamma": G}, {}, "mutated in place"),
    ("log_decay_mutated", log_decay_mutated, {}, {}, "rewrite"),  # a fresh tensor: made out of place
    ("mask_written_through_split", mask_written_through_split, {}, {}, "mutated in place"),
    ("mask_written_through_unbind", mask_written_through_unbind, {}, {}, "mutated in place"),
    ("mask_written_through_chunk", mask_written_through_chunk, {}, {}, "mutated in place"),
    ("einsum_letter_collision", einsum_letter_collision, {}, {}, "summed"),
    ("einsum_implicit_output", einsum_implicit_output, {}, {}, "rewrite"),
    ("einsum_ellipsis_broadcast", einsum_ellipsis_broadcast, {}, {}, "rewrite"),
    ("k_not_transposed", k_not_transposed, {}, SQ, "rewrite"),
    ("head_major_mask", head_major_mask_on_batch_major_scores, {"gamma": G}, {}, "rewrite"),
    ("cumsum_then_prefix", cumsum_then_prefix, {}, {}, "rewrite"),
    ("cumsum_of_a_square_tensor", cumsum_of_a_square_tensor, {}, {}, ""),
]


def _check(model, inputs, expected, reports, out):
    ref = copy.deepcopy(model)(*[x.clone() for x in inputs])
    rewrites = [s for r in reports for s in r.rewrites]
    misses = [s.reason for r in reports for s in r.near_misses]
    if expected == "rewrite":
        assert len(rewrites) == 1, misses
    else:
        assert not rewrites, [s.decay for s in rewrites]
        assert any(expected in m for m in misses), misses
    tol = 1e-6 if ref.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=tol, atol=tol)


@pytest.mark.parametrize("name,fn,buffers,shape,expected", CASES, ids=[c[0] for c in CASES])
def test_adversarial(name, fn, buffers, shape, expected):
    model = Fn(fn, **{k: t.clone() for k, t in buffers.items()})
    dtype = torch.float32 if shape.get("T", 24) >= 300 else torch.float64
    inputs = qkv(**shape, dtype=dtype)
    out, reports = rewritten(copy.deepcopy(model), *[x.clone() for x in inputs])
    _check(model, inputs, expected, reports, out)


@pytest.mark.parametrize("name", ["bool_add", "q_mutated", "gamma_mutated", "mask_written_through_split",
                                  "uint8_positions", "scaled_positions"])
def test_adversarial_dynamic(name):
    _, fn, buffers, shape, expected = next(c for c in CASES if c[0] == name)
    model = Fn(fn, **{k: t.clone() for k, t in buffers.items()})
    inputs = qkv(**shape)
    out, reports = rewritten(copy.deepcopy(model), *[x.clone() for x in inputs], dynamic=True)
    _check(model, inputs, expected, reports, out)


@pytest.mark.parametrize("name", ["bool_add", "q_mutated", "gamma_mutated", "log_decay_mutated",
                                  "mask_written_through_split", "uint8_positions"])
def test_adversarial_export_training_ir(name):
    # torch.export's training IR keeps in-place ops, like the backend's make_fx graphs
    _, fn, buffers, shape, expected = next(c for c in CASES if c[0] == name)
    model = Fn(fn, **{k: t.clone() for k, t in buffers.items()})
    inputs = qkv(**shape)
    ep = torch.export.export(copy.deepcopy(model), tuple(x.clone() for x in inputs))
    report = rewrite_decay_attention(ep.graph_module)
    out = ep.module()(*[x.clone() for x in inputs])
    _check(model, inputs, expected, [report], out)
