"""Packed variable-length sequences: ``torch.ops.leet.decay_attn_varlen``.

``q, k: [1, H, T, K]`` and ``v: [1, H, T, V]`` hold N sequences back to back;
``cu_seqlens`` ([N+1] offsets, 0 first, T last, nondecreasing) says where each one
starts. Nothing crosses a boundary: the result is exactly that of N separate calls of
``torch.ops.leet.decay_attn`` on the slices, which is how the kernel computes it (correct
by construction, for every method and backend the op has). States are per sequence,
``[N, H, K, V]``; ``log_decay`` is ``None``, ``[H]`` (shared by every sequence) or
``[1, H, T]`` (packed like q).

Why a separate op (registered here, in Python, with ``torch.library.custom_op``):

* it is opaque to torch.compile / torch.export, so the traced graph has no shapes that
  depend on the values of ``cu_seqlens`` (the slice lengths are read on the host inside
  the kernel, one device-to-host copy of N+1 integers per call);
* the fake kernel needs only the shapes: o is ``[1, H, T, V]``, the state ``[N, H, K, V]``
  with ``N = cu_seqlens.numel() - 1``.

Autograd: the backward is a second opaque op, ``leet::decay_attn_varlen_backward``, that
for each sequence takes the vector-Jacobian product of :func:`leet_compile.decay_attn`
on its slice (``torch.func.vjp``), so every gradient uses the op's own backward. It
recomputes each sequence's forward (one extra forward pass in the backward). First order
only: the backward op has no autograd of its own (double backward raises).

Limits (stated, not hidden):

* The schema is registered from Python, so the C++-only AOTInductor runner (a process
  that loads only ``_C.so``) does not know ``leet::decay_attn_varlen``; an exported or
  AOT-compiled program that contains it runs only where ``leet_compile`` is imported.
* Value checks of ``cu_seqlens`` (starts at 0, ends at T, nondecreasing) need its data:
  they run in the kernel, i.e. eagerly and when a compiled graph runs, with the same
  messages. The fake (tracing) path checks everything else (rank, dtype, device, shapes).
* No vmap rule.
"""
from typing import Optional

import torch
from torch import Tensor

from .decay_attn import compute_dtype, resolve_scale

__all__ = ["decay_attn_varlen", "check_varlen_inputs", "check_cu_seqlens_values"]

_OP = "decay_attn_varlen"
INDEX_DTYPES = (torch.int32, torch.int64)


def check_varlen_inputs(q, k, v, log_decay, cu_seqlens, initial_state):
    """Shape, rank and dtype rules of the packed form (eager and fake alike).

    The per-sequence rules (dtypes, devices, k/v shapes, method, backend) are those of
    ``decay_attn`` itself, checked by it on the slices (eager) and by its fake kernel
    (traced): one place for them.
    """
    torch._check_type(
        isinstance(cu_seqlens, Tensor),
        lambda: f"{_OP}: cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}",
    )
    torch._check_value(
        cu_seqlens.dim() == 1,
        lambda: f"{_OP}: cu_seqlens must be a 1-D tensor [N + 1] of sequence offsets, "
        f"got shape {list(cu_seqlens.shape)}",
    )
    torch._check_type(
        cu_seqlens.dtype in INDEX_DTYPES,
        lambda: f"{_OP}: cu_seqlens must be an integer tensor (int32 or int64), got {cu_seqlens.dtype}",
    )
    torch._check_value(
        cu_seqlens.numel() >= 1,
        lambda: f"{_OP}: cu_seqlens must hold at least one offset ([0] for no sequences), got an empty tensor",
    )
    torch._check_value(
        cu_seqlens.device.type == "cpu" or cu_seqlens.device == q.device,
        lambda: f"{_OP}: cu_seqlens must be on the CPU or on q's device {q.device}, got {cu_seqlens.device}",
    )
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check_value(
            t.dim() == 4 and t.shape[0] == 1,
            lambda: f"{_OP}: {name} must be a 4-D tensor [1, H, T, *] holding the packed sequences "
            f"(batch 1), got shape {list(t.shape)}",
        )
    _, H, T, K = q.shape
    V = v.shape[3]
    N = cu_seqlens.shape[0] - 1
    if log_decay is not None:
        shape = list(log_decay.shape)
        torch._check_value(
            shape == [H] or shape == [1, H, T],
            lambda: f"{_OP}: log_decay must have shape [H] = [{H}] or [1, H, T] = [1, {H}, {T}], got {shape}",
        )
    if initial_state is not None:
        torch._check_value(
            list(initial_state.shape) == [N, H, K, V],
            lambda: f"{_OP}: initial_state must have shape [N, H, K, V] = [{N}, {H}, {K}, {V}] "
            f"(N = len(cu_seqlens) - 1 sequences), got {list(initial_state.shape)}",
        )


