"""decay_attn over torch.distributed: context parallelism and DTensor sharding rules.

Context parallelism (:func:`context_parallel_decay_attn`): the ranks of a process group
hold consecutive slices of one sequence. The linear-attention state is the whole past
of a sequence in one ``[K, V]`` matrix per head, so the ranks exchange only their local
final states and total decays, never keys or values::

    rank r:  (o_r, S_r) = decay_attn(q_r, k_r, v_r, zero initial state)   local, in parallel
             G_r        = sum of log_decay over the slice                  [B, H]
    all ranks: all_gather([S_r, G_r])                                      B*H*(K*V + 1) numbers per rank
    rank r:  S_in(r)    = sum_{j<r} exp(G_{j+1} + ... + G_{r-1}) S_j        the scan, done locally
             o_r       += scale * exp(A_t) * q_t S_in(r)                    A_t: cumulative log decay in the slice

The backward is the same scan reversed: autograd of the local scan, with the gradient of
the all_gather being a reduce_scatter (each rank receives the sum, over all ranks, of the
gradients of its own state and total decay). See docs/distributed.md.

Why all_gather: torch.distributed has no prefix-scan (MPI_Exscan) collective. A chain of
send/recv would move the same bytes but serialise W - 1 latency-bound hops (rank r waits
for r - 1); one all_gather is a single collective that NCCL and gloo both implement well,
after which every rank runs the (tiny, O(W*B*H*K*V)) scan itself and every rank also has
the global final state. Bytes per rank are independent of T: each rank contributes
B*H*(K*V + 1) elements and receives (W - 1) times that.

DTensor (:func:`register_dtensor_sharding`): sharding rules for ``leet::decay_attn`` and
``leet::decay_attn_varlen`` so that DTensors sharded on batch or heads run the op locally
without redistribution. Registered on the first call of that function (nothing happens at
import time).

Nothing in this module talks to a process group at import time; torch.distributed.tensor
is imported only by :func:`register_dtensor_sharding`.
"""
import contextlib

import torch
import torch.distributed as dist

__all__ = ["context_parallel_decay_attn", "count_collective_bytes", "register_dtensor_sharding"]

# ---------------------------------------------------------------------------------------------
# Collectives (public c10d API only), with byte accounting for benchmarks and tests.

_COUNTERS: list = []  # active count_collective_bytes() records


@contextlib.contextmanager
def count_collective_bytes():
    """Records every collective :func:`context_parallel_decay_attn` issues (forward and backward)
    while the block runs, on this rank: a list of dicts ``{"op", "sent", "received"}`` in bytes.

    The counts are the collective's logical payload, from the sizes of the tensors passed to it:
    ``sent`` is this rank's data that ends up in other ranks' results (all_gather: its own
    contribution of n bytes; reduce_scatter: the W - 1 slices of its W*n-byte input that other
    ranks reduce), ``received`` the other ranks' data that this rank's result is made of
    (all_gather: (W - 1)*n; reduce_scatter: (W - 1)*n). A ring implementation moves (W - 1)*n
    bytes in and out of each rank for either collective. Eager calls only: inside a compiled
    function the collectives are recorded once, when traced."""
    records: list = []
    _COUNTERS.append(records)
    try:
        yield records
    finally:
        _COUNTERS.remove(records)


def _record(op, sent, received):
    for records in _COUNTERS:
        records.append({"op": op, "sent": sent, "received": received})


def _nbytes(t):
    return t.numel() * t.element_size()


