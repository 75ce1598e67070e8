/**
 * KVCache against the float64 oracle (SPEC sections 4-7): outputs of every layer call within
 * the SPEC section 8 tolerance, every output written, and the retained positions (and scores)
 * of every head identical after every step. Parametrized over the backends under test.
 */
import { describe, expect, test } from 'vitest';
import { cacheSupport, type KVCache } from '../lib/index.js';
import type { CacheConfig, DType, Scope, Strategy } from '../lib/types.js';
import { backendsUnderTest, cudaAvailable, cudaSkipReason } from './backends.js';
import { CachePair, expectScoresClose, ioTensors, makeInputs, runtimeFor, skipIfUnsupported, type IoTensors } from './harness.js';
import { ctx, randInt, rand, relError, TOL, uniform } from './helpers.js';

const BACKENDS = backendsUnderTest();

/** Decode `steps` steps on every slot from its current T (slots in `inactive(step)` sit out). */
function decodeRun(pair: CachePair, steps: number, inactive: (step: number, slot: number) => boolean = () => false) {
  const { batch } = pair.cfg;
  for (let i = 0; i < steps; i++) {
    const positions = Array.from({ length: batch }, (_, b) => (inactive(i, b) ? -1 : pair.oracle.seen(b)));
    pair.decodeStep(positions);
  }
}

// ---------------------------------------------------------------------------------------------
// Head dim x GQA group x dtype x buffer, head scope
// ---------------------------------------------------------------------------------------------

interface CoreCase {
  headDim: number;
  group: number;
  dtype: DType;
  buffer: number;
}

const coreCases: CoreCase[] = [];
for (const headDim of [64, 128, 256, 72])
  for (const group of [1, 4, 8])
    for (const dtype of ['fp32', 'fp16', 'bf16'] as DType[])
      for (const buffer of [0, 3]) coreCases.push({ headDim, group, dtype, buffer });

