// Input checks of every lgvq_C kernel binding, CPU and CUDA alike: one message prefix
// ("lgvq: <op>: "), messages that name the argument and say what was expected and what came,
// and one exception per kind of mistake, the policy of the Python layer (docs/kernels.md):
//   shape, value, out-of-range index, device  -> ValueError  (TORCH_CHECK_VALUE)
//   dtype                                     -> TypeError   (TORCH_CHECK_TYPE)
// The op contracts below (shapes, dtypes, one device) are the schemas' (csrc/registration.cpp)
// and hold on every device. What differs by device is the floating dtypes a kernel takes: the
// CPU kernels take float64 (and compute in it), the CUDA kernels do not. Device-specific limits
// (contiguity, 32-bit sizes) stay in the CUDA bindings (csrc/cuda/binding.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

#define LGVQ_CHECK_VALUE(op, cond, ...) TORCH_CHECK_VALUE(cond, "lgvq: ", op, ": ", __VA_ARGS__)
#define LGVQ_CHECK_TYPE(op, cond, ...) TORCH_CHECK_TYPE(cond, "lgvq: ", op, ": ", __VA_ARGS__)

namespace lgvq::checks {

inline bool has_value(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// "float32", "int64", ...: the names Python users know (torch.float32), not c10's "Float".
inline std::string dtype_name(at::ScalarType dtype) {
  return std::string(c10::getDtypeNames(dtype).first);
}

// ---- single tensors ------------------------------------------------------------------------

inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device) {
  LGVQ_CHECK_VALUE(op, t.device() == device, name, " must be on ", device,
                   " with the other inputs, got ", t.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType dtype) {
  LGVQ_CHECK_TYPE(op, t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ",
                  dtype_name(t.scalar_type()));
}

// The CPU kernels compute float64 in float64; the CUDA kernels take 32- and 16-bit floats only.
inline bool takes_float64(const at::Device& device) { return device.is_cpu(); }

// A floating input of a kernel: float32, float16, bfloat16, and float64 where the kernel on t's
// device takes it.
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  const bool low = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  if (takes_float64(t.device())) {
    LGVQ_CHECK_TYPE(op, low || dtype == at::kDouble, name,
                    " must be float32, float64, float16 or bfloat16, got ", dtype_name(dtype));
  } else {
    LGVQ_CHECK_TYPE(op, dtype != at::kDouble, name, " has dtype float64, which the ",
                    t.device().type(), " kernels do not take (float64 runs on the CPU and "
                    "reference backends); expected float32, float16 or bfloat16");
    LGVQ_CHECK_TYPE(op, low, name, " must be float32, float16 or bfloat16, got ",
                    dtype_name(dtype));
  }
}

// Accumulated state (EMA sums and counts, packed statistics): float32, and float64 where the
// kernel on t's device takes it.
inline void check_state_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  if (takes_float64(t.device())) {
    LGVQ_CHECK_TYPE(op, dtype == at::kFloat || dtype == at::kDouble, name,
                    " must be float32 or float64, got ", dtype_name(dtype));
  } else {
    LGVQ_CHECK_TYPE(op, dtype == at::kFloat, name, " must be float32 on ", t.device().type(),
                    ", got ", dtype_name(dtype),
                    dtype == at::kDouble ? " (float64 state runs on the CPU and reference backends)"
                                         : "");
  }
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* other_name, const at::Tensor& other) {
  LGVQ_CHECK_TYPE(op, t.scalar_type() == other.scalar_type(), name, " (",
                  dtype_name(t.scalar_type()), ") and ", other_name, " (",
                  dtype_name(other.scalar_type()), ") must have the same dtype");
}

// A one-element gradient scalar of any floating dtype.
inline void check_scalar(const char* op, const char* name, const at::Tensor& t) {
  LGVQ_CHECK_VALUE(op, t.numel() == 1, name, " must be a scalar (0-d) tensor, got shape ",
                   t.sizes());
  LGVQ_CHECK_TYPE(op, at::isFloatingType(t.scalar_type()), name, " must be a float tensor, got ",
                  dtype_name(t.scalar_type()));
}

// Host indices in [0, k): one cheap branch-free pass; only a failing batch pays for finding the
// first offender. (The CUDA kernels cannot check without a host sync: they skip such rows.)
inline void check_indices_in_range(const char* op, const int64_t* indices, int64_t n, int64_t k) {
  const uint64_t limit = static_cast<uint64_t>(k);
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(indices[i]) >= limit;
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i) {
    LGVQ_CHECK_VALUE(op, static_cast<uint64_t>(indices[i]) < limit, "indices must lie in [0, ",
                     k, ") (the number of codes), got indices[", i, "] = ", indices[i]);
  }
}

// ---- op contracts ----------------------------------------------------------------------------

