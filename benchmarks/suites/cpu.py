"""cpu: the fused CPU kernel against the baselines users have (fp32, per-head decay)."""
import torch

import leet_compile
from harness import Case, rel_err, suite


def naive(q, k, v, log_decay):
    """The materialised ((Q K^T) * D) V, what users write (O(T^2))."""
    T = q.shape[2]
    i = torch.arange(T)
    diff = (i[:, None] - i[None, :]).to(q.dtype)
    mask = torch.where(diff >= 0, torch.exp(log_decay[:, None, None] * diff), 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def block_loop(q, k, v, log_decay, block):
    """Intra-block quadratic + inter-block state, one block at a time (LeetDecoding's
    lightningAttention2_torch algorithm with block=256), in plain torch."""
    B, H, T, K = q.shape
    a = log_decay.view(H, 1, 1)
    idx = torch.arange(1, block + 1, dtype=q.dtype).view(-1, 1)
    q_decay = torch.exp(a * idx)
    k_decay = torch.exp(a * (block - idx))
    diff = idx - idx.T
    diag = torch.where(diff >= 0, torch.exp(a * diff), 0.0)
    kv = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
    out = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype)
    for s in range(0, T, block):
        e = min(s + block, T)
        m = e - s
        qi, ki, vi = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        out[:, :, s:e] = (qi * q_decay[:, :m]) @ kv + ((qi @ ki.transpose(-1, -2)) * diag[:, :m, :m]) @ vi
        kv = torch.exp(a * m) * kv + (ki * k_decay[:, block - m:]).transpose(-1, -2) @ vi
    return out


def chunked_flops(B, H, T, K, V, C=32):
    """FLOPs the chunked kernel executes: full C x C tiles, Q S and K^T V on the state."""
    return B * H * (2 * T * C * (K + V) + 4 * T * K * V)


@suite("cpu", x_name="T", x_vals=[1024, 4096, 8192], smoke_x_vals=[64, 300],
       params=dict(B=1, H=8, D=64, naive_max_T=8192), baseline="leet decay_attn")
def cpu_fast_path(T, B, H, D, naive_max_T):
    """leet_compile.decay_attn (fused C++ chunked kernel) vs LeetDecoding's lightningAttention2 algorithm, a plain-torch chunk loop and the naive form; B=1 H=8 K=V=64 fp32, per-head decay"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    log_decay = -torch.rand(H, generator=g) * 0.1 - 0.01
    ref = leet_compile.decay_attn(q.double(), k.double(), v.double(), log_decay.double())
    fns = {
        "leet decay_attn": lambda: leet_compile.decay_attn(q, k, v, log_decay),
        "leetdecoding-la2 (256)": lambda: block_loop(q, k, v, log_decay, 256),
        "torch chunk loop (64)": lambda: block_loop(q, k, v, log_decay, 64),
        "naive": (lambda: naive(q, k, v, log_decay)) if T <= naive_max_T
        else f"T x T float32 masks above T={naive_max_T}",
    }
    info = {"leet decay_attn": {"rel_err_vs_fp64": rel_err(leet_compile.decay_attn(q, k, v, log_decay), ref)}}
    return Case(fns, flops={"leet decay_attn": chunked_flops(B, H, T, D, D)}, info=info)


@suite("gemm", x_name="N", x_vals=[1024], smoke_x_vals=[128])
def gemm(N):
    """fp32 GEMM N x N x N (torch.mm): the machine's matrix rate, the yardstick for GFLOP/s figures"""
    a, b = torch.randn(N, N), torch.randn(N, N)
    return Case({"torch.mm": lambda: torch.mm(a, b)}, flops=2 * N**3)
