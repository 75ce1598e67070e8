/**
 * Microbenchmarks of the kernels, timed inside the addon (CUDA events, or a steady clock on
 * the CPU backend), warm, as medians of many calls over inputs larger than the L2 cache
 * (several layers, sequences or gates are cycled). The suite that sweeps them, compares with
 * PyTorch and writes JSON / Markdown / SVG lives in lib/bench/ (`trimkv bench`).
 */
import { native } from './errors.js';
import { BACKEND_INDEX, loadAddon } from './native.js';
import type { Runtime } from './runtime.js';
import type { DType, GateSpec, Scope } from './types.js';

/** Bytes the inputs of one measured family should span so that L2 (50 MB on H100) cannot hold them. */
export const ROTATE_BYTES = 256 * 2 ** 20;
/** The same on the CPU backend: past the last-level cache of a typical server socket. */
export const CPU_ROTATE_BYTES = 32 * 2 ** 20;

export function defaultRotateBytes(rt: Runtime): number {
  return rt.backend === 'cuda' ? ROTATE_BYTES : CPU_ROTATE_BYTES;
}

/** Order statistics of timing samples (ms). Quantiles interpolate linearly between ranks. */
export interface Stats {
  median: number; p10: number; p90: number; n: number;
  mean: number; min: number; max: number;
  /** (p90 - p10) / median: the relative spread of the samples. */
  spread: number;
}

/**
 * Median, p10, p90, mean, min, max of the samples.
 * @throws {RangeError} when there are no samples or one is not finite
 */
export function stats(samples: ArrayLike<number>): Stats {
  const a = Array.from(samples).sort((x, y) => x - y);
  if (a.length === 0) throw new RangeError('Expected at least one sample for stats but received none');
  if (!a.every(Number.isFinite)) throw new RangeError('Expected finite samples for stats but received a NaN or infinity');
  const at = (q: number) => {
    const r = q * (a.length - 1), lo = Math.floor(r), hi = Math.ceil(r);
    return a[lo]! + (a[hi]! - a[lo]!) * (r - lo);
  };
  const median = at(0.5), p10 = at(0.1), p90 = at(0.9);
  const mean = a.reduce((s, x) => s + x, 0) / a.length;
  return { median, p10, p90, n: a.length, mean, min: a[0]!, max: a[a.length - 1]!, spread: median > 0 ? (p90 - p10) / median : 0 };
}

export const DTYPE_BYTES: Record<DType, number> = { fp32: 4, fp16: 2, bf16: 2 };

/** Bytes one cached token takes per head: K and V rows plus position (int32) and lam (fp32). */
export function slotBytes(headDim: number, dtype: DType): number {
  return 2 * headDim * DTYPE_BYTES[dtype] + 8;
}

// One pool of random values, sliced: filling hundreds of MB with Math.random per case would
// dominate the run time. Reuse is harmless: the kernels' cost does not depend on the values.
let pool = new Float32Array(0);
function randomArray(n: number, scale = 1): Float32Array {
  if (pool.length < n) {
    const next = new Float32Array(Math.max(n, 2 * pool.length));
    next.set(pool);
    for (let i = pool.length; i < next.length; i++) next[i] = Math.random() * 2 - 1;
    pool = next;
  }
  const off = Math.floor(Math.random() * (pool.length - n + 1));
  const a = pool.subarray(off, off + n);
  return scale === 1 ? a : a.map((x) => x * scale);
}

function randomLam(n: number): Float32Array {
  return Float32Array.from(randomArray(n), (x) => -Math.abs(x) * 0.05);
}

function toBf16(a: Float32Array): Uint16Array {
  const u = new Uint16Array(a.length);
  const f = new Float32Array(1), b = new Uint32Array(f.buffer);
  for (let i = 0; i < a.length; i++) { f[0] = a[i]!; u[i] = (b[0]! + 0x7fff + ((b[0]! >>> 16) & 1)) >>> 16; }
  return u;
}

/** Device copy bandwidth (GB/s, read + write) of a 1 GiB copy; NaN on the CPU backend. */
export function copyBandwidth(rt: Runtime, bytes = 2 ** 30, iters = 20): number {
  if (rt.backend !== 'cuda') return Number.NaN;
  return native(() => loadAddon().copyBandwidth(bytes, iters));
}

/**
 * Bytes in use on the GPU (cudaMemGetInfo: total - free, every allocation of the device), or
 * null where there is no such query (the CPU backend, a CPU-only build, an older addon).
 */
export function deviceMemoryUsed(rt: Runtime): number | null {
  if (rt.backend !== 'cuda') return null;
  return native(() => loadAddon().deviceMemoryUsed(BACKEND_INDEX[rt.backend]));
}

/**
 * Times `n` calls of fn(i) on the runtime's backend; per-call milliseconds. With group > 1, one
 * value per run of `group` back-to-back calls (its time / group): no events between the calls.
 */
