// Nearest-code search on CPU: argmin_k (a[k] + m * x.c_k) without an N x K matrix.
//
//   l2:     a[k] = |c_k|^2, m = -2, distance = max(|x|^2 + best, 0)
//   cosine: a[k] = 0,       m = -1, over unit codes u_k = c_k / max(|c_k|, 1e-12),
//           distance = 1 - x.u_best / max(|x|, 1e-12)
//
// Cosine takes x rows and codes of any norm and makes no normalised copy of either: the unit
// codes are made where the kernel reads the codes anyway (a GEMM tile just before its GEMM,
// the direct path's panels), from per-code inverse norms (K values); with fewer rows than D
// the few-rows path scales each tile's scores x.c by 1/|c| instead.
//
// Three paths, the first two parallel over blocks of rows (at::parallel_for) and streaming the
// codebook:
//  * gemm tiles (D > kDirectMaxDim): per row block, codebook tiles of kTileCodes codes; the cross
//    term of a tile comes from a single-threaded BLAS GEMM into a per-thread scratch tile that
//    stays in L2, followed by a lane-parallel running argmin. Measured on the 2-core EPYC: tiles
//    of 256 rows x 1024 codes run the GEMM at ~67 GFLOP/s per core vs ~34 for 64 x 16384.
//  * direct (D <= 64; with AVX2 alone, float32 and N > 256 rows also D <= 1024 while the code
//    panels take <= 32 MiB): for small D the cross term is too thin for BLAS (the GEMM is bound
//    by writing its output); a register-blocked micro-kernel over lane panels of the codebook
//    computes a group of rows x 16 codes per step and folds them into the running argmin.
//  * few rows (N <= 256, D > 64): parallel over code tiles instead of row blocks; with one to
//    four rows (kOwnDotMaxRows) a tile's products come from our own loop, one pass per code
//    with its norm and key (few_rows_tile), instead of a BLAS call per tile.
//
// Instruction sets: AVX2+FMA kernels, and for float32 on CPUs with AVX-512 (where MKL's GEMM
// runs at 16 lanes) an AVX-512 micro-kernel and tile scan; the baseline ISA elsewhere.
// Measured on a 2-core Xeon with AVX-512, one thread, 2048x2048x32: the former AVX2 kernel
// (4 rows x 16 codes) 4.0 ms, AVX-512 kernel 2.3-2.6 ms, MKL's bare GEMM (into a reused
// output) 1.7-1.8 ms.
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
constexpr int64_t kAvx2DirectMaxDim = 1024;  // float32 with AVX2 only: the direct kernel up to
constexpr int64_t kAvx2DirectMaxPanelBytes = int64_t(32) << 20;  // this D and this panel size
constexpr int64_t kBlockRows = 256;      // rows per GEMM-path task
constexpr int64_t kTileCodes = 1024;     // codes per GEMM tile (256 x 1024 x 4 B = 1 MiB scratch)
constexpr int64_t kDirectBlockRows = 64; // rows per direct-path task
constexpr int64_t kFewRowsTileCodes = 256;  // few-rows path: 256 codes x D=256 x 4 B stay in L2
constexpr int64_t kPrefetchCodes = 8;  // few-rows tiles: prefetch distance (2-16 measured alike)
constexpr int64_t kOwnDotMaxRows = 4;  // few-rows path: up to this many rows, no BLAS call
constexpr size_t kLinearKeyScan = 16;  // up to this many distinct chosen keys: a linear scan

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

// |row|^2 for float32 in 4 x 8 partial sums of FMAs, added up in a fixed order: one 8-lane
// chain waited on the FMA latency (4 cycles per 8 values; ~0.4 ms of the 1x16384x256 search on
// 2 threads). The AVX-512 build calls this one (its one-pass tile sums its own loads in this
// order), so both give the same |c|^2. In three steps,
// shared by squared_norm, squared_norms and the one-pass few-rows tile (few_rows_tile_rows):
//  * squared_norm_parts: four 8-lane FMA chains over steps of 32 values, then steps of 8 into
//    the first, stored to part[0..31]; returns the FMA sum of the last dim % 8 values. `each`
//    sees every loaded 8-value vector with its offset and chain (the tile's products and key);
//  * ordered_norm_sum: tail + part[0] + ... + part[31], in that order;
//  * ordered_norm_sums: that sum for a group of up to eight rows, a full group in the lanes of
//    one register (lane i adds what row i's scalar sum adds, in the same order: the same value
//    bit for bit). One row at a time, its 32 dependent adds took ~45% of the few-rows path's
//    samples (perf, 1x16384x256, one thread, 2-core Xeon).
struct NoVectorUse {
  void operator()(__m256, int64_t, int) const {}
};

