// Helpers shared by the CPU training ops (quantize.cpp, codebook_ema.cpp): dtype and index
// checks, the stable counting sort of rows by code behind every deterministic segment sum, and
// the split of codes into tasks of about equal work.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#define LGVQ_CHECK_INPUT(op, cond, ...) \
  TORCH_CHECK_VALUE(cond, "lgvq_C::", op, ": ", __VA_ARGS__)

namespace lgvq {
namespace cpu_common {

inline constexpr int64_t kMinTaskElements = 1 << 15;  // smallest task worth a thread, in elements
inline constexpr int64_t kChunksPerThread = 8;        // code ranges per thread (load balance)

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// One cheap branch-free pass; only a failing batch pays for finding the first offender.
inline void check_indices_in_range(const char* op, const int64_t* indices, int64_t n, int64_t k) {
  const uint64_t limit = static_cast<uint64_t>(k);
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(indices[i]) >= limit;
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i) {
    LGVQ_CHECK_INPUT(op, static_cast<uint64_t>(indices[i]) < limit, "indices must lie in [0, ", k,
                     ") (the number of codes), got indices[", i, "] = ", indices[i]);
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

// Boundaries of consecutive code ranges of about equal work (rows + 1 per code). Each code is
// summed whole by one task, so the result does not depend on where these boundaries fall.
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

// Pointer to a contiguous bool mask, or nullptr when there is none; `holder` keeps it alive.
inline const bool* mask_data(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  holder = mask->contiguous();
  return holder.data_ptr<bool>();
}

}  // namespace cpu_common
}  // namespace lgvq
