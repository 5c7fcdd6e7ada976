// CUDA implementation of sgdc::cuda_backward (schema in csrc/window_conv.cpp), on the LibTorch
// stable ABI: two gather passes, the weight gradients (dweights, dgate and the softmax statistics)
// then dx.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.cuh"

namespace sgdc {
namespace {

using namespace cuda_impl;

std::tuple<Tensor, Tensor, Tensor> cuda_backward(const Tensor& grad_out, const Tensor& x,
                                                 const Tensor& weights, const std::optional<Tensor>& gate,
                                                 int64_t kernel_size, int64_t num_heads, int64_t dilation,
                                                 bool clamp, bool softmax, const std::string& variant_name) {
  const char* op = "sgdc::cuda_backward";
  const bool cl = check_inputs(op, x, weights, gate, kernel_size, num_heads, dilation, clamp);
  check_grad_out(op, grad_out, x, cl, Device::kCuda);
  const Variant variant = parse_variant(variant_name);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor dx = torch::stable::empty_like(x);
  Tensor dweights = torch::stable::empty_like(weights);
  Tensor dgate = gate.has_value() ? torch::stable::empty_like(*gate)
                                  : torch::stable::new_empty(x, std::vector<int64_t>{0});
  if (x.numel() == 0) return {dx, dweights, dgate};
  const Shape shape = shape_of(x, kernel_size, num_heads, dilation, clamp, softmax);
  // Softmax statistics (max, 1/sum) per (b, head, pixel): 8 bytes per pixel and head.
  Tensor stats = torch::stable::new_empty(
      x, std::vector<int64_t>{static_cast<int64_t>(backward_workspace_bytes(shape))}, ScalarType::Byte);
  dispatch(x.scalar_type(), cl, [&](auto tag, auto layout) {
    using T = decltype(tag);
    run_backward<T, decltype(layout)::value>(
        variant, shape, ptr<T>(grad_out), ptr<T>(x), ptr<T>(weights),
        gate.has_value() ? ptr<T>(*gate) : nullptr, mut_ptr<T>(dx), mut_ptr<T>(dweights),
        gate.has_value() ? mut_ptr<T>(dgate) : nullptr,
        reinterpret_cast<float2*>(stats.mutable_data_ptr()), current_stream(x.get_device_index()));
  });
  return {dx, dweights, dgate};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgdc, CUDA, m) { m.impl("cuda_backward", TORCH_BOX(&cuda_backward)); }

}  // namespace sgdc
