// Kernel bodies shared by every instruction set. Not a standalone header: each
// kernels_<isa>.cpp includes it inside `namespace speclora_cpu::<isa>` (and inside its
// target region), after defining the 16-float chunk type `V` and its operations:
//
//   V v_zero(); V v_load(const float*); void v_store(float*, V); V v_set1(float);
//   V v_fma(V a, V b, V c)  (a * b + c);  float v_sum(V);
//   V v_bf16(const uint16_t*); V v_f16(const uint16_t*);          16 dense elements
//   Lut lut_make(const float* table16);
//   V v_nf4(const uint8_t* bytes8, const Lut&, float scale);       16 NF4 elements
//   void v_nf4_pair(const uint8_t* bytes16, const Lut&, float scale, V& even, V& odd);
//                                     32 NF4 elements: the 16 even and the 16 odd ones
//   V v_round_bf16(V); V v_round_f16(V);
//   kMT (rows of x / dy per register tile), kRows (rows of W per forward step),
//   cols_chunks(MT) (16-column chunks of dx per backward register tile of MT rows)
//
// and after including <c10/util/BFloat16.h>, <c10/util/Half.h> (scalar conversions).
// Everything here is `static`, so each instruction set gets its own copy.

// The 16 NF4 levels as bitsandbytes lists them, rounded to fp32 like NF4_VALUES in
// speclora_kernels/quant/nf4.py (double literal, then float: the same two roundings).
static const float kNF4[16] = {
    static_cast<float>(-1.0), static_cast<float>(-0.6961928009986877),
    static_cast<float>(-0.5250730514526367), static_cast<float>(-0.39491748809814453),
    static_cast<float>(-0.28444138169288635), static_cast<float>(-0.18477343022823334),
    static_cast<float>(-0.09105003625154495), static_cast<float>(0.0),
    static_cast<float>(0.07958029955625534), static_cast<float>(0.16093020141124725),
    static_cast<float>(0.24611230194568634), static_cast<float>(0.33791524171829224),
    static_cast<float>(0.44070982933044434), static_cast<float>(0.5626170039176941),
    static_cast<float>(0.7229568362236023), static_cast<float>(1.0)};

