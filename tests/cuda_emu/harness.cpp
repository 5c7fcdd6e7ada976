// Runs the window_conv CUDA kernels (csrc/cuda/kernels.cuh, compiled unchanged for the host through
// cuda_emu.h) on the cases that tests/test_cuda_on_cpu.py writes, and writes their results back.
//
//   harness DIR      reads DIR/cases.txt, one case a line:
//                      id dtype(f32|f16|bf16) layout(nchw|nhwc) B C H W G K gate(0|1) variant
//                         [dilation clamp(0|1) softmax(0|1)]   (default 1 0 1: sgdc_conv)
//                    and the inputs DIR/<id>.x, .k, .g (with gate), .dout, raw in memory order;
//                    writes DIR/<id>.out, .dx, .dk, .dg (with gate).
//
// Each case runs forward and backward three times, with the threads of every block in forward,
// reverse and random order; the three results must be bitwise equal, and every element of every
// output (out, dx, dweights, dgate, the softmax statistics) must have been stored exactly once in
// each run. Prints "start <id>" before a case and "ok <id>" or "FAIL <id>: why" after it; a crash
// (out-of-bounds access, divergent barrier) prints "EMULATION FAILURE: ..." and exits with 3.
#include "cuda_emu.h"
// the kernels, compiled as they are:
#include "cuda/kernels.cuh"

#include <fstream>
#include <sstream>

namespace {

using namespace sgdc::cuda_impl;

std::vector<char> read_file(const std::string& path, size_t bytes) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> data(bytes);
  if (!f || !f.read(data.data(), static_cast<std::streamsize>(bytes)))
    throw std::runtime_error("cannot read " + std::to_string(bytes) + " bytes from " + path);
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) throw std::runtime_error("cannot write " + path);
}

template <typename T>
void fill_nan(emu::Buffer<T>& b) {
  for (size_t k = 0; k < b.n; ++k) b.data[k] = static_cast<T>(NAN);
}

// Every element stored exactly once; resets the counts.
template <typename T>
std::string check_stores(emu::Buffer<T>& b, const char* name) {
  for (size_t k = 0; k < b.n; ++k) {
    if (b.counts[k] != 1) {
      std::ostringstream msg;
      msg << name << "[" << k << "] was stored " << static_cast<int>(b.counts[k]) << " times";
      return msg.str();
    }
  }
  std::fill(b.counts.begin(), b.counts.end(), 0);
  return "";
}

struct Case {
  std::string id, dtype, layout;
  Shape s;
  bool gate;
  std::string variant;
};

