// The sequence split of the fused CPU forward (issue 15): the fused kernel
// (chunked_cpu.cpp) parallelises over B * H only, so B * H below the thread count leaves
// cores idle (B = H = 1 runs on one). Here the sequence of every (batch, head) is cut into
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
// When (decay_attn_chunked_cpu's first step): outside parallel regions and outside this
// split, with B * H < at::get_num_threads() and T >= 2 * kMinSegment: P = min(threads /
// (B * H), T / kMinSegment). LEET_CPU_SPLIT (read at every call, for tests): unset or
// "auto" that rule, "0" (or "1") never, N >= 2 always N segments (at most one per chunk),
// whatever the thread count.
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

}  // namespace

std::optional<std::tuple<Tensor, Tensor>> decay_attn_chunked_cpu_split(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, bool output_final_state) {
  if (tl_in_split || q.numel() == 0 || v.numel() == 0) return std::nullopt;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3), BH = B * H;
  const int64_t P = segment_count(BH, T);
  if (P < 2) return std::nullopt;
  // Below autograd (this is a kernel; its ATen ops record nothing), on every thread below.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  // Segment bounds: whole chunks, spread evenly (the last one holds a partial chunk).
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  std::vector<int64_t> bound(P + 1, 0);
  for (int64_t s = 0; s < P; ++s) {
    bound[s + 1] = std::min(T, bound[s] + (chunks / P + (s < chunks % P ? 1 : 0)) * kChunk);
  }
  const bool has_decay = log_decay.has_value() && log_decay->defined();
  const bool has_s0 = initial_state.has_value() && initial_state->defined();
  const Tensor a = has_decay ? log_decay->to(at::kDouble).contiguous() : Tensor();
  const bool per_head = has_decay && a.dim() == 1;
  // The sequential path's output: fresh, [B, H, T, V], contiguous, v's dtype.
  Tensor out = new_output({B, H, T, V}, v.options());
  Tensor W = has_decay ? at::empty({BH, T}, a.options()) : Tensor();
  std::vector<Tensor> finals(BH * P);  // F_s of (bh, s), [K, V]
  std::vector<Tensor> local(BH * P);   // the outputs of segments s >= 1, [len, V]
  std::vector<double> G(BH * P, 1.0);
  // The state dtype of both kernels (float32, float64 for float64 compute).
  const at::ScalarType state_dtype = compute_dtype(q, k, v);

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

}  // namespace leet
