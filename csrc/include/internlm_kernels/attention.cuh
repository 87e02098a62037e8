// Fused attention on tensor cores (FlashAttention-2 style): forward, backward (dK/dV and dQ
// kernels, or dK/dV with dQ by atomics), split-KV decoding with its combine kernel, and the
// KV-cache append.
//
// Work split. Query rows are "packed" as in the Triton kernels: row r of a sequence is query
// position r / group of query head kv_head * group + r % group, so a program owns one KV
// head and a tile of its group's rows, and every K/V tile it loads serves the whole group
// (GQA/MQA without repeating K/V; a decode step with 1 position still fills 8 rows with
// group 8). Programs: forward per tile of packed rows; dK/dV per tile of keys (summed over
// the group's rows, so dK and dV never need atomics; it takes them as tiles of one query
// head's consecutive positions, which load as simply as K and V); decode per (split of the
// cache, row tile). dQ comes two ways. By default a dQ program per tile of packed rows
// recomputes S and dP and writes dQ once (7 products per tile pair over the two kernels;
// deterministic; on an H200 the faster of the two). On request, as in FlashAttention-2, the
// dK/dV program also multiplies its dS by K and adds the result into an fp32 dQ with atomics
// (5 products per tile pair; the order of the adds varies, so the last bits of dQ do too).
//
// Inside a program, each warp owns 16-row slabs of the output tile and runs mma.sync
// m16n8k16 with fp32 accumulators (mma.cuh: fragment layouts); the dK/dV program's other
// layout (BwdKeySharedTraits) splits S and dP over rows and keys and shares P and dS
// through shared memory, as FlashAttention-2 does. Operands stream from global
// memory through a two-stage cp.async ring in shared memory (the next tile loads while the
// tensor cores work on the current one; one barrier per tile); ldmatrix reads them from XOR-swizzled tiles, so
// neither side has bank conflicts. The softmax runs in base 2 with the scale folded into one
// multiply; P goes from the score accumulators straight into the A operand of P V.
//
// Masks are bottom-right aligned (attention.h). Key tiles every row of a query tile sees in
// full skip the mask; tiles nobody sees are never loaded. Packed (varlen) programs find
// their sequence by a warp-wide scan of cu_seqlens on the device, so no host sync and no
// max_seqlen are needed and CUDA graphs replay with new lengths.
//
// A Hopper path (wgmma + TMA) would be another traits/kernel pair behind the same launchers.
// The same source runs on the CPU under emulation.h (tests/test_cuda_emulation.py), which is
// how CI checks fragment layouts, indexing and masks without a GPU.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "internlm_kernels/attention.h"
#include "internlm_kernels/common.cuh"
#include "internlm_kernels/mma.cuh"
#include "internlm_kernels/rotary.cuh"

namespace internlm_kernels {
namespace attention_detail {

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// Tile shapes
// ---------------------------------------------------------------------------------------

// A program's tile: kBlockM rows (queries, or keys for dK/dV) split over kWarpsM warps, a
// stream of kBlockN-row tiles of the other operand, split over kWarpsN warps (decode only:
// its row tile is small, so the warps share the keys and merge at the end).
// kScoresInShared (dK/dV only): the warps split S and dP over both dimensions and share P
// and dS through shared memory (FlashAttention-2's backward), rather than each warp holding
// its own keys' scores in registers.
template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarpsM_, int kWarpsN_,
          bool kScoresInShared_ = false>
struct TileTraits {
  using T = T_;
  static constexpr bool kScoresInShared = kScoresInShared_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpRows = kBlockM / kWarpsM;  // rows of one warp
  static constexpr int kMTiles = kWarpRows / 16;       // 16-row mma tiles of one warp
  static constexpr int kWarpKeys = kBlockN / kWarpsN;  // streamed rows one warp multiplies with
  static constexpr int kNTiles = kWarpKeys / 8;        // 8-column accumulator tiles of S
  static constexpr int kDimTiles = kHeadDim / 8;       // 8-column accumulator tiles of O / dQ / dK / dV
  static constexpr int kKSteps = kHeadDim / 16;        // k steps of a product over the head dim
  using RowTile = mma::SwizzledTile<kBlockM, kHeadDim>;
  using StreamTile = mma::SwizzledTile<kBlockN, kHeadDim>;
  static_assert(kWarpRows % 16 == 0 && kWarpKeys % 16 == 0, "warps own whole 16-row / 16-key mma tiles");
  static_assert(kHeadDim % 64 == 0, "head_dim 64 or 128 (the swizzle spans 64 values)");
};

// Forward: 128 query rows x 64 keys; shared memory Q + 2 stages of K and V = 96 KB at
// d = 128. Two warp layouts, chosen at run time (AttentionParams::forward_warp_rows); ptxas
// (CUDA 13.0, sm_80 and sm_90a, bf16 and fp16):
//  * 8 warps of one 16-row tile: 131 (sm_90a) / 166 (sm_80) registers at d = 128 without a
//    window compiled in, 167-174 with one; 123-128 at d = 64; no spills. Every warp reads all
//    of K and V from shared memory for its 16 rows.
//  * 4 warps of two 16-row tiles: each K / V fragment feeds two mma, halving the shared
//    memory reads per flop (FlashAttention-2's layout). 174 (sm_90a) / 213 (sm_80) registers
//    at d = 64 without a window, 220-228 with one; 254-255 at d = 128, with no spills except
//    on sm_80 with a window: 48 B stored, 40 B loaded (a few reloads from L1 per 64-key tile,
//    next to its 256 mma; the epilogue finds the program's tile again there, see the kernel).
// The second is the default: on an H200 (2026-11-27; B 2 x S 8192, 32 / 8 heads, d 128) it
// ran the full forward 1.28x faster and the causal one as fast, spills included. The first
// stays selectable (INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS=16; benchmark provider
// cuda_warp_rows16).
template <typename T, int kHeadDim, int kWarpRows = 32>
using ForwardTraits = TileTraits<T, kHeadDim, 128, 64, 128 / kWarpRows, 1>;

// Decode: one 16-row tile (a few positions x the group), 4 warps sharing each 64-key tile.
template <typename T, int kHeadDim>
using DecodeTraits = TileTraits<T, kHeadDim, kDecodeBlockM, kDecodeBlockN, 1, 4>;

// dK/dV, two layouts (AttentionBwdParams::key_block).
// 64 keys, 4 warps of 16 keys, each holding its keys' scores (S^T, dP^T) in registers, x
// tiles of query rows: at d = 128 the fp32 dK and dV slabs take 128 registers per thread, so
// the row tiles are 32 rows there and 64 at d = 64. Shared memory K + V + 2 stages of Q and
// dO + row info: 65 KB at d = 128, 50 KB at d = 64; the atomic-dQ variant adds its dS tile
// (4 KB / 8 KB). ptxas (CUDA 13.0, bf16 and fp16), no spills: sm_90a 249-251 registers at
// d = 128 (2 blocks per SM) and 168 at d = 64 (3 blocks; 176-226 with the atomic dQ, 2);
// sm_80 249-255 and 212-224 (2 blocks). The launch bounds ask for three blocks at d = 64 on
// sm_90a (key_tile_min_blocks).
template <typename T, int kHeadDim>
using BwdKeyTraits = TileTraits<T, kHeadDim, 64, (kHeadDim <= 64 ? 64 : 32), 4, 1>;

// 128 keys x 64-row tiles, 8 warps, scores shared (FlashAttention-2's layout at d = 128):
// per tile, warp (w % 2, w / 2) computes S and dP for 32 rows x 32 keys, P and dS go to
// shared memory, then warp (w % 4, w / 4) adds 32 keys x d/2 of dV and dK, and warp (w % 2,
// w / 2) 32 rows x d/4 of dQ. Per mma, about 30% fewer shared-memory reads than the layout
// above (each fragment feeds two mma), and per flop half the Q / dO loads and dQ atomics;
// one block of 8 warps per SM. Shared memory at d = 128: K, V, 2 stages of Q and dO, P, dS
// and row info, 162 KB (the launcher checks the device's opt-in limit). ptxas (CUDA 13.0):
// 246-255 registers, no spills on sm_90a; with atomic dQ on sm_80, 4 B stored and 8 B
// loaded without a window, 24 and 16 with one (none without the atomic dQ). In the SASS (sm_90a, bf16) a warp executes
// about 1060 instructions for a mask-free row tile of 320 mma with the atomic dQ, against
// 650 for 160 in the layout above. Selected at d = 128 only.
template <typename T, int kHeadDim>
using BwdKeySharedTraits = TileTraits<T, kHeadDim, 128, 64, 8, 1, true>;

// dQ, two warp layouts (AttentionBwdParams::dq_warp_rows), 4 warps either way:
//  * 16 rows per warp (the default): 64 query rows x 64-key tiles. Every warp reads all of
//    each K / V tile from shared memory for its 16 rows.
//  * 32 rows per warp: 128 query rows x 32-key tiles. Each K / V fragment feeds two mma, as
//    in the forward's default layout: per tile a warp reads 80 ldmatrix.x4 for its 192 mma
//    (d = 128) where the first reads 112. The keys per tile are halved so that S and dP (a
//    warp's rows x the tile's keys) stay at 64 registers beside the 128 of its fp32 dQ rows
//    at d = 128, and so that Q, dO and two stages of K and V (96 KB at d = 128) leave room
//    for two blocks per SM on sm_90; a warp still does 192 mma between two barriers.
// Shared memory, with the rows' info: 97 / 98 KB at d = 128, 49 / 50 KB at d = 64. ptxas
// (CUDA 13.0, bf16 and fp16, no spills), 16 / 32 rows per warp: sm_90a 200-213 / 249-255
// registers at d = 128 and 152-166 / 188-204 at d = 64; sm_80 195-209 / 252-255 and
// 149-163 / 183-190. So on sm_90 two blocks per SM at d = 128 either way (one on sm_80, whose
// SMs have 164 KB of shared memory); at d = 64, three of the first and two of the second.
// The kernel asks for at least one block per SM in its launch bounds: without it, ptxas held
// the d = 64 kernels to 128 or 168 registers and spilled 8-36 B to fit more.
template <typename T, int kHeadDim, int kWarpRows = 16>
using BwdQueryTraits = TileTraits<T, kHeadDim, 4 * kWarpRows, (kWarpRows == 16 ? 64 : 32), 4, 1>;

// ---------------------------------------------------------------------------------------
// Where a program works: sequence bounds, visible keys
// ---------------------------------------------------------------------------------------

// Tokens [begin, end) of packed sequence s, clamped into [0, total] with end >= begin. The
// cu_seqlens values are the caller's and go unchecked on the host (reading them there would
// sync the stream and stop CUDA graphs replaying with new lengths): clamped, a wrong one
// cannot move a load or a store outside the tensors. Valid ones pass unchanged.
struct PackedSpan {
  int begin, end;
};

__device__ __forceinline__ PackedSpan packed_span(const int32_t* cu_seqlens, int s, int total) {
  const int begin = min(max(cu_seqlens[s], 0), total);
  return {begin, min(max(cu_seqlens[s + 1], begin), total)};
}

// (sequence, tile within it) of the flattened tile index ``tile`` of a packed batch of
// ``total`` tokens whose sequence s has cdiv(len_s * rows_per_position, block) tiles;
// sequence == num_sequences past the last tile. Every lane of the calling warp gets the same
// answer.
__device__ __forceinline__ void locate_tile(const int32_t* cu_seqlens, int num_sequences, int total, int tile,
                                            int rows_per_position, int block, int& sequence, int& local_tile) {
  const int lane = threadIdx.x % 32;
  int before = 0;  // tiles of the sequences already scanned
  for (int base = 0; base < num_sequences; base += 32) {
    const int s = base + lane;
    int tiles = 0;
    if (s < num_sequences) {
      const PackedSpan span = packed_span(cu_seqlens, s, total);
      const int64_t rows = int64_t(span.end - span.begin) * rows_per_position;
      tiles = static_cast<int>((rows + block - 1) / block);
    }
    int inclusive = tiles;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    // Inclusive counts never decrease, so the first lane past ``tile`` is a non-empty sequence.
    const unsigned hit = __ballot_sync(kFullMask, before + inclusive > tile);
    if (hit != 0) {
      const int first = __ffs(hit) - 1;
      const int exclusive = __shfl_sync(kFullMask, inclusive - tiles, first);
      sequence = base + first;
      local_tile = tile - before - exclusive;
      return;
    }
    before += __shfl_sync(kFullMask, inclusive, 31);
  }
  sequence = num_sequences;
  local_tile = 0;
}

struct ProgramTile {
  int tile;                 // row tile (or key tile) within the sequence
  int64_t batch, kv_head;   // grid coordinates
  int64_t q_start, k_start; // first token of the sequence in the (packed) tensors
  int q_len, k_len;         // 0 when the program has no sequence
};

// The grid is (tiles, B, Hkv) for dense inputs and (total tiles + sequences, 1, Hkv) for
// packed ones. ``tile_keys``: tiles count keys (dK/dV) instead of packed query rows.
__device__ __forceinline__ ProgramTile program_tile(const AttentionParams& p, bool tile_keys, int block) {
  ProgramTile t;
  // Under a causal mask the last query tiles see the most keys: they go first (the GPU starts
  // blocks in index order), so the light tiles, not the heavy ones, fill the last wave.
  // Key tiles (dK/dV) are already heaviest first.
  t.tile = tile_keys ? blockIdx.x : gridDim.x - 1 - blockIdx.x;
  t.batch = blockIdx.y;
  t.kv_head = blockIdx.z;
  t.q_start = t.k_start = 0;
  t.q_len = p.seqlen_q;
  t.k_len = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    int sequence = 0;
    locate_tile(tile_keys ? p.cu_seqlens_k : p.cu_seqlens_q, p.num_sequences, tile_keys ? p.seqlen_k : p.seqlen_q,
                blockIdx.x, tile_keys ? 1 : p.group, block, sequence, t.tile);
    if (sequence >= p.num_sequences) {
      t.q_len = t.k_len = 0;
      return t;
    }
    const PackedSpan q = packed_span(p.cu_seqlens_q, sequence, p.seqlen_q);
    const PackedSpan k = packed_span(p.cu_seqlens_k, sequence, p.seqlen_k);
    t.q_start = q.begin, t.q_len = q.end - q.begin;
    t.k_start = k.begin, t.k_len = k.end - k.begin;
  }
  return t;
}

// Keys [x, y] query position ``pos`` sees (empty when y < x). Bounds never decrease with
// the position, which the tile-range functions below rely on.
template <bool kHasWindow>
__device__ __forceinline__ int2 visible_keys(const AttentionParams& p, int pos, int k_len, int shift) {
  int first = 0, last = k_len - 1;
  if constexpr (kHasWindow) {
    const int64_t anchor = int64_t(pos) + shift;
    if (p.has_right) last = static_cast<int>(max(min(anchor + p.window_right, int64_t(last)), int64_t(-1)));
    if (p.has_left) first = static_cast<int>(min(max(anchor - p.window_left, int64_t(0)), int64_t(k_len)));
  }
  return make_int2(first, last);
}

// Key tiles a tile of query positions [pos_first, pos_last] touches: [lo, hi), and [full_lo,
// full_hi), the keys every position of the tile sees (tiles inside it need no mask).
struct KeyRange {
  int lo, full_lo, full_hi, hi;
  __device__ __forceinline__ bool needs_mask(int n0, int block) const {
    return !(n0 >= full_lo && n0 + block <= full_hi);
  }
};

template <bool kHasWindow, int kBlockN>
__device__ __forceinline__ KeyRange key_range(const AttentionParams& p, int pos_first, int pos_last, int k_len,
                                              int shift) {
  const int2 first = visible_keys<kHasWindow>(p, pos_first, k_len, shift);
  const int2 last = visible_keys<kHasWindow>(p, pos_last, k_len, shift);
  KeyRange r;
  r.hi = max(last.y + 1, 0);
  r.lo = min(first.x, r.hi) / kBlockN * kBlockN;
  r.full_lo = min(max((last.x + kBlockN - 1) / kBlockN * kBlockN, r.lo), r.hi);
  r.full_hi = max(min(first.y + 1, r.hi) / kBlockN * kBlockN, r.full_lo);
  return r;
}

// (position, head) -> element offset. Both are non-negative: widened as unsigned, each
// product is one wide multiply-add, where a sign extension costs two more instructions.
__device__ __forceinline__ int64_t position_head_offset(int pos, int head, int64_t stride_s, int64_t stride_h) {
  return int64_t(static_cast<uint32_t>(pos)) * stride_s + int64_t(static_cast<uint32_t>(head)) * stride_h;
}

// Packed row -> global address of its (position, head) in a (B, S, H, D) tensor whose
// (batch, sequence start, first head of the group) is ``base``.
template <typename T>
__device__ __forceinline__ const void* packed_row_address(const void* base, int row, const FastDivisor& group,
                                                          int64_t stride_s, int64_t stride_h) {
  const int pos = fast_divide(row, group), head = row - pos * static_cast<int>(group.divisor);
  return static_cast<const T*>(base) + position_head_offset(pos, head, stride_s, stride_h);
}

// A packed row as (position, head), stepped forward by a fixed number of rows without a
// division per row (a thread loads several rows of a packed tile).
struct PackedRowWalk {
  int row, pos, head;    // row = pos * group + head
  int step_pos, step_head;  // the step, step_pos * group + step_head rows, step_head < group
  int group;

