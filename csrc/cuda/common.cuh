// Pieces shared by every variant of the window_conv kernels (docs/op.md defines the op).
//
// The kernel headers (common.cuh, window_v1.cuh, window_v2.cuh, window_v3.cuh, kernels.cuh) depend on no ATen
// header and on CUDA only through the runtime API, so tests/cuda_emu/ compiles them unchanged for
// the host: it defines SGDC_HOST_EMULATION and provides the runtime functions, the builtin
// variables, `__syncthreads`, `dynamic_smem` (poisoned, guard-paged shared memory) and `GlobalOut`
// (a pointer that counts stores). Everything below the #ifndef is the real GPU build.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#ifndef SGDC_HOST_EMULATION
// A failed CUDA runtime call raises, with the runtime's message and the call.
#define SGDC_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    const cudaError_t sgdc_err_ = (expr);                                                   \
    STD_TORCH_CHECK(sgdc_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(sgdc_err_), \
                    " (", #expr, ")");                                                      \
  } while (0)
#endif

namespace sgdc {
namespace cuda_impl {

#ifndef SGDC_HOST_EMULATION
// The block's dynamic shared memory.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char sgdc_dynamic_smem[];
  return reinterpret_cast<T*>(sgdc_dynamic_smem);
}
// A pointer to an output in global memory: kernels only index it (p.out[i] = v).
template <typename T>
using GlobalOut = T*;

// One warp's D += A (16x16, row-major) * B (16x8, column-major) on the tensor cores, 16-bit
// operands (T: c10::Half or c10::BFloat16), fp32 accumulators: mma.sync.m16n8k16. Fragments, with
// g = lane / 4, t = lane % 4 (each 32-bit register holds two elements, the lower index in the low
// half): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..];
// b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]; d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..].
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the tensor-core kernels are launched only on sm_80 and newer
#endif
}
#endif

enum class Mode { kForward, kGradWeights, kGradInput };

// Offset of element (b, c, i, j) of a dense (B, C, H, W) tensor, NCHW or channels_last (NHWC).
template <bool CL>
struct Dense4 {
  int64_t C;
  int H, W;
  __device__ __forceinline__ int64_t operator()(int64_t b, int64_t c, int i, int j) const {
    return CL ? ((b * H + i) * W + j) * C + c : ((b * C + c) * H + i) * W + j;
  }
};

template <typename T>
struct Params {
  const T* src;         // kForward, kGradWeights: x;  kGradInput: grad_out
  const T* weights;     // per-pixel tap weights (logits when softmax)
  const T* gate;        // nullptr without gate
  const T* grad_out;    // kGradWeights
  GlobalOut<T> out;     // kForward: out;  kGradInput: dx;  kGradWeights: dgate (nullptr without gate)
  GlobalOut<T> dweights; // kGradWeights
  GlobalOut<float2> stats;  // (max, 1/sum) per (b, g, i, j): written by kGradWeights, read by kGradInput
  int64_t B, C;
  int H, W, G, K, Cg;
  int d;         // dilation: taps d pixels apart
  bool clamp;    // windows shifted to stay inside the image (NATTEN) instead of zeros outside
  bool softmax;  // logits with a softmax over the taps, or the weights as given
  int tiles_w, tiles_g, tiles;  // tiles along a group's W, per residue group, per (b, g)
};

// One axis of a block's tile, in the group space of its dilation residue (docs/op.md): the image
// indices m, m + d, m + 2d, ... form an undilated axis of length L, on which the window of group
// index g starts at start(g) (centred; or clamped inside [0, L) with NATTEN's rule). d = 1, m = 0,
// L = H is the plain image axis.
struct Axis {
  int m, d, L, K;
  bool clamp;
  __device__ __forceinline__ int image(int g) const { return m + d * g; }
  __device__ __forceinline__ bool inside(int g) const { return g >= 0 && g < L; }
  __device__ __forceinline__ int start(int g) const {
    const int s = g - K / 2;
    return clamp ? min(max(s, 0), L - K) : s;
  }
  // The group indices whose windows cover q form [first_src(q), last_src(q)] (for centred windows
  // this range may leave [0, L); clamp it); q's tap in the window of p is q - start(p).
  __device__ __forceinline__ int first_src(int q) const {
    return clamp && q <= K - 1 ? 0 : q - K / 2;
  }
  __device__ __forceinline__ int last_src(int q) const {
    return clamp && q >= L - K ? L - 1 : q + K / 2;
  }
};
// The plain axis of length n (no dilation, centred windows).
__device__ __forceinline__ Axis plain_axis(int n, int K) { return Axis{0, 1, n, K, false}; }

