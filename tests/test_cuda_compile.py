"""CI checks of the CUDA kernels (csrc/cuda) that need no GPU.

* every .cu file under csrc/ compiles with ``nvcc -arch=sm_90 -c``, plainly and with
  the flags torch's CUDAExtension adds (no implicit half conversions, C++20);
* the launchers' host logic (argument checks, tile plans) behaves, linked from the
  compiled objects into a small program;
* the kernels compute the right numbers when run on the CPU under
  csrc/cuda/testing/cpu_emulation.h (every dtype, decay form, state, padding and tile
  configuration, against a float64 recurrence);
* the torch glue (decay_attn_cuda.cpp) compiles against this torch's headers;
* the fake kernel of _decay_attn_cuda (ops/cuda.py) traces.

Skipped with a reason where nvcc or a C++20 compiler is missing.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import leet_compile  # noqa: F401  (loads the operator library)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
# What torch.utils.cpp_extension passes to nvcc for a CUDAExtension (besides -arch).
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-std=c++20",
    "-O3",
]


def _nvcc():
    path = shutil.which("nvcc")
    if path is None and os.environ.get("CUDA_HOME"):
        path = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return path if path and os.path.exists(path) else None


def _cuda_include():
    """The CUDA toolkit's include dir (cuda_fp16.h etc.), or None."""
    nvcc = _nvcc()
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"), "/usr/local/cuda/include"]
    if nvcc:
        candidates.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    return next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_fp16.h"))), None)


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def nvcc():
    path = _nvcc()
    if path is None:
        pytest.skip("nvcc not found (put it on PATH or set CUDA_HOME): the CUDA kernels cannot be compiled here")
    return path


@pytest.fixture(scope="module")
def objects(nvcc, tmp_path_factory):
    """Compiles every .cu file twice (plain, torch flags), all at once: {(file, flavour): (rc, log, obj)}."""
    out = tmp_path_factory.mktemp("cuda_objects")
    jobs = {}
    for i, rel in enumerate(CU_FILES):
        for flavour, flags in (("plain", []), ("torch", TORCH_NVCC_FLAGS)):
            obj = str(out / f"{i}_{flavour}_{os.path.basename(rel)}.o")
            cmd = [nvcc, "-arch=sm_90", *flags, "-c", os.path.join(ROOT, rel), "-o", obj]
            jobs[(rel, flavour)] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), obj)
    results = {}
    for key, (proc, obj) in jobs.items():
        log, _ = proc.communicate()
        results[key] = (proc.returncode, log, obj)
    return results


def test_there_are_cuda_sources():
    assert {"csrc/cuda/chunked.cu", "csrc/cuda/recurrent.cu"} <= set(CU_FILES)


@pytest.mark.parametrize("flavour", ["plain", "torch"])
@pytest.mark.parametrize("rel", CU_FILES)
def test_cu_file_compiles_for_sm90(objects, rel, flavour):
    rc, log, _ = objects[(rel, flavour)]
    assert rc == 0, f"nvcc -arch=sm_90 -c {rel} ({flavour} flags) failed:\n{log}"


