// Variant v1 of the window_conv kernels (backend "cuda@v1"): one pixel per thread, sgdc_conv's
// configuration only (dilation 1, zero border, softmax). Its predicted speed against v2:
// bench/NOTES_cuda.md.
//
// One templated kernel, `window_v1`, does all three passes. A block owns a TH x TW pixel tile of
// one (batch, head); each thread owns one pixel and keeps that pixel's K*K tap weights in
// registers (shared memory for the generic-K fallback). The head's channels are streamed through
// a shared-memory tile with a (K-1) halo, kChunk channels at a time, and every weight is reused
// across all the head's channels. Passes:
//
//   kForward      out[c,p]  = sigmoid(gate[c,p]) * sum_t P[t,p] * x[c, p+off_t]
//   kGradWeights  dP[t,p]   = sum_c g_y[c,p] * x[c, p+off_t]  (g_y = dout * sigmoid(gate)),
//                 dweights   = P * (dP - sum_t P dP),  dgate = dout * y * s * (1-s),
//                 and the softmax statistics (max, 1/sum) of every pixel for the next pass
//   kGradInput    dx[c,q]   = sum_t P[t, q-off_t] * g_y[c, q-off_t]: the forward window with the
//                 taps flipped, run over g_y, with weights rebuilt from the logits and statistics
#pragma once

#include "common.cuh"

namespace sgdc {
namespace cuda_impl {
namespace v1 {

constexpr int kChunk = 8;  // channels per shared-memory tile

template <Mode M, int KT, int TH, int TW, typename T, bool CL>
__global__ void __launch_bounds__(TH * TW) window_v1(const Params<T> p) {
  constexpr int NT = TH * TW;
  const int K = KT > 0 ? KT : p.K;
  const int KK = K * K, r = K / 2;
  const int PW = TW + K - 1, NP = (TH + K - 1) * PW;
  float* smem = dynamic_smem<float>();
  float* tile = smem;                  // [kChunk][NP]
  float* taps = smem + kChunk * NP;    // generic K only: [KK][NT] for P, then [KK][NT] for dP

  const auto [tile_id, g, b] = block_place(p);
  const int i0 = (tile_id / p.tiles_w) * TH, j0 = (tile_id % p.tiles_w) * TW;
  const int tid = threadIdx.x, ti = tid / TW, tj = tid % TW;
  const int i = i0 + ti, j = j0 + tj;
  const bool active = i < p.H && j < p.W;

  const Dense4<CL> xi{p.C, p.H, p.W};
  const Dense4<CL> ki{static_cast<int64_t>(p.G) * KK, p.H, p.W};
  const int64_t kc0 = static_cast<int64_t>(g) * KK;                    // first logit channel
  const int64_t sbase = (b * p.G + g) * static_cast<int64_t>(p.H) * p.W;  // stats of (b, g)

  Taps<KT> P, dP;
  P.init(taps, tid, NT);
  dP.init(taps + KK * NT, tid, NT);
  float2 stats = make_float2(0.f, 0.f);

  if (active) {
    if (M == Mode::kGradInput) {
      flipped_taps<KT>(P, p, ki, b, kc0, sbase, K, i, j);
    } else {
      stats = softmax_taps<KT>(P, p, ki, b, kc0, K, i, j);
      if (M == Mode::kGradWeights)
#pragma unroll
        for (int t = 0; t < KK; ++t) dP[t] = 0.f;
    }
  }

  const int nchunks = (p.Cg + kChunk - 1) / kChunk;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int64_t c0 = static_cast<int64_t>(g) * p.Cg + ch * kChunk;
    const int cn = min(kChunk, p.Cg - ch * kChunk);
    __syncthreads();  // the previous chunk is consumed
    for (int e = tid; e < kChunk * NP; e += NT) {
      // channels_last: channel fastest (contiguous in memory); NCHW: pixel fastest.
      const int c = CL ? e % kChunk : e / NP;
      const int pix = CL ? e / kChunk : e % NP;
      const int ii = i0 - r + pix / PW, jj = j0 - r + pix % PW;
      float val = 0.f;
      if (c < cn && ii >= 0 && ii < p.H && jj >= 0 && jj < p.W) {
        const int64_t off = xi(b, c0 + c, ii, jj);
        val = static_cast<float>(p.src[off]);
        if (M == Mode::kGradInput && p.gate != nullptr)
          val *= sigmoidf(static_cast<float>(p.gate[off]));
      }
      tile[c * NP + pix] = val;
    }
    __syncthreads();
    if (!active) continue;
    for (int c = 0; c < cn; ++c) {
      const float* tc = tile + c * NP + ti * PW + tj;
      const int64_t off = xi(b, c0 + c, i, j);
      if (M != Mode::kGradWeights) {
        float acc = 0.f;
#pragma unroll
        for (int u = 0; u < K; ++u)
#pragma unroll
          for (int v = 0; v < K; ++v) acc = fmaf(P[u * K + v], tc[u * PW + v], acc);
        if (M == Mode::kForward && p.gate != nullptr)
          acc *= sigmoidf(static_cast<float>(p.gate[off]));
        p.out[off] = static_cast<T>(acc);
      } else {
        const float go = static_cast<float>(p.grad_out[off]);
        const float s = p.gate != nullptr ? sigmoidf(static_cast<float>(p.gate[off])) : 1.f;
        const float gy = go * s;
        float y = 0.f;
#pragma unroll
        for (int u = 0; u < K; ++u)
#pragma unroll
          for (int v = 0; v < K; ++v) {
            const float xv = tc[u * PW + v];
            y = fmaf(P[u * K + v], xv, y);
            dP[u * K + v] = fmaf(gy, xv, dP[u * K + v]);
          }
        if (p.gate != nullptr) p.out[off] = static_cast<T>(go * y * s * (1.f - s));
      }
    }
  }

