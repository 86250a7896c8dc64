"""Train a tiny RetNet-style language model with FSDP2 (``fully_shard``) and
``torch.compile(backend="leet")`` on W gloo ranks (127.0.0.1), and check that the loss at
every step equals that of one process training on the whole batch.

The retention is written in the naive masked form (``(q @ k^T) * D @ v`` with ``D`` built from
``gamma ** (i - j)``), so the "leet" backend rewrites it into ``torch.ops.leet.decay_attn``.
Each rank trains on its slice of the batch (data parallel); FSDP2 shards the parameters and
averages the gradients, so W ranks on B/W sequences each take the same steps as one process
on B sequences.

    python examples/fsdp_train.py                 # 2 ranks, 4 steps (a few seconds of work)
    python examples/fsdp_train.py --world 4 --steps 10 --dtype float32
"""
import argparse
import contextlib
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Retention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("gamma", 1 - 2 ** (-5 - torch.arange(n_heads, dtype=torch.float)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
        n = torch.arange(T, device=x.device)
        d = n[:, None] - n[None, :]
        D = (self.gamma.to(x.dtype)[:, None, None] ** d).masked_fill(d < 0, 0.0)  # [H, T, T]
        o = ((q @ k.transpose(-1, -2)) * Dh ** -0.5 * D) @ v  # the form the "leet" backend rewrites
        return self.out(o.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.retention = Retention(d_model, n_heads)
        self.ffn = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x):
        x = x + self.retention(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class TinyRetNet(nn.Module):
    def __init__(self, vocab=128, d_model=32, n_heads=4, n_layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model(dtype, layers):
    torch.manual_seed(0)
    return TinyRetNet(n_layers=layers).to(dtype)


def make_batches(steps, batch, seq_len, vocab=128):
    """Learnable sequences: token t+1 = token t + stride (mod vocab), random start and stride in 1..3."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        batches.append((start + stride * torch.arange(seq_len + 1)) % vocab)
    return batches


def train(model, batches, lr, rank=0, world=1, compile=True):
    """SGD on next-token cross entropy; rank r trains on rows r::world.

    Returns (the global loss per step, how many times torch.ops.leet.decay_attn ran in the last
    step, forward and backward: > 0 shows that the "leet" backend rewrote the retention)."""
    from torch.profiler import ProfilerActivity, profile

    step_fn = torch.compile(model, backend="leet") if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for i, tokens in enumerate(batches):
        last = i == len(batches) - 1
        with profile(activities=[ProfilerActivity.CPU]) if last else contextlib.nullcontext() as prof:
            tokens = tokens[rank::world]
            logits = step_fn(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        total = loss.detach().double()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    # the forward's decay_attn and the backward's (the fused CPU backward, or decay_attn again)
    calls = sum(1 for e in prof.events() if e.name in ("leet::decay_attn", "leet::_decay_attn_backward"))
    return losses, calls


def _worker(rank, world, port, args, out_path):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        import leet_compile  # noqa: F401  (the "leet" backend and the op)

        model = make_model(getattr(torch, args.dtype), args.layers)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        result = train(model, make_batches(args.steps, args.batch, args.seq_len), args.lr, rank, world)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def run_fsdp(args):
    """Losses of the FSDP2 run on args.world ranks (torch.multiprocessing, forkserver)."""
    import multiprocessing
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "leet_compile"])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "losses.pt")
        mp.start_processes(_worker, args=(args.world, port, args, out), nprocs=args.world, join=True,
                           start_method="forkserver")
        return torch.load(out)


def run_single(args):
    """Losses of one process on the whole batch (no FSDP; compiled with "leet" too unless
    --reference eager, which runs the naive masked form as written)."""
    import leet_compile  # noqa: F401

    torch.set_num_threads(1)
    model = make_model(getattr(torch, args.dtype), args.layers)
    return train(model, make_batches(args.steps, args.batch, args.seq_len), args.lr,
                 compile=args.reference == "compiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="number of gloo ranks")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch (a multiple of --world)")
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--reference", default="compiled", choices=["compiled", "eager"],
                   help="how the one-process reference runs (eager: one compile less, for CI)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.batch % args.world:
        sys.exit(f"--batch {args.batch} is not a multiple of --world {args.world}")
    print(f"FSDP2 + torch.compile(backend='leet'): {args.world} gloo ranks, {args.steps} steps, "
          f"batch {args.batch}, T {args.seq_len}, {args.dtype}", flush=True)
    t0 = time.perf_counter()
    fsdp, fsdp_calls = run_fsdp(args)
    t1 = time.perf_counter()
    single, single_calls = run_single(args)
    print(f"(FSDP2 run {t1 - t0:.1f} s, one-process run {time.perf_counter() - t1:.1f} s, compiles included)")
    tol = 1e-10 if args.dtype == "float64" else 1e-5
    worst = 0.0
    for i, (a, b) in enumerate(zip(fsdp, single)):
        rel = abs(a - b) / abs(b)
        worst = max(worst, rel)
        print(f"step {i}: loss FSDP2 x{args.world} {a:.12f}   one process {b:.12f}   rel diff {rel:.1e}")
    print(f"torch.ops.leet.decay_attn calls in the last step (forward + backward): rank 0 of FSDP2 "
          f"{fsdp_calls}, one process {single_calls}")
    ok = (len(fsdp) == len(single) == args.steps and worst <= tol and single[-1] < single[0]
          and fsdp_calls >= 2 * args.layers)
    print(("OK" if ok else "MISMATCH") + f": worst relative difference {worst:.1e} (tolerance {tol:.0e}), "
          f"loss {single[0]:.4f} -> {single[-1]:.4f}")
    return fsdp, single, ok


if __name__ == "__main__":
    sys.exit(0 if main()[2] else 1)
