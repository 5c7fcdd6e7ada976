// The window_conv CPU kernels (definition: docs/op.md), templated on the storage type. Included
// once by each instruction-set translation unit (window_conv_cpu_<isa>.cpp), which defines
// SGDC_CPU_ISA, the namespace the kernels are compiled into (sgdc::cpu::<isa>).
//
// Nothing here is shared between the translation units: every type and function lives in the
// instruction set's namespace, and no standard-library template is instantiated (no std::vector,
// no std::min), so that the linker never merges an AVX-512 copy of an inline function into the
// code another instruction set runs.
//
// Work split. NCHW: one work item is (sample, head, band of rows, tile of columns); channels_last:
// (sample, band of rows, tile of columns), every head. Each output element belongs to one item and
// is computed by the thread that runs it, in a fixed order: no atomics, and bands and tiles change
// which thread computes an element, never how.
//
// Backward in one pass: each item sweeps the rows of its band (one residue class of the dilation
// at a time, plus the rows whose windows reach into the band), computing per output row p the
// probabilities P and the gated gradient g_y = dout * sigmoid(gate) into ring buffers of the last
// few rows, then dweights and dgate of p (owned rows), then every dx row whose readers are all in
// the rings. Nothing is written to memory but the outputs.
#ifndef SGDC_CPU_ISA
#error "define SGDC_CPU_ISA (the instruction set's namespace) before including window_conv_cpu_kernels.h"
#endif

#include <cstdint>
#include <cstring>
#include <new>

#include "window_conv_cpu_isa.h"