static inline float s_bf16(uint16_t h) {
  return static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits()));
}
static inline float s_f16(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// Elements of W, one 16-element chunk or one scalar at a time. For NF4 a chunk must start
// at a flat index (n * k + col) that is a multiple of 16: its 8 bytes then hold whole
// pairs and it lies inside one scale block (blocks are >= 32 elements, powers of two).
template <WeightKind KIND, Rounding RND>
struct Src {
  const WeightView& w;
  Lut lut;

  explicit Src(const WeightView& view) : w(view) {
    if constexpr (KIND == WeightKind::nf4) lut = lut_make(kNF4);
  }

  bool aligned(int64_t k0) const {
    return KIND != WeightKind::nf4 || (w.k % 16 == 0 && k0 % 16 == 0);
  }

  float scale(int64_t b) const {
    if (w.absmax) return w.absmax[b];
    // Two separate roundings like bitsandbytes (the build uses -ffp-contract=off).
    const float c = w.code2[w.absmax_code[b]] * w.absmax2[b >> w.nested_log2];
    return c + w.offset;
  }

  // Scale of the NF4 block holding element (n, k); chunks inside one run of
  // `run_end` share it, so it is decoded once per run, not once per chunk.
  float block_scale(int64_t n, int64_t k) const {
    if constexpr (KIND == WeightKind::nf4) return scale((n * w.k + k) >> w.blocksize_log2);
    return 0.f;
  }

  // End (<= kv) of the run of aligned steps of `step` columns from column k that share one
  // block scale: the rest of the block when rows start on block boundaries, else one step.
  int64_t run_end(int64_t k, int64_t kv, int64_t step = 16) const {
    if constexpr (KIND != WeightKind::nf4) return kv;
    const int64_t bs = int64_t(1) << w.blocksize_log2;
    const int64_t end = w.k % bs == 0 ? (k | (bs - 1)) + 1 : k + step;
    return end < kv ? end : kv;
  }

  // NF4 only: the 32 elements W[n, k:k+32] ((n * k_total + k) % 32 == 0) as their 16 even
  // and 16 odd elements (pair order): one widening of 16 bytes serves both.
  void chunk_pair(int64_t n, int64_t k, float scale_nk, V& even, V& odd) const {
    v_nf4_pair(static_cast<const uint8_t*>(w.data) + ((n * w.k + k) >> 1), lut, scale_nk, even, odd);
    if constexpr (RND == Rounding::bf16) {
      even = v_round_bf16(even);
      odd = v_round_bf16(odd);
    } else if constexpr (RND == Rounding::f16) {
      even = v_round_f16(even);
      odd = v_round_f16(odd);
    }
  }

  V chunk(int64_t n, int64_t k, float scale_nk) const {
    if constexpr (KIND == WeightKind::f32) {
      return v_load(static_cast<const float*>(w.data) + n * w.ld + k);
    } else if constexpr (KIND == WeightKind::bf16) {
      return v_bf16(static_cast<const uint16_t*>(w.data) + n * w.ld + k);
    } else if constexpr (KIND == WeightKind::f16) {
      return v_f16(static_cast<const uint16_t*>(w.data) + n * w.ld + k);
    } else {
      const V v = v_nf4(static_cast<const uint8_t*>(w.data) + ((n * w.k + k) >> 1), lut, scale_nk);
      if constexpr (RND == Rounding::bf16) return v_round_bf16(v);
      if constexpr (RND == Rounding::f16) return v_round_f16(v);
      return v;
    }
  }

  float at(int64_t n, int64_t k) const {
    if constexpr (KIND == WeightKind::f32) {
      return static_cast<const float*>(w.data)[n * w.ld + k];
    } else if constexpr (KIND == WeightKind::bf16) {
      return s_bf16(static_cast<const uint16_t*>(w.data)[n * w.ld + k]);
    } else if constexpr (KIND == WeightKind::f16) {
      return s_f16(static_cast<const uint16_t*>(w.data)[n * w.ld + k]);
    } else {
      const int64_t e = n * w.k + k;
      const uint8_t byte = static_cast<const uint8_t*>(w.data)[e >> 1];
      const float v = kNF4[(e & 1) ? (byte & 15) : (byte >> 4)] * scale(e >> w.blocksize_log2);
      if constexpr (RND == Rounding::bf16) return static_cast<float>(c10::BFloat16(v));
      if constexpr (RND == Rounding::f16) return static_cast<float>(c10::Half(v));
      return v;
    }
  }
};

// ---------------------------------------------------------------- y += x @ W.T (rows)
// y[m, n + r] += x[m, :] . W[n + r, :] for m < MT, r < NR: NR chunks of W are decoded once
// per K-step and meet MT rows of x in MT * NR register accumulators; W is never stored.
template <int MT, int NR, class S>
static inline void rows_step(const S& s, const float* x, int64_t ldx, int64_t n, float* y,
                             int64_t ldy) {
  const int64_t K = s.w.k, kv = K & ~int64_t(15);
  V acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = v_zero();
  for (int64_t kb = 0; kb < kv;) {
    const int64_t ke = s.run_end(kb, kv);
    float sc[NR];
    for (int r = 0; r < NR; ++r) sc[r] = s.block_scale(n + r, kb);
    for (int64_t k = kb; k < ke; k += 16) {
      V wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = s.chunk(n + r, k, sc[r]);
      for (int m = 0; m < MT; ++m) {
        const V xv = v_load(x + m * ldx + k);
        for (int r = 0; r < NR; ++r) acc[r][m] = v_fma(wv[r], xv, acc[r][m]);
      }
    }
    kb = ke;
  }
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < MT; ++m) {
      float sum = v_sum(acc[r][m]);
      for (int64_t k = kv; k < K; ++k) sum += x[m * ldx + k] * s.at(n + r, k);
      y[m * ldy + n + r] += sum;
    }
  }
}

