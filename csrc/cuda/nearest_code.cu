// Nearest codebook entry on CUDA (SIMT, exact fp32 FMA accumulation).
//
// Never forms the N x K score matrix. A block owns a tile of 128 rows of x and streams 128-code
// tiles of the codebook past it; each D chunk of 16 of both tiles is staged in shared memory
// (as fp32) and every thread accumulates an 8 x 8 block of dot products in registers, then folds
// its 8 codes into a running (score, index) per row. At the end the 16 threads sharing a row
// merge with warp shuffles.
//
// Small N would leave most SMs idle, so the codebook is also split across blockIdx.y. Blocks
// combine their per-row winners with a 64-bit atomicMin on a packed key (order-preserving score
// bits << 32 | index): the minimum key is the lowest score, ties the lowest index, whatever the
// order the blocks finish in (deterministic). The keys live in the int64 `indices` output
// itself, and a small per-row pass turns them into (index, distance).
//
// Pure CUDA on purpose (no torch headers; compiles in seconds): csrc/cuda/nearest_code_cuda.cpp
// binds it to tensors.
#include "nearest_code.cuh"
#include "common.cuh"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lgvq {
namespace cuda {
namespace nearest_code_detail {

using namespace ::lgvq::cuda::common;  // block shape, to_float (common.cuh)

// ---- tile shape --------------------------------------------------------------------------
constexpr int kTileRows = 128;      // rows of x per block tile
constexpr int kTileCodes = 128;     // codes per codebook tile
constexpr int kChunk = 16;          // D elements staged per step
constexpr int kGroups = 16;         // 16 row groups x 16 code groups = 256 threads
constexpr int kHalfTile = 64;       // a thread's 8 rows (codes) are 4 at g*4 and 4 at 64 + g*4
// Shared tiles are stored transposed, [kChunk][kTileRows + kPad]: the compute loop reads a row
// of 4 consecutive floats as one float4 (the stride stays a multiple of 4 floats = 16 bytes),
// and the pad of 4 spreads the transposing stores over banks (2-way conflict at most).
constexpr int kPad = 4;
constexpr int kSharedStride = kTileRows + kPad;
// Global -> register staging: thread t loads column t % kChunk of rows t / kChunk + 16 i.
// A warp reads 2 rows x 16 consecutive elements (64 B fp32, 32 B half): whole sectors.
constexpr int kRowsPerPass = kThreads / kChunk;                     // 16
constexpr int kLoadsPerThread = kTileRows * kChunk / kThreads;      // 8
static_assert(kTileRows == kTileCodes, "the staging code assumes square tiles");
static_assert(kGroups * kGroups == kThreads, "one thread per (row group, code group)");
static_assert(kGroups * 8 == kTileRows, "8 rows (codes) per thread");
static_assert(kHalfTile == kTileRows / 2, "two float4 halves per thread");
static_assert(kSharedStride % 4 == 0, "float4 reads of the shared tiles need 16-byte rows");
static_assert(kGroups == 16, "the row merge shuffles over the 16 lanes of a half warp");

constexpr uint32_t kNoIndex = 0x7fffffffu;        // "no finite score seen": loses every merge
constexpr unsigned long long kEmptyKey = ~0ull;   // initial key: above every real key

// What the score of code k is, for a row x:
//   kL2GivenSqnorm:   sqnorm[k] - 2 x.c_k  (sqnorm read from global)
//   kL2ComputeSqnorm: |c_k|^2 - 2 x.c_k    (|c_k|^2 accumulated from the staged tiles)
//   kCosine:          -x.c_k
// so that the winner is always the minimum score.
enum Mode : int { kL2GivenSqnorm = 0, kL2ComputeSqnorm = 1, kCosine = 2 };


__device__ __forceinline__ float positive_infinity() { return __uint_as_float(0x7f800000u); }

// Order-preserving map of a finite float to uint32 (a < b  <=>  map(a) < map(b)). -0 is made +0
// first so that equal scores compare equal (and ties go to the lowest index).
__device__ __forceinline__ uint32_t ordered_bits(float v) {
  if (v == 0.0f) v = 0.0f;
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float from_ordered_bits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ unsigned long long pack_key(float score, uint32_t index) {
  return (static_cast<unsigned long long>(ordered_bits(score)) << 32) | index;
}

// (score, index) pairs in lexicographic order. Scores held here are finite or the +inf of a
// kNoIndex placeholder (never NaN), so this is a total order and both shuffle partners agree.
__device__ __forceinline__ bool better(float score, uint32_t index, float best_score,
                                       uint32_t best_index) {
  return score < best_score || (score == best_score && index < best_index);
}

// Loads one [kTileRows x kChunk] chunk (rows row0.., columns col0..) of a row-major [rows, d]
// matrix into registers as fp32; out-of-range rows and columns read as 0 (no load issued), so
// the D tail adds nothing to the dot products or norms.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ src, int64_t rows, int64_t d,
                                           int64_t row0, int64_t col0,
                                           float (&staged)[kLoadsPerThread]) {
  const int64_t col = col0 + threadIdx.x % kChunk;
  const int64_t first_row = row0 + threadIdx.x / kChunk;
  const int64_t rows_left = rows - first_row;  // this thread's rows i * 16 < rows_left exist
  const bool col_ok = col < d;
  const T* p = src + first_row * d + col;     // formed only; dereferenced only when in range
  const int64_t pass_stride = kRowsPerPass * d;
#pragma unroll
  for (int i = 0; i < kLoadsPerThread; ++i) {
    staged[i] = (col_ok && i * kRowsPerPass < rows_left) ? to_float(p[i * pass_stride]) : 0.0f;
  }
}

// Stores the staged chunk transposed: tile[column][row].
__device__ __forceinline__ void store_chunk(float (*tile)[kSharedStride],
                                            const float (&staged)[kLoadsPerThread]) {
  const int col = threadIdx.x % kChunk;
  const int first_row = threadIdx.x / kChunk;
#pragma unroll
  for (int i = 0; i < kLoadsPerThread; ++i) tile[col][first_row + i * kRowsPerPass] = staged[i];
}

// One block: a grid-stride loop over row tiles (blockIdx.x) x one contiguous range of codebook
// tiles (blockIdx.y). Thread t = 16 * row_group + code_group owns rows
// {row_group*4 + i, 64 + row_group*4 + i} and codes {code_group*4 + j, 64 + code_group*4 + j},
// i, j < 4, of the tiles; the 16 threads of a row group are the 16 lanes of one half warp.
template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads, 2)
nearest_code_search_kernel(const T* __restrict__ x, const T* __restrict__ codebook,
                           const float* __restrict__ sqnorm, int64_t n, int64_t k, int64_t d,
                           int64_t code_tiles_per_split, unsigned long long* __restrict__ keys) {
  __shared__ __align__(16) float x_shared[kChunk][kSharedStride];
  __shared__ __align__(16) float code_shared[kChunk][kSharedStride];
  __shared__ float code_sqnorm_tile[kTileCodes];  // kL2ComputeSqnorm only

  const int row_group = threadIdx.x / kGroups;
  const int code_group = threadIdx.x % kGroups;
  const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;
  const int64_t code_tiles = (k + kTileCodes - 1) / kTileCodes;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.y) * code_tiles_per_split;
  const int64_t tile_end = tile_begin + code_tiles_per_split < code_tiles
                               ? tile_begin + code_tiles_per_split
                               : code_tiles;
  const int64_t chunks = (d + kChunk - 1) / kChunk;

