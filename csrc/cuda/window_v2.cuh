// Variant v2 of the window_conv kernels (backend "cuda@v2", the default): it runs every
// configuration. The design and its predicted speed: bench/NOTES_cuda.md. In short:
//
// - Every cooperative copy between global and shared memory issues kBatch independent global
//   loads per thread before it stores any of them, and runs in the memory order of the layout
//   (pixel-fastest NCHW, channel-fastest channels_last).
// - A chunk is one 32-byte sector of a channels_last pixel (8 fp32 or 16 16-bit channels).
// - window_v2 (forward and dx): each thread owns PX = 2 adjacent pixels of a row, so one row of
//   the halo, read with 8-byte loads, feeds both pixels' K taps: K+1 shared loads per 2K FMAs
//   instead of one per FMA. The gate (forward) is staged through shared memory with the chunk,
//   and the results leave through the same staging tile in the layout's memory order, so
//   channels_last stores are whole sectors.
// - grad_weights_v2: g_y = dout * sigmoid(gate) and sigmoid(gate) of the chunk are loaded into
//   shared memory with its x halo; dgate and dweights leave through staging tiles in the
//   layout's memory order; 3 blocks of 128 threads fit an SM.
// - Dilated and clamped windows run in group space (one residue class of rows and columns is an
//   undilated image); their dx has its own gather kernel, grad_input_general.
//
// Passes (docs/op.md): kForward out = s * sum_t P[t] x[p+off_t]; grad_weights dP, dweights, dgate
// and the softmax statistics; kGradInput dx[q] = sum_t P[t, q-off_t] g_y[q-off_t].
//
// This file is longer than the others (about 480 lines): its three kernels share the variant's
// tiling, copy and staging helpers, which are read together.
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

