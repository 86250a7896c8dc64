// The backend seam of decay_attn (the table is in csrc/backends.cpp).
//
// A backend is one row of a table (where it runs, which methods, dtypes and head dims
// it takes, how "auto" ranks it) plus one implementation with the signature below,
// filled in by the file that implements it:
//
//   static const leet::RegisterBackend kRegistered("cpu", &my_kernel);
//
// A build that does not compile that file (csrc/cuda without nvcc) keeps the row and
// lacks its implementation; the contract then says so. decay_attn's kernels (every
// device) are one generic dispatcher: check the contract, resolve "auto" by the
// table, call the row's implementation.
#pragma once
#include "decay_attn.h"

#include <c10/core/DeviceType.h>

#include <string>
#include <vector>

namespace leet {

// Every implementation's signature. It is called with arguments the contract accepted,
// the scale resolved, and the method resolved by the table (a row that resolves "auto"
// itself may still get "auto").
using BackendImpl = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& log_decay, double scale,
    const std::optional<at::Tensor>& initial_state, bool output_final_state,
    const std::string& method);

// Fills the table row `backend`'s implementation (a static object in the implementing
// file); a name without a row fails when the library loads.
struct RegisterBackend {
  RegisterBackend(const char* backend, BackendImpl impl);
};

// The method and backend rules of the contract (called by check_decay_attn_inputs,
// after the shape rules): the method exists, the backend exists and can serve this
// call (device, methods, dtypes, head dim, implementation present).
void check_method_and_backend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::string& method, const std::string& backend);

// Which row serves a checked call, with which method. `device` is the device whose
// policy applies (q's, for the kernels); `absent` names backends the caller knows are
// unusable though registered (Python: triton that fails to import).
struct Plan {
  std::string backend;
  std::string method;
};
Plan plan_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::string& method,
               const std::string& backend, c10::DeviceType device, const std::vector<std::string>& absent);

}  // namespace leet