  __device__ __forceinline__ PackedRowWalk(int first_row, int step, const FastDivisor& divisor)
      : row(first_row), group(static_cast<int>(divisor.divisor)) {
    pos = fast_divide(first_row, divisor), head = first_row - pos * group;
    step_pos = fast_divide(step, divisor), step_head = step - step_pos * group;
  }
  template <typename T>
  __device__ __forceinline__ const T* address(const void* base, int64_t stride_s, int64_t stride_h) const {
    return static_cast<const T*>(base) + position_head_offset(pos, head, stride_s, stride_h);
  }
  __device__ __forceinline__ void advance(int step) {
    row += step, pos += step_pos, head += step_head;
    if (head >= group) head -= group, ++pos;
  }
};

// A (position, head) operand: its packed row 0 at ``base``, strides in elements, and the
// address cp.async takes for rows outside the tensor.
struct PackedOperand {
  const void* base;
  int64_t stride_s, stride_h;
  const void* fallback;
};

// Packed rows [m0, m0 + Tile::kRows) of each operand (same rows, tiles kBytes apart from
// ``tile`` on) with cp.async; rows from ``rows`` on are zero-filled. One walk over the rows
// serves every operand.
template <typename T, class Tile, int kThreads, int kOperands>
__device__ __forceinline__ void load_packed_rows(uint32_t tile, const PackedOperand (&operands)[kOperands], int m0,
                                                 int rows, const FastDivisor& group) {
  constexpr int kRowsPerPass = kThreads / Tile::kChunks;  // load_strided_tile_async's passes
  static_assert(kThreads % Tile::kChunks == 0 && Tile::kRows % kRowsPerPass == 0, "whole rows per pass");
  static_assert(kRowsPerPass % 8 == 0, "passes move by whole swizzle periods");
  const int chunk = static_cast<int>(threadIdx.x) % Tile::kChunks;
  const uint32_t destination = tile + Tile::offset(static_cast<int>(threadIdx.x) / Tile::kChunks, chunk);
  PackedRowWalk walk(m0 + static_cast<int>(threadIdx.x) / Tile::kChunks, kRowsPerPass, group);
#pragma unroll
  for (int j = 0; j < Tile::kRows / kRowsPerPass; ++j, walk.advance(kRowsPerPass)) {
    const bool valid = walk.row < rows;
#pragma unroll
    for (int o = 0; o < kOperands; ++o) {
      const char* source = reinterpret_cast<const char*>(walk.address<T>(operands[o].base, operands[o].stride_s,
                                                                          operands[o].stride_h)) + chunk * 16;
      mma::cp_async_16(destination + o * Tile::kBytes + j * kRowsPerPass * Tile::kRowBytes,
                       valid ? source : operands[o].fallback, valid);
    }
  }
}

template <typename T>
__device__ __forceinline__ const void* tensor_base(const void* ptr, int64_t batch, int64_t stride_b, int64_t start,
                                                   int64_t stride_s, int64_t head, int64_t stride_h) {
  return static_cast<const T*>(ptr) + batch * stride_b + start * stride_s + head * stride_h;
}

// Tokens [first, first + Tile::kRows) of one head whose token 0 is at ``base`` (tokens
// ``stride`` elements apart: a K or V head, or one query head of Q or dO), into ``tile`` with
// cp.async; tokens from ``len`` on zero-filled.
template <typename T, class Tile, int kThreads>
__device__ __forceinline__ void load_head_rows(uint32_t tile, const void* fallback, const void* base, int64_t stride,
                                               int first, int len) {
  mma::load_strided_tile_async<Tile, kThreads>(tile, fallback, static_cast<const T*>(base) + int64_t(first) * stride,
                                               stride * int64_t(sizeof(T)), len - first);
}

// The page and the row within it of position ``key`` of a paged cache's sequence whose
// block-table row is ``pages`` (key below the sequence's capacity).
__device__ __forceinline__ int64_t paged_row_offset(const PagedCache& paged, const int32_t* pages, int key,
                                                    int64_t page_stride, int64_t row_stride) {
  const int block = fast_divide(key, paged.page_size);
  const int page = min(max(pages[block], 0), paged.num_pages - 1);
  return int64_t(page) * page_stride + int64_t(key - block * static_cast<int>(paged.page_size.divisor)) * row_stride;
}

// load_head_rows over a paged cache: keys [first, first + Tile::kRows) of one head whose
// pages start at ``base`` (the pool with the head's offset), each key's row looked up through
// its page; keys from ``len`` on zero-filled. K and V each look their rows up: one loader for
// both, sharing the lookup, took 8 B of spills on sm_80 at d = 128 (none on sm_90a).
template <typename T, class Tile, int kThreads>
__device__ __forceinline__ void load_paged_rows(uint32_t tile, const void* fallback, const void* base,
                                                int64_t page_stride, int64_t row_stride, const PagedCache& paged,
                                                const int32_t* pages, int first, int len) {
  constexpr int kRowsPerPass = kThreads / Tile::kChunks;
  static_assert(kThreads % Tile::kChunks == 0 && Tile::kRows % kRowsPerPass == 0, "whole rows per pass");
  static_assert(kRowsPerPass % 8 == 0, "passes move by whole swizzle periods");
  const int thread = static_cast<int>(threadIdx.x);
  const int first_row = thread / Tile::kChunks, chunk = thread % Tile::kChunks;
  const uint32_t destination = tile + Tile::offset(first_row, chunk);
#pragma unroll
  for (int j = 0; j < Tile::kRows / kRowsPerPass; ++j) {
    const int key = first + first_row + j * kRowsPerPass;
    const bool valid = key < len;
    const void* source = fallback;
    if (valid)
      source = reinterpret_cast<const char*>(static_cast<const T*>(base) +
                                             paged_row_offset(paged, pages, key, page_stride, row_stride)) +
               chunk * 16;
    mma::cp_async_16(destination + j * kRowsPerPass * Tile::kRowBytes, source, valid);
  }
}

// ---------------------------------------------------------------------------------------
// fp8 cache entries (ScaledCache, attention.h)
// ---------------------------------------------------------------------------------------

// Rows of one-byte cache entries as the decode copies them in, before they widen: kCols
// bytes a row, unswizzled (the widening pass reads each 16-byte chunk once, in order).
template <int kRows_, int kCols>
struct ByteTile {
  static constexpr int kRows = kRows_;
  static constexpr int kChunks = kCols / 16;
  static constexpr int kRowBytes = kCols;
  static constexpr int kBytes = kRows * kCols;
  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>((row * kChunks + chunk) * 16);
  }
};

// e4m3 entries widen to fp16 at 2^-8 of their value (below), exactly; the factor joins the
// scales, so the products need no multiply per entry.
template <CacheFormat kFormat>
constexpr float kWidenedScale = kFormat == CacheFormat::kE4M3 ? 256.f : 1.f;

// Two entries, each in the high byte of a 16-bit lane of ``lanes``, as an fp16 pair: e5m2 is
// fp16's high byte; e4m3 keeps its sign and moves the rest one bit lower, where its exponent
// (bias 7) and mantissa line up with fp16's (bias 15) at 2^-8 of the value, subnormals
// included; its NaN (0x7F, 0xFF) becomes fp16's.
template <CacheFormat kFormat>
__device__ __forceinline__ uint32_t entries_as_half2(uint32_t lanes) {
  if constexpr (kFormat == CacheFormat::kE5M2) {
    return lanes;
  } else {
    const uint32_t magnitude = lanes & 0x7F007F00u;
    const uint32_t nan = (((magnitude + 0x01000100u) & 0x80008000u) >> 15) * 0x7E00u;  // lanes of 0x7F00
    return (lanes & 0x80008000u) | (magnitude >> 1) | nan;
  }
}

// 16 entries (a 16-byte chunk) as 16 values of T, exactly (e4m3: at 2^-8 of their value):
// entries 0-7 in ``low``, 8-15 in ``high``.
template <typename T, CacheFormat kFormat>
__device__ __forceinline__ void widen_entries(const uint4& bytes, uint4& low, uint4& high) {
  const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
  uint32_t out[8];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    // entries (0, 1) and (2, 3) of the word into the high bytes of two 16-bit lanes each
    const uint32_t lanes[2] = {((words[w] << 8) & 0xFF00u) | ((words[w] << 16) & 0xFF000000u),
                               ((words[w] >> 8) & 0xFF00u) | (words[w] & 0xFF000000u)};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      uint32_t pair = entries_as_half2<kFormat>(lanes[j]);
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // through fp32: exact, both hold the value
        __half2 halves;
        std::memcpy(&halves, &pair, sizeof(pair));
        const __nv_bfloat162 wide = __float22bfloat162_rn(__half22float2(halves));
        std::memcpy(&pair, &wide, sizeof(pair));
      }
      out[2 * w + j] = pair;
    }
  }
  low = make_uint4(out[0], out[1], out[2], out[3]);
  high = make_uint4(out[4], out[5], out[6], out[7]);
}

// The decode's fp8 K or V tile, copied in as Bytes, widened into the swizzled Tile the
// products read; each thread takes a share of the 16-byte chunks.
template <typename T, CacheFormat kFormat, class Bytes, class Tile, int kThreads>
__device__ __forceinline__ void widen_tile(const char* bytes, char* wide) {
  static_assert(Tile::kRows == Bytes::kRows && Tile::kChunks == 2 * Bytes::kChunks, "a byte per 16-bit value");
  for (int i = thread_in_block<kThreads>(); i < Bytes::kRows * Bytes::kChunks; i += kThreads) {
    const int row = i / Bytes::kChunks, chunk = i % Bytes::kChunks;
    uint4 low, high;
    widen_entries<T, kFormat>(load_shared(reinterpret_cast<const uint4*>(bytes + Bytes::offset(row, chunk))), low,
                              high);
    store_shared(reinterpret_cast<uint4*>(wide + Tile::offset(row, 2 * chunk)), low);
    store_shared(reinterpret_cast<uint4*>(wide + Tile::offset(row, 2 * chunk + 1)), high);
  }
}

