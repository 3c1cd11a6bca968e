// EMA codebook update on CUDA. Contract: codebook_ema.cuh. Formulas: lgvq_kernels/reference.py.
//
// Kernel 1, one block: the new cluster sizes, the dead mask and their total (float64, each thread
// a strided slice, then a fixed-order block reduction), written to a device scalar: no host sync.
// Kernel 2, one warp per code: the EMA of the sums (or the replacement) and the new code row.
//
// Pure CUDA on purpose (no torch headers): csrc/cuda/codebook_ema_cuda.cpp binds it to tensors.
#include "codebook_ema.cuh"
#include "common.cuh"

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lgvq {
namespace cuda {
namespace codebook_ema_detail {

using namespace ::lgvq::cuda::common;  // block shape, dtype conversions, ceil_div, align_up

constexpr float kTiny = 1.17549435e-38f;  // FLT_MIN, torch.finfo(float32).tiny

// Scalars of the update, rounded once on the host as the reference's tensor-scalar ops do.
struct EmaScalars {
  float keep;         // decay
  float take;         // 1 - decay
  float threshold;    // dead_threshold
  float eps;
  float codes_eps;    // k * eps
  bool replace;       // replacement given and dead_threshold > 0
};

inline EmaScalars make_scalars(int64_t k, double decay, double eps, double dead_threshold,
                               bool has_replacement) {
  EmaScalars s;
  s.keep = static_cast<float>(decay);
  s.take = static_cast<float>(1.0 - decay);
  s.threshold = static_cast<float>(dead_threshold);
  s.eps = static_cast<float>(eps);
  s.codes_eps = static_cast<float>(static_cast<double>(k) * eps);
  s.replace = has_replacement && dead_threshold > 0;
  return s;
}

// x * keep + take * y with both products rounded (no FMA), like mul_ then add_(alpha=).
__device__ __forceinline__ float ema(float x, float y, const EmaScalars& s) {
  return __fadd_rn(__fmul_rn(x, s.keep), __fmul_rn(s.take, y));
}

// One block of kThreads.
__global__ void __launch_bounds__(kThreads)
ema_cluster_size_kernel(const float* __restrict__ stats, float* __restrict__ cluster_size,
                        bool* __restrict__ dead, int64_t k, int64_t d, EmaScalars s,
                        float* __restrict__ total) {
  __shared__ double warp_sums[kWarps];
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < k; c += kThreads) {
    float size = ema(cluster_size[c], stats[c * (d + 1) + d], s);
    const bool is_dead = s.replace && size < s.threshold;
    if (is_dead) size = 1.0f;
    cluster_size[c] = size;
    dead[c] = is_dead;
    sum += static_cast<double>(size);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double block = warp_sums[0];
    for (int w = 1; w < kWarps; ++w) block += warp_sums[w];
    total[0] = static_cast<float>(block);
  }
}

inline unsigned int ema_code_blocks(int64_t k) {
  return static_cast<unsigned int>((k + kWarps - 1) / kWarps);
}

// One warp per code.
template <typename T>
__global__ void __launch_bounds__(kThreads)
ema_codebook_kernel(const float* __restrict__ stats, const float* __restrict__ cluster_size,
                    float* __restrict__ embed_sum, T* __restrict__ codebook,
                    const float* __restrict__ replacement, const bool* __restrict__ dead,
                    int64_t k, int64_t d, EmaScalars s, const float* __restrict__ total_ptr) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (c >= k) return;
  const float total = total_ptr[0];
  const float denominator = __fadd_rn(total, s.codes_eps);
  const float smoothed = __fmul_rn(__fdiv_rn(__fadd_rn(cluster_size[c], s.eps), denominator),
                                   total);
  // total == 0 (nothing ever counted), or NaN: the code keeps its value.
  const bool update = smoothed > 0.0f;
  const float divisor = smoothed > kTiny ? smoothed : kTiny;
  const bool is_dead = dead[c];
  float* sums = embed_sum + c * d;
  const float* batch = stats + c * (d + 1);
  T* out = codebook + c * d;
  for (int64_t col = lane; col < d; col += 32) {
    const float value = is_dead ? replacement[c * d + col] : ema(sums[col], batch[col], s);
    sums[col] = value;
    if (update) out[col] = from_float<T>(__fdiv_rn(value, divisor));
  }
}

}  // namespace codebook_ema_detail

// ---- host launchers ---------------------------------------------------------------------------
#ifndef LGVQ_CODEBOOK_EMA_KERNELS_ONLY

using namespace codebook_ema_detail;

size_t codebook_ema_workspace_bytes() { return kAlignment; }  // the float32 total

template <typename T>
cudaError_t launch_codebook_ema_update(const float* stats, float* cluster_size, float* embed_sum,
                                       T* codebook, const float* replacement, bool* dead,
                                       int64_t k, int64_t d, double decay, double eps,
                                       double dead_threshold, void* workspace,
                                       cudaStream_t stream) {
  if (k < 0 || k > 0x7fffffff || d < 0) return cudaErrorInvalidValue;
  if (k == 0) return cudaSuccess;
  if (stats == nullptr || cluster_size == nullptr || embed_sum == nullptr ||
      codebook == nullptr || dead == nullptr || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const EmaScalars s = make_scalars(k, decay, eps, dead_threshold, replacement != nullptr);
  float* total = static_cast<float*>(workspace);
  ema_cluster_size_kernel<<<1, kThreads, 0, stream>>>(stats, cluster_size, dead, k, d, s, total);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  ema_codebook_kernel<T><<<ema_code_blocks(k), kThreads, 0, stream>>>(
      stats, cluster_size, embed_sum, codebook, s.replace ? replacement : nullptr, dead, k, d, s,
      total);
  return cudaGetLastError();
}

#define LGVQ_INSTANTIATE(T)                                                                      \
  template cudaError_t launch_codebook_ema_update<T>(const float*, float*, float*, T*,           \
                                                     const float*, bool*, int64_t, int64_t,      \
                                                     double, double, double, void*, cudaStream_t);
LGVQ_FOR_EACH_KERNEL_DTYPE(LGVQ_INSTANTIATE)
#undef LGVQ_INSTANTIATE

#endif  // LGVQ_CODEBOOK_EMA_KERNELS_ONLY

}  // namespace cuda
}  // namespace lgvq
