// How the shared pack and decode sequences (pack.h, decode.h) spread their
// loops. A sequence is written once against this small interface; the host
// runs it with SerialLoop, the CUDA kernels with a block-wide loop
// (csrc/cuda/gate_kernels.cu) that strides threads, syncs with __syncthreads
// and keeps the shared state in shared memory with atomics. The interface:
//   for_each(n, f)  call f(i) for i in 0..n-1 (spread over the workers)
//   sync()          every worker's writes so far are visible to all
//   leader()        true on exactly one worker, for the one-off steps
//   min_into(p, v)  *p = min(*p, v), safe against the other workers
//   add_into(p, v)  *p += v, safe against the other workers
#pragma once

#include <cstdint>

#include "hd.h"

namespace esper_gate {
namespace wire {

struct SerialLoop {
  template <typename F>
  EG_HD void for_each(int64_t n, F&& f) const {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  EG_HD void sync() const {}
  EG_HD bool leader() const { return true; }
  EG_HD void min_into(int* p, int v) const {
    if (v < *p) *p = v;
  }
  EG_HD void add_into(int* p, int v) const { *p += v; }
};

}  // namespace wire
}  // namespace esper_gate
