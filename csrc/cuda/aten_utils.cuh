// ATen side of the sgdc::cuda_* operators: the checks that protect memory (sgdc_kernels.ops
// validates every user-facing argument first), dtype/layout dispatch. The kernels and their
// launch code are in kernels.cuh.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "kernels.cuh"

namespace sgdc {
namespace cuda_impl {

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// Calls fn(T{}, std::bool_constant<CL>{}) with T the scalar type (float, c10::Half, c10::BFloat16).
template <typename Fn>
void dispatch(at::ScalarType dtype, bool channels_last, Fn&& fn) {
  auto with_layout = [&](auto tag) {
    if (channels_last)
      fn(tag, std::true_type{});
    else
      fn(tag, std::false_type{});
  };
  switch (dtype) {
    case at::kFloat: return with_layout(float{});
    case at::kHalf: return with_layout(c10::Half{});
    case at::kBFloat16: return with_layout(c10::BFloat16{});
    default: TORCH_CHECK(false, "sgdc::cuda: unsupported dtype ", dtype);
  }
}

inline void check_operand(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& x, at::MemoryFormat fmt) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(fmt), op, ": ", name, " must be dense in x's memory format (",
              fmt, "); call sgdc_kernels.window_conv, which arranges this");
}

// Checks what the kernels' indexing relies on (devices, dtypes, dense layouts, shapes, a window
// that fits a clamped image) and returns whether the operands are channels_last.
inline bool check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weights,
                         const std::optional<at::Tensor>& gate, int64_t K, int64_t G, int64_t d,
                         bool clamp) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (B, C, H, W) tensor, got ", x.dim(), "-D");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(K >= 1 && K % 2 == 1, op, ": kernel_size must be a positive odd int, got ", K);
  TORCH_CHECK(G >= 1, op, ": num_heads must be positive, got ", G);
  TORCH_CHECK(d >= 1 && d < INT_MAX, op, ": dilation must be a positive int, got ", d);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(!clamp || (H >= K * d && W >= K * d), op,
              ": clamped windows need H and W of at least kernel_size * dilation = ", K * d,
              ", got H=", H, ", W=", W);
  TORCH_CHECK(C % G == 0 && C >= G, op, ": x's channel count ", C,
              " must be a positive multiple of num_heads=", G);
  TORCH_CHECK(H < INT_MAX && W < INT_MAX, op, ": H and W must be below 2^31");
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.is_contiguous(fmt), op,
              ": x must be contiguous or channels_last; call sgdc_kernels.window_conv, which arranges this");
  check_operand(op, "weights", weights, x, fmt);
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({B, G * K * K, H, W}), op,
              ": weights must have shape (B, num_heads*kernel_size^2, H, W) = (", B, ", ", G * K * K,
              ", ", H, ", ", W, "), got ", weights.sizes());
  if (gate.has_value()) {
    check_operand(op, "gate", *gate, x, fmt);
    TORCH_CHECK(gate->sizes() == x.sizes(), op, ": gate must have x's shape ", x.sizes(), ", got ",
                gate->sizes());
  }
  return cl;
}

inline Shape shape_of(const at::Tensor& x, int64_t K, int64_t G, int64_t d, bool clamp, bool softmax) {
  return Shape{x.size(0),          x.size(1),          static_cast<int>(x.size(2)),
               static_cast<int>(x.size(3)), static_cast<int>(G), static_cast<int>(K),
               static_cast<int>(d), clamp,              softmax};
}

}  // namespace cuda_impl
}  // namespace sgdc
