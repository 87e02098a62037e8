// RMSNorm and fused add+RMSNorm kernels, forward and backward, and their launchers.
//
// Numerics (HF InternLM order): statistics in fp32; x_hat = x * rstd rounded to x's dtype T,
// then multiplied by the weight in fp32 and rounded to the output dtype. The fused op adds
// x + residual in fp32 and normalises the sum *as stored* (rounded to residual_out's dtype).
//
// Two paths, chosen on the host from the row width (rms_norm.h, launch_config):
//  * in registers: each thread keeps up to kMax{Fwd,Bwd}Items 16-byte chunks of its row, so
//    x (and dy) are read once. Forward up to 16384 columns for 16-bit types (8192 fp32),
//    backward up to 8192 (4096 fp32). Narrow rows get a warp each, several per block.
//  * looped, one row per block, two passes over the row (the second mostly hits L1/L2).
//
// dweight is deterministic: every (block, row slot) accumulates its own fp32 partial row in
// shared memory (register path) or in its own workspace row (looped path); a column-sum
// kernel then adds the partial rows in a fixed order. No atomics.
//
// Offsets are int64 throughout; each of the 16-bit and fp32 tensors other than x may be
// T or fp32 (a uniform run-time branch) to keep template instantiations few.
#pragma once

#include <initializer_list>

#include "internlm_kernels/common.cuh"
#include "internlm_kernels/mma.cuh"
#include "internlm_kernels/rms_norm.h"

namespace internlm_kernels {
namespace rms_norm_detail {

struct Vectorized {  // which tensors may use 16-byte accesses
  bool x, residual, weight, out, residual_out, dy, normed, dresidual_out, dx, dresidual;
};

// A row's place in its (outer, inner) layout. The split is a 64-bit division, dozens of
// instructions, so each kernel makes it once per row and hands the row's start pointers to
// its chunk helpers. (Split per chunk and per tensor, the divisions took about as long as the
// memory traffic, by an instruction count of the SASS.) The launchers fold layouts whose
// rows are evenly strided into one outer block (with_uniform_rows), where no division is made.
struct RowPosition {
  int64_t outer, inner;
  __device__ __forceinline__ RowPosition(int64_t row, int64_t rows_inner)
      : outer(row < rows_inner ? 0 : row / rows_inner), inner(row - outer * rows_inner) {}
  __device__ __forceinline__ int64_t offset(const RowLayout& layout) const {
    return outer * layout.stride_outer + inner * layout.stride_inner;
  }
};

// Element size of a tensor that is T or fp32 (the *_fp32 flags).
template <typename T>
__device__ __forceinline__ int64_t element_size(bool is_fp32) {
  return is_fp32 ? 4 : int64_t(sizeof(T));
}

// --------------------------------------------------------------------------------------
// forward
// --------------------------------------------------------------------------------------

// Where one row of each forward tensor starts.
struct FwdRow {
  const void* x;
  const void* residual;  // fused op only
  void* residual_out;    // fused op only
  void* out;
};

template <typename T>
__device__ __forceinline__ FwdRow fwd_row(const RmsNormFwdParams& p, int64_t row) {
  const RowPosition at(row, p.rows_inner);
  FwdRow r;
  r.x = static_cast<const T*>(p.x) + at.offset(p.x_layout);
  r.residual = p.residual == nullptr ? nullptr
                                     : offset_ptr(p.residual, at.offset(p.residual_layout),
                                                  element_size<T>(p.residual_fp32));
  r.residual_out = p.residual_out == nullptr ? nullptr
                                             : offset_ptr(p.residual_out, at.offset(p.residual_out_layout),
                                                          element_size<T>(p.residual_out_fp32));
  r.out = offset_ptr(p.out, at.offset(p.out_layout), element_size<T>(p.out_fp32));
  return r;
}

// The chunk being normalised: x, or x + residual rounded to residual_out's dtype (which is
// also stored). load issues the chunk's loads; get waits for them and gives the values (zero
// for out-of-range columns), so a thread's chunks can all be loaded before any is used
// (ChunkAhead). An fp32 residual under a 16-bit x is read at get.
template <typename T, bool kFused>
struct InputAhead {
  static constexpr int kVec = Vec<T>::kSize;
  ChunkAhead<T> x, residual;

  __device__ __forceinline__ void load(const RmsNormFwdParams& p, const Vectorized& vec, const FwdRow& r,
                                       int64_t col) {
    x.load(static_cast<const T*>(r.x), col, p.cols, vec.x);
    if constexpr (kFused) {
      residual.vector = false;
      if (std::is_same<T, float>::value || !p.residual_fp32)
        residual.load(static_cast<const T*>(r.residual), col, p.cols, vec.residual);
    }
  }

