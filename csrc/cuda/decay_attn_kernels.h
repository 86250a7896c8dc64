// C launcher API of the decay_attn CUDA kernels (csrc/cuda/*.cu).
//
// The kernels depend only on the CUDA toolkit, so they compile with a plain
// `nvcc -arch=sm_90 -c` (no torch needed); decay_attn_cuda.cpp is the torch glue.
//
// Problem: for every (b, h), S_{-1} = initial_state (or 0),
//   S_t = exp(a_t) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t,
// with q, k [B, H, T, K] and v [B, H, T, V] in one dtype, accumulation in float32
// (float64 for float64 inputs).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum leet_dtype { LEET_FLOAT32 = 0, LEET_FLOAT16 = 1, LEET_BFLOAT16 = 2, LEET_FLOAT64 = 3 };
enum leet_decay { LEET_DECAY_NONE = 0, LEET_DECAY_PER_HEAD = 1, LEET_DECAY_PER_POSITION = 2 };

// Largest head dim K the kernels take (the chunk tiles and the recurrent state
// registers are sized for it). V is unbounded: it is split into tiles.
#define LEET_MAX_HEAD_DIM 256

typedef struct leet_decay_attn_args {
  int64_t B, H, T, K, V;  // all >= 1 (the glue handles empty problems)
  int dtype;              // enum leet_dtype: q, k, v and o
  // Element strides of the b, h, t dims; the last dim must be contiguous.
  const void* q;
  int64_t q_strides[3];
  const void* k;
  int64_t k_strides[3];
  const void* v;
  int64_t v_strides[3];
  void* o;                    // [B, H, T, V], contiguous
  int decay;                  // enum leet_decay
  const double* log_decay;    // [H] or [B, H, T], contiguous; NULL for LEET_DECAY_NONE
  const void* initial_state;  // [B, H, K, V] contiguous, float32 (float64 for LEET_FLOAT64), or NULL
  void* final_state;          // same layout and dtype, or NULL when not wanted
  double scale;
} leet_decay_attn_args;

// Launch configuration of the chunked kernel (host logic only; see leet_decay_attn_chunked_plan).
typedef struct leet_chunked_plan {
  int chunk;          // C: tokens per chunk (16, 32 or 64)
  int k_padded;       // K rounded up to a multiple of 16
  int v_tile;         // columns of V per block (16, 32 or 64)
  int tensor_cores;   // 1: wmma (float16 / bfloat16), 0: scalar FMA (float32 / float64)
  int threads;        // per block
  int64_t blocks;     // B * H * ceil(V / v_tile)
  size_t smem_bytes;  // dynamic shared memory per block
} leet_chunked_plan;

// NULL when the arguments are usable, else a message naming the problem. No CUDA call.
const char* leet_decay_attn_validate(const leet_decay_attn_args* args);

// Picks the chunked kernel's tiles for a device with `num_sms` multiprocessors and
// `smem_limit` bytes of opt-in shared memory per block. Returns 0 on success, -1 if
// the arguments are invalid or no tile fits. No CUDA call.
int leet_decay_attn_chunked_plan(const leet_decay_attn_args* args, int num_sms, size_t smem_limit,
                                 leet_chunked_plan* plan);

// The chunked method: tensor cores (wmma, fp32 accumulate) for float16 / bfloat16
// on sm_80+; a scalar path for float32 / float64. Asynchronous on `stream`.
// Returns cudaErrorInvalidValue for invalid arguments (before any CUDA call),
// cudaErrorNotSupported for float16 / bfloat16 on a device below sm_80.
cudaError_t leet_decay_attn_chunked(const leet_decay_attn_args* args, cudaStream_t stream);

// The recurrent method (token by token; the state lives in registers). Any dtype.
cudaError_t leet_decay_attn_recurrent(const leet_decay_attn_args* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
