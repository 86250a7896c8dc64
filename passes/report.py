"""What the decay-attention pass did, in the model author's words.

One place for everything the pass says to people: the :class:`Site` and
:class:`RewriteReport` records, the user's names for graph inputs
(:func:`user_name`), the user's source line of a node (:func:`source_of`), hints
attached to near-miss reasons (:func:`hint_for`), and the logging and counting of
every near miss and internal error (:meth:`RewriteReport.near_miss`,
:meth:`RewriteReport.internal_error`).

Logging goes to the ``leet_compile.passes.report`` logger (a child of
``leet_compile``): enable it like any torch module log, with
``TORCH_LOGS="+leet_compile"`` or
``torch._logging.set_logs(modules={"leet_compile": logging.DEBUG})``.  A TORCH_LOGS
*artifact* is not used: registering one needs torch's private log registry, and
TORCH_LOGS is parsed when torch is imported, before this package could register
its name, so ``TORCH_LOGS=<artifact>`` would be rejected.  Near misses are logged
at DEBUG, internal errors at WARNING (with the traceback at DEBUG).

Counters (``torch._dynamo.utils.counters["leet"]``): ``decay_attn_rewrites``,
``near_misses`` and ``internal_errors``.
"""
import dataclasses
import logging
import os
import re
import sys

import torch

__all__ = ["RewriteReport", "Site", "hint_for", "name_exported_inputs", "source_of", "user_name", "user_names"]

log = logging.getLogger(__name__)

# The key under which the backend's tracing (backend.trace_to_aten) stores the
# user's name of a graph input, computed from dynamo's source of the placeholder.
USER_NAME_META = "leet_user_name"


# ---------------------------------------------------------------- hints

# (keyword or tuple of keywords all in the reason, hint).  The first match wins; the
# reason strings come from the prover (one sentence, no trailing period).
_HINTS = [
    ("internal error",
     "this is a bug in leet_compile, not in your model: please report it with the "
     "warning logged above (the site was left as eager computes it)"),
    ("softmax",
     "softmax attention is not linear attention; decay_attn only replaces "
     "(q @ k^T * mask) @ v without a softmax"),
    (("input", "data-dependent"),
     "the pass cannot see the values of a tensor the model holds or receives (a "
     "registered [T, T] buffer, a graph input), so it cannot prove a mask read from it "
     "is causal; build the mask in forward from positions, e.g. i = torch.arange(T)[:, None]; "
     "j = torch.arange(T)[None, :]; D = (gamma ** (i - j)).masked_fill(j > i, 0)"),
    ("input of this graph",
     "a mask that enters the graph as an input (computed in Python, or before a graph "
     "break) cannot be proven causal; build it in forward from positions, e.g. "
     "i = torch.arange(T)[:, None]; j = torch.arange(T)[None, :]; "
     "D = (gamma ** (i - j)).masked_fill(j > i, 0)"),
    ("eager rounds",
     "eager computes this mask in a lower precision than the result (16-bit positions "
     "or decays, or positions beyond the dtype's exact integers); compute the mask in "
     "float32 from int64 positions"),
    ("data-dependent",
     "a mask read from a tensor (a graph input, a registered [T, T] buffer, or the "
     "result of an op the pass has no rule for) cannot be proven causal; build it in "
     "forward from positions, e.g. i = torch.arange(T)[:, None]; j = torch.arange(T)[None, :]; "
     "D = (gamma ** (i - j)).masked_fill(j > i, 0)"),
    ("constant tensor",
     "a precomputed [T, T] mask stored on the module cannot be proven causal; build it "
     "in forward from torch.arange(T)"),
    ("added",
     "the mask must multiply the scores ((q @ k^T) * D); an additive mask (-inf above "
     "the diagonal) is the softmax form"),
    ("above the diagonal",
     "a causal mask is zero where j > i (key after query): use tril, masked_fill(j > i, 0) "
     "or where(i >= j, ..., 0)"),
    ("diagonal offset",
     "only the plain causal mask (diagonal=0, j <= i) is decay attention; tril(diagonal=k) "
     "with k != 0 shifts it"),
    ("unknown sign",
     "the pass could not show the decay is finite where the mask is zero; write the "
     "decay as gamma ** (i - j) or exp(log_gamma * (i - j)) with a masked_fill or "
     "where, or clamp the exponent"),
    ("overflow",
     "the decay can overflow or underflow in this dtype at the proven positions; keep "
     "the exponent i - j non-negative (mask it before exp/pow) or compute in float32"),
    ("wrap",
     "integer positions may wrap; use int64 positions from torch.arange(T)"),
    ("not exact",
     "positions in a 16-bit float are not exact beyond 256 (bf16) or 2048 (fp16); "
     "build positions and the mask in float32 or int64 and cast the final mask"),
    ("in-place", "the mask is modified in place after it is built; build it without "
     "in-place writes"),
    ("mutated", "the mask is modified in place after it is built; build it without "
     "in-place writes"),
    ("detached", "the scores are detached (.detach() / no_grad inside the graph)"),
    ("two different scores",
     "the mask itself contains a q @ k^T-like product; build the mask from positions only"),
    ("no q @ k^T",
     "the weights multiplying v do not come from a q @ k^T contraction"),
    ("cumsum",
     "a per-position decay must be a segment sum: L = cumsum(log_a); "
     "D = exp(L[..., :, None] - L[..., None, :]) masked above the diagonal"),
    ("nan", "the mask computation can produce NaN where eager keeps a finite value"),
]


