// LG-VQ relationship-alignment loss and its backward on CUDA. Contract: relation.cuh. Formulas:
// lgvq_kernels/reference.py (relation_alignment_loss).
//
// Forward (after normalize_rows_kernel has normalised words and visual into float32):
//   similarity_argmax_kernel  a block per (sample, 32 words): streams 64-position tiles of V past
//                             its words, C staged 32 at a time in shared memory; every thread
//                             keeps 4 words x 2 positions of dot products and a running
//                             (max, first index); a warp merges its lanes at the end.
//   prepare_codes_kernel      a warp per word: u = s codes[chosen], |u|, unit = u / max(|u|, eps).
//   gram_difference_kernel    a block per (sample, 32 x 32 word pairs): P - Q with the masks
//                             applied while staging, C staged 32 at a time; the block's sum of
//                             squares into a partial.
//   loss_finish_kernel        one block adds the partials in a fixed order.
// Backward: the same four steps (less the loss), then
//   grad_rows_kernel          a block per (sample, 32 words, 32 columns): (P - Q) c_hat, L staged
//                             32 at a time;
//   grad_transform_kernel     a warp per word: mask, scale, normalisation backward, times s;
//   scatter_kernel            a warp per position: the sum, in word order, over the words that
//                             chose it (no atomics).
// L (words per caption) is small, so no step tiles beyond what is written here; shared memory is
// at most 17 KB per block.
//
// Pure CUDA on purpose (no torch headers): csrc/cuda/relation_cuda.cpp binds it to tensors.
#include "relation.cuh"
#include "common.cuh"

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lgvq {
namespace cuda {
namespace relation_detail {

using namespace ::lgvq::cuda::common;  // block shape, dtype conversions, ceil_div, align_up

constexpr int kTile = 32;             // words (and word pairs, columns) per tile side
constexpr int kPositionTile = 64;     // positions per tile of the argmax
constexpr int kStride = kTile + 1;    // shared rows padded: column reads hit 32 distinct banks
constexpr int kRowsPerWarp = kTile / kWarps;  // 4 words per warp in the tiled kernels
constexpr float kEps = 1e-12f;        // F.normalize's eps
constexpr unsigned int kMaxBlocks = 1u << 20;  // grid-stride beyond this
static_assert(kRowsPerWarp * kWarps == kTile, "8 warps x 4 rows cover a tile");

__device__ __forceinline__ bool is_nan(float v) { return v != v; }

// max(|x|, eps) keeping NaN, like Tensor.clamp_min.
__device__ __forceinline__ float clamp_norm(float norm) { return norm < kEps ? kEps : norm; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// torch.max's order over (value, position): NaN above everything (the first NaN wins), then the
// larger value, then the lower position. A total order, so lanes merge to the same winner.
__device__ __forceinline__ bool better(float value, int32_t position, float best,
                                       int32_t best_position) {
  const bool value_nan = is_nan(value), best_nan = is_nan(best);
  if (value_nan || best_nan) return value_nan && (!best_nan || position < best_position);
  return value > best || (value == best && position < best_position);
}

// Blocks of a grid-stride loop over `items` block-sized work items.
inline unsigned int grid_blocks(int64_t items) {
  return static_cast<unsigned int>(items < kMaxBlocks ? (items > 0 ? items : 1) : kMaxBlocks);
}

// ---- normalisation ----------------------------------------------------------------------------

// A warp per row: sum of squares (lane-strided, then butterfly), then the division.
template <typename T>
__global__ void __launch_bounds__(kThreads)
normalize_rows_kernel(const T* __restrict__ in, int64_t rows, int64_t width,
                      float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* src = in + row * width;
    float sum = 0.0f;
    for (int64_t col = lane; col < width; col += 32) {
      const float v = to_float(src[col]);
      sum = fmaf(v, v, sum);
    }
    const float divisor = clamp_norm(sqrtf(warp_sum(sum)));
    float* dst = out + row * width;
    for (int64_t col = lane; col < width; col += 32) dst[col] = to_float(src[col]) / divisor;
  }
}

// ---- forward steps ----------------------------------------------------------------------------

// Work item = (sample b, word tile): its 32 words against all positions.
__global__ void __launch_bounds__(kThreads)
similarity_argmax_kernel(const float* __restrict__ words_unit,
                         const float* __restrict__ visual_unit, int64_t batch, int64_t length,
                         int64_t positions, int64_t width, int64_t* __restrict__ chosen,
                         float* __restrict__ best_similarity) {
  __shared__ float word_tile[kTile][kStride];
  __shared__ float position_tile[kPositionTile][kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t word_tiles = ceil_div(length, kTile);
  for (int64_t item = blockIdx.x; item < batch * word_tiles; item += gridDim.x) {
    const int64_t b = item / word_tiles;
    const int64_t word0 = (item % word_tiles) * kTile;
    const float* words = words_unit + b * length * width;
    const float* visual = visual_unit + b * positions * width;
    float best[kRowsPerWarp];
    int32_t best_position[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      best[r] = -__int_as_float(0x7f800000);  // -inf
      best_position[r] = 0x7fffffff;           // loses every tie against a real position
    }
    for (int64_t position0 = 0; position0 < positions; position0 += kPositionTile) {
      float acc[kRowsPerWarp][2];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r][0] = acc[r][1] = 0.0f;
      for (int64_t col0 = 0; col0 < width; col0 += kTile) {
        const int64_t col = col0 + lane;
        __syncthreads();  // the previous chunk is consumed
#pragma unroll
        for (int r = 0; r < kTile / kWarps; ++r) {
          const int row = warp + kWarps * r;
          const int64_t word = word0 + row;
          word_tile[row][lane] = word < length && col < width ? words[word * width + col] : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < kPositionTile / kWarps; ++r) {
          const int row = warp + kWarps * r;
          const int64_t position = position0 + row;
          position_tile[row][lane] =
              position < positions && col < width ? visual[position * width + col] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kTile; ++kk) {
          const float v0 = position_tile[lane][kk];
          const float v1 = position_tile[lane + 32][kk];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const float w = word_tile[warp * kRowsPerWarp + r][kk];
            acc[r][0] = fmaf(w, v0, acc[r][0]);
            acc[r][1] = fmaf(w, v1, acc[r][1]);
          }
        }
      }
      // Positions in increasing order per lane; only a strictly better one replaces the best.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t position = position0 + lane + 32 * h;
        if (position < positions) {
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            if (better(acc[r][h], static_cast<int32_t>(position), best[r], best_position[r])) {
              best[r] = acc[r][h];
              best_position[r] = static_cast<int32_t>(position);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float value = best[r];
      int32_t position = best_position[r];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(kFullMask, value, offset);
        const int32_t other_position = __shfl_xor_sync(kFullMask, position, offset);
        if (better(other, other_position, value, position)) {
          value = other;
          position = other_position;
        }
      }
      const int64_t word = word0 + warp * kRowsPerWarp + r;
      if (lane == 0 && word < length) {
        chosen[b * length + word] = position;
        best_similarity[b * length + word] = value;
      }
    }
  }
}

// A warp per word (row = b * length + i): unit = u / max(|u|, eps) with u = s codes[b, chosen].
template <typename T>
__global__ void __launch_bounds__(kThreads)
prepare_codes_kernel(const T* __restrict__ codes, const int64_t* __restrict__ chosen,
                     const float* __restrict__ best_similarity, int64_t rows, int64_t length,
                     int64_t positions, int64_t width, float* __restrict__ unit,
                     float* __restrict__ norm) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    int64_t position = chosen[row];
    position = position < 0 ? 0 : position >= positions ? positions - 1 : position;  // defensive
    const T* code = codes + ((row / length) * positions + position) * width;
    const float s = best_similarity[row];
    float sum = 0.0f;
    for (int64_t col = lane; col < width; col += 32) {
      const float u = s * to_float(code[col]);
      sum = fmaf(u, u, sum);
    }
    const float length_u = sqrtf(warp_sum(sum));
    const float divisor = clamp_norm(length_u);
    float* out = unit + row * width;
    for (int64_t col = lane; col < width; col += 32) out[col] = (s * to_float(code[col])) / divisor;
    if (lane == 0) norm[row] = length_u;
  }
}

// Sum over the block in a fixed order (butterfly, then warps in order); valid in every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kWarps];
  v = warp_sum(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = warp_sums[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += warp_sums[w];
  return total;
}

__host__ __device__ __forceinline__ int64_t gram_items(int64_t batch, int64_t length) {
  const int64_t tiles = ceil_div(length, kTile);
  return batch * tiles * tiles;
}

// Work item = (b, word tile i, word tile j): difference[b, i, j] = (c_hat c_hat^T - w_hat
// w_hat^T)[i, j] for the tile, and partials[item] = its sum of squares.
__global__ void __launch_bounds__(kThreads)
gram_difference_kernel(const float* __restrict__ words_unit, const float* __restrict__ unit,
                       const bool* __restrict__ word_mask, int64_t batch, int64_t length,
                       int64_t width, float* __restrict__ difference,
                       float* __restrict__ partials) {
  __shared__ float code_i[kTile][kStride];
  __shared__ float code_j[kTile][kStride];
  __shared__ float word_i[kTile][kStride];
  __shared__ float word_j[kTile][kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tiles = ceil_div(length, kTile);
  for (int64_t item = blockIdx.x; item < batch * tiles * tiles; item += gridDim.x) {
    const int64_t b = item / (tiles * tiles);
    const int64_t i0 = (item / tiles) % tiles * kTile;
    const int64_t j0 = item % tiles * kTile;
    float acc_code[kRowsPerWarp], acc_word[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc_code[r] = acc_word[r] = 0.0f;
    for (int64_t col0 = 0; col0 < width; col0 += kTile) {
      const int64_t col = col0 + lane;
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kTile / kWarps; ++r) {
        const int row = warp + kWarps * r;
        // c_hat = unit * m and w_hat = W * m (products, as the reference: a masked NaN stays).
        const int64_t wi = i0 + row, wj = j0 + row;
        const bool in_i = wi < length && col < width, in_j = wj < length && col < width;
        const int64_t at_i = (b * length + wi) * width + col;
        const int64_t at_j = (b * length + wj) * width + col;
        const float m_i = in_i && word_mask[b * length + wi] ? 1.0f : 0.0f;
        const float m_j = in_j && word_mask[b * length + wj] ? 1.0f : 0.0f;
        code_i[row][lane] = in_i ? unit[at_i] * m_i : 0.0f;
        word_i[row][lane] = in_i ? words_unit[at_i] * m_i : 0.0f;
        code_j[row][lane] = in_j ? unit[at_j] * m_j : 0.0f;
        word_j[row][lane] = in_j ? words_unit[at_j] * m_j : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kTile; ++kk) {
        const float cj = code_j[lane][kk], wj = word_j[lane][kk];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          acc_code[r] = fmaf(code_i[warp * kRowsPerWarp + r][kk], cj, acc_code[r]);
          acc_word[r] = fmaf(word_i[warp * kRowsPerWarp + r][kk], wj, acc_word[r]);
        }
      }
    }
    float squares = 0.0f;
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = i0 + warp * kRowsPerWarp + r;
      if (i < length && j < length) {
        const float diff = acc_code[r] - acc_word[r];
        difference[(b * length + i) * length + j] = diff;
        squares = fmaf(diff, diff, squares);
      }
    }
    squares = block_sum(squares);
    if (threadIdx.x == 0) partials[item] = squares;
  }
}

// One block: loss = (sum of the partials) / count, in a fixed order.
__global__ void __launch_bounds__(kThreads)
loss_finish_kernel(const float* __restrict__ partials, int64_t items, int64_t count,
                   float* __restrict__ loss) {
  float sum = 0.0f;
  for (int64_t item = threadIdx.x; item < items; item += kThreads) sum += partials[item];
  sum = block_sum(sum);
  if (threadIdx.x == 0) loss[0] = sum / static_cast<float>(count);
}

// ---- backward steps ---------------------------------------------------------------------------

__host__ __device__ __forceinline__ int64_t grad_rows_items(int64_t batch, int64_t length,
                                                            int64_t width) {
  return batch * ceil_div(length, kTile) * ceil_div(width, kTile);
}

// Work item = (b, word tile, column tile):
//   grad[b, i, c] = sum_j difference[b, i, j] c_hat[b, j, c].
__global__ void __launch_bounds__(kThreads)
grad_rows_kernel(const float* __restrict__ difference, const float* __restrict__ unit,
                 const bool* __restrict__ word_mask, int64_t batch, int64_t length, int64_t width,
                 float* __restrict__ grad) {
  __shared__ float difference_tile[kTile][kStride];  // [i][j]
  __shared__ float code_tile[kTile][kStride];        // [j][c]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t word_tiles = ceil_div(length, kTile), column_tiles = ceil_div(width, kTile);
  for (int64_t item = blockIdx.x; item < batch * word_tiles * column_tiles; item += gridDim.x) {
    const int64_t b = item / (word_tiles * column_tiles);
    const int64_t i0 = (item / column_tiles) % word_tiles * kTile;
    const int64_t col = item % column_tiles * kTile + lane;
    float acc[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.0f;
    for (int64_t j0 = 0; j0 < length; j0 += kTile) {
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kTile / kWarps; ++r) {
        const int row = warp + kWarps * r;
        const int64_t i = i0 + row, j = j0 + lane;
        difference_tile[row][lane] =
            i < length && j < length ? difference[(b * length + i) * length + j] : 0.0f;
        const int64_t word = j0 + row;
        const bool in = word < length && col < width;
        const float m = in && word_mask[b * length + word] ? 1.0f : 0.0f;
        code_tile[row][lane] = in ? unit[(b * length + word) * width + col] * m : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int jj = 0; jj < kTile; ++jj) {
        const float c = code_tile[jj][lane];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          acc[r] = fmaf(difference_tile[warp * kRowsPerWarp + r][jj], c, acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = i0 + warp * kRowsPerWarp + r;
      if (i < length && col < width) grad[(b * length + i) * width + col] = acc[r];
    }
  }
}

// A warp per word, in place: grad <- s * normalisation-backward(mask * coef * grad), with
// coef = 4 grad_loss / count.
__global__ void __launch_bounds__(kThreads)
grad_transform_kernel(const float* __restrict__ grad_loss, const float* __restrict__ unit,
                      const float* __restrict__ norm, const float* __restrict__ best_similarity,
                      const bool* __restrict__ word_mask, int64_t rows, int64_t width,
                      int64_t count, float* __restrict__ grad) {
  const int lane = threadIdx.x % 32;
  const float coef = 4.0f * grad_loss[0] / static_cast<float>(count);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float m = word_mask[row] ? 1.0f : 0.0f;
    const float length_u = norm[row];
    const float divisor = clamp_norm(length_u);
    const bool projects = length_u > kEps;
    const float s = best_similarity[row];
    const float* n = unit + row * width;
    float* g = grad + row * width;
    float dot = 0.0f;
    for (int64_t col = lane; col < width; col += 32) dot = fmaf(n[col], (g[col] * coef) * m, dot);
    dot = warp_sum(dot);
    for (int64_t col = lane; col < width; col += 32) {
      const float grad_unit = (g[col] * coef) * m;
      const float projected = grad_unit - n[col] * dot;
      g[col] = ((projects ? projected : grad_unit) / divisor) * s;
    }
  }
}

__host__ __device__ __forceinline__ int64_t scatter_items(int64_t batch, int64_t positions) {
  return batch * ceil_div(positions, kWarps);
}

// Work item = (b, 8 positions), a warp per position: grad_codes[b, p] = sum over the words i
// with chosen[b, i] == p, in increasing i, of grad[b, i] (zeros when no word chose p).
template <typename T>
__global__ void __launch_bounds__(kThreads)
scatter_kernel(const float* __restrict__ grad, const int64_t* __restrict__ chosen,
               int64_t batch, int64_t length, int64_t positions, int64_t width,
               T* __restrict__ grad_codes) {
  __shared__ int32_t chosen_tile[kThreads];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t groups = ceil_div(positions, kWarps);
  for (int64_t item = blockIdx.x; item < batch * groups; item += gridDim.x) {
    const int64_t b = item / groups;
    const int64_t position = item % groups * kWarps + warp;
    for (int64_t col0 = 0; col0 < width; col0 += 32) {
      const int64_t col = col0 + lane;
      float acc = 0.0f;
      for (int64_t word0 = 0; word0 < length; word0 += kThreads) {
        __syncthreads();  // the previous words are consumed
        const int64_t word = word0 + threadIdx.x;
        chosen_tile[threadIdx.x] =
            word < length ? static_cast<int32_t>(chosen[b * length + word]) : -1;
        __syncthreads();
        const int count = static_cast<int>(length - word0 < kThreads ? length - word0 : kThreads);
        for (int w = 0; w < count; ++w) {
          if (chosen_tile[w] == position && col < width) {
            acc += grad[(b * length + word0 + w) * width + col];
          }
        }
      }
      if (position < positions && col < width) {
        grad_codes[(b * positions + position) * width + col] = from_float<T>(acc);
      }
    }
  }
}

// ---- workspace --------------------------------------------------------------------------------

struct RelationLayout {
  size_t best, chosen, norm, unit, difference, partials, grad, total;
};


inline RelationLayout relation_layout(int64_t batch, int64_t length, int64_t width) {
  const size_t words = static_cast<size_t>(batch * length);
  RelationLayout layout;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t start = at;
    at += align_up(bytes);
    return start;
  };
  layout.best = take(words * sizeof(float));
  layout.chosen = take(words * sizeof(int64_t));
  layout.norm = take(words * sizeof(float));
  layout.unit = take(words * static_cast<size_t>(width) * sizeof(float));
  layout.difference = take(words * static_cast<size_t>(length) * sizeof(float));
  layout.partials = take(static_cast<size_t>(gram_items(batch, length)) * sizeof(float));
  layout.grad = take(words * static_cast<size_t>(width) * sizeof(float));
  layout.total = at;
  return layout;
}

inline bool valid_sizes(int64_t batch, int64_t length, int64_t positions, int64_t width) {
  return batch >= 0 && length >= 0 && width >= 0 && positions >= 1 && positions <= 0x7fffffff;
}

}  // namespace relation_detail

