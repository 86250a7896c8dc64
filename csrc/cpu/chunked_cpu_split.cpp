// The sequence split of the fused CPU forward and backward (issue 15): the fused kernels
// (chunked_cpu.cpp, chunked_cpu_backward.cpp) parallelise over B * H only, so B * H below
// the thread count leaves cores idle (B = H = 1 runs on one). Here the sequence of every (batch, head) is cut into
// P segments on the kernel's chunk grid and the segments run in parallel, each through the
// public fused forward (decay_attn_chunked_cpu, which also takes the bf16 / fp16 path)
// with no initial state (the first: the call's) and its own final state F_s. Then:
//   1. the state entering segment s:  S_in(1) = F_0,  S_in(s + 1) = G_s S_in(s) + F_s,
//      G_s the segment's decay over its whole length (final state = S_in(P));
//   2. in parallel over row blocks of segments s >= 1:
//      O_i = O_local_i + W_i (q_i S_in(s)),  W_i = scale * the decay from the segment's
//      start to i, one matrix product per block, the row factor applied to its result
//      (float32 for bf16 / fp16, rounded once, as the kernel accumulates).
// Segment 0's rows are copied as they are; nothing is added where S_in is zero.
// G_s and W_i follow the kernel's arithmetic exactly: the same per-chunk clamps of the log
// decay (entries raised to -(800 + the chunk's positive sum), per-head decays to -800),
// and the decay across chunks as the kernel applies it to its state, a product of
// per-chunk factors rounded to the state dtype. So a factor that is exactly 0 (a reset,
// -1e20) stays 0 after any later growth, as the kernel's state does, and -inf / -1e20 /
// positive decays give the kernel's answers. A non-finite value at position j reaches row
// i only through S_in, i.e. only rows of later segments (i > j), as in the kernel.
//
// The backward (decay_attn_backward_cpu_split), on the same segments: with S_t = e^(a_t)
// S_{t-1} + k_t^T v_t and the gradient R_t = dLoss/dS_t carried back in time, a segment's
// gradients need only the state entering it, S_in(s), and the gradient of the state
// leaving it, R(s). So:
//   1. in parallel, per segment: its final state from zero, F_s = sum_t U_t k_t^T v_t (U_t
//      the decay from t to the segment's end), and its own part of the gradient of the
//      state entering it, E_s = sum_t W_t q_t^T dO_t (W as above): two [K, len] x [len, V]
//      products: 2 K V multiply-adds per position beside the unsplit backward's
//      5 K V + C (3 K + 2 V) (27% more at K = V = 64, C = 32);
//   2. in order: S_in(s + 1) = F_s + G_s S_in(s), R(s - 1) = E_s + G_s R(s), R(P - 1) = the
//      call's grad_state;
//   3. in parallel, every segment through the fused backward kernel with initial state
//      S_in(s) and grad_state R(s), writing its rows of the outputs. Its gradients are the
//      whole sequence's: dq, dk, dv directly, and d log_decay because the kernel's
//      <grad_state, final state> term at a segment's last row is exactly the sum over all
//      later rows that the unsplit kernel accumulates (the derivative through a_{t1} of
//      everything after t1). That term is a float32 dot product of two states where the
//      unsplit kernel sums per-row terms: a per-head decay's gradient, which cancels to a
//      small value, differs from the unsplit one by float32 rounding of its terms' size.
//      With a NaN at p, d log_decay in segments before p is finite (as the exact gradient),
//      where the unsplit rule's sum over later rows makes it NaN.
// Inputs of mixed dtypes are not split (the unsplit kernel converts them).
//
// When (decay_attn_chunked_cpu's and decay_attn_backward_cpu's first step): outside parallel
// regions and outside this split, with B * H < at::get_num_threads() and T >= 2 *
// kMinSegment: P = min(threads / (B * H), T / kMinSegment). LEET_CPU_SPLIT (read at every
// call, for tests): unset or "auto" that rule, "0" (or "1") never, N >= 2 always N segments
// (at most one per chunk), whatever the thread count.
#include "../decay_attn.h"
#include "chunk_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace leet {
namespace {

using at::Tensor;

// The kernels' chunk length (chunk_common.h): segments start on their chunk grid, so every
// chunk, and every clamp of the log decay, is the kernel's.
using cpu::kChunk;
// The shortest segment the automatic rule makes (docs/methods.md: measured at B = H = 1,
// K = V = 64, 2 threads).
constexpr int64_t kMinSegment = 512;

// Set on the threads running segments: their calls of the fused forward do not split again.
thread_local bool tl_in_split = false;

struct SplitGuard {
  bool previous;
  SplitGuard() : previous(tl_in_split) { tl_in_split = true; }
  ~SplitGuard() { tl_in_split = previous; }
};

// LEET_CPU_SPLIT: -1 = automatic, 0 / 1 = off, N >= 2 = N segments.
int64_t split_setting() {
  const char* env = std::getenv("LEET_CPU_SPLIT");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return -1;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && n >= 0,
                    "LEET_CPU_SPLIT must be \"auto\", 0 or a number of segments, got \"", env, "\"");
  return n;
}

