/**
 * CUDA decode against the CPU backend (issues 4 and 5): long runs of thousands of decode steps for a
 * batch of sequences with different lengths, B = 0 and B > 0, several layers, every scope. Outputs are
 * compared at every step; retained position sets at every 100th step. Runs where the CUDA
 * backend is available (the GPU machine), skipped with the reason elsewhere.
 */
import { describe, expect, test } from 'vitest';
import { openRuntime, type KVCache, type Runtime, type Tensor } from '../lib/index.js';
import type { DType, Scope } from '../lib/types.js';
import { cudaAvailable, cudaSkipReason } from './backends.js';
import { ctx, randInt, randnArray, randomLam, relError, TOL, uniform } from './helpers.js';

if (!cudaAvailable) console.warn(`[trimkv tests] cuda_decode.test.ts skipped: ${cudaSkipReason}`);

const STEPS = Number(process.env.TRIMKV_LONG_STEPS ?? 5000);

interface Pair { cpu: Tensor; gpu: Tensor }

function pair(cpu: Runtime, gpu: Runtime, shape: number[], dtype: DType): Pair {
  return { cpu: cpu.tensor(shape, dtype), gpu: gpu.tensor(shape, dtype) };
}

function writeBoth(p: Pair, data: Float32Array): void {
  p.cpu.write(data);
  p.gpu.write(data);
}

/** A layer's step inputs on both backends, and the output (GPU side NaN-poisoned before each step). */
interface StepPairs { q: Pair; k: Pair; v: Pair; lam: Pair; out: Pair }

function stepPairs(cpu: Runtime, gpu: Runtime, batch: number, qHeads: number, kvHeads: number, D: number, dtype: DType): StepPairs {
  return {
    q: pair(cpu, gpu, [batch, qHeads, D], dtype), k: pair(cpu, gpu, [batch, kvHeads, D], dtype), v: pair(cpu, gpu, [batch, kvHeads, D], dtype),
    lam: pair(cpu, gpu, [batch, kvHeads], 'fp32'), out: pair(cpu, gpu, [batch, qHeads, D], dtype),
  };
}

/** One decode call of layer l on both caches with fresh random inputs; the relative error of the GPU output. */
function decodeBoth(cc: KVCache, gc: KVCache, l: number, t: StepPairs, positions: Int32Array): number {
  const n = (x: Pair) => x.cpu.numel;
  writeBoth(t.q, randnArray(n(t.q)));
  writeBoth(t.k, randnArray(n(t.k)));
  writeBoth(t.v, randnArray(n(t.v)));
  writeBoth(t.lam, randomLam(n(t.lam)));
  t.out.gpu.write(new Float32Array(n(t.out)).fill(Number.NaN));
  cc.decode(l, { q: t.q.cpu, k: t.k.cpu, v: t.v.cpu, lam: t.lam.cpu, out: t.out.cpu, positions });
  gc.decode(l, { q: t.q.gpu, k: t.k.gpu, v: t.v.gpu, lam: t.lam.gpu, out: t.out.gpu, positions });
  return relError(t.out.gpu.readSync(), t.out.cpu.readSync());
}

