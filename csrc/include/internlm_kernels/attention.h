// Fused attention: parameter structs, launcher declarations and the decode workspace size
// (plain C++; kernels in attention.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "internlm_kernels/common.h"
#include "internlm_kernels/rotary.h"

namespace internlm_kernels {

// q / out (B, Sq, Hq, D) and k / v (B, Sk, Hkv, D) with any strides (elements) and a
// contiguous last dim; packed (varlen) inputs are (1, T, H, D) with cu_seqlens. Every
// pointer and row stride keeps 16-byte alignment (the glue checks). lse (B, Hq, Sq) fp32,
// natural log, strided. Query head h uses KV head h / group.
// Masks are bottom-right aligned: with shift = Sk - Sq of the sequence, query position i
// sees key j when j <= i + shift + window_right (has_right; causal is window_right = 0)
// and j >= i + shift - window_left (has_left).
struct AttentionParams {
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_s = 0, q_stride_h = 0;
  const void* k = nullptr;
  int64_t k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  const void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_s = 0, v_stride_h = 0;
  void* out = nullptr;
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
  float* lse = nullptr;
  int64_t lse_stride_b = 0, lse_stride_h = 0, lse_stride_s = 0;
  const int32_t* cu_seqlens_q = nullptr;  // (num_sequences + 1,), both or neither
  const int32_t* cu_seqlens_k = nullptr;
  int num_sequences = 0;
  int batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0, group = 1;
  FastDivisor group_divisor;  // group, for the kernels' divisions: the launchers set it
  float scale = 1.f;       // softmax scale
  float scale_log2 = 1.f;  // scale * log2(e): softmax runs in base 2
  bool has_left = false, has_right = false;
  int window_left = 0, window_right = 0;  // >= 0, clamped below 2^30
  // Forward only: query rows per warp, 16 (8 warps of one 16-row tile) or 32 (4 warps of two
  // tiles; each K/V fragment feeds two mma). See ForwardTraits in attention.cuh.
  int forward_warp_rows = 32;
};

// Backward: dout like out; dq like q, dk / dv like k / v; delta (fp32, lse's strides) is
// workspace the launcher fills with rowsum(dout * out). Without dq_accum, a dK/dV kernel
// writes dk and dv, then a dQ kernel that recomputes the scores writes dq once
// (deterministic). With dq_accum set (fp32, q's shape, contiguous: workspace the launcher
// zeroes), dQ is summed there by atomics in the dK/dV kernel and then converted into dq: no
// recomputation, but the order of the adds, so dq's last bits, vary from run to run, and on
// an H200 (2026-11-28, d = 128, 8K) it was the slower of the two by 1.07-1.10x.
struct AttentionBwdParams : AttentionParams {
  const void* dout = nullptr;
  int64_t dout_stride_b = 0, dout_stride_s = 0, dout_stride_h = 0;
  void* dq = nullptr;
  int64_t dq_stride_b = 0, dq_stride_s = 0, dq_stride_h = 0;
  void* dk = nullptr;
  int64_t dk_stride_b = 0, dk_stride_s = 0, dk_stride_h = 0;
  void* dv = nullptr;
  int64_t dv_stride_b = 0, dv_stride_s = 0, dv_stride_h = 0;
  float* delta = nullptr;
  float* dq_accum = nullptr;
  int64_t dq_accum_stride_b = 0, dq_accum_stride_s = 0, dq_accum_stride_h = 0;
  // Keys per dK/dV program at head_dim 128: 64 (4 warps, each with its keys' scores in
  // registers) or 128 (8 warps sharing P and dS through shared memory, where the device
  // gives a block 162 KB). Other calls take 64. See BwdKeyTraits in attention.cuh.
  int key_block = 64;
  // Without dq_accum: query rows per warp of the dQ kernel, 16 (64-row programs, 64-key
  // tiles) or 32 (128-row programs, 32-key tiles). See BwdQueryTraits in attention.cuh.
  int dq_warp_rows = 16;
};

// A paged KV cache (the layout of vLLM and lmdeploy): the caches are pools of pages
// (num_pages, page_size, Hkv, D), and position j of sequence b is row j % page_size of page
// block_table[b * table_stride + j / page_size], clamped into [0, num_pages) (device values:
// a wrong one must not move an access outside the pool). block_table null: contiguous caches
// (B, S_max, Hkv, D).
struct PagedCache {
  const int32_t* block_table = nullptr;
  int64_t table_stride = 0;
  int num_pages = 0;
  FastDivisor page_size;
};

// fp8 KV caches (torch.float8_e4m3fn / float8_e5m2, vLLM's and lmdeploy's fp8 caches): an
// entry reads as entry * scale and a new one is stored as x / scale, clamped to the format's
// finite range and rounded to nearest even (reference.quantize_fp8). kNone: the caches hold
// the inputs' type, and the scales are unused.
enum class CacheFormat : int { kNone = 0, kE4M3 = 1, kE5M2 = 2 };

struct ScaledCache {
  CacheFormat format = CacheFormat::kNone;
  const float* k_scale = nullptr;  // one per KV head (stride 1), or one for all (stride 0)
  const float* v_scale = nullptr;
  int64_t k_scale_stride = 0, v_scale_stride = 0;
};

// Split-KV decoding over a KV cache (flash-decoding): k / v are the caches (B, S_max, Hkv,
// D), or pools of pages (``paged``); sequence b holds cache_seqlens[b] + new_tokens valid
// entries (the new ones already appended). Each (split, tile, batch, kv head) program writes
// a normalised fp32 partial output and its log2-sum-exp to the workspace; a combine kernel
// merges the splits.
struct AttentionDecodeParams : AttentionParams {
  const int32_t* cache_seqlens = nullptr;  // (B,)
  int new_tokens = 0, capacity = 0;
  RotaryTables rotary;  // q row at position s rotates at cache_seqlens[b] + s (as it loads)
  PagedCache paged;
  ScaledCache fp8;  // k / v entries of one byte (strides in entries, as for any cache)
  int splits = 1, rows_padded = 0;
  float* partial_out = nullptr;  // (B, Hkv, splits, rows_padded, D)
  float* partial_lse = nullptr;  // (B, Hkv, splits, rows_padded)
};

// Decode tiles: 16 packed query rows (decode steps have Sq * group = a few rows).
constexpr int kDecodeBlockM = 16;
constexpr int kDecodeBlockN = 64;

struct DecodeSplits {
  int splits, rows_padded;
};

// How many splits the decode kernel divides each sequence's keys into: as many programs as
// the GPU runs at once (resident_programs: SMs x attention_decode_programs_per_sm), so that
// all of them run in one wave, at most one split per 4 key tiles of the capacity, at most
// 128. The count comes from the capacity (known on the host), never from the lengths (on the
// device), so CUDA graphs replay with new lengths; each program then takes an equal run of
// the key tiles its row tile sees (attention_fwd_kernel), so a short sequence in a long cache
// spreads over as many splits as it has key tiles, not just the first few. (Sized for twice the SM count, a batch of one over a
// 32K cache ran 2 programs per SM and read it at 0.61 of the copy bandwidth on an H200, from
// a CUDA graph; batches that fill every program slot read theirs at 0.98.)
inline DecodeSplits decode_splits(int64_t batch, int64_t heads_kv, int64_t rows, int64_t capacity,
                                  int64_t resident_programs) {
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t tiles = cdiv(rows, kDecodeBlockM);
  const int64_t max_splits = cdiv(capacity, 4 * kDecodeBlockN);
  int64_t splits = resident_programs / (batch * heads_kv * tiles);
  splits = splits < max_splits ? splits : max_splits;
  splits = splits < 128 ? splits : 128;
  splits = splits > 1 ? splits : 1;
  return {static_cast<int>(splits), static_cast<int>(tiles * kDecodeBlockM)};
}

// Head dims with a tensor-core kernel (others are served by Triton under "auto").
constexpr bool attention_head_dim_supported(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

// T: __half or __nv_bfloat16. kHasWindow: some bound (causal or a window) is set; false
// compiles the mask down to the sequence-end test.
template <typename T, int kHeadDim, bool kHasWindow>
cudaError_t launch_attention_fwd(const AttentionParams& params, cudaStream_t stream);

template <typename T, int kHeadDim, bool kHasWindow>
cudaError_t launch_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

template <typename T, int kHeadDim>
cudaError_t launch_attention_decode(const AttentionDecodeParams& params, cudaStream_t stream);

// Decode programs one SM of the current device runs at once (its registers, shared memory and
// threads allow), for decode_splits: the kernel that reads caches of ``format``.
template <typename T, int kHeadDim>
int attention_decode_programs_per_sm(CacheFormat format);

// k_cache[b, cache_seqlens[b] + i] = k[b, i] (rotated at that position when rotary.cos is
// set) and v_cache[b, cache_seqlens[b] + i] = v[b, i], for i < new_tokens, every head, in one
// launch; slots past the capacity are skipped (the decode then reports the sequence as NaN).
struct KvcacheAppendParams {
  const void* k = nullptr;
  int64_t k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  const void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_s = 0, v_stride_h = 0;
  void* k_cache = nullptr;
  int64_t k_cache_stride_b = 0, k_cache_stride_s = 0, k_cache_stride_h = 0;
  void* v_cache = nullptr;
  int64_t v_cache_stride_b = 0, v_cache_stride_s = 0, v_cache_stride_h = 0;
  const int32_t* cache_seqlens = nullptr;
  int batch = 0, new_tokens = 0, heads = 0, head_dim = 0, capacity = 0;
  RotaryTables rotary;
  PagedCache paged;  // the caches' batch strides are then their page strides
  ScaledCache fp8;   // fp8 caches: each entry stored as x / scale, rounded to the format
};

template <typename T>
cudaError_t launch_kvcache_append(const KvcacheAppendParams& params, cudaStream_t stream);

}  // namespace internlm_kernels
