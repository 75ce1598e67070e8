// CUDA backend of the KV cache. Two layouts (kernels/cache_layer.cuh):
//   fixed  (scope "head", no threshold): per-layer slot arrays of M + B slots per head; one fused
//          decode kernel per layer and step (kernels/decode.cuh) and chunked prefill
//          (kernels/prefill.cuh) evict in place.
//   pooled (scopes "layer" and "global", or a threshold): heads own segments of a region shared
//          by their pool (kernels/pool.cuh); decode and prefill append, PoolEvict evicts after
//          the pass (after the last layer for "global") and re-lays segments when needed.
// Everything runs on the legacy default stream, so tensor writes and reads through
// cudaMemcpy stay ordered with the kernels without any host synchronisation in a step.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "common/cuda_check.h"
#include "common/errors.h"
#include "cuda/stream_context.h"
#include "kernels/attention/decode.cuh"
#include "kernels/attention/prefill.cuh"
#include "kernels/cache/pool.cuh"
#include "ops/cache.h"

namespace trimkv {
namespace {

void check_cuda(cudaError_t e, const char* what) { cuda_check(e, what); }

/// Fixed layout: one layer's slot arrays, [batch, kv_heads, M + B] slots.
struct LayerStore {
  std::unique_ptr<Buffer> k, v, pos, lam, lognorm, lens;
};

/// Pooled layout: one set of slot arrays for every layer, npools regions of `region` slots,
/// and the segment table [layers, batch, kv_heads].
struct PoolStore {
  int nlayers = 1;         // layers per pool: every layer for "global", else 1
  int heads_per_pool = 1;  // KV heads of a layer in a pool: all for "layer"/"global", else 1
  int npools = 0;
  int region = 0;      // slots per pool
  int chunk_room = 1;  // the largest chunk the regions are sized for
  std::unique_ptr<Buffer> k, v, pos, lam, lognorm;
  std::unique_ptr<Buffer> lens, off, cap;
  std::unique_ptr<Buffer> ws, overflow;
};

// Page-locked host slots for the per-step positions, reused once their copy has completed.
class PinnedRing {
 public:
  PinnedRing(size_t bytes, int slots) : bytes_(bytes), slots_(slots) {
    check_cuda(cudaMallocHost(&host_, bytes * slots), "cudaMallocHost");
    events_.resize(slots, nullptr);
    for (auto& ev : events_)
      check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  }
  ~PinnedRing() {
    for (auto ev : events_) cudaEventDestroy(ev);
    cudaFreeHost(host_);
  }
  /// Copies `src` to `dst` (device) asynchronously through the next free slot.
  void upload(void* dst, const void* src, cudaStream_t stream) {
    const int i = next_++ % slots_;
    check_cuda(cudaEventSynchronize(events_[i]),
               "waiting for a staging slot");  // normally done long ago
    uint8_t* slot = static_cast<uint8_t*>(host_) + static_cast<size_t>(i) * bytes_;
    std::memcpy(slot, src, bytes_);
    check_cuda(cudaMemcpyAsync(dst, slot, bytes_, cudaMemcpyHostToDevice, stream),
               "positions upload");
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
    TRIMKV_CHECK(limits::head_dim_supported(cfg.head_dim), code::kUnsupported, "headDim ",
                 cfg.head_dim, " is not supported by the CUDA backend (multiples of ",
                 limits::kHeadDimMultiple, " up to ", limits::kMaxHeadDim, ")");
    int major = 0;
    check_cuda(cudaGetDevice(&dev_), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev_),
               "cudaDeviceGetAttribute");
    TRIMKV_CHECK(DecodeGroupSupported(cfg.group(), cfg.head_dim, cfg.dtype, major >= 8),
                 code::kUnsupported, "qHeads / kvHeads = ", cfg.group(),
                 " is not supported by the CUDA decode kernel for ", dtype_name(cfg.dtype),
                 " at headDim ", cfg.head_dim, major >= 8 ? "" : " on this GPU",
                 " (fp16/bf16 take groups up to ", limits::kMmaMaxGroup,
                 " on sm_80+; otherwise groups of 1, 2, 4, 8 and some larger powers of two)");
    if (cfg.scope == Scope::kHead && cfg.threshold <= 0.0) {
      init_fixed();
    } else {
      init_pooled();
    }
    if (uploads_positions()) {
      // Only these caches upload positions (do_decode): 1024 page-locked slots and events
      // would be wasted on the others, whose positions travel in the launch parameters.
      // The ring is deep enough never to stall the host.
      positions_ = std::make_unique<Buffer>(Backend::kCuda, sizeof(int32_t) * cfg.batch);
      ring_ = std::make_unique<PinnedRing>(sizeof(int32_t) * cfg.batch, 1024);
    }
    // Decode's workspace is fixed by the config; its leading counters must start at zero and
    // every step leaves them at zero, so it is never shared with prefill.
    const decode_params_t p = decode_params(0, nullptr);
    decode_ws_ =
        std::make_unique<Buffer>(Backend::kCuda, std::max<size_t>(DecodeWorkspaceBytes(p), 256));
    check_cuda(cudaMemsetAsync(decode_ws_->data(), 0, decode_ws_->bytes(), stream_), "cudaMemset");
  }

