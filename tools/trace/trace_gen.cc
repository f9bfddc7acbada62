// Synthetic trace generator (docs/traces.md explains every component and how it was tuned).
//
// Per (layer, kv head) the generator draws a "plan" (mean directions, topic directions, needle
// directions and positions, a nuisance channel set) and then fills the tensors in chunks of
// positions, each chunk with its own random stream keyed by (seed, layer, kv head, chunk): the
// bytes depend on the seed only, never on the thread count or the scheduling.
//
// All magnitudes are set in "score units": the contribution a pair of components makes to the
// scaled score q.k * scale. A key component of norm a along direction e and a query component of
// norm b along e add a*b*scale, so a target contribution s is split as a = sqrt(s/scale) * r,
// b = sqrt(s/scale) / r.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <new>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvrt_common/status_macros.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"
#include "tools/trace/trace.h"

namespace kvrt::trace {
namespace {

// ---- randomness -------------------------------------------------------------------------------

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Seed of the stream (tag, a, b, c) of a trace seed: distinct inputs give unrelated streams.
uint64_t StreamSeed(uint64_t seed, uint64_t tag, uint64_t a, uint64_t b = 0, uint64_t c = 0) {
  uint64_t h = SplitMix64(seed ^ 0x6b7672742d747263ull);
  for (uint64_t v : {tag, a, b, c}) h = SplitMix64(h ^ v);
  return h;
}

// xoshiro256** with a Box-Muller normal; fast enough for ~10^9 draws per minute per core.
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (auto& w : s_) w = seed = SplitMix64(seed);
  }
  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }  // [0, 1)
  int Below(int n) { return static_cast<int>(Uniform() * n); }
  // NOTE: the bulk noise (~10^9 draws for a 32K-token, 4-layer trace) uses the Irwin-Hall sum of
  // four 16-bit uniforms from one 64-bit draw: unit variance, tails cut at 3.46 sigma, several
  // times faster than Box-Muller. Directions and anything structural use Normal().
  float FastNormal() {
    const uint64_t x = Next();
    const uint32_t sum = static_cast<uint32_t>((x & 0xffff) + ((x >> 16) & 0xffff) +
                                               ((x >> 32) & 0xffff) + (x >> 48));
    return (static_cast<float>(sum) - 131070.f) * (1.7320508f / 65536.f);
  }
  float Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(Next() >> 11) + 0.5) * 0x1.0p-53;  // (0, 1)
    const double u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double a = 6.283185307179586 * u2;
    spare_ = static_cast<float>(r * std::sin(a));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(a));
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
  float spare_ = 0;
  bool has_spare_ = false;
};

enum StreamTag : uint64_t { kTagGlobal = 1, kTagPlan, kTagChunk, kTagDrift };

// ---- knobs ------------------------------------------------------------------------------------

// NOTE: tuned with `kvrt inspect --attention` on 32K-token traces (docs/traces.md has the
// numbers); change them together with that measurement, not alone.
struct Knobs {
  int sink_tokens = 4;
  float sink_score[4] = {11.5f, 10.f, 9.5f, 9.f};  // sink key . query mean, score units
  float topic_score = 6.0f;     // a query's preferred topic (weight 1), per key of the topic
  float topic_salience = 0.2f;  // relative spread of a key's topic component (heavy top)
  float extra_topic_weight = 0.75f;
  float drift_score = 5.5f;        // recency: same-position key and query, decays with distance
  float drift_tau = 192.f;         // correlation length of the drift, tokens
  float needle_score = 13.f;       // a needle query's component along its needle key
  float bulk_noise_score = 1.0f;   // std of the score noise a key's isotropic noise adds
  float query_noise_score = 0.3f;  // std of the score noise a q head's own noise adds
  float key_mean_norm = 1.0f;      // |mu_k| / sqrt(sqrt(d))-free units: multiples of sqrt(d)
  float query_mean_norm = 1.6f;    // |mu_q| in multiples of sqrt(d)
  float head_offset = 0.3f;        // per q head static offset, relative to |mu_q|
  float nuisance_center = 1.2f;    // key norm on nuisance channels, multiples of sqrt(d)
  float nuisance_noise = 0.4f;
  int nuisance_types = 16;   // token "types" the nuisance channels cluster by
  float value_topic = 0.8f;  // value per-channel scale along its topic's value direction
  float value_noise = 0.6f;
  int tokens_per_topic = 160;            // topics = positions / this
  double topic_run_mean = 32;            // mean length of a run of same-topic tokens
  double needle_decode_share = 1.0 / 3;  // decode steps whose query seeks a needle
  int needle_prefill_queries = 2;        // prompt queries per needle that seek it
};

