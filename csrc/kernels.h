// Raw CPU kernels for the base-weight products of the fused adapter linear.
//
// No ATen here: the kernels see plain pointers and index ranges, and the ATen glue
// (ops.cpp) splits the work over threads and handles the small adapter products. Each
// instruction set (AVX-512, AVX2, portable C++) compiles the same kernel bodies
// (kernels_impl.h) in its own translation unit; `select_kernels` picks one at run time
// from the CPU's features, so one build runs on any x86-64 machine.
#pragma once

#include <cstdint>

namespace speclora_cpu {

enum class WeightKind : int { f32 = 0, bf16 = 1, f16 = 2, nf4 = 3 };

// Rounding applied to a dequantized NF4 value, so it equals `dequantize_nf4(w, w.dtype)`.
enum class Rounding : int { none = 0, bf16 = 1, f16 = 2 };

// Read-only view of a base weight W (n x k): dense row-major (row stride `ld`), or NF4 in
// bitsandbytes' layout: element e = row * k + col is nibble e of `data` (even element in
// the high nibble), scaled by block scale b = e >> blocksize_log2, which is `absmax[b]`,
// or with double quantization `code2[absmax_code[b]] * absmax2[b >> nested_log2] + offset`
// (two fp32 roundings, as bitsandbytes).
struct WeightView {
  WeightKind kind = WeightKind::f32;
  int64_t n = 0, k = 0, ld = 0;
  const void* data = nullptr;
  const float* absmax = nullptr;
  const uint8_t* absmax_code = nullptr;
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  float offset = 0.f;
  int blocksize_log2 = 6;
  int nested_log2 = 8;
  Rounding rounding = Rounding::none;
};

// One instruction set's kernels. `scratch` must hold `k` floats for `rows` and `k1 - k0`
// floats for `cols`; it is only used for NF4 rows that do not start on a 16-element
// boundary (in_features not a multiple of 16), which are dequantized there first.
struct Kernels {
  // y[m, n] += sum_k x[m, k] * W[n, k]   for m < M, n0 <= n < n1   (x: M x k, fp32)
  void (*rows)(const WeightView& w, const float* x, int64_t M, int64_t ldx, int64_t n0,
               int64_t n1, float* y, int64_t ldy, float* scratch);
  // Same for NF4 with k % 32 == 0 and x in pair order: every 32 columns of x reordered as
  // the 16 even then the 16 odd ones (x.view(M, k / 32, 16, 2).transpose(-1, -2)).
  void (*rows_pairs)(const WeightView& w, const float* x, int64_t M, int64_t ldx, int64_t n0,
                     int64_t n1, float* y, int64_t ldy);
  // dx[m, k] += sum_n dy[m, n] * W[n, k]   for m < M, k0 <= k < k1   (dy: M x n, fp32)
  void (*cols)(const WeightView& w, const float* dy, int64_t M, int64_t ldd, int64_t k0,
               int64_t k1, float* dx, int64_t ldx, float* scratch);
  // out[(n - n0) * ldo + (k - k0)] = W[n, k]   (dequantized / widened to fp32)
  void (*tile)(const WeightView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
               float* out, int64_t ldo);
  const char* isa;
};

// nullptr when the instruction set was not compiled in (non-x86 or a compiler without
// target attributes); the portable set always exists.
const Kernels* kernels_avx512();
const Kernels* kernels_avx2();
const Kernels* kernels_portable();

}  // namespace speclora_cpu
