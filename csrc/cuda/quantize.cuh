// Straight-through quantizer and per-code row statistics on CUDA: raw-pointer launchers (pure
// CUDA, no torch headers). The tensor binding is csrc/cuda/quantize_cuda.cpp; semantics are
// those of the lgvq_C schemas in csrc/registration.cpp (quantize_straight_through, its backward,
// codebook_statistics) and of lgvq_kernels/reference.py.
//
// The backward and the statistics are both segment sums over the rows of each code, so both live
// in quantize.cu, which groups the rows by code once (a stable CUB radix sort) and sums each code's
// rows in a fixed order: deterministic, no float atomics.
//
// Common contract of the launchers below:
//   * x [n, d] and codebook [k, d] contiguous row-major, same element type T (float, __half or
//     __nv_bfloat16: each launcher is instantiated for these in quantize.cu); indices [n]
//     int64; mask [n] (bool, 1 byte) or nullptr (every row valid).
//     Accumulation is fp32. Element offsets are int64.
//   * An index outside [0, k) never reads or writes out of bounds: such a row is treated as masked
//     out (it adds nothing to the loss, the gradients of the codebook or the statistics, and is
//     not counted as valid) and its quantized row is zeros.
//   * Requires 0 <= n <= INT32_MAX, 0 <= k <= INT32_MAX - 1, d >= 1 (d >= 0 for the
//     statistics), else cudaErrorInvalidValue. n == 0 launches nothing (the caller fills the
//     outputs).
//   * Runs on the current device (the caller sets it) and on `stream`, without host
//     synchronisation; returns the first launch error, if any.
//   * `workspace` is device memory of at least the matching *_workspace_bytes (the binding takes it
//     from the caching allocator); 256-byte alignment is enough.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lgvq {
namespace cuda {

// ---- quantize_straight_through ---------------------------------------------------------------
// quantized[i] = codebook[indices[i]] (bit copy); squared_error[0] (float32 device scalar) =
//   sum over valid rows of |x_i - codebook[indices_i]|^2 / max(valid * d, 1),
// where a masked-out row enters as 0 * |x - e|^2 (a non-finite masked row still gives NaN, as in
// the reference). Two kernels: per-block partial sums (fixed row blocks), then one block adds them
// in a fixed order. Deterministic for given (n, d).
size_t quantize_forward_workspace_bytes(int64_t n, int64_t d);
template <typename T>
cudaError_t launch_quantize_straight_through(const T* x, const T* codebook,
                                             const int64_t* indices, const bool* mask, int64_t n,
                                             int64_t k, int64_t d, T* quantized,
                                             float* squared_error, void* workspace,
                                             size_t workspace_bytes, cudaStream_t stream);

// ---- quantize_straight_through_backward ------------------------------------------------------
// With valid = number of valid rows, scale = 2 / max(valid * d, 1) (fp32) and
// diff_i = mask_i * (x_i - codebook[indices_i]):
//   grad_x[i]        = grad_quantized[i] (0 when nullptr) + grad_commitment * scale * diff_i
//   grad_codebook[c] = sum over rows i of code c, ascending in row tiles, of
//                      (-grad_codebook_loss * scale) * diff_i      (zeros for an unused code)
// grad_commitment and grad_codebook_loss are float32 device scalars (read in-kernel: no sync).
// Every row of grad_x and of grad_codebook is written. Deterministic (same bits every run).
// The workspace size depends on the device (CUB's sort plan): query it on the device that runs.
cudaError_t quantize_backward_workspace_bytes(int64_t n, int64_t k, int64_t d, size_t* bytes);
template <typename T>
cudaError_t launch_quantize_straight_through_backward(
    const T* grad_quantized, const float* grad_commitment, const float* grad_codebook_loss,
    const T* x, const T* codebook, const int64_t* indices, const bool* mask, int64_t n, int64_t k,
    int64_t d, T* grad_x, T* grad_codebook, void* workspace, size_t workspace_bytes,
    cudaStream_t stream);

// ---- codebook_statistics ---------------------------------------------------------------------
// stats [k, d + 1] float32: stats[c, :d] = sum of mask_i * x_i over the rows of code c,
// stats[c, d] = sum of mask_i (the count); rows of a code summed in a fixed order, zeros for an
// unused code. Every element is written. Deterministic. Codebook is not needed (only k).
cudaError_t codebook_statistics_workspace_bytes(int64_t n, int64_t k, int64_t d, size_t* bytes);
template <typename T>
cudaError_t launch_codebook_statistics(const T* x, const int64_t* indices, const bool* mask,
                                       int64_t n, int64_t k, int64_t d, float* stats,
                                       void* workspace, size_t workspace_bytes,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace lgvq