constexpr int64_t kChunk = 2048;  // positions per generation task (fixed: part of the output)

// ---- per (layer, kv head) plan ----------------------------------------------------------------

struct HeadPlan {
  std::vector<uint8_t> nuisance;        // [d] 1 = nuisance channel (keys only, queries ignore it)
  std::vector<float> mu_k, mu_q;        // [d] unit
  std::vector<float> head_offsets;      // [group, d] absolute
  std::vector<float> topic_dirs;        // [topics, d] unit, zero on nuisance channels
  std::vector<float> value_dirs;        // [topics, d] unit
  std::vector<float> nuisance_centers;  // [types, d] unit, only nuisance channels
  std::vector<float> needle_dirs;       // [needles, d] unit
  std::vector<int64_t> needle_pos;      // [needles]
  std::vector<int16_t> query_needle;    // [positions] needle a query seeks, -1 none
  std::vector<float> drift_start;       // [chunks, d] drift state at each chunk's first position
};

struct Shared {
  const GenOptions* opt;
  Knobs k;
  int d, group, topics;
  int64_t positions;
  float scale;
  // Norms derived from the knobs (see the file comment).
  float a_k, a_q, b_k, b_q, r_k, r_q, n_k, n_q, sigma_k, sigma_q, nu_c, nu_n, rho;
  std::vector<int32_t> topic_of;  // [positions]
  std::vector<uint8_t> type_of;   // [positions]
  std::vector<float> topic_cdf;   // popularity of topics
};

void RandomUnit(Rng& rng, const std::vector<uint8_t>* mask, bool on_mask, int d, float* out) {
  double n2 = 0;
  for (int i = 0; i < d; ++i) {
    const bool use = mask == nullptr || ((*mask)[i] != 0) == on_mask;
    out[i] = use ? rng.Normal() : 0.f;
    n2 += double(out[i]) * out[i];
  }
  const float inv = n2 > 0 ? static_cast<float>(1.0 / std::sqrt(n2)) : 0.f;
  for (int i = 0; i < d; ++i) out[i] *= inv;
}

int PickTopic(Rng& rng, const std::vector<float>& cdf) {
  const float u = static_cast<float>(rng.Uniform()) * cdf.back();
  return static_cast<int>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin()) %
         static_cast<int>(cdf.size());
}

void Evolve(const Shared& s, const std::vector<uint8_t>& nuisance, Rng& drng, float* z) {
  const float c = std::sqrt(1.f - s.rho * s.rho);
  const float per = 1.f / std::sqrt(static_cast<float>(s.d));
  for (int i = 0; i < s.d; ++i)
    if (!nuisance[i]) z[i] = s.rho * z[i] + c * per * drng.FastNormal();
}

