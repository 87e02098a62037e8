// Host helpers shared by the launchers and the torch glue. Plain C++ with the CUDA runtime
// API only (no device code, no torch), so .cpp and .cu files can both include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace internlm_kernels {

// The grid's limits on every GPU since sm_30: a launch past them is refused.
constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;

// 16-byte vector access is valid when the base pointer and every row stride keep 16-byte
// alignment (the column offset of a chunk is a multiple of the vector width by construction).
inline bool vectorizable(const void* ptr, int64_t element_size, int64_t stride_a, int64_t stride_b = 0) {
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_a * element_size) % 16 == 0 &&
         (stride_b * element_size) % 16 == 0;
}

// Division by a divisor fixed for a launch (the attention kernels' query group): a kernel
// divides with one multiply-high, an add and a shift (fast_divide in common.cuh) where an
// integer division by a register takes some 20 instructions. Granlund and Montgomery's
// round-up method, "Division by invariant integers using multiplication" (1994), Figure 4.1:
// with l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1 (< 2^32),
// n / d = (umulhi(n, m) + n) >> l for every n in [0, 2^32); numerators below 2^31 keep the
// sum within 32 bits. Divisor 1 gives m = 1, l = 0: n itself.
struct FastDivisor {
  uint32_t divisor = 1, multiplier = 1, shift = 0;

  FastDivisor() = default;
  explicit FastDivisor(uint32_t d) : divisor(d) {
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
};

// An attribute of the current device, or ``fallback`` when it cannot be read.
inline int device_attribute(cudaDeviceAttr attribute, int fallback) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return fallback;
  if (cudaDeviceGetAttribute(&value, attribute, device) != cudaSuccess) return fallback;
  return value;
}

// SM count of the current device (the launchers size persistent grids with it).
inline int multiprocessor_count() {
#ifdef IK_CUDA_EMULATION
  return 4;  // the CPU emulation's pretend GPU: small, so split-KV decoding still splits
#endif
  const int count = device_attribute(cudaDevAttrMultiProcessorCount, 1);
  return count > 0 ? count : 1;
}

// Shared memory of one SM of the current device, in bytes (the most its resident blocks can
// hold together: 228 KiB on an H100, 164 KiB on an A100).
inline int64_t shared_memory_per_multiprocessor() {
#ifdef IK_CUDA_EMULATION
  return 228 * 1024;  // the pretend GPU is Hopper-sized
#endif
  return device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0);
}

// The most dynamic shared memory one block may opt in to, in bytes (227 KiB on an H100, 163
// KiB on an A100, 99 KiB on sm_86 / sm_89).
inline int64_t shared_memory_per_block_optin() {
#ifdef IK_CUDA_EMULATION
  return 227 * 1024;
#endif
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
}

}  // namespace internlm_kernels