  size_t used_bytes() const override {
    check_overflow();
    size_t tokens = 0;
    std::vector<int32_t> lens(static_cast<size_t>(cfg_.batch) * cfg_.kv_heads);
    for (int l = 0; l < cfg_.layers; ++l) {
      copy_to_host(lens.data(), lens_of(l), lens.size() * sizeof(int32_t));
      for (int32_t n : lens) tokens += static_cast<size_t>(n);
    }
    return tokens * token_bytes();
  }

  size_t reserved_bytes() const override {
    if (!pool_) return layers_.size() * fixed_layer_bytes();
    const PoolStore& s = *pool_;
    return static_cast<size_t>(s.npools) * s.region * token_bytes() +
           3 * static_cast<size_t>(cfg_.layers) * cfg_.batch * cfg_.kv_heads * sizeof(int32_t);
  }

 protected:
  void do_decode(int layer, const decode_args_t& a) override {
    decode_params_t p = decode_params(layer, &a);
    if (!uploads_positions()) {
      // The decode kernel is the only reader: the positions travel in its launch parameters,
      // which saves an upload and an event record (~3.5 us of host time) per step.
      p.positions = nullptr;
      std::copy(a.positions.data, a.positions.data + cfg_.batch, p.pos_inline);
    } else if (layer == 0) {
      ring_->upload(positions_->data(), a.positions.data, stream_);  // PoolEvict reads them too
    }
    // Whether the kernel may read its tiles before its dependency wait: cuda/stream_context.h.
    check_cuda(StreamContext::of(dev_).decode_step(p.k_cache,
                                                   [&](bool early) {
                                                     p.prefetch_before_wait = early ? 1 : 0;
                                                     return DecodeStep(p, cfg_.dtype,
                                                                       decode_ws_->data(), stream_);
                                                   }),
               "decode kernel");
    if (pool_ && (cfg_.scope != Scope::kGlobal || layer == cfg_.layers - 1)) {
      pool_params_t e = pool_params(layer, 0, cfg_.batch);
      e.positions = static_cast<const int32_t*>(positions_->data());
      e.room = 1;  // the next step appends one token to every head
      check_cuda(PoolEvict(e, pool_->ws->data(), stream_), "pool eviction kernel");
    }
  }

