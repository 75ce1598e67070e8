/**
 * Runs a native KVCache and the float64 oracle in lock step on the same fresh random inputs
 * and checks, at every layer call, the outputs (SPEC section 8 tolerance, every output
 * written) and, after every step, the retained positions and scores of every head.
 */
import { beforeEach, expect, type TestContext } from 'vitest';
import { cacheSupport, openRuntime } from '../lib/index.js';
import type { KVCache, Runtime, Tensor } from '../lib/index.js';
import type { BackendName, CacheConfig, DType } from '../lib/types.js';
import { ctx, poison, quantize, randnArray, randomLam, relError, TOL } from './helpers.js';
import { OracleCache } from './oracle.js';

/** lam override for planted cases: (layer, row, kvHead) -> lam, row = slot or chunk index. */
export type LamFn = (layer: number, row: number, head: number) => number;

export interface StepOptions {
  lam?: LamFn;
  /** Scale of the random keys (for knorm_alpha spread). */
  kScale?: (layer: number, row: number, head: number) => number;
}

const runtimes = new Map<BackendName, Runtime>();

/** One runtime per backend per test file. */
export function runtimeFor(backend: BackendName): Runtime {
  let rt = runtimes.get(backend);
  if (!rt) {
    rt = openRuntime(backend);
    runtimes.set(backend, rt);
  }
  return rt;
}

/** A tensor of `dtype` holding `data` (raw bits for fp16 / bf16). */
export function tensorOf(rt: Runtime, shape: number[], dtype: DType, data: Float32Array | Uint16Array): Tensor {
  const t = rt.tensor(shape, dtype);
  t.write(data);
  return t;
}

/** The tensors of one layer call: q, k, v, lam written from `inp`, out poisoned (NaN). */
export interface IoTensors { q: Tensor; k: Tensor; v: Tensor; lam: Tensor; out: Tensor }

/** Uploads `inp` ([rows] tokens or slots) as the tensors of one layer call, out poisoned. */
export function ioTensors(rt: Runtime, rows: number, qHeads: number, kvHeads: number, D: number, dtype: DType, inp: LayerInputs): IoTensors {
  const t: IoTensors = {
    q: tensorOf(rt, [rows, qHeads, D], dtype, inp.q.data),
    k: tensorOf(rt, [rows, kvHeads, D], dtype, inp.k.data),
    v: tensorOf(rt, [rows, kvHeads, D], dtype, inp.v.data),
    lam: tensorOf(rt, [rows, kvHeads], 'fp32', inp.lam),
    out: rt.tensor([rows, qHeads, D], dtype),
  };
  poison(t.out);
  return t;
}

/** Random inputs of one layer call, already rounded to the cache dtype. */
export interface LayerInputs {
  q: { data: Float32Array | Uint16Array; values: Float64Array };
  k: { data: Float32Array | Uint16Array; values: Float64Array };
  v: { data: Float32Array | Uint16Array; values: Float64Array };
  lam: Float32Array;
}

export function makeInputs(
  rows: number,
  qHeads: number,
  kvHeads: number,
  D: number,
  dtype: DType,
  layer: number,
  opts: StepOptions = {},
): LayerInputs {
  const kRaw = randnArray(rows * kvHeads * D);
  if (opts.kScale) {
    for (let r = 0; r < rows; r++)
      for (let h = 0; h < kvHeads; h++) {
        const s = opts.kScale(layer, r, h);
        for (let d = 0; d < D; d++) kRaw[(r * kvHeads + h) * D + d]! *= s;
      }
  }
  const lam = randomLam(rows * kvHeads);
  if (opts.lam) for (let r = 0; r < rows; r++) for (let h = 0; h < kvHeads; h++) lam[r * kvHeads + h] = opts.lam(layer, r, h);
  return {
    q: quantize(randnArray(rows * qHeads * D), dtype),
    k: quantize(kRaw, dtype),
    v: quantize(randnArray(rows * kvHeads * D), dtype),
    lam,
  };
}

/** Asserts that block `i` (of `size` values) of `out` matches `ref` within `tol`. */
export function expectBlockClose(out: Float32Array, ref: Float64Array, i: number, size: number, tol: number, what: string) {
  const o = out.subarray(i * size, (i + 1) * size);
  const r = ref.subarray(i * size, (i + 1) * size);
  const err = relError(o, r);
  expect(err, ctx(`${what}: relative error ${err} > ${tol}`)).toBeLessThanOrEqual(tol);
}

