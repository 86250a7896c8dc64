"""methods: every decay_attn method (and every method a researcher registers) verified
against the float64 recurrence, then timed side by side."""
import math

import torch

import harness
import leet_compile
from harness import Case, suite

# (method, backend): the fused CPU kernel for chunked, the ATen implementations of all.
BUILTIN = [("chunked", "cpu"), ("chunked", "aten"), ("recursive", "aten"), ("recurrent", "aten"),
           ("fleet", "aten"), ("naive", "aten")]


def flops(method, T, K, V, C):
    """Multiply-adds x 2 per (batch, head), as each implementation executes them."""
    if method == "naive":
        return 2 * T * T * (K + V)
    if method == "recurrent":
        return 4 * T * K * V
    if method == "chunked":
        return 2 * T * C * (K + V) + 4 * T * K * V
    if method == "recursive":  # blocks of 16 directly, then log2(T/16) merges of T K V each
        return 2 * T * 16 * (K + V) + 2 * T * K * V + T * K * V * max(0, math.ceil(math.log2(T / 16)))
    if method == "fleet":  # per rank: k_r v, log2 T scan steps of 3 T V, q_r * c
        return 3 * T * K * V * (math.ceil(math.log2(max(T, 2))) + 1)
    return None


def builtin_fn(method, backend):
    def fn(q, k, v, a, scale):
        return leet_compile.decay_attn(q, k, v, a, scale=scale, method=method, backend=backend)
    return fn


def prepare(params, args):
    """Verifies every method (built-in and registered) on every decay form it claims, once."""
    record, failed = {}, False
    candidates = {f"{m} ({b})": (builtin_fn(m, b), ("none", "head", "position")) for m, b in BUILTIN}
    candidates.update({f"{m.name} (registered)": (m.fn, m.decays) for m in harness.METHODS.values()})
    wrong = []
    for name, (fn, decays) in candidates.items():
        ok, errs = harness.verify(fn, decays)
        record[name] = errs
        shown = ", ".join(f"{d} {e:.1e}" if isinstance(e, float) else f"{d}: {e}" for d, e in errs.items())
        print(f"   verify {name:28s} vs float64: {'ok ' if ok else 'WRONG'} ({shown})", flush=True)
        if not ok:
            wrong.append(name)
            failed = True
    return {"_record": {"verification_rel_err": record, "verification_tol": 1e-4}, "_failed": failed, "wrong": wrong}


@suite("methods", x_name="T", x_vals=[16, 256, 1024, 4096], smoke_x_vals=[16, 130],
       params=dict(B=1, H=8, K=64, V=64, decay="head", slow_max_T=4096), baseline="chunked (cpu)", prepare=prepare)
def methods(T, B, H, K, V, decay, slow_max_T, wrong=()):
    """every method of decay_attn, and every registered one (--methods-from), verified vs float64 then timed; B=1 H=8 K=V=64 fp32"""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T, K, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g)
    a = {"none": None, "head": -torch.rand(H, generator=g) * 0.1 - 0.01,
         "position": -torch.rand(B, H, T, generator=g) * 0.1 - 0.01}[decay]
    scale = K**-0.5
    fns, fl = {}, {}
    for m, b in BUILTIN:
        name = f"{m} ({b})"
        if m in ("naive", "fleet") and T > slow_max_T:
            fns[name] = f"skipped above T={slow_max_T} (--param slow_max_T=...)"
            continue
        fns[name] = (lambda m=m, b=b: leet_compile.decay_attn(q, k, v, a, scale=scale, method=m, backend=b))
        fl[name] = B * H * flops(m, T, K, V, 32 if b == "cpu" else 64)
    for meth in harness.METHODS.values():
        name = f"{meth.name} (registered)"
        if name in wrong:
            fns[name] = "failed verification against float64: not timed"
        elif decay not in meth.decays:
            fns[name] = f"does not support decay={decay}"
        else:
            fns[name] = lambda f=meth.fn: f(q, k, v, a, scale)
    return Case(fns, flops=fl)
