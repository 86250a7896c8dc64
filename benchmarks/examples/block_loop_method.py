"""A computation method written by a researcher, as a plain Python function, registered
with the benchmark harness in one decorator line.

    python benchmarks/run.py methods --methods-from benchmarks/examples/block_loop_method.py

The runner first checks it against the float64 recurrence for every decay form it claims
(no decay, per-head [H], per-position [B, H, T]); then times it beside the built-in
methods at every T of the suite. A method that fails the check is reported WRONG and not
timed (and the run exits 1).

The method: the chunked algorithm in plain torch. Inside a block of C tokens, the
quadratic form with weights exp(g_i - g_j) (g: cumulative log decay inside the block);
between blocks, the [K, V] state. Only differences of cumulative log decays inside one
block are exponentiated, so strong decays underflow to 0 instead of giving inf * 0.
"""
import torch

from harness import register_method


@register_method("block-loop-64", decays=("none", "head", "position"))
def block_loop(q, k, v, log_decay, scale, C=64):
    B, H, T, K = q.shape
    a = torch.zeros(B, H, T) if log_decay is None else log_decay.float().expand(B, H, T) \
        if log_decay.dim() == 3 else log_decay.float().view(1, H, 1).expand(B, H, T)
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    out = torch.empty(B, H, T, v.shape[-1], dtype=torch.float32)
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    for s in range(0, T, C):
        qi, ki, vi = (x[:, :, s:s + C].float() for x in (q, k, v))
        n = qi.shape[2]
        g = a[:, :, s:s + C].cumsum(-1)                            # log decay from the block's start
        w = torch.where(causal[:n, :n], g[..., :, None] - g[..., None, :], float("-inf")).exp()
        out[:, :, s:s + C] = ((qi @ ki.transpose(-1, -2)) * w) @ vi + (qi * g.exp()[..., None]) @ S
        to_end = (g[..., -1:] - g).exp()[..., None]                # from each row to the block's end
        S = g[..., -1].exp()[..., None, None] * S + (ki * to_end).transpose(-1, -2) @ vi
    return (out * scale).to(v.dtype)
