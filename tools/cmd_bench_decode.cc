// kvrt bench decode: per layer-step latency of the decode path (append 1 token + attend, for B
// sequences) on synthetic random KV, through the public C API, with the split of each step from
// kvrt_stats' timing counters (GPU attention, D2H, CPU search, CPU attention, H2D, merge, idle).
//
// Shape defaults to an 8B model layer (32 q / 8 kv heads, d=128, bf16), sinks 4, window 2048,
// top-k 100. Each (sequence, layer) is prefilled with sinks + cold + window tokens, so exactly
// `cold` tokens sit in the host store. Random keys: the latency of a search does not depend much
// on the data for flat/landmark; accuracy is measured by `kvrt replay` / `bench index`, not here.
#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kvrt.h"
#include "kvrt_common/dtype.h"
#include "tools/command.h"
#include "tools/replay.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

struct BenchDecodeArgs {
  std::string cold = "4096,32768,131072,524288,1048576", batch = "1,16", indexes = "flat,landmark";
  std::string memory = "device", csv, cold_attention = "cpu", attend = "threads";
  int layers = 2, steps = 30, warmup = 3, sinks = 4, window = 2048, top_k = 100, threads = 0;
  int q_heads = 32, kv_heads = 8, head_dim = 128, effort = 0, use_gpu = 1, group_search = 0;
  int64_t max_cold_batch = 131072;  // batch > 1 only up to this cold size (host memory)
  double max_seconds = 20;          // measured time per configuration, at least 5 steps
};

std::vector<int64_t> SplitInts(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(std::stoll(item));
  return out;
}
std::vector<std::string> SplitStrs(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

double NowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Fast random bf16/f16/f32 in about N(0, 1/3) (sum of two uniforms), filled by several threads.
void FillRandom(unsigned char* dst, std::size_t n, kvrt::DType t, uint64_t seed) {
  const unsigned nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> th;
  const std::size_t es = kvrt::DTypeSize(t);
  for (unsigned w = 0; w < nt; ++w) {
    th.emplace_back([=] {
      const std::size_t b = n * w / nt, e = n * (w + 1) / nt;
      uint64_t x = seed * 0x9E3779B97F4A7C15ull + w + 1;
      float buf[256];
      for (std::size_t i = b; i < e; i += 256) {
        const std::size_t len = std::min<std::size_t>(256, e - i);
        for (std::size_t j = 0; j < len; ++j) {
          x ^= x << 13, x ^= x >> 7, x ^= x << 17;
          const float u1 = static_cast<float>(x & 0xffffff) / 16777216.f;
          const float u2 = static_cast<float>((x >> 24) & 0xffffff) / 16777216.f;
          buf[j] = u1 + u2 - 1.f;
        }
        kvrt::ConvertFromF32(buf, len, t, dst + i * es);
      }
    });
  }
  for (auto& x : th) x.join();
}

struct Row {
  std::string index;
  int64_t cold = 0;
  int batch = 0;
  int samples = 0;
  double p50 = 0, p99 = 0, mean = 0;  // us per layer-step (all B sequences)
  // Mean per attend (one sequence), us.
  double gpu_attn = 0, d2h = 0, search = 0, cpu_attn = 0, h2d = 0, merge = 0, idle = 0, attend = 0;
  double append = 0;                 // mean append call, us
  double gpu_mib_per_seq_layer = 0;  // GPU-tier buffers per (sequence, layer)
  double scanned = 0;                // keys scored / cold keys searchable
  double fetch_share = 0;            // share of layer attends run in fetch mode
  bool batched = false;              // kvrt_attend_batch for the B sequences
  double setup_s = 0;
};

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t i = std::min(v.size() - 1, static_cast<std::size_t>(p * v.size()));
  return v[i];
}

#define CHECK_KVRT(expr)                                                                      \
  do {                                                                                        \
    kvrt_status s_ = (expr);                                                                  \
    if (s_ != KVRT_OK) {                                                                      \
      std::fprintf(stderr, "kvrt bench decode: %s: %s (%s)\n", #expr, kvrt_status_string(s_), \
                   kvrt_last_error());                                                        \
      return false;                                                                           \
    }                                                                                         \
  } while (0)

