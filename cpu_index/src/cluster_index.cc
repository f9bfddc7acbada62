// cluster: the KeyIndex adapter of the two-level cold tier (cluster.h). Covers whole segments of
// `segment_tokens` rows (rows past the last full segment are left to the caller's exact scan),
// lays each covered segment out cluster-contiguous through TakeRowOrder, and answers a search
// with the rows of the selected clusters plus the outliers, and the estimated state of the rest.
//
// SearchParams.k: the floor of the cluster-token budget; the budget is
//   max(k, ceil(budget_fraction * clustered rows), min_budget_tokens)
// tokens of selected clusters (the last cluster may overshoot it), plus every outlier. ids may
// therefore hold more than k rows. `scores` is left empty (the search scores centroids, not the
// returned rows). effort is ignored.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "bf16_tiles.h"
#include "index_common.h"
#include "kinds.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/dot.h"
#include "kvrt_cpu_index/exp_sum.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/task_arena.h"
#include "parallel_range.h"

namespace kvrt::cpu_index {
namespace {
constexpr int64_t kMaxRows = int64_t{1} << 40;
// A group search's clusters per task: about kGroupTaskMacs multiply-adds of nq queries against
// dim-wide rows (512 clusters for 4 queries of 128; 32 for DeepSeek's latent, 16 queries of 576,
// whose 1505 clusters at 32K were 3 tasks for 16 cores at 512).
constexpr int64_t kGroupTaskMacs = int64_t{1} << 18;
int64_t GroupGrain(int nq, int dim) {
  return nq > 1 ? std::max<int64_t>(32, kGroupTaskMacs / (int64_t{nq} * dim)) : kMaxRows;
}
using internal::ParallelRange;
}  // namespace

class ClusterIndex final : public KeyIndex {
 public:
  ClusterIndex(const IndexConfig& config, int dim)
      : config_(config),
        cfg_(config.cluster),
        dim_(dim),
        scale_(cfg_.scale != 0.f ? cfg_.scale : 1.f / std::sqrt(static_cast<float>(dim))) {
    summary_.dim = dim;
  }
  IndexKind kind() const override { return IndexKind::kCluster; }

  absl::Status Build(const HeadStore& store, const float* queries, int64_t n_queries) override {
    if (auto s = internal::CheckBuild(store, dim_, queries, n_queries, kMaxRows); !s.ok()) return s;
    if (cfg_.cluster_size <= 0 || cfg_.segment_tokens < cfg_.cluster_size) {
      return absl::InvalidArgumentError("cluster index: need 0 < cluster_size <= segment_tokens");
    }
    if (cfg_.rescore_bits != 0 && !ValidCodeBits(cfg_.rescore_bits)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cluster index: rescore_bits = ", cfg_.rescore_bits, " must be 0, 1, 2, 4 or 8"));
    }
    if (cfg_.value_bits != 0 && (!ValidCodeBits(cfg_.value_bits) || !SelectsOnCodes(cfg_))) {
      return absl::InvalidArgumentError(
          absl::StrCat("cluster index: value_bits = ", cfg_.value_bits,
                       " must be 0, or 1, 2, 4 or 8 with rescore_bits > 0 and rescore <= 1 "
                       "(selection on codes)"));
    }
    summary_ = ClusterSummary{};
    summary_.dim = dim_;
    log_size_.clear();
    pending_order_.clear();
    codes_ = SegmentCodes{};
    value_codes_ = SegmentCodes{};
    size_ = 0;
    timeline::Span span_metric("cluster_query_metric");
    metric_l_ =
        QueryMetricFactor(cfg_.query_aware ? queries : nullptr, cfg_.query_aware ? n_queries : 0,
                          dim_, cfg_.metric_queries, cfg_.active_dim);
    span_metric.End();
    calib_q_.clear();
    // As the metric: too few queries fit the spreads to a handful of directions.
    if (cfg_.calibrate_queries > 0 && queries != nullptr &&
        std::min<int64_t>(n_queries, cfg_.calibrate_queries) >= MinMetricQueries(dim_)) {
      const int64_t nq = std::min<int64_t>(n_queries, cfg_.calibrate_queries);
      calib_q_.assign(queries + (n_queries - nq) * dim_, queries + n_queries * dim_);
    }
    built_ = true;
    return Cover(store);
  }

  absl::Status Add(const HeadStore& store) override {
    if (auto s = internal::CheckAdd(store, dim_, built_, size_, kMaxRows); !s.ok()) return s;
    return Cover(store);
  }

  bool TakeRowOrder(int64_t* begin, std::vector<int64_t>* order) override {
    if (pending_order_.empty()) return false;
    *begin = pending_begin_;
    order->swap(pending_order_);
    pending_order_.clear();
    return true;
  }

