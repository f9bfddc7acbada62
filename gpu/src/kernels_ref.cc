// Host references of the GPU-tier kernels (kernels.h): plain loops, f32 accumulation, the same
// semantics as the CUDA kernels and the path that runs when there is no GPU.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_gpu/kernels.h"
#include "ring_check.h"

namespace kvrt::gpu {
namespace {

float ScaleOr(float scale, int d) { return scale != 0.f ? scale : 1.f / std::sqrt(float(d)); }

// Row r (head_dim elements) of q as f32.
void QRow(const void* q, bool q_is_f32, DType t, std::size_t r, int d, float* out) {
  if (q_is_f32) {
    std::memcpy(out, static_cast<const float*>(q) + r * d, sizeof(float) * d);
  } else {
    ConvertToF32(static_cast<const unsigned char*>(q) + r * d * DTypeSize(t), t, d, out);
  }
}

const unsigned char* Bytes(const void* p) { return static_cast<const unsigned char*>(p); }
unsigned char* Bytes(void* p) { return static_cast<unsigned char*>(p); }

}  // namespace

void TierAttentionBatchHost(const TierBatch& t, const void* q, const AttnParams& p, float* o,
                            float* lse) {
  const int d = t.head_dim;
  std::vector<float> qf(static_cast<std::size_t>(p.q_heads) * d);
  for (int b = 0; b < t.batch; ++b) {
    for (int h = 0; h < p.q_heads; ++h) {
      QRow(q, p.q_is_f32, t.dtype, static_cast<std::size_t>(b) * p.q_heads + h, d,
           qf.data() + static_cast<std::size_t>(h) * d);
    }
    TierView v;
    v.sink_k = t.sink_k[b];
    v.sink_v = t.sink_v[b];
    v.n_sink = t.n_sink[b];
    v.window_k = t.window_k[b];
    v.window_v = t.window_v[b];
    v.n_window = t.n_window[b];
    v.kv_heads = t.kv_heads;
    v.head_dim = d;
    v.dtype = t.dtype;
    // TierAttentionHost applies `scale` as given; resolve the 0 = 1/sqrt(d) default here.
    const std::size_t row0 = static_cast<std::size_t>(b) * p.q_heads;
    TierAttentionHost(v, qf.data(), p.q_heads, ScaleOr(p.scale, d), o + row0 * d, lse + row0);
  }
}

void MergeStatesToHost(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                       int rows, int d, void* out, DType out_dtype, float* lse_out) {
  std::vector<float> row(d);
  for (int r = 0; r < rows; ++r) {
    const std::size_t base = static_cast<std::size_t>(r) * d;
    const float* os[2] = {o_a + base, o_b + base};
    const float ls[2] = {lse_a[r], lse_b[r]};
    float l;
    cpu_index::MergeStates(2, os, ls, d, row.data(), &l);
    ConvertFromF32(row.data(), d, out_dtype, Bytes(out) + base * DTypeSize(out_dtype));
    if (lse_out != nullptr) lse_out[r] = l;
  }
}

void MergeStatesNHost(const float* o, const float* lse, int n_states, int rows, int d, void* out,
                      DType out_dtype, float* lse_out) {
  std::vector<const float*> os(n_states);
  std::vector<float> ls(n_states), row(d);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < n_states; ++i) {
      os[i] = o + (static_cast<std::size_t>(i) * rows + r) * d;
      ls[i] = lse[static_cast<std::size_t>(i) * rows + r];
    }
    float l;
    cpu_index::MergeStates(n_states, os.data(), ls.data(), d, row.data(), &l);
    ConvertFromF32(row.data(), d, out_dtype,
                   Bytes(out) + static_cast<std::size_t>(r) * d * DTypeSize(out_dtype));
    if (lse_out != nullptr) lse_out[r] = l;
  }
}

void RingAppendHost(const RingBatch& r, const void* new_k, const void* new_v, int n_new,
                    void* evict_k, void* evict_v) {
  const std::size_t tok = static_cast<std::size_t>(r.kv_heads) * r.head_dim * DTypeSize(r.dtype);
  for (int b = 0; b < r.batch; ++b) {
    for (int i = 0; i < n_new; ++i) {
      const int64_t pos = r.write_pos[b] + i;
      const std::size_t at = static_cast<std::size_t>(pos % r.capacity) * tok;
      const std::size_t src = (static_cast<std::size_t>(b) * n_new + i) * tok;
      if (evict_k != nullptr && pos >= r.capacity) {
        std::memcpy(Bytes(evict_k) + src, Bytes(r.ring_k[b]) + at, tok);
        std::memcpy(Bytes(evict_v) + src, Bytes(r.ring_v[b]) + at, tok);
      }
      std::memcpy(Bytes(r.ring_k[b]) + at, Bytes(new_k) + src, tok);
      std::memcpy(Bytes(r.ring_v[b]) + at, Bytes(new_v) + src, tok);
    }
  }
}

