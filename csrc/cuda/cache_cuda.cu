// CUDA backend of the KV cache: per-layer slot arrays on the device, one fused decode kernel
// per layer and step (kernels/decode.cuh), chunked prefill with eviction (kernels/prefill.cuh).
// Everything runs on the legacy default stream, so tensor writes and reads through
// cudaMemcpy stay ordered with the kernels without any host synchronisation in a step.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "common/errors.h"
#include "kernels/decode.cuh"
#include "kernels/prefill.cuh"
#include "ops/cache.h"

namespace trimkv {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  if (e == cudaErrorMemoryAllocation) fail(code::kOutOfMemory, what, ": out of GPU memory");
  fail(code::kNative, what, " failed: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e));
}

struct LayerStore {
  std::unique_ptr<Buffer> k, v, pos, lam, lognorm, lens;
};

// Page-locked host slots for the per-step positions, reused once their copy has completed.
class PinnedRing {
 public:
  PinnedRing(size_t bytes, int slots) : bytes_(bytes), slots_(slots) {
    check_cuda(cudaMallocHost(&host_, bytes * slots), "cudaMallocHost");
    events_.resize(slots, nullptr);
    for (auto& ev : events_) check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  }
  ~PinnedRing() {
    for (auto ev : events_) cudaEventDestroy(ev);
    cudaFreeHost(host_);
  }
  /// Copies `src` to `dst` (device) asynchronously through the next free slot.
  void upload(void* dst, const void* src, cudaStream_t stream) {
    const int i = next_++ % slots_;
    check_cuda(cudaEventSynchronize(events_[i]), "waiting for a staging slot");  // normally done long ago
    uint8_t* slot = static_cast<uint8_t*>(host_) + static_cast<size_t>(i) * bytes_;
    std::memcpy(slot, src, bytes_);
    check_cuda(cudaMemcpyAsync(dst, slot, bytes_, cudaMemcpyHostToDevice, stream), "positions upload");
    check_cuda(cudaEventRecord(events_[i], stream), "cudaEventRecord");
  }

 private:
  size_t bytes_;
  int slots_;
  int next_ = 0;
  void* host_ = nullptr;
  std::vector<cudaEvent_t> events_;
};

class CudaCache final : public Cache {
 public:
  explicit CudaCache(const cache_config_t& cfg) : Cache(Backend::kCuda, cfg) {
    TRIMKV_CHECK(cfg.scope == Scope::kHead, code::kUnsupported, "scope '",
                 cfg.scope == Scope::kLayer ? "layer" : "global",
                 "' is not supported by the CUDA backend yet; use scope 'head' or the CPU backend");
    TRIMKV_CHECK(cfg.threshold <= 0.0, code::kUnsupported,
                 "threshold is not supported by the CUDA backend yet; use the CPU backend");
    TRIMKV_CHECK(cfg.head_dim % 8 == 0 && cfg.head_dim <= 256, code::kUnsupported, "headDim ", cfg.head_dim,
                 " is not supported by the CUDA backend (multiples of 8 up to 256)");
    cap_ = cfg.memory + cfg.buffer;
    const size_t heads = static_cast<size_t>(cfg.batch) * cfg.kv_heads;
    const size_t slots = heads * cap_;
    const size_t row = static_cast<size_t>(cfg.head_dim) * dtype_size(cfg.dtype);
    for (int l = 0; l < cfg.layers; ++l) {
      LayerStore s;
      s.k = std::make_unique<Buffer>(Backend::kCuda, slots * row);
      s.v = std::make_unique<Buffer>(Backend::kCuda, slots * row);
      s.pos = std::make_unique<Buffer>(Backend::kCuda, slots * sizeof(int32_t));
      s.lam = std::make_unique<Buffer>(Backend::kCuda, slots * sizeof(float));
      if (cfg.strategy == Strategy::kKnormAlpha)
        s.lognorm = std::make_unique<Buffer>(Backend::kCuda, slots * sizeof(float));
      s.lens = std::make_unique<Buffer>(Backend::kCuda, heads * sizeof(int32_t));
      check_cuda(cudaMemsetAsync(s.lens->data(), 0, s.lens->bytes(), stream_), "cudaMemset");
      layers_.push_back(std::move(s));
    }
    positions_ = std::make_unique<Buffer>(Backend::kCuda, sizeof(int32_t) * cfg.batch);
    ring_ = std::make_unique<PinnedRing>(sizeof(int32_t) * cfg.batch, 1024);  // deep enough never to stall the host
    // Decode's workspace is fixed by the config; its leading counters must start at zero and
    // every step leaves them at zero, so it is never shared with prefill.
    const decode_params_t p = decode_params(0, nullptr);
    decode_ws_ = std::make_unique<Buffer>(Backend::kCuda, std::max<size_t>(DecodeWorkspaceBytes(p), 256));
    check_cuda(cudaMemsetAsync(decode_ws_->data(), 0, decode_ws_->bytes(), stream_), "cudaMemset");
    reserved_ = layers_.size() * (2 * slots * row + slots * (cfg.strategy == Strategy::kKnormAlpha ? 12 : 8) +
                                  heads * sizeof(int32_t));
  }

