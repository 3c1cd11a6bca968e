// The few-rows tile for float32 (see nearest_code.cpp), included once in each vector ISA's
// namespace, which supplies code_pass<R> (one code's |c|^2 partials, key and x_r.c) and
// ordered_norm_sums. No include guard on purpose.

// few_rows_tile for float32 and R rows: code_pass<R> for each code, then the |c|^2 sums of
// eight codes at once (ordered_norm_sums, as squared_norms). Each code's read is prefetched
// kPrefetchCodes codes ahead. Measured at 1 x 16384 x 256, kernel alone: 0.40-0.47 ms on 2
// threads, 0.71-0.80 ms on one (2-core Xeon, AVX2 pass), against 0.81 / 1.3 ms for separate
// passes with a BLAS call per tile; MKL's bare product 0.34 / 0.60 ms. On a later 2-core Xeon
// (three alternating processes each), kernel / MKL's bare product on 2 threads: 1.11-1.16 with
// the AVX-512 pass, 1.14-1.27 with the AVX2 one; the search is bound by the codebook's read.
template <int R>
inline void few_rows_tile_rows(const float* x, const float* codes, int64_t count, int64_t dim,
                               const float* given_a, float* a_out, float* inv_out,
                               uint64_t* keys, float* dots) {
  float part[kLanes][4 * kLanes];  // part[i]: code i's 32 |c|^2 partials, in order
  float tail[kLanes];
  const bool norms = given_a == nullptr;
  for (int64_t c0 = 0; c0 < count; c0 += kLanes) {
    const int64_t group = std::min<int64_t>(kLanes, count - c0);
    for (int64_t i = 0; i < group; ++i) {
      const int64_t c = c0 + i;
      const float* row = codes + c * dim;
      if (c + kPrefetchCodes < count) {  // the code kPrefetchCodes ahead, line by line
        const char* ahead = reinterpret_cast<const char*>(row + kPrefetchCodes * dim);
        const int64_t bytes = dim * int64_t(sizeof(float));
        for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
        _mm_prefetch(ahead + bytes - 1, _MM_HINT_T0);  // the last line, when the row is unaligned
      }
      tail[i] = code_pass<R>(x, row, dim, part[i], keys[c], dots + c, count);
    }
    if (!norms) {
      std::copy(given_a + c0, given_a + c0 + group, a_out + c0);
      continue;
    }
    ordered_norm_sums(part, tail, group, inv_out != nullptr ? inv_out + c0 : a_out + c0);
    if (inv_out != nullptr) {
      for (int64_t i = 0; i < group; ++i) {
        a_out[c0 + i] = 0.0f;
        inv_out[c0 + i] = inverse_of_norm(inv_out[c0 + i]);
      }
    }
  }
}

template <>
inline void few_rows_tile<float>(const float* x, int64_t n, const float* codes, int64_t count,
                                 int64_t dim, const float* given_a, float* a_out, float* inv_out,
                                 uint64_t* keys, float* dots) {
  switch (n) {
    case 1: return few_rows_tile_rows<1>(x, codes, count, dim, given_a, a_out, inv_out, keys, dots);
    case 2: return few_rows_tile_rows<2>(x, codes, count, dim, given_a, a_out, inv_out, keys, dots);
    case 3: return few_rows_tile_rows<3>(x, codes, count, dim, given_a, a_out, inv_out, keys, dots);
    case 4: return few_rows_tile_rows<4>(x, codes, count, dim, given_a, a_out, inv_out, keys, dots);
    default: TORCH_INTERNAL_ASSERT(false, "few_rows_tile: 1 to 4 rows, got ", n);
  }
}