  __device__ __forceinline__ void get(const RmsNormFwdParams& p, const Vectorized& vec, const FwdRow& r, int64_t col,
                                      float (&v)[kVec]) const {
    x.get(static_cast<const T*>(r.x), col, p.cols, v);
    if constexpr (kFused) {
      float res[kVec];
      if (residual.vector) residual.get(static_cast<const T*>(r.residual), col, p.cols, res);
      else load_floats_t_or_f32<kVec, T>(r.residual, p.residual_fp32, col, p.cols, vec.residual, res);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = p.residual_out_fp32 ? v[i] + res[i] : round_to<T>(v[i] + res[i]);
      store_floats_t_or_f32<kVec, T>(r.residual_out, p.residual_out_fp32, col, p.cols, vec.residual_out, v);
    }
  }
};

template <typename T, bool kFused, int kVec>
__device__ __forceinline__ void load_input_chunk(const RmsNormFwdParams& p, const Vectorized& vec, const FwdRow& r,
                                                 int64_t col, float (&v)[kVec]) {
  InputAhead<T, kFused> input;
  input.load(p, vec, r, col);
  input.get(p, vec, r, col, v);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_output_chunk(const RmsNormFwdParams& p, const Vectorized& vec, const FwdRow& r,
                                                   int64_t col, float rstd, const float (&v)[kVec],
                                                   const float (&w)[kVec]) {
  float y[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) y[i] = round_to<T>(v[i] * rstd) * w[i];
  store_floats_t_or_f32<kVec, T>(r.out, p.out_fp32, col, p.cols, vec.out, y);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_output_chunk(const RmsNormFwdParams& p, const Vectorized& vec, const FwdRow& r,
                                                   int64_t col, float rstd, const float (&v)[kVec]) {
  float w[kVec];
  load_floats_t_or_f32<kVec, T>(p.weight, p.weight_fp32, col, p.cols, vec.weight, w);
  store_output_chunk<T, kVec>(p, vec, r, col, rstd, v, w);
}

// Bytes of one weight chunk (kVec elements of T or fp32): one or two 16-byte copies.
template <typename T>
__host__ __device__ constexpr int weight_chunk_bytes(bool weight_fp32) {
  return Vec<T>::kSize * (weight_fp32 ? 4 : int(sizeof(T)));
}

// A thread's weight chunks staged in shared memory. Loaded after the row's reduction, the
// weight chunks were the forward's last global loads, one L2 round trip each, in sequence:
// the compiler cannot move a chunk's load above the previous chunk's output store, which may
// alias it (SASS), and holding them in registers from the start cost occupancy (40 -> 49-52
// registers). cp.async copies them while the row's own loads are in flight, without
// registers. Each thread reads back only its own slots, which its own cp.async.wait_group
// makes visible: no barrier. The slots are 16-byte units laid out [item][half][thread], so a
// warp's 16-byte copies and reads are consecutive (bank-conflict free), also for the two
// halves of an fp32 weight's chunk under 16-bit rows. Staged for a 16-byte aligned weight and
// rows of whole chunks (fwd_stages_weight).
template <typename T>
struct StagedWeight {
  static constexpr int kVec = Vec<T>::kSize;
  char* slots;      // this thread's first 16-byte unit; nullptr: not staged
  int half_stride;  // bytes from a chunk's first 16-byte half to its second (fp32 weight, 16-bit rows)
  int slot_stride;  // bytes from one item's chunk to the next

  __device__ __forceinline__ StagedWeight(const RmsNormFwdParams& p, char* shared, bool staged) {
    const int threads = blockDim.x * blockDim.y;
    slots = staged ? shared + (threadIdx.y * blockDim.x + threadIdx.x) * 16 : nullptr;
    half_stride = threads * 16;
    slot_stride = threads * weight_chunk_bytes<T>(p.weight_fp32);
  }

  __device__ __forceinline__ void copy(const RmsNormFwdParams& p, int item, int64_t col) const {
    if (slots == nullptr) return;
    const bool two_vectors = !std::is_same<T, float>::value && p.weight_fp32;  // 32-byte chunks
    const char* src = static_cast<const char*>(p.weight) + col * (two_vectors ? 4 : int64_t(sizeof(T)));
    const uint32_t slot = mma::shared_address(slots + item * slot_stride);
    mma::cp_async_16(slot, src, true);
    if (two_vectors) mma::cp_async_16(slot + half_stride, src + 16, true);
  }

  // The chunk as floats, after cp_async_wait (from the global weight when not staged).
  __device__ __forceinline__ void get(const RmsNormFwdParams& p, const Vectorized& vec, int item, int64_t col,
                                      float (&w)[kVec]) const {
    if (slots == nullptr) {
      load_floats_t_or_f32<kVec, T>(p.weight, p.weight_fp32, col, p.cols, vec.weight, w);
      return;
    }
    const uint4* slot = reinterpret_cast<const uint4*>(slots + item * slot_stride);
    if constexpr (std::is_same<T, float>::value) {
      unpack_floats<T>(load_shared_in_order(slot), w);
    } else if (!p.weight_fp32) {
      unpack_floats<T>(load_shared_in_order(slot), w);
    } else {
      float low[4], high[4];  // 8 fp32 weights: two 16-byte vectors
      unpack_floats<float>(load_shared_in_order(slot), low);
      unpack_floats<float>(load_shared_in_order(slot + half_stride / 16), high);
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = low[i], w[i + 4] = high[i];
    }
  }
};

// Whether the forward stages the weight, and its slots' bytes (dynamic shared memory).
template <typename T>
__host__ __device__ __forceinline__ bool fwd_stages_weight(const RmsNormFwdParams& p, const Vectorized& vec) {
  return p.stage_weight && vec.weight && p.cols % Vec<T>::kSize == 0;
}

template <typename T>
int64_t fwd_staged_weight_bytes(const RmsNormFwdParams& p, const Vectorized& vec, int threads, int items) {
  return fwd_stages_weight<T>(p, vec) ? int64_t(threads) * items * weight_chunk_bytes<T>(p.weight_fp32) : 0;
}

// kItems: chunks per thread the row's array is sized for; registers go to the whole array
// whether or not a row fills it. The forward is a pure stream whose speed is the loads in
// flight per SM: sized for 4 chunks (58 registers then), 4 blocks of 256 threads per SM kept
// it near half the copy bandwidth on an H200. Rows needing at most 2 chunks per thread (up
// to 8192 bf16 columns) get a kernel sized for 2. ptxas (CUDA 13.0, sm_90a), 2 / 4 chunks:
// plain 40 / 64 registers in bf16, 38 / 62 in fp32; fused 54 / 84 and 52 / 79.
template <typename T, bool kFused, int kItems>
__global__ void __launch_bounds__(kMaxThreadsPerRow) rms_norm_fwd_kernel(const RmsNormFwdParams p,
                                                                        const Vectorized vec) {
  constexpr int kVec = Vec<T>::kSize;
  IK_SHARED_ARRAY(float, scratch, kMaxRowsPerBlock * 32);
  IK_DYNAMIC_SHARED(char, weight_slots);  // the staged weight chunks (StagedWeight: [item][half][thread])
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < p.rows;
  const FwdRow r = fwd_row<T>(p, row_ok ? row : 0);
  const StagedWeight<T> weight(p, weight_slots, fwd_stages_weight<T>(p, vec));
  InputAhead<T, kFused> input[kItems];
#pragma unroll
  for (int item = 0; item < kItems; ++item) {  // every chunk's loads in flight at once
    const int64_t col = (int64_t(threadIdx.x) + int64_t(item) * blockDim.x) * kVec;
    if (row_ok && col < p.cols) input[item].load(p, vec, r, col);
  }
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int64_t col = (int64_t(threadIdx.x) + int64_t(item) * blockDim.x) * kVec;
    if (row_ok && col < p.cols) weight.copy(p, item, col);
  }
  mma::cp_async_commit();
  float v[kItems][kVec];
  float sum_sq = 0.f;
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int64_t col = (int64_t(threadIdx.x) + int64_t(item) * blockDim.x) * kVec;
    if (row_ok && col < p.cols) {
      input[item].get(p, vec, r, col, v[item]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum_sq += v[item][i] * v[item][i];
    }
  }
  const float rstd = rsqrtf(row_sum(sum_sq, scratch) / float(p.cols) + p.eps);
  mma::cp_async_wait<0>();  // before any return: no copy may outlive its block
  if (!row_ok) return;
  if (threadIdx.x == 0) p.rstd[row] = rstd;
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int64_t col = (int64_t(threadIdx.x) + int64_t(item) * blockDim.x) * kVec;
    if (col < p.cols) {
      float w[kVec];
      weight.get(p, vec, item, col, w);
      store_output_chunk<T, kVec>(p, vec, r, col, rstd, v[item], w);
    }
  }
}

template <typename T, bool kFused>
__global__ void __launch_bounds__(kLoopedThreads) rms_norm_fwd_looped_kernel(const RmsNormFwdParams p,
                                                                            const Vectorized vec) {
  constexpr int kVec = Vec<T>::kSize;
  IK_SHARED_ARRAY(float, scratch, 32);
  const int64_t row = blockIdx.x;
  const FwdRow r = fwd_row<T>(p, row);
  const int64_t step = int64_t(blockDim.x) * kVec;
  float v[kVec];
  float sum_sq = 0.f;
  for (int64_t col = int64_t(threadIdx.x) * kVec; col < p.cols; col += step) {
    load_input_chunk<T, kFused, kVec>(p, vec, r, col, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum_sq += v[i] * v[i];
  }
  const float rstd = rsqrtf(row_sum(sum_sq, scratch) / float(p.cols) + p.eps);
  if (threadIdx.x == 0) p.rstd[row] = rstd;
  // Pass 2 re-reads what is being normalised. The fused op reads residual_out, which this
  // same thread stored in pass 1 (same chunk mapping), because in place x and residual
  // have been overwritten.
  for (int64_t col = int64_t(threadIdx.x) * kVec; col < p.cols; col += step) {
    if constexpr (kFused)
      load_floats_t_or_f32<kVec, T>(r.residual_out, p.residual_out_fp32, col, p.cols, vec.residual_out, v);
    else
      load_floats<T, kVec>(static_cast<const T*>(r.x), col, p.cols, vec.x, v);
    store_output_chunk<T, kVec>(p, vec, r, col, rstd, v);
  }
}

// --------------------------------------------------------------------------------------
// backward
// --------------------------------------------------------------------------------------

// Where one row of each backward tensor starts (dx and dresidual are contiguous rows).
struct BwdRow {
  const void* normed;
  const void* dy;
  const void* dresidual_out;  // optional
  void* dx;
  void* dresidual;  // optional, fused op only
};

template <typename T>
__device__ __forceinline__ BwdRow bwd_row(const RmsNormBwdParams& p, int64_t row) {
  const RowPosition at(row, p.rows_inner);
  BwdRow r;
  r.normed = offset_ptr(p.normed, at.offset(p.normed_layout), element_size<T>(p.normed_fp32));
  r.dy = offset_ptr(p.dy, at.offset(p.dy_layout), element_size<T>(p.dy_fp32));
  r.dresidual_out = p.dresidual_out == nullptr
                        ? nullptr
                        : offset_ptr(p.dresidual_out, at.offset(p.dresidual_out_layout),
                                     element_size<T>(p.dresidual_out_fp32));
  r.dx = static_cast<T*>(p.dx) + row * p.cols;
  r.dresidual = p.dresidual == nullptr ? nullptr
                                       : offset_ptr(p.dresidual, row * p.cols, element_size<T>(p.dresidual_fp32));
  return r;
}

// dx for one chunk, given mean(g * x_hat) of the row; returns the chunk's dweight terms
// dy * round(x_hat) in dw (x_hat met the weight rounded to x's dtype in the forward).
template <typename T, bool kFused, int kVec>
__device__ __forceinline__ void bwd_chunk(const RmsNormBwdParams& p, const Vectorized& vec, const BwdRow& r,
                                          int64_t col, float rstd, float mean_gx, const float (&x)[kVec],
                                          const float (&dy)[kVec], float (&dw)[kVec]) {
  float w[kVec], dx[kVec];
  load_floats_t_or_f32<kVec, T>(p.weight, p.weight_fp32, col, p.cols, vec.weight, w);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float x_hat = x[i] * rstd;
    dx[i] = (dy[i] * w[i] - x_hat * mean_gx) * rstd;
    dw[i] = dy[i] * round_to<T>(x_hat);
  }
  if (r.dresidual_out != nullptr) {
    float dro[kVec];
    load_floats_t_or_f32<kVec, T>(r.dresidual_out, p.dresidual_out_fp32, col, p.cols, vec.dresidual_out, dro);
#pragma unroll
    for (int i = 0; i < kVec; ++i) dx[i] += dro[i];
  }
  store_floats<T, kVec>(static_cast<T*>(r.dx), col, p.cols, vec.dx, dx);
  if (kFused && r.dresidual != nullptr)
    store_floats_t_or_f32<kVec, T>(r.dresidual, p.dresidual_fp32, col, p.cols, vec.dresidual, dx);
}

// A chunk's x (the normalised input) and dy, loaded ahead as InputAhead does; one that is
// fp32 under a 16-bit T is read at get.
template <typename T>
struct XDyAhead {
  static constexpr int kVec = Vec<T>::kSize;
  ChunkAhead<T> x, dy;

