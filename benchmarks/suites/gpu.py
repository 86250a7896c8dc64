"""gpu, gpu-decode: our Triton and CUDA paths side by side with flash-linear-attention
(chunk_simple_gla with per-head g_gamma / per-position g; fused_recurrent_simple_gla for
decoding) and the naive masked form (eager and torch.compile), B=8 H=16 K=V=128 bf16.

Both run on a CUDA device; ``--param device=cpu`` runs the same code paths on the CPU at
whatever (tiny) sizes are given, for a dry run (the Triton providers then need
TRITON_INTERPRET=1 and call the op's GPU entry point on CPU tensors). Saved as
``<device>.json/.md`` and ``<device>_decode.json/.md`` (benchmarks/results by default).
"""
import torch

import harness
from harness import Case, suite


def naive(q, k, v, log_decay, scale):
    """The masked form users write: ((q k^T) * D) v, D from the (segment-summed) log decay."""
    T = q.shape[2]
    i = torch.arange(T, device=q.device)
    causal = i[:, None] >= i[None, :]
    if log_decay.dim() == 1:  # [H]
        expo = (i[:, None] - i[None, :]).to(log_decay.dtype) * log_decay[:, None, None]
    else:  # [B, H, T]: segment sums through a cumsum
        g = log_decay.cumsum(-1)
        expo = g[..., :, None] - g[..., None, :]
    D = torch.where(causal, torch.exp(torch.where(causal, expo, float("-inf"))), 0.0).to(q.dtype)
    return ((q @ k.transpose(-1, -2)) * scale * D) @ v


def make_problem(B, H, T, K, V, dtype, decay, device, requires_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, device=device, generator=g).to(dtype) for d in (K, K, V))
    if decay == "head":  # RetNet-style gammas 1 - 2^(-5 - h/2)
        a = torch.log1p(-torch.exp2(-5.0 - torch.arange(H, device=device, dtype=torch.float32) * 0.5))
    else:  # data-dependent gates, log sigmoid
        a = torch.nn.functional.logsigmoid(torch.randn(B, H, T, device=device, generator=g) + 4.0)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, a


def _gpu_entry():
    """The op's GPU implementation callable on CPU tensors under TRITON_INTERPRET=1 (dry runs)."""
    from leet_compile.ops import gpu

    return getattr(gpu, "decay_attn_gpu", None)


def ours(backend, method="chunked"):
    import leet_compile

    def fn(q, k, v, a, s, initial_state=None, output_final_state=False):
        if q.device.type == "cpu" and backend in ("triton", "cuda"):  # dry run on CPU
            entry = _gpu_entry()
            if entry is None:
                raise RuntimeError("no GPU entry point callable on CPU in this version of leet_compile.ops.gpu")
            o, st = entry(q, k, v, a, s, initial_state, output_final_state, method, backend)
            return (o, st) if output_final_state else o
        return leet_compile.decay_attn(q, k, v, a, scale=s, initial_state=initial_state,
                                       output_final_state=output_final_state, method=method, backend=backend)
    return fn


def availability(device):
    """provider -> callable(q, k, v, a, scale) -> o, or the reason it is unavailable."""
    import leet_compile  # noqa: F401  (registers the ops)
    from leet_compile.ops import gpu

    impls = {}
    if not gpu.triton_available():
        impls["leet triton"] = "triton not importable"
    elif device == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        impls["leet triton"] = "on CPU only under TRITON_INTERPRET=1"
    else:
        impls["leet triton"] = ours("triton")
    if not gpu.has_cuda_kernels():
        impls["leet cuda"] = "no CUDA kernels in this build (LEET_BUILD_CUDA)"
    elif device == "cpu":
        impls["leet cuda"] = "CUDA kernels need a GPU"
    else:
        impls["leet cuda"] = ours("cuda")
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
        impls["fla chunk_simple_gla"] = f"fla unavailable: {type(e).__name__}: {str(e)[:120]}"
    impls["naive eager"] = naive
    impls["naive compile"] = torch.compile(naive, dynamic=False)
    return impls


def naive_fits(B, H, T, fwdbwd, device):
    """Whether the T x T intermediates of the naive form fit (with margin) in device memory."""
    need = B * H * T * T * (2 + 4 + 2) * (3 if fwdbwd else 1)
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 8 * 2**30
    return need < 0.6 * total


