"""Python registrations of the decoding steps ``torch.ops.leet.decay_attn_step`` and
``torch.ops.leet.decay_attn_step_``: fake kernels for the traced path, and autograd
for the functional step.

The kernels live in csrc/step.cpp and the argument rules in csrc/contract.cpp; the
fake kernels run those same rules through ``torch.ops.leet._check_decay_attn_step``.
"""
import torch

from .decay_attn import resolve_scale


def check_step_inputs(op, q, k, v, log_decay, state):
    """Raises the ValueError / TypeError the step kernels raise (csrc/contract.cpp)."""
    torch.ops.leet._check_decay_attn_step(op, q, k, v, log_decay, state)


@torch.library.register_fake("leet::decay_attn_step")
def _step_fake(q, k, v, log_decay, state, scale=None):
    check_step_inputs("decay_attn_step", q, k, v, log_decay, state)
    B, H, _ = q.shape
    return v.new_empty(B, H, v.shape[2]), state.new_empty(state.shape)


@torch.library.register_fake("leet::decay_attn_step_")
def _step_inplace_fake(q, k, v, log_decay, state, scale=None):
    check_step_inputs("decay_attn_step_", q, k, v, log_decay, state)
    B, H, _ = q.shape
    return v.new_empty(B, H, v.shape[2])


# Autograd of S' = g S + k^T v, o = s q S' (g = exp(log_decay) per (b, h)).
# With G = dS' + s q^T dO (everything that flows into S'):
#   dq = s S' dO^T,  dk = G v^T,  dv = k G,  dS = g G,  dlog_decay = g <G, S>.


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, state, scale = inputs
    ctx.scale = resolve_scale(scale, q.shape[-1])
    ctx.save_for_backward(q, k, v, log_decay, state, output[1])


def _backward(ctx, grad_o, grad_state):
    q, k, v, log_decay, state, new_state = ctx.saved_tensors
    dt = state.dtype
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    G = ctx.scale * qf.unsqueeze(-1) * grad_o.to(dt).unsqueeze(-2)  # [B, H, K, V]
    if grad_state is not None:
        G = G + grad_state.to(dt)
    dq = ctx.scale * (new_state @ grad_o.to(dt).unsqueeze(-1)).squeeze(-1)
    dk = (G @ vf.unsqueeze(-1)).squeeze(-1)
    dv = (kf.unsqueeze(-2) @ G).squeeze(-2)
    d_state, d_log_decay = G, None
    if log_decay is not None:
        H = state.shape[1]
        g = log_decay.to(dt).exp().view(-1, H, 1, 1)
        d_state = G * g
        if ctx.needs_input_grad[3]:
            d_log = (d_state * state).sum((-1, -2))  # [B, H]
            d_log_decay = (d_log.sum(0) if log_decay.dim() == 1 else d_log).to(log_decay.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_log_decay, d_state.to(state.dtype), None


torch.library.register_autograd("leet::decay_attn_step", _backward, setup_context=_setup_context)
