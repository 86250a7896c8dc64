"""Smoke test of an installed leet-compile (a wheel, not the source tree).

Run from outside the checkout. This process never imports leet_compile itself:
torch.compile(backend="leet") finds the backend through its entry point, which loads
the operator library; torch.ops.leet.decay_attn is then called directly.
"""
import importlib.metadata as md
import os
import sys

import torch

dist = md.distribution("leet-compile")
print(f"leet-compile {dist.version} from {dist.locate_file('')}; requires {dist.requires}")
pins = [r for r in (dist.requires or []) if r.replace(" ", "").startswith("torch==")]
assert pins, f"the wheel must pin the torch it was built against, requires={dist.requires}"
built_for = pins[0].split("==", 1)[1].strip()
assert torch.__version__.split("+")[0] == built_for, (torch.__version__, built_for)
assert "leet_compile" not in sys.modules


class Retention(torch.nn.Module):
    """RetNet-style parallel retention, as user code writes it."""

    def __init__(self, H):
        super().__init__()
        self.register_buffer("gamma", 1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))

    def forward(self, q, k, v):
        T = q.shape[2]
        n = torch.arange(T, device=q.device)
        d = n[:, None] - n[None, :]
        D = (self.gamma[:, None, None] ** d).masked_fill(d < 0, 0.0)
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 * D) @ v


torch.manual_seed(0)
B, H, T, K = 2, 4, 100, 16
q, k, v = (torch.randn(B, H, T, K) for _ in range(3))
model = Retention(H)
eager = model(q, k, v)
compiled = torch.compile(model, backend="leet", fullgraph=True)
out = compiled(q, k, v)
torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)

# loaded by the backend's entry point, not imported here
lib = sys.modules["leet_compile"].library_path()
print(f"operator library: {lib}")
assert "site-packages" in lib, f"expected the installed library, got {lib}"
here = os.path.dirname(os.path.abspath(__file__))
assert not lib.startswith(os.path.dirname(here)), "the smoke test must not use the source tree"

log_decay = torch.log(model.gamma)
o, state = torch.ops.leet.decay_attn(q, k, v, log_decay, K ** -0.5, None, True, "auto", "auto")
torch.testing.assert_close(o, eager, rtol=1e-4, atol=1e-4)
assert state.shape == (B, H, K, K)
print("smoke test passed: torch.compile(backend='leet') and torch.ops.leet.decay_attn, torch", torch.__version__)
