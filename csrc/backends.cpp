// The methods and backends of decay_attn as tables, and the one dispatcher that serves
// every device from them (the seam is described in csrc/backends.h).
#include "backends.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKey.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

namespace leet {
namespace {

using at::Tensor;

// The methods (algorithms, csrc/methods.cpp); "auto" picks one by device and shape.
constexpr const char* kMethods[] = {"auto", "naive", "recurrent", "chunked", "fleet", "recursive"};

// The backends. Adding one (say a CPU bf16 kernel) is a row here and a RegisterBackend
// next to its implementation; the rules, messages, "auto" and Python's BACKENDS follow.
// "auto" is the policy: the highest `auto_rank` row that can serve the call.
struct Backend {
  const char* name;
  const char* device;        // "" (any device) or a device type: "cpu", "cuda"
  const char* methods;       // "" (every method) or a comma-separated list
  bool float64;              // accepts float64 inputs
  int64_t max_head_dim;      // 0: no limit on K
  int64_t recurrent_max_t;   // method "auto": recurrent up to this T, chunked beyond (0: the row's own choice)
  int auto_rank;             // backend "auto" prefers higher ranks (0: never chosen)
  const char* kernel_op;     // implemented by this op's kernel for `device` (registered from Python), or ""
  const char* instead;       // what to use instead, for the messages
  const char* missing;       // what the row needs when this build lacks its implementation
};

constexpr Backend kBackends[] = {
    {"auto", "", "", true, 0, 0, 0, "", "", ""},
    {"aten", "", "", true, 0, 0, 1, "", "", ""},  // csrc/methods.cpp
    {"cpu", "cpu", "auto, chunked", true, 0, 0, 3, "", "backend='aten' or 'auto'", ""},  // csrc/cpu
    {"triton", "cuda", "auto, chunked, recurrent", false, 0, 16, 3, "leet::_decay_attn_triton",
     "backend='aten' or 'auto'",  // ops/triton_kernels.py, via csrc/triton_backend.cpp
     "the triton package (`pip install triton`) and the leet_compile Python package imported; use "
     "backend='aten' or 'auto'"},
    {"cuda", "cuda", "auto, chunked, recurrent", true, kCudaMaxHeadDim, 16, 2, "",
     "backend='triton', 'aten' or 'auto'",  // csrc/cuda (nvcc builds)
     "the C++ CUDA kernels (csrc/cuda, torch.ops.leet._decay_attn_cuda), which this build of leet_compile "
     "lacks; rebuild with nvcc and a CUDA torch (`pip install --no-build-isolation -e .`), or use "
     "backend='triton', 'aten' or 'auto'"},
};
constexpr size_t kNumBackends = sizeof(kBackends) / sizeof(kBackends[0]);

// The implementations, filled by RegisterBackend during library load (zero-initialized
// before any constructor runs, so the load order of the files does not matter).
BackendImpl* impls() {
  static BackendImpl table[kNumBackends] = {};
  return table;
}

const Backend* find_row(const std::string& name) {
  for (const auto& r : kBackends) {
    if (name == r.name) return &r;
  }
  return nullptr;
}

BackendImpl impl_of(const Backend& row) { return impls()[&row - kBackends]; }

bool in_list(const std::string& item, const char* list) {
  std::string s(list);
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(", ", start);
    if (end == std::string::npos) end = s.size();
    if (s.compare(start, end - start, item) == 0) return true;
    start = end + 2;
  }
  return false;
}

bool runs_on(const Backend& row, c10::DeviceType device) {
  return row.device[0] == '\0' || c10::DeviceTypeName(device, /*lower_case=*/true) == row.device;
}

// Whether this build (and process) has the row's implementation.
bool available(const Backend& row, const std::vector<std::string>& absent) {
  if (impl_of(row) == nullptr) return false;
  if (std::find(absent.begin(), absent.end(), row.name) != absent.end()) return false;
  if (row.kernel_op[0] == '\0') return true;
  auto handle = c10::Dispatcher::singleton().findOp(c10::OperatorName(row.kernel_op, ""));
  const auto key = c10::computeDispatchKey(std::nullopt, std::nullopt, c10::Device(row.device));
  return handle.has_value() && handle->hasKernelForDispatchKey(key);
}

std::string missing_message(const Backend& row) {
  return std::string("decay_attn: backend '") + row.name + "' needs " +
         (row.missing[0] != '\0' ? row.missing : "an implementation, which this build of leet_compile lacks");
}

// "backend='auto', 'cpu' or 'aten'": the backends for tensors on `device`.
std::string backends_on(c10::DeviceType device) {
  std::string out = "backend='auto'";
  for (const auto& r : kBackends) {
    if (r.device[0] != '\0' && runs_on(r, device)) out += std::string(", '") + r.name + "'";
  }
  return out + " or 'aten'";
}

template <size_t N>
std::string joined(const char* const (&names)[N]) {
  std::string out;
  for (const char* n : names) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

std::string backend_names() {
  std::string out;
  for (const auto& r : kBackends) out += (out.empty() ? "" : ", ") + std::string(r.name);
  return out;
}

bool degenerate(const Tensor& q, const Tensor& v) {  // nothing to launch
  return q.sym_size(0) * q.sym_size(1) * q.sym_size(3) * v.sym_size(3) == 0;
}

std::string resolve_method(const Backend& row, const Tensor& q, const std::string& method) {
  if (method != "auto" || row.recurrent_max_t == 0) return method;
  return q.sym_size(2) <= row.recurrent_max_t ? "recurrent" : "chunked";
}

// Whether `row` takes this call (the rules of check_method_and_backend, as a predicate).
bool accepts(const Backend& row, const Tensor& q, const Tensor& k, const Tensor& v, const std::string& method) {
  return (row.methods[0] == '\0' || in_list(method, row.methods)) &&
         (row.float64 || compute_dtype(q, k, v) != at::kDouble) &&
         (row.max_head_dim == 0 || q.sym_size(3) <= row.max_head_dim);
}

}  // namespace

RegisterBackend::RegisterBackend(const char* backend, BackendImpl impl) {
  const Backend* row = find_row(backend);
  TORCH_CHECK(row != nullptr, "leet: RegisterBackend(\"", backend, "\"): no such row in kBackends (csrc/backends.cpp)");
  impls()[row - kBackends] = impl;
}

void check_method_and_backend(const Tensor& q, const Tensor& k, const Tensor& v, const std::string& method,
                              const std::string& backend) {
  bool known = false;
  for (const char* name : kMethods) known = known || method == name;
  TORCH_CHECK_VALUE(known, "decay_attn: unknown method '", method, "'; expected one of ", joined(kMethods));
  const Backend* row = find_row(backend);
  TORCH_CHECK_VALUE(
      row != nullptr, "decay_attn: unknown backend '", backend, "'; expected one of ", backend_names());
  const auto dev = q.device();
  const bool meta = dev.is_meta();  // meta tensors: shapes only, no device to run on
  TORCH_CHECK_VALUE(
      meta || runs_on(*row, dev.type()), "decay_attn: backend '", backend, "' needs ",
      c10::DeviceTypeName(c10::Device(row->device).type()), " tensors; q is on ", dev, " (use ",
      backends_on(dev.type()), ")");
  TORCH_CHECK_VALUE(
      row->methods[0] == '\0' || in_list(method, row->methods), "decay_attn: backend '", backend,
      "' implements methods ", row->methods, "; got '", method, "' (use ", row->instead, ")");
  TORCH_CHECK_VALUE(
      row->float64 || compute_dtype(q, k, v) != at::kDouble, "decay_attn: backend '", backend,
      "' computes in float32; float64 inputs need backend='aten' or 'auto'");
  TORCH_CHECK_VALUE(
      row->max_head_dim == 0 || q.sym_size(3) <= row->max_head_dim, "decay_attn: backend '", backend,
      "' takes head dim K at most ", row->max_head_dim, ", got ", q.sym_size(3), " (use ", row->instead, ")");
  TORCH_CHECK_VALUE(meta || backend == "auto" || available(*row, {}), missing_message(*row));
}

Plan plan_call(const Tensor& q, const Tensor& k, const Tensor& v, const std::string& method,
               const std::string& backend, c10::DeviceType device, const std::vector<std::string>& absent) {
  if (backend != "auto") {
    const Backend& row = *find_row(backend);  // checked by the contract
    TORCH_CHECK_VALUE(
        std::find(absent.begin(), absent.end(), backend) == absent.end(), missing_message(row));
    if (backend == "aten" || degenerate(q, v)) return {"aten", method};
    return {backend, resolve_method(row, q, method)};
  }
  const Backend* best = nullptr;
  if (!degenerate(q, v)) {
    for (const auto& r : kBackends) {
      const bool eligible = r.auto_rank > 0 && (best == nullptr || r.auto_rank > best->auto_rank) &&
                            runs_on(r, device) && accepts(r, q, k, v, method) && available(r, absent);
      if (eligible) best = &r;
    }
  }
  if (best == nullptr || std::string(best->name) == "aten") return {"aten", method};
  return {best->name, resolve_method(*best, q, method)};
}

namespace {

// decay_attn's kernel on every device: the contract, the table's plan, the row's implementation.
std::tuple<Tensor, Tensor> decay_attn_kernel(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& log_decay,
    std::optional<double> scale, const std::optional<Tensor>& initial_state, bool output_final_state,
    const std::string& method, const std::string& backend) {
  check_decay_attn_inputs(q, k, v, log_decay, initial_state, method, backend);  // backend rules included
  // The contract skips device rules on meta tensors (shapes only); running needs the device.
  TORCH_CHECK_VALUE(
      runs_on(*find_row(backend), q.device().type()), "decay_attn: backend '", backend,
      "' has no kernel for tensors on ", q.device(), " (use backend='auto' or 'aten')");
  const auto plan = plan_call(q, k, v, method, backend, q.device().type(), {});
  const BackendImpl impl = impl_of(*find_row(plan.backend));
  TORCH_CHECK(impl != nullptr, missing_message(*find_row(plan.backend)));
  return impl(q, k, v, log_decay, resolve_scale(scale, q.size(3)), initial_state, output_final_state, plan.method);
}

// The plan for Python (ops/gpu.py select(), the fake kernel and the tracing rule).
std::tuple<std::string, std::string> plan_op(
    const Tensor& q, const Tensor& k, const Tensor& v, c10::string_view method, c10::string_view backend,
    c10::string_view device, std::vector<std::string> absent) {
  const auto plan = plan_call(q, k, v, std::string(method), std::string(backend),
                              c10::Device(std::string(device)).type(), absent);
  return {plan.backend, plan.method};
}

// The tables for Python: METHODS, BACKENDS, and per backend "" or why this build lacks it.
std::tuple<std::vector<std::string>, std::vector<std::string>, std::vector<std::string>> tables_op() {
  std::vector<std::string> methods(std::begin(kMethods), std::end(kMethods)), backends, missing;
  for (const auto& r : kBackends) {
    backends.emplace_back(r.name);
    missing.push_back(std::string(r.name) == "auto" || available(r, {}) ? "" : missing_message(r));
  }
  return {methods, backends, missing};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leet, m) {
  m.def(
      "_decay_attn_plan(Tensor q, Tensor k, Tensor v, str method, str backend, str device, str[] absent) "
      "-> (str, str)",
      &plan_op);
  m.def("_decay_attn_tables() -> (str[] methods, str[] backends, str[] missing)", &tables_op);
}

// One kernel for every device. CPU and CUDA are named so that the dispatcher reports a
// kernel for them (an AOTInductor runner looks them up); the composite serves the rest.
TORCH_LIBRARY_IMPL(leet, CPU, m) { m.impl("decay_attn", &decay_attn_kernel); }
TORCH_LIBRARY_IMPL(leet, CUDA, m) { m.impl("decay_attn", &decay_attn_kernel); }
TORCH_LIBRARY_IMPL(leet, CompositeExplicitAutograd, m) { m.impl("decay_attn", &decay_attn_kernel); }

}  // namespace leet
