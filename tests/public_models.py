"""The public decay-attention code people run, rewritten in our own words (issue 10).

Each model below follows one published implementation operation by operation: the
same ops in the same order, the same layout, the same dtype casts and the same tricks
(``+inf`` fills then ``nan_to_num``, in-place ``masked_fill_``, row normalisations,
``detach``, einops, n-ary einsums, heads after time).  None of it is copied; the
sources they follow are named in each docstring.  The "leet" backend must rewrite
them as they are: nothing here is simplified to help the pass.

Every model is an ``nn.Module`` whose parameters and buffers are those of the
original (a learnable decay where the original learns one), with small default sizes
and an ``example_inputs(T, dtype=...)`` method giving deterministic inputs.

:data:`FAMILIES` lists ``(name, factory, note)``; the note says which part of the
original is in reach of a graph-local pass.
"""
import math
from functools import lru_cache, partial

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # yet-another-retnet, Mamba2's ssd_minimal and fla's naive code use einops
    import einops
except ImportError:  # pragma: no cover - the tests skip these families then
    einops = None


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


class _Family(nn.Module):
    """Common helpers: deterministic example inputs of a given length."""

    needs_einops = False
    #: float64 eager runs entirely in float64 (False where the original casts to float32)
    fp64_exact = True
    #: the example inputs that are differentiable activations (their grads are compared)
    grad_inputs = None

    def _gen(self, seed):
        return torch.Generator().manual_seed(seed)


# =============================================================== torchscale (RetNet)
#
# torchscale/architecture/retnet.py  RetNetRelPos.forward (parallel branch) and
# torchscale/component/multiscale_retention.py  MultiScaleRetention.parallel_forward.
# The relative-position module builds the decay mask from a *buffer* of log decays:
#   index = arange(slen).to(decay); mask = tril(ones(slen, slen).to(decay))
#   mask = masked_fill(index[:, None] - index[None, :], ~mask.bool(), +inf)
#   mask = exp(mask * decay[:, None, None]); mask = nan_to_num(mask)
#   mask = mask / mask.sum(-1, keepdim=True).sqrt()
# and the retention normalises the decayed scores by their (detached) row sums.
# The PyPI release (0.3.0) uses `sum(-1).abs().clamp(min=1)`; the GitHub head uses
# `abs().sum(-1).clamp(min=1, max=5e4)` (a sum of absolute values: not bilinear in q, k).


def _torchscale_rel_pos_mask(decay, slen):
    """RetNetRelPos' parallel mask, spelled as torchscale spells it."""
    index = torch.arange(slen).to(decay)
    keep = torch.tril(torch.ones(slen, slen).to(decay))
    mask = torch.masked_fill(index[:, None] - index[None, :], ~keep.bool(), float("inf"))
    mask = torch.exp(mask * decay[:, None, None])
    mask = torch.nan_to_num(mask)
    return mask / mask.sum(dim=-1, keepdim=True).sqrt()


def _torchscale_angles(head_dim):
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
    return angle.unsqueeze(-1).repeat(1, 2).flatten()


def _rotate_every_two(x):
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _theta_shift(x, sin, cos):
    return x * cos + _rotate_every_two(x) * sin


class TorchscaleRetention(_Family):
    """torchscale's parallel retention on already projected, rotated qr, kr and v.

    Inputs as MultiScaleRetention.parallel_forward gets them: ``qr, kr: [B, H, T, K]``,
    ``v: [B, T, H * Dv]`` (still unsplit); output ``[B, T, H, Dv]`` (transposed back,
    heads after time).  ``norm="pypi"`` is the released normaliser, ``norm="github"``
    the current one.  The decay is a buffer (torchscale does not learn it).
    """

    def __init__(self, heads=4, key_dim=8, head_dim=8, norm="pypi"):
        super().__init__()
        self.num_heads, self.key_dim, self.head_dim, self.norm = heads, key_dim, head_dim, norm
        decay = torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float)))
        self.register_buffer("decay", decay)

    def forward(self, qr, kr, v):
        slen = qr.shape[2]
        mask = _torchscale_rel_pos_mask(self.decay, slen)
        bsz, tgt_len, _ = v.size()
        vr = v.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
        qk_mat = qr @ kr.transpose(-1, -2)
        qk_mat = qk_mat * mask
        if self.norm == "pypi":
            qk_mat = qk_mat / qk_mat.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)
        else:
            qk_mat = qk_mat / qk_mat.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1, max=5e4)
        output = torch.matmul(qk_mat, vr)
        return output.transpose(1, 2)

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        H, K, D = self.num_heads, self.key_dim, self.head_dim
        return (_randn(g, B, H, T, K, dtype=dtype), _randn(g, B, H, T, K, dtype=dtype),
                _randn(g, B, T, H * D, dtype=dtype))


