// The recurrent method of decay_attn: launcher (the kernel is in
// recurrent_kernel.cuh), and the argument checks shared by every launcher.
#include "recurrent_kernel.cuh"

extern "C" const char* leet_decay_attn_validate(const leet_decay_attn_args* a) {
  if (a == nullptr) return "args is NULL";
  if (a->B < 1 || a->H < 1 || a->T < 1 || a->K < 1 || a->V < 1) {
    return "B, H, T, K and V must be >= 1 (the caller handles empty problems)";
  }
  if (a->K > LEET_MAX_HEAD_DIM) return "head dim K must be at most 256";
  if (a->dtype < LEET_FLOAT32 || a->dtype > LEET_FLOAT64) return "unknown dtype";
  if (a->q == nullptr || a->k == nullptr || a->v == nullptr || a->o == nullptr) {
    return "q, k, v and o must not be NULL";
  }
  for (int i = 0; i < 3; ++i) {
    if (a->q_strides[i] < 0 || a->k_strides[i] < 0 || a->v_strides[i] < 0) return "strides must be >= 0";
  }
  if (a->decay < LEET_DECAY_NONE || a->decay > LEET_DECAY_PER_POSITION) return "unknown decay kind";
  if ((a->decay != LEET_DECAY_NONE) != (a->log_decay != nullptr)) {
    return "log_decay must be given exactly when the decay kind is not LEET_DECAY_NONE";
  }
  return nullptr;
}

extern "C" cudaError_t leet_decay_attn_recurrent(const leet_decay_attn_args* args, cudaStream_t stream) {
  using namespace leet_cuda;
  if (leet_decay_attn_validate(args) != nullptr) return cudaErrorInvalidValue;
  const int64_t blocks = args->B * args->H * ceil_div(args->V, kCols);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks)), block(kCols * kGroups);
  switch (args->dtype) {
    case LEET_FLOAT32: recurrent_kernel<float><<<grid, block, 0, stream>>>(*args); break;
    case LEET_FLOAT64: recurrent_kernel<double><<<grid, block, 0, stream>>>(*args); break;
    case LEET_FLOAT16: recurrent_kernel<__half><<<grid, block, 0, stream>>>(*args); break;
    case LEET_BFLOAT16: recurrent_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(*args); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
