// Codebook statistics and the EMA codebook update on CPU. Formulas: lgvq_kernels/reference.py.
//
// codebook_statistics: the valid rows are counting-sorted by code (stable: rows ascending within
// a code); tasks own whole codes and sum each code's rows in ascending order straight into its
// row of the packed [K, D + 1] output - the order of the reference's index_add, no atomics, the
// same bits whatever the thread count. Scratch: O(N + K) indices.
// codebook_ema_update_: one serial O(K) pass for the cluster sizes, the dead mask and their total
// (accumulated in float64, fixed order), then one pass parallel over codes that updates the EMA
// sums, replaces dead codes and writes the new codebook row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "segments.h"
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace lgvq {
namespace {

using namespace cpu_common;  // the shared counting sort, checks and task split
using namespace cpu_simd;    // AVX2 checks, 8-lane loads

constexpr int64_t kPrefetchRows = 2;           // statistics: rows prefetched ahead (code order)

template <typename T>
using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, typename C>
using AccumulateRowFn = void (*)(const T*, C*, int64_t);

namespace baseline {
template <typename T, typename C>
void accumulate_row(const T* x, C* acc, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<C>(x[d]);
}
}  // namespace baseline

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

template <typename T>
void accumulate_row(const T* x, float* acc, int64_t dim) {
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), load8(x + d)));
  }
  for (; d < dim; ++d) acc[d] += static_cast<float>(x[d]);
}
}  // namespace avx2
#pragma GCC pop_options


template <typename T, typename C>
AccumulateRowFn<T, C> pick_accumulate_row() {
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu_has_avx2_fma_f16c()) return &avx2::accumulate_row<T>;
  }
  return &baseline::accumulate_row<T, C>;
}

#define CHECK_INPUT(op, cond, ...) TORCH_CHECK_VALUE(cond, "lgvq_C::", op, ": ", __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// codebook_statistics
// ---------------------------------------------------------------------------------------------
template <typename T, typename C>
void statistics_rows(const T* x, const CodeSegments& segments, int64_t k, int64_t dim, C* stats) {
  const AccumulateRowFn<T, C> accumulate_row = pick_accumulate_row<T, C>();
  const std::vector<int64_t> bounds = balanced_code_ranges(segments.offsets, k, dim);
  const int64_t* offsets = segments.offsets.data();
  const int64_t* rows = segments.rows.data();
  const int64_t valid = segments.offsets[k];
  const size_t row_bytes = sizeof(T) * static_cast<size_t>(dim);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t range = begin; range < end; ++range) {
      for (int64_t c = bounds[range]; c < bounds[range + 1]; ++c) {
        C* out = stats + c * (dim + 1);
        std::fill(out, out + dim, C(0));
        for (int64_t r = offsets[c]; r < offsets[c + 1]; ++r) {
          if (r + kPrefetchRows < valid) {  // the hardware prefetcher cannot follow rows[]
            const char* ahead = reinterpret_cast<const char*>(x + rows[r + kPrefetchRows] * dim);
            for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off, 0, 3);
          }
          accumulate_row(x + rows[r] * dim, out, dim);
        }
        out[dim] = static_cast<C>(offsets[c + 1] - offsets[c]);
      }
    }
  });
}

