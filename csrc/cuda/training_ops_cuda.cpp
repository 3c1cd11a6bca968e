// CUDA implementations of the lgvq_C training ops (schemas: csrc/registration.cpp):
// quantize_straight_through and its backward, codebook_statistics, codebook_ema_update_,
// relation_alignment_loss and its backward. Each checks its tensors (messages name the
// argument), sets the device guard, takes scratch memory from the caching allocator and calls the
// raw-pointer launchers of quantize.cu, codebook_ema.cu and relation.cu on the current stream.
// Layout is normalised in Python (lgvq_kernels.functional); here it is only checked. Nothing here
// synchronises with the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "codebook_ema.cuh"
#include "quantize.cuh"
#include "relation.cuh"

namespace {

constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();  // the sort's row numbers
constexpr int64_t kMaxCodes = std::numeric_limits<int32_t>::max() - 1;  // k is a sort key too

#define LGVQ_CHECK(op, cond, ...) \
  TORCH_CHECK_VALUE(cond, "lgvq_C::", op, " (CUDA): ", __VA_ARGS__)
#define LGVQ_CHECK_TYPE(op, cond, ...) \
  TORCH_CHECK_TYPE(cond, "lgvq_C::", op, " (CUDA): ", __VA_ARGS__)

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  LGVQ_CHECK(op, t.is_cuda() && t.device() == device, name, " must be on ", device, ", got ",
             t.device());
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  LGVQ_CHECK(op, t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(),
             " for shape ", t.sizes());
}

// float32, float16 or bfloat16; float64 is named as such (it runs on the CPU and reference
// backends only).
void check_kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  LGVQ_CHECK_TYPE(op, dtype != at::kDouble, name, " has dtype float64, which the CUDA kernels "
                  "do not support; expected float32, float16 or bfloat16 (float64 runs on the "
                  "CPU and reference backends)");
  LGVQ_CHECK_TYPE(op, dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                  " must be float32, float16 or bfloat16, got ", dtype);
}

void check_float32(const char* op, const char* name, const at::Tensor& t) {
  LGVQ_CHECK_TYPE(op, t.scalar_type() == at::kFloat, name, " must be float32 on CUDA, got ",
                  t.scalar_type(), t.scalar_type() == at::kDouble
                                       ? " (float64 state runs on the CPU and reference backends)"
                                       : "");
}

// A one-element gradient scalar on `device`, as a float32 tensor the kernels read in place.
at::Tensor device_scalar(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device) {
  check_device(op, name, t, device);
  LGVQ_CHECK(op, t.numel() == 1, name, " must be a scalar (0-d) tensor, got shape ", t.sizes());
  LGVQ_CHECK_TYPE(op, at::isFloatingType(t.scalar_type()), name, " must be a float tensor, got ",
                  t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// indices [n] int64 and mask [n] bool (or none) on `device`, contiguous. Returns the mask's data.
const bool* check_rows(const char* op, const at::Tensor& indices,
                       const std::optional<at::Tensor>& mask, int64_t n,
                       const at::Device& device) {
  check_device(op, "indices", indices, device);
  LGVQ_CHECK(op, indices.dim() == 1 && indices.size(0) == n, "indices must be [N] = [", n,
             "] (one per row of x), got shape ", indices.sizes());
  LGVQ_CHECK_TYPE(op, indices.scalar_type() == at::kLong, "indices must be int64, got ",
                  indices.scalar_type());
  check_contiguous(op, "indices", indices);
  LGVQ_CHECK(op, n <= kMaxRows, "the CUDA kernels support N <= 2^31 - 1 rows, got N = ", n);
  if (!mask.has_value() || !mask->defined()) return nullptr;
  check_device(op, "mask", *mask, device);
  LGVQ_CHECK(op, mask->dim() == 1 && mask->size(0) == n, "mask must be [N] = [", n,
             "], got shape ", mask->sizes());
  LGVQ_CHECK_TYPE(op, mask->scalar_type() == at::kBool, "mask must be bool, got ",
                  mask->scalar_type());
  check_contiguous(op, "mask", *mask);
  return mask->const_data_ptr<bool>();
}

// Calls f(T{}) with T the CUDA element type of `dtype` (float, __half or __nv_bfloat16).
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
      TORCH_CHECK(false, "lgvq_C::", op, " (CUDA): unreachable dtype ", dtype);
  }
}

