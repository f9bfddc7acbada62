// pcie_gather: how few SMs can read scattered 4 KiB chunks of mapped host memory at PCIe speed.
//
// The direct step reads its misses (selected clusters whose rows are not in the pool: ~3.5 MB per
// 128K layer-step, 4 KiB of K and 4 KiB of V per cluster of 16 rows) straight from the host
// store inside DirectAttend, whose 256 CTAs hold every SM while they wait on PCIe. Whether a
// small gather kernel (a few CTAs, many loads in flight each) could fetch them into device
// memory at the link's speed, leaving the other SMs to other layers' and members' kernels, is
// what this measures: the gather kernel per grid size, against one contiguous cudaMemcpyAsync
// (the link's speed) and cudaMemcpyBatchAsync (the copy engines) of the same chunks, and the
// gather beside an HBM-bound kernel on the rest of the GPU (does each keep its speed?). The same
// bytes read as consecutive chunks and as random 16 KiB chunks tell a host whose scattered reads
// fall short of its copies (one H100 machine: 30 GB/s for every pattern) from one where they do
// not (44-51 GB/s; docs/benchmarks.md, thirty-second session).
//
//   pcie_gather [--mb 3.5,56] [--reps 20]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_check.h"

namespace {

// One warp per chunk (grid-stride over chunks): every lane issues all of its 16-byte loads of
// the chunk before any store, so a warp has a whole chunk in flight.
template <int kChunkBytes>
__global__ void GatherKernel(const unsigned char* __restrict__ host,
                             const int64_t* __restrict__ src, unsigned char* __restrict__ dst,
                             int n) {
  constexpr int kLoads = kChunkBytes / (32 * 16);
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  for (int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); c < n; c += warps) {
    const uint4* s = reinterpret_cast<const uint4*>(host + src[c]);
    uint4* d = reinterpret_cast<uint4*>(dst + int64_t{c} * kChunkBytes);
    uint4 r[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) r[i] = __ldcs(s + i * 32 + lane);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) d[i * 32 + lane] = r[i];
  }
}

// HBM-bound neighbour: sums a device buffer (grid-stride), one float out per CTA.
__global__ void StreamKernel(const float4* __restrict__ x, int64_t n, float* out) {
  float s = 0.f;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float4 v = __ldcs(x + i);
    s += v.x + v.y + v.z + v.w;
  }
  if (s == 12345.f) out[blockIdx.x] = s;  // keeps the loads; never true for the zeroed buffer
}

template <typename F>
float MedianMs(int reps, cudaStream_t st, F&& launch) {
  cudaEvent_t a, b;
  KVRT_BENCH_CUDA(cudaEventCreate(&a));
  KVRT_BENCH_CUDA(cudaEventCreate(&b));
  launch();  // warm-up
  KVRT_BENCH_CUDA(cudaStreamSynchronize(st));
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    KVRT_BENCH_CUDA(cudaEventRecord(a, st));
    launch();
    KVRT_BENCH_CUDA(cudaEventRecord(b, st));
    KVRT_BENCH_CUDA(cudaEventSynchronize(b));
    float t = 0;
    KVRT_BENCH_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  KVRT_BENCH_CUDA(cudaEventDestroy(a));
  KVRT_BENCH_CUDA(cudaEventDestroy(b));
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return ms[ms.size() / 2];
}

