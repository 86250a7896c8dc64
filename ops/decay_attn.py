"""Python registrations of ``torch.ops.leet.decay_attn``: the fake kernel, autograd
and vmap.

The schema, the kernels and the argument contract live in csrc/ (csrc/contract.cpp):
the fake kernel calls the same checks as the kernels, through the check op
``torch.ops.leet._check_decay_attn``, so eager, fake and compiled calls fail alike.
"""
import torch

from . import _torch_private as private

# The methods and backends, from the tables of csrc/backends.cpp (the one list of each).
METHODS, BACKENDS = (tuple(names) for names in torch.ops.leet._decay_attn_tables()[:2])


# Two rules Python needs the values of live in C++ (csrc/contract.cpp) and are reached
# through metadata ops, which read dtypes and sizes only (fake tensors too). Where dynamo
# traces the caller (the public wrappers), an op returning a non-tensor would break the
# graph, and a symbolic K would be specialized by one (a guard and a recompile per head
# dim): there, and only there, the one Python copy of each rule below is used, pinned to
# the C++ by tests/test_backends.py::test_python_copies_of_cpp_rules.


def compute_dtype(q, k, v):
    """float64 for float64 inputs, float32 otherwise: accumulation and state dtype."""
    if torch.compiler.is_compiling():
        return _compute_dtype_copy(q, k, v)
    return getattr(torch, torch.ops.leet._decay_attn_compute_dtype(q, k, v))


def resolve_scale(scale, K):
    """scale=None means K^-0.5 (as in SDPA and flash-linear-attention)."""
    if torch.compiler.is_compiling() or not isinstance(K, int):
        return _resolve_scale_copy(scale, K)
    return torch.ops.leet._decay_attn_scale(scale, K)


def _compute_dtype_copy(q, k, v):
    return torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32


def _resolve_scale_copy(scale, K):
    if scale is not None:
        return float(scale)
    return 1.0 / K ** 0.5 if K > 0 else 1.0  # 1 / sqrt(K), bit for bit as in C++ (K ** -0.5 is not)


def check_inputs(q, k, v, log_decay, initial_state, method, backend):
    """Raises the ValueError / TypeError the kernels raise for these arguments: the C++
    contract itself (csrc/contract.cpp), run on metadata only (fake tensors included)."""
    torch.ops.leet._check_decay_attn(q, k, v, log_decay, initial_state, method, backend)


@torch.library.register_fake("leet::decay_attn")
def _decay_attn_fake(
    q, k, v, log_decay=None, scale=None, initial_state=None, output_final_state=False, method="auto", backend="auto"
):
    # Defaults as in the schema: the fake-tensor dispatch drops trailing arguments equal to their defaults.
    check_inputs(q, k, v, log_decay, initial_state, method, backend)
    if q.device.type == "cuda":  # the GPU kernel's one policy: triton installed, etc.
        from .gpu import select

        select(q, k, v, method, backend)
    B, H, T, K = q.shape
    o = v.new_empty(B, H, T, v.shape[3])
    state_shape = (B, H, K, v.shape[3]) if output_final_state else (0,)
    return o, q.new_empty(state_shape, dtype=compute_dtype(q, k, v))


# Autograd. With o_i = s q_i S_i and S_i = sum_{j<=i} w(i, j) k_j^T v_j + exp(A_i) S0
# (A the cumulative log decay), every gradient is itself a decay_attn:
#   dq = decay_attn(dO, v, k, a, s, S0^T)                         (forward in time)
#   dk = rev(decay_attn(rev v, s rev dO, rev q, a', 1, dSf^T))     (backward in time)
#   dv = rev(decay_attn(rev k, s rev q, rev dO, a', 1, dSf))       and dS0 = exp(a_0) * its state
# where a' is the reversed log decay shifted by one step (a'_0 = 0, a'_t = a_{T-t}).
# The log decay gradient is dA_t = q_t.dq_t - k_t.dk_t (+ <dSf, Sf> at t = T-1),
# summed backwards over time. Each call uses the forward's method, so the backward
# has the forward's cost (linear in T except for "naive").


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, scale, initial_state, output_final_state, method, backend = inputs
    scale = resolve_scale(scale, q.shape[-1])
    ctx.scale, ctx.method, ctx.backend, ctx.output_final_state = scale, method, backend, output_final_state
    final_state = output[1] if output_final_state else None
    ctx.save_for_backward(q, k, v, log_decay, initial_state, final_state)


def _position_log_decay(log_decay, B, H, T, dtype):
    """The log decay as [B, H, T] in `dtype` (None stays None)."""
    if log_decay is None:
        return None
    a = log_decay.to(dtype)
    return a.view(1, H, 1).expand(B, H, T) if a.dim() == 1 else a


