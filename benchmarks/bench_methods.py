"""Every decay_attn method on this CPU: median time vs T, memory model, and a plot.

    python benchmarks/bench_methods.py [--T 16 256 1024 4096] [--quick]

Shape B=1 H=8 K=V=64, fp32, per-head decay. Writes benchmarks/results/methods_cpu.json
and methods_cpu.png; the table printed is the one in docs/methods.md.
"""
import argparse
import math

import torch

import leet_compile
from common import median_ms, print_table, write_results

# (method, backend): the fused CPU kernel for chunked, the ATen implementations for all.
KERNELS = [("chunked", "cpu"), ("chunked", "aten"), ("recursive", "aten"), ("recurrent", "aten"),
           ("fleet", "aten"), ("naive", "aten")]


def flops(method, T, K, V, C):
    """Multiply-adds x 2 per (batch, head), as each implementation here executes them."""
    if method == "naive":
        return 2 * T * T * (K + V)
    if method == "recurrent":
        return 4 * T * K * V
    if method == "chunked":
        return 2 * T * C * (K + V) + 4 * T * K * V
    if method == "recursive":  # blocks of 16 directly, then log2(T/16) merges of T K V each
        return 2 * T * 16 * (K + V) + 2 * T * K * V + T * K * V * max(0, math.ceil(math.log2(T / 16)))
    if method == "fleet":  # per rank: k_r v, log2 T scan steps of 3 T V, q_r * c
        return 3 * T * K * V * (math.ceil(math.log2(max(T, 2))) + 1)
    raise ValueError(method)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, nargs="+", default=[16, 256, 1024, 4096])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = p.parse_args()
    torch.manual_seed(0)
    B, H, K, V = 1, 8, 64, 64
    reps = 3 if args.quick else 7
    results, rows = [], []
    for T in args.T:
        q, k, v = (torch.randn(B, H, T, K) for _ in range(3))
        a = -torch.rand(H) * 0.1 - 0.01
        row = [T]
        for method, backend in KERNELS:
            budget = 1.0 if method in ("naive", "fleet") and T >= 4096 else None
            ms = median_ms(lambda: leet_compile.decay_attn(q, k, v, a, method=method, backend=backend),
                           warmup=1, reps=reps, max_seconds=budget)
            chunk = 32 if backend == "cpu" else 64  # csrc/cpu/chunked_cpu.cpp, csrc/methods.cpp
            gflops = B * H * flops(method, T, K, V, chunk) / ms / 1e6
            results.append({"T": T, "method": method, "backend": backend, "median_ms": ms, "gflops_per_s": gflops})
            row.append(f"{ms:.2f}")
        rows.append(row)
    headers = ["T"] + [f"{m} ({b})" for m, b in KERNELS]
    print(f"B={B} H={H} K=V={K} fp32, per-head decay, median ms, {torch.get_num_threads()} threads")
    print_table(headers, rows)
    print("\nmarkdown:\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    path = write_results("methods_cpu", {"shape": {"B": B, "H": H, "K": K, "V": V}, "results": results})
    print("wrote", path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, backend in KERNELS:
        pts = [(r["T"], r["median_ms"]) for r in results if r["method"] == method and r["backend"] == backend]
        ax.loglog(*zip(*pts), marker="o", label=f"{method} ({backend})")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"decay_attn methods, CPU {torch.get_num_threads()} threads, B=1 H=8 K=V=64 fp32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = path.replace(".json", ".png")
    fig.savefig(png, dpi=120)
    print("wrote", png)


if __name__ == "__main__":
    main()
