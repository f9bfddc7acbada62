// Direct decode step (direct_attend.h): the host references against a naive f64 attention over
// the rows the header describes (run everywhere), the kernels against the references (skipped
// without a device), and a timing of the 128K shape on the device (printed, not asserted).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kvrt_common/dtype.h"
#include "kvrt_gpu/direct_attend.h"
#include "kvrt_gpu/kernels.h"
#include "tests/gpu/device_copy.h"
#include "tests/gpu/random_storage.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvrt::gpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kB = kDirectBlockRows;
constexpr double kRefVsDoubleTol = 2e-5;              // host reference (f32 dots) vs f64, |o| ~ 1
[[maybe_unused]] constexpr double kKernelTol = 2e-4;  // kernel vs host reference (abs + rel)

struct Shape {
  int kv, group, d;
  DType t;
  int clusters;  // C; clusters are laid out at 16 * c with sizes 1..16 (the last 3: padding)
  int extra;     // E entries per kv head, about a third -1
  int tail;      // tail rows per kv head
};

// With several kv heads, the last has no extra rows and an empty tail, and its q head 0 selects
// nothing: that head's state is empty.
bool HasEmptyHead(const Shape& s) { return s.kv > 1; }

// A direct-step problem in host memory. Store rows of kv head g: cluster c at [16c, 16c + size),
// then 2E rows of which the extra entries pick E, then the tail. Rows in none of the sets (the
// ends of short clusters, unpicked extra candidates) must never be read.
struct Problem {
  Shape sh{};
  int qh = 0;
  int64_t rows = 0, bph = 0, pages = 0;
  std::size_t row_bytes = 0;
  std::vector<std::vector<unsigned char>> sk, sv;  // [kv][rows * row_bytes]
  std::vector<const void*> sk_ptr, sv_ptr;
  std::vector<int32_t> begin, size, extra, selected, count, block_page;
  std::vector<int64_t> tail;
  std::vector<uint32_t> mask;
  std::vector<unsigned char> pool_k, pool_v;
  std::vector<float> q;
  // Staged pages (Stage()).
  bool staged = false;
  int64_t stage_cap = 0;
  std::vector<unsigned char> stage_k, stage_v;
  std::vector<int64_t> stage_row;
  std::vector<uint32_t> stage_count{0};

  void Stage(int64_t cap) {
    staged = true;
    stage_cap = cap;
    stage_k.assign(cap * row_bytes, 0);
    stage_v.assign(cap * row_bytes, 0);
    stage_row.assign(std::max<int64_t>(cap, 1), -1);
  }

  DirectRowsView View() {
    DirectRowsView v;
    v.kv_heads = sh.kv;
    v.q_heads = qh;
    v.head_dim = sh.d;
    v.dtype = sh.t;
    v.rows = rows;
    v.store_k = sk_ptr.data();
    v.store_v = sv_ptr.data();
    v.block_page = block_page.data();
    v.blocks_per_head = bph;
    v.pool_k = pool_k.data();
    v.pool_v = pool_v.data();
    v.pages = pages;
    v.cluster_begin = begin.data();
    v.cluster_size = size.data();
    v.num_clusters = sh.clusters;
    v.extra = extra.empty() ? nullptr : extra.data();
    v.num_extra = sh.extra;
    v.tail_begin = tail.data();
    if (staged) {
      v.staged_pages = true;
      v.stage_k = stage_k.data();
      v.stage_v = stage_v.data();
      v.stage_row = stage_row.data();
      v.stage_count = stage_count.data();
      v.stage_cap = stage_cap;
    }
    return v;
  }
};

// Each q head selects about a third of the clusters (those of head 0 of its group shared with
// the others half the time), plus, for some heads, ids >= C that MarkSelected must ignore.
Problem MakeProblem(const Shape& sh, uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p;
  p.sh = sh;
  p.qh = sh.kv * sh.group;
  const int c_n = sh.clusters, e_n = sh.extra;
  const int64_t extra_base = int64_t{16} * c_n, tail_base = extra_base + 2 * e_n;
  p.rows = tail_base + sh.tail;
  p.bph = (p.rows + kB - 1) / kB + 1;  // one spare entry: the table may be longer than needed
  p.pages = p.bph * sh.kv + 3;
  p.row_bytes = static_cast<std::size_t>(sh.d) * DTypeSize(sh.t);
  std::uniform_int_distribution<int> sz(1, 16);
  for (int g = 0; g < sh.kv; ++g) {
    p.sk.push_back(RandomStorage(rng, p.rows * sh.d, sh.t, 1.f));
    p.sv.push_back(RandomStorage(rng, p.rows * sh.d, sh.t, 1.f));
    for (int c = 0; c < c_n; ++c) {
      p.begin.push_back(16 * c);
      p.size.push_back(c >= c_n - 3 ? 0 : sz(rng));
    }
    std::vector<int32_t> cand(2 * e_n);
    std::iota(cand.begin(), cand.end(), static_cast<int32_t>(extra_base));
    std::shuffle(cand.begin(), cand.end(), rng);
    for (int e = 0; e < e_n; ++e) {
      p.extra.push_back((HasEmptyHead(sh) && g == sh.kv - 1) || e % 3 == 1 ? -1 : cand[e]);
    }
    p.tail.push_back(HasEmptyHead(sh) && g == sh.kv - 1 ? p.rows : tail_base);
  }
  for (int g = 0; g < sh.kv; ++g) {
    p.sk_ptr.push_back(p.sk[g].data());
    p.sv_ptr.push_back(p.sv[g].data());
  }
  p.selected.assign(static_cast<std::size_t>(p.qh) * std::max(c_n, 1), 0);
  p.count.assign(p.qh, 0);
  std::bernoulli_distribution pick(1.0 / 3), share(0.5);
  std::vector<char> first(c_n);
  for (int h = 0; h < p.qh; ++h) {
    if (h == (sh.kv - 1) * sh.group) continue;  // selects nothing (empty if HasEmptyHead)
    std::vector<int32_t> sel;
    for (int c = 0; c < c_n; ++c) {
      const bool take = h % sh.group != 0 && share(rng) ? first[c] != 0 : pick(rng);
      if (h % sh.group == 0) first[c] = take;
      if (take) sel.push_back(c);
    }
    if (h % 3 == 2 && static_cast<int>(sel.size()) < c_n) sel.push_back(c_n + h);  // ignored
    std::copy(sel.begin(), sel.end(), p.selected.begin() + static_cast<std::size_t>(h) * c_n);
    p.count[h] = static_cast<int32_t>(sel.size());
  }
  p.mask.assign(static_cast<std::size_t>(sh.kv) * std::max(c_n, 1), 0xdeadbeefu);
  EXPECT_TRUE(
      MarkSelectedHost(p.selected.data(), p.count.data(), p.qh, sh.kv, c_n, p.mask.data()).ok());
  p.block_page.assign(static_cast<std::size_t>(sh.kv) * p.bph, -1);
  p.pool_k.assign(p.pages * kB * p.row_bytes, 0);
  p.pool_v.assign(p.pages * kB * p.row_bytes, 0);
  std::normal_distribution<float> nq(0.f, 0.5f);
  p.q.resize(static_cast<std::size_t>(p.qh) * sh.d);
  for (auto& x : p.q) x = nq(rng);
  return p;
}

// The rows of q head h, straight from the header's definition.
std::vector<int64_t> RowsOf(const Problem& p, int h) {
  const int g = h / p.sh.group, bit = h % p.sh.group;
  const int c_n = p.sh.clusters;
  std::vector<int64_t> out;
  for (int c = 0; c < c_n; ++c) {
    if (((p.mask[static_cast<std::size_t>(g) * c_n + c] >> bit) & 1u) == 0) continue;
    const int b = p.begin[g * c_n + c];
    for (int r = b; r < b + p.size[g * c_n + c]; ++r) out.push_back(r);
  }
  for (int e = 0; e < p.sh.extra; ++e) {
    const int32_t r = p.extra[static_cast<std::size_t>(g) * p.sh.extra + e];
    if (r >= 0) out.push_back(r);
  }
  for (int64_t r = p.tail[g]; r < p.rows; ++r) out.push_back(r);
  return out;
}

// Row r of kv head g as f32, read where the page table says.
void RowF32(const Problem& p, int g, int64_t r, bool value, float* out) {
  const int32_t page = p.block_page[static_cast<std::size_t>(g) * p.bph + r / kB];
  const unsigned char* src =
      page >= 0 ? (value ? p.pool_v : p.pool_k).data() + (page * kB + r % kB) * p.row_bytes
                : (value ? p.sv : p.sk)[g].data() + r * p.row_bytes;
  ConvertToF32(src, p.sh.t, p.sh.d, out);
}

// Exact attention of every q head in f64.
void Naive(const Problem& p, std::vector<double>* o, std::vector<double>* lse) {
  const int d = p.sh.d;
  const double scale = 1.0 / std::sqrt(double(d));
  o->assign(static_cast<std::size_t>(p.qh) * d, 0.0);
  lse->assign(p.qh, -INFINITY);
  std::vector<float> k(d), v(d);
  for (int h = 0; h < p.qh; ++h) {
    const int g = h / p.sh.group;
    const auto rows = RowsOf(p, h);
    if (rows.empty()) continue;
    std::vector<double> s(rows.size());
    double m = -INFINITY;
    for (std::size_t j = 0; j < rows.size(); ++j) {
      RowF32(p, g, rows[j], false, k.data());
      double a = 0;
      for (int i = 0; i < d; ++i) a += double(p.q[h * d + i]) * k[i];
      s[j] = a * scale;
      m = std::max(m, s[j]);
    }
    double l = 0;
    for (auto& x : s) l += (x = std::exp(x - m));
    for (std::size_t j = 0; j < rows.size(); ++j) {
      RowF32(p, g, rows[j], true, v.data());
      for (int i = 0; i < d; ++i) (*o)[h * d + i] += s[j] / l * v[i];
    }
    (*lse)[h] = m + std::log(l);
  }
}