  __device__ __forceinline__ void load(const RmsNormBwdParams& p, const Vectorized& vec, const BwdRow& r,
                                       int64_t col) {
    constexpr bool kFloat = std::is_same<T, float>::value;
    x.vector = dy.vector = false;
    if (kFloat || !p.normed_fp32) x.load(static_cast<const T*>(r.normed), col, p.cols, vec.normed);
    if (kFloat || !p.dy_fp32) dy.load(static_cast<const T*>(r.dy), col, p.cols, vec.dy);
  }

  // x and dy as floats; returns the chunk's sum of dy * w * x (times rstd later).
  __device__ __forceinline__ float get(const RmsNormBwdParams& p, const Vectorized& vec, const BwdRow& r,
                                       int64_t col, float (&x_out)[kVec], float (&dy_out)[kVec]) const {
    if (x.vector) x.get(static_cast<const T*>(r.normed), col, p.cols, x_out);
    else load_floats_t_or_f32<kVec, T>(r.normed, p.normed_fp32, col, p.cols, vec.normed, x_out);
    if (dy.vector) dy.get(static_cast<const T*>(r.dy), col, p.cols, dy_out);
    else load_floats_t_or_f32<kVec, T>(r.dy, p.dy_fp32, col, p.cols, vec.dy, dy_out);
    float w[kVec];
    load_floats_t_or_f32<kVec, T>(p.weight, p.weight_fp32, col, p.cols, vec.weight, w);
    float gx = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) gx += dy_out[i] * w[i] * x_out[i];
    return gx;
  }
};

template <typename T, int kVec>
__device__ __forceinline__ float load_x_dy(const RmsNormBwdParams& p, const Vectorized& vec, const BwdRow& r,
                                           int64_t col, float (&x)[kVec], float (&dy)[kVec]) {
  XDyAhead<T> input;
  input.load(p, vec, r, col);
  return input.get(p, vec, r, col, x, dy);
}

// dw_row[col .. col + kVec) (+)= values, as float4 accesses: a thread's kVec floats are
// contiguous, so scalar accesses would hit the same banks kVec-ways. Rows are padded to a
// multiple of 4 floats, so every chunk start is 16-byte aligned.
template <int kVec>
__device__ __forceinline__ void add_to_shared(float* dw_row, int64_t col, int64_t cols, const float (&values)[kVec],
                                              bool overwrite) {
  if constexpr (kVec % 4 == 0) {
    if (col + kVec <= cols) {
      float4* dst = reinterpret_cast<float4*>(dw_row + col);
#pragma unroll
      for (int v = 0; v < kVec / 4; ++v) {
        float4 current = overwrite ? make_float4(0.f, 0.f, 0.f, 0.f) : load_shared(dst + v);
        current.x += values[4 * v];
        current.y += values[4 * v + 1];
        current.z += values[4 * v + 2];
        current.w += values[4 * v + 3];
        store_shared(dst + v, current);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i)
    if (col + i < cols) store_shared(dw_row + col + i, (overwrite ? 0.f : load_shared(dw_row + col + i)) + values[i]);
}

// Persistent over rows; dweight partials in dynamic shared memory, one row per row slot.
template <typename T, bool kFused>
__global__ void __launch_bounds__(kMaxThreadsPerRow) rms_norm_bwd_kernel(const RmsNormBwdParams p,
                                                                        const Vectorized vec) {
  constexpr int kVec = Vec<T>::kSize;
  IK_SHARED_ARRAY(float, scratch, kMaxRowsPerBlock * 32);
  IK_DYNAMIC_SHARED(float4, dw_shared);  // [blockDim.y][padded_cols(cols)] floats
  float* dw_row = p.dweight_partial != nullptr
                      ? reinterpret_cast<float*>(dw_shared) + threadIdx.y * padded_cols(p.cols)
                      : nullptr;
  if (dw_row != nullptr) {
    for (int64_t col = threadIdx.x * int64_t(kVec); col < p.cols; col += int64_t(blockDim.x) * kVec) {
      const float zeros[kVec] = {};
      add_to_shared<kVec>(dw_row, col, p.cols, zeros, /*overwrite=*/true);
    }
  }
  float x[kMaxBwdItems][kVec], dy[kMaxBwdItems][kVec];
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y; base < p.rows; base += step) {  // uniform trip count
    const int64_t row = base + threadIdx.y;
    const bool row_ok = row < p.rows;
    const BwdRow r = bwd_row<T>(p, row_ok ? row : 0);
    XDyAhead<T> input[kMaxBwdItems];
#pragma unroll
    for (int item = 0; item < kMaxBwdItems; ++item) {  // every chunk's loads in flight at once
      const int64_t col = (int64_t(threadIdx.x) + int64_t(item) * blockDim.x) * kVec;
      if (row_ok && col < p.cols) input[item].load(p, vec, r, col);
    }
    float gx = 0.f;
#pragma unroll
    for (int item = 0; item < kMaxBwdItems; ++item) {
      const int64_t col = (int64_t(threadIdx.x) + int64_t(item) * blockDim.x) * kVec;
      if (row_ok && col < p.cols) gx += input[item].get(p, vec, r, col, x[item], dy[item]);
    }
    const float rstd = row_ok ? p.rstd[row] : 0.f;
    const float mean_gx = row_sum(gx, scratch) * rstd / float(p.cols);
    if (!row_ok) continue;
#pragma unroll
    for (int item = 0; item < kMaxBwdItems; ++item) {
      const int64_t col = (int64_t(threadIdx.x) + int64_t(item) * blockDim.x) * kVec;
      if (col < p.cols) {
        float dw[kVec];
        bwd_chunk<T, kFused, kVec>(p, vec, r, col, rstd, mean_gx, x[item], dy[item], dw);
        if (dw_row != nullptr) add_to_shared<kVec>(dw_row, col, p.cols, dw, /*overwrite=*/false);
      }
    }
  }
  if (dw_row != nullptr) {  // each thread owns its columns: no synchronisation needed
    float* out = p.dweight_partial + (int64_t(blockIdx.x) * blockDim.y + threadIdx.y) * p.cols;
    for (int64_t col = threadIdx.x * int64_t(kVec); col < p.cols; col += int64_t(blockDim.x) * kVec)
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (col + i < p.cols) out[col + i] = load_shared(dw_row + col + i);
  }
}

// A whole chunk stored to a tensor that is T or fp32, as 16-byte stores: store_floats_t_or_f32
// without its element-wise fallback, for callers that know every chunk is aligned and whole.
template <typename T>
__device__ __forceinline__ void store_chunk_t_or_f32(void* row, bool is_fp32, int col,
                                                     const float (&values)[Vec<T>::kSize]) {
  constexpr int kVec = Vec<T>::kSize;
  if (std::is_same<T, float>::value || !is_fp32) {
    store_global(static_cast<T*>(row) + col, pack_floats<T>(values));
  } else {
    float* dst = static_cast<float*>(row) + col;
#pragma unroll
    for (int v = 0; v < kVec / 4; ++v)
      store_global(dst + 4 * v, make_float4(values[4 * v], values[4 * v + 1], values[4 * v + 2], values[4 * v + 3]));
  }
}

// The backward's common case, taken when every input (normed, dy, dresidual_out, weight) has
// dtype T, every tensor allows 16-byte accesses and rows are whole 16-byte chunks
// (bwd_takes_aligned_path). A persistent block walks its rows one after another, so what
// decides its speed is how much of each row's time its loads are in flight. In the general
// kernel a row's loads start only when the previous row is done (reduction, dx, stores), and
// at 122 registers only 2 blocks of 256 threads fit on an SM: about 0.3 of the copy
// bandwidth at N = 4096 on an H200. Here:
//  * the next row's x and dy are copied into shared memory with cp.async while this row is
//    reduced and written (two staging buffers per row slot, alternating, so a copy never
//    lands on data still being read); each thread copies and reads only its own chunks, so
//    the staging needs cp.async.wait_group but no barrier;
//  * every access is one 16-byte vector, and x and dy are read from the staging again for dx
//    instead of being held across the reduction: 64 registers under
//    __launch_bounds__(512, 2) with no spills (ptxas -v), so the 1024 threads per SM that
//    bwd_blocks sizes the grid for are resident;
//  * dresidual_out, needed only after the reduction, is loaded into registers as the row
//    starts; dweight accumulates in shared memory as in the general kernel.
// Shared memory per block (AlignedBwdShared, rms_norm.h): the dweight rows and the staging,
// 48 KiB at N = 4096 in bf16 (4 blocks per SM), 96 KiB at N = 8192 (2 blocks).
template <typename T, bool kFused>
__global__ void __launch_bounds__(kMaxThreadsPerRow, 2) rms_norm_bwd_aligned_kernel(const RmsNormBwdParams p,
                                                                                   const Vectorized /*all true*/) {
  constexpr int kVec = Vec<T>::kSize;
  constexpr int kItems = kMaxBwdItems;
  IK_SHARED_ARRAY(float, scratch, kMaxRowsPerBlock * 32);
  IK_DYNAMIC_SHARED(float4, smem);
  const AlignedBwdShared layout(p.cols, sizeof(T), blockDim.y, p.dweight_partial != nullptr);
  char* const base_address = reinterpret_cast<char*>(smem);
  float* const dw_row =
      layout.has_dweight ? reinterpret_cast<float*>(base_address) + threadIdx.y * p.cols : nullptr;
  // staging(buffer, stream): this row slot's copy of one row of x (stream 0) or dy (stream 1)
  auto staging = [&](int buffer, int stream) {
    return reinterpret_cast<T*>(base_address + layout.staging_offset(buffer, threadIdx.y, stream));
  };
  const bool has_dresidual_out = p.dresidual_out != nullptr;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;

  if (dw_row != nullptr) {
#pragma unroll
    for (int item = 0; item < kItems; ++item) {
      const int col = int(threadIdx.x + item * blockDim.x) * kVec;  // < 2^31: the register path
      if (col < p.cols)
#pragma unroll
        for (int v = 0; v < kVec / 4; ++v)
          store_shared(reinterpret_cast<float4*>(dw_row + col) + v, make_float4(0.f, 0.f, 0.f, 0.f));
    }
  }
  // Copies one row's x and dy chunks of this thread into a staging buffer (nothing past the
  // last row) and commits them as one cp.async group.
  auto stage_row = [&](int64_t row, int buffer) {
    if (row < p.rows) {
      const BwdRow r = bwd_row<T>(p, row);
#pragma unroll
      for (int item = 0; item < kItems; ++item) {
        const int col = int(threadIdx.x + item * blockDim.x) * kVec;
        if (col < p.cols) {
          mma::cp_async_16(mma::shared_address(staging(buffer, 0) + col), static_cast<const T*>(r.normed) + col,
                           true);
          mma::cp_async_16(mma::shared_address(staging(buffer, 1) + col), static_cast<const T*>(r.dy) + col, true);
        }
      }
    }
    mma::cp_async_commit();
  };

  int buffer = 0;
  stage_row(int64_t(blockIdx.x) * blockDim.y + threadIdx.y, buffer);
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y; base < p.rows; base += step, buffer ^= 1) {
    const int64_t row = base + threadIdx.y;  // uniform trip count: every thread reaches row_sum
    const bool row_ok = row < p.rows;
    mma::cp_async_wait<0>();         // this row's staging has landed (this thread's chunks)
    stage_row(row + step, buffer ^ 1);  // the next row streams in while this one is worked on
    const BwdRow r = bwd_row<T>(p, row_ok ? row : 0);
    uint4 dro_bits[kItems];
#pragma unroll
    for (int item = 0; item < kItems; ++item) {
      const int col = int(threadIdx.x + item * blockDim.x) * kVec;
      if (row_ok && col < p.cols && has_dresidual_out)
        dro_bits[item] = load_global<uint4>(static_cast<const T*>(r.dresidual_out) + col);
    }
    // x, dy and the weight of one chunk, as floats
    auto chunk = [&](int col, float (&x)[kVec], float (&dy)[kVec], float (&w)[kVec]) {
      unpack_floats<T>(load_shared(reinterpret_cast<const uint4*>(staging(buffer, 0) + col)), x);
      unpack_floats<T>(load_shared(reinterpret_cast<const uint4*>(staging(buffer, 1) + col)), dy);
      // Copied out as a uint4 first: unpacked straight from the pointer, the compiler split
      // the 16-byte load into element loads.
      const uint4 w_bits = load_global<uint4>(static_cast<const T*>(p.weight) + col);
      unpack_floats<T>(w_bits, w);
    };
    float gx = 0.f;
#pragma unroll
    for (int item = 0; item < kItems; ++item) {
      const int col = int(threadIdx.x + item * blockDim.x) * kVec;
      if (row_ok && col < p.cols) {
        float x[kVec], dy[kVec], w[kVec];
        chunk(col, x, dy, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) gx += dy[i] * w[i] * x[i];
      }
    }
    const float rstd = row_ok ? p.rstd[row] : 0.f;
    const float mean_gx = row_sum(gx, scratch) * rstd / float(p.cols);
    if (!row_ok) continue;
#pragma unroll
    for (int item = 0; item < kItems; ++item) {
      const int col = int(threadIdx.x + item * blockDim.x) * kVec;
      if (col < p.cols) {
        float x[kVec], dy[kVec], w[kVec], dx[kVec];
        chunk(col, x, dy, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float x_hat = x[i] * rstd;
          dx[i] = (dy[i] * w[i] - x_hat * mean_gx) * rstd;
          dy[i] *= round_to<T>(x_hat);  // dy is done with: it becomes the dweight term
        }
        if (dw_row != nullptr) {
          float4* dw = reinterpret_cast<float4*>(dw_row + col);
#pragma unroll
          for (int v = 0; v < kVec / 4; ++v) {
            float4 sum = load_shared(dw + v);
            sum.x += dy[4 * v], sum.y += dy[4 * v + 1], sum.z += dy[4 * v + 2], sum.w += dy[4 * v + 3];
            store_shared(dw + v, sum);
          }
        }
        if (has_dresidual_out) {
          float dro[kVec];
          unpack_floats<T>(dro_bits[item], dro);
#pragma unroll
          for (int i = 0; i < kVec; ++i) dx[i] += dro[i];
        }
        store_global(static_cast<T*>(r.dx) + col, pack_floats<T>(dx));
        if (kFused && r.dresidual != nullptr) store_chunk_t_or_f32<T>(r.dresidual, p.dresidual_fp32, col, dx);
      }
    }
  }
  mma::cp_async_wait<0>();  // the last, empty group
  if (dw_row == nullptr) return;  // each thread owns its columns: no synchronisation needed
  float* out = p.dweight_partial + (int64_t(blockIdx.x) * blockDim.y + threadIdx.y) * p.cols;
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int col = int(threadIdx.x + item * blockDim.x) * kVec;
    if (col < p.cols)
#pragma unroll
      for (int v = 0; v < kVec / 4; ++v)
        store_global(out + col + 4 * v, load_shared(reinterpret_cast<const float4*>(dw_row + col) + v));
  }
}

