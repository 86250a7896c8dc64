"""The benchmark runner: every benchmark of leet-compile, one command.

    python benchmarks/run.py --list                      # suites, providers, shapes
    python benchmarks/run.py methods                     # print results as they come, write nothing
    python benchmarks/run.py methods cpu --save          # also write benchmarks/results/<suite>_<device>.{json,md}
    python benchmarks/run.py all --smoke                 # every suite at tiny sizes (a check, not a measurement)
    python benchmarks/run.py methods --methods-from benchmarks/examples/block_loop_method.py
    python benchmarks/run.py cpu --x 1024 4096 --param B=2 --threads 1 2 --save --plot

Timing: torch.utils.benchmark.Timer blocks; the median and the quartiles (q1, q3) of the
samples are reported, and ratios to a suite's baseline carry the range the quartiles
imply. The thread count is printed with every result. Suites that need CUDA are skipped
with a message where there is none.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import harness  # noqa: E402
import suites  # noqa: E402,F401  (registers the suites)


def parse_value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", help="suite names, or 'all' (default: list them)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few samples: checks the code paths, measures nothing")
    p.add_argument("--x", nargs="+", type=parse_value, help="override the suite's x values (e.g. T)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    p.add_argument("--variant", action="append", default=None, help="run only variants whose label contains this")
    p.add_argument("--provider", action="append", default=None, help="run only providers whose name contains this")
    p.add_argument("--threads", nargs="+", type=int, default=None, help="torch CPU thread counts (default: torch's)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of samples per measurement (default 0.5)")
    p.add_argument("--max-time", type=float, default=None, help="stop sampling after this (default 5)")
    p.add_argument("--min-samples", type=int, default=None, help="default 5 (3 for calls slower than --max-time)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="start no measurement after this many seconds (the rest is recorded as not run); "
                        "results so far are still printed and saved")
    p.add_argument("--methods-from", action="append", default=[], metavar="FILE",
                   help="a Python file that registers methods with harness.register_method (methods suite)")
    p.add_argument("--save", action="store_true", help="write <out>/<suite>_<device>.json and .md")
    p.add_argument("--plot", action="store_true", help="with --save: also a .png (needs matplotlib; skipped without)")
    p.add_argument("--out", default=harness.RESULTS, help="directory for --save (default benchmarks/results)")
    args = p.parse_args(argv)

    for path in args.methods_from:
        harness.load_methods_from(path)
    if args.list or not args.suites:
        for s in harness.SUITES.values():
            print(f"{s.name:12s} [{s.device}] {s.description.splitlines()[0] if s.description else ''}")
            print(f"{'':12s} {s.x_name} = {s.x_vals} (smoke: {s.smoke_x_vals}); params {s.params}")
            if s.variants != [{}]:
                print(f"{'':12s} variants: {[variant_label(v) for v in s.variants]}")
        if harness.METHODS:
            print("registered methods:", ", ".join(harness.METHODS))
        return 0
    names = list(harness.SUITES) if args.suites == ["all"] else args.suites
    unknown = [n for n in names if n not in harness.SUITES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; known: {list(harness.SUITES)}")
    args.deadline_at = time.time() + args.deadline if args.deadline else None
    failures = 0
    for name in names:
        failures += run_suite(harness.SUITES[name], args)
    return 1 if failures else 0


def variant_label(v):
    return " ".join(f"{k}={val}" for k, val in v.items())


def run_suite(s, args):
    params = dict(s.params)
    if args.smoke:
        params.update(s.smoke_params)
    for item in args.param:
        key, _, value = item.partition("=")
        if key not in params:
            if args.suites == ["all"]:
                continue  # a parameter of another suite
            print(f"== {s.name}: unknown parameter {key!r} (known: {list(params)})")
            return 1
        params[key] = parse_value(value)
    device = params.get("device", s.device)
    if device == "cuda" and not torch.cuda.is_available():
        print(f"== {s.name}: skipped, needs a CUDA device (torch.cuda.is_available() is False; "
              "a dry run on CPU: --param device=cpu)")
        return 0
    xs = args.x or (s.smoke_x_vals if args.smoke else s.x_vals)
    threads_list = args.threads or [torch.get_num_threads()]
    timing = dict(min_time=0.5, max_time=5.0, min_samples=5)
    if args.smoke:
        timing = dict(min_time=0.0, max_time=0.05, min_samples=1)
    for key in ("min_time", "max_time", "min_samples"):
        if getattr(args, key) is not None:
            timing[key] = getattr(args, key)
    variants = [v for v in s.variants if not args.variant or any(f in variant_label(v) for f in args.variant)]
    env = harness.environment(device)
    print(f"== {s.name}: {s.description.splitlines()[0] if s.description else ''}")
    print(f"   {env['device']}; torch {env['torch']}; threads {threads_list}; {s.x_name} = {xs}; params {params}"
          f"{'; SMOKE RUN (tiny sizes, timings meaningless)' if args.smoke else ''}", flush=True)
    extra = {"params": dict(params), "smoke": args.smoke, "timing": timing}
    failed = 0
    if s.prepare is not None:
        t0 = time.perf_counter()
        try:
            prepared = s.prepare(params, args)
        except Exception as e:
            print(f"   prepare failed: {type(e).__name__}: {e}")
            return 1
        extra.update(prepared.pop("_record", {}))
        if prepared.pop("_failed", False):
            failed = 1
        params.update(prepared)
        print(f"   prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    total = len(variants) * len(xs) * len(threads_list)
    done = 0
    start = time.perf_counter()
    for variant in variants:
        label = variant_label(variant)
        for threads in threads_list:
            torch.set_num_threads(threads)
            for x in xs:
                done += 1
                if args.deadline_at and time.time() > args.deadline_at:
                    print(f"   [{done}/{total}] {s.x_name}={x} {label}: not run (past the --deadline)", flush=True)
                    results.append({"variant": label, "x": x, "threads": threads, "provider": "(all)",
                                    "median_s": None, "note": f"not run: past the --deadline of {args.deadline:g} s"})
                    continue
                try:
                    case = s.fn(x, **{**params, **variant})
                except Exception as e:
                    print(f"   [{done}/{total}] {s.x_name}={x} {label}: setup failed: {type(e).__name__}: {e}", flush=True)
                    results.append({"variant": label, "x": x, "threads": threads, "provider": "(setup)",
                                    "median_s": None, "note": f"setup failed: {type(e).__name__}: {e}"})
                    failed = 1
                    continue
                for provider, fn in case.fns.items():
                    if args.provider and not any(f in provider for f in args.provider):
                        continue
                    r = {"variant": label, "x": x, "threads": threads, "provider": provider, "median_s": None}
                    r.update({k: harness.nan_safe(v) for k, v in case.info.get(provider, {}).items()})
                    results.append(r)
                    head = f"   [{done}/{total}] {s.x_name}={x:<6} {label + ' ' if label else ''}{provider:28s}"
                    if args.deadline_at and time.time() > args.deadline_at and not isinstance(fn, str):
                        fn = f"not run: past the --deadline of {args.deadline:g} s"
                    if isinstance(fn, str):
                        r["note"] = fn
                        print(f"{head} not run: {fn}", flush=True)
                        continue
                    try:
                        t = harness.measure(fn, threads=threads, **timing)
                    except Exception as e:  # one provider failing must not stop the others
                        r["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        print(f"{head} FAILED: {r['note']}", flush=True)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    r.update(median_s=t.median, q1_s=t.q1, q3_s=t.q3, samples=t.n, calls_per_sample=t.number)
                    flops = case.flops.get(provider) if isinstance(case.flops, dict) else case.flops
                    gflops = ""
                    if flops:
                        r["gflops_per_s"] = flops / t.median / 1e9
                        gflops = f"  {r['gflops_per_s']:.1f} GFLOP/s"
                        if provider in case.peak:
                            name, rate = case.peak[provider]
                            r.update(peak=name, peak_gflops_per_s=rate, pct_of_peak=100 * r["gflops_per_s"] / rate)
                            gflops += f" ({r['pct_of_peak']:.1f}% of {name} {rate:.0f})"
                    print(f"{head} {harness.fmt_time(t.median, s.unit):>8} {s.unit}  IQR {harness.fmt_time(t.iqr, s.unit)}"
                          f"  (n={t.n}x{t.number}, {threads} thr){gflops}", flush=True)
                del case
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if args.save:  # after every x: a run stopped from outside keeps what it measured
                    save(s, env, results, dict(extra, complete=False), args)
    print(harness.tables(s, results))
    print(f"   {s.name}: {time.perf_counter() - start:.1f} s")
    if args.save:
        base = save(s, env, results, dict(extra, complete=True), args)
        written = [base + ".json", base + ".md"]
        if args.plot:
            png = harness.plot(s, results, base + ".png")
            if png:
                written.append(png)
        print("   wrote " + ", ".join(written))
    elif args.plot:
        print("   --plot needs --save (nothing is written without it)")
    return failed


def save(s, env, results, extra, args):
    basename = getattr(s.fn, "save_as", None)
    basename = basename(env) if callable(basename) else None
    return harness.write_results(s, env, results, extra, args.out, basename)


if __name__ == "__main__":
    sys.exit(main())
