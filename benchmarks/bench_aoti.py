"""AOTInductor package speed, CPU: a RetNet-style block packaged as written (naive
masked retention, O(T^2) memory) vs packaged after leet_compile.export (the
retention rewritten into leet.decay_attn).

Each model is exported once with a dynamic sequence length and compiled into one
package that serves every T; the table gives the median forward time per T.

    python benchmarks/bench_aoti.py                       # T = 1024 4096
    python benchmarks/bench_aoti.py --lengths 512 --repeats 3 --out /tmp/x.json

Writes benchmarks/results/aoti_cpu.json (machine, torch version, date, command).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import leet_compile


class RetNetBlock(torch.nn.Module):
    """Multi-scale retention (parallel form) as public RetNet code writes it:
    gamma_h = 1 - 2^(-5 - h), D = tril(gamma ** (i - j)), ((q k^T) * D) v."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out_proj = torch.nn.Linear(dim, dim, bias=False)
        self.register_buffer("gamma", 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32)), persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2) for p in self.qkv)
        index = torch.arange(T, device=x.device)
        mask = torch.tril(self.gamma[:, None, None] ** (index[:, None] - index[None, :]))
        o = ((q @ k.transpose(-1, -2)) * self.head_dim**-0.5 * mask) @ v
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


def median_ms(runners, x, repeats, warmup=2):
    """Median time per runner in ms. Runs alternate within each repeat, so that load
    from other processes hits all runners alike."""
    for _ in range(warmup):
        for run in runners.values():
            run(x)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            # other work on the machine skews timings; recorded so readers can tell
            "load_average_1m_at_start": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "aoti_cpu.json"))
    args = parser.parse_args()
    host = machine()  # before the work starts (load average)

    torch.manual_seed(0)
    model = RetNetBlock(args.dim, args.heads).eval()
    example = (torch.randn(args.batch, 64, args.dim),)
    dynamic = ({1: torch.export.Dim("T", min=2, max=max(args.lengths))},)
    programs = {
        "naive": torch.export.export(model, example, dynamic_shapes=dynamic),
        "leet": leet_compile.export(model, example, dynamic_shapes=dynamic),
    }
    n_ops = sum(n.target is torch.ops.leet.decay_attn.default for n in programs["leet"].graph.nodes)
    if n_ops != 1:
        sys.exit(f"expected one leet.decay_attn in the exported graph, found {n_ops}")

    runners, compile_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ep in programs.items():
            start = time.perf_counter()
            path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/{name}.pt2")
            compile_s[name] = time.perf_counter() - start
            runners[name] = leet_compile.load_package(path)

    rows = []
    with torch.no_grad():
        for T in args.lengths:
            x = torch.randn(args.batch, T, args.dim)
            err = (runners["leet"](x) - model(x)).abs().max().item()
            ms = median_ms(runners, x, args.repeats)
            rows.append({"T": T, "naive_ms": ms["naive"], "leet_ms": ms["leet"],
                         "speedup": ms["naive"] / ms["leet"], "max_abs_err_vs_eager": err})

    print(f"AOTInductor packages, CPU, B={args.batch} dim={args.dim} heads={args.heads}, "
          f"median of {args.repeats}, load average {host['load_average_1m_at_start']:.1f}")
    print(f"{'T':>6} {'naive ms':>10} {'leet ms':>10} {'naive/leet':>11}")
    for r in rows:
        print(f"{r['T']:>6} {r['naive_ms']:>10.2f} {r['leet_ms']:>10.2f} {r['speedup']:>10.2f}x")

    result = {
        "benchmark": "AOTInductor package, RetNet-style block: naive masked retention vs leet.decay_attn",
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": host,
        "shapes": {"batch": args.batch, "dim": args.dim, "heads": args.heads, "lengths": args.lengths},
        "repeats": args.repeats,
        "compile_s": compile_s,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