at::Tensor codebook_statistics_cpu(const at::Tensor& x_in, const at::Tensor& indices_in,
                                   int64_t num_codes, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "codebook_statistics";
  CHECK_INPUT(op, x_in.device().is_cpu(), "x must be a CPU tensor, got ", x_in.device());
  CHECK_INPUT(op, indices_in.device().is_cpu(), "indices must be a CPU tensor, got ",
              indices_in.device());
  CHECK_INPUT(op, x_in.dim() == 2, "x must be [N, D], got shape ", x_in.sizes());
  CHECK_INPUT(op, is_float_dtype(x_in.scalar_type()),
              "x must be float32, float64, float16 or bfloat16, got ", x_in.scalar_type());
  CHECK_INPUT(op, num_codes >= 0, "num_codes must be >= 0, got ", num_codes);
  CHECK_INPUT(op, indices_in.dim() == 1 && indices_in.size(0) == x_in.size(0),
              "indices must be [N] = [", x_in.size(0), "] (one per row of x), got shape ",
              indices_in.sizes());
  CHECK_INPUT(op, indices_in.scalar_type() == at::kLong, "indices must be int64, got ",
              indices_in.scalar_type());
  at::Tensor mask_c;
  if (mask.has_value() && mask->defined()) {
    CHECK_INPUT(op, mask->device().is_cpu(), "mask must be a CPU tensor, got ", mask->device());
    CHECK_INPUT(op, mask->dim() == 1 && mask->size(0) == x_in.size(0), "mask must be [N] = [",
                x_in.size(0), "], got shape ", mask->sizes());
    CHECK_INPUT(op, mask->scalar_type() == at::kBool, "mask must be bool, got ",
                mask->scalar_type());
    mask_c = mask->contiguous();
  }
  const at::Tensor x = x_in.contiguous(), indices = indices_in.contiguous();
  const int64_t n = x.size(0), dim = x.size(1);
  const int64_t* index_ptr = indices.data_ptr<int64_t>();
  check_indices_in_range(op, index_ptr, n, num_codes);
  const CodeSegments segments =
      segments_by_code(index_ptr, mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr, n,
                       num_codes);

  const at::ScalarType compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = at::empty({num_codes, dim + 1}, x.options().dtype(compute));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lgvq_codebook_statistics_cpu", [&] {
    using C = Compute<scalar_t>;
    statistics_rows<scalar_t, C>(x.data_ptr<scalar_t>(), segments, num_codes, dim,
                                 stats.data_ptr<C>());
  });
  return stats;
}

// ---------------------------------------------------------------------------------------------
// codebook_ema_update_
// ---------------------------------------------------------------------------------------------
template <typename S, typename T>
void ema_update(const S* stats, S* cluster_size, S* embed_sum, T* codebook, const S* replacement,
                bool* dead, int64_t k, int64_t dim, double decay, double eps,
                double dead_threshold) {
  // Scalars cast to the state dtype as the reference's tensor-scalar ops do.
  const S keep = static_cast<S>(decay), take = static_cast<S>(1.0 - decay);
  const S threshold = static_cast<S>(dead_threshold);
  const bool replace = replacement != nullptr && dead_threshold > 0;
  double total_sum = 0;  // fixed order, float64: the bits never depend on threads
  for (int64_t c = 0; c < k; ++c) {
    S size = cluster_size[c] * keep + take * stats[c * (dim + 1) + dim];
    dead[c] = replace && size < threshold;
    if (dead[c]) size = S(1);
    cluster_size[c] = size;
    total_sum += static_cast<double>(size);
  }
  const S total = static_cast<S>(total_sum);
  const S denominator = total + static_cast<S>(static_cast<double>(k) * eps);
  const S eps_s = static_cast<S>(eps);
  const S tiny = std::numeric_limits<S>::min();
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(dim, 1));
  at::parallel_for(0, k, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      S* sum = embed_sum + c * dim;
      if (dead[c]) {
        const S* fresh = replacement + c * dim;
        for (int64_t d = 0; d < dim; ++d) sum[d] = fresh[d];
      } else {
        const S* batch = stats + c * (dim + 1);
        for (int64_t d = 0; d < dim; ++d) sum[d] = sum[d] * keep + take * batch[d];
      }
      // total == 0 (nothing ever counted), eps == 0 with an empty code, or NaN: keep the code.
      const S smoothed = (cluster_size[c] + eps_s) / denominator * total;
      if (!(smoothed > S(0))) continue;
      const S divisor = std::max(smoothed, tiny);
      T* out = codebook + c * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(sum[d] / divisor);
    }
  });
}

