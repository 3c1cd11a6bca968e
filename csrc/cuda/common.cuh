// What the CUDA kernel files (nearest_code.cu, quantize.cu, codebook_ema.cu, relation.cu) share:
// the block shape, the storage dtypes and their float conversions, integer ceil-division and
// workspace alignment. Pure CUDA (no torch headers), so the host-emulation harness compiles it
// too.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Instantiates M(T) for every storage dtype the CUDA kernels take (float64 stays on the CPU).
#define LGVQ_FOR_EACH_KERNEL_DTYPE(M) M(float) M(__half) M(__nv_bfloat16)

namespace lgvq {
namespace cuda {
namespace common {

// Every kernel runs blocks of 8 warps (the emulation harness, tests/kernels/cuda_harness, runs
// blocks of this size too).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp takes part in a shuffle

// Workspace sections start on this boundary (what the caching allocator hands out).
constexpr size_t kAlignment = 256;
__host__ __device__ __forceinline__ size_t align_up(size_t bytes) {
  return (bytes + kAlignment - 1) / kAlignment * kAlignment;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// float -> storage dtype, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace common
}  // namespace cuda
}  // namespace lgvq