// indices [n] int64 and mask [n] bool or none, on `device`.
inline void check_rows(const char* op, const at::Tensor& indices,
                       const std::optional<at::Tensor>& mask, int64_t n,
                       const at::Device& device) {
  check_device(op, "indices", indices, device);
  LGVQ_CHECK_VALUE(op, indices.dim() == 1 && indices.size(0) == n, "indices must be [N] = [", n,
                   "] (one per row of x), got shape ", indices.sizes());
  check_dtype(op, "indices", indices, at::kLong);
  if (!has_value(mask)) return;
  check_device(op, "mask", *mask, device);
  LGVQ_CHECK_VALUE(op, mask->dim() == 1 && mask->size(0) == n, "mask must be [N] = [", n,
                   "], got shape ", mask->sizes());
  check_dtype(op, "mask", *mask, at::kBool);
}

// nearest_code: x [N, D] and codebook [K >= 1, D] of one floating dtype; codebook_sqnorm [K]
// (floating) unless cosine, which ignores it. All on x's device.
inline void check_nearest_code_inputs(const char* op, const at::Tensor& x,
                                      const at::Tensor& codebook,
                                      const std::optional<at::Tensor>& codebook_sqnorm,
                                      bool cosine) {
  check_device(op, "codebook", codebook, x.device());
  LGVQ_CHECK_VALUE(op, x.dim() == 2, "x must be [N, D], got shape ", x.sizes());
  LGVQ_CHECK_VALUE(op, codebook.dim() == 2, "codebook must be [K, D], got shape ",
                   codebook.sizes());
  LGVQ_CHECK_VALUE(op, codebook.size(0) >= 1, "codebook must hold at least one code, got shape ",
                   codebook.sizes());
  LGVQ_CHECK_VALUE(op, x.size(1) >= 1 && x.size(1) == codebook.size(1), "x is [N, ", x.size(1),
                   "] but codebook is [K, ", codebook.size(1), "]: D must match and be >= 1");
  check_float_dtype(op, "x", x);
  check_same_dtype(op, "x", x, "codebook", codebook);
  if (cosine || !has_value(codebook_sqnorm)) return;
  const at::Tensor& sqnorm = *codebook_sqnorm;
  check_device(op, "codebook_sqnorm", sqnorm, x.device());
  LGVQ_CHECK_VALUE(op, sqnorm.dim() == 1 && sqnorm.size(0) == codebook.size(0),
                   "codebook_sqnorm must be [K] = [", codebook.size(0), "] (one per code), got "
                   "shape ", sqnorm.sizes());
  LGVQ_CHECK_TYPE(op, at::isFloatingType(sqnorm.scalar_type()),
                  "codebook_sqnorm must be a float tensor, got ",
                  dtype_name(sqnorm.scalar_type()));
}

// quantize_straight_through(_backward): x [N, D] and codebook [K, D] of one floating dtype,
// indices [N] int64, mask [N] bool or none, all on x's device.
inline void check_quantize_inputs(const char* op, const at::Tensor& x, const at::Tensor& codebook,
                                  const at::Tensor& indices,
                                  const std::optional<at::Tensor>& mask) {
  check_device(op, "codebook", codebook, x.device());
  LGVQ_CHECK_VALUE(op, x.dim() == 2, "x must be [N, D], got shape ", x.sizes());
  LGVQ_CHECK_VALUE(op, codebook.dim() == 2, "codebook must be [K, D], got shape ",
                   codebook.sizes());
  LGVQ_CHECK_VALUE(op, x.size(1) == codebook.size(1), "x is [N, ", x.size(1),
                   "] but codebook is [K, ", codebook.size(1), "]: D must match");
  check_float_dtype(op, "x", x);
  check_same_dtype(op, "x", x, "codebook", codebook);
  check_rows(op, indices, mask, x.size(0), x.device());
}

// The backward's extra inputs: two gradient scalars and grad_quantized (x's shape) or none.
inline void check_quantize_gradients(const char* op,
                                     const std::optional<at::Tensor>& grad_quantized,
                                     const at::Tensor& grad_commitment,
                                     const at::Tensor& grad_codebook_loss, const at::Tensor& x) {
  check_device(op, "grad_commitment", grad_commitment, x.device());
  check_scalar(op, "grad_commitment", grad_commitment);
  check_device(op, "grad_codebook_loss", grad_codebook_loss, x.device());
  check_scalar(op, "grad_codebook_loss", grad_codebook_loss);
  if (!has_value(grad_quantized)) return;
  const at::Tensor& g = *grad_quantized;
  check_device(op, "grad_quantized", g, x.device());
  LGVQ_CHECK_VALUE(op, g.sizes() == x.sizes(), "grad_quantized must have x's shape ", x.sizes(),
                   ", got ", g.sizes());
  check_float_dtype(op, "grad_quantized", g);
}

