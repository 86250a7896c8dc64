"""Locating and loading the compiled operator library (leet_compile/_C*.so)."""
import functools
import glob
import os

import torch


def library_path() -> str:
    """Path of the shared library that defines ``torch.ops.leet`` (schema + CPU kernels).

    A C++ program (an AOTInductor runner, say) loads this file to find the operators.
    """
    import leet_compile

    candidates = sorted(glob.glob(os.path.join(os.path.dirname(leet_compile.__file__), "_C*.so")))
    if not candidates:
        raise RuntimeError(
            "leet_compile: the compiled operator library leet_compile/_C*.so is missing; "
            "build the package with `pip install --no-build-isolation -e .` (or `make setup`)"
        )
    return candidates[0]


@functools.cache
def load_library() -> None:
    """Loads the operator library once (registers the C++ schemas and kernels)."""
    torch.ops.load_library(library_path())
