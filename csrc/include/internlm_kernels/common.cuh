// Device helpers shared by the kernels: dtype conversions, 16-byte vector access, reductions.
// Torch-free: raw pointers and sizes only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "internlm_kernels/common.h"

// Shared memory declarations that also build for the CPU emulation (emulation.h):
//   IK_SHARED_ARRAY(float, scratch, 32);   a block's __shared__ float scratch[32]
//   IK_DYNAMIC_SHARED(char, smem);         the dynamic allocation, as char smem[]
#ifdef IK_CUDA_EMULATION
#include "internlm_kernels/emulation.h"
#define IK_SHARED_ARRAY(TYPE, NAME, COUNT)  \
  static const char NAME##_site = 0;        \
  TYPE* const NAME = ::internlm_kernels::emulation::static_shared<TYPE>(&NAME##_site, COUNT)
#define IK_DYNAMIC_SHARED(TYPE, NAME) \
  TYPE* const NAME = reinterpret_cast<TYPE*>(::internlm_kernels::emulation::current_block->shared)
#else
#define IK_SHARED_ARRAY(TYPE, NAME, COUNT) __shared__ TYPE NAME[COUNT]
#define IK_DYNAMIC_SHARED(TYPE, NAME) extern __shared__ __align__(128) TYPE NAME[]
#endif

namespace internlm_kernels {

// threadIdx.x in a kernel launched with kThreads threads per block (its __launch_bounds__),
// with that bound told to the compiler, for every read of threadIdx.x in the kernel. Without
// it, warp / kWarpsM of a one-warp-wide dimension was not folded to 0: in the attention
// forward's key loop that held 3 registers of address offsets and cost an add per ldmatrix
// (the 32-row layout at d = 128 spilled for it on sm_90a).
template <int kThreads>
__device__ __forceinline__ int thread_in_block() {
#ifndef IK_CUDA_EMULATION
  __builtin_assume(threadIdx.x < kThreads);
#endif
  return static_cast<int>(threadIdx.x);
}

// n / d for n in [0, 2^31) by a FastDivisor (common.h).
__device__ __forceinline__ int fast_divide(int n, const FastDivisor& d) {
#ifdef IK_CUDA_EMULATION
  const uint32_t high = static_cast<uint32_t>((uint64_t(uint32_t(n)) * d.multiplier) >> 32);
#else
  const uint32_t high = __umulhi(static_cast<uint32_t>(n), d.multiplier);
#endif
  return static_cast<int>((high + static_cast<uint32_t>(n)) >> d.shift);
}

// Plain shared-memory loads and stores. The kernels make them through these two so the CPU
// emulation can race-check them (emulation.h); on the GPU they are the plain access.
template <typename T>
__device__ __forceinline__ void store_shared(T* address, const T& value) {
#ifdef IK_CUDA_EMULATION
  emulation::note_plain_access(address, sizeof(T), /*write=*/true);
#endif
  *address = value;
}

template <typename T>
__device__ __forceinline__ T load_shared(const T* address) {
#ifdef IK_CUDA_EMULATION
  emulation::note_plain_access(address, sizeof(T), /*write=*/false);
#endif
  return *address;
}

// 16-byte (and 8-byte) global loads and stores. The GPU faults on a misaligned one (x86 does
// not), so the kernels make them through these two and the CPU emulation checks the address
// (emulation.h); on the GPU they are the plain access.
template <typename V>
__device__ __forceinline__ V load_global(const void* address) {
#ifdef IK_CUDA_EMULATION
  emulation::note_global_access(address, sizeof(V), "load");
#endif
  return *static_cast<const V*>(address);
}

template <typename V>
__device__ __forceinline__ void store_global(void* address, const V& value) {
#ifdef IK_CUDA_EMULATION
  emulation::note_global_access(address, sizeof(V), "store");
#endif
  *static_cast<V*>(address) = value;
}

// A 16-byte shared load that stays after every memory access before it (a compiler memory
// barrier): chunks read from shared memory one at a time, each after the previous chunk's
// global store, hold one chunk's registers instead of all of them (the compiler would
// otherwise hoist them all, as shared memory cannot alias the stores).
__device__ __forceinline__ uint4 load_shared_in_order(const uint4* address) {
#ifdef IK_CUDA_EMULATION
  return load_shared(address);
#else
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(address)))
               : "memory");
  return v;
#endif
}

// A shared object read field by field through a reference (the compiler loads only the fields
// used, where a copy could load them all up front); the emulation counts the whole object read.
template <typename T>
__device__ __forceinline__ const T& shared_view(const T* address) {
#ifdef IK_CUDA_EMULATION
  emulation::note_plain_access(address, sizeof(T), /*write=*/false);
#endif
  return *address;
}