  for (int64_t row_tile = blockIdx.x; row_tile < row_tiles; row_tile += gridDim.x) {
    const int64_t row0 = row_tile * kTileRows;

    // Running winner of each of this thread's 8 rows over the codes it has seen.
    float best_score[8];
    uint32_t best_index[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      best_score[i] = positive_infinity();
      best_index[i] = kNoIndex;
    }

    for (int64_t code_tile = tile_begin; code_tile < tile_end; ++code_tile) {
      const int64_t code0 = code_tile * kTileCodes;
      float acc[8][8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
      }
      float code_sqnorm = 0.0f;  // |c|^2 of code code0 + threadIdx.x (threads < kTileCodes)

      // Register prefetch: chunk c + 1 is read from global while chunk c is multiplied.
      float x_staged[kLoadsPerThread], code_staged[kLoadsPerThread];
      load_chunk(x, n, d, row0, 0, x_staged);
      load_chunk(codebook, k, d, code0, 0, code_staged);

      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        __syncthreads();  // every thread is done reading the tiles (previous chunk or tile)
        store_chunk(x_shared, x_staged);
        store_chunk(code_shared, code_staged);
        __syncthreads();  // the chunk is staged
        if (chunk + 1 < chunks) {
          load_chunk(x, n, d, row0, (chunk + 1) * kChunk, x_staged);
          load_chunk(codebook, k, d, code0, (chunk + 1) * kChunk, code_staged);
        }
        if (kMode == kL2ComputeSqnorm && threadIdx.x < kTileCodes) {
          // Warps 0-3 also square their code's column (conflict-free, 16 FMAs per chunk).
#pragma unroll
          for (int kk = 0; kk < kChunk; ++kk) {
            const float c = code_shared[kk][threadIdx.x];
            code_sqnorm = fmaf(c, c, code_sqnorm);
          }
        }
#pragma unroll
        for (int kk = 0; kk < kChunk; ++kk) {
          // Broadcast reads: a warp touches 2 distinct x float4s and 16 distinct code float4s.
          const float4 x_lo = *reinterpret_cast<const float4*>(&x_shared[kk][row_group * 4]);
          const float4 x_hi =
              *reinterpret_cast<const float4*>(&x_shared[kk][kHalfTile + row_group * 4]);
          const float4 c_lo = *reinterpret_cast<const float4*>(&code_shared[kk][code_group * 4]);
          const float4 c_hi =
              *reinterpret_cast<const float4*>(&code_shared[kk][kHalfTile + code_group * 4]);
          const float xs[8] = {x_lo.x, x_lo.y, x_lo.z, x_lo.w, x_hi.x, x_hi.y, x_hi.z, x_hi.w};
          const float cs[8] = {c_lo.x, c_lo.y, c_lo.z, c_lo.w, c_hi.x, c_hi.y, c_hi.z, c_hi.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(xs[i], cs[j], acc[i][j]);
          }
        }
      }

      if (kMode == kL2ComputeSqnorm) {
        // Visible after the barrier below; rewritten only after the next tile's first barrier,
        // which every thread reaches after finishing this epilogue.
        if (threadIdx.x < kTileCodes) code_sqnorm_tile[threadIdx.x] = code_sqnorm;
        __syncthreads();
      }

      // Fold this tile into the running winners. Codes are visited in increasing index order
      // (j < 4 are below 64 <= j >= 4) and only a strictly lower score replaces the winner, so
      // ties keep the lowest index. Non-finite scores (NaN, +inf, -inf) never enter.
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int local = (j < 4 ? 0 : kHalfTile) + code_group * 4 + (j & 3);
        const int64_t code = code0 + local;
        if (code < k) {
          float code_term = 0.0f;
          if (kMode == kL2GivenSqnorm) code_term = sqnorm[code];
          if (kMode == kL2ComputeSqnorm) code_term = code_sqnorm_tile[local];
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float score =
                kMode == kCosine ? -acc[i][j] : fmaf(-2.0f, acc[i][j], code_term);
            if (score < best_score[i] && score > -positive_infinity()) {
              best_score[i] = score;
              best_index[i] = static_cast<uint32_t>(code);
            }
          }
        }
      }
    }

    // Merge the 16 code groups of each row (lanes l and l ^ 8, 4, 2, 1 of a half warp), then
    // publish the block's winner of the row; rows with no finite score publish nothing.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float score = best_score[i];
      uint32_t index = best_index[i];
