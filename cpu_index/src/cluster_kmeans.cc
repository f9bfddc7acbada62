// cluster kind, build side: the query metric and the k-means of one segment (cluster.h).
// K-means runs on keys mapped by L (L L^T = M), so that squared Euclidean distances there are
// (k - mu)^T M (k - mu) = E_q[(q.k - q.mu)^2]: the score error a centroid makes for the prompt's
// queries. With no queries L = I (plain Euclidean k-means on the keys).
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>

#include "bf16_products.h"
#include "index_common.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/dot.h"
#include "kvrt_cpu_index/exp_sum.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/task_arena.h"
#include "parallel_range.h"

// LAPACK's Cholesky factorisation (OpenBLAS carries LAPACK; FAISS needs it too). The trailing
// argument is the hidden length of the Fortran character argument.
extern "C" void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info,
                        std::size_t uplo_len);

namespace kvrt::cpu_index {
namespace {

constexpr float kRidge = 1e-3f;   // of tr(M)/dim, keeps M positive definite with few queries
constexpr int64_t kChunk = 1024;  // rows per assignment GEMM (scores fit in L2)
// The build's products with the prompt's queries, each a task of a parallel loop (OpenBLAS runs
// single-threaded inside kvrt's tasks): one segment's or one kv head's product had been one
// thread's work while the other cores waited. The blocks are fixed, not sized by the thread
// count, so that a result does not depend on it.
constexpr int kGramRows = 64;             // rows of M = Q^T Q / m per GEMM
constexpr int64_t kMapRows = 256;         // keys per product with L
constexpr int64_t kCalibrateRows = 1024;  // clustered keys per calibration block (scores in L2)

bool IsIdentity(const float* l, int d) {
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j)
      if (l[static_cast<std::size_t>(i) * d + j] != (i == j ? 1.f : 0.f)) return false;
  return true;
}

bool IsLowerTriangular(const float* l, int d) {
  for (int i = 0; i < d; ++i)
    for (int j = i + 1; j < d; ++j)
      if (l[static_cast<std::size_t>(i) * d + j] != 0.f) return false;
  return true;
}

// Every row's nearest centroid from the screened candidates (bf16_products.h): the bf16 products
// on AMX, then the candidates' scores in f32. False if the products failed (the caller then
// scores every centroid in f32).
bool AssignScreened(const float* x, const float* xn2, int d, const float* cent, int64_t c,
                    const std::vector<float>& cn2, const internal::Bf16Rows& xb,
                    std::vector<int32_t>* assign, std::vector<float>* dist) {
  auto products = internal::Bf16Products::Make(cent, c, d, xb.block_rows());
  if (!products.ok()) return false;
  const internal::CentroidBounds bounds(cn2);
  const int64_t n = xb.rows();
  std::atomic<bool> failed{false};
  tbb::parallel_for(int64_t{0}, xb.blocks(), [&](int64_t b) {
    const int64_t r0 = b * xb.block_rows(), m = std::min(xb.block_rows(), n - r0);
    // Per thread, kept (at most Bf16Rows::kMaxBlockScores): a block's scores are 2 MiB at 512
    // clusters, which a fresh vector zeroed and faulted in for every block.
    thread_local std::vector<float> g;
    g.resize(static_cast<std::size_t>(xb.block_rows()) * c);
    if (!(*products)->Block(xb, b, g.data()).ok()) {
      failed = true;
      return;
    }
    std::vector<int32_t> cand(c);
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = x + (r0 + i) * d;
      const int k = internal::NearestCandidates(g.data() + i * c, bounds.shift_lo.data(),
                                                bounds.shift_hi.data(), bounds.slack.data(), c,
                                                std::sqrt(xn2[r0 + i]), cand.data());
      float best = -INFINITY;
      int32_t bj = 0;
      for (int t = 0; t < k; ++t) {
        const int32_t j = cand[t];
        const float v =
            DotRow(xr, cent + static_cast<std::size_t>(j) * d, d, DType::kF32) - 0.5f * cn2[j];
        if (v > best) {
          best = v;
          bj = j;
        }
      }
      (*assign)[r0 + i] = bj;
      (*dist)[r0 + i] = std::max(0.f, xn2[r0 + i] - 2.f * best);
    }
  });
  return !failed;
}