// x / scale (IEEE division) clamped to the format's finite range and rounded to nearest even,
// as one entry of kFormat (reference.quantize_fp8; NaN stays NaN, the sign of zero is kept).
// The rounding is done in fp32 arithmetic: at the value's exponent (the smallest normal one
// below it, where the subnormals' spacing holds) the grid's spacing is ``step``, and adding
// 2^23 steps leaves fp32 a spacing of one step, so the sum rounds onto the grid and taking it
// away again is exact. The byte is then assembled from the rounded value's bits.
template <CacheFormat kFormat>
__device__ __forceinline__ uint32_t fp8_entry(float x, float scale) {
  constexpr int kMantissa = kFormat == CacheFormat::kE4M3 ? 3 : 2;
  constexpr int kMinExponent = kFormat == CacheFormat::kE4M3 ? -6 : -14;
  constexpr float kLargest = kFormat == CacheFormat::kE4M3 ? 448.f : 57344.f;
  const float v = divide_rn(x, scale);
  const uint32_t sign = (float_bits(v) >> 24) & 0x80u;
  if (v != v) return sign | 0x7Fu;  // NaN in both formats
  float magnitude = fminf(fabsf(v), kLargest);
  const int exponent = max(static_cast<int>((float_bits(magnitude) >> 23) & 0xFF) - 127, kMinExponent);
  const float step = float_of_bits(static_cast<uint32_t>(exponent - kMantissa + 127) << 23);
  const float shift = step * 8388608.f;
  magnitude = (magnitude + shift) - shift;
  const uint32_t bits = float_bits(magnitude);
  const int rounded_exponent = static_cast<int>((bits >> 23) & 0xFF) - 127;
  if (magnitude < float_of_bits(static_cast<uint32_t>(kMinExponent + 127) << 23)) {
    // subnormal or zero: a whole number of steps, counted by a multiply by 1 / step (exact)
    const float steps_per_unit = float_of_bits(static_cast<uint32_t>(127 + kMantissa - kMinExponent) << 23);
    return sign | static_cast<uint32_t>(magnitude * steps_per_unit);
  }
  return sign | (static_cast<uint32_t>(rounded_exponent - kMinExponent + 1) << kMantissa) |
         ((bits >> (23 - kMantissa)) & ((1u << kMantissa) - 1));
}

// ---------------------------------------------------------------------------------------
// Warp-level products (each warp computes its own slab)
// ---------------------------------------------------------------------------------------

