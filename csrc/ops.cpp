// CPU implementation of the fused adapter linear, registered as `torch.ops.speclora_cpu.*`:
//
//     y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T
//
// with the same semantics as `_torch_forward` / `_torch_backward` in
// speclora_kernels/ops/autograd.py (x' = keep * x / (1 - p) for the first `dropout_rows` rows of
// D; only the first `grad_rows` rows of D / columns of U get gradient; t = x' @ D.T is
// returned in the accumulation dtype and saved for backward).
//
// Where the time goes and how each part is done:
// - dense base in the accumulation dtype (fp32 / fp64): ATen GEMMs, exactly what nn.Linear
//   runs, with the adapter folded in place: y = addmm(bias, x, W.T); y.addmm_(t * s, U.T).
// - NF4 base (bitsandbytes layout) or a bf16 / fp16 dense base: the kernels in kernels_*.cpp.
//   For few rows (decode: M <= kSmallM forward, <= kSmallMBackward for dx) W is decoded 16
//   elements at a time straight into FMAs, one pass over the packed bytes, threads split
//   the output rows (forward) or the input columns (dx). For more rows each thread decodes
//   a tile of W (4 MB of fp32) and hands it to the BLAS GEMM, so the weight is never
//   materialized whole.
// - the adapter path (rank R << in, out): small ATen GEMMs; its result initializes y (or dx)
//   and the base product accumulates into it, so y is written once by each.
// Per-operator headers (not ATen/ATen.h): the build is on the first use's critical path.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"

