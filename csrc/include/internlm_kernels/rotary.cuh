// Rotary position embedding kernel: q and k in one launch; forward, and backward through
// ``conjugate`` (rotation by the negative angle).
//
// Grid (S, B): one block per token. Each thread resolves the token's position itself (binary
// search of cu_seqlens for packed inputs: lengths are read on the device, so CUDA graphs
// replay correctly with new lengths) after issuing its chunk's loads, so the lookup's latency
// hides under theirs; the same addresses in every thread make those reads broadcasts.
// Threads walk (head, chunk) items over q's heads then k's; a chunk is kVec rotary pairs,
// read and written as 16-byte vectors when aligned (rotate-half: two contiguous halves;
// interleaved: 2 * kVec contiguous values). Offsets are int64.
//
// Out-of-table positions give NaN (never an out-of-bounds read); packed tokens past
// cu_seqlens[-1] are padding and pass through unchanged (copied bit for bit).
#pragma once

#include <cmath>

#include "internlm_kernels/common.cuh"
#include "internlm_kernels/rotary.h"

namespace internlm_kernels {
namespace rotary_detail {

// One block per token, one thread per 16-byte chunk of the rotated half of every q and k
// head (InternLM2-7B: 40 heads x 8 chunks = 320 threads), up to kMaxThreads: every load of
// the token is issued at once. (Fixed 128-thread blocks looped over the chunks, one round
// of load latency after another: 0.68 of copy bandwidth forward on an H200.)
constexpr int kMaxThreads = 512;

inline int threads_for(int64_t chunks) {
  const int64_t warps = (chunks + 31) / 32;
  return static_cast<int>(32 * (warps < 1 ? 1 : warps > kMaxThreads / 32 ? kMaxThreads / 32 : warps));
}

struct Vectorized {  // 16-byte access allowed for: q and q_out together, k and k_out, the tables
  bool q, k, tables;
};

__device__ __forceinline__ int64_t load_index(const void* ptr, bool is_int64, int64_t offset) {
  return is_int64 ? static_cast<const int64_t*>(ptr)[offset] : int64_t(static_cast<const int32_t*>(ptr)[offset]);
}

// Index of the packed sequence holding ``token`` = number of sequence ends <= token.
__device__ __forceinline__ int64_t find_sequence(const int32_t* cu_seqlens, int64_t num_sequences, int64_t token) {
  int64_t low = 0, high = num_sequences;  // answer in [0, num_sequences]
  while (low < high) {
    const int64_t mid = (low + high) / 2;
    if (int64_t(cu_seqlens[mid + 1]) <= token) low = mid + 1;
    else high = mid;
  }
  return low;
}

// One pair (a, b) rotated: (a cos - b sin, b cos + a sin), in fp32 (the caller rounds once).
__device__ __forceinline__ float2 rotate_pair(float a, float b, float cos, float sin) {
  return make_float2(a * cos - b * sin, b * cos + a * sin);
}

// The kVec pairs (a, b) of one chunk, as floats.
template <int kVec>
struct Pairs {
  float a[kVec], b[kVec];
};

template <typename T, bool kInterleaved, int kVec>
__device__ __forceinline__ Pairs<kVec> load_pairs(const T* x, int pair, const RotaryParams& p, bool vec_ok) {
  Pairs<kVec> pairs;
  if constexpr (kInterleaved) {
    float both[2 * kVec];
    load_floats<T, 2 * kVec>(x, 2 * int64_t(pair), 2 * int64_t(p.rotary_half), vec_ok, both);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      pairs.a[i] = both[2 * i];
      pairs.b[i] = both[2 * i + 1];
    }
  } else {  // two loads, both issued before either is converted
    ChunkAhead<T> a, b;
    a.load(x, pair, p.rotary_half, vec_ok);
    b.load(x + p.rotary_half, pair, p.rotary_half, vec_ok);
    a.get(x, pair, p.rotary_half, pairs.a);
    b.get(x + p.rotary_half, pair, p.rotary_half, pairs.b);
  }
  return pairs;
}

template <typename T, bool kInterleaved, int kVec>
__device__ __forceinline__ void store_rotated(T* out, int pair, const RotaryParams& p, bool vec_ok,
                                              const Pairs<kVec>& x, const float (&cos)[kVec],
                                              const float (&sin)[kVec]) {
  float ra[kVec], rb[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float2 rotated = rotate_pair(x.a[i], x.b[i], cos[i], sin[i]);
    ra[i] = rotated.x;
    rb[i] = rotated.y;
  }
  if constexpr (kInterleaved) {
    float both[2 * kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      both[2 * i] = ra[i];
      both[2 * i + 1] = rb[i];
    }
    store_floats<T, 2 * kVec>(out, 2 * int64_t(pair), 2 * int64_t(p.rotary_half), vec_ok, both);
  } else {
    store_floats<T, kVec>(out, pair, p.rotary_half, vec_ok, ra);
    store_floats<T, kVec>(out + p.rotary_half, pair, p.rotary_half, vec_ok, rb);
  }
}

// Where a token sits: its row of the cos/sin tables, and whether it belongs to a sequence
// (packed tokens past cu_seqlens[-1] are padding).
struct TokenPosition {
  int64_t position;
  bool in_sequence;
};

__device__ __forceinline__ TokenPosition token_position(const RotaryParams& p, int64_t token, int64_t batch) {
  int64_t sequence = batch, local = token;
  bool in_sequence = true;
  if (p.cu_seqlens != nullptr) {
    sequence = find_sequence(p.cu_seqlens, p.num_sequences, token);
    in_sequence = sequence < p.num_sequences;
    if (!in_sequence) sequence = p.num_sequences - 1;
    local = token - (sequence >= 0 ? int64_t(p.cu_seqlens[sequence]) : 0);
  }
  int64_t position;
  if (p.position_ids != nullptr) {
    position = load_index(p.position_ids, p.position_ids_int64, batch * p.position_stride_b + token * p.position_stride_s);
  } else {
    position = local + p.seqlen_offset;
    if (p.seqlen_offsets != nullptr && sequence >= 0)
      position += load_index(p.seqlen_offsets, p.seqlen_offsets_int64, sequence);
  }
  return {position, in_sequence};
}

// Copy elements [col, col + N) of a row unchanged (padding tokens, out of place): raw
// 16-byte moves when aligned and in bounds, element by element otherwise.
template <typename T, int N>
__device__ __forceinline__ void copy_elements(const T* src, T* dst, int64_t col, int64_t n_cols, bool vector_ok) {
  static_assert((N * sizeof(T)) % 16 == 0, "chunks are whole 16-byte vectors");
  if (vector_ok && col + N <= n_cols) {
#pragma unroll
    for (int v = 0; v < int(N * sizeof(T) / 16); ++v)
      reinterpret_cast<uint4*>(dst + col)[v] = reinterpret_cast<const uint4*>(src + col)[v];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (col + i < n_cols) dst[col + i] = src[col + i];
  }
}

// The layout is a template parameter and the conjugate flag a sign, so the loop keeps few
// predicates live (with both as run-time flags ptxas spilled predicate registers).
template <typename T, bool kInterleaved>
__global__ void __launch_bounds__(kMaxThreads) rotary_kernel(const RotaryParams p, const Vectorized vec) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t token = blockIdx.x, batch = blockIdx.y;