// Rows of the union per kv head, split by where the table sends them: {pool, host}.
std::vector<int64_t> ExpectedReads(const Problem& p) {
  std::vector<int64_t> n(2, 0);
  for (int g = 0; g < p.sh.kv; ++g) {
    std::set<int64_t> u;
    for (int j = 0; j < p.sh.group; ++j) {
      for (int64_t r : RowsOf(p, g * p.sh.group + j)) u.insert(r);
    }
    for (int64_t r : u)
      ++n[p.block_page[static_cast<std::size_t>(g) * p.bph + r / kB] >= 0 ? 0 : 1];
  }
  return n;
}

struct Result {
  std::vector<float> o, lse;
  std::vector<int64_t> reads = std::vector<int64_t>(2, 0);
};

Result RunHost(Problem& p) {
  Result r;
  r.o.assign(static_cast<std::size_t>(p.qh) * p.sh.d, 7.f);
  r.lse.assign(p.qh, 7.f);
  EXPECT_TRUE(DirectAttendHost(p.View(), p.mask.data(), p.q.data(), 0.f, r.o.data(), r.lse.data(),
                               r.reads.data())
                  .ok());
  return r;
}

void ExpectMatchesNaive(const Problem& p, const Result& r) {
  std::vector<double> o, lse;
  Naive(p, &o, &lse);
  for (int h = 0; h < p.qh; ++h) {
    SCOPED_TRACE(::testing::Message() << "q head " << h);
    if (lse[h] == -INFINITY) {
      EXPECT_EQ(r.lse[h], kNegInf);
    } else {
      EXPECT_NEAR(r.lse[h], lse[h], kRefVsDoubleTol * (1 + std::fabs(lse[h])));
    }
    for (int i = 0; i < p.sh.d; ++i) {
      ASSERT_NEAR(r.o[h * p.sh.d + i], o[h * p.sh.d + i], kRefVsDoubleTol) << "dim " << i;
    }
  }
}

// Updates (g * bph + b, page) paging `n` random whole blocks of every kv head, distinct pages.
std::vector<int32_t> RandomUpdates(const Problem& p, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> pages(p.pages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  std::vector<int32_t> up;
  std::size_t next = 0;
  const int64_t whole = p.rows / kB;
  for (int g = 0; g < p.sh.kv; ++g) {
    std::vector<int32_t> blocks(whole);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    for (int i = 0; i < std::min<int64_t>(n, whole); ++i) {
      up.push_back(static_cast<int32_t>(g * p.bph + blocks[i]));
      up.push_back(pages[next++]);
    }
  }
  return up;
}

const std::vector<Shape>& HostShapes() {
  static const std::vector<Shape> shapes = {
      {2, 1, 64, DType::kBF16, 40, 6, 37},  {2, 4, 128, DType::kF32, 60, 9, 0},
      {1, 8, 128, DType::kBF16, 50, 0, 45}, {3, 4, 64, DType::kF32, 30, 5, 19},
      {2, 8, 64, DType::kBF16, 25, 7, 8},
  };
  return shapes;
}

std::string Describe(const Shape& s) {
  return std::string("kv ") + std::to_string(s.kv) + " group " + std::to_string(s.group) + " d " +
         std::to_string(s.d) + " " + std::string(DTypeName(s.t)) + " C " +
         std::to_string(s.clusters) + " E " + std::to_string(s.extra) + " tail " +
         std::to_string(s.tail);
}

TEST(DirectAttendHost, MatchesNaiveAttention) {
  for (const Shape& sh : HostShapes()) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 100 + sh.clusters);
    const Result r = RunHost(p);
    ExpectMatchesNaive(p, r);
    if (HasEmptyHead(sh)) {
      const int h = (sh.kv - 1) * sh.group;
      EXPECT_EQ(r.lse[h], kNegInf);
      for (int i = 0; i < sh.d; ++i) EXPECT_EQ(r.o[h * sh.d + i], 0.f);
    }
    const auto reads = ExpectedReads(p);
    EXPECT_EQ(r.reads[0], 0);
    EXPECT_EQ(r.reads[1], reads[1]);
  }
}

TEST(DirectAttendHost, ReadRowsAccumulate) {
  Problem p = MakeProblem(HostShapes()[1], 7);
  Result r;
  r.o.resize(static_cast<std::size_t>(p.qh) * p.sh.d);
  r.lse.resize(p.qh);
  r.reads = {5, 11};
  ASSERT_TRUE(DirectAttendHost(p.View(), p.mask.data(), p.q.data(), 0.f, r.o.data(), r.lse.data(),
                               r.reads.data())
                  .ok());
  const auto want = ExpectedReads(p);
  EXPECT_EQ(r.reads[0], 5 + want[0]);
  EXPECT_EQ(r.reads[1], 11 + want[1]);
  // Null read_rows is allowed.
  EXPECT_TRUE(
      DirectAttendHost(p.View(), p.mask.data(), p.q.data(), 0.f, r.o.data(), r.lse.data(), nullptr)
          .ok());
}

// rows_now (the count a CUDA graph's replay reads): the attention over a store that holds `rows`
// rows is the attention over its first *rows_now, bit for bit; a count past `rows` reads `rows`.
TEST(DirectAttendHost, RowsNowIsTheStoresCountAsTheAttentionRuns) {
  for (const Shape& sh : HostShapes()) {
    if (sh.tail < 2) continue;
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 40 + sh.clusters);
    const int64_t full = p.rows;
    for (const int64_t now : {full - sh.tail / 2, full - 1, full, full + 5}) {
      SCOPED_TRACE(::testing::Message() << "rows_now " << now);
      p.rows = std::min(now, full);  // the same problem with its tail cut there
      const Result cut = RunHost(p);
      ExpectMatchesNaive(p, cut);
      p.rows = full;
      Result r;
      r.o.assign(cut.o.size(), 7.f);
      r.lse.assign(cut.lse.size(), 7.f);
      ASSERT_TRUE(DirectAttendHost(p.View(), p.mask.data(), p.q.data(), 0.f, r.o.data(),
                                   r.lse.data(), r.reads.data(), &now)
                      .ok());
      EXPECT_EQ(r.o, cut.o);
      EXPECT_EQ(r.lse, cut.lse);
      EXPECT_EQ(r.reads, cut.reads);
      EXPECT_EQ(RowsNow(full, &now), std::min(now, full));
    }
  }
}

// Rows copied into pages by FillPagesHost give the same result, bit for bit (same rows, same
// order), and are counted as pool reads.
TEST(DirectAttendHost, PoolRowsGiveTheSameResult) {
  for (const Shape& sh : HostShapes()) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 200 + sh.clusters);
    const Result before = RunHost(p);
    const auto up = RandomUpdates(p, static_cast<int>(p.rows / kB / 2), 3);
    ASSERT_TRUE(FillPagesHost(p.View(), up.data(), static_cast<int>(up.size() / 2)).ok());
    const Result after = RunHost(p);
    EXPECT_EQ(before.o, after.o);
    EXPECT_EQ(before.lse, after.lse);
    const auto want = ExpectedReads(p);
    EXPECT_GT(want[0], 0);
    EXPECT_EQ(after.reads, want);
    EXPECT_EQ(after.reads[0] + after.reads[1], before.reads[1]);
  }
}

// A page holding other data is what gets read when the table points at it.
TEST(DirectAttendHost, HonoursThePageTable) {
  Problem p = MakeProblem(HostShapes()[0], 5);
  const Result before = RunHost(p);
  // The block of kv head 0's first tail row (attended by every q head of the group).
  const int64_t block = p.tail[0] / kB;
  const int32_t page = 2;
  std::mt19937 rng(9);
  const auto junk_k = RandomStorage(rng, kB * p.sh.d, p.sh.t, 3.f);
  const auto junk_v = RandomStorage(rng, kB * p.sh.d, p.sh.t, 3.f);
  std::copy(junk_k.begin(), junk_k.end(), p.pool_k.begin() + page * kB * p.row_bytes);
  std::copy(junk_v.begin(), junk_v.end(), p.pool_v.begin() + page * kB * p.row_bytes);
  p.block_page[block] = page;
  const Result after = RunHost(p);
  ExpectMatchesNaive(p, after);  // the naive attention reads through the table too
  EXPECT_NE(before.o, after.o);
  for (int j = 0; j < p.sh.group; ++j) EXPECT_NE(before.lse[j], after.lse[j]);
}

TEST(DirectAttendHost, NanRowPropagates) {
  Problem p = MakeProblem(HostShapes()[1], 8);
  const int32_t r = p.extra[0];  // kv head 0, attended by its whole group
  ASSERT_GE(r, 0);
  std::vector<float> k(p.sh.d, 0.f);
  k[3] = std::numeric_limits<float>::quiet_NaN();
  ConvertFromF32(k.data(), k.size(), p.sh.t, p.sk[0].data() + r * p.row_bytes);
  const Result res = RunHost(p);
  for (int j = 0; j < p.sh.group; ++j) EXPECT_TRUE(std::isnan(res.lse[j])) << j;
  EXPECT_FALSE(std::isnan(res.lse[p.sh.group]));
}

// The rows a step reads (per kv head, the union over its group), staged pages: (rows their pages
// hold, i.e. read from the pool; the others, read from the host store).
std::vector<int64_t> ReadsByTable(const Problem& p) {
  std::vector<int64_t> n(2, 0);
  for (int g = 0; g < p.sh.kv; ++g) {
    std::set<int64_t> u;
    for (int j = 0; j < p.sh.group; ++j)
      for (int64_t r : RowsOf(p, g * p.sh.group + j)) u.insert(r);
    for (int64_t r : u) {
      ++n[StagedHolds(p.block_page[static_cast<std::size_t>(g) * p.bph + r / kB], r) ? 0 : 1];
    }
  }
  return n;
}