namespace sgdc {
namespace cpu {
namespace SGDC_CPU_ISA {

// ---------------------------------------------------------------------------------------------
// Storage types and scalar conversions

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// bfloat16: the upper half of a float32; rounding to nearest even, NaN to the quiet NaN 0x7FC0
// (as c10::BFloat16).
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t{h} << 16); }
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE half: subnormals kept, rounding to nearest even, NaN to a quiet NaN (as c10::Half).
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t em = h & 0x7fffu;
  // exponent and mantissa moved into place and rescaled by 2^112: exact for normals and subnormals
  uint32_t o = float_to_bits(bits_to_float(em << 13) * bits_to_float(0x77800000u));
  if (em >= 0x7c00u) o = (em << 13) | 0x7f800000u;  // inf, NaN (payload kept)
  return bits_to_float(o | sign);
}
inline uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (127u + 16u) << 23) {  // overflow, inf, NaN
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // subnormal or zero: the float adder rounds to nearest even
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = float_to_bits(bits_to_float(u) + bits_to_float(magic)) - magic;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu + odd;
    o = u >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

template <class A, class T>
struct Convert;
template <>
struct Convert<float, float> {
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <>
struct Convert<double, double> {
  static double load(const double* p) { return *p; }
  static void store(double* p, double v) { *p = v; }
};
template <>
struct Convert<float, bf16> {
  static float load(const bf16* p) { return bf16_to_float(p->bits); }
  static void store(bf16* p, float v) { p->bits = float_to_bf16(v); }
};
template <>
struct Convert<float, f16> {
  static float load(const f16* p) { return f16_to_float(p->bits); }
  static void store(f16* p, float v) { p->bits = float_to_f16(v); }
};

template <class A, class T>
inline A ld(const T* p) {
  return Convert<A, T>::load(p);
}
template <class A, class T>
inline void st(T* p, A v) {
  Convert<A, T>::store(p, v);
}

// ---------------------------------------------------------------------------------------------
// Math

// exp(x) in float32: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes' expf, about
// 1 ulp), branch-free so that loops over it vectorize. The power of two is applied in two halves,
// so that subnormal results (x down to -103.97) come out as libm's do: a softmax weight that
// underflows to a subnormal still turns an infinite input into an infinity, not a NaN. x > 88.72
// gives inf, x < -103.97 gives 0, NaN stays NaN.
inline float exp_poly(float x) {
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 88.8f ? 88.8f : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n = 2^h * 2^(n-h) with h = floor(n/2): both normal for n in [-150, 128]; a NaN x leaves p
  // NaN, and n is replaced by 0 before its conversion to an integer
  const int32_t e = static_cast<int32_t>(n == n ? n : 0.0f);
  const int32_t h = e >> 1;
  const float y = p * bits_to_float(static_cast<uint32_t>(h + 127) << 23) *
                  bits_to_float(static_cast<uint32_t>(e - h + 127) << 23);
  const float big = bits_to_float(0x7f800000u);
  return x > 88.7228394f ? big : (x < -103.972084f ? 0.0f : y);
}

inline float exp_acc(float x) { return exp_poly(x); }
inline double exp_acc(double x) { return __builtin_exp(x); }

template <class A>
inline A sigmoid(A g) {
  return A(1) / (A(1) + exp_acc(-g));
}

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Buffers and tables

// An owning, zero-initialized array.
template <class X>
struct Buf {
  X* p = nullptr;
  int64_t n = 0;
  Buf() = default;
  explicit Buf(int64_t count) { reset(count); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { delete[] p; }
  void reset(int64_t count) {
    delete[] p;
    n = count;
    p = new X[count > 0 ? count : 1]();
  }
  X& operator[](int64_t i) { return p[i]; }
  const X& operator[](int64_t i) const { return p[i]; }
};

// One axis of length n: where each pixel's window starts, and for each image index q the pairs
// (p, k) of output index and tap whose tap k reads q (by p ascending), the transpose dx sums over.
struct Axis {
  int64_t n = 0, K = 1, d = 1, r = 0;
  bool clamp = false;
  Buf<int64_t> start;     // S(p)
  Buf<int64_t> in_off;    // pairs of q: in_p[in_off[q] .. in_off[q + 1]), in_k likewise
  Buf<int64_t> in_p, in_k;
  Buf<uint8_t> centred;   // S(p) == p - r*d: tap k reads p + (k - r)*d
  Buf<uint8_t> plain_in;  // q's pairs are exactly (q - (k - r)*d, k) for the k whose p is in the image

  void build(int64_t n_, int64_t K_, int64_t d_, bool clamp_) {
    n = n_, K = K_, d = d_, r = K_ / 2, clamp = clamp_;
    start.reset(n);
    centred.reset(n);
    for (int64_t p = 0; p < n; ++p) {
      if (!clamp) {
        start[p] = p - r * d;
      } else {
        const int64_t m = p % d, g = p / d, L = ceil_div(n - m, d);
        start[p] = m + d * imin(imax(g - r, 0), L - K);
      }
      centred[p] = start[p] == p - r * d;
    }
    in_off.reset(n + 1);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t q = start[p] + k * d;
        if (q >= 0 && q < n) ++in_off[q + 1];
      }
    for (int64_t q = 0; q < n; ++q) in_off[q + 1] += in_off[q];
    in_p.reset(in_off[n]);
    in_k.reset(in_off[n]);
    Buf<int64_t> fill(n);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t q = start[p] + k * d;
        if (q >= 0 && q < n) {
          const int64_t at = in_off[q] + fill[q]++;
          in_p[at] = p;
          in_k[at] = k;
        }
      }
    plain_in.reset(n);
    for (int64_t q = 0; q < n; ++q) {
      int64_t at = in_off[q];
      bool plain = true;
      for (int64_t k = K - 1; k >= 0 && plain; --k) {  // p ascending
        const int64_t p = q - (k - r) * d;
        if (p < 0 || p >= n) continue;
        plain = at < in_off[q + 1] && in_p[at] == p && in_k[at] == k && centred[p];
        ++at;
      }
      plain_in[q] = plain && at == in_off[q + 1];
    }
  }
  int64_t pairs_begin(int64_t q) const { return in_off[q]; }
  int64_t pairs_end(int64_t q) const { return in_off[q + 1]; }
  // smallest and largest output index reading q (q itself when none does)
  int64_t first_reader(int64_t q) const { return in_off[q] < in_off[q + 1] ? in_p[in_off[q]] : q; }
  int64_t last_reader(int64_t q) const { return in_off[q] < in_off[q + 1] ? in_p[in_off[q + 1] - 1] : q; }
};

// The rows of [qa, qb) in residue class m of the dilation, and the rows a backward sweep visits
// for them: every output row p that reads one of them (and they themselves), from `lo` to `hi`
// in steps of d. `slots` is the size of the ring that keeps the rows of P and g_y a dx row needs
// until it is computed, when each dx row is computed right after its last reader.
struct Sweep {
  int64_t first = 0, last = -1, lo = 0, hi = -1, slots = 1;
  bool empty() const { return last < first; }

  Sweep(const Axis& rows, int64_t qa, int64_t qb, int64_t m) {
    const int64_t d = rows.d;
    first = qa + ((m - qa % d) % d + d) % d;
    if (first >= qb) return;
    last = first + (qb - 1 - first) / d * d;
    lo = first, hi = last;
    for (int64_t q = first; q <= last; q += d) {
      lo = imin(lo, rows.first_reader(q));
      hi = imax(hi, rows.last_reader(q));
    }
    // simulate the sweep: after row p, every pending dx row whose last reader is <= p is computed
    int64_t next = first;
    for (int64_t p = lo; p <= hi; p += d) {
      while (next <= last && rows.last_reader(next) <= p) {
        slots = imax(slots, (p - rows.first_reader(next)) / d + 1);
        next += d;
      }
    }
  }
};

// Columns [ja, jb) of a tile, and the column ranges its work reads: `lo`..`hi` (exclusive) the
// output columns whose P and g_y the tile's dx needs (every reader of a tile column, and the tile
// itself); `xlo`..`xhi` the image columns its windows read (clamped windows: every tap; centred
// windows: also the zeros outside the image).
struct Cols {
  int64_t ja = 0, jb = 0, lo = 0, hi = 0, xlo = 0, xhi = 0;
  Cols(const Axis& cols, int64_t ja_, int64_t jb_) : ja(ja_), jb(jb_) {
    lo = ja, hi = jb, xlo = ja - cols.r * cols.d, xhi = jb + cols.r * cols.d;
    for (int64_t j = ja; j < jb; ++j) {
      lo = imin(lo, cols.first_reader(j));
      hi = imax(hi, cols.last_reader(j) + 1);
      xlo = imin(xlo, cols.start[j]);
      xhi = imax(xhi, cols.start[j] + (cols.K - 1) * cols.d + 1);
    }
  }
};

// How a call is split into work items: bands of rows x tiles of columns (x heads in NCHW).
struct Split {
  int64_t bands = 1, tiles = 1, band_rows = 1, tile_cols = 1;
  Split(const Shape& s, int64_t per_sample, int threads) {
    const int64_t KK = s.K * s.K;
    // tiles of at most ~8K floats of P per row (the forward's P tile stays in L1/L2)
    const int64_t max_cols = imax(16, 8192 / KK);
    tiles = ceil_div(s.W, max_cols);
    tile_cols = ceil_div(s.W, tiles);
    // enough bands to give every thread a few items
    const int64_t items = s.B * per_sample * tiles;
    const int64_t want = 4 * static_cast<int64_t>(threads > 0 ? threads : 1);
    bands = imax(1, imin(s.H, ceil_div(want, imax(items, 1))));
    band_rows = ceil_div(s.H, bands);
    bands = ceil_div(s.H, band_rows);
  }
};

// Runs body(item) for item in [0, n) through the caller's parallel_for.
template <class F>
void parallel_items(const Parallel& par, int64_t n, const F& body) {
  if (n <= 0) return;
  auto run = [](int64_t b, int64_t e, void* ctx) {
    const F& f = *static_cast<const F*>(ctx);
    f(b, e);
  };
  void* ctx = const_cast<void*>(static_cast<const void*>(&body));
  if (par.run == nullptr || n == 1)
    run(0, n, ctx);
  else
    par.run(par.self, n, run, ctx);
}

// ---------------------------------------------------------------------------------------------
// Kernels

template <class A, class T>
struct Kernels {
  const Shape& s;
  const int64_t B, C, H, W, G, K, d, r, KK, Cg;
  const bool clamp, softmax;
  Axis rows, cols;

  explicit Kernels(const Shape& s_)
      : s(s_), B(s_.B), C(s_.C), H(s_.H), W(s_.W), G(s_.G), K(s_.K), d(s_.d), r(s_.K / 2), KK(s_.K * s_.K),
        Cg(s_.C / s_.G), clamp(s_.clamp), softmax(s_.softmax) {
    rows.build(H, K, d, clamp);
    cols.build(W, K, d, clamp);
  }

  // softmax over the KK values at p[t * stride], in place (max subtracted; NaN and +inf logits
  // make the pixel NaN, -inf logits weigh 0)
  static void softmax_strided(A* p, int64_t KK, int64_t stride) {
    A m = p[0];
    for (int64_t t = 1; t < KK; ++t) m = p[t * stride] > m ? p[t * stride] : m;
    A sum = 0;
    for (int64_t t = 0; t < KK; ++t) {
      const A e = exp_acc(p[t * stride] - m);
      p[t * stride] = e;
      sum += e;
    }
    const A inv = A(1) / sum;
    for (int64_t t = 0; t < KK; ++t) p[t * stride] *= inv;
  }

  // ---- NCHW

  int64_t x_index(int64_t b, int64_t c, int64_t i, int64_t j) const { return ((b * C + c) * H + i) * W + j; }
  int64_t w_index(int64_t b, int64_t ch, int64_t i, int64_t j) const { return ((b * G * KK + ch) * H + i) * W + j; }

  // Rows of x staged as A, zero outside the image, over image columns [xlo, xhi): one slot per
  // row of a window (a window's K rows fall in K distinct slots).
  struct XRing {
    Buf<A> data, zero;
    Buf<int64_t> tag;
    int64_t width = 0, Cg = 0, K = 1, d = 1, xlo = 0;
    XRing(int64_t Cg_, int64_t K_, int64_t d_, int64_t xlo_, int64_t xhi)
        : width(xhi - xlo_), Cg(Cg_), K(K_), d(d_), xlo(xlo_) {
      data.reset(K * Cg * width);
      zero.reset(width);
      tag.reset(K);
      for (int64_t k = 0; k < K; ++k) tag[k] = -1;
    }
    // channel c of image row i (any i; rows outside the image read zeros)
    const A* row(int64_t i, int64_t c) const {
      return i < 0 ? zero.p : data.p + ((i / d) % K * Cg + c) * width;
    }
  };

  void stage_nchw(XRing& ring, const T* x, int64_t b, int64_t c0, int64_t i) const {
    if (i < 0 || i >= H) return;
    const int64_t slot = (i / d) % K;
    if (ring.tag[slot] == i) return;
    ring.tag[slot] = i;
    const int64_t ca = imax(ring.xlo, 0), cb = imin(ring.xlo + ring.width, W);
    for (int64_t c = 0; c < Cg; ++c) {
      A* dst = ring.data.p + (slot * Cg + c) * ring.width;
      const T* src = x + x_index(b, c0 + c, i, 0);
      for (int64_t col = ring.xlo; col < ca; ++col) dst[col - ring.xlo] = 0;
      for (int64_t col = ca; col < cb; ++col) dst[col - ring.xlo] = ld<A>(src + col);
      for (int64_t col = imax(cb, ring.xlo); col < ring.xlo + ring.width; ++col) dst[col - ring.xlo] = 0;
    }
  }
  const A* xrow(const XRing& ring, int64_t i, int64_t c) const {
    return (i < 0 || i >= H) ? ring.zero.p : ring.row(i, c);
  }

  void forward_nchw(const T* x, const T* w, const T* gate, T* out, const Parallel& par) const {
    const Split split(s, G, par.threads);
    const int64_t items = B * G * split.bands * split.tiles;
    parallel_items(par, items, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        int64_t rest = item;
        const int64_t tile = rest % split.tiles;
        rest /= split.tiles;
        const int64_t band = rest % split.bands;
        rest /= split.bands;
        const int64_t g = rest % G, b = rest / G;
        const int64_t qa = band * split.band_rows, qb = imin(H, qa + split.band_rows);
        const int64_t ja = tile * split.tile_cols, jb = imin(W, ja + split.tile_cols);
        forward_nchw_item(x, w, gate, out, b, g, qa, qb, Cols(cols, ja, jb));
      }
    });
  }

  void forward_nchw_item(const T* x, const T* w, const T* gate, T* out, int64_t b, int64_t g, int64_t qa, int64_t qb,
                         const Cols& tc) const {
    const int64_t TW = tc.jb - tc.ja;
    Buf<A> P(KK * TW);
    XRing ring(Cg, K, d, tc.xlo, tc.xhi);
    Buf<const A*> xr(K * (Cg > 0 ? Cg : 1));
    for (int64_t m = 0; m < d; ++m) {
      for (int64_t p = qa + ((m - qa % d) % d + d) % d; p < qb; p += d) {
        for (int64_t t = 0; t < KK; ++t) {
          const T* src = w + w_index(b, g * KK + t, p, 0);
          for (int64_t l = 0; l < TW; ++l) P[t * TW + l] = ld<A>(src + tc.ja + l);
        }
        if (softmax)
          for (int64_t l = 0; l < TW; ++l) softmax_strided(P.p + l, KK, TW);
        for (int64_t u = 0; u < K; ++u) {
          const int64_t i = rows.start[p] + u * d;
          stage_nchw(ring, x, b, g * Cg, i);
          for (int64_t c = 0; c < Cg; ++c) xr[u * Cg + c] = xrow(ring, i, c) - ring.xlo;
        }
        for (int64_t c = 0; c < Cg; ++c) {
          const int64_t ch = g * Cg + c;
          for (int64_t l = 0; l < TW; ++l) {
            const int64_t j = tc.ja + l;
            const int64_t s0 = cols.centred[j] ? j - r * d : cols.start[j];
            A acc = 0;
            for (int64_t u = 0; u < K; ++u)
              for (int64_t v = 0; v < K; ++v) acc += P[(u * K + v) * TW + l] * xr[u * Cg + c][s0 + v * d];
            if (gate != nullptr) acc = acc * sigmoid(ld<A>(gate + x_index(b, ch, p, j)));
            st(out + x_index(b, ch, p, j), acc);
          }
        }
      }
    }
  }

  void backward_nchw(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate,
                     const Parallel& par) const {
    const Split split(s, G, par.threads);
    const int64_t items = B * G * split.bands * split.tiles;
    parallel_items(par, items, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        int64_t rest = item;
        const int64_t tile = rest % split.tiles;
        rest /= split.tiles;
        const int64_t band = rest % split.bands;
        rest /= split.bands;
        const int64_t g = rest % G, b = rest / G;
        const int64_t qa = band * split.band_rows, qb = imin(H, qa + split.band_rows);
        const int64_t ja = tile * split.tile_cols, jb = imin(W, ja + split.tile_cols);
        backward_nchw_item(dout, x, w, gate, dx, dw, dgate, b, g, qa, qb, Cols(cols, ja, jb));
      }
    });
  }

  void backward_nchw_item(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate, int64_t b,
                          int64_t g, int64_t qa, int64_t qb, const Cols& tc) const {
    const int64_t TW = tc.jb - tc.ja;
    // ring columns: [bA, bA + BW) holds P and g_y of output columns [tc.lo, tc.hi), zeros elsewhere
    const int64_t bA = imin(tc.lo, tc.ja - r * d), BW = imax(tc.hi, tc.jb + r * d) - bA;
    int64_t slots = 1;
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (!sw.empty()) slots = imax(slots, sw.slots);
    }
    Buf<A> Pring(slots * KK * BW), Gring(slots * Cg * BW), S(Cg * TW), dP(KK), y(Cg);
    XRing ring(Cg, K, d, tc.xlo, tc.xhi);
    Buf<const A*> xr(K * (Cg > 0 ? Cg : 1));
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (sw.empty()) continue;
      int64_t next = sw.first;
      for (int64_t p = sw.lo; p <= sw.hi; p += d) {
        const int64_t slot = (p / d) % slots;
        A* Pr = Pring.p + slot * KK * BW - bA;  // indexed by image column
        A* Gr = Gring.p + slot * Cg * BW - bA;
        for (int64_t t = 0; t < KK; ++t) {
          const T* src = w + w_index(b, g * KK + t, p, 0);
          for (int64_t j = tc.lo; j < tc.hi; ++j) Pr[t * BW + j] = ld<A>(src + j);
        }
        if (softmax)
          for (int64_t j = tc.lo; j < tc.hi; ++j) softmax_strided(Pr + j, KK, BW);
        const bool owned = p >= qa && p < qb;
        for (int64_t c = 0; c < Cg; ++c) {
          const int64_t ch = g * Cg + c;
          for (int64_t j = tc.lo; j < tc.hi; ++j) {
            const A go = ld<A>(dout + x_index(b, ch, p, j));
            if (gate == nullptr) {
              Gr[c * BW + j] = go;
            } else {
              const A sg = sigmoid(ld<A>(gate + x_index(b, ch, p, j)));
              Gr[c * BW + j] = go * sg;
              if (owned && j >= tc.ja && j < tc.jb) S[c * TW + j - tc.ja] = sg;
            }
          }
        }
        if (owned) {
          for (int64_t u = 0; u < K; ++u) {
            const int64_t i = rows.start[p] + u * d;
            stage_nchw(ring, x, b, g * Cg, i);
            for (int64_t c = 0; c < Cg; ++c) xr[u * Cg + c] = xrow(ring, i, c) - ring.xlo;
          }
          for (int64_t j = tc.ja; j < tc.jb; ++j) {
            const int64_t s0 = cols.centred[j] ? j - r * d : cols.start[j];
            for (int64_t t = 0; t < KK; ++t) dP[t] = 0;
            for (int64_t c = 0; c < Cg; ++c) {
              const A gy = Gr[c * BW + j];
              A acc = 0;
              for (int64_t u = 0; u < K; ++u)
                for (int64_t v = 0; v < K; ++v) {
                  const A xv = xr[u * Cg + c][s0 + v * d];
                  dP[u * K + v] += gy * xv;
                  acc += Pr[(u * K + v) * BW + j] * xv;
                }
              y[c] = acc;
            }
            A sum = 0;
            if (softmax)
              for (int64_t t = 0; t < KK; ++t) sum += Pr[t * BW + j] * dP[t];
            for (int64_t t = 0; t < KK; ++t) {
              const A v = softmax ? Pr[t * BW + j] * (dP[t] - sum) : dP[t];
              st(dw + w_index(b, g * KK + t, p, j), v);
            }
            if (gate != nullptr)
              for (int64_t c = 0; c < Cg; ++c) {
                const int64_t at = x_index(b, g * Cg + c, p, j);
                const A sg = S[c * TW + j - tc.ja];
                st(dgate + at, ld<A>(dout + at) * y[c] * sg * (A(1) - sg));
              }
          }
        }
        // every dx row whose readers have all been swept
        for (; next <= sw.last && rows.last_reader(next) <= p; next += d) {
          const int64_t q = next;
          for (int64_t c = 0; c < Cg; ++c) {
            for (int64_t j = tc.ja; j < tc.jb; ++j) {
              A acc = 0;
              for (int64_t e = rows.pairs_begin(q); e < rows.pairs_end(q); ++e) {
                const int64_t pi = rows.in_p[e], u = rows.in_k[e];
                const int64_t ps = (pi / d) % slots;
                const A* Pq = Pring.p + ps * KK * BW - bA + u * K * BW;
                const A* Gq = Gring.p + (ps * Cg + c) * BW - bA;
                if (cols.plain_in[j]) {
                  for (int64_t v = K - 1; v >= 0; --v) {
                    const int64_t pj = j - (v - r) * d;
                    acc += Pq[v * BW + pj] * Gq[pj];
                  }
                } else {
                  for (int64_t f = cols.pairs_begin(j); f < cols.pairs_end(j); ++f) {
                    const int64_t pj = cols.in_p[f], v = cols.in_k[f];
                    acc += Pq[v * BW + pj] * Gq[pj];
                  }
                }
              }
              st(dx + x_index(b, g * Cg + c, q, j), acc);
            }
          }
        }
      }
    }
  }

  // ---- channels_last

  int64_t pix(int64_t b, int64_t i, int64_t j) const { return (b * H + i) * W + j; }

  void forward_cl(const T* x, const T* w, const T* gate, T* out, const Parallel& par) const {
    const Split split(s, 1, par.threads);
    const int64_t items = B * split.bands * split.tiles;
    parallel_items(par, items, [&](int64_t begin, int64_t end) {
      Buf<A> P(KK);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t tile = item % split.tiles, band = item / split.tiles % split.bands;
        const int64_t b = item / split.tiles / split.bands;
        const int64_t qa = band * split.band_rows, qb = imin(H, qa + split.band_rows);
        const int64_t ja = tile * split.tile_cols, jb = imin(W, ja + split.tile_cols);
        for (int64_t p = qa; p < qb; ++p)
          for (int64_t j = ja; j < jb; ++j)
            for (int64_t g = 0; g < G; ++g) {
              const T* src = w + pix(b, p, j) * G * KK + g * KK;
              for (int64_t t = 0; t < KK; ++t) P[t] = ld<A>(src + t);
              if (softmax) softmax_strided(P.p, KK, 1);
              for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                A acc = 0;
                for (int64_t u = 0; u < K; ++u) {
                  const int64_t i = rows.start[p] + u * d;
                  for (int64_t v = 0; v < K; ++v) {
                    const int64_t jj = cols.start[j] + v * d;
                    const A xv = (i >= 0 && i < H && jj >= 0 && jj < W) ? ld<A>(x + pix(b, i, jj) * C + c) : A(0);
                    acc += P[u * K + v] * xv;
                  }
                }
                const int64_t at = pix(b, p, j) * C + c;
                if (gate != nullptr) acc = acc * sigmoid(ld<A>(gate + at));
                st(out + at, acc);
              }
            }
      }
    });
  }

  void backward_cl(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate,
                   const Parallel& par) const {
    const Split split(s, 1, par.threads);
    const int64_t items = B * split.bands * split.tiles;
    parallel_items(par, items, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t tile = item % split.tiles, band = item / split.tiles % split.bands;
        const int64_t b = item / split.tiles / split.bands;
        const int64_t qa = band * split.band_rows, qb = imin(H, qa + split.band_rows);
        const int64_t ja = tile * split.tile_cols, jb = imin(W, ja + split.tile_cols);
        backward_cl_item(dout, x, w, gate, dx, dw, dgate, b, qa, qb, Cols(cols, ja, jb));
      }
    });
  }

  void backward_cl_item(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate, int64_t b,
                        int64_t qa, int64_t qb, const Cols& tc) const {
    const int64_t BW = tc.hi - tc.lo, GKK = G * KK;
    int64_t slots = 1;
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (!sw.empty()) slots = imax(slots, sw.slots);
    }
    Buf<A> Pring(slots * BW * GKK), Gring(slots * BW * C), S(C), dP(KK), y(C);
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (sw.empty()) continue;
      int64_t next = sw.first;
      for (int64_t p = sw.lo; p <= sw.hi; p += d) {
        const int64_t slot = (p / d) % slots;
        A* Pr = Pring.p + (slot * BW - tc.lo) * GKK;  // indexed by image column
        A* Gr = Gring.p + (slot * BW - tc.lo) * C;
        for (int64_t j = tc.lo; j < tc.hi; ++j) {
          const T* src = w + pix(b, p, j) * GKK;
          for (int64_t e = 0; e < GKK; ++e) Pr[j * GKK + e] = ld<A>(src + e);
          if (softmax)
            for (int64_t g = 0; g < G; ++g) softmax_strided(Pr + j * GKK + g * KK, KK, 1);
          for (int64_t c = 0; c < C; ++c) {
            const int64_t at = pix(b, p, j) * C + c;
            Gr[j * C + c] = gate == nullptr ? ld<A>(dout + at) : ld<A>(dout + at) * sigmoid(ld<A>(gate + at));
          }
        }
        if (p >= qa && p < qb) {
          for (int64_t j = tc.ja; j < tc.jb; ++j) {
            for (int64_t g = 0; g < G; ++g) {
              const A* Pp = Pr + j * GKK + g * KK;
              for (int64_t t = 0; t < KK; ++t) dP[t] = 0;
              for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                const A gy = Gr[j * C + c];
                A acc = 0;
                for (int64_t u = 0; u < K; ++u) {
                  const int64_t i = rows.start[p] + u * d;
                  for (int64_t v = 0; v < K; ++v) {
                    const int64_t jj = cols.start[j] + v * d;
                    const A xv = (i >= 0 && i < H && jj >= 0 && jj < W) ? ld<A>(x + pix(b, i, jj) * C + c) : A(0);
                    dP[u * K + v] += gy * xv;
                    acc += Pp[u * K + v] * xv;
                  }
                }
                y[c] = acc;
              }
              A sum = 0;
              if (softmax)
                for (int64_t t = 0; t < KK; ++t) sum += Pp[t] * dP[t];
              for (int64_t t = 0; t < KK; ++t)
                st(dw + pix(b, p, j) * GKK + g * KK + t, softmax ? Pp[t] * (dP[t] - sum) : dP[t]);
            }
            if (gate != nullptr)
              for (int64_t c = 0; c < C; ++c) {
                const int64_t at = pix(b, p, j) * C + c;
                const A sg = sigmoid(ld<A>(gate + at));
                st(dgate + at, ld<A>(dout + at) * y[c] * sg * (A(1) - sg));
              }
          }
        }
        for (; next <= sw.last && rows.last_reader(next) <= p; next += d) {
          const int64_t q = next;
          for (int64_t j = tc.ja; j < tc.jb; ++j)
            for (int64_t c = 0; c < C; ++c) {
              const int64_t g = c / Cg;
              A acc = 0;
              for (int64_t e = rows.pairs_begin(q); e < rows.pairs_end(q); ++e) {
                const int64_t pi = rows.in_p[e], u = rows.in_k[e];
                const int64_t ps = (pi / d) % slots;
                const A* Pq = Pring.p + (ps * BW - tc.lo) * GKK + g * KK + u * K;
                const A* Gq = Gring.p + (ps * BW - tc.lo) * C + c;
                for (int64_t f = cols.pairs_begin(j); f < cols.pairs_end(j); ++f) {
                  const int64_t pj = cols.in_p[f], v = cols.in_k[f];
                  acc += Pq[pj * GKK + v] * Gq[pj * C];
                }
              }
              st(dx + pix(b, q, j) * C + c, acc);
            }
        }
      }
    }
  }
};

