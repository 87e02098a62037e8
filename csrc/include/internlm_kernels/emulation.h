// A CPU emulation of the CUDA execution model, so the kernels' own source runs on a machine
// without a GPU (compiled by the host compiler with -DIK_CUDA_EMULATION; see
// tests/test_cuda_emulation.py). What the Triton interpreter is to the Triton kernels.
//
// Each CUDA thread of a block is an OS thread; blocks run one after another. __syncthreads
// is a barrier over the block, warp collectives (shuffles, ballot, ldmatrix, mma.sync) a
// barrier over the warp's 32 lanes with an exchange buffer, so fragment layouts, lane
// address maps, masks and tile indexing are exercised exactly as written. Semantics follow
// the PTX ISA; mma accumulates in fp32 (its summation order may differ from the hardware's).
// Shared memory starts filled with 0xFF bytes (NaN in every float format) and every shared
// access is bounds- and alignment-checked, so a read of an unwritten or out-of-range byte
// shows up.
//
// Shared memory is race-checked. A shadow records, per 4-byte word, the latest write (thread,
// barrier interval, __syncwarp interval) and the reads of the current barrier interval. Two
// accesses by different threads, at least one a write, are ordered only by a __syncthreads
// between them, or, within a warp, by a __syncwarp; anything else fails the launch with a
// message naming the bytes, the threads and the intervals. A cp.async is a write that may land
// at any time from its issue to the cp.async.wait_group that retires its group (where the
// emulation lands it, so a missing wait also leaves NaN bytes), and only a barrier after that
// wait orders it for other threads. Checked: ldmatrix reads and cp.async writes, and plain
// loads and stores made through load_shared / store_shared (common.cuh), which every kernel
// uses for its shared memory.
//
// Launches follow the driver's rules, as on an H100: at most 1024 threads a block; a block's
// static and dynamic shared memory together within 48 KB unless the kernel was opted in
// (cudaFuncAttributeMaxDynamicSharedMemorySize, through opt_in_shared_memory in common.cuh)
// to at least its dynamic size, and within 227 KB with it. And 16-byte global accesses made
// through load_global / store_global (common.cuh) must be 16-byte aligned, as the GPU
// requires (a misaligned one faults there; x86 would not notice).
#pragma once

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "internlm_kernels/common.h"

