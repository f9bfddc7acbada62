#include "tools/cli_checks.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "tools/options.h"

namespace kvrt::cli {

CLI::Validator NumberIn(double min, double max) {
  return CLI::Validator(
      [min, max](std::string& s) -> std::string {
        char* end = nullptr;
        errno = 0;
        const double v = std::strtod(s.c_str(), &end);
        if (s.empty() || end == s.c_str() || *end != '\0' || errno == ERANGE)
          return absl::StrCat("'", s, "' is not a number");
        if (!std::isfinite(v) || v < min || v > max)
          return absl::StrCat(s, " is not a number in [", min, ", ", max, "]");
        return {};
      },
      absl::StrCat("FLOAT in [", min, " - ", max, "]"));  // CLI11's own Range's words
}

CLI::Validator AtLeast(int64_t min) {
  return CLI::Validator(
      [min](std::string& s) -> std::string {
        int64_t v = 0;
        const IntText parsed = ParseInt(s, &v);
        if (parsed == IntText::kNotInteger) return absl::StrCat("'", s, "' is not an integer");
        if (parsed == IntText::kOutOfRange) return absl::StrCat(s, " is out of range");
        if (v < min) return absl::StrCat(s, " must be >= ", min);
        return {};
      },
      min == 0   ? std::string("NONNEGATIVE")
      : min == 1 ? std::string("POSITIVE")
                 : absl::StrCat("INT >= ", min));
}

}  // namespace kvrt::cli
