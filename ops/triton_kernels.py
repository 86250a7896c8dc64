"""Triton kernels of decay_attn (forward): chunked and recurrent.

Imported lazily (by ops/gpu.py, on the first call that needs them): importing this
module imports triton. Nothing here touches CUDA at import time.

Both kernels run one program per (batch * head, block of BV value columns) and keep
that program's slice of the state S[K, BV] in float32 on chip for the whole sequence:

* chunked: walks the sequence in chunks of BT positions; per chunk
      o = scale * (exp(g) * (q S) + ((q k^T) * D) v),   D[i, j] = exp(g_i - g_j), j <= i
      S <- exp(g_last) S + (k * exp(g_last - g))^T v
  where g is the cumulative log decay *from the chunk's start*, so every exponent is
  a difference inside one chunk (no overflow for strong or positive decays, any T);
* recurrent: one position at a time, S <- exp(a_t) S + k_t^T v_t, o_t = scale q_t S.

The head dims are padded to powers of two (BK, BV) with masks, so K, V = 80, 96, 192
work; inputs are read through their strides (permuted views need no copy); log
decay [H] is read as [B, H, T] with zero batch and time strides.
"""
import os

import torch
import triton
import triton.language as tl

# Under the interpreter (CPU tests) one configuration keeps tests fast; on a GPU the
# autotuner picks per (B, H, K, V, dtypes).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _chunked_configs():
    if _INTERPRET:
        return [triton.Config({"BT": 32, "BV": 32}, num_warps=4)]
    return [
        triton.Config({"BT": bt, "BV": bv}, num_warps=w, num_stages=2)
        for bt in (32, 64)
        for bv in (32, 64, 128)
        for w in (4, 8)
    ]


def _recurrent_configs():
    if _INTERPRET:
        return [triton.Config({"BV": 32}, num_warps=4)]
    return [triton.Config({"BV": bv}, num_warps=w) for bv in (16, 32, 64, 128) for w in (2, 4, 8)]


