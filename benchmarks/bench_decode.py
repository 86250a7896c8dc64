"""Decoding throughput: one decay_attn step vs recomputing the whole sequence.

For each batch size B, a context of T tokens is prefilled once; then, interleaved in
one run (so both see the same machine state), we time
  * step:      decay_attn_step_ (in place) for one new token, O(K V) per head;
  * step (functional): decay_attn_step, which allocates the new state;
  * recompute: decay_attn on the whole T + 1 tokens (what a model without a state
    would do for every generated token), O(T) per head at best.
and report medians, tokens/s (B tokens per call) and the recompute / step ratio.

    python benchmarks/bench_decode.py                 # H=8, K=V=64, T=4096, B in 1 8 32
    python benchmarks/bench_decode.py --batch 1 --context 1024 --rounds 3
    python benchmarks/bench_decode.py --threads 1 2   # 1 thread is robust on a shared, busy machine
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

import leet_compile


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seconds(fn, repeat):
    """Mean wall time of `repeat` calls of fn (one timing sample)."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench(B, H, T, K, V, rounds, steps_per_sample, dtype):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T + 1, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T + 1, V, generator=g, dtype=dtype)
    a = -torch.rand(H, generator=g) * 0.1
    scale = K**-0.5
    _, state = leet_compile.decay_attn(
        q[:, :, :T], k[:, :, :T], v[:, :, :T], a, scale=scale, output_final_state=True
    )
    qt, kt, vt = (x[:, :, T].contiguous() for x in (q, k, v))
    work = state.clone()  # the in-place step keeps updating this copy (values stay bounded: decay < 1)

    def step_inplace():
        leet_compile.decay_attn_step_(qt, kt, vt, a, work, scale=scale)

    def step_functional():
        leet_compile.decay_attn_step(qt, kt, vt, a, state, scale=scale)

    def recompute():
        leet_compile.decay_attn(q, k, v, a, scale=scale)

    # the new token's output agrees both ways
    o_step, _ = leet_compile.decay_attn_step(qt, kt, vt, a, state, scale=scale)
    o_full = leet_compile.decay_attn(q, k, v, a, scale=scale)[:, :, T]
    max_err = (o_step.double() - o_full.double()).abs().max().item()

    for fn in (step_inplace, step_functional, recompute):  # warm-up
        fn()
    samples = {"step_inplace": [], "step_functional": [], "recompute": []}
    for _ in range(rounds):  # interleaved: medians side by side
        samples["step_inplace"].append(seconds(step_inplace, steps_per_sample))
        samples["step_functional"].append(seconds(step_functional, steps_per_sample))
        samples["recompute"].append(seconds(recompute, 1))
    med = {name: statistics.median(xs) for name, xs in samples.items()}
    return {
        "B": B, "H": H, "context": T, "K": K, "V": V, "dtype": str(dtype).replace("torch.", ""),
        "median_s": med,
        "tokens_per_s": {name: B / s for name, s in med.items()},
        "recompute_over_step": med["recompute"] / med["step_inplace"],
        "recompute_over_step_functional": med["recompute"] / med["step_functional"],
        "max_abs_diff_step_vs_full": max_err,
        "rounds": rounds,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-sample", type=int, default=50)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                   help="torch CPU thread counts to run (default: torch's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "decode_cpu.json"))
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()

    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"H={args.heads} K={args.dk} V={args.dv} context={args.context} {args.dtype}, "
              f"{threads} thread(s), medians of {args.rounds} interleaved rounds")
        print(f"{'B':>4} {'step ms':>9} {'step tok/s':>11} {'fn step ms':>10} {'recompute ms':>13} "
              f"{'recompute tok/s':>15} {'ratio':>8}")
        for B in args.batch:
            r = bench(B, args.heads, args.context, args.dk, args.dv, args.rounds, args.steps_per_sample, dtype)
            r["threads"] = threads
            results.append(r)
            m, tps = r["median_s"], r["tokens_per_s"]
            print(f"{B:>4} {m['step_inplace'] * 1e3:>9.3f} {tps['step_inplace']:>11.0f} "
                  f"{m['step_functional'] * 1e3:>10.3f} {m['recompute'] * 1e3:>13.1f} "
                  f"{tps['recompute']:>15.1f} {r['recompute_over_step']:>7.0f}x", flush=True)

    report = {
        "benchmark": "decode step vs full recompute (decay_attn_step_ / decay_attn_step vs decay_attn)",
        "machine": {
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
