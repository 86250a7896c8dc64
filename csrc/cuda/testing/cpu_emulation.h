// Runs the decay_attn kernels (csrc/cuda/*_kernel.cuh) on the CPU, for checking their
// arithmetic in a session without a GPU: one std::thread per CUDA thread, std::barrier
// for __syncthreads and the warp shuffles, and a wmma stand-in whose fragments hold
// the whole 16x16 tile (computed redundantly by every lane, stored by lane 0).
//
// It checks indexing, tiling, padding, masking, decay and state handling; it says
// nothing about timing, real wmma fragment layouts, or the GPU memory model. Include
// it before the kernel headers.
#pragma once

#define LEET_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)
#define __shared__ static  // one block runs at a time, so statics are the block's shared memory

namespace emu {
struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim thread_idx, block_idx;
inline Dim block_dim, grid_dim;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline unsigned char* smem = nullptr;
inline uint64_t shuffle_slots[32][32];  // [warp][lane]

inline int lane() { return static_cast<int>(thread_idx.x % 32); }
inline int warp() { return static_cast<int>(thread_idx.x / 32); }

template <typename T>
T exchange(T value, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  std::memcpy(&shuffle_slots[warp()][lane()], &value, sizeof(T));
  warp_barriers[warp()]->arrive_and_wait();
  T out;
  std::memcpy(&out, &shuffle_slots[warp()][src_lane], sizeof(T));
  warp_barriers[warp()]->arrive_and_wait();
  return out;
}

// Runs `kernel()` as `blocks` blocks of `threads` threads (a multiple of 32), one block
// at a time, with `smem_bytes` of dynamic shared memory filled with 0xFF bytes (NaN
// in every float type) before each block.
template <typename F>
void launch(unsigned blocks, unsigned threads, size_t smem_bytes, F kernel) {
  block_dim = {threads, 1, 1};
  grid_dim = {blocks, 1, 1};
  const size_t bytes = (smem_bytes + 127) / 128 * 128 + 128;
  smem = static_cast<unsigned char*>(std::aligned_alloc(128, bytes));
  for (unsigned b = 0; b < blocks; ++b) {
    std::memset(smem, 0xFF, bytes);
    block_barrier = std::make_unique<std::barrier<>>(threads);
    warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        thread_idx = {t, 0, 0};
        block_idx = {b, 0, 0};
        kernel();
      });
    }
    for (auto& th : pool) th.join();
  }
  std::free(smem);
  smem = nullptr;
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __trap() { std::abort(); }
inline unsigned char* dynamic_smem() { return emu::smem; }

template <typename T>
T __shfl_sync(unsigned, T value, int src_lane) {
  return emu::exchange(value, src_lane);
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  const int src = emu::lane() - static_cast<int>(delta);
  return emu::exchange(value, src < 0 ? emu::lane() : src);  // CUDA: lanes below delta keep their value
}

// wmma stand-in: a fragment is the whole 16x16 tile, row-major, in float.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256];
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = to_float(std::is_same_v<L, col_major> ? p[j * ld + i] : p[i * ld + j]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ld, layout_t) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = p[i * ld + j];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t) {
  if (emu::lane() != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ld + j] = f.x[i * 16 + j];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& x : f.x) x = v;
}
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float r[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      r[i * 16 + j] = s;
    }
  std::memcpy(d.x, r, sizeof r);
}
}  // namespace wmma
}  // namespace nvcuda