def _backend_for(q, k, v, method, backend):
    """`backend` if the contract lets it serve a call of these shapes, else "auto"."""
    if backend == "auto":
        return backend
    try:
        check_inputs(q, k, v, None, None, method, backend)
    except ValueError:
        return "auto"
    return backend


@torch.library.register_fake("leet::_decay_attn_backward")
def _decay_attn_backward_fake(grad_o, grad_state, q, k, v, log_decay, scale, initial_state):
    check_inputs(q, k, v, log_decay, initial_state, "chunked", "cpu")
    d_ld = q.new_empty(0) if log_decay is None else log_decay.new_empty(log_decay.shape)
    d_s0 = q.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_ld, d_s0


def _fused_cpu_backward(q, method, backend):
    """Whether the backward runs on the fused CPU kernel (leet::_decay_attn_backward,
    csrc/cpu/chunked_cpu_backward.cpp): for calls the fused forward served (CPU tensors,
    backend auto/cpu, method auto/chunked), when the backward need not be differentiable
    itself (that kernel has no autograd: create_graph=True and torch.func transforms take
    the decay_attn formulas below, which are)."""
    return (q.device.type == "cpu" and backend in ("auto", "cpu") and method in ("auto", "chunked")
            and not torch.is_grad_enabled() and not private.functorch_transforms_active())


