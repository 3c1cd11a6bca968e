// Host emulation of the CUDA training-op kernels (csrc/cuda/quantize.cu, codebook_ema.cu,
// relation.cu) for machines without a GPU. The .cu files are compiled by g++ as plain C++ and run
// on the fiber emulator of emu_runtime.h; the launchers (and CUB's radix sort, which g++ cannot
// compile) are left out, and this file replays each launcher's sequence of kernels with the same
// launch plans. The sort is a host std::stable_sort of (key, row): what a stable radix sort gives.
//
// Every check is bit for bit against an oracle that repeats the kernels' fp32 arithmetic in the
// same order (segment pieces per 64-row tile, butterfly-then-warp block sums, float64 EMA total,
// padded fmaf chains): outputs must be identical (NaN matches NaN; in the relation op -0 matches
// +0). The relation op is also compared, with a tolerance, with a float64 port of
// lgvq_kernels/reference.py, which checks the formulas themselves.
//
// Build: g++ -std=c++20 -O2 -ffp-contract=off -I<cuda>/include emulate_training_ops.cpp
// (optionally -fsanitize=address,undefined). Usage: emulate_training_ops [--quick]; prints one
// line per case, exits 1 on any mismatch.
#include "emu_runtime.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define LGVQ_QUANTIZE_KERNELS_ONLY
#define LGVQ_CODEBOOK_EMA_KERNELS_ONLY
#define LGVQ_RELATION_KERNELS_ONLY
#ifndef LGVQ_QUANTIZE_CU  // -D them to test other copies of the kernels
#define LGVQ_QUANTIZE_CU "../../../csrc/cuda/quantize.cu"
#endif
#ifndef LGVQ_CODEBOOK_EMA_CU
#define LGVQ_CODEBOOK_EMA_CU "../../../csrc/cuda/codebook_ema.cu"
#endif
#ifndef LGVQ_RELATION_CU
#define LGVQ_RELATION_CU "../../../csrc/cuda/relation.cu"
#endif
#include LGVQ_QUANTIZE_CU
#include LGVQ_CODEBOOK_EMA_CU
#include LGVQ_RELATION_CU

namespace {

namespace qd = lgvq::cuda::quantize_detail;
namespace ed = lgvq::cuda::codebook_ema_detail;
namespace rd = lgvq::cuda::relation_detail;

// ---- helpers -----------------------------------------------------------------------------------

float to_f(float v) { return v; }
float to_f(__half v) { return __half2float(v); }
float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
float to_f(unsigned long long v) { return static_cast<float>(v); }
template <typename T>
T from_f(float v);
template <>
float from_f<float>(float v) { return v; }
template <>
__half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

const char* type_name(float) { return "f32"; }
const char* type_name(__half) { return "f16"; }
const char* type_name(__nv_bfloat16) { return "bf16"; }

template <typename V>
uint64_t bits_of(V v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(V));
  return b;
}

// Same bits, or both NaN (payloads may differ); loose_zero: -0 and +0 match too.
template <typename V>
bool same(V got, V want, bool loose_zero = false) {
  const float g = to_f(got), w = to_f(want);
  if (std::isnan(g) && std::isnan(w)) return true;
  if (loose_zero && g == 0.0f && w == 0.0f) return true;
  return bits_of(got) == bits_of(want);
}

// Counts mismatches of got vs want (up to 4 printed); returns 1 when any.
template <typename V>
int compare(const char* what, const std::vector<V>& got, const std::vector<V>& want,
            bool loose_zero = false) {
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!same(got[i], want[i], loose_zero)) {
      if (bad < 4) {
        std::printf("  %s[%zu]: got %.9g (0x%llx) want %.9g (0x%llx)\n", what, i,
                    static_cast<double>(to_f(got[i])),
                    static_cast<unsigned long long>(bits_of(got[i])),
                    static_cast<double>(to_f(want[i])),
                    static_cast<unsigned long long>(bits_of(want[i])));
      }
      ++bad;
    }
  }
  if (bad) std::printf("  %s: %d of %zu differ\n", what, bad, want.size());
  return bad ? 1 : 0;
}
int compare_i64(const char* what, const std::vector<int64_t>& got,
                const std::vector<int64_t>& want) {
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      if (bad < 4) {
        std::printf("  %s[%zu]: got %lld want %lld\n", what, i, static_cast<long long>(got[i]),
                    static_cast<long long>(want[i]));
      }
      ++bad;
    }
  }
  return bad ? 1 : 0;
}

// The kernels' block_sum: butterfly within each warp of 32, then the 8 warps in order.
template <typename V>
V block_order_sum(const std::vector<V>& per_thread) {
  V total{};
  for (int w = 0; w < 8; ++w) {
    V lanes[32];
    for (int l = 0; l < 32; ++l) lanes[l] = per_thread[w * 32 + l];
    for (int offset = 16; offset > 0; offset /= 2) {
      V next[32];
      for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
      std::copy(next, next + 32, lanes);
    }
    total = w == 0 ? lanes[0] : total + lanes[0];
  }
  return total;
}

// A warp's lane-strided fmaf chain over `terms` (term c goes to lane c % 32), then a butterfly.
float warp_fma_sum(const std::vector<float>& a, const std::vector<float>& b) {
  float lanes[32] = {};
  for (size_t c = 0; c < a.size(); ++c) lanes[c % 32] = std::fmaf(a[c], b[c], lanes[c % 32]);
  for (int offset = 16; offset > 0; offset /= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    std::copy(next, next + 32, lanes);
  }
  return lanes[0];
}