class TorchscaleMaskOnly(_Family):
    """The torchscale mask without the row normalisations: ``+inf`` fill,
    ``exp(mask * decay)`` with the decay buffer, ``nan_to_num`` (the smallest in-graph
    piece of torchscale; the fill-then-exp proof with an unknown-sign buffer)."""

    def __init__(self, heads=4):
        super().__init__()
        self.register_buffer("decay", torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float))))

    def forward(self, q, k, v):
        slen = q.shape[2]
        index = torch.arange(slen).to(self.decay)
        keep = torch.tril(torch.ones(slen, slen).to(self.decay))
        mask = torch.masked_fill(index[:, None] - index[None, :], ~keep.bool(), float("inf"))
        mask = torch.nan_to_num(torch.exp(mask * self.decay[:, None, None]))
        return (q @ k.transpose(-1, -2) * mask) @ v

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        H = self.decay.shape[0]
        return tuple(_randn(g, B, H, T, 8, dtype=dtype) for _ in range(3))


class TorchscaleMSR(_Family):
    """A whole torchscale MultiScaleRetention layer (parallel form) with its
    RetNetRelPos: q/k/v/g projections, ``k *= scaling``, xPos-style theta shift,
    the normalised mask and scores, RMS group norm (no affine), swish gate, out_proj."""

    grad_inputs = (0,)
    fp64_exact = False  # torchscale's RMSNorm computes in float32 (x.float())

    def __init__(self, embed_dim=32, value_dim=64, heads=4, norm="pypi", eps=1e-6):
        super().__init__()
        self.num_heads = heads
        self.key_dim = embed_dim // heads
        self.head_dim = value_dim // heads
        self.scaling = self.key_dim ** -0.5
        self.eps = eps
        g = torch.Generator().manual_seed(1)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, value_dim, bias=False)
        self.g_proj = nn.Linear(embed_dim, value_dim, bias=False)
        self.out_proj = nn.Linear(value_dim, embed_dim, bias=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.out_proj):
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * lin.in_features ** -0.5)
        self.register_buffer("angle", _torchscale_angles(self.key_dim))
        self.register_buffer("decay", torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float))))
        self.core = TorchscaleRetention(heads, self.key_dim, self.head_dim, norm)
        self.core.decay = self.decay  # one buffer, as RetNetRelPos owns it

    def forward(self, x):
        bsz, tgt_len, _ = x.size()
        index = torch.arange(tgt_len).to(self.decay)
        sin = torch.sin(index[:, None] * self.angle[None, :])
        cos = torch.cos(index[:, None] * self.angle[None, :])
        q, k, v, g = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.g_proj(x)
        k *= self.scaling
        q = q.view(bsz, tgt_len, self.num_heads, self.key_dim).transpose(1, 2)
        k = k.view(bsz, tgt_len, self.num_heads, self.key_dim).transpose(1, 2)
        qr, kr = _theta_shift(q, sin, cos), _theta_shift(k, sin, cos)
        out = self.core(qr, kr, v)
        out = out.float()
        out = (out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(v)
        out = out.reshape(bsz, tgt_len, self.head_dim * self.num_heads)
        return self.out_proj(F.silu(g) * out)

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        return (_randn(self._gen(seed), B, T, self.q_proj.in_features, dtype=dtype),)


# =============================================================== flash-linear-attention
#
# fla/ops/retention/naive.py  naive_retention: float32 casts, per-head log2 decays from
# `new_tensor(range(H))`, exp2((i - j) * s) * ge(i, j), and the *three-operand* einsum
# 'bhqd,bhkd,hqk->bhqk' with the mask as the third operand, scale on q.


class FlaNaiveRetention(_Family):
    """fla's ``naive_retention`` (heads-first [B, H, T, D]; the decays are fixed)."""

    fp64_exact = False  # the original computes in float32 whatever the input dtype

    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim

    def forward(self, q, k, v):
        orig_type = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        _, n_heads, seq_len, d_head = q.shape
        s = (1 - q.new_tensor(2.0, dtype=torch.float).pow(
            -5.0 - q.new_tensor(range(n_heads), dtype=torch.float))).log2()
        n = q.new_tensor(range(seq_len), dtype=torch.float)
        n = torch.exp2((n.unsqueeze(-1) - n) * s.view(-1, 1, 1)) * n.unsqueeze(-1).ge(n)
        scores = torch.einsum("bhqd,bhkd,hqk->bhqk", q * d_head ** -0.5, k, n.to(q.dtype))
        o = torch.einsum("bhqk,bhkd->bhqd", scores, v)
        return o.to(orig_type)

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        return tuple(_randn(g, B, self.heads, T, self.head_dim, dtype=dtype) for _ in range(3))


# fla/ops/simple_gla/naive.py  naive_parallel_simple_gla: [B, T, H, D] inputs and a
# [B, T, H] log gate, einops rearrange to heads-first, float32, q @ k^T * scale, then
# D = (g_i - g_j).tril().exp().tril() from the cumsum of the gates; output heads after
# time.  The issue reports this one as rewritten today.


class FlaSimpleGLAParallel(_Family):
    """fla's ``naive_parallel_simple_gla``; the gates come from a learnable projection
    of k (``-logsigmoid``-style negative log gates, as fla's GLA layers make them)."""

    needs_einops = True
    fp64_exact = False
    grad_inputs = (0, 1, 2)

    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.gate_bias = nn.Parameter(torch.linspace(1.0, 4.0, heads))

    def forward(self, q, k, v):
        g = F.logsigmoid(k.mean(-1) + self.gate_bias) / 4  # [B, T, H], negative
        q, k, v, g = (einops.rearrange(x, "b t h ... -> b h t ...").to(torch.float32) for x in (q, k, v, g))
        scale = 1.0 / q.shape[-1] ** 0.5
        A = q @ k.transpose(-1, -2) * scale
        g = g.cumsum(-1)
        D = (g.unsqueeze(-1) - g.unsqueeze(-2)).tril().exp().tril()
        A = A * D
        o = A @ v
        return o.transpose(1, 2)

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        return tuple(_randn(g, B, T, self.heads, self.head_dim, dtype=dtype) for _ in range(3))


class FlaSimpleGLAChunk(_Family):
    """fla's ``naive_chunk_simple_gla`` (intra-chunk masked form plus the state carried
    between chunks), [B, T, H, D] in and out.  The quadratic part is the per-chunk
    ``q_i @ k_i^T * L_mask[:, :, i] @ v_i`` written into ``o[:, :, i]`` (a setitem)."""

    needs_einops = True
    fp64_exact = False
    grad_inputs = (0, 1, 2)

    def __init__(self, heads=4, head_dim=8, chunk_size=8):
        super().__init__()
        self.heads, self.head_dim, self.chunk_size = heads, head_dim, chunk_size
        self.gate_bias = nn.Parameter(torch.linspace(1.0, 4.0, heads))

    def forward(self, q, k, v):
        g = F.logsigmoid(k.mean(-1) + self.gate_bias) / 4
        q, k, v, g = (einops.rearrange(x, "b t h ... -> b h t ...").to(torch.float32) for x in (q, k, v, g))
        scale = 1.0 / q.shape[-1] ** 0.5
        T = q.shape[-2]
        BT = self.chunk_size
        pad_len = (BT - (T % BT)) % BT
        if pad_len > 0:
            q, k, v = (F.pad(x, (0, 0, 0, pad_len)) for x in (q, k, v))
            g = F.pad(g, (0, pad_len))
        B, H, T1, K = q.shape
        V = v.shape[-1]
        q = q * scale
        q, k, v, decay = (einops.rearrange(x, "b h (n c) d -> b h n c d", c=BT) for x in (q, k, v, g.unsqueeze(-1)))
        decay = decay.squeeze(-1).cumsum(-1)
        L_mask = ((decay.unsqueeze(-1) - decay.unsqueeze(-2)).tril().exp().float()).tril()
        S = k.new_zeros(B, H, K, V)
        o = torch.zeros_like(v)
        for i in range(T1 // BT):
            q_i, k_i, v_i = q[:, :, i], k[:, :, i], v[:, :, i]
            attn = q_i @ k_i.transpose(-1, -2) * L_mask[:, :, i]
            o_inter = (q_i * decay[:, :, i, :, None].exp()) @ S
            o[:, :, i] = o_inter + attn @ v_i
            S = S * decay[:, :, i, -1, None, None].exp() + \
                (k_i * (decay[:, :, i, -1, None] - decay[:, :, i]).exp()[..., None]).transpose(-1, -2) @ v_i
        return einops.rearrange(o, "b h n c d -> b (n c) h d")[:, :T]

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        return tuple(_randn(g, B, T, self.heads, self.head_dim, dtype=dtype) for _ in range(3))


class FlaGLARecurrent(_Family):
    """fla's ``naive_recurrent_gla``: per-*key-channel* gates gk [B, T, H, K] and a Python
    loop over time.  Not decay_attn (the operator's decay is one scalar per (b, h, t)),
    and there is no masked matmul skeleton: the pass must leave it alone (a negative)."""

    fp64_exact = False
    grad_inputs = (0, 1, 2)

    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.gate_bias = nn.Parameter(torch.linspace(1.0, 4.0, head_dim))

    def forward(self, q, k, v):
        gk = F.logsigmoid(k + self.gate_bias) / 4
        dtype = q.dtype
        q, k, v, gk = (x.transpose(1, 2).float() for x in (q, k, v, gk))
        B, H, T, K, V = *q.shape, v.shape[-1]
        o = torch.zeros_like(v)
        scale = K ** -0.5
        h = q.new_zeros(B, H, K, V, dtype=torch.float32)
        for i in range(T):
            q_i = q[:, :, i] * scale
            kv_i = k[:, :, i][..., None] * v[:, :, i][..., None, :]
            h = h * gk[:, :, i].exp()[..., None] + kv_i
            o[:, :, i] = (q_i[..., None] * h).sum(-2)
        return o.transpose(1, 2).to(dtype)

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        return tuple(_randn(g, B, T, self.heads, self.head_dim, dtype=dtype) for _ in range(3))


# =============================================================== Mamba2 (SSD)
#
# mamba_ssm/modules/ssd_minimal.py: `segsum` (repeat x over a new last dim, masked_fill
# strictly-lower with 0, cumsum over dim -2, masked_fill above the diagonal with -inf)
# and `ssd_minimal_discrete` (einops rearrange into chunks, L = exp(segsum(A)), the
# four-operand einsum 'bclhn,bcshn,bhcls,bcshp->bclhp' with heads after time, then the
# state passing between chunks).  The caller passes X * dt and A * dt, with
# A = -exp(A_log) (learnable) and dt = softplus(dt_raw + dt_bias) (learnable bias).


def _segsum(x):
    T = x.size(-1)
    x = einops.repeat(x, "... d -> ... d e", e=T)
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def _segsum_unstable(x):
    T = x.size(-1)
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def _ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    X, A, B, C = (einops.rearrange(x, "b (c l) ... -> b c l ...", l=block_len) for x in (X, A, B, C))
    A = einops.rearrange(A, "b c l h -> b h c l")
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(_segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    Y = einops.rearrange(Y_diag + Y_off, "b c l h p -> b (c l) h p")
    return Y, final_state


class _Mamba2Base(_Family):
    needs_einops = True
    grad_inputs = (0, 1, 2, 3)

    def __init__(self, heads=4, head_dim=8, d_state=8):
        super().__init__()
        self.heads, self.head_dim, self.d_state = heads, head_dim, d_state
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 4.0, heads)))
        self.dt_bias = nn.Parameter(torch.linspace(-3.0, -1.0, heads))

    def _discretise(self, x, dt_raw):
        dt = F.softplus(dt_raw + self.dt_bias)  # [B, T, H]
        A = -torch.exp(self.A_log.float())  # [H]
        return x * dt.unsqueeze(-1), A * dt

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        """(x [B, T, H, P], dt_raw [B, T, H], B [B, T, H, N], C [B, T, H, N])"""
        g = self._gen(seed)
        H, P, N = self.heads, self.head_dim, self.d_state
        return (_randn(g, B, T, H, P, dtype=dtype), _randn(g, B, T, H, dtype=dtype),
                _randn(g, B, T, H, N, dtype=dtype), _randn(g, B, T, H, N, dtype=dtype))


