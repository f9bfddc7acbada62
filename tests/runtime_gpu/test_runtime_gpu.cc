// The GPU backend (use_gpu = 1) against the host backend on the same random tokens: both store
// the same cold rows, search them with the same CPU code, so retrieved sets are identical and
// outputs differ by rounding only (GPU tier attention and merge in f32 on the device).
// GpuBackend.* skip without a CUDA device; KVRT_GPU_TEST_SMALL=1 shrinks them (sanitizers).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kvrt_common/dtype.h"
#include "kvrt_gpu/kernel_types.h"
#include "kvrt_runtime/runtime.h"
#include "kvrt_transfer/cuda_rt.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvrt::runtime {
namespace {

// |gpu - host| per output element: both accumulate in f32; the GPU tier sums in another order.
constexpr double kOutAbsTol = 2e-4;
constexpr double kOutRelTol = 1e-3;

bool Small() { return std::getenv("KVRT_GPU_TEST_SMALL") != nullptr; }

struct Case {
  cpu_index::IndexKind kind;
  bool device;
  DType dtype;
  std::string name;
  int cold_attention = 0;  // kvrt_cold_attention: 0 CPU, 1 fetch, 2 auto
  int head_dim = 64;       // 80, 96: padded on the GPU backend (runtime/src/head_pad.h)
};

RuntimeConfig MakeConfig(const Case& c, int use_gpu) {
  RuntimeConfig cfg;
  cfg.num_layers = 2;
  cfg.num_q_heads = 8;
  cfg.num_kv_heads = 2;
  cfg.head_dim = c.head_dim;
  cfg.dtype = c.dtype;
  cfg.sink_tokens = 4;
  cfg.window_tokens = 64;
  cfg.top_k = 16;
  cfg.index_kind = c.kind;
  cfg.worker_threads = 4;
  cfg.record_attended = true;
  cfg.use_gpu = use_gpu;
  cfg.cold_attention = c.cold_attention;
  return cfg;
}

// The cluster kind on both backends with the same clusters (the CPU build), for comparisons of the
// GPU's selection paths with the host backend's.
RuntimeConfig ClusterCompareConfig(const Case& c, int use_gpu, float hot, bool direct, bool group,
                                   int keys = 16) {
  RuntimeConfig cfg = MakeConfig(c, use_gpu);
  cfg.index.cluster.cluster_size = keys;
  cfg.record_attended = false;
  cfg.index.cluster.segment_tokens = 256;
  cfg.index.cluster.min_budget_tokens = 32;
  cfg.index.cluster.gpu_build = false;  // the same clusters on both backends
  cfg.hot_cache_fraction = hot;
  cfg.direct_step = direct;
  cfg.index.cluster.group_select = group;
  return cfg;
}

// Whether decode appends write their evicted rows into the host store in place (the default
// since 0.3.36, as the library's; KVRT_IN_PLACE_EVICT=0 keeps them in pinned blocks, and the tests
// run either way).
bool InPlaceEvictOn() {
  const char* env = std::getenv("KVRT_IN_PLACE_EVICT");
  return env == nullptr || std::atoi(env) != 0;
}

// Relative L2 error of q head h's output row (d values) against want's.
double HeadRelErr(const std::vector<float>& got, const std::vector<float>& want, int h, int d) {
  double diff = 0, norm = 0;
  for (int e = 0; e < d; ++e) {
    const double a = got[h * d + e], b = want[h * d + e];
    diff += (a - b) * (a - b);
    norm += b * b;
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

std::vector<unsigned char> Random(std::mt19937& rng, std::size_t n, DType t) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> x(n);
  for (auto& e : x) e = dist(rng);
  std::vector<unsigned char> bytes(n * DTypeSize(t));
  ConvertFromF32(x.data(), n, t, bytes.data());
  return bytes;
}

// Host vectors, or device copies of them (through the runtime's own transfer wrappers).
// Writes at row `row` of k and v ([rows, kv_heads, head_dim] in dtype) a key along e_0 whose score
// at q = e_0 (scale 1/8) is 7.6 in every kv head, and `value` in every dim of its value: beside
// ~1200 random rows, which score ~0 there, that row carries ~0.6 of the step's attention.
// `dim`: the key lies along e_dim instead (dominant at q = e_dim).
void PlantDominantRow(const RuntimeConfig& cfg, DType dtype, int64_t row, float value,
                      std::vector<unsigned char>* k, std::vector<unsigned char>* v, int dim = 0) {
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  std::vector<float> key(kv_row, 0.f), val(kv_row, value);
  for (int g = 0; g < cfg.num_kv_heads; ++g) key[g * cfg.head_dim + dim] = 7.6f * 8.f;
  const std::size_t at = row * kv_row * DTypeSize(dtype);
  ConvertFromF32(key.data(), kv_row, dtype, k->data() + at);
  ConvertFromF32(val.data(), kv_row, dtype, v->data() + at);
}

class Tensors {
 public:
  Tensors(bool device, void* stream) : device_(device), stream_(stream) {}
  const void* Put(const std::vector<unsigned char>& host) {
    if (!device_) return host.data();
    auto b = transfer::DeviceBuffer::Allocate(host.size());
    EXPECT_TRUE(b.ok()) << b.status();
    EXPECT_TRUE(transfer::MemcpyAsync(b->data(), host.data(), host.size(), stream_).ok());
    bufs_.push_back(std::move(*b));
    return bufs_.back().data();
  }
  float* Out(std::size_t floats) {
    if (!device_) {  // a list: a step's out and lse are both live
      host_outs_.emplace_back(floats, NAN);
      return host_outs_.back().data();
    }
    auto b = transfer::DeviceBuffer::Allocate(floats * sizeof(float));
    EXPECT_TRUE(b.ok());
    bufs_.push_back(std::move(*b));
    return static_cast<float*>(bufs_.back().data());
  }
  std::vector<float> Get(float* out, std::size_t floats) {
    if (!device_) return std::vector<float>(out, out + floats);
    std::vector<float> h(floats);
    EXPECT_TRUE(transfer::MemcpyAsync(h.data(), out, floats * sizeof(float), stream_).ok());
    EXPECT_TRUE(transfer::StreamSynchronize(stream_).ok());
    return h;
  }
  Exec exec() const { return Exec{device_, stream_}; }
  void Clear() {
    bufs_.clear();
    host_outs_.clear();
  }

 private:
  bool device_;
  void* stream_;
  std::vector<transfer::DeviceBuffer> bufs_;
  std::deque<std::vector<float>> host_outs_;
};

// Prefills every layer of sequence hs of the host-backend runtime (host pointers) and sequence gs
// of the GPU one (through dev) with the same random prompt; edit, if given, changes each layer's
// k and v first.
::testing::AssertionResult PrefillBoth(
    Runtime& host, int64_t hs, Runtime& gpu, int64_t gs, DType t, int prompt, std::mt19937& rng,
    Tensors& dev,
    const std::function<void(std::vector<unsigned char>*, std::vector<unsigned char>*)>& edit =
        nullptr) {
  const RuntimeConfig& cfg = host.config();
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  for (int l = 0; l < cfg.num_layers; ++l) {
    auto q = Random(rng, prompt * q_row, t);
    auto k = Random(rng, prompt * kv_row, t);
    auto v = Random(rng, prompt * kv_row, t);
    if (edit) edit(&k, &v);
    if (auto st = host.Prefill(hs, l, q.data(), k.data(), v.data(), prompt); !st.ok())
      return ::testing::AssertionFailure() << "host prefill, layer " << l << ": " << st;
    if (auto st = gpu.Prefill(gs, l, dev.Put(q), dev.Put(k), dev.Put(v), prompt, dev.exec());
        !st.ok())
      return ::testing::AssertionFailure() << "GPU prefill, layer " << l << ": " << st;
  }
  return ::testing::AssertionSuccess();
}

// One decode layer-step of layer l on both runtimes: append k, v, attend q; the host backend's
// output in *want, the GPU backend's (through dev) in *got.
::testing::AssertionResult StepBoth(Runtime& host, int64_t hs, Runtime& gpu, int64_t gs, int l,
                                    const std::vector<unsigned char>& k,
                                    const std::vector<unsigned char>& v,
                                    const std::vector<unsigned char>& q, Tensors& dev,
                                    std::vector<float>* want, std::vector<float>* got) {
  const RuntimeConfig& cfg = host.config();
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  if (auto st = host.Append(hs, l, k.data(), v.data(), 1); !st.ok())
    return ::testing::AssertionFailure() << "host append, layer " << l << ": " << st;
  if (auto st = gpu.Append(gs, l, dev.Put(k), dev.Put(v), 1, dev.exec()); !st.ok())
    return ::testing::AssertionFailure() << "GPU append, layer " << l << ": " << st;
  want->assign(q_row, 0.f);
  if (auto st = host.Attend(hs, l, q.data(), want->data()); !st.ok())
    return ::testing::AssertionFailure() << "host attend, layer " << l << ": " << st;
  float* out = dev.Out(q_row);
  if (auto st = gpu.Attend(gs, l, dev.Put(q), out, dev.exec()); !st.ok())
    return ::testing::AssertionFailure() << "GPU attend, layer " << l << ": " << st;
  *got = dev.Get(out, q_row);
  return ::testing::AssertionSuccess();
}

// The direct-step tests' two runtimes: the cluster kind with the direct step (hot cache 0.5, bf16)
// on the host backend and on the GPU backend, and device tensors on a stream of the test's.
struct DirectStepPair {
  explicit DirectStepPair(const char* name)
      : c{cpu_index::IndexKind::kCluster, true, DType::kBF16, name},
        host_rt(Runtime::Create(ClusterCompareConfig(c, 0, 0.5f, true, false))),
        gpu_rt(Runtime::Create(ClusterCompareConfig(c, 1, 0.5f, true, false))),
        stream(transfer::Stream::Create()),
        dev(true, stream.ok() ? stream->get() : nullptr) {}
  bool ok() const { return host_rt.ok() && gpu_rt.ok() && stream.ok(); }

  const Case c;
  absl::StatusOr<std::unique_ptr<Runtime>> host_rt, gpu_rt;
  absl::StatusOr<transfer::Stream> stream;
  Tensors dev;
};

void ExpectClose(const std::vector<float>& gpu, const std::vector<float>& host,
                 const std::string& what) {
  ASSERT_EQ(gpu.size(), host.size());
  int bad = 0;
  for (std::size_t i = 0; i < gpu.size() && bad < 5; ++i) {
    const double tol = kOutAbsTol + kOutRelTol * std::abs(host[i]);
    if (!(std::abs(gpu[i] - host[i]) <= tol)) {
      ADD_FAILURE() << what << ": element " << i << " gpu " << gpu[i] << " host " << host[i];
      ++bad;
    }
  }
}

// Each head's merged lse (natural log) within tol of the host backend's: both backends weigh
// the same tokens; the tier's bf16 scores on the device differ in the last bits.
void ExpectLseClose(const std::vector<float>& gpu, const std::vector<float>& host,
                    const std::string& what, double tol = 1e-2) {
  ASSERT_EQ(gpu.size(), host.size());
  int bad = 0;
  for (std::size_t i = 0; i < gpu.size() && bad < 5; ++i) {
    if (!(std::abs(gpu[i] - host[i]) <= tol * (1 + std::abs(host[i])))) {
      ADD_FAILURE() << what << ": lse of head " << i << " gpu " << gpu[i] << " host " << host[i];
      ++bad;
    }
  }
}

// Drives the same token stream through a host-backend and a GPU-backend runtime and compares
// every attend. seqs sequences, each: prefill of `prompt` tokens (more than the window, so part
// goes straight to the host store), then decode steps of append 1 + attend per layer, with one
// multi-token append (more than a window) half-way.
void RunCompare(const Case& c, int seqs, int prompt, int steps, uint32_t seed) {
  auto host_rt = Runtime::Create(MakeConfig(c, 0));
  auto gpu_rt = Runtime::Create(MakeConfig(c, 1));
  ASSERT_TRUE(host_rt.ok()) << host_rt.status();
  ASSERT_TRUE(gpu_rt.ok()) << gpu_rt.status();
  ASSERT_TRUE((*gpu_rt)->gpu_backend());
  const RuntimeConfig& cfg = (*host_rt)->config();
  auto stream = transfer::Stream::Create();
  ASSERT_TRUE(stream.ok());
  Tensors dev(c.device, stream->get());
  std::mt19937 rng(seed);
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  std::vector<int64_t> hs, gs;
  for (int s = 0; s < seqs; ++s) {
    hs.push_back(*(*host_rt)->CreateSequence());
    gs.push_back(*(*gpu_rt)->CreateSequence());
    for (int l = 0; l < cfg.num_layers; ++l) {
      auto q = Random(rng, prompt * q_row, c.dtype);
      auto k = Random(rng, prompt * kv_row, c.dtype);
      auto v = Random(rng, prompt * kv_row, c.dtype);
      ASSERT_TRUE((*host_rt)->Prefill(hs[s], l, q.data(), k.data(), v.data(), prompt).ok());
      auto st =
          (*gpu_rt)->Prefill(gs[s], l, dev.Put(q), dev.Put(k), dev.Put(v), prompt, dev.exec());
      ASSERT_TRUE(st.ok()) << st;
    }
  }
  for (int step = 0; step < steps; ++step) {
    const int n_new = step == steps / 2 ? cfg.window_tokens + 13 : 1;
    for (int l = 0; l < cfg.num_layers; ++l) {
      for (int s = 0; s < seqs; ++s) {
        auto k = Random(rng, n_new * kv_row, c.dtype);
        auto v = Random(rng, n_new * kv_row, c.dtype);
        auto q = Random(rng, q_row, c.dtype);
        ASSERT_TRUE((*host_rt)->Append(hs[s], l, k.data(), v.data(), n_new).ok());
        auto st = (*gpu_rt)->Append(gs[s], l, dev.Put(k), dev.Put(v), n_new, dev.exec());
        ASSERT_TRUE(st.ok()) << st;
        // With the merged lse (kvrt_attend_batch_lse_ex): the device's MergeStatesN writes it.
        std::vector<float> want(q_row), want_lse(cfg.num_q_heads);
        ASSERT_TRUE((*host_rt)->Attend(hs[s], l, q.data(), want.data(), {}, want_lse.data()).ok());
        float* out = dev.Out(q_row);
        float* lse = dev.Out(cfg.num_q_heads);
        st = (*gpu_rt)->Attend(gs[s], l, dev.Put(q), out, dev.exec(), lse);
        ASSERT_TRUE(st.ok()) << st;
        const std::string what = c.name + " step " + std::to_string(step) + " layer " +
                                 std::to_string(l) + " seq " + std::to_string(s);
        ExpectClose(dev.Get(out, q_row), want, what);
        ExpectLseClose(dev.Get(lse, cfg.num_q_heads), want_lse, what);
        for (int h = 0; h < cfg.num_q_heads; h += 3) {
          std::vector<int64_t> a, b;
          ASSERT_TRUE((*host_rt)->GetAttended(hs[s], l, h, &a).ok());
          ASSERT_TRUE((*gpu_rt)->GetAttended(gs[s], l, h, &b).ok());
          std::sort(a.begin(), a.end());
          std::sort(b.begin(), b.end());
          EXPECT_EQ(a, b) << what << " head " << h;
        }
        if (::testing::Test::HasFailure()) return;
      }
    }
    dev.Clear();
  }
  const auto a = (*host_rt)->Stats(), b = (*gpu_rt)->Stats();
  EXPECT_EQ(a.gpu_tokens, b.gpu_tokens);
  EXPECT_EQ(a.host_tokens, b.host_tokens);
  EXPECT_EQ(a.evicted_tokens, b.evicted_tokens);
  // A padded head_dim's device rows are wider than the host backend's.
  if (gpu::SupportedHeadDim(c.head_dim)) {
    EXPECT_EQ(a.gpu_allocated_bytes, b.gpu_allocated_bytes);
  } else {
    EXPECT_GT(b.gpu_allocated_bytes, a.gpu_allocated_bytes);
  }
  EXPECT_GT(b.eviction_batches, 0);
  EXPECT_GT(b.time_attend_ns, 0);
  EXPECT_GT(b.time_gpu_attention_ns, 0);
  if (c.cold_attention == 1) {
    EXPECT_EQ(b.attends_fetch, b.attend_calls);
  }
  if (c.cold_attention == 2) {
    EXPECT_GT(b.attends_fetch, 0);  // auto tries both modes
    EXPECT_LT(b.attends_fetch, b.attend_calls);
  }
  if (c.cold_attention == 0) {
    EXPECT_EQ(b.attends_fetch, 0);
  }
  for (int s = 0; s < seqs; ++s) ASSERT_TRUE((*gpu_rt)->ReleaseSequence(gs[s]).ok());
  EXPECT_EQ((*gpu_rt)->Stats().gpu_allocated_bytes, 0);
}

class GpuBackend : public ::testing::TestWithParam<Case> {};

TEST_P(GpuBackend, MatchesHostBackend) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  const bool small = Small();
  RunCompare(GetParam(), small ? 1 : 3, small ? 300 : 700, small ? 6 : 40, 1234);
}

std::vector<Case> Cases() {
  std::vector<Case> out;
  for (auto kind : {cpu_index::IndexKind::kExact, cpu_index::IndexKind::kFlat})
    for (bool device : {false, true})
      for (DType t : {DType::kF32, DType::kBF16})
        out.push_back({kind, device, t,
                       std::string(kind == cpu_index::IndexKind::kExact ? "exact" : "flat") +
                           (device ? "_device" : "_host") + "_" + std::string(DTypeName(t))});
  // Fetch mode (retrieved rows attended on the GPU) and the auto policy, against the host
  // backend's CPU attention.
  out.push_back({cpu_index::IndexKind::kFlat, true, DType::kBF16, "flat_device_bf16_fetch", 1});
  out.push_back({cpu_index::IndexKind::kFlat, false, DType::kF32, "flat_host_f32_fetch", 1});
  out.push_back({cpu_index::IndexKind::kFlat, true, DType::kF32, "flat_device_f32_auto", 2});
  // head_dim without a kernel instantiation: padded to 128 on the GPU backend.
  out.push_back({cpu_index::IndexKind::kExact, true, DType::kBF16, "exact_device_bf16_d96", 0, 96});
  out.push_back({cpu_index::IndexKind::kFlat, false, DType::kF32, "flat_host_f32_d80", 0, 80});
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, GpuBackend, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

TEST(GpuBackendConcurrency, SequencesFromSeveralThreads) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  // Each thread drives its own sequence of one shared GPU runtime (runtime streams, shared copy
  // stream and pinned pool); each compares against its own host runtime.
  const int threads = Small() ? 2 : 6;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([t] {
      RunCompare({cpu_index::IndexKind::kFlat, t % 2 == 1, DType::kBF16, "thread"}, 1, 200,
                 Small() ? 4 : 20, 99 + t);
    });
  for (auto& th : pool) th.join();
}

// One decode token of a batch on layer 0: each member s gets a random k, v on both runtimes and
// the host backend's attend of its q (row s of q) into want (its lse into want_lse); then the GPU
// runtime's AttendBatch of all of them into *out and *lse (device).
void BatchStep(Runtime& host, Runtime& gpu, const std::vector<int64_t>& hs,
               const std::vector<int64_t>& gs, const std::vector<unsigned char>& q, DType t,
               std::mt19937& rng, Tensors& dev, std::vector<float>* want, float** out,
               std::vector<float>* want_lse, float** lse) {
  const RuntimeConfig& cfg = gpu.config();
  const int n = static_cast<int>(gs.size());
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  want->assign(n * q_row, 0.f);
  want_lse->assign(n * cfg.num_q_heads, 0.f);
  for (int s = 0; s < n; ++s) {
    auto k = Random(rng, kv_row, t);
    auto v = Random(rng, kv_row, t);
    ASSERT_TRUE(host.Append(hs[s], 0, k.data(), v.data(), 1).ok());
    ASSERT_TRUE(gpu.Append(gs[s], 0, dev.Put(k), dev.Put(v), 1, dev.exec()).ok());
    ASSERT_TRUE(host.Attend(hs[s], 0, q.data() + s * q_row * DTypeSize(t), want->data() + s * q_row,
                            {}, want_lse->data() + s * cfg.num_q_heads)
                    .ok());
  }
  *out = dev.Out(n * q_row);
  *lse = dev.Out(n * cfg.num_q_heads);
  auto st = gpu.AttendBatch(gs.data(), n, 0, dev.Put(q), *out, dev.exec(), *lse);
  ASSERT_TRUE(st.ok()) << st;
}

// AttendBatch on the GPU backend (device pointers, one stream): the same outputs as the host
// backend's one attend per sequence.
// Also at a padded head_dim (96): the batch's q is padded as one tensor and each member's row of
// out comes back.
TEST(GpuBackendBatch, AttendBatchMatchesHostBackend) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  for (int d : {64, 96}) {
    const Case c{cpu_index::IndexKind::kFlat,   true, DType::kBF16,
                 "batch d" + std::to_string(d), 0,    d};
    auto host_rt = Runtime::Create(MakeConfig(c, 0));
    auto gpu_rt = Runtime::Create(MakeConfig(c, 1));
    ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
    const RuntimeConfig& cfg = (*host_rt)->config();
    auto stream = transfer::Stream::Create();
    ASSERT_TRUE(stream.ok());
    Tensors dev(true, stream->get());
    std::mt19937 rng(5);
    const int n = 4, prompt = 300;
    const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
    const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
    std::vector<int64_t> hs, gs;
    for (int s = 0; s < n; ++s) {
      hs.push_back(*(*host_rt)->CreateSequence());
      gs.push_back(*(*gpu_rt)->CreateSequence());
      auto k = Random(rng, (prompt + s) * kv_row, c.dtype);
      auto v = Random(rng, (prompt + s) * kv_row, c.dtype);
      ASSERT_TRUE((*host_rt)->Prefill(hs[s], 0, nullptr, k.data(), v.data(), prompt + s).ok());
      ASSERT_TRUE((*gpu_rt)
                      ->Prefill(gs[s], 0, nullptr, dev.Put(k), dev.Put(v), prompt + s, dev.exec())
                      .ok());
    }
    for (int step = 0; step < 3; ++step) {
      auto q = Random(rng, n * q_row, c.dtype);
      std::vector<float> want, want_lse;
      float *out = nullptr, *lse = nullptr;
      ASSERT_NO_FATAL_FAILURE(BatchStep(**host_rt, **gpu_rt, hs, gs, q, c.dtype, rng, dev, &want,
                                        &out, &want_lse, &lse));
      ExpectClose(dev.Get(out, n * q_row), want, c.name + " step " + std::to_string(step));
      ExpectLseClose(dev.Get(lse, n * cfg.num_q_heads), want_lse,
                     c.name + " step " + std::to_string(step));
      dev.Clear();
    }
  }
}