template <int MT, class S>
static void rows_range(const S& s, const float* x, int64_t ldx, int64_t n0, int64_t n1,
                       float* y, int64_t ldy) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) rows_step<MT, kRows>(s, x, ldx, n, y, ldy);
  for (; n < n1; ++n) rows_step<MT, 1>(s, x, ldx, n, y, ldy);
}

// Register tile of MT rows of x for a runtime mt <= MT.
template <int MT, class S>
static void rows_tile(int64_t mt, const S& s, const float* x, int64_t ldx, int64_t n0,
                      int64_t n1, float* y, int64_t ldy) {
  if constexpr (MT > 1) {
    if (mt < MT) return rows_tile<MT - 1>(mt, s, x, ldx, n0, n1, y, ldy);
  }
  rows_range<MT>(s, x, ldx, n0, n1, y, ldy);
}

template <class S>
static void rows_all(const S& s, const float* x, int64_t M, int64_t ldx, int64_t n0,
                     int64_t n1, float* y, int64_t ldy, float* scratch) {
  if (s.aligned(0)) {
    for (int64_t m0 = 0; m0 < M; m0 += kMT) {
      const int64_t mt = M - m0 < kMT ? M - m0 : kMT;
      rows_tile<kMT>(mt, s, x + m0 * ldx, ldx, n0, n1, y + m0 * ldy, ldy);
    }
    return;
  }
  // NF4 rows that straddle bytes/chunks: decode each row once into scratch, then multiply.
  WeightView row;
  row.n = 1;
  row.k = row.ld = s.w.k;
  row.data = scratch;
  const Src<WeightKind::f32, Rounding::none> dense(row);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < s.w.k; ++k) scratch[k] = s.at(n, k);
    for (int64_t m0 = 0; m0 < M; m0 += kMT) {
      const int64_t mt = M - m0 < kMT ? M - m0 : kMT;
      rows_tile<kMT>(mt, dense, x + m0 * ldx, ldx, 0, 1, y + m0 * ldy + n, ldy);
    }
  }
}

// NF4 with in_features % 32 == 0: x arrives in pair order (each 32-column group as its 16
// even then its 16 odd columns, reordered once by the caller), so W decodes with
// chunk_pair: fewer shuffles per weight than chunk, which is what bounds few-row products.
template <int MT, int NR, class S>
static inline void rows_pairs_step(const S& s, const float* x, int64_t ldx, int64_t n, float* y,
                                   int64_t ldy) {
  const int64_t K = s.w.k;
  V acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = v_zero();
  for (int64_t kb = 0; kb < K;) {
    const int64_t ke = s.run_end(kb, K, 32);
    float sc[NR];
    for (int r = 0; r < NR; ++r) sc[r] = s.block_scale(n + r, kb);
    for (int64_t k = kb; k < ke; k += 32) {
      V even[NR], odd[NR];
      for (int r = 0; r < NR; ++r) s.chunk_pair(n + r, k, sc[r], even[r], odd[r]);
      for (int m = 0; m < MT; ++m) {
        const V xe = v_load(x + m * ldx + k), xo = v_load(x + m * ldx + k + 16);
        for (int r = 0; r < NR; ++r) acc[r][m] = v_fma(odd[r], xo, v_fma(even[r], xe, acc[r][m]));
      }
    }
    kb = ke;
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) y[m * ldy + n + r] += v_sum(acc[r][m]);
}

template <int MT, class S>
static void rows_pairs_tile(int64_t mt, const S& s, const float* x, int64_t ldx, int64_t n0,
                            int64_t n1, float* y, int64_t ldy) {
  if constexpr (MT > 1) {
    if (mt < MT) return rows_pairs_tile<MT - 1>(mt, s, x, ldx, n0, n1, y, ldy);
  }
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) rows_pairs_step<MT, kRows>(s, x, ldx, n, y, ldy);
  for (; n < n1; ++n) rows_pairs_step<MT, 1>(s, x, ldx, n, y, ldy);
}

