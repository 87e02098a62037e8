// Small shared-memory patterns (cp.async / ldmatrix pipelines, plain stores and loads), each
// correct or missing one piece of synchronisation, for tests/test_cuda_emulation.py: the
// emulation's race check (emulation.h) must pass the correct ones with the right data and
// fail each broken one with a message that says why. Also the kernels' division by a
// launch-time divisor (fast_divide, common.cuh), checked against integer division. And the
// launch rules the emulation enforces (run_launch_probe).
// Built with -DIK_CUDA_EMULATION only.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "internlm_kernels/common.cuh"
#include "internlm_kernels/mma.cuh"

namespace internlm_kernels {
namespace {

constexpr int kThreads = 64;    // two warps
constexpr int kRowBytes = 16;   // one 16-byte chunk per row: 8 x 16-bit values
constexpr int kTileRows = 16;   // rows 0-15 are copied by threads 0-15, all in warp 0
constexpr int kTileBytes = kTileRows * kRowBytes;

enum class Pattern {
  kCorrect,                  // copy, commit, wait, barrier, read
  kNoWait,                   // copy, commit, barrier, read
  kNoBarrier,                // copy, commit, wait, read
  kRefillWithBarrier,        // ... read, barrier, copy again into the same tile, wait, barrier, read
  kRefillWithoutBarrier,     // ... read, copy again into the same tile (another warp may still read it)
  kPipelinedReadsRetired,    // copy tile 0, commit, copy tile 1, commit, wait_group 1, barrier, read tile 0
  kPipelinedReadsInFlight,   // the same, but read tile 1, whose group wait_group 1 left in flight
  kStagedWithSyncwarp,       // store a word, __syncwarp, load the next lane's word
  kStagedWithoutSyncwarp,    // the same without the __syncwarp
  kOtherWarpAfterSyncwarp,   // store, __syncwarp, load the other warp's word (needs __syncthreads)
};

struct ProbeParams {
  const uint16_t* source;  // two tiles of kTileRows x 8 values
  uint32_t* out;           // [kThreads] register 0 of each lane's last ldmatrix
  Pattern pattern;
};

__device__ void copy_tile(uint32_t tile, const uint16_t* source) {
  if (threadIdx.x < kTileRows)
    mma::cp_async_16(tile + threadIdx.x * kRowBytes, source + threadIdx.x * (kRowBytes / 2), true);
}

// Every warp reads all 16 rows (lanes 16-31 repeat lanes 0-15), so warp 1 reads warp 0's copies.
__device__ void read_tile(uint32_t tile, const ProbeParams& p) {
  uint32_t r[4];
  mma::ldmatrix_x4(r, tile + (threadIdx.x % 16) * kRowBytes);
  p.out[threadIdx.x] = r[0];
}

// Thread t's partner in the plain-access patterns: the next lane of its warp, or the same lane
// of the other warp.
__host__ __device__ int partner_of(int thread, Pattern pattern) {
  if (pattern == Pattern::kOtherWarpAfterSyncwarp) return (thread + 32) % kThreads;
  return thread / 32 * 32 + (thread % 32 + 1) % 32;
}

__global__ void probe_kernel(const ProbeParams p) {
  IK_DYNAMIC_SHARED(char, smem);
  if (p.pattern == Pattern::kStagedWithSyncwarp || p.pattern == Pattern::kStagedWithoutSyncwarp ||
      p.pattern == Pattern::kOtherWarpAfterSyncwarp) {
    uint32_t* words = reinterpret_cast<uint32_t*>(smem);
    store_shared(words + threadIdx.x, 7000u + threadIdx.x);
    if (p.pattern != Pattern::kStagedWithoutSyncwarp) __syncwarp();
    p.out[threadIdx.x] = load_shared(words + partner_of(threadIdx.x, p.pattern));
    return;
  }
  const uint32_t tile0 = mma::shared_address(smem), tile1 = tile0 + kTileBytes;
  copy_tile(tile0, p.source);
  mma::cp_async_commit();
  switch (p.pattern) {
    case Pattern::kCorrect:
    case Pattern::kRefillWithBarrier:
    case Pattern::kRefillWithoutBarrier:
      mma::cp_async_wait<0>();
      __syncthreads();
      read_tile(tile0, p);
      if (p.pattern == Pattern::kCorrect) return;
      if (p.pattern == Pattern::kRefillWithBarrier) __syncthreads();
      copy_tile(tile0, p.source + kTileRows * 8);
      mma::cp_async_commit();
      mma::cp_async_wait<0>();
      __syncthreads();
      read_tile(tile0, p);
      return;
    case Pattern::kNoWait:
      __syncthreads();
      read_tile(tile0, p);
      return;
    case Pattern::kNoBarrier:
      mma::cp_async_wait<0>();
      read_tile(tile0, p);
      return;
    case Pattern::kPipelinedReadsRetired:
    case Pattern::kPipelinedReadsInFlight:
      copy_tile(tile1, p.source + kTileRows * 8);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
      __syncthreads();
      read_tile(p.pattern == Pattern::kPipelinedReadsRetired ? tile0 : tile1, p);
      mma::cp_async_wait<0>();
      return;
  }
}

// Runs ``pattern``; returns "" when the launch passes and every lane read the right values,
// else the emulation's message (or what was wrong with the data).
std::string run_probe(const std::string& name) {
  static const std::pair<const char*, Pattern> kPatterns[] = {
      {"correct", Pattern::kCorrect},
      {"no_wait", Pattern::kNoWait},
      {"no_barrier", Pattern::kNoBarrier},
      {"refill_with_barrier", Pattern::kRefillWithBarrier},
      {"refill_without_barrier", Pattern::kRefillWithoutBarrier},
      {"pipelined_reads_retired", Pattern::kPipelinedReadsRetired},
      {"pipelined_reads_in_flight", Pattern::kPipelinedReadsInFlight},
      {"staged_with_syncwarp", Pattern::kStagedWithSyncwarp},
      {"staged_without_syncwarp", Pattern::kStagedWithoutSyncwarp},
      {"other_warp_after_syncwarp", Pattern::kOtherWarpAfterSyncwarp},
  };
  const Pattern* pattern = nullptr;
  for (const auto& entry : kPatterns)
    if (name == entry.first) pattern = &entry.second;
  TORCH_CHECK(pattern != nullptr, "run_probe: unknown pattern '", name, "'");

  alignas(16) uint16_t source[2 * kTileRows * 8];
  for (int i = 0; i < 2 * kTileRows * 8; ++i) source[i] = static_cast<uint16_t>(1000 + i);
  uint32_t out[kThreads] = {};
  const cudaError_t error =
      launch_kernel(probe_kernel, dim3(1), dim3(kThreads), 2 * kTileBytes, nullptr, ProbeParams{source, out, *pattern});
  if (error != cudaSuccess) {
    std::lock_guard<std::mutex> lock(emulation::last_fault_mutex);
    return emulation::last_fault;
  }
  if (*pattern == Pattern::kStagedWithSyncwarp) {
    for (int t = 0; t < kThreads; ++t)
      if (out[t] != 7000u + partner_of(t, *pattern)) return "thread " + std::to_string(t) + " read wrong data";
    return "";
  }
  // Register 0 of lane l holds row l / 4, values 2 (l % 4) and 2 (l % 4) + 1 of the tile read last.
  const bool second_tile = *pattern == Pattern::kRefillWithBarrier || *pattern == Pattern::kRefillWithoutBarrier ||
                           *pattern == Pattern::kPipelinedReadsInFlight;
  const uint16_t* tile = source + (second_tile ? kTileRows * 8 : 0);
  for (int l = 0; l < kThreads; ++l) {
    const int lane = l % 32;
    const uint32_t expected = tile[(lane / 4) * 8 + 2 * (lane % 4)] | (uint32_t(tile[(lane / 4) * 8 + 2 * (lane % 4) + 1]) << 16);
    if (out[l] != expected) return "thread " + std::to_string(l) + " read wrong data";
  }
  return "";
}

// Launch rules the emulation enforces as the driver and the GPU do: a block's shared memory
// (static arrays count against the 48 KB a block gets without the opt-in), its size, and the
// alignment of 16-byte global accesses.
struct LaunchProbeParams {
  const uint16_t* global;  // 16-byte aligned
  int offset;              // elements past ``global`` of the one 16-byte load
  uint32_t* out;
};

// kVariant only makes each case its own kernel: an opt-in belongs to a kernel for good.
template <int kVariant>
__global__ void launch_probe_kernel(const LaunchProbeParams p) {
  IK_SHARED_ARRAY(float, scratch, 128);  // 512 B of static shared memory
  IK_DYNAMIC_SHARED(char, dynamic);
  if (threadIdx.x < 128) store_shared(scratch + threadIdx.x, 1.f);
  store_shared(reinterpret_cast<uint32_t*>(dynamic) + threadIdx.x, 1u);
  if (threadIdx.x == 0) p.out[0] = load_global<uint4>(p.global + p.offset).x;
}

std::string run_launch_probe(const std::string& name) {
  alignas(16) uint16_t global[16];
  std::fill(global, global + 16, uint16_t(0x1234));
  uint32_t out[1] = {};
  const auto params = [&](int offset) { return LaunchProbeParams{global, offset, out}; };
  constexpr size_t k48K = 48 * 1024;
  cudaError_t error = cudaSuccess;
  if (name == "static_beside_48k_opted_in")  // launch_kernel opts in whatever the dynamic size
    error = launch_kernel(launch_probe_kernel<0>, dim3(1), dim3(64), k48K, nullptr, params(0));
  else if (name == "static_beside_48k_not_opted_in")
    error = emulation::launch(launch_probe_kernel<1>, dim3(1), dim3(64), k48K, params(0));
  else if (name == "static_beside_47k_not_opted_in")
    error = emulation::launch(launch_probe_kernel<2>, dim3(1), dim3(64), k48K - 1024, params(0));
  else if (name == "dynamic_past_the_opt_in_limit")
    error = launch_kernel(launch_probe_kernel<3>, dim3(1), dim3(64), 228 * 1024, nullptr, params(0));
  else if (name == "blocks_of_1056_threads")
    error = launch_kernel(launch_probe_kernel<4>, dim3(1), dim3(1056), 4096 + 256, nullptr, params(0));
  else if (name == "blocks_of_64_deep")  // 128 threads, but z past 64
    error = launch_kernel(launch_probe_kernel<7>, dim3(1), dim3(1, 1, 128), 4096, nullptr, params(0));
  else if (name == "blocks_whose_size_wraps_32_bits")  // 65536 x 65536 threads: 0 in 32-bit arithmetic
    error = launch_kernel(launch_probe_kernel<8>, dim3(1), dim3(65536, 65536, 1), 4096, nullptr, params(0));
  else if (name == "aligned_global_load")
    error = launch_kernel(launch_probe_kernel<5>, dim3(1), dim3(64), 256, nullptr, params(8));
  else if (name == "misaligned_global_load")
    error = launch_kernel(launch_probe_kernel<6>, dim3(1), dim3(64), 256, nullptr, params(4));
  else
    TORCH_CHECK(false, "run_launch_probe: unknown case '", name, "'");
  if (error == cudaSuccess) return "";
  std::lock_guard<std::mutex> lock(emulation::last_fault_mutex);
  const char* kind = error == cudaErrorInvalidValue           ? "invalid value"
                     : error == cudaErrorInvalidConfiguration ? "invalid configuration"
                     : error == cudaErrorLaunchFailure        ? "launch failure"
                                                              : "other error";
  // The driver refuses a launch before any block runs: a refused launch writes nothing.
  const bool refused = error == cudaErrorInvalidValue || error == cudaErrorInvalidConfiguration;
  return std::string(kind) + ": " + emulation::last_fault +
         (refused && out[0] != 0 ? " (yet a block ran and wrote its output)" : "");
}

// The first numerator in [first, last] whose quotient by ``divisor`` fast_divide gets wrong,
// or -1.
int64_t fast_divide_mismatch(int64_t divisor, int64_t first, int64_t last) {
  const FastDivisor fast(static_cast<uint32_t>(divisor));
  for (int64_t n = first; n <= last; ++n)
    if (fast_divide(static_cast<int>(n), fast) != n / divisor) return n;
  return -1;
}

}  // namespace
}  // namespace internlm_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run_probe", &internlm_kernels::run_probe, "run one cp.async / ldmatrix pattern under the CUDA emulation");
  m.def("run_launch_probe", &internlm_kernels::run_launch_probe,
        "one launch against the emulation's launch rules (shared memory, block size, global alignment)");
  m.def("fast_divide_mismatch", &internlm_kernels::fast_divide_mismatch,
        "first n in [first, last] with fast_divide(n, divisor) != n / divisor, or -1");
}
