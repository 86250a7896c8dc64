"""leet-compile: exponentially decaying causal linear attention for PyTorch.

    O = scale * ((Q K^T) * D) V,   D[i, j] = exp(sum_{t=j+1..i} log_decay[t]) for j <= i, else 0

* :func:`decay_attn` / ``torch.ops.leet.decay_attn``: the operator, with a collection
  of computation methods (:data:`METHODS`), fake kernels, autograd and vmap.
* ``torch.compile(model, backend="leet")``: finds the naive masked form in
  unmodified models and rewrites it into the operator.
"""
import torch

from leet_compile.ops import BACKENDS, METHODS, library_path


def decay_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    method: str = "auto",
    backend: str = "auto",
):
    """Exponentially decaying causal linear attention.

    For every batch b and head h, with the state S_{-1} = ``initial_state`` (or 0)::

        S_t = exp(log_decay_t) * S_{t-1} + k_t^T v_t
        o_t = scale * q_t S_t

    i.e. ``o_i = scale * sum_{j <= i} <q_i, k_j> * exp(sum_{t=j+1..i} log_decay_t) * v_j``
    plus the decayed initial state.

    Args:
        q, k: ``[B, H, T, K]``; v: ``[B, H, T, V]``. Any strides; float32, float16,
            bfloat16 or float64. Accumulation is in float32 (float64 for float64 inputs).
        log_decay: natural-log decay. ``None`` (no decay), ``[H]`` (per head,
            gamma_h = exp(log_decay[h])) or ``[B, H, T]`` (per position, data-dependent
            gates). Any finite value; positive values make weights grow.
        scale: multiplies the output (e.g. ``K ** -0.5``).
        initial_state: ``[B, H, K, V]`` state entering position 0.
        output_final_state: also return the state after the last position.
        method: the algorithm, one of :data:`METHODS`; ``"auto"`` picks by device and shape.
        backend: the implementation, one of :data:`BACKENDS`: ``"aten"`` (every method,
            any device, written with ATen ops), ``"cpu"`` (the fused CPU kernel, chunked),
            ``"triton"`` / ``"cuda"`` (GPU kernels); ``"auto"`` picks the fastest available.

    Returns:
        ``o`` of shape ``[B, H, T, V]`` in v's dtype, or ``(o, final_state)`` with
        ``final_state`` of shape ``[B, H, K, V]`` (float32; float64 for float64 inputs).
    """
    o, state = torch.ops.leet.decay_attn(
        q, k, v, log_decay, scale, initial_state, output_final_state, method, backend
    )
    return (o, state) if output_final_state else o


__all__ = ["BACKENDS", "METHODS", "decay_attn", "library_path"]
