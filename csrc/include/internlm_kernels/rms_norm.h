// RMSNorm and fused add+RMSNorm: parameter structs and launcher declarations.
// Plain C++ (no CUDA device code), so the torch glue can include it; the kernels and the
// launcher definitions are in rms_norm.cuh, instantiated in csrc/instantiations/.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "internlm_kernels/common.h"

namespace internlm_kernels {

// Rows are addressed by two strides, (outer, inner): row r lives at
// (r / rows_inner) * stride_outer + (r % rows_inner) * stride_inner. Strides in elements.
struct RowLayout {
  int64_t stride_outer = 0;
  int64_t stride_inner = 0;
};

// Forward. T is the dtype of x (the activation). Other tensors are T or fp32, chosen at run
// time by the *_fp32 flags: weight (HF keeps it fp32 in mixed precision), residual and
// residual_out (an fp32 residual stream), out (= promote(x, weight)).
struct RmsNormFwdParams {
  const void* x = nullptr;
  RowLayout x_layout;
  const void* residual = nullptr;  // fused op only
  RowLayout residual_layout;
  bool residual_fp32 = false;
  const void* weight = nullptr;
  bool weight_fp32 = false;
  void* out = nullptr;
  RowLayout out_layout;
  bool out_fp32 = false;
  void* residual_out = nullptr;  // fused op only; may alias residual (in place)
  RowLayout residual_out_layout;
  bool residual_out_fp32 = false;
  float* rstd = nullptr;  // (rows,) fp32, saved for the backward
  int64_t rows = 0;
  int64_t rows_inner = 1;
  int64_t cols = 0;
  float eps = 1e-6f;
  // The register path copies each thread's weight chunks to shared memory (cp.async) while
  // the row's loads are in flight, instead of loading them after the reduction
  // (rms_norm_fwd_kernel). A run-time choice, so the benchmark can time both.
  bool stage_weight = true;
};

// Backward. ``normed`` is what was normalised: x for the plain op, residual_out for the fused
// op (T or fp32). dy has the output's dtype (T or fp32). dx has T; dresidual (fused) and
// dresidual_out (the gradient flowing into residual_out, optional) are T or fp32.
struct RmsNormBwdParams {
  const void* dy = nullptr;
  RowLayout dy_layout;
  bool dy_fp32 = false;
  const void* normed = nullptr;
  RowLayout normed_layout;
  bool normed_fp32 = false;
  const void* dresidual_out = nullptr;
  RowLayout dresidual_out_layout;
  bool dresidual_out_fp32 = false;
  const void* weight = nullptr;
  bool weight_fp32 = false;
  const float* rstd = nullptr;
  void* dx = nullptr;  // (rows, cols) contiguous, dtype T
  void* dresidual = nullptr;  // (rows, cols) contiguous, optional
  bool dresidual_fp32 = false;
  float* dweight = nullptr;  // (cols,) fp32 result, optional
  float* dweight_partial = nullptr;  // workspace: rms_norm_bwd_workspace_floats() floats
  int64_t rows = 0;
  int64_t rows_inner = 1;
  int64_t cols = 0;
};

template <typename T, bool kFused>
cudaError_t launch_rms_norm_fwd(const RmsNormFwdParams& params, cudaStream_t stream);

template <typename T, bool kFused>
cudaError_t launch_rms_norm_bwd(const RmsNormBwdParams& params, cudaStream_t stream);

namespace rms_norm_detail {

// Chunks (16-byte vectors) per thread on the register path. Forward: 4 x 8 bf16 = 32 fp32
// registers for the row. Backward keeps x and dy: 2 chunks each (4 spilled 392 bytes at the
// 128-register budget of a 512-thread block; ptxas report).
constexpr int kMaxFwdItems = 4;
constexpr int kFewFwdItems = 2;  // the forward's smaller variant (launch_config gives most rows 2)
constexpr int kMaxBwdItems = 2;
// 1024 threads per row would cap registers at 64 per thread; 512 keeps the row in registers.
constexpr int kMaxThreadsPerRow = 512;
constexpr int kLoopedThreads = 512;
constexpr int kMaxRowsPerBlock = 4;

struct LaunchConfig {
  int threads_per_row;  // blockDim.x, a multiple of 32
  int rows_per_block;   // blockDim.y
  bool in_registers;
};

// The one block-shape heuristic, shared by the launchers and the workspace size.
inline LaunchConfig launch_config(int64_t cols, int vec, int max_items) {
  const int64_t chunks = (cols + vec - 1) / vec;
  if (chunks <= 32 * max_items) return {32, kMaxRowsPerBlock, true};  // a warp per row
  if (chunks <= int64_t(kMaxThreadsPerRow) * max_items) {
    // About two chunks per thread: loads in flight per thread without leaving most of the
    // block idle in the reduction.
    int64_t threads = ((chunks + 1) / 2 + 31) / 32 * 32;
    if (threads > kMaxThreadsPerRow) threads = kMaxThreadsPerRow;
    return {int(threads), 1, true};
  }
  return {kLoopedThreads, 1, false};
}

// Shared-memory dweight rows are padded to 4 floats so every chunk is float4-aligned.
// (constexpr: also callable from device code under --expt-relaxed-constexpr.)
constexpr int64_t padded_cols(int64_t cols) { return (cols + 3) / 4 * 4; }

// Dynamic shared memory of the aligned backward kernel (rms_norm.cuh): a dweight row per row
// slot when dweight is wanted, then two staging buffers, each a row of x and a row of dy per
// row slot. Rows are whole 16-byte chunks there, so every piece starts 16-byte aligned.
// (constexpr members: used by the launcher and the kernel alike.)
struct AlignedBwdShared {
  int64_t cols, element_size, slots;
  bool has_dweight;