// ---------------------------------------------------------------------------------------
// float <-> storage conversions. Stores round to nearest even, as PyTorch's casts do.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 2^x as one MUFU.EX2 (PTX ex2.approx.ftz.f32: relative error about 2^-22, results below
// 2^-126 flushed to zero). Without fast math, exp2f wraps the same instruction in a range test
// and two predicated multiplies that keep denormal results: three more instructions and a
// predicate per call (seen in the SASS of the attention forward), where attention's softmax
// only needs p = 2^(s - max) <= 1, whose denormal values add nothing to a row sum >= 1.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef IK_CUDA_EMULATION
  const float y = std::exp2(x);
  return y < std::numeric_limits<float>::min() ? 0.f : y;  // ftz: denormal results are 0
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// A float's bits and back, and a / b rounded as IEEE division is (the default `/` of device
// code with fast math, and a reciprocal where the divisor repeats, may round otherwise).
__device__ __forceinline__ uint32_t float_bits(float v) {
#ifdef IK_CUDA_EMULATION
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#else
  return __float_as_uint(v);
#endif
}

__device__ __forceinline__ float float_of_bits(uint32_t bits) {
#ifdef IK_CUDA_EMULATION
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#else
  return __uint_as_float(bits);
#endif
}

__device__ __forceinline__ float divide_rn(float a, float b) {
#ifdef IK_CUDA_EMULATION
  return a / b;
#else
  return __fdiv_rn(a, b);
#endif
}

// Round a float through T and back: the value T would store.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// Elements of T in one 16-byte (128-bit) transaction: the unit every kernel moves.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

// ---------------------------------------------------------------------------------------
// N consecutive elements <-> float[N]. One or more 16-byte accesses when the caller has
// checked alignment (``vector_ok``) and the chunk is in bounds; element-wise (bounds-checked,
// zero-filled) otherwise, so any size, stride and pointer works.
// ---------------------------------------------------------------------------------------

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* ptr, int64_t col, int64_t n_cols, bool vector_ok,
                                            float (&out)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "chunks are whole 16-byte vectors");
  if (vector_ok && col + N <= n_cols) {
    constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < N / kPerVector; ++v) {
      const uint4 raw = load_global<uint4>(ptr + col + v * kPerVector);
      const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) out[v * kPerVector + i] = to_float(elements[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = (col + i < n_cols) ? to_float(ptr[col + i]) : 0.f;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* ptr, int64_t col, int64_t n_cols, bool vector_ok,
                                             const float (&in)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "chunks are whole 16-byte vectors");
  if (vector_ok && col + N <= n_cols) {
    constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < N / kPerVector; ++v) {
      uint4 raw;
      T* elements = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) elements[i] = from_float<T>(in[v * kPerVector + i]);
      store_global(ptr + col + v * kPerVector, raw);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (col + i < n_cols) ptr[col + i] = from_float<T>(in[i]);
  }
}