// Every row a staged page says it holds is the store's row; returns how many rows they hold.
int64_t ExpectStagedRowsAreTheStores(const Problem& p) {
  int64_t held = 0;
  for (int g = 0; g < p.sh.kv; ++g)
    for (int64_t b = 0; b < p.bph; ++b) {
      const int32_t e = p.block_page[static_cast<std::size_t>(g) * p.bph + b];
      for (int r = 0; r < kB; ++r) {
        if (!StagedHolds(e, r)) continue;
        ++held;
        const std::size_t at = (static_cast<std::size_t>(StagedPage(e)) * kB + r) * p.row_bytes;
        const std::size_t from = static_cast<std::size_t>(b * kB + r) * p.row_bytes;
        EXPECT_EQ(std::memcmp(p.pool_k.data() + at, p.sk[g].data() + from, p.row_bytes), 0);
        EXPECT_EQ(std::memcmp(p.pool_v.data() + at, p.sv[g].data() + from, p.row_bytes), 0);
      }
    }
  return held;
}

// Staged pages: FillPagesHost only assigns; the step reads everything from the host store and
// stages it; CommitStagedHost moves the rows of paged blocks in, and the next step reads them
// from the pool with the same result, bit for bit.
TEST(DirectAttendHost, StagedRowsJoinTheirPagesForTheNextStep) {
  for (const Shape& sh : HostShapes()) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 250 + sh.clusters);
    const Result plain = RunHost(p);
    p.Stage(p.rows * sh.kv);
    const auto up = RandomUpdates(p, static_cast<int>(p.rows / kB / 2), 4);
    ASSERT_TRUE(FillPagesHost(p.View(), up.data(), static_cast<int>(up.size() / 2)).ok());
    EXPECT_TRUE(
        std::all_of(p.pool_k.begin(), p.pool_k.end(), [](unsigned char c) { return c == 0; }));
    const Result first = RunHost(p);
    EXPECT_EQ(first.o, plain.o);
    EXPECT_EQ(first.lse, plain.lse);
    EXPECT_EQ(first.reads, plain.reads);  // no row is valid yet: all from the host
    EXPECT_EQ(p.stage_count[0], static_cast<uint32_t>(plain.reads[1]));
    ASSERT_TRUE(CommitStagedHost(p.View()).ok());
    EXPECT_EQ(p.stage_count[0], 0u);
    EXPECT_GT(ExpectStagedRowsAreTheStores(p), 0);
    const auto want = ReadsByTable(p);
    EXPECT_GT(want[0], 0);
    const Result second = RunHost(p);
    EXPECT_EQ(second.o, plain.o);
    EXPECT_EQ(second.lse, plain.lse);
    EXPECT_EQ(second.reads, want);
    EXPECT_EQ(p.stage_count[0], static_cast<uint32_t>(want[1]));  // only host reads are staged
  }
}

// A stage of fewer rows than a step's misses keeps its first stage_cap rows; the count still
// counts every miss; a reassigned page starts empty.
TEST(DirectAttendHost, StageKeepsItsFirstCapRows) {
  Problem p = MakeProblem(HostShapes()[2], 31);
  p.Stage(5);
  const auto up = RandomUpdates(p, static_cast<int>(p.rows / kB), 5);
  ASSERT_TRUE(FillPagesHost(p.View(), up.data(), static_cast<int>(up.size() / 2)).ok());
  const Result first = RunHost(p);
  EXPECT_GT(first.reads[1], 5);
  EXPECT_EQ(p.stage_count[0], static_cast<uint32_t>(first.reads[1]));
  ASSERT_TRUE(CommitStagedHost(p.View()).ok());
  int64_t bits = 0;
  for (int32_t e : p.block_page)
    bits += std::popcount(StagedRows(e));
  EXPECT_EQ(bits, 5);
  EXPECT_EQ(ExpectStagedRowsAreTheStores(p), 5);
  EXPECT_EQ(RunHost(p).reads[0], 5);
  // A block given its page again (released, then assigned) holds nothing until rows are staged.
  int32_t block = 0;
  while (StagedRows(p.block_page[block]) == 0) ++block;
  const int32_t page = StagedPage(p.block_page[block]);
  const std::vector<int32_t> again = {block, -1, block, page};
  ASSERT_TRUE(FillPagesHost(p.View(), again.data(), 1).ok());
  ASSERT_TRUE(FillPagesHost(p.View(), again.data() + 2, 1).ok());
  EXPECT_EQ(p.block_page[block], page);
}

// Staged pages: an update with kFillPagesCopy copies its block in whole (every row valid), the
// others only assign; the next step reads the copied blocks' rows from the pool.
TEST(FillPagesHost, StagedCopiesOnlyTheBlocksAskedFor) {
  Problem p = MakeProblem(HostShapes()[1], 41);
  const Result plain = RunHost(p);
  p.Stage(p.rows * p.sh.kv);
  auto up = RandomUpdates(p, static_cast<int>(p.rows / kB), 6);
  for (std::size_t i = 1; i < up.size(); i += 4) up[i] |= kFillPagesCopy;  // every other update
  ASSERT_TRUE(FillPagesHost(p.View(), up.data(), static_cast<int>(up.size() / 2)).ok());
  int64_t copied = 0;
  for (std::size_t i = 0; i < up.size(); i += 2) {
    const int32_t e = p.block_page[up[i]];
    const bool copy = (up[i + 1] & kFillPagesCopy) != 0;
    EXPECT_EQ(StagedPage(e), up[i + 1] & ~kFillPagesCopy);
    EXPECT_EQ(StagedRows(e), copy ? 0xffu : 0u);
    copied += copy ? 1 : 0;
  }
  EXPECT_EQ(ExpectStagedRowsAreTheStores(p), copied * kB);
  const auto want = ReadsByTable(p);
  EXPECT_GT(want[0], 0);
  const Result r = RunHost(p);
  EXPECT_EQ(r.o, plain.o);
  EXPECT_EQ(r.reads, want);
}

// Rows of cluster c of kv head g that a step would read from the host store now, counted from the
// table directly (the test's own reading of the header's rule).
int32_t MissedRows(const Problem& p, int g, int c) {
  const std::size_t at = static_cast<std::size_t>(g) * p.sh.clusters + c;
  int32_t missed = 0;
  for (int64_t r = p.begin[at]; r < p.begin[at] + p.size[at]; ++r) {
    const int32_t e = p.block_page[static_cast<std::size_t>(g) * p.bph + r / kB];
    missed += (p.staged ? StagedHolds(e, r) : e >= 0) ? 0 : 1;
  }
  return missed;
}

