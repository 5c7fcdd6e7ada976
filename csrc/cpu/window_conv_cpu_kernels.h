// The window_conv CPU kernels (definition: docs/op.md), templated on the storage type. Included
// once by each instruction-set translation unit (window_conv_cpu_<isa>.cpp), which selects its
// target and defines SGDC_CPU_ISA, the namespace the kernels are compiled into (sgdc::cpu::<isa>),
// and SGDC_VEC_BYTES, the width of its vector registers (64 for AVX-512, 32 for AVX2 with FMA and
// F16C; 16, SSE2 or the architecture's baseline, when not defined).
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

#if defined(__SSE2__)
#include <immintrin.h>
#endif

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
// Integers

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Vectors: GCC/Clang vector extensions as wide as the instruction set's registers (64 bytes with
// AVX-512, 32 with AVX2, 16 otherwise), which the compiler lowers to that instruction set. Plain
// arrays of accumulators would say the same, but GCC 12 keeps some of them in memory across loop
// iterations; vector-typed locals stay in registers.

#if !defined(SGDC_VEC_BYTES)
#define SGDC_VEC_BYTES 16  // set by the translation unit of AVX-512 (64) or AVX2 (32)
#endif

typedef float vf __attribute__((vector_size(SGDC_VEC_BYTES)));
typedef double vd __attribute__((vector_size(SGDC_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(SGDC_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(SGDC_VEC_BYTES)));
typedef int64_t vl __attribute__((vector_size(SGDC_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(SGDC_VEC_BYTES / 2)));  // one uint16 per float lane

template <class A>
struct Vec;
template <>
struct Vec<float> {
  typedef vf type;
  typedef vi mask;
  typedef int32_t lane_int;
  static constexpr int N = SGDC_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
  typedef vd type;
  typedef vl mask;
  typedef int64_t lane_int;
  static constexpr int N = SGDC_VEC_BYTES / 8;
};

// s in every lane (s - 0, not 0 + s, which GCC keeps as an addition: -0 + 0 is +0)
template <class A>
inline typename Vec<A>::type splat(A s) {
  const typename Vec<A>::type z = {};
  return s - z;
}

inline vf vfma(vf a, vf b, vf c) {
#if SGDC_VEC_BYTES == 64
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif SGDC_VEC_BYTES == 32
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline vd vfma(vd a, vd b, vd c) {
#if SGDC_VEC_BYTES == 64
  return (vd)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif SGDC_VEC_BYTES == 32
  return (vd)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

// Full vectors of N lanes from and to storage, converted (as the scalar Convert).
template <class A, class T>
struct VConvert;
template <>
struct VConvert<float, float> {
  static vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
};
template <>
struct VConvert<double, double> {
  static vd load(const double* p) {
    vd v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
};
template <>
struct VConvert<float, bf16> {
  // the 16-bit values widened in place (one vpmovzxwd from memory; GCC splits the generic
  // conversion of a 64-byte vector into halves) and moved to the upper half of each lane
  static vf load(const bf16* p) {
#if SGDC_VEC_BYTES == 64
    const __m512i w = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return (vf)((vu)w << 16);
#elif SGDC_VEC_BYTES == 32
    return (vf)((vu)_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))) << 16);
#else
    vh h;
    std::memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
  }
  static void store(bf16* p, vf v) {
    const vu u = (vu)v;
    const vu quiet = (vu){} + 0x7fc0u;
    const vu r = ((u & 0x7fffffffu) > 0x7f800000u) ? quiet : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
#if SGDC_VEC_BYTES == 64
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(0xffff, (__m512i)r));
#else
    const vh h = __builtin_convertvector(r, vh);
    std::memcpy(p, &h, sizeof h);
#endif
  }
};
template <>
struct VConvert<float, f16> {
  static vf load(const f16* p) {
#if SGDC_VEC_BYTES == 64
    // maskz: the unmasked intrinsics start from an undefined register, which GCC 12 warns about
    return (vf)_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif SGDC_VEC_BYTES == 32
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vf v;
    for (int l = 0; l < Vec<float>::N; ++l) v[l] = f16_to_float(p[l].bits);
    return v;
#endif
  }
  static void store(f16* p, vf v) {
#if SGDC_VEC_BYTES == 64
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_maskz_cvtps_ph(0xffff, (__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif SGDC_VEC_BYTES == 32
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int l = 0; l < Vec<float>::N; ++l) p[l].bits = float_to_f16(v[l]);
#endif
  }
};

// The first n < N lanes, the others zero: masked loads and stores where the instruction set has
// them, a copy through a small array elsewhere.
template <class A, class T>
struct VPartial {
  static typename Vec<A>::type load(const T* p, int64_t n) {
    T tmp[Vec<A>::N];
    std::memset(static_cast<void*>(tmp), 0, sizeof tmp);
    std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
    return VConvert<A, T>::load(tmp);
  }
  static void store(T* p, typename Vec<A>::type v, int64_t n) {
    T tmp[Vec<A>::N];
    VConvert<A, T>::store(tmp, v);
    std::memcpy(static_cast<void*>(p), tmp, static_cast<size_t>(n) * sizeof(T));
  }
};
#if SGDC_VEC_BYTES == 64
inline __mmask16 lanes16(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
template <>
struct VPartial<float, float> {
  static vf load(const float* p, int64_t n) { return (vf)_mm512_maskz_loadu_ps(lanes16(n), p); }
  static void store(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, lanes16(n), (__m512)v); }
};
template <>
struct VPartial<double, double> {
  static vd load(const double* p, int64_t n) { return (vd)_mm512_maskz_loadu_pd(static_cast<__mmask8>(lanes16(n)), p); }
  static void store(double* p, vd v, int64_t n) {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>(lanes16(n)), (__m512d)v);
  }
};
template <>
struct VPartial<float, bf16> {
  static vf load(const bf16* p, int64_t n) {
    const vh h = (vh)_mm256_maskz_loadu_epi16(lanes16(n), p);
    return (vf)(__builtin_convertvector(h, vu) << 16);
  }
  static void store(bf16* p, vf v, int64_t n) {
    bf16 tmp[16];
    VConvert<float, bf16>::store(tmp, v);
    _mm256_mask_storeu_epi16(p, lanes16(n), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tmp)));
  }
};
template <>
struct VPartial<float, f16> {
  static vf load(const f16* p, int64_t n) {
    return (vf)_mm512_maskz_cvtph_ps(0xffff, _mm256_maskz_loadu_epi16(lanes16(n), p));
  }
  static void store(f16* p, vf v, int64_t n) {
    _mm256_mask_storeu_epi16(p, lanes16(n),
                             _mm512_maskz_cvtps_ph(0xffff, (__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#elif SGDC_VEC_BYTES == 32
inline __m256i lanes8(int64_t n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
template <>
struct VPartial<float, float> {
  static vf load(const float* p, int64_t n) { return (vf)_mm256_maskload_ps(p, lanes8(n)); }
  static void store(float* p, vf v, int64_t n) { _mm256_maskstore_ps(p, lanes8(n), (__m256)v); }
};
template <>
struct VPartial<double, double> {
  static __m256i lanes4(int64_t n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static vd load(const double* p, int64_t n) { return (vd)_mm256_maskload_pd(p, lanes4(n)); }
  static void store(double* p, vd v, int64_t n) { _mm256_maskstore_pd(p, lanes4(n), (__m256d)v); }
};
#endif

// n lanes: a full vector when n >= N, else the first n (the others zero).
template <class A, class T>
inline typename Vec<A>::type vload(const T* p, int64_t n) {
  if (n >= Vec<A>::N) return VConvert<A, T>::load(p);
  return VPartial<A, T>::load(p, n);
}
template <class A, class T>
inline typename Vec<A>::type vload(const T* p) {
  return VConvert<A, T>::load(p);
}
template <class A, class T>
inline void vstore(T* p, typename Vec<A>::type v, int64_t n) {
  if (n >= Vec<A>::N) return VConvert<A, T>::store(p, v);
  VPartial<A, T>::store(p, v, n);
}

// max(a, x) and min(a, x) per lane, x where x is NaN (the rule of x86's maxps/minps for their
// second operand)
inline vf vmax_nan(vf a, vf x) {
#if SGDC_VEC_BYTES == 64
  return (vf)_mm512_maskz_max_ps(0xffff, (__m512)a, (__m512)x);  // maskz: see VConvert<float, f16>
#elif SGDC_VEC_BYTES == 32
  return (vf)_mm256_max_ps((__m256)a, (__m256)x);
#elif defined(__SSE2__)
  return (vf)_mm_max_ps((__m128)a, (__m128)x);
#else
  return a > x ? a : x;
#endif
}
inline vf vmin_nan(vf a, vf x) {
#if SGDC_VEC_BYTES == 64
  return (vf)_mm512_maskz_min_ps(0xffff, (__m512)a, (__m512)x);
#elif SGDC_VEC_BYTES == 32
  return (vf)_mm256_min_ps((__m256)a, (__m256)x);
#elif defined(__SSE2__)
  return (vf)_mm_min_ps((__m128)a, (__m128)x);
#else
  return a < x ? a : x;
#endif
}

// exp(x) in float32 per lane: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes'
// expf, about 1 ulp), then the power of two applied with one rounding, so that subnormal results
// (x down to -103.97) come out as libm's do: a softmax weight that underflows to a subnormal still
// turns an infinite input into an infinity, not a NaN. x is clamped to [-104, 88.8], where the
// scaling itself gives 0 and inf; NaN passes the clamps and stays NaN. About 17 operations with
// AVX-512 (vscalefps applies 2^n), 24 without.
inline vf vexp(vf x) {
  const vf xc = vmin_nan(splat(88.8f), vmax_nan(splat(-104.0f), x));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = vfma(xc, splat(1.44269504088896341f), magic);
  const vf n = t - magic;
  vf r = vfma(n, splat(-0.693359375f), xc);
  r = vfma(n, splat(2.12194440e-4f), r);
  vf p = splat(1.9875691500e-4f);
  p = vfma(p, r, splat(1.3981999507e-3f));
  p = vfma(p, r, splat(8.3334519073e-3f));
  p = vfma(p, r, splat(4.1665795894e-2f));
  p = vfma(p, r, splat(1.6666665459e-1f));
  p = vfma(p, r, splat(5.0000001201e-1f));
  p = vfma(p, r * r, r + 1.0f);
#if SGDC_VEC_BYTES == 64
  return (vf)_mm512_maskz_scalef_ps(0xffff, (__m512)p, (__m512)n);
#else
  // 2^n = 2^h * 2^(n-h), h = floor(n/2): both normal for n in [-150, 128]
  const vi e = (vi)t - (vi)magic;
  const vi h = e >> 1;
  return p * (vf)((h + 127) << 23) * (vf)((e - h + 127) << 23);
#endif
}
inline vd vexp(vd x) {
  for (int l = 0; l < Vec<double>::N; ++l) x[l] = __builtin_exp(x[l]);
  return x;
}
template <class V>
inline V vsigmoid(V g) {
  return 1 / (1 + vexp(-g));
}

// Maximum (NaN lanes ignored) and sum of the lanes, by a butterfly: a fixed order of operations
// (the shuffle masks are constants once Wd is)
template <class A, int Wd>
inline typename Vec<A>::type swap_lanes(typename Vec<A>::type v) {
  typename Vec<A>::mask m;
  for (int l = 0; l < Vec<A>::N; ++l) m[l] = l ^ Wd;
  return __builtin_shuffle(v, m);
}
template <class A, int Wd = Vec<A>::N / 2>
inline A hmax(typename Vec<A>::type v) {
  const typename Vec<A>::type o = swap_lanes<A, Wd>(v);
  v = o > v ? o : v;
  if constexpr (Wd > 1)
    return hmax<A, Wd / 2>(v);
  else
    return v[0];
}
template <class A, int Wd = Vec<A>::N / 2>
inline A hsum(typename Vec<A>::type v) {
  v = v + swap_lanes<A, Wd>(v);
  if constexpr (Wd > 1)
    return hsum<A, Wd / 2>(v);
  else
    return v[0];
}

// ---------------------------------------------------------------------------------------------
// Buffers and tables

// The inner loops are functions of their own: inlined into a large caller, whose loops keep other
// constants in registers (the exponential's coefficients), GCC keeps their accumulators in memory.
#define SGDC_NOINLINE __attribute__((noinline))

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
  int64_t max_pairs() const {
    int64_t m = 0;
    for (int64_t q = 0; q < n; ++q) m = imax(m, in_off[q + 1] - in_off[q]);
    return m;
  }
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

// How a call is split into work items: bands of rows x tiles of columns (x heads in NCHW). A
// tile is as wide as the item's buffers allow (`floats_per_col` per column, about 1 MB in all, at
// least 64 columns); enough bands give every thread a few items.
struct Split {
  int64_t bands = 1, tiles = 1, band_rows = 1, tile_cols = 1;
  Split(const Shape& s, int64_t per_sample, int64_t floats_per_col, int threads) {
    const int64_t max_cols = imax(64, (int64_t{1} << 18) / imax(floats_per_col, 1));
    tiles = ceil_div(s.W, max_cols);
    tile_cols = ceil_div(s.W, tiles);
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
  using V = typename Vec<A>::type;
  static constexpr int N = Vec<A>::N;  // lanes of a vector

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

  static V load(const A* p) { return vload<A>(p); }
  static void store(A* p, V v) { VConvert<A, A>::store(p, v); }

  // ---- NCHW

  int64_t x_index(int64_t b, int64_t c, int64_t i, int64_t j) const { return ((b * C + c) * H + i) * W + j; }
  int64_t w_index(int64_t b, int64_t ch, int64_t i, int64_t j) const { return ((b * G * KK + ch) * H + i) * W + j; }

  // Rows of x staged as A over image columns [xlo, xhi), zero outside the image: one slot per row
  // of a window (the K rows of a window, S(p) + u*d, fall in K distinct slots), reused as long as
  // consecutive output rows read them.
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
  };

  // Image row i staged in the ring (its slot: Cg rows of `width` values), or null for a row
  // outside the image.
  const A* stage(XRing& ring, const T* x, int64_t b, int64_t c0, int64_t i) const {
    if (i < 0 || i >= H) return nullptr;
    const int64_t slot = (i / d) % K;
    A* base = ring.data.p + slot * Cg * ring.width;
    if (ring.tag[slot] != i) {
      ring.tag[slot] = i;
      const int64_t ca = imax(ring.xlo, 0), cb = imin(ring.xlo + ring.width, W);
      for (int64_t c = 0; c < Cg; ++c) {
        A* dst = base + c * ring.width - ring.xlo;
        const T* src = x + x_index(b, c0 + c, i, 0);
        for (int64_t col = ring.xlo; col < ca; ++col) dst[col] = 0;
        int64_t col = ca;
        for (; col + N <= cb; col += N) store(dst + col, vload<A>(src + col));
        for (; col < cb; ++col) dst[col] = ld<A>(src + col);
        for (col = imax(cb, ring.xlo); col < ring.xlo + ring.width; ++col) dst[col] = 0;
      }
    }
    return base;
  }

  // Channels per window row in the x pointer tables: Cg rounded up to a block of 8, the channels
  // past Cg pointing at a row of zeros (so that blocks need no test per channel).
  int64_t cstride() const { return ceil_div(imax(Cg, 1), 8) * 8; }

  // x pointers of the window rows of output row p: xr[u * cstride() + c] indexed by image column
  void window_rows(XRing& ring, const T* x, int64_t b, int64_t g, int64_t p, const A** xr) const {
    for (int64_t u = 0; u < K; ++u) {
      const A* base = stage(ring, x, b, g * Cg, rows.start[p] + u * d);
      for (int64_t c = 0; c < Cg; ++c)
        xr[u * cstride() + c] = (base ? base + c * ring.width : ring.zero.p) - ring.xlo;
      for (int64_t c = Cg; c < cstride(); ++c) xr[u * cstride() + c] = ring.zero.p - ring.xlo;
    }
  }

  template <class F>
  void nchw_items(const Parallel& par, int64_t floats_per_col, const F& item) const {
    const Split split(s, G, floats_per_col, par.threads);
    parallel_items(par, B * G * split.bands * split.tiles, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t tile = it % split.tiles, band = it / split.tiles % split.bands;
        const int64_t g = it / split.tiles / split.bands % G, b = it / split.tiles / split.bands / G;
        const int64_t qa = band * split.band_rows, ja = tile * split.tile_cols;
        item(b, g, qa, imin(H, qa + split.band_rows), Cols(cols, ja, imin(W, ja + split.tile_cols)));
      }
    });
  }

  // whether columns [j, j + n) hold one whose window is not centred (a clamped border)
  bool shifted(int64_t j, int64_t n) const {
    if (!clamp) return false;
    for (int64_t l = 0; l < n; ++l)
      if (!cols.centred[j + l]) return true;
    return false;
  }
  bool not_plain(int64_t j, int64_t n) const {
    if (!clamp) return false;
    for (int64_t l = 0; l < n; ++l)
      if (!cols.plain_in[j + l]) return true;
    return false;
  }

  void forward_nchw(const T* x, const T* w, const T* gate, T* out, const Parallel& par) const {
    nchw_items(par, K * Cg, [&](int64_t b, int64_t g, int64_t qa, int64_t qb, const Cols& tc) {
      forward_nchw_item(x, w, gate, out, b, g, qa, qb, tc);
    });
  }

  // Prefetches (into the caches, ahead of use) columns [ja, ja + n) of `rows` rows of a
  // tensor, row r at src + r * stride: the NCHW planes of one output row (K*K logits, Cg gates)
  // are that many streams, more than the hardware prefetchers follow.
  static void prefetch_rows(const T* src, int64_t rows_, int64_t stride, int64_t n) {
    constexpr int64_t step = 64 / sizeof(T);
    for (int64_t r_ = 0; r_ < rows_; ++r_)
      for (int64_t j = 0; j < n; j += step) __builtin_prefetch(src + r_ * stride + j, 0, 2);
  }

  // The window sums of NB channels (c0 ...) at the N columns whose first tap is column `off` of
  // the staged rows xr[u * cstride() + c] (indexed by image column): per tap a load of the tap's weights
  // (P[t * N ...]) and NB shifted loads of x, into NB accumulators. Channels past Cg read `zero`.
  template <int NB>
  void window_block(const A* P, const A* const* xr, int64_t c0, int64_t off, V* acc) const {
    V a[NB];
    const A* xc[NB];
    for (int cb = 0; cb < NB; ++cb) a[cb] = V{};
    for (int64_t u = 0; u < K; ++u) {
      for (int cb = 0; cb < NB; ++cb) xc[cb] = xr[u * cstride() + c0 + cb] + off;
      const A* Pu = P + u * K * N;
      for (int64_t v = 0; v < K; ++v) {
        const V pv = load(Pu + v * N);
        for (int cb = 0; cb < NB; ++cb) a[cb] = vfma(pv, load(xc[cb] + v * d), a[cb]);
      }
    }
    for (int cb = 0; cb < NB; ++cb) acc[cb] = a[cb];
  }

  // Per output row: per chunk of N columns, the exponentials of the chunk's logits (KK x N, in
  // L1) and the reciprocal of their sum, then per block of 8 (or 4) channels the window sums in
  // vector accumulators (window_block), scaled by the reciprocal and the gate; the columns of
  // clamped borders (whose windows are not centred) are redone one by one.
  void forward_nchw_item(const T* x, const T* w, const T* gate, T* out, int64_t b, int64_t g, int64_t qa, int64_t qb,
                         const Cols& tc) const {
    const int64_t TW = tc.jb - tc.ja, TWP = ceil_div(TW, N) * N;
    XRing ring(Cg, K, d, imin(tc.xlo, tc.ja - r * d), imax(tc.xhi, tc.ja + TWP + r * d));
    Buf<A> P(KK * N), fix(8 * N);
    Buf<const A*> xr(K * cstride());
    const int64_t plane = H * W;
    for (int64_t m = 0; m < d; ++m) {
      for (int64_t p = qa + ((m - qa % d) % d + d) % d; p < qb; p += d) {
        const bool ahead = p + 2 * d < qb;  // two rows ahead
        const int64_t pn = p + 2 * d, i_next = ahead ? rows.start[pn] + (K - 1) * d : H;  // the row of x row pn adds
        window_rows(ring, x, b, g, p, xr.p);
        for (int64_t jo = 0; jo < TW; jo += N) {
          const int64_t j0 = tc.ja + jo, n = imin(N, TW - jo);
          if (ahead) {  // this chunk of row pn: its logits, gates, and the row of x it adds
            prefetch_rows(w + w_index(b, g * KK, pn, j0), KK, plane, n);
            if (gate != nullptr) prefetch_rows(gate + x_index(b, g * Cg, pn, j0), Cg, plane, n);
            if (i_next < H) prefetch_rows(x + x_index(b, g * Cg, i_next, j0), Cg, plane, n);
          }
          const T* wsrc = w + w_index(b, g * KK, p, j0);
          V mx = vload<A>(wsrc, n);
          store(P.p, mx);
          for (int64_t t = 1; t < KK; ++t) {
            const V v = vload<A>(wsrc + t * plane, n);
            store(P.p + t * N, v);
            mx = v > mx ? v : mx;  // NaN skipped: a NaN logit makes its pixel NaN through exp
          }
          V inv = splat(A(1));
          if (softmax) {
            V sum = {};
            for (int64_t t = 0; t < KK; ++t) {
              const V e = vexp(load(P.p + t * N) - mx);
              store(P.p + t * N, e);
              sum += e;
            }
            inv = 1 / sum;
          }
          const bool edge = shifted(j0, n);
          for (int64_t c0 = 0; c0 < Cg;) {
            const int nb = Cg - c0 >= 8 ? 8 : 4;
            V acc[8] = {};
            if (nb == 8)
              window_block<8>(P.p, xr.p, c0, j0 - r * d, acc);
            else
              window_block<4>(P.p, xr.p, c0, j0 - r * d, acc);
            if (edge) {
              for (int cb = 0; cb < 8; ++cb) store(fix.p + cb * N, acc[cb]);
              for (int64_t l = 0; l < n; ++l) {
                const int64_t j = j0 + l;
                if (cols.centred[j]) continue;
                for (int cb = 0; cb < nb && c0 + cb < Cg; ++cb) {
                  A a = 0;
                  for (int64_t u = 0; u < K; ++u)
                    for (int64_t v = 0; v < K; ++v)
                      a += P[(u * K + v) * N + l] * xr[u * cstride() + c0 + cb][cols.start[j] + v * d];
                  fix[cb * N + l] = a;
                }
              }
              for (int cb = 0; cb < 8; ++cb) acc[cb] = load(fix.p + cb * N);
            }
            const int64_t at = x_index(b, g * Cg + c0, p, j0);
            if (nb == 8 && c0 + 8 <= Cg && n == N) {  // 8 gates at once: their sigmoids interleave
              V y[8];
              for (int cb = 0; cb < 8; ++cb) y[cb] = acc[cb] * inv;
              if (gate != nullptr)
                for (int cb = 0; cb < 8; ++cb) y[cb] = y[cb] * vsigmoid(vload<A>(gate + at + cb * plane));
              for (int cb = 0; cb < 8; ++cb) vstore<A>(out + at + cb * plane, y[cb], N);
            } else {
              for (int cb = 0; cb < nb && c0 + cb < Cg; ++cb) {
                V y = acc[cb] * inv;
                if (gate != nullptr) y = y * vsigmoid(vload<A>(gate + at + cb * plane, n));
                vstore<A>(out + at + cb * plane, y, n);
              }
            }
            c0 += nb;
          }
        }
      }
    }
  }

  void backward_nchw(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate,
                     const Parallel& par) const {
    const int64_t ring_rows = (K + r) * d;  // about the rows a sweep keeps
    nchw_items(par, ring_rows * (KK + Cg) + K * Cg, [&](int64_t b, int64_t g, int64_t qa, int64_t qb, const Cols& tc) {
      backward_nchw_item(dout, x, w, gate, dx, dw, dgate, b, g, qa, qb, tc);
    });
  }

  // dP[t] += sum over NB channels (c0 ...) of g_y * x_t and (WY: with a gate, for dgate) y[c] =
  // sum over taps of P[t] * x_t at the N columns from j0 (the tile's first tap at column off of
  // the staged rows)
  template <int NB, bool WY>
  void dp_block(const A* Pr, int64_t BW, const A* Gr, const A* const* xr, const A* zero, int64_t c0,
                int64_t j0, int64_t off, A* dP, V* yout) const {
    V gy[NB], y[NB];
    const A* xc[NB];
    for (int cb = 0; cb < NB; ++cb) {
      gy[cb] = load((c0 + cb < Cg ? Gr + (c0 + cb) * BW : zero) + j0);
      y[cb] = V{};
    }
    for (int64_t u = 0; u < K; ++u) {
      for (int cb = 0; cb < NB; ++cb) xc[cb] = xr[u * cstride() + c0 + cb] + off;
      for (int64_t v = 0; v < K; ++v) {
        const int64_t t = u * K + v;
        const V pv = load(Pr + t * BW + j0);
        V dp = load(dP + t * N);
        for (int cb = 0; cb < NB; ++cb) {
          const V xv = load(xc[cb] + v * d);
          dp = vfma(gy[cb], xv, dp);
          if (WY) y[cb] = vfma(pv, xv, y[cb]);
        }
        store(dP + t * N, dp);
      }
    }
    for (int cb = 0; cb < NB; ++cb) yout[cb] = y[cb];
  }

  // dx at the N columns from j0 for NB channels (c0 ...): over the (row, tap) pairs of row q, the
  // K column taps as shifted loads of the P and g_y rings
  template <int NB>
  void dx_block(const A* Pring, const A* Gring, int64_t BW, int64_t bA, int64_t slots, const A* zero, int64_t q,
                int64_t c0, int64_t j0, V* acc) const {
    V a[NB];
    const A* gq[NB];
    for (int cb = 0; cb < NB; ++cb) a[cb] = V{};
    for (int64_t e = rows.pairs_begin(q); e < rows.pairs_end(q); ++e) {
      const int64_t ps = (rows.in_p[e] / d) % slots, u = rows.in_k[e];
      const A* Pq = Pring + (ps * KK + u * K) * BW - bA + j0 + r * d;
      for (int cb = 0; cb < NB; ++cb)
        gq[cb] = (c0 + cb < Cg ? Gring + (ps * Cg + c0 + cb) * BW - bA : zero) + j0 + r * d;
      for (int64_t v = 0; v < K; ++v) {
        const V pv = load(Pq + v * (BW - d));
        for (int cb = 0; cb < NB; ++cb) a[cb] = vfma(pv, load(gq[cb] - v * d), a[cb]);
      }
    }
    for (int cb = 0; cb < NB; ++cb) acc[cb] = a[cb];
  }

  // The sweep of a band (see the top of this file). Rings, indexed by image column over
  // [bA, bA + BW): P (KK rows) and g_y (Cg rows) of output row p, and sigmoid(gate) for p's
  // dgate, computed over the output columns the tile's dx reads, zero elsewhere.
  void backward_nchw_item(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate, int64_t b,
                          int64_t g, int64_t qa, int64_t qb, const Cols& tc) const {
    const int64_t TW = tc.jb - tc.ja, TWP = ceil_div(TW, N) * N;
    const int64_t bA = imin(tc.lo, tc.ja - r * d), BW = imax(tc.hi, tc.ja + TWP + r * d) - bA;
    int64_t slots = 1;
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (!sw.empty()) slots = imax(slots, sw.slots);
    }
    Buf<A> Pring(slots * KK * BW), Gring(slots * Cg * BW), Srow(imax(Cg, 1) * BW), zrow(BW);
    Buf<A> Pc(KK * N), dP(KK * N), Y(imax(Cg, 1) * N), fix(8 * N);
    XRing ring(Cg, K, d, imin(tc.xlo, tc.ja - r * d), imax(tc.xhi, tc.ja + TWP + r * d));
    Buf<const A*> xr(K * cstride());
    const A* zero = zrow.p - bA;
    const int64_t plane = H * W;
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (sw.empty()) continue;
      int64_t next = sw.first;
      for (int64_t p = sw.lo; p <= sw.hi; p += d) {
        const int64_t slot = (p / d) % slots;
        A* Pr = Pring.p + slot * KK * BW - bA;  // indexed by image column
        A* Gr = Gring.p + slot * Cg * BW - bA;
        A* Sr = Srow.p - bA;
        const bool owned = p >= qa && p < qb;
        if (p + d <= sw.hi) {  // the next row's logits, gates and incoming gradients
          prefetch_rows(w + w_index(b, g * KK, p + d, tc.lo), KK, plane, tc.hi - tc.lo);
          prefetch_rows(dout + x_index(b, g * Cg, p + d, tc.lo), Cg, plane, tc.hi - tc.lo);
          if (gate != nullptr) prefetch_rows(gate + x_index(b, g * Cg, p + d, tc.lo), Cg, plane, tc.hi - tc.lo);
        }
        for (int64_t c0 = tc.lo; c0 < tc.hi; c0 += N) {
          const int64_t n = imin(N, tc.hi - c0);
          const T* wsrc = w + w_index(b, g * KK, p, c0);
          V mx = vload<A>(wsrc, n);
          store(Pc.p, mx);
          for (int64_t t = 1; t < KK; ++t) {
            const V v = vload<A>(wsrc + t * plane, n);
            store(Pc.p + t * N, v);
            mx = v > mx ? v : mx;
          }
          if (softmax) {
            V sum = {};
            for (int64_t t = 0; t < KK; ++t) {
              const V e = vexp(load(Pc.p + t * N) - mx);
              store(Pc.p + t * N, e);
              sum += e;
            }
            const V inv = 1 / sum;
            for (int64_t t = 0; t < KK; ++t) vstore<A>(Pr + t * BW + c0, load(Pc.p + t * N) * inv, n);
          } else {
            for (int64_t t = 0; t < KK; ++t) vstore<A>(Pr + t * BW + c0, load(Pc.p + t * N), n);
          }
          for (int64_t c = 0; c < Cg; ++c) {
            const int64_t at = x_index(b, g * Cg + c, p, c0);
            V gy = vload<A>(dout + at, n);
            if (gate != nullptr) {
              const V sg = vsigmoid(vload<A>(gate + at, n));
              gy = gy * sg;
              if (owned) vstore<A>(Sr + c * BW + c0, sg, n);
            }
            vstore<A>(Gr + c * BW + c0, gy, n);
          }
        }
        if (owned) {
          window_rows(ring, x, b, g, p, xr.p);
          for (int64_t jo = 0; jo < TW; jo += N) {
            const int64_t j0 = tc.ja + jo, n = imin(N, TW - jo);
            for (int64_t t = 0; t < KK; ++t) store(dP.p + t * N, V{});
            // dP[t] = sum over the head's channels of g_y * x_t, and y (for dgate), a block of 8
            // (or 4) channels at a time
            for (int64_t c0 = 0; c0 < Cg;) {
              const int nb = Cg - c0 >= 8 ? 8 : 4;
              V y[8] = {};
              if (gate != nullptr) {
                if (nb == 8)
                  dp_block<8, true>(Pr, BW, Gr, xr.p, zero, c0, j0, j0 - r * d, dP.p, y);
                else
                  dp_block<4, true>(Pr, BW, Gr, xr.p, zero, c0, j0, j0 - r * d, dP.p, y);
              } else {
                if (nb == 8)
                  dp_block<8, false>(Pr, BW, Gr, xr.p, zero, c0, j0, j0 - r * d, dP.p, y);
                else
                  dp_block<4, false>(Pr, BW, Gr, xr.p, zero, c0, j0, j0 - r * d, dP.p, y);
              }
              for (int cb = 0; cb < 8; ++cb) {
                if (cb >= nb || c0 + cb >= Cg) break;
                store(Y.p + (c0 + cb) * N, y[cb]);
              }
              c0 += nb;
            }
            if (shifted(j0, n)) {  // clamped borders: those columns again, one by one
              for (int64_t l = 0; l < n; ++l) {
                const int64_t j = j0 + l;
                if (cols.centred[j]) continue;
                for (int64_t t = 0; t < KK; ++t) dP[t * N + l] = 0;
                for (int64_t c = 0; c < Cg; ++c) {
                  A yc = 0;
                  for (int64_t u = 0; u < K; ++u)
                    for (int64_t v = 0; v < K; ++v) {
                      const A xv = xr[u * cstride() + c][cols.start[j] + v * d];
                      dP[(u * K + v) * N + l] += Gr[c * BW + j] * xv;
                      yc += Pr[(u * K + v) * BW + j] * xv;
                    }
                  Y[c * N + l] = yc;
                }
              }
            }
            V sum = {};
            if (softmax)
              for (int64_t t = 0; t < KK; ++t) sum = vfma(load(Pr + t * BW + j0), load(dP.p + t * N), sum);
            for (int64_t t = 0; t < KK; ++t) {
              const V dpv = load(dP.p + t * N);
              const V v = softmax ? load(Pr + t * BW + j0) * (dpv - sum) : dpv;
              vstore<A>(dw + w_index(b, g * KK + t, p, j0), v, n);
            }
            if (gate != nullptr)
              for (int64_t c = 0; c < Cg; ++c) {
                const int64_t at = x_index(b, g * Cg + c, p, j0);
                const V sg = load(Sr + c * BW + j0);
                vstore<A>(dgate + at, vload<A>(dout + at, n) * load(Y.p + c * N) * sg * (1 - sg), n);
              }
          }
        }
        // every dx row whose readers have all been swept: per chunk of N columns and block of 8
        // (or 4) channels, dx_block; the columns near clamped borders one by one
        for (; next <= sw.last && rows.last_reader(next) <= p; next += d) {
          const int64_t q = next;
          for (int64_t jo = 0; jo < TW; jo += N) {
            const int64_t j0 = tc.ja + jo, n = imin(N, TW - jo);
            const bool edge = not_plain(j0, n);
            for (int64_t c0 = 0; c0 < Cg;) {
              const int nb = Cg - c0 >= 8 ? 8 : 4;
              V acc[8] = {};
              if (nb == 8)
                dx_block<8>(Pring.p, Gring.p, BW, bA, slots, zero, q, c0, j0, acc);
              else
                dx_block<4>(Pring.p, Gring.p, BW, bA, slots, zero, q, c0, j0, acc);
              if (edge) {
                for (int cb = 0; cb < 8; ++cb) store(fix.p + cb * N, acc[cb]);
                for (int64_t l = 0; l < n; ++l) {
                  const int64_t j = j0 + l;
                  if (cols.plain_in[j]) continue;
                  for (int cb = 0; cb < nb && c0 + cb < Cg; ++cb) {
                    A a = 0;
                    for (int64_t e = rows.pairs_begin(q); e < rows.pairs_end(q); ++e) {
                      const int64_t ps = (rows.in_p[e] / d) % slots, u = rows.in_k[e];
                      const A* Pq = Pring.p + (ps * KK + u * K) * BW - bA;
                      const A* Gq = Gring.p + (ps * Cg + c0 + cb) * BW - bA;
                      for (int64_t f = cols.pairs_begin(j); f < cols.pairs_end(j); ++f)
                        a += Pq[cols.in_k[f] * BW + cols.in_p[f]] * Gq[cols.in_p[f]];
                    }
                    fix[cb * N + l] = a;
                  }
                }
                for (int cb = 0; cb < 8; ++cb) acc[cb] = load(fix.p + cb * N);
              }
              for (int cb = 0; cb < 8; ++cb) {
                if (cb >= nb || c0 + cb >= Cg) break;
                vstore<A>(dx + x_index(b, g * Cg + c0 + cb, q, j0), acc[cb], n);
              }
              c0 += nb;
            }
          }
        }
      }
    }
  }

  // ---- channels_last

  int64_t pix(int64_t b, int64_t i, int64_t j) const { return (b * H + i) * W + j; }

  template <class F>
  void cl_items(const Parallel& par, int64_t floats_per_col, const F& item) const {
    const Split split(s, 1, floats_per_col, par.threads);
    parallel_items(par, B * split.bands * split.tiles, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t tile = it % split.tiles, band = it / split.tiles % split.bands;
        const int64_t b = it / split.tiles / split.bands;
        const int64_t qa = band * split.band_rows, ja = tile * split.tile_cols;
        item(b, qa, imin(H, qa + split.band_rows), Cols(cols, ja, imin(W, ja + split.tile_cols)));
      }
    });
  }

  // A vector of channels: from channel c, n lanes (n < N: the tail of a head), of head h.
  struct Chunk {
    int64_t c, n, h;
  };

  // The chunks of a pixel's C channels: full ones first (heads of a multiple of N channels split
  // into full chunks only), then the tails of heads whose channels are not a multiple of N.
  int64_t chunks(Chunk* out) const {
    int64_t k = 0;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c + N <= Cg; c += N) out[k++] = Chunk{g * Cg + c, N, g};
    for (int64_t g = 0; g < G; ++g)
      if (Cg % N) out[k++] = Chunk{g * Cg + Cg / N * N, Cg % N, g};
    return k;
  }
  int64_t max_chunks() const { return G * ceil_div(imax(Cg, 1), N); }

