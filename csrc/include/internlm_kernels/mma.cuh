// Ampere-class tensor-core primitives (sm_80+, also run on sm_90): inline PTX for
// cp.async, ldmatrix and mma.sync.m16n8k16, plus the swizzled shared-memory tile they read.
// Torch-free. The fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16"):
// with g = lane / 4 and t = lane % 4,
//   A (16 x 16, row-major), 4 registers of 2 x 16-bit:  a0 (g, 2t..2t+1), a1 (g + 8, 2t..),
//                                                       a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..)
//   B (16 x 8, k-major),    2 registers:                b0 (k = 2t..2t+1, n = g), b1 (k = 2t + 8.., n = g)
//   C (16 x 8, fp32),       4 floats:                   c0, c1 (g, 2t..2t+1), c2, c3 (g + 8, 2t..)
// so the C fragments of two neighbouring 8-column tiles are, packed to 16 bits, the A
// fragment of the next product (P = softmax(S) feeds P V without a trip through memory).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#ifdef IK_CUDA_EMULATION
#include "internlm_kernels/emulation.h"
#endif

namespace internlm_kernels {
namespace mma {

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
#ifdef IK_CUDA_EMULATION
  return emulation::shared_address(ptr);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
#endif
}

// ---------------------------------------------------------------------------------------
// cp.async: global -> shared without a register round trip, so the next K/V tile streams in
// while the tensor cores work on the current one. ``valid == false`` writes 16 zero bytes
// (rows past the sequence end) and reads nothing; ``src`` must still be a mapped address.
// ---------------------------------------------------------------------------------------

#ifdef IK_CUDA_EMULATION
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  emulation::cp_async_16(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { emulation::cp_async_commit(); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  emulation::cp_async_wait(kPending);
}
#else
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most ``kPending`` of this thread's committed groups are still in flight.
// The memory clobber keeps the compiler from moving this thread's plain shared-memory reads
// of the landed data above the wait (a volatile asm alone orders only other asm), where no
// barrier follows it.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#endif

// ---------------------------------------------------------------------------------------
// ldmatrix: four 8x8 16-bit matrices per warp; lane l gives the address of row l % 8 of
// matrix l / 8, and register i receives matrix i in the mma fragment layout (``trans``:
// transposed, for B operands stored n-major such as V in P V).
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
#ifdef IK_CUDA_EMULATION
  emulation::ldmatrix_x4(r, address, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
#ifdef IK_CUDA_EMULATION
  emulation::ldmatrix_x4(r, address, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

// ---------------------------------------------------------------------------------------
// d += a * b on one 16x8x16 tile, fp32 accumulation. T: __half or __nv_bfloat16.
// ---------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "tensor-core attention takes float16 or bfloat16");
#ifdef IK_CUDA_EMULATION
  emulation::mma_16816(d, a, b0, b1, [](uint16_t bits) {
    T value;
    std::memcpy(&value, &bits, 2);
    if constexpr (std::is_same<T, __half>::value) return __half2float(value);
    else return __bfloat162float(value);
  });
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Two floats -> one register of two T, ``low`` in the low half (the lower column index),
// rounded to nearest even as PyTorch's casts do.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float low, float high) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 packed = __floats2half2_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&packed);
  } else {
    const __nv_bfloat162 packed = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&packed);
  }
}

// One register of two T -> two floats (the inverse of pack2, exact).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t pair) {
  if constexpr (std::is_same<T, __half>::value) {
    __half2 values;
    std::memcpy(&values, &pair, 4);
    return __half22float2(values);
  } else {
    __nv_bfloat162 values;
    std::memcpy(&values, &pair, 4);
    return __bfloat1622float2(values);
  }
}

// The A fragment (16 rows x 16 columns) made of two neighbouring C fragments (columns
// 0..7 and 8..15), rounded to T.
template <typename T>
__device__ __forceinline__ void c_to_a(const float (&left)[4], const float (&right)[4], uint32_t (&a)[4]) {
  a[0] = pack2<T>(left[0], left[1]);
  a[1] = pack2<T>(left[2], left[3]);
  a[2] = pack2<T>(right[0], right[1]);
  a[3] = pack2<T>(right[2], right[3]);
}

// ---------------------------------------------------------------------------------------
// A shared-memory tile of kRows rows x kCols 16-bit values, stored as 16-byte chunks with
// chunk c of row r at position c ^ (r % 8). ldmatrix reads the same chunk of 8 consecutive
// rows; unswizzled, rows of 128 or 256 bytes put them all in the same 4 banks (8-way
// conflict); XOR-ed, the 8 rows land in 8 different chunks = all 32 banks. cp.async writes
// 8 consecutive chunks of one row, also conflict-free.
// ---------------------------------------------------------------------------------------