// Assigns every row of x [n, d] to its nearest centroid of cent [c, d]; dist gets the squared
// distance (clamped at 0). With xb (x in bf16: screening on), through AssignScreened.
void Assign(const float* x, const float* xn2, int64_t n, int d, const float* cent, int64_t c,
            std::vector<int32_t>* assign, std::vector<float>* dist,
            const internal::Bf16Rows* xb = nullptr) {
  std::vector<float> cn2(c);
  for (int64_t j = 0; j < c; ++j) {
    const float* r = cent + j * d;
    float a = 0;
    for (int i = 0; i < d; ++i) a += r[i] * r[i];
    cn2[j] = a;
  }
  if (xb != nullptr && AssignScreened(x, xn2, d, cent, c, cn2, *xb, assign, dist)) return;
  // The chunks in parallel, each row's result its own chunk's: a prompt of few segments (an MQA
  // model's one kv head: its segments are the build's only parallel loop) kept most cores idle.
  tbb::parallel_for(int64_t{0}, (n + kChunk - 1) / kChunk, [&](int64_t chunk) {
    const int64_t r0 = chunk * kChunk, m = std::min(kChunk, n - r0);
    std::vector<float> g(static_cast<std::size_t>(m) * c);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(c),
                d, 1.f, x + r0 * d, d, cent, d, 0.f, g.data(), static_cast<int>(c));
    for (int64_t i = 0; i < m; ++i) {
      const float* row = g.data() + i * c;
      float best = -INFINITY;
      int32_t bj = 0;
      for (int64_t j = 0; j < c; ++j) {
        const float v = row[j] - 0.5f * cn2[j];
        if (v > best) {
          best = v;
          bj = static_cast<int32_t>(j);
        }
      }
      (*assign)[r0 + i] = bj;
      (*dist)[r0 + i] = std::max(0.f, xn2[r0 + i] - 2.f * best);
    }
  });
}

// Dims per task of a sum over rows that a centroid update makes (one thread's work before): about
// one block per worker, at least 32 dims. Each element's sum runs over the rows in order whichever
// block holds it, so the split (unlike a split of the rows) does not change the result, and a block
// of dims per worker streams the rows once per worker.
int64_t DimGrain(int d) {
  const int workers = std::max(1, tbb::this_task_arena::max_concurrency());
  return std::max<int64_t>(32, (d + workers - 1) / workers);
}

// sum [c, d] <- per cluster, the sum of its rows of x [n, d] (assign: the cluster of each row), in
// row order.
void SumRowsByCluster(const float* x, int64_t n, int d, int64_t c, const int32_t* assign,
                      float* sum) {
  internal::ParallelRange(d, DimGrain(d), [&](int64_t t0, int64_t t1) {
    for (int64_t j = 0; j < c; ++j) std::fill(sum + j * d + t0, sum + j * d + t1, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      float* s = sum + static_cast<std::size_t>(assign[i]) * d;
      const float* r = x + i * d;
      for (int64_t t = t0; t < t1; ++t) s[t] += r[t];
    }
  });
}

// c random distinct rows of x [n, d] (a partial Fisher-Yates shuffle with rng), Lloyd's seeds.
std::vector<float> DrawSeeds(const float* x, int64_t n, int d, int64_t c, std::mt19937_64* rng) {
  std::vector<float> cent(static_cast<std::size_t>(c) * d);
  std::vector<int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t i = 0; i < c; ++i) {
    std::uniform_int_distribution<int64_t> u(i, n - 1);
    std::swap(perm[i], perm[u(*rng)]);
  }
  for (int64_t j = 0; j < c; ++j) std::copy_n(x + perm[j] * d, d, cent.data() + j * d);
  return cent;
}