// codebook_statistics: x [N, D] floating, indices [N] int64, mask [N] bool or none, num_codes >= 0.
inline void check_statistics_inputs(const char* op, const at::Tensor& x, const at::Tensor& indices,
                                    int64_t num_codes, const std::optional<at::Tensor>& mask) {
  LGVQ_CHECK_VALUE(op, x.dim() == 2, "x must be [N, D], got shape ", x.sizes());
  check_float_dtype(op, "x", x);
  LGVQ_CHECK_VALUE(op, num_codes >= 0, "num_codes must be >= 0, got ", num_codes);
  check_rows(op, indices, mask, x.size(0), x.device());
}

// codebook_ema_update_: codebook [K, D] floating; cluster_size [K] and embed_sum [K, D] of one
// state dtype; stats [K, D + 1] (state dtypes); replacement [K, D] floating or none. All on the
// codebook's device.
inline void check_ema_inputs(const char* op, const at::Tensor& stats,
                             const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                             const at::Tensor& codebook,
                             const std::optional<at::Tensor>& replacement) {
  const at::Device device = codebook.device();
  check_device(op, "stats", stats, device);
  check_device(op, "cluster_size", cluster_size, device);
  check_device(op, "embed_sum", embed_sum, device);
  LGVQ_CHECK_VALUE(op, codebook.dim() == 2, "codebook must be [K, D], got shape ",
                   codebook.sizes());
  const int64_t k = codebook.size(0), d = codebook.size(1);
  check_float_dtype(op, "codebook", codebook);
  check_state_dtype(op, "cluster_size", cluster_size);
  LGVQ_CHECK_VALUE(op, cluster_size.dim() == 1 && cluster_size.size(0) == k,
                   "cluster_size must be [K] = [", k, "] (codebook is ", codebook.sizes(),
                   "), got shape ", cluster_size.sizes());
  LGVQ_CHECK_VALUE(op, embed_sum.sizes() == codebook.sizes(), "embed_sum must be [K, D] = ",
                   codebook.sizes(), ", got shape ", embed_sum.sizes());
  LGVQ_CHECK_TYPE(op, embed_sum.scalar_type() == cluster_size.scalar_type(), "embed_sum (",
                  dtype_name(embed_sum.scalar_type()), ") must have cluster_size's dtype (",
                  dtype_name(cluster_size.scalar_type()), ")");
  LGVQ_CHECK_VALUE(op, stats.dim() == 2 && stats.size(0) == k && stats.size(1) == d + 1,
                   "stats must be [K, D + 1] = [", k, ", ", d + 1, "], got shape ", stats.sizes());
  check_state_dtype(op, "stats", stats);
  if (!has_value(replacement)) return;
  check_device(op, "replacement", *replacement, device);
  LGVQ_CHECK_VALUE(op, replacement->sizes() == codebook.sizes(), "replacement must be [K, D] = ",
                   codebook.sizes(), ", got shape ", replacement->sizes());
  check_float_dtype(op, "replacement", *replacement);
}

// relation_alignment_loss(_backward): words [B, L, C], visual [B, M >= 1, C] and codes (visual's
// shape), each of its own floating dtype; word_mask [B, L] bool. All on the device of codes.
inline void check_relation_inputs(const char* op, const at::Tensor& words,
                                  const at::Tensor& visual, const at::Tensor& codes,
                                  const at::Tensor& word_mask) {
  const at::Device device = codes.device();
  check_device(op, "words", words, device);
  check_device(op, "visual", visual, device);
  check_device(op, "word_mask", word_mask, device);
  LGVQ_CHECK_VALUE(op, words.dim() == 3, "words must have 3 dimensions [B, L, C], got shape ",
                   words.sizes());
  LGVQ_CHECK_VALUE(op, visual.dim() == 3, "visual must have 3 dimensions [B, M, C], got shape ",
                   visual.sizes());
  const int64_t batch = words.size(0), length = words.size(1), width = words.size(2);
  LGVQ_CHECK_VALUE(op, visual.size(0) == batch && visual.size(2) == width, "visual must be [",
                   batch, ", M, ", width, "] to match words, got shape ", visual.sizes());
  LGVQ_CHECK_VALUE(op, visual.size(1) >= 1, "visual must hold at least one position, got shape ",
                   visual.sizes());
  LGVQ_CHECK_VALUE(op, codes.sizes() == visual.sizes(), "codes must have the shape of visual ",
                   visual.sizes(), ", got ", codes.sizes());
  LGVQ_CHECK_VALUE(op, word_mask.dim() == 2 && word_mask.size(0) == batch &&
                       word_mask.size(1) == length,
                   "word_mask must be [B, L] = [", batch, ", ", length, "], got shape ",
                   word_mask.sizes());
  check_float_dtype(op, "words", words);
  check_float_dtype(op, "visual", visual);
  check_float_dtype(op, "codes", codes);
  check_dtype(op, "word_mask", word_mask, at::kBool);
}

}  // namespace lgvq::checks