#pragma unroll
      for (int offset = kGroups / 2; offset > 0; offset /= 2) {
        const float other_score = __shfl_xor_sync(kFullMask, score, offset);
        const uint32_t other_index = __shfl_xor_sync(kFullMask, index, offset);
        if (better(other_score, other_index, score, index)) {
          score = other_score;
          index = other_index;
        }
      }
      const int64_t row = row0 + (i < 4 ? 0 : kHalfTile) + row_group * 4 + (i & 3);
      if (code_group == 0 && row < n && index != kNoIndex) {
        atomicMin(keys + row, pack_key(score, index));
      }
    }
  }
}

// One warp per row: unpacks the winning key into (index, distance); computes |x|^2 (l2). A row
// whose key is still empty had no finite score: it gets index 0 and the score of code 0,
// recomputed here.
template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads)
nearest_code_finish_kernel(const T* __restrict__ x, const T* __restrict__ codebook,
                           const float* __restrict__ sqnorm, int64_t n, int64_t d,
                           unsigned long long* __restrict__ keys, float* __restrict__ distances) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < n;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    unsigned long long key = 0;
    if (lane == 0) key = keys[row];
    key = __shfl_sync(kFullMask, key, 0);
    const bool none_finite = key == kEmptyKey;  // warp-uniform

    const T* x_row = x + row * d;
    float x_sqnorm = 0.0f, dot = 0.0f, code_sqnorm = 0.0f;
    if (kMode != kCosine || none_finite) {
      for (int64_t col = lane; col < d; col += 32) {
        const float xv = to_float(x_row[col]);
        x_sqnorm = fmaf(xv, xv, x_sqnorm);
        if (none_finite) {
          const float cv = to_float(codebook[col]);
          dot = fmaf(xv, cv, dot);
          code_sqnorm = fmaf(cv, cv, code_sqnorm);
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        x_sqnorm += __shfl_xor_sync(kFullMask, x_sqnorm, offset);
        dot += __shfl_xor_sync(kFullMask, dot, offset);
        code_sqnorm += __shfl_xor_sync(kFullMask, code_sqnorm, offset);
      }
    }

    uint32_t index;
    float score;
    if (none_finite) {
      index = 0;
      if (kMode == kCosine) {
        score = -dot;
      } else {
        score = fmaf(-2.0f, dot, kMode == kL2GivenSqnorm ? sqnorm[0] : code_sqnorm);
      }
    } else {
      index = static_cast<uint32_t>(key & 0xffffffffull);
      score = from_ordered_bits(static_cast<uint32_t>(key >> 32));
    }
    float distance;
    if (kMode == kCosine) {
      distance = 1.0f + score;
    } else {
      distance = x_sqnorm + score;
      distance = distance < 0.0f ? 0.0f : distance;  // keeps NaN (fmaxf would drop it)
    }
    if (lane == 0) {
      keys[row] = index;  // the int64 index, in the same slot (index < 2^31: bit-identical)
      distances[row] = distance;
    }
  }
}

