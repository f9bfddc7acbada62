// Cluster step (cluster_kernels.h): the host reference against cpu_index's selection and
// estimate (run everywhere), the kernels against the host reference (skipped without a device),
// and a timing of the 128K shape on the device (printed, not asserted).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gpu/src/cluster_launch.h"  // the workspace's threshold section (its modes)
#include "kvrt_common/dtype.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "kvrt_gpu/kernels.h"
#include "tests/gpu/device_copy.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

#ifndef KVRT_GPU_KERNELS_ONLY
#include "kvrt_cpu_index/cluster.h"
#endif

namespace kvrt::gpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct HostSummary {
  int kv = 0, d = 0, c = 0, o = 0;
  std::vector<uint16_t> cen, vm, ok;
  std::vector<int32_t> size;
  std::vector<float> spread;
  ClusterSummaryView View() const {
    ClusterSummaryView v;
    v.kv_heads = kv;
    v.head_dim = d;
    v.num_clusters = c;
    v.num_outliers = o;
    v.centroid = cen.data();
    v.value_mean = vm.data();
    v.size = size.data();
    v.spread = spread.data();
    v.outlier_key = ok.empty() ? nullptr : ok.data();
    return v;
  }
};

std::vector<uint16_t> RandBf16(std::mt19937& rng, std::size_t n, float sd) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> f(n);
  for (auto& x : f) x = nd(rng);
  std::vector<uint16_t> out(n);
  ConvertFromF32(f.data(), n, DType::kBF16, out.data());
  return out;
}

HostSummary MakeSummary(int kv, int d, int c, int o, uint32_t seed, bool padding) {
  std::mt19937 rng(seed);
  HostSummary s;
  s.kv = kv;
  s.d = d;
  s.c = c;
  s.o = o;
  s.cen = RandBf16(rng, static_cast<std::size_t>(kv) * c * d, 1.f);
  s.vm = RandBf16(rng, static_cast<std::size_t>(kv) * c * d, 1.f);
  s.ok = RandBf16(rng, static_cast<std::size_t>(kv) * o * d, 1.f);
  std::uniform_int_distribution<int> sz(1, 30);
  std::uniform_real_distribution<float> sp(0.f, 0.5f);
  for (int i = 0; i < kv * c; ++i) {
    s.size.push_back(padding && (i % c) >= c - 5 ? 0 : sz(rng));
    s.spread.push_back(sp(rng));
    // An empty cluster's rows are never to be read into a result: NaN there would show it.
    if (s.size.back() == 0) {
      std::fill_n(s.cen.begin() + std::size_t(i) * d, d, uint16_t{0x7fc0});
      std::fill_n(s.vm.begin() + std::size_t(i) * d, d, uint16_t{0x7fc0});
    }
  }
  return s;
}

struct HostOut {
  std::vector<float> dens, osc, eo, lse;
  std::vector<int32_t> sel, cnt;
  std::vector<int64_t> tok;
  std::vector<float> gkey;
  std::vector<uint32_t> gmask;
  HostOut(int qh, int c, int o, int d)
      : dens(std::size_t(qh) * c),
        osc(std::size_t(qh) * std::max(o, 1)),
        eo(std::size_t(qh) * d),
        lse(qh),
        sel(std::size_t(qh) * std::max(c, 1)),
        cnt(qh),
        tok(qh),
        gkey(std::size_t(qh) * std::max(c, 1)),
        gmask(std::size_t(qh) * std::max(c, 1), 0xdeadbeefu) {}
  ClusterStepOutputs View() {
    return {dens.data(), osc.data(), sel.data(),  cnt.data(),  tok.data(),
            eo.data(),   lse.data(), gkey.data(), gmask.data()};
  }
};

std::vector<float> RandQ(int qh, int d, uint32_t seed, float sd) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> q(static_cast<std::size_t>(qh) * d);
  for (auto& x : q) x = nd(rng);
  return q;
}

// What MarkSelected makes of the selection lists (direct_attend.h): per kv head and cluster, the
// bits of the group's q heads that selected it.
std::vector<uint32_t> MaskOfLists(const std::vector<int32_t>& sel, const std::vector<int32_t>& cnt,
                                  int kv, int g, int c) {
  std::vector<uint32_t> mask(std::size_t(kv) * c, 0u);
  for (int h = 0; h < kv * g; ++h)
    for (int k = 0; k < cnt[h]; ++k)
      mask[std::size_t(h / g) * c + sel[std::size_t(h) * c + k]] |= 1u << (h % g);
  return mask;
}