namespace speclora_cpu {
namespace {

using at::Tensor;
using c10::ScalarType;
using OptTensor = std::optional<Tensor>;

// Rows of x (forward) / dy (backward) up to which the register kernels beat decoding tiles of
// W for the BLAS GEMM (measured at 4096 x 4096: forward 16, backward 2).
constexpr int64_t kSmallM = 16;
constexpr int64_t kSmallMBackward = 2;
constexpr int64_t kTileFloats = 1 << 20;  // fp32 tile of W per thread on the GEMM path (4 MB)
constexpr int64_t kRowChunk = 32;         // output rows per work item, register forward
constexpr int64_t kSlab = 256;            // dx columns per work item, register backward

// ------------------------------------------------------------------ instruction set
bool cpu_has(const char* isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::string(isa) == "avx512") return __builtin_cpu_supports("avx512f");
  if (std::string(isa) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(isa) == "portable";
}

const Kernels* kernels_named(const std::string& name) {
  const Kernels* k = nullptr;
  if (name == "avx512") k = kernels_avx512();
  else if (name == "avx2") k = kernels_avx2();
  else if (name == "portable") k = kernels_portable();
  else TORCH_CHECK_VALUE(false, "isa must be 'avx512', 'avx2' or 'portable', got '", name, "'");
  return (k && cpu_has(name.c_str())) ? k : nullptr;
}

// Best set this CPU runs; SPECLORA_CPU_ISA=avx2|portable caps it (for tests and debugging).
const Kernels* best_kernels() {
  const char* env = std::getenv("SPECLORA_CPU_ISA");
  if (env && *env) {
    const Kernels* k = kernels_named(env);
    TORCH_CHECK_VALUE(k, "SPECLORA_CPU_ISA=", env, " is not supported on this CPU/build");
    return k;
  }
  for (const char* name : {"avx512", "avx2"})
    if (const Kernels* k = kernels_named(name)) return k;
  return kernels_portable();
}

std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels& kernels() {
  const Kernels* k = g_kernels.load();
  if (!k) {
    k = best_kernels();
    g_kernels.store(k);
  }
  return *k;
}

// isa(name=None): the instruction set in use; with a name, switch to it first.
std::string isa(std::optional<std::string> name) {
  if (name) {
    const Kernels* k = kernels_named(*name);
    TORCH_CHECK_VALUE(k, "isa '", *name, "' is not supported on this CPU/build");
    g_kernels.store(k);
  }
  return kernels().isa;
}

// ------------------------------------------------------------------ dropout mask
// Keep-mask bit-identical to ops/dropout.py `dropout_keep_mask` (and so to the Triton
// kernels): element (m, k) of x takes 16 bits of Philox-4x32-10 counter
// m * ceil(K / 8) + k / 8 (slot q = k % 8: word q / 2, half q % 2) and is kept when they are
// >= round(p * 65536).
inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

inline void philox4x32(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_b, hi_a;
    const uint32_t lo_b = mulhilo(0xCD9E8D57u, c2, &hi_b);
    const uint32_t lo_a = mulhilo(0xD2511F53u, c0, &hi_a);
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "rows and cols must be >= 0, got ", rows, ", ", cols);
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  Tensor out = at::empty({rows, cols}, at::kBool);
  bool* data = out.data_ptr<bool>();
  const int64_t groups = (cols + 7) / 8;
  const uint32_t threshold = static_cast<uint32_t>(
      std::floor(static_cast<double>(static_cast<float>(p)) * 65536.0 + 0.5));
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    uint32_t words[4];
    for (int64_t m = r0; m < r1; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        philox4x32(static_cast<uint64_t>(seed), static_cast<uint64_t>(m * groups + g), words);
        const int64_t k0 = g * 8, n = std::min<int64_t>(8, cols - k0);
        for (int64_t q = 0; q < n; ++q)
          data[m * cols + k0 + q] = ((words[q / 2] >> (16 * (q % 2))) & 0xFFFFu) >= threshold;
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------ the base weight
struct Base {
  int64_t n = 0, k = 0;
  Tensor dense;              // defined: ATen GEMMs with this weight (accumulation dtype)
  WeightView view;           // otherwise: the kernels read this
  std::vector<Tensor> hold;  // keeps the tensors the view points into alive
};

ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

void check_float(const char* name, const Tensor& t) {
  check_cpu(name, t);
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating tensor, got ", t.scalar_type());
}

Base dense_base(const Tensor& x, const Tensor& weight) {
  check_float("weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out x in), got shape ", weight.sizes());
  Base base;
  base.n = weight.size(0);
  base.k = weight.size(1);
  const ScalarType wt = weight.scalar_type();
  if (wt == acc_dtype(x)) {
    base.dense = weight;
    return base;
  }
  TORCH_CHECK_TYPE(wt == at::kBFloat16 || wt == at::kHalf,
                   "weight must be bfloat16, float16, or x's accumulation dtype ",
                   acc_dtype(x), "; got ", wt, " with x ", x.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "float64 x needs a float64 weight, got ", wt);
  base.hold = {weight.contiguous()};
  base.view.kind = wt == at::kBFloat16 ? WeightKind::bf16 : WeightKind::f16;
  base.view.n = base.n;
  base.view.k = base.view.ld = base.k;
  base.view.data = base.hold[0].data_ptr();
  return base;
}

int exact_log2(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return (int64_t(1) << l) == v ? l : -1;
}

Base nf4_base(const Tensor& x, const Tensor& packed, const Tensor& absmax, const OptTensor& absmax2,
              const OptTensor& code2, const OptTensor& offset, int64_t blocksize,
              int64_t nested_blocksize, int64_t out_features, ScalarType weight_dtype) {
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble,
                   "x must be float32, bfloat16 or float16 with an NF4 weight, got float64");
  check_cpu("packed", packed);
  check_cpu("absmax", absmax);
  TORCH_CHECK_VALUE(out_features >= 1, "out_features must be >= 1, got ", out_features);
  const int64_t K = x.size(1), numel = out_features * K;
  const int log2bs = exact_log2(blocksize);
  TORCH_CHECK_VALUE(log2bs >= 4, "blocksize must be a power of two >= 16, got ", blocksize);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte && packed.dim() == 1,
                   "packed must be a 1-D uint8 tensor, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK_VALUE(packed.numel() == (numel + 1) / 2, "packed must hold ceil(", out_features,
                    " * ", K, " / 2) = ", (numel + 1) / 2, " bytes, got ", packed.numel());
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax.dim() == 1 && absmax.numel() == n_blocks, "absmax must have ",
                    n_blocks, " entries (one per ", blocksize, " elements), got ", absmax.sizes());
  TORCH_CHECK_TYPE(weight_dtype == at::kFloat || weight_dtype == at::kBFloat16 ||
                       weight_dtype == at::kHalf,
                   "weight_dtype must be float32, bfloat16 or float16, got ", weight_dtype);
  const bool double_quant = absmax2.has_value();
  TORCH_CHECK_VALUE(double_quant == code2.has_value() && double_quant == offset.has_value(),
                    "absmax2, code2 and offset must be given together (double quant) or not at all");

