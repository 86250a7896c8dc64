// Runs the chunked and recurrent decay_attn kernels under cpu_emulation.h over a
// table of cases (every dtype, decay form, state, padding and tile configuration)
// and compares them with a float64 recurrence. Prints one line per case; exits 1 if
// any case fails. Built and run by tests/test_cuda_compile.py:
//   g++ -std=c++20 -O2 -pthread -I<cuda>/include run_on_cpu.cpp && ./a.out
#include "cpu_emulation.h"
// clang-format off
#include "../chunked_kernel.cuh"
#include "../recurrent_kernel.cuh"
// clang-format on

#include <cstdio>
#include <random>
#include <string>

namespace {

struct Case {
  int dtype;
  int64_t B, H, T, K, V;
  int decay;
  bool growing;  // log decays partly positive
  bool initial, strided;
  bool recurrent;
  int chunk, v_tile, threads;  // chunked kernel only
  // Edge values: NaN / inf in v and k at `poison_t` (only outputs before it are
  // compared, and must be finite), and per-position -inf / -1e20 decays.
  int64_t poison_t = -1;
  bool resets = false;
};

template <typename T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(x));
  else return static_cast<T>(x);
}
template <typename T>
double to_double(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return static_cast<double>(x);
}

// A [B, H, T, D] tensor; strided: a permuted view of a [B, T, H, D + 3] buffer.
template <typename T>
struct Input {
  std::vector<T> data;
  int64_t strides[3];
  double at(int64_t b, int64_t h, int64_t t, int64_t d) const {
    return to_double(data[b * strides[0] + h * strides[1] + t * strides[2] + d]);
  }
};

template <typename T>
Input<T> make_input(std::mt19937& rng, int64_t B, int64_t H, int64_t T_len, int64_t D, bool strided) {
  Input<T> x;
  const int64_t row = strided ? D + 3 : D;
  if (strided) {
    x.strides[0] = T_len * H * row, x.strides[1] = row, x.strides[2] = H * row;
  } else {
    x.strides[0] = H * T_len * D, x.strides[1] = T_len * D, x.strides[2] = D;
  }
  std::normal_distribution<double> normal;
  x.data.resize(B * T_len * H * row);
  for (auto& v : x.data) v = from_double<T>(normal(rng));
  return x;
}

double rel_err(const std::vector<double>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}

