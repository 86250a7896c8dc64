"""Builds leet_compile._C, the operator library (schema + CPU kernels).

The library has no Python dependency (it is loaded with torch.ops.load_library),
so a C++ AOTInductor runner can load the same file. With a CUDA-enabled torch and
nvcc, the CUDA kernels (csrc/cuda) are compiled into the same library.
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}


def cuda_skip_reason():
    """Why the CUDA kernels are left out of this build, or None to build them."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc not found (set CUDA_HOME)"
    return None


skip_reason = cuda_skip_reason()
if skip_reason is None:
    Extension = CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    extra_compile_args["nvcc"] = ["-O3"]
else:
    Extension = CppExtension
    print(f"leet_compile: building without the CUDA kernels (csrc/cuda): {skip_reason}")

setup(
    ext_modules=[
        Extension(
            "leet_compile._C",
            sources,
            extra_compile_args=extra_compile_args,
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
