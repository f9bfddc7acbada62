// The GPU build of the cluster kind's segments (segment_build.h).
#include "segment_build.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_gpu/cluster_build.h"
#include "kvrt_transfer/cuda_rt.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime {
namespace {

using cpu_index::ClusterConfig;
using cpu_index::SegmentClustering;

// Work memory of one build: device memory ordered on the stream, or host memory for the
// references. Everything it handed out is given back when it goes (stream-ordered on the device,
// so after the kernels that use it).
class WorkMemory {
 public:
  WorkMemory(bool on_gpu, void* stream) : gpu_(on_gpu), stream_(stream) {}
  ~WorkMemory() {
    for (void* p : device_) (void)transfer::FreeAsync(p, stream_);
  }
  WorkMemory(const WorkMemory&) = delete;
  WorkMemory& operator=(const WorkMemory&) = delete;

  template <typename T>
  absl::StatusOr<T*> Get(std::size_t count) {
    const std::size_t bytes = std::max<std::size_t>(1, count * sizeof(T));
    if (!gpu_) {
      host_.push_back(std::make_unique<unsigned char[]>(bytes));
      return reinterpret_cast<T*>(host_.back().get());
    }
    KVRT_ASSIGN_OR_RETURN(void* p, transfer::MallocAsync(bytes, stream_));
    device_.push_back(p);
    return static_cast<T*>(p);
  }
  // Host -> work memory and back (a plain copy without a GPU).
  absl::Status Copy(void* dst, const void* src, std::size_t bytes) {
    if (!gpu_) {
      std::memcpy(dst, src, bytes);
      return absl::OkStatus();
    }
    return transfer::MemcpyAsync(dst, src, bytes, stream_);
  }
  absl::Status Sync() { return gpu_ ? transfer::StreamSynchronize(stream_) : absl::OkStatus(); }

 private:
  bool gpu_;
  void* stream_;
  std::vector<void*> device_;
  std::vector<std::unique_ptr<unsigned char[]>> host_;
};

// Lloyd's seeds of one segment, as the CPU build draws them: the first c rows of a partial
// Fisher-Yates shuffle of [0, n) under mt19937_64(seed).
void DrawSeeds(uint64_t seed, int n, int c, int32_t* out) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  for (int i = 0; i < c; ++i) {
    std::uniform_int_distribution<int64_t> u(i, n - 1);
    std::swap(perm[i], perm[u(rng)]);
  }
  std::copy_n(perm.begin(), c, out);
}

// One chunk of `segments` segments starting at segment `first`, every kv head.
class ChunkBuild {
 public:
  ChunkBuild(const RuntimeConfig& cfg, const SegmentBuildInput& in, bool on_gpu, void* stream)
      : cfg_(cfg), cc_(cfg.index.cluster), in_(in), on_gpu_(on_gpu), stream_(stream) {}

