#include "tools/decode_harness.h"

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kvrt_common/dtype.h"
#include "oneapi/tbb/parallel_for.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvrt::cli {
namespace {

#if KVRT_WITH_CUDA
constexpr bool kCudaBuild = true;
#else
constexpr bool kCudaBuild = false;
#endif

double NowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

absl::Status KvrtError(kvrt_status s, const char* what) {
  return absl::InternalError(
      absl::StrCat(what, ": ", kvrt_status_string(s), " (", kvrt_last_error(), ")"));
}

#define HARNESS_CHECK(expr)                         \
  do {                                              \
    const kvrt_status s_ = (expr);                  \
    if (s_ != KVRT_OK) return KvrtError(s_, #expr); \
  } while (0)

// Device copies of the per-step rows and one stream per sequence (CUDA build, device pointers).
struct DeviceSide {
  std::vector<void*> allocs;
  std::vector<void*> streams;
  ~DeviceSide() {
#if KVRT_WITH_CUDA
    for (void* p : allocs) cudaFree(p);
    for (void* s : streams) cudaStreamDestroy(static_cast<cudaStream_t>(s));
#endif
  }
  // A device copy of `bytes` bytes of `src` (nullptr: uninitialised), or nullptr on failure.
  unsigned char* Copy(const void* src, std::size_t bytes) {
#if KVRT_WITH_CUDA
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) return nullptr;
    allocs.push_back(p);
    if (src != nullptr && cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      return nullptr;
    return static_cast<unsigned char*>(p);
#else
    (void)src, (void)bytes;
    return nullptr;
#endif
  }
  void* Stream() {
#if KVRT_WITH_CUDA
    cudaStream_t s;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) return nullptr;
    streams.push_back(s);
    return s;
#else
    return nullptr;
#endif
  }
};

void Sync(bool device, void* stream) {
#if KVRT_WITH_CUDA
  if (device) cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
#else
  (void)device, (void)stream;
#endif
}

bool CopyOut(bool device, const float* src, std::size_t n, float* dst) {
#if KVRT_WITH_CUDA
  if (device) return cudaMemcpy(dst, src, n * 4, cudaMemcpyDeviceToHost) == cudaSuccess;
#else
  (void)device;
#endif
  std::memcpy(dst, src, n * 4);
  return true;
}

}  // namespace

std::vector<int> CaptureSchedule(int warmup, int steps, int every, int max) {
  std::vector<int> out;
  for (int s = warmup; s < warmup + steps && static_cast<int>(out.size()) < max;
       s += std::max(1, every))
    out.push_back(s);
  return out;
}

