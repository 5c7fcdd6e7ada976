// The window_conv CPU kernels for AVX-512 (F, BW, VL) with FMA and F16C. The build passes no
// instruction-set flags (setuptools has no per-file flags): with GCC on x86-64 this file selects
// its target itself (#pragma GCC target, after every header it includes, so that no inline
// function of a header is compiled for AVX-512); the -m flags (-mavx512f -mavx512bw -mavx512vl
// -mfma -mf16c) do the same with any compiler. Otherwise it compiles to a stub whose compiled() is
// false, and the dispatcher (window_conv_cpu.cpp) runs the kernels of another instruction set; it
// runs these only on a CPU that has AVX-512.
#include <cstdint>
#include <cstring>
#include <new>

#include "window_conv_cpu_isa.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__)
#define SGDC_CPU_TARGET 1
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>  // before the pragma: the intrinsics carry their own targets
#pragma GCC target("avx512f,avx512bw,avx512vl,fma,f16c,prefer-vector-width=512")
#define SGDC_CPU_TARGET 1
#endif

#ifdef SGDC_CPU_TARGET
#define SGDC_CPU_ISA avx512
#define SGDC_VEC_BYTES 64
#include "window_conv_cpu_kernels.h"
#else
SGDC_CPU_DEFINE_STUB(avx512)
#endif