export function timeCalls(rt: Runtime, n: number, fn: (i: number) => void, spinMs = 20, group = 1): Float64Array {
  return native(() => loadAddon().timeCalls(BACKEND_INDEX[rt.backend], n, spinMs, fn, group));
}

/**
 * Times `n` calls like `timeCalls`, in chunks whose enqueue time stays below the spin that
 * holds the GPU back, so no timed call waits for the host (the events then measure device
 * time, not launch gaps). `hostMs` is the host cost of one call, measured during warm-up.
 * group > 1: one value per run of `group` calls (n a multiple of group).
 */
export function timeMany(rt: Runtime, n: number, fn: (i: number) => void, hostMs: number, group = 1): Float64Array {
  if (!Number.isInteger(group) || group < 1 || n % group !== 0) {
    throw new RangeError(`Expected n (${n}) to be a multiple of group (${group})`);
  }
  if (rt.backend !== 'cuda') return timeCalls(rt, n, fn, 0, group);
  const per = Math.max(hostMs, 0.002);
  let chunk = Math.max(8, Math.min(n, Math.floor(60 / per)));
  chunk = Math.max(group, chunk - (chunk % group));
  const out = new Float64Array(n / group);
  for (let done = 0; done < n; done += chunk) {
    const m = Math.min(chunk, n - done);
    out.set(timeCalls(rt, m, (i) => fn(done + i), Math.min(250, 2 * m * per + 2), group), done / group);
  }
  return out;
}

/**
 * Back-to-back device time of calls: `runs` runs of `group` calls (at least 8 per run, whole
 * multiples of `unit`, e.g. the layers of a step), one event pair per run, ms per call.
 */
function timeBursts(rt: Runtime, fn: (i: number) => void, hostMs: number, unit: number, calls: number): Stats {
  const group = unit * Math.ceil(8 / unit);
  const runs = Math.max(11, Math.ceil(calls / group));
  return stats(timeMany(rt, runs * group, fn, hostMs, group));
}

/**
 * Host cost of one call, microseconds: wall time of each call with the device drained (untimed)
 * between runs of whole multiples of `unit` calls, so the launch queue never fills and blocks
 * the host.
 */
function hostCost(rt: Runtime, fn: (i: number) => void, unit: number, calls = 256): Stats {
  // Runs of at least 32 calls between drains: the first call after a drain pays a cold start
  // (about 2x), which the median leaves out, as a model's back-to-back calls never see it.
  const group = unit * Math.ceil(32 / unit);
  const n = group * Math.max(1, Math.ceil(calls / group));
  return stats(native(() => loadAddon().hostTimes(BACKEND_INDEX[rt.backend], n, group, fn)));
}

/** The CUDA runtime's own host cost per enqueue on this machine (us, medians); null on the CPU backend. */
export function launchCost(rt: Runtime, iters = 2000): { kernelUs: number; clusterUs: number | null; streamKernelUs: number; eventUs: number; uploadUs: number } | null {
  if (rt.backend !== 'cuda') return null;
  const c = native(() => loadAddon().launchCost(iters));
  return { ...c, clusterUs: Number.isFinite(c.clusterUs) ? c.clusterUs : null };
}

/** Runs `n` warm-up calls and returns the host wall time of one call (ms). */
function warmUp(n: number, fn: (i: number) => void): number {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) fn(i);
  return (performance.now() - t0) / n;
}

export interface DecodeBenchCase {
  batch: number; memory: number; buffer: number;
  qHeads: number; kvHeads: number; headDim: number; dtype: DType;
  /** Budget scope (default 'head') and floor ratio of the cache. */
  scope?: Scope; floor?: number;
  /** Layers of the cache (default: enough to rotate the inputs past the caches). */
  layers?: number;
}

export interface DecodeBenchResult extends DecodeBenchCase {
  layers: number;
  /** GPU (or CPU) time of one decode call for one layer, ms. */
  time: Stats;
  /** K/V + metadata + q/out bytes one call reads and writes. */
  bytes: number;
  /** bytes / median time, GB/s. */
  bandwidth: number;
  /**
   * Back-to-back: runs of whole steps (all layers, at least 8 calls) with one event pair per
   * run and none between the calls; ms per call, median over runs.
   */
  burst: Stats;
  /** bytes / burst median, GB/s. */
  burstBandwidth: number;
  /** Host time to enqueue one decode call from TypeScript, microseconds (median of calls). */
  hostUs: number;
  /** The same, mean (it spreads layer 0's once-a-step positions upload). */
  hostMeanUs: number;
}

export interface BenchOptions {
  /** Bytes the rotated inputs span (default: ROTATE_BYTES on CUDA, CPU_ROTATE_BYTES on the CPU). */
  rotateBytes?: number;
  /** Upper bound on layers / sets cycled (default 64). */
  maxSets?: number;
}

