// The argument contract of every leet operator, written once.
//
// Every kernel (CPU, CUDA, the ATen fallback, the decoding steps) calls these checks,
// and so do the fake (meta) kernels in ops/: they reach them through the check ops
// registered at the bottom (leet::_check_decay_attn, leet::_check_decay_attn_step),
// which read only metadata (sizes, possibly symbolic; dtypes; devices), so they run on
// fake tensors under torch.compile and export. Eager, fake and compiled calls
// therefore fail alike, with the same first bad argument and the same message.
#include "backends.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

namespace leet {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

at::ScalarType compute_dtype(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const bool f64 = q.scalar_type() == at::kDouble || k.scalar_type() == at::kDouble ||
                   v.scalar_type() == at::kDouble;
  return f64 ? at::kDouble : at::kFloat;
}

double resolve_scale(std::optional<double> scale, int64_t K) {
  return scale.has_value() ? *scale : (K > 0 ? 1.0 / std::sqrt(static_cast<double>(K)) : 1.0);
}

namespace {

void check_float(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      is_supported_float(t.scalar_type()), op, ": ", name,
      " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
      t.scalar_type());
}

void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(
      t.device() == q.device(), op, ": all tensors must be on one device, but q is on ", q.device(),
      " and ", name, " is on ", t.device());
}

}  // namespace

void check_decay_attn_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::string& method,
    const std::string& backend) {
  const char* op = "decay_attn";
  TORCH_CHECK_VALUE(q.defined(), "decay_attn: q must be a tensor, got None");
  TORCH_CHECK_VALUE(k.defined(), "decay_attn: k must be a tensor, got None");
  TORCH_CHECK_VALUE(v.defined(), "decay_attn: v must be a tensor, got None");
  TORCH_CHECK_VALUE(q.dim() == 4, "decay_attn: q must be a 4-D tensor [B, H, T, K], got shape ", q.sym_sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "decay_attn: k must be a 4-D tensor [B, H, T, K], got shape ", k.sym_sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "decay_attn: v must be a 4-D tensor [B, H, T, V], got shape ", v.sym_sizes());
  check_float(op, q, "q");
  check_float(op, k, "k");
  check_float(op, v, "v");
  check_same_device(op, k, "k", q);
  check_same_device(op, v, "v", q);
  const auto B = q.sym_size(0), H = q.sym_size(1), T = q.sym_size(2), K = q.sym_size(3), V = v.sym_size(3);
  TORCH_CHECK_VALUE(
      k.sym_size(0) == B && k.sym_size(1) == H && k.sym_size(2) == T,
      "decay_attn: k must have the same [B, H, T] as q ", q.sym_sizes(), ", got ", k.sym_sizes());
  TORCH_CHECK_VALUE(
      v.sym_size(0) == B && v.sym_size(1) == H && v.sym_size(2) == T,
      "decay_attn: v must have the same [B, H, T] as q ", q.sym_sizes(), ", got ", v.sym_sizes());
  TORCH_CHECK_VALUE(
      k.sym_size(3) == K, "decay_attn: q and k must have the same head dim K, got q ", q.sym_sizes(),
      " and k ", k.sym_sizes());
  if (log_decay.has_value() && log_decay->defined()) {
    const auto& a = *log_decay;
    check_float(op, a, "log_decay");
    check_same_device(op, a, "log_decay", q);
    const bool per_head = a.dim() == 1 && a.sym_size(0) == H;
    const bool per_position =
        a.dim() == 3 && a.sym_size(0) == B && a.sym_size(1) == H && a.sym_size(2) == T;
    TORCH_CHECK_VALUE(
        per_head || per_position, "decay_attn: log_decay must have shape [H] = [", H,
        "] or [B, H, T] = [", B, ", ", H, ", ", T, "], got ", a.sym_sizes());
  }
  if (initial_state.has_value() && initial_state->defined()) {
    const auto& s = *initial_state;
    check_float(op, s, "initial_state");
    check_same_device(op, s, "initial_state", q);
    TORCH_CHECK_VALUE(
        s.dim() == 4 && s.sym_size(0) == B && s.sym_size(1) == H && s.sym_size(2) == K && s.sym_size(3) == V,
        "decay_attn: initial_state must have shape [B, H, K, V] = [", B, ", ", H, ", ", K, ", ",
        V, "], got ", s.sym_sizes());
  }
  check_method_and_backend(q, k, v, method, backend);  // the tables of csrc/backends.cpp
}