// acc[kMTiles][kNTiles] += A B^T over the head dim: A rows [a_row0, a_row0 + 16 kMTiles) of
// one tile, B rows [b_row0, b_row0 + 8 kNTiles) of another (both row-major, head dim last:
// Q K^T, dO V^T, K Q^T, V dO^T). Each B fragment is read once and used kMTiles times.
template <typename T, class ATile, class BTile, int kMTiles, int kNTiles, int kKSteps>
__device__ __forceinline__ void gemm_abt(float (&acc)[kMTiles][kNTiles][4], uint32_t a_tile, int a_row0,
                                         uint32_t b_tile, int b_row0, int lane) {
  static_assert(kNTiles % 2 == 0, "B fragments come in pairs of 8-column tiles");
  static_assert(2 * kKSteps <= ATile::kChunks && 2 * kKSteps <= BTile::kChunks,
                "SwizzledTile::address: k steps stay inside a row (row0 arguments are multiples of 16)");
  const uint32_t a_offset = ATile::a_lane_offset(lane), b_offset = BTile::b_lane_offset(lane);
#pragma unroll
  for (int k = 0; k < kKSteps; ++k) {
    // A's 16-row blocks as constant offsets from one address per k step: in the forward's key
    // loop, 16 fewer instructions per tile and (sm_90a) no spill with a window compiled in.
    // The same spelled out for B moved ptxas's allocation there (d = 128: 24-52 B of spills).
    const uint32_t a_step = ATile::address(a_tile, a_row0, a_offset, k);
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) mma::ldmatrix_x4(a[mt], a_step + 16 * mt * ATile::kRowBytes);
#pragma unroll
    for (int n = 0; n < kNTiles / 2; ++n) {
      uint32_t b[4];
      mma::ldmatrix_x4(b, BTile::address(b_tile, b_row0 + 16 * n, b_offset, k));
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma::mma_16816<T>(acc[mt][2 * n], a[mt], b[0], b[1]);
        mma::mma_16816<T>(acc[mt][2 * n + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc[kMTiles][kNTiles] += P B: P in registers (score-shaped accumulators: kKTiles16 * 2
// tiles of 8 columns, rounded to T here), B rows [b_row0, b_row0 + 16 kKTiles16) of a
// row-major tile over all its columns (P V, P^T dO, dS^T Q, dS K).
template <typename T, class BTile, int kMTiles, int kKTiles16, int kNTiles>
__device__ __forceinline__ void gemm_pb(float (&acc)[kMTiles][kNTiles][4], const float (&p)[kMTiles][2 * kKTiles16][4],
                                        uint32_t b_tile, int b_row0, int lane) {
  static_assert(kNTiles % 2 == 0, "B fragments come in pairs of 8-column tiles");
  static_assert(kNTiles <= BTile::kChunks, "SwizzledTile::address: column steps stay inside a row");
  const uint32_t b_offset = BTile::b_trans_lane_offset(lane);
#pragma unroll
  for (int kt = 0; kt < kKTiles16; ++kt) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) mma::c_to_a<T>(p[mt][2 * kt], p[mt][2 * kt + 1], a[mt]);
#pragma unroll
    for (int n = 0; n < kNTiles / 2; ++n) {
      uint32_t b[4];
      mma::ldmatrix_x4_trans(b, BTile::address(b_tile, b_row0 + 16 * kt, b_offset, n));
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma::mma_16816<T>(acc[mt][2 * n], a[mt], b[0], b[1]);
        mma::mma_16816<T>(acc[mt][2 * n + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc[kMTiles][kNTiles] += A B, B a k-major tile's rows [0, 16 kKSteps), columns from
// 16-column group b_step0 on, and A over the same k either
//  * row-major (kATransposed false): rows [a0, a0 + 16 kMTiles) of a tile over its first
//    16 kKSteps columns (dS K: dS staged in shared memory, K as the dK/dV program holds it);
//  * k-major (kATransposed true): columns [a0, a0 + 16 kMTiles) of a tile's first 16 kKSteps
//    rows, read with ldmatrix.trans (P^T dO and dS^T Q with P and dS stored [query][key]).
template <typename T, bool kATransposed, class ATile, class BTile, int kMTiles, int kKSteps, int kNTiles>
__device__ __forceinline__ void gemm_ab(float (&acc)[kMTiles][kNTiles][4], uint32_t a_tile, int a0, uint32_t b_tile,
                                        int b_step0, int lane) {
  static_assert(kNTiles % 2 == 0, "B fragments come in pairs of 8-column tiles");
  static_assert(kATransposed || kKSteps <= ATile::kChunks / 2, "SwizzledTile::address: k steps stay inside a row");
  const uint32_t a_offset = kATransposed ? ATile::a_trans_lane_offset(lane) : ATile::a_lane_offset(lane);
  const uint32_t b_offset = BTile::b_trans_lane_offset(lane);
#pragma unroll
  for (int k = 0; k < kKSteps; ++k) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      if constexpr (kATransposed)
        mma::ldmatrix_x4_trans(a[mt], ATile::address(a_tile, 16 * k, a_offset, a0 / 16 + mt));
      else
        mma::ldmatrix_x4(a[mt], ATile::address(a_tile, a0 + 16 * mt, a_offset, k));
    }
#pragma unroll
    for (int n = 0; n < kNTiles / 2; ++n) {
      uint32_t b[4];
      mma::ldmatrix_x4_trans(b, BTile::address(b_tile, 16 * k, b_offset, b_step0 + n));
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma::mma_16816<T>(acc[mt][2 * n], a[mt], b[0], b[1]);
        mma::mma_16816<T>(acc[mt][2 * n + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

template <int kMTiles, int kNTiles>
__device__ __forceinline__ void zero(float (&acc)[kMTiles][kNTiles][4]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Store accumulator-shaped pairs of T (pairs[mt][nt][r]: row row0 + 16 mt + g + 8 r, columns col0 +
// 8 nt + 2 t and the next) into a [rows][keys] tile, one 4-byte word each.
template <class Tile, int kMTiles, int kNTiles>
__device__ __forceinline__ void stage_pairs(char* tile, int row0, int col0,
                                            const uint32_t (&pairs)[kMTiles][kNTiles][2], int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        store_shared(reinterpret_cast<uint32_t*>(tile + Tile::element_offset(row0 + 16 * mt + g + 8 * r,
                                                                             col0 + 8 * nt + 2 * t)),
                     pairs[mt][nt][r]);
}

// Write a warp's accumulator slab (rows [row0, row0 + 16 kMTiles), columns [col0, col0 +
// 8 kDimTiles) of ``tile``), times ``scale``, rounded to T, into shared memory; the caller
// copies it out in 16-byte rows.
template <typename T, class Tile, int kMTiles, int kDimTiles>
__device__ __forceinline__ void stage_rows(char* tile, int row0, const float (&acc)[kMTiles][kDimTiles][4],
                                           float scale, int lane, int col0 = 0) {
  uint32_t pairs[kMTiles][kDimTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        pairs[mt][dt][r] = mma::pack2<T>(acc[mt][dt][2 * r] * scale, acc[mt][dt][2 * r + 1] * scale);
  stage_pairs<Tile>(tile, row0, col0, pairs, lane);
}

// Copy ``rows`` staged rows [row0, row0 + rows) of ``tile`` to global memory, 16 bytes at a
// time by the 32 lanes of a warp; ``row_target(r)`` gives the destination or nullptr (skip).
template <class Tile, class RowTarget>
__device__ __forceinline__ void store_rows(const char* tile, int row0, int rows, int lane, RowTarget row_target) {
  for (int i = lane; i < rows * Tile::kChunks; i += 32) {
    const int r = i / Tile::kChunks, chunk = i % Tile::kChunks;
    char* target = static_cast<char*>(row_target(r));
    if (target != nullptr)
      store_global(target + chunk * 16, load_shared(reinterpret_cast<const uint4*>(tile + Tile::offset(row0 + r, chunk))));
  }
}

// ---------------------------------------------------------------------------------------
// Forward and split-KV decode
// ---------------------------------------------------------------------------------------

// Online softmax over one tile of scores (in place: s becomes p, in base 2): masks, updates
// each row's running max and (thread-partial) sum, rescales the output accumulators.
// ``visible_of(mt, r)`` gives the key bounds of this thread's row (mt, r); only masked tiles
// call it, so the bounds are not held in registers across the key loop.
//
// Unmasked tiles take the row max of the raw scores and scale it once, then fold the scale
// into the exponent: p = 2^(s * scale_log2 - max), one FFMA per score where scaling every
// score first took an FMUL and an FADD. Rounding is monotonic, so the scaled max is the
// same number as the max of the scaled scores; but only for scale_log2 >= 0: the caller
// sends tiles of a negative scale down the masked path, which scales first.
template <class Tr, bool kMask, class VisibleOf>
__device__ __forceinline__ void online_softmax(float (&s)[Tr::kMTiles][Tr::kNTiles][4],
                                               float (&acc)[Tr::kMTiles][Tr::kDimTiles][4],
                                               float (&row_max)[Tr::kMTiles][2], float (&row_sum)[Tr::kMTiles][2],
                                               VisibleOf visible_of, float scale_log2, int key0, int lane) {
  const int t = lane % 4;
  float alphas[Tr::kMTiles][2];
  bool any_max_moved = false;
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;  // scaled scores' max (kMask), raw scores' max (not)
      int2 visible = make_int2(0, 0);
      if constexpr (kMask) visible = visible_of(mt, r);
#pragma unroll
      for (int nt = 0; nt < Tr::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[mt][nt][2 * r + e];
          if constexpr (kMask) {
            const int key = key0 + 8 * nt + 2 * t + e;
            x = key < visible.x || key > visible.y ? -INFINITY : x * scale_log2;
            s[mt][nt][2 * r + e] = x;
          }
          tile_max = fmaxf(tile_max, x);
        }
      if constexpr (!kMask) tile_max *= scale_log2;
      const float new_max = fmaxf(row_max[mt][r], mma::quad_max(tile_max));
      const float base = new_max == -INFINITY ? 0.f : new_max;  // rows that have seen no key yet
      const float alpha = fast_exp2(row_max[mt][r] - base);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < Tr::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = s[mt][nt][2 * r + e];
          const float p = fast_exp2(kMask ? x - base : fmaf(x, scale_log2, -base));
          s[mt][nt][2 * r + e] = p;
          sum += p;
        }
      row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
      alphas[mt][r] = alpha;
      any_max_moved |= new_max != row_max[mt][r];
      row_max[mt][r] = new_max;
    }
  // The output rescale (2 kMTiles kDimTiles multiplies per row pair) only where some row of the
  // warp has a new maximum: past the first few key tiles, most tiles bring none.
  if (__ballot_sync(kFullMask, any_max_moved) == 0) return;
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int dt = 0; dt < Tr::kDimTiles; ++dt) {
        acc[mt][dt][2 * r] *= alphas[mt][r];
        acc[mt][dt][2 * r + 1] *= alphas[mt][r];
      }
}

// One program of the forward (kDecode = false: writes out and lse) or of the split-KV
// decode (writes the split's partial output and log2-sum-exp). kFormat (decode only): the
// caches' entries, of T or of fp8. fp8 tiles are copied in as bytes (half the bytes of the
// two stages) and, once landed, widened into one K and one V tile of T that the products read:
// the same shared memory, one more barrier per tile.
template <class Tr, bool kHasWindow, bool kDecode, CacheFormat kFormat = CacheFormat::kNone>
__global__ void __launch_bounds__(Tr::kThreads) attention_fwd_kernel(const AttentionDecodeParams p) {
  using T = typename Tr::T;
  using RowTile = typename Tr::RowTile;
  using StreamTile = typename Tr::StreamTile;
  constexpr bool kFp8 = kFormat != CacheFormat::kNone;
  static_assert(kDecode || !kFp8, "fp8 caches are the decode's");
  using CacheEntry = std::conditional_t<kFp8, uint8_t, T>;
  using CopyTile = std::conditional_t<kFp8, ByteTile<Tr::kBlockN, Tr::kHeadDim>, StreamTile>;
  IK_DYNAMIC_SHARED(char, smem);
  char* q_tile = smem;
  char* kv_tiles = smem + RowTile::kBytes;  // stages: K0 V0 K1 V1 (fp8: as bytes, then the widened K V)
  char* widened = kv_tiles + 4 * CopyTile::kBytes;
  static_assert(!kFp8 || 4 * CopyTile::kBytes + 2 * StreamTile::kBytes == 4 * StreamTile::kBytes,
                "the fp8 stages and the widened tiles take the shared memory of two stages of T");
  const uint32_t q_address = mma::shared_address(q_tile);
  const uint32_t kv_address = mma::shared_address(kv_tiles);
  const int thread = thread_in_block<Tr::kThreads>(), lane = thread % 32, warp = thread / 32;
  const int warp_m = warp % Tr::kWarpsM, warp_n = warp / Tr::kWarpsM;
  const int warp_row0 = warp_m * Tr::kWarpRows, warp_key0 = warp_n * Tr::kWarpKeys;

  ProgramTile pt;
  int shift = 0, split = 0;
  if constexpr (kDecode) {  // grid (tiles x B x Hkv, splits), tiles fastest: launch_attention_decode
    const unsigned tiles = static_cast<unsigned>(p.rows_padded / Tr::kBlockM);
    const unsigned batch_head = blockIdx.x / tiles;
    pt.tile = static_cast<int>(blockIdx.x - batch_head * tiles);
    split = blockIdx.y;
    pt.batch = batch_head / p.heads_kv;
    pt.kv_head = batch_head % p.heads_kv;
    pt.q_start = pt.k_start = 0;
    pt.q_len = p.seqlen_q;
    const int64_t valid_keys = int64_t(p.cache_seqlens[pt.batch]) + p.new_tokens;
    shift = static_cast<int>(valid_keys - pt.q_len);
    pt.k_len = static_cast<int>(max(min(valid_keys, int64_t(p.capacity)), int64_t(0)));  // overflow: NaN later
  } else {
    pt = program_tile(p, false, Tr::kBlockM);
    shift = pt.k_len - pt.q_len;
  }
  const int rows = pt.q_len * p.group;
  const int row0 = pt.tile * Tr::kBlockM;
  if (row0 >= rows) return;  // packed grids have a few spare programs

  const void* q_base = tensor_base<T>(p.q, pt.batch, p.q_stride_b, pt.q_start, p.q_stride_s,
                                      pt.kv_head * p.group, p.q_stride_h);
  const auto q_row = [&](int r) -> const void* {
    return row0 + r < rows ? packed_row_address<T>(q_base, row0 + r, p.group_divisor, p.q_stride_s, p.q_stride_h)
                           : nullptr;
  };
  bool q_loaded = false;
  if constexpr (kDecode) {
    if (p.rotary.cos != nullptr) {
      // Rotary of q fused into its load (position cache_seqlens[b] + s): through registers,
      // stored before the loop's first barrier, which orders it before every read.
      const int64_t first_position = p.cache_seqlens[pt.batch];
      for (int i = threadIdx.x; i < RowTile::kRows * RowTile::kChunks; i += Tr::kThreads) {
        const int r = i / RowTile::kChunks, chunk = i % RowTile::kChunks;
        const T* row = static_cast<const T*>(q_row(r));
        const int col = chunk * 8;  // 8 16-bit values per chunk
        const int64_t position = first_position + fast_divide(row0 + r, p.group_divisor);
        store_shared(reinterpret_cast<uint4*>(q_tile + RowTile::offset(r, chunk)),
                     row != nullptr ? rotated_chunk<T>(row, col, position, p.rotary) : make_uint4(0, 0, 0, 0));
      }
      q_loaded = true;
    }
  }
  if (!q_loaded) {
    const PackedOperand operands[1] = {{q_base, p.q_stride_s, p.q_stride_h, p.q}};
    load_packed_rows<T, RowTile, Tr::kThreads>(q_address, operands, row0, rows, p.group_divisor);
  }

  const int pos_first = fast_divide(row0, p.group_divisor);
  const int pos_last = fast_divide(min(row0 + Tr::kBlockM, rows) - 1, p.group_divisor);
  KeyRange range = key_range<kHasWindow, Tr::kBlockN>(p, pos_first, pos_last, pt.k_len, shift);
  if constexpr (kDecode) {
    // This program's split of the keys the tile sees: their tiles dealt out in equal runs
    // over the splits, so the splits share a short sequence in a long cache as evenly as a
    // full one (a split past the last run is empty: its lse is -inf, which the combine skips).
    const int seen_tiles = max(range.hi - range.lo + Tr::kBlockN - 1, 0) / Tr::kBlockN;  // range.lo: whole tiles
    const int tiles_per_split = (seen_tiles + p.splits - 1) / p.splits;
    range.lo += split * tiles_per_split * Tr::kBlockN;
    range.hi = max(min(range.hi, range.lo + tiles_per_split * Tr::kBlockN), range.lo);
    range.full_lo = min(max(range.full_lo, range.lo), range.hi);
    range.full_hi = min(max(range.full_hi, range.full_lo), range.hi);
  }
  // fp8 caches: the KV head's k scale joins the softmax scale and its v scale multiplies the
  // output (each with the widening's factor), so the products run on the widened entries.
  float scale_log2 = p.scale_log2;
  [[maybe_unused]] float v_scale = 1.f;
  if constexpr (kFp8) {
    scale_log2 *= p.fp8.k_scale[pt.kv_head * p.fp8.k_scale_stride] * kWidenedScale<kFormat>;
    v_scale = p.fp8.v_scale[pt.kv_head * p.fp8.v_scale_stride] * kWidenedScale<kFormat>;
  }
  // online_softmax's mask-free path folds the scale into the exponent, which needs a scale
  // of at least 0: with any other, every tile takes the masked path.
  if (!(scale_log2 >= 0.f)) range.full_hi = range.full_lo;
  // A paged cache (decode only) holds no batch dimension: its pages come from the table.
  const bool paged = kDecode && p.paged.block_table != nullptr;
  const int64_t kv_batch = paged ? 0 : pt.batch;
  const void* k_base =
      tensor_base<CacheEntry>(p.k, kv_batch, p.k_stride_b, pt.k_start, p.k_stride_s, pt.kv_head, p.k_stride_h);
  const void* v_base =
      tensor_base<CacheEntry>(p.v, kv_batch, p.v_stride_b, pt.k_start, p.v_stride_s, pt.kv_head, p.v_stride_h);
  const int k_len = pt.k_len;
  auto load_kv = [&](int n0, int stage) {
    const uint32_t k_stage = kv_address + 2 * stage * CopyTile::kBytes;
    if constexpr (kDecode) {
      if (paged) {
        const int32_t* pages = p.paged.block_table + pt.batch * p.paged.table_stride;
        load_paged_rows<CacheEntry, CopyTile, Tr::kThreads>(k_stage, p.k, k_base, p.k_stride_b, p.k_stride_s, p.paged,
                                                            pages, n0, k_len);
        load_paged_rows<CacheEntry, CopyTile, Tr::kThreads>(k_stage + CopyTile::kBytes, p.v, v_base, p.v_stride_b,
                                                            p.v_stride_s, p.paged, pages, n0, k_len);
        return;
      }
    }
    load_head_rows<CacheEntry, CopyTile, Tr::kThreads>(k_stage, p.k, k_base, p.k_stride_s, n0, k_len);
    load_head_rows<CacheEntry, CopyTile, Tr::kThreads>(k_stage + CopyTile::kBytes, p.v, v_base, p.v_stride_s, n0,
                                                       k_len);
  };
  if (range.lo < range.hi) load_kv(range.lo, 0);
  mma::cp_async_commit();

  // Visible key bounds of this thread's rows, computed in masked tiles only: held across the
  // loop they took 2 kMTiles registers, which the 32-row layout at d = 128 then spilled.
  const int g = lane / 4;
  const int thread_row0 = row0 + warp_row0 + g;
  const auto visible_of = [&](int mt, int r) {
    return visible_keys<kHasWindow>(p, fast_divide(thread_row0 + 16 * mt + 8 * r, p.group_divisor), k_len, shift);
  };

  float acc[Tr::kMTiles][Tr::kDimTiles][4];
  float row_max[Tr::kMTiles][2], row_sum[Tr::kMTiles][2];
  zero(acc);
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) row_max[mt][r] = -INFINITY, row_sum[mt][r] = 0.f;

  int stage = 0;
  for (int n0 = range.lo; n0 < range.hi; n0 += Tr::kBlockN, stage ^= 1) {
    // One barrier per tile: after it, this tile (and Q) has landed for every thread, and every
    // warp is done with the other stage (the previous tile), which the next tile then refills
    // while the tensor cores work on this one.
    mma::cp_async_wait<0>();
    __syncthreads();
    if (n0 + Tr::kBlockN < range.hi) load_kv(n0 + Tr::kBlockN, stage ^ 1);
    mma::cp_async_commit();
    uint32_t k_stage = kv_address + 2 * stage * StreamTile::kBytes;
    if constexpr (kFp8) {
      // This tile's bytes have landed; every warp is done with the widened tiles of the last
      // one (the barrier above). Widened, they are read after a second barrier.
      const char* bytes = kv_tiles + 2 * stage * CopyTile::kBytes;
      widen_tile<T, kFormat, CopyTile, StreamTile, Tr::kThreads>(bytes, widened);
      widen_tile<T, kFormat, CopyTile, StreamTile, Tr::kThreads>(bytes + CopyTile::kBytes,
                                                                 widened + StreamTile::kBytes);
      __syncthreads();
      k_stage = mma::shared_address(widened);
    }
    float s[Tr::kMTiles][Tr::kNTiles][4];
    zero(s);
    gemm_abt<T, RowTile, StreamTile, Tr::kMTiles, Tr::kNTiles, Tr::kKSteps>(s, q_address, warp_row0, k_stage,
                                                                           warp_key0, lane);
    // The mask as a template argument: compiled in, its tests ran on every tile (predicated),
    // a quarter of the loop's instructions; now only tiles that need it take that path.
    if (range.needs_mask(n0, Tr::kBlockN))
      online_softmax<Tr, true>(s, acc, row_max, row_sum, visible_of, scale_log2, n0 + warp_key0, lane);
    else
      online_softmax<Tr, false>(s, acc, row_max, row_sum, visible_of, scale_log2, n0 + warp_key0, lane);
    gemm_pb<T, StreamTile, Tr::kMTiles, Tr::kWarpKeys / 16, Tr::kDimTiles>(acc, s, k_stage + StreamTile::kBytes,
                                                                           warp_key0, lane);
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // no copy (Q included, when no key tile ran) still lands in what follows

  const int t = lane % 4;
  if constexpr (!kDecode) {
    static_assert(Tr::kWarpsN == 1, "the forward's warps own whole rows");
    // Where the output goes. Before sm_90 the program's tile is found again here (reading
    // cu_seqlens again for packed inputs) instead of being held across the key loop: its
    // batch, head and sequence start held, the 32-row layout at d = 128 spilled on sm_80,
    // 24 B stored / 40 B loaded without a window and 72 / 80 with one; found again, 0 and
    // 48 / 40. On sm_90a, which spills neither way when it holds them, finding the tile again
    // moved ptxas's allocation into spills (12 B and 36 B), so there it holds them. The CPU
    // emulation takes the sm_80 path, so its tests run this one.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
    constexpr bool kFindTileAgain = true;
#else
    constexpr bool kFindTileAgain = false;
#endif
    const ProgramTile out_tile = kFindTileAgain ? program_tile(p, false, Tr::kBlockM) : pt;
    const int out_rows = kFindTileAgain ? out_tile.q_len * p.group : rows;
    const int out_row0 = kFindTileAgain ? out_tile.tile * Tr::kBlockM : row0;
    const void* out_base = tensor_base<T>(p.out, out_tile.batch, p.out_stride_b, out_tile.q_start, p.out_stride_s,
                                          out_tile.kv_head * p.group, p.out_stride_h);
#pragma unroll
    for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float total = mma::quad_sum(row_sum[mt][r]);
        // Rows that see no key (total exactly 0): zeros and lse -inf. NaN scores keep a NaN
        // total, so a NaN input gives NaN out and lse, never a quiet zero.
        const bool seen = total != 0.f;
        const float inv = seen ? 1.f / total : 0.f;
#pragma unroll
        for (int dt = 0; dt < Tr::kDimTiles; ++dt) {
          acc[mt][dt][2 * r] *= inv;
          acc[mt][dt][2 * r + 1] *= inv;
        }
        const int row = out_row0 + warp_row0 + 16 * mt + g + 8 * r;
        if (t == 0 && row < out_rows) {
          const int pos = fast_divide(row, p.group_divisor), head = row - pos * p.group;
          p.lse[out_tile.batch * p.lse_stride_b + (out_tile.kv_head * p.group + head) * p.lse_stride_h +
                (out_tile.q_start + pos) * p.lse_stride_s] =
              seen ? (row_max[mt][r] + log2f(total)) * kLn2 : -INFINITY;
        }
      }
    // Each warp stages its own rows in its own part of the Q tile (only it read them).
    stage_rows<T, RowTile>(q_tile, warp_row0, acc, 1.f, lane);
    __syncwarp();
    store_rows<RowTile>(q_tile, warp_row0, Tr::kWarpRows, lane, [&](int r) -> void* {
      const int row = out_row0 + warp_row0 + r;
      return row < out_rows ? const_cast<void*>(packed_row_address<T>(out_base, row, p.group_divisor,
                                                                       p.out_stride_s, p.out_stride_h))
                            : nullptr;
    });
  } else {
    // Warps hold partial results over different keys of the same 16 rows: merge them through
    // shared memory (fp32 accumulators in the K/V stages, max and sum in the Q tile).
    static_assert(Tr::kMTiles == 1 && Tr::kWarpsM == 1, "decode: one 16-row tile shared by every warp");
    static_assert(Tr::kWarpsN * 16 * Tr::kHeadDim * 4 <= 4 * StreamTile::kBytes, "merge buffer fits the stages");
    static_assert(2 * Tr::kWarpsN * 16 * 4 <= RowTile::kBytes, "max / sum fit the Q tile");
    float* merge_acc = reinterpret_cast<float*>(kv_tiles);  // [warp][16 rows][head_dim]
    float* merge_max = reinterpret_cast<float*>(q_tile);    // [warp][16 rows]
    float* merge_sum = merge_max + Tr::kWarpsN * 16;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = g + 8 * r;
      const float total = mma::quad_sum(row_sum[0][r]);
      if (t == 0) {
        store_shared(merge_max + warp_n * 16 + row, row_max[0][r]);
        store_shared(merge_sum + warp_n * 16 + row, total);
      }
#pragma unroll
      for (int dt = 0; dt < Tr::kDimTiles; ++dt)
        store_shared(reinterpret_cast<float2*>(merge_acc + (warp_n * 16 + row) * Tr::kHeadDim + 8 * dt + 2 * t),
                     make_float2(acc[0][dt][2 * r], acc[0][dt][2 * r + 1]));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * Tr::kHeadDim / 4; i += Tr::kThreads) {
      const int row = i / (Tr::kHeadDim / 4), col = 4 * (i % (Tr::kHeadDim / 4));
      float best = -INFINITY;
#pragma unroll
      for (int w = 0; w < Tr::kWarpsN; ++w) best = fmaxf(best, load_shared(merge_max + w * 16 + row));
      const float base = best == -INFINITY ? 0.f : best;
      float total = 0.f;
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int w = 0; w < Tr::kWarpsN; ++w) {
        const float weight = fast_exp2(load_shared(merge_max + w * 16 + row) - base);
        const float4 part = load_shared(reinterpret_cast<const float4*>(merge_acc + (w * 16 + row) * Tr::kHeadDim + col));
        total += weight * load_shared(merge_sum + w * 16 + row);
        sum.x += weight * part.x, sum.y += weight * part.y, sum.z += weight * part.z, sum.w += weight * part.w;
      }
      const float inv = (total != 0.f ? 1.f / total : 0.f) * v_scale;  // NaN stays NaN, as in the forward
      if (row0 + row < rows) {
        const int64_t slot = ((pt.batch * p.heads_kv + pt.kv_head) * p.splits + split) * int64_t(p.rows_padded) +
                             row0 + row;
        store_global(p.partial_out + slot * Tr::kHeadDim + col,
                     make_float4(sum.x * inv, sum.y * inv, sum.z * inv, sum.w * inv));
        if (col == 0) p.partial_lse[slot] = total != 0.f ? base + log2f(total) : -INFINITY;
      }
    }
  }
}

// Merge the splits of one packed query row (one warp per row): softmax-weighted by each
// split's sum-exp. Sequences whose new entries overflowed the cache, or whose length is
// negative, get NaN. Grid: (blocks of 4 rows x B x Hkv), row blocks fastest.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) attention_decode_combine_kernel(const AttentionDecodeParams p) {
  constexpr int kPerLane = kHeadDim / 32;
  const int lane = threadIdx.x % 32;
  const int rows = p.seqlen_q * p.group;
  const unsigned row_blocks = static_cast<unsigned>((rows + 3) / 4);
  const unsigned batch_head = blockIdx.x / row_blocks;
  const int row = static_cast<int>(blockIdx.x - batch_head * row_blocks) * 4 + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t batch = batch_head / p.heads_kv, kv_head = batch_head % p.heads_kv;
  const int64_t first_slot = (batch * p.heads_kv + kv_head) * p.splits * int64_t(p.rows_padded) + row;
  float best = -INFINITY, total = 0.f, acc[kPerLane] = {};
  for (int split = 0; split < p.splits; ++split) {
    const int64_t slot = first_slot + int64_t(split) * p.rows_padded;
    const float lse = p.partial_lse[slot];
    if (lse == -INFINITY) continue;  // the split saw no key
    const float new_best = fmaxf(best, lse);
    const float alpha = fast_exp2(best - new_best), weight = fast_exp2(lse - new_best);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = acc[i] * alpha + weight * p.partial_out[slot * kHeadDim + lane * kPerLane + i];
    total = total * alpha + weight;
    best = new_best;
  }
  const int64_t length = p.cache_seqlens[batch];
  const bool overflow = length < 0 || length + p.new_tokens > p.capacity;
  const float inv = total != 0.f ? 1.f / total : 0.f;
  const int pos = fast_divide(row, p.group_divisor), head = static_cast<int>(kv_head) * p.group + row - pos * p.group;
  T* out = static_cast<T*>(p.out) + batch * p.out_stride_b + int64_t(pos) * p.out_stride_s + int64_t(head) * p.out_stride_h;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[lane * kPerLane + i] = from_float<T>(overflow ? NAN : acc[i] * inv);
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// The (b, s, h) query row of the calling warp in the one-warp-per-row kernels (4 warps a
// block, launched over cdiv(B * Sq * Hq, 4) blocks); false past the last row.
struct QueryRow {
  int64_t batch, pos, head;
};

__device__ __forceinline__ bool warp_query_row(const AttentionParams& p, QueryRow& row) {
  const int64_t index = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  if (index >= int64_t(p.batch) * p.seqlen_q * p.heads_q) return false;
  row.head = index % p.heads_q;
  row.pos = (index / p.heads_q) % p.seqlen_q;
  row.batch = index / (int64_t(p.heads_q) * p.seqlen_q);
  return true;
}

// delta[b, h, s] = sum_d dout * out (fp32), one warp per (b, s, h) row, 16-byte loads.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) attention_bwd_delta_kernel(const AttentionBwdParams p) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert(kChunks <= 32, "one 16-byte chunk per lane");
  const int lane = threadIdx.x % 32;
  QueryRow row;
  if (!warp_query_row(p, row)) return;
  const int64_t batch = row.batch, pos = row.pos, head = row.head;
  float sum = 0.f;
  if (lane < kChunks) {
    static_assert(Vec<T>::kSize == 8, "16-bit T: 8 values per chunk");
    const T* out_row = static_cast<const T*>(p.out) + batch * p.out_stride_b + pos * p.out_stride_s +
                       head * p.out_stride_h;
    const T* dout_row = static_cast<const T*>(p.dout) + batch * p.dout_stride_b + pos * p.dout_stride_s +
                        head * p.dout_stride_h;
    ChunkAhead<T> out_chunk, dout_chunk;  // both loads in flight before either is used
    out_chunk.load(out_row, lane * 8, kHeadDim, true);
    dout_chunk.load(dout_row, lane * 8, kHeadDim, true);
    float o[8], d[8];
    out_chunk.get(out_row, lane * 8, kHeadDim, o);
    dout_chunk.get(dout_row, lane * 8, kHeadDim, d);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += o[i] * d[i];
  }
  sum = warp_sum(sum);
  if (lane == 0) p.delta[batch * p.lse_stride_b + head * p.lse_stride_h + pos * p.lse_stride_s] = sum;
}

// Per packed query row of the backward: log2-sum-exp (+inf for rows that must get p = 0:
// padding rows past the sequence and rows that saw no key in the forward), delta, and the
// visible key bounds.
struct BwdRow {
  float lse2, delta;
  int2 visible;
};

template <bool kHasWindow>
__device__ __forceinline__ BwdRow bwd_row_at(const AttentionBwdParams& p, const ProgramTile& pt, int pos, int head,
                                             int shift) {
  BwdRow info{INFINITY, 0.f, make_int2(0, -1)};
  if (pos >= pt.q_len) return info;
  const int64_t stats = pt.batch * p.lse_stride_b + (pt.kv_head * p.group + head) * p.lse_stride_h +
                        (pt.q_start + pos) * p.lse_stride_s;
  const float lse = p.lse[stats];
  info.lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
  info.delta = p.delta[stats];
  info.visible = visible_keys<kHasWindow>(p, pos, pt.k_len, shift);
  return info;
}

// The same for packed row ``row`` (position row / group of head row % group).
template <bool kHasWindow>
__device__ __forceinline__ BwdRow bwd_row(const AttentionBwdParams& p, const ProgramTile& pt, int row, int shift) {
  const int pos = fast_divide(row, p.group_divisor);
  return bwd_row_at<kHasWindow>(p, pt, pos, row - pos * p.group, shift);
}

// p = exp2(s * scale_log2 - lse2), zero outside the visible keys when kMask; then ds = p *
// (dp - delta). ``rows`` of the score tile are queries (dQ kernel) or keys (dK/dV kernel,
// transposed).
template <bool kMask>
__device__ __forceinline__ float bwd_probability(float s, float scale_log2, const BwdRow& row, int key) {
  if (kMask && (key < row.visible.x || key > row.visible.y)) return 0.f;
  return fast_exp2(s * scale_log2 - row.lse2);
}

// body(std::true_type) on tiles that need the mask, body(std::false_type) on the others: a
// run-time flag inside the unrolled element loops is if-converted, so the mask's tests
// would run (predicated) on every tile.
template <class Body>
__device__ __forceinline__ void with_mask(bool needs_mask, Body body) {
  if (needs_mask)
    body(std::true_type{});
  else
    body(std::false_type{});
}

// A query tile of the dK/dV program: kBlockN consecutive positions [pos0, pos0 + kBlockN) of
// one query head ``head`` (within the group). Such a tile is a strided block, loaded as K and
// V are (one 64-bit add per row); a tile of packed rows took a division and two wide
// multiplies per row (about 150 instructions per 32-row tile of Q and dO at d = 128). The
// tiles go through the group's heads at each position tile; dK and dV sum over all of them
// in any order, and this one holds no first position across the loop.
struct HeadTile {
  int head, pos0;
  template <int kBlockN>
  __device__ __forceinline__ HeadTile next(int group) const {
    return head + 1 < group ? HeadTile{head + 1, pos0} : HeadTile{0, pos0 + kBlockN};
  }
};

// The atomic-dQ step of the dK/dV program: its dS for one query tile (kBlockN rows x the
// tile's kBlockM keys) goes through shared memory, and the warps split dQ += dS K, each a
// 16-row x 64-column slab, which it adds into the fp32 dQ accumulator.
template <class Tr>
struct AtomicDq {
  using DsTile = mma::SwizzledTile<Tr::kBlockN, Tr::kBlockM>;  // dS, rows = queries, columns = keys
  static constexpr int kRowSlabs = Tr::kBlockN / 16;
  static constexpr int kColumnSlabs = Tr::kWarpsM / kRowSlabs;
  static constexpr int kDimTiles = Tr::kDimTiles / kColumnSlabs;  // 8-column tiles of one warp's slab
  static_assert(Tr::kWarpsM % kRowSlabs == 0 && Tr::kDimTiles % (2 * kColumnSlabs) == 0,
                "the warps tile dQ's kBlockN x head_dim block in whole 16 x 16 slabs");
};

// dst[0] += a and dst[1] += b in global memory, each add atomic: one 8-byte vector reduction
// on sm_90 (dst 8-byte aligned), two scalar ones before it.
__device__ __forceinline__ void atomic_add_pair(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Stage a warp's dS^T accumulators (its 16 keys x the tile's query rows) as dS in the
// [rows][keys] tile, in whole 4-byte words: a lane holds keys g and g + 8 of rows 2t and
// 2t + 1, so it swaps one value with the lane holding the neighbouring key (lane ^ 4) and
// writes the (even key, odd key) pair of one of the two rows.
template <typename T, class DsTile, int kNTiles>
__device__ __forceinline__ void stage_ds(char* ds_tile, int key0, const float (&dst)[1][kNTiles][4], int lane) {
  const int g = lane / 4, t = lane % 4;
  const bool even = (g % 2) == 0;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float row_even = dst[0][nt][2 * half], row_odd = dst[0][nt][2 * half + 1];
      const float partner = __shfl_xor_sync(kFullMask, even ? row_odd : row_even, 4);
      const int row = 8 * nt + 2 * t + (even ? 0 : 1);
      const int key = key0 + 8 * half + (g & ~1);
      const uint32_t pair = even ? mma::pack2<T>(row_even, partner) : mma::pack2<T>(partner, row_odd);
      store_shared(reinterpret_cast<uint32_t*>(ds_tile + DsTile::element_offset(row, key)), pair);
    }
}

// Add a warp's dQ slab (rows [row0, row0 + 16 kMTiles) of the query tile at ``tile``,
// columns [col0, col0 + 8 kDimTiles)) into the fp32 p.dq_accum, atomically; positions past
// the sequence (the next sequence's, or past the tensor) are skipped.
template <int kMTiles, int kDimTiles>
__device__ __forceinline__ void add_dq_slab(const AttentionBwdParams& p, const ProgramTile& pt,
                                            const HeadTile& tile, int row0, int col0,
                                            const float (&dq)[kMTiles][kDimTiles][4], int lane) {
  const int g = lane / 4, t = lane % 4;
  // Recomputed per tile rather than held across the loop: at d = 128 the loop has no
  // registers to spare (sm_80 spilled with it held).
  const int first_pos = tile.pos0 + row0 + g;  // rows 16 mt + 8 r on: positions 8 apart
  const float* target = static_cast<const float*>(tensor_base<float>(
      p.dq_accum, pt.batch, p.dq_accum_stride_b, pt.q_start + first_pos, p.dq_accum_stride_s,
      pt.kv_head * p.group + tile.head, p.dq_accum_stride_h));
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r, target += 8 * p.dq_accum_stride_s) {
      if (first_pos + 16 * mt + 8 * r >= pt.q_len) continue;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; ++dt)
        atomic_add_pair(const_cast<float*>(target) + col0 + 8 * dt + 2 * t, dq[mt][dt][2 * r],
                        dq[mt][dt][2 * r + 1]);
    }
}

// The dK/dV accumulators of one warp: kKeyTiles 16-key tiles from key_row0, kDimTiles
// 8-column tiles from column col0 of the head dim.
template <class Tr>
struct KeySlab {
  static constexpr bool kShared = Tr::kScoresInShared;
  static constexpr int kKeyTiles = kShared ? 2 : 1;
  static constexpr int kDimTiles = kShared ? Tr::kDimTiles / 2 : Tr::kDimTiles;
  static_assert(!kShared || (Tr::kWarpsM == 8 && Tr::kBlockM == 128 && Tr::kBlockN == 64),
                "shared scores: 8 warps, 128 keys x 64-row tiles (2 x 4 warps of 32 x 32 scores)");
  __device__ __forceinline__ static int key_row0(int warp) { return kShared ? 32 * (warp % 4) : 16 * warp; }
  __device__ __forceinline__ static int col0(int warp) { return kShared ? (Tr::kHeadDim / 2) * (warp / 4) : 0; }
};

// Blocks per SM the dK/dV kernel asks ptxas to fit (its launch bounds' minimum; 0 asks
// for none, leaving ptxas its own choice). At d = 64 on sm_90a ptxas chose 168 registers,
// three blocks per SM, and spilled 8 B in the kernel with a window compiled in; asked for
// three blocks it fits them without spills. The atomic-dQ variant (176-226 registers, two
// blocks) spilled 80 B when asked for three, and sm_80 (212-224, two blocks) spilled too:
// both keep ptxas's choice, as does d = 128.
template <class Tr, bool kAtomicDq>
constexpr int key_tile_min_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return Tr::kHeadDim == 64 && !kAtomicDq ? 3 : 0;
#else
  return 0;
#endif
}

// dK and dV of one tile of keys: loops over the query rows of the group that see it. With
// kAtomicDq, also adds each query tile's dS K into p.dq_accum.
template <class Tr, bool kHasWindow, bool kAtomicDq>
__global__ void __launch_bounds__(Tr::kThreads, (key_tile_min_blocks<Tr, kAtomicDq>()))
    attention_bwd_dkdv_kernel(const AttentionBwdParams p) {
  using T = typename Tr::T;
  using KeyTile = typename Tr::RowTile;     // kBlockM keys: K, V, then the dK / dV staging
  using QueryTile = typename Tr::StreamTile;  // kBlockN query rows: Q and dO, two stages
  using Dq = AtomicDq<Tr>;
  using Slab = KeySlab<Tr>;
  using ScoreTile = typename Dq::DsTile;  // [query rows][keys]: dS (atomic dQ), P and dS (shared scores)
  static_assert(Tr::kWarpsN == 1, "warps split the keys (and, with shared scores, the head dim)");
  static_assert(Tr::kScoresInShared || Tr::kMTiles == 1, "registers layout: one 16-key slab per warp");
  IK_DYNAMIC_SHARED(char, smem);
  char* k_tile = smem;
  char* v_tile = smem + KeyTile::kBytes;
  char* q_tiles = v_tile + KeyTile::kBytes;  // stages: Q0 dO0 Q1 dO1
  BwdRow* row_info = reinterpret_cast<BwdRow*>(q_tiles + 4 * QueryTile::kBytes);  // [2][kBlockN]
  char* ds_tile = reinterpret_cast<char*>(row_info + 2 * Tr::kBlockN);  // atomic dQ or shared scores
  char* p_tile = ds_tile + ScoreTile::kBytes;                              // shared scores only
  const uint32_t k_address = mma::shared_address(k_tile), v_address = mma::shared_address(v_tile);
  const uint32_t q_address = mma::shared_address(q_tiles);
  const int thread = thread_in_block<Tr::kThreads>(), lane = thread % 32, warp = thread / 32;

  const ProgramTile pt = program_tile(p, true, Tr::kBlockM);
  const int key0 = pt.tile * Tr::kBlockM;
  if (key0 >= pt.k_len) return;
  const int shift = pt.k_len - pt.q_len;

  const void* k_base = tensor_base<T>(p.k, pt.batch, p.k_stride_b, pt.k_start, p.k_stride_s, pt.kv_head, p.k_stride_h);
  const void* v_base = tensor_base<T>(p.v, pt.batch, p.v_stride_b, pt.k_start, p.v_stride_s, pt.kv_head, p.v_stride_h);
  load_head_rows<T, KeyTile, Tr::kThreads>(k_address, p.k, k_base, p.k_stride_s, key0, pt.k_len);
  load_head_rows<T, KeyTile, Tr::kThreads>(v_address, p.v, v_base, p.v_stride_s, key0, pt.k_len);

  // Query positions that see some key of this tile, [pos_first, pos_end), the first rounded
  // down to a whole tile; every query head of the group runs over them.
  const int key_last = min(key0 + Tr::kBlockM, pt.k_len) - 1;
  int64_t pos_lo = 0, pos_hi = pt.q_len;
  if constexpr (kHasWindow) {
    if (p.has_right) pos_lo = max(pos_lo, int64_t(key0) - shift - p.window_right);
    if (p.has_left) pos_hi = min(pos_hi, int64_t(key_last) - shift + p.window_left + 1);
  }
  const int pos_first = static_cast<int>(min(pos_lo, int64_t(pt.q_len)) / Tr::kBlockN * Tr::kBlockN);
  const int pos_end = static_cast<int>(max(pos_hi, int64_t(0)));

  const void* q_base = tensor_base<T>(p.q, pt.batch, p.q_stride_b, pt.q_start, p.q_stride_s, pt.kv_head * p.group,
                                      p.q_stride_h);
  const void* do_base = tensor_base<T>(p.dout, pt.batch, p.dout_stride_b, pt.q_start, p.dout_stride_s,
                                       pt.kv_head * p.group, p.dout_stride_h);
  // Row info: thread r < kBlockN handles row r of a tile. In the registers layout, the next
  // tile's info is loaded at the start of a tile and stored at its end, so the global loads'
  // latency hides behind the products (stored at once, they stall the row-info warp at the
  // start of every tile); the shared-scores layout has no registers to hold it (it spilled).
  static_assert(Tr::kBlockN <= Tr::kThreads, "one row of info per thread");
  constexpr bool kDeferInfo = !Tr::kScoresInShared;
  const bool row_info_thread = threadIdx.x < Tr::kBlockN;
  auto load_rows = [&](const HeadTile& tile, int stage, bool with_info) {
    const uint32_t q_stage = q_address + 2 * stage * QueryTile::kBytes;
    load_head_rows<T, QueryTile, Tr::kThreads>(q_stage, p.q, static_cast<const T*>(q_base) + tile.head * p.q_stride_h,
                                               p.q_stride_s, tile.pos0, pt.q_len);
    load_head_rows<T, QueryTile, Tr::kThreads>(q_stage + QueryTile::kBytes, p.dout,
                                               static_cast<const T*>(do_base) + tile.head * p.dout_stride_h,
                                               p.dout_stride_s, tile.pos0, pt.q_len);
    if (with_info && row_info_thread)
      store_shared(row_info + stage * Tr::kBlockN + threadIdx.x,
                   bwd_row_at<kHasWindow>(p, pt, tile.pos0 + threadIdx.x, tile.head, shift));
  };
  if (pos_first < pos_end) load_rows(HeadTile{0, pos_first}, 0, true);
  mma::cp_async_commit();

  float dk[Slab::kKeyTiles][Slab::kDimTiles][4], dv[Slab::kKeyTiles][Slab::kDimTiles][4];
  zero(dk);
  zero(dv);
  const int slab_key0 = Slab::key_row0(warp), slab_col0 = Slab::col0(warp);
  const int g = lane / 4, t = lane % 4;
  int stage = 0;
  HeadTile next{0, pos_first};
  for (HeadTile tile = next; tile.pos0 < pos_end; tile = next, stage ^= 1) {
    mma::cp_async_wait<0>();  // one barrier per tile, as in the forward
    __syncthreads();
    next = tile.next<Tr::kBlockN>(p.group);
    const bool has_next = next.pos0 < pos_end;
    BwdRow next_info;
    if (has_next) {
      load_rows(next, stage ^ 1, !kDeferInfo);
      if (kDeferInfo && row_info_thread)
        next_info = bwd_row_at<kHasWindow>(p, pt, next.pos0 + threadIdx.x, next.head, shift);
    }
    mma::cp_async_commit();
    const uint32_t q_stage = q_address + 2 * stage * QueryTile::kBytes, do_stage = q_stage + QueryTile::kBytes;
    const BwdRow* info = row_info + stage * Tr::kBlockN;
    // Whether some (key, row) pair of this tile pair is hidden: tiles past the keys' end, or
    // rows whose visible range does not cover every key of the tile.
    bool needs_mask = key0 + Tr::kBlockM > pt.k_len;
    if constexpr (kHasWindow) {
      const int last_pos = min(tile.pos0 + Tr::kBlockN, pt.q_len) - 1;
      needs_mask = needs_mask || visible_keys<kHasWindow>(p, last_pos, pt.k_len, shift).x > key0 ||
                   visible_keys<kHasWindow>(p, tile.pos0, pt.k_len, shift).y < key0 + Tr::kBlockM - 1;
    }

    if constexpr (Tr::kScoresInShared) {
      // S = Q K^T and dP = dO V^T for this warp's 32 rows x 32 keys; P and dS to shared memory.
      // P is rounded to T before dS = P (dP - delta) uses it, as eager autograd does with
      // softmax's output; so only P's 16-bit pairs stay live through the dP product.
      const int score_row0 = 32 * (warp % 2), score_key0 = 32 * (warp / 2);
      uint32_t prob[2][4][2];
      {
        float s[2][4][4];
        zero(s);
        gemm_abt<T, QueryTile, KeyTile, 2, 4, Tr::kKSteps>(s, q_stage, score_row0, k_address, score_key0, lane);
        with_mask(needs_mask, [&](auto mask) {
          constexpr bool kMask = decltype(mask)::value;
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const BwdRow& row = shared_view(info + score_row0 + 16 * mt + g + 8 * r);
                const int key = key0 + score_key0 + 8 * nt + 2 * t;
                const float low = bwd_probability<kMask>(s[mt][nt][2 * r], p.scale_log2, row, key);
                const float high = bwd_probability<kMask>(s[mt][nt][2 * r + 1], p.scale_log2, row, key + 1);
                prob[mt][nt][r] = mma::pack2<T>(low, high);
              }
        });
      }
      stage_pairs<ScoreTile>(p_tile, score_row0, score_key0, prob, lane);
      float dp[2][4][4];
      zero(dp);
      gemm_abt<T, QueryTile, KeyTile, 2, 4, Tr::kKSteps>(dp, do_stage, score_row0, v_address, score_key0, lane);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float delta = load_shared(&info[score_row0 + 16 * mt + g + 8 * r].delta);
            const float2 pair = mma::unpack2<T>(prob[mt][nt][r]);
            dp[mt][nt][2 * r] = pair.x * (dp[mt][nt][2 * r] - delta);
            dp[mt][nt][2 * r + 1] = pair.y * (dp[mt][nt][2 * r + 1] - delta);
          }
      stage_rows<T, ScoreTile>(ds_tile, score_row0, dp, 1.f, lane, score_key0);
      __syncthreads();  // every warp's P and dS; the next tile's loop-top barrier orders their rewrite
      // dV += P^T dO and dK += dS^T Q (scaled once at the end) for this warp's keys x columns.
      const uint32_t p_address = mma::shared_address(p_tile), ds_address = mma::shared_address(ds_tile);
      constexpr int kRowSteps = Tr::kBlockN / 16;
      gemm_ab<T, true, ScoreTile, QueryTile, 2, kRowSteps, Slab::kDimTiles>(dv, p_address, slab_key0, do_stage,
                                                                            slab_col0 / 16, lane);
      gemm_ab<T, true, ScoreTile, QueryTile, 2, kRowSteps, Slab::kDimTiles>(dk, ds_address, slab_key0, q_stage,
                                                                            slab_col0 / 16, lane);
      if constexpr (kAtomicDq) {
        // dQ += dS K over this tile's keys (scaled in the conversion): 32 rows x d/4 per warp.
        constexpr int kDqDimTiles = Tr::kDimTiles / 4;
        const int dq_row0 = 32 * (warp % 2), dq_col0 = (Tr::kHeadDim / 4) * (warp / 2);
        float dq[2][kDqDimTiles][4];
        zero(dq);
        gemm_ab<T, false, ScoreTile, KeyTile, 2, Tr::kBlockM / 16, kDqDimTiles>(dq, ds_address, dq_row0, k_address,
                                                                                dq_col0 / 16, lane);
        add_dq_slab(p, pt, tile, dq_row0, dq_col0, dq, lane);
      }
    } else {
      // S^T = K Q^T: this warp's 16 keys x the tile's query rows.
      float pt_[1][Tr::kNTiles][4];
      zero(pt_);
      gemm_abt<T, KeyTile, QueryTile, 1, Tr::kNTiles, Tr::kKSteps>(pt_, k_address, slab_key0, q_stage, 0, lane);
      with_mask(needs_mask, [&](auto mask) {
        constexpr bool kMask = decltype(mask)::value;
#pragma unroll
        for (int nt = 0; nt < Tr::kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + slab_key0 + g + 8 * (e / 2);
            pt_[0][nt][e] = bwd_probability<kMask>(pt_[0][nt][e], p.scale_log2,
                                                   shared_view(info + 8 * nt + 2 * t + e % 2), key);
          }
      });
      // dV += P^T dO
      gemm_pb<T, QueryTile, 1, Tr::kNTiles / 2, Tr::kDimTiles>(dv, pt_, do_stage, 0, lane);
      // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta) in place of P^T
      float dpt[1][Tr::kNTiles][4];
      zero(dpt);
      gemm_abt<T, KeyTile, QueryTile, 1, Tr::kNTiles, Tr::kKSteps>(dpt, v_address, slab_key0, do_stage, 0, lane);
#pragma unroll
      for (int nt = 0; nt < Tr::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) pt_[0][nt][e] *= dpt[0][nt][e] - load_shared(&info[8 * nt + 2 * t + e % 2].delta);
      if constexpr (kAtomicDq) stage_ds<T, ScoreTile>(ds_tile, slab_key0, pt_, lane);
      // dK += dS^T Q (scaled once at the end)
      gemm_pb<T, QueryTile, 1, Tr::kNTiles / 2, Tr::kDimTiles>(dk, pt_, q_stage, 0, lane);
      if constexpr (kAtomicDq) {
        // dQ += dS K over this tile's keys (scaled in the conversion). The barrier publishes
        // every warp's dS; the next tile's loop-top barrier keeps its rewrite behind these reads.
        __syncthreads();
        const int slab_row = 16 * (warp % Dq::kRowSlabs), slab_step = (warp / Dq::kRowSlabs) * Dq::kDimTiles / 2;
        float dq[1][Dq::kDimTiles][4];
        zero(dq);
        gemm_ab<T, false, ScoreTile, KeyTile, 1, Tr::kBlockM / 16, Dq::kDimTiles>(
            dq, mma::shared_address(ds_tile), slab_row, k_address, slab_step, lane);
        add_dq_slab(p, pt, tile, slab_row, 16 * slab_step, dq, lane);
      }
    }
    // The other stage's info was last read in the previous tile, before this tile's barrier.
    if (kDeferInfo && has_next && row_info_thread)
      store_shared(row_info + (stage ^ 1) * Tr::kBlockN + threadIdx.x, next_info);
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // K / V copies by other threads landed, and every warp's reads of K are done

  // Stage dK and dV in the K and V tiles, then each warp copies out 16 keys. With scores in
  // registers a warp stages its own 16 keys; with shared scores, other warps' columns too.
  stage_rows<T, KeyTile>(k_tile, slab_key0, dk, p.scale, lane, slab_col0);
  stage_rows<T, KeyTile>(v_tile, slab_key0, dv, 1.f, lane, slab_col0);
  if constexpr (Tr::kScoresInShared) __syncthreads();
  else __syncwarp();
  T* dk_base = static_cast<T*>(p.dk) + pt.batch * p.dk_stride_b + pt.k_start * p.dk_stride_s + pt.kv_head * p.dk_stride_h;
  T* dv_base = static_cast<T*>(p.dv) + pt.batch * p.dv_stride_b + pt.k_start * p.dv_stride_s + pt.kv_head * p.dv_stride_h;
  const int first_key = key0 + 16 * warp;
  store_rows<KeyTile>(k_tile, 16 * warp, 16, lane, [&](int r) -> void* {
    return first_key + r < pt.k_len ? dk_base + int64_t(first_key + r) * p.dk_stride_s : nullptr;
  });
  store_rows<KeyTile>(v_tile, 16 * warp, 16, lane, [&](int r) -> void* {
    return first_key + r < pt.k_len ? dv_base + int64_t(first_key + r) * p.dv_stride_s : nullptr;
  });
}

// dQ of one tile of packed query rows: loops over the key tiles they see.
template <class Tr, bool kHasWindow>
__global__ void __launch_bounds__(Tr::kThreads, 1) attention_bwd_dq_kernel(const AttentionBwdParams p) {
  using T = typename Tr::T;
  using RowTile = typename Tr::RowTile;        // Q, dO; then the dQ staging (in Q)
  using StreamTile = typename Tr::StreamTile;  // K and V, two stages
  static_assert(Tr::kWarpsN == 1, "each warp its own query rows");
  IK_DYNAMIC_SHARED(char, smem);
  char* q_tile = smem;
  char* do_tile = smem + RowTile::kBytes;
  char* kv_tiles = do_tile + RowTile::kBytes;  // stages: K0 V0 K1 V1
  BwdRow* row_info = reinterpret_cast<BwdRow*>(kv_tiles + 4 * StreamTile::kBytes);  // [kBlockM]
  const uint32_t q_address = mma::shared_address(q_tile), do_address = mma::shared_address(do_tile);
  const uint32_t kv_address = mma::shared_address(kv_tiles);
  const int thread = thread_in_block<Tr::kThreads>(), lane = thread % 32, warp = thread / 32;
  const int warp_row0 = warp * Tr::kWarpRows;

  const ProgramTile pt = program_tile(p, false, Tr::kBlockM);
  const int rows = pt.q_len * p.group, row0 = pt.tile * Tr::kBlockM;
  if (row0 >= rows) return;
  const int shift = pt.k_len - pt.q_len;

  const void* q_base = tensor_base<T>(p.q, pt.batch, p.q_stride_b, pt.q_start, p.q_stride_s, pt.kv_head * p.group,
                                      p.q_stride_h);
  const void* do_base = tensor_base<T>(p.dout, pt.batch, p.dout_stride_b, pt.q_start, p.dout_stride_s,
                                       pt.kv_head * p.group, p.dout_stride_h);
  const PackedOperand operands[2] = {{q_base, p.q_stride_s, p.q_stride_h, p.q},
                                     {do_base, p.dout_stride_s, p.dout_stride_h, p.dout}};
  load_packed_rows<T, RowTile, Tr::kThreads>(q_address, operands, row0, rows, p.group_divisor);  // Q, then dO
  const int pos_first = fast_divide(row0, p.group_divisor);
  const int pos_last = fast_divide(min(row0 + Tr::kBlockM, rows) - 1, p.group_divisor);
  const KeyRange range = key_range<kHasWindow, Tr::kBlockN>(p, pos_first, pos_last, pt.k_len, shift);
  const void* k_base = tensor_base<T>(p.k, pt.batch, p.k_stride_b, pt.k_start, p.k_stride_s, pt.kv_head, p.k_stride_h);
  const void* v_base = tensor_base<T>(p.v, pt.batch, p.v_stride_b, pt.k_start, p.v_stride_s, pt.kv_head, p.v_stride_h);
  auto load_kv = [&](int n0, int stage) {
    const uint32_t k_stage = kv_address + 2 * stage * StreamTile::kBytes;
    load_head_rows<T, StreamTile, Tr::kThreads>(k_stage, p.k, k_base, p.k_stride_s, n0, pt.k_len);
    load_head_rows<T, StreamTile, Tr::kThreads>(k_stage + StreamTile::kBytes, p.v, v_base, p.v_stride_s, n0, pt.k_len);
  };
  if (range.lo < range.hi) load_kv(range.lo, 0);
  mma::cp_async_commit();

  // The rows' statistics and visible keys wait in shared memory (the first tile's barrier
  // publishes them); each tile reads those of a thread's rows, warp_row0 + 16 mt + g + 8 r.
  // Held in registers across the key loop, they made the 32-row layout spill.
  static_assert(Tr::kBlockM <= Tr::kThreads, "one row of info per thread");
  if (threadIdx.x < Tr::kBlockM)
    store_shared(row_info + threadIdx.x, bwd_row<kHasWindow>(p, pt, row0 + threadIdx.x, shift));
  const int g = lane / 4, t = lane % 4;

  float dq[Tr::kMTiles][Tr::kDimTiles][4];
  zero(dq);
  int stage = 0;
  for (int n0 = range.lo; n0 < range.hi; n0 += Tr::kBlockN, stage ^= 1) {
    mma::cp_async_wait<0>();  // one barrier per tile, as in the forward
    __syncthreads();
    if (n0 + Tr::kBlockN < range.hi) load_kv(n0 + Tr::kBlockN, stage ^ 1);
    mma::cp_async_commit();
    const uint32_t k_stage = kv_address + 2 * stage * StreamTile::kBytes, v_stage = k_stage + StreamTile::kBytes;
    // P = exp2(S scale_log2 - lse2) is rounded to T before dS = P (dP - delta) uses it, as
    // eager autograd does with softmax's output; so only P's 16-bit pairs are live through
    // the dP product (fp32 P there made the 32-row layout spill at d = 128).
    uint32_t prob[Tr::kMTiles][Tr::kNTiles][2];
    const BwdRow* info = row_info + warp_row0 + g;  // rows 16 mt + 8 r on
    {
      float s[Tr::kMTiles][Tr::kNTiles][4];
      zero(s);
      gemm_abt<T, RowTile, StreamTile, Tr::kMTiles, Tr::kNTiles, Tr::kKSteps>(s, q_address, warp_row0, k_stage, 0,
                                                                              lane);
      with_mask(range.needs_mask(n0, Tr::kBlockN), [&](auto mask) {
        constexpr bool kMask = decltype(mask)::value;
#pragma unroll
        for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const BwdRow& row = shared_view(info + 16 * mt + 8 * r);
#pragma unroll
            for (int nt = 0; nt < Tr::kNTiles; ++nt) {
              const int key = n0 + 8 * nt + 2 * t;
              prob[mt][nt][r] =
                  mma::pack2<T>(bwd_probability<kMask>(s[mt][nt][2 * r], p.scale_log2, row, key),
                                bwd_probability<kMask>(s[mt][nt][2 * r + 1], p.scale_log2, row, key + 1));
            }
          }
      });
    }
    // dS = P (dP - delta), in place of dP.
    float ds[Tr::kMTiles][Tr::kNTiles][4];
    zero(ds);
    gemm_abt<T, RowTile, StreamTile, Tr::kMTiles, Tr::kNTiles, Tr::kKSteps>(ds, do_address, warp_row0, v_stage, 0,
                                                                            lane);
#pragma unroll
    for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < Tr::kNTiles; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float delta = load_shared(&info[16 * mt + 8 * r].delta);
          const float2 pair = mma::unpack2<T>(prob[mt][nt][r]);
          ds[mt][nt][2 * r] = pair.x * (ds[mt][nt][2 * r] - delta);
          ds[mt][nt][2 * r + 1] = pair.y * (ds[mt][nt][2 * r + 1] - delta);
        }
    gemm_pb<T, StreamTile, Tr::kMTiles, Tr::kNTiles / 2, Tr::kDimTiles>(dq, ds, k_stage, 0, lane);
  }
  mma::cp_async_wait<0>();
  __syncthreads();

  stage_rows<T, RowTile>(q_tile, warp_row0, dq, p.scale, lane);
  __syncwarp();
  const void* dq_base = tensor_base<T>(p.dq, pt.batch, p.dq_stride_b, pt.q_start, p.dq_stride_s, pt.kv_head * p.group,
                                       p.dq_stride_h);
  store_rows<RowTile>(q_tile, warp_row0, Tr::kWarpRows, lane, [&](int r) -> void* {
    const int row = row0 + warp_row0 + r;
    return row < rows ? const_cast<void*>(
                            packed_row_address<T>(dq_base, row, p.group_divisor, p.dq_stride_s, p.dq_stride_h))
                      : nullptr;
  });
}

