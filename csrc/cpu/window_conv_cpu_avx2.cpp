// The window_conv CPU kernels for AVX2 with FMA and F16C. Compile this file with
//   -mavx2 -mfma -mf16c
// Without those flags it compiles to a stub whose compiled() is false, and the dispatcher
// (window_conv_cpu.cpp) never runs another instruction set's code under this name.
#include "window_conv_cpu_isa.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SGDC_CPU_ISA avx2
#include "window_conv_cpu_kernels.h"
#else
namespace sgdc {
namespace cpu {
namespace avx2 {
bool compiled() { return false; }
void forward(const Shape&, DType, Layout, const void*, const void*, const void*, void*, const Parallel&) {}
void backward(const Shape&, DType, Layout, const void*, const void*, const void*, const void*, void*, void*, void*,
              const Parallel&) {}
}  // namespace avx2
}  // namespace cpu
}  // namespace sgdc
#endif
