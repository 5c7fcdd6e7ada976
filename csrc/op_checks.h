// The checks that protect memory in every compiled operator (sgdc::cuda_* in cuda/, sgdc::cpu_* in
// cpu/), on the LibTorch stable ABI: devices, dtypes, dense layouts in one memory format, shapes,
// and a window that fits a clamped image. sgdc_kernels.ops validates every user-facing argument
// first and makes the tensors dense in x's memory format; these checks are what keeps a direct
// call of an operator (torch.ops.sgdc.cpu_forward(...)) from reading or writing out of bounds, with
// a message that names the argument.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <string>

namespace sgdc {
namespace checks {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

template <typename T>
const T* ptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mut_ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// "cuda:1", "cpu": where t lives, for messages.
inline std::string device_str(const Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  if (t.is_cpu()) return "cpu";
  return "a device of type " + std::to_string(static_cast<int>(t.device().type()));
}

// "[2, 8, 5, 6]": the sizes of t, for messages.
inline std::string sizes_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

// Whether the 4-D tensor t is dense in NCHW order (channels_last false) or NHWC order: the rule of
// torch's is_contiguous(memory_format) (dimensions of size 1 take any stride; an empty tensor is
// dense), on sizes and strides, which is all the stable ABI exposes.
inline bool dense(const Tensor& t, bool channels_last) {
  static constexpr int kNCHW[4] = {3, 2, 1, 0};  // innermost first
  static constexpr int kNHWC[4] = {1, 3, 2, 0};
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  for (const int d : channels_last ? kNHWC : kNCHW) {
    const int64_t size = t.size(d);
    if (size == 1) continue;
    if (t.stride(d) != expected) return false;
    expected *= size;
  }
  return true;
}

// The device an operator's kernels run on: CUDA (any GPU, every operand on x's) or the CPU.
enum class Device { kCuda, kCpu };

inline bool on(const Tensor& t, Device device) { return device == Device::kCuda ? t.is_cuda() : t.is_cpu(); }
inline const char* device_name(Device device) { return device == Device::kCuda ? "a CUDA" : "a CPU"; }

inline void check_operand(const char* op, const char* name, const Tensor& t, const Tensor& x, bool channels_last,
                          Device device) {
  STD_TORCH_CHECK(on(t, device), op, ": ", name, " must be ", device_name(device), " tensor, got device ",
                  device_str(t));
  STD_TORCH_CHECK(device != Device::kCuda || t.get_device_index() == x.get_device_index(), op, ": ", name,
                  " is on ", device_str(t), " but x is on ", device_str(x));
  STD_TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                  " but x has ", x.scalar_type());
  STD_TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, got ", t.dim(), "-D");
  STD_TORCH_CHECK(dense(t, channels_last), op, ": ", name, " must be dense in x's memory format (",
                  channels_last ? "ChannelsLast" : "Contiguous",
                  "); call sgdc_kernels.window_conv, which arranges this");
}

// Checks what the kernels' indexing relies on (devices, dtypes, dense layouts, shapes, a window
// that fits a clamped image) and returns whether the operands are channels_last. float64 runs on
// the CPU only.
inline bool check_inputs(const char* op, const Tensor& x, const Tensor& weights, const std::optional<Tensor>& gate,
                         int64_t K, int64_t G, int64_t d, bool clamp, Device device) {
  STD_TORCH_CHECK(on(x, device), op, ": x must be ", device_name(device), " tensor, got device ", device_str(x));
  STD_TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (B, C, H, W) tensor, got ", x.dim(), "-D");
  const ScalarType dt = x.scalar_type();
  const bool cpu = device == Device::kCpu;
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16 ||
                      (cpu && dt == ScalarType::Double),
                  op, ": x must be float32, float16", cpu ? ", bfloat16 or float64" : " or bfloat16", ", got ", dt);
  STD_TORCH_CHECK(K >= 1 && K % 2 == 1, op, ": kernel_size must be a positive odd int, got ", K);
  STD_TORCH_CHECK(G >= 1, op, ": num_heads must be positive, got ", G);
  STD_TORCH_CHECK(d >= 1 && d < INT_MAX, op, ": dilation must be a positive int, got ", d);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  STD_TORCH_CHECK(!clamp || (H >= K * d && W >= K * d), op,
                  ": clamped windows need H and W of at least kernel_size * dilation = ", K * d, ", got H=", H,
                  ", W=", W);
  STD_TORCH_CHECK(C % G == 0 && C >= G, op, ": x's channel count ", C, " must be a positive multiple of num_heads=",
                  G);
  STD_TORCH_CHECK(H < INT_MAX && W < INT_MAX, op, ": H and W must be below 2^31");
  const bool cl = !dense(x, false) && dense(x, true);
  STD_TORCH_CHECK(dense(x, cl), op,
                  ": x must be contiguous or channels_last; call sgdc_kernels.window_conv, which arranges this");
  check_operand(op, "weights", weights, x, cl, device);
  STD_TORCH_CHECK(weights.size(0) == B && weights.size(1) == G * K * K && weights.size(2) == H &&
                      weights.size(3) == W,
                  op, ": weights must have shape (B, num_heads*kernel_size^2, H, W) = [", B, ", ", G * K * K, ", ",
                  H, ", ", W, "], got ", sizes_str(weights));
  if (gate.has_value()) {
    check_operand(op, "gate", *gate, x, cl, device);
    STD_TORCH_CHECK(same_sizes(*gate, x), op, ": gate must have x's shape ", sizes_str(x), ", got ",
                    sizes_str(*gate));
  }
  return cl;
}

// grad_out of a backward operator: on x's device, x's dtype, shape and memory format.
inline void check_grad_out(const char* op, const Tensor& grad_out, const Tensor& x, bool channels_last,
                           Device device) {
  check_operand(op, "grad_out", grad_out, x, channels_last, device);
  STD_TORCH_CHECK(same_sizes(grad_out, x), op, ": grad_out must have x's shape ", sizes_str(x), ", got ",
                  sizes_str(grad_out));
}

}  // namespace checks
}  // namespace sgdc
