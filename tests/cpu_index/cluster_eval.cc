// cluster_eval: accuracy of the cluster kind's variants against flat top-k exact attention at
// EQUAL numbers of attended cold tokens, on a trace (real or `kvrt gen-trace`). Not a ctest:
//   cluster_eval TRACE [budget_fraction=0.02] [segment_tokens=8192] [max_steps=16]
//                [sinks=4] [window=512] [layers=all] [min_budget_tokens=256]
// Per (layer, kv head): the cold rows are prompt tokens [sinks, prompt - window); every decode
// query of the group attends sinks + window + its own decode tokens exactly, and the cold rows
// through flat top-k or the cluster index (plus its estimate). Reference: exact f32 attention over
// all tokens up to the query. Errors: |o - o_ref| / |o_ref|. Recall@100: share of the exact
// top-100 cold keys attended. Mass: share of the cold softmax mass attended. est: mean log of
// estimated / true mass of the unattended cold rows. kv%: the rows a step reads for the kv head
// (the union over its group's queries), as a share of the cold rows; tokens%: per query.
// hit% / miss_kB / fill_kB: the direct step's page pool over the rows each step reads (the tail
// included); a second table shows the selection alone per pool policy (CLUSTER_EVAL_POOLS).
// CLUSTER_EVAL_CLUSTER_SIZE sets the keys per cluster (default 16); CLUSTER_EVAL_ORACLE=1 adds a
// table that splits the estimate's error into its masses' and its values' parts;
// CLUSTER_EVAL_VALUE_CODES=1 adds, for the variants selecting on codes, the error with each
// unselected cluster's value estimated from its rows (weighted by their key codes' scores) on
// their exact values and on 4-, 2- and 1-bit codes of them instead of the cluster's value mean.
#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#include "runtime/src/block_page_cache.h"
#include "tools/trace/trace.h"

using namespace kvrt;
using namespace kvrt::cpu_index;

namespace {

struct Variant {
  const char* name;
  bool query_aware;
  float outliers;
  bool estimate;
  float spread;
  bool two_level = true;
  int refine = 2;
  int calibrate = 0;  // ClusterConfig::calibrate_queries
  bool group = false;  // ClusterConfig::group_select (one SearchGroup per step and kv head)
  float top_p = 0.f;   // ClusterConfig::top_p
  float rescore = 0.f;  // ClusterConfig::rescore (the index's own two-stage selection)
  bool whole = false;   // ClusterConfig::rescore_clusters (the second stage keeps clusters)
  bool pool = false;    // with whole: only candidates the simulated page pool holds are scored
  int bits = 0;         // ClusterConfig::rescore_bits (candidates scored on codes of this width)
};

// A page-pool policy for the simulation: pool pages = fraction of the rows / 8; BlockPageCache's
// admit_after; at most pages / cap_div admissions per step (0: no bound). lazy: an admission only
// gives the block a page (no copy); a row becomes valid there when a later step reads it over
// PCIe (and writes it into the page), and hits from the step after.
struct PoolPolicy {
  double fraction = 0.1;
  int admit_after = 2;
  int cap_div = 8;
  int lazy = 0;
};

// CLUSTER_EVAL_POOLS=fraction/admit_after/cap_div[/lazy],... lazy 1: pages given after the step
// fill as later steps read their rows; 2: a step's rows read over PCIe fill the pages their blocks
// get after it (DirectStep's staged pages; 0.1/1/0/2 is its policy, 0.1/2/8 0.3.5's).
std::vector<PoolPolicy> PoolPolicies() {
  std::vector<PoolPolicy> out;
  const char* env = std::getenv("CLUSTER_EVAL_POOLS");
  std::string list = env != nullptr ? env : "0.1/1/0/2,0.1/2/8";
  std::size_t at = 0;
  while (at <= list.size()) {
    const std::size_t end = std::min(list.find(',', at), list.size());
    PoolPolicy p;
    if (std::sscanf(list.substr(at, end - at).c_str(), "%lf/%d/%d/%d", &p.fraction, &p.admit_after,
                    &p.cap_div, &p.lazy) >= 3)
      out.push_back(p);
    at = end + 1;
  }
  return out;
}

// CLUSTER_EVAL_MISS_CAPS=cap[d]|pX,...: for every group variant, a run whose selection reads at
// most cap x budget rows per kv head and step over PCIe (SelectClustersCapped; "inf": no bound),
// the other selected clusters' rows found in the direct step's staged page pool (0.1/1/0/2 above,
// the outliers resident, as DirectStep::Warm copies them in). A "d" suffix: the clusters the bound
// passed over are copied in after the step (deferred), resident from the next one. "pX": no
// bound, but each group key lowered by X x the cluster's share of rows not in the pool (the
// residency-aware selection of the direct step, ClusterConfig::miss_penalty).
struct MissRule {
  double cap = -1;        // x budget; < 0: no bound
  bool deferred = false;  // the passed-over clusters copied in after the step
  double penalty = 0;     // > 0: no bound; the group key lowered by penalty x the miss share
};

std::vector<MissRule> MissCaps() {
  std::vector<MissRule> out;
  const char* env = std::getenv("CLUSTER_EVAL_MISS_CAPS");
  if (env == nullptr) return out;
  std::string list = env;
  std::size_t at = 0;
  while (at < list.size()) {
    const std::size_t end = std::min(list.find(',', at), list.size());
    const std::string item = list.substr(at, end - at);
    MissRule r;
    if (!item.empty() && item[0] == 'p') {
      r.penalty = std::atof(item.c_str() + 1);
    } else {
      r.deferred = !item.empty() && item.back() == 'd';
      r.cap = item == "inf" ? -1.0 : std::atof(item.c_str());
    }
    out.push_back(r);
    at = end + 1;
  }
  return out;
}

struct Stats {
  std::vector<double> err, flat_err;
  // CLUSTER_EVAL_ORACLE=1: the estimate's error taken apart. err_om: each unselected cluster's
  // true mass with its mean value (what a perfect mass estimate leaves: the values' error);
  // err_ov: the estimated masses with each cluster's true weighted value (the masses' error).
  std::vector<double> err_om, err_ov;
  // CLUSTER_EVAL_VALUE_CODES=1: the unselected clusters at their key codes' masses with values
  // from their rows: exact (err_vx), or decoded from value codes of kValueBits[i] bits (err_vc).
  std::vector<double> err_vx;
  std::vector<std::vector<double>> err_vc = std::vector<std::vector<double>>(3);
  double tokens = 0, kv_tokens = 0, recall = 0, flat_recall = 0, mass = 0, flat_mass = 0,
         est_log = 0;
  int64_t est_n = 0, n = 0, kv_n = 0;
  // The direct step's page pool (runtime/src/block_page_cache.h) run over the rows each step
  // reads for the kv head: rows found in the pool, rows read over PCIe, blocks filled.
  int64_t pool_rows = 0, pool_hit_rows = 0, pool_fills = 0, pool_steps = 0;
  // Per pool policy (CLUSTER_EVAL_POOLS), a pool sized to the clustered rows and shown only the
  // selection (as if the tail had a place of its own): the selection's own step-to-step locality.
  std::vector<int64_t> sel_rows, sel_hit_rows, sel_fills;
  // Miss-capped runs (CLUSTER_EVAL_MISS_CAPS): selected cluster rows and those read over PCIe.
  int64_t cap_rows = 0, cap_miss_rows = 0, cap_fill_rows = 0;
  double build_s = 0;
};

// Partial state of a score/value set in double: o (d), lse.
struct State {
  std::vector<double> o;
  double lse = -INFINITY;
};

void Merge(State* a, const State& b) {
  if (b.lse == -INFINITY) return;
  if (a->lse == -INFINITY) {
    *a = b;
    return;
  }
  const double m = std::max(a->lse, b.lse);
  const double wa = std::exp(a->lse - m), wb = std::exp(b.lse - m);
  for (std::size_t i = 0; i < a->o.size(); ++i) a->o[i] = (wa * a->o[i] + wb * b.o[i]) / (wa + wb);
  a->lse = m + std::log(wa + wb);
}

// s: scaled scores of the rows; v: f32 rows [*, d] addressed by idx.
State Attend(const std::vector<double>& s, const std::vector<int64_t>& idx, const float* v, int d) {
  State st;
  st.o.assign(d, 0.0);
  if (idx.empty()) return st;
  double m = -INFINITY;
  for (int64_t i : idx) m = std::max(m, s[i]);
  double l = 0;
  for (int64_t i : idx) {
    const double w = std::exp(s[i] - m);
    l += w;
    const float* r = v + i * d;
    for (int j = 0; j < d; ++j) st.o[j] += w * r[j];
  }
  for (auto& x : st.o) x /= l;
  st.lse = m + std::log(l);
  return st;
}

double RelErr(const State& a, const State& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.o.size(); ++i) {
    num += (a.o[i] - ref.o[i]) * (a.o[i] - ref.o[i]);
    den += ref.o[i] * ref.o[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min<std::size_t>(v.size() - 1, static_cast<std::size_t>(p * v.size()))];
}

// CLUSTER_EVAL_VALUE_CODES: the widths of the value codes tried.
constexpr int kValueBits[3] = {4, 2, 1};

// Value codes of a built cluster index's covered rows, one SegmentCodes per segment: the values
// in the store's layout (orig maps a laid-out row to its cold row of cv) coded as residuals from
// each cluster's bf16 value mean, as EncodeResiduals codes the keys from the centroids.
std::vector<SegmentCodes> EncodeValues(const ClusterSummary& cs, const std::vector<int64_t>& orig,
                                       const float* cv, int d, int64_t segment, int64_t covered,
                                       int bits) {
  std::vector<SegmentCodes> out(covered / segment);
  std::vector<float> vals(static_cast<std::size_t>(segment) * d);
  int64_t c = 0;
  for (int64_t sg = 0; sg < static_cast<int64_t>(out.size()); ++sg) {
    const int64_t b0 = sg * segment;
    SegmentClustering part;
    part.order.resize(segment);
    std::iota(part.order.begin(), part.order.end(), 0);
    std::vector<uint16_t> vmean;
    int64_t rows = 0;
    for (; c < cs.num_clusters() && cs.begin[c] < b0 + segment; ++c) {
      if (cs.begin[c] != b0 + rows) std::abort();  // clusters laid out in order, outliers last
      part.size.push_back(cs.size[c]);
      vmean.insert(vmean.end(), cs.value_mean.begin() + c * d, cs.value_mean.begin() + (c + 1) * d);
      rows += cs.size[c];
    }
    part.num_outliers = segment - rows;
    for (int64_t r = 0; r < segment; ++r)
      std::copy_n(cv + orig[b0 + r] * d, d, vals.data() + r * d);
    EncodeResiduals(vals.data(), part, vmean.data(), d, bits, &out[sg], /*laid_out=*/true);
  }
  return out;
}

// SelectClusters under a bound on the rows read from host memory: clusters in the same order, but
// one whose `miss_rows[c]` (its rows not on the GPU) would take the selection's misses past
// `miss_cap` is skipped (left to the estimate) and the walk goes on, so resident clusters further
// down fill the token budget. miss_cap < 0: no bound (SelectClusters' selection, top_p aside).
// Returns the selected tokens; *misses gets the selected miss rows, *skipped the clusters passed
// over for the bound, in order.
int64_t SelectClustersCapped(const ClusterSummary& s, const float* density, int64_t budget_tokens,
                             const int32_t* miss_rows, int64_t miss_cap,
                             std::vector<int32_t>* selected, int64_t* misses,
                             std::vector<int32_t>* skipped) {
  selected->clear();
  skipped->clear();
  *misses = 0;
  const int64_t c = s.num_clusters();
  if (c == 0 || budget_tokens <= 0) return 0;
  std::vector<int32_t> idx(c);
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [density](int32_t a, int32_t b) {
    return density[a] > density[b] || (density[a] == density[b] && a < b);
  });
  int64_t tokens = 0, missed = 0;
  for (const int32_t j : idx) {
    if (miss_cap >= 0 && miss_rows[j] > 0 && missed + miss_rows[j] > miss_cap) {
      skipped->push_back(j);
      continue;
    }
    selected->push_back(j);
    tokens += s.size[j];
    missed += miss_rows[j];
    if (tokens >= budget_tokens) break;
  }
  *misses = missed;
  return tokens;
}

