// A decode step's device work in a CUDA graph (docs/gpu.md, "CUDA graphs"): the kernels a
// direct step of the cluster kind launches for one (sequence, layer) - the ring append whose
// leaving token goes straight into the cold store's tail (RingAppendToStore), the tier's
// attention, the cluster selection, its mask, the direct attention and the one merge - captured
// once and replayed step after step. Between replays the host writes only the step's q and new
// token (what a decoder's own captured work would produce); the counts that change every step
// (the ring's write position, the store's row count that the direct attention reads) advance on
// the device. Each replay must compute what the same kernels compute launched eagerly with the
// row count passed from the host. Skipped without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kvrt_common/dtype.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "kvrt_gpu/direct_attend.h"
#include "kvrt_gpu/kernels.h"
#include "tests/gpu/close.h"
#include "tests/gpu/device_copy.h"
#include "tests/gpu/random_storage.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime.h>

namespace kvrt::gpu {
namespace {

constexpr int kKv = 2, kGroup = 4, kQh = kKv * kGroup, kD = 128;
constexpr DType kT = DType::kBF16;
constexpr int kSinks = 4, kWindow = 64;    // the ring is full: every append evicts a token
constexpr int kClusters = 96, kTail = 40;  // clusters of 1-16 rows at 16 c, then the tail
constexpr int kSteps = 6;
constexpr int64_t kFirstRows = int64_t{16} * kClusters + kTail;
// The store's capacity: the bound the graph's grid is sized for (room ahead, as a runtime's store
// has), enough past kFirstRows that the eager launches' grids differ from the graph's.
constexpr int64_t kStoreCap = kFirstRows + 512;
constexpr std::size_t kRowBytes = kD * 2;  // one kv head's row in bf16
constexpr std::size_t kTokenBytes = kKv * kRowBytes;

template <typename T>
T* Alloc(std::size_t n) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)), cudaSuccess);
  return p;
}

// One (sequence, layer) on the device and the buffers of its step. `graph`: the direct attention
// reads the store's row count from device memory (rows_now, which the append advances) and its
// grid is sized for kStoreCap rows; else the host passes the count, as the runtime does today.
struct Layer {
  bool graph = false;
  int64_t rows = kFirstRows, pos = 1000;  // the host's counts before the next step
  std::vector<void*> allocs;
  std::vector<unsigned char*> store_host;  // [2 kv]: keys, then values; mapped, kStoreCap rows
  // Device buffers.
  void *ring_k = nullptr, *ring_v = nullptr, *new_k = nullptr, *new_v = nullptr;
  int64_t *write_pos = nullptr, *rows_now = nullptr, *reads = nullptr;
  float *q = nullptr, *states_o = nullptr, *states_lse = nullptr, *out = nullptr, *lse = nullptr;
  float *tier_ws = nullptr, *select_ws = nullptr;
  uint32_t* mask = nullptr;
  RingBatch ring;
  RingStoreTarget to_store;
  TierBatch tier;
  ClusterSummaryView summary;
  ClusterStepOutputs sel;
  DirectRowsView view;

  template <typename T>
  T* Dev(const std::vector<T>& h) {
    T* p = ToDevice(h);
    allocs.push_back(p);
    return p;
  }
  template <typename T>
  T* Dev(std::size_t n) {
    T* p = Alloc<T>(n);
    allocs.push_back(p);
    return p;
  }

