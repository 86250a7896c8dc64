// torch glue of the CUDA kernels: leet::_decay_attn_cuda on CUDA tensors.
// Compiled only in CUDA builds (setup.py); the kernels behind the C API in
// decay_attn_kernels.h compile without torch.
#include "../backends.h"
#include "decay_attn_kernels.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace leet {
namespace {

static_assert(kCudaMaxHeadDim == LEET_MAX_HEAD_DIM, "csrc/decay_attn.h and decay_attn_kernels.h disagree");

using at::Tensor;

int leet_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return LEET_FLOAT32;
    case at::kHalf: return LEET_FLOAT16;
    case at::kBFloat16: return LEET_BFLOAT16;
    default: return LEET_FLOAT64;
  }
}

// The one dtype the kernels read q, k, v in: theirs if they agree, float64 if any is
// float64, else float32. float16 / bfloat16 need tensor cores with bfloat16 (sm_80+);
// older devices compute them in float32.
at::ScalarType kernel_dtype(const Tensor& q, const Tensor& k, const Tensor& v) {
  if (compute_dtype(q, k, v) == at::kDouble) return at::kDouble;
  const auto t = q.scalar_type();
  if (k.scalar_type() != t || v.scalar_type() != t) return at::kFloat;
  if (t == at::kHalf || t == at::kBFloat16) {
    int major = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
    TORCH_CHECK(err == cudaSuccess, "_decay_attn_cuda: ", cudaGetErrorString(err));
    if (major < 8) return at::kFloat;
  }
  return t;
}

// x in dtype dt with a contiguous last dim (a permuted view of a fused projection is
// read in place).
Tensor kernel_ready(const Tensor& x, at::ScalarType dt) {
  auto y = x.to(dt);
  return (y.size(3) <= 1 || y.stride(3) == 1) ? y : y.contiguous();
}

void set_input(const Tensor& x, const void** ptr, int64_t* strides) {
  *ptr = x.data_ptr();
  for (int i = 0; i < 3; ++i) strides[i] = x.stride(i);
}

std::tuple<Tensor, Tensor> decay_attn_cuda(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& log_decay,
    double scale, const std::optional<Tensor>& initial_state, bool output_final_state,
    const std::string& method) {
  // The backend table's "cuda" row: CUDA tensors, methods auto/chunked/recurrent, K <= 256.
  check_decay_attn_inputs(q_in, k_in, v_in, log_decay, initial_state, method, "cuda");
  if (q_in.numel() == 0 || v_in.numel() == 0) {  // nothing to launch; ATen gets the shapes right
    return decay_attn_aten(q_in, k_in, v_in, log_decay, scale, initial_state, output_final_state, "recurrent");
  }
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto dt = kernel_dtype(q_in, k_in, v_in);
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const auto q = kernel_ready(q_in, dt), k = kernel_ready(k_in, dt), v = kernel_ready(v_in, dt);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  Tensor a = log_decay.has_value() ? log_decay->to(at::kDouble).contiguous() : Tensor();
  Tensor s0 = initial_state.has_value() ? initial_state->to(acc).contiguous() : Tensor();
  auto o = at::empty({B, H, T, V}, q.options());
  const auto state_options = q.options().dtype(acc);
  auto state = output_final_state ? at::empty({B, H, K, V}, state_options) : at::empty({0}, state_options);

  leet_decay_attn_args args{};
  args.B = B, args.H = H, args.T = T, args.K = K, args.V = V;
  args.dtype = leet_dtype_of(dt);
  set_input(q, &args.q, args.q_strides);
  set_input(k, &args.k, args.k_strides);
  set_input(v, &args.v, args.v_strides);
  args.o = o.data_ptr();
  args.decay = !a.defined() ? LEET_DECAY_NONE : a.dim() == 1 ? LEET_DECAY_PER_HEAD : LEET_DECAY_PER_POSITION;
  args.log_decay = a.defined() ? a.data_ptr<double>() : nullptr;
  args.initial_state = s0.defined() ? s0.data_ptr() : nullptr;
  args.final_state = output_final_state ? state.data_ptr() : nullptr;
  args.scale = scale;
  if (const char* problem = leet_decay_attn_validate(&args)) TORCH_CHECK(false, "_decay_attn_cuda: ", problem);

  // The GPU "auto" policy is ops/gpu.py's select(), which resolves the method before
  // calling this op; a direct call with "auto" takes the chunked kernel.
  const bool recurrent = method == "recurrent";
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err =
      recurrent ? leet_decay_attn_recurrent(&args, stream) : leet_decay_attn_chunked(&args, stream);
  TORCH_CHECK(err == cudaSuccess, "_decay_attn_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return {o.to(v_in.scalar_type()), state};
}

// The "cuda" row of the backend table (csrc/backends.cpp); builds without nvcc lack it.
const RegisterBackend kRegistered("cuda", &decay_attn_cuda);

}  // namespace

TORCH_LIBRARY_IMPL(leet, CUDA, m) { m.impl("_decay_attn_cuda", &decay_attn_cuda); }

}  // namespace leet