// AttendBatch with the cluster kind's direct step: each member selects on a stream of its own and
// attends the row its append evicted on the device (AttendPendingEvictions into its own cold slot,
// or by default as a row its append wrote into its own store in place). That row
// carries ~0.6 of each member's first step (as in FirstStepsAfterAPrompt), so a member's pending
// row lost, counted twice or taken from another member moves its output far from the host backend's
// one attend per sequence.
TEST(GpuBackendCluster, AttendBatchDirectMatchesHostBackend) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  DirectStepPair pair("batch direct");
  ASSERT_TRUE(pair.ok());
  const Case& c = pair.c;
  auto &host_rt = pair.host_rt, &gpu_rt = pair.gpu_rt;
  const RuntimeConfig& cfg = (*gpu_rt)->config();
  Tensors& dev = pair.dev;
  std::mt19937 rng(9);
  const int n = 3;
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  std::vector<int64_t> hs, gs;
  for (int s = 0; s < n; ++s) {
    const int prompt = 1200 + 7 * s;  // the first append evicts position prompt - window
    hs.push_back(*(*host_rt)->CreateSequence());
    gs.push_back(*(*gpu_rt)->CreateSequence());
    auto k = Random(rng, prompt * kv_row, c.dtype);
    auto v = Random(rng, prompt * kv_row, c.dtype);
    PlantDominantRow(cfg, c.dtype, prompt - cfg.window_tokens, 3.f + s, &k, &v);
    ASSERT_TRUE((*host_rt)->Prefill(hs[s], 0, nullptr, k.data(), v.data(), prompt).ok());
    ASSERT_TRUE(
        (*gpu_rt)->Prefill(gs[s], 0, nullptr, dev.Put(k), dev.Put(v), prompt, dev.exec()).ok());
  }
  for (int step = 0; step < 3; ++step) {
    auto q = Random(rng, n * q_row, c.dtype);
    if (step == 0) {  // q = e_0 in every head of every member
      std::vector<float> e0(n * q_row, 0.f);
      for (int h = 0; h < n * cfg.num_q_heads; ++h) e0[h * cfg.head_dim] = 1.f;
      ConvertFromF32(e0.data(), n * q_row, c.dtype, q.data());
    }
    std::vector<float> want, want_lse;
    float *out = nullptr, *lse = nullptr;
    ASSERT_NO_FATAL_FAILURE(
        BatchStep(**host_rt, **gpu_rt, hs, gs, q, c.dtype, rng, dev, &want, &out, &want_lse, &lse));
    ExpectLseClose(dev.Get(lse, n * cfg.num_q_heads), want_lse,
                   "direct batch step " + std::to_string(step), 5e-2);
    const auto got = dev.Get(out, n * q_row);
    for (int h = 0; h < n * cfg.num_q_heads; ++h)
      EXPECT_LT(HeadRelErr(got, want, h, cfg.head_dim), 5e-2)
          << "step " << step << " member " << h / cfg.num_q_heads << " head "
          << h % cfg.num_q_heads;
    dev.Clear();
  }
  EXPECT_EQ((*gpu_rt)->Stats().attends_direct, 3 * n);
  EXPECT_EQ((*gpu_rt)->Stats().evicted_in_place, InPlaceEvictOn() ? 3 * n : 0);
}