// Copies an (CH x rows x cols) window of channels [c0, c0 + cn) of one (b, head) at group rows
// i_start.., columns j_start.. of the axes ai, aj (image rows and columns without dilation) into
// tile[c * cstride + row * pitch + col], zero outside the image and for c >= cn, converted to
// TileT. Each thread issues up to NB global loads before it stores any.
template <Fill F, int CH, bool CL, int NT, typename T, int NB = kBatch, typename TileT = float>
__device__ __forceinline__ void fill(TileT* tile, int cstride, int rows, int cols, int pitch,
                                     const T* src, const T* gate, const Dense4<CL>& xi, int64_t b,
                                     int64_t c0, int cn, const Axis& ai, int i_start, const Axis& aj,
                                     int j_start, int tid) {
  const int n = CH * rows * cols;
  for (int base = tid; base < n; base += NT * NB) {
    float v[NB], w[NB];
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const int e = base + k * NT;
      const int c = CL ? e % CH : e / (rows * cols);
      const int pix = CL ? e / CH : e % (rows * cols);
      const int gi = i_start + pix / cols, gj = j_start + pix % cols;
      v[k] = 0.f;
      w[k] = 0.f;
      if (e < n && c < cn && ai.inside(gi) && aj.inside(gj)) {
        const int64_t off = xi(b, c0 + c, ai.image(gi), aj.image(gj));
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

// Writes stage[c * TH*TW + pix] (nch channels) of a TH x TW tile at group indices (i0, j0) of
// the axes ai, aj to channels c0 + c of out, for c < cn and pixels in the image, in the layout's
// memory order.
template <int TH, int TW, bool CL, int NT, typename T>
__device__ __forceinline__ void store_tile(GlobalOut<T> out, const float* stage, int nch,
                                           const Dense4<CL>& xi, int64_t b, int64_t c0, int cn,
                                           const Axis& ai, int i0, const Axis& aj, int j0, int tid) {
  constexpr int TP = TH * TW;
  const int n = nch * TP;
  for (int e = tid; e < n; e += NT) {
    const int c = CL ? e % nch : e / TP;
    const int pix = CL ? e / nch : e % TP;
    const int gi = i0 + pix / TW, gj = j0 + pix % TW;
    if (c < cn && ai.inside(gi) && aj.inside(gj))
      out[xi(b, c0 + c, ai.image(gi), aj.image(gj))] = static_cast<T>(stage[c * TP + pix]);
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
  const int KK = K * K;
  // Clamped windows start at a nondecreasing, 1-Lipschitz function of the pixel, so TH + K - 1
  // halo rows cover a tile's windows in every configuration.
  const int rows = TH + K - 1, cols = TW + K - 1, pitch = cols + (cols & 1);  // even: 8-byte rows
  const int NP = rows * pitch;
  float* tile = dynamic_smem<float>();  // [CH][NP]: x (forward) or g_y (dx), with the halo
  float* stage = tile + CH * NP;        // [CH][TP]: forward sigmoid(gate), then the results
  float* taps = stage + CH * TP;        // generic K only: [KK][NT]

  const auto [tile_id, g, b] = block_place(p);
  // Group space (docs/op.md): the image itself unless dilated. The compile-time-K kernels run
  // only centred windows without dilation (launch_v2), where the window of pixel i starts at
  // i - r and the tile's halo at i0 - r.
  const auto [ai, aj, i0, j0] = block_tile<KT == 0>(p, tile_id, TH, TW);
  const int tid = threadIdx.x, ti = tid / TWT, tj = tid % TWT;
  const int gi = i0 + ti;
  const int hs = ai.start(i0), ws = aj.start(j0);  // the halo's first group row and column
  const int oi = ai.start(gi) - hs, oj = aj.start(j0 + tj * PX) - ws;  // this thread's window

  const Dense4<CL> xi{p.C, p.H, p.W};
  const Dense4<CL> ki{static_cast<int64_t>(p.G) * KK, p.H, p.W};
  const int64_t kc0 = static_cast<int64_t>(g) * KK;
  const int64_t sbase = (b * p.G + g) * static_cast<int64_t>(p.H) * p.W;

  Taps<KT> P[PX];
#pragma unroll
  for (int px = 0; px < PX; ++px) {
    P[px].init(taps + px * KK * NT, tid, NT);
    const int gj = j0 + tj * PX + px;
    if (!ai.inside(gi) || !aj.inside(gj)) {
#pragma unroll
      for (int t = 0; t < KK; ++t) P[px][t] = 0.f;  // no output here; its taps add nothing
    } else if (M == Mode::kForward) {
      softmax_taps<KT>(P[px], p, ki, b, kc0, K, ai.image(gi), aj.image(gj));
    } else {  // centred windows without dilation only: grad_input_general does the others
      flipped_taps<KT>(P[px], p, ki, b, kc0, sbase, K, gi, gj);
    }
  }

  const bool gated = M == Mode::kForward && p.gate != nullptr;
  const int nchunks = (p.Cg + CH - 1) / CH;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int64_t c0 = static_cast<int64_t>(g) * p.Cg + ch * CH;
    const int cn = min(CH, p.Cg - ch * CH);
    __syncthreads();  // the previous chunk's tile and stage are consumed
    fill<M == Mode::kForward ? Fill::kValue : Fill::kGatedValue, CH, CL, NT>(
        tile, NP, rows, cols, pitch, p.src, p.gate, xi, b, c0, cn, ai, hs, aj, ws, tid);
    if (gated)
      fill<Fill::kSigmoid, CH, CL, NT>(stage, TP, TH, TW, TW, p.gate, no_gate<T>, xi, b, c0, cn, ai,
                                       i0, aj, j0, tid);
    __syncthreads();
    if constexpr (KT == 0) {
      // Generic K: the weights live in shared memory, so read each once per chunk and feed the
      // chunk's CH channels from it (taps outer, channels inner: one shared load per FMA instead
      // of two). Channels c >= cn of the tile are zeros and are not stored.
      float acc[CH];
#pragma unroll
      for (int c = 0; c < CH; ++c) acc[c] = 0.f;
      const float* win = tile + oi * pitch + oj;
      for (int u = 0; u < K; ++u)
        for (int v = 0; v < K; ++v) {
          const float w = P[0][u * K + v];
          const float* src = win + u * pitch + v;
#pragma unroll
          for (int c = 0; c < CH; ++c) acc[c] = fmaf(w, src[c * NP], acc[c]);
        }
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        float* out = stage + c * TP + tid;  // PX = 1: this thread's own slot
        *out = gated ? acc[c] * *out : acc[c];
      }
    } else {
      for (int c = 0; c < cn; ++c) {
        const float* row0 = tile + c * NP + oi * pitch + oj;
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
    }
    __syncthreads();
    store_tile<TH, TW, CL, NT>(p.out, stage, CH, xi, b, c0, cn, ai, i0, aj, j0, tid);
  }
}

// dP, dweights, dgate and the softmax statistics: one pixel per thread of a TH x TW tile.
template <int KT, int TH, int TW, typename T, bool CL>
__global__ void __launch_bounds__(TH * TW, KT > 0 ? kBlocksPerSM : 1) grad_weights_v2(const Params<T> p) {
  constexpr int NT = TH * TW, TP = TH * TW, CH = chunk<T, CL>();
  const int K = KT > 0 ? KT : p.K;
  const int KK = K * K;
  const int rows = TH + K - 1, cols = TW + K - 1, NP = rows * cols;
  float* taps = dynamic_smem<float>();  // generic K only: [KK][NT] P, then [KK][NT] dP
  float* tile = taps + (KT > 0 ? 0 : 2 * KK * NT);  // [CH][NP]: x with the halo
  float* gyt = tile + CH * NP;          // [CH][TP]: g_y = dout * sigmoid(gate)
  float* st = gyt + CH * TP;            // [CH][TP]: sigmoid(gate), then dgate (gated only)
  float* dks = tile;                    // after the channel loop: [KK][TP] dweights

  const auto [tile_id, g, b] = block_place(p);
  const auto [ai, aj, i0, j0] = block_tile<KT == 0>(p, tile_id, TH, TW);  // as window_v2
  const int tid = threadIdx.x, ti = tid / TW, tj = tid % TW;
  const int gi = i0 + ti, gj = j0 + tj;
  const int i = ai.image(gi), j = aj.image(gj);
  const bool active = ai.inside(gi) && aj.inside(gj);
  const int hs = ai.start(i0), ws = aj.start(j0);  // the halo's first group row and column
  const int oi = ai.start(gi) - hs, oj = aj.start(gj) - ws;  // this thread's window
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
                                         cn, ai, hs, aj, ws, tid);
    fill<Fill::kGatedValue, CH, CL, NT, T, 4>(gyt, TP, TH, TW, TW, p.grad_out, p.gate, xi, b, c0,
                                              cn, ai, i0, aj, j0, tid);
    if (gated)
      fill<Fill::kSigmoid, CH, CL, NT, T, 4>(st, TP, TH, TW, TW, p.gate, no_gate<T>, xi, b, c0, cn,
                                             ai, i0, aj, j0, tid);
    __syncthreads();
    if constexpr (KT == 0) {
      if (active) {
        // Generic K: P and dP live in shared memory, so read and update each once per chunk and
        // feed the chunk's CH channels from it (taps outer, channels inner), with g_y and the
        // ungated sums y in registers; y only with a gate. Channels c >= cn are zeros in the tiles.
        float gy[CH], y[CH];
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          gy[c] = gyt[c * TP + tid];
          y[c] = 0.f;
        }
        const float* win = tile + oi * cols + oj;
        auto sweep = [&](auto with_y) {
          for (int u = 0; u < K; ++u)
            for (int v = 0; v < K; ++v) {
              const int t = u * K + v;
              const float w = P[t];
              const float* src = win + u * cols + v;
              float a = 0.f;
#pragma unroll
              for (int c = 0; c < CH; ++c) {
                const float xv = src[c * NP];
                if constexpr (decltype(with_y)::value) y[c] = fmaf(w, xv, y[c]);
                a = fmaf(gy[c], xv, a);
              }
              dP[t] += a;
            }
        };
        if (gated) {
          sweep(std::true_type{});
#pragma unroll
          for (int c = 0; c < CH; ++c)
            if (c < cn) st[c * TP + tid] = gy[c] * y[c] * (1.f - st[c * TP + tid]);  // dout*y*s*(1-s)
        } else {
          sweep(std::false_type{});
        }
      }
    } else if (active) {
      for (int c = 0; c < cn; ++c) {
        const float* tc = tile + c * NP + oi * cols + oj;
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
      store_tile<TH, TW, CL, NT>(p.out, st, CH, xi, b, c0, cn, ai, i0, aj, j0, tid);
    }
  }

  // dweights = P (dP - sum_t P dP) (dP itself without the softmax), staged so that both layouts store whole sectors (in
  // channels_last a pixel's K*K taps are contiguous, and 49 stores of one thread would each hit
  // another sector of every lane).
  __syncthreads();  // the last chunk's tiles are consumed
  if (active) {
    float pdp = 0.f;
#pragma unroll
    for (int t = 0; t < KK; ++t) pdp = fmaf(P[t], dP[t], pdp);
#pragma unroll
    for (int t = 0; t < KK; ++t) dks[t * TP + tid] = p.softmax ? P[t] * (dP[t] - pdp) : dP[t];
  }
  __syncthreads();
  store_tile<TH, TW, CL, NT>(p.dweights, dks, KK, ki, b, kc0, KK, ai, i0, aj, j0, tid);
}

// dx for dilated or clamped windows (window_v2 computes the centred, undilated one with flipped
// taps): in group space, pixel q receives from the pixels p in [first_src(q), last_src(q)] along
// each axis (more than K near a clamped border), tap q - start(p) of each. One pixel per thread
// of a TH x TW tile; per chunk of channels, the g_y halo covering every such p is staged in shared
// memory, and each (p, tap) weight, rebuilt from its logit (and softmax statistics), feeds the
// chunk's CH channels held in registers.
template <int TH, int TW, typename T, bool CL>
__global__ void __launch_bounds__(TH * TW) grad_input_general(const Params<T> p) {
  constexpr int NT = TH * TW, TP = TH * TW, CH = chunk<T, CL>();
  const int K = p.K, KK = K * K;
  const int pitch = TW + 2 * (K - 1), NP = (TH + 2 * (K - 1)) * pitch;  // the largest halo
  float* tile = dynamic_smem<float>();  // [CH][NP]: g_y with the halo
  float* stage = tile + CH * NP;        // [CH][TP]: the results

  const auto [tile_id, g, b] = block_place(p);
  const auto [ai, aj, i0, j0] = group_tile(p, tile_id, TH, TW);
  const int tid = threadIdx.x, gi = i0 + tid / TW, gj = j0 + tid % TW;
  const bool active = ai.inside(gi) && aj.inside(gj);
  // The halo: the sources of the tile's first and last pixels bound those of all (both ends are
  // nondecreasing in q); clipped to the group, where the fill would only store zeros.
  const int hs = max(ai.first_src(i0), 0), ws = max(aj.first_src(j0), 0);
  const int he = min(ai.last_src(min(i0 + TH - 1, ai.L - 1)), ai.L - 1);
  const int we = min(aj.last_src(min(j0 + TW - 1, aj.L - 1)), aj.L - 1);
  const int rows = max(he - hs + 1, 0), cols = max(we - ws + 1, 0);

  const Dense4<CL> xi{p.C, p.H, p.W};
  const Dense4<CL> ki{static_cast<int64_t>(p.G) * KK, p.H, p.W};
  const int64_t kc0 = static_cast<int64_t>(g) * KK;
  const int64_t sbase = (b * p.G + g) * static_cast<int64_t>(p.H) * p.W;
  const int pr0 = max(ai.first_src(gi), 0), pr1 = min(ai.last_src(gi), ai.L - 1);
  const int pc0 = max(aj.first_src(gj), 0), pc1 = min(aj.last_src(gj), aj.L - 1);

  const int nchunks = (p.Cg + CH - 1) / CH;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int64_t c0 = static_cast<int64_t>(g) * p.Cg + ch * CH;
    const int cn = min(CH, p.Cg - ch * CH);
    __syncthreads();  // the previous chunk's tile and stage are consumed
    fill<Fill::kGatedValue, CH, CL, NT>(tile, NP, rows, cols, pitch, p.src, p.gate, xi, b, c0, cn,
                                        ai, hs, aj, ws, tid);
    __syncthreads();
    float acc[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) acc[c] = 0.f;
    if (active) {
      for (int pr = pr0; pr <= pr1; ++pr) {
        const int u = gi - ai.start(pr);
        for (int pc = pc0; pc <= pc1; ++pc) {
          const int v = gj - aj.start(pc);
          const float w = tap_weight(p, ki, b, kc0 + u * K + v, sbase, ai.image(pr), aj.image(pc));
          const float* src = tile + (pr - hs) * pitch + (pc - ws);
#pragma unroll
          for (int c = 0; c < CH; ++c) acc[c] = fmaf(w, src[c * NP], acc[c]);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < CH; ++c) stage[c * TP + tid] = acc[c];
    __syncthreads();
    store_tile<TH, TW, CL, NT>(p.out, stage, CH, xi, b, c0, cn, ai, i0, aj, j0, tid);
  }
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

template <int TH, int TW, typename T, bool CL>
void launch_grad_input_general(Params<T> p, cudaStream_t stream) {
  constexpr int CH = chunk<T, CL>();
  const int64_t blocks = set_tiles(p, TH, TW);
  const size_t span = 2 * (static_cast<size_t>(p.K) - 1);
  const size_t floats = CH * (TH + span) * (TW + span) + CH * TH * TW;
  launch_kernel(grad_input_general<TH, TW, T, CL>, blocks, TH * TW, floats * sizeof(float), stream,
                p, p.K);
}

// Compile-time K (weights in registers) for 3, 5, 7; a generic kernel for the rest and for
// dilated or clamped windows (in group space), whose dx has its own kernel.
template <Mode M, typename T, bool CL>
void launch_v2(const Params<T>& p, cudaStream_t stream) {
  if (p.d > 1 || p.clamp) {
    if constexpr (M == Mode::kGradWeights) return launch_grad_weights<0, 4, 16, T, CL>(p, stream);
    else if constexpr (M == Mode::kGradInput) return launch_grad_input_general<4, 16, T, CL>(p, stream);
    else return launch_window<M, 0, 4, 16, 1, T, CL>(p, stream);
  }
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