  // acc[k] = sum over entries e < ne of w_e(h_k) * X_e[c_k .. c_k + n_k), for NCH chunks ch[k],
  // where w_e(h) = pw[e][h * pstride]: a window sum (entries: taps; X: x; w: P) or dx's sum over
  // (row, tap) x (column, tap) pairs (X: g_y; w: P). NS = 4 / NCH accumulators per chunk take the
  // entries in turn (independent FMA chains), and are added in a fixed order at the end.
  template <int NCH, bool PARTIAL, class X>
  SGDC_NOINLINE static void wsum(int64_t ne, const X* const* xp, const A* const* pw, int64_t pstride, const Chunk* ch, V* acc) {
    constexpr int NS = 4 / NCH;
    V a[NS * NCH];  // one dimension: GCC keeps it in registers (not a 2-d array)
    int64_t ck[NCH], hk[NCH];
    const int64_t nk = PARTIAL ? ch[0].n : N;
    for (int k = 0; k < NCH; ++k) {
      ck[k] = ch[k].c, hk[k] = ch[k].h * pstride;
      for (int s_ = 0; s_ < NS; ++s_) a[(s_) * NCH + k] = V{};
    }
    int64_t e = 0;
    for (; e + NS <= ne; e += NS) {
      for (int s_ = 0; s_ < NS; ++s_) {
        const X* x = xp[e + s_];
        const A* w = pw[e + s_];
        for (int k = 0; k < NCH; ++k)
          a[(s_) * NCH + k] = vfma(splat(w[hk[k]]), PARTIAL ? vload<A>(x + ck[k], nk) : vload<A>(x + ck[k]), a[(s_) * NCH + k]);
      }
    }
    for (int s_ = 0; s_ < NS; ++s_)  // (an if, not a break: the loop stays unrolled, a in registers)
      if (e + s_ < ne) {
        const X* x = xp[e + s_];
        const A* w = pw[e + s_];
        for (int k = 0; k < NCH; ++k)
          a[(s_) * NCH + k] = vfma(splat(w[hk[k]]), PARTIAL ? vload<A>(x + ck[k], nk) : vload<A>(x + ck[k]), a[(s_) * NCH + k]);
      }
    for (int k = 0; k < NCH; ++k) {
      if (NS == 4)
        acc[k] = (a[(0) * NCH + k] + a[(1 % NS) * NCH + k]) + (a[(2 % NS) * NCH + k] + a[(3 % NS) * NCH + k]);
      else if (NS == 2)
        acc[k] = a[(0) * NCH + k] + a[(1 % NS) * NCH + k];
      else
        acc[k] = a[(0) * NCH + k];
    }
  }