template <typename T>
bool run_case(const Case& c, std::mt19937& rng) {
  using Acc = typename leet_cuda::Cvt<T>::Acc;
  const int64_t B = c.B, H = c.H, TL = c.T, K = c.K, V = c.V;
  auto q = make_input<T>(rng, B, H, TL, K, c.strided);
  auto k = make_input<T>(rng, B, H, TL, K, c.strided);
  auto v = make_input<T>(rng, B, H, TL, V, c.strided);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::vector<double> a(c.decay == LEET_DECAY_PER_HEAD ? H : B * H * TL);
  for (auto& x : a) x = c.growing ? 0.15 * uni(rng) - 0.05 : -0.3 * uni(rng);
  if (c.resets && c.decay == LEET_DECAY_PER_POSITION) {
    for (int64_t bh = 0; bh < B * H; ++bh) {
      for (int64_t t = 5; t < TL; t += 23) a[bh * TL + t] = -INFINITY;
      for (int64_t t = 11; t < TL; t += 29) a[bh * TL + t] = -1e20;
    }
  }
  if (c.poison_t >= 0) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        v.data[b * v.strides[0] + h * v.strides[1] + c.poison_t * v.strides[2]] = from_double<T>(NAN);
        if (c.poison_t + 1 < TL) k.data[b * k.strides[0] + h * k.strides[1] + (c.poison_t + 1) * k.strides[2] + 1] = from_double<T>(INFINITY);
      }
  }
  std::vector<Acc> s0(B * H * K * V);
  std::normal_distribution<double> normal;
  for (auto& x : s0) x = static_cast<Acc>(normal(rng));
  std::vector<T> o(B * H * TL * V, from_double<T>(NAN));
  std::vector<Acc> fs(B * H * K * V, static_cast<Acc>(NAN));
  const double scale = 0.7;

  leet_decay_attn_args args{};
  args.B = B, args.H = H, args.T = TL, args.K = K, args.V = V;
  args.dtype = std::is_same_v<T, float> ? LEET_FLOAT32 : std::is_same_v<T, double> ? LEET_FLOAT64
             : std::is_same_v<T, __half> ? LEET_FLOAT16 : LEET_BFLOAT16;
  args.q = q.data.data(), args.k = k.data.data(), args.v = v.data.data();
  for (int i = 0; i < 3; ++i) {
    args.q_strides[i] = q.strides[i], args.k_strides[i] = k.strides[i], args.v_strides[i] = v.strides[i];
  }
  args.o = o.data();
  args.decay = c.decay;
  args.log_decay = c.decay == LEET_DECAY_NONE ? nullptr : a.data();
  args.initial_state = c.initial ? s0.data() : nullptr;
  args.final_state = fs.data();
  args.scale = scale;

  if (c.recurrent) {
    const unsigned blocks = static_cast<unsigned>(B * H * leet_cuda::ceil_div(V, leet_cuda::kCols));
    emu::launch(blocks, leet_cuda::kCols * leet_cuda::kGroups, 0, [&] { leet_cuda::recurrent_kernel<T>(args); });
  } else {
    constexpr bool tc = !std::is_same_v<T, float> && !std::is_same_v<T, double>;
    const int Kp = static_cast<int>(leet_cuda::ceil_div(K, 16) * 16);
    const auto lay = leet_cuda::make_layout(c.chunk, Kp, c.v_tile, sizeof(T), sizeof(Acc), tc);
    const unsigned blocks = static_cast<unsigned>(B * H * leet_cuda::ceil_div(V, c.v_tile));
    emu::launch(blocks, c.threads, lay.total, [&] { leet_cuda::chunked_kernel<T, tc>(args, lay); });
  }

  // float64 reference: the recurrence on the same (rounded) inputs.
  std::vector<double> o_ref(B * H * TL * V), s_ref(B * H * K * V), o_got(o.size()), s_got(fs.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      std::vector<double> S(K * V);
      for (int64_t i = 0; i < K * V; ++i) S[i] = c.initial ? static_cast<double>(s0[bh * K * V + i]) : 0.0;
      for (int64_t t = 0; t < TL; ++t) {
        const double g = c.decay == LEET_DECAY_NONE ? 1.0
                       : std::exp(c.decay == LEET_DECAY_PER_HEAD ? a[h] : a[bh * TL + t]);
        for (int64_t x = 0; x < K; ++x)
          for (int64_t y = 0; y < V; ++y) S[x * V + y] = g * S[x * V + y] + k.at(b, h, t, x) * v.at(b, h, t, y);
        for (int64_t y = 0; y < V; ++y) {
          double s = 0;
          for (int64_t x = 0; x < K; ++x) s += q.at(b, h, t, x) * S[x * V + y];
          o_ref[(bh * TL + t) * V + y] = scale * s;
        }
      }
      for (int64_t i = 0; i < K * V; ++i) s_ref[bh * K * V + i] = S[i];
    }
  bool finite = true;
  for (size_t i = 0; i < o.size(); ++i) o_got[i] = to_double(o[i]);
  for (size_t i = 0; i < fs.size(); ++i) s_got[i] = static_cast<double>(fs[i]);
  if (c.poison_t >= 0) {  // only the outputs before the poisoned position, which must be exact
    std::vector<double> got, ref;
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t t = 0; t < c.poison_t; ++t)
        for (int64_t y = 0; y < V; ++y) {
          got.push_back(o_got[(bh * TL + t) * V + y]);
          ref.push_back(o_ref[(bh * TL + t) * V + y]);
        }
    o_got = got, o_ref = ref, s_got = s_ref = {0.0};
  }
  for (double x : o_got) finite = finite && std::isfinite(x);
  for (double x : s_got) finite = finite && std::isfinite(x);
  const double eo = rel_err(o_got, o_ref), es = rel_err(s_got, s_ref);
  const double tol = std::is_same_v<T, double> ? 1e-11 : std::is_same_v<T, float> ? 2e-5
                   : std::is_same_v<T, __half> ? 5e-3 : 3e-2;
  const bool ok = finite && eo < tol && es < tol;
  static const char* dtypes[] = {"float32", "float16", "bfloat16", "float64"};
  static const char* decays[] = {"none", "head", "position"};
  std::printf("%s %s %s B=%lld H=%lld T=%lld K=%lld V=%lld decay=%s%s initial=%d strided=%d C=%d Vt=%d threads=%d "
              "o_err=%.3g state_err=%.3g finite=%d\n",
              ok ? "PASS" : "FAIL", c.recurrent ? "recurrent" : "chunked", dtypes[args.dtype], (long long)B,
              (long long)H, (long long)TL, (long long)K, (long long)V, decays[c.decay], c.growing ? "(growing)" : "",
              c.initial, c.strided, c.chunk, c.v_tile, c.threads, eo, es, finite);
  std::fflush(stdout);
  return ok;
}

}  // namespace

