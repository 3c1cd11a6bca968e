// Straight-through quantizer (forward, fused backward) and per-code row statistics on CUDA.
// Contract: quantize.cuh. Formulas: lgvq_kernels/reference.py.
//
// Forward: row blocks of a fixed size (it depends on d only); inside a block, groups of
// lanes_per_row(d) threads own a row each and copy the chosen code into `quantized` while summing
// mask * (x - e)^2 per thread; the block adds its threads in a fixed order (warp butterfly, then
// warps in order) into one partial, and a one-block kernel adds the partials in a fixed order.
//
// Backward and statistics are segment sums by code, computed without float atomics:
//   1. keys: key[i] = indices[i] (k for an out-of-range index: a segment nobody reads), plus the
//      number of valid rows (a 64-bit integer atomic per warp: exact, so deterministic);
//   2. a stable CUB radix sort of (key, row) on the key's bits only;
//   3. the sorted positions are cut into tiles of kTileRows (64); one warp per (tile, chunk of
//      32 columns), a column per lane, walks its tile in order (issuing the loads of kBatchRows
//      rows before using them) and sums each run of equal keys: a run wholly inside the tile is
//      written to the output; a run that crosses the tile's start ("head") or only its end
//      ("tail") goes to scratch. The backward writes grad_x of every row it visits (every row is
//      visited once per column chunk, out-of-range rows included);
//   4. one warp per code finds its segment by binary search: no rows -> zeros; rows spanning
//      several tiles -> tail(first tile) + head(next) + ... + head(last tile), in tile order.
// A hot code costs what a cold one does per row in step 3 (no warp walks more than 64 rows);
// step 4 then adds one partial per tile it spans (n / 64 for a code holding every row). The
// order of every sum is fixed by (n, sorted keys) alone: the same bits on any device.
// Not yet timed on a GPU (kTileRows, kBatchRows and the 32-column chunks are first guesses).
//
// Pure CUDA on purpose (no torch headers): csrc/cuda/quantize_cuda.cpp binds it to tensors.
#include "quantize.cuh"
#include "common.cuh"

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// LGVQ_QUANTIZE_KERNELS_ONLY: the host-emulation test harness includes the kernels alone (it
// replaces the CUB sort by a host stable sort).
#ifndef LGVQ_QUANTIZE_KERNELS_ONLY
#include <cub/device/device_radix_sort.cuh>
#endif

