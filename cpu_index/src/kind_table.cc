#include "kvrt_cpu_index/kind_table.h"

#include <array>

#include "kinds.h"

namespace kvrt::cpu_index {
namespace {

// clang-format off
//   kind                       name               alias              make                     group  queries estimates describe_search               bytes_bound
constexpr std::array<KindDescriptor, kNumIndexKinds> kKinds = {{
    {IndexKind::kExact,          "exact",           nullptr,           nullptr,                 false, false, false, ExactSearchSettings,          nullptr},
    {IndexKind::kFlat,           "flat",            nullptr,           MakeFlatIndex,           false, false, false, FlatSearchSettings,           nullptr},
    {IndexKind::kIvf,            "ivf",             nullptr,           MakeIvfIndex,            false, false, false, IvfSearchSettings,            IvfBytesBound},
    {IndexKind::kHnsw,           "hnsw",            nullptr,           MakeHnswIndex,           false, false, false, HnswSearchSettings,           HnswBytesBound},
    {IndexKind::kLandmark,       "landmark",        nullptr,           MakeLandmarkIndex,       true,  false, false, LandmarkSearchSettings,       LandmarkBytesBound},
    {IndexKind::kAttentionAware, "attention-aware", "attention_aware", MakeAttentionAwareIndex, true,  true,  false, AttentionAwareSearchSettings, AttentionAwareBytesBound},
    {IndexKind::kCluster,        "cluster",         nullptr,           MakeClusterIndex,        true,  true,  true,   ClusterSearchSettings,        ClusterBytesBound},
}};
// clang-format on
constexpr bool RowsInEnumOrder() {
  for (std::size_t i = 0; i < kKinds.size(); ++i)
    if (static_cast<std::size_t>(kKinds[i].kind) != i) return false;
  return true;
}
static_assert(RowsInEnumOrder(), "kind table rows must follow the IndexKind enum order");

}  // namespace

std::string ExactSearchSettings(const IndexConfig&, int, int) {
  return "all cold tokens (no search)";
}

absl::Span<const KindDescriptor> KindTable() { return kKinds; }

bool IsIndexKind(int value) { return value >= 0 && value < kNumIndexKinds; }

const KindDescriptor& KindInfo(IndexKind kind) { return kKinds[static_cast<std::size_t>(kind)]; }

}  // namespace kvrt::cpu_index