// The assignments against c centroids are screened in bf16 (AssignScreened) where the CPU has
// AMX: a segment's refinement over all of its clusters, and its coarse level and groups too (a few
// dozen clusters each). Fewer than 16: an f32 GEMM, whose cost there is small.
constexpr int64_t kScreenMinClusters = 16;
// (kBf16ProductError holds up to 4096 dims.)
bool ScreensAssignments(const ClusterConfig& config, int64_t c, int d) {
  return config.bf16_screen && c >= kScreenMinClusters && d <= 4096 &&
         internal::Bf16ProductsAvailable();
}

// Lloyd's k-means of x [n, d] into c clusters from the centroids cent [c, d] (empty clusters keep
// their centroid); assign/dist: the final nearest centroid and squared distance of every row.
// With `warm`, the iterations start from the centroids of the given assignment instead (cent:
// zeros, kept by a cluster the assignment leaves empty). `screen`: the assignments screened in
// bf16 (ScreensAssignments), x converted once for all of them.
void Lloyd(const float* x, const float* xn2, int64_t n, int d, int64_t c, int iters,
           std::vector<float> cent, std::vector<int32_t>* assign, std::vector<float>* dist,
           bool warm, bool screen) {
  std::unique_ptr<internal::Bf16Rows> xb;
  if (screen) xb = std::make_unique<internal::Bf16Rows>(x, n, d, c);
  std::vector<int64_t> count(c);
  std::vector<float> sum(static_cast<std::size_t>(c) * d);
  for (int it = 0; it < std::max(0, iters) + (warm ? 1 : 0); ++it) {
    if (!warm || it > 0) Assign(x, xn2, n, d, cent.data(), c, assign, dist, xb.get());
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(*assign)[i]];
    SumRowsByCluster(x, n, d, c, assign->data(), sum.data());
    for (int64_t j = 0; j < c; ++j) {
      if (count[j] == 0) continue;  // empty: keep the old centroid
      const float inv = 1.f / count[j];
      for (int t = 0; t < d; ++t) cent[j * d + t] = sum[j * d + t] * inv;
    }
  }
  Assign(x, xn2, n, d, cent.data(), c, assign, dist, xb.get());
}

}  // namespace

int MinMetricQueries(int dim) { return std::max(8, dim / 4); }

std::vector<float> QueryMetricFactor(const float* queries, int64_t n_queries, int dim,
                                     int max_queries, int active_dim) {
  if (active_dim > 0 && active_dim < dim) {
    // The active dims' factor, embedded: zeros elsewhere (not the identity), so that a padded
    // row's metric image and the trace of L L^T are the unpadded row's.
    const int a = active_dim;
    std::vector<float> qa;
    if (queries != nullptr && n_queries > 0) {
      qa.resize(static_cast<std::size_t>(n_queries) * a);
      for (int64_t i = 0; i < n_queries; ++i) std::copy_n(queries + i * dim, a, qa.data() + i * a);
    }
    const std::vector<float> la =
        QueryMetricFactor(qa.empty() ? nullptr : qa.data(), n_queries, a, max_queries);
    std::vector<float> l(static_cast<std::size_t>(dim) * dim, 0.f);
    for (int i = 0; i < a; ++i)
      std::copy_n(la.data() + static_cast<std::size_t>(i) * a, a,
                  l.data() + static_cast<std::size_t>(i) * dim);
    return l;
  }
  const std::size_t dd = static_cast<std::size_t>(dim) * dim;
  std::vector<float> l(dd, 0.f);
  for (int i = 0; i < dim; ++i) l[static_cast<std::size_t>(i) * dim + i] = 1.f;
  const int64_t m = std::min<int64_t>(n_queries, std::max(1, max_queries));
  if (queries == nullptr || m < MinMetricQueries(dim)) return l;
  std::vector<float> qs(static_cast<std::size_t>(m) * dim);
  for (int64_t i = 0; i < m; ++i) {  // evenly spaced rows (all heads, early and late tokens)
    const int64_t src = (i * n_queries) / m;
    std::copy_n(queries + src * dim, dim, qs.data() + i * dim);
  }
  internal::UseSingleThreadedBlas();
  // M's lower triangle in row blocks, each block's rows against every column up to its last.
  std::vector<float> mf(dd, 0.f);
  tbb::parallel_for(0, (dim + kGramRows - 1) / kGramRows, [&](int b) {
    const int i0 = b * kGramRows, rows = std::min(kGramRows, dim - i0);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, i0 + rows, static_cast<int>(m),
                1.f / m, qs.data() + i0, dim, qs.data(), dim, 0.f,
                mf.data() + static_cast<std::size_t>(i0) * dim, dim);
  });
  std::vector<double> a(dd, 0.0);
  double tr = 0;
  for (int i = 0; i < dim; ++i) tr += mf[static_cast<std::size_t>(i) * dim + i];
  if (!(tr > 0)) return l;
  for (int i = 0; i < dim; ++i)
    for (int j = 0; j <= i; ++j)
      a[static_cast<std::size_t>(i) * dim + j] = mf[static_cast<std::size_t>(i) * dim + j];
  for (int i = 0; i < dim; ++i) a[static_cast<std::size_t>(i) * dim + i] += kRidge * tr / dim;
  // Cholesky, lower: a = L L^T. Row-major lower is column-major upper, LAPACK's "U" (blocked; the
  // unblocked loop it replaces was a chain of dependent adds that one kv head's build waited for).
  int info = 0;
  const char uplo = 'U';
  dpotrf_(&uplo, &dim, a.data(), &dim, &info, 1);
  if (info != 0) return l;  // numerically indefinite: fall back to plain
  // Normalise so that tr(M) = dim (scale does not change the clustering; spreads are / tr M).
  const double norm = std::sqrt(dim / tr);
  for (int i = 0; i < dim; ++i)
    for (int j = 0; j < dim; ++j)
      l[static_cast<std::size_t>(i) * dim + j] =
          j <= i ? static_cast<float>(a[static_cast<std::size_t>(i) * dim + j] * norm) : 0.f;
  return l;
}

