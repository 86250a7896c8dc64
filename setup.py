"""Builds leet_compile._C, the operator library (schema + CPU kernels).

The library has no Python dependency (it is loaded with torch.ops.load_library),
so a C++ AOTInductor runner can load the same file.
"""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))

setup(
    ext_modules=[
        CppExtension(
            "leet_compile._C",
            sources,
            extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
