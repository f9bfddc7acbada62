// libFuzzer target: the trace reader on hostile files. bytes -> temp file -> TraceReader::Open ->
// every tensor of every layer read in full. The reader must return an error or views that lie
// inside the file with the size the metadata implies; never crash, never allocate absurdly
// (-rss_limit_mb catches that), never read outside the mapping (ASan / SIGSEGV).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "tools/trace/trace.h"

namespace {

const std::string& TempPath() {
  static const std::string path = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir ? dir : "/tmp") + "/kvrt_fuzz_trace_" + std::to_string(getpid()) +
           ".safetensors";
  }();
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = TempPath();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);

  auto reader = kvrt::trace::TraceReader::Open(path);
  if (!reader.ok()) {
    if (reader.status().message().empty()) std::abort();  // every error names its problem
    return 0;
  }
  const kvrt::trace::TraceMeta& m = (*reader)->meta();
  if (m.num_layers < 1 || m.num_q_heads < 1 || m.num_kv_heads < 1 || m.head_dim < 1 ||
      m.num_q_heads % m.num_kv_heads != 0 || m.prompt_tokens < 0 || m.decode_steps < 0)
    std::abort();  // Open accepted metadata it documents as invalid
  volatile uint8_t sink = 0;
  for (int layer = 0; layer < m.num_layers; ++layer) {
    for (const std::string& part : kvrt::trace::TensorParts()) {
      auto view = (*reader)->Tensor(layer, part);
      if (!view.ok()) std::abort();  // Open promised every tensor is present
      const bool q = part.back() == 'q';
      const bool prefill = part[0] == 'p';
      const int64_t rows = prefill ? m.prompt_tokens : m.decode_steps;
      const int64_t heads = q ? m.num_q_heads : m.num_kv_heads;
      if (view->shape.size() != 3 || view->shape[0] != rows || view->shape[1] != heads ||
          view->shape[2] != m.head_dim || view->dtype != m.dtype)
        std::abort();
      const uint64_t want =
          static_cast<uint64_t>(rows) * heads * m.head_dim * kvrt::DTypeSize(m.dtype);
      // The view lies inside the file, so it can never be larger than the input.
      if (view->bytes != want || view->bytes > size) std::abort();
      const auto* p = static_cast<const uint8_t*>(view->data);
      uint8_t acc = 0;
      for (std::size_t i = 0; i < view->bytes; ++i) acc ^= p[i];
      sink = sink ^ acc;
    }
  }
  (void)(*reader)->Tensor(m.num_layers, "prefill.q");  // NotFound, no crash
  (void)(*reader)->Tensor(-1, "decode.k");
  (void)(*reader)->Tensor(0, "bogus");
  return 0;
}