  // wsum over every chunk of a pixel (groups of 4, 2, 1 full chunks, then the tails one by one),
  // emit(chunk, sum) for each
  template <class X, class Emit>
  static void wsum_all(int64_t ne, const X* const* xp, const A* const* pw, int64_t pstride, const Chunk* ch,
                       int64_t nchunks, const Emit& emit) {
    V acc[4];
    int64_t k = 0;
    for (; k + 4 <= nchunks && ch[k + 3].n == N; k += 4) {
      wsum<4, false>(ne, xp, pw, pstride, ch + k, acc);
      for (int i = 0; i < 4; ++i) emit(ch[k + i], acc[i]);
    }
    for (; k + 2 <= nchunks && ch[k + 1].n == N; k += 2) {
      wsum<2, false>(ne, xp, pw, pstride, ch + k, acc);
      for (int i = 0; i < 2; ++i) emit(ch[k + i], acc[i]);
    }
    for (; k < nchunks; ++k) {
      if (ch[k].n == N)
        wsum<1, false>(ne, xp, pw, pstride, ch + k, acc);
      else
        wsum<1, true>(ne, xp, pw, pstride, ch + k, acc);
      emit(ch[k], acc[0]);
    }
  }

  // The same sums over a grid of entries: for u < nu and v < nv, X = xb[u] + v * xs and
  // w = pb[u] + v * ps (a window's taps, row by row: x and P move by a fixed step from tap to tap;
  // dx's pairs on a column away from clamped borders likewise). The NS accumulators take the
  // entries of each row in turn.
  template <int NCH, bool PARTIAL, class X>
  SGDC_NOINLINE static void wsum2(int64_t nu, const X* const* xb, const A* const* pb, int64_t nv, int64_t xs, int64_t ps,
                    int64_t pstride, const Chunk* ch, V* acc) {
    constexpr int NS = 4 / NCH;
    V a[NS * NCH];  // one dimension: GCC keeps it in registers (not a 2-d array)
    int64_t ck[NCH], hk[NCH];
    const int64_t nk = PARTIAL ? ch[0].n : N;
    for (int k = 0; k < NCH; ++k) {
      ck[k] = ch[k].c, hk[k] = ch[k].h * pstride;
      for (int s_ = 0; s_ < NS; ++s_) a[(s_) * NCH + k] = V{};
    }
    for (int64_t u = 0; u < nu; ++u) {
      const X* x = xb[u];
      const A* w = pb[u];
      int64_t v = 0;
      for (; v + NS <= nv; v += NS, x += NS * xs, w += NS * ps)
        for (int s_ = 0; s_ < NS; ++s_)
          for (int k = 0; k < NCH; ++k) {
            const X* xk = x + s_ * xs + ck[k];
            a[(s_) * NCH + k] = vfma(splat(w[s_ * ps + hk[k]]), PARTIAL ? vload<A>(xk, nk) : vload<A>(xk), a[(s_) * NCH + k]);
          }
      for (int s_ = 0; s_ < NS; ++s_)  // (an if, not a break: the loop stays unrolled, a in registers)
        if (v + s_ < nv)
          for (int k = 0; k < NCH; ++k) {
            const X* xk = x + s_ * xs + ck[k];
            a[(s_) * NCH + k] = vfma(splat(w[s_ * ps + hk[k]]), PARTIAL ? vload<A>(xk, nk) : vload<A>(xk), a[(s_) * NCH + k]);
          }
    }
    for (int k = 0; k < NCH; ++k) {
      if (NS == 4)
        acc[k] = (a[(0) * NCH + k] + a[(1 % NS) * NCH + k]) + (a[(2 % NS) * NCH + k] + a[(3 % NS) * NCH + k]);
      else if (NS == 2)
        acc[k] = a[(0) * NCH + k] + a[(1 % NS) * NCH + k];
      else
        acc[k] = a[(0) * NCH + k];
    }
  }

