#pragma once
// The chunked kernel of decay_attn (launched from chunked.cu).
//
// One block owns one (b, h) and a tile of Vt columns of V and walks the sequence in
// chunks of C tokens, keeping the state S [K, Vt] (float32) in shared memory. Per
// chunk, with L_i the cumulative log decay from the chunk start to token i:
//   A   = (Q K^T) * D,     D[i, j] = exp(L_i - L_j) for j <= i, else 0
//   O   = scale * (A V + (Q * exp(L)) S)
//   S  <- exp(L_end) S + (K * exp(L_end - L))^T V
// Every weight is the exponential of a difference inside one chunk, so growing
// (positive) decays stay as exact as the arithmetic allows.
//
// The four products run as 16x16 output tiles, one warp per tile: on tensor cores
// (wmma, fp32 accumulate) for float16 / bfloat16 inputs, with scalar FMAs for
// float32 / float64. The tensor-core products read A, Q * exp(L), K * exp(L_end - L)
// and S rounded to the input dtype; everything is accumulated in float32.
#include <type_traits>

#include "common.cuh"

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#ifndef LEET_HOST_EMULATION
#include <mma.h>
#endif
#define LEET_HAS_WMMA 1
#endif

namespace leet_cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps

// Byte offsets of the shared-memory arrays of one block, and their leading dims (in
// elements). Rows are padded by 16 bytes against bank conflicts; every array starts
// on 128 bytes (wmma needs 32-byte aligned tiles).
struct Layout {
  int C, Kp, Vt;
  int ld_qk, ld_v, ld_sc, ld_ab, ld_o, ld_s, ld_sb;
  size_t q, k, v, sc, ab, o, s, sb, L, eq, ek, total;
};

size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

// Without tensor cores the input and accumulation types are the same, so the rounded
// copies A (of the scores) and Sb (of the state) are the scores and the state themselves.
Layout make_layout(int C, int Kp, int Vt, int in_size, int acc_size, bool tensor_cores) {
  Layout l;
  l.C = C, l.Kp = Kp, l.Vt = Vt;
  const int pad_in = 16 / in_size, pad_acc = 16 / acc_size;
  l.ld_qk = Kp + pad_in;
  l.ld_v = Vt + pad_in;
  l.ld_sc = C + pad_acc;
  l.ld_o = Vt + pad_acc;
  l.ld_s = Vt + pad_acc;
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = align128(off + bytes);
    return at;
  };
  l.q = take(size_t(C) * l.ld_qk * in_size);
  l.k = take(size_t(C) * l.ld_qk * in_size);
  l.v = take(size_t(C) * l.ld_v * in_size);
  l.sc = take(size_t(C) * l.ld_sc * acc_size);
  if (tensor_cores) {
    l.ld_ab = C + pad_in;
    l.ab = take(size_t(C) * l.ld_ab * in_size);
  } else {
    l.ld_ab = l.ld_sc;
    l.ab = l.sc;
  }
  l.o = take(size_t(C) * l.ld_o * acc_size);
  l.s = take(size_t(Kp) * l.ld_s * acc_size);
  if (tensor_cores) {
    l.ld_sb = Vt + pad_in;
    l.sb = take(size_t(Kp) * l.ld_sb * in_size);
  } else {
    l.ld_sb = l.ld_s;
    l.sb = l.s;
  }
  l.L = take(size_t(C) * sizeof(double));
  l.eq = take(size_t(C) * acc_size);
  l.ek = take(size_t(C + 1) * acc_size);  // ek[C] = exp(L_end), the decay of the whole chunk
  l.total = off;
  return l;
}

// Tile<In, tensor_cores>: one warp's 16x16 output tile. Acc tiles live in shared
// memory row-major; operands are In. In mma, A is 16 x 16*steps and B 16*steps x 16;
// step s reads the 16x16 blocks at A + s * a_step and B + s * b_step. A "column-major"
// operand has element (r, c) at p[c * ld + r] (how K^T is read from K's rows).
template <typename In, bool kTensorCores>
struct Tile;

