"""GPU benchmark of decay_attn: our Triton and CUDA paths side by side with
flash-linear-attention (chunk_simple_gla, fused_recurrent_simple_gla for decoding)
and the naive masked form (eager and torch.compile).

    python benchmarks/bench_gpu.py                       # B=8 H=16 K=V=128 bf16, T=1024..32768
    python benchmarks/bench_gpu.py --T 1024 4096 --quick # a short run

Writes benchmarks/results/<device>.json, <device>.md (table with device, driver,
versions, date, command) and <device>.png (time vs T, when matplotlib is installed).
The accuracy check compares each implementation's bf16 output with a float64
computation and requires ours to be within 2x the naive bf16 error (exit status 1
otherwise). Without CUDA it prints a message and exits 0.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cuda_ms(fn, warmup=3, reps=10):
    """Median time of fn() in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def naive(q, k, v, log_decay, scale):
    """The masked form users write: ((q k^T) * D) v with D from the (segment-summed) log decay."""
    T = q.shape[2]
    i = torch.arange(T, device=q.device)
    causal = i[:, None] >= i[None, :]
    if log_decay.dim() == 1:  # [H]
        expo = (i[:, None] - i[None, :]).to(log_decay.dtype) * log_decay[:, None, None]
    else:  # [B, H, T]: segment sums through a cumsum
        g = log_decay.cumsum(-1)  # in the decay's dtype (float32; float64 for the reference)
        expo = g[..., :, None] - g[..., None, :]
    D = torch.where(causal, torch.exp(torch.where(causal, expo, float("-inf"))), 0.0).to(q.dtype)
    return ((q @ k.transpose(-1, -2)) * scale * D) @ v


def make_problem(B, H, T, K, V, dtype, decay, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, device="cuda", generator=g).to(dtype) for d in (K, K, V))
    if decay == "head":  # RetNet-style gammas 1 - 2^(-5 - h)
        a = torch.log1p(-torch.exp2(-5.0 - torch.arange(H, device="cuda", dtype=torch.float32) * 0.5))
    else:  # data-dependent gates, log sigmoid
        a = torch.nn.functional.logsigmoid(torch.randn(B, H, T, device="cuda", generator=g) + 4.0)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, a


def implementations(args):
    """name -> callable(q, k, v, a, scale) -> o, or a string saying why it is unavailable."""
    import leet_compile  # noqa: F401  (registers the ops)
    from leet_compile.ops import gpu

    impls = {}

    def ours(backend):
        return lambda q, k, v, a, s: torch.ops.leet.decay_attn(q, k, v, a, s, None, False, "chunked", backend)[0]

    impls["leet triton"] = ours("triton") if gpu.triton_available() else "triton not importable"
    impls["leet cuda"] = ours("cuda") if gpu.has_cuda_kernels() else "no CUDA kernels in this build"
    impls["leet aten"] = ours("aten")
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        def fla_chunk(q, k, v, a, s):
            # fla's layout is [B, T, H, D]; the transposes are part of what a user would pay
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            kw = {"g_gamma": a} if a.dim() == 1 else {"g": a.transpose(1, 2)}
            o, _ = chunk_simple_gla(qt, kt, vt, scale=s, **kw)
            return o.transpose(1, 2)

        impls["fla chunk_simple_gla"] = fla_chunk
    except Exception as e:  # absent, or an incompatible version
        impls["fla chunk_simple_gla"] = f"fla unavailable: {type(e).__name__}: {e}"
    impls["naive eager"] = naive
    impls["naive compile"] = torch.compile(naive, dynamic=False)
    return impls


def naive_fits(B, H, T, fwdbwd):
    """Whether the T x T intermediates of the naive form fit (with margin) in GPU memory."""
    need = B * H * T * T * (2 + 4 + 2) * (3 if fwdbwd else 1)
    return need < 0.6 * torch.cuda.get_device_properties(0).total_memory