describe.skipIf(!cudaAvailable)('CUDA decode vs CPU backend, long runs', () => {
  // Scope "head" (fixed layout) for the 5,000 steps; the pooled scopes for 2,000.
  test.each([
    { buffer: 0, dtype: 'bf16' as DType, headDim: 64, strategy: 'alpha' as const, window: 0, scope: 'head' as Scope, floor: 0, steps: STEPS },
    { buffer: 16, dtype: 'fp16' as DType, headDim: 128, strategy: 'knorm_alpha' as const, window: 4, scope: 'head' as Scope, floor: 0, steps: STEPS },
    { buffer: 0, dtype: 'fp16' as DType, headDim: 64, strategy: 'alpha' as const, window: 2, scope: 'layer' as Scope, floor: 0.25, steps: Math.min(STEPS, 2000) },
    { buffer: 8, dtype: 'bf16' as DType, headDim: 128, strategy: 'knorm_alpha' as const, window: 0, scope: 'global' as Scope, floor: 0.5, steps: Math.min(STEPS, 2000) },
  ])('batch 16, 4 layers, scope $scope floor $floor, B=$buffer $dtype D=$headDim $strategy W=$window', async ({ buffer, dtype, headDim, strategy, window, scope, floor, steps }) => {
    const cpu = openRuntime('cpu');
    const gpu = openRuntime('cuda');
    const cfg = { layers: 4, batch: 16, qHeads: 8, kvHeads: 2, headDim, memory: 48, buffer, dtype, strategy, window, scope, floor };
    const STEPS = steps;
    const cc = cpu.createCache(cfg);
    const gc = gpu.createCache(cfg);
    const { batch: Bt, qHeads: Hq, kvHeads: Hkv, layers: L } = cfg;
    const D = headDim;
    const t = stepPairs(cpu, gpu, Bt, Hq, Hkv, D, dtype);
    // Sequences start at different steps and some are reset and restarted: different lengths.
    const startAt = Array.from({ length: Bt }, (_, b) => (b === 0 ? 0 : randInt(0, 300)));
    const next = new Int32Array(Bt);
    let worst = 0;
    for (let step = 0; step < STEPS; step++) {
      // A minute-long synchronous loop would starve the test runner's own messages: yield.
      if (step % 50 === 0) await new Promise((resolve) => setImmediate(resolve));
      const positions = new Int32Array(Bt);
      for (let b = 0; b < Bt; b++) {
        if (step === Math.floor(STEPS * 0.4) + 37 * b && b % 3 === 1) {
          cc.reset(b);
          gc.reset(b);
          next[b] = 0;
        }
        positions[b] = step >= startAt[b]! && step % 17 !== b ? next[b]!++ : -1;
      }
      for (let l = 0; l < L; l++) {
        const err = decodeBoth(cc, gc, l, t, positions);
        worst = Math.max(worst, err);
        if (!(err <= TOL[dtype])) expect.fail(ctx(`step ${step} layer ${l}: relative error ${err} > ${TOL[dtype]}`));
      }
      if (step % 100 === 99 || step === STEPS - 1) {
        expect(Array.from(gc.lengths()), ctx(`lengths at step ${step}`)).toEqual(Array.from(cc.lengths()));
        for (let b = 0; b < Bt; b++) {
          for (let l = 0; l < L; l++) {
            for (let h = 0; h < Hkv; h++) {
              const want = cc.inspect(b, l, h), got = gc.inspect(b, l, h);
              expect(Array.from(got.positions), ctx(`retained set step ${step} seq ${b} layer ${l} head ${h}`))
                .toEqual(Array.from(want.positions));
            }
          }
        }
      }
    }
    console.log(`long run scope ${scope} B=${buffer} ${dtype}: ${STEPS} steps, worst relative error ${worst.toExponential(2)}`);
    cpu.dispose();
    gpu.dispose();
  }, 900_000);
});