  Base base;
  base.n = out_features;
  base.k = K;
  WeightView& v = base.view;
  v.kind = WeightKind::nf4;
  v.n = out_features;
  v.k = K;
  v.blocksize_log2 = log2bs;
  v.rounding = weight_dtype == at::kBFloat16 ? Rounding::bf16
               : weight_dtype == at::kHalf   ? Rounding::f16
                                             : Rounding::none;
  Tensor packed_c = packed.contiguous();
  v.data = packed_c.data_ptr();
  std::vector<Tensor> hold = {packed_c};
  if (!double_quant) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat,
                     "absmax must be float32 without double quant, got ", absmax.scalar_type());
    Tensor a = absmax.contiguous();
    v.absmax = a.data_ptr<float>();
    hold.push_back(a);
  } else {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte,
                     "absmax must be uint8 codes with double quant, got ", absmax.scalar_type());
    TORCH_CHECK_VALUE(nested_blocksize >= 1, "nested_blocksize must be >= 1, got ", nested_blocksize);
    const int64_t n_blocks2 = (n_blocks + nested_blocksize - 1) / nested_blocksize;
    check_cpu("absmax2", *absmax2);
    check_cpu("code2", *code2);
    check_cpu("offset", *offset);
    TORCH_CHECK_VALUE(absmax2->scalar_type() == at::kFloat && absmax2->numel() == n_blocks2,
                      "absmax2 must be float32 with ", n_blocks2, " entries, got ",
                      absmax2->scalar_type(), " ", absmax2->sizes());
    TORCH_CHECK_VALUE(code2->scalar_type() == at::kFloat && code2->numel() == 256,
                      "code2 must be float32 with 256 entries, got ", code2->scalar_type(), " ",
                      code2->sizes());
    TORCH_CHECK_VALUE(offset->scalar_type() == at::kFloat && offset->numel() == 1,
                      "offset must be a one-element float32 tensor, got ", offset->scalar_type(),
                      " ", offset->sizes());
    const int log2nb = exact_log2(nested_blocksize);
    Tensor codes = absmax.contiguous(), a2 = absmax2->contiguous(), c2 = code2->contiguous();
    const float off = offset->item<float>();
    if (log2nb >= 0) {
      v.absmax_code = codes.data_ptr<uint8_t>();
      v.absmax2 = a2.data_ptr<float>();
      v.code2 = c2.data_ptr<float>();
      v.offset = off;
      v.nested_log2 = log2nb;
      hold.insert(hold.end(), {codes, a2, c2});
    } else {
      // Unusual nested block size: decode the block scales once (two fp32 roundings).
      Tensor scales = at::empty({n_blocks}, at::kFloat);
      float* out = scales.data_ptr<float>();
      const uint8_t* q = codes.data_ptr<uint8_t>();
      const float* m2 = a2.data_ptr<float>();
      const float* c = c2.data_ptr<float>();
      for (int64_t b = 0; b < n_blocks; ++b) {
        const float prod = c[q[b]] * m2[b / nested_blocksize];
        out[b] = prod + off;
      }
      v.absmax = out;
      hold.push_back(scales);
    }
  }
  base.hold = std::move(hold);
  return base;
}


