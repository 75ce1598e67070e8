/**
 * The oracle checked against cases computed by hand, and the codecs of helpers.ts against
 * known bit patterns. Runs without the native addon.
 */
import { describe, expect, test } from 'vitest';
import type { CacheConfig, GateSpec } from '../lib/types.js';
import {
  bf16BitsToNumber,
  fp16BitsToNumber,
  numberToBf16Bits,
  numberToFp16Bits,
  relError,
} from './helpers.js';
import { activate, erf, gateForward, logSigmoid, OracleCache } from './oracle.js';

const f64 = (...a: number[]) => Float64Array.from(a);

describe('erf', () => {
  test.each([
    [0.5, 0.5204998778130465],
    [1, 0.8427007929497149],
    [2, 0.9953222650189527],
    [3, 0.9999779095030014],
    [-1.5, -0.9661051464753108],
    [5, 0.9999999999984626],
    [1e-10, 1.1283791670955126e-10],
  ])('erf(%f) = %f to 1e-15', (x, ref) => {
    expect(Math.abs(erf(x) - ref)).toBeLessThanOrEqual(1e-15 * Math.abs(ref));
  });
});

describe('activate', () => {
  test.each([
    ['silu', 1, 0.7310585786300049],
    ['swish', -2, -0.2384058440442351],
    ['silu', -800, -0],
    ['gelu', 1, 0.8413447460685429],
    ['gelu', -1, -0.15865525393145707],
    ['gelu_new', 1, 0.8411919906082768],
    ['gelu_pytorch_tanh', -1, -0.15880800939172324],
    ['relu', -2, 0],
    ['relu', 3, 3],
  ] as const)('%s(%f) = %f', (act, x, ref) => {
    expect(Math.abs(activate(act, x) - ref)).toBeLessThanOrEqual(1e-15 * Math.max(1, Math.abs(ref)));
  });
});

describe('logSigmoid', () => {
  test('is stable at both ends', () => {
    expect(logSigmoid(0)).toBeCloseTo(-Math.LN2, 15);
    expect(logSigmoid(-1000)).toBe(-1000);
    expect(logSigmoid(1000)).toBe(0);
    expect(logSigmoid(40)).toBeCloseTo(-4.248354255291589e-18, 30);
  });
});

describe('fp16 / bf16 codecs', () => {
  test.each([
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff],
    [65519.99, 0x7bff],
    [65520, 0x7c00], // tie between 65504 (odd mantissa) and 65536: to even, i.e. infinity
    [2 ** -24, 0x0001],
    [2 ** -25, 0x0000], // tie between 0 and the smallest subnormal: to even, i.e. 0
    [1.5 * 2 ** -25, 0x0001],
    [3 * 2 ** -25, 0x0002], // tie between 1 and 2 subnormal units: to even (2)
    [1 + 2 ** -11, 0x3c00], // tie: to even (down)
    [1 + 3 * 2 ** -11, 0x3c02], // tie: to even (up)
    [2 ** -14 - 2 ** -26, 0x0400], // rounds up into the smallest normal
    [Infinity, 0x7c00],
    [-0, 0x8000],
  ])('fp16(%f) = 0x%s', (v, bits) => {
    expect(numberToFp16Bits(v)).toBe(bits);
  });

  test.each([
    [1, 0x3f80],
    [1 + 2 ** -8, 0x3f80], // tie: to even (down)
    [1 + 3 * 2 ** -8, 0x3f82], // tie: to even (up)
    [1 + 2 ** -8 + 2 ** -20, 0x3f81],
    [-Infinity, 0xff80],
    [3.3895313892515355e38, 0x7f7f], // largest bf16
  ])('bf16(%f) = 0x%s', (v, bits) => {
    expect(numberToBf16Bits(v)).toBe(bits);
  });

  test('NaN stays NaN and decoders invert encoders on every finite pattern', () => {
    expect(Number.isNaN(fp16BitsToNumber(numberToFp16Bits(NaN)))).toBe(true);
    expect(Number.isNaN(bf16BitsToNumber(numberToBf16Bits(NaN)))).toBe(true);
    for (let b = 0; b < 0x10000; b++) {
      const h = fp16BitsToNumber(b);
      if (!Number.isNaN(h)) expect(numberToFp16Bits(h)).toBe(b);
      const g = bf16BitsToNumber(b);
      if (!Number.isNaN(g)) expect(numberToBf16Bits(g)).toBe(b);
    }
  });
});

