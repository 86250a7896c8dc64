// The fused backward of the CPU chunked kernel: leet::_decay_attn_backward.
//
// Per (batch, head), with o_t = s q_t S_t, S_t = exp(a_t) S_{t-1} + k_t^T v_t (DESIGN.md)
// and G_t = dLoss/dS_t (the adjoint state: G_{T-1} = grad_state, and
// G_{t-1} = exp(a_t) G_t + s q_t^T dO_t going back in time):
//   dq_t = s dO_t S_t^T,   dk_t = v_t G_t^T,   dv_t = k_t G_t,   d initial_state = G_{-1},
// and with L the cumulative log decay, dLoss/dL_t = q_t.dq_t - k_t.dk_t (+ <grad_state,
// S_{T-1}> at t = T-1), so d a_t = sum_{i >= t} dLoss/dL_i (the rule ops/decay_attn.py
// used before this kernel, kept so that both agree edge case for edge case).
//
// Two sweeps over the sequence in chunks of C, as the forward:
//   1. forward in time: the state entering every chunk, kept (transposed) with the
//      chunk's K, (T / C) (V + C) K values per thread: linear in T, no T x T buffer;
//      one K^T V product per chunk;
//   2. backward in time, carrying G: per chunk the scores A = s (K Q^T) * D and
//      dA = s (V dO^T) * D (D the causal decay, kept transposed: row j, column i >= j)
//      give, with the states, every gradient:
//        dq = (s e^L dO) S^T + dA^T K           dk = e^(L_end - L) V G^T + dA Q
//        dv = e^(L_end - L) K G + A dO           G <- e^L_end G + Q^T (s e^L dO)
//      (each gradient one product over a stacked inner dimension; see backward_kernel).
// FLOPs: the forward's products twice (the lower bound for a backward) plus the
// recomputed K Q^T and K^T V, 2.5x the forward's at K = V = 64, C = 32. In practice this
// kernel is bound as much by reading its inputs and writing three gradients as by its
// products (benchmarks/bench_backward_cpu.py).
// Inputs of any dtype and strides are read a chunk tile at a time into float32 (float64
// for float64) tiles, in place where they already are float32 rows, so half inputs need
// no full-tensor float32 copies; no flipped copies. Built twice, for AVX2 and for
// baseline x86-64, and picked per call (chunk_common.h).
#include "../decay_attn.h"
#include "chunk_common.h"
#include "small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace leet {
namespace {

using at::Tensor;
using cpu::all_finite;
using cpu::chunk_log_decay;
using cpu::mm;
using cpu::transpose;

// The forward's chunk length: the same chunking makes the clamped cumulative log
// decays, hence the weights, the forward's.
using cpu::kChunk;

// One (b, h) slice of a [B, H, T, D] input: element (t, x) at p[t * st + x * sx].
template <typename In>
struct Slice {
  const In* p;
  int64_t st, sx;
};

template <typename In>
Slice<In> slice(const Tensor& x, int64_t b, int64_t h) {
  return {x.data_ptr<In>() + b * x.stride(0) + h * x.stride(1), x.stride(2), x.stride(3)};
}

// A [rows, cols] chunk tile of an input as T: row r at p + r * ld.
template <typename T>
struct Tile {
  const T* p;
  int64_t ld;
  const T* row(int64_t r) const { return p + r * ld; }
};

// dst[r, x] = src(t0 + r, x) as T ([rows, cols], row-major).
template <typename T, typename In>
LEET_INLINE void load_rows(T* dst, const Slice<In>& src, int64_t t0, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const In* row = src.p + (t0 + r) * src.st;
    T* out = dst + r * cols;
    if (src.sx == 1) {
      for (int64_t x = 0; x < cols; ++x) out[x] = static_cast<T>(row[x]);
    } else {
      for (int64_t x = 0; x < cols; ++x) out[x] = static_cast<T>(row[x * src.sx]);
    }
  }
}