def hint_for(reason: str) -> str:
    """A short hint for a near-miss reason ('' when none helps)."""
    low = (reason or "").lower()
    for key, hint in _HINTS:
        if all(k in low for k in ((key,) if isinstance(key, str) else key)):
            return hint
    return ""


# ---------------------------------------------------------------- user names

_MODULE_DICTS = ("_modules", "_parameters", "_buffers")
_MANGLED_DICT = re.compile(r"_(?:modules|parameters|buffers)_")


def _source_steps(source):
    """[(kind, value)] from root to leaf of a dynamo Source chain (duck-typed, so
    no dynamo class is imported); None when the chain has an unknown link."""
    steps = []
    s = source
    for _ in range(64):
        if s is None:
            return None
        if hasattr(s, "local_name"):
            steps.append(("local", s.local_name))
            break
        if hasattr(s, "global_name"):
            steps.append(("global", s.global_name))
            break
        base = getattr(s, "base", None)
        if hasattr(s, "member"):
            steps.append(("attr", s.member))
        elif hasattr(s, "index"):
            idx = s.index
            if hasattr(idx, "base") and hasattr(idx, "index"):  # ConstDictKeySource
                idx = idx.index
            steps.append(("item", idx))
        elif base is None:
            return None
        s = base  # NNModuleSource and other wrappers pass through
    else:
        return None
    steps.reverse()
    return steps


def _render(steps):
    root_kind, root = steps[0]
    rest = steps[1:]
    out = []
    is_module_path = False
    k = 0
    while k < len(rest):
        kind, v = rest[k]
        if kind == "attr" and v in _MODULE_DICTS and k + 1 < len(rest) and rest[k + 1][0] == "item":
            out.append("." + str(rest[k + 1][1]))
            is_module_path = True
            k += 2
            continue
        out.append(f".{v}" if kind == "attr" else f"[{v!r}]")
        k += 1
    # the module being compiled (``self``) is implicit in a parameter's name
    if root_kind == "local" and (is_module_path or root == "self") and out:
        text = "".join(out)
        return text[1:] if text.startswith(".") else text
    return str(root) + "".join(out)


def _demangle(name: str) -> str:
    """Fallback: dynamo's placeholder name (``l_self_modules_blocks_modules_0_..._gamma_``)
    as a dotted name.  Ambiguous where a user name has underscores next to a module
    dict marker; the source-based path (:func:`user_name` of a node) is exact."""
    m = re.fullmatch(r"[lg]_(.*?)_?", name)
    if not m:
        return name
    body = m.group(1)
    parts = _MANGLED_DICT.split(body)
    if len(parts) > 1:
        return ".".join(parts[1:])  # parts[0] is the module's local (self)
    if body.startswith("self_"):
        return body[len("self_"):]
    return body


def user_name(node_or_name) -> str:
    """The name the model author wrote for a graph value.

    For a placeholder: the dotted module path of a parameter or buffer
    (``blocks.0.retention.gamma``) or the forward argument's name (``q``), from the
    source dynamo recorded for it (kept by the backend's tracing in
    ``node.meta["leet_user_name"]``, or dynamo's own ``node.meta["grapharg"]``);
    placeholder *names* are de-mangled only as a fallback.  ``get_attr`` nodes give
    their attribute path; other nodes their graph name.
    """
    if isinstance(node_or_name, str):
        return _demangle(node_or_name)
    n = node_or_name
    if n.op == "placeholder":
        name = n.meta.get(USER_NAME_META)
        if name:
            return name
        ga = n.meta.get("grapharg")
        source = getattr(ga, "source", None)
        if source is not None:
            name = source_name(source)
            if name:
                return name
        return _demangle(n.name)
    if n.op == "get_attr":
        return str(n.target)
    return n.name