int64_t segment_count(int64_t BH, int64_t T) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const int64_t setting = split_setting();
  if (setting >= 0) return std::min(setting, chunks);
  if (at::in_parallel_region()) return 1;
  const int64_t threads = at::get_num_threads();
  if (BH >= threads) return 1;
  return std::min(threads / BH, T / kMinSegment);
}

// The decay of one segment's rows [t0, t1) of (batch, head) bh as the kernel computes it,
// relative to the segment's start: W[i] = scale * (product of the factors of the segment's
// earlier chunks) * exp(L_i), L the kernel's clamped cumulative log decay inside i's chunk;
// returns G, the product of all the segment's chunk factors. Each factor is exp(L_end)
// rounded to the state dtype (`single`: float32), as the kernel multiplies its state by it.
// W (and G) below the dtype's smallest normal number are 0: subnormal operands cost the
// arithmetic 5x to 30x (measured: q W S took 6.4 ms instead of 0.2 ms for 2048 rows at
// K = V = 64), and a contribution below 2^-126 times q S_in is below float32's resolution
// of any output row it is added to (the kernel's own state loses it alike, in rounding).
double segment_decay(const double* a, bool per_head, int64_t H, int64_t T, int64_t bh, int64_t t0, int64_t t1,
                     bool single, double scale, double* W) {
  const auto rounded = [single](double x) { return single ? static_cast<double>(static_cast<float>(x)) : x; };
  const double tiny = single ? std::numeric_limits<float>::min() : std::numeric_limits<double>::min();
  const auto row = [tiny](double w) { return std::fabs(w) < tiny ? 0.0 : w; };  // (NaN stays NaN)
  const double ah = per_head ? cpu::clamped_head_decay(a[bh % H]) : 0.0;
  double L[kChunk];
  double f = 1.0;
  for (int64_t c0 = t0; c0 < t1; c0 += kChunk) {
    const int64_t c = std::min(kChunk, t1 - c0);
    cpu::chunk_log_decay(per_head ? nullptr : a + bh * T + c0, per_head, ah, c, L);
    for (int64_t i = 0; i < c; ++i) W[c0 + i] = row(scale * f * std::exp(L[i]));
    f *= rounded(std::exp(L[c - 1]));
  }
  return row(f);  // (the same for the state: G S_in subnormal costs as much)
}