class Mamba2SSDDiag(_Mamba2Base):
    """The diagonal block of ``ssd_minimal_discrete`` on ONE chunk (block_len = T): the
    chunk rearrange, ``L = exp(segsum(A))`` and the four-operand einsum.  With one chunk
    this *is* the whole SSD output (no state enters the chunk)."""

    def forward(self, x, dt_raw, B, C):
        X, A = self._discretise(x, dt_raw)
        T = X.shape[1]
        X, A, B, C = (einops.rearrange(t, "b (c l) ... -> b c l ...", l=T) for t in (X, A, B, C))
        A = einops.rearrange(A, "b c l h -> b h c l")
        L = torch.exp(_segsum(A))
        Y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
        return einops.rearrange(Y, "b c l h p -> b (c l) h p")


class Mamba2SSDDiagUnstable(_Mamba2Base):
    """As :class:`Mamba2SSDDiag` with ``segsum_unstable`` (cumsum differences)."""

    def forward(self, x, dt_raw, B, C):
        X, A = self._discretise(x, dt_raw)
        T = X.shape[1]
        X, A, B, C = (einops.rearrange(t, "b (c l) ... -> b c l ...", l=T) for t in (X, A, B, C))
        A = einops.rearrange(A, "b c l h -> b h c l")
        L = torch.exp(_segsum_unstable(A))
        Y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
        return einops.rearrange(Y, "b c l h p -> b (c l) h p")