HeadPlan MakePlan(const Shared& s, int layer, int g) {
  const int d = s.d;
  const GenOptions& opt = *s.opt;
  Rng rng(StreamSeed(opt.seed, kTagPlan, layer, g));
  HeadPlan p;
  // NOTE: nuisance channels carry large, type-clustered key values that queries ignore: a
  // key-only index (k-means, HNSW on keys) organises itself around them, which is the
  // out-of-distribution gap of RetrievalAttention (arXiv 2409.10516, section 2).
  p.nuisance.assign(d, 0);
  std::vector<int> perm(d);
  std::iota(perm.begin(), perm.end(), 0);
  for (int i = d - 1; i > 0; --i) std::swap(perm[i], perm[rng.Below(i + 1)]);
  const int r = d >= 8 ? d / 4 : 0;
  for (int i = 0; i < r; ++i) p.nuisance[perm[i]] = 1;

  p.mu_k.resize(d);
  p.mu_q.resize(d);
  RandomUnit(rng, nullptr, false, d, p.mu_k.data());
  RandomUnit(rng, &p.nuisance, false, d, p.mu_q.data());
  p.head_offsets.resize(static_cast<std::size_t>(s.group) * d);
  for (int h = 0; h < s.group; ++h) {
    float* o = &p.head_offsets[static_cast<std::size_t>(h) * d];
    RandomUnit(rng, &p.nuisance, false, d, o);
    for (int i = 0; i < d; ++i) o[i] *= s.k.head_offset * s.a_q;
  }
  p.topic_dirs.resize(static_cast<std::size_t>(s.topics) * d);
  p.value_dirs.resize(p.topic_dirs.size());
  for (int t = 0; t < s.topics; ++t) {
    RandomUnit(rng, &p.nuisance, false, d, &p.topic_dirs[static_cast<std::size_t>(t) * d]);
    RandomUnit(rng, nullptr, false, d, &p.value_dirs[static_cast<std::size_t>(t) * d]);
  }
  p.nuisance_centers.resize(static_cast<std::size_t>(s.k.nuisance_types) * d);
  for (int t = 0; t < s.k.nuisance_types; ++t)
    RandomUnit(rng, &p.nuisance, true, d, &p.nuisance_centers[static_cast<std::size_t>(t) * d]);

  // Needles: distinct positions in the cold part of the prompt (after the sinks' neighbourhood,
  // before the recent window), so only retrieval can find them.
  const int64_t P = opt.meta.prompt_tokens;
  const int64_t lo = std::min<int64_t>(s.k.sink_tokens + P / 32, P);
  const int64_t hi = std::max<int64_t>(lo, P - std::min<int64_t>(1024, P / 4));
  const int needles = static_cast<int>(std::min<int64_t>(std::max(opt.needles, 0), hi - lo));
  std::vector<int64_t> pos;
  while (static_cast<int>(pos.size()) < needles) {
    const int64_t c = lo + static_cast<int64_t>(rng.Uniform() * static_cast<double>(hi - lo));
    if (std::find(pos.begin(), pos.end(), c) == pos.end()) pos.push_back(c);
  }
  p.needle_pos = pos;
  p.needle_dirs.resize(static_cast<std::size_t>(needles) * d);
  for (int n = 0; n < needles; ++n)
    RandomUnit(rng, &p.nuisance, false, d, &p.needle_dirs[static_cast<std::size_t>(n) * d]);
  p.query_needle.assign(s.positions, -1);
  if (needles > 0) {
    for (int64_t step = 0; step < opt.meta.decode_steps; ++step)
      if (rng.Uniform() < s.k.needle_decode_share) p.query_needle[P + step] = rng.Below(needles);
    for (int n = 0; n < needles; ++n)
      for (int j = 0; j < s.k.needle_prefill_queries && pos[n] + 1 < P; ++j) {
        const int64_t q = pos[n] + 1 + static_cast<int64_t>(rng.Uniform() * double(P - pos[n] - 1));
        p.query_needle[q] = static_cast<int16_t>(n);
      }
  }

  // Drift: walk it once, remembering the state at each chunk start; each chunk's steps come from
  // its own stream, which the chunk task replays.
  const int64_t chunks = (s.positions + kChunk - 1) / kChunk;
  p.drift_start.resize(static_cast<std::size_t>(chunks) * d);
  std::vector<float> z(d);
  const float per = 1.f / std::sqrt(static_cast<float>(d));
  for (int i = 0; i < d; ++i) z[i] = p.nuisance[i] ? 0.f : per * rng.Normal();
  for (int64_t c = 0; c < chunks; ++c) {
    std::copy(z.begin(), z.end(), &p.drift_start[static_cast<std::size_t>(c) * d]);
    Rng drng(StreamSeed(opt.seed, kTagDrift, layer, g, c));
    const int64_t end = std::min(s.positions, (c + 1) * kChunk);
    for (int64_t t = c * kChunk + 1; t < end; ++t) Evolve(s, p.nuisance, drng, z.data());
    if (end < s.positions) Evolve(s, p.nuisance, drng, z.data());  // step into the next chunk
  }
  return p;
}