void check_step_inputs(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, const at::Tensor& state, bool in_place) {
  TORCH_CHECK_VALUE(q.defined() && k.defined() && v.defined(), op, ": q, k and v must be tensors, got None");
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be a 3-D tensor [B, H, K], got shape ", q.sym_sizes());
  TORCH_CHECK_VALUE(k.dim() == 3, op, ": k must be a 3-D tensor [B, H, K], got shape ", k.sym_sizes());
  TORCH_CHECK_VALUE(v.dim() == 3, op, ": v must be a 3-D tensor [B, H, V], got shape ", v.sym_sizes());
  check_float(op, q, "q");
  check_float(op, k, "k");
  check_float(op, v, "v");
  const auto B = q.sym_size(0), H = q.sym_size(1), K = q.sym_size(2), V = v.sym_size(2);
  TORCH_CHECK_VALUE(
      k.sym_sizes() == q.sym_sizes(), op, ": k must have the shape of q [B, H, K] = ", q.sym_sizes(),
      ", got ", k.sym_sizes());
  TORCH_CHECK_VALUE(
      v.sym_size(0) == B && v.sym_size(1) == H, op, ": v must have shape [B, H, V] with [B, H] = [", B,
      ", ", H, "] as q, got ", v.sym_sizes());
  TORCH_CHECK_VALUE(
      state.defined(), op, ": state must be a [B, H, K, V] = [", B, ", ", H, ", ", K, ", ", V,
      "] float32 tensor, got None", in_place ? "" : " (leet_compile.decay_attn_step takes state=None as zeros)");
  TORCH_CHECK_TYPE(
      state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble, op,
      ": state must be float32 (or float64), got ", state.scalar_type());
  TORCH_CHECK_VALUE(
      state.dim() == 4 && state.sym_size(0) == B && state.sym_size(1) == H && state.sym_size(2) == K &&
          state.sym_size(3) == V,
      op, ": state must have shape [B, H, K, V] = [", B, ", ", H, ", ", K, ", ", V, "], got ",
      state.sym_sizes());
  if (log_decay.has_value() && log_decay->defined()) {
    const auto& a = *log_decay;
    check_float(op, a, "log_decay");
    const bool per_head = a.dim() == 1 && a.sym_size(0) == H;
    const bool per_batch_head = a.dim() == 2 && a.sym_size(0) == B && a.sym_size(1) == H;
    TORCH_CHECK_VALUE(
        per_head || per_batch_head, op, ": log_decay must have shape [H] = [", H, "] or [B, H] = [",
        B, ", ", H, "], got ", a.sym_sizes());
  }
  check_same_device(op, k, "k", q);
  check_same_device(op, v, "v", q);
  check_same_device(op, state, "state", q);
  if (log_decay.has_value() && log_decay->defined()) check_same_device(op, *log_decay, "log_decay", q);
  if (!in_place) return;
  // The in-place step writes `state` while reading the others: it must be writable
  // memory of its own.
  TORCH_CHECK_VALUE(
      !(state.is_inference() && !c10::InferenceMode::is_enabled()), op,
      ": state is an inference tensor (created under torch.inference_mode()); it can only be "
      "updated in place inside inference mode (or pass a normal tensor, e.g. state.clone())");
  TORCH_CHECK_VALUE(
      at::has_internal_overlap(state) != at::MemOverlap::Yes, op,
      ": state has overlapping elements (an expanded or broadcast view, strides ", state.sym_strides(),
      "); pass a tensor with memory of its own (e.g. state.contiguous())");
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : inputs) {
    // Fake tensors have no addresses: sharing a storage is the test there.
    const bool shares = state.is_alias_of(*t);
    TORCH_CHECK_VALUE(
        !shares || at::get_overlap_status(state, *t) == at::MemOverlapStatus::No, op,
        ": state shares memory with ", name, "; the in-place update would change ", name,
        " while it is read (pass separate tensors, or use decay_attn_step)");
  }
  if (log_decay.has_value() && log_decay->defined()) {
    TORCH_CHECK_VALUE(
        !state.is_alias_of(*log_decay) || at::get_overlap_status(state, *log_decay) == at::MemOverlapStatus::No,
        op, ": state shares memory with log_decay; the in-place update would change log_decay while it is "
        "read (pass separate tensors, or use decay_attn_step)");
  }
}

namespace {

// The check ops: what the fake kernels call (metadata only; no outputs).
void check_decay_attn_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& initial_state, c10::string_view method, c10::string_view backend) {
  check_decay_attn_inputs(q, k, v, log_decay, initial_state, std::string(method), std::string(backend));
}

void check_step_op(
    c10::string_view op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& state) {
  const std::string name(op);
  check_step_inputs(name.c_str(), q, k, v, log_decay, state.has_value() ? *state : at::Tensor(),
                    name == "decay_attn_step_");
}

// The rules Python needs values of (ops/decay_attn.py compute_dtype, resolve_scale).
std::string compute_dtype_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return compute_dtype(q, k, v) == at::kDouble ? "float64" : "float32";
}

double scale_op(std::optional<double> scale, int64_t K) { return resolve_scale(scale, K); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(leet, m) {
  // compute_dtype and resolve_scale for Python (ops/decay_attn.py; its one copy of each, for traced code, is pinned by a test).
  m.def("_decay_attn_compute_dtype(Tensor q, Tensor k, Tensor v) -> str", &compute_dtype_op);
  m.def("_decay_attn_scale(float? scale, int K) -> float", &scale_op);
  // Raise exactly the error the op's kernels would raise for these arguments (or return).
  m.def(
      "_check_decay_attn(Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor? initial_state, "
      "str method, str backend) -> ()",
      &check_decay_attn_op);
  m.def(
      "_check_decay_attn_step(str op, Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor? state) -> ()",
      &check_step_op);
}

}  // namespace leet