// Group selection: every q head of a kv head selects the same clusters, and group_mask (every
// word written, stale bytes before) is what MarkSelected makes of the lists.
TEST(ClusterStepHost, GroupMaskIsTheMarkedLists) {
  for (const int64_t budget : {int64_t{0}, int64_t{700}, int64_t{1} << 30}) {
    SCOPED_TRACE(budget);
    const int kv = 2, g = 4, d = 64, c = 300, qh = kv * g;
    HostSummary s = MakeSummary(kv, d, c, 5, 41, true);
    const auto q = RandQ(qh, d, 42, 0.6f);
    ClusterStepParams p;
    p.q_heads = qh;
    p.budget_tokens = budget;
    p.group_select = true;
    HostOut ref(qh, c, 5, d);
    ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p, ref.View()).ok());
    const auto want = MaskOfLists(ref.sel, ref.cnt, kv, g, c);
    ASSERT_TRUE(std::equal(want.begin(), want.end(), ref.gmask.begin()));
    std::size_t marked = 0;
    for (uint32_t w : want) {
      ASSERT_TRUE(w == 0u || w == 0xfu) << w;  // one selection per kv head
      marked += w != 0u;
    }
    EXPECT_EQ(marked > 0, budget > 0);
  }
}

#ifndef KVRT_GPU_KERNELS_ONLY
// The host reference agrees with cpu_index's SelectClusters / EstimateUnselected on the same
// summary (the GPU tier and the CPU index select and estimate alike).
TEST(ClusterStepHost, MatchesCpuIndexSelectionAndEstimate) {
  const int kv = 2, d = 64, c = 300, o = 7, qh = 8, g = qh / kv;
  const HostSummary s = MakeSummary(kv, d, c, o, 1, false);
  const auto q = RandQ(qh, d, 2, 0.5f);
  for (bool group : {false, true}) {
    for (float top_p : {0.f, 0.6f}) {
      SCOPED_TRACE(::testing::Message() << "group " << group << " top_p " << top_p);
      ClusterStepParams p;
      p.q_heads = qh;
      p.spread_weight = 1.f;
      p.budget_tokens = 400;
      p.top_p = top_p;
      p.group_select = group;
      HostOut out(qh, c, o, d);
      ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p, out.View()).ok());
      for (int kh = 0; kh < kv; ++kh) {
        cpu_index::ClusterSummary cs;
        cs.dim = d;
        cs.size.assign(s.size.begin() + kh * c, s.size.begin() + (kh + 1) * c);
        cs.spread.assign(s.spread.begin() + kh * c, s.spread.begin() + (kh + 1) * c);
        cs.centroid.assign(s.cen.begin() + std::size_t(kh) * c * d,
                           s.cen.begin() + std::size_t(kh + 1) * c * d);
        cs.value_mean.assign(s.vm.begin() + std::size_t(kh) * c * d,
                             s.vm.begin() + std::size_t(kh + 1) * c * d);
        cs.begin.assign(c, 0);
        std::vector<float> dens(std::size_t(g) * c);
        for (int i = 0; i < g; ++i) {
          const int h = kh * g + i;
          std::vector<float> scores(c);
          float qn2 = 0;
          for (int t = 0; t < d; ++t) qn2 += q[h * d + t] * q[h * d + t];
          for (int j = 0; j < c; ++j) {
            float a = 0;
            for (int t = 0; t < d; ++t) a += q[h * d + t] * Bf16ToF32(cs.centroid[j * d + t]);
            scores[j] = a;
          }
          cpu_index::ClusterDensity(cs, scores.data(), qn2, 1.f / 8.f, 1.f, dens.data() + i * c);
          for (int j = 0; j < c; ++j) EXPECT_NEAR(dens[i * c + j], out.dens[h * c + j], 1e-4);
        }
        std::vector<float> key(c);
        if (group) {
          cpu_index::GroupSelectionKey(cs, dens.data(), g, key.data());
          for (int j = 0; j < c; ++j) EXPECT_NEAR(key[j], out.gkey[kh * c + j], 1e-4);
        }
        for (int i = 0; i < g; ++i) {
          const int h = kh * g + i;
          std::vector<int32_t> sel;
          const int64_t tok = cpu_index::SelectClusters(
              cs, group ? key.data() : dens.data() + i * c, 400, top_p, &sel);
          EXPECT_EQ(tok, out.tok[h]);
          std::sort(sel.begin(), sel.end());
          ASSERT_EQ(static_cast<int>(sel.size()), out.cnt[h]);
          for (std::size_t k = 0; k < sel.size(); ++k) EXPECT_EQ(sel[k], out.sel[h * c + k]);
          std::vector<float> eo(d);
          float lse;
          cpu_index::EstimateUnselected(cs, dens.data() + i * c, sel, eo.data(), &lse);
          EXPECT_NEAR(lse, out.lse[h], 1e-4);
          for (int t = 0; t < d; ++t) EXPECT_NEAR(eo[t], out.eo[h * d + t], 1e-4);
        }
      }
    }
  }
}

