// The window_conv CPU kernels for AVX2 with FMA and F16C. The build passes no instruction-set
// flags: with GCC on x86-64 this file selects its target itself (#pragma GCC target, after every
// header it includes); the -m flags (-mavx2 -mfma -mf16c) do the same with any compiler. Otherwise
// it compiles to a stub whose compiled() is false, and the dispatcher (window_conv_cpu.cpp) runs
// the kernels of another instruction set; it runs these only on a CPU that has AVX2.
#include <cstdint>
#include <cstring>
#include <new>

#include "window_conv_cpu_isa.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SGDC_CPU_TARGET 1
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>  // before the pragma: the intrinsics carry their own targets
#pragma GCC target("avx2,fma,f16c")
#define SGDC_CPU_TARGET 1
#endif

#ifdef SGDC_CPU_TARGET
#define SGDC_CPU_ISA avx2
#define SGDC_VEC_BYTES 32
#include "window_conv_cpu_kernels.h"
#else
SGDC_CPU_DEFINE_STUB(avx2)
#endif
