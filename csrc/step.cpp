// One decoding step of decay_attn, for generation after a prefill:
//   S' = exp(log_decay) * S + k^T v,   o = scale * q S'
// per (b, h): O(K V) work whatever the context length, and no host synchronisation
// (no .item(), no data-dependent shapes), so a decode loop can be captured in a
// CUDA graph. Written with ATen ops and registered as CompositeExplicitAutograd, so
// it runs on any device and from a C++ AOTInductor runner. Its argument rules are in
// csrc/contract.cpp, shared with the fake kernels.
#include "decay_attn.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace leet {
namespace {

using at::Tensor;

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
    const Tensor& state, std::optional<double> scale_arg) {
  check_step_inputs("decay_attn_step", q, k, v, log_decay, state, /*in_place=*/false);
  const double scale = resolve_scale(scale_arg, q.size(2));
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
    const Tensor& state, std::optional<double> scale_arg) {
  check_step_inputs("decay_attn_step_", q, k, v, log_decay, state, /*in_place=*/true);
  const double scale = resolve_scale(scale_arg, q.size(2));
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
    const Tensor& state, std::optional<double> scale) {
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
