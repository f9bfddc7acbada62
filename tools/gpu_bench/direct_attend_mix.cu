// direct_attend_mix: where the direct step's time goes when some of its rows come over PCIe
// (docs/benchmarks.md). `bench decode --trace` at 128K reads ~14% of its rows from the host store
// (5.6 MB of 39 MB) and its DirectAttend takes ~250 us, twice what those bytes cost at the PCIe
// speed the same kernel reaches when every row is on the host. This times DirectAttend (the
// public launcher, as the runtime calls it) on the 128K shape of an 8B model with the same mix,
// varying one thing at a time:
//   - the host store: cudaHostAlloc'd (mapped) or plain memory (2 MiB-aligned, MADV_HUGEPAGE)
//     registered with cudaHostRegister, as the runtime's stores are;
//   - which rows miss: whole selected clusters (a step that turns to new clusters) or single 8-row
//     blocks scattered over the selection;
//   - where the selection lies: spread over all clusters, or inside one eighth of them (a
//     split of the kernel takes a fixed range of clusters, so this loads a few splits).
// And, for the 25% case, 4 and 16 members at once (a batch step's attentions), each with its own
// host stores, outputs and stream: whether their host reads add up to the link.
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvrt_gpu/direct_attend.h"
#include "parts_harness.h"

