"""Builds leet_compile._C, the operator library (schema + CPU kernels, and the CUDA
kernels of csrc/cuda when asked for or possible).

The library has no Python dependency (it is loaded with torch.ops.load_library), so a
C++ AOTInductor runner can load the same file. It is compiled against torch's C++ API,
including unstable parts (at::native::cpublas::brgemm), so the wheel's metadata pins
``torch==<the version it was built against>`` (the convention of torchao and other
compiled torch extensions): a wheel built against torch 2.13.0 refuses to install
beside torch 2.14.1 instead of failing to load.

Environment variables (all optional):

    LEET_BUILD_CUDA=auto|1|0   auto (default): the CUDA kernels when torch is a CUDA
                               build and nvcc is found; 1: require them (error otherwise);
                               0: never (a CPU-only library, also with a CUDA torch)
    TORCH_CUDA_ARCH_LIST       GPU architectures, e.g. "9.0" or "8.0;9.0"; default: the
                               visible GPUs', or "8.0;9.0" (sm_80, sm_90) when none is visible
    CUDA_HOME / CUDA_PATH      the CUDA toolkit; default: found from nvcc on PATH
                               (wrapper scripts and symlinks resolved) or /usr/local/cuda
    MAX_JOBS                   parallel compile jobs (ninja)

Which torch the build uses: with ``pip install --no-build-isolation .`` the torch
already installed (the recommended way for any torch other than the default); with
build isolation, ``torch==2.13.0`` (the tested default, see build_backend/), or
``LEET_BUILD_TORCH="torch==X.Y.Z"``.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def log(msg):
    print(f"leet_compile build: {msg}", flush=True)


def build_cuda_mode():
    mode = os.environ.get("LEET_BUILD_CUDA", "auto").strip().lower()
    aliases = {"1": "1", "on": "1", "yes": "1", "true": "1", "0": "0", "off": "0", "no": "0", "false": "0", "auto": "auto", "": "auto"}
    if mode not in aliases:
        sys.exit(f"leet_compile build: LEET_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    return aliases[mode]


def _is_toolkit(root):
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit's root, or None. torch.utils.cpp_extension takes dirname(dirname(nvcc))
    of the nvcc on PATH, which is wrong for wrapper scripts such as /usr/local/bin/nvcc;
    here a candidate counts only if it has bin/nvcc and include/cuda_runtime.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _is_toolkit(os.environ[var]) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, errors="ignore") as f:
                head = f.read(4096)
            candidates += [os.path.dirname(os.path.dirname(p)) for p in re.findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_plan(torch):
    """(build the CUDA kernels?, reason). Sets CUDA_HOME and TORCH_CUDA_ARCH_LIST in the
    environment before torch.utils.cpp_extension is imported (it reads both then)."""
    mode = build_cuda_mode()
    if mode == "0":
        return False, "LEET_BUILD_CUDA=0"
    reason = None
    cuda_home = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            reason = "no CUDA toolkit found (nvcc and include/cuda_runtime.h; set CUDA_HOME)"
        else:
            found = nvcc_version(cuda_home)
            if found and found.split(".")[0] != torch.version.cuda.split(".")[0]:
                reason = (f"nvcc {found} at {cuda_home} and torch's CUDA {torch.version.cuda} differ in the "
                          "major version (set CUDA_HOME to a matching toolkit)")
    if reason is not None:
        if mode == "1":
            sys.exit(f"leet_compile build: LEET_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        return False, reason
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if visible:
            caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
        else:  # cpp_extension would fail with IndexError looking for a visible GPU's arch
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return True, f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"


def torch_requirement(torch):
    """torch==<public version it is built against> (a +cpu/+cuXXX local label is left out, so
    that the CPU and CUDA wheels of that release both satisfy it)."""
    return "torch==" + torch.__version__.split("+")[0]


def extension_kwargs():
    try:
        import torch
    except ImportError:
        if any(cmd in sys.argv for cmd in ("sdist", "egg_info", "dist_info", "--version", "--name")):
            return {}  # metadata or an sdist: no compiler, no torch needed
        sys.exit("leet_compile build: torch must be installed to build the extension "
                 "(`pip install torch==2.13.0`, then `pip install --no-build-isolation .`)")
    with_cuda, why = cuda_plan(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    if with_cuda:
        extension = CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        extra_compile_args["nvcc"] = ["-O3"]
        log(f"torch {torch.__version__}: with the CUDA kernels ({why})")
    else:
        extension = CppExtension
        log(f"torch {torch.__version__}: without the CUDA kernels (csrc/cuda): {why}")
    log(f"{len(sources)} source files; the wheel will require {torch_requirement(torch)}")
    return dict(
        ext_modules=[extension("leet_compile._C", sources, extra_compile_args=extra_compile_args, py_limited_api=True)],
        cmdclass={"build_ext": BuildExtension},
        install_requires=[torch_requirement(torch)],
    )


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    os.chdir(HERE)
    setup(
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
        **extension_kwargs(),
    )