// Wide rows: one row at a time per block, dweight added into the block's own workspace row
// (zeroed by the launcher; each thread only ever touches its own columns).
template <typename T, bool kFused>
__global__ void __launch_bounds__(kLoopedThreads, 1) rms_norm_bwd_looped_kernel(const RmsNormBwdParams p,
                                                                            const Vectorized vec) {
  constexpr int kVec = Vec<T>::kSize;
  IK_SHARED_ARRAY(float, scratch, 32);
  const int64_t step = int64_t(blockDim.x) * kVec;
  float* dw_row = p.dweight_partial != nullptr ? p.dweight_partial + int64_t(blockIdx.x) * p.cols : nullptr;
  float x[kVec], dy[kVec];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const BwdRow r = bwd_row<T>(p, row);
    float gx = 0.f;
    for (int64_t col = int64_t(threadIdx.x) * kVec; col < p.cols; col += step)
      gx += load_x_dy<T, kVec>(p, vec, r, col, x, dy);
    const float rstd = p.rstd[row];
    const float mean_gx = row_sum(gx, scratch) * rstd / float(p.cols);
    for (int64_t col = int64_t(threadIdx.x) * kVec; col < p.cols; col += step) {
      load_x_dy<T, kVec>(p, vec, r, col, x, dy);
      float dw[kVec];
      bwd_chunk<T, kFused, kVec>(p, vec, r, col, rstd, mean_gx, x, dy, dw);
      if (dw_row != nullptr)
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          if (col + i < p.cols) dw_row[col + i] += dw[i];
    }
  }
}