// Lazy pool policies: per block, the page its valid rows were written to and their bits.
struct LazyBlock {
  int32_t page = -1;
  uint32_t valid = 0;
};
constexpr int64_t kBlock = 8;  // rows per pool page (DirectStep's)

// One step of a miss-capped run for the g queries qs [g, d] of a kv head: the group selection by
// SelectClustersCapped with the rows not valid in the staged pool as misses (cap x budget of
// them at most; cap < 0: no bound), each query's estimate over the clusters left, then the pool
// updated as DirectStep's staged policy does (the step's rows read over PCIe fill the pages their
// blocks get after it).
void CapStep(const ClusterSummary& s, const float* qs, int g, float scale, float spread_weight,
             double budget_fraction, int64_t min_budget, int64_t covered, const MissRule& rule,
             runtime::BlockPageCache* pool, std::vector<LazyBlock>* lazy, SearchResult* out,
             Stats* stats) {
  const int d = s.dim;
  const int64_t c = s.num_clusters();
  std::vector<float> mu(static_cast<std::size_t>(c) * d);
  ConvertToF32(s.centroid.data(), DType::kBF16, mu.size(), mu.data());
  std::vector<float> density(static_cast<std::size_t>(g) * c), key(c), scores(c);
  for (int j = 0; j < g; ++j) {
    const float* q = qs + static_cast<std::size_t>(j) * d;
    float qn2 = 0;
    for (int t = 0; t < d; ++t) qn2 += q[t] * q[t];
    for (int64_t k = 0; k < c; ++k) {
      float a = 0;
      for (int t = 0; t < d; ++t) a += q[t] * mu[k * d + t];
      scores[k] = a;
    }
    ClusterDensity(s, scores.data(), qn2, scale, spread_weight, density.data() + j * c);
  }
  GroupSelectionKey(s, density.data(), g, key.data());
  auto valid = [&](int64_t r) {
    const int64_t b = r / kBlock;
    const int32_t page = pool->page(0, b);
    const LazyBlock& lb = (*lazy)[b];
    return page >= 0 && lb.page == page && ((lb.valid >> (r % kBlock)) & 1u);
  };
  std::vector<int32_t> miss(c, 0);
  for (int64_t k = 0; k < c; ++k)
    for (int64_t r = s.begin[k]; r < s.begin[k] + s.size[k]; ++r) miss[k] += valid(r) ? 0 : 1;
  const int64_t no = static_cast<int64_t>(s.outliers.size());
  const int64_t budget = std::max<int64_t>(
      {1, static_cast<int64_t>(std::ceil(budget_fraction * (covered - no))), min_budget});
  std::vector<int32_t> sel, skipped;
  int64_t missed = 0;
  if (rule.penalty > 0)
    for (int64_t k = 0; k < c; ++k)
      if (s.size[k] > 0) key[k] -= static_cast<float>(rule.penalty * miss[k] / s.size[k]);
  const int64_t tokens = SelectClustersCapped(s, key.data(), budget, miss.data(),
                                              rule.cap < 0 ? -1 : std::llround(rule.cap * budget),
                                              &sel, &missed, &skipped);
  stats->cap_rows += tokens;
  stats->cap_miss_rows += missed;
  stats->kv_tokens += double(tokens + no) / covered;
  ++stats->kv_n;
  for (int j = 0; j < g; ++j) {
    SearchResult& r = out[j];
    r.ids.assign(s.outliers.begin(), s.outliers.end());
    for (const int32_t k : sel)
      for (int64_t row = s.begin[k]; row < s.begin[k] + s.size[k]; ++row) r.ids.push_back(row);
    r.est_o.assign(d, 0.f);
    EstimateUnselected(s, density.data() + j * c, sel, r.est_o.data(), &r.est_lse);
    if (r.est_lse == -INFINITY) r.est_o.clear();
  }
  // The staged pool: blocks read (hits first), then misses admitted with the rows just read.
  std::vector<std::pair<int64_t, uint32_t>> reads;  // (block, bits)
  for (const int32_t k : sel)
    for (int64_t row = s.begin[k]; row < s.begin[k] + s.size[k]; ++row) {
      const int64_t b = row / kBlock;
      if ((b + 1) * kBlock > covered) continue;  // a partial last block never gets a page
      if (reads.empty() || reads.back().first != b) reads.push_back({b, 0});
      reads.back().second |= 1u << (row % kBlock);
    }
  std::sort(reads.begin(), reads.end());
  std::vector<std::pair<int64_t, uint32_t>> merged;
  for (const auto& rd : reads) {
    if (!merged.empty() && merged.back().first == rd.first)
      merged.back().second |= rd.second;
    else
      merged.push_back(rd);
  }
  pool->NextStep();
  for (const auto& [b, bits] : merged) {
    const int32_t page = pool->page(0, b);
    LazyBlock& lb = (*lazy)[b];
    if (page < 0 || lb.page != page) lb = {page, 0};
    if (page >= 0) lb.valid |= bits;
  }
  for (const auto& [b, bits] : merged) (void)pool->Use(0, b, false);
  for (const auto& [b, bits] : merged) {
    if (pool->page(0, b) >= 0) continue;
    (void)pool->Use(0, b, true);
    const int32_t page = pool->page(0, b);
    if (page >= 0) (*lazy)[b] = {page, bits};
  }
  // Deferred: the clusters the bound passed over are copied in whole blocks after the step (off
  // its path: the copy engine during the next layers), resident from the next step.
  if (!rule.deferred) return;
  for (const int32_t k : skipped)
    for (int64_t b = s.begin[k] / kBlock; b * kBlock < s.begin[k] + s.size[k]; ++b) {
      if ((b + 1) * kBlock > covered) continue;
      const int32_t had = pool->page(0, b);
      if (had >= 0 && (*lazy)[b].page == had && (*lazy)[b].valid == 0xFFu) continue;
      (void)pool->Use(0, b, true);
      const int32_t page = pool->page(0, b);
      if (page < 0) continue;
      (*lazy)[b] = {page, 0xFFu};
      stats->cap_fill_rows += kBlock;
    }
}