describe.each(BACKENDS)('KVCache on %s', (backend) => {
  describe('decode and prefill match the oracle (scope head)', () => {
    test.each(coreCases)('D=$headDim G=$group $dtype M=8 B=$buffer', ({ headDim, group, dtype, buffer }) => {
      const kvHeads = 2;
      const pair = new CachePair(runtimeFor(backend), {
        layers: 2,
        batch: 2,
        qHeads: kvHeads * group,
        kvHeads,
        headDim,
        memory: 8,
        buffer,
        dtype,
      });
      try {
        pair.prefillPrompt(0, 0, 11, 11); // one pass over the whole prompt, then evict to M
        pair.prefillPrompt(1, 0, 5, 2); // chunks of 2, the last one of 1
        decodeRun(pair, 20, (i, b) => b === 1 && i % 5 === 4);
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Scopes, floor, buffer, strategy
  // -------------------------------------------------------------------------------------------

  interface ScopeCase {
    scope: Scope;
    floor: number;
    buffer: number;
    strategy: Strategy;
    dtype: DType;
  }
  const scopeCases: ScopeCase[] = [];
  let n = 0;
  for (const scope of ['head', 'layer', 'global'] as Scope[])
    for (const floor of scope === 'head' ? [0] : [0, 0.25, 0.5])
      for (const buffer of [0, 4])
        for (const strategy of ['alpha', 'knorm_alpha'] as Strategy[])
          scopeCases.push({ scope, floor, buffer, strategy, dtype: (['fp32', 'fp16', 'bf16'] as const)[n++ % 3]! });

  describe('budget scopes, floor ratio and strategies match the oracle', () => {
    test.each(scopeCases)('scope=$scope floor=$floor B=$buffer $strategy $dtype', (c) => {
      const pair = new CachePair(runtimeFor(backend), {
        layers: 3,
        batch: 2,
        qHeads: 6,
        kvHeads: 3,
        headDim: 64,
        memory: 6,
        buffer: c.buffer,
        dtype: c.dtype,
        scope: c.scope,
        floor: c.floor,
        strategy: c.strategy,
      });
      // knorm_alpha: keys of very different norms, so the log-norm term matters.
      const opts = { kScale: () => uniform(0.05, 4) };
      try {
        pair.prefillPrompt(0, 0, 20, 7, opts);
        pair.prefillPrompt(1, 0, 9, 9, opts);
        for (let i = 0; i < 40; i++) pair.decodeStep([pair.oracle.seen(0), i % 7 === 3 ? -1 : pair.oracle.seen(1)], opts);
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Threshold and sliding window
  // -------------------------------------------------------------------------------------------

  interface TwCase {
    scope: Scope;
    threshold?: number;
    window: number;
    buffer: number;
  }
  const twCases: TwCase[] = [];
  for (const scope of ['head', 'layer', 'global'] as Scope[]) {
    for (const threshold of [0.5, 0.01]) for (const window of [0, 3]) twCases.push({ scope, threshold, window, buffer: 2 });
    for (const window of [1, 5, 20]) twCases.push({ scope, window, buffer: window === 5 ? 3 : 0 });
  }

  describe('threshold and sliding window match the oracle', () => {
    test.each(twCases)('scope=$scope threshold=$threshold window=$window B=$buffer', (c) => {
      const pair = new CachePair(runtimeFor(backend), {
        layers: 2,
        batch: 2,
        qHeads: 4,
        kvHeads: 2,
        headDim: 64,
        memory: 6,
        buffer: c.buffer,
        dtype: 'fp16',
        scope: c.scope,
        window: c.window,
        ...(c.threshold !== undefined ? { threshold: c.threshold } : {}),
      });
      try {
        pair.prefillPrompt(0, 0, 15, 4);
        pair.prefillPrompt(1, 0, 3, 3);
        decodeRun(pair, 40, (i, b) => b === 0 && i % 9 === 8);
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Long runs: hundreds of decode steps with prefill chunks in between
  // -------------------------------------------------------------------------------------------

  const longCases = [
    { chunk: 1, scope: 'head' as Scope, dtype: 'fp16' as DType, buffer: 0 },
    { chunk: 7, scope: 'head' as Scope, dtype: 'fp32' as DType, buffer: 8 },
    { chunk: 64, scope: 'layer' as Scope, dtype: 'bf16' as DType, buffer: 4 },
    { chunk: 0, scope: 'global' as Scope, dtype: 'fp16' as DType, buffer: 0 }, // 0 = whole prompt
  ];

  describe('long runs: 320 decode steps with prefills of new sequences in between', () => {
    test.each(longCases)('prefill chunk=$chunk (0 = whole prompt) scope=$scope $dtype B=$buffer', (c) => {
      const pair = new CachePair(runtimeFor(backend), {
        layers: 2,
        batch: 3,
        qHeads: 2,
        kvHeads: 1,
        headDim: 64,
        memory: 32,
        buffer: c.buffer,
        dtype: c.dtype,
        scope: c.scope,
      });
      const prompt = (seq: number, len: number) => pair.prefillPrompt(seq, 0, len, c.chunk === 0 ? len : c.chunk);
      const active = [true, true, false];
      try {
        prompt(0, 150);
        prompt(1, 70);
        for (let i = 0; i < 320; i++) {
          if (i === 100) {
            prompt(2, 90);
            active[2] = true;
          }
          if (i === 200) {
            pair.reset(1);
            prompt(1, 45);
          }
          pair.decodeStep(active.map((a, b) => (a ? pair.oracle.seen(b) : -1)));
        }
        expect(pair.oracle.seen(0), ctx('seen(0)')).toBe(470);
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Prefill specifics
  // -------------------------------------------------------------------------------------------

  describe('prefill', () => {
    test('one chunk of the whole prompt gives the reference single-pass result', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 1, qHeads: 4, kvHeads: 2, headDim: 128, memory: 8, dtype: 'fp32' });
      try {
        pair.prefillChunk(0, 0, 40); // the oracle's prefill is the single pass: attention over all, one eviction
        expect(pair.cache.length(0, 0, 0)).toBe(8);
      } finally {
        pair.dispose();
      }
    });

    test.each([1, 7, 64])('chunks of %i after decode steps continue the sequence', (chunk) => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 2, qHeads: 4, kvHeads: 2, headDim: 64, memory: 16, buffer: 2, dtype: 'fp16' });
      try {
        pair.prefillPrompt(0, 0, 30, chunk);
        decodeRun(pair, 5, (_i, b) => b === 1);
        pair.prefillPrompt(0, pair.oracle.seen(0), 70, chunk); // a follow-up turn on the same slot
        decodeRun(pair, 5);
      } finally {
        pair.dispose();
      }
    });

    // Varlen: several sequences' chunks in one call, as continuous batching mixes them.
    test.each([
      { scope: 'head' as Scope, dtype: 'bf16' as DType, buffer: 0, headDim: 64, floor: 0, threshold: undefined },
      { scope: 'head' as Scope, dtype: 'fp32' as DType, buffer: 4, headDim: 72, floor: 0, threshold: 0.05 },
      { scope: 'layer' as Scope, dtype: 'fp16' as DType, buffer: 2, headDim: 128, floor: 0.25, threshold: undefined },
      { scope: 'global' as Scope, dtype: 'bf16' as DType, buffer: 0, headDim: 256, floor: 0.5, threshold: undefined },
    ])('prefillBatch: chunks of several sequences in one call, scope=$scope $dtype B=$buffer D=$headDim', (c) => {
      const pair = new CachePair(runtimeFor(backend), {
        layers: 2, batch: 4, qHeads: 8, kvHeads: 2, headDim: c.headDim, memory: 24, buffer: c.buffer, dtype: c.dtype,
        scope: c.scope, floor: c.floor, window: 2, ...(c.threshold !== undefined ? { threshold: c.threshold } : {}),
      });
      try {
        // Unequal chunks, sequences out of order, one slot left out, then a follow-up call that
        // mixes a new sequence with the continuation of others, then decode.
        pair.prefillBatch([{ seq: 2, start: 0, length: 37 }, { seq: 0, start: 0, length: 5 }, { seq: 3, start: 0, length: 64 }]);
        pair.prefillBatch([{ seq: 0, start: 5, length: 50 }, { seq: 1, start: 0, length: 1 }, { seq: 3, start: 70, length: 9 }]);
        decodeRun(pair, 3);
        pair.prefillBatch([{ seq: 1, start: pair.oracle.seen(1), length: 33 }]);
        decodeRun(pair, 2);
      } finally {
        pair.dispose();
      }
    });

    test('a chunk may start past T (position gap)', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 2, kvHeads: 2, headDim: 64, memory: 4, dtype: 'fp16' });
      try {
        pair.prefillChunk(0, 0, 6);
        pair.prefillChunk(0, 10, 3);
        pair.decodeStep([20]);
        expect(pair.cache.seen(0)).toBe(21);
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Inactive slots, reset, position gaps
  // -------------------------------------------------------------------------------------------

  describe('inactive slots', () => {
    test('positions -1 append nothing and write zero rows; gaps in positions are allowed', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 4, qHeads: 8, kvHeads: 2, headDim: 64, memory: 5, buffer: 1, dtype: 'bf16' });
      try {
        for (let i = 0; i < 30; i++) {
          const positions = Array.from({ length: 4 }, (_, b) => (rand() < 0.35 ? -1 : pair.oracle.seen(b) + (b === 3 ? randInt(0, 3) : 0)));
          pair.decodeStep(positions);
        }
        pair.decodeStep([-1, -1, -1, -1]);
      } finally {
        pair.dispose();
      }
    });

    test('reset empties only its slot and restarts T at 0', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 2, qHeads: 2, kvHeads: 1, headDim: 64, memory: 4, dtype: 'fp16' });
      try {
        pair.prefillChunk(0, 0, 9);
        pair.prefillChunk(1, 0, 9);
        pair.reset(0);
        expect(pair.cache.seen(0)).toBe(0);
        expect(pair.cache.length(0, 1, 0)).toBe(0);
        expect(pair.cache.length(1, 1, 0)).toBe(4);
        decodeRun(pair, 6);
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Other head dims, custom scale, random configurations
  // -------------------------------------------------------------------------------------------

  describe('head dims off the fast list', () => {
    test.each([1, 3, 40, 96, 1024])('D=%i', (headDim) => {
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 2, qHeads: 4, kvHeads: 2, headDim, memory: 5, buffer: 1, dtype: 'fp16' });
      try {
        pair.prefillPrompt(0, 0, 9, 4);
        decodeRun(pair, 8);
      } finally {
        pair.dispose();
      }
    });
  });

  describe('large budget', () => {
    test.each(['fp32', 'bf16'] as const)('M=256 D=128 G=4 %s: a 300-token prompt in one pass, then 20 steps', (dtype) => {
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 4, kvHeads: 1, headDim: 128, memory: 256, buffer: 8, dtype });
      try {
        pair.prefillChunk(0, 0, 300);
        decodeRun(pair, 20);
      } finally {
        pair.dispose();
      }
    });
  });

  describe('scale', () => {
    test.each([0.05, 0.3, 2])('custom softmax scale %f', (scale) => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 1, qHeads: 4, kvHeads: 1, headDim: 64, memory: 6, scale, dtype: 'fp32' });
      try {
        pair.prefillChunk(0, 0, 10);
        decodeRun(pair, 6);
      } finally {
        pair.dispose();
      }
    });
  });

  describe('random configurations (every option at once)', () => {
    test.each(Array.from({ length: 16 }, (_x, i) => i))('random config #%i', () => {
      const pick = <T,>(xs: readonly T[]): T => xs[randInt(0, xs.length - 1)]!;
      const kvHeads = pick([1, 2, 3]);
      const scope = pick(['head', 'layer', 'global'] as const);
      const config: CacheConfig = {
        layers: pick([1, 2, 3]),
        batch: pick([1, 2, 3]),
        kvHeads,
        qHeads: kvHeads * pick([1, 2, 4, 8]),
        headDim: pick([64, 128, 256, 72, 40]),
        memory: randInt(1, 12),
        buffer: pick([0, 0, 1, 3, 7]),
        dtype: pick(['fp32', 'fp16', 'bf16'] as const),
        strategy: pick(['alpha', 'knorm_alpha'] as const),
        window: pick([0, 0, 1, 2, 6]),
        scope,
        ...(scope !== 'head' ? { floor: pick([0, 0.25, 0.5, 0.75]) } : {}),
        ...(rand() < 0.3 ? { threshold: pick([0.9, 0.3, 0.02]) } : {}),
        ...(rand() < 0.3 ? { scale: uniform(0.05, 0.3) } : {}),
      };
      const pair = new CachePair(runtimeFor(backend), config, JSON.stringify(config));
      const opts = { kScale: () => uniform(0.1, 3) };
      try {
        for (let step = 0; step < 30; step++) {
          const r = rand();
          if (r < 0.15) {
            const seq = randInt(0, config.batch - 1);
            pair.prefillChunk(seq, pair.oracle.seen(seq) + randInt(0, 2), randInt(1, 20), opts);
          } else if (r < 0.2) {
            pair.reset(randInt(0, config.batch - 1));
          } else {
            const positions = Array.from({ length: config.batch }, (_x, b) => (rand() < 0.2 ? -1 : pair.oracle.seen(b) + (rand() < 0.1 ? 3 : 0)));
            pair.decodeStep(positions, opts);
          }
        }
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Edge budgets
  // -------------------------------------------------------------------------------------------

  describe('edge budgets', () => {
    test.each(['layer', 'global'] as Scope[])('scope=%s: one head takes almost the whole pool (lengths far above M + B)', (scope) => {
      // head 0 of layer 0 barely decays, every other head decays fast: head 0 ends up holding
      // nearly the pool's whole budget, far more than M + B tokens.
      const slow = (l: number, _r: number, h: number) => (l === 0 && h === 0 ? -1e-4 * (1 + rand()) : -2 - rand());
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 1, qHeads: 8, kvHeads: 4, headDim: 64, memory: 4, buffer: 2, scope, dtype: 'fp32' });
      try {
        pair.prefillPrompt(0, 0, 40, 16, { lam: slow });
        for (let i = 0; i < 30; i++) pair.decodeStep([pair.oracle.seen(0)], { lam: slow });
        const pool = scope === 'layer' ? 4 * 4 : 2 * 4 * 4;
        expect(pair.cache.length(0, 0, 0), ctx('head 0 holds most of the pool')).toBeGreaterThan(pool - 8);
      } finally {
        pair.dispose();
      }
    });

    test('threshold = 1 drops every decaying token: decode attends to its new token alone', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 2, qHeads: 4, kvHeads: 2, headDim: 64, memory: 8, threshold: 1, dtype: 'fp32' });
      try {
        pair.prefillChunk(0, 0, 5);
        expect(Array.from(pair.cache.lengths())).toEqual(new Array(8).fill(0));
        decodeRun(pair, 5);
      } finally {
        pair.dispose();
      }
    });

    test.each([0, 1])('memory = 1, buffer = %i', (buffer) => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 2, qHeads: 2, kvHeads: 1, headDim: 128, memory: 1, buffer, dtype: 'bf16' });
      try {
        pair.prefillChunk(0, 0, 4);
        decodeRun(pair, 12, (i, b) => b === 0 && i === 3);
      } finally {
        pair.dispose();
      }
    });
  });

  // -------------------------------------------------------------------------------------------
  // Planted ties (SPEC section 4: equal scores keep the larger position; API: across heads,
  // equal (score, position) keep the lower (layer, head) index).
  // -------------------------------------------------------------------------------------------

  describe('tie rule', () => {
    test('all lam = 0 (every score 0): the newest M positions stay', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 2, kvHeads: 2, headDim: 64, memory: 5, dtype: 'fp16' });
      const zero = { lam: () => 0 };
      try {
        pair.prefillChunk(0, 0, 9, zero);
        expect(Array.from(pair.cache.inspect(0, 0, 1).positions)).toEqual([4, 5, 6, 7, 8]);
        for (let i = 0; i < 6; i++) pair.decodeStep([pair.oracle.seen(0)], zero);
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([10, 11, 12, 13, 14]);
      } finally {
        pair.dispose();
      }
    });

    test('equal decayed scores at different positions: the larger position stays', () => {
      // T = 3, ages 4, 3, 2: lam -0.75 * 4 = -3 = -1 * 3 (exact in float32); p = 2 scores -0.5
      const lams = [-0.75, -1, -0.25];
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 1, kvHeads: 1, headDim: 64, memory: 2, dtype: 'fp32' });
      try {
        pair.prefillChunk(0, 0, 3, { lam: (_l, row) => lams[row]! });
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([1, 2]);
        // T = 4 with p = 3 at lam -1.5: ages 4, 3, 2 -> -4, -0.75, -3: positions 2 and 3 stay
        pair.decodeStep([3], { lam: () => -1.5 });
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([2, 3]);
        // T = 5, p = 4 at lam -2.25: p = 2 -> -1, p = 3 -> -4.5, p = 4 -> -4.5: the tie keeps p = 4
        pair.decodeStep([4], { lam: () => -2.25 });
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([2, 4]);
        // T = 6, p = 5 at lam -3.375: p = 2 -> -1.25, p = 4 -> -6.75, p = 5 -> -6.75: p = 5 stays
        pair.decodeStep([5], { lam: () => -3.375 });
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([2, 5]);
      } finally {
        pair.dispose();
      }
    });

    test('window ties: more protected tokens than M keep the larger positions', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 2, kvHeads: 1, headDim: 64, memory: 4, window: 10, dtype: 'fp16' });
      try {
        pair.prefillChunk(0, 0, 7);
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([3, 4, 5, 6]);
        for (let i = 0; i < 5; i++) pair.decodeStep([pair.oracle.seen(0)]);
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([8, 9, 10, 11]);
      } finally {
        pair.dispose();
      }
    });

    test('layer scope: equal (score, position) across heads keeps the lower head index', () => {
      // Hkv = 2, M = 5, f = 0.5: the pool's best floor(10 * 0.5) = 5 are (9,h0) (9,h1) (8,h0) (8,h1) (7,h0):
      // head 0 gets 3 + floor(2.5) = 5, head 1 gets 2 + 2 = 4.
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 2, kvHeads: 2, headDim: 64, memory: 5, scope: 'layer', floor: 0.5, dtype: 'fp16' });
      try {
        pair.prefillChunk(0, 0, 10, { lam: () => 0 });
        expect(Array.from(pair.cache.inspect(0, 0, 0).positions)).toEqual([5, 6, 7, 8, 9]);
        expect(Array.from(pair.cache.inspect(0, 0, 1).positions)).toEqual([6, 7, 8, 9]);
      } finally {
        pair.dispose();
      }
    });

    test('global scope: equal (score, position) across layers keeps the lower layer index', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 2, batch: 1, qHeads: 1, kvHeads: 1, headDim: 64, memory: 5, scope: 'global', floor: 0.5, dtype: 'fp16' });
      try {
        pair.prefillChunk(0, 0, 10, { lam: () => 0 });
        expect(pair.cache.length(0, 0, 0)).toBe(5);
        expect(pair.cache.length(0, 1, 0)).toBe(4);
      } finally {
        pair.dispose();
      }
    });
  });

  describe('inspect', () => {
    test('reports the plain decayed score of window-protected tokens (the window decides eviction, not the score)', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 2, kvHeads: 1, headDim: 64, memory: 4, window: 2, dtype: 'fp16' });
      try {
        pair.prefillChunk(0, 0, 7); // T = 7: p >= 5 protected
        const snap = pair.cache.inspect(0, 0, 0);
        const ref = pair.oracle.inspect(0, 0, 0);
        expect(Array.from(snap.positions)).toEqual(ref.positions);
        const protectedScores = Array.from(snap.scores).filter((_s, i) => snap.positions[i]! >= 5);
        const refScores = ref.scores.filter((_s, i) => ref.positions[i]! >= 5);
        expect(protectedScores.every(Number.isFinite), ctx('finite scores of p = 5, 6')).toBe(true);
        expectScoresClose(Float32Array.from(protectedScores), refScores, 'scores of p = 5, 6');
      } finally {
        pair.dispose();
      }
    });
  });

  describe('config', () => {
    test('fills in the defaults of lib/types.ts', () => {
      const cache = runtimeFor(backend).createCache({ layers: 1, batch: 1, qHeads: 4, kvHeads: 2, headDim: 64, memory: 8 });
      expect(cache.config).toEqual({
        layers: 1,
        batch: 1,
        qHeads: 4,
        kvHeads: 2,
        headDim: 64,
        memory: 8,
        buffer: 0,
        dtype: 'fp16',
        strategy: 'alpha',
        window: 0,
        scope: 'head',
        floor: 0,
        threshold: null,
        scale: 1 / 8,
      });
      cache.dispose();
    });
  });

  describe('memoryBytes', () => {
    test('reports used <= reserved, growing with the cache', () => {
      const pair = new CachePair(runtimeFor(backend), { layers: 1, batch: 1, qHeads: 2, kvHeads: 2, headDim: 64, memory: 8, dtype: 'fp16' });
      try {
        const before = pair.cache.memoryBytes();
        pair.prefillChunk(0, 0, 6);
        const after = pair.cache.memoryBytes();
        expect(before.reserved).toBeGreaterThan(0);
        expect(after.used).toBeGreaterThan(before.used);
        expect(after.used).toBeLessThanOrEqual(after.reserved);
      } finally {
        pair.dispose();
      }
    });
  });
});

