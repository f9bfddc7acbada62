#pragma once
// Two-level cold tier (RetroInfer-style): the cold keys of one kv head are grouped into
// clusters of about `cluster_size` keys by k-means over fixed token segments; the store is laid
// out cluster-contiguous (KeyIndex::TakeRowOrder + HeadStore::PermuteRows); a compact summary
// (centroids and value means in bf16, sizes, a scalar spread per cluster, an outlier list) is
// what a decode step scores. Selected clusters are attended exactly; the unselected ones
// contribute an ESTIMATED partial state (o, lse) computed from the summary alone.
//
// Estimate (per query q, scale s): for cluster c with mean key mu_c, size n_c, mean value vbar_c
// and spread sigma2_c (mean over its keys of (k - mu_c)^T M (k - mu_c) / tr M, M the metric the
// segment was clustered in):
//   density_c = s * q.mu_c + spread_weight * 0.5 * s^2 * |q|^2 * sigma2_c   (log weight per token)
//   logmass_c = density_c + log n_c
//   lse_est = log sum_{c unselected} exp(logmass_c),  o_est = sum softmax(logmass)_c * vbar_c.
// spread_weight = 0 is the plain RetroInfer estimate (biased low by Jensen); 1 is the second-order
// (log-normal) correction of E exp(s q.k) over the cluster.
//
// Selection: clusters ordered by (density desc, cluster index asc); the shortest prefix whose
// tokens reach the budget, or (top_p > 0) whose estimated mass reaches top_p of all clusters'
// estimated mass, whichever comes first; every cluster when the budget covers them all.
// Outliers (keys far from their centroid in the metric: the needles) are kept out of the
// clusters, always scored and always returned (not counted in the budget).
//
// Group selection (group_select, SearchGroup with nq > 1 queries of one kv head): ONE selection
// for the whole group, by the group key
//   key_c = log sum_i exp(density_{i,c} - lse_i),   lse_i = log sum_c exp(logmass_{i,c}),
// i.e. clusters ranked by their share of each query's estimated mass per token, summed over the
// queries (the prefix that captures the most total share for its tokens). The budget then counts
// the rows read once for the kv head, not per query: a group's queries that want different
// clusters read up to nq x the budget otherwise. Each query's estimate still covers the clusters
// not selected, with its own densities. With one query the order is the query's own.
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kvrt_common/dtype.h"