describe.skipIf(!cudaAvailable)('CUDA knorm_alpha: key norms equal the CPU backend bit for bit', () => {
  // A last-bit difference in ln ||k|| flips near-tied scores, and over thousands of evictions the
  // backends would keep different tokens: both sum the squares in one canonical order
  // (common/score.h). Prefill and decode both append keys; the scores carry the norms.
  test.each([
    { dtype: 'fp32' as DType, headDim: 72 },
    { dtype: 'fp16' as DType, headDim: 128 },
    { dtype: 'bf16' as DType, headDim: 256 },
    { dtype: 'bf16' as DType, headDim: 64 },
  ])('$dtype D=$headDim: prefill 40 tokens, then 12 decode steps', ({ dtype, headDim: D }) => {
    const cpu = openRuntime('cpu');
    const gpu = openRuntime('cuda');
    const cfg = { layers: 1, batch: 2, qHeads: 4, kvHeads: 2, headDim: D, memory: 64, buffer: 0, dtype, strategy: 'knorm_alpha' as const };
    const caches = [cpu.createCache(cfg), gpu.createCache(cfg)];
    const { batch: Bt, qHeads: Hq, kvHeads: Hkv } = cfg;
    // Keys of very different norms (1e-2 .. 1e2 times a unit normal), one scale per key.
    const keys = (rows: number) => {
      const a = randnArray(rows * D);
      for (let r = 0; r < rows; r++) {
        const s = 10 ** uniform(-2, 2);
        for (let d = 0; d < D; d++) a[r * D + d]! *= s;
      }
      return a;
    };
    const run = (rows: number, call: (c: typeof caches[0], t: Record<'q' | 'k' | 'v' | 'lam' | 'out', Tensor>) => void) => {
      const data = { q: randnArray(rows * Hq * D), k: keys(rows * Hkv), v: randnArray(rows * Hkv * D), lam: randomLam(rows * Hkv) };
      caches.forEach((c, i) => {
        const rt = i === 0 ? cpu : gpu;
        const t = {
          q: rt.fromArray(data.q, [rows, Hq, D], dtype), k: rt.fromArray(data.k, [rows, Hkv, D], dtype),
          v: rt.fromArray(data.v, [rows, Hkv, D], dtype), lam: rt.fromArray(data.lam, [rows, Hkv], 'fp32'), out: rt.tensor([rows, Hq, D], dtype),
        };
        call(c, t);
        Object.values(t).forEach((x) => x.dispose());
      });
    };
    for (let s = 0; s < Bt; s++) run(40, (c, t) => c.prefill(0, { seq: s, start: 0, ...t }));
    for (let step = 0; step < 12; step++) {
      const positions = new Int32Array(Bt).fill(40 + step);
      run(Bt, (c, t) => c.decode(0, { ...t, positions }));
    }
    for (let b = 0; b < Bt; b++) {
      for (let h = 0; h < Hkv; h++) {
        const [want, got] = caches.map((c) => {
          const snap = c.inspect(b, 0, h);
          return Array.from(snap.positions, (p, i) => [p, snap.scores[i]!] as const).sort((x, y) => x[0] - y[0]);
        });
        expect(got!.length, ctx(`seq ${b} head ${h}: tokens`)).toBe(52);
        // Exact: the scores are lam * age + ln ||k|| with the same lam, position and T on both.
        expect(got, ctx(`seq ${b} head ${h}: positions and scores`)).toEqual(want);
      }
    }
    cpu.dispose();
    gpu.dispose();
  });
});

describe.skipIf(!cudaAvailable)('CUDA decode: positions in the launch (batch <= 64) and uploaded (larger batches)', () => {
  // Up to 64 sequences the positions travel in the kernel's parameters; beyond, through a
  // device buffer. Both must give the CPU backend's outputs and retained sets, with sequences
  // at different positions and some inactive.
  test.each([
    { batch: 64, buffer: 0 },
    { batch: 65, buffer: 0 },
    { batch: 96, buffer: 4 },
  ])('batch $batch, B=$buffer: 40 steps of 2 layers', ({ batch: Bt, buffer }) => {
    const cpu = openRuntime('cpu');
    const gpu = openRuntime('cuda');
    const cfg = { layers: 2, batch: Bt, qHeads: 4, kvHeads: 2, headDim: 64, memory: 16, buffer, dtype: 'bf16' as DType };
    const cc = cpu.createCache(cfg), gc = gpu.createCache(cfg);
    const { qHeads: Hq, kvHeads: Hkv, headDim: D, layers: L } = cfg;
    const t = stepPairs(cpu, gpu, Bt, Hq, Hkv, D, 'bf16');
    const offset = Array.from({ length: Bt }, () => randInt(0, 50));
    for (let step = 0; step < 40; step++) {
      // Every 7th sequence sits out every other step (-1: inactive, its output rows are zero).
      const positions = Int32Array.from({ length: Bt }, (_, b) => (b % 7 === 3 && step % 2 === 1 ? -1 : offset[b]! + step));
      for (let l = 0; l < L; l++) {
        const err = decodeBoth(cc, gc, l, t, positions);
        if (!(err <= TOL.bf16)) expect.fail(ctx(`step ${step} layer ${l}: relative error ${err} > ${TOL.bf16}`));
      }
    }
    expect(Array.from(gc.lengths())).toEqual(Array.from(cc.lengths()));
    for (let b = 0; b < Bt; b++) {
      for (let h = 0; h < Hkv; h++) {
        expect(Array.from(gc.inspect(b, 1, h).positions), ctx(`retained set seq ${b} head ${h}`)).toEqual(Array.from(cc.inspect(b, 1, h).positions));
      }
    }
    cpu.dispose();
    gpu.dispose();
  });
});

