#include "tools/serve_fit.h"

#include <algorithm>
#include <cmath>

namespace kvrt::cli {

int64_t DenseBytesPerSequence(const ModelShape& m, int64_t context) {
  return 2 * context * m.kv_heads * m.head_dim * static_cast<int64_t>(m.dtype_bytes) * m.layers;
}

int64_t SequencesThatFit(int64_t budget, int64_t per_sequence) {
  return per_sequence > 0 ? budget / per_sequence : 0;
}

KvrtFit FitKvrt(int64_t gpu_budget, int64_t host_budget, int layers_model,
                double gpu_per_seq_layer, double host_per_seq_layer) {
  KvrtFit f;
  f.gpu_per_seq = static_cast<int64_t>(std::ceil(gpu_per_seq_layer * layers_model));
  f.host_per_seq = static_cast<int64_t>(std::ceil(host_per_seq_layer * layers_model));
  f.by_gpu = SequencesThatFit(gpu_budget, f.gpu_per_seq);
  f.by_host = SequencesThatFit(host_budget, f.host_per_seq);
  f.batch = std::min(f.by_gpu, f.by_host);
  f.binding = f.by_gpu < f.by_host ? "gpu" : f.by_host < f.by_gpu ? "host" : "gpu+host";
  return f;
}

}  // namespace kvrt::cli