class Mamba2SSDMinimal(_Mamba2Base):
    """The whole ``ssd_minimal_discrete`` with ``block_len`` chunks (T must be a multiple;
    ``block_len=None`` means one chunk).  The diagonal blocks are a decay_attn batched over
    chunks; the off-diagonal terms are state passing (already linear)."""

    def __init__(self, heads=4, head_dim=8, d_state=8, block_len=8):
        super().__init__(heads, head_dim, d_state)
        self.block_len = block_len

    def forward(self, x, dt_raw, B, C):
        X, A = self._discretise(x, dt_raw)
        Y, _ = _ssd_minimal_discrete(X, A, B, C, self.block_len or X.shape[1])
        return Y


# =============================================================== yet-another-retnet
#
# yet_another_retnet/retention.py: `_build_decay_gammas` (linspace of log windows,
# 1 - x.exp_()), `_build_decay_mask` (lru_cache'd; |query_pos - key_pos| distances,
# einops rearranges, gammas ** distance, then `masked_fill_` in place with a
# `ones_like(..., bool).triu_(diagonal=1)` future mask) and `retention_parallel`
# (key / sqrt(d), einops einsums "b h n d, b h s d -> b h n s" and back).


@lru_cache(maxsize=1)
def _yar_decay_gammas(num_heads, device=None, dtype=None):
    xmin, xmax = math.log(1 / 32), math.log(1 / 512)
    x = torch.linspace(xmin, xmax, steps=num_heads, device=device, dtype=dtype)
    return 1 - x.exp_()