  void do_prefill(int layer, const prefill_args_t& a) override {
    const bool varlen = a.chunks.size() > 1;
    int longest = 0;
    for (const prefill_chunk_t& c : a.chunks) longest = std::max(longest, c.length);
    if (varlen && layer == 0) upload_chunks(a.chunks);
    const prefill_chunk_t& one = a.chunks[0];
    // The PoolEvict launch over this call's sequences: one, or every slot with -1 for the others.
    auto pool_launch = [&]() {
      pool_params_t e = pool_params(layer, varlen ? 0 : one.seq, varlen ? cfg_.batch : 1);
      if (varlen) {
        e.positions = prefill_last_;
      } else {
        e.tcount = static_cast<int>(one.start) + one.length;
      }
      return e;
    };
    if (pool_) {
      // Room for the longest chunk in this layer's heads; the eviction follows the chunk.
      if (longest > pool_->chunk_room) grow_regions(longest);
      pool_params_t r = pool_launch();
      r.evict = false;
      r.room_layer = layer;
      r.room_extra = longest;
      check_cuda(PoolEvict(r, pool_->ws->data(), stream_), "pool room kernel");
    }
    prefill_params_t p;
    fill_layer(p, layer);
    if (varlen) {
      p.segs = prefill_segs_;
      p.nseg = static_cast<int>(a.chunks.size());
      p.max_chunk = longest;
      p.tokens = a.tokens();
    } else {
      p.seq = one.seq;
      p.start = static_cast<int>(one.start);
      p.chunk = one.length;
    }
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
    if (pool_ && (cfg_.scope != Scope::kGlobal || layer == cfg_.layers - 1)) {
      pool_params_t e = pool_launch();
      e.room = 1;
      check_cuda(PoolEvict(e, pool_->ws->data(), stream_), "pool eviction kernel");
    }
  }

  void do_reset(int seq) override {
    for (int l = 0; l < cfg_.layers; ++l) {
      int32_t* lens = lens_of(l) + static_cast<size_t>(seq) * cfg_.kv_heads;
      check_cuda(cudaMemsetAsync(lens, 0, sizeof(int32_t) * cfg_.kv_heads, stream_), "cudaMemset");
    }
  }

  int do_length(int seq, int layer, int head) const override {
    check_overflow();
    int32_t n = 0;
    copy_to_host(&n, lens_of(layer) + head_index(seq, head), sizeof(n));
    return n;
  }

  void do_snapshot(int seq, int layer, int head, std::vector<int32_t>& pos, std::vector<float>& lam,
                   std::vector<float>& lognorm) const override {
    const int n = do_length(seq, layer, head);
    size_t first = head_index(seq, head) * cap_;
    const void *pos_src, *lam_src, *lognorm_src;
    if (pool_) {
      int32_t off = 0;
      copy_to_host(&off,
                   static_cast<const int32_t*>(pool_->off->data()) + table_index(layer, seq, head),
                   sizeof(off));
      first = static_cast<size_t>(off);
      pos_src = pool_->pos->data();
      lam_src = pool_->lam->data();
      lognorm_src = pool_->lognorm ? pool_->lognorm->data() : nullptr;
    } else {
      const LayerStore& s = layers_[layer];
      pos_src = s.pos->data();
      lam_src = s.lam->data();
      lognorm_src = s.lognorm ? s.lognorm->data() : nullptr;
    }
    pos.resize(n);
    lam.resize(n);
    lognorm.assign(n, 0.f);
    if (n == 0) return;
    copy_to_host(pos.data(), static_cast<const int32_t*>(pos_src) + first, n * sizeof(int32_t));
    copy_to_host(lam.data(), static_cast<const float*>(lam_src) + first, n * sizeof(float));
    if (lognorm_src)
      copy_to_host(lognorm.data(), static_cast<const float*>(lognorm_src) + first,
                   n * sizeof(float));
  }

 private:
  size_t row_bytes() const { return static_cast<size_t>(cfg_.head_dim) * dtype_size(cfg_.dtype); }
  size_t token_bytes() const {
    return 2 * row_bytes() + (cfg_.strategy == Strategy::kKnormAlpha ? 12 : 8);
  }
  size_t fixed_layer_bytes() const {
    const size_t heads = static_cast<size_t>(cfg_.batch) * cfg_.kv_heads;
    return heads * cap_ * token_bytes() + heads * sizeof(int32_t);
  }

