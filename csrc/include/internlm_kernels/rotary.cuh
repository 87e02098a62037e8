// Rotary position embedding kernel: q and k in one launch; forward, and backward through
// ``conjugate`` (rotation by the negative angle).
//
// Grid (S, B, item blocks): a token's work in one block (several when it has more than
// kMaxThreads items). Each thread resolves the token's position itself (binary search of
// cu_seqlens for packed inputs: lengths are read on the device, so CUDA graphs replay
// correctly with new lengths) after issuing its chunks' loads, so the lookup's latency hides
// under theirs; the same addresses in every thread make those reads broadcasts.
// Threads walk (head group, chunk) items over q's heads then k's: a chunk is kVec rotary
// pairs at the same columns of kHeadsPerThread heads, which share one load of the cos / sin
// chunk. Chunks are read and written as 16-byte vectors when aligned (rotate-half: two
// contiguous halves; interleaved: 2 * kVec contiguous values). Offsets are int64.
//
// Out-of-table positions give NaN (never an out-of-bounds read); packed tokens past
// cu_seqlens[-1] are padding and pass through unchanged (copied bit for bit).
#pragma once

#include <cmath>

#include "internlm_kernels/common.cuh"
#include "internlm_kernels/rotary.h"

namespace internlm_kernels {
namespace rotary_detail {

// One thread per 16-byte chunk of the rotated half of kHeadsPerThread q or k heads
// (InternLM2-7B: 40 heads / 2 x 8 chunks = 160 threads), in blocks of up to kMaxThreads for
// one token: every load of the token is issued at once. (Fixed 128-thread blocks looped over
// the chunks, one round of load latency after another: 0.68 of copy bandwidth forward on an
// H200.) With one head per thread, 0.67 on the H200 (2026-11-28): its 64 registers let 3
// blocks of 320 threads reside per SM, each thread with 32 B of q / k in flight, while the
// fp32 cos / sin chunk, loaded again for every head, took as many registers as the data.
// Two heads per thread carry twice the bytes in flight for the same cos / sin registers.
// Registers: kMaxRegisters, not __launch_bounds__. Given the largest block, ptxas spilled to
// let two or three such blocks reside, blocks far larger than a token's items usually need;
// at 64, 6 blocks of 160 threads reside per SM, with no spills in any instantiation (sm_80,
// sm_90a). A token with more than kMaxThreads items takes several blocks (grid z).
constexpr int kMaxThreads = kRotaryMaxThreads;
constexpr int kMaxRegisters = 64;
constexpr int kHeadsPerThread = kRotaryHeadsPerThread;

// Threads of a block for ``items`` work items: whole warps, at most kMaxThreads.
inline int threads_for(int64_t items) {
  const int64_t warps = (items + 31) / 32;
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

// Where one head's chunk of kVec pairs lies in its row: two 16-byte chunks, the pairs' first
// and second members (rotate-half) or the 2 * kVec interleaved values (interleaved).
template <typename T, bool kInterleaved>
__device__ __forceinline__ int64_t second_chunk_offset(const RotaryParams& p) {
  return kInterleaved ? Vec<T>::kSize : p.rotary_half;
}

template <typename T, bool kInterleaved>
__device__ __forceinline__ int64_t first_chunk_offset(int pair) {
  return kInterleaved ? 2 * int64_t(pair) : int64_t(pair);
}

// The raw bits of one head's two chunks, loaded ahead of their use (see ChunkAhead).
struct RawChunks {
  uint4 first, second;
};

template <typename T, bool kInterleaved>
__device__ __forceinline__ RawChunks load_raw_chunks(const T* x, int pair, const RotaryParams& p) {
  const T* chunk = x + first_chunk_offset<T, kInterleaved>(pair);
  return {load_global<uint4>(chunk), load_global<uint4>(chunk + second_chunk_offset<T, kInterleaved>(p))};
}

// The chunk's kVec pairs as floats: from raw bits loaded ahead (``whole``), or element-wise
// from memory with bounds tests (misaligned rows, or the last chunk of a rotary half that is
// not a whole number of chunks).
template <typename T, bool kInterleaved, int kVec>
__device__ __forceinline__ Pairs<kVec> pairs_of(const RawChunks& raw, bool whole, const T* x, int pair,
                                                const RotaryParams& p) {
  Pairs<kVec> pairs;
  if constexpr (kInterleaved) {
    float both[2 * kVec];
    if (whole) {
      float first[kVec], second[kVec];
      unpack_floats<T>(raw.first, first);
      unpack_floats<T>(raw.second, second);
#pragma unroll
      for (int i = 0; i < kVec; ++i) both[i] = first[i], both[kVec + i] = second[i];
    } else {
      load_floats<T, 2 * kVec>(x, 2 * int64_t(pair), 2 * int64_t(p.rotary_half), false, both);
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      pairs.a[i] = both[2 * i];
      pairs.b[i] = both[2 * i + 1];
    }
  } else if (whole) {
    unpack_floats<T>(raw.first, pairs.a);
    unpack_floats<T>(raw.second, pairs.b);
  } else {
    load_floats<T, kVec>(x, pair, p.rotary_half, false, pairs.a);
    load_floats<T, kVec>(x + p.rotary_half, pair, p.rotary_half, false, pairs.b);
  }
  return pairs;
}

template <typename T, bool kInterleaved, int kVec>
__device__ __forceinline__ void store_rotated(T* out, int pair, const RotaryParams& p, int64_t half_bound,
                                              bool vec_ok, const Pairs<kVec>& x, const float (&cos)[kVec],
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
    store_floats<T, 2 * kVec>(out, 2 * int64_t(pair), 2 * half_bound, vec_ok, both);
  } else {
    store_floats<T, kVec>(out, pair, half_bound, vec_ok, ra);
    store_floats<T, kVec>(out + p.rotary_half, pair, half_bound, vec_ok, rb);
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

// Copy elements [col, col + N) of a row unchanged, element by element with bounds tests (a
// padding token's chunk that is not a whole 16-byte vector).
template <typename T, int N>
__device__ __forceinline__ void copy_elements(const T* src, T* dst, int64_t col, int64_t n_cols) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (col + i < n_cols) dst[col + i] = src[col + i];
}

// Counts of the kernel's work items: (head group, chunk) pairs, q's groups first.
struct RotaryItems {
  int chunks_per_head, q_groups, count;
};

template <typename T>
__host__ __device__ __forceinline__ RotaryItems rotary_items(const RotaryParams& p) {
  constexpr int kVec = Vec<T>::kSize;
  RotaryItems items;
  items.chunks_per_head = (p.rotary_half + kVec - 1) / kVec;
  items.q_groups = (p.heads_q + kHeadsPerThread - 1) / kHeadsPerThread;
  items.count = (items.q_groups + (p.heads_k + kHeadsPerThread - 1) / kHeadsPerThread) * items.chunks_per_head;
  return items;
}

// One work item: kVec pairs at the same columns of up to kHeadsPerThread heads of one token.
// The layout is a template parameter and the conjugate flag a sign, so the code keeps few
// predicates live (with both as run-time flags ptxas spilled predicate registers). kAligned:
// every chunk is whole 16-byte vectors (the launcher checked q, k, their outputs and the
// tables), so the kernel holds no element-wise path, whose registers ptxas would reserve
// for the whole kernel.
template <typename T, bool kInterleaved, bool kAligned>
__device__ __forceinline__ void rotate_item(const RotaryParams& p, const Vectorized& vec, int64_t token, int64_t batch,
                                            const RotaryItems& items, int item) {
  constexpr int kVec = Vec<T>::kSize;
  const float sin_sign = p.conjugate ? -1.f : 1.f;
  const int chunks_per_head = items.chunks_per_head, q_groups = items.q_groups;
  const int group = item / chunks_per_head;
  const int pair = (item % chunks_per_head) * kVec;
  // Where the rotary half ends, as this chunk's bounds tests see it. Aligned, the half is whole
  // chunks, so the chunk's own end: the tests fold away at compile time.
  const int64_t half_bound = kAligned ? int64_t(pair) + kVec : int64_t(p.rotary_half);
  const bool is_q = group < q_groups;
  const int first_head = (is_q ? group : group - q_groups) * kHeadsPerThread;
  const int heads = (is_q ? p.heads_q : p.heads_k) - first_head;  // of this group: 1 to kHeadsPerThread
  const T* x;
  T* out;
  int64_t x_stride_h, out_stride_h;
  if (is_q) {
    x = static_cast<const T*>(p.q) + batch * p.q_stride_b + token * p.q_stride_s + first_head * p.q_stride_h;
    out = static_cast<T*>(p.q_out) + batch * p.q_out_stride_b + token * p.q_out_stride_s +
          first_head * p.q_out_stride_h;
    x_stride_h = p.q_stride_h, out_stride_h = p.q_out_stride_h;
  } else {
    x = static_cast<const T*>(p.k) + batch * p.k_stride_b + token * p.k_stride_s + first_head * p.k_stride_h;
    out = static_cast<T*>(p.k_out) + batch * p.k_out_stride_b + token * p.k_out_stride_s +
          first_head * p.k_out_stride_h;
    x_stride_h = p.k_stride_h, out_stride_h = p.k_out_stride_h;
  }
  // Every head of the group takes the vector path or none: same columns, same row layout.
  const bool whole = kAligned || ((is_q ? vec.q : vec.k) && pair + kVec <= p.rotary_half);
  // The chunks' loads first: nothing about them depends on the position.
  RawChunks raw[kHeadsPerThread];
  if (whole) {
#pragma unroll
    for (int h = 0; h < kHeadsPerThread; ++h)
      if (h < heads) raw[h] = load_raw_chunks<T, kInterleaved>(x + h * x_stride_h, pair, p);
  }
  const TokenPosition at = token_position(p, token, batch);
  if (!at.in_sequence) {  // padding token: passes through unchanged (nothing to do in place)
    // Tested on the pointers rather than p.inplace: ptxas kept that flag in a predicate
    // throughout and spilled it (4-8 B at fp32).
    if (out != x) {
#pragma unroll
      for (int h = 0; h < kHeadsPerThread; ++h) {
        if (h < heads && whole) {  // the chunks are loaded already
          T* dst = out + h * out_stride_h + first_chunk_offset<T, kInterleaved>(pair);
          store_global(dst, raw[h].first);
          store_global(dst + second_chunk_offset<T, kInterleaved>(p), raw[h].second);
        } else if (h < heads) {
          const T* src = x + h * x_stride_h;
          T* dst = out + h * out_stride_h;
          if constexpr (kInterleaved) {
            copy_elements<T, 2 * kVec>(src, dst, 2 * int64_t(pair), 2 * int64_t(p.rotary_half));
          } else {
            copy_elements<T, kVec>(src, dst, pair, p.rotary_half);
            copy_elements<T, kVec>(src + p.rotary_half, dst + p.rotary_half, pair, p.rotary_half);
          }
        }
      }
    }
    return;
  }
  float cos[kVec], sin[kVec];
  if (at.position < 0 || at.position >= p.table_len) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) cos[i] = sin[i] = nanf("");
  } else {
    const bool tables_whole = kAligned || vec.tables;
    load_floats<float, kVec>(p.cos + at.position * p.cos_stride, pair, half_bound, tables_whole, cos);
    load_floats<float, kVec>(p.sin + at.position * p.sin_stride, pair, half_bound, tables_whole, sin);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sin[i] *= sin_sign;
  }
#pragma unroll
  for (int h = 0; h < kHeadsPerThread; ++h) {
    if (h < heads) {
      const Pairs<kVec> values = pairs_of<T, kInterleaved, kVec>(raw[h], whole, x + h * x_stride_h, pair, p);
      store_rotated<T, kInterleaved, kVec>(out + h * out_stride_h, pair, p, half_bound, whole, values, cos, sin);
    }
  }
}

// Grid (S, B, item blocks): one thread per work item, so no thread loops. (A loop over items
// kept its bound and the table address live across the body, which ptxas spilled on sm_80.)
template <typename T, bool kInterleaved, bool kAligned>
__global__ void __maxnreg__(kMaxRegisters) rotary_kernel(const RotaryParams p, const Vectorized vec) {
  const int64_t token = blockIdx.x, batch = blockIdx.y;
  const RotaryItems items = rotary_items<T>(p);
  const int item = int(blockIdx.z * blockDim.x + threadIdx.x);
  if (item < items.count) rotate_item<T, kInterleaved, kAligned>(p, vec, token, batch, items, item);
  if (blockIdx.z != 0) return;

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
  uint4 chunk = load_global<uint4>(row + col);
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
  if (p.batch > kMaxGridYZ) return cudaErrorInvalidConfiguration;  // grid.y limit; the glue checks it first
  constexpr int kVec = Vec<T>::kSize;
  const int items = rotary_items<T>(p).count;
  const dim3 block(threads_for(items));
  // At least one item block: its threads also copy the features past rotary_dim, all of them
  // with zero-width tables (an empty grid would not launch).
  const int64_t item_blocks = items > 0 ? (items + block.x - 1) / block.x : 1;  // rotary_item_blocks
  if (item_blocks > kMaxGridYZ) return cudaErrorInvalidConfiguration;  // grid.z limit; the glue checks it first
  const dim3 grid(unsigned(p.seqlen), unsigned(p.batch), unsigned(item_blocks));
  const bool aligned = vec.q && vec.k && vec.tables && p.rotary_half % kVec == 0;
  if (p.interleaved) {
    return aligned ? launch_kernel(rotary_kernel<T, true, true>, grid, block, 0, stream, p, vec)
                   : launch_kernel(rotary_kernel<T, true, false>, grid, block, 0, stream, p, vec);
  }
  return aligned ? launch_kernel(rotary_kernel<T, false, true>, grid, block, 0, stream, p, vec)
                 : launch_kernel(rotary_kernel<T, false, false>, grid, block, 0, stream, p, vec);
}

}  // namespace internlm_kernels
