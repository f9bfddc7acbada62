// Window ring append (new tokens' k/v into their slots) and eviction gather (rows that leave the
// window into a contiguous staging buffer for the D2H copy). Pure data movement in 16-byte words.
#include "common.cuh"

namespace kvrt::gpu::detail {
namespace {

// One thread per 16-byte word of (sequence b, new token i, kv head, slice of head_dim).
// ring_k/ring_v: [batch] -> [capacity, kv_heads, D] of T; write_pos: [batch];
// new_k/new_v: [batch, n_new, kv_heads, D]. Where the slot held a token (pos >= capacity),
// evict(b, pos, rest, idx, old_k, old_v) first takes the slot's old words (rest: the word within
// the token, idx: within new_k).
// NOTE: n_new <= capacity, so each slot is touched by exactly one token and the read of the old
// row and the write of the new one happen in the same thread: no ordering between threads needed.
template <int kWords, typename Evict>
__device__ __forceinline__ void RingAppendWords(void* const* __restrict__ ring_k,
                                                void* const* __restrict__ ring_v,
                                                const int64_t* __restrict__ write_pos, int batch,
                                                int capacity, int kv_heads, int n_new,
                                                const uint4* __restrict__ new_k,
                                                const uint4* __restrict__ new_v, Evict evict) {
  const int64_t per_token = static_cast<int64_t>(kv_heads) * kWords;
  const int64_t total = static_cast<int64_t>(batch) * n_new * per_token;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rest = idx % per_token;
    const int64_t bi = idx / per_token;  // b * n_new + i
    const int b = static_cast<int>(bi / n_new), i = static_cast<int>(bi % n_new);
    const int64_t pos = write_pos[b] + i;
    const int64_t at = (pos % capacity) * per_token + rest;
    uint4* rk = static_cast<uint4*>(ring_k[b]);
    uint4* rv = static_cast<uint4*>(ring_v[b]);
    if (pos >= capacity) evict(b, pos, rest, idx, rk + at, rv + at);
    rk[at] = new_k[idx];
    rv[at] = new_v[idx];
  }
}

// evict_k/evict_v: null or [batch, n_new, kv_heads, D].
template <typename T, int D>
__global__ void RingAppendKernel(void* const* __restrict__ ring_k, void* const* __restrict__ ring_v,
                                 const int64_t* __restrict__ write_pos, int batch, int capacity,
                                 int kv_heads, int n_new, const uint4* __restrict__ new_k,
                                 const uint4* __restrict__ new_v, uint4* __restrict__ evict_k,
                                 uint4* __restrict__ evict_v) {
  RingAppendWords<D * sizeof(T) / 16>(
      ring_k, ring_v, write_pos, batch, capacity, kv_heads, n_new, new_k, new_v,
      [&](int, int64_t, int64_t, int64_t idx, const uint4* old_k, const uint4* old_v) {
        if (evict_k == nullptr) return;
        evict_k[idx] = *old_k;
        evict_v[idx] = *old_v;
      });
}

// RingAppendToStore: a leaving token's words go to its store row (RingStoreTarget). write_pos is
// advanced by RingAdvanceKernel, after every thread here has read it.
template <typename T, int D>
__global__ void RingAppendToStoreKernel(void* const* __restrict__ ring_k,
                                        void* const* __restrict__ ring_v,
                                        const int64_t* __restrict__ write_pos, int batch,
                                        int capacity, int kv_heads, int n_new,
                                        const uint4* __restrict__ new_k,
                                        const uint4* __restrict__ new_v, RingStoreTarget store) {
  constexpr int kWords = D * sizeof(T) / 16;
  RingAppendWords<kWords>(
      ring_k, ring_v, write_pos, batch, capacity, kv_heads, n_new, new_k, new_v,
      [&](int b, int64_t pos, int64_t rest, int64_t, const uint4* old_k, const uint4* old_v) {
        const int64_t row = store.row_base[b] + pos - capacity;
        if (row < 0 || row >= store.store_rows) return;
        const int64_t s = b * static_cast<int64_t>(kv_heads) + rest / kWords;
        const int64_t w = row * kWords + rest % kWords;
        static_cast<uint4*>(store.store_k[s])[w] = *old_k;
        static_cast<uint4*>(store.store_v[s])[w] = *old_v;
      });
}

// One thread per sequence: write_pos[b] += n_new, rows[b] the store's count after it.
__global__ void RingAdvanceKernel(int64_t* __restrict__ write_pos, int64_t* __restrict__ rows,
                                  const int64_t* __restrict__ row_base, int batch, int capacity,
                                  int n_new) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t p = write_pos[b] + n_new;
  write_pos[b] = p;
  if (rows != nullptr) rows[b] = row_base[b] + (p > capacity ? p - capacity : 0);
}