void FillChunk(const Shared& s, const HeadPlan& p, int layer, int g, int64_t chunk,
               LayerTensors& out) {
  const int d = s.d;
  const Knobs& k = s.k;
  const TraceMeta& m = s.opt->meta;
  const int64_t P = m.prompt_tokens;
  const std::size_t esz = DTypeSize(m.dtype);
  Rng rng(StreamSeed(s.opt->seed, kTagChunk, layer, g, chunk));
  Rng drng(StreamSeed(s.opt->seed, kTagDrift, layer, g, chunk));
  std::vector<float> z(p.drift_start.begin() + chunk * d, p.drift_start.begin() + (chunk + 1) * d);
  std::vector<float> key(d), value(d), base(d), q(d);
  const float inv_sqrt_d = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t begin = chunk * kChunk, end = std::min(s.positions, begin + kChunk);
  const int needles = static_cast<int>(p.needle_pos.size());
  for (int64_t t = begin; t < end; ++t) {
    if (t > begin) Evolve(s, p.nuisance, drng, z.data());
    const bool prefill = t < P;
    const int64_t row = prefill ? t : t - P;
    const int topic = s.topic_of[t];
    const float* tdir = &p.topic_dirs[static_cast<std::size_t>(topic) * d];
    // Key.
    const float* ncen = &p.nuisance_centers[static_cast<std::size_t>(s.type_of[t]) * d];
    for (int i = 0; i < d; ++i)
      key[i] = s.a_k * p.mu_k[i] + s.sigma_k * inv_sqrt_d * rng.FastNormal() + s.nu_c * ncen[i];
    for (int i = 0; i < d; ++i)
      if (p.nuisance[i]) key[i] += s.nu_n * 2.f * inv_sqrt_d * rng.FastNormal();
    if (t < k.sink_tokens) {
      const float sk = k.sink_score[std::min<int64_t>(t, 3)] / (s.scale * s.a_q);
      for (int i = 0; i < d; ++i) key[i] += sk * p.mu_q[i];
      for (int i = 0; i < d; ++i) value[i] = 0.1f * rng.FastNormal();
    } else {
      const float b = s.b_k * std::max(0.f, 1.f + k.topic_salience * rng.FastNormal());
      for (int i = 0; i < d; ++i) key[i] += b * tdir[i] + s.r_k * z[i];
      for (int n = 0; n < needles; ++n)
        if (p.needle_pos[n] == t)
          for (int i = 0; i < d; ++i)
            key[i] += s.n_k * p.needle_dirs[static_cast<std::size_t>(n) * d + i];
      const float* vdir = &p.value_dirs[static_cast<std::size_t>(topic) * d];
      const float vs = k.value_topic * std::sqrt(static_cast<float>(d));
      for (int i = 0; i < d; ++i) value[i] = vs * vdir[i] + k.value_noise * rng.FastNormal();
    }
    const int kpart = prefill ? 1 : 4;
    const std::size_t kv_off = (static_cast<std::size_t>(row) * m.num_kv_heads + g) * d * esz;
    ConvertFromF32(key.data(), d, m.dtype, out.part[kpart].data() + kv_off);
    ConvertFromF32(value.data(), d, m.dtype, out.part[kpart + 1].data() + kv_off);

    // Queries: a group component (mean, drift, preferred topics, maybe a needle), then per head
    // a static offset and noise.
    for (int i = 0; i < d; ++i) base[i] = s.a_q * p.mu_q[i] + s.r_q * z[i];
    const int first = rng.Uniform() < 0.5 ? topic : PickTopic(rng, s.topic_cdf);
    const int extras = rng.Below(3);
    for (int e = 0; e <= extras; ++e) {
      const int j = e == 0 ? first : PickTopic(rng, s.topic_cdf);
      const float w = s.b_q * (e == 0 ? 1.f : k.extra_topic_weight);
      const float* dir = &p.topic_dirs[static_cast<std::size_t>(j) * d];
      for (int i = 0; i < d; ++i) base[i] += w * dir[i];
    }
    if (const int n = p.query_needle[t]; n >= 0)
      for (int i = 0; i < d; ++i)
        base[i] += s.n_q * p.needle_dirs[static_cast<std::size_t>(n) * d + i];
    const int qpart = prefill ? 0 : 3;
    for (int h = 0; h < s.group; ++h) {
      const float* off = &p.head_offsets[static_cast<std::size_t>(h) * d];
      for (int i = 0; i < d; ++i)
        q[i] = base[i] + off[i] + s.sigma_q * inv_sqrt_d * rng.FastNormal();
      const std::size_t q_off = (static_cast<std::size_t>(row) * m.num_q_heads +
                                 static_cast<std::size_t>(g) * s.group + h) *
                                d * esz;
      if (!out.part[qpart].empty())  // empty: prompt queries not wanted (the draws still happen)
        ConvertFromF32(q.data(), d, m.dtype, out.part[qpart].data() + q_off);
    }
  }
}

}  // namespace