namespace internlm_kernels {
namespace emulation {

constexpr int kWarpSize = 32;

struct Warp {
  std::barrier<> barrier{kWarpSize};
  alignas(16) uint32_t words[kWarpSize][16];  // one lane's contribution to a collective
};

// Race-check shadow of one 4-byte word of shared memory (see the header comment).
struct WordShadow {
  static constexpr int kInFlight = 1 << 30;  // write_to of a cp.async not yet waited for
  static constexpr int kSeveral = -2;        // reader / reader_warp: more than one
  int writer = -1;                           // thread of the latest write
  bool async = false;                        // that write is a cp.async
  int write_from = 0, write_to = 0;          // barrier intervals in which it may land
  int write_warp_interval = 0;               // the writer's __syncwarp count at a plain write
  int read_interval = -1;                    // barrier interval of the reads recorded below
  int reader = -1, reader_warp = -1;         // who read in it (since reader's last __syncwarp)
  int read_warp_interval = 0;                // reader's __syncwarp count at that read
};

// Static __shared__ arrays live after the dynamic allocation, in the same shadowed buffer.
constexpr size_t kStaticSharedBytes = 48 * 1024;
// Shared memory per block: without the opt-in (static + dynamic), and the most an opt-in can
// grant (static + the granted dynamic size: an H100's cudaDevAttrMaxSharedMemoryPerBlockOptin).
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kOptInSharedBytes = 227 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockXY = 1024, kMaxBlockZ = 64;  // per dimension

struct Block {
  dim3 index, grid, dim;
  char* shared = nullptr;     // the dynamic allocation, then the static arrays
  size_t shared_bytes = 0;    // of the dynamic allocation
  size_t static_offset = 0;   // where the static arrays start
  size_t total_bytes = 0;     // dynamic + static
  std::vector<WordShadow> shadow;           // total_bytes / 4 words
  std::array<std::mutex, 64> shadow_locks;  // striped over the words
  std::mutex fault_mutex;
  std::string fault;                        // the first race found in this block
  std::unique_ptr<std::barrier<>> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::mutex static_mutex;  // static __shared__ arrays, by declaration site
  std::map<const void*, size_t> static_arrays;  // site -> offset
  size_t static_used = 0;
  size_t static_limit = 0;  // bytes the static arrays may take beside the dynamic allocation
  std::string static_limit_reason;
  std::string refusal;  // why the driver would have refused this launch (static arrays past the limit)
  std::atomic<bool> refused{false};  // refusal is set: the block's threads stop (LaunchRefused)
};

inline thread_local Block* current_block = nullptr;
inline thread_local uint3 thread_index{0, 0, 0};
inline thread_local int epoch = 0;          // __syncthreads this thread has passed: its barrier interval
inline thread_local int warp_interval = 0;  // __syncwarp calls it has passed

// A cp.async issued but not yet retired by a wait: it lands (and its chunk's write interval
// closes) when cp.async.wait_group retires its group.
struct InFlightCopy {
  uint32_t destination;
  int group;  // commit groups before it: the group it joins at the next commit
  std::array<char, 16> data;
};
inline thread_local std::vector<InFlightCopy> in_flight;
inline thread_local int committed_groups = 0;

// The message of the last failed launch (error_text under the emulation).
inline std::mutex last_fault_mutex;
inline std::string last_fault = "no error";

inline int linear_thread() {
  return static_cast<int>(thread_index.x + current_block->dim.x * (thread_index.y + current_block->dim.y * thread_index.z));
}
inline int lane() { return linear_thread() % kWarpSize; }
inline Warp& warp() { return *current_block->warps[linear_thread() / kWarpSize]; }

// Thrown in a block's threads once its launch turns out to be refused (static arrays past the
// shared memory the block may have, known only when a thread reaches their declaration): each
// thread stops at that declaration (or at its next barrier), so, as with the driver's refusal
// before any block runs, the kernel writes nothing (kernels declare their arrays first).
struct LaunchRefused {};

inline void stop_if_refused() {
  if (current_block->refused.load(std::memory_order_acquire)) throw LaunchRefused{};
}

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "internlm_kernels emulation: %s\n", what.c_str());
  std::abort();  // a kernel fault: stop loudly, as the GPU would
}

// Every lane's ``value``, in lane order (all 32 lanes must call it).
template <typename T>
std::array<T, kWarpSize> gather(const T& value) {
  static_assert(sizeof(T) <= sizeof(Warp::words[0]), "fits a lane's exchange slot");
  Warp& w = warp();
  std::memcpy(w.words[lane()], &value, sizeof(T));
  w.barrier.arrive_and_wait();
  std::array<T, kWarpSize> all;
  for (int l = 0; l < kWarpSize; ++l) std::memcpy(&all[l], w.words[l], sizeof(T));
  w.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane read it
  return all;
}

inline char* shared_bytes(uint32_t address, size_t bytes, size_t alignment) {
  if (address + bytes > current_block->shared_bytes || address % alignment != 0)
    fail("shared memory access at byte " + std::to_string(address) + " (+" + std::to_string(bytes) +
         ") outside the " + std::to_string(current_block->shared_bytes) + "-byte dynamic allocation or misaligned");
  return current_block->shared + address;
}

inline uint32_t shared_address(const void* ptr) {
  const char* p = static_cast<const char*>(ptr);
  if (p < current_block->shared || p > current_block->shared + current_block->shared_bytes)
    fail("generic-to-shared conversion of a pointer outside shared memory");
  return static_cast<uint32_t>(p - current_block->shared);
}

