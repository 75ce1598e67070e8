/** Section "ladder": a long generation from an empty cache, the step timed as the context grows. */
import type { Runtime } from '../../lib/runtime.js';
import type { DType } from '../../lib/types.js';
import { attempt, type Case, type CaseContext, type Row } from '../case.js';
import { randomArray, randomLam, slotBytes } from '../inputs.js';
import { defaultRotateBytes, setsFor, stats, timeMany, type BenchOptions, type Stats } from '../timing.js';

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

/** The long-generation cases of a run (rows in run.ladder): each bounded M, then the full cache. */
export function ladderCases(cx: CaseContext, run: { ladder: Row<LadderResult>[] }): Case[] {
  const { rt, plan, bo } = cx;
  const sh = plan.shape;
  const out: Case[] = [];
  const l = plan.ladder;
  for (const memory of [...l.memories, ...(l.full ? [null] : [])]) {
    const c = { ...sh, batch: l.batch, memory, buffer: 0, samples: l.samples, stepsPerSample: l.stepsPerSample };
    out.push({ section: 'ladder', label: `generation to ${l.samples.at(-1)} tokens, ${memory === null ? 'full cache' : `M=${memory}`}`,
      run: () => attempt(run.ladder, { ...c }, () => benchLadder(rt, c, undefined, bo)) });
  }
  return out;
}