namespace kvrt::cpu_index {

class HeadStore;
class KeyIndex;

struct ClusterConfig {
  int cluster_size = 16;          // target keys per cluster (clusters per segment = tokens / this)
  int64_t segment_tokens = 8192;  // rows past the last full segment stay uncovered (size())
  int kmeans_iters = 6;
  bool two_level = true;            // sqrt(C) coarse clusters, then fine ones within each
  int refine_iters = 2;             // two_level: global iterations over all C clusters after it
  // A k-means' assignments against many centroids screened by bf16 products on AMX, the
  // candidates they leave scored in f32 (the nearest centroid in exact arithmetic is always among
  // them), and a bf16 store's keys mapped into the metric on AMX too (within 2^-16 of the f32
  // product): where the CPU has AMX, the same clusters up to f32 rounding of near-ties, several
  // times faster. No effect elsewhere (KVRT_KMEANS_BF16=0 also turns it off).
  bool bf16_screen = true;
  bool query_aware = true;          // k-means in the metric M = E[q q^T] of the prompt's queries
  int metric_queries = 4096;        // prompt queries sampled (evenly) for M
  // > 0 and < dim: only the first active_dim dims carry data (a head_dim the GPU backend pads
  // with zeros); the metric, and so the clusters' spreads, are those of the active dims alone,
  // as for rows of that width. 0: every dim.
  int active_dim = 0;
  float outlier_fraction = 0.004f;  // of each segment's keys, kept out of clusters
  float budget_fraction = 0.02f;    // cluster-token budget: max(k, fraction * size(), min)
  int64_t min_budget_tokens = 256;
  float top_p = 0.f;          // > 0: also stop when the selected mass reaches this share
  bool estimate = true;       // return the estimated state of the unselected clusters
  bool group_select = false;  // SearchGroup: one selection per kv head (see the header comment)
  float spread_weight = 1.f;  // see the header comment (0 = plain estimate)
  // > 0: each cluster's spread is fitted, by least squares over this many of the build's last
  // queries (the runtime's evenly spaced prompt sample), to the true log mean exp of its keys'
  // scores (CalibrateSpreads) instead of taken from the metric's second moment: 15-23% lower mean
  // error at equal tokens on the 32K Gemma 3 traces, unchanged on the synthetic one
  // (docs/fidelity.md). Segments clustered on the CPU only: the GPU build at prefill
  // (gpu_build) keeps the metric's spread.
  int calibrate_queries = 256;
  float scale = 0.f;          // attention scale of the estimate; 0 = 1/sqrt(head_dim)
  uint64_t seed = 42;
  // GPU backend: score the summary on the GPU (gpu/include/kvrt_gpu/cluster_kernels.h) from a
  // device copy of it, instead of this index's Search on the CPU.
  bool gpu_select = true;
  // GPU backend: cluster a prompt's segments on the GPU at prefill (runtime/src/segment_build.h:
  // flat Lloyd, kmeans_iters + refine_iters iterations) instead of on the CPU. Rows that arrive
  // later (decode evictions) are clustered on the CPU either way.
  bool gpu_build = true;
  // GPU backend, direct step, group selection: a cluster's group key is lowered by miss_penalty x
  // the share of its rows not in the step's page pool, so that a cluster read over PCIe must
  // carry more estimated mass than one read from HBM (docs/cluster.md, "Residency-aware
  // selection"). 0 = selection by the key alone (the host backend, which has no pool, always).
  float miss_penalty = 0.f;
  // > 1: a two-stage selection. Clusters are selected up to rescore x the budget (candidates),
  // their keys scored exactly, and the budget's best rows kept (a group: by the sum of its
  // queries' shares of the candidates' exact mass); the candidates' other rows join the estimate
  // with their exact mass and their mean value (the cluster's value mean less the kept rows').
  // The rows attended stay the budget's; the keys read grow to rescore x it. CPU selection only
  // (the GPU's selection kernels do not rescore: the runtime selects on the CPU when this is set).
  // 0 or 1: off.
  float rescore = 0.f;
  // With rescore > 1: keep whole candidate clusters (best exact mass per row first, until the
  // budget's rows) instead of single rows; the other candidates join the estimate at their exact
  // mass with their value mean. The attended set stays a set of clusters, as the GPU's direct
  // step attends it (an evaluation of that shape; docs/fidelity.md, "The second stage at the
  // granularity of clusters").
  bool rescore_clusters = false;
  // With rescore > 1: 0 scores the candidates on their keys; 1-8 on compact codes of them
  // instead (EncodeResiduals: bits per channel of the key's residual from its cluster's
  // centroid), the form a device could hold beside the summary (a fidelity evaluation;
  // docs/fidelity.md, "Candidates scored on codes").
  // Without rescore (0 or 1), 1-8 selects on codes in one stage: every cluster's mass is the
  // log-sum-exp of its rows' code scores (instead of the centroid's estimate), clusters are
  // ranked by it per row and kept whole up to the budget (as rescore_clusters over every
  // cluster), the others estimated at that mass with their value mean; top_p does not apply.
  // The GPU's form: gpu::CodeScan + gpu::CodeClusterLse feeding gpu::ClusterStep's cluster_lse.
  int rescore_bits = 0;
  // Selecting on codes (SelectsOnCodes): 1-8 estimates the unselected clusters from their rows'
  // values too: each row's value coded on `value_bits` bits per channel of its residual from its
  // cluster's bf16 value mean (EncodeResiduals, per-segment grids), the rest's state the softmax
  // of the rows' key-code scores over their decoded values, instead of each cluster's value mean
  // at its mass. 0: value means. CPU selection only (the GPU's kernels estimate from the means).
  int value_bits = 0;
};

// ClusterConfig::rescore_bits without rescore: the one-stage selection on codes.
inline bool SelectsOnCodes(const ClusterConfig& c) {
  return c.rescore <= 1.f && c.rescore_bits > 0;
}

// ClusterConfig::value_bits in effect: the rest estimated from value codes.
inline bool EstimatesOnValueCodes(const ClusterConfig& c) {
  return SelectsOnCodes(c) && c.value_bits > 0;
}

// The summary of every covered segment. Clusters and outliers are row ranges / rows of the store
// AFTER the caller applied TakeRowOrder's permutation.
struct ClusterSummary {
  int dim = 0;
  std::vector<int64_t> begin;        // [C] first store row of cluster c (rows begin..begin+size)
  std::vector<int32_t> size;         // [C]
  std::vector<uint16_t> centroid;    // [C, dim] bf16 mean key
  std::vector<uint16_t> value_mean;  // [C, dim] bf16 mean value
  std::vector<float> spread;         // [C] sigma2_c (see above)
  std::vector<int64_t> outliers;     // store rows, always scored and returned
  int64_t num_clusters() const { return static_cast<int64_t>(size.size()); }
  std::size_t Bytes() const;  // what a GPU copy of it holds (bf16 keys of outliers incl.)
};

// The fewest queries (per kv head) that shape the metric and calibrate the spreads: dim / 4, at
// least 8. Fewer (a one-token prompt's 4 queries) give a metric of rank below that and spreads fit
// to a handful of directions, and every later segment's estimate was ~10x worse than with no
// queries at all (0.18 against 0.019 mean output error, d=128, forty-sixth session).
int MinMetricQueries(int dim);

// Lower-triangular L [dim, dim] (row-major) with L L^T = M + ridge * tr(M)/dim * I, M = E[q q^T]
// over up to max_queries rows of queries (evenly sampled). Identity when queries is null/empty or
// fewer than MinMetricQueries(dim).
// active_dim in (0, dim): the factor of the first active_dim dims (of the queries' first
// active_dim columns), zero in the others: the padded rows map to what unpadded ones would.
std::vector<float> QueryMetricFactor(const float* queries, int64_t n_queries, int dim,
                                     int max_queries, int active_dim = 0);

// One segment's clustering, in segment-local rows [0, n).
struct SegmentClustering {
  std::vector<int64_t> order;     // [n] new local row i holds old local row order[i]
  std::vector<int32_t> size;      // clusters, in layout order (cluster rows first, then
  std::vector<float> centroid;    // [C, dim] f32 mean key       outliers at the segment end)
  std::vector<float> value_mean;  // [C, dim] f32
  std::vector<float> spread;      // [C]
  int64_t num_outliers = 0;       // the last num_outliers rows of `order`
};

// keys, values: f32 [n, dim]; metric_l: QueryMetricFactor's L. Deterministic for a seed.
void ClusterSegment(const float* keys, const float* values, int64_t n, int dim,
                    const float* metric_l, const ClusterConfig& config, uint64_t seed,
                    SegmentClustering* out);

// Outliers and clusters of a segment of n rows (the same for every build):
//   outliers = min(n - 1, floor(outlier_fraction * n)), clusters = clamp(round((n - outliers) /
//   cluster_size), 1, n).
int64_t SegmentOutliers(int64_t n, const ClusterConfig& config);
int64_t SegmentClusters(int64_t n, const ClusterConfig& config);

// The two steps after k-means, shared by every build (the CPU's ClusterSegment and the GPU's,
// runtime/src/segment_build.cc), in segment-local rows:
// MarkOutliers sets assign[i] = -1 for the n_out rows farthest from the mean of the other members
// of their cluster (dist: squared distance to the centroid in the metric; singletons never;
// ties to the lower row).
void MarkOutliers(const float* dist, int64_t n, int64_t c, int64_t n_out, int32_t* assign);
// AssembleSegment lays a segment out from its final assignment (-1 = outlier) and per-cluster
// means [c, dim] / spread [c] over the members: clusters in index order, empty ones dropped, rows
// ascending within each, the outliers last (ascending).
void AssembleSegment(const int32_t* assign, int64_t n, int64_t c, int dim, const float* key_mean,
                     const float* value_mean, const float* spread, SegmentClustering* out);

// Sets part->spread so that density_c matches, in the least-squares sense over the queries
// (f32 [nq, dim]), log mean_{k in c} exp(scale q.k): sigma2_c = max(0, sum_q g_q |q|^2 /
// sum_q |q|^4) / (spread_weight * scale^2 / 2), g_q the gap to scale q.mu_c. keys: the
// segment's f32 rows [n, dim] in their order before part->order. No-op for nq = 0 or
// spread_weight = 0 (ClusterIndex passes none below MinMetricQueries).
void CalibrateSpreads(const float* keys, int64_t n, int dim, const float* queries, int64_t nq,
                      float scale, float spread_weight, SegmentClustering* part);

// density_c for the scores s_c = q.mu_c (unscaled): out[c], c < C.
void ClusterDensity(const ClusterSummary& s, const float* scores, float q_norm2, float scale,
                    float spread_weight, float* density);

// Selection as documented above: `selected` gets cluster indices in (density desc, index asc)
// order; returns the selected tokens. budget_tokens <= 0 selects nothing.
int64_t SelectClusters(const ClusterSummary& s, const float* density, int64_t budget_tokens,
                       float top_p, std::vector<int32_t>* selected);

// The group key of nq queries (see the header comment): density f32 [nq, C] -> key [C]
// (-inf for padding clusters, size 0).
void GroupSelectionKey(const ClusterSummary& s, const float* density, int nq, float* key);
// The same with the summary's LogSizes(s) given (a caller that keeps them).
void GroupSelectionKey(const ClusterSummary& s, const float* density, int nq, const float* log_size,
                       float* key);

// Estimated partial state over the clusters NOT in `selected`: o [dim], *lse (-inf, o = 0 when
// none). Max-subtracted, f32 output, double accumulation. tiles: the weighted sums of the value
// means on the AMX tiles where they run (kvrt_cpu_index/attention.h, UseHostTiles).
void EstimateUnselected(const ClusterSummary& s, const float* density,
                        const std::vector<int32_t>& selected, float* o, float* lse,
                        bool tiles = false);
// [C] std::log(float(size[j])): what EstimateUnselected weighs the clusters by.
std::vector<float> LogSizes(const ClusterSummary& s);
// EstimateUnselected for nq queries that selected the same clusters (group selection): density
// [nq, C], o [nq, dim], lse [nq]; log_size: LogSizes(s). Each query's result is
// EstimateUnselected's (the same tiles), bit for bit; each value mean is read once for all of
// them.
void EstimateUnselectedGroup(const ClusterSummary& s, const float* density, int nq,
                             const std::vector<int32_t>& selected, const float* log_size, float* o,
                             float* lse, bool tiles = false);

// Compact codes of one segment's keys (ClusterConfig::rescore_bits, 1, 2, 4 or 8): per row and
// channel, the residual from its cluster's bf16 centroid on a uniform grid of 2^bits levels,
// decoded as offset[t] + step[t] * code (step: the Gaussian MSE-optimal step for the level count
// times the channel's residual deviation over the segment; offset centres the grid on the
// channel's mean residual; a channel constant over the segment gets step 0 and decodes to its
// value). A row is CodeRowBytes packed bytes, channel t at bit t * bits
// (little-endian within a byte), rows in layout order (part.order); the outliers' rows (the last
// num_outliers) are zero and never scored from codes.
struct SegmentCodes {
  std::vector<uint8_t> code;  // [n, CodeRowBytes(dim, bits)]
  std::vector<float> offset;  // [dim]
  std::vector<float> step;    // [dim]
};
bool ValidCodeBits(int bits);
int64_t CodeRowBytes(int dim, int bits);
// The code of channel `channel` in a row packed by EncodeResiduals with `bits` bits per channel.
inline unsigned CodeAt(const uint8_t* row, int channel, int bits) {
  const int64_t bit = static_cast<int64_t>(channel) * bits;
  return (row[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
}
// keys: the segment's f32 rows [n, dim] in their order before part.order (laid_out: after it,
// row i of the layout at keys + i * dim); centroid: bf16 [clusters, dim], the summary's.
void EncodeResiduals(const float* keys, const SegmentClustering& part, const uint16_t* centroid,
                     int dim, int bits, SegmentCodes* out, bool laid_out = false);

// Scores rows of one segment's codes for nq queries qs [nq, dim] (unscaled): q . (centroid +
// offset + step * code). Holds, for every query, a table of partial sums per 4-bit nibble of a row
// (bits < 8), laid out query-minor, so that a row costs one lookup per nibble for the whole group
// (a GQA group's heads, or every head of a kv head) and each query's score equals that of a
// scorer of it alone, bit for bit. qs must outlive it.
class CodeScorer {
 public:
  CodeScorer(const float* qs, int nq, int dim, int bits, const float* offset, const float* step);
  CodeScorer(const float* q, int dim, int bits, const float* offset, const float* step)
      : CodeScorer(q, 1, dim, bits, offset, step) {}
  // rows of one cluster: its bf16 centroid [dim] and packed codes [rows, CodeRowBytes]; query j's
  // scores go to out + j * out_stride (out_stride >= rows; 0: rows).
  void Score(const uint16_t* centroid, const uint8_t* code, int64_t rows, float* out,
             int64_t out_stride = 0) const;

 private:
  const float* qs_;
  int nq_, lanes_, dim_, bits_;  // lanes_: nq rounded up to the scorer's vector width
  int64_t row_bytes_;
  std::vector<float> base_;    // q . offset per query
  std::vector<float> weight_;  // bits 8: q * step [dim, lanes]; else [nibbles, 16, lanes]
};

// Segments clustered outside the index (the GPU build at prefill): the next Build or Add of
// `index` (kind kCluster, built with the same queries, so in the same metric) takes parts[i] for
// the segment at store row begin + i * segment_tokens instead of clustering it. InvalidArgument
// for another kind, a begin that is not the index's next segment, or a part whose row count is not
// segment_tokens. laid_out: the store's rows of these segments already follow each part's order
// (the GPU build writes them so), which the codes (rescore_bits) are read in.
absl::Status PresetSegments(KeyIndex* index, int64_t begin, std::vector<SegmentClustering> parts,
                            bool laid_out = false);

// The summary of a cluster index (kind kCluster), e.g. to copy it to the GPU after each
// Build/Add; null for other kinds.
const ClusterSummary* GetClusterSummary(const KeyIndex& index);
// The codes of a cluster index built with rescore > 1 and rescore_bits: code [covered rows,
// CodeRowBytes] in store row order (after TakeRowOrder's permutation), offset and step
// [segments, dim] (segment s: rows [s, s + 1) x segment_tokens). Null for other kinds or without
// codes.
const SegmentCodes* GetClusterCodes(const KeyIndex& index);
// The value codes of a cluster index selecting on codes with value_bits (residuals from each
// cluster's bf16 value mean), laid out as GetClusterCodes'. Null for other kinds or without them.
const SegmentCodes* GetClusterValueCodes(const KeyIndex& index);

}  // namespace kvrt::cpu_index
