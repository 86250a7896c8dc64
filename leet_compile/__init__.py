"""leet-compile: exponentially decaying causal linear attention for PyTorch.

    O = scale * ((Q K^T) * D) V,   D[i, j] = exp(sum_{t=j+1..i} log_decay[t]) for j <= i, else 0

* :func:`decay_attn` / ``torch.ops.leet.decay_attn``: the operator, with a collection
  of computation methods (:data:`METHODS`), fake kernels, autograd and vmap.
* ``torch.compile(model, backend="leet")``: finds the naive masked form in
  unmodified models and rewrites it into the operator.
"""
import torch

from leet_compile.ops import BACKENDS, METHODS, library_path
from leet_compile.ops.decay_attn import call_decay_attn, compute_dtype
from leet_compile.ops.varlen import decay_attn_varlen  # registers leet::decay_attn_varlen


def decay_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    method: str = "auto",
    backend: str = "auto",
    layout: str = "bhtd",
    cu_seqlens: torch.Tensor | None = None,
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
        scale: multiplies the output; ``None`` (the default, as in SDPA and
            flash-linear-attention) means ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state entering position 0.
        output_final_state: also return the state after the last position.
        method: the algorithm, one of :data:`METHODS`; ``"auto"`` picks by device and shape.
        backend: the implementation, one of :data:`BACKENDS`: ``"aten"`` (every method,
            any device, written with ATen ops), ``"cpu"`` (the fused CPU kernel, chunked),
            ``"triton"`` / ``"cuda"`` (GPU kernels); ``"auto"`` picks the fastest available.
        layout: ``"bhtd"`` (the default: heads first, ``[B, H, T, D]``) or ``"bthd"``
            (time first, ``[B, T, H, D]``, the layout of flash-linear-attention's
            ``head_first=False``): q, k, v are then ``[B, T, H, K/V]``, a per-position
            ``log_decay`` is ``[B, T, H]`` and ``o`` is returned as ``[B, T, H, V]``.
            Nothing is copied to change layout: the op reads the inputs in place through
            their strides, and ``o`` is a transposed view of the op's output.
            States are ``[B, H, K, V]`` in both layouts.
        cu_seqlens: packed sequences: ``[N + 1]`` int offsets (0 first, T last); q, k, v are
            ``[1, H, T, *]``, states ``[N, H, K, V]``, log_decay ``[H]`` or ``[1, H, T]``.
            See :mod:`leet_compile.ops.varlen`.

    Returns:
        ``o`` of shape ``[B, H, T, V]`` in v's dtype, or ``(o, final_state)`` with
        ``final_state`` of shape ``[B, H, K, V]`` (float32; float64 for float64 inputs).
    """
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"decay_attn: layout must be 'bhtd' ([B, H, T, D]) or 'bthd' ([B, T, H, D]), got {layout!r}")
    if layout == "bthd":  # views: the op reads through strides
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"decay_attn: with layout='bthd', {name} must be a 4-D tensor [B, T, H, D], "
                                 f"got {getattr(t, 'shape', t)}")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if log_decay is not None and log_decay.dim() == 3:
            log_decay = log_decay.transpose(1, 2)
    if cu_seqlens is not None:  # packed sequences: the leet::decay_attn_varlen op (ops/varlen.py)
        out = decay_attn_varlen(q, k, v, log_decay, cu_seqlens, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, method=method, backend=backend)
        o, state = out if output_final_state else (out, None)
    else:
        o, state = call_decay_attn(q, k, v, log_decay, scale, initial_state, output_final_state, method, backend)
    if layout == "bthd":
        o = o.transpose(1, 2)
    return (o, state) if output_final_state else o


def decay_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
):
    """One decoding step of :func:`decay_attn`: O(K V) per head, whatever the context length.

    For every batch b and head h::

        new_state = exp(log_decay) * state + k^T v
        o = scale * q new_state

    so a prefill ``decay_attn(..., output_final_state=True)`` followed by steps gives
    the outputs of :func:`decay_attn` on the whole sequence. No host synchronisation
    (a decode loop can be captured in a CUDA graph).

    Args:
        q, k: ``[B, H, K]``; v: ``[B, H, V]`` (the current token), any float dtype.
        log_decay: ``None``, ``[H]`` (per head) or ``[B, H]`` (this token's gate).
        state: ``[B, H, K, V]`` float32 (or float64); ``None`` means zeros.
        scale: multiplies the output; ``None`` (the default) means ``K ** -0.5``, as
            in :func:`decay_attn`.

    Returns:
        ``(o, new_state)``: ``o`` ``[B, H, V]`` in v's dtype, ``new_state`` a new
        ``[B, H, K, V]`` tensor in the state's dtype (``state`` is not modified).
    """
    if state is None and isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor) and q.dim() == 3 and v.dim() == 3:
        state = q.new_zeros((*q.shape[:2], q.shape[-1], v.shape[-1]), dtype=compute_dtype(q, k, v))
    return torch.ops.leet.decay_attn_step(q, k, v, log_decay, state, scale)


def decay_attn_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    state: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """In-place :func:`decay_attn_step`: updates ``state`` ([B, H, K, V] float32) to
    ``exp(log_decay) * state + k^T v`` without allocating a new state and returns
    ``o = scale * q state`` ([B, H, V] in v's dtype). For serving loops (no autograd).
    """
    return torch.ops.leet.decay_attn_step_(q, k, v, log_decay, state, scale)


from leet_compile.compat import causal_linear_decoder  # noqa: E402

__all__ = [
    "BACKENDS", "METHODS", "causal_linear_decoder", "decay_attn", "decay_attn_step",
    "decay_attn_step_", "explain", "export", "library_path", "load_package", "rewrite_exported_program",
]

# Loaded on first use, so that `import leet_compile` stays cheap (the pass, export, Inductor).
_LAZY = {
    "explain": "leet_compile.explainer",
    "export": "leet_compile.deploy",
    "load_package": "leet_compile.deploy",
    "rewrite_exported_program": "leet_compile.deploy",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'leet_compile' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