HOST_DRIVER = r"""
#include "decay_attn_kernels.h"
#include <stdio.h>
#include <string.h>

static leet_decay_attn_args base(int dtype, long B, long H, long T, long K, long V) {
  static char dummy[16];
  leet_decay_attn_args a;
  memset(&a, 0, sizeof a);
  a.B = B; a.H = H; a.T = T; a.K = K; a.V = V; a.dtype = dtype;
  a.q = a.k = a.v = dummy; a.o = dummy;
  a.q_strides[0] = a.k_strides[0] = H * T * K; a.v_strides[0] = H * T * V;
  a.q_strides[1] = a.k_strides[1] = T * K; a.v_strides[1] = T * V;
  a.q_strides[2] = a.k_strides[2] = K; a.v_strides[2] = V;
  a.scale = 1.0;
  return a;
}

static void check(const char* name, leet_decay_attn_args a) {
  const char* m = leet_decay_attn_validate(&a);
  printf("validate %s: %s\n", name, m ? m : "ok");
}

int main(void) {
  static const double decay[4] = {0, 0, 0, 0};
  leet_decay_attn_args a = base(LEET_BFLOAT16, 2, 4, 100, 128, 64);
  check("good", a);
  a.K = 300; check("K300", a);
  a = base(LEET_FLOAT32, 1, 1, 0, 64, 64); check("T0", a);
  a = base(7, 1, 1, 5, 64, 64); check("dtype7", a);
  a = base(LEET_FLOAT32, 1, 1, 5, 64, 64); a.decay = LEET_DECAY_PER_HEAD; check("decay_without_pointer", a);
  a.log_decay = decay; check("per_head", a);
  a = base(LEET_FLOAT32, 1, 1, 5, 64, 64); a.q = 0; check("null_q", a);
  a = base(LEET_FLOAT32, 1, 1, 5, 64, 64); a.v_strides[2] = -1; check("negative_stride", a);

  /* launchers refuse bad arguments before any CUDA call */
  a = base(LEET_FLOAT32, 1, 1, 5, 300, 64);
  printf("launch chunked K300: %d\n", (int)leet_decay_attn_chunked(&a, 0));
  printf("launch recurrent K300: %d\n", (int)leet_decay_attn_recurrent(&a, 0));
  printf("invalid_value: %d\n", (int)cudaErrorInvalidValue);

  /* plans on an H100-like device: 132 SMs, 227 KiB of opt-in shared memory */
  const int dtypes[4] = {LEET_FLOAT32, LEET_FLOAT16, LEET_BFLOAT16, LEET_FLOAT64};
  const long shapes[][5] = {{1, 1, 1000, 64, 64}, {2, 8, 4096, 128, 128}, {4, 32, 2048, 256, 256},
                            {1, 2, 65, 80, 96}, {1, 1, 63, 192, 16}, {8, 64, 512, 256, 80}};
  for (int d = 0; d < 4; ++d) {
    for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; ++s) {
      const long* x = shapes[s];
      leet_decay_attn_args p = base(dtypes[d], x[0], x[1], x[2], x[3], x[4]);
      leet_chunked_plan plan;
      const int rc = leet_decay_attn_chunked_plan(&p, 132, 232448, &plan);
      printf("plan dtype=%d B=%ld H=%ld T=%ld K=%ld V=%ld rc=%d C=%d Kp=%d Vt=%d tc=%d threads=%d blocks=%lld smem=%zu\n",
             dtypes[d], x[0], x[1], x[2], x[3], x[4], rc, plan.chunk, plan.k_padded, plan.v_tile,
             plan.tensor_cores, plan.threads, (long long)plan.blocks, plan.smem_bytes);
    }
  }
  leet_decay_attn_args p = base(LEET_FLOAT32, 1, 1, 10, 256, 64);
  leet_chunked_plan plan;
  printf("tiny_smem rc=%d\n", leet_decay_attn_chunked_plan(&p, 132, 4096, &plan));
  return 0;
}
"""