void ClusterSegment(const float* keys, const float* values, int64_t n, int dim,
                    const float* metric_l, const ClusterConfig& config, uint64_t seed,
                    SegmentClustering* out) {
  *out = SegmentClustering{};
  if (n <= 0) return;
  const int d = dim;
  // x = keys L (rows), the metric space, and |x|^2, in blocks of rows in parallel. L is
  // QueryMetricFactor's lower triangle: a triangular product, half a GEMM's work.
  internal::UseSingleThreadedBlas();
  timeline::Span span_map("kmeans_map");
  std::vector<float> xbuf;
  const float* x = keys;
  double trm = d;
  const bool mapped = metric_l != nullptr && !IsIdentity(metric_l, d);
  const bool lower = mapped && IsLowerTriangular(metric_l, d);
  if (mapped) {
    xbuf.resize(static_cast<std::size_t>(n) * d);
    x = xbuf.data();
    trm = 0;
    for (std::size_t i = 0; i < static_cast<std::size_t>(d) * d; ++i)
      trm += double(metric_l[i]) * metric_l[i];
  }
  std::vector<float> xn2(n);
  // On the AMX tiles where the keys are bf16 values (a bf16 store's): MultiplyBf16Rows.
  const bool mapped_on_tiles =
      mapped && config.bf16_screen && internal::MultiplyBf16Rows(keys, n, d, metric_l, xbuf.data());
  tbb::parallel_for(int64_t{0}, (n + kMapRows - 1) / kMapRows, [&](int64_t b) {
    const int64_t r0 = b * kMapRows, m = std::min(kMapRows, n - r0);
    if (mapped_on_tiles) {
      // x is there already
    } else if (lower) {
      std::copy_n(keys + r0 * d, m * d, xbuf.data() + r0 * d);
      cblas_strmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit,
                  static_cast<int>(m), d, 1.f, metric_l, d, xbuf.data() + r0 * d, d);
    } else if (mapped) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), d, d, 1.f,
                  keys + r0 * d, d, metric_l, d, 0.f, xbuf.data() + r0 * d, d);
    }
    for (int64_t i = r0; i < r0 + m; ++i) {
      const float* r = x + i * d;
      float a = 0;
      for (int j = 0; j < d; ++j) a += r[j] * r[j];
      xn2[i] = a;
    }
  });
  span_map.End();
  const int64_t n_out = SegmentOutliers(n, config);
  int64_t c = SegmentClusters(n, config);

  std::mt19937_64 rng(seed);
  std::vector<int32_t> assign(n);
  std::vector<float> dist(n);
  const int64_t c1 = config.two_level ? static_cast<int64_t>(std::sqrt(double(c))) : 1;
  if (c1 <= 1 || c < 16) {
    KVRT_SPAN("kmeans_lloyd");
    Lloyd(x, xn2.data(), n, d, c, config.kmeans_iters, DrawSeeds(x, n, d, c, &rng), &assign, &dist,
          /*warm=*/false, ScreensAssignments(config, c, d));
  } else {
    // Two levels: c1 ~ sqrt(c) coarse clusters, then each split into its share of the c fine
    // clusters: per iteration n * (c1 + c / c1) distances instead of n * c.
    timeline::Span span_coarse("kmeans_coarse");
    Lloyd(x, xn2.data(), n, d, c1, config.kmeans_iters, DrawSeeds(x, n, d, c1, &rng), &assign,
          &dist, /*warm=*/false, ScreensAssignments(config, c1, d));
    std::vector<std::vector<int64_t>> groups(c1);
    for (int64_t i = 0; i < n; ++i) groups[assign[i]].push_back(i);
    // Each coarse group's rows, share of the c clusters and seeds, in group order (the seeds take
    // the one generator in turn); then the groups' iterations in parallel (a group of a few
    // hundred rows is one task of Assign: run in turn, they were one thread's work).
    struct Group {
      int64_t first = 0, clusters = 0;  // its first cluster number, its count
      std::vector<float> x, xn2, seeds, dist;
      std::vector<int32_t> assign;
    };
    span_coarse.End();
    timeline::Span span_groups("kmeans_groups");
    std::vector<Group> parts(c1);
    int64_t next = 0;
    for (int64_t g = 0; g < c1; ++g) {
      const std::vector<int64_t>& grp = groups[g];
      const int64_t ng = static_cast<int64_t>(grp.size());
      if (ng == 0) continue;
      Group& p = parts[g];
      p.first = next;
      p.clusters = std::clamp<int64_t>((c * ng + n / 2) / n, 1, ng);
      next += p.clusters;
      p.x.resize(static_cast<std::size_t>(ng) * d);
      p.xn2.resize(ng);
      for (int64_t i = 0; i < ng; ++i) {
        std::copy_n(x + grp[i] * d, d, p.x.data() + i * d);
        p.xn2[i] = xn2[grp[i]];
      }
      p.seeds = DrawSeeds(p.x.data(), ng, d, p.clusters, &rng);
    }
    tbb::parallel_for(int64_t{0}, c1, [&](int64_t g) {
      Group& p = parts[g];
      if (p.clusters == 0) return;
      const int64_t ng = static_cast<int64_t>(groups[g].size());
      p.assign.resize(ng);
      p.dist.resize(ng);
      Lloyd(p.x.data(), p.xn2.data(), ng, d, p.clusters, config.kmeans_iters, std::move(p.seeds),
            &p.assign, &p.dist, /*warm=*/false, ScreensAssignments(config, p.clusters, d));
      for (int64_t i = 0; i < ng; ++i) {
        assign[groups[g][i]] = static_cast<int32_t>(p.first + p.assign[i]);
        dist[groups[g][i]] = p.dist[i];
      }
      p = Group{};  // its copies go as soon as they are used
    });
    c = next;
    span_groups.End();
    // Global refinement: lets clusters cross the coarse boundaries.
    if (config.refine_iters > 0) {
      KVRT_SPAN("kmeans_refine");
      Lloyd(x, xn2.data(), n, d, c, config.refine_iters,
            std::vector<float>(static_cast<std::size_t>(c) * d, 0.f), &assign, &dist,
            /*warm=*/true, ScreensAssignments(config, c, d));
    }
  }
  // Outliers leave their cluster (assign -1), then each cluster's means over its members.
  KVRT_SPAN("kmeans_means");
  MarkOutliers(dist.data(), n, c, n_out, assign.data());
  std::vector<int32_t> count(c, 0);
  std::vector<double> km(static_cast<std::size_t>(c) * d, 0.0), vm(km.size(), 0.0),
      xm(km.size(), 0.0), xsq(c, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    const int32_t j = assign[r];
    if (j < 0) continue;
    ++count[j];
    xsq[j] += xn2[r];
  }
  internal::ParallelRange(d, DimGrain(d), [&](int64_t t0, int64_t t1) {
    for (int64_t r = 0; r < n; ++r) {
      const int32_t j = assign[r];
      if (j < 0) continue;
      const std::size_t at = static_cast<std::size_t>(j) * d, row = static_cast<std::size_t>(r) * d;
      for (int64_t t = t0; t < t1; ++t) {
        km[at + t] += keys[row + t];
        vm[at + t] += values[row + t];
        xm[at + t] += x[row + t];
      }
    }
  });
  std::vector<float> key_mean(km.size()), value_mean(km.size()), spread(c, 0.f);
  for (int64_t j = 0; j < c; ++j) {
    if (count[j] == 0) continue;
    const double inv = 1.0 / count[j];
    double cn2 = 0;
    for (int t = 0; t < d; ++t) {
      const std::size_t e = static_cast<std::size_t>(j) * d + t;
      key_mean[e] = static_cast<float>(km[e] * inv);
      value_mean[e] = static_cast<float>(vm[e] * inv);
      cn2 += (xm[e] * inv) * (xm[e] * inv);
    }
    spread[j] = static_cast<float>(std::max(0.0, xsq[j] * inv - cn2) / trm);
  }
  AssembleSegment(assign.data(), n, c, d, key_mean.data(), value_mean.data(), spread.data(), out);
}

