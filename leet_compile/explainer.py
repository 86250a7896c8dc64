"""``leet_compile.explain``: what the "leet" backend would rewrite in a model, and why
it leaves the other attention-like sites alone."""
import torch

__all__ = ["explain"]


def explain(model, *example_inputs, dynamic=None, **example_kwargs):
    """Traces ``model(*example_inputs, **example_kwargs)`` as ``torch.compile(model,
    backend="leet")`` would and returns the pass's report (no Inductor compile).

    The report (:class:`leet_compile.passes.RewriteReport`) lists each rewritten site
    with its source line and derived decay (``report.rewrites``) and each near miss
    with the reason it was left alone (``report.near_misses``); ``print(report)``
    gives a readable summary.  The rewrite counter is left unchanged.
    """
    from torch._dynamo.utils import counters

    from leet_compile.backend import trace_to_aten
    from leet_compile.passes import RewriteReport, rewrite_decay_attention

    report = RewriteReport()
    before = counters["leet"]["decay_attn_rewrites"]

    def capture(gm, inputs):
        aten_gm = trace_to_aten(gm, inputs)
        report.extend(rewrite_decay_attention(aten_gm))
        return aten_gm

    try:
        with torch.no_grad() if not torch.is_grad_enabled() else torch.enable_grad():
            torch.compile(model, backend=capture, dynamic=dynamic)(*example_inputs, **example_kwargs)
    finally:
        counters["leet"]["decay_attn_rewrites"] = before
    return report