inline void report_race(const std::string& what) {
  Block& b = *current_block;
  std::lock_guard<std::mutex> lock(b.fault_mutex);
  if (b.fault.empty())
    b.fault = "shared-memory race in block (" + std::to_string(b.index.x) + ", " + std::to_string(b.index.y) + ", " +
              std::to_string(b.index.z) + "): " + what;
}

enum class Access { kRead, kWrite, kAsyncCopy };

inline std::string describe_write(const WordShadow& w) {
  const std::string who = "thread " + std::to_string(w.writer) + "'s ";
  if (!w.async) return who + "store in barrier interval " + std::to_string(w.write_from);
  const std::string end = w.write_to == WordShadow::kInFlight ? "not yet waited for"
                                                              : "waited in interval " + std::to_string(w.write_to);
  return who + "cp.async (issued in barrier interval " + std::to_string(w.write_from) + ", " + end + ")";
}

// Whether this thread's access now is ordered after ``w``'s write (a barrier since, or a
// __syncwarp since for a plain store by the same warp).
inline bool ordered_after_write(const WordShadow& w, int me) {
  if (w.writer < 0) return true;
  if (w.async) return w.write_to < epoch || (w.writer == me && w.write_to != WordShadow::kInFlight);
  if (w.writer == me || w.write_from < epoch) return true;
  return w.writer / kWarpSize == me / kWarpSize && w.write_warp_interval < warp_interval;
}

// Whether a write by this thread now is ordered after every read recorded in ``w``.
inline bool ordered_after_reads(const WordShadow& w, int me) {
  if (w.read_interval < epoch) return true;
  if (w.reader_warp != me / kWarpSize) return false;  // another warp (or several) read in this interval
  return w.reader == me || w.read_warp_interval < warp_interval;
}

// Check and record an access of ``bytes`` at byte ``offset`` of the block's shared memory.
inline void note_access(size_t offset, size_t bytes, Access kind) {
  Block& b = *current_block;
  if (offset + bytes > b.total_bytes || offset % 4 != 0 || bytes % 4 != 0)
    fail("shared memory access at byte " + std::to_string(offset) + " (+" + std::to_string(bytes) +
         ") outside shared memory or not in whole 4-byte words");
  const int me = linear_thread();
  const std::string where = "bytes [" + std::to_string(offset) + ", " + std::to_string(offset + bytes) + ")";
  const std::string when = " in barrier interval " + std::to_string(epoch);
  for (size_t word = offset / 4; word < (offset + bytes) / 4; ++word) {
    std::lock_guard<std::mutex> lock(b.shadow_locks[word % b.shadow_locks.size()]);
    WordShadow& w = b.shadow[word];
    if (kind == Access::kRead) {
      if (w.async && w.writer == me && w.write_to == WordShadow::kInFlight) {
        report_race("thread " + std::to_string(me) + " reads " + where +
                    " before the cp.async.wait_group that retires its own copy into them");
      } else if (!ordered_after_write(w, me)) {
        report_race("thread " + std::to_string(me) + " reads " + where + when +
                    ", which no barrier separates from " + describe_write(w));
      }
      if (w.read_interval != epoch) {
        w.read_interval = epoch, w.reader = me, w.reader_warp = me / kWarpSize, w.read_warp_interval = warp_interval;
      } else if (w.reader_warp != me / kWarpSize) {
        w.reader_warp = w.reader = WordShadow::kSeveral;
      } else if (w.read_warp_interval < warp_interval) {
        w.reader = me, w.read_warp_interval = warp_interval;
      } else if (w.reader != me) {
        w.reader = WordShadow::kSeveral;
      }
      continue;
    }
    const std::string what = kind == Access::kAsyncCopy ? "'s cp.async into " : "'s store to ";
    if (!ordered_after_reads(w, me)) {
      const bool one = w.reader >= 0;
      const std::string readers = one ? "thread " + std::to_string(w.reader) : std::string("other threads");
      report_race("thread " + std::to_string(me) + what + where +
                  (kind == Access::kAsyncCopy
                       ? " may land before " + readers + " read them in the same barrier interval " +
                             std::to_string(epoch)
                       : when + " is not ordered after " + readers + (one ? "'s read" : "' reads") +
                             " of them (no barrier or __syncwarp between)"));
    } else if (!ordered_after_write(w, me) ||
               (w.async && w.writer == me && w.write_to == WordShadow::kInFlight)) {
      report_race("thread " + std::to_string(me) + what + where + when + " and " + describe_write(w) +
                  " are not ordered");
    }
    w.writer = me, w.async = kind == Access::kAsyncCopy;
    w.write_from = epoch, w.write_warp_interval = warp_interval;
    w.write_to = w.async ? WordShadow::kInFlight : epoch;
  }
}

