"""Packaging: the build's decisions (torch pin, CUDA switch, CUDA_HOME, arch list), the
in-tree build backend, the sdist's completeness, and the benchmark harness's contract.

The end-to-end install paths (sdist -> wheel -> fresh venv -> smoke test; pip install .
with build isolation) are .ci/wheel_smoke.sh, run by `make test` / `make test-packaging`.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def setup_py(monkeypatch):
    for var in ("LEET_BUILD_CUDA", "CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    return _load("leet_setup_py", os.path.join(ROOT, "setup.py"))


def fake_toolkit(root, release="13.0"):
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "include"))
    open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    nvcc = os.path.join(root, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    os.chmod(nvcc, 0o755)
    return root


def fake_torch(cuda="13.0", gpus=0, version="2.14.1+cu130"):
    return SimpleNamespace(
        __version__=version, version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(is_available=lambda: gpus > 0, device_count=lambda: gpus,
                             get_device_capability=lambda i: (9, 0)))


def test_wheel_pins_the_torch_it_was_built_against(setup_py):
    assert setup_py.torch_requirement(fake_torch(version="2.13.0+cpu")) == "torch==2.13.0"
    assert setup_py.torch_requirement(fake_torch(version="2.14.1")) == "torch==2.14.1"


def installed_distribution():
    """The leet-compile distribution installed in this environment (site-packages), not an
    egg-info a source build left in the checkout (which the cwd on sys.path would find first)."""
    import importlib.metadata as md

    dists = [d for d in md.distributions(name="leet-compile")
             if os.path.realpath(str(d.locate_file(""))).startswith(os.path.realpath(sys.prefix))]
    if not dists:
        pytest.skip("leet-compile is not installed in this environment (run from a source tree only)")
    return dists[0]


def test_installed_metadata_pins_this_torch():
    import torch

    requires = installed_distribution().requires or []
    assert f"torch=={torch.__version__.split('+')[0]}" in requires, requires
    assert not any(r.startswith("numpy") for r in requires), "numpy is not a runtime dependency"


def test_cuda_home_found_through_a_wrapper_script(setup_py, tmp_path, monkeypatch):
    """/usr/local/bin/nvcc as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: torch's guess
    (dirname(dirname(nvcc)) = /usr/local) is wrong; ours reads the wrapper."""
    kit = fake_toolkit(str(tmp_path / "cuda-13.0"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvcc").write_text(f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n')
    (bindir / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setattr(setup_py.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(setup_py, "_is_toolkit", lambda r: bool(r) and r.startswith(str(tmp_path))
                        and os.path.exists(os.path.join(r, "include", "cuda_runtime.h")))
    assert setup_py.find_cuda_home() == kit


def test_cuda_home_from_the_environment_must_be_a_toolkit(setup_py, tmp_path, monkeypatch):
    kit = fake_toolkit(str(tmp_path / "kit"))
    monkeypatch.setenv("CUDA_HOME", kit)
    assert setup_py.find_cuda_home() == kit
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no bin/nvcc there
    assert setup_py.find_cuda_home() is None


def test_no_gpu_visible_gives_the_default_arch_list(setup_py, tmp_path, monkeypatch):
    kit = fake_toolkit(str(tmp_path / "kit"))
    monkeypatch.setenv("CUDA_HOME", kit)
    ok, why = setup_py.cuda_plan(fake_torch(gpus=0))
    assert ok, why
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert os.environ["CUDA_HOME"] == kit


def test_explicit_arch_list_is_kept(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", fake_toolkit(str(tmp_path / "kit")))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert setup_py.cuda_plan(fake_torch())[0]
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_build_cuda_switch(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", fake_toolkit(str(tmp_path / "kit")))
    monkeypatch.setenv("LEET_BUILD_CUDA", "0")
    assert setup_py.cuda_plan(fake_torch()) == (False, "LEET_BUILD_CUDA=0")
    monkeypatch.setenv("LEET_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="CPU-only"):
        setup_py.cuda_plan(fake_torch(cuda=None, version="2.13.0+cpu"))
    monkeypatch.setenv("LEET_BUILD_CUDA", "auto")
    ok, why = setup_py.cuda_plan(fake_torch(cuda=None, version="2.13.0+cpu"))
    assert not ok and "CPU-only" in why
    monkeypatch.setenv("LEET_BUILD_CUDA", "maybe")
    with pytest.raises(SystemExit, match="auto, 1 or 0"):
        setup_py.cuda_plan(fake_torch())


def test_nvcc_major_version_must_match_torch(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", fake_toolkit(str(tmp_path / "kit"), release="12.8"))
    ok, why = setup_py.cuda_plan(fake_torch(cuda="13.0"))
    assert not ok and "major version" in why


def tree_copy(dest):
    """The versioned files (tracked, and untracked but not ignored) copied to dest: builds
    run there leave no egg-info or build/ in the checkout."""
    dest.mkdir()
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    subprocess.run(f"tar --null -T - -cf - | tar -xf - -C {dest}", shell=True, cwd=ROOT, input=files, check=True)
    return dest


needs_git = pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                               reason="needs a git checkout")


@needs_git
def test_build_backend_pins_the_build_torch(monkeypatch, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "build_backend"))
    try:
        backend = _load("leet_build_backend_t", os.path.join(ROOT, "build_backend", "leet_build_backend.py"))
    finally:
        sys.path.pop(0)
    monkeypatch.delenv("LEET_BUILD_TORCH", raising=False)
    monkeypatch.chdir(tree_copy(tmp_path / "src"))
    assert "torch==2.13.0" in backend.get_requires_for_build_wheel()
    monkeypatch.setenv("LEET_BUILD_TORCH", "torch==2.14.1")
    assert "torch==2.14.1" in backend.get_requires_for_build_wheel()
    assert not any(r.startswith("torch") for r in backend.get_requires_for_build_sdist())


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="the `build` package is not installed")
@needs_git
def test_sdist_holds_every_tracked_source_doc_and_example(tmp_path):
    src = tree_copy(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc", "docs", "examples", "build_backend", "benchmarks",
                              "LICENSE", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = [f for f in tracked if f not in names and os.path.exists(os.path.join(ROOT, f))]
    assert not missing, f"missing from the sdist: {missing}"
    assert not [n for n in names if n.endswith(".so")], "no binaries in the sdist"


# ------------------------------------------------------------------ benchmark harness


@pytest.fixture()
def harness():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import harness as module

        yield module
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def test_registered_method_is_verified_against_float64(harness):
    import torch

    def good(q, k, v, a, scale):
        return harness.reference(q, k, v, a, scale).float()

    def wrong(q, k, v, a, scale):  # the decay ignored
        return harness.reference(q, k, v, None, scale).float()

    assert harness.verify(good, ("none", "head", "position"))[0]
    ok, errs = harness.verify(wrong, ("head",))
    assert not ok and errs["head"] > 1e-3
    ok, errs = harness.verify(lambda *a: torch.zeros(1) / 0, ("head",))
    assert not ok


def test_measure_reports_median_and_quartiles(harness):
    t = harness.measure(lambda: sum(range(1000)), threads=1, min_time=0.05, max_time=10, min_samples=5)
    assert t.n >= 5 and t.q1 <= t.median <= t.q3 and t.threads == 1


def test_runner_writes_only_with_save(tmp_path):
    run = os.path.join(ROOT, "benchmarks", "run.py")
    r = subprocess.run([sys.executable, run, "gemm", "--smoke", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "thr" in r.stdout and list(tmp_path.iterdir()) == []
    r = subprocess.run([sys.executable, run, "gemm", "--smoke", "--save", "--plot", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.suffix for p in tmp_path.iterdir()} >= {".json", ".md"}


def test_gemm_yardstick_includes_onednn_where_torch_has_it(harness):
    # Every x86 CPU oneDNN supports has its float32 GEMM; a probe that failed for another
    # reason (oneDNN tensors cannot be sliced) once dropped it silently from every result.
    import torch
    from suites.cpu import gemm_products  # (the harness fixture puts benchmarks/ on the path)

    products = gemm_products(8, torch.float32)
    if torch.backends.mkldnn.is_available():
        assert "oneDNN" in products
    for fn in products.values():
        assert fn().to_dense().shape == (8, 8)