absl::Status RingAppendToStoreHost(const RingBatch& r, const void* new_k, const void* new_v,
                                   int n_new, const RingStoreTarget& store, int64_t* write_pos,
                                   int64_t* rows) {
  constexpr const char* kFn = "RingAppendToStoreHost";
  if (auto s = detail::CheckRingToStore(r, new_k, new_v, n_new, store, write_pos, kFn); !s.ok())
    return s;
  for (int b = 0; b < r.batch; ++b) {
    // Ring positions [first, end) leave: those of tokens whose slot held one.
    const int64_t first = std::max<int64_t>(0, write_pos[b] - r.capacity);
    const int64_t end = write_pos[b] + n_new - r.capacity;
    if (write_pos[b] < 0 || (end > first && (store.row_base[b] + first < 0 ||
                                             store.row_base[b] + end > store.store_rows))) {
      return absl::InvalidArgumentError(absl::StrCat(
          kFn, ": sequence ", b, " evicts to store rows outside [0, ", store.store_rows, ")"));
    }
  }
  const std::size_t row = static_cast<std::size_t>(r.head_dim) * DTypeSize(r.dtype);
  const std::size_t tok = r.kv_heads * row;
  for (int b = 0; b < r.batch; ++b) {
    for (int i = 0; i < n_new; ++i) {
      const int64_t pos = write_pos[b] + i;
      const std::size_t at = static_cast<std::size_t>(pos % r.capacity) * tok;
      const std::size_t src = (static_cast<std::size_t>(b) * n_new + i) * tok;
      if (pos >= r.capacity) {
        const std::size_t dst =
            static_cast<std::size_t>(store.row_base[b] + pos - r.capacity) * row;
        for (int g = 0; g < r.kv_heads; ++g) {
          const std::size_t sg = static_cast<std::size_t>(b) * r.kv_heads + g;
          std::memcpy(Bytes(store.store_k[sg]) + dst, Bytes(r.ring_k[b]) + at + g * row, row);
          std::memcpy(Bytes(store.store_v[sg]) + dst, Bytes(r.ring_v[b]) + at + g * row, row);
        }
      }
      std::memcpy(Bytes(r.ring_k[b]) + at, Bytes(new_k) + src, tok);
      std::memcpy(Bytes(r.ring_v[b]) + at, Bytes(new_v) + src, tok);
    }
    write_pos[b] += n_new;
    if (rows != nullptr)
      rows[b] = store.row_base[b] + std::max<int64_t>(0, write_pos[b] - r.capacity);
  }
  return absl::OkStatus();
}

void RingAppendRowsHost(const RingRows& r, const void* new_k, const void* new_v, int64_t n,
                        void* evict_k, void* evict_v) {
  for (int64_t i = 0; i < n; ++i) {
    const std::size_t at = static_cast<std::size_t>((r.slot0 + i) % r.capacity) * r.row_bytes;
    const std::size_t src = static_cast<std::size_t>(i) * r.row_bytes;
    if (evict_k != nullptr) {
      std::memcpy(Bytes(evict_k) + src, Bytes(r.k) + at, r.row_bytes);
      std::memcpy(Bytes(evict_v) + src, Bytes(r.v) + at, r.row_bytes);
    }
    std::memcpy(Bytes(r.k) + at, Bytes(new_k) + src, r.row_bytes);
    std::memcpy(Bytes(r.v) + at, Bytes(new_v) + src, r.row_bytes);
  }
}

absl::Status RingAppendRowsToHeadsHost(const RingRows& r, const void* new_k, const void* new_v,
                                       int64_t n, const HeadRows& evict) {
  if (auto s = detail::CheckRingRowsToHeads(r, new_k, new_v, n, evict); !s.ok()) return s;
  const std::size_t hb = r.row_bytes / static_cast<std::size_t>(evict.heads);
  for (int64_t i = 0; i < n; ++i) {
    const std::size_t at = static_cast<std::size_t>((r.slot0 + i) % r.capacity) * r.row_bytes;
    const std::size_t src = static_cast<std::size_t>(i) * r.row_bytes;
    for (int g = 0; g < evict.heads; ++g) {
      std::memcpy(Bytes(evict.k[g]) + i * hb, Bytes(r.k) + at + g * hb, hb);
      std::memcpy(Bytes(evict.v[g]) + i * hb, Bytes(r.v) + at + g * hb, hb);
    }
    std::memcpy(Bytes(r.k) + at, Bytes(new_k) + src, r.row_bytes);
    std::memcpy(Bytes(r.v) + at, Bytes(new_v) + src, r.row_bytes);
  }
  return absl::OkStatus();
}

