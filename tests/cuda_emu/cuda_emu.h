// A host emulation of the CUDA subset the window_conv kernels use, strict enough to find the bugs a
// GPU would show as wrong numbers, races or crashes. Include this, then csrc/cuda/kernels.cuh.
// It is one header of about 500 lines because it stands in for the CUDA runtime headers that the
// kernels include as one.
//
// - Every GPU thread is a fiber (ucontext); blocks run one after another. A thread runs until it
//   reaches __syncthreads() or returns; the barrier opens when every thread of the block waits at
//   the same barrier (same source line). Threads at different barriers, or a thread returning
//   while others wait, abort the run with a message (divergent barriers).
// - The order in which a block's threads run between barriers is a parameter (forward, reverse,
//   random): a missing barrier or a race makes results depend on it.
// - Dynamic shared memory is exactly the launch's size, poisoned with NaN before each block, and
//   ends at a guard page; global buffers (emu::Buffer) end at a guard page and start after one.
//   An access past either aborts with the buffer's name.
// - GlobalOut<T> counts the stores to each element of an output buffer, so the harness can check
//   that every output element was written by exactly one thread.
// - cudaLaunchKernelEx checks the launch like the runtime: block size, grid size, and dynamic
//   shared memory over 48 KB only after cudaFuncSetAttribute raised the kernel's limit, up to the
//   per-block opt-in maximum of an H100 (227 KB).
// - mma_16816 (mma.sync.m16n8k16) is warp-synchronous: all 32 lanes of the warp must reach it, or
//   the run aborts (divergent warp); each lane's result is computed from the whole warp's fragments
//   with the PTX manual's fragment layout.
// No other warp-level primitive (shuffles, votes, cp.async) is provided: a kernel that starts
// using one fails to compile here until its emulation is added.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#define SGDC_HOST_EMULATION 1

// ---- CUDA language ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float __expf(float x) { return std::exp(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- CUDA runtime ---------------------------------------------------------------------------------
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  void* attrs;
  unsigned numAttrs;
};

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}