def accuracy(params, impls, T):
    """Relative error vs float64 (the naive form in float64) of each provider; ours must be
    within 2x the naive bf16 error (issue 14's bound)."""
    out, failed = [], False
    dtype = getattr(torch, params["dtype"])
    for decay in ("head", "position"):
        q, k, v, a = make_problem(params["B"], params["H"], T, params["K"], params["V"], dtype, decay, params["device"])
        scale = params["K"] ** -0.5
        ref = naive(q.double(), k.double(), v.double(), a.double(), scale)
        errs = {}
        for name, fn in impls.items():
            if isinstance(fn, str):
                continue
            try:
                errs[name] = harness.rel_err(fn(q, k, v, a, scale), ref)
            except Exception as e:
                errs[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        bound = 2 * errs["naive eager"] if isinstance(errs.get("naive eager"), float) else None
        for name in ("leet triton", "leet cuda", "leet aten"):
            if isinstance(errs.get(name), float) and bound is not None:
                ok = errs[name] <= bound
                failed |= not ok
                out.append({"decay": decay, "impl": name, "rel_err": errs[name], "naive_rel_err": errs["naive eager"], "ok": ok})
        out.append({"decay": decay, "all": errs})
        shown = ", ".join(f"{n}={e:.2e}" if isinstance(e, float) else f"{n}: {e}" for n, e in errs.items())
        print(f"   accuracy vs float64 ({decay} decay, T={T}, {params['dtype']}): {shown}", flush=True)
    for r in out:
        if "ok" in r and not r["ok"]:
            print(f"   ACCURACY CHECK FAILED: {r['impl']} ({r['decay']} decay) {r['rel_err']:.2e} > 2 x naive {r['naive_rel_err']:.2e}")
    return out, failed


def prepare(params, args):
    impls = availability(params["device"])
    acc, failed = accuracy(params, impls, params["accuracy_T"]) if params["accuracy_T"] else ([], False)
    return {"impls": impls, "_record": {"accuracy": acc}, "_failed": failed}


@suite("gpu", x_name="T", x_vals=[1024, 2048, 4096, 8192, 16384, 32768], smoke_x_vals=[64, 130],
       params=dict(B=8, H=16, K=128, V=128, dtype="bfloat16", device="cuda", aten_max_T=8192,
                   naive_compile_max_T=8192, accuracy_T=2048),
       smoke_params=dict(B=1, H=2, K=16, V=16, accuracy_T=64),
       variants=[{"decay": d, "mode": m} for d in ("head", "position") for m in ("fwd", "fwd+bwd")],
       device="cuda", baseline="leet triton", prepare=prepare)
def gpu_seq(T, B, H, K, V, dtype, device, aten_max_T, naive_compile_max_T, accuracy_T, decay, mode, impls):
    """decay_attn on the GPU vs flash-linear-attention and the naive form; B=8 H=16 K=V=128 bf16, per-head and per-position decay, forward and forward+backward"""
    fwdbwd = mode == "fwd+bwd"
    q, k, v, a = make_problem(B, H, T, K, V, getattr(torch, dtype), decay, device, requires_grad=fwdbwd)
    do = torch.randn_like(v)
    scale = K**-0.5
    fns = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            fns[name] = fn
            continue
        if name.startswith("naive") and not naive_fits(B, H, T, fwdbwd, device):
            fns[name] = "T x T intermediates do not fit"
            continue
        if name == "leet aten" and T > aten_max_T:
            fns[name] = f"skipped above T={aten_max_T} (--param aten_max_T=...)"
            continue
        if name == "naive compile" and T > naive_compile_max_T:
            fns[name] = f"skipped above T={naive_compile_max_T} (one compile per shape; --param naive_compile_max_T=...)"
            continue
        if name == "naive compile":
            # one compiled shape at a time: dynamo's recompile limit would otherwise
            # silently fall back to eager after a few shapes
            torch._dynamo.reset()

        def step(fn=fn):
            o = fn(q, k, v, a, scale)
            if fwdbwd:
                q.grad = k.grad = v.grad = None
                o.backward(do)
        fns[name] = step
    return Case(fns)


gpu_seq.save_as = harness.device_slug


def prepare_decode(params, args):
    import leet_compile  # noqa: F401
    from leet_compile.ops import gpu

    impls = {}
    device = params["device"]
    interp = __import__("os").environ.get("TRITON_INTERPRET") == "1"
    if gpu.triton_available() and (device == "cuda" or interp):
        impls["leet triton recurrent"] = ours("triton", "recurrent")
    else:
        impls["leet triton recurrent"] = "triton unavailable (on CPU: TRITON_INTERPRET=1)"
    impls["leet cuda recurrent"] = (ours("cuda", "recurrent") if gpu.has_cuda_kernels() and device == "cuda"
                                    else "no CUDA kernels in this build, or no GPU")
    impls["leet decay_attn_step"] = "step"
    try:
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        impls["fla fused_recurrent_simple_gla"] = fused_recurrent_simple_gla
    except Exception as e:
        impls["fla fused_recurrent_simple_gla"] = f"fla unavailable: {type(e).__name__}: {str(e)[:120]}"
    return {"impls": impls}


@suite("gpu-decode", x_name="B", x_vals=[1, 8, 64], smoke_x_vals=[1, 2],
       params=dict(H=16, K=128, V=128, dtype="bfloat16", device="cuda"), smoke_params=dict(H=2, K=16, V=16),
       device="cuda", baseline="leet decay_attn_step", prepare=prepare_decode, unit="us")
def gpu_decode(B, H, K, V, dtype, device, impls):
    """one decoding step (T = 1 with a [B, H, K, V] float32 state) on the GPU; H=16 K=V=128 bf16"""
    import leet_compile

    q, k, v, a = make_problem(B, H, 1, K, V, getattr(torch, dtype), "head", device)
    s0 = torch.randn(B, H, K, V, device=device)
    scale = K**-0.5
    fns = {}
    for name, fn in impls.items():
        if isinstance(fn, str) and fn != "step":
            fns[name] = fn
        elif fn == "step":
            qt, kt, vt = (x[:, :, 0] for x in (q, k, v))
            fns[name] = lambda qt=qt, kt=kt, vt=vt: leet_compile.decay_attn_step(qt, kt, vt, a, s0, scale=scale)
        elif name.startswith("fla"):
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            fns[name] = lambda fn=fn, qt=qt, kt=kt, vt=vt: fn(qt, kt, vt, g_gamma=a, scale=scale, initial_state=s0,
                                                             output_final_state=True)
        else:
            fns[name] = lambda fn=fn: fn(q, k, v, a, scale, s0, True)
    return Case(fns)


gpu_decode.save_as = lambda env: harness.device_slug(env) + "_decode"