template <typename T>
std::vector<T> random_values(size_t count, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<T> out(count);
  for (auto& v : out) v = from_f<T>(normal(rng));
  return out;
}

// vector<bool> has no data(): masks live in vector<char> reinterpreted as bool (1 byte each).
using Mask = std::vector<char>;
const bool* mask_ptr(const Mask& m) {
  return m.empty() ? nullptr : reinterpret_cast<const bool*>(m.data());
}

// ---- quantizer forward -----------------------------------------------------------------------

struct RowCase {
  std::string name;
  int64_t n, k, d;
  bool masked;
  int pattern;  // 0 random codes; 1 all rows on one code (crosses tiles); 2 with out-of-range
                // indices and NaN in masked rows; 3 runs of equal codes; 4 few codes, long runs
};

struct RowData {
  std::vector<int64_t> indices;
  Mask mask;
};

RowData make_rows(const RowCase& c, std::mt19937& rng) {
  RowData r;
  r.indices.resize(c.n);
  std::uniform_int_distribution<int64_t> code(0, c.k - 1);
  for (int64_t i = 0; i < c.n; ++i) {
    switch (c.pattern) {
      case 1: r.indices[i] = std::min<int64_t>(2, c.k - 1); break;
      case 3: r.indices[i] = (i / 37) % c.k; break;
      case 4: r.indices[i] = code(rng) % std::min<int64_t>(c.k, 3); break;
      default: r.indices[i] = code(rng);
    }
  }
  if (c.pattern == 2) {
    for (int64_t i = 3; i < c.n; i += 11) r.indices[i] = -1 - i;
    for (int64_t i = 5; i < c.n; i += 13) r.indices[i] = c.k + i;
  }
  if (c.masked) {
    r.mask.resize(c.n);
    std::bernoulli_distribution keep(0.7);
    for (auto& m : r.mask) m = keep(rng);
  }
  return r;
}

bool in_range(int64_t code, int64_t k) { return code >= 0 && code < k; }

template <typename T>
int check_forward(const RowCase& c, std::mt19937& rng) {
  const RowData rows = make_rows(c, rng);
  std::vector<T> x = random_values<T>(c.n * c.d, rng), codebook = random_values<T>(c.k * c.d, rng);
  if (c.pattern == 2 && c.masked) {  // a NaN in a masked-out row still poisons the loss
    for (int64_t i = 0; i < c.n; ++i) {
      if (!rows.mask[i] && in_range(rows.indices[i], c.k)) {
        x[i * c.d] = from_f<T>(std::numeric_limits<float>::quiet_NaN());
        break;
      }
    }
  }
  const int64_t blocks = qd::forward_blocks(c.n, c.d);
  std::vector<T> quantized(c.n * c.d, from_f<T>(-7.0f));
  std::vector<float> partial_sums(blocks), squared_error(1);
  std::vector<unsigned long long> partial_counts(blocks);
  emu::launch(dim3(static_cast<unsigned>(blocks)), [&] {
    qd::quantize_forward_kernel<T>(x.data(), codebook.data(), rows.indices.data(),
                                   mask_ptr(rows.mask), c.n, c.k, c.d, quantized.data(),
                                   partial_sums.data(), partial_counts.data());
  });
  emu::launch(dim3(1), [&] {
    qd::quantize_forward_finish_kernel(partial_sums.data(), partial_counts.data(), blocks, c.d,
                                       squared_error.data());
  });

  // Oracle, in the kernels' order.
  std::vector<T> want_q(c.n * c.d);
  const int lanes = qd::lanes_per_row(c.d), groups = 256 / lanes;
  const int64_t per_block = qd::forward_rows_per_block(c.d);
  std::vector<float> want_partials(blocks);
  std::vector<unsigned long long> want_counts(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    std::vector<float> sums(256, 0.0f);
    std::vector<unsigned long long> counts(256, 0);
    const int64_t begin = b * per_block, end = std::min(c.n, begin + per_block);
    for (int t = 0; t < 256; ++t) {
      const int group = t / lanes, lane = t % lanes;
      for (int64_t row = begin + group; row < end; row += groups) {
        const int64_t code = rows.indices[row];
        const bool ok = in_range(code, c.k);
        const bool selected = rows.mask.empty() || rows.mask[row];
        if (ok && selected && lane == 0) ++counts[t];
        for (int64_t col = lane; col < c.d; col += lanes) {
          want_q[row * c.d + col] = ok ? codebook[code * c.d + col] : from_f<T>(0.0f);
          if (!ok) continue;
          const float diff = to_f(x[row * c.d + col]) - to_f(codebook[code * c.d + col]);
          sums[t] += (diff * diff) * (selected ? 1.0f : 0.0f);
        }
      }
    }
    want_partials[b] = block_order_sum(sums);
    want_counts[b] = block_order_sum(counts);
  }
  std::vector<float> sums(256, 0.0f);
  std::vector<unsigned long long> counts(256, 0);
  for (int t = 0; t < 256; ++t) {
    for (int64_t b = t; b < blocks; b += 256) {
      sums[t] += want_partials[b];
      counts[t] += want_counts[b];
    }
  }
  const long long elements = static_cast<long long>(block_order_sum(counts)) * c.d;
  const std::vector<float> want_error = {block_order_sum(sums) /
                                         static_cast<float>(elements > 0 ? elements : 1)};
  int bad = compare("quantized", quantized, want_q) + compare("squared_error", squared_error,
                                                              want_error);
  std::printf("forward    %-28s %-4s: %s (loss %.6g)\n", c.name.c_str(), type_name(T{}),
              bad ? "MISMATCH" : "ok", static_cast<double>(squared_error[0]));
  return bad ? 1 : 0;
}