// dq = scale * dq_accum rounded to T, one warp per (b, s, h) row: the last step of the
// atomic-dQ backward.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) attention_bwd_dq_convert_kernel(const AttentionBwdParams p) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert(kChunks <= 32, "one 8-value chunk per lane");
  const int lane = threadIdx.x % 32;
  QueryRow row;
  if (!warp_query_row(p, row) || lane >= kChunks) return;
  float values[8];
  load_floats<float, 8>(p.dq_accum + row.batch * p.dq_accum_stride_b + row.pos * p.dq_accum_stride_s +
                            row.head * p.dq_accum_stride_h, lane * 8, kHeadDim, true, values);
#pragma unroll
  for (int i = 0; i < 8; ++i) values[i] *= p.scale;
  store_floats<T, 8>(static_cast<T*>(p.dq) + row.batch * p.dq_stride_b + row.pos * p.dq_stride_s +
                         row.head * p.dq_stride_h, lane * 8, kHeadDim, true, values);
}

// ---------------------------------------------------------------------------------------
// KV-cache append: one block per (new token, batch row), 16-byte chunks over the k heads then
// the v heads; k rotates on the way when rotary tables are given. fp8 caches (kFormat) take
// each chunk's 8 values as 8 bytes, each x / the head's scale rounded by fp8_entry.
// ---------------------------------------------------------------------------------------

