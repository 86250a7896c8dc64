#pragma once
// The recurrent kernel of decay_attn (launched from recurrent.cu).
//
// One block owns one (b, h) and 32 columns of V. Thread (g, l) (warp g < 8, lane l)
// keeps the rows g, g + 8, ... (at most 32) of state column l in registers, so the
// whole [K <= 256, 32] state tile never leaves the block. Per token:
//   S = exp(a_t) S + k_t^T v_t,   o_t = scale * q_t S   (8 partial sums, added in shared memory).
// Suited to short sequences and decoding steps; the chunked kernel is the fast path
// for long ones.
#include "common.cuh"

namespace leet_cuda {
namespace {

constexpr int kCols = 32;                         // V columns per block (one per lane)
constexpr int kGroups = 8;                        // warps; each owns every 8th row of S
constexpr int kRows = LEET_MAX_HEAD_DIM / kGroups;  // state rows per thread

template <typename In>
__global__ void __launch_bounds__(kCols * kGroups) recurrent_kernel(const leet_decay_attn_args args) {
  using Acc = typename Cvt<In>::Acc;
  __shared__ Acc qs[LEET_MAX_HEAD_DIM], ks[LEET_MAX_HEAD_DIM];
  __shared__ Acc part[kGroups][kCols];

  const int lane = threadIdx.x % 32, grp = threadIdx.x / 32;
  const int64_t H = args.H, T = args.T, K = args.K, V = args.V;
  const int64_t n_vt = ceil_div(V, kCols);
  const int64_t bh = blockIdx.x / n_vt, b = bh / H, h = bh % H;
  const int64_t col = (blockIdx.x % n_vt) * kCols + lane;
  const bool col_ok = col < V;
  const In* qg = head_ptr<In>(args.q, args.q_strides, b, h);
  const In* kg = head_ptr<In>(args.k, args.k_strides, b, h);
  const In* vg = head_ptr<In>(args.v, args.v_strides, b, h);
  const int64_t qst = args.q_strides[2], kst = args.k_strides[2], vst = args.v_strides[2];
  In* og = static_cast<In*>(args.o) + bh * T * V;
  const Acc scale = static_cast<Acc>(args.scale);

  Acc S[kRows];
  const Acc* s0 = args.initial_state ? static_cast<const Acc*>(args.initial_state) + bh * K * V : nullptr;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = grp + kGroups * r;
    S[r] = (s0 && col_ok && row < K) ? s0[row * V + col] : Acc(0);
  }

  for (int64_t t = 0; t < T; ++t) {
    for (int c = threadIdx.x; c < K; c += blockDim.x) {
      qs[c] = Cvt<In>::to_acc(qg[t * qst + c]);
      ks[c] = Cvt<In>::to_acc(kg[t * kst + c]);
    }
    Acc g = Acc(1);
    if (args.decay == LEET_DECAY_PER_HEAD) g = exp_acc(static_cast<Acc>(args.log_decay[h]));
    if (args.decay == LEET_DECAY_PER_POSITION) g = exp_acc(static_cast<Acc>(args.log_decay[bh * T + t]));
    const Acc vt = col_ok ? Cvt<In>::to_acc(vg[t * vst + col]) : Acc(0);
    __syncthreads();

    Acc p = Acc(0);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = grp + kGroups * r;
      if (row < K) {
        S[r] = g * S[r] + ks[row] * vt;
        p += qs[row] * S[r];
      }
    }
    part[grp][lane] = p;
    __syncthreads();
    // The next token's writes to qs / ks come after this barrier, and its writes
    // to part after the next one, which warp 0 reaches only after this read.
    if (grp == 0) {
      Acc sum = Acc(0);
#pragma unroll
      for (int i = 0; i < kGroups; ++i) sum += part[i][lane];
      if (col_ok) og[t * V + col] = Cvt<In>::from_acc(scale * sum);
    }
  }

  if (args.final_state) {
    Acc* fs = static_cast<Acc*>(args.final_state) + bh * K * V;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = grp + kGroups * r;
      if (col_ok && row < K) fs[row * V + col] = S[r];
    }
  }
}

}  // namespace
}  // namespace leet_cuda
