"""The benchmark harness: a registry of suites (shapes x providers, in the style of
triton.testing.perf_report / flash-linear-attention's benchmarks), one timer, one
machine description, one table printer, optional plots, and the registry of
computation methods a researcher adds (:func:`register_method`).

A suite is a function of one x value (usually T) and its parameters that returns a
:class:`Case`: ``{provider: zero-argument callable}`` (or a string saying why the
provider does not run at that x). The runner (benchmarks/run.py) times every callable
with ``torch.utils.benchmark`` (median and interquartile range over repeated blocks,
the thread count stated), prints each result as it comes, and writes files only with
``--save``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.utils.benchmark as tbench

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# --------------------------------------------------------------------------- registry


@dataclasses.dataclass
class Case:
    """What a suite returns for one x: the callables to time and optional extras.

    fns: provider -> zero-argument callable (must finish its work; CUDA is synchronized
         by the timer), or a string: the reason this provider does not run here.
    flops: provider -> FLOPs of one call (adds a GFLOP/s column), or one number for all.
    info: extra per-x facts recorded with the results (errors, sizes).
    peak: provider -> (name, GFLOP/s) of the rate to compare with, measured in the same
         run (the matching dtype's GEMM): adds a "% of <name>" figure to that provider.
    """

    fns: dict
    flops: dict | float | None = None
    info: dict = dataclasses.field(default_factory=dict)
    peak: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Suite:
    name: str
    fn: Callable  # fn(x, **params) -> Case
    x_name: str
    x_vals: list
    smoke_x_vals: list
    params: dict
    smoke_params: dict
    variants: list  # list of dicts merged into params; [{}] when none
    device: str  # "cpu" or "cuda"
    baseline: str | None  # provider the others are compared with (ratio column)
    description: str
    prepare: Callable | None = None  # prepare(params, args) -> dict merged into params (once per run)
    unit: str = "ms"


SUITES: dict[str, Suite] = {}


def suite(name, *, x_name, x_vals, smoke_x_vals=None, params=None, smoke_params=None, variants=None,
          device="cpu", baseline=None, prepare=None, unit="ms"):
    """Registers a benchmark suite (decorator). See benchmarks/suites/*.py."""

    def wrap(fn):
        SUITES[name] = Suite(
            name=name, fn=fn, x_name=x_name, x_vals=list(x_vals),
            smoke_x_vals=list(smoke_x_vals or x_vals[:1]), params=dict(params or {}),
            smoke_params=dict(smoke_params or {}), variants=list(variants or [{}]), device=device,
            baseline=baseline, description=(fn.__doc__ or "").strip(), prepare=prepare, unit=unit)
        return fn

    return wrap


# ------------------------------------------------------------- researchers' methods


@dataclasses.dataclass
class Method:
    name: str
    fn: Callable  # fn(q, k, v, log_decay, scale) -> o
    decays: tuple  # which decay forms it supports: "none", "head", "position"
    verified: dict = dataclasses.field(default_factory=dict)  # decay form -> relative error or message


METHODS: dict[str, Method] = {}


def register_method(name, *, decays=("none", "head", "position")):
    """Registers a computation method, a plain Python function

        fn(q, k, v, log_decay, scale) -> o

    with q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, log_decay ``None`` / ``[H]`` /
    ``[B, H, T]`` (natural-log decay) and o ``[B, H, T, V]``. ``decays`` names the decay
    forms it handles. The ``methods`` suite verifies it against the float64 recurrence
    (every form in ``decays``) and times it beside the built-in methods::

        python benchmarks/run.py methods --methods-from my_method.py
    """

    def wrap(fn):
        bad = set(decays) - {"none", "head", "position"}
        if bad:
            raise ValueError(f"register_method: unknown decay forms {sorted(bad)}")
        METHODS[name] = Method(name, fn, tuple(decays))
        return fn

    return wrap


def load_methods_from(path):
    """Imports a file that calls register_method (its methods join the methods suite)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"user_methods_{len(METHODS)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------- float64 reference


def reference(q, k, v, log_decay=None, scale=1.0):
    """The definition, token by token in float64 on CPU: S_t = exp(a_t) S_{t-1} + k_t^T v_t,
    o_t = scale q_t S_t. For verification at small T only."""
    q, k, v = (x.detach().double().cpu() for x in (q, k, v))
    B, H, T, K = q.shape
    if log_decay is None:
        a = torch.zeros(B, H, T, dtype=torch.float64)
    else:
        a = log_decay.detach().double().cpu()
        a = a.view(1, H, 1).expand(B, H, T) if a.dim() == 1 else a
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    o = torch.empty(B, H, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        S = S * a[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o * scale


def rel_err(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def verification_inputs(decay, B=2, H=3, T=67, K=16, V=24, seed=0, device="cpu"):
    """Random float32 inputs (odd T, K != V) for one decay form."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g)
    a = {"none": None, "head": -0.3 * torch.rand(H, generator=g) - 0.01,
         "position": -0.3 * torch.rand(B, H, T, generator=g) - 0.01}[decay]
    to = (lambda t: None if t is None else t.to(device))
    return to(q), to(k), to(v), to(a)


def verify(fn, decays, tol=1e-4, device="cpu"):
    """{decay form: relative error vs float64, or an error message}; ok when all <= tol."""
    out = {}
    for decay in decays:
        q, k, v, a = verification_inputs(decay, device=device)
        scale = q.shape[-1] ** -0.5
        try:
            o = fn(q, k, v, a, scale)
            out[decay] = rel_err(o, reference(q, k, v, a, scale))
        except Exception as e:  # a method failing one form must not stop the run
            out[decay] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    ok = all(isinstance(e, float) and e <= tol for e in out.values())
    return ok, out


# -------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    median: float  # seconds per call
    q1: float
    q3: float
    n: int  # samples (each the mean of `number` calls)
    number: int
    threads: int

    @property
    def iqr(self):
        return self.q3 - self.q1


def measure(fn, *, threads, min_time=0.5, max_time=5.0, min_samples=5, max_samples=50, warmup=1):
    """Median and quartiles of fn()'s time with torch.utils.benchmark.Timer.

    Each sample is one Timer.timeit(number) block (number chosen so a block takes about
    10 ms, or one call); samples are drawn until min_time has passed and min_samples
    exist, and stop at max_time (at least 3 samples for calls slower than that) or
    max_samples. Timer synchronizes CUDA around each block.
    """
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) / max(warmup, 1), 1e-7)
    number = max(1, int(0.01 / est))
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    samples = []
    start = time.perf_counter()
    while True:
        samples.append(timer.timeit(number).mean)
        elapsed = time.perf_counter() - start
        if len(samples) >= max_samples:
            break
        if elapsed >= min_time and len(samples) >= min_samples:
            break
        if elapsed >= max_time and len(samples) >= min(3, min_samples):
            break
    qs = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(statistics.median(samples), qs[0], qs[2], len(samples), number, threads)


def ratio_with_spread(base: Timing, other: Timing):
    """other/base median ratio and the range implied by the quartiles (q1/q3 .. q3/q1)."""
    return other.median / base.median, other.q1 / base.q3, other.q3 / base.q1


# --------------------------------------------------------------------- environment


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU extensions the kernels choose by (csrc/cpu): vector width, bf16 / fp16 units.
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_features():
    """Those of CPU_FEATURES /proc/cpuinfo lists, and torch's CPU capability (None where unknown)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return None
    have = [x for x in CPU_FEATURES if x in flags]
    return " ".join(have) + f" (torch: {torch.backends.cpu.get_cpu_capability()})"


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "fla"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    try:
        import importlib.metadata as md

        out["leet-compile"] = md.version("leet-compile")
    except Exception:
        out["leet-compile"] = None
    return out


def environment(device="cpu"):
    env = {"cpu": cpu_name(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "platform": platform.platform(), **versions(),
           "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           # the C allocator's settings: a fresh output of >= 32 MB is page-faulted in on
           # every call unless they change it (docs/methods.md)
           "allocator": " ".join(f"{k}={os.environ[k]}" for k in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_")
                                 if k in os.environ) or "default",
           "command": shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])}
    if device == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["driver"] = None
        if shutil.which("nvidia-smi"):
            try:
                env["driver"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
            except (OSError, subprocess.SubprocessError):
                pass
    else:
        env["device"] = f"CPU: {env['cpu']}"
    return env


def device_slug(env):
    return re.sub(r"[^A-Za-z0-9]+", "_", env["device"].replace("CPU: ", "cpu ")).strip("_").lower()


# ------------------------------------------------------------------------ reports


def fmt_time(seconds, unit="ms"):
    scale = {"ms": 1e3, "us": 1e6, "s": 1.0}[unit]
    v = seconds * scale
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def result_cell(r, unit):
    if r.get("median_s") is None:
        return "–"
    return f"{fmt_time(r['median_s'], unit)} [{fmt_time(r['q1_s'], unit)}, {fmt_time(r['q3_s'], unit)}]"


def print_table(headers, rows, out=sys.stdout):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    print(line, file=out)
    print("-" * len(line), file=out)
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)), file=out)


_TIMING_KEYS = {"variant", "x", "threads", "provider", "median_s", "q1_s", "q3_s", "samples", "calls_per_sample",
                "note", "gflops_per_s", "peak", "peak_gflops_per_s", "pct_of_peak"}


def tables(s: Suite, results, markdown=False):
    """One table per variant: rows x, columns providers (median [q1, q3]); plus ratios to
    the baseline with their spread. Returns the text."""
    import io

    buf = io.StringIO()
    for label in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == label]
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        threads = sorted({r["threads"] for r in rs if r.get("threads")})
        xs = list(dict.fromkeys((r["x"], r["threads"]) for r in rs))
        title = f"{s.name}{' ' + label if label else ''}: median {s.unit} [q1, q3], {'/'.join(map(str, threads))} thread(s)"
        headers = [s.x_name] + (["threads"] if len(threads) > 1 else []) + providers
        rows = []
        for x, th in xs:
            row = [x] + ([th] if len(threads) > 1 else [])
            for p in providers:
                r = next((r for r in rs if r["x"] == x and r["threads"] == th and r["provider"] == p), None)
                row.append(result_cell(r, s.unit) if r else "")
            rows.append(row)
        ratio_rows = []
        if s.baseline and s.baseline in providers:
            for x, th in xs:
                base = next((r for r in rs if r["x"] == x and r["threads"] == th and r["provider"] == s.baseline), None)
                if not base or base.get("median_s") is None:
                    continue
                row = [x] + ([th] if len(threads) > 1 else [])
                for p in providers:
                    r = next((r for r in rs if r["x"] == x and r["threads"] == th and r["provider"] == p), None)
                    if not r or r.get("median_s") is None:
                        row.append("–")
                        continue
                    m = r["median_s"] / base["median_s"]
                    lo, hi = r["q1_s"] / base["q3_s"], r["q3_s"] / base["q1_s"]
                    row.append(f"{m:.3g}x [{lo:.3g}, {hi:.3g}]")
                ratio_rows.append(row)
        if markdown:
            print(f"### {title}\n", file=buf)
            print("| " + " | ".join(map(str, headers)) + " |", file=buf)
            print("|" + "---:|" * len(headers), file=buf)
            for row in rows:
                print("| " + " | ".join(map(str, row)) + " |", file=buf)
            if ratio_rows:
                print(f"\ntime / time of `{s.baseline}` (median [range from the quartiles]):\n", file=buf)
                print("| " + " | ".join(map(str, headers)) + " |", file=buf)
                print("|" + "---:|" * len(headers), file=buf)
                for row in ratio_rows:
                    print("| " + " | ".join(map(str, row)) + " |", file=buf)
            print("", file=buf)
        else:
            print(f"\n{title}", file=buf)
            print_table(headers, rows, out=buf)
            if ratio_rows:
                print(f"time / time of '{s.baseline}' (median ratio [range from the quartiles]; >1: slower)", file=buf)
                print_table(headers, ratio_rows, out=buf)
        peak_rows = []
        if any(r.get("pct_of_peak") is not None for r in rs):
            for x, th in xs:
                row = [x] + ([th] if len(threads) > 1 else [])
                for p in providers:
                    r = next((r for r in rs if r["x"] == x and r["threads"] == th and r["provider"] == p), None)
                    if r and r.get("pct_of_peak") is not None:
                        row.append(f"{r['gflops_per_s']:.1f} ({r['pct_of_peak']:.1f}% of {r['peak']})")
                    elif r and r.get("gflops_per_s") is not None:
                        row.append(f"{r['gflops_per_s']:.1f}")
                    else:
                        row.append("–")
                peak_rows.append(row)
        if peak_rows:
            note = "GFLOP/s (% of GEMM: the matching dtype's GEMM rate named in each cell, measured in this run at the same threads)"
            if markdown:
                print(f"\n{note}:\n", file=buf)
                print("| " + " | ".join(map(str, headers)) + " |", file=buf)
                print("|" + "---:|" * len(headers), file=buf)
                for row in peak_rows:
                    print("| " + " | ".join(map(str, row)) + " |", file=buf)
                print("", file=buf)
            else:
                print(note, file=buf)
                print_table(headers, peak_rows, out=buf)
        for r in rs:  # what the suite recorded besides times (errors, rewrite counts)
            facts = {k: v for k, v in r.items() if k not in _TIMING_KEYS}
            if facts:
                text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items())
                print(f"{'- ' if markdown else '  '}{s.x_name}={r['x']} {r['provider']}: {text}", file=buf)
    notes = [r for r in results if r.get("note")]
    if notes:
        print(("\n" if not markdown else "") + "Not timed:" + ("\n" if markdown else ""), file=buf)
        seen = set()
        for r in notes:
            key = (r["variant"], r["provider"], r["note"])
            if key not in seen:
                seen.add(key)
                print(f"{'- ' if markdown else '  '}{r['provider']}{' (' + r['variant'] + ')' if r['variant'] else ''}"
                      f" at {s.x_name}={r['x']}: {r['note']}", file=buf)
    return buf.getvalue()


def write_results(s: Suite, env, results, extra, out_dir, basename=None):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, basename or f"{s.name}_{'cpu' if s.device == 'cpu' else device_slug(env)}")
    payload = {"suite": s.name, "description": s.description, "environment": env, "x_name": s.x_name,
               "unit_of_median": "seconds", **extra, "results": results}
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=2, default=str)
    lines = [f"# {s.name}: {s.description.splitlines()[0] if s.description else ''}", ""]
    keys = ("device", "driver", "cpu", "cpu_features", "torch_threads", "allocator", "torch", "cuda", "triton",
            "fla", "leet-compile", "date", "command")
    lines += [f"- {k}: `{env.get(k)}`" for k in keys if k in env]
    lines += ["", tables(s, results, markdown=True)]
    if extra:
        lines += ["```json", json.dumps(extra, indent=1, default=str)[:20000], "```", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    return base


def plot(s: Suite, results, path):
    """Time vs x per provider, one panel per variant; skipped (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"plot skipped: matplotlib unavailable ({type(e).__name__})")
        return None
    try:
        labels = list(dict.fromkeys(r["variant"] for r in results))
        fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
        for ax, label in zip(axes[0], labels):
            for p in dict.fromkeys(r["provider"] for r in results):
                pts = [(r["x"], r["median_s"] * 1e3, r["q1_s"] * 1e3, r["q3_s"] * 1e3) for r in results
                       if r["variant"] == label and r["provider"] == p and r.get("median_s")]
                if pts:
                    x, m, lo, hi = zip(*pts)
                    ax.errorbar(x, m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]],
                                marker="o", capsize=2, label=p)
            ax.set(xscale="log", yscale="log", xlabel=s.x_name, ylabel="median ms (IQR bars)",
                   title=f"{s.name} {label}".strip())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    except Exception as e:  # a plot is never worth losing a run for
        print(f"plot failed ({type(e).__name__}: {e}); results are unaffected")
        return None


def nan_safe(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