template <typename T, CacheFormat kFormat>
__device__ __forceinline__ uint2 fp8_entries(const uint4& chunk, float scale) {
  T values[8];
  std::memcpy(values, &chunk, sizeof(values));
  uint32_t words[2] = {0u, 0u};
#pragma unroll
  for (int j = 0; j < 8; ++j) words[j / 4] |= fp8_entry<kFormat>(to_float(values[j]), scale) << (8 * (j % 4));
  return make_uint2(words[0], words[1]);
}

template <typename T, CacheFormat kFormat = CacheFormat::kNone>
__global__ void __launch_bounds__(128) kvcache_append_kernel(const KvcacheAppendParams p) {
  constexpr int kPerChunk = 16 / sizeof(T);
  const int64_t i = blockIdx.x, batch = blockIdx.y;
  const int64_t slot = int64_t(p.cache_seqlens[batch]) + i;
  if (slot < 0 || slot >= p.capacity) return;
  // The slot's row: (batch, slot) of contiguous caches, or (page, row within it) of pages.
  int64_t k_row = batch * p.k_cache_stride_b + slot * p.k_cache_stride_s;
  int64_t v_row = batch * p.v_cache_stride_b + slot * p.v_cache_stride_s;
  if (p.paged.block_table != nullptr) {
    const int32_t* pages = p.paged.block_table + batch * p.paged.table_stride;
    k_row = paged_row_offset(p.paged, pages, static_cast<int>(slot), p.k_cache_stride_b, p.k_cache_stride_s);
    v_row = paged_row_offset(p.paged, pages, static_cast<int>(slot), p.v_cache_stride_b, p.v_cache_stride_s);
  }
  const int chunks = p.head_dim / kPerChunk, per_tensor = p.heads * chunks;
  const bool rotate_k = p.rotary.cos != nullptr;
  for (int c = threadIdx.x; c < 2 * per_tensor; c += blockDim.x) {
    const bool is_k = c < per_tensor;
    const int64_t head = (c % per_tensor) / chunks;
    const int col = (c % chunks) * kPerChunk;
    const T* source = is_k ? static_cast<const T*>(p.k) + batch * p.k_stride_b + i * p.k_stride_s + head * p.k_stride_h
                           : static_cast<const T*>(p.v) + batch * p.v_stride_b + i * p.v_stride_s + head * p.v_stride_h;
    const uint4 chunk =
        is_k && rotate_k ? rotated_chunk<T>(source, col, slot, p.rotary) : load_global<uint4>(source + col);
    if constexpr (kFormat == CacheFormat::kNone) {
      T* target = is_k ? static_cast<T*>(p.k_cache) + k_row + head * p.k_cache_stride_h
                       : static_cast<T*>(p.v_cache) + v_row + head * p.v_cache_stride_h;
      store_global(target + col, chunk);
    } else {
      // One byte an entry (the strides count entries); the rotated k as the rotary op returns
      // it, rounded to T first.
      uint8_t* target = is_k ? static_cast<uint8_t*>(p.k_cache) + k_row + head * p.k_cache_stride_h
                             : static_cast<uint8_t*>(p.v_cache) + v_row + head * p.v_cache_stride_h;
      const float scale =
          is_k ? p.fp8.k_scale[head * p.fp8.k_scale_stride] : p.fp8.v_scale[head * p.fp8.v_scale_stride];
      store_global(target + col, fp8_entries<T, kFormat>(chunk, scale));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (tiles, B, Hkv) for dense inputs; (total tiles + sequences, 1, Hkv) for packed ones
// (each sequence wastes at most one partial tile).
inline dim3 tile_grid(const AttentionParams& p, int64_t rows_per_sequence, int block) {
  if (p.cu_seqlens_q != nullptr)
    return dim3(static_cast<unsigned>(ceil_div(rows_per_sequence, block) + p.num_sequences), 1, p.heads_kv);
  return dim3(static_cast<unsigned>(ceil_div(rows_per_sequence, block)), p.batch, p.heads_kv);
}

template <class Kernel, class Params>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream, const Params& p) {
  return launch_kernel(kernel, grid, dim3(threads), smem_bytes, stream, p);
}

}  // namespace attention_detail

namespace attention_detail {
// The caller's parameters with the group's divisor, which the kernels divide packed rows by.
template <class Params>
Params with_group_divisor(const Params& params) {
  Params p = params;
  p.group_divisor = FastDivisor(static_cast<uint32_t>(p.group));
  return p;
}

// Shared memory of the dK/dV kernel: K, V, 2 stages of Q and dO, row info, then the score
// tiles (dS for atomic dQ; P and dS with shared scores).
template <class Tr, bool kAtomicDq>
constexpr int key_tile_shared_bytes() {
  const int score_tiles = Tr::kScoresInShared ? 2 : kAtomicDq ? 1 : 0;
  return 2 * Tr::RowTile::kBytes + 4 * Tr::StreamTile::kBytes + 2 * Tr::kBlockN * static_cast<int>(sizeof(BwdRow)) +
         score_tiles * AtomicDq<Tr>::DsTile::kBytes;
}

// The dK/dV kernel over every key tile.
template <class Tr, bool kHasWindow, bool kAtomicDq>
cudaError_t launch_key_tiles(const AttentionBwdParams& p, cudaStream_t stream) {
  return launch(attention_bwd_dkdv_kernel<Tr, kHasWindow, kAtomicDq>, tile_grid(p, p.seqlen_k, Tr::kBlockM),
                Tr::kThreads, key_tile_shared_bytes<Tr, kAtomicDq>(), stream, p);
}

// The dQ kernel over every tile of packed query rows: shared memory for Q, dO, two stages of
// K and V, and the rows' info.
template <class Tr, bool kHasWindow>
cudaError_t launch_query_tiles(const AttentionBwdParams& p, cudaStream_t stream) {
  constexpr int kShared = 2 * Tr::RowTile::kBytes + 4 * Tr::StreamTile::kBytes + Tr::kBlockM * sizeof(BwdRow);
  return launch(attention_bwd_dq_kernel<Tr, kHasWindow>, tile_grid(p, int64_t(p.seqlen_q) * p.group, Tr::kBlockM),
                Tr::kThreads, kShared, stream, p);
}

// The dK/dV kernel in the layout p.key_block asks for: 128 keys with shared scores at d = 128
// where a block may take their 162 KB (not on sm_86 / sm_89), else 64 keys.
template <typename T, int kHeadDim, bool kHasWindow, bool kAtomicDq>
cudaError_t launch_key_layout(const AttentionBwdParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim == 128) {
    using SharedTr = BwdKeySharedTraits<T, kHeadDim>;
    if (p.key_block == 128 && shared_memory_per_block_optin() >= key_tile_shared_bytes<SharedTr, kAtomicDq>())
      return launch_key_tiles<SharedTr, kHasWindow, kAtomicDq>(p, stream);
  }
  return launch_key_tiles<BwdKeyTraits<T, kHeadDim>, kHasWindow, kAtomicDq>(p, stream);
}

// Shared memory of a forward or decode program: its query rows, and two stages of K and V.
template <class Tr>
constexpr int forward_shared_bytes() {
  return Tr::RowTile::kBytes + 4 * Tr::StreamTile::kBytes;
}

template <class Tr, bool kHasWindow>
cudaError_t launch_forward_tiles(const AttentionDecodeParams& p, cudaStream_t stream) {
  return launch(attention_fwd_kernel<Tr, kHasWindow, false>, tile_grid(p, int64_t(p.seqlen_q) * p.group, Tr::kBlockM),
                Tr::kThreads, forward_shared_bytes<Tr>(), stream, p);
}
}  // namespace attention_detail

