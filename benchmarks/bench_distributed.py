"""Context parallelism on this machine: time and bytes communicated per rank against T,
for 1, 2 and 4 gloo ranks (127.0.0.1), forward and forward + backward.

Bytes are measured: every collective context_parallel_decay_attn issues is recorded with
the bytes of the tensor this rank hands to it and the bytes of the other ranks' data it
receives (leet_compile.distributed.count_collective_bytes). They depend on B, H, K, V and
the world size only, never on T. Timings on a small shared CPU machine are indicative:
the ranks share the cores, so more ranks is not faster here.

    python benchmarks/bench_distributed.py                       # print only
    python benchmarks/bench_distributed.py --save                # also write results/distributed_cpu.json
    python benchmarks/bench_distributed.py --worlds 1 2 --T 1024 8192 --reps 3
"""
import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def _time(fn, reps):
    times = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _worker(rank, world, port, args, out_path):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from leet_compile.distributed import context_parallel_decay_attn, count_collective_bytes

    rows = []
    B, H, K, V = args.B, args.H, args.K, args.V
    for T in args.T:
        T_local = T // world
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(B, H, T_local, K, generator=g, requires_grad=True)
        k = torch.randn(B, H, T_local, K, generator=g, requires_grad=True)
        v = torch.randn(B, H, T_local, V, generator=g, requires_grad=True)
        a = (-torch.rand(B, H, T_local, generator=g) * 0.1).requires_grad_()

        def fwd():
            with torch.no_grad():
                context_parallel_decay_attn(q, k, v, a)

        def fwd_bwd():
            context_parallel_decay_attn(q, k, v, a).sum().backward()

        fwd()
        fwd_bwd()  # warm-up
        with count_collective_bytes() as fwd_records:
            fwd()
        with count_collective_bytes() as all_records:
            fwd_bwd()
        row = {
            "world": world, "T": T, "T_per_rank": T_local, "B": B, "H": H, "K": K, "V": V,
            "forward_ms": _time(fwd, args.reps), "forward_backward_ms": _time(fwd_bwd, args.reps),
            "forward_bytes_sent": sum(r["sent"] for r in fwd_records),
            "forward_bytes_received": sum(r["received"] for r in fwd_records),
            "fwd_bwd_bytes_sent": sum(r["sent"] for r in all_records),
            "fwd_bwd_bytes_received": sum(r["received"] for r in all_records),
            "collectives": [r["op"] for r in all_records],
            "qkv_bytes_per_rank": sum(x.numel() * x.element_size() for x in (q, k, v)),
        }
        # every rank must see the same byte counts (the per-rank figure is independent of the rank)
        counts = torch.tensor([row["forward_bytes_sent"], row["fwd_bwd_bytes_received"]], dtype=torch.float64)
        lo, hi = counts.clone(), counts.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        row["bytes_equal_on_all_ranks"] = bool(torch.equal(lo, hi))
        rows.append(row)
        if rank == 0:
            print(f"  world {world}  T {T:>6}  fwd {row['forward_ms']:8.2f} ms  fwd+bwd {row['forward_backward_ms']:8.2f} ms"
                  f"  bytes/rank fwd sent {row['forward_bytes_sent']:>7} recv {row['forward_bytes_received']:>7}"
                  f"  fwd+bwd sent {row['fwd_bwd_bytes_sent']:>7} recv {row['fwd_bwd_bytes_received']:>7}"
                  f"  (q, k, v here: {row['qkv_bytes_per_rank']} bytes)", flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_world(world, args):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(_worker, args=(world, port, args, out), nprocs=world, join=True,
                           start_method="forkserver")
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384], help="global sequence lengths")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--V", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads shared by the ranks")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/distributed_cpu.json")
    args = p.parse_args(argv)
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "leet_compile"])

    print(f"context_parallel_decay_attn on gloo (127.0.0.1), float32, B={args.B} H={args.H} K={args.K} "
          f"V={args.V}, log_decay [B, H, T]; {os.cpu_count()} cores shared by all ranks", flush=True)
    rows = []
    for world in args.worlds:
        print(f"world size {world}:", flush=True)
        rows += run_world(world, args)
    for world in args.worlds:
        mine = [r for r in rows if r["world"] == world]
        sent = {r["fwd_bwd_bytes_sent"] for r in mine}
        print(f"world {world}: bytes per rank (forward + backward) over T = {[r['T'] for r in mine]}: "
              f"{sorted(sent)} -> {'independent of T' if len(sent) == 1 else 'DEPENDS ON T'}")
    if args.save:
        import datetime

        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, "results", "distributed_cpu.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "torch": torch.__version__, "load_average": os.getloadavg(),
                "threads_per_rank": {str(w): max(1, args.threads // w) for w in args.worlds},
                "timing": f"median of {args.reps} reps (barrier to barrier); no spread recorded",
                "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]),
                "note": "timings are indicative (ranks share the cores); bytes are exact"}
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