template <typename Each = NoVectorUse>
inline float squared_norm_parts(const float* row, int64_t dim, float* part, Each&& each = {}) {
  __m256 lane[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                    _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 4 * kLanes <= dim; d += 4 * kLanes)
    for (int h = 0; h < 4; ++h) {
      const __m256 v = _mm256_loadu_ps(row + d + h * kLanes);
      lane[h] = _mm256_fmadd_ps(v, v, lane[h]);
      each(v, d + h * kLanes, h);
    }
  for (; d + kLanes <= dim; d += kLanes) {
    const __m256 v = _mm256_loadu_ps(row + d);
    lane[0] = _mm256_fmadd_ps(v, v, lane[0]);
    each(v, d, 0);
  }
  float sum = 0;
  for (; d < dim; ++d) sum = std::fma(row[d], row[d], sum);
  for (int h = 0; h < 4; ++h) _mm256_storeu_ps(part + h * kLanes, lane[h]);
  return sum;
}

inline float ordered_norm_sum(float tail, const float* part) {
  for (int64_t j = 0; j < 4 * kLanes; ++j) tail += part[j];
  return tail;
}

inline void ordered_norm_sums(const float (*part)[4 * kLanes], const float* tail, int64_t group,
                              float* out) {
  if (group < kLanes) {
    for (int64_t i = 0; i < group; ++i) out[i] = ordered_norm_sum(tail[i], part[i]);
    return;
  }
  // part[i][j] into lane i, j = 0..31 in order: four 8 x 8 transposes (shuffles; the 32
  // gathers they replace took ~15% of the one-pass tile's samples on the Xeon)
  __m256 sum = _mm256_loadu_ps(tail);
  for (int h = 0; h < 4; ++h) {
    __m256 r[kLanes], t[kLanes];
    for (int i = 0; i < kLanes; ++i) r[i] = _mm256_loadu_ps(&part[i][h * kLanes]);
    for (int i = 0; i < kLanes; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // r_i[0] r_i+1[0] r_i[1] r_i+1[1] | [4], [5]
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // [2], [3] | [6], [7]
    }
    for (int i = 0; i < kLanes; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // column 0 (| 4) of rows i..i+3
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // column 1 (| 5)
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);  // column 2 (| 6)
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);  // column 3 (| 7)
    }
    for (int l = 0; l < 4; ++l) {
      t[l] = _mm256_permute2f128_ps(r[l], r[l + 4], 0x20);      // column l of rows 0..7
      t[l + 4] = _mm256_permute2f128_ps(r[l], r[l + 4], 0x31);  // column l + 4
    }
    for (int l = 0; l < kLanes; ++l) sum = _mm256_add_ps(sum, t[l]);
  }
  _mm256_storeu_ps(out, sum);
}

template <>
inline float squared_norm<float>(const float* row, int64_t dim) {
  float part[4 * kLanes];
  const float tail = squared_norm_parts(row, dim, part);
  return ordered_norm_sum(tail, part);
}

template <>
inline void squared_norms<float>(const float* rows, int64_t count, int64_t dim, float* out) {
  float part[kLanes][4 * kLanes];  // part[i]: row i's 32 partial sums, in order
  float tail[kLanes];
  for (int64_t c = 0; c < count; c += kLanes) {
    const int64_t group = std::min<int64_t>(kLanes, count - c);
    for (int64_t i = 0; i < group; ++i) tail[i] = squared_norm_parts(rows + (c + i) * dim, dim, part[i]);
    ordered_norm_sums(part, tail, group, out + c);
  }
}