  absl::Status Run(int first, int segments,
                   std::vector<std::vector<SegmentClustering>>* parts) const {
    const int G = cfg_.num_kv_heads, d = cfg_.head_dim;
    const int S = static_cast<int>(cc_.segment_tokens);
    const int C = static_cast<int>(cpu_index::SegmentClusters(S, cc_));
    gpu::KMeansShape shape{G, d, segments, S, C};
    const std::size_t rows = static_cast<std::size_t>(shape.rows());
    const std::size_t cells = static_cast<std::size_t>(G) * segments * C;
    const std::size_t row_bytes = static_cast<std::size_t>(G) * d * DTypeSize(cfg_.dtype);
    WorkMemory mem(on_gpu_, stream_);

    // Inputs: the chunk's rows where the kernels read them.
    const std::size_t in_off = static_cast<std::size_t>(first) * S * row_bytes;
    const void* k = static_cast<const unsigned char*>(in_.k) + in_off;
    const void* v = static_cast<const unsigned char*>(in_.v) + in_off;
    if (on_gpu_ && !in_.k_on_device) {
      KVRT_ASSIGN_OR_RETURN(auto* kd, mem.Get<unsigned char>(rows * row_bytes));
      KVRT_ASSIGN_OR_RETURN(auto* vd, mem.Get<unsigned char>(rows * row_bytes));
      KVRT_RETURN_IF_ERROR(mem.Copy(kd, k, rows * row_bytes));
      KVRT_RETURN_IF_ERROR(mem.Copy(vd, v, rows * row_bytes));
      k = kd;
      v = vd;
    }
    std::vector<float> metric(static_cast<std::size_t>(G) * d * d), trace(G, 0.f);
    for (int g = 0; g < G; ++g) {
      const std::vector<float>& l = (*in_.metric_l)[g];
      std::copy(l.begin(), l.end(), metric.begin() + static_cast<std::size_t>(g) * d * d);
      double t = 0;
      for (float e : l) t += double(e) * e;
      trace[g] = static_cast<float>(t);
    }
    std::vector<int32_t> seeds(cells);
    tbb::parallel_for(0, G * segments, [&](int gs) {
      const int s = gs % segments;
      const uint64_t row0 = static_cast<uint64_t>(first + s) * S;
      DrawSeeds(cc_.seed + row0, S, C, seeds.data() + static_cast<std::size_t>(gs) * C);
    });

    KVRT_ASSIGN_OR_RETURN(float* metric_w, mem.Get<float>(metric.size()));
    KVRT_ASSIGN_OR_RETURN(float* trace_w, mem.Get<float>(G));
    KVRT_ASSIGN_OR_RETURN(int32_t * seeds_w, mem.Get<int32_t>(cells));
    KVRT_ASSIGN_OR_RETURN(float* x, mem.Get<float>(rows * G * d));
    KVRT_ASSIGN_OR_RETURN(float* xn2, mem.Get<float>(rows * G));
    KVRT_ASSIGN_OR_RETURN(float* centroid, mem.Get<float>(cells * d));
    KVRT_ASSIGN_OR_RETURN(int32_t * assign, mem.Get<int32_t>(rows * G));
    KVRT_ASSIGN_OR_RETURN(float* dist, mem.Get<float>(rows * G));
    KVRT_RETURN_IF_ERROR(mem.Copy(metric_w, metric.data(), metric.size() * sizeof(float)));
    KVRT_RETURN_IF_ERROR(mem.Copy(trace_w, trace.data(), trace.size() * sizeof(float)));
    KVRT_RETURN_IF_ERROR(mem.Copy(seeds_w, seeds.data(), seeds.size() * sizeof(int32_t)));

    const int iters = std::max(0, cc_.kmeans_iters) + std::max(0, cc_.refine_iters);
    if (on_gpu_) {
      KVRT_RETURN_IF_ERROR(gpu::MapToMetric(shape, k, cfg_.dtype, metric_w, x, xn2, stream_));
      KVRT_RETURN_IF_ERROR(gpu::SeedCentroids(shape, x, seeds_w, centroid, stream_));
      for (int it = 0; it < iters; ++it) {
        KVRT_RETURN_IF_ERROR(gpu::AssignClusters(shape, x, xn2, centroid, assign, dist, stream_));
        KVRT_RETURN_IF_ERROR(gpu::UpdateCentroids(shape, x, assign, centroid, stream_));
      }
      KVRT_RETURN_IF_ERROR(gpu::AssignClusters(shape, x, xn2, centroid, assign, dist, stream_));
    } else {
      KVRT_RETURN_IF_ERROR(gpu::MapToMetricHost(shape, k, cfg_.dtype, metric_w, x, xn2));
      KVRT_RETURN_IF_ERROR(gpu::SeedCentroidsHost(shape, x, seeds_w, centroid));
      for (int it = 0; it < iters; ++it) {
        KVRT_RETURN_IF_ERROR(gpu::AssignClustersHost(shape, x, xn2, centroid, assign, dist));
        KVRT_RETURN_IF_ERROR(gpu::UpdateCentroidsHost(shape, x, assign, centroid));
      }
      KVRT_RETURN_IF_ERROR(gpu::AssignClustersHost(shape, x, xn2, centroid, assign, dist));
    }

    // What comes back to the host: [assign | dist | key means | value means | spreads], in one
    // pinned block when there is a pool (pageable copies run at a fraction of PCIe speed).
    const std::size_t back_floats = 2 * rows * G + 2 * cells * d + cells;
    transfer::PinnedBlock block;
    std::vector<float> pageable;
    float* back = nullptr;
    if (on_gpu_ && in_.pinned != nullptr) {
      auto got = in_.pinned->Acquire(back_floats * sizeof(float));
      if (got.ok()) {
        block = std::move(*got);
        back = static_cast<float*>(block.data());
      }
    }
    if (back == nullptr) {
      pageable.resize(back_floats);
      back = pageable.data();
    }
    int32_t* assign_h = reinterpret_cast<int32_t*>(back);
    float* dist_h = back + rows * G;
    float* km = dist_h + rows * G;
    float* vm = km + cells * d;
    float* sp = vm + cells * d;
    // Outliers on the host (a selection per segment, small), then the means without them.
    KVRT_RETURN_IF_ERROR(mem.Copy(assign_h, assign, rows * G * sizeof(int32_t)));
    KVRT_RETURN_IF_ERROR(mem.Copy(dist_h, dist, rows * G * sizeof(float)));
    KVRT_RETURN_IF_ERROR(mem.Sync());
    const int64_t n_out = cpu_index::SegmentOutliers(S, cc_);
    tbb::parallel_for(0, G * segments, [&](int gs) {
      const std::size_t at = static_cast<std::size_t>(gs) * S;
      cpu_index::MarkOutliers(dist_h + at, S, C, n_out, assign_h + at);
    });
    KVRT_RETURN_IF_ERROR(mem.Copy(assign, assign_h, rows * G * sizeof(int32_t)));
    KVRT_ASSIGN_OR_RETURN(int32_t * count, mem.Get<int32_t>(cells));
    KVRT_ASSIGN_OR_RETURN(float* key_mean, mem.Get<float>(cells * d));
    KVRT_ASSIGN_OR_RETURN(float* value_mean, mem.Get<float>(cells * d));
    KVRT_ASSIGN_OR_RETURN(float* spread, mem.Get<float>(cells));
    const gpu::ClusterStats stats{count, key_mean, value_mean, spread};
    if (on_gpu_) {
      KVRT_RETURN_IF_ERROR(
          gpu::SummarizeClusters(shape, k, v, cfg_.dtype, x, xn2, assign, trace_w, stats, stream_));
    } else {
      KVRT_RETURN_IF_ERROR(
          gpu::SummarizeClustersHost(shape, k, v, cfg_.dtype, x, xn2, assign, trace_w, stats));
    }
    KVRT_RETURN_IF_ERROR(mem.Copy(km, key_mean, cells * d * sizeof(float)));
    KVRT_RETURN_IF_ERROR(mem.Copy(vm, value_mean, cells * d * sizeof(float)));
    KVRT_RETURN_IF_ERROR(mem.Copy(sp, spread, cells * sizeof(float)));
    KVRT_RETURN_IF_ERROR(mem.Sync());
    tbb::parallel_for(0, G * segments, [&](int gs) {
      const int g = gs / segments, s = gs % segments;
      const std::size_t cell = static_cast<std::size_t>(gs) * C;
      cpu_index::AssembleSegment(assign_h + static_cast<std::size_t>(gs) * S, S, C, d,
                                 km + cell * d, vm + cell * d, sp + cell, &(*parts)[g][first + s]);
    });
    return absl::OkStatus();
  }

