// LG-VQ relationship-alignment loss on CUDA: raw-pointer launchers (pure CUDA, no torch
// headers). The tensor binding is csrc/cuda/relation_cuda.cpp; semantics are those of
// lgvq_C::relation_alignment_loss(_backward) (csrc/registration.cpp) and of
// lgvq_kernels/reference.py (relation_alignment_loss).
//
// Shapes: words [batch, length, width], visual and codes [batch, positions, width], word_mask
// [batch, length] (bool, 1 byte); all contiguous. Accumulation is fp32; element offsets int64.
//   W = normalize(words), V = normalize(visual)       (x / max(|x|, 1e-12), like F.normalize)
//   chosen_i = first argmax_p W_i.V_p (a NaN similarity wins, the first one), s_i its value
//   c_hat_i = m_i normalize(s_i codes[chosen_i]),  w_hat_i = m_i W_i
//   loss = mean over batch * length^2 of (c_hat c_hat^T - w_hat w_hat^T)^2
// Every step is a fixed-order computation (no atomics): the same bits every run.
//
// Calling sequence: normalise words and visual into float32 buffers with launch_normalize_rows
// (each in its own dtype), then call the loss or its backward with the codes (in theirs). The
// element type T of every launcher is float, __half or __nv_bfloat16 (instantiated in
// relation.cu). Both take `workspace`: device memory of at least
// relation_alignment_workspace_bytes(), 256-byte aligned. Requirements: batch, length, width >= 0, 1 <= positions <= INT32_MAX, else
// cudaErrorInvalidValue. When batch * length == 0 they launch nothing and write nothing: the
// caller sets loss = 0 and grad_codes = 0. Runs on the current device and on `stream` without
// host synchronisation; returns the first launch error, if any.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lgvq {
namespace cuda {

// out[r, :] = in[r, :] / max(|in[r, :]|, 1e-12), float32; in and out [rows, width].
template <typename T>
cudaError_t launch_normalize_rows(const T* in, int64_t rows, int64_t width, float* out,
                                  cudaStream_t stream);

size_t relation_alignment_workspace_bytes(int64_t batch, int64_t length, int64_t positions,
                                          int64_t width);

// words_unit [batch, length, width] and visual_unit [batch, positions, width]: the normalised
// rows (float32). Outputs: loss (float32 device scalar), chosen [batch, length] int64.
template <typename T>
cudaError_t launch_relation_alignment_loss(const float* words_unit, const float* visual_unit,
                                           const T* codes, const bool* word_mask, int64_t batch,
                                           int64_t length, int64_t positions, int64_t width,
                                           float* loss, int64_t* chosen, void* workspace,
                                           size_t workspace_bytes, cudaStream_t stream);

// grad_codes [batch, positions, width] (codes' type; every element written) of the loss scaled
// by grad_loss (float32 device scalar):
//   dL/dc_hat = 4 (P - Q) c_hat grad_loss / (batch length^2), times the mask, back through the
//   normalisation (dn = (I - n n^T) du / |u|; du / max(|u|, eps) when |u| <= eps) and u = s c,
//   then summed over the words that chose each position, in word order.
template <typename T>
cudaError_t launch_relation_alignment_loss_backward(
    const float* grad_loss, const float* words_unit, const float* visual_unit, const T* codes,
    const bool* word_mask, int64_t batch, int64_t length, int64_t positions, int64_t width,
    T* grad_codes, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace lgvq