template <class A, class T>
void run_forward(const Shape& s, Layout layout, const void* x, const void* w, const void* gate, void* out,
                 const Parallel& par) {
  const Kernels<A, T> k(s);
  const T* g = static_cast<const T*>(gate);
  if (layout == Layout::kChannelsLast)
    k.forward_cl(static_cast<const T*>(x), static_cast<const T*>(w), g, static_cast<T*>(out), par);
  else
    k.forward_nchw(static_cast<const T*>(x), static_cast<const T*>(w), g, static_cast<T*>(out), par);
}

template <class A, class T>
void run_backward(const Shape& s, Layout layout, const void* dout, const void* x, const void* w, const void* gate,
                  void* dx, void* dw, void* dgate, const Parallel& par) {
  const Kernels<A, T> k(s);
  auto in = [](const void* p) { return static_cast<const T*>(p); };
  auto outp = [](void* p) { return static_cast<T*>(p); };
  if (layout == Layout::kChannelsLast)
    k.backward_cl(in(dout), in(x), in(w), in(gate), outp(dx), outp(dw), outp(dgate), par);
  else
    k.backward_nchw(in(dout), in(x), in(w), in(gate), outp(dx), outp(dw), outp(dgate), par);
}

}  // namespace SGDC_CPU_ISA
}  // namespace cpu
}  // namespace sgdc