#define SGDC_CUDA_CHECK(expr)                                                           \
  do {                                                                                  \
    const cudaError_t sgdc_err_ = (expr);                                               \
    TORCH_CHECK(sgdc_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(sgdc_err_), \
                " (", #expr, ")");                                                      \
  } while (0)

// The builtin variables: one thread runs at a time, and the scheduler sets these before it
// switches to a thread (threadIdx) or starts a block (the others).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

constexpr int kOptinSmem = 232448;  // H100/H200: 227 KB per block after opt-in
constexpr int kDefaultSmem = 48 * 1024;

[[noreturn]] inline void fail(const std::string& msg) {
  std::fprintf(stderr, "EMULATION FAILURE: %s\n", msg.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

// ---- Guarded memory ------------------------------------------------------------------------------
struct Region {
  std::string name;
  uintptr_t begin, end;       // the usable bytes
  uintptr_t map_begin, map_end;
  std::vector<uint8_t>* counts;  // stores per element (outputs), or null
  size_t elem;
};
inline std::vector<Region>& regions() {
  static std::vector<Region> r;
  return r;
}
inline size_t page() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// `bytes` usable bytes that end exactly at a PROT_NONE page and start one page after another.
inline void* guarded_alloc(const std::string& name, size_t bytes, size_t elem, std::vector<uint8_t>* counts) {
  const size_t pg = page();
  const size_t body = (bytes + pg - 1) / pg * pg;
  const size_t len = body + 2 * pg;
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) fail("mmap failed for " + name);
  auto base = reinterpret_cast<uintptr_t>(m);
  mprotect(m, pg, PROT_NONE);
  mprotect(reinterpret_cast<void*>(base + pg + body), pg, PROT_NONE);
  const uintptr_t begin = base + pg + body - bytes;
  regions().push_back({name, begin, begin + bytes, base, base + len, counts, elem});
  return reinterpret_cast<void*>(begin);
}
inline void guarded_free(void* ptr) {
  auto& rs = regions();
  for (size_t k = 0; k < rs.size(); ++k)
    if (rs[k].begin == reinterpret_cast<uintptr_t>(ptr)) {
      munmap(reinterpret_cast<void*>(rs[k].map_begin), rs[k].map_end - rs[k].map_begin);
      rs.erase(rs.begin() + k);
      return;
    }
  fail("guarded_free of an unknown pointer");
}

inline void on_segv(int, siginfo_t* info, void*) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  char msg[512];
  for (const Region& r : regions()) {
    if (addr >= r.map_begin && addr < r.map_end) {
      if (addr >= r.end)
        std::snprintf(msg, sizeof msg, "out-of-bounds access to '%s': byte %ld past its end (%zu bytes)",
                      r.name.c_str(), static_cast<long>(addr - r.end), static_cast<size_t>(r.end - r.begin));
      else
        std::snprintf(msg, sizeof msg, "out-of-bounds access to '%s': %ld bytes before its start",
                      r.name.c_str(), static_cast<long>(r.begin - addr));
      const size_t n = std::strlen(msg);
      (void)!write(2, "EMULATION FAILURE: ", 19);
      (void)!write(2, msg, n);
      (void)!write(2, "\n", 1);
      _exit(3);
    }
  }
  std::snprintf(msg, sizeof msg, "EMULATION FAILURE: segmentation fault at %p (no guarded buffer)\n",
                info->si_addr);
  (void)!write(2, msg, std::strlen(msg));
  _exit(3);
}

inline void install_handlers() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

// A device buffer of n elements of T, guarded; `counts` (outputs) counts stores per element.
template <typename T>
struct Buffer {
  T* data = nullptr;
  size_t n = 0;
  std::vector<uint8_t> counts;
  Buffer(const std::string& name, size_t n_, bool count_stores) : n(n_) {
    if (count_stores) counts.assign(n_, 0);
    data = static_cast<T*>(guarded_alloc(name, std::max<size_t>(n_, 1) * sizeof(T), sizeof(T),
                                         count_stores ? &counts : nullptr));
  }
  ~Buffer() { guarded_free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// ---- Threads, blocks, barriers ----------------------------------------------------------------------
enum class Order { kForward, kReverse, kRandom };

struct Thread {
  ucontext_t ctx;
  char* stack;
  enum { kReady, kBarrier, kWarpBarrier, kDone } state;
  int barrier_line;
  const char* barrier_file;
};

struct BlockState {
  std::vector<Thread> threads;
  int current = -1;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};
inline BlockState& block() {
  static BlockState b;
  return b;
}
inline Order& order() {
  static Order o = Order::kForward;
  return o;
}
inline uint32_t& seed() {
  static uint32_t s = 1;
  return s;
}

inline void thread_entry() {
  BlockState& bs = block();
  (*bs.body)();
  Thread& t = bs.threads[bs.current];
  t.state = Thread::kDone;
  swapcontext(&t.ctx, &bs.scheduler);
}

inline void syncthreads(const char* file, int line) {
  BlockState& bs = block();
  Thread& t = bs.threads[bs.current];
  t.state = Thread::kBarrier;
  t.barrier_line = line;
  t.barrier_file = file;
  swapcontext(&t.ctx, &bs.scheduler);
}

// A warp-synchronous point (every lane of the warp must reach the same one): the thread waits
// until all lanes of its warp wait at `id`.
inline void warp_sync(int id) {
  BlockState& bs = block();
  Thread& t = bs.threads[bs.current];
  t.state = Thread::kWarpBarrier;
  t.barrier_line = id;
  t.barrier_file = "warp";
  swapcontext(&t.ctx, &bs.scheduler);
}

// Releases every warp whose lanes all wait at the same warp-synchronous point; returns whether
// any did. A warp with lanes at a warp point while others wait at a block barrier or returned
// aborts the run.
inline bool release_warps(unsigned nthreads) {
  BlockState& bs = block();
  bool released = false;
  for (unsigned w = 0; w * 32 < nthreads; ++w) {
    const unsigned first = w * 32, last = std::min(nthreads, first + 32);
    int at_warp = -1;
    for (unsigned k = first; k < last; ++k)
      if (bs.threads[k].state == Thread::kWarpBarrier) at_warp = static_cast<int>(k);
    if (at_warp < 0) continue;
    for (unsigned k = first; k < last; ++k) {
      const Thread& t = bs.threads[k];
      if (t.state != Thread::kWarpBarrier || t.barrier_line != bs.threads[at_warp].barrier_line)
        fail("divergent warp: lane " + std::to_string(at_warp - first) + " of warp " + std::to_string(w) +
             " waits at a warp-synchronous instruction while lane " + std::to_string(k - first) +
             (t.state == Thread::kDone ? " returned" : " waits elsewhere"));
    }
    for (unsigned k = first; k < last; ++k) bs.threads[k].state = Thread::kReady;
    released = true;
  }
  return released;
}

constexpr size_t kStack = 256 * 1024;

// Runs one block: every thread from the start, phase by phase between barriers.
inline void run_block(unsigned nthreads) {
  BlockState& bs = block();
  static std::vector<char*> stacks;
  while (stacks.size() < nthreads) {
    // each fiber stack sits above a guard page
    char* s = static_cast<char*>(guarded_alloc("a thread's stack", kStack, 1, nullptr));
    stacks.push_back(s);
  }
  bs.threads.assign(nthreads, Thread{});
  for (unsigned k = 0; k < nthreads; ++k) {
    Thread& t = bs.threads[k];
    t.stack = stacks[k];
    t.state = Thread::kReady;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, thread_entry, 0);
  }
  std::vector<int> seq(nthreads);
  for (unsigned k = 0; k < nthreads; ++k) seq[k] = static_cast<int>(k);
  std::mt19937 rng(seed()++);
  while (true) {
    if (order() == Order::kReverse) std::reverse(seq.begin(), seq.end());
    if (order() == Order::kRandom) std::shuffle(seq.begin(), seq.end(), rng);
    for (int k : seq) {
      if (bs.threads[k].state != Thread::kReady) continue;
      bs.current = k;
      threadIdx = dim3(static_cast<unsigned>(k));
      swapcontext(&bs.scheduler, &bs.threads[k].ctx);
    }
    bs.current = -1;
    if (release_warps(nthreads)) continue;
    int waiting = -1, done = -1;
    for (unsigned k = 0; k < nthreads; ++k) {
      const Thread& t = bs.threads[k];
      if (t.state == Thread::kDone) {
        done = static_cast<int>(k);
      } else if (waiting < 0) {
        waiting = static_cast<int>(k);
      } else if (t.barrier_line != bs.threads[waiting].barrier_line ||
                 std::strcmp(t.barrier_file, bs.threads[waiting].barrier_file) != 0) {
        fail("divergent barriers: thread " + std::to_string(waiting) + " waits at line " +
             std::to_string(bs.threads[waiting].barrier_line) + ", thread " + std::to_string(k) +
             " at line " + std::to_string(t.barrier_line));
      }
    }
    if (waiting < 0) return;  // every thread returned
    if (done >= 0)
      fail("thread " + std::to_string(done) + " returned while thread " + std::to_string(waiting) +
           " waits at the barrier of line " + std::to_string(bs.threads[waiting].barrier_line));
    for (Thread& t : bs.threads) t.state = Thread::kReady;
  }
}

// Per-kernel dynamic shared memory limits set by cudaFuncSetAttribute.
inline std::map<const void*, int>& smem_limits() {
  static std::map<const void*, int> m;
  return m;
}

inline cudaError_t launch(const void* kernel, const cudaLaunchConfig_t& cfg, const std::function<void()>& body) {
  const dim3 g = cfg.gridDim, bdim = cfg.blockDim;
  const unsigned long long nthreads = 1ull * bdim.x * bdim.y * bdim.z;
  if (nthreads == 0 || nthreads > 1024 || bdim.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    return cudaErrorInvalidConfiguration;
  if (bdim.y != 1 || bdim.z != 1 || g.y != 1 || g.z != 1)
    fail("this emulation supports 1-D grids and blocks only");
  const auto it = smem_limits().find(kernel);
  const size_t limit = it == smem_limits().end() ? kDefaultSmem : static_cast<size_t>(it->second);
  if (cfg.dynamicSmemBytes > limit) return cudaErrorInvalidValue;
  install_handlers();
  BlockState& bs = block();
  blockDim = bdim;
  gridDim = g;
  bs.body = &body;
  bs.smem_bytes = cfg.dynamicSmemBytes;
  bs.smem = static_cast<unsigned char*>(
      guarded_alloc("dynamic shared memory", std::max<size_t>(cfg.dynamicSmemBytes, 1), 1, nullptr));
  for (unsigned bx = 0; bx < g.x; ++bx) {
    blockIdx = dim3(bx);
    // poison: every 4-byte word a quiet NaN, so a read of shared memory no thread wrote shows
    const uint32_t nan_bits = 0x7fc00000u;
    for (size_t k = 0; k + 4 <= cfg.dynamicSmemBytes; k += 4) std::memcpy(bs.smem + k, &nan_bits, 4);
    run_block(static_cast<unsigned>(nthreads));
  }
  guarded_free(bs.smem);
  bs.smem = nullptr;
  return cudaSuccess;
}

// A pointer to an output buffer that counts the stores to each element.
template <typename T>
struct CountingPtr {
  T* ptr = nullptr;
  std::vector<uint8_t>* counts = nullptr;
  size_t first = 0;  // index of ptr[0] in the buffer
  CountingPtr() = default;
  CountingPtr(std::nullptr_t) {}
  CountingPtr(T* p) : ptr(p) {
    if (p == nullptr) return;
    const auto a = reinterpret_cast<uintptr_t>(p);
    for (const Region& r : regions())
      if (a >= r.begin && a < r.end && r.counts != nullptr) {
        counts = r.counts;
        first = (a - r.begin) / r.elem;
        return;
      }
    fail("an output pointer that is not a store-counted buffer");
  }
  bool operator!=(std::nullptr_t) const { return ptr != nullptr; }
  bool operator==(std::nullptr_t) const { return ptr == nullptr; }
  struct Ref {
    T* p;
    uint8_t* c;
    Ref& operator=(const T& v) {
      *p = v;
      if (*c < 255) ++*c;
      return *this;
    }
    operator T() const { return *p; }
  };
  Ref operator[](int64_t i) const {
    if (ptr == nullptr) fail("store through a null output pointer");
    return Ref{ptr + i, counts->data() + first + i};
  }
};

}  // namespace emu

// ---- What the kernels see ----------------------------------------------------------------------------
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::kOptinSmem; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;  // an H100
    default: return cudaErrorInvalidValue;
  }
}
template <typename... Args>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Args...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > emu::kOptinSmem)
    return cudaErrorInvalidValue;
  emu::smem_limits()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  // The arguments are copied once, as the runtime copies them into the launch's parameter buffer.
  return [&](ExpTypes... coerced) {
    const std::function<void()> body = [&]() { kernel(coerced...); };
    return emu::launch(reinterpret_cast<const void*>(kernel), *config, body);
  }(std::forward<ActTypes>(args)...);
}

