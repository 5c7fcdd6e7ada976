// v3 of the sgdc_conv kernels (SGDC_CUDA_VARIANT=v3): v2, with the forward of 16-bit inputs on the
// tensor cores for K <= 9 (other dtypes, K and the backward are v2's). Why and the predictions:
// bench/NOTES_cuda.md.
//
// The "dense halo" formulation: for one image row of 8 output pixels (an n-tile) and 16 channels
// (an m-tile), and each tap row u, out (16 x 8) += X_u (16 channels x 16 halo columns) @ Band_u
// (16 x 8), where Band_u[k, n] holds pixel n's weight P[u, v] at halo column k = n + v + 4 - R
// (zero elsewhere): one mma.sync.m16n8k16 per tap row. The weights are split in a 16-bit head and
// remainder (two products), so they keep about 16 bits, as fp32 weights would for a 16-bit output;
// products and sums are fp32 in the tensor cores.
//
// A block is 8 warps; warp w owns image row i0 + w and 16 pixels (two n-tiles). The halo of a
// chunk of 16 channels is copied to shared memory in the input's 16-bit type as
// [tile row][channel][24 columns], columns j0 - 4 .. j0 + 19: each A fragment is four 32-bit
// shared loads, conflict-free with a 12-word channel pitch. The B fragments (the bands) are built
// once per block from the softmax of the tile's pixels and kept in registers for every chunk.
#pragma once

#include "window_v2.cuh"

namespace sgdc {
namespace cuda_impl {
namespace v3 {

constexpr int kWarps = 8;               // tile rows, one per warp
constexpr int kTW = 16;                 // tile columns: two n-tiles of 8 pixels per warp
constexpr int kCH = 16;                 // channels per chunk: one m-tile
constexpr int kPitch = kTW + 8;         // halo columns j0 - 4 .. j0 + 19, 16-bit elements
constexpr int kMaxK = 9;                // K - 1 <= 8: a pixel's taps fit 16 halo columns
constexpr int kTP = kWarps * kTW;       // pixels of a tile

template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// Bytes of dynamic shared memory: the softmax of the tile's pixels (fp32), later reused for the
// 16-bit halo tile and the fp32 staging tile.
template <typename T>
constexpr size_t smem_bytes(int K) {
  const size_t probs = sizeof(float) * K * K * kTP;
  const size_t tiles = sizeof(T) * (kWarps + K - 1) * kCH * kPitch + sizeof(float) * kCH * kTP;
  return probs > tiles ? probs : tiles;
}

template <int KT, typename T, bool CL>
__global__ void __launch_bounds__(kWarps * 32, 2) forward_tc(const Params<T> p) {
  static_assert(KT >= 1 && KT <= kMaxK && KT % 2 == 1, "the tensor-core forward covers odd K <= 9");
  constexpr int NT = kWarps * 32, KK = KT * KT, R = KT / 2, ROWS = kWarps + KT - 1;
  unsigned char* smem = dynamic_smem<unsigned char>();
  float* probs = reinterpret_cast<float*>(smem);  // [KK][kTP], until the bands are built
  T* tile = reinterpret_cast<T*>(smem);           // [ROWS][kCH][kPitch], 16-bit
  float* stage = reinterpret_cast<float*>(smem + sizeof(T) * ROWS * kCH * kPitch);  // [kCH][kTP]

  const auto [tile_id, g, b] = block_place(p);
  const int i0 = (tile_id / p.tiles_w) * kWarps, j0 = (tile_id % p.tiles_w) * kTW;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tig = lane % 4;

  const Dense4<CL> xi{p.C, p.H, p.W};
  const Dense4<CL> ki{static_cast<int64_t>(p.G) * KK, p.H, p.W};
  const int64_t kc0 = static_cast<int64_t>(g) * KK;

  // 1. The softmax of every pixel of the tile (zero outside the image).
  if (tid < kTP) {
    const int i = i0 + tid / kTW, j = j0 + tid % kTW;
    Taps<KT> P;
    if (i < p.H && j < p.W) {
      softmax_taps<KT>(P, p, ki, b, kc0, KT, i, j);
    } else {
#pragma unroll
      for (int t = 0; t < KK; ++t) P[t] = 0.f;
    }
#pragma unroll
    for (int t = 0; t < KK; ++t) probs[t * kTP + tid] = P[t];
  }
  __syncthreads();

  // 2. The bands of this warp's two n-tiles, as B fragments: this thread holds pixel n = gid of
  // the n-tile and halo columns k = 2*tig + {0, 1} (half 0) and 2*tig + 8 + {0, 1} (half 1).
  uint32_t band_hi[2][KT][2], band_lo[2][KT][2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const int px = warp * kTW + nt * 8 + gid;
#pragma unroll
    for (int u = 0; u < KT; ++u)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        T hi[2], lo[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int v = 2 * tig + 8 * half + e - gid - 4 + R;  // the tap column at halo column k
          const float w = v >= 0 && v < KT ? probs[(u * KT + v) * kTP + px] : 0.f;
          hi[e] = static_cast<T>(w);
          lo[e] = static_cast<T>(w - static_cast<float>(hi[e]));
        }
        band_hi[nt][u][half] = pack2(hi[0], hi[1]);
        band_lo[nt][u][half] = pack2(lo[0], lo[1]);
      }
  }