template <typename T>
const T* data(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// ---- quantize_straight_through -----------------------------------------------------------------

// x [N, D] and codebook [K >= 1, D] on one device, same kernel dtype, contiguous.
void check_quantize_inputs(const char* op, const at::Tensor& x, const at::Tensor& codebook) {
  LGVQ_CHECK(op, x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  check_device(op, "codebook", codebook, x.device());
  LGVQ_CHECK(op, x.dim() == 2, "x must be [N, D], got shape ", x.sizes());
  LGVQ_CHECK(op, codebook.dim() == 2, "codebook must be [K, D], got shape ", codebook.sizes());
  LGVQ_CHECK(op, codebook.size(1) == x.size(1), "x is [N, ", x.size(1), "] but codebook is [K, ",
             codebook.size(1), "]: D must match");
  LGVQ_CHECK(op, codebook.size(0) >= 1 && codebook.size(0) <= kMaxCodes,
             "codebook must hold 1 to 2^31 - 2 codes, got shape ", codebook.sizes());
  check_kernel_dtype(op, "x", x);
  LGVQ_CHECK_TYPE(op, codebook.scalar_type() == x.scalar_type(), "codebook must have the dtype "
                  "of x (", x.scalar_type(), "), got ", codebook.scalar_type());
  check_contiguous(op, "x", x);
  check_contiguous(op, "codebook", codebook);
}

std::tuple<at::Tensor, at::Tensor> quantize_straight_through_cuda(
    const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& indices,
    const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "quantize_straight_through";
  check_quantize_inputs(op, x, codebook);
  const at::Device device = x.device();
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  const bool* mask_ptr = check_rows(op, indices, mask, n, device);

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor quantized = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) return {quantized, at::zeros({}, x.options().dtype(at::kFloat))};
  at::Tensor squared_error = at::empty({}, x.options().dtype(at::kFloat));
  const size_t bytes = lgvq::cuda::quantize_forward_workspace_bytes(n, d);
  const at::Tensor scratch = workspace(x, bytes);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = lgvq::cuda::launch_quantize_straight_through(
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
  check_quantize_inputs(op, x, codebook);
  const at::Device device = x.device();
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  const bool* mask_ptr = check_rows(op, indices, mask, n, device);
  const at::Tensor grad_commitment =
      device_scalar(op, "grad_commitment", grad_commitment_in, device);
  const at::Tensor grad_codebook_loss =
      device_scalar(op, "grad_codebook_loss", grad_codebook_loss_in, device);
  at::Tensor grad_quantized;
  if (grad_quantized_in.has_value() && grad_quantized_in->defined()) {
    const at::Tensor& g = *grad_quantized_in;
    check_device(op, "grad_quantized", g, device);
    LGVQ_CHECK(op, g.sizes() == x.sizes(), "grad_quantized must have x's shape ", x.sizes(),
               ", got ", g.sizes());
    LGVQ_CHECK_TYPE(op, at::isFloatingType(g.scalar_type()),
                    "grad_quantized must be a float tensor, got ", g.scalar_type());
    // Autograd hands the gradient in x's dtype; any other dtype is converted once here.
    grad_quantized = g.to(x.scalar_type()).contiguous();
  }

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor grad_x = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) return {grad_x, at::zeros({k, d}, codebook.options())};
  at::Tensor grad_codebook = at::empty({k, d}, codebook.options());
  size_t bytes = 0;
  C10_CUDA_CHECK(lgvq::cuda::quantize_backward_workspace_bytes(n, k, d, &bytes));
  const at::Tensor scratch = workspace(x, bytes);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = lgvq::cuda::launch_quantize_straight_through_backward(
        grad_quantized.defined() ? data<T>(grad_quantized) : nullptr,
        grad_commitment.const_data_ptr<float>(), grad_codebook_loss.const_data_ptr<float>(),
        data<T>(x), data<T>(codebook), indices.const_data_ptr<int64_t>(), mask_ptr, n, k, d,
        mutable_data<T>(grad_x), mutable_data<T>(grad_codebook), scratch.mutable_data_ptr(),
        bytes, current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return {grad_x, grad_codebook};
}

// ---- codebook statistics and EMA update -------------------------------------------------------

at::Tensor codebook_statistics_cuda(const at::Tensor& x, const at::Tensor& indices,
                                    int64_t num_codes, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "codebook_statistics";
  LGVQ_CHECK(op, x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  const at::Device device = x.device();
  LGVQ_CHECK(op, x.dim() == 2, "x must be [N, D], got shape ", x.sizes());
  check_kernel_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  LGVQ_CHECK(op, num_codes >= 0 && num_codes <= kMaxCodes,
             "num_codes must lie in [0, 2^31 - 2], got ", num_codes);
  const int64_t n = x.size(0), d = x.size(1);
  const bool* mask_ptr = check_rows(op, indices, mask, n, device);

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  const auto options = x.options().dtype(at::kFloat);
  if (n == 0 || num_codes == 0) return at::zeros({num_codes, d + 1}, options);
  at::Tensor stats = at::empty({num_codes, d + 1}, options);
  size_t bytes = 0;
  C10_CUDA_CHECK(lgvq::cuda::codebook_statistics_workspace_bytes(n, num_codes, d, &bytes));
  const at::Tensor scratch = workspace(x, bytes);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = lgvq::cuda::launch_codebook_statistics(
        data<T>(x), indices.const_data_ptr<int64_t>(), mask_ptr, n, num_codes, d,
        stats.mutable_data_ptr<float>(), scratch.mutable_data_ptr(), bytes,
        current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return stats;
}

at::Tensor codebook_ema_update_cuda(const at::Tensor& stats, const at::Tensor& cluster_size,
                                   const at::Tensor& embed_sum, const at::Tensor& codebook,
                                   double decay, double eps, double dead_threshold,
                                   const std::optional<at::Tensor>& replacement_in) {
  constexpr const char* op = "codebook_ema_update_";
  LGVQ_CHECK(op, codebook.is_cuda(), "codebook must be a CUDA tensor, got device ",
             codebook.device());
  const at::Device device = codebook.device();
  check_device(op, "stats", stats, device);
  check_device(op, "cluster_size", cluster_size, device);
  check_device(op, "embed_sum", embed_sum, device);
  LGVQ_CHECK(op, codebook.dim() == 2, "codebook must be [K, D], got shape ", codebook.sizes());
  const int64_t k = codebook.size(0), d = codebook.size(1);
  LGVQ_CHECK(op, k <= std::numeric_limits<int32_t>::max(),
             "the CUDA kernels support K <= 2^31 - 1 codes, got K = ", k);
  check_kernel_dtype(op, "codebook", codebook);
  check_float32(op, "cluster_size", cluster_size);
  check_float32(op, "embed_sum", embed_sum);
  check_float32(op, "stats", stats);
  LGVQ_CHECK(op, cluster_size.dim() == 1 && cluster_size.size(0) == k,
             "cluster_size must be [K] = [", k, "] (codebook is ", codebook.sizes(),
             "), got shape ", cluster_size.sizes());
  LGVQ_CHECK(op, embed_sum.sizes() == codebook.sizes(), "embed_sum must be [K, D] = ",
             codebook.sizes(), ", got shape ", embed_sum.sizes());
  LGVQ_CHECK(op, stats.dim() == 2 && stats.size(0) == k && stats.size(1) == d + 1,
             "stats must be [K, D + 1] = [", k, ", ", d + 1, "], got shape ", stats.sizes());
  check_contiguous(op, "stats", stats);
  check_contiguous(op, "cluster_size (updated in place)", cluster_size);
  check_contiguous(op, "embed_sum (updated in place)", embed_sum);
  check_contiguous(op, "codebook (updated in place)", codebook);
  at::Tensor replacement;
  if (replacement_in.has_value() && replacement_in->defined()) {
    const at::Tensor& r = *replacement_in;
    check_device(op, "replacement", r, device);
    LGVQ_CHECK(op, r.sizes() == codebook.sizes(), "replacement must be [K, D] = ",
               codebook.sizes(), ", got shape ", r.sizes());
    check_kernel_dtype(op, "replacement", r);
    if (dead_threshold > 0) replacement = r.to(at::kFloat).contiguous();
  }

  const c10::cuda::OptionalCUDAGuard device_guard(device);
  at::Tensor dead = at::empty({k}, cluster_size.options().dtype(at::kBool));
  if (k == 0) return dead;
  const size_t bytes = lgvq::cuda::codebook_ema_workspace_bytes();
  const at::Tensor scratch = workspace(codebook, bytes);
  const float* replacement_ptr =
      replacement.defined() ? replacement.const_data_ptr<float>() : nullptr;
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, codebook.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = lgvq::cuda::launch_codebook_ema_update(
        stats.const_data_ptr<float>(), cluster_size.mutable_data_ptr<float>(),
        embed_sum.mutable_data_ptr<float>(), mutable_data<T>(codebook), replacement_ptr,
        dead.mutable_data_ptr<bool>(), k, d, decay, eps, dead_threshold,
        scratch.mutable_data_ptr(), current_stream(device));
  });
  C10_CUDA_CHECK(error);
  return dead;
}

// ---- relationship alignment --------------------------------------------------------------------

struct RelationShape {
  int64_t batch, length, positions, width;
};

RelationShape check_relation_inputs(const char* op, const at::Tensor& words,
                                    const at::Tensor& visual, const at::Tensor& codes,
                                    const at::Tensor& word_mask) {
  LGVQ_CHECK(op, codes.is_cuda(), "codes must be a CUDA tensor, got device ", codes.device());
  const at::Device device = codes.device();
  check_device(op, "words", words, device);
  check_device(op, "visual", visual, device);
  check_device(op, "word_mask", word_mask, device);
  LGVQ_CHECK(op, words.dim() == 3, "words must be [B, L, C], got shape ", words.sizes());
  LGVQ_CHECK(op, visual.dim() == 3, "visual must be [B, M, C], got shape ", visual.sizes());
  const RelationShape s{words.size(0), words.size(1), visual.size(1), words.size(2)};
  LGVQ_CHECK(op, visual.size(0) == s.batch && visual.size(2) == s.width, "visual must be [",
             s.batch, ", M, ", s.width, "] to match words ", words.sizes(), ", got shape ",
             visual.sizes());
  LGVQ_CHECK(op, codes.sizes() == visual.sizes(), "codes must have the shape of visual ",
             visual.sizes(), ", got ", codes.sizes());
  LGVQ_CHECK(op, word_mask.dim() == 2 && word_mask.size(0) == s.batch &&
                 word_mask.size(1) == s.length,
             "word_mask must be [B, L] = [", s.batch, ", ", s.length, "], got shape ",
             word_mask.sizes());
  LGVQ_CHECK(op, s.positions >= 1 && s.positions <= std::numeric_limits<int32_t>::max(),
             "visual must hold 1 to 2^31 - 1 positions (M), got shape ", visual.sizes());
  // Each tensor keeps its own dtype: words and visual are normalised into float32 first.
  check_kernel_dtype(op, "words", words);
  check_kernel_dtype(op, "visual", visual);
  check_kernel_dtype(op, "codes", codes);
  LGVQ_CHECK_TYPE(op, word_mask.scalar_type() == at::kBool, "word_mask must be bool, got ",
                  word_mask.scalar_type());
  check_contiguous(op, "words", words);
  check_contiguous(op, "visual", visual);
  check_contiguous(op, "codes", codes);
  check_contiguous(op, "word_mask", word_mask);
  return s;
}

// Float32 unit rows of `t` ([B, rows, C]) on the current stream.
at::Tensor normalized_rows(const char* op, const at::Tensor& t, cudaStream_t stream) {
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const int64_t rows = t.size(0) * t.size(1), width = t.size(2);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, t.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = lgvq::cuda::launch_normalize_rows(data<T>(t), rows, width,
                                              out.mutable_data_ptr<float>(), stream);
  });
  C10_CUDA_CHECK(error);
  return out;
}