// dweight[c] = the sum of column c over the workspace rows, in a fixed order (deterministic):
// each of kRowGroups threads per column sums every kRowGroups-th row, then one adds the
// groups' sums in order. The workspace has a row per resident row slot (hundreds on an H100),
// so one thread per column, walking them all in series, took a long chain of dependent
// memory round trips on a few SMs (N / 256 blocks). A template so that only the translation
// units that launch it (the backward instantiations) compile it.
template <int kColumns, int kRowGroups>
__global__ void __launch_bounds__(kColumns* kRowGroups) column_sum_kernel(const float* __restrict__ partial,
                                                                         int64_t partial_rows, int64_t cols,
                                                                         float* __restrict__ out) {
  IK_SHARED_ARRAY(float, group_sums, kRowGroups * kColumns);
  const int64_t col = int64_t(blockIdx.x) * kColumns + threadIdx.x;
  float sum = 0.f;
  if (col < cols) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < partial_rows; r += kRowGroups) sum += partial[r * cols + col];
  }
  store_shared(&group_sums[threadIdx.y * kColumns + threadIdx.x], sum);
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  float total = 0.f;
#pragma unroll
  for (int g = 0; g < kRowGroups; ++g) total += load_shared(&group_sums[g * kColumns + threadIdx.x]);
  out[col] = total;
}

