// LG-VQ relationship-alignment loss on CPU: forward and backward. Formulas:
// lgvq_kernels/reference.py (relation_alignment_loss, relation_alignment_loss_backward).
//
// Both ops are parallel over samples (at::parallel_for, one task per sample); a sample's work
// is done start to end by one thread in a fixed order, in per-thread scratch of O((L + M) C):
//   1. words and visual rows are normalised into zero-padded rows (width rounded up to 8);
//   2. the similarity W V^T [L, M] comes from a register-blocked dot micro-kernel (4 words x 3
//      positions, AVX2 + FMA for float, 8 lanes). Every (word, position) pair runs the same
//      instruction sequence whatever its place in a block, so identical visual tokens score
//      identically and the first maximum (a strict > scan, like torch.max) is the lowest one;
//   3. the chosen codes are gathered, scaled by s_i and normalised; both Gram matrices use the
//      same micro-kernel; the forward writes one partial sum of squares per sample, added in
//      sample order afterwards, so the bits never depend on the thread count.
// The backward recomputes 1-3 and then, per word, the gradient of its gathered code; the words
// are stably sorted by chosen position and each position sums its words in ascending order
// (the reference's scatter_add order), written once: no atomics, no M x C scratch.
// Compute type: float64 for float64, float32 for float32/float16/bfloat16.
// Measured (2-core EPYC shared with another job; B=32, L=30, M=256, C=384 float32, min of 30
// runs, 1 thread): forward 5.9 ms vs reference 12.4 ms (its bmm alone: 3.7 ms), backward
// 8.8 ms vs 16.6 ms; the forward's kernel time is ~45% the similarity micro-kernel, ~30%
// reading visual (memory bound).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "segments.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