describe('relError', () => {
  test('NaN never passes and zero reference is absolute', () => {
    expect(relError([1, NaN], [1, 1])).toBe(Infinity);
    expect(relError([0, 0], [0, 0])).toBe(0);
    expect(relError([3, 4], [0, 0])).toBe(5);
    expect(relError([1, 1], [1, 0])).toBe(1);
  });
});

describe('gateForward', () => {
  test('rg with relu, by hand', () => {
    const spec: GateSpec = {
      kind: 'rg',
      activation: 'relu',
      inputSize: 2,
      intermediateSize: 2,
      kvHeads: 1,
      weights: {
        linear1Weight: Float32Array.from([1, 0, 0, 1]),
        linear1Bias: Float32Array.from([0, -1]),
        linear2Weight: Float32Array.from([1, -0.5]),
        bias: Float32Array.from([0.5]),
      },
    };
    // u = [2, 2], a = [2, 2], z = 2 - 1 + 0.5 = 1.5; second row x = [-1, 0]: u = [-1, -1], z = 0.5
    const lam = gateForward(spec, [2, 3, -1, 0], 2);
    expect(lam[0]).toBeCloseTo(logSigmoid(1.5), 15);
    expect(lam[1]).toBeCloseTo(logSigmoid(0.5), 15);
  });

  test('rg3 with relu and fp16 / bf16 weight arrays, by hand', () => {
    const h = (v: number) => numberToFp16Bits(v);
    const g = (v: number) => numberToBf16Bits(v);
    const spec: GateSpec = {
      kind: 'rg3',
      activation: 'relu',
      inputSize: 2,
      intermediateSize: 2,
      kvHeads: 2,
      weights: {
        gateProj: { dtype: 'fp16', shape: [2, 2], data: Uint16Array.from([h(1), h(0), h(0), h(1)]) },
        upProj: { dtype: 'bf16', shape: [2, 2], data: Uint16Array.from([g(0), g(1), g(1), g(0)]) },
        downProj: { dtype: 'fp32', shape: [2, 2], data: Float32Array.from([1, -1, 0.5, 0]) },
        bias: Float32Array.from([-3, 1]),
      },
    };
    // y = [2, 3]: gate = [2, 3], up = [3, 2], a = [6, 6]; z = [0 - 3, 3 + 1]
    const lam = gateForward(spec, [2, 3], 1);
    expect(lam[0]).toBeCloseTo(logSigmoid(-3), 15);
    expect(lam[1]).toBeCloseTo(logSigmoid(4), 15);
  });
});

const base: CacheConfig = { layers: 1, batch: 1, qHeads: 1, kvHeads: 1, headDim: 2, memory: 100, scale: 1 };

