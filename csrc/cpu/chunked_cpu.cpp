// The fast CPU path of decay_attn: the chunked method fused into one pass per
// (batch, head). Each chunk of C tokens costs four small matrix products on
// cache-resident tiles (Q K^T, (A * D) V, Q S, K^T V) and the state never leaves the
// thread. The products run on oneDNN's small-matrix kernel (brgemm) where torch has
// it, about 25% faster per call than BLAS at these sizes, else on BLAS.
// Inputs are read in place when their last dim is contiguous (permuted views of a
// fused qkv projection included); anything else is copied once.
#include "../backends.h"
#include "small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace leet {
namespace {

using at::Tensor;
using cpu::mm;

// Chunk length, by measurement at B=1 H=8 T=4096 K=V=64: 32 beat 16, 48, 64 and 128
// (with BLAS on 2 threads, and again with brgemm on one thread; docs/methods.md).
constexpr int64_t kCpuChunk = 32;
// exp(-800) is exactly 0 in float64 and float32.
constexpr double kUnderflow = 800.0;

// A [B, H, T, D] view that GEMM can read in place: unit stride in D, rows of at least D.
Tensor gemm_ready(const Tensor& x, at::ScalarType dt) {
  auto y = x.to(dt);
  const bool rows_ok = y.size(2) == 1 || y.stride(2) >= y.size(3);
  return (y.stride(3) == 1 && rows_ok) ? y : y.contiguous();
}

int64_t row_stride(const Tensor& x) { return x.size(2) == 1 ? x.size(3) : x.stride(2); }

template <typename T>
void chunked_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_decay,
                    const Tensor& s0, double scale_d, Tensor& out, Tensor& state) {
  const int64_t B = q.size(0), H = q.size(1), T_len = q.size(2), K = q.size(3), V = v.size(3);
  const int64_t C = std::min(kCpuChunk, T_len);
  const T scale = static_cast<T>(scale_d);
  const double* a = log_decay.defined() ? log_decay.data_ptr<double>() : nullptr;
  const bool per_head = log_decay.defined() && log_decay.dim() == 1;
  const int64_t ldq = row_stride(q), ldk = row_stride(k), ldv = row_stride(v);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // k_t: this chunk's K^T; k_out: (exp(L_end - L_j) k_j)^T, both [K, c].
    std::vector<T> attn(C * C), q_in(C * K), k_t(K * C), k_out(K * C), decay(C * C);
    std::vector<double> L(C);  // cumulative log decay inside the chunk
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* Q = q.data_ptr<T>() + b * q.stride(0) + h * q.stride(1);
      const T* Kp = k.data_ptr<T>() + b * k.stride(0) + h * k.stride(1);
      const T* Vp = v.data_ptr<T>() + b * v.stride(0) + h * v.stride(1);
      T* O = out.data_ptr<T>() + bh * T_len * V;
      T* S = state.data_ptr<T>() + bh * K * V;
      bool has_state = s0.defined();
      if (has_state) std::copy_n(s0.data_ptr<T>() + bh * K * V, K * V, S);
      else std::fill_n(S, K * V, T(0));
      // A per-head (or no) decay makes scale * D[i, j] a function of i - j alone: the
      // same causal C x C matrix for every chunk (its top-left c x c for a shorter one).
      // The per-head decay, raised to -800 if below (exp(-800 k) is 0 for every k >= 1
      // either way, and -inf * 0 on the diagonal would be NaN).
      const double ah = !a ? 0.0 : (a[h] < -kUnderflow ? -kUnderflow : a[h]);
      if (!a || per_head) {
        for (int64_t i = 0; i < C; ++i) {
          for (int64_t j = 0; j < C; ++j) {
            decay[i * C + j] = j <= i ? static_cast<T>(scale_d * std::exp(ah * (i - j))) : T(0);
          }
        }
      }
      for (int64_t start = 0; start < T_len; start += C) {
        const int64_t c = std::min(C, T_len - start);
        const T* Qc = Q + start * ldq;
        const T* Kc = Kp + start * ldk;
        const T* Vc = Vp + start * ldv;
        T* Oc = O + start * V;
        // L: the cumulative log decay inside the chunk, each entry first raised to
        // -(800 + the chunk's positive sum) (as in csrc/methods.cpp, safe_log_decay):
        // weights through such an entry are exactly 0 either way, but -inf and -1e20
        // stop destroying the differences (inf - inf, or small decays lost after -1e20).
        if (a && !per_head) {
          const double* ac = a + bh * T_len + start;
          double positive = 0;
          for (int64_t i = 0; i < c; ++i) positive += ac[i] > 0 ? ac[i] : 0.0;
          const double floor = -(kUnderflow + positive);
          double run = 0;
          for (int64_t i = 0; i < c; ++i) {
            run += ac[i] < floor ? floor : ac[i];  // (NaN stays NaN)
            L[i] = run;
          }
        } else {
          for (int64_t i = 0; i < c; ++i) L[i] = ah * (i + 1);
        }
        const double L_end = L[c - 1];
        for (int64_t j = 0; j < c; ++j) {
          const T g = static_cast<T>(std::exp(L_end - L[j]));
          for (int64_t x = 0; x < K; ++x) {
            k_t[x * c + j] = Kc[j * ldk + x];
            k_out[x * c + j] = Kc[j * ldk + x] * g;
          }
        }
        // attn = scale * (Q K^T) * D, D[i, j] = exp(L_i - L_j) for j <= i, else 0.
        mm<T>(c, c, K, Qc, ldq, k_t.data(), c, attn.data(), c, false);
        for (int64_t i = 0; i < c; ++i) {
          T* row = attn.data() + i * c;
          if (a && !per_head) {
            for (int64_t j = 0; j <= i; ++j) row[j] *= static_cast<T>(scale_d * std::exp(L[i] - L[j]));
          } else {
            const T* d = decay.data() + i * C;
            for (int64_t j = 0; j <= i; ++j) row[j] *= d[j];
          }
          // Masked, not multiplied by 0: a NaN key at j > i must not reach row i.
          std::fill(row + i + 1, row + c, T(0));
        }
        // O = attn V. A dense product would give 0 * NaN = NaN in row i for a non-finite
        // value at j > i; a chunk holding one takes the exactly causal row-by-row product.
        bool finite_v = true;
        for (int64_t j = 0; j < c && finite_v; ++j) {
          for (int64_t x = 0; x < V; ++x) finite_v = finite_v && std::isfinite(Vc[j * ldv + x]);
        }
        if (finite_v) {
          mm<T>(c, V, c, attn.data(), c, Vc, ldv, Oc, V, false);
        } else {
          for (int64_t i = 0; i < c; ++i) mm<T>(1, V, i + 1, attn.data() + i * c, c, Vc, ldv, Oc + i * V, V, false);
        }
        // O += scale * exp(L_i) q_i S  (the state entering the chunk).
        if (has_state) {
          for (int64_t i = 0; i < c; ++i) {
            const T g = scale * static_cast<T>(std::exp(L[i]));
            for (int64_t x = 0; x < K; ++x) q_in[i * K + x] = Qc[i * ldq + x] * g;
          }
          mm<T>(c, V, K, q_in.data(), K, S, V, Oc, V, true);
        }
        // S = exp(L_end) S + sum_j exp(L_end - L_j) k_j^T v_j.
        if (has_state) {
          const T g = static_cast<T>(std::exp(L_end));
          for (int64_t x = 0; x < K * V; ++x) S[x] *= g;
        }
        mm<T>(K, V, c, k_out.data(), c, Vc, ldv, S, V, has_state);
        has_state = true;
      }
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
  auto q = gemm_ready(q_in, dt), k = gemm_ready(k_in, dt), v = gemm_ready(v_in, dt);
  Tensor a = log_decay.has_value() ? log_decay->to(at::kDouble).contiguous() : Tensor();
  Tensor s0 = initial_state.has_value() ? initial_state->to(dt).contiguous() : Tensor();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  auto out = new_output({B, H, T, V}, q.options());
  auto state = new_output({B, H, K, V}, q.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "decay_attn_chunked_cpu", [&] {
    chunked_kernel<scalar_t>(q, k, v, a, s0, scale, out, state);
  });
  return {out.to(v_in.scalar_type()), output_final_state ? state : at::empty({0}, state.options())};
}

namespace {

// The "cpu" row of the backend table (csrc/backends.cpp): the fused kernel, methods
// auto and chunked. Empty problems go to ATen (which gets their shapes right).
std::tuple<Tensor, Tensor> decay_attn_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, bool output_final_state, const std::string& /*method*/) {
  if (q.numel() == 0 || v.numel() == 0) {
    return decay_attn_aten(q, k, v, log_decay, scale, initial_state, output_final_state, "chunked");
  }
  return decay_attn_chunked_cpu(q, k, v, log_decay, scale, initial_state, output_final_state);
}

const RegisterBackend kRegistered("cpu", &decay_attn_cpu);

}  // namespace

}  // namespace leet
