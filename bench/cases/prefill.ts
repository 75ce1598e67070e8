/**
 * Section "prefill": a chunk at steady state (attend to M, causal within the chunk, evict back
 * to M) against the roofline, and chunks over cached tokens with nothing evicted against
 * PyTorch SDPA.
 */
import { DTYPE_BYTES } from '../../lib/constants.js';
import type { Runtime } from '../../lib/runtime.js';
import type { DType } from '../../lib/types.js';
import { attempt, type Case, type CaseContext, type Row } from '../case.js';
import { layerTensors, slotBytes } from '../inputs.js';
import { setsFor, stats, timeCalls, timeMany, warmUp, type BenchOptions, type Stats } from '../timing.js';

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

export interface PrefillRow extends PrefillBenchResult { rooflineMs: number | null; fraction: number | null }
export interface PrefillAttendRow extends PrefillAttendResult {
  /** The steady-state chunk with eviction (cache at M = cached, B = 0: attend, select M of M + C, write); null for cached = 0. */
  evict: { memory: number; time: Stats; tflops: number } | null;
  /** PyTorch SDPA over the same cached + C keys, bottom-right causal: ms, TFLOP/s (same FLOP count) and the backend used. */
  sdpaMs: number | null; sdpaTFLOPs: number | null; sdpaBackend: string | null;
  /** Our TFLOP/s over SDPA's (= SDPA time / ours), without and with eviction. */
  sdpaRatio: number | null; evictRatio: number | null;
}

/** The prefill cases of a run (rows in run.prefill and run.prefillAttend); the roofline uses the run's ceilings. */
export function prefillCases(cx: CaseContext, run: { readonly copyGBs: number | null; readonly peakTFLOPs: number | null; prefill: Row<PrefillRow>[]; prefillAttend: Row<PrefillAttendRow>[] }): Case[] {
  const { rt, plan, torch, bo, torchShape } = cx;
  const sh = plan.shape;
  const out: Case[] = [];
  for (const chunk of plan.prefill.chunks) for (const memory of plan.prefill.memories) {
    const c = { ...sh, chunk, memory, buffer: 0 };
    out.push({ section: 'prefill', label: `prefill C=${chunk} M=${memory}`, run: () => attempt(run.prefill, { ...c }, () => {
      const r = benchPrefill(rt, c, plan.prefill.calls, bo);
      const rooflineMs = run.copyGBs && run.peakTFLOPs
        ? Math.max(r.bytes / (run.copyGBs * 1e9), r.flops / (run.peakTFLOPs * 1e12)) * 1e3 : null;
      return { ...r, rooflineMs, fraction: rooflineMs === null ? null : rooflineMs / r.time.median };
    }) });
  }
  const a = plan.prefill.attend;
  for (const cached of a.cached) for (const chunk of a.chunks) {
    const c = { ...sh, cached, chunk };
    out.push({ section: 'prefill', label: `prefill vs SDPA cached=${cached} C=${chunk}`, run: () => attempt(run.prefillAttend, { ...c }, () => {
      const r = benchPrefillAttend(rt, c, a.calls, bo);
      let evict: PrefillAttendRow['evict'] = null;
      if (cached > 0) {
        const e = benchPrefill(rt, { ...sh, chunk, memory: cached, buffer: 0 }, a.calls, bo);
        evict = { memory: cached, time: e.time, tflops: r.flops / (e.time.median * 1e-3) / 1e12 };
      }
      const t = torchShape(sh) ? torch?.prefill?.find((x) => x.cached === cached && x.chunk === chunk && x.ms) : undefined;
      const sdpaMs = t?.ms ?? null;
      return {
        ...r, evict, sdpaMs, sdpaTFLOPs: sdpaMs ? r.flops / (sdpaMs * 1e-3) / 1e12 : null, sdpaBackend: t?.backend ?? null,
        sdpaRatio: sdpaMs ? sdpaMs / r.time.median : null, evictRatio: sdpaMs && evict ? sdpaMs / evict.time.median : null,
      };
    }) });
  }
  return out;
}
