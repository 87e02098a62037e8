// Torch glue of the tensor-core attention kernels: checks, params, dtype / head-dim / mask
// dispatch, workspaces, stream. Mirrors internlm_kernels/triton/attention.py's launchers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>

#include "checks.h"
#include "dispatch.h"
#include "glue.h"
#include "internlm_kernels/attention.h"
#include "launch_scope.h"

namespace internlm_kernels {
namespace {

// Windows wider than any sequence are unbounded; the cap keeps position arithmetic in range.
constexpr int64_t kWindowCap = int64_t(1) << 30;

// A (B, S, H, D) operand: on q's device, q's dtype, head_dim D, and rows the kernels can
// move as 16-byte chunks (aligned base, strides of a multiple of 8 elements).
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_cuda(op, name, t, q);
  check_dim(op, name, t, 4);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", q has ",
              q.scalar_type());
  TORCH_CHECK(t.size(3) == q.size(3), op, ": ", name, " has head_dim ", t.size(3), ", q has ", q.size(3));
  TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " must have a contiguous last dimension, got strides ", t.strides());
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  TORCH_CHECK(aligned, op, ": ", name, " must start 16-byte aligned with strides that are multiples of 8 elements "
              "(the kernels move 16-byte rows), got strides ", t.strides());
}

// An fp8 cache's format (kNone for caches of the inputs' type).
CacheFormat cache_format(const at::Tensor& cache) {
  if (cache.scalar_type() == at::kFloat8_e4m3fn) return CacheFormat::kE4M3;
  if (cache.scalar_type() == at::kFloat8_e5m2) return CacheFormat::kE5M2;
  return CacheFormat::kNone;
}

// The caches k_cache / v_cache (B or pages, S, Hkv, D): on ``like``'s device, its dtype or (fp8)
// one byte an entry, head_dim D, and rows the kernels move as 16-byte chunks (fp8: strides of
// a multiple of 16 entries). Then the fp8 format and scales: k_scale / v_scale float32 on the
// device, contiguous, 1 or Hkv values (None: the caches are not fp8).
ScaledCache check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& like,
                         const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  ScaledCache scaled;
  scaled.format = cache_format(k_cache);
  if (scaled.format == CacheFormat::kNone) {
    check_operand(op, "k_cache", k_cache, like);
    check_operand(op, "v_cache", v_cache, like);
    TORCH_CHECK(!k_scale.has_value() && !v_scale.has_value(), op, ": k_scale / v_scale apply to fp8 caches, got ",
                k_cache.scalar_type(), " caches");
    return scaled;
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache}, {"v_cache", v_cache}}) {
    check_cuda(op, name, t, like);
    check_dim(op, name, t, 4);
    TORCH_CHECK(t.scalar_type() == k_cache.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                ", k_cache has ", k_cache.scalar_type());
    TORCH_CHECK(t.size(3) == like.size(3), op, ": ", name, " has head_dim ", t.size(3), ", ", like.size(3),
                " expected");
    TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " must have a contiguous last dimension, got strides ", t.strides());
    bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    for (int d = 0; d < 3; ++d) aligned = aligned && (t.size(d) <= 1 || t.stride(d) % 16 == 0);
    TORCH_CHECK(aligned, op, ": fp8 ", name, " must start 16-byte aligned with strides that are multiples of 16 "
                "entries (the kernels move 16-byte rows), got strides ", t.strides());
  }
  const int64_t heads = k_cache.size(2);
  for (const auto& [name, scale, pointer, stride] :
       {std::tuple<const char*, const std::optional<at::Tensor>&, const float**, int64_t*>{
            "k_scale", k_scale, &scaled.k_scale, &scaled.k_scale_stride},
        {"v_scale", v_scale, &scaled.v_scale, &scaled.v_scale_stride}}) {
    TORCH_CHECK(scale.has_value(), op, ": fp8 caches need ", name, " (float32, 1 or ", heads, " values)");
    check_cuda(op, name, *scale, like);
    TORCH_CHECK(scale->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", scale->scalar_type());
    TORCH_CHECK(scale->is_contiguous() && (scale->numel() == 1 || scale->numel() == heads), op, ": ", name,
                " must be contiguous with 1 or ", heads, " (KV heads) values, got ", scale->sizes());
    *pointer = scale->data_ptr<float>();
    *stride = scale->numel() > 1 ? 1 : 0;
  }
  return scaled;
}