  const bool gated = p.gate != nullptr;
  const int nchunks = (p.Cg + kCH - 1) / kCH;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int64_t c0 = static_cast<int64_t>(g) * p.Cg + ch * kCH;
    const int cn = min(kCH, p.Cg - ch * kCH);
    __syncthreads();  // the probabilities, or the previous chunk's tiles, are consumed
    v2::fill<v2::Fill::kValue, kCH, CL, NT, T, v2::kBatch, T>(tile, kPitch, ROWS, kPitch, kCH * kPitch,
                                                              p.src, v2::no_gate<T>, xi, b, c0, cn,
                                                              i0 - R, j0 - 4, tid);
    if (gated)
      v2::fill<v2::Fill::kSigmoid, kCH, CL, NT>(stage, kTP, kWarps, kTW, kTW, p.gate, v2::no_gate<T>,
                                                xi, b, c0, cn, i0, j0, tid);
    __syncthreads();
    float acc[2][4] = {};
#pragma unroll
    for (int u = 0; u < KT; ++u) {
      const T* row = tile + (warp + u) * kCH * kPitch;  // image row i0 + warp + u - R
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const T* lo_rows = row + gid * kPitch + nt * 8 + 2 * tig;  // channel gid
        const T* hi_rows = lo_rows + 8 * kPitch;                   // channel gid + 8
        const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(lo_rows),
                               *reinterpret_cast<const uint32_t*>(hi_rows),
                               *reinterpret_cast<const uint32_t*>(lo_rows + 8),
                               *reinterpret_cast<const uint32_t*>(hi_rows + 8)};
        mma_16816<T>(acc[nt], a, band_hi[nt][u]);
        mma_16816<T>(acc[nt], a, band_lo[nt][u]);
      }
    }
    // D fragments: acc[nt][e] is channel gid (+8 for e >= 2), pixel nt*8 + 2*tig + (e & 1).
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float* slot = stage + (gid + (e >= 2 ? 8 : 0)) * kTP + warp * kTW + nt * 8 + 2 * tig + (e & 1);
        *slot = gated ? acc[nt][e] * *slot : acc[nt][e];
      }
    __syncthreads();
    v2::store_tile<kWarps, kTW, CL, NT>(p.out, stage, kCH, xi, b, c0, cn, i0, j0, tid);
  }
}

template <int KT, typename T, bool CL>
void launch_forward_tc(Params<T> p, cudaStream_t stream) {
  const int64_t blocks = set_tiles(p, kWarps, kTW);
  launch_kernel(forward_tc<KT, T, CL>, blocks, kWarps * 32, smem_bytes<T>(KT), stream, p, KT);
}

// Whether the tensor-core forward runs: 16-bit inputs, odd K <= 9, a GPU of compute capability 8.0
// or newer (mma.sync with bf16).
template <typename T>
bool use_tensor_cores(const Params<T>& p) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    if (p.K > kMaxK) return false;
    int device = 0, major = 0;
    SGDC_CUDA_CHECK(cudaGetDevice(&device));
    SGDC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major >= 8;
  }
}

template <Mode M, typename T, bool CL>
void launch_v3(const Params<T>& p, cudaStream_t stream) {
  if constexpr (M == Mode::kForward && !std::is_same_v<T, float>) {
    if (use_tensor_cores(p)) {
      switch (p.K) {
        case 1: return launch_forward_tc<1, T, CL>(p, stream);
        case 3: return launch_forward_tc<3, T, CL>(p, stream);
        case 5: return launch_forward_tc<5, T, CL>(p, stream);
        case 7: return launch_forward_tc<7, T, CL>(p, stream);
        case 9: return launch_forward_tc<9, T, CL>(p, stream);
        default: break;
      }
    }
  }
  v2::launch_v2<M, T, CL>(p, stream);
}

}  // namespace v3
}  // namespace cuda_impl
}  // namespace sgdc
