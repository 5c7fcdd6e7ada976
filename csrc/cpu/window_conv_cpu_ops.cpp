// CPU implementation of sgdc::cpu_forward and sgdc::cpu_backward (schemas in csrc/window_conv.cpp),
// on the LibTorch stable ABI: the checks that protect memory (shared with the CUDA operators,
// ../op_checks.h), the instruction set named by `variant`, allocation, and torch's thread pool
// (torch::stable::parallel_for, as many threads as torch.get_num_threads()) handed to the kernels
// of window_conv_cpu.h, which are ATen-free.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <exception>
#include <stdexcept>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/window_conv_cpu.h"
#include "op_checks.h"

namespace sgdc {
namespace {

using namespace checks;

cpu::DType dtype_of(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return cpu::DType::kFloat32;
    case ScalarType::Double: return cpu::DType::kFloat64;
    case ScalarType::BFloat16: return cpu::DType::kBFloat16;
    case ScalarType::Half: return cpu::DType::kFloat16;
    default: STD_TORCH_CHECK(false, "sgdc::cpu: unsupported dtype ", t);
  }
  return cpu::DType::kFloat32;
}

// The instruction set a call names: "" for the best this CPU runs, else one of the variants that
// sgdc_kernels._C.CPU_VARIANTS lists.
cpu::Isa isa_of(const char* op, const std::string& variant) {
  if (variant.empty()) return cpu::Isa::kAuto;
  for (const cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kBaseline}) {
    if (variant != cpu::isa_name(isa)) continue;
    STD_TORCH_CHECK(cpu::isa_available(isa), op, ": variant '", variant,
                    "' does not run here (this build did not compile it, or this CPU lacks the instruction set); "
                    "best here: '",
                    cpu::isa_name(cpu::best_isa()), "'");
    return isa;
  }
  STD_TORCH_CHECK(false, op, ": unknown variant '", variant, "'; expected '', 'avx512', 'avx2' or 'baseline'");
  return cpu::Isa::kAuto;
}

cpu::Shape shape_of(const Tensor& x, int64_t K, int64_t G, int64_t d, bool clamp, bool softmax) {
  cpu::Shape s;
  s.B = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.G = G, s.K = K, s.d = d, s.clamp = clamp, s.softmax = softmax;
  return s;
}

// Runs fn(parallel) with a cpu::Parallel over torch's intra-op thread pool.
template <class Fn>
void with_torch_threads(const char* op, Fn&& fn) {
  const auto pf = [](int64_t begin, int64_t end, int64_t grain, const auto& f) {
    torch::stable::parallel_for(begin, end, grain, f);
  };
  try {
    fn(cpu::parallel_from(pf, static_cast<int>(torch::stable::get_num_threads())));
  } catch (const std::invalid_argument& e) {  // a shape the kernels refuse (the checks come first)
    STD_TORCH_CHECK(false, op, ": ", e.what());
  }
}

const void* data_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

Tensor cpu_forward(const Tensor& x, const Tensor& weights, const std::optional<Tensor>& gate, int64_t kernel_size,
                   int64_t num_heads, int64_t dilation, bool clamp, bool softmax, const std::string& variant) {
  const char* op = "sgdc::cpu_forward";
  const bool cl = check_inputs(op, x, weights, gate, kernel_size, num_heads, dilation, clamp, Device::kCpu);
  const cpu::Isa isa = isa_of(op, variant);
  Tensor out = torch::stable::empty_like(x);
  if (out.numel() == 0) return out;
  with_torch_threads(op, [&](const cpu::Parallel& par) {
    cpu::forward(shape_of(x, kernel_size, num_heads, dilation, clamp, softmax), dtype_of(x.scalar_type()),
                 cl ? cpu::Layout::kChannelsLast : cpu::Layout::kContiguous, x.const_data_ptr(),
                 weights.const_data_ptr(), data_or_null(gate), out.mutable_data_ptr(), par, isa);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> cpu_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weights,
                                                const std::optional<Tensor>& gate, int64_t kernel_size,
                                                int64_t num_heads, int64_t dilation, bool clamp, bool softmax,
                                                const std::string& variant) {
  const char* op = "sgdc::cpu_backward";
  const bool cl = check_inputs(op, x, weights, gate, kernel_size, num_heads, dilation, clamp, Device::kCpu);
  check_grad_out(op, grad_out, x, cl, Device::kCpu);
  const cpu::Isa isa = isa_of(op, variant);
  Tensor dx = torch::stable::empty_like(x);
  Tensor dweights = torch::stable::empty_like(weights);
  Tensor dgate =
      gate.has_value() ? torch::stable::empty_like(*gate) : torch::stable::new_empty(x, std::vector<int64_t>{0});
  if (x.numel() == 0) return {dx, dweights, dgate};
  with_torch_threads(op, [&](const cpu::Parallel& par) {
    cpu::backward(shape_of(x, kernel_size, num_heads, dilation, clamp, softmax), dtype_of(x.scalar_type()),
                  cl ? cpu::Layout::kChannelsLast : cpu::Layout::kContiguous, grad_out.const_data_ptr(),
                  x.const_data_ptr(), weights.const_data_ptr(), data_or_null(gate), dx.mutable_data_ptr(),
                  dweights.mutable_data_ptr(), gate.has_value() ? dgate.mutable_data_ptr() : nullptr, par, isa);
  });
  return {dx, dweights, dgate};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgdc, CPU, m) {
  m.impl("cpu_forward", TORCH_BOX(&cpu_forward));
  m.impl("cpu_backward", TORCH_BOX(&cpu_backward));
}

}  // namespace sgdc
