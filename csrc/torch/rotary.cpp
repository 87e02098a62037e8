// Torch glue of the rotary kernel: checks, params, dtype dispatch, stream.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "dispatch.h"
#include "glue.h"
#include "launch_scope.h"
#include "internlm_kernels/rotary.h"

namespace internlm_kernels {

void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out,
            const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
            const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset,
            const std::optional<at::Tensor>& cu_seqlens, bool interleaved, bool conjugate, bool inplace) {
  constexpr const char* op = "rotary (cuda)";
  check_kernel_device(op, "q", q);
  check_dtype_in(op, "q", q, {at::kFloat, at::kHalf, at::kBFloat16});
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"q_out", q_out},
                                {"k_out", k_out}}) {
    check_cuda(op, name, t, q);
    check_dim(op, name, t, 4);
    check_last_dim_contiguous(op, name, t);
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", q has ",
                q.scalar_type());
  }
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op, ": k ", k.sizes(),
              " does not match q ", q.sizes());
  TORCH_CHECK(q_out.sizes() == q.sizes() && k_out.sizes() == k.sizes(), op, ": outputs must match the inputs' shapes");
  check_rotary_tables(op, "cos", cos, "sin", sin, q);
  TORCH_CHECK(q.size(0) <= kMaxGridYZ, op, ": at most ", kMaxGridYZ, " batch rows per launch, got ", q.size(0));
  TORCH_CHECK(q.size(1) <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 tokens, got ", q.size(1));
  TORCH_CHECK(q.size(2) + k.size(2) <= 65535 && q.size(3) <= 65535 &&
                  (q.size(2) + k.size(2)) * q.size(3) < std::numeric_limits<int32_t>::max(),
              op, ": too many heads or features (per token below 2^31): ", q.sizes(), " ", k.sizes());
  const int64_t item_blocks = rotary_item_blocks(q.size(2), k.size(2), cos.size(1), q.element_size());
  TORCH_CHECK(item_blocks <= kMaxGridYZ, op, ": too many heads x rotary pairs per token for the grid: ", item_blocks,
              " blocks of ", kRotaryMaxThreads, " items (at most ", kMaxGridYZ, "), q ", q.sizes(), ", k ", k.sizes(),
              ", rotary_dim ", 2 * cos.size(1));
  // In place means the outputs are the inputs; out of place they must not share memory.
  const bool same_q = q_out.data_ptr() == q.data_ptr() && q_out.strides() == q.strides();
  const bool same_k = k.size(2) == 0 || (k_out.data_ptr() == k.data_ptr() && k_out.strides() == k.strides());
  TORCH_CHECK(inplace ? (same_q && same_k) : (q_out.data_ptr() != q.data_ptr()), op,
              ": inplace=", inplace, " but the outputs ", inplace ? "are not" : "are", " the inputs");
  TORCH_CHECK(!inplace || k.size(2) == 0 || k.data_ptr() != q.data_ptr(), op,
              ": in place, q and k must not share memory");

  RotaryParams p;
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_s = q.stride(1), p.q_stride_h = q.stride(2);
  p.q_out = q_out.data_ptr();
  p.q_out_stride_b = q_out.stride(0), p.q_out_stride_s = q_out.stride(1), p.q_out_stride_h = q_out.stride(2);
  const bool has_k = k.size(2) > 0;
  // Without k heads, pass q's pointers: never read, but never null either.
  const at::Tensor& k_src = has_k ? k : q;
  const at::Tensor& k_dst = has_k ? k_out : q_out;
  p.k = k_src.data_ptr();
  p.k_stride_b = k_src.stride(0), p.k_stride_s = k_src.stride(1), p.k_stride_h = k_src.stride(2);
  p.k_out = k_dst.data_ptr();
  p.k_out_stride_b = k_dst.stride(0), p.k_out_stride_s = k_dst.stride(1), p.k_out_stride_h = k_dst.stride(2);
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.cos_stride = cos.stride(0), p.sin_stride = sin.stride(0), p.table_len = cos.size(0);
  if (position_ids.has_value()) {
    check_cuda(op, "position_ids", *position_ids, q);
    check_dim(op, "position_ids", *position_ids, 2);
    check_dtype_in(op, "position_ids", *position_ids, {at::kInt, at::kLong});
    TORCH_CHECK(position_ids->size(0) == q.size(0) && position_ids->size(1) == q.size(1), op,
                ": position_ids must be (B, S) = (", q.size(0), ", ", q.size(1), "), got ", position_ids->sizes());
    p.position_ids = position_ids->data_ptr();
    p.position_ids_int64 = position_ids->scalar_type() == at::kLong;
    p.position_stride_b = position_ids->stride(0), p.position_stride_s = position_ids->stride(1);
  }
  int64_t num_sequences = q.size(0);
  if (cu_seqlens.has_value()) {
    check_cuda(op, "cu_seqlens", *cu_seqlens, q);
    check_dim(op, "cu_seqlens", *cu_seqlens, 1);
    check_dtype_in(op, "cu_seqlens", *cu_seqlens, {at::kInt});
    TORCH_CHECK(cu_seqlens->is_contiguous() && cu_seqlens->size(0) >= 1, op, ": cu_seqlens must be contiguous (B+1,)");
    TORCH_CHECK(q.size(0) == 1, op, ": packed inputs arrive as (1, T, H, D), got ", q.sizes());
    num_sequences = cu_seqlens->size(0) - 1;
    p.cu_seqlens = cu_seqlens->data_ptr<int32_t>();
    p.num_sequences = num_sequences;
  }
  if (seqlen_offsets.has_value()) {
    check_cuda(op, "seqlen_offsets", *seqlen_offsets, q);
    check_dtype_in(op, "seqlen_offsets", *seqlen_offsets, {at::kInt, at::kLong});
    TORCH_CHECK(seqlen_offsets->dim() == 1 && seqlen_offsets->size(0) == num_sequences &&
                    seqlen_offsets->is_contiguous(),
                op, ": seqlen_offsets must be contiguous (", num_sequences, ",), got ", seqlen_offsets->sizes());
    p.seqlen_offsets = seqlen_offsets->data_ptr();
    p.seqlen_offsets_int64 = seqlen_offsets->scalar_type() == at::kLong;
  }
  p.seqlen_offset = seqlen_offset;
  p.batch = q.size(0), p.seqlen = q.size(1);
  p.heads_q = static_cast<int>(q.size(2)), p.heads_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3)), p.rotary_half = static_cast<int>(cos.size(1));
  p.interleaved = interleaved, p.conjugate = conjugate, p.inplace = inplace;

  const LaunchScope scope(q);
  const cudaStream_t stream = scope.stream();
  const cudaError_t error = IK_DTYPE_SWITCH(q.scalar_type(), op, [&] { return launch_rotary<T>(p, stream); });
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA error: ", error_text(error));
}

}  // namespace internlm_kernels