// With check_finite off, a NaN in q or in any tier's k/v makes the affected heads' output
// NaN on the GPU backend too (tier kernel, split merge, state merge, fetch mode), never zeros.
struct NanGpuCase {
  cpu_index::IndexKind kind;
  int cold_attention;  // 0 CPU, 1 fetch
  std::string name;
};

class GpuBackendNan : public ::testing::TestWithParam<NanGpuCase> {};

TEST_P(GpuBackendNan, NanPropagatesFromEveryTier) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  constexpr int kH = 4, kG = 2, kD = 64, kT = 600;
  // where: 0 q, 1 the only sink's key, 2 a window key, 3 a cold key, 4 a cold value.
  for (int where = 0; where < 5; ++where) {
    RuntimeConfig cfg;
    cfg.num_q_heads = kH;
    cfg.num_kv_heads = kG;
    cfg.head_dim = kD;
    cfg.dtype = DType::kF32;
    cfg.sink_tokens = 1;
    cfg.window_tokens = 64;
    cfg.top_k = 16;
    cfg.index_kind = GetParam().kind;
    cfg.cold_attention = GetParam().cold_attention;
    cfg.use_gpu = 1;
    auto rt = Runtime::Create(cfg);
    ASSERT_TRUE(rt.ok()) << rt.status();
    auto seq = (*rt)->CreateSequence();
    ASSERT_TRUE(seq.ok());
    std::vector<float> k(static_cast<std::size_t>(kT) * kG * kD), v(k.size()), q(kH * kD);
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = std::sin(0.37f * static_cast<float>(i));
      v[i] = std::cos(0.11f * static_cast<float>(i));
    }
    for (std::size_t i = 0; i < q.size(); ++i)
      q[i] = std::sin(0.23f * static_cast<float>(i) + 0.3f);
    auto at = [](int64_t t) { return static_cast<std::size_t>(t) * kG * kD + 5; };  // kv head 0
    if (where == 0) q[3] = NAN;                                                     // q head 0
    if (where == 1) k[at(0)] = NAN;
    if (where == 2) k[at(kT - 3)] = NAN;
    if (where == 3) k[at(100)] = NAN;
    if (where == 4) v[at(200)] = NAN;
    ASSERT_TRUE((*rt)->Prefill(*seq, 0, nullptr, k.data(), v.data(), kT).ok());
    std::vector<float> out(kH * kD, 7.f);
    ASSERT_TRUE((*rt)->Attend(*seq, 0, q.data(), out.data()).ok());
    const int nan_heads = where == 0 ? 1 : kH / kG;  // q head 0, or kv head 0's q heads
    for (int h = 0; h < kH; ++h)
      for (int e = 0; e < kD; ++e)
        // A NaN key or q makes a score NaN, so the head's whole output; a NaN value element only
        // that element of the output.
        EXPECT_EQ(std::isnan(out[h * kD + e]), h < nan_heads && (where != 4 || e == 5))
            << "where " << where << " head " << h << " element " << e;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, GpuBackendNan,
    ::testing::Values(NanGpuCase{cpu_index::IndexKind::kExact, 0, "exact"},
                      NanGpuCase{cpu_index::IndexKind::kFlat, 0, "flat"},
                      NanGpuCase{cpu_index::IndexKind::kFlat, 1, "flat_fetch"},
                      NanGpuCase{cpu_index::IndexKind::kIvf, 0, "ivf"},
                      NanGpuCase{cpu_index::IndexKind::kHnsw, 0, "hnsw"},
                      NanGpuCase{cpu_index::IndexKind::kLandmark, 0, "landmark"},
                      NanGpuCase{cpu_index::IndexKind::kAttentionAware, 0, "attention_aware"}),
    [](const auto& info) { return info.param.name; });

TEST(GpuBackendConfig, UseGpuWithoutDevice) {
  RuntimeConfig cfg;
  cfg.use_gpu = 1;
  auto rt = Runtime::Create(cfg);
  if (transfer::CudaAvailable()) {
    ASSERT_TRUE(rt.ok()) << rt.status();
    EXPECT_EQ((*rt)->config().use_gpu, 1);
    cfg.head_dim = 96;  // no kernel instantiation: padded to 128, reported as 96
    auto padded = Runtime::Create(cfg);
    ASSERT_TRUE(padded.ok()) << padded.status();
    EXPECT_EQ((*padded)->config().head_dim, 96);
    EXPECT_EQ((*padded)->config().use_gpu, 1);
    cfg.head_dim = 320;  // past the widest kernel
    auto bad = Runtime::Create(cfg);
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(bad.status().message()).find("head_dim"), std::string::npos);
    cfg.use_gpu = -1;
    auto fallback = Runtime::Create(cfg);
    ASSERT_TRUE(fallback.ok());
    EXPECT_EQ((*fallback)->config().use_gpu, 0);
    return;
  }
  ASSERT_FALSE(rt.ok());
  EXPECT_EQ(rt.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(std::string(rt.status().message()).find("CUDA"), std::string::npos);
  cfg.use_gpu = -1;
  auto host = Runtime::Create(cfg);
  ASSERT_TRUE(host.ok());
  EXPECT_EQ((*host)->config().use_gpu, 0);
  EXPECT_FALSE((*host)->gpu_backend());
  float out[128];
  const unsigned char q[256] = {};
  auto st = (*host)->Attend(0, 0, q, out, Exec{true, nullptr});
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
}

// `steps` decode layer-steps of every layer on random rows (StepBoth): each q head's output within
// 5e-2 of the host backend's (relative L2); with most_close, at least 9 in 10 within 1e-2.
void StepsClose(Runtime& host_rt, int64_t hs, Runtime& gpu_rt, int64_t gs, const Case& c, int steps,
                std::mt19937& rng, Tensors& dev, bool most_close = true) {
  const RuntimeConfig& cfg = gpu_rt.config();
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  int close = 0, total = 0;
  for (int step = 0; step < steps; ++step) {
    for (int l = 0; l < cfg.num_layers; ++l) {
      auto k = Random(rng, kv_row, c.dtype);
      auto v = Random(rng, kv_row, c.dtype);
      auto q = Random(rng, q_row, c.dtype);
      std::vector<float> want, got;
      ASSERT_TRUE(StepBoth(host_rt, hs, gpu_rt, gs, l, k, v, q, dev, &want, &got));
      for (int h = 0; h < cfg.num_q_heads; ++h) {
        const double rel = HeadRelErr(got, want, h, cfg.head_dim);
        EXPECT_LT(rel, 5e-2) << c.name << " step " << step << " layer " << l << " head " << h;
        close += rel < 1e-2;
        ++total;
      }
    }
    dev.Clear();
  }
  if (most_close) {
    EXPECT_GE(close, total * 9 / 10) << c.name << ": heads within 1e-2 of the host backend";
  }
}

