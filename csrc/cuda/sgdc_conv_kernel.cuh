// Fused CUDA kernels of sgdc_conv (SPEC section 1), shared by the forward and backward operators.
//
// One templated kernel, `window_kernel`, does all three passes. A block owns a TH x TW pixel tile
// of one (batch, head); each thread owns one pixel and keeps that pixel's K*K tap weights in
// registers (shared memory for the generic-K fallback). The head's channels are streamed through
// a shared-memory tile with a (K-1) halo, kChunk channels at a time, and every weight is reused
// across all the head's channels. Passes:
//
//   kForward      out[c,p]  = sigmoid(gate[c,p]) * sum_t P[t,p] * x[c, p+off_t]
//   kGradWeights  dP[t,p]   = sum_c g_y[c,p] * x[c, p+off_t]  (g_y = dout * sigmoid(gate)),
//                 dkernel   = P * (dP - sum_t P dP),  dgate = dout * y * s * (1-s),
//                 and the softmax statistics (max, 1/sum) of every pixel for the next pass
//   kGradInput    dx[c,q]   = sum_t P[t, q-off_t] * g_y[c, q-off_t]: the forward window with the
//                 taps flipped, run over g_y, with weights rebuilt from the logits and statistics
//
// Everything is a gather: no atomics, so the backward is deterministic. Offsets are 64-bit.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>
#include <optional>