// ------------------------------------------------------------------ base products
// Tile extent along a dimension of `rows` when the other has `cols` (rows of W for the
// forward, columns for dx): about kTileFloats floats, a multiple of 16, and small enough
// that every thread gets a tile.
int64_t tile_rows(int64_t rows, int64_t cols) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nt = std::max<int64_t>(16, kTileFloats / std::max<int64_t>(cols, 1));
  nt = std::min(nt, (rows + threads - 1) / threads);
  return std::max<int64_t>(16, (nt + 15) / 16 * 16);
}

// Hands items [0, count) to the ATen threads one at a time through a shared counter: when a
// thread loses its core (a shared machine), the others take its share instead of waiting at
// the end of a static split. `work(next)` runs once per thread and calls next() until it
// returns an index >= count.
template <class Work>
void parallel_items(int64_t count, const Work& work) {
  if (count <= 0) return;
  std::atomic<int64_t> counter{0};
  const auto next = [&counter] { return counter.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) { work(next); });
}

// y (M x N, fp32, contiguous) += x (M x K, fp32, contiguous) @ W.T
void base_forward(const Base& base, const Tensor& x, Tensor& y) {
  const int64_t M = x.size(0), N = base.n, K = base.k;
  if (M == 0 || N == 0) return;
  const Kernels& kern = kernels();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= kSmallM) {
    const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
    if (base.view.kind == WeightKind::nf4 && K % 32 == 0) {
      const Tensor xq = x.view({M, K / 32, 16, 2}).transpose(2, 3).contiguous();  // pair order
      const float* xqp = xq.data_ptr<float>();
      parallel_items(chunks, [&](const auto& next) {
        for (int64_t c = next(); c < chunks; c = next())
          kern.rows_pairs(base.view, xqp, M, K, c * kRowChunk, std::min(N, (c + 1) * kRowChunk),
                          yp, N);
      });
      return;
    }
    parallel_items(chunks, [&](const auto& next) {
      std::vector<float> scratch(K);
      for (int64_t c = next(); c < chunks; c = next())
        kern.rows(base.view, xp, M, K, c * kRowChunk, std::min(N, (c + 1) * kRowChunk), yp, N,
                  scratch.data());
    });
    return;
  }
  const int64_t nt = tile_rows(N, K), tiles = (N + nt - 1) / nt;
  parallel_items(tiles, [&](const auto& next) {
    Tensor buf = at::empty({nt, K}, at::kFloat);
    for (int64_t t = next(); t < tiles; t = next()) {
      const int64_t n0 = t * nt, rows = std::min(nt, N - n0);
      kern.tile(base.view, n0, n0 + rows, 0, K, buf.data_ptr<float>(), K);
      y.narrow(1, n0, rows).addmm_(x, buf.narrow(0, 0, rows).t());
    }
  });
}

// dx (M x K, fp32, contiguous) += dy (M x N, fp32, contiguous) @ W
void base_backward(const Base& base, const Tensor& dy, Tensor& dx) {
  const int64_t M = dy.size(0), N = base.n, K = base.k;
  if (M == 0 || K == 0) return;
  const Kernels& kern = kernels();
  const float* dyp = dy.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  if (M <= kSmallMBackward) {
    const int64_t slabs = (K + kSlab - 1) / kSlab;
    parallel_items(slabs, [&](const auto& next) {
      std::vector<float> scratch(kSlab);
      for (int64_t s = next(); s < slabs; s = next())
        kern.cols(base.view, dyp, M, N, s * kSlab, std::min(K, (s + 1) * kSlab), dxp, K,
                  scratch.data());
    });
    return;
  }
  const int64_t kt = tile_rows(K, N), tiles = (K + kt - 1) / kt;
  parallel_items(tiles, [&](const auto& next) {
    Tensor buf = at::empty({N, kt}, at::kFloat);
    for (int64_t t = next(); t < tiles; t = next()) {
      const int64_t k0 = t * kt, cols = std::min(kt, K - k0);
      kern.tile(base.view, 0, N, k0, k0 + cols, buf.data_ptr<float>(), kt);
      dx.narrow(1, k0, cols).addmm_(dy, buf.narrow(1, 0, cols));
    }
  });
}

