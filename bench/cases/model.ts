/** Section "model": a whole-model decode step (gate + decode for every layer), caches filled to M. */
import { DTYPE_BYTES } from '../../lib/constants.js';
import type { Runtime } from '../../lib/runtime.js';
import type { DType } from '../../lib/types.js';
import { attempt, type Case, type CaseContext, type Row } from '../case.js';
import { layerTensors, randomArray } from '../inputs.js';
import { stats, timeMany, warmUp, type Stats } from '../timing.js';
import { decodeBytes } from './decode.js';
import { gateSpec } from './gate.js';

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

export interface ModelRow extends ModelBenchResult { fraction: number | null; fullCacheBytes: number; context: number }

/** The whole-model cases of a run (rows in run.model). */
export function modelCases(cx: CaseContext, run: { model: Row<ModelRow>[] }): Case[] {
  const { rt, plan, frac } = cx;
  const sh = plan.shape;
  const out: Case[] = [];
  const m = plan.model;
  for (const batch of m.batches) for (const memory of m.memories) {
    const c = { ...sh, layers: m.layers, batch, memory, buffer: 0, hiddenSize: m.hiddenSize, gateIntermediate: m.gateIntermediate };
    out.push({ section: 'model', label: `model ${m.layers} layers b=${batch} M=${memory}`, run: () => attempt(run.model, { ...c }, () => {
      const r = benchModel(rt, c, m.steps);
      return { ...r, fraction: frac(r.bandwidth), context: m.context, fullCacheBytes: r.fullBytesPerToken * m.context };
    }) });
  }
  return out;
}