template <class S>
static void rows_pairs_all(const S& s, const float* x, int64_t M, int64_t ldx, int64_t n0,
                           int64_t n1, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += kMT) {
    const int64_t mt = M - m0 < kMT ? M - m0 : kMT;
    rows_pairs_tile<kMT>(mt, s, x + m0 * ldx, ldx, n0, n1, y + m0 * ldy, ldy);
  }
}

// ---------------------------------------------------------------- dx += dy @ W (cols)
// dx[m, k:k + 16 CB] += sum_n dy[m, n] W[n, k:k + 16 CB] for m < MT: an outer-product
// accumulation over all rows n of W, MT x CB accumulators in registers, dx touched once.
template <int MT, int CB, class S>
static inline void cols_step(const S& s, const float* dy, int64_t ldd, int64_t k, float* dx,
                             int64_t ldx) {
  V acc[MT][CB];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < CB; ++c) acc[m][c] = v_zero();
  for (int64_t n = 0; n < s.w.n; ++n) {
    V wv[CB];
    for (int c = 0; c < CB; ++c) wv[c] = s.chunk(n, k + 16 * c, s.block_scale(n, k + 16 * c));
    for (int m = 0; m < MT; ++m) {
      const V g = v_set1(dy[m * ldd + n]);
      for (int c = 0; c < CB; ++c) acc[m][c] = v_fma(wv[c], g, acc[m][c]);
    }
  }
  const V one = v_set1(1.f);
  for (int m = 0; m < MT; ++m) {
    for (int c = 0; c < CB; ++c) {
      float* p = dx + m * ldx + k + 16 * c;
      v_store(p, v_fma(acc[m][c], one, v_load(p)));  // exact add
    }
  }
}

template <int MT, class S>
static void cols_range(const S& s, const float* dy, int64_t ldd, int64_t k0, int64_t k1,
                       float* dx, int64_t ldx) {
  constexpr int CB = cols_chunks(MT);
  const int64_t kv = k0 + ((k1 - k0) & ~int64_t(15));
  int64_t k = k0;
  for (; k + 16 * CB <= kv; k += 16 * CB) cols_step<MT, CB>(s, dy, ldd, k, dx, ldx);
  for (; k < kv; k += 16) cols_step<MT, 1>(s, dy, ldd, k, dx, ldx);
  for (; k < k1; ++k) {  // columns past the last whole chunk (dense in_features % 16)
    for (int m = 0; m < MT; ++m) {
      float sum = 0.f;
      for (int64_t n = 0; n < s.w.n; ++n) sum += dy[m * ldd + n] * s.at(n, k);
      dx[m * ldx + k] += sum;
    }
  }
}

template <int MT, class S>
static void cols_tile(int64_t mt, const S& s, const float* dy, int64_t ldd, int64_t k0,
                      int64_t k1, float* dx, int64_t ldx) {
  if constexpr (MT > 1) {
    if (mt < MT) return cols_tile<MT - 1>(mt, s, dy, ldd, k0, k1, dx, ldx);
  }
  cols_range<MT>(s, dy, ldd, k0, k1, dx, ldx);
}

template <class S>
static void cols_all(const S& s, const float* dy, int64_t M, int64_t ldd, int64_t k0,
                     int64_t k1, float* dx, int64_t ldx, float* scratch) {
  if (s.aligned(k0)) {
    for (int64_t m0 = 0; m0 < M; m0 += kMT) {
      const int64_t mt = M - m0 < kMT ? M - m0 : kMT;
      cols_tile<kMT>(mt, s, dy + m0 * ldd, ldd, k0, k1, dx + m0 * ldx, ldx);
    }
    return;
  }
  // NF4 rows that straddle bytes/chunks (in_features not a multiple of 16): decode each row
  // segment into scratch, then axpy it into the M rows of dx.
  const int64_t len = k1 - k0;
  for (int64_t n = 0; n < s.w.n; ++n) {
    for (int64_t j = 0; j < len; ++j) scratch[j] = s.at(n, k0 + j);
    for (int64_t m = 0; m < M; ++m) {
      const float g = dy[m * ldd + n];
      float* p = dx + m * ldx + k0;
      for (int64_t j = 0; j < len; ++j) p[j] += g * scratch[j];
    }
  }
}