// The tile of rows t0.. of `src`: read in place when the input is already T with unit
// inner stride and non-overlapping rows (what GEMM can read), else converted into `buf`.
// (The per-element work of this kernel is as costly as its products: copies count.)
template <typename T, typename In>
LEET_INLINE Tile<T> tile(const Slice<In>& src, int64_t t0, int64_t rows, int64_t cols, T* buf) {
  if constexpr (std::is_same_v<T, In>) {
    if (src.sx == 1 && (rows == 1 || src.st >= cols)) return {src.p + t0 * src.st, rows == 1 ? cols : src.st};
  }
  load_rows(buf, src, t0, rows, cols);
  return {buf, cols};
}

// Asks for rows t0.. of `src` to be brought into cache while this chunk computes: the
// backward sweep walks the sequence from its end, which the hardware prefetchers follow
// poorly (each chunk is a jump back), and the kernel is otherwise bound by these reads.
template <typename In>
LEET_INLINE void prefetch_rows(const Slice<In>& src, int64_t t0, int64_t rows, int64_t cols) {
  const int64_t span = src.sx == 1 ? cols : (cols - 1) * src.sx + 1;  // elements a row covers
  cpu::prefetch_tile<3>(src.p + t0 * src.st, src.st, rows, span);
}

// sum_x a[x] b[x] - c[x] d[x] (a vectorized reduction: the order of a float sum is free here).
template <typename T>
LEET_INLINE T dot_diff(const T* a, const T* b, const T* c, const T* d, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t x = 0; x < n; ++x) acc += a[x] * b[x] - c[x] * d[x];
  return acc;
}

template <typename T, typename In>
LEET_INLINE void store_rows(In* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<In>(src[i]);
}

struct Args {
  Tensor grad_o, q, k, v;  // inputs, one dtype (In), any strides
  Tensor a;                // log decay as float64, contiguous ([H] or [B, H, T]), or undefined
  Tensor s0, d_sf;         // initial state, grad of the final state: [B, H, K, V] in T, or undefined
  double scale;
  Tensor dq, dk, dv;       // outputs in In, contiguous
  Tensor da;               // [B, H, T] (per-position decay) or [B, H] (per-head) in T, or undefined
  Tensor ds0;              // [B, H, K, V] in T, or undefined
};