// A (B, S, H, D) tensor's data pointer and row strides into a params struct's fields.
template <typename Pointer>
void bind_rows(const at::Tensor& t, Pointer& data, int64_t& stride_b, int64_t& stride_s, int64_t& stride_h) {
  data = static_cast<Pointer>(t.data_ptr());
  stride_b = t.stride(0), stride_s = t.stride(1), stride_h = t.stride(2);
}

void check_lse(const char* op, const char* name, const at::Tensor& lse, const at::Tensor& q) {
  check_cuda(op, name, lse, q);
  check_dtype_in(op, name, lse, {at::kFloat});
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(1), op,
              ": ", name, " must be (B, Hq, Sq) = (", q.size(0), ", ", q.size(2), ", ", q.size(1), "), got ",
              lse.sizes());
}

const int32_t* cu_seqlens_pointer(const char* op, const char* name, const std::optional<at::Tensor>& cu,
                                  const at::Tensor& q, int64_t num_sequences) {
  if (!cu.has_value()) return nullptr;
  check_cuda(op, name, *cu, q);
  check_dtype_in(op, name, *cu, {at::kInt});
  TORCH_CHECK(cu->dim() == 1 && cu->is_contiguous() && cu->size(0) == num_sequences + 1, op, ": ", name,
              " must be contiguous (", num_sequences + 1, ",), got ", cu->sizes());
  return cu->data_ptr<int32_t>();
}

// Checks and params shared by the forward, backward and decode.
AttentionParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const std::optional<at::Tensor>& cu_seqlens_q,
                            const std::optional<at::Tensor>& cu_seqlens_k, double softmax_scale, bool causal,
                            std::tuple<int64_t, int64_t> window_size, bool keys_in_pages = false,
                            bool keys_checked = false) {
  check_kernel_device(op, "q", q);
  check_dtype_in(op, "q", q, {at::kHalf, at::kBFloat16});
  TORCH_CHECK(attention_head_dim_supported(q.size(-1)), op, ": the cuda kernels have head_dim 64 and 128, got ",
              q.size(-1), " (backend='triton' serves multiples of 8 up to 256)");
  check_operand(op, "q", q, q);
  check_operand(op, "out", out, q);
  if (!keys_checked) {  // (the decode's caches: check_caches)
    check_operand(op, "k", k, q);
    check_operand(op, "v", v, q);
  }
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(keys_in_pages || k.size(0) == q.size(0), op, ": q has batch ", q.size(0), " but k has ", k.size(0));
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": q heads (", q.size(2),
              ") must be a multiple of k/v heads (", k.size(2), ")");
  const int64_t group = q.size(2) / k.size(2);
  TORCH_CHECK(q.size(1) * group < std::numeric_limits<int32_t>::max() / 2 &&
                  k.size(1) < std::numeric_limits<int32_t>::max() / 2,
              op, ": sequences too long for 32-bit row indices: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q.size(0) <= kMaxGridYZ && k.size(2) <= kMaxGridYZ, op, ": at most ", kMaxGridYZ,
              " batch rows and KV heads per launch, got ", q.size(0), " and ", k.size(2));
  // The backward's one-warp-per-row kernels: 4 (batch row, position, query head) rows a block on x.
  TORCH_CHECK(q.size(0) * q.size(1) * q.size(2) <= 4 * kMaxGridX, op, ": at most ", 4 * kMaxGridX,
              " query rows (B x Sq x Hq) per call, got q ", q.sizes());

  AttentionParams p;
  bind_rows(q, p.q, p.q_stride_b, p.q_stride_s, p.q_stride_h);
  bind_rows(k, p.k, p.k_stride_b, p.k_stride_s, p.k_stride_h);
  bind_rows(v, p.v, p.v_stride_b, p.v_stride_s, p.v_stride_h);
  bind_rows(out, p.out, p.out_stride_b, p.out_stride_s, p.out_stride_h);
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
              ": pass cu_seqlens_q and cu_seqlens_k together");
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK(q.size(0) == 1, op, ": packed inputs arrive as (1, T, H, D), got q ", q.sizes());
    const int64_t num_sequences = cu_seqlens_q->numel() - 1;
    TORCH_CHECK(num_sequences >= 0 && num_sequences < std::numeric_limits<int32_t>::max() / 2, op,
                ": cu_seqlens_q must hold B + 1 offsets, got ", cu_seqlens_q->sizes());
    p.cu_seqlens_q = cu_seqlens_pointer(op, "cu_seqlens_q", cu_seqlens_q, q, num_sequences);
    p.cu_seqlens_k = cu_seqlens_pointer(op, "cu_seqlens_k", cu_seqlens_k, q, num_sequences);
    p.num_sequences = static_cast<int>(num_sequences);
  }
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(1)), p.seqlen_k = static_cast<int>(k.size(1));
  p.heads_q = static_cast<int>(q.size(2)), p.heads_kv = static_cast<int>(k.size(2));
  p.group = static_cast<int>(group);
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  auto [left, right] = window_size;
  if (causal) right = 0;
  p.has_left = left >= 0, p.has_right = right >= 0;
  p.window_left = static_cast<int>(std::clamp<int64_t>(left, 0, kWindowCap));
  p.window_right = static_cast<int>(std::clamp<int64_t>(right, 0, kWindowCap));
  return p;
}

