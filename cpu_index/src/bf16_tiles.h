#pragma once
// The host attention's products on the CPU's AMX tiles (oneDNN's matmul): up to kTileHeads f32
// rows (queries, or softmax weights) against bf16 rows (keys, values, a summary's centroids or
// value means). The f32 operand goes in as three bf16 terms (x = hi + mid + lo: 8 + 8 + 8
// significant bits, exact for finite x above bf16's subnormals), stacked as 3 x kTileHeads rows of
// one product, so every product is exact and the result differs from an f32 loop's only in the
// order of its f32 sums (the tiles add along a row in their own order). A head's row of the
// product is computed alone and the product's shape is fixed (kTileHeads heads, kTileRows rows,
// padded with zeros), so a head's result does not depend on which or how many heads share the
// call. For wide groups (an MQA model's, MLA's latent: 16-128 heads over one kv head) a layer-step
// on the tiles took 1.3-2.0x less time than on the AVX-512 loops of dot.h (docs/benchmarks.md,
// forty-second session); the runtime takes them from groups of 8 (attention.h, UseHostTiles).
#include <cstddef>
#include <cstdint>

namespace kvrt::cpu_index::internal {

inline constexpr int kTileHeads = 16;
inline constexpr int64_t kTileRows = 256;

// Whether the products run on AMX here (oneDNN's choice of kernel), and the environment does not
// turn them off (KVRT_HOST_TILES=0, for A/B runs). Decided once per process; without them the
// callers keep their f32 loops.
bool AttentionTilesAvailable();

// bf16 rows, d values each: ptrs[j] when ptrs is set, else base + j * stride (elements).
struct TileRows {
  const uint16_t* base = nullptr;
  std::size_t stride = 0;
  const void* const* ptrs = nullptr;

  static TileRows Strided(const void* rows, std::size_t stride_elems) {
    TileRows r;
    r.base = static_cast<const uint16_t*>(rows);
    r.stride = stride_elems;
    return r;
  }
  static TileRows Listed(const void* const* rows) {
    TileRows r;
    r.ptrs = rows;
    return r;
  }
};

// s[h * s_stride + j] = x_h . row_j for h < nq, j < n (any n: blocks of kTileRows rows). x f32
// [nq, d]. False (s unspecified) where the tiles do not run (AttentionTilesAvailable), when x
// holds a non-finite value (its split would not be exact) or oneDNN failed: the caller computes
// the scores in f32.
bool TileScores(const float* x, int nq, int d, const TileRows& rows, int64_t n, float* s,
                std::size_t s_stride);

// y[h * d + i] = sum over j < n of w[h * w_stride + j] * row_j[i] for h < nq, 0 < n <= kTileRows
// (overwritten; y [nq, d]). A NaN weight makes its head's sums NaN, as in f32; every weight must
// be finite or NaN (softmax weights are). False (y unspecified) where the tiles do not run or
// oneDNN failed.
bool TileWeightedSums(const float* w, std::size_t w_stride, int nq, const TileRows& rows, int64_t n,
                      int d, float* y);

}  // namespace kvrt::cpu_index::internal
