// Small row-major matrix products on the CPU for the fused kernels of csrc/cpu:
// oneDNN's brgemm where torch has it (about 25% faster per call than BLAS at chunk
// sizes), else the BLAS torch carries, else at::addmm. Also the bf16/fp16 products
// with float32 results on the CPU's matrix units (mm_vnni, B packed by pack_vnni).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// The BLAS that torch's CPU build carries (MKL on x86-64). Weak, so that a torch
// without it still loads this library and takes the slower at::addmm path.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

// oneDNN's batch-reduce GEMM as torch exports it (ATen/native/CPUBlas.h): row-major
// C (+)= A B. Weak, for torch builds without it.
namespace at::native::cpublas {
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add_C,
            const float* A, const float* B, float* C, bool is_vnni) __attribute__((weak));
void brgemm_release(bool is_vnni) __attribute__((weak));
// bf16 / fp16 inputs, float32 C; with is_vnni, B in the VNNI-2 layout (see pack_vnni).
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add_C,
            const at::BFloat16* A, const at::BFloat16* B, float* C, bool is_vnni) __attribute__((weak));
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add_C,
            const at::Half* A, const at::Half* B, float* C, bool is_vnni) __attribute__((weak));
void pack(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, c10::ScalarType dt_in, c10::ScalarType dt_out,
          const void* in, void* out) __attribute__((weak));
// True where oneDNN has a matrix-unit (AMX) kernel for this input type.
bool could_pack(c10::ScalarType dt_in) __attribute__((weak));
}  // namespace at::native::cpublas

namespace leet::cpu {

template <typename T>
struct Blas;
template <>
struct Blas<float> {
  static constexpr auto* fn = &sgemm_;
};
template <>
struct Blas<double> {
  static constexpr auto* fn = &dgemm_;
};

// Whether brgemm exists in this torch and computes a product right (checked once).
inline bool brgemm_usable() {
  static const bool usable = [] {
    using F32 = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*,
                         float*, bool);  // the float overload (brgemm has several)
    if (static_cast<F32>(&at::native::cpublas::brgemm) == nullptr) return false;
    try {
      const float A[6] = {1, 2, 3, 4, 5, 6}, B[6] = {1, 0, 2, 1, 0, 3};  // [2, 3] x [3, 2]
      float C[4] = {1, 1, 1, 1};
      at::native::cpublas::brgemm(2, 2, 3, 3, 2, 2, true, A, B, C, false);
      if (&at::native::cpublas::brgemm_release != nullptr) at::native::cpublas::brgemm_release(false);
      return C[0] == 6 && C[1] == 12 && C[2] == 15 && C[3] == 24;
    } catch (...) {
      return false;
    }
  }();
  return usable;
}

// Row-major C[m, n] (+)= A[m, k] B[k, n]: brgemm, else BLAS (column-major, so it is
// asked for C^T = B^T A^T), else at::addmm.
template <typename T>
inline void mm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
        int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    if (brgemm_usable()) {
      at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, A, B, C, false);
      return;
    }
  }
  const T one = 1, beta = accumulate ? 1 : 0;
  if (Blas<T>::fn != nullptr) {
    const int mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
    const char no = 'N';
    (*Blas<T>::fn)(&no, &no, &ni, &mi, &ki, &one, B, &ldbi, A, &ldai, &beta, C, &ldci);
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  };
  view(C, m, n, ldc).addmm_(view(A, m, k, lda), view(B, k, n, ldb), beta, one);
}

// Frees brgemm's per-thread state; call at the end of each parallel region that used mm.
inline void release_thread_gemm() {
  if (&at::native::cpublas::brgemm_release != nullptr && brgemm_usable()) {
    at::native::cpublas::brgemm_release(false);
  }
}

// ---------------------------------------------------------------- bf16 / fp16 products
//
// oneDNN's bf16 / fp16 kernels (AMX, AVX512-BF16) read B in the VNNI-2 layout: rows in
// pairs, element (r, j) of a row-major B[k, n] at ((r / 2) * ldb + j) * 2 + r % 2, where
// the reduction length k is padded to even with a zero row (A gets a matching zero
// column) and ldb is the panel width rounded up to 16 (torch's pack builds only ldb 16,
// 32, 48 or 64, so columns go in panels of at most 64). The kernels write that layout
// themselves (pack_vnni), fused with the transposes, conversions and scalings they need
// anyway; lowp_usable checks once that it is exactly what at::native::cpublas::pack
// produces where torch packs (AMX).

constexpr int64_t kVnniPanel = 64;

inline int64_t even(int64_t k) { return (k + 1) / 2 * 2; }
// Elements of a packed B[k, n] (k padded to even).
inline int64_t vnni_size(int64_t k, int64_t n) {
  const int64_t full = n / kVnniPanel, rest = n % kVnniPanel;
  return even(k) * (full * kVnniPanel + (rest ? (rest + 15) / 16 * 16 : 0));
}