@lru_cache(maxsize=1)
def _yar_decay_mask(num_heads, query_length, key_length, device=None, dtype=None):
    gammas = _yar_decay_gammas(num_heads=num_heads, device=device, dtype=dtype)
    query_pos = torch.arange(query_length, device=device, dtype=dtype).unsqueeze_(-1)
    key_pos = torch.arange(key_length, device=device, dtype=dtype).unsqueeze_(0)
    distance = torch.abs(query_pos - key_pos)
    distance = einops.rearrange(distance, "n s -> () n s")
    gammas = einops.rearrange(gammas, "h -> h () ()")
    decay_mask = gammas ** distance
    future_mask = torch.ones_like(decay_mask, dtype=torch.bool).triu_(diagonal=1)
    return decay_mask.masked_fill_(future_mask, 0)


class YetAnotherRetNetParallel(_Family):
    """yet-another-retnet's ``retention_parallel`` (heads-first [B, H, T, D]; the decays
    are fixed, as in the original)."""

    needs_einops = True

    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim

    def forward(self, query, key, value):
        decay_mask = _yar_decay_mask(num_heads=query.shape[1], query_length=query.shape[2],
                                     key_length=key.shape[2], device=query.device, dtype=query.dtype)
        scale = key.size(-1) ** 0.5
        key = key / scale
        similarity = einops.einsum(query, key, "b h n d, b h s d -> b h n s")
        similarity = similarity * einops.rearrange(decay_mask, "h n s -> () h n s")
        return einops.einsum(similarity, value, "b h n s, b h s d -> b h n d")

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        return tuple(_randn(g, B, self.heads, T, self.head_dim, dtype=dtype) for _ in range(3))