  void init_fixed() {
    cap_ = cfg_.memory + cfg_.buffer;
    const size_t heads = static_cast<size_t>(cfg_.batch) * cfg_.kv_heads;
    const size_t slots = heads * cap_;
    for (int l = 0; l < cfg_.layers; ++l) {
      LayerStore s;
      s.k = std::make_unique<Buffer>(Backend::kCuda, slots * row_bytes());
      s.v = std::make_unique<Buffer>(Backend::kCuda, slots * row_bytes());
      s.pos = std::make_unique<Buffer>(Backend::kCuda, slots * sizeof(int32_t));
      s.lam = std::make_unique<Buffer>(Backend::kCuda, slots * sizeof(float));
      if (cfg_.strategy == Strategy::kKnormAlpha)
        s.lognorm = std::make_unique<Buffer>(Backend::kCuda, slots * sizeof(float));
      s.lens = std::make_unique<Buffer>(Backend::kCuda, heads * sizeof(int32_t));
      check_cuda(cudaMemsetAsync(s.lens->data(), 0, s.lens->bytes(), stream_), "cudaMemset");
      layers_.push_back(std::move(s));
    }
  }

  // Heads of one pool, and the slots of a region sized for chunks of up to `chunk` tokens:
  // a pool holds at most nh * (M + B) - 1 tokens between evictions, plus one chunk per head
  // of every layer before a "global" eviction (one token per head while decoding); on top of
  // that each head gets a slack of free slots, so that segments are rarely re-laid.
  int pool_heads() const { return pool_->nlayers * pool_->heads_per_pool; }
  int64_t region_for(int chunk) const {
    const int64_t slack = std::max(16, (cfg_.memory + cfg_.buffer) / 8);
    return static_cast<int64_t>(pool_heads()) * (cfg_.memory + cfg_.buffer + chunk + slack);
  }
  int checked_region(int chunk) const {
    const int64_t region = region_for(chunk);
    TRIMKV_CHECK(region * pool_->npools < std::numeric_limits<int32_t>::max(), code::kUnsupported,
                 "the CUDA backend's pooled layout (scope '",
                 cfg_.scope == Scope::kLayer    ? "layer"
                 : cfg_.scope == Scope::kGlobal ? "global"
                                                : "head",
                 "' or a threshold) addresses at most 2^31 slots; this cache and chunk of ", chunk,
                 " tokens need ", region * pool_->npools);
    return static_cast<int>(region);
  }

