// decay_attn on CUDA tensors, registered from C++ so that a process without Python
// (an AOTInductor runner on a GPU) finds it. Plain C++ (no CUDA headers): it routes to
// other operators through the dispatcher, so it is compiled in every build.
//
// After the contract's checks (csrc/contract.cpp), the GPU policy (gpu_plan) picks:
//   ATen     the generic methods of csrc/methods.cpp;
//   Triton   leet::_decay_attn_triton, whose CUDA kernel the Python package registers
//            when triton is installed (ops/gpu.py);
//   CUDA     leet::_decay_attn_cuda, the C++ CUDA kernels (csrc/cuda; nvcc builds).
// Under torch.compile, ops/gpu.py's FunctionalTensorMode rule replaces Triton calls by
// their kernel launches before this kernel is ever reached.
#include "decay_attn.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace leet {
namespace {

using at::Tensor;
using Signature = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, double,
    const std::optional<Tensor>&, bool, const std::string&);  // as _decay_attn_cuda's kernel

std::tuple<Tensor, Tensor> call_kernel_op(
    const char* name, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    double scale, const std::optional<Tensor>& initial_state, bool output_final_state, const std::string& method) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return op.call(q, k, v, log_decay, scale, initial_state, output_final_state, method);
}

std::tuple<Tensor, Tensor> decay_attn_gpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    std::optional<double> scale_arg, const std::optional<Tensor>& initial_state, bool output_final_state,
    const std::string& method, const std::string& backend) {
  check_decay_attn_inputs(q, k, v, log_decay, initial_state, method, backend);
  const double scale = resolve_scale(scale_arg, q.size(3));
  const auto plan = gpu_plan(q, k, v, method, backend, triton_kernels_registered());
  if (plan.impl == 1) {
    return call_kernel_op("leet::_decay_attn_triton", q, k, v, log_decay, scale, initial_state, output_final_state,
                          plan.method);
  }
  if (plan.impl == 2) {
    return call_kernel_op("leet::_decay_attn_cuda", q, k, v, log_decay, scale, initial_state, output_final_state,
                          plan.method);
  }
  return decay_attn_aten(q, k, v, log_decay, scale, initial_state, output_final_state, plan.method);
}

}  // namespace

TORCH_LIBRARY_IMPL(leet, CUDA, m) { m.impl("decay_attn", &decay_attn_gpu); }

}  // namespace leet
