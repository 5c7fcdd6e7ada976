// The functions each instruction-set translation unit defines (window_conv_cpu_<isa>.cpp, in
// namespace sgdc::cpu::<isa>), for the dispatcher in window_conv_cpu.cpp.
#pragma once

#include "window_conv_cpu.h"

#define SGDC_CPU_DECLARE_ISA(ns)                                                                         \
  namespace ns {                                                                                          \
  /* whether the translation unit was compiled with the flags of its instruction set */                  \
  bool compiled();                                                                                        \
  void forward(const Shape& s, DType dtype, Layout layout, const void* x, const void* weights,            \
               const void* gate, void* out, const Parallel& par);                                        \
  void backward(const Shape& s, DType dtype, Layout layout, const void* grad_out, const void* x,          \
                const void* weights, const void* gate, void* dx, void* dweights, void* dgate,             \
                const Parallel& par);                                                                     \
  }

// The functions of an instruction set that this build cannot compile (compiled() is false).
#define SGDC_CPU_DEFINE_STUB(ns)                                                                          \
  namespace sgdc {                                                                                        \
  namespace cpu {                                                                                         \
  namespace ns {                                                                                          \
  bool compiled() { return false; }                                                                       \
  void forward(const Shape&, DType, Layout, const void*, const void*, const void*, void*, const Parallel&) {} \
  void backward(const Shape&, DType, Layout, const void*, const void*, const void*, const void*, void*, void*, \
                void*, const Parallel&) {}                                                                \
  }                                                                                                       \
  }                                                                                                       \
  }

namespace sgdc {
namespace cpu {
SGDC_CPU_DECLARE_ISA(baseline)
SGDC_CPU_DECLARE_ISA(avx2)
SGDC_CPU_DECLARE_ISA(avx512)
}  // namespace cpu
}  // namespace sgdc