// ---- segment sums (backward and statistics) ----------------------------------------------------

// Emulates run_segments: keys kernel, the stable sort, tile kernel (normal grid and a single
// block: the grid-stride loop), combine kernel.
template <typename Op>
void run_segments(const Op& op, const RowData& rows, int64_t n, int64_t k, int64_t columns,
                  bool count_valid, bool single_block, unsigned long long* valid_count) {
  std::vector<uint32_t> keys(n), row_ids(n);
  *valid_count = 0;
  emu::launch(dim3(static_cast<unsigned>(qd::ceil_div(n, qd::kThreads))), [&] {
    qd::segment_keys_kernel(rows.indices.data(), mask_ptr(rows.mask), n, k, keys.data(),
                            row_ids.data(), count_valid ? valid_count : nullptr);
  });
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  std::vector<uint32_t> sorted_keys(n), sorted_rows(n);
  for (int64_t p = 0; p < n; ++p) {
    sorted_keys[p] = keys[order[p]];
    sorted_rows[p] = row_ids[order[p]];
  }
  const size_t partials = static_cast<size_t>(qd::ceil_div(n, qd::kTileRows) * columns);
  std::vector<float> head(partials, std::numeric_limits<float>::quiet_NaN()),
      tail(partials, std::numeric_limits<float>::quiet_NaN());
  const unsigned blocks = single_block ? 1u : qd::segment_tile_blocks(n, columns);
  emu::launch(dim3(blocks), [&] {
    qd::segment_tile_kernel<Op>(op, sorted_keys.data(), sorted_rows.data(), n, k, columns,
                                head.data(), tail.data());
  });
  if (k > 0) {
    emu::launch(dim3(qd::segment_combine_blocks(k)), [&] {
      qd::segment_combine_kernel<Op>(op, sorted_keys.data(), n, k, columns, head.data(),
                                     tail.data());
    });
  }
}

// The segment-sum order: rows sorted stably by code, cut into 64-row tiles; each code's piece in
// a tile summed from 0 in order, pieces added in tile order. contribution(row, col) -> float.
template <typename F>
std::vector<float> segment_oracle(const RowData& rows, int64_t n, int64_t k, int64_t columns,
                                  F contribution) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  auto key = [&](int64_t i) { return in_range(rows.indices[i], k) ? rows.indices[i] : k; };
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return key(a) < key(b); });
  std::vector<float> out(k * columns, 0.0f);
  int64_t p = 0;
  for (int64_t code = 0; code < k; ++code) {
    while (p < n && key(order[p]) < code) ++p;
    int64_t end = p;
    while (end < n && key(order[end]) == code) ++end;
    for (int64_t col = 0; col < columns; ++col) {
      float total = 0.0f;
      bool first_piece = true;
      for (int64_t piece = p; piece < end;) {
        const int64_t tile_end = std::min(end, (piece / qd::kTileRows + 1) * qd::kTileRows);
        float acc = 0.0f;
        for (int64_t q = piece; q < tile_end; ++q) acc += contribution(order[q], code, col);
        total = first_piece ? acc : total + acc;
        first_piece = false;
        piece = tile_end;
      }
      out[code * columns + col] = total;
    }
    p = end;
  }
  return out;
}

template <typename T>
int check_backward(const RowCase& c, bool with_grad, bool single_block, std::mt19937& rng) {
  const RowData rows = make_rows(c, rng);
  std::vector<T> x = random_values<T>(c.n * c.d, rng), codebook = random_values<T>(c.k * c.d, rng);
  std::vector<T> grad_q = with_grad ? random_values<T>(c.n * c.d, rng) : std::vector<T>();
  if (c.pattern == 2 && c.masked) {
    for (int64_t i = 0; i < c.n; ++i) {
      if (!rows.mask[i] && in_range(rows.indices[i], c.k)) {
        x[i * c.d + (c.d - 1)] = from_f<T>(std::numeric_limits<float>::infinity());
        break;
      }
    }
  }
  const std::vector<float> grad_commitment = {0.75f}, grad_codebook_loss = {1.5f};
  std::vector<T> grad_x(c.n * c.d, from_f<T>(-7.0f)), grad_codebook(c.k * c.d, from_f<T>(-7.0f));
  unsigned long long valid_count = 0;
  qd::BackwardOp<T> op{};
  op.grad_quantized = with_grad ? grad_q.data() : nullptr;
  op.grad_commitment = grad_commitment.data();
  op.grad_codebook_loss = grad_codebook_loss.data();
  op.valid_count = &valid_count;
  op.x = x.data();
  op.codebook = codebook.data();
  op.mask = mask_ptr(rows.mask);
  op.k = c.k;
  op.d = c.d;
  op.grad_x = grad_x.data();
  op.grad_codebook = grad_codebook.data();
  run_segments(op, rows, c.n, c.k, c.d, true, single_block, &valid_count);

  long long valid = 0;
  for (int64_t i = 0; i < c.n; ++i) {
    valid += in_range(rows.indices[i], c.k) && (rows.mask.empty() || rows.mask[i]);
  }
  const long long elements = valid * c.d;
  const float scale = 2.0f / static_cast<float>(elements > 0 ? elements : 1);
  const float coef_x = grad_commitment[0] * scale, coef_codebook = -grad_codebook_loss[0] * scale;
  auto diff = [&](int64_t row, int64_t col) {
    const int64_t code = rows.indices[row];
    if (!in_range(code, c.k)) return 0.0f;
    const float weight = rows.mask.empty() || rows.mask[row] ? 1.0f : 0.0f;
    return (to_f(x[row * c.d + col]) - to_f(codebook[code * c.d + col])) * weight;
  };
  std::vector<T> want_x(c.n * c.d);
  for (int64_t row = 0; row < c.n; ++row) {
    for (int64_t col = 0; col < c.d; ++col) {
      float g = diff(row, col) * coef_x;
      if (with_grad) g = g + to_f(grad_q[row * c.d + col]);
      want_x[row * c.d + col] = from_f<T>(g);
    }
  }
  const std::vector<float> sums = segment_oracle(
      rows, c.n, c.k, c.d,
      [&](int64_t row, int64_t, int64_t col) { return diff(row, col) * coef_codebook; });
  std::vector<T> want_codebook(c.k * c.d);
  for (size_t i = 0; i < sums.size(); ++i) want_codebook[i] = from_f<T>(sums[i]);
  const std::vector<unsigned long long> got_valid = {valid_count},
                                        want_valid = {static_cast<unsigned long long>(valid)};
  int bad = compare("valid_count", got_valid, want_valid) + compare("grad_x", grad_x, want_x) +
            compare("grad_codebook", grad_codebook, want_codebook);
  std::printf("backward   %-28s %-4s grad=%d grid=%s: %s\n", c.name.c_str(), type_name(T{}),
              with_grad, single_block ? "1" : "full", bad ? "MISMATCH" : "ok");
  return bad ? 1 : 0;
}

