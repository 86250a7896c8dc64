"""eager / inductor / leet on a RetNet-style retention (mask built in forward).

    python benchmarks/bench_backend.py                   # T = 512 .. 16384 (about 4 min on 2 cores)
    python benchmarks/bench_backend.py --lengths 512 1024 --reps 3

Prints median times and peak memory (sampled process RSS above the baseline) for
each backend and length, skipping the naive forms (eager, inductor) at lengths whose
T x T tensors would not fit the memory budget; writes
benchmarks/results/backend_cpu.json and backend_cpu.png.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))


class Retention(nn.Module):
    """Parallel retention as RetNet code writes it: gamma ** (i - j), masked_fill."""

    def __init__(self, H):
        super().__init__()
        self.register_buffer("gamma", 1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))

    def forward(self, q, k, v):
        T = q.shape[2]
        n = torch.arange(T, device=q.device)
        d = n[:, None] - n[None, :]
        D = (self.gamma[:, None, None] ** d).masked_fill(d < 0, 0.0)
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 * D) @ v


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, reps):
    """(median seconds, peak RSS increase in bytes) over reps calls after a warm-up."""
    fn()
    base, peak, stop = rss(), [0], [False]

    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    stop[0] = True
    th.join()
    return statistics.median(times), peak[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--naive-mem-gb", type=float, default=3.0,
                   help="skip eager/inductor where the T x T tensors need more than this")
    p.add_argument("--out", default=os.path.join(HERE, "results", "backend_cpu"))
    args = p.parse_args(argv)
    import leet_compile  # noqa: F401

    B, H, D = 1, args.heads, args.dim
    model = Retention(H)
    fns = {
        "eager": model,
        "inductor": torch.compile(Retention(H), backend="inductor", dynamic=True),
        "leet": torch.compile(Retention(H), backend="leet", dynamic=True),
    }
    rows = []
    with torch.no_grad():
        for T in args.lengths:
            q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
            naive_gb = 3 * B * H * T * T * 4 / 2 ** 30  # mask, scores, weighted scores
            row = {"T": T}
            for name, fn in fns.items():
                if name != "leet" and naive_gb > args.naive_mem_gb:
                    row[name] = None
                    print(f"T={T:6d} {name:8s} skipped: T x T tensors need ~{naive_gb:.1f} GB "
                          f"(> --naive-mem-gb {args.naive_mem_gb})")
                    continue
                reps = args.reps if naive_gb < 0.5 or name == "leet" else 1
                t, mem = measure(lambda: fn(q, k, v), reps)
                row[name] = {"median_s": t, "peak_rss_mb": mem / 2 ** 20, "reps": reps}
                print(f"T={T:6d} {name:8s} {t * 1e3:10.2f} ms  peak +{mem / 2 ** 20:8.1f} MB", flush=True)
            if row["inductor"] and row["leet"]:
                row["speedup_vs_inductor"] = row["inductor"]["median_s"] / row["leet"]["median_s"]
                print(f"T={T:6d} leet is {row['speedup_vs_inductor']:.1f}x faster than inductor")
            rows.append(row)

    result = {
        "benchmark": "RetNet retention, B=1, H=%d, D=%d, fp32, torch.no_grad" % (H, D),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, args.out + ".png", result["benchmark"])
    print(f"wrote {args.out}.json and {args.out}.png")


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("eager", "inductor", "leet"):
        pts = [(r["T"], r[name]["median_s"] * 1e3) for r in rows if r.get(name)]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("median time (ms)")
    ax.set_title(title, fontsize=8)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
