// Nearest-code search on CPU: argmin_k (a[k] + m * x.c_k) without an N x K matrix.
//
//   l2:     a[k] = |c_k|^2, m = -2, distance = max(|x|^2 + best, 0)
//   cosine: a[k] = 0,       m = -1, distance = 1 - x.c_best / max(|x|, 1e-12)  (unit codes)
//
// Two paths, both parallel over blocks of rows (at::parallel_for) and streaming the codebook:
//  * gemm tiles (D > kDirectMaxDim): per row block, codebook tiles of kTileCodes codes; the cross
//    term of a tile comes from a single-threaded BLAS GEMM into a per-thread scratch tile that
//    stays in L2, followed by a lane-parallel running argmin. Measured on the 2-core EPYC: tiles
//    of 256 rows x 1024 codes run the GEMM at ~67 GFLOP/s per core vs ~34 for 64 x 16384.
//  * direct (small D): the cross term is too thin for BLAS (the GEMM is bound by writing its
//    output); a register-blocked micro-kernel over a transposed codebook [D][K] computes
//    kRowGroup rows x kLanes codes per step and folds them into the running argmin at once.
//
// Ties go to the lowest index: codes are visited in ascending order, lanes compare strictly and
// the final lane merge prefers the lower index. Non-finite scores are never chosen (a score
// must be < the running best and > -inf; NaN fails both); a row whose scores are all non-finite keeps index 0 and reports the
// distance of code 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <cstring>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace lgvq {
namespace {

using namespace checks;    // input checks (csrc/checks.h)
using namespace cpu_simd;  // AVX2 feature checks and helpers

constexpr int64_t kLanes = 8;            // one AVX2 register of float32
constexpr int64_t kRowGroup = 4;         // rows per micro-kernel step (registers: 3 x 4 vectors)
constexpr int64_t kDirectMaxDim = 64;    // D at or below this uses the direct micro-kernel
constexpr int64_t kBlockRows = 256;      // rows per GEMM-path task
constexpr int64_t kTileCodes = 1024;     // codes per GEMM tile (256 x 1024 x 4 B = 1 MiB scratch)
constexpr int64_t kDirectBlockRows = 64; // rows per direct-path task
constexpr int64_t kFewRowsTileCodes = 256;  // few-rows path: 256 codes x D=256 x 4 B stay in L2

// Work is handed out block by block from a shared counter to at::get_num_threads() workers,
// instead of a static split into one range per thread: a worker the OS deschedules (other
// processes on the cores) takes fewer blocks rather than holding the whole call up. With the
// 2-core machine loaded (load average 8) the static split measured 0.69x addmm+argmin at
// 1024x1024x64 where one thread alone ran 1.6x. Which thread takes a block changes no result:
// every block writes only its own rows (tiles: their own slots).
template <typename Worker>
void dynamic_blocks(int64_t blocks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto next_block = [&]() -> int64_t {
    const int64_t block = next.fetch_add(1, std::memory_order_relaxed);
    return block < blocks ? block : -1;
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(blocks, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(next_block);
  });
}

#if LGVQ_HAVE_AVX2
#define LGVQ_ISA avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "nearest_code_kernels.h"

namespace avx2 {
// v replaces the lanes of (value, index) where it is finite and strictly lower: +inf fails the
// first test, NaN both, -inf the second.
inline void keep_lower(__m256 v, __m256i code, __m256 minus_inf, __m256& value,
                       __m256i& index) {
  const __m256 better = _mm256_and_ps(_mm256_cmp_ps(v, value, _CMP_LT_OQ),
                                      _mm256_cmp_ps(v, minus_inf, _CMP_GT_OQ));
  value = _mm256_blendv_ps(value, v, better);
  index = _mm256_blendv_epi8(index, code, _mm256_castps_si256(better));
}

// The finite lanes of an 8-lane (value, index) minimum merged into b (ties to the lower index).
inline void merge_lanes(__m256 value, __m256i index, Best<float>& b) {
  alignas(32) float lane_value[8];
  alignas(32) int32_t lane_index[8];
  _mm256_store_ps(lane_value, value);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_index), index);
  for (int l = 0; l < 8; ++l)
    if (lane_value[l] < std::numeric_limits<float>::infinity())
      b.merge(lane_value[l], lane_index[l]);
}

