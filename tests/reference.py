"""The float64 reference every method and kernel is compared against: the
recurrence itself, token by token, written independently of the library."""
import torch


def position_log_decay(log_decay, B, H, T):
    """log_decay (None, [H] or [B, H, T]) as float64 [B, H, T]."""
    if log_decay is None:
        return torch.zeros(B, H, T, dtype=torch.float64)
    a = log_decay.detach().double().cpu()
    return a.view(1, H, 1).expand(B, H, T) if a.dim() == 1 else a


def decay_attn_reference(q, k, v, log_decay=None, scale=1.0, initial_state=None):
    """S_t = exp(a_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t in float64, on CPU.

    Returns (o [B, H, T, V], final_state [B, H, K, V]), both float64.
    """
    q, k, v = (x.detach().double().cpu() for x in (q, k, v))
    B, H, T, K = q.shape
    a = position_log_decay(log_decay, B, H, T)
    S = (
        initial_state.detach().double().cpu().clone()
        if initial_state is not None
        else torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    )
    o = torch.empty(B, H, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        S = S * a[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o * scale, S


def _recurrence(q, k, v, a, s0, scale):
    """The recurrence with autograd, in whatever dtype it is given (float64 here)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    if a is None:
        a = torch.zeros(B, H, T, dtype=q.dtype)
    elif a.dim() == 1:
        a = a.view(1, H, 1).expand(B, H, T)
    S = s0 if s0 is not None else torch.zeros(B, H, K, V, dtype=q.dtype)
    outs = []
    for t in range(T):
        S = S * a[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, 2) * scale if T else q.new_zeros(B, H, 0, V)
    return o, S


def decay_attn_reference_grads(q, k, v, a, s0, go, gs, scale):
    """float64 autograd gradients of sum(o * go) + sum(final_state * gs) (gs None: no state
    term) with respect to q, k, v, log_decay a and initial state s0 (None for absent inputs)."""
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in (q, k, v, a, s0)]
    o, sf = _recurrence(*leaves, scale)
    loss = (o * go.double().cpu()).sum() + (0 if gs is None else (sf * gs.double().cpu()).sum())
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return [None if t is None else next(grads) for t in leaves]


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (0 when both are empty)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(B=2, H=3, T=65, K=16, V=24, decay="head", state=False, dtype=torch.float32,
                strided=False, decay_range=(-0.3, -0.01), requires_grad=False, seed=None):
    """Fresh random inputs. decay: None, "head" ([H]) or "position" ([B, H, T]).

    strided=True returns q, k, v as permuted views of one fused [B, T, 3, H, D] tensor
    (the layout a fused qkv projection gives), so their strides are not contiguous.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    D = max(K, V)
    if strided:
        qkv = torch.randn(B, T, 3, H, D, generator=g).to(dtype)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
        q, k, v = q[..., :K], k[..., :K], v[..., :V]
    else:
        q = torch.randn(B, H, T, K, generator=g).to(dtype)
        k = torch.randn(B, H, T, K, generator=g).to(dtype)
        v = torch.randn(B, H, T, V, generator=g).to(dtype)
    lo, hi = decay_range
    a = None
    if decay == "head":
        a = torch.rand(H, generator=g) * (hi - lo) + lo
    elif decay == "position":
        a = torch.rand(B, H, T, generator=g) * (hi - lo) + lo
    s0 = torch.randn(B, H, K, V, generator=g) if state else None
    if requires_grad:
        for t in (q, k, v, a, s0):
            if t is not None:
                t.requires_grad_(True)
    return q, k, v, a, s0
