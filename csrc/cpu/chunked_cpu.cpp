// The fast CPU path of decay_attn: the chunked method fused into one pass per
// (batch, head). Each chunk of C tokens costs four small matrix products on
// cache-resident tiles (Q K^T, (A * D) V, Q S, K^T V) and the state never leaves the
// thread. The products run on oneDNN's small-matrix kernel (brgemm) where torch has
// it, about 25% faster per call than BLAS at these sizes, else on BLAS.
// Inputs are read in place when their last dim is contiguous (permuted views of a
// fused qkv projection included); anything else is copied once. bf16 / fp16 inputs
// (where chunked_cpu_lowp.cpp does not take them) are converted to float32 a chunk at a
// time and the output back, with no full-size float32 copies. The chunk loop is built
// twice, for AVX2 and for baseline x86-64, and picked per call (chunk_common.h).
#include "../backends.h"
#include "chunk_common.h"
#include "small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace leet {
namespace {

using at::Tensor;
using cpu::kChunk;
using cpu::mm;

// A [B, H, T, D] view that GEMM can read in place: unit stride in D, rows of at least D.
Tensor gemm_ready(const Tensor& x, at::ScalarType dt) {
  auto y = x.to(dt);
  const bool rows_ok = y.size(2) == 1 || y.stride(2) >= y.size(3);
  return (y.stride(3) == 1 && rows_ok) ? y : y.contiguous();
}

int64_t row_stride(const Tensor& x) { return x.size(2) == 1 ? x.size(3) : x.stride(2); }

// One (b, h) of the problem: inputs rows of ld* elements (of In: T, or bf16 / fp16
// converted a chunk at a time), outputs contiguous.
template <typename T, typename In>
struct Head {
  const In *q, *k, *v;
  int64_t ldq, ldk, ldv;
  const double* a;  // this head's log decays ([T]: per position), or nullptr
  double ah;        // the per-head log decay, clamped (0 when none)
  const T* s0;      // initial state [K, V], or nullptr
  In* out;          // [T, V]
  T* state;         // [K, V]
  bool final_state; // whether the state after the last chunk is wanted
};

// A thread's scratch tiles, reused for every head it computes.
template <typename T>
struct Scratch {
  Scratch(int64_t C, int64_t K, int64_t V, bool convert)
      : attn(C * C), q_in(C * K), k_t(K * C), k_out(K * C), decay(C * C), g_out(C), g_in(C),
        q_f(convert ? C * K : 0), k_f(convert ? C * K : 0), v_f(convert ? C * V : 0), o_f(convert ? C * V : 0),
        pw(C + 1), L(C) {}
  // k_t: the chunk's K^T; k_out: (exp(L_end - L_j) k_j)^T, both [K, c]; decay: scale * D
  // for per-head (or no) decay; g_out[j] = exp(L_end - L_j), g_in[i] = scale exp(L_i).
  std::vector<T> attn, q_in, k_t, k_out, decay, g_out, g_in;
  // The chunk's q, k, v and o as T when the inputs are bf16 / fp16 (else unused).
  std::vector<T> q_f, k_f, v_f, o_f;
  // pw[d] = exp(ah d); L the chunk's cumulative log decay.
  std::vector<double> pw, L;
};

// bf16 <-> float32 a chunk at a time: a shift; rounding to nearest even, NaN kept.
LEET_INLINE void load_tile(float* dst, const at::BFloat16* src, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(src + r * ld);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst + r * cols);
    for (int64_t x = 0; x < cols; ++x) out[x] = static_cast<uint32_t>(row[x]) << 16;
  }
}

// fp16: the F16C instructions (8 at a time; c10's scalar conversions were slower than
// whole-tensor copies), the rest of a row with c10's. Only where the CPU has F16C.
#if defined(__x86_64__)
#define LEET_F16C __attribute__((target("avx,f16c")))
bool cpu_has_f16c() { return __builtin_cpu_supports("f16c"); }
#else
#define LEET_F16C
bool cpu_has_f16c() { return false; }
#endif

LEET_F16C void load_tile(float* dst, const at::Half* src, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const at::Half* row = src + r * ld;
    float* out = dst + r * cols;
    int64_t x = 0;
#if defined(__x86_64__)
    for (; x + 8 <= cols; x += 8) {
      _mm256_storeu_ps(out + x, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + x))));
    }