namespace lgvq {
namespace cuda {
namespace quantize_detail {

using namespace ::lgvq::cuda::common;  // block shape, dtype conversions, ceil_div, align_up

constexpr int kRowIterations = 4;     // forward: rows per row group and block
constexpr int kTileRows = 64;         // segment sums: sorted positions per tile (2 per lane)
constexpr int kBatchRows = 8;         // segment sums: rows whose loads are in flight together
constexpr uint32_t kNoKey = 0xffffffffu;  // "no neighbour" (keys are at most k < 2^31)
static_assert(kTileRows == 64, "the tile's keys and rows are held in two registers per lane");

__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ bool in_range(int64_t code, int64_t k) {
  return static_cast<uint64_t>(code) < static_cast<uint64_t>(k);  // also rejects negatives
}

// Sum of one value per thread over the block in a fixed order (butterfly within each warp, then
// the warps in order). Every thread of the block must call it; every thread gets the total.
template <typename V>
__device__ __forceinline__ V block_sum(V v) {
  __shared__ V warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  __syncthreads();  // an earlier call's reads of warp_sums are done
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  V total = warp_sums[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += warp_sums[w];
  return total;
}

// ---- forward ----------------------------------------------------------------------------------

// Threads per row: the smallest power of two >= d, at most 32 (a row group never spans warps).
__host__ __device__ __forceinline__ int lanes_per_row(int64_t d) {
  int lanes = 1;
  while (lanes < 32 && lanes < d) lanes *= 2;
  return lanes;
}

__host__ __device__ __forceinline__ int64_t forward_rows_per_block(int64_t d) {
  return static_cast<int64_t>(kThreads / lanes_per_row(d)) * kRowIterations;
}

inline int64_t forward_blocks(int64_t n, int64_t d) {
  return ceil_div(n, forward_rows_per_block(d));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_forward_kernel(const T* __restrict__ x, const T* __restrict__ codebook,
                        const int64_t* __restrict__ indices, const bool* __restrict__ mask,
                        int64_t n, int64_t k, int64_t d, T* __restrict__ quantized,
                        float* __restrict__ partial_sums,
                        unsigned long long* __restrict__ partial_counts) {
  const int lanes = lanes_per_row(d);
  const int groups = kThreads / lanes;
  const int group = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * forward_rows_per_block(d);
  const int64_t row_end = min_i64(n, row_begin + forward_rows_per_block(d));
  const T zero = from_float<T>(0.0f);
  float sum = 0.0f;
  unsigned long long count = 0;
  for (int64_t row = row_begin + group; row < row_end; row += groups) {
    const int64_t code = indices[row];
    T* out = quantized + row * d;
    if (!in_range(code, k)) {  // reads nothing from the codebook, adds nothing
      for (int64_t col = lane; col < d; col += lanes) out[col] = zero;
      continue;
    }
    const bool selected = mask == nullptr || mask[row];
    if (selected && lane == 0) ++count;
    // A product, as in the reference: a masked-out non-finite row still gives NaN.
    const float weight = selected ? 1.0f : 0.0f;
    const T* x_row = x + row * d;
    const T* e = codebook + code * d;
    for (int64_t col = lane; col < d; col += lanes) {
      const T value = e[col];
      out[col] = value;
      const float diff = to_float(x_row[col]) - to_float(value);
      sum += (diff * diff) * weight;
    }
  }
  sum = block_sum(sum);
  count = block_sum(count);
  if (threadIdx.x == 0) {
    partial_sums[blockIdx.x] = sum;
    partial_counts[blockIdx.x] = count;
  }
}

// One block: squared_error = (sum of the partials) / max(valid * d, 1), in a fixed order.
__global__ void __launch_bounds__(kThreads)
quantize_forward_finish_kernel(const float* __restrict__ partial_sums,
                               const unsigned long long* __restrict__ partial_counts,
                               int64_t blocks, int64_t d, float* __restrict__ squared_error) {
  float sum = 0.0f;
  unsigned long long count = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) {
    sum += partial_sums[b];
    count += partial_counts[b];
  }
  sum = block_sum(sum);
  count = block_sum(count);
  if (threadIdx.x == 0) {
    const long long elements = static_cast<long long>(count) * d;
    squared_error[0] = sum / static_cast<float>(elements > 0 ? elements : 1);
  }
}

struct ForwardLayout {
  size_t partial_sums, partial_counts, total;
};


inline ForwardLayout forward_layout(int64_t n, int64_t d) {
  const size_t blocks = static_cast<size_t>(forward_blocks(n, d));
  ForwardLayout layout;
  layout.partial_sums = 0;
  layout.partial_counts = align_up(blocks * sizeof(float));
  layout.total = layout.partial_counts + align_up(blocks * sizeof(unsigned long long));
  return layout;
}

// ---- rows grouped by code ---------------------------------------------------------------------

// Bits of the sort keys: keys are 0..k (k marks an out-of-range index).
inline int key_bits(int64_t k) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= k) ++bits;
  return bits;
}

// key[i] = indices[i] when in range, else k; row[i] = i. valid_count (nullable, zeroed by the
// caller) += number of in-range rows with mask true.
__global__ void __launch_bounds__(kThreads)
segment_keys_kernel(const int64_t* __restrict__ indices, const bool* __restrict__ mask,
                    int64_t n, int64_t k, uint32_t* __restrict__ keys,
                    uint32_t* __restrict__ rows, unsigned long long* __restrict__ valid_count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  unsigned long long valid = 0;
  if (i < n) {
    const int64_t code = indices[i];
    const bool ok = in_range(code, k);
    keys[i] = static_cast<uint32_t>(ok ? code : k);
    rows[i] = static_cast<uint32_t>(i);
    valid = ok && (mask == nullptr || mask[i]) ? 1 : 0;
  }
  if (valid_count == nullptr) return;  // uniform over the grid
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) valid += __shfl_xor_sync(kFullMask, valid, offset);
  if (threadIdx.x % 32 == 0 && valid != 0) atomicAdd(valid_count, valid);  // integer: exact
}

// The backward's per-element work. load() only reads (so that a batch of rows can be in flight
// together); visit() computes, writes grad_x and returns the row's term of grad_codebook.
template <typename T>
struct BackwardOp {
  struct Loaded {
    float x, e, grad, weight;
    bool ok;  // in-range row and column
  };
  const T* grad_quantized;  // nullable
  const float* grad_commitment;
  const float* grad_codebook_loss;
  const unsigned long long* valid_count;
  const T* x;
  const T* codebook;
  const bool* mask;
  int64_t k, d;
  T* grad_x;
  T* grad_codebook;
  float coef_x, coef_codebook;  // set by prepare()