// Scalar FMAs: lane l owns column l % 16, rows l / 16 + 2 r (r < 8).
template <typename In>
struct Tile<In, false> {
  using Acc = typename Cvt<In>::Acc;
  struct Frag {
    Acc x[8];
  };
  static __device__ __forceinline__ void zero(Frag& f) {
#pragma unroll
    for (int r = 0; r < 8; ++r) f.x[r] = Acc(0);
  }
  static __device__ __forceinline__ void load(Frag& f, const Acc* p, int ld) {
    const int lane = threadIdx.x % 32, c = lane % 16, r0 = lane / 16;
#pragma unroll
    for (int r = 0; r < 8; ++r) f.x[r] = p[(r0 + 2 * r) * ld + c];
  }
  static __device__ __forceinline__ void store(Acc* p, int ld, const Frag& f) {
    const int lane = threadIdx.x % 32, c = lane % 16, r0 = lane / 16;
#pragma unroll
    for (int r = 0; r < 8; ++r) p[(r0 + 2 * r) * ld + c] = f.x[r];
  }
  static __device__ __forceinline__ void scale(Frag& f, Acc g) {
#pragma unroll
    for (int r = 0; r < 8; ++r) f.x[r] *= g;
  }
  template <bool kACol, bool kBCol>
  static __device__ __forceinline__ void mma(Frag& f, const In* A, int lda, int a_step, const In* B,
                                             int ldb, int b_step, int steps) {
    const int lane = threadIdx.x % 32, c = lane % 16, r0 = lane / 16;
    for (int s = 0; s < steps; ++s) {
      const In* a = A + s * a_step;
      const In* b = B + s * b_step;
#pragma unroll 4
      for (int kk = 0; kk < 16; ++kk) {
        const Acc bv = Cvt<In>::to_acc(kBCol ? b[c * ldb + kk] : b[kk * ldb + c]);
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          const int row = r0 + 2 * r;
          f.x[r] += Cvt<In>::to_acc(kACol ? a[kk * lda + row] : a[row * lda + kk]) * bv;
        }
      }
    }
  }
};

#ifdef LEET_HAS_WMMA
// Tensor cores through wmma (m16n16k16, float16 / bfloat16 operands, fp32 accumulator).
template <typename In>
struct Tile<In, true> {
  using Acc = float;
  using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ void zero(Frag& f) { nvcuda::wmma::fill_fragment(f, 0.0f); }
  static __device__ __forceinline__ void load(Frag& f, const float* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, p, ld, nvcuda::wmma::mem_row_major);
  }
  static __device__ __forceinline__ void store(float* p, int ld, const Frag& f) {
    nvcuda::wmma::store_matrix_sync(p, f, ld, nvcuda::wmma::mem_row_major);
  }
  static __device__ __forceinline__ void scale(Frag& f, float g) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] *= g;  // uniform: the layout does not matter
  }
  template <bool kACol, bool kBCol>
  static __device__ __forceinline__ void mma(Frag& f, const In* A, int lda, int a_step, const In* B,
                                             int ldb, int b_step, int steps) {
    using namespace nvcuda;
    using LA = std::conditional_t<kACol, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<kBCol, wmma::col_major, wmma::row_major>;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, In, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, In, LB> fb;
    for (int s = 0; s < steps; ++s) {
      wmma::load_matrix_sync(fa, A + s * a_step, lda);
      wmma::load_matrix_sync(fb, B + s * b_step, ldb);
      wmma::mma_sync(f, fa, fb, f);
    }
  }
};
#endif

