#include "tools/bench_data.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvrt_common/dtype.h"
#include "tools/cli_checks.h"
#include "tools/trace/trace.h"

namespace kvrt::cli {
namespace {

// Fast random bf16 in about N(0, 1/3) (sum of two uniforms), filled by several threads.
void FillRandom(std::vector<unsigned char>* out, uint64_t seed) {
  unsigned char* dst = out->data();
  const std::size_t n = out->size() / 2;
  const unsigned nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> th;
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
        ConvertFromF32(buf, len, DType::kBF16, dst + i * 2);
      }
    });
  }
  for (auto& x : th) x.join();
}

absl::Status Resize(BenchData* d, bool prompt_q) {
  try {
    if (prompt_q) d->pq.resize(d->prompt * d->q_row());
    d->pk.resize(d->prompt * d->kv_row());
    d->pv.resize(d->prompt * d->kv_row());
    d->dq.resize(d->steps * d->q_row());
    d->dk.resize(d->steps * d->kv_row());
    d->dv.resize(d->steps * d->kv_row());
  } catch (const std::exception&) {  // bad_alloc, or length_error past the vector's max_size
    const double bytes =
        static_cast<double>(d->prompt) * (2 * d->kv_row() + (prompt_q ? d->q_row() : 0)) +
        static_cast<double>(d->steps) * (2 * d->kv_row() + d->q_row());
    return absl::ResourceExhaustedError(absl::StrFormat(
        "out of memory allocating the benchmark's K/V/q in memory (%d prompt + %d decode rows: "
        "%.3g GB)",
        d->prompt, d->steps, bytes / 1e9));
  }
  return absl::OkStatus();
}

// dst (bf16, `rows` rows of `row_elems`) from src rows in `t`, row i = src row i % src_rows.
void TileRows(const trace::TensorView& src, int64_t src_rows, std::size_t row_elems, int64_t rows,
              std::vector<unsigned char>* dst) {
  std::vector<float> f(row_elems);
  const std::size_t src_row = row_elems * DTypeSize(src.dtype);
  for (int64_t i = 0; i < rows; ++i) {
    const auto* s = static_cast<const unsigned char*>(src.data) + (i % src_rows) * src_row;
    if (src.dtype == DType::kBF16) {
      std::memcpy(dst->data() + i * row_elems * 2, s, row_elems * 2);
    } else {
      ConvertToF32(s, src.dtype, row_elems, f.data());
      ConvertFromF32(f.data(), row_elems, DType::kBF16, dst->data() + i * row_elems * 2);
    }
  }
}

absl::StatusOr<BenchData> FromTrace(const BenchDataOptions& o, int64_t prompt, int steps) {
  auto reader = trace::TraceReader::Open(o.trace);
  if (!reader.ok()) return reader.status();
  const auto& m = (*reader)->meta();
  if (m.prompt_tokens == 0 || m.decode_steps == 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "--trace ", o.trace, ": needs prompt tokens and decode steps (has ", m.prompt_tokens,
        " and ", m.decode_steps, ")"));
  BenchData d;
  d.q_heads = m.num_q_heads;
  d.kv_heads = m.num_kv_heads;
  d.head_dim = m.head_dim;
  d.scale = m.scale;
  d.prompt = prompt;
  d.steps = steps;
  if (absl::Status st = Resize(&d, o.prompt_queries); !st.ok()) return st;
  const char* parts[6] = {"prefill.q", "prefill.k", "prefill.v", "decode.q", "decode.k", "decode.v"};
  std::vector<unsigned char>* dst[6] = {&d.pq, &d.pk, &d.pv, &d.dq, &d.dk, &d.dv};
  for (int i = 0; i < 6; ++i) {
    if (dst[i]->empty()) continue;
    auto t = (*reader)->Tensor(0, parts[i]);
    if (!t.ok()) return t.status();
    const int heads = i % 3 == 0 ? d.q_heads : d.kv_heads;
    TileRows(*t, i < 3 ? m.prompt_tokens : m.decode_steps,
             static_cast<std::size_t>(heads) * d.head_dim, i < 3 ? prompt : steps, dst[i]);
  }
  auto how = [](int64_t want, int64_t have, const char* what) {
    if (want == have) return absl::StrCat(have, " ", what);
    return absl::StrCat(want, " ", what, want < have ? " (truncated from " : " (tiled from ",
                        have, ")");
  };
  d.source = absl::StrCat("trace ", o.trace, " layer 0 (", m.model, "): ",
                          how(prompt, m.prompt_tokens, "prompt rows"), ", ",
                          how(steps, m.decode_steps, "decode rows"));
  return d;
}

}  // namespace