// The definitions of window_conv_cpu_isa.h for this instruction set.
namespace sgdc {
namespace cpu {
namespace SGDC_CPU_ISA {

bool compiled() { return true; }

void forward(const Shape& s, DType dtype, Layout layout, const void* x, const void* weights, const void* gate,
             void* out, const Parallel& par) {
  switch (dtype) {
    case DType::kFloat32: return run_forward<float, float>(s, layout, x, weights, gate, out, par);
    case DType::kFloat64: return run_forward<double, double>(s, layout, x, weights, gate, out, par);
    case DType::kBFloat16: return run_forward<float, bf16>(s, layout, x, weights, gate, out, par);
    case DType::kFloat16: return run_forward<float, f16>(s, layout, x, weights, gate, out, par);
  }
}

void backward(const Shape& s, DType dtype, Layout layout, const void* grad_out, const void* x, const void* weights,
              const void* gate, void* dx, void* dweights, void* dgate, const Parallel& par) {
  switch (dtype) {
    case DType::kFloat32:
      return run_backward<float, float>(s, layout, grad_out, x, weights, gate, dx, dweights, dgate, par);
    case DType::kFloat64:
      return run_backward<double, double>(s, layout, grad_out, x, weights, gate, dx, dweights, dgate, par);
    case DType::kBFloat16:
      return run_backward<float, bf16>(s, layout, grad_out, x, weights, gate, dx, dweights, dgate, par);
    case DType::kFloat16:
      return run_backward<float, f16>(s, layout, grad_out, x, weights, gate, dx, dweights, dgate, par);
  }
}

}  // namespace SGDC_CPU_ISA
}  // namespace cpu
}  // namespace sgdc
