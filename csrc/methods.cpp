// The collection of decay_attn methods, written once with ATen ops so that they
// run on any device. Each one computes, for every (b, h),
//   S_t = exp(a_t) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t,   S_{-1} = initial_state,
// and every decay weight is formed from a *difference* of cumulative log decays
// taken inside one block (never exp(A_i) * exp(-A_j)), so strong or positive
// decays stay as exact as the arithmetic allows.
#include "backends.h"

#include <torch/library.h>

namespace leet {
namespace {

using at::Tensor;
using namespace at::indexing;

// The problem with every input in the compute dtype and the decay as per-position
// log decays a[B, H, T] (a per-head or absent decay is broadcast; zeros mean no decay).
struct Problem {
  Tensor q, k, v, a, s0;  // s0 is undefined when there is no initial state
  double scale;
  int64_t B, H, T, K, V;
};

Problem make_problem(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    double scale, const std::optional<Tensor>& initial_state) {
  Problem p;
  const auto dt = compute_dtype(q, k, v);
  p.q = q.to(dt);
  p.k = k.to(dt);
  p.v = v.to(dt);
  p.B = q.size(0), p.H = q.size(1), p.T = q.size(2), p.K = q.size(3), p.V = v.size(3);
  if (!log_decay.has_value()) {
    p.a = at::zeros({p.B, p.H, p.T}, q.options().dtype(dt));
  } else if (log_decay->dim() == 1) {
    p.a = log_decay->to(dt).view({1, p.H, 1}).expand({p.B, p.H, p.T});
  } else {
    p.a = log_decay->to(dt);
  }
  if (initial_state.has_value()) p.s0 = initial_state->to(dt);
  p.scale = scale;
  return p;
}

// Pads the time axis (dim 2) with zeros up to `length`. Zero q, k, v and zero log
// decay at padded positions leave every output and the state unchanged.
Tensor pad_time(const Tensor& x, int64_t length) {
  const int64_t extra = length - x.size(2);
  if (extra == 0) return x;
  std::vector<int64_t> pad(2 * (x.dim() - 2), 0);  // constant_pad_nd lists the last dim first
  pad.back() = extra;
  return at::constant_pad_nd(x, pad, 0);
}


// exp(-800) is exactly 0 in float64 (and every narrower type).
constexpr double kUnderflow = 800.0;

// Log decays a[..., n] (float64) made safe for exponent differences taken inside the
// last dim: entries below -(800 + the sum of the positive entries) are raised to it.
// Every weight through such an entry is exactly 0 before and after, so no result
// changes, but -inf becomes finite (no inf - inf = NaN) and a huge finite decay
// (-1e20) no longer swallows the small decays after it in the cumulative sum.
// NaN stays NaN (and counts as 0 in the positive sum, so it cannot reach earlier
// positions through the floor).
Tensor safe_log_decay(const Tensor& a) {
  auto positive = at::where(a > 0, a, at::zeros({}, a.options())).sum(-1, /*keepdim=*/true);
  return at::maximum(a, -(positive + kUnderflow));
}

// Inclusive cumulative sum of a[B, H, T'] within consecutive blocks of `block`
// positions, in float64: [B, H, T'/block, block].
Tensor block_cumsum(const Tensor& a, int64_t block) {
  const int64_t n = a.size(2) / block;
  return safe_log_decay(a.to(at::kDouble).view({a.size(0), a.size(1), n, block})).cumsum(-1);
}

// The causal decayed scores: scores[i, j] * exp(L_i - L_j) for j <= i, and exactly 0
// above the diagonal. The mask is applied with `where`, never by multiplying by 0, so
// a non-finite score of a later position (a NaN key) stays out of earlier rows.
Tensor decayed_scores(const Tensor& scores, const Tensor& L) {
  const int64_t C = L.size(-1);
  auto upper = at::ones({C, C}, L.options().dtype(at::kBool)).triu(1);
  auto diff = (L.unsqueeze(-1) - L.unsqueeze(-2)).masked_fill(upper, 0).to(scores.scalar_type());
  return (scores * diff.exp()).masked_fill(upper, 0);
}

// A @ V for A[..., C, C] lower triangular (C a power of two) and V[..., C, D], summing
// over j <= i only: row i never reads v_j for j > i, so a NaN or inf value at a later
// position cannot reach it (a dense product would give 0 * NaN = NaN). The diagonal
// first, then at block size s = 1, 2, ..., C/2 the rows in the second half of each
// 2s block get the off-diagonal s x s block times the first half's rows: about half
// the FLOPs of the dense product, in log2(C) batched matmuls.
Tensor tril_matmul(const Tensor& A, const Tensor& V) {
  const int64_t C = A.size(-1);
  TORCH_INTERNAL_ASSERT(C > 0 && (C & (C - 1)) == 0, "tril_matmul: C must be a power of two");
  auto o = (A.diagonal(0, -2, -1).unsqueeze(-1) * V).contiguous();
  for (int64_t s = 1; s < C; s *= 2) {
    const int64_t n = C / (2 * s);
    auto blocks = A.unflatten(-1, {n, 2, s}).unflatten(-4, {n, 2, s});  // [..., n, 2, s, n, 2, s]
    auto lower_left = blocks.select(-5, 1).select(-2, 0).diagonal(0, -4, -2).movedim(-1, -3);  // [..., n, s, s]
    auto first = V.unflatten(-2, {n, 2, s}).select(-3, 0);  // [..., n, s, D]
    o.unflatten(-2, {n, 2, s}).select(-3, 1).add_(at::matmul(lower_left, first));
  }
  return o;
}

int64_t next_power_of_two(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// x * exp(L) with the product taken in float64, so that a large exp(L) (growing
// decays) meets a small x before anything overflows; exact zeros stay zero (an empty
// state times a huge weight is 0, not NaN).
Tensor scale_by_exp(const Tensor& x, const Tensor& L) {
  auto y = x.to(at::kDouble);
  return at::where(y == 0, y, y * L.exp()).to(x.scalar_type());
}

// Adds the initial state's contribution scale * exp(A_t) q_t S0 to o and returns
// the final state exp(A_{T-1}) S0 + S_inputs. A is the cumulative log decay over the
// whole sequence (made safe as in block_cumsum).
Tensor apply_initial_state(const Problem& p, Tensor& o, const Tensor& S_inputs) {
  if (!p.s0.defined()) return S_inputs;
  auto A = block_cumsum(p.a, p.T).squeeze(2);  // [B, H, T] float64
  o.add_(scale_by_exp(at::matmul(p.q, p.s0), A.unsqueeze(-1)), p.scale);
  return S_inputs + scale_by_exp(p.s0, A.select(-1, -1).unsqueeze(-1).unsqueeze(-1));
}

// naive: materialise (Q K^T) * D, then multiply by V. O(T^2) time and memory.
std::tuple<Tensor, Tensor> naive(const Problem& p) {
  const auto dt = p.q.scalar_type();
  auto A = block_cumsum(p.a, p.T).squeeze(2);  // [B, H, T]
  auto attn = decayed_scores(at::matmul(p.q, p.k.transpose(-1, -2)), A);
  // The exact-causal product wants a power-of-two size: pad with zero rows and columns.
  const int64_t Tp = next_power_of_two(p.T), extra = Tp - p.T;
  auto o = tril_matmul(at::constant_pad_nd(attn, {0, extra, 0, extra}, 0), pad_time(p.v, Tp))
               .narrow(2, 0, p.T) * p.scale;
  // S = sum_j exp(A_{T-1} - A_j) k_j^T v_j
  auto w = (A.narrow(-1, p.T - 1, 1) - A).to(dt).exp().unsqueeze(-1);
  auto S = at::matmul((p.k * w).transpose(-1, -2), p.v);
  return {o, apply_initial_state(p, o, S)};
}

// recurrent: one state update per token (the definition). O(T K V), state of K V.
std::tuple<Tensor, Tensor> recurrent(const Problem& p) {
  auto S = p.s0.defined() ? p.s0.clone() : at::zeros({p.B, p.H, p.K, p.V}, p.q.options());
  auto gamma = p.a.exp();
  auto o = new_output({p.B, p.H, p.T, p.V}, p.q.options());
  for (int64_t t = 0; t < p.T; ++t) {
    S.mul_(gamma.select(2, t).unsqueeze(-1).unsqueeze(-1));
    S.add_(p.k.select(2, t).unsqueeze(-1) * p.v.select(2, t).unsqueeze(-2));
    o.select(2, t).copy_(at::matmul(p.q.select(2, t).unsqueeze(-2), S).squeeze(-2));
  }
  return {o.mul_(p.scale), S};
}

// Per-chunk pieces shared by chunked and recursive: the causal decayed attention
// inside each block, the state each block contributes by its end, and the total
// log decay across each block. Inputs are padded to a multiple of C.
struct Blocks {
  Tensor o;      // [B, H, N, C, V] intra-block outputs (unscaled)
  Tensor dS;     // [B, H, N, K, V] sum_j exp(L_end - L_j) k_j^T v_j
  Tensor total;  // [B, H, N] float64 sum of the log decays in each block
};

Blocks intra_blocks(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& L) {
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), H = q.size(1), N = L.size(2), C = L.size(3);
  auto qc = q.reshape({B, H, N, C, q.size(3)}), kc = k.reshape({B, H, N, C, k.size(3)});
  auto vc = v.reshape({B, H, N, C, v.size(3)});
  auto last = L.narrow(-1, C - 1, 1);
  auto o = tril_matmul(decayed_scores(at::matmul(qc, kc.transpose(-1, -2)), L), vc);
  auto to_end = (last - L).to(dt).exp().unsqueeze(-1);
  auto dS = at::matmul((kc * to_end).transpose(-1, -2), vc);
  return {o, dS, last.squeeze(-1)};
}

constexpr int64_t kChunk = 64;

// chunked: quadratic inside chunks of C, state passed between chunks.
// O(T C (K + V) + T K V) time, (T / C) K V extra memory.
std::tuple<Tensor, Tensor> chunked(const Problem& p) {
  const int64_t C = kChunk, Tp = (p.T + C - 1) / C * C, N = Tp / C;
  auto q = pad_time(p.q, Tp), k = pad_time(p.k, Tp), v = pad_time(p.v, Tp), a = pad_time(p.a, Tp);
  auto L = block_cumsum(a, C);  // [B, H, N, C]: decay from the chunk's start state to t
  auto blocks = intra_blocks(q, k, v, L);
  // Scan over chunks: states[n] is the state before chunk n. Without an initial state
  // the first chunk starts from nothing (no 0 * exp(total) = 0 * inf for growing decays).
  auto states = new_output(blocks.dS.sizes(), blocks.dS.options());
  Tensor S = p.s0.defined() ? p.s0.clone() : Tensor();
  auto chunk_decay = blocks.total.to(q.scalar_type()).exp();
  for (int64_t n = 0; n < N; ++n) {
    if (S.defined()) {
      states.select(2, n).copy_(S);
      S = S * chunk_decay.select(2, n).unsqueeze(-1).unsqueeze(-1) + blocks.dS.select(2, n);
    } else {
      states.select(2, n).zero_();
      S = blocks.dS.select(2, n).clone();
    }
  }
  auto qc = q.reshape({p.B, p.H, N, C, p.K});
  auto inter = scale_by_exp(at::matmul(qc, states), L.unsqueeze(-1));
  auto o = (blocks.o + inter).reshape({p.B, p.H, Tp, p.V}).narrow(2, 0, p.T);
  return {o * p.scale, S};
}

// fleet: a rank-1 split over the K dimension, o = sum_r q_r * dcumsum(k_r v), with
// each discounted cumulative sum done by a log-depth (Hillis-Steele) scan whose
// weights are products of decays over windows: signed inputs are fine.
// O(T K V log T) time, T V extra memory per rank; row r of the final state is the
// last element of rank r's cumulative sum.
std::tuple<Tensor, Tensor> fleet(const Problem& p) {
  auto o = at::zeros({p.B, p.H, p.T, p.V}, p.q.options());
  auto S = new_output({p.B, p.H, p.K, p.V}, p.q.options());
  for (int64_t r = 0; r < p.K; ++r) {
    auto c = p.k.narrow(-1, r, 1) * p.v;  // [B, H, T, V]
    if (p.s0.defined()) {                 // S_0 = gamma_0 S_{-1} + k_0^T v_0
      c.select(2, 0).add_(p.s0.select(2, r) * p.a.select(2, 0).exp().unsqueeze(-1));
    }
    auto window = p.a;  // log decay over the window (i - d, i]
    for (int64_t d = 1; d < p.T; d *= 2) {
      const int64_t n = p.T - d;  // c_i += w(i, i-d) c_{i-d} and the window doubles, for i >= d
      auto w = window.narrow(2, d, n);
      c = at::cat({c.narrow(2, 0, d), c.narrow(2, d, n) + c.narrow(2, 0, n) * w.exp().unsqueeze(-1)}, 2);
      window = at::cat({window.narrow(2, 0, d), w + window.narrow(2, 0, n)}, 2);
    }
    o.addcmul_(p.q.narrow(-1, r, 1), c);
    S.select(2, r).copy_(c.select(2, p.T - 1));
  }
  return {o.mul_(p.scale), S};
}

// recursive: divide and conquer over the sequence, bottom-up. Blocks of C0 are
// done directly; then neighbouring blocks merge, the left block's state feeding
// the right block's queries. O(T K V log T) time, depth O(log T).
std::tuple<Tensor, Tensor> recursive(const Problem& p) {
  constexpr int64_t C0 = 16;
  int64_t Tp = C0;
  while (Tp < p.T) Tp *= 2;
  auto q = pad_time(p.q, Tp), k = pad_time(p.k, Tp), v = pad_time(p.v, Tp), a = pad_time(p.a, Tp);
  auto blocks = intra_blocks(q, k, v, block_cumsum(a, C0));
  auto o = blocks.o.reshape({p.B, p.H, Tp, p.V});
  auto S = blocks.dS, total = blocks.total;  // per block
  for (int64_t size = C0; size < Tp; size *= 2) {
    const int64_t pairs = Tp / (2 * size);
    auto Lr = block_cumsum(a, size).view({p.B, p.H, pairs, 2, size}).select(3, 1);
    auto q_right = q.view({p.B, p.H, pairs, 2, size, p.K}).select(3, 1);
    auto S_pair = S.view({p.B, p.H, pairs, 2, p.K, p.V});
    auto t_pair = total.view({p.B, p.H, pairs, 2});
    o.view({p.B, p.H, pairs, 2, size, p.V}).select(3, 1).add_(
        scale_by_exp(at::matmul(q_right, S_pair.select(3, 0)), Lr.unsqueeze(-1)));
    auto right_decay = t_pair.select(3, 1).to(q.scalar_type()).exp().unsqueeze(-1).unsqueeze(-1);
    S = S_pair.select(3, 0) * right_decay + S_pair.select(3, 1);
    total = t_pair.select(3, 0) + t_pair.select(3, 1);
  }
  o = o.narrow(2, 0, p.T) * p.scale;
  return {o, apply_initial_state(p, o, S.select(2, 0))};
}

}  // namespace

std::tuple<Tensor, Tensor> decay_attn_aten(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, bool output_final_state,
    const std::string& method) {
  auto p = make_problem(q_in, k_in, v_in, log_decay, scale, initial_state);
  std::tuple<Tensor, Tensor> out;
  if (p.B * p.H * p.K * p.V == 0) {
    // Nothing to sum (K = 0 gives zero outputs); no reshape of empty tensors below.
    out = {at::zeros({p.B, p.H, p.T, p.V}, p.q.options()), at::zeros({p.B, p.H, p.K, p.V}, p.q.options())};
  } else if (p.T == 0) {
    // A fresh tensor even here: the final state never aliases initial_state.
    out = {at::empty({p.B, p.H, 0, p.V}, p.q.options()),
           p.s0.defined() ? p.s0.clone(at::MemoryFormat::Contiguous)
                          : at::zeros({p.B, p.H, p.K, p.V}, p.q.options())};
  } else if (method == "naive") out = naive(p);
  else if (method == "recurrent") out = recurrent(p);
  else if (method == "fleet") out = fleet(p);
  else if (method == "recursive") out = recursive(p);
  else out = chunked(p);  // "chunked" and "auto"
  // Contiguous results, as the fake kernel promises.
  auto o = std::get<0>(out).to(v_in.scalar_type()).contiguous();
  auto S = output_final_state ? std::get<1>(out).contiguous() : at::empty({0}, p.q.options());
  return {o, S};
}

namespace {

// The "aten" row of the backend table (csrc/backends.cpp): every method, any device.
const RegisterBackend kRegistered("aten", &decay_attn_aten);

}  // namespace

}  // namespace leet
