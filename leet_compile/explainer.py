"""``leet_compile.explain``: what the "leet" backend would rewrite in a model, and why
it leaves the other attention-like sites alone.

explain must leave the user's torch.compile state as it found it.  Dynamo keeps its
compiled code per *code object* (cache entries in the code's extra state, at most
``recompile_limit`` = 8 per code) and its automatic-dynamic shape history per code
location (``torch._dynamo.pgo``).  Compiling ``model`` itself under a new backend
on every explain call would add an entry to ``forward``'s code each time: after 8
calls the frame falls back to eager, so explain returns an empty report and a later
``torch.compile(model, backend="leet")`` silently runs with 0 rewrites.

So explain compiles a fresh entry function, generated per call with the model's
own parameter names (graph inputs keep the names they have under
``torch.compile(model)``), that calls the model; dynamo inlines the model into that
frame, and the cache entry lives on the fresh code object, which is freed with the
function.  Only a graph break makes dynamo compile one of the user's frames on its
own; for that case :class:`_CompileStateGuard` puts the state back (see there).
"""
import contextlib
import copy
import inspect
import logging

import torch

__all__ = ["explain"]

log = logging.getLogger(__name__)


def explain(model, *example_inputs, dynamic=None, **example_kwargs):
    """Traces ``model(*example_inputs, **example_kwargs)`` as ``torch.compile(model,
    backend="leet")`` would and returns the pass's report (no Inductor compile; the
    model runs once, as written).

    The report (:class:`leet_compile.passes.RewriteReport`) lists each rewritten site
    with its source line and derived decay (``report.rewrites``) and each near miss
    with the reason it was left alone and a hint (``report.near_misses``), naming
    tensors as the model does (``blocks.0.retention.gamma``); ``print(report)`` gives
    a readable summary.  Counters (``counters["leet"]``, dynamo's) and the compile
    caches are left as they were, so explain can be called any number of times
    before or after ``torch.compile``; only internal errors of the pass are counted.
    """
    from leet_compile.backend import rewrite
    from leet_compile.passes.report import RewriteReport

    model = _CompileStateGuard.uncompiled(model)
    report = RewriteReport()
    graphs = []  # emptied after the run: a cache entry explain must leave holds nothing

    def capture(gm, inputs):
        _, r = rewrite(gm, inputs)
        report.extend(r)
        k = len(graphs)
        graphs.append(gm)
        return lambda *args: graphs[k](*args)  # the graph as captured: computes what eager does

    entry = _entry_function(model)
    with _kept_counters(), _CompileStateGuard() as state:
        compiled = state.compile(entry, capture, dynamic)
        try:
            compiled(model, *example_inputs, **example_kwargs)
        finally:
            graphs[:] = [None] * len(graphs)
    return report


def _entry_function(model):
    """A new function ``f(self, <model's parameters>)`` returning ``self(<them>)``,
    compiled from source so each call has its own code object."""
    target = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None
    src = _entry_source(sig) if sig is not None else None
    if src is None:
        src, defaults = "def _leet_explain(self, *args, **kwargs):\n    return self(*args, **kwargs)\n", {}
    else:
        src, defaults = src
    namespace = {"__leet_d": defaults, "__name__": __name__}
    exec(compile(src, "<leet_compile.explain>", "exec"), namespace)
    return namespace["_leet_explain"]


def _entry_source(sig):
    P = inspect.Parameter
    head, call, defaults = ["self"], [], {}
    star = False
    params = list(sig.parameters.values())
    for k, p in enumerate(params):
        n = p.name
        if not n.isidentifier() or n in ("self", "__leet_d"):
            return None
        d = ""
        if p.default is not P.empty:
            defaults[n] = p.default
            d = f"=__leet_d[{n!r}]"
        if p.kind is P.VAR_POSITIONAL:
            head.append("*" + n)
            call.append("*" + n)
            star = True
        elif p.kind is P.VAR_KEYWORD:
            head.append("**" + n)
            call.append("**" + n)
        elif p.kind is P.KEYWORD_ONLY:
            if not star:
                head.append("*")
                star = True
            head.append(n + d)
            call.append(f"{n}={n}")
        else:
            head.append(n + d)
            call.append(n)
        if p.kind is P.POSITIONAL_ONLY and (k + 1 == len(params) or params[k + 1].kind is not P.POSITIONAL_ONLY):
            head.append("/")
    src = f"def _leet_explain({', '.join(head)}):\n    return self({', '.join(call)})\n"
    return src, defaults


@contextlib.contextmanager
def _kept_counters():
    """Restores dynamo's counters (the leet rewrite counts included) after explain,
    keeping only the internal errors it found (the test suite fails on those)."""
    from torch._dynamo.utils import counters

    saved = {k: dict(v) for k, v in counters.items()}
    errors = counters["leet"]["internal_errors"]
    try:
        yield
    finally:
        new_errors = counters["leet"]["internal_errors"] - errors
        for k in list(counters):
            counters[k].clear()
            counters[k].update(saved.get(k, {}))
        if new_errors:
            counters["leet"]["internal_errors"] += new_errors


