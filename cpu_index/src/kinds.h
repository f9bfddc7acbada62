#pragma once
// Constructors of the index kinds, one file each; MakeIndex dispatches to them.
#include <memory>

#include "absl/status/statusor.h"
#include "kvrt_cpu_index/index.h"

namespace kvrt::cpu_index {

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeFlatIndex(const IndexConfig& config, int head_dim);
absl::StatusOr<std::unique_ptr<KeyIndex>> MakeIvfIndex(const IndexConfig& config, int head_dim);
absl::StatusOr<std::unique_ptr<KeyIndex>> MakeHnswIndex(const IndexConfig& config, int head_dim);
absl::StatusOr<std::unique_ptr<KeyIndex>> MakeLandmarkIndex(const IndexConfig& config,
                                                            int head_dim);
absl::StatusOr<std::unique_ptr<KeyIndex>> MakeAttentionAwareIndex(const IndexConfig& config,
                                                                  int head_dim);
absl::StatusOr<std::unique_ptr<KeyIndex>> MakeClusterIndex(const IndexConfig& config, int head_dim);

}  // namespace kvrt::cpu_index