// ---------------------------------------------------------------- tile of W in fp32
template <class S>
static void tile_all(const S& s, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out,
                     int64_t ldo) {
  const bool vec = s.aligned(k0);
  const int64_t kv = vec ? k0 + ((k1 - k0) & ~int64_t(15)) : k0;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * ldo - k0;
    for (int64_t kb = k0; kb < kv;) {
      const int64_t ke = s.run_end(kb, kv);
      const float sc = s.block_scale(n, kb);
      for (int64_t k = kb; k < ke; k += 16) v_store(o + k, s.chunk(n, k, sc));
      kb = ke;
    }
    for (int64_t k = kv; k < k1; ++k) o[k] = s.at(n, k);
  }
}

// ---------------------------------------------------------------- entry points
template <class Op>
static void visit(const WeightView& w, const Op& op) {
  switch (w.kind) {
    case WeightKind::f32: return op(Src<WeightKind::f32, Rounding::none>(w));
    case WeightKind::bf16: return op(Src<WeightKind::bf16, Rounding::none>(w));
    case WeightKind::f16: return op(Src<WeightKind::f16, Rounding::none>(w));
    case WeightKind::nf4:
      switch (w.rounding) {
        case Rounding::none: return op(Src<WeightKind::nf4, Rounding::none>(w));
        case Rounding::bf16: return op(Src<WeightKind::nf4, Rounding::bf16>(w));
        case Rounding::f16: return op(Src<WeightKind::nf4, Rounding::f16>(w));
      }
  }
}

struct RowsOp {
  const float* x; int64_t M, ldx, n0, n1; float* y; int64_t ldy; float* scratch;
  template <class S> void operator()(const S& s) const {
    rows_all(s, x, M, ldx, n0, n1, y, ldy, scratch);
  }
};

struct RowsPairsOp {
  const float* x; int64_t M, ldx, n0, n1; float* y; int64_t ldy;
  template <class S> void operator()(const S& s) const { rows_pairs_all(s, x, M, ldx, n0, n1, y, ldy); }
};

struct ColsOp {
  const float* dy; int64_t M, ldd, k0, k1; float* dx; int64_t ldx; float* scratch;
  template <class S> void operator()(const S& s) const {
    cols_all(s, dy, M, ldd, k0, k1, dx, ldx, scratch);
  }
};

struct TileOp {
  int64_t n0, n1, k0, k1; float* out; int64_t ldo;
  template <class S> void operator()(const S& s) const { tile_all(s, n0, n1, k0, k1, out, ldo); }
};

static void rows(const WeightView& w, const float* x, int64_t M, int64_t ldx, int64_t n0,
                 int64_t n1, float* y, int64_t ldy, float* scratch) {
  visit(w, RowsOp{x, M, ldx, n0, n1, y, ldy, scratch});
}

static void rows_pairs(const WeightView& w, const float* x, int64_t M, int64_t ldx, int64_t n0,
                       int64_t n1, float* y, int64_t ldy) {
  const RowsPairsOp op{x, M, ldx, n0, n1, y, ldy};
  switch (w.rounding) {
    case Rounding::none: return op(Src<WeightKind::nf4, Rounding::none>(w));
    case Rounding::bf16: return op(Src<WeightKind::nf4, Rounding::bf16>(w));
    case Rounding::f16: return op(Src<WeightKind::nf4, Rounding::f16>(w));
  }
}

static void cols(const WeightView& w, const float* dy, int64_t M, int64_t ldd, int64_t k0,
                 int64_t k1, float* dx, int64_t ldx, float* scratch) {
  visit(w, ColsOp{dy, M, ldd, k0, k1, dx, ldx, scratch});
}

static void tile(const WeightView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                 float* out, int64_t ldo) {
  visit(w, TileOp{n0, n1, k0, k1, out, ldo});
}