// code_pass's last steps, shared with the AVX-512 build: x_r.c from its eight lanes (the FMA
// sum of the last dim % 8 products, then the lanes in order) and the key from its eight lanes
// (the last dim % 8 values' bit patterns, then lane l weighted by 2l + 1).
inline float code_pass_dot(const float* xr, const float* row, int64_t dim, const float* lanes) {
  float total = 0;
  for (int64_t e = dim - dim % kLanes; e < dim; ++e) total = std::fma(xr[e], row[e], total);
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

inline uint64_t code_pass_key(const float* row, int64_t dim, const uint32_t* key_lanes) {
  uint64_t key = 0;
  for (int64_t e = dim - dim % kLanes; e < dim; ++e) {
    uint32_t bits;
    std::memcpy(&bits, row + e, sizeof(bits));
    key += bits;
  }
  for (int64_t l = 0; l < kLanes; ++l) key += uint64_t(key_lanes[l]) * uint64_t(2 * l + 1);
  return key;
}

// One code of the few-rows tile (float32, R rows, AVX2): the code is read once
// (squared_norm_parts), and every vector loaded feeds the |c|^2 chains, two FMA chains per row
// of x for x_r.c and the duplicate key. Writes the code's 32 |c|^2 partials to part and
// returns their tail sum; key_out, the codes' 32-bit patterns summed in eight wrapping lanes,
// the lanes then weighted by 1, 3, ..., 15 (equal codes have equal keys; it differs from
// row_key, but a call compares only keys that one path made); dots[r * stride] = x_r.c: the
// two chains added lane by lane, then the FMA sum of the last dim % 8 products plus the eight
// lanes in order. The AVX-512 build has its own (avx512::code_pass), bit for bit this one.
template <int R>
inline float code_pass(const float* x, const float* row, int64_t dim, float* part,
                       uint64_t& key_out, float* dots, int64_t stride) {
  alignas(32) float lanes[kLanes];
  alignas(32) uint32_t key_lanes[kLanes];
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  __m256i key = _mm256_setzero_si256();
  const float tail = squared_norm_parts(row, dim, part, [&](__m256 v, int64_t at, int chain) {
    key = _mm256_add_epi32(key, _mm256_castps_si256(v));
    for (int r = 0; r < R; ++r)
      acc[r][chain & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * dim + at), v,
                                          acc[r][chain & 1]);
  });
  _mm256_store_si256(reinterpret_cast<__m256i*>(key_lanes), key);
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(lanes, _mm256_add_ps(acc[r][0], acc[r][1]));
    dots[r * stride] = code_pass_dot(x + r * dim, row, dim, lanes);
  }
  key_out = code_pass_key(row, dim, key_lanes);
  return tail;
}

#include "few_rows_tile.h"  // few_rows_tile<float> over code_pass<R>

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

// The direct path for float32 with AVX2 (D <= kDirectMaxDim): a register-blocked micro-kernel
// over lane panels of the codebook, kAvx2Rows = 6 rows x 16 codes (two 8-code panels) a step:
// 12 accumulators (three times the FMA latency x ports, so no chain waits) for 2 code loads and
// 6 broadcasts per d, the 15 registers of the BLIS Haswell kernel. The running minima live in
// memory (Avx2GroupState, L1), and a step's scores are folded lazily: one FMA and one compare
// per accumulator, OR-ed together; only when some lane improved does the step blend and store
// (after the first few chunks of codes that is a small share of steps). The former kernel (4 rows
// x 16 codes, minima in registers: 8 accumulators + 16 minima do not fit 16 registers, and it
// blended every step) ran 2048x2048x32 at 4.0 ms on the 2-core EPYC against MKL's bare GEMM at
// 3.0 ms. Each lane sums over d in ascending order with FMAs from zero, then a + m * dot: the
// scores the AVX-512 kernel computes, bit for bit.
constexpr int64_t kAvx2Rows = 6;                      // rows per step
constexpr int64_t kAvx2BlockRows = 10 * kAvx2Rows;    // rows per task: 10 row groups

using Avx2GroupState = GroupMinima<kAvx2Rows>;