// A block's tile in group space: its two axes and the group indices of its first row and column.
struct GroupTile {
  Axis ai, aj;
  int gi0, gj0;
};

// The K*K per-pixel tap values of one thread: registers for a compile-time K, else a strided
// column of shared memory.
template <int KT>
struct Taps {
  float v[KT * KT];
  __device__ __forceinline__ void init(float*, int, int) {}
  __device__ __forceinline__ float& operator[](int t) { return v[t]; }
};
template <>
struct Taps<0> {
  float* p;
  int stride;
  __device__ __forceinline__ void init(float* base, int tid, int nthreads) {
    p = base + tid;
    stride = nthreads;
  }
  __device__ __forceinline__ float& operator[](int t) { return p[t * stride]; }
};

__device__ __forceinline__ float sigmoidf(float z) { return 1.f / (1.f + __expf(-z)); }

// P[t] = softmax over the K*K logits of pixel (i, j) of head g; returns (max, 1/sum). Without
// the softmax (p.softmax false), P[t] is the weight as given and the statistics are (0, 1).
template <int KT, typename T, bool CL, typename TapsT>
__device__ __forceinline__ float2 softmax_taps(TapsT& P, const Params<T>& p, const Dense4<CL>& ki,
                                               int64_t b, int64_t kc0, int K, int i, int j) {
  const int KK = K * K;
  if (!p.softmax) {
#pragma unroll
    for (int t = 0; t < KK; ++t) P[t] = static_cast<float>(p.weights[ki(b, kc0 + t, i, j)]);
    return make_float2(0.f, 1.f);
  }
  float mx = -INFINITY;
#pragma unroll
  for (int t = 0; t < KK; ++t) {
    const float l = static_cast<float>(p.weights[ki(b, kc0 + t, i, j)]);
    P[t] = l;
    mx = fmaxf(mx, l);
  }
  float sum = 0.f;
#pragma unroll
  for (int t = 0; t < KK; ++t) {
    const float e = __expf(P[t] - mx);
    P[t] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
#pragma unroll
  for (int t = 0; t < KK; ++t) P[t] *= inv;  // kGradInput rebuilds exactly this from (mx, inv)
  return make_float2(mx, inv);
}

// The softmax statistics (max, 1/sum) of the K*K logits of pixel (i, j) of the head whose first
// logit channel is kc0, computed as softmax_taps computes them, from global memory.
template <typename T, bool CL>
__device__ __forceinline__ float2 softmax_stats(const Params<T>& p, const Dense4<CL>& ki, int64_t b, int64_t kc0,
                                                int K, int i, int j) {
  const int KK = K * K;
  float mx = -INFINITY;
  for (int t = 0; t < KK; ++t) mx = fmaxf(mx, static_cast<float>(p.weights[ki(b, kc0 + t, i, j)]));
  float sum = 0.f;
  for (int t = 0; t < KK; ++t) sum += __expf(static_cast<float>(p.weights[ki(b, kc0 + t, i, j)]) - mx);
  return make_float2(mx, 1.f / sum);
}

// The weight of logit channel kc at pixel (i, j): rebuilt from the logit and the pixel's softmax
// statistics, or the weight as given.
template <typename T, bool CL>
__device__ __forceinline__ float tap_weight(const Params<T>& p, const Dense4<CL>& ki, int64_t b,
                                            int64_t kc, int64_t sbase, int i, int j) {
  const float l = static_cast<float>(p.weights[ki(b, kc, i, j)]);
  if (!p.softmax) return l;
  const float2 st = p.stats[sbase + static_cast<int64_t>(i) * p.W + j];
  return __expf(l - st.x) * st.y;
}

// kGradInput's weights for pixel q = (i, j): flipped tap tf = KK-1-t reads the tile like the
// forward does; its weight is the softmax of tap t at the pixel q - off_t whose window covers q,
// rebuilt from that pixel's logit and statistics (0 where that pixel is outside the image).
template <int KT, typename T, bool CL, typename TapsT>
__device__ __forceinline__ void flipped_taps(TapsT& P, const Params<T>& p, const Dense4<CL>& ki,
                                             int64_t b, int64_t kc0, int64_t sbase, int K, int i, int j) {
  const int KK = K * K, r = K / 2;
#pragma unroll
  for (int tf = 0; tf < KK; ++tf) {
    const int t = KK - 1 - tf, u = t / K, v = t % K;
    const int ii = i - u + r, jj = j - v + r;
    float w = 0.f;
    if (ii >= 0 && ii < p.H && jj >= 0 && jj < p.W) {
      w = tap_weight(p, ki, b, kc0 + t, sbase, ii, jj);
    }
    P[tf] = w;
  }
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The block's place: tile_id within its (b, g), and b, g.
struct BlockPlace {
  int tile_id, g;
  int64_t b;
};
template <typename T>
__device__ __forceinline__ BlockPlace block_place(const Params<T>& p) {
  const int64_t blk = blockIdx.x;
  const int64_t bg = blk / p.tiles;
  return {static_cast<int>(blk % p.tiles), static_cast<int>(bg % p.G), bg / p.G};
}

// The group-space tile of tile_id (TH x TW group pixels of one residue group). Without dilation
// there is one group and this is the image tile.
template <typename T>
__device__ __forceinline__ GroupTile group_tile(const Params<T>& p, int tile_id, int TH, int TW) {
  const int res = tile_id / p.tiles_g, t = tile_id % p.tiles_g;
  const int mi = res / p.d, mj = res % p.d;
  return {Axis{mi, p.d, (p.H - mi + p.d - 1) / p.d, p.K, p.clamp},
          Axis{mj, p.d, (p.W - mj + p.d - 1) / p.d, p.K, p.clamp}, (t / p.tiles_w) * TH,
          (t % p.tiles_w) * TW};
}

// group_tile, or for kernels that run only undilated, centred windows (kGroups false) the image
// tile with plain axes, whose constants the compiler folds into the index arithmetic.
template <bool kGroups, typename T>
__device__ __forceinline__ GroupTile block_tile(const Params<T>& p, int tile_id, int TH, int TW) {
  if constexpr (kGroups) {
    return group_tile(p, tile_id, TH, TW);
  } else {
    return {plain_axis(p.H, p.K), plain_axis(p.W, p.K), (tile_id / p.tiles_w) * TH,
            (tile_id % p.tiles_w) * TW};
  }
}

// Fills the tiling fields of p for TH x TW tiles of each residue group (the groups are at most
// ceil(H/d) x ceil(W/d)) and returns the number of blocks (one per tile and (b, g)); raises when
// the grid would not fit one launch.
template <typename T>
int64_t set_tiles(Params<T>& p, int TH, int TW) {
  p.tiles_w = ceil_div(ceil_div(p.W, p.d), TW);
  const int64_t tiles_g = static_cast<int64_t>(ceil_div(ceil_div(p.H, p.d), TH)) * p.tiles_w;
  const int64_t tiles = tiles_g * p.d * p.d;
  const int64_t blocks = p.B * p.G * tiles;
  STD_TORCH_CHECK(tiles <= INT_MAX && blocks <= INT_MAX,
                  "sgdc::cuda: the input is too large for one launch (", blocks, " blocks)");
  p.tiles_g = static_cast<int>(tiles_g);
  p.tiles = static_cast<int>(tiles);
  return blocks;
}

// Launches kernel<<<blocks, threads, smem, stream>>>(p), opting in to more than 48 KB of dynamic
// shared memory when it needs it, and checks the launch.
template <typename P>
void launch_kernel(void (*kernel)(P), int64_t blocks, int threads, size_t smem, cudaStream_t stream,
                   const P& p, int K) {
  if (smem > 48 * 1024) {
    int device = 0, optin_int = 0;
    SGDC_CUDA_CHECK(cudaGetDevice(&device));
    SGDC_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin_int, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const size_t optin = static_cast<size_t>(optin_int);
    STD_TORCH_CHECK(smem <= optin, "sgdc::cuda: kernel_size=", K, " needs ", smem,
                    " bytes of shared memory per block, more than this GPU allows (", optin,
                    "); use a smaller kernel_size or backend='torch'");
    SGDC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  SGDC_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

}  // namespace cuda_impl
}  // namespace sgdc