// The cluster kind on the GPU backend scores its summary on the GPU (a device copy, counted in
// gpu_memory_limit) and leaves the estimate there; the host backend runs the index's own search on
// the CPU. Both select by the same rule, but densities summed in another order can flip a cluster
// at the budget's edge and the GPU drops an estimate under 1e-4 of the mass, so outputs are
// compared by relative L2 error, not element by element.
//
// With a hot cache (hot_cache_fraction > 0) the same rows are attended on the GPU from the cache
// instead of on the CPU: large enough that everything fits (0.5), and so small (0.02) that most
// groups overflow to the CPU. The direct step (cluster_direct_step) attends the same rows from
// its own pool or straight from the registered host store; with 256-token segments the store
// grows past its capacity and new segments permute it during the run, so the registration is
// dropped and renewed, and the pages of moved rows are given up.
TEST(GpuBackendCluster, GpuSelectMatchesCpuSelect) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  struct Mode {
    float hot;
    bool direct;
    bool group = false;  // cluster.group_select: one selection per kv head
    int keys = 16;       // cluster.cluster_size (config.cluster_keys)
  };
  const Mode kModes[] = {{0.f, false},        {0.5f, false},         {0.02f, false},
                         {0.5f, true},        {0.02f, true},         {0.f, false, true},
                         {0.02f, true, true}, {0.02f, true, true, 8}};
  for (const auto& [hot, direct, group, keys] : kModes) {
    for (bool device : {false, true}) {
      const std::string name =
          absl::StrCat(device ? "device" : "host", " hot ", hot, direct ? " direct" : "",
                       group ? " group" : "", " keys ", keys);
      Case c{cpu_index::IndexKind::kCluster, device, DType::kF32, name.c_str()};
      auto host_rt = Runtime::Create(ClusterCompareConfig(c, 0, hot, direct, group, keys));
      auto gpu_rt = Runtime::Create(ClusterCompareConfig(c, 1, hot, direct, group, keys));
      ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
      const RuntimeConfig& cfg = (*host_rt)->config();
      auto stream = transfer::Stream::Create();
      ASSERT_TRUE(stream.ok());
      Tensors dev(device, stream->get());
      std::mt19937 rng(77);
      const int prompt = 1200, steps = 12;
      const int64_t hs = *(*host_rt)->CreateSequence(), gs = *(*gpu_rt)->CreateSequence();
      ASSERT_TRUE(PrefillBoth(**host_rt, hs, **gpu_rt, gs, c.dtype, prompt, rng, dev));
      StepsClose(**host_rt, hs, **gpu_rt, gs, c, steps, rng, dev);
      const auto s = (*gpu_rt)->Stats();
      EXPECT_EQ(s.attends_gpu_select, s.attend_calls) << c.name;
      EXPECT_GT(s.summary_gpu_bytes, 0);
      EXPECT_GE(s.gpu_allocated_bytes, s.summary_gpu_bytes + s.hot_cache_gpu_bytes);
      // The same tokens attended either way (the cache moves where, not what); the direct step
      // counts a step's tokens at the next one, so its last step's are missing.
      const auto hs_stats = (*host_rt)->Stats();
      EXPECT_NEAR(static_cast<double>(s.cold_tokens_attended),
                  static_cast<double>(hs_stats.cold_tokens_attended),
                  (0.05 + (direct ? 1.0 / steps : 0.0)) * hs_stats.cold_tokens_attended)
          << c.name;
      EXPECT_EQ(s.attends_direct, direct ? s.attend_calls : 0) << c.name;
      if (direct) {
        EXPECT_GT(s.direct_host_bytes, 0) << c.name;
      }
      if (hot > 0) {
        EXPECT_GT(s.hot_cache_gpu_bytes, 0) << c.name;
        EXPECT_GT(s.hot_misses, 0) << c.name;
        // The direct step's pages fill from the rows its steps read (staged), not over PCIe;
        // only the blocks every step reads (unclustered rows, outliers) are copied in whole.
        if (direct) {
          const int64_t block_bytes = int64_t{8} * 2 * cfg.head_dim * DTypeSize(cfg.dtype);
          EXPECT_EQ(s.hot_h2d_bytes % block_bytes, 0) << c.name;
          EXPECT_LE(s.hot_h2d_bytes, s.hot_misses * block_bytes) << c.name;
          // With room beyond those blocks, selected clusters' blocks get pages too (staged).
          if (hot >= 0.5f) {
            EXPECT_LT(s.hot_h2d_bytes, s.hot_misses * block_bytes) << c.name;
          }
        } else {
          EXPECT_GT(s.hot_h2d_bytes, 0) << c.name;
        }
        // With room for everything, later steps find the outliers and the full chunks of
        // unclustered rows again (random queries select other clusters each step).
        if (hot >= 0.5f) {
          EXPECT_GT(s.hot_hits, 0) << c.name;
        }
      } else {
        EXPECT_EQ(s.hot_hits + s.hot_misses + s.hot_cache_gpu_bytes, 0) << c.name;
      }
      ASSERT_TRUE((*gpu_rt)->ReleaseSequence(gs).ok());
      EXPECT_EQ((*gpu_rt)->Stats().gpu_allocated_bytes, 0);
      EXPECT_EQ((*gpu_rt)->Stats().summary_gpu_bytes, 0);
      EXPECT_EQ((*gpu_rt)->Stats().hot_cache_gpu_bytes, 0);
    }
  }
}

// A `prompt`-token prompt into both runtimes (a new sequence on the host's, gs on the GPU's), then
// 6 decode steps of every layer on random rows, each q head's output within 5% of the host's.
void StepsAgree(const Case& c, uint32_t seed, Runtime& host_rt, Runtime& gpu_rt, int64_t gs,
                int prompt = 1200) {
  auto stream = transfer::Stream::Create();
  ASSERT_TRUE(stream.ok());
  Tensors dev(true, stream->get());
  std::mt19937 rng(seed);
  const int64_t hs = *host_rt.CreateSequence();
  ASSERT_TRUE(PrefillBoth(host_rt, hs, gpu_rt, gs, c.dtype, prompt, rng, dev));
  StepsClose(host_rt, hs, gpu_rt, gs, c, 6, rng, dev, /*most_close=*/false);
}

// A two-stage selection (cluster.rescore) is the CPU's on the GPU backend too: Create turns the
// GPU selection and the direct step off, and the steps agree with the host backend's; on the
// keys and on 2-bit codes of them (rescore_bits: the GPU build's segments arrive over a store
// already laid out, the host's are laid out after, and the codes must not differ).
TEST(GpuBackendCluster, RescoreSelectsOnTheCpuAndMatchesTheHostBackend) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  for (int run = 0; run < 4; ++run) {
    const bool group = run % 2 == 1;
    const int bits = run < 2 ? 0 : 2;
    Case c{cpu_index::IndexKind::kCluster, true, DType::kBF16,
           group ? (bits ? "rescore group codes" : "rescore group")
                 : (bits ? "rescore codes" : "rescore")};
    RuntimeConfig host_cfg = ClusterCompareConfig(c, 0, 0.1f, true, group);
    RuntimeConfig gpu_cfg = ClusterCompareConfig(c, 1, 0.1f, true, group);
    host_cfg.index.cluster.rescore = gpu_cfg.index.cluster.rescore = 4.f;
    host_cfg.index.cluster.rescore_bits = gpu_cfg.index.cluster.rescore_bits = bits;
    auto host_rt = Runtime::Create(host_cfg);
    auto gpu_rt = Runtime::Create(gpu_cfg);
    ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
    EXPECT_FALSE((*gpu_rt)->config().direct_step);
    EXPECT_FALSE((*gpu_rt)->config().index.cluster.gpu_select);
    const int64_t gs = *(*gpu_rt)->CreateSequence();
    ASSERT_NO_FATAL_FAILURE(StepsAgree(c, 91, **host_rt, **gpu_rt, gs));
    const auto s = (*gpu_rt)->Stats();
    EXPECT_EQ(s.attends_gpu_select, 0) << c.name;
    EXPECT_EQ(s.attends_direct, 0) << c.name;
  }
}

// Wider GQA groups than one CTA of the tier kernel takes (gpu::kTierGroupTile): GLM-4's 16 q heads
// per kv head and a partial tile (12) keep the whole step on the GPU (selection, direct step); an
// MQA shape's 48 q heads over one kv head attend the tier on the GPU and select on the CPU
// (past gpu::kClusterMaxGroup). Each agrees with the host backend, per q head.
TEST(GpuBackendCluster, WideGroupsRunOnTheGpuAndMatchTheHostBackend) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int q_heads, kv_heads;
    bool gpu_select;
  };
  for (const Shape& sh : {Shape{32, 2, true}, Shape{24, 2, true}, Shape{48, 1, false}}) {
    const std::string name = absl::StrCat("q ", sh.q_heads, " kv ", sh.kv_heads);
    Case c{cpu_index::IndexKind::kCluster, true, DType::kBF16, name};
    RuntimeConfig host_cfg = ClusterCompareConfig(c, 0, 0.1f, true, true);
    RuntimeConfig gpu_cfg = ClusterCompareConfig(c, 1, 0.1f, true, true);
    host_cfg.num_q_heads = gpu_cfg.num_q_heads = sh.q_heads;
    host_cfg.num_kv_heads = gpu_cfg.num_kv_heads = sh.kv_heads;
    auto host_rt = Runtime::Create(host_cfg);
    auto gpu_rt = Runtime::Create(gpu_cfg);
    ASSERT_TRUE(host_rt.ok()) << host_rt.status();
    ASSERT_TRUE(gpu_rt.ok()) << gpu_rt.status();
    EXPECT_EQ((*gpu_rt)->config().use_gpu, 1) << name;
    EXPECT_EQ((*gpu_rt)->config().index.cluster.gpu_select, sh.gpu_select) << name;
    EXPECT_EQ((*gpu_rt)->config().direct_step, sh.gpu_select) << name;
    const int64_t gs = *(*gpu_rt)->CreateSequence();
    ASSERT_NO_FATAL_FAILURE(StepsAgree(c, 23, **host_rt, **gpu_rt, gs));
    const auto s = (*gpu_rt)->Stats();
    EXPECT_GT(s.attend_calls, 0) << name;
    EXPECT_EQ(s.attends_gpu_select, sh.gpu_select ? s.attend_calls : 0) << name;
    EXPECT_EQ(s.attends_direct, sh.gpu_select ? s.attend_calls : 0) << name;
    EXPECT_GT(s.time_gpu_attention_ns, 0) << name;
  }
}

// A padded head_dim (96, Phi-3-mini's) keeps the cluster kind's whole step on the GPU (selection,
// direct step) and agrees with the host backend at that head_dim, per q head.
TEST(GpuBackendCluster, PaddedHeadDimSelectsOnTheGpuAndMatchesTheHostBackend) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  Case c{cpu_index::IndexKind::kCluster, true, DType::kBF16, "cluster d96", 0, 96};
  auto host_rt = Runtime::Create(ClusterCompareConfig(c, 0, 0.1f, true, true));
  auto gpu_rt = Runtime::Create(ClusterCompareConfig(c, 1, 0.1f, true, true));
  ASSERT_TRUE(host_rt.ok()) << host_rt.status();
  ASSERT_TRUE(gpu_rt.ok()) << gpu_rt.status();
  EXPECT_EQ((*gpu_rt)->config().head_dim, 96);
  EXPECT_TRUE((*gpu_rt)->config().index.cluster.gpu_select);
  EXPECT_TRUE((*gpu_rt)->config().direct_step);
  const int64_t gs = *(*gpu_rt)->CreateSequence();
  ASSERT_NO_FATAL_FAILURE(StepsAgree(c, 29, **host_rt, **gpu_rt, gs));
  const auto s = (*gpu_rt)->Stats();
  EXPECT_GT(s.attend_calls, 0);
  EXPECT_EQ(s.attends_gpu_select, s.attend_calls);
  EXPECT_EQ(s.attends_direct, s.attend_calls);
}

