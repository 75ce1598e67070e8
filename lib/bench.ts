/**
 * Microbenchmarks of the kernels, timed inside the addon (CUDA events, or a steady clock on
 * the CPU backend), warm, as medians of many calls over inputs larger than the L2 cache
 * (several layers or gates are cycled). Used by `trimkv bench` and bench/.
 */
import { native } from './errors.js';
import { BACKEND_INDEX, loadAddon } from './native.js';
import type { Runtime } from './runtime.js';
import type { DType } from './types.js';

/** Bytes the inputs of one measured family should span so that L2 (50 MB on H100) cannot hold them. */
export const ROTATE_BYTES = 256 * 2 ** 20;

export interface Stats { median: number; p10: number; p90: number; n: number }

export function stats(samples: ArrayLike<number>): Stats {
  const a = Array.from(samples).sort((x, y) => x - y);
  const at = (q: number) => a[Math.min(a.length - 1, Math.floor(q * a.length))]!;
  return { median: at(0.5), p10: at(0.1), p90: at(0.9), n: a.length };
}

const BYTES: Record<DType, number> = { fp32: 4, fp16: 2, bf16: 2 };

function randomArray(n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.random() * 2 - 1;
  return a;
}

/** Device copy bandwidth (GB/s, read + write) of a 1 GiB copy; NaN on the CPU backend. */
export function copyBandwidth(rt: Runtime): number {
  if (rt.backend !== 'cuda') return Number.NaN;
  return native(() => loadAddon().copyBandwidth(2 ** 30, 20));
}

/** Times `n` calls of fn(i) on the runtime's backend; per-call milliseconds. */
export function timeCalls(rt: Runtime, n: number, fn: (i: number) => void, spinMs = 20): Float64Array {
  return native(() => loadAddon().timeCalls(BACKEND_INDEX[rt.backend], n, spinMs, fn));
}

export interface DecodeBenchCase {
  batch: number; memory: number; buffer: number;
  qHeads: number; kvHeads: number; headDim: number; dtype: DType;
}

export interface DecodeBenchResult extends DecodeBenchCase {
  layers: number;
  /** GPU (or CPU) time of one decode call for one layer, ms. */
  time: Stats;
  /** K/V + metadata + q/out bytes one call reads and writes. */
  bytes: number;
  /** bytes / median time, GB/s. */
  bandwidth: number;
  /** Host time to enqueue one decode call from TypeScript, microseconds (median of calls). */
  hostUs: number;
}

/**
 * Decode step of one layer over a full cache (prefilled to M with one chunk per sequence),
 * steady state: every call appends one token per sequence and evicts (B = 0) or buffers.
 */