// One 16-byte vector's raw bits as floats, and floats packed into one, rounding as
// from_float does.
template <typename T>
__device__ __forceinline__ void unpack_floats(const uint4& bits, float (&out)[Vec<T>::kSize]) {
  const T* elements = reinterpret_cast<const T*>(&bits);
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = to_float(elements[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack_floats(const float (&in)[Vec<T>::kSize]) {
  uint4 bits;
  T* elements = reinterpret_cast<T*>(&bits);
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) elements[i] = from_float<T>(in[i]);
  return bits;
}

// One 16-byte chunk of T loaded ahead of its use. load_floats converts a chunk inside the
// branch that loads it, so the thread waits for that load before its next one issues: a
// thread loading two chunks paid two memory round trips, one after the other (seen in the
// SASS of the RMSNorm forward and the rotary kernel, both near half the copy bandwidth on an
// H200). Loading every chunk first, as raw bits, and converting afterwards puts all of a
// thread's loads in flight at once. Chunks that cannot be one vector load (misaligned, or
// past the row's end) are read element-wise at use.
template <typename T>
struct ChunkAhead {
  static constexpr int kSize = Vec<T>::kSize;
  uint4 bits;
  bool vector;

  __device__ __forceinline__ void load(const T* ptr, int64_t col, int64_t n_cols, bool vector_ok) {
    vector = vector_ok && col + kSize <= n_cols;
    if (vector) bits = load_global<uint4>(ptr + col);
  }

  // The chunk as floats (ptr, col and n_cols as given to load).
  __device__ __forceinline__ void get(const T* ptr, int64_t col, int64_t n_cols, float (&out)[kSize]) const {
    if (vector) {
      unpack_floats<T>(bits, out);
    } else {
      load_floats<T, kSize>(ptr, col, n_cols, false, out);
    }
  }
};

// A tensor whose dtype is either the kernel's T or fp32, decided at run time. The branch is
// uniform across the grid, so it costs no divergence; it keeps the number of template
// instantiations (and the build time) small.
// (For T = float both branches are the same code: decided at compile time, which also frees
// a predicate register.)
template <int N, typename T>
__device__ __forceinline__ void load_floats_t_or_f32(const void* ptr, bool is_fp32, int64_t col, int64_t n_cols,
                                                     bool vector_ok, float (&out)[N]) {
  if (std::is_same<T, float>::value || is_fp32)
    load_floats<float, N>(static_cast<const float*>(ptr), col, n_cols, vector_ok, out);
  else
    load_floats<T, N>(static_cast<const T*>(ptr), col, n_cols, vector_ok, out);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats_t_or_f32(void* ptr, bool is_fp32, int64_t col, int64_t n_cols,
                                                      bool vector_ok, const float (&in)[N]) {
  if (std::is_same<T, float>::value || is_fp32)
    store_floats<float, N>(static_cast<float*>(ptr), col, n_cols, vector_ok, in);
  else
    store_floats<T, N>(static_cast<T*>(ptr), col, n_cols, vector_ok, in);
}

// base + elements * element_size bytes, for tensors whose dtype is a run-time choice.
__host__ __device__ __forceinline__ const void* offset_ptr(const void* base, int64_t elements, int64_t element_size) {
  return static_cast<const char*>(base) + elements * element_size;
}
__host__ __device__ __forceinline__ void* offset_ptr(void* base, int64_t elements, int64_t element_size) {
  return static_cast<char*>(base) + elements * element_size;
}

// ---------------------------------------------------------------------------------------
// Launches: kernel<<<grid, block, shared, stream>>>(args...), with the opt-in for more than
// 48 KB of shared memory per block (sm_80: up to 163 KB, sm_90: 227 KB); under the emulation,
// on CPU threads. And a zero fill on the stream.
// ---------------------------------------------------------------------------------------

// Opts ``kernel`` in to ``bytes`` of dynamic shared memory on the current device. The 48 KB a
// block gets without the opt-in counts the kernel's static __shared__ arrays too, so the
// dynamic size alone cannot say when the opt-in is needed (48 KB of dynamic memory beside 512
// B of static scratch, the RMSNorm backward at N = 4096 in bf16, failed to launch with
// "invalid argument"): every kernel with dynamic shared memory is opted in. The attribute
// belongs to the kernel, not to a launch, so it only ever grows: a launch never lowers what
// another, maybe concurrent, launch of the same kernel needs. The driver is called only when
// a launch needs more than the kernel has been granted on that device.
inline cudaError_t opt_in_shared_memory(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> granted;  // (device, kernel) -> bytes
  int device = 0;
#ifdef IK_CUDA_EMULATION  // one pretend device, whose launches check the opt-in (emulation.h)
  cudaError_t error = cudaSuccess;
#else
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
#endif
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = granted[{device, kernel}];
  if (bytes <= current) return cudaSuccess;
#ifdef IK_CUDA_EMULATION
  error = emulation::set_max_dynamic_shared(kernel, bytes);
#else
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
#endif
  if (error == cudaSuccess) current = bytes;
  return error;
}

template <class... KernelArgs, class... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                          const Args&... args) {
  if (shared > 0) {
    const cudaError_t error = opt_in_shared_memory(reinterpret_cast<const void*>(kernel), shared);
    if (error != cudaSuccess) return error;
  }
#ifdef IK_CUDA_EMULATION
  return emulation::launch(kernel, grid, block, shared, args...);
#else
  kernel<<<grid, block, shared, stream>>>(args...);
  return cudaGetLastError();
#endif
}

inline cudaError_t zero_async(void* ptr, size_t bytes, cudaStream_t stream) {
#ifdef IK_CUDA_EMULATION
  std::memset(ptr, 0, bytes);
  return cudaSuccess;
#else
  return cudaMemsetAsync(ptr, 0, bytes, stream);
#endif
}

// ---------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the blockDim.x threads of one row (threadIdx.y picks the row). Every thread of the
// block must call it. ``scratch`` holds 32 floats per row of the block.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row == 1) return v;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* row_scratch = scratch + threadIdx.y * 32;
  if (lane == 0) store_shared(&row_scratch[warp], v);
  __syncthreads();
  v = (lane < warps_per_row) ? load_shared(&row_scratch[lane]) : 0.f;
  v = warp_sum(v);
  __syncthreads();  // scratch is reused by the next call
  return v;
}

}  // namespace internlm_kernels
