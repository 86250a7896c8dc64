"""Worker bodies for tests/test_distributed.py, run in processes spawned by
torch.multiprocessing (a module of their own so that the children import nothing of pytest).

Every worker joins a gloo group on 127.0.0.1, runs all its cases, and raises on the first
mismatch (torch.multiprocessing re-raises it in the parent with the child's traceback).
"""
import os

import torch
import torch.distributed as dist


def init(rank, world, port):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def inputs(B, H, T, K, V, decay, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, B, H, T, K, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, V, generator=g, dtype=dtype)
    a = {None: None, "head": -torch.rand(H, generator=g, dtype=dtype) * 0.3,
         "position": -torch.rand(B, H, T, generator=g, dtype=dtype) * 0.3}[decay]
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return q, k, v, a, s0


def check(name, x, ref, tol):
    from reference import rel_err

    err = rel_err(x, ref)
    if not err < tol:
        raise AssertionError(f"rank {dist.get_rank()}: {name}: relative error {err:.3e} >= {tol:.1e}")


def context_parallel(rank, world, port):
    """Forward and backward of context_parallel_decay_attn against one process, every decay form,
    with and without an initial state, float64; then bytes per rank independent of T."""
    init(rank, world, port)
    import leet_compile
    from leet_compile.distributed import context_parallel_decay_attn, count_collective_bytes

    B, H, K, V = 2, 3, 4, 5
    for T in (4 * world, 4 * world + 3 * (world - 1)):  # equal slices, then unequal ones (last rank shorter)
        bounds = [0]
        for r in range(world):
            bounds.append(min(T, bounds[-1] + -(-T // world)))
        sl = slice(bounds[rank], bounds[rank + 1])
        for decay in (None, "head", "position"):
            for with_state in (False, True):
                q, k, v, a, s0 = inputs(B, H, T, K, V, decay)
                s0 = s0 if with_state else None
                g = torch.Generator().manual_seed(7)
                w_o = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
                w_s = torch.randn(world, B, H, K, V, generator=g, dtype=torch.float64)  # a different use per rank

                # one process, whole sequence; the total loss is the sum of the ranks' losses
                full = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, a, s0)]
                o, sf = leet_compile.decay_attn(*full[:4], scale=0.5, initial_state=full[4], output_final_state=True)
                ((o * w_o).sum() + (sf * w_s.sum(0)).sum()).backward()

                # this rank's slice
                mine = [x[:, :, sl] for x in (q, k, v)]
                mine.append(None if a is None else (a if a.dim() == 1 else a[..., sl]))
                mine.append(s0)
                mine = [None if x is None else x.clone().requires_grad_() for x in mine]
                o_r, sf_r = context_parallel_decay_attn(*mine[:4], scale=0.5, initial_state=mine[4],
                                                        output_final_state=True)
                ((o_r * w_o[:, :, sl]).sum() + (sf_r * w_s[rank]).sum()).backward()

                case = f"T={T} decay={decay} state={with_state}"
                check(f"{case} o", o_r, o[:, :, sl], 1e-13)
                check(f"{case} final_state", sf_r, sf, 1e-13)
                for name, x, ref in zip("qkv", mine[:3], full[:3]):
                    check(f"{case} d{name}", x.grad, ref.grad[:, :, sl], 1e-13)
                if a is not None:
                    da = mine[3].grad.clone()
                    if a.dim() == 1:  # a per-head decay is shared: its gradient is the sum over ranks
                        dist.all_reduce(da)
                    check(f"{case} dlog_decay", da, full[3].grad if a.dim() == 1 else full[3].grad[..., sl], 1e-13)
                if s0 is not None:
                    if rank == 0:
                        check(f"{case} dinitial_state", mine[4].grad, full[4].grad, 1e-13)
                    elif mine[4].grad is not None:
                        raise AssertionError("initial_state is read on rank 0 only")

    # output only, no final state, default scale
    q, k, v, a, _ = inputs(B, H, 4 * world, K, V, "position")
    sl = slice(4 * rank, 4 * rank + 4)
    o = leet_compile.decay_attn(q, k, v, a, scale=K ** -0.5)
    check("default scale", context_parallel_decay_attn(q[:, :, sl], k[:, :, sl], v[:, :, sl], a[..., sl]),
          o[:, :, sl], 1e-13)

    # -inf (hard resets) inside a slice and at a slice boundary
    qi, ki, vi, ai, _ = inputs(B, H, 4 * world, K, V, "position")
    ai[0, 0, 5] = ai[1, 2, 4] = -float("inf")
    o, sf = leet_compile.decay_attn(qi, ki, vi, ai, scale=0.5, output_final_state=True)
    if not (torch.isfinite(o).all() and torch.isfinite(sf).all()):
        raise AssertionError("decay_attn gave a non-finite result with -inf resets")
    o_r, sf_r = context_parallel_decay_attn(qi[:, :, sl], ki[:, :, sl], vi[:, :, sl], ai[..., sl], scale=0.5,
                                            output_final_state=True)
    check("-inf o", o_r, o[:, :, sl], 1e-13)
    check("-inf final_state", sf_r, sf, 1e-13)

    # float32 inputs: float32 output, float32 state arithmetic
    q32, k32, v32, a32 = (x.float() for x in (q, k, v, a))
    o32 = leet_compile.decay_attn(q32, k32, v32, a32, scale=0.5)
    o32_r = context_parallel_decay_attn(q32[:, :, sl], k32[:, :, sl], v32[:, :, sl], a32[..., sl], scale=0.5)
    if o32_r.dtype != torch.float32:
        raise AssertionError(f"float32 inputs gave {o32_r.dtype}")
    check("float32 o", o32_r, o32[:, :, sl], 1e-5)

    if world == 2:  # torch.compile traces it (collectives included) into one graph, same numbers
        from torch._dynamo.utils import counters

        counters.clear()
        x = [t[:, :, sl].clone().requires_grad_() for t in (q, k, v)] + [a[..., sl].clone().requires_grad_()]
        y = [t.detach().clone().requires_grad_() for t in x]
        f = torch.compile(context_parallel_decay_attn, backend="aot_eager", fullgraph=True)
        f(*x, output_final_state=False).sum().backward()
        context_parallel_decay_attn(*y).sum().backward()
        if counters["stats"]["unique_graphs"] != 1:
            raise AssertionError(f"torch.compile: {dict(counters['stats'])}")
        for name, s, t in zip(["q", "k", "v", "log_decay"], x, y):
            check(f"compiled d{name}", s.grad, t.grad, 1e-13)

    # communication: one all_gather of B*H*(K*V + 1) float64 numbers forward, one reduce_scatter
    # backward, whatever T
    expected = B * H * (K * V + 1) * 8
    for T_local in (3, 50, 400):
        q, k, v, a, _ = inputs(B, H, T_local, K, V, "position", seed=rank)
        q.requires_grad_()
        with count_collective_bytes() as records:
            context_parallel_decay_attn(q, k, v, a).sum().backward()
        ops = [(r["op"], r["sent"], r["received"]) for r in records]
        want = [("all_gather", expected, expected * (world - 1)),
                ("reduce_scatter", expected * (world - 1), expected * (world - 1))]
        if ops != want:
            raise AssertionError(f"rank {rank}: T_local={T_local}: collectives {ops}, expected {want}")
    dist.destroy_process_group()


def dtensor(rank, world, port):
    """DTensors sharded on batch or heads: local computation, no communication, forward and backward."""
    init(rank, world, port)
    import leet_compile
    from leet_compile.distributed import register_dtensor_sharding
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    register_dtensor_sharding()
    register_dtensor_sharding()  # idempotent
    mesh = init_device_mesh("cpu", (world,))
    B, H, T, K, V = 2 * world, 2 * world, 9, 4, 5
    for dim in (0, 1):
        for decay in (None, "head", "position"):
            q, k, v, a, s0 = inputs(B, H, T, K, V, decay)
            full = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, a, s0)]
            o, sf = leet_compile.decay_attn(*full[:4], initial_state=full[4], output_final_state=True)
            (o.sum() + (sf * sf).sum()).backward()

            def shard(x, d):
                return distribute_tensor(x, mesh, [Shard(d)])

            dts = [shard(q, dim), shard(k, dim), shard(v, dim)]
            if a is None:
                dts.append(None)
            elif a.dim() == 1:
                dts.append(distribute_tensor(a, mesh, [Shard(0) if dim == 1 else Replicate()]))
            else:
                dts.append(shard(a, dim))
            dts.append(shard(s0, dim))
            dts = [None if x is None else x.requires_grad_() for x in dts]
            with CommDebugMode() as comm:
                o_d, sf_d = leet_compile.decay_attn(*dts[:4], initial_state=dts[4], output_final_state=True)
                loss = o_d.sum() + (sf_d * sf_d).sum()
            case = f"dim={dim} decay={decay}"
            if comm.get_total_counts() != 0:
                raise AssertionError(f"{case}: forward communicated: {comm.get_comm_counts()}")
            if o_d.placements != (Shard(dim),) or sf_d.placements != (Shard(dim),):
                raise AssertionError(f"{case}: placements {o_d.placements}, {sf_d.placements}")
            # (both outputs in the loss: with the final state unused, autograd hands decay_attn's
            # backward a plain zero tensor for its gradient, which DTensor refuses to mix with DTensors)
            with CommDebugMode() as comm:
                loss.backward()
            if comm.get_total_counts() != 0:
                raise AssertionError(f"{case}: backward communicated: {comm.get_comm_counts()}")
            check(f"{case} o", o_d.full_tensor(), o, 1e-13)
            check(f"{case} final_state", sf_d.full_tensor(), sf, 1e-13)
            for name, x, ref in zip(["q", "k", "v", "log_decay", "initial_state"], dts, full):
                if x is not None:
                    check(f"{case} d{name}", x.grad.full_tensor(), ref.grad, 1e-13)

    # packed sequences sharded on heads
    lens = [3, 0, 6]
    cu = torch.tensor([0, 3, 3, 9])
    q, k, v, a, _ = inputs(1, H, 9, K, V, "position")
    s0 = torch.randn(len(lens), H, K, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    o, sf = leet_compile.decay_attn(q, k, v, a, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    dq, dk, dv, da, ds0 = (distribute_tensor(x, mesh, [Shard(1)]) for x in (q, k, v, a, s0))
    dcu = distribute_tensor(cu, mesh, [Replicate()])
    with CommDebugMode() as comm:
        o_d, sf_d = leet_compile.decay_attn(dq, dk, dv, da, initial_state=ds0, output_final_state=True, cu_seqlens=dcu)
    if comm.get_total_counts() != 0 or o_d.placements != (Shard(1),):
        raise AssertionError(f"varlen: communicated {comm.get_comm_counts()}, placements {o_d.placements}")
    check("varlen o", o_d.full_tensor(), o, 1e-13)
    check("varlen final_state", sf_d.full_tensor(), sf, 1e-13)
    dist.destroy_process_group()