template <typename T>
Vectorized fwd_vectorized(const RmsNormFwdParams& p) {
  Vectorized v{};
  v.x = vectorizable(p.x, sizeof(T), p.x_layout.stride_outer, p.x_layout.stride_inner);
  v.residual = vectorizable(p.residual, p.residual_fp32 ? 4 : sizeof(T), p.residual_layout.stride_outer,
                            p.residual_layout.stride_inner);
  v.weight = vectorizable(p.weight, p.weight_fp32 ? 4 : sizeof(T), 0);
  v.out = vectorizable(p.out, p.out_fp32 ? 4 : sizeof(T), p.out_layout.stride_outer, p.out_layout.stride_inner);
  v.residual_out = vectorizable(p.residual_out, p.residual_out_fp32 ? 4 : sizeof(T),
                                p.residual_out_layout.stride_outer, p.residual_out_layout.stride_inner);
  return v;
}

template <typename T>
Vectorized bwd_vectorized(const RmsNormBwdParams& p) {
  Vectorized v{};
  v.dy = vectorizable(p.dy, p.dy_fp32 ? 4 : sizeof(T), p.dy_layout.stride_outer, p.dy_layout.stride_inner);
  v.normed = vectorizable(p.normed, p.normed_fp32 ? 4 : sizeof(T), p.normed_layout.stride_outer,
                          p.normed_layout.stride_inner);
  v.dresidual_out = vectorizable(p.dresidual_out, p.dresidual_out_fp32 ? 4 : sizeof(T),
                                 p.dresidual_out_layout.stride_outer, p.dresidual_out_layout.stride_inner);
  v.weight = vectorizable(p.weight, p.weight_fp32 ? 4 : sizeof(T), 0);
  v.dx = vectorizable(p.dx, sizeof(T), p.cols);
  v.dresidual = vectorizable(p.dresidual, p.dresidual_fp32 ? 4 : sizeof(T), p.cols);
  return v;
}

