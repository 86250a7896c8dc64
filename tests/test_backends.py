"""The backend seam (csrc/backends.cpp): one table of backends, each row an implementation
registered by the file that has it, one generic dispatcher; and the rules Python reads
from C++ instead of keeping copies (issue 11).
"""
import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import leet_compile
from leet_compile import decay_attn
from leet_compile.ops import _torch_private as private
from leet_compile.ops import decay_attn as op_module
from reference import decay_attn_reference, make_inputs, rel_err

TABLES = torch.ops.leet._decay_attn_tables()
METHODS, BACKENDS, MISSING = (tuple(x) for x in TABLES)
PLAN = torch.ops.leet._decay_attn_plan


def test_python_lists_are_the_tables():
    """METHODS and BACKENDS are read from the C++ tables, and the messages list them."""
    assert leet_compile.METHODS == METHODS and leet_compile.BACKENDS == BACKENDS
    q = torch.empty(1, 1, 2, 2)
    with pytest.raises(ValueError) as err:
        decay_attn(q, q, q, backend="?")
    assert str(err.value).endswith("expected one of " + ", ".join(BACKENDS))
    with pytest.raises(ValueError) as err:
        decay_attn(q, q, q, method="?")
    assert str(err.value).endswith("expected one of " + ", ".join(METHODS))


def test_every_row_has_an_implementation_or_says_why():
    """Each backend row is implemented in this build, or the contract names what is missing;
    on fake CUDA tensors (no GPU needed) a call with that backend raises exactly that."""
    assert MISSING[BACKENDS.index("aten")] == "" and MISSING[BACKENDS.index("cpu")] == ""
    assert (MISSING[BACKENDS.index("cuda")] == "") == private.has_kernel("leet::_decay_attn_cuda", "CUDA")
    assert (MISSING[BACKENDS.index("triton")] == "") == private.has_kernel("leet::_decay_attn_triton", "CUDA")
    for backend, why in zip(BACKENDS, MISSING):
        if not why:
            continue
        assert why.startswith(f"decay_attn: backend '{backend}' needs ") and "use backend=" in why
        with FakeTensorMode():
            q = torch.empty(1, 2, 8, 4, device="cuda")
            with pytest.raises(ValueError) as err:
                decay_attn(q, q, q, backend=backend)
        assert str(err.value) == why


@pytest.mark.parametrize("backend", [b for b, why in zip(BACKENDS, MISSING) if not why])
def test_every_cpu_row_runs(backend):
    """Every implemented row that runs on CPU tensors gives the reference's numbers, for
    every method it takes (the others are the contract's errors, tested below)."""
    q, k, v, a, s0 = make_inputs(B=1, H=2, T=37, K=8, V=6, decay="position", state=True, seed=3)
    ref = decay_attn_reference(q, k, v, a, 0.5, s0)
    ran = 0
    for method in METHODS:
        try:
            op_module.check_inputs(q, k, v, a, s0, method, backend)
        except ValueError:
            continue
        o, sf = decay_attn(q, k, v, a, scale=0.5, initial_state=s0, output_final_state=True, method=method,
                           backend=backend)
        assert rel_err(o, ref[0]) < 1e-5 and rel_err(sf, ref[1]) < 1e-5, method
        ran += 1
    assert ran > 0 or backend in ("triton", "cuda")


def test_auto_is_the_tables_policy():
    """backend="auto": the highest-ranked row that runs on the device, takes the method,
    dtype and head dim, and is present; empty problems go to aten."""
    q = torch.empty(1, 2, 40, 8)
    assert PLAN(q, q, q, "auto", "auto", "cpu", []) == ("cpu", "auto")
    assert PLAN(q, q, q, "chunked", "auto", "cpu", []) == ("cpu", "chunked")
    assert PLAN(q, q, q, "fleet", "auto", "cpu", []) == ("aten", "fleet")
    assert PLAN(q, q, q, "auto", "auto", "cpu", ["cpu"]) == ("aten", "auto")  # a row the caller rules out
    assert PLAN(q, q, q, "auto", "auto", "meta", []) == ("aten", "auto")  # no row of its own
    assert PLAN(q, q, q, "auto", "auto", "cuda", []) == ("triton", "chunked")
    assert PLAN(q[:, :, :16], q[:, :, :16], q[:, :, :16], "auto", "auto", "cuda", []) == ("triton", "recurrent")
    empty = torch.empty(1, 0, 40, 8)
    for backend in ("auto", "cpu", "triton"):
        assert PLAN(empty, empty, empty, "auto", backend, "cuda", [])[0] == "aten"
    with pytest.raises(ValueError, match="backend 'triton' needs the triton package"):
        PLAN(q, q, q, "auto", "triton", "cuda", ["triton"])


