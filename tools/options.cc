#include "tools/options.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvrt::cli {

std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

IntText ParseInt(const std::string& s, int64_t* value) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || end == s.c_str() || *end != '\0') return IntText::kNotInteger;
  if (errno == ERANGE) return IntText::kOutOfRange;
  *value = v;
  return IntText::kInteger;
}

absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& option, const std::string& s,
                                                  int64_t min, int64_t max) {
  std::vector<int64_t> out;
  for (const auto& item : SplitList(s)) {
    int64_t v = 0;
    const IntText parsed = ParseInt(item, &v);
    if (parsed == IntText::kNotInteger)
      return absl::InvalidArgumentError(
          absl::StrCat(option, ": '", item, "' is not an integer (comma-separated integers)"));
    if (parsed == IntText::kOutOfRange || v < min || v > max)
      return absl::InvalidArgumentError(
          absl::StrCat(option, ": ", item, " is out of range [", min, ", ", max, "]"));
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(option, ": no value given"));
  return out;
}

absl::StatusOr<int64_t> ParseBytes(const std::string& option, const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  const std::string unit = end != nullptr ? std::string(end) : "";
  static const std::pair<const char*, double> kUnits[] = {
      {"", 1},           {"B", 1},          {"KB", 1e3},       {"MB", 1e6},
      {"GB", 1e9},       {"TB", 1e12},      {"KiB", 1024.0},   {"MiB", 1048576.0},
      {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
  // 2^62 bytes (4 EiB) bounds every budget, so that sums and products of a few budgets stay in
  // int64 (a cast of a larger double is undefined: 1e30GiB gave a negative budget).
  constexpr double kMaxBytes = 4611686018427387904.0;
  if (end != s.c_str() && std::isfinite(v) && v >= 0)
    for (const auto& [name, mult] : kUnits)
      if (unit == name) {
        if (v * mult > kMaxBytes)
          return absl::InvalidArgumentError(
              absl::StrCat(option, ": ", s, " is more than 4 EiB (2^62 bytes)"));
        return static_cast<int64_t>(std::floor(v * mult));
      }
  return absl::InvalidArgumentError(absl::StrCat(
      option, ": '", s, "' is not a byte count (a number with an optional unit B, KB, MB, GB, TB, "
      "KiB, MiB, GiB or TiB, e.g. 100GiB)"));
}

}  // namespace kvrt::cli