  void init_pooled() {
    pool_ = std::make_unique<PoolStore>();
    PoolStore& s = *pool_;
    s.nlayers = cfg_.scope == Scope::kGlobal ? cfg_.layers : 1;
    s.heads_per_pool = cfg_.scope == Scope::kHead ? 1 : cfg_.kv_heads;
    TRIMKV_CHECK(pool_heads() <= kPoolMaxHeads, code::kUnsupported,
                 "scope 'global' on the CUDA backend pools at most ", kPoolMaxHeads,
                 " heads per sequence (layers x kvHeads), got ", pool_heads());
    s.npools = (cfg_.layers / s.nlayers) * cfg_.batch * (cfg_.kv_heads / s.heads_per_pool);
    s.chunk_room = 1;
    s.region = checked_region(s.chunk_room);
    const size_t table = static_cast<size_t>(cfg_.layers) * cfg_.batch * cfg_.kv_heads;
    s.lens = std::make_unique<Buffer>(Backend::kCuda, table * sizeof(int32_t));
    s.off = std::make_unique<Buffer>(Backend::kCuda, table * sizeof(int32_t));
    s.cap = std::make_unique<Buffer>(Backend::kCuda, table * sizeof(int32_t));
    s.overflow = std::make_unique<Buffer>(Backend::kCuda, sizeof(int));
    check_cuda(cudaMemsetAsync(s.lens->data(), 0, s.lens->bytes(), stream_), "cudaMemset");
    check_cuda(cudaMemsetAsync(s.overflow->data(), 0, sizeof(int), stream_), "cudaMemset");
    alloc_regions(s.region);
    // Even segments to start with; PoolEvict re-lays them as the heads' lengths drift apart.
    std::vector<int32_t> off(table), cap(table);
    const int nh = pool_heads();
    for (int l = 0; l < cfg_.layers; ++l)
      for (int b = 0; b < cfg_.batch; ++b)
        for (int h = 0; h < cfg_.kv_heads; ++h) {
          const int j = (l % s.nlayers) * s.heads_per_pool + h % s.heads_per_pool;
          const int share = s.region / nh, rest = s.region % nh;
          const size_t i = table_index(l, b, h);
          off[i] = static_cast<int32_t>(static_cast<int64_t>(pool_of(l, b, h)) * s.region +
                                        static_cast<int64_t>(j) * share + std::min(j, rest));
          cap[i] = share + (j < rest ? 1 : 0);
        }
    check_cuda(
        cudaMemcpy(s.off->data(), off.data(), table * sizeof(int32_t), cudaMemcpyHostToDevice),
        "cudaMemcpy");
    check_cuda(
        cudaMemcpy(s.cap->data(), cap.data(), table * sizeof(int32_t), cudaMemcpyHostToDevice),
        "cudaMemcpy");
  }

  // (Re)allocates the slot arrays and the pool workspace for regions of `region` slots; an
  // existing pool's regions are copied to the start of the new ones.
  void alloc_regions(int region) {
    PoolStore& s = *pool_;
    const size_t slots = static_cast<size_t>(s.npools) * region;
    auto grow = [&](std::unique_ptr<Buffer>& buf, size_t elem) {
      auto fresh = std::make_unique<Buffer>(Backend::kCuda, slots * elem);
      if (buf) {
        check_cuda(cudaMemcpy2DAsync(fresh->data(), region * elem, buf->data(), s.region * elem,
                                     s.region * elem, s.npools, cudaMemcpyDeviceToDevice, stream_),
                   "cudaMemcpy2D");
      }
      buf = std::move(fresh);  // the old buffer's cudaFree waits for the copy
    };
    grow(s.k, row_bytes());
    grow(s.v, row_bytes());
    grow(s.pos, sizeof(int32_t));
    grow(s.lam, sizeof(float));
    if (cfg_.strategy == Strategy::kKnormAlpha) grow(s.lognorm, sizeof(float));
    const int per_launch = cfg_.batch * (cfg_.kv_heads / s.heads_per_pool);
    s.ws.reset();
    s.ws = std::make_unique<Buffer>(Backend::kCuda, PoolWorkspaceBytes(per_launch, region));
  }

  void grow_regions(int chunk) {
    PoolStore& s = *pool_;
    const int region = checked_region(chunk);
    const int old = s.region;
    alloc_regions(region);
    check_cuda(PoolRebase(static_cast<int32_t*>(s.off->data()), cfg_.layers, cfg_.batch,
                          cfg_.kv_heads, s.nlayers, s.heads_per_pool, old, region, stream_),
               "pool rebase kernel");
    s.region = region;
    s.chunk_room = chunk;
  }