// dst = VNNI-2 packing of B[k, n] where B(r, j) = get(r, j) (a value of type T); the
// padding row of an odd k is zero.
template <typename T, typename Get>
inline void pack_vnni(int64_t k, int64_t n, T* dst, Get&& get) {
  const int64_t ke = even(k);
  for (int64_t p0 = 0; p0 < n; p0 += kVnniPanel) {
    const int64_t w = std::min(kVnniPanel, n - p0), ldb = (w + 15) / 16 * 16;
    T* panel = dst + ke * p0;
    for (int64_t r = 0; r + 1 < k; r += 2) {
      T* row = panel + r * ldb;  // (r / 2) * ldb * 2
      for (int64_t j = 0; j < w; ++j) {
        row[2 * j] = get(r, p0 + j);
        row[2 * j + 1] = get(r + 1, p0 + j);
      }
    }
    if (k % 2) {
      T* row = panel + (k - 1) * ldb;
      for (int64_t j = 0; j < w; ++j) {
        row[2 * j] = get(k - 1, p0 + j);
        row[2 * j + 1] = T(0);
      }
    }
  }
}

// Row-major C[m, n] (+)= A[m, k] B[k, n] with B packed by pack_vnni, float32 C. A must
// have even(k) columns readable, a zero in column k when k is odd. Needs lowp_usable<T>().
template <typename T>
inline void mm_vnni(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B_packed, float* C,
                    int64_t ldc, bool accumulate) {
  const int64_t ke = even(k);
  for (int64_t p0 = 0; p0 < n; p0 += kVnniPanel) {
    const int64_t w = std::min(kVnniPanel, n - p0), ldb = (w + 15) / 16 * 16;
    at::native::cpublas::brgemm(m, w, ke, lda, ldb, ldc, accumulate, A, B_packed + ke * p0, C + p0, true);
  }
}

// Whether this CPU has units for T that oneDNN's brgemm uses and that beat the float32
// kernel (chunked_cpu.cpp, converting a chunk at a time): AMX or AVX512-BF16 for bf16
// (measured: AMX Xeon, AVX512-BF16 EPYC); for fp16 only AMX-FP16 (torch's could_pack), as
// oneDNN's fp16 kernels elsewhere are unmeasured.
template <typename T>
inline bool cpu_has_lowp_units() {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
    return false;
#endif
  } else {
    return &at::native::cpublas::could_pack != nullptr && at::native::cpublas::could_pack(at::kHalf);
  }
}

// Whether this torch and this CPU run bf16 (T = at::BFloat16) or fp16 (at::Half)
// products on the CPU's bf16 / fp16 units through mm_vnni: the symbols exist (weak), the
// CPU has the units (cpu_has_lowp_units), pack_vnni's layout equals torch's pack where
// torch can pack (AMX), and a product comes out right. oneDNN's brgemm takes packed B
// on any AVX-512 CPU, but only while torch.backends.mkldnn is enabled (it raises
// otherwise): that is checked at every call, the rest once.
template <typename T>
inline bool lowp_usable() {
  namespace cb = at::native::cpublas;
  constexpr auto dt = c10::CppTypeToScalarType<T>::value;
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool usable = [] {
    if (!cpu_has_lowp_units<T>() || &cb::brgemm_release == nullptr) return false;
    if (static_cast<void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const T*, const T*,
                             float*, bool)>(&cb::brgemm) == nullptr) return false;
    try {
      constexpr int64_t m = 3, k = 4, n = 16;  // small exact integers: the product is exact
      T A[m * k], B[k * n], mine[k * n], theirs[k * n];
      for (int64_t i = 0; i < m * k; ++i) A[i] = T(static_cast<float>(i % 5) - 2.0f);
      for (int64_t i = 0; i < k * n; ++i) B[i] = T(static_cast<float>(i % 7) - 3.0f);
      pack_vnni(k, n, mine, [&](int64_t r, int64_t j) { return B[r * n + j]; });
      if (&cb::could_pack != nullptr && &cb::pack != nullptr && cb::could_pack(dt)) {
        cb::pack(k, n, n, n, dt, dt, B, theirs);
        for (int64_t i = 0; i < k * n; ++i) {
          if (static_cast<float>(mine[i]) != static_cast<float>(theirs[i])) return false;
        }
      }
      float C[m * n];
      mm_vnni<T>(m, n, k, A, k, mine, C, n, false);
      cb::brgemm_release(true);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          float want = 0;
          for (int64_t r = 0; r < k; ++r) want += static_cast<float>(A[i * k + r]) * static_cast<float>(B[r * n + j]);
          if (C[i * n + j] != want) return false;
        }
      }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return usable;
}

// Frees the bf16 / fp16 kernel state (AMX's tile configuration) of this thread; call at the end
// of each parallel region that used mm_vnni.
inline void release_thread_gemm_vnni() {
  if (&at::native::cpublas::brgemm_release != nullptr) at::native::cpublas::brgemm_release(true);
}

}  // namespace leet::cpu
