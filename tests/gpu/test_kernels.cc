// GPU-tier kernels against their host references (GPU tests skip cleanly without a device), and
// the host references against double-precision naive computations (run everywhere, CI included).
// KVRT_GPU_TEST_SMALL=1 shrinks the sweeps (for compute-sanitizer runs).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvrt_common/dtype.h"
#include "kvrt_gpu/kernels.h"
#include "kvrt_gpu/tier_attention.h"
#include "tests/gpu/close.h"
#include "tests/gpu/random_storage.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvrt::gpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Named tolerances. Kernel and reference read the same stored inputs and both accumulate in f32;
// they differ in summation order and exp2f vs expf, so agreement is ~1e-6 relative.
constexpr double kRefVsDoubleTol = 2e-5;  // host reference vs double naive, |o| ~ 1
constexpr double kKernelOTol = 2e-4;      // kernel o vs host reference (abs + rel)
constexpr double kKernelLseTol = 2e-4;    // kernel lse vs host reference (abs + rel)
constexpr double kBf16OutTol = 8e-3;      // merge written to bf16 (one rounding of 2^-8)
constexpr double kTopKScoreTol = 1e-3;    // scores of |q.k| ~ 10 in f32, different order

[[maybe_unused]] bool Small() {
  const char* s = std::getenv("KVRT_GPU_TEST_SMALL");
  return s != nullptr && s[0] == '1';
}

std::vector<float> ToF32(const std::vector<unsigned char>& s, DType t) {
  std::vector<float> f(s.size() / DTypeSize(t));
  ConvertToF32(s.data(), t, f.size(), f.data());
  return f;
}

// Double-precision partial state over rows given as f32 vectors.
void NaiveState(const std::vector<float>& q, const std::vector<const float*>& ks,
                const std::vector<const float*>& vs, double scale, std::vector<double>* o,
                double* lse) {
  const int d = static_cast<int>(q.size());
  o->assign(d, 0.0);
  if (ks.empty()) {
    *lse = -INFINITY;
    return;
  }
  std::vector<double> s(ks.size());
  double m = -INFINITY;
  for (std::size_t j = 0; j < ks.size(); ++j) {
    double a = 0;
    for (int i = 0; i < d; ++i) a += double(q[i]) * ks[j][i];
    s[j] = a * scale;
    m = std::max(m, s[j]);
  }
  double l = 0;
  for (auto& x : s) l += (x = std::exp(x - m));
  for (std::size_t j = 0; j < ks.size(); ++j) {
    for (int i = 0; i < d; ++i) (*o)[i] += s[j] / l * vs[j][i];
  }
  *lse = m + std::log(l);
}

// A host-side batch of tiers with random contents.
struct HostTiers {
  int kv_heads, d, cap;
  DType t;
  std::vector<std::vector<unsigned char>> sk, sv, wk, wv;
  std::vector<const void*> psk, psv, pwk, pwv;
  std::vector<int32_t> ns, nw;
  TierBatch View() const {
    TierBatch b;
    b.sink_k = psk.data();
    b.sink_v = psv.data();
    b.window_k = pwk.data();
    b.window_v = pwv.data();
    b.n_sink = ns.data();
    b.n_window = nw.data();
    b.batch = static_cast<int>(ns.size());
    b.kv_heads = kv_heads;
    b.head_dim = d;
    b.dtype = t;
    for (std::size_t i = 0; i < ns.size(); ++i)
      b.max_tokens = std::max(b.max_tokens, ns[i] + nw[i]);
    return b;
  }
};

HostTiers MakeTiers(std::mt19937& rng, const std::vector<std::pair<int, int>>& sizes, int cap,
                    int kv_heads, int d, DType t) {
  HostTiers h{kv_heads, d, cap, t, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const std::size_t row = static_cast<std::size_t>(kv_heads) * d;
  for (auto [s, w] : sizes) {
    h.sk.push_back(RandomStorage(rng, std::max(s, 1) * row, t, 1.f));
    h.sv.push_back(RandomStorage(rng, std::max(s, 1) * row, t, 1.f));
    h.wk.push_back(RandomStorage(rng, std::max(cap, 1) * row, t, 1.f));
    h.wv.push_back(RandomStorage(rng, std::max(cap, 1) * row, t, 1.f));
    h.ns.push_back(s);
    h.nw.push_back(w);
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    h.psk.push_back(h.sk[i].data());
    h.psv.push_back(h.sv[i].data());
    h.pwk.push_back(h.wk[i].data());
    h.pwv.push_back(h.wv[i].data());
  }
  return h;
}

// ----------------------------------------------------------------------------------------------
// Host references (every machine).

TEST(GpuRef, TierAttention_MatchesDoubleNaive) {
  std::mt19937 rng(1);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    const int kvh = 2, group = 4, d = 64, qh = kvh * group, cap = 40;
    auto tiers = MakeTiers(rng, {{4, 40}, {0, 7}, {3, 0}, {0, 0}}, cap, kvh, d, t);
    const TierBatch tb = tiers.View();
    std::vector<float> q(static_cast<std::size_t>(tb.batch) * qh * d);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& x : q) x = nd(rng);
    AttnParams p;
    p.q_heads = qh;
    std::vector<float> o(q.size()), lse(static_cast<std::size_t>(tb.batch) * qh);
    TierAttentionBatchHost(tb, q.data(), p, o.data(), lse.data());
    for (int b = 0; b < tb.batch; ++b) {
      auto sk = ToF32(tiers.sk[b], t), sv = ToF32(tiers.sv[b], t);
      auto wk = ToF32(tiers.wk[b], t), wv = ToF32(tiers.wv[b], t);
      for (int h = 0; h < qh; ++h) {
        const int g = h / group;
        std::vector<const float*> ks, vs;
        for (int j = 0; j < tiers.ns[b]; ++j) {
          ks.push_back(&sk[(j * kvh + g) * d]);
          vs.push_back(&sv[(j * kvh + g) * d]);
        }
        for (int j = 0; j < tiers.nw[b]; ++j) {
          ks.push_back(&wk[(j * kvh + g) * d]);
          vs.push_back(&wv[(j * kvh + g) * d]);
        }
        const std::size_t r = static_cast<std::size_t>(b) * qh + h;
        std::vector<float> qr(q.begin() + r * d, q.begin() + (r + 1) * d);
        std::vector<double> on;
        double ln;
        NaiveState(qr, ks, vs, 1.0 / std::sqrt(double(d)), &on, &ln);
        if (ks.empty()) {
          EXPECT_EQ(lse[r], kNegInf);
        } else {
          EXPECT_NEAR(lse[r], ln, kRefVsDoubleTol * (1 + std::fabs(ln)));
        }
        for (int i = 0; i < d; ++i) {
          EXPECT_NEAR(o[r * d + i], on[i], kRefVsDoubleTol) << DTypeName(t) << " b" << b;
        }
      }
    }
  }
}

TEST(GpuRef, Merge_OfSplitsEqualsWhole) {
  std::mt19937 rng(2);
  const int kvh = 2, qh = 4, d = 64;
  auto tiers = MakeTiers(rng, {{5, 33}}, 33, kvh, d, DType::kF32);
  TierView whole{tiers.psk[0], tiers.psv[0], 5, tiers.pwk[0], tiers.pwv[0],
                 33,           kvh,          d, DType::kF32};
  TierView sinks = whole, win = whole;
  sinks.n_window = 0;
  win.n_sink = 0;
  std::vector<float> q(qh * d);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : q) x = nd(rng);
  const float scale = 0.125f;
  std::vector<float> ow(qh * d), lw(qh), os(qh * d), ls(qh), ov(qh * d), lv(qh), om(qh * d), lm(qh);
  TierAttentionHost(whole, q.data(), qh, scale, ow.data(), lw.data());
  TierAttentionHost(sinks, q.data(), qh, scale, os.data(), ls.data());
  TierAttentionHost(win, q.data(), qh, scale, ov.data(), lv.data());
  MergeStatesToHost(os.data(), ls.data(), ov.data(), lv.data(), qh, d, om.data(), DType::kF32,
                    lm.data());
  EXPECT_TRUE(Close(om.data(), ow.data(), om.size(), kRefVsDoubleTol, "o"));
  EXPECT_TRUE(Close(lm.data(), lw.data(), lm.size(), kRefVsDoubleTol, "lse"));
  // The in-place reference that already existed agrees.
  MergeStatesHost(os.data(), ls.data(), ov.data(), lv.data(), qh, d);
  EXPECT_TRUE(Close(os.data(), ow.data(), os.size(), kRefVsDoubleTol, "o in place"));
}

