// The window_conv CPU kernels for AVX-512 (F, BW, VL) with FMA and F16C. Compile this file with
//   -mavx512f -mavx512bw -mavx512vl -mfma -mf16c -mprefer-vector-width=512
// Without those flags it compiles to a stub whose compiled() is false, and the dispatcher
// (window_conv_cpu.cpp) never runs another instruction set's code under this name.
#include "window_conv_cpu_isa.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__)
#define SGDC_CPU_ISA avx512
#include "window_conv_cpu_kernels.h"
#else
namespace sgdc {
namespace cpu {
namespace avx512 {
bool compiled() { return false; }
void forward(const Shape&, DType, Layout, const void*, const void*, const void*, void*, const Parallel&) {}
void backward(const Shape&, DType, Layout, const void*, const void*, const void*, const void*, void*, void*, void*,
              const Parallel&) {}
}  // namespace avx512
}  // namespace cpu
}  // namespace sgdc
#endif