def bench_sequence(args, impls):
    rows = []
    for decay in args.decay:
        for mode in args.modes:
            for T in args.T:
                q, k, v, a = make_problem(args.B, args.H, T, args.K, args.V, args.dtype, decay, mode == "fwd+bwd")
                do = torch.randn_like(v)
                for name, fn in impls.items():
                    row = {"impl": name, "decay": decay, "mode": mode, "T": T, "ms": None, "note": ""}
                    rows.append(row)
                    if isinstance(fn, str):
                        row["note"] = fn
                        continue
                    if name.startswith("naive") and not naive_fits(args.B, args.H, T, mode == "fwd+bwd"):
                        row["note"] = "T x T intermediates do not fit"
                        continue
                    if name == "leet aten" and T > args.aten_max_T:
                        row["note"] = f"skipped above T={args.aten_max_T}"
                        continue
                    if name == "naive compile":
                        # one compiled shape at a time: dynamo's recompile limit would
                        # otherwise silently fall back to eager after a few shapes
                        torch._dynamo.reset()

                    def step():
                        o = fn(q, k, v, a, args.scale)
                        if mode == "fwd+bwd":
                            q.grad = k.grad = v.grad = None
                            o.backward(do)

                    try:
                        row["ms"] = cuda_ms(step, reps=args.reps)
                    except Exception as e:  # an implementation failing must not stop the rest
                        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    torch.cuda.empty_cache()
                    print(f"{name:22s} {decay:5s} {mode:8s} T={T:6d}  "
                          + (f"{row['ms']:9.3f} ms" if row["ms"] is not None else row["note"]), flush=True)
    return rows


def bench_decode(args):
    """One decoding step (T = 1 with a state) for every batch in args.decode_batch."""
    import leet_compile  # noqa: F401
    from leet_compile.ops import gpu

    rows = []
    try:
        from fla.ops.simple_gla import fused_recurrent_simple_gla
    except Exception as e:
        fused_recurrent_simple_gla, fla_note = None, f"fla unavailable: {type(e).__name__}"
    for B in args.decode_batch:
        q, k, v, a = make_problem(B, args.H, 1, args.K, args.V, args.dtype, "head")
        s0 = torch.randn(B, args.H, args.K, args.V, device="cuda")
        cands = {}
        if gpu.triton_available():
            cands["leet triton recurrent"] = lambda: torch.ops.leet.decay_attn(
                q, k, v, a, args.scale, s0, True, "recurrent", "triton")
        if gpu.has_cuda_kernels():
            cands["leet cuda recurrent"] = lambda: torch.ops.leet.decay_attn(
                q, k, v, a, args.scale, s0, True, "recurrent", "cuda")
        if fused_recurrent_simple_gla is not None:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            cands["fla fused_recurrent_simple_gla"] = lambda: fused_recurrent_simple_gla(
                qt, kt, vt, g_gamma=a, scale=args.scale, initial_state=s0, output_final_state=True)
        else:
            rows.append({"impl": "fla fused_recurrent_simple_gla", "B": B, "us": None, "note": fla_note})
        for name, fn in cands.items():
            row = {"impl": name, "B": B, "us": None, "note": ""}
            try:
                row["us"] = cuda_ms(fn, warmup=10, reps=50) * 1e3
            except Exception as e:
                row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(f"decode {name:32s} B={B:3d}  " + (f"{row['us']:9.1f} us" if row["us"] else row["note"]), flush=True)
    return rows