// One configuration: index kind, cold size, batch.
// batched: B > 1 sequences attend through one kvrt_attend_batch_ex call per layer-step (their
// appends still come from one thread each); else one thread per sequence appends and attends.
bool RunOne(const BenchDecodeArgs& a, kvrt_index_kind kind, const std::string& kind_name,
            kvrt_cold_attention mode, bool batched, int64_t cold, int batch, bool device,
            Row* row) {
  const double t_setup = NowUs();
  kvrt_config c = kvrt_config_default();
  c.num_layers = a.layers;
  c.num_q_heads = a.q_heads;
  c.num_kv_heads = a.kv_heads;
  c.head_dim = a.head_dim;
  c.dtype = KVRT_DTYPE_BF16;
  c.sink_tokens = a.sinks;
  c.window_tokens = a.window;
  c.top_k = a.top_k;
  c.index_kind = kind;
  c.search_effort = a.effort;
  c.worker_threads = a.threads;
  c.use_gpu = a.use_gpu;
  c.check_finite = 0;
  c.group_search = a.group_search;
  c.cold_attention = mode;
  kvrt_runtime* rt = nullptr;
  CHECK_KVRT(kvrt_runtime_create(&c, &rt));
  std::unique_ptr<kvrt_runtime, void (*)(kvrt_runtime*)> guard(rt, kvrt_runtime_destroy);
  const kvrt::DType dt = kvrt::DType::kBF16;
  const std::size_t kv_row = static_cast<std::size_t>(a.kv_heads) * a.head_dim * 2;
  const std::size_t q_row = static_cast<std::size_t>(a.q_heads) * a.head_dim * 2;
  const int64_t prompt = a.sinks + cold + a.window;
  std::vector<kvrt_seq_id> seqs(batch);
  {
    // One prompt buffer reused for every (sequence, layer): each copy lands in its own store.
    std::vector<unsigned char> k(prompt * kv_row), v(prompt * kv_row);
    FillRandom(k.data(), k.size() / 2, dt, 1 + cold);
    FillRandom(v.data(), v.size() / 2, dt, 2 + cold);
    for (int b = 0; b < batch; ++b) {
      CHECK_KVRT(kvrt_seq_create(rt, &seqs[b]));
      for (int l = 0; l < a.layers; ++l)
        CHECK_KVRT(kvrt_prefill(rt, seqs[b], l, nullptr, k.data(), v.data(), prompt));
    }
  }
  // Per-step inputs: a few distinct ones, rotated.
  constexpr int kInputs = 16;
  std::vector<unsigned char> hk(kInputs * kv_row), hv(kInputs * kv_row), hq(kInputs * q_row);
  FillRandom(hk.data(), hk.size() / 2, dt, 11);
  FillRandom(hv.data(), hv.size() / 2, dt, 12);
  FillRandom(hq.data(), hq.size() / 2, dt, 13);
  const std::size_t out_floats = static_cast<std::size_t>(a.q_heads) * a.head_dim;
  struct PerSeq {
    const unsigned char *k = nullptr, *v = nullptr, *q = nullptr;
    float* out = nullptr;
    std::vector<float> host_out;
    void* stream = nullptr;
    kvrt_exec exec = kvrt_exec_default();
  };
  std::vector<PerSeq> ps(batch);
  std::vector<void*> dev_allocs;
#if KVRT_WITH_CUDA
  if (device) {
    for (int b = 0; b < batch; ++b) {
      void *dk, *dv, *dq, *dout;
      cudaStream_t s;
      if (cudaMalloc(&dk, hk.size()) || cudaMalloc(&dv, hv.size()) || cudaMalloc(&dq, hq.size()) ||
          cudaMalloc(&dout, out_floats * 4) ||
          cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) {
        std::fprintf(stderr, "kvrt bench decode: CUDA allocation failed\n");
        return false;
      }
      cudaMemcpy(dk, hk.data(), hk.size(), cudaMemcpyHostToDevice);
      cudaMemcpy(dv, hv.data(), hv.size(), cudaMemcpyHostToDevice);
      cudaMemcpy(dq, hq.data(), hq.size(), cudaMemcpyHostToDevice);
      dev_allocs.insert(dev_allocs.end(), {dk, dv, dq, dout});
      ps[b].k = static_cast<unsigned char*>(dk);
      ps[b].v = static_cast<unsigned char*>(dv);
      ps[b].q = static_cast<unsigned char*>(dq);
      ps[b].out = static_cast<float*>(dout);
      ps[b].stream = s;
      ps[b].exec.memory = KVRT_MEMORY_DEVICE;
      ps[b].exec.cuda_stream = s;
    }
  }
#else
  if (device) {
    std::fprintf(stderr, "kvrt bench decode: --memory device needs a CUDA build\n");
    return false;
  }
#endif
  if (!device) {
    for (auto& p : ps) {
      p.k = hk.data();
      p.v = hv.data();
      p.q = hq.data();
      p.host_out.resize(out_floats);
      p.out = p.host_out.data();
    }
  }
  // Batched attend: q rows [kInputs + batch] (row j = input j % kInputs, so rows i0 .. i0 + B - 1
  // are the B sequences' inputs of a step) and out [batch, q_heads, d].
  std::vector<unsigned char> hq_cyclic((kInputs + batch) * q_row);
  for (int j = 0; j < kInputs + batch; ++j)
    std::memcpy(hq_cyclic.data() + j * q_row, hq.data() + (j % kInputs) * q_row, q_row);
  const unsigned char* bq = hq_cyclic.data();
  std::vector<float> host_bout(static_cast<std::size_t>(batch) * out_floats);
  float* bout = host_bout.data();
  kvrt_exec bexec = kvrt_exec_default();
#if KVRT_WITH_CUDA
  if (device && batched) {
    void *dq, *dout;
    if (cudaMalloc(&dq, hq_cyclic.size()) || cudaMalloc(&dout, host_bout.size() * 4)) {
      std::fprintf(stderr, "kvrt bench decode: CUDA allocation failed\n");
      return false;
    }
    cudaMemcpy(dq, hq_cyclic.data(), hq_cyclic.size(), cudaMemcpyHostToDevice);
    dev_allocs.insert(dev_allocs.end(), {dq, dout});
    bq = static_cast<unsigned char*>(dq);
    bout = static_cast<float*>(dout);
    bexec = ps[0].exec;
  }
#endif
  row->setup_s = (NowUs() - t_setup) / 1e6;

  // One layer-step of sequence b: append 1 token, attend, wait for out.
  std::vector<double> append_us(batch, 0), sync_us(batch, 0);
  std::vector<kvrt_status> fail(batch, KVRT_OK);
  const bool batch_attend = batched && batch > 1;
  auto work = [&](int b, int layer, int step) {
    auto& p = ps[b];
    const int i = (step * 7 + layer * 3 + b) % kInputs;
    const double t0 = NowUs();
    kvrt_status s =
        kvrt_append_ex(rt, seqs[b], layer, p.k + i * kv_row, p.v + i * kv_row, 1, &p.exec);
    const double t1 = NowUs();
    if (s == KVRT_OK && !batch_attend)
      s = kvrt_attend_ex(rt, seqs[b], layer, p.q + i * q_row, p.out, &p.exec);
    const double t2 = NowUs();
#if KVRT_WITH_CUDA
    if (device) cudaStreamSynchronize(static_cast<cudaStream_t>(p.stream));
#endif
    append_us[b] += t1 - t0;
    sync_us[b] += NowUs() - t2;
    if (s != KVRT_OK) fail[b] = s;
  };
  // Batch: one thread per sequence, released together for each layer-step.
  int cur_layer = 0, cur_step = 0;
  bool stop = false;
  std::barrier start(batch + 1), done(batch + 1);
  std::vector<std::thread> workers;
  if (batch > 1) {
    for (int b = 0; b < batch; ++b)
      workers.emplace_back([&, b] {
        for (;;) {
          start.arrive_and_wait();
          if (stop) return;
          work(b, cur_layer, cur_step);
          done.arrive_and_wait();
        }
      });
  }
  auto layer_step = [&](int layer, int step) {
    cur_layer = layer;
    cur_step = step;
    if (batch == 1) {
      work(0, layer, step);
    } else {
      start.arrive_and_wait();
      done.arrive_and_wait();
      if (batch_attend) {
        const int i0 = (step * 7 + layer * 3) % kInputs;
        const kvrt_status s =
            kvrt_attend_batch_ex(rt, seqs.data(), batch, layer, bq + i0 * q_row, bout, &bexec);
        const double t2 = NowUs();
#if KVRT_WITH_CUDA
        if (device) cudaStreamSynchronize(static_cast<cudaStream_t>(bexec.cuda_stream));
#endif
        sync_us[0] += NowUs() - t2;
        if (s != KVRT_OK) fail[0] = s;
      }
    }
  };
  std::vector<double> lat;
  kvrt_stats s0 = kvrt_stats_init(), s1 = kvrt_stats_init();
  double append_total = 0, sync_total = 0;
  const double t_begin = NowUs();
  int step = 0;
  for (; step < a.warmup + a.steps; ++step) {
    if (step == a.warmup) {
      kvrt_get_stats(rt, &s0);
      std::fill(append_us.begin(), append_us.end(), 0);
      std::fill(sync_us.begin(), sync_us.end(), 0);
    }
    for (int l = 0; l < a.layers; ++l) {
      const double t0 = NowUs();
      layer_step(l, step);
      if (step >= a.warmup) lat.push_back(NowUs() - t0);
    }
    if (step >= a.warmup + 5 && (NowUs() - t_begin) / 1e6 > a.max_seconds) {
      ++step;
      break;
    }
  }
  if (batch > 1) {
    stop = true;
    start.arrive_and_wait();
    for (auto& w : workers) w.join();
  }
  for (int b = 0; b < batch; ++b) {
    if (fail[b] != KVRT_OK) {
      std::fprintf(stderr, "kvrt bench decode: sequence %d: %s (%s)\n", b,
                   kvrt_status_string(fail[b]), kvrt_last_error());
      return false;
    }
    append_total += append_us[b];
    sync_total += sync_us[b];
  }
  kvrt_get_stats(rt, &s1);
  const double attends = static_cast<double>(s1.attend_calls - s0.attend_calls);
  auto per = [&](int64_t a1, int64_t a0) { return attends > 0 ? (a1 - a0) / 1e3 / attends : 0.0; };
  row->index = row->batched ? kind_name + "/batch" : kind_name;
  row->cold = cold;
  row->batch = batch;
  row->samples = static_cast<int>(lat.size());
  row->p50 = Pct(lat, 0.5);
  row->p99 = Pct(lat, 0.99);
  double sum = 0;
  for (double x : lat) sum += x;
  row->mean = lat.empty() ? 0 : sum / lat.size();
  row->attend = per(s1.time_attend_ns, s0.time_attend_ns);
  row->gpu_attn = per(s1.time_gpu_attention_ns, s0.time_gpu_attention_ns);
  row->d2h = per(s1.time_d2h_ns, s0.time_d2h_ns);
  row->search = per(s1.time_cpu_search_ns, s0.time_cpu_search_ns);
  row->cpu_attn = per(s1.time_cpu_attention_ns, s0.time_cpu_attention_ns);
  row->h2d = per(s1.time_h2d_ns, s0.time_h2d_ns);
  row->merge = per(s1.time_merge_ns, s0.time_merge_ns);
  // Idle: the CPU waiting for the GPU after the CPU side (inside attend for host output, in the
  // bench's stream synchronisation for device output).
  row->idle = per(s1.time_idle_ns, s0.time_idle_ns) + (attends > 0 ? sync_total / attends : 0);
  row->append = attends > 0 ? append_total / attends : 0;
  row->gpu_mib_per_seq_layer =
      static_cast<double>(s1.gpu_allocated_bytes) / (batch * a.layers) / (1 << 20);
  const double searchable = static_cast<double>(s1.cold_keys_searchable - s0.cold_keys_searchable);
  row->scanned = searchable > 0 ? (s1.keys_scored - s0.keys_scored) / searchable : 0;
  const double layer_attends = static_cast<double>(s1.attend_calls - s0.attend_calls);
  row->fetch_share = layer_attends > 0 ? (s1.attends_fetch - s0.attends_fetch) / layer_attends : 0;
#if KVRT_WITH_CUDA
  for (void* p : dev_allocs) cudaFree(p);
  for (auto& p : ps)
    if (p.stream) cudaStreamDestroy(static_cast<cudaStream_t>(p.stream));
#endif
  return true;
}

