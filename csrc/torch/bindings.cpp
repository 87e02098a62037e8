// Export table of internlm_kernels._C. Only bindings here: the glue with checks and
// dispatch lives in the other csrc/torch/*.cpp files, the kernels in csrc/include.
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#ifndef IK_TORCH_VERSION
#error "setup.py defines IK_TORCH_VERSION (the torch this extension is built against)"
#endif

namespace {

// What the extension was built against, so the package can refuse a stale build clearly
// instead of failing later with an "undefined symbol".
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = IK_TORCH_VERSION;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_archs"] = IK_CUDA_ARCHS;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "internlm_kernels CUDA C++ kernels";
  m.def("build_info", &build_info, "torch / CUDA versions and GPU archs this extension was built for");
}
