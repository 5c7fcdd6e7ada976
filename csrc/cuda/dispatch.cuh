// The torch side of the sgdc::cuda_* operators, on the LibTorch stable ABI (torch/csrc/stable and
// the header-only torch/headeronly; built with TORCH_TARGET_VERSION = torch 2.10, so one build
// loads into every torch from 2.10 on): dtype/layout dispatch and the current CUDA stream. The
// checks that protect memory are shared with the CPU operators (../op_checks.h); the kernels and
// their launch code are in kernels.cuh.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "kernels.cuh"
#include "op_checks.h"

namespace sgdc {
namespace cuda_impl {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using namespace checks;

// The shared checks for CUDA operands.
inline bool check_inputs(const char* op, const Tensor& x, const Tensor& weights, const std::optional<Tensor>& gate,
                         int64_t K, int64_t G, int64_t d, bool clamp) {
  return checks::check_inputs(op, x, weights, gate, K, G, d, clamp, Device::kCuda);
}

// Calls fn(T{}, std::bool_constant<CL>{}) with T the scalar type (float, c10::Half, c10::BFloat16:
// the header-only types, which the kernels are written for).
template <typename Fn>
void dispatch(ScalarType dtype, bool channels_last, Fn&& fn) {
  auto with_layout = [&](auto tag) {
    if (channels_last)
      fn(tag, std::true_type{});
    else
      fn(tag, std::false_type{});
  };
  switch (dtype) {
    case ScalarType::Float: return with_layout(float{});
    case ScalarType::Half: return with_layout(c10::Half{});
    case ScalarType::BFloat16: return with_layout(c10::BFloat16{});
    default: STD_TORCH_CHECK(false, "sgdc::cuda: unsupported dtype ", dtype);
  }
}

// The current CUDA stream of device `device` (torch's, so the kernels run in order with the
// caller's work): the C shim of the stable ABI.
inline cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "sgdc::cuda: cannot get the current CUDA stream of device ", device);
  return static_cast<cudaStream_t>(stream);
}

inline Shape shape_of(const Tensor& x, int64_t K, int64_t G, int64_t d, bool clamp, bool softmax) {
  return Shape{x.size(0),          x.size(1),          static_cast<int>(x.size(2)),
               static_cast<int>(x.size(3)), static_cast<int>(G), static_cast<int>(K),
               static_cast<int>(d), clamp,              softmax};
}

}  // namespace cuda_impl
}  // namespace sgdc
