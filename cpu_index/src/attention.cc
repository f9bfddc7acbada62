#include "kvrt_cpu_index/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bf16_tiles.h"
#include "kvrt_common/nan_max.h"
#include "kvrt_cpu_index/dot.h"
#include "kvrt_cpu_index/exp_sum.h"
#include "kvrt_cpu_index/head_store.h"

namespace kvrt::cpu_index {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A caller's choice of the tiles (attention.h): bf16 rows only (the tile functions refuse where
// the tiles do not run).
bool OnTiles(bool tiles, DType t) { return tiles && t == DType::kBF16; }

// Rows summed in f32 per block, blocks summed in f64: over 1M tokens the f32 rounding of a plain
// running sum (~n * eps) would reach 1e-4 relative; blocked, it stays near kBlock * eps.
constexpr int64_t kBlock = 128;
// Value rows fetched ahead of the weighted sum's use (each a few cache lines).
constexpr int64_t kPrefetchRows = 8;

// FinishGroup's sums on the tiles (bf16_tiles.h): blocks of kTileRows rows, f32 within (the
// tiles'), double across; a head's sums are its own whatever the group. Heads not live get weight
// 0 (their scores were left as they were). False when the tiles failed (nothing written).
bool WeightedSumsOnTiles(std::vector<float>& s, int nq, int64_t n, int d,
                         const std::vector<int>& live, const internal::TileRows& rows,
                         const std::vector<float>& m, const std::vector<double>& l, float* o,
                         float* lse) {
  if (static_cast<int>(live.size()) < nq) {
    std::vector<uint8_t> is_live(nq, 0);
    for (int h : live) is_live[h] = 1;
    for (int h = 0; h < nq; ++h)
      if (!is_live[h]) std::fill_n(s.data() + static_cast<std::size_t>(h) * n, n, 0.f);
  }
  std::vector<float> part(static_cast<std::size_t>(nq) * d);
  std::vector<double> acc(static_cast<std::size_t>(nq) * d, 0.0);
  for (int64_t b = 0; b < n; b += internal::kTileRows) {
    const int64_t len = std::min(internal::kTileRows, n - b);
    internal::TileRows at = rows;
    if (at.ptrs != nullptr)
      at.ptrs += b;
    else
      at.base += static_cast<std::size_t>(b) * at.stride;
    if (!internal::TileWeightedSums(s.data() + b, static_cast<std::size_t>(n), nq, at, len, d,
                                    part.data()))
      return false;
    for (std::size_t i = 0; i < acc.size(); ++i) acc[i] += part[i];
  }
  for (int h : live) {
    for (int i = 0; i < d; ++i)
      o[static_cast<std::size_t>(h) * d + i] =
          static_cast<float>(acc[static_cast<std::size_t>(h) * d + i] / l[h]);
    lse[h] = m[h] + static_cast<float>(std::log(l[h]));
  }
  return true;
}

// Softmax-weighted sums of value rows for nq heads over the same n rows, given each head's raw
// (already scaled) scores s [nq, n], overwritten; two passes. A head's arithmetic and its order do
// not depend on nq (one head's pass is nq = 1); each value row is converted once for all heads.
template <typename ValueAt>
void FinishGroup(std::vector<float>& s, int nq, int64_t n, int d, DType t, ValueAt value_at,
                 const internal::TileRows& value_rows, bool tiles, float* o, float* lse) {
  std::vector<float> m(nq, kNegInf);
  std::vector<double> l(nq, 0.0);
  std::vector<int> live;
  // On the tiles the weights take the vectorised exp the estimate uses (ExpSum, within 2^-22 of
  // libm's), where the max is finite: beside the tiles' products libm's scalar exp stood out.
  const bool on_tiles = OnTiles(tiles, t);
  for (int h = 0; h < nq; ++h) {
    float* sh = s.data() + static_cast<std::size_t>(h) * n;
    for (int i = 0; i < d; ++i) o[static_cast<std::size_t>(h) * d + i] = 0.f;
    // A NaN score makes the output NaN; an empty set, or every score -inf, contributes nothing.
    for (int64_t j = 0; j < n; ++j) m[h] = MaxPropagateNan(m[h], sh[j]);
    if (n == 0 || m[h] == kNegInf) {
      lse[h] = kNegInf;
      continue;
    }
    if (on_tiles && std::isfinite(m[h])) {
      l[h] = ExpSum(sh, n, m[h], sh);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        sh[j] = std::exp(sh[j] - m[h]);
        l[h] += sh[j];
      }
    }
    live.push_back(h);
  }
  if (live.empty()) return;
  if (on_tiles && WeightedSumsOnTiles(s, nq, n, d, live, value_rows, m, l, o, lse)) return;
  std::vector<float> row(d), part(static_cast<std::size_t>(nq) * d);
  const std::size_t row_bytes = static_cast<std::size_t>(d) * DTypeSize(t);
  std::vector<double> acc(static_cast<std::size_t>(nq) * d, 0.0);
  const void* rows[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    std::fill(part.begin(), part.end(), 0.f);
    // NOTE: no skip of weight-0 rows: 0 * NaN is NaN, so a NaN value reaches the output as in
    // the GPU kernel (which has no skip either).
    if (static_cast<int>(live.size()) == nq && nq > 1) {
      // Every head over the block's rows at once, their sums held in registers over the block
      // (AddWeightedRowPointers: each head's arithmetic and order as AddScaledRow row by row).
      for (int64_t j = b; j < e; ++j) rows[j - b] = value_at(j);
      AddWeightedRowPointers(s.data() + b, static_cast<std::size_t>(n), nq, rows, t, e - b, d,
                             part.data());
    } else {
      for (int64_t j = b; j < e; ++j) {
        // The rows are scattered (a store's selected rows, a kv head's rows of an interleaved
        // ring): the pass waited on each row's load (profiled); fetch a few rows ahead.
        if (j + kPrefetchRows < n) {
          const auto* ahead = reinterpret_cast<const char*>(value_at(j + kPrefetchRows));
          for (std::size_t at = 0; at < row_bytes; at += 64) __builtin_prefetch(ahead + at);
        }
        ConvertToF32(value_at(j), t, d, row.data());
        // (Every head live takes this path only for a group of one: AddScaledRow over it alone.)
        for (int h : live)
          AddScaledRow(s.data() + static_cast<std::size_t>(h) * n + j, 0, 1, row.data(),
                       part.data() + static_cast<std::size_t>(h) * d, d);
      }
    }
    for (int h : live)
      for (int i = 0; i < d; ++i)
        acc[static_cast<std::size_t>(h) * d + i] += part[static_cast<std::size_t>(h) * d + i];
  }
  for (int h : live) {
    for (int i = 0; i < d; ++i)
      o[static_cast<std::size_t>(h) * d + i] =
          static_cast<float>(acc[static_cast<std::size_t>(h) * d + i] / l[h]);
    lse[h] = m[h] + static_cast<float>(std::log(l[h]));
  }
}