  if (M == Mode::kGradWeights && active) {
    float pdp = 0.f;
#pragma unroll
    for (int t = 0; t < KK; ++t) pdp = fmaf(P[t], dP[t], pdp);
#pragma unroll
    for (int t = 0; t < KK; ++t)
      p.dweights[ki(b, kc0 + t, i, j)] = static_cast<T>(P[t] * (dP[t] - pdp));
    p.stats[sbase + static_cast<int64_t>(i) * p.W + j] = stats;
  }
}

template <Mode M, int KT, int TH, int TW, typename T, bool CL>
void launch_tiles_v1(Params<T> p, cudaStream_t stream) {
  const int64_t blocks = set_tiles(p, TH, TW);
  const int K = p.K;
  const size_t NP = static_cast<size_t>(TH + K - 1) * (TW + K - 1);
  const size_t ntaps = KT > 0 ? 0 : (M == Mode::kGradWeights ? 2 : 1) * static_cast<size_t>(K) * K;
  const size_t smem = sizeof(float) * (kChunk * NP + ntaps * TH * TW);
  launch_kernel(window_v1<M, KT, TH, TW, T, CL>, blocks, TH * TW, smem, stream, p, K);
}

// Compile-time K for the common sizes (weights in registers), a generic kernel for the rest.
template <Mode M, typename T, bool CL>
void launch_v1(const Params<T>& p, cudaStream_t stream) {
  switch (p.K) {
    case 3: return launch_tiles_v1<M, 3, 8, 32, T, CL>(p, stream);
    case 5: return launch_tiles_v1<M, 5, 8, 32, T, CL>(p, stream);
    case 7: return launch_tiles_v1<M, 7, 8, 32, T, CL>(p, stream);
    default: return launch_tiles_v1<M, 0, 4, 16, T, CL>(p, stream);
  }
}

}  // namespace v1
}  // namespace cuda_impl
}  // namespace sgdc
