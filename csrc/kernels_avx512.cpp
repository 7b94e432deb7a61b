// AVX-512 kernels: one 16-float zmm per chunk; the 16 NF4 levels sit in one register and a
// single vpermps decodes 16 weights. Compiled with a target attribute region, not global
// -m flags, so the rest of the build stays baseline x86-64 and this code only runs after
// the runtime check in ops.cpp.
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

namespace speclora_cpu {
namespace avx512 {

using V = __m512;
struct Lut { __m512 table; };
constexpr int kMT = 8;    // 8 x 2 accumulators + 2 decoded chunks + x: 19 of 32 zmm
// 16-column chunks of dx per backward tile: a whole 64-byte line of codes per row of W
// when MT <= 2, else what the 32 zmm leave room for.
constexpr int cols_chunks(int mt) { return mt <= 2 ? 8 : mt <= 4 ? 4 : 2; }
constexpr int kRows = 2;

static inline V v_zero() { return _mm512_setzero_ps(); }
static inline V v_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void v_store(float* p, V a) { _mm512_storeu_ps(p, a); }
static inline V v_set1(float s) { return _mm512_set1_ps(s); }
static inline V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(V a) { return _mm512_reduce_add_ps(a); }

static inline V v_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline V v_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

static inline Lut lut_make(const float* t) { return {_mm512_loadu_ps(t)}; }

static inline V v_nf4(const uint8_t* p, const Lut& lut, float scale) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
  const __m128i lo = _mm_and_si128(bytes, low4);
  // Even elements live in the high nibble: interleave (hi, lo) to get element order.
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
  return _mm512_mul_ps(_mm512_permutexvar_ps(idx, lut.table), _mm512_set1_ps(scale));
}

// 16 bytes -> 32 weights with one widening and two permutes (vpermps reads only the low
// 4 bits of each index, so the odd elements need no mask).
static inline void v_nf4_pair(const uint8_t* p, const Lut& lut, float scale, V& even, V& odd) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 s = _mm512_set1_ps(scale);
  even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut.table), s);
  odd = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, lut.table), s);
}

// Round to bf16 (nearest even) and back, as torch's float -> bfloat16 cast (NaN -> 0x7FC0).
static inline V v_round_bf16(V v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), nan,
                            _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
}
static inline V v_round_f16(V v) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#include "kernels_impl.h"

static const Kernels kTable = {rows, rows_pairs, cols, tile, "avx512"};

}  // namespace avx512
}  // namespace speclora_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace speclora_cpu {
const Kernels* kernels_avx512() { return &avx512::kTable; }
}  // namespace speclora_cpu

#else
namespace speclora_cpu {
const Kernels* kernels_avx512() { return nullptr; }
}  // namespace speclora_cpu
#endif