int Run(const BenchDecodeArgs& a) {
  std::vector<int64_t> colds, batches;
  try {
    colds = SplitInts(a.cold);
    batches = SplitInts(a.batch);
  } catch (...) {
    std::fprintf(stderr, "kvrt bench decode: --cold and --batch take comma-separated integers\n");
    return 2;
  }
  std::vector<std::pair<kvrt_index_kind, std::string>> kinds;
  for (const auto& name : SplitStrs(a.indexes)) {
    auto k = kvrt::cli::ParseIndexKindOption(name);
    if (!k.ok()) {
      std::fprintf(stderr, "kvrt bench decode: %s\n", std::string(k.status().message()).c_str());
      return 2;
    }
    kinds.emplace_back(*k, name);
  }
  std::vector<std::pair<kvrt_cold_attention, std::string>> modes;
  for (const auto& name : SplitStrs(a.cold_attention)) {
    if (name == "cpu") {
      modes.emplace_back(KVRT_COLD_CPU, name);
    } else if (name == "fetch") {
      modes.emplace_back(KVRT_COLD_FETCH, name);
    } else if (name == "auto") {
      modes.emplace_back(KVRT_COLD_AUTO, name);
    } else {
      std::fprintf(stderr, "kvrt bench decode: --cold-attention: '%s' is not cpu, fetch or auto\n",
                   name.c_str());
      return 2;
    }
  }
  if (a.memory != "device" && a.memory != "host") {
    std::fprintf(stderr, "kvrt bench decode: --memory is device or host\n");
    return 2;
  }
  const bool device = a.memory == "device" && a.use_gpu != 0;
  std::printf(
      "kvrt bench decode: %d q / %d kv heads, d=%d, bf16, sinks %d, window %d, top-k %d, %d "
      "layers, "
      "%s pointers, use_gpu %d, group_search %d, %u hardware threads\n",
      a.q_heads, a.kv_heads, a.head_dim, a.sinks, a.window, a.top_k, a.layers,
      device ? "device" : "host", a.use_gpu, a.group_search, std::thread::hardware_concurrency());
  std::printf(
      "per layer-step (B sequences: append 1 token + attend each); split = mean per attend, us\n");
  std::printf("%-16s %5s %8s %3s %5s %9s %9s | %8s %7s %8s %8s %7s %7s %7s %8s | %7s %9s %8s %6s\n",
              "index", "cold_attn", "cold", "B", "n", "p50_us", "p99_us", "gpu_attn", "d2h",
              "search", "cpu_attn", "h2d", "merge", "idle", "attend", "append", "GPU_MiB/sl",
              "scanned", "fetch");
  std::string csv =
      "index,cold_attention,cold,batch,samples,p50_us,p99_us,mean_us,gpu_attn_us,d2h_us,cpu_search_"
      "us,cpu_attn_us,"
      "h2d_us,merge_us,idle_us,attend_us,append_us,gpu_mib_per_seq_layer,scanned_fraction,fetch_"
      "share,setup_s\n";
  int rc = 0;
  std::vector<bool> attend_modes;
  for (const auto& m : SplitStrs(a.attend)) {
    if (m != "threads" && m != "batch") {
      std::fprintf(stderr, "kvrt bench decode: --attend: '%s' is not threads or batch\n",
                   m.c_str());
      return 2;
    }
    attend_modes.push_back(m == "batch");
  }
  for (const auto& [kind, name] : kinds)
    for (const auto& [mode, mode_name] : modes)
      for (bool batched : attend_modes) {
        for (int64_t batch : batches) {
          for (int64_t cold : colds) {
            if (batch > 1 && cold > a.max_cold_batch) continue;
            if (batched && batch == 1) continue;  // the same as one thread
            Row r;
            r.batched = batched;
            if (!RunOne(a, kind, name, mode, batched, cold, static_cast<int>(batch), device, &r)) {
              rc = 1;
              continue;
            }
            std::printf(
                "%-16s %9s %8lld %3d %5d %9.1f %9.1f | %8.1f %7.1f %8.1f %8.1f %7.1f %7.1f %7.1f "
                "%8.1f | %7.1f %9.2f %8.4f %6.2f\n",
                r.index.c_str(), mode_name.c_str(), static_cast<long long>(r.cold), r.batch,
                r.samples, r.p50, r.p99, r.gpu_attn, r.d2h, r.search, r.cpu_attn, r.h2d, r.merge,
                r.idle, r.attend, r.append, r.gpu_mib_per_seq_layer, r.scanned, r.fetch_share);
            std::fflush(stdout);
            char line[512];
            std::snprintf(line, sizeof line,
                          "%s,%s,%lld,%d,%d,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,"
                          "%.1f,%.3f,%.5f,%.3f,%.1f\n",
                          r.index.c_str(), mode_name.c_str(), static_cast<long long>(r.cold),
                          r.batch, r.samples, r.p50, r.p99, r.mean, r.gpu_attn, r.d2h, r.search,
                          r.cpu_attn, r.h2d, r.merge, r.idle, r.attend, r.append,
                          r.gpu_mib_per_seq_layer, r.scanned, r.fetch_share, r.setup_s);
            csv += line;
          }
        }
      }
  if (!a.csv.empty()) {
    std::ofstream f(a.csv);
    f << csv;
    if (!f) {
      std::fprintf(stderr, "kvrt bench decode: cannot write %s\n", a.csv.c_str());
      rc = 1;
    }
  }
  return rc;
}

}  // namespace

