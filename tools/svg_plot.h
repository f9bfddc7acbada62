#pragma once
// A minimal SVG line plot (no plotting library is packaged for C++ here): one polyline with
// markers per series, log-scale x, linear y, legend.
#include <string>
#include <vector>

namespace kvrt::cli {

struct PlotSeries {
  std::string name;
  std::vector<double> x, y;
};

struct PlotSpec {
  std::string title, x_label, y_label;
  bool log_x = true;
  double y_min = 0, y_max = 1;
};

std::string RenderSvg(const PlotSpec& spec, const std::vector<PlotSeries>& series);

}  // namespace kvrt::cli