 private:
  const RuntimeConfig& cfg_;
  const ClusterConfig& cc_;
  const SegmentBuildInput& in_;
  bool on_gpu_;
  void* stream_;
};

}  // namespace

bool SegmentBuildSupported(const RuntimeConfig& config) {
  const int d = config.head_dim;
  const int64_t S = config.index.cluster.segment_tokens;
  return config.index_kind == cpu_index::IndexKind::kCluster && (d == 64 || d == 128 || d == 256) &&
         S % 64 == 0 && S <= (int64_t{1} << 24) && config.index.cluster.cluster_size > 0;
}

absl::StatusOr<std::vector<std::vector<SegmentClustering>>> BuildSegments(
    const RuntimeConfig& config, const SegmentBuildInput& in, bool on_gpu, void* stream) {
  if (!SegmentBuildSupported(config))
    return absl::InvalidArgumentError("segment build: not a cluster configuration it supports");
  const int G = config.num_kv_heads, d = config.head_dim;
  if (in.k == nullptr || in.v == nullptr || in.metric_l == nullptr ||
      static_cast<int>(in.metric_l->size()) != G)
    return absl::InvalidArgumentError("segment build: need k, v and a metric factor per kv head");
  for (const auto& l : *in.metric_l)
    if (l.size() != static_cast<std::size_t>(d) * d)
      return absl::InvalidArgumentError("segment build: a metric factor is not head_dim^2 floats");
  const int64_t S = config.index.cluster.segment_tokens;
  const int segments = static_cast<int>(in.rows / S);
  std::vector<std::vector<SegmentClustering>> parts(G, std::vector<SegmentClustering>(segments));
  if (segments == 0) return parts;
  const int64_t C = cpu_index::SegmentClusters(S, config.index.cluster);
  const int64_t per_segment = static_cast<int64_t>(G) * (S * d + 3 * C * d) * 4;
  const int chunk =
      static_cast<int>(std::clamp<int64_t>(kSegmentBuildChunkBytes / per_segment, 1, segments));
  const ChunkBuild build(config, in, on_gpu, stream);
  for (int first = 0; first < segments; first += chunk)
    KVRT_RETURN_IF_ERROR(build.Run(first, std::min(chunk, segments - first), &parts));
  return parts;
}

}  // namespace kvrt::runtime
