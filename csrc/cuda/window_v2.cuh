// v2 of the sgdc_conv kernels (SGDC_CUDA_VARIANT=v2, the default). What changed from v1 and why is
// in bench/NOTES_cuda.md; in short:
//
// - Every cooperative copy between global and shared memory issues kBatch independent global
//   loads per thread before it stores any of them (v1 chained load -> store per element), and
//   runs in the memory order of the layout (pixel-fastest NCHW, channel-fastest channels_last).
// - A chunk is one 32-byte sector of a channels_last pixel (8 fp32 or 16 16-bit channels).
// - window_v2 (forward and dx): each thread owns PX = 2 adjacent pixels of a row, so one row of
//   the halo, read with 8-byte loads, feeds both pixels' K taps: K+1 shared loads per 2K FMAs
//   instead of one per FMA. The gate (forward) is staged through shared memory with the chunk,
//   and the results leave through the same staging tile in the layout's memory order, so
//   channels_last stores are whole sectors.
// - grad_weights_v2: g_y = dout * sigmoid(gate) and sigmoid(gate) of the chunk are loaded into
//   shared memory with its x halo (v1 waited on gate -> sigmoid -> dout per channel); dgate
//   and dkernel leave through staging tiles in the layout's memory order; 3 blocks of 128
//   threads fit an SM (v1: one block of 256).
//
// Passes (docs/op.md): kForward out = s * sum_t P[t] x[p+off_t]; grad_weights dP, dkernel, dgate
// and the softmax statistics; kGradInput dx[q] = sum_t P[t, q-off_t] g_y[q-off_t].
#pragma once

#include <algorithm>

#include "common.cuh"