// float32 specialisation of the micro-kernel with intrinsics: GCC does not keep the generic
// version's accumulators in registers for a run-time D (measured 5 GFLOP/s at D=8). Each step
// takes 4 rows x 16 codes (two lane panels): 8 FMAs per 2 code loads and 4 broadcasts, so the
// FMA units rather than the load ports set the pace (4 x 8 was load-bound: 1024x1024x64 ran
// at ~1.3 FMA/cycle vs ~2 for the BLAS GEMM). k_padded is a multiple of 16.
template <>
inline void direct_row_group<float>(const float* rows_ptr, int64_t dim, const float* codes_t,
                                    const float* a_padded, float m, int64_t k_padded,
                                    Best<float>* best) {
  static_assert(kRowGroup == 4 && kLanes == 8, "the AVX2 micro-kernel is written for 4 x 8");
  __m256 best_value[8], acc[8];
  __m256i best_index[8];
  for (int r = 0; r < 8; ++r) {
    best_value[r] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    best_index[r] = _mm256_setzero_si256();
  }
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i step = _mm256_set1_epi32(2 * kLanes);
  __m256i code_index[2] = {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                           _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)};
  for (int64_t j = 0; j < k_padded; j += 2 * kLanes) {
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    const float* panel0 = codes_t + j * dim;
    const float* panel1 = panel0 + kLanes * dim;
    for (int64_t d = 0; d < dim; ++d) {
      const __m256 c0 = _mm256_loadu_ps(panel0 + d * kLanes);
      const __m256 c1 = _mm256_loadu_ps(panel1 + d * kLanes);
      for (int r = 0; r < 4; ++r) {
        const __m256 xv = _mm256_broadcast_ss(rows_ptr + r * dim + d);
        acc[2 * r] = _mm256_fmadd_ps(xv, c0, acc[2 * r]);
        acc[2 * r + 1] = _mm256_fmadd_ps(xv, c1, acc[2 * r + 1]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 av = _mm256_loadu_ps(a_padded + j + h * kLanes);
      for (int r = 0; r < 4; ++r) {
        const int slot = 2 * r + h;
        keep_lower(_mm256_fmadd_ps(mv, acc[slot], av), code_index[h], minus_inf,
                   best_value[slot], best_index[slot]);
      }
      code_index[h] = _mm256_add_epi32(code_index[h], step);
    }
  }
  for (int r = 0; r < 4; ++r) {
    Best<float> b;
    for (int h = 0; h < 2; ++h) merge_lanes(best_value[2 * r + h], best_index[2 * r + h], b);
    best[r] = b;
  }
}

// float32 running argmin over a GEMM tile's row: two 8-lane (value, index) minima side by side,
// so two compare/blend chains overlap (the generic loop measured ~4 ns a score per thread in
// the 16384x1024x256 quantizer step, a quarter of the search). Same rule as the generic:
// finite and strictly lower, ties to the lowest index in the final merge.
template <>
inline void scan_scores<float>(const float* dots, const float* a, float m, int64_t count,
                               int64_t first_code, Best<float>& best) {
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i step = _mm256_set1_epi32(2 * kLanes);
  __m256 best_value[2] = {inf, inf};
  __m256i best_index[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  __m256i code_index[2] = {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                           _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)};
  const int64_t full = count - count % (2 * kLanes);
  for (int64_t j = 0; j < full; j += 2 * kLanes) {
    for (int h = 0; h < 2; ++h) {
      const int64_t at = j + h * kLanes;
      keep_lower(_mm256_fmadd_ps(mv, _mm256_loadu_ps(dots + at), _mm256_loadu_ps(a + at)),
                 code_index[h], minus_inf, best_value[h], best_index[h]);
      code_index[h] = _mm256_add_epi32(code_index[h], step);
    }
  }
  Best<float> tile;
  for (int h = 0; h < 2; ++h) merge_lanes(best_value[h], best_index[h], tile);
  // the tail: the generic expression a + m * dot, contracted to one FMA like the vector lanes
  finish_tile(tile, full, count, first_code,
              [&](int64_t j) { return std::fma(m, dots[j], a[j]); }, best);
}
}  // namespace avx2

#pragma GCC pop_options
#undef LGVQ_ISA
#endif  // LGVQ_HAVE_AVX2

#define LGVQ_ISA baseline
#include "nearest_code_kernels.h"
#undef LGVQ_ISA

// ---------------------------------------------------------------------------------------------
// Exact duplicates: ties to the lowest index
// ---------------------------------------------------------------------------------------------
// BLAS may round one dot product differently in different output columns (edge micro-kernels),
// so exact duplicate codes need not score equal. Each chosen index is moved to the lowest code
// holding identical bytes. A per-code key (the wrap-around sum of the row's bit patterns; equal
// rows have equal keys) screens the codebook in O(K) after the keys are known; only codes whose
// key is also a chosen code's key are compared byte for byte. This replaced a hash map over all
// K rows' bytes: 16 MB hashed per call at 1x16384x256, ~10 ms against a 2 ms search.
template <typename T>
void code_keys(const T* codes, int64_t k, int64_t dim, uint64_t* keys) {
  at::parallel_for(0, k, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) keys[c] = baseline::row_key(codes + c * dim, dim);
  });
}