def test_launcher_host_logic(nvcc, objects, tmp_path):
    objs = [objects[(rel, "plain")][2] for rel in CU_FILES if rel.startswith("csrc/cuda/")]
    if any(objects[(rel, "plain")][0] != 0 for rel in CU_FILES):
        pytest.skip("a .cu file does not compile (see test_cu_file_compiles_for_sm90)")
    src = tmp_path / "host_driver.cpp"
    src.write_text(HOST_DRIVER)
    exe = str(tmp_path / "host_driver")
    build = _run([nvcc, "-arch=sm_90", "-I", os.path.join(ROOT, "csrc", "cuda"), str(src), *objs, "-o", exe])
    assert build.returncode == 0, build.stderr + build.stdout
    run = _run([exe], timeout=60)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    lines = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith(("validate", "launch", "invalid")))
    assert lines["validate good"] == "ok"
    assert lines["validate per_head"] == "ok"
    assert "at most 256" in lines["validate K300"]
    assert ">= 1" in lines["validate T0"]
    assert "dtype" in lines["validate dtype7"]
    assert "log_decay" in lines["validate decay_without_pointer"]
    assert "NULL" in lines["validate null_q"]
    assert "strides" in lines["validate negative_stride"]
    assert lines["launch chunked K300"] == lines["invalid_value"]
    assert lines["launch recurrent K300"] == lines["invalid_value"]

    plans = [dict(kv.split("=") for kv in line.split()[1:]) for line in out.splitlines() if line.startswith("plan ")]
    assert len(plans) == 24
    for p in plans:
        p = {key: int(val) for key, val in p.items()}
        assert p["rc"] == 0, p
        assert p["C"] in (16, 32, 64) and p["Vt"] in (16, 32, 64), p
        assert p["Kp"] % 16 == 0 and p["K"] <= p["Kp"] < p["K"] + 16, p
        assert p["tc"] == (p["dtype"] in (1, 2)), p
        assert p["threads"] == 256
        assert p["blocks"] == p["B"] * p["H"] * -(-p["V"] // p["Vt"]), p
        assert 0 < p["smem"] <= 232448, p
        if p["B"] * p["H"] * -(-p["V"] // 64) >= 132 and p["V"] >= 64 and p["dtype"] != 3:
            assert p["Vt"] == 64, p  # enough blocks already: widest V tile
        if p["dtype"] in (1, 2):
            assert p["C"] == 64, p  # the tensor-core path fits a full chunk at every head dim
    assert "tiny_smem rc=-1" in out


def test_kernels_on_cpu_emulation(tmp_path):
    """The kernels' arithmetic, run on the CPU (see csrc/cuda/testing/cpu_emulation.h)."""
    include = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("needs the CUDA toolkit headers (cuda_fp16.h) and a C++20 compiler")
    exe = str(tmp_path / "run_on_cpu")
    src = os.path.join(ROOT, "csrc", "cuda", "testing", "run_on_cpu.cpp")
    build = _run([cxx, "-std=c++20", "-O2", "-pthread", "-I", include, src, "-o", exe])
    assert build.returncode == 0, build.stderr
    run = _run([exe], timeout=600)
    assert run.returncode == 0 and "ALL PASS" in run.stdout, run.stdout + run.stderr
    assert len(re.findall(r"^PASS ", run.stdout, re.M)) >= 36


def test_glue_compiles_against_torch_headers(tmp_path):
    """decay_attn_cuda.cpp against this torch's headers (a CPU torch ships the c10/cuda
    headers but not the generated cuda_cmake_macros.h, which is stubbed here)."""
    include = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if include is None or cxx is None or not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("needs the CUDA toolkit headers, a C++20 compiler and torch's c10/cuda headers")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-I", str(tmp_path / "stub"), "-isystem", torch_inc,
           "-isystem", os.path.join(torch_inc, "torch", "csrc", "api", "include"), "-I", include,
           os.path.join(ROOT, "csrc", "cuda", "decay_attn_cuda.cpp")]  # fmt: skip
    build = _run(cmd)
    assert build.returncode == 0, build.stderr


def test_fake_kernel_shapes_and_errors():
    op = torch.ops.leet._decay_attn_cuda.default
    q = torch.empty(2, 3, 7, 80, device="meta", dtype=torch.bfloat16)
    v = torch.empty(2, 3, 7, 48, device="meta", dtype=torch.bfloat16)
    o, s = op(q, q, v, torch.empty(3, device="meta"), 0.5, None, True, "chunked")
    assert (o.shape, o.dtype, s.shape, s.dtype) == ((2, 3, 7, 48), torch.bfloat16, (2, 3, 80, 48), torch.float32)
    o, s = op(q.double(), q, v, None, 1.0, None, False, "recurrent")
    assert o.dtype == torch.bfloat16 and s.shape == (0,) and s.dtype == torch.float64
    with pytest.raises(ValueError, match="backend 'cuda' implements methods auto, chunked, recurrent; got 'fleet'"):
        op(q, q, v, None, 1.0, None, False, "fleet")
    with pytest.raises(ValueError, match="backend 'cuda' takes head dim K at most 256, got 300"):
        big = torch.empty(1, 1, 3, 300, device="meta")
        op(big, big, big, None, 1.0, None, False, "auto")
    with pytest.raises(ValueError, match="log_decay must have shape"):
        op(q, q, v, torch.empty(5, device="meta"), 1.0, None, False, "auto")


def test_fake_kernel_traces():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v, a, s0):
        return torch.ops.leet._decay_attn_cuda(q, k, v, a, 0.125, s0, True, "auto")

    # meta tensors: the contract's device rule (CUDA tensors) is for real devices only
    args = tuple(torch.empty(*shape, device="meta")
                 for shape in ((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 24), (1, 2, 9), (1, 2, 16, 24)))
    gm = make_fx(f, tracing_mode="symbolic")(*args)
    assert "_decay_attn_cuda" in gm.code
    outs = [n for n in gm.graph.nodes if n.op == "call_function" and "_decay_attn_cuda" in str(n.target)]
    o_val, s_val = outs[0].meta["val"]
    assert tuple(s_val.shape)[2:] == (16, 24) and o_val.shape[-1] == 24


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


def test_triton_kernels_compile_for_sm90():
    """The Triton kernels (ops/triton_kernels.py) compile to PTX for sm_90 without a GPU:
    the interpreter (tests/test_triton.py) checks their arithmetic, this checks that the
    compiler accepts them (float64 prefix sums, the non-finite branch and its loop)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces the kernels")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from leet_compile.ops import triton_kernels as tk

    meta = ("DECAY", "HAS_S0", "STORE_ST", "PRECISION", "F32_DOTS", "BK", "BT", "BV")
    for kernel, dtype in ((tk.chunked_fwd_kernel, "fp32"), (tk.chunked_fwd_kernel, "bf16"),
                          (tk.recurrent_fwd_kernel, "fp32")):
        fn = kernel.fn  # the autotuner's JITFunction
        consts = dict(DECAY=1, HAS_S0=1, STORE_ST=1, BK=64, BV=64)
        if "BT" in fn.arg_names:
            consts.update(BT=64, PRECISION="ieee" if dtype == "fp32" else "tf32", F32_DOTS=dtype == "fp32")
        sig = {}
        for name in fn.arg_names:
            if name in meta:
                sig[name] = "constexpr"
            elif name in ("q", "k", "v", "o"):
                sig[name] = f"*{dtype}"
            elif name in ("a", "s0", "sT"):
                sig[name] = "*fp32"
            else:
                sig[name] = "fp32" if name == "scale" else "i64"
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["ptx"]
