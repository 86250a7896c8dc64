"""The GPU side of ``torch.ops.leet.decay_attn`` that needs Python: the Triton kernels.

decay_attn's kernels are C++ (the one dispatcher of csrc/backends.cpp), so that a
process without Python finds them; on CUDA tensors they check the arguments
(csrc/contract.cpp), take the backend table's plan and call the row's implementation:
the ATen methods, the C++ CUDA kernels (``leet::_decay_attn_cuda``) or the Triton
kernels (``leet::_decay_attn_triton``, through csrc/triton_backend.cpp).
This module adds:

* the CUDA kernel of ``leet::_decay_attn_triton``: ops/triton_kernels.py, registered
  when triton is installed (found, not imported: triton is imported on first use);
* :func:`select`, the plan for Python callers (a binding of the C++ one);
* a FunctionalTensorMode rule, the mechanism of ``torch.library.triton_op``: when
  AOTAutograd (torch.compile, AOTInductor) functionalizes a call that takes the
  Triton path, the op is replaced by its ``wrap_triton`` kernel launches, so Inductor
  sees the kernels (no opaque call, no graph break, self-contained AOTI packages).
"""
import functools
import importlib.util

import torch

from . import _torch_private as private
from .decay_attn import check_inputs, resolve_scale

_OP = "leet::decay_attn"
_CUDA_OP = "leet::_decay_attn_cuda"
_TRITON_OP = "leet::_decay_attn_triton"


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

    private.list_triton_kernels(_OP, tk.KERNELS)
    return tk


def has_cuda_kernels() -> bool:
    """Whether this build registered the C++ CUDA kernels (torch.ops.leet._decay_attn_cuda)."""
    return private.has_kernel(_CUDA_OP, "CUDA")


def select(q, k, v, method, backend):
    """The implementation for a call on GPU tensors: (backend row, method), e.g.
    ("triton", "chunked").

    The C++ plan (plan_call in csrc/backends.cpp, what decay_attn's kernels use) for
    CUDA, for a call the contract accepted; triton counts as absent unless it imports.
    It raises only for backend='triton' without triton.
    """
    absent = [] if triton_available() else ["triton"]
    return tuple(torch.ops.leet._decay_attn_plan(q, k, v, method, backend, "cuda", absent))


def decay_attn_gpu(q, k, v, log_decay=None, scale=None, initial_state=None, output_final_state=False,
                   method="auto", backend="auto", traced=False):
    """What decay_attn's kernel (csrc/backends.cpp) does on CUDA tensors, in Python: for the
    tracing rule below, and callable on CPU tensors under TRITON_INTERPRET=1 for tests.
    `traced` launches Triton through wrap_triton."""
    if q.device.type == "cuda":
        check_inputs(q, k, v, log_decay, initial_state, method, backend)
    else:  # interpreter tests: every rule but the device ones (checked on meta views)
        meta = [None if t is None else t.to("meta") for t in (q, k, v, log_decay, initial_state)]
        check_inputs(*meta, method, backend)
    scale = resolve_scale(scale, q.shape[-1])
    impl, m = select(q, k, v, method, backend)
    if impl == "aten":
        return torch.ops.leet.decay_attn.default(q, k, v, log_decay, scale, initial_state, output_final_state, m, "aten")
    if impl == "cuda":
        return torch.ops.leet._decay_attn_cuda.default(
            q, k, v, log_decay, scale, initial_state, output_final_state, m
        )
    tk = triton_kernels()
    if traced or q.device.type != "cuda":
        return tk.decay_attn_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, m, traced)
    with torch.cuda.device(q.device):  # triton launches on the current device
        return tk.decay_attn_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, m, False)


def _triton_kernel(q, k, v, log_decay, scale, initial_state, output_final_state, method):
    """CUDA kernel of leet::_decay_attn_triton (called by decay_attn's C++ CUDA kernel)."""
    with torch.cuda.device(q.device):  # triton launches on the current device
        return triton_kernels().decay_attn_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, method)


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


def _functional_rule(mode, func, types, args, kwargs):
    """Under FunctionalTensorMode, replaces a call that takes the Triton path by its
    kernel launches (torch.library.triton_op does the same for Python-defined ops);
    "cuda" becomes the C++ op _decay_attn_cuda; everything else stays as it is."""
    known = private.plain_tensor_types()
    unrecognized = [t for t in types if not issubclass(t, known[1]) and t not in known]
    call = _bind(func, args, kwargs)
    q = call[0]
    if unrecognized or private.triton_decomposition_disabled() or q.device.type != "cuda":
        return mode.__torch_dispatch__(func, types, args, kwargs)
    q, k, v, log_decay, scale, initial_state, output_final_state, method, backend = call
    with mode:  # the check ops read metadata; under the mode they see through FunctionalTensor
        check_inputs(q, k, v, log_decay, initial_state, method, backend)
        impl, m = select(q, k, v, method, backend)
    scale = resolve_scale(scale, q.shape[-1])
    if impl == "triton":
        with mode:
            return triton_kernels().decay_attn_fwd(
                q, k, v, log_decay, scale, initial_state, output_final_state, m, traced=True
            )
    if impl == "cuda" and private.has_fake_impl(_CUDA_OP):
        with mode:
            return torch.ops.leet._decay_attn_cuda.default(
                q, k, v, log_decay, scale, initial_state, output_final_state, m
            )
    return mode.__torch_dispatch__(func, types, args, kwargs)


if importlib.util.find_spec("triton") is not None:  # a path lookup; triton is imported on first use
    torch.library.register_kernel(_TRITON_OP, "cuda", _triton_kernel)
torch.library.register_torch_dispatch(_OP, private.functional_tensor_mode(), _functional_rule)