def check_cu_seqlens_values(offsets, T):
    """Value rules of cu_seqlens (a list of ints): 0 first, T last, nondecreasing."""
    torch._check_value(offsets[0] == 0, lambda: f"{_OP}: cu_seqlens must start at 0, got {offsets[0]}")
    torch._check_value(
        offsets[-1] == T,
        lambda: f"{_OP}: cu_seqlens must end at T = {T} (the packed length of q), got {offsets[-1]}",
    )
    for i in range(len(offsets) - 1):
        if offsets[i] > offsets[i + 1]:
            raise ValueError(
                f"{_OP}: cu_seqlens must be nondecreasing, but cu_seqlens[{i}] = {offsets[i]} > "
                f"cu_seqlens[{i + 1}] = {offsets[i + 1]}"
            )


def _offsets(cu_seqlens, T):
    offsets = cu_seqlens.tolist()  # the one host read (N + 1 integers)
    check_cu_seqlens_values(offsets, T)
    return offsets


def _slices(log_decay, s0, offsets):
    """(start, end, log_decay of the slice, initial state of the slice) per sequence."""
    for n in range(len(offsets) - 1):
        s, e = offsets[n], offsets[n + 1]
        a = None if log_decay is None else (log_decay if log_decay.dim() == 1 else log_decay[:, :, s:e])
        yield s, e, a, None if s0 is None else s0[n : n + 1]


@torch.library.custom_op("leet::decay_attn_varlen", mutates_args=())
def _varlen(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], cu_seqlens: Tensor, scale: float,
    initial_state: Optional[Tensor], output_final_state: bool, method: str, backend: str,
) -> tuple[Tensor, Tensor]:
    check_varlen_inputs(q, k, v, log_decay, cu_seqlens, initial_state)
    _, H, T, K = q.shape
    V = v.shape[3]
    offsets = _offsets(cu_seqlens, T)
    N = len(offsets) - 1
    if N == 0:  # T == 0: let the op check the arguments and give the (empty) output
        o, _ = torch.ops.leet.decay_attn(q, k, v, log_decay, scale, None, False, method, backend)
        return o, q.new_empty((0, H, K, V) if output_final_state else (0,), dtype=compute_dtype(q, k, v))
    o = v.new_empty(1, H, T, V)
    states = []
    for s, e, a, s0 in _slices(log_decay, initial_state, offsets):
        o_n, state_n = torch.ops.leet.decay_attn(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], a, scale, s0, output_final_state, method, backend
        )
        o[:, :, s:e] = o_n
        states.append(state_n)
    state = torch.cat(states) if output_final_state else q.new_empty((0,), dtype=compute_dtype(q, k, v))
    return o, state


@_varlen.register_fake
def _varlen_fake(q, k, v, log_decay, cu_seqlens, scale, initial_state, output_final_state, method, backend):
    check_varlen_inputs(q, k, v, log_decay, cu_seqlens, initial_state)
    # decay_attn's own fake kernel checks the per-sequence rules (dtypes, devices, shapes,
    # method, backend) on the packed tensors, which share them.
    s0 = None if initial_state is None or initial_state.shape[0] == 0 else initial_state[:1]
    o, _ = torch.ops.leet.decay_attn(q, k, v, log_decay, scale, s0, False, method, backend)
    _, H, _, K = q.shape
    N = cu_seqlens.shape[0] - 1
    shape = (N, H, K, v.shape[3]) if output_final_state else (0,)
    return torch.empty_like(o), q.new_empty(shape, dtype=compute_dtype(q, k, v))