// ---- launch plan (host code; the emulation harness uses it too) -----------------------------
struct LaunchPlan {
  unsigned int row_blocks;        // gridDim.x (grid-stride over row tiles beyond this)
  unsigned int code_splits;       // gridDim.y
  int64_t code_tiles_per_split;
  unsigned int finish_blocks;
};

// Split the codebook across blockIdx.y only as far as needed to give every SM two blocks (the
// occupancy __launch_bounds__ asks for); each split keeps at least one 128-code tile.
inline LaunchPlan plan_launch(int64_t n, int64_t k, int sm_count) {
  constexpr int64_t kMaxGridX = 0x7fffffff, kMaxGridY = 65535;
  const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;
  const int64_t code_tiles = (k + kTileCodes - 1) / kTileCodes;
  const int64_t target_blocks = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t splits = 1;
  if (row_tiles < target_blocks) splits = (target_blocks + row_tiles - 1) / row_tiles;
  if (splits > code_tiles) splits = code_tiles;
  if (splits > kMaxGridY) splits = kMaxGridY;
  const int64_t per_split = (code_tiles + splits - 1) / splits;
  splits = (code_tiles + per_split - 1) / per_split;  // no empty split
  int64_t finish_blocks = (n + kWarps - 1) / kWarps;
  if (finish_blocks > (int64_t{1} << 20)) finish_blocks = int64_t{1} << 20;  // grid-stride
  LaunchPlan plan;
  plan.row_blocks = static_cast<unsigned int>(row_tiles < kMaxGridX ? row_tiles : kMaxGridX);
  plan.code_splits = static_cast<unsigned int>(splits);
  plan.code_tiles_per_split = per_split;
  plan.finish_blocks = static_cast<unsigned int>(finish_blocks);
  return plan;
}

}  // namespace nearest_code_detail

