// CUDA implementations of lgvq_C::relation_alignment_loss and its backward (schemas:
// csrc/registration.cpp), whose kernels live in relation.cu: check the tensors (csrc/checks.h,
// then what only the kernels need), set the device guard, normalise words and visual into
// float32 (each in its own dtype) and call the launchers of relation.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <tuple>

#include "binding.h"
#include "relation.cuh"

namespace lgvq {
namespace {

using namespace cuda_binding;

struct RelationShape {
  int64_t batch, length, positions, width;
};

RelationShape check_inputs(const char* op, const at::Tensor& words, const at::Tensor& visual,
                           const at::Tensor& codes, const at::Tensor& word_mask) {
  cuda_device(op, "codes", codes);
  check_relation_inputs(op, words, visual, codes, word_mask);
  const RelationShape s{words.size(0), words.size(1), visual.size(1), words.size(2)};
  LGVQ_CHECK_VALUE(op, s.positions <= std::numeric_limits<int32_t>::max(),
                   "the CUDA kernels support up to 2^31 - 1 positions (M), got shape ",
                   visual.sizes());
  check_contiguous(op, "words", words);
  check_contiguous(op, "visual", visual);
  check_contiguous(op, "codes", codes);
  check_contiguous(op, "word_mask", word_mask);
  return s;
}

// What both directions launch with, on the current device and stream: words and visual as
// float32 unit rows, and the workspace.
struct RelationBuffers {
  cudaStream_t stream;
  at::Tensor words_unit, visual_unit, scratch;
  size_t bytes;
};

// Float32 unit rows of `t` ([B, rows, C]) on `stream`.
at::Tensor normalized_rows(const char* op, const at::Tensor& t, cudaStream_t stream) {
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const int64_t rows = t.size(0) * t.size(1), width = t.size(2);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, t.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_normalize_rows(data<T>(t), rows, width, out.mutable_data_ptr<float>(),
                                        stream);
  });
  C10_CUDA_CHECK(error);
  return out;
}

RelationBuffers relation_buffers(const char* op, const at::Tensor& words,
                                 const at::Tensor& visual, const at::Tensor& codes,
                                 const RelationShape& s) {
  const cudaStream_t stream = current_stream(codes.device());
  const size_t bytes =
      cuda::relation_alignment_workspace_bytes(s.batch, s.length, s.positions, s.width);
  return {stream, normalized_rows(op, words, stream), normalized_rows(op, visual, stream),
          workspace(codes, bytes), bytes};
}

std::tuple<at::Tensor, at::Tensor> relation_alignment_loss_cuda(const at::Tensor& words,
                                                                const at::Tensor& visual,
                                                                const at::Tensor& codes,
                                                                const at::Tensor& word_mask) {
  constexpr const char* op = "relation_alignment_loss";
  const RelationShape s = check_inputs(op, words, visual, codes, word_mask);
  const c10::cuda::OptionalCUDAGuard device_guard(codes.device());
  const auto float_options = codes.options().dtype(at::kFloat);
  at::Tensor chosen = at::empty({s.batch, s.length}, codes.options().dtype(at::kLong));
  if (s.batch * s.length == 0) return {at::zeros({}, float_options), chosen};
  at::Tensor loss = at::empty({}, float_options);
  const RelationBuffers b = relation_buffers(op, words, visual, codes, s);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, codes.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_relation_alignment_loss(
        b.words_unit.const_data_ptr<float>(), b.visual_unit.const_data_ptr<float>(),
        data<T>(codes), word_mask.const_data_ptr<bool>(), s.batch, s.length, s.positions,
        s.width, loss.mutable_data_ptr<float>(), chosen.mutable_data_ptr<int64_t>(),
        b.scratch.mutable_data_ptr(), b.bytes, b.stream);
  });
  C10_CUDA_CHECK(error);
  return {loss, chosen};
}

at::Tensor relation_alignment_loss_backward_cuda(const at::Tensor& grad_loss_in,
                                                 const at::Tensor& words,
                                                 const at::Tensor& visual,
                                                 const at::Tensor& codes,
                                                 const at::Tensor& word_mask) {
  constexpr const char* op = "relation_alignment_loss_backward";
  const RelationShape s = check_inputs(op, words, visual, codes, word_mask);
  check_device(op, "grad_loss", grad_loss_in, codes.device());
  check_scalar(op, "grad_loss", grad_loss_in);
  const at::Tensor grad_loss = float32_scalar(grad_loss_in);
  const c10::cuda::OptionalCUDAGuard device_guard(codes.device());
  if (s.batch * s.length == 0 || s.width == 0) return at::zeros(codes.sizes(), codes.options());
  at::Tensor grad_codes = at::empty(codes.sizes(), codes.options());
  const RelationBuffers b = relation_buffers(op, words, visual, codes, s);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, codes.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = cuda::launch_relation_alignment_loss_backward(
        grad_loss.const_data_ptr<float>(), b.words_unit.const_data_ptr<float>(),
        b.visual_unit.const_data_ptr<float>(), data<T>(codes), word_mask.const_data_ptr<bool>(),
        s.batch, s.length, s.positions, s.width, mutable_data<T>(grad_codes),
        b.scratch.mutable_data_ptr(), b.bytes, b.stream);
  });
  C10_CUDA_CHECK(error);
  return grad_codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CUDA, m) {
  m.impl("relation_alignment_loss", &relation_alignment_loss_cuda);
  m.impl("relation_alignment_loss_backward", &relation_alignment_loss_backward_cuda);
}

}  // namespace lgvq
