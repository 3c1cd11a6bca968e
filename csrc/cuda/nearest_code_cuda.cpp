// CUDA implementation of lgvq_C::nearest_code (schema: csrc/registration.cpp): checks the tensors,
// then calls the raw-pointer launcher of csrc/cuda/nearest_code.cu for the input dtype.
// Layout is normalised in Python (lgvq_kernels.functional); here it is only checked.
//
// The current stream comes from c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is the same
// function re-exported by ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS/cuSPARSE headers
// that nothing here needs).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "nearest_code.cuh"

namespace {

#define LGVQ_CHECK_CUDA_TENSOR(name, tensor, device)                                          \
  TORCH_CHECK((tensor).is_cuda() && (tensor).device() == (device), "nearest_code: " name     \
              " must be on ", (device), " (the device of x), got ", (tensor).device())
#define LGVQ_CHECK_CONTIGUOUS(name, tensor)                                                   \
  TORCH_CHECK((tensor).is_contiguous(), "nearest_code: " name " must be contiguous, got "    \
              "strides ", (tensor).strides(), " for shape ", (tensor).sizes())

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(
    const at::Tensor& x, const at::Tensor& codebook,
    const std::optional<at::Tensor>& codebook_sqnorm, bool cosine) {
  TORCH_CHECK(x.is_cuda(), "nearest_code: x must be a CUDA tensor, got device ", x.device());
  const at::Device device = x.device();
  LGVQ_CHECK_CUDA_TENSOR("codebook", codebook, device);
  TORCH_CHECK(x.dim() == 2, "nearest_code: x must be 2-D [N, D], got shape ", x.sizes());
  TORCH_CHECK(codebook.dim() == 2, "nearest_code: codebook must be 2-D [K, D], got shape ",
              codebook.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype != at::kDouble,
              "nearest_code: x has dtype float64, which the CUDA kernel does not support; expected "
              "float32, float16 or bfloat16 (float64 runs on the CPU and reference backends)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "nearest_code: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(codebook.scalar_type() == dtype, "nearest_code: codebook must have the dtype of x (",
              dtype, "), got ", codebook.scalar_type());
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  TORCH_CHECK(d >= 1, "nearest_code: x must have D >= 1 columns, got shape ", x.sizes());
  TORCH_CHECK(codebook.size(1) == d, "nearest_code: codebook must be [K, ", d,
              "] to match x [N, ", d, "], got shape ", codebook.sizes());
  TORCH_CHECK(k >= 1, "nearest_code: codebook must hold at least one code (K >= 1), got shape ",
              codebook.sizes());
  TORCH_CHECK(k <= std::numeric_limits<int32_t>::max(),
              "nearest_code: the CUDA kernel supports K <= 2^31 - 1 codes, got K = ", k);
  LGVQ_CHECK_CONTIGUOUS("x", x);
  LGVQ_CHECK_CONTIGUOUS("codebook", codebook);

  const float* sqnorm = nullptr;  // cosine ignores codebook_sqnorm, as the schema says
  if (!cosine && codebook_sqnorm.has_value()) {
    const at::Tensor& norms = *codebook_sqnorm;
    LGVQ_CHECK_CUDA_TENSOR("codebook_sqnorm", norms, device);
    TORCH_CHECK(norms.dim() == 1 && norms.size(0) == k, "nearest_code: codebook_sqnorm must have "
                "shape [", k, "] (one norm per code), got ", norms.sizes());
    TORCH_CHECK(norms.scalar_type() == at::kFloat, "nearest_code: codebook_sqnorm must be "
                "float32 for ", dtype, " inputs, got ", norms.scalar_type());
    LGVQ_CHECK_CONTIGUOUS("codebook_sqnorm", norms);
    sqnorm = norms.const_data_ptr<float>();
  }

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, x.options().dtype(at::kFloat));
  if (n == 0) return {indices, distances};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  int64_t* indices_ptr = indices.mutable_data_ptr<int64_t>();
  float* distances_ptr = distances.mutable_data_ptr<float>();
  cudaError_t error = cudaSuccess;
  switch (dtype) {
    case at::kFloat:
      error = lgvq::cuda::launch_nearest_code_f32(x.const_data_ptr<float>(),
                                                  codebook.const_data_ptr<float>(), sqnorm, n, k,
                                                  d, cosine, indices_ptr, distances_ptr, stream);
      break;
    case at::kHalf:
      error = lgvq::cuda::launch_nearest_code_f16(
          reinterpret_cast<const __half*>(x.const_data_ptr<at::Half>()),
          reinterpret_cast<const __half*>(codebook.const_data_ptr<at::Half>()), sqnorm, n, k, d,
          cosine, indices_ptr, distances_ptr, stream);
      break;
    case at::kBFloat16:
      error = lgvq::cuda::launch_nearest_code_bf16(
          reinterpret_cast<const __nv_bfloat16*>(x.const_data_ptr<at::BFloat16>()),
          reinterpret_cast<const __nv_bfloat16*>(codebook.const_data_ptr<at::BFloat16>()), sqnorm,
          n, k, d, cosine, indices_ptr, distances_ptr, stream);
      break;
    default:
      TORCH_CHECK(false, "nearest_code: unreachable dtype ", dtype);
  }
  C10_CUDA_CHECK(error);
  return {indices, distances};
}

#undef LGVQ_CHECK_CUDA_TENSOR
#undef LGVQ_CHECK_CONTIGUOUS

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CUDA, m) { m.impl("nearest_code", &nearest_code_cuda); }
