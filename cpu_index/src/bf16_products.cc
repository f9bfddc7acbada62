// bf16 products on AMX through oneDNN's matmul (bf16_products.h).
#include "bf16_products.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "absl/strings/str_cat.h"
#include "host_matmul.h"
#include "index_common.h"
#include "kvrt_common/dtype.h"
#include "kvrt_common/multiversion.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::cpu_index::internal {
namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

// The matmul [m, d] x [d, c] -> f32, weights in the layout oneDNN picks for them, the scratchpad
// ours (a primitive's own is shared by the threads that run it at once).
dnnl::matmul::primitive_desc BlockMatmul(int64_t m, int64_t c, int d) {
  const dnnl::memory::desc src({m, d}, dt::bf16, tag::ab);
  const dnnl::memory::desc wei({d, c}, dt::bf16, tag::any);
  const dnnl::memory::desc dst({m, c}, dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), attr, CpuEngine());
}

bool RunsOnAmx() {
  const char* env = std::getenv("KVRT_KMEANS_BF16");
  if (env != nullptr && std::string(env) == "0") return false;
  try {
    // The shape of a k-means refinement (512 clusters of 576 dims); oneDNN names the kernel.
    const std::string impl = BlockMatmul(Bf16Rows::kMaxBlockRows, 512, 576).impl_info_str();
    return impl.find("amx") != std::string::npos;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

bool Bf16ProductsAvailable() {
  static const bool available = RunsOnAmx();
  return available;
}

Bf16Rows::Bf16Rows(const float* x, int64_t n, int d, int64_t columns) : n_(n), d_(d) {
  const int64_t by_scores = kMaxBlockScores / std::max<int64_t>(1, columns) / 32 * 32;
  block_rows_ = std::max<int64_t>(32, std::min({kMaxBlockRows, (n + 31) / 32 * 32, by_scores}));
  data_.resize(static_cast<std::size_t>(blocks() * block_rows_) * d_);
  tbb::parallel_for(int64_t{0}, blocks(), [&](int64_t b) {
    const int64_t r0 = b * block_rows_, r1 = std::min(n_, r0 + block_rows_);
    std::fill(data_.data() + static_cast<std::size_t>(r1) * d_,
              data_.data() + static_cast<std::size_t>(r0 + block_rows_) * d_, uint16_t{0});
    const std::size_t e0 = static_cast<std::size_t>(r0) * d_,
                      e1 = static_cast<std::size_t>(r1) * d_;
    ConvertFromF32(x + e0, e1 - e0, DType::kBF16, data_.data() + e0);
  });
}

struct Bf16Products::Impl {
  int64_t block_rows = 0, c = 0;
  int d = 0;
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul matmul;
  dnnl::memory weights;
};

Bf16Products::Bf16Products(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Bf16Products::~Bf16Products() = default;

absl::StatusOr<std::unique_ptr<Bf16Products>> Bf16Products::Make(const float* centroids, int64_t c,
                                                                 int d, int64_t block_rows) {
  try {
    auto impl = std::make_unique<Impl>();
    impl->block_rows = block_rows;
    impl->c = c;
    impl->d = d;
    impl->pd = BlockMatmul(block_rows, c, d);
    impl->matmul = dnnl::matmul(impl->pd);
    // The centroids [c, d] row-major are the weights [d, c] column-major ("ba").
    const dnnl::memory::desc user({d, c}, dt::f32, tag::ba);
    dnnl::memory src(user, CpuEngine(), const_cast<float*>(centroids));
    impl->weights = dnnl::memory(impl->pd.weights_desc(), CpuEngine());
    dnnl::stream stream(CpuEngine());
    OmpThreadsGuard one_thread(1);
    dnnl::reorder(src, impl->weights).execute(stream, src, impl->weights);
    stream.wait();
    return std::unique_ptr<Bf16Products>(new Bf16Products(std::move(impl)));
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("bf16 products (oneDNN): ", e.what()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("bf16 products: out of memory");
  }
}

absl::Status Bf16Products::Block(const Bf16Rows& rows, int64_t b, float* g) const {
  const Impl& m = *impl_;
  if (rows.dim() != m.d || rows.block_rows() != m.block_rows || b < 0 || b >= rows.blocks())
    return absl::InvalidArgumentError("bf16 products: rows of another shape");
  try {
    const dnnl::memory src(m.pd.src_desc(), CpuEngine(), const_cast<uint16_t*>(rows.block(b)));
    const dnnl::memory dst(m.pd.dst_desc(), CpuEngine(), g);
    RunOnThisThread(m.matmul, m.pd, src, m.weights, dst);
    return absl::OkStatus();
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("bf16 products (oneDNN): ", e.what()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("bf16 products: out of memory");
  }
}

CentroidBounds::CentroidBounds(const std::vector<float>& cn2)
    : shift_lo(cn2.size()), shift_hi(cn2.size()), slack(cn2.size()) {
  for (std::size_t j = 0; j < cn2.size(); ++j) {
    // The f32 additions of the bounds round too: 2^-20 of |centroid|^2 covers them (and the
    // product's share, |row| |centroid| 2^-24 each, is in kBf16ProductError's headroom); the
    // absolute 1e-30 keeps an interval around scores of subnormal inputs.
    const float pad = cn2[j] * (1.f / (1 << 20)) + 1e-30f;
    shift_lo[j] = -0.5f * cn2[j] - pad;
    shift_hi[j] = -0.5f * cn2[j] + pad;
    slack[j] = kBf16ProductError * std::sqrt(cn2[j]);
  }
}

namespace {

// Truncates f32 values that are bf16 values to bf16; false if one is not (its low half nonzero).
KVRT_MULTIVERSION bool TakeBf16Values(const float* x, std::size_t n, uint16_t* out) {
  uint32_t low = 0;
  for (std::size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof(u));
    low |= u & 0xffffu;
    out[i] = static_cast<uint16_t>(u >> 16);
  }
  return low == 0;
}

}  // namespace

bool MultiplyBf16Rows(const float* rows, int64_t n, int d, const float* m, float* x) {
  if (n <= 0 || !Bf16ProductsAvailable()) return false;
  {
    // An f32 or f16 store's keys are refused here, before any work, by their first rows.
    std::vector<uint16_t> probe(static_cast<std::size_t>(std::min<int64_t>(n, 64)) * d);
    if (!TakeBf16Values(rows, probe.size(), probe.data())) return false;
  }
  return Guarded([&] {
    const int64_t block = std::min(Bf16Rows::kMaxBlockRows, (n + 31) / 32 * 32);
    const dnnl::engine& eng = CpuEngine();
    const dnnl::memory::desc src({block, d}, dt::bf16, tag::ab);
    const dnnl::memory::desc wei({d, d}, dt::bf16, tag::any);
    const dnnl::memory::desc dst({block, d}, dt::f32, tag::ab);
    dnnl::primitive_attr first, second;
    first.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    second.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::post_ops add;
    add.append_sum(1.f);  // the lo term's products added to the hi term's
    second.set_post_ops(add);
    const dnnl::matmul::primitive_desc pd_hi(dnnl::matmul::desc(src, wei, dst), first, eng);
    const dnnl::matmul::primitive_desc pd_lo(dnnl::matmul::desc(src, wei, dst), second, eng);
    if (pd_hi.weights_desc() != pd_lo.weights_desc()) return false;
    const dnnl::matmul mm_hi(pd_hi), mm_lo(pd_lo);
    // m = hi + lo in bf16, then laid out for the tiles.
    const std::size_t dd = static_cast<std::size_t>(d) * d;
    std::vector<float> hi(dd), lo(dd);
    std::vector<uint16_t> h(dd);
    ConvertFromF32(m, dd, DType::kBF16, h.data());
    ConvertToF32(h.data(), DType::kBF16, dd, hi.data());
    for (std::size_t i = 0; i < dd; ++i) lo[i] = m[i] - hi[i];
    const dnnl::memory::desc user({d, d}, dt::f32, tag::ab);
    dnnl::memory w_hi(pd_hi.weights_desc(), eng), w_lo(pd_hi.weights_desc(), eng);
    {
      OmpThreadsGuard one_thread(1);
      dnnl::stream stream(eng);
      dnnl::memory u_hi(user, eng, hi.data()), u_lo(user, eng, lo.data());
      dnnl::reorder(u_hi, w_hi).execute(stream, u_hi, w_hi);
      dnnl::reorder(u_lo, w_lo).execute(stream, u_lo, w_lo);
      stream.wait();
    }
    std::atomic<bool> failed{false};
    tbb::parallel_for(int64_t{0}, (n + block - 1) / block, [&](int64_t b) {
      if (failed) return;
      const int64_t r0 = b * block, rows_here = std::min(block, n - r0);
      thread_local std::vector<uint16_t> a;
      thread_local std::vector<float> out;
      a.assign(static_cast<std::size_t>(block) * d, 0);
      out.resize(static_cast<std::size_t>(block) * d);
      if (!TakeBf16Values(rows + r0 * d, static_cast<std::size_t>(rows_here) * d, a.data())) {
        failed = true;
        return;
      }
      const bool done = Guarded([&] {
        const dnnl::memory sa(src, eng, a.data()), so(dst, eng, out.data());
        RunOnThisThread(mm_hi, pd_hi, sa, w_hi, so);
        RunOnThisThread(mm_lo, pd_lo, sa, w_lo, so);  // adds to so (the sum post-op)
        return true;
      });
      if (!done) {
        failed = true;
        return;
      }
      std::copy_n(out.data(), static_cast<std::size_t>(rows_here) * d, x + r0 * d);
    });
    return !failed.load();
  });
}

// NOTE: multiversioned, lanes of 16 (dot.cc's pattern): two passes over a row's c scores per
// row of the k-means, as many as the GEMM's columns; a scalar loop cost as much as the products.
KVRT_MULTIVERSION int NearestCandidates(const float* g, const float* shift_lo,
                                        const float* shift_hi, const float* slack, int64_t c,
                                        float row_norm, int32_t* out) {
  // The largest lower bound of a score: the nearest centroid's score is at least this.
  float lanes[16];
  for (float& l : lanes) l = -INFINITY;
  int64_t j = 0;
  for (; j + 16 <= c; j += 16)
    for (int t = 0; t < 16; ++t) {
      const float lo = g[j + t] + shift_lo[j + t] - slack[j + t] * row_norm;
      lanes[t] = lo > lanes[t] ? lo : lanes[t];
    }
  float best_lo = -INFINITY;
  for (float l : lanes) best_lo = l > best_lo ? l : best_lo;
  for (; j < c; ++j) {
    const float lo = g[j] + shift_lo[j] - slack[j] * row_norm;
    best_lo = lo > best_lo ? lo : best_lo;
  }
  // Candidates are few: a block of 16 is tested whole first (vectorised), its entries only when
  // one passes.
  int n = 0;
  for (j = 0; j + 16 <= c; j += 16) {
    int any = 0;
    for (int t = 0; t < 16; ++t)
      any |= g[j + t] + shift_hi[j + t] + slack[j + t] * row_norm >= best_lo;
    if (any == 0) continue;
    for (int t = 0; t < 16; ++t)
      if (g[j + t] + shift_hi[j + t] + slack[j + t] * row_norm >= best_lo)
        out[n++] = static_cast<int32_t>(j + t);
  }
  for (; j < c; ++j)
    if (g[j] + shift_hi[j] + slack[j] * row_norm >= best_lo) out[n++] = static_cast<int32_t>(j);
  return n;
}

}  // namespace kvrt::cpu_index::internal
