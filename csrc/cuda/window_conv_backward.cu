// CUDA implementation of sgdc::cuda_backward (schema in csrc/window_conv.cpp): two gather passes,
// the weight gradients (dweights, dgate and the softmax statistics) then dx.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "aten_utils.cuh"

namespace sgdc {
namespace {

using namespace cuda_impl;

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weights,
    const std::optional<at::Tensor>& gate, int64_t kernel_size, int64_t num_heads, int64_t dilation,
    bool clamp, bool softmax, c10::string_view variant_name) {
  const char* op = "sgdc::cuda_backward";
  const bool cl = check_inputs(op, x, weights, gate, kernel_size, num_heads, dilation, clamp);
  check_operand(op, "grad_out", grad_out, x,
                cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(),
              ", got ", grad_out.sizes());
  const Variant variant = parse_variant(std::string(variant_name));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweights = at::empty_like(weights);
  at::Tensor dgate = gate.has_value() ? at::empty_like(*gate) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dweights, dgate};
  const Shape shape = shape_of(x, kernel_size, num_heads, dilation, clamp, softmax);
  // Softmax statistics (max, 1/sum) per (b, head, pixel): 8 bytes per pixel and head.
  at::Tensor stats = at::empty({static_cast<int64_t>(backward_workspace_bytes(shape))},
                               x.options().dtype(at::kByte));
  dispatch(x.scalar_type(), cl, [&](auto tag, auto layout) {
    using T = decltype(tag);
    run_backward<T, decltype(layout)::value>(
        variant, shape, ptr<T>(grad_out), ptr<T>(x), ptr<T>(weights),
        gate.has_value() ? ptr<T>(*gate) : nullptr, mut_ptr<T>(dx), mut_ptr<T>(dweights),
        gate.has_value() ? mut_ptr<T>(dgate) : nullptr,
        reinterpret_cast<float2*>(stats.mutable_data_ptr()), c10::cuda::getCurrentCUDAStream());
  });
  return {dx, dweights, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgdc, CUDA, m) { m.impl("cuda_backward", &cuda_backward); }

}  // namespace sgdc
