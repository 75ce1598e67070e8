/**
 * Section "decode": one decode step of one layer over a full cache (append, attend, evict),
 * swept over batch x M x B, other head dims and dtypes, then under each budget scope.
 */
import type { DType, Scope } from '../../lib/types.js';
import type { Runtime } from '../../lib/runtime.js';
import { attempt, isRow, type Case, type CaseContext, type Row } from '../case.js';
import { layerTensors, slotBytes } from '../inputs.js';
import { hostCost, setsFor, stats, timeBursts, timeMany, warmUp, type BenchOptions, type Stats } from '../timing.js';
import { DTYPE_BYTES } from '../../lib/constants.js';

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

/** Bytes one decode call reads and writes at an average cache length `len` (per layer). */
export function decodeBytes(c: DecodeBenchCase, len: number): number {
  const es = DTYPE_BYTES[c.dtype];
  return c.batch * c.kvHeads * (len + 1) * slotBytes(c.headDim, c.dtype) + 2 * c.batch * c.qHeads * c.headDim * es;
}

export interface DecodeRig {
  layers: number;
  /** One layer of one step; calls cycle layers and advance the step at layer 0. */
  call: (i: number) => void;
  /** Decode steps run since the cache was filled (incremented at layer 0). */
  steps: () => number;
  dispose: () => void;
}

/** A cache of `layers` layers filled to M per head by one prefill chunk per sequence. */
export function decodeRig(rt: Runtime, c: DecodeBenchCase, layers: number): DecodeRig {
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

export interface DecodeRow extends DecodeBenchResult {
  fraction: number | null;
  /** Back-to-back bandwidth over the copy ceiling. */
  burstFraction: number | null;
  /** PyTorch flash SDPA over the same retained tokens (M + 1), ms, and its time / ours. */
  sdpaMs: number | null; sdpaRatio: number | null;
  /** The same, both timed back-to-back. */
  sdpaBurstMs: number | null; sdpaBurstRatio: number | null;
  /** The reference pipeline in PyTorch (cat, SDPA, every B steps score + topk + gather), ms per step, and its time / ours. */
  referenceMs: number | null; referenceRatio: number | null;
}
/** A decode step under a budget scope: per layer call, over whole steps of all layers. */
export interface ScopeRow extends DecodeBenchResult {
  scope: Scope; floor: number;
  /** The scope-'head' row of the same batch, M and B: its mean / this mean (above 1: faster). */
  headRatio: number | null;
}

/** The decode cases of a run: the sweep (rows in run.decode), then the scopes (run.scopes). */
export function decodeCases(cx: CaseContext, run: { decode: Row<DecodeRow>[]; scopes: Row<ScopeRow>[] }): Case[] {
  const { rt, plan, torch, bo, frac, torchShape } = cx;
  const sh = plan.shape;
  const out: Case[] = [];
  const d = plan.decode;
  const dcs: DecodeBenchCase[] = [];
  for (const batch of d.batches) for (const memory of d.memories) for (const buffer of d.buffers) dcs.push({ ...sh, batch, memory, buffer });
  for (const headDim of d.headDims) dcs.push({ ...sh, headDim, batch: d.extraBatch, memory: d.extraMemory, buffer: 0 });
  for (const dtype of d.dtypes) dcs.push({ ...sh, dtype, batch: d.extraBatch, memory: d.extraMemory, buffer: 0 });
  for (const c of dcs) {
    out.push({ section: 'decode', label: `decode b=${c.batch} M=${c.memory} B=${c.buffer} D=${c.headDim} ${c.dtype}`, run: () => attempt(run.decode, { ...c }, () => {
      const r = benchDecode(rt, c, d.calls, bo);
      const same = torchShape(c);
      const s = same ? torch?.sdpa.find((x) => x.batch === c.batch && x.memory === c.memory && x.ms) : undefined;
      const ref = same ? torch?.reference?.find((x) => x.batch === c.batch && x.memory === c.memory && x.buffer === c.buffer && x.msPerStep) : undefined;
      return {
        ...r, fraction: frac(r.bandwidth), burstFraction: frac(r.burstBandwidth),
        sdpaMs: s?.ms ?? null, sdpaRatio: s?.ms ? s.ms / r.time.median : null,
        sdpaBurstMs: s?.burstMs ?? null, sdpaBurstRatio: s?.burstMs ? s.burstMs / r.burst.median : null,
        referenceMs: ref?.msPerStep ?? null, referenceRatio: ref?.msPerStep ? ref.msPerStep / r.time.median : null,
      };
    }) });
  }
  const sc = plan.decode.scopes;
  for (const batch of sc.batches) for (const buffer of sc.buffers) for (const { scope, floor } of sc.cases) {
    const c: DecodeBenchCase = { ...sh, batch, memory: sc.memory, buffer, scope, floor, layers: sc.layers };
    out.push({ section: 'decode', label: `decode scope=${scope} floor=${floor} b=${batch} M=${sc.memory} B=${buffer} L=${sc.layers}`,
      run: () => attempt(run.scopes, { ...c }, () => {
        const r = benchDecode(rt, c, Math.max(plan.decode.calls, 4 * sc.layers), bo);
        const head = run.scopes.find((x): x is ScopeRow => isRow(x) && x.scope === 'head' && x.batch === batch && x.buffer === buffer);
        return { ...r, scope, floor, headRatio: head && scope !== 'head' ? head.time.mean / r.time.mean : null };
      }) });
  }
  return out;
}
