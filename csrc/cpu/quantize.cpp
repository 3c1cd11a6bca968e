// Straight-through quantizer on CPU: the forward (gather + squared error) and the fused backward
// (grad_x + per-code segment sum of the codebook gradient). Formulas: lgvq_kernels/reference.py.
//
// Forward: one pass over the rows in fixed blocks of kBlockRows, parallel over blocks. A block
// copies the chosen code into each of its rows of `quantized` and sums |x - e|^2 of its valid
// rows into its own partial; the partials are added in block order. The blocking does not
// depend on the thread count, so neither do the bits.
// Backward: the valid rows are counting-sorted by code (stable: rows ascending within a code).
// Tasks own whole codes, so one thread sums each code's gradient, rows ascending (the order of
// the reference's index_add) - no atomics - while the same pass writes grad_x of those rows;
// the code row and its accumulator stay in L1 for the whole segment. Scratch is O(N + K) indices
// plus O(D) per thread: never N x K, never an N x D per-row buffer. A two-pass variant (grad_x
// in row order, then the segment sums re-reading x) measured 6.4-8.1 vs 8.6-9.1 ms at K=1024 but
// 13-18 vs 12 ms at K=16384 (1 thread, N=16384, D=256 float32, loaded machine): kept fused.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "segments.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lgvq {
namespace {

using namespace checks;      // input checks (csrc/checks.h)
using namespace cpu_common;  // the shared counting sort, task split and prefetch
using namespace cpu_simd;    // AVX2 checks, 8-lane loads and stores

constexpr int64_t kBlockRows = 64;             // rows per forward partial sum (fixed on purpose)

// ---------------------------------------------------------------------------------------------
// Row kernels: a baseline version for any type and an AVX2 version for 32-bit-accumulated types
// ---------------------------------------------------------------------------------------------
template <typename T, typename C>
using SquaredDistanceFn = C (*)(const T*, const T*, int64_t);
template <typename T, typename C>
using BackwardRowFn = void (*)(const T*, const C*, const T*, C, C, T*, C*, int64_t);

namespace baseline {

// sum_d (x[d] - e[d])^2 with 8 independent lanes (vectorisable without reassociation).
template <typename T, typename C>
C squared_distance(const T* x, const T* e, int64_t dim) {
  C lane[8] = {};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    for (int l = 0; l < 8; ++l) {
      const C v = static_cast<C>(x[d + l]) - static_cast<C>(e[d + l]);
      lane[l] += v * v;
    }
  }
  C tail = 0;
  for (; d < dim; ++d) {
    const C v = static_cast<C>(x[d]) - static_cast<C>(e[d]);
    tail += v * v;
  }
  return (((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])))
         + tail;
}

// diff = x - e; gx = gq + commit * diff (gq may be null); acc += codebook * diff.
template <typename T, typename C>
void backward_row(const T* x, const C* e, const T* gq, C commit, C codebook, T* gx, C* acc,
                  int64_t dim) {
  if (gq != nullptr) {
    for (int64_t d = 0; d < dim; ++d) {
      const C diff = static_cast<C>(x[d]) - e[d];
      gx[d] = static_cast<T>(commit * diff + static_cast<C>(gq[d]));
      acc[d] += codebook * diff;
    }
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      const C diff = static_cast<C>(x[d]) - e[d];
      gx[d] = static_cast<T>(commit * diff);
      acc[d] += codebook * diff;
    }
  }
}

}  // namespace baseline

#if LGVQ_HAVE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

template <typename T>
float squared_distance(const T* x, const T* e, int64_t dim) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= dim; d += 16) {
    const __m256 v0 = _mm256_sub_ps(load8(x + d), load8(e + d));
    const __m256 v1 = _mm256_sub_ps(load8(x + d + 8), load8(e + d + 8));
    acc0 = _mm256_fmadd_ps(v0, v0, acc0);
    acc1 = _mm256_fmadd_ps(v1, v1, acc1);
  }
  if (d + 8 <= dim) {
    const __m256 v0 = _mm256_sub_ps(load8(x + d), load8(e + d));
    acc0 = _mm256_fmadd_ps(v0, v0, acc0);
    d += 8;
  }
  float sum = horizontal_sum(_mm256_add_ps(acc0, acc1));
  for (; d < dim; ++d) {
    const float v = static_cast<float>(x[d]) - static_cast<float>(e[d]);
    sum += v * v;
  }
  return sum;
}