int64_t SegmentOutliers(int64_t n, const ClusterConfig& config) {
  return std::max<int64_t>(
      0, std::min<int64_t>(n - 1, static_cast<int64_t>(config.outlier_fraction * n)));
}

int64_t SegmentClusters(int64_t n, const ClusterConfig& config) {
  return std::clamp<int64_t>(
      (n - SegmentOutliers(n, config) + config.cluster_size / 2) / std::max(1, config.cluster_size),
      1, std::max<int64_t>(1, n));
}

void MarkOutliers(const float* dist, int64_t n, int64_t c, int64_t n_out, int32_t* assign) {
  if (n_out <= 0) return;
  std::vector<int64_t> count(c, 0);
  for (int64_t i = 0; i < n; ++i)
    if (assign[i] >= 0) ++count[assign[i]];
  // The distance to the mean of the OTHER members of the cluster: n/(n-1) times the distance to
  // the centroid. A singleton (a far key that took a centroid of its own) is scored exactly
  // through its centroid already: never an outlier.
  std::vector<float> far(n, -1.f);
  for (int64_t i = 0; i < n; ++i) {
    if (assign[i] < 0) continue;
    const int64_t m = count[assign[i]];
    const double f = m > 1 ? double(m) / (m - 1) : 0.0;
    far[i] = static_cast<float>(dist[i] * f * f);
  }
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t take = std::min(n_out, n);
  std::nth_element(idx.begin(), idx.begin() + take, idx.end(), [&](int64_t a, int64_t b) {
    return far[a] > far[b] || (far[a] == far[b] && a < b);
  });
  for (int64_t k = 0; k < take; ++k) assign[idx[k]] = -1;
}