// cache_seqlens: contiguous int32 (B,) on the tensors' device.
// ``like``: a (B, ...) tensor of the call (q, or the new entries k).
void check_cache_seqlens(const char* op, const at::Tensor& cache_seqlens, const at::Tensor& like) {
  check_cuda(op, "cache_seqlens", cache_seqlens, like);
  check_dtype_in(op, "cache_seqlens", cache_seqlens, {at::kInt});
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == like.size(0) && cache_seqlens.is_contiguous(), op,
              ": cache_seqlens must be contiguous (B,) = (", like.size(0), ",), got ", cache_seqlens.sizes(),
              " with strides ", cache_seqlens.strides());
  TORCH_CHECK(like.size(0) <= kMaxGridYZ, op, ": at most ", kMaxGridYZ, " batch rows, got ", like.size(0));
}

// The block table of a paged cache (none: contiguous caches (B, S_max, Hkv, D), whose batch
// must be ``batch``): int32 (B, max_blocks) with a contiguous last dim, on the caches' device;
// the caches are then pools of pages (num_pages, page_size, Hkv, D). Returns the cache's
// capacity per sequence (max_blocks * page_size, or S_max).
int64_t bind_paged_cache(const char* op, const std::optional<at::Tensor>& block_table, const at::Tensor& k_cache,
                         int64_t batch, PagedCache& paged) {
  if (!block_table.has_value()) {
    TORCH_CHECK(k_cache.size(0) == batch, op, ": k_cache has batch ", k_cache.size(0), " but the call has ", batch);
    return k_cache.size(1);
  }
  const at::Tensor& table = *block_table;
  check_cuda(op, "block_table", table, k_cache);
  check_dtype_in(op, "block_table", table, {at::kInt});
  TORCH_CHECK(table.dim() == 2 && table.size(0) == batch && table.size(1) >= 1 &&
                  (table.size(1) == 1 || table.stride(1) == 1),
              op,
              ": block_table must be (B, max_blocks) = (", batch, ", >= 1) with a contiguous last dim, got ",
              table.sizes(), " with strides ", table.strides());
  TORCH_CHECK(k_cache.size(0) >= 1 && k_cache.size(1) >= 1 && k_cache.size(0) <= std::numeric_limits<int32_t>::max(),
              op, ": the pages must be (num_pages >= 1, page_size >= 1, Hkv, D), got ", k_cache.sizes());
  paged.block_table = table.data_ptr<int32_t>();
  paged.table_stride = table.stride(0);
  paged.num_pages = static_cast<int>(k_cache.size(0));
  paged.page_size = FastDivisor(static_cast<uint32_t>(k_cache.size(1)));
  return table.size(1) * k_cache.size(1);
}