/** Native cache + oracle, driven together. */
// The running test's context, so that helpers deep in a test can mark it skipped.
let currentTest: TestContext | undefined;
beforeEach((ctx) => {
  currentTest = ctx;
});
const announcedSkips = new Set<string>();

/**
 * Skips the running test, visibly and with the reason, when the backend under test does not
 * support its configuration (e.g. scope 'layer' on CUDA); the same test runs on the CPU.
 */
export function skipIfUnsupported(reason: string | null): void {
  if (reason === null) return;
  if (!announcedSkips.has(reason)) {
    announcedSkips.add(reason);
    console.warn(`[trimkv tests] skipped on this backend: ${reason}`);
  }
  if (!currentTest) throw new Error(`unsupported configuration outside a test: ${reason}`);
  currentTest.skip(reason);
}

export class CachePair {
  readonly cache: KVCache;
  readonly oracle: OracleCache;
  readonly dtype: DType;
  readonly tol: number;
  /** Steps run so far, for failure messages. */
  step = 0;

  constructor(
    readonly rt: Runtime,
    readonly config: CacheConfig,
    readonly label = '',
  ) {
    skipIfUnsupported(cacheSupport(rt.backend, config));
    this.cache = rt.createCache(config);
    this.oracle = new OracleCache(config);
    this.dtype = config.dtype ?? 'fp16';
    this.tol = TOL[this.dtype];
  }

  get cfg() {
    return this.oracle.cfg;
  }

  /** One decode step (all layers in order). Returns the inputs used, per layer. */
  decodeStep(positions: number[], opts: StepOptions = {}): LayerInputs[] {
    const { batch, layers, qHeads, kvHeads, headDim: D } = this.cfg;
    const used: LayerInputs[] = [];
    for (let l = 0; l < layers; l++) {
      const inp = makeInputs(batch, qHeads, kvHeads, D, this.dtype, l, opts);
      used.push(inp);
      this.runDecodeLayer(l, positions, inp);
    }
    this.step++;
    this.checkState(`after decode step ${this.step} positions=[${positions}]`);
    return used;
  }

  /** One layer of a decode step with given inputs; compares outputs. */
  runDecodeLayer(l: number, positions: number[], inp: LayerInputs): void {
    const { batch, qHeads, kvHeads, headDim: D } = this.cfg;
    const rt = this.rt;
    const { q, k, v, lam, out } = ioTensors(rt, batch, qHeads, kvHeads, D, this.dtype, inp);
    try {
      // Both accepted forms of positions, alternating by step.
      const pos = this.step % 2 === 0 ? Int32Array.from(positions) : [...positions];
      this.cache.decode(l, { q, k, v, lam, out, positions: pos });
      const got = out.readSync();
      const ref = this.oracle.decode(l, inp.q.values, inp.k.values, inp.v.values, inp.lam, positions);
      for (let b = 0; b < batch; b++) {
        const what = `${this.label} decode step ${this.step} layer ${l} slot ${b} (position ${positions[b]})`;
        if (positions[b]! < 0) {
          const rows = Array.from(got.subarray(b * qHeads * D, (b + 1) * qHeads * D));
          expect(rows.every((x) => x === 0), ctx(`${what}: inactive slot rows must be zeros`)).toBe(true);
        } else {
          expectBlockClose(got, ref, b, qHeads * D, this.tol, what);
        }
      }
    } finally {
      for (const t of [q, k, v, lam, out]) t.dispose();
    }
  }

  /** A prompt of `length` tokens of `seq` from `start`, in chunks of `chunk` tokens. */
  prefillPrompt(seq: number, start: number, length: number, chunk: number, opts: StepOptions = {}): void {
    for (let s = start; s < start + length; s += chunk) this.prefillChunk(seq, s, Math.min(chunk, start + length - s), opts);
  }

  /** One prefill chunk (all layers in order); compares outputs and then the state. */
  prefillChunk(seq: number, start: number, C: number, opts: StepOptions = {}): LayerInputs[] {
    const { layers, qHeads, kvHeads, headDim: D } = this.cfg;
    const rt = this.rt;
    const used: LayerInputs[] = [];
    for (let l = 0; l < layers; l++) {
      const inp = makeInputs(C, qHeads, kvHeads, D, this.dtype, l, opts);
      used.push(inp);
      const { q, k, v, lam, out } = ioTensors(rt, C, qHeads, kvHeads, D, this.dtype, inp);
      try {
        this.cache.prefill(l, { seq, start, q, k, v, lam, out });
        const got = out.readSync();
        const ref = this.oracle.prefill(l, seq, start, inp.q.values, inp.k.values, inp.v.values, inp.lam, C);
        for (let c = 0; c < C; c++) {
          expectBlockClose(got, ref, c, qHeads * D, this.tol, `${this.label} prefill seq ${seq} start ${start} C ${C} layer ${l} row ${c}`);
        }
      } finally {
        for (const t of [q, k, v, lam, out]) t.dispose();
      }
    }
    this.step++;
    this.checkState(`after prefill seq ${seq} start ${start} C ${C}`);
    return used;
  }