// The heads begin..end of the backward (one thread's share). Built twice: backward_heads below.
template <typename T, typename In>
LEET_INLINE void backward_heads_body(const Args& g, int64_t begin, int64_t end) {
  const int64_t B = g.q.size(0), H = g.q.size(1), T_len = g.q.size(2), K = g.q.size(3), V = g.v.size(3);
  const int64_t C = std::min(kChunk, T_len), n_chunks = (T_len + C - 1) / C;
  const double* a = g.a.defined() ? g.a.data_ptr<double>() : nullptr;
  const bool per_head = a && g.a.dim() == 1;
  const double s = g.scale;
  // float32 (float64) gradients are computed in place in the outputs; others via tiles.
  constexpr bool direct_out = std::is_same_v<T, In>;

  // The products that share an output are stacked along their inner dimension, one
  // call each (fewer, larger calls: brgemm's per-call cost and the output's loads and
  // stores are paid once):
  //   dq = [s e^L dO | dA] x [S^T ; K]     dk = [e^(L_end - L) V | dA^T] x [G^T ; Q]
  //   dv = [e^(L_end - L) K | A^T] x [G ; dO]
  // so the operands live in stacked buffers: slot n of `state` is [S^T of chunk n (V rows);
  // chunk n's K (C rows)], rk = [G^T ; Q], rv = [G ; dO], and lq, lk, lv the left sides.
  const int64_t slot = (V + C) * K;
  // (Not zero-filled: every element is written before it is read.)
  std::unique_ptr<T[]> state(new T[n_chunks * slot]);
  std::vector<char> finite_k(n_chunks);
  std::vector<T> sf(V * K), v_buf(C * V), q_t(K * C), v_t(V * C), do_t(V * C), k_s(C * K);
  std::vector<T> lq(C * (V + C)), lk(C * (V + C)), lv(C * (K + C)), rk((V + C) * K), rv((K + C) * V);
  std::vector<T> D(C * C), dq_buf(C * K), dk_buf(C * K), dv_buf(C * V), table(C);
  std::vector<double> L(C), e_out(C);
  T* G = rv.data();  // the carried gradient of the state, [K, V], on top of rv
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const auto Qs = slice<In>(g.q, b, h), Ks = slice<In>(g.k, b, h), Vs = slice<In>(g.v, b, h);
    const auto dOs = slice<In>(g.grad_o, b, h);
    const double* ab = a ? (per_head ? a : a + bh * T_len) : nullptr;
    const double ah = !a ? 0.0 : (per_head ? cpu::clamped_head_decay(a[h]) : 0.0);
    // s * e^(ah d) for d = i - j: D of every chunk for per-head (or no) decay.
    for (int64_t d = 0; d < C; ++d) table[d] = static_cast<T>(s * std::exp(ah * d));

    // ---- sweep 1, forward in time: the state entering each chunk, and the chunk's K.
    const bool has_s0 = g.s0.defined();
    if (has_s0) {
      transpose(state.get(), K, g.s0.data_ptr<T>() + bh * K * V, V, K, V);
    } else {
      std::fill_n(state.get(), V * K, T(0));  // dq's state term is then 0 in chunk 0
    }
    // The final state is needed only for the log decay's <grad_state, S_{T-1}> term.
    const bool need_sf = g.da.defined() && g.d_sf.defined();
    for (int64_t n = 0; n < n_chunks; ++n) {
      const int64_t start = n * C, c = std::min(C, T_len - start);
      T* kk = state.get() + n * slot + V * K;
      load_rows(kk, Ks, start, c, K);
      finite_k[n] = all_finite(kk, K, c, K);
      if (n == n_chunks - 1 && !need_sf) break;
      chunk_log_decay(ab ? ab + (per_head ? 0 : start) : nullptr, per_head, ah, c, L.data());
      const double L_end = L[c - 1];
      const auto v = tile(Vs, start, c, V, v_buf.data());
      if (n + 1 < n_chunks) {
        const int64_t c_next = std::min(C, T_len - start - C);
        prefetch_rows(Ks, start + C, c_next, K);
        prefetch_rows(Vs, start + C, c_next, V);
      }
      transpose(v_t.data(), c, v.p, v.ld, c, V);
      for (int64_t j = 0; j < c; ++j) {
        const T e = static_cast<T>(std::exp(L_end - L[j]));
        for (int64_t x = 0; x < K; ++x) k_s[j * K + x] = kk[j * K + x] * e;
      }
      // S_next^T = e^L_end S^T + V^T (e^(L_end - L) K)
      T* next = n + 1 < n_chunks ? state.get() + (n + 1) * slot : sf.data();
      const bool carry = has_s0 || n > 0;
      if (carry) {
        const T e = static_cast<T>(std::exp(L_end));
        const T* cur = state.get() + n * slot;
        for (int64_t x = 0; x < V * K; ++x) next[x] = cur[x] * e;
      }
      mm<T>(V, K, c, v_t.data(), c, k_s.data(), K, next, K, carry);
    }
    double sf_dot = 0;  // <grad_state, S_{T-1}>
    if (need_sf) {
      const T* dsf = g.d_sf.data_ptr<T>() + bh * K * V;
      for (int64_t x = 0; x < K; ++x) {
        for (int64_t y = 0; y < V; ++y) sf_dot += static_cast<double>(dsf[x * V + y]) * sf[y * K + x];
      }
    }

    // ---- sweep 2, backward in time, carrying G = dLoss / d(the state leaving the chunk).
    bool has_g = g.d_sf.defined();
    if (has_g) std::copy_n(g.d_sf.data_ptr<T>() + bh * K * V, K * V, G);
    else std::fill_n(G, K * V, T(0));
    double da_carry = 0, da_sum = 0;  // sum_{i >= t} dLoss/dL_i; its sum over t (per-head)
    for (int64_t n = n_chunks - 1; n >= 0; --n) {
      const int64_t start = n * C, c = std::min(C, T_len - start);
      const int64_t ldq = V + c, ldk = V + c, ldv = K + c;  // lq, lk, lv row strides
      chunk_log_decay(ab ? ab + (per_head ? 0 : start) : nullptr, per_head, ah, c, L.data());
      const double L_end = L[c - 1];
      for (int64_t i = 0; i < c; ++i) e_out[i] = std::exp(L_end - L[i]);  // from i to the chunk's end
      // Causal decay, transposed: D[j, i] = s e^(L_i - L_j) for i >= j.
      if (a && !per_head) {
        for (int64_t j = 0; j < c; ++j) {
          for (int64_t i = j; i < c; ++i) D[j * c + i] = static_cast<T>(s) * std::exp(static_cast<T>(L[i] - L[j]));
        }
      }
      const T* S_t = state.get() + n * slot;  // [S^T ; K]
      const T* kk = S_t + V * K;
      T* q = rk.data() + V * K;  // under G^T
      T* dO = rv.data() + K * V;  // under G
      load_rows(q, Qs, start, c, K);
      load_rows(dO, dOs, start, c, V);
      const auto v = tile(Vs, start, c, V, v_buf.data());
      if (n > 0) {  // the previous chunk, next in this sweep
        prefetch_rows(Qs, start - C, C, K);
        prefetch_rows(dOs, start - C, C, V);
        prefetch_rows(Vs, start - C, C, V);
        cpu::prefetch_tile<3>(state.get() + (n - 1) * slot, slot, 1, slot);
      }
      transpose(q_t.data(), c, q, K, c, K);
      transpose(do_t.data(), c, dO, V, c, V);
      for (int64_t i = 0; i < c; ++i) {
        const T eq = static_cast<T>(s * std::exp(L[i]));  // from the entering state to i
        const T eo = static_cast<T>(e_out[i]);
        for (int64_t y = 0; y < V; ++y) lq[i * ldq + y] = dO[i * V + y] * eq;
        for (int64_t y = 0; y < V; ++y) lk[i * ldk + y] = v.row(i)[y] * eo;
        for (int64_t x = 0; x < K; ++x) lv[i * ldv + x] = kk[i * K + x] * eo;
      }
      // A^T[j, i] = s e^(L_i - L_j) k_j.q_i, dA^T[j, i] = s e^(L_i - L_j) v_j.dO_i for i >= j,
      // in place in lv and lk; entries i < j are set to 0 (masked, never multiplied:
      // they may hold NaN).
      T* at = lv.data() + K;
      T* dat = lk.data() + V;
      mm<T>(c, c, K, kk, K, q_t.data(), c, at, ldv, false);
      mm<T>(c, c, V, v.p, v.ld, do_t.data(), c, dat, ldk, false);
      for (int64_t j = 0; j < c; ++j) {
        T* arow = at + j * ldv;
        T* drow = dat + j * ldk;
        std::fill_n(arow, j, T(0));
        std::fill_n(drow, j, T(0));
        const T* w = (a && !per_head) ? D.data() + j * c : table.data() - j;  // w[i] for i >= j
        for (int64_t i = j; i < c; ++i) {
          arow[i] *= w[i];
          drow[i] *= w[i];
        }
      }
      transpose(lq.data() + V, ldq, dat, ldk, c, c);  // dA[i, j], zero for j > i
      transpose(rk.data(), K, G, V, K, V);           // G^T

      T* dq = direct_out ? reinterpret_cast<T*>(g.dq.data_ptr<In>()) + (bh * T_len + start) * K : dq_buf.data();
      T* dk = direct_out ? reinterpret_cast<T*>(g.dk.data_ptr<In>()) + (bh * T_len + start) * K : dk_buf.data();
      T* dv = direct_out ? reinterpret_cast<T*>(g.dv.data_ptr<In>()) + (bh * T_len + start) * V : dv_buf.data();
      // The dA / A parts contract over time inside the chunk against a triangular
      // matrix. A dense product would give 0 * NaN = NaN in a row for a non-finite
      // input at a position that row does not depend on (a later k for dq, an earlier
      // q or dO for dk, dv); a chunk holding one takes the exactly causal row-by-row
      // product (as the forward does for v).
      if (finite_k[n]) {
        mm<T>(c, K, V + c, lq.data(), ldq, S_t, K, dq, K, false);
      } else {
        for (int64_t i = 0; i < c; ++i) mm<T>(1, K, V + i + 1, lq.data() + i * ldq, ldq, S_t, K, dq + i * K, K, false);
      }
      if (all_finite(q, K, c, K)) {
        mm<T>(c, K, V + c, lk.data(), ldk, rk.data(), K, dk, K, false);
      } else {
        for (int64_t j = 0; j < c; ++j) {
          mm<T>(1, K, V, lk.data() + j * ldk, ldk, rk.data(), K, dk + j * K, K, false);
          mm<T>(1, K, c - j, dat + j * ldk + j, ldk, q + j * K, K, dk + j * K, K, true);
        }
      }
      if (all_finite(dO, V, c, V)) {
        mm<T>(c, V, K + c, lv.data(), ldv, rv.data(), V, dv, V, false);
      } else {
        for (int64_t j = 0; j < c; ++j) {
          mm<T>(1, V, K, lv.data() + j * ldv, ldv, rv.data(), V, dv + j * V, V, false);
          mm<T>(1, V, c - j, at + j * ldv + j, ldv, dO + j * V, V, dv + j * V, V, true);
        }
      }
      // G <- e^L_end G + Q^T (s e^L dO): the gradient of the state entering this chunk.
      if (has_g) {
        const T e = static_cast<T>(std::exp(L_end));
        for (int64_t x = 0; x < K * V; ++x) G[x] *= e;
      }
      mm<T>(K, V, c, q_t.data(), c, lq.data(), ldq, G, V, has_g);
      has_g = true;

      // d a_t = sum_{i >= t} (q_i.dq_i - k_i.dk_i), plus <grad_state, S_{T-1}> for i = T-1;
      // carried in float64 (a sum over the whole sequence).
      if (g.da.defined()) {
        T* da_out = per_head ? nullptr : g.da.data_ptr<T>() + bh * T_len + start;
        for (int64_t i = c - 1; i >= 0; --i) {
          double dl = dot_diff(q + i * K, dq + i * K, kk + i * K, dk + i * K, K);
          if (start + i == T_len - 1) dl += sf_dot;
          da_carry += dl;
          if (per_head) da_sum += da_carry;
          else da_out[i] = static_cast<T>(da_carry);
        }
      }
      if constexpr (!direct_out) {
        store_rows(g.dq.data_ptr<In>() + (bh * T_len + start) * K, dq, c * K);
        store_rows(g.dk.data_ptr<In>() + (bh * T_len + start) * K, dk, c * K);
        store_rows(g.dv.data_ptr<In>() + (bh * T_len + start) * V, dv, c * V);
      }
    }
    if (per_head && g.da.defined()) g.da.data_ptr<T>()[bh] = static_cast<T>(da_sum);
    if (g.ds0.defined()) std::copy_n(G, K * V, g.ds0.data_ptr<T>() + bh * K * V);
  }
}

