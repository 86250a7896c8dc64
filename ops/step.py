"""Python registrations of the decoding steps ``torch.ops.leet.decay_attn_step`` and
``torch.ops.leet.decay_attn_step_``: argument checks and fake kernels for the traced
path, and autograd for the functional step.

The kernels live in csrc/step.cpp; :func:`check_step_inputs` mirrors its argument
rules and messages, so eager and traced calls fail alike.
"""
import torch

from .decay_attn import FLOAT_DTYPES


def check_step_inputs(op, q, k, v, log_decay, state):
    """Raises ValueError / TypeError naming the bad argument (mirrors csrc/step.cpp)."""
    shapes = {"q": "[B, H, K]", "k": "[B, H, K]", "v": "[B, H, V]"}
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check_value(
            t.dim() == 3, lambda: f"{op}: {name} must be a 3-D tensor {shapes[name]}, got shape {list(t.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check_type(
            t.dtype in FLOAT_DTYPES,
            lambda: f"{op}: {name} must be a floating-point tensor "
            f"(float32, float16, bfloat16 or float64), got {t.dtype}",
        )
    B, H, K = q.shape
    V = v.shape[2]
    torch._check_value(
        k.shape == q.shape,
        lambda: f"{op}: k must have the shape of q [B, H, K] = {list(q.shape)}, got {list(k.shape)}",
    )
    torch._check_value(
        v.shape[:2] == q.shape[:2],
        lambda: f"{op}: v must have shape [B, H, V] with [B, H] = [{B}, {H}] as q, got {list(v.shape)}",
    )
    torch._check_type(
        state.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: state must be float32 (or float64), got {state.dtype}",
    )
    torch._check_value(
        list(state.shape) == [B, H, K, V],
        lambda: f"{op}: state must have shape [B, H, K, V] = [{B}, {H}, {K}, {V}], got {list(state.shape)}",
    )
    if log_decay is not None:
        torch._check_type(
            log_decay.dtype in FLOAT_DTYPES,
            lambda: f"{op}: log_decay must be a floating-point tensor "
            f"(float32, float16, bfloat16 or float64), got {log_decay.dtype}",
        )
        shape = list(log_decay.shape)
        torch._check_value(
            shape == [H] or shape == [B, H],
            lambda: f"{op}: log_decay must have shape [H] = [{H}] or [B, H] = [{B}, {H}], got {shape}",
        )
    for name, t in (("k", k), ("v", v), ("state", state), ("log_decay", log_decay)):
        if t is not None:
            torch._check_value(
                t.device == q.device,
                lambda: f"{op}: all tensors must be on one device, but q is on {q.device} "
                f"and {name} is on {t.device}",
            )


@torch.library.register_fake("leet::decay_attn_step")
def _step_fake(q, k, v, log_decay, state, scale=1.0):
    check_step_inputs("decay_attn_step", q, k, v, log_decay, state)
    B, H, _ = q.shape
    return v.new_empty(B, H, v.shape[2]), state.new_empty(state.shape)


@torch.library.register_fake("leet::decay_attn_step_")
def _step_inplace_fake(q, k, v, log_decay, state, scale=1.0):
    check_step_inputs("decay_attn_step_", q, k, v, log_decay, state)
    B, H, _ = q.shape
    return v.new_empty(B, H, v.shape[2])


# Autograd of S' = g S + k^T v, o = s q S' (g = exp(log_decay) per (b, h)).
# With G = dS' + s q^T dO (everything that flows into S'):
#   dq = s S' dO^T,  dk = G v^T,  dv = k G,  dS = g G,  dlog_decay = g <G, S>.


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, state, scale = inputs
    ctx.scale = scale
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
