// Nearest codebook entry on CUDA: raw-pointer launchers (pure CUDA, no torch headers).
// The tensor binding is csrc/cuda/nearest_code_cuda.cpp; semantics are those of the
// lgvq_C::nearest_code schema in csrc/registration.cpp.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lgvq {
namespace cuda {

// x [n, d] and codebook [k, d]: contiguous, row-major, same element type (no alignment
// beyond the element's own is assumed). sqnorm_or_null: [k] float32 squared norms of the
// codes, or nullptr to compute them in the kernel (ignored when cosine). Accumulates in fp32.
//   cosine == false: index = argmin_k (sqnorm[k] - 2 x.c_k),
//                    distance = max(|x|^2 - 2 x.c + sqnorm, 0)
//   cosine == true:  rows are unit vectors; index = argmax_k x.c_k, distance = 1 - x.c
// Ties go to the lowest index; a non-finite score never wins unless every score of the row is
// non-finite, in which case index 0 and its (usually non-finite) distance are returned.
// Outputs: indices [n] int64 (used as scratch for packed (score, index) keys during the search),
// distances [n] float32. Requires n >= 0, 1 <= k <= INT32_MAX, d >= 1 (else
// cudaErrorInvalidValue); n == 0 launches nothing. Runs on the current device (the caller sets
// it) and on `stream`: a memset and two kernels; returns the first launch error, if any.
// T: float, __half or __nv_bfloat16 (instantiated in nearest_code.cu).
template <typename T>
cudaError_t launch_nearest_code(const T* x, const T* codebook, const float* sqnorm_or_null,
                                int64_t n, int64_t k, int64_t d, bool cosine, int64_t* indices,
                                float* distances, cudaStream_t stream);

}  // namespace cuda
}  // namespace lgvq