  size_t used_bytes() const override {
    const size_t row = static_cast<size_t>(cfg_.head_dim) * dtype_size(cfg_.dtype);
    const size_t per_token = 2 * row + (cfg_.strategy == Strategy::kKnormAlpha ? 12 : 8);
    size_t tokens = 0;
    std::vector<int32_t> lens(static_cast<size_t>(cfg_.batch) * cfg_.kv_heads);
    for (const LayerStore& s : layers_) {
      copy_to_host(lens.data(), s.lens->data(), lens.size() * sizeof(int32_t));
      for (int32_t n : lens) tokens += static_cast<size_t>(n);
    }
    return tokens * per_token;
  }

  size_t reserved_bytes() const override { return reserved_; }

 protected:
  void do_decode(int layer, const decode_args_t& a) override {
    if (layer == 0) ring_->upload(positions_->data(), a.positions.data, stream_);
    decode_params_t p = decode_params(layer, &a);
    check_cuda(DecodeStep(p, cfg_.dtype, decode_ws_->data(), stream_), "decode kernel");
  }

  void do_prefill(int layer, const prefill_args_t& a) override {
    prefill_params_t p;
    fill_layer(p, layer);
    p.seq = a.seq;
    p.start = static_cast<int>(a.start);
    p.chunk = a.chunk();
    p.q = a.q->data();
    p.k = a.k->data();
    p.v = a.v->data();
    p.lam = static_cast<const float*>(a.lam->data());
    p.out = a.out->data();
    const size_t ws = PrefillWorkspaceBytes(p);
    if (!prefill_ws_ || prefill_ws_->bytes() < ws) {
      prefill_ws_.reset();  // frees after the kernels using it (cudaFree synchronises)
      prefill_ws_ = std::make_unique<Buffer>(Backend::kCuda, std::max<size_t>(ws, 256));
    }
    check_cuda(PrefillChunk(p, cfg_.dtype, prefill_ws_->data(), stream_), "prefill kernel");
  }

  void do_reset(int seq) override {
    for (LayerStore& s : layers_) {
      int32_t* lens = static_cast<int32_t*>(s.lens->data()) + static_cast<size_t>(seq) * cfg_.kv_heads;
      check_cuda(cudaMemsetAsync(lens, 0, sizeof(int32_t) * cfg_.kv_heads, stream_), "cudaMemset");
    }
  }

  int do_length(int seq, int layer, int head) const override {
    int32_t n = 0;
    copy_to_host(&n, static_cast<const int32_t*>(layers_[layer].lens->data()) + head_index(seq, head), sizeof(n));
    return n;
  }

  void do_snapshot(int seq, int layer, int head, std::vector<int32_t>& pos, std::vector<float>& lam,
                   std::vector<float>& lognorm) const override {
    const LayerStore& s = layers_[layer];
    const int n = do_length(seq, layer, head);
    const size_t first = head_index(seq, head) * cap_;
    pos.resize(n);
    lam.resize(n);
    lognorm.assign(n, 0.f);
    if (n == 0) return;
    copy_to_host(pos.data(), static_cast<const int32_t*>(s.pos->data()) + first, n * sizeof(int32_t));
    copy_to_host(lam.data(), static_cast<const float*>(s.lam->data()) + first, n * sizeof(float));
    if (s.lognorm) copy_to_host(lognorm.data(), static_cast<const float*>(s.lognorm->data()) + first, n * sizeof(float));
  }

 private:
  // The fields decode_params_t and prefill_params_t share: one layer's slot arrays and the
  // cache's shape and rules.
  template <typename Params>
  void fill_layer(Params& p, int layer) {
    LayerStore& s = layers_[layer];
    p.k_cache = s.k->data();
    p.v_cache = s.v->data();
    p.pos_cache = static_cast<int32_t*>(s.pos->data());
    p.lam_cache = static_cast<float*>(s.lam->data());
    p.lognorm_cache = s.lognorm ? static_cast<float*>(s.lognorm->data()) : nullptr;
    p.lens = static_cast<int32_t*>(s.lens->data());
    p.batch = cfg_.batch;
    p.q_heads = cfg_.q_heads;
    p.kv_heads = cfg_.kv_heads;
    p.head_dim = cfg_.head_dim;
    p.memory = cfg_.memory;
    p.buffer = cfg_.buffer;
    p.cap = cap_;
    p.window = cfg_.window;
    p.knorm = cfg_.strategy == Strategy::kKnormAlpha;
    p.scale = cfg_.softmax_scale();
  }

  size_t head_index(int seq, int head) const { return static_cast<size_t>(seq) * cfg_.kv_heads + head; }

  decode_params_t decode_params(int layer, const decode_args_t* a) {
    decode_params_t p;
    fill_layer(p, layer);
    if (a) {
      p.q = a->q->data();
      p.k_new = a->k->data();
      p.v_new = a->v->data();
      p.lam_new = static_cast<const float*>(a->lam->data());
      p.out = a->out->data();
    }
    p.positions = static_cast<const int32_t*>(positions_->data());
    return p;
  }

  int cap_ = 0;
  cudaStream_t stream_ = nullptr;  // legacy default stream: ordered with cudaMemcpy
  std::vector<LayerStore> layers_;
  std::unique_ptr<Buffer> positions_;
  std::unique_ptr<PinnedRing> ring_;
  std::unique_ptr<Buffer> decode_ws_;
  std::unique_ptr<Buffer> prefill_ws_;  // grown to the largest chunk seen
  size_t reserved_ = 0;
};

}  // namespace

std::unique_ptr<Cache> create_cuda_cache(const cache_config_t& cfg) {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  return std::make_unique<CudaCache>(cfg);
}

}  // namespace trimkv
