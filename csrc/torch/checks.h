// Argument checks of the torch glue: the last line of defence behind the Python checks, so
// a direct call into _C with bad tensors raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace internlm_kernels {

inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& reference) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " is on ", t.device(), " but the other tensors are on ",
              reference.device());
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

}  // namespace internlm_kernels