  // As the reference: scale = 2 / max(valid d, 1) in fp32, then each gradient scalar times it.
  __device__ __forceinline__ void prepare() {
    const long long elements = static_cast<long long>(*valid_count) * d;
    const float scale = 2.0f / static_cast<float>(elements > 0 ? elements : 1);
    coef_x = grad_commitment[0] * scale;
    coef_codebook = -grad_codebook_loss[0] * scale;
  }
  __device__ __forceinline__ Loaded load(uint32_t row, uint32_t key, int64_t col) const {
    Loaded v{0.0f, 0.0f, 0.0f, 0.0f, false};
    if (key == kNoKey || col >= d) return v;  // past the tile's end, or past d
    const int64_t at = static_cast<int64_t>(row) * d + col;
    if (grad_quantized != nullptr) v.grad = to_float(grad_quantized[at]);
    v.ok = key < k;
    if (v.ok) {
      v.x = to_float(x[at]);
      v.e = to_float(codebook[static_cast<int64_t>(key) * d + col]);
      v.weight = mask == nullptr || mask[row] ? 1.0f : 0.0f;
    }
    return v;
  }
  __device__ __forceinline__ float visit(const Loaded& v, uint32_t row, int64_t col) const {
    if (col >= d) return 0.0f;
    // Out of range: exactly nothing (not even a NaN) besides the straight-through gradient.
    const float diff = v.ok ? (v.x - v.e) * v.weight : 0.0f;
    float g = diff * coef_x;
    if (grad_quantized != nullptr) g = g + v.grad;
    grad_x[static_cast<int64_t>(row) * d + col] = from_float<T>(g);
    return diff * coef_codebook;
  }
  __device__ __forceinline__ void store(int64_t code, int64_t col, float total) const {
    grad_codebook[code * d + col] = from_float<T>(total);
  }
};

// codebook_statistics: columns 0..d-1 sum mask * x, column d sums mask (the count).
template <typename T>
struct StatisticsOp {
  struct Loaded {
    float x, weight;
  };
  const T* x;
  const bool* mask;
  int64_t k, d;
  float* stats;  // [k, d + 1]