def source_name(source) -> str:
    """The user's name for a dynamo Source (``L['self']._modules['b']._buffers['g']`` -> ``b.g``)."""
    try:
        steps = _source_steps(source)
        if steps:
            return _render(steps)
    except Exception:  # a Source layout this torch version does not have
        pass
    name = getattr(source, "name", "")
    name = name() if callable(name) else name
    return str(name or "")


def user_names(graph) -> dict:
    """{graph name: user name} for the placeholders of ``graph`` whose names differ."""
    if isinstance(graph, torch.fx.GraphModule):
        graph = graph.graph
    out = {}
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        u = user_name(n)
        if u and u != n.name:
            out[n.name] = u
    return out


_ATEN_OP = re.compile(r"\baten\.(\w+?)(?:\.(?:default|Tensor|Scalar|int|dim|self|out|\w+))?\b")


def name_exported_inputs(ep):
    """Records the user's names of a ``torch.export`` program's inputs (parameters and
    buffers by their module path, user inputs by argument name) in the placeholders'
    meta, so that reports on ``ep.graph_module`` read ``blocks.0.retention.gamma``
    rather than ``b_blocks_0_retention_gamma``.  Call before running the pass."""
    names = {}
    for spec in ep.graph_signature.input_specs:
        arg = getattr(spec.arg, "name", None)
        if arg:
            names[arg] = spec.target or arg
    for n in ep.graph_module.graph.nodes:
        if n.op == "placeholder" and n.name in names:
            n.meta[USER_NAME_META] = names[n.name]
    return ep


def humanize(text: str, names: dict) -> str:
    """``text`` with graph names replaced by the user's names (whole identifiers only)
    and ATen overloads by the op's name (``aten.softmax.int`` -> ``softmax``)."""
    if not text:
        return text
    text = _ATEN_OP.sub(lambda m: m.group(1), text)
    if not names:
        return text
    pat = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?!\w)")
    return pat.sub(lambda m: names[m.group(1)], text)


# ---------------------------------------------------------------- source lines

_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def _library_dirs():
    """Directories whose frames are library code, not the model author's."""
    dirs = []
    for mod in ("torch", "einops", "leet_compile", "leet_compile.ops", "leet_compile.passes"):
        m = sys.modules.get(mod)
        f = getattr(m, "__file__", None)
        if f:
            dirs.append(os.path.dirname(os.path.abspath(f)) + os.sep)
    return tuple(dirs)


def _is_library(path):
    if path.startswith("<leet_compile"):  # explain's generated entry function
        return True
    p = os.path.abspath(path)
    return p.startswith(_library_dirs()) or (os.sep + "einops" + os.sep) in p


def source_of(n) -> str:
    """'file:line: code' of the innermost frame of the node's stack trace that is the
    user's own code (frames inside torch, einops and leet_compile are skipped; the
    innermost frame is used when every frame is library code)."""
    st = (getattr(n, "meta", None) or {}).get("stack_trace") or ""
    lines = st.rstrip().splitlines()
    frames = []
    for k, ln in enumerate(lines):
        m = _FILE_LINE.search(ln)
        if not m:
            continue
        code = ""
        if k + 1 < len(lines) and not _FILE_LINE.search(lines[k + 1]):
            code = lines[k + 1].strip()
            if set(code) <= set("^~ "):
                code = ""
        frames.append((m.group(1), m.group(2), code))
    if not frames:
        return ""
    user = [f for f in frames if not _is_library(f[0])]
    fname, line, code = (user or frames)[-1]
    loc = f"{fname}:{line}"
    return f"{loc}: {code}" if code else loc


# ---------------------------------------------------------------- records


@dataclasses.dataclass
class Site:
    """One rewritten site or near miss.

    ``node`` is the graph name of the output contraction (for debugging), ``source``
    the user's line (:func:`source_of`), ``reason`` why it was left alone (names are
    the user's), ``hint`` what the author can do about it, ``decay`` / ``scale`` what
    a rewrite derived."""

    node: str
    source: str
    rewritten: bool
    reason: str = ""
    decay: str = ""
    scale: object = None
    hint: str = ""

    def __post_init__(self):
        if not self.rewritten and not self.hint:
            self.hint = hint_for(self.reason)

    def localize(self, names):
        """Replaces graph names in the reason and decay with the user's names."""
        self.reason = humanize(self.reason, names)
        self.decay = humanize(self.decay, names)
        return self

    def __str__(self):
        where = self.source or f"graph node {self.node}"
        if self.rewritten:
            return (f"rewritten into decay_attn at {where}\n"
                    f"    log_decay = {self.decay}; scale = {self.scale}")
        text = f"left alone at {where}\n    why: {_sentence(self.reason)}"
        if self.hint:
            text += f"\n    hint: {_sentence(self.hint)}"
        return text


