#pragma once
// Parsing of the list and size option values the benchmark commands share. Errors name the
// option and the bad item.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrt::cli {

std::vector<std::string> SplitList(const std::string& s);  // comma-separated, empty items dropped
// One base-10 integer, the whole of `s`: kOutOfRange past int64's range (strtoll's ERANGE).
enum class IntText { kInteger, kNotInteger, kOutOfRange };
IntText ParseInt(const std::string& s, int64_t* value);
// Comma-separated integers, each in [min, max]; `option` names the option in errors.
absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& option, const std::string& s,
                                                  int64_t min, int64_t max);
// A byte count: an integer or decimal with an optional unit B, KB, MB, GB, TB (powers of 1000)
// or KiB, MiB, GiB, TiB (powers of 1024), e.g. "100GiB", "1.5e9", "80GB".
absl::StatusOr<int64_t> ParseBytes(const std::string& option, const std::string& s);

}  // namespace kvrt::cli
