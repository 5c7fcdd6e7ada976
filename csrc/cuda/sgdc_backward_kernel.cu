// CUDA implementation of sgdc::cuda_backward (schema in csrc/sgdc_conv.cpp): two gather passes,
// kGradWeights (dkernel, dgate and the softmax statistics) then kGradInput (dx).
#include <torch/library.h>

#include <tuple>

#include "sgdc_conv_kernel.cuh"

namespace sgdc {
namespace {

using namespace cuda_impl;

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& kernel,
    const std::optional<at::Tensor>& gate, int64_t kernel_size, int64_t num_heads) {
  const char* op = "sgdc::cuda_backward";
  const bool cl = check_inputs(op, x, kernel, gate, kernel_size, num_heads);
  check_operand(op, "grad_out", grad_out, x,
                cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(),
              ", got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dkernel = at::empty_like(kernel);
  at::Tensor dgate = gate.has_value() ? at::empty_like(*gate) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dkernel, dgate};
  // Softmax statistics (max, 1/sum) per (b, head, pixel): 8 bytes per pixel and head.
  at::Tensor stats =
      at::empty({x.size(0), num_heads, x.size(2), x.size(3), 2}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), cl, [&](auto tag, auto layout) {
    using T = decltype(tag);
    constexpr bool CL = decltype(layout)::value;
    Params<T> p = make_params<T>(x, kernel_size, num_heads);
    p.logits = ptr<T>(kernel);
    p.gate = gate.has_value() ? ptr<T>(*gate) : nullptr;
    p.stats = reinterpret_cast<float2*>(stats.mutable_data_ptr());

    Params<T> pw = p;
    pw.src = ptr<T>(x);
    pw.grad_out = ptr<T>(grad_out);
    pw.out = gate.has_value() ? mut_ptr<T>(dgate) : nullptr;
    pw.dkernel = mut_ptr<T>(dkernel);
    launch<Mode::kGradWeights, T, CL>(pw);

    Params<T> pi = p;
    pi.src = ptr<T>(grad_out);
    pi.out = mut_ptr<T>(dx);
    launch<Mode::kGradInput, T, CL>(pi);
  });
  return {dx, dkernel, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgdc, CUDA, m) { m.impl("cuda_backward", &cuda_backward); }

}  // namespace sgdc