template <typename T, int kHeadDim, bool kHasWindow>
cudaError_t launch_attention_fwd(const AttentionParams& params, cudaStream_t stream) {
  using namespace attention_detail;
  if (params.group < 1) return cudaErrorInvalidValue;
  AttentionDecodeParams p;
  static_cast<AttentionParams&>(p) = with_group_divisor(params);
  if (params.forward_warp_rows == 32)
    return launch_forward_tiles<ForwardTraits<T, kHeadDim, 32>, kHasWindow>(p, stream);
  if (params.forward_warp_rows != 16) return cudaErrorInvalidValue;  // the glue checks it first
  return launch_forward_tiles<ForwardTraits<T, kHeadDim, 16>, kHasWindow>(p, stream);
}

template <typename T, int kHeadDim>
cudaError_t launch_attention_decode(const AttentionDecodeParams& params, cudaStream_t stream) {
  using namespace attention_detail;
  if (params.group < 1) return cudaErrorInvalidValue;
  const AttentionDecodeParams p = with_group_divisor(params);
  using Tr = DecodeTraits<T, kHeadDim>;
  const int64_t rows = int64_t(p.seqlen_q) * p.group;
  // Batch and KV heads ride on the grid's x axis with the row tiles: y and z stop at 65535,
  // which B x Hkv passes from a batch of 2048 at 32 KV heads; x at 2^31 - 1.
  const int64_t batch_heads = int64_t(p.batch) * p.heads_kv;
  const int64_t split_programs = (p.rows_padded / Tr::kBlockM) * batch_heads;
  const int64_t combine_blocks = ceil_div(rows, 4) * batch_heads;
  if (p.rows_padded != ceil_div(rows, Tr::kBlockM) * Tr::kBlockM || split_programs > kMaxGridX ||
      combine_blocks > kMaxGridX || p.splits > kMaxGridYZ)
    return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(split_programs), static_cast<unsigned>(p.splits));
  // The mask is a run-time choice here: decode steps are bandwidth-bound, the mask test is free.
  cudaError_t error = cudaErrorInvalidValue;
  switch (p.fp8.format) {
    case CacheFormat::kNone:
      error = launch(attention_fwd_kernel<Tr, true, true>, grid, Tr::kThreads, forward_shared_bytes<Tr>(), stream, p);
      break;
    case CacheFormat::kE4M3:
      error = launch(attention_fwd_kernel<Tr, true, true, CacheFormat::kE4M3>, grid, Tr::kThreads,
                     forward_shared_bytes<Tr>(), stream, p);
      break;
    case CacheFormat::kE5M2:
      error = launch(attention_fwd_kernel<Tr, true, true, CacheFormat::kE5M2>, grid, Tr::kThreads,
                     forward_shared_bytes<Tr>(), stream, p);
      break;
  }
  if (error != cudaSuccess) return error;
  return launch(attention_decode_combine_kernel<T, kHeadDim>, dim3(static_cast<unsigned>(combine_blocks)), 128, 0,
                stream, p);
}

