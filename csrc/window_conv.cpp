// Schemas of the sgdc::cuda_* operators (implementations in cuda/), the Python module stub that
// makes `import sgdc_kernels._C` load them, and the build information of the extension.
#include <torch/library.h>

namespace sgdc {
namespace cuda_impl {
const char* compiled_arch_list();  // defined in cuda/window_conv_forward.cu
int compiled_cuda_version();
const char* compiled_variant_list();  // kernel variants, the default first
}  // namespace cuda_impl
}  // namespace sgdc

// FRAGMENT: the Python backends define sgdc::torch_* and sgdc::triton_* in the same namespace.
TORCH_LIBRARY_FRAGMENT(sgdc, m) {
  // Fake kernels and autograd are registered from Python when `import sgdc_kernels._C` runs
  // sgdc_kernels._cuda._register(); the fakes themselves live in sgdc_kernels.custom_ops (torch
  // checks that the module named here is where the fake implementation was defined).
  m.set_python_module("sgdc_kernels.custom_ops", "import sgdc_kernels._C registers them");
  // The schemas of sgdc_kernels.custom_ops (FORWARD_SCHEMA, BACKWARD_SCHEMA).
  m.def(
      "cuda_forward(Tensor x, Tensor weights, Tensor? gate, int kernel_size, int num_heads, "
      "int dilation, bool clamp, bool softmax, str variant) -> Tensor");
  m.def(
      "cuda_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor? gate, int kernel_size, "
      "int num_heads, int dilation, bool clamp, bool softmax, str variant) -> (Tensor, Tensor, Tensor)");
}

#ifdef SGDC_PYTHON_MODULE
#include <Python.h>

#include <string>

#define SGDC_STR2(x) #x
#define SGDC_STR(x) SGDC_STR2(x)

// A Python module with no functions: importing it loads this library, whose static initializers
// register the operators; it then hands them to sgdc_kernels._cuda for fakes and autograd.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "window_conv CUDA kernels", -1,
                                   nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
  const int cuda = sgdc::cuda_impl::compiled_cuda_version();
  const std::string cuda_str = std::to_string(cuda / 1000) + "." + std::to_string(cuda % 1000 / 10);
#ifdef SGDC_TORCH_VERSION
  const char* torch_version = SGDC_STR(SGDC_TORCH_VERSION);
#else
  const char* torch_version = "";
#endif
  if (PyModule_AddStringConstant(module, "CUDA_ARCH_LIST", sgdc::cuda_impl::compiled_arch_list()) ||
      PyModule_AddStringConstant(module, "CUDA_VERSION", cuda_str.c_str()) ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", torch_version) ||
      PyModule_AddStringConstant(module, "VARIANTS", sgdc::cuda_impl::compiled_variant_list())) {
    Py_DECREF(module);
    return nullptr;
  }
  PyObject* loader = PyImport_ImportModule("sgdc_kernels._cuda");
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