// The rotary tables of the KV-cache calls (both or neither): fp32 (table_len, rotary_dim / 2)
// with a contiguous last dim, rotary_dim <= head_dim.
RotaryTables rotary_tables(const char* op, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                           bool interleaved, const at::Tensor& like) {
  RotaryTables tables;
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": pass rotary_cos and rotary_sin together");
  if (!cos.has_value()) return tables;
  check_rotary_tables(op, "rotary_cos", *cos, "rotary_sin", *sin, like);
  tables.cos = cos->data_ptr<float>(), tables.sin = sin->data_ptr<float>();
  tables.cos_stride = cos->stride(0), tables.sin_stride = sin->stride(0), tables.table_len = cos->size(0);
  tables.rotary_half = static_cast<int>(cos->size(1));
  tables.interleaved = interleaved;
  return tables;
}

void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA error: ", error_text(error));
}

}  // namespace

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
                   const std::optional<at::Tensor>& cu_seqlens_k, double softmax_scale, bool causal,
                   std::tuple<int64_t, int64_t> window_size) {
  constexpr const char* op = "attention_fwd (cuda)";
  AttentionParams p = make_params(op, q, k, v, out, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size);
  check_lse(op, "lse", lse, q);
  p.lse = lse.data_ptr<float>();
  p.lse_stride_b = lse.stride(0), p.lse_stride_h = lse.stride(1), p.lse_stride_s = lse.stride(2);
  // ForwardTraits in attention.cuh: 4 warps of 32 query rows, or 8 of 16.
  p.forward_warp_rows = env_choice(op, "INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS", {32, 16});
  if (q.numel() == 0 || k.numel() == 0) return;  // the ops layer fills outputs for key-less calls
  const LaunchScope scope(q);
  const cudaStream_t stream = scope.stream();
  check_launch(op, IK_HALF_DTYPE_SWITCH(q.scalar_type(), op, [&] {
    return IK_HEAD_DIM_SWITCH(q.size(3), op, [&] {
      return IK_BOOL_SWITCH(p.has_left || p.has_right, kHasWindow,
                            [&] { return launch_attention_fwd<T, kHeadDim, kHasWindow>(p, stream); });
    });
  }));
}