KVRT_REGISTER_COMMAND("bench decode", [](CLI::App& app, int* exit_code) {
  auto* bench = kvrt::cli::GetOrAddGroup(app, "bench", "Benchmarks (speed and quality; not tests)");
  auto args = std::make_shared<BenchDecodeArgs>();
  auto* cmd = bench->add_subcommand(
      "decode",
      "Decode-path latency per layer-step on synthetic random KV (no trace): B sequences each "
      "append 1 token and attend, for every cold size, batch and index kind; p50/p99 and the split "
      "(GPU attention, D2H, CPU search, CPU attention, H2D, merge, idle), GPU memory per "
      "(sequence, layer). Needs the GPU backend unless --gpu 0.");
  cmd->add_option("--cold", args->cold, "comma-separated cold (host store) token counts")
      ->capture_default_str();
  cmd->add_option("--batch", args->batch, "comma-separated batch sizes (sequences per layer-step)")
      ->capture_default_str();
  cmd->add_option("--index", args->indexes, "comma-separated index kinds")->capture_default_str();
  cmd->add_option("--memory", args->memory, "device or host pointers for q, k, v, out")
      ->capture_default_str();
  cmd->add_option("--gpu", args->use_gpu, "config.use_gpu (1, 0 or -1)")->capture_default_str();
  cmd->add_option("--layers", args->layers, "layers (each with its own KV)")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  cmd->add_option("--steps", args->steps, "measured decode steps")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  cmd->add_option("--warmup", args->warmup, "unmeasured steps first")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000));
  cmd->add_option("--max-seconds", args->max_seconds,
                  "measured time per configuration (>= 5 steps)")
      ->capture_default_str();
  cmd->add_option("--max-cold-batch", args->max_cold_batch, "largest cold size run with batch > 1")
      ->capture_default_str();
  cmd->add_option("--sinks", args->sinks, "sink tokens")->capture_default_str();
  cmd->add_option("--window", args->window, "window tokens")->capture_default_str();
  cmd->add_option("--top-k", args->top_k, "top-k")->capture_default_str();
  cmd->add_option("--effort", args->effort, "search effort (0 = the kind's default)")
      ->capture_default_str();
  cmd->add_option("--attend", args->attend,
                  "comma-separated ways B > 1 sequences attend: threads (one caller thread per "
                  "sequence, kvrt_attend_ex) and/or batch (one kvrt_attend_batch_ex call)")
      ->capture_default_str();
  cmd->add_option(
         "--cold-attention", args->cold_attention,
         "comma-separated config.cold_attention modes to compare: cpu (CPU attention over "
         "the retrieved rows), fetch (rows copied H2D, attended on the GPU), auto (per layer, "
         "the cheaper one as measured)")
      ->capture_default_str();
  cmd->add_option(
         "--group-search", args->group_search,
         "config.group_search: 1 = one index search per kv head for its q heads, 0 = per q head")
      ->capture_default_str()
      ->check(CLI::Range(0, 1));
  cmd->add_option("--threads", args->threads, "CPU worker threads (0 = all)")
      ->capture_default_str();
  cmd->add_option("--q-heads", args->q_heads, "q heads")->capture_default_str();
  cmd->add_option("--kv-heads", args->kv_heads, "kv heads")->capture_default_str();
  cmd->add_option("--head-dim", args->head_dim, "head dim")->capture_default_str();
  cmd->add_option("--csv", args->csv, "write the table as CSV");
  cmd->callback([args, exit_code] { *exit_code = Run(*args); });
});