// Residency-aware selection's offsets: penalty x the share of a cluster's rows the pool does not
// hold, whole pages (unstaged) and row bits (staged) alike; 0 for padding; bad penalties refused.
TEST(MissPenaltyOffsetsHost, ShareOfRowsNotInThePool) {
  for (const bool staged : {false, true}) {
    for (const Shape& sh : HostShapes()) {
      SCOPED_TRACE(Describe(sh) + (staged ? " staged" : ""));
      Problem p = MakeProblem(sh, 610 + sh.clusters);
      if (staged) p.Stage(p.rows * sh.kv);
      auto up = RandomUpdates(p, static_cast<int>(p.rows / kB / 2), 8);
      if (staged)  // a third of the blocks copied whole, the others only assigned (no row)
        for (std::size_t i = 1; i < up.size(); i += 6) up[i] |= kFillPagesCopy;
      ASSERT_TRUE(FillPagesHost(p.View(), up.data(), static_cast<int>(up.size() / 2)).ok());
      if (staged) {  // a step's reads staged and committed: some blocks hold part of their rows
        RunHost(p);
        ASSERT_TRUE(CommitStagedHost(p.View()).ok());
      }
      std::vector<float> off(static_cast<std::size_t>(sh.kv) * sh.clusters, -1.f);
      ASSERT_TRUE(MissPenaltyOffsetsHost(p.View(), 1.5f, off.data()).ok());
      int partial = 0, held = 0, missed_all = 0;
      for (int g = 0; g < sh.kv; ++g)
        for (int c = 0; c < sh.clusters; ++c) {
          const std::size_t at = static_cast<std::size_t>(g) * sh.clusters + c;
          if (p.size[at] == 0) {
            EXPECT_EQ(off[at], 0.f);
            continue;
          }
          const int32_t m = MissedRows(p, g, c);
          EXPECT_EQ(off[at], 1.5f * static_cast<float>(m) / static_cast<float>(p.size[at])) << at;
          partial += m > 0 && m < p.size[at];
          held += m == 0;
          missed_all += m == p.size[at];
        }
      EXPECT_GT(held, 0);  // the problem covers every case
      EXPECT_GT(missed_all, 0);
      if (staged) {
        EXPECT_GT(partial, 0);
      }
      ASSERT_TRUE(MissPenaltyOffsetsHost(p.View(), 0.f, off.data()).ok());
      EXPECT_TRUE(std::all_of(off.begin(), off.end(), [](float x) { return x == 0.f; }));
    }
  }
  Problem p = MakeProblem(HostShapes()[0], 5);
  std::vector<float> off(static_cast<std::size_t>(p.sh.kv) * p.sh.clusters);
  {  // Every whole block paged: only rows outside [0, rows) count, a cluster past either end.
    Problem edge = p;
    std::vector<int32_t> all_blocks;
    for (int64_t b = 0; b < edge.rows / kB; ++b)
      all_blocks.insert(all_blocks.end(), {static_cast<int32_t>(b), static_cast<int32_t>(b)});
    ASSERT_TRUE(
        FillPagesHost(edge.View(), all_blocks.data(), static_cast<int>(all_blocks.size() / 2))
            .ok());
    const int64_t whole = edge.rows / kB * kB;  // the partial last block has no page
    edge.begin[0] = static_cast<int32_t>(whole - 3);
    edge.size[0] = 10;  // 3 paged rows, then the partial block's and rows past `rows`
    edge.begin[1] = -2;
    edge.size[1] = 5;  // 2 rows before row 0
    ASSERT_TRUE(MissPenaltyOffsetsHost(edge.View(), 1.f, off.data()).ok());
    EXPECT_EQ(off[0], 7.f / 10.f);
    EXPECT_EQ(off[1], 2.f / 5.f);
    EXPECT_EQ(off[2], 0.f);
  }
  for (const float bad :
       {-1.f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    const absl::Status st = MissPenaltyOffsetsHost(p.View(), bad, off.data());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("penalty"), std::string_view::npos) << st;
  }
  EXPECT_EQ(MissPenaltyOffsetsHost(p.View(), 1.f, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
#if !KVRT_WITH_CUDA
  EXPECT_EQ(MissPenaltyOffsets(p.View(), 1.f, off.data(), nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
#endif
}

// The kernels load ahead of a decode step for every supported shape; a shape they do not support is
// refused by name, and without CUDA the call says so.
TEST(PreloadDirectStepKernels, LoadsSupportedShapesAndRefusesOthers) {
  EXPECT_EQ(PreloadDirectStepKernels(DType::kBF16, 128, 32, 0).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PreloadDirectStepKernels(DType::kBF16, 128, 30, 8).code(),
            absl::StatusCode::kInvalidArgument);
#if KVRT_WITH_CUDA
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16})
    for (int d : {64, 128, 256})
      for (auto [qh, kv] : {std::pair{32, 8}, std::pair{8, 1}, std::pair{64, 4}})
        EXPECT_TRUE(PreloadDirectStepKernels(t, d, qh, kv).ok()) << d << " " << qh << "/" << kv;
  const absl::Status bad = PreloadDirectStepKernels(DType::kBF16, 96, 32, 8);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
#else
  EXPECT_EQ(PreloadDirectStepKernels(DType::kBF16, 128, 32, 8).code(),
            absl::StatusCode::kFailedPrecondition);
#endif
}

TEST(CommitStagedHost, ArgumentChecks) {
  Problem p = MakeProblem(HostShapes()[0], 3);
  EXPECT_EQ(CommitStagedHost(p.View()).code(), absl::StatusCode::kInvalidArgument);  // not staged
  p.Stage(4);
  DirectRowsView v = p.View();
  v.stage_count = nullptr;
  EXPECT_EQ(CommitStagedHost(v).code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> o(static_cast<std::size_t>(p.qh) * p.sh.d), lse(p.qh);
  EXPECT_EQ(
      DirectAttendHost(v, p.mask.data(), p.q.data(), 0.f, o.data(), lse.data(), nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  v = p.View();
  v.stage_k = nullptr;
  EXPECT_EQ(CommitStagedHost(v).code(), absl::StatusCode::kInvalidArgument);
  v = p.View();
  p.stage_count[0] = 1;
  p.stage_row[0] = (int64_t{p.sh.kv} << 32) | 0;  // no such kv head
  EXPECT_EQ(CommitStagedHost(v).code(), absl::StatusCode::kInvalidArgument);
  p.stage_row[0] = 0;
  EXPECT_TRUE(CommitStagedHost(v).ok());
  EXPECT_EQ(p.stage_count[0], 0u);
#if !KVRT_WITH_CUDA
  EXPECT_EQ(CommitStaged(v, nullptr).code(), absl::StatusCode::kFailedPrecondition);
#endif
}

TEST(FillPagesHost, CopiesWholeBlocksAndClears) {
  Problem p = MakeProblem(HostShapes()[3], 11);
  const std::vector<int32_t> up = {static_cast<int32_t>(1 * p.bph + 2), 5, 0, 0,
                                   static_cast<int32_t>(2 * p.bph + 1), 7};
  ASSERT_TRUE(FillPagesHost(p.View(), up.data(), 3).ok());
  const std::size_t pb = kB * p.row_bytes;
  EXPECT_EQ(0, std::memcmp(p.pool_k.data() + 5 * pb, p.sk[1].data() + 2 * pb, pb));
  EXPECT_EQ(0, std::memcmp(p.pool_v.data() + 5 * pb, p.sv[1].data() + 2 * pb, pb));
  EXPECT_EQ(0, std::memcmp(p.pool_k.data(), p.sk[0].data(), pb));
  EXPECT_EQ(0, std::memcmp(p.pool_v.data() + 7 * pb, p.sv[2].data() + pb, pb));
  EXPECT_EQ(p.block_page[p.bph + 2], 5);
  EXPECT_EQ(p.block_page[0], 0);
  EXPECT_EQ(p.block_page[2 * p.bph + 1], 7);
  const std::vector<int32_t> clear = {0, -1};
  ASSERT_TRUE(FillPagesHost(p.View(), clear.data(), 1).ok());
  EXPECT_EQ(p.block_page[0], -1);
  EXPECT_EQ(p.block_page[p.bph + 2], 5);
  // The pool keeps the page's rows (only the table changed).
  EXPECT_EQ(0, std::memcmp(p.pool_k.data(), p.sk[0].data(), pb));
}

TEST(FillPagesHost, RefusesPartialBlocksAndBadUpdates) {
  Shape sh = HostShapes()[3];
  sh.tail = 19;  // rows = 16 C + 2E + 19: the last block is partial
  Problem p = MakeProblem(sh, 12);
  ASSERT_NE(p.rows % kB, 0);
  const int32_t last = static_cast<int32_t>(p.rows / kB);  // the partial block
  const auto table = p.block_page;
  const auto pool = p.pool_k;
  const std::vector<std::vector<int32_t>> bad = {
      {0, 1, last, 2},                           // partial block (after a good one)
      {0, static_cast<int32_t>(p.pages)},        // page >= pages
      {static_cast<int32_t>(sh.kv * p.bph), 1},  // entry past the table
      {-1, 1},                                   // negative entry
      {0, -2},                                   // page < -1
      {static_cast<int32_t>(p.bph - 1), 3},      // the spare entry: past rows
  };
  for (const auto& up : bad) {
    EXPECT_EQ(FillPagesHost(p.View(), up.data(), static_cast<int>(up.size() / 2)).code(),
              absl::StatusCode::kInvalidArgument)
        << up[0] << " " << up[1];
    EXPECT_EQ(p.block_page, table);  // nothing applied
    EXPECT_EQ(p.pool_k, pool);
  }
  // Clearing an entry past `rows` is allowed (no rows are copied).
  const std::vector<int32_t> clear = {last, -1};
  EXPECT_TRUE(FillPagesHost(p.View(), clear.data(), 1).ok());
  // The launcher checks what it can on the host.
  EXPECT_FALSE(FillPages(p.View(), nullptr, 1, nullptr).ok());
  EXPECT_FALSE(FillPages(p.View(), clear.data(), -1, nullptr).ok());
  DirectRowsView no_pool = p.View();
  no_pool.pages = 0;
  EXPECT_EQ(FillPages(no_pool, clear.data(), 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FillPagesHost(no_pool, clear.data(), 1).code(), absl::StatusCode::kInvalidArgument);
}

TEST(MarkSelectedHost, SetsGroupBitsAndIgnoresOutOfRangeIds) {
  const int kv = 2, qh = 6, c = 10;  // group 3
  // clang-format off
  const std::vector<int32_t> selected = {
      0, 4, 9, 10, 0, 0, 0, 0, 0, 0,       // head 0 (kv 0, bit 0): 10 is ignored
      4, 0, 0, 0, 0, 0, 0, 0, 0, 0,        // head 1 (kv 0, bit 1)
      1, 2, 3, 4, 5, 6, 7, 8, 9, 99,       // head 2 (kv 0, bit 2): count 0
      9, -1, 1000, 0, 0, 0, 0, 0, 0, 0,    // head 3 (kv 1, bit 0)
      2, 3, 0, 0, 0, 0, 0, 0, 0, 0,        // head 4 (kv 1, bit 1)
      0, 1, 2, 3, 4, 5, 6, 7, 8, 9,        // head 5 (kv 1, bit 2): all
  };
  // clang-format on
  const std::vector<int32_t> count = {4, 1, 0, 3, 2, 10};
  std::vector<uint32_t> mask(kv * c, 0xffffffffu);
  ASSERT_TRUE(MarkSelectedHost(selected.data(), count.data(), qh, kv, c, mask.data()).ok());
  std::vector<uint32_t> want(kv * c, 0);
  want[0] = 1;
  want[4] = 1 | 2;
  want[9] = 1;
  for (int j = 0; j < c; ++j) want[c + j] = 4;
  want[c + 9] |= 1;
  want[c + 2] |= 2;
  want[c + 3] |= 2;
  EXPECT_EQ(mask, want);
  // Argument checks (shared with the launcher).
  EXPECT_EQ(MarkSelectedHost(selected.data(), count.data(), 33, 1, c, mask.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MarkSelectedHost(selected.data(), count.data(), 5, 2, c, mask.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MarkSelected(selected.data(), count.data(), 5, 2, c, mask.data(), nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MarkSelectedHost(nullptr, nullptr, qh, kv, 0, nullptr).ok());
}

TEST(DirectAttendHost, ArgumentChecks) {
  Problem p = MakeProblem(HostShapes()[0], 13);
  std::vector<float> o(static_cast<std::size_t>(p.qh) * p.sh.d), lse(p.qh);
  auto code = [&](DirectRowsView v) {
    const auto a =
        DirectAttendHost(v, p.mask.data(), p.q.data(), 0.f, o.data(), lse.data(), nullptr).code();
    const auto b = DirectAttend(v, p.mask.data(), p.q.data(), 0.f, o.data(), lse.data(), nullptr,
                                nullptr, nullptr)
                       .code();
    EXPECT_EQ(a, b);
    return a;
  };
  DirectRowsView v = p.View();
  v.head_dim = 96;
  EXPECT_EQ(code(v), absl::StatusCode::kInvalidArgument);
  v = p.View();
  v.q_heads = 33 * v.kv_heads;  // group > kDirectMaxGroup
  EXPECT_EQ(code(v), absl::StatusCode::kInvalidArgument);
  v = p.View();
  v.blocks_per_head = p.rows / kB - 1;
  EXPECT_EQ(code(v), absl::StatusCode::kInvalidArgument);
  v = p.View();
  v.tail_begin = nullptr;
  EXPECT_EQ(code(v), absl::StatusCode::kInvalidArgument);
  // Data checks: the reference only (the kernel clamps / skips).
  v = p.View();
  std::vector<int32_t> bad_size = p.size;
  bad_size[0] = 10000;
  p.mask[0] |= 1;
  v.cluster_size = bad_size.data();
  EXPECT_EQ(
      DirectAttendHost(v, p.mask.data(), p.q.data(), 0.f, o.data(), lse.data(), nullptr).code(),
      absl::StatusCode::kInvalidArgument);
#if !KVRT_WITH_CUDA
  EXPECT_EQ(DirectAttend(p.View(), p.mask.data(), p.q.data(), 0.f, o.data(), lse.data(), nullptr,
                         nullptr, nullptr)
                .code(),
            absl::StatusCode::kFailedPrecondition);
#endif
}

// The batch form's checks: member count, one shape, each member's own arguments (named).
TEST(DirectAttendPartialBatch, ArgumentChecks) {
  Problem p = MakeProblem(HostShapes()[0], 14);
  std::vector<float> o(static_cast<std::size_t>(p.qh) * p.sh.d * kDirectAttendMaxSplits),
      lse(static_cast<std::size_t>(p.qh) * kDirectAttendMaxSplits);
  DirectAttendItem item{p.View(), p.mask.data(), p.q.data(), o.data(), lse.data(), nullptr};
  std::vector<DirectAttendItem> items(kDirectAttendBatchMax + 1, item);
  auto code = [&](int n) { return DirectAttendPartialBatch(items.data(), n, 0.f, nullptr).code(); };
  EXPECT_EQ(code(0), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(kDirectAttendBatchMax + 1), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DirectAttendPartialBatch(nullptr, 1, 0.f, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  items[2].v.head_dim = p.sh.d == 64 ? 128 : 64;
  const absl::Status shape = DirectAttendPartialBatch(items.data(), 3, 0.f, nullptr);
  EXPECT_EQ(shape.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(shape.message().find("member 2"), std::string::npos) << shape;
  items[2] = item;
  items[1].part_lse = nullptr;
  const absl::Status null_out = DirectAttendPartialBatch(items.data(), 3, 0.f, nullptr);
  EXPECT_EQ(null_out.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(null_out.message().find("member 1"), std::string::npos) << null_out;
  items[1] = item;
#if !KVRT_WITH_CUDA
  EXPECT_EQ(code(3), absl::StatusCode::kFailedPrecondition);
#endif
}

#if KVRT_WITH_CUDA
// Equal vectors, reporting the first difference only (pools are megabytes).
template <typename T>
::testing::AssertionResult Same(const std::vector<T>& a, const std::vector<T>& b,
                                const char* what) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << what << ": sizes differ";
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!(a[i] == b[i])) {
      return ::testing::AssertionFailure() << what << "[" << i << "]: " << +a[i] << " vs " << +b[i];
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult Close(const std::vector<float>& a, const std::vector<float>& b,
                                 double tol, const char* what) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (b[i] == kNegInf && a[i] == kNegInf) continue;
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    if (!(std::fabs(double(a[i]) - b[i]) <= tol * (1.0 + std::fabs(double(b[i]))))) {
      return ::testing::AssertionFailure() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
    }
  }
  return ::testing::AssertionSuccess();
}

// How the host store is made visible to the device.
enum class StoreMem { kHostAllocMapped, kRegisteredReadOnly };

// Host memory the device reads (mapped), holding `bytes` copied from src.
struct MappedBuffer {
  void* host = nullptr;
  void* dev = nullptr;
  bool registered = false;
  MappedBuffer(const void* src, std::size_t bytes, StoreMem mode) {
    if (mode == StoreMem::kHostAllocMapped) {
      EXPECT_EQ(cudaHostAlloc(&host, bytes, cudaHostAllocMapped), cudaSuccess);
    } else {
      // NOTE: read-only registration needs device support (cudaDevAttrHostRegisterReadOnly...);
      // without it the store is registered mapped only, which the kernel reads the same way.
      host = std::malloc(bytes);
      unsigned flags = cudaHostRegisterMapped;
      int dev_id = 0, ro = 0;
      cudaGetDevice(&dev_id);
      cudaDeviceGetAttribute(&ro, cudaDevAttrHostRegisterReadOnlySupported, dev_id);
      if (ro != 0) flags |= cudaHostRegisterReadOnly;
      std::memcpy(host, src, bytes);
      EXPECT_EQ(cudaHostRegister(host, bytes, flags), cudaSuccess);
      registered = true;
    }
    if (!registered) std::memcpy(host, src, bytes);
    EXPECT_EQ(cudaHostGetDevicePointer(&dev, host, 0), cudaSuccess);
  }
  ~MappedBuffer() {
    if (registered) {
      cudaHostUnregister(host);
      std::free(host);
    } else {
      cudaFreeHost(host);
    }
  }
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;
};

// The problem on the device: store in mapped host memory, everything else in device memory.
// The mask is made by the MarkSelected kernel.
struct DevProblem {
  DirectRowsView view;
  uint32_t* mask = nullptr;
  float* q = nullptr;
  std::vector<std::unique_ptr<MappedBuffer>> store;
  std::vector<void*> allocs;
  DevProblem(Problem& p, StoreMem mode) {
    view = p.View();
    std::vector<const void*> k_ptr, v_ptr;
    for (int g = 0; g < p.sh.kv; ++g) {
      store.push_back(std::make_unique<MappedBuffer>(p.sk[g].data(), p.sk[g].size(), mode));
      k_ptr.push_back(store.back()->dev);
      store.push_back(std::make_unique<MappedBuffer>(p.sv[g].data(), p.sv[g].size(), mode));
      v_ptr.push_back(store.back()->dev);
    }
    auto* sk = ToDevice(k_ptr);
    auto* sv = ToDevice(v_ptr);
    auto* bp = ToDevice(p.block_page);
    auto* pk = ToDevice(p.pool_k);
    auto* pv = ToDevice(p.pool_v);
    auto* cb = ToDevice(p.begin);
    auto* cs = ToDevice(p.size);
    auto* ex = ToDevice(p.extra);
    auto* tb = ToDevice(p.tail);
    auto* sel = ToDevice(p.selected);
    auto* cnt = ToDevice(p.count);
    mask = ToDevice(std::vector<uint32_t>(p.mask.size(), 0xabcdef01u));
    q = ToDevice(p.q);
    view.store_k = sk;
    view.store_v = sv;
    view.block_page = bp;
    view.pool_k = pk;
    view.pool_v = pv;
    view.cluster_begin = cb;
    view.cluster_size = cs;
    view.extra = p.extra.empty() ? nullptr : ex;
    view.tail_begin = tb;
    allocs = {sk, sv, bp, pk, pv, cb, cs, ex, tb, sel, cnt, mask, q};
    EXPECT_TRUE(MarkSelected(sel, cnt, p.qh, p.sh.kv, p.sh.clusters, mask, nullptr).ok());
    if (p.staged) {
      view.stage_k = ToDevice(p.stage_k);
      view.stage_v = ToDevice(p.stage_v);
      view.stage_row = ToDevice(p.stage_row);
      view.stage_count = ToDevice(p.stage_count);
      view.stage_commits = ToDevice(std::vector<uint32_t>{0});
      allocs.insert(allocs.end(), {view.stage_k, view.stage_v, view.stage_row, view.stage_count,
                                   view.stage_commits});
    }
  }
  ~DevProblem() {
    cudaDeviceSynchronize();
    for (void* ptr : allocs) cudaFree(ptr);
  }
};

Result RunDevice(DevProblem& dp, const Problem& p, bool own_workspace) {
  Result r;
  const std::size_t n = static_cast<std::size_t>(p.qh) * p.sh.d;
  float* o = ToDevice(std::vector<float>(n, 7.f));
  float* lse = ToDevice(std::vector<float>(p.qh, 7.f));
  int64_t* reads = ToDevice(std::vector<int64_t>(2, 0));
  float* ws = nullptr;
  if (own_workspace) {
    EXPECT_EQ(cudaMalloc(&ws, DirectAttendWorkspaceFloats(dp.view) * sizeof(float)), cudaSuccess);
  }
  EXPECT_TRUE(DirectAttend(dp.view, dp.mask, dp.q, 0.f, o, lse, reads, ws, nullptr).ok());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  r.o = ToHost(o, n);
  r.lse = ToHost(lse, p.qh);
  r.reads = ToHost(reads, 2);
  cudaFree(o);
  cudaFree(lse);
  cudaFree(reads);
  cudaFree(ws);
  return r;
}

// DirectAttendPartial, its split states merged by MergeStatesN (what the runtime's one merge of a
// step does with them beside its other states).
Result RunDevicePartial(DevProblem& dp, const Problem& p) {
  Result r;
  const int splits = DirectAttendSplits(dp.view);
  EXPECT_GE(splits, 1);
  EXPECT_LE(splits, kDirectAttendMaxSplits);
  const std::size_t n = static_cast<std::size_t>(p.qh) * p.sh.d;
  float* part_o = ToDevice(std::vector<float>(n * splits, 7.f));
  float* part_lse = ToDevice(std::vector<float>(std::size_t(p.qh) * splits, 7.f));
  float* o = ToDevice(std::vector<float>(n, 7.f));
  float* lse = ToDevice(std::vector<float>(p.qh, 7.f));
  int64_t* reads = ToDevice(std::vector<int64_t>(2, 0));
  EXPECT_TRUE(
      DirectAttendPartial(dp.view, dp.mask, dp.q, 0.f, part_o, part_lse, reads, nullptr).ok());
  EXPECT_TRUE(
      MergeStatesN(part_o, part_lse, splits, p.qh, p.sh.d, o, DType::kF32, lse, nullptr).ok());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  r.o = ToHost(o, n);
  r.lse = ToHost(lse, p.qh);
  r.reads = ToHost(reads, 2);
  for (void* x : {static_cast<void*>(part_o), static_cast<void*>(part_lse), static_cast<void*>(o),
                  static_cast<void*>(lse), static_cast<void*>(reads)})
    cudaFree(x);
  return r;
}

void ExpectKernelMatches(const Result& dev, const Result& ref) {
  EXPECT_TRUE(Close(dev.lse, ref.lse, kKernelTol, "lse"));
  EXPECT_TRUE(Close(dev.o, ref.o, kKernelTol, "o"));
  EXPECT_EQ(dev.reads, ref.reads);
}

// The same page updates through FillPagesHost and FillPages: the same table.
void FillBoth(Problem& p, DevProblem& dp, const std::vector<int32_t>& up) {
  const int n = static_cast<int>(up.size() / 2);
  ASSERT_TRUE(FillPagesHost(p.View(), up.data(), n).ok());
  int32_t* dup = ToDevice(up);
  ASSERT_TRUE(FillPages(dp.view, dup, n, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaFree(dup);
  EXPECT_TRUE(Same(ToHost(dp.view.block_page, p.block_page.size()), p.block_page, "table"));
}

const std::vector<Shape>& KernelShapes() {
  static const std::vector<Shape> shapes = {
      {2, 1, 64, DType::kBF16, 40, 6, 37},        {2, 4, 128, DType::kF32, 60, 9, 0},
      {1, 8, 128, DType::kBF16, 50, 0, 45},       {3, 4, 64, DType::kF32, 30, 5, 19},
      {2, 8, 64, DType::kBF16, 25, 7, 8},         {2, 4, 128, DType::kF16, 300, 40, 700},
      {2, 4, 256, DType::kBF16, 200, 30, 300},    {1, 32, 128, DType::kBF16, 120, 20, 100},
      {2, 6, 256, DType::kF32, 90, 11, 50},       {1, 32, 256, DType::kF16, 64, 8, 33},
      {2, 12, 128, DType::kBF16, 100, 10, 60},     // a group past the tier kernel's tile
      {8, 4, 128, DType::kBF16, 1200, 600, 3000},  // 64 splits
      {1, 2, 64, DType::kBF16, 20000, 600, 100},   // 312 clusters a split: two rounds
  };
  return shapes;
}

TEST(DirectAttendKernel, MatchesHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const Shape& sh : KernelShapes()) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 300 + sh.clusters);
    DevProblem dp(p, StoreMem::kHostAllocMapped);
    EXPECT_TRUE(Same(ToHost(dp.mask, p.mask.size()), p.mask, "mask"));  // vs MarkSelectedHost
    ExpectKernelMatches(RunDevice(dp, p, false), RunHost(p));
    ExpectKernelMatches(RunDevice(dp, p, true), RunHost(p));
    ExpectKernelMatches(RunDevicePartial(dp, p), RunHost(p));
  }
}

// The attention and the merge of its splits captured once in a CUDA graph (global mode, on a
// non-blocking stream) and replayed as decode steps would be: before each replay the caller writes
// the step's q and the store's row count (rows_now: the tail grows) into the buffers the graph
// reads. Each replay equals the host reference at that count and q; the read counts add up.
TEST(DirectAttendGraph, EachReplayReadsTheRowCountWrittenBeforeIt) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const Shape& sh : {Shape{2, 4, 128, DType::kBF16, 300, 40, 700},
                          Shape{8, 4, 128, DType::kBF16, 1200, 600, 3000}}) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 500 + sh.clusters);
    DevProblem dp(p, StoreMem::kHostAllocMapped);
    const int64_t full = p.rows;
    int64_t* rows_now = ToDevice(std::vector<int64_t>{full});
    const int splits = DirectAttendSplits(dp.view);
    const std::size_t n = static_cast<std::size_t>(p.qh) * p.sh.d;
    float* part_o = ToDevice(std::vector<float>(n * splits, 0.f));
    float* part_lse = ToDevice(std::vector<float>(static_cast<std::size_t>(p.qh) * splits, 0.f));
    float* o = ToDevice(std::vector<float>(n, 7.f));
    float* lse = ToDevice(std::vector<float>(p.qh, 7.f));
    int64_t* reads = ToDevice(std::vector<int64_t>(2, 0));
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    const absl::Status attend =
        DirectAttendPartial(dp.view, dp.mask, dp.q, 0.f, part_o, part_lse, reads, stream, rows_now);
    const absl::Status merge =
        MergeStatesN(part_o, part_lse, splits, p.qh, p.sh.d, o, DType::kF32, lse, stream);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_TRUE(attend.ok()) << attend;
    ASSERT_TRUE(merge.ok()) << merge;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    EXPECT_EQ(ToHost(lse, 1)[0], 7.f) << "the capture ran nothing";

    std::vector<int64_t> want_reads(2, 0);
    std::mt19937 rng(9);
    std::normal_distribution<float> nq(0.f, 0.5f);
    for (const int64_t now : {full - sh.tail + 1, full - sh.tail / 2, full}) {
      SCOPED_TRACE(::testing::Message() << "rows_now " << now);
      for (auto& x : p.q) x = nq(rng);
      ASSERT_EQ(cudaMemcpyAsync(dp.q, p.q.data(), p.q.size() * sizeof(float),
                                cudaMemcpyHostToDevice, stream),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpyAsync(rows_now, &now, sizeof now, cudaMemcpyHostToDevice, stream),
                cudaSuccess);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      p.rows = now;
      const Result ref = RunHost(p);
      p.rows = full;
      want_reads[0] += ref.reads[0];
      want_reads[1] += ref.reads[1];
      EXPECT_TRUE(Close(ToHost(lse, p.qh), ref.lse, kKernelTol, "lse"));
      EXPECT_TRUE(Close(ToHost(o, n), ref.o, kKernelTol, "o"));
      EXPECT_EQ(ToHost(reads, 2), want_reads);
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    for (void* x :
         {static_cast<void*>(rows_now), static_cast<void*>(part_o), static_cast<void*>(part_lse),
          static_cast<void*>(o), static_cast<void*>(lse), static_cast<void*>(reads)})
      cudaFree(x);
  }
}

// The batch form is each member's launch: members of one shape with their own stores, tables,
// stages, masks and row counts, launched together and one by one; split states bit for bit, the
// same read counts and staged rows, and (merged) the host reference's attention.
TEST(DirectAttendKernel, BatchIsEachMembersLaunch) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const Shape& base : {KernelShapes()[0], KernelShapes()[5], KernelShapes()[6],
                            KernelShapes()[7], KernelShapes()[10]}) {
    SCOPED_TRACE(Describe(base));
    constexpr int kMembers = 5;
    std::vector<Problem> ps;
    std::vector<std::unique_ptr<DevProblem>> dps;
    for (int i = 0; i < kMembers; ++i) {
      Shape sh = base;  // the same shape, other sizes
      sh.clusters = base.clusters + 37 * i;
      sh.tail = base.tail + 11 * i;
      ps.push_back(MakeProblem(sh, 700 + 13 * i));
      if (i % 2 == 1) ps.back().Stage(ps.back().rows * sh.kv);
    }
    for (int i = 0; i < kMembers; ++i) {
      dps.push_back(std::make_unique<DevProblem>(ps[i], StoreMem::kHostAllocMapped));
      if (i >= 2) {
        FillBoth(ps[i], *dps[i],
                 RandomUpdates(ps[i], static_cast<int>(ps[i].rows / kB / 2), 23 + i));
      }
    }
    // [form][member]: 0 one launch per member, 1 the batch.
    std::vector<float*> part_o[2], part_lse[2];
    std::vector<int64_t*> reads[2];
    std::vector<std::size_t> o_n(kMembers), lse_n(kMembers);
    std::vector<uint32_t> staged[2] = {std::vector<uint32_t>(kMembers, 0),
                                       std::vector<uint32_t>(kMembers, 0)};
    for (int form = 0; form < 2; ++form) {
      std::vector<DirectAttendItem> items;
      for (int i = 0; i < kMembers; ++i) {
        DevProblem& dp = *dps[i];
        const int splits = DirectAttendSplits(dp.view);
        lse_n[i] = static_cast<std::size_t>(splits) * ps[i].qh;
        o_n[i] = lse_n[i] * ps[i].sh.d;
        part_o[form].push_back(ToDevice(std::vector<float>(o_n[i], 7.f)));
        part_lse[form].push_back(ToDevice(std::vector<float>(lse_n[i], 7.f)));
        reads[form].push_back(ToDevice(std::vector<int64_t>(2, 0)));
        items.push_back(
            {dp.view, dp.mask, dp.q, part_o[form][i], part_lse[form][i], reads[form][i]});
        if (dp.view.staged_pages) {
          ASSERT_EQ(cudaMemset(dp.view.stage_count, 0, sizeof(uint32_t)), cudaSuccess);
        }
      }
      if (form == 0) {
        for (const DirectAttendItem& it : items) {
          ASSERT_TRUE(DirectAttendPartial(it.v, it.mask, it.q, 0.f, it.part_o, it.part_lse,
                                          it.read_rows, nullptr)
                          .ok());
        }
      } else {
        ASSERT_TRUE(DirectAttendPartialBatch(items.data(), kMembers, 0.f, nullptr).ok());
      }
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      for (int i = 0; i < kMembers; ++i)
        if (dps[i]->view.staged_pages) staged[form][i] = ToHost(dps[i]->view.stage_count, 1)[0];
    }
    for (int i = 0; i < kMembers; ++i) {
      EXPECT_EQ(staged[1][i], staged[0][i]) << "member " << i << ": rows staged";
      if (dps[i]->view.staged_pages) {
        EXPECT_GT(staged[1][i], 0u) << "member " << i;
      }
    }
    for (int i = 0; i < kMembers; ++i) {
      SCOPED_TRACE("member " + std::to_string(i));
      EXPECT_TRUE(Same(ToHost(part_o[1][i], o_n[i]), ToHost(part_o[0][i], o_n[i]), "part_o"));
      EXPECT_TRUE(
          Same(ToHost(part_lse[1][i], lse_n[i]), ToHost(part_lse[0][i], lse_n[i]), "part_lse"));
      EXPECT_EQ(ToHost(reads[1][i], 2), ToHost(reads[0][i], 2));
      // Merged, the batch's states are the host reference's attention.
      const int splits = DirectAttendSplits(dps[i]->view);
      const std::size_t n = static_cast<std::size_t>(ps[i].qh) * ps[i].sh.d;
      float* o = ToDevice(std::vector<float>(n, 7.f));
      float* lse = ToDevice(std::vector<float>(ps[i].qh, 7.f));
      ASSERT_TRUE(MergeStatesN(part_o[1][i], part_lse[1][i], splits, ps[i].qh, ps[i].sh.d, o,
                               DType::kF32, lse, nullptr)
                      .ok());
      Result dev;
      dev.o = ToHost(o, n);
      dev.lse = ToHost(lse, ps[i].qh);
      dev.reads = ToHost(reads[1][i], 2);
      const Result ref = RunHost(ps[i]);
      EXPECT_TRUE(Close(dev.lse, ref.lse, kKernelTol, "lse"));
      EXPECT_TRUE(Close(dev.o, ref.o, kKernelTol, "o"));
      EXPECT_EQ(dev.reads, ref.reads);
      for (void* x : {static_cast<void*>(o), static_cast<void*>(lse)}) cudaFree(x);
    }
    for (int form = 0; form < 2; ++form)
      for (int i = 0; i < kMembers; ++i)
        for (void* x : {static_cast<void*>(part_o[form][i]), static_cast<void*>(part_lse[form][i]),
                        static_cast<void*>(reads[form][i])})
          cudaFree(x);
  }
}

// Pages filled by both FillPages and FillPagesHost: same pool and table, same attention.
TEST(DirectAttendKernel, PoolReadsMatchHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const Shape& sh : KernelShapes()) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 400 + sh.clusters);
    DevProblem dp(p, StoreMem::kHostAllocMapped);
    FillBoth(p, dp, RandomUpdates(p, static_cast<int>(p.rows / kB * 2 / 3), 17));
    EXPECT_TRUE(Same(ToHost(static_cast<unsigned char*>(dp.view.pool_k), p.pool_k.size()), p.pool_k,
                     "pool_k"));
    EXPECT_TRUE(Same(ToHost(static_cast<unsigned char*>(dp.view.pool_v), p.pool_v.size()), p.pool_v,
                     "pool_v"));
    const Result ref = RunHost(p);
    EXPECT_GT(ref.reads[0], 0);
    ExpectKernelMatches(RunDevice(dp, p, true), ref);
  }
}

// Staged pages on the device and the host: same reads and attention at both steps, same table
// and pool after CommitStaged (a stage that holds every miss: its slot order does not matter).
// With a stage of 7 rows the device keeps other rows than the host: its table and pool, copied
// back, hold the store's rows and give the host reference's attention.
TEST(DirectAttendKernel, StagedPagesMatchHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const Shape& sh : KernelShapes()) {
    for (const int64_t cap : {int64_t{-1}, int64_t{7}}) {
      SCOPED_TRACE(Describe(sh) + " cap " + std::to_string(cap));
      Problem p = MakeProblem(sh, 450 + sh.clusters);
      p.Stage(cap < 0 ? p.rows * sh.kv : cap);
      DevProblem dp(p, StoreMem::kHostAllocMapped);
      auto up = RandomUpdates(p, static_cast<int>(p.rows / kB * 2 / 3), 19);
      for (std::size_t i = 1; i < up.size(); i += 6) up[i] |= kFillPagesCopy;  // a third copied
      FillBoth(p, dp, up);
      ExpectKernelMatches(RunDevice(dp, p, true), RunHost(p));
      EXPECT_EQ(ToHost(dp.view.stage_count, 1), p.stage_count);
      // The staged rows whose blocks hold pages: what the commit must put in (the device keeps
      // other rows than the host when the stage is short).
      int64_t paged = 0;
      const int64_t kept = std::min<int64_t>(p.stage_count[0], p.stage_cap);
      for (int64_t id : ToHost(dp.view.stage_row, kept)) {
        const int64_t g = id >> 32, r = id & 0xffffffff;
        paged += p.block_page[g * p.bph + r / kB] != -1 ? 1 : 0;
      }
      ASSERT_TRUE(CommitStaged(dp.view, nullptr).ok());
      ASSERT_TRUE(CommitStagedHost(p.View()).ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      // Reset by the kernel's last CTA (stage_commits), its counter back to zero.
      EXPECT_EQ(ToHost(dp.view.stage_count, 1)[0], 0u);
      EXPECT_EQ(ToHost(dp.view.stage_commits, 1)[0], 0u);
      const auto table = ToHost(dp.view.block_page, p.block_page.size());
      const auto pool_k = ToHost(static_cast<unsigned char*>(dp.view.pool_k), p.pool_k.size());
      const auto pool_v = ToHost(static_cast<unsigned char*>(dp.view.pool_v), p.pool_v.size());
      if (cap < 0) {
        EXPECT_TRUE(Same(table, p.block_page, "table"));
        EXPECT_TRUE(Same(pool_k, p.pool_k, "pool_k"));
        EXPECT_TRUE(Same(pool_v, p.pool_v, "pool_v"));
      } else {
        p.block_page = table;
        p.pool_k = pool_k;
        p.pool_v = pool_v;
      }
      int64_t copies = 0;
      for (std::size_t i = 1; i < up.size(); i += 2) copies += (up[i] & kFillPagesCopy) != 0;
      EXPECT_EQ(ExpectStagedRowsAreTheStores(p), paged + copies * kB);
      const Result ref = RunHost(p);
      EXPECT_EQ(ref.reads, ReadsByTable(p));
      EXPECT_GE(ref.reads[0], paged);  // the same rows again: those committed come from the pool
      ExpectKernelMatches(RunDevice(dp, p, true), ref);
    }
  }
}

// The residency-aware selection's offsets on the device: the host reference's, bit for bit, over
// a table of whole, assigned-only and partly staged pages.
TEST(MissPenaltyKernel, MatchesHostReference) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const Shape& sh : KernelShapes()) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 640 + sh.clusters);
    p.Stage(p.rows * sh.kv);
    DevProblem dp(p, StoreMem::kHostAllocMapped);
    auto up = RandomUpdates(p, static_cast<int>(p.rows / kB / 2), 23);
    for (std::size_t i = 1; i < up.size(); i += 6) up[i] |= kFillPagesCopy;
    FillBoth(p, dp, up);
    RunDevice(dp, p, true);
    RunHost(p);
    ASSERT_TRUE(CommitStaged(dp.view, nullptr).ok());
    ASSERT_TRUE(CommitStagedHost(p.View()).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    p.block_page = ToHost(dp.view.block_page, p.block_page.size());  // the device's staged rows
    const std::size_t n = static_cast<std::size_t>(sh.kv) * sh.clusters;
    std::vector<float> want(n);
    ASSERT_TRUE(MissPenaltyOffsetsHost(p.View(), 0.75f, want.data()).ok());
    float* off = ToDevice(std::vector<float>(n, -1.f));
    ASSERT_TRUE(MissPenaltyOffsets(dp.view, 0.75f, off, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_TRUE(Same(ToHost(off, n), want, "offset"));
    cudaFree(off);
  }
}

// A store registered with cudaHostRegister (mapped, read-only where supported) on plain memory.
TEST(DirectAttendKernel, RegisteredHostStore) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const Shape& sh : {KernelShapes()[1], KernelShapes()[5], KernelShapes()[6]}) {
    SCOPED_TRACE(Describe(sh));
    Problem p = MakeProblem(sh, 500 + sh.clusters);
    DevProblem dp(p, StoreMem::kRegisteredReadOnly);
    ExpectKernelMatches(RunDevice(dp, p, true), RunHost(p));
  }
}