void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, const std::optional<at::Tensor>& cu_seqlens_q,
                   const std::optional<at::Tensor>& cu_seqlens_k, double softmax_scale, bool causal,
                   std::tuple<int64_t, int64_t> window_size, bool deterministic) {
  constexpr const char* op = "attention_bwd (cuda)";
  AttentionBwdParams p;
  static_cast<AttentionParams&>(p) =
      make_params(op, q, k, v, out, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size);
  check_lse(op, "lse", lse, q);
  TORCH_CHECK(lse.is_contiguous(), op, ": lse must be contiguous (its strides also index delta), got strides ",
              lse.strides());
  for (const auto& [name, t, like] : {std::tuple<const char*, const at::Tensor&, const at::Tensor&>{"dout", dout, q},
                                      {"dq", dq, q}, {"dk", dk, k}, {"dv", dv, k}}) {
    check_operand(op, name, t, q);
    TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ", t.sizes());
  }
  if (q.numel() == 0 || k.numel() == 0) return;
  const at::Tensor delta = at::empty(lse.sizes(), lse.options());
  p.lse = lse.data_ptr<float>();
  p.lse_stride_b = lse.stride(0), p.lse_stride_h = lse.stride(1), p.lse_stride_s = lse.stride(2);
  p.delta = delta.data_ptr<float>();
  bind_rows(dout, p.dout, p.dout_stride_b, p.dout_stride_s, p.dout_stride_h);
  bind_rows(dq, p.dq, p.dq_stride_b, p.dq_stride_s, p.dq_stride_h);
  bind_rows(dk, p.dk, p.dk_stride_b, p.dk_stride_s, p.dk_stride_h);
  bind_rows(dv, p.dv, p.dv_stride_b, p.dv_stride_s, p.dv_stride_h);
  p.key_block = env_choice(op, "INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK", {64, 128});  // BwdKeyTraits
  p.dq_warp_rows = env_choice(op, "INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS", {16, 32});  // BwdQueryTraits
  // dQ by fp32 atomics in the dK/dV kernel only on request, and never when deterministic: the
  // separate dQ kernel is the default (AttentionBwdParams in attention.h says why).
  const bool atomic_dq = env_choice(op, "INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", {0, 1}) == 1 && !deterministic;
  at::Tensor dq_accum;  // fp32 target of the atomic dQ
  if (atomic_dq) {
    dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));
    bind_rows(dq_accum, p.dq_accum, p.dq_accum_stride_b, p.dq_accum_stride_s, p.dq_accum_stride_h);
  }
  const LaunchScope scope(q);
  const cudaStream_t stream = scope.stream();
  check_launch(op, IK_HALF_DTYPE_SWITCH(q.scalar_type(), op, [&] {
    return IK_HEAD_DIM_SWITCH(q.size(3), op, [&] {
      return IK_BOOL_SWITCH(p.has_left || p.has_right, kHasWindow,
                            [&] { return launch_attention_bwd<T, kHeadDim, kHasWindow>(p, stream); });
    });
  }));
}

void kvcache_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& rotary_cos,
                    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale) {
  constexpr const char* op = "kvcache_append (cuda)";
  check_kernel_device(op, "k", k);
  check_dim(op, "k", k, 4);
  check_dtype_in(op, "k", k, {at::kHalf, at::kBFloat16});
  check_operand(op, "k", k, k);
  check_operand(op, "v", v, k);
  const ScaledCache fp8 = check_caches(op, k_cache, v_cache, k, k_scale, v_scale);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v.sizes() == k.sizes(), op, ": k_cache ", k_cache.sizes(),
              " / v_cache ", v_cache.sizes(), " and k ", k.sizes(), " / v ", v.sizes(), " must match in pairs");
  TORCH_CHECK(k.size(2) == k_cache.size(2), op, ": new entries ", k.sizes(), " do not match the cache ",
              k_cache.sizes());
  KvcacheAppendParams p;
  const int64_t capacity = bind_paged_cache(op, block_table, k_cache, k.size(0), p.paged);
  TORCH_CHECK(k.size(1) <= capacity, op, ": ", k.size(1), " new entries exceed the capacity ", capacity);
  check_cache_seqlens(op, cache_seqlens, k);
  TORCH_CHECK(k_cache.size(1) < std::numeric_limits<int32_t>::max() / 2 && k_cache.size(3) % 8 == 0 &&
                  k_cache.size(2) * k_cache.size(3) < std::numeric_limits<int32_t>::max() / 2,
              op, ": unsupported cache shape ", k_cache.sizes(), " (capacity and heads x head_dim below 2^30, ",
              "head_dim a multiple of 8)");
  TORCH_CHECK(capacity < std::numeric_limits<int32_t>::max() / 2, op, ": capacity ", capacity, " past 2^30");
  bind_rows(k, p.k, p.k_stride_b, p.k_stride_s, p.k_stride_h);
  bind_rows(v, p.v, p.v_stride_b, p.v_stride_s, p.v_stride_h);
  bind_rows(k_cache, p.k_cache, p.k_cache_stride_b, p.k_cache_stride_s, p.k_cache_stride_h);
  bind_rows(v_cache, p.v_cache, p.v_cache_stride_b, p.v_cache_stride_s, p.v_cache_stride_h);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.batch = static_cast<int>(k.size(0)), p.new_tokens = static_cast<int>(k.size(1));
  p.heads = static_cast<int>(k_cache.size(2)), p.head_dim = static_cast<int>(k_cache.size(3));
  p.capacity = static_cast<int>(capacity);
  p.rotary = rotary_tables(op, rotary_cos, rotary_sin, rotary_interleaved, k);
  p.fp8 = fp8;
  if (k.numel() == 0) return;
  const LaunchScope scope(k_cache);
  const cudaStream_t stream = scope.stream();
  check_launch(op, IK_HALF_DTYPE_SWITCH(k.scalar_type(), op, [&] { return launch_kvcache_append<T>(p, stream); }));
}

void attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& out,
                      const at::Tensor& cache_seqlens, int64_t new_tokens, double softmax_scale, bool causal,
                      std::tuple<int64_t, int64_t> window_size, const std::optional<at::Tensor>& rotary_cos,
                      const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                      const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_scale,
                      const std::optional<at::Tensor>& v_scale) {
  constexpr const char* op = "attention_decode (cuda)";
  AttentionDecodeParams p;
  check_kernel_device(op, "q", q);
  check_dim(op, "q", q, 4);
  const ScaledCache fp8 = check_caches(op, k_cache, v_cache, q, k_scale, v_scale);
  static_cast<AttentionParams&>(p) = make_params(op, q, k_cache, v_cache, out, std::nullopt, std::nullopt,
                                                 softmax_scale, causal, window_size, block_table.has_value(),
                                                 /*keys_checked=*/true);
  p.fp8 = fp8;
  check_cache_seqlens(op, cache_seqlens, q);
  p.rotary = rotary_tables(op, rotary_cos, rotary_sin, rotary_interleaved, q);
  const int64_t capacity = bind_paged_cache(op, block_table, k_cache, q.size(0), p.paged);
  TORCH_CHECK(capacity < std::numeric_limits<int32_t>::max() / 2, op, ": capacity ", capacity, " past 2^30");
  TORCH_CHECK(new_tokens >= 0 && new_tokens <= capacity, op, ": new_tokens ", new_tokens, " must be in [0, capacity ",
              capacity, "]");
  // The decode grid's x axis: a program per (row tile, batch row, KV head).
  // The combine kernel's blocks of 4 rows outnumber the split kernel's 16-row tiles.
  const int64_t combine_blocks = (q.size(1) * p.group + 3) / 4 * q.size(0) * k_cache.size(2);
  TORCH_CHECK(combine_blocks <= kMaxGridX, op, ": at most ", kMaxGridX, " blocks of 4 query rows (positions x group, ",
              "x batch rows x KV heads) per decode call, got ", combine_blocks,
              " (use flash_attention for long prefills)");
  if (q.numel() == 0) return;
  const LaunchScope scope(q);
  const cudaStream_t stream = scope.stream();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.new_tokens = static_cast<int>(new_tokens);
  p.capacity = static_cast<int>(capacity);
  const int programs_per_sm = IK_HALF_DTYPE_SWITCH(q.scalar_type(), op, [&] {
    return IK_HEAD_DIM_SWITCH(q.size(3), op, [&] { return attention_decode_programs_per_sm<T, kHeadDim>(fp8.format); });
  });
  const DecodeSplits splits = decode_splits(q.size(0), k_cache.size(2), q.size(1) * p.group, capacity,
                                            int64_t(multiprocessor_count()) * programs_per_sm);
  p.splits = splits.splits, p.rows_padded = splits.rows_padded;
  const auto workspace = q.options().dtype(at::kFloat);
  const at::Tensor partial_out =
      at::empty({q.size(0), k_cache.size(2), splits.splits, splits.rows_padded, q.size(3)}, workspace);
  const at::Tensor partial_lse = at::empty({q.size(0), k_cache.size(2), splits.splits, splits.rows_padded}, workspace);
  p.partial_out = partial_out.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  check_launch(op, IK_HALF_DTYPE_SWITCH(q.scalar_type(), op, [&] {
    return IK_HEAD_DIM_SWITCH(q.size(3), op, [&] { return launch_attention_decode<T, kHeadDim>(p, stream); });
  }));
}

}  // namespace internlm_kernels