TEST(GpuRef, MergeN_EqualsPairwiseFoldAndSkipsEmpty) {
  std::mt19937 rng(13);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int n = 3, rows = 9, d = 64;
  std::vector<float> o(n * rows * d), l(n * rows);
  for (auto& x : o) x = nd(rng);
  for (auto& x : l) x = 2 * nd(rng);
  l[1 * rows + 2] = kNegInf;
  o[(1 * rows + 2) * d] =
      std::numeric_limits<float>::quiet_NaN();  // an empty state's o is not read
  std::vector<float> out(rows * d), lo(rows);
  MergeStatesNHost(o.data(), l.data(), n, rows, d, out.data(), DType::kF32, lo.data());
  for (int r = 0; r < rows; ++r) {
    std::vector<float> acc(o.begin() + r * d, o.begin() + (r + 1) * d);
    float la = l[r];
    for (int i = 1; i < n; ++i)
      MergeStatesHost(acc.data(), &la, o.data() + (i * rows + r) * d, &l[i * rows + r], 1, d);
    EXPECT_NEAR(lo[r], la, 1e-5f);
    for (int j = 0; j < d; ++j) EXPECT_NEAR(out[r * d + j], acc[j], 1e-5f) << "row " << r;
  }
}

TEST(GpuRef, TierArrays_PackAndViewRoundTrip) {
  int a, b, c, e;
  const TierArrays::Entry in[2] = {{&a, &b, &c, &e, 4, 17}, {nullptr, nullptr, &c, &a, 0, 3}};
  std::vector<unsigned char> buf(TierArrays::Bytes(2));
  TierArrays::Pack(in, 2, buf.data());
  TierBatch t;
  TierArrays::View(buf.data(), 2, &t);
  ASSERT_EQ(t.batch, 2);
  EXPECT_EQ(t.sink_k[0], &a);
  EXPECT_EQ(t.sink_v[0], &b);
  EXPECT_EQ(t.window_k[1], &c);
  EXPECT_EQ(t.window_v[1], &a);
  EXPECT_EQ(t.n_sink[0], 4);
  EXPECT_EQ(t.n_window[0], 17);
  EXPECT_EQ(t.n_sink[1], 0);
  EXPECT_EQ(t.n_window[1], 3);
}

TEST(GpuRef, Merge_TwoEmptyStatesGiveEmptyNotNaN) {
  const int d = 64;
  std::vector<float> a(d, 0.f), b(d, 0.f), out(d, 7.f);
  float la = kNegInf, lb = kNegInf, lo = 0.f;
  MergeStatesToHost(a.data(), &la, b.data(), &lb, 1, d, out.data(), DType::kF32, &lo);
  EXPECT_EQ(lo, kNegInf);
  for (float x : out) EXPECT_EQ(x, 0.f);
  // One empty side: the other passes through unchanged even if the empty side holds garbage.
  std::vector<float> g(d, std::numeric_limits<float>::infinity());
  for (int i = 0; i < d; ++i) b[i] = float(i);
  lb = 1.5f;
  MergeStatesToHost(g.data(), &la, b.data(), &lb, 1, d, out.data(), DType::kF32, &lo);
  EXPECT_FLOAT_EQ(lo, 1.5f);
  for (int i = 0; i < d; ++i) EXPECT_FLOAT_EQ(out[i], float(i));
}

TEST(GpuRef, Ring_AppendEvictAndGatherFollowTheStream) {
  const int cap = 5, kvh = 2, d = 64, steps = 4, n_new = 3;
  const std::size_t tok = static_cast<std::size_t>(kvh) * d;
  std::vector<uint16_t> ring_k(cap * tok), ring_v(cap * tok);
  std::vector<std::vector<uint16_t>> stream_k;  // every token appended, in order
  void* rk[1] = {ring_k.data()};
  void* rv[1] = {ring_v.data()};
  int64_t pos = 0;
  for (int s = 0; s < steps; ++s) {
    std::vector<uint16_t> nk(n_new * tok), nv(n_new * tok), ek(n_new * tok), ev(n_new * tok);
    for (int i = 0; i < n_new; ++i) {
      for (std::size_t e = 0; e < tok; ++e) {
        nk[i * tok + e] = static_cast<uint16_t>(pos + i + 1000 * (e + 1));
        nv[i * tok + e] = static_cast<uint16_t>(pos + i + 7 + 1000 * e);
      }
      stream_k.emplace_back(nk.begin() + i * tok, nk.begin() + (i + 1) * tok);
    }
    RingBatch r{rk, rv, &pos, 1, cap, kvh, d, DType::kBF16};
    RingAppendHost(r, nk.data(), nv.data(), n_new, ek.data(), ev.data());
    for (int i = 0; i < n_new; ++i) {
      const int64_t p = pos + i;
      if (p >= cap) {
        const auto& want = stream_k[p - cap];
        EXPECT_EQ(0, std::memcmp(want.data(), &ek[i * tok], tok * 2)) << "evicted " << p - cap;
      }
    }
    pos += n_new;
  }
  // The ring holds the last `cap` tokens; gather them oldest first.
  const int64_t start = pos - cap;
  std::vector<uint16_t> gk(cap * tok), gv(cap * tok);
  RingBatch r{rk, rv, nullptr, 1, cap, kvh, d, DType::kBF16};
  RingGatherHost(r, &start, cap, gk.data(), gv.data());
  for (int i = 0; i < cap; ++i) {
    EXPECT_EQ(0, std::memcmp(stream_k[start + i].data(), &gk[i * tok], tok * 2)) << i;
  }
}

