"""The CPU fast path against the baselines, fp32, per-head decay.

    python benchmarks/bench_cpu.py            # B=1 H=8 T=4096 K=V=64 (the issue's shape)
    python benchmarks/bench_cpu.py --T 1024 4096 8192

Baselines, all measured in this process, side by side:
  * naive: the materialised ((Q K^T) * D) V, what users write (O(T^2));
  * leetdecoding-la2: the algorithm of LeetDecoding's lightningAttention2_torch
    (blocks of 256 tokens, loop over blocks), re-implemented here in plain torch;
  * torch-chunked-loop: the same loop with 64-token blocks (a 20-line plain-torch version).
Ours: leet_compile.decay_attn (method auto = the fused C++ chunked kernel).
"""
import argparse

import torch

import leet_compile
from common import machine_info, median_ms, print_table, write_results


def naive(q, k, v, log_decay):
    T = q.shape[2]
    i = torch.arange(T)
    diff = (i[:, None] - i[None, :]).to(q.dtype)
    mask = torch.where(diff >= 0, torch.exp(log_decay[:, None, None] * diff), 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def block_loop(q, k, v, log_decay, block):
    """Intra-block quadratic + inter-block state, one block at a time (LeetDecoding's
    lightningAttention2_torch algorithm with block=256)."""
    B, H, T, K = q.shape
    a = log_decay.view(H, 1, 1)
    idx = torch.arange(1, block + 1, dtype=q.dtype).view(-1, 1)
    q_decay = torch.exp(a * idx)                 # from the block's start state to row i
    k_decay = torch.exp(a * (block - idx))       # from row j to the block's end
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
    """FLOPs the chunked kernel executes: Q K^T and (A*D) V on C x C tiles (full tiles),
    Q S and K^T V on the state."""
    return B * H * (2 * T * C * (K + V) + 4 * T * K * V)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--T", type=int, nargs="+", default=[4096])
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.manual_seed(0)
    gemm = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gemm_gflops = 2 * 1024**3 / median_ms(lambda: torch.mm(*gemm), reps=20) / 1e6
    print(f"machine: {machine_info()['cpu']}, {torch.get_num_threads()} threads; "
          f"fp32 GEMM 1024^3: {gemm_gflops:.0f} GFLOP/s")
    rows, results = [], []
    for T in args.T:
        B, H, D = args.B, args.H, args.D
        q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        log_decay = -torch.rand(H) * 0.1 - 0.01
        ref = leet_compile.decay_attn(q.double(), k.double(), v.double(), log_decay.double())
        times = {
            "ours": median_ms(lambda: leet_compile.decay_attn(q, k, v, log_decay), reps=args.reps),
            "leetdecoding-la2": median_ms(lambda: block_loop(q, k, v, log_decay, 256), reps=args.reps),
            "torch-chunked-loop": median_ms(lambda: block_loop(q, k, v, log_decay, 64), reps=args.reps),
        }
        if T <= 8192:  # T x T float32 masks: 256 MiB per head at 8192
            times["naive"] = median_ms(lambda: naive(q, k, v, log_decay), warmup=1, reps=3)
        err = ((leet_compile.decay_attn(q, k, v, log_decay) - ref).norm() / ref.norm()).item()
        flops = chunked_flops(B, H, T, D, D)
        gflops = flops / times["ours"] / 1e6
        entry = {"B": B, "H": H, "T": T, "K": D, "V": D, "median_ms": times, "ours_gflop": flops / 1e9,
                 "ours_gflops_per_s": gflops, "gemm_gflops_per_s": gemm_gflops, "ours_rel_err_vs_fp64": err}
        results.append(entry)
        speedups = {n: t / times["ours"] for n, t in times.items() if n != "ours"}
        rows.append([T, f"{times['ours']:.2f}", f"{times['leetdecoding-la2']:.2f}",
                     f"{times['torch-chunked-loop']:.2f}", f"{times.get('naive', float('nan')):.1f}",
                     f"{speedups['leetdecoding-la2']:.2f}x", f"{speedups.get('naive', float('nan')):.0f}x",
                     f"{gflops:.0f} ({100 * gflops / gemm_gflops:.0f}%)", f"{err:.1e}"])
    print_table(["T", "ours ms", "LD-la2 ms", "loop64 ms", "naive ms", "vs LD-la2", "vs naive",
                 "ours GFLOP/s (of GEMM)", "rel err"], rows)
    print("wrote", write_results("cpu_fast_path", {"results": results}))


if __name__ == "__main__":
    main()
