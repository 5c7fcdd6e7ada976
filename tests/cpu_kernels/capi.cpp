// A C ABI over csrc/cpu/window_conv_cpu.h, for tests/test_cpu_kernels.py and bench/cpu_kernels.py
// (ctypes, on torch tensors' data pointers) until the extension calls the kernels itself.
//
// Every function takes the sizes, the configuration, a dtype code (DType: 0 float32, 1 float64,
// 2 bfloat16, 3 float16), a layout code (0 NCHW, 1 channels_last), a thread count and an
// instruction-set code (Isa: 0 auto, 1 baseline, 2 AVX2, 3 AVX-512), and returns the instruction
// set that ran, or -1 with the reason in sgdc_cpu_last_error().
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cpu/window_conv_cpu.h"

namespace {

using sgdc::cpu::Parallel;

// A pool of threads - 1 workers and the calling thread; run() splits [0, n) into one contiguous
// range per thread and returns when all are done.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int t = 1; t < threads_; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int threads() const { return threads_; }

  void run(int64_t n, Parallel::Body body, void* ctx) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      n_ = n, body_ = body, ctx_ = ctx, pending_ = threads_ - 1;
      ++generation_;
    }
    wake_.notify_all();
    part(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  void part(int t) {
    const int64_t b = n_ * t / threads_, e = n_ * (t + 1) / threads_;
    if (b < e) body_(b, e, ctx_);
  }
  void work(int t) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
      }
      part(t);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --pending_;
      }
      done_.notify_one();
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  int pending_ = 0;
  int64_t n_ = 0;
  Parallel::Body body_ = nullptr;
  void* ctx_ = nullptr;
};

Pool& pool(int threads) {
  static std::unique_ptr<Pool> p;
  if (!p || p->threads() != threads) {
    p.reset();
    p.reset(new Pool(threads));
  }
  return *p;
}

Parallel parallel(int threads) {
  Parallel par;
  par.threads = threads < 1 ? 1 : threads;
  if (par.threads > 1) {
    par.self = &pool(par.threads);
    par.run = [](void* self, int64_t n, Parallel::Body body, void* ctx) { static_cast<Pool*>(self)->run(n, body, ctx); };
  }
  return par;
}

std::string last_error;

sgdc::cpu::Shape shape(int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, int64_t K, int64_t d, int clamp,
                       int softmax) {
  sgdc::cpu::Shape s;
  s.B = B, s.C = C, s.H = H, s.W = W, s.G = G, s.K = K, s.d = d, s.clamp = clamp != 0, s.softmax = softmax != 0;
  return s;
}

}  // namespace

extern "C" {

const char* sgdc_cpu_last_error() { return last_error.c_str(); }

int sgdc_cpu_best_isa() { return static_cast<int>(sgdc::cpu::best_isa()); }

int sgdc_cpu_isa_available(int isa) { return sgdc::cpu::isa_available(static_cast<sgdc::cpu::Isa>(isa)) ? 1 : 0; }

int sgdc_cpu_forward(int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, int64_t K, int64_t d, int clamp,
                     int softmax, int dtype, int layout, int threads, int isa, const void* x, const void* weights,
                     const void* gate, void* out) {
  try {
    return static_cast<int>(sgdc::cpu::forward(shape(B, C, H, W, G, K, d, clamp, softmax),
                                               static_cast<sgdc::cpu::DType>(dtype),
                                               static_cast<sgdc::cpu::Layout>(layout), x, weights, gate, out,
                                               parallel(threads), static_cast<sgdc::cpu::Isa>(isa)));
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

int sgdc_cpu_backward(int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, int64_t K, int64_t d, int clamp,
                      int softmax, int dtype, int layout, int threads, int isa, const void* grad_out, const void* x,
                      const void* weights, const void* gate, void* dx, void* dweights, void* dgate) {
  try {
    return static_cast<int>(sgdc::cpu::backward(shape(B, C, H, W, G, K, d, clamp, softmax),
                                                static_cast<sgdc::cpu::DType>(dtype),
                                                static_cast<sgdc::cpu::Layout>(layout), grad_out, x, weights, gate,
                                                dx, dweights, dgate, parallel(threads),
                                                static_cast<sgdc::cpu::Isa>(isa)));
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

}  // extern "C"