// Codes [j0, j1) (multiples of 16) folded into s for one group of kAvx2Rows rows. A lane takes
// a score strictly below its minimum (NaN never; +inf never beats the +inf start); kFinite: and
// above -inf. Without kFinite a lane may take -inf and keep it, so the caller looks for -inf in
// the final minima and redoes the group with kFinite (an -inf score needs an infinite input).
template <bool kFinite>
inline void group_chunk(const float* packed_rows, int64_t dim, const float* codes_t,
                        const float* a_padded, float m, int64_t j0, int64_t j1,
                        Avx2GroupState& s) {
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const auto lower = [&](__m256 v, __m256 old) {  // the lanes where v replaces old
    const __m256 below = _mm256_cmp_ps(v, old, _CMP_LT_OQ);
    if constexpr (kFinite) return _mm256_and_ps(below, _mm256_cmp_ps(v, minus_inf, _CMP_GT_OQ));
    return below;
  };
  for (int64_t j = j0; j < j1; j += 2 * kLanes) {
    __m256 acc[kAvx2Rows * 2];
    for (int r = 0; r < kAvx2Rows * 2; ++r) acc[r] = _mm256_setzero_ps();
    const float* panel0 = codes_t + j * dim;
    const float* panel1 = panel0 + kLanes * dim;
    const float* xd = packed_rows;
    for (int64_t d = 0; d < dim; ++d, xd += kAvx2Rows) {
      const __m256 c0 = _mm256_loadu_ps(panel0 + d * kLanes);
      const __m256 c1 = _mm256_loadu_ps(panel1 + d * kLanes);
      for (int r = 0; r < kAvx2Rows; ++r) {
        const __m256 xv = _mm256_broadcast_ss(xd + r);
        acc[2 * r] = _mm256_fmadd_ps(xv, c0, acc[2 * r]);
        acc[2 * r + 1] = _mm256_fmadd_ps(xv, c1, acc[2 * r + 1]);
      }
    }
    const __m256 a0 = _mm256_loadu_ps(a_padded + j), a1 = _mm256_loadu_ps(a_padded + j + kLanes);
    __m256 any = _mm256_setzero_ps();
    for (int slot = 0; slot < kAvx2Rows * 2; ++slot) {
      acc[slot] = _mm256_fmadd_ps(mv, acc[slot], slot % 2 == 0 ? a0 : a1);
      any = _mm256_or_ps(any, lower(acc[slot], _mm256_loadu_ps(s.value[slot])));
    }
    if (_mm256_testz_ps(any, any)) continue;  // no lane improved: the common case
    for (int slot = 0; slot < kAvx2Rows * 2; ++slot) {  // the masks again, rather than 12 kept
      const __m256 old = _mm256_loadu_ps(s.value[slot]);
      const __m256 take = lower(acc[slot], old);
      const __m256i code = _mm256_add_epi32(
          iota, _mm256_set1_epi32(static_cast<int32_t>(j + (slot % 2) * kLanes)));
      auto* index = reinterpret_cast<__m256i*>(s.index[slot]);
      _mm256_storeu_ps(s.value[slot], _mm256_blendv_ps(old, acc[slot], take));
      _mm256_storeu_si256(index, _mm256_blendv_epi8(_mm256_loadu_si256(index), code,
                                                    _mm256_castps_si256(take)));
    }
  }
}

template <>
void nearest_code_direct<float>(const at::Tensor& x, const at::Tensor& codes, const float* a,
                                float m, const float* inv, int64_t* indices, float* distances) {
  static_assert(kPanel == kLanes, "the AVX2 micro-kernel reads 8-code panels");
  const int64_t n = x.size(0), dim = x.size(1);
  const float* codes_ptr = codes.data_ptr<float>();
  const LanePanels<float> panels(codes_ptr, codes.size(0), dim, a, inv);
  const int64_t chunk = chunk_codes(dim);
  constexpr int64_t kGroups = kAvx2BlockRows / kAvx2Rows;
  const float* x_ptr = x.data_ptr<float>();
  // rows per task: at most kAvx2BlockRows, fewer when that leaves under 4 tasks per thread
  // (300 rows in blocks of 60 are 5 tasks, 3 on one thread and 2 on the other)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block_rows = std::clamp<int64_t>(
      ((n + 4 * threads - 1) / (4 * threads) + kAvx2Rows - 1) / kAvx2Rows * kAvx2Rows, kAvx2Rows,
      kAvx2BlockRows);
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  dynamic_blocks(blocks, [&](const auto& next_block) {
    std::vector<float> packed(kAvx2BlockRows * dim);
    std::vector<Avx2GroupState> state(kGroups);
    for (int64_t block; (block = next_block()) >= 0;) {
      const int64_t row_begin = block * block_rows;
      const int64_t row_end = std::min(n, row_begin + block_rows);
      const int64_t groups = (row_end - row_begin + kAvx2Rows - 1) / kAvx2Rows;
      // each group's rows interleaved, [dim][kAvx2Rows], so a step's 6 broadcasts read one
      // run of 24 bytes through one pointer; a short last group repeats its first row
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t row0 = row_begin + g * kAvx2Rows;
        const int64_t rows = std::min(kAvx2Rows, row_end - row0);
        float* out = packed.data() + g * kAvx2Rows * dim;
        for (int64_t r = 0; r < kAvx2Rows; ++r) {
          const float* row = x_ptr + (row0 + (r < rows ? r : 0)) * dim;
          for (int64_t d = 0; d < dim; ++d) out[d * kAvx2Rows + r] = row[d];
        }
      }
      sweep_groups(groups, panels.k_padded, chunk, state.data(),
                   [&](auto finite, int64_t g, int64_t j0, int64_t j1) {
                     group_chunk<decltype(finite)::value>(
                         packed.data() + g * kAvx2Rows * dim, dim, panels.codes_t.data(),
                         panels.a_padded.data(), m, j0, j1, state[g]);
                   });
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t row0 = row_begin + g * kAvx2Rows;
        const int64_t rows = std::min(kAvx2Rows, row_end - row0);
        for (int64_t r = 0; r < rows; ++r) {
          Best<float> best;
          for (int h = 0; h < 2; ++h)
            merge_lanes(_mm256_loadu_ps(state[g].value[2 * r + h]),
                        _mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(state[g].index[2 * r + h])),
                        best);
          const int64_t row = row0 + r;
          finish_row<float>(x_ptr + row * dim, codes_ptr, a, m, dim, inv, best, indices + row,
                            distances + row);
        }
      }
    }
  });
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