void AddBenchDataOptions(CLI::App* cmd, BenchDataOptions* o) {
  cmd->add_option("--keys", o->keys,
                  "K/V/q source: trace-like (kvrt gen-trace's generator at the benchmark's size: "
                  "topics, recency drift, sinks, needles) or random (no structure, unlike any "
                  "model's keys)")
      ->capture_default_str();
  cmd->add_option("--trace", o->trace,
                  "take K/V/q from this trace's layer 0 instead (its shape and scale replace "
                  "--q-heads/--kv-heads/--head-dim; rows truncated or tiled to the size, as the "
                  "output says)");
  cmd->add_option("--seed", o->seed, "trace-like: generator seed")
      ->capture_default_str()
      ->check(Unsigned());
  cmd->add_option("--needles", o->needles, "trace-like: needle tokens per kv head")
      ->capture_default_str();
  cmd->add_option("--prompt-queries", o->prompt_queries,
                  "hand the prompt's queries to kvrt_prefill (kinds that build from queries: "
                  "attention-aware, cluster); costs prompt x q heads x d x 2 bytes of memory")
      ->capture_default_str();
  cmd->add_option("--q-heads", o->q_heads, "q heads")->capture_default_str();
  cmd->add_option("--kv-heads", o->kv_heads, "kv heads")->capture_default_str();
  cmd->add_option("--head-dim", o->head_dim, "head dim")->capture_default_str();
}

absl::Status CheckBenchDataOptions(const BenchDataOptions& o) {
  if (!o.trace.empty()) return absl::OkStatus();
  if (o.keys != "random" && o.keys != "trace-like")
    return absl::InvalidArgumentError(
        absl::StrCat("--keys: '", o.keys, "' is not random or trace-like"));
  if (o.needles < 0 || o.needles > 30000)
    return absl::InvalidArgumentError(
        absl::StrCat("--needles must be in [0, 30000], got ", o.needles));
  if (o.q_heads <= 0 || o.kv_heads <= 0 || o.head_dim <= 0 || o.q_heads % o.kv_heads != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "--q-heads (", o.q_heads, ") must be a positive multiple of --kv-heads (", o.kv_heads,
        ") and --head-dim (", o.head_dim, ") positive"));
  // kvrt_runtime_create's limits (kvrt.h), named by option before any data is drawn.
  if (o.q_heads > 4096 || o.kv_heads > 1024 || o.head_dim > 1024)
    return absl::InvalidArgumentError(
        absl::StrCat("--q-heads (", o.q_heads, "), --kv-heads (", o.kv_heads, ") and --head-dim (",
                     o.head_dim, ") must be at most 4096, 1024 and 1024 (kvrt's limits)"));
  return absl::OkStatus();
}

absl::StatusOr<BenchData> MakeBenchData(const BenchDataOptions& o, int64_t prompt, int steps) {
  if (auto s = CheckBenchDataOptions(o); !s.ok()) return s;
  if (!o.trace.empty()) return FromTrace(o, prompt, steps);
  BenchData d;
  d.q_heads = o.q_heads;
  d.kv_heads = o.kv_heads;
  d.head_dim = o.head_dim;
  d.prompt = prompt;
  d.steps = steps;
  if (o.keys == "random") {
    if (absl::Status st = Resize(&d, false); !st.ok()) return st;
    FillRandom(&d.pk, 1 + prompt);
    FillRandom(&d.pv, 2 + prompt);
    FillRandom(&d.dk, 11);
    FillRandom(&d.dv, 12);
    FillRandom(&d.dq, 13);
    d.source = "random keys, values and queries (no structure; prefill without queries)";
    return d;
  }
  trace::GenOptions g;
  g.meta.num_layers = 1;
  g.meta.num_q_heads = o.q_heads;
  g.meta.num_kv_heads = o.kv_heads;
  g.meta.head_dim = o.head_dim;
  g.meta.dtype = DType::kBF16;
  g.meta.prompt_tokens = prompt;
  g.meta.decode_steps = steps;
  g.seed = o.seed;
  g.needles = o.needles;
  g.show_progress = prompt >= (1 << 19);
  g.prefill_queries = o.prompt_queries;
  absl::Status st = trace::GenerateLayers(g, [&](int, trace::LayerTensors& t) {
    d.pq = std::move(t.part[0]);
    d.pk = std::move(t.part[1]);
    d.pv = std::move(t.part[2]);
    d.dq = std::move(t.part[3]);
    d.dk = std::move(t.part[4]);
    d.dv = std::move(t.part[5]);
    return absl::OkStatus();
  });
  if (!st.ok()) return st;
  d.source = absl::StrFormat(
      "trace-like: kvrt gen-trace's generator, seed %d, %d needles per kv head, %d prompt + %d "
      "decode rows%s",
      o.seed, o.needles, prompt, steps, o.prompt_queries ? "" : " (prefill without queries)");
  return d;
}

}  // namespace kvrt::cli