namespace {

namespace g = kvrt::gpu;
namespace b = kvrt::gpu_bench;
constexpr const char* kTool = "direct_attend_mix";
constexpr int kKv = 8, kGroup = 4, kQh = kKv * kGroup, kD = 128, kClusters = 8192, kExtra = 512,
              kTail = 4096;
constexpr int64_t kRows = 131072;
constexpr int kReal = static_cast<int>((kRows - kExtra - kTail) / 16);  // clusters holding rows
constexpr int kB = g::kDirectBlockRows;
constexpr int64_t kBph = kRows / kB;
constexpr std::size_t kRowBytes = kD * 2, kHeadBytes = kRows * kRowBytes;

// The K or V store of all kv heads: cudaHostAlloc'd, or plain memory registered mapped.
struct HostStore {
  void* p = nullptr;
  bool registered = false;
  bool Make(bool register_plain) {
    const std::size_t bytes = kKv * kHeadBytes;
    registered = register_plain;
    if (!register_plain)
      return b::CudaOk(kTool, cudaHostAlloc(&p, bytes, cudaHostAllocMapped), "cudaHostAlloc");
    if (posix_memalign(&p, std::size_t{2} << 20, bytes) != 0) return false;
#ifdef MADV_HUGEPAGE
    (void)madvise(p, bytes, MADV_HUGEPAGE);
#endif
    std::memset(p, 0x3c, bytes);  // faulted in before registering, as the runtime's Prefault
    return b::CudaOk(kTool, cudaHostRegister(p, bytes, cudaHostRegisterMapped), "cudaHostRegister");
  }
  ~HostStore() {
    if (p == nullptr) return;
    if (registered) {
      cudaHostUnregister(p);
      std::free(p);
    } else {
      cudaFreeHost(p);
    }
  }
  const void* Head(int h) const {
    void* dev = nullptr;
    cudaHostGetDevicePointer(&dev, static_cast<char*>(p) + h * kHeadBytes, 0);
    return dev;
  }
};

struct Case {
  const char* name;
  bool register_plain;
  double miss;       // fraction of the selected clusters (or blocks) read from the host
  bool miss_blocks;  // scattered 8-row blocks instead of whole clusters
  bool skewed;       // the selection inside one eighth of the clusters
};

// m members of v's shape launched together, each on its own stream with its own registered host
// stores: the time for all m, per member, and the host bytes' aggregate rate.
bool TimeMembers(const g::DirectRowsView& v, const uint32_t* mask, const float* q, int m, int iters,
                 double host_mb_each) {
  bool ok = true;
  std::vector<HostStore> stores(2 * static_cast<std::size_t>(m));
  std::vector<g::DirectRowsView> views(m, v);
  std::vector<float*> o(m), lse(m), ws(m);
  std::vector<cudaStream_t> streams(m);
  std::vector<void*> arrays;
  for (int i = 0; i < m && ok; ++i) {
    ok = stores[2 * i].Make(true) && stores[2 * i + 1].Make(true);
    std::vector<const void*> kp, vp;
    for (int h = 0; ok && h < kKv; ++h)
      kp.push_back(stores[2 * i].Head(h)), vp.push_back(stores[2 * i + 1].Head(h));
    views[i].store_k = b::Upload(kTool, kp, &ok);
    views[i].store_v = b::Upload(kTool, vp, &ok);
    arrays.push_back(const_cast<void**>(views[i].store_k));
    arrays.push_back(const_cast<void**>(views[i].store_v));
    o[i] = b::Alloc<float>(kTool, static_cast<std::size_t>(kQh) * kD, &ok);
    lse[i] = b::Alloc<float>(kTool, kQh, &ok);
    ws[i] = b::Alloc<float>(kTool, g::DirectAttendWorkspaceFloats(v), &ok);
    ok = ok && b::CudaOk(kTool, cudaStreamCreate(&streams[i]), "cudaStreamCreate");
  }
  double us = -1.0;
  if (ok) {
    // Blocking streams: the legacy default stream's timing events order them.
    us = b::TimeUs(kTool, "members", iters, [&] {
      for (int i = 0; i < m; ++i)
        (void)g::DirectAttend(views[i], mask, q, 0.f, o[i], lse[i], nullptr, ws[i], streams[i]);
    });
  }
  if (us >= 0)
    std::printf(
        "  %2d members at once, each 25%% of its clusters from its own host stores      "
        "%7.1f us | %6.1f us per member, host %6.1f MB in all at %.1f GB/s\n",
        m, us, us / m, host_mb_each * m, host_mb_each * m / us * 1e3);
  for (int i = 0; i < m; ++i) {
    if (streams[i] != nullptr) cudaStreamDestroy(streams[i]);
    cudaFree(o[i]);
    cudaFree(lse[i]);
    cudaFree(ws[i]);
  }
  for (void* a : arrays) cudaFree(a);
  return ok && us >= 0;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t unused = 1;
  int iters = 200;
  if (const int rc = b::ParsePartsArgs(
          argc, argv, kTool, "seed", "of the selection; 1",
          "Times DirectAttend on the 128K shape with part of its rows read from the host store.",
          &unused, &iters);
      rc >= 0) {
    return rc;
  }
  const Case cases[] = {
      {"all rows from the pool", false, 0.0, false, false},
      {"all selected clusters from the host (cudaHostAlloc)", false, 1.0, false, false},
      {"all selected clusters from the host (registered)", true, 1.0, false, false},
      {"25% of selected clusters from the host (cudaHostAlloc)", false, 0.25, false, false},
      {"25% of selected clusters from the host (registered)", true, 0.25, false, false},
      {"25% of selected blocks from the host (registered)", true, 0.25, true, false},
      {"25% of selected clusters from the host, selection in 1/8 (registered)", true, 0.25, false,
       true},
  };
  bool ok = true;
  // Pool: a page for every block (page = block index), so any mix is a table of -1s and pages.
  const int64_t pages = kKv * kBph;
  void* pool_k = b::Alloc<unsigned char>(kTool, pages * kB * kRowBytes, &ok);
  void* pool_v = b::Alloc<unsigned char>(kTool, pages * kB * kRowBytes, &ok);
  ok = ok && b::CudaOk(kTool, cudaMemset(pool_k, 0x3c, pages * kB * kRowBytes), "pool") &&
       b::CudaOk(kTool, cudaMemset(pool_v, 0x3c, pages * kB * kRowBytes), "pool");
  std::vector<int32_t> begin, size, extra;
  for (int h = 0; h < kKv; ++h) {
    for (int c = 0; c < kClusters; ++c) {
      begin.push_back(16 * c);
      size.push_back(c < kReal ? 16 : 0);
    }
    for (int e = 0; e < kExtra; ++e) extra.push_back(16 * kReal + e);
  }
  std::vector<float> qv(static_cast<std::size_t>(kQh) * kD);
  for (std::size_t i = 0; i < qv.size(); ++i) qv[i] = 0.01f * static_cast<float>(i % 97) - 0.4f;
  int32_t* d_begin = b::Upload(kTool, begin, &ok);
  int32_t* d_size = b::Upload(kTool, size, &ok);
  int32_t* d_extra = b::Upload(kTool, extra, &ok);
  int64_t* d_tail = b::Upload(kTool, std::vector<int64_t>(kKv, kRows - kTail), &ok);
  float* q = b::Upload(kTool, qv, &ok);
  float* o = b::Alloc<float>(kTool, qv.size(), &ok);
  float* lse = b::Alloc<float>(kTool, kQh, &ok);
  int64_t* reads = b::Alloc<int64_t>(kTool, 2, &ok);
  uint32_t* mask = b::Alloc<uint32_t>(kTool, kKv * kClusters, &ok);
  int32_t* table = b::Alloc<int32_t>(kTool, kKv * kBph, &ok);
  int32_t* sel = b::Alloc<int32_t>(kTool, static_cast<std::size_t>(kQh) * kClusters, &ok);
  int32_t* cnt = b::Alloc<int32_t>(kTool, kQh, &ok);
  if (!ok) return 1;
  std::printf(
      "%s: 8 kv / 32 q heads, d=128, bf16, 131072 rows per kv head, %d clusters of 16, "
      "160 selected per q head (60%% shared in its group), %d extra and %d tail rows (in "
      "the pool); %d launches per case\n",
      kTool, kClusters, kExtra, kTail, iters);
  for (const Case& cs : cases) {
    HostStore hk, hv;
    if (!hk.Make(cs.register_plain) || !hv.Make(cs.register_plain)) return 1;
    std::vector<const void*> kp, vp;
    for (int h = 0; h < kKv; ++h) kp.push_back(hk.Head(h)), vp.push_back(hv.Head(h));
    const void* const* d_k = b::Upload(kTool, kp, &ok);
    const void* const* d_v = b::Upload(kTool, vp, &ok);
    // Selection: per kv head 96 shared + 64 own clusters per q head, from all real clusters or
    // from the first eighth; then the misses.
    std::mt19937 rng(static_cast<uint32_t>(unused));
    std::vector<int32_t> selected(static_cast<std::size_t>(kQh) * kClusters, 0), count(kQh, 0);
    std::vector<int32_t> page(kKv * kBph);
    std::iota(page.begin(), page.end(), 0);
    for (int h = 0; h < kKv; ++h) {
      std::vector<int32_t> ids(cs.skewed ? kReal / 8 : kReal);
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      const int shared = 96, own = 64;
      std::vector<int32_t> uni(ids.begin(), ids.begin() + shared + kGroup * own);
      for (int j = 0; j < kGroup; ++j) {
        std::vector<int32_t> s(ids.begin(), ids.begin() + shared);
        s.insert(s.end(), ids.begin() + shared + j * own, ids.begin() + shared + (j + 1) * own);
        std::sort(s.begin(), s.end());
        const int qhd = h * kGroup + j;
        std::copy(s.begin(), s.end(), selected.begin() + static_cast<std::size_t>(qhd) * kClusters);
        count[qhd] = static_cast<int32_t>(s.size());
      }
      std::shuffle(uni.begin(), uni.end(), rng);
      if (cs.miss_blocks) {
        std::vector<int64_t> blocks;
        for (int32_t c : uni)
          for (int k = 0; k < 16 / kB; ++k) blocks.push_back(int64_t{c} * 16 / kB + k);
        std::shuffle(blocks.begin(), blocks.end(), rng);
        const auto n = static_cast<std::size_t>(cs.miss * static_cast<double>(blocks.size()));
        for (std::size_t i = 0; i < n; ++i) page[h * kBph + blocks[i]] = -1;
      } else {
        const auto n = static_cast<std::size_t>(cs.miss * static_cast<double>(uni.size()));
        for (std::size_t i = 0; i < n; ++i)
          for (int k = 0; k < 16 / kB; ++k) page[h * kBph + int64_t{uni[i]} * 16 / kB + k] = -1;
      }
    }
    ok = ok &&
         b::CudaOk(kTool,
                   cudaMemcpy(sel, selected.data(), selected.size() * 4, cudaMemcpyHostToDevice),
                   "sel") &&
         b::CudaOk(kTool, cudaMemcpy(cnt, count.data(), count.size() * 4, cudaMemcpyHostToDevice),
                   "cnt") &&
         b::CudaOk(kTool, cudaMemcpy(table, page.data(), page.size() * 4, cudaMemcpyHostToDevice),
                   "table");
    if (!ok) return 1;
    g::DirectRowsView v;
    v.kv_heads = kKv;
    v.q_heads = kQh;
    v.head_dim = kD;
    v.dtype = kvrt::DType::kBF16;
    v.rows = kRows;
    v.store_k = d_k;
    v.store_v = d_v;
    v.block_page = table;
    v.blocks_per_head = kBph;
    v.pool_k = pool_k;
    v.pool_v = pool_v;
    v.pages = pages;
    v.cluster_begin = d_begin;
    v.cluster_size = d_size;
    v.num_clusters = kClusters;
    v.extra = d_extra;
    v.num_extra = kExtra;
    v.tail_begin = d_tail;
    float* ws = b::Alloc<float>(kTool, g::DirectAttendWorkspaceFloats(v), &ok);
    if (!ok || !g::MarkSelected(sel, cnt, kQh, kKv, kClusters, mask, nullptr).ok()) return 1;
    ok = b::CudaOk(kTool, cudaMemset(reads, 0, 16), "reads") &&
         g::DirectAttend(v, mask, q, 0.f, o, lse, reads, ws, nullptr).ok();
    int64_t n[2] = {0, 0};
    ok = ok && b::CudaOk(kTool, cudaMemcpy(n, reads, 16, cudaMemcpyDeviceToHost), "reads");
    const double us = b::TimeUs(kTool, cs.name, iters, [&] {
      (void)g::DirectAttend(v, mask, q, 0.f, o, lse, nullptr, ws, nullptr);
    });
    if (!ok || us < 0) return 1;
    const double pool_mb = 2.0 * n[0] * kRowBytes / 1e6, host_mb = 2.0 * n[1] * kRowBytes / 1e6;
    std::printf(
        "  %-72s %7.1f us | pool %6.1f MB, host %6.1f MB: host at %.1f GB/s if the pool "
        "rows were free\n",
        cs.name, us, pool_mb, host_mb, host_mb > 0 ? host_mb / us * 1e3 : 0.0);
    // A batch's members at once (the 25% case, registered stores): each member its own host
    // stores, outputs and stream, the selection, table and pool shared. Whether the members'
    // PCIe reads add up when their kernels run side by side, as in a kvrt_attend_batch step.
    if (cs.register_plain && cs.miss == 0.25 && !cs.miss_blocks && !cs.skewed)
      for (const int m : {4, 16}) ok = ok && TimeMembers(v, mask, q, m, iters / 4, host_mb);
    cudaFree(ws);
    cudaFree(const_cast<void**>(d_k));
    cudaFree(const_cast<void**>(d_v));
  }
  return ok ? 0 : 1;
}
