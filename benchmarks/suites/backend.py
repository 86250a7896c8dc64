"""backend: eager / inductor / leet on a RetNet-style retention (mask built in forward)."""
import torch
import torch.nn as nn

from harness import Case, suite


class Retention(nn.Module):
    """Parallel retention as RetNet code writes it: gamma ** (i - j), masked_fill."""

    def __init__(self, H):
        super().__init__()
        self.register_buffer("gamma", 1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))

    def forward(self, q, k, v):
        T = q.shape[2]
        n = torch.arange(T, device=q.device)
        d = n[:, None] - n[None, :]
        D = (self.gamma[:, None, None] ** d).masked_fill(d < 0, 0.0)
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 * D) @ v


_MODELS = {}


def models(H):
    """One compiled model per backend (dynamic=True: one compile serves every T)."""
    if H not in _MODELS:
        import leet_compile  # noqa: F401

        _MODELS[H] = {"eager": Retention(H),
                      "inductor": torch.compile(Retention(H), backend="inductor", dynamic=True),
                      "leet": torch.compile(Retention(H), backend="leet", dynamic=True)}
    return _MODELS[H]


@suite("backend", x_name="T", x_vals=[512, 1024, 2048, 4096, 8192, 16384], smoke_x_vals=[64, 200],
       params=dict(B=1, H=4, D=64, naive_mem_gb=3.0), baseline="leet")
def backend(T, B, H, D, naive_mem_gb):
    """RetNet retention under torch.compile: eager vs backend="inductor" vs backend="leet", B=1 H=4 D=64 fp32, no_grad (the first call of each compiles)"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    naive_gb = 3 * B * H * T * T * 4 / 2**30  # mask, scores, weighted scores
    fns = {}
    for name, model in models(H).items():
        if name != "leet" and naive_gb > naive_mem_gb:
            fns[name] = f"T x T tensors need ~{naive_gb:.1f} GB (> naive_mem_gb={naive_mem_gb})"
            continue

        def call(model=model):
            with torch.no_grad():
                return model(q, k, v)
        fns[name] = call
    return Case(fns)
