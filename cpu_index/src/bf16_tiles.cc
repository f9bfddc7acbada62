// The host attention's bf16 products on AMX (bf16_tiles.h).
#include "bf16_tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>
#include <vector>

#include "host_matmul.h"
#include "kvrt_common/dtype.h"
#include "kvrt_common/multiversion.h"

namespace kvrt::cpu_index::internal {
namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

// The f32 operand's three terms, each a block of kTileHeads rows.
constexpr int kTerms = 3;
constexpr int64_t kSplitRows = kTerms * kTileHeads;

enum class Product { kScores, kSums };

struct Matmul {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul mm;
};

// kScores: rows [kTileRows, d] (stride apart) x split queries^T [d, kSplitRows] -> f32.
// kSums: split weights [kSplitRows, kTileRows] x rows [kTileRows, d] (stride apart) -> f32.
dnnl::matmul::primitive_desc Describe(Product p, int d, std::size_t stride) {
  const auto s = static_cast<dnnl::memory::dim>(stride);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (p == Product::kScores) {
    const dnnl::memory::desc src({kTileRows, d}, dt::bf16, dnnl::memory::dims{s, 1});
    const dnnl::memory::desc wei({d, kSplitRows}, dt::bf16, tag::ba);
    const dnnl::memory::desc dst({kTileRows, kSplitRows}, dt::f32, tag::ab);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), attr, CpuEngine());
  }
  const dnnl::memory::desc src({kSplitRows, kTileRows}, dt::bf16, tag::ab);
  const dnnl::memory::desc wei({kTileRows, d}, dt::bf16, dnnl::memory::dims{s, 1});
  const dnnl::memory::desc dst({kSplitRows, d}, dt::f32, tag::ab);
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), attr, CpuEngine());
}

// One primitive per (product, d, row stride), made at first use and kept for the process (a
// model has a few shapes); null where oneDNN would not run it on AMX (the f32 loops are faster
// than an emulated bf16 product).
const Matmul* Get(Product p, int d, std::size_t stride) {
  using Key = std::tuple<int, int, std::size_t>;
  const Key key{static_cast<int>(p), d, stride};
  // Each thread remembers what it looked up (the primitives live as long as the process), so that
  // a block's product does not take the global lock.
  thread_local std::map<Key, const Matmul*> seen;
  if (auto hit = seen.find(key); hit != seen.end()) return hit->second;
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Matmul>> made;
  std::lock_guard<std::mutex> lock(mu);
  auto [it, fresh] = made.try_emplace(key);
  if (fresh) {
    try {
      auto m = std::make_unique<Matmul>();
      m->pd = Describe(p, d, stride);
      if (std::string(m->pd.impl_info_str()).find("amx") != std::string::npos) {
        m->mm = dnnl::matmul(m->pd);
        it->second = std::move(m);
      }
    } catch (const dnnl::error&) {
    } catch (const std::bad_alloc&) {
    }
  }
  seen.emplace(key, it->second.get());
  return it->second.get();
}

bool Enabled() {
  const char* env = std::getenv("KVRT_HOST_TILES");
  if (env != nullptr && std::string(env) == "0") return false;
  return Get(Product::kScores, 128, 128) != nullptr && Get(Product::kSums, 128, 128) != nullptr;
}

// x = hi + mid + lo, each rounded to bf16 from what the terms before it left (each difference is
// exact in f32).
KVRT_MULTIVERSION void Split(const float* x, std::size_t n, uint16_t* hi, uint16_t* mid,
                             uint16_t* lo) {
  for (std::size_t i = 0; i < n; ++i) {
    hi[i] = F32ToBf16(x[i]);
    const float r = x[i] - Bf16ToF32(hi[i]);
    mid[i] = F32ToBf16(r);
    lo[i] = F32ToBf16(r - Bf16ToF32(mid[i]));
  }
}

// The rows [j0, j0 + n) as a block of kTileRows rows for the products: in place when they are
// kTileRows rows `stride` apart, else copied (zeros past n) into `buf`. Returns the block and its
// row stride.
const uint16_t* Block(const TileRows& rows, int64_t j0, int64_t n, int d,
                      std::vector<uint16_t>& buf, std::size_t* stride) {
  if (rows.ptrs == nullptr && n == kTileRows) {
    *stride = rows.stride;
    return rows.base + static_cast<std::size_t>(j0) * rows.stride;
  }
  const std::size_t row_bytes = static_cast<std::size_t>(d) * sizeof(uint16_t);
  buf.resize(static_cast<std::size_t>(kTileRows) * d);
  for (int64_t j = 0; j < n; ++j) {
    const void* r = rows.ptrs != nullptr
                        ? rows.ptrs[j0 + j]
                        : rows.base + static_cast<std::size_t>(j0 + j) * rows.stride;
    std::memcpy(buf.data() + static_cast<std::size_t>(j) * d, r, row_bytes);
  }
  std::fill(buf.data() + static_cast<std::size_t>(n) * d, buf.data() + buf.size(), uint16_t{0});
  *stride = static_cast<std::size_t>(d);
  return buf.data();
}

dnnl::memory Wrap(const dnnl::memory::desc& desc, const void* data) {
  return dnnl::memory(desc, CpuEngine(), const_cast<void*>(data));
}

}  // namespace