  absl::Status Search(const HeadStore& store, const float* q, const SearchParams& params,
                      SearchResult* out) const override {
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, q, params, out); !s.ok())
      return s;
    std::vector<float> scores(summary_.num_clusters());
    if (!CentroidScoresOnTiles(q, 1, scores.data()))
      DotRows(q, summary_.centroid.data(), dim_, DType::kBF16, static_cast<int64_t>(scores.size()),
              dim_, scores.data());
    std::vector<float> oscores(summary_.outliers.size());
    store.DotIds(q, summary_.outliers.data(), static_cast<int64_t>(oscores.size()), oscores.data());
    Finish(store, q, scores.data(), oscores.data(), params, out);
    return absl::OkStatus();
  }

  absl::Status SearchGroup(const HeadStore& store, const float* qs, int nq,
                           const SearchParams& params, SearchResult* outs) const override {
    if (nq <= 0 || qs == nullptr || outs == nullptr)
      return absl::InvalidArgumentError(
          "index search: need nq > 0 queries and an output per query");
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, qs, params, outs); !s.ok())
      return s;
    const int64_t c = summary_.num_clusters();
    const int64_t no = static_cast<int64_t>(summary_.outliers.size());
    // Every centroid read once for the whole group (bit-identical to Search's scores). A wide
    // group (an MQA model's 48 q heads over one kv head) is one unit of the runtime's parallel
    // loop, so its passes over the clusters and its queries run in parallel here; each cluster's
    // and each query's arithmetic is the one a serial pass does.
    // The phases' spans (KVRT_TIMELINE) say where a wide group's search goes.
    timeline::Span span_scores("search_scores", nq);
    std::vector<float> cs, scores(static_cast<std::size_t>(nq) * c);
    const bool tiles = CentroidScoresOnTiles(qs, nq, scores.data());
    if (!tiles) {
      cs.resize(scores.size());
      ParallelRange(c, GroupGrain(nq, dim_), [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          DotRowMulti(qs, nq, summary_.centroid.data() + static_cast<std::size_t>(j) * dim_, dim_,
                      DType::kBF16, cs.data() + j * nq);
        }
      });
    }
    std::vector<float> os(static_cast<std::size_t>(no) * nq),
        oscores(static_cast<std::size_t>(nq) * no);
    ParallelRange(no, GroupGrain(nq, dim_), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        DotRowMulti(qs, nq, store.key(summary_.outliers[j]), dim_, store.dtype(),
                    os.data() + j * nq);
      }
    });
    ParallelRange(nq, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (!tiles)
          for (int64_t j = 0; j < c; ++j) scores[i * c + j] = cs[j * nq + i];
        for (int64_t j = 0; j < no; ++j) oscores[i * no + j] = os[j * nq + i];
      }
    });
    span_scores.End();
    if (!cfg_.group_select || nq == 1) {
      // Selecting on codes, every query scores every cluster's rows: one pass over the codes for
      // the whole group, each query's masses as its own pass would give them.
      CodeMasses masses;
      if (CodeSelect() && nq > 1) ComputeCodeMasses(store, qs, nq, &masses);
      ParallelRange(nq, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          Finish(store, qs + static_cast<std::size_t>(i) * dim_, scores.data() + i * c,
                 oscores.data() + i * no, params, &outs[i], masses.lse.empty() ? nullptr : &masses,
                 static_cast<int>(i));
        }
      });
      return absl::OkStatus();
    }
    // One selection for the group, by the group key; each query's own estimate.
    timeline::Span span_key("search_group_key", nq);
    std::vector<float> density(static_cast<std::size_t>(nq) * c), key(c);
    ParallelRange(nq, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        Density(qs + static_cast<std::size_t>(i) * dim_, scores.data() + i * c,
                density.data() + i * c);
    });
    GroupSelectionKey(summary_, density.data(), nq, log_size_.data(), key.data());
    span_key.End();
    timeline::Span span_select("search_select", nq);
    std::vector<int32_t> sel;
    const int64_t tokens =
        SelectClusters(summary_, key.data(), Candidates(params), CandidateTopP(), &sel);
    Rescored rescored;
    if (Rescoring()) SecondStage(store, qs, nq, sel, params, density.data(), &rescored);
    // The outliers in the summary's order for every query: the group's heads then hold the same
    // rows in the same order, which the runtime attends in one pass for all of them.
    ParallelRange(nq, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        Emit(density.data() + i * c, sel, tokens, oscores.data() + i * no, &outs[i],
             /*outliers_by_score=*/false, /*estimate=*/false, Rescoring() ? &rescored : nullptr);
      }
    });
    span_select.End();
    if (cfg_.estimate) {
      KVRT_SPAN("search_estimate", nq);
      // Every query's estimate in one pass over the value means (each query's as alone), a pass
      // per GroupPassHeads() queries of a wide group.
      std::vector<float> eo(static_cast<std::size_t>(nq) * dim_), el(nq);
      ParallelRange(nq, GroupPassHeads(config_.host_tiles), [&](int64_t i0, int64_t i1) {
        EstimateUnselectedGroup(summary_, density.data() + i0 * c, static_cast<int>(i1 - i0), sel,
                                log_size_.data(), eo.data() + i0 * dim_, el.data() + i0,
                                config_.host_tiles);
      });
      for (int i = 0; i < nq; ++i) {
        float* o = eo.data() + static_cast<std::size_t>(i) * dim_;
        if (Rescoring())
          MergeInto(o, &el[i], rescored.rest_o.data() + static_cast<std::size_t>(i) * dim_,
                    rescored.rest_lse[i], dim_);
        outs[i].est_lse = el[i];
        if (el[i] == -std::numeric_limits<float>::infinity()) continue;  // est_o stays empty
        outs[i].est_o.assign(o, o + dim_);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Preset(int64_t begin, std::vector<SegmentClustering> parts, bool laid_out) {
    if (begin != size_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cluster index: preset segments start at row ", begin, ", the index covers ", size_));
    }
    for (const SegmentClustering& p : parts) {
      if (static_cast<int64_t>(p.order.size()) != cfg_.segment_tokens ||
          p.centroid.size() != p.size.size() * static_cast<std::size_t>(dim_) ||
          p.value_mean.size() != p.centroid.size() || p.spread.size() != p.size.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("cluster index: a preset segment must hold ", cfg_.segment_tokens,
                         " rows and dim ", dim_, " means for each of its clusters"));
      }
    }
    preset_begin_ = begin;
    preset_ = std::move(parts);
    preset_laid_out_ = laid_out;
    return absl::OkStatus();
  }

  const ClusterSummary& summary() const { return summary_; }
  const SegmentCodes* codes() const { return Coded() ? &codes_ : nullptr; }
  const SegmentCodes* value_codes() const { return ValueCoded() ? &value_codes_ : nullptr; }
  int64_t size() const override { return size_; }
  int64_t CoverableRows(int64_t store_rows) const override {
    return store_rows / cfg_.segment_tokens * cfg_.segment_tokens;
  }
  std::size_t MemoryBytes() const override {
    return summary_.Bytes() + codes_.code.size() + value_codes_.code.size() +
           (metric_l_.size() + calib_q_.size() + codes_.offset.size() + codes_.step.size() +
            value_codes_.offset.size() + value_codes_.step.size()) *
               sizeof(float) +
           pending_order_.capacity() * sizeof(int64_t);
  }

 private:
  // out [nq, c] <- every query's score of every centroid, on the tiles (bf16_tiles.h) in tasks of
  // whole kTileRows blocks; false where they do not run (the caller scores in f32).
  bool CentroidScoresOnTiles(const float* qs, int nq, float* out) const {
    const int64_t c = summary_.num_clusters();
    if (c == 0 || !config_.host_tiles) return false;
    const auto rows = internal::TileRows::Strided(summary_.centroid.data(), dim_);
    const int64_t blocks = (c + internal::kTileRows - 1) / internal::kTileRows;
    std::atomic<bool> ok{true};
    ParallelRange(blocks, 1, [&](int64_t b0, int64_t b1) {
      const int64_t j0 = b0 * internal::kTileRows, j1 = std::min(c, b1 * internal::kTileRows);
      const auto at =
          internal::TileRows::Strided(rows.base + static_cast<std::size_t>(j0) * dim_, dim_);
      if (!internal::TileScores(qs, nq, dim_, at, j1 - j0, out + j0, static_cast<std::size_t>(c)))
        ok = false;
    });
    return ok;
  }

  // Clusters every full segment of rows [size_, store.size()).
  absl::Status Cover(const HeadStore& store) {
    const int64_t seg = cfg_.segment_tokens;
    const int64_t nseg = (store.size() - size_) / seg;
    if (nseg == 0) return absl::OkStatus();
    const int64_t begin = size_;
    std::vector<SegmentClustering> parts(nseg);
    std::vector<SegmentCodes> codes(Coded() ? nseg : 0), value_codes(ValueCoded() ? nseg : 0);
    internal::UseSingleThreadedBlas();
    tbb::task_arena arena(internal::BuildThreads(config_));
    arena.execute([&] {
      tbb::parallel_for(int64_t{0}, nseg, [&](int64_t s) {
        const int64_t b = begin + s * seg;
        const int64_t preset = (b - preset_begin_) / seg;
        const bool preset_here =
            b >= preset_begin_ && preset < static_cast<int64_t>(preset_.size());
        if (preset_here) parts[s] = std::move(preset_[preset]);
        if (preset_here && !Coded()) return;
        std::vector<float> k(static_cast<std::size_t>(seg) * dim_), v;
        ConvertToF32(store.key(b), store.dtype(), k.size(), k.data());
        if (!preset_here || ValueCoded()) {
          v.resize(k.size());
          ConvertToF32(store.value(b), store.dtype(), v.size(), v.data());
        }
        if (!preset_here) {
          timeline::Span span_segment("cluster_segment", s);
          ClusterSegment(k.data(), v.data(), seg, dim_, metric_l_.data(), cfg_,
                         cfg_.seed + static_cast<uint64_t>(b), &parts[s]);
          span_segment.End();
          KVRT_SPAN("cluster_spreads", s);
          CalibrateSpreads(k.data(), seg, dim_, calib_q_.data(),
                           static_cast<int64_t>(calib_q_.size()) / dim_, scale_, cfg_.spread_weight,
                           &parts[s]);
        }
        KVRT_SPAN("cluster_codes", s);
        if (Coded()) {
          std::vector<uint16_t> cent(parts[s].centroid.size());
          ConvertFromF32(parts[s].centroid.data(), cent.size(), DType::kBF16, cent.data());
          EncodeResiduals(k.data(), parts[s], cent.data(), dim_, cfg_.rescore_bits, &codes[s],
                          preset_here && preset_laid_out_);
        }
        if (ValueCoded()) {  // from the value means as the summary holds them (bf16)
          std::vector<uint16_t> mean(parts[s].value_mean.size());
          ConvertFromF32(parts[s].value_mean.data(), mean.size(), DType::kBF16, mean.data());
          EncodeResiduals(v.data(), parts[s], mean.data(), dim_, cfg_.value_bits, &value_codes[s],
                          preset_here && preset_laid_out_);
        }
      });
    });
    preset_.clear();  // used, or (rows the caller did not cover) stale
    if (pending_order_.empty()) pending_begin_ = begin;  // else Add follows an untaken Build/Add
    for (int64_t s = 0; s < nseg; ++s) {
      const SegmentClustering& p = parts[s];
      const int64_t b = begin + s * seg;
      int64_t row = b;
      for (std::size_t j = 0; j < p.size.size(); ++j) {
        summary_.begin.push_back(row);
        summary_.size.push_back(p.size[j]);
        log_size_.push_back(std::log(static_cast<float>(p.size[j])));
        summary_.spread.push_back(p.spread[j]);
        row += p.size[j];
      }
      for (int64_t j = 0; j < p.num_outliers; ++j) summary_.outliers.push_back(row + j);
      const std::size_t off = summary_.centroid.size();
      summary_.centroid.resize(off + p.centroid.size());
      summary_.value_mean.resize(off + p.value_mean.size());
      ConvertFromF32(p.centroid.data(), p.centroid.size(), DType::kBF16,
                     summary_.centroid.data() + off);
      ConvertFromF32(p.value_mean.data(), p.value_mean.size(), DType::kBF16,
                     summary_.value_mean.data() + off);
      for (int64_t r : p.order) pending_order_.push_back(b - pending_begin_ + r);
      if (Coded()) {
        codes_.code.insert(codes_.code.end(), codes[s].code.begin(), codes[s].code.end());
        codes_.offset.insert(codes_.offset.end(), codes[s].offset.begin(), codes[s].offset.end());
        codes_.step.insert(codes_.step.end(), codes[s].step.begin(), codes[s].step.end());
      }
      if (ValueCoded()) {
        const SegmentCodes& vc = value_codes[s];
        value_codes_.code.insert(value_codes_.code.end(), vc.code.begin(), vc.code.end());
        value_codes_.offset.insert(value_codes_.offset.end(), vc.offset.begin(), vc.offset.end());
        value_codes_.step.insert(value_codes_.step.end(), vc.step.begin(), vc.step.end());
      }
    }
    size_ = begin + nseg * seg;
    return absl::OkStatus();
  }

  // density [C] of query q from its unscaled centroid scores.
  void Density(const float* q, const float* scores, float* density) const {
    float qn2 = 0;
    for (int t = 0; t < dim_; ++t) qn2 += q[t] * q[t];
    ClusterDensity(summary_, scores, qn2, scale_, cfg_.spread_weight, density);
  }

  int64_t Budget(const SearchParams& params) const {
    const int64_t rows = size_ - static_cast<int64_t>(summary_.outliers.size());
    return std::max<int64_t>(
        {static_cast<int64_t>(params.k),
         static_cast<int64_t>(std::ceil(static_cast<double>(cfg_.budget_fraction) * rows)),
         cfg_.min_budget_tokens});
  }

  // Rows of selected clusters per query: the budget, or with rescoring its multiple (candidates);
  // selecting on codes, every clustered row.
  int64_t Candidates(const SearchParams& params) const {
    if (CodeSelect()) return std::numeric_limits<int64_t>::max();
    const int64_t budget = Budget(params);
    if (!Rescoring()) return budget;
    return static_cast<int64_t>(std::ceil(static_cast<double>(budget) * cfg_.rescore));
  }
  // ClusterConfig::rescore_bits without rescore: every cluster ranked by its rows' codes (a second
  // stage over all clusters, whole clusters kept; the first stage's top_p does not apply).
  bool CodeSelect() const { return SelectsOnCodes(cfg_); }
  bool Rescoring() const { return cfg_.rescore > 1.f || CodeSelect(); }
  bool Coded() const { return Rescoring() && cfg_.rescore_bits > 0; }
  float CandidateTopP() const { return CodeSelect() ? 0.f : cfg_.top_p; }
  bool ValueCoded() const { return EstimatesOnValueCodes(cfg_); }

  // The second stage's scores of candidate rows (unscaled), from the keys or (rescore_bits)
  // from their codes, with one CodeScorer per segment met, for all the queries at once.
  class CandidateScorer {
   public:
    CandidateScorer(const ClusterIndex& index, const HeadStore& store, const float* qs, int nq)
        : index_(index),
          store_(store),
          qs_(qs),
          nq_(nq),
          row_bytes_(index.Coded() ? CodeRowBytes(index.dim_, index.cfg_.rescore_bits) : 0) {}
    // Cluster c's rows for every query of qs: query j's at out + j * stride.
    void Score(int32_t c, float* out, int64_t stride) {
      const ClusterIndex& x = index_;
      const int64_t begin = x.summary_.begin[c];
      if (!x.Coded()) {
        for (int j = 0; j < nq_; ++j)
          DotRows(qs_ + static_cast<std::size_t>(j) * x.dim_, store_.key(begin), x.dim_,
                  store_.dtype(), x.summary_.size[c], static_cast<std::size_t>(x.dim_),
                  out + j * stride);
        return;
      }
      const int64_t seg = begin / x.cfg_.segment_tokens;
      if (scorers_.size() <= static_cast<std::size_t>(seg)) scorers_.resize(seg + 1);
      if (scorers_[seg] == nullptr) {
        const std::size_t off = static_cast<std::size_t>(seg) * x.dim_;
        scorers_[seg] =
            std::make_unique<CodeScorer>(qs_, nq_, x.dim_, x.cfg_.rescore_bits,
                                         x.codes_.offset.data() + off, x.codes_.step.data() + off);
      }
      scorers_[seg]->Score(x.summary_.centroid.data() + static_cast<std::size_t>(c) * x.dim_,
                           x.codes_.code.data() + begin * row_bytes_, x.summary_.size[c], out,
                           stride);
    }

   private:
    const ClusterIndex& index_;
    const HeadStore& store_;
    const float* qs_;
    const int nq_;
    const int64_t row_bytes_;                           // of a row's codes
    std::vector<std::unique_ptr<CodeScorer>> scorers_;  // [segment]
  };

  // A two-stage selection's result (ClusterConfig::rescore): the rows kept, best first, and per
  // query the partial state of the candidates' other rows.
  struct Rescored {
    std::vector<int64_t> rows;
    int64_t scored = 0;           // candidate rows scored
    std::vector<float> rest_o;    // [nq, dim]
    std::vector<float> rest_lse;  // [nq]
  };

  // The candidate clusters' rows scored exactly for each of the nq queries (qs [nq, dim]); the
  // `budget` best are kept (one query: by score; a group: by the sum of the queries' shares of
  // the candidates' exact mass, so that every query of it holds the same rows). The candidates'
  // other rows become one state per query: their exact mass, and their mean value, which each
  // cluster's value mean and its kept rows' values give without reading the others.
  void Rescore(const HeadStore& store, const float* qs, int nq, const std::vector<int32_t>& cand,
               int64_t budget, Rescored* out) const {
    const std::size_t nc = cand.size();
    std::vector<int64_t> first(nc + 1, 0);  // candidate i's rows: [first[i], first[i + 1])
    for (std::size_t i = 0; i < nc; ++i) first[i + 1] = first[i] + summary_.size[cand[i]];
    const int64_t n = first[nc];
    out->scored = n;
    std::vector<float> s(static_cast<std::size_t>(nq) * n);  // [nq, n], scaled
    CandidateScorer scorer(*this, store, qs, nq);
    for (std::size_t i = 0; i < nc; ++i) scorer.Score(cand[i], s.data() + first[i], n);
    for (float& x : s) x *= scale_;
    std::vector<float> rmax(nq, -std::numeric_limits<float>::infinity());
    for (int j = 0; j < nq; ++j)
      for (int64_t r = 0; r < n; ++r) rmax[j] = std::max(rmax[j], s[j * n + r]);
    std::vector<double> key(n, 0.0);
    if (nq == 1) {
      for (int64_t r = 0; r < n; ++r) key[r] = s[r];
    } else {
      for (int j = 0; j < nq; ++j) {
        const float* sj = s.data() + static_cast<std::size_t>(j) * n;
        double z = 0;
        for (int64_t r = 0; r < n; ++r) z += std::exp(double(sj[r]) - rmax[j]);
        for (int64_t r = 0; r < n; ++r) key[r] += std::exp(double(sj[r]) - rmax[j]) / z;
      }
    }
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    const int64_t keep = std::min(n, std::max<int64_t>(budget, 0));
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int64_t a, int64_t b) {
      return key[a] > key[b] || (key[a] == key[b] && a < b);
    });
    std::vector<char> kept(n, 0);
    std::vector<int32_t> of(n);  // candidate index of each row
    for (std::size_t i = 0; i < nc; ++i)
      std::fill(of.begin() + first[i], of.begin() + first[i + 1], static_cast<int32_t>(i));
    out->rows.clear();
    for (int64_t p = 0; p < keep; ++p) {
      const int64_t r = order[p];
      kept[r] = 1;
      out->rows.push_back(summary_.begin[cand[of[r]]] + (r - first[of[r]]));
    }
    // The rest's mean value per candidate: (size x value mean - the kept rows' values) / rest.
    std::vector<float> vmean(nc * dim_), row(dim_);
    std::vector<int64_t> rest(nc, 0);
    for (std::size_t i = 0; i < nc; ++i) {
      float* vm = vmean.data() + i * dim_;
      ConvertToF32(summary_.value_mean.data() + static_cast<std::size_t>(cand[i]) * dim_,
                   DType::kBF16, dim_, vm);
      for (int t = 0; t < dim_; ++t) vm[t] *= static_cast<float>(summary_.size[cand[i]]);
    }
    for (int64_t r = 0; r < n; ++r) {
      const std::size_t i = of[r];
      if (!kept[r]) {
        ++rest[i];
        continue;
      }
      const int64_t sr = summary_.begin[cand[i]] + (r - first[i]);
      ConvertToF32(store.value(sr), store.dtype(), dim_, row.data());
      for (int t = 0; t < dim_; ++t) vmean[i * dim_ + t] -= row[t];
    }
    for (std::size_t i = 0; i < nc; ++i)
      if (rest[i] > 0)
        for (int t = 0; t < dim_; ++t) vmean[i * dim_ + t] /= static_cast<float>(rest[i]);
    // Per query: each candidate's rest as (its value mean, its exact lse), merged.
    out->rest_o.assign(static_cast<std::size_t>(nq) * dim_, 0.f);
    out->rest_lse.assign(nq, -std::numeric_limits<float>::infinity());
    std::vector<double> l(nc);
    for (int j = 0; j < nq; ++j) {
      const float* sj = s.data() + static_cast<std::size_t>(j) * n;
      std::fill(l.begin(), l.end(), 0.0);
      for (int64_t r = 0; r < n; ++r)
        if (!kept[r]) l[of[r]] += std::exp(double(sj[r]) - rmax[j]);
      float* o = out->rest_o.data() + static_cast<std::size_t>(j) * dim_;
      for (std::size_t i = 0; i < nc; ++i) {
        if (rest[i] == 0) continue;
        const float lse = static_cast<float>(rmax[j] + std::log(l[i]));
        MergeInto(o, &out->rest_lse[j], vmean.data() + i * dim_, lse, dim_);
      }
    }
  }

  // Selecting on codes: every cluster's mass per query (lse [nq, C] by cluster id) and, estimating
  // from value codes, every clustered row's weight in its cluster, exp(score - the cluster's
  // highest) (row_weight [nq, size()] by store row; the outliers' entries unused).
  struct CodeMasses {
    std::vector<double> lse;
    std::vector<float> row_weight;
  };
  void ComputeCodeMasses(const HeadStore& store, const float* qs, int nq, CodeMasses* out) const {
    const int64_t C = summary_.num_clusters();
    std::vector<int32_t> all(C);
    std::iota(all.begin(), all.end(), 0);
    out->lse.resize(static_cast<std::size_t>(nq) * C);
    out->row_weight.assign(ValueCoded() ? static_cast<std::size_t>(nq) * size_ : 0, 0.f);
    ClusterLse(store, qs, nq, all, nullptr, nullptr, out->lse.data(),
               ValueCoded() ? out->row_weight.data() : nullptr);
  }

  // A two-stage selection's second stage over the candidates `cand` for nq queries with their
  // densities [nq, C]: single rows (Rescore) or whole clusters (KeepClusters). masses: when
  // selecting on codes, the masses computed beforehand for a group whose queries `first`.. these
  // are (ComputeCodeMasses), or null.
  void SecondStage(const HeadStore& store, const float* qs, int nq,
                   const std::vector<int32_t>& cand, const SearchParams& params,
                   const float* density, Rescored* out, const CodeMasses* masses = nullptr,
                   int first = 0) const {
    if (!CodeSelect() && !cfg_.rescore_clusters) {
      Rescore(store, qs, nq, cand, Budget(params), out);
      return;
    }
    const std::size_t nc = cand.size();
    std::vector<double> lse(static_cast<std::size_t>(nq) * nc);  // [nq, nc]
    CodeMasses own;
    if (CodeSelect()) {  // codes are in memory wherever the rows are
      if (masses == nullptr) {
        ComputeCodeMasses(store, qs, nq, &own);
        masses = &own;
        first = 0;
      }
      const int64_t C = summary_.num_clusters();
      out->scored = 0;
      for (std::size_t i = 0; i < nc; ++i) {
        out->scored += summary_.size[cand[i]];
        for (int j = 0; j < nq; ++j) lse[j * nc + i] = masses->lse[(first + j) * C + cand[i]];
      }
    } else {
      out->scored = ClusterLse(store, qs, nq, cand, density, params.resident, lse.data());
    }
    const std::vector<char> kept = KeepClusters(nq, cand, lse.data(), Budget(params), out);
    if (ValueCoded())
      RestFromValueCodes(*masses, first, nq, cand, kept, out);
    else
      RestFromMeans(nq, cand, lse.data(), kept, out);
  }

  // The rest's state per query (out->rest_o, rest_lse) from value codes (ClusterConfig::
  // value_bits): the softmax of the unselected clusters' rows' code scores over their decoded
  // values (value mean + offset + step x code). Four queries at a time side by side; per segment,
  // each nibble of a row's value codes adds the row's weights to one of its 16 bins, folded into
  // per-channel sums once per segment.
  void RestFromValueCodes(const CodeMasses& m, int first, int nq, const std::vector<int32_t>& cand,
                          const std::vector<char>& kept, Rescored* out) const {
    typedef float Lanes __attribute__((vector_size(4 * sizeof(float))));
    const int64_t C = summary_.num_clusters(), seg_rows = cfg_.segment_tokens;
    const int bits = cfg_.value_bits, mask = (1 << bits) - 1;
    const int64_t rb = CodeRowBytes(dim_, bits), nibbles = 2 * rb;
    std::vector<char> rest(C, 0);
    bool any = false;
    for (std::size_t i = 0; i < cand.size(); ++i) {
      rest[cand[i]] = !kept[i] && summary_.size[cand[i]] > 0;
      any |= rest[cand[i]] != 0;
    }
    out->rest_o.assign(static_cast<std::size_t>(nq) * dim_, 0.f);
    out->rest_lse.assign(nq, -std::numeric_limits<float>::infinity());
    if (!any) return;
    std::vector<Lanes> bins(bits == 8 ? dim_ : nibbles * 16);
    std::vector<double> acc(static_cast<std::size_t>(dim_) * 4);  // [dim, lane]
    std::vector<float> vm(dim_);
    for (int j0 = 0; j0 < nq; j0 += 4) {
      const int n = std::min(4, nq - j0);
      const double* lse[4];
      const float* weight[4];
      double top[4], z[4] = {0, 0, 0, 0};
      for (int l = 0; l < 4; ++l) {  // padding lanes repeat the last query
        const std::size_t q = static_cast<std::size_t>(first + j0 + std::min(l, n - 1));
        lse[l] = m.lse.data() + q * C;
        weight[l] = m.row_weight.data() + q * size_;
        top[l] = -std::numeric_limits<double>::infinity();
        for (int64_t c = 0; c < C; ++c)
          if (rest[c]) top[l] = std::max(top[l], lse[l][c]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(bins.begin(), bins.end(), Lanes{});
      Lanes seg_weight{};
      int64_t seg = -1;
      auto flush = [&] {  // segment seg's bins into acc
        if (seg < 0) return;
        const float* off = value_codes_.offset.data() + seg * dim_;
        const float* step = value_codes_.step.data() + seg * dim_;
        for (int t = 0; t < dim_; ++t) {
          Lanes w{};  // each lane's sum of weight x code of channel t
          if (bits == 8) {
            w = bins[t];
          } else {
            const int64_t p = static_cast<int64_t>(t) * bits / 4;
            const int shift = (t * bits) % 4;
            for (int v = 0; v < 16; ++v) w += bins[p * 16 + v] * float((v >> shift) & mask);
          }
          for (int l = 0; l < n; ++l)
            acc[t * 4 + l] += double(seg_weight[l]) * off[t] + double(step[t]) * w[l];
        }
        std::fill(bins.begin(), bins.end(), Lanes{});
        seg_weight = Lanes{};
      };
      for (int64_t c = 0; c < C; ++c) {
        if (!rest[c]) continue;
        const int64_t b = summary_.begin[c], size = summary_.size[c];
        if (b / seg_rows != seg) {
          flush();
          seg = b / seg_rows;
        }
        // Row r's weight in the rest: its weight in its cluster x the cluster's share, one exp
        // per cluster (the cluster's weights sum to exp(its lse - its highest score)).
        Lanes f{};
        for (int l = 0; l < n; ++l) {
          double sum = 0;
          for (int64_t r = b; r < b + size; ++r) sum += weight[l][r];
          f[l] = static_cast<float>(std::exp(lse[l][c] - top[l]) / sum);
        }
        Lanes wc{};
        for (int64_t r = b; r < b + size; ++r) {
          const Lanes e = Lanes{weight[0][r], weight[1][r], weight[2][r], weight[3][r]} * f;
          wc += e;
          const uint8_t* row = value_codes_.code.data() + r * rb;
          if (bits == 8) {
            for (int t = 0; t < dim_; ++t) bins[t] += e * float(row[t]);
          } else {
            for (int64_t k = 0; k < rb; ++k) {
              bins[(2 * k) * 16 + (row[k] & 15)] += e;
              bins[(2 * k + 1) * 16 + (row[k] >> 4)] += e;
            }
          }
        }
        ConvertToF32(summary_.value_mean.data() + static_cast<std::size_t>(c) * dim_, DType::kBF16,
                     dim_, vm.data());
        for (int t = 0; t < dim_; ++t)
          for (int l = 0; l < n; ++l) acc[t * 4 + l] += double(wc[l]) * vm[t];
        seg_weight += wc;
        for (int l = 0; l < n; ++l) z[l] += wc[l];
      }
      flush();
      for (int l = 0; l < n; ++l) {
        float* o = out->rest_o.data() + static_cast<std::size_t>(j0 + l) * dim_;
        for (int t = 0; t < dim_; ++t) o[t] = static_cast<float>(acc[t * 4 + l] / z[l]);
        out->rest_lse[j0 + l] = static_cast<float>(top[l] + std::log(z[l]));
      }
    }
  }

  // Each candidate's log-sum-exp per query (lse [nq, nc], scaled scores), exact from its keys
  // (or codes) where `resident` allows (null: everywhere; SearchParams::resident), else its
  // estimate (density [nq, C] + log size). Returns the rows scored.
  // row_weight: if not null, each scored row's exp(score - its cluster's highest) too ([nq,
  // size()] by store row).
  int64_t ClusterLse(const HeadStore& store, const float* qs, int nq,
                     const std::vector<int32_t>& cand, const float* density,
                     const uint8_t* resident, double* lse, float* row_weight = nullptr) const {
    const std::size_t nc = cand.size();
    const int64_t C = summary_.num_clusters();
    std::vector<float> s;
    CandidateScorer scorer(*this, store, qs, nq);
    int64_t scored = 0;
    for (std::size_t i = 0; i < nc; ++i) {
      const int32_t c = cand[i];
      const int64_t size = summary_.size[c];
      if (resident != nullptr && resident[c] == 0) {
        for (int j = 0; j < nq; ++j)
          lse[j * nc + i] = double(density[j * C + c]) + std::log(double(size));
        continue;
      }
      scored += size;
      s.resize(static_cast<std::size_t>(nq) * size);
      scorer.Score(c, s.data(), size);
      for (int j = 0; j < nq; ++j) {
        float* sj = s.data() + j * size;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t r = 0; r < size; ++r) m = std::max(m, sj[r] *= scale_);
        float* wj = row_weight != nullptr
                        ? row_weight + static_cast<std::size_t>(j) * size_ + summary_.begin[c]
                        : nullptr;
        lse[j * nc + i] = m + std::log(ExpSum(sj, size, m, wj));
      }
    }
    return scored;
  }

  // The second stage at the granularity of clusters (ClusterConfig::rescore_clusters, or
  // selecting on codes) for nq queries, given each candidate's log-sum-exp per query (lse
  // [nq, nc], ClusterLse): candidates in order of mass per row (a group: the sum of the queries'
  // shares) kept until the budget's rows (out->rows). Returns which candidates were kept.
  std::vector<char> KeepClusters(int nq, const std::vector<int32_t>& cand, const double* lse,
                                 int64_t budget, Rescored* out) const {
    const std::size_t nc = cand.size();
    std::vector<double> key(nc, 0.0);
    for (int j = 0; j < nq; ++j) {
      double m = -std::numeric_limits<double>::infinity(), z = 0;
      for (std::size_t i = 0; i < nc; ++i) m = std::max(m, lse[j * nc + i]);
      for (std::size_t i = 0; i < nc; ++i) z += std::exp(lse[j * nc + i] - m);
      for (std::size_t i = 0; i < nc; ++i)
        key[i] += std::exp(lse[j * nc + i] - m) / z / double(summary_.size[cand[i]]);
    }
    std::vector<int32_t> order(nc);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int32_t a, int32_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
    std::vector<char> kept(nc, 0);
    int64_t tokens = 0;
    out->rows.clear();
    for (int32_t i : order) {
      if (tokens >= budget) break;
      kept[i] = 1;
      tokens += summary_.size[cand[i]];
      for (int64_t r = 0; r < summary_.size[cand[i]]; ++r)
        out->rows.push_back(summary_.begin[cand[i]] + r);
    }
    return kept;
  }

  // The rest's state per query (out->rest_o, rest_lse): every candidate not kept, its value mean
  // at its log-sum-exp (lse [nq, nc]).
  void RestFromMeans(int nq, const std::vector<int32_t>& cand, const double* lse,
                     const std::vector<char>& kept, Rescored* out) const {
    const std::size_t nc = cand.size();
    out->rest_o.assign(static_cast<std::size_t>(nq) * dim_, 0.f);
    out->rest_lse.assign(nq, -std::numeric_limits<float>::infinity());
    std::vector<float> vm(dim_);
    for (std::size_t i = 0; i < nc; ++i) {
      if (kept[i]) continue;
      ConvertToF32(summary_.value_mean.data() + static_cast<std::size_t>(cand[i]) * dim_,
                   DType::kBF16, dim_, vm.data());
      for (int j = 0; j < nq; ++j)
        MergeInto(out->rest_o.data() + static_cast<std::size_t>(j) * dim_, &out->rest_lse[j],
                  vm.data(), static_cast<float>(lse[j * nc + i]), dim_);
    }
  }

  // masses, first: SecondStage's, this query being the group's first-th.
  void Finish(const HeadStore& store, const float* q, const float* scores, const float* oscores,
              const SearchParams& params, SearchResult* out, const CodeMasses* masses = nullptr,
              int first = 0) const {
    std::vector<float> density(summary_.num_clusters());
    Density(q, scores, density.data());
    std::vector<int32_t> sel;
    const int64_t tokens =
        SelectClusters(summary_, density.data(), Candidates(params), CandidateTopP(), &sel);
    if (!Rescoring()) {
      Emit(density.data(), sel, tokens, oscores, out);
      return;
    }
    Rescored rescored;
    SecondStage(store, q, 1, sel, params, density.data(), &rescored, masses, first);
    Emit(density.data(), sel, tokens, oscores, out, true, true, &rescored);
    if (out->est_lse == -std::numeric_limits<float>::infinity()) out->est_o.assign(dim_, 0.f);
    if (cfg_.estimate)
      MergeInto(out->est_o.data(), &out->est_lse, rescored.rest_o.data(), rescored.rest_lse[0],
                dim_);
    if (out->est_lse == -std::numeric_limits<float>::infinity()) out->est_o.clear();
  }

  // The result of one query: outliers (best first, or in the summary's order), the selected
  // clusters' rows (or a two-stage selection's kept rows), its estimate.
  // estimate false: est_o left empty and est_lse -inf (the caller estimates the group at once).
  void Emit(const float* density, const std::vector<int32_t>& sel, int64_t tokens,
            const float* oscores, SearchResult* out, bool outliers_by_score = true,
            bool estimate = true, const Rescored* rescored = nullptr) const {
    const int64_t c = summary_.num_clusters();
    const int64_t no = static_cast<int64_t>(summary_.outliers.size());
    out->ids.clear();
    out->scores.clear();
    out->ids.reserve(no + tokens);
    // Outliers first: best exact score first, or in the summary's order.
    if (outliers_by_score) {
      std::vector<std::pair<float, int64_t>> oc(no);
      for (int64_t j = 0; j < no; ++j) oc[j] = {oscores[j], summary_.outliers[j]};
      std::sort(oc.begin(), oc.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      for (const auto& p : oc) out->ids.push_back(p.second);
    } else {
      out->ids.insert(out->ids.end(), summary_.outliers.begin(), summary_.outliers.end());
    }
    if (rescored != nullptr) {
      out->ids.insert(out->ids.end(), rescored->rows.begin(), rescored->rows.end());
    } else {
      for (int32_t j : sel)
        for (int64_t r = summary_.begin[j]; r < summary_.begin[j] + summary_.size[j]; ++r)
          out->ids.push_back(r);
    }
    out->scanned = c + no + (rescored != nullptr ? rescored->scored : 0);
    if (cfg_.estimate && estimate) {
      out->est_o.resize(dim_);
      EstimateUnselected(summary_, density, sel, out->est_o.data(), &out->est_lse,
                         config_.host_tiles);
      if (out->est_lse == -std::numeric_limits<float>::infinity()) out->est_o.clear();
    } else {
      out->est_o.clear();
      out->est_lse = -std::numeric_limits<float>::infinity();
    }
  }

  IndexConfig config_;
  ClusterConfig cfg_;
  int dim_;
  float scale_;
  bool built_ = false;
  int64_t size_ = 0;
  ClusterSummary summary_;
  std::vector<float> log_size_;  // LogSizes(summary_), kept beside it (a search's every query)
  std::vector<float> metric_l_;
  std::vector<float> calib_q_;  // the prompt's last queries, f32 (calibrate_queries > 0)
  int64_t pending_begin_ = 0;
  std::vector<int64_t> pending_order_;
  SegmentCodes codes_;  // rescore_bits: every covered row's codes, per segment offset and step
  SegmentCodes value_codes_;  // value_bits: every covered row's value codes, likewise
  int64_t preset_begin_ = 0;
  std::vector<SegmentClustering> preset_;  // PresetSegments: the next Cover takes these
  bool preset_laid_out_ = false;           // ... over rows the store holds in their order
};

absl::Status PresetSegments(KeyIndex* index, int64_t begin, std::vector<SegmentClustering> parts,
                            bool laid_out) {
  if (index == nullptr || index->kind() != IndexKind::kCluster)
    return absl::InvalidArgumentError("PresetSegments: not a cluster index");
  return static_cast<ClusterIndex*>(index)->Preset(begin, std::move(parts), laid_out);
}

const ClusterSummary* GetClusterSummary(const KeyIndex& index) {
  if (index.kind() != IndexKind::kCluster) return nullptr;
  return &static_cast<const ClusterIndex&>(index).summary();
}

const SegmentCodes* GetClusterCodes(const KeyIndex& index) {
  if (index.kind() != IndexKind::kCluster) return nullptr;
  return static_cast<const ClusterIndex&>(index).codes();
}

const SegmentCodes* GetClusterValueCodes(const KeyIndex& index) {
  if (index.kind() != IndexKind::kCluster) return nullptr;
  return static_cast<const ClusterIndex&>(index).value_codes();
}

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeClusterIndex(const IndexConfig& config,
                                                           int head_dim) {
  return std::unique_ptr<KeyIndex>(new ClusterIndex(config, head_dim));
}

std::string ClusterSearchSettings(const IndexConfig& c, int k, int) {
  const ClusterConfig& cc = c.cluster;
  return absl::StrCat(
      "clusters of ~", cc.cluster_size, " keys, budget max(", k, ", ", cc.budget_fraction * 100,
      "% of clustered keys, ", cc.min_budget_tokens, ") tokens",
      cc.top_p > 0 ? absl::StrCat(" or top-p ", cc.top_p) : "",
      cc.group_select ? " per kv head (group selection)" : " per query",
      cc.rescore > 1
          ? absl::StrCat(", two stages (candidates up to ", cc.rescore, "x the budget, ",
                         cc.rescore_bits > 0 ? absl::StrCat("scored on ", cc.rescore_bits,
                                                            "-bit codes of their keys)")
                                             : std::string("their keys scored exactly)"))
      : cc.rescore_bits > 0
          ? absl::StrCat(", clusters ranked by their rows' ", cc.rescore_bits, "-bit codes")
          : "",
      " + outliers; estimate ", cc.estimate ? "on" : "off",
      cc.estimate && EstimatesOnValueCodes(cc)
          ? absl::StrCat(" (the rest's values from ", cc.value_bits, "-bit value codes)")
          : "");
}

int64_t ClusterBytesBound(const IndexConfig& c, int head_dim, int64_t rows) {
  // The summary (cluster_size keys per cluster on average; twice that many clusters as slack for
  // uneven k-means), the outliers with bf16 keys, the metric factor, the prompt's calibration
  // queries (f32; left out before 0.3.37, so an index at d >= 256 could pass host_memory_limit by
  // them) and one segment's pending permutation.
  const ClusterConfig& cc = c.cluster;
  const int64_t d = head_dim;
  const int64_t clusters = 2 * (rows / std::max(1, cc.cluster_size) + 1);
  const int64_t outliers = static_cast<int64_t>(std::ceil(cc.outlier_fraction * rows)) + 1;
  // rescore_bits (value_bits): every covered row's packed key (value) codes and each segment's
  // grid.
  auto codes_of = [&](int bits) -> int64_t {
    return bits > 0 ? rows * CodeRowBytes(head_dim, bits) +
                          (rows / std::max<int64_t>(1, cc.segment_tokens) + 1) * 8 * d
                    : 0;
  };
  const int64_t codes = codes_of(cc.rescore_bits) + codes_of(cc.value_bits);
  const int64_t calibration = 4 * d * std::max(0, cc.calibrate_queries);
  return clusters * (4 * d + 24) + outliers * (8 + 2 * d) + 4 * d * d + calibration +
         16 * cc.segment_tokens + codes;
}

}  // namespace kvrt::cpu_index