// A cp.async of this thread lands: its words' write interval closes now.
inline void note_landed(uint32_t address) {
  Block& b = *current_block;
  for (size_t word = address / 4; word < address / 4 + 4; ++word) {
    std::lock_guard<std::mutex> lock(b.shadow_locks[word % b.shadow_locks.size()]);
    b.shadow[word].write_to = epoch;
  }
}

// A plain load or store of ``bytes`` at ``ptr`` (load_shared / store_shared).
inline void note_plain_access(const void* ptr, size_t bytes, bool write) {
  const char* p = static_cast<const char*>(ptr);
  if (p < current_block->shared) fail("load_shared / store_shared of a pointer outside shared memory");
  note_access(static_cast<size_t>(p - current_block->shared), bytes, write ? Access::kWrite : Access::kRead);
}

// A global load or store of ``bytes`` (8 or 16) by load_global / store_global: the GPU
// requires the address aligned to the access size ("misaligned address", a sticky fault).
// Recorded as the block's fault, so the launch fails and names it; the access itself goes on.
inline void note_global_access(const void* ptr, size_t bytes, const char* kind) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  if (address % bytes == 0) return;
  Block& b = *current_block;
  std::lock_guard<std::mutex> lock(b.fault_mutex);
  if (b.fault.empty())
    b.fault = "misaligned address: a " + std::to_string(bytes) + "-byte global " + kind + " at an address " +
              std::to_string(address % bytes) + " B past a multiple of " + std::to_string(bytes) + ", by thread " +
              std::to_string(linear_thread()) + " of block (" + std::to_string(b.index.x) + ", " +
              std::to_string(b.index.y) + ", " + std::to_string(b.index.z) + ")";
}

// ldmatrix.x4 (.trans): lane l gives the row address of row l % 8 of matrix l / 8.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool transposed) {
  shared_bytes(address, 16, 16);
  note_access(address, 16, Access::kRead);
  const auto rows = gather(address);
  const int l = lane();
  for (int i = 0; i < 4; ++i) {
    if (!transposed) {  // row l / 4 of matrix i, elements 2 (l % 4) and 2 (l % 4) + 1
      std::memcpy(&r[i], shared_bytes(rows[8 * i + l / 4], 16, 16) + 4 * (l % 4), 4);
    } else {  // column l / 4 of matrix i, rows 2 (l % 4) and 2 (l % 4) + 1
      uint16_t low, high;
      std::memcpy(&low, shared_bytes(rows[8 * i + 2 * (l % 4)], 16, 16) + 2 * (l / 4), 2);
      std::memcpy(&high, shared_bytes(rows[8 * i + 2 * (l % 4) + 1], 16, 16) + 2 * (l / 4), 2);
      r[i] = uint32_t(low) | (uint32_t(high) << 16);
    }
  }
}