@torch.library.custom_op("leet::decay_attn_varlen_backward", mutates_args=())
def _varlen_backward(
    grad_o: Tensor, grad_state: Tensor, q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor],
    cu_seqlens: Tensor, scale: float, initial_state: Optional[Tensor], output_final_state: bool,
    method: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_log_decay, d_initial_state); the last two are empty when absent."""
    from leet_compile import decay_attn  # the public wrapper: differentiable under torch.func

    T = q.shape[2]
    offsets = _offsets(cu_seqlens, T)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    d_a = None if log_decay is None else torch.zeros_like(log_decay)
    d_s0 = None if initial_state is None else torch.zeros_like(initial_state)
    for n, (s, e, a, s0) in enumerate(_slices(log_decay, initial_state, offsets)):
        if s == e:  # empty sequence: final state = initial state, nothing else depends on it
            if d_s0 is not None and output_final_state:
                d_s0[n : n + 1] = grad_state[n : n + 1]
            continue
        args = [q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], a, s0]
        present = [i for i, x in enumerate(args) if x is not None]

        def f(*xs):
            full = list(args)
            for i, x in zip(present, xs):
                full[i] = x
            qi, ki, vi, ai, si = full
            return decay_attn(qi, ki, vi, ai, scale=scale, initial_state=si, output_final_state=True,
                              method=method, backend=backend)

        (o_n, state_n), vjp = torch.func.vjp(f, *[args[i] for i in present])
        g_state = grad_state[n : n + 1] if output_final_state else torch.zeros_like(state_n)
        grads = dict(zip(present, vjp((grad_o[:, :, s:e].to(o_n.dtype), g_state.to(state_n.dtype)))))
        dq[:, :, s:e], dk[:, :, s:e], dv[:, :, s:e] = grads[0], grads[1], grads[2]
        if d_a is not None:
            if log_decay.dim() == 1:
                d_a += grads[3]
            else:
                d_a[:, :, s:e] = grads[3]
        if d_s0 is not None:
            d_s0[n : n + 1] = grads[4]
    empty = q.new_empty((0,))
    return dq, dk, dv, empty if d_a is None else d_a, empty if d_s0 is None else d_s0


@_varlen_backward.register_fake
def _varlen_backward_fake(grad_o, grad_state, q, k, v, log_decay, cu_seqlens, scale, initial_state,
                          output_final_state, method, backend):
    empty = q.new_empty((0,))
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        empty if log_decay is None else torch.empty_like(log_decay),
        empty if initial_state is None else torch.empty_like(initial_state),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, cu_seqlens, scale, initial_state, output_final_state, method, backend = inputs
    ctx.scale, ctx.output_final_state, ctx.method, ctx.backend = scale, output_final_state, method, backend
    ctx.has_log_decay, ctx.has_state = log_decay is not None, initial_state is not None
    ctx.save_for_backward(q, k, v, log_decay, cu_seqlens, initial_state)


def _backward(ctx, grad_o, grad_state):
    q, k, v, log_decay, cu_seqlens, initial_state = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(v)
    if grad_state is None or not ctx.output_final_state:
        grad_state = q.new_zeros((0,))
    dq, dk, dv, d_a, d_s0 = torch.ops.leet.decay_attn_varlen_backward(
        grad_o, grad_state, q, k, v, log_decay, cu_seqlens, ctx.scale, initial_state,
        ctx.output_final_state, ctx.method, ctx.backend,
    )
    return (dq, dk, dv, d_a if ctx.has_log_decay else None, None, None,
            d_s0 if ctx.has_state else None, None, None, None)


_varlen.register_autograd(_backward, setup_context=_setup_context)


def decay_attn_varlen(q, k, v, log_decay=None, cu_seqlens=None, *, scale=None, initial_state=None,
                      output_final_state=False, method="auto", backend="auto"):
    """:func:`leet_compile.decay_attn` on packed sequences (see this module's docstring).

    ``scale=None`` means ``K ** -0.5``. Returns ``o`` ``[1, H, T, V]``, or ``(o, final_state)``
    with ``final_state`` ``[N, H, K, V]``.
    """
    scale = resolve_scale(scale, q.shape[-1])
    o, state = torch.ops.leet.decay_attn_varlen(
        q, k, v, log_decay, cu_seqlens, float(scale), initial_state, output_final_state, method, backend
    )
    return (o, state) if output_final_state else o