#endif
    for (; x < cols; ++x) out[x] = static_cast<float>(row[x]);
  }
}

LEET_F16C void store_tile(at::Half* dst, const float* src, int64_t n) {
  int64_t x = 0;
#if defined(__x86_64__)
  for (; x + 8 <= n; x += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + x), _mm256_cvtps_ph(_mm256_loadu_ps(src + x), _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; x < n; ++x) dst[x] = at::Half(src[x]);
}

LEET_INLINE void store_tile(at::BFloat16* dst, const float* src, int64_t n) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t x = 0; x < n; ++x) out[x] = cpu::bf16_bits(src[x]);
}

// The chunk loop of one head. Per chunk of c <= C positions, four small products on
// cache-resident tiles (Q K^T, (A * D) V, Q S, K^T V); the state never leaves the thread.
// (Built twice: forward_head below.)
template <typename T, typename In>
LEET_INLINE void forward_head_body(const Head<T, In>& p, int64_t T_len, int64_t K, int64_t V, int64_t C,
                                   double scale_d, Scratch<T>& w) {
  constexpr bool convert = !std::is_same_v<T, In>;
  const bool per_position = p.a != nullptr;
  T* S = p.state;
  bool has_state = p.s0 != nullptr;
  if (has_state) std::copy_n(p.s0, K * V, S);
  else std::fill_n(S, K * V, T(0));
  // A per-head (or no) decay makes every weight a power of exp(ah): scale * D[i, j] =
  // scale pw[i - j], the same causal C x C matrix for every chunk (its top-left c x c for
  // a shorter one), and g_out, g_in too.
  if (!per_position) {
    for (int64_t d = 0; d <= C; ++d) w.pw[d] = std::exp(p.ah * d);
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = 0; j < C; ++j) w.decay[i * C + j] = j <= i ? static_cast<T>(scale_d * w.pw[i - j]) : T(0);
    }
  }
  for (int64_t start = 0; start < T_len; start += C) {
    const int64_t c = std::min(C, T_len - start);
    const In* Qi = p.q + start * p.ldq;
    const In* Ki = p.k + start * p.ldk;
    const In* Vi = p.v + start * p.ldv;
    if (start + C < T_len) {  // the next chunk's rows, while this one computes
      const int64_t c_next = std::min(C, T_len - start - C);
      cpu::prefetch_tile(Qi + C * p.ldq, p.ldq, c_next, K);
      cpu::prefetch_tile(Ki + C * p.ldk, p.ldk, c_next, K);
      cpu::prefetch_tile(Vi + C * p.ldv, p.ldv, c_next, V);
    }
    const T *Qc, *Kc, *Vc;
    int64_t ldq = p.ldq, ldk = p.ldk, ldv = p.ldv;
    T* Oc;
    if constexpr (convert) {
      load_tile(w.q_f.data(), Qi, ldq, c, K);
      load_tile(w.k_f.data(), Ki, ldk, c, K);
      load_tile(w.v_f.data(), Vi, ldv, c, V);
      Qc = w.q_f.data(), Kc = w.k_f.data(), Vc = w.v_f.data(), Oc = w.o_f.data();
      ldq = K, ldk = K, ldv = V;
    } else {
      Qc = Qi, Kc = Ki, Vc = Vi, Oc = p.out + start * V;
    }
    double g_end;  // exp(L_end): the state's decay over the chunk
    if (per_position) {
      double* L = w.L.data();
      cpu::chunk_log_decay(p.a + start, false, 0.0, c, L);
      const double L_end = L[c - 1];
      for (int64_t i = 0; i < c; ++i) {
        w.g_out[i] = static_cast<T>(std::exp(L_end - L[i]));
        w.g_in[i] = static_cast<T>(scale_d * std::exp(L[i]));
      }
      g_end = std::exp(L_end);
    } else {
      for (int64_t i = 0; i < c; ++i) {
        w.g_out[i] = static_cast<T>(w.pw[c - 1 - i]);
        w.g_in[i] = static_cast<T>(scale_d * w.pw[i + 1]);
      }
      g_end = w.pw[c];
    }
    cpu::transpose(w.k_t.data(), c, Kc, ldk, c, K);
    // attn = scale * (Q K^T) * D, D[i, j] = exp(L_i - L_j) for j <= i, else 0.
    mm<T>(c, c, K, Qc, ldq, w.k_t.data(), c, w.attn.data(), c, false);
    for (int64_t i = 0; i < c; ++i) {
      T* row = w.attn.data() + i * c;
      if (!per_position) {
        const T* d = w.decay.data() + i * C;
        for (int64_t j = 0; j <= i; ++j) row[j] *= d[j];
      } else {
        const double* L = w.L.data();
        for (int64_t j = 0; j <= i; ++j) row[j] *= static_cast<T>(scale_d * std::exp(L[i] - L[j]));
      }
      // Masked, not multiplied by 0: a NaN key at j > i must not reach row i.
      std::fill(row + i + 1, row + c, T(0));
    }
    // O = attn V. A dense product would give 0 * NaN = NaN in row i for a non-finite
    // value at j > i; a chunk holding one takes the exactly causal row-by-row product.
    if (cpu::all_finite(Vc, ldv, c, V)) {
      mm<T>(c, V, c, w.attn.data(), c, Vc, ldv, Oc, V, false);
    } else {
      for (int64_t i = 0; i < c; ++i) mm<T>(1, V, i + 1, w.attn.data() + i * c, c, Vc, ldv, Oc + i * V, V, false);
    }
    // O += scale * exp(L_i) q_i S  (the state entering the chunk).
    if (has_state) {
      for (int64_t i = 0; i < c; ++i) {
        const T g = w.g_in[i];
        const T* src = Qc + i * ldq;
        T* dst = w.q_in.data() + i * K;
        for (int64_t x = 0; x < K; ++x) dst[x] = src[x] * g;
      }
      mm<T>(c, V, K, w.q_in.data(), K, S, V, Oc, V, true);
    }
    if constexpr (convert) store_tile(p.out + start * V, Oc, c * V);
    // S = exp(L_end) S + sum_j exp(L_end - L_j) k_j^T v_j (after the last chunk only when
    // the final state is asked for).
    if (start + c < T_len || p.final_state) {
      if (has_state) {
        const T g = static_cast<T>(g_end);
        for (int64_t x = 0; x < K * V; ++x) S[x] *= g;
      }
      for (int64_t x = 0; x < K; ++x) {
        const T* src = w.k_t.data() + x * c;
        T* dst = w.k_out.data() + x * c;
        for (int64_t j = 0; j < c; ++j) dst[j] = src[j] * w.g_out[j];
      }
      mm<T>(K, V, c, w.k_out.data(), c, Vc, ldv, S, V, has_state);
    }
    has_state = true;
  }
}