template <typename T, typename In>
LEET_AVX2 void backward_heads_avx2(const Args& g, int64_t begin, int64_t end) {
  backward_heads_body<T, In>(g, begin, end);
}

template <typename T, typename In>
void backward_kernel(const Args& g) {
  const bool avx2 = cpu::use_avx2();
  at::parallel_for(0, g.q.size(0) * g.q.size(1), 1, [&](int64_t begin, int64_t end) {
    if (avx2) backward_heads_avx2<T, In>(g, begin, end);
    else backward_heads_body<T, In>(g, begin, end);
    cpu::release_thread_gemm();
  });
}

}  // namespace

void decay_attn_backward_cpu_into(
    const Tensor& grad_o, const std::optional<Tensor>& grad_state, const Tensor& q, const Tensor& k,
    const Tensor& v, const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, const BackwardOutputs& out) {
  const auto dt = compute_dtype(q, k, v);
  Args g;
  g.q = q, g.k = k, g.v = v, g.grad_o = grad_o;
  g.scale = scale;
  if (log_decay.has_value() && log_decay->defined()) g.a = log_decay->to(at::kDouble).contiguous();
  if (initial_state.has_value() && initial_state->defined()) g.s0 = initial_state->to(dt).contiguous();
  if (grad_state.has_value() && grad_state->defined()) g.d_sf = grad_state->to(dt).contiguous();
  g.dq = out.dq, g.dk = out.dk, g.dv = out.dv, g.da = out.da, g.ds0 = out.ds0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "_decay_attn_backward", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<Acc, scalar_t>(g);
  });
}

