/**
 * CUDA chunked prefill against the CPU backend (issue 5): every chunk size of the issue, the
 * dtypes and head dims, several chunks in a row (filling, then evicting), decode after it,
 * the "layer" and "global" scopes with floor ratio and threshold (pooled layout), and 64K-token
 * prompts in chunks of 2,048 with M = 1,024. Outputs are compared after every call, retained
 * position sets after every chunk. Runs where CUDA is available.
 */
import { describe, expect, test } from 'vitest';
import { openRuntime, type KVCache, type Runtime, type Tensor } from '../lib/index.js';
import type { CacheConfig, DType, Scope } from '../lib/types.js';
import { cudaAvailable, cudaSkipReason } from './backends.js';
import { ctx, randnArray, randomLam, relError, TOL } from './helpers.js';

if (!cudaAvailable) console.warn(`[trimkv tests] cuda_prefill.test.ts skipped: ${cudaSkipReason}`);

class Twin {
  readonly cpu: Runtime = openRuntime('cpu');
  readonly gpu: Runtime = openRuntime('cuda');
  readonly cc: KVCache;
  readonly gc: KVCache;
  worst = 0;

  constructor(readonly cfg: CacheConfig & { dtype: DType }) {
    this.cc = this.cpu.createCache(cfg);
    this.gc = this.gpu.createCache(cfg);
  }

  #both(shape: number[], dtype: DType, data: Float32Array): [Tensor, Tensor] {
    return [this.cpu.fromArray(data, shape, dtype), this.gpu.fromArray(data, shape, dtype)];
  }

  #compare(outs: [Tensor, Tensor], what: string): void {
    const got = outs[1].readSync(), want = outs[0].readSync();
    const err = relError(got, want);
    this.worst = Math.max(this.worst, err);
    if (!(err <= TOL[this.cfg.dtype])) expect.fail(ctx(`${what}: relative error ${err} > ${TOL[this.cfg.dtype]}`));
  }

  prefill(seq: number, start: number, C: number): void {
    const { qHeads: Hq, kvHeads: Hkv, headDim: D, dtype, layers } = this.cfg;
    for (let l = 0; l < layers; l++) {
      const q = this.#both([C, Hq, D], dtype, randnArray(C * Hq * D));
      const k = this.#both([C, Hkv, D], dtype, randnArray(C * Hkv * D));
      const v = this.#both([C, Hkv, D], dtype, randnArray(C * Hkv * D));
      const lam = this.#both([C, Hkv], 'fp32', randomLam(C * Hkv));
      const out = this.#both([C, Hq, D], dtype, new Float32Array(C * Hq * D).fill(Number.NaN));
      [this.cc, this.gc].forEach((c, i) => c.prefill(l, { seq, start, q: q[i]!, k: k[i]!, v: v[i]!, lam: lam[i]!, out: out[i]! }));
      this.#compare(out, `prefill seq ${seq} start ${start} C ${C} layer ${l}`);
      for (const t of [...q, ...k, ...v, ...lam, ...out]) t.dispose();
    }
  }

  /** One varlen call: the chunks of several sequences packed in one set of tensors. */
  prefillBatch(chunks: { seq: number; start: number; length: number }[]): void {
    const { qHeads: Hq, kvHeads: Hkv, headDim: D, dtype, layers } = this.cfg;
    const N = chunks.reduce((n, c) => n + c.length, 0);
    for (let l = 0; l < layers; l++) {
      const q = this.#both([N, Hq, D], dtype, randnArray(N * Hq * D));
      const k = this.#both([N, Hkv, D], dtype, randnArray(N * Hkv * D));
      const v = this.#both([N, Hkv, D], dtype, randnArray(N * Hkv * D));
      const lam = this.#both([N, Hkv], 'fp32', randomLam(N * Hkv));
      const out = this.#both([N, Hq, D], dtype, new Float32Array(N * Hq * D).fill(Number.NaN));
      [this.cc, this.gc].forEach((c, i) => c.prefillBatch(l, { chunks, q: q[i]!, k: k[i]!, v: v[i]!, lam: lam[i]!, out: out[i]! }));
      this.#compare(out, `prefillBatch ${JSON.stringify(chunks)} layer ${l}`);
      for (const t of [...q, ...k, ...v, ...lam, ...out]) t.dispose();
    }
  }

  decode(positions: number[]): void {
    const { batch: B, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype, layers } = this.cfg;
    for (let l = 0; l < layers; l++) {
      const q = this.#both([B, Hq, D], dtype, randnArray(B * Hq * D));
      const k = this.#both([B, Hkv, D], dtype, randnArray(B * Hkv * D));
      const v = this.#both([B, Hkv, D], dtype, randnArray(B * Hkv * D));
      const lam = this.#both([B, Hkv], 'fp32', randomLam(B * Hkv));
      const out = this.#both([B, Hq, D], dtype, new Float32Array(B * Hq * D).fill(Number.NaN));
      [this.cc, this.gc].forEach((c, i) => c.decode(l, { q: q[i]!, k: k[i]!, v: v[i]!, lam: lam[i]!, out: out[i]!, positions }));
      this.#compare(out, `decode ${positions.join(',')} layer ${l}`);
      for (const t of [...q, ...k, ...v, ...lam, ...out]) t.dispose();
    }
  }

  expectSameSets(what: string): void {
    const { batch, layers, kvHeads } = this.cfg;
    expect(Array.from(this.gc.lengths()), ctx(`lengths ${what}`)).toEqual(Array.from(this.cc.lengths()));
    for (let b = 0; b < batch; b++)
      for (let l = 0; l < layers; l++)
        for (let h = 0; h < kvHeads; h++) {
          expect(Array.from(this.gc.inspect(b, l, h).positions), ctx(`retained set ${what} seq ${b} layer ${l} head ${h}`))
            .toEqual(Array.from(this.cc.inspect(b, l, h).positions));
        }
  }

  dispose(): void {
    this.cpu.dispose();
    this.gpu.dispose();
  }
}

