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

// Largest head dim K of the CUDA kernels (LEET_MAX_HEAD_DIM in csrc/cuda/decay_attn_kernels.h).
constexpr int64_t kCudaMaxHeadDim = 256;

// The argument contract (csrc/contract.cpp), shared by every kernel and, through the
// check ops leet::_check_decay_attn / _check_decay_attn_step, by the fake kernels.
// Raises ValueError / TypeError naming the first bad argument; the method and backend
// rules (device, methods, dtypes, head dim, implementation present) are the tables of
// csrc/backends.cpp.
void check_decay_attn_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::string& method,
    const std::string& backend);

// The decoding steps' contract; `in_place` adds the rules of decay_attn_step_ (state
// writable, with memory of its own, sharing none with q, k, v or log_decay).
void check_step_inputs(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, const at::Tensor& state, bool in_place);

// scale=None means K^-0.5 (as in SDPA and flash-linear-attention).
double resolve_scale(std::optional<double> scale, int64_t K);

// float64 for float64 inputs, float32 otherwise: the accumulation and state dtype.
at::ScalarType compute_dtype(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// The device-generic methods, written with ATen ops (any device): backend "aten"
// (its signature is the seam's, leet::BackendImpl in csrc/backends.h).
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

// The same kernel for bf16 / fp16 q, k, v on the CPU's matrix units (csrc/cpu/chunked_cpu_lowp.cpp);
// nullopt where that path does not apply (then decay_attn_chunked_cpu computes on float32 copies).
std::optional<std::tuple<at::Tensor, at::Tensor>> decay_attn_chunked_cpu_lowp(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state, bool output_final_state);

// The same forward with the sequence cut into segments run in parallel, then joined
// (csrc/cpu/chunked_cpu_split.cpp), where B * H leaves threads idle (or LEET_CPU_SPLIT
// asks for it); nullopt where it does not apply. It calls decay_attn_chunked_cpu per segment.
std::optional<std::tuple<at::Tensor, at::Tensor>> decay_attn_chunked_cpu_split(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state, bool output_final_state);

// The recurrent method on CPU (csrc/cpu/recurrent_cpu.cpp) in float64, for values of at
// most kRecurrentMaxV columns: q and k read in their own dtype (one dtype for both).
// Method "auto" of the cpu backend takes it where recurrent_cpu_applies. 32: on the
// Zen 3 VM (B=1 H=4 T=4096 K=64, 2 threads) it took 0.5 / 2.2 / 6 / 13 ms at V = 1 / 8 /
// 32 / 64 against the chunked kernel's 4.5 / 12 / 10.5 / 20 ms in float64.
constexpr int64_t kRecurrentMaxV = 32;
bool recurrent_cpu_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
std::tuple<at::Tensor, at::Tensor> decay_attn_recurrent_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state, bool output_final_state);

// The fused CPU backward (csrc/cpu/chunked_cpu_backward.cpp), leet::_decay_attn_backward:
// (dq, dk, dv, d log_decay, d initial_state), the last two empty where absent.
using DecayAttnGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
DecayAttnGrads decay_attn_backward_cpu(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state);

// Where decay_attn_backward_cpu_into writes: dq, dk, dv in the inputs' dtype, with rows as
// in a contiguous [B, H, T, D] tensor from their data pointers (a [1, 1, len, D] slice of a
// contiguous tensor qualifies); da, the log decay's gradient in the compute dtype
// ([B, H, T] per position, [B, H] per head; undefined: not computed); ds0, the initial
// state's, [B, H, K, V] in the compute dtype (undefined: not computed).
struct BackwardOutputs {
  at::Tensor dq, dk, dv, da, ds0;
};

// The kernel of decay_attn_backward_cpu for checked inputs of one dtype (q, k, v, grad_o)
// and a nonempty product, into outputs the caller allocated.
void decay_attn_backward_cpu_into(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state, const BackwardOutputs& out);

// The same backward with the sequence cut into segments run in parallel (the forward's rule,
// chunked_cpu_split.cpp); nullopt where it does not apply (also for inputs of mixed dtypes).
// It runs decay_attn_backward_cpu_into per segment, with the state entering it and the
// gradient of the state leaving it.
std::optional<DecayAttnGrads> decay_attn_backward_cpu_split(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state);

}  // namespace leet