void AssembleSegment(const int32_t* assign, int64_t n, int64_t c, int dim, const float* key_mean,
                      const float* value_mean, const float* spread,
                     SegmentClustering* out) {
  *out = SegmentClustering{};
  // Members per cluster in ascending rows (a counting sort), outliers after the last cluster.
  std::vector<int64_t> start(c + 1, 0);
  int64_t outliers = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (assign[i] < 0) {
      ++outliers;
    } else {
      ++start[assign[i] + 1];
    }
  }
  for (int64_t j = 0; j < c; ++j) start[j + 1] += start[j];
  out->order.resize(n);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    int64_t o = start[c];
    for (int64_t i = 0; i < n; ++i) out->order[assign[i] < 0 ? o++ : fill[assign[i]]++] = i;
  }
  for (int64_t j = 0; j < c; ++j) {
    if (start[j + 1] == start[j]) continue;  // empty clusters are dropped
    out->size.push_back(static_cast<int32_t>(start[j + 1] - start[j]));
    out->centroid.insert(out->centroid.end(), key_mean + j * dim, key_mean + (j + 1) * dim);
    out->value_mean.insert(out->value_mean.end(), value_mean + j * dim,
                           value_mean + (j + 1) * dim);
    out->spread.push_back(spread[j]);
  }
  out->num_outliers = outliers;
}