// Same arithmetic as baseline::backward_row (mul then add, no FMA: the reference rounds the
// product and the sum separately), 8 lanes at a time.
template <typename T, bool kHasGrad>
inline void backward_row_impl(const T* x, const float* e, const T* gq, float commit,
                              float codebook, T* gx, float* acc, int64_t dim) {
  const __m256 commit8 = _mm256_set1_ps(commit), codebook8 = _mm256_set1_ps(codebook);
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    const __m256 diff = _mm256_sub_ps(load8(x + d), _mm256_loadu_ps(e + d));
    __m256 g = _mm256_mul_ps(commit8, diff);
    if constexpr (kHasGrad) g = _mm256_add_ps(g, load8(gq + d));
    store8(gx + d, g);
    const __m256 contribution = _mm256_mul_ps(codebook8, diff);
    _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), contribution));
  }
  for (; d < dim; ++d) {
    const float diff = static_cast<float>(x[d]) - e[d];
    float g = commit * diff;
    if constexpr (kHasGrad) g += static_cast<float>(gq[d]);
    gx[d] = static_cast<T>(g);
    acc[d] += codebook * diff;
  }
}

template <typename T>
void backward_row(const T* x, const float* e, const T* gq, float commit, float codebook, T* gx,
                  float* acc, int64_t dim) {
  if (gq != nullptr) {
    backward_row_impl<T, true>(x, e, gq, commit, codebook, gx, acc, dim);
  } else {
    backward_row_impl<T, false>(x, e, gq, commit, codebook, gx, acc, dim);
  }
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // LGVQ_HAVE_AVX2

// The checked inputs as the row kernels read them: contiguous, indices in [0, K).
struct Inputs {
  at::Tensor x, codebook, indices, mask_holder;
  int64_t n, k, dim;
  const int64_t* index;
  const bool* mask;

  Inputs(const char* op, const at::Tensor& x_in, const at::Tensor& codebook_in,
         const at::Tensor& indices_in, const std::optional<at::Tensor>& mask_in)
      : x(x_in.contiguous()), codebook(codebook_in.contiguous()),
        indices(indices_in.contiguous()), n(x.size(0)), k(codebook.size(0)), dim(x.size(1)),
        index(indices.data_ptr<int64_t>()), mask(mask_data(mask_in, mask_holder)) {
    check_indices_in_range(op, index, n, k);
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T, typename C>
double forward_rows(const T* x, const T* codebook, const int64_t* indices, const bool* mask,
                    int64_t n, int64_t dim, T* quantized) {
  const SquaredDistanceFn<T, C> squared_distance =
      LGVQ_PICK_ISA((std::is_same_v<C, float>), cpu_has_avx2_fma_f16c,
                    &avx2::squared_distance<T>, (&baseline::squared_distance<T, C>));
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  const size_t row_bytes = sizeof(T) * static_cast<size_t>(dim);
  const int64_t grain =
      std::max<int64_t>(1, kMinTaskElements / (kBlockRows * std::max<int64_t>(dim, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row_end = std::min(n, (block + 1) * kBlockRows);
      double sum = 0;
      for (int64_t row = block * kBlockRows; row < row_end; ++row) {
        if (row + kPrefetchRows < n) {
          prefetch_row(codebook + indices[row + kPrefetchRows] * dim, row_bytes);
        }
        const T* e = codebook + indices[row] * dim;
        std::memcpy(quantized + row * dim, e, sizeof(T) * static_cast<size_t>(dim));
        if (mask == nullptr || mask[row]) sum += squared_distance(x + row * dim, e, dim);
      }
      partial[block] = sum;
    }
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

std::tuple<at::Tensor, at::Tensor> quantize_straight_through_cpu(
    const at::Tensor& x_in, const at::Tensor& codebook_in, const at::Tensor& indices_in,
    const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "quantize_straight_through";
  check_quantize_inputs(op, x_in, codebook_in, indices_in, mask);
  const Inputs in(op, x_in, codebook_in, indices_in, mask);
  const at::Tensor &x = in.x, &codebook = in.codebook;
  const int64_t n = in.n, dim = in.dim;
  int64_t valid = n;
  if (in.mask != nullptr) {
    valid = 0;
    for (int64_t i = 0; i < n; ++i) valid += in.mask[i];
  }

  const at::ScalarType compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor quantized = at::empty({n, dim}, x.options());
  at::Tensor squared_error = at::empty({}, x.options().dtype(compute));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lgvq_quantize_straight_through_cpu", [&] {
    using C = Compute<scalar_t>;
    const double total = forward_rows<scalar_t, C>(x.data_ptr<scalar_t>(),
                                                   codebook.data_ptr<scalar_t>(), in.index,
                                                   in.mask, n, dim,
                                                   quantized.data_ptr<scalar_t>());
    const double denominator = static_cast<double>(std::max<int64_t>(valid * dim, 1));
    *squared_error.data_ptr<C>() = static_cast<C>(total / denominator);
  });
  return {quantized, squared_error};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T, typename C>
void backward_rows(const T* x, const T* codebook, const T* grad_quantized,
                   const CodeSegments& segments, int64_t k, int64_t dim, C commit_scale,
                   C codebook_scale, T* grad_x, T* grad_codebook) {
  const BackwardRowFn<T, C> backward_row =
      LGVQ_PICK_ISA((std::is_same_v<C, float>), cpu_has_avx2_fma_f16c, &avx2::backward_row<T>,
                    (&baseline::backward_row<T, C>));
  const int64_t* offsets = segments.offsets.data();
  const int64_t* rows = segments.rows.data();
  const int64_t valid = segments.offsets[k];
  const size_t row_bytes = sizeof(T) * static_cast<size_t>(dim);
  parallel_over_codes(segments, k, dim, [&](int64_t first_code, int64_t end_code) {
    std::vector<C> acc(static_cast<size_t>(dim));
    std::vector<C> code(std::is_same_v<T, C> ? 0 : static_cast<size_t>(dim));
    for (int64_t c = first_code; c < end_code; ++c) {
      T* out = grad_codebook + c * dim;
      if (offsets[c] == offsets[c + 1]) {
        std::fill(out, out + dim, T(0));
        continue;
      }
      const C* e;
      if constexpr (std::is_same_v<T, C>) {
        e = codebook + c * dim;
      } else {
        for (int64_t d = 0; d < dim; ++d) code[d] = static_cast<C>(codebook[c * dim + d]);
        e = code.data();
      }
      std::fill(acc.begin(), acc.end(), C(0));
      for (int64_t r = offsets[c]; r < offsets[c + 1]; ++r) {
        if (r + kPrefetchRows < valid) {
          const int64_t ahead = rows[r + kPrefetchRows] * dim;
          prefetch_row(x + ahead, row_bytes);
          if (grad_quantized != nullptr) prefetch_row(grad_quantized + ahead, row_bytes);
          prefetch_row(grad_x + ahead, row_bytes, /*for_write=*/true);
        }
        const int64_t row = rows[r];
        backward_row(x + row * dim, e, grad_quantized ? grad_quantized + row * dim : nullptr,
                     commit_scale, codebook_scale, grad_x + row * dim, acc.data(), dim);
      }
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(acc[d]);
    }
  });
  // Masked-out rows: the straight-through gradient only.
  const int64_t skipped = static_cast<int64_t>(segments.skipped.size());
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(dim, 1));
  at::parallel_for(0, skipped, grain, [&](int64_t begin, int64_t end) {
    const size_t bytes = sizeof(T) * static_cast<size_t>(dim);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t row = segments.skipped[s];
      if (grad_quantized != nullptr) {
        std::memcpy(grad_x + row * dim, grad_quantized + row * dim, bytes);
      } else {
        std::fill(grad_x + row * dim, grad_x + (row + 1) * dim, T(0));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_straight_through_backward_cpu(
    const std::optional<at::Tensor>& grad_quantized_in, const at::Tensor& grad_commitment,
    const at::Tensor& grad_codebook_loss, const at::Tensor& x_in, const at::Tensor& codebook_in,
    const at::Tensor& indices_in, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "quantize_straight_through_backward";
  check_quantize_inputs(op, x_in, codebook_in, indices_in, mask);
  check_quantize_gradients(op, grad_quantized_in, grad_commitment, grad_codebook_loss, x_in);
  const double g_commit = grad_commitment.item<double>();
  const double g_codebook = grad_codebook_loss.item<double>();
  // Autograd hands the gradient in x's dtype; any other dtype is converted once here.
  const at::Tensor grad_quantized = has_value(grad_quantized_in)
                                        ? grad_quantized_in->to(x_in.scalar_type()).contiguous()
                                        : at::Tensor();
  const Inputs in(op, x_in, codebook_in, indices_in, mask);
  const at::Tensor &x = in.x, &codebook = in.codebook;
  const int64_t n = in.n, k = in.k, dim = in.dim;
  const CodeSegments segments = segments_by_code(in.index, in.mask, n, k);
  const int64_t valid = segments.offsets[k];

  at::Tensor grad_x = at::empty({n, dim}, x.options());
  at::Tensor grad_codebook = at::empty({k, dim}, codebook.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lgvq_quantize_straight_through_backward_cpu", [&] {
    using C = Compute<scalar_t>;
    // As the reference: scale = 2 / max(valid D, 1) in the compute dtype, then each gradient
    // scalar (cast to the compute dtype) times it.
    const C scale = C(2) / static_cast<C>(std::max<int64_t>(valid * dim, 1));
    const C commit_scale = static_cast<C>(g_commit) * scale;
    const C codebook_scale = -static_cast<C>(g_codebook) * scale;
    backward_rows<scalar_t, C>(x.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(),
                               grad_quantized.defined() ? grad_quantized.data_ptr<scalar_t>()
                                                        : nullptr,
                               segments, k, dim, commit_scale, codebook_scale,
                               grad_x.data_ptr<scalar_t>(), grad_codebook.data_ptr<scalar_t>());
  });
  return {grad_x, grad_codebook};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CPU, m) {
  m.impl("quantize_straight_through", &quantize_straight_through_cpu);
  m.impl("quantize_straight_through_backward", &quantize_straight_through_backward_cpu);
}

}  // namespace lgvq