export function benchDecode(rt: Runtime, c: DecodeBenchCase, calls = 200): DecodeBenchResult {
  const { batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  const es = BYTES[dtype];
  const perLayer = Bt * Hkv * (c.memory + c.buffer) * (2 * D * es + 8);
  const layers = Math.max(1, Math.min(64, Math.ceil(ROTATE_BYTES / perLayer)));
  const cache = rt.createCache({ layers, batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, memory: c.memory, buffer: c.buffer, dtype });
  try {
    // Fill every head to M with one prefill chunk per sequence.
    const C = c.memory;
    const pq = rt.fromArray(randomArray(C * Hq * D), [C, Hq, D], dtype);
    const pk = rt.fromArray(randomArray(C * Hkv * D), [C, Hkv, D], dtype);
    const pv = rt.fromArray(randomArray(C * Hkv * D), [C, Hkv, D], dtype);
    const plam = rt.fromArray(Float32Array.from({ length: C * Hkv }, () => -Math.random() * 0.05), [C, Hkv], 'fp32');
    const pout = rt.tensor([C, Hq, D], dtype);
    for (let s = 0; s < Bt; s++) for (let l = 0; l < layers; l++) cache.prefill(l, { seq: s, start: 0, q: pq, k: pk, v: pv, lam: plam, out: pout });
    for (const t of [pq, pk, pv, plam, pout]) t.dispose();
    const q = rt.fromArray(randomArray(Bt * Hq * D), [Bt, Hq, D], dtype);
    const k = rt.fromArray(randomArray(Bt * Hkv * D), [Bt, Hkv, D], dtype);
    const v = rt.fromArray(randomArray(Bt * Hkv * D), [Bt, Hkv, D], dtype);
    const lam = rt.fromArray(Float32Array.from({ length: Bt * Hkv }, () => -Math.random() * 0.05), [Bt, Hkv], 'fp32');
    const out = rt.tensor([Bt, Hq, D], dtype);
    const positions = new Int32Array(Bt);
    let step = C;
    const call = (i: number) => {
      const l = i % layers;
      if (l === 0) positions.fill(step++);
      cache.decode(l, { q, k, v, lam, out, positions });
    };
    // Warm-up: whole steps, so the timed calls start at layer 0.
    const warm = layers * Math.max(2, Math.ceil(20 / layers));
    for (let i = 0; i < warm; i++) call(i);
    const n = Math.max(calls, layers) - (Math.max(calls, layers) % layers);
    const ms = timeCalls(rt, n, call, 50);
    // Host cost: enqueue-only wall time per call (the GPU keeps up or queues).
    const hostN = layers * Math.max(1, Math.ceil(100 / layers));
    const t0 = performance.now();
    for (let i = 0; i < hostN; i++) call(i);
    const hostUs = ((performance.now() - t0) * 1000) / hostN;
    for (const t of [q, k, v, lam, out]) t.dispose();
    const avgLen = c.memory + c.buffer / 2;
    const bytes = Bt * Hkv * ((avgLen + 1) * (2 * D * es + 8)) + 2 * Bt * Hq * D * es;
    const time = stats(ms);
    return { ...c, layers, time, bytes, bandwidth: bytes / (time.median * 1e-3) / 1e9, hostUs };
  } finally {
    cache.dispose();
  }
}

export interface GateBenchResult { batch: number; inputSize: number; intermediateSize: number; kvHeads: number; time: Stats; weightBytes: number; bandwidth: number }

/** The "rg" gate at decode batch sizes; weights bf16, several gates cycled past L2. */
export function benchGate(rt: Runtime, batch: number, inputSize = 2560, intermediateSize = 512, kvHeads = 8, calls = 200): GateBenchResult {
  const toBf16 = (a: Float32Array) => {
    const u = new Uint16Array(a.length);
    const f = new Float32Array(1), b = new Uint32Array(f.buffer);
    for (let i = 0; i < a.length; i++) { f[0] = a[i]!; u[i] = (b[0]! + 0x7fff + ((b[0]! >>> 16) & 1)) >>> 16; }
    return u;
  };
  const w = (n: number, shape: number[]) => ({ dtype: 'bf16' as const, shape, data: toBf16(randomArray(n).map((x) => x * 0.05)) });
  const weightBytes = 2 * (intermediateSize * inputSize + intermediateSize + kvHeads * intermediateSize + kvHeads);
  const count = Math.max(1, Math.min(128, Math.ceil(ROTATE_BYTES / weightBytes)));
  const gates = Array.from({ length: count }, () => rt.createGate({
    kind: 'rg', activation: 'silu', inputSize, intermediateSize, kvHeads,
    weights: {
      linear1Weight: w(intermediateSize * inputSize, [intermediateSize, inputSize]),
      linear1Bias: w(intermediateSize, [intermediateSize]),
      linear2Weight: w(kvHeads * intermediateSize, [kvHeads, intermediateSize]),
      bias: w(kvHeads, [kvHeads]),
    },
  }));
  const x = rt.fromArray(randomArray(batch * inputSize), [batch, inputSize], 'bf16');
  const lam = rt.tensor([batch, kvHeads], 'fp32');
  try {
    for (let i = 0; i < count; i++) gates[i]!.run(x, lam);
    const ms = timeCalls(rt, Math.max(calls, count), (i) => gates[i % count]!.run(x, lam), 20);
    const time = stats(ms);
    return { batch, inputSize, intermediateSize, kvHeads, time, weightBytes, bandwidth: weightBytes / (time.median * 1e-3) / 1e9 };
  } finally {
    for (const g of gates) g.dispose();
    x.dispose();
    lam.dispose();
  }
}