  /**
   * One varlen prefill call (all layers in order): the chunks of several sequences packed in
   * one set of tensors; each chunk's rows are compared with the oracle prefilling that
   * sequence alone, then the state.
   */
  prefillBatch(chunks: { seq: number; start: number; length: number }[], opts: StepOptions = {}): void {
    const { layers, qHeads, kvHeads, headDim: D } = this.cfg;
    const rt = this.rt;
    const N = chunks.reduce((n, c) => n + c.length, 0);
    const what = chunks.map((c) => `seq ${c.seq} start ${c.start} C ${c.length}`).join(', ');
    for (let l = 0; l < layers; l++) {
      const inp = makeInputs(N, qHeads, kvHeads, D, this.dtype, l, opts);
      const { q, k, v, lam, out } = ioTensors(rt, N, qHeads, kvHeads, D, this.dtype, inp);
      try {
        this.cache.prefillBatch(l, { chunks, q, k, v, lam, out });
        const got = out.readSync();
        let first = 0;
        for (const c of chunks) {
          const qs = qHeads * D, ks = kvHeads * D;
          const rows = (a: Float64Array, w: number) => a.subarray(first * w, (first + c.length) * w);
          const ref = this.oracle.prefill(l, c.seq, c.start, rows(inp.q.values, qs), rows(inp.k.values, ks), rows(inp.v.values, ks),
            inp.lam.subarray(first * kvHeads, (first + c.length) * kvHeads), c.length);
          const mine = got.subarray(first * qs, (first + c.length) * qs);
          for (let r = 0; r < c.length; r++) {
            expectBlockClose(mine, ref, r, qs, this.tol, `${this.label} prefillBatch [${what}] layer ${l}: seq ${c.seq} row ${r}`);
          }
          first += c.length;
        }
      } finally {
        for (const t of [q, k, v, lam, out]) t.dispose();
      }
    }
    this.step++;
    this.checkState(`after prefillBatch [${what}]`);
  }

  reset(seq: number): void {
    this.cache.reset(seq);
    this.oracle.reset(seq);
    this.checkState(`after reset(${seq})`);
  }

  /** seen, lengths and inspect of every head equal the oracle's. */
  checkState(when: string): void {
    const { batch, layers, kvHeads } = this.cfg;
    const lengths = this.cache.lengths();
    expect(lengths.length, ctx(`${this.label} lengths() size`)).toBe(batch * layers * kvHeads);
    for (let s = 0; s < batch; s++) {
      expect(this.cache.seen(s), ctx(`${this.label} seen(${s}) ${when}`)).toBe(this.oracle.seen(s));
      for (let l = 0; l < layers; l++) {
        for (let h = 0; h < kvHeads; h++) {
          const where = `${this.label} seq ${s} layer ${l} head ${h} ${when}`;
          const ref = this.oracle.inspect(s, l, h);
          const got = this.cache.inspect(s, l, h);
          expect(Array.from(got.positions), ctx(`retained positions of ${where}`)).toEqual(ref.positions);
          expect(this.cache.length(s, l, h), ctx(`length of ${where}`)).toBe(ref.positions.length);
          expect(lengths[(s * layers + l) * kvHeads + h], ctx(`lengths() of ${where}`)).toBe(ref.positions.length);
          expectScoresClose(got.scores, ref.scores, `scores of ${where}`);
        }
      }
    }
  }

  dispose(): void {
    this.cache.dispose();
  }
}

/**
 * Scores agree to float32 precision for tokens outside the sliding window. Window-protected
 * tokens (oracle score +inf) are checked by position only here; what inspect reports as their
 * score (+inf per lib/API.md) has its own test in cache.test.ts ("inspect reports +inf ...").
 */
export function expectScoresClose(got: Float32Array, ref: number[], what: string): void {
  expect(got.length, ctx(what)).toBe(ref.length);
  for (let i = 0; i < ref.length; i++) {
    const r = ref[i]!;
    const g = got[i]!;
    if (r === Infinity) continue;
    const err = Math.abs(g - r);
    expect(err, ctx(`${what} [${i}]: ${g} vs ${r}`)).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(r)));
  }
}