// s [nq, n] <- each head's score of key_at(j), j < n: each key scored by every head at once
// (DotRowMulti: DotRow's scores, bit for bit, for any nq; a bf16 row widened once for all).
template <typename KeyAt>
void ScoreGroup(const float* q, int nq, int d, DType t, int64_t n, KeyAt key_at,
                const internal::TileRows& key_rows, bool tiles, float* s) {
  if (OnTiles(tiles, t) &&
      internal::TileScores(q, nq, d, key_rows, n, s, static_cast<std::size_t>(n)))
    return;
  std::vector<float> row_scores(nq);
  for (int64_t j = 0; j < n; ++j) {
    DotRowMulti(q, nq, key_at(j), d, t, row_scores.data());
    for (int h = 0; h < nq; ++h) s[static_cast<std::size_t>(h) * n + j] = row_scores[h];
  }
}

// One head: s [n].
template <typename ValueAt>
void Finish(std::vector<float>& s, int d, DType t, ValueAt value_at,
            const internal::TileRows& value_rows, bool tiles, float* o, float* lse) {
  FinishGroup(s, 1, static_cast<int64_t>(s.size()), d, t, value_at, value_rows, tiles, o, lse);
}

}  // namespace

void AttendDense(const float* q, int d, float scale, const void* keys, const void* values,
                 std::size_t stride_elems, DType t, int64_t n, float* o, float* lse, bool tiles) {
  AttendDenseGroup(q, 1, d, scale, keys, values, stride_elems, t, n, o, lse, tiles);
}

