// Host references of the direct step (direct_attend.h): the path without a GPU and the oracle of
// the kernels' tests. Each q head's rows are gathered (clusters in index order, then extra rows,
// then the tail) and attended by cpu_index::AttendRowPointers, the host backend's own attention
// (f32 dot products, double sums). Unlike the kernels, the references check the data too.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "direct_check.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_gpu/direct_attend.h"

namespace kvrt::gpu {
namespace {

const unsigned char* Bytes(const void* p) { return static_cast<const unsigned char*>(p); }
unsigned char* Bytes(void* p) { return static_cast<unsigned char*>(p); }

uint32_t GroupBits(int group) { return group == 32 ? ~0u : (1u << group) - 1u; }

std::size_t RowBytes(const DirectRowsView& v) {
  return static_cast<std::size_t>(v.head_dim) * DTypeSize(v.dtype);
}

// A row of the union of kv head g's sets and the q heads (bits) that attend it.
struct Row {
  int64_t row;
  uint32_t bits;
};

// rows: the store's row count (RowsNow).
absl::Status GatherRows(const DirectRowsView& v, const uint32_t* mask, int g, int64_t rows,
                        std::vector<Row>* out) {
  const uint32_t all = GroupBits(v.q_heads / v.kv_heads);
  const std::size_t base_c = static_cast<std::size_t>(g) * v.num_clusters;
  out->clear();
  for (int c = 0; c < v.num_clusters; ++c) {
    const uint32_t bits = mask[base_c + c] & all;
    const int64_t b = v.cluster_begin[base_c + c], n = v.cluster_size[base_c + c];
    if (bits == 0 || n <= 0) continue;  // not selected, or padding
    if (b < 0 || b + n > rows) {
      return absl::InvalidArgumentError(absl::StrCat("DirectAttendHost: cluster ", c,
                                                     " of kv head ", g, " [", b, ", ", b + n,
                                                     ") outside rows"));
    }
    for (int64_t r = b; r < b + n; ++r) out->push_back({r, bits});
  }
  for (int e = 0; e < v.num_extra; ++e) {
    const int64_t r = v.extra[static_cast<std::size_t>(g) * v.num_extra + e];
    if (r < 0) continue;  // padding
    if (r >= v.rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("DirectAttendHost: extra row ", r, " of kv head ", g, " >= rows"));
    }
    if (r >= rows) continue;  // past the row count read at this step (rows_now): as the kernel
    out->push_back({r, all});
  }
  const int64_t tail = v.tail_begin[g];
  if (tail < 0) return absl::InvalidArgumentError("DirectAttendHost: tail_begin < 0");
  for (int64_t r = tail; r < rows; ++r) out->push_back({r, all});
  return absl::OkStatus();
}

}  // namespace

absl::Status MarkSelectedHost(const int32_t* selected, const int32_t* count, int q_heads,
                              int kv_heads, int num_clusters, uint32_t* mask) {
  if (auto s = detail::CheckMarkSelected(selected, count, q_heads, kv_heads, num_clusters, mask,
                                         "MarkSelectedHost");
      !s.ok()) {
    return s;
  }
  const int group = q_heads / kv_heads;
  const int c_n = num_clusters;
  if (c_n == 0) return absl::OkStatus();
  std::fill(mask, mask + static_cast<std::size_t>(kv_heads) * c_n, 0u);
  for (int h = 0; h < q_heads; ++h) {
    const int n = std::min(count[h], c_n);
    uint32_t* row = mask + static_cast<std::size_t>(h / group) * c_n;
    for (int j = 0; j < n; ++j) {
      const int32_t c = selected[static_cast<std::size_t>(h) * c_n + j];
      if (c >= 0 && c < c_n) row[c] |= 1u << (h % group);
    }
  }
  return absl::OkStatus();
}

absl::Status DirectAttendHost(const DirectRowsView& v, const uint32_t* mask, const float* q,
                              float scale, float* o, float* lse, int64_t* read_rows,
                              const int64_t* rows_now) {
  if (auto s = detail::CheckDirectAttend(v, mask, q, scale, o, lse, "DirectAttendHost"); !s.ok()) {
    return s;
  }
  const int group = v.q_heads / v.kv_heads, d = v.head_dim;
  const float sc = scale != 0.f ? scale : 1.f / std::sqrt(float(d));
  const std::size_t row_bytes = RowBytes(v);
  std::vector<Row> rows;
  std::vector<const void*> ks, vs, hk, hv;
  for (int g = 0; g < v.kv_heads; ++g) {
    if (auto s = GatherRows(v, mask, g, RowsNow(v.rows, rows_now), &rows); !s.ok()) return s;
    // Where each row is read: the pool page of its block, else the host store.
    ks.resize(rows.size());
    vs.resize(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const int64_t r = rows[i].row;
      const int32_t entry =
          v.block_page[static_cast<std::size_t>(g) * v.blocks_per_head + r / kDirectBlockRows];
      int32_t page = entry;
      if (v.staged_pages) {
        // The page only where it holds the row (a page out of range is refused below).
        page = StagedPage(entry) >= v.pages ? StagedPage(entry)
               : StagedHolds(entry, r)      ? StagedPage(entry)
                                            : -1;
      }
      if (page < -1 || page >= v.pages) {
        return absl::InvalidArgumentError(
            absl::StrCat("DirectAttendHost: page ", page, " outside [-1, pages)"));
      }
      if (page < 0 && v.staged_pages) {
        const uint32_t slot = (*v.stage_count)++;
        if (slot < v.stage_cap) {
          std::memcpy(Bytes(v.stage_k) + slot * row_bytes,
                      Bytes(v.store_k[g]) + static_cast<std::size_t>(r) * row_bytes, row_bytes);
          std::memcpy(Bytes(v.stage_v) + slot * row_bytes,
                      Bytes(v.store_v[g]) + static_cast<std::size_t>(r) * row_bytes, row_bytes);
          v.stage_row[slot] = (static_cast<int64_t>(g) << 32) | r;
        }
      }
      if (page >= 0) {
        const std::size_t at =
            (static_cast<std::size_t>(page) * kDirectBlockRows + r % kDirectBlockRows) * row_bytes;
        ks[i] = Bytes(v.pool_k) + at;
        vs[i] = Bytes(v.pool_v) + at;
      } else {
        ks[i] = Bytes(v.store_k[g]) + static_cast<std::size_t>(r) * row_bytes;
        vs[i] = Bytes(v.store_v[g]) + static_cast<std::size_t>(r) * row_bytes;
      }
      if (read_rows != nullptr) ++read_rows[page >= 0 ? 0 : 1];
    }
    for (int j = 0; j < group; ++j) {
      hk.clear();
      hv.clear();
      for (std::size_t i = 0; i < rows.size(); ++i) {
        if ((rows[i].bits >> j) & 1u) {
          hk.push_back(ks[i]);
          hv.push_back(vs[i]);
        }
      }
      const std::size_t h = static_cast<std::size_t>(g) * group + j;
      cpu_index::AttendRowPointers(q + h * d, d, sc, v.dtype, static_cast<int64_t>(hk.size()),
                                   hk.data(), hv.data(), o + h * d, lse + h);
    }
  }
  return absl::OkStatus();
}