namespace sgdc {
namespace cuda_impl {
namespace v2 {

// Channels per shared-memory chunk: one 32-byte sector of a channels_last pixel; 8 for NCHW.
template <typename T, bool CL>
__host__ __device__ constexpr int chunk() {
  return CL ? static_cast<int>(32 / sizeof(T)) : 8;
}
constexpr int kBatch = 8;  // global loads in flight per thread in a cooperative copy
// Kernels for a compile-time K run 128-thread blocks, at least 3 per SM: ptxas may then give a
// thread 168 registers, enough for window_v2's 2 x K*K weights and grad_weights_v2's P and dP at
// K = 7 without spills (128 registers, 2 blocks of 256, spilled 400-700 bytes).
constexpr int kBlocksPerSM = 3;
template <typename T>
constexpr const T* no_gate = nullptr;  // a typed null for fill's gate

// What a cooperative fill stores for a global element (offset off).
enum class Fill {
  kValue,       // src[off]
  kSigmoid,     // sigmoid(src[off])
  kGatedValue,  // src[off] * sigmoid(gate[off])  (g_y; src[off] when gate is nullptr)
};

// Copies an (CH x rows x cols) window of channels [c0, c0 + cn) of one (b, head) at image rows
// i_start.., columns j_start.. into tile[c * cstride + row * pitch + col], zero outside the image
// and for c >= cn, converted to TileT. Each thread issues up to NB global loads before it stores any.
template <Fill F, int CH, bool CL, int NT, typename T, int NB = kBatch, typename TileT = float>
__device__ __forceinline__ void fill(TileT* tile, int cstride, int rows, int cols, int pitch,
                                     const T* src, const T* gate, const Dense4<CL>& xi, int64_t b,
                                     int64_t c0, int cn, int i_start, int j_start, int tid) {
  const int n = CH * rows * cols;
  for (int base = tid; base < n; base += NT * NB) {
    float v[NB], w[NB];
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const int e = base + k * NT;
      const int c = CL ? e % CH : e / (rows * cols);
      const int pix = CL ? e / CH : e % (rows * cols);
      const int ii = i_start + pix / cols, jj = j_start + pix % cols;
      v[k] = 0.f;
      w[k] = 0.f;
      if (e < n && c < cn && ii >= 0 && ii < xi.H && jj >= 0 && jj < xi.W) {
        const int64_t off = xi(b, c0 + c, ii, jj);
        v[k] = static_cast<float>(src[off]);
        if (F == Fill::kGatedValue && gate != nullptr) w[k] = static_cast<float>(gate[off]);
      }
    }
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const int e = base + k * NT;
      if (e < n) {
        const int c = CL ? e % CH : e / (rows * cols);
        const int pix = CL ? e / CH : e % (rows * cols);
        float val = v[k];
        if (F == Fill::kSigmoid) val = sigmoidf(val);
        if (F == Fill::kGatedValue && gate != nullptr) val *= sigmoidf(w[k]);
        tile[c * cstride + (pix / cols) * pitch + pix % cols] = static_cast<TileT>(val);
      }
    }
  }
}

// Writes stage[c * TH*TW + pix] (nch channels) of a TH x TW tile at (i0, j0) to channels
// c0 + c of out, for c < cn and pixels in the image, in the layout's memory order.
template <int TH, int TW, bool CL, int NT, typename T>
__device__ __forceinline__ void store_tile(GlobalOut<T> out, const float* stage, int nch,
                                           const Dense4<CL>& xi, int64_t b, int64_t c0, int cn, int i0,
                                           int j0, int tid) {
  constexpr int TP = TH * TW;
  const int n = nch * TP;
  for (int e = tid; e < n; e += NT) {
    const int c = CL ? e % nch : e / TP;
    const int pix = CL ? e / nch : e % TP;
    const int ii = i0 + pix / TW, jj = j0 + pix % TW;
    if (c < cn && ii < xi.H && jj < xi.W)
      out[xi(b, c0 + c, ii, jj)] = static_cast<T>(stage[c * TP + pix]);
  }
}

// Forward (kForward) and dx (kGradInput): a TH x (TWT*PX) tile per block, PX adjacent pixels of a
// row per thread.
template <Mode M, int KT, int TH, int TWT, int PX, typename T, bool CL>
__global__ void __launch_bounds__(TH * TWT, KT > 0 ? kBlocksPerSM : 1) window_v2(const Params<T> p) {
  static_assert(M != Mode::kGradWeights, "grad_weights_v2 computes the weight gradients");
  static_assert(KT > 0 || PX == 1, "the generic-K kernel keeps one pixel per thread");
  constexpr int NT = TH * TWT, TW = TWT * PX, TP = TH * TW, CH = chunk<T, CL>();
  const int K = KT > 0 ? KT : p.K;
  const int KK = K * K, r = K / 2;
  const int rows = TH + K - 1, cols = TW + K - 1, pitch = cols + (cols & 1);  // even: 8-byte rows
  const int NP = rows * pitch;
  float* tile = dynamic_smem<float>();  // [CH][NP]: x (forward) or g_y (dx), with the halo
  float* stage = tile + CH * NP;        // [CH][TP]: forward sigmoid(gate), then the results
  float* taps = stage + CH * TP;        // generic K only: [KK][NT]

  const auto [tile_id, g, b] = block_place(p);
  const int i0 = (tile_id / p.tiles_w) * TH, j0 = (tile_id % p.tiles_w) * TW;
  const int tid = threadIdx.x, ti = tid / TWT, tj = tid % TWT;
  const int i = i0 + ti;

  const Dense4<CL> xi{p.C, p.H, p.W};
  const Dense4<CL> ki{static_cast<int64_t>(p.G) * KK, p.H, p.W};
  const int64_t kc0 = static_cast<int64_t>(g) * KK;
  const int64_t sbase = (b * p.G + g) * static_cast<int64_t>(p.H) * p.W;

  Taps<KT> P[PX];
#pragma unroll
  for (int px = 0; px < PX; ++px) {
    P[px].init(taps + px * KK * NT, tid, NT);
    const int j = j0 + tj * PX + px;
    if (i >= p.H || j >= p.W) {
#pragma unroll
      for (int t = 0; t < KK; ++t) P[px][t] = 0.f;  // no output here; its taps add nothing
    } else if (M == Mode::kForward) {
      softmax_taps<KT>(P[px], p, ki, b, kc0, K, i, j);
    } else {
      flipped_taps<KT>(P[px], p, ki, b, kc0, sbase, K, i, j);
    }
  }

  const bool gated = M == Mode::kForward && p.gate != nullptr;
  const int nchunks = (p.Cg + CH - 1) / CH;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int64_t c0 = static_cast<int64_t>(g) * p.Cg + ch * CH;
    const int cn = min(CH, p.Cg - ch * CH);
    __syncthreads();  // the previous chunk's tile and stage are consumed
    fill<M == Mode::kForward ? Fill::kValue : Fill::kGatedValue, CH, CL, NT>(
        tile, NP, rows, cols, pitch, p.src, p.gate, xi, b, c0, cn, i0 - r, j0 - r, tid);
    if (gated)
      fill<Fill::kSigmoid, CH, CL, NT>(stage, TP, TH, TW, TW, p.gate, no_gate<T>, xi, b, c0, cn, i0,
                                       j0, tid);
    __syncthreads();
    for (int c = 0; c < cn; ++c) {
      const float* row0 = tile + c * NP + ti * pitch + tj * PX;
      float acc[PX];
#pragma unroll
      for (int px = 0; px < PX; ++px) acc[px] = 0.f;
#pragma unroll
      for (int u = 0; u < K; ++u) {
        const float* row = row0 + u * pitch;
        if constexpr (KT > 0 && PX % 2 == 0) {
          // PX + K - 1 values (even), read as 8-byte pairs: (tj * PX) and pitch are even.
          constexpr int NV = PX + KT - 1;
          float xr[NV];
#pragma unroll
          for (int h = 0; h < NV / 2; ++h) {
            const float2 pair = reinterpret_cast<const float2*>(row)[h];
            xr[2 * h] = pair.x;
            xr[2 * h + 1] = pair.y;
          }
#pragma unroll
          for (int v = 0; v < KT; ++v)
#pragma unroll
            for (int px = 0; px < PX; ++px) acc[px] = fmaf(P[px][u * KT + v], xr[v + px], acc[px]);
        } else {
#pragma unroll
          for (int v = 0; v < K; ++v)
#pragma unroll
            for (int px = 0; px < PX; ++px) acc[px] = fmaf(P[px][u * K + v], row[v + px], acc[px]);
        }
      }
      float* out = stage + c * TP + ti * TW + tj * PX;  // this thread's own slots
#pragma unroll
      for (int px = 0; px < PX; ++px) out[px] = gated ? acc[px] * out[px] : acc[px];
    }
    __syncthreads();
    store_tile<TH, TW, CL, NT>(p.out, stage, CH, xi, b, c0, cn, i0, j0, tid);
  }
}

