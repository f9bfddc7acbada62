#pragma once
// Constructors of the index kinds, one file each; MakeIndex dispatches to them.
#include <cstdint>
#include <memory>
#include <string>

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

// Per kind: the search settings it resolves for k and effort, in words, and an upper bound of its
// MemoryBytes() over `rows` keys (see SearchSettings / IndexBytesBound in index.h).
std::string ExactSearchSettings(const IndexConfig& config, int k, int effort);
std::string FlatSearchSettings(const IndexConfig& config, int k, int effort);
std::string IvfSearchSettings(const IndexConfig& config, int k, int effort);
int64_t IvfBytesBound(const IndexConfig& config, int head_dim, int64_t rows);
std::string HnswSearchSettings(const IndexConfig& config, int k, int effort);
int64_t HnswBytesBound(const IndexConfig& config, int head_dim, int64_t rows);
std::string LandmarkSearchSettings(const IndexConfig& config, int k, int effort);
int64_t LandmarkBytesBound(const IndexConfig& config, int head_dim, int64_t rows);
std::string AttentionAwareSearchSettings(const IndexConfig& config, int k, int effort);
int64_t AttentionAwareBytesBound(const IndexConfig& config, int head_dim, int64_t rows);
std::string ClusterSearchSettings(const IndexConfig& config, int k, int effort);
int64_t ClusterBytesBound(const IndexConfig& config, int head_dim, int64_t rows);

}  // namespace kvrt::cpu_index