void AttendDenseGroup(const float* q, int nq, int d, float scale, const void* keys,
                      const void* values, std::size_t stride_elems, DType t, int64_t n, float* o,
                      float* lse, bool tiles) {
  std::vector<float> s(static_cast<std::size_t>(nq) * n);
  const std::size_t stride_bytes = stride_elems * DTypeSize(t);
  auto* kb = static_cast<const unsigned char*>(keys);
  ScoreGroup(
      q, nq, d, t, n, [&](int64_t j) { return kb + j * stride_bytes; },
      internal::TileRows::Strided(keys, stride_elems), tiles, s.data());
  for (auto& x : s) x *= scale;
  auto* vb = static_cast<const unsigned char*>(values);
  FinishGroup(
      s, nq, n, d, t, [&](int64_t j) { return vb + j * stride_bytes; },
      internal::TileRows::Strided(values, stride_elems), tiles, o, lse);
}

void AttendRowPointers(const float* q, int d, float scale, DType t, int64_t n,
                       const void* const* keys, const void* const* values, float* o, float* lse,
                       bool tiles) {
  std::vector<float> s(n);
  ScoreGroup(
      q, 1, d, t, n, [&](int64_t j) { return keys[j]; }, internal::TileRows::Listed(keys), tiles,
      s.data());
  for (auto& x : s) x *= scale;
  Finish(
      s, d, t, [&](int64_t j) { return values[j]; }, internal::TileRows::Listed(values), tiles, o,
      lse);
}

void AttendStoreRows(const float* q, float scale, const HeadStore& store, const int64_t* ids,
                     int64_t n, float* o, float* lse, bool tiles) {
  AttendStoreRowsGroup(q, 1, scale, store, ids, n, o, lse, tiles);
}

void AttendStoreRowsGroup(const float* q, int nq, float scale, const HeadStore& store,
                          const int64_t* ids, int64_t n, float* o, float* lse, bool tiles) {
  const int d = store.dim();
  std::vector<float> s(static_cast<std::size_t>(nq) * n);
  // The tiles take the rows by pointer.
  std::vector<const void*> keys, values;
  if (OnTiles(tiles, store.dtype())) {
    keys.resize(n);
    values.resize(n);
    for (int64_t j = 0; j < n; ++j) keys[j] = store.key(ids[j]), values[j] = store.value(ids[j]);
  }
  ScoreGroup(
      q, nq, d, store.dtype(), n, [&](int64_t j) { return store.key(ids[j]); },
      internal::TileRows::Listed(keys.data()), tiles, s.data());
  for (auto& x : s) x *= scale;
  FinishGroup(
      s, nq, n, d, store.dtype(), [&](int64_t j) { return store.value(ids[j]); },
      internal::TileRows::Listed(values.data()), tiles, o, lse);
}

bool UseHostTiles(int q_heads_per_kv_head) {
  return q_heads_per_kv_head >= 8 && internal::AttentionTilesAvailable();
}

int GroupPassHeads(bool tiles) { return tiles ? internal::kTileHeads : 4; }

void AttendStoreAll(const float* q, float scale, const HeadStore& store, float* o, float* lse,
                    bool tiles) {
  AttendDense(q, store.dim(), scale, store.keys(), store.values(), store.dim(), store.dtype(),
              store.size(), o, lse, tiles);
}

void MergeInto(float* o1, float* lse1, const float* o2, float lse2, int d) {
  if (lse2 == kNegInf) return;
  if (*lse1 == kNegInf) {
    for (int i = 0; i < d; ++i) o1[i] = o2[i];
    *lse1 = lse2;
    return;
  }
  const float m = std::max(*lse1, lse2);
  const float lse = m + std::log(std::exp(*lse1 - m) + std::exp(lse2 - m));
  const float w1 = std::exp(*lse1 - lse), w2 = std::exp(lse2 - lse);
  for (int i = 0; i < d; ++i) o1[i] = w1 * o1[i] + w2 * o2[i];
  *lse1 = lse;
}

void MergeStates(int n, const float* const* o, const float* lse, int d, float* o_out,
                 float* lse_out) {
  // A left fold of MergeInto: the same arithmetic as merging the states one at a time, so the host
  // backend's results do not depend on how many states a step merges at once.
  std::vector<float> acc(d, 0.f);
  float l = kNegInf;
  for (int i = 0; i < n; ++i) MergeInto(acc.data(), &l, o[i], lse[i], d);
  std::copy(acc.begin(), acc.end(), o_out);
  *lse_out = l;
}

}  // namespace kvrt::cpu_index
