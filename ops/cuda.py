"""Fake (meta) kernel of ``torch.ops.leet._decay_attn_cuda``, the C++ CUDA kernels
(csrc/cuda), so that calls to it trace under torch.compile and export.

The op's schema is in csrc/schema.cpp and its CUDA kernel in csrc/cuda/decay_attn_cuda.cpp
(CUDA builds only); the checks below mirror that file's, with the same messages.
"""
import torch

from .decay_attn import check_inputs, compute_dtype

CUDA_METHODS = ("auto", "chunked", "recurrent")
MAX_HEAD_DIM = 256  # LEET_MAX_HEAD_DIM in csrc/cuda/decay_attn_kernels.h


@torch.library.register_fake("leet::_decay_attn_cuda")
def _decay_attn_cuda_fake(q, k, v, log_decay, scale, initial_state, output_final_state, method):
    check_inputs(q, k, v, log_decay, initial_state, method, "cuda")
    torch._check_value(
        method in CUDA_METHODS,
        lambda: f"_decay_attn_cuda: method must be 'auto', 'chunked' or 'recurrent', got '{method}'",
    )
    B, H, T, K = q.shape
    V = v.shape[3]
    torch._check_value(
        K <= MAX_HEAD_DIM,
        lambda: f"_decay_attn_cuda: head dim K must be at most {MAX_HEAD_DIM}, got {K} "
        "(use backend='triton' or 'aten')",
    )
    o = v.new_empty(B, H, T, V)
    state_shape = (B, H, K, V) if output_final_state else (0,)
    return o, q.new_empty(state_shape, dtype=compute_dtype(q, k, v))