describe('OracleCache attention', () => {
  test('three-token decode attention, by hand', () => {
    const c = new OracleCache(base);
    c.decode(0, f64(0, 0), f64(1, 0), f64(1, 0), f64(-0.1), [0]);
    c.decode(0, f64(0, 0), f64(0, 1), f64(0, 1), f64(-0.1), [1]);
    // logits [ln 2, ln 3, 0] -> weights [2, 3, 1] / 6 -> out = (2 v0 + 3 v1 + v2) / 6
    const out = c.decode(0, f64(Math.LN2, Math.log(3)), f64(0, 0), f64(1, 1), f64(-0.1), [2]);
    expect(out[0]).toBeCloseTo(3 / 6, 14);
    expect(out[1]).toBeCloseTo(4 / 6, 14);
    expect(c.seen(0)).toBe(3);
  });

  test('prefill is causal within a chunk', () => {
    const c = new OracleCache(base);
    const q = f64(5, 5, Math.LN2, Math.log(3), Math.LN2, Math.log(3));
    const k = f64(1, 0, 0, 1, 0, 0);
    const v = f64(1, 0, 0, 1, 1, 1);
    const out = c.prefill(0, 0, 0, q, k, v, f64(-1, -1, -1), 3);
    expect(Array.from(out.slice(0, 2))).toEqual([1, 0]); // sees itself only
    expect(out[2]).toBeCloseTo(2 / 5, 14); // weights [2, 3]
    expect(out[3]).toBeCloseTo(3 / 5, 14);
    expect(out[4]).toBeCloseTo(3 / 6, 14);
    expect(out[5]).toBeCloseTo(4 / 6, 14);
  });

  test('default scale is 1/sqrt(D) and GQA head j reads KV head j / G', () => {
    const c = new OracleCache({ ...base, qHeads: 4, kvHeads: 2, scale: undefined });
    // one token: softmax weight 1, so out row j = v of KV head j / 2
    const out = c.decode(0, new Float64Array(8).fill(1), f64(1, 1, 1, 1), f64(1, 2, 3, 4), f64(0, 0), [0]);
    expect(Array.from(out)).toEqual([1, 2, 1, 2, 3, 4, 3, 4]);
    expect(c.cfg.scale).toBeCloseTo(1 / Math.SQRT2, 15);
  });

  test('inactive slots give zero rows and append nothing', () => {
    const c = new OracleCache({ ...base, batch: 2 });
    const out = c.decode(0, f64(1, 1, 1, 1), f64(1, 0, 1, 0), f64(7, 7, 7, 7), f64(0, 0), [-1, 4]);
    expect(Array.from(out)).toEqual([0, 0, 7, 7]);
    expect(c.length(0, 0, 0)).toBe(0);
    expect(c.seen(0)).toBe(0);
    expect(c.seen(1)).toBe(5);
  });
});

/** Prefill `lams.length` tokens of one head with zero keys/values. */
function prefillLams(c: OracleCache, layer: number, seq: number, start: number, lams: number[][]): void {
  const { qHeads, kvHeads, headDim } = c.cfg;
  const C = lams.length;
  const q = new Float64Array(C * qHeads * headDim);
  const k = new Float64Array(C * kvHeads * headDim).fill(1);
  c.prefill(layer, seq, start, q, k, k, Float64Array.from(lams.flat()), C);
}

