// What the CUDA bindings (csrc/cuda/*_cuda.cpp: one per kernel file) share between the op
// contracts of csrc/checks.h and the raw-pointer launchers of the .cu files: the checks that only
// the CUDA kernels need (a CUDA device, contiguous layout, 32-bit sizes), the dispatch of a torch
// dtype to the CUDA element type, and the allocator, stream and pointer plumbing. Layout is
// normalised in Python (lgvq_kernels.functional); here it is only checked. Nothing here
// synchronises with the host.
//
// The current stream comes from c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is the same
// function re-exported by ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS/cuSPARSE headers
// that nothing here needs).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>

#include "../checks.h"

namespace lgvq::cuda_binding {

using namespace ::lgvq::checks;

// The sort keys and row numbers of the segment sums, and the launchers' grid sizes, are 32-bit.
constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxCodes = std::numeric_limits<int32_t>::max() - 1;  // k is a sort key too

// The device of the op's leading tensor, which must be a CUDA one (the others are checked
// against it by the op contract).
inline at::Device cuda_device(const char* op, const char* name, const at::Tensor& t) {
  LGVQ_CHECK_VALUE(op, t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  return t.device();
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  LGVQ_CHECK_VALUE(op, t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(),
                   " for shape ", t.sizes());
}

// Calls f(T{}) with T the CUDA element type of `dtype` (float, __half or __nv_bfloat16); the op
// contract has already turned every other dtype away.
template <typename F>
void dispatch_kernel_dtype(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      LGVQ_CHECK_TYPE(op, false, "no CUDA kernel for dtype ", dtype_name(dtype));
  }
}

// at::Half and at::BFloat16 have the bits of __half and __nv_bfloat16.
template <typename T>
const T* data(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// A one-element gradient scalar (already checked) as a float32 tensor the kernels read in place.
inline at::Tensor float32_scalar(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Scratch memory from the caching allocator, on the device of `like`.
inline at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

inline cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

}  // namespace lgvq::cuda_binding