template <typename In, bool kTC>
__device__ void chunked_body(const leet_decay_attn_args& args, const Layout& lay) {
  using Ops = Tile<In, kTC>;
  using Acc = typename Cvt<In>::Acc;
  using Frag = typename Ops::Frag;
  unsigned char* smem = dynamic_smem();
  In* Qs = reinterpret_cast<In*>(smem + lay.q);
  In* Ks = reinterpret_cast<In*>(smem + lay.k);
  In* Vs = reinterpret_cast<In*>(smem + lay.v);
  Acc* Sc = reinterpret_cast<Acc*>(smem + lay.sc);  // Q K^T
  In* Ab = reinterpret_cast<In*>(smem + lay.ab);     // masked, decayed scores
  Acc* Os = reinterpret_cast<Acc*>(smem + lay.o);   // output tile of the chunk
  Acc* Ss = reinterpret_cast<Acc*>(smem + lay.s);   // state (accumulator)
  In* Sb = reinterpret_cast<In*>(smem + lay.sb);     // state rounded to In (operand)
  double* Ls = reinterpret_cast<double*>(smem + lay.L);
  Acc* eq = reinterpret_cast<Acc*>(smem + lay.eq);  // exp(L_i)
  Acc* ek = reinterpret_cast<Acc*>(smem + lay.ek);  // exp(L_end - L_j); ek[C] = exp(L_end)
  const int C = lay.C, Kp = lay.Kp, Vt = lay.Vt;
  const int ld_qk = lay.ld_qk, ld_v = lay.ld_v, ld_sc = lay.ld_sc, ld_ab = lay.ld_ab;
  const int ld_o = lay.ld_o, ld_s = lay.ld_s, ld_sb = lay.ld_sb;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const int64_t H = args.H, T = args.T, K = args.K, V = args.V;
  const int64_t n_vt = ceil_div(V, Vt);
  const int64_t bh = blockIdx.x / n_vt, b = bh / H, h = bh % H;
  const int64_t v0 = (blockIdx.x % n_vt) * Vt;
  const In* qg = head_ptr<In>(args.q, args.q_strides, b, h);
  const In* kg = head_ptr<In>(args.k, args.k_strides, b, h);
  const In* vg = head_ptr<In>(args.v, args.v_strides, b, h);
  const int64_t qst = args.q_strides[2], kst = args.k_strides[2], vst = args.v_strides[2];
  In* og = static_cast<In*>(args.o) + bh * T * V;
  const bool decay = args.decay != LEET_DECAY_NONE;
  const Acc scale = static_cast<Acc>(args.scale);
  const In zero = Cvt<In>::from_acc(Acc(0));

  // The state entering the sequence (zero rows/columns in the padding).
  const Acc* s0 = args.initial_state ? static_cast<const Acc*>(args.initial_state) + bh * K * V : nullptr;
  for (int r = warp; r < Kp; r += nwarps) {
    for (int c = lane; c < Vt; c += 32) {
      const Acc x = (s0 && r < K && v0 + c < V) ? s0[r * V + v0 + c] : Acc(0);
      Ss[r * ld_s + c] = x;
      if constexpr (kTC) Sb[r * ld_sb + c] = Cvt<In>::from_acc(x);
    }
  }
  bool has_state = s0 != nullptr;  // false while S is known to be zero
  // Whether the chunk's V holds a NaN or inf, one flag per chunk parity: chunk c sets
  // flag[c & 1] while loading and reads it in step 4; chunk c + 1 clears it in its step
  // 2 (after its first barrier, so after chunk c's last read) for chunk c + 2.
  __shared__ int nonfinite_v[2];
  if (threadIdx.x == 0) nonfinite_v[0] = nonfinite_v[1] = 0;
  __syncthreads();

  for (int64_t c0 = 0; c0 < T; c0 += C) {
    const int n = static_cast<int>(T - c0 < C ? T - c0 : C);  // valid rows of this chunk
    const int nt = (n + 15) / 16;                              // 16-row tiles holding them
    const int parity = static_cast<int>((c0 / C) & 1);

    // 1. Load the chunk (zeros past the end, in the K padding and past V) and, in
    //    warp 0, the cumulative log decay L by a warp scan (two tokens per lane).
    for (int i = warp; i < C; i += nwarps) {
      const bool row = i < n;
      for (int c = lane; c < Kp; c += 32) {
        In xq = zero, xk = zero;
        if (row && c < K) {
          xq = qg[(c0 + i) * qst + c];
          xk = kg[(c0 + i) * kst + c];
        }
        Qs[i * ld_qk + c] = xq;
        Ks[i * ld_qk + c] = xk;
      }
      bool bad = false;
      for (int c = lane; c < Vt; c += 32) {
        In xv = zero;
        if (row && v0 + c < V) xv = vg[(c0 + i) * vst + v0 + c];
        Vs[i * ld_v + c] = xv;
        const Acc x = Cvt<In>::to_acc(xv);
        bad = bad || !((x - x) == Acc(0));  // NaN or inf
      }
      if (bad) nonfinite_v[parity] = 1;  // (every writer writes 1)
    }
    if (decay && warp == 0) {
      const int i0 = 2 * lane, i1 = 2 * lane + 1;
      double x0 = 0.0, x1 = 0.0;  // tokens past the end decay by nothing
      if (args.decay == LEET_DECAY_PER_HEAD) {
        const double a = args.log_decay[h];
        x0 = i0 < n ? a : 0.0;
        x1 = i1 < n ? a : 0.0;
      } else {
        const double* a = args.log_decay + bh * T + c0;
        if (i0 < n) x0 = a[i0];
        if (i1 < n) x1 = a[i1];
      }
      // Raise entries below -(800 + the chunk's positive sum) to it: every weight through
      // them is exactly 0 either way, but -inf no longer gives inf - inf = NaN and -1e20
      // no longer swallows the small decays after it (csrc/methods.cpp, safe_log_decay).
      double pos = (x0 > 0.0 ? x0 : 0.0) + (x1 > 0.0 ? x1 : 0.0);
      for (int off = 1; off < 32; off <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, pos, off);
        if (lane >= off) pos += y;
      }
      const double floor = -(800.0 + __shfl_sync(0xffffffffu, pos, 31));
      x0 = x0 < floor ? floor : x0;  // (NaN stays NaN)
      x1 = x1 < floor ? floor : x1;
      double incl = x0 + x1;
      for (int off = 1; off < 32; off <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      double excl = __shfl_up_sync(0xffffffffu, incl, 1);
      if (lane == 0) excl = 0.0;
      const double L0 = excl + x0, L1 = L0 + x1;
      const double L_end = __shfl_sync(0xffffffffu, ((n - 1) & 1) ? L1 : L0, (n - 1) / 2);
      if (i0 < C) {
        Ls[i0] = L0;
        eq[i0] = exp_acc(static_cast<Acc>(L0));
        ek[i0] = exp_acc(static_cast<Acc>(L_end - L0));
      }
      if (i1 < C) {
        Ls[i1] = L1;
        eq[i1] = exp_acc(static_cast<Acc>(L1));
        ek[i1] = exp_acc(static_cast<Acc>(L_end - L1));
      }
      if (lane == 0) ek[C] = exp_acc(static_cast<Acc>(L_end));
    }
    __syncthreads();

    // 2. Scores Q K^T: the tiles on and below the diagonal.
    if (threadIdx.x == 0) nonfinite_v[parity ^ 1] = 0;  // for the next chunk
    for (int item = warp; item < nt * nt; item += nwarps) {
      const int ti = item / nt, tj = item % nt;
      if (tj > ti) continue;
      Frag f;
      Ops::zero(f);
      Ops::template mma<false, true>(f, Qs + ti * 16 * ld_qk, ld_qk, 16, Ks + tj * 16 * ld_qk, ld_qk, 16,
                                     Kp / 16);
      Ops::store(Sc + ti * 16 * ld_sc + tj * 16, ld_sc, f);
    }
    __syncthreads();

    // 3. Causal mask and decay of the scores; Q * exp(L_i) and K * exp(L_end - L_j) in place.
    for (int i = warp; i < C; i += nwarps) {
      for (int j = lane; j < C; j += 32) {
        Acc x = Acc(0);
        if (j <= i && i < n) {
          x = Sc[i * ld_sc + j];
          if (decay) x *= exp_acc(static_cast<Acc>(Ls[i] - Ls[j]));
        }
        Ab[i * ld_ab + j] = Cvt<In>::from_acc(x);
      }
    }
    if (decay) {
      for (int i = warp; i < n; i += nwarps) {
        const Acc fq = eq[i], fk = ek[i];
        for (int c = lane; c < K; c += 32) {
          if (has_state) Qs[i * ld_qk + c] = Cvt<In>::from_acc(Cvt<In>::to_acc(Qs[i * ld_qk + c]) * fq);
          Ks[i * ld_qk + c] = Cvt<In>::from_acc(Cvt<In>::to_acc(Ks[i * ld_qk + c]) * fk);
        }
      }
    }
    __syncthreads();

    // 4. O = A V (+ (Q exp(L)) S) and S <- exp(L_end) S + (K exp(L_end - L))^T V.
    //    One list of tiles, O's first; without tensor cores Sb is Ss itself, so the
    //    S update waits for every O tile.
    //    A dense A V reads v_j for j > i too (0 * NaN = NaN): a chunk whose V holds a
    //    NaN or inf leaves A V out here and adds it in step 4b, summing j <= i only.
    const bool exact_av = nonfinite_v[parity] != 0;
    const int n_vtiles = Vt / 16, o_items = nt * n_vtiles, s_items = (Kp / 16) * n_vtiles;
    for (int item = warp; item < o_items; item += nwarps) {
      const int ti = item / n_vtiles, tv = item % n_vtiles;
      Frag f;
      Ops::zero(f);
      if (!exact_av) {
        Ops::template mma<false, false>(f, Ab + ti * 16 * ld_ab, ld_ab, 16, Vs + tv * 16, ld_v, 16 * ld_v,
                                        ti + 1);
      }
      if (has_state) {
        Ops::template mma<false, false>(f, Qs + ti * 16 * ld_qk, ld_qk, 16, Sb + tv * 16, ld_sb,
                                        16 * ld_sb, Kp / 16);
      }
      Ops::store(Os + ti * 16 * ld_o + tv * 16, ld_o, f);
    }
    if constexpr (!kTC) __syncthreads();
    const Acc g = decay ? ek[C] : Acc(1);
    const int first = ((warp - o_items) % nwarps + nwarps) % nwarps;  // continue the round robin
    for (int item = first; item < s_items; item += nwarps) {
      const int tk = item / n_vtiles, tv = item % n_vtiles;
      Acc* sp = Ss + tk * 16 * ld_s + tv * 16;
      Frag f;
      if (has_state) {
        Ops::load(f, sp, ld_s);
        if (decay) Ops::scale(f, g);
      } else {
        Ops::zero(f);
      }
      Ops::template mma<true, false>(f, Ks + tk * 16, ld_qk, 16 * ld_qk, Vs + tv * 16, ld_v, 16 * ld_v, nt);
      Ops::store(sp, ld_s, f);
    }
    __syncthreads();

    // 4b. (chunks with a non-finite value) O += A V, row i summing over j <= i only.
    if (exact_av) {
      for (int i = warp; i < n; i += nwarps) {
        for (int c = lane; c < Vt; c += 32) {
          Acc sum = Acc(0);
          for (int j = 0; j <= i; ++j) sum += Cvt<In>::to_acc(Ab[i * ld_ab + j]) * Cvt<In>::to_acc(Vs[j * ld_v + c]);
          Os[i * ld_o + c] += sum;
        }
      }
      __syncthreads();
    }

    // 5. Write the chunk's output; round the new state for the next chunk's Q S.
    for (int i = warp; i < n; i += nwarps) {
      In* orow = og + (c0 + i) * V + v0;
      for (int c = lane; c < Vt && v0 + c < V; c += 32) orow[c] = Cvt<In>::from_acc(scale * Os[i * ld_o + c]);
    }
    if constexpr (kTC) {
      for (int r = warp; r < Kp; r += nwarps) {
        for (int c = lane; c < Vt; c += 32) Sb[r * ld_sb + c] = Cvt<In>::from_acc(Ss[r * ld_s + c]);
      }
    }
    has_state = true;
    // No barrier needed here: the next chunk's loads touch none of Os, Ss, Sb, and
    // its first writes to them come after two more barriers.
  }

  if (args.final_state) {
    Acc* fs = static_cast<Acc*>(args.final_state) + bh * K * V;
    for (int r = warp; r < K; r += nwarps) {
      for (int c = lane; c < Vt && v0 + c < V; c += 32) fs[r * V + v0 + c] = Ss[r * ld_s + c];
    }
  }
}

template <typename In, bool kTC>
__global__ void __launch_bounds__(kThreads) chunked_kernel(const leet_decay_attn_args args, const Layout lay) {
#ifdef LEET_HAS_WMMA
  chunked_body<In, kTC>(args, lay);
#else
  // Built for an architecture without bfloat16 wmma: the launcher never starts the
  // tensor-core kernels there (it returns cudaErrorNotSupported).
  if constexpr (kTC) {
    __trap();
  } else {
    chunked_body<In, kTC>(args, lay);
  }
#endif
}

}  // namespace
}  // namespace leet_cuda