// One ring's append, arguments by value: one thread per 16-byte word of the n new rows (rows of
// `words` words); as in RingAppendWords, each slot's old word is read (evict(idx, i, w, old_k,
// old_v)) and its new word written by the same thread.
template <typename Evict>
__device__ __forceinline__ void RingAppendRowWords(uint4* __restrict__ ring_k,
                                                   uint4* __restrict__ ring_v, int64_t capacity,
                                                   int64_t slot0, int64_t n, int words,
                                                   const uint4* __restrict__ new_k,
                                                   const uint4* __restrict__ new_v, Evict evict) {
  const int64_t total = n * words;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / words, w = idx % words;
    const int64_t at = ((slot0 + i) % capacity) * words + w;
    evict(idx, i, w, ring_k[at], ring_v[at]);
    ring_k[at] = new_k[idx];
    ring_v[at] = new_v[idx];
  }
}

__global__ void RingAppendRowsKernel(uint4* __restrict__ ring_k, uint4* __restrict__ ring_v,
                                     int64_t capacity, int64_t slot0, int64_t n, int words,
                                     const uint4* __restrict__ new_k,
                                     const uint4* __restrict__ new_v, uint4* __restrict__ evict_k,
                                     uint4* __restrict__ evict_v) {
  RingAppendRowWords(ring_k, ring_v, capacity, slot0, n, words, new_k, new_v,
                     [&](int64_t idx, int64_t, int64_t, const uint4& old_k, const uint4& old_v) {
                       if (evict_k == nullptr) return;
                       evict_k[idx] = old_k;
                       evict_v[idx] = old_v;
                     });
}

// The leaving word w of row i belongs to kv head w / head_words. `to` is read where it lies in
// the parameter space (__grid_constant__): indexed by a thread's head, a by-value copy would go
// to local memory.
__global__ void RingAppendRowsToHeadsKernel(uint4* __restrict__ ring_k, uint4* __restrict__ ring_v,
                                            int64_t capacity, int64_t slot0, int64_t n, int words,
                                            int head_words, const uint4* __restrict__ new_k,
                                            const uint4* __restrict__ new_v,
                                            const __grid_constant__ HeadRows to) {
  RingAppendRowWords(ring_k, ring_v, capacity, slot0, n, words, new_k, new_v,
                     [&](int64_t, int64_t i, int64_t w, const uint4& old_k, const uint4& old_v) {
                       const int g = static_cast<int>(w / head_words);
                       const int64_t at = i * head_words + w % head_words;
                       static_cast<uint4*>(to.k[g])[at] = old_k;
                       static_cast<uint4*>(to.v[g])[at] = old_v;
                     });
}

// out_k/out_v: [batch, count, kv_heads, D] <- ring rows (start[b] + i) % capacity.
template <typename T, int D>
__global__ void RingGatherKernel(void* const* __restrict__ ring_k, void* const* __restrict__ ring_v,
                                 const int64_t* __restrict__ start, int batch, int capacity,
                                 int kv_heads, int count, uint4* __restrict__ out_k,
                                 uint4* __restrict__ out_v) {
  constexpr int kWords = D * sizeof(T) / 16;
  const int64_t per_token = static_cast<int64_t>(kv_heads) * kWords;
  const int64_t total = static_cast<int64_t>(batch) * count * per_token;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rest = idx % per_token;
    const int64_t bi = idx / per_token;
    const int b = static_cast<int>(bi / count), i = static_cast<int>(bi % count);
    const int64_t at = ((start[b] + i) % capacity) * per_token + rest;
    out_k[idx] = static_cast<const uint4*>(ring_k[b])[at];
    out_v[idx] = static_cast<const uint4*>(ring_v[b])[at];
  }
}

// dst_k/dst_v row dst_rows[i] <- src_k/src_v row i, rows of `words` 16-byte words.
__global__ void ScatterRowsKernel(const uint4* __restrict__ src_k, const uint4* __restrict__ src_v,
                                  uint4* __restrict__ dst_k, uint4* __restrict__ dst_v,
                                  const int32_t* __restrict__ dst_rows, int64_t n, int words) {
  const int64_t total = n * words;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / words, w = idx % words;
    const int64_t at = static_cast<int64_t>(dst_rows[i]) * words + w;
    dst_k[at] = src_k[idx];
    dst_v[at] = src_v[idx];
  }
}

