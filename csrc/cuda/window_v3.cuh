// Variant v3 of the window_conv kernels (backend "cuda@v3"): v2, with the forward and dx of 16-bit
// inputs on the tensor cores for K <= 9 (other dtypes and K, and the weight gradients, are v2's);
// sgdc_conv's configuration only. The design and its predicted speed: bench/NOTES_cuda.md.
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
// [tile row][channel][40], columns j0 - 8 .. j0 + 23, with 16-byte global loads where the layout's
// contiguous dimension allows (8 columns in NCHW, 8 channels in channels_last) and element by
// element at the image's borders: each A fragment is then four 32-bit shared loads, conflict-free
// with a 20-word channel pitch. The B fragments (the bands) are built
// once per block from the softmax of the tile's pixels and kept in registers for every chunk.
#pragma once

#include "window_v2.cuh"

namespace sgdc {
namespace cuda_impl {
namespace v3 {

constexpr int kWarps = 8;               // tile rows, one per warp
constexpr int kTW = 16;                 // tile columns: two n-tiles of 8 pixels per warp
constexpr int kCH = 16;                 // channels per chunk: one m-tile
constexpr int kHaloCols = 32;           // tile columns: image columns j0 - 8 .. j0 + 23 (4 vectors of 8)
constexpr int kPitch = 40;              // 16-bit elements per (row, channel): 20 words, conflict-free A loads
constexpr int kCol0 = 4;                // tile column of image column j0 - 4, where the n-tiles' halos start
constexpr int kMaxK = 9;                // K - 1 <= 8: a pixel's taps fit 16 halo columns
constexpr int kTP = kWarps * kTW;       // pixels of a tile

template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// One 16-byte group of 8 consecutive elements of the layout's contiguous dimension (columns in
// NCHW, channels in channels_last), starting at element (c, ii, jj): a single 16-byte load where
// all 8 are in the tensor and the address is aligned, else element by element (zero outside the
// image or past cn channels).
template <bool CL, typename T>
__device__ __forceinline__ uint4 load8(const T* src, bool aligned, const Dense4<CL>& xi, int64_t b, int64_t c0,
                                       int c, int cn, int ii, int jj) {
  uint4 v = {0u, 0u, 0u, 0u};
  if (ii < 0 || ii >= xi.H) return v;
  const bool full = CL ? (c + 8 <= cn && jj >= 0 && jj < xi.W) : (c < cn && jj >= 0 && jj + 8 <= xi.W);
  const int64_t off = xi(b, c0 + c, ii, jj < 0 ? 0 : jj);
  if (full && aligned) return *reinterpret_cast<const uint4*>(src + off);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int cq = CL ? c + q : c, jq = CL ? jj : jj + q;
    if (cq < cn && jq >= 0 && jq < xi.W) w[q / 2] |= static_cast<uint32_t>(src[xi(b, c0 + cq, ii, jq)].x) << (16 * (q % 2));
  }
  return {w[0], w[1], w[2], w[3]};
}

// g_y = dout * sigmoid(gate) (dout where gate is null) of 8 elements, split into a 16-bit head
// and the 16-bit remainder of the fp32 product.
template <typename T>
__device__ __forceinline__ void split_gy8(const uint4& d, const uint4& g, bool gated, uint4& hi, uint4& lo) {
  const uint32_t dw[4] = {d.x, d.y, d.z, d.w}, gw[4] = {g.x, g.y, g.z, g.w};
  uint32_t hw[4] = {0u, 0u, 0u, 0u}, lw[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int sh = 16 * (q % 2);
    float gy = static_cast<float>(T(static_cast<uint16_t>(dw[q / 2] >> sh), T::from_bits()));
    if (gated) gy *= sigmoidf(static_cast<float>(T(static_cast<uint16_t>(gw[q / 2] >> sh), T::from_bits())));
    const T h = static_cast<T>(gy);
    const T l = static_cast<T>(gy - static_cast<float>(h));
    hw[q / 2] |= static_cast<uint32_t>(h.x) << sh;
    lw[q / 2] |= static_cast<uint32_t>(l.x) << sh;
  }
  hi = {hw[0], hw[1], hw[2], hw[3]};
  lo = {lw[0], lw[1], lw[2], lw[3]};
}

// Stores a 16-byte group into tile[row][channel][kPitch] at dst: 8 columns of one channel row
// (NCHW), or one element in each of 8 channel rows (channels_last).
template <bool CL, typename T>
__device__ __forceinline__ void store8(T* dst, const uint4& v) {
  if (CL) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 8; ++q) dst[q * kPitch] = T(static_cast<uint16_t>(w[q / 2] >> (16 * (q % 2))), T::from_bits());
  } else {
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

// The chunk's halo, rows i_start .., columns j0 - 8 .., into tile[row][channel][kPitch]: src as it
// is (GY false), or g_y = src * sigmoid(gate) split into tile (head) and tile_lo (remainder) (GY
// true). Work items are 16-byte groups, their global loads issued before any store.
template <bool GY, int ROWS, bool CL, int NT, typename T>
__device__ __forceinline__ void fill_halo(T* tile, T* tile_lo, const T* src, const T* gate, const Dense4<CL>& xi,
                                          int64_t b, int64_t c0, int cn, int i_start, int j0, int tid) {
  // 16-byte loads need 16-byte aligned groups: the tensors' starts, the row (NCHW: W % 8 == 0) or
  // the pixel's channels (channels_last: C % 8 == 0 and c0 % 8 == 0).
  const bool gated = GY && gate != nullptr;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                       (!gated || reinterpret_cast<uintptr_t>(gate) % 16 == 0) &&
                       (CL ? xi.C % 8 == 0 && c0 % 8 == 0 : xi.W % 8 == 0);
  constexpr int kGroups = CL ? ROWS * kHaloCols * (kCH / 8) : ROWS * kCH * (kHaloCols / 8);
  constexpr int kPer = (kGroups + NT - 1) / NT;
  constexpr int kBatch = 4;  // 16-byte groups in flight per thread
#pragma unroll
  for (int k0 = 0; k0 < kPer; k0 += kBatch) {
    uint4 v[kBatch], g[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = tid + (k0 + k) * NT;
      // NCHW: e = (row * kCH + c) * 4 + group of 8 columns; CL: e = (row * kHaloCols + col) * 2 + group of 8 channels
      const int row = CL ? e / (kHaloCols * 2) : e / (kCH * 4);
      const int c = CL ? (e % 2) * 8 : (e / 4) % kCH;
      const int col = CL ? (e / 2) % kHaloCols : (e % 4) * 8;
      const bool in = e < kGroups;
      v[k] = in ? load8<CL>(src, aligned, xi, b, c0, c, cn, i_start + row, j0 - 8 + col) : uint4{0u, 0u, 0u, 0u};
      g[k] = in && gated ? load8<CL>(gate, aligned, xi, b, c0, c, cn, i_start + row, j0 - 8 + col)
                         : uint4{0u, 0u, 0u, 0u};
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = tid + (k0 + k) * NT;
      if (e >= kGroups) continue;
      const int row = CL ? e / (kHaloCols * 2) : e / (kCH * 4);
      const int c = CL ? (e % 2) * 8 : (e / 4) % kCH;
      const int col = CL ? (e / 2) % kHaloCols : (e % 4) * 8;
      const int at = (row * kCH + c) * kPitch + col;
      if constexpr (GY) {
        uint4 hi, lo;
        split_gy8<T>(v[k], g[k], gated, hi, lo);
        store8<CL>(tile + at, hi);
        store8<CL>(tile_lo + at, lo);
      } else {
        store8<CL>(tile + at, v[k]);
      }
    }
  }
}

// Bytes of dynamic shared memory. Forward: the softmax of the tile's pixels (fp32), later reused
// for the 16-bit halo tile and the fp32 staging tile. dx: the g_y halo (head and remainder) and the
// staging tile.
template <Mode M, typename T>
constexpr size_t smem_bytes(int K) {
  const size_t halo = sizeof(T) * (kWarps + K - 1) * kCH * kPitch;
  const size_t stage = sizeof(float) * kCH * kTP;
  if (M == Mode::kGradInput) return 2 * halo + stage;
  const size_t probs = sizeof(float) * K * K * kTP;
  return probs > halo + stage ? probs : halo + stage;
}

// One result of window_v3, channel c at pixel (i, j), by the definition, one tap at a time in fp32:
// what replaces the tensor cores' result where that is not finite. A non-finite x or g_y anywhere
// in an n-tile's halo reaches every pixel of the n-tile through the band's zeros (0 * inf = NaN),
// and the weights' split turns an infinite product into NaN (inf * head - inf * |remainder|), so
// a result that is finite is the band's, and one that is not is recomputed from its own taps only
// (docs/op.md, "Non-finite inputs"). Forward: sum_t P[t] x (zeros outside the image), P from the
// pixel's logits; dx: sum_t P[t, p] g_y[p] over the output pixels p = (i, j) - (u - R, v - R) in
// the image, with g_y = dout * sigmoid(gate) and P rebuilt from p's statistics.
template <Mode M, int KT, typename T, bool CL>
__device__ float exact_result(const Params<T>& p, const Dense4<CL>& xi, const Dense4<CL>& ki, int64_t b,
                              int64_t c, int64_t kc0, int64_t sbase, int i, int j) {
  constexpr int R = KT / 2;
  float acc = 0.f;
  if constexpr (M == Mode::kForward) {
    const float2 st = softmax_stats(p, ki, b, kc0, KT, i, j);
    for (int u = 0; u < KT; ++u)
      for (int v = 0; v < KT; ++v) {
        const int ii = i + u - R, jj = j + v - R;
        const bool in = ii >= 0 && ii < p.H && jj >= 0 && jj < p.W;
        const float xv = in ? static_cast<float>(p.src[xi(b, c, ii, jj)]) : 0.f;
        const float w = __expf(static_cast<float>(p.weights[ki(b, kc0 + u * KT + v, i, j)]) - st.x) * st.y;
        acc = fmaf(w, xv, acc);
      }
  } else {
    for (int u = 0; u < KT; ++u)
      for (int v = 0; v < KT; ++v) {
        const int pi = i - u + R, pj = j - v + R;
        if (pi < 0 || pi >= p.H || pj < 0 || pj >= p.W) continue;
        const int64_t off = xi(b, c, pi, pj);
        float gy = static_cast<float>(p.src[off]);
        if (p.gate != nullptr) gy *= sigmoidf(static_cast<float>(p.gate[off]));
        acc = fmaf(tap_weight(p, ki, b, kc0 + u * KT + v, sbase, pi, pj), gy, acc);
      }
  }
  return acc;
}

// Forward (kForward) and dx (kGradInput) on the tensor cores.
//
// Forward: out[c, q] = sum_(u,v) P[(u,v), q] x[c, q + (u-R, v-R)]: tap row u of warp w reads tile
// row w + u, and B[k, n] = P[(u, v), pixel n] with v = k - n + R - 4.
// dx: dx[c, q] = sum_(u,v) P[(u,v), p] g_y[c, p] over the output pixels p = q - (u-R, v-R) whose
// window covers q: tap row u reads g_y from tile row w + 2R - u, and B[k, n] = P[(u, v), p] with
// p at halo column k (image column j0 - 4 + 8 nt + k) and v = n - k + 4 + R, rebuilt from p's
// logit and softmax statistics. g_y is split like the weights: head x head, head x remainder and
// remainder x head (three products; two without a gate, where g_y = dout is exact).
template <Mode M, int KT, typename T, bool CL>
__global__ void __launch_bounds__(kWarps * 32, 1) window_v3(const Params<T> p) {
  static_assert(M != Mode::kGradWeights, "the weight gradients stay on v2's kernel");
  static_assert(KT >= 1 && KT <= kMaxK && KT % 2 == 1, "the tensor-core kernels cover odd K <= 9");
  constexpr bool kDx = M == Mode::kGradInput;
  constexpr int NT = kWarps * 32, KK = KT * KT, R = KT / 2, ROWS = kWarps + KT - 1;
  constexpr int kHalo = ROWS * kCH * kPitch;  // elements of one 16-bit halo tile
  unsigned char* smem = dynamic_smem<unsigned char>();
  float* probs = reinterpret_cast<float*>(smem);  // forward: [KK][kTP], until the bands are built
  T* tile = reinterpret_cast<T*>(smem);           // [ROWS][kCH][kPitch]: x, or g_y's head
  T* tile_lo = tile + kHalo;                      // dx: g_y's remainder
  float* stage = reinterpret_cast<float*>(smem + sizeof(T) * kHalo * (kDx ? 2 : 1));  // [kCH][kTP]

  const auto [tile_id, g, b] = block_place(p);
  const int i0 = (tile_id / p.tiles_w) * kWarps, j0 = (tile_id % p.tiles_w) * kTW;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tig = lane % 4;

  const Dense4<CL> xi{p.C, p.H, p.W};
  const Dense4<CL> ki{static_cast<int64_t>(p.G) * KK, p.H, p.W};
  const int64_t kc0 = static_cast<int64_t>(g) * KK;
  const int64_t sbase = (b * p.G + g) * static_cast<int64_t>(p.H) * p.W;

  // 1. Forward: the softmax of every pixel of the tile (zero outside the image).
  if constexpr (!kDx) {
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
  }

  // 2. The bands of this warp's two n-tiles, as B fragments: this thread holds pixel n = gid of
  // the n-tile and halo columns k = 2*tig + {0, 1} (half 0) and 2*tig + 8 + {0, 1} (half 1).
  uint32_t band_hi[2][KT][2], band_lo[2][KT][2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int u = 0; u < KT; ++u)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        T hi[2], lo[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = 2 * tig + 8 * half + e;
          float w = 0.f;
          if constexpr (kDx) {
            const int v = gid - k + 4 + R;                      // tap column
            const int pi = i0 + warp - u + R, pj = j0 - 4 + 8 * nt + k;  // the output pixel p
            if (v >= 0 && v < KT && pi >= 0 && pi < p.H && pj >= 0 && pj < p.W) {
              const float2 st = p.stats[sbase + static_cast<int64_t>(pi) * p.W + pj];
              w = __expf(static_cast<float>(p.weights[ki(b, kc0 + u * KT + v, pi, pj)]) - st.x) * st.y;
            }
          } else {
            const int v = k - gid + R - 4;
            if (v >= 0 && v < KT) w = probs[(u * KT + v) * kTP + warp * kTW + nt * 8 + gid];
          }
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
    fill_halo<kDx, ROWS, CL, NT>(tile, tile_lo, p.src, kDx ? p.gate : nullptr, xi, b, c0, cn, i0 - R, j0, tid);
    if (!kDx && gated)
      v2::fill<v2::Fill::kSigmoid, kCH, CL, NT>(stage, kTP, kWarps, kTW, kTW, p.gate, v2::no_gate<T>,
                                                xi, b, c0, cn, plain_axis(p.H, KT), i0,
                                                plain_axis(p.W, KT), j0, tid);
    __syncthreads();
    float acc[2][4] = {};
#pragma unroll
    for (int u = 0; u < KT; ++u) {
      const int trow = kDx ? warp + 2 * R - u : warp + u;  // image row i0 - R + trow
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int at = (trow * kCH + gid) * kPitch + kCol0 + nt * 8 + 2 * tig;  // channel gid, k = 2*tig
        const T* lo_ch = tile + at;
        const T* hi_ch = lo_ch + 8 * kPitch;  // channel gid + 8
        const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(lo_ch), *reinterpret_cast<const uint32_t*>(hi_ch),
                               *reinterpret_cast<const uint32_t*>(lo_ch + 8),
                               *reinterpret_cast<const uint32_t*>(hi_ch + 8)};
        mma_16816<T>(acc[nt], a, band_hi[nt][u]);
        mma_16816<T>(acc[nt], a, band_lo[nt][u]);
        if (kDx && gated) {  // g_y's remainder times the weights' head
          const T* lo_ch2 = tile_lo + at;
          const T* hi_ch2 = lo_ch2 + 8 * kPitch;
          const uint32_t a2[4] = {
              *reinterpret_cast<const uint32_t*>(lo_ch2), *reinterpret_cast<const uint32_t*>(hi_ch2),
              *reinterpret_cast<const uint32_t*>(lo_ch2 + 8), *reinterpret_cast<const uint32_t*>(hi_ch2 + 8)};
          mma_16816<T>(acc[nt], a2, band_hi[nt][u]);
        }
      }
    }
    // D fragments: acc[nt][e] is channel gid (+8 for e >= 2), pixel nt*8 + 2*tig + (e & 1).
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = gid + (e >= 2 ? 8 : 0), col = nt * 8 + 2 * tig + (e & 1);
        const int i = i0 + warp, j = j0 + col;
        float r = acc[nt][e];
        if (!(fabsf(r) < INFINITY) && c < cn && i < p.H && j < p.W)
          r = exact_result<M, KT>(p, xi, ki, b, c0 + c, kc0, sbase, i, j);
        float* slot = stage + c * kTP + warp * kTW + col;
        *slot = !kDx && gated ? r * *slot : r;
      }
    __syncthreads();
    v2::store_tile<kWarps, kTW, CL, NT>(p.out, stage, kCH, xi, b, c0, cn, plain_axis(p.H, KT), i0,
                                        plain_axis(p.W, KT), j0, tid);
  }
}

template <Mode M, int KT, typename T, bool CL>
void launch_tc(Params<T> p, cudaStream_t stream) {
  const int64_t blocks = set_tiles(p, kWarps, kTW);
  launch_kernel(window_v3<M, KT, T, CL>, blocks, kWarps * 32, smem_bytes<M, T>(KT), stream, p, KT);
}

// Whether the tensor-core kernels run: 16-bit inputs, odd K <= 9, a GPU of compute capability 8.0
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
  if constexpr (M != Mode::kGradWeights && !std::is_same_v<T, float>) {
    if (use_tensor_cores(p)) {
      switch (p.K) {
        case 1: return launch_tc<M, 1, T, CL>(p, stream);
        case 3: return launch_tc<M, 3, T, CL>(p, stream);
        case 5: return launch_tc<M, 5, T, CL>(p, stream);
        case 7: return launch_tc<M, 7, T, CL>(p, stream);
        case 9: return launch_tc<M, 9, T, CL>(p, stream);
        default: break;
      }
    }
  }
  v2::launch_v2<M, T, CL>(p, stream);
}

}  // namespace v3
}  // namespace cuda_impl
}  // namespace sgdc