describe('OracleCache eviction', () => {
  test('budget M = 2 keeps the two best scores, by hand', () => {
    const c = new OracleCache({ ...base, memory: 2 });
    prefillLams(c, 0, 0, 0, [[-0.1], [-1], [-0.5]]);
    // T = 3: scores -0.1*4 = -0.4, -1*3 = -3, -0.5*2 = -1
    const s = c.inspect(0, 0, 0);
    expect(s.positions).toEqual([0, 2]);
    expect(s.scores[0]).toBeCloseTo(-0.4, 15);
    expect(s.scores[1]).toBeCloseTo(-1, 15);
  });

  test('buffer B = 2 evicts once the head holds M + B tokens', () => {
    const c = new OracleCache({ ...base, memory: 2, buffer: 2 });
    const lams = [-0.5, -0.01, -2, -0.02];
    lams.forEach((lam, p) => {
      c.decode(0, f64(0, 0), f64(1, 1), f64(1, 1), f64(lam), [p]);
      expect(c.length(0, 0, 0)).toBe(p < 3 ? p + 1 : 2);
    });
    expect(c.inspect(0, 0, 0).positions).toEqual([1, 3]);
  });

  test('equal scores keep the larger position', () => {
    const c = new OracleCache({ ...base, memory: 3 });
    prefillLams(c, 0, 0, 0, [[0], [0], [0], [0], [0], [0]]);
    expect(c.inspect(0, 0, 0).positions).toEqual([3, 4, 5]);
  });

  test('window W protects p >= T - W with +inf, ties among them keep larger positions', () => {
    const c = new OracleCache({ ...base, memory: 2, window: 2 });
    prefillLams(c, 0, 0, 0, [[-0.001], [-5], [-5], [-5]]);
    // T = 4: protected p >= 2 -> p = 2, 3 (+inf) beat p = 0
    // inspect reports the plain decayed scores lam * (T + 1 - p): -5 * 3 and -5 * 2
    expect(c.inspect(0, 0, 0)).toEqual({ positions: [2, 3], scores: [-15, -10] });
    const d = new OracleCache({ ...base, memory: 2, window: 3 });
    prefillLams(d, 0, 0, 0, [[-0.001], [-5], [-5], [-5]]);
    expect(d.inspect(0, 0, 0).positions).toEqual([2, 3]); // three +inf: the oldest goes
  });

  test('knorm_alpha adds ln ||k|| of the stored key', () => {
    const c = new OracleCache({ ...base, memory: 1, strategy: 'knorm_alpha' });
    // equal lam, keys of norm e^3 and 1: ages 3 and 2 -> -3 + 3 = 0 vs -2 + 0 = -2
    const k = f64(Math.exp(3), 0, 1, 0);
    c.prefill(0, 0, 0, new Float64Array(4), k, k, f64(-1, -1), 2);
    expect(c.inspect(0, 0, 0).positions).toEqual([0]);
    expect(c.inspect(0, 0, 0).scores[0]).toBeCloseTo(0, 14);
  });

  test('threshold drops scores below ln tau, then the budget applies', () => {
    const c = new OracleCache({ ...base, memory: 3, threshold: Math.exp(-1) });
    prefillLams(c, 0, 0, 0, [[-0.2], [-0.4], [-0.1]]);
    // T = 3: scores -0.8, -1.2, -0.2 -> p = 1 dropped
    expect(c.inspect(0, 0, 0).positions).toEqual([0, 2]);
  });

  test('layer scope pools heads; floor counts, by hand', () => {
    // Hkv = 2, M = 5, f = 0.5, all lam = 0: pool order (p desc, head asc) takes floor(10 * 0.5) = 5:
    // head 0 gets 3, head 1 gets 2; each adds floor(5 * 0.5) = 2 -> 5 and 4 tokens.
    const c = new OracleCache({ ...base, kvHeads: 2, qHeads: 2, memory: 5, scope: 'layer', floor: 0.5 });
    prefillLams(c, 0, 0, 0, Array.from({ length: 10 }, () => [0, 0]));
    expect(c.inspect(0, 0, 0).positions).toEqual([5, 6, 7, 8, 9]);
    expect(c.inspect(0, 0, 1).positions).toEqual([6, 7, 8, 9]);
  });

  test('layer scope without floor gives heads different lengths', () => {
    const c = new OracleCache({ ...base, kvHeads: 2, qHeads: 2, memory: 2, scope: 'layer' });
    // head 0 lam -0.01 (kept), head 1 lam -1 (evicted) except its newest
    prefillLams(c, 0, 0, 0, [[-0.01, -1], [-0.01, -1], [-0.01, -0.001]]);
    expect(c.length(0, 0, 0)).toBe(3);
    expect(c.inspect(0, 0, 1).positions).toEqual([2]);
  });

  test('global scope evicts after the last layer only', () => {
    const c = new OracleCache({ ...base, layers: 2, memory: 1, scope: 'global' });
    c.decode(0, f64(0, 0), f64(1, 1), f64(1, 1), f64(-1), [0]);
    c.decode(1, f64(0, 0), f64(1, 1), f64(1, 1), f64(-0.1), [0]);
    c.decode(0, f64(0, 0), f64(1, 1), f64(1, 1), f64(-0.2), [1]);
    expect(c.length(0, 0, 0)).toBe(2); // the pool is over budget, but layer 1 has not run yet
    c.decode(1, f64(0, 0), f64(1, 1), f64(1, 1), f64(-3), [1]);
    // T = 2: l0: p0 -3, p1 -0.4; l1: p0 -0.3, p1 -6 -> keep l0 p1, l1 p0
    expect(c.inspect(0, 0, 0).positions).toEqual([1]);
    expect(c.inspect(0, 1, 0).positions).toEqual([0]);
  });

  test('across heads, equal (score, position) keeps the lower (layer, head) index', () => {
    const c = new OracleCache({ ...base, layers: 2, memory: 5, scope: 'global', floor: 0.5 });
    for (const l of [0, 1]) prefillLams(c, l, 0, 0, Array.from({ length: 10 }, () => [0]));
    expect(c.length(0, 0, 0)).toBe(5);
    expect(c.length(0, 1, 0)).toBe(4);
  });

  test('reset empties the slot', () => {
    const c = new OracleCache(base);
    prefillLams(c, 0, 0, 0, [[0], [0]]);
    c.reset(0);
    expect(c.seen(0)).toBe(0);
    expect(c.inspect(0, 0, 0)).toEqual({ positions: [], scores: [] });
  });
});
