// What the fused CPU chunked kernels (chunked_cpu.cpp, chunked_cpu_lowp.cpp,
// chunked_cpu_backward.cpp) and the sequence split (chunked_cpu_split.cpp) share: the
// chunk length, the underflow rule of the cumulative log decay (one definition, so that
// every kernel computes the same weights), the small tile operations they need, and the
// choice between their AVX2 and baseline builds.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace leet::cpu {

// The kernels' own per-element work (transposes, scalings, copies, conversions) is about a
// third of their time. The extension is built for baseline x86-64 (SSE2: 4 floats a step);
// each per-head kernel is also compiled for AVX2 + FMA (8 a step) as a LEET_AVX2 function,
// chosen at every call by use_avx2() (measured on an AVX2-only Zen 3 VM: the forward 10%
// faster, docs/methods.md). The helpers below are LEET_INLINE, so that each build of a
// kernel gets its own copy, in its own instructions (a call from an AVX2 function to a
// shared baseline helper would run baseline code).
#define LEET_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define LEET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LEET_HAS_AVX2_BUILD 1
#else
#define LEET_AVX2
#define LEET_HAS_AVX2_BUILD 0
#endif

// Whether the kernels take their AVX2 build: where the CPU has AVX2, FMA and F16C, unless
// LEET_CPU_ISA=baseline (read at every call, so that tests run both builds).
inline bool use_avx2() {
  const char* env = std::getenv("LEET_CPU_ISA");
  const bool baseline = env != nullptr && std::strcmp(env, "baseline") == 0;
  TORCH_CHECK_VALUE(env == nullptr || baseline || env[0] == '\0' || std::strcmp(env, "auto") == 0,
                    "LEET_CPU_ISA must be \"auto\" or \"baseline\", got \"", env, "\"");
#if LEET_HAS_AVX2_BUILD
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return cpu && !baseline;
#else
  return false;
#endif
}

// Chunk length, by measurement at B=1 H=8 T=4096 K=V=64: 32 beat 16, 48, 64 and 128
// (docs/methods.md). The backward uses the forward's, so that its weights are the same.
constexpr int64_t kChunk = 32;
// exp(-800) is exactly 0 in float64 and float32.
constexpr double kUnderflow = 800.0;

// The per-head log decay as the kernels use it: raised to -800 if below (exp(-800 d) is
// 0 for every d >= 1 either way, and -inf * 0 on the diagonal would be NaN).
LEET_INLINE double clamped_head_decay(double a) { return a < -kUnderflow ? -kUnderflow : a; }

// L[i], the cumulative log decay inside a chunk of c positions. Per position (a, not
// per_head): each entry first raised to -(800 + the chunk's positive sum) (as
// csrc/methods.cpp's safe_log_decay): weights through such an entry are exactly 0 either
// way, but -inf and -1e20 stop destroying the differences (inf - inf, or small decays
// lost after -1e20). NaN stays NaN. Per head (or no decay), ah already clamped:
// L_i = ah (i + 1).
LEET_INLINE void chunk_log_decay(const double* a, bool per_head, double ah, int64_t c, double* L) {
  if (a && !per_head) {
    double positive = 0;
    for (int64_t i = 0; i < c; ++i) positive += a[i] > 0 ? a[i] : 0.0;
    const double floor = -(kUnderflow + positive);
    double run = 0;
    for (int64_t i = 0; i < c; ++i) {
      run += a[i] < floor ? floor : a[i];
      L[i] = run;
    }
  } else {
    for (int64_t i = 0; i < c; ++i) L[i] = ah * (i + 1);
  }
}

// Whether every element of a rows x cols tile (row stride ld) is finite: an integer test
// of the exponent bits, which the compiler vectorizes (std::isfinite with an early exit
// it does not).
template <typename T>
LEET_INLINE bool all_finite(const T* p, int64_t ld, int64_t rows, int64_t cols) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U mask = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * ld;
#pragma omp simd reduction(| : bad)
    for (int64_t x = 0; x < cols; ++x) {
      U u;
      std::memcpy(&u, row + x, sizeof(U));
      bad |= (u & mask) == mask ? U(1) : U(0);
    }
  }
  return bad == 0;
}

// The bits of f rounded to bf16 (nearest even, NaN kept as a quiet NaN), in integer
// operations the compiler vectorizes (c10's conversion does not).
LEET_INLINE uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}

// Asks for rows x cols of a tile (row stride ld) to be brought into cache (Locality as
// __builtin_prefetch's: 2 for L2, 3 for L1 too): the next chunk's inputs while this one
// computes (their first reads otherwise stall).
template <int Locality = 2, typename T>
LEET_INLINE void prefetch_tile(const T* p, int64_t ld, int64_t rows, int64_t cols) {
  const int64_t bytes = cols * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(p + r * ld);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, Locality);
  }
}

// dst[x * ldd + r] = src[r * lds + x] for r < rows, x < cols. In 4 x 4 blocks with SSE for
// float (scalar stores of a transpose were a third of the kernels' non-GEMM time).
template <typename T>
LEET_INLINE void transpose(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t rows, int64_t cols) {
  int64_t r0 = 0;
#if defined(__SSE__)
  if constexpr (std::is_same_v<T, float>) {
    for (; r0 + 4 <= rows; r0 += 4) {
      int64_t x = 0;
      for (; x + 4 <= cols; x += 4) {
        __m128 a0 = _mm_loadu_ps(src + (r0 + 0) * lds + x), a1 = _mm_loadu_ps(src + (r0 + 1) * lds + x);
        __m128 a2 = _mm_loadu_ps(src + (r0 + 2) * lds + x), a3 = _mm_loadu_ps(src + (r0 + 3) * lds + x);
        _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
        _mm_storeu_ps(dst + (x + 0) * ldd + r0, a0);
        _mm_storeu_ps(dst + (x + 1) * ldd + r0, a1);
        _mm_storeu_ps(dst + (x + 2) * ldd + r0, a2);
        _mm_storeu_ps(dst + (x + 3) * ldd + r0, a3);
      }
      for (; x < cols; ++x) {
        for (int64_t r = r0; r < r0 + 4; ++r) dst[x * ldd + r] = src[r * lds + x];
      }
    }
  }
#endif
  for (int64_t r = r0; r < rows; ++r) {
    for (int64_t x = 0; x < cols; ++x) dst[x * ldd + r] = src[r * lds + x];
  }
}

}  // namespace leet::cpu
