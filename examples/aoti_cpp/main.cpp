// Runs an AOTInductor package of a model that calls sgdc-kernels' operators (for example an SGD-Net
// from `sgdc-export --format pt2`) without Python: the operator library is loaded first, so that
// the package's calls of sgdc::cpu_forward / sgdc::cuda_forward find their kernels, then the package
// runs on an input read from a raw float32 file.
//
//   sgdc_aoti_run MODEL.pt2 OPERATOR_LIBRARY INPUT.bin B C H W OUTPUT_PREFIX
//
// INPUT.bin holds B*C*H*W float32 values (row-major, NCHW). Output i is written to
// OUTPUT_PREFIX<i>.bin as float32 values, and its shape is printed, one line per output.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

int main(int argc, char** argv) {
  if (argc != 9) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 LIBSGDC_OPS.so INPUT.bin B C H W OUTPUT_PREFIX\n";
    return 2;
  }
  // The operator library registers the sgdc:: operators with the dispatcher when it is loaded.
  // RTLD_LAZY: the Python package's extension module (sgdc_kernels/_C.abi3.so) serves too; its few
  // calls into Python are in its module init, which is never called here, so never bound.
  if (dlopen(argv[2], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load the operator library " << argv[2] << ": " << dlerror() << "\n";
    return 1;
  }
  std::vector<int64_t> shape;
  for (int k = 4; k < 8; ++k) shape.push_back(std::atoll(argv[k]));
  at::Tensor input = at::empty(shape, at::kFloat);
  std::ifstream in(argv[3], std::ios::binary);
  in.read(reinterpret_cast<char*>(input.data_ptr<float>()), input.numel() * sizeof(float));
  if (!in || in.gcount() != static_cast<std::streamsize>(input.numel() * sizeof(float))) {
    std::cerr << "cannot read " << input.numel() << " float32 values from " << argv[3] << "\n";
    return 1;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<at::Tensor> outputs = loader.run({input});
    for (size_t i = 0; i < outputs.size(); ++i) {
      at::Tensor out = outputs[i].contiguous().to(at::kFloat);
      std::ofstream file(std::string(argv[8]) + std::to_string(i) + ".bin", std::ios::binary);
      file.write(reinterpret_cast<const char*>(out.data_ptr<float>()), out.numel() * sizeof(float));
      std::cout << "output " << i << ": " << out.sizes() << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "running " << argv[1] << " failed: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