@triton.autotune(
    configs=_chunked_configs(),
    key=["B", "H", "K", "V", "DECAY"],
)
@triton.jit
def chunked_fwd_kernel(
    q, k, v, a, s0, o, sT,
    s_qb, s_qh, s_qt, s_qk,
    s_kb, s_kh, s_kt, s_kk,
    s_vb, s_vh, s_vt, s_vv,
    s_ab, s_ah, s_at,
    s_sb, s_sh, s_sk, s_sv,
    B, H, T, K, V, scale,
    DECAY: tl.constexpr,  # 0: none, 1: log decay read at a[b, h, t] through its strides
    HAS_S0: tl.constexpr,
    STORE_ST: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" keeps fp32 inputs exact)
    F32_DOTS: tl.constexpr,  # convert tiles to fp32 before the dots (fp32 inputs; the interpreter)
    BK: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mk = rk < K
    mv = rv < V
    q_base = q + b * s_qb + h * s_qh
    k_base = k + b * s_kb + h * s_kh
    v_base = v + b * s_vb + h * s_vh
    a_base = a + b * s_ab + h * s_ah
    o_base = o + pid_bh.to(tl.int64) * T * V  # o is contiguous [B, H, T, V]
    causal = rt[:, None] >= rt[None, :]

    if HAS_S0:
        p_s0 = s0 + b * s_sb + h * s_sh + rk[:, None] * s_sk + rv[None, :] * s_sv
        S = tl.load(p_s0, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)

    for t0 in range(0, T, BT):
        t = t0 + rt
        mt = t < T
        bq = tl.load(q_base + t[:, None] * s_qt + rk[None, :] * s_qk, mask=mt[:, None] & mk[None, :], other=0.0)
        bk = tl.load(k_base + t[:, None] * s_kt + rk[None, :] * s_kk, mask=mt[:, None] & mk[None, :], other=0.0)
        bv = tl.load(v_base + t[:, None] * s_vt + rv[None, :] * s_vv, mask=mt[:, None] & mv[None, :], other=0.0)
        if F32_DOTS:
            bq, bk, bv = bq.to(tl.float32), bk.to(tl.float32), bv.to(tl.float32)
        scores = tl.dot(bq, tl.trans(bk), input_precision=PRECISION)  # [BT, BT] fp32
        inter = tl.dot(bq, S.to(bq.dtype), input_precision=PRECISION)  # [BT, BV]: q S_prev
        if DECAY:
            # cumulative log decay from the chunk start, in float64; padded positions add
            # 0, so g[BT - 1] is the value at the chunk's last valid position. Entries
            # below -(800 + the chunk's positive sum) are raised to it: the weights
            # through them are exactly 0 either way, but -inf gives no inf - inf = NaN
            # and -1e20 no longer swallows the small decays after it (NaN stays NaN).
            la = tl.load(a_base + t * s_at, mask=mt, other=0.0).to(tl.float64)
            floor = -(tl.sum(tl.where(la > 0.0, la, 0.0), axis=0) + 800.0)
            la = tl.where(la < floor, floor, la)
            g = tl.cumsum(la, axis=0)
            g_last = tl.sum(tl.where(rt == BT - 1, g, 0.0), axis=0)
            # exact zeros stay zero under a huge weight (an empty state, growing decays)
            e_g = tl.exp(g.to(tl.float32))[:, None]
            inter = tl.where(inter == 0.0, 0.0, inter * e_g)
            # mask the exponent before exp: g_i - g_j for j > i may be huge
            diff = tl.where(causal, g[:, None] - g[None, :], 0.0).to(tl.float32)
            scores = tl.where(causal, scores * tl.exp(diff), 0.0)
            k_w = (bk * tl.exp((g_last - g).to(tl.float32))[:, None]).to(bk.dtype)
            S = tl.where(S == 0.0, 0.0, S * tl.exp(g_last.to(tl.float32)))
        else:
            scores = tl.where(causal, scores, 0.0)
            k_w = bk
        # O = scores V, exactly causal: a dense product reads v_j for j > i as well
        # (0 * NaN = NaN), so non-finite values are left out of it and, in a chunk that
        # holds any, added row by row over j <= i only.
        bv32 = bv.to(tl.float32)
        nonfinite = (bv32 != bv32) | (tl.abs(bv32) == float("inf"))
        clean = tl.where(nonfinite, 0.0, bv32).to(bv.dtype)
        out = inter + tl.dot(scores.to(bv.dtype), clean, input_precision=PRECISION)
        if tl.sum(nonfinite.to(tl.int32)) > 0:
            bad = tl.where(nonfinite, bv32, 0.0)
            for jj in range(0, BT):
                col = tl.sum(tl.where((rt == jj)[None, :], scores, 0.0), axis=1)  # scores[:, jj]
                row = tl.sum(tl.where((rt == jj)[:, None], bad, 0.0), axis=0)  # bad[jj, :]
                out += tl.where((rt >= jj)[:, None], col[:, None] * row[None, :], 0.0)
        tl.store(o_base + t[:, None] * V + rv[None, :], (out * scale).to(o.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
        S += tl.dot(tl.trans(k_w), bv, input_precision=PRECISION)

    if STORE_ST:
        p_st = sT + pid_bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]
        tl.store(p_st, S, mask=mk[:, None] & mv[None, :])


@triton.autotune(
    configs=_recurrent_configs(),
    key=["B", "H", "K", "V", "DECAY"],
)
@triton.jit
def recurrent_fwd_kernel(
    q, k, v, a, s0, o, sT,
    s_qb, s_qh, s_qt, s_qk,
    s_kb, s_kh, s_kt, s_kk,
    s_vb, s_vh, s_vt, s_vv,
    s_ab, s_ah, s_at,
    s_sb, s_sh, s_sk, s_sv,
    B, H, T, K, V, scale,
    DECAY: tl.constexpr,
    HAS_S0: tl.constexpr,
    STORE_ST: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    q_base = q + b * s_qb + h * s_qh + rk * s_qk
    k_base = k + b * s_kb + h * s_kh + rk * s_kk
    v_base = v + b * s_vb + h * s_vh + rv * s_vv
    a_base = a + b * s_ab + h * s_ah
    o_base = o + pid_bh.to(tl.int64) * T * V + rv

    if HAS_S0:
        p_s0 = s0 + b * s_sb + h * s_sh + rk[:, None] * s_sk + rv[None, :] * s_sv
        S = tl.load(p_s0, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)

    for t in range(0, T):
        bq = tl.load(q_base + t * s_qt, mask=mk, other=0.0).to(tl.float32)
        bk = tl.load(k_base + t * s_kt, mask=mk, other=0.0).to(tl.float32)
        bv = tl.load(v_base + t * s_vt, mask=mv, other=0.0).to(tl.float32)
        if DECAY:
            S = S * tl.exp(tl.load(a_base + t * s_at).to(tl.float32))
        S += bk[:, None] * bv[None, :]
        out = tl.sum(bq[:, None] * S, axis=0) * scale
        tl.store(o_base + t * V, out.to(o.dtype.element_ty), mask=mv)

    if STORE_ST:
        p_st = sT + pid_bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]
        tl.store(p_st, S, mask=mk[:, None] & mv[None, :])


KERNELS = (chunked_fwd_kernel, recurrent_fwd_kernel)


def _launch(kernel, grid, traced, *args, **kwargs):
    """Launches `kernel`; through torch.library.wrap_triton when tracing, so that
    make_fx / AOTAutograd record it as a triton_kernel_wrapper node Inductor compiles."""
    if traced:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _alloc(shape, device, dtype):
    """Output allocation (tests replace it with NaN-filled tensors to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


def decay_attn_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, method="chunked", traced=False):
    """Forward of decay_attn with the Triton kernels (method "chunked" or "recurrent").

    q, k: [B, H, T, K], v: [B, H, T, V] (any strides, float32/float16/bfloat16);
    log_decay None, [H] or [B, H, T]; initial_state None or [B, H, K, V].
    Returns (o [B, H, T, V] contiguous in v's dtype, final_state [B, H, K, V] float32
    or an empty tensor). `traced=True` launches through wrap_triton (see _launch).
    """
    B, H, T, K = q.shape
    V = v.shape[3]
    o = _alloc((B, H, T, V), q.device, v.dtype)
    if not (q.dtype == k.dtype == v.dtype):  # mixed precisions: compute in float32
        q, k, v = q.float(), k.float(), v.float()
    state = _alloc((B, H, K, V) if output_final_state else (0,), q.device, torch.float32)
    if log_decay is None:
        a, a_strides = q, (0, 0, 0)  # never read (DECAY=0)
    elif log_decay.dim() == 1:
        a, a_strides = log_decay, (0, log_decay.stride(0), 0)
    else:
        a, a_strides = log_decay, tuple(log_decay.stride())
    s0 = initial_state if initial_state is not None else q  # never read without HAS_S0
    s0_strides = tuple(initial_state.stride()) if initial_state is not None else (0, 0, 0, 0)
    BK = max(16, triton.next_power_of_2(K))
    common = dict(
        DECAY=log_decay is not None,
        HAS_S0=initial_state is not None,
        STORE_ST=output_final_state,
        BK=BK,
    )
    args = (
        q, k, v, a, s0, o, state,
        *q.stride(), *k.stride(), *v.stride(), *a_strides, *s0_strides,
        B, H, T, K, V, float(scale),
    )

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), B * H)

    if method == "recurrent":
        _launch(recurrent_fwd_kernel, grid, traced, *args, **common)
    elif method == "chunked":
        # bf16/fp16 inputs: dots on the input dtype with fp32 accumulation (the state
        # and the decayed scores are rounded to it, as in the naive form); fp32 inputs:
        # exact fp32 dots. The interpreter's bf16 dot is wrong (triton 3.9), so it
        # computes in fp32.
        f32 = q.dtype == torch.float32 or _INTERPRET
        _launch(chunked_fwd_kernel, grid, traced, *args, PRECISION="ieee" if f32 else "tf32", F32_DOTS=f32, **common)
    else:
        raise ValueError(f"decay_attn: the Triton kernels implement methods 'chunked' and 'recurrent', got '{method}'")
    return o, state