  // Stages a varlen call's chunk table (and, for PoolEvict, each sequence's last position or
  // -1) on the device for the layers of the step.
  void upload_chunks(const std::vector<prefill_chunk_t>& chunks) {
    if (!chunk_ring_) {
      chunk_ring_ = std::make_unique<PinnedRing>(chunk_table_bytes(), 64);
      chunk_table_ = std::make_unique<Buffer>(Backend::kCuda, chunk_table_bytes());
      chunk_staging_.resize(chunk_table_bytes());
      prefill_segs_ = static_cast<const prefill_seg_t*>(chunk_table_->data());
      prefill_last_ = reinterpret_cast<const int32_t*>(
          static_cast<const char*>(chunk_table_->data()) + sizeof(prefill_seg_t) * cfg_.batch);
    }
    // Segments past chunks.size() keep an earlier call's values: the kernels read only nseg.
    char* table = chunk_staging_.data();
    prefill_seg_t* segs = reinterpret_cast<prefill_seg_t*>(table);
    int32_t* last = reinterpret_cast<int32_t*>(table + sizeof(prefill_seg_t) * cfg_.batch);
    std::fill(last, last + cfg_.batch, -1);
    for (size_t i = 0; i < chunks.size(); ++i) {
      const prefill_chunk_t& c = chunks[i];
      segs[i] = prefill_seg_t{c.seq, static_cast<int>(c.start), c.length, c.first};
      last[c.seq] = static_cast<int32_t>(c.start + c.length - 1);
    }
    chunk_ring_->upload(chunk_table_->data(), table, stream_);  // copies: the staging is free again
  }
  size_t chunk_table_bytes() const {
    return (sizeof(prefill_seg_t) + sizeof(int32_t)) * cfg_.batch;
  }

  size_t table_index(int layer, int seq, int head) const {
    return (static_cast<size_t>(layer) * cfg_.batch + seq) * cfg_.kv_heads + head;
  }
  int pool_of(int layer, int seq, int head) const {
    const PoolStore& s = *pool_;
    return ((layer / s.nlayers) * cfg_.batch + seq) * (cfg_.kv_heads / s.heads_per_pool) +
           head / s.heads_per_pool;
  }

  int32_t* lens_of(int layer) const {
    if (pool_) return static_cast<int32_t*>(pool_->lens->data()) + table_index(layer, 0, 0);
    return static_cast<int32_t*>(layers_[layer].lens->data());
  }

  void check_overflow() const {
    if (!pool_) return;
    int flag = 0;
    copy_to_host(&flag, pool_->overflow->data(), sizeof(flag));
    TRIMKV_CHECK(flag == 0, code::kNative,
                 "internal error: a KV pool ran out of slots (please report it)");
  }

  // The PoolEvict launch that covers `layer` (all layers for "global") for sequences
  // [seq0, seq0 + nseq).
  pool_params_t pool_params(int layer, int seq0, int nseq) {
    PoolStore& s = *pool_;
    pool_params_t e;
    e.k_cache = s.k->data();
    e.v_cache = s.v->data();
    e.pos_cache = static_cast<int32_t*>(s.pos->data());
    e.lam_cache = static_cast<float*>(s.lam->data());
    e.lognorm_cache = s.lognorm ? static_cast<float*>(s.lognorm->data()) : nullptr;
    e.lens = static_cast<int32_t*>(s.lens->data());
    e.head_off = static_cast<int32_t*>(s.off->data());
    e.head_cap = static_cast<int32_t*>(s.cap->data());
    e.overflow = static_cast<int*>(s.overflow->data());
    e.layers = cfg_.layers;
    e.batch = cfg_.batch;
    e.kv_heads = cfg_.kv_heads;
    e.row_bytes = static_cast<int>(row_bytes());
    e.layer0 = s.nlayers == 1 ? layer : 0;
    e.nlayers = s.nlayers;
    e.heads_per_pool = s.heads_per_pool;
    e.seq0 = seq0;
    e.nseq = nseq;
    e.region = s.region;
    e.memory = cfg_.memory;
    e.buffer = cfg_.buffer;
    e.window = cfg_.window;
    e.knorm = cfg_.strategy == Strategy::kKnormAlpha;
    // The CPU backend's rules, computed the same way (cpu/cache_cpu.cc evict_pool).
    e.use_floor = cfg_.scope != Scope::kHead && cfg_.floor > 0.0;
    const int64_t budget = static_cast<int64_t>(pool_heads()) * cfg_.memory;
    e.floor_pooled =
        static_cast<int64_t>(std::floor(static_cast<double>(budget) * (1.0 - cfg_.floor)));
    e.floor_extra = static_cast<int>(std::floor(static_cast<double>(cfg_.memory) * cfg_.floor));
    e.thresholded = cfg_.threshold > 0.0;
    e.log_tau = e.thresholded ? static_cast<float>(std::log(cfg_.threshold)) : 0.f;
    return e;
  }

