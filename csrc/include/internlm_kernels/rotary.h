// Rotary position embedding: parameter struct and launcher declaration (plain C++).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "internlm_kernels/common.h"

namespace internlm_kernels {

// q and k are (B, S, H, D) views with any strides (elements) and a contiguous last dim;
// packed inputs are (1, T, H, D) with cu_seqlens. k may have no heads. q_out / k_out may be
// q / k (in place). The first 2 * rotary_half features rotate; the rest pass through
// (copied only when out of place). Positions: position_ids[b, s] when given, else the token's
// index in its sequence + seqlen_offset (+ seqlen_offsets[sequence] when given).
struct RotaryParams {
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_s = 0, q_stride_h = 0;
  void* q_out = nullptr;
  int64_t q_out_stride_b = 0, q_out_stride_s = 0, q_out_stride_h = 0;
  const void* k = nullptr;
  int64_t k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  void* k_out = nullptr;
  int64_t k_out_stride_b = 0, k_out_stride_s = 0, k_out_stride_h = 0;
  const float* cos = nullptr;  // (table_len, rotary_half) fp32, row stride cos_stride
  const float* sin = nullptr;
  int64_t cos_stride = 0, sin_stride = 0, table_len = 0;
  const void* position_ids = nullptr;  // int32 or int64, (B, S) with strides
  bool position_ids_int64 = true;
  int64_t position_stride_b = 0, position_stride_s = 0;
  const void* seqlen_offsets = nullptr;  // int32 or int64, (B,)
  bool seqlen_offsets_int64 = true;
  int64_t seqlen_offset = 0;
  const int32_t* cu_seqlens = nullptr;  // (num_sequences + 1,) for packed inputs
  int64_t num_sequences = 0;
  int64_t batch = 0, seqlen = 0;
  int heads_q = 0, heads_k = 0, head_dim = 0, rotary_half = 0;
  bool interleaved = false, conjugate = false, inplace = false;
};

// Rotary inside another kernel (the KV-cache calls rotate q and the new k on the fly):
// cos / sin (table_len, rotary_half) fp32 with row strides; no rotary when cos is null.
struct RotaryTables {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t cos_stride = 0, sin_stride = 0, table_len = 0;
  int rotary_half = 0;
  bool interleaved = false;
};

// The kernel's work items: one 16-byte chunk of the rotary half of kRotaryHeadsPerThread q or
// k heads of one token, in blocks of up to kRotaryMaxThreads; a token with more items takes
// several blocks, on the grid's z axis (at most 65535).
constexpr int kRotaryMaxThreads = 256;
constexpr int kRotaryHeadsPerThread = 2;

inline int64_t rotary_item_blocks(int64_t heads_q, int64_t heads_k, int64_t rotary_half, int64_t element_bytes) {
  const int64_t per_chunk = 16 / element_bytes;
  const int64_t head_groups = (heads_q + kRotaryHeadsPerThread - 1) / kRotaryHeadsPerThread +
                              (heads_k + kRotaryHeadsPerThread - 1) / kRotaryHeadsPerThread;
  const int64_t items = head_groups * ((rotary_half + per_chunk - 1) / per_chunk);
  return items > 0 ? (items + kRotaryMaxThreads - 1) / kRotaryMaxThreads : 1;
}

template <typename T>
cudaError_t launch_rotary(const RotaryParams& params, cudaStream_t stream);

}  // namespace internlm_kernels
