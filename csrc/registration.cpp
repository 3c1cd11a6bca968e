// The only place lgvq_C op schemas are written. Device files register implementations with
// TORCH_LIBRARY_IMPL(lgvq_C, CPU|CUDA, m); Python wraps them as torch.ops.lgvq custom ops.
#include <torch/library.h>

TORCH_LIBRARY(lgvq_C, m) {
  // x [N, D] contiguous, codebook [K, D] contiguous (same dtype: float32/float16/bfloat16, and
  // float64 on CPU), codebook_sqnorm [K] float32 (float64 for float64 inputs) or None.
  // cosine=false: distance = max(|x|^2 - 2 x.c + sqnorm, 0); cosine=true: sqnorm is ignored,
  // on CPU x rows and codes of any norm, distance = 1 - x.c / (max(|x|, 1e-12) max(|c|, 1e-12));
  // on CUDA unit rows and codes (lgvq_kernels/_backends.py normalises them), distance = 1 - x.c.
  // Returns (indices int64 [N], distances [N]): argmin with ties to the lowest index;
  // non-finite scores never win unless all do (index 0).
  m.def("nearest_code(Tensor x, Tensor codebook, Tensor? codebook_sqnorm, bool cosine)"
        " -> (Tensor indices, Tensor distances)");

  // Straight-through quantizer (see lgvq_kernels/reference.py for the exact formulas).
  // x [N, D] and codebook [K, D] contiguous, same dtype; indices [N] int64 in [0, K);
  // mask [N] bool or None. Returns quantized [N, D] (x dtype) = codebook[indices] and the
  // scalar squared_error = sum_valid |x - e|^2 / max(valid * D, 1) (float32; float64 for float64).
  m.def("quantize_straight_through(Tensor x, Tensor codebook, Tensor indices, Tensor? mask)"
        " -> (Tensor quantized, Tensor squared_error)");
  // grad_x = grad_quantized + g_commit * 2 (x - e) / (valid D); grad_codebook[k] = segment sum
  // over valid rows with indices == k of g_codebook * 2 (e - x) / (valid D), summed in a fixed
  // order (deterministic). g_commit / g_codebook are 0-d tensors.
  m.def("quantize_straight_through_backward(Tensor? grad_quantized, Tensor grad_commitment,"
        " Tensor grad_codebook_loss, Tensor x, Tensor codebook, Tensor indices, Tensor? mask)"
        " -> (Tensor grad_x, Tensor grad_codebook)");
  // Packed per-code statistics [num_codes, D + 1] float32 (float64 for float64 x): column-block
  // [:, :D] sums of assigned rows, [:, D] counts. Deterministic (rows ascending per code).
  m.def("codebook_statistics(Tensor x, Tensor indices, int num_codes, Tensor? mask) -> Tensor");
  // In-place EMA update from packed stats: cluster_size [K], embed_sum [K, D] (float32/64 state),
  // codebook [K, D] overwritten; dead-code replacement when dead_threshold > 0 and replacement
  // [K, D] is given. Returns the dead mask [K] bool. No host synchronisation.
  m.def("codebook_ema_update_(Tensor stats, Tensor(a!) cluster_size, Tensor(b!) embed_sum,"
        " Tensor(c!) codebook, float decay, float eps, float dead_threshold, Tensor? replacement)"
        " -> Tensor");

  // LG-VQ relationship alignment (see lgvq_kernels/reference.py: relation_alignment_loss).
  // words [B, L, C], visual [B, M, C], codes [B, M, C] contiguous, same floating dtype;
  // word_mask [B, L] bool. Returns (loss 0-d float32 (float64 for float64), chosen [B, L] int64:
  // per word the first position of maximal cosine similarity).
  m.def("relation_alignment_loss(Tensor words, Tensor visual, Tensor codes, Tensor word_mask)"
        " -> (Tensor loss, Tensor chosen)");
  // Gradient w.r.t. codes [B, M, C] (codes dtype); grad_loss is 0-d. Deterministic.
  m.def("relation_alignment_loss_backward(Tensor grad_loss, Tensor words, Tensor visual,"
        " Tensor codes, Tensor word_mask) -> Tensor");
}