  __device__ __forceinline__ void prepare() {}
  __device__ __forceinline__ Loaded load(uint32_t row, uint32_t key, int64_t col) const {
    Loaded v{0.0f, 0.0f};
    if (key >= k || col > d) return v;  // out-of-range rows (and kNoKey) are never flushed
    v.weight = mask == nullptr || mask[row] ? 1.0f : 0.0f;
    if (col < d) v.x = to_float(x[static_cast<int64_t>(row) * d + col]);
    return v;
  }
  __device__ __forceinline__ float visit(const Loaded& v, uint32_t, int64_t col) const {
    return col < d ? v.x * v.weight : v.weight;
  }
  __device__ __forceinline__ void store(int64_t code, int64_t col, float total) const {
    stats[code * (d + 1) + col] = total;
  }
};

inline int64_t segment_tasks(int64_t n, int64_t columns) {
  return ceil_div(n, kTileRows) * ceil_div(columns, 32);
}

// Grid of segment_tile_kernel: one warp per task (grid-stride beyond 2^20 blocks).
inline unsigned int segment_tile_blocks(int64_t n, int64_t columns) {
  const int64_t blocks = ceil_div(segment_tasks(n, columns), kWarps);
  return static_cast<unsigned int>(min_i64(blocks, int64_t{1} << 20));
}

// Step 3 (see the top of the file): one warp per (tile of sorted positions, chunk of 32
// columns); lane l owns one column. keys/rows: the sorted keys and their row numbers [n];
// head/tail: [tiles, columns] scratch.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
segment_tile_kernel(Op op, const uint32_t* __restrict__ keys, const uint32_t* __restrict__ rows,
                    int64_t n, int64_t k, int64_t columns, float* __restrict__ head,
                    float* __restrict__ tail) {
  static_assert(kTileRows % kBatchRows == 0, "a batch never straddles the tile's end");
  const int lane = threadIdx.x % 32;
  const int64_t chunks = ceil_div(columns, 32);
  const int64_t tasks = ceil_div(n, kTileRows) * chunks;
  const uint32_t sentinel = static_cast<uint32_t>(k);
  Op local = op;
  local.prepare();
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; task < tasks;
       task += static_cast<int64_t>(gridDim.x) * kWarps) {  // warp-uniform
    const int64_t tile = task / chunks;
    const int64_t col = (task % chunks) * 32 + lane;
    const int64_t first = tile * kTileRows;
    const int len = static_cast<int>(min_i64(kTileRows, n - first));
    const uint32_t key_lo = lane < len ? keys[first + lane] : sentinel;
    const uint32_t key_hi = lane + 32 < len ? keys[first + 32 + lane] : sentinel;
    const uint32_t row_lo = lane < len ? rows[first + lane] : 0u;
    const uint32_t row_hi = lane + 32 < len ? rows[first + 32 + lane] : 0u;
    const uint32_t before = first > 0 ? keys[first - 1] : kNoKey;
    const uint32_t after = first + len < n ? keys[first + len] : kNoKey;

    float acc = 0.0f;
    uint32_t current = __shfl_sync(kFullMask, key_lo, 0);
    int run_begin = 0;
    for (int q0 = 0; q0 < len; q0 += kBatchRows) {  // warp-uniform
      typename Op::Loaded loaded[kBatchRows];
      uint32_t batch_keys[kBatchRows], batch_rows[kBatchRows];
#pragma unroll
      for (int b = 0; b < kBatchRows; ++b) {  // all loads first: kBatchRows rows in flight
        const int q = q0 + b;                 // < kTileRows
        batch_keys[b] = __shfl_sync(kFullMask, q < 32 ? key_lo : key_hi, q % 32);
        batch_rows[b] = __shfl_sync(kFullMask, q < 32 ? row_lo : row_hi, q % 32);
        loaded[b] = local.load(batch_rows[b], q < len ? batch_keys[b] : kNoKey, col);
      }
#pragma unroll
      for (int b = 0; b < kBatchRows; ++b) {
        const int q = q0 + b;
        if (q >= len) break;
        if (batch_keys[b] != current) {
          // The run [run_begin, q) of `current` is complete: out-of-range rows (the sentinel
          // key) are dropped; a run that started before the tile goes to head, one that goes
          // on after it to tail, any other is the code's whole sum.
          if (current < sentinel && col < columns) {
            if (run_begin == 0 && before == current) {
              head[tile * columns + col] = acc;
            } else {
              local.store(current, col, acc);  // ends inside the tile: not continued
            }
          }
          current = batch_keys[b];
          run_begin = q;
          acc = 0.0f;
        }
        acc += local.visit(loaded[b], batch_rows[b], col);
      }
    }
    // The last run ends at the tile's end.
    if (current < sentinel && col < columns) {
      if (run_begin == 0 && before == current) {
        head[tile * columns + col] = acc;
      } else if (after == current) {
        tail[tile * columns + col] = acc;
      } else {
        local.store(current, col, acc);
      }
    }
  }
}

