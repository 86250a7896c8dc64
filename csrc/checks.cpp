// Argument checks shared by every decay_attn kernel. ops/validation.py mirrors
// these rules and messages for the fake (meta) path.
#include "decay_attn.h"

#include <c10/util/Exception.h>

namespace leet {
bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

namespace {

constexpr const char* kMethods[] = {"auto", "naive", "recurrent", "chunked", "fleet", "recursive"};
constexpr const char* kBackends[] = {"auto", "aten", "cpu", "triton", "cuda"};

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      is_supported_float(t.scalar_type()), "decay_attn: ", name,
      " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
      t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(
      t.device() == q.device(), "decay_attn: all tensors must be on one device, but q is on ",
      q.device(), " and ", name, " is on ", t.device());
}

}  // namespace

void check_decay_attn_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::string& method,
    const std::string& backend) {
  TORCH_CHECK_VALUE(q.dim() == 4, "decay_attn: q must be a 4-D tensor [B, H, T, K], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "decay_attn: k must be a 4-D tensor [B, H, T, K], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "decay_attn: v must be a 4-D tensor [B, H, T, V], got shape ", v.sizes());
  check_float(q, "q");
  check_float(k, "k");
  check_float(v, "v");
  check_same_device(k, "k", q);
  check_same_device(v, "v", q);
  const auto B = q.size(0), H = q.size(1), T = q.size(2), K = q.size(3), V = v.size(3);
  TORCH_CHECK_VALUE(
      k.size(0) == B && k.size(1) == H && k.size(2) == T,
      "decay_attn: k must have the same [B, H, T] as q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(
      v.size(0) == B && v.size(1) == H && v.size(2) == T,
      "decay_attn: v must have the same [B, H, T] as q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(
      k.size(3) == K, "decay_attn: q and k must have the same head dim K, got q ", q.sizes(),
      " and k ", k.sizes());
  if (log_decay.has_value()) {
    const auto& a = *log_decay;
    check_float(a, "log_decay");
    check_same_device(a, "log_decay", q);
    const bool per_head = a.dim() == 1 && a.size(0) == H;
    const bool per_position = a.dim() == 3 && a.size(0) == B && a.size(1) == H && a.size(2) == T;
    TORCH_CHECK_VALUE(
        per_head || per_position, "decay_attn: log_decay must have shape [H] = [", H,
        "] or [B, H, T] = [", B, ", ", H, ", ", T, "], got ", a.sizes());
  }
  if (initial_state.has_value()) {
    const auto& s = *initial_state;
    check_float(s, "initial_state");
    check_same_device(s, "initial_state", q);
    TORCH_CHECK_VALUE(
        s.dim() == 4 && s.size(0) == B && s.size(1) == H && s.size(2) == K && s.size(3) == V,
        "decay_attn: initial_state must have shape [B, H, K, V] = [", B, ", ", H, ", ", K, ", ",
        V, "], got ", s.sizes());
  }
  bool known = false;
  for (const char* name : kMethods) known = known || method == name;
  TORCH_CHECK_VALUE(
      known, "decay_attn: unknown method '", method,
      "'; expected one of auto, naive, recurrent, chunked, fleet, recursive");
  known = false;
  for (const char* name : kBackends) known = known || backend == name;
  TORCH_CHECK_VALUE(
      known, "decay_attn: unknown backend '", backend, "'; expected one of auto, aten, cpu, triton, cuda");
}

at::ScalarType compute_dtype(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const bool f64 = q.scalar_type() == at::kDouble || k.scalar_type() == at::kDouble ||
                   v.scalar_type() == at::kDouble;
  return f64 ? at::kDouble : at::kFloat;
}

}  // namespace leet