// RingAppendRows (one ring, arguments by value) moves the same bytes as RingAppend's batch of one,
// and refuses what it cannot do before touching anything.
TEST(GpuRef, RingAppendRows_MatchesRingAppendAndChecks) {
  const int cap = 7, kvh = 2, d = 64;
  const std::size_t tok = static_cast<std::size_t>(kvh) * d * 2;
  std::mt19937 rng(21);
  std::vector<unsigned char> a_k = RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f), a_v = a_k;
  std::vector<unsigned char> b_k = a_k, b_v = a_v;
  void* rk[1] = {a_k.data()};
  void* rv[1] = {a_v.data()};
  int64_t pos = cap;  // full: every append evicts
  for (int n : {1, 3, 5, cap}) {
    auto nk = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
    auto nv = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
    std::vector<unsigned char> ek(nk.size()), ev(nk.size()), fk(nk.size()), fv(nk.size());
    RingBatch r{rk, rv, &pos, 1, cap, kvh, d, DType::kBF16};
    RingAppendHost(r, nk.data(), nv.data(), n, ek.data(), ev.data());
    RingRows rows{b_k.data(), b_v.data(), cap, pos % cap, tok};
    RingAppendRowsHost(rows, nk.data(), nv.data(), n, fk.data(), fv.data());
    EXPECT_EQ(a_k, b_k) << n;
    EXPECT_EQ(a_v, b_v) << n;
    EXPECT_EQ(ek, fk) << n;
    EXPECT_EQ(ev, fv) << n;
    pos += n;
  }
  RingRows rows{b_k.data(), b_v.data(), cap, 0, tok};
  unsigned char one[16] = {};
  EXPECT_EQ(RingAppendRows(rows, one, one, cap + 1, nullptr, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // more rows than slots
  EXPECT_EQ(RingAppendRows(rows, one, one, 1, one, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // one eviction buffer of two
  rows.slot0 = cap;
  EXPECT_EQ(RingAppendRows(rows, one, one, 1, nullptr, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  rows.slot0 = 0;
  rows.row_bytes = 24;
  EXPECT_EQ(RingAppendRows(rows, one, one, 1, nullptr, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// RingAppendRowsToHeads: the ring as RingAppendRows leaves it, each leaving row's kv head slices in
// that head's target rows; what it cannot do refused before anything changes.
TEST(GpuRef, RingAppendRowsToHeads_SplitsTheLeavingRowsByHead) {
  const int cap = 7, kvh = 3, d = 64;
  const std::size_t tok = static_cast<std::size_t>(kvh) * d * 2, hb = d * 2;
  std::mt19937 rng(23);
  std::vector<unsigned char> a_k = RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f), a_v = a_k;
  std::vector<unsigned char> b_k = a_k, b_v = a_v;
  int64_t slot = 5;
  for (int n : {1, 3, cap}) {
    auto nk = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
    auto nv = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
    std::vector<unsigned char> ek(nk.size()), ev(nk.size());
    RingAppendRowsHost(RingRows{a_k.data(), a_v.data(), cap, slot, tok}, nk.data(), nv.data(), n,
                       ek.data(), ev.data());
    std::vector<std::vector<unsigned char>> hk(kvh), hv(kvh);
    HeadRows to;
    to.heads = kvh;
    for (int g = 0; g < kvh; ++g) {
      hk[g].assign(n * hb, 0);
      hv[g].assign(n * hb, 0);
      to.k[g] = hk[g].data();
      to.v[g] = hv[g].data();
    }
    ASSERT_TRUE(RingAppendRowsToHeadsHost(RingRows{b_k.data(), b_v.data(), cap, slot, tok},
                                          nk.data(), nv.data(), n, to)
                    .ok());
    EXPECT_EQ(a_k, b_k) << n;
    EXPECT_EQ(a_v, b_v) << n;
    for (int i = 0; i < n; ++i)
      for (int g = 0; g < kvh; ++g) {
        EXPECT_EQ(0, std::memcmp(&hk[g][i * hb], &ek[i * tok + g * hb], hb)) << n << " " << i;
        EXPECT_EQ(0, std::memcmp(&hv[g][i * hb], &ev[i * tok + g * hb], hb)) << n << " " << i;
      }
    slot = (slot + n) % cap;
  }
  const std::vector<unsigned char> before = b_k;
  unsigned char one[16 * 64] = {};
  HeadRows to;
  to.heads = kvh;
  for (int g = 0; g < kvh; ++g) to.k[g] = to.v[g] = one;
  const RingRows rows{b_k.data(), b_v.data(), cap, 0, tok};
  to.v[1] = nullptr;
  EXPECT_EQ(RingAppendRowsToHeadsHost(rows, one, one, 1, to).code(),
            absl::StatusCode::kInvalidArgument);  // a head without a target
  to.v[1] = one;
  to.heads = 0;
  EXPECT_EQ(RingAppendRowsToHeadsHost(rows, one, one, 1, to).code(),
            absl::StatusCode::kInvalidArgument);
  to.heads = 5;  // 384 bytes a row are not 5 slices of whole 16-byte words
  EXPECT_EQ(RingAppendRowsToHeadsHost(rows, one, one, 1, to).code(),
            absl::StatusCode::kInvalidArgument);
  to.heads = kvh;
  EXPECT_EQ(RingAppendRowsToHeadsHost(rows, one, one, cap + 1, to).code(),
            absl::StatusCode::kInvalidArgument);  // more rows than slots
  EXPECT_EQ(RingAppendRowsToHeads(rows, one, one, cap + 1, to, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // the launcher checks the same
  EXPECT_EQ(b_k, before);
}

// RingAppendToStore: the ring as RingAppend leaves it; every leaving token in its store row
// (row_base + its ring position) of each kv head; write_pos and the store's row count advanced;
// a store too small refused before anything changes.
TEST(GpuRef, RingAppendToStore_EvictsIntoTheStoreAtItsRows) {
  const int batch = 2, cap = 5, kvh = 2, d = 64;
  const int64_t store_rows = 16;
  const std::size_t row = d * 2, tok = kvh * row;
  std::mt19937 rng(31);
  std::vector<std::vector<unsigned char>> ring_k, ring_v, ref_k, ref_v, store_k, store_v;
  std::vector<void*> rk, rv, fk, fv, sk, sv;
  for (int b = 0; b < batch; ++b) {
    ring_k.push_back(RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f));
    ring_v.push_back(RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f));
    ref_k.push_back(ring_k.back());
    ref_v.push_back(ring_v.back());
    for (int g = 0; g < kvh; ++g) {
      store_k.emplace_back(store_rows * row, 0);
      store_v.emplace_back(store_rows * row, 0);
    }
  }
  for (int b = 0; b < batch; ++b) {
    rk.push_back(ring_k[b].data());
    rv.push_back(ring_v[b].data());
    fk.push_back(ref_k[b].data());
    fv.push_back(ref_v[b].data());
  }
  for (auto& x : store_k) sk.push_back(x.data());
  for (auto& x : store_v) sv.push_back(x.data());
  const std::vector<int64_t> base = {3, 0};
  std::vector<int64_t> pos = {0, 4}, ref_pos = pos, rows(batch, -1);
  std::vector<std::vector<std::vector<unsigned char>>> seen_k(batch), seen_v(batch);  // by position
  for (int n : {3, 1, 5, 2}) {
    SCOPED_TRACE(::testing::Message() << n << " new");
    auto nk = RandomStorage(rng, batch * n * kvh * d, DType::kBF16, 1.f);
    auto nv = RandomStorage(rng, batch * n * kvh * d, DType::kBF16, 1.f);
    for (int b = 0; b < batch; ++b) {
      for (int i = 0; i < n; ++i) {
        const std::size_t at = (static_cast<std::size_t>(b) * n + i) * tok;
        seen_k[b].emplace_back(nk.begin() + at, nk.begin() + at + tok);
        seen_v[b].emplace_back(nv.begin() + at, nv.begin() + at + tok);
      }
    }
    RingBatch ref{fk.data(), fv.data(), ref_pos.data(), batch, cap, kvh, d, DType::kBF16};
    std::vector<unsigned char> ek(nk.size()), ev(nk.size());
    RingAppendHost(ref, nk.data(), nv.data(), n, ek.data(), ev.data());
    RingBatch r{rk.data(), rv.data(), nullptr, batch, cap, kvh, d, DType::kBF16};
    RingStoreTarget st{sk.data(), sv.data(), base.data(), store_rows};
    ASSERT_TRUE(
        RingAppendToStoreHost(r, nk.data(), nv.data(), n, st, pos.data(), rows.data()).ok());
    for (int b = 0; b < batch; ++b) {
      ref_pos[b] += n;
      EXPECT_EQ(pos[b], ref_pos[b]);
      EXPECT_EQ(rows[b], base[b] + std::max<int64_t>(0, pos[b] - cap));
      EXPECT_EQ(ring_k[b], ref_k[b]);
      EXPECT_EQ(ring_v[b], ref_v[b]);
      // Every ring position that has left, in its store row (sequence 1's positions 0-3 were in
      // its ring before the appends here: not followed).
      const int64_t pre = b == 1 ? 4 : 0;
      for (int64_t p = pre; p < pos[b] - cap; ++p) {
        for (int g = 0; g < kvh; ++g) {
          const unsigned char* at = store_k[b * kvh + g].data() + (base[b] + p) * row;
          EXPECT_EQ(0, std::memcmp(at, seen_k[b][p - pre].data() + g * row, row))
              << "b" << b << " position " << p << " head " << g;
          const unsigned char* av = store_v[b * kvh + g].data() + (base[b] + p) * row;
          EXPECT_EQ(0, std::memcmp(av, seen_v[b][p - pre].data() + g * row, row));
        }
      }
    }
  }
  // A store too small for the next eviction: refused, nothing changed.
  RingBatch r{rk.data(), rv.data(), nullptr, batch, cap, kvh, d, DType::kBF16};
  RingStoreTarget small{sk.data(), sv.data(), base.data(), base[0] + pos[0] - cap};
  const auto before = ring_k;
  const std::vector<int64_t> pos_before = pos;
  std::vector<unsigned char> one(batch * tok);
  const absl::Status refused =
      RingAppendToStoreHost(r, one.data(), one.data(), 1, small, pos.data(), rows.data());
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_NE(refused.message().find("sequence 0"), std::string::npos) << refused;
  EXPECT_EQ(pos, pos_before);
  EXPECT_EQ(ring_k, before);
  RingStoreTarget no_base{sk.data(), sv.data(), nullptr, store_rows};
  EXPECT_EQ(
      RingAppendToStoreHost(r, one.data(), one.data(), 1, no_base, pos.data(), nullptr).code(),
      absl::StatusCode::kInvalidArgument);
}

TEST(GpuRef, GatherAttend_MatchesDoubleNaive) {
  std::mt19937 rng(3);
  const int d = 128, rows = 50, nq = 6;
  auto k = RandomStorage(rng, rows * d, DType::kF16, 1.f),
       v = RandomStorage(rng, rows * d, DType::kF16, 1.f);
  auto kf = ToF32(k, DType::kF16), vf = ToF32(v, DType::kF16);
  std::vector<int32_t> off{0}, ids;
  std::uniform_int_distribution<int> pick(0, rows - 1);
  for (int r = 0; r < nq; ++r) {
    const int n = r == 2 ? 0 : 1 + 7 * r;  // one empty list
    for (int j = 0; j < n; ++j) ids.push_back(pick(rng));
    off.push_back(static_cast<int32_t>(ids.size()));
  }
  std::vector<float> q(nq * d);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : q) x = nd(rng);
  GatherBatch g{k.data(), v.data(), off.data(), ids.data(), nq, 36, d, DType::kF16};
  std::vector<float> o(nq * d), lse(nq);
  GatherAttendHost(g, q.data(), true, 0.f, o.data(), lse.data());
  for (int r = 0; r < nq; ++r) {
    std::vector<const float*> ks, vs;
    for (int j = off[r]; j < off[r + 1]; ++j) {
      ks.push_back(&kf[ids[j] * d]);
      vs.push_back(&vf[ids[j] * d]);
    }
    std::vector<double> on;
    double ln;
    NaiveState(std::vector<float>(q.begin() + r * d, q.begin() + (r + 1) * d), ks, vs,
               1.0 / std::sqrt(double(d)), &on, &ln);
    if (ks.empty()) {
      EXPECT_EQ(lse[r], kNegInf);
    } else {
      EXPECT_NEAR(lse[r], ln, kRefVsDoubleTol * (1 + std::fabs(ln)));
    }
    for (int i = 0; i < d; ++i) EXPECT_NEAR(o[r * d + i], on[i], kRefVsDoubleTol);
  }
}

TEST(GpuRef, TopK_SortedAndExact) {
  std::mt19937 rng(4);
  const int d = 64, nq = 5, nk = 300, topk = 17;
  auto k = RandomStorage(rng, nk * d, DType::kF32, 1.f);
  auto q = RandomStorage(rng, nq * d, DType::kF32, 1.f);
  TopKProblem pr;
  pr.q = q.data();
  pr.q_stride = d;
  pr.k = k.data();
  pr.k_stride = d;
  pr.nq = nq;
  pr.nk = nk;
  pr.head_dim = d;
  pr.scale = 0.5f;
  pr.topk = topk;
  std::vector<int32_t> ids(nq * topk);
  std::vector<float> sc(nq * topk);
  ExactTopKHost(pr, ids.data(), sc.data());
  auto qf = ToF32(q, DType::kF32), kf = ToF32(k, DType::kF32);
  for (int i = 0; i < nq; ++i) {
    std::vector<double> all(nk);
    for (int j = 0; j < nk; ++j) {
      double a = 0;
      for (int c = 0; c < d; ++c) a += double(qf[i * d + c]) * kf[j * d + c];
      all[j] = 0.5 * a;
    }
    std::vector<double> sorted = all;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    for (int c = 0; c < topk; ++c) {
      EXPECT_NEAR(sc[i * topk + c], sorted[c], 1e-4);
      EXPECT_NEAR(all[ids[i * topk + c]], sorted[c], 1e-4);
      if (c > 0) {
        EXPECT_GE(sc[i * topk + c - 1], sc[i * topk + c]);
      }
    }
  }
}

TEST(GpuRef, Launchers_RejectBadArgumentsOrReportNoCuda) {
  TierBatch t;
  t.kv_heads = 1;
  t.head_dim = 96;  // unsupported: must fail loudly, on every machine
  AttnParams p;
  p.q_heads = 1;
  auto s = TierAttention(t, nullptr, p, nullptr, nullptr, nullptr, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  t.head_dim = 128;
  p.q_heads = 3;  // not a multiple of kv_heads
  t.kv_heads = 2;
  EXPECT_EQ(TierAttention(t, nullptr, p, nullptr, nullptr, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergeStates(nullptr, nullptr, nullptr, nullptr, 1, 100, nullptr, DType::kF32, nullptr,
                        nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  TopKProblem pr;
  pr.head_dim = 64;
  pr.nk = 10;
  pr.topk = kMaxTopK + 1;
  EXPECT_EQ(ExactTopK(pr, nullptr, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
  if (!DeviceAvailable()) {
    // Valid arguments without a device: an error status, never a crash.
    MergeStates(nullptr, nullptr, nullptr, nullptr, 0, 64, nullptr, DType::kF32, nullptr, nullptr)
        .IgnoreError();
#if !KVRT_WITH_CUDA
    EXPECT_EQ(MergeStates(nullptr, nullptr, nullptr, nullptr, 1, 64, nullptr, DType::kF32, nullptr,
                          nullptr)
                  .code(),
              absl::StatusCode::kFailedPrecondition);
#endif
  }
}

// ----------------------------------------------------------------------------------------------
// Kernels vs references (skip without a GPU).

#if KVRT_WITH_CUDA
#define CUDA_OK(expr) ASSERT_EQ(cudaSuccess, (expr)) << #expr

// Device copy of a host vector, freed with the object.
struct Dev {
  void* p = nullptr;
  std::size_t bytes = 0;
  Dev() = default;
  explicit Dev(std::size_t n) : bytes(n) {
    if (cudaMalloc(&p, std::max<std::size_t>(n, 16)) != cudaSuccess) p = nullptr;
    // Poison: every output element must be written by the kernel.
    if (p != nullptr) cudaMemset(p, 0xff, std::max<std::size_t>(n, 16));
  }
  template <class V>
  static Dev From(const V& v) {
    Dev d(v.size() * sizeof(v[0]));
    cudaMemcpy(d.p, v.data(), d.bytes, cudaMemcpyHostToDevice);
    return d;
  }
  template <class T>
  std::vector<T> Get(std::size_t n) const {
    std::vector<T> v(n);
    cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  ~Dev() {
    if (p != nullptr) cudaFree(p);
  }
  Dev(Dev&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Dev(const Dev&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

class GpuKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

struct TierCase {
  DType t;
  int d, kvh, group, cap;
  std::vector<std::pair<int, int>> sizes;  // (n_sink, n_window) per sequence
  int split;
  bool q_f32;
};

void RunTierCase(const TierCase& c, std::mt19937& rng) {
  SCOPED_TRACE(std::string(DTypeName(c.t)) + " d=" + std::to_string(c.d) +
               " group=" + std::to_string(c.group) + " split=" + std::to_string(c.split) +
               (c.q_f32 ? " q=f32" : " q=storage"));
  auto h = MakeTiers(rng, c.sizes, c.cap, c.kvh, c.d, c.t);
  TierBatch hb = h.View();
  const int qh = c.kvh * c.group;
  const std::size_t rows = static_cast<std::size_t>(hb.batch) * qh;
  auto q = RandomStorage(rng, rows * c.d, c.q_f32 ? DType::kF32 : c.t, 1.5f);
  AttnParams p;
  p.q_heads = qh;
  p.q_is_f32 = c.q_f32;
  p.split_tokens = c.split;
  std::vector<float> ro(rows * c.d), rl(rows);
  TierAttentionBatchHost(hb, q.data(), p, ro.data(), rl.data());

  std::vector<Dev> bufs;
  std::vector<const void*> dsk, dsv, dwk, dwv;
  for (int b = 0; b < hb.batch; ++b) {
    for (auto* src : {&h.sk[b], &h.sv[b], &h.wk[b], &h.wv[b]}) bufs.push_back(Dev::From(*src));
    dsk.push_back(bufs[bufs.size() - 4].p);
    dsv.push_back(bufs[bufs.size() - 3].p);
    dwk.push_back(bufs[bufs.size() - 2].p);
    dwv.push_back(bufs[bufs.size() - 1].p);
  }
  Dev psk = Dev::From(dsk), psv = Dev::From(dsv), pwk = Dev::From(dwk), pwv = Dev::From(dwv);
  Dev dns = Dev::From(h.ns), dnw = Dev::From(h.nw), dq = Dev::From(q);
  Dev dout(rows * c.d * 4), dlse(rows * 4);
  TierBatch db = hb;
  db.sink_k = psk.as<const void* const>();
  db.sink_v = psv.as<const void* const>();
  db.window_k = pwk.as<const void* const>();
  db.window_v = pwv.as<const void* const>();
  db.n_sink = dns.as<const int32_t>();
  db.n_window = dnw.as<const int32_t>();
  auto st = TierAttention(db, dq.p, p, dout.as<float>(), dlse.as<float>(), nullptr, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  CUDA_OK(cudaDeviceSynchronize());
  auto go = dout.Get<float>(rows * c.d);
  auto gl = dlse.Get<float>(rows);
  EXPECT_TRUE(Close(go.data(), ro.data(), go.size(), kKernelOTol, "o"));
  EXPECT_TRUE(Close(gl.data(), rl.data(), gl.size(), kKernelLseTol, "lse"));
}

TEST_F(GpuKernels, TierAttention_MatchesReference) {
  std::mt19937 rng(10);
  const bool small = Small();
  // Sequences: full window, window not full, empty tier, one token, sinks only, window only.
  const std::vector<std::pair<int, int>> mixed = {{4, 300}, {4, 129}, {0, 0},
                                                  {0, 1},   {3, 0},   {0, 77}};
  std::vector<TierCase> cases;
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (int d : {64, 128, 256}) {
      if (small && d != 128) continue;
      cases.push_back({t, d, 2, 4, 300, mixed, 0, true});
    }
    cases.push_back({t, 128, 8, 4, 300, {{4, 300}}, 0, false});  // q in storage dtype
  }
  // Groups past kTierGroupTile take several CTAs per kv head: 12 (a partial tile), 16 (GLM-4), and
  // an MQA shape's whole group over one kv head, split and unsplit.
  for (int group : {1, 2, 4, 5, 8, 12, 16})
    cases.push_back({DType::kBF16, 128, 2, group, 300, mixed, 0, true});
  cases.push_back({DType::kF16, 64, 1, 48, 300, mixed, 0, false});
  cases.push_back({DType::kF32, 256, 1, 20, 70, {{4, 70}, {0, 9}}, 16, true});
  // Split boundaries: one row per split, a split edge inside the sinks, a single split.
  for (int split : {1, 4, 5, 32, 33, 100000}) {
    if (small && split == 1) continue;
    cases.push_back(
        {DType::kBF16, 128, 2, 4, 70, {{4, 70}, {5, 31}, {0, 32}, {1, 0}}, split, true});
  }
  if (!small) cases.push_back({DType::kBF16, 128, 8, 4, 2048, {{4, 2048}, {4, 1000}}, 0, true});
  for (const auto& c : cases) RunTierCase(c, rng);
}

TEST_F(GpuKernels, TierAttention_ZeroBatchIsANoOp) {
  TierBatch t;
  t.kv_heads = 8;
  t.head_dim = 128;
  t.dtype = DType::kBF16;
  AttnParams p;
  p.q_heads = 32;
  EXPECT_TRUE(TierAttention(t, nullptr, p, nullptr, nullptr, nullptr, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
}

TEST_F(GpuKernels, MergeStates_MatchesReferenceAndHandlesEmpty) {
  std::mt19937 rng(11);
  for (int d : {64, 128, 256}) {
    for (DType out_t : {DType::kF32, DType::kBF16, DType::kF16}) {
      const int rows = 67;
      std::vector<float> oa(rows * d), ob(rows * d), la(rows), lb(rows);
      std::normal_distribution<float> nd(0.f, 1.f);
      for (auto& x : oa) x = nd(rng);
      for (auto& x : ob) x = nd(rng);
      for (int r = 0; r < rows; ++r) {
        la[r] = 3 * nd(rng);
        lb[r] = 3 * nd(rng);
        if (r % 5 == 0) la[r] = kNegInf;
        if (r % 7 == 0) lb[r] = kNegInf;  // r % 35 == 0: both empty
      }
      std::vector<unsigned char> ro(rows * d * DTypeSize(out_t));
      std::vector<float> rl(rows);
      MergeStatesToHost(oa.data(), la.data(), ob.data(), lb.data(), rows, d, ro.data(), out_t,
                        rl.data());
      Dev doa = Dev::From(oa), dob = Dev::From(ob), dla = Dev::From(la), dlb = Dev::From(lb);
      Dev dout(ro.size()), dl(rows * 4);
      ASSERT_TRUE(MergeStates(doa.as<float>(), dla.as<float>(), dob.as<float>(), dlb.as<float>(),
                              rows, d, dout.p, out_t, dl.as<float>(), nullptr)
                      .ok());
      auto go = ToF32(dout.Get<unsigned char>(ro.size()), out_t);
      auto rf = ToF32(ro, out_t);
      auto gl = dl.Get<float>(rows);
      const double tol = out_t == DType::kF32 ? kKernelOTol : kBf16OutTol;
      EXPECT_TRUE(Close(go.data(), rf.data(), go.size(), tol, "o"));
      EXPECT_TRUE(Close(gl.data(), rl.data(), rows, kKernelLseTol, "lse"));
      EXPECT_EQ(gl[0], kNegInf);
      EXPECT_EQ(go[0], 0.f);
      if (out_t == DType::kF32) {  // in place: out = o_a, lse_out = lse_a
        ASSERT_TRUE(MergeStates(doa.as<float>(), dla.as<float>(), dob.as<float>(), dlb.as<float>(),
                                rows, d, doa.p, out_t, dla.as<float>(), nullptr)
                        .ok());
        auto io = doa.Get<float>(rows * d);
        auto il = dla.Get<float>(rows);
        EXPECT_TRUE(Close(io.data(), rf.data(), io.size(), tol, "o in place"));
        EXPECT_TRUE(Close(il.data(), rl.data(), rows, kKernelLseTol, "lse in place"));
      }
    }
  }
  CUDA_OK(cudaDeviceSynchronize());
}

TEST_F(GpuKernels, MergeStatesN_MatchesReference) {
  std::mt19937 rng(12);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int n : {1, 2, 3, 4, 33, 70}) {  // past a round of 32 states, a partial round
    for (int d : {64, 128, 256}) {
      const int rows = 45;
      std::vector<float> o(static_cast<std::size_t>(n) * rows * d),
          l(static_cast<std::size_t>(n) * rows);
      for (auto& x : o) x = nd(rng);
      for (std::size_t i = 0; i < l.size(); ++i) l[i] = (i % 4 == 1) ? kNegInf : 3 * nd(rng);
      for (int i = 0; i < n; ++i) l[static_cast<std::size_t>(i) * rows] = kNegInf;  // row 0 empty
      std::vector<float> ro(static_cast<std::size_t>(rows) * d), rl(rows);
      MergeStatesNHost(o.data(), l.data(), n, rows, d, ro.data(), DType::kF32, rl.data());
      Dev dO = Dev::From(o), dL = Dev::From(l), dout(ro.size() * 4), dl(rows * 4);
      ASSERT_TRUE(MergeStatesN(dO.as<float>(), dL.as<float>(), n, rows, d, dout.p, DType::kF32,
                               dl.as<float>(), nullptr)
                      .ok());
      auto go = dout.Get<float>(ro.size());
      auto gl = dl.Get<float>(rows);
      EXPECT_TRUE(Close(go.data(), ro.data(), go.size(), kKernelOTol, "o"));
      EXPECT_TRUE(Close(gl.data(), rl.data(), rows, kKernelLseTol, "lse"));
      EXPECT_EQ(gl[0], kNegInf);
      EXPECT_EQ(go[0], 0.f);
    }
  }
  CUDA_OK(cudaDeviceSynchronize());
}

TEST_F(GpuKernels, ScatterRows_MatchesReference) {
  std::mt19937 rng(14);
  const std::size_t row_bytes = 256;
  const int64_t n = 300, pool = 1000;
  std::vector<unsigned char> src_k(n * row_bytes), src_v(n * row_bytes);
  for (auto& x : src_k) x = static_cast<unsigned char>(rng());
  for (auto& x : src_v) x = static_cast<unsigned char>(rng());
  std::vector<int32_t> all(pool);
  for (int32_t i = 0; i < pool; ++i) all[i] = i;
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<int32_t> dst(all.begin(), all.begin() + n);  // distinct rows
  std::vector<unsigned char> want_k(pool * row_bytes, 7), want_v(pool * row_bytes, 7);
  ScatterRowsHost(src_k.data(), src_v.data(), want_k.data(), want_v.data(), dst.data(), n,
                  row_bytes);
  Dev dk = Dev::From(src_k), dv = Dev::From(src_v), drows = Dev::From(dst);
  Dev pk = Dev::From(std::vector<unsigned char>(pool * row_bytes, 7));
  Dev pv = Dev::From(std::vector<unsigned char>(pool * row_bytes, 7));
  ASSERT_TRUE(ScatterRows(dk.p, dv.p, pk.p, pv.p, drows.as<int32_t>(), n, row_bytes, nullptr).ok());
  EXPECT_EQ(pk.Get<unsigned char>(want_k.size()), want_k);
  EXPECT_EQ(pv.Get<unsigned char>(want_v.size()), want_v);
  EXPECT_FALSE(ScatterRows(dk.p, dv.p, pk.p, pv.p, drows.as<int32_t>(), n, 100, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
}

TEST_F(GpuKernels, ExpandRowRuns_MatchesReference) {
  // Runs of 0..16 rows (pages of the hot cache), in a shuffled destination order.
  std::mt19937 rng(15);
  std::vector<int32_t> runs;
  int32_t dst = 0;
  for (int r = 0; r < 500; ++r) {
    const int32_t n = static_cast<int32_t>(rng() % 17);
    runs.insert(runs.end(), {static_cast<int32_t>(rng() % 100000), dst, n});
    dst += n;
  }
  const int64_t n_runs = static_cast<int64_t>(runs.size() / 3);
  std::vector<int32_t> want(dst, -1);
  ExpandRowRunsHost(runs.data(), n_runs, want.data());
  for (int32_t x : want) ASSERT_GE(x, 0) << "every position written";
  Dev druns = Dev::From(runs), ids(static_cast<std::size_t>(dst) * 4);
  ASSERT_TRUE(ExpandRowRuns(druns.as<int32_t>(), n_runs, ids.as<int32_t>(), nullptr).ok());
  EXPECT_EQ(ids.Get<int32_t>(dst), want);
  CUDA_OK(cudaDeviceSynchronize());
}

TEST_F(GpuKernels, CopySpans_IntoPinnedHostMatchReference) {
  // A step record's shape: a large mask, two counters, an empty span and a row list, written by
  // the kernel through the pinned block's mapping.
  std::mt19937 rng(16);
  const std::vector<std::size_t> sizes = {4 * 8 * 8193, 16, 0, 8 * 300};
  std::vector<std::vector<uint32_t>> src;
  std::vector<Dev> dsrc;
  std::size_t total = 0;
  for (std::size_t b : sizes) {
    src.emplace_back(b / 4);
    for (uint32_t& x : src.back()) x = static_cast<uint32_t>(rng());
    dsrc.push_back(Dev::From(src.back().empty() ? std::vector<uint32_t>(1) : src.back()));
    total += b;
  }
  void* pinned = nullptr;
  CUDA_OK(cudaHostAlloc(&pinned, total, cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(pinned, 0xab, total);
  std::vector<unsigned char> want(total, 0xab);
  std::vector<CopySpan> spans, host_spans;
  std::size_t at = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    spans.push_back({dsrc[i].p, static_cast<unsigned char*>(pinned) + at, sizes[i]});
    host_spans.push_back({src[i].data(), want.data() + at, sizes[i]});
    at += sizes[i];
  }
  CopySpansHost(host_spans.data(), static_cast<int>(host_spans.size()));
  ASSERT_TRUE(CopySpans(spans.data(), static_cast<int>(spans.size()), nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(0, std::memcmp(pinned, want.data(), total));
  // Refused: too many spans, a misaligned one.
  std::vector<CopySpan> many(kMaxCopySpans + 1, spans[1]);
  EXPECT_EQ(CopySpans(many.data(), kMaxCopySpans + 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  CopySpan odd = spans[1];
  odd.bytes = 6;
  EXPECT_EQ(CopySpans(&odd, 1, nullptr).code(), absl::StatusCode::kInvalidArgument);
  CUDA_OK(cudaFreeHost(pinned));
}

TEST_F(GpuKernels, Ring_AppendEvictGatherMatchReference) {
  std::mt19937 rng(12);
  for (DType t : {DType::kBF16, DType::kF32}) {
    for (int d : {64, 128, 256}) {
      const int batch = 3, cap = 37, kvh = 2;
      const std::size_t tok = static_cast<std::size_t>(kvh) * d * DTypeSize(t);
      std::vector<std::vector<unsigned char>> hk, hv;
      std::vector<Dev> dk, dv;
      std::vector<void*> phk, phv, pdk, pdv;
      for (int b = 0; b < batch; ++b) {
        hk.push_back(RandomStorage(rng, cap * kvh * d, t, 1.f));
        hv.push_back(RandomStorage(rng, cap * kvh * d, t, 1.f));
        dk.push_back(Dev::From(hk.back()));
        dv.push_back(Dev::From(hv.back()));
      }
      for (int b = 0; b < batch; ++b) {
        phk.push_back(hk[b].data());
        phv.push_back(hv[b].data());
        pdk.push_back(dk[b].p);
        pdv.push_back(dv[b].p);
      }
      Dev ddk = Dev::From(pdk), ddv = Dev::From(pdv);
      std::vector<int64_t> pos = {0, 30, 100};  // empty, wrapping, long past full
      for (int n_new : {1, 9, cap}) {
        auto nk = RandomStorage(rng, batch * n_new * kvh * d, t, 1.f);
        auto nv = RandomStorage(rng, batch * n_new * kvh * d, t, 1.f);
        std::vector<unsigned char> ek(nk.size(), 0), ev(nk.size(), 0);
        RingBatch hr{phk.data(), phv.data(), pos.data(), batch, cap, kvh, d, t};
        RingAppendHost(hr, nk.data(), nv.data(), n_new, ek.data(), ev.data());
        Dev dpos = Dev::From(pos), dnk = Dev::From(nk), dnv = Dev::From(nv);
        Dev dek(nk.size()), dev(nk.size());
        RingBatch dr{ddk.as<void* const>(),
                     ddv.as<void* const>(),
                     dpos.as<const int64_t>(),
                     batch,
                     cap,
                     kvh,
                     d,
                     t};
        ASSERT_TRUE(RingAppend(dr, dnk.p, dnv.p, n_new, dek.p, dev.p, nullptr).ok());
        auto gek = dek.Get<unsigned char>(nk.size()), gev = dev.Get<unsigned char>(nk.size());
        for (int b = 0; b < batch; ++b) {
          EXPECT_EQ(0, std::memcmp(dk[b].Get<unsigned char>(hk[b].size()).data(), hk[b].data(),
                                   hk[b].size()));
          EXPECT_EQ(0, std::memcmp(dv[b].Get<unsigned char>(hv[b].size()).data(), hv[b].data(),
                                   hv[b].size()));
          for (int i = 0; i < n_new; ++i) {
            if (pos[b] + i < cap) continue;  // nothing evicted: staging row undefined
            const std::size_t at = (static_cast<std::size_t>(b) * n_new + i) * tok;
            EXPECT_EQ(0, std::memcmp(&gek[at], &ek[at], tok)) << "b" << b << " i" << i;
            EXPECT_EQ(0, std::memcmp(&gev[at], &ev[at], tok));
          }
        }
        for (auto& p : pos) p += n_new;
      }
      // Gather the oldest 11 rows of each ring.
      std::vector<int64_t> start = {pos[0] - 11, pos[1] - 11, pos[2] - cap};
      const int count = 11;
      std::vector<unsigned char> gk(batch * count * tok), gv(gk.size());
      RingBatch hr{phk.data(), phv.data(), nullptr, batch, cap, kvh, d, t};
      RingGatherHost(hr, start.data(), count, gk.data(), gv.data());
      Dev dstart = Dev::From(start), dgk(gk.size()), dgv(gk.size());
      RingBatch dr{ddk.as<void* const>(), ddv.as<void* const>(), nullptr, batch, cap, kvh, d, t};
      ASSERT_TRUE(RingGather(dr, dstart.as<const int64_t>(), count, dgk.p, dgv.p, nullptr).ok());
      EXPECT_EQ(0, std::memcmp(dgk.Get<unsigned char>(gk.size()).data(), gk.data(), gk.size()));
      EXPECT_EQ(0, std::memcmp(dgv.Get<unsigned char>(gv.size()).data(), gv.data(), gv.size()));
    }
  }
  CUDA_OK(cudaDeviceSynchronize());
}

// RingAppendToStore on the device against its reference: rings in device memory, stores in
// mapped host memory (a cold store), write_pos and the row counts advanced by the kernels.
TEST_F(GpuKernels, RingAppendToStore_MatchesReference) {
  std::mt19937 rng(32);
  for (int d : {64, 128, 256}) {
    SCOPED_TRACE(d);
    const int batch = 3, cap = 11, kvh = 2;
    const int64_t store_rows = 64;
    const std::size_t row = d * 2;
    std::vector<std::vector<unsigned char>> hk, hv;
    std::vector<Dev> dk, dv;
    std::vector<void*> phk, phv, pdk, pdv, hsk, hsv, dsk, dsv;
    std::vector<unsigned char*> mapped;
    for (int b = 0; b < batch; ++b) {
      hk.push_back(RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f));
      hv.push_back(RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f));
      dk.push_back(Dev::From(hk.back()));
      dv.push_back(Dev::From(hv.back()));
    }
    std::vector<std::vector<unsigned char>> ref_store(2 * batch * kvh,
                                                      std::vector<unsigned char>(store_rows * row));
    for (int b = 0; b < batch; ++b) {
      phk.push_back(hk[b].data());
      phv.push_back(hv[b].data());
      pdk.push_back(dk[b].p);
      pdv.push_back(dv[b].p);
    }
    for (int s = 0; s < 2 * batch * kvh; ++s) {
      void* h = nullptr;
      CUDA_OK(cudaHostAlloc(&h, store_rows * row, cudaHostAllocMapped));
      std::memset(h, 0, store_rows * row);
      mapped.push_back(static_cast<unsigned char*>(h));
      void* dp = nullptr;
      CUDA_OK(cudaHostGetDevicePointer(&dp, h, 0));
      (s < batch * kvh ? dsk : dsv).push_back(dp);
      (s < batch * kvh ? hsk : hsv).push_back(ref_store[s].data());
    }
    Dev ddk = Dev::From(pdk), ddv = Dev::From(pdv), dstk = Dev::From(dsk), dstv = Dev::From(dsv);
    const std::vector<int64_t> base = {0, 7, 20};
    Dev dbase = Dev::From(base);
    std::vector<int64_t> pos = {0, 9, 30}, rows(batch, -1);  // empty, about to wrap, long past
    Dev dpos = Dev::From(pos), drows = Dev::From(rows);
    for (int n : {1, 4, cap}) {
      auto nk = RandomStorage(rng, batch * n * kvh * d, DType::kBF16, 1.f);
      auto nv = RandomStorage(rng, batch * n * kvh * d, DType::kBF16, 1.f);
      RingBatch hr{phk.data(), phv.data(), nullptr, batch, cap, kvh, d, DType::kBF16};
      RingStoreTarget hs{hsk.data(), hsv.data(), base.data(), store_rows};
      ASSERT_TRUE(
          RingAppendToStoreHost(hr, nk.data(), nv.data(), n, hs, pos.data(), rows.data()).ok());
      Dev dnk = Dev::From(nk), dnv = Dev::From(nv);
      RingBatch dr{ddk.as<void* const>(), ddv.as<void* const>(), nullptr, batch, cap, kvh, d,
                   DType::kBF16};
      RingStoreTarget ds{dstk.as<void* const>(), dstv.as<void* const>(), dbase.as<const int64_t>(),
                         store_rows};
      ASSERT_TRUE(RingAppendToStore(dr, dnk.p, dnv.p, n, ds, dpos.as<int64_t>(),
                                    drows.as<int64_t>(), nullptr)
                      .ok());
      CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(dpos.Get<int64_t>(batch), pos) << n;
      EXPECT_EQ(drows.Get<int64_t>(batch), rows) << n;
      for (int b = 0; b < batch; ++b) {
        EXPECT_EQ(dk[b].Get<unsigned char>(hk[b].size()), hk[b]) << n;
        EXPECT_EQ(dv[b].Get<unsigned char>(hv[b].size()), hv[b]) << n;
      }
      for (int s = 0; s < 2 * batch * kvh; ++s) {
        EXPECT_EQ(0, std::memcmp(mapped[s], ref_store[s].data(), store_rows * row))
            << "store " << s << " after " << n;
      }
    }
    for (unsigned char* h : mapped) CUDA_OK(cudaFreeHost(h));
  }
}

// The fused decode append: ring in device memory, the leaving rows written into pinned host
// memory (the runtime's eviction blocks) by the kernel.
TEST_F(GpuKernels, RingAppendRows_EvictsIntoPinnedHostMemory) {
  std::mt19937 rng(22);
  for (int d : {64, 128, 256}) {
    const int cap = 29, kvh = 4;
    const std::size_t tok = static_cast<std::size_t>(kvh) * d * 2;
    auto hk = RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f);
    auto hv = RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f);
    Dev dk = Dev::From(hk), dv = Dev::From(hv);
    int64_t slot = 11;
    for (int n : {1, 2, cap}) {
      auto nk = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
      auto nv = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
      std::vector<unsigned char> ek(nk.size()), ev(nk.size());
      RingRows hr{hk.data(), hv.data(), cap, slot, tok};
      RingAppendRowsHost(hr, nk.data(), nv.data(), n, ek.data(), ev.data());
      void* pk = nullptr;
      void* pv = nullptr;
      CUDA_OK(cudaHostAlloc(&pk, nk.size(), cudaHostAllocPortable));
      CUDA_OK(cudaHostAlloc(&pv, nk.size(), cudaHostAllocPortable));
      std::memset(pk, 0xff, nk.size());
      std::memset(pv, 0xff, nk.size());
      Dev dnk = Dev::From(nk), dnv = Dev::From(nv);
      RingRows dr{dk.p, dv.p, cap, slot, tok};
      ASSERT_TRUE(RingAppendRows(dr, dnk.p, dnv.p, n, pk, pv, nullptr).ok());
      CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(0, std::memcmp(pk, ek.data(), ek.size())) << "d" << d << " n" << n;
      EXPECT_EQ(0, std::memcmp(pv, ev.data(), ev.size())) << "d" << d << " n" << n;
      EXPECT_EQ(dk.Get<unsigned char>(hk.size()), hk) << "d" << d << " n" << n;
      EXPECT_EQ(dv.Get<unsigned char>(hv.size()), hv) << "d" << d << " n" << n;
      cudaFreeHost(pk);
      cudaFreeHost(pv);
      slot = (slot + n) % cap;
    }
  }
}

// The in-place decode append: the leaving rows written by the kernel into one registered host
// buffer per kv head (the cold stores' next rows), at an offset into each, as the reference does.
TEST_F(GpuKernels, RingAppendRowsToHeads_WritesIntoRegisteredHostRows) {
  std::mt19937 rng(24);
  for (int d : {64, 128, 256}) {
    const int cap = 29, kvh = 4, at_row = 3, rows_held = 64;
    const std::size_t tok = static_cast<std::size_t>(kvh) * d * 2, hb = d * 2;
    auto hk = RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f);
    auto hv = RandomStorage(rng, cap * kvh * d, DType::kBF16, 1.f);
    Dev dk = Dev::From(hk), dv = Dev::From(hv);
    // Page-aligned, as the stores are; registered as the direct step registers them.
    std::vector<void*> store(2 * kvh);
    for (void*& p : store) {
      ASSERT_EQ(0, posix_memalign(&p, 4096, rows_held * hb));
      std::memset(p, 0x5a, rows_held * hb);
      CUDA_OK(cudaHostRegister(p, rows_held * hb, cudaHostRegisterMapped));
    }
    std::vector<std::vector<unsigned char>> want(2 * kvh,
                                                 std::vector<unsigned char>(rows_held * hb, 0x5a));
    int64_t slot = 11, row = at_row;
    for (int n : {1, 2, cap}) {
      auto nk = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
      auto nv = RandomStorage(rng, n * kvh * d, DType::kBF16, 1.f);
      HeadRows hto, dto;
      hto.heads = dto.heads = kvh;
      for (int g = 0; g < kvh; ++g) {
        hto.k[g] = want[g].data() + row * hb;
        hto.v[g] = want[kvh + g].data() + row * hb;
        dto.k[g] = static_cast<unsigned char*>(store[g]) + row * hb;
        dto.v[g] = static_cast<unsigned char*>(store[kvh + g]) + row * hb;
      }
      ASSERT_TRUE(RingAppendRowsToHeadsHost(RingRows{hk.data(), hv.data(), cap, slot, tok},
                                            nk.data(), nv.data(), n, hto)
                      .ok());
      Dev dnk = Dev::From(nk), dnv = Dev::From(nv);
      ASSERT_TRUE(
          RingAppendRowsToHeads(RingRows{dk.p, dv.p, cap, slot, tok}, dnk.p, dnv.p, n, dto, nullptr)
              .ok());
      CUDA_OK(cudaDeviceSynchronize());
      for (int s = 0; s < 2 * kvh; ++s)
        EXPECT_EQ(0, std::memcmp(store[s], want[s].data(), rows_held * hb))
            << "d" << d << " n" << n << " store " << s;
      EXPECT_EQ(dk.Get<unsigned char>(hk.size()), hk) << "d" << d << " n" << n;
      EXPECT_EQ(dv.Get<unsigned char>(hv.size()), hv) << "d" << d << " n" << n;
      slot = (slot + n) % cap;
      row += n;
    }
    for (void* p : store) {
      CUDA_OK(cudaHostUnregister(p));
      std::free(p);
    }
  }
}

TEST_F(GpuKernels, GatherAttend_MatchesReference) {
  std::mt19937 rng(13);
  const bool small = Small();
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (int d : {64, 128, 256}) {
      if (small && d != 128) continue;
      for (bool with_ids : {true, false}) {
        for (int split : {0, 7, 64}) {
          const int rows_q = 9, n_rows = small ? 300 : 2500;
          auto k = RandomStorage(rng, n_rows * d, t, 1.f),
               v = RandomStorage(rng, n_rows * d, t, 1.f);
          std::vector<int32_t> off{0}, ids;
          std::uniform_int_distribution<int> pick(0, n_rows - 1);
          int max_rows = 0;
          for (int r = 0; r < rows_q; ++r) {
            int n = (r == 3) ? 0 : (r == 4 ? 1 : (small ? 17 : 200) * r + 5);
            if (!with_ids) n = std::min(n, n_rows / rows_q);
            max_rows = std::max(max_rows, n);
            for (int j = 0; j < n; ++j) ids.push_back(with_ids ? pick(rng) : off.back() + j);
            off.push_back(off.back() + n);
          }
          auto q = RandomStorage(rng, rows_q * d, DType::kF32, 1.5f);
          GatherBatch hg{k.data(), v.data(), off.data(), with_ids ? ids.data() : nullptr,
                         rows_q,   max_rows, d,          t};
          std::vector<float> ro(rows_q * d), rl(rows_q);
          GatherAttendHost(hg, q.data(), true, 0.f, ro.data(), rl.data());
          Dev dk = Dev::From(k), dv = Dev::From(v), doff = Dev::From(off), dids = Dev::From(ids),
              dq = Dev::From(q), dout(ro.size() * 4), dl(rows_q * 4);
          GatherBatch dg = hg;
          dg.k = dk.p;
          dg.v = dv.p;
          dg.row_offsets = doff.as<const int32_t>();
          dg.row_ids = with_ids ? dids.as<const int32_t>() : nullptr;
          auto st = GatherAttend(dg, dq.p, true, 0.f, split, dout.as<float>(), dl.as<float>(),
                                 nullptr, nullptr);
          ASSERT_TRUE(st.ok()) << st;
          auto go = dout.Get<float>(ro.size());
          auto gl = dl.Get<float>(rows_q);
          SCOPED_TRACE(std::string(DTypeName(t)) + " d=" + std::to_string(d));
          EXPECT_TRUE(Close(go.data(), ro.data(), go.size(), kKernelOTol, "o"));
          EXPECT_TRUE(Close(gl.data(), rl.data(), rows_q, kKernelLseTol, "lse"));
        }
      }
    }
  }
  CUDA_OK(cudaDeviceSynchronize());
}

TEST_F(GpuKernels, ExactTopK_MatchesReference) {
  std::mt19937 rng(14);
  const bool small = Small();
  struct C {
    DType t;
    int d, nq, nk, topk;
    int64_t chunk;
    bool q_f32;
    int kvh;
  };
  std::vector<C> cases = {
      {DType::kBF16, 128, 37, 3000, 128, 0, true, 1},
      {DType::kBF16, 128, 37, 3000, 10, 1000, false, 2},  // several key chunks, strided keys
      {DType::kF16, 64, 5, 129, 1, 0, true, 1},
      {DType::kF32, 256, 70, 700, 64, 256, true, 1},
      {DType::kF32, 64, 3, 128, 128, 0, true, 1},  // topk == nk
  };
  if (small) cases.resize(3);
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(DTypeName(c.t)) + " d=" + std::to_string(c.d) +
                 " k=" + std::to_string(c.topk));
    auto k = RandomStorage(rng, static_cast<std::size_t>(c.nk) * c.kvh * c.d, c.t, 1.f);
    auto q =
        RandomStorage(rng, static_cast<std::size_t>(c.nq) * c.d, c.q_f32 ? DType::kF32 : c.t, 1.f);
    TopKProblem pr;
    pr.q = q.data();
    pr.q_stride = c.d;
    pr.q_is_f32 = c.q_f32;
    pr.k = k.data() + (c.kvh - 1) * c.d * DTypeSize(c.t);  // last kv head of [nk, kvh, d]
    pr.k_stride = static_cast<int64_t>(c.kvh) * c.d;
    pr.nq = c.nq;
    pr.nk = c.nk;
    pr.head_dim = c.d;
    pr.dtype = c.t;
    pr.scale = 0.25f;
    pr.topk = c.topk;
    pr.key_chunk = c.chunk;
    std::vector<int32_t> rid(c.nq * c.topk);
    std::vector<float> rsc(rid.size());
    ExactTopKHost(pr, rid.data(), rsc.data());
    Dev dk = Dev::From(k), dq = Dev::From(q), did(rid.size() * 4), dsc(rid.size() * 4);
    TopKProblem dp = pr;
    dp.q = dq.p;
    dp.k = static_cast<const unsigned char*>(dk.p) + (c.kvh - 1) * c.d * DTypeSize(c.t);
    auto st = ExactTopK(dp, did.as<int32_t>(), dsc.as<float>(), nullptr);
    ASSERT_TRUE(st.ok()) << st;
    auto gid = did.Get<int32_t>(rid.size());
    auto gsc = dsc.Get<float>(rid.size());
    // Scores position by position; ids may differ only where scores tie within rounding, so
    // check each returned id's reference score instead of the id itself.
    EXPECT_TRUE(Close(gsc.data(), rsc.data(), gsc.size(), kTopKScoreTol, "scores"));
    auto kf = ToF32(k, c.t);
    auto qf = c.q_f32 ? ToF32(q, DType::kF32) : ToF32(q, c.t);
    int id_mismatch = 0;
    for (int i = 0; i < c.nq; ++i) {
      for (int j = 0; j < c.topk; ++j) {
        const int id = gid[i * c.topk + j];
        ASSERT_GE(id, 0);
        ASSERT_LT(id, c.nk);
        double a = 0;
        for (int e = 0; e < c.d; ++e) {
          a += double(qf[i * c.d + e]) *
               kf[(static_cast<std::size_t>(id) * c.kvh + c.kvh - 1) * c.d + e];
        }
        EXPECT_NEAR(0.25 * a, rsc[i * c.topk + j], kTopKScoreTol * (1 + std::fabs(a)));
        id_mismatch += id != rid[i * c.topk + j];
      }
    }
    EXPECT_LE(id_mismatch, c.nq * c.topk / 100 + 2);  // only near-ties may swap
  }
  CUDA_OK(cudaDeviceSynchronize());
}

#else  // !KVRT_WITH_CUDA
TEST(GpuKernels, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif

}  // namespace
}  // namespace kvrt::gpu
