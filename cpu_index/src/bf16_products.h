#pragma once
// Products of many f32 rows with a set of f32 centroids, computed in bf16 on the CPU's AMX tiles
// (oneDNN's matmul), for screening the k-means' nearest-centroid search (cluster_kmeans.cc):
// several times an f32 GEMM's speed, and each product off from the exact one by at most
// kBf16ProductError * |row| * |centroid|, so that the screen can keep every centroid that may be
// the nearest and decide among them in f32. Only where oneDNN runs it on AMX (a bf16 product
// emulated on AVX-512 is slower than OpenBLAS's f32 GEMM); KVRT_KMEANS_BF16=0 turns it off.
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvrt::cpu_index::internal {

// bf16 keeps 8 significant bits: each input of a product is within 2^-8 of itself relatively, so
// a product within 2^-7 + 2^-16; the tiles add the exact products in f32, off by at most d * 2^-24
// of the sum of their magnitudes (2^-12 up to d = 4096), and an f32 rescoring of the candidates
// as much again. Summed over a row, by Cauchy-Schwarz, |error| <= this * |row| * |centroid|.
inline constexpr float kBf16ProductError = 1.f / 128 + 1.f / 1024;

// Whether the bf16 products run on AMX here (oneDNN's choice of kernel for this shape), and the
// environment does not turn them off (KVRT_KMEANS_BF16=0). Decided once per process.
bool Bf16ProductsAvailable();

// Rows [n, d] in bf16 (round to nearest even), in blocks of block_rows() rows, the last padded
// with zero rows: converted once, multiplied by many centroid sets (a k-means' iterations). A
// block is kMaxBlockRows rows, fewer when n is (rounded up to 32), and fewer when its scores
// against `columns` centroids would pass kMaxBlockScores (a thread keeps one block's scores).
class Bf16Rows {
 public:
  static constexpr int64_t kMaxBlockRows = 1024;
  static constexpr int64_t kMaxBlockScores = int64_t{1} << 20;  // 4 MiB of f32
  Bf16Rows(const float* x, int64_t n, int d, int64_t columns);
  int64_t rows() const { return n_; }
  int dim() const { return d_; }
  int64_t block_rows() const { return block_rows_; }
  int64_t blocks() const { return (n_ + block_rows_ - 1) / block_rows_; }
  const uint16_t* block(int64_t b) const {
    return data_.data() + static_cast<std::size_t>(b) * block_rows_ * d_;
  }

 private:
  int64_t n_;
  int d_;
  int64_t block_rows_;
  std::vector<uint16_t> data_;
};

// A centroid set [c, d] laid out for the tiles. Block() may run on many threads at once.
class Bf16Products {
 public:
  // For rows of `block_rows` rows per block (Bf16Rows::block_rows()).
  static absl::StatusOr<std::unique_ptr<Bf16Products>> Make(const float* centroids, int64_t c,
                                                            int d, int64_t block_rows);
  ~Bf16Products();
  // g [rows.block_rows(), c] <- block b of rows . centroids^T.
  absl::Status Block(const Bf16Rows& rows, int64_t b, float* g) const;

  struct Impl;

 private:
  explicit Bf16Products(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// x [n, d] <- rows [n, d] . m [d, d] (row-major), on the AMX tiles, for rows that are bf16 values
// (a bf16 store's keys converted to f32: every low half zero): m goes in as two bf16 terms (hi +
// lo, within 2^-16 of m), so every product is exact in f32 and x differs from an f32 GEMM's only by
// that split and the order of the f32 sums (each about 2^-16 of |row| |column| at most). Two GEMMs
// of the full square on the tiles cost less than an f32 triangular product on AVX-512. False when
// the tiles are not available, a row is not a bf16 value or oneDNN failed; x is then unspecified
// (the caller computes it in f32).
bool MultiplyBf16Rows(const float* rows, int64_t n, int d, const float* m, float* x);

// The centroids that may be a row's nearest, from its screened scores g [c] (Bf16Products): the
// score of centroid j is g[j] - |centroid j|^2 / 2, which lies in [g[j] + shift_lo[j] - slack[j]
// * row_norm, g[j] + shift_hi[j] + slack[j] * row_norm] (CentroidBounds: per centroid set, once).
// Writes to out (room for c) every j whose interval reaches the largest lower bound; returns their
// count, in ascending j (0 for a row whose scores are not numbers). The nearest centroid in exact
// arithmetic is always among them.
int NearestCandidates(const float* g, const float* shift_lo, const float* shift_hi,
                      const float* slack, int64_t c, float row_norm, int32_t* out);

// The per-centroid terms of NearestCandidates for centroids of squared norms cn2 [c].
struct CentroidBounds {
  std::vector<float> shift_lo, shift_hi, slack;
  explicit CentroidBounds(const std::vector<float>& cn2);
};

}  // namespace kvrt::cpu_index::internal