// ids[run.dst + j] = run.src + j for j < run.n (n <= 32): one warp-sized slice per run.
__global__ void ExpandRowRunsKernel(const int32_t* __restrict__ runs, int64_t n_runs,
                                    int32_t* __restrict__ ids) {
  const int64_t total = n_runs * 32;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / 32;
    const int j = static_cast<int>(idx % 32);
    const int32_t src = runs[3 * r], dst = runs[3 * r + 1], n = runs[3 * r + 2];
    if (j < n) ids[dst + j] = src + j;
  }
}

template <typename T>
__global__ void ConvertKernel(const T* __restrict__ in, int64_t n, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = ToF32(in[i]);
}

__global__ void FillKernel(float* __restrict__ out, float value, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = value;
}

int Blocks(int64_t words) {
  const int64_t b = (words + 255) / 256;
  return static_cast<int>(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

}  // namespace

Err LaunchRingAppend(const RingBatch& r, const void* new_k, const void* new_v, int n_new,
                     void* evict_k, void* evict_v, void* stream) {
  if (r.batch == 0 || n_new == 0) return {};
  const cudaStream_t st = AsStream(stream);
  KVRT_DISPATCH_DTYPE(r.dtype, T, {KVRT_DISPATCH_HEAD_DIM(r.head_dim, D, {
                        const int64_t words = static_cast<int64_t>(r.batch) * n_new * r.kv_heads *
                                              (D * sizeof(T) / 16);
                        RingAppendKernel<T, D><<<Blocks(words), 256, 0, st>>>(
                            r.ring_k, r.ring_v, r.write_pos, r.batch, r.capacity, r.kv_heads, n_new,
                            static_cast<const uint4*>(new_k), static_cast<const uint4*>(new_v),
                            static_cast<uint4*>(evict_k), static_cast<uint4*>(evict_v));
                      })})
  return LastLaunchErr();
}

Err LaunchRingAppendToStore(const RingBatch& r, const void* new_k, const void* new_v, int n_new,
                            const RingStoreTarget& store, int64_t* write_pos, int64_t* rows,
                            void* stream) {
  if (r.batch == 0) return {};
  const cudaStream_t st = AsStream(stream);
  if (n_new > 0) {
    KVRT_DISPATCH_DTYPE(r.dtype, T, {KVRT_DISPATCH_HEAD_DIM(r.head_dim, D, {
                          const int64_t words = static_cast<int64_t>(r.batch) * n_new * r.kv_heads *
                                                (D * sizeof(T) / 16);
                          RingAppendToStoreKernel<T, D><<<Blocks(words), 256, 0, st>>>(
                              r.ring_k, r.ring_v, write_pos, r.batch, r.capacity, r.kv_heads, n_new,
                              static_cast<const uint4*>(new_k), static_cast<const uint4*>(new_v),
                              store);
                        })})
    if (Err e = LastLaunchErr(); !e.ok()) return e;
  }
  RingAdvanceKernel<<<(r.batch + 127) / 128, 128, 0, st>>>(write_pos, rows, store.row_base, r.batch,
                                                           r.capacity, n_new);
  return LastLaunchErr();
}

Err LaunchRingAppendRows(const RingRows& r, const void* new_k, const void* new_v, int64_t n,
                         void* evict_k, void* evict_v, void* stream) {
  if (n == 0) return {};
  const int words = static_cast<int>(r.row_bytes / 16);
  RingAppendRowsKernel<<<Blocks(n * words), 256, 0, AsStream(stream)>>>(
      static_cast<uint4*>(r.k), static_cast<uint4*>(r.v), r.capacity, r.slot0, n, words,
      static_cast<const uint4*>(new_k), static_cast<const uint4*>(new_v),
      static_cast<uint4*>(evict_k), static_cast<uint4*>(evict_v));
  return LastLaunchErr();
}

Err LaunchRingAppendRowsToHeads(const RingRows& r, const void* new_k, const void* new_v, int64_t n,
                                const HeadRows& evict, void* stream) {
  if (n == 0) return {};
  const int words = static_cast<int>(r.row_bytes / 16);
  RingAppendRowsToHeadsKernel<<<Blocks(n * words), 256, 0, AsStream(stream)>>>(
      static_cast<uint4*>(r.k), static_cast<uint4*>(r.v), r.capacity, r.slot0, n, words,
      words / evict.heads, static_cast<const uint4*>(new_k), static_cast<const uint4*>(new_v),
      evict);
  return LastLaunchErr();
}

Err LaunchRingGather(const RingBatch& r, const int64_t* start, int count, void* out_k, void* out_v,
                     void* stream) {
  if (r.batch == 0 || count == 0) return {};
  const cudaStream_t st = AsStream(stream);
  KVRT_DISPATCH_DTYPE(r.dtype, T, {KVRT_DISPATCH_HEAD_DIM(r.head_dim, D, {
                        const int64_t words = static_cast<int64_t>(r.batch) * count * r.kv_heads *
                                              (D * sizeof(T) / 16);
                        RingGatherKernel<T, D><<<Blocks(words), 256, 0, st>>>(
                            r.ring_k, r.ring_v, start, r.batch, r.capacity, r.kv_heads, count,
                            static_cast<uint4*>(out_k), static_cast<uint4*>(out_v));
                      })})
  return LastLaunchErr();
}

Err LaunchScatterRows(const void* src_k, const void* src_v, void* dst_k, void* dst_v,
                      const int32_t* dst_rows, int64_t n, std::size_t row_bytes, void* stream) {
  if (n == 0) return {};
  const int words = static_cast<int>(row_bytes / 16);
  ScatterRowsKernel<<<Blocks(n * words), 256, 0, AsStream(stream)>>>(
      static_cast<const uint4*>(src_k), static_cast<const uint4*>(src_v),
      static_cast<uint4*>(dst_k), static_cast<uint4*>(dst_v), dst_rows, n, words);
  return LastLaunchErr();
}

Err LaunchExpandRowRuns(const int32_t* runs, int64_t n_runs, int32_t* ids, void* stream) {
  if (n_runs == 0) return {};
  ExpandRowRunsKernel<<<Blocks(n_runs * 32), 256, 0, AsStream(stream)>>>(runs, n_runs, ids);
  return LastLaunchErr();
}

// blockIdx.y: the span; 4-byte words (the spans' alignment), grid-strided.
struct CopySpanArgs {
  CopySpan span[kMaxCopySpans];
};
__global__ void CopySpansKernel(CopySpanArgs a) {
  const CopySpan s = a.span[blockIdx.y];
  const int64_t words = static_cast<int64_t>(s.bytes / 4);
  const auto* src = static_cast<const uint32_t*>(s.src);
  auto* dst = static_cast<uint32_t*>(s.dst);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

Err LaunchCopySpans(const CopySpan* spans, int n, void* stream) {
  CopySpanArgs a;
  int m = 0;
  int64_t longest = 0;
  for (int i = 0; i < n; ++i) {
    if (spans[i].bytes == 0) continue;
    a.span[m++] = spans[i];
    longest = std::max<int64_t>(longest, static_cast<int64_t>(spans[i].bytes / 4));
  }
  if (m == 0) return {};
  // Few CTAs: the copies are small (a step record: a mask of up to a few MiB) and often go over
  // PCIe into pinned memory, which a handful of CTAs saturates; the SMs stay with the step.
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(Blocks(longest), 16)), m);
  CopySpansKernel<<<grid, 256, 0, AsStream(stream)>>>(a);
  return LastLaunchErr();
}