// ---- host launchers ------------------------------------------------------------------------
// LGVQ_NEAREST_CODE_KERNELS_ONLY: the host-emulation test harness includes the kernels alone.
#ifndef LGVQ_NEAREST_CODE_KERNELS_ONLY

using namespace nearest_code_detail;

namespace {

template <typename T, int kMode>
cudaError_t launch_kernels(const T* x, const T* codebook, const float* sqnorm, int64_t n,
                           int64_t k, int64_t d, const LaunchPlan& plan,
                           unsigned long long* keys, float* distances, cudaStream_t stream) {
  nearest_code_search_kernel<T, kMode>
      <<<dim3(plan.row_blocks, plan.code_splits), kThreads, 0, stream>>>(
          x, codebook, sqnorm, n, k, d, plan.code_tiles_per_split, keys);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  nearest_code_finish_kernel<T, kMode>
      <<<plan.finish_blocks, kThreads, 0, stream>>>(x, codebook, sqnorm, n, d, keys, distances);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_nearest_code(const T* x, const T* codebook, const float* sqnorm, int64_t n,
                                int64_t k, int64_t d, bool cosine, int64_t* indices,
                                float* distances, cudaStream_t stream) {
  if (n < 0 || k < 1 || k > 0x7fffffff || d < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (x == nullptr || codebook == nullptr || indices == nullptr || distances == nullptr) {
    return cudaErrorInvalidValue;
  }
  int device = 0, sm_count = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  error = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  const LaunchPlan plan = plan_launch(n, k, sm_count);

  // The indices buffer holds the packed keys until the finish kernel overwrites them.
  static_assert(sizeof(int64_t) == sizeof(unsigned long long), "keys reuse the int64 output");
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(indices);
  error = cudaMemsetAsync(keys, 0xff, static_cast<size_t>(n) * sizeof(unsigned long long),
                          stream);  // every key = kEmptyKey
  if (error != cudaSuccess) return error;

  if (cosine) {
    return launch_kernels<T, kCosine>(x, codebook, nullptr, n, k, d, plan, keys, distances,
                                      stream);
  }
  if (sqnorm != nullptr) {
    return launch_kernels<T, kL2GivenSqnorm>(x, codebook, sqnorm, n, k, d, plan, keys,
                                             distances, stream);
  }
  return launch_kernels<T, kL2ComputeSqnorm>(x, codebook, nullptr, n, k, d, plan, keys,
                                             distances, stream);
}

#define LGVQ_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_nearest_code<T>(const T*, const T*, const float*, int64_t, int64_t, \
                                              int64_t, bool, int64_t*, float*, cudaStream_t);
LGVQ_FOR_EACH_KERNEL_DTYPE(LGVQ_INSTANTIATE)
#undef LGVQ_INSTANTIATE

#endif  // LGVQ_NEAREST_CODE_KERNELS_ONLY

}  // namespace cuda
}  // namespace lgvq
