// CUDA implementation of lgvq_C::nearest_code (schema: csrc/registration.cpp), whose kernels live
// in nearest_code.cu: checks the tensors (csrc/checks.h, then what only the kernels need), sets
// the device guard and calls the launcher of nearest_code.cuh for the input dtype on the current
// stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "binding.h"
#include "nearest_code.cuh"

namespace lgvq {
namespace {

using namespace cuda_binding;

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(
    const at::Tensor& x, const at::Tensor& codebook,
    const std::optional<at::Tensor>& codebook_sqnorm, bool cosine) {
  constexpr const char* op = "nearest_code";
  const at::Device device = cuda_device(op, "x", x);
  check_nearest_code_inputs(op, x, codebook, codebook_sqnorm, cosine);
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  LGVQ_CHECK_VALUE(op, k <= std::numeric_limits<int32_t>::max(),
                   "the CUDA kernel supports K <= 2^31 - 1 codes, got K = ", k);
  check_contiguous(op, "x", x);
  check_contiguous(op, "codebook", codebook);
  const float* sqnorm = nullptr;  // cosine ignores codebook_sqnorm, as the schema says
  if (!cosine && has_value(codebook_sqnorm)) {
    check_dtype(op, "codebook_sqnorm", *codebook_sqnorm, at::kFloat);
    check_contiguous(op, "codebook_sqnorm", *codebook_sqnorm);
    sqnorm = codebook_sqnorm->const_data_ptr<float>();
  }

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, x.options().dtype(at::kFloat));
  if (n == 0) return {indices, distances};
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_nearest_code(data<T>(x), data<T>(codebook), sqnorm, n, k, d, cosine,
                                      indices.mutable_data_ptr<int64_t>(),
                                      distances.mutable_data_ptr<float>(),
                                      current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return {indices, distances};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CUDA, m) { m.impl("nearest_code", &nearest_code_cuda); }

}  // namespace lgvq