class _CompileStateGuard:
    """Puts back the dynamo state that explain's compile touches beyond its own
    fresh entry code.  All of leet_compile's use of torch-private dynamo API is
    here (names as of torch 2.13; each use degrades to doing nothing if absent).

    Why it is safe:

    * ``isolate_recompiles=True`` (torch >= 2.13) gives explain's compile its own
      cache bucket on every code object it compiles: the user's lookups never see
      those entries and they do not count against the user's ``recompile_limit``.
    * A user code object that dynamo compiled during explain (a graph break inside
      the model) and that had *no* cache entry before explain holds only explain's
      entries, so ``reset_code`` on it restores exactly the state it had: no
      compiled code.  A code object the user had already compiled keeps its entries;
      explain's own stay in explain's isolated bucket (logged at DEBUG).
    * The automatic-dynamic shape history (``torch._dynamo.pgo``) is restored to
      its value before explain, so explain's example shapes do not make the user's
      next compile dynamic, and neither do those of an earlier explain call.
    * The backend explain registered in ``eval_frame.cached_backends`` (kept there
      only so that ``torch._dynamo.reset`` can reset it) is dropped, so repeated
      calls do not accumulate backends.
    """

    def __init__(self):
        self.region = -1  # explain's isolate_recompiles region, once compiled

    def compile(self, fn, backend, dynamic):
        """torch.compile in an isolated recompile region where torch has them."""
        kwargs = {}
        try:
            if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
                kwargs["isolate_recompiles"] = True
        except (TypeError, ValueError):
            pass
        compiled = torch.compile(fn, backend=backend, dynamic=dynamic, **kwargs)
        self.region = getattr(compiled, "_isolate_recompiles_id", -1)  # private
        return compiled

    @staticmethod
    def uncompiled(model):
        """The original of a ``torch.compile``d module or function."""
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # private
            return model._orig_mod
        return getattr(model, "_torchdynamo_orig_callable", model)

    # -- private dynamo API
    @staticmethod
    def _codes():
        from torch._dynamo import convert_frame

        out = []
        for tracker in (convert_frame.input_codes, convert_frame.output_codes):
            for ref in tracker.seen:
                code = ref()
                if code is not None:
                    out.append(code)
        return out

    @staticmethod
    def _count(code):
        ef = torch._C._dynamo.eval_frame
        if hasattr(ef, "_get_total_cache_entry_count"):
            return ef._get_total_cache_entry_count(code)
        return len(ef._debug_get_cache_entry_list(code))

    def _ours(self, code, before):
        ef = torch._C._dynamo.eval_frame
        if self.region >= 0 and hasattr(ef, "_get_cache_entries_for_region"):
            return len(ef._get_cache_entries_for_region(code, self.region))
        return self._count(code) - before

    @staticmethod
    def _pgo_state():
        try:
            from torch._dynamo import pgo

            return pgo, pgo._CODE_STATE
        except (ImportError, AttributeError):
            return None, None

    def __enter__(self):
        from torch._dynamo import eval_frame

        try:
            self._before = {id(c): (c, self._count(c)) for c in self._codes()}
            self._backends = set(getattr(eval_frame, "cached_backends", {}))
            pgo, state = self._pgo_state()
            self._pgo = copy.deepcopy(state) if state is not None else None
        except Exception as e:  # a torch without these internals: nothing to restore
            log.debug("explain: cannot snapshot dynamo state (%s)", e)
            self._before = None
        return self

    def __exit__(self, *exc):
        if self._before is None:
            return False
        try:
            self._restore()
        except Exception as e:
            log.warning("leet_compile.explain could not restore dynamo's compile state: %s", e)
        return False

    def _restore(self):
        from torch._dynamo import eval_frame

        ef = torch._C._dynamo.eval_frame
        for code in self._codes():
            _, before = self._before.get(id(code), (None, 0))
            ours = self._ours(code, before)
            if ours <= 0:
                continue
            precompiled = hasattr(ef, "_debug_get_precompile_entries") and ef._debug_get_precompile_entries(code)
            if before == 0 and not precompiled:
                ef.reset_code(code)
            else:
                log.debug("explain left %d cache entries (in its own region) on %s, "
                          "which was compiled before", ours, code.co_name)
        backends = getattr(eval_frame, "cached_backends", None)
        if backends is not None:
            for key in set(backends) - self._backends:
                backends.pop(key, None)
        pgo, state = self._pgo_state()
        if pgo is not None:
            if self._pgo is None:
                pgo._CODE_STATE = None
                pgo._INIT_CODE_STATE = None
            elif state is not None:
                state.clear()
                state.update(self._pgo)