// A prompt whose cold part is not whole segments leaves an unclustered tail that every step reads
// whole. The direct step's pool has room for it beyond its hot share (here 2% of the cold rows, 3
// blocks per kv head, against a 208-row tail): the tail is read from HBM, and what crosses PCIe
// per attend is about the selection's misses (at most ~48 rows per kv head here), not the tail's
// 208 rows (which it was before: the tail's blocks past the pool came over PCIe at every step).
TEST(GpuBackendCluster, TheUnclusteredTailStaysInThePool) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  Case c{cpu_index::IndexKind::kCluster, true, DType::kF32, "tail"};
  auto host_rt = Runtime::Create(ClusterCompareConfig(c, 0, 0.02f, true, true));
  auto gpu_rt = Runtime::Create(ClusterCompareConfig(c, 1, 0.02f, true, true));
  ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
  const RuntimeConfig& cfg = (*gpu_rt)->config();
  ASSERT_EQ(cfg.index.cluster.segment_tokens, 256);
  // 1300 tokens: sinks 4 + window 64, 1232 cold rows = 4 segments of 256 + a 208-row tail. The
  // counters below start at zero: a prompt neither attends nor reads the host store directly.
  const int64_t gs = *(*gpu_rt)->CreateSequence();
  ASSERT_NO_FATAL_FAILURE(StepsAgree(c, 31, **host_rt, **gpu_rt, gs, 1300));
  const auto s = (*gpu_rt)->Stats();
  ASSERT_GT(s.attend_calls, 0);
  ASSERT_EQ(s.attends_direct, s.attend_calls);
  // Bytes of one cold row of every kv head, key and value.
  const int64_t row_bytes = int64_t{2} * cfg.num_kv_heads * cfg.head_dim * DTypeSize(cfg.dtype);
  const double per_attend = static_cast<double>(s.direct_host_bytes) / s.attend_calls;
  EXPECT_LT(per_attend, 100.0 * row_bytes) << "rows' worth read over PCIe per attend";
}

// The one-stage selection on codes (rescore_bits without rescore) runs on the GPU: the rows'
// codes uploaded beside the summary, each cluster's mass from them (gpu::CodeClusterMass) in
// place of the centroid's estimate; the steps agree with the host
// backend's index, which ranks by the same codes; per q head and with group selection, with the
// direct step. With 2-bit value codes too: the rest's estimate from them on the device
// (gpu::CodeValueRest after the selection) against the host index's RestFromValueCodes.
TEST(GpuBackendCluster, CodeSelectionRunsOnTheGpuAndMatchesTheHostBackend) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  // Runs 0-3: head_dim 64, codes per q head and group, without and with value codes; run 4: value
  // codes at head_dim 256 with one kv head of four q heads (Gemma 3's shape).
  int64_t summary_bytes[5] = {};
  for (int run = 0; run < 5; ++run) {
    const bool group = run % 2 == 1;
    const int value_bits = run < 2 ? 0 : 2;
    const bool wide = run == 4;
    Case c{cpu_index::IndexKind::kCluster, true, DType::kBF16,
           wide    ? "codes values d256"
           : group ? (value_bits ? "codes group values" : "codes group")
                   : (value_bits ? "codes values" : "codes")};
    RuntimeConfig host_cfg = ClusterCompareConfig(c, 0, 0.1f, true, group);
    RuntimeConfig gpu_cfg = ClusterCompareConfig(c, 1, 0.1f, true, group);
    if (wide) {
      host_cfg.head_dim = gpu_cfg.head_dim = 256;
      host_cfg.num_q_heads = gpu_cfg.num_q_heads = 4;
      host_cfg.num_kv_heads = gpu_cfg.num_kv_heads = 1;
    }
    host_cfg.index.cluster.rescore_bits = gpu_cfg.index.cluster.rescore_bits = 2;
    host_cfg.index.cluster.value_bits = gpu_cfg.index.cluster.value_bits = value_bits;
    auto host_rt = Runtime::Create(host_cfg);
    auto gpu_rt = Runtime::Create(gpu_cfg);
    ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
    EXPECT_TRUE((*gpu_rt)->config().index.cluster.gpu_select) << c.name;
    EXPECT_TRUE((*gpu_rt)->config().direct_step) << c.name;
    const int64_t gs = *(*gpu_rt)->CreateSequence();
    ASSERT_NO_FATAL_FAILURE(StepsAgree(c, 93, **host_rt, **gpu_rt, gs));
    const auto s = (*gpu_rt)->Stats();
    EXPECT_GT(s.attends_gpu_select, 0) << c.name;
    EXPECT_GT(s.summary_gpu_bytes, 0) << c.name;
    EXPECT_EQ(s.value_codes_fallbacks, 0) << c.name;
    // The value codes sit beside the key codes (the same runs without them: run - 2).
    summary_bytes[run] = s.summary_gpu_bytes;
    if (value_bits > 0 && !wide) {
      EXPECT_GT(summary_bytes[run], summary_bytes[run - 2]) << c.name;
    }
    ASSERT_TRUE((*gpu_rt)->ReleaseSequence(gs).ok());
    EXPECT_EQ((*gpu_rt)->Stats().summary_gpu_bytes, 0) << c.name;
  }
}

// Values whose codes' grids leave f16's range (gpu::CodeValueRest decodes residuals in f16): the
// device estimates the rest from the value means instead, and says so in the statistics (one per
// summary upload, at least one per layer); the outputs stay finite and of the values' size.
TEST(GpuBackendCluster, ValueGridsPastF16CountAFallback) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  Case c{cpu_index::IndexKind::kCluster, true, DType::kBF16, "huge values"};
  RuntimeConfig cfg = ClusterCompareConfig(c, 1, 0.1f, true, true);
  cfg.index.cluster.rescore_bits = cfg.index.cluster.value_bits = 2;
  RuntimeConfig host_cfg = cfg;
  host_cfg.use_gpu = 0;
  auto host_rt = Runtime::Create(host_cfg);
  auto gpu_rt = Runtime::Create(cfg);
  ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
  auto stream = transfer::Stream::Create();
  ASSERT_TRUE(stream.ok());
  Tensors dev(true, stream->get());
  std::mt19937 rng(17);
  const int64_t hs = *(*host_rt)->CreateSequence(), gs = *(*gpu_rt)->CreateSequence();
  constexpr float kScale = 2e5f;
  auto scale_values = [&](std::vector<unsigned char>*, std::vector<unsigned char>* v) {
    std::vector<float> x(v->size() / DTypeSize(c.dtype));
    ConvertToF32(v->data(), c.dtype, x.size(), x.data());
    for (float& e : x) e *= kScale;
    ConvertFromF32(x.data(), x.size(), c.dtype, v->data());
  };
  ASSERT_TRUE(PrefillBoth(**host_rt, hs, **gpu_rt, gs, c.dtype, 1200, rng, dev, scale_values));
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  for (int l = 0; l < cfg.num_layers; ++l) {
    auto k = Random(rng, kv_row, c.dtype);
    auto v = Random(rng, kv_row, c.dtype);
    auto q = Random(rng, q_row, c.dtype);
    scale_values(nullptr, &v);
    std::vector<float> want, got;
    ASSERT_TRUE(StepBoth(**host_rt, hs, **gpu_rt, gs, l, k, v, q, dev, &want, &got));
    double norm = 0, host_norm = 0;
    for (std::size_t e = 0; e < q_row; ++e) {
      ASSERT_TRUE(std::isfinite(got[e])) << "layer " << l << " element " << e;
      norm += static_cast<double>(got[e]) * got[e];
      host_norm += static_cast<double>(want[e]) * want[e];
    }
    // Averages of values of size kScale: the estimate moves the output, not its scale.
    EXPECT_GT(norm, 0.25 * host_norm) << "layer " << l;
    EXPECT_LT(norm, 4.0 * host_norm) << "layer " << l;
  }
  const auto s = (*gpu_rt)->Stats();
  EXPECT_GT(s.attends_gpu_select, 0);
  EXPECT_GE(s.value_codes_fallbacks, cfg.num_layers);
  EXPECT_EQ((*host_rt)->Stats().value_codes_fallbacks, 0);
}

// The first decode steps after a prompt. The direct step is set up in the prompt's background job,
// not by the first step: the blocks every step reads (the unclustered tail, the outliers) already
// hold pages, copied in whole, when the prompt's work is done. And the row the first append evicts
// is attended once: the direct step does not wait for it to reach the cold tier but attends it
// on the device where the append wrote it (by default the host store's next row, with
// KVRT_IN_PLACE_EVICT=0 the pinned block), so it must count neither twice nor not at all. That row
// carries about half of the first step's attention (its key along q, its value 3 in every dim), so
// either mistake moves the output by a third or more against the host backend, which attends it in
// the cold tier's unclustered rows. (GpuSelectMatchesCpuSelect covers later steps and other modes.)
TEST(GpuBackendCluster, FirstStepsAfterAPrompt) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  DirectStepPair pair("warm");
  ASSERT_TRUE(pair.ok());
  const Case& c = pair.c;
  auto &host_rt = pair.host_rt, &gpu_rt = pair.gpu_rt;
  const RuntimeConfig& cfg = (*gpu_rt)->config();
  Tensors& dev = pair.dev;
  std::mt19937 rng(5);
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  // 1200 - 4 sinks - 64 window = 1132 cold rows: 4 segments of 256, a tail of 108 (13 blocks).
  // The first decode append evicts position 1136 (4 + 1132), the window's oldest.
  const int prompt = 1200, evicted = 1136;
  const int64_t hs = *(*host_rt)->CreateSequence(), gs = *(*gpu_rt)->CreateSequence();
  ASSERT_TRUE(
      PrefillBoth(**host_rt, hs, **gpu_rt, gs, c.dtype, prompt, rng, dev, [&](auto* k, auto* v) {
        PlantDominantRow(cfg, c.dtype, evicted, 3.f, k, v);  // ~0.6 of the first step
      }));
  ASSERT_TRUE((*gpu_rt)->WaitSequence(gs).ok());
  const auto warm = (*gpu_rt)->Stats();
  EXPECT_EQ(warm.attend_calls, 0);
  const int64_t block_bytes = int64_t{8} * 2 * cfg.head_dim * DTypeSize(cfg.dtype);
  // At least the tail's 13 full blocks per kv head and layer, each copied whole.
  EXPECT_GE(warm.hot_misses, int64_t{13} * cfg.num_kv_heads * cfg.num_layers);
  EXPECT_EQ(warm.hot_h2d_bytes, warm.hot_misses * block_bytes);
  EXPECT_EQ(warm.direct_host_bytes, 0);
  for (int step = 0; step < 2; ++step) {
    for (int l = 0; l < cfg.num_layers; ++l) {
      auto k = Random(rng, kv_row, c.dtype);
      auto v = Random(rng, kv_row, c.dtype);
      auto q = Random(rng, q_row, c.dtype);
      if (step == 0) {  // q = e_0 in every head
        std::vector<float> e0(q_row, 0.f);
        for (int h = 0; h < cfg.num_q_heads; ++h) e0[h * cfg.head_dim] = 1.f;
        ConvertFromF32(e0.data(), q_row, c.dtype, q.data());
      }
      std::vector<float> want, got;
      ASSERT_TRUE(StepBoth(**host_rt, hs, **gpu_rt, gs, l, k, v, q, dev, &want, &got));
      for (int h = 0; h < cfg.num_q_heads; ++h)
        EXPECT_LT(HeadRelErr(got, want, h, cfg.head_dim), 5e-2)
            << "step " << step << " layer " << l << " head " << h;
    }
    dev.Clear();
  }
  EXPECT_EQ((*gpu_rt)->Stats().attends_direct, 2 * cfg.num_layers);
  // By default each step's evicted row was written into the store in place (the
  // prompt left room for it) and attended there as a row of the unclustered tail.
  EXPECT_EQ((*gpu_rt)->Stats().evicted_in_place, InPlaceEvictOn() ? 2 * cfg.num_layers : 0);
}