namespace lgvq {
namespace {

using namespace checks;      // input checks (csrc/checks.h)
using namespace cpu_common;  // Compute
using namespace cpu_simd;    // AVX2 feature checks and helpers

constexpr int64_t kLanes = 8;       // row padding and dot lanes (one AVX2 register of float32)
constexpr int kRowGroup = 4;        // micro-kernel rows (words) per block
constexpr int kColumnGroup = 3;     // micro-kernel columns (positions) per block: 12 accumulators
constexpr double kEps = 1e-12;      // F.normalize's eps

// out[i * out_stride + j] = a_i . b_j for i < rows_a, j < rows_b; rows are `width` long
// (a multiple of kLanes, zero-padded) and `width` apart.
template <typename C>
using DotsFn = void (*)(const C*, int64_t, const C*, int64_t, int64_t, C*, int64_t);

// ---------------------------------------------------------------------------------------------
// Dot micro-kernels
// ---------------------------------------------------------------------------------------------
namespace baseline {

// One pair: 8 lanes, then a fixed pairwise sum of the lanes.
template <typename C>
inline C dot(const C* a, const C* b, int64_t width) {
  C lane[kLanes] = {};
  for (int64_t d = 0; d < width; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += a[d + l] * b[d + l];
  }
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

template <typename C>
void dots(const C* a, int64_t rows_a, const C* b, int64_t rows_b, int64_t width, C* out,
          int64_t out_stride) {
  for (int64_t i = 0; i < rows_a; ++i) {
    for (int64_t j = 0; j < rows_b; ++j)
      out[i * out_stride + j] = dot(a + i * width, b + j * width, width);
  }
}

}  // namespace baseline

#if LGVQ_HAVE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

// R rows of a against K rows of b; each pair: acc = fma(a, b, acc) over the width, then
// horizontal_sum - the same sequence for every R x K, so the results do not depend on blocking.
template <int R, int K>
inline void dot_block(const float* a, const float* b, int64_t width, float* out,
                      int64_t out_stride) {
  __m256 acc[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = _mm256_setzero_ps();
  for (int64_t d = 0; d < width; d += kLanes) {
    __m256 bv[K];
    for (int k = 0; k < K; ++k) bv[k] = _mm256_loadu_ps(b + k * width + d);
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_loadu_ps(a + r * width + d);
      for (int k = 0; k < K; ++k) acc[r][k] = _mm256_fmadd_ps(av, bv[k], acc[r][k]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) out[r * out_stride + k] = horizontal_sum(acc[r][k]);
}

template <int R>
inline void dot_rows(const float* a, const float* b, int64_t rows_b, int64_t width, float* out,
                     int64_t out_stride) {
  int64_t j = 0;
  for (; j + kColumnGroup <= rows_b; j += kColumnGroup)
    dot_block<R, kColumnGroup>(a, b + j * width, width, out + j, out_stride);
  for (; j < rows_b; ++j) dot_block<R, 1>(a, b + j * width, width, out + j, out_stride);
}

void dots(const float* a, int64_t rows_a, const float* b, int64_t rows_b, int64_t width,
          float* out, int64_t out_stride) {
  int64_t i = 0;
  for (; i + kRowGroup <= rows_a; i += kRowGroup)
    dot_rows<kRowGroup>(a + i * width, b, rows_b, width, out + i * out_stride, out_stride);
  for (; i < rows_a; ++i)
    dot_rows<1>(a + i * width, b, rows_b, width, out + i * out_stride, out_stride);
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // LGVQ_HAVE_AVX2

// out[i * n + j] = a_i . a_j for i, j < n: the upper triangle by row blocks, mirrored (exact:
// the micro-kernel's a_i . a_j and a_j . a_i round the same).
template <typename C>
void gram(DotsFn<C> dots, const C* a, int64_t n, int64_t width, C* out) {
  for (int64_t i = 0; i < n; i += kRowGroup) {
    dots(a + i * width, std::min<int64_t>(kRowGroup, n - i), a + i * width, n - i, width,
         out + i * n + i, n);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) out[i * n + j] = out[j * n + i];
}

// ---------------------------------------------------------------------------------------------
// Per-sample state (the part shared by forward and backward)
// ---------------------------------------------------------------------------------------------

// Sum of squares of a zero-padded row (width a multiple of kLanes): 8 lanes, fixed lane sum.
template <typename C>
C padded_squares(const C* x, int64_t width) {
  C lane[kLanes] = {};
  for (int64_t d = 0; d < width; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += x[d + l] * x[d + l];
  }
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

// dst = src / max(|src|, eps) in C, zero-padded to `width` (F.normalize), as a product with the
// reciprocal (within an ulp of the quotient): the division took as long as the similarity
// GEMM (measured at B=32, M=256, C=384: ~45% of the forward's kernel time, 1 thread).
template <typename T, typename C>
void normalized_row(const T* src, int64_t dim, int64_t width, C* dst) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<C>(src[d]);
  std::fill(dst + dim, dst + width, C(0));
  const C inverse = C(1) / std::max(std::sqrt(padded_squares(dst, width)), static_cast<C>(kEps));
  for (int64_t d = 0; d < dim; ++d) dst[d] *= inverse;
}

template <typename T>
struct Sample {
  using C = Compute<T>;
  int64_t length, positions, dim, width;
  DotsFn<C> dots;
  std::vector<C> words;      // [L, width] normalised, then masked in place (w_hat)
  std::vector<C> visual;     // [M, width] normalised
  std::vector<C> scores;     // [L, M] similarity; reused for nothing else
  std::vector<int64_t> chosen;
  std::vector<C> best, mask, norm, den;
  std::vector<C> unit;       // [L, width] u_i / max(|u_i|, eps), u_i = s_i c_{chosen_i}
  std::vector<C> code_side;  // [L, width] c_hat = m * unit
  std::vector<C> code_gram, word_gram, difference;  // [L, L]

  Sample(int64_t l, int64_t m, int64_t c)
      : length(l), positions(m), dim(c), width((c + kLanes - 1) / kLanes * kLanes),
        dots(LGVQ_PICK_ISA((std::is_same_v<C, float>), cpu_has_avx2_fma, &avx2::dots,
                           &baseline::dots<C>)),
        words(l * width), visual(m * width), scores(l * m), chosen(l), best(l), mask(l), norm(l), den(l), unit(l * width), code_side(l * width),
        code_gram(l * l), word_gram(l * l), difference(l * l) {}

  void compute(const T* w, const T* v, const T* codes, const bool* word_mask) {
    for (int64_t i = 0; i < length; ++i) normalized_row(w + i * dim, dim, width, &words[i * width]);
    for (int64_t p = 0; p < positions; ++p)
      normalized_row(v + p * dim, dim, width, &visual[p * width]);
    dots(words.data(), length, visual.data(), positions, width, scores.data(), positions);
    for (int64_t i = 0; i < length; ++i) {
      // torch.max semantics: the first maximum; a NaN wins (the first NaN)
      const C* row = &scores[i * positions];
      C top = row[0];
      int64_t index = 0;
      for (int64_t p = 1; p < positions && !std::isnan(top); ++p) {
        if (row[p] > top || std::isnan(row[p])) {
          top = row[p];
          index = p;
        }
      }
      chosen[i] = index;
      best[i] = top;
      mask[i] = word_mask[i] ? C(1) : C(0);
    }
    for (int64_t i = 0; i < length; ++i) {
      const T* c = codes + chosen[i] * dim;
      C* u = &unit[i * width];
      for (int64_t d = 0; d < dim; ++d) u[d] = best[i] * static_cast<C>(c[d]);
      std::fill(u + dim, u + width, C(0));
      norm[i] = std::sqrt(padded_squares(u, width));
      den[i] = std::max(norm[i], static_cast<C>(kEps));
      C* side = &code_side[i * width];
      C* word = &words[i * width];
      for (int64_t d = 0; d < dim; ++d) {
        u[d] /= den[i];
        side[d] = u[d] * mask[i];  // a product, like the reference: NaN * 0 stays NaN
        word[d] *= mask[i];
      }
      std::fill(side + dim, side + width, C(0));
    }
    gram(dots, code_side.data(), length, width, code_gram.data());
    gram(dots, words.data(), length, width, word_gram.data());
    for (int64_t k = 0; k < length * length; ++k) difference[k] = code_gram[k] - word_gram[k];
  }

  C squared_difference() const {
    C total = 0;
    for (const C d : difference) total += d * d;
    return total;
  }

  // grad_codes_sample [M, C] (zeroed here) gets this sample's gradient; coef = 4 g / (B L L).
  // Scratch: `grad` [L, width], `padded` [L, L8], `side_t` [width, L8] (L8 = L rounded up to
  // kLanes), `acc` [C], `order` [L].
  void backward(C coef, T* grad_codes_sample, std::vector<C>& grad, std::vector<C>& padded,
                std::vector<C>& side_t, std::vector<C>& acc, std::vector<int64_t>& order) const {
    // D c_hat [L, width] as dots of D's rows with the columns of c_hat (the micro-kernel)
    const int64_t length8 = (length + kLanes - 1) / kLanes * kLanes;
    padded.assign(length * length8, C(0));
    side_t.assign(width * length8, C(0));
    for (int64_t i = 0; i < length; ++i) {
      std::copy(&difference[i * length], &difference[i * length] + length, &padded[i * length8]);
      for (int64_t d = 0; d < dim; ++d) side_t[d * length8 + i] = code_side[i * width + d];
    }
    grad.resize(length * width);
    dots(padded.data(), length, side_t.data(), width, length8, grad.data(), width);
    for (int64_t i = 0; i < length; ++i) {
      C* g = &grad[i * width];
      const C* u = &unit[i * width];
      C radial = 0;
      for (int64_t d = 0; d < dim; ++d) {
        g[d] = g[d] * coef * mask[i];  // grad of c_hat_i = coef (D c_hat)_i, then the mask
        radial += u[d] * g[d];
      }
      // through n = u / max(|u|, eps): (I - n n^T) g / |u| (just g / eps below eps), u = s c
      const bool project = norm[i] > static_cast<C>(kEps);
      for (int64_t d = 0; d < dim; ++d) {
        const C through = project ? g[d] - u[d] * radial : g[d];
        g[d] = through / den[i] * best[i];
      }
    }
    // per position, the sum of its words' gradients in ascending word order
    std::fill(grad_codes_sample, grad_codes_sample + positions * dim, T(0));
    order.resize(length);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return chosen[a] < chosen[b]; });
    for (int64_t k = 0; k < length;) {
      const int64_t position = chosen[order[k]];
      acc.assign(grad.begin() + order[k] * width, grad.begin() + order[k] * width + dim);
      for (++k; k < length && chosen[order[k]] == position; ++k) {
        const C* g = &grad[order[k] * width];
        for (int64_t d = 0; d < dim; ++d) acc[d] += g[d];
      }
      T* out = grad_codes_sample + position * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(acc[d]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

// Checks the inputs; returns them contiguous, in one dtype (all in the compute dtype when they
// differ, as the reference computes: codes.dtype decides).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare(
    const char* op, const at::Tensor& words, const at::Tensor& visual, const at::Tensor& codes,
    const at::Tensor& word_mask) {
  check_relation_inputs(op, words, visual, codes, word_mask);
  const auto dtype = codes.scalar_type();
  if (words.scalar_type() == dtype && visual.scalar_type() == dtype) {
    return {words.contiguous(), visual.contiguous(), codes.contiguous(), word_mask.contiguous()};
  }
  const auto compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return {words.to(compute).contiguous(), visual.to(compute).contiguous(),
          codes.to(compute).contiguous(), word_mask.contiguous()};
}

std::tuple<at::Tensor, at::Tensor> relation_alignment_loss_cpu(const at::Tensor& words_in,
                                                               const at::Tensor& visual_in,
                                                               const at::Tensor& codes_in,
                                                               const at::Tensor& mask_in) {
  const auto [words, visual, codes, word_mask] =
      prepare("relation_alignment_loss", words_in, visual_in, codes_in, mask_in);
  const int64_t batch = words.size(0), length = words.size(1), dim = words.size(2);
  const int64_t positions = visual.size(1);
  const auto compute = codes_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor chosen = at::empty({batch, length}, codes.options().dtype(at::kLong));
  at::Tensor loss = at::zeros({}, codes.options().dtype(compute));
  if (batch * length == 0) return {loss, chosen};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(),
                                  "lgvq_relation_alignment_loss_cpu", [&] {
    using C = Compute<scalar_t>;
    const scalar_t* w = words.data_ptr<scalar_t>();
    const scalar_t* v = visual.data_ptr<scalar_t>();
    const scalar_t* c = codes.data_ptr<scalar_t>();
    const bool* m = word_mask.data_ptr<bool>();
    int64_t* chosen_ptr = chosen.data_ptr<int64_t>();
    std::vector<C> partials(batch);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Sample<scalar_t> sample(length, positions, dim);
      for (int64_t b = begin; b < end; ++b) {
        sample.compute(w + b * length * dim, v + b * positions * dim, c + b * positions * dim,
                       m + b * length);
        std::copy(sample.chosen.begin(), sample.chosen.end(), chosen_ptr + b * length);
        partials[b] = sample.squared_difference();
      }
    });
    // samples in order: the same bits for any thread count
    double total = 0;
    for (const C p : partials) total += static_cast<double>(p);
    loss.fill_(total / (static_cast<double>(batch) * length * length));
  });
  return {loss, chosen};
}

at::Tensor relation_alignment_loss_backward_cpu(const at::Tensor& grad_loss,
                                                const at::Tensor& words_in,
                                                const at::Tensor& visual_in,
                                                const at::Tensor& codes_in,
                                                const at::Tensor& mask_in) {
  constexpr const char* op = "relation_alignment_loss_backward";
  const auto [words, visual, codes, word_mask] =
      prepare(op, words_in, visual_in, codes_in, mask_in);
  check_device(op, "grad_loss", grad_loss, codes_in.device());
  check_scalar(op, "grad_loss", grad_loss);
  const int64_t batch = words.size(0), length = words.size(1), dim = words.size(2);
  const int64_t positions = visual.size(1);
  at::Tensor grad_codes = at::empty(codes.sizes(), codes.options());
  if (batch * length == 0) return at::zeros(codes_in.sizes(), codes_in.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(),
                                  "lgvq_relation_alignment_loss_backward_cpu", [&] {
    using C = Compute<scalar_t>;
    // the reference's 4 * grad_loss / count, in the compute type
    const C g = static_cast<C>(grad_loss.to(at::kDouble).item<double>());
    const C coef = C(4) * g / static_cast<C>(batch * length * length);
    const scalar_t* w = words.data_ptr<scalar_t>();
    const scalar_t* v = visual.data_ptr<scalar_t>();
    const scalar_t* c = codes.data_ptr<scalar_t>();
    const bool* m = word_mask.data_ptr<bool>();
    scalar_t* out = grad_codes.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Sample<scalar_t> sample(length, positions, dim);
      std::vector<C> grad, padded, side_t, acc;
      std::vector<int64_t> order;
      for (int64_t b = begin; b < end; ++b) {
        sample.compute(w + b * length * dim, v + b * positions * dim, c + b * positions * dim,
                       m + b * length);
        sample.backward(coef, out + b * positions * dim, grad, padded, side_t, acc, order);
      }
    });
  });
  return grad_codes.scalar_type() == codes_in.scalar_type() ? grad_codes
                                                            : grad_codes.to(codes_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lgvq_C, CPU, m) {
  m.impl("relation_alignment_loss", &relation_alignment_loss_cpu);
  m.impl("relation_alignment_loss_backward", &relation_alignment_loss_backward_cpu);
}

}  // namespace lgvq
