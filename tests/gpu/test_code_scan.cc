// Code scan (code_scan.h): the host reference against cpu_index's own code scorer on a real
// cluster index's codes (run everywhere), the kernel against the host reference (skipped without
// a device), bad shapes refused, and a timing of the 128K shape on the device (printed, not
// asserted).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "kvrt_common/dtype.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "kvrt_gpu/code_rest.h"
#include "kvrt_gpu/code_scan.h"
#include "kvrt_gpu/kernels.h"
#include "tests/gpu/device_copy.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

#ifndef KVRT_GPU_KERNELS_ONLY
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#endif

namespace kvrt::gpu {
namespace {

// A random scan problem: rows of random codes, clusters (about 1 row in 50 not coded), grids.
struct HostScan {
  int kv = 0, d = 0, bits = 0, c = 0;
  int64_t rows = 0, seg = 0;
  std::vector<uint8_t> code;
  std::vector<int32_t> cluster;
  std::vector<uint16_t> centroid;
  std::vector<float> offset, step;
  CodeScanView View() const {
    CodeScanView v;
    v.kv_heads = kv;
    v.head_dim = d;
    v.bits = bits;
    v.rows = rows;
    v.segment_rows = seg;
    v.num_clusters = c;
    v.code = code.data();
    v.cluster = cluster.data();
    v.centroid = centroid.data();
    v.offset = offset.data();
    v.step = step.data();
    return v;
  }
};

HostScan MakeScan(int kv, int d, int bits, int64_t rows, int64_t seg, int c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  HostScan s;
  s.kv = kv;
  s.d = d;
  s.bits = bits;
  s.rows = rows;
  s.seg = seg;
  s.c = c;
  const int64_t row_bytes = (static_cast<int64_t>(d) * bits + 7) / 8;
  s.code.resize(static_cast<std::size_t>(kv * rows * row_bytes));
  for (auto& b : s.code) b = static_cast<uint8_t>(rng());
  std::uniform_int_distribution<int> pick(0, c - 1);
  for (int64_t i = 0; i < kv * rows; ++i) s.cluster.push_back(rng() % 50 == 0 ? -1 : pick(rng));
  std::vector<float> cen(static_cast<std::size_t>(kv) * c * d);
  for (auto& x : cen) x = nd(rng);
  s.centroid.resize(cen.size());
  ConvertFromF32(cen.data(), cen.size(), DType::kBF16, s.centroid.data());
  const int64_t segments = (rows + seg - 1) / seg;
  for (int64_t i = 0; i < kv * segments * d; ++i) {
    s.offset.push_back(-0.5f + 0.2f * nd(rng));
    s.step.push_back(0.05f + 0.3f * std::fabs(nd(rng)));
  }
  return s;
}

std::vector<float> RandomQ(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(n);
  for (auto& x : q) x = nd(rng);
  return q;
}

TEST(CodeScan, RejectsBadShapes) {
  const HostScan s = MakeScan(2, 64, 2, 100, 64, 7, 1);
  const auto q = RandomQ(4 * 64, 2);
  std::vector<float> out(4 * 100);
  CodeScanView v = s.View();
  v.bits = 3;
  EXPECT_EQ(CodeScanHost(v, q.data(), 4, out.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CodeScan(v, q.data(), 4, out.data(), nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  v = s.View();
  EXPECT_EQ(CodeScanHost(v, q.data(), 3, out.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CodeScanHost(v, q.data(), 2 * 17, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  v.segment_rows = 0;
  EXPECT_EQ(CodeScanHost(v, q.data(), 4, out.data()).code(), absl::StatusCode::kInvalidArgument);
  v = s.View();
  v.code = nullptr;
  EXPECT_EQ(CodeScanHost(v, q.data(), 4, out.data()).code(), absl::StatusCode::kInvalidArgument);
  // Without a device: FailedPrecondition from a build without CUDA, Internal (the launch's CUDA
  // error) from one with it; never OK.
  if (!DeviceAvailable()) {
    EXPECT_FALSE(CodeScan(s.View(), q.data(), 4, out.data(), nullptr).ok());
  }
}

#ifndef KVRT_GPU_KERNELS_ONLY
// The reference scores what the index's second stage scores: a real cluster index's codes,
// centroids and grids, scanned by CodeScanHost, equal cpu_index::CodeScorer's scores row by row.
TEST(CodeScan, HostMatchesTheIndexsCodeScorer) {
  constexpr int kDim = 64;
  constexpr int64_t kRows = 1024;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> keys(kRows * kDim);
  for (auto& x : keys) x = nd(rng);
  cpu_index::IndexConfig cfg;
  cfg.cluster.cluster_size = 8;
  cfg.cluster.segment_tokens = 256;
  cfg.cluster.rescore = 4.f;
  cfg.cluster.calibrate_queries = 0;
  for (int bits : {1, 2, 4, 8}) {
    SCOPED_TRACE(bits);
    cfg.cluster.rescore_bits = bits;
    cpu_index::HeadStore store(kDim, DType::kF32);
    ASSERT_TRUE(store.Append(keys.data(), keys.data(), kRows, kDim).ok());
    auto index = cpu_index::MakeIndex(cpu_index::IndexKind::kCluster, cfg, kDim).value();
    ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
    const cpu_index::ClusterSummary& sum = *cpu_index::GetClusterSummary(*index);
    const cpu_index::SegmentCodes& codes = *cpu_index::GetClusterCodes(*index);
    std::vector<int32_t> cluster(kRows, -1);
    for (int64_t c = 0; c < sum.num_clusters(); ++c)
      for (int64_t r = sum.begin[c]; r < sum.begin[c] + sum.size[c]; ++r)
        cluster[r] = static_cast<int32_t>(c);
    CodeScanView v;
    v.kv_heads = 1;
    v.head_dim = kDim;
    v.bits = bits;
    v.rows = kRows;
    v.segment_rows = 256;
    v.num_clusters = static_cast<int>(sum.num_clusters());
    v.code = codes.code.data();
    v.cluster = cluster.data();
    v.centroid = sum.centroid.data();
    v.offset = codes.offset.data();
    v.step = codes.step.data();
    const auto q = RandomQ(2 * kDim, 9);
    std::vector<float> got(2 * kRows);
    ASSERT_TRUE(CodeScanHost(v, q.data(), 2, got.data()).ok());
    const int64_t rb = cpu_index::CodeRowBytes(kDim, bits);
    for (int h = 0; h < 2; ++h)
      for (int64_t c = 0; c < sum.num_clusters(); ++c) {
        const std::size_t grid = static_cast<std::size_t>(sum.begin[c] / 256) * kDim;
        const cpu_index::CodeScorer scorer(q.data() + h * kDim, kDim, bits,
                                           codes.offset.data() + grid, codes.step.data() + grid);
        std::vector<float> want(sum.size[c]);
        scorer.Score(sum.centroid.data() + c * kDim, codes.code.data() + sum.begin[c] * rb,
                     sum.size[c], want.data());
        for (int32_t m = 0; m < sum.size[c]; ++m)
          ASSERT_NEAR(got[h * kRows + sum.begin[c] + m], want[m], 1e-4 * (1 + std::fabs(want[m])))
              << "head " << h << " cluster " << c << " row " << m;
      }
    for (int64_t r : sum.outliers) {
      EXPECT_EQ(got[r], -std::numeric_limits<float>::infinity());
    }
  }
}

// The index's one-stage selection on codes (ClusterConfig::rescore_bits without rescore) is the
// GPU step's form of it, host reference for host reference: CodeScanHost -> CodeClusterLseHost ->
// ClusterStepHost with cluster_lse selects the index's clusters (per q head and with group
// selection) and estimates the rest as the index does.
TEST(CodeScan, ClusterStepOnCodeMassesIsTheIndexsCodeSelection) {
  constexpr int kDim = 64, kGroup = 4;
  constexpr int64_t kRows = 2048, kSeg = 512;
  constexpr float kScale = 0.125f;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> keys(kRows * kDim), values(kRows * kDim);
  for (int64_t r = 0; r < kRows; ++r)
    for (int t = 0; t < kDim; ++t) {  // a few strong channels: clusters with distinct masses
      keys[r * kDim + t] = nd(rng) * (t < 4 ? 3.f : 1.f);
      values[r * kDim + t] = nd(rng);
    }
  const auto q = RandomQ(kGroup * kDim, 13);
  for (bool group : {false, true}) {
    SCOPED_TRACE(group ? "group selection" : "per q head");
    cpu_index::IndexConfig cfg;
    cfg.cluster.cluster_size = 8;
    cfg.cluster.segment_tokens = kSeg;
    cfg.cluster.calibrate_queries = 0;
    cfg.cluster.rescore_bits = 2;
    cfg.cluster.scale = kScale;
    cfg.cluster.group_select = group;
    cpu_index::HeadStore store(kDim, DType::kF32);
    ASSERT_TRUE(store.Append(keys.data(), values.data(), kRows, kDim).ok());
    auto index = cpu_index::MakeIndex(cpu_index::IndexKind::kCluster, cfg, kDim).value();
    ASSERT_TRUE(index->Build(store, q.data(), kGroup).ok());
    int64_t begin = -1;
    std::vector<int64_t> order;
    ASSERT_TRUE(index->TakeRowOrder(&begin, &order));
    ASSERT_TRUE(store.PermuteRows(begin, order).ok());
    cpu_index::SearchParams sp;
    sp.k = 1;
    std::vector<cpu_index::SearchResult> want(kGroup);
    ASSERT_TRUE(index->SearchGroup(store, q.data(), kGroup, sp, want.data()).ok());

    const cpu_index::ClusterSummary& sum = *cpu_index::GetClusterSummary(*index);
    const cpu_index::SegmentCodes& codes = *cpu_index::GetClusterCodes(*index);
    const int c = static_cast<int>(sum.num_clusters());
    const int no = static_cast<int>(sum.outliers.size());
    std::vector<int32_t> cluster(kRows, -1);
    for (int j = 0; j < c; ++j)
      for (int64_t r = sum.begin[j]; r < sum.begin[j] + sum.size[j]; ++r)
        cluster[r] = static_cast<int32_t>(j);
    CodeScanView v;
    v.kv_heads = 1;
    v.head_dim = kDim;
    v.bits = 2;
    v.rows = kRows;
    v.segment_rows = kSeg;
    v.num_clusters = c;
    v.code = codes.code.data();
    v.cluster = cluster.data();
    v.centroid = sum.centroid.data();
    v.offset = codes.offset.data();
    v.step = codes.step.data();
    std::vector<float> scores(kGroup * kRows), lse(kGroup * c);
    ASSERT_TRUE(CodeScanHost(v, q.data(), kGroup, scores.data()).ok());
    ASSERT_TRUE(CodeClusterLseHost(v, kGroup, scores.data(), sum.begin.data(), sum.size.data(),
                                   kScale, lse.data())
                    .ok());

    std::vector<uint16_t> outlier_key(static_cast<std::size_t>(std::max(no, 1)) * kDim);
    std::vector<float> row(kDim);
    for (int j = 0; j < no; ++j) {
      store.KeyF32(sum.outliers[j], row.data());
      ConvertFromF32(row.data(), kDim, DType::kBF16, outlier_key.data() + j * kDim);
    }
    ClusterSummaryView view;
    view.kv_heads = 1;
    view.head_dim = kDim;
    view.num_clusters = c;
    view.num_outliers = no;
    view.centroid = sum.centroid.data();
    view.value_mean = sum.value_mean.data();
    view.size = sum.size.data();
    view.spread = sum.spread.data();
    view.outlier_key = outlier_key.data();
    ClusterStepParams p;
    p.q_heads = kGroup;
    p.scale = kScale;
    p.budget_tokens = std::max<int64_t>(
        {1, static_cast<int64_t>(std::ceil(cfg.cluster.budget_fraction * (kRows - no))),
         cfg.cluster.min_budget_tokens});
    p.group_select = group;
    p.cluster_lse = lse.data();
    std::vector<float> density(kGroup * c), oscore(kGroup * std::max(no, 1)), key(c);
    std::vector<float> est_o(kGroup * kDim), est_lse(kGroup);
    std::vector<int32_t> selected(kGroup * c), count(kGroup);
    std::vector<int64_t> tokens(kGroup);
    ClusterStepOutputs out;
    out.density = density.data();
    out.outlier_score = oscore.data();
    out.selected = selected.data();
    out.selected_count = count.data();
    out.selected_tokens = tokens.data();
    out.est_o = est_o.data();
    out.est_lse = est_lse.data();
    out.group_key = key.data();
    ASSERT_TRUE(ClusterStepHost(view, q.data(), p, out).ok());

    const std::set<int64_t> outliers(sum.outliers.begin(), sum.outliers.end());
    for (int h = 0; h < kGroup; ++h) {
      SCOPED_TRACE(h);
      std::set<int64_t> got, wanted;
      for (int i = 0; i < count[h]; ++i) {
        const int j = selected[h * c + i];
        for (int64_t r = sum.begin[j]; r < sum.begin[j] + sum.size[j]; ++r) got.insert(r);
      }
      for (int64_t id : want[h].ids)
        if (outliers.count(id) == 0) wanted.insert(id);
      EXPECT_EQ(got, wanted);
      EXPECT_GT(got.size(), 0u);
      EXPECT_LT(got.size(), static_cast<std::size_t>(kRows / 4));  // a selection, not everything
      ASSERT_EQ(want[h].est_o.size(), static_cast<std::size_t>(kDim));
      EXPECT_NEAR(est_lse[h], want[h].est_lse, 1e-3);
      for (int t = 0; t < kDim; ++t)
        EXPECT_NEAR(est_o[h * kDim + t], want[h].est_o[t], 2e-3) << "dim " << t;
    }
  }
}
#endif  // KVRT_GPU_KERNELS_ONLY

#if KVRT_WITH_CUDA
// A device copy of a scan's arrays (the rows' clusters too where with_cluster), freed with it.
struct DeviceScan {
  DeviceScan(const HostScan& s, bool with_cluster) : v(s.View()) {
    v.code = code = ToDevice(s.code);
    v.cluster = cluster = with_cluster ? ToDevice(s.cluster) : nullptr;
    v.centroid = centroid = ToDevice(s.centroid);
    v.offset = offset = ToDevice(s.offset);
    v.step = step = ToDevice(s.step);
  }
  ~DeviceScan() {
    for (void* p :
         {static_cast<void*>(code), static_cast<void*>(cluster), static_cast<void*>(centroid),
          static_cast<void*>(offset), static_cast<void*>(step)})
      cudaFree(p);
  }
  DeviceScan(const DeviceScan&) = delete;
  DeviceScan& operator=(const DeviceScan&) = delete;
  CodeScanView v;
  uint8_t* code;
  int32_t* cluster;
  uint16_t* centroid;
  float* offset;
  float* step;
};

// Runs launch once and waits; with ms, then times kReps more calls (ms per call).
template <typename Launch>
void RunTimed(Launch launch, double* ms) {
  EXPECT_TRUE(launch().ok());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (ms == nullptr) return;
  constexpr int kReps = 20;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kReps; ++i) EXPECT_TRUE(launch().ok());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  *ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
        kReps;
}

// The kernel's scores for s and q (q_heads heads), copied back (ms: time per call).
std::vector<float> ScanOnDevice(const HostScan& s, const std::vector<float>& q, int q_heads,
                                double* ms = nullptr) {
  const DeviceScan d(s, /*with_cluster=*/true);
  float* dq = ToDevice(q);
  float* out = ToDevice(std::vector<float>(static_cast<std::size_t>(q_heads) * s.rows, NAN));
  RunTimed([&] { return CodeScan(d.v, dq, q_heads, out, nullptr); }, ms);
  std::vector<float> h = ToHost(out, static_cast<std::size_t>(q_heads) * s.rows);
  cudaFree(dq);
  cudaFree(out);
  return h;
}
#endif

TEST(CodeScan, KernelMatchesTheHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  struct Case {
    int kv, d, bits, g;
    int64_t rows, seg;
    int c;
  };
  for (const Case& k : {Case{1, 64, 2, 1, 300, 128, 9}, Case{2, 128, 2, 4, 1000, 256, 40},
                        Case{2, 128, 1, 5, 777, 300, 33}, Case{1, 256, 4, 16, 513, 512, 20},
                        Case{3, 96, 8, 2, 257, 100, 11}, Case{2, 128, 4, 8, 4096, 1024, 256}}) {
    SCOPED_TRACE(::testing::Message() << "kv " << k.kv << " d " << k.d << " bits " << k.bits
                                      << " g " << k.g << " rows " << k.rows);
    const HostScan s = MakeScan(k.kv, k.d, k.bits, k.rows, k.seg, k.c, 17 + k.d + k.bits);
    const int qh = k.kv * k.g;
    const auto q = RandomQ(qh * k.d, 3);
    std::vector<float> want(static_cast<std::size_t>(qh) * k.rows);
    ASSERT_TRUE(CodeScanHost(s.View(), q.data(), qh, want.data()).ok());
    const std::vector<float> got = ScanOnDevice(s, q, qh);
    for (std::size_t i = 0; i < want.size(); ++i) {
      if (std::isinf(want[i])) {
        ASSERT_EQ(got[i], want[i]) << i;
        continue;
      }
      ASSERT_NEAR(got[i], want[i], 1e-4 * (1 + std::fabs(want[i])) + 1e-3) << i;
    }
  }
#endif
}

// Contiguous cluster ranges over the rows of every kv head (sizes 0..40, the last one clipped),
// for CodeClusterLse.
void Ranges(int kv, int64_t rows, int c, uint32_t seed, std::vector<int64_t>* begin,
            std::vector<int32_t>* size) {
  std::mt19937 rng(seed);
  for (int h = 0; h < kv; ++h) {
    int64_t at = 0;
    for (int i = 0; i < c; ++i) {
      const int64_t n = std::min<int64_t>(rows - at, static_cast<int64_t>(rng() % 41));
      begin->push_back(at);
      size->push_back(static_cast<int32_t>(n));
      at += n;
    }
  }
}

// A scan's scores (g q heads per kv head) and kClusters ranges over its rows per kv head.
struct LseCase {
  HostScan s;
  int qh = 0, clusters = 0;
  std::vector<float> scores;
  std::vector<int64_t> begin;
  std::vector<int32_t> size;
  CodeScanView View() const {
    CodeScanView v = s.View();
    v.num_clusters = clusters;
    return v;
  }
};

LseCase MakeLseCase(int kv, int d, int64_t rows, int64_t seg, int g, int clusters, uint32_t seed) {
  LseCase k;
  k.s = MakeScan(kv, d, 2, rows, seg, 9, seed);
  k.qh = kv * g;
  k.clusters = clusters;
  const auto q = RandomQ(k.qh * d, seed + 1);
  k.scores.resize(static_cast<std::size_t>(k.qh) * rows);
  EXPECT_TRUE(CodeScanHost(k.s.View(), q.data(), k.qh, k.scores.data()).ok());
  Ranges(kv, rows, clusters, seed + 2, &k.begin, &k.size);
  return k;
}

TEST(CodeScan, ClusterLseIsTheLogSumExpOfItsRowsScaledScores) {
  const LseCase k = MakeLseCase(2, 64, 600, 256, 3, 30, 8);
  const int qh = k.qh, kClusters = k.clusters;
  const std::vector<float>& scores = k.scores;
  const std::vector<int64_t>& begin = k.begin;
  const std::vector<int32_t>& size = k.size;
  const int64_t rows = k.s.rows;
  const CodeScanView v = k.View();
  std::vector<float> lse(static_cast<std::size_t>(qh) * kClusters);
  ASSERT_TRUE(
      CodeClusterLseHost(v, qh, scores.data(), begin.data(), size.data(), 0.125f, lse.data()).ok());
  for (int h = 0; h < qh; ++h)
    for (int c = 0; c < kClusters; ++c) {
      const int kv = h / 3;
      const int64_t at = static_cast<int64_t>(kv) * kClusters + c;
      double sum = 0;
      for (int64_t r = begin[at]; r < begin[at] + size[at]; ++r)
        if (std::isfinite(scores[h * rows + r])) sum += std::exp(0.125 * scores[h * rows + r]);
      const float got = lse[h * kClusters + c];
      if (sum == 0) {
        EXPECT_EQ(got, -std::numeric_limits<float>::infinity()) << h << " " << c;
      } else {
        EXPECT_NEAR(got, std::log(sum), 1e-5 * (1 + std::fabs(std::log(sum)))) << h << " " << c;
      }
    }
  EXPECT_EQ(
      CodeClusterLseHost(v, qh, scores.data(), begin.data(), size.data(), 0.f, lse.data()).code(),
      absl::StatusCode::kInvalidArgument);
}

TEST(CodeScan, ClusterLseKernelMatchesTheHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  const LseCase k = MakeLseCase(3, 128, 2000, 512, 4, 60, 21);
  const int qh = k.qh, kClusters = k.clusters;
  const std::vector<float>& scores = k.scores;
  const std::vector<int64_t>& begin = k.begin;
  const std::vector<int32_t>& size = k.size;
  const CodeScanView v = k.View();
  std::vector<float> want(static_cast<std::size_t>(qh) * kClusters);
  ASSERT_TRUE(
      CodeClusterLseHost(v, qh, scores.data(), begin.data(), size.data(), 0.09f, want.data()).ok());
  float* ds = ToDevice(scores);
  int64_t* db = ToDevice(begin);
  int32_t* dz = ToDevice(size);
  float* dl = ToDevice(std::vector<float>(want.size(), NAN));
  ASSERT_TRUE(CodeClusterLse(v, qh, ds, db, dz, 0.09f, dl, nullptr).ok());
  std::vector<float> got(want.size());
  cudaMemcpy(got.data(), dl, got.size() * sizeof(float), cudaMemcpyDeviceToHost);
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isinf(want[i])) {
      EXPECT_EQ(got[i], want[i]) << i;
    } else {
      EXPECT_NEAR(got[i], want[i], 1e-4 * (1 + std::fabs(want[i]))) << i;
    }
  }
  for (void* p : {static_cast<void*>(ds), static_cast<void*>(db), static_cast<void*>(dz),
                  static_cast<void*>(dl)})
    cudaFree(p);
#endif
}

// Cluster ranges laid out segment by segment, as the index clusters (sizes 0..max_size, the last
// of a segment clipped to it, the rest of a segment's rows in no cluster): every kv head gets
// the same count, C, returned.
int SegmentRanges(int kv, int64_t rows, int64_t seg, int max_size, uint32_t seed,
                  std::vector<int64_t>* begin, std::vector<int32_t>* size) {
  std::mt19937 rng(seed);
  int c = 0;
  for (int h = 0; h < kv; ++h) {
    int n = 0;
    for (int64_t s0 = 0; s0 < rows; s0 += seg) {
      const int64_t end = std::min(rows, s0 + seg);
      for (int64_t at = s0; at < end;) {
        const int64_t len =
            std::min<int64_t>(end - at, static_cast<int64_t>(rng() % (max_size + 1)));
        begin->push_back(at);
        size->push_back(static_cast<int32_t>(len));
        at += len == 0 ? 1 : len;  // an empty cluster leaves a row out
        ++n;
      }
    }
    if (h == 0) c = n;
    // Pad or clip to head 0's count (the view's clusters per head are one number).
    for (; n < c; ++n) {
      begin->push_back(0);
      size->push_back(0);
    }
    if (n > c) {
      begin->resize(static_cast<std::size_t>(h + 1) * c);
      size->resize(begin->size());
    }
  }
  return c;
}

TEST(CodeScan, MassRefusesBadShapes) {
  HostScan s = MakeScan(1, 80, 2, 64, 64, 4, 3);
  const auto q = RandomQ(80, 4);
  std::vector<int64_t> begin = {0, 16, 32, 48};
  std::vector<int32_t> size = {16, 16, 16, 16};
  std::vector<float> lse(4);
  CodeScanView v = s.View();
  v.cluster = nullptr;  // not needed
  EXPECT_EQ(CodeClusterMassHost(v, q.data(), 1, begin.data(), size.data(), 0.1f, lse.data()).code(),
            absl::StatusCode::kInvalidArgument);  // head_dim 80
  s = MakeScan(1, 64, 2, 64, 64, 4, 3);
  v = s.View();
  v.cluster = nullptr;
  EXPECT_TRUE(
      CodeClusterMassHost(v, q.data(), 1, begin.data(), size.data(), 0.1f, lse.data()).ok());
  v.code = s.code.data() + 1;  // misaligned
  EXPECT_EQ(
      CodeClusterMass(v, q.data(), 1, begin.data(), size.data(), 0.1f, lse.data(), nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  v = s.View();
  v.cluster = nullptr;
  // q read as float4 (the kernel's loads): a q not 16-byte aligned is refused, not read astray.
  std::vector<float> q_shifted(q.size() + 1);
  const int shift = reinterpret_cast<uintptr_t>(q_shifted.data()) % 16 == 0 ? 1 : 0;
  std::copy(q.begin(), q.end(), q_shifted.begin() + shift);
  ASSERT_NE(reinterpret_cast<uintptr_t>(q_shifted.data() + shift) % 16, 0u);
  EXPECT_EQ(CodeClusterMass(v, q_shifted.data() + shift, 1, begin.data(), size.data(), 0.1f,
                            lse.data(), nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  v = s.View();
  v.centroid = nullptr;
  EXPECT_EQ(CodeClusterMassHost(v, q.data(), 1, begin.data(), size.data(), 0.1f, lse.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

#if KVRT_WITH_CUDA
// CodeClusterMass on the device for s, q, the ranges; lse copied back (ms: time per call).
std::vector<float> MassOnDevice(const HostScan& s, const std::vector<float>& q, int q_heads,
                                const std::vector<int64_t>& begin, const std::vector<int32_t>& size,
                                float scale, double* ms = nullptr) {
  const DeviceScan d(s, /*with_cluster=*/false);
  float* dq = ToDevice(q);
  int64_t* db = ToDevice(begin);
  int32_t* dz = ToDevice(size);
  const std::size_t n = static_cast<std::size_t>(q_heads) * d.v.num_clusters;
  float* out = ToDevice(std::vector<float>(n, NAN));
  RunTimed([&] { return CodeClusterMass(d.v, dq, q_heads, db, dz, scale, out, nullptr); }, ms);
  std::vector<float> h = ToHost(out, n);
  for (void* p : {static_cast<void*>(dq), static_cast<void*>(db), static_cast<void*>(dz),
                  static_cast<void*>(out)})
    cudaFree(p);
  return h;
}
#endif

#if KVRT_WITH_CUDA
// Per q head, how far the kernel's rounding may move a row's scaled score (so its cluster's
// log-sum-exp): the folded scale x q_t x step_t rounded once to f16 (2^-11 relative, each times
// a code of at most 2^bits - 1, plus f16's subnormal spacing), the centroid's q in bf16 hi + lo
// (about 2^-16 relative).
std::vector<double> MassRoundingBound(const HostScan& s, const std::vector<float>& q, int q_heads,
                                      float scale) {
  const int g = q_heads / s.kv;
  const int64_t segments = (s.rows + s.seg - 1) / s.seg;
  const double max_code = (1 << s.bits) - 1;
  std::vector<double> bound(q_heads, 0.0);
  for (int h = 0; h < q_heads; ++h) {
    const int kv = h / g;
    const float* qh = q.data() + static_cast<std::size_t>(h) * s.d;
    double folded = 0, cen = 0;
    for (int64_t seg = 0; seg < segments; ++seg) {
      double sum = 0;
      for (int t = 0; t < s.d; ++t)
        sum += std::fabs(qh[t] * s.step[(kv * segments + seg) * s.d + t]);
      folded = std::max(folded, sum);
    }
    for (int c = 0; c < s.c; ++c) {
      double sum = 0;
      for (int t = 0; t < s.d; ++t)
        sum += std::fabs(qh[t] *
                         Bf16ToF32(s.centroid[(static_cast<std::size_t>(kv) * s.c + c) * s.d + t]));
      cen = std::max(cen, sum);
    }
    bound[h] = scale * (std::ldexp(folded * max_code, -11) + std::ldexp(cen, -16)) +
               s.d * max_code * std::ldexp(1.0, -24) * scale * folded;
  }
  return bound;
}
#endif

TEST(CodeScan, MassKernelMatchesTheHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  struct Case {
    int kv, d, bits, g;
    int64_t rows, seg;
    int max_size;
  };
  for (const Case& k : {Case{2, 128, 2, 4, 4096, 1024, 40}, Case{1, 64, 1, 1, 1000, 256, 20},
                        Case{2, 256, 4, 16, 3000, 1024, 70}, Case{3, 128, 8, 5, 2000, 512, 33},
                        Case{1, 32, 2, 8, 700, 700, 16}, Case{2, 64, 2, 4, 2000, 512, 24},
                        Case{1, 256, 2, 8, 1500, 512, 40}, Case{2, 128, 2, 12, 3000, 1024, 30}}) {
    SCOPED_TRACE(::testing::Message() << "kv " << k.kv << " d " << k.d << " bits " << k.bits
                                      << " g " << k.g << " rows " << k.rows);
    std::vector<int64_t> begin;
    std::vector<int32_t> size;
    const int c = SegmentRanges(k.kv, k.rows, k.seg, k.max_size, 31 + k.d, &begin, &size);
    HostScan s = MakeScan(k.kv, k.d, k.bits, k.rows, k.seg, c, 19 + k.d + k.bits);
    const int qh = k.kv * k.g;
    const auto q = RandomQ(qh * k.d, 7);
    const float scale = 1.f / std::sqrt(static_cast<float>(k.d));
    std::vector<float> want(static_cast<std::size_t>(qh) * c);
    CodeScanView v = s.View();
    v.cluster = nullptr;
    ASSERT_TRUE(
        CodeClusterMassHost(v, q.data(), qh, begin.data(), size.data(), scale, want.data()).ok());
    const std::vector<float> got = MassOnDevice(s, q, qh, begin, size, scale);
    const std::vector<double> bound = MassRoundingBound(s, q, qh, scale);
    int finite = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      if (std::isinf(want[i])) {
        ASSERT_EQ(got[i], want[i]) << i;
        continue;
      }
      ++finite;
      ASSERT_NEAR(got[i], want[i], 1e-4 * (1 + std::fabs(want[i])) + 1e-3 + bound[i / c]) << i;
    }
    EXPECT_GT(finite, c / 2);
  }
#endif
}

// Clusters of `keys` consecutive rows over each kv head's `rows` (the timing shapes' layout).
[[maybe_unused]] void UniformClusters(int kv, int64_t rows, int keys, std::vector<int64_t>* begin,
                                      std::vector<int32_t>* size) {
  for (int h = 0; h < kv; ++h)
    for (int64_t r = 0; r < rows; r += keys) {
      begin->push_back(r);
      size->push_back(static_cast<int32_t>(std::min<int64_t>(keys, rows - r)));
    }
}

// The 8B shape at 128K: 8 kv heads x 131072 rows of 2-bit codes, 32 q heads. Printed only.
TEST(CodeScan, TimesThe128KShape) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  const HostScan s = MakeScan(8, 128, 2, 131072, 8192, 8192, 4);
  const auto q = RandomQ(32 * 128, 5);
  double ms = 0;
  ScanOnDevice(s, q, 32, &ms);
  std::printf(
      "code scan, 8 kv heads x 131072 rows, 2-bit, d=128, 32 q heads: %.1f us per call "
      "(%.1f MB of codes)\n",
      ms * 1e3, 8.0 * 131072 * 32 / 1e6);
  // Clusters of 16 rows within segments of 8192: the GPU backend's selection on codes.
  std::vector<int64_t> begin;
  std::vector<int32_t> size;
  UniformClusters(8, 131072, 16, &begin, &size);
  HostScan m = MakeScan(8, 128, 2, 131072, 8192, 8192, 4);
  double mass_ms = 0;
  MassOnDevice(m, q, 32, begin, size, 0.088f, &mass_ms);
  std::printf(
      "code cluster mass, the same shape, 8192 clusters of 16 per kv head: %.1f us per call\n",
      mass_ms * 1e3);
#endif
}

// Value codes beside a HostScan's key codes (code_rest.h): random codes, bf16 value means, a
// per-segment grid.
struct HostValues {
  int bits = 2;
  std::vector<uint8_t> code;
  std::vector<uint16_t> mean;
  std::vector<float> offset, step;
  CodeValueView View() const {
    CodeValueView v;
    v.bits = bits;
    v.code = code.data();
    v.value_mean = mean.data();
    v.offset = offset.data();
    v.step = step.data();
    return v;
  }
};

HostValues MakeValues(const HostScan& s, int bits, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  HostValues v;
  v.bits = bits;
  v.code.resize(static_cast<std::size_t>(s.kv * s.rows * ((s.d * bits + 7) / 8)));
  for (auto& b : v.code) b = static_cast<uint8_t>(rng());
  std::vector<float> mean(static_cast<std::size_t>(s.kv) * s.c * s.d);
  for (auto& x : mean) x = nd(rng);
  v.mean.resize(mean.size());
  ConvertFromF32(mean.data(), mean.size(), DType::kBF16, v.mean.data());
  const int64_t segments = (s.rows + s.seg - 1) / s.seg;
  for (int64_t i = 0; i < s.kv * segments * s.d; ++i) {
    v.offset.push_back(-0.3f + 0.2f * nd(rng));
    v.step.push_back(0.1f + 0.2f * std::fabs(nd(rng)));
  }
  return v;
}

// Each head attends a random tenth of the clusters, and the last head every cluster.
std::vector<uint8_t> RandomAttended(int q_heads, int c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> a(static_cast<std::size_t>(q_heads) * c);
  for (auto& x : a) x = rng() % 10 == 0 ? 1 : 0;
  std::fill(a.end() - c, a.end(), uint8_t{1});
  return a;
}

TEST(CodeRest, HostReferenceIsTheSoftmaxOverTheRestsDecodedRows) {
  const int kv = 2, d = 64, g = 3, qh = kv * g;
  std::vector<int64_t> begin;
  std::vector<int32_t> size;
  const int c = SegmentRanges(kv, 900, 256, 24, 5, &begin, &size);
  const HostScan s = MakeScan(kv, d, 2, 900, 256, c, 6);
  const HostValues val = MakeValues(s, 2, 7);
  const auto q = RandomQ(qh * d, 8);
  const auto attended = RandomAttended(qh, c, 9);
  const float scale = 0.125f;
  CodeScanView keys = s.View();
  keys.cluster = nullptr;
  std::vector<float> o(static_cast<std::size_t>(qh) * d), lse(qh);
  ASSERT_TRUE(CodeValueRestHost(keys, val.View(), q.data(), qh, begin.data(), size.data(),
                                attended.data(), scale, o.data(), lse.data())
                  .ok());
  // Brute force: each rest row's key and value decoded channel by channel, softmax in double.
  const int64_t segments = (s.rows + s.seg - 1) / s.seg;
  const auto code2 = [](const uint8_t* row, int t) { return (row[t / 4] >> (2 * (t % 4))) & 3; };
  for (int h = 0; h < qh; ++h) {
    const int k = h / g;
    std::vector<double> score, value_sum(d, 0.0);
    std::vector<std::vector<double>> values;
    for (int ci = 0; ci < c; ++ci) {
      if (attended[static_cast<std::size_t>(h) * c + ci]) continue;
      const int64_t at = static_cast<int64_t>(k) * c + ci;
      for (int64_t r = begin[at]; r < begin[at] + size[at]; ++r) {
        const int64_t grid = (k * segments + r / s.seg) * d;
        const uint8_t* krow = s.code.data() + (k * s.rows + r) * (d * 2 / 8);
        const uint8_t* vrow = val.code.data() + (k * s.rows + r) * (d * 2 / 8);
        double dot = 0;
        std::vector<double> v(d);
        for (int t = 0; t < d; ++t) {
          const double key = Bf16ToF32(s.centroid[at * d + t]) + s.offset[grid + t] +
                             double(s.step[grid + t]) * code2(krow, t);
          dot += double(q[static_cast<std::size_t>(h) * d + t]) * key;
          v[t] = Bf16ToF32(val.mean[at * d + t]) + val.offset[grid + t] +
                 double(val.step[grid + t]) * code2(vrow, t);
        }
        score.push_back(scale * dot);
        values.push_back(v);
      }
    }
    if (score.empty()) {
      EXPECT_EQ(lse[h], -std::numeric_limits<float>::infinity()) << h;
      for (int t = 0; t < d; ++t) EXPECT_EQ(o[static_cast<std::size_t>(h) * d + t], 0.f);
      continue;
    }
    const double m = *std::max_element(score.begin(), score.end());
    double l = 0;
    for (std::size_t i = 0; i < score.size(); ++i) {
      const double p = std::exp(score[i] - m);
      l += p;
      for (int t = 0; t < d; ++t) value_sum[t] += p * values[i][t];
    }
    EXPECT_NEAR(lse[h], m + std::log(l), 1e-5 * (1 + std::fabs(m))) << h;
    for (int t = 0; t < d; ++t)
      ASSERT_NEAR(o[static_cast<std::size_t>(h) * d + t], value_sum[t] / l, 1e-5) << h << " " << t;
  }
  // The last head attends every cluster: nothing is left.
  EXPECT_EQ(lse[qh - 1], -std::numeric_limits<float>::infinity());
  // Bad arguments name the problem instead of reading astray.
  HostValues bad = val;
  bad.bits = 3;
  EXPECT_EQ(CodeValueRestHost(keys, bad.View(), q.data(), qh, begin.data(), size.data(),
                              attended.data(), scale, o.data(), lse.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
  bad.bits = 4;  // the reference takes it, the device form does not
  EXPECT_EQ(
      CodeValueRest(keys, bad.View(), q.data(), qh, begin.data(), size.data(), attended.data(),
                    lse.data(), scale, o.data(), o.data(), lse.data(), nullptr)
          .code(),
      absl::StatusCode::kInvalidArgument);
}

#if KVRT_WITH_CUDA
// CodeValueRest on the device (cluster_lse from CodeClusterMass on the device); o, lse back.
void RestOnDevice(const HostScan& s, const HostValues& val, const std::vector<float>& q, int qh,
                  const std::vector<int64_t>& begin, const std::vector<int32_t>& size,
                  const std::vector<uint8_t>& attended, float scale, std::vector<float>* o,
                  std::vector<float>* lse, double* ms = nullptr) {
  const DeviceScan dk(s, /*with_cluster=*/false);
  CodeValueView dv = val.View();
  uint8_t* vcode = ToDevice(val.code);
  uint16_t* vmean = ToDevice(val.mean);
  float* voff = ToDevice(val.offset);
  float* vstep = ToDevice(val.step);
  dv.code = vcode;
  dv.value_mean = vmean;
  dv.offset = voff;
  dv.step = vstep;
  float* dq = ToDevice(q);
  int64_t* db = ToDevice(begin);
  int32_t* dz = ToDevice(size);
  uint8_t* da = ToDevice(attended);
  float* dlse_c = ToDevice(std::vector<float>(static_cast<std::size_t>(qh) * s.c, NAN));
  float* ws = ToDevice(std::vector<float>(CodeValueRestWorkspaceFloats(dk.v, qh), NAN));
  float* dout = ToDevice(std::vector<float>(static_cast<std::size_t>(qh) * s.d, NAN));
  float* dlse = ToDevice(std::vector<float>(qh, NAN));
  EXPECT_TRUE(CodeClusterMass(dk.v, dq, qh, db, dz, scale, dlse_c, nullptr).ok());
  RunTimed(
      [&] {
        return CodeValueRest(dk.v, dv, dq, qh, db, dz, da, dlse_c, scale, ws, dout, dlse, nullptr);
      },
      ms);
  *o = ToHost(dout, static_cast<std::size_t>(qh) * s.d);
  *lse = ToHost(dlse, qh);
  for (void* p : {static_cast<void*>(vcode), static_cast<void*>(vmean), static_cast<void*>(voff),
                  static_cast<void*>(vstep), static_cast<void*>(dq), static_cast<void*>(db),
                  static_cast<void*>(dz), static_cast<void*>(da), static_cast<void*>(dlse_c),
                  static_cast<void*>(ws), static_cast<void*>(dout), static_cast<void*>(dlse)})
    cudaFree(p);
}
#endif

// The kernel against the reference: lse within the scores' rounding bound (as the mass kernel's),
// o within the weights' f16 rounding and that bound, times the values' size.
TEST(CodeRest, KernelMatchesTheHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  struct Case {
    int kv, d, key_bits, g;
    int64_t rows, seg;
    int max_size;
  };
  for (const Case& k : {Case{2, 128, 2, 4, 4096, 1024, 40}, Case{1, 64, 2, 8, 1500, 512, 20},
                        Case{3, 128, 4, 3, 2000, 512, 33}, Case{1, 128, 2, 1, 700, 700, 16},
                        Case{1, 256, 2, 4, 1500, 512, 24}, Case{2, 256, 1, 8, 900, 300, 17}}) {
    SCOPED_TRACE(::testing::Message()
                 << "kv " << k.kv << " d " << k.d << " key bits " << k.key_bits << " g " << k.g);
    std::vector<int64_t> begin;
    std::vector<int32_t> size;
    const int c = SegmentRanges(k.kv, k.rows, k.seg, k.max_size, 41 + k.d, &begin, &size);
    const HostScan s = MakeScan(k.kv, k.d, k.key_bits, k.rows, k.seg, c, 43 + k.d);
    const HostValues val = MakeValues(s, 2, 47);
    const int qh = k.kv * k.g;
    const auto q = RandomQ(qh * k.d, 53);
    const auto attended = RandomAttended(qh, c, 59);
    const float scale = 1.f / std::sqrt(static_cast<float>(k.d));
    CodeScanView keys = s.View();
    keys.cluster = nullptr;
    std::vector<float> want_o(static_cast<std::size_t>(qh) * k.d), want_lse(qh);
    ASSERT_TRUE(CodeValueRestHost(keys, val.View(), q.data(), qh, begin.data(), size.data(),
                                  attended.data(), scale, want_o.data(), want_lse.data())
                    .ok());
    std::vector<float> got_o, got_lse;
    RestOnDevice(s, val, q, qh, begin, size, attended, scale, &got_o, &got_lse);
    const std::vector<double> bound = MassRoundingBound(s, q, qh, scale);
    double vmax = 0;
    for (float x : want_o) vmax = std::max(vmax, double(std::fabs(x)));
    for (int h = 0; h < qh; ++h) {
      if (std::isinf(want_lse[h])) {
        ASSERT_EQ(got_lse[h], want_lse[h]) << h;
        continue;
      }
      ASSERT_NEAR(got_lse[h], want_lse[h], 1e-4 * (1 + std::fabs(want_lse[h])) + bound[h]) << h;
      const double tol = (2e-3 + 2 * bound[h]) * (1 + vmax);
      for (int t = 0; t < k.d; ++t)
        ASSERT_NEAR(got_o[static_cast<std::size_t>(h) * k.d + t],
                    want_o[static_cast<std::size_t>(h) * k.d + t], tol)
            << h << " " << t;
    }
  }
#endif
}

// A selection as ClusterStep writes it (ids ascending, the row's first count[h], the rest stale)
// becomes a mask: the host form exactly, the kernel the same bytes over a stale buffer.
TEST(CodeRest, AttendedFromSelectionMarksTheSelectedClustersOnly) {
  const int qh = 3, C = 700;
  std::vector<int32_t> selected(static_cast<std::size_t>(qh) * C, 5);  // stale: cluster 5
  const std::vector<int32_t> count = {0, 3, C};
  selected[C + 0] = 0;
  selected[C + 1] = 17;
  selected[C + 2] = C - 1;
  for (int c = 0; c < C; ++c) selected[2 * C + c] = c;
  std::vector<uint8_t> got(static_cast<std::size_t>(qh) * C, 7);
  ASSERT_TRUE(AttendedFromSelectionHost(selected.data(), count.data(), qh, C, got.data()).ok());
  for (int h = 0; h < qh; ++h)
    for (int c = 0; c < C; ++c) {
      const bool want = h == 2 || (h == 1 && (c == 0 || c == 17 || c == C - 1));
      ASSERT_EQ(got[static_cast<std::size_t>(h) * C + c], want ? 1 : 0) << h << " " << c;
    }
  EXPECT_EQ(AttendedFromSelectionHost(nullptr, count.data(), qh, C, got.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AttendedFromSelectionHost(selected.data(), count.data(), -1, C, got.data()).code(),
            absl::StatusCode::kInvalidArgument);
  if (!DeviceAvailable()) return;
#if KVRT_WITH_CUDA
  int32_t* ds = ToDevice(selected);
  int32_t* dc = ToDevice(count);
  uint8_t* da = ToDevice(std::vector<uint8_t>(got.size(), 9));
  ASSERT_TRUE(AttendedFromSelection(ds, dc, qh, C, da, nullptr).ok());
  EXPECT_EQ(ToHost(da, got.size()), got);
  for (void* p : {static_cast<void*>(ds), static_cast<void*>(dc), static_cast<void*>(da)})
    cudaFree(p);
#endif
}

// The 8B shape at 128K (as TimesThe128KShape), 2-bit keys and values, each head attending a tenth
// of the clusters. Printed only.
TEST(CodeRest, TimesThe128KShape) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
#if KVRT_WITH_CUDA
  // The 8B shape (32 q / 8 kv heads, d = 128), then a Gemma 3 12B-like one (16 q / 8 kv, d = 256).
  for (const auto& [qh, d] : {std::pair{32, 128}, std::pair{16, 256}}) {
    std::vector<int64_t> begin;
    std::vector<int32_t> size;
    UniformClusters(8, 131072, 16, &begin, &size);
    const HostScan s = MakeScan(8, d, 2, 131072, 8192, 8192, 4);
    const HostValues val = MakeValues(s, 2, 5);
    const auto q = RandomQ(qh * d, 5);
    const auto attended = RandomAttended(qh, 8192, 6);
    std::vector<float> o, lse;
    double ms = 0;
    RestOnDevice(s, val, q, qh, begin, size, attended, 1.f / std::sqrt(static_cast<float>(d)), &o,
                 &lse, &ms);
    std::printf(
        "code value rest, 8 kv heads x 131072 rows, 2-bit keys and values, d=%d, %d q heads: %.1f "
        "us per call\n",
        d, qh, ms * 1e3);
  }
#endif
}

}  // namespace
}  // namespace kvrt::gpu
