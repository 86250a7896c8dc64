"""AOTInductor deployment: a RetNet-style block exported with leet_compile.export is
packaged once (dynamic sequence length) and run, at two lengths, from a fresh Python
process and from the C++ runner in examples/aoti_cpp, matching eager."""
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import leet_compile
from test_export import RetNetBlock, count_decay_attn, dynamic_T

ROOT = Path(__file__).resolve().parents[1]
B, DIM = 2, 64
LENGTHS = (37, 300)  # both differ from the example length the package was traced with
TOL = dict(rtol=1e-4, atol=1e-5)


def timed(what, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    print(f"{what}: {time.perf_counter() - start:.1f} s")
    return result


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """One package for the whole module, with inputs and eager outputs at LENGTHS."""
    workdir = tmp_path_factory.mktemp("aoti")
    torch.manual_seed(0)
    model = RetNetBlock(dim=DIM).eval()
    ep = leet_compile.export(model, (torch.randn(B, 64, DIM),), dynamic_shapes=dynamic_T())
    assert count_decay_attn(ep) == 1
    path = timed(
        "aoti_compile_and_package", torch._inductor.aoti_compile_and_package, ep,
        package_path=str(workdir / "retnet.pt2"),
    )
    cases = []
    for T in LENGTHS:
        x = torch.randn(B, T, DIM)
        inputs = workdir / f"inputs_{T}.pt"
        torch.save([x], inputs)
        with torch.no_grad():
            cases.append(SimpleNamespace(T=T, inputs=inputs, expected=model(x)))
    return SimpleNamespace(path=Path(path), dir=workdir, cases=cases)


@pytest.fixture(scope="session")
def cpp_runner(tmp_path_factory):
    """examples/aoti_cpp built once per test session against the wheel's libtorch."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("aoti_cpp_build")
    configure = [
        "cmake", "-S", str(ROOT / "examples" / "aoti_cpp"), "-B", str(build),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release",
    ]
    if torch.version.cuda is not None:
        # a CUDA torch's TorchConfig.cmake needs the CUDA toolkit (libraries and nvcc):
        # point CMake at the toolkit the build would use (setup.py's search)
        cuda_home = _cuda_home()
        if cuda_home is None:
            pytest.skip(f"torch {torch.__version__} is a CUDA build and its CMake config needs a CUDA "
                        "toolkit, none found (set CUDA_HOME)")
        configure += [f"-DCUDAToolkit_ROOT={cuda_home}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                      f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"]
        nvrtc = _nvrtc_library(cuda_home)
        if nvrtc:
            configure.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    result = timed("cmake configure", subprocess.run, configure, capture_output=True, text=True)
    if result.returncode != 0 and torch.version.cuda is not None:
        pytest.skip(f"CMake cannot configure against CUDA torch {torch.__version__} here: "
                    + " ".join((result.stderr or result.stdout).split())[-400:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    timed("cmake build", subprocess.run, ["cmake", "--build", str(build)], check=True, capture_output=True)
    return build / "aoti_runner"


def _cuda_home():
    """The CUDA toolkit root as setup.py finds it (CUDA_HOME, nvcc wrappers, /usr/local/cuda)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("leet_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home()


def _nvrtc_library(cuda_home):
    """libnvrtc: the toolkit's, else the one torch's CUDA wheels ship (nvidia/*/lib)."""
    import glob
    import os

    for pattern in (f"{cuda_home}/lib64/libnvrtc.so*", f"{cuda_home}/targets/*/lib/libnvrtc.so*"):
        if glob.glob(pattern):
            return None  # CMake finds it there
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    return found[0] if found else None


def python(code, *args):
    """Runs `code` in a fresh interpreter (no leet_compile unless the code imports it)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_package_runs_in_fresh_python(package):
    code = """
        import sys, torch, leet_compile
        path, workdir, *lengths = sys.argv[1:]
        for name, load in [("torch", torch._inductor.aoti_load_package), ("leet", leet_compile.load_package)]:
            runner = load(path)
            for T in lengths:
                (x,) = torch.load(f"{workdir}/inputs_{T}.pt")
                torch.save(runner(x), f"{workdir}/python_{name}_{T}.pt")
    """
    result = python(code, package.path, package.dir, *LENGTHS)
    assert result.returncode == 0, result.stderr
    for case in package.cases:
        for name in ("torch", "leet"):
            out = torch.load(package.dir / f"python_{name}_{case.T}.pt")
            assert out.shape == (B, case.T, DIM)
            torch.testing.assert_close(out, case.expected, **TOL)


def test_package_runs_from_cpp(package, cpp_runner):
    python_runner = leet_compile.load_package(package.path)
    for case in package.cases:
        out_path = package.dir / f"cpp_{case.T}.pt"
        result = subprocess.run(
            [str(cpp_runner), str(package.path), leet_compile.library_path(), str(case.inputs), str(out_path)],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        (out,) = torch.load(out_path)
        torch.testing.assert_close(out, case.expected, **TOL)
        # the same package from Python: the same kernels, so (near) the same numbers
        (x,) = torch.load(case.inputs)
        torch.testing.assert_close(out, python_runner(x))


def test_cpp_runner_without_operator_library_says_what_to_load(package, cpp_runner):
    case = package.cases[0]
    result = subprocess.run(
        [str(cpp_runner), str(package.path), "-", str(case.inputs), str(package.dir / "unused.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "leet::decay_attn" in result.stderr and "not registered" in result.stderr
    assert "leet_compile.library_path()" in result.stderr


def test_python_without_leet_compile_fails_on_the_operator(package):
    """Without the operator library, torch's loader stops at leet::decay_attn ..."""
    result = python("import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])", package.path)
    assert result.returncode != 0
    assert "leet::decay_attn" in result.stderr
    # ... and loading the library by path (no `import leet_compile`) is enough.
    code = """
        import sys, torch
        torch.ops.load_library(sys.argv[2])
        (x,) = torch.load(sys.argv[3])
        torch.save(torch._inductor.aoti_load_package(sys.argv[1])(x), sys.argv[4])
    """
    case = package.cases[1]
    out_path = package.dir / "python_library_only.pt"
    result = python(code, package.path, leet_compile.library_path(), case.inputs, out_path)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(out_path), case.expected, **TOL)


def test_load_package_error_names_what_to_load(monkeypatch, tmp_path):
    """leet_compile.load_package turns torch's bare "Could not find schema" into advice.
    (In-process the library is always loaded, so torch's failure is simulated.)"""
    def fail(path, **kwargs):
        raise RuntimeError("Could not find schema for leet::decay_attn.")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fail)
    with pytest.raises(RuntimeError, match=r"leet::decay_attn.*leet_compile\.library_path\(\)"):
        leet_compile.load_package(tmp_path / "model.pt2")

    def fail_other(path, **kwargs):
        raise RuntimeError("Could not find schema for mylib::op.")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fail_other)
    with pytest.raises(RuntimeError, match=r"mylib::op.*torch\.ops\.load_library"):
        leet_compile.load_package(tmp_path / "model.pt2")