std::tuple<at::Tensor, at::Tensor> relation_alignment_loss_cuda(const at::Tensor& words,
                                                                const at::Tensor& visual,
                                                                const at::Tensor& codes,
                                                                const at::Tensor& word_mask) {
  constexpr const char* op = "relation_alignment_loss";
  const RelationShape s = check_relation_inputs(op, words, visual, codes, word_mask);
  const at::Device device = codes.device();
  const c10::cuda::OptionalCUDAGuard device_guard(device);
  const auto float_options = codes.options().dtype(at::kFloat);
  at::Tensor chosen = at::empty({s.batch, s.length}, codes.options().dtype(at::kLong));
  if (s.batch * s.length == 0) return {at::zeros({}, float_options), chosen};
  at::Tensor loss = at::empty({}, float_options);
  const cudaStream_t stream = current_stream(device);
  const at::Tensor words_unit = normalized_rows(op, words, stream);
  const at::Tensor visual_unit = normalized_rows(op, visual, stream);
  const size_t bytes =
      lgvq::cuda::relation_alignment_workspace_bytes(s.batch, s.length, s.positions, s.width);
  const at::Tensor scratch = workspace(codes, bytes);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, codes.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = lgvq::cuda::launch_relation_alignment_loss(
        words_unit.const_data_ptr<float>(), visual_unit.const_data_ptr<float>(), data<T>(codes),
        word_mask.const_data_ptr<bool>(), s.batch, s.length, s.positions, s.width,
        loss.mutable_data_ptr<float>(), chosen.mutable_data_ptr<int64_t>(),
        scratch.mutable_data_ptr(), bytes, stream);
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
  const RelationShape s = check_relation_inputs(op, words, visual, codes, word_mask);
  const at::Device device = codes.device();
  const at::Tensor grad_loss = device_scalar(op, "grad_loss", grad_loss_in, device);
  const c10::cuda::OptionalCUDAGuard device_guard(device);
  if (s.batch * s.length == 0 || s.width == 0) return at::zeros(codes.sizes(), codes.options());
  at::Tensor grad_codes = at::empty(codes.sizes(), codes.options());
  const cudaStream_t stream = current_stream(device);
  const at::Tensor words_unit = normalized_rows(op, words, stream);
  const at::Tensor visual_unit = normalized_rows(op, visual, stream);
  const size_t bytes =
      lgvq::cuda::relation_alignment_workspace_bytes(s.batch, s.length, s.positions, s.width);
  const at::Tensor scratch = workspace(codes, bytes);
  cudaError_t error = cudaSuccess;
  dispatch_kernel_dtype(op, codes.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    error = lgvq::cuda::launch_relation_alignment_loss_backward(
        grad_loss.const_data_ptr<float>(), words_unit.const_data_ptr<float>(),
        visual_unit.const_data_ptr<float>(), data<T>(codes), word_mask.const_data_ptr<bool>(),
        s.batch, s.length, s.positions, s.width, mutable_data<T>(grad_codes),
        scratch.mutable_data_ptr(), bytes, stream);
  });
  C10_CUDA_CHECK(error);
  return grad_codes;
}

#undef LGVQ_CHECK
#undef LGVQ_CHECK_TYPE

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CUDA, m) {
  m.impl("quantize_straight_through", &quantize_straight_through_cuda);
  m.impl("quantize_straight_through_backward", &quantize_straight_through_backward_cuda);
  m.impl("codebook_statistics", &codebook_statistics_cuda);
  m.impl("codebook_ema_update_", &codebook_ema_update_cuda);
  m.impl("relation_alignment_loss", &relation_alignment_loss_cuda);
  m.impl("relation_alignment_loss_backward", &relation_alignment_loss_backward_cuda);
}
