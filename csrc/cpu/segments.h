// Helpers shared by the CPU training ops (quantize.cpp, codebook_ema.cpp): the stable counting
// sort of rows by code behind every deterministic segment sum, the split of codes into tasks of
// about equal work, and the compute type of each storage dtype. (Input checks: csrc/checks.h.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace lgvq {
namespace cpu_common {

inline constexpr int64_t kMinTaskElements = 1 << 15;  // smallest task worth a thread, in elements
inline constexpr int64_t kChunksPerThread = 8;        // code ranges per thread (load balance)

// float64 computes in float64; float32, float16 and bfloat16 compute in float32.
template <typename T>
using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows visited out of memory order (in code order, or a code row per row) are prefetched this
// many rows ahead: the hardware prefetcher does not follow a row index. On the loaded 2-core test
// machine (1 thread, N=16384, D=256 float32) it was within noise at K=1024 and gave the quantizer
// forward 6.6 -> 5.0 ms at K=16384 (a 16 MiB codebook); distances 1-8 were tried.
inline constexpr int64_t kPrefetchRows = 2;

// Prefetches the `bytes` bytes at p, one cache line at a time.
inline void prefetch_row(const void* p, size_t bytes, bool for_write = false) {
  const char* c = static_cast<const char*>(p);
  if (for_write) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 1, 3);
  } else {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
  }
}

// Valid rows grouped by code: rows[offsets[c] .. offsets[c + 1]) are the rows of code c,
// ascending (stable counting sort, O(N + K)); masked-out rows are listed in `skipped`.
struct CodeSegments {
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
  std::vector<int64_t> skipped;
};

inline CodeSegments segments_by_code(const int64_t* indices, const bool* mask, int64_t n,
                                     int64_t k) {
  CodeSegments s;
  s.offsets.assign(static_cast<size_t>(k) + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (mask == nullptr || mask[i]) ++s.offsets[indices[i] + 1];
  }
  for (int64_t c = 0; c < k; ++c) s.offsets[c + 1] += s.offsets[c];
  s.rows.resize(static_cast<size_t>(s.offsets[k]));
  s.skipped.reserve(static_cast<size_t>(n - s.offsets[k]));
  std::vector<int64_t> next(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    if (mask == nullptr || mask[i]) {
      s.rows[next[indices[i]]++] = i;
    } else {
      s.skipped.push_back(i);
    }
  }
  return s;
}

// Boundaries of consecutive code ranges of about equal work (rows + 1 per code).
inline std::vector<int64_t> balanced_code_ranges(const std::vector<int64_t>& offsets, int64_t k,
                                                 int64_t dim) {
  const int64_t work = offsets[k] + k;
  const int64_t wanted = std::max<int64_t>(1, at::get_num_threads() * kChunksPerThread);
  const int64_t min_work = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(dim, 1));
  const int64_t target = std::max(min_work, (work + wanted - 1) / wanted);
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  for (int64_t c = 0; c < k; ++c) {
    acc += offsets[c + 1] - offsets[c] + 1;
    if (acc >= target && c + 1 < k) {
      bounds.push_back(c + 1);
      acc = 0;
    }
  }
  bounds.push_back(k);
  return bounds;
}

// Calls per_task(first_code, end_code) in parallel over consecutive code ranges of about equal
// work (each task owns codes [first_code, end_code)). Each code is summed whole by one task, so
// the result depends neither on where the ranges fall nor on the thread count. A task may keep
// O(D) scratch for its codes.
template <typename F>
void parallel_over_codes(const CodeSegments& segments, int64_t k, int64_t dim, const F& per_task) {
  const std::vector<int64_t> bounds = balanced_code_ranges(segments.offsets, k, dim);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1,
                   [&](int64_t begin, int64_t end) { per_task(bounds[begin], bounds[end]); });
}

// Pointer to a contiguous bool mask, or nullptr when there is none; `holder` keeps it alive.
inline const bool* mask_data(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  holder = mask->contiguous();
  return holder.data_ptr<bool>();
}

}  // namespace cpu_common
}  // namespace lgvq
