// Kernel bodies of csrc/cpu/nearest_code.cpp. Included twice there: once compiled for AVX2+FMA
// (only where LGVQ_HAVE_AVX2, csrc/cpu/simd.h) and once for the baseline ISA, inside namespaces
// named by LGVQ_ISA; the entry point picks one at run time. No include guard on purpose.

namespace LGVQ_ISA {

// Codes per panel of the direct path's transposed codebook (one vector register of float32 in
// that ISA's micro-kernel: 8 for AVX2 and the baseline, 16 for AVX-512).
#ifdef LGVQ_PANEL
constexpr int64_t kPanel = LGVQ_PANEL;
#else
constexpr int64_t kPanel = 8;
#endif

// Running (value, index) minimum with ties to the lower index.
template <typename T>
struct Best {
  T value = std::numeric_limits<T>::infinity();
  int64_t index = 0;
  inline void merge(T v, int64_t i) {
    if (v < value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
};

// The end of a tile's scan, shared by the generic and the vectorised scan_scores: the scalar
// tail j in [full, count) (score(j)), then the tile's minimum into `best`.
template <typename T, typename Score>
inline void finish_tile(Best<T>& tile, int64_t full, int64_t count, int64_t first_code,
                        Score score, Best<T>& best) {
  for (int64_t j = full; j < count; ++j) {
    const T v = score(j);
    // tail indices are larger than every lane index: a strict comparison keeps the lowest
    if (v < tile.value && v > -std::numeric_limits<T>::infinity()) {
      tile.value = v;
      tile.index = j;
    }
  }
  if (tile.value < best.value) {  // earlier tiles hold lower indices: they win ties
    best.value = tile.value;
    best.index = first_code + tile.index;
  }
}

// Folds scores a[j] + m * dots[j], j in [0, count), of codes first_code + j into `best`.
template <typename T>
inline void scan_scores(const T* dots, const T* a, T m, int64_t count, int64_t first_code,
                        Best<T>& best) {
  T lane_value[kLanes];
  int32_t lane_index[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    lane_value[l] = std::numeric_limits<T>::infinity();
    lane_index[l] = 0;
  }
  const int64_t full = count - count % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
#pragma GCC unroll 8
    for (int64_t l = 0; l < kLanes; ++l) {
      const T v = a[j + l] + m * dots[j + l];
      const bool better = v < lane_value[l] && v > -std::numeric_limits<T>::infinity();
      lane_value[l] = better ? v : lane_value[l];
      lane_index[l] = better ? static_cast<int32_t>(j + l) : lane_index[l];
    }
  }
  Best<T> tile;
  for (int64_t l = 0; l < kLanes; ++l) {
    if (lane_value[l] < std::numeric_limits<T>::infinity()) tile.merge(lane_value[l], lane_index[l]);
  }
  finish_tile(tile, full, count, first_code, [&](int64_t j) { return a[j] + m * dots[j]; }, best);
}

template <typename T>
inline uint64_t row_key(const T* row, int64_t dim) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t,
                                  std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  uint64_t key = 0;
  for (int64_t d = 0; d < dim; ++d) {
    Bits bits;
    std::memcpy(&bits, row + d, sizeof(T));  // the bit pattern (no aliasing through a cast)
    key += bits;
  }
  return key;
}

// u.v in 8 independent partial sums, added up in a fixed order: vectorised without
// reassociating (a serial sum is not). |row|^2 is row.row; the AVX2 and AVX-512 builds
// specialise squared_norm for float32
// with explicit FMAs in more chains (left to itself GCC's AVX-512 build of this loop went to
// scalar adds and shuffles: 1x16384x256 took 1.6 ms against 0.46 ms for addmm + argmin).
template <typename T>
inline T lane_dot(const T* u, const T* v, int64_t dim) {
  T lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += u[d + l] * v[d + l];
  T sum = 0;
  for (; d < dim; ++d) sum += u[d] * v[d];
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

template <typename T>
inline T squared_norm(const T* row, int64_t dim) {
  return lane_dot(row, row, dim);
}

// squared_norm of `count` consecutive rows into out (the AVX2 and AVX-512 builds specialise it
// for float32: eight rows at a time, the same values bit for bit).
template <typename T>
inline void squared_norms(const T* rows, int64_t count, int64_t dim, T* out) {
  for (int64_t c = 0; c < count; ++c) out[c] = squared_norm(rows + c * dim, dim);
}

template <typename T>
inline T inverse_of_norm(T squared) {
  return T(1) / std::max(std::sqrt(squared), T(1e-12));
}

template <typename T>
inline T dot(const T* u, const T* v, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += u[i] * v[i];
  return s;
}

// x_r . row for the n <= kOwnDotMaxRows rows of x (contiguous, dim wide) into out[r * stride]:
// the few-rows path with one to four rows, where a tile's GEMM is a matrix-vector product bound
// by reading the codes and a BLAS call per 256-code tile costs more than its products. Eight
// partial sums per row (lane_dot: squared_norm's order), added up in a fixed order (float32
// with AVX2 or AVX-512 never comes here: its few_rows_tile makes the products in its own pass).
template <typename T>
inline void row_dots(const T* x, int64_t n, int64_t dim, const T* row, T* out, int64_t stride) {
  for (int64_t r = 0; r < n; ++r) out[r * stride] = lane_dot(x + r * dim, row, dim);
}

// Cosine takes codes of any norm: the search reads unit codes c * inv, inv = 1 / max(|c|,
// 1e-12) (F.normalize's clamp), made a tile, a panel or a row at a time where the kernel reads
// the codes anyway, never as a K x D copy. A code with an infinite or NaN entry gets a NaN unit
// code (inv is 0 or NaN), whose scores are never chosen, as after F.normalize.
template <typename T>
inline T inverse_norm(const T* row, int64_t dim) {
  return inverse_of_norm(squared_norm(row, dim));
}

template <typename T>
inline void unit_rows(const T* rows, const T* inv, int64_t count, int64_t dim, T* out) {
  for (int64_t c = 0; c < count; ++c)
    for (int64_t d = 0; d < dim; ++d) out[c * dim + d] = rows[c * dim + d] * inv[c];
}

// inverse_norm of every code, in parallel (the ISA's squared_norm: the few-rows path's values).
template <typename T>
void inverse_norms(const T* codes, int64_t k, int64_t dim, T* inv) {
  at::parallel_for(0, k, 256, [&](int64_t begin, int64_t end) {
    squared_norms(codes + begin * dim, end - begin, dim, inv + begin);
    for (int64_t c = begin; c < end; ++c) inv[c] = inverse_of_norm(inv[c]);
  });
}

// x.(c * inv), the unit code's elements rounded as the search's tiles and panels hold them.
template <typename T>
inline T unit_dot(const T* u, const T* code, T inv, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += u[i] * (code[i] * inv);
  return s;
}

// Writes the final distance of each row given its best score.
template <typename T>
inline void finish_row(const T* xrow, const T* codes, const T* a, T m, int64_t dim, const T* inv,
                       const Best<T>& best, int64_t* index_out, T* distance_out) {
  *index_out = best.index;
  if (inv != nullptr) {
    // Cosine, x rows of any norm: the search ranked -x.u over unit codes u (the order of
    // -x.u / |x|); the distance divides the chosen similarity by |x| (clamped at 1e-12, as
    // F.normalize), so no normalised copy of x is ever made. Every score non-finite:
    // best.index is 0, code 0.
    const T norm = std::sqrt(dot(xrow, xrow, dim));
    *distance_out = T(1) - unit_dot(xrow, codes + best.index * dim, inv[best.index], dim) /
                               std::max(norm, T(1e-12));
    return;
  }
  T score = best.value;
  if (!(score < std::numeric_limits<T>::infinity())) {  // every score non-finite: code 0
    score = a[0] + m * dot(xrow, codes, dim);
  }
  {
    const T d = dot(xrow, xrow, dim) + score;
    *distance_out = d > T(0) ? d : (d == d ? T(0) : d);  // clamp at 0, keep NaN
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM-tile path
// ---------------------------------------------------------------------------------------------
template <typename T>
void nearest_code_gemm(const at::Tensor& x, const at::Tensor& codes, const T* a, T m, const T* inv,
                       int64_t* indices, T* distances) {
  const int64_t n = x.size(0), k = codes.size(0), dim = x.size(1);
  const T* x_ptr = x.data_ptr<T>();
  const T* codes_ptr = codes.data_ptr<T>();
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  dynamic_blocks(blocks, [&](const auto& next_block) {
    std::vector<T> scratch(kBlockRows * std::min(k, kTileCodes));
    // cosine: the tile's unit codes, made before its GEMM (tile x D work against the GEMM's
    // 2 x 256 x tile x D: ~0.2%)
    std::vector<T> unit(inv != nullptr ? std::min(k, kTileCodes) * dim : 0);
    std::vector<Best<T>> best(kBlockRows);
    const auto options = x.options();
    for (int64_t block; (block = next_block()) >= 0;) {
      const int64_t row0 = block * kBlockRows;
      const int64_t rows = std::min(kBlockRows, n - row0);
      std::fill(best.begin(), best.end(), Best<T>{});
      const at::Tensor x_block = x.narrow(0, row0, rows);
      for (int64_t code0 = 0; code0 < k; code0 += kTileCodes) {
        const int64_t tile = std::min(kTileCodes, k - code0);
        at::Tensor out = at::from_blob(scratch.data(), {rows, tile}, options);
        if (inv != nullptr) {
          unit_rows(codes_ptr + code0 * dim, inv + code0, tile, dim, unit.data());
          at::mm_out(out, x_block, at::from_blob(unit.data(), {tile, dim}, options).t());
        } else {
          at::mm_out(out, x_block, codes.narrow(0, code0, tile).t());
        }
        for (int64_t r = 0; r < rows; ++r) {
          scan_scores<T>(scratch.data() + r * tile, a + code0, m, tile, code0, best[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = row0 + r;
        finish_row<T>(x_ptr + row * dim, codes_ptr, a, m, dim, inv, best[r], indices + row,
                      distances + row);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Direct micro-kernel path (small D)
// ---------------------------------------------------------------------------------------------

// The direct path's codebook: lane panels [k_padded / kPanel][dim][kPanel] (cosine: of the
// unit codes c * inv, rounded as the GEMM tiles round them), k_padded a multiple of two panels
// (one step of the AVX2 and AVX-512 micro-kernels), and the score offsets a padded with +inf so
// that the padding codes never win. O(K * D), built once per call.
template <typename T>
struct LanePanels {
  int64_t k_padded;
  std::vector<T> codes_t, a_padded;
  LanePanels(const T* codes, int64_t k, int64_t dim, const T* a, const T* inv)
      : k_padded((k + 2 * kPanel - 1) / (2 * kPanel) * (2 * kPanel)),
        codes_t(dim * k_padded, T(0)),
        a_padded(k_padded, std::numeric_limits<T>::infinity()) {
    for (int64_t c = 0; c < k; ++c) {
      T* panel = codes_t.data() + (c / kPanel) * kPanel * dim + c % kPanel;
      const T* code = codes + c * dim;
      if (inv != nullptr) {
        for (int64_t d = 0; d < dim; ++d) panel[d * kPanel] = code[d] * inv[c];
      } else {
        for (int64_t d = 0; d < dim; ++d) panel[d * kPanel] = code[d];
      }
      a_padded[c] = a[c];
    }
  }
};

// The running (value, index) minima of one row group of a vectorised direct kernel between
// steps: kRows rows x two panels x kPanel lanes, in memory (L1), read and written with
// unaligned vector loads and stores (a std::vector of a struct of __m512 members came back
// 32-byte aligned here, and an aligned store to it crashed).
template <int64_t kRows>
struct GroupMinima {
  float value[kRows * 2][kPanel];
  int32_t index[kRows * 2][kPanel];
  void reset() {
    std::fill_n(&value[0][0], kRows * 2 * kPanel, std::numeric_limits<float>::infinity());
    std::fill_n(&index[0][0], kRows * 2 * kPanel, 0);
  }
  // once per group and block, after its sweep: plain C++ is enough
  bool any_minus_inf() const {
    return std::any_of(&value[0][0], &value[0][0] + kRows * 2 * kPanel,
                       [](float v) { return v == -std::numeric_limits<float>::infinity(); });
  }
};

// Codes per chunk of the vectorised direct kernels: the chunk's panels (kChunkBytes) stay in
// L1 while every row group of a block reads them; a whole number of steps (two panels).
constexpr int64_t kChunkBytes = 16 * 1024;
inline int64_t chunk_codes(int64_t dim) {
  return std::max<int64_t>(2 * kPanel,
                           kChunkBytes / (dim * int64_t(sizeof(float))) / (2 * kPanel) *
                               (2 * kPanel));
}

// A block's row groups swept over the codebook chunk by chunk (fold(finite, g, j0, j1) folds
// codes [j0, j1) into group g's state), then every group whose minima took -inf searched again
// over all codes with the finite test (see the kernels' keep_lower).
template <typename State, typename Fold>
inline void sweep_groups(int64_t groups, int64_t k_padded, int64_t chunk, State* state,
                         const Fold& fold) {
  for (int64_t g = 0; g < groups; ++g) state[g].reset();
  for (int64_t j0 = 0; j0 < k_padded; j0 += chunk) {
    const int64_t j1 = std::min(k_padded, j0 + chunk);
    for (int64_t g = 0; g < groups; ++g) fold(std::false_type{}, g, j0, j1);
  }
  for (int64_t g = 0; g < groups; ++g) {
    if (state[g].any_minus_inf()) {
      state[g].reset();
      fold(std::true_type{}, g, 0, k_padded);
    }
  }
}

// kRowGroup rows against all codes; codes_t holds the codebook in panels of kPanel codes,
// [k_padded / kPanel][dim][kPanel] (k_padded % kPanel == 0), padded codes scored +inf through
// a_padded. Panels make a step's loads one contiguous run of dim x kPanel values: the former
// [dim][K] layout read dim lines K * 4 bytes apart, which alias to one L1 set when K * 4 is a multiple
// of 4 KiB (measured 2048x2048x32: 17.6 ms vs 4.0 ms at D=16, one thread).
template <typename T>
inline void direct_row_group(const T* rows_ptr, int64_t dim, const T* codes_t, const T* a_padded,
                             T m, int64_t k_padded, Best<T>* best) {
  T lane_value[kRowGroup][kPanel];
  int32_t lane_index[kRowGroup][kPanel];
  for (int64_t r = 0; r < kRowGroup; ++r)
    for (int64_t l = 0; l < kPanel; ++l) {
      lane_value[r][l] = std::numeric_limits<T>::infinity();
      lane_index[r][l] = 0;
    }
  for (int64_t j = 0; j < k_padded; j += kPanel) {
    T acc[kRowGroup][kPanel] = {};
    for (int64_t d = 0; d < dim; ++d) {
      const T* c = codes_t + j * dim + d * kPanel;
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRowGroup; ++r) {
        const T xv = rows_ptr[r * dim + d];
#pragma GCC unroll 8
        for (int64_t l = 0; l < kPanel; ++l) acc[r][l] += xv * c[l];
      }
    }
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRowGroup; ++r) {
#pragma GCC unroll 8
      for (int64_t l = 0; l < kPanel; ++l) {
        const T v = a_padded[j + l] + m * acc[r][l];
        const bool better = v < lane_value[r][l] && v > -std::numeric_limits<T>::infinity();
        lane_value[r][l] = better ? v : lane_value[r][l];
        lane_index[r][l] = better ? static_cast<int32_t>(j + l) : lane_index[r][l];
      }
    }
  }
  for (int64_t r = 0; r < kRowGroup; ++r) {
    Best<T> b;
    for (int64_t l = 0; l < kPanel; ++l) {
      if (lane_value[r][l] < std::numeric_limits<T>::infinity()) b.merge(lane_value[r][l], lane_index[r][l]);
    }
    best[r] = b;
  }
}

template <typename T>
void nearest_code_direct(const at::Tensor& x, const at::Tensor& codes, const T* a, T m,
                         const T* inv, int64_t* indices, T* distances) {
  const int64_t n = x.size(0), dim = x.size(1);
  const T* codes_ptr = codes.data_ptr<T>();
  const LanePanels<T> panels(codes_ptr, codes.size(0), dim, a, inv);
  const int64_t k_padded = panels.k_padded;
  const T* codes_t = panels.codes_t.data();
  const T* a_padded = panels.a_padded.data();
  const T* x_ptr = x.data_ptr<T>();
  const int64_t blocks = (n + kDirectBlockRows - 1) / kDirectBlockRows;
  dynamic_blocks(blocks, [&](const auto& next_block) {
    std::vector<T> padded_rows(kRowGroup * dim, T(0));
    Best<T> best[kRowGroup];
    for (int64_t block; (block = next_block()) >= 0;) {
      const int64_t row_end = std::min(n, (block + 1) * kDirectBlockRows);
      for (int64_t row0 = block * kDirectBlockRows; row0 < row_end; row0 += kRowGroup) {
        const int64_t rows = std::min(kRowGroup, row_end - row0);
        const T* rows_ptr = x_ptr + row0 * dim;
        if (rows < kRowGroup) {  // pad the last group with copies of its first row
          for (int64_t r = 0; r < kRowGroup; ++r)
            std::copy_n(x_ptr + (row0 + std::min(r, rows - 1)) * dim, dim,
                        padded_rows.data() + r * dim);
          rows_ptr = padded_rows.data();
        }
        direct_row_group<T>(rows_ptr, dim, codes_t, a_padded, m, k_padded, best);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = row0 + r;
          finish_row<T>(x_ptr + row * dim, codes_ptr, a, m, dim, inv, best[r], indices + row,
                        distances + row);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Few rows (N <= kBlockRows, D on the GEMM path): parallel over codebook tiles instead of row
// blocks (one row block would leave every other thread idle), and the per-code work (|c|^2
// when not given, the duplicate key) done tile by tile just before the tile's GEMM reads the
// same codes back from cache: one pass over the codebook instead of three. Per-tile minima are
// merged in tile order, so earlier tiles (lower indices) win ties.
// ---------------------------------------------------------------------------------------------
// a_out[c] = |c|^2 (given_a when passed) or, cosine (inv_out), a_out[c] = 0 and inv_out[c] =
// 1 / max(|c|, 1e-12), for `count` consecutive codes.
template <typename T>
inline void tile_norms(const T* codes, int64_t count, int64_t dim, const T* given_a, T* a_out,
                       T* inv_out) {
  if (inv_out != nullptr) {  // cosine (given_a is never passed)
    squared_norms(codes, count, dim, inv_out);
    for (int64_t c = 0; c < count; ++c) {
      a_out[c] = T(0);
      inv_out[c] = inverse_of_norm(inv_out[c]);
    }
  } else if (given_a != nullptr) {
    std::copy(given_a, given_a + count, a_out);
  } else {
    squared_norms(codes, count, dim, a_out);
  }
}

// The few-rows path's per-tile work with n <= kOwnDotMaxRows rows and no BLAS call: the codes'
// norms (tile_norms), duplicate keys (row_key) and products x_r.c into dots[r * count + j]. The
// AVX2 and AVX-512 builds specialise it for float32 as one pass that reads each code once.
template <typename T>
inline void few_rows_tile(const T* x, int64_t n, const T* codes, int64_t count, int64_t dim,
                          const T* given_a, T* a_out, T* inv_out, uint64_t* keys, T* dots) {
  tile_norms(codes, count, dim, given_a, a_out, inv_out);
  for (int64_t c = 0; c < count; ++c) {
    keys[c] = row_key(codes + c * dim, dim);
    row_dots(x, n, dim, codes + c * dim, dots + c, count);
  }
}

template <typename T>
void nearest_code_few_rows(const at::Tensor& x, const at::Tensor& codes, const T* given_a,
                           T m, T* inv_out, uint64_t* keys, T* a_out, int64_t* indices,
                           T* distances) {
  const int64_t n = x.size(0), k = codes.size(0), dim = x.size(1);
  const T* codes_ptr = codes.data_ptr<T>();
  const T* x_ptr = x.data_ptr<T>();
  const bool own_dots = n <= kOwnDotMaxRows;
  const int64_t tiles = (k + kFewRowsTileCodes - 1) / kFewRowsTileCodes;
  std::vector<Best<T>> tile_best(tiles * n);
  dynamic_blocks(tiles, [&](const auto& next_block) {
    std::vector<T> scratch(n * std::min(k, kFewRowsTileCodes));
    // cosine: with fewer rows than D the tile's scores x.c are scaled by 1/|c| (n x count
    // multiplies), otherwise its unit codes are made before the GEMM (count x D)
    const bool scale_scores = n < dim;
    std::vector<T> unit(inv_out != nullptr && !scale_scores
                            ? std::min(k, kFewRowsTileCodes) * dim : 0);
    const auto options = x.options();
    for (int64_t t; (t = next_block()) >= 0;) {
      const int64_t code0 = t * kFewRowsTileCodes;
      const int64_t count = std::min(kFewRowsTileCodes, k - code0);
      const T* tile_codes = codes_ptr + code0 * dim;
      const T* tile_given = given_a != nullptr ? given_a + code0 : nullptr;
      T* tile_inv = inv_out != nullptr ? inv_out + code0 : nullptr;
      if (own_dots) {  // keys, |c|^2 (or 1/|c|) and x.c in one pass over the tile's codes
        few_rows_tile(x_ptr, n, tile_codes, count, dim, tile_given, a_out + code0, tile_inv,
                      keys + code0, scratch.data());
      } else {
        // |c|^2 of the tile's codes (cosine: their inverse norms), eight codes side by side
        tile_norms(tile_codes, count, dim, tile_given, a_out + code0, tile_inv);
        for (int64_t c = code0; c < code0 + count; ++c) keys[c] = row_key(codes_ptr + c * dim, dim);
        at::Tensor out = at::from_blob(scratch.data(), {n, count}, options);
        if (inv_out != nullptr && !scale_scores) {  // the tile's unit codes, from cache
          unit_rows(tile_codes, tile_inv, count, dim, unit.data());
          at::mm_out(out, x, at::from_blob(unit.data(), {count, dim}, options).t());
        } else {
          at::mm_out(out, x, codes.narrow(0, code0, count).t());
        }
      }
      if (inv_out != nullptr && scale_scores) {  // (always with own_dots: n <= 4 < dim here)
        for (int64_t r = 0; r < n; ++r)
          for (int64_t j = 0; j < count; ++j) scratch[r * count + j] *= inv_out[code0 + j];
      }
      for (int64_t r = 0; r < n; ++r)
        scan_scores<T>(scratch.data() + r * count, a_out + code0, m, count, code0, tile_best[t * n + r]);
    }
  });
  for (int64_t r = 0; r < n; ++r) {
    Best<T> merged;
    for (int64_t t = 0; t < tiles; ++t) {
      const Best<T>& b = tile_best[t * n + r];
      if (b.value < merged.value) merged = b;  // strict: the earlier tile keeps a tie
    }
    finish_row<T>(x.data_ptr<T>() + r * dim, codes_ptr, a_out, m, dim, inv_out, merged,
                  indices + r, distances + r);
  }
}

}  // namespace LGVQ_ISA
