// EMA codebook update on CUDA: raw-pointer launchers (pure CUDA, no torch headers). The tensor
// binding is csrc/cuda/codebook_ema_cuda.cpp; semantics are those of lgvq_C::codebook_ema_update_
// (csrc/registration.cpp) and lgvq_kernels/reference.py. The packed statistics it consumes come
// from launch_codebook_statistics (quantize.cuh: the per-code segment sums live with the
// quantizer's backward, which shares their sort).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lgvq {
namespace cuda {

// In place, float32 EMA state; k codes of d >= 0 columns, all arrays contiguous:
//   stats [k, d + 1] float32 (sums, then the count), cluster_size [k], embed_sum [k, d],
//   codebook [k, d] (float, __half or __nv_bfloat16; overwritten), replacement [k, d] float32 or
//   nullptr, dead [k] bool (output).
// With keep = (float)decay, take = (float)(1 - decay):
//   cluster_size = cluster_size * keep + take * count
//   dead         = replacement && dead_threshold > 0 && cluster_size < (float)dead_threshold
//   dead codes:  cluster_size = 1, embed_sum = replacement
//   others:      embed_sum = embed_sum * keep + take * sums
//   total        = sum(cluster_size)  (float64 accumulation in a fixed order, then float32)
//   smoothed     = (cluster_size + eps) / (total + (float)(k * eps)) * total
//   codebook     = embed_sum / max(smoothed, FLT_MIN) where smoothed > 0 (else unchanged)
// Products and sums are rounded separately (no FMA contraction), as the reference does.
// Two kernels, no host synchronisation (total stays on the device, in `workspace`: at least
// codebook_ema_workspace_bytes()). k == 0 launches nothing. Requires 0 <= k <= INT32_MAX.
size_t codebook_ema_workspace_bytes();
// T (the codebook's dtype): float, __half or __nv_bfloat16 (instantiated in codebook_ema.cu).
template <typename T>
cudaError_t launch_codebook_ema_update(const float* stats, float* cluster_size, float* embed_sum,
                                       T* codebook, const float* replacement, bool* dead,
                                       int64_t k, int64_t d, double decay, double eps,
                                       double dead_threshold, void* workspace,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace lgvq
