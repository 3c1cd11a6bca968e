// Host emulation of the CUDA kernels in csrc/cuda/nearest_code.cu, for machines without a GPU.
//
// The .cu file is compiled by g++ as plain C++. Each CUDA thread of a block is a fiber (own
// stack, switched in user space) on one OS thread; a fiber runs until it waits on a barrier
// (__syncthreads: the block; a warp shuffle: its warp), then the next fiber runs. Running each
// thread as far as it can go is the worst interleaving for a missing __syncthreads: a thread
// overwrites or reads the shared tiles before the others are done, and the bit-exact comparison
// below fails. A shuffle
// reached by only part of a warp, or a barrier not reached by every thread, is reported as a
// deadlock. __shared__ arrays are statics (blocks run one after another). Built with
// -fsanitize=address it catches out-of-bounds global and shared accesses.
//
// The oracle reproduces the kernel's fp32 arithmetic exactly (sequential fmaf over D for the dot
// products and code norms, the finish kernel's lane-strided + butterfly order for |x|^2), so the
// check is bit-exact: same index and same distance bits, including ties (lowest index), -0 vs +0,
// and rows whose scores are all non-finite (index 0).
//
// Build: g++ -std=c++20 -O2 -I<cuda>/include emulate_nearest_code.cpp (optionally
// -fsanitize=address,undefined). Usage: emulate_nearest_code [--quick]; prints one line per case,
// exits 1 on any mismatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "emu_runtime.h"  // the fiber emulator and the device intrinsics

#define LGVQ_NEAREST_CODE_KERNELS_ONLY
#ifndef LGVQ_NEAREST_CODE_CU  // -D it to test another copy of the kernels
#define LGVQ_NEAREST_CODE_CU "../../../csrc/cuda/nearest_code.cu"
#endif
#include LGVQ_NEAREST_CODE_CU