  // The fields decode_params_t and prefill_params_t share (cache_layer_t): one layer's slot
  // arrays, their layout and the cache's rules.
  void fill_layer(cache_layer_t& p, int layer) {
    if (pool_) {
      PoolStore& s = *pool_;
      p.k_cache = s.k->data();
      p.v_cache = s.v->data();
      p.pos_cache = static_cast<int32_t*>(s.pos->data());
      p.lam_cache = static_cast<float*>(s.lam->data());
      p.lognorm_cache = s.lognorm ? static_cast<float*>(s.lognorm->data()) : nullptr;
      p.head_off = static_cast<const int32_t*>(s.off->data()) + table_index(layer, 0, 0);
      p.cap = cfg_.memory + cfg_.buffer + 1;  // a head's usual length: sizes the decode splits
    } else {
      LayerStore& s = layers_[layer];
      p.k_cache = s.k->data();
      p.v_cache = s.v->data();
      p.pos_cache = static_cast<int32_t*>(s.pos->data());
      p.lam_cache = static_cast<float*>(s.lam->data());
      p.lognorm_cache = s.lognorm ? static_cast<float*>(s.lognorm->data()) : nullptr;
      p.head_off = nullptr;
      p.cap = cap_;
    }
    p.lens = lens_of(layer);
    p.batch = cfg_.batch;
    p.q_heads = cfg_.q_heads;
    p.kv_heads = cfg_.kv_heads;
    p.head_dim = cfg_.head_dim;
    p.memory = cfg_.memory;
    p.buffer = cfg_.buffer;
    p.window = cfg_.window;
    p.knorm = cfg_.strategy == Strategy::kKnormAlpha;
    p.scale = cfg_.softmax_scale();
  }

  size_t head_index(int seq, int head) const {
    return static_cast<size_t>(seq) * cfg_.kv_heads + head;
  }

  // Whether decode positions go through the device buffer: PoolEvict reads them from there, and
  // the launch parameters hold at most kInlinePositions.
  bool uploads_positions() const { return pool_ || cfg_.batch > decode_params_t::kInlinePositions; }

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
    p.positions = positions_ ? static_cast<const int32_t*>(positions_->data()) : nullptr;
    return p;
  }

  int cap_ = 0;                        // fixed layout: slots per head
  int dev_ = 0;                        // the device the cache lives on
  cudaStream_t stream_ = nullptr;      // legacy default stream: ordered with cudaMemcpy
  std::vector<LayerStore> layers_;     // fixed layout
  std::unique_ptr<PoolStore> pool_;    // pooled layout
  std::unique_ptr<Buffer> positions_;  // decode positions, when uploads_positions()
  std::unique_ptr<PinnedRing> ring_;   // their staging, likewise
  std::unique_ptr<Buffer> decode_ws_;
  std::unique_ptr<Buffer> prefill_ws_;      // grown to the largest chunk seen
  std::unique_ptr<PinnedRing> chunk_ring_;  // varlen prefill: staged chunk tables
  std::unique_ptr<Buffer> chunk_table_;     // [batch] prefill_seg_t, then [batch] last positions
  std::vector<char> chunk_staging_;         // host copy of chunk_table_, filled per varlen call
  const prefill_seg_t* prefill_segs_ = nullptr;
  const int32_t* prefill_last_ = nullptr;
};

}  // namespace

std::unique_ptr<Cache> create_cuda_cache(const cache_config_t& cfg) {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  return std::make_unique<CudaCache>(cfg);
}

}  // namespace trimkv