template <typename T>
int check_statistics(const RowCase& c, bool single_block, std::mt19937& rng) {
  const RowData rows = make_rows(c, rng);
  std::vector<T> x = random_values<T>(c.n * c.d, rng);
  std::vector<float> stats(c.k * (c.d + 1), -7.0f);
  qd::StatisticsOp<T> op{};
  op.x = x.data();
  op.mask = mask_ptr(rows.mask);
  op.k = c.k;
  op.d = c.d;
  op.stats = stats.data();
  unsigned long long unused = 0;
  run_segments(op, rows, c.n, c.k, c.d + 1, false, single_block, &unused);
  const std::vector<float> want = segment_oracle(
      rows, c.n, c.k, c.d + 1, [&](int64_t row, int64_t, int64_t col) {
        const float weight = rows.mask.empty() || rows.mask[row] ? 1.0f : 0.0f;
        return col < c.d ? to_f(x[row * c.d + col]) * weight : weight;
      });
  const int bad = compare("stats", stats, want);
  std::printf("statistics %-28s %-4s grid=%s: %s\n", c.name.c_str(), type_name(T{}),
              single_block ? "1" : "full", bad ? "MISMATCH" : "ok");
  return bad;
}

// ---- EMA update --------------------------------------------------------------------------------

template <typename T>
int check_ema(int64_t k, int64_t d, bool with_replacement, double dead_threshold,
              std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(0.0f, 3.0f);
  std::vector<float> stats(k * (d + 1)), cluster_size(k), embed_sum(k * d), replacement(k * d);
  for (auto& v : stats) v = uniform(rng) - 1.0f;
  for (int64_t c = 0; c < k; ++c) stats[c * (d + 1) + d] = static_cast<float>((c * 7) % 5);
  for (auto& v : cluster_size) v = uniform(rng);
  for (auto& v : embed_sum) v = uniform(rng) - 1.5f;
  for (auto& v : replacement) v = uniform(rng);
  std::vector<T> codebook = random_values<T>(k * d, rng);
  const double decay = 0.8, eps = 1e-5;
  // Oracle first (from copies): the formulas of the contract, with the kernels' order.
  const ed::EmaScalars s = ed::make_scalars(k, decay, eps, dead_threshold, with_replacement);
  std::vector<float> want_size(cluster_size), want_sum(embed_sum);
  std::vector<T> want_codebook(codebook);
  Mask want_dead(k, 0);
  std::vector<double> per_thread(256, 0.0);
  for (int64_t c = 0; c < k; ++c) {
    float size = cluster_size[c] * s.keep + s.take * stats[c * (d + 1) + d];
    const bool dead = s.replace && size < s.threshold;
    if (dead) size = 1.0f;
    want_size[c] = size;
    want_dead[c] = dead;
    per_thread[c % 256] += static_cast<double>(size);
  }
  const float total = static_cast<float>(block_order_sum(per_thread));
  for (int64_t c = 0; c < k; ++c) {
    const float smoothed = (want_size[c] + s.eps) / (total + s.codes_eps) * total;
    for (int64_t col = 0; col < d; ++col) {
      const float value = want_dead[c] ? replacement[c * d + col]
                                       : embed_sum[c * d + col] * s.keep +
                                             s.take * stats[c * (d + 1) + col];
      want_sum[c * d + col] = value;
      if (smoothed > 0.0f) {
        want_codebook[c * d + col] = from_f<T>(value / std::max(smoothed, ed::kTiny));
      }
    }
  }

  Mask dead(k, 7);
  std::vector<float> total_buffer(1);
  emu::launch(dim3(1), [&] {
    ed::ema_cluster_size_kernel(stats.data(), cluster_size.data(),
                                reinterpret_cast<bool*>(dead.data()), k, d, s,
                                total_buffer.data());
  });
  emu::launch(dim3(ed::ema_code_blocks(k)), [&] {
    ed::ema_codebook_kernel<T>(stats.data(), cluster_size.data(), embed_sum.data(),
                               codebook.data(), s.replace ? replacement.data() : nullptr,
                               reinterpret_cast<const bool*>(dead.data()), k, d, s,
                               total_buffer.data());
  });
  int dead_count = 0, bad_dead = 0;
  for (int64_t c = 0; c < k; ++c) {
    dead_count += dead[c] != 0;
    bad_dead += dead[c] != want_dead[c];
  }
  const int bad = compare("cluster_size", cluster_size, want_size) +
                  compare("embed_sum", embed_sum, want_sum) +
                  compare("codebook", codebook, want_codebook) + (bad_dead ? 1 : 0);
  std::printf("ema        K%-4lld D%-4lld replace=%d threshold=%-4g %-4s (%d dead): %s\n",
              static_cast<long long>(k), static_cast<long long>(d), with_replacement,
              dead_threshold, type_name(T{}), dead_count, bad ? "MISMATCH" : "ok");
  return bad ? 1 : 0;
}