namespace {
// The generator's own limits, checked before anything is created or drawn.
absl::Status CheckOptions(const GenOptions& options) {
  if (options.meta.head_dim <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("gen-trace: head_dim must be positive, got ", options.meta.head_dim));
  if (options.needles < 0 || options.needles > 30000)
    return absl::InvalidArgumentError(
        absl::StrCat("gen-trace: needles must be in [0, 30000], got ", options.needles));
  return absl::OkStatus();
}

// Metadata with the scale resolved (0 = 1/sqrt(head_dim)); head_dim was checked.
TraceMeta ResolvedMeta(const GenOptions& options) {
  TraceMeta meta = options.meta;
  if (meta.scale == 0.f) meta.scale = 1.f / std::sqrt(static_cast<float>(meta.head_dim));
  return meta;
}

absl::Status Generate(const GenOptions& options, const LayerConsumer& consume) {
  const TraceMeta meta = ResolvedMeta(options);
  GenOptions opt = options;
  opt.meta = meta;
  Shared s;
  s.opt = &opt;
  s.d = meta.head_dim;
  s.group = meta.num_q_heads / meta.num_kv_heads;
  s.positions = meta.prompt_tokens + meta.decode_steps;
  s.scale = meta.scale;
  s.topics = static_cast<int>(std::clamp<int64_t>(s.positions / s.k.tokens_per_topic, 8, 30000));
  const float D = std::sqrt(static_cast<float>(s.d));
  const float unit = std::sqrt(1.f / s.scale);  // a*b*scale = s  <=>  a = b = sqrt(s) * unit
  const Knobs& k = s.k;
  s.a_k = k.key_mean_norm * D;
  s.a_q = k.query_mean_norm * D;
  s.b_k = std::sqrt(k.topic_score) * unit * 0.8f;
  s.b_q = std::sqrt(k.topic_score) * unit / 0.8f;
  s.r_k = std::sqrt(k.drift_score) * unit * 0.8f;
  s.r_q = std::sqrt(k.drift_score) * unit / 0.8f;
  s.n_k = s.n_q = std::sqrt(k.needle_score) * unit;
  s.nu_c = k.nuisance_center * D;
  s.nu_n = k.nuisance_noise * D;
  s.rho = std::exp(-1.f / k.drift_tau);
  // Score std of q . noise_k is |q| sigma_k scale / sqrt(d); of noise_q . k similarly.
  const float q_norm = std::sqrt(s.a_q * s.a_q + s.b_q * s.b_q * 1.5f + s.r_q * s.r_q);
  const float k_dev = std::sqrt(s.b_k * s.b_k + s.r_k * s.r_k + s.nu_c * s.nu_c + s.nu_n * s.nu_n);
  s.sigma_k = k.bulk_noise_score * D / (q_norm * s.scale);
  s.sigma_q = k.query_noise_score * D / (k_dev * s.scale);

  // Topic runs and token types are properties of the text, shared by every layer and head.
  {
    Rng rng(StreamSeed(opt.seed, kTagGlobal, 0));
    s.topic_cdf.resize(s.topics);
    float acc = 0;
    for (int t = 0; t < s.topics; ++t) s.topic_cdf[t] = acc += std::pow(t + 1.f, -0.3f);
    s.topic_of.resize(s.positions);
    s.type_of.resize(s.positions);
    int topic = PickTopic(rng, s.topic_cdf);
    for (int64_t t = 0; t < s.positions; ++t) {
      if (rng.Uniform() < 1.0 / k.topic_run_mean) topic = PickTopic(rng, s.topic_cdf);
      s.topic_of[t] = topic;
      s.type_of[t] = static_cast<uint8_t>(t < k.sink_tokens ? 0 : rng.Below(k.nuisance_types));
    }
  }

  LayerTensors buf;
  const std::size_t esz = DTypeSize(meta.dtype);
  const std::size_t d = static_cast<std::size_t>(s.d);
  const std::size_t sizes[6] = {meta.prompt_tokens * meta.num_q_heads * d * esz,
                                meta.prompt_tokens * meta.num_kv_heads * d * esz,
                                meta.prompt_tokens * meta.num_kv_heads * d * esz,
                                meta.decode_steps * meta.num_q_heads * d * esz,
                                meta.decode_steps * meta.num_kv_heads * d * esz,
                                meta.decode_steps * meta.num_kv_heads * d * esz};
  std::size_t layer_bytes = 0;
  for (int i = 0; i < 6; ++i)
    if (i > 0 || options.prefill_queries) layer_bytes += sizes[i];
  const int64_t chunks = (s.positions + kChunk - 1) / kChunk;
  const auto t0 = std::chrono::steady_clock::now();
  for (int layer = 0; layer < meta.num_layers; ++layer) {
    // (Again each layer: a consumer may have taken the buffers.)
    for (int i = 0; i < 6; ++i)
      if (i > 0 || options.prefill_queries) buf.part[i].resize(sizes[i]);
    std::vector<HeadPlan> plans(meta.num_kv_heads);
    tbb::parallel_for(0, meta.num_kv_heads, [&](int g) { plans[g] = MakePlan(s, layer, g); });
    const int64_t tasks = meta.num_kv_heads * chunks;
    std::atomic<int64_t> done{0};
    std::atomic<int> shown{0};  // tenths of the layer already reported
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, tasks, 1),
                      [&](const tbb::blocked_range<int64_t>& r) {
                        for (int64_t task = r.begin(); task < r.end(); ++task) {
                          const int g = static_cast<int>(task % meta.num_kv_heads);
                          FillChunk(s, plans[g], layer, g, task / meta.num_kv_heads, buf);
                          const int tenth = static_cast<int>(10 * (done.fetch_add(1) + 1) / tasks);
                          int prev = shown.load();
                          // Long layers (many tokens) report every 10%; a line per layer anyway.
                          if (options.show_progress && tasks >= 40 && tenth < 10 && tenth > prev &&
                              shown.compare_exchange_strong(prev, tenth))
                            std::fprintf(stderr, "gen-trace: layer %d/%d: %d%%\n", layer + 1,
                                         meta.num_layers, tenth * 10);
                        }
                      });
    KVRT_RETURN_IF_ERROR(consume(layer, buf));
    if (options.show_progress) {
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "gen-trace: layer %d/%d written (%3.0f%%, %.1f MiB, %.1f s)\n",
                   layer + 1, meta.num_layers, 100.0 * (layer + 1) / meta.num_layers,
                   static_cast<double>(layer_bytes) * (layer + 1) / (1 << 20), secs);
    }
  }
  return absl::OkStatus();
}

