// The recurrent method on CPU for narrow values in float64: one state update per token,
// S_t = exp(a_t) S_{t-1} + k_t^T v_t and o_t = scale q_t S_t, in O(T K V) time with the
// K x V state in registers and cache. The chunked kernel spends O(T C (K + V)) on its
// in-chunk products whatever V is, so for V of a few columns (the backend's row sums of
// normalised retention, passes/rewrite.py: V = 1) this is many times less work. It reads
// q and k in their own dtype, a row at a time (no float64 copies of them), and keeps
// every product and the state in float64. Only float64 compute takes it: in float32 a
// recurrence's rounding grows as u / (1 - gamma), the chunked method's does not.
#include "../decay_attn.h"
#include "chunk_common.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace leet {
namespace {

using at::Tensor;

// One (batch, head): rows of q, k at row strides ldq, ldk (unit stride inside a row),
// v and out contiguous [T, V] in float64, s0 / state [K, V] (s0 may be null).
template <typename In>
struct Head {
  const In* q;
  const In* k;
  int64_t ldq, ldk;
  const double* v;
  const double* a;  // per position [T], or null (then ah: per head, or 0)
  double ah;
  const double* s0;
  double* out;
  double* state;
};

template <typename In>
LEET_INLINE void recurrent_head_body(const Head<In>& p, int64_t T, int64_t K, int64_t V, double scale,
                                     std::vector<double>& w) {
  // St: the state transposed, [V, K], so that each column's update and product run along K.
  double* St = w.data();
  double* qt = St + V * K;
  double* kt = qt + K;
  for (int64_t y = 0; y < V; ++y)
    for (int64_t x = 0; x < K; ++x) St[y * K + x] = p.s0 ? p.s0[x * V + y] : 0.0;
  const double gh = std::exp(p.ah);
  // Without an initial state the first update multiplies nothing (0 * exp(a_0) would be
  // NaN for a_0 = inf, where the definition has no earlier terms).
  bool has_state = p.s0 != nullptr;
  for (int64_t t = 0; t < T; ++t) {
    const In* qr = p.q + t * p.ldq;
    const In* kr = p.k + t * p.ldk;
    for (int64_t x = 0; x < K; ++x) qt[x] = static_cast<double>(qr[x]), kt[x] = static_cast<double>(kr[x]);
    const double g = has_state ? (p.a ? std::exp(p.a[t]) : gh) : 0.0;
    const double* vr = p.v + t * V;
    double* o = p.out + t * V;
    for (int64_t y = 0; y < V; ++y) {
      double* s = St + y * K;
      const double vy = vr[y];
      double acc = 0;
      if (has_state) {
#pragma omp simd reduction(+ : acc)
        for (int64_t x = 0; x < K; ++x) {
          s[x] = g * s[x] + kt[x] * vy;
          acc += qt[x] * s[x];
        }
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t x = 0; x < K; ++x) {
          s[x] = kt[x] * vy;
          acc += qt[x] * s[x];
        }
      }
      o[y] = scale * acc;
    }
    has_state = true;
  }
  for (int64_t x = 0; x < K; ++x)
    for (int64_t y = 0; y < V; ++y) p.state[x * V + y] = St[y * K + x];
}

template <typename In>
LEET_AVX2 void recurrent_head_avx2(const Head<In>& p, int64_t T, int64_t K, int64_t V, double scale,
                                   std::vector<double>& w) {
  recurrent_head_body(p, T, K, V, scale, w);
}

template <typename In>
void recurrent_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& s0,
                      double scale, Tensor& out, Tensor& state) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  const bool per_head = a.defined() && a.dim() == 1;
  const bool avx2 = cpu::use_avx2();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> w(V * K + 2 * K);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Head<In> p;
      p.q = q.data_ptr<In>() + b * q.stride(0) + h * q.stride(1);
      p.k = k.data_ptr<In>() + b * k.stride(0) + h * k.stride(1);
      p.ldq = q.stride(2), p.ldk = k.stride(2);
      p.v = v.data_ptr<double>() + bh * T * V;
      p.a = a.defined() && !per_head ? a.data_ptr<double>() + bh * T : nullptr;
      p.ah = a.defined() && per_head ? cpu::clamped_head_decay(a.data_ptr<double>()[h]) : 0.0;
      p.s0 = s0.defined() ? s0.data_ptr<double>() + bh * K * V : nullptr;
      p.out = out.data_ptr<double>() + bh * T * V;
      p.state = state.data_ptr<double>() + bh * K * V;
      if (avx2) recurrent_head_avx2(p, T, K, V, scale, w);
      else recurrent_head_body(p, T, K, V, scale, w);
    }
  });
}

// q or k as the kernel reads it: its own dtype, unit stride along K.
Tensor unit_rows(const Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

}  // namespace

bool recurrent_cpu_applies(const Tensor& q, const Tensor& k, const Tensor& v) {
  return compute_dtype(q, k, v) == at::kDouble && v.size(3) <= kRecurrentMaxV &&
         q.scalar_type() == k.scalar_type();
}

std::tuple<Tensor, Tensor> decay_attn_recurrent_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& log_decay,
    double scale, const std::optional<Tensor>& initial_state, bool output_final_state) {
  auto q = unit_rows(q_in), k = unit_rows(k_in);
  auto v = v_in.to(at::kDouble).contiguous();
  Tensor a = log_decay.has_value() ? log_decay->to(at::kDouble).contiguous() : Tensor();
  Tensor s0 = initial_state.has_value() ? initial_state->to(at::kDouble).contiguous() : Tensor();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  auto opts = q.options().dtype(at::kDouble);
  auto out = new_output({B, H, T, V}, opts);
  auto state = new_output({B, H, K, V}, opts);
  switch (q.scalar_type()) {
    case at::kDouble: recurrent_kernel<double>(q, k, v, a, s0, scale, out, state); break;
    case at::kFloat: recurrent_kernel<float>(q, k, v, a, s0, scale, out, state); break;
    case at::kBFloat16: recurrent_kernel<at::BFloat16>(q, k, v, a, s0, scale, out, state); break;
    case at::kHalf: recurrent_kernel<at::Half>(q, k, v, a, s0, scale, out, state); break;
    default: TORCH_CHECK(false, "decay_attn_recurrent_cpu: unexpected dtype ", q.scalar_type());
  }
  return {out.to(v_in.scalar_type()), output_final_state ? state : at::empty({0}, opts)};
}

}  // namespace leet