int main() {
  const Case shapes[] = {
      // dtype is filled in below; B H T K V decay growing initial strided recurrent C Vt threads
      {0, 1, 2, 65, 80, 48, LEET_DECAY_PER_POSITION, false, true, true, false, 64, 32, 64},
      {0, 2, 1, 63, 16, 16, LEET_DECAY_PER_HEAD, false, false, false, false, 16, 16, 256},
      {0, 1, 1, 1, 64, 64, LEET_DECAY_NONE, false, true, false, false, 64, 64, 64},
      {0, 1, 1, 100, 256, 20, LEET_DECAY_PER_POSITION, true, true, true, false, 32, 32, 64},
      {0, 1, 1, 40, 96, 130, LEET_DECAY_NONE, false, false, false, false, 32, 64, 128},
      {0, 1, 1, 300, 32, 32, LEET_DECAY_PER_HEAD, true, true, false, false, 64, 16, 64},
      {0, 1, 2, 37, 80, 40, LEET_DECAY_PER_POSITION, false, true, true, true, 0, 0, 0},
      {0, 1, 1, 5, 256, 33, LEET_DECAY_PER_HEAD, true, false, false, true, 0, 0, 0},
      {0, 1, 1, 3, 7, 5, LEET_DECAY_NONE, false, true, false, true, 0, 0, 0},
  };
  // Edges (their own random stream, so the cases above keep their inputs): a NaN value
  // and an inf key mid-chunk; -inf resets and -1e20 decays.
  const Case edges[] = {
      {0, 1, 2, 70, 16, 20, LEET_DECAY_PER_POSITION, false, true, true, false, 32, 16, 64, 40, false},
      {0, 1, 1, 40, 16, 16, LEET_DECAY_PER_HEAD, false, false, false, false, 64, 16, 64, 21, false},
      {0, 1, 2, 40, 16, 16, LEET_DECAY_PER_POSITION, false, true, false, true, 0, 0, 0, 30, false},
      {0, 1, 2, 100, 32, 24, LEET_DECAY_PER_POSITION, false, true, false, false, 32, 32, 64, -1, true},
      {0, 1, 1, 60, 16, 16, LEET_DECAY_PER_POSITION, false, true, true, true, 0, 0, 0, -1, true},
  };
  bool ok = true;
  auto run_all = [&ok](const Case* cases, size_t count, unsigned seed) {
    std::mt19937 rng(seed);
    for (int dtype : {LEET_FLOAT32, LEET_FLOAT64, LEET_FLOAT16, LEET_BFLOAT16}) {
      for (size_t i = 0; i < count; ++i) {
        Case c = cases[i];
        c.dtype = dtype;
        switch (dtype) {
          case LEET_FLOAT32: ok = run_case<float>(c, rng) && ok; break;
          case LEET_FLOAT64: ok = run_case<double>(c, rng) && ok; break;
          case LEET_FLOAT16: ok = run_case<__half>(c, rng) && ok; break;
          default: ok = run_case<__nv_bfloat16>(c, rng) && ok; break;
        }
      }
    }
  };
  run_all(shapes, sizeof(shapes) / sizeof(shapes[0]), 1234);
  run_all(edges, sizeof(edges) / sizeof(edges[0]), 4321);
  std::printf(ok ? "ALL PASS\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
