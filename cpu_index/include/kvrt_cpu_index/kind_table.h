#pragma once
// The one list of index kinds: name, enum, factory and capabilities. Everything that enumerates
// kinds (name lookup, parsing, the runtime's choices, the C API's conversions) reads this table,
// so a new kind is its enum value, one row here and its own files.
#include <cstdint>
#include <string>

#include "absl/types/span.h"
#include "kvrt_cpu_index/index.h"

namespace kvrt::cpu_index {

struct KindDescriptor {
  IndexKind kind;
  const char* name;   // CLI and report name
  const char* alias;  // another accepted spelling, or null
  // Creates an empty index; null for kExact (no index object: every cold row is attended).
  absl::StatusOr<std::unique_ptr<KeyIndex>> (*make)(const IndexConfig& config, int head_dim);
  bool shares_group_search;  // SearchGroup shares work across a GQA group (worth grouping heads)
  bool uses_queries;         // Build reads the prompt's queries
  bool estimates;            // Search may return an estimated state for rows it did not select
  // The settings a search resolves for k and effort (0 = default), in words, for reports.
  std::string (*describe_search)(const IndexConfig& config, int k, int effort);
  // An upper bound of MemoryBytes() over `rows` keys (host_memory_limit); null: holds nothing.
  int64_t (*bytes_bound)(const IndexConfig& config, int head_dim, int64_t rows);
};

// Rows in enum order: KindTable()[i].kind == IndexKind(i).
absl::Span<const KindDescriptor> KindTable();
inline constexpr int kNumIndexKinds = 7;

// The row of `kind`; kind must be a valid enum value (checked with IsIndexKind at edges).
const KindDescriptor& KindInfo(IndexKind kind);
bool IsIndexKind(int value);

}  // namespace kvrt::cpu_index
