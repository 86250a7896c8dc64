// One decoding step of decay_attn, for generation after a prefill:
//   S' = exp(log_decay) * S + k^T v,   o = scale * q S'
// per (b, h): O(K V) work whatever the context length, and no host synchronisation
// (no .item(), no data-dependent shapes), so a decode loop can be captured in a
// CUDA graph. Written with ATen ops and registered as CompositeExplicitAutograd, so
// it runs on any device and from a C++ AOTInductor runner. Its argument rules are in
// csrc/contract.cpp, shared with the fake kernels.
//
// On CPU the step is one fused loop per (b, h) instead (cpu_step): the ATen ops above
// cost one OpenMP fork/join each, far more than the O(K V) work of a small step (a
// B=1 H=8 K=V=64 step: 42 us on one thread, 550 us on two on a loaded 2-core machine),
// so (b, h) pairs are split across threads only above kStepGrain state elements.
#include "decay_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

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

// State elements below which a step runs on the calling thread: a fork/join costs
// several microseconds (far more on a busy machine), a state element about a nanosecond.
constexpr int64_t kStepGrain = 1 << 18;

// One row x of one (b, h): s_out = g s_in + k_x v, o += q_x s_out. Restrict pointers
// (and a separate in-place version) let the compiler vectorize without overlap checks.
template <typename S_t>
inline void row_update(const S_t* __restrict si, S_t* __restrict so, const S_t* __restrict vr, S_t* __restrict o,
                       S_t g, S_t kx, S_t qx, int64_t V) {
  for (int64_t y = 0; y < V; ++y) {
    const S_t s_new = si[y] * g + kx * vr[y];
    so[y] = s_new;
    o[y] += qx * s_new;
  }
}
template <typename S_t>
inline void row_update_in_place(S_t* __restrict s, const S_t* __restrict vr, S_t* __restrict o, S_t g, S_t kx,
                                S_t qx, int64_t V) {
  for (int64_t y = 0; y < V; ++y) {
    const S_t s_new = s[y] * g + kx * vr[y];
    s[y] = s_new;
    o[y] += qx * s_new;
  }
}

// S_out = exp(a) S_in + k^T v and o = scale * q S_out, per (b, h) in one pass over S, in
// the state's dtype (S_out may be S_in: the in-place step). q, k, v are [B, H, K|V] in
// the state's dtype with unit stride in the last dim; states are strided [B, H, K, V];
// gamma is exp(log_decay) as [B, H] (strides g_b, g_h) or null.
template <typename S_t>
void cpu_step_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gamma, const Tensor& S_in,
                     Tensor& S_out, double scale, Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  const S_t *Q = q.data_ptr<S_t>(), *Kp = k.data_ptr<S_t>(), *Vp = v.data_ptr<S_t>();
  const S_t* G = gamma.defined() ? gamma.data_ptr<S_t>() : nullptr;
  const S_t* Si = S_in.data_ptr<S_t>();
  S_t* So = S_out.data_ptr<S_t>();
  S_t* O = out.data_ptr<S_t>();
  const S_t sc = static_cast<S_t>(scale);
  const int64_t grain = std::max<int64_t>(1, kStepGrain / std::max<int64_t>(1, K * V));
  // parallel_for runs inline when B * H <= grain (no fork/join).
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const S_t* qr = Q + b * q.stride(0) + h * q.stride(1);
      const S_t* kr = Kp + b * k.stride(0) + h * k.stride(1);
      const S_t* vr = Vp + b * v.stride(0) + h * v.stride(1);
      const S_t g = G ? G[b * gamma.stride(0) + h * gamma.stride(1)] : S_t(1);
      S_t* o = O + bh * V;
      std::fill_n(o, V, S_t(0));
      for (int64_t x = 0; x < K; ++x) {
        const S_t* si = Si + b * S_in.stride(0) + h * S_in.stride(1) + x * S_in.stride(2);
        S_t* so = So + b * S_out.stride(0) + h * S_out.stride(1) + x * S_out.stride(2);
        const int64_t ys_i = S_in.stride(3), ys_o = S_out.stride(3);
        const S_t kx = kr[x], qx = qr[x] * sc;  // cheaper to scale q than the output
        if (ys_i == 1 && ys_o == 1) {  // the usual cases: loops the compiler vectorizes
          if (si == so) row_update_in_place(so, vr, o, g, kx, qx, V);
          else row_update(si, so, vr, o, g, kx, qx, V);
        } else {
          for (int64_t y = 0; y < V; ++y) {
            const S_t s_new = si[y * ys_i] * g + kx * vr[y];
            so[y * ys_o] = s_new;
            o[y] += qx * s_new;
          }
        }
      }
    }
  });
}

// The step on CPU; S_out is a fresh contiguous state or S_in itself. Returns o in v's dtype.
Tensor cpu_step(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
                const Tensor& S_in, Tensor& S_out, double scale) {
  const auto dt = S_in.scalar_type();
  // One dtype, unit stride in the last dim (no copy for the usual contiguous inputs).
  auto ready = [&](const Tensor& x) {
    auto y = x.to(dt);
    return y.stride(-1) == 1 ? y : y.contiguous();
  };
  auto qd = ready(q), kd = ready(k), vd = ready(v);
  Tensor gamma;
  if (log_decay.has_value()) {
    const int64_t B = q.size(0), H = q.size(1);
    gamma = log_decay->to(dt).exp();
    gamma = gamma.dim() == 1 ? gamma.view({1, H}).expand({B, H}) : gamma;
  }
  auto out = at::empty({q.size(0), q.size(1), v.size(2)}, S_in.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(dt, "decay_attn_step_cpu", [&] {
    cpu_step_kernel<scalar_t>(qd, kd, vd, gamma, S_in, S_out, scale, out);
  });
  return out.scalar_type() == v.scalar_type() ? out : out.to(v.scalar_type());
}

bool all_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
             const Tensor& state) {
  return q.is_cpu() && k.is_cpu() && v.is_cpu() && state.is_cpu() && (!log_decay.has_value() || log_decay->is_cpu());
}

std::tuple<Tensor, Tensor> decay_attn_step(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    const Tensor& state, std::optional<double> scale_arg) {
  check_step_inputs("decay_attn_step", q, k, v, log_decay, state, /*in_place=*/false);
  const double scale = resolve_scale(scale_arg, q.size(2));
  // A fresh contiguous state (the fake kernel promises contiguous results).
  auto S = at::empty(state.sizes(), state.options().memory_format(at::MemoryFormat::Contiguous));
  if (all_cpu(q, k, v, log_decay, state)) {
    auto o = cpu_step(q, k, v, log_decay, state, S, scale);
    return {o, S};
  }
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
  if (all_cpu(q, k, v, log_decay, state)) {
    auto o = cpu_step(q, k, v, log_decay, state, S, scale);
    // The loop writes through a raw pointer: bump the version as an in-place ATen op
    // would, so autograd sees that `state` changed (inference tensors have no counter).
    if (!S.is_inference()) S.unsafeGetTensorImpl()->bump_version();
    return o;
  }
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
