"""torch.distributed on gloo (CPU, 127.0.0.1): context parallelism on 2 and 4 ranks against one
process (forward, backward, every decay form, float64, bytes per rank), DTensor sharding rules,
and the FSDP2 + torch.compile training example. One spawn per world size; the cases run inside
the workers (tests/_dist_workers.py)."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

# examples/ on the path before the forkserver starts, so that its children can import fsdp_train
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.append(EXAMPLES)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world):
    """Runs fn(rank, world, port) in `world` processes. They fork from one forkserver that has
    imported torch and leet_compile once (spawning fresh interpreters costs seconds each here)."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "leet_compile", "_dist_workers"])
    mp.start_processes(fn, args=(world, free_port()), nprocs=world, join=True, start_method="forkserver")


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_process(world):
    import _dist_workers

    spawn(_dist_workers.context_parallel, world)


def test_dtensor_sharded_on_batch_or_heads_runs_locally():
    import _dist_workers

    spawn(_dist_workers.dtensor, 2)


def test_world_size_one_is_decay_attn():
    """A group of one: exactly decay_attn (no collective)."""
    from leet_compile import decay_attn
    from leet_compile.distributed import context_parallel_decay_attn, count_collective_bytes

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 1, 2, 7, 4, generator=g, dtype=torch.float64)
        v = torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64)
        a = -torch.rand(1, 2, 7, generator=g, dtype=torch.float64)
        with count_collective_bytes() as records:
            o, sf = context_parallel_decay_attn(q, k, v, a, output_final_state=True)
        o_ref, sf_ref = decay_attn(q, k, v, a, scale=4 ** -0.5, output_final_state=True)
        assert records == [] and torch.equal(o, o_ref) and torch.equal(sf, sf_ref)
    finally:
        dist.destroy_process_group()


def test_import_does_no_work():
    """Importing leet_compile.distributed neither imports torch.distributed.tensor nor registers rules."""
    import subprocess

    code = ("import sys, leet_compile.distributed as d; "
            "assert 'torch.distributed.tensor' not in sys.modules, 'DTensor imported'; "
            "assert not d._REGISTERED")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fsdp2_compile_example_loss_equals_one_process():
    """examples/fsdp_train.py on 2 gloo ranks (FSDP2 fully_shard + torch.compile(backend="leet")):
    the loss at every step equals one process's (float64), the retention ran as decay_attn."""
    import fsdp_train

    fsdp, single, ok = fsdp_train.main(["--world", "2", "--layers", "1", "--steps", "3", "--reference", "eager"])
    assert ok, (fsdp, single)