void CalibrateSpreads(const float* keys, int64_t n, int dim, const float* queries, int64_t nq,
                      float scale, float spread_weight, SegmentClustering* part) {
  if (nq <= 0 || spread_weight <= 0.f || part->size.empty()) return;
  // Per cluster, the fit of a_c in  log mean_k exp(s q.k) - s q.mu_c  ~  a_c |q|^2  over the
  // queries (least squares). Blocks of whole clusters (about kCalibrateRows keys) in parallel:
  // a block gathers its keys in cluster order (so that a cluster's scores are a contiguous run of
  // each query's row), scores them and its centroids against every query (two GEMMs), and fits
  // its clusters; a cluster's sum runs over the queries in order, whatever the thread count.
  internal::UseSingleThreadedBlas();
  (void)n;  // the outliers (the order's rows past the clusters) take no part
  const int64_t c = static_cast<int64_t>(part->size.size());
  std::vector<double> qn2(nq);
  double den = 0;  // sum of |q|^4: the same for every cluster
  for (int64_t i = 0; i < nq; ++i) {
    double a = 0;
    for (int t = 0; t < dim; ++t) a += double(queries[i * dim + t]) * queries[i * dim + t];
    qn2[i] = a;
    den += a * a;
  }
  if (den <= 0) return;
  std::vector<int64_t> first_row(c + 1, 0), block{0};
  for (int64_t j = 0; j < c; ++j) {
    first_row[j + 1] = first_row[j] + part->size[j];
    if (first_row[j + 1] - first_row[block.back()] >= kCalibrateRows) block.push_back(j + 1);
  }
  if (block.back() != c) block.push_back(c);
  const double coef = 0.5 * double(spread_weight) * double(scale) * double(scale);
  tbb::parallel_for(std::size_t{0}, block.size() - 1, [&](std::size_t b) {
    const int64_t j0 = block[b], j1 = block[b + 1];
    const int64_t r0 = first_row[j0], rows = first_row[j1] - r0, cb = j1 - j0;
    std::vector<float> ordered(static_cast<std::size_t>(rows) * dim);
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(keys + part->order[r0 + r] * dim, dim, ordered.data() + r * dim);
    std::vector<float> qk(static_cast<std::size_t>(nq) * rows),
        qm(static_cast<std::size_t>(nq) * cb);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(nq),
                static_cast<int>(rows), dim, scale, queries, dim, ordered.data(), dim, 0.f,
                qk.data(), static_cast<int>(rows));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(nq), static_cast<int>(cb),
                dim, scale, queries, dim, part->centroid.data() + j0 * dim, dim, 0.f, qm.data(),
                static_cast<int>(cb));
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t m = part->size[j];
      const int64_t off = first_row[j] - r0;
      double num = 0;
      for (int64_t i = 0; i < nq; ++i) {
        const float* x = qk.data() + i * rows + off;
        float mx = -INFINITY;
        for (int32_t r = 0; r < m; ++r) mx = std::max(mx, x[r]);
        const double l = ExpSum(x, m, mx, nullptr);
        num += (double(mx) + std::log(l / m) - qm[i * cb + (j - j0)]) * qn2[i];
      }
      part->spread[j] = static_cast<float>(std::max(0.0, num / den) / coef);
    }
  });
}

}  // namespace kvrt::cpu_index