std::vector<double> ParseList(const char* s) {
  std::vector<double> out;
  for (const char* p = s; *p;) {
    char* end = nullptr;
    out.push_back(std::strtod(p, &end));
    if (end == p) break;
    p = *end == ',' ? end + 1 : end;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<double> mbs = {3.5, 56};
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--mb" && i + 1 < argc) {
      mbs = ParseList(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(3, std::atoi(argv[++i]));
    } else {
      std::printf(
          "usage: pcie_gather [--mb 3.5,56] [--reps 20]\n"
          "  gathers MB of random 4 KiB chunks of a 1 GiB registered host buffer into device\n"
          "  memory: a warp-per-chunk kernel per grid size, cudaMemcpyBatchAsync, and one\n"
          "  contiguous cudaMemcpyAsync; the kernel on consecutive chunks and on random 16 KiB\n"
          "  chunks; then the gather beside an HBM-bound kernel.\n");
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  constexpr int kChunk = 4096;
  const size_t host_bytes = size_t{1} << 30;
  unsigned char* host = static_cast<unsigned char*>(std::aligned_alloc(4096, host_bytes));
  std::memset(host, 1, host_bytes);  // touched, as the runtime's store is
  KVRT_BENCH_CUDA(cudaHostRegister(host, host_bytes, cudaHostRegisterMapped));
  unsigned char* host_dev = nullptr;
  KVRT_BENCH_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_dev), host, 0));
  int sms = 0;
  KVRT_BENCH_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaStream_t st, st2;
  KVRT_BENCH_CUDA(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  KVRT_BENCH_CUDA(cudaStreamCreateWithFlags(&st2, cudaStreamNonBlocking));
  const int64_t stream_n = (int64_t{1} << 30) / 16;  // 1 GiB of float4 for the neighbour
  float4* big = nullptr;
  float* sink = nullptr;
  KVRT_BENCH_CUDA(cudaMalloc(&big, stream_n * 16));
  KVRT_BENCH_CUDA(cudaMemset(big, 0, stream_n * 16));
  KVRT_BENCH_CUDA(cudaMalloc(&sink, 4096 * sizeof(float)));

  for (double mb : mbs) {
    const int n = std::max(1, static_cast<int>(mb * 1e6 / kChunk));
    std::mt19937_64 rng(7);
    std::vector<int64_t> src(host_bytes / kChunk);
    for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<int64_t>(i) * kChunk;
    std::shuffle(src.begin(), src.end(), rng);
    src.resize(n);
    int64_t* src_d = nullptr;
    unsigned char* dst = nullptr;
    KVRT_BENCH_CUDA(cudaMalloc(&src_d, n * sizeof(int64_t)));
    KVRT_BENCH_CUDA(cudaMemcpy(src_d, src.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice));
    KVRT_BENCH_CUDA(cudaMalloc(&dst, size_t{1} * n * kChunk));
    const double bytes = double{1} * n * kChunk;
    std::printf("=== %d chunks of %d B (%.2f MB) from registered host memory, %d SMs\n", n, kChunk,
                bytes / 1e6, sms);
    auto report = [&](const char* what, float ms) {
      std::printf("%-44s %9.1f us  %6.1f GB/s\n", what, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
    };
    const float contig = MedianMs(reps, st, [&] {
      KVRT_BENCH_CUDA(
          cudaMemcpyAsync(dst, host, size_t{1} * n * kChunk, cudaMemcpyHostToDevice, st));
    });
    report("cudaMemcpyAsync, contiguous (the link)", contig);
    {
      std::vector<void*> dsts(n);
      std::vector<const void*> srcs(n);
      std::vector<size_t> sizes(n, kChunk);
      for (int i = 0; i < n; ++i) {
        dsts[i] = dst + int64_t{i} * kChunk;
        srcs[i] = host + src[i];
      }
      cudaMemcpyAttributes attr{};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
      size_t attr_idx = 0;
      const float batch = MedianMs(reps, st, [&] {
        KVRT_BENCH_CUDA(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), n, &attr,
                                             &attr_idx, 1, st));
      });
      report("cudaMemcpyBatchAsync, one per chunk", batch);
    }
    // One gather launch timed and reported under its label.
    auto time_gather = [&](const char* label, auto launch) {
      const float t = MedianMs(reps, st, [&] {
        launch();
        KVRT_BENCH_CUDA(cudaGetLastError());
      });
      report(label, t);
      return t;
    };
    char what[64];
    float best_small = 0;
    for (int threads : {256, 1024}) {
      for (int grid : {1, 2, 4, 8, 16, 32, 66, 132, 264}) {
        std::snprintf(what, sizeof what, "gather kernel, %3d CTAs x %4d threads", grid, threads);
        const float t = time_gather(
            what, [&] { GatherKernel<kChunk><<<grid, threads, 0, st>>>(host_dev, src_d, dst, n); });
        if (threads == 1024 && grid == 8) best_small = t;
      }
    }
    // The same bytes read by the kernel as consecutive 4 KiB chunks (one contiguous range), and
    // as random 16 KiB chunks: whether SM reads of host memory are bound by scattering, by
    // the chunk's size, or not at all (a host whose scattered reads fall short of its copies).
    {
      std::vector<int64_t> seq(n);
      for (int i = 0; i < n; ++i) seq[i] = int64_t{i} * kChunk;
      int64_t* seq_d = nullptr;
      KVRT_BENCH_CUDA(cudaMalloc(&seq_d, n * sizeof(int64_t)));
      KVRT_BENCH_CUDA(cudaMemcpy(seq_d, seq.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice));
      for (int grid : {8, 264}) {
        const int threads = grid == 8 ? 1024 : 256;
        std::snprintf(what, sizeof what, "consecutive chunks, %3d CTAs x %4d", grid, threads);
        time_gather(
            what, [&] { GatherKernel<kChunk><<<grid, threads, 0, st>>>(host_dev, seq_d, dst, n); });
      }
      constexpr int kBig = 4 * kChunk;
      const int nb = std::max(1, n / 4);
      std::vector<int64_t> big_src(host_bytes / kBig);
      for (size_t i = 0; i < big_src.size(); ++i) big_src[i] = static_cast<int64_t>(i) * kBig;
      std::shuffle(big_src.begin(), big_src.end(), rng);
      big_src.resize(nb);
      KVRT_BENCH_CUDA(
          cudaMemcpy(seq_d, big_src.data(), nb * sizeof(int64_t), cudaMemcpyHostToDevice));
      for (int grid : {16, 264}) {
        std::snprintf(what, sizeof what, "random 16 KiB chunks, %3d CTAs x  256", grid);
        time_gather(what,
                    [&] { GatherKernel<kBig><<<grid, 256, 0, st>>>(host_dev, seq_d, dst, nb); });
      }
      KVRT_BENCH_CUDA(cudaFree(seq_d));
    }
    // Beside an HBM-bound kernel on the other SMs: each alone, then both, on two streams.
    const int neighbour_ctas = 2 * sms;
    const float alone = MedianMs(
        reps, st2, [&] { StreamKernel<<<neighbour_ctas, 1024, 0, st2>>>(big, stream_n, sink); });
    cudaEvent_t fork;
    KVRT_BENCH_CUDA(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    const float both = MedianMs(reps, st, [&] {
      KVRT_BENCH_CUDA(cudaEventRecord(fork, st));
      KVRT_BENCH_CUDA(cudaStreamWaitEvent(st2, fork));
      GatherKernel<kChunk><<<8, 1024, 0, st>>>(host_dev, src_d, dst, n);
      StreamKernel<<<neighbour_ctas, 1024, 0, st2>>>(big, stream_n, sink);
      KVRT_BENCH_CUDA(cudaEventRecord(fork, st2));
      KVRT_BENCH_CUDA(cudaStreamWaitEvent(st, fork));
    });
    KVRT_BENCH_CUDA(cudaEventDestroy(fork));
    std::printf("HBM neighbour alone (1 GiB, %d CTAs)            %9.1f us  %6.1f GB/s\n",
                neighbour_ctas, alone * 1e3, (stream_n * 16.0) / (alone * 1e-3) / 1e9);
    std::printf("gather (8 x 1024) alone, neighbour alone, both  %9.1f %9.1f %9.1f us\n",
                best_small * 1e3, alone * 1e3, both * 1e3);
    KVRT_BENCH_CUDA(cudaFree(src_d));
    KVRT_BENCH_CUDA(cudaFree(dst));
  }
  KVRT_BENCH_CUDA(cudaHostUnregister(host));
  std::free(host);
  return 0;
}
