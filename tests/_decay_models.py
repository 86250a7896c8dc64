"""Attention spellings shared by the pass and backend tests.

POSITIVE: (name, module factory, expected log_decay kind) -- the pass must rewrite
them.  NEAR_MISSES: (name, module factory, reason substring) -- it must not."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

H = 4


def retnet_gamma(h=H):
    return 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float))


class Fn(nn.Module):
    """Wraps a function of (q, k, v, module) so each spelling is a module."""

    def __init__(self, fn, **tensors):
        super().__init__()
        self.fn = fn
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)

    def forward(self, q, k, v):
        return self.fn(self, q, k, v)


def idx(T, device=None):
    n = torch.arange(T, device=device)
    return n[:, None], n[None, :]


# ---------------------------------------------------------------- proven spellings


def pow_masked_fill(m, q, k, v):
    i, j = idx(q.shape[2], q.device)
    D = (m.gamma[:, None, None] ** (i - j)).masked_fill(j > i, 0)
    return (q @ k.transpose(-1, -2) * D) @ v


def pow_where_scale_on_q(m, q, k, v):
    i, j = idx(q.shape[2], q.device)
    d = i - j
    D = torch.where(d >= 0, torch.pow(m.gamma.view(-1, 1, 1), d), torch.zeros(()))
    return torch.matmul(torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(2, 3)) * D, v)


def exp_tril_einsum(m, q, k, v):
    T = q.shape[2]
    n = torch.arange(T, dtype=torch.float32)
    d = (n[:, None] - n[None, :]).clamp(min=0)
    D = torch.exp(d * m.log_gamma[:, None, None]).tril()
    s = torch.einsum("bhid,bhjd->bhij", q, k)
    return torch.einsum("bhij,bhjd->bhid", D * s, v)


def alibi_slopes(m, q, k, v):
    T = q.shape[2]
    h = q.shape[1]
    slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1, dtype=torch.float32) / h)
    n = torch.arange(T)
    dist = (n.view(-1, 1) - n.view(1, -1)).float()
    D = torch.exp(-slopes.view(h, 1, 1) * dist)
    D = D.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    return ((q @ k.transpose(-2, -1)) * D).matmul(v)


def exp2_mask_left(m, q, k, v):
    i, j = idx(q.shape[2])
    D = torch.where(i >= j, torch.exp2(-0.25 * (i - j)), 0.0)
    return (D * (q @ k.mT) * 0.125) @ v


def torchscale_style(m, q, k, v):
    T = q.shape[2]
    index = torch.arange(T).to(m.decay)
    mask = torch.tril(torch.ones(T, T).to(m.decay))
    mask = torch.masked_fill(index[:, None] - index[None, :], ~mask.bool(), float("inf"))
    mask = torch.exp(mask * m.decay[:, None, None])
    mask = torch.nan_to_num(mask)
    return (q @ k.transpose(-1, -2) * mask) @ v


def jamie_style(m, q, k, v):
    # gamma ** (n - m) * (n >= m), then D[D != D] = 0 (public simple RetNet)
    T = q.shape[2]
    n = torch.arange(T).unsqueeze(1)
    mm = torch.arange(T).unsqueeze(0)
    D = (m.gamma.view(-1, 1, 1) ** (n - mm)) * (n >= mm).float()
    D[D != D] = 0
    return (q @ k.permute(0, 1, 3, 2)) * D.unsqueeze(0) @ v


def causal_linear(m, q, k, v):
    T = q.shape[2]
    mask = torch.tril(torch.ones(T, T, device=q.device))
    return (q @ k.transpose(-1, -2) * mask) @ v


def causal_triu_masked_fill(m, q, k, v):
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0.0)
    return s @ v


def bmm_3d(m, q, k, v):
    B, Hh, T, D = q.shape
    q3, k3, v3 = (x.reshape(B * Hh, T, D) for x in (q, k, v))
    i, j = idx(T)
    dec = (m.gamma[:, None, None] ** (i - j).clamp(min=0)) * (i >= j)
    dec = dec[None].expand(B, Hh, T, T).reshape(B * Hh, T, T)
    o = torch.bmm(torch.bmm(q3, k3.transpose(1, 2)) * dec, v3)
    return o.view(B, Hh, T, D)


def bf16_casts(m, q, k, v):
    i, j = idx(q.shape[2])
    D = (m.gamma[:, None, None] ** (i - j)).masked_fill(i < j, 0).to(q.dtype)
    s = (q.to(torch.bfloat16) @ k.to(torch.bfloat16).transpose(-1, -2)).float()
    return ((s * D.float()) @ v.float()).to(q.dtype)


def mamba2_segsum(m, q, k, v):
    # per-position decay: L = exp(segsum(A)), the stable form of the Mamba2 minimal SSD code
    A = -F.softplus(q.sum(-1))  # [B, H, T] data-dependent log decay
    T = A.size(-1)
    x = A[..., None].expand(*A.shape, T)  # x[..., i, j] = A_i
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=0)
    L = torch.exp(x_segsum.masked_fill(~mask, -torch.inf))
    return torch.einsum("bhij,bhjd->bhid", torch.einsum("bhid,bhjd->bhij", q, k) * L, v)


def mamba2_naive_segsum(m, q, k, v):
    A = m.log_gamma[None, :, None] * torch.sigmoid(k.mean(-1))  # [B, H, T]
    c = torch.cumsum(A, dim=-1)
    seg = c[..., :, None] - c[..., None, :]
    T = A.shape[-1]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    L = torch.exp(seg.masked_fill(~mask, -torch.inf))
    return (q @ k.transpose(-1, -2) * L) @ v


def learnable_log_decay(m, q, k, v):
    i, j = idx(q.shape[2])
    d = (i - j).to(q.dtype)
    logd = -F.softplus(m.w)  # learnable, negative
    D = torch.where(d >= 0, torch.exp(logd[:, None, None] * d.clamp(min=0)), 0.0)
    return (q @ k.transpose(-1, -2) * D) @ v


POSITIVE = [
    ("pow_masked_fill", lambda: Fn(pow_masked_fill, gamma=retnet_gamma()), "head"),
    ("pow_where_scale_on_q", lambda: Fn(pow_where_scale_on_q, gamma=retnet_gamma()), "head"),
    ("exp_tril_einsum", lambda: Fn(exp_tril_einsum, log_gamma=retnet_gamma().log()), "head"),
    ("alibi_slopes", lambda: Fn(alibi_slopes), "head"),
    ("exp2_mask_left", lambda: Fn(exp2_mask_left), "head"),
    ("jamie_style", lambda: Fn(jamie_style, gamma=retnet_gamma()), "head"),
    ("causal_linear", lambda: Fn(causal_linear), "none"),
    ("causal_triu_masked_fill", lambda: Fn(causal_triu_masked_fill), "none"),
    ("bmm_3d", lambda: Fn(bmm_3d, gamma=retnet_gamma()), "head"),
    ("bf16_casts", lambda: Fn(bf16_casts, gamma=retnet_gamma()), "head"),
    ("mamba2_segsum", lambda: Fn(mamba2_segsum), "position"),
    ("mamba2_naive_segsum", lambda: Fn(mamba2_naive_segsum, log_gamma=retnet_gamma().log()), "position"),
    ("learnable_log_decay", lambda: Fn(learnable_log_decay, w=nn.Parameter(torch.linspace(-3, 1, H))), "head"),
    ("torchscale_style", lambda: Fn(torchscale_style, decay=retnet_gamma().log()), "head"),  # checks decay < 0
]


# ---------------------------------------------------------------- near misses


def softmax_attn(m, q, k, v):
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def both_directions(m, q, k, v):
    i, j = idx(q.shape[2])
    D = m.gamma[:, None, None] ** (i - j).abs()
    return (q @ k.transpose(-1, -2) * D) @ v


def anti_causal(m, q, k, v):
    T = q.shape[2]
    return (q @ k.transpose(-1, -2) * torch.triu(torch.ones(T, T))) @ v


def diag_offset_strict(m, q, k, v):
    T = q.shape[2]
    return (q @ k.transpose(-1, -2) * torch.tril(torch.ones(T, T), diagonal=-1)) @ v


def diag_offset_plus(m, q, k, v):
    T = q.shape[2]
    return (q @ k.transpose(-1, -2) * torch.tril(torch.ones(T, T), diagonal=1)) @ v


def mask_added(m, q, k, v):
    i, j = idx(q.shape[2])
    D = (m.gamma[:, None, None] ** (i - j)).masked_fill(j > i, 0)
    return (q @ k.transpose(-1, -2) + D) @ v


def transposed_mask(m, q, k, v):
    i, j = idx(q.shape[2])
    D = (m.gamma[:, None, None] ** (i - j)).masked_fill(j > i, 0)
    return (q @ k.transpose(-1, -2) * D.transpose(-1, -2)) @ v


def data_mask(m, q, k, v):
    T = q.shape[2]
    keep = (q @ k.transpose(-1, -2)) > 0
    return ((q @ k.transpose(-1, -2)) * keep.tril()) @ v


def pow_times_mask_nan(m, q, k, v):
    i, j = idx(q.shape[2])
    D = m.gamma[:, None, None] ** (i - j) * (i >= j)
    return (q @ k.transpose(-1, -2) * D) @ v


def no_mask(m, q, k, v):
    return (q @ k.transpose(-1, -2)) @ v


def buffer_mask(m, q, k, v):
    T = q.shape[2]
    return (q @ k.transpose(-1, -2) * m.mask[:T, :T]) @ v


def decay_offset(m, q, k, v):
    # gamma ** (i - j + 1): the diagonal is gamma, not 1 -- fine as a scale? only for one head
    i, j = idx(q.shape[2])
    D = (m.gamma[:, None, None] ** (i - j + 1)).masked_fill(j > i, 0)
    return (q @ k.transpose(-1, -2) * D) @ v


def segsum_anti_causal(m, q, k, v):
    A = -F.softplus(q.sum(-1))
    c = torch.cumsum(A, dim=-1)
    seg = c[..., None, :] - c[..., :, None]
    T = A.shape[-1]
    L = torch.exp(seg.masked_fill(~torch.ones(T, T, dtype=torch.bool).triu(), -torch.inf))
    return (q @ k.transpose(-1, -2) * L) @ v


NEAR_MISSES = [
    ("softmax_attn", lambda: Fn(softmax_attn), "softmax"),
    ("both_directions", lambda: Fn(both_directions, gamma=retnet_gamma()), "above the diagonal"),
    ("anti_causal", lambda: Fn(anti_causal), "above the diagonal"),
    ("diag_offset_strict", lambda: Fn(diag_offset_strict), "diagonal"),
    ("diag_offset_plus", lambda: Fn(diag_offset_plus), "above the diagonal"),
    ("mask_added", lambda: Fn(mask_added, gamma=retnet_gamma()), "added"),
    ("transposed_mask", lambda: Fn(transposed_mask, gamma=retnet_gamma()), "above the diagonal"),
    ("data_mask", lambda: Fn(data_mask), ""),
    ("pow_times_mask_nan", lambda: Fn(pow_times_mask_nan, gamma=retnet_gamma()), "0 * inf"),
    ("no_mask", lambda: Fn(no_mask), ""),
    ("buffer_mask", lambda: Fn(buffer_mask, mask=torch.ones(64, 64).tril()), ""),
    ("segsum_anti_causal", lambda: Fn(segsum_anti_causal), "above the diagonal"),
]
