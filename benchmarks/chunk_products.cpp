// The floor of the fused CPU forward (csrc/cpu/chunked_cpu.cpp): the time of one chunk's
// four matrix products alone, on operands already in L1, against a large GEMM on one
// thread. The kernel's time per chunk minus this is what its per-element work and its
// memory reads cost (docs/methods.md, "Where the fused CPU kernel's time goes").
//
// Build and run (from the repository root, after `make setup`):
//   T=$(.venv/bin/python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -std=c++17 benchmarks/chunk_products.cpp -I$T/include -I$T/include/torch/csrc/api/include \
//       -Wl,--no-as-needed -L$T/lib -ltorch_cpu -lc10 -Wl,-rpath,$T/lib -o /tmp/chunk_products
//   /tmp/chunk_products [K=64] [V=64]
#include "../csrc/cpu/chunk_common.h"
#include "../csrc/cpu/small_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

// Median of 7 runs of n calls, microseconds per call.
template <typename F>
double time_us(F f, int n) {
  for (int i = 0; i < n / 10 + 1; ++i) f();
  std::vector<double> runs;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < n; ++i) f();
    runs.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / n);
  }
  std::sort(runs.begin(), runs.end());
  return runs[3];
}

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);
  const int64_t C = leet::cpu::kChunk, K = argc > 1 ? std::atoi(argv[1]) : 64, V = argc > 2 ? std::atoi(argv[2]) : 64;
  std::vector<float> q(C * K, 0.5f), k_t(K * C, 0.5f), k(C * K, 0.5f), v(C * V, 0.5f), attn(C * C), o(C * V),
      s(K * V, 0.5f);
  using leet::cpu::mm;
  const double qk = time_us([&] { mm<float>(C, C, K, q.data(), K, k_t.data(), C, attn.data(), C, false); }, 20000);
  const double av = time_us([&] { mm<float>(C, V, C, attn.data(), C, v.data(), V, o.data(), V, false); }, 20000);
  const double qs = time_us([&] { mm<float>(C, V, K, q.data(), K, s.data(), V, o.data(), V, true); }, 20000);
  const double kv = time_us([&] { mm<float>(K, V, C, k_t.data(), C, v.data(), V, s.data(), V, true); }, 20000);
  const double chunk = time_us([&] {
    mm<float>(C, C, K, q.data(), K, k_t.data(), C, attn.data(), C, false);
    mm<float>(C, V, C, attn.data(), C, v.data(), V, o.data(), V, false);
    mm<float>(C, V, K, q.data(), K, s.data(), V, o.data(), V, true);
    mm<float>(K, V, C, k_t.data(), C, v.data(), V, s.data(), V, true);
  }, 20000);
  const double tr = time_us([&] { leet::cpu::transpose(k_t.data(), C, k.data(), K, C, K); }, 20000);
  leet::cpu::release_thread_gemm();

  auto a = at::randn({1024, 1024}), b = at::randn({1024, 1024});
  const double gemm = time_us([&] { at::mm(a, b); }, 10);
  const double gemm_rate = 2.0 * 1024 * 1024 * 1024 / (gemm * 1e3);  // GFLOP/s
  const double flops = 2.0 * C * C * K + 2.0 * C * V * C + 2.0 * C * K * V + 2.0 * K * C * V;
  std::printf("one thread, C=%ld K=%ld V=%ld, operands in L1, median us per call\n", C, K, V);
  std::printf("  Q K^T %.3f | (A*D) V %.3f | Q S %.3f | K^T V %.3f | K^T (transpose) %.3f\n", qk, av, qs, kv, tr);
  std::printf("  the four products in sequence: %.3f us = %.1f GFLOP/s = %.0f%% of a 1024^3 at::mm (%.1f GFLOP/s)\n",
              chunk, flops / (chunk * 1e3), 100.0 * flops / (chunk * 1e3) / gemm_rate, gemm_rate);
  return 0;
}
