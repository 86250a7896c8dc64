"""Fake (meta) kernels of the GPU kernel ops ``torch.ops.leet._decay_attn_cuda`` (the
C++ CUDA kernels, csrc/cuda) and ``_decay_attn_triton`` (ops/triton_kernels.py), so
that calls to them trace under torch.compile and export.

The op's schema is in csrc/schema.cpp and its CUDA kernel in csrc/cuda/decay_attn_cuda.cpp
(CUDA builds only); both check their arguments with the contract of csrc/contract.cpp
(the backend table's "cuda" row: CUDA tensors, methods, K <= 256, kernels built).
"""
import torch

from .decay_attn import check_inputs, compute_dtype


def _kernel_fake(backend):
    def fake(q, k, v, log_decay, scale, initial_state, output_final_state, method):
        check_inputs(q, k, v, log_decay, initial_state, method, backend)
        return _outputs(q, k, v, output_final_state)

    return fake


def _outputs(q, k, v, output_final_state):
    B, H, T, K = q.shape
    V = v.shape[3]
    o = v.new_empty(B, H, T, V)
    state_shape = (B, H, K, V) if output_final_state else (0,)
    return o, q.new_empty(state_shape, dtype=compute_dtype(q, k, v))


torch.library.register_fake("leet::_decay_attn_cuda", _kernel_fake("cuda"))
torch.library.register_fake("leet::_decay_attn_triton", _kernel_fake("triton"))