// Group selection: every head of a kv head gets one list; it reads at most the budget (plus the
// last cluster) per kv head; a group of one selects as the head alone.
TEST(ClusterStepHost, GroupSelectionSharesOneListPerKvHead) {
  const int kv = 2, d = 64, c = 200, qh = 8, g = qh / kv;
  const HostSummary s = MakeSummary(kv, d, c, 0, 7, true);
  const auto q = RandQ(qh, d, 8, 1.f);
  ClusterStepParams p;
  p.q_heads = qh;
  p.budget_tokens = 300;
  HostOut per(qh, c, 0, d), grp(qh, c, 0, d);
  ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p, per.View()).ok());
  p.group_select = true;
  ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p, grp.View()).ok());
  for (int kh = 0; kh < kv; ++kh) {
    std::set<int32_t> uni;
    for (int i = 0; i < g; ++i) {
      const int h = kh * g + i;
      uni.insert(per.sel.begin() + std::size_t(h) * c,
                 per.sel.begin() + std::size_t(h) * c + per.cnt[h]);
      ASSERT_EQ(grp.cnt[h], grp.cnt[kh * g]);
      EXPECT_TRUE(std::equal(grp.sel.begin() + std::size_t(h) * c,
                             grp.sel.begin() + std::size_t(h) * c + grp.cnt[h],
                             grp.sel.begin() + std::size_t(kh * g) * c));
      EXPECT_GE(grp.tok[h], 300);
      EXPECT_LT(grp.tok[h], 300 + 30);  // sizes are at most 30
    }
    int64_t uni_tok = 0;
    for (int32_t j : uni) uni_tok += s.size[std::size_t(kh) * c + j];
    EXPECT_GT(uni_tok, grp.tok[kh * g]);  // the heads' own lists differ: their union is larger
  }
  // One q head per kv head: the group key orders as the head's own density.
  ClusterStepParams p1;
  p1.q_heads = kv;
  p1.budget_tokens = 300;
  HostOut a(kv, c, 0, d), b(kv, c, 0, d);
  ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p1, a.View()).ok());
  p1.group_select = true;
  ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p1, b.View()).ok());
  EXPECT_EQ(a.sel, b.sel);
  EXPECT_EQ(a.eo, b.eo);
  // Key offsets (residency-aware selection) lower the group keys by exactly their value: a large
  // one on each kv head's best cluster takes it out of the selection, into every head's estimate.
  {
    std::vector<float> offset(std::size_t(kv) * c, 0.f);
    std::vector<int32_t> best(kv);
    for (int kh = 0; kh < kv; ++kh) {
      const float* k = grp.gkey.data() + std::size_t(kh) * c;
      best[kh] = static_cast<int32_t>(std::max_element(k, k + c) - k);
      offset[std::size_t(kh) * c + best[kh]] = 100.f;
      offset[std::size_t(kh) * c + (best[kh] + 1) % c] = 0.25f;
    }
    ClusterStepParams po = p;
    po.key_offset = offset.data();
    HostOut off(qh, c, 0, d);
    ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), po, off.View()).ok());
    for (std::size_t i = 0; i < offset.size(); ++i) {
      if (grp.gkey[i] == kNegInf) continue;
      EXPECT_EQ(off.gkey[i], grp.gkey[i] - offset[i]) << i;
    }
    for (int kh = 0; kh < kv; ++kh) {
      const int h = kh * g;
      const auto first = off.sel.begin() + std::size_t(h) * c;
      EXPECT_EQ(std::count(first, first + off.cnt[h], best[kh]), 0) << "kv head " << kh;
      EXPECT_GE(off.tok[h], 300);  // the budget filled by others
      EXPECT_NE(off.lse[h], grp.lse[h]);
    }
  }
  // group_select with a group needs the key output.
  ClusterStepOutputs no_key = grp.View();
  no_key.group_key = nullptr;
  EXPECT_FALSE(ClusterStepHost(s.View(), q.data(), p, no_key).ok());
  EXPECT_FALSE(ClusterStep(s.View(), q.data(), p, no_key, nullptr, nullptr).ok());
}
#endif

