// Shared declarations of the decay_attn implementations.
#pragma once
#include <ATen/ATen.h>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace leet {

// An output buffer: at::empty, or NaN-filled when LEET_POISON_OUTPUTS=1 so that
// tests catch elements a kernel forgot to write.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
  const char* poison = std::getenv("LEET_POISON_OUTPUTS");
  if (poison != nullptr && poison[0] == '1') t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// float32, float16, bfloat16 or float64: the input dtypes every kernel accepts.
bool is_supported_float(at::ScalarType t);

// Validates the arguments of decay_attn (same rules and messages as ops/validation.py).
void check_decay_attn_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::string& method,
    const std::string& backend);

// float64 for float64 inputs, float32 otherwise: the accumulation and state dtype.
at::ScalarType compute_dtype(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// The device-generic methods, written with ATen ops (any device): backend "aten".
std::tuple<at::Tensor, at::Tensor> decay_attn_aten(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state, bool output_final_state,
    const std::string& method);

// The fused CPU chunked kernel (float32 / float64 compute).
std::tuple<at::Tensor, at::Tensor> decay_attn_chunked_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state, bool output_final_state);

}  // namespace leet
