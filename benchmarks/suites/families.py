"""families: eager / inductor / leet on each public model family (tests/public_models.py).

One variant per family, the model as its project writes it (our own transcription),
forward only under torch.no_grad, fp32.  Recorded per family: how many sites the leet
backend rewrote (0: leet is Inductor on the same graph) and the error of eager and of
leet against the same model run in float64.  Families that loop over positions in
Python (the compiled graph grows with T) are compiled only up to ``max_loop_T``.
"""
import os
import sys

import torch

from harness import Case, rel_err, suite

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tests"))
import public_models  # noqa: E402

#: families with a Python loop over positions (the compiled graph grows with T)
LOOPS_OVER_T = {"lightning_slopes", "leetdecoding_vanilla_slopes", "fla_gla_recurrent"}
NAMES = [name for name, _, _ in public_models.FAMILIES + public_models.NEGATIVES]
_MAKERS = {name: make for name, make, _ in public_models.FAMILIES + public_models.NEGATIVES}


def build(name, H, D, chunk):
    """The family's model at benchmark sizes (each constructor names its sizes its own way)."""
    import inspect

    make = _MAKERS[name]
    target = make.func if hasattr(make, "func") else make
    params = inspect.signature(target).parameters
    sizes = {"heads": H, "head_dim": D, "key_dim": D, "d_state": D, "embed_dim": H * D, "value_dim": H * D,
             "chunk_size": chunk, "block_len": chunk}
    return make(**{k: v for k, v in sizes.items() if k in params})


def _float64(model, inputs):
    import copy

    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return m64(*[x.double() if x.is_floating_point() else x for x in inputs])


@suite("families", x_name="T", x_vals=[4096], smoke_x_vals=[64],
       params=dict(B=1, H=4, D=64, chunk=64, max_loop_T=256),
       variants=[{"family": n} for n in NAMES], baseline="leet")
def families(T, B, H, D, chunk, max_loop_T, family):
    """Public model families (torchscale, fla, Mamba2, yet-another-retnet, Lightning, LeetDecoding) under torch.compile: eager vs inductor vs leet, B=1 H=4 D=64 fp32, no_grad, forward"""
    import leet_compile  # noqa: F401  (registers the backend)
    from torch._dynamo.utils import counters

    model = build(family, H, D, chunk)
    if getattr(model, "needs_einops", False) and public_models.einops is None:
        return Case({"eager": "einops is not installed"})
    if T % chunk and hasattr(model, "block_len"):
        return Case({"eager": f"T={T} is not a multiple of chunk={chunk}"})
    inputs = model.example_inputs(T, B=B)
    ref = _float64(model, inputs)
    fns, info = {}, {}
    with torch.no_grad():
        eager = model(*inputs)
    info["eager"] = {"rel_err_vs_fp64": rel_err(eager, ref)}
    fns["eager"] = lambda: model(*inputs)
    torch._dynamo.reset()  # this family's compiles only (inductor and leet entries coexist)
    for backend in ("inductor", "leet"):
        if family in LOOPS_OVER_T and T > max_loop_T:
            fns[backend] = f"loops over T in Python (compiled only up to max_loop_T={max_loop_T})"
            continue
        counters.clear()
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            out = compiled(*inputs)  # compiles
        info[backend] = {"rel_err_vs_fp64": rel_err(out, ref)}
        if backend == "leet":
            info[backend]["rewrites"] = counters["leet"]["decay_attn_rewrites"]

        def call(compiled=compiled):
            with torch.no_grad():
                return compiled(*inputs)
        fns[backend] = call
    return Case(fns, info=info)