namespace {

namespace detail = lgvq::cuda::nearest_code_detail;

float to_float(float v) { return v; }
float to_float(__half v) { return __half2float(v); }
float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__half from_float<__half>(float v) { return __float2half(v); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

uint32_t float_bits(float f) { return __float_as_uint(f); }

// The finish kernel's order: lane l sums elements l, l + 32, ...; then a butterfly over lanes.
float warp_order_sum(const std::vector<float>& terms_a, const std::vector<float>& terms_b) {
  float lanes[32] = {};
  for (size_t c = 0; c < terms_a.size(); ++c) {
    lanes[c % 32] = std::fmaf(terms_a[c], terms_b[c], lanes[c % 32]);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    std::memcpy(lanes, next, sizeof(lanes));
  }
  return lanes[0];
}

struct Expected {
  std::vector<int64_t> indices;
  std::vector<float> distances;
};

// The contract, computed in the kernel's exact fp32 order.
Expected oracle(const std::vector<float>& x, const std::vector<float>& codebook,
                const float* sqnorm, int64_t n, int64_t k, int64_t d, int mode) {
  std::vector<float> code_sqnorm(k, 0.0f);
  for (int64_t j = 0; j < k; ++j) {
    float s = 0.0f;
    for (int64_t c = 0; c < d; ++c) s = std::fmaf(codebook[j * d + c], codebook[j * d + c], s);
    code_sqnorm[j] = s;
  }
  Expected out{std::vector<int64_t>(n), std::vector<float>(n)};
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = &x[r * d];
    bool found = false;
    float best = 0.0f;
    int64_t best_index = 0;
    for (int64_t j = 0; j < k; ++j) {
      float acc = 0.0f;
      for (int64_t c = 0; c < d; ++c) acc = std::fmaf(xr[c], codebook[j * d + c], acc);
      float score;
      if (mode == detail::kCosine) {
        score = -acc;
      } else {
        score = std::fmaf(-2.0f, acc,
                          mode == detail::kL2GivenSqnorm ? sqnorm[j] : code_sqnorm[j]);
      }
      if (std::isfinite(score) && (!found || score < best)) {
        found = true;
        best = score;
        best_index = j;
      }
    }
    std::vector<float> x_row(xr, xr + d), code0(codebook.begin(), codebook.begin() + d);
    if (!found) {
      best_index = 0;
      const float dot = warp_order_sum(x_row, code0);
      if (mode == detail::kCosine) best = -dot;
      else best = std::fmaf(-2.0f, dot, mode == detail::kL2GivenSqnorm
                                            ? sqnorm[0] : warp_order_sum(code0, code0));
    }
    if (best == 0.0f) best = 0.0f;  // the key stores +0 for -0
    float distance;
    if (mode == detail::kCosine) {
      distance = 1.0f + best;
    } else {
      distance = warp_order_sum(x_row, x_row) + best;
      if (distance < 0.0f) distance = 0.0f;
    }
    out.indices[r] = best_index;
    out.distances[r] = distance;
  }
  return out;
}

struct Case {
  std::string name;
  int64_t n, k, d;
  int kind;  // data pattern, see make_data
};

// kind 0: gaussian; 1: values in {-1, 0, 1} (many exact ties between distinct codes);
// 2: codes repeat with period 5 (duplicates across tiles and splits); 3: non-finite entries;
// 4: all codes identical (every row: index 0); 5: zero rows of x mixed with gaussian;
// 6: zero codes whose given norms are +0 in the first tile and -0 after it (every score is
// +0 or -0: equal, so index 0 must win across codebook splits).
template <typename T>
void make_data(const Case& c, std::mt19937& rng, std::vector<T>& x, std::vector<T>& codebook,
               std::vector<float>& sqnorm) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> ternary(-1, 1);
  auto value = [&] { return c.kind == 1 ? static_cast<float>(ternary(rng)) : normal(rng); };
  x.assign(c.n * c.d, from_float<T>(0.0f));
  codebook.assign(c.k * c.d, from_float<T>(0.0f));
  for (auto& v : x) v = from_float<T>(value());
  for (auto& v : codebook) v = from_float<T>(value());
  if (c.kind == 2 || c.kind == 4) {
    const int64_t period = c.kind == 2 ? 5 : 1;
    for (int64_t j = period; j < c.k; ++j) {
      for (int64_t e = 0; e < c.d; ++e) codebook[j * c.d + e] = codebook[(j % period) * c.d + e];
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (c.kind == 3) {
    for (int64_t j = 0; j < c.k; j += 3) codebook[j * c.d] = from_float<T>(nan);
    for (int64_t j = 1; j < c.k; j += 7) codebook[j * c.d + (c.d - 1)] = from_float<T>(inf);
    for (int64_t r = 0; r < c.n; r += 5) x[r * c.d + (r % c.d)] = from_float<T>(nan);
    for (int64_t r = 2; r < c.n; r += 11) x[r * c.d] = from_float<T>(-inf);
  }
  if (c.kind == 5) {
    for (int64_t r = 0; r < c.n; r += 2) {
      for (int64_t e = 0; e < c.d; ++e) x[r * c.d + e] = from_float<T>(0.0f);
    }
  }
  if (c.kind == 6) {
    for (auto& v : codebook) v = from_float<T>(0.0f);
  }
  sqnorm.assign(c.k, 0.0f);
  for (int64_t j = 0; j < c.k; ++j) {
    float s = 0.0f;
    for (int64_t e = 0; e < c.d; ++e) {
      const float v = to_float(codebook[j * c.d + e]);
      s += v * v;  // a caller's own norms: another order than the kernel's
    }
    sqnorm[j] = s;
  }
  if (c.kind == 3) {
    for (int64_t j = 2; j < c.k; j += 13) sqnorm[j] = nan;
    for (int64_t j = 4; j < c.k; j += 17) sqnorm[j] = inf;
  }
  if (c.kind == 6) {
    for (int64_t j = detail::kTileCodes; j < c.k; ++j) sqnorm[j] = -0.0f;
  }
}

// Emulates launch_nearest_code: memset of the keys, search kernel, finish kernel.
template <typename T, int kMode>
void run_kernels(const std::vector<T>& x, const std::vector<T>& codebook, const float* sqnorm,
                 int64_t n, int64_t k, int64_t d, detail::LaunchPlan plan,
                 std::vector<int64_t>& indices, std::vector<float>& distances) {
  auto* keys = reinterpret_cast<unsigned long long*>(indices.data());
  for (int64_t r = 0; r < n; ++r) keys[r] = ~0ull;
  emu::launch(dim3(plan.row_blocks, plan.code_splits), [&] {
    detail::nearest_code_search_kernel<T, kMode>(x.data(), codebook.data(), sqnorm, n, k, d,
                                                 plan.code_tiles_per_split, keys);
  });
  emu::launch(dim3(plan.finish_blocks), [&] {
    detail::nearest_code_finish_kernel<T, kMode>(x.data(), codebook.data(), sqnorm, n, d, keys,
                                                 distances.data());
  });
}

const char* type_name(float) { return "f32"; }
const char* type_name(__half) { return "f16"; }
const char* type_name(__nv_bfloat16) { return "bf16"; }

template <typename T>
int check_case(const Case& c, int mode, int plan_variant, std::mt19937& rng) {
  std::vector<T> x, codebook;
  std::vector<float> sqnorm;
  make_data(c, rng, x, codebook, sqnorm);
  std::vector<float> xf(x.size()), cf(codebook.size());
  for (size_t i = 0; i < x.size(); ++i) xf[i] = to_float(x[i]);
  for (size_t i = 0; i < codebook.size(); ++i) cf[i] = to_float(codebook[i]);
  // Exactly-sized buffers (AddressSanitizer flags any access past them).
  std::vector<int64_t> indices(c.n);
  std::vector<float> distances(c.n);
  const float* sq = mode == detail::kL2GivenSqnorm ? sqnorm.data() : nullptr;

  // Plans: 0 = no codebook split, 1 = as planned for 132 SMs (split where K allows), 2 = split
  // plus a single row block and a single finish block (the grid-stride loops).
  detail::LaunchPlan plan = detail::plan_launch(c.n, c.k, 132);
  if (plan_variant == 0) {
    plan.code_splits = 1;
    plan.code_tiles_per_split = (c.k + detail::kTileCodes - 1) / detail::kTileCodes;
  }
  if (plan_variant == 2) {
    plan.row_blocks = 1;
    plan.finish_blocks = 1;
  }
  if (mode == detail::kCosine) {
    run_kernels<T, detail::kCosine>(x, codebook, sq, c.n, c.k, c.d, plan, indices, distances);
  } else if (mode == detail::kL2GivenSqnorm) {
    run_kernels<T, detail::kL2GivenSqnorm>(x, codebook, sq, c.n, c.k, c.d, plan, indices,
                                           distances);
  } else {
    run_kernels<T, detail::kL2ComputeSqnorm>(x, codebook, sq, c.n, c.k, c.d, plan, indices,
                                             distances);
  }
  const Expected want = oracle(xf, cf, sq, c.n, c.k, c.d, mode);
  int bad = 0;
  for (int64_t r = 0; r < c.n; ++r) {
    const bool same_distance = float_bits(distances[r]) == float_bits(want.distances[r]) ||
                               (std::isnan(distances[r]) && std::isnan(want.distances[r]));
    if (indices[r] != want.indices[r] || !same_distance) {
      if (bad < 5) {
        std::printf("  row %lld: got (%lld, %.9g) want (%lld, %.9g)\n",
                    static_cast<long long>(r), static_cast<long long>(indices[r]), distances[r],
                    static_cast<long long>(want.indices[r]), want.distances[r]);
      }
      ++bad;
    }
  }
  static const char* mode_names[] = {"l2-given-sqnorm", "l2-computed-sqnorm", "cosine"};
  std::printf("%s %-4s %-18s plan=%d splits=%u rows=%lld: %s\n", c.name.c_str(),
              type_name(T{}), mode_names[mode], plan_variant, plan.code_splits,
              static_cast<long long>(c.n), bad ? "MISMATCH" : "ok");
  return bad ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  std::vector<Case> cases = {
      {"N1-K1-D1", 1, 1, 1, 0},
      {"N7-K3-D3", 7, 3, 3, 0},
      {"N130-K129-D17-gauss", 130, 129, 17, 0},
      {"N200-K300-D8-ternary", 200, 300, 8, 1},
      {"N150-K300-D19-dupes", 150, 300, 19, 2},
      {"N140-K260-D33-nonfinite", 140, 260, 33, 3},
      {"N40-K200-D5-identical", 40, 200, 5, 4},
      {"N60-K150-D16-zero-rows", 60, 150, 16, 5},
      {"N20-K300-D4-signed-zeros", 20, 300, 4, 6},
  };
  if (!quick) cases.push_back({"N300-K511-D64-gauss", 300, 511, 64, 0});
  std::mt19937 rng(1234);
  int failures = 0;
  for (const Case& c : cases) {
    for (int mode = 0; mode < 3; ++mode) {
      for (int plan = 0; plan < 3; ++plan) {
        failures += check_case<float>(c, mode, plan, rng);
        if (quick && plan != 1) continue;
        failures += check_case<__half>(c, mode, plan, rng);
        failures += check_case<__nv_bfloat16>(c, mode, plan, rng);
      }
    }
  }
  std::printf("%d failing case(s)\n", failures);
  return failures ? 1 : 0;
}
