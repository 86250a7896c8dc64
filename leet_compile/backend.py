"""The "leet" torch.compile backend: Inductor plus the decay-attention rewrite.

``torch.compile(model, backend="leet")`` finds this function through the
``torch_dynamo_backends`` entry point.  The dynamo graph is traced to ATen IR
*before* autograd (make_fx with pre_dispatch=True under the example inputs' fake
mode), the pass rewrites it, and the result goes to Inductor's ``compile_fx`` with
per-compile config patches.  Training therefore uses the operator's own
(linear-memory) backward, and no global config is touched.
"""
import logging

import torch

__all__ = ["leet_backend", "rewrite", "trace_to_aten"]


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
    # keep dynamo's placeholder names (l_self_gamma_, ...) and the user's name of each
    # input (from dynamo's source, blocks.0.retention.gamma): reports use them
    from leet_compile.passes.report import USER_NAME_META, user_name

    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new = [n for n in out.graph.nodes if n.op == "placeholder"]
    if len(old) == len(new):
        for a, b in zip(old, new):
            b.meta[USER_NAME_META] = user_name(a)
        if hasattr(torch.fx.Node, "_rename"):
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

    aten_gm, report = rewrite(gm, example_inputs)
    _last_reports.append(report)
    del _last_reports[:-16]
    _warn_if_nothing_rewritten(report)
    return compile_fx(aten_gm, example_inputs, config_patches=_config_patches(mode, options))


def rewrite(gm: torch.fx.GraphModule, example_inputs):
    """(ATen graph with decay attention rewritten, the pass's report), names localized.

    The pass records per-site failures itself; should the pass as a whole fail (a
    bug outside its per-site guard), the failure is counted and logged as an
    internal error and the graph is traced again and left as written, so a pass bug
    never breaks the user's compile."""
    from leet_compile.passes import rewrite_decay_attention
    from leet_compile.passes.report import RewriteReport

    from torch._dynamo.utils import counters

    aten_gm = trace_to_aten(gm, example_inputs)
    rewrites = counters["leet"]["decay_attn_rewrites"]
    try:
        report = rewrite_decay_attention(aten_gm)
    except Exception as e:
        counters["leet"]["decay_attn_rewrites"] = rewrites  # none of them is kept
        report = RewriteReport()
        report.internal_error(_output_node(gm), e)
        aten_gm = trace_to_aten(gm, example_inputs)
    if not isinstance(report, RewriteReport):  # a pass still returning its own record type
        report = _adopt(report)
    report.localize(aten_gm)
    return aten_gm, report


def _output_node(gm):
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _adopt(other):
    """A report.RewriteReport of a record with the same fields (an older pass's)."""
    from leet_compile.passes.report import RewriteReport, Site

    def site(s):
        return Site(s.node, s.source, s.rewritten, reason=s.reason, decay=s.decay, scale=s.scale)

    return RewriteReport([site(s) for s in other.rewrites], [site(s) for s in other.near_misses])


# Reports of the most recent compiles (for debugging; explain() has its own).
_last_reports = []

# Code locations already warned about (see _warn_if_nothing_rewritten).
_warned = set()


def _warn_if_nothing_rewritten(report):
    """Says once per code location (not on every recompile) that a compiled graph had
    attention-like sites and none was rewritten, naming the first reason."""
    if report.rewrites or not report.near_misses:
        return
    key = frozenset(s.source.split(": ", 1)[0] for s in report.near_misses if s.source)
    if not key:
        key = frozenset((s.node, s.reason) for s in report.near_misses)
    if key in _warned:
        return
    _warned.add(key)
    n = len(report.near_misses)
    _log.warning(
        "leet: %d attention-like site%s in this compiled graph %s not rewritten into decay_attn "
        "(the graph runs %s as written). The first one:\n  %s\n"
        "leet_compile.explain(model, *example_inputs) lists every site with its reason.",
        n, "" if n == 1 else "s", "was" if n == 1 else "were", "it" if n == 1 else "them",
        str(report.near_misses[0]).replace("\n", "\n  "))


_log = logging.getLogger(__name__)