  const float sin_sign = p.conjugate ? -1.f : 1.f;
  const int chunks_per_head = (p.rotary_half + kVec - 1) / kVec;
  const int items = (p.heads_q + p.heads_k) * chunks_per_head;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int head = item / chunks_per_head;
    const int pair = (item % chunks_per_head) * kVec;
    const bool is_q = head < p.heads_q;
    const T* x;
    T* out;
    if (is_q) {
      x = static_cast<const T*>(p.q) + batch * p.q_stride_b + token * p.q_stride_s + head * p.q_stride_h;
      out = static_cast<T*>(p.q_out) + batch * p.q_out_stride_b + token * p.q_out_stride_s + head * p.q_out_stride_h;
    } else {
      const int64_t h = head - p.heads_q;
      x = static_cast<const T*>(p.k) + batch * p.k_stride_b + token * p.k_stride_s + h * p.k_stride_h;
      out = static_cast<T*>(p.k_out) + batch * p.k_out_stride_b + token * p.k_out_stride_s + h * p.k_out_stride_h;
    }
    const bool vec_ok = is_q ? vec.q : vec.k;
    // The chunk's loads first: nothing about them depends on the position.
    const Pairs<kVec> values = load_pairs<T, kInterleaved, kVec>(x, pair, p, vec_ok);
    const TokenPosition at = token_position(p, token, batch);
    if (!at.in_sequence) {  // padding token: passes through unchanged (nothing to do in place)
      // Tested on the pointers rather than p.inplace: ptxas kept that flag in a predicate
      // for the whole loop and spilled it (4-8 B at fp32).
      if (out != x) {
        if constexpr (kInterleaved) {
          copy_elements<T, 2 * kVec>(x, out, 2 * int64_t(pair), 2 * int64_t(p.rotary_half), vec_ok);
        } else {
          copy_elements<T, kVec>(x, out, pair, p.rotary_half, vec_ok);
          copy_elements<T, kVec>(x + p.rotary_half, out + p.rotary_half, pair, p.rotary_half, vec_ok);
        }
      }
      continue;
    }
    float cos[kVec], sin[kVec];
    if (at.position < 0 || at.position >= p.table_len) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) cos[i] = sin[i] = nanf("");
    } else {
      load_floats<float, kVec>(p.cos + at.position * p.cos_stride, pair, p.rotary_half, vec.tables, cos);
      load_floats<float, kVec>(p.sin + at.position * p.sin_stride, pair, p.rotary_half, vec.tables, sin);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sin[i] *= sin_sign;
    }
    store_rotated<T, kInterleaved, kVec>(out, pair, p, vec_ok, values, cos, sin);
  }

  // Out of place with partial rotary: the features past rotary_dim pass through.
  const int rest = p.head_dim - 2 * p.rotary_half;
  if (p.inplace || rest == 0) return;
  for (int item = threadIdx.x; item < (p.heads_q + p.heads_k) * rest; item += blockDim.x) {
    const int head = item / rest;
    const int64_t d = 2 * p.rotary_half + item % rest;
    if (head < p.heads_q) {
      static_cast<T*>(p.q_out)[batch * p.q_out_stride_b + token * p.q_out_stride_s + head * p.q_out_stride_h + d] =
          static_cast<const T*>(p.q)[batch * p.q_stride_b + token * p.q_stride_s + head * p.q_stride_h + d];
    } else {
      const int64_t h = head - p.heads_q;
      static_cast<T*>(p.k_out)[batch * p.k_out_stride_b + token * p.k_out_stride_s + h * p.k_out_stride_h + d] =
          static_cast<const T*>(p.k)[batch * p.k_stride_b + token * p.k_stride_s + h * p.k_stride_h + d];
    }
  }
}

}  // namespace rotary_detail

