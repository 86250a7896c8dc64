// Small row-major matrix products on the CPU for the fused kernels of csrc/cpu:
// oneDNN's brgemm where torch has it (about 25% faster per call than BLAS at chunk
// sizes), else the BLAS torch carries, else at::addmm.
#pragma once

#include <ATen/ATen.h>

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
    if (&at::native::cpublas::brgemm == nullptr) return false;
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

}  // namespace leet::cpu