// Params whose row layouts are all evenly strided (row r at r * stride_inner, as for any
// contiguous (batch, seq, hidden) tensor) as one outer block of rows: the same addresses,
// without the per-row division. The other params come back as they are.
template <typename Params>
Params with_uniform_rows(Params p, std::initializer_list<const RowLayout*> layouts) {
  for (const RowLayout* layout : layouts)
    if (layout != nullptr && layout->stride_outer != p.rows_inner * layout->stride_inner) return p;
  p.rows_inner = p.rows;
  return p;
}

// Whether rms_norm_bwd_aligned_kernel serves these arguments (on the register path).
template <typename T>
bool bwd_takes_aligned_path(const RmsNormBwdParams& p, const Vectorized& vec) {
  constexpr bool kFloat = std::is_same<T, float>::value;
  // (An fp32 weight makes the output, and so dy, fp32: the general kernel's case.)
  const bool inputs_are_t = kFloat || (!p.normed_fp32 && !p.dy_fp32 && !p.weight_fp32 &&
                                       (p.dresidual_out == nullptr || !p.dresidual_out_fp32));
  const bool vectors = vec.normed && vec.dy && vec.weight && vec.dx &&
                       (p.dresidual_out == nullptr || vec.dresidual_out) && (p.dresidual == nullptr || vec.dresidual);
  return inputs_are_t && vectors && p.cols % Vec<T>::kSize == 0;
}

}  // namespace rms_norm_detail

