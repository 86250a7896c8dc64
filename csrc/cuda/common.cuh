// Small helpers shared by the decay_attn kernels. Conversions are explicit so the
// code also compiles under torch's -D__CUDA_NO_HALF_CONVERSIONS__ and friends.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "decay_attn_kernels.h"

namespace leet_cuda {

#ifndef LEET_HOST_EMULATION  // csrc/cuda/testing/cpu_emulation.h provides it on the CPU
// The block's dynamic shared memory (128-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char leet_dynamic_smem[];
  return leet_dynamic_smem;
}
#endif

// Cvt<T>: the accumulation type of inputs of type T and the conversions to and from it.
template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
};

template <>
struct Cvt<double> {
  using Acc = double;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
};

template <>
struct Cvt<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};

template <>
struct Cvt<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// Base pointer of (b, h) in a [B, H, T, D] tensor with element strides s[0..2].
template <typename T>
__device__ __forceinline__ const T* head_ptr(const void* p, const int64_t* s, int64_t b, int64_t h) {
  return static_cast<const T*>(p) + b * s[0] + h * s[1];
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace leet_cuda