  Layer(bool graph_mode, uint32_t seed) : graph(graph_mode) {
    std::mt19937 rng(seed);
    ring_k = Dev(RandomStorage(rng, kWindow * kKv * kD, kT, 1.f));
    ring_v = Dev(RandomStorage(rng, kWindow * kKv * kD, kT, 1.f));
    void* sink_k = Dev(RandomStorage(rng, kSinks * kKv * kD, kT, 1.f));
    void* sink_v = Dev(RandomStorage(rng, kSinks * kKv * kD, kT, 1.f));
    new_k = Dev<unsigned char>(kTokenBytes);
    new_v = Dev<unsigned char>(kTokenBytes);
    write_pos = Dev(std::vector<int64_t>{pos});
    rows_now = Dev(std::vector<int64_t>{rows});
    reads = Dev(std::vector<int64_t>(2, 0));
    q = Dev<float>(kQh * kD);

    void* const ptrs[2] = {ring_k, ring_v};
    auto* ring_ptrs = Dev(std::vector<void*>(ptrs, ptrs + 2));
    ring.ring_k = ring_ptrs;
    ring.ring_v = ring_ptrs + 1;
    ring.write_pos = write_pos;
    ring.batch = 1;
    ring.capacity = kWindow;
    ring.kv_heads = kKv;
    ring.head_dim = kD;
    ring.dtype = kT;

    TierArrays::Entry e{sink_k, sink_v, ring_k, ring_v, kSinks, kWindow};
    std::vector<unsigned char> packed(TierArrays::Bytes(1));
    TierArrays::Pack(&e, 1, packed.data());
    TierArrays::View(Dev(packed), 1, &tier);
    tier.max_tokens = kSinks + kWindow;
    tier.kv_heads = kKv;
    tier.head_dim = kD;
    tier.dtype = kT;
    AttnParams ap;
    ap.q_heads = kQh;
    tier_ws = Dev<float>(TierAttentionWorkspaceFloats(tier, ap));

    // The cold store: mapped host memory, rows [0, kStoreCap) per kv head (the tail grows into it).
    std::vector<const void*> sk, sv;
    for (int g = 0; g < 2 * kKv; ++g) {
      void* h = nullptr;
      EXPECT_EQ(cudaHostAlloc(&h, kStoreCap * kRowBytes, cudaHostAllocMapped), cudaSuccess);
      const auto init = RandomStorage(rng, kStoreCap * kD, kT, 1.f);
      std::memcpy(h, init.data(), init.size());
      store_host.push_back(static_cast<unsigned char*>(h));
      void* d = nullptr;
      EXPECT_EQ(cudaHostGetDevicePointer(&d, h, 0), cudaSuccess);
      (g < kKv ? sk : sv).push_back(d);
    }
    std::uniform_int_distribution<int> size_of(1, 16);
    std::vector<int32_t> begin, size;
    for (int g = 0; g < kKv; ++g) {
      for (int c = 0; c < kClusters; ++c) {
        begin.push_back(16 * c);
        size.push_back(size_of(rng));
      }
    }
    std::uniform_real_distribution<float> spread_of(0.05f, 0.3f);
    std::vector<float> spread(kKv * kClusters);
    for (auto& x : spread) x = spread_of(rng);
    summary.kv_heads = kKv;
    summary.head_dim = kD;
    summary.num_clusters = kClusters;
    summary.centroid = reinterpret_cast<const uint16_t*>(
        Dev(RandomStorage(rng, kKv * kClusters * kD, DType::kBF16, 0.5f)));
    summary.value_mean = reinterpret_cast<const uint16_t*>(
        Dev(RandomStorage(rng, kKv * kClusters * kD, DType::kBF16, 0.5f)));
    summary.size = Dev(size);
    summary.spread = Dev(spread);
    select_ws = Dev<float>(ClusterStepWorkspaceFloats(summary, kQh));

    // The merge's states: the tier, the unselected clusters' estimate, the direct attention's
    // splits (at most kDirectAttendMaxSplits).
    const std::size_t states = 2 + kDirectAttendMaxSplits;
    states_o = Dev<float>(states * kQh * kD);
    states_lse = Dev<float>(states * kQh);
    out = Dev<float>(kQh * kD);
    lse = Dev<float>(kQh);
    sel.density = Dev<float>(kQh * kClusters);
    sel.selected = Dev<int32_t>(kQh * kClusters);
    sel.selected_count = Dev<int32_t>(kQh);
    sel.selected_tokens = Dev<int64_t>(kQh);
    sel.est_o = states_o + kQh * kD;
    sel.est_lse = states_lse + kQh;
    mask = Dev<uint32_t>(kKv * kClusters);

    view.kv_heads = kKv;
    view.q_heads = kQh;
    view.head_dim = kD;
    view.dtype = kT;
    view.store_k = Dev(sk);
    view.store_v = Dev(sv);
    view.blocks_per_head = (kStoreCap + kDirectBlockRows - 1) / kDirectBlockRows;
    view.block_page = Dev(std::vector<int32_t>(kKv * view.blocks_per_head, -1));  // no pool
    view.cluster_begin = Dev(begin);
    view.cluster_size = summary.size;
    view.num_clusters = kClusters;
    view.tail_begin = Dev(std::vector<int64_t>(kKv, int64_t{16} * kClusters));
    // The next token to leave the ring (ring position pos - kWindow) takes store row `rows`.
    to_store.store_k = const_cast<void* const*>(view.store_k);
    to_store.store_v = const_cast<void* const*>(view.store_v);
    to_store.row_base = Dev(std::vector<int64_t>{rows - (pos - kWindow)});
    to_store.store_rows = kStoreCap;
  }
  ~Layer() {
    cudaDeviceSynchronize();
    for (void* p : allocs) cudaFree(p);
    for (unsigned char* h : store_host) cudaFreeHost(h);
  }

  int Splits() const {
    DirectRowsView v = view;
    v.rows = graph ? kStoreCap : rows;
    return DirectAttendSplits(v);
  }

  // The step's device work on `stream`, as a decode step of the direct path enqueues it.
  absl::Status Enqueue(cudaStream_t stream) {
    AttnParams ap;
    ap.q_heads = kQh;
    ClusterStepParams cp;
    cp.q_heads = kQh;
    cp.budget_tokens = 300;
    DirectRowsView v = view;
    v.rows = graph ? kStoreCap : rows + 1;  // the token this step's append moves to the store
    const int splits = DirectAttendSplits(v);
    absl::Status st = RingAppendToStore(ring, new_k, new_v, 1, to_store, write_pos,
                                        graph ? rows_now : nullptr, stream);
    if (st.ok()) st = TierAttention(tier, q, ap, states_o, states_lse, tier_ws, stream);
    if (st.ok()) st = ClusterStep(summary, q, cp, sel, select_ws, stream);
    if (st.ok())
      st = MarkSelected(sel.selected, sel.selected_count, kQh, kKv, kClusters, mask, stream);
    if (st.ok())
      st = DirectAttendPartial(v, mask, q, 0.f, states_o + 2 * kQh * kD, states_lse + 2 * kQh,
                               reads, stream, graph ? rows_now : nullptr);
    if (st.ok())
      st = MergeStatesN(states_o, states_lse, 2 + splits, kQh, kD, out, DType::kF32, lse, stream);
    return st;
  }