template <typename T, bool CL>
std::string run_case(const Case& c, const std::string& dir) {
  const Shape& s = c.s;
  const size_t nx = static_cast<size_t>(s.B) * s.C * s.H * s.W;
  const size_t nk = static_cast<size_t>(s.B) * s.G * s.K * s.K * s.H * s.W;
  const std::string base = dir + "/" + c.id;
  emu::Buffer<T> x("x", nx, false), k("weights", nk, false), dout("grad_out", nx, false);
  std::unique_ptr<emu::Buffer<T>> g;
  std::memcpy(x.data, read_file(base + ".x", nx * sizeof(T)).data(), nx * sizeof(T));
  std::memcpy(k.data, read_file(base + ".k", nk * sizeof(T)).data(), nk * sizeof(T));
  std::memcpy(dout.data, read_file(base + ".dout", nx * sizeof(T)).data(), nx * sizeof(T));
  if (c.gate) {
    g = std::make_unique<emu::Buffer<T>>("gate", nx, false);
    std::memcpy(g->data, read_file(base + ".g", nx * sizeof(T)).data(), nx * sizeof(T));
  }
  const Variant variant = parse_variant(c.variant);
  const emu::Order orders[] = {emu::Order::kForward, emu::Order::kReverse, emu::Order::kRandom};
  const char* order_names[] = {"forward", "reverse", "random"};
  std::vector<std::vector<T>> first;
  for (int o = 0; o < 3; ++o) {
    emu::order() = orders[o];
    emu::Buffer<T> out("out", nx, true), dx("dx", nx, true), dk("dweights", nk, true);
    std::unique_ptr<emu::Buffer<T>> dg;
    if (c.gate) dg = std::make_unique<emu::Buffer<T>>("dgate", nx, true);
    const size_t nstats = backward_workspace_bytes(s) / sizeof(float2);
    emu::Buffer<float2> stats("stats", nstats, true);
    fill_nan(out);
    fill_nan(dx);
    fill_nan(dk);
    if (dg) fill_nan(*dg);
    for (size_t q = 0; q < nstats; ++q) stats.data[q] = make_float2(NAN, NAN);
    const T* gp = c.gate ? g->data : nullptr;
    run_forward<T, CL>(variant, s, x.data, k.data, gp, out.data, nullptr);
    run_backward<T, CL>(variant, s, dout.data, x.data, k.data, gp, dx.data, dk.data,
                        dg ? dg->data : nullptr, stats.data, nullptr);
    std::string err = check_stores(out, "out");
    if (err.empty()) err = check_stores(dx, "dx");
    if (err.empty()) err = check_stores(dk, "dweights");
    if (err.empty() && dg) err = check_stores(*dg, "dgate");
    if (err.empty()) err = check_stores(stats, "stats");
    if (!err.empty()) return err + " (" + order_names[o] + " thread order)";
    std::vector<std::vector<T>> results = {{out.data, out.data + nx}, {dx.data, dx.data + nx},
                                           {dk.data, dk.data + nk}};
    if (dg) results.push_back({dg->data, dg->data + nx});
    if (o == 0) {
      first = results;
    } else {
      const char* names[] = {"out", "dx", "dweights", "dgate"};
      for (size_t r = 0; r < results.size(); ++r)
        if (std::memcmp(results[r].data(), first[r].data(), results[r].size() * sizeof(T)) != 0)
          return std::string(names[r]) + " differs bitwise between the forward and " + order_names[o] +
                 " thread orders";
    }
  }
  write_file(base + ".out", first[0].data(), nx * sizeof(T));
  write_file(base + ".dx", first[1].data(), nx * sizeof(T));
  write_file(base + ".dk", first[2].data(), nk * sizeof(T));
  if (c.gate) write_file(base + ".dg", first[3].data(), nx * sizeof(T));
  return "";
}

template <typename T>
std::string run_layout(const Case& c, const std::string& dir) {
  return c.layout == "nhwc" ? run_case<T, true>(c, dir) : run_case<T, false>(c, dir);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  std::ifstream cases(dir + "/cases.txt");
  if (!cases) {
    std::fprintf(stderr, "cannot read %s/cases.txt\n", dir.c_str());
    return 2;
  }
  std::string line;
  int failed = 0;
  while (std::getline(cases, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    Case c;
    int gate = 0, clamp = 0, softmax = 1;
    in >> c.id >> c.dtype >> c.layout >> c.s.B >> c.s.C >> c.s.H >> c.s.W >> c.s.G >> c.s.K >> gate >> c.variant;
    if (!(in >> c.s.d >> clamp >> softmax)) c.s.d = 1, clamp = 0, softmax = 1;
    c.gate = gate != 0;
    c.s.clamp = clamp != 0;
    c.s.softmax = softmax != 0;
    std::printf("start %s\n", c.id.c_str());
    std::fflush(stdout);
    std::string err;
    try {
      if (c.dtype == "f32")
        err = run_layout<float>(c, dir);
      else if (c.dtype == "f16")
        err = run_layout<c10::Half>(c, dir);
      else if (c.dtype == "bf16")
        err = run_layout<c10::BFloat16>(c, dir);
      else
        err = "unknown dtype " + c.dtype;
    } catch (const std::exception& e) {
      err = std::string("exception: ") + e.what();
    }
    if (err.empty()) {
      std::printf("ok %s\n", c.id.c_str());
    } else {
      // first line of the message only (c10::Error appends a C++ backtrace)
      std::printf("FAIL %s: %s\n", c.id.c_str(), err.substr(0, err.find('\n')).c_str());
      ++failed;
    }
    std::fflush(stdout);
  }
  return failed ? 1 : 0;
}
