// gpu_bench: standalone timings of the GPU-tier kernels and of their peers (naive offload, all-GPU
// attention), 8B shape (32 q / 8 kv heads, head_dim 128, bf16). Not part of the kvrt CLI.
//
// Every figure is device time between CUDA events. "step p50/p99" records an event pair around
// one layer-step and synchronises each time (launch latency included, as a decoder that waits
// would see it); "pipelined" is the mean over a back-to-back run of the same steps between one
// event pair (the CPU runs ahead, as in a decoder that enqueues all layers). Inputs rotate over
// enough copies (layers) that the working set exceeds the 50 MB L2, so no figure is an L2 figure.
//
// Usage: gpu_bench [--iters N] [--quick]   (--quick: smaller naive-offload sizes, for a smoke run)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "kvrt_common/dtype.h"
#include "kvrt_gpu/kernels.h"

namespace {

using kvrt::DType;
namespace g = kvrt::gpu;

#define SK(expr)                                                                     \
  do {                                                                               \
    auto s_ = (expr);                                                                \
    if (!s_.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

constexpr int kQHeads = 32, kKvHeads = 8, kD = 128, kSinks = 4;
constexpr std::size_t kTokBytes = std::size_t{kKvHeads} * kD * 2;  // one token, K or V, bf16

int g_iters = 200;
cudaStream_t g_stream;

struct Stats {
  double p50 = 0, p99 = 0, pipelined = 0;  // microseconds
};

// fn(i) enqueues step i on g_stream.
Stats Time(const std::function<void(int)>& fn, int iters = -1, int warmup = 10,
           bool pipelined = true) {
  if (iters < 0) iters = g_iters;
  cudaEvent_t a, b;
  KVRT_BENCH_CUDA(cudaEventCreate(&a));
  KVRT_BENCH_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) fn(i);
  KVRT_BENCH_CUDA(cudaStreamSynchronize(g_stream));
  std::vector<double> t(iters);
  for (int i = 0; i < iters; ++i) {
    KVRT_BENCH_CUDA(cudaEventRecord(a, g_stream));
    fn(i);
    KVRT_BENCH_CUDA(cudaEventRecord(b, g_stream));
    KVRT_BENCH_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    KVRT_BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
    t[i] = ms * 1e3;
  }
  std::sort(t.begin(), t.end());
  Stats s;
  s.p50 = t[iters / 2];
  s.p99 = t[std::min(iters - 1, static_cast<int>(std::ceil(iters * 0.99)) - 1)];
  if (!pipelined) {
    s.pipelined = NAN;
    KVRT_BENCH_CUDA(cudaEventDestroy(a));
    KVRT_BENCH_CUDA(cudaEventDestroy(b));
    return s;
  }
  KVRT_BENCH_CUDA(cudaEventRecord(a, g_stream));
  for (int i = 0; i < iters; ++i) fn(i);
  KVRT_BENCH_CUDA(cudaEventRecord(b, g_stream));
  KVRT_BENCH_CUDA(cudaEventSynchronize(b));
  float ms = 0;
  KVRT_BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
  s.pipelined = ms * 1e3 / iters;
  KVRT_BENCH_CUDA(cudaEventDestroy(a));
  KVRT_BENCH_CUDA(cudaEventDestroy(b));
  return s;
}

void Row(const std::string& name, const std::string& cfg, const Stats& s, double bytes,
         const std::string& note = "") {
  const double gbs = bytes > 0 ? bytes / (s.p50 * 1e-6) / 1e9 : 0;
  const double gbs_pipe = bytes > 0 ? bytes / (s.pipelined * 1e-6) / 1e9 : 0;
  std::printf("| %-22s | %-30s | %10.1f | %10.1f | %10.1f | %8.0f | %8.0f | %s\n", name.c_str(),
              cfg.c_str(), s.p50, s.p99, s.pipelined, gbs, gbs_pipe, note.c_str());
  std::fflush(stdout);
}

void Header(const char* title) {
  std::printf("\n### %s\n", title);
  std::printf("| %-22s | %-30s | %10s | %10s | %10s | %8s | %8s | %s\n", "what", "config", "p50 us",
              "p99 us", "pipe us", "GB/s p50", "GB/s pipe", "note");
}

void FillRandomBf16(void* dev, std::size_t elems, uint32_t seed) {
  // Random bf16 values (never zeros: zeros hide indexing errors and can run faster), from one
  // pool of 4M normal draws, at an offset that depends on the seed.
  static std::vector<uint16_t> pool = [] {
    std::vector<uint16_t> h(std::size_t{1} << 22);
    std::mt19937 rng(12345);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& x : h) x = kvrt::F32ToBf16(nd(rng));
    return h;
  }();
  const std::size_t start = (seed * 7919u) % (pool.size() / 2);
  const std::size_t chunk = pool.size() - start;
  for (std::size_t off = 0; off < elems; off += chunk) {
    const std::size_t n = std::min(chunk, elems - off);
    KVRT_BENCH_CUDA(cudaMemcpy(static_cast<uint16_t*>(dev) + off, pool.data() + start, n * 2,
                               cudaMemcpyHostToDevice));
  }
}

template <class T>
T* DevArray(const std::vector<T>& v) {
  T* p = nullptr;
  KVRT_BENCH_CUDA(cudaMalloc(&p, v.size() * sizeof(T)));
  KVRT_BENCH_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

// One layer's tier for `batch` sequences: device buffers + device pointer arrays.
struct Layer {
  g::TierBatch tb;
  std::vector<void*> owned;
};

Layer MakeLayer(int batch, int n_sink, int window, int n_window, uint32_t seed) {
  Layer l;
  std::vector<const void*> sk, sv, wk, wv;
  void* sinks = nullptr;
  void* win = nullptr;
  const std::size_t sink_bytes = std::size_t(batch) * std::max(n_sink, 1) * kTokBytes * 2;
  const std::size_t win_bytes = std::size_t(batch) * window * kTokBytes * 2;
  KVRT_BENCH_CUDA(cudaMalloc(&sinks, sink_bytes));
  KVRT_BENCH_CUDA(cudaMalloc(&win, win_bytes));
  FillRandomBf16(sinks, sink_bytes / 2, seed);
  FillRandomBf16(win, win_bytes / 2, seed + 1);
  for (int b = 0; b < batch; ++b) {
    auto* s0 = static_cast<char*>(sinks) + std::size_t(b) * std::max(n_sink, 1) * kTokBytes * 2;
    sk.push_back(s0);
    sv.push_back(s0 + std::max(n_sink, 1) * kTokBytes);
    auto* w0 = static_cast<char*>(win) + std::size_t(b) * window * kTokBytes * 2;
    wk.push_back(w0);
    wv.push_back(w0 + window * kTokBytes);
  }
  l.owned = {sinks, win};
  auto* a = DevArray(sk);
  auto* b2 = DevArray(sv);
  auto* c = DevArray(wk);
  auto* d = DevArray(wv);
  auto* ns = DevArray(std::vector<int32_t>(batch, n_sink));
  auto* nw = DevArray(std::vector<int32_t>(batch, n_window));
  l.owned.insert(l.owned.end(), {(void*)a, (void*)b2, (void*)c, (void*)d, (void*)ns, (void*)nw});
  l.tb.sink_k = a;
  l.tb.sink_v = b2;
  l.tb.window_k = c;
  l.tb.window_v = d;
  l.tb.n_sink = ns;
  l.tb.n_window = nw;
  l.tb.batch = batch;
  l.tb.max_tokens = n_sink + n_window;
  l.tb.kv_heads = kKvHeads;
  l.tb.head_dim = kD;
  l.tb.dtype = DType::kBF16;
  return l;
}

void FreeLayer(Layer& l) {
  for (void* p : l.owned) KVRT_BENCH_CUDA(cudaFree(p));
  l.owned.clear();
}

struct Outputs {
  void* q = nullptr;
  float* o = nullptr;
  float* lse = nullptr;
  float* ws = nullptr;
  explicit Outputs(int rows, std::size_t ws_floats) {
    KVRT_BENCH_CUDA(cudaMalloc(&q, std::size_t(rows) * kD * 2));
    FillRandomBf16(q, std::size_t(rows) * kD, 99);
    KVRT_BENCH_CUDA(cudaMalloc(&o, std::size_t(rows) * kD * 4));
    KVRT_BENCH_CUDA(cudaMalloc(&lse, std::size_t(rows) * 4));
    KVRT_BENCH_CUDA(cudaMalloc(&ws, std::max<std::size_t>(ws_floats, 1) * 4));
  }
  ~Outputs() {
    cudaFree(q);
    cudaFree(o);
    cudaFree(lse);
    cudaFree(ws);
  }
};

void BenchTier() {
  Header("tier attention (sinks 4 + window), one layer-step, bf16, 32q/8kv, d=128");
  for (int window : {2048, 512}) {
    for (int batch : {1, 16}) {
      for (int split : {0, -1}) {  // -1: one split (no split-K), for comparison
        if (split == -1 && batch != 1) continue;
        const double bytes = double(batch) * (kSinks + window) * kTokBytes * 2;
        const int layers = std::max(2, static_cast<int>(std::ceil(256e6 / bytes)));
        std::vector<Layer> ls;
        for (int i = 0; i < layers; ++i)
          ls.push_back(MakeLayer(batch, kSinks, window, window, i * 7));
        g::AttnParams p;
        p.q_heads = kQHeads;
        p.q_is_f32 = false;
        p.split_tokens = split == -1 ? 1 << 30 : 0;
        const std::size_t wsf = g::TierAttentionWorkspaceFloats(ls[0].tb, p);
        Outputs out(batch * kQHeads, wsf);
        auto s = Time([&](int i) {
          SK(g::TierAttention(ls[i % layers].tb, out.q, p, out.o, out.lse, out.ws, g_stream));
        });
        char cfg[96];
        std::snprintf(cfg, sizeof cfg, "W=%d B=%d %s", window, batch,
                      split == -1 ? "no split" : "split-K auto");
        char note[96];
        std::snprintf(note, sizeof note, "%.2f MB/step, HBM floor %.1f us @3.0TB/s", bytes / 1e6,
                      bytes / 3.0e12 * 1e6);
        Row("tier_attention", cfg, s, bytes, note);
        for (auto& l : ls) FreeLayer(l);
      }
    }
  }
  const double per_seq = 32.0 * (kSinks + 2048) * kTokBytes * 2;
  std::printf(
      "GPU KV memory per sequence (32 layers, sinks 4 + window 2048, K+V, bf16): %.1f MiB"
      " (window 512: %.1f MiB); independent of context length\n",
      per_seq / (1 << 20), 32.0 * (kSinks + 512) * kTokBytes * 2 / (1 << 20));
}

void BenchMerge() {
  Header("merge of GPU and CPU partial states (out bf16)");
  for (int batch : {1, 16}) {
    const int rows = batch * kQHeads;
    const int copies = 64;
    float *oa, *ob, *la, *lb;
    void* out;
    KVRT_BENCH_CUDA(cudaMalloc(&oa, std::size_t(copies) * rows * kD * 4));
    KVRT_BENCH_CUDA(cudaMalloc(&ob, std::size_t(copies) * rows * kD * 4));
    KVRT_BENCH_CUDA(cudaMalloc(&la, std::size_t(copies) * rows * 4));
    KVRT_BENCH_CUDA(cudaMalloc(&lb, std::size_t(copies) * rows * 4));
    KVRT_BENCH_CUDA(cudaMalloc(&out, std::size_t(rows) * kD * 2));
    KVRT_BENCH_CUDA(cudaMemset(oa, 0x3c, std::size_t(copies) * rows * kD * 4));
    KVRT_BENCH_CUDA(cudaMemset(ob, 0x3d, std::size_t(copies) * rows * kD * 4));
    KVRT_BENCH_CUDA(cudaMemset(la, 0x3f, std::size_t(copies) * rows * 4));
    KVRT_BENCH_CUDA(cudaMemset(lb, 0x3e, std::size_t(copies) * rows * 4));
    auto s = Time([&](int i) {
      const std::size_t c = i % copies;
      SK(g::MergeStates(oa + c * rows * kD, la + c * rows, ob + c * rows * kD, lb + c * rows, rows,
                        kD, out, DType::kBF16, nullptr, g_stream));
    });
    Row("merge_states", "B=" + std::to_string(batch) + " rows=" + std::to_string(rows), s,
        double(rows) * kD * (4 + 4 + 2));
    KVRT_BENCH_CUDA(cudaFree(oa));
    KVRT_BENCH_CUDA(cudaFree(ob));
    KVRT_BENCH_CUDA(cudaFree(la));
    KVRT_BENCH_CUDA(cudaFree(lb));
    KVRT_BENCH_CUDA(cudaFree(out));
  }
}

void BenchGatherAndFetch() {
  Header("fetch mode: gather-attend over 2000 CPU-selected tokens per q head (bf16, d=128)");
  const int per_head = 2000, rows_q = kQHeads;
  const std::size_t n_rows = std::size_t(rows_q) * per_head;
  const int copies = 8;  // 8 x 32 MB rotate past L2
  std::vector<void*> kb(copies), vb(copies);
  for (int c = 0; c < copies; ++c) {
    KVRT_BENCH_CUDA(cudaMalloc(&kb[c], n_rows * kD * 2));
    KVRT_BENCH_CUDA(cudaMalloc(&vb[c], n_rows * kD * 2));
    FillRandomBf16(kb[c], n_rows * kD, 500 + c);
    FillRandomBf16(vb[c], n_rows * kD, 600 + c);
  }
  std::vector<int32_t> off(rows_q + 1);
  for (int r = 0; r <= rows_q; ++r) off[r] = r * per_head;
  int32_t* doff = DevArray(off);
  g::GatherBatch gb;
  gb.row_offsets = doff;
  gb.rows_q = rows_q;
  gb.max_rows = per_head;
  gb.head_dim = kD;
  gb.dtype = DType::kBF16;
  Outputs out(rows_q, g::GatherAttendWorkspaceFloats(gb, 0));
  auto s = Time([&](int i) {
    g::GatherBatch x = gb;
    x.k = kb[i % copies];
    x.v = vb[i % copies];
    SK(g::GatherAttend(x, out.q, false, 0.f, 0, out.o, out.lse, out.ws, g_stream));
  });
  Row("gather_attend", "32 q rows x 2000 rows", s, double(n_rows) * kD * 2 * 2,
      "K/V per q head (no dedupe): 32.8 MB");
  // The H2D copy that precedes it: per kv head lists (shared by the 4 q heads of a group) and per
  // q head lists, from pinned memory.
  void* host = nullptr;
  KVRT_BENCH_CUDA(cudaHostAlloc(&host, n_rows * kD * 2 * 2, cudaHostAllocDefault));
  std::memset(host, 0x3c, n_rows * kD * 2 * 2);
  for (std::size_t rows : {std::size_t(kKvHeads) * per_head, n_rows}) {
    const std::size_t bytes = rows * kD * 2 * 2;
    auto h = Time([&](int i) {
      KVRT_BENCH_CUDA(
          cudaMemcpyAsync(kb[i % copies], host, bytes / 2, cudaMemcpyHostToDevice, g_stream));
      KVRT_BENCH_CUDA(cudaMemcpyAsync(vb[i % copies], static_cast<char*>(host) + bytes / 2,
                                      bytes / 2, cudaMemcpyHostToDevice, g_stream));
    });
    Row("fetch_h2d", rows == n_rows ? "2000 tok x 32 q heads" : "2000 tok x 8 kv heads", h, bytes,
        "pinned H2D of K+V");
  }
  KVRT_BENCH_CUDA(cudaFreeHost(host));
  for (int c = 0; c < copies; ++c) {
    KVRT_BENCH_CUDA(cudaFree(kb[c]));
    KVRT_BENCH_CUDA(cudaFree(vb[c]));
  }
  KVRT_BENCH_CUDA(cudaFree(doff));
}

void BenchRing() {
  Header("window ring append of 1 token with eviction staging (W=2048, full)");
  for (int batch : {1, 16}) {
    const int cap = 2048;
    std::vector<void*> rk(batch), rv(batch);
    for (int b = 0; b < batch; ++b) {
      KVRT_BENCH_CUDA(cudaMalloc(&rk[b], cap * kTokBytes));
      KVRT_BENCH_CUDA(cudaMalloc(&rv[b], cap * kTokBytes));
    }
    void** drk = DevArray(rk);
    void** drv = DevArray(rv);
    int64_t* pos = DevArray(std::vector<int64_t>(batch, 5000));
    void *nk, *nv, *ek, *ev;
    for (void** p : {&nk, &nv, &ek, &ev}) KVRT_BENCH_CUDA(cudaMalloc(p, batch * kTokBytes));
    g::RingBatch r{drk, drv, pos, batch, cap, kKvHeads, kD, DType::kBF16};
    auto s = Time([&](int) { SK(g::RingAppend(r, nk, nv, 1, ek, ev, g_stream)); });
    Row("ring_append+evict", "B=" + std::to_string(batch), s, double(batch) * kTokBytes * 6);
    for (int b = 0; b < batch; ++b) {
      KVRT_BENCH_CUDA(cudaFree(rk[b]));
      KVRT_BENCH_CUDA(cudaFree(rv[b]));
    }
    for (void* p : {(void*)drk, (void*)drv, (void*)pos, nk, nv, ek, ev})
      KVRT_BENCH_CUDA(cudaFree(p));
  }
}

void BenchOffloadAndFull(bool quick) {
  Header("peers: naive offload (H2D all cold KV, then attend) and all-GPU attention (split-K)");
  std::vector<long> sizes = {4096, 32768, 131072, 524288, 1048576};
  if (quick) sizes = {4096, 32768, 131072};
  const long max_n = sizes.back();
  const std::size_t max_bytes = std::size_t(max_n) * kTokBytes * 2;
  void* host = nullptr;
  KVRT_BENCH_CUDA(cudaHostAlloc(&host, max_bytes, cudaHostAllocDefault));
  // Touch pinned pages with non-zero bf16 data (pattern; the attention reads the device copy).
  std::memset(host, 0x3c, max_bytes);
  g::AttnParams p;
  p.q_heads = kQHeads;
  p.q_is_f32 = false;
  for (long n : sizes) {
    Layer l = MakeLayer(1, 0, static_cast<int>(n), static_cast<int>(n), 1000 + n);
    Outputs out(kQHeads, g::TierAttentionWorkspaceFloats(l.tb, p));
    const std::size_t bytes = std::size_t(n) * kTokBytes * 2;
    void* dk = static_cast<char*>(l.owned[1]);  // window buffer: [K: n tokens][V: n tokens]
    // All-GPU first, on random data; the naive-offload copies then overwrite the cache.
    auto f =
        Time([&](int) { SK(g::TierAttention(l.tb, out.q, p, out.o, out.lse, out.ws, g_stream)); });
    char note[80];
    std::snprintf(note, sizeof note, "HBM floor %.1f us @3.0TB/s", bytes / 3.0e12 * 1e6);
    Row("all_gpu_attention", std::to_string(n / 1024) + "K tokens, B=1", f, double(bytes), note);
    auto s = Time(
        [&](int) {
          KVRT_BENCH_CUDA(cudaMemcpyAsync(dk, host, bytes, cudaMemcpyHostToDevice, g_stream));
          SK(g::TierAttention(l.tb, out.q, p, out.o, out.lse, out.ws, g_stream));
        },
        g_iters, 2, /*pipelined=*/false);
    Row("naive_offload", std::to_string(n / 1024) + "K tokens, B=1", s, double(bytes),
        "H2D " + std::to_string(bytes >> 20) + " MiB + attention");
    FreeLayer(l);
  }
  KVRT_BENCH_CUDA(cudaFreeHost(host));
  {
    const int n = 131072, batch = 16;
    Layer l = MakeLayer(batch, 0, n, n, 77);
    Outputs out(batch * kQHeads, g::TierAttentionWorkspaceFloats(l.tb, p));
    auto f =
        Time([&](int) { SK(g::TierAttention(l.tb, out.q, p, out.o, out.lse, out.ws, g_stream)); });
    const double bytes = double(batch) * n * kTokBytes * 2;
    char note[80];
    std::snprintf(note, sizeof note, "HBM floor %.1f us @3.0TB/s", bytes / 3.0e12 * 1e6);
    Row("all_gpu_attention", "128K tokens, B=16", f, bytes, note);
    FreeLayer(l);
  }
}

void BenchCopies() {
  Header("copy bandwidth (256 MiB)");
  const std::size_t bytes = std::size_t(256) << 20;
  void *h, *d, *d2;
  KVRT_BENCH_CUDA(cudaHostAlloc(&h, bytes, cudaHostAllocDefault));
  std::memset(h, 1, bytes);
  KVRT_BENCH_CUDA(cudaMalloc(&d, bytes));
  KVRT_BENCH_CUDA(cudaMalloc(&d2, bytes));
  auto s = Time(
      [&](int) { KVRT_BENCH_CUDA(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, g_stream)); },
      30, 3);
  Row("pinned_h2d", "256 MiB", s, double(bytes));
  s = Time(
      [&](int) { KVRT_BENCH_CUDA(cudaMemcpyAsync(h, d, bytes, cudaMemcpyDeviceToHost, g_stream)); },
      30, 3);
  Row("pinned_d2h", "256 MiB", s, double(bytes));
  s = Time(
      [&](int) {
        KVRT_BENCH_CUDA(cudaMemcpyAsync(d2, d, bytes, cudaMemcpyDeviceToDevice, g_stream));
      },
      30, 3);
  Row("d2d (read+write)", "256 MiB", s, 2.0 * bytes);
  KVRT_BENCH_CUDA(cudaFreeHost(h));
  KVRT_BENCH_CUDA(cudaFree(d));
  KVRT_BENCH_CUDA(cudaFree(d2));
}

void BenchTopK() {
  Header("exact top-k for the attention-aware index build (bf16, d=128, k=100)");
  const int nq = 1024, nk = 131072;
  void *q, *k;
  int32_t* ids;
  float* sc;
  KVRT_BENCH_CUDA(cudaMalloc(&q, std::size_t(nq) * kD * 2));
  KVRT_BENCH_CUDA(cudaMalloc(&k, std::size_t(nk) * kD * 2));
  KVRT_BENCH_CUDA(cudaMalloc(&ids, std::size_t(nq) * 100 * 4));
  KVRT_BENCH_CUDA(cudaMalloc(&sc, std::size_t(nq) * 100 * 4));
  FillRandomBf16(q, std::size_t(nq) * kD, 1);
  FillRandomBf16(k, std::size_t(nk) * kD, 2);
  g::TopKProblem pr;
  pr.q = q;
  pr.q_stride = kD;
  pr.q_is_f32 = false;
  pr.k = k;
  pr.k_stride = kD;
  pr.nq = nq;
  pr.nk = nk;
  pr.head_dim = kD;
  pr.dtype = DType::kBF16;
  pr.scale = 1.f / std::sqrt(128.f);
  pr.topk = 100;
  auto s = Time([&](int) { SK(g::ExactTopK(pr, ids, sc, g_stream)); }, 10, 1);
  const double flops = 2.0 * nq * nk * kD;
  char note[80];
  std::snprintf(note, sizeof note, "%.1f TFLOP/s f32 FMA (no tensor cores)",
                flops / (s.p50 * 1e-6) / 1e12);
  Row("exact_topk", "1024 q x 128K keys", s, 0, note);
  for (void* p : {q, k, (void*)ids, (void*)sc}) KVRT_BENCH_CUDA(cudaFree(p));
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--iters") && i + 1 < argc)
      g_iters = std::max(10, std::atoi(argv[++i]));
    if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  if (!g::DeviceAvailable()) {
    std::fprintf(stderr, "gpu_bench: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  KVRT_BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB, %.1f GiB; iters %d\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20,
              prop.totalGlobalMem / double(1 << 30), g_iters);
  KVRT_BENCH_CUDA(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  BenchTier();
  BenchMerge();
  BenchRing();
  BenchGatherAndFetch();
  BenchCopies();
  BenchOffloadAndFull(quick);
  BenchTopK();
  KVRT_BENCH_CUDA(cudaStreamDestroy(g_stream));
  return 0;
}