template <typename T>
void remap_to_lowest_duplicate(const T* codes, const uint64_t* keys, int64_t k, int64_t dim,
                               int64_t* indices, int64_t n) {
  std::unordered_set<uint64_t> chosen_keys;
  for (int64_t i = 0; i < n; ++i) chosen_keys.insert(keys[indices[i]]);
  // codes sharing a key with a chosen code, ascending: usually just the chosen codes
  std::unordered_map<uint64_t, std::vector<int64_t>> sharing;
  bool any = false;
  for (int64_t c = 0; c < k; ++c) {
    if (chosen_keys.count(keys[c])) {
      auto& list = sharing[keys[c]];
      list.push_back(c);
      any |= list.size() > 1;
    }
  }
  if (!any) return;
  std::unordered_map<int64_t, int64_t> lowest;  // chosen index -> its lowest duplicate
  for (int64_t i = 0; i < n; ++i) {
    const int64_t chosen = indices[i];
    auto found = lowest.find(chosen);
    if (found == lowest.end()) {
      int64_t first = chosen;
      for (const int64_t c : sharing[keys[chosen]]) {
        if (c >= chosen) break;
        if (std::memcmp(codes + c * dim, codes + chosen * dim, sizeof(T) * dim) == 0) {
          first = c;
          break;
        }
      }
      found = lowest.emplace(chosen, first).first;
    }
    indices[i] = found->second;
  }
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                    const std::optional<at::Tensor>& codebook_sqnorm,
                                                    bool cosine) {
  check_nearest_code_inputs("nearest_code", x, codebook, codebook_sqnorm, cosine);
  const auto dtype = x.scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = x.size(0), k = codebook.size(0), dim = x.size(1);

  // Low precision is widened once here: O(N*D + K*D), never N*K.
  const at::Tensor xc = x.to(compute).contiguous();
  const at::Tensor cc = codebook.to(compute).contiguous();
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, x.options().dtype(compute));
  if (n == 0) return {indices, distances};
  const bool few_rows = n <= kBlockRows && dim > kDirectMaxDim;
  std::vector<uint64_t> keys(k);

  AT_DISPATCH_FLOATING_TYPES(compute, "lgvq_nearest_code_cpu", [&] {
    const scalar_t m = cosine ? scalar_t(-1) : scalar_t(-2);
    int64_t* index_ptr = indices.data_ptr<int64_t>();
    scalar_t* distance_ptr = distances.data_ptr<scalar_t>();
    const scalar_t* codes_ptr = cc.data_ptr<scalar_t>();
    at::Tensor given;
    if (has_value(codebook_sqnorm) && !cosine) given = codebook_sqnorm->to(compute).contiguous();
    if (few_rows) {
      std::vector<scalar_t> a(k);
      const auto search = LGVQ_PICK_ISA(true, cpu_has_avx2_fma,
                                        &avx2::nearest_code_few_rows<scalar_t>,
                                        &baseline::nearest_code_few_rows<scalar_t>);
      search(xc, cc, given.defined() ? given.data_ptr<scalar_t>() : nullptr, m, cosine,
             keys.data(), a.data(), index_ptr, distance_ptr);
    } else {
      at::Tensor a = cosine ? at::zeros({k}, cc.options()) : given.defined() ? given : (cc * cc).sum(1);
      code_keys(codes_ptr, k, dim, keys.data());
      // The AVX2 build of the kernel bodies serves float64 too (the compiler vectorises it).
      const auto search =
          dim <= kDirectMaxDim
              ? LGVQ_PICK_ISA(true, cpu_has_avx2_fma, &avx2::nearest_code_direct<scalar_t>,
                              &baseline::nearest_code_direct<scalar_t>)
              : LGVQ_PICK_ISA(true, cpu_has_avx2_fma, &avx2::nearest_code_gemm<scalar_t>,
                              &baseline::nearest_code_gemm<scalar_t>);
      search(xc, cc, a.data_ptr<scalar_t>(), m, cosine, index_ptr, distance_ptr);
    }
    remap_to_lowest_duplicate(codes_ptr, keys.data(), k, dim, index_ptr, n);
  });
  return {indices, distances};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CPU, m) { m.impl("nearest_code", &nearest_code_cpu); }

}  // namespace lgvq
