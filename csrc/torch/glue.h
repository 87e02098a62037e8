// The torch-facing functions of internlm_kernels._C (defined in csrc/torch/*.cpp, exported in
// bindings.cpp). Each mirrors a Triton launcher in internlm_kernels/triton/ argument for
// argument: outputs are allocated by the Python ops layer and passed in.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

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

// Attention (tensor cores; float16 / bfloat16, head_dim 64 or 128). q / out (B, Sq, Hq, D),
// k / v (B, Sk, Hkv, D) views, packed as (1, T, H, D) with cu_seqlens; lse (B, Hq, Sq) fp32.
// window_size (left, right), -1 unbounded; causal sets right to 0.
void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
                   const std::optional<at::Tensor>& cu_seqlens_k, double softmax_scale, bool causal,
                   std::tuple<int64_t, int64_t> window_size);

void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, const std::optional<at::Tensor>& cu_seqlens_q,
                   const std::optional<at::Tensor>& cu_seqlens_k, double softmax_scale, bool causal,
                   std::tuple<int64_t, int64_t> window_size, bool deterministic);

// k_cache[b, cache_seqlens[b] + i] = k[b, i] (rotated at that position when the rotary tables
// are given) and v_cache[b, cache_seqlens[b] + i] = v[b, i]; k, v (B, Snew, Hkv, D), caches
// (B, S_max, Hkv, D), or pools of pages (num_pages, page_size, Hkv, D) with ``block_table``
// (B, max_blocks) int32 (PagedCache in attention.h). One launch. fp8 caches (float8_e4m3fn /
// float8_e5m2) store each entry as x / scale rounded to the format, with k_scale / v_scale
// float32 on the device, one value or one per KV head (ScaledCache in attention.h).
void kvcache_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& rotary_cos,
                    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale);

// Split-KV attention of q (B, Sq, Hq, D) over caches (contiguous, or pages with
// ``block_table``, as kvcache_append) holding cache_seqlens[b] + new_tokens entries; q rotates
// as it loads (position cache_seqlens[b] + s) when the tables are given; fp8 caches read as
// entry x scale.
void attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& out,
                      const at::Tensor& cache_seqlens, int64_t new_tokens, double softmax_scale, bool causal,
                      std::tuple<int64_t, int64_t> window_size, const std::optional<at::Tensor>& rotary_cos,
                      const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                      const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_scale,
                      const std::optional<at::Tensor>& v_scale);

}  // namespace internlm_kernels