absl::Status CatchOutOfMemory(const std::function<absl::Status()>& f, const std::string& what) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("gen-trace: out of memory generating ", what,
                     " (one layer of the trace is held in memory; use fewer tokens or heads)"));
  }
}
}  // namespace

absl::Status GenerateLayers(const GenOptions& options, const LayerConsumer& consume) {
  KVRT_RETURN_IF_ERROR(CheckOptions(options));
  KVRT_RETURN_IF_ERROR(ValidateTraceMeta(ResolvedMeta(options), "gen-trace"));
  return CatchOutOfMemory([&] { return Generate(options, consume); }, "a trace in memory");
}

absl::Status GenerateTrace(const std::string& path, const GenOptions& options) {
  KVRT_RETURN_IF_ERROR(CheckOptions(options));
  TraceMeta meta = ResolvedMeta(options);
  meta.extra["seed"] = std::to_string(options.seed);
  meta.extra["needles"] = std::to_string(options.needles);
  meta.extra["generator"] = "kvrt gen-trace";
  // Create validates the metadata (positive sizes, GQA divisibility) before anything is drawn.
  KVRT_ASSIGN_OR_RETURN(auto writer, TraceWriter::Create(path, meta));
  GenOptions opt = options;
  opt.prefill_queries = true;
  KVRT_RETURN_IF_ERROR(CatchOutOfMemory(
      [&] {
        return Generate(opt, [&](int layer, LayerTensors& t) -> absl::Status {
          for (int i = 0; i < 6; ++i)
            KVRT_RETURN_IF_ERROR(
                writer->WriteTensor(layer, TensorParts()[i], t.part[i].data(), t.part[i].size()));
          return absl::OkStatus();
        });
      },
      path));
  return writer->Close();
}

}  // namespace kvrt::trace