def _cases():
    """Every (method, backend) pair on CPU tensors, float32 and float64."""
    for method, backend, dtype in itertools.product(METHODS, BACKENDS, (torch.float32, torch.float64)):
        yield method, backend, dtype


def _outcome(f):
    try:
        f()
    except (ValueError, TypeError) as e:
        return e
    return None


@pytest.mark.parametrize("method,backend,dtype", list(_cases()))
def test_eager_fake_and_compiled_agree_on_every_combination(method, backend, dtype):
    """Eager, fake (FakeTensorMode) and torch.compile(fullgraph=True) accept the same
    (method, backend) combinations and raise the same message for the rest."""
    q, k, v, a, _ = make_inputs(B=1, H=2, T=9, K=4, V=3, decay="head", dtype=dtype, seed=4)

    def call(*t):
        return decay_attn(*t, method=method, backend=backend)

    eager = _outcome(lambda: call(q, k, v, a))
    with FakeTensorMode() as mode:
        fake = _outcome(lambda: call(*(mode.from_tensor(t) for t in (q, k, v, a))))
    assert type(fake) is type(eager) and str(fake) == str(eager)
    if eager is None:
        return
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="eager", fullgraph=True)
    with pytest.raises(Exception) as traced:
        compiled(q, k, v, a)
    assert repr(eager) in str(traced.value)


def test_python_copies_of_cpp_rules():
    """The one Python copy of each C++ rule (used only where dynamo traces the caller or K
    is symbolic, ops/decay_attn.py) agrees with the C++ (csrc/contract.cpp) everywhere."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for dq, dk, dv in itertools.product(dtypes, repeat=3):
        q, k, v = torch.empty(0, dtype=dq), torch.empty(0, dtype=dk), torch.empty(0, dtype=dv)
        assert op_module._compute_dtype_copy(q, k, v) == op_module.compute_dtype(q, k, v), (dq, dk, dv)
    for K, scale in itertools.product(range(0, 300), (None, 0.3, 2.0)):
        assert op_module._resolve_scale_copy(scale, K) == op_module.resolve_scale(scale, K), (K, scale)


def test_symbolic_head_dim_compiles_with_gradients(monkeypatch):
    """A dynamic-shape compile with AOTAutograd (symbolic K in the autograd's scale) gives
    the reference's output and gradients for two head dims."""
    seen = []
    copy = op_module._resolve_scale_copy
    monkeypatch.setattr(op_module, "_resolve_scale_copy", lambda scale, K: (seen.append(K), copy(scale, K))[1])
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, a: decay_attn(q, k, v, a), backend="aot_eager", dynamic=True, fullgraph=True)
    for K in (5, 9):
        q, k, v, a, _ = make_inputs(B=1, H=2, T=11, K=K, V=3, decay="head", seed=K)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        o = f(*leaves, a)
        ref = [t.clone().double().requires_grad_(True) for t in (q, k, v)]
        ro = decay_attn(*ref, a.double(), method="recurrent", backend="aten")
        assert rel_err(o, ro) < 1e-5
        go = torch.randn_like(o)
        grads = torch.autograd.grad((o * go).sum(), leaves)
        ref_grads = torch.autograd.grad((ro * go.double()).sum(), ref)
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < 1e-4
    assert any(isinstance(K, torch.SymInt) for K in seen)  # the copy did the symbolic case


def test_a_backend_is_a_row_and_a_registration():
    """Adding a backend touches the table and its own file only: every row but "auto" is
    registered (RegisterBackend) by exactly one file, and no C++ file outside the table
    branches on a backend's name."""
    import pathlib
    import re

    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    sources = {p: p.read_text() for p in csrc.rglob("*.cpp")}
    registered = [m for text in sources.values() for m in re.findall(r'RegisterBackend \w+\("(\w+)"', text)]
    assert sorted(registered) == sorted(b for b in BACKENDS if b != "auto")
    branching = [p.name for p, text in sources.items()
                 if p.name != "backends.cpp" and re.search(r'backend\s*[!=]=\s*"', text)]
    assert not branching, branching