#if LGVQ_HAVE_AVX2
// AVX-512 versions of the float32 micro-kernel and tile scan: 16 lanes, and 32 vector registers,
// which hold a step's 4 rows x 32 codes of accumulators and both panels' running minima with
// no spill (the AVX2 kernel's 8 accumulators + 16 minima do not fit its 16 registers). On CPUs
// with AVX-512 MKL's GEMM runs at that width, so the AVX2 search would compete at half of it.
#define LGVQ_ISA avx512
#define LGVQ_PANEL 16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#include "nearest_code_kernels.h"

namespace avx512 {
constexpr int64_t kWide = 16;  // float32 lanes of one register

// |row|^2 for float32: the AVX2 build's code (an AVX2 function inlines into an AVX-512 one),
// so both builds give the same |c|^2 and the same unit codes.
template <>
inline float squared_norm<float>(const float* row, int64_t dim) {
  return avx2::squared_norm<float>(row, dim);
}

template <>
inline void squared_norms<float>(const float* rows, int64_t count, int64_t dim, float* out) {
  avx2::squared_norms<float>(rows, count, dim, out);
}

// avx2::code_pass at 16 lanes, bit for bit: a 32-value step's two loads hold the four 8-lane
// |c|^2 chains as (0 | 1) and (2 | 3), the same FMAs per lane; one 16-lane accumulator per row
// of x holds the two product chains (0 and 2 into its low half, 1 and 3 into its high half, in
// that order, as avx2's acc[0] and acc[1]); the 8-value steps go to the low halves (masked).
// Half the loads and FMAs of the AVX2 pass.
template <int R>
inline float code_pass(const float* x, const float* row, int64_t dim, float* part,
                       uint64_t& key_out, float* dots, int64_t stride) {
  alignas(32) float lanes[kLanes];
  alignas(32) uint32_t key_lanes[kLanes];
  __m512 norm01 = _mm512_setzero_ps(), norm23 = _mm512_setzero_ps();
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  __m512i key = _mm512_setzero_si512();
  int64_t d = 0;
  for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
    const __m512 v01 = _mm512_loadu_ps(row + d), v23 = _mm512_loadu_ps(row + d + kWide);
    norm01 = _mm512_fmadd_ps(v01, v01, norm01);
    norm23 = _mm512_fmadd_ps(v23, v23, norm23);
    key = _mm512_add_epi32(key, _mm512_add_epi32(_mm512_castps_si512(v01),
                                                 _mm512_castps_si512(v23)));
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * dim + d), v01, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * dim + d + kWide), v23, acc[r]);
    }
  }
  constexpr __mmask16 kLow = 0x00FF;
  for (; d + kLanes <= dim; d += kLanes) {
    const __m512 v = _mm512_maskz_loadu_ps(kLow, row + d);
    norm01 = _mm512_mask3_fmadd_ps(v, v, norm01, kLow);
    key = _mm512_add_epi32(key, _mm512_castps_si512(v));  // zeros in the high half
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(kLow, x + r * dim + d), v, acc[r],
                                     kLow);
  }
  float tail = 0;
  for (; d < dim; ++d) tail = std::fma(row[d], row[d], tail);
  _mm512_storeu_ps(part, norm01);
  _mm512_storeu_ps(part + kWide, norm23);
  const __m256i key8 = _mm256_add_epi32(_mm512_castsi512_si256(key),
                                        _mm512_extracti64x4_epi64(key, 1));
  _mm256_store_si256(reinterpret_cast<__m256i*>(key_lanes), key8);
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(lanes, _mm256_add_ps(_mm512_castps512_ps256(acc[r]),
                                         _mm512_extractf32x8_ps(acc[r], 1)));
    dots[r * stride] = avx2::code_pass_dot(x + r * dim, row, dim, lanes);
  }
  key_out = avx2::code_pass_key(row, dim, key_lanes);
  return tail;
}

using avx2::ordered_norm_sums;
#include "few_rows_tile.h"  // few_rows_tile<float> over this code_pass<R>