// Rotary inside another kernel (the KV-cache calls rotate q and the new k as they move them):
// the 16 bytes of ``row`` (head_dim values of T, 16-byte aligned) from ``col`` on, rotated by
// table row ``position`` with rotate_pair and one rounding, as rotary_kernel does. NaN
// outside the table; features past 2 * rotary_half pass through.
template <typename T>
__device__ __forceinline__ uint4 rotated_chunk(const T* row, int col, int64_t position, const RotaryTables& r) {
  constexpr int kPerChunk = 16 / sizeof(T);
  uint4 chunk = *reinterpret_cast<const uint4*>(row + col);
  if (col >= 2 * r.rotary_half) return chunk;
  const bool in_table = position >= 0 && position < r.table_len;
  T* values = reinterpret_cast<T*>(&chunk);
#pragma unroll
  for (int e = 0; e < kPerChunk; ++e) {
    const int d = col + e;
    if (d >= 2 * r.rotary_half) break;
    // d pairs with ``partner`` at table column j; d is the pair's first member or its second.
    int j, partner;
    bool first;
    if (r.interleaved) {
      j = d / 2, partner = d ^ 1, first = (d % 2) == 0;
    } else {
      first = d < r.rotary_half;
      j = first ? d : d - r.rotary_half;
      partner = first ? d + r.rotary_half : j;
    }
    const float x = to_float(values[e]), other = to_float(row[partner]);
    float rotated = nanf("");
    if (in_table) {
      const float cos = r.cos[position * r.cos_stride + j], sin = r.sin[position * r.sin_stride + j];
      rotated = first ? rotary_detail::rotate_pair(x, other, cos, sin).x
                    : rotary_detail::rotate_pair(other, x, cos, sin).y;
    }
    values[e] = from_float<T>(rotated);
  }
  return chunk;
}

template <typename T>
cudaError_t launch_rotary(const RotaryParams& p, cudaStream_t stream) {
  using namespace rotary_detail;
  if (p.batch == 0 || p.seqlen == 0 || p.heads_q + p.heads_k == 0) return cudaSuccess;
  // The half layout reads each half as vectors, so the half width must keep alignment too.
  const int64_t half_bytes = int64_t(p.rotary_half) * sizeof(T);
  const bool halves_ok = p.interleaved || half_bytes % 16 == 0;
  auto tensor_ok = [&](const void* ptr, int64_t sb, int64_t ss, int64_t sh) {
    return vectorizable(ptr, sizeof(T), sb, ss) && vectorizable(ptr, sizeof(T), sh);
  };
  Vectorized vec{};
  vec.q = halves_ok && tensor_ok(p.q, p.q_stride_b, p.q_stride_s, p.q_stride_h) &&
          tensor_ok(p.q_out, p.q_out_stride_b, p.q_out_stride_s, p.q_out_stride_h);
  vec.k = halves_ok && (p.heads_k == 0 || (tensor_ok(p.k, p.k_stride_b, p.k_stride_s, p.k_stride_h) &&
                                           tensor_ok(p.k_out, p.k_out_stride_b, p.k_out_stride_s, p.k_out_stride_h)));
  vec.tables = vectorizable(p.cos, sizeof(float), p.cos_stride) && vectorizable(p.sin, sizeof(float), p.sin_stride);
  if (p.batch > 65535) return cudaErrorInvalidConfiguration;  // grid.y limit; the glue checks it first
  const dim3 grid(unsigned(p.seqlen), unsigned(p.batch));
  constexpr int kVec = Vec<T>::kSize;
  const dim3 block(threads_for((p.heads_q + p.heads_k) * ((p.rotary_half + kVec - 1) / kVec)));
  if (p.interleaved) return launch_kernel(rotary_kernel<T, true>, grid, block, 0, stream, p, vec);
  return launch_kernel(rotary_kernel<T, false>, grid, block, 0, stream, p, vec);
}

}  // namespace internlm_kernels
