// CUDA implementations of the lgvq_C ops whose kernels live in quantize.cu (schemas:
// csrc/registration.cpp): quantize_straight_through, its backward, and codebook_statistics (the
// per-code segment sums share the backward's sort). Each checks its tensors (csrc/checks.h, then
// what only the kernels need), sets the device guard, takes scratch memory from the caching
// allocator and calls the launchers of quantize.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "binding.h"
#include "quantize.cuh"

namespace lgvq {
namespace {

using namespace cuda_binding;

// What the kernels need beyond the op contract: contiguous rows and 32-bit row and code counts.
void check_kernel_rows(const char* op, const at::Tensor& x, const at::Tensor& indices,
                       const std::optional<at::Tensor>& mask) {
  check_contiguous(op, "x", x);
  check_contiguous(op, "indices", indices);
  if (has_value(mask)) check_contiguous(op, "mask", *mask);
  LGVQ_CHECK_VALUE(op, x.size(0) <= kMaxRows,
                   "the CUDA kernels support N <= 2^31 - 1 rows, got N = ", x.size(0));
}

void check_kernel_codebook(const char* op, const at::Tensor& codebook) {
  LGVQ_CHECK_VALUE(op, codebook.size(0) >= 1 && codebook.size(0) <= kMaxCodes,
                   "codebook must hold 1 to 2^31 - 2 codes, got shape ", codebook.sizes());
  check_contiguous(op, "codebook", codebook);
}

std::tuple<at::Tensor, at::Tensor> quantize_straight_through_cuda(
    const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& indices,
    const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "quantize_straight_through";
  const at::Device device = cuda_device(op, "x", x);
  check_quantize_inputs(op, x, codebook, indices, mask);
  check_kernel_codebook(op, codebook);
  check_kernel_rows(op, x, indices, mask);
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor quantized = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) return {quantized, at::zeros({}, x.options().dtype(at::kFloat))};
  at::Tensor squared_error = at::empty({}, x.options().dtype(at::kFloat));
  const size_t bytes = cuda::quantize_forward_workspace_bytes(n, d);
  const at::Tensor scratch = workspace(x, bytes);
  const bool* mask_ptr = has_value(mask) ? mask->const_data_ptr<bool>() : nullptr;
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_quantize_straight_through(
        data<T>(x), data<T>(codebook), indices.const_data_ptr<int64_t>(), mask_ptr, n, k, d,
        mutable_data<T>(quantized), squared_error.mutable_data_ptr<float>(),
        scratch.mutable_data_ptr(), bytes, current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return {quantized, squared_error};
}

std::tuple<at::Tensor, at::Tensor> quantize_straight_through_backward_cuda(
    const std::optional<at::Tensor>& grad_quantized_in, const at::Tensor& grad_commitment_in,
    const at::Tensor& grad_codebook_loss_in, const at::Tensor& x, const at::Tensor& codebook,
    const at::Tensor& indices, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "quantize_straight_through_backward";
  const at::Device device = cuda_device(op, "x", x);
  check_quantize_inputs(op, x, codebook, indices, mask);
  check_quantize_gradients(op, grad_quantized_in, grad_commitment_in, grad_codebook_loss_in, x);
  check_kernel_codebook(op, codebook);
  check_kernel_rows(op, x, indices, mask);
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  const at::Tensor grad_commitment = float32_scalar(grad_commitment_in);
  const at::Tensor grad_codebook_loss = float32_scalar(grad_codebook_loss_in);
  // Autograd hands the gradient in x's dtype; any other dtype is converted once here.
  const at::Tensor grad_quantized = has_value(grad_quantized_in)
                                        ? grad_quantized_in->to(x.scalar_type()).contiguous()
                                        : at::Tensor();

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor grad_x = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) return {grad_x, at::zeros({k, d}, codebook.options())};
  at::Tensor grad_codebook = at::empty({k, d}, codebook.options());
  size_t bytes = 0;
  C10_CUDA_CHECK(cuda::quantize_backward_workspace_bytes(n, k, d, &bytes));
  const at::Tensor scratch = workspace(x, bytes);
  const bool* mask_ptr = has_value(mask) ? mask->const_data_ptr<bool>() : nullptr;
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_quantize_straight_through_backward(
        grad_quantized.defined() ? data<T>(grad_quantized) : nullptr,
        grad_commitment.const_data_ptr<float>(), grad_codebook_loss.const_data_ptr<float>(),
        data<T>(x), data<T>(codebook), indices.const_data_ptr<int64_t>(), mask_ptr, n, k, d,
        mutable_data<T>(grad_x), mutable_data<T>(grad_codebook), scratch.mutable_data_ptr(),
        bytes, current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return {grad_x, grad_codebook};
}

at::Tensor codebook_statistics_cuda(const at::Tensor& x, const at::Tensor& indices,
                                    int64_t num_codes, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "codebook_statistics";
  const at::Device device = cuda_device(op, "x", x);
  check_statistics_inputs(op, x, indices, num_codes, mask);
  LGVQ_CHECK_VALUE(op, num_codes <= kMaxCodes, "the CUDA kernels support num_codes <= 2^31 - 2, "
                   "got ", num_codes);
  check_kernel_rows(op, x, indices, mask);
  const int64_t n = x.size(0), d = x.size(1);

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  const auto options = x.options().dtype(at::kFloat);
  if (n == 0 || num_codes == 0) return at::zeros({num_codes, d + 1}, options);
  at::Tensor stats = at::empty({num_codes, d + 1}, options);
  size_t bytes = 0;
  C10_CUDA_CHECK(cuda::codebook_statistics_workspace_bytes(n, num_codes, d, &bytes));
  const at::Tensor scratch = workspace(x, bytes);
  const bool* mask_ptr = has_value(mask) ? mask->const_data_ptr<bool>() : nullptr;
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_codebook_statistics(
        data<T>(x), indices.const_data_ptr<int64_t>(), mask_ptr, n, num_codes, d,
        stats.mutable_data_ptr<float>(), scratch.mutable_data_ptr(), bytes,
        current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CUDA, m) {
  m.impl("quantize_straight_through", &quantize_straight_through_cuda);
  m.impl("quantize_straight_through_backward", &quantize_straight_through_backward_cuda);
  m.impl("codebook_statistics", &codebook_statistics_cuda);
}

}  // namespace lgvq