// mma.sync.m16n8k16.row.col with fp32 accumulators; ``to_float`` widens one 16-bit value.
template <class ToFloat>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, ToFloat to_float) {
  struct Fragments {
    uint32_t a[4], b[2];
    float c[4];
  };
  Fragments mine{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  const auto all = gather(mine);
  float A[16][16], B[16][8], C[16][8];
  const auto unpack = [&](uint32_t packed, float& low, float& high) {
    low = to_float(static_cast<uint16_t>(packed & 0xffffu));
    high = to_float(static_cast<uint16_t>(packed >> 16));
  };
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, t = l % 4;
    const Fragments& f = all[l];
    unpack(f.a[0], A[g][2 * t], A[g][2 * t + 1]);
    unpack(f.a[1], A[g + 8][2 * t], A[g + 8][2 * t + 1]);
    unpack(f.a[2], A[g][2 * t + 8], A[g][2 * t + 9]);
    unpack(f.a[3], A[g + 8][2 * t + 8], A[g + 8][2 * t + 9]);
    unpack(f.b[0], B[2 * t][g], B[2 * t + 1][g]);
    unpack(f.b[1], B[2 * t + 8][g], B[2 * t + 9][g]);
    C[g][2 * t] = f.c[0], C[g][2 * t + 1] = f.c[1], C[g + 8][2 * t] = f.c[2], C[g + 8][2 * t + 1] = f.c[3];
  }
  const int g = lane() / 4, t = lane() % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int e = 0; e < 4; ++e) {
    float sum = C[rows[e]][cols[e]];
    for (int k = 0; k < 16; ++k) sum += A[rows[e]][k] * B[k][cols[e]];
    d[e] = sum;
  }
}

// cp.async of 16 bytes (zeros when !valid): read now, landed by the wait that retires it.
inline void cp_async_16(uint32_t destination, const void* source, bool valid) {
  shared_bytes(destination, 16, 16);
  InFlightCopy copy{destination, committed_groups, {}};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(source) % 16 != 0) fail("cp.async from a global address not 16-byte aligned");
    std::memcpy(copy.data.data(), source, 16);
  }
  note_access(destination, 16, Access::kAsyncCopy);
  in_flight.push_back(copy);
}

inline void cp_async_commit() { ++committed_groups; }

// cp.async.wait_group: land every copy of all but the ``pending`` most recent committed groups
// (copies not yet committed stay in flight, as in the PTX ISA).
inline void cp_async_wait(int pending) {
  const int retire_before = committed_groups - pending;
  std::vector<InFlightCopy> still;
  for (const InFlightCopy& copy : in_flight) {
    if (copy.group >= retire_before) {
      still.push_back(copy);
      continue;
    }
    std::memcpy(shared_bytes(copy.destination, 16, 16), copy.data.data(), 16);
    note_landed(copy.destination);
  }
  in_flight.swap(still);
}

// The largest block each kernel was launched with. __launch_bounds__ is compiled away here,
// so a launch past a kernel's bound ("too many resources requested for launch" on the GPU)
// would pass: tests compare these with the bounds the GPU build compiled in.
inline std::mutex launches_mutex;
inline std::map<const void*, int> largest_block;

inline void note_launch(const void* kernel, int threads) {
  std::lock_guard<std::mutex> lock(launches_mutex);
  int& largest = largest_block[kernel];
  largest = std::max(largest, threads);
}

// (library file, kernel symbol, largest block) of every kernel launched so far in this
// process. These inline variables are one per process (GNU unique symbols), shared by every
// emulated library loaded: the file tells them apart.
inline std::vector<std::tuple<std::string, std::string, int>> launched_kernels() {
  std::lock_guard<std::mutex> lock(launches_mutex);
  std::vector<std::tuple<std::string, std::string, int>> launched;
  for (const auto& [kernel, threads] : largest_block) {
    Dl_info info{};
    const bool found = dladdr(kernel, &info) != 0;
    launched.emplace_back(found && info.dli_fname != nullptr ? info.dli_fname : "",
                          found && info.dli_sname != nullptr ? info.dli_sname : "", threads);
  }
  return launched;
}

// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel: what opt_in_shared_memory granted.
inline std::mutex granted_mutex;
inline std::map<const void*, size_t> granted_dynamic_shared;