absl::StatusOr<HarnessResult> RunDecodeHarness(const HarnessOptions& o, const BenchData& data) {
  HarnessResult res;
  const double t_setup = NowUs();
  const int batch = o.batch, layers = o.config.num_layers;
  if (data.steps < o.warmup + o.steps)
    return absl::InvalidArgumentError("bench: fewer decode rows than warm-up + measured steps");
  if (o.device && !kCudaBuild)
    return absl::InvalidArgumentError("--memory device needs a CUDA build");
  kvrt_runtime* rt = nullptr;
  HARNESS_CHECK(kvrt_runtime_create(&o.config, &rt));
  std::unique_ptr<kvrt_runtime, void (*)(kvrt_runtime*)> guard(rt, kvrt_runtime_destroy);
  const std::size_t q_row = data.q_row(), kv_row = data.kv_row();
  std::vector<kvrt_seq_id> seqs(batch);
  // --memory device: the prompt in device memory too (as a decoder's prefill leaves it), so the
  // prefill is timed with device pointers: the cluster kind then builds its segments on the GPU.
  DeviceSide prompt_dev;
  const void *pq = data.pq.empty() ? nullptr : data.pq.data(), *pk = data.pk.data(),
             *pv = data.pv.data();
  kvrt_exec prefill_exec = kvrt_exec_default();
  if (o.device) {
    pk = prompt_dev.Copy(data.pk.data(), data.pk.size());
    pv = prompt_dev.Copy(data.pv.data(), data.pv.size());
    if (pq != nullptr) pq = prompt_dev.Copy(data.pq.data(), data.pq.size());
    prefill_exec.memory = KVRT_MEMORY_DEVICE;
    prefill_exec.cuda_stream = prompt_dev.Stream();
    if (pk == nullptr || pv == nullptr || (!data.pq.empty() && pq == nullptr) ||
        prefill_exec.cuda_stream == nullptr)
      return absl::ResourceExhaustedError("CUDA allocation of the prompt failed");
  }
  const double t_prefill = NowUs();
  for (int b = 0; b < batch; ++b) {
    HARNESS_CHECK(kvrt_seq_create(rt, &seqs[b]));
    for (int l = 0; l < layers; ++l) {
      HARNESS_CHECK(kvrt_prefill_ex(rt, seqs[b], l, pq, pk, pv, data.prompt, &prefill_exec));
      Sync(o.device, prefill_exec.cuda_stream);
    }
  }
  res.prefill_ms = (NowUs() - t_prefill) / 1e3 / (static_cast<double>(batch) * layers);
  // Until the background work of those prefills (their index builds; with device pointers on the
  // GPU backend the cold rows' copies too) is done.
  for (int b = 0; b < batch; ++b) HARNESS_CHECK(kvrt_seq_wait(rt, seqs[b]));
  res.prefill_ready_ms = (NowUs() - t_prefill) / 1e3 / (static_cast<double>(batch) * layers);
  kvrt_get_stats(rt, &res.prefilled);
  const int rows = o.warmup + o.steps;
  const std::size_t out_floats = static_cast<std::size_t>(data.q_heads) * data.head_dim;
  // Batched q: for each step the B sequences' rows side by side, [rows, B, q_row].
  std::vector<unsigned char> bq_host(static_cast<std::size_t>(rows) * batch * q_row);
  for (int s = 0; s < rows; ++s)
    for (int b = 0; b < batch; ++b)
      std::memcpy(bq_host.data() + (static_cast<std::size_t>(s) * batch + b) * q_row,
                  data.dq.data() + s * q_row, q_row);
  const unsigned char *dk = data.dk.data(), *dv = data.dv.data(), *dq = data.dq.data(),
                      *bq = bq_host.data();
  std::vector<float> host_out(static_cast<std::size_t>(batch) * out_floats);
  float* out = host_out.data();  // [B, q_heads, d]
  std::vector<kvrt_exec> exec(batch, kvrt_exec_default());
  DeviceSide dev;
  if (o.device) {
    dk = dev.Copy(data.dk.data(), rows * kv_row);
    dv = dev.Copy(data.dv.data(), rows * kv_row);
    dq = dev.Copy(data.dq.data(), rows * q_row);
    bq = dev.Copy(bq_host.data(), bq_host.size());
    out = reinterpret_cast<float*>(dev.Copy(nullptr, host_out.size() * 4));
    if (!dk || !dv || !dq || !bq || !out)
      return absl::ResourceExhaustedError("CUDA allocation failed");
    for (auto& e : exec) {
      e.memory = KVRT_MEMORY_DEVICE;
      e.cuda_stream = dev.Stream();
      if (e.cuda_stream == nullptr) return absl::ResourceExhaustedError("CUDA stream failed");
    }
  }
  res.setup_s = (NowUs() - t_setup) / 1e6;

  // One layer-step of sequence b: append decode row `step`, attend (unless batched), wait.
  std::vector<double> append_us(batch, 0), sync_us(batch, 0);
  std::vector<kvrt_status> fail(batch, KVRT_OK);
  const bool batch_attend = o.batched && batch > 1;
  auto work = [&](int b, int layer, int step) {
    const double t0 = NowUs();
    kvrt_status s =
        kvrt_append_ex(rt, seqs[b], layer, dk + step * kv_row, dv + step * kv_row, 1, &exec[b]);
    const double t1 = NowUs();
    if (s == KVRT_OK && !batch_attend)
      s = kvrt_attend_ex(rt, seqs[b], layer, dq + step * q_row, out + b * out_floats, &exec[b]);
    const double t2 = NowUs();
    if (!o.pipeline) Sync(o.device, exec[b].cuda_stream);
    append_us[b] += t1 - t0;
    sync_us[b] += NowUs() - t2;
    if (s != KVRT_OK) fail[b] = s;
  };
  // Batch: one thread per sequence, released together for each layer-step (unless the calling
  // thread appends them all).
  int cur_layer = 0, cur_step = 0;
  bool stop = false;
  std::barrier start(batch + 1), done(batch + 1);
  std::vector<std::thread> workers;
  const bool serial = batch_attend && o.serial_appends;
  if (batch > 1 && !serial)
    for (int b = 0; b < batch; ++b)
      workers.emplace_back([&, b] {
        for (;;) {
          start.arrive_and_wait();
          if (stop) return;
          work(b, cur_layer, cur_step);
          done.arrive_and_wait();
        }
      });
  auto layer_step = [&](int layer, int step) {
    cur_layer = layer;
    cur_step = step;
    if (batch == 1) return work(0, layer, step);
    if (serial) {
      for (int b = 0; b < batch; ++b) work(b, layer, step);
    } else {
      start.arrive_and_wait();
      done.arrive_and_wait();
    }
    if (!batch_attend) return;
    const kvrt_status s =
        kvrt_attend_batch_ex(rt, seqs.data(), batch, layer,
                             bq + static_cast<std::size_t>(step) * batch * q_row, out, &exec[0]);
    const double t2 = NowUs();
    if (!o.pipeline) Sync(o.device, exec[0].cuda_stream);
    sync_us[0] += NowUs() - t2;
    if (s != KVRT_OK) fail[0] = s;
  };
  auto sync_all = [&] {
    const double t2 = NowUs();
    for (int b = 0; b < batch; ++b) Sync(o.device, exec[b].cuda_stream);
    sync_us[0] += NowUs() - t2;
  };
  // After a captured step's layer 0 (outside its timing): sequence 0's output and positions.
  auto capture = [&](int step) -> absl::Status {
    CapturedStep c;
    c.step = step;
    c.out.resize(out_floats);
    if (!CopyOut(o.device, out, out_floats, c.out.data()))
      return absl::InternalError("copying an output to the host failed");
    if (o.config.record_attended) {
      c.ids.resize(data.q_heads);
      for (int h = 0; h < data.q_heads; ++h) {
        int64_t count = 0;
        HARNESS_CHECK(kvrt_get_attended(rt, seqs[0], 0, h, nullptr, 0, &count));
        c.ids[h].resize(count);
        HARNESS_CHECK(kvrt_get_attended(rt, seqs[0], 0, h, c.ids[h].data(), count, &count));
      }
    }
    res.captured.push_back(std::move(c));
    return absl::OkStatus();
  };
  absl::Status status;
  double t_begin = NowUs();  // of the measured steps: --max-seconds counts no warm-up
  for (int step = 0; step < rows && status.ok(); ++step) {
    if (step == o.warmup) {
      t_begin = NowUs();
      kvrt_get_stats(rt, &res.begin);
      std::fill(append_us.begin(), append_us.end(), 0);
      std::fill(sync_us.begin(), sync_us.end(), 0);
    }
    const bool keep =
        std::find(o.capture_steps.begin(), o.capture_steps.end(), step) != o.capture_steps.end();
    const double t_step = NowUs();
    for (int l = 0; l < layers; ++l) {
      const double t0 = NowUs();
      layer_step(l, step);
      if (step >= o.warmup && !o.pipeline) res.latency_us.push_back(NowUs() - t0);
      if (l == 0 && keep && fail[0] == KVRT_OK) {
        if (o.pipeline) sync_all();
        status = capture(step);
      }
    }
    if (o.pipeline) {
      sync_all();
      if (step >= o.warmup && !keep) res.latency_us.push_back((NowUs() - t_step) / layers);
    }
    if (step >= o.warmup + 5 && (NowUs() - t_begin) / 1e6 > o.max_seconds) break;
  }
  if (!workers.empty()) {
    stop = true;
    start.arrive_and_wait();
    for (auto& w : workers) w.join();
  }
  for (int b = 0; b < batch; ++b) {
    if (fail[b] != KVRT_OK)
      return KvrtError(fail[b], absl::StrCat("sequence ", b, ": append/attend").c_str());
    res.append_us += append_us[b];
    res.sync_us += sync_us[b];
  }
  if (!status.ok()) return status;
  kvrt_get_stats(rt, &res.end);
  return res;
}

