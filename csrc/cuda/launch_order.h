// What trimkv enqueued last on each device's legacy default stream, where every CUDA cache and
// gate runs: a decode step records its layer cache (the address of its K slots), a gate call
// gate_launch_tag(). CudaCache reads it to set decode_params_t::prefetch_before_wait (see
// DecodeStep's contract and cache_cuda.cu). Callers hold mu over the check, the launch and the
// record: caches and gates may be used from several threads.
#pragma once

#include <mutex>
#include <vector>

namespace trimkv {

struct LaunchOrder {
  std::mutex mu;
  std::vector<const void*> last;  // by device ordinal; nullptr: nothing recorded yet

  /// The record of device dev (mu held).
  const void*& of(int dev) {
    if (last.size() <= static_cast<size_t>(dev)) last.resize(static_cast<size_t>(dev) + 1, nullptr);
    return last[static_cast<size_t>(dev)];
  }
};

/// The process's record (one per process: the legacy default stream is per device).
inline LaunchOrder& launch_order() {
  static LaunchOrder order;
  return order;
}

/// What a gate call records.
inline const void* gate_launch_tag() {
  static const char tag = 0;
  return &tag;
}

}  // namespace trimkv
