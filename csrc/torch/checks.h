// Argument checks of the torch glue: the last line of defence behind the Python checks, so
// a direct call into _C with bad tensors raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>

namespace internlm_kernels {

// The device the kernels run on: the GPU, or the CPU in the emulation build (IK_CUDA_EMULATION).
#ifdef IK_CUDA_EMULATION
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
#define IK_KERNEL_DEVICE "a CPU tensor (CUDA emulation build)"
#else
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
#define IK_KERNEL_DEVICE "a CUDA tensor"
#endif

inline void check_kernel_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(on_kernel_device(t), op, ": ", name, " must be " IK_KERNEL_DEVICE ", got one on ", t.device());
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& reference) {
  check_kernel_device(op, name, t);
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " is on ", t.device(), " but the other tensors are on ",
              reference.device());
}

// A kernel choice from the environment variable ``name``: one of ``allowed`` (the first is
// the default, taken when it is unset or empty). Read at every call, so one process (the
// benchmark) can time every choice.
inline int env_choice(const char* op, const char* name, std::initializer_list<int> allowed) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return *allowed.begin();
  std::string expected;
  for (const int choice : allowed) {
    if (std::to_string(choice) == value) return choice;
    expected += (expected.empty() ? "" : " or ") + std::to_string(choice);
  }
  TORCH_CHECK(false, op, ": ", name, " must be ", expected, ", got '", value, "'");
  return 0;
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have a contiguous last dimension, got strides ", t.strides());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                           std::initializer_list<at::ScalarType> allowed) {
  for (const auto dtype : allowed)
    if (t.scalar_type() == dtype) return;
  TORCH_CHECK(false, op, ": the cuda backend does not support ", name, " of dtype ", t.scalar_type());
}

// A rotary cos / sin table pair: fp32 (table_len, rotary_dim / 2) on ``like``'s device with a
// contiguous last dim, the same shape, and rotary_dim <= like's last dim (head_dim).
inline void check_rotary_tables(const char* op, const char* cos_name, const at::Tensor& cos, const char* sin_name,
                                const at::Tensor& sin, const at::Tensor& like) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{cos_name, cos}, {sin_name, sin}}) {
    check_cuda(op, name, t, like);
    check_dim(op, name, t, 2);
    check_last_dim_contiguous(op, name, t);
    check_dtype_in(op, name, t, {at::kFloat});
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": ", cos_name, " ", cos.sizes(), " and ", sin_name, " ", sin.sizes(),
              " differ");
  // Without positions every position lies outside the table; and a table without a data
  // pointer, as an empty one may be, the kernels read as "no rotary".
  TORCH_CHECK(cos.size(0) >= 1, op, ": ", cos_name, " must hold at least one position, got shape ", cos.sizes());
  TORCH_CHECK(2 * cos.size(1) <= like.size(-1), op, ": rotary_dim ", 2 * cos.size(1), " exceeds head_dim ",
              like.size(-1));
}

}  // namespace internlm_kernels