absl::StatusOr<AccuracySummary> ScoreCapturedSteps(const BenchData& data,
                                                   const std::vector<CapturedStep>& captured,
                                                   int top_k) {
  AccuracyAcc acc;
  if (captured.empty()) return acc.Summary();
  const int d = data.head_dim, H = data.q_heads, G = data.kv_heads, group = H / G;
  const float scale = data.scale > 0 ? data.scale : 1.f / std::sqrt(static_cast<float>(d));
  int last = 0;
  for (const auto& c : captured) last = std::max(last, c.step);
  const int64_t n_max = data.prompt + last + 1;
  const int C = static_cast<int>(captured.size());
  std::vector<HeadAccuracy> results(static_cast<std::size_t>(C) * H);
  std::vector<absl::Status> errors(results.size());
  std::vector<float> k(n_max * d), v(n_max * d);  // one kv head at a time, [n_max, d]
  for (int g = 0; g < G; ++g) {
    tbb::parallel_for(int64_t{0}, n_max, [&](int64_t i) {
      const bool prompt = i < data.prompt;
      const int64_t row = prompt ? i : i - data.prompt;
      const std::size_t off = (static_cast<std::size_t>(row) * G + g) * d * 2;
      ConvertToF32((prompt ? data.pk : data.dk).data() + off, DType::kBF16, d, &k[i * d]);
      ConvertToF32((prompt ? data.pv : data.dv).data() + off, DType::kBF16, d, &v[i * d]);
    });
    // A captured step's q heads of this kv head in one pass over its rows (each row read once for
    // all of them: the reference is memory-bound per head).
    tbb::parallel_for(0, C, [&](int cell) {
      const CapturedStep& c = captured[cell];
      const int h0 = g * group;
      const HeadRows rows{k.data(), v.data(), d, data.prompt + c.step + 1};
      std::vector<float> q(static_cast<std::size_t>(group) * d), o(q.size()), lse(group);
      std::vector<int32_t> top(static_cast<std::size_t>(group) * top_k);
      ConvertToF32(data.dq.data() + (static_cast<std::size_t>(c.step) * H + h0) * d * 2,
                   DType::kBF16, q.size(), q.data());
      ExactAttention(q.data(), group, rows, d, scale, top_k, o.data(), lse.data(), top.data());
      std::vector<uint8_t> mark(rows.n, 0);
      for (int j = 0; j < group; ++j) {
        const int h = h0 + j;
        const std::size_t at = static_cast<std::size_t>(cell) * H + h;
        if (c.ids.empty()) {  // without record_attended: the output error only
          errors[at] = absl::FailedPreconditionError("no attended positions were recorded");
          continue;
        }
        errors[at] =
            ScoreHead(&q[j * d], rows, d, scale, &o[j * d], lse[j], &top[j * top_k],
                      std::min<int64_t>(top_k, rows.n), c.ids[h].data(),
                      static_cast<int64_t>(c.ids[h].size()), &c.out[h * d], &mark, &results[at]);
      }
    });
  }
  for (std::size_t i = 0; i < results.size(); ++i) {
    if (!errors[i].ok())
      return absl::InternalError(absl::StrCat("accuracy of step ", captured[i / H].step,
                                              ", q head ", i % H, ": ", errors[i].message()));
    acc.Add(results[i]);
  }
  return acc.Summary();
}

}  // namespace kvrt::cli
