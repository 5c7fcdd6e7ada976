// The entry points of window_conv_cpu.h: shape checks, and the run-time choice of the instruction
// set among the translation units this build compiled (window_conv_cpu_<isa>.cpp).
#include "window_conv_cpu.h"

#include <stdexcept>
#include <string>

#include "window_conv_cpu_isa.h"

namespace sgdc {
namespace cpu {

namespace {

bool cpu_runs(Isa isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default:
      return true;
  }
#else
  return isa == Isa::kBaseline || isa == Isa::kAuto;
#endif
}

Isa resolve(Isa isa) {
  if (isa == Isa::kAuto) return best_isa();
  if (!isa_available(isa))
    throw std::invalid_argument(std::string("sgdc cpu kernels: instruction set ") + isa_name(isa) +
                                " is not available (not compiled with its flags, or not supported by this CPU)");
  return isa;
}

void check(const Shape& s) {
  if (const char* why = check_shape(s)) throw std::invalid_argument(std::string("sgdc cpu kernels: ") + why);
}

}  // namespace

const char* check_shape(const Shape& s) {
  if (s.B < 0 || s.C < 0 || s.H < 0 || s.W < 0) return "negative size";
  if (s.G < 1 || s.C % s.G != 0) return "the channels must be a multiple of the heads (at least one head)";
  if (s.K < 1 || s.K % 2 == 0) return "the kernel size must be odd and positive";
  if (s.d < 1) return "the dilation must be positive";
  if (s.clamp && (s.H < s.K * s.d || s.W < s.K * s.d))
    return "clamped windows need H and W of at least kernel_size * dilation";
  return nullptr;
}

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::compiled();
    case Isa::kAvx2: return avx2::compiled();
    case Isa::kBaseline: return true;
    default: return false;
  }
}

bool isa_available(Isa isa) { return isa_compiled(isa) && cpu_runs(isa); }

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (isa_available(isa)) return isa;
  return Isa::kBaseline;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: return "baseline";
    default: return "auto";
  }
}

Isa forward(const Shape& s, DType dtype, Layout layout, const void* x, const void* weights, const void* gate,
            void* out, const Parallel& par, Isa isa) {
  check(s);
  isa = resolve(isa);
  if (s.B == 0 || s.C == 0 || s.H == 0 || s.W == 0) return isa;
  switch (isa) {
    case Isa::kAvx512: avx512::forward(s, dtype, layout, x, weights, gate, out, par); break;
    case Isa::kAvx2: avx2::forward(s, dtype, layout, x, weights, gate, out, par); break;
    default: baseline::forward(s, dtype, layout, x, weights, gate, out, par); break;
  }
  return isa;
}

Isa backward(const Shape& s, DType dtype, Layout layout, const void* grad_out, const void* x, const void* weights,
             const void* gate, void* dx, void* dweights, void* dgate, const Parallel& par, Isa isa) {
  check(s);
  isa = resolve(isa);
  if (s.B == 0 || s.H == 0 || s.W == 0) return isa;
  switch (isa) {
    case Isa::kAvx512:
      avx512::backward(s, dtype, layout, grad_out, x, weights, gate, dx, dweights, dgate, par);
      break;
    case Isa::kAvx2: avx2::backward(s, dtype, layout, grad_out, x, weights, gate, dx, dweights, dgate, par); break;
    default: baseline::backward(s, dtype, layout, grad_out, x, weights, gate, dx, dweights, dgate, par); break;
  }
  return isa;
}

}  // namespace cpu
}  // namespace sgdc