template <typename T, typename In>
LEET_AVX2 void forward_head_avx2(const Head<T, In>& p, int64_t T_len, int64_t K, int64_t V, int64_t C,
                                 double scale_d, Scratch<T>& w) {
  forward_head_body(p, T_len, K, V, C, scale_d, w);
}

template <typename T, typename In>
void forward_head(const Head<T, In>& p, int64_t T_len, int64_t K, int64_t V, int64_t C, double scale_d,
                  Scratch<T>& w, bool avx2) {
  if (avx2) forward_head_avx2(p, T_len, K, V, C, scale_d, w);
  else forward_head_body(p, T_len, K, V, C, scale_d, w);
}

template <typename T, typename In>
void chunked_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_decay,
                    const Tensor& s0, double scale_d, Tensor& out, Tensor& state, bool final_state) {
  const int64_t B = q.size(0), H = q.size(1), T_len = q.size(2), K = q.size(3), V = v.size(3);
  const int64_t C = std::min(kChunk, T_len);
  const double* a = log_decay.defined() ? log_decay.data_ptr<double>() : nullptr;
  const bool per_head = log_decay.defined() && log_decay.dim() == 1;
  const bool avx2 = cpu::use_avx2();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(C, K, V, !std::is_same_v<T, In>);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Head<T, In> p;
      p.q = q.data_ptr<In>() + b * q.stride(0) + h * q.stride(1);
      p.k = k.data_ptr<In>() + b * k.stride(0) + h * k.stride(1);
      p.v = v.data_ptr<In>() + b * v.stride(0) + h * v.stride(1);
      p.ldq = row_stride(q), p.ldk = row_stride(k), p.ldv = row_stride(v);
      p.a = a && !per_head ? a + bh * T_len : nullptr;
      p.ah = a && per_head ? cpu::clamped_head_decay(a[h]) : 0.0;
      p.s0 = s0.defined() ? s0.data_ptr<T>() + bh * K * V : nullptr;
      p.out = out.data_ptr<In>() + bh * T_len * V;
      p.state = state.data_ptr<T>() + bh * K * V;
      p.final_state = final_state;
      forward_head<T, In>(p, T_len, K, V, C, scale_d, scratch, avx2);
    }
    cpu::release_thread_gemm();
  });
}

}  // namespace

