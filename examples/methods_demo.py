"""A tour of torch.ops.leet.decay_attn: every method on one problem, its error
against a float64 reference and its time, then the long-sequence win over the
naive masked form. Runs in well under a minute on 2 CPU cores.

    python examples/methods_demo.py
"""
import time

import torch

import leet_compile


def timed(fn, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def naive(q, k, v, log_decay):
    """How models write it: materialise the T x T decay mask."""
    i = torch.arange(q.shape[2])
    diff = (i[:, None] - i[None, :]).float()
    mask = torch.where(diff >= 0, torch.exp(log_decay[:, None, None] * diff), 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def main():
    torch.manual_seed(0)
    B, H, T, K, V = 1, 8, 1024, 64, 64
    q, k, v = (torch.randn(B, H, T, d) for d in (K, K, V))
    log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32)))  # RetNet's gammas
    ref = leet_compile.decay_attn(q.double(), k.double(), v.double(), log_decay.double(), method="recurrent")

    print(f"decay_attn, B={B} H={H} T={T} K={K} V={V}, fp32, per-head decay, "
          f"{torch.get_num_threads()} CPU threads\n")
    print(f"{'method':>10} {'backend':>8} {'ms':>9} {'rel err vs fp64':>16}")
    for method in leet_compile.METHODS:
        backend = "aten" if method not in ("auto", "chunked") else "auto"
        out = leet_compile.decay_attn(q, k, v, log_decay, method=method, backend=backend)
        err = ((out - ref).norm() / ref.norm()).item()
        ms = timed(lambda: leet_compile.decay_attn(q, k, v, log_decay, method=method, backend=backend), reps=1 if method == "fleet" else 3)
        print(f"{method:>10} {backend:>8} {ms:9.2f} {err:16.1e}")

    print("\nlong sequences: the naive masked form vs decay_attn (auto)")
    print(f"{'T':>6} {'naive ms':>10} {'decay_attn ms':>14} {'speed-up':>9}")
    for T in (1024, 2048, 4096):
        q, k, v = (torch.randn(B, H, T, d) for d in (K, K, V))
        t_naive = timed(lambda: naive(q, k, v, log_decay), reps=1)
        t_ours = timed(lambda: leet_compile.decay_attn(q, k, v, log_decay))
        print(f"{T:>6} {t_naive:10.1f} {t_ours:14.2f} {t_naive / t_ours:8.0f}x")


if __name__ == "__main__":
    main()