namespace attention_detail {
// Programs of the decode kernel for kFormat caches one SM of the current device runs at once,
// asked once per device (decode calls are short enough for a driver query to show).
template <class Tr, CacheFormat kFormat>
int decode_programs_per_sm() {
#ifdef IK_CUDA_EMULATION
  return 3;  // the pretend GPU's SMs run as many as an H100's do at d = 128
#else
  const auto kernel = attention_fwd_kernel<Tr, true, true, kFormat>;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet (one table per kernel)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device < kMaxDevices && known[device].load(std::memory_order_relaxed) > 0)
    return known[device].load(std::memory_order_relaxed);
  constexpr int kShared = forward_shared_bytes<Tr>();
  // The occupancy query counts only the dynamic shared memory the kernel has opted in to.
  int programs = 0;
  if (opt_in_shared_memory(reinterpret_cast<const void*>(kernel), kShared) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&programs, kernel, Tr::kThreads, kShared) != cudaSuccess)
    return 1;
  programs = programs > 0 ? programs : 1;
  if (device < kMaxDevices) known[device].store(programs, std::memory_order_relaxed);
  return programs;
#endif
}
}  // namespace attention_detail

template <typename T, int kHeadDim>
int attention_decode_programs_per_sm(CacheFormat format) {
  using namespace attention_detail;
  using Tr = DecodeTraits<T, kHeadDim>;
  switch (format) {
    case CacheFormat::kE4M3:
      return decode_programs_per_sm<Tr, CacheFormat::kE4M3>();
    case CacheFormat::kE5M2:
      return decode_programs_per_sm<Tr, CacheFormat::kE5M2>();
    default:
      return decode_programs_per_sm<Tr, CacheFormat::kNone>();
  }
}

template <typename T>
cudaError_t launch_kvcache_append(const KvcacheAppendParams& p, cudaStream_t stream) {
  using namespace attention_detail;
  if (p.batch == 0 || p.new_tokens == 0) return cudaSuccess;
  const dim3 grid(p.new_tokens, p.batch);
  switch (p.fp8.format) {
    case CacheFormat::kNone:
      return launch(kvcache_append_kernel<T>, grid, 128, 0, stream, p);
    case CacheFormat::kE4M3:
      return launch(kvcache_append_kernel<T, CacheFormat::kE4M3>, grid, 128, 0, stream, p);
    case CacheFormat::kE5M2:
      return launch(kvcache_append_kernel<T, CacheFormat::kE5M2>, grid, 128, 0, stream, p);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kHeadDim, bool kHasWindow>
cudaError_t launch_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  using namespace attention_detail;
  if (params.group < 1) return cudaErrorInvalidValue;
  // Layout choices checked before any launch (the glue checks them first).
  if ((params.key_block != 64 && params.key_block != 128) || (params.dq_warp_rows != 16 && params.dq_warp_rows != 32))
    return cudaErrorInvalidValue;
  const AttentionBwdParams p = with_group_divisor(params);
  const int64_t delta_rows = int64_t(p.batch) * p.seqlen_q * p.heads_q;
  // dq_accum is zeroed as one block, added to by 8-byte vector atomics (sm_90) and read back in
  // 16-byte loads: it must be contiguous (B, Sq, Hq, D) fp32 from a 16-byte aligned address
  // (the glue allocates it so).
  if (p.dq_accum != nullptr &&
      (reinterpret_cast<uintptr_t>(p.dq_accum) % 16 != 0 || p.dq_accum_stride_h != kHeadDim ||
       p.dq_accum_stride_s != int64_t(p.heads_q) * kHeadDim || p.dq_accum_stride_b != int64_t(p.seqlen_q) * p.heads_q * kHeadDim))
    return cudaErrorInvalidValue;
  cudaError_t error = launch(attention_bwd_delta_kernel<T, kHeadDim>, dim3(static_cast<unsigned>(ceil_div(delta_rows, 4))),
                             128, 0, stream, p);
  if (error != cudaSuccess) return error;
  const bool atomic_dq = p.dq_accum != nullptr;
  if (atomic_dq) {
    error = zero_async(p.dq_accum, static_cast<size_t>(delta_rows) * kHeadDim * sizeof(float), stream);
    if (error != cudaSuccess) return error;
  }
  error = atomic_dq ? launch_key_layout<T, kHeadDim, kHasWindow, true>(p, stream)
                    : launch_key_layout<T, kHeadDim, kHasWindow, false>(p, stream);
  if (error != cudaSuccess) return error;
  if (atomic_dq)
    return launch(attention_bwd_dq_convert_kernel<T, kHeadDim>, dim3(static_cast<unsigned>(ceil_div(delta_rows, 4))),
                  128, 0, stream, p);
  return p.dq_warp_rows == 16 ? launch_query_tiles<BwdQueryTraits<T, kHeadDim, 16>, kHasWindow>(p, stream)
                              : launch_query_tiles<BwdQueryTraits<T, kHeadDim, 32>, kHasWindow>(p, stream);
}

}  // namespace internlm_kernels
