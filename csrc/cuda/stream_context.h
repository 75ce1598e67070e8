// The per-device context of the CUDA backend: what trimkv enqueued last on a device's legacy
// default stream, where every CUDA cache and gate runs. It replaces a process-global launch
// record that the gate op wrote and the cache op read; both now go through this one type, and
// the rule that uses the record is stated here, once.
//
// The rule (decode_params_t::prefetch_before_wait, DecodeStep's contract): a decode step may
// request its first K/V tiles before its programmatic-dependency wait only when the last
// trimkv call enqueued on its stream was a decode step of ANOTHER layer. That step passed its
// own wait before letting this one start, so every earlier kernel, this layer's last writer
// included, has completed. After a gate call (or nothing, or this layer's own step) the decode
// waits first: after a gate it would compete with the gate's latency-bound tail (the
// whole-model steps of 8144d3d, which requested early there too, were 2-18% slower on the
// H100). Only decode steps and gate calls are recorded; the other kernels of a cache (prefill,
// pool) launch without the programmatic attribute, so they complete in stream order.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <vector>

namespace trimkv {

class StreamContext {
 public:
  /// The context of device dev's legacy default stream (one per device and process).
  static StreamContext& of(int dev) {
    static std::mutex mu;
    static std::vector<std::unique_ptr<StreamContext>> all;
    std::lock_guard<std::mutex> lock(mu);
    if (all.size() <= static_cast<size_t>(dev)) all.resize(static_cast<size_t>(dev) + 1);
    if (!all[static_cast<size_t>(dev)]) all[static_cast<size_t>(dev)].reset(new StreamContext());
    return *all[static_cast<size_t>(dev)];
  }

  /// Enqueues a decode step of the layer whose cache is identified by `layer` (its K slots):
  /// launch(prefetch_before_wait) with the rule above, recorded when it returns cudaSuccess.
  /// Caches and gates may be used from several threads: the check, the launch and the record
  /// happen under one lock.
  template <typename Launch>
  cudaError_t decode_step(const void* layer, Launch&& launch) {
    std::lock_guard<std::mutex> lock(mu_);
    const bool early = last_ == Last::kDecode && last_layer_ != layer;
    const cudaError_t e = launch(early);
    if (e == cudaSuccess) {
      last_ = Last::kDecode;
      last_layer_ = layer;
    }
    return e;
  }

  /// Enqueues a gate call, launch(), recorded when it returns cudaSuccess.
  template <typename Launch>
  cudaError_t gate_call(Launch&& launch) {
    std::lock_guard<std::mutex> lock(mu_);
    const cudaError_t e = launch();
    if (e == cudaSuccess) {
      last_ = Last::kGate;
      last_layer_ = nullptr;
    }
    return e;
  }

 private:
  StreamContext() = default;

  enum class Last { kNothing, kDecode, kGate };
  std::mutex mu_;
  Last last_ = Last::kNothing;
  const void* last_layer_ = nullptr;
};

}  // namespace trimkv
