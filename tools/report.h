#pragma once
// Printing replay reports: a human table and the JSON object of record.
#include <cstdio>
#include <string>

#include "nlohmann/json.hpp"
#include "tools/replay.h"

namespace kvrt::cli {

nlohmann::json ReportJson(const ReplayReport& r);
void PrintReport(const ReplayReport& r, std::FILE* out);
// The per-(layer, head) table: policy, calibrated GPU-tier mass, recall, mass, error.
void PrintHeads(const ReplayReport& r, std::FILE* out);
std::string HumanBytes(double bytes);

}  // namespace kvrt::cli
