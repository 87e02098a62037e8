// The torch-facing functions of internlm_kernels._C (defined in csrc/torch/*.cpp, exported in
// bindings.cpp). Each mirrors a Triton launcher in internlm_kernels/triton/ argument for
// argument: outputs are allocated by the Python ops layer and passed in.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace internlm_kernels {

// x, residual, out, residual_out: (outer, inner, N) views with a contiguous last dim;
// rstd: (outer * inner,) fp32. residual and residual_out are given together (fused op).
void rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                  const at::Tensor& out, const std::optional<at::Tensor>& residual_out, const at::Tensor& rstd,
                  double eps);

// dy, normed (x or residual_out), dresidual_out: (outer, inner, N) views; dx, dresidual:
// (M, N) contiguous. Returns dweight in fp32 when requested.
std::optional<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& normed,
                                       const std::optional<at::Tensor>& dresidual_out, const at::Tensor& weight,
                                       const at::Tensor& rstd, const at::Tensor& dx,
                                       const std::optional<at::Tensor>& dresidual, bool compute_dweight);

// q, k, q_out, k_out: (B, S, H, D) views (k may have 0 heads); cos, sin: (table, rotary/2) fp32.
void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out,
            const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
            const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset,
            const std::optional<at::Tensor>& cu_seqlens, bool interleaved, bool conjugate, bool inplace);

}  // namespace internlm_kernels