// dP, dkernel, dgate and the softmax statistics: one pixel per thread of a TH x TW tile.
template <int KT, int TH, int TW, typename T, bool CL>
__global__ void __launch_bounds__(TH * TW, KT > 0 ? kBlocksPerSM : 1) grad_weights_v2(const Params<T> p) {
  constexpr int NT = TH * TW, TP = TH * TW, CH = chunk<T, CL>();
  const int K = KT > 0 ? KT : p.K;
  const int KK = K * K, r = K / 2;
  const int rows = TH + K - 1, cols = TW + K - 1, NP = rows * cols;
  float* taps = dynamic_smem<float>();  // generic K only: [KK][NT] P, then [KK][NT] dP
  float* tile = taps + (KT > 0 ? 0 : 2 * KK * NT);  // [CH][NP]: x with the halo
  float* gyt = tile + CH * NP;          // [CH][TP]: g_y = dout * sigmoid(gate)
  float* st = gyt + CH * TP;            // [CH][TP]: sigmoid(gate), then dgate (gated only)
  float* dks = tile;                    // after the channel loop: [KK][TP] dkernel

  const auto [tile_id, g, b] = block_place(p);
  const int i0 = (tile_id / p.tiles_w) * TH, j0 = (tile_id % p.tiles_w) * TW;
  const int tid = threadIdx.x, ti = tid / TW, tj = tid % TW;
  const int i = i0 + ti, j = j0 + tj;
  const bool active = i < p.H && j < p.W;
  const bool gated = p.gate != nullptr;

  const Dense4<CL> xi{p.C, p.H, p.W};
  const Dense4<CL> ki{static_cast<int64_t>(p.G) * KK, p.H, p.W};
  const int64_t kc0 = static_cast<int64_t>(g) * KK;
  const int64_t sbase = (b * p.G + g) * static_cast<int64_t>(p.H) * p.W;

  Taps<KT> P, dP;
  P.init(taps, tid, NT);
  dP.init(taps + KK * NT, tid, NT);
  if (active) {
    p.stats[sbase + static_cast<int64_t>(i) * p.W + j] = softmax_taps<KT>(P, p, ki, b, kc0, K, i, j);
#pragma unroll
    for (int t = 0; t < KK; ++t) dP[t] = 0.f;
  }

  const int nchunks = (p.Cg + CH - 1) / CH;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int64_t c0 = static_cast<int64_t>(g) * p.Cg + ch * CH;
    const int cn = min(CH, p.Cg - ch * CH);
    __syncthreads();  // the previous chunk's tiles are consumed
    // batches of 4 loads: P and dP hold 2 K*K registers here
    fill<Fill::kValue, CH, CL, NT, T, 4>(tile, NP, rows, cols, cols, p.src, no_gate<T>, xi, b, c0,
                                         cn, i0 - r, j0 - r, tid);
    fill<Fill::kGatedValue, CH, CL, NT, T, 4>(gyt, TP, TH, TW, TW, p.grad_out, p.gate, xi, b, c0,
                                              cn, i0, j0, tid);
    if (gated)
      fill<Fill::kSigmoid, CH, CL, NT, T, 4>(st, TP, TH, TW, TW, p.gate, no_gate<T>, xi, b, c0, cn,
                                             i0, j0, tid);
    __syncthreads();
    if (active) {
      for (int c = 0; c < cn; ++c) {
        const float* tc = tile + c * NP + ti * cols + tj;
        const float gy = gyt[c * TP + tid];
        float y = 0.f;
#pragma unroll
        for (int u = 0; u < K; ++u)
#pragma unroll
          for (int v = 0; v < K; ++v) {
            const float xv = tc[u * cols + v];
            y = fmaf(P[u * K + v], xv, y);
            dP[u * K + v] = fmaf(gy, xv, dP[u * K + v]);
          }
        if (gated) st[c * TP + tid] = gy * y * (1.f - st[c * TP + tid]);  // dout*y*s*(1-s)
      }
    }
    if (gated) {
      __syncthreads();
      store_tile<TH, TW, CL, NT>(p.out, st, CH, xi, b, c0, cn, i0, j0, tid);
    }
  }

  // dkernel = P (dP - sum_t P dP), staged so that both layouts store whole sectors (in
  // channels_last a pixel's K*K taps are contiguous, and 49 stores of one thread would each hit
  // another sector of every lane).
  __syncthreads();  // the last chunk's tiles are consumed
  if (active) {
    float pdp = 0.f;
#pragma unroll
    for (int t = 0; t < KK; ++t) pdp = fmaf(P[t], dP[t], pdp);
#pragma unroll
    for (int t = 0; t < KK; ++t) dks[t * TP + tid] = P[t] * (dP[t] - pdp);
  }
  __syncthreads();
  store_tile<TH, TW, CL, NT>(p.dkernel, dks, KK, ki, b, kc0, KK, i0, j0, tid);
}