// ---- host launchers ---------------------------------------------------------------------------
#ifndef LGVQ_RELATION_KERNELS_ONLY

using namespace relation_detail;

template <typename T>
cudaError_t launch_normalize_rows(const T* in, int64_t rows, int64_t width, float* out,
                                  cudaStream_t stream) {
  if (rows < 0 || width < 0) return cudaErrorInvalidValue;
  if (rows == 0 || width == 0) return cudaSuccess;
  if (in == nullptr || out == nullptr) return cudaErrorInvalidValue;
  normalize_rows_kernel<T><<<grid_blocks(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(
      in, rows, width, out);
  return cudaGetLastError();
}

namespace {

// The steps both directions share: argmax, unit codes, Gram difference (and its partials).
template <typename T>
cudaError_t launch_common(const float* words_unit, const float* visual_unit, const T* codes,
                          const bool* word_mask, int64_t batch, int64_t length,
                          int64_t positions, int64_t width, int64_t* chosen, char* base,
                          const RelationLayout& layout, cudaStream_t stream) {
  float* best = reinterpret_cast<float*>(base + layout.best);
  float* norm = reinterpret_cast<float*>(base + layout.norm);
  float* unit = reinterpret_cast<float*>(base + layout.unit);
  float* difference = reinterpret_cast<float*>(base + layout.difference);
  float* partials = reinterpret_cast<float*>(base + layout.partials);
  const int64_t rows = batch * length;
  similarity_argmax_kernel<<<grid_blocks(batch * ceil_div(length, kTile)), kThreads, 0, stream>>>(
      words_unit, visual_unit, batch, length, positions, width, chosen, best);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  prepare_codes_kernel<T><<<grid_blocks(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(
      codes, chosen, best, rows, length, positions, width, unit, norm);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  gram_difference_kernel<<<grid_blocks(gram_items(batch, length)), kThreads, 0, stream>>>(
      words_unit, unit, word_mask, batch, length, width, difference, partials);
  return cudaGetLastError();
}

bool inputs_present(const float* words_unit, const float* visual_unit, const void* codes,
                    const bool* word_mask, int64_t width) {
  return width == 0 || (words_unit != nullptr && visual_unit != nullptr && codes != nullptr &&
                        word_mask != nullptr);
}

}  // namespace

template <typename T>
cudaError_t launch_relation_alignment_loss(const float* words_unit, const float* visual_unit,
                                           const T* codes, const bool* word_mask, int64_t batch,
                                           int64_t length, int64_t positions, int64_t width,
                                           float* loss, int64_t* chosen, void* workspace,
                                           size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_sizes(batch, length, positions, width)) return cudaErrorInvalidValue;
  if (batch * length == 0) return cudaSuccess;
  const RelationLayout layout = relation_layout(batch, length, width);
  if (!inputs_present(words_unit, visual_unit, codes, word_mask, width) || word_mask == nullptr ||
      loss == nullptr || chosen == nullptr || workspace == nullptr ||
      workspace_bytes < layout.total) {
    return cudaErrorInvalidValue;
  }
  char* base = static_cast<char*>(workspace);
  cudaError_t error = launch_common(words_unit, visual_unit, codes, word_mask, batch, length,
                                    positions, width, chosen, base, layout, stream);
  if (error != cudaSuccess) return error;
  loss_finish_kernel<<<1, kThreads, 0, stream>>>(
      reinterpret_cast<const float*>(base + layout.partials), gram_items(batch, length),
      batch * length * length, loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_relation_alignment_loss_backward(
    const float* grad_loss, const float* words_unit, const float* visual_unit, const T* codes,
    const bool* word_mask, int64_t batch, int64_t length, int64_t positions, int64_t width,
    T* grad_codes, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_sizes(batch, length, positions, width)) return cudaErrorInvalidValue;
  if (batch * length == 0 || width == 0) return cudaSuccess;
  const RelationLayout layout = relation_layout(batch, length, width);
  if (!inputs_present(words_unit, visual_unit, codes, word_mask, width) || word_mask == nullptr ||
      grad_loss == nullptr || grad_codes == nullptr || workspace == nullptr ||
      workspace_bytes < layout.total) {
    return cudaErrorInvalidValue;
  }
  char* base = static_cast<char*>(workspace);
  int64_t* chosen = reinterpret_cast<int64_t*>(base + layout.chosen);
  cudaError_t error = launch_common(words_unit, visual_unit, codes, word_mask, batch, length,
                                    positions, width, chosen, base, layout, stream);
  if (error != cudaSuccess) return error;
  float* grad = reinterpret_cast<float*>(base + layout.grad);
  grad_rows_kernel<<<grid_blocks(grad_rows_items(batch, length, width)), kThreads, 0, stream>>>(
      reinterpret_cast<const float*>(base + layout.difference),
      reinterpret_cast<const float*>(base + layout.unit), word_mask, batch, length, width, grad);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const int64_t rows = batch * length;
  grad_transform_kernel<<<grid_blocks(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(
      grad_loss, reinterpret_cast<const float*>(base + layout.unit),
      reinterpret_cast<const float*>(base + layout.norm),
      reinterpret_cast<const float*>(base + layout.best), word_mask, rows, width,
      batch * length * length, grad);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  scatter_kernel<T><<<grid_blocks(scatter_items(batch, positions)), kThreads, 0, stream>>>(
      grad, chosen, batch, length, positions, width, grad_codes);
  return cudaGetLastError();
}

size_t relation_alignment_workspace_bytes(int64_t batch, int64_t length, int64_t positions,
                                          int64_t width) {
  if (!relation_detail::valid_sizes(batch, length, positions, width)) return 0;
  return relation_detail::relation_layout(batch, length, width).total;
}

#define LGVQ_INSTANTIATE(T)                                                                      \
  template cudaError_t launch_normalize_rows<T>(const T*, int64_t, int64_t, float*,              \
                                                cudaStream_t);                                   \
  template cudaError_t launch_relation_alignment_loss<T>(                                        \
      const float*, const float*, const T*, const bool*, int64_t, int64_t, int64_t, int64_t,     \
      float*, int64_t*, void*, size_t, cudaStream_t);                                            \
  template cudaError_t launch_relation_alignment_loss_backward<T>(                               \
      const float*, const float*, const float*, const T*, const bool*, int64_t, int64_t,         \
      int64_t, int64_t, T*, void*, size_t, cudaStream_t);
LGVQ_FOR_EACH_KERNEL_DTYPE(LGVQ_INSTANTIATE)
#undef LGVQ_INSTANTIATE

#endif  // LGVQ_RELATION_KERNELS_ONLY

}  // namespace cuda
}  // namespace lgvq