void RingGatherHost(const RingBatch& r, const int64_t* start, int count, void* out_k, void* out_v) {
  const std::size_t tok = static_cast<std::size_t>(r.kv_heads) * r.head_dim * DTypeSize(r.dtype);
  for (int b = 0; b < r.batch; ++b) {
    for (int i = 0; i < count; ++i) {
      const std::size_t at = static_cast<std::size_t>((start[b] + i) % r.capacity) * tok;
      const std::size_t dst = (static_cast<std::size_t>(b) * count + i) * tok;
      std::memcpy(Bytes(out_k) + dst, Bytes(r.ring_k[b]) + at, tok);
      std::memcpy(Bytes(out_v) + dst, Bytes(r.ring_v[b]) + at, tok);
    }
  }
}

void ScatterRowsHost(const void* src_k, const void* src_v, void* dst_k, void* dst_v,
                     const int32_t* dst_rows, int64_t n, std::size_t row_bytes) {
  for (int64_t i = 0; i < n; ++i) {
    const std::size_t at = static_cast<std::size_t>(dst_rows[i]) * row_bytes;
    std::memcpy(Bytes(dst_k) + at, static_cast<const unsigned char*>(src_k) + i * row_bytes,
                row_bytes);
    std::memcpy(Bytes(dst_v) + at, static_cast<const unsigned char*>(src_v) + i * row_bytes,
                row_bytes);
  }
}

void CopySpansHost(const CopySpan* spans, int n) {
  for (int i = 0; i < n; ++i)
    if (spans[i].bytes > 0) std::memcpy(spans[i].dst, spans[i].src, spans[i].bytes);
}

void ExpandRowRunsHost(const int32_t* runs, int64_t n_runs, int32_t* ids) {
  for (int64_t r = 0; r < n_runs; ++r)
    for (int32_t j = 0; j < runs[3 * r + 2]; ++j) ids[runs[3 * r + 1] + j] = runs[3 * r] + j;
}

void GatherAttendHost(const GatherBatch& g, const void* q, bool q_is_f32, float scale, float* o,
                      float* lse) {
  const int d = g.head_dim;
  const std::size_t row_bytes = static_cast<std::size_t>(d) * DTypeSize(g.dtype);
  std::vector<float> qf(d);
  for (int r = 0; r < g.rows_q; ++r) {
    QRow(q, q_is_f32, g.dtype, r, d, qf.data());
    const int32_t base = g.row_offsets[r];
    const int64_t n = g.row_offsets[r + 1] - base;
    std::vector<const void*> keys(n), values(n);
    for (int64_t j = 0; j < n; ++j) {
      const auto row =
          static_cast<std::size_t>(g.row_ids != nullptr ? g.row_ids[base + j] : base + j);
      keys[j] = Bytes(g.k) + row * row_bytes;
      values[j] = Bytes(g.v) + row * row_bytes;
    }
    cpu_index::AttendRowPointers(qf.data(), d, ScaleOr(scale, d), g.dtype, n, keys.data(),
                                 values.data(), o + static_cast<std::size_t>(r) * d, lse + r);
  }
}

void ExactTopKHost(const TopKProblem& pr, int32_t* ids, float* scores) {
  const int d = pr.head_dim;
  const std::size_t esz = DTypeSize(pr.dtype);
  std::vector<float> qf(d), kf(static_cast<std::size_t>(pr.nk) * d), s(pr.nk);
  for (int64_t j = 0; j < pr.nk; ++j) {
    ConvertToF32(Bytes(pr.k) + static_cast<std::size_t>(j * pr.k_stride) * esz, pr.dtype, d,
                 kf.data() + j * d);
  }
  std::vector<int32_t> order(pr.nk);
  for (int64_t i = 0; i < pr.nq; ++i) {
    if (pr.q_is_f32) {
      std::memcpy(qf.data(), static_cast<const float*>(pr.q) + i * pr.q_stride, sizeof(float) * d);
    } else {
      ConvertToF32(Bytes(pr.q) + static_cast<std::size_t>(i * pr.q_stride) * esz, pr.dtype, d,
                   qf.data());
    }
    for (int64_t j = 0; j < pr.nk; ++j) {
      float acc = 0.f;
      for (int c = 0; c < d; ++c) acc += qf[c] * kf[j * d + c];
      s[j] = acc * pr.scale;
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + pr.topk, order.end(),
                      [&](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
    for (int c = 0; c < pr.topk; ++c) {
      ids[i * pr.topk + c] = order[c];
      scores[i * pr.topk + c] = s[order[c]];
    }
  }
}

}  // namespace kvrt::gpu