std::tuple<Tensor, Tensor> decay_attn_chunked_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, bool output_final_state) {
  // B * H below the thread count: segments of the sequence in parallel (chunked_cpu_split.cpp).
  if (auto split = decay_attn_chunked_cpu_split(q_in, k_in, v_in, log_decay, scale, initial_state, output_final_state)) {
    return *split;
  }
  // bf16 / fp16 inputs on the matrix units where this machine has them (chunked_cpu_lowp.cpp).
  if (auto lowp = decay_attn_chunked_cpu_lowp(q_in, k_in, v_in, log_decay, scale, initial_state, output_final_state)) {
    return *lowp;
  }
  const auto dt = compute_dtype(q_in, k_in, v_in);
  // bf16 or fp16 q, k, v (one dtype) are read as they are and converted a chunk at a time
  // (no float32 copies of the inputs or the output); other dtypes are copied to dt once.
  const auto half = q_in.scalar_type();
  const bool convert = (half == at::kBFloat16 || (half == at::kHalf && cpu_has_f16c())) && k_in.scalar_type() == half &&
                       v_in.scalar_type() == half && dt == at::kFloat;
  const auto in_dt = convert ? half : dt;
  auto q = gemm_ready(q_in, in_dt), k = gemm_ready(k_in, in_dt), v = gemm_ready(v_in, in_dt);
  Tensor a = log_decay.has_value() ? log_decay->to(at::kDouble).contiguous() : Tensor();
  Tensor s0 = initial_state.has_value() ? initial_state->to(dt).contiguous() : Tensor();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  auto out = new_output({B, H, T, V}, q.options());
  auto state = new_output({B, H, K, V}, q.options().dtype(dt));
  if (convert && half == at::kBFloat16) {
    chunked_kernel<float, at::BFloat16>(q, k, v, a, s0, scale, out, state, output_final_state);
  } else if (convert) {
    chunked_kernel<float, at::Half>(q, k, v, a, s0, scale, out, state, output_final_state);
  } else {
    AT_DISPATCH_FLOATING_TYPES(dt, "decay_attn_chunked_cpu", [&] {
      chunked_kernel<scalar_t, scalar_t>(q, k, v, a, s0, scale, out, state, output_final_state);
    });
  }
  return {out.to(v_in.scalar_type()), output_final_state ? state : at::empty({0}, state.options())};
}

namespace {

// The "cpu" row of the backend table (csrc/backends.cpp): the fused kernel, methods
// auto and chunked; auto takes the recurrent kernel for narrow values in float64
// (recurrent_cpu.cpp). Empty problems go to ATen (which gets their shapes right).
std::tuple<Tensor, Tensor> decay_attn_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, bool output_final_state, const std::string& method) {
  if (q.numel() == 0 || v.numel() == 0) {
    return decay_attn_aten(q, k, v, log_decay, scale, initial_state, output_final_state, "chunked");
  }
  if (method == "auto" && recurrent_cpu_applies(q, k, v)) {
    return decay_attn_recurrent_cpu(q, k, v, log_decay, scale, initial_state, output_final_state);
  }
  return decay_attn_chunked_cpu(q, k, v, log_decay, scale, initial_state, output_final_state);
}

const RegisterBackend kRegistered("cpu", &decay_attn_cpu);

}  // namespace

}  // namespace leet
