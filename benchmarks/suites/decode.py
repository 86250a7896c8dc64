"""decode: one decoding step against recomputing the whole sequence."""
import torch

import leet_compile
from harness import Case, suite


@suite("decode", x_name="B", x_vals=[1, 8, 32], smoke_x_vals=[1, 4],
       params=dict(H=8, context=4096, K=64, V=64, dtype="float32"), smoke_params=dict(context=128),
       baseline="step (in place)", unit="us")
def decode(B, H, context, K, V, dtype):
    """decay_attn_step_ (in place) / decay_attn_step for one token vs decay_attn over the whole context + 1; H=8 K=V=64, context 4096"""
    dt = getattr(torch, dtype)
    T = context
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T + 1, K, generator=g, dtype=dt) for _ in range(2))
    v = torch.randn(B, H, T + 1, V, generator=g, dtype=dt)
    a = -torch.rand(H, generator=g) * 0.1
    scale = K**-0.5
    _, state = leet_compile.decay_attn(q[:, :, :T], k[:, :, :T], v[:, :, :T], a, scale=scale, output_final_state=True)
    qt, kt, vt = (x[:, :, T].contiguous() for x in (q, k, v))
    work = state.clone()  # the in-place step keeps updating this copy (values stay bounded: decay < 1)
    o_step, _ = leet_compile.decay_attn_step(qt, kt, vt, a, state, scale=scale)
    o_full = leet_compile.decay_attn(q, k, v, a, scale=scale)[:, :, T]
    err = (o_step.double() - o_full.double()).abs().max().item()
    fns = {
        "step (in place)": lambda: leet_compile.decay_attn_step_(qt, kt, vt, a, work, scale=scale),
        "step (functional)": lambda: leet_compile.decay_attn_step(qt, kt, vt, a, state, scale=scale),
        "recompute context+1": lambda: leet_compile.decay_attn(q, k, v, a, scale=scale),
    }
    return Case(fns, info={"step (in place)": {"max_abs_diff_step_vs_full": err}})