// v replaces the lanes of (value, index) where it is strictly lower (NaN never is; +inf never
// beats the +inf start). kFinite: and greater than -inf. Without it a lane may take -inf; it
// then keeps it for good, so a -inf among the final lanes tells the caller to redo the rows
// with kFinite (an -inf score needs an infinite input: rare, and never chosen by the contract).
template <bool kFinite>
inline void keep_lower(__m512 v, __m512i code, __m512& value, __m512i& index) {
  __mmask16 better = _mm512_cmp_ps_mask(v, value, _CMP_LT_OQ);
  if constexpr (kFinite) {
    better = _mm512_mask_cmp_ps_mask(
        better, v, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_GT_OQ);
  }
  value = _mm512_mask_mov_ps(value, better, v);
  index = _mm512_mask_mov_epi32(index, better, code);
}

inline bool any_minus_inf(const __m512* value, int count) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 seen = 0;
  for (int i = 0; i < count; ++i) seen |= _mm512_cmp_ps_mask(value[i], minus_inf, _CMP_EQ_OQ);
  return seen != 0;
}

// The finite lanes of a 16-lane (value, index) minimum merged into b (ties to the lower index).
inline void merge_lanes(__m512 value, __m512i index, Best<float>& b) {
  alignas(64) float lane_value[kWide];
  alignas(64) int32_t lane_index[kWide];
  _mm512_store_ps(lane_value, value);
  _mm512_store_si512(lane_index, index);
  for (int l = 0; l < kWide; ++l)
    if (lane_value[l] < std::numeric_limits<float>::infinity())
      b.merge(lane_value[l], lane_index[l]);
}

constexpr int64_t kWideRows = 8;  // rows per step of the AVX-512 micro-kernel

using GroupState = GroupMinima<kWideRows>;  // kWideRows rows x two 16-code panels

// Codes [j0, j1) of the panels (multiples of 32) folded into s: 8 rows x 32 codes a step (two
// 16-code panels), 16 accumulators (twice the FMA latency x ports, so the chains never wait)
// for 2 code loads and 8 broadcasts per d. The running minima stay in memory and are updated
// by masked stores: per row and panel one load, one FMA, one compare and two stores, against
// 2 x dim FMAs of the step. A register-resident 4 x 32 version (8 accumulators and 16 minima
// in registers) ran 2048x2048x32 at ~64% of the FMA peak. Each lane sums over d in the AVX2
// kernel's order with the same FMAs: the same scores, the same choice
// (tests/kernels/test_nearest_code.py). kFinite: see keep_lower.
template <bool kFinite>
inline void group_chunk(const float* rows_ptr, int64_t dim, const float* codes_t,
                        const float* a_padded, float m, int64_t j0, int64_t j1, GroupState& s) {
  static_assert(kPanel == kWide, "the AVX-512 micro-kernel reads 16-code panels");
  const __m512 mv = _mm512_set1_ps(m);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = j0; j < j1; j += 2 * kWide) {
    __m512 acc[kWideRows * 2];
    for (int r = 0; r < kWideRows * 2; ++r) acc[r] = _mm512_setzero_ps();
    const float* panel0 = codes_t + j * dim;
    const float* panel1 = panel0 + kWide * dim;
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 c0 = _mm512_loadu_ps(panel0 + d * kWide);
      const __m512 c1 = _mm512_loadu_ps(panel1 + d * kWide);
      for (int r = 0; r < kWideRows; ++r) {
        const __m512 xv = _mm512_set1_ps(rows_ptr[r * dim + d]);
        acc[2 * r] = _mm512_fmadd_ps(xv, c0, acc[2 * r]);
        acc[2 * r + 1] = _mm512_fmadd_ps(xv, c1, acc[2 * r + 1]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m512 av = _mm512_loadu_ps(a_padded + j + h * kWide);
      const __m512i code = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(
                                                      j + h * kWide)));
      for (int r = 0; r < kWideRows; ++r) {
        const int slot = 2 * r + h;
        const __m512 v = _mm512_fmadd_ps(mv, acc[slot], av);
        __mmask16 better = _mm512_cmp_ps_mask(v, _mm512_loadu_ps(s.value[slot]), _CMP_LT_OQ);
        if constexpr (kFinite) better = _mm512_mask_cmp_ps_mask(better, v, minus_inf, _CMP_GT_OQ);
        _mm512_mask_storeu_ps(s.value[slot], better, v);
        _mm512_mask_storeu_epi32(s.index[slot], better, code);
      }
    }
  }
}

inline void finish_group(const GroupState& s, int64_t rows, Best<float>* best) {
  for (int64_t r = 0; r < rows; ++r) {
    Best<float> b;
    for (int h = 0; h < 2; ++h)
      merge_lanes(_mm512_loadu_ps(s.value[2 * r + h]), _mm512_loadu_si512(s.index[2 * r + h]),
                  b);
    best[r] = b;
  }
}