  // Between steps: the next q and token (a decoder's own work, which a graph of its would write).
  void Prepare(const std::vector<float>& next_q, const std::vector<unsigned char>& next_k,
               const std::vector<unsigned char>& next_v, cudaStream_t stream) {
    ASSERT_EQ(cudaMemcpyAsync(q, next_q.data(), next_q.size() * sizeof(float),
                              cudaMemcpyHostToDevice, stream),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(new_k, next_k.data(), kTokenBytes, cudaMemcpyHostToDevice, stream),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(new_v, next_v.data(), kTokenBytes, cudaMemcpyHostToDevice, stream),
              cudaSuccess);
    // Pageable sources: each copy returns once its source is staged; the stream orders the rest.
  }
  // After a step: the host's bookkeeping of what the step did.
  void Stepped() {
    ++rows;
    ++pos;
  }
  // Store row r of kv head g's keys.
  std::vector<unsigned char> StoreKeyRow(int g, int64_t r) const {
    const unsigned char* at = store_host[g] + r * kRowBytes;
    return std::vector<unsigned char>(at, at + kRowBytes);
  }
};

TEST(StepGraph, ADirectStepsDeviceWorkReplaysAsItRunsEagerly) {
  if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  Layer replayed(true, 5), eager(false, 5);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);

  std::mt19937 rng(17);
  std::normal_distribution<float> nq(0.f, 0.6f);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  for (int step = 0; step < kSteps; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    std::vector<float> q(kQh * kD);
    for (auto& x : q) x = nq(rng);
    const auto k = RandomStorage(rng, kKv * kD, kT, 1.f);
    const auto v = RandomStorage(rng, kKv * kD, kT, 1.f);
    replayed.Prepare(q, k, v, stream);
    eager.Prepare(q, k, v, stream);
    // The token this step's append moves out of the ring (the same in both: one seed).
    const auto leaving =
        ToHost(static_cast<unsigned char*>(eager.ring_k) + (eager.pos % kWindow) * kTokenBytes,
               kTokenBytes);
    if (step == 0) {
      // Captured once, in the global mode, after the first step's inputs are written.
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
      const absl::Status st = replayed.Enqueue(stream);
      ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
      ASSERT_TRUE(st.ok()) << st;
      ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
      size_t nodes = 0;
      ASSERT_EQ(cudaGraphGetNodes(graph, nullptr, &nodes), cudaSuccess);
      std::printf("captured step: %zu nodes\n", nodes);
    }
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    const absl::Status st = eager.Enqueue(stream);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    replayed.Stepped();
    eager.Stepped();

    // The replay advanced its counts on the device, and its evicted token is in the store's
    // tail, which its own attention read.
    EXPECT_EQ(ToHost(replayed.write_pos, 1)[0], replayed.pos);
    EXPECT_EQ(ToHost(replayed.rows_now, 1)[0], replayed.rows);
    for (int g = 0; g < kKv; ++g) {
      const std::vector<unsigned char> want(leaving.begin() + g * kRowBytes,
                                            leaving.begin() + (g + 1) * kRowBytes);
      EXPECT_EQ(replayed.StoreKeyRow(g, replayed.rows - 1), want) << "kv head " << g;
      EXPECT_EQ(eager.StoreKeyRow(g, eager.rows - 1), want) << "kv head " << g;
    }
    const auto lse_r = ToHost(replayed.lse, kQh), lse_e = ToHost(eager.lse, kQh);
    const auto out_r = ToHost(replayed.out, kQh * kD), out_e = ToHost(eager.out, kQh * kD);
    EXPECT_TRUE(Close(lse_r.data(), lse_e.data(), kQh, 2e-5, "lse"));
    EXPECT_TRUE(Close(out_r.data(), out_e.data(), out_r.size(), 2e-4, "o"));
    EXPECT_EQ(ToHost(replayed.reads, 2), ToHost(eager.reads, 2)) << "rows read";
    EXPECT_EQ(ToHost(replayed.sel.selected_count, kQh), ToHost(eager.sel.selected_count, kQh));
    EXPECT_EQ(ToHost(static_cast<unsigned char*>(replayed.ring_k), kWindow * kTokenBytes),
              ToHost(static_cast<unsigned char*>(eager.ring_k), kWindow * kTokenBytes))
        << "the ring after the append";
  }
  EXPECT_EQ(replayed.rows, kFirstRows + kSteps);
  EXPECT_NE(replayed.Splits(), eager.Splits())
      << "the setup: the graph's grid is not the eager one";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace kvrt::gpu

#endif  // KVRT_WITH_CUDA