// An in-place argument that is not contiguous is updated through a contiguous copy.
struct InPlace {
  at::Tensor target, work;
  explicit InPlace(const at::Tensor& t) : target(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() {
    if (!work.is_same(target)) target.copy_(work);
  }
};

at::Tensor codebook_ema_update_cpu(const at::Tensor& stats_in, const at::Tensor& cluster_size,
                                   const at::Tensor& embed_sum, const at::Tensor& codebook,
                                   double decay, double eps, double dead_threshold,
                                   const std::optional<at::Tensor>& replacement_in) {
  constexpr const char* op = "codebook_ema_update_";
  const auto check_cpu = [&](const char* name, const at::Tensor& t) {
    CHECK_INPUT(op, t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  };
  check_cpu("stats", stats_in);
  check_cpu("cluster_size", cluster_size);
  check_cpu("embed_sum", embed_sum);
  check_cpu("codebook", codebook);
  CHECK_INPUT(op, codebook.dim() == 2, "codebook must be [K, D], got shape ", codebook.sizes());
  const int64_t k = codebook.size(0), dim = codebook.size(1);
  CHECK_INPUT(op, is_float_dtype(codebook.scalar_type()),
              "codebook must be float32, float64, float16 or bfloat16, got ",
              codebook.scalar_type());
  const at::ScalarType state = cluster_size.scalar_type();
  CHECK_INPUT(op, state == at::kFloat || state == at::kDouble,
              "cluster_size must be float32 or float64, got ", state);
  CHECK_INPUT(op, cluster_size.dim() == 1 && cluster_size.size(0) == k,
              "cluster_size must be [K] = [", k, "] (codebook is ", codebook.sizes(),
              "), got shape ", cluster_size.sizes());
  CHECK_INPUT(op, embed_sum.sizes() == codebook.sizes(), "embed_sum must be [K, D] = ",
              codebook.sizes(), ", got shape ", embed_sum.sizes());
  CHECK_INPUT(op, embed_sum.scalar_type() == state, "embed_sum (", embed_sum.scalar_type(),
              ") must have cluster_size's dtype (", state, ")");
  CHECK_INPUT(op, stats_in.dim() == 2 && stats_in.size(0) == k && stats_in.size(1) == dim + 1,
              "stats must be [K, D + 1] = [", k, ", ", dim + 1, "], got shape ", stats_in.sizes());
  CHECK_INPUT(op, stats_in.scalar_type() == at::kFloat || stats_in.scalar_type() == at::kDouble,
              "stats must be float32 or float64, got ", stats_in.scalar_type());
  at::Tensor replacement;
  if (replacement_in.has_value() && replacement_in->defined()) {
    const at::Tensor& r = *replacement_in;
    CHECK_INPUT(op, r.device().is_cpu(), "replacement must be a CPU tensor, got ", r.device());
    CHECK_INPUT(op, r.sizes() == codebook.sizes(), "replacement must be [K, D] = ",
                codebook.sizes(), ", got shape ", r.sizes());
    CHECK_INPUT(op, is_float_dtype(r.scalar_type()),
                "replacement must be float32, float64, float16 or bfloat16, got ", r.scalar_type());
    if (dead_threshold > 0) replacement = r.to(state).contiguous();
  }
  const at::Tensor stats = stats_in.to(state).contiguous();
  at::Tensor dead = at::empty({k}, cluster_size.options().dtype(at::kBool));
  InPlace sizes(cluster_size), sums(embed_sum), codes(codebook);
  AT_DISPATCH_FLOATING_TYPES(state, "lgvq_codebook_ema_update_cpu", [&] {
    using S = scalar_t;
    const S* stats_ptr = stats.data_ptr<S>();
    S* size_ptr = sizes.work.data_ptr<S>();
    S* sum_ptr = sums.work.data_ptr<S>();
    const S* replacement_ptr = replacement.defined() ? replacement.data_ptr<S>() : nullptr;
    bool* dead_ptr = dead.data_ptr<bool>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(),
                                    "lgvq_codebook_ema_update_cpu_codebook", [&] {
      ema_update<S, scalar_t>(stats_ptr, size_ptr, sum_ptr, codes.work.data_ptr<scalar_t>(),
                              replacement_ptr, dead_ptr, k, dim, decay, eps, dead_threshold);
    });
  });
  sizes.finish();
  sums.finish();
  codes.finish();
  return dead;
}

#undef CHECK_INPUT

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CPU, m) {
  m.impl("codebook_statistics", &codebook_statistics_cpu);
  m.impl("codebook_ema_update_", &codebook_ema_update_cpu);
}

}  // namespace lgvq