inline cudaError_t set_max_dynamic_shared(const void* kernel, size_t bytes) {
  if (bytes > kOptInSharedBytes) {  // as the driver refuses it
    std::lock_guard<std::mutex> lock(last_fault_mutex);
    last_fault = "an opt-in to " + std::to_string(bytes) + " B of dynamic shared memory, past the " +
                 std::to_string(kOptInSharedBytes) + " B a block may have";
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(granted_mutex);
  granted_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

inline size_t granted_dynamic(const void* kernel) {
  std::lock_guard<std::mutex> lock(granted_mutex);
  const auto found = granted_dynamic_shared.find(kernel);
  return found == granted_dynamic_shared.end() ? 0 : found->second;
}

// A block's __shared__ array declared at ``site`` (one per declaration; the first thread
// to arrive places it in the static part of the block's shared memory, 0xFF-filled).
template <typename T>
T* static_shared(const void* site, size_t count) {
  Block& b = *current_block;
  std::lock_guard<std::mutex> lock(b.static_mutex);
  auto placed = b.static_arrays.find(site);
  if (placed == b.static_arrays.end()) {
    const size_t bytes = (sizeof(T) * count + 15) / 16 * 16;
    if (b.static_used + bytes > kStaticSharedBytes) fail("static __shared__ arrays exceed 48 KB");
    if (b.static_used + bytes > b.static_limit) {  // known once placed: the driver knows it at launch
      std::lock_guard<std::mutex> fault_lock(b.fault_mutex);
      if (b.refusal.empty())
        b.refusal = "too much shared memory: " + std::to_string(b.static_used + bytes) + " B of static __shared__ " +
                  "arrays beside " + std::to_string(b.shared_bytes) + " B of dynamic shared memory " +
                  b.static_limit_reason;
      b.refused.store(true, std::memory_order_release);
    }
    placed = b.static_arrays.emplace(site, b.static_offset + b.static_used).first;
    b.static_used += bytes;
  }
  stop_if_refused();
  return reinterpret_cast<T*>(b.shared + placed->second);
}

// Run ``kernel(args...)`` over ``grid`` blocks of ``block`` threads with ``shared`` bytes of
// dynamic shared memory.
template <class... KernelArgs, class... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared, const Args&... args) {
  // Refused, as by the driver.
  const auto refuse = [](cudaError_t error, const std::string& why) {
    std::lock_guard<std::mutex> lock(last_fault_mutex);
    last_fault = why;
    return error;
  };
  if (grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
    return refuse(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                                                     ", " + std::to_string(grid.z) +
                                                     ") past the limits (2^31 - 1, 65535, 65535)");
  // In 64 bits: a product of 32-bit dimensions can wrap to a small count.
  const uint64_t block_threads = uint64_t(block.x) * block.y * block.z;
  if (block.x > kMaxBlockXY || block.y > kMaxBlockXY || block.z > kMaxBlockZ || block_threads > kMaxThreadsPerBlock)
    return refuse(cudaErrorInvalidConfiguration,
                  "blocks of (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                      std::to_string(block.z) + ") = " + std::to_string(block_threads) + " threads (at most (" +
                      std::to_string(kMaxBlockXY) + ", " + std::to_string(kMaxBlockXY) + ", " +
                      std::to_string(kMaxBlockZ) + ") and " + std::to_string(kMaxThreadsPerBlock) + " in all)");
  const int threads = static_cast<int>(block_threads);
  if (threads == 0 || threads % kWarpSize != 0) fail("blocks of whole warps only");
  note_launch(reinterpret_cast<const void*>(kernel), threads);
  const size_t granted = granted_dynamic(reinterpret_cast<const void*>(kernel));
  const size_t dynamic_limit = granted > 0 ? granted : kDefaultSharedBytes;
  if (shared > dynamic_limit)
    return refuse(cudaErrorInvalidValue,
                  std::to_string(shared) + " B of dynamic shared memory past the kernel's " +
                      std::to_string(dynamic_limit) + " B" + (granted > 0 ? " (its opt-in)" : " (not opted in)"));
  const size_t static_limit = granted > 0 ? kOptInSharedBytes - granted : kDefaultSharedBytes - shared;
  const std::string static_limit_reason =
      granted > 0 ? "pass the " + std::to_string(kOptInSharedBytes) + " B an opted-in block may have (granted " +
                        std::to_string(granted) + " B of dynamic)"
                  : "pass the " + std::to_string(kDefaultSharedBytes) +
                        " B a block gets without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize)";
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.index = dim3(x, y, z), b.grid = grid, b.dim = block;
        b.shared_bytes = shared;
        b.static_limit = static_limit, b.static_limit_reason = static_limit_reason;
        b.static_offset = (shared + 15) / 16 * 16;
        b.total_bytes = b.static_offset + kStaticSharedBytes;
        std::vector<char> memory(b.total_bytes + 16, static_cast<char>(0xff));
        b.shared = memory.data() + (16 - reinterpret_cast<uintptr_t>(memory.data()) % 16) % 16;
        b.shadow.assign(b.total_bytes / 4, WordShadow{});
        b.barrier = std::make_unique<std::barrier<>>(threads);
        for (int w = 0; w < threads / kWarpSize; ++w) b.warps.push_back(std::make_unique<Warp>());
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (int t = 0; t < threads; ++t)
          workers.emplace_back([&, t] {
            current_block = &b;
            thread_index = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            epoch = 0, warp_interval = 0, committed_groups = 0, in_flight.clear();
            try {
              kernel(args...);
            } catch (const LaunchRefused&) {  // b.refusal says why
            }
            in_flight.clear();  // copies never waited for: whoever reads them was already flagged
            // A thread that has exited no longer holds back a barrier (as on sm_70+).
            b.barrier->arrive_and_drop();
            b.warps[t / kWarpSize]->barrier.arrive_and_drop();
          });
        for (auto& worker : workers) worker.join();
        if (!b.refusal.empty()) return refuse(cudaErrorInvalidValue, b.refusal);  // "invalid argument", as on the GPU
        if (!b.fault.empty()) {
          std::lock_guard<std::mutex> lock(last_fault_mutex);
          last_fault = b.fault;
          return cudaErrorLaunchFailure;
        }
      }
  return cudaSuccess;
}

}  // namespace emulation
}  // namespace internlm_kernels

