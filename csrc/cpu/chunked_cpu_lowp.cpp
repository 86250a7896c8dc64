// The fused CPU chunked kernel for bf16 / fp16 inputs on the CPU's bf16 / fp16 units
// (AMX for both, AVX512-BF16 for bf16; small_gemm.h's cpu_has_lowp_units):
// q, k, v are read as they are (no float32 copies), the four products of each chunk
// (Q K^T, (A * D) V, Q S, K^T V) run as bf16 x bf16 -> float32 brgemm calls (the
// products of csrc/cpu/small_gemm.h's mm_vnni), and everything else stays in float32:
// the decay, the accumulated output and the state S.
//
// What is rounded to the input dtype, as bf16 attention kernels do: the masked, decayed
// scores A * D before they multiply V, the decayed keys exp(L_end - L_j) k_j before they
// update S, and a copy of S before Q S (measured against the float64 reference: the
// error stays within the bound tests/test_cpu_lowp.py checks, twice the error of torch's
// own ((q @ k^T) * mask) @ v in bf16).
//
// Where this path does not apply (other dtypes, mixed dtypes, no such units in this CPU,
// no brgemm in this torch or torch.backends.mkldnn off, or LEET_CPU_BF16=0 in the
// environment at call time) the caller takes the float32 kernel (csrc/cpu/chunked_cpu.cpp),
// which converts bf16 / fp16 inputs a chunk at a time.
#include "../decay_attn.h"
#include "chunk_common.h"
#include "small_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace leet {
namespace {

using at::Tensor;
using cpu::even;
using cpu::mm_vnni;
using cpu::vnni_size;

// Same chunk length and underflow rule as the float32 kernel (chunk_common.h).
using cpu::kChunk;

// float -> bf16 rounded to nearest even, NaN kept (chunk_common.h's bf16_bits); fp16
// takes c10's.
template <typename T>
inline T to_lowp(float f) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return at::BFloat16(cpu::bf16_bits(f), at::BFloat16::from_bits());
  } else {
    return T(f);
  }
}

// The per-head loop is compiled for AVX-512 (its scalar parts, packing, conversions and
// the decay, cost more than the matrix products at these sizes); it only runs on CPUs
// with bf16 / fp16 units, which all have AVX-512 (lowp_cpu_ok checks it too).
#define LEET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

bool lowp_cpu_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

// The hot conversions and packings below work on the 16-bit patterns (uint16_t /
// uint32_t pairs), which the compiler vectorizes; they produce the layout of the generic
// pack_vnni (small_gemm.h), whose per-element callback does not vectorize.
template <typename T>
inline const uint16_t* bits_of(const T* p) { return reinterpret_cast<const uint16_t*>(p); }
template <typename T>
inline uint16_t* bits_of(T* p) { return reinterpret_cast<uint16_t*>(p); }

// Whether any of rows x n values (row stride ld) is inf or NaN.
template <typename T>
LEET_AVX512 bool any_non_finite(const T* x, int64_t rows, int64_t n, int64_t ld) {
  constexpr uint16_t exp_mask = std::is_same_v<T, at::BFloat16> ? 0x7f80 : 0x7c00;
  uint16_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = bits_of(x) + r * ld;
    for (int64_t j = 0; j < n; ++j) bad |= static_cast<uint16_t>((row[j] & exp_mask) == exp_mask);
  }
  return bad != 0;
}

// pack_vnni of a row-major [k, n] block of 16-bit values (row stride ld): each output
// word is the pair (row r, row r + 1) of one column.
template <typename T>
LEET_AVX512 void pack_rows(const T* src, int64_t ld, int64_t k, int64_t n, T* dst) {
  const int64_t ke = even(k);
  for (int64_t p0 = 0; p0 < n; p0 += cpu::kVnniPanel) {
    const int64_t w = std::min(cpu::kVnniPanel, n - p0), ldb = (w + 15) / 16 * 16;
    for (int64_t r = 0; r < k; r += 2) {
      uint32_t* out = reinterpret_cast<uint32_t*>(dst + ke * p0 + r * ldb);
      const uint16_t* lo = bits_of(src) + r * ld + p0;
      const uint16_t* hi = lo + ld;
      if (r + 1 < k) {
        for (int64_t j = 0; j < w; ++j) out[j] = lo[j] | (static_cast<uint32_t>(hi[j]) << 16);
      } else {
        for (int64_t j = 0; j < w; ++j) out[j] = lo[j];  // odd k: a zero padding row
      }
    }
  }
}

