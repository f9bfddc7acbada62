#include "tools/svg_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace kvrt::cli {
namespace {

std::string Fmt(const char* f, double a, double b = 0) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, a, b);
  return buf;
}

}  // namespace

std::string RenderSvg(const PlotSpec& spec, const std::vector<PlotSeries>& series) {
  const double W = 760, H = 480, L = 70, R = 180, T = 40, B = 60;
  double x_lo = 1e300, x_hi = -1e300;
  for (const auto& s : series)
    for (double x : s.x)
      if (!spec.log_x || x > 0) {
        x_lo = std::min(x_lo, x);
        x_hi = std::max(x_hi, x);
      }
  if (x_lo > x_hi) x_lo = 1e-3, x_hi = 1;
  auto tx = [&](double x) { return spec.log_x ? std::log10(std::max(x, 1e-12)) : x; };
  double a = tx(x_lo), b = tx(x_hi);
  if (spec.log_x) a = std::floor(a), b = std::ceil(b);
  if (b <= a) b = a + 1;
  auto px = [&](double x) { return L + (tx(x) - a) / (b - a) * (W - L - R); };
  auto py = [&](double y) {
    return T + (1 - (y - spec.y_min) / (spec.y_max - spec.y_min)) * (H - T - B);
  };
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};
  std::string o = "<svg xmlns='http://www.w3.org/2000/svg' width='" + Fmt("%.0f", W) +
                  "' height='" + Fmt("%.0f", H) + "' font-family='sans-serif' font-size='12'>\n";
  o += "<rect width='100%' height='100%' fill='white'/>\n";
  o += "<text x='" + Fmt("%.0f", W / 2) + "' y='22' text-anchor='middle' font-size='14'>" +
       spec.title + "</text>\n";
  // Axes and grid.
  for (int i = 0; i <= 10; ++i) {
    const double y = spec.y_min + (spec.y_max - spec.y_min) * i / 10;
    o += "<line x1='" + Fmt("%.1f", L) + "' x2='" + Fmt("%.1f", W - R) + "' y1='" +
         Fmt("%.1f", py(y)) + "' y2='" + Fmt("%.1f", py(y)) + "' stroke='#ddd'/>\n";
    o += "<text x='" + Fmt("%.1f", L - 6) + "' y='" + Fmt("%.1f", py(y) + 4) +
         "' text-anchor='end'>" + Fmt("%.2f", y) + "</text>\n";
  }
  if (spec.log_x) {
    for (int e = static_cast<int>(a); e <= static_cast<int>(b); ++e) {
      const double x = std::pow(10.0, e);
      o += "<line x1='" + Fmt("%.1f", px(x)) + "' x2='" + Fmt("%.1f", px(x)) + "' y1='" +
           Fmt("%.1f", T) + "' y2='" + Fmt("%.1f", H - B) + "' stroke='#ddd'/>\n";
      o += "<text x='" + Fmt("%.1f", px(x)) + "' y='" + Fmt("%.1f", H - B + 16) +
           "' text-anchor='middle'>" + Fmt("%g", x) + "</text>\n";
    }
  }
  o += "<rect x='" + Fmt("%.1f", L) + "' y='" + Fmt("%.1f", T) + "' width='" +
       Fmt("%.1f", W - L - R) + "' height='" + Fmt("%.1f", H - T - B) +
       "' fill='none' stroke='black'/>\n";
  o += "<text x='" + Fmt("%.1f", (L + W - R) / 2) + "' y='" + Fmt("%.1f", H - 18) +
       "' text-anchor='middle'>" + spec.x_label + "</text>\n";
  o += "<text transform='translate(18," + Fmt("%.1f", (T + H - B) / 2) +
       ") rotate(-90)' text-anchor='middle'>" + spec.y_label + "</text>\n";
  for (std::size_t i = 0; i < series.size(); ++i) {
    const auto& s = series[i];
    const char* c = colors[i % 6];
    std::string pts;
    for (std::size_t j = 0; j < s.x.size(); ++j) pts += Fmt("%.1f,%.1f ", px(s.x[j]), py(s.y[j]));
    o += std::string("<polyline fill='none' stroke='") + c + "' stroke-width='2' points='" + pts +
         "'/>\n";
    for (std::size_t j = 0; j < s.x.size(); ++j)
      o += "<circle cx='" + Fmt("%.1f", px(s.x[j])) + "' cy='" + Fmt("%.1f", py(s.y[j])) +
           "' r='3' fill='" + c + "'/>\n";
    const double ly = T + 10 + 18 * i;
    o += "<line x1='" + Fmt("%.1f", W - R + 12) + "' x2='" + Fmt("%.1f", W - R + 32) + "' y1='" +
         Fmt("%.1f", ly) + "' y2='" + Fmt("%.1f", ly) + "' stroke='" + c + "' stroke-width='2'/>\n";
    o += "<text x='" + Fmt("%.1f", W - R + 38) + "' y='" + Fmt("%.1f", ly + 4) + "'>" + s.name +
         "</text>\n";
  }
  o += "</svg>\n";
  return o;
}

}  // namespace kvrt::cli