// (dq, dk, dv, d log_decay, d initial_state); the last two are empty tensors when
// log_decay / initial_state are None. d log_decay has log_decay's shape ([H]: summed
// over batch and time) and dtype; the others their input's dtype, contiguous.
DecayAttnGrads decay_attn_backward_cpu(
    const Tensor& grad_o, const std::optional<Tensor>& grad_state, const Tensor& q, const Tensor& k,
    const Tensor& v, const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state) {
  check_decay_attn_inputs(q, k, v, log_decay, initial_state, "chunked", "cpu");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  TORCH_CHECK_VALUE(
      grad_o.dim() == 4 && grad_o.size(0) == B && grad_o.size(1) == H && grad_o.size(2) == T && grad_o.size(3) == V,
      "_decay_attn_backward: grad_o must have the output's shape [B, H, T, V] = [", B, ", ", H, ", ", T, ", ", V,
      "], got ", grad_o.sizes());
  TORCH_CHECK_TYPE(is_supported_float(grad_o.scalar_type()), "_decay_attn_backward: grad_o must be floating-point");
  const bool has_ld = log_decay.has_value() && log_decay->defined();
  const bool has_s0 = initial_state.has_value() && initial_state->defined();
  const bool has_gs = grad_state.has_value() && grad_state->defined();
  if (has_gs) {
    TORCH_CHECK_VALUE(
        grad_state->dim() == 4 && grad_state->size(0) == B && grad_state->size(1) == H &&
            grad_state->size(2) == K && grad_state->size(3) == V,
        "_decay_attn_backward: grad_state must have the state's shape [B, H, K, V] = [", B, ", ", H, ", ", K,
        ", ", V, "], got ", grad_state->sizes());
  }
  // B * H below the thread count: segments of the sequence in parallel (chunked_cpu_split.cpp).
  if (auto split = decay_attn_backward_cpu_split(grad_o, grad_state, q, k, v, log_decay, scale, initial_state)) {
    return *split;
  }
  const auto dt = compute_dtype(q, k, v);
  // One input dtype for the kernel; mixed dtypes (rare) compute from copies in dt.
  const auto in_dt = q.scalar_type();
  const bool one_dtype = k.scalar_type() == in_dt && v.scalar_type() == in_dt && grad_o.scalar_type() == in_dt;
  const auto kdt = one_dtype ? in_dt : dt;
  const auto opts = q.options().dtype(kdt);
  BackwardOutputs out;
  out.dq = new_output({B, H, T, K}, opts);
  out.dk = new_output({B, H, T, K}, opts);
  out.dv = new_output({B, H, T, V}, opts);
  const bool per_head = has_ld && log_decay->dim() == 1;
  if (has_ld) {
    const auto da_shape = per_head ? std::vector<int64_t>{B, H} : std::vector<int64_t>{B, H, T};
    out.da = new_output(da_shape, q.options().dtype(dt));
  }
  if (has_s0) out.ds0 = new_output({B, H, K, V}, q.options().dtype(dt));

  if (B * H * T * K * V == 0) {
    // Nothing flows through the product: zero gradients, and at T = 0 the initial
    // state passes straight to the final one.
    out.dq.zero_(), out.dk.zero_(), out.dv.zero_();
    if (has_ld) out.da.zero_();
    if (has_s0) {
      if (T == 0 && has_gs) out.ds0.copy_(*grad_state);
      else out.ds0.zero_();
    }
  } else {
    decay_attn_backward_cpu_into(grad_o.to(kdt), grad_state, q.to(kdt), k.to(kdt), v.to(kdt), log_decay, scale,
                                 initial_state, out);
  }
  Tensor d_ld = at::empty({0}, q.options());
  if (has_ld) d_ld = (per_head ? out.da.sum(0) : out.da).to(log_decay->scalar_type());
  Tensor d_s0 = has_s0 ? out.ds0.to(initial_state->scalar_type()) : at::empty({0}, q.options());
  return {out.dq.to(q.scalar_type()), out.dk.to(k.scalar_type()), out.dv.to(v.scalar_type()), d_ld, d_s0};
}

TORCH_LIBRARY_IMPL(leet, CPU, m) { m.impl("_decay_attn_backward", &decay_attn_backward_cpu); }

}  // namespace leet
