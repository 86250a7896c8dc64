"""A small RetNet-style language model, written the way public RetNet code writes it
(gamma = 1 - 2**(-5 - arange(H)), the decay mask built in forward from arange and
pow, multi-scale retention with projections, swish gate and group norm), compiled
with backend="leet".  Prints the explain report and eager / inductor / leet timings.

    python examples/retnet_lm.py            # the demo (about a minute on 2 cores)
    python examples/retnet_lm.py --quick    # a few seconds of work, for tests
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiScaleRetention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.group_norm = nn.GroupNorm(n_heads, d_model, affine=False)
        self.register_buffer("gamma", 1 - 2 ** (-5 - torch.arange(n_heads, dtype=torch.float)))

    def decay_mask(self, T, device):
        n = torch.arange(T, device=device)
        d = n[:, None] - n[None, :]
        D = self.gamma[:, None, None] ** d
        return D.masked_fill(d < 0, 0.0)  # [H, T, T]

    def forward(self, x):
        B, T, C = x.shape
        H, Dh = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, Dh).transpose(1, 2) * Dh ** -0.5
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)
        retention = (q @ k.transpose(-1, -2)) * self.decay_mask(T, x.device)
        out = retention @ v  # [B, H, T, Dh]
        out = self.group_norm(out.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
        return self.out_proj(F.silu(self.g_proj(x)) * out)


class Block(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.retention = MultiScaleRetention(d_model, n_heads)
        self.ffn = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x):
        x = x + self.retention(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class RetNetLM(nn.Module):
    def __init__(self, vocab=1000, d_model=256, n_heads=4, n_layers=2):
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


def median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    p.add_argument("--seq-len", type=int, default=None)
    args = p.parse_args(argv)
    import leet_compile

    torch.manual_seed(0)
    T = args.seq_len or (64 if args.quick else 2048)
    model = RetNetLM(d_model=64 if args.quick else 256, n_layers=2).eval()
    tokens = torch.randint(0, 1000, (1, T))

    print("explaining (traces the model once) ...", flush=True)
    print(leet_compile.explain(model, tokens))
    with torch.no_grad():
        eager = model(tokens)
        inductor = torch.compile(model, backend="inductor")
        leet = torch.compile(model, backend="leet")
        print("compiling with backend='leet' (the first call compiles: tens of seconds on 2 cores) ...", flush=True)
        err = (leet(tokens) - eager).abs().max().item()
        print(f"max |leet - eager| = {err:.3g}")
        reps = 2 if args.quick else 5
        times = {}
        for name, f in (("eager", model), ("inductor", inductor), ("leet", leet)):
            if name == "inductor":
                print("compiling with backend='inductor' (first call) and timing ...", flush=True)
            times[name] = median_time(lambda f=f: f(tokens), reps)
            print(f"  {name}: median {times[name] * 1e3:.1f} ms of {reps}", flush=True)
    ratio = times["inductor"] / times["leet"]
    print(f"T={T}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()) +
          f"; inductor / leet time ratio {ratio:.2f} (medians of {reps}, one run, "
          f"{torch.get_num_threads()} threads; a shared machine's timings drift)")
    return err


if __name__ == "__main__":
    main()