// A NaN key, then a NaN value, in an extra row of kv head 0: its group's heads NaN, the other kv
// head's not; on the scalar kernel (f32) and the tensor-core one (f16, bf16).
TEST(DirectAttendKernel, NanRowPropagates) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  for (const int shape : {1, 5, 0}) {
    for (const bool in_value : {false, true}) {
      SCOPED_TRACE(Describe(KernelShapes()[shape]) + (in_value ? " NaN value" : " NaN key"));
      Problem p = MakeProblem(KernelShapes()[shape], 8);
      const int32_t r = p.extra[0];
      ASSERT_GE(r, 0);
      std::vector<float> x(p.sh.d, 0.f);
      x[3] = std::numeric_limits<float>::quiet_NaN();
      ConvertFromF32(x.data(), x.size(), p.sh.t,
                     (in_value ? p.sv[0] : p.sk[0]).data() + r * p.row_bytes);
      DevProblem dp(p, StoreMem::kHostAllocMapped);
      const Result dev = RunDevice(dp, p, true);
      for (int j = 0; j < p.sh.group; ++j) {
        const float o3 = dev.o[static_cast<std::size_t>(j) * p.sh.d + 3];
        EXPECT_TRUE(in_value ? std::isnan(o3) : std::isnan(dev.lse[j])) << j;
      }
      EXPECT_FALSE(std::isnan(dev.lse[p.sh.group]));
      EXPECT_FALSE(std::isnan(dev.o[static_cast<std::size_t>(p.sh.group) * p.sh.d + 3]));
      ExpectKernelMatches(dev, RunHost(p));
    }
  }
}

