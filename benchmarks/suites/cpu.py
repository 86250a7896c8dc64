"""cpu: the fused CPU kernel against the baselines users have (fp32 and bf16, per-head decay),
and its rate against the machine's GEMM rate for the same dtype, measured in the same run."""
import contextlib
import os

import torch

import leet_compile
from harness import Case, measure, rel_err, suite

# (GFLOP/s, which GEMM) of the fastest N x N x N product per (dtype, N, threads), once per run.
_GEMM_RATES = {}


def gemm_products(N, dtype):
    """The N x N x N products torch has on this CPU: torch.mm (MKL for float32 on x86) and
    oneDNN's (aten.mkldnn_linear on oneDNN tensors: on AMD CPUs MKL runs AVX2 code and oneDNN's
    AVX-512 kernels are twice as fast, and oneDNN's are what the fused kernel uses)."""
    a, b = torch.randn(N, N).to(dtype), torch.randn(N, N).to(dtype)
    products = {"torch.mm": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        am, wm = a.to_mkldnn(), b.t().contiguous().to_mkldnn()  # linear: a @ w^T
        try:  # oneDNN has no bf16 GEMM on CPUs without AVX-512 (or AVX-NE-CONVERT): it raises
            tiny = torch.ones(2, 2, dtype=dtype).to_mkldnn()  # (oneDNN tensors cannot be sliced)
            torch.ops.aten.mkldnn_linear(tiny, tiny)
        except RuntimeError:
            return products
        products["oneDNN"] = lambda: torch.ops.aten.mkldnn_linear(am, wm)
    return products


def gemm_rate(dtype, N):
    """The machine's matrix rate for dtype at the current thread count: the faster of
    gemm_products (medians), and a label naming it. For bf16, the float32 rate where that is faster
    (a CPU without bf16 units, where torch's bf16 GEMM is a slow fallback): a bf16 product
    can always be computed by converting to float32, so that is the rate to compare with."""
    threads = torch.get_num_threads()
    key = (dtype, N, threads)
    if key not in _GEMM_RATES:
        fast = N <= 256  # smoke sizes: a check, not a measurement
        rates = {}
        for name, fn in gemm_products(N, dtype).items():
            t = measure(fn, threads=threads, min_time=0.0 if fast else 0.5,
                        max_time=0.05 if fast else 5.0, min_samples=1 if fast else 5)
            rates[name] = 2 * N**3 / t.median / 1e9
        best = max(rates, key=rates.get)
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        _GEMM_RATES[key] = rates[best], f"{short} GEMM ({best})"
        if dtype != torch.float32:
            fp32, fp32_name = gemm_rate(torch.float32, N)
            if fp32 > rates[best]:
                _GEMM_RATES[key] = fp32, f"{fp32_name}, faster than {short}'s on this CPU"
    return _GEMM_RATES[key]


@contextlib.contextmanager
def environ(name, value):
    """os.environ[name] = value while inside (None: unset); the kernels read these per call."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def cpu_bf16_units(on):
    """LEET_CPU_BF16=0 while off: the fused kernel's bf16 inputs take the upcast float32 path."""
    return environ("LEET_CPU_BF16", "1" if on else "0")


def naive(q, k, v, log_decay):
    """The materialised ((Q K^T) * D) V, what users write (O(T^2))."""
    T = q.shape[2]
    i = torch.arange(T)
    diff = (i[:, None] - i[None, :]).to(q.dtype)
    mask = torch.where(diff >= 0, torch.exp(log_decay[:, None, None] * diff), 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def block_loop(q, k, v, log_decay, block):
    """Intra-block quadratic + inter-block state, one block at a time (LeetDecoding's
    lightningAttention2_torch algorithm with block=256), in plain torch."""
    B, H, T, K = q.shape
    a = log_decay.view(H, 1, 1)
    idx = torch.arange(1, block + 1, dtype=q.dtype).view(-1, 1)
    q_decay = torch.exp(a * idx)
    k_decay = torch.exp(a * (block - idx))
    diff = idx - idx.T
    diag = torch.where(diff >= 0, torch.exp(a * diff), 0.0)
    kv = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
    out = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype)
    for s in range(0, T, block):
        e = min(s + block, T)
        m = e - s
        qi, ki, vi = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        out[:, :, s:e] = (qi * q_decay[:, :m]) @ kv + ((qi @ ki.transpose(-1, -2)) * diag[:, :m, :m]) @ vi
        kv = torch.exp(a * m) * kv + (ki * k_decay[:, block - m:]).transpose(-1, -2) @ vi
    return out


def chunked_flops(B, H, T, K, V, C=32):
    """FLOPs the chunked kernel executes: full C x C tiles, Q S and K^T V on the state."""
    return B * H * (2 * T * C * (K + V) + 4 * T * K * V)


def fwd_bwd(q, k, v, log_decay, grad_o):
    """Forward and backward of leet_compile.decay_attn (gradients of q, k, v) for a dense
    output gradient, as in training (.sum().backward() would pass a stride-0 one, read free)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    leet_compile.decay_attn(q, k, v, log_decay).backward(grad_o)


def baseline_build(fn):
    """fn on the kernels' baseline (SSE2) build instead of their AVX2 one (LEET_CPU_ISA=baseline)."""
    def run():
        with environ("LEET_CPU_ISA", "baseline"):
            return fn()
    return run


def upcast(fn):
    """fn with the fused kernel's bf16 units off (timed together: the env switch costs ~1 us)."""
    def run():
        with cpu_bf16_units(False):
            return fn()
    return run


@suite("cpu", x_name="T", x_vals=[1024, 4096, 8192], smoke_x_vals=[64, 300],
       params=dict(B=1, H=8, D=64, naive_max_T=8192, gemm_N=1024, backward=True),
       smoke_params=dict(gemm_N=128), baseline="leet decay_attn")
def cpu_fast_path(T, B, H, D, naive_max_T, gemm_N, backward):
    """leet_compile.decay_attn (fused C++ chunked kernel) in fp32 and bf16 (and fp32 on the kernels' baseline build, LEET_CPU_ISA=baseline) vs LeetDecoding's lightningAttention2 algorithm, a plain-torch chunk loop and the naive form; B=1 H=8 K=V=64, per-head decay; GFLOP/s also as % of the same dtype's GEMM rate (the faster of torch.mm and oneDNN's gemm_N^3, same run, same threads)"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    log_decay = -torch.rand(H, generator=g) * 0.1 - 0.01
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    ref = leet_compile.decay_attn(q.double(), k.double(), v.double(), log_decay.double())
    fwd = chunked_flops(B, H, T, D, D)
    fns = {
        "leet decay_attn": lambda: leet_compile.decay_attn(q, k, v, log_decay),
        "leet decay_attn bf16": lambda: leet_compile.decay_attn(qb, kb, vb, log_decay),
        "leet decay_attn bf16 (upcast)": upcast(lambda: leet_compile.decay_attn(qb, kb, vb, log_decay)),
        "leet decay_attn (baseline build)": baseline_build(lambda: leet_compile.decay_attn(q, k, v, log_decay)),
        "leetdecoding-la2 (256)": lambda: block_loop(q, k, v, log_decay, 256),
        "torch chunk loop (64)": lambda: block_loop(q, k, v, log_decay, 64),
        "naive": (lambda: naive(q, k, v, log_decay)) if T <= naive_max_T
        else f"T x T float32 masks above T={naive_max_T}",
    }
    # Forward + backward: FLOPs counted as 3x the forward's (the backward's products are twice
    # the forward's), an estimate for the % column, not a count of the backward kernel.
    if backward:
        grad_o = torch.randn(B, H, T, D, generator=g)
        fns["leet fwd+bwd"] = lambda: fwd_bwd(q, k, v, log_decay, grad_o)
        fns["leet fwd+bwd bf16"] = lambda: fwd_bwd(qb, kb, vb, log_decay, grad_o.bfloat16())
        fns["leet fwd+bwd (baseline build)"] = baseline_build(lambda: fwd_bwd(q, k, v, log_decay, grad_o))
    flops = {p: fwd for p in fns if p.startswith("leet decay_attn")}
    flops.update({p: 3 * fwd for p in fns if p.startswith("leet fwd+bwd")})
    (fp32, fp32_gemm), (bf16, bf16_gemm) = gemm_rate(torch.float32, gemm_N), gemm_rate(torch.bfloat16, gemm_N)
    peak = {p: (bf16_gemm, bf16) if "bf16" in p else (fp32_gemm, fp32) for p in flops}
    with cpu_bf16_units(False):
        o_upcast = leet_compile.decay_attn(qb, kb, vb, log_decay)
    info = {"leet decay_attn": {"rel_err_vs_fp64": rel_err(leet_compile.decay_attn(q, k, v, log_decay), ref)},
            "leet decay_attn bf16": {"rel_err_vs_fp64": rel_err(leet_compile.decay_attn(qb, kb, vb, log_decay), ref)},
            "leet decay_attn bf16 (upcast)": {"rel_err_vs_fp64": rel_err(o_upcast, ref)}}
    for p, (name, rate) in peak.items():
        info.setdefault(p, {}).update(gemm=name, gemm_gflops_per_s=rate)
    return Case(fns, flops=flops, info=info, peak=peak)


def split_env(fn, value):
    """fn under LEET_CPU_SPLIT=value (None: the default rule), timed together (~1 us)."""
    def run():
        with environ("LEET_CPU_SPLIT", value):
            return fn()
    return run


@suite("cpu-split", x_name="T", x_vals=[1024, 4096, 16384], smoke_x_vals=[1100],
       params=dict(B=1, H=1, D=64), baseline="unsplit")
def cpu_split(T, B, H, D):
    """The fused CPU forward, and forward+backward, with the sequence split into segments run in parallel (the default where B*H < threads; csrc/cpu/chunked_cpu_split.cpp) vs unsplit (LEET_CPU_SPLIT=0), and the control "heads": the same work as 2H heads of T/2 on the unsplit kernel, the best a 2-way split can reach; B=1 H=1 K=V=64, fp32 and bf16, per-position decay, initial and final state (fwd+bwd: gradients of all five inputs, dense output gradient)"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    a = -torch.rand(B, H, T, generator=g) * 0.1
    s0 = torch.randn(B, H, D, D, generator=g)
    T2 = T // 2 * 2  # the control halves an even length

    def call(q, k, v, a, s0):
        return leet_compile.decay_attn(q, k, v, a, initial_state=s0, output_final_state=True)

    def halves(q, k, v, a, s0):
        h = (lambda x: x[:, :, :T2].reshape(B, 2 * H, T2 // 2, x.shape[-1]))
        return h(q), h(k), h(v), a[:, :, :T2].reshape(B, 2 * H, T2 // 2), s0.repeat_interleave(2, dim=1)

    grad_o = torch.randn(B, H, T, D, generator=g)
    grads = {}  # the output gradient in each (shape, dtype) timed, made once

    def train(q, k, v, a, s0):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, a, s0)]
        o, _ = call(*leaves)
        key = (o.shape, o.dtype)
        if key not in grads:
            grads[key] = grad_o[:, :, :T2].reshape(o.shape).to(o.dtype) if o.shape != grad_o.shape else grad_o.to(o.dtype)
        o.backward(grads[key])

    fns = {}
    for mode, fn in (("", call), (" fwd+bwd", train)):
        for tag, dt in (("", torch.float32), (" bf16", torch.bfloat16)):
            x = (q.to(dt), k.to(dt), v.to(dt), a, s0)
            hx = halves(*x)
            fns["unsplit" + mode + tag] = split_env(lambda fn=fn, x=x: fn(*x), "0")
            fns["split" + mode + tag] = split_env(lambda fn=fn, x=x: fn(*x), None)
            fns["heads (control)" + mode + tag] = split_env(lambda fn=fn, hx=hx: fn(*hx), "0")
    ref = call(q.double(), k.double(), v.double(), a.double(), s0.double())[0]
    info = {p: {"rel_err_vs_fp64": rel_err(fns[p]()[0], ref)} for p in ("unsplit", "split", "unsplit bf16", "split bf16")}
    # FLOPs: the forward's; forward+backward counted as 3x (as in the cpu suite: an estimate).
    fwd = chunked_flops(B, H, T, D, D)
    return Case(fns, flops={p: 3 * fwd if "fwd+bwd" in p else fwd for p in fns}, info=info)


@suite("gemm", x_name="N", x_vals=[1024], smoke_x_vals=[128])
def gemm(N):
    """fp32 and bf16 GEMM N x N x N (torch.mm and oneDNN's): the machine's matrix rates, the yardsticks for GFLOP/s figures (the faster of the two)"""
    fns = {}
    for tag, dt in (("", torch.float32), (" bf16", torch.bfloat16)):
        fns.update({name + tag: fn for name, fn in gemm_products(N, dt).items()})
    return Case(fns, flops=2 * N**3)