def _sentence(s):
    s = (s or "").strip()
    if not s:
        return "no reason recorded."
    if re.match(r"[a-z]+ ", s):  # not an identifier or op name
        s = s[0].upper() + s[1:]
    return s if s[-1] in ".!?" else s + "."


def _as_site(site, rewritten=False):
    """A Site for ``site`` (a Site, or the fx node of the output contraction)."""
    if isinstance(site, Site):
        return site
    if isinstance(site, torch.fx.Node):
        return Site(site.name, source_of(site), rewritten)
    return Site(str(site), "", rewritten)


def _names_for(site):
    graph = getattr(site, "graph", None)
    return user_names(graph) if graph is not None else {}


@dataclasses.dataclass
class RewriteReport:
    """What the pass did: ``rewrites`` and ``near_misses`` (lists of :class:`Site`).

    The pass records every outcome through :meth:`rewritten`, :meth:`near_miss` and
    :meth:`internal_error`, which also log and count it, so that nothing is silent.
    """

    rewrites: list = dataclasses.field(default_factory=list)
    near_misses: list = dataclasses.field(default_factory=list)

    def __str__(self):
        n_int = sum(1 for s in self.near_misses if s.reason.startswith("internal error"))
        head = (f"leet decay-attention pass: {len(self.rewrites)} rewritten, "
                f"{len(self.near_misses)} left alone")
        if n_int:
            head += f" ({n_int} by an internal error)"
        lines = [head]
        lines += ["  " + str(s).replace("\n", "\n  ") for s in self.rewrites + self.near_misses]
        return "\n".join(lines)

    def extend(self, other):
        self.rewrites += other.rewrites
        self.near_misses += other.near_misses

    @property
    def first_reason(self) -> str:
        return self.near_misses[0].reason if self.near_misses else ""

    def localize(self, gm):
        """Puts the user's names (``blocks.0.retention.gamma``) for ``gm``'s inputs
        into every reason and decay.  Idempotent."""
        names = user_names(gm)
        for s in self.rewrites + self.near_misses:
            s.localize(names)
        return self

    # -- recording (called by the pass's entry loop)
    def rewritten(self, site, *, decay, scale) -> Site:
        """Records a rewrite at ``site`` (the output contraction node, or a Site);
        counts ``counters["leet"]["decay_attn_rewrites"]``."""
        from torch._dynamo.utils import counters

        names = _names_for(site)
        s = _as_site(site, rewritten=True)
        s.rewritten, s.decay, s.scale = True, str(decay), scale
        s.localize(names)
        self.rewrites.append(s)
        counters["leet"]["decay_attn_rewrites"] += 1
        log.debug("rewrote %s into decay_attn at %s: log_decay = %s, scale = %s",
                  s.node, s.source or "?", s.decay, s.scale)
        return s

    def near_miss(self, site, reason) -> Site:
        """Records an attention-like site left alone because ``reason`` (a sentence
        without the final period, or an ``Unproven``); logs it at DEBUG and counts
        ``counters["leet"]["near_misses"]``."""
        from torch._dynamo.utils import counters

        if isinstance(reason, BaseException):
            reason = str(reason.args[0]) if reason.args else type(reason).__name__
        names = _names_for(site)
        s = _as_site(site)
        s.rewritten, s.reason = False, str(reason)
        s.hint = hint_for(s.reason)
        s.localize(names)
        self.near_misses.append(s)
        counters["leet"]["near_misses"] += 1
        log.debug("left %s alone at %s: %s", s.node, s.source or "?", s.reason)
        return s

    def internal_error(self, site, exc) -> Site:
        """Records a bug in the analysis at ``site``: the site is left alone (a near
        miss whose reason starts with "internal error"), a WARNING is logged with the
        node and source line (traceback at DEBUG), and
        ``counters["leet"]["internal_errors"]`` is incremented (the test suite fails
        on any)."""
        from torch._dynamo.utils import counters

        names = _names_for(site)
        s = _as_site(site)
        s.rewritten = False
        s.reason = f"internal error: {type(exc).__name__}: {exc}"
        s.hint = hint_for(s.reason)
        s.localize(names)
        self.near_misses.append(s)
        counters["leet"]["internal_errors"] += 1
        log.warning("internal error in the decay-attention pass at %s (%s), left as it is: %s: %s",
                    s.source or "?", s.node, type(exc).__name__, exc, extra={"leet_internal_error": True})
        log.debug("traceback of the internal error at %s", s.node, exc_info=exc)
        return s
