"""The "leet" torch.compile backend: Inductor plus the decay-attention rewrite.

``torch.compile(model, backend="leet")`` finds this function through the
``torch_dynamo_backends`` entry point.  The dynamo graph is traced to ATen IR
*before* autograd (make_fx with pre_dispatch=True under the example inputs' fake
mode), the pass rewrites it, and the result goes to Inductor's ``compile_fx`` with
per-compile config patches.  Training therefore uses the operator's own
(linear-memory) backward, and no global config is touched.
"""
import torch

__all__ = ["leet_backend", "trace_to_aten"]


def _fakify(fake_mode, example_inputs):
    """Fake versions of the real example inputs, keeping dynamo's symbolic sizes."""
    from torch._subclasses.fake_tensor import FakeTensor

    ctx = torch._guards.TracingContext.try_get()
    out = []
    with fake_mode:
        for x in example_inputs:
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                sym = ctx.tensor_to_context.get(x) if ctx is not None else None
                x = fake_mode.from_tensor(x, symbolic_context=sym, source=sym.tensor_source if sym else None)
            elif isinstance(x, FakeTensor) and x.fake_mode is not fake_mode:
                x = fake_mode.from_tensor(x)
            out.append(x)
    return out


def trace_to_aten(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """The dynamo graph as ATen pre-dispatch IR (above autograd; source stack traces kept)."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
    args = _fakify(fake_mode, example_inputs)

    def run(*a):
        return torch.fx.Interpreter(gm).run(*a)

    with fake_mode, torch.fx.traceback.preserve_node_meta():
        out = make_fx(run, pre_dispatch=True)(*args)
    # keep dynamo's placeholder names (L_self_gamma_, ...): they make reports readable
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new = [n for n in out.graph.nodes if n.op == "placeholder"]
    if len(old) == len(new) and hasattr(torch.fx.Node, "_rename"):
        for a, b in zip(old, new):
            b._rename(a.name)
        out.recompile()
    return out


def _config_patches(mode=None, options=None):
    """Inductor config patches for torch.compile's `mode` and `options`."""
    patches = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    for key, value in (options or {}).items():
        patches[key.replace("-", "_")] = value
    return patches


def leet_backend(gm: torch.fx.GraphModule, example_inputs, mode=None, options=None):
    """Compiles a dynamo graph with Inductor after rewriting decay attention.

    Args:
        gm, example_inputs: what dynamo hands a backend.
        mode, options: torch.compile's `mode` and `options` (Inductor config keys),
            applied as per-compile config patches.
    """
    from torch._inductor.compile_fx import compile_fx

    from leet_compile.passes import rewrite_decay_attention

    aten_gm = trace_to_aten(gm, example_inputs)
    report = rewrite_decay_attention(aten_gm)
    _last_reports.append(report)
    del _last_reports[:-16]
    return compile_fx(aten_gm, example_inputs, config_patches=_config_patches(mode, options))


# Reports of the most recent compiles (for debugging; explain() has its own).
_last_reports = []
