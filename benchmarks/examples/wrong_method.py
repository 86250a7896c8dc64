"""A deliberately wrong method (the decay applied one step late), to show that the
runner catches it: `python benchmarks/run.py methods --smoke --methods-from
benchmarks/examples/wrong_method.py` reports it WRONG, does not time it and exits 1."""
import torch

from harness import register_method


@register_method("off-by-one", decays=("head",))
def off_by_one(q, k, v, log_decay, scale):
    T = q.shape[2]
    i = torch.arange(T)
    d = (i[:, None] - i[None, :] + 1).clamp_min(0).float()            # wrong: i - j + 1
    w = torch.where(i[:, None] >= i[None, :], (log_decay[:, None, None] * d).exp(), 0.0)
    return ((q @ k.transpose(-1, -2)) * w) @ v * scale