class YetAnotherRetNetNoCache(YetAnotherRetNetParallel):
    """The same without ``lru_cache`` (what dynamo sees once the cache is out of the way:
    the in-place ``masked_fill_`` on a freshly built mask, einops)."""

    def forward(self, query, key, value):
        decay_mask = _yar_decay_mask.__wrapped__(query.shape[1], query.shape[2], key.shape[2],
                                                 device=query.device, dtype=query.dtype)
        key = key / key.size(-1) ** 0.5
        similarity = einops.einsum(query, key, "b h n d, b h s d -> b h n s")
        similarity = similarity * einops.rearrange(decay_mask, "h n s -> () h n s")
        return einops.einsum(similarity, value, "b h n s, b h s d -> b h n d")


# =============================================================== Lightning / LeetDecoding
#
# lightning_attn/ops/torch/linear_attention.py (OpenNLPLab) and
# leetDecoding/methods/linear_attn.py: `get_mask(n, slope)` fills a triu -inf matrix and
# writes each row i in a Python loop (mask[i, :i+1] = -flip(slope * arange(i+1))), exp;
# `get_full_mask(n, slopes)` stacks one mask per head from `slope.item()` (a host sync:
# dynamo graph-breaks there, so the mask reaches the attention graph as an input);
# `linear_attn` multiplies in float32 and casts back.  Without slopes: tril(ones).
# The slopes are ALiBi's geometric sequence (`_build_slope_tensor`), a [H, 1, 1] buffer.


def _alibi_slopes(n):
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_2(p) + _alibi_slopes(2 * p)[0::2][: n - p]


def _lightning_get_mask(n, slope=1):
    mask = torch.triu(torch.zeros(n, n).float().fill_(float("-inf")), 1)
    for i in range(n):
        x = torch.arange(i + 1)
        mask[i, : i + 1] = -torch.flip(slope * x, [0])
    return torch.exp(mask)


def _lightning_get_full_mask(n, slopes):
    if slopes is None:
        return torch.tril(torch.ones((n, n)))
    return torch.stack([_lightning_get_mask(n, slope.item()) for slope in slopes], dim=0)


