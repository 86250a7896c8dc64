// The schema of every leet operator, defined once, in C++, so that a process
// without Python (an AOTInductor C++ runner) finds it by loading this library.
#include <torch/library.h>

TORCH_LIBRARY(leet, m) {
  // O = scale * ((Q K^T) * D) V with D[i, j] = exp(sum_{t=j+1..i} log_decay[t]) for j <= i.
  // scale=None (the default) means K^-0.5, as in SDPA and flash-linear-attention.
  // Returns (o, final_state); final_state is an empty tensor unless output_final_state.
  // `method` is the algorithm (auto, naive, recurrent, chunked, fleet, recursive);
  // `backend` the implementation (auto, aten, cpu, triton, cuda).
  m.def(
      "decay_attn(Tensor q, Tensor k, Tensor v, Tensor? log_decay=None, float? scale=None, "
      "Tensor? initial_state=None, bool output_final_state=False, str method=\"auto\", "
      "str backend=\"auto\") -> (Tensor, Tensor)");
  // The CUDA C++ kernels (csrc/cuda; registered only in CUDA builds), reached through
  // decay_attn(..., backend="cuda"). method: "chunked" or "recurrent".
  m.def(
      "_decay_attn_cuda(Tensor q, Tensor k, Tensor v, Tensor? log_decay, float scale, "
      "Tensor? initial_state, bool output_final_state, str method) -> (Tensor, Tensor)");
  // The Triton kernels (ops/triton_kernels.py), whose CUDA kernel the Python package
  // registers when triton is installed; the "triton" row of the backend table (csrc/triton_backend.cpp)
  // calls it for backend "triton" (and "auto"). method: "chunked" or "recurrent".
  m.def(
      "_decay_attn_triton(Tensor q, Tensor k, Tensor v, Tensor? log_decay, float scale, "
      "Tensor? initial_state, bool output_final_state, str method) -> (Tensor, Tensor)");
  // The fused backward of the CPU chunked kernel (csrc/cpu/chunked_cpu_backward.cpp),
  // which ops/decay_attn.py's autograd calls for calls the fused forward served.
  // grad_state: the gradient of the final state (None: zero). Returns (dq, dk, dv,
  // d log_decay, d initial_state), the last two empty tensors when log_decay /
  // initial_state are None; d log_decay has log_decay's shape ([H]: summed over b, t).
  m.def(
      "_decay_attn_backward(Tensor grad_o, Tensor? grad_state, Tensor q, Tensor k, Tensor v, "
      "Tensor? log_decay, float scale, Tensor? initial_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One decoding step: state = exp(log_decay) * state + k^T v; o = scale * q state.
  m.def(
      "decay_attn_step(Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor state, "
      "float? scale=None) -> (Tensor, Tensor)");
  // The same step, updating `state` in place (serving loops without allocation).
  m.def(
      "decay_attn_step_(Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor(a!) state, "
      "float? scale=None) -> Tensor");
}