namespace sgdc {
namespace cuda_impl {
template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(::emu::block().smem);
}
template <typename T>
using GlobalOut = ::emu::CountingPtr<T>;

// mma.sync.m16n8k16 (16-bit A and B, fp32 C and D), with the fragment layout of the PTX manual
// (see mma_16816 in csrc/cuda/common.cuh): every lane deposits its fragments, the warp meets, each
// lane computes its four D elements from the whole warp's A and B (products exact, the sum in
// double, rounded once to fp32), and the warp meets again before the slots are reused.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Slot {
    uint32_t a[4], b[2];
  };
  static std::vector<Slot> slots;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  if (slots.size() < blockDim.x) slots.resize(blockDim.x);
  slots[tid] = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  ::emu::warp_sync(-1);
  auto elem = [](uint32_t reg, int half) {
    return static_cast<double>(static_cast<float>(T(static_cast<uint16_t>(reg >> (16 * half)), T::from_bits())));
  };
  auto A = [&](int row, int k) {  // a[0]: (g, 2t..), a[1]: (g+8, 2t..), a[2]: (g, 2t+8..), a[3]: (g+8, 2t+8..)
    const int owner = warp * 32 + (row % 8) * 4 + (k % 8) / 2;
    return elem(slots[owner].a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
  };
  auto B = [&](int k, int n) {  // b[0]: (2t.., g), b[1]: (2t+8.., g)
    const int owner = warp * 32 + n * 4 + (k % 8) / 2;
    return elem(slots[owner].b[k >= 8 ? 1 : 0], k % 2);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = lane / 4 + (e >= 2 ? 8 : 0), col = 2 * (lane % 4) + (e & 1);
    double sum = d[e];
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    out[e] = static_cast<float>(sum);
  }
  ::emu::warp_sync(-2);
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}
}  // namespace cuda_impl
}  // namespace sgdc