def _backward(ctx, grad_o, grad_state):
    q, k, v, log_decay, s0, final_state = ctx.saved_tensors
    scale, method, backend = ctx.scale, ctx.method, ctx.backend
    B, H, T, _ = q.shape
    if _fused_cpu_backward(q, method, backend):
        d_sf = grad_state if ctx.output_final_state else None
        dq, dk, dv, grad_ld, grad_s0 = torch.ops.leet._decay_attn_backward(
            grad_o, d_sf, q, k, v, log_decay, scale, s0)
        grad_ld = grad_ld if log_decay is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, grad_ld, None, (grad_s0 if s0 is not None else None), None, None, None
    if T == 0:  # nothing flowed through the sequence; the initial state passes straight through
        grad_s0 = None
        if s0 is not None:
            grad_s0 = (grad_state if ctx.output_final_state else torch.zeros_like(s0)).to(s0.dtype)
        grad_ld = None if log_decay is None else torch.zeros_like(log_decay)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), grad_ld, None, grad_s0,
                None, None, None)
    dt = compute_dtype(q, k, v)
    qf, kf, vf, do = q.to(dt), k.to(dt), v.to(dt), grad_o.to(dt)
    d_sf = grad_state.to(dt) if ctx.output_final_state else None
    s0f = None if s0 is None else s0.to(dt)
    a = _position_log_decay(log_decay, B, H, T, dt)
    # reversed in time, shifted by one: a'_0 = 0, a'_t = a_{T-t}
    a_rev = None if a is None else torch.nn.functional.pad(a.flip(-1)[..., :-1], (1, 0))

    def rev(x):
        return x.flip(2)

    op = call_decay_attn  # differentiable again, under torch.func transforms too
    s0_t = None if s0f is None else s0f.transpose(-1, -2)
    d_sf_t = None if d_sf is None else d_sf.transpose(-1, -2)
    a_fwd = None if log_decay is None else log_decay.to(dt)
    # dq and dk contract over V where the forward contracted over K: a backend whose
    # limits (the CUDA kernels' K <= 256) the swapped shapes break hands over to "auto".
    swapped = _backend_for(do, vf, kf, method, backend)
    dq, _ = op(do, vf, kf, a_fwd, scale, s0_t, False, method, swapped)
    dk, _ = op(rev(vf), rev(do) * scale, rev(qf), a_rev, 1.0, d_sf_t, False, method, swapped)
    dv, d_s0 = op(rev(kf), rev(qf) * scale, rev(do), a_rev, 1.0, d_sf, s0 is not None, method, backend)
    dk, dv = rev(dk), rev(dv)

    grad_log_decay = None
    if log_decay is not None and ctx.needs_input_grad[3]:
        dA = (qf * dq).sum(-1) - (kf * dk).sum(-1)  # [B, H, T]
        if d_sf is not None:
            dA[..., -1] += (d_sf * final_state.to(dt)).sum((-1, -2))
        da = dA.flip(-1).cumsum(-1).flip(-1)  # d/da_t = sum_{m >= t} dA_m
        grad_log_decay = (da.sum((0, 2)) if log_decay.dim() == 1 else da).to(log_decay.dtype)
    grad_s0 = None
    if s0 is not None:
        first = 1.0 if a is None else a[..., 0].exp()[..., None, None]
        grad_s0 = (d_s0 * first).to(s0.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_log_decay, None, grad_s0, None, None, None


torch.library.register_autograd("leet::decay_attn", _backward, setup_context=_setup_context)


class DecayAttnFunction(torch.autograd.Function):
    """The same autograd as an autograd.Function, for torch.func transforms.

    torch.func.grad/vjp cannot go through a custom op's registered autograd (its
    generated Function has no setup_context), so :func:`leet_compile.decay_attn`
    calls this instead while a transform is active. vmap of the forward and backward
    reaches the op's own vmap rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with private.below_autograd():  # this Function is the autograd
            return torch.ops.leet.decay_attn.default(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        q, k, v, log_decay, _, initial_state = inputs[:6]
        ctx.save_for_forward(q, k, v, log_decay, initial_state, output[0], output[1])

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, dq, dk, dv, da, _scale, ds0, *_rest):
        return _jvp(ctx, dq, dk, dv, da, ds0)


# Forward-mode AD. o is linear in each of q, k, v and the initial state, so their
# tangents are decay_attn calls with the tangent in place of the input. For the log
# decay, with D the tangent of the cumulative log decay A (D_t = sum_{s <= t} da_s),
# d w(i, j) = w(i, j) (D_i - D_j), hence
#   do_i = D_i o_i - decay_attn(q, k, D * v)_i   and   dS = D_{T-1} S - its final state.
# The final state does not depend on q.


def _jvp(ctx, dq, dk, dv, da, ds0):
    q, k, v, log_decay, s0, o, sf = ctx.saved_tensors
    scale, method, backend, final = ctx.scale, ctx.method, ctx.backend, ctx.output_final_state
    B, H, T, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v)

    def run(q_, k_, v_, s0_):
        return call_decay_attn(q_, k_, v_, log_decay, scale, s0_, final, method, backend)

    d_o = torch.zeros(B, H, T, V, dtype=dt, device=q.device)
    d_s = torch.zeros(sf.shape, dtype=sf.dtype, device=q.device)
    if dq is not None:
        d_o = d_o + run(dq, k, v, s0)[0]
    for term in (None if dk is None else (q, dk, v, None), None if dv is None else (q, k, dv, None),
                 None if ds0 is None else (q, torch.zeros_like(k), torch.zeros_like(v), ds0)):
        if term is not None:
            o_t, s_t = run(*term)
            d_o, d_s = d_o + o_t, d_s + s_t
    if da is not None and log_decay is not None and T > 0:
        D = _position_log_decay(da, B, H, T, dt).cumsum(-1)  # [B, H, T]
        o_w, s_w = run(q, k, v * D.unsqueeze(-1).to(v.dtype), None)
        d_o = d_o + D.unsqueeze(-1) * o - o_w
        if final:
            d_s = d_s + D[..., -1, None, None] * sf - s_w
    return d_o.to(o.dtype), d_s


def call_decay_attn(*args):
    """torch.ops.leet.decay_attn(*args), through DecayAttnFunction while a torch.func
    transform or a forward-AD dual level is active (the custom op's own autograd has no
    forward mode: dual tensors would lose their tangents)."""
    if private.functorch_transforms_active() or private.forward_ad_active():
        return DecayAttnFunction.apply(*args)
    return torch.ops.leet.decay_attn.default(*args)


def _vmap(info, in_dims, q, k, v, log_decay=None, scale=None, initial_state=None,
          output_final_state=False, method="auto", backend="auto"):
    """An extra leading batch dim n: fold it into B, run once, unfold.

    (Arguments equal to the schema's defaults may arrive omitted, hence the defaults.)"""
    n = info.batch_size

    def lead(x, dim):
        """x with the vmapped dim first (expanded when x is not batched)."""
        return x.movedim(dim, 0) if dim is not None else x.expand(n, *x.shape)

    q_d, k_d, v_d = in_dims[:3]
    a_d = in_dims[3] if len(in_dims) > 3 else None
    s_d = in_dims[5] if len(in_dims) > 5 else None
    q, k, v = lead(q, q_d), lead(k, k_d), lead(v, v_d)
    B, H, T, K = q.shape[1:]
    V = v.shape[-1]
    a = log_decay
    if log_decay is not None and (a_d is not None or log_decay.dim() == 3):
        a = lead(log_decay, a_d)
        if a.dim() == 2:  # per-head decays that differ across n become per-position
            a = a[:, None, :, None].expand(n, B, H, T)
        a = a.reshape(n * B, H, T)
    s = None if initial_state is None else lead(initial_state, s_d).reshape(n * B, H, K, V)
    o, state = torch.ops.leet.decay_attn.default(
        q.reshape(n * B, H, T, K), k.reshape(n * B, H, T, K), v.reshape(n * B, H, T, V),
        a, scale, s, output_final_state, method, backend,
    )
    o = o.view(n, B, H, T, V)
    if output_final_state:
        return (o, state.view(n, B, H, K, V)), (0, 0)
    return (o, state), (0, None)


torch.library.register_vmap("leet::decay_attn", _vmap)