template <typename T, bool kFused>
cudaError_t launch_rms_norm_fwd(const RmsNormFwdParams& params, cudaStream_t stream) {
  using namespace rms_norm_detail;
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  const RmsNormFwdParams p = with_uniform_rows(
      params, {&params.x_layout, &params.out_layout, params.residual != nullptr ? &params.residual_layout : nullptr,
               params.residual_out != nullptr ? &params.residual_out_layout : nullptr});
  const LaunchConfig config = launch_config(p.cols, Vec<T>::kSize, kMaxFwdItems);
  const Vectorized vec = fwd_vectorized<T>(p);
  if (config.in_registers) {
    const dim3 block(config.threads_per_row, config.rows_per_block);
    const int64_t blocks = (p.rows + config.rows_per_block - 1) / config.rows_per_block;
    const int64_t chunks = (p.cols + Vec<T>::kSize - 1) / Vec<T>::kSize;
    const bool few_items = chunks <= int64_t(kFewFwdItems) * config.threads_per_row;
    const int items = few_items ? kFewFwdItems : kMaxFwdItems;
    const int64_t shared = fwd_staged_weight_bytes<T>(p, vec, block.x * block.y, items);
    return launch_kernel(few_items ? rms_norm_fwd_kernel<T, kFused, kFewFwdItems>
                                   : rms_norm_fwd_kernel<T, kFused, kMaxFwdItems>,
                         dim3(unsigned(blocks)), block, size_t(shared), stream, p, vec);
  }
  return launch_kernel(rms_norm_fwd_looped_kernel<T, kFused>, dim3(unsigned(p.rows)), dim3(kLoopedThreads), 0, stream,
                       p, vec);
}

template <typename T, bool kFused>
cudaError_t launch_rms_norm_bwd(const RmsNormBwdParams& params, cudaStream_t stream) {
  using namespace rms_norm_detail;
  if (params.rows == 0 || params.cols == 0) {
    return params.dweight != nullptr ? zero_async(params.dweight, sizeof(float) * params.cols, stream) : cudaSuccess;
  }
  const RmsNormBwdParams p = with_uniform_rows(
      params, {&params.normed_layout, &params.dy_layout,
               params.dresidual_out != nullptr ? &params.dresidual_out_layout : nullptr});
  const LaunchConfig config = launch_config(p.cols, Vec<T>::kSize, kMaxBwdItems);
  const Vectorized vec = bwd_vectorized<T>(p);
  const int64_t blocks = bwd_blocks(p.rows, p.cols, int(sizeof(T)), config);
  int64_t partial_rows = blocks;
  cudaError_t error = cudaSuccess;
  if (config.in_registers) {
    partial_rows = blocks * config.rows_per_block;
    const dim3 block(config.threads_per_row, config.rows_per_block);
    const bool has_dweight = p.dweight_partial != nullptr;
    if (bwd_takes_aligned_path<T>(p, vec)) {
      const AlignedBwdShared layout(p.cols, sizeof(T), config.rows_per_block, has_dweight);
      error = launch_kernel(rms_norm_bwd_aligned_kernel<T, kFused>, dim3(unsigned(blocks)), block,
                            size_t(layout.bytes()), stream, p, vec);
    } else {
      const size_t shared = has_dweight ? sizeof(float) * config.rows_per_block * padded_cols(p.cols) : 0;
      error = launch_kernel(rms_norm_bwd_kernel<T, kFused>, dim3(unsigned(blocks)), block, shared, stream, p, vec);
    }
  } else {
    if (p.dweight_partial != nullptr) {
      error = zero_async(p.dweight_partial, sizeof(float) * partial_rows * p.cols, stream);
      if (error != cudaSuccess) return error;
    }
    error = launch_kernel(rms_norm_bwd_looped_kernel<T, kFused>, dim3(unsigned(blocks)), dim3(kLoopedThreads), 0,
                          stream, p, vec);
  }
  if (error != cudaSuccess || p.dweight == nullptr) return error;
  constexpr int kSumColumns = 32, kSumRowGroups = 16;  // a warp reads 128 contiguous bytes of a row
  return launch_kernel(column_sum_kernel<kSumColumns, kSumRowGroups>,
                       dim3(unsigned((p.cols + kSumColumns - 1) / kSumColumns)), dim3(kSumColumns, kSumRowGroups), 0,
                       stream, p.dweight_partial, partial_rows, p.cols, p.dweight);
}

}  // namespace internlm_kernels
