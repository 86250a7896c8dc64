"""Forward vs forward + backward of decay_attn on the CPU (the fused backward of
csrc/cpu/chunked_cpu_backward.cpp, and the previous backward of three decay_attn calls).

    python benchmarks/bench_backward_cpu.py                   # B=1 H=8 K=V=64 T=4096, 2 threads
    python benchmarks/bench_backward_cpu.py --T 1024 --rounds 3
    python benchmarks/bench_backward_cpu.py --save            # benchmarks/results/backward_cpu.json

The variants of one shape are interleaved: every round times each once (the mean of
--number calls), so a change in machine load hits all of them alike; the table gives
medians over the rounds and the 1-minute load average before and after. --clock cpu
times CPU seconds (all threads) instead of wall seconds: on a shared machine it does
not count the time a thread waits for a core. Columns:
fwd (no_grad forward), fwd+bwd (forward with autograd, then backward of a random
grad_o, fused kernel), and the same with the previous backward (three decay_attn calls
with flips), each with its ratio to fwd. FLOP counts are those of the chunked
products (chunk C=32, full C x C tiles): forward 2(C^2 (K+V) + 2 C K V) per chunk,
fused backward 2(C^2 (3K+2V) + 5 C K V).
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

C = 32  # the CPU kernels' chunk (csrc/cpu)


def flops(B, H, T, K, V):
    chunks = B * H * -(-T // C)
    fwd = 2 * (C * C * (K + V) + 2 * C * K * V) * chunks
    bwd = 2 * (C * C * (3 * K + 2 * V) + 5 * C * K * V) * chunks
    return fwd, bwd


def variants(B, H, T, K, V, decay, dtype, seed=0):
    from leet_compile import decay_attn
    from leet_compile.ops import decay_attn as op_module

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g).to(dtype) for d in (K, K, V))
    a = -torch.rand(H, generator=g) * 0.3 if decay == "head" else -torch.rand(B, H, T, generator=g) * 0.3
    go = torch.randn(B, H, T, V, generator=g).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, a)]

    def fwd():
        with torch.no_grad():
            decay_attn(q, k, v, a)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        decay_attn(*leaves).backward(go)

    def fwd_bwd_previous():
        real = op_module._fused_cpu_backward
        op_module._fused_cpu_backward = lambda *args: False
        try:
            fwd_bwd()
        finally:
            op_module._fused_cpu_backward = real

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "fwd+bwd previous": fwd_bwd_previous}


def time_block(fn, number, clock=time.perf_counter):
    t0 = clock()
    for _ in range(number):
        fn()
    return (clock() - t0) / number


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--V", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians over them)")
    p.add_argument("--number", type=int, default=3, help="calls per timed block")
    p.add_argument("--decays", nargs="+", default=["head", "position"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process_time, the CPU time of all threads (steadier on a "
                        "loaded machine: time spent waiting for a core is not counted)")
    p.add_argument("--no-previous", action="store_true", help="skip the previous backward (slow)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/backward_cpu.json")
    args = p.parse_args(argv)

    import leet_compile  # noqa: F401  (registers the operator)

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    B, H, T, K, V = args.B, args.H, args.T, args.K, args.V
    f_fwd, f_bwd = flops(B, H, T, K, V)
    load_before = os.getloadavg()[0]
    rows, records = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for decay in args.decays:
            fns = variants(B, H, T, K, V, decay, dtype)
            if args.no_previous:
                fns.pop("fwd+bwd previous")
            for fn in fns.values():  # warm up (brgemm kernels, allocator)
                fn()
            samples = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    samples[name].append(time_block(fn, args.number, clock))
            med = {name: statistics.median(s) for name, s in samples.items()}
            bwd = med["fwd+bwd"] - med["fwd"]
            row = [dtype_name, decay, f"{med['fwd'] * 1e3:.2f}", f"{med['fwd+bwd'] * 1e3:.2f}",
                   f"{med['fwd+bwd'] / med['fwd']:.2f}x", f"{f_bwd / bwd / 1e9:.1f}" if bwd > 0 else "-"]
            if "fwd+bwd previous" in med:
                row += [f"{med['fwd+bwd previous'] * 1e3:.2f}", f"{med['fwd+bwd previous'] / med['fwd']:.2f}x"]
            else:
                row += ["-", "-"]
            rows.append(row)
            records.append(dict(dtype=dtype_name, decay=decay, median_s=med,
                                samples_s=samples, fwd_flops=f_fwd, fused_bwd_flops=f_bwd))
            print(" | ".join(row), flush=True)
    load_after = os.getloadavg()[0]
    print()
    print(f"B={B} H={H} T={T} K={K} V={V}, {args.threads} threads, {args.clock} clock, medians of {args.rounds} interleaved "
          f"rounds of {args.number} calls; load average (1 min) {load_before:.2f} before, {load_after:.2f} after")
    print(f"FLOPs: forward {f_fwd / 1e9:.3f} G, fused backward {f_bwd / 1e9:.3f} G ({f_bwd / f_fwd:.2f}x)")
    harness.print_table(["dtype", "decay", "fwd ms", "fwd+bwd ms", "ratio", "bwd GFLOP/s",
                         "previous fwd+bwd ms", "previous ratio"], rows)
    if args.save:
        import json

        env = harness.environment("cpu")
        env.update(load_average_1m_before=load_before, load_average_1m_after=load_after)
        out = os.path.join(harness.RESULTS, "backward_cpu.json")
        with open(out, "w") as f:
            json.dump(dict(environment=env, command=" ".join(["python"] + sys.argv), shape=dict(B=B, H=H, T=T, K=K, V=V),
                           threads=args.threads, clock=args.clock, rounds=args.rounds, number=args.number, results=records), f, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