  template <class X, class Emit>
  static void wsum2_all(int64_t nu, const X* const* xb, const A* const* pb, int64_t nv, int64_t xs, int64_t ps,
                        int64_t pstride, const Chunk* ch, int64_t nchunks, const Emit& emit) {
    V acc[4];
    int64_t k = 0;
    for (; k + 4 <= nchunks && ch[k + 3].n == N; k += 4) {
      wsum2<4, false>(nu, xb, pb, nv, xs, ps, pstride, ch + k, acc);
      for (int i = 0; i < 4; ++i) emit(ch[k + i], acc[i]);
    }
    for (; k + 2 <= nchunks && ch[k + 1].n == N; k += 2) {
      wsum2<2, false>(nu, xb, pb, nv, xs, ps, pstride, ch + k, acc);
      for (int i = 0; i < 2; ++i) emit(ch[k + i], acc[i]);
    }
    for (; k < nchunks; ++k) {
      if (ch[k].n == N)
        wsum2<1, false>(nu, xb, pb, nv, xs, ps, pstride, ch + k, acc);
      else
        wsum2<1, true>(nu, xb, pb, nv, xs, ps, pstride, ch + k, acc);
      emit(ch[k], acc[0]);
    }
  }

  // the taps k < K of pixel p along an axis that read inside it: [k0, k1)
  static void inside(const Axis& ax, int64_t p, int64_t& k0, int64_t& k1) {
    const int64_t s0 = ax.start[p];
    k0 = s0 >= 0 ? 0 : (-s0 + ax.d - 1) / ax.d;
    k1 = s0 + (ax.K - 1) * ax.d < ax.n ? ax.K : (ax.n - 1 - s0) / ax.d + 1;
    if (k1 < k0) k1 = k0;
  }