// pack_vnni of a row-major float32 [k, n] matrix (the state), rounded to bf16 / fp16,
// and in the same pass src *= g (the state's decay over the chunk, applied after it is
// read for Q S).
template <typename T>
LEET_AVX512 void pack_rows_rounded_then_scale(float* src, int64_t k, int64_t n, T* dst, float g) {
  const int64_t ke = even(k);
  for (int64_t p0 = 0; p0 < n; p0 += cpu::kVnniPanel) {
    const int64_t w = std::min(cpu::kVnniPanel, n - p0), ldb = (w + 15) / 16 * 16;
    for (int64_t r = 0; r < k; r += 2) {
      uint32_t* out = reinterpret_cast<uint32_t*>(dst + ke * p0 + r * ldb);
      float* lo = src + r * n + p0;
      if (r + 1 < k) {
        float* hi = lo + n;
        for (int64_t j = 0; j < w; ++j) {
          out[j] = to_lowp<T>(lo[j]).x | (static_cast<uint32_t>(to_lowp<T>(hi[j]).x) << 16);
          lo[j] *= g;
          hi[j] *= g;
        }
      } else {
        for (int64_t j = 0; j < w; ++j) {
          out[j] = to_lowp<T>(lo[j]).x;
          lo[j] *= g;
        }
      }
    }
  }
}

#if defined(__x86_64__)
// In place: r[i] = column i of the 16 x 16 matrix of 32-bit words whose row j was r[j].
LEET_AVX512 inline void transpose16x16_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int m = 0; m < 4; ++m) {
      t[8 * i + m] = _mm512_shuffle_i32x4(r[8 * i + m], r[8 * i + 4 + m], 0x88);
      t[8 * i + 4 + m] = _mm512_shuffle_i32x4(r[8 * i + m], r[8 * i + 4 + m], 0xdd);
    }
  }
  for (int m = 0; m < 8; ++m) {
    r[m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0x88);
    r[8 + m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0xdd);
  }
}

// 16 floats rounded to bf16 as to_lowp does (nearest even, NaN kept as 0x7fc0).
LEET_AVX512 inline __m256i round_to_bf16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
#endif

// pack_vnni of K^T for a row-major [c, K] block of keys (row stride ld): the pair
// (x, x + 1) of column j is one 32-bit word of key row j, so the packing is a transpose
// of 32-bit words, in 16 x 16 blocks in registers (the rest word by word). Key rows are
// read in order (their first read).
template <typename T>
LEET_AVX512 void pack_transposed(const T* src, int64_t ld, int64_t c, int64_t K, T* dst) {
  const int64_t ldb = (c + 15) / 16 * 16;  // c <= 32: one panel
  const int64_t words = K / 2;
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  int64_t jv = 0, xv = 0;  // rows and words done in blocks
#if defined(__x86_64__)
  jv = c / 16 * 16, xv = words / 16 * 16;
  for (int64_t j0 = 0; j0 < jv; j0 += 16) {
    for (int64_t x0 = 0; x0 < xv; x0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(bits_of(src) + (j0 + i) * ld + 2 * x0);
      transpose16x16_words(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (x0 + i) * ldb + j0, r[i]);
    }
  }
#endif
  for (int64_t j = 0; j < c; ++j) {
    const uint16_t* row = bits_of(src) + j * ld;
    for (int64_t x = j < jv ? xv : 0; x < words; ++x) {
      uint32_t word;
      std::memcpy(&word, row + 2 * x, sizeof(word));
      out[x * ldb + j] = word;
    }
    if (K % 2) out[words * ldb + j] = row[K - 1];  // odd K: a zero padding row
  }
}

// k_out[x, j] = g[j] k_j[x] rounded ([K, c], row stride ce): the decayed keys as the A
// operand of the state update, read from K^T as pack_transposed left it in k_p (words
// (k_j[2x'], k_j[2x' + 1]) in row x'), so that the keys are not read again.
template <typename T>
LEET_AVX512 void decayed_keys_transposed(const T* k_p, int64_t c, int64_t K, const float* g, T* k_out, int64_t ce) {
  const int64_t ldb = (c + 15) / 16 * 16;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(k_p);
  if constexpr (std::is_same_v<T, at::BFloat16>) {
#if defined(__x86_64__)
    for (int64_t j0 = 0; j0 < c; j0 += 16) {
      const __mmask16 m = c - j0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (c - j0)) - 1);
      const __m512 gj = _mm512_maskz_loadu_ps(m, g + j0);
      for (int64_t x = 0; x < K; x += 2) {
        const __m512i word = _mm512_maskz_loadu_epi32(m, w + (x / 2) * ldb + j0);
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(word, 16));
        _mm256_mask_storeu_epi16(bits_of(k_out) + x * ce + j0, m, round_to_bf16(_mm512_mul_ps(lo, gj)));
        if (x + 1 < K) {
          const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(word, _mm512_set1_epi32(int(0xffff0000u))));
          _mm256_mask_storeu_epi16(bits_of(k_out) + (x + 1) * ce + j0, m, round_to_bf16(_mm512_mul_ps(hi, gj)));
        }
      }
    }
    return;
