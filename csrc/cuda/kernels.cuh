// Host entry points of the sgdc_conv kernels on raw pointers: the forward, and the backward's two
// passes (weights, then input), for each kernel variant. The ATen operators (sgdc_forward.cu,
// sgdc_backward.cu) validate tensors and call these; tests/cuda_emu/ calls the very same
// functions on the host.
#pragma once

#include <cstring>
#include <string>

#include "common.cuh"
#include "window_v1.cuh"
#include "window_v2.cuh"
#include "window_tc.cuh"

namespace sgdc {
namespace cuda_impl {

// Kernel variants, selected per call by the environment variable SGDC_CUDA_VARIANT; the first
// is the default. v1 stays until a GPU has measured both (bench/NOTES_cuda.md).
// v3 is v2 with the forward and dx of 16-bit inputs on the tensor cores; until a GPU has checked it,
// v2 stays the default.
enum class Variant { kV2, kV3, kV1 };
constexpr const char* kVariantNames[] = {"v2", "v3", "v1"};
constexpr int kNumVariants = 3;
constexpr const char* kVariantEnv = "SGDC_CUDA_VARIANT";

// The variant names, comma-separated, the default first.
inline const char* variant_list() {
  static const std::string names = [] {
    std::string s;
    for (int v = 0; v < kNumVariants; ++v) s += (v ? "," : "") + std::string(kVariantNames[v]);
    return s;
  }();
  return names.c_str();
}

// The variant that `name` (the environment variable's value; null or empty: the default) names.
inline Variant parse_variant(const char* name) {
  if (name == nullptr || name[0] == '\0') return static_cast<Variant>(0);
  for (int v = 0; v < kNumVariants; ++v)
    if (std::strcmp(name, kVariantNames[v]) == 0) return static_cast<Variant>(v);
  TORCH_CHECK(false, "sgdc::cuda: ", kVariantEnv, "=", name, " is not a kernel variant; expected one of ",
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

// v1 and v3 compute sgdc_conv's configuration only; v2 runs every configuration (dilated and
// clamped windows in group space, raw weights), so the others hand those to it.
template <Mode M, typename T, bool CL>
void launch(Variant variant, const Params<T>& p, cudaStream_t stream) {
  if (p.d != 1 || p.clamp || !p.softmax) variant = Variant::kV2;
  switch (variant) {
    case Variant::kV1: return v1::launch_v1<M, T, CL>(p, stream);
    case Variant::kV3: return v3::launch_v3<M, T, CL>(p, stream);
    default: return v2::launch_v2<M, T, CL>(p, stream);
  }
}

// out = sgdc_conv(x, kernel, gate); gate may be null.
template <typename T, bool CL>
void run_forward(Variant variant, const Shape& s, const T* x, const T* kernel, const T* gate, T* out,
                 cudaStream_t stream) {
  Params<T> p = make_params<T>(s);
  p.src = x;
  p.logits = kernel;
  p.gate = gate;
  p.out = out;
  launch<Mode::kForward, T, CL>(variant, p, stream);
}

// Bytes of the backward's workspace: the softmax statistics (max, 1/sum), 8 per pixel and head.
inline size_t backward_workspace_bytes(const Shape& s) {
  return sizeof(float2) * static_cast<size_t>(s.B) * s.G * s.H * s.W;
}

// dx, dkernel and dgate (null without gate) of sgdc_conv; stats is the workspace.
template <typename T, bool CL>
void run_backward(Variant variant, const Shape& s, const T* grad_out, const T* x, const T* kernel,
                  const T* gate, T* dx, T* dkernel, T* dgate, float2* stats, cudaStream_t stream) {
  Params<T> p = make_params<T>(s);
  p.logits = kernel;
  p.gate = gate;
  p.stats = stats;

  Params<T> pw = p;  // dkernel, dgate, stats
  pw.src = x;
  pw.grad_out = grad_out;
  pw.out = gate != nullptr ? dgate : nullptr;
  pw.dkernel = dkernel;
  launch<Mode::kGradWeights, T, CL>(variant, pw, stream);

  Params<T> pi = p;  // dx
  pi.src = grad_out;
  pi.out = dx;
  launch<Mode::kGradInput, T, CL>(variant, pi, stream);
}

}  // namespace cuda_impl
}  // namespace sgdc