  // The taps of the pixels of output row p: row pointers (x at (b, S(p) + u*d, 0), or null outside)
  void tap_rows(const T* x, int64_t b, int64_t p, const T** rp) const {
    for (int64_t u = 0; u < K; ++u) {
      const int64_t i = rows.start[p] + u * d;
      rp[u] = (i >= 0 && i < H) ? x + pix(b, i, 0) * C : nullptr;
    }
  }
  // tap pointers of pixel (p, j), xp[t] at channel 0 of the pixel tap t reads (`zero`, C zeros,
  // outside the image); `interior` when the window is centred and inside the image, in which case
  // xp of pixel j is xp of pixel j - 1 moved by one pixel
  bool interior_col(int64_t j) const { return cols.centred[j] && j - r * d >= 0 && j + r * d < W; }
  void tap_pointers(const T* const* rp, int64_t j, const T* zero, bool from_previous, const T** xp) const {
    if (from_previous) {
      for (int64_t t = 0; t < KK; ++t) xp[t] += C;
      return;
    }
    for (int64_t u = 0; u < K; ++u)
      for (int64_t v = 0; v < K; ++v) {
        const int64_t jj = cols.start[j] + v * d;
        xp[u * K + v] = (rp[u] != nullptr && jj >= 0 && jj < W) ? rp[u] + jj * C : zero;
      }
  }

