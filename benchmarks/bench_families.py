"""eager / inductor / leet on each public model family of issue 10 (tests/public_models.py).

    python benchmarks/bench_families.py                      # T = 4096, every family
    python benchmarks/bench_families.py --T 256 --reps 1     # a quick run
    python benchmarks/bench_families.py --only mamba2_ssd_diag fla_naive_retention --save

One row per family: median forward time (torch.no_grad) of the model as written, run
eagerly, compiled by Inductor, and compiled by the "leet" backend, with the number of
sites the leet backend rewrote (0 means leet is Inductor on the same graph).  Families
whose code loops in Python over every position (Lightning's mask, the GLA recurrence)
are compiled only up to --max-loop-T (dynamo unrolls the loop); larger T reports them as
skipped.  Results are written only with --save (benchmarks/results/families_cpu.json).
"""
import argparse
import inspect
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from common import median_ms, print_table, write_results  # noqa: E402

#: families with a Python loop over positions (the compiled graph grows with T)
LOOPS_OVER_T = {"lightning_slopes", "leetdecoding_vanilla_slopes", "fla_gla_recurrent"}


def build(make, heads, dim, chunk):
    """The family's model at benchmark sizes (each constructor names its sizes its own way)."""
    target = make.func if hasattr(make, "func") else make
    params = inspect.signature(target).parameters
    sizes = {"heads": heads, "head_dim": dim, "key_dim": dim, "d_state": dim,
             "embed_dim": heads * dim, "value_dim": heads * dim, "chunk_size": chunk, "block_len": chunk}
    return make(**{k: v for k, v in sizes.items() if k in params})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=4096, help="sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head dimension (and SSM state size)")
    p.add_argument("--chunk", type=int, default=64, help="chunk length of the chunked families")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-loop-T", type=int, default=256,
                   help="compile families that loop over positions only up to this T")
    p.add_argument("--only", nargs="+", default=None, help="family names (default: all)")
    p.add_argument("--backends", nargs="+", default=["eager", "inductor", "leet"])
    p.add_argument("--save", action="store_true", help="write benchmarks/results/families_cpu.json")
    args = p.parse_args(argv)

    import leet_compile  # noqa: F401  (registers the backend and the operator)
    import public_models
    from torch._dynamo.utils import counters

    families = public_models.FAMILIES + public_models.NEGATIVES
    if args.only:
        unknown = set(args.only) - {n for n, _, _ in families}
        if unknown:
            p.error(f"unknown families {sorted(unknown)}")
        families = [f for f in families if f[0] in args.only]

    rows, table = [], []
    T = args.T
    for name, make, note in families:
        model = build(make, args.heads, args.dim, args.chunk)
        if getattr(model, "needs_einops", False) and public_models.einops is None:
            print(f"{name}: skipped (einops is not installed)", flush=True)
            continue
        if T % args.chunk and "block_len" in inspect.signature(getattr(make, "func", make)).parameters:
            print(f"{name}: skipped (T={T} is not a multiple of --chunk {args.chunk})", flush=True)
            continue
        inputs = model.example_inputs(T, B=args.batch)
        row = {"family": name, "T": T, "note": note}
        with torch.no_grad():
            for backend in args.backends:
                if backend != "eager" and name in LOOPS_OVER_T and T > args.max_loop_T:
                    row[backend] = None
                    print(f"{name:30s} {backend:8s} skipped (loops over T in Python; --max-loop-T "
                          f"{args.max_loop_T})", flush=True)
                    continue
                torch._dynamo.reset()
                counters.clear()
                fn = model if backend == "eager" else torch.compile(model, backend=backend)
                print(f"{name:30s} {backend:8s} ...", end=" ", flush=True)
                try:
                    ms = median_ms(lambda: fn(*inputs), warmup=2, reps=args.reps)  # the first call compiles
                except Exception as e:  # report and go on: one family must not stop the table
                    row[backend] = {"error": repr(e)[:300]}
                    print(f"failed: {e!r}"[:300], flush=True)
                    continue
                row[backend] = {"median_ms": ms}
                if backend == "leet":
                    row["rewrites"] = counters["leet"]["decay_attn_rewrites"]
                print(f"{ms:10.2f} ms", flush=True)
        ind, leet = row.get("inductor"), row.get("leet")
        if ind and leet and "median_ms" in ind and "median_ms" in leet:
            row["speedup_vs_inductor"] = ind["median_ms"] / leet["median_ms"]
        rows.append(row)

        def cell(b):
            r = row.get(b)
            return "-" if not r else ("error" if "error" in r else f"{r['median_ms']:.2f}")

        table.append([name, T] + [cell(b) for b in args.backends] + [
            row.get("rewrites", "-"),
            f"{row['speedup_vs_inductor']:.2f}x" if "speedup_vs_inductor" in row else "-"])
        torch._dynamo.reset()

    print()
    print_table(["family", "T"] + [f"{b} ms" for b in args.backends] + ["rewrites", "leet vs inductor"], table)
    if args.save:
        path = write_results("families_cpu", {
            "benchmark": f"public model families, B={args.batch}, H={args.heads}, D={args.dim}, "
                         f"chunk={args.chunk}, fp32, torch.no_grad, forward only",
            "rows": rows,
        })
        print("wrote", path)


if __name__ == "__main__":
    main()
