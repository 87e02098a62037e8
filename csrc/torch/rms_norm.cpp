// Torch glue of RMSNorm and fused add+RMSNorm: checks, params, dtype dispatch, stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "dispatch.h"
#include "glue.h"
#include "launch_scope.h"
#include "internlm_kernels/rms_norm.h"

namespace internlm_kernels {
namespace {

RowLayout layout_of(const at::Tensor& rows) { return {rows.stride(0), rows.stride(1)}; }

bool is_fp32(const at::Tensor& t) { return t.scalar_type() == at::kFloat; }

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_cuda(op, name, t, x);
  check_dim(op, name, t, 3);
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but x has ", x.sizes());
  check_last_dim_contiguous(op, name, t);
  // Either x's dtype or float32: what the kernels read or write through a run-time flag.
  check_dtype_in(op, name, t, {x.scalar_type(), at::kFloat});
}

void check_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t size,
                  std::initializer_list<at::ScalarType> dtypes) {
  check_cuda(op, name, t, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size && t.stride(0) == 1, op, ": ", name,
              " must be contiguous of shape (", size, ",), got shape ", t.sizes(), " strides ", t.strides());
  check_dtype_in(op, name, t, dtypes);
}

}  // namespace

void rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                  const at::Tensor& out, const std::optional<at::Tensor>& residual_out, const at::Tensor& rstd,
                  double eps) {
  constexpr const char* op = "rms_norm_fwd (cuda)";
  check_kernel_device(op, "x", x);
  check_dim(op, "x", x, 3);
  check_last_dim_contiguous(op, "x", x);
  check_dtype_in(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(residual.has_value() == residual_out.has_value(), op,
              ": residual and residual_out are given together (fused op) or not at all");
  const int64_t cols = x.size(2), rows = x.size(0) * x.size(1);
  check_vector(op, "weight", weight, x, cols, {x.scalar_type(), at::kFloat});
  check_rows(op, "out", out, x);
  check_vector(op, "rstd", rstd, x, rows, {at::kFloat});
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 rows, got ", rows);
  const bool fused = residual.has_value();
  if (fused) {
    check_rows(op, "residual", *residual, x);
    check_rows(op, "residual_out", *residual_out, x);
  }

  RmsNormFwdParams p;
  p.x = x.data_ptr();
  p.x_layout = layout_of(x);
  p.weight = weight.data_ptr();
  p.weight_fp32 = is_fp32(weight);
  p.out = out.data_ptr();
  p.out_layout = layout_of(out);
  p.out_fp32 = is_fp32(out);
  if (fused) {
    p.residual = residual->data_ptr();
    p.residual_layout = layout_of(*residual);
    p.residual_fp32 = is_fp32(*residual);
    p.residual_out = residual_out->data_ptr();
    p.residual_out_layout = layout_of(*residual_out);
    p.residual_out_fp32 = is_fp32(*residual_out);
  }
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.rows_inner = x.size(1);
  p.cols = cols;
  p.eps = static_cast<float>(eps);
  p.stage_weight = env_choice("rms_norm_fwd", "INTERNLM_KERNELS_CUDA_NORM_FWD_STAGE_WEIGHT", {1, 0}) == 1;

  const LaunchScope scope(x);
  const cudaStream_t stream = scope.stream();
  const cudaError_t error = IK_DTYPE_SWITCH(x.scalar_type(), op, [&] {
    return IK_BOOL_SWITCH(fused, kFused, [&] { return launch_rms_norm_fwd<T, kFused>(p, stream); });
  });
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA error: ", error_text(error));
}

std::optional<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& normed,
                                       const std::optional<at::Tensor>& dresidual_out, const at::Tensor& weight,
                                       const at::Tensor& rstd, const at::Tensor& dx,
                                       const std::optional<at::Tensor>& dresidual, bool compute_dweight) {
  constexpr const char* op = "rms_norm_bwd (cuda)";
  check_kernel_device(op, "dx", dx);
  check_dtype_in(op, "dx", dx, {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(op, "normed", normed, 3);
  const int64_t cols = normed.size(2), rows = normed.size(0) * normed.size(1);
  TORCH_CHECK(dx.is_contiguous() && dx.numel() == rows * cols, op, ": dx must be contiguous with ", rows * cols,
              " elements");
  // dx's dtype (x's) is the kernel's T; every other tensor is T or fp32.
  const at::Tensor x_like = dx.view({normed.size(0), normed.size(1), cols});
  check_rows(op, "normed", normed, x_like);
  check_rows(op, "dy", dy, x_like);
  check_vector(op, "weight", weight, dx, cols, {dx.scalar_type(), at::kFloat});
  check_vector(op, "rstd", rstd, dx, rows, {at::kFloat});
  if (dresidual_out.has_value()) check_rows(op, "dresidual_out", *dresidual_out, x_like);
  if (dresidual.has_value()) {
    check_cuda(op, "dresidual", *dresidual, dx);
    TORCH_CHECK(dresidual->is_contiguous() && dresidual->numel() == rows * cols, op,
                ": dresidual must be contiguous with ", rows * cols, " elements");
    check_dtype_in(op, "dresidual", *dresidual, {dx.scalar_type(), at::kFloat});
  }

  const LaunchScope scope(dx);
  const auto fp32 = dx.options().dtype(at::kFloat);
  std::optional<at::Tensor> dweight, workspace;
  if (compute_dweight) {
    dweight = at::empty({cols}, fp32);
    workspace = at::empty({rms_norm_bwd_workspace_floats(rows, cols, static_cast<int>(dx.element_size()))}, fp32);
  }

  RmsNormBwdParams p;
  p.dy = dy.data_ptr();
  p.dy_layout = layout_of(dy);
  p.dy_fp32 = is_fp32(dy);
  p.normed = normed.data_ptr();
  p.normed_layout = layout_of(normed);
  p.normed_fp32 = is_fp32(normed);
  if (dresidual_out.has_value()) {
    p.dresidual_out = dresidual_out->data_ptr();
    p.dresidual_out_layout = layout_of(*dresidual_out);
    p.dresidual_out_fp32 = is_fp32(*dresidual_out);
  }
  p.weight = weight.data_ptr();
  p.weight_fp32 = is_fp32(weight);
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  if (dresidual.has_value()) {
    p.dresidual = dresidual->data_ptr();
    p.dresidual_fp32 = is_fp32(*dresidual);
  }
  if (compute_dweight) {
    p.dweight = dweight->data_ptr<float>();
    p.dweight_partial = workspace->data_ptr<float>();
  }
  p.rows = rows;
  p.rows_inner = normed.size(1);
  p.cols = cols;

  const cudaStream_t stream = scope.stream();
  const cudaError_t error = IK_DTYPE_SWITCH(dx.scalar_type(), op, [&] {
    return IK_BOOL_SWITCH(dresidual.has_value(), kFused, [&] { return launch_rms_norm_bwd<T, kFused>(p, stream); });
  });
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA error: ", error_text(error));
  return dweight;
}

}  // namespace internlm_kernels
