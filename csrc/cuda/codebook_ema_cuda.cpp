// CUDA implementation of lgvq_C::codebook_ema_update_ (schema: csrc/registration.cpp), whose
// kernels live in codebook_ema.cu: checks the tensors (csrc/checks.h, then what only the kernels
// need), sets the device guard and calls the launcher of codebook_ema.cuh on the current stream.
// The update is in place and never synchronises with the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "binding.h"
#include "codebook_ema.cuh"

namespace lgvq {
namespace {

using namespace cuda_binding;

at::Tensor codebook_ema_update_cuda(const at::Tensor& stats, const at::Tensor& cluster_size,
                                   const at::Tensor& embed_sum, const at::Tensor& codebook,
                                   double decay, double eps, double dead_threshold,
                                   const std::optional<at::Tensor>& replacement_in) {
  constexpr const char* op = "codebook_ema_update_";
  const at::Device device = cuda_device(op, "codebook", codebook);
  check_ema_inputs(op, stats, cluster_size, embed_sum, codebook, replacement_in);
  const int64_t k = codebook.size(0), d = codebook.size(1);
  LGVQ_CHECK_VALUE(op, k <= std::numeric_limits<int32_t>::max(),
                   "the CUDA kernels support K <= 2^31 - 1 codes, got K = ", k);
  check_contiguous(op, "stats", stats);
  check_contiguous(op, "cluster_size (updated in place)", cluster_size);
  check_contiguous(op, "embed_sum (updated in place)", embed_sum);
  check_contiguous(op, "codebook (updated in place)", codebook);
  at::Tensor replacement;
  if (has_value(replacement_in) && dead_threshold > 0) {
    replacement = replacement_in->to(at::kFloat).contiguous();
  }

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor dead = at::empty({k}, cluster_size.options().dtype(at::kBool));
  if (k == 0) return dead;
  const size_t bytes = cuda::codebook_ema_workspace_bytes();
  const at::Tensor scratch = workspace(codebook, bytes);
  const float* replacement_ptr =
      replacement.defined() ? replacement.const_data_ptr<float>() : nullptr;
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, codebook.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_codebook_ema_update(
        stats.const_data_ptr<float>(), cluster_size.mutable_data_ptr<float>(),
        embed_sum.mutable_data_ptr<float>(), mutable_data<T>(codebook), replacement_ptr,
        dead.mutable_data_ptr<bool>(), k, d, decay, eps, dead_threshold,
        scratch.mutable_data_ptr(), current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return dead;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CUDA, m) {
  m.impl("codebook_ema_update_", &codebook_ema_update_cuda);
}

}  // namespace lgvq