class LightningLinearAttn(_Family):
    """Lightning attention's torch reference ``linear_attn(q, k, v, s)`` with the ALiBi
    slope buffer (``slopes=True``) or without (``slopes=False``: causal, no decay)."""

    fp64_exact = False  # the mask and the scores are float32 whatever the input dtype

    def __init__(self, heads=4, head_dim=8, slopes=True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        s = torch.tensor(_alibi_slopes(heads)).reshape(heads, 1, 1) if slopes else None
        self.register_buffer("slope_rate", s)

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        mask = _lightning_get_full_mask(n, self.slope_rate).to(q.device).to(torch.float32)
        qk = torch.matmul(q, k.transpose(2, 3))
        qk = (qk.to(torch.float32) * mask).to(q.dtype)
        return torch.matmul(qk, v)

    def example_inputs(self, T=16, B=2, dtype=torch.float32, seed=0):
        g = self._gen(seed)
        return tuple(_randn(g, B, self.heads, T, self.head_dim, dtype=dtype, scale=0.3) for _ in range(3))


class LeetDecodingVanilla(_Family):
    """LeetDecoding's ``linear_attn`` ("vanilla"): with slopes as Lightning's
    (`get_full_mask` from `slope.item()`), without slopes
    ``matmul(matmul(q, k^T) * tril(ones(n, n, dtype=q.dtype)), v)``."""

    fp64_exact = False  # with slopes the scores are float32 whatever the input dtype

    def __init__(self, heads=4, head_dim=8, slopes=True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        s = torch.FloatTensor(_alibi_slopes(heads)).reshape(heads, 1, 1) if slopes else None
        self.register_buffer("gamma", s)

    def forward(self, q, k, v):
        b, h, n, r = q.shape
        if self.gamma is not None:
            mask = _lightning_get_full_mask(n, self.gamma).to(q.device).to(torch.float32)
            qk = torch.matmul(q, k.transpose(2, 3))
            qk = (qk.to(torch.float32) * mask).to(q.dtype)
            return torch.matmul(qk, v)
        M = torch.tril(torch.ones(n, n, device=q.device, dtype=q.dtype))
        return torch.matmul(torch.matmul(q, k.transpose(2, 3)) * M, v)

    example_inputs = LightningLinearAttn.example_inputs


# =============================================================== the table

#: (name, factory, note): ``factory(**sizes)`` builds the model (defaults are small);
#: note says what of the original a graph-local pass can reach.
FAMILIES = [
    ("torchscale_retention_pypi", partial(TorchscaleRetention, norm="pypi"),
     "torchscale 0.3.0 (PyPI) parallel retention with RetNetRelPos' mask, in one graph"),
    ("torchscale_retention_github", partial(TorchscaleRetention, norm="github"),
     "torchscale main: abs().sum() normaliser (a sum of |scores|, not a decay_attn row sum): "
     "no O(T) form, the target is to leave it alone"),
    ("torchscale_mask_only", TorchscaleMaskOnly,
     "torchscale's +inf fill / exp(mask * decay buffer) / nan_to_num mask, no normalisation"),
    ("torchscale_msr_layer", TorchscaleMSR,
     "a whole MultiScaleRetention layer (projections, theta shift, group norm, gate)"),
    ("fla_naive_retention", FlaNaiveRetention,
     "three-operand einsum with the mask as an operand; exp2((i-j)*s) * ge(i, j) overflows above the "
     "diagonal (inf * 0 = nan in eager for T >= ~2800 in float32): valid only below that length"),
    ("fla_simple_gla_parallel", FlaSimpleGLAParallel, "[B, T, H, D] layout via einops, cumsum gates"),
    ("fla_simple_gla_chunk", FlaSimpleGLAChunk,
     "per-chunk masked products in a Python loop, written into o[:, :, i]"),
    ("mamba2_ssd_diag", Mamba2SSDDiag, "ssd_minimal on one chunk: segsum + 4-operand einsum"),
    ("mamba2_ssd_diag_unstable", Mamba2SSDDiagUnstable, "segsum_unstable + 4-operand einsum"),
    ("mamba2_ssd_minimal", Mamba2SSDMinimal,
     "the whole chunked ssd_minimal_discrete (diagonal blocks batched over chunks)"),
    ("yet_another_retnet", YetAnotherRetNetParallel, "lru_cache'd mask, masked_fill_, einops"),
    ("yet_another_retnet_nocache", YetAnotherRetNetNoCache, "the same mask built in the graph"),
    ("lightning_slopes", LightningLinearAttn,
     "mask built in Python from slope.item(): a graph break; it reaches the graph as an input"),
    ("leetdecoding_vanilla_slopes", LeetDecodingVanilla, "as lightning_slopes"),
    ("leetdecoding_vanilla_causal", partial(LeetDecodingVanilla, slopes=False), "tril(ones(dtype=q.dtype))"),
]

#: families that are not decay attention: the pass must leave them alone
NEGATIVES = [
    ("fla_gla_recurrent", FlaGLARecurrent, "per-key-channel gates and a time loop: not decay_attn"),
]