// The direct path for float32 at 16 lanes: per block of kDirectBlockRows rows, the codebook in
// chunks of kChunkBytes; each chunk serves every row group of the block before the next is
// read, the groups' running minima kept in GroupState. A group whose lanes took -inf
// (keep_lower's rule without kFinite) is searched again over all codes with kFinite.
template <>
void nearest_code_direct<float>(const at::Tensor& x, const at::Tensor& codes, const float* a,
                                float m, const float* inv, int64_t* indices, float* distances) {
  static_assert(kPanel == kWide, "the AVX-512 micro-kernel reads 16-code panels");
  const int64_t n = x.size(0), dim = x.size(1);
  const float* codes_ptr = codes.data_ptr<float>();
  const LanePanels<float> panels(codes_ptr, codes.size(0), dim, a, inv);
  const int64_t chunk = chunk_codes(dim);
  static_assert(kDirectBlockRows % kWideRows == 0, "whole row groups per block");
  constexpr int64_t kGroups = kDirectBlockRows / kWideRows;
  const float* x_ptr = x.data_ptr<float>();
  const int64_t blocks = (n + kDirectBlockRows - 1) / kDirectBlockRows;
  dynamic_blocks(blocks, [&](const auto& next_block) {
    std::vector<float> padded_rows(kWideRows * dim, 0.0f);
    std::vector<GroupState> state(kGroups);
    Best<float> best[kWideRows];
    for (int64_t block; (block = next_block()) >= 0;) {
      const int64_t row_begin = block * kDirectBlockRows;
      const int64_t row_end = std::min(n, row_begin + kDirectBlockRows);
      const int64_t groups = (row_end - row_begin + kWideRows - 1) / kWideRows;
      const auto group_rows = [&](int64_t g) -> const float* {
        const int64_t row0 = row_begin + g * kWideRows;
        const int64_t rows = std::min(kWideRows, row_end - row0);
        if (rows == kWideRows) return x_ptr + row0 * dim;
        for (int64_t r = 0; r < kWideRows; ++r)  // pad the last group with its first row
          std::copy_n(x_ptr + (row0 + std::min(r, rows - 1)) * dim, dim,
                      padded_rows.data() + r * dim);
        return padded_rows.data();
      };
      sweep_groups(groups, panels.k_padded, chunk, state.data(),
                   [&](auto finite, int64_t g, int64_t j0, int64_t j1) {
                     group_chunk<decltype(finite)::value>(group_rows(g), dim,
                                                          panels.codes_t.data(),
                                                          panels.a_padded.data(), m, j0, j1,
                                                          state[g]);
                   });
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t row0 = row_begin + g * kWideRows;
        const int64_t rows = std::min(kWideRows, row_end - row0);
        finish_group(state[g], rows, best);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = row0 + r;
          finish_row<float>(x_ptr + row * dim, codes_ptr, a, m, dim, inv, best[r],
                            indices + row, distances + row);
        }
      }
    }
  });
}

// The GEMM tile's running argmin at 16 lanes, two chains side by side; -inf as in row_group.
template <bool kFinite>
inline bool scan_lanes(const float* dots, const float* a, float m, int64_t full,
                       Best<float>& tile) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 best_value[2] = {_mm512_set1_ps(std::numeric_limits<float>::infinity()),
                          _mm512_set1_ps(std::numeric_limits<float>::infinity())};
  __m512i best_index[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < full; j += 2 * kWide) {
    for (int h = 0; h < 2; ++h) {
      const int64_t at = j + h * kWide;
      keep_lower<kFinite>(
          _mm512_fmadd_ps(mv, _mm512_loadu_ps(dots + at), _mm512_loadu_ps(a + at)),
          _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(at))), best_value[h],
          best_index[h]);
    }
  }
  if (!kFinite && any_minus_inf(best_value, 2)) return false;
  for (int h = 0; h < 2; ++h) merge_lanes(best_value[h], best_index[h], tile);
  return true;
}

template <>
inline void scan_scores<float>(const float* dots, const float* a, float m, int64_t count,
                               int64_t first_code, Best<float>& best) {
  const int64_t full = count - count % (2 * kWide);
  Best<float> tile;
  if (!scan_lanes<false>(dots, a, m, full, tile)) scan_lanes<true>(dots, a, m, full, tile);
  // the tail: the generic expression a + m * dot, contracted to one FMA like the vector lanes
  finish_tile(tile, full, count, first_code,
              [&](int64_t j) { return std::fma(m, dots[j], a[j]); }, best);
}
}  // namespace avx512