// The decay from row i of a segment to its end as the backward kernel's first sweep
// carries its state: U[i] = (the product of the factors of the segment's later chunks) *
// exp(L_end - L_i), L i's chunk's clamped cumulative log decay, each factor rounded to the
// state dtype; below the smallest normal number 0 (as segment_decay's W).
void segment_decay_to_end(const double* a, bool per_head, int64_t H, int64_t T, int64_t bh, int64_t t0, int64_t t1,
                          bool single, double* U) {
  const auto rounded = [single](double x) { return single ? static_cast<double>(static_cast<float>(x)) : x; };
  const double tiny = single ? std::numeric_limits<float>::min() : std::numeric_limits<double>::min();
  const double ah = per_head ? cpu::clamped_head_decay(a[bh % H]) : 0.0;
  double L[kChunk];
  double f = 1.0;
  for (int64_t c0 = t0 + (t1 - t0 - 1) / kChunk * kChunk; c0 >= t0; c0 -= kChunk) {
    const int64_t c = std::min(kChunk, t1 - c0);
    cpu::chunk_log_decay(per_head ? nullptr : a + bh * T + c0, per_head, ah, c, L);
    for (int64_t i = 0; i < c; ++i) {
      const double u = f * std::exp(L[c - 1] - L[i]);
      U[c0 + i] = std::fabs(u) < tiny ? 0.0 : u;  // (NaN stays NaN)
    }
    f *= rounded(std::exp(L[c - 1]));
  }
}

// Segment bounds for P segments of T rows: whole chunks, spread evenly (the last one holds
// a partial chunk).
std::vector<int64_t> segment_bounds(int64_t T, int64_t P) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  std::vector<int64_t> bound(P + 1, 0);
  for (int64_t s = 0; s < P; ++s) {
    bound[s + 1] = std::min(T, bound[s] + (chunks / P + (s < chunks % P ? 1 : 0)) * kChunk);
  }
  return bound;
}

// What both splits start from: the problem's sizes, the segments, the log decay as the
// kernels read it (float64, contiguous) and the state dtype of both kernels (float32,
// float64 for float64 compute). None where the call is not split.
struct SplitPlan {
  int64_t B, H, T, K, V, BH, P;
  std::vector<int64_t> bound;
  bool has_decay, per_head, has_s0;
  Tensor a;
  at::ScalarType state_dtype;
};

std::optional<SplitPlan> plan_split(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const std::optional<Tensor>& log_decay, const std::optional<Tensor>& initial_state) {
  if (tl_in_split || q.numel() == 0 || v.numel() == 0) return std::nullopt;
  SplitPlan p;
  p.B = q.size(0), p.H = q.size(1), p.T = q.size(2), p.K = q.size(3), p.V = v.size(3), p.BH = p.B * p.H;
  p.P = segment_count(p.BH, p.T);
  if (p.P < 2) return std::nullopt;
  p.bound = segment_bounds(p.T, p.P);
  p.has_decay = log_decay.has_value() && log_decay->defined();
  p.has_s0 = initial_state.has_value() && initial_state->defined();
  p.a = p.has_decay ? log_decay->to(at::kDouble).contiguous() : Tensor();
  p.per_head = p.has_decay && p.a.dim() == 1;
  p.state_dtype = compute_dtype(q, k, v);
  return p;
}

}  // namespace