#endif
  }
  for (int64_t x = 0; x < K; ++x) {
    for (int64_t j = 0; j < c; ++j) {
      const uint16_t half = static_cast<uint16_t>(w[(x / 2) * ldb + j] >> (16 * (x % 2)));
      k_out[x * ce + j] = to_lowp<T>(g[j] * static_cast<float>(T(half, T::from_bits())));
    }
  }
}

// A [B, H, T, D] view brgemm can read in place: unit stride in D, rows of at least D.
Tensor lowp_ready(const Tensor& x) {
  const bool rows_ok = x.size(2) == 1 || x.stride(2) >= x.size(3);
  return (x.stride(3) == 1 && rows_ok) ? x : x.contiguous();
}

int64_t row_stride(const Tensor& x) { return x.size(2) == 1 ? x.size(3) : x.stride(2); }

// What every (batch, head) reads: pointers, sizes and strides of one call.
template <typename T>
struct Problem {
  const T *q, *k, *v;
  const double* a;  // log decay (float64), or null
  const float* s0;  // initial state, or null
  T* out;
  float* state;
  bool per_head;
  double scale;
  int64_t H, T_len, K, V, C, ldq, ldk, ldv;
  int64_t q_b, q_h, k_b, k_h, v_b, v_h;  // batch and head strides
};

// One thread's work tiles, reused for every (batch, head) it takes.
template <typename T>
struct Tiles {
  // Packed B operands (VNNI-2): k_p = this chunk's K^T [K, c], v_p = V [c, V], s_p = S [K, V].
  std::vector<T> k_p, v_p, s_p;
  // A operands: q_pad = Q with a zero column when K is odd (the reduction is padded to
  // even), attn_lp = rounded A * D [c, even(c)], k_out = (exp(L_end - L_j) k_j)^T
  // [K, even(c)]; their padding columns are zero.
  std::vector<T> q_pad, attn_lp, k_out;
  // g_k[j] = exp(L_end - L_j), g_in[i] = scale exp(L_i).
  std::vector<float> attn, o_acc, qs, decay, g_k, g_in;
  std::vector<double> L, pw;  // the chunk's cumulative log decay; pw[d] = exp(ah d)
  explicit Tiles(const Problem<T>& p)
      : k_p(vnni_size(p.K, p.C)), v_p(vnni_size(p.C, p.V)), s_p(vnni_size(p.K, p.V)),
        q_pad(p.K % 2 ? p.C * even(p.K) : 0, T(0)), attn_lp(p.C * even(p.C), T(0)), k_out(p.K * even(p.C), T(0)),
        attn(p.C * p.C), o_acc(p.C * p.V), qs(p.C * p.V), decay(p.C * p.C), g_k(p.C), g_in(p.C), L(p.C), pw(p.C + 1) {}
};