def accuracy(args, impls):
    """Relative error vs float64 (naive form in float64) for each implementation, bf16 inputs."""
    out = []
    T = args.accuracy_T
    for decay in args.decay:
        q, k, v, a = make_problem(args.B, args.H, T, args.K, args.V, args.dtype, decay)
        ref = naive(q.double(), k.double(), v.double(), a.double(), args.scale)
        errs = {}
        for name, fn in impls.items():
            if isinstance(fn, str):
                continue
            try:
                o = fn(q, k, v, a, args.scale)
                errs[name] = ((o.double() - ref).norm() / ref.norm()).item()
            except Exception as e:
                errs[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        bound = 2 * errs["naive eager"]
        for name in ("leet triton", "leet cuda"):
            if isinstance(errs.get(name), float):
                out.append({"decay": decay, "impl": name, "rel_err": errs[name], "naive_bf16_rel_err": errs["naive eager"],
                            "ok": errs[name] <= bound})
        out.append({"decay": decay, "all": errs})
        print(f"accuracy ({decay}, T={T}): " + ", ".join(
            f"{n}={e:.2e}" if isinstance(e, float) else f"{n}: {e}" for n, e in errs.items()), flush=True)
    return out


def environment():
    driver = "unknown"
    if shutil.which("nvidia-smi"):
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "fla"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    return {
        "device": torch.cuda.get_device_name(0),
        "driver": driver,
        **versions,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def markdown(env, args, rows, decode_rows, acc):
    lines = [f"# decay_attn on {env['device']}", ""]
    lines += [f"- {key}: `{env[key]}`" for key in ("device", "driver", "torch", "cuda", "triton", "fla", "date", "command")]
    lines += ["", f"B={args.B} H={args.H} K={args.K} V={args.V} {args.dtype_name}; median ms (CUDA events).", ""]
    names = list(dict.fromkeys(r["impl"] for r in rows))
    for decay in args.decay:
        for mode in args.modes:
            lines += [f"## {mode}, {'per-head' if decay == 'head' else 'per-position'} decay", ""]
            lines += ["| T | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
            for T in args.T:
                cells = []
                for n in names:
                    r = next(r for r in rows if r["impl"] == n and r["decay"] == decay and r["mode"] == mode and r["T"] == T)
                    cells.append(f"{r['ms']:.3f}" if r["ms"] is not None else "–")
                lines.append(f"| {T} | " + " | ".join(cells) + " |")
            lines.append("")
    if decode_rows:
        lines += ["## decoding step (T=1, with state), microseconds", "", "| impl | B | us | note |", "|---|---:|---:|---|"]
        lines += [f"| {r['impl']} | {r['B']} | {r['us']:.1f} | |" if r["us"] else f"| {r['impl']} | {r['B']} | – | {r['note']} |"
                  for r in decode_rows]
        lines.append("")
    if acc:
        lines += [f"## accuracy vs float64 (T={args.accuracy_T}), bound: 2x the naive bf16 error", "",
                  "| decay | impl | rel err | naive bf16 | ok |", "|---|---|---:|---:|---|"]
        lines += [f"| {r['decay']} | {r['impl']} | {r['rel_err']:.2e} | {r['naive_bf16_rel_err']:.2e} | {r['ok']} |"
                  for r in acc if "impl" in r]
        lines.append("")
    lines += ["Notes: –  = not run (see the JSON's `note`: unavailable, or the naive form's T x T",
              "intermediates do not fit)."]
    return "\n".join(lines) + "\n"


def plot(path, args, rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(d, m) for d in args.decay for m in args.modes]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (decay, mode) in zip(axes[0], panels):
        for name in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["T"], r["ms"]) for r in rows
                   if r["impl"] == name and r["decay"] == decay and r["mode"] == mode and r["ms"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=f"{mode}, {decay} decay")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--decay", nargs="+", default=["head", "position"], choices=["head", "position"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--decode-batch", type=int, nargs="*", default=[1, 8, 64])
    p.add_argument("--accuracy-T", type=int, default=2048)
    p.add_argument("--aten-max-T", type=int, default=8192, help="longest T for the generic ATen path")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no decoding")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    args.dtype_name, args.dtype = args.dtype, getattr(torch, args.dtype)
    args.scale = args.K ** -0.5
    if args.quick:
        args.reps, args.decode_batch = 3, []

    env = environment()
    impls = implementations(args)
    acc = accuracy(args, impls)
    rows = bench_sequence(args, impls)
    decode_rows = bench_decode(args) if args.decode_batch else []

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", env["device"]).strip("_").lower()
    base = os.path.join(args.out, slug)
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "shape": {k: getattr(args, k) for k in ("B", "H", "K", "V", "dtype_name")},
                   "sequence": rows, "decode": decode_rows, "accuracy": acc}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(env, args, rows, decode_rows, acc))
    png = plot(base + ".png", args, rows)
    print(f"wrote {base}.json, {base}.md" + (f", {png}" if png else " (no matplotlib: no plot)"))
    failed = [r for r in acc if "ok" in r and not r["ok"]]
    for r in failed:
        print(f"ACCURACY CHECK FAILED: {r['impl']} ({r['decay']} decay) error {r['rel_err']:.2e} "
              f"> 2 x naive bf16 error {r['naive_bf16_rel_err']:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