std::optional<std::tuple<Tensor, Tensor>> decay_attn_chunked_cpu_split(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, bool output_final_state) {
  const auto plan = plan_split(q, k, v, log_decay, initial_state);
  if (!plan) return std::nullopt;
  const auto& [B, H, T, K, V, BH, P, bound, has_decay, per_head, has_s0, a, state_dtype] = *plan;
  // Below autograd (this is a kernel; its ATen ops record nothing), on every thread below.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  // The sequential path's output: fresh, [B, H, T, V], contiguous, v's dtype.
  Tensor out = new_output({B, H, T, V}, v.options());
  Tensor W = has_decay ? at::empty({BH, T}, a.options()) : Tensor();
  std::vector<Tensor> finals(BH * P);  // F_s of (bh, s), [K, V]
  std::vector<Tensor> local(BH * P);   // the outputs of segments s >= 1, [len, V]
  std::vector<double> G(BH * P, 1.0);

  // Every segment of every (batch, head) through the fused forward, in parallel (its own
  // parallel_for over B * H then runs inline in each job).
  at::parallel_for(0, BH * P, 1, [&](int64_t begin, int64_t end) {
    SplitGuard guard;
    at::AutoDispatchBelowADInplaceOrView below;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t bh = job / P, s = job % P, b = bh / H, h = bh % H, t0 = bound[s], t1 = bound[s + 1];
      const auto piece = [&](const Tensor& x) { return x.slice(0, b, b + 1).slice(1, h, h + 1).slice(2, t0, t1); };
      std::optional<Tensor> ld, s0;
      if (has_decay) ld = per_head ? a.slice(0, h, h + 1) : piece(a);
      if (s == 0 && has_s0) s0 = initial_state->slice(0, b, b + 1).slice(1, h, h + 1);
      const bool want_state = s < P - 1 || output_final_state;
      auto [o, st] = decay_attn_chunked_cpu(piece(q), piece(k), piece(v), ld, scale, s0, want_state);
      // Segment 0's rows are final; the later ones are written with their correction.
      if (s == 0) out.select(0, b).select(0, h).slice(0, t0, t1).copy_(o.select(0, 0).select(0, 0));
      else local[job] = o.select(0, 0).select(0, 0);
      if (want_state) finals[job] = st.select(0, 0).select(0, 0);
      if (has_decay) {
        G[job] = segment_decay(a.data_ptr<double>(), per_head, H, T, bh, t0, t1, state_dtype == at::kFloat, scale,
                               W.data_ptr<double>() + bh * T);
      }
    }
  });

  // The states entering the segments, in order (P small: [K, V] operations).
  std::vector<Tensor> state_in(BH * P);
  Tensor final_state = output_final_state ? new_output({B, H, K, V}, out.options().dtype(state_dtype)) : Tensor();
  for (int64_t bh = 0; bh < BH; ++bh) {
    Tensor S = finals[bh * P];
    for (int64_t s = 1; s < P; ++s) {
      state_in[bh * P + s] = S;
      if (s < P - 1 || output_final_state) S = finals[bh * P + s] + S * G[bh * P + s];
    }
    if (output_final_state) final_state.select(0, bh / H).select(0, bh % H).copy_(S);
  }

  // O_i += scale * W_i q_i S_in(s) for every row of segments 1..P-1, in blocks that keep
  // every thread busy.
  struct Block {
    int64_t bh, s, r0, r1;
  };
  std::vector<Block> blocks;
  const int64_t per_segment =
      std::max<int64_t>(1, (at::get_num_threads() + BH * (P - 1) - 1) / (BH * (P - 1)));
  for (int64_t bh = 0; bh < BH; ++bh) {
    for (int64_t s = 1; s < P; ++s) {
      const int64_t len = bound[s + 1] - bound[s], step = (len + per_segment - 1) / per_segment;
      for (int64_t r0 = bound[s]; r0 < bound[s + 1]; r0 += step) {
        blocks.push_back({bh, s, r0, std::min(r0 + step, bound[s + 1])});
      }
    }
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below;
    for (int64_t x = begin; x < end; ++x) {
      const Block& blk = blocks[x];
      const int64_t b = blk.bh / H, h = blk.bh % H;
      Tensor qs = q.select(0, b).select(0, h).slice(0, blk.r0, blk.r1).to(state_dtype);  // [n, K]
      Tensor o = out.select(0, b).select(0, h).slice(0, blk.r0, blk.r1);
      Tensor o_local = local[blk.bh * P + blk.s].slice(0, blk.r0 - bound[blk.s], blk.r1 - bound[blk.s]);
      const Tensor& S = state_in[blk.bh * P + blk.s];
      // The row factor after the product, not folded into q: (W q) S has subnormal products
      // wherever W is small, 4x slower (0.51 vs 0.12 ms at 2048 x 64 x 64).
      Tensor w = has_decay ? W.select(0, blk.bh).slice(0, blk.r0, blk.r1).to(state_dtype).unsqueeze(1) : Tensor();
      if (o.scalar_type() == state_dtype) {  // out = local + correction, in one pass
        if (has_decay) at::addcmul_out(o, o_local, at::mm(qs, S), w);
        else at::addmm_out(o, o_local, qs, S, 1.0, scale);
      } else {  // bf16 / fp16 output: the sum in float32, rounded once
        Tensor acc = o_local.to(state_dtype);
        if (has_decay) acc.addcmul_(at::mm(qs, S), w);
        else acc.addmm_(qs, S, 1.0, scale);
        o.copy_(acc);
      }
    }
  });
  return std::make_tuple(out, output_final_state ? final_state : at::empty({0}, out.options().dtype(state_dtype)));
}