// ---- relation ----------------------------------------------------------------------------------

struct RelationCase {
  std::string name;
  int64_t batch, length, positions, width;
  int pattern;  // 0 random; 1 duplicate visual rows (ties) and a zero code row; 2 NaN in visual
};

template <typename TW, typename TC>
struct RelationData {
  std::vector<TW> words, visual;
  std::vector<TC> codes;
  Mask mask;
};

// Float oracle in the kernels' order (see relation.cu).
struct RelationExpected {
  std::vector<float> words_unit, visual_unit, best, unit, norm, difference, grad;
  std::vector<int64_t> chosen;
  float loss = 0.0f;
};

template <typename TW, typename TC>
RelationExpected relation_oracle(const RelationCase& c, const RelationData<TW, TC>& data,
                                 float grad_loss) {
  const int64_t B = c.batch, L = c.length, M = c.positions, C = c.width;
  const int64_t padded = qd::ceil_div(C, 32) * 32;
  RelationExpected e;
  auto normalize = [&](const auto& in, int64_t rows) {
    std::vector<float> out(rows * C);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> v(C);
      for (int64_t col = 0; col < C; ++col) v[col] = to_f(in[r * C + col]);
      const float norm = std::sqrt(warp_fma_sum(v, v));
      const float divisor = norm < 1e-12f ? 1e-12f : norm;
      for (int64_t col = 0; col < C; ++col) out[r * C + col] = v[col] / divisor;
    }
    return out;
  };
  e.words_unit = normalize(data.words, B * L);
  e.visual_unit = normalize(data.visual, B * M);
  e.best.resize(B * L);
  e.chosen.resize(B * L);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L; ++i) {
      float best = -std::numeric_limits<float>::infinity();
      int32_t best_p = 0x7fffffff;
      for (int64_t p = 0; p < M; ++p) {
        float acc = 0.0f;
        for (int64_t col = 0; col < padded; ++col) {
          const float w = col < C ? e.words_unit[(b * L + i) * C + col] : 0.0f;
          const float v = col < C ? e.visual_unit[(b * M + p) * C + col] : 0.0f;
          acc = std::fmaf(w, v, acc);
        }
        const bool an = std::isnan(acc), bn = std::isnan(best);
        const bool better = (an || bn) ? (an && (!bn || p < best_p))
                                       : (acc > best || (acc == best && p < best_p));
        if (better) {
          best = acc;
          best_p = static_cast<int32_t>(p);
        }
      }
      e.best[b * L + i] = best;
      e.chosen[b * L + i] = best_p;
    }
  }
  e.unit.resize(B * L * C);
  e.norm.resize(B * L);
  for (int64_t row = 0; row < B * L; ++row) {
    const int64_t b = row / L;
    const float s = e.best[row];
    std::vector<float> u(C);
    for (int64_t col = 0; col < C; ++col) {
      u[col] = s * to_f(data.codes[(b * M + e.chosen[row]) * C + col]);
    }
    const float norm = std::sqrt(warp_fma_sum(u, u));
    const float divisor = norm < 1e-12f ? 1e-12f : norm;
    for (int64_t col = 0; col < C; ++col) e.unit[row * C + col] = u[col] / divisor;
    e.norm[row] = norm;
  }
  auto m = [&](int64_t b, int64_t i) { return data.mask[b * L + i] ? 1.0f : 0.0f; };
  e.difference.resize(B * L * L);
  const int64_t tiles = qd::ceil_div(L, 32);
  std::vector<float> partials(B * tiles * tiles);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < L; ++j) {
        float p = 0.0f, q = 0.0f;
        for (int64_t col = 0; col < padded; ++col) {
          const bool in = col < C;
          const float ci = in ? e.unit[(b * L + i) * C + col] * m(b, i) : 0.0f;
          const float cj = in ? e.unit[(b * L + j) * C + col] * m(b, j) : 0.0f;
          const float wi = in ? e.words_unit[(b * L + i) * C + col] * m(b, i) : 0.0f;
          const float wj = in ? e.words_unit[(b * L + j) * C + col] * m(b, j) : 0.0f;
          p = std::fmaf(ci, cj, p);
          q = std::fmaf(wi, wj, q);
        }
        e.difference[(b * L + i) * L + j] = p - q;
      }
    }
    for (int64_t ti = 0; ti < tiles; ++ti) {
      for (int64_t tj = 0; tj < tiles; ++tj) {
        std::vector<float> squares(256, 0.0f);
        for (int t = 0; t < 256; ++t) {
          const int warp = t / 32, lane = t % 32;
          const int64_t j = tj * 32 + lane;
          for (int r = 0; r < 4; ++r) {
            const int64_t i = ti * 32 + warp * 4 + r;
            if (i < L && j < L) {
              const float diff = e.difference[(b * L + i) * L + j];
              squares[t] = std::fmaf(diff, diff, squares[t]);
            }
          }
        }
        partials[(b * tiles + ti) * tiles + tj] = block_order_sum(squares);
      }
    }
  }
  std::vector<float> sums(256, 0.0f);
  for (int t = 0; t < 256; ++t) {
    for (size_t item = t; item < partials.size(); item += 256) sums[t] += partials[item];
  }
  const int64_t count = B * L * L;
  e.loss = block_order_sum(sums) / static_cast<float>(count);

  // Backward.
  const int64_t padded_l = tiles * 32;
  std::vector<float> grad(B * L * C);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t col = 0; col < C; ++col) {
        float acc = 0.0f;
        for (int64_t j = 0; j < padded_l; ++j) {
          const float dij = j < L ? e.difference[(b * L + i) * L + j] : 0.0f;
          const float cj = j < L ? e.unit[(b * L + j) * C + col] * m(b, j) : 0.0f;
          acc = std::fmaf(dij, cj, acc);
        }
        grad[(b * L + i) * C + col] = acc;
      }
    }
  }
  const float coef = 4.0f * grad_loss / static_cast<float>(count);
  for (int64_t row = 0; row < B * L; ++row) {
    const float mm = data.mask[row] ? 1.0f : 0.0f;
    const float norm = e.norm[row], divisor = norm < 1e-12f ? 1e-12f : norm;
    std::vector<float> n(C), gu(C);
    for (int64_t col = 0; col < C; ++col) {
      n[col] = e.unit[row * C + col];
      gu[col] = (grad[row * C + col] * coef) * mm;
    }
    const float dot = warp_fma_sum(n, gu);
    for (int64_t col = 0; col < C; ++col) {
      const float projected = gu[col] - n[col] * dot;
      grad[row * C + col] = ((norm > 1e-12f ? projected : gu[col]) / divisor) * e.best[row];
    }
  }
  e.grad.assign(B * M * C, 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < M; ++p) {
      for (int64_t col = 0; col < C; ++col) {
        float acc = 0.0f;
        for (int64_t i = 0; i < L; ++i) {
          if (e.chosen[b * L + i] == p) acc += grad[(b * L + i) * C + col];
        }
        e.grad[(b * M + p) * C + col] = acc;
      }
    }
  }
  return e;
}

