// Portable kernels (any CPU): a chunk is 16 floats in an array; the compiler vectorizes
// what the baseline instruction set allows.
#include "kernels.h"

#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace speclora_cpu {
namespace portable {

struct V { float v[16]; };
struct Lut { float table[16]; };
constexpr int kMT = 4;
constexpr int cols_chunks(int) { return 1; }
constexpr int kRows = 1;

static inline V v_zero() {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = 0.f;
  return r;
}
static inline V v_load(const float* p) {
  V r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
static inline void v_store(float* p, V a) { std::memcpy(p, a.v, sizeof(a.v)); }
static inline V v_set1(float s) {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = s;
  return r;
}
static inline V v_fma(V a, V b, V c) {
  for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
static inline float v_sum(V a) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += a.v[i];
  return s;
}
static inline V v_bf16(const uint16_t* p) {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(c10::BFloat16(p[i], c10::BFloat16::from_bits()));
  return r;
}
static inline V v_f16(const uint16_t* p) {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(c10::Half(p[i], c10::Half::from_bits()));
  return r;
}
static inline Lut lut_make(const float* t) {
  Lut l;
  std::memcpy(l.table, t, sizeof(l.table));
  return l;
}
static inline V v_nf4(const uint8_t* p, const Lut& lut, float scale) {
  V r;
  for (int i = 0; i < 8; ++i) {
    r.v[2 * i] = lut.table[p[i] >> 4] * scale;
    r.v[2 * i + 1] = lut.table[p[i] & 15] * scale;
  }
  return r;
}
static inline void v_nf4_pair(const uint8_t* p, const Lut& lut, float scale, V& even, V& odd) {
  for (int i = 0; i < 16; ++i) {
    even.v[i] = lut.table[p[i] >> 4] * scale;
    odd.v[i] = lut.table[p[i] & 15] * scale;
  }
}
static inline V v_round_bf16(V a) {
  for (int i = 0; i < 16; ++i) a.v[i] = static_cast<float>(c10::BFloat16(a.v[i]));
  return a;
}
static inline V v_round_f16(V a) {
  for (int i = 0; i < 16; ++i) a.v[i] = static_cast<float>(c10::Half(a.v[i]));
  return a;
}

#include "kernels_impl.h"

static const Kernels kTable = {rows, rows_pairs, cols, tile, "portable"};

}  // namespace portable

const Kernels* kernels_portable() { return &portable::kTable; }

}  // namespace speclora_cpu
