"""Every torch-private API the operator library uses, in one place.

Private APIs change between torch releases without notice; keeping them here means one
module to read when torch is upgraded, and tests/test_op_edges.py has one test per
function below, so a break shows up as a named failure instead of a wrong answer
somewhere else. Nothing here runs at import time (the imports are inside the functions).
"""
def below_autograd():
    """A context that dispatches below the Autograd keys (an autograd.Function's forward
    calling the op whose autograd it implements)."""
    import torch

    return torch._C._AutoDispatchBelowAutograd()


def functorch_transforms_active() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, jvp) is active."""
    import torch

    return torch._C._are_functorch_transforms_active()


def forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad dual level is open (dual tensors may flow)."""
    import torch.autograd.forward_ad as forward_ad

    return forward_ad._current_level >= 0


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether the dispatcher has a kernel of `qualname` ("leet::op") for `dispatch_key`."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)


def has_fake_impl(qualname: str) -> bool:
    """Whether a Python fake kernel is registered for `qualname`."""
    import torch._library.simple_registry as registry

    try:
        return registry.singleton.find(qualname).fake_impl.kernel is not None
    except AttributeError:
        return False


def functional_tensor_mode():
    """torch's FunctionalTensorMode class (what AOTAutograd functionalizes under)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    return FunctionalTensorMode


def plain_tensor_types() -> tuple:
    """The tensor types a FunctionalTensorMode rule may handle itself: Tensor, FakeTensor
    and FunctionalTensor (other subclasses get their own turn first)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (torch.Tensor, FakeTensor, FunctionalTensor)


def triton_decomposition_disabled() -> bool:
    """Whether torch.export asked to keep triton-backed custom ops whole (serializable
    programs); AOTInductor decomposes them later."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def list_triton_kernels(qualname: str, kernels) -> None:
    """Lists `kernels` under the op `qualname` where torch.library.triton_op would, so that
    AOTAutograd's cache key covers their source. (torch.library.triton_op itself defines a
    new Python op and imports triton when it is defined; our op's schema lives in C++ and
    triton is imported only on first use, so we fill the same registry.)"""
    import torch._library.triton as triton_library

    registry = getattr(triton_library, "triton_ops_to_kernels", None)
    if isinstance(registry, dict):
        registry.setdefault(qualname, list(kernels))