template <int kRows_, int kCols>
struct SwizzledTile {
  static constexpr int kRows = kRows_;
  static constexpr int kChunks = kCols / 8;  // 16-byte chunks per row
  static constexpr int kBytes = kRows * kChunks * 16;
  static_assert(kCols % 64 == 0, "the XOR swizzle spans 8 chunks: rows of a multiple of 64 values");
  static_assert(kRows % 16 == 0, "tiles hold whole 16-row mma tiles");

  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>((row * kChunks + (chunk ^ (row & 7))) * 16);
  }

  // Byte offset of element ``col`` of ``row`` (for the epilogue's 4-byte writes).
  __device__ __forceinline__ static uint32_t element_offset(int row, int col) {
    return offset(row, col / 8) + (col % 8) * 2;
  }

  // ldmatrix addresses. The 16-row x 16-column block at row0 (a multiple of 8), k step j
  // (columns 16 j .. 16 j + 15) is read at  tile + row0 * kRowBytes + (lane_offset ^ 32 j):
  // chunk (2 j + c) ^ (row % 8) = 2 j ^ (c ^ row % 8) for c in {0, 1}, and 32 j < kRowBytes,
  // so one XOR with a compile-time constant replaces a per-step swizzle computation (and the
  // compiler keeps one offset per operand, not one per step).
  static constexpr int kRowBytes = kChunks * 16;

  __device__ __forceinline__ static uint32_t address(uint32_t tile, int row0, uint32_t lane_offset, int step) {
    return tile + row0 * kRowBytes + (lane_offset ^ (32u * step));
  }

  // A operand (rows = m, columns = k): lane l reads row l % 16, chunk l / 16 (matrices:
  // rows 0-7 / 8-15 x columns 0-7, then 8-15 = a0..a3).
  __device__ __forceinline__ static uint32_t a_lane_offset(int lane) { return offset(lane % 16, lane / 16); }

  // B operand stored n-major (rows = n, columns = k, e.g. K in Q K^T): registers {b0, b1} of
  // n rows [row0, row0 + 8), then of [row0 + 8, row0 + 16).
  __device__ __forceinline__ static uint32_t b_lane_offset(int lane) {
    return offset(lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
  }

  // A operand stored k-major (rows = k, columns = m, e.g. P stored [query][key] for P^T dO),
  // read with ldmatrix.trans: k rows [row0, row0 + 16); step j gives the A fragment of m
  // columns [16 j, 16 j + 16). The four 8 x 8 matrices a0..a3 are (m 0-7, k 0-7), (m 8-15,
  // k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15): stored rows 0-7 then 8-15, each at chunks 0
  // then 1, the same lanes as the n-major B operand's.
  __device__ __forceinline__ static uint32_t a_trans_lane_offset(int lane) { return b_lane_offset(lane); }

  // B operand stored k-major (rows = k, columns = n, e.g. V in P V), read with ldmatrix.trans:
  // k rows [row0, row0 + 16); step j gives {b0, b1} of n columns [16 j, 16 j + 8), then of
  // [16 j + 8, 16 j + 16).
  __device__ __forceinline__ static uint32_t b_trans_lane_offset(int lane) {
    return offset(lane % 8 + ((lane / 8) % 2) * 8, lane / 16);
  }
};

// Copy kRows rows of kCols 16-bit values into a swizzled tile with cp.async, kThreads
// threads cooperating. Row r starts ``row_stride`` bytes after row r - 1 and ``first`` is
// row 0; rows from ``valid_rows`` on are zero-filled (``fallback`` is the mapped address
// handed to their zero-byte copies).
template <class Tile, int kThreads>
__device__ __forceinline__ void load_strided_tile_async(uint32_t tile_base, const void* fallback, const void* first,
                                                        int64_t row_stride, int valid_rows) {
  // Each pass of the block covers kRowsPerPass whole rows; a thread keeps its chunk column,
  // and since the swizzle repeats every 8 rows, its destination moves by a constant per pass.
  // Spelled out, the offsets are one register plus immediates. Left to the compiler as
  // (threadIdx.x + j kThreads) / kChunks, they took a register per pass, held across the
  // key loops: every attention kernel took more registers (sm_90a: the dK/dV kernels
  // 254-255 instead of 246-248, the 16-row forward 182 instead of 170). The source moves by
  // one 64-bit add per pass (a row index times the stride cost a 64-bit multiply per row).
  constexpr int kRowsPerPass = kThreads / Tile::kChunks;
  static_assert(kThreads % Tile::kChunks == 0 && Tile::kRows % kRowsPerPass == 0, "whole rows per pass");
  static_assert(kRowsPerPass % 8 == 0, "passes move by whole swizzle periods");
  const int first_row = threadIdx.x / Tile::kChunks, chunk = threadIdx.x % Tile::kChunks;
  const uint32_t destination = tile_base + Tile::offset(first_row, chunk);
  const char* source = static_cast<const char*>(first) + int64_t(first_row) * row_stride + chunk * 16;
  const int64_t pass_stride = int64_t(kRowsPerPass) * row_stride;
  // Whole tiles (every key tile but a sequence's last) copy without the bounds test and the
  // fallback select: 16 copies per K/V tile in the forward, each of which spent a compare
  // and two selects on them.
  const auto copy = [&](auto bounds_checked) {
#pragma unroll
    for (int j = 0; j < Tile::kRows / kRowsPerPass; ++j, source += pass_stride) {
      const bool valid = !decltype(bounds_checked)::value || first_row + j * kRowsPerPass < valid_rows;
      cp_async_16(destination + j * kRowsPerPass * Tile::kRowBytes, valid ? source : fallback, valid);
    }
  };
  if (valid_rows >= Tile::kRows)
    copy(std::false_type{});
  else
    copy(std::true_type{});
}

// Sum / max over the 4 threads of a quad (the threads sharing an accumulator row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

}  // namespace mma
}  // namespace internlm_kernels