// First position p in [0, n) with keys[p] >= value (n if none).
__device__ __forceinline__ int64_t lower_bound(const uint32_t* __restrict__ keys, int64_t n,
                                               uint32_t value) {
  int64_t low = 0, high = n;
  while (low < high) {
    const int64_t middle = low + (high - low) / 2;
    if (keys[middle] < value) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low;
}

inline unsigned int segment_combine_blocks(int64_t k) {
  return static_cast<unsigned int>(ceil_div(k, kWarps));
}

// Step 4: one warp per code.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
segment_combine_kernel(Op op, const uint32_t* __restrict__ keys, int64_t n, int64_t k,
                       int64_t columns, const float* __restrict__ head,
                       const float* __restrict__ tail) {
  const int lane = threadIdx.x % 32;
  const int64_t code = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (code >= k) return;
  const int64_t begin = lower_bound(keys, n, static_cast<uint32_t>(code));
  const int64_t end = lower_bound(keys, n, static_cast<uint32_t>(code + 1));
  if (begin == end) {
    for (int64_t col = lane; col < columns; col += 32) op.store(code, col, 0.0f);
    return;
  }
  const int64_t first = begin / kTileRows, last = (end - 1) / kTileRows;
  if (first == last) return;  // written whole by its tile
  for (int64_t col = lane; col < columns; col += 32) {
    float total = tail[first * columns + col];
    for (int64_t t = first + 1; t <= last; ++t) total += head[t * columns + col];
    op.store(code, col, total);
  }
}

struct SegmentLayout {
  size_t keys[2], rows[2], valid_count, head, tail, sort_temp, total;
};

inline SegmentLayout segment_layout(int64_t n, int64_t columns, size_t sort_temp_bytes) {
  const size_t vector = align_up(static_cast<size_t>(n) * sizeof(uint32_t));
  const size_t partials = align_up(static_cast<size_t>(ceil_div(n, kTileRows)) *
                                   static_cast<size_t>(columns) * sizeof(float));
  SegmentLayout layout;
  layout.keys[0] = 0;
  layout.keys[1] = vector;
  layout.rows[0] = 2 * vector;
  layout.rows[1] = 3 * vector;
  layout.valid_count = 4 * vector;
  layout.head = layout.valid_count + kAlignment;
  layout.tail = layout.head + partials;
  layout.sort_temp = layout.tail + partials;
  layout.total = layout.sort_temp + align_up(sort_temp_bytes);
  return layout;
}

inline bool valid_sizes(int64_t n, int64_t k, int64_t d) {
  return n >= 0 && n <= 0x7fffffff && k >= 0 && k < 0x7fffffff && d >= 1;
}

}  // namespace quantize_detail

// ---- host launchers ---------------------------------------------------------------------------
#ifndef LGVQ_QUANTIZE_KERNELS_ONLY

using namespace quantize_detail;

namespace {

cudaError_t sort_temp_bytes(int64_t n, int64_t k, size_t* bytes) {
  cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr), rows(nullptr, nullptr);
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, keys, rows, static_cast<int>(n), 0,
                                         key_bits(k), cudaStream_t{});
}