template <typename T>
LEET_AVX512 void lowp_head(const Problem<T>& p, Tiles<T>& t, int64_t bh) {
  const int64_t H = p.H, T_len = p.T_len, K = p.K, V = p.V, C = p.C, Ke = even(K), Ce = even(C);
  const int64_t ldq = p.ldq, ldk = p.ldk, ldv = p.ldv;
  const double* a = p.a;
  const bool per_head = p.per_head;
  const double scale_d = p.scale;
  const int64_t b = bh / H, h = bh % H;
  const T* Q = p.q + b * p.q_b + h * p.q_h;
  const T* Kp = p.k + b * p.k_b + h * p.k_h;
  const T* Vp = p.v + b * p.v_b + h * p.v_h;
  T* O = p.out + bh * T_len * V;
  float* S = p.state + bh * K * V;
  T *k_p = t.k_p.data(), *v_p = t.v_p.data(), *s_p = t.s_p.data();
  T *q_pad = t.q_pad.data(), *attn_lp = t.attn_lp.data(), *k_out = t.k_out.data();
  float *attn = t.attn.data(), *o_acc = t.o_acc.data(), *qs = t.qs.data(), *decay = t.decay.data();
  float *g_k = t.g_k.data(), *g_in = t.g_in.data();
  double *L = t.L.data(), *pw = t.pw.data();
  bool has_state = p.s0 != nullptr;
  if (has_state) std::copy_n(p.s0 + bh * K * V, K * V, S);
  // Per-head (or no) decay: scale * D[i, j] depends on i - j only (chunked_cpu.cpp).
  const double ah = !a ? 0.0 : cpu::clamped_head_decay(a[h]);
  // Its powers, once per head: no exp per chunk (as in chunked_cpu.cpp).
  const bool per_position = a && !per_head;
  if (!per_position) {
    for (int64_t d = 0; d <= C; ++d) pw[d] = std::exp(ah * d);
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        decay[i * C + j] = j <= i ? static_cast<float>(scale_d * pw[i - j]) : 0.0f;
      }
    }
  }
  for (int64_t start = 0; start < T_len; start += C) {
    const int64_t c = std::min(C, T_len - start), ce = even(c);
    const T* Qc = Q + start * ldq;
    const T* Kc = Kp + start * ldk;
    const T* Vc = Vp + start * ldv;
    T* Oc = O + start * V;
    if (start + C < T_len) {  // the next chunk's rows, while this one computes
      const int64_t c_next = std::min(C, T_len - start - C);
      cpu::prefetch_tile(Qc + C * ldq, ldq, c_next, K);
      cpu::prefetch_tile(Kc + C * ldk, ldk, c_next, K);
      cpu::prefetch_tile(Vc + C * ldv, ldv, c_next, V);
    }
    cpu::chunk_log_decay(per_position ? a + bh * T_len + start : nullptr, per_head, ah, c, L);
    const double L_end = L[c - 1];
    double g_end;  // exp(L_end): the state's decay over the chunk
    if (per_position) {
      for (int64_t i = 0; i < c; ++i) {
        g_in[i] = static_cast<float>(scale_d * std::exp(L[i]));
        g_k[i] = static_cast<float>(std::exp(L_end - L[i]));
      }
      g_end = std::exp(L_end);
    } else {
      for (int64_t i = 0; i < c; ++i) {
        g_in[i] = static_cast<float>(scale_d * pw[i + 1]);
        g_k[i] = static_cast<float>(pw[c - 1 - i]);
      }
      g_end = pw[c];
    }
    // Q as brgemm's A: in place, or padded with a zero column for an odd K.
    const T* Qa = Qc;
    int64_t lda = ldq;
    if (K % 2) {
      for (int64_t i = 0; i < c; ++i) std::copy_n(Qc + i * ldq, K, q_pad + i * Ke);
      Qa = q_pad;
      lda = Ke;
    }
    // attn = Q K^T (float32), then scale * D and the causal mask, rounded for the product.
    pack_transposed(Kc, ldk, c, K, k_p);
    mm_vnni<T>(c, c, K, Qa, lda, k_p, attn, c, false);
    for (int64_t i = 0; i < c; ++i) {
      float* row = attn + i * c;
      T* row_lp = attn_lp + i * Ce;
      if (per_position) {
        for (int64_t j = 0; j <= i; ++j) row[j] *= static_cast<float>(scale_d * std::exp(L[i] - L[j]));
      } else {
        const float* d = decay + i * C;
        for (int64_t j = 0; j <= i; ++j) row[j] *= d[j];
      }
      // Masked, not multiplied by 0: a NaN key at j > i must not reach row i.
      for (int64_t j = 0; j <= i; ++j) row_lp[j] = to_lowp<T>(row[j]);
      std::fill(row_lp + i + 1, row_lp + ce, T(0));
    }
    // O = attn V. V is packed once for this product and the state update. A chunk
    // holding a non-finite value takes the exactly causal row-by-row sum instead (a
    // dense product gives 0 * NaN = NaN in row i for a NaN at j > i).
    const bool bad_v = any_non_finite(Vc, c, V, ldv);
    pack_rows(Vc, ldv, c, V, v_p);
    if (!bad_v) {
      mm_vnni<T>(c, V, c, attn_lp, Ce, v_p, o_acc, V, false);
    } else {
      for (int64_t i = 0; i < c; ++i) {
        float* o = o_acc + i * V;
        std::fill_n(o, V, 0.0f);
        for (int64_t j = 0; j <= i; ++j) {
          const float w = static_cast<float>(attn_lp[i * Ce + j]);
          for (int64_t y = 0; y < V; ++y) o[y] += w * static_cast<float>(Vc[j * ldv + y]);
        }
      }
    }
    // O += scale * exp(L_i) q_i S (the state entering the chunk), the factor applied to
    // the float32 product rather than rounded into q.
    if (has_state) {
      // (S is scaled by exp(L_end) for the update below in the same pass)
      pack_rows_rounded_then_scale(S, K, V, s_p, static_cast<float>(g_end));
      mm_vnni<T>(c, V, K, Qa, lda, s_p, qs, V, false);
      for (int64_t i = 0; i < c; ++i) {
        const float g = g_in[i];
        for (int64_t y = 0; y < V; ++y) o_acc[i * V + y] += g * qs[i * V + y];
      }
    }
    for (int64_t x = 0; x < c * V; ++x) Oc[x] = to_lowp<T>(o_acc[x]);
    // S = exp(L_end) S + sum_j exp(L_end - L_j) k_j^T v_j.
    // (S *= exp(L_end) happened in pack_rows_rounded_then_scale)
    decayed_keys_transposed(k_p, c, K, g_k, k_out, Ce);
    for (int64_t x = 0; x < K && c % 2; ++x) k_out[x * Ce + c] = T(0);
    mm_vnni<T>(K, V, c, k_out, Ce, v_p, S, V, has_state);
    has_state = true;
  }
}