describe.skipIf(!cudaAvailable)('CUDA decode: steps enqueued back to back, in any layer order', () => {
  // A decode kernel reads its cache tiles before its dependency wait when the step enqueued just
  // before it was another layer's (DecodeStep, prefetch_before_wait); after a step of its own layer
  // it must not, or it reads slots that step is still writing. Every call's inputs are staged
  // first and a long step of a large cache goes ahead, so the calls queue up and follow each
  // other on the GPU with no copy or host wait between them. Each cache takes its layers in
  // order; runs of calls of a one-layer cache repeat its layer back to back, and the two
  // caches interleave at random.
  test.each([{ buffer: 0 }, { buffer: 4 }])('B=$buffer: 6 rounds of 40 calls', ({ buffer }) => {
    const cpu = openRuntime('cpu');
    const gpu = openRuntime('cuda');
    // The step ahead: 32 x 8 heads of 16,384 slots (2 GB of K/V), several hundred microseconds.
    const big = { layers: 1, batch: 32, qHeads: 32, kvHeads: 8, headDim: 128, memory: 16384, buffer: 0, dtype: 'bf16' as DType };
    const bigCache = gpu.createCache(big);
    const bigIn = stepPairs(cpu, gpu, big.batch, big.qHeads, big.kvHeads, big.headDim, 'bf16');
    const Bt = 4, Hq = 8, Hkv = 2, D = 64;
    const base = { batch: Bt, qHeads: Hq, kvHeads: Hkv, headDim: D, memory: 16, buffer, dtype: 'bf16' as DType };
    const caches = [{ ...base, layers: 3 }, { ...base, layers: 1 }].map((cfg) => ({ cfg, cc: cpu.createCache(cfg), gc: gpu.createCache(cfg) }));
    const next = caches.map(() => 0);  // calls made per cache: layer = calls % layers
    const calls = 40;
    const t = Array.from({ length: calls }, () => stepPairs(cpu, gpu, Bt, Hq, Hkv, D, 'bf16'));
    for (let round = 0; round < 6; round++) {
      // Runs of 1-3 calls of a random cache.
      const order: number[] = [];
      while (order.length < calls) {
        const c = randInt(0, caches.length - 1);
        for (let r = randInt(1, 3); r > 0 && order.length < calls; r--) order.push(c);
      }
      const pending = order.map((ci, i) => {
        const L = caches[ci]!.cfg.layers;
        const l = next[ci]! % L, step = Math.floor(next[ci]! / L);
        next[ci]!++;
        const p = t[i]!;
        for (const x of [p.q, p.k, p.v]) writeBoth(x, randnArray(x.cpu.numel));
        writeBoth(p.lam, randomLam(p.lam.cpu.numel));
        p.out.gpu.write(new Float32Array(p.out.gpu.numel).fill(Number.NaN));
        const positions = Int32Array.from({ length: Bt }, (_, b) => 7 * b + step);
        return { ci, l, p, positions };
      });
      for (const { ci, l, p, positions } of pending) {
        caches[ci]!.cc.decode(l, { q: p.q.cpu, k: p.k.cpu, v: p.v.cpu, lam: p.lam.cpu, out: p.out.cpu, positions });
      }
      const g = bigIn;
      bigCache.decode(0, { q: g.q.gpu, k: g.k.gpu, v: g.v.gpu, lam: g.lam.gpu, out: g.out.gpu, positions: Int32Array.from({ length: big.batch }, () => round) });
      for (const { ci, l, p, positions } of pending) {
        caches[ci]!.gc.decode(l, { q: p.q.gpu, k: p.k.gpu, v: p.v.gpu, lam: p.lam.gpu, out: p.out.gpu, positions });
      }
      pending.forEach(({ ci, l, p }, i) => {
        const err = relError(p.out.gpu.readSync(), p.out.cpu.readSync());
        if (!(err <= TOL.bf16)) expect.fail(ctx(`round ${round} call ${i} (cache ${ci} layer ${l}): relative error ${err} > ${TOL.bf16}`));
      });
    }
    for (const { cfg, cc, gc } of caches) {
      for (let l = 0; l < cfg.layers; l++) {
        for (let b = 0; b < Bt; b++) {
          for (let h = 0; h < Hkv; h++) {
            expect(Array.from(gc.inspect(b, l, h).positions), ctx(`retained set layer ${l} seq ${b} head ${h}`)).toEqual(Array.from(cc.inspect(b, l, h).positions));
          }
        }
      }
    }
    cpu.dispose();
    gpu.dispose();
  });
});