// ------------------------------------------------------------------ forward / backward
struct Adapter {
  int64_t M, K, N, R, rd;  // rd: rows of D that see dropout (0 without a keep-mask)
};

Adapter check_adapter(const Tensor& x, const Base& base, const OptTensor& bias, const Tensor& down,
                      const Tensor& scale, const Tensor& up, const OptTensor& keep, double p,
                      int64_t dropout_rows) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M x in_features), got shape ", x.sizes());
  check_float("down", down);
  check_float("scale", scale);
  check_float("up", up);
  const int64_t M = x.size(0), K = x.size(1), N = base.n, R = down.dim() == 2 ? down.size(0) : -1;
  TORCH_CHECK_VALUE(base.k == K, "weight has in_features=", base.k, " but x has ", K);
  TORCH_CHECK_VALUE(down.dim() == 2 && down.size(1) == K, "down must be (R x ", K, "), got ",
                    down.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == R, "scale must be (", R, ",), got ",
                    scale.sizes());
  TORCH_CHECK_VALUE(up.dim() == 2 && up.size(0) == N && up.size(1) == R, "up must be (", N, " x ",
                    R, "), got ", up.sizes());
  if (bias) {
    check_float("bias", *bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be (", N, ",), got ",
                      bias->sizes());
  }
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(dropout_rows >= 0 && dropout_rows <= R, "dropout_rows must be in [0, ", R, "], got ",
                    dropout_rows);
  if (keep) {
    check_cpu("keep", *keep);
    TORCH_CHECK_VALUE(keep->scalar_type() == at::kBool && keep->sizes() == x.sizes(),
                      "keep must be a bool tensor shaped like x ", x.sizes(), ", got ",
                      keep->scalar_type(), " ", keep->sizes());
  }
  return {M, K, N, R, keep ? dropout_rows : 0};
}

// t = x' @ D.T, x' = keep * x / (1 - p) on the first rd rows of D (as _torch_forward).
Tensor down_projection(const Tensor& xa, const Tensor& d, const OptTensor& keep, double p,
                       const Adapter& a) {
  if (a.rd == 0) return at::mm(xa, d.t());
  Tensor dropped = at::mm(xa * *keep, d.narrow(0, 0, a.rd).t()).div_(1.0 - p);
  if (a.rd == a.R) return dropped;
  return at::cat({dropped, at::mm(xa, d.narrow(0, a.rd, a.R - a.rd).t())}, 1);
}