// Float64 port of lgvq_kernels/reference.py (relation_alignment_loss and its backward).
struct RelationReference {
  std::vector<int64_t> chosen;
  double loss = 0.0;
  std::vector<double> grad;
};

template <typename TW, typename TC>
RelationReference relation_reference(const RelationCase& c, const RelationData<TW, TC>& data,
                                     double grad_loss) {
  const int64_t B = c.batch, L = c.length, M = c.positions, C = c.width;
  auto normalize = [&](const auto& in, int64_t rows) {
    std::vector<double> out(rows * C);
    for (int64_t r = 0; r < rows; ++r) {
      double sq = 0;
      for (int64_t col = 0; col < C; ++col) {
        const double v = to_f(in[r * C + col]);
        sq += v * v;
      }
      const double norm = std::max(std::sqrt(sq), 1e-12);
      for (int64_t col = 0; col < C; ++col) out[r * C + col] = to_f(in[r * C + col]) / norm;
    }
    return out;
  };
  const std::vector<double> W = normalize(data.words, B * L), V = normalize(data.visual, B * M);
  RelationReference ref;
  ref.chosen.resize(B * L);
  std::vector<double> s(B * L), unit(B * L * C), norm(B * L), D(B * L * L);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L; ++i) {
      double best = -INFINITY;
      int64_t best_p = 0;
      for (int64_t p = 0; p < M; ++p) {
        double dot = 0;
        for (int64_t col = 0; col < C; ++col) {
          dot += W[(b * L + i) * C + col] * V[(b * M + p) * C + col];
        }
        if (p == 0 || dot > best) {
          best = dot;
          best_p = p;
        }
      }
      const int64_t row = b * L + i;
      ref.chosen[row] = best_p;
      s[row] = best;
      double sq = 0;
      for (int64_t col = 0; col < C; ++col) {
        const double u = best * to_f(data.codes[(b * M + best_p) * C + col]);
        sq += u * u;
      }
      norm[row] = std::sqrt(sq);
      for (int64_t col = 0; col < C; ++col) {
        unit[row * C + col] = best * to_f(data.codes[(b * M + best_p) * C + col]) /
                              std::max(norm[row], 1e-12);
      }
    }
  }
  auto m = [&](int64_t row) { return data.mask[row] ? 1.0 : 0.0; };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < L; ++j) {
        double p = 0, q = 0;
        for (int64_t col = 0; col < C; ++col) {
          p += unit[(b * L + i) * C + col] * m(b * L + i) * unit[(b * L + j) * C + col] *
               m(b * L + j);
          q += W[(b * L + i) * C + col] * m(b * L + i) * W[(b * L + j) * C + col] * m(b * L + j);
        }
        D[(b * L + i) * L + j] = p - q;
        ref.loss += (p - q) * (p - q);
      }
    }
  }
  const double count = double(B * L * L);
  ref.loss /= count;
  ref.grad.assign(B * M * C, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L; ++i) {
      const int64_t row = b * L + i;
      std::vector<double> gu(C);
      for (int64_t col = 0; col < C; ++col) {
        double acc = 0;
        for (int64_t j = 0; j < L; ++j) {
          acc += D[row * L + j] * unit[(b * L + j) * C + col] * m(b * L + j);
        }
        gu[col] = acc * (4.0 * grad_loss / count) * m(row);
      }
      double dot = 0;
      for (int64_t col = 0; col < C; ++col) dot += unit[row * C + col] * gu[col];
      for (int64_t col = 0; col < C; ++col) {
        const double projected = gu[col] - unit[row * C + col] * dot;
        const double g = (norm[row] > 1e-12 ? projected : gu[col]) / std::max(norm[row], 1e-12);
        ref.grad[(b * M + ref.chosen[row]) * C + col] += g * s[row];
      }
    }
  }
  return ref;
}