#pragma GCC pop_options
#undef LGVQ_PANEL
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
  // a few distinct keys are matched by a scan of a small array (1 x 16384 codes: ~4 us against
  // ~50 us of hash look-ups)
  std::vector<uint64_t> few;  // empty: the hash look-up
  if (chosen_keys.size() <= kLinearKeyScan) few.assign(chosen_keys.begin(), chosen_keys.end());
  const auto is_chosen_key = [&](uint64_t key) {
    if (few.empty()) return chosen_keys.count(key) > 0;
    bool found = false;
    for (const uint64_t chosen : few) found |= chosen == key;
    return found;
  };
  // codes sharing a key with a chosen code, ascending: usually just the chosen codes
  std::unordered_map<uint64_t, std::vector<int64_t>> sharing;
  bool any = false;
  for (int64_t c = 0; c < k; ++c) {
    if (is_chosen_key(keys[c])) {
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

  // Low precision is widened once here: O(N*D + K*D), never N*K. Detached: the GEMM tiles call
  // at::mm_out on pool threads, which do not inherit this thread's below-autograd dispatch
  // state, so an input that requires grad (the registered op's autograd formula calls this
  // kernel with one) made mm_out refuse ("functions with out=... arguments don't support
  // automatic differentiation") with 2+ threads, 5-256 rows at D > 64 or the GEMM tiles.
  const at::Tensor xc = x.detach().to(compute).contiguous();
  const at::Tensor cc = codebook.detach().to(compute).contiguous();
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
    // float32 on an AVX-512 CPU: the AVX-512 kernels; otherwise AVX2 where the CPU has it (the
    // AVX2 build of the kernel bodies serves float64 too: the compiler vectorises it).
    [[maybe_unused]] const bool wide = std::is_same_v<scalar_t, float> && cpu_has_avx512();
    // The direct micro-kernel for D <= 64 everywhere; with AVX2 (no AVX-512) for float32 also
    // up to D = 1024 while its code panels (a K x D copy) take at most 32 MiB: measured on the
    // 2-core EPYC, 2 threads, against the GEMM tiles (docs/benchmarks.md, "The AVX2 direct kernel, and D above 64").
    const bool direct = dim <= kDirectMaxDim ||
                        (std::is_same_v<scalar_t, float> && !wide && cpu_has_avx2_fma() &&
                         dim <= kAvx2DirectMaxDim &&
                         k * dim * int64_t(sizeof(float)) <= kAvx2DirectMaxPanelBytes);
    if (few_rows) {
      std::vector<scalar_t> a(k), inv(cosine ? k : 0);
      const auto search = LGVQ_PICK_ISA(true, cpu_has_avx2_fma,
                                        (wide ? &avx512::nearest_code_few_rows<scalar_t>
                                              : &avx2::nearest_code_few_rows<scalar_t>),
                                        &baseline::nearest_code_few_rows<scalar_t>);
      search(xc, cc, given.defined() ? given.data_ptr<scalar_t>() : nullptr, m,
             cosine ? inv.data() : nullptr, keys.data(), a.data(), index_ptr, distance_ptr);
    } else {
      at::Tensor a = cosine ? at::zeros({k}, cc.options()) : given.defined() ? given : (cc * cc).sum(1);
      std::vector<scalar_t> inv(cosine ? k : 0);
      if (cosine) {
        const auto norms = LGVQ_PICK_ISA(true, cpu_has_avx2_fma,
                                         (wide ? &avx512::inverse_norms<scalar_t>
                                               : &avx2::inverse_norms<scalar_t>),
                                         &baseline::inverse_norms<scalar_t>);
        norms(codes_ptr, k, dim, inv.data());
      }
      code_keys(codes_ptr, k, dim, keys.data());
      const auto search =
          direct
              ? LGVQ_PICK_ISA(true, cpu_has_avx2_fma,
                              (wide ? &avx512::nearest_code_direct<scalar_t>
                                    : &avx2::nearest_code_direct<scalar_t>),
                              &baseline::nearest_code_direct<scalar_t>)
              : LGVQ_PICK_ISA(true, cpu_has_avx2_fma,
                              (wide ? &avx512::nearest_code_gemm<scalar_t>
                                    : &avx2::nearest_code_gemm<scalar_t>),
                              &baseline::nearest_code_gemm<scalar_t>);
      search(xc, cc, a.data_ptr<scalar_t>(), m, cosine ? inv.data() : nullptr, index_ptr,
             distance_ptr);
    }
    remap_to_lowest_duplicate(codes_ptr, keys.data(), k, dim, index_ptr, n);
  });
  return {indices, distances};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CPU, m) { m.impl("nearest_code", &nearest_code_cpu); }

}  // namespace lgvq
