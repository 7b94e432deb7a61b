// AVX2 + FMA + F16C kernels: a chunk is two 8-float ymm; the 16 NF4 levels are split over
// two registers, looked up with two vpermps and merged on bit 3 of the index.
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace speclora_cpu {
namespace avx2 {

struct V { __m256 lo, hi; };
struct Lut { __m256 lo, hi; };
constexpr int kMT = 4;    // 4 x 2 ymm accumulators + chunk + x: 12 of 16 ymm
constexpr int cols_chunks(int mt) { return mt <= 2 ? 2 : 1; }  // 16 ymm
constexpr int kRows = 1;

static inline V v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v_store(float* p, V a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
static inline V v_set1(float s) {
  const __m256 b = _mm256_set1_ps(s);
  return {b, b};
}
static inline V v_fma(V a, V b, V c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline float v_sum(V a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

static inline __m256 widen_bf16(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline V v_bf16(const uint16_t* p) {
  return {widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
static inline V v_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}

static inline Lut lut_make(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }

static inline __m256 lookup(const Lut& lut, __m256i idx) {
  const __m256 low = _mm256_permutevar8x32_ps(lut.lo, idx);   // uses idx & 7
  const __m256 high = _mm256_permutevar8x32_ps(lut.hi, idx);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static inline V v_nf4(const uint8_t* p, const Lut& lut, float scale) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4),
                                        _mm_and_si128(bytes, low4));
  const __m256 s = _mm256_set1_ps(scale);
  return {_mm256_mul_ps(lookup(lut, _mm256_cvtepu8_epi32(idx)), s),
          _mm256_mul_ps(lookup(lut, _mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8))), s)};
}

// 16 bytes -> 32 weights: each byte widened once serves its even (high) and odd (low)
// nibble; `lookup` reads bits 0-3 only, so no masks.
static inline void v_nf4_pair(const uint8_t* p, const Lut& lut, float scale, V& even, V& odd) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo8 = _mm256_cvtepu8_epi32(bytes), hi8 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  const __m256 s = _mm256_set1_ps(scale);
  even = {_mm256_mul_ps(lookup(lut, _mm256_srli_epi32(lo8, 4)), s),
          _mm256_mul_ps(lookup(lut, _mm256_srli_epi32(hi8, 4)), s)};
  odd = {_mm256_mul_ps(lookup(lut, lo8), s), _mm256_mul_ps(lookup(lut, hi8), s)};
}

static inline __m256 round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_castsi256_ps(r),
                          _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
}
static inline V v_round_bf16(V v) { return {round_bf16(v.lo), round_bf16(v.hi)}; }
static inline V v_round_f16(V v) {
  return {_mm256_cvtph_ps(_mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT)),
          _mm256_cvtph_ps(_mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT))};
}

#include "kernels_impl.h"

static const Kernels kTable = {rows, rows_pairs, cols, tile, "avx2"};

}  // namespace avx2
}  // namespace speclora_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace speclora_cpu {
const Kernels* kernels_avx2() { return &avx2::kTable; }
}  // namespace speclora_cpu

#else
namespace speclora_cpu {
const Kernels* kernels_avx2() { return nullptr; }
}  // namespace speclora_cpu
#endif