  // Softmax over the KK taps of each head of a pixel, in place in P (heads KKP = KK rounded up to N
  // apart; lanes past KK hold -inf and come out 0). Returns nothing; raw weights are left as they are.
  void load_logits(const T* src, A* P, int64_t KKP) const {
    const int64_t tail = KKP - N;  // the last vector of a head's taps, partial unless N divides KK
    using M = typename Vec<A>::mask;
    M lane;
    for (int l = 0; l < N; ++l) lane[l] = l;
    const M valid = M{} + static_cast<typename Vec<A>::lane_int>(KK - tail);
    const auto pad = lane >= valid;
    const V ninf = splat<A>(-__builtin_inf());
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t t = 0; t < tail; t += N) store(P + g * KKP + t, vload<A>(src + g * KK + t));
      const V v = vload<A>(src + g * KK + tail, KK - tail);
      store(P + g * KKP + tail, softmax ? (pad ? ninf : v) : v);
    }
  }
  // exponentials (max subtracted) of each head's taps in place, and 1 / their sum per head
  void exp_taps(A* P, int64_t KKP, A* inv) const {
    for (int64_t g = 0; g < G; ++g) {
      A* Pg = P + g * KKP;
      V m = load(Pg);
      for (int64_t t = N; t < KKP; t += N) {
        const V v = load(Pg + t);
        m = v > m ? v : m;
      }
      const V mv = splat(hmax<A>(m));
      V sum = {};
      for (int64_t t = 0; t < KKP; t += N) {
        const V e = vexp(load(Pg + t) - mv);
        store(Pg + t, e);
        sum += e;
      }
      inv[g] = A(1) / hsum<A>(sum);
    }
  }

  // Per pixel: the softmax of every head's taps (load_logits, exp_taps), then the window sums of
  // every chunk of channels (wsum2 over the taps inside the image, P broadcast), scaled by
  // 1 / the head's sum and the gate. Raw weights at taps outside a centred window still multiply
  // the zeros there (an infinite weight gives NaN, as in the `torch` backend).
  void forward_cl(const T* x, const T* w, const T* gate, T* out, const Parallel& par) const {
    const int64_t KKP = ceil_div(KK, N) * N;
    cl_items(par, 0, [&](int64_t b, int64_t qa, int64_t qb, const Cols& tc) {
      Buf<A> P(G * KKP), inv(G), zfix(G);
      Buf<const T*> xb(K);
      Buf<const A*> pb(K);
      Buf<Chunk> ch(max_chunks());
      const int64_t nch = chunks(ch.p);
      for (int64_t g = 0; g < G; ++g) inv[g] = 1;
      for (int64_t p = qa; p < qb; ++p) {
        int64_t u0, u1;
        inside(rows, p, u0, u1);
        for (int64_t j = tc.ja; j < tc.jb; ++j) {
          int64_t v0, v1;
          inside(cols, j, v0, v1);
          for (int64_t u = u0; u < u1; ++u) {
            xb[u - u0] = x + pix(b, rows.start[p] + u * d, cols.start[j] + v0 * d) * C;
            pb[u - u0] = P.p + u * K + v0;
          }
          load_logits(w + pix(b, p, j) * G * KK, P.p, KKP);
          if (softmax) exp_taps(P.p, KKP, inv.p);
          const bool cut = u0 > 0 || u1 < K || v0 > 0 || v1 < K;
          if (!softmax && cut)
            for (int64_t g = 0; g < G; ++g) {  // sum of P * 0 over the taps outside: 0, or NaN
              A z = 0;
              for (int64_t u = 0; u < K; ++u)
                for (int64_t v = 0; v < K; ++v)
                  if (u < u0 || u >= u1 || v < v0 || v >= v1) z += P[g * KKP + u * K + v] * A(0);
              zfix[g] = z;
            }
          const int64_t at = pix(b, p, j) * C;
          wsum2_all(u1 - u0, xb.p, pb.p, v1 - v0, d * C, 1, KKP, ch.p, nch, [&](const Chunk& c, V acc) {
            if (!softmax && cut) acc += zfix[c.h];
            V y = acc * inv[c.h];
            if (gate != nullptr) y = y * vsigmoid(vload<A>(gate + at + c.c, c.n));
            vstore<A>(out + at + c.c, y, c.n);
          });
        }
      }
    });
  }

  void backward_cl(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate,
                   const Parallel& par) const {
    const int64_t KKP = ceil_div(KK, N) * N;
    cl_items(par, (K + r) * d * (G * KKP + C), [&](int64_t b, int64_t qa, int64_t qb, const Cols& tc) {
      backward_cl_item(dout, x, w, gate, dx, dw, dgate, b, qa, qb, tc);
    });
  }

  // Transpose-and-add: N vectors v (in the bit-reversed order of their index) to one vector whose
  // lane i is the sum of the lanes of v[i], by halving steps of shuffles and adds (about 3
  // operations per vector instead of a horizontal sum each).
  template <int Bk>
  static V combine(V a, V b) {
    typename Vec<A>::mask lo, hi;
    for (int l = 0; l < N; ++l) {
      const int blk = l / Bk, at = (blk % 2 ? N : 0) + blk / 2 * 2 * Bk + l % Bk;
      lo[l] = at, hi[l] = at + Bk;
    }
    return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
  }
  template <int Bk>
  static void reduce_level(V* v) {
    if constexpr (Bk >= 1) {
      for (int i = 0; i < Bk; ++i) v[i] = combine<Bk>(v[2 * i], v[2 * i + 1]);
      reduce_level<Bk / 2>(v);
    }
  }
  static constexpr int bitrev(int i) {
    int r_ = 0;
    for (int m = 1, k = N / 2; m < N; m *= 2, k /= 2) r_ |= (i & m) ? k : 0;
    return r_;
  }

  // dP[t] = <g_y, x_t> for the KK taps of head h at a pixel (P and the taps xp, g_y at gy), and
  // (WY: with a gate) Y = sum over taps of P[t] * x_t. Per block of N taps, the N products
  // (channels in vectors) go through the transpose-and-add, so dP comes out as vectors of taps;
  // the taps past the last full block are summed one by one.
  template <bool WY>
  void dp_taps(const T* const* xp, const A* Ph, const A* gy, int64_t h, int64_t KKP, A* dP, A* Y) const {
    const int64_t full = KK / N * N;
    for (int64_t t0 = 0; t0 < KKP; t0 += N) store(dP + t0, V{});
    for (int64_t c0 = 0; c0 < Cg; c0 += 2 * N) {  // two chunks of the head at a time
      const int64_t n0 = imin(N, Cg - c0), n1 = imin(N, imax(Cg - c0 - N, 0));
      const V g0 = vload<A>(gy + c0, n0), g1 = n1 > 0 ? vload<A>(gy + c0 + N, n1) : V{};
      V y0[2] = {}, y1[2] = {};
      auto tap = [&](int64_t t, int i) {  // the product vector of tap t; y (accumulator i % 2)
        const T* xt = xp[t] + h * Cg + c0;
        const V x0 = vload<A>(xt, n0);
        V prod = g0 * x0;
        if (WY) y0[i % 2] = vfma(splat(Ph[t]), x0, y0[i % 2]);
        if (n1 > 0) {
          const V x1 = vload<A>(xt + N, n1);
          prod = vfma(g1, x1, prod);
          if (WY) y1[i % 2] = vfma(splat(Ph[t]), x1, y1[i % 2]);
        }
        return prod;
      };
      for (int64_t t0 = 0; t0 < full; t0 += N) {
        V prod[N];
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) prod[i] = tap(t0 + bitrev(i), i);
        reduce_level<N / 2>(prod);
        store(dP + t0, load(dP + t0) + prod[0]);
      }
      for (int64_t t = full; t < KK; ++t) dP[t] += hsum<A>(tap(t, static_cast<int>(t)));
      if (WY) {
        vstore<A>(Y + h * Cg + c0, y0[0] + y0[1], n0);
        if (n1 > 0) vstore<A>(Y + h * Cg + c0 + N, y1[0] + y1[1], n1);
      }
    }
  }

  // The sweep of a band, every head: rings of P ([column][head][KKP]) and g_y ([column][C]) over
  // the output columns the tile's dx reads, and sigmoid(gate) of row p.
  void backward_cl_item(const T* dout, const T* x, const T* w, const T* gate, T* dx, T* dw, T* dgate, int64_t b,
                        int64_t qa, int64_t qb, const Cols& tc) const {
    const int64_t KKP = ceil_div(KK, N) * N, GKP = G * KKP;
    const int64_t BW = tc.hi - tc.lo;
    int64_t slots = 1;
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (!sw.empty()) slots = imax(slots, sw.slots);
    }
    Buf<A> Pring(slots * BW * GKP), Gring(slots * BW * C + N), Srow(BW * C + N), Y(C + N), dP(KKP), inv(G);
    Buf<const T*> xp(KK), rp(K);
    Buf<T> zero(C + N);
    Buf<Chunk> ch(max_chunks());
    const int64_t nch = chunks(ch.p);
    // dx: entries of the pairs of a pixel, and their row and column parts
    const int64_t max_pairs = imax(rows.max_pairs(), 1) * imax(cols.max_pairs(), 1);
    Buf<const A*> gq(max_pairs), pq(max_pairs);
    for (int64_t m = 0; m < d; ++m) {
      const Sweep sw(rows, qa, qb, m);
      if (sw.empty()) continue;
      int64_t next = sw.first;
      for (int64_t p = sw.lo; p <= sw.hi; p += d) {
        const int64_t slot = (p / d) % slots;
        A* Pr = Pring.p + (slot * BW - tc.lo) * GKP;  // indexed by image column
        A* Gr = Gring.p + (slot * BW - tc.lo) * C;
        A* Sr = Srow.p - tc.lo * C;
        const bool owned = p >= qa && p < qb;
        for (int64_t j = tc.lo; j < tc.hi; ++j) {
          A* Pj = Pr + j * GKP;
          load_logits(w + pix(b, p, j) * G * KK, Pj, KKP);
          if (softmax) {
            exp_taps(Pj, KKP, inv.p);
            for (int64_t g = 0; g < G; ++g)
              for (int64_t t = 0; t < KKP; t += N) store(Pj + g * KKP + t, load(Pj + g * KKP + t) * inv[g]);
          }
          for (int64_t c = 0; c < C; c += N) {
            const int64_t at = pix(b, p, j) * C + c, n = imin(N, C - c);
            V gy = vload<A>(dout + at, n);
            if (gate != nullptr) {
              const V sg = vsigmoid(vload<A>(gate + at, n));
              gy = gy * sg;
              if (owned) vstore<A>(Sr + j * C + c, sg, n);
            }
            vstore<A>(Gr + j * C + c, gy, n);
          }
        }
        if (owned) {
          tap_rows(x, b, p, rp.p);
          const bool row_inside = rows.centred[p] && p - r * d >= 0 && p + r * d < H;
          bool prev = false;
          for (int64_t j = tc.ja; j < tc.jb; ++j) {
            const bool inside = row_inside && interior_col(j);
            tap_pointers(rp.p, j, zero.p, inside && prev, xp.p);
            prev = inside;
            const int64_t at = pix(b, p, j);
            for (int64_t g = 0; g < G; ++g) {
              const A* Pg = Pr + j * GKP + g * KKP;
              if (gate != nullptr)
                dp_taps<true>(xp.p, Pg, Gr + j * C + g * Cg, g, KKP, dP.p, Y.p);
              else
                dp_taps<false>(xp.p, Pg, Gr + j * C + g * Cg, g, KKP, dP.p, Y.p);
              V sum = {};
              if (softmax)
                for (int64_t t = 0; t < KKP; t += N) sum = vfma(load(Pg + t), load(dP.p + t), sum);
              const V sv = splat(hsum<A>(sum));
              for (int64_t t = 0; t < KKP; t += N) {
                const V dpv = load(dP.p + t);
                vstore<A>(dw + at * G * KK + g * KK + t, softmax ? load(Pg + t) * (dpv - sv) : dpv, KK - t);
              }
            }
            if (gate != nullptr)
              for (int64_t c = 0; c < C; c += N) {
                const int64_t n = imin(N, C - c);
                const V sg = vload<A>(Sr + j * C + c, n);
                vstore<A>(dgate + at * C + c, vload<A>(dout + at * C + c, n) * vload<A>(Y.p + c, n) * sg * (1 - sg),
                          n);
              }
          }
        }
        // dx rows whose readers have all been swept: per pixel, wsum over its (row pair) x
        // (column pair) entries of P (a broadcast) times g_y (vectors of channels)
        for (; next <= sw.last && rows.last_reader(next) <= p; next += d) {
          const int64_t q = next;
          for (int64_t j = tc.ja; j < tc.jb; ++j) {
            int64_t ne = 0;
            for (int64_t e = rows.pairs_begin(q); e < rows.pairs_end(q); ++e) {
              const int64_t ps = (rows.in_p[e] / d) % slots, u = rows.in_k[e];
              for (int64_t f = cols.pairs_begin(j); f < cols.pairs_end(j); ++f) {
                const int64_t cell = ps * BW + cols.in_p[f] - tc.lo;
                pq[ne] = Pring.p + cell * GKP + u * K + cols.in_k[f];
                gq[ne++] = Gring.p + cell * C;
              }
            }
            const int64_t at = pix(b, q, j) * C;
            wsum_all(ne, gq.p, pq.p, KKP, ch.p, nch, [&](const Chunk& c, V acc) {
              vstore<A>(dx + at + c.c, acc, c.n);
            });
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