template <Mode M, int KT, int TH, int TWT, int PX, typename T, bool CL>
void launch_window(Params<T> p, cudaStream_t stream) {
  constexpr int TW = TWT * PX, CH = chunk<T, CL>();
  const int64_t blocks = set_tiles(p, TH, TW);
  const int K = p.K;
  const size_t cols = TW + K - 1, pitch = cols + (cols & 1);
  const size_t floats = CH * (TH + K - 1) * pitch + CH * TH * TW +
                        (KT > 0 ? 0 : static_cast<size_t>(K) * K * TH * TWT);
  launch_kernel(window_v2<M, KT, TH, TWT, PX, T, CL>, blocks, TH * TWT, floats * sizeof(float),
                stream, p, K);
}

template <int KT, int TH, int TW, typename T, bool CL>
void launch_grad_weights(Params<T> p, cudaStream_t stream) {
  constexpr int CH = chunk<T, CL>();
  const int64_t blocks = set_tiles(p, TH, TW);
  const int K = p.K;
  const size_t KK = static_cast<size_t>(K) * K;
  const size_t tiles = CH * static_cast<size_t>(TH + K - 1) * (TW + K - 1) + 2 * CH * TH * TW;
  const size_t floats = (KT > 0 ? 0 : 2 * KK * TH * TW) + std::max(tiles, KK * TH * TW);
  launch_kernel(grad_weights_v2<KT, TH, TW, T, CL>, blocks, TH * TW, floats * sizeof(float),
                stream, p, K);
}

// Compile-time K (weights in registers) for 3, 5, 7; a generic kernel for the rest.
template <Mode M, typename T, bool CL>
void launch_v2(const Params<T>& p, cudaStream_t stream) {
  if constexpr (M == Mode::kGradWeights) {
    switch (p.K) {
      case 3: return launch_grad_weights<3, 8, 16, T, CL>(p, stream);
      case 5: return launch_grad_weights<5, 8, 16, T, CL>(p, stream);
      case 7: return launch_grad_weights<7, 8, 16, T, CL>(p, stream);
      default: return launch_grad_weights<0, 4, 16, T, CL>(p, stream);
    }
  } else {
    switch (p.K) {
      case 3: return launch_window<M, 3, 8, 16, 2, T, CL>(p, stream);
      case 5: return launch_window<M, 5, 8, 16, 2, T, CL>(p, stream);
      case 7: return launch_window<M, 7, 8, 16, 2, T, CL>(p, stream);
      default: return launch_window<M, 0, 4, 16, 1, T, CL>(p, stream);
    }
  }
}

}  // namespace v2
}  // namespace cuda_impl
}  // namespace sgdc
