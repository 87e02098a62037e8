// What a launch needs from torch besides the tensors: the device guard, the current stream
// and error text. The CPU emulation build (-DIK_CUDA_EMULATION) has no CUDA runtime: no
// guard, a null stream, and the emulation's message (a race it found) as the error text.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#ifdef IK_CUDA_EMULATION
#include <mutex>
#include <string>

#include "internlm_kernels/emulation.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace internlm_kernels {

#ifdef IK_CUDA_EMULATION
class LaunchScope {
 public:
  explicit LaunchScope(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};

inline std::string error_text(cudaError_t) {
  std::lock_guard<std::mutex> lock(emulation::last_fault_mutex);
  return "CUDA emulation: " + emulation::last_fault;
}
#else
class LaunchScope {
 public:
  explicit LaunchScope(const at::Tensor& t) : guard_(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
};

inline const char* error_text(cudaError_t error) { return cudaGetErrorString(error); }
#endif

}  // namespace internlm_kernels