Err LaunchFillF32(float* out, float value, int64_t n, void* stream) {
  if (n == 0) return {};
  FillKernel<<<Blocks(n), 256, 0, AsStream(stream)>>>(out, value, n);
  return LastLaunchErr();
}

Err PreloadRing(DType dtype) {
  Err err = LoadKernel(RingAppendRowsKernel);
  KVRT_DISPATCH_DTYPE(dtype, T, {
    if (err.ok()) err = LoadKernel(ConvertKernel<T>);
  })
  return err;
}

Err LaunchConvertToF32(const void* in, DType t, int64_t n, float* out, void* stream) {
  if (n == 0) return {};
  const int blocks = Blocks(n);
  switch (t) {
    case DType::kF32:
      ConvertKernel<<<blocks, 256, 0, AsStream(stream)>>>(static_cast<const float*>(in), n, out);
      break;
    case DType::kF16:
      ConvertKernel<<<blocks, 256, 0, AsStream(stream)>>>(static_cast<const __half*>(in), n, out);
      break;
    case DType::kBF16:
      ConvertKernel<<<blocks, 256, 0, AsStream(stream)>>>(static_cast<const __nv_bfloat16*>(in), n,
                                                          out);
      break;
    default:
      return {0, "unsupported dtype"};
  }
  return LastLaunchErr();
}

}  // namespace kvrt::gpu::detail
