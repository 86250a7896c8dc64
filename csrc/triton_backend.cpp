// The "triton" row of the backend table (csrc/backends.cpp): the Triton kernels of
// ops/triton_kernels.py, which the Python package registers as the CUDA kernel of
// leet::_decay_attn_triton when triton is installed (ops/gpu.py). Plain C++: it calls
// that op through the dispatcher, so the row has its implementation in every build and
// is present wherever the op has a CUDA kernel (the table's kernel_op).
// Under torch.compile, ops/gpu.py's FunctionalTensorMode rule replaces Triton calls by
// their kernel launches before this is ever reached.
#include "backends.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace leet {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> decay_attn_triton(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay, double scale,
    const std::optional<Tensor>& initial_state, bool output_final_state, const std::string& method) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("leet::_decay_attn_triton", "")
                             .typed<std::remove_pointer_t<BackendImpl>>();
  return op.call(q, k, v, log_decay, scale, initial_state, output_final_state, method);
}

const RegisterBackend kRegistered("triton", &decay_attn_triton);

}  // namespace
}  // namespace leet