namespace sgdc {
namespace cuda_impl {

enum class Mode { kForward, kGradWeights, kGradInput };

constexpr int kChunk = 8;  // channels per shared-memory tile

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
  const T* src;       // kForward, kGradWeights: x;  kGradInput: grad_out
  const T* logits;    // kernel
  const T* gate;      // nullptr without gate
  const T* grad_out;  // kGradWeights
  T* out;             // kForward: out;  kGradInput: dx;  kGradWeights: dgate (nullptr without gate)
  T* dkernel;         // kGradWeights
  float2* stats;      // (max, 1/sum) per (b, g, i, j): written by kGradWeights, read by kGradInput
  int64_t B, C;
  int H, W, G, K, Cg;
  int tiles_w, tiles;  // tiles along W, tiles per (b, g)
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

template <Mode M, int KT, int TH, int TW, typename T, bool CL>
__global__ void __launch_bounds__(TH * TW) window_kernel(const Params<T> p) {
  constexpr int NT = TH * TW;
  const int K = KT > 0 ? KT : p.K;
  const int KK = K * K, r = K / 2;
  const int PW = TW + K - 1, NP = (TH + K - 1) * PW;
  extern __shared__ float smem[];
  float* tile = smem;                  // [kChunk][NP]
  float* taps = smem + kChunk * NP;    // generic K only: [KK][NT] for P, then [KK][NT] for dP

  const int64_t blk = blockIdx.x;
  const int tile_id = static_cast<int>(blk % p.tiles);
  const int64_t bg = blk / p.tiles;
  const int g = static_cast<int>(bg % p.G);
  const int64_t b = bg / p.G;
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
  float mx = 0.f, inv = 0.f;

  if (active) {
    if (M == Mode::kGradInput) {
      // Flipped tap tf = KK-1-t reads the tile like the forward does; its weight is the
      // softmax of tap t at the pixel q - off_t whose window covers q.
#pragma unroll
      for (int tf = 0; tf < KK; ++tf) {
        const int t = KK - 1 - tf, u = t / K, v = t % K;
        const int ii = i - u + r, jj = j - v + r;
        float w = 0.f;
        if (ii >= 0 && ii < p.H && jj >= 0 && jj < p.W) {
          const float2 st = p.stats[sbase + static_cast<int64_t>(ii) * p.W + jj];
          w = __expf(static_cast<float>(p.logits[ki(b, kc0 + t, ii, jj)]) - st.x) * st.y;
        }
        P[tf] = w;
      }
    } else {
      mx = -INFINITY;
#pragma unroll
      for (int t = 0; t < KK; ++t) {
        const float l = static_cast<float>(p.logits[ki(b, kc0 + t, i, j)]);
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
      inv = 1.f / sum;
#pragma unroll
      for (int t = 0; t < KK; ++t) {
        P[t] *= inv;  // kGradInput rebuilds exactly this value from (mx, inv)
        if (M == Mode::kGradWeights) dP[t] = 0.f;
      }
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
      p.dkernel[ki(b, kc0 + t, i, j)] = static_cast<T>(P[t] * (dP[t] - pdp));
    p.stats[sbase + static_cast<int64_t>(i) * p.W + j] = make_float2(mx, inv);
  }
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <Mode M, int KT, int TH, int TW, typename T, bool CL>
void launch_tiles(Params<T> p) {
  p.tiles_w = ceil_div(p.W, TW);
  const int64_t tiles = static_cast<int64_t>(ceil_div(p.H, TH)) * p.tiles_w;
  const int64_t blocks = p.B * p.G * tiles;
  TORCH_CHECK(tiles <= INT_MAX && blocks <= INT_MAX,
              "sgdc::cuda: the input is too large for one launch (", blocks, " blocks)");
  p.tiles = static_cast<int>(tiles);
  const int K = p.K;
  const size_t NP = static_cast<size_t>(TH + K - 1) * (TW + K - 1);
  const size_t ntaps = KT > 0 ? 0 : (M == Mode::kGradWeights ? 2 : 1) * static_cast<size_t>(K) * K;
  const size_t smem = sizeof(float) * (kChunk * NP + ntaps * TH * TW);
  auto kernel = window_kernel<M, KT, TH, TW, T, CL>;
  if (smem > 48 * 1024) {
    int device = 0, optin_int = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin_int, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const size_t optin = static_cast<size_t>(optin_int);
    TORCH_CHECK(smem <= optin, "sgdc::cuda: kernel_size=", K, " needs ", smem,
                " bytes of shared memory per block, more than this GPU allows (", optin,
                "); use a smaller kernel_size or backend='torch'");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), TH * TW, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Compile-time K for the common sizes (weights in registers), a generic kernel for the rest.
template <Mode M, typename T, bool CL>
void launch(const Params<T>& p) {
  switch (p.K) {
    case 3: return launch_tiles<M, 3, 8, 32, T, CL>(p);
    case 5: return launch_tiles<M, 5, 8, 32, T, CL>(p);
    case 7: return launch_tiles<M, 7, 8, 32, T, CL>(p);
    default: return launch_tiles<M, 0, 4, 16, T, CL>(p);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// Calls fn(T{}, std::bool_constant<CL>{}) with T the scalar type (float, c10::Half, c10::BFloat16).
template <typename Fn>
void dispatch(at::ScalarType dtype, bool channels_last, Fn&& fn) {
  auto with_layout = [&](auto tag) {
    if (channels_last)
      fn(tag, std::true_type{});
    else
      fn(tag, std::false_type{});
  };
  switch (dtype) {
    case at::kFloat: return with_layout(float{});
    case at::kHalf: return with_layout(c10::Half{});
    case at::kBFloat16: return with_layout(c10::BFloat16{});
    default: TORCH_CHECK(false, "sgdc::cuda: unsupported dtype ", dtype);
  }
}

inline void check_operand(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& x, at::MemoryFormat fmt) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(fmt), op, ": ", name, " must be dense in x's memory format (",
              fmt, "); call sgdc_kernels.sgdc_conv, which arranges this");
}

// Validates the operands of the operators and returns whether they are channels_last.
inline bool check_inputs(const char* op, const at::Tensor& x, const at::Tensor& kernel,
                         const std::optional<at::Tensor>& gate, int64_t K, int64_t G) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (B, C, H, W) tensor, got ", x.dim(), "-D");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(K >= 1 && K % 2 == 1, op, ": kernel_size must be a positive odd int, got ", K);
  TORCH_CHECK(G >= 1, op, ": num_heads must be positive, got ", G);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C % G == 0 && C >= G, op, ": x's channel count ", C,
              " must be a positive multiple of num_heads=", G);
  TORCH_CHECK(H < INT_MAX && W < INT_MAX, op, ": H and W must be below 2^31");
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.is_contiguous(fmt), op,
              ": x must be contiguous or channels_last; call sgdc_kernels.sgdc_conv, which arranges this");
  check_operand(op, "kernel", kernel, x, fmt);
  TORCH_CHECK(kernel.sizes() == at::IntArrayRef({B, G * K * K, H, W}), op,
              ": kernel must have shape (B, num_heads*kernel_size^2, H, W) = (", B, ", ", G * K * K,
              ", ", H, ", ", W, "), got ", kernel.sizes());
  if (gate.has_value()) {
    check_operand(op, "gate", *gate, x, fmt);
    TORCH_CHECK(gate->sizes() == x.sizes(), op, ": gate must have x's shape ", x.sizes(), ", got ",
                gate->sizes());
  }
  return cl;
}

template <typename T>
Params<T> make_params(const at::Tensor& x, int64_t K, int64_t G) {
  Params<T> p{};
  p.B = x.size(0);
  p.C = x.size(1);
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.G = static_cast<int>(G);
  p.K = static_cast<int>(K);
  p.Cg = static_cast<int>(p.C / G);
  return p;
}

}  // namespace cuda_impl
}  // namespace sgdc