std::optional<DecayAttnGrads> decay_attn_backward_cpu_split(
    const Tensor& grad_o, const std::optional<Tensor>& grad_state, const Tensor& q, const Tensor& k,
    const Tensor& v, const std::optional<Tensor>& log_decay, double scale, const std::optional<Tensor>& initial_state) {
  const auto dtype = q.scalar_type();
  if (k.scalar_type() != dtype || v.scalar_type() != dtype || grad_o.scalar_type() != dtype) return std::nullopt;
  const auto plan = plan_split(q, k, v, log_decay, initial_state);
  if (!plan) return std::nullopt;
  const auto& [B, H, T, K, V, BH, P, bound, has_decay, per_head, has_s0, a, state_dtype] = *plan;
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const bool has_gs = grad_state.has_value() && grad_state->defined();
  const bool single = state_dtype == at::kFloat;
  // W: scale * the decay from the segment's start to i (segment_decay); U: the decay from i
  // to the segment's end; G: the whole segment's (per (bh, s)).
  Tensor W = has_decay ? at::empty({BH, T}, a.options()) : Tensor();
  Tensor U = has_decay ? at::empty({BH, T}, a.options()) : Tensor();
  std::vector<double> G(BH * P, 1.0);
  std::vector<Tensor> finals(BH * P);  // F_s = sum_t U_t k_t^T v_t, [K, V] (s < P - 1)
  std::vector<Tensor> pulls(BH * P);   // E_s = sum_t W_t q_t^T dO_t, [K, V] (s >= 1)

  // 1. Per segment, in parallel: its own final state from zero and its own part of the
  //    gradient of the state entering it (two [K, len] x [len, V] products).
  at::parallel_for(0, BH * P, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t bh = job / P, s = job % P, b = bh / H, h = bh % H, t0 = bound[s], t1 = bound[s + 1];
      const auto rows = [&](const Tensor& x) { return x.select(0, b).select(0, h).slice(0, t0, t1).to(state_dtype); };
      const auto weights = [&](const Tensor& w) { return w.select(0, bh).slice(0, t0, t1).to(state_dtype).unsqueeze(1); };
      if (has_decay) {
        const double* ad = a.data_ptr<double>();
        G[job] = segment_decay(ad, per_head, H, T, bh, t0, t1, single, scale, W.data_ptr<double>() + bh * T);
        segment_decay_to_end(ad, per_head, H, T, bh, t0, t1, single, U.data_ptr<double>() + bh * T);
      }
      if (s < P - 1) {
        const Tensor vs = rows(v);
        finals[job] = at::mm(rows(k).t(), has_decay ? vs * weights(U) : vs);
      }
      if (s > 0) {
        const Tensor dos = rows(grad_o);
        pulls[job] = at::mm(rows(q).t(), has_decay ? dos * weights(W) : dos * scale);
      }
    }
  });

  // 2. In order (P small: [K, V] operations): the state entering each segment,
  //    S_in(s + 1) = F_s + G_s S_in(s), and the gradient of the state leaving it,
  //    R(s - 1) = E_s + G_s R(s) from R(P - 1) = grad_state.
  std::vector<Tensor> state_in(BH * P), grad_out(BH * P);  // undefined: none (zero)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    Tensor S = has_s0 ? initial_state->select(0, b).select(0, h).to(state_dtype) : Tensor();
    for (int64_t s = 0; s + 1 < P; ++s) {
      const Tensor& F = finals[bh * P + s];
      S = S.defined() ? F + S * G[bh * P + s] : F;
      state_in[bh * P + s + 1] = S;
    }
    Tensor R = has_gs ? grad_state->select(0, b).select(0, h).to(state_dtype) : Tensor();
    for (int64_t s = P - 1; s > 0; --s) {
      const Tensor& E = pulls[bh * P + s];
      R = R.defined() ? E + R * G[bh * P + s] : E;
      grad_out[bh * P + s - 1] = R;
    }
  }

  // 3. Every segment through the fused backward, in parallel, with the state entering it
  //    and the gradient of the state leaving it, into its rows of the outputs: its
  //    gradients are then the whole sequence's (d log_decay too: the kernel's
  //    <grad_state, final state> term at a segment's last row is the sum over all later
  //    rows that the unsplit kernel adds).
  BackwardOutputs out;
  out.dq = new_output({B, H, T, K}, q.options());
  out.dk = new_output({B, H, T, K}, q.options());
  out.dv = new_output({B, H, T, V}, q.options());
  const auto state_options = q.options().dtype(state_dtype);
  if (has_decay) {  // per head: each segment's sum, [BH, P]
    const auto da_shape = per_head ? std::vector<int64_t>{BH, P} : std::vector<int64_t>{B, H, T};
    out.da = new_output(da_shape, state_options);
  }
  if (has_s0) out.ds0 = new_output({B, H, K, V}, state_options);
  at::parallel_for(0, BH * P, 1, [&](int64_t begin, int64_t end) {
    SplitGuard guard;
    at::AutoDispatchBelowADInplaceOrView below;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t bh = job / P, s = job % P, b = bh / H, h = bh % H, t0 = bound[s], t1 = bound[s + 1];
      const auto head = [&](const Tensor& x) { return x.slice(0, b, b + 1).slice(1, h, h + 1); };
      const auto piece = [&](const Tensor& x) { return head(x).slice(2, t0, t1); };
      const auto as_state = [&](const Tensor& x) { return x.view({1, 1, K, V}); };
      std::optional<Tensor> ld, s0, gs;
      if (has_decay) ld = per_head ? a.slice(0, h, h + 1) : piece(a);
      if (s > 0) s0 = as_state(state_in[job]);
      else if (has_s0) s0 = head(*initial_state);
      if (s < P - 1) gs = as_state(grad_out[job]);
      else if (has_gs) gs = head(*grad_state);
      BackwardOutputs rows{piece(out.dq), piece(out.dk), piece(out.dv), Tensor(), Tensor()};
      if (has_decay) rows.da = per_head ? out.da.select(0, bh).slice(0, s, s + 1) : piece(out.da);
      if (s == 0 && has_s0) rows.ds0 = head(out.ds0);
      decay_attn_backward_cpu_into(piece(grad_o), gs, piece(q), piece(k), piece(v), ld, scale, s0, rows);
    }
  });
  Tensor d_ld = at::empty({0}, q.options());
  if (has_decay) {  // per head: summed over segments and batch
    d_ld = per_head ? out.da.view({B, H, P}).sum({0, 2}) : out.da;
    d_ld = d_ld.to(log_decay->scalar_type());
  }
  Tensor d_s0 = has_s0 ? out.ds0.to(initial_state->scalar_type()) : at::empty({0}, q.options());
  return std::make_tuple(out.dq, out.dk, out.dv, d_ld, d_s0);
}

}  // namespace leet