function setsFor(rt: Runtime, perSet: number, o: BenchOptions): number {
  return Math.max(1, Math.min(o.maxSets ?? 64, Math.ceil((o.rotateBytes ?? defaultRotateBytes(rt)) / perSet)));
}

/** Bytes one decode call reads and writes at an average cache length `len` (per layer). */
export function decodeBytes(c: DecodeBenchCase, len: number): number {
  const es = DTYPE_BYTES[c.dtype];
  return c.batch * c.kvHeads * (len + 1) * slotBytes(c.headDim, c.dtype) + 2 * c.batch * c.qHeads * c.headDim * es;
}

interface DecodeRig {
  layers: number;
  /** One layer of one step; calls cycle layers and advance the step at layer 0. */
  call: (i: number) => void;
  /** Decode steps run since the cache was filled (incremented at layer 0). */
  steps: () => number;
  dispose: () => void;
}

/** Random q, k, v and lam and an output tensor for `rows` tokens (a prefill chunk) or slots (a decode step). */
function layerTensors(rt: Runtime, rows: number, sh: { qHeads: number; kvHeads: number; headDim: number; dtype: DType }) {
  const { qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = sh;
  return {
    q: rt.fromArray(randomArray(rows * Hq * D), [rows, Hq, D], dtype),
    k: rt.fromArray(randomArray(rows * Hkv * D), [rows, Hkv, D], dtype),
    v: rt.fromArray(randomArray(rows * Hkv * D), [rows, Hkv, D], dtype),
    lam: rt.fromArray(randomLam(rows * Hkv), [rows, Hkv], 'fp32'),
    out: rt.tensor([rows, Hq, D], dtype),
  };
}

/** A cache of `layers` layers filled to M per head by one prefill chunk per sequence. */
function decodeRig(rt: Runtime, c: DecodeBenchCase, layers: number): DecodeRig {
  const { batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  const cache = rt.createCache({ layers, batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, memory: c.memory, buffer: c.buffer, dtype,
    scope: c.scope ?? 'head', floor: c.floor ?? 0 });
  const owned: { dispose(): void }[] = [cache];
  try {
    const C = c.memory;
    const pre = layerTensors(rt, C, c);
    for (let s = 0; s < Bt; s++) for (let l = 0; l < layers; l++) cache.prefill(l, { seq: s, start: 0, ...pre });
    for (const t of Object.values(pre)) t.dispose();
    const { q, k, v, lam, out } = layerTensors(rt, Bt, c);
    owned.push(q, k, v, lam, out);
    const positions = new Int32Array(Bt);
    let pos = C, steps = 0, next = 0;
    return {
      layers,
      call: () => {
        const l = next;
        next = (next + 1) % layers;
        if (l === 0) { positions.fill(pos++); steps++; }
        cache.decode(l, { q, k, v, lam, out, positions });
      },
      steps: () => steps,
      dispose: () => { for (const t of owned) t.dispose(); },
    };
  } catch (e) {
    for (const t of owned) t.dispose();
    throw e;
  }
}

/**
 * Decode step of one layer over a full cache (prefilled to M with one chunk per sequence),
 * steady state: every call appends one token per sequence and evicts (B = 0) or buffers.
 * @throws {TrimKVError} from the cache (shapes, out of memory, unsupported on the backend)
 */
export function benchDecode(rt: Runtime, c: DecodeBenchCase, calls = 200, o: BenchOptions = {}): DecodeBenchResult {
  const layers = c.layers ?? setsFor(rt, c.batch * c.kvHeads * (c.memory + c.buffer) * slotBytes(c.headDim, c.dtype), o);
  const rig = decodeRig(rt, c, layers);
  try {
    // Warm-up: whole steps, so the timed calls start at layer 0.
    const warm = layers * Math.max(2, Math.ceil(20 / layers));
    const hostMs = warmUp(warm, rig.call);
    const n = Math.max(calls, layers) - (Math.max(calls, layers) % layers);
    const ms = timeMany(rt, n, rig.call, hostMs);
    const burst = timeBursts(rt, rig.call, hostMs, layers, calls);
    const host = hostCost(rt, rig.call, layers);
    const bytes = decodeBytes(c, c.memory + c.buffer / 2);
    const time = stats(ms);
    return { ...c, layers, time, burst, bytes, bandwidth: bytes / (time.median * 1e-3) / 1e9,
      burstBandwidth: bytes / (burst.median * 1e-3) / 1e9, hostUs: host.median, hostMeanUs: host.mean };
  } finally {
    rig.dispose();
  }
}

export interface SelectBenchResult extends DecodeBenchCase {
  layers: number;
  /** Decode calls that evicted B tokens (one step in B), ms. */
  evicting: Stats;
  /** Decode calls that only appended and attended, ms. */
  appending: Stats;
  /** evicting.median - appending.median: the cost of one selection (score, top-M, compaction), ms. */
  selectMs: number;
  /** selectMs / B: the selection cost per generated token, ms. */
  amortizedMs: number;
}

/**
 * Eviction (selection) cost: decode with buffer B > 0 evicts on one step in B; the difference
 * between the medians of evicting and non-evicting calls is the cost of scoring, selecting the
 * M survivors and compacting the cache, as fused into the decode kernel.
 * @throws {TrimKVError} from the cache
 */
export function benchSelect(rt: Runtime, c: DecodeBenchCase, evictions = 6, o: BenchOptions = {}): SelectBenchResult {
  if (c.buffer < 2) throw new RangeError(`Expected a buffer >= 2 for benchSelect but received ${c.buffer}`);
  const layers = c.layers ?? setsFor(rt, c.batch * c.kvHeads * (c.memory + c.buffer) * slotBytes(c.headDim, c.dtype), o);
  const rig = decodeRig(rt, c, layers);
  try {
    const hostMs = warmUp(layers * c.buffer, rig.call);  // one eviction cycle, ends at a step boundary
    const n = layers * c.buffer * evictions;
    const first = rig.steps();
    // After the prefill a head holds M; decode step k (counted from the prefill) evicts when
    // M + k reaches M + B, i.e. on every step k that is a multiple of B.
    const ms = timeMany(rt, n, rig.call, hostMs);
    const ev: number[] = [], ap: number[] = [];
    for (let i = 0; i < n; i++) {
      const step = first + 1 + Math.floor(i / layers);
      (step % c.buffer === 0 ? ev : ap).push(ms[i]!);
    }
    const evicting = stats(ev), appending = stats(ap);
    const selectMs = evicting.median - appending.median;
    return { ...c, layers, evicting, appending, selectMs, amortizedMs: selectMs / c.buffer };
  } finally {
    rig.dispose();
  }
}

export interface PrefillBenchCase {
  chunk: number; memory: number; buffer: number;
  qHeads: number; kvHeads: number; headDim: number; dtype: DType;
}

export interface PrefillBenchResult extends PrefillBenchCase {
  /** Sequences x layers cycled. */
  sets: number;
  /** One prefill chunk of one sequence and one layer, ms. */
  time: Stats;
  bytes: number;
  flops: number;
  bandwidth: number;
  /** FLOP/s at the median, in TFLOP/s. */
  tflops: number;
}

/** Bytes and FLOPs of one prefill chunk of C tokens over a cache of M (+ B) tokens. */
export function prefillCost(c: PrefillBenchCase): { bytes: number; flops: number } {
  const { chunk: C, memory: M, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  const es = DTYPE_BYTES[dtype], slot = slotBytes(D, dtype);
  // read q, k, v, lam of the chunk and the cached M tokens; write out and (at most) C survivors
  const bytes = 2 * C * Hq * D * es + C * Hkv * (2 * D * es + 4) + Hkv * M * slot + Hkv * Math.min(C, M) * slot;
  // QK^T and PV: 2 FLOPs per multiply-add, over the cache plus the causal half of the chunk
  const flops = 4 * Hq * D * (C * M + (C * (C + 1)) / 2);
  return { bytes, flops };
}

/**
 * Prefill chunk of one sequence and one layer at steady state: the cache holds M, the chunk of C
 * tokens attends to it and causally to itself, then the cache is evicted back to M.
 * @throws {TrimKVError} from the cache
 */
export function benchPrefill(rt: Runtime, c: PrefillBenchCase, calls = 100, o: BenchOptions = {}): PrefillBenchResult {
  const { chunk: C, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  const perSet = Hkv * (c.memory + c.buffer) * slotBytes(D, dtype);
  const want = setsFor(rt, perSet, o);
  const layers = Math.min(want, 8), batch = Math.max(1, Math.ceil(want / layers));
  const cache = rt.createCache({ layers, batch, qHeads: Hq, kvHeads: Hkv, headDim: D, memory: c.memory, buffer: c.buffer, dtype });
  const { q, k, v, lam, out } = layerTensors(rt, C, c);
  try {
    const start = new Array<number>(batch).fill(0);
    let j = 0;
    const call = () => {
      const s = Math.floor(j / layers), l = j % layers;
      cache.prefill(l, { seq: s, start: start[s]!, q, k, v, lam, out });
      if (l === layers - 1) start[s]! += C;
      j = (j + 1) % (layers * batch);
    };
    // Fill every head to M (and past it, so every timed chunk evicts).
    const fill = Math.ceil(c.memory / C) * layers * batch;
    const hostMs = warmUp(fill + layers * batch, call);
    const n = Math.max(calls, layers * batch);
    const time = stats(timeMany(rt, n, call, hostMs));
    const { bytes, flops } = prefillCost(c);
    return { ...c, sets: layers * batch, time, bytes, flops, bandwidth: bytes / (time.median * 1e-3) / 1e9, tflops: flops / (time.median * 1e-3) / 1e12 };
  } finally {
    for (const t of [cache, q, k, v, lam, out]) t.dispose();
  }
}

/** FLOPs of causal attention for a chunk of C queries over `cached` earlier tokens: 4 Hq D sum of visible keys. */
export function causalAttentionFlops(qHeads: number, headDim: number, chunk: number, cached: number): number {
  // Query i of the chunk (0-based) sees the cached tokens and chunk tokens 0..i: QK^T and PV,
  // 2 FLOPs per multiply-add each.
  return 4 * qHeads * headDim * (chunk * cached + (chunk * (chunk + 1)) / 2);
}

export interface PrefillAttendCase {
  /** Tokens already in the cache when the chunk arrives. */
  cached: number;
  chunk: number;
  qHeads: number; kvHeads: number; headDim: number; dtype: DType;
}

export interface PrefillAttendResult extends PrefillAttendCase {
  /** The cache's M and B: room for every token (M + B > cached + C), so nothing is evicted. */
  memory: number; buffer: number;
  /** Sequences x layers cycled (each timed call on a slot prefilled to `cached`). */
  sets: number;
  /** One prefill chunk: attend to the cached tokens and causally within the chunk, append, ms. */
  time: Stats;
  flops: number;
  tflops: number;
}

/**
 * A prefill chunk of C tokens over `cached` tokens with nothing evicted: the cache has room for
 * cached + C tokens (M = cached + C, B = 1: eviction would need one more), so the call attends
 * and appends the chunk, the work that SDPA over cached + C keys with a bottom-right causal
 * mask does (plus writing the chunk's K/V into the cache). Every timed call uses a slot
 * (sequence, layer) that was reset and prefilled to `cached` outside the timed window.
 * @throws {TrimKVError} from the cache
 */
export function benchPrefillAttend(rt: Runtime, c: PrefillAttendCase, calls = 30, o: BenchOptions = {}): PrefillAttendResult {
  const { cached, chunk: C, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  const memory = cached + C, buffer = 1;
  const want = setsFor(rt, Hkv * (memory + buffer) * slotBytes(D, dtype), { maxSets: 16, ...o });
  const layers = Math.min(want, 4), batch = Math.max(1, Math.ceil(want / layers));
  const owned: { dispose(): void }[] = [];
  try {
    const cache = rt.createCache({ layers, batch, qHeads: Hq, kvHeads: Hkv, headDim: D, memory, buffer, dtype });
    owned.push(cache);
    const chunkSet = (n: number) => {
      const t = layerTensors(rt, n, c);
      owned.push(...Object.values(t));
      return t;
    };
    const x = chunkSet(C);
    const pre = cached > 0 ? chunkSet(cached) : null;
    const sets = layers * batch;
    // Outside the timed window: fresh slots, each prefilled to `cached` (enqueued before the
    // spin that timeCalls starts with, so they run before the first event).
    const prepare = () => {
      for (let s = 0; s < batch; s++) cache.reset(s);
      if (pre) for (let s = 0; s < batch; s++) for (let l = 0; l < layers; l++) cache.prefill(l, { seq: s, start: 0, ...pre });
    };
    const call = (j: number) => cache.prefill(j % layers, { seq: Math.floor(j / layers) % batch, start: cached, ...x });
    prepare();
    const hostMs = warmUp(sets, call);
    const ms: number[] = [];
    while (ms.length < Math.max(calls, sets)) {
      prepare();
      const m = rt.backend === 'cuda' ? timeCalls(rt, sets, call, Math.min(250, 2 * sets * Math.max(hostMs, 0.002) + 2)) : timeCalls(rt, sets, call, 0);
      ms.push(...m);
    }
    const time = stats(ms);
    const flops = causalAttentionFlops(Hq, D, C, cached);
    return { ...c, memory, buffer, sets, time, flops, tflops: flops / (time.median * 1e-3) / 1e12 };
  } finally {
    for (const t of owned) t.dispose();
  }
}

export type SelectKeys = 'random' | 'scores';

export interface SelectKernelCase {
  /** Independent selections in one launch (batch x KV heads), one block each. */
  rows: number;
  /** Candidates per row (M + B for a decode eviction, M + C for a prefill chunk's). */
  candidates: number;
  /** Survivors per row (M). */
  keep: number;
  keys: SelectKeys;
  /** Threads per block (the prefill eviction uses 1024). */
  threads: number;
}

export interface SelectKernelResult extends SelectKernelCase {
  /** One launch (fill excluded), ms. */
  time: Stats;
  /** rows x candidates / median time. */
  keysPerSecond: number;
}

/**
 * The eviction's top-k selection on its own (csrc/kernels/select_bench.cu): rows x candidates
 * 64-bit keys filled on the GPU, one launch in which each block finds the k-th largest key of
 * its row with topk::block_select_kth_largest and marks the keys >= it; CUDA events, after
 * warm-up. The addon checks that every row kept exactly `keep` keys.
 * @throws {TrimKVError} ERR_UNSUPPORTED on the CPU backend or in a CPU-only build; ERR_RANGE for
 *   sizes out of range
 */
export function benchSelectKernel(rt: Runtime, c: SelectKernelCase, iters = 100): SelectKernelResult {
  const r = native(() => loadAddon().selectBench(BACKEND_INDEX[rt.backend], {
    rows: c.rows, n: c.candidates, k: c.keep, threads: c.threads, iters, warmup: 5, keys: c.keys, seed: 1 + Math.floor(Math.random() * 2 ** 30),
  }));
  const time = stats(r.ms);
  return { ...c, time, keysPerSecond: (c.rows * c.candidates) / (time.median * 1e-3) };
}

export interface StreamCase {
  /** Prompt tokens, streamed in chunks of `chunk` (the last one may be shorter). */
  prompt: number;
  chunk: number;
  memory: number; buffer: number;
  qHeads: number; kvHeads: number; headDim: number; dtype: DType;
}

export interface StreamResult extends StreamCase {
  chunks: number;
  /** Device time of each chunk (attend + evict), ms. */
  chunkTime: Stats;
  /** Sum of the chunks' device times, ms (queued back to back behind a spin: no launch gaps). */
  totalMs: number;
  /** The cache's slots (K, V, position, lam for M + B tokens per head) and lengths. */
  reservedBytes: number;
  /** Bytes the retained tokens hold after the stream. */
  usedBytes: number;
  /** GPU memory growth from before the cache was made to after the stream (cudaMemGetInfo): slots and workspaces; null off CUDA. */
  allocatedBytes: number | null;
  /** The chunk's own q, k, v, lam and out (the caller's tensors, made before the baseline). */
  chunkBytes: number;
  /** K and V of every prompt token: what a full cache holds after the same prompt. */
  fullCacheBytes: number;
}

/**
 * A long prompt streamed through one layer in chunks of C (batch 1): each chunk attends to the
 * retained tokens and causally to itself, then the cache is evicted back to M. Reports the
 * chunks' device times and the cache's memory against a full cache of the prompt.
 * @throws {TrimKVError} from the cache
 */
export function benchStream(rt: Runtime, c: StreamCase): StreamResult {
  const { prompt: P, chunk: C, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  if (!(P >= C && C >= 1)) throw new RangeError(`Expected 1 <= chunk <= prompt for benchStream but received chunk ${C}, prompt ${P}`);
  const chunks = Math.ceil(P / C), last = P - (chunks - 1) * C;
  const owned: { dispose(): void }[] = [];
  const set = (n: number) => {
    const t = layerTensors(rt, n, c);
    owned.push(...Object.values(t));
    return t;
  };
  try {
    const full = set(C);
    const tail = last === C ? full : set(last);
    const chunkBytes = C * (2 * Hq * D * DTYPE_BYTES[dtype] + 2 * Hkv * D * DTYPE_BYTES[dtype] + 4 * Hkv);
    const before = deviceMemoryUsed(rt);
    const cache = rt.createCache({ layers: 1, batch: 1, qHeads: Hq, kvHeads: Hkv, headDim: D, memory: c.memory, buffer: c.buffer, dtype });
    owned.push(cache);
    const call = (i: number) => cache.prefill(0, { seq: 0, start: i * C, ...(i === chunks - 1 ? tail : full) });
    // Warm-up: a few chunks (kernels loaded, the prefill workspace grown), then start over.
    const hostMs = warmUp(Math.min(chunks, 4), call);
    cache.reset(0);
    const ms = timeMany(rt, chunks, call, hostMs);
    const after = deviceMemoryUsed(rt);
    const { used, reserved } = cache.memoryBytes();
    return {
      ...c, chunks, chunkTime: stats(ms), totalMs: ms.reduce((a, b) => a + b, 0),
      reservedBytes: reserved, usedBytes: used, allocatedBytes: before === null || after === null ? null : after - before,
      chunkBytes, fullCacheBytes: P * Hkv * D * 2 * DTYPE_BYTES[dtype],
    };
  } finally {
    for (const t of owned) t.dispose();
  }
}

export interface GateBenchResult {
  batch: number; inputSize: number; intermediateSize: number; kvHeads: number;
  time: Stats; weightBytes: number; bandwidth: number;
  /** Back-to-back runs of 8 calls (each a different gate, weights from DRAM), one event pair per run; ms per call. */
  burst?: Stats;
  /** bytes / burst median, GB/s. */
  burstBandwidth?: number;
  /** Host time to enqueue one call, microseconds (median). */
  hostUs?: number;
  /** Weights + input + output bytes of one call. */
  bytes?: number;
  flops?: number;
}

function gateSpec(inputSize: number, intermediateSize: number, kvHeads: number): GateSpec {
  const w = (n: number, shape: number[]) => ({ dtype: 'bf16' as const, shape, data: toBf16(randomArray(n, 0.05)) });
  return {
    kind: 'rg', activation: 'silu', inputSize, intermediateSize, kvHeads,
    weights: {
      linear1Weight: w(intermediateSize * inputSize, [intermediateSize, inputSize]),
      linear1Bias: w(intermediateSize, [intermediateSize]),
      linear2Weight: w(kvHeads * intermediateSize, [kvHeads, intermediateSize]),
      bias: w(kvHeads, [kvHeads]),
    },
  };
}

/** The "rg" gate at decode batch sizes; weights bf16, several gates cycled past L2. */
export function benchGate(rt: Runtime, batch: number, inputSize = 2560, intermediateSize = 512, kvHeads = 8, calls = 200,
  o: BenchOptions = {}): GateBenchResult {
  const weightBytes = 2 * (intermediateSize * inputSize + intermediateSize + kvHeads * intermediateSize + kvHeads);
  const count = setsFor(rt, weightBytes, { maxSets: 128, ...o });
  const gates = Array.from({ length: count }, () => rt.createGate(gateSpec(inputSize, intermediateSize, kvHeads)));
  const x = rt.fromArray(randomArray(batch * inputSize), [batch, inputSize], 'bf16');
  const lam = rt.tensor([batch, kvHeads], 'fp32');
  try {
    const call = (i: number) => gates[i % count]!.run(x, lam);
    const hostMs = warmUp(count, call);
    const time = stats(timeMany(rt, Math.max(calls, count), call, hostMs));
    const burst = timeBursts(rt, call, hostMs, 1, calls);
    const hostUs = hostCost(rt, call, 8).median;
    const bytes = weightBytes + 2 * batch * inputSize + 4 * batch * kvHeads;
    const flops = 2 * batch * (intermediateSize * inputSize + kvHeads * intermediateSize);
    return { batch, inputSize, intermediateSize, kvHeads, time, weightBytes, bandwidth: bytes / (time.median * 1e-3) / 1e9,
      burst, burstBandwidth: bytes / (burst.median * 1e-3) / 1e9, hostUs, bytes, flops };
  } finally {
    for (const g of gates) g.dispose();
    x.dispose();
    lam.dispose();
  }
}

export interface ModelBenchCase {
  layers: number; batch: number; memory: number; buffer: number;
  qHeads: number; kvHeads: number; headDim: number; dtype: DType;
  /** Hidden size and gate intermediate size ("rg" gate, bf16 weights, one per layer). */
  hiddenSize: number; gateIntermediate: number;
}

export interface ModelBenchResult extends ModelBenchCase {
  /** One decode step of the whole model: gate + decode for every layer, ms. */
  time: Stats;
  /** Host wall time to enqueue one step, ms. */
  hostMs: number;
  tokensPerSecond: number;
  bytes: number;
  bandwidth: number;
  /** Bytes the bounded cache holds (K, V, position, lam of every retained token). */
  cacheBytes: number;
  /** K and V bytes a full cache of the same model and batch holds per token of context. */
  fullBytesPerToken: number;
}

/**
 * A whole-model decode step: for each of the layers, the retention gate on the layer's hidden
 * state, then the fused decode (append, attend, evict), caches filled to M.
 * @throws {TrimKVError} from the cache or the gates
 */
export function benchModel(rt: Runtime, c: ModelBenchCase, steps = 20): ModelBenchResult {
  const { layers: L, batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  const gates = Array.from({ length: L }, () => rt.createGate(gateSpec(c.hiddenSize, c.gateIntermediate, Hkv)));
  const owned: { dispose(): void }[] = [...gates];
  try {
    const cache = rt.createCache({ layers: L, batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, memory: c.memory, buffer: c.buffer, dtype });
    owned.push(cache);
    const C = c.memory;
    const pre = layerTensors(rt, C, c);
    for (let s = 0; s < Bt; s++) for (let l = 0; l < L; l++) cache.prefill(l, { seq: s, start: 0, ...pre });
    for (const t of Object.values(pre)) t.dispose();
    const x = rt.fromArray(randomArray(Bt * c.hiddenSize), [Bt, c.hiddenSize], 'bf16');
    const q = rt.fromArray(randomArray(Bt * Hq * D), [Bt, Hq, D], dtype);
    const k = rt.fromArray(randomArray(Bt * Hkv * D), [Bt, Hkv, D], dtype);
    const v = rt.fromArray(randomArray(Bt * Hkv * D), [Bt, Hkv, D], dtype);
    const lam = rt.tensor([Bt, Hkv], 'fp32');
    const out = rt.tensor([Bt, Hq, D], dtype);
    owned.push(x, q, k, v, lam, out);
    const positions = new Int32Array(Bt);
    let pos = C;
    const step = () => {
      positions.fill(pos++);
      for (let l = 0; l < L; l++) {
        gates[l]!.run(x, lam);
        cache.decode(l, { q, k, v, lam, out, positions });
      }
    };
    const hostMs = warmUp(Math.max(2, Math.min(steps, 5)), step);
    const time = stats(timeMany(rt, steps, step, hostMs));
    const decode = decodeBytes(c, c.memory + c.buffer / 2);
    const gateBytes = 2 * (c.gateIntermediate * c.hiddenSize + c.gateIntermediate + Hkv * c.gateIntermediate + Hkv) + 2 * Bt * c.hiddenSize;
    const bytes = L * (decode + gateBytes);
    return {
      ...c, time, hostMs, tokensPerSecond: Bt / (time.median * 1e-3), bytes, bandwidth: bytes / (time.median * 1e-3) / 1e9,
      cacheBytes: cache.memoryBytes().used, fullBytesPerToken: Bt * L * Hkv * 2 * D * DTYPE_BYTES[dtype],
    };
  } finally {
    for (const t of owned) t.dispose();
  }
}

export interface LadderCase {
  batch: number; qHeads: number; kvHeads: number; headDim: number; dtype: DType;
  /** M of the cache, or null for a full cache (this library's kernel with M >= the length: nothing is evicted). */
  memory: number | null;
  buffer: number;
  /** Generated lengths (tokens per sequence) at which the step is timed, ascending. */
  samples: number[];
  /** Decode steps timed at each sample. */
  stepsPerSample: number;
}

export interface LadderPoint {
  /** Tokens generated so far (the context length T). */
  length: number;
  /** One decode call of one layer, ms. */
  time: Stats;
  /** Bytes the cache holds per layer (K, V, position, lam of every retained token, all sequences). */
  cacheBytesPerLayer: number;
}

export interface LadderResult extends Omit<LadderCase, 'samples'> {
  layers: number;
  points: LadderPoint[];
}

/**
 * A long generation from an empty cache: decodes every step up to the last sample, timing
 * `stepsPerSample` steps at each sample. Layers are cycled past L2 for bounded caches; the full
 * cache uses one layer (its size grows without bound).
 * @throws {TrimKVError} from the cache
 */
export function benchLadder(rt: Runtime, c: LadderCase, onStep?: (done: number, total: number) => void, o: BenchOptions = {}): LadderResult {
  const { batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  const last = c.samples[c.samples.length - 1] ?? 0;
  const total = last + c.stepsPerSample;
  const memory = c.memory ?? total + 1;
  const layers = c.memory === null ? 1 : setsFor(rt, Bt * Hkv * (memory + c.buffer) * slotBytes(D, dtype), { maxSets: 16, rotateBytes: (o.rotateBytes ?? defaultRotateBytes(rt)) / 2, ...o });
  const cache = rt.createCache({ layers, batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, memory, buffer: c.memory === null ? 0 : c.buffer, dtype });
  const sets = Array.from({ length: 4 }, () => ({
    q: rt.fromArray(randomArray(Bt * Hq * D), [Bt, Hq, D], dtype),
    k: rt.fromArray(randomArray(Bt * Hkv * D), [Bt, Hkv, D], dtype),
    v: rt.fromArray(randomArray(Bt * Hkv * D), [Bt, Hkv, D], dtype),
    lam: rt.fromArray(randomLam(Bt * Hkv), [Bt, Hkv], 'fp32'),
  }));
  const out = rt.tensor([Bt, Hq, D], dtype);
  try {
    const positions = new Int32Array(Bt);
    let pos = 0, l = 0;
    const call = () => {
      if (l === 0) positions.fill(pos++);
      const s = sets[pos % sets.length]!;
      cache.decode(l, { q: s.q, k: s.k, v: s.v, lam: s.lam, out, positions });
      l = (l + 1) % layers;
    };
    const points: LadderPoint[] = [];
    let hostMs = 0.01;
    for (const at of c.samples) {
      // generate up to the sample: `pos` tokens per sequence so far
      const t0 = performance.now(), n0 = pos;
      while (pos < at) {
        for (let i = 0; i < layers; i++) call();
        if (onStep && pos % 256 === 0) onStep(pos, total);
      }
      if (pos > n0) hostMs = Math.max(0.002, (performance.now() - t0) / ((pos - n0) * layers));
      const length = pos, cacheBytesPerLayer = cache.memoryBytes().used / layers;
      const time = stats(timeMany(rt, c.stepsPerSample * layers, call, hostMs));
      points.push({ length, time, cacheBytesPerLayer });
      onStep?.(pos, total);
    }
    return { ...c, layers, points };
  } finally {
    for (const s of sets) for (const t of Object.values(s)) t.dispose();
    out.dispose();
    cache.dispose();
  }
}