// CUDA built-ins for the kernels' source.
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __maxnreg__
#define __maxnreg__(...)
#define threadIdx (::internlm_kernels::emulation::thread_index)
#define blockIdx (::internlm_kernels::emulation::current_block->index)
#define blockDim (::internlm_kernels::emulation::current_block->dim)
#define gridDim (::internlm_kernels::emulation::current_block->grid)

inline void __syncthreads() {
  ::internlm_kernels::emulation::current_block->barrier->arrive_and_wait();
  ++::internlm_kernels::emulation::epoch;
  ::internlm_kernels::emulation::stop_if_refused();  // a thread past the declarations, when others stopped there
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::internlm_kernels::emulation::warp().barrier.arrive_and_wait();
  ++::internlm_kernels::emulation::warp_interval;
}

template <typename T>
T __shfl_sync(unsigned, T value, int source) {
  return ::internlm_kernels::emulation::gather(value)[source & 31];
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return ::internlm_kernels::emulation::gather(value)[(::internlm_kernels::emulation::lane() ^ mask) & 31];
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  const int lane = ::internlm_kernels::emulation::lane();
  const int source = lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::internlm_kernels::emulation::gather(value)[source];
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  const auto all = ::internlm_kernels::emulation::gather(predicate != 0);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= unsigned(all[l]) << l;
  return bits;
}
// Global fp32 atomics (the atomic-dQ backward): the threads of a block run concurrently, so
// this is a real atomic read-modify-write.
inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline int __ffs(unsigned value) { return __builtin_ffs(static_cast<int>(value)); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }  // the GPU's is within 2 ulp of this

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