const sizes = [
  ...[1, 7, 64, 512].flatMap((chunk) =>
    (['fp32', 'fp16', 'bf16'] as DType[]).flatMap((dtype) => [64, 128, 256, 72].map((headDim) => ({ chunk, dtype, headDim })))),
  { chunk: 4096, dtype: 'bf16' as DType, headDim: 128 },
  { chunk: 4096, dtype: 'fp16' as DType, headDim: 64 },
  { chunk: 4096, dtype: 'fp32' as DType, headDim: 72 },
];

// Pools of heads: every chunk size, both pooled scopes, floor ratios and thresholds, the dtypes
// and head dims in rotation. Three chunks fill and then overflow the pools.
const pooled = [1, 7, 64, 512, 4096].flatMap((chunk, i) =>
  (['layer', 'global'] as Scope[]).map((scope, j) => ({
    chunk,
    scope,
    dtype: (['fp32', 'fp16', 'bf16'] as DType[])[(i + j) % 3]!,
    headDim: [64, 128, 256, 72][(i + 2 * j) % 4]!,
    floor: [0, 0.25, 0.5][(i + j) % 3]!,
    threshold: (i + j) % 4 === 1 ? 0.05 : undefined,
  })));

describe.skipIf(!cudaAvailable)('CUDA prefill vs CPU backend', () => {
  test.each(sizes)('chunks of $chunk, $dtype, D=$headDim: three chunks, then decode', ({ chunk, dtype, headDim }) => {
    const buffer = chunk % 2 === 0 ? 8 : 0;
    const memory = Math.max(4, Math.min(96, Math.floor(chunk * 1.5)));
    const tw = new Twin({ layers: 2, batch: 2, qHeads: 4, kvHeads: 2, headDim, memory, buffer, dtype, window: chunk > 8 ? 3 : 0, strategy: chunk === 7 ? 'knorm_alpha' : 'alpha' });
    try {
      for (let i = 0; i < 3; i++) {
        tw.prefill(1, i * chunk, chunk);
        tw.expectSameSets(`after chunk ${i}`);
      }
      for (let s = 0; s < 5; s++) tw.decode([s, 3 * chunk + s]);
      tw.expectSameSets('after decode');
    } finally {
      tw.dispose();
    }
  }, 300_000);

  test.each(pooled)('scope $scope, chunks of $chunk, floor $floor, threshold $threshold, $dtype, D=$headDim', (c) => {
    const memory = Math.max(4, Math.min(96, Math.floor(c.chunk * 1.5)));
    const tw = new Twin({
      layers: 3, batch: 2, qHeads: 8, kvHeads: 4, headDim: c.headDim, memory, buffer: c.chunk % 2 === 0 ? 8 : 0,
      dtype: c.dtype, scope: c.scope, floor: c.floor, window: c.chunk > 8 ? 3 : 0,
      ...(c.threshold !== undefined ? { threshold: c.threshold } : {}),
    });
    try {
      for (let i = 0; i < 3; i++) {
        tw.prefill(0, i * c.chunk, c.chunk);
        tw.expectSameSets(`after chunk ${i}`);
      }
      for (let s = 0; s < 5; s++) tw.decode([3 * c.chunk + s, s]);
      tw.expectSameSets('after decode');
    } finally {
      tw.dispose();
    }
  }, 300_000);

  test.each([
    { scope: 'head' as Scope, dtype: 'bf16' as DType, headDim: 128 },
    { scope: 'layer' as Scope, dtype: 'fp16' as DType, headDim: 64 },
    { scope: 'global' as Scope, dtype: 'fp32' as DType, headDim: 256 },
  ])('varlen: chunks of 4 sequences in one launch, scope $scope, $dtype, D=$headDim', ({ scope, dtype, headDim }) => {
    const tw = new Twin({ layers: 2, batch: 5, qHeads: 8, kvHeads: 2, headDim, memory: 256, buffer: 16, dtype, scope, floor: scope === 'head' ? 0 : 0.25, window: 4 });
    try {
      tw.prefillBatch([{ seq: 3, start: 0, length: 512 }, { seq: 0, start: 0, length: 1 }, { seq: 4, start: 0, length: 1500 }, { seq: 1, start: 0, length: 77 }]);
      tw.expectSameSets('after the first call');
      tw.prefillBatch([{ seq: 0, start: 1, length: 700 }, { seq: 2, start: 0, length: 64 }, { seq: 3, start: 512, length: 300 }]);
      tw.expectSameSets('after the second call');
      for (let s = 0; s < 4; s++) tw.decode([701 + s, 77 + s, 64 + s, 812 + s, 1500 + s]);
      tw.expectSameSets('after decode');
    } finally {
      tw.dispose();
    }
  }, 300_000);

  test.each([
    { scope: 'head' as Scope, kvHeads: 1, floor: 0 },
    { scope: 'layer' as Scope, kvHeads: 2, floor: 0.25 },
  ])('a 64K-token prompt in chunks of 2,048 with M = 1,024, scope $scope: identical retained sets', async ({ scope, kvHeads, floor }) => {
    const tw = new Twin({ layers: 1, batch: 1, qHeads: 2 * kvHeads, kvHeads, headDim: 64, memory: 1024, buffer: 0, dtype: 'bf16', scope, floor });
    try {
      for (let start = 0; start < 65536; start += 2048) {
        await new Promise((resolve) => setImmediate(resolve));  // let the runner's messages through
        tw.prefill(0, start, 2048);
        tw.expectSameSets(`after the chunk at ${start}`);
      }
      const kept = Array.from({ length: kvHeads }, (_, h) => tw.gc.length(0, 0, h));
      expect(kept.reduce((a, b) => a + b, 0)).toBe(1024 * kvHeads);
      console.log(`64K prompt, scope ${scope}: worst relative error ${tw.worst.toExponential(2)}, head lengths ${kept.join(' ')}`);
    } finally {
      tw.dispose();
    }
  }, 600_000);
});
