#pragma once
// Option checks for the CLI's numbers. CLI11's Range lets NaN through (every comparison with it is
// false) and its PositiveNumber / NonNegativeNumber print the type's limits (1.797e308) as the
// bound; these refuse NaN and name the bound the option means.
#include <cstdint>

#include "CLI/CLI.hpp"

namespace kvrt::cli {

// A finite number in [min, max].
CLI::Validator NumberIn(double min, double max);
// An integer >= min.
CLI::Validator AtLeast(int64_t min);

}  // namespace kvrt::cli