// A decode append writes the row it pushes out of the window into the host store in place
// (gpu::RingAppendRowsToHeads); the cold tier takes it at the layer's next call and the direct
// step attends it before (its row count covers it). Over 640 steps the unclustered tail (108 rows
// after the prompt) passes segments, so background refreshes cluster it and lay its rows out anew
// while appends keep writing past it, and the cold rows outgrow the room the prompt left (half its
// 1132 rows): the append that finds none keeps its row in a pinned block, the next one's settle
// grows (moves) the store, that append finds it not registered yet and keeps a pinned block too,
// its attend registers the store again, and the appends after it write in place again. Every 16th
// step j queries along e_(j mod d) and evicts a row planted along it (~0.6 of that step's
// attention; the rows planted for other steps score ~0 there): a row lost, written to the wrong row
// or attended twice moves those steps far from the host backend. (By default; with
// KVRT_IN_PLACE_EVICT=0 the same steps take the pinned blocks.)
TEST(GpuBackendCluster, DecodeEvictionsAreWrittenIntoTheStoreInPlace) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  DirectStepPair pair("in place");
  ASSERT_TRUE(pair.ok());
  const Case& c = pair.c;
  auto &host_rt = pair.host_rt, &gpu_rt = pair.gpu_rt;
  const RuntimeConfig& cfg = (*gpu_rt)->config();
  Tensors& dev = pair.dev;
  std::mt19937 rng(12);
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  // Under compute-sanitizer (small): 200 steps, within the room.
  const int prompt = 1200, steps = Small() ? 200 : 640, W = cfg.window_tokens;
  const int64_t hs = *(*host_rt)->CreateSequence(), gs = *(*gpu_rt)->CreateSequence();
  ASSERT_TRUE(PrefillBoth(**host_rt, hs, **gpu_rt, gs, c.dtype, prompt, rng, dev));
  // The probe of step s (a multiple of 16): its query's direction.
  auto probe_dim = [&](int s) { return (s / 16) % cfg.head_dim; };
  for (int step = 0; step < steps; ++step) {
    for (int l = 0; l < cfg.num_layers; ++l) {
      auto k = Random(rng, kv_row, c.dtype);
      auto v = Random(rng, kv_row, c.dtype);
      auto q = Random(rng, q_row, c.dtype);
      // The token appended now leaves the window W steps later, at a probing step.
      if ((step + W) % 16 == 0)
        PlantDominantRow(cfg, c.dtype, 0, 3.f + l, &k, &v, probe_dim(step + W));
      if (step % 16 == 0) {
        std::vector<float> e(q_row, 0.f);
        for (int h = 0; h < cfg.num_q_heads; ++h) e[h * cfg.head_dim + probe_dim(step)] = 1.f;
        ConvertFromF32(e.data(), q_row, c.dtype, q.data());
      }
      std::vector<float> want, got;
      ASSERT_TRUE(StepBoth(**host_rt, hs, **gpu_rt, gs, l, k, v, q, dev, &want, &got));
      for (int h = 0; h < cfg.num_q_heads; ++h)
        EXPECT_LT(HeadRelErr(got, want, h, cfg.head_dim), 5e-2)
            << "step " << step << " layer " << l << " head " << h;
      if (::testing::Test::HasFailure()) return;
    }
    dev.Clear();
  }
  const auto a = (*host_rt)->Stats(), b = (*gpu_rt)->Stats();
  EXPECT_EQ(b.evicted_tokens, a.evicted_tokens);
  // All but the two appends per layer around the store's growth (one at 640 steps, none at 200).
  if (InPlaceEvictOn()) {
    EXPECT_GE(b.evicted_in_place, b.evicted_tokens - (steps > 566 ? 2 * cfg.num_layers : 0));
    EXPECT_LE(b.evicted_in_place, b.evicted_tokens);
  } else {
    EXPECT_EQ(b.evicted_in_place, 0);
  }
  EXPECT_EQ(b.host_tokens, a.host_tokens);
  EXPECT_EQ(b.attends_direct, int64_t{steps} * cfg.num_layers);
  EXPECT_EQ(a.evicted_in_place, 0);
}

// Residency-aware selection (cluster.miss_penalty): over decode steps whose queries drift slowly
// (each a small step from the last, as a decoder's do), a penalty on the rows the pool does not
// hold reads fewer rows over PCIe than the same steps without it. With a budget that selects every
// cluster the penalty can only reorder, so the output is the host backend's (exact) either way.
TEST(GpuBackendCluster, MissPenaltyReadsFewerRowsOverPcie) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  Case c{cpu_index::IndexKind::kCluster, true, DType::kBF16, "penalty"};
  for (const float budget : {0.1f, 1.f}) {
    int64_t host_bytes[2] = {0, 0};
    for (const float penalty : {0.f, 2.f}) {
      SCOPED_TRACE(absl::StrCat("budget ", budget, " penalty ", penalty));
      RuntimeConfig hc = ClusterCompareConfig(c, 0, 0.2f, true, true);
      RuntimeConfig gc = ClusterCompareConfig(c, 1, 0.2f, true, true);
      for (RuntimeConfig* cfg : {&hc, &gc}) {
        cfg->index.cluster.budget_fraction = budget;
        cfg->index.cluster.miss_penalty = penalty;
      }
      auto host_rt = Runtime::Create(hc);
      auto gpu_rt = Runtime::Create(gc);
      ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
      const RuntimeConfig& cfg = (*gpu_rt)->config();
      auto stream = transfer::Stream::Create();
      ASSERT_TRUE(stream.ok());
      Tensors dev(true, stream->get());
      std::mt19937 rng(91);
      const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
      const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
      const int prompt = 1200, steps = 16;
      const int64_t hs = *(*host_rt)->CreateSequence(), gs = *(*gpu_rt)->CreateSequence();
      ASSERT_TRUE(PrefillBoth(**host_rt, hs, **gpu_rt, gs, c.dtype, prompt, rng, dev));
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<std::vector<float>> qf(cfg.num_layers, std::vector<float>(q_row));
      for (auto& ql : qf)
        for (float& x : ql) x = 2.f * nd(rng);
      for (int step = 0; step < steps; ++step) {
        for (int l = 0; l < cfg.num_layers; ++l) {
          auto k = Random(rng, kv_row, c.dtype);
          auto v = Random(rng, kv_row, c.dtype);
          for (float& x : qf[l]) x = 0.97f * x + 0.25f * nd(rng);  // a slow drift
          std::vector<unsigned char> q(q_row * DTypeSize(c.dtype));
          ConvertFromF32(qf[l].data(), q_row, c.dtype, q.data());
          std::vector<float> want, got;
          ASSERT_TRUE(StepBoth(**host_rt, hs, **gpu_rt, gs, l, k, v, q, dev, &want, &got));
          for (int h = 0; h < cfg.num_q_heads; ++h) {
            ASSERT_TRUE(std::isfinite(got[h * cfg.head_dim])) << "head " << h;
            if (budget >= 1.f) {
              EXPECT_LT(HeadRelErr(got, want, h, cfg.head_dim), 1e-2)
                  << "step " << step << " layer " << l << " head " << h;
            }
          }
        }
        dev.Clear();
      }
      const auto s = (*gpu_rt)->Stats();
      EXPECT_EQ(s.attends_direct, s.attend_calls);
      host_bytes[penalty > 0.f ? 1 : 0] = s.direct_host_bytes;
    }
    if (budget < 1.f) {
      EXPECT_GT(host_bytes[0], 0);
      EXPECT_LT(host_bytes[1], host_bytes[0]) << "rows read over PCIe with the penalty / without";
    }
  }
}

// The GPU build at prefill (segment_build.h) clusters every whole segment of the prompt on the
// device, from device and from host pointers, and hands the layout to the index: at a budget that
// selects every cluster the output is exact attention (the store's permutation and the position
// map followed the GPU's order), and at a small budget the error against exact attention is of
// the CPU build's size (the clusters differ: flat Lloyd on the GPU, two levels on the CPU).
// kvrt_prefill_sampled_ex from device pointers: the GPU backend given only the query rows that
// PromptQuerySample names (staged from the device as a whole q's sample is) steps as the host
// backend given every query. A graph_query_sample of 64 (16 rows per kv head's 4 q heads) makes
// the stride 75; queries stretched along dimensions that change every 8 rows make the metric
// depend on which rows are read.
TEST(GpuBackendCluster, SampledDeviceQueriesStepAsEveryQueryOnTheHost) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  Case c{cpu_index::IndexKind::kCluster, true, DType::kBF16, "sampled"};
  RuntimeConfig host_cfg = ClusterCompareConfig(c, 0, 0.1f, true, true);
  RuntimeConfig gpu_cfg = ClusterCompareConfig(c, 1, 0.1f, true, true);
  host_cfg.index.graph_query_sample = gpu_cfg.index.graph_query_sample = 64;
  auto host_rt = Runtime::Create(host_cfg);
  auto gpu_rt = Runtime::Create(gpu_cfg);
  ASSERT_TRUE(host_rt.ok() && gpu_rt.ok());
  const RuntimeConfig& cfg = (*gpu_rt)->config();
  const int prompt = 1200, d = cfg.head_dim;
  const QuerySample sample = PromptQuerySample(cfg, prompt);
  ASSERT_EQ(sample.count, 16);
  ASSERT_EQ(sample.stride, 75);
  auto stream = transfer::Stream::Create();
  ASSERT_TRUE(stream.ok());
  Tensors dev(true, stream->get());
  std::mt19937 rng(91);
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * d;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * d;
  const std::size_t es = DTypeSize(c.dtype);
  const int64_t hs = *(*host_rt)->CreateSequence(), gs = *(*gpu_rt)->CreateSequence();
  for (int l = 0; l < cfg.num_layers; ++l) {
    std::vector<float> qf(prompt * q_row);
    std::normal_distribution<float> normal;
    for (std::size_t i = 0; i < qf.size(); ++i) {
      const std::size_t row = i / q_row, dim = i % d;
      qf[i] = normal(rng) * (dim / 8 == row / 8 % 8 ? 4.f : 0.25f);
    }
    std::vector<unsigned char> q(qf.size() * es), picked(sample.count * q_row * es);
    ConvertFromF32(qf.data(), qf.size(), c.dtype, q.data());
    for (int64_t i = 0; i < sample.count; ++i)
      std::copy_n(q.data() + i * sample.stride * q_row * es, q_row * es,
                  picked.data() + i * q_row * es);
    auto k = Random(rng, prompt * kv_row, c.dtype);
    auto v = Random(rng, prompt * kv_row, c.dtype);
    ASSERT_TRUE((*host_rt)->Prefill(hs, l, q.data(), k.data(), v.data(), prompt).ok());
    const absl::Status st = (*gpu_rt)->Prefill(gs, l, dev.Put(picked), sample.count, dev.Put(k),
                                               dev.Put(v), prompt, dev.exec());
    ASSERT_TRUE(st.ok()) << st;
  }
  StepsClose(**host_rt, hs, **gpu_rt, gs, c, 8, rng, dev);
}