std::tuple<Tensor, Tensor> forward(const Tensor& x, const Base& base, const OptTensor& bias,
                                   const Tensor& down, const Tensor& scale, const Tensor& up,
                                   const OptTensor& keep, double p, int64_t dropout_rows,
                                   bool save_t) {
  const Adapter a = check_adapter(x, base, bias, down, scale, up, keep, p, dropout_rows);
  const ScalarType acc = acc_dtype(x);
  const Tensor xa = x.to(acc).contiguous();
  const Tensor t = down_projection(xa, down.to(acc), keep, p, a);
  const Tensor ts = t * scale.to(acc);
  const Tensor ua = up.to(acc);
  Tensor y;
  if (base.dense.defined()) {
    // What nn.Linear runs, then the adapter accumulated in place: no extra pass over y.
    y = bias ? at::addmm(bias->to(acc), xa, base.dense.t()) : at::mm(xa, base.dense.t());
    y.addmm_(ts, ua.t());
  } else {
    y = bias ? at::addmm(bias->to(acc), ts, ua.t()) : at::mm(ts, ua.t());
    y = y.contiguous();
    base_forward(base, xa, y);
  }
  return {y.to(x.scalar_type()), save_t ? t : t.new_empty({0, a.R})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& dy, const Tensor& x, const Base& base, const Tensor& down, const Tensor& scale,
    const Tensor& up, const Tensor& t, const OptTensor& keep, double p, int64_t dropout_rows,
    int64_t grad_rows, bool need_dx, bool need_ddown, bool need_dscale, bool need_dup) {
  const Adapter a = check_adapter(x, base, std::nullopt, down, scale, up, keep, p, dropout_rows);
  const int64_t M = a.M, R = a.R, rd = a.rd, rg = grad_rows;
  check_float("dy", dy);
  TORCH_CHECK_VALUE(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == a.N, "dy must be (", M,
                    " x ", a.N, "), got ", dy.sizes());
  TORCH_CHECK_VALUE(rg >= 0 && rg <= R, "grad_rows must be in [0, ", R, "], got ", rg);
  if (need_dscale || need_dup) {
    check_float("t", t);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == M && t.size(1) == R,
                      "t must be the (", M, " x ", R, ") saved by forward(save_t=True), got ",
                      t.sizes());
  }
  const ScalarType acc = acc_dtype(x);
  const Tensor dya = dy.to(acc).contiguous();
  const Tensor s = scale.to(acc), d = down.to(acc);
  Tensor g;
  if (need_dx || need_ddown || need_dscale) g = at::mm(dya, up.to(acc));
  // Distinct empties for the gradients not asked for: a custom op's outputs may not alias.
  const auto none = [&] { return at::empty({0}, x.options()); };
  Tensor dx = none(), d_down = none(), d_scale = none(), d_up = none();

  if (need_dx) {
    const Tensor gs = g * s;
    // Adapter part first (it initializes dx), then the base product accumulates into it.
    Tensor dxa = rd < R ? at::mm(gs.narrow(1, rd, R - rd), d.narrow(0, rd, R - rd))
                        : at::zeros({M, a.K}, dya.options());
    if (rd > 0)  // 1 / (1 - p) on the (M, rd) factor, not on the (M, K) product
      dxa.add_(at::mm(gs.narrow(1, 0, rd) / (1.0 - p), d.narrow(0, 0, rd)).mul_(*keep));
    if (base.dense.defined()) {
      dxa.addmm_(dya, base.dense);
    } else {
      dxa = dxa.contiguous();
      base_backward(base, dya, dxa);
    }
    dx = dxa.to(x.scalar_type());
  }
  if (need_ddown) {
    const Tensor xa = x.to(acc);
    // rows >= rg are frozen: zeros; when every row gets gradient, all are written below
    d_down = rg < R ? at::zeros_like(down) : at::empty_like(down);
    const int64_t cut = std::min(rd, rg);
    if (cut > 0) {
      const Tensor gs = g.narrow(1, 0, cut) * (s.narrow(0, 0, cut) / (1.0 - p));
      d_down.narrow(0, 0, cut).copy_(at::mm(gs.t(), xa * *keep));
    }
    if (rg > cut) {
      const Tensor gs = g.narrow(1, cut, rg - cut) * s.narrow(0, cut, rg - cut);
      d_down.narrow(0, cut, rg - cut).copy_(at::mm(gs.t(), xa));
    }
  }
  if (need_dscale) d_scale = (g * t.to(acc)).sum(0).to(scale.scalar_type());
  if (need_dup) {
    d_up = rg < R ? at::zeros_like(up) : at::empty_like(up);
    if (rg > 0)
      d_up.narrow(1, 0, rg).copy_(at::mm(dya.t(), t.narrow(1, 0, rg).to(acc) * s.narrow(0, 0, rg)));
  }
  return {dx, d_down, d_scale, d_up};
}

// ------------------------------------------------------------------ registered ops
std::tuple<Tensor, Tensor> dense_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                     const Tensor& down, const Tensor& scale, const Tensor& up,
                                     const OptTensor& keep, double p, int64_t dropout_rows,
                                     bool save_t) {
  check_float("x", x);
  return forward(x, dense_base(x, weight), bias, down, scale, up, keep, p, dropout_rows, save_t);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dense_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& down,
    const Tensor& scale, const Tensor& up, const Tensor& t, const OptTensor& keep, double p,
    int64_t dropout_rows, int64_t grad_rows, bool need_dx, bool need_ddown, bool need_dscale,
    bool need_dup) {
  check_float("x", x);
  return backward(dy, x, dense_base(x, weight), down, scale, up, t, keep, p, dropout_rows,
                  grad_rows, need_dx, need_ddown, need_dscale, need_dup);
}

