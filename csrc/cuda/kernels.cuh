// Host entry points of the window_conv kernels on raw pointers: the forward, and the backward's two
// passes (weights, then input), for each kernel variant. The operators (window_conv_forward.cu,
// window_conv_backward.cu) check the tensors and call these; tests/cuda_emu/ calls the very same
// functions on the host.
#pragma once

#include <string>

#include "common.cuh"
#include "window_v1.cuh"
#include "window_v2.cuh"
#include "window_v3.cuh"

namespace sgdc {
namespace cuda_impl {

// Kernel variants, named by the operators' `variant` argument (backend "cuda@v1"); the first is
// the default. v2 runs every configuration; v1 (one pixel per thread) and v3 (v2 with the forward
// and dx of 16-bit inputs on the tensor cores) run sgdc_conv's configuration only.
enum class Variant { kV2, kV3, kV1 };
constexpr const char* kVariantNames[] = {"v2", "v3", "v1"};
constexpr int kNumVariants = 3;

// The variant names, comma-separated, the default first.
inline const char* variant_list() {
  static const std::string names = [] {
    std::string s;
    for (int v = 0; v < kNumVariants; ++v) s += (v ? "," : "") + std::string(kVariantNames[v]);
    return s;
  }();
  return names.c_str();
}

// The variant that `name` names; empty: the default.
inline Variant parse_variant(const std::string& name) {
  if (name.empty()) return static_cast<Variant>(0);
  for (int v = 0; v < kNumVariants; ++v)
    if (name == kVariantNames[v]) return static_cast<Variant>(v);
  STD_TORCH_CHECK(false, "variant: '", name, "' is not a kernel variant of the cuda backend; expected one of ",
                  variant_list());
}

// Sizes and configuration of one call: x is (B, C, H, W), G heads, window K, dilation d, clamped
// windows or centred ones, softmax over the taps or weights as given (sgdc_conv: 1, false, true).
struct Shape {
  int64_t B, C;
  int H, W, G, K;
  int d = 1;
  bool clamp = false;
  bool softmax = true;
};

template <typename T>
Params<T> make_params(const Shape& s) {
  Params<T> p{};
  p.B = s.B;
  p.C = s.C;
  p.H = s.H;
  p.W = s.W;
  p.G = s.G;
  p.K = s.K;
  p.Cg = static_cast<int>(s.C / s.G);
  p.d = s.d;
  p.clamp = s.clamp;
  p.softmax = s.softmax;
  return p;
}

// Whether `variant` computes the configuration of `s`: v2 runs every one (dilated and clamped
// windows in group space, raw weights), v1 and v3 sgdc_conv's only.
inline bool variant_runs(Variant variant, const Shape& s) {
  return variant == Variant::kV2 || (s.d == 1 && !s.clamp && s.softmax);
}

inline void check_variant(Variant variant, const Shape& s) {
  STD_TORCH_CHECK(variant_runs(variant, s), "variant: ", kVariantNames[static_cast<int>(variant)],
                  " runs only sgdc_conv's configuration (dilation 1, zero border, softmax); got dilation ", s.d,
                  s.clamp ? ", clamped windows" : "", s.softmax ? "" : ", raw weights", "; use v2");
}

template <Mode M, typename T, bool CL>
void launch(Variant variant, const Params<T>& p, cudaStream_t stream) {
  switch (variant) {
    case Variant::kV1: return v1::launch_v1<M, T, CL>(p, stream);
    case Variant::kV3: return v3::launch_v3<M, T, CL>(p, stream);
    default: return v2::launch_v2<M, T, CL>(p, stream);
  }
}

// out = window_conv(x, weights, gate); gate may be null.
template <typename T, bool CL>
void run_forward(Variant variant, const Shape& s, const T* x, const T* weights, const T* gate, T* out,
                 cudaStream_t stream) {
  check_variant(variant, s);
  Params<T> p = make_params<T>(s);
  p.src = x;
  p.weights = weights;
  p.gate = gate;
  p.out = out;
  launch<Mode::kForward, T, CL>(variant, p, stream);
}

// Bytes of the backward's workspace: the softmax statistics (max, 1/sum), 8 per pixel and head.
inline size_t backward_workspace_bytes(const Shape& s) {
  return sizeof(float2) * static_cast<size_t>(s.B) * s.G * s.H * s.W;
}

// dx, dweights and dgate (null without gate) of window_conv; stats is the workspace.
template <typename T, bool CL>
void run_backward(Variant variant, const Shape& s, const T* grad_out, const T* x, const T* weights,
                  const T* gate, T* dx, T* dweights, T* dgate, float2* stats, cudaStream_t stream) {
  check_variant(variant, s);
  Params<T> p = make_params<T>(s);
  p.weights = weights;
  p.gate = gate;
  p.stats = stats;

  Params<T> pw = p;  // dweights, dgate, stats
  pw.src = x;
  pw.grad_out = grad_out;
  pw.out = gate != nullptr ? dgate : nullptr;
  pw.dweights = dweights;
  launch<Mode::kGradWeights, T, CL>(variant, pw, stream);

  Params<T> pi = p;  // dx
  pi.src = grad_out;
  pi.out = dx;
  launch<Mode::kGradInput, T, CL>(variant, pi, stream);
}

}  // namespace cuda_impl
}  // namespace sgdc
