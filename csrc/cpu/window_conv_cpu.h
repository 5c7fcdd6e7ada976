// Fused CPU kernels of window_conv (docs/op.md) on raw pointers: the forward, and the backward
// (dx, dweights and dgate in one pass), in every configuration (zero or clamped border, softmax or
// raw weights, any dilation and odd K), for float32, float64, bfloat16 and float16 storage (the
// 16-bit types accumulate in float32, float64 in float64), contiguous (NCHW) or channels_last.
//
// ATen-free and C++17 with standard headers only, like csrc/cuda/kernels.cuh is for CUDA: the
// extension maps its tensors' storage onto these calls (at::BFloat16 and at::Half have the bit
// layouts of DType::kBFloat16 and DType::kFloat16). The kernels are compiled once per instruction
// set (window_conv_cpu_avx512.cpp, window_conv_cpu_avx2.cpp, window_conv_cpu_baseline.cpp, each
// selecting its own target, see window_conv_cpu_kernels.h) and window_conv_cpu.cpp picks one at
// run time. Every output element is computed by one thread in a fixed order: the results are bitwise
// the same for any thread count and on every run (for a given instruction set).
#pragma once

#include <cstdint>

namespace sgdc {
namespace cpu {

// Storage type of every tensor of a call.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Memory format of every tensor of a call: x, gate, out, grad_out, dx and dgate are (B, C, H, W),
// weights and dweights (B, G*K*K, H, W), all contiguous (NCHW) or all channels_last (NHWC).
enum class Layout : int { kContiguous = 0, kChannelsLast = 1 };

// Instruction set of the kernels: kAuto picks the best one this CPU runs and this build compiled.
enum class Isa : int { kAuto = 0, kBaseline = 1, kAvx2 = 2, kAvx512 = 3 };

// Sizes and configuration of a call: x is (B, C, H, W), G heads (C a multiple of G), window K
// (odd), dilation d, NATTEN's clamped windows (needs H, W >= K*d) or centred windows with zeros
// outside the image, softmax over the K*K taps or the weights as given.
struct Shape {
  int64_t B = 0, C = 0, H = 0, W = 0;
  int64_t G = 1, K = 1, d = 1;
  bool clamp = false;
  bool softmax = true;
};

// A parallel_for, type-erased: run(self, n, body, ctx) calls body(begin, end, ctx) on disjoint
// ranges that cover [0, n), on any threads, and returns when all have returned. run == nullptr
// runs body(0, n, ctx) on the calling thread. `threads` only sizes the work split (more row
// bands for more threads); the results do not depend on it.
struct Parallel {
  using Body = void (*)(int64_t begin, int64_t end, void* ctx);
  void (*run)(void* self, int64_t n, Body body, void* ctx) = nullptr;
  void* self = nullptr;
  int threads = 1;
};

// A Parallel over a callable pf(begin, end, grain, f) that calls f(b, e) on sub-ranges of
// [begin, end), such as torch::stable::parallel_for wrapped in a lambda:
//   auto pf = [](int64_t b, int64_t e, int64_t g, const auto& f) { torch::stable::parallel_for(b, e, g, f); };
//   sgdc::cpu::forward(..., sgdc::cpu::parallel_from(pf, torch::stable::get_num_threads()));
// `pf` must outlive the call that receives the Parallel.
template <class PF>
Parallel parallel_from(const PF& pf, int threads) {
  Parallel p;
  p.self = const_cast<void*>(static_cast<const void*>(&pf));
  p.threads = threads;
  p.run = [](void* self, int64_t n, Parallel::Body body, void* ctx) {
    (*static_cast<const PF*>(self))(int64_t{0}, n, int64_t{1},
                                    [body, ctx](int64_t b, int64_t e) { body(b, e, ctx); });
  };
  return p;
}

// Why `s` cannot run (a sentence), or nullptr when it can.
const char* check_shape(const Shape& s);

// The best instruction set this CPU runs and this build compiled.
Isa best_isa();
// Whether this build compiled the kernels of `isa` (baseline: always).
bool isa_compiled(Isa isa);
// Whether `isa` runs here: compiled, and supported by this CPU.
bool isa_available(Isa isa);
const char* isa_name(Isa isa);

// out = window_conv(x, weights, gate); gate may be null (no gate). Returns the instruction set
// that ran. Throws std::invalid_argument for a shape check_shape refuses, or an `isa` that is not
// available.
Isa forward(const Shape& s, DType dtype, Layout layout, const void* x, const void* weights, const void* gate,
            void* out, const Parallel& par, Isa isa = Isa::kAuto);

// dx, dweights and (with a gate; else dgate is ignored and may be null) dgate of window_conv for
// the incoming gradient grad_out. Needs no workspace: the softmax and the gated gradient are
// recomputed per tile. Returns the instruction set that ran; throws as forward does.
Isa backward(const Shape& s, DType dtype, Layout layout, const void* grad_out, const void* x, const void* weights,
             const void* gate, void* dx, void* dweights, void* dgate, const Parallel& par, Isa isa = Isa::kAuto);

}  // namespace cpu
}  // namespace sgdc