// Updates the host reference refuses are skipped by the kernel; -1 clears.
TEST(FillPagesKernel, SkipsInvalidUpdatesAndClears) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  Shape sh = KernelShapes()[3];
  Problem p = MakeProblem(sh, 600);
  ASSERT_NE(p.rows % kB, 0);
  DevProblem dp(p, StoreMem::kHostAllocMapped);
  const int32_t last = static_cast<int32_t>(p.rows / kB);
  const std::vector<int32_t> first = {0, 4, static_cast<int32_t>(p.bph + 1), 6};
  const std::vector<int32_t> second = {
      last,
      1,  // partial block: skipped
      1,
      static_cast<int32_t>(p.pages),  // page >= pages: skipped
      static_cast<int32_t>(sh.kv * p.bph),
      2,  // past the table: skipped
      0,
      -1,  // clears
      2,
      -2,  // page < -1: skipped
  };
  ASSERT_TRUE(FillPagesHost(p.View(), first.data(), 2).ok());
  int32_t* d1 = ToDevice(first);
  int32_t* d2 = ToDevice(second);
  ASSERT_TRUE(FillPages(dp.view, d1, 2, nullptr).ok());
  ASSERT_TRUE(FillPages(dp.view, d2, 5, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaFree(d1);
  cudaFree(d2);
  p.block_page[0] = -1;  // the one valid update of the second call
  EXPECT_TRUE(Same(ToHost(dp.view.block_page, p.block_page.size()), p.block_page, "table"));
  EXPECT_TRUE(Same(ToHost(static_cast<unsigned char*>(dp.view.pool_k), p.pool_k.size()), p.pool_k,
                   "pool_k"));
}

// Fills a store of n bytes quickly (the timing does not need normal values): bf16 in [-1, 1).
void FillBf16(uint16_t* p, std::size_t n, uint32_t seed) {
  uint32_t x = seed | 1u;
  for (std::size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p[i] = F32ToBf16(static_cast<float>(x >> 8) / float(1 << 23) - 1.f);
  }
}

// 128K context of an 8B model: 8 kv heads, 32 q heads, d = 128, bf16; 8192 clusters of 16 per
// kv head (the last 288 padding, so that the 512 extra rows and the 4096-row tail fit in 131072
// rows), ~160 clusters per q head (60% shared in its group).
TEST(DirectAttendKernel, Timing128K) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  const int kv = 8, group = 4, qh = kv * group, d = 128, c_n = 8192, e_n = 512, tail = 4096;
  const int64_t rows = 131072, real = (rows - e_n - tail) / 16;  // 7904 clusters hold rows
  const std::size_t row_bytes = d * 2, head_bytes = rows * row_bytes;
  void* host_k = nullptr;
  void* host_v = nullptr;
  ASSERT_EQ(cudaHostAlloc(&host_k, kv * head_bytes, cudaHostAllocMapped), cudaSuccess);
  ASSERT_EQ(cudaHostAlloc(&host_v, kv * head_bytes, cudaHostAllocMapped), cudaSuccess);
  FillBf16(static_cast<uint16_t*>(host_k), kv * head_bytes / 2, 1);
  FillBf16(static_cast<uint16_t*>(host_v), kv * head_bytes / 2, 2);
  std::vector<const void*> k_ptr, v_ptr;
  for (int g = 0; g < kv; ++g) {
    void* dk = nullptr;
    void* dv = nullptr;
    cudaHostGetDevicePointer(&dk, static_cast<char*>(host_k) + g * head_bytes, 0);
    cudaHostGetDevicePointer(&dv, static_cast<char*>(host_v) + g * head_bytes, 0);
    k_ptr.push_back(dk);
    v_ptr.push_back(dv);
  }
  std::mt19937 rng(3);
  std::vector<int32_t> begin, size, extra, selected(static_cast<std::size_t>(qh) * c_n, 0),
      count(qh, 0);
  std::vector<int64_t> tail_begin(kv, rows - tail);
  for (int g = 0; g < kv; ++g) {
    for (int c = 0; c < c_n; ++c) {
      begin.push_back(16 * c);
      size.push_back(c < real ? 16 : 0);
    }
    for (int e = 0; e < e_n; ++e) extra.push_back(static_cast<int32_t>(16 * real + e));
    std::vector<int32_t> ids(real);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    const int shared = 96, own = 64;  // 160 per q head, 60% shared
    for (int j = 0; j < group; ++j) {
      std::vector<int32_t> sel(ids.begin(), ids.begin() + shared);
      sel.insert(sel.end(), ids.begin() + shared + j * own, ids.begin() + shared + (j + 1) * own);
      std::sort(sel.begin(), sel.end());
      const int h = g * group + j;
      std::copy(sel.begin(), sel.end(), selected.begin() + static_cast<std::size_t>(h) * c_n);
      count[h] = static_cast<int32_t>(sel.size());
    }
  }
  const int64_t bph = rows / kB, pages = kv * bph;
  DirectRowsView v;
  v.kv_heads = kv;
  v.q_heads = qh;
  v.head_dim = d;
  v.dtype = DType::kBF16;
  v.rows = rows;
  auto* dk = ToDevice(k_ptr);
  auto* dv = ToDevice(v_ptr);
  v.store_k = dk;
  v.store_v = dv;
  int32_t* bp = ToDevice(std::vector<int32_t>(kv * bph, -1));
  v.block_page = bp;
  v.blocks_per_head = bph;
  ASSERT_EQ(cudaMalloc(&v.pool_k, pages * kB * row_bytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&v.pool_v, pages * kB * row_bytes), cudaSuccess);
  v.pages = pages;
  auto* cb = ToDevice(begin);
  auto* cs = ToDevice(size);
  auto* ex = ToDevice(extra);
  auto* tb = ToDevice(tail_begin);
  v.cluster_begin = cb;
  v.cluster_size = cs;
  v.num_clusters = c_n;
  v.extra = ex;
  v.num_extra = e_n;
  v.tail_begin = tb;
  auto* sel = ToDevice(selected);
  auto* cnt = ToDevice(count);
  uint32_t* mask = ToDevice(std::vector<uint32_t>(kv * c_n, 0));
  std::normal_distribution<float> nq(0.f, 0.5f);
  std::vector<float> qv(static_cast<std::size_t>(qh) * d);
  for (auto& x : qv) x = nq(rng);
  float* q = ToDevice(qv);
  float* o = ToDevice(std::vector<float>(static_cast<std::size_t>(qh) * d));
  float* lse = ToDevice(std::vector<float>(qh));
  int64_t* reads = ToDevice(std::vector<int64_t>(2, 0));
  float* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, DirectAttendWorkspaceFloats(v) * sizeof(float)), cudaSuccess);
  ASSERT_TRUE(MarkSelected(sel, cnt, qh, kv, c_n, mask, nullptr).ok());

  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  auto time_attend = [&](const char* what, int iters) {
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(DirectAttend(v, mask, q, 0.f, o, lse, nullptr, ws, nullptr).ok());
    }
    cudaMemset(reads, 0, 2 * sizeof(int64_t));
    ASSERT_TRUE(DirectAttend(v, mask, q, 0.f, o, lse, reads, ws, nullptr).ok());
    const auto n = ToHost(reads, 2);
    cudaEventRecord(e0);
    for (int i = 0; i < iters; ++i)
      (void)DirectAttend(v, mask, q, 0.f, o, lse, nullptr, ws, nullptr);
    cudaEventRecord(e1);
    ASSERT_EQ(cudaEventSynchronize(e1), cudaSuccess);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    const double us = 1e3 * ms / iters, bytes = 2.0 * (n[0] + n[1]) * row_bytes;
    std::printf(
        "[direct attend 128K, %s] %.1f us per call; rows pool %lld host %lld (%.1f MB): "
        "%.1f GB/s\n",
        what, us, static_cast<long long>(n[0]), static_cast<long long>(n[1]), bytes / 1e6,
        bytes / (us * 1e-6) / 1e9);
  };
  time_attend("all from host", 20);

  // Every block paged (one FillPages call), then all rows come from the pool.
  std::vector<int32_t> all;
  for (int64_t i = 0; i < kv * bph; ++i) {
    all.push_back(static_cast<int32_t>(i));
    all.push_back(static_cast<int32_t>(i));
  }
  int32_t* dall = ToDevice(all);
  ASSERT_TRUE(FillPages(v, dall, static_cast<int>(kv * bph), nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  time_attend("all from pool", 200);
  // The same without the selected clusters (the tail and the extra rows only), then without any
  // row: the kernel's cost per row against its fixed cost (launch, segment lists, merges).
  ASSERT_EQ(cudaMemset(mask, 0, sizeof(uint32_t) * kv * c_n), cudaSuccess);
  time_attend("all from pool, tail and extra rows only", 200);
  const DirectRowsView full = v;
  int64_t* no_tail = ToDevice(std::vector<int64_t>(kv, rows));
  v.tail_begin = no_tail;
  v.num_extra = 0;
  time_attend("no rows", 200);
  v = full;
  cudaFree(no_tail);
  ASSERT_TRUE(MarkSelected(sel, cnt, qh, kv, c_n, mask, nullptr).ok());

  // FillPages of 2000 blocks per kv head (pages rewritten in place).
  std::vector<int32_t> some;
  for (int g = 0; g < kv; ++g) {
    for (int b = 0; b < 2000; ++b) {
      const int32_t idx = static_cast<int32_t>(g * bph + b * 8 + g);
      some.push_back(idx);
      some.push_back(idx);
    }
  }
  int32_t* dsome = ToDevice(some);
  const int n_up = static_cast<int>(some.size() / 2), iters = 20;
  ASSERT_TRUE(FillPages(v, dsome, n_up, nullptr).ok());
  cudaEventRecord(e0);
  for (int i = 0; i < iters; ++i) (void)FillPages(v, dsome, n_up, nullptr);
  cudaEventRecord(e1);
  ASSERT_EQ(cudaEventSynchronize(e1), cudaSuccess);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  const double us = 1e3 * ms / iters, bytes = 2.0 * n_up * kB * row_bytes;
  std::printf("[fill pages, 2000 blocks x %d kv heads] %.1f us per call (%.1f MB): %.1f GB/s\n", kv,
              us, bytes / 1e6, bytes / (us * 1e-6) / 1e9);

  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  for (void* ptr : std::vector<void*>{dk, dv, bp, v.pool_k, v.pool_v, cb, cs, ex, tb, sel, cnt,
                                      mask, q, o, lse, reads, ws, dall, dsome}) {
    cudaFree(ptr);
  }
  cudaFreeHost(host_k);
  cudaFreeHost(host_v);
}
#endif

}  // namespace
}  // namespace kvrt::gpu
