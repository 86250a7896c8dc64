"""Regression tests for the false-rewrite classes of issue 9: masks that look like a
causal decay mask over the reals but are not one in the machine's arithmetic.

Each case must be either left alone by the pass, or rewritten into something equal to
eager (same shape, dtype, NaN/inf positions; values within rtol 1e-4 of eager, per
row).  Eager's rounding is the contract: a rewrite that is "more exact" than eager at
a 16-bit cast is still a different result.

The graph is the backend's ATen pre-dispatch graph (make_fx under fake tensors, see
``pass_fuzz.check_fn``); buffers are graph inputs, as dynamo lifts them.  A few cases
are also run end to end through ``torch.compile(backend="leet")`` (Inductor) at the
bottom.  Ids start with the class number of issue 9 (``c1_`` .. ``c9_``).
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from pass_fuzz import check_fn, compare, make_inputs  # noqa: E402

INF, NAN = math.inf, math.nan


def S(q, k):
    return q @ k.transpose(-1, -2)


def ij(n):
    return n[:, None], n[None, :]


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


G4 = 1 - 2.0 ** (-5 - torch.arange(4, dtype=torch.float64))  # RetNet-like gammas, H = 4


# ---------------------------------------------------------------- 1. float positions beyond exact range


def c1_fp32_offset_2p24(q, k, v):  # 2**24 + 1 rounds to 2**24: i >= j holds for j = i + 1
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32) + 2**24)
    return (S(q, k) * (i >= j)) @ v


def c1_fp32_offset_2p24_where_pow(q, k, v, g):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32) + 2**24)
    D = torch.where(i >= j, g.float()[:, None, None] ** (i - j).clamp(min=0), 0.0)
    return (S(q, k) * D) @ v


def c1_fp32_scaled_then_offset(q, k, v):  # 3 i + 2**25 rounds to multiples of 4: ties
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32) * 3 + 2**25)
    return (S(q, k) * torch.where(j <= i, 1.0, 0.0)) @ v


def c1_int64_cast_to_fp32(q, k, v):  # exact int64 positions, rounded by .float()
    n = (torch.arange(q.shape[2]) + 2**40).float()
    i, j = ij(n)
    return (S(q, k) * (i >= j).to(q.dtype)) @ v


def c1_fp64_offset_2p53(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64) + 2**53)
    return (S(q, k) * torch.where(i >= j, 0.9 ** (i - j).clamp(min=0), 0.0)) @ v


def c1_fp32_distance_of_rounded_positions(q, k, v):  # d = 0 for j = i + 1: weight 1 above the diagonal
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32) + 2**24)
    d = i - j
    return (S(q, k) * torch.where(d >= 0, torch.exp(-0.1 * d), 0.0)) @ v


def c1_fp32_meshgrid(q, k, v):
    n = torch.arange(q.shape[2], dtype=torch.float32) + 2**25
    i, j = torch.meshgrid(n, n, indexing="ij")
    return (S(q, k) * (i - j >= 0)) @ v


# ---------------------------------------------------------------- 2. integer wrap-around


def c2_int32_offset_wraps(q, k, v):  # positions past 2**31 - 1 become negative
    i, j = ij(torch.arange(q.shape[2], dtype=torch.int32) + (2**31 - 4))
    return (S(q, k) * (i >= j)) @ v


def c2_int32_offset_wraps_pow(q, k, v, g):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.int32) + (2**31 - 3))
    D = (g[:, None, None] ** (i - j)).masked_fill(j > i, 0)
    return (S(q, k) * D) @ v


def c2_int_cast_of_large_int64(q, k, v):  # .int() of 2**31 - 2 + t wraps
    n = (torch.arange(q.shape[2]) + 2**31 - 2).int()
    i, j = ij(n)
    return (S(q, k) * torch.where(i >= j, 1.0, 0.0)) @ v


def c2_to_int32_of_large_int64(q, k, v):  # 2**32 + 2**31 - 3 + t: wraps from 2**31 - 1 to -2**31
    n = (torch.arange(q.shape[2]) + 2**32 + 2**31 - 3).to(torch.int32)
    i, j = ij(n)
    return (S(q, k) * (j <= i).double()) @ v


def c2_int64_product_wraps(q, k, v):  # (i - j) * 2**62: 2 * 2**62 wraps negative, -3 * 2**62 wraps positive
    i, j = ij(torch.arange(q.shape[2]))
    return (S(q, k) * ((i - j) * 2**62 >= 0)) @ v


def c2_int32_distance_product_wraps(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.int32))
    return (S(q, k) * ((i - j) * 2**30 >= 0)) @ v


def c2_int64_scaled_positions_wrap(q, k, v):  # t * 2**61 wraps at t = 4
    i, j = ij(torch.arange(q.shape[2]) * 2**61)
    return (S(q, k) * (i >= j)) @ v


# ---------------------------------------------------------------- 3. int64 constants beyond 2**53


def c3_offset_2p60_strict_plus_one(q, k, v):  # n_i >= n_j + 1 is i > j in int64 (2**60 + 1 is not a double)
    i, j = ij(torch.arange(q.shape[2]) + 2**60)
    return (S(q, k) * (i >= j + 1)) @ v


def c3_offset_2p62_minus_one(q, k, v):  # n_i - 1 >= n_j: strict
    i, j = ij(torch.arange(q.shape[2]) + 2**62)
    return (S(q, k) * torch.where(i - 1 >= j, 1.0, 0.0)) @ v


def c3_scaled_2p55_plus_one(q, k, v):  # t * 2**55 >= s * 2**55 + 1 is t > s
    i, j = ij(torch.arange(q.shape[2]) * 2**55)
    return (S(q, k) * (i >= j + 1)) @ v


def c3_full_offset_plus_one(q, k, v):  # the offset and the 1 as 0-d int64 tensors
    n = torch.arange(q.shape[2]) + torch.full((), 2**60, dtype=torch.int64)
    i, j = ij(n)
    return (S(q, k) * (i >= j + torch.ones((), dtype=torch.int64))) @ v


def c3_offset_2p53_plus_one(q, k, v, g):
    i, j = ij(torch.arange(q.shape[2]) + (2**53 + 1))
    D = torch.where(i >= j + 1, g[:, None, None] ** (i - j), 0.0)
    return (S(q, k) * D) @ v


# ---------------------------------------------------------------- 4. 16-bit rounding


def c4_bf16_scaled_distance_ties(q, k, v):  # -257 rounds to -256 in bf16: d = -1 passes
    i, j = ij(torch.arange(q.shape[2]))
    d = (i - j).bfloat16()
    return (S(q, k) * (d * 257 >= d * 256)) @ v


def c4_fp16_scaled_distance_ties(q, k, v):  # 2049 rounds to 2048 in fp16
    i, j = ij(torch.arange(q.shape[2]))
    d = (i - j).half()
    return (S(q, k) * (d * 2049 >= d * 2048)) @ v


def c4_bf16_exp_decay(q, k, v):  # exp(-0.05 d) computed in bf16: every weight rounded
    i, j = ij(torch.arange(q.shape[2]))
    d = (i - j).bfloat16()
    return (S(q, k) * torch.where(i >= j, torch.exp(-0.05 * d), 0.0)) @ v


def c4_bf16_distance_beyond_256(q, k, v):  # d = 257 is 256 in bf16 (exp of it in fp32)
    i, j = ij(torch.arange(q.shape[2]))
    d = (i - j).bfloat16().float()
    return (S(q, k) * torch.where(i >= j, torch.exp(0.01 * d), 0.0)) @ v  # growing weights: d matters


def c4_fp16_distance_beyond_2048(q, k, v):
    i, j = ij(torch.arange(q.shape[2]))
    d = (i - j).half().double()
    return (S(q, k) * torch.where(i >= j, torch.exp(0.002 * d), 0.0)) @ v


def c4_bf16_positions_beyond_256(q, k, v):  # 257 rounds to 256: (256, 257) passes i >= j
    i, j = ij(torch.arange(q.shape[2], dtype=torch.bfloat16))
    return (S(q, k) * (i >= j)) @ v


def c4_mask_cast_to_bf16(q, k, v, g):  # gamma ** d rounded to bf16
    i, j = ij(torch.arange(q.shape[2]))
    D = torch.where(i >= j, g[:, None, None] ** (i - j), 0.0).bfloat16()
    return (S(q, k) * D) @ v


def c4_mask_cast_to_fp16_overflows(q, k, v):  # 1.5 ** d is inf in fp16 from d = 28
    i, j = ij(torch.arange(q.shape[2]))
    D = torch.where(i >= j, 1.5 ** (i - j).double(), 0.0).half()
    return (S(q, k) * D) @ v


def c4_scale_cast_to_bf16(q, k, v):  # 1.003 is 1.0 in bf16
    return (S(q, k) * (causal(q.shape[2]).double() * 1.003).bfloat16()) @ v


# ---------------------------------------------------------------- 5. nan_to_num is not a no-op


def c5_nan_to_num_posinf_zero_of_overflow(q, k, v):  # exp(3 d) is inf from d = 30 (fp32); posinf -> 0
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    E = torch.exp(torch.where(i >= j, 3.0 * (i - j), -INF))
    return (S(q, k) * torch.nan_to_num(E, posinf=0.0)) @ v


def c5_masked_exponent_nan_to_num(q, k, v):  # exponent filled with -inf above the diagonal (Mamba style)
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    E = torch.exp((3.0 * (i - j)).masked_fill(j > i, -INF))
    return (S(q, k) * torch.nan_to_num(E, posinf=0.0)) @ v


def c5_nan_to_num_default_of_overflow(q, k, v):  # posinf -> float32 max
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    E = torch.exp(3.0 * (i - j)).masked_fill(j > i, 0.0)
    return (S(q, k) * torch.nan_to_num(E)) @ v


def c5_masked_fill_ninf_then_nan_to_num(q, k, v):  # -inf above the diagonal, neginf=0
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64))
    E = torch.exp(30.0 * (i - j)).masked_fill(j > i, -INF)
    return (S(q, k) * torch.nan_to_num(E, posinf=0.0, neginf=0.0)) @ v


def c5_torchscale_like_overflow(q, k, v):  # masked_fill(+inf) * positive decay, nan_to_num
    T = q.shape[2]
    n = torch.arange(T, dtype=torch.float32)
    d = torch.masked_fill(n[:, None] - n[None, :], ~causal(T), INF)
    E = torch.exp(d * 4.0)  # exp(+inf) above the diagonal, and overflow below from d = 23
    return (S(q, k) * torch.nan_to_num(E, posinf=0.0)) @ v


def c5_isinf_where(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    E = torch.exp(torch.where(i >= j, 3.0 * (i - j), -INF))
    return (S(q, k) * torch.where(torch.isinf(E), 0.0, E)) @ v


# ---------------------------------------------------------------- 6. underflow and overflow of constants, exp


def c6_constant_product_underflows_fp32(q, k, v):  # 1e-60 is 0 in fp32: the mask is all zero
    T = q.shape[2]
    return (S(q, k) * (torch.ones(T, T).tril() * 1e-30 * 1e-30 * 1e30 * 1e30)) @ v


def c6_constant_product_overflows_fp32(q, k, v):  # 1e60 is inf: inf * 1e-60 = inf, 0 * inf = nan
    T = q.shape[2]
    return (S(q, k) * (torch.ones(T, T).tril() * 1e30 * 1e30 * 1e-30 * 1e-30)) @ v


def c6_constant_product_underflows_fp64(q, k, v):
    T = q.shape[2]
    return (S(q, k) * (torch.ones(T, T, dtype=torch.float64).tril() * 1e-200 * 1e-200 * 1e200 * 1e200)) @ v


def c6_tensor_constant_product_underflows(q, k, v):
    T = q.shape[2]
    tiny = torch.tensor(1e-30)
    return (S(q, k) * (torch.ones(T, T).tril() * tiny * tiny / tiny / tiny)) @ v


def c6_exp_overflow_fp32(q, k, v):  # exp(12 d) is inf from d = 8 in fp32
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    return (S(q, k) * torch.where(i >= j, torch.exp(12.0 * (i - j)), 0.0)) @ v


def c6_exp_overflow_fp64(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64))
    return (S(q, k) * torch.where(i >= j, torch.exp(50.0 * (i - j)), 0.0)) @ v


def c6_pow_overflow_fp32(q, k, v):  # 10 ** d is inf from d = 39 in fp32
    i, j = ij(torch.arange(q.shape[2]))
    return (S(q, k) * torch.where(i >= j, 10.0 ** (i - j).float(), 0.0)) @ v


def c6_exp2_overflow_fp32(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    return (S(q, k) * torch.where(i >= j, torch.exp2(20.0 * (i - j)), 0.0)) @ v


def c6_exp_underflow_then_rescale(q, k, v):  # exp(-120 d) underflows in fp32; * 1e30 does not bring it back
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    return (S(q, k) * (torch.where(i >= j, torch.exp(-120.0 * (i - j)), 0.0) * 1e30 * 1e30)) @ v


# ---------------------------------------------------------------- 7. the output's shape


def c7_mask_batch_2_ones(q, k, v):  # [2, 1, T, T] mask with B = 1: eager's output has batch 2
    T = q.shape[2]
    return (S(q, k) * torch.ones(2, 1, T, T).tril()) @ v


def c7_decay_expand_batch_3(q, k, v, g):
    i, j = ij(torch.arange(q.shape[2]))
    D = (g[:, None, None] ** (i - j)).masked_fill(j > i, 0)
    return (S(q, k) * D.expand(3, q.shape[1], q.shape[2], q.shape[2])) @ v


def c7_mask_extra_leading_dim(q, k, v):  # a 5-D mask: eager's output is 5-D
    T = q.shape[2]
    return (S(q, k) * torch.ones(2, 1, 1, T, T).tril()) @ v


def c7_mask_times_batched_ones(q, k, v):
    T = q.shape[2]
    return (S(q, k) * (causal(T) * torch.ones(4, 1, 1, 1))) @ v


def c7_mask_on_3d_inputs(q, k, v):  # [H, T, D] inputs, [B, H, T, T] mask
    T = q.shape[2]
    q3, k3, v3 = q[0], k[0], v[0]
    return (S(q3, k3) * torch.ones(2, q.shape[1], T, T).tril()) @ v3


def c7_expand_on_the_left_operand(q, k, v):
    T = q.shape[2]
    M = torch.ones(T, T).tril().expand(3, 1, T, T)
    return (M * S(q, k)) @ v


# ---------------------------------------------------------------- 8. NaN-producing arguments


def c8_clamp_min_nan(q, k, v):
    T = q.shape[2]
    return (S(q, k) * torch.ones(T, T).tril().clamp(min=NAN)) @ v


def c8_clamp_max_nan(q, k, v):
    T = q.shape[2]
    return (S(q, k) * torch.ones(T, T).tril().clamp(max=NAN)) @ v


def c8_distance_clamp_min_nan(q, k, v, g):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64))
    D = torch.where(i >= j, g[:, None, None] ** (i - j).clamp(min=NAN), 0.0)
    return (S(q, k) * D) @ v


def c8_clamp_nan_tensor_bound(q, k, v):
    T = q.shape[2]
    return (S(q, k) * torch.clamp(torch.ones(T, T).tril(), min=torch.tensor(NAN))) @ v


def c8_masked_fill_nan_above(q, k, v):
    T = q.shape[2]
    return (S(q, k) * torch.ones(T, T).masked_fill(~causal(T), NAN)) @ v


def c8_where_nan_above(q, k, v):
    i, j = ij(torch.arange(q.shape[2]))
    return (S(q, k) * torch.where(i >= j, 1.0, NAN)) @ v


def c8_exp_nan_slope(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64))
    return (S(q, k) * torch.where(i >= j, torch.exp(NAN * (i - j)), 0.0)) @ v


def c8_scale_nan(q, k, v):
    T = q.shape[2]
    return (S(q, k) * (torch.ones(T, T).tril() * NAN)) @ v


def c8_nan_to_num_nan_is_nan(q, k, v):  # nan_to_num(nan=nan) keeps 0 * inf = nan
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float32))
    D = torch.exp(100.0 * (j - i)) * (i >= j)
    return (S(q, k) * torch.nan_to_num(D, nan=NAN, posinf=0.0)) @ v


# ---------------------------------------------------------------- 9. pow with a base that may be 0 or negative


def c9_buffer_with_zero(q, k, v, g):  # 0 ** 0 = 1 and 0 ** d = 0: eager is finite
    i, j = ij(torch.arange(q.shape[2]))
    return (S(q, k) * torch.where(i >= j, g[:, None, None] ** (i - j), 0.0)) @ v


def c9_buffer_with_negative(q, k, v, g):  # (-0.5) ** d alternates in sign
    i, j = ij(torch.arange(q.shape[2]))
    return (S(q, k) * (g[:, None, None] ** (i - j)).masked_fill(j > i, 0)) @ v


def c9_constant_tensor_with_zero(q, k, v):
    g0 = torch.tensor([0.9, 0.0, 0.5, 1.0], dtype=q.dtype)
    i, j = ij(torch.arange(q.shape[2]))
    return (S(q, k) * torch.where(i >= j, g0[:, None, None] ** (i - j), 0.0)) @ v


def c9_python_zero_base(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64))
    return (S(q, k) * torch.where(i >= j, 0.0 ** (i - j), 0.0)) @ v


def c9_python_negative_base(q, k, v):
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64))
    return (S(q, k) * torch.where(i >= j, (-0.8) ** (i - j), 0.0)) @ v


def c9_negative_scalar_tensor_base(q, k, v):
    i, j = ij(torch.arange(q.shape[2]))
    return (S(q, k) * torch.where(i >= j, torch.pow(torch.tensor(-0.9, dtype=torch.float64), i - j), 0.0)) @ v


def c9_parameter_through_tanh(q, k, v, w):  # tanh can be negative
    i, j = ij(torch.arange(q.shape[2]))
    g = torch.tanh(w)
    return (S(q, k) * torch.where(i >= j, g[:, None, None] ** (i - j), 0.0)) @ v


def c9_zero_base_exp_of_log(q, k, v, g):  # exp(d * log 0) = exp(-inf * 0) = nan on the diagonal: eager nan
    i, j = ij(torch.arange(q.shape[2], dtype=torch.float64))
    D = torch.where(i >= j, torch.exp((i - j).clamp(min=0) * torch.log(g)[:, None, None]), 0.0)
    return (S(q, k) * D) @ v


Z4 = torch.tensor([0.9, 0.0, 0.5, 1.0], dtype=torch.float64)
N4 = torch.tensor([0.9, -0.5, 0.5, -1.0], dtype=torch.float64)

# (id, fn, (B, H, T, D), q/k/v dtype, buffers)
CASES = [
    ("c1_fp32_offset_2p24", c1_fp32_offset_2p24, (1, 2, 8, 4), torch.float64, []),
    ("c1_fp32_offset_2p24_T33", c1_fp32_offset_2p24, (2, 1, 33, 4), torch.float32, []),
    ("c1_fp32_offset_2p24_where_pow", c1_fp32_offset_2p24_where_pow, (1, 4, 12, 4), torch.float64, [G4]),
    ("c1_fp32_scaled_then_offset", c1_fp32_scaled_then_offset, (1, 2, 9, 4), torch.float64, []),
    ("c1_int64_cast_to_fp32", c1_int64_cast_to_fp32, (1, 2, 6, 4), torch.float64, []),
    ("c1_fp64_offset_2p53", c1_fp64_offset_2p53, (1, 2, 7, 4), torch.float64, []),
    ("c1_fp32_distance_of_rounded_positions", c1_fp32_distance_of_rounded_positions, (1, 2, 10, 4), torch.float64, []),
    ("c1_fp32_meshgrid", c1_fp32_meshgrid, (1, 2, 5, 4), torch.float64, []),
    ("c2_int32_offset_wraps", c2_int32_offset_wraps, (1, 2, 8, 4), torch.float64, []),
    ("c2_int32_offset_wraps_pow", c2_int32_offset_wraps_pow, (1, 4, 8, 4), torch.float64, [G4]),
    ("c2_int_cast_of_large_int64", c2_int_cast_of_large_int64, (1, 2, 6, 4), torch.float64, []),
    ("c2_to_int32_of_large_int64", c2_to_int32_of_large_int64, (2, 2, 7, 4), torch.float64, []),
    ("c2_int64_product_wraps", c2_int64_product_wraps, (1, 2, 6, 4), torch.float64, []),
    ("c2_int32_distance_product_wraps", c2_int32_distance_product_wraps, (1, 2, 6, 4), torch.float64, []),
    ("c2_int64_scaled_positions_wrap", c2_int64_scaled_positions_wrap, (1, 2, 8, 4), torch.float64, []),
    ("c3_offset_2p60_strict_plus_one", c3_offset_2p60_strict_plus_one, (1, 2, 6, 4), torch.float64, []),
    ("c3_offset_2p62_minus_one", c3_offset_2p62_minus_one, (1, 2, 6, 4), torch.float64, []),
    ("c3_scaled_2p55_plus_one", c3_scaled_2p55_plus_one, (1, 2, 6, 4), torch.float64, []),
    ("c3_full_offset_plus_one", c3_full_offset_plus_one, (1, 2, 6, 4), torch.float64, []),
    ("c3_offset_2p53_plus_one", c3_offset_2p53_plus_one, (1, 4, 6, 4), torch.float64, [G4]),
    ("c4_bf16_scaled_distance_ties", c4_bf16_scaled_distance_ties, (1, 2, 6, 4), torch.float64, []),
    ("c4_fp16_scaled_distance_ties", c4_fp16_scaled_distance_ties, (1, 2, 6, 4), torch.float64, []),
    ("c4_bf16_exp_decay_T300", c4_bf16_exp_decay, (1, 1, 300, 4), torch.float64, []),
    ("c4_bf16_exp_decay_T17", c4_bf16_exp_decay, (1, 2, 17, 4), torch.float64, []),
    ("c4_bf16_distance_beyond_256", c4_bf16_distance_beyond_256, (1, 1, 300, 4), torch.float64, []),
    ("c4_fp16_distance_beyond_2048", c4_fp16_distance_beyond_2048, (1, 1, 2100, 2), torch.float64, []),
    ("c4_bf16_positions_beyond_256", c4_bf16_positions_beyond_256, (1, 1, 300, 4), torch.float64, []),
    ("c4_mask_cast_to_bf16", c4_mask_cast_to_bf16, (1, 4, 17, 4), torch.float64, [G4]),
    ("c4_mask_cast_to_fp16_overflows", c4_mask_cast_to_fp16_overflows, (1, 2, 40, 4), torch.float64, []),
    ("c4_scale_cast_to_bf16", c4_scale_cast_to_bf16, (1, 2, 9, 4), torch.float64, []),
    ("c5_nan_to_num_posinf_zero_of_overflow", c5_nan_to_num_posinf_zero_of_overflow, (1, 2, 40, 4),
     torch.float64, []),
    ("c5_nan_to_num_posinf_zero_fp32_qkv", c5_nan_to_num_posinf_zero_of_overflow, (1, 2, 33, 4), torch.float32, []),
    ("c5_masked_exponent_nan_to_num", c5_masked_exponent_nan_to_num, (1, 2, 40, 4), torch.float64, []),
    ("c5_nan_to_num_default_of_overflow", c5_nan_to_num_default_of_overflow, (1, 2, 40, 4), torch.float64, []),
    ("c5_masked_fill_ninf_then_nan_to_num", c5_masked_fill_ninf_then_nan_to_num, (1, 2, 30, 4), torch.float64, []),
    ("c5_torchscale_like_overflow", c5_torchscale_like_overflow, (1, 2, 30, 4), torch.float64, []),
    ("c5_isinf_where", c5_isinf_where, (1, 2, 40, 4), torch.float64, []),
    ("c6_constant_product_underflows_fp32", c6_constant_product_underflows_fp32, (1, 2, 8, 4), torch.float64, []),
    ("c6_constant_product_underflows_fp32_qkv", c6_constant_product_underflows_fp32, (2, 2, 8, 4), torch.float32, []),
    ("c6_constant_product_overflows_fp32", c6_constant_product_overflows_fp32, (1, 2, 8, 4), torch.float64, []),
    ("c6_constant_product_underflows_fp64", c6_constant_product_underflows_fp64, (1, 2, 8, 4), torch.float64, []),
    ("c6_tensor_constant_product_underflows", c6_tensor_constant_product_underflows, (1, 2, 8, 4),
     torch.float64, []),
    ("c6_exp_overflow_fp32", c6_exp_overflow_fp32, (1, 2, 16, 4), torch.float64, []),
    ("c6_exp_overflow_fp32_qkv", c6_exp_overflow_fp32, (1, 2, 16, 4), torch.float32, []),
    ("c6_exp_overflow_fp64", c6_exp_overflow_fp64, (1, 2, 20, 4), torch.float64, []),
    ("c6_pow_overflow_fp32", c6_pow_overflow_fp32, (1, 2, 45, 4), torch.float64, []),
    ("c6_exp2_overflow_fp32", c6_exp2_overflow_fp32, (1, 2, 12, 4), torch.float64, []),
    ("c6_exp_underflow_then_rescale", c6_exp_underflow_then_rescale, (1, 2, 6, 4), torch.float64, []),
    ("c7_mask_batch_2_ones", c7_mask_batch_2_ones, (1, 2, 8, 4), torch.float64, []),
    ("c7_mask_batch_2_ones_fp32", c7_mask_batch_2_ones, (1, 4, 17, 8), torch.float32, []),
    ("c7_decay_expand_batch_3", c7_decay_expand_batch_3, (1, 4, 8, 4), torch.float64, [G4]),
    ("c7_mask_extra_leading_dim", c7_mask_extra_leading_dim, (1, 2, 8, 4), torch.float64, []),
    ("c7_mask_extra_leading_dim_B2", c7_mask_extra_leading_dim, (2, 2, 8, 4), torch.float64, []),
    ("c7_mask_times_batched_ones", c7_mask_times_batched_ones, (1, 2, 8, 4), torch.float64, []),
    ("c7_mask_on_3d_inputs", c7_mask_on_3d_inputs, (1, 2, 8, 4), torch.float64, []),
    ("c7_expand_on_the_left_operand", c7_expand_on_the_left_operand, (1, 2, 8, 4), torch.float64, []),
    ("c8_clamp_min_nan", c8_clamp_min_nan, (1, 2, 8, 4), torch.float64, []),
    ("c8_clamp_max_nan", c8_clamp_max_nan, (1, 2, 8, 4), torch.float64, []),
    ("c8_distance_clamp_min_nan", c8_distance_clamp_min_nan, (1, 4, 8, 4), torch.float64, [G4]),
    ("c8_clamp_nan_tensor_bound", c8_clamp_nan_tensor_bound, (1, 2, 8, 4), torch.float64, []),
    ("c8_masked_fill_nan_above", c8_masked_fill_nan_above, (1, 2, 8, 4), torch.float64, []),
    ("c8_where_nan_above", c8_where_nan_above, (1, 2, 8, 4), torch.float64, []),
    ("c8_exp_nan_slope", c8_exp_nan_slope, (1, 2, 8, 4), torch.float64, []),
    ("c8_scale_nan", c8_scale_nan, (1, 2, 8, 4), torch.float64, []),
    ("c8_nan_to_num_nan_is_nan", c8_nan_to_num_nan_is_nan, (1, 2, 12, 4), torch.float64, []),
    ("c9_buffer_with_zero", c9_buffer_with_zero, (1, 4, 8, 4), torch.float64, [Z4]),
    ("c9_buffer_with_zero_fp32", c9_buffer_with_zero, (2, 4, 17, 4), torch.float32, [Z4.float()]),
    ("c9_buffer_with_negative", c9_buffer_with_negative, (1, 4, 8, 4), torch.float64, [N4]),
    ("c9_constant_tensor_with_zero", c9_constant_tensor_with_zero, (1, 4, 8, 4), torch.float64, []),
    ("c9_python_zero_base", c9_python_zero_base, (1, 2, 8, 4), torch.float64, []),
    ("c9_python_negative_base", c9_python_negative_base, (1, 2, 8, 4), torch.float64, []),
    ("c9_negative_scalar_tensor_base", c9_negative_scalar_tensor_base, (1, 2, 8, 4), torch.float64, []),
    ("c9_parameter_through_tanh", c9_parameter_through_tanh, (1, 4, 8, 4), torch.float64,
     [torch.tensor([2.0, -0.3, 0.5, 1.0], dtype=torch.float64)]),
    ("c9_zero_base_exp_of_log", c9_zero_base_exp_of_log, (1, 4, 8, 4), torch.float64, [Z4]),
]


def _rtol(case_id, dtype):
    # every class here is a gross error (a wrong mask entry, a lost rounding step,
    # NaN/inf, a shape): 1e-4 separates it from a correct rewrite's rounding
    return 1e-4


@pytest.mark.parametrize("case_id,fn,shape,dtype,buffers", CASES, ids=[c[0] for c in CASES])
def test_no_false_rewrite(case_id, fn, shape, dtype, buffers):
    inputs = make_inputs(*shape, dtype=dtype, seed=1, buffers=buffers)
    res = check_fn(fn, inputs, rtol=_rtol(case_id, dtype))
    assert res.ok, f"{res.kind}: {res.failure} (rewrites: {res.rewrites}; near misses: {res.reasons})"


# ---------------------------------------------------------------- dynamic shapes (symbolic T), through dynamo

DYNAMIC = ["c1_fp32_offset_2p24", "c2_int32_offset_wraps", "c2_int64_product_wraps", "c3_offset_2p60_strict_plus_one",
           "c4_bf16_scaled_distance_ties", "c5_nan_to_num_posinf_zero_of_overflow", "c6_constant_product_underflows_fp32",
           "c6_exp_overflow_fp32", "c7_mask_batch_2_ones", "c7_decay_expand_batch_3", "c8_clamp_min_nan",
           "c9_buffer_with_zero"]


@pytest.mark.parametrize("case_id", DYNAMIC)
def test_no_false_rewrite_dynamic_shapes(case_id):
    """dynamo with dynamic=True + the backend's trace_to_aten + the pass: a proof over a
    symbolic T must hold for the T it runs at."""
    from pass_fuzz import check_compiled

    _, fn, shape, dtype, buffers = next(c for c in CASES if c[0] == case_id)
    inputs = make_inputs(*shape, dtype=dtype, seed=1, buffers=buffers)
    res = check_compiled(fn, inputs, rtol=_rtol(case_id, dtype), dynamic=True)
    assert res.ok, f"{res.kind}: {res.failure} (rewrites: {res.rewrites}; near misses: {res.reasons})"


# ---------------------------------------------------------------- end to end through torch.compile

# the first two run in CI (an Inductor compile each), the rest with -m slow
E2E = ["c1_fp32_offset_2p24", "c7_mask_batch_2_ones", "c2_int32_offset_wraps", "c3_offset_2p60_strict_plus_one",
       "c4_bf16_scaled_distance_ties", "c5_nan_to_num_posinf_zero_of_overflow", "c6_constant_product_underflows_fp32",
       "c8_clamp_min_nan", "c9_buffer_with_zero"]


class _Model(torch.nn.Module):
    def __init__(self, fn, buffers):
        super().__init__()
        self.fn = fn
        for n, b in enumerate(buffers):
            self.register_buffer(f"b{n}", b.clone())

    def forward(self, q, k, v):
        return self.fn(q, k, v, *[getattr(self, f"b{n}") for n in range(len(self._buffers))])


@pytest.mark.parametrize("case_id", [pytest.param(c, marks=[pytest.mark.slow] if n >= 2 else []) for n, c in enumerate(E2E)])
def test_no_false_rewrite_torch_compile(case_id):
    """``torch.compile(model, backend="leet")`` with Inductor, buffers as module buffers.
    Where nothing is rewritten the reference is ``backend="inductor"`` (the pass is not
    involved, and Inductor computes 16-bit elementwise ops in float32)."""
    from torch._dynamo.utils import counters

    _, fn, shape, dtype, buffers = next(c for c in CASES if c[0] == case_id)
    model = _Model(fn, buffers)
    q, k, v = make_inputs(*shape, dtype=dtype, seed=1)
    ref = model(q, k, v)
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(model, backend="leet", fullgraph=True)(q, k, v)
    rewrites = counters["leet"]["decay_attn_rewrites"]
    if rewrites == 0:  # plain Inductor then: its 16-bit elementwise numerics are its own
        torch._dynamo.reset()
        ref = torch.compile(model, backend="inductor", fullgraph=True)(q, k, v)
    why = compare(out, ref, _rtol(case_id, dtype))
    assert why is None, f"{rewrites} rewrites: {why}"


# ---------------------------------------------------------------- issue 10: several batch dims and per-chunk selects
#
# Mamba2's ssd_minimal batches the diagonal blocks over (b, c, h): the chunk dim c is merged
# into the operator's B, and the decay must depend on exactly the dims the proof says.
# fla's naive_chunk_simple_gla builds L_mask for all chunks and selects chunk n: a select on
# a dim that is neither position is that chunk's mask; on a position dim it is no mask.
# Each case: left alone (expected 0), or rewritten (expected n) and equal to eager.

CL = 4  # the chunk length; the cases run at T = 16 (C = CL = 4 chunks: sizes alone tell no dim apart)


def _segsum(x):
    n = x.size(-1)
    x = x[..., None].expand(*x.shape, n).masked_fill(~causal(n).tril(-1), 0)
    return x.cumsum(-2).masked_fill(~causal(n), -INF)


def _chunks(q, k, v):
    B, H, T, D = q.shape
    return [x.transpose(1, 2).reshape(B, T // CL, CL, H, D) for x in (q, k, v)]  # b c l h d


def _log_gates(k):  # [B, H, C, CL], negative
    B, H, T, _ = k.shape
    return -torch.nn.functional.softplus(k.sum(-1)).reshape(B, H, T // CL, CL)


def _ssd(q, k, v, A, mask_letters="bhcls"):
    B, H, T, D = q.shape
    C, Bm, X = _chunks(q, k, v)
    Y = torch.einsum(f"bclhn,bcshn,{mask_letters},bcshp->bclhp", C, Bm, torch.exp(_segsum(A)), X)
    return Y.reshape(B, T, H, D).transpose(1, 2)


def n10_ssd_chunks(q, k, v):  # the reference form: rewritten
    return _ssd(q, k, v, _log_gates(k))


def n10_ssd_mask_chunk_and_query_swapped(q, k, v):  # L read as [b, h, l, c, s]: its "chunk" dim is i
    return _ssd(q, k, v, _log_gates(k), "bhlcs")


def n10_ssd_decay_of_flipped_chunks(q, k, v):  # chunk c decays with chunk C-1-c's gates: read as they are
    return _ssd(q, k, v, _log_gates(k).flip(2))


def n10_ssd_decay_from_two_chunks(q, k, v):  # exp(Acum[c, l] - Acum[c - 1, s]): no segment sum
    B, H, T, D = q.shape
    Ac = _log_gates(k).cumsum(-1)
    E = (Ac[..., :, None] - Ac.roll(1, 2)[..., None, :]).masked_fill(~causal(CL), -INF)
    C, Bm, X = _chunks(q, k, v)
    Y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, Bm, torch.exp(E), X)
    return Y.reshape(B, T, H, D).transpose(1, 2)


def n10_chunk_index_as_position(q, k, v):  # gamma ** (c * CL + l - s): the chunk index in the exponent
    B, H, T, D = q.shape
    qc, kc, vc = (x.reshape(B, H, T // CL, CL, D).transpose(1, 2) for x in (q, k, v))  # b c h l d
    c = torch.arange(T // CL)[:, None, None, None]
    i, j = ij(torch.arange(CL))
    M = torch.where(i >= j, 0.9 ** (c * CL + i - j).clamp(min=0).double(), 0.0)
    return (((qc @ kc.transpose(-1, -2)) * M) @ vc).transpose(1, 2).reshape(B, H, T, D)


def n10_global_mask_split_into_chunks(q, k, v):  # a [T, T] mask's diagonal blocks (a view mixing i with c)
    B, H, T, D = q.shape
    i, j = ij(torch.arange(T))
    M = torch.where(i >= j, 0.9 ** (i - j).clamp(min=0).double(), 0.0).reshape(T // CL, CL, T // CL, CL)
    M = torch.diagonal(M, dim1=0, dim2=2).permute(2, 0, 1)[:, None]  # [C, 1, CL, CL]
    qc, kc, vc = (x.reshape(B, H, T // CL, CL, D).transpose(1, 2) for x in (q, k, v))
    return (((qc @ kc.transpose(-1, -2)) * M) @ vc).transpose(1, 2).reshape(B, H, T, D)


def _decay(T, H):
    i, j = ij(torch.arange(T))
    g = (1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)))[:, None, None]
    return torch.where(i >= j, g ** (i - j).clamp(min=0).double(), 0.0)  # [H, T, T]


def n10_select_query_row(q, k, v):  # row 3 of the mask for every query: a select on the i dim
    row = _decay(q.shape[2], q.shape[1]).select(1, 3)  # [H, T]
    return (S(q, k) * row[:, None, :]) @ v


def n10_select_key_column(q, k, v):  # column 0 for every key: a select on the j dim
    col = _decay(q.shape[2], q.shape[1]).select(2, 0)  # [H, T]
    return (S(q, k) * col[:, :, None]) @ v


def _chunk_select(q, k, v, index):
    B, H, T, D = q.shape
    N = T // CL
    qc, kc, vc = (x.reshape(B, H, N, CL, D) for x in (q, k, v))
    decay = (torch.nn.functional.logsigmoid(k.mean(-1) + 1.0) / 4).reshape(B, H, N, CL).cumsum(-1)
    L_mask = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).tril().exp().tril()
    o = torch.zeros_like(vc)
    for n in range(N):
        attn = qc[:, :, n] @ kc[:, :, n].transpose(-1, -2) * index(L_mask, n, N)
        o[:, :, n] = attn @ vc[:, :, n]
    return o.reshape(B, H, T, D)


def n10_select_chunk(q, k, v):  # fla's form: chunk n's mask for chunk n
    return _chunk_select(q, k, v, lambda L, n, N: L[:, :, n])


def n10_select_next_chunk(q, k, v):  # chunk n + 1's mask for chunk n: its decay is read there
    return _chunk_select(q, k, v, lambda L, n, N: L[:, :, (n + 1) % N])


def n10_select_negative_index(q, k, v):
    return _chunk_select(q, k, v, lambda L, n, N: L[:, :, n - N])


def n10_select_after_shifting_slice(q, k, v):  # L[:, :, 1:][:, :, n] is chunk n + 1's
    return _chunk_select(q, k, v, lambda L, n, N: torch.cat([L, L], 2)[:, :, 1:][:, :, n])


def n10_select_query_position_of_chunk(q, k, v):  # L[:, :, n, 0] broadcast over i: a select on i
    return _chunk_select(q, k, v, lambda L, n, N: L[:, :, n, 0][:, :, None, :])


#: (id, fn, expected rewrites: None where only soundness is asserted)
CHUNK_CASES = [
    ("n10_ssd_chunks", n10_ssd_chunks, 1),
    ("n10_ssd_mask_chunk_and_query_swapped", n10_ssd_mask_chunk_and_query_swapped, 0),
    ("n10_ssd_decay_of_flipped_chunks", n10_ssd_decay_of_flipped_chunks, 1),
    ("n10_ssd_decay_from_two_chunks", n10_ssd_decay_from_two_chunks, 0),
    ("n10_chunk_index_as_position", n10_chunk_index_as_position, 0),
    ("n10_global_mask_split_into_chunks", n10_global_mask_split_into_chunks, 0),
    ("n10_select_query_row", n10_select_query_row, 0),
    ("n10_select_key_column", n10_select_key_column, 0),
    ("n10_select_chunk", n10_select_chunk, 4),
    ("n10_select_next_chunk", n10_select_next_chunk, 4),
    ("n10_select_negative_index", n10_select_negative_index, 4),
    ("n10_select_after_shifting_slice", n10_select_after_shifting_slice, None),
    ("n10_select_query_position_of_chunk", n10_select_query_position_of_chunk, 0),
]


@pytest.mark.parametrize("case_id,fn,expected", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_chunked_near_misses(case_id, fn, expected):
    inputs = make_inputs(2, 3, 16, 4, dtype=torch.float64, seed=1)
    res = check_fn(fn, inputs, rtol=1e-6)
    assert res.ok, f"{res.kind}: {res.failure} (rewrites: {res.rewrites}; near misses: {res.reasons})"
    if expected is not None:
        assert res.rewrites == expected, (res.rewrites, res.reasons)