cudaError_t segment_workspace_bytes(int64_t n, int64_t k, int64_t columns, size_t* bytes) {
  if (bytes == nullptr || n < 0 || n > 0x7fffffff || k < 0 || k >= 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  *bytes = 0;
  if (n == 0) return cudaSuccess;
  size_t sort_bytes = 0;
  const cudaError_t error = sort_temp_bytes(n, k, &sort_bytes);
  if (error != cudaSuccess) return error;
  *bytes = segment_layout(n, columns, sort_bytes).total;
  return cudaSuccess;
}

// Steps 1-4 of the top of the file for `op` over `columns` columns.
template <typename Op>
cudaError_t run_segments(Op op, const int64_t* indices, const bool* mask, int64_t n, int64_t k,
                         int64_t columns, bool count_valid, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  size_t sort_bytes = 0;
  cudaError_t error = sort_temp_bytes(n, k, &sort_bytes);
  if (error != cudaSuccess) return error;
  const SegmentLayout layout = segment_layout(n, columns, sort_bytes);
  if (workspace == nullptr || workspace_bytes < layout.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  uint32_t* keys[2] = {reinterpret_cast<uint32_t*>(base + layout.keys[0]),
                       reinterpret_cast<uint32_t*>(base + layout.keys[1])};
  uint32_t* rows[2] = {reinterpret_cast<uint32_t*>(base + layout.rows[0]),
                       reinterpret_cast<uint32_t*>(base + layout.rows[1])};
  auto* valid_count = reinterpret_cast<unsigned long long*>(base + layout.valid_count);
  float* head = reinterpret_cast<float*>(base + layout.head);
  float* tail = reinterpret_cast<float*>(base + layout.tail);

  if (count_valid) {
    error = cudaMemsetAsync(valid_count, 0, sizeof(unsigned long long), stream);
    if (error != cudaSuccess) return error;
  }
  segment_keys_kernel<<<static_cast<unsigned int>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      indices, mask, n, k, keys[0], rows[0], count_valid ? valid_count : nullptr);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;

  cub::DoubleBuffer<uint32_t> key_buffer(keys[0], keys[1]), row_buffer(rows[0], rows[1]);
  error = cub::DeviceRadixSort::SortPairs(base + layout.sort_temp, sort_bytes, key_buffer,
                                          row_buffer, static_cast<int>(n), 0, key_bits(k),
                                          stream);
  if (error != cudaSuccess) return error;
  const uint32_t* sorted_keys = key_buffer.Current();
  const uint32_t* sorted_rows = row_buffer.Current();

  segment_tile_kernel<Op><<<segment_tile_blocks(n, columns), kThreads, 0, stream>>>(
      op, sorted_keys, sorted_rows, n, k, columns, head, tail);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  if (k == 0) return cudaSuccess;
  segment_combine_kernel<Op><<<segment_combine_blocks(k), kThreads, 0, stream>>>(
      op, sorted_keys, n, k, columns, head, tail);
  return cudaGetLastError();
}

}  // namespace

size_t quantize_forward_workspace_bytes(int64_t n, int64_t d) {
  if (n <= 0 || d < 1) return 0;
  return quantize_detail::forward_layout(n, d).total;
}

cudaError_t quantize_backward_workspace_bytes(int64_t n, int64_t k, int64_t d, size_t* bytes) {
  return segment_workspace_bytes(n, k, d, bytes);
}

cudaError_t codebook_statistics_workspace_bytes(int64_t n, int64_t k, int64_t d, size_t* bytes) {
  return segment_workspace_bytes(n, k, d + 1, bytes);
}