def _all_gather_single(out, x, group):
    # all_gather_single is the newer name (torch >= 2.13) of all_gather_into_tensor
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_single(out, x, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


class _AllGather(torch.autograd.Function):
    """[n] on every rank -> [W, n]; the backward is the reduce_scatter of the gradient (sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty(world * x.numel())  # the concatenated form (every backend takes it)
        _all_gather_single(out, x.reshape(-1), group=group)
        _record("all_gather", _nbytes(x), _nbytes(x) * (world - 1))
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty(grad.shape[1:])
        _reduce_scatter_single(out.view(-1), grad.reshape(-1), group=ctx.group)
        _record("reduce_scatter", _nbytes(grad) * (world - 1) // world, _nbytes(out) * (world - 1))
        return out, None


class _Tie(torch.autograd.Function):
    """Returns x unchanged, but puts `gathered` in x's backward (with a zero gradient), so that
    every rank runs the collective's backward even where x does not depend on it (rank 0's
    output): collectives must be issued by all ranks, in the backward too."""

    @staticmethod
    def forward(ctx, x, gathered):
        ctx.shape, ctx.dtype = gathered.shape, gathered.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.shape, dtype=ctx.dtype)


# ---------------------------------------------------------------------------------------------
# Context parallelism.


def _total_log_decay(log_decay, B, H, T, dtype, like):
    """Sum of the log decay over the local slice, [B, H] (differentiable)."""
    if log_decay is None:
        return like.new_zeros(B, H, dtype=dtype)
    a = log_decay.to(dtype)
    if a.dim() == 1:
        return (a * T).expand(B, H)
    return a.sum(-1)


def _cumulative_log_decay(log_decay, B, H, T, dtype, like):
    """A_t = sum_{s <= t} log_decay_s over the local slice, [B, H, T] (None when no decay)."""
    if log_decay is None:
        return None
    a = log_decay.to(dtype)
    if a.dim() == 1:
        steps = torch.arange(1, T + 1, device=like.device, dtype=dtype)
        return (a[:, None] * steps).expand(B, H, T)
    return a.cumsum(-1)


def _scan(states, totals, upto):
    """sum_{j < upto} exp(G_{j+1} + ... + G_{upto-1}) S_j, written as the recurrence
    S <- exp(G_j) S + S_j (j = 0 .. upto-1, S = 0 first). states [W, B, H, K, V], totals [W, B, H]."""
    S = None
    for j in range(upto):
        S = states[j] if S is None else totals[j].exp()[..., None, None] * S + states[j]
    return S


def context_parallel_decay_attn(q, k, v, log_decay=None, *, scale=None, group=None, initial_state=None,
                                output_final_state=False, method="auto", backend="auto"):
    """:func:`leet_compile.decay_attn` on a sequence split over the ranks of ``group``.

    Rank r holds a contiguous slice of the positions (rank 0 the first; with W ranks and
    length T, normally positions [r*T/W, (r+1)*T/W); slices may differ in length). Each
    rank gets exactly the output one process would compute for its positions.

    Args:
        q, k: ``[B, H, T_r, K]``; v: ``[B, H, T_r, V]``: this rank's slice (same B, H, K, V and
            dtype on every rank).
        log_decay: ``None``, ``[H]`` (per head; the same tensor on every rank) or ``[B, H, T_r]``
            (this rank's slice of the per-position decay).
        scale: multiplies the output; ``None`` means ``K ** -0.5``.
        group: the process group (default: the world).
        initial_state: ``[B, H, K, V]``, the state entering global position 0. Read on rank 0
            only (other ranks may pass None or the same tensor; it is not used there), so its
            gradient arrives on rank 0.
        output_final_state: also return the state after the global last position, on every rank.
        method, backend: as for :func:`leet_compile.decay_attn` (the local computation).

    Returns:
        ``o`` ``[B, H, T_r, V]`` (v's dtype), or ``(o, final_state)``.

    Autograd: gradients for q, k, v, log_decay (and initial_state on rank 0), with the total
    loss being the sum of the ranks' losses (the usual data-parallel convention): the
    gradient of a ``final_state`` used on several ranks is the sum of their gradients.

    Communication: one all_gather of ``B*H*(K*V + 1)`` state-dtype elements per rank forward
    (a reduce_scatter of the same size backward), independent of T.
    """
    from leet_compile import decay_attn

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    B, H, T, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    o, S_local = decay_attn(q, k, v, log_decay, scale=scale, initial_state=initial_state if rank == 0 else None,
                            output_final_state=True, method=method, backend=backend)
    if world == 1:
        return (o, S_local) if output_final_state else o
    dt = S_local.dtype
    G = _total_log_decay(log_decay, B, H, T, dt, q)
    payload = torch.cat([S_local.reshape(-1), G.reshape(-1)])  # one buffer, one collective
    gathered = _AllGather.apply(payload, group)  # [W, B*H*(K*V + 1)]
    n = B * H * K * V
    states = gathered[:, :n].view(world, B, H, K, V)
    totals = gathered[:, n:].view(world, B, H)
    S_in = _scan(states, totals, rank)
    if S_in is not None:
        # o_t += scale * exp(A_t) * q_t S_in: the incoming state's contribution, by linearity.
        contrib = q.to(dt) @ S_in  # [B, H, T, V]
        A = _cumulative_log_decay(log_decay, B, H, T, dt, q)
        if A is not None:
            contrib = contrib * A.exp()[..., None]
        o = (o.to(dt) + scale * contrib).to(v.dtype)
    else:
        o = _Tie.apply(o, gathered)
    if not output_final_state:
        return o
    return o, _scan(states, totals, world)


# ---------------------------------------------------------------------------------------------
# DTensor sharding rules.

_REGISTERED = False


def register_dtensor_sharding():
    """Registers DTensor sharding rules for ``leet::decay_attn``, its fused CPU backward
    and ``leet::decay_attn_varlen`` (idempotent; call once before passing DTensors). Accepted placements, per mesh dim:

    * batch: q, k, v ``Shard(0)``; log_decay ``[B, H, T]`` ``Shard(0)``, ``[H]`` ``Replicate()``;
      initial_state ``Shard(0)``; o and the final state ``Shard(0)``;
    * heads: q, k, v ``Shard(1)``; log_decay ``[H]`` ``Shard(0)``, ``[B, H, T]`` ``Shard(1)``;
      initial_state ``Shard(1)``; o and the final state ``Shard(1)`` (varlen: heads only, with
      cu_seqlens ``Replicate()``);
    * everything replicated.

    Inputs already in one of these placements run the op on the local shards with no
    communication; others are redistributed by DTensor to the cheapest one.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import leet_compile  # noqa: F401  (the ops exist)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    def placements(args, dim, tensor_args):
        """Input placements for every argument of the op (None for non-tensors): `dim` is the
        sharded dim of q, k, v and the state (None: everything replicated)."""
        out = []
        for i, a in enumerate(args):
            if not hasattr(a, "shape"):
                out.append(None)
            elif dim is None:
                out.append(Replicate())
            elif i in tensor_args:  # q, k, v, initial_state
                out.append(Shard(dim))
            elif i == 3:  # log_decay: [H] or [B, H, T]
                if len(a.shape) == 1:
                    out.append(Shard(0) if dim == 1 else Replicate())
                else:
                    out.append(Shard(dim))
            else:  # cu_seqlens
                out.append(Replicate())
        return out

    @register_sharding(torch.ops.leet.decay_attn.default)
    def _decay_attn_sharding(*args):
        final = len(args) > 6 and bool(args[6])
        rules = []
        for dim in (0, 1, None):
            p_out = Replicate() if dim is None else Shard(dim)
            rules.append(([p_out, p_out if final else Replicate()], placements(args, dim, (0, 1, 2, 5))))
        return rules

    @register_sharding(torch.ops.leet._decay_attn_backward.default)
    def _backward_sharding(grad_o, grad_state, q, k, v, log_decay, scale, initial_state):
        """The fused CPU backward, on the forward's placements: (dq, dk, dv, d log_decay,
        d initial_state).  A per-head log decay's gradient is summed over the batch, so
        with the batch sharded each rank holds a partial sum."""
        from torch.distributed.tensor import Partial

        rules = []
        for dim in (0, 1, None):
            shard = Replicate() if dim is None else Shard(dim)
            if log_decay is None:
                p_ld, out_ld = None, Replicate()
            elif len(log_decay.shape) == 1:
                p_ld = Shard(0) if dim == 1 else Replicate()
                out_ld = Shard(0) if dim == 1 else (Partial() if dim == 0 else Replicate())
            else:
                p_ld = out_ld = shard
            ins = [shard, None if grad_state is None else shard, shard, shard, shard, p_ld, None,
                   None if initial_state is None else shard]
            outs = [shard, shard, shard, out_ld, shard if initial_state is not None else Replicate()]
            rules.append((outs, ins))
        return rules

    @register_sharding(torch.ops.leet.decay_attn_varlen.default)
    def _varlen_sharding(*args):
        final = bool(args[7])
        rules = []
        for dim in (1, None):
            p_out = Replicate() if dim is None else Shard(dim)
            rules.append(([p_out, p_out if final else Replicate()], placements(args, dim, (0, 1, 2, 6))))
        return rules

    _REGISTERED = True
