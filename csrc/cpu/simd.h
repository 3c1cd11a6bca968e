// The one home of the CPU kernels' instruction-set choice: whether this build has AVX2 kernels
// at all (compile time), whether this CPU runs them (run time), the pick between an AVX2 and a
// baseline version of a kernel, and the 8-lane float loads/stores of float, half and bfloat16
// rows that the AVX2 kernels share.
//
// LGVQ_HAVE_AVX2 is 1 only when compiling for x86-64 with GCC: the AVX2 kernels are compiled
// under `#pragma GCC target(...)` (which clang ignores) and picked at run time with
// __builtin_cpu_supports. Everywhere else (aarch64 such as Grace/GH200, clang, MSVC) the AVX2 code
// is not compiled and <immintrin.h> is not included: the baseline kernels serve, and the CUDA
// kernels that share this extension still build. Each kernel file wraps its AVX2 versions in
// `#if LGVQ_HAVE_AVX2` and picks with LGVQ_PICK_ISA.
//
// Two switches force the baseline kernels on an AVX2 machine, to test the portable path there:
//   -DLGVQ_NO_AVX2           at build time: no AVX2 code at all, as on aarch64
//                            (tests/kernels/test_cpu_portable_build.py compiles every CPU source
//                            this way);
//   LGVQ_NO_AVX2=1           in the environment, read once at the first kernel call: the AVX2
//                            kernels are compiled but not picked.
// A third, LGVQ_NO_AVX512=1 in the environment, keeps the nearest-code search on its AVX2
// kernels on an AVX-512 machine. lgvq_kernels._C.cpu_isa() says which set runs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LGVQ_NO_AVX2)
#define LGVQ_HAVE_AVX2 1
#include <immintrin.h>
#else
#define LGVQ_HAVE_AVX2 0
#endif

namespace lgvq::cpu_simd {

// LGVQ_NO_AVX2 set in the environment (and not "0" or empty) turns the AVX2 kernels off.
inline bool avx2_disabled_by_environment() {
  const char* value = std::getenv("LGVQ_NO_AVX2");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// AVX2 and FMA: this build has the AVX2 kernels, the CPU runs them and the environment allows.
inline bool cpu_has_avx2_fma() {
#if LGVQ_HAVE_AVX2
  static const bool has = !avx2_disabled_by_environment() && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Also F16C: the half <-> float conversions of load8/store8.
inline bool cpu_has_avx2_fma_f16c() {
#if LGVQ_HAVE_AVX2
  static const bool has = cpu_has_avx2_fma() && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// LGVQ_NO_AVX512 set in the environment (and not "0" or empty) turns the AVX-512 kernels off
// (the AVX2 ones still run): to test the AVX2 path on an AVX-512 machine.
inline bool avx512_disabled_by_environment() {
  const char* value = std::getenv("LGVQ_NO_AVX512");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// AVX-512 F/DQ/BW/VL on top of AVX2 and FMA (the nearest-code float32 kernels have such
// versions: MKL's GEMM runs AVX-512 on these CPUs, so an AVX2 search there competes at half the
// FMA width). __builtin_cpu_supports also checks that the OS saves the AVX-512 state.
inline bool cpu_has_avx512() {
#if LGVQ_HAVE_AVX2
  static const bool has = cpu_has_avx2_fma() && !avx512_disabled_by_environment() &&
                          __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

// What the CPU kernels run here: "avx512+avx2+fma+f16c" (the nearest-code search in AVX-512,
// the other kernels in AVX2), "avx2+fma+f16c", "avx2+fma" (the float32 kernels only) or
// "baseline".
inline const char* cpu_isa() {
  if (cpu_has_avx2_fma_f16c()) return cpu_has_avx512() ? "avx512+avx2+fma+f16c" : "avx2+fma+f16c";
  if (cpu_has_avx2_fma()) return cpu_has_avx512() ? "avx512+avx2+fma" : "avx2+fma";
  return "baseline";
}

}  // namespace lgvq::cpu_simd

// LGVQ_PICK_ISA(eligible, cpu_check, avx2_version, baseline_version): the kernel a call should
// use, as an expression. avx2_version where this build has the AVX2 kernels, the compile-time
// condition `eligible` holds (e.g. the AVX2 version exists for float32 accumulation only) and
// cpu_check() says the CPU runs them; else baseline_version. Where `eligible` is false the AVX2
// expression is not instantiated; without LGVQ_HAVE_AVX2 it is not even compiled. Both versions
// must have one type; wrap an argument holding a comma in parentheses.
#if LGVQ_HAVE_AVX2
#define LGVQ_PICK_ISA(eligible, cpu_check, avx2_version, baseline_version) \
  ([&] {                                                                  \
    if constexpr (eligible) {                                             \
      if (cpu_check()) return avx2_version;                               \
    }                                                                     \
    return baseline_version;                                              \
  }())
#else
#define LGVQ_PICK_ISA(eligible, cpu_check, avx2_version, baseline_version) (baseline_version)
#endif

#if LGVQ_HAVE_AVX2
namespace lgvq::cpu_simd {

#pragma GCC push_options
#pragma GCC target("avx2,fma")
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even, NaN -> 0x7fc0: the same bits as c10::BFloat16(float).
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#pragma GCC pop_options

}  // namespace lgvq::cpu_simd
#endif  // LGVQ_HAVE_AVX2