template <typename T>
cudaError_t launch_quantize_straight_through(const T* x, const T* codebook,
                                             const int64_t* indices, const bool* mask, int64_t n,
                                             int64_t k, int64_t d, T* quantized,
                                             float* squared_error, void* workspace,
                                             size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_sizes(n, k, d)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const ForwardLayout layout = forward_layout(n, d);
  if (x == nullptr || codebook == nullptr || indices == nullptr || quantized == nullptr ||
      squared_error == nullptr || workspace == nullptr || workspace_bytes < layout.total) {
    return cudaErrorInvalidValue;
  }
  char* base = static_cast<char*>(workspace);
  float* partial_sums = reinterpret_cast<float*>(base + layout.partial_sums);
  auto* partial_counts = reinterpret_cast<unsigned long long*>(base + layout.partial_counts);
  const int64_t blocks = forward_blocks(n, d);  // <= 2^26: n < 2^31, >= 32 rows per block
  quantize_forward_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      x, codebook, indices, mask, n, k, d, quantized, partial_sums, partial_counts);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  quantize_forward_finish_kernel<<<1, kThreads, 0, stream>>>(partial_sums, partial_counts,
                                                             blocks, d, squared_error);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_quantize_straight_through_backward(
    const T* grad_quantized, const float* grad_commitment, const float* grad_codebook_loss,
    const T* x, const T* codebook, const int64_t* indices, const bool* mask, int64_t n, int64_t k,
    int64_t d, T* grad_x, T* grad_codebook, void* workspace, size_t workspace_bytes,
    cudaStream_t stream) {
  if (!valid_sizes(n, k, d)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (grad_commitment == nullptr || grad_codebook_loss == nullptr || x == nullptr ||
      codebook == nullptr || indices == nullptr || grad_x == nullptr ||
      (k > 0 && grad_codebook == nullptr)) {
    return cudaErrorInvalidValue;
  }
  size_t sort_bytes = 0;
  cudaError_t error = sort_temp_bytes(n, k, &sort_bytes);
  if (error != cudaSuccess) return error;
  const SegmentLayout layout = segment_layout(n, d, sort_bytes);
  BackwardOp<T> op{};
  op.grad_quantized = grad_quantized;
  op.grad_commitment = grad_commitment;
  op.grad_codebook_loss = grad_codebook_loss;
  op.valid_count = reinterpret_cast<const unsigned long long*>(static_cast<char*>(workspace) +
                                                               layout.valid_count);
  op.x = x;
  op.codebook = codebook;
  op.mask = mask;
  op.k = k;
  op.d = d;
  op.grad_x = grad_x;
  op.grad_codebook = grad_codebook;
  return run_segments(op, indices, mask, n, k, d, /*count_valid=*/true, workspace,
                      workspace_bytes, stream);
}

template <typename T>
cudaError_t launch_codebook_statistics(const T* x, const int64_t* indices, const bool* mask,
                                       int64_t n, int64_t k, int64_t d, float* stats,
                                       void* workspace, size_t workspace_bytes,
                                       cudaStream_t stream) {
  if (!valid_sizes(n, k, d + 1)) return cudaErrorInvalidValue;  // d == 0: counts only
  if (n == 0) return cudaSuccess;
  if (x == nullptr || indices == nullptr || (k > 0 && stats == nullptr)) {
    return cudaErrorInvalidValue;
  }
  StatisticsOp<T> op{};
  op.x = x;
  op.mask = mask;
  op.k = k;
  op.d = d;
  op.stats = stats;
  return run_segments(op, indices, mask, n, k, d + 1, /*count_valid=*/false, workspace,
                      workspace_bytes, stream);
}

#define LGVQ_INSTANTIATE(T)                                                                      \
  template cudaError_t launch_quantize_straight_through<T>(                                      \
      const T*, const T*, const int64_t*, const bool*, int64_t, int64_t, int64_t, T*, float*,    \
      void*, size_t, cudaStream_t);                                                              \
  template cudaError_t launch_quantize_straight_through_backward<T>(                             \
      const T*, const float*, const float*, const T*, const T*, const int64_t*, const bool*,     \
      int64_t, int64_t, int64_t, T*, T*, void*, size_t, cudaStream_t);                           \
  template cudaError_t launch_codebook_statistics<T>(const T*, const int64_t*, const bool*,      \
                                                     int64_t, int64_t, int64_t, float*, void*,   \
                                                     size_t, cudaStream_t);
LGVQ_FOR_EACH_KERNEL_DTYPE(LGVQ_INSTANTIATE)
#undef LGVQ_INSTANTIATE

#endif  // LGVQ_QUANTIZE_KERNELS_ONLY

}  // namespace cuda
}  // namespace lgvq