absl::Status FillPagesHost(const DirectRowsView& v, const int32_t* updates, int n) {
  if (auto s = detail::CheckFillPages(v, updates, n, "FillPagesHost"); !s.ok()) return s;
  // Every update is checked before any is applied, so a refused call changes nothing.
  const int64_t entries = static_cast<int64_t>(v.kv_heads) * v.blocks_per_head;
  auto page_of = [](int32_t raw) { return raw < 0 ? raw : raw & ~kFillPagesCopy; };
  for (int i = 0; i < n; ++i) {
    const int64_t idx = updates[2 * i], page = page_of(updates[2 * i + 1]);
    if (idx < 0 || idx >= entries || page < -1 || page >= v.pages) {
      return absl::InvalidArgumentError(
          absl::StrCat("FillPagesHost: update ", i, " (", idx, ", ", page, ") out of range"));
    }
    if (page >= 0 && (idx % v.blocks_per_head + 1) * kDirectBlockRows > v.rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("FillPagesHost: update ", i, " pages a partial block (rows ", v.rows, ")"));
    }
  }
  const std::size_t page_bytes = kDirectBlockRows * RowBytes(v);
  for (int i = 0; i < n; ++i) {
    const int32_t idx = updates[2 * i], page = page_of(updates[2 * i + 1]);
    const bool copy = !v.staged_pages || (updates[2 * i + 1] & kFillPagesCopy) != 0;
    if (page >= 0 && copy) {
      const int64_t g = idx / v.blocks_per_head, b = idx % v.blocks_per_head;
      const std::size_t from = static_cast<std::size_t>(b) * page_bytes;
      const std::size_t to = static_cast<std::size_t>(page) * page_bytes;
      std::memcpy(Bytes(v.pool_k) + to, Bytes(v.store_k[g]) + from, page_bytes);
      std::memcpy(Bytes(v.pool_v) + to, Bytes(v.store_v[g]) + from, page_bytes);
    }
    int32_t entry = page >= 0 ? page : -1;
    if (page >= 0 && copy && v.staged_pages) entry = StagedWholeBlock(page);
    v.block_page[idx] = entry;
  }
  return absl::OkStatus();
}

absl::Status MissPenaltyOffsetsHost(const DirectRowsView& v, float penalty, float* offset) {
  if (auto s = detail::CheckMissPenalty(v, penalty, offset, "MissPenaltyOffsetsHost"); !s.ok())
    return s;
  for (int64_t at = 0; at < static_cast<int64_t>(v.kv_heads) * v.num_clusters; ++at) {
    const int32_t n = v.cluster_size[at];
    offset[at] =
        n <= 0 ? 0.f
               : penalty * static_cast<float>(ClusterRowsNotInPool(v, at)) / static_cast<float>(n);
  }
  return absl::OkStatus();
}

absl::Status CommitStagedHost(const DirectRowsView& v) {
  if (auto s = detail::CheckCommitStaged(v, "CommitStagedHost"); !s.ok()) return s;
  const std::size_t row_bytes = RowBytes(v);
  const int64_t n = std::min<int64_t>(*v.stage_count, v.stage_cap);
  for (int64_t slot = 0; slot < n; ++slot) {
    const int64_t g = v.stage_row[slot] >> 32, r = v.stage_row[slot] & 0xffffffff;
    if (g < 0 || g >= v.kv_heads || r >= v.rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("CommitStagedHost: staged row ", slot, " (", g, ", ", r, ") out of range"));
    }
    int32_t& entry = v.block_page[g * v.blocks_per_head + r / kDirectBlockRows];
    const int32_t page = StagedPage(entry);
    if (page < 0 || page >= v.pages) continue;
    const std::size_t to =
        (static_cast<std::size_t>(page) * kDirectBlockRows + r % kDirectBlockRows) * row_bytes;
    std::memcpy(Bytes(v.pool_k) + to, Bytes(v.stage_k) + slot * row_bytes, row_bytes);
    std::memcpy(Bytes(v.pool_v) + to, Bytes(v.stage_v) + slot * row_bytes, row_bytes);
    entry = static_cast<int32_t>(static_cast<uint32_t>(entry) | StagedRowBit(r));
  }
  *v.stage_count = 0;
  return absl::OkStatus();
}

}  // namespace kvrt::gpu
