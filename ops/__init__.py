"""leet_compile.ops: the operator library and its Python registrations.

Importing this package loads the compiled library (which defines the schemas of
``torch.ops.leet.*`` and their CPU kernels) and registers the fake kernels,
autograd and vmap rules. Nothing else happens at import time.
"""
from ._library import library_path, load_library

load_library()

from . import decay_attn as _decay_attn  # noqa: E402  (registrations)
from . import step as _step  # noqa: E402,F401  (decoding-step registrations)
from . import gpu as _gpu  # noqa: E402,F401  (CUDA kernel: Triton / CUDA / ATen dispatch)
from . import cuda as _cuda  # noqa: E402,F401  (fake kernel of _decay_attn_cuda)

METHODS = _decay_attn.METHODS
BACKENDS = _decay_attn.BACKENDS

__all__ = ["BACKENDS", "METHODS", "library_path", "load_library"]
