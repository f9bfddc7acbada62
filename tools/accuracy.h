#pragma once
// Accuracy of one attended output against exact f32 attention over all tokens: the metrics of
// `kvrt replay` (recall@k, attention-mass recall, relative L2 output error), shared with
// `kvrt bench decode`. Keys and values are f32 rows, row i at base + i * stride.
#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace kvrt::cli {

// Eight independent accumulators so the compiler vectorises without -ffast-math.
float Dot(const float* a, const float* b, int d);

// Value at quantile p (0..1) of v, nearest rank; 0 for an empty v.
double Percentile(std::vector<double> v, double p);
double Mean(const std::vector<double>& v);

// Rows [0, n) of one kv head's keys and values.
struct HeadRows {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t stride = 0;  // floats from one row to the next
  int64_t n = 0;
  const float* key(int64_t i) const { return k + i * stride; }
  const float* value(int64_t i) const { return v + i * stride; }
};

// Exact attention of nq queries (the q heads of one kv head; f32 [nq, d]) over all rows, in one
// pass over them: o [nq, d], lse [nq], and each query's top_k row ids by score in top [nq, top_k]
// (best first, ties to the lower id; min(top_k, n) written, the rest untouched). Each query's
// result is its nq = 1 call's, bit for bit.
void ExactAttention(const float* q, int nq, const HeadRows& rows, int d, float scale, int top_k,
                    float* o, float* lse, int32_t* top);

struct HeadAccuracy {
  double recall = 0;  // share of the exact top-k among the attended ids
  double mass = 0;    // exact softmax mass of the attended ids (capped at 1)
  double error = 0;   // |out - exact o| / |exact o| (absolute when exact o is 0)
};

// Scores one attended output: ids (the positions the step attended, kvrt_get_attended) against
// the exact state (exact_o, exact_lse, top ids, kk = min(k, n) of them). `mark` is scratch of at
// least n zeros, left zeroed. An id out of range or repeated is an error.
absl::Status ScoreHead(const float* q, const HeadRows& rows, int d, float scale,
                       const float* exact_o, float exact_lse, const int32_t* top, int64_t kk,
                       const int64_t* ids, int64_t count, const float* out,
                       std::vector<uint8_t>* mark, HeadAccuracy* result);

// Means, p99 and max over many HeadAccuracy values.
struct AccuracySummary {
  int64_t samples = 0;
  double recall = 0, mass = 0, error_mean = 0, error_p99 = 0, error_max = 0;
};
class AccuracyAcc {
 public:
  void Add(const HeadAccuracy& a) {
    recalls_.push_back(a.recall);
    masses_.push_back(a.mass);
    errors_.push_back(a.error);
  }
  AccuracySummary Summary() const;

 private:
  std::vector<double> recalls_, masses_, errors_;
};

}  // namespace kvrt::cli