  constexpr AlignedBwdShared(int64_t cols_, int64_t element_size_, int64_t slots_, bool has_dweight_)
      : cols(cols_), element_size(element_size_), slots(slots_), has_dweight(has_dweight_) {}
  constexpr int64_t dweight_bytes() const { return has_dweight ? slots * cols * 4 : 0; }
  constexpr int64_t staging_offset(int buffer, int slot, int stream) const {
    return dweight_bytes() + ((buffer * slots + slot) * 2 + stream) * cols * element_size;
  }
  constexpr int64_t bytes() const { return staging_offset(2, 0, 0); }
};

// Persistent backward grid: about 1024 resident threads per SM (half of an H100 SM's 2048),
// enough to keep loads in flight, while the fp32 dweight workspace (one row per row slot of
// every block) stays a few MB, small next to the tensors the backward streams. No more blocks
// per SM than the aligned kernel's shared memory lets reside together (3 of 48 KiB on an
// A100's 164 KiB): a block that has to wait for another to finish doubles a persistent
// grid's time.
constexpr int kBwdThreadsPerSm = 1024;
// Per block beyond the dynamic allocation: the 1 KiB the system reserves, and row_sum's scratch.
constexpr int64_t kSharedBytesReservedPerBlock = 1024 + int64_t(sizeof(float)) * kMaxRowsPerBlock * 32;

inline int64_t bwd_blocks(int64_t rows, int64_t cols, int element_size, const LaunchConfig& config) {
  const int64_t row_blocks = (rows + config.rows_per_block - 1) / config.rows_per_block;
  const int64_t threads = int64_t(config.threads_per_row) * config.rows_per_block;
  int64_t per_sm = threads < kBwdThreadsPerSm ? kBwdThreadsPerSm / threads : 1;
  if (config.in_registers) {
    const int64_t block_bytes =
        AlignedBwdShared(cols, element_size, config.rows_per_block, true).bytes() + kSharedBytesReservedPerBlock;
    const int64_t fit = shared_memory_per_multiprocessor() / block_bytes;
    per_sm = fit < per_sm ? (fit > 0 ? fit : 1) : per_sm;
  }
  const int64_t cap = per_sm * int64_t(multiprocessor_count());
  return row_blocks < cap ? (row_blocks > 0 ? row_blocks : 1) : cap;
}

}  // namespace rms_norm_detail

// Size of the fp32 dweight workspace the backward needs for these sizes on this GPU.
inline int64_t rms_norm_bwd_workspace_floats(int64_t rows, int64_t cols, int element_size) {
  using namespace rms_norm_detail;
  const LaunchConfig config = launch_config(cols, 16 / element_size, kMaxBwdItems);
  const int64_t slots = config.in_registers ? config.rows_per_block : 1;
  return bwd_blocks(rows, cols, element_size, config) * slots * cols;
}

}  // namespace internlm_kernels