template <typename T>
void lowp_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_decay, const Tensor& s0,
                 double scale, Tensor& out, Tensor& state) {
  Problem<T> p;
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.v = v.data_ptr<T>();
  p.a = log_decay.defined() ? log_decay.data_ptr<double>() : nullptr;
  p.s0 = s0.defined() ? s0.data_ptr<float>() : nullptr;
  p.out = out.data_ptr<T>();
  p.state = state.data_ptr<float>();
  p.per_head = log_decay.defined() && log_decay.dim() == 1;
  p.scale = scale;
  p.H = q.size(1), p.T_len = q.size(2), p.K = q.size(3), p.V = v.size(3);
  p.C = std::min(kChunk, p.T_len);
  p.ldq = row_stride(q), p.ldk = row_stride(k), p.ldv = row_stride(v);
  p.q_b = q.stride(0), p.q_h = q.stride(1), p.k_b = k.stride(0), p.k_h = k.stride(1);
  p.v_b = v.stride(0), p.v_h = v.stride(1);
  at::parallel_for(0, q.size(0) * p.H, 1, [&](int64_t begin, int64_t end) {
    Tiles<T> tiles(p);
    for (int64_t bh = begin; bh < end; ++bh) lowp_head<T>(p, tiles, bh);
    cpu::release_thread_gemm_vnni();
  });
}

// LEET_CPU_BF16=0 turns this path off (read at every call, so tests can run both paths).
bool lowp_enabled() {
  const char* env = std::getenv("LEET_CPU_BF16");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

}  // namespace

std::optional<std::tuple<Tensor, Tensor>> decay_attn_chunked_cpu_lowp(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& log_decay,
    double scale, const std::optional<Tensor>& initial_state, bool output_final_state) {
  const auto dt = q_in.scalar_type();
  if (k_in.scalar_type() != dt || v_in.scalar_type() != dt) return std::nullopt;
  if (dt != at::kBFloat16 && dt != at::kHalf) return std::nullopt;
  if (!lowp_enabled() || !lowp_cpu_ok()) return std::nullopt;
  if (dt == at::kBFloat16 ? !cpu::lowp_usable<at::BFloat16>() : !cpu::lowp_usable<at::Half>()) return std::nullopt;
  auto q = lowp_ready(q_in), k = lowp_ready(k_in), v = lowp_ready(v_in);
  Tensor a = log_decay.has_value() ? log_decay->to(at::kDouble).contiguous() : Tensor();
  Tensor s0 = initial_state.has_value() ? initial_state->to(at::kFloat).contiguous() : Tensor();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  auto out = new_output({B, H, T, V}, v.options());
  auto state = new_output({B, H, K, V}, v.options().dtype(at::kFloat));
  if (dt == at::kBFloat16) lowp_kernel<at::BFloat16>(q, k, v, a, s0, scale, out, state);
  else lowp_kernel<at::Half>(q, k, v, a, s0, scale, out, state);
  return std::make_tuple(out, output_final_state ? state : at::empty({0}, state.options()));
}

}  // namespace leet
