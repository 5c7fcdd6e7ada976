// Schemas of the sgdc::cuda_* operators (implementations in cuda/) and of the sgdc::cpu_* operators
// (cpu/window_conv_cpu_ops.cpp), the Python module stub that makes `import sgdc_kernels._C` load
// them, and the build information of the extension.
//
// Everything here, in cuda/ and in cpu/ is written on the LibTorch stable ABI (torch/csrc/stable, the C shim
// and the header-only torch/headeronly), compiled with TORCH_TARGET_VERSION = torch 2.10, so one
// build loads into every torch from 2.10 on; the module stub uses only Python's limited API
// (Py_LIMITED_API = 3.10), so one build serves every CPython from 3.10 on (an abi3 wheel).
#include <torch/csrc/stable/library.h>

#include "cpu/window_conv_cpu.h"

#ifdef SGDC_CUDA_KERNELS
namespace sgdc {
namespace cuda_impl {
const char* compiled_arch_list();  // defined in cuda/window_conv_forward.cu
int compiled_cuda_version();
const char* compiled_variant_list();  // kernel variants, the default first
}  // namespace cuda_impl
}  // namespace sgdc
#endif

// FRAGMENT: the Python backends define sgdc::torch_* and sgdc::triton_* in the same namespace.
// Fake kernels and autograd are registered from Python when `import sgdc_kernels._C` runs
// sgdc_kernels._extension._register(); the fakes themselves live in sgdc_kernels.custom_ops. (The
// stable ABI of torch 2.10 cannot name that module to the dispatcher, as set_python_module does
// from 2.13 on; nothing needs it, since the import that registers the operators registers the
// fakes too.)
STABLE_TORCH_LIBRARY_FRAGMENT(sgdc, m) {
  // The schemas of sgdc_kernels.custom_ops (FORWARD_SCHEMA, BACKWARD_SCHEMA).
  m.def(
      "cuda_forward(Tensor x, Tensor weights, Tensor? gate, int kernel_size, int num_heads, "
      "int dilation, bool clamp, bool softmax, str variant) -> Tensor");
  m.def(
      "cuda_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor? gate, int kernel_size, "
      "int num_heads, int dilation, bool clamp, bool softmax, str variant) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpu_forward(Tensor x, Tensor weights, Tensor? gate, int kernel_size, int num_heads, "
      "int dilation, bool clamp, bool softmax, str variant) -> Tensor");
  m.def(
      "cpu_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor? gate, int kernel_size, "
      "int num_heads, int dilation, bool clamp, bool softmax, str variant) -> (Tensor, Tensor, Tensor)");
}

#ifdef SGDC_PYTHON_MODULE
#include <Python.h>

#include <cstdint>
#include <string>

#define SGDC_STR2(x) #x
#define SGDC_STR(x) SGDC_STR2(x)

namespace {

// "avx512,avx2,baseline": the instruction sets of the CPU kernels, the best first; only those that
// this CPU runs (available) or all that this build compiled.
std::string cpu_isas(bool available) {
  std::string list;
  for (const auto isa : {sgdc::cpu::Isa::kAvx512, sgdc::cpu::Isa::kAvx2, sgdc::cpu::Isa::kBaseline}) {
    if (available ? sgdc::cpu::isa_available(isa) : sgdc::cpu::isa_compiled(isa)) list += (list.empty() ? "" : ",") + std::string(sgdc::cpu::isa_name(isa));
  }
  return list;
}

// "2.10": the torch whose stable ABI this build targets (TORCH_TARGET_VERSION: major in the top
// byte, minor in the next).
std::string target_torch() {
#ifdef TORCH_TARGET_VERSION
  const uint64_t v = TORCH_TARGET_VERSION;
  return std::to_string((v >> 56) & 0xff) + "." + std::to_string((v >> 48) & 0xff);
#else
  return "";
#endif
}

}  // namespace

// A Python module with no functions: importing it loads this library, whose static initializers
// register the operators; it then hands them to sgdc_kernels._extension for fakes and autograd. Only
// the limited API: module creation, string constants, an import and a call.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "window_conv CPU and CUDA kernels", -1,
                                   nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
#ifdef SGDC_CUDA_KERNELS
  const int cuda = sgdc::cuda_impl::compiled_cuda_version();
  const std::string cuda_str = std::to_string(cuda / 1000) + "." + std::to_string(cuda % 1000 / 10);
  const char* archs = sgdc::cuda_impl::compiled_arch_list();
  const char* variants = sgdc::cuda_impl::compiled_variant_list();
#else  // built without CUDA kernels: the schemas only
  const std::string cuda_str;
  const char* archs = "";
  const char* variants = "";
#endif
#ifdef SGDC_TORCH_VERSION
  const char* torch_version = SGDC_STR(SGDC_TORCH_VERSION);
#else
  const char* torch_version = "";
#endif
  const std::string target = target_torch();
  const std::string cpu_variants = cpu_isas(true), cpu_compiled = cpu_isas(false);
  if (PyModule_AddStringConstant(module, "CPU_VARIANTS", cpu_variants.c_str()) ||
      PyModule_AddStringConstant(module, "CPU_COMPILED", cpu_compiled.c_str()) ||
      PyModule_AddStringConstant(module, "CUDA_ARCH_LIST", archs) ||
      PyModule_AddStringConstant(module, "CUDA_VERSION", cuda_str.c_str()) ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", torch_version) ||
      PyModule_AddStringConstant(module, "TORCH_TARGET", target.c_str()) ||
      PyModule_AddStringConstant(module, "VARIANTS", variants)) {
    Py_DECREF(module);
    return nullptr;
  }
  PyObject* loader = PyImport_ImportModule("sgdc_kernels._extension");
  PyObject* done = loader ? PyObject_CallMethod(loader, "_register", nullptr) : nullptr;
  Py_XDECREF(loader);
  if (done == nullptr) {
    Py_DECREF(module);
    return nullptr;
  }
  Py_DECREF(done);
  return module;
}
#endif  // SGDC_PYTHON_MODULE
