"""CUDA behaviour of ``torch.ops.leet.decay_attn``, registered from Python.

The schema lives in C++ (csrc/schema.cpp); this module adds, for CUDA tensors:

* a CUDA kernel that picks the implementation from ``backend``:
  ``"triton"`` (ops/triton_kernels.py: chunked, or recurrent for ``method="recurrent"``),
  ``"cuda"`` (``torch.ops.leet._decay_attn_cuda``, the C++ CUDA kernels of csrc/cuda),
  ``"aten"`` (the generic C++ methods, reached by redispatching to
  CompositeExplicitAutograd) and ``"auto"`` (Triton when importable, else ATen);
* a FunctionalTensorMode rule, the mechanism of ``torch.library.triton_op``: when
  AOTAutograd (torch.compile, AOTInductor) functionalizes a call that takes the
  Triton path, the op is replaced by its ``wrap_triton`` kernel launches, so Inductor
  sees the kernels (no opaque call, no graph break, self-contained AOTI packages).

Registration is cheap; triton is imported on the first call that needs it.
"""
import functools

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .decay_attn import check_inputs, compute_dtype

_OP = "leet::decay_attn"
_CUDA_OP = "leet::_decay_attn_cuda"
# method="auto" with backend auto/triton: token by token up to this length (decoding,
# short prompts), chunks beyond.
RECURRENT_MAX_T = 16
# What the GPU kernels implement (the "triton" / "cuda" rows of the backend table in
# csrc/contract.cpp; tests/test_op_edges.py checks that they agree).
_TRITON_METHODS = ("auto", "chunked", "recurrent")
CUDA_MAX_HEAD_DIM = 256


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once, on first use)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return True


@functools.cache
def triton_kernels():
    """The kernel module (imports triton). Also lists the kernels under the op's name
    where torch.library.triton_op would, so AOTAutograd's cache key covers their source."""
    from . import triton_kernels as tk

    registry = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if isinstance(registry, dict):
        registry.setdefault(_OP, list(tk.KERNELS))
    return tk


def has_cuda_kernels() -> bool:
    """Whether this build registered the C++ CUDA kernels (torch.ops.leet._decay_attn_cuda)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_CUDA_OP, "CUDA")


def auto_method(T):
    """The GPU kernels' method for method="auto": token by token up to RECURRENT_MAX_T
    (decoding, short prompts), chunks beyond. The one GPU policy (Triton and CUDA)."""
    return "recurrent" if T <= RECURRENT_MAX_T else "chunked"


def select(q, k, v, method, backend):
    """The implementation for a call on GPU tensors: ("triton" | "cuda" | "aten", method).

    The arguments are checked first, by the contract (csrc/contract.cpp: devices,
    methods, dtypes, head dims, kernels built); this is the policy. It raises only what
    the contract cannot know: backend='triton' without the triton package.
    """
    B, H, T, K = q.shape
    V = v.shape[3]
    float64 = compute_dtype(q, k, v) == torch.float64
    degenerate = B * H * K * V == 0  # nothing to launch; ATen handles empty shapes
    resolved = auto_method(T) if method == "auto" else method
    if backend == "aten":
        return "aten", method
    if backend == "cuda":
        return "cuda", resolved
    if backend == "triton":
        if not triton_available():
            raise ValueError(
                "decay_attn: backend 'triton' needs the triton package (`pip install triton`); "
                "use backend='aten' or 'auto'"
            )
        return ("aten", method) if degenerate else ("triton", resolved)
    # backend == "auto": Triton, else the C++ CUDA kernels, else ATen
    if method in _TRITON_METHODS and not degenerate:
        if triton_available() and not float64:
            return "triton", resolved
        if has_cuda_kernels() and K <= CUDA_MAX_HEAD_DIM:
            return "cuda", resolved
    return "aten", method


def _aten(q, k, v, log_decay, scale, initial_state, output_final_state, method):
    """The generic C++ methods (csrc/methods.cpp), below this CUDA kernel."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.leet.decay_attn.default.redispatch(
        keys, q, k, v, log_decay, scale, initial_state, output_final_state, method, "aten"
    )


def decay_attn_gpu(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False,
                   method="auto", backend="auto", traced=False):
    """decay_attn on GPU tensors (the CUDA kernel of the op; callable on CPU tensors
    under TRITON_INTERPRET=1 for tests). `traced` launches Triton through wrap_triton."""
    check_inputs(q, k, v, log_decay, initial_state, method, backend)
    impl, m = select(q, k, v, method, backend)
    if impl == "aten":
        return _aten(q, k, v, log_decay, scale, initial_state, output_final_state, m)
    if impl == "cuda":
        return torch.ops.leet._decay_attn_cuda.default(
            q, k, v, log_decay, scale, initial_state, output_final_state, m
        )
    tk = triton_kernels()
    if traced or q.device.type != "cuda":
        return tk.decay_attn_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, m, traced)
    with torch.cuda.device(q.device):  # triton launches on the current device
        return tk.decay_attn_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, m, False)


def _cuda_kernel(q, k, v, log_decay, scale, initial_state, output_final_state, method, backend):
    return decay_attn_gpu(q, k, v, log_decay, scale, initial_state, output_final_state, method, backend)


def _bind(func, args, kwargs):
    """All nine arguments, positionally (__torch_dispatch__ drops trailing defaults)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            out.append(args[i])
        elif arg.name in kwargs:
            out.append(kwargs[arg.name])
        else:
            out.append(arg.default_value)
    return out


def _decomposition_disabled() -> bool:
    """torch.export keeps triton ops whole (serializable programs); AOTInductor's own
    lowering later decomposes them. We follow the same rule."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def _has_fake(qualname) -> bool:
    try:
        return torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None
    except AttributeError:
        return False


def _functional_rule(mode, func, types, args, kwargs):
    """Under FunctionalTensorMode, replaces a call that takes the Triton path by its
    kernel launches (torch.library.triton_op does the same for Python-defined ops);
    "cuda" becomes the C++ op _decay_attn_cuda; everything else stays as it is."""
    import torch._subclasses

    known = (torch.Tensor, torch._subclasses.functional_tensor.FunctionalTensor)
    unrecognized = [t for t in types if not issubclass(t, torch._subclasses.FakeTensor) and t not in known]
    call = _bind(func, args, kwargs)
    q = call[0]
    if unrecognized or _decomposition_disabled() or q.device.type != "cuda":
        return mode.__torch_dispatch__(func, types, args, kwargs)
    q, k, v, log_decay, scale, initial_state, output_final_state, method, backend = call
    check_inputs(q, k, v, log_decay, initial_state, method, backend)
    impl, m = select(q, k, v, method, backend)
    if impl == "triton":
        with mode:
            return triton_kernels().decay_attn_fwd(
                q, k, v, log_decay, scale, initial_state, output_final_state, m, traced=True
            )
    if impl == "cuda" and _has_fake(_CUDA_OP):
        with mode:
            return torch.ops.leet._decay_attn_cuda.default(
                q, k, v, log_decay, scale, initial_state, output_final_state, m
            )
    return mode.__torch_dispatch__(func, types, args, kwargs)


torch.library.register_kernel(_OP, "cuda", _cuda_kernel)
torch.library.register_torch_dispatch(_OP, FunctionalTensorMode, _functional_rule)