template <typename TW, typename TC>
int check_relation(const RelationCase& c, bool single_block, std::mt19937& rng) {
  const int64_t B = c.batch, L = c.length, M = c.positions, C = c.width;
  RelationData<TW, TC> data;
  data.words = random_values<TW>(B * L * C, rng);
  data.visual = random_values<TW>(B * M * C, rng);
  data.codes = random_values<TC>(B * M * C, rng);
  data.mask.resize(B * L);
  std::bernoulli_distribution keep(0.75);
  for (auto& v : data.mask) v = keep(rng);
  if (c.pattern == 1) {  // ties: position p + 3 repeats position p; a zero code row
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t p = 3; p < M; ++p) {
        for (int64_t col = 0; col < C; ++col) {
          data.visual[(b * M + p) * C + col] = data.visual[(b * M + p % 3) * C + col];
        }
      }
      for (int64_t col = 0; col < C; ++col) data.codes[(b * M + 1) * C + col] = from_f<TC>(0.0f);
    }
  }
  if (c.pattern == 2) {
    for (int64_t col = 0; col < C; col += 2) {
      data.visual[(0 * M + M / 2) * C + col] = from_f<TW>(std::numeric_limits<float>::quiet_NaN());
    }
  }
  const std::vector<float> grad_loss = {1.25f};

  // Emulated launch sequence (forward's steps, then the backward's).
  std::vector<float> words_unit(B * L * C), visual_unit(B * M * C);
  auto normalize = [&](const auto& in, int64_t rows, std::vector<float>& out) {
    const int64_t blocks = single_block ? 1 : qd::ceil_div(rows, rd::kWarps);
    emu::launch(dim3(static_cast<unsigned>(blocks)), [&] {
      rd::normalize_rows_kernel(in.data(), rows, C, out.data());
    });
  };
  normalize(data.words, B * L, words_unit);
  normalize(data.visual, B * M, visual_unit);
  auto grid = [&](int64_t items) { return dim3(single_block ? 1u : rd::grid_blocks(items)); };
  std::vector<float> best(B * L), norm(B * L), unit(B * L * C), difference(B * L * L),
      partials(rd::gram_items(B, L)), loss(1), grad(B * L * C);
  std::vector<int64_t> chosen(B * L, -1);
  std::vector<TC> grad_codes(B * M * C, from_f<TC>(-7.0f));
  emu::launch(grid(B * qd::ceil_div(L, rd::kTile)), [&] {
    rd::similarity_argmax_kernel(words_unit.data(), visual_unit.data(), B, L, M, C,
                                 chosen.data(), best.data());
  });
  emu::launch(grid(qd::ceil_div(B * L, rd::kWarps)), [&] {
    rd::prepare_codes_kernel<TC>(data.codes.data(), chosen.data(), best.data(), B * L, L, M, C,
                                 unit.data(), norm.data());
  });
  const bool* mask = mask_ptr(data.mask);
  emu::launch(grid(rd::gram_items(B, L)), [&] {
    rd::gram_difference_kernel(words_unit.data(), unit.data(), mask, B, L, C, difference.data(),
                               partials.data());
  });
  emu::launch(dim3(1), [&] {
    rd::loss_finish_kernel(partials.data(), rd::gram_items(B, L), B * L * L, loss.data());
  });
  emu::launch(grid(rd::grad_rows_items(B, L, C)), [&] {
    rd::grad_rows_kernel(difference.data(), unit.data(), mask, B, L, C, grad.data());
  });
  emu::launch(grid(qd::ceil_div(B * L, rd::kWarps)), [&] {
    rd::grad_transform_kernel(grad_loss.data(), unit.data(), norm.data(), best.data(), mask,
                              B * L, C, B * L * L, grad.data());
  });
  emu::launch(grid(rd::scatter_items(B, M)), [&] {
    rd::scatter_kernel<TC>(grad.data(), chosen.data(), B, L, M, C, grad_codes.data());
  });

  const RelationExpected want = relation_oracle(c, data, grad_loss[0]);
  std::vector<TC> want_grad(B * M * C);
  for (size_t i = 0; i < want_grad.size(); ++i) want_grad[i] = from_f<TC>(want.grad[i]);
  int bad = compare("words_unit", words_unit, want.words_unit) +
            compare("visual_unit", visual_unit, want.visual_unit) +
            compare_i64("chosen", chosen, want.chosen) + compare("best", best, want.best, true) +
            compare("loss", loss, std::vector<float>{want.loss}, true) +
            compare("grad_codes", grad_codes, want_grad, true);

  // The formulas: float64 reference (skipped with NaN inputs, or if an argmax is a near tie).
  std::string reference_note = "";
  if (c.pattern != 2) {
    const RelationReference ref = relation_reference(c, data, grad_loss[0]);
    if (ref.chosen != chosen) {
      reference_note = " (float64 argmax differs: near tie, reference check skipped)";
    } else {
      const double loss_error = std::fabs(ref.loss - loss[0]) / std::max(1e-6, std::fabs(ref.loss));
      // Compared in the output dtype: a zero code row's gradient is |grad_unit| / 1e-12, which
      // can overflow float16 in the reference too (it computes in float32, then casts).
      std::vector<double> rounded(ref.grad.size());
      double scale = 1e-12, grad_error = 0;
      for (size_t i = 0; i < ref.grad.size(); ++i) {
        rounded[i] = to_f(from_f<TC>(static_cast<float>(ref.grad[i])));
        if (std::isfinite(rounded[i])) scale = std::max(scale, std::fabs(rounded[i]));
      }
      for (size_t i = 0; i < ref.grad.size(); ++i) {
        const double got = to_f(grad_codes[i]);
        if (std::isinf(rounded[i]) && got == rounded[i]) continue;
        grad_error = std::max(grad_error, std::fabs(rounded[i] - got) / scale);
      }
      const double grad_tolerance = sizeof(TC) == 4 ? 1e-4 : 1.6e-2;  // one 16-bit rounding
      if (!(loss_error < 1e-4) || !(grad_error < grad_tolerance)) {
        std::printf("  vs float64 reference: loss rel error %.3g, grad error %.3g (of max)\n",
                    loss_error, grad_error);
        ++bad;
      }
    }
  }
  std::printf("relation   %-28s %-4s/%-4s grid=%s: %s%s\n", c.name.c_str(), type_name(TW{}),
              type_name(TC{}), single_block ? "1" : "full", bad ? "MISMATCH" : "ok",
              reference_note.c_str());
  return bad ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  std::mt19937 rng(2024);
  int failures = 0;

  std::vector<RowCase> row_cases = {
      {"N1-K1-D1", 1, 1, 1, false, 0},
      {"N7-K3-D3-mask", 7, 3, 3, true, 0},
      {"N64-K5-D8", 64, 5, 8, false, 0},
      {"N65-K1-D17-mask", 65, 1, 17, true, 0},
      {"N200-K7-D33-hot", 200, 7, 33, false, 1},
      {"N300-K20-D40-oob-nan-mask", 300, 20, 40, true, 2},
      {"N257-K9-D5-runs", 257, 9, 5, true, 3},
      {"N700-K511-D64-mask", 700, 511, 64, true, 0},
      {"N400-K6-D2-long-runs-oob", 400, 6, 2, false, 2},
      {"N330-K50-D70-few", 330, 50, 70, true, 4},
  };
  if (quick) row_cases.resize(7);
  for (const RowCase& c : row_cases) {
    failures += check_forward<float>(c, rng);
    failures += check_forward<__half>(c, rng);
    failures += check_forward<__nv_bfloat16>(c, rng);
    for (int single = 0; single < 2; ++single) {
      failures += check_backward<float>(c, true, single, rng);
      failures += check_backward<float>(c, false, single, rng);
      failures += check_statistics<float>(c, single, rng);
      if (quick && single) continue;
      failures += check_backward<__half>(c, true, single, rng);
      failures += check_backward<__nv_bfloat16>(c, false, single, rng);
      failures += check_statistics<__nv_bfloat16>(c, single, rng);
      failures += check_statistics<__half>(c, single, rng);
    }
  }
  {  // statistics with D = 0 (counts only)
    const RowCase c{"N100-K4-D0-counts", 100, 4, 0, true, 2};
    failures += check_statistics<float>(c, false, rng);
  }

  for (const int64_t k : {1, 7, 300, 1000}) {
    for (const int64_t d : {1, 5, 40}) {
      failures += check_ema<float>(k, d, false, 0.0, rng);
      failures += check_ema<float>(k, d, true, 0.9, rng);
      failures += check_ema<__nv_bfloat16>(k, d, true, 0.5, rng);
      if (!quick) failures += check_ema<__half>(k, d, true, 0.0, rng);
    }
  }
  failures += check_ema<float>(5, 0, true, 0.9, rng);

  std::vector<RelationCase> relation_cases = {
      {"B1-L1-M1-C1", 1, 1, 1, 1, 0},
      {"B2-L5-M7-C3", 2, 5, 7, 3, 0},
      {"B2-L33-M65-C17", 2, 33, 65, 17, 0},
      {"B3-L12-M70-C40-ties", 3, 12, 70, 40, 1},
      {"B2-L9-M9-C33-nan", 2, 9, 9, 33, 2},
      {"B1-L40-M20-C0", 1, 40, 20, 0, 0},
  };
  if (!quick) relation_cases.push_back({"B2-L77-M130-C64", 2, 77, 130, 64, 0});
  for (const RelationCase& c : relation_cases) {
    for (int single = 0; single < 2; ++single) {
      failures += check_relation<float, float>(c, single, rng);
      if (quick && single) continue;
      failures += check_relation<__half, __half>(c, single, rng);
      failures += check_relation<__nv_bfloat16, __nv_bfloat16>(c, single, rng);
      failures += check_relation<float, __nv_bfloat16>(c, single, rng);
    }
  }
  std::printf("%d failing case(s)\n", failures);
  return failures ? 1 : 0;
}
