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

#include "../checks.h"
#include "segments.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace lgvq {
namespace {

using namespace checks;      // input checks (csrc/checks.h)
using namespace cpu_common;  // the shared counting sort and task split
using namespace cpu_simd;    // AVX2 checks, 8-lane loads

template <typename T, typename C>
using AccumulateRowFn = void (*)(const T*, C*, int64_t);

namespace baseline {
template <typename T, typename C>
void accumulate_row(const T* x, C* acc, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<C>(x[d]);
}
}  // namespace baseline

#if LGVQ_HAVE_AVX2
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
#endif  // LGVQ_HAVE_AVX2

// ---------------------------------------------------------------------------------------------
// codebook_statistics
// ---------------------------------------------------------------------------------------------
template <typename T, typename C>
void statistics_rows(const T* x, const CodeSegments& segments, int64_t k, int64_t dim, C* stats) {
  const AccumulateRowFn<T, C> accumulate_row =
      LGVQ_PICK_ISA((std::is_same_v<C, float>), cpu_has_avx2_fma_f16c, &avx2::accumulate_row<T>,
                    (&baseline::accumulate_row<T, C>));
  const int64_t* offsets = segments.offsets.data();
  const int64_t* rows = segments.rows.data();
  const int64_t valid = segments.offsets[k];
  const size_t row_bytes = sizeof(T) * static_cast<size_t>(dim);
  parallel_over_codes(segments, k, dim, [&](int64_t first_code, int64_t end_code) {
    for (int64_t c = first_code; c < end_code; ++c) {
      C* out = stats + c * (dim + 1);
      std::fill(out, out + dim, C(0));
      for (int64_t r = offsets[c]; r < offsets[c + 1]; ++r) {
        if (r + kPrefetchRows < valid) prefetch_row(x + rows[r + kPrefetchRows] * dim, row_bytes);
        accumulate_row(x + rows[r] * dim, out, dim);
      }
      out[dim] = static_cast<C>(offsets[c + 1] - offsets[c]);
    }
  });
}

at::Tensor codebook_statistics_cpu(const at::Tensor& x_in, const at::Tensor& indices_in,
                                   int64_t num_codes, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "codebook_statistics";
  check_statistics_inputs(op, x_in, indices_in, num_codes, mask);
  const at::Tensor x = x_in.contiguous(), indices = indices_in.contiguous();
  const int64_t n = x.size(0), dim = x.size(1);
  const int64_t* index_ptr = indices.data_ptr<int64_t>();
  check_indices_in_range(op, index_ptr, n, num_codes);
  at::Tensor mask_holder;
  const CodeSegments segments =
      segments_by_code(index_ptr, mask_data(mask, mask_holder), n, num_codes);

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
  check_ema_inputs(op, stats_in, cluster_size, embed_sum, codebook, replacement_in);
  const int64_t k = codebook.size(0), dim = codebook.size(1);
  const at::ScalarType state = cluster_size.scalar_type();
  at::Tensor replacement;
  if (has_value(replacement_in) && dead_threshold > 0) {
    replacement = replacement_in->to(state).contiguous();
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

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CPU, m) {
  m.impl("codebook_statistics", &codebook_statistics_cpu);
  m.impl("codebook_ema_update_", &codebook_ema_update_cpu);
}

}  // namespace lgvq