std::vector<float> ToF32(const trace::TensorView& t) {
  const std::size_t n = t.bytes / DTypeSize(t.dtype);
  std::vector<float> out(n);
  ConvertToF32(t.data, t.dtype, n, out.data());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: cluster_eval TRACE [budget_fraction] [segment_tokens] [max_steps] "
                 "[sinks] [window] [layers]\n");
    return 2;
  }
  const std::string path = argv[1];
  const double budget_fraction = argc > 2 ? std::atof(argv[2]) : 0.02;
  const int64_t segment = argc > 3 ? std::atoll(argv[3]) : 8192;
  const int max_steps = argc > 4 ? std::atoi(argv[4]) : 16;
  const int64_t sinks = argc > 5 ? std::atoll(argv[5]) : 4;
  const int64_t window = argc > 6 ? std::atoll(argv[6]) : 512;
  auto reader_or = trace::TraceReader::Open(path);
  if (!reader_or.ok()) {
    std::fprintf(stderr, "%s\n", reader_or.status().ToString().c_str());
    return 1;
  }
  const auto& reader = **reader_or;
  const auto& meta = reader.meta();
  const int64_t min_budget = argc > 8 ? std::atoll(argv[8]) : 256;
  const bool oracle = std::getenv("CLUSTER_EVAL_ORACLE") != nullptr;
  const bool value_codes = std::getenv("CLUSTER_EVAL_VALUE_CODES") != nullptr;
  // CLUSTER_EVAL_CLUSTER_SIZE: keys per cluster (ClusterConfig::cluster_size, default 16).
  const char* size_env = std::getenv("CLUSTER_EVAL_CLUSTER_SIZE");
  const int cluster_size = size_env != nullptr ? std::atoi(size_env) : 16;
  if (cluster_size < 2) {
    std::fprintf(stderr, "CLUSTER_EVAL_CLUSTER_SIZE must be >= 2\n");
    return 2;
  }
  const int layers = argc > 7 ? std::min(std::atoi(argv[7]), meta.num_layers) : meta.num_layers;
  const int d = meta.head_dim, qh = meta.num_q_heads, kvh = meta.num_kv_heads, g = qh / kvh;
  const int64_t p_tok = meta.prompt_tokens;
  const int steps = static_cast<int>(std::min<int64_t>(max_steps, meta.decode_steps));
  const double scale = meta.scale != 0.f ? meta.scale : 1.0 / std::sqrt(double(d));
  const int64_t cold = p_tok - window - sinks;
  if (cold <= 0) {
    std::fprintf(stderr, "no cold tokens\n");
    return 1;
  }
  std::printf(
      "trace %s: model %s, %d layers, %d q / %d kv heads, d=%d, prompt %lld, steps %d, "
      "cold %lld (sinks %lld, window %lld), budget %.3f (min %lld), segment %lld\n",
      path.c_str(), meta.model.c_str(), layers, qh, kvh, d, (long long)p_tok, steps,
      (long long)cold, (long long)sinks, (long long)window, budget_fraction, (long long)min_budget,
      (long long)segment);

  std::vector<Variant> variants = {
      {"plain", false, 0.f, false, 0.f},
      {"plain+est", false, 0.f, true, 0.f},
      {"plain+est+outl", false, 0.004f, true, 0.f},
      {"qa", true, 0.f, false, 0.f},
      {"qa+est", true, 0.f, true, 0.f},
      {"qa+est+spread", true, 0.f, true, 1.f},
      {"qa+est+outl", true, 0.004f, true, 0.f},
      {"qa+est+spread+outl", true, 0.004f, true, 1.f},
      {"qa+outl", true, 0.004f, false, 0.f},
      {"qa+est+spread+outl/r0", true, 0.004f, true, 1.f, true, 0},
      {"qa+est+spread+outl/r1", true, 0.004f, true, 1.f, true, 1},
      {"qa+est+spread+outl/1L", true, 0.004f, true, 1.f, false},
      {"qa+est+cal256+outl", true, 0.004f, true, 1.f, true, 2, 256},
      {"qa+est+cal1024+outl", true, 0.004f, true, 1.f, true, 2, 1024},
      {"cal256+group", true, 0.004f, true, 1.f, true, 2, 256, true},
      {"qa+est+spread+outl+group", true, 0.004f, true, 1.f, true, 2, 0, true},
      {"cal256+group+p90", true, 0.004f, true, 1.f, true, 2, 256, true, 0.90f},
      {"cal256+group+p95", true, 0.004f, true, 1.f, true, 2, 256, true, 0.95f},
      {"cal256+group+p98", true, 0.004f, true, 1.f, true, 2, 256, true, 0.98f},
      {"cal256+group/r1", true, 0.004f, true, 1.f, true, 1, 256, true},
      {"qa+est+cal256+outl/r1", true, 0.004f, true, 1.f, true, 1, 256},
      {"rescore2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 2.f},
      {"rescore4", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 4.f},
      {"group+rescore2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 2.f},
      {"group+rescore3", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 3.f},
      {"group+rescore4", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 4.f},
      {"group+rescore8", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 8.f},
      {"rescore2c", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 2.f, true},
      {"rescore4c", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 4.f, true},
      {"group+rescore2c", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 2.f, true},
      {"group+rescore4c", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 4.f, true},
      {"rescore4c/pool", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 4.f, true, true},
      {"group+rescore2c/pool", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 2.f, true, true},
      {"group+rescore4c/pool", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 4.f, true, true},
      {"rescore4/q4", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 4.f, false, false, 4},
      {"rescore4/q2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 4.f, false, false, 2},
      {"rescore4/q1", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 4.f, false, false, 1},
      {"rescore8/q2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 8.f, false, false, 2},
      {"group+rescore4/q4", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 4.f, false, false, 4},
      {"group+rescore4/q2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 4.f, false, false, 2},
      {"group+rescore8/q2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 8.f, false, false, 2},
      {"rescore4c/q2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 4.f, true, false, 2},
      {"group+rescore4c/q2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 4.f, true, false, 2},
      {"rescore8/q1", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 8.f, false, false, 1},
      {"rescore64", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 64.f},
      {"group+rescore64", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 64.f},
      {"rescore64/q4", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 64.f, false, false, 4},
      {"rescore64/q2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 64.f, false, false, 2},
      {"rescore64/q1", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 64.f, false, false, 1},
      {"group+rescore64/q2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 64.f, false, false,
       2},
      {"group+rescore64/q1", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 64.f, false, false,
       1},
      {"rescore16/q2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 16.f, false, false, 2},
      {"group+rescore16/q2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 16.f, false, false,
       2},
      {"rescore64c/q2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 64.f, true, false, 2},
      {"group+rescore64c/q2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 64.f, true, false,
       2},
      {"rescore64c/q1", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 64.f, true, false, 1},
      {"group+rescore64c/q1", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 64.f, true, false,
       1},
      {"rescore64c", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 64.f, true},
      {"group+rescore64c", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 64.f, true},
      {"rescore8c/q2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 8.f, true, false, 2},
      // The runtime's one-stage selection on codes (cluster_rescore_bits without rescore, 0.3.14).
      {"codes2", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 0.f, false, false, 2},
      {"group+codes2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 0.f, false, false, 2},
      // The same on 1-bit key codes (half the GPU bytes of the codes).
      {"codes1", true, 0.004f, true, 1.f, true, 2, 256, false, 0.f, 0.f, false, false, 1},
      {"group+codes1", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 0.f, false, false, 1},
      {"group+rescore8c/q2", true, 0.004f, true, 1.f, true, 2, 256, true, 0.f, 8.f, true, false, 2},
  };
  // CLUSTER_EVAL_VARIANTS=name,name,...: only those (the builds dominate the run time).
  if (const char* only = std::getenv("CLUSTER_EVAL_VARIANTS"); only != nullptr) {
    const std::string list = std::string(",") + only + ",";
    std::vector<Variant> kept;
    for (const Variant& v : variants)
      if (list.find(std::string(",") + v.name + ",") != std::string::npos) kept.push_back(v);
    if (kept.empty()) {
      std::fprintf(stderr, "CLUSTER_EVAL_VARIANTS names no variant\n");
      return 2;
    }
    variants = kept;
  }
  const std::vector<PoolPolicy> policies = PoolPolicies();
  // Runs after the variants: miss-capped selections over a group variant's index.
  struct CapRun {
    std::size_t base;
    MissRule rule;
    std::string name;
  };
  std::vector<CapRun> cap_runs;
  for (const MissRule& rule : MissCaps())
    for (std::size_t vi = 0; vi < variants.size(); ++vi)
      if (variants[vi].group) {
        char name[64];
        if (rule.penalty > 0)
          std::snprintf(name, sizeof(name), "%s@pen%.2f", variants[vi].name, rule.penalty);
        else if (rule.cap < 0)
          std::snprintf(name, sizeof(name), "%s@missinf", variants[vi].name);
        else
          std::snprintf(name, sizeof(name), "%s@miss%.2f%s", variants[vi].name, rule.cap,
                        rule.deferred ? "d" : "");
        cap_runs.push_back({vi, rule, name});
      }
  const std::size_t nv = variants.size(), nruns = nv + cap_runs.size();
  auto base_of = [&](std::size_t r) { return r < nv ? r : cap_runs[r - nv].base; };
  std::vector<Stats> stats(nruns);
  for (Stats& S : stats) {
    S.sel_rows.assign(policies.size(), 0);
    S.sel_hit_rows.assign(policies.size(), 0);
    S.sel_fills.assign(policies.size(), 0);
  }

  for (int layer = 0; layer < layers; ++layer) {
    const auto pq = ToF32(*reader.Tensor(layer, "prefill.q"));
    const auto pk = ToF32(*reader.Tensor(layer, "prefill.k"));
    const auto pv = ToF32(*reader.Tensor(layer, "prefill.v"));
    const auto dq = ToF32(*reader.Tensor(layer, "decode.q"));
    const auto dk = ToF32(*reader.Tensor(layer, "decode.k"));
    const auto dv = ToF32(*reader.Tensor(layer, "decode.v"));
    const auto pk_raw = *reader.Tensor(layer, "prefill.k");
    const auto pv_raw = *reader.Tensor(layer, "prefill.v");
    for (int h = 0; h < kvh; ++h) {
      // Cold rows in original order (f32) and the exact part's rows.
      std::vector<float> ck(static_cast<std::size_t>(cold) * d), cv(ck.size());
      for (int64_t r = 0; r < cold; ++r) {
        const std::size_t src = (static_cast<std::size_t>(sinks + r) * kvh + h) * d;
        std::copy_n(pk.data() + src, d, ck.data() + r * d);
        std::copy_n(pv.data() + src, d, cv.data() + r * d);
      }
      std::vector<float> prompt_q;  // the group's prompt queries
      for (int64_t t = 0; t < p_tok; ++t)
        for (int j = 0; j < g; ++j) {
          const float* src = pq.data() + (static_cast<std::size_t>(t) * qh + h * g + j) * d;
          prompt_q.insert(prompt_q.end(), src, src + d);
        }
      // One index per variant; order maps permuted rows back to original cold rows.
      std::vector<std::unique_ptr<KeyIndex>> idx(variants.size());
      std::vector<HeadStore> stores;
      std::vector<std::vector<int64_t>> orig(variants.size());
      stores.reserve(variants.size());
      for (std::size_t vi = 0; vi < variants.size(); ++vi) {
        stores.emplace_back(d, pk_raw.dtype);
        const std::size_t es = DTypeSize(pk_raw.dtype);
        const auto* kb =
            static_cast<const unsigned char*>(pk_raw.data) + (sinks * kvh + h) * d * es;
        const auto* vb =
            static_cast<const unsigned char*>(pv_raw.data) + (sinks * kvh + h) * d * es;
        if (!stores[vi].Append(kb, vb, cold, static_cast<std::size_t>(kvh) * d).ok()) return 1;
        IndexConfig cfg;
        cfg.cluster.segment_tokens = segment;
        cfg.cluster.cluster_size = cluster_size;
        cfg.cluster.budget_fraction = static_cast<float>(budget_fraction);
        cfg.cluster.min_budget_tokens = min_budget;
        cfg.cluster.query_aware = variants[vi].query_aware;
        cfg.cluster.outlier_fraction = variants[vi].outliers;
        cfg.cluster.estimate = variants[vi].estimate;
        cfg.cluster.spread_weight = variants[vi].spread;
        cfg.cluster.two_level = variants[vi].two_level;
        cfg.cluster.refine_iters = variants[vi].refine;
        cfg.cluster.calibrate_queries = variants[vi].calibrate;
        cfg.cluster.group_select = variants[vi].group;
        cfg.cluster.top_p = variants[vi].top_p;
        cfg.cluster.rescore = variants[vi].rescore;
        cfg.cluster.rescore_clusters = variants[vi].whole;
        cfg.cluster.rescore_bits = variants[vi].bits;
        if (variants[vi].pool && !variants[vi].whole) return 2;  // pool: whole clusters only
        cfg.cluster.scale = static_cast<float>(scale);
        idx[vi] = MakeIndex(IndexKind::kCluster, cfg, d).value();
        const auto t0 = std::chrono::steady_clock::now();
        if (auto s = idx[vi]->Build(stores[vi], prompt_q.data(),
                                    static_cast<int64_t>(prompt_q.size() / d));
            !s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          return 1;
        }
        stats[vi].build_s +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        orig[vi].resize(cold);
        std::iota(orig[vi].begin(), orig[vi].end(), 0);
        int64_t b;
        std::vector<int64_t> order;
        if (idx[vi]->TakeRowOrder(&b, &order)) {
          if (!stores[vi].PermuteRows(b, order).ok()) return 1;
          std::vector<int64_t> o2(orig[vi]);
          for (std::size_t i = 0; i < order.size(); ++i) o2[b + i] = orig[vi][b + order[i]];
          orig[vi] = o2;
        }
      }
      const int64_t covered = idx[0]->size();
      // CLUSTER_EVAL_VALUE_CODES: per variant selecting on codes, value codes of each width.
      std::vector<std::vector<std::vector<SegmentCodes>>> vcodes(variants.size());
      for (std::size_t vi = 0; vi < variants.size() && value_codes; ++vi)
        if (variants[vi].bits > 0 && (variants[vi].rescore <= 1.f || variants[vi].whole))
          for (int bits : kValueBits)
            vcodes[vi].push_back(EncodeValues(*GetClusterSummary(*idx[vi]), orig[vi], cv.data(), d,
                                              segment, covered, bits));
      // The pool as 0.3.5's DirectStep ran it, the tail included (hot_cache_fraction 0.1 of the
      // cold rows, 8-row blocks, second-chance admission, at most an eighth of the pages per
      // step); the per-policy pools below show the selection alone.
      const int64_t pages = std::max<int64_t>(1, (cold / 10 + kBlock - 1) / kBlock);
      std::vector<runtime::BlockPageCache> pools;
      std::vector<std::vector<runtime::BlockPageCache>> sel_pools(variants.size());
      std::vector<std::vector<std::vector<LazyBlock>>> lazy(
          variants.size(), std::vector<std::vector<LazyBlock>>(
                               policies.size(), std::vector<LazyBlock>(covered / kBlock + 1)));
      for (std::size_t vi = 0; vi < variants.size(); ++vi) {
        pools.emplace_back(1, pages, 2, std::max<int64_t>(64, pages / 8));
        for (const PoolPolicy& pp : policies) {
          const int64_t sp = std::max<int64_t>(
              1, (static_cast<int64_t>(pp.fraction * covered) + kBlock - 1) / kBlock);
          sel_pools[vi].emplace_back(1, sp, pp.admit_after,
                                     pp.cap_div > 0 ? std::max<int64_t>(64, sp / pp.cap_div) : 0);
        }
      }
      std::vector<runtime::BlockPageCache> cap_pools;
      std::vector<std::vector<LazyBlock>> cap_lazy(cap_runs.size(),
                                                   std::vector<LazyBlock>(covered / kBlock + 1));
      // CLUSTER_EVAL_CAP_POOL: the pool's share of the clustered rows (hot_cache_fraction) [0.1].
      const char* cap_pool_env = std::getenv("CLUSTER_EVAL_CAP_POOL");
      const double cap_pool = cap_pool_env != nullptr ? std::atof(cap_pool_env) : 0.1;
      for (std::size_t ci = 0; ci < cap_runs.size(); ++ci)
        cap_pools.emplace_back(
            1,
            std::max<int64_t>(1, (static_cast<int64_t>(cap_pool * covered) + kBlock - 1) / kBlock),
            1, 0);
      for (int step = 0; step < steps; ++step) {
        // Every variant's results for the group's queries of this step; the rows of the kv head
        // (their union) are what a step reads.
        std::vector<std::vector<SearchResult>> results(nruns, std::vector<SearchResult>(g));
        {
          std::vector<float> qs(dq.data() + (static_cast<std::size_t>(step) * qh + h * g) * d,
                                dq.data() + (static_cast<std::size_t>(step) * qh + h * g + g) * d);
          SearchParams sp;
          sp.k = 1;
          for (std::size_t vi = 0; vi < variants.size(); ++vi) {
            // The clusters whose blocks all hold pages in this variant's pool as the step begins.
            std::vector<uint8_t> resident;
            sp.resident = nullptr;
            if (variants[vi].pool) {
              const ClusterSummary& cs = *GetClusterSummary(*idx[vi]);
              resident.assign(cs.num_clusters(), 0);
              for (int64_t c = 0; c < cs.num_clusters(); ++c) {
                bool all = cs.size[c] > 0;
                for (int64_t b = cs.begin[c] / kBlock;
                     all && b <= (cs.begin[c] + cs.size[c] - 1) / kBlock; ++b)
                  all = pools[vi].page(0, b) >= 0;
                resident[c] = all ? 1 : 0;
              }
              sp.resident = resident.data();
            }
            if (variants[vi].group) {
              if (!idx[vi]->SearchGroup(stores[vi], qs.data(), g, sp, results[vi].data()).ok())
                return 1;
            } else {
              for (int j = 0; j < g; ++j)
                if (!idx[vi]
                         ->Search(stores[vi], qs.data() + static_cast<std::size_t>(j) * d, sp,
                                  &results[vi][j])
                         .ok())
                  return 1;
            }
            std::vector<char> seen(covered, 0);
            int64_t uni = 0;
            for (int j = 0; j < g; ++j)
              for (int64_t id : results[vi][j].ids) uni += seen[id] == 0 ? (seen[id] = 1) : 0;
            stats[vi].kv_tokens += double(uni) / cold;
            ++stats[vi].kv_n;
            // The tail (rows no segment covers yet) first, then the selection's blocks, as
            // DirectStep::Admit orders them; a partial last block never gets a page.
            runtime::BlockPageCache& pool = pools[vi];
            Stats& P = stats[vi];
            pool.NextStep();
            for (auto& sp : sel_pools[vi]) sp.NextStep();
            const int64_t full_blocks = cold / kBlock;
            auto use = [&](int64_t b, int64_t rows) {
              const bool had = pool.page(0, b) >= 0;
              const bool hit = pool.Use(0, b, b < full_blocks);
              if (!had && pool.page(0, b) >= 0) ++P.pool_fills;
              P.pool_rows += rows;
              if (hit) P.pool_hit_rows += rows;
            };
            for (int64_t b = covered / kBlock; b < (cold + kBlock - 1) / kBlock; ++b)
              use(b, std::min(cold, (b + 1) * kBlock) - std::max(covered, b * kBlock));
            // The selection's blocks: (block, rows read there, their bits).
            struct Read {
              int64_t block, rows;
              uint32_t bits;
            };
            std::vector<Read> reads;
            for (int64_t b = 0; b * kBlock < covered; ++b) {
              Read rd{b, 0, 0};
              for (int64_t r = b * kBlock; r < std::min(covered, (b + 1) * kBlock); ++r)
                if (seen[r]) {
                  ++rd.rows;
                  rd.bits |= 1u << (r - b * kBlock);
                }
              if (rd.rows == 0) continue;
              if ((b + 1) * kBlock <= covered) {
                use(b, rd.rows);
                reads.push_back(rd);
              } else {
                P.pool_rows += rd.rows;  // shares its block with the tail: counted there
              }
            }
            // Per policy, as the runtime orders it: the step reads (hits decided by the pages
            // as the step began), then the policy sees the step's blocks, hits first.
            for (std::size_t pi = 0; pi < policies.size(); ++pi) {
              runtime::BlockPageCache& sp = sel_pools[vi][pi];
              std::vector<LazyBlock>& lz = lazy[vi][pi];
              for (const Read& rd : reads) {
                P.sel_rows[pi] += rd.rows;
                const int32_t page = sp.page(0, rd.block);
                if (!policies[pi].lazy) {
                  if (page >= 0) P.sel_hit_rows[pi] += rd.rows;
                  continue;
                }
                LazyBlock& lb = lz[rd.block];
                if (page < 0 || lb.page != page) lb = {page, 0};
                P.sel_hit_rows[pi] += std::popcount(rd.bits & lb.valid);
                if (page >= 0) lb.valid |= rd.bits;  // read now: valid from the next step
              }
              for (const Read& rd : reads) (void)sp.Use(0, rd.block, false);
              for (const Read& rd : reads) {
                if (sp.page(0, rd.block) >= 0) continue;  // a hit, seen above
                (void)sp.Use(0, rd.block, true);
                const int32_t page = sp.page(0, rd.block);
                if (page >= 0 && !policies[pi].lazy) ++P.sel_fills[pi];
                // Staged: the rows this step read join the page the block gets after it.
                if (page >= 0 && policies[pi].lazy == 2) lz[rd.block] = {page, rd.bits};
              }
            }
            ++P.pool_steps;
          }
          for (std::size_t ci = 0; ci < cap_runs.size(); ++ci)
            CapStep(*GetClusterSummary(*idx[cap_runs[ci].base]), qs.data(), g,
                    static_cast<float>(scale), variants[cap_runs[ci].base].spread, budget_fraction,
                    min_budget, covered, cap_runs[ci].rule, &cap_pools[ci], &cap_lazy[ci],
                    results[nv + ci].data(), &stats[nv + ci]);
        }
        for (int j = 0; j < g; ++j) {
          const int qi = h * g + j;
          const float* q = dq.data() + (static_cast<std::size_t>(step) * qh + qi) * d;
          auto dot = [&](const float* k) {
            double a = 0;
            for (int t = 0; t < d; ++t) a += double(q[t]) * k[t];
            return a * scale;
          };
          // Exact part: sinks, window, uncovered cold rows, decode tokens up to this step.
          std::vector<float> ek, ev;
          auto add = [&](const float* k, const float* v) {
            ek.insert(ek.end(), k, k + d);
            ev.insert(ev.end(), v, v + d);
          };
          for (int64_t t = 0; t < sinks; ++t)
            add(pk.data() + (t * kvh + h) * d, pv.data() + (t * kvh + h) * d);
          for (int64_t t = p_tok - window; t < p_tok; ++t)
            add(pk.data() + (t * kvh + h) * d, pv.data() + (t * kvh + h) * d);
          for (int64_t r = covered; r < cold; ++r) add(ck.data() + r * d, cv.data() + r * d);
          for (int t = 0; t <= step; ++t)
            add(dk.data() + (static_cast<std::size_t>(t) * kvh + h) * d,
                dv.data() + (static_cast<std::size_t>(t) * kvh + h) * d);
          const int64_t ne = static_cast<int64_t>(ek.size() / d);
          std::vector<double> es(ne);
          for (int64_t r = 0; r < ne; ++r) es[r] = dot(ek.data() + r * d);
          std::vector<int64_t> eall(ne);
          std::iota(eall.begin(), eall.end(), 0);
          const State exact_part = Attend(es, eall, ev.data(), d);
          // Cold scores (covered rows only are the index's business).
          std::vector<double> cs(covered);
          for (int64_t r = 0; r < covered; ++r) cs[r] = dot(ck.data() + r * d);
          std::vector<int64_t> call(covered);
          std::iota(call.begin(), call.end(), 0);
          State ref = exact_part;
          const State cold_all = Attend(cs, call, cv.data(), d);
          Merge(&ref, cold_all);
          std::vector<int64_t> by_score(call);
          std::sort(by_score.begin(), by_score.end(), [&](int64_t a, int64_t b) {
            return cs[a] > cs[b] || (cs[a] == cs[b] && a < b);
          });
          std::vector<char> top100(covered, 0);
          for (int64_t i = 0; i < std::min<int64_t>(100, covered); ++i) top100[by_score[i]] = 1;
          auto mass_of = [&](const std::vector<int64_t>& rows) {
            double m = 0;
            for (int64_t r : rows) m += std::exp(cs[r] - cold_all.lse);
            return m;
          };
          auto recall_of = [&](const std::vector<int64_t>& rows) {
            int64_t hit = 0;
            for (int64_t r : rows) hit += top100[r];
            return double(hit) / std::min<int64_t>(100, covered);
          };
          for (std::size_t vi = 0; vi < nruns; ++vi) {
            const SearchResult& res = results[vi][j];
            std::vector<int64_t> rows;
            for (int64_t id : res.ids) rows.push_back(orig[base_of(vi)][id]);
            State st = exact_part;
            Merge(&st, Attend(cs, rows, cv.data(), d));
            const State st_attended = st;
            if (!res.est_o.empty() && res.est_lse > -INFINITY) {
              State est;
              est.o.assign(res.est_o.begin(), res.est_o.end());
              est.lse = res.est_lse;
              Merge(&st, est);
              const double miss = 1.0 - mass_of(rows);
              if (miss > 1e-12) {
                stats[vi].est_log += res.est_lse - (cold_all.lse + std::log(miss));
                ++stats[vi].est_n;
              }
            }
            if (oracle && vi < nv && variants[vi].rescore <= 1.f && !res.est_o.empty() &&
                res.est_lse > -INFINITY) {
              const ClusterSummary& cs_sum = *GetClusterSummary(*idx[vi]);
              std::vector<char> taken(covered, 0);
              for (int64_t id : res.ids) taken[id] = 1;
              const int64_t nc = cs_sum.num_clusters();
              std::vector<float> cscore(nc), dens(nc), cen(d);
              for (int64_t c = 0; c < nc; ++c) {
                ConvertToF32(cs_sum.centroid.data() + c * d, DType::kBF16, d, cen.data());
                double a = 0;
                for (int t = 0; t < d; ++t) a += double(q[t]) * cen[t];
                cscore[c] = static_cast<float>(a);
              }
              float qn2 = 0;
              for (int t = 0; t < d; ++t) qn2 += q[t] * q[t];
              ClusterDensity(cs_sum, cscore.data(), qn2, static_cast<float>(scale),
                             variants[vi].spread, dens.data());
              State om = st_attended, ov = st_attended, vb;
              vb.o.assign(d, 0);
              for (int64_t c = 0; c < nc; ++c) {
                if (cs_sum.size[c] <= 0 || taken[cs_sum.begin[c]]) continue;
                std::vector<int64_t> crow;
                for (int64_t i = 0; i < cs_sum.size[c]; ++i)
                  crow.push_back(orig[vi][cs_sum.begin[c] + i]);
                const State truth = Attend(cs, crow, cv.data(), d);
                ConvertToF32(cs_sum.value_mean.data() + c * d, DType::kBF16, d, cen.data());
                for (int t = 0; t < d; ++t) vb.o[t] = cen[t];
                vb.lse = truth.lse;
                Merge(&om, vb);
                State tv = truth;
                tv.lse = dens[c] + std::log(double(cs_sum.size[c]));
                Merge(&ov, tv);
              }
              stats[vi].err_om.push_back(RelErr(om, ref));
              stats[vi].err_ov.push_back(RelErr(ov, ref));
            }
            if (vi < nv && !vcodes[vi].empty()) {
              // The unselected clusters at their key codes' masses (the estimate's), each with
              // the value its rows' code scores weight: on exact values, and on value codes.
              const ClusterSummary& cs_sum = *GetClusterSummary(*idx[vi]);
              const SegmentCodes& kc = *GetClusterCodes(*idx[vi]);
              const int kbits = variants[vi].bits;
              const int64_t rbk = CodeRowBytes(d, kbits);
              std::vector<char> taken(covered, 0);
              for (int64_t id : res.ids) taken[id] = 1;
              State vx = st_attended;
              std::vector<State> vc(std::size(kValueBits), st_attended);
              std::vector<float> sc, vm(d);
              std::vector<double> w;
              for (int64_t c = 0; c < cs_sum.num_clusters(); ++c) {
                const int64_t b = cs_sum.begin[c], n = cs_sum.size[c], sg = b / segment;
                if (n <= 0 || taken[b]) continue;
                const CodeScorer ks(q, d, kbits, kc.offset.data() + sg * d,
                                    kc.step.data() + sg * d);
                sc.resize(n);
                ks.Score(cs_sum.centroid.data() + c * d, kc.code.data() + b * rbk, n, sc.data());
                double m = -INFINITY, l = 0;
                for (float x : sc) m = std::max(m, double(x) * scale);
                w.resize(n);
                for (int64_t r = 0; r < n; ++r) l += (w[r] = std::exp(double(sc[r]) * scale - m));
                State x;
                x.o.assign(d, 0.0);
                x.lse = m + std::log(l);
                for (int64_t r = 0; r < n; ++r) {
                  const float* v = cv.data() + orig[vi][b + r] * d;
                  for (int t = 0; t < d; ++t) x.o[t] += w[r] / l * v[t];
                }
                Merge(&vx, x);
                ConvertToF32(cs_sum.value_mean.data() + c * d, DType::kBF16, d, vm.data());
                for (std::size_t bi = 0; bi < std::size(kValueBits); ++bi) {
                  const SegmentCodes& vcs = vcodes[vi][bi][sg];
                  const int vbits = kValueBits[bi];
                  const int64_t rbv = CodeRowBytes(d, vbits);
                  State y;
                  y.o.assign(d, 0.0);
                  y.lse = x.lse;
                  for (int64_t r = 0; r < n; ++r) {
                    const uint8_t* row = vcs.code.data() + (b - sg * segment + r) * rbv;
                    for (int t = 0; t < d; ++t)
                      y.o[t] +=
                          w[r] / l *
                          (vm[t] + vcs.offset[t] + vcs.step[t] * float(CodeAt(row, t, vbits)));
                  }
                  Merge(&vc[bi], y);
                }
              }
              stats[vi].err_vx.push_back(RelErr(vx, ref));
              for (std::size_t bi = 0; bi < std::size(kValueBits); ++bi)
                stats[vi].err_vc[bi].push_back(RelErr(vc[bi], ref));
            }
            const std::vector<int64_t> flat(by_score.begin(), by_score.begin() + rows.size());
            State fs = exact_part;
            Merge(&fs, Attend(cs, flat, cv.data(), d));
            Stats& S = stats[vi];
            S.err.push_back(RelErr(st, ref));
            S.flat_err.push_back(RelErr(fs, ref));
            S.tokens += double(rows.size()) / cold;
            S.recall += recall_of(rows);
            S.flat_recall += recall_of(flat);
            S.mass += mass_of(rows);
            S.flat_mass += mass_of(flat);
            ++S.n;
          }
        }
      }
    }
  }
  if (stats[0].n == 0) {
    std::fprintf(stderr, "no covered cold rows: lower segment_tokens\n");
    return 1;
  }
  std::printf("%-24s %7s %7s %8s %8s %8s %8s %6s %6s %6s %6s %6s %6s %7s %6s %8s %8s\n", "variant",
              "tokens%", "kv%", "err", "err_p99", "flat", "flat_p99", "ratio", "rec", "f_rec",
              "mass", "f_mass", "estlog", "build_s", "hit%", "miss_kB", "fill_kB");
  const double kv_row_bytes = 2.0 * d * DTypeSize(meta.dtype);  // a row's key and value
  for (std::size_t vi = 0; vi < variants.size(); ++vi) {
    const Stats& S = stats[vi];
    const double n = std::max<int64_t>(S.n, 1);
    const double em = std::accumulate(S.err.begin(), S.err.end(), 0.0) / n;
    const double fm = std::accumulate(S.flat_err.begin(), S.flat_err.end(), 0.0) / n;
    const double ps = std::max<int64_t>(S.pool_steps, 1);
    std::printf(
        "%-24s %7.2f %7.2f %8.4f %8.4f %8.4f %8.4f %6.2f %6.3f %6.3f %6.3f %6.3f %6.2f %7.3f %6.1f "
        "%8.1f %8.1f\n",
        variants[vi].name, 100 * S.tokens / n, 100 * S.kv_tokens / std::max<int64_t>(S.kv_n, 1), em,
        Pct(S.err, 0.99), fm, Pct(S.flat_err, 0.99), em / std::max(fm, 1e-30), S.recall / n,
        S.flat_recall / n, S.mass / n, S.flat_mass / n, S.est_n ? S.est_log / S.est_n : 0.0,
        S.build_s / (layers * kvh), 100.0 * S.pool_hit_rows / std::max<int64_t>(S.pool_rows, 1),
        (S.pool_rows - S.pool_hit_rows) * kv_row_bytes / ps / 1024,
        S.pool_fills * 8 * kv_row_bytes / ps / 1024);
  }
  std::printf(
      "\nselection only, per kv head and step (pool: fraction of the clustered rows / "
      "admit_after / admissions cap divisor)\n%-24s %-12s %7s %9s %9s %9s\n",
      "variant", "pool", "hit%", "miss_kB", "fill_kB", "pcie_kB");
  for (std::size_t vi = 0; vi < variants.size(); ++vi)
    for (std::size_t pi = 0; pi < policies.size(); ++pi) {
      const Stats& S = stats[vi];
      const double ps = std::max<int64_t>(S.pool_steps, 1);
      const double miss = (S.sel_rows[pi] - S.sel_hit_rows[pi]) * kv_row_bytes / ps / 1024;
      const double fill = S.sel_fills[pi] * 8 * kv_row_bytes / ps / 1024;
      char name[32];
      std::snprintf(name, sizeof(name), "%.2f/%d/%d%s", policies[pi].fraction,
                    policies[pi].admit_after, policies[pi].cap_div,
                    policies[pi].lazy == 2 ? "/staged"
                    : policies[pi].lazy    ? "/lazy"
                                           : "");
      std::printf("%-24s %-12s %7.1f %9.1f %9.1f %9.1f\n", variants[vi].name, name,
                  100.0 * S.sel_hit_rows[pi] / std::max<int64_t>(S.sel_rows[pi], 1), miss, fill,
                  miss + fill);
    }
  if (oracle) {
    std::printf(
        "\nthe estimate's error taken apart (CLUSTER_EVAL_ORACLE): mean (p99)\n%-24s %16s "
        "%16s %16s\n",
        "variant", "err", "true_mass_err", "true_value_err");
    for (std::size_t vi = 0; vi < variants.size(); ++vi) {
      const Stats& S = stats[vi];
      if (S.err_om.empty()) continue;
      auto mean = [](const std::vector<double>& x) {
        return std::accumulate(x.begin(), x.end(), 0.0) / std::max<std::size_t>(x.size(), 1);
      };
      std::printf("%-24s %8.4f (%5.3f) %8.4f (%5.3f) %8.4f (%5.3f)\n", variants[vi].name,
                  mean(S.err), Pct(S.err, 0.99), mean(S.err_om), Pct(S.err_om, 0.99),
                  mean(S.err_ov), Pct(S.err_ov, 0.99));
    }
  }
  if (value_codes) {
    std::printf(
        "\nthe unselected clusters' values from their rows, weighted by their key codes "
        "(CLUSTER_EVAL_VALUE_CODES): mean (p99) and ratio to flat\n%-24s %20s %20s %20s %20s "
        "%20s\n",
        "variant", "value means", "exact values", "4-bit values", "2-bit values", "1-bit values");
    auto mean = [](const std::vector<double>& x) {
      return std::accumulate(x.begin(), x.end(), 0.0) / std::max<std::size_t>(x.size(), 1);
    };
    for (std::size_t vi = 0; vi < variants.size(); ++vi) {
      const Stats& S = stats[vi];
      if (S.err_vx.empty()) continue;
      const double fm = std::max(mean(S.flat_err), 1e-30);
      std::printf("%-24s", variants[vi].name);
      for (const std::vector<double>* e :
           {&S.err, &S.err_vx, &S.err_vc[0], &S.err_vc[1], &S.err_vc[2]})
        std::printf("  %7.4f (%5.3f) %4.2f", mean(*e), Pct(*e, 0.99), mean(*e) / fm);
      std::printf("\n");
    }
  }
  if (!cap_runs.empty())
    std::printf(
        "\nmiss-capped group selection (staged pool CLUSTER_EVAL_CAP_POOL/1/0, outliers resident), "
        "per kv head and "
        "step\n%-32s %7s %8s %8s %8s %8s %6s %6s %6s %7s %9s %9s\n",
        "run", "kv%", "err", "err_p99", "flat", "flat_p99", "ratio", "mass", "f_mass", "hit%",
        "miss_kB", "defer_kB");
  for (std::size_t ci = 0; ci < cap_runs.size(); ++ci) {
    const Stats& S = stats[nv + ci];
    const double n = std::max<int64_t>(S.n, 1);
    const double em = std::accumulate(S.err.begin(), S.err.end(), 0.0) / n;
    const double fm = std::accumulate(S.flat_err.begin(), S.flat_err.end(), 0.0) / n;
    std::printf("%-32s %7.2f %8.4f %8.4f %8.4f %8.4f %6.2f %6.3f %6.3f %7.1f %9.1f %9.1f\n",
                cap_runs[ci].name.c_str(), 100 * S.kv_tokens / std::max<int64_t>(S.kv_n, 1), em,
                Pct(S.err, 0.99), fm, Pct(S.flat_err, 0.99), em / std::max(fm, 1e-30), S.mass / n,
                S.flat_mass / n,
                100.0 * (S.cap_rows - S.cap_miss_rows) / std::max<int64_t>(S.cap_rows, 1),
                S.cap_miss_rows * kv_row_bytes / std::max<int64_t>(S.kv_n, 1) / 1024,
                S.cap_fill_rows * kv_row_bytes / std::max<int64_t>(S.kv_n, 1) / 1024);
  }
  return 0;
}