std::tuple<Tensor, Tensor> nf4_fwd(const Tensor& x, const Tensor& packed, const Tensor& absmax,
                                   const OptTensor& absmax2, const OptTensor& code2,
                                   const OptTensor& offset, int64_t blocksize,
                                   int64_t nested_blocksize, int64_t out_features,
                                   ScalarType weight_dtype, const OptTensor& bias,
                                   const Tensor& down, const Tensor& scale, const Tensor& up,
                                   const OptTensor& keep, double p, int64_t dropout_rows,
                                   bool save_t) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M x in_features), got shape ", x.sizes());
  const Base base = nf4_base(x, packed, absmax, absmax2, code2, offset, blocksize,
                             nested_blocksize, out_features, weight_dtype);
  return forward(x, base, bias, down, scale, up, keep, p, dropout_rows, save_t);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nf4_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& packed, const Tensor& absmax,
    const OptTensor& absmax2, const OptTensor& code2, const OptTensor& offset, int64_t blocksize,
    int64_t nested_blocksize, int64_t out_features, ScalarType weight_dtype, const Tensor& down,
    const Tensor& scale, const Tensor& up, const Tensor& t, const OptTensor& keep, double p,
    int64_t dropout_rows, int64_t grad_rows, bool need_dx, bool need_ddown, bool need_dscale,
    bool need_dup) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M x in_features), got shape ", x.sizes());
  const Base base = nf4_base(x, packed, absmax, absmax2, code2, offset, blocksize,
                             nested_blocksize, out_features, weight_dtype);
  return backward(dy, x, base, down, scale, up, t, keep, p, dropout_rows, grad_rows, need_dx,
                  need_ddown, need_dscale, need_dup);
}

}  // namespace
}  // namespace speclora_cpu

TORCH_LIBRARY(speclora_cpu, m) {
  m.def(
      "dense_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor scale, Tensor up, "
      "Tensor? keep, float dropout_p, int dropout_rows, bool save_t) -> (Tensor, Tensor)");
  m.def(
      "dense_bwd(Tensor dy, Tensor x, Tensor weight, Tensor down, Tensor scale, Tensor up, "
      "Tensor t, Tensor? keep, float dropout_p, int dropout_rows, int grad_rows, bool need_dx, "
      "bool need_ddown, bool need_dscale, bool need_dup) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "nf4_fwd(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, "
      "Tensor? offset, int blocksize, int nested_blocksize, int out_features, "
      "ScalarType weight_dtype, Tensor? bias, Tensor down, Tensor scale, Tensor up, "
      "Tensor? keep, float dropout_p, int dropout_rows, bool save_t) -> (Tensor, Tensor)");
  m.def(
      "nf4_bwd(Tensor dy, Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, "
      "Tensor? code2, Tensor? offset, int blocksize, int nested_blocksize, int out_features, "
      "ScalarType weight_dtype, Tensor down, Tensor scale, Tensor up, Tensor t, Tensor? keep, "
      "float dropout_p, int dropout_rows, int grad_rows, bool need_dx, bool need_ddown, "
      "bool need_dscale, bool need_dup) -> (Tensor, Tensor, Tensor, Tensor)");
  // No tensor inputs to dispatch on: registered for every backend.
  m.def("keep_mask(int seed, int rows, int cols, float p) -> Tensor", &speclora_cpu::keep_mask);
  m.def("isa(str? name=None) -> str", &speclora_cpu::isa);
}

TORCH_LIBRARY_IMPL(speclora_cpu, CPU, m) {
  m.impl("dense_fwd", &speclora_cpu::dense_fwd);
  m.impl("dense_bwd", &speclora_cpu::dense_bwd);
  m.impl("nf4_fwd", &speclora_cpu::nf4_fwd);
  m.impl("nf4_bwd", &speclora_cpu::nf4_bwd);
}
