"""Deployment: torch.export with the decay-attention rewrite, and AOTInductor packages.

    ep = leet_compile.export(model, (x,), dynamic_shapes=({1: torch.export.Dim("T")},))
    path = torch._inductor.aoti_compile_and_package(ep)
    runner = leet_compile.load_package(path)      # or torch._inductor.aoti_load_package

See docs/deployment.md for the whole flow, including the C++ runner.
"""
import logging
import re

import torch
from torch.export import ExportedProgram

log = logging.getLogger(__name__)

__all__ = ["export", "load_package", "rewrite_exported_program"]

# Key of the rewrite report in the returned program's graph_module.meta.
REPORT_KEY = "leet_compile.rewrite_report"


def export(model, args, kwargs=None, *, dynamic_shapes=None, strict=False) -> ExportedProgram:
    """``torch.export.export`` followed by :func:`rewrite_exported_program`.

    Arguments are those of :func:`torch.export.export`. Naive masked decay attention
    ``((q @ k^T) * M) @ v`` that the pass proves to be a causal decay mask becomes
    ``torch.ops.leet.decay_attn``; everything else is left as exported. Declare the
    sequence dimension dynamic (``torch.export.Dim``) so that one program, and one
    AOTInductor package built from it, serves every length in the range.
    """
    ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return rewrite_exported_program(ep)


def rewrite_exported_program(ep: ExportedProgram) -> ExportedProgram:
    """Returns a copy of ``ep`` whose graph calls ``leet.decay_attn`` where the naive
    form was proven; ``ep`` itself is not modified.

    For users with their own ``torch.export`` flow: call it on the program from
    ``torch.export.export`` (before ``aoti_compile_and_package`` or ``torch.export.save``).
    The result is in the functional (inference) IR, as after
    ``ep.run_decompositions({})``: no op is decomposed, so ``matmul``, ``tril`` and
    friends reach the pass as the user wrote them; AOTInductor decomposes later.
    The pass's report (rewrites and near misses, with reasons) is stored in
    ``result.graph_module.meta["leet_compile.rewrite_report"]``.
    """
    from leet_compile.passes import rewrite_decay_attention  # the pass imports more; load it lazily

    # A new program (so the in-place pass leaves `ep` alone), functionalized, with an
    # empty decomposition table.
    ep = ep.run_decompositions({})
    gm = ep.graph_module
    report = rewrite_decay_attention(gm)
    gm.meta[REPORT_KEY] = report
    log.info("%s", report)
    # A new program around the rewritten graph: its verifier checks the graph (the
    # pass adds only call_function nodes with meta["val"], no new inputs).
    return ep._update(gm, ep.graph_signature)


_MISSING_OP = re.compile(r"Could not find schema for (\S+?)\.?$", re.MULTILINE)


def load_package(path, **kwargs):
    """``torch._inductor.aoti_load_package(path, **kwargs)`` with the leet operators loaded.

    A package that calls ``leet.decay_attn`` needs the operator library in the
    process that loads it (``import leet_compile`` loads it; so does
    ``torch.ops.load_library(leet_compile.library_path())``). If an operator is
    still missing, the error says which one and what to load.
    """
    import leet_compile.ops  # noqa: F401  (registers torch.ops.leet.*)

    try:
        return torch._inductor.aoti_load_package(str(path), **kwargs)
    except RuntimeError as e:
        match = _MISSING_OP.search(str(e))
        if match is None:
            raise
        raise RuntimeError(_missing_operator_message(match.group(1), path)) from e


def _missing_operator_message(op: str, path) -> str:
    if op.startswith("leet::"):
        hint = (
            "load the leet_compile operator library first: `import leet_compile`, or "
            "torch.ops.load_library(leet_compile.library_path()) (in C++: dlopen that path)"
        )
    else:
        hint = "load the library that defines it (torch.ops.load_library) before loading the package"
    return f"the AOTInductor package {path} calls the operator {op}, which is not registered; {hint}"
