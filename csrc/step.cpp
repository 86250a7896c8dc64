// One decoding step of decay_attn, for generation after a prefill:
//   S' = exp(log_decay) * S + k^T v,   o = scale * q S'
// per (b, h): O(K V) work whatever the context length, and no host synchronisation
// (no .item(), no data-dependent shapes), so a decode loop can be captured in a
// CUDA graph. Written with ATen ops and registered as CompositeExplicitAutograd, so
// it runs on any device and from a C++ AOTInductor runner. ops/step.py mirrors the
// argument checks (same rules, same messages) for the fake path.
#include "decay_attn.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace leet {
namespace {

using at::Tensor;

void check_step_inputs(
    const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
    const std::optional<Tensor>& log_decay, const Tensor& state) {
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be a 3-D tensor [B, H, K], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3, op, ": k must be a 3-D tensor [B, H, K], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 3, op, ": v must be a 3-D tensor [B, H, V], got shape ", v.sizes());
  const std::pair<const char*, const Tensor*> named[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK_TYPE(
        is_supported_float(t->scalar_type()), op, ": ", name,
        " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
        t->scalar_type());
  }
  const auto B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  TORCH_CHECK_VALUE(
      k.sizes() == q.sizes(), op, ": k must have the shape of q [B, H, K] = ", q.sizes(), ", got ",
      k.sizes());
  TORCH_CHECK_VALUE(
      v.size(0) == B && v.size(1) == H, op, ": v must have shape [B, H, V] with [B, H] = [", B,
      ", ", H, "] as q, got ", v.sizes());
  TORCH_CHECK_TYPE(
      state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble, op,
      ": state must be float32 (or float64), got ", state.scalar_type());
  TORCH_CHECK_VALUE(
      state.dim() == 4 && state.size(0) == B && state.size(1) == H && state.size(2) == K &&
          state.size(3) == V,
      op, ": state must have shape [B, H, K, V] = [", B, ", ", H, ", ", K, ", ", V, "], got ",
      state.sizes());
  if (log_decay.has_value()) {
    const auto& a = *log_decay;
    TORCH_CHECK_TYPE(
        is_supported_float(a.scalar_type()), op,
        ": log_decay must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
        a.scalar_type());
    const bool per_head = a.dim() == 1 && a.size(0) == H;
    const bool per_batch_head = a.dim() == 2 && a.size(0) == B && a.size(1) == H;
    TORCH_CHECK_VALUE(
        per_head || per_batch_head, op, ": log_decay must have shape [H] = [", H, "] or [B, H] = [",
        B, ", ", H, "], got ", a.sizes());
  }
  const std::pair<const char*, const Tensor*> others[] = {{"k", &k}, {"v", &v}, {"state", &state}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(
        t->device() == q.device(), op, ": all tensors must be on one device, but q is on ",
        q.device(), " and ", name, " is on ", t->device());
  }
  if (log_decay.has_value()) {
    TORCH_CHECK_VALUE(
        log_decay->device() == q.device(), op, ": all tensors must be on one device, but q is on ",
        q.device(), " and log_decay is on ", log_decay->device());
  }
}

// exp(log_decay) as [1 or B, H, 1, 1] in the state's dtype (undefined without decay).
Tensor step_gamma(const std::optional<Tensor>& log_decay, const Tensor& state) {
  if (!log_decay.has_value()) return Tensor();
  const auto& a = *log_decay;
  const int64_t H = state.size(1);
  auto g = a.to(state.scalar_type()).exp();
  return a.dim() == 1 ? g.view({1, H, 1, 1}) : g.view({a.size(0), H, 1, 1});
}

// S += k^T v, broadcast in place (no K x V temporary).
void add_outer(Tensor& S, const Tensor& k, const Tensor& v) {
  const auto dt = S.scalar_type();
  S.addcmul_(k.to(dt).unsqueeze(-1), v.to(dt).unsqueeze(-2));
}

// o = scale * q S in the state's dtype, returned in v's dtype, contiguous [B, H, V].
Tensor read_out(const Tensor& q, const Tensor& S, double scale, at::ScalarType out_dtype) {
  auto qs = q.to(S.scalar_type()) * scale;  // B H K: cheaper to scale than the output
  return at::matmul(qs.unsqueeze(-2), S).squeeze(-2).to(out_dtype).contiguous();
}

std::tuple<Tensor, Tensor> decay_attn_step(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    const Tensor& state, double scale) {
  check_step_inputs("decay_attn_step", q, k, v, log_decay, state);
  // A fresh contiguous state (the fake kernel promises contiguous results).
  auto S = at::empty(state.sizes(), state.options().memory_format(at::MemoryFormat::Contiguous));
  auto gamma = step_gamma(log_decay, state);
  if (gamma.defined()) at::mul_out(S, state, gamma);
  else S.copy_(state);
  add_outer(S, k, v);
  return {read_out(q, S, scale, v.scalar_type()), S};
}

Tensor decay_attn_step_(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    const Tensor& state, double scale) {
  check_step_inputs("decay_attn_step_", q, k, v, log_decay, state);
  Tensor S = state;  // same storage: every update below is in place
  auto gamma = step_gamma(log_decay, state);
  if (gamma.defined()) S.mul_(gamma);
  add_outer(S, k, v);
  return read_out(q, S, scale, v.scalar_type());
}

// The in-place step has no derivative (autograd cannot follow a state that is
// overwritten every token). Without this kernel autograd would fall back to recording
// the ATen ops inside, with a deprecation warning; a clear error is better. Below
// autograd it runs the kernel above (inner in-place ops still bump `state`'s version).
Tensor decay_attn_step_autograd(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    const Tensor& state, double scale) {
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (q.requires_grad() || k.requires_grad() || v.requires_grad() || state.requires_grad() ||
       (log_decay.has_value() && log_decay->requires_grad()));
  TORCH_CHECK(
      !needs_grad,
      "decay_attn_step_: the in-place step does not support autograd, but an input requires "
      "grad; run it under torch.no_grad() / torch.inference_mode(), or use the functional "
      "decay_attn_step, which is differentiable");
  c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("leet::decay_attn_step_", "")
                             .typed<decltype(decay_attn_step_)>();
  return op.call(q, k, v, log_decay, state, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(leet, CompositeExplicitAutograd, m) {
  m.impl("decay_attn_step", &decay_attn_step);
  m.impl("decay_attn_step_", &decay_attn_step_);
}

TORCH_LIBRARY_IMPL(leet, Autograd, m) {
  m.impl("decay_attn_step_", &decay_attn_step_autograd);
}

}  // namespace leet
