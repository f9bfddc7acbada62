#include "tools/cli_checks.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "tools/options.h"

namespace kvrt::cli {

CLI::Validator NumberIn(double min, double max, bool min_excluded) {
  return CLI::Validator(
      [min, max, min_excluded](std::string& s) -> std::string {
        char* end = nullptr;
        errno = 0;
        const double v = std::strtod(s.c_str(), &end);
        if (s.empty() || end == s.c_str() || *end != '\0' || errno == ERANGE)
          return absl::StrCat("'", s, "' is not a number");
        if (!std::isfinite(v) || v < min || v > max || (min_excluded && v == min))
          return absl::StrCat(s, " is not a number in ", min_excluded ? "(" : "[", min, ", ", max,
                              "]");
        return {};
      },
      absl::StrCat("FLOAT in ", min_excluded ? "(" : "[", min, " - ", max,
                   "]"));  // CLI11's own Range's words
}

namespace {

// What is wrong with `s` as an integer in [min, max] ("" if nothing); max_named: the message names
// both bounds, else only the minimum (AtLeast, whose maximum is int64's).
std::string IntProblem(const std::string& s, int64_t min, int64_t max, bool max_named) {
  int64_t v = 0;
  const IntText parsed = ParseInt(s, &v);
  if (parsed == IntText::kNotInteger) return absl::StrCat("'", s, "' is not an integer");
  if (max_named && (parsed == IntText::kOutOfRange || v < min || v > max))
    return absl::StrCat(s, " is not in [", min, ", ", max, "]");
  if (parsed == IntText::kOutOfRange) return absl::StrCat(s, " is out of range");
  if (v < min) return absl::StrCat(s, " must be >= ", min);
  return {};
}

}  // namespace

CLI::Validator AtLeast(int64_t min) {
  return CLI::Validator(
      [min](std::string& s) {
        return IntProblem(s, min, std::numeric_limits<int64_t>::max(), /*max_named=*/false);
      },
      min == 0   ? std::string("NONNEGATIVE")
      : min == 1 ? std::string("POSITIVE")
                 : absl::StrCat("INT >= ", min));
}

CLI::Validator IntIn(int64_t min, int64_t max) {
  return CLI::Validator(
      [min, max](std::string& s) { return IntProblem(s, min, max, /*max_named=*/true); },
      absl::StrCat("INT in [", min, " - ", max, "]"));
}

CLI::Validator Unsigned() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        errno = 0;
        (void)std::strtoull(s.c_str(), &end, 10);
        if (s.empty() || s[0] == '-' || s[0] == '+' || end == s.c_str() || *end != '\0')
          return absl::StrCat("'", s, "' is not an unsigned integer");
        if (errno == ERANGE) return absl::StrCat(s, " is more than 2^64 - 1");
        return {};
      },
      "UINT");
}

}  // namespace kvrt::cli