TEST(GpuBackendCluster, PrefillBuildsSegmentsOnTheGpu) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const auto& [device, keys] :
       {std::pair{false, 16}, std::pair{true, 16}, std::pair{true, 8}}) {
    const std::string name = absl::StrCat(device ? "device" : "host", " keys ", keys);
    Case c{cpu_index::IndexKind::kCluster, device, DType::kBF16, name};
    RuntimeConfig exact_cfg = MakeConfig({cpu_index::IndexKind::kExact, false, c.dtype, "x"}, 0);
    RuntimeConfig all_cfg = MakeConfig(c, 1), cpu_cfg = MakeConfig(c, 1),
                  gpu_cfg = MakeConfig(c, 1);
    for (RuntimeConfig* cfg : {&all_cfg, &cpu_cfg, &gpu_cfg}) {
      cfg->record_attended = false;
      cfg->index.cluster.cluster_size = keys;
      cfg->index.cluster.segment_tokens = 256;
      cfg->index.cluster.min_budget_tokens = 32;
      cfg->index.cluster.budget_fraction = 0.1f;
    }
    all_cfg.index.cluster.budget_fraction = 1.f;
    // The direct step on: with device pointers the laid-out prompt is copied from the device
    // straight into the registered stores (DeviceTier::CopyIntoStores), which the exact check
    // below then reads.
    all_cfg.direct_step = true;
    all_cfg.hot_cache_fraction = 0.5f;
    cpu_cfg.index.cluster.gpu_build = false;
    auto exact_rt = Runtime::Create(exact_cfg);
    auto all_rt = Runtime::Create(all_cfg);
    auto cpu_rt = Runtime::Create(cpu_cfg);
    auto gpu_rt = Runtime::Create(gpu_cfg);
    ASSERT_TRUE(exact_rt.ok() && all_rt.ok() && cpu_rt.ok() && gpu_rt.ok());
    const RuntimeConfig& cfg = (*gpu_rt)->config();
    auto stream = transfer::Stream::Create();
    ASSERT_TRUE(stream.ok());
    Tensors dev(device, stream->get());
    std::mt19937 rng(91);
    const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
    const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
    const int prompt = 1200;  // 1132 cold rows: 4 segments of 256, 108 rows scanned exactly
    std::vector<Runtime*> rts = {exact_rt->get(), all_rt->get(), cpu_rt->get(), gpu_rt->get()};
    std::vector<int64_t> seqs;
    for (Runtime* rt : rts) seqs.push_back(*rt->CreateSequence());
    for (int l = 0; l < cfg.num_layers; ++l) {
      auto q = Random(rng, prompt * q_row, c.dtype);
      auto k = Random(rng, prompt * kv_row, c.dtype);
      auto v = Random(rng, prompt * kv_row, c.dtype);
      ASSERT_TRUE(rts[0]->Prefill(seqs[0], l, q.data(), k.data(), v.data(), prompt).ok());
      for (int i = 1; i < 4; ++i) {
        auto st =
            rts[i]->Prefill(seqs[i], l, dev.Put(q), dev.Put(k), dev.Put(v), prompt, dev.exec());
        ASSERT_TRUE(st.ok()) << st;
      }
    }
    // A prefill from device pointers returns before its cold rows reach the host store (they are
    // staged on the device): the inputs may be freed and their memory reused at once.
    dev.Clear();
    for (int i = 0; i < 6; ++i) dev.Put(Random(rng, prompt * kv_row, c.dtype));
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(rts[i]->WaitSequence(seqs[i]).ok());
    dev.Clear();
    const int64_t segments = (prompt - cfg.sink_tokens - cfg.window_tokens) / 256;
    const int64_t want = segments * cfg.num_kv_heads * cfg.num_layers;
    EXPECT_EQ(rts[1]->Stats().segments_built_gpu, want) << c.name;
    EXPECT_EQ(rts[3]->Stats().segments_built_gpu, want) << c.name;
    EXPECT_GT(rts[3]->Stats().time_segment_build_ns, 0) << c.name;
    EXPECT_EQ(rts[2]->Stats().segments_built_gpu, 0) << c.name;
    double err_cpu = 0, err_gpu = 0;
    for (int step = 0; step < 6; ++step) {
      for (int l = 0; l < cfg.num_layers; ++l) {
        auto q = Random(rng, q_row, c.dtype);
        std::vector<std::vector<float>> got(4, std::vector<float>(q_row));
        ASSERT_TRUE(rts[0]->Attend(seqs[0], l, q.data(), got[0].data()).ok());
        for (int i = 1; i < 4; ++i) {
          float* out = dev.Out(q_row);
          auto st = rts[i]->Attend(seqs[i], l, dev.Put(q), out, dev.exec());
          ASSERT_TRUE(st.ok()) << st;
          got[i] = dev.Get(out, q_row);
        }
        for (std::size_t e = 0; e < q_row; ++e)
          ASSERT_NEAR(got[1][e], got[0][e], 2e-3) << c.name << " every cluster: exact";
        auto rel = [&](const std::vector<float>& a) {
          double diff = 0, norm = 0;
          for (std::size_t e = 0; e < q_row; ++e) {
            diff += (a[e] - got[0][e]) * (a[e] - got[0][e]);
            norm += got[0][e] * got[0][e];
          }
          return std::sqrt(diff / std::max(norm, 1e-30));
        };
        err_cpu += rel(got[2]);
        err_gpu += rel(got[3]);
      }
      dev.Clear();
    }
    EXPECT_GT(rts[1]->Stats().attends_direct, 0) << c.name << ": the direct step ran";
    EXPECT_GT(err_cpu, 0) << "a budget of 10% is not exact";
    EXPECT_LT(err_gpu, 1.5 * err_cpu + 1e-6)
        << c.name << ": GPU build error " << err_gpu << " vs CPU build " << err_cpu;
  }
}

#if KVRT_WITH_CUDA
// A one-layer flat runtime on the GPU backend, a non-blocking stream of the caller's, a sequence,
// and in device memory a prompt's k and v, one token's k1 and v1, a query and out.
struct OneLayerOnDevice {
  static constexpr int kPrompt = 300;
  std::unique_ptr<Runtime> rt;
  cudaStream_t s = nullptr;
  std::unique_ptr<Tensors> dev;
  const void *k = nullptr, *v = nullptr, *k1 = nullptr, *v1 = nullptr, *q = nullptr;
  float* out = nullptr;
  int64_t seq = -1;
  std::size_t q_row = 0;
  Exec exec() const { return Exec{true, s}; }
  ~OneLayerOnDevice() {
    if (dev) dev->Clear();
    if (s != nullptr) cudaStreamDestroy(s);
  }
};

::testing::AssertionResult MakeOneLayerOnDevice(DType dtype, uint32_t seed, OneLayerOnDevice* o) {
  RuntimeConfig cfg = MakeConfig({cpu_index::IndexKind::kFlat, true, dtype, "x"}, 1);
  cfg.num_layers = 1;
  auto rt = Runtime::Create(cfg);
  if (!rt.ok()) return ::testing::AssertionFailure() << rt.status();
  o->rt = std::move(*rt);
  if (cudaStreamCreateWithFlags(&o->s, cudaStreamNonBlocking) != cudaSuccess)
    return ::testing::AssertionFailure() << "cudaStreamCreateWithFlags";
  o->dev = std::make_unique<Tensors>(true, o->s);
  std::mt19937 rng(seed);
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  o->q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  o->k = o->dev->Put(Random(rng, OneLayerOnDevice::kPrompt * kv_row, dtype));
  o->v = o->dev->Put(Random(rng, OneLayerOnDevice::kPrompt * kv_row, dtype));
  o->k1 = o->dev->Put(Random(rng, kv_row, dtype));
  o->v1 = o->dev->Put(Random(rng, kv_row, dtype));
  o->q = o->dev->Put(Random(rng, o->q_row, dtype));
  o->out = o->dev->Out(o->q_row);
  if (cudaStreamSynchronize(o->s) != cudaSuccess)
    return ::testing::AssertionFailure() << "cudaStreamSynchronize";
  auto seq = o->rt->CreateSequence();
  if (!seq.ok()) return ::testing::AssertionFailure() << seq.status();
  o->seq = *seq;
  return ::testing::AssertionSuccess();
}
#endif

// A call on a stream that is being captured into a CUDA graph is refused before it enqueues
// anything (FailedPrecondition naming the graph), so the caller's capture stays valid and ends
// with an empty graph; outside the capture the same calls work.
TEST(GpuBackendGraph, CallsOnACapturingStreamAreRefusedAndTheCaptureStaysValid) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  OneLayerOnDevice o;
  ASSERT_TRUE(MakeOneLayerOnDevice(DType::kF32, 3, &o));
  Runtime& rt = *o.rt;
  const int prompt = OneLayerOnDevice::kPrompt;
  ASSERT_EQ(cudaStreamBeginCapture(o.s, cudaStreamCaptureModeRelaxed), cudaSuccess);
  const absl::Status prefill = rt.Prefill(o.seq, 0, nullptr, o.k, o.v, prompt, o.exec());
  const absl::Status attend = rt.Attend(o.seq, 0, o.q, o.out, o.exec());
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(o.s, &graph), cudaSuccess) << "the capture stayed valid";
  size_t nodes = 99;
  ASSERT_EQ(cudaGraphGetNodes(graph, nullptr, &nodes), cudaSuccess);
  EXPECT_EQ(nodes, 0u) << "nothing was enqueued";
  cudaGraphDestroy(graph);
  for (const absl::Status& st : {prefill, attend}) {
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_NE(std::string(st.message()).find("CUDA graph"), std::string::npos) << st;
  }
  EXPECT_EQ(*rt.SequenceLength(o.seq, 0), 0) << "the refused prefill stored nothing";
  ASSERT_TRUE(rt.Prefill(o.seq, 0, nullptr, o.k, o.v, prompt, o.exec()).ok());
  ASSERT_TRUE(rt.Attend(o.seq, 0, o.q, o.out, o.exec()).ok());
  EXPECT_TRUE(std::isfinite(o.dev->Get(o.out, o.q_row)[0]));
#endif
}

// An error that the caller's own CUDA call left unread on its thread (a failed cudaMalloc: not
// sticky) is not reported by kvrt's next call, whose launches are checked with cudaGetLastError.
TEST(GpuBackendErrors, ACallersUnreadErrorIsNotKvrts) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  OneLayerOnDevice o;
  ASSERT_TRUE(MakeOneLayerOnDevice(DType::kBF16, 5, &o));
  Runtime& rt = *o.rt;
  ASSERT_TRUE(rt.Prefill(o.seq, 0, nullptr, o.k, o.v, OneLayerOnDevice::kPrompt, o.exec()).ok());
  auto leave_an_error = [] {
    void* p = nullptr;
    ASSERT_NE(cudaMalloc(&p, std::size_t{1} << 50), cudaSuccess) << "1 PiB must fail";
  };
  leave_an_error();
  absl::Status st = rt.Append(o.seq, 0, o.k1, o.v1, 1, o.exec());
  EXPECT_TRUE(st.ok()) << "append after the caller's failed call: " << st;
  leave_an_error();
  st = rt.Attend(o.seq, 0, o.q, o.out, o.exec());
  EXPECT_TRUE(st.ok()) << "attend after the caller's failed call: " << st;
  EXPECT_TRUE(std::isfinite(o.dev->Get(o.out, o.q_row)[0]));
