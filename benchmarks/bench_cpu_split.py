"""The sequence split of the fused CPU forward (csrc/cpu/chunked_cpu_split.cpp) against the
unsplit kernel, side by side: no_grad forward, per-position decay, initial state, final state.

    python benchmarks/bench_cpu_split.py                        # the shapes of issue 15 item 3
    python benchmarks/bench_cpu_split.py --shapes 1,1,2048 --rounds 9

Each round times every variant of a shape once (the best of --number calls), so a change in
machine load hits them alike; the table gives medians over rounds, the speedup over
"unsplit" (LEET_CPU_SPLIT=0), and the 1-minute load average before and after. "auto" is the
default rule (LEET_CPU_SPLIT unset), "n" forces n segments, "heads" is a control: the same
work as 2H heads of T / 2 on the unsplit kernel, whose parallel loop over heads is the best a
2-way split can reach (on a loaded machine it shows what two threads are worth at all).
"""
import argparse
import os
import statistics
import time

import torch

from leet_compile import decay_attn


def halves(q, k, v, a, s0):
    """The same work as B * 2H heads of T / 2 (what the kernel's own parallel loop over
    heads does with 2 threads): the best a 2-way split of one head can do."""
    B, H, T, K = q.shape
    assert T % 2 == 0, "the heads control needs an even T"
    h = (lambda x: x.reshape(B, 2 * H, T // 2, x.shape[-1]))
    return h(q), h(k), h(v), a.reshape(B, 2 * H, T // 2), s0.repeat_interleave(2, dim=1)


def timed(variant, args, number):
    if variant == "heads":
        args, variant = halves(*args), "0"
    os.environ["LEET_CPU_SPLIT"] = variant
    best = float("inf")
    with torch.no_grad():
        for _ in range(number):
            t0 = time.perf_counter()
            decay_attn(*args[:4], initial_state=args[4], output_final_state=True, method="chunked", backend="cpu")
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["1,1,16384", "1,1,4096", "1,8,4096"], help="B,H,T")
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--variants", nargs="*", default=["0", "auto", "heads"])
    p.add_argument("--KV", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--number", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, K=V={args.KV}, load {os.getloadavg()[0]:.2f}")
    print(f"{'B,H,T':>12} {'dtype':>9} " + " ".join(f"{v if v != '0' else 'unsplit':>16}" for v in args.variants), flush=True)
    for shape in args.shapes:
        B, H, T = map(int, shape.split(","))
        for dt in args.dtypes:
            dtype = getattr(torch, dt)
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, T, args.KV, generator=g).to(dtype) for _ in range(3))
            a = -torch.rand(B, H, T, generator=g) * 0.1
            s0 = torch.randn(B, H, args.KV, args.KV, generator=g)
            inputs = (q, k, v, a, s0)
            for variant in args.variants:
                timed(variant, inputs, 1)  # warm-up
            times = {variant: [] for variant in args.variants}
            for _ in range(args.rounds):
                for variant in args.variants:
                    times[variant].append(timed(variant, inputs, args.number))
            med = {variant: statistics.median(ts) for variant, ts in times.items()}
            base = med[args.variants[0]]
            cells = " ".join(f"{med[v]:8.2f} ms {base / med[v]:4.2f}x" for v in args.variants)
            print(f"{shape:>12} {dt:>9} {cells}", flush=True)
    os.environ.pop("LEET_CPU_SPLIT", None)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
