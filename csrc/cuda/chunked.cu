// The chunked method of decay_attn: launch plan and launcher (the kernel and its
// design notes are in chunked_kernel.cuh).
#include "chunked_kernel.cuh"

namespace leet_cuda {
namespace {

template <typename In, bool kTC>
cudaError_t launch(const leet_decay_attn_args& args, const leet_chunked_plan& plan, const Layout& lay,
                   cudaStream_t stream) {
  auto* kernel = &chunked_kernel<In, kTC>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(plan.blocks), plan.threads, plan.smem_bytes, stream>>>(args, lay);
  return cudaGetLastError();
}

int element_size(int dtype) { return dtype == LEET_FLOAT64 ? 8 : dtype == LEET_FLOAT32 ? 4 : 2; }
bool uses_tensor_cores(int dtype) { return dtype == LEET_FLOAT16 || dtype == LEET_BFLOAT16; }

Layout plan_layout(const leet_decay_attn_args& args, const leet_chunked_plan& plan) {
  return make_layout(plan.chunk, plan.k_padded, plan.v_tile, element_size(args.dtype),
                     args.dtype == LEET_FLOAT64 ? 8 : 4, plan.tensor_cores != 0);
}

}  // namespace
}  // namespace leet_cuda

extern "C" int leet_decay_attn_chunked_plan(const leet_decay_attn_args* args, int num_sms, size_t smem_limit,
                                            leet_chunked_plan* plan) {
  using namespace leet_cuda;
  if (plan == nullptr || leet_decay_attn_validate(args) != nullptr) return -1;
  const bool tc = uses_tensor_cores(args->dtype);
  const int Kp = static_cast<int>(ceil_div(args->K, 16) * 16);
  const int64_t Vp = ceil_div(args->V, 16) * 16, heads = args->B * args->H;
  int Vt = 64;
  while (Vt > 16 && Vt / 2 >= Vp) Vt /= 2;  // no wider than V
  // Narrower V tiles give more blocks (each recomputes Q K^T): fill the device first.
  while (Vt > 16 && heads * ceil_div(args->V, Vt) < num_sms) Vt /= 2;
  for (; Vt >= 16; Vt /= 2) {
    for (int C = 64; C >= 16; C /= 2) {
      const Layout l = make_layout(C, Kp, Vt, element_size(args->dtype), args->dtype == LEET_FLOAT64 ? 8 : 4, tc);
      if (l.total > smem_limit) continue;
      const int64_t blocks = heads * ceil_div(args->V, Vt);
      if (blocks > 0x7fffffff) return -1;
      plan->chunk = C;
      plan->k_padded = Kp;
      plan->v_tile = Vt;
      plan->tensor_cores = tc ? 1 : 0;
      plan->threads = kThreads;
      plan->blocks = blocks;
      plan->smem_bytes = l.total;
      return 0;
    }
  }
  return -1;
}

extern "C" cudaError_t leet_decay_attn_chunked(const leet_decay_attn_args* args, cudaStream_t stream) {
  using namespace leet_cuda;
  if (leet_decay_attn_validate(args) != nullptr) return cudaErrorInvalidValue;
  int device = 0, num_sms = 0, smem_optin = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (uses_tensor_cores(args->dtype) && major < 8) return cudaErrorNotSupported;
  leet_chunked_plan plan;
  if (leet_decay_attn_chunked_plan(args, num_sms, static_cast<size_t>(smem_optin), &plan) != 0) {
    return cudaErrorInvalidConfiguration;
  }
  const Layout lay = plan_layout(*args, plan);
  switch (args->dtype) {
    case LEET_FLOAT32: return launch<float, false>(*args, plan, lay, stream);
    case LEET_FLOAT64: return launch<double, false>(*args, plan, lay, stream);
    case LEET_FLOAT16: return launch<__half, true>(*args, plan, lay, stream);
    case LEET_BFLOAT16: return launch<__nv_bfloat16, true>(*args, plan, lay, stream);
    default: return cudaErrorInvalidValue;
  }
}