#endif
}

// A decoder that captures its own work into CUDA graphs on another thread, in the global mode
// (PyTorch's default), while kvrt works: a prefill whose clusters are built on the GPU in a
// background job, decode steps (the direct step, its admission jobs), then the sequence's release
// and the runtime's destruction. Every capture stays valid and replays, every kvrt call succeeds,
// and the outputs are those of a runtime that worked with no capture beside it. (Without kvrt's
// relaxed capture mode, KVRT_CAPTURE_RELAXED=0, the captures are invalidated by kvrt's
// allocations and waits.) The budget covers every cold token, so both runtimes attend exactly
// whatever clusters their builds made.
TEST(GpuBackendGraph, ACaptureOnAnotherThreadSurvivesKvrtsWork) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  RuntimeConfig cfg = MakeConfig({cpu_index::IndexKind::kCluster, true, DType::kBF16, "x"}, 1);
  cfg.record_attended = false;
  cfg.index.cluster.segment_tokens = 256;
  cfg.index.cluster.min_budget_tokens = 1 << 20;
  cfg.direct_step = true;
  cfg.hot_cache_fraction = 0.1f;
  const int prompt = Small() ? 700 : 1500, steps = Small() ? 8 : 24;
  const int L = cfg.num_layers;
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  // Every input and output in device memory before the captures start: while they run, this
  // thread makes kvrt's calls only.
  Tensors dev(true, s);
  std::mt19937 rng(41);
  struct LayerInput {
    const void *q, *k, *v;
  };
  std::vector<LayerInput> prompts;
  for (int l = 0; l < L; ++l)
    prompts.push_back({dev.Put(Random(rng, prompt * q_row, cfg.dtype)),
                       dev.Put(Random(rng, prompt * kv_row, cfg.dtype)),
                       dev.Put(Random(rng, prompt * kv_row, cfg.dtype))});
  std::vector<LayerInput> tokens;  // [step, layer]
  for (int i = 0; i < steps * L; ++i)
    tokens.push_back({dev.Put(Random(rng, q_row, cfg.dtype)),
                      dev.Put(Random(rng, kv_row, cfg.dtype)),
                      dev.Put(Random(rng, kv_row, cfg.dtype))});
  std::vector<float*> outs[2];
  for (auto& o : outs)
    for (int i = 0; i < steps * L; ++i) o.push_back(dev.Out(q_row));
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);

  // Run 0 alone; run 1 beside the captures.
  int64_t attends_direct = 0;
  for (int run = 0; run < 2; ++run) {
    std::atomic<bool> stop{false};
    std::atomic<int> captures{0}, failed{0};
    std::string first_failure;
    std::thread capturer;
    if (run == 1) {
      capturer = std::thread([&] {
        cudaStream_t cs = nullptr;
        void* target = nullptr;
        if (cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking) != cudaSuccess ||
            cudaMalloc(&target, 4) != cudaSuccess) {
          first_failure = "the capturing thread's setup";
          failed = 1;
          return;
        }
        while (!stop) {
          const int n = captures.load();
          cudaGraph_t graph = nullptr;
          cudaError_t e = cudaStreamBeginCapture(cs, cudaStreamCaptureModeGlobal);
          if (e == cudaSuccess) e = cudaMemsetAsync(target, n & 0xff, 4, cs);
          std::this_thread::sleep_for(std::chrono::microseconds(500));  // kvrt works meanwhile
          const cudaError_t ended = cudaStreamEndCapture(cs, &graph);
          if (e == cudaSuccess) e = ended;
          cudaGraphExec_t exec = nullptr;
          uint32_t got = 0;
          if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, graph, 0);
          if (e == cudaSuccess) e = cudaGraphLaunch(exec, cs);
          if (e == cudaSuccess) e = cudaMemcpyAsync(&got, target, 4, cudaMemcpyDeviceToHost, cs);
          if (e == cudaSuccess) e = cudaStreamSynchronize(cs);
          if (e == cudaSuccess && got != 0x01010101u * static_cast<uint32_t>(n & 0xff))
            e = cudaErrorUnknown;
          if (exec != nullptr) cudaGraphExecDestroy(exec);
          if (graph != nullptr) cudaGraphDestroy(graph);
          if (e != cudaSuccess) {
            (void)cudaGetLastError();
            if (failed++ == 0)
              first_failure = absl::StrCat("capture ", n, ": ", cudaGetErrorString(e));
          }
          captures++;
        }
        cudaFree(target);
        cudaStreamDestroy(cs);
      });
    }
    // The runtime and its sequence made beside the captures too (their streams, pools, events).
    auto rt = Runtime::Create(cfg);
    const int64_t seq = rt.ok() ? (*rt)->CreateSequence().value_or(-1) : -1;
    if (!rt.ok() || seq < 0) {
      stop = true;
      if (capturer.joinable()) capturer.join();
      FAIL() << "run " << run << ": " << rt.status();
    }
    const Exec exec{true, s};
    for (int l = 0; l < L; ++l) {
      const absl::Status st =
          (*rt)->Prefill(seq, l, prompts[l].q, prompts[l].k, prompts[l].v, prompt, exec);
      EXPECT_TRUE(st.ok()) << "prefill, layer " << l << ": " << st;
    }
    for (int step = 0; step < steps; ++step) {
      for (int l = 0; l < L; ++l) {
        const LayerInput& t = tokens[step * L + l];
        absl::Status st = (*rt)->Append(seq, l, t.k, t.v, 1, exec);
        if (st.ok()) st = (*rt)->Attend(seq, l, t.q, outs[run][step * L + l], exec);
        EXPECT_TRUE(st.ok()) << "step " << step << ", layer " << l << ": " << st;
      }
    }
    EXPECT_TRUE((*rt)->WaitSequence(seq).ok());
    const RuntimeStats stats = (*rt)->Stats();
    // The sequence released and the runtime destroyed beside the captures too (their device
    // memory, streams and pinned pools freed).
    EXPECT_TRUE((*rt)->ReleaseSequence(seq).ok());
    rt->reset();
    stop = true;
    if (capturer.joinable()) capturer.join();
    if (run == 1) {
      EXPECT_GT(captures.load(), 0);
      EXPECT_EQ(failed.load(), 0) << failed.load() << " of " << captures.load()
                                  << " captures failed; the first: " << first_failure;
    }
    EXPECT_GT(stats.segments_built_gpu, 0) << "run " << run << ": the prompt was built on the GPU";
    EXPECT_GT(stats.attends_direct, 0) << "run " << run << ": the direct step ran";
    if (run == 0) attends_direct = stats.attends_direct;
    if (run == 1) {
      EXPECT_EQ(stats.attends_direct, attends_direct) << "no step fell back";
    }
  }
  for (int i = 0; i < steps * L; ++i)
    ExpectClose(dev.Get(outs[1][i], q_row), dev.Get(outs[0][i], q_row),
                absl::StrCat("step ", i / L, " layer ", i % L));
  dev.Clear();
  cudaStreamDestroy(s);
#endif
}

// A prefill from device pointers enqueues its copies in the caller's stream order and returns:
// it does not wait for the work the caller queued before it (a decoder's prompt attention), so
// the caller queues its next layer while the device works. Here the stream is held by a host
// function until the prefill has returned (or 20 s have passed: then it waited, and fails).
TEST(GpuBackendCluster, DevicePrefillDoesNotWaitForTheCallersStream) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  RuntimeConfig cfg = MakeConfig({cpu_index::IndexKind::kCluster, true, DType::kBF16, "x"}, 1);
  cfg.num_layers = 1;
  cfg.record_attended = false;
  cfg.index.cluster.segment_tokens = 256;
  auto rt = Runtime::Create(cfg);
  ASSERT_TRUE(rt.ok()) << rt.status();
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  Tensors dev(true, s);
  std::mt19937 rng(17);
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  const int prompt = 1200;
  const void* q = dev.Put(Random(rng, prompt * q_row, cfg.dtype));
  const void* k = dev.Put(Random(rng, prompt * kv_row, cfg.dtype));
  const void* v = dev.Put(Random(rng, prompt * kv_row, cfg.dtype));
  const void* q1 = dev.Put(Random(rng, q_row, cfg.dtype));
  float* out = dev.Out(q_row);
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  const int64_t seq = *(*rt)->CreateSequence();

  struct Gate {
    std::mutex mu;
    std::condition_variable cv;
    bool open = false;
  } gate;
  auto hold = [](void* p) {
    auto* g = static_cast<Gate*>(p);
    std::unique_lock<std::mutex> lock(g->mu);
    g->cv.wait(lock, [g] { return g->open; });
  };
  ASSERT_EQ(cudaLaunchHostFunc(s, hold, &gate), cudaSuccess);
  auto prefill = std::async(std::launch::async, [&] {
    return (*rt)->Prefill(seq, 0, q, k, v, prompt, Exec{true, s});
  });
  const bool returned = prefill.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  {
    std::lock_guard<std::mutex> lock(gate.mu);
    gate.open = true;
  }
  gate.cv.notify_all();
  const absl::Status st = prefill.get();
  EXPECT_TRUE(returned) << "the prefill waited for the work queued before it";
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE((*rt)->WaitSequence(seq).ok());
  EXPECT_GT((*rt)->Stats().segments_built_gpu, 0) << "the prompt was built from the staging";
  ASSERT_TRUE((*rt)->Attend(seq, 0, q1, out, Exec{true, s}).ok());
  for (float x : dev.Get(out, q_row)) ASSERT_TRUE(std::isfinite(x));
  dev.Clear();
  cudaStreamDestroy(s);
#endif
}

// The summary counts against gpu_memory_limit: a limit that holds the tier but not the summary
// fails the attend with ResourceExhausted (KVRT_ERR_OUT_OF_MEMORY), naming the summary.
TEST(GpuBackendCluster, SummaryPastTheGpuLimitIsOutOfMemory) {
  if (!transfer::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  RuntimeConfig cfg = MakeConfig({cpu_index::IndexKind::kCluster, false, DType::kF32, "x"}, 1);
  cfg.num_layers = 1;
  cfg.index.cluster.segment_tokens = 256;
  const std::size_t kv_row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  // The tier's buffers (sinks + window, k and v, f32) and not much more.
  cfg.gpu_memory_limit =
      static_cast<int64_t>(2 * (cfg.sink_tokens + cfg.window_tokens) * kv_row * 4 + 1024);
  auto rt = Runtime::Create(cfg);
  ASSERT_TRUE(rt.ok()) << rt.status();
  std::mt19937 rng(5);
  const int prompt = 1200;
  auto q = Random(rng, prompt * cfg.num_q_heads * cfg.head_dim, DType::kF32);
  auto k = Random(rng, prompt * kv_row, DType::kF32);
  auto v = Random(rng, prompt * kv_row, DType::kF32);
  const int64_t seq = *(*rt)->CreateSequence();
  ASSERT_TRUE((*rt)->Prefill(seq, 0, q.data(), k.data(), v.data(), prompt).ok());
  std::vector<float> out(static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim);
  const auto st = (*rt)->Attend(seq, 0, q.data(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(std::string(st.message()).find("summary"), std::string::npos) << st;
}

}  // namespace
}  // namespace kvrt::runtime