// The batch form refuses what one launch cannot take, naming the member, before any launch (so
// with or without CUDA).
TEST(ClusterStepBatch, RefusesMembersOfAnotherShape) {
  const HostSummary a = MakeSummary(2, 128, 50, 0, 1, false);
  const HostSummary b = MakeSummary(1, 128, 50, 0, 2, false);
  const auto q = RandQ(8, 128, 3, 0.6f);
  HostOut oa(8, 50, 0, 128), ob(8, 50, 0, 128);
  std::vector<float> ws(1 << 16);
  ClusterStepParams p;
  p.q_heads = 8;
  ClusterStepItem items[2];
  items[0].summary = a.View();
  items[1].summary = b.View();
  items[0].out = oa.View();
  items[1].out = ob.View();
  for (ClusterStepItem& it : items) {
    it.q = q.data();
    it.budget_tokens = 100;
    it.workspace = ws.data();
  }
  const absl::Status mixed = ClusterStepBatch(items, 2, p, nullptr);
  EXPECT_EQ(mixed.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(mixed.message().find("member 1"), std::string::npos) << mixed.message();
  EXPECT_EQ(ClusterStepBatch(items, -1, p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  items[1].q = nullptr;
  items[1].summary = a.View();
  EXPECT_EQ(ClusterStepBatch(items, 2, p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  int event = 0;
  p.scored_event = &event;
  EXPECT_EQ(ClusterStepBatch(items, 1, p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  // The host reference takes each member's own budget.
  p.scored_event = nullptr;
  items[1].q = q.data();
  items[1].budget_tokens = 0;
  ASSERT_TRUE(ClusterStepBatchHost(items, 2, p).ok());
  std::vector<int32_t> cnt_a(oa.cnt), cnt_b(ob.cnt);
  EXPECT_GT(cnt_a[0], 0);
  EXPECT_EQ(cnt_b[0], 0);
}

TEST(ClusterStepHost, EdgeCases) {
  const int kv = 1, d = 64, c = 10, qh = 2;
  HostSummary s = MakeSummary(kv, d, c, 0, 3, false);
  const auto q = RandQ(qh, d, 4, 1.f);
  ClusterStepParams p;
  p.q_heads = qh;
  HostOut out(qh, c, 0, d);
  p.budget_tokens = 0;  // nothing selected: the estimate covers everything
  ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p, out.View()).ok());
  EXPECT_EQ(out.cnt[0], 0);
  EXPECT_TRUE(std::isfinite(out.lse[0]));
  p.budget_tokens = 1 << 30;  // everything selected: no estimate
  ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p, out.View()).ok());
  EXPECT_EQ(out.cnt[0], c);
  EXPECT_EQ(out.lse[0], kNegInf);
  p.q_heads = 3;  // not a multiple of kv_heads = 1? it is; use kv 2
  s.kv = 2;
  EXPECT_FALSE(ClusterStepHost(s.View(), q.data(), p, out.View()).ok());
  EXPECT_FALSE(ClusterStep(s.View(), q.data(), p, out.View(), nullptr, nullptr).ok());
}

#if KVRT_WITH_CUDA
struct DevCase {
  ClusterSummaryView view;
  ClusterStepOutputs out;
  float* q = nullptr;
  std::vector<void*> allocs;
  DevCase(const HostSummary& s, const std::vector<float>& qv, int qh) {
    view = s.View();
    auto* cen = ToDevice(s.cen);
    auto* vm = ToDevice(s.vm);
    auto* sz = ToDevice(s.size);
    auto* sp = ToDevice(s.spread);
    auto* ok = ToDevice(s.ok);
    view.centroid = cen;
    view.value_mean = vm;
    view.size = sz;
    view.spread = sp;
    view.outlier_key = ok;
    q = ToDevice(qv);
    const std::size_t c = std::max(s.c, 1), o = std::max(s.o, 1);
    out.density = ToDevice(std::vector<float>(qh * c));
    out.outlier_score = ToDevice(std::vector<float>(qh * o));
    out.selected = ToDevice(std::vector<int32_t>(qh * c));
    out.selected_count = ToDevice(std::vector<int32_t>(qh));
    out.selected_tokens = ToDevice(std::vector<int64_t>(qh));
    out.est_o = ToDevice(std::vector<float>(std::size_t(qh) * s.d));
    out.est_lse = ToDevice(std::vector<float>(qh));
    out.group_key = ToDevice(std::vector<float>(std::size_t(s.kv) * c));
    // Stale bytes: every word of it must be written.
    out.group_mask = ToDevice(std::vector<uint32_t>(std::size_t(s.kv) * c, 0xdeadbeefu));
    allocs = {out.group_key,
              out.group_mask,
              cen,
              vm,
              sz,
              sp,
              ok,
              q,
              out.density,
              out.outlier_score,
              out.selected,
              out.selected_count,
              out.selected_tokens,
              out.est_o,
              out.est_lse};
  }
  ~DevCase() {
    for (void* p : allocs) cudaFree(p);
  }
};

// A cluster step's shape and selection for the kernel tests.
struct Shape {
  int kv, g, d, c, o;
  int64_t budget;
  float top_p;
  bool padding;
  int dup = 0;         // every dup-th cluster a copy of cluster 0 (exact ties), 0: none
  float q_sd = 0.6f;   // 0: every density equal (a degenerate range)
  bool group = false;  // group selection
  float offset = 0.f;  // > 0: key offsets uniform in [0, offset) (residency-aware selection)
};

// The device's outputs (dc) for shape sh against the host reference's (ref): densities, outlier
// scores and group keys to rounding, the selection exactly by the kernel's own densities (top_p 0)
// and up to clusters within rounding of the threshold by the reference's, the estimate where the
// selections agree; the group mask the lists marked.
void CheckAgainstReference(const Shape& sh, const HostSummary& s, const HostOut& ref,
                           const DevCase& dc) {
  const int qh = sh.kv * sh.g;
  const bool grp = sh.group && sh.g > 1 && sh.c > 0;
  const auto dens = ToHost(dc.out.density, std::size_t(qh) * sh.c);
  const auto osc = ToHost(dc.out.outlier_score, std::size_t(qh) * sh.o);
  const auto sel = ToHost(dc.out.selected, std::size_t(qh) * sh.c);
  const auto cnt = ToHost(dc.out.selected_count, qh);
  const auto tok = ToHost(dc.out.selected_tokens, qh);
  const auto eo = ToHost(dc.out.est_o, std::size_t(qh) * sh.d);
  const auto lse = ToHost(dc.out.est_lse, qh);
  const auto gkey = ToHost(dc.out.group_key, std::size_t(sh.kv) * sh.c);
  if (grp) {
    // The group's mask is the kernel's own lists marked (what the direct step attends).
    const auto gmask = ToHost(dc.out.group_mask, std::size_t(sh.kv) * sh.c);
    const auto want = MaskOfLists(sel, cnt, sh.kv, sh.g, sh.c);
    for (std::size_t i = 0; i < want.size(); ++i) ASSERT_EQ(gmask[i], want[i]) << i;
  }
  for (std::size_t i = 0; i < gkey.size() && grp; ++i) {
    if (ref.gkey[i] == kNegInf) {
      ASSERT_EQ(gkey[i], kNegInf) << i;
    } else {
      ASSERT_NEAR(gkey[i], ref.gkey[i], 1e-4 * (1 + std::fabs(ref.gkey[i]))) << i;
    }
  }
  // What the selection ranks by: the head's densities or its kv head's group keys.
  auto key_of = [&](const std::vector<float>& dv, const std::vector<float>& kv_key, int h) {
    return grp ? kv_key.data() + std::size_t(h / sh.g) * sh.c : dv.data() + std::size_t(h) * sh.c;
  };
  for (std::size_t i = 0; i < dens.size(); ++i) {
    if (ref.dens[i] == kNegInf) {
      ASSERT_EQ(dens[i], kNegInf) << i;
    } else {
      ASSERT_NEAR(dens[i], ref.dens[i], 1e-4 * (1 + std::fabs(ref.dens[i]))) << i;
    }
  }
  for (std::size_t i = 0; i < osc.size(); ++i) ASSERT_NEAR(osc[i], ref.osc[i], 1e-3) << i;
  for (int h = 0; h < qh && sh.top_p == 0.f; ++h) {
    // The kernel's own densities select exactly: descending density, ties in index order,
    // while the tokens before a cluster are below the budget (no rounding to allow for).
    std::vector<int32_t> order;
    for (int j = 0; j < sh.c; ++j)
      if (s.size[std::size_t(h / sh.g) * sh.c + j] > 0) order.push_back(j);
    const float* dh = key_of(dens, gkey, h);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t x, int32_t y) { return dh[x] > dh[y]; });
    std::set<int32_t> want;
    int64_t before = 0;
    for (int32_t j : order) {
      if (before >= sh.budget) break;
      want.insert(j);
      before += s.size[std::size_t(h / sh.g) * sh.c + j];
    }
    const std::set<int32_t> got(sel.begin() + std::size_t(h) * sh.c,
                                sel.begin() + std::size_t(h) * sh.c + cnt[h]);
    ASSERT_EQ(got, want) << "head " << h;
    ASSERT_EQ(tok[h], before) << "head " << h;
  }
  for (int h = 0; h < qh; ++h) {
    // Selections agree up to clusters whose densities are within rounding of the threshold.
    std::set<int32_t> a(sel.begin() + std::size_t(h) * sh.c,
                        sel.begin() + std::size_t(h) * sh.c + cnt[h]);
    std::set<int32_t> b(ref.sel.begin() + std::size_t(h) * sh.c,
                        ref.sel.begin() + std::size_t(h) * sh.c + ref.cnt[h]);
    ASSERT_EQ(a.size(), static_cast<std::size_t>(cnt[h]));  // no duplicates
    const float* rk = key_of(ref.dens, ref.gkey, h);
    float thr = std::numeric_limits<float>::infinity();
    for (int32_t j : b) thr = std::min(thr, rk[j]);
    int diff = 0;
    for (int32_t j : a) {
      if (!b.count(j)) {
        ++diff;
        EXPECT_NEAR(rk[j], thr, 1e-3) << "head " << h;
      }
    }
    for (int32_t j : b) {
      if (!a.count(j)) {
        ++diff;
        EXPECT_NEAR(rk[j], thr, 1e-3) << "head " << h;
      }
    }
    if (diff > 0) continue;
    EXPECT_EQ(tok[h], ref.tok[h]) << h;
    if (ref.lse[h] == kNegInf) {
      EXPECT_EQ(lse[h], kNegInf) << h;
      continue;
    }
    ASSERT_NEAR(lse[h], ref.lse[h], 2e-3 * (1 + std::fabs(ref.lse[h]))) << h;
    for (int t = 0; t < sh.d; ++t) {
      ASSERT_NEAR(eo[std::size_t(h) * sh.d + t], ref.eo[std::size_t(h) * sh.d + t], 3e-3)
          << "head " << h << " dim " << t;
    }
  }
}

TEST(ClusterStepKernel, MatchesHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  const std::vector<Shape> shapes = {
      {1, 1, 64, 1, 0, 5, 0.f, false},
      {2, 4, 128, 300, 17, 400, 0.f, true},
      {8, 4, 128, 2048, 64, 640, 0.f, false},
      {2, 6, 256, 777, 5, 300, 0.5f, true},
      {1, 16, 128, 1500, 0, 1000, 0.9f, false},
      {3, 2, 64, 100, 3, 1 << 20, 0.f, false},
      {2, 8, 128, 500, 9, 0, 0.f, false},
      {2, 4, 128, 0, 20, 100, 0.f, false},
      // More clusters than a 256K-token kv head (the selection's chunks, many radix bins).
      {1, 4, 128, 20000, 8, 3000, 0.f, true},
      // Ties: half the clusters share one density (more than the threshold bin resolves in
      // shared memory: the radix fallback), then one in 40 (resolved there), then all of them.
      {1, 4, 128, 20000, 0, 155000, 0.f, false, 2},
      {1, 4, 128, 20000, 0, 155000, 0.6f, false, 2},
      {2, 4, 128, 8000, 0, 2000, 0.f, false, 40},
      {2, 4, 128, 8000, 0, 60000, 0.3f, false, 40},
      {2, 4, 64, 3000, 4, 9000, 0.f, false, 0, 0.f},
      // Group selection: one list per kv head by the group keys.
      {2, 4, 128, 300, 17, 400, 0.f, true, 0, 0.6f, true},
      {8, 4, 128, 8192, 64, 2621, 0.f, false, 0, 0.6f, true},
      {2, 6, 256, 777, 5, 300, 0.5f, true, 0, 0.6f, true},
      {1, 16, 128, 1500, 0, 1000, 0.9f, false, 0, 0.6f, true},
      {2, 4, 128, 8000, 0, 60000, 0.3f, false, 40, 0.6f, true},
      {2, 4, 64, 3000, 4, 9000, 0.f, false, 0, 0.f, true},
      {2, 1, 128, 500, 0, 800, 0.f, false, 0, 0.6f, true},
      // Group selection with key offsets (ClusterStepParams::key_offset).
      {8, 4, 128, 8192, 64, 2621, 0.f, false, 0, 0.6f, true, 1.f},
      {2, 6, 256, 777, 5, 300, 0.5f, true, 0, 0.6f, true, 3.f},
      // Group selection's threshold kernels: a 1M-token kv head (32 chunks), by budget and by
      // top_p; more ties in the threshold bin than they resolve (the select kernel searches);
      // a budget past every token (all selected), at the kernels' smallest cluster count and
      // below it (the select kernel's own search).
      {1, 4, 128, 65536, 0, 20000, 0.f, false, 0, 0.6f, true},
      {2, 4, 128, 20000, 0, 1 << 30, 0.5f, false, 0, 0.6f, true},
      {1, 4, 128, 20000, 0, 155000, 0.f, false, 2, 0.6f, true},
      {1, 4, 128, detail::kThresholdMinClusters, 17, 1 << 30, 0.f, true, 0, 0.6f, true},
      {2, 4, 128, 300, 17, 1 << 30, 0.f, true, 0, 0.6f, true},
  };
  // The group threshold's outcomes over the shapes: each must occur (the kernels ran and decided).
  std::set<int> modes_seen;
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message()
                 << "kv " << sh.kv << " g " << sh.g << " d " << sh.d << " C " << sh.c << " O "
                 << sh.o << " budget " << sh.budget << " top_p " << sh.top_p << " dup " << sh.dup
                 << " q_sd " << sh.q_sd << " group " << sh.group << " offset " << sh.offset);
    const int qh = sh.kv * sh.g;
    HostSummary s = MakeSummary(sh.kv, sh.d, sh.c, sh.o, 10 + sh.c, sh.padding);
    for (int h = 0; h < sh.kv && sh.dup > 0; ++h) {
      const std::size_t c0 = std::size_t(h) * sh.c;
      for (int j = sh.dup; j < sh.c; j += sh.dup) {
        std::copy_n(s.cen.begin() + c0 * sh.d, sh.d, s.cen.begin() + (c0 + j) * sh.d);
        s.spread[c0 + j] = s.spread[c0];
      }
    }
    const auto q = RandQ(qh, sh.d, 20 + sh.c, sh.q_sd);
    ClusterStepParams p;
    p.q_heads = qh;
    p.budget_tokens = sh.budget;
    p.top_p = sh.top_p;
    p.group_select = sh.group;
    const bool grp = sh.group && sh.g > 1 && sh.c > 0;
    std::vector<float> offset;
    float* offset_dev = nullptr;
    if (sh.offset > 0.f) {
      std::mt19937 rng(30 + sh.c);
      std::uniform_real_distribution<float> u(0.f, sh.offset);
      offset.resize(std::size_t(sh.kv) * sh.c);
      for (float& x : offset) x = u(rng);
      ASSERT_EQ(cudaMalloc(&offset_dev, offset.size() * sizeof(float)), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(offset_dev, offset.data(), offset.size() * sizeof(float),
                           cudaMemcpyHostToDevice),
                cudaSuccess);
    }
    struct FreeOffset {
      float* p;
      ~FreeOffset() { cudaFree(p); }
    } free_offset{offset_dev};
    p.key_offset = offset.empty() ? nullptr : offset.data();
    HostOut ref(qh, sh.c, sh.o, sh.d);
    ASSERT_TRUE(ClusterStepHost(s.View(), q.data(), p, ref.View()).ok());
    p.key_offset = offset_dev;
    DevCase dc(s, q, qh);
    // Group selection on a workspace of stale bytes (nothing in it may be taken for this step's
    // state; its threshold section is read back below); the other shapes on none (ClusterStep
    // allocates its own on the stream).
    const std::size_t ws_bytes =
        std::max<std::size_t>(ClusterStepWorkspaceFloats(dc.view, qh), 1) * sizeof(float);
    float* ws = nullptr;
    if (grp) {
      ASSERT_EQ(cudaMalloc(&ws, ws_bytes), cudaSuccess);
      ASSERT_EQ(cudaMemset(ws, 0x5a, ws_bytes), cudaSuccess);
    }
    struct FreeWs {
      float* p;
      ~FreeWs() { cudaFree(p); }
    } free_ws{ws};
    ASSERT_TRUE(ClusterStep(dc.view, dc.q, p, dc.out, ws, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    // The threshold kernels run from kThresholdMinClusters clusters (below, the select kernel
    // searches itself and the section keeps its stale bytes).
    if (grp && sh.budget > 0 && sh.c >= detail::kThresholdMinClusters) {
      std::vector<detail::ThresholdRow> rows(sh.kv);
      ASSERT_EQ(cudaMemcpy(rows.data(), ws + detail::ClusterThresholdAt(dc.view, qh),
                           rows.size() * sizeof(rows[0]), cudaMemcpyDeviceToHost),
                cudaSuccess);
      for (const auto& r : rows) {
        EXPECT_TRUE(r.mode == detail::kThresholdFound || r.mode == detail::kThresholdAll ||
                    r.mode == detail::kThresholdSearch)
            << r.mode;
        modes_seen.insert(r.mode);
      }
    }
    CheckAgainstReference(sh, s, ref, dc);
  }
  EXPECT_TRUE(modes_seen.count(detail::kThresholdFound));
  EXPECT_TRUE(modes_seen.count(detail::kThresholdAll));
  EXPECT_TRUE(modes_seen.count(detail::kThresholdSearch));
}

// A batch step's selections in one launch per kernel: every member's outputs against the host
// reference, as MatchesHostReference checks one member's. Members of one batch share kv heads,
// head_dim and the selection mode; their clusters run from none to past the threshold kernels'
// count, with and without outliers, budgets from none to every token, key offsets on one.
TEST(ClusterStepKernel, BatchMatchesHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  struct Batch {
    std::vector<Shape> members;
  };
  std::vector<Batch> batches;
  for (bool group : {false, true}) {
    for (float top_p : {0.f, 0.5f}) {
      batches.push_back({{
          {2, 4, 128, 300, 17, 400, top_p, true, 0, 0.6f, group},
          {2, 4, 128, 8000, 0, 2000, top_p, false, 0, 0.6f, group, 1.f},
          {2, 4, 128, 20000, 8, 3000, top_p, true, 0, 0.6f, group},
          {2, 4, 128, 0, 20, 100, top_p, false, 0, 0.6f, group},
          {2, 4, 128, detail::kThresholdMinClusters, 0, 1 << 30, top_p, false, 0, 0.6f, group},
          {2, 4, 128, 777, 5, 0, top_p, true, 0, 0.6f, group},
      }});
    }
  }
  // More members than one launch takes (detail::kClusterBatchMax): the batch goes in two.
  Batch many;
  for (int i = 0; i < detail::kClusterBatchMax + 5; ++i)
    many.members.push_back(
        {2, 8, 128, 200 + 37 * i, i % 3, 150 + 11 * i, 0.f, i % 2 == 0, 0, 0.6f, true});
  batches.push_back(many);
  int seed = 0;
  for (const Batch& b : batches) {
    const Shape& s0 = b.members.front();
    SCOPED_TRACE(::testing::Message() << "members " << b.members.size() << " group " << s0.group
                                      << " top_p " << s0.top_p);
    const int qh = s0.kv * s0.g;
    ClusterStepParams p;
    p.q_heads = qh;
    p.top_p = s0.top_p;
    p.group_select = s0.group;
    std::vector<HostSummary> sums;
    std::vector<HostOut> refs;
    std::vector<std::unique_ptr<DevCase>> devs;
    std::vector<std::vector<float>> offsets;
    std::vector<void*> dev_allocs;
    std::vector<ClusterStepItem> items;
    sums.reserve(b.members.size());
    refs.reserve(b.members.size());
    for (const Shape& sh : b.members) {
      ++seed;
      sums.push_back(MakeSummary(sh.kv, sh.d, sh.c, sh.o, 100 + seed, sh.padding));
      const auto q = RandQ(qh, sh.d, 200 + seed, sh.q_sd);
      std::vector<float> offset;
      if (sh.offset > 0.f) {
        std::mt19937 rng(300 + seed);
        std::uniform_real_distribution<float> u(0.f, sh.offset);
        offset.resize(std::size_t(sh.kv) * sh.c);
        for (float& x : offset) x = u(rng);
      }
      offsets.push_back(offset);
      ClusterStepParams pr = p;
      pr.budget_tokens = sh.budget;
      pr.key_offset = offset.empty() ? nullptr : offsets.back().data();
      refs.emplace_back(qh, sh.c, sh.o, sh.d);
      ASSERT_TRUE(ClusterStepHost(sums.back().View(), q.data(), pr, refs.back().View()).ok());
      devs.push_back(std::make_unique<DevCase>(sums.back(), q, qh));
      ClusterStepItem it;
      it.summary = devs.back()->view;
      it.q = devs.back()->q;
      it.budget_tokens = sh.budget;
      it.out = devs.back()->out;
      if (!offset.empty()) {
        float* od = ToDevice(offset);
        dev_allocs.push_back(od);
        it.key_offset = od;
      }
      // Stale bytes in the workspace: nothing in it may be taken for this step's state.
      const std::size_t ws_bytes =
          std::max<std::size_t>(ClusterStepWorkspaceFloats(it.summary, qh), 1) * sizeof(float);
      ASSERT_EQ(cudaMalloc(&it.workspace, ws_bytes), cudaSuccess);
      ASSERT_EQ(cudaMemset(it.workspace, 0x5a, ws_bytes), cudaSuccess);
      dev_allocs.push_back(it.workspace);
      items.push_back(it);
    }
    struct FreeAll {
      std::vector<void*>& p;
      ~FreeAll() {
        for (void* x : p) cudaFree(x);
      }
    } free_all{dev_allocs};
    ASSERT_TRUE(ClusterStepBatch(items.data(), static_cast<int>(items.size()), p, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (std::size_t i = 0; i < b.members.size(); ++i) {
      SCOPED_TRACE(::testing::Message() << "member " << i << " C " << b.members[i].c);
      CheckAgainstReference(b.members[i], sums[i], refs[i], *devs[i]);
    }
  }
}

// 128K context of an 8B model: 8K clusters of 16 per kv head, 8 kv heads, 32 q heads, d = 128,
// 512 outliers per kv head, budget 2% of 128K tokens.
TEST(ClusterStepKernel, Timing128K) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  const int kv = 8, g = 4, d = 128, c = 8192, o = 512, qh = kv * g;
  const HostSummary s = MakeSummary(kv, d, c, o, 5, false);
  const auto q = RandQ(qh, d, 6, 0.6f);
  DevCase dc(s, q, qh);
  ClusterStepParams p;
  p.q_heads = qh;
  p.budget_tokens = 2621;
  float* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, ClusterStepWorkspaceFloats(dc.view, qh) * sizeof(float)), cudaSuccess);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  // Per step, with budget: the score and the select kernels; at budget 0 the select kernel returns
  // after merging the score's states, so the difference is the selection's own time.
  auto time_us = [&](const ClusterStepParams& params) {
    for (int i = 0; i < 10; ++i)
      EXPECT_TRUE(ClusterStep(dc.view, dc.q, params, dc.out, ws, nullptr).ok());
    const int iters = 200;
    cudaEventRecord(e0);
    for (int i = 0; i < iters; ++i) (void)ClusterStep(dc.view, dc.q, params, dc.out, ws, nullptr);
    cudaEventRecord(e1);
    EXPECT_EQ(cudaEventSynchronize(e1), cudaSuccess);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    return 1e3 * ms / iters;
  };
  const double us = time_us(p);
  ClusterStepParams none = p;
  none.budget_tokens = 0;
  const double score_us = time_us(none);
  ClusterStepParams group = p;
  group.group_select = true;
  const double group_us = time_us(group);
  const double bytes = 2.0 * kv * c * d * 2 + double(kv) * o * d * 2;
  std::printf(
      "[cluster step 128K] %.2f us per step (summary %.1f MB: %.0f GB/s effective); "
      "%.2f us at budget 0 (the selection: %.2f us); group selection %.2f us per step\n",
      us, bytes / 1e6, bytes / (1e-6 * us) / 1e9, score_us, us - score_us, group_us);
  cudaFree(ws);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}
#endif

}  // namespace
}  // namespace kvrt::gpu
