// CUDA implementation of sgdc::cuda_forward (schema in csrc/window_conv.cpp), on the LibTorch
// stable ABI.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>
#include <string>

#include "dispatch.cuh"

namespace sgdc {
namespace {

using namespace cuda_impl;

Tensor cuda_forward(const Tensor& x, const Tensor& weights, const std::optional<Tensor>& gate,
                    int64_t kernel_size, int64_t num_heads, int64_t dilation, bool clamp, bool softmax,
                    const std::string& variant_name) {
  const bool cl =
      check_inputs("sgdc::cuda_forward", x, weights, gate, kernel_size, num_heads, dilation, clamp);
  const Variant variant = parse_variant(variant_name);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor out = torch::stable::empty_like(x);
  if (out.numel() == 0) return out;
  dispatch(x.scalar_type(), cl, [&](auto tag, auto layout) {
    using T = decltype(tag);
    run_forward<T, decltype(layout)::value>(variant,
                                            shape_of(x, kernel_size, num_heads, dilation, clamp, softmax),
                                            ptr<T>(x),
                                            ptr<T>(weights), gate.has_value() ? ptr<T>(*gate) : nullptr,
                                            mut_ptr<T>(out), current_stream(x.get_device_index()));
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgdc, CUDA, m) { m.impl("cuda_forward", TORCH_BOX(&cuda_forward)); }

}  // namespace sgdc

// Build information, read by csrc/window_conv.cpp. nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900)
// in every compilation pass; it lists the architectures this file was compiled for.
namespace sgdc {
namespace cuda_impl {
#define SGDC_ARCH_STR2(...) #__VA_ARGS__
#define SGDC_ARCH_STR(...) SGDC_ARCH_STR2(__VA_ARGS__)
const char* compiled_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return SGDC_ARCH_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}
int compiled_cuda_version() { return CUDART_VERSION; }
const char* compiled_variant_list() { return variant_list(); }
}  // namespace cuda_impl
}  // namespace sgdc