bool AttentionTilesAvailable() {
  static const bool available = [] {
    try {
      return Enabled();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return available;
}

bool TileScores(const float* x, int nq, int d, const TileRows& rows, int64_t n, float* s,
                std::size_t s_stride) {
  if (!AttentionTilesAvailable()) return false;
  if (nq <= 0 || n <= 0) return true;
  const std::size_t xn = static_cast<std::size_t>(nq) * d;
  for (std::size_t i = 0; i < xn; ++i)
    if (!std::isfinite(x[i])) return false;
  const int groups = (nq + kTileHeads - 1) / kTileHeads;
  // Per group: [hi rows | mid rows | lo rows], kTileHeads rows each (zeros past nq).
  thread_local std::vector<uint16_t> split, buf;
  thread_local std::vector<float> out;
  const std::size_t term = static_cast<std::size_t>(kTileHeads) * d;
  split.assign(static_cast<std::size_t>(groups) * kTerms * term, 0);
  for (int g = 0; g < groups; ++g) {
    const int h0 = g * kTileHeads, nh = std::min(kTileHeads, nq - h0);
    uint16_t* at = split.data() + static_cast<std::size_t>(g) * kTerms * term;
    Split(x + static_cast<std::size_t>(h0) * d, static_cast<std::size_t>(nh) * d, at, at + term,
          at + 2 * term);
  }
  out.resize(static_cast<std::size_t>(kTileRows) * kSplitRows);
  return Guarded([&] {
    for (int64_t j0 = 0; j0 < n; j0 += kTileRows) {
      const int64_t len = std::min(kTileRows, n - j0);
      std::size_t stride = 0;
      const uint16_t* block = Block(rows, j0, len, d, buf, &stride);
      const Matmul* m = Get(Product::kScores, d, stride);
      if (m == nullptr) return false;
      const dnnl::memory src = Wrap(m->pd.src_desc(), block),
                         dst = Wrap(m->pd.dst_desc(), out.data());
      for (int g = 0; g < groups; ++g) {
        const int h0 = g * kTileHeads, nh = std::min(kTileHeads, nq - h0);
        const dnnl::memory wei =
            Wrap(m->pd.weights_desc(), split.data() + static_cast<std::size_t>(g) * kTerms * term);
        RunOnThisThread(m->mm, m->pd, src, wei, dst);
        for (int h = 0; h < nh; ++h) {
          float* sh = s + static_cast<std::size_t>(h0 + h) * s_stride + j0;
          for (int64_t j = 0; j < len; ++j) {
            const float* o = out.data() + static_cast<std::size_t>(j) * kSplitRows + h;
            sh[j] = (o[0] + o[kTileHeads]) + o[2 * kTileHeads];
          }
        }
      }
    }
    return true;
  });
}

bool TileWeightedSums(const float* w, std::size_t w_stride, int nq, const TileRows& rows, int64_t n,
                      int d, float* y) {
  if (!AttentionTilesAvailable()) return false;
  if (nq <= 0) return true;
  if (n <= 0 || n > kTileRows) return false;
  const int groups = (nq + kTileHeads - 1) / kTileHeads;
  thread_local std::vector<uint16_t> split, buf;
  thread_local std::vector<float> out;
  // Per group: [hi | mid | lo] x kTileHeads rows of kTileRows weights (zeros past n and nq).
  constexpr std::size_t term = static_cast<std::size_t>(kTileHeads) * kTileRows;
  split.assign(static_cast<std::size_t>(groups) * kTerms * term, 0);
  for (int h = 0; h < nq; ++h) {
    uint16_t* at = split.data() + static_cast<std::size_t>(h / kTileHeads) * kTerms * term +
                   static_cast<std::size_t>(h % kTileHeads) * kTileRows;
    Split(w + static_cast<std::size_t>(h) * w_stride, static_cast<std::size_t>(n), at, at + term,
          at + 2 * term);
  }
  out.resize(static_cast<std::size_t>(kSplitRows) * d);
  return Guarded([&] {
    std::size_t stride = 0;
    const uint16_t* block = Block(rows, 0, n, d, buf, &stride);
    const Matmul* m = Get(Product::kSums, d, stride);
    if (m == nullptr) return false;
    const dnnl::memory wei = Wrap(m->pd.weights_desc(), block),
                       dst = Wrap(m->pd.dst_desc(), out.data());
    for (int g = 0; g < groups; ++g) {
      const int h0 = g * kTileHeads, nh = std::min(kTileHeads, nq - h0);
      const dnnl::memory src =
          Wrap(m->pd.src_desc(), split.data() + static_cast<std::size_t>(g) * kTerms * term);
      RunOnThisThread(m->mm, m->pd, src, wei, dst);
      for (int h = 0; h < nh; ++h) {
        const float* o = out.data() + static_cast<std::size_t>(h) * d;
        float* yh = y + static_cast<std::size_t>(h0 + h) * d;
        for (int i = 0; i < d; ++i)
          yh[i] = (o[i] + o[i + static_cast<std::size_t>(kTileHeads) * d]) +
                  o[i + static_cast<std::size_t>(2 * kTileHeads) * d];
      }
    }
    return true;
  });
}

}  // namespace kvrt::cpu_index::internal
