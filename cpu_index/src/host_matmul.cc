#include "host_matmul.h"

#include <omp.h>

#include <algorithm>
#include <unordered_map>
#include <vector>

namespace kvrt::cpu_index::internal {

OmpThreadsGuard::OmpThreadsGuard(int threads) : saved_(omp_get_max_threads()) {
  omp_set_num_threads(std::max(1, threads));
}
OmpThreadsGuard::~OmpThreadsGuard() { omp_set_num_threads(saved_); }

const dnnl::engine& CpuEngine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

void RunOnThisThread(const dnnl::matmul& mm, const dnnl::matmul::primitive_desc& pd,
                     const dnnl::memory& src, const dnnl::memory& weights,
                     const dnnl::memory& dst) {
  OmpThreadsGuard one_thread(1);
  thread_local std::vector<unsigned char> scratch;
  const std::size_t need = pd.scratchpad_desc().get_size();
  if (scratch.size() < need) scratch.resize(need);
  std::unordered_map<int, dnnl::memory> args = {
      {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}};
  if (need > 0)
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 dnnl::memory(pd.scratchpad_desc(), CpuEngine(), scratch.data()));
  dnnl::stream stream(CpuEngine());
  mm.execute(stream, args);
  stream.wait();
}

}  // namespace kvrt::cpu_index::internal