// ---------------------------------------------------------------------------------------------
// CUDA against the CPU backend directly, on identical inputs
// ---------------------------------------------------------------------------------------------

describe.skipIf(!cudaAvailable)(`KVCache: cuda against cpu${cudaAvailable ? '' : ` (skipped: ${cudaSkipReason})`}`, () => {
  const cases: (CacheConfig & { label: string })[] = [
    { label: 'head fp16 D=128 G=4', layers: 2, batch: 3, qHeads: 8, kvHeads: 2, headDim: 128, memory: 16, buffer: 4, dtype: 'fp16' },
    { label: 'layer bf16 D=64 G=8 floor', layers: 2, batch: 2, qHeads: 16, kvHeads: 2, headDim: 64, memory: 12, scope: 'layer', floor: 0.25, dtype: 'bf16' },
    { label: 'global fp32 D=256 knorm window', layers: 3, batch: 2, qHeads: 2, kvHeads: 2, headDim: 256, memory: 8, scope: 'global', strategy: 'knorm_alpha', window: 2, dtype: 'fp32' },
    { label: 'head fp16 D=72 threshold', layers: 2, batch: 2, qHeads: 4, kvHeads: 1, headDim: 72, memory: 10, threshold: 0.2, dtype: 'fp16' },
  ];
  test.each(cases)('$label: outputs and retained sets agree', ({ label: _label, ...config }) => {
    skipIfUnsupported(cacheSupport('cuda', config));
    const rts = [runtimeFor('cpu'), runtimeFor('cuda')] as const;
    const caches = rts.map((rt) => rt.createCache(config));
    const dtype = config.dtype ?? 'fp16';
    const { layers, batch, qHeads, kvHeads, headDim: D } = config;
    const T = new Array<number>(batch).fill(0);
    /** Runs one layer call with the same inputs on both backends and compares the outputs. */
    const both = (rows: number, l: number, call: (cache: KVCache, t: IoTensors) => void) => {
      const inp = makeInputs(rows, qHeads, kvHeads, D, dtype, l);
      const outs = rts.map((rt, i) => {
        const t = ioTensors(rt, rows, qHeads, kvHeads, D, dtype, inp);
        call(caches[i]!, t);
        const o = t.out.readSync();
        Object.values(t).forEach((x) => x.dispose());
        return o;
      });
      const err = relError(outs[1]!, Float64Array.from(outs[0]!));
      expect(err, ctx(`cuda vs cpu layer ${l}`)).toBeLessThanOrEqual(TOL[dtype]);
    };
    try {
      for (let s = 0; s < batch; s++) {
        const C = 13 + 5 * s;
        for (let l = 0; l < layers; l++) both(C, l, (cache, t) => cache.prefill(l, { seq: s, start: 0, ...t }));
        T[s] = C;
      }
      for (let step = 0; step < 60; step++) {
        const positions = Int32Array.from(T.map((t, s) => (s === 1 && step % 4 === 0 ? -1 : t)));
        for (let l = 0; l < layers; l++) both(batch, l, (cache, t) => cache.decode(l, { ...t, positions }));
        positions.forEach((p, s) => {
          if (p >= 0) T[s] = p + 1;
        });
        for (let s = 0; s < batch; s++)
          for (let l = 0; l < layers; l++)
            for (let h = 0; h < kvHeads; h++)
              expect(Array.from(caches[1]!.inspect(s, l, h).positions), ctx(`step ${step} seq ${s} layer ${l} head ${h}`)).toEqual(
                Array.from(caches[0]!.inspect(s, l, h).positions),
              );
      }
    } finally {
      caches.forEach((c) => c.dispose());
    }
  });
});
