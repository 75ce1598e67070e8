/**
 * Tensor: creation, write / read round trips, fp32 -> fp16 / bf16 conversion (round to nearest
 * even, checked against the codecs of helpers.ts), raw 16-bit writes and disposal.
 */
import { describe, expect, test } from 'vitest';
import { openRuntime, TrimKVError } from '../lib/index.js';
import type { DType } from '../lib/types.js';
import { backendsUnderTest } from './backends.js';
import { runtimeFor } from './harness.js';
import { bitsToNumber, ctx, DTYPES, numberToBits, randnArray, uniform } from './helpers.js';

const BACKENDS = backendsUnderTest();

/** Values that exercise rounding: ties both ways, subnormals, overflow, signed zero, specials. */
function specialValues(dtype: 'fp16' | 'bf16'): Float32Array {
  const v: number[] = [0, -0, 1, -1, Infinity, -Infinity, NaN, 3.4028234663852886e38, 1.401298464324817e-45];
  if (dtype === 'fp16') {
    v.push(65504, 65519.99, 65520, -65520, 1e6, 2 ** -24, 2 ** -25, 1.5 * 2 ** -25, 3 * 2 ** -25, 2 ** -26);
    v.push(1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -11 + 2 ** -20, 2 ** -14 - 2 ** -26, 2 ** -15 + 2 ** -25);
  } else {
    v.push(1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 3.3961775292304e38, 1.1754943508222875e-38, 2 ** -133);
  }
  // random values over the whole exponent range
  for (let i = 0; i < 2000; i++) v.push((uniform(0, 1) < 0.5 ? -1 : 1) * 2 ** uniform(-30, 20));
  return new Float32Array(v);
}

/** Random float32 values with many exact halfway cases for `dtype`. */
function roundingInputs(dtype: 'fp16' | 'bf16'): Float32Array {
  const base = specialValues(dtype);
  const tieBit = dtype === 'fp16' ? 0x1000 : 0x8000;
  const ties = new Float32Array(1000);
  const tu = new Uint32Array(ties.buffer);
  for (let i = 0; i < ties.length; i++) {
    ties[i] = uniform(-1000, 1000);
    tu[i] = (tu[i]! & ~(2 * tieBit - 1)) | tieBit; // exactly halfway between two neighbours
  }
  const out = new Float32Array(base.length + ties.length);
  out.set(base);
  out.set(ties, base.length);
  return out;
}

/** Same value, treating NaN as equal to NaN and distinguishing -0 from +0. */
function sameValues(got: Float32Array, ref: number[], what: string): void {
  for (let i = 0; i < ref.length; i++) {
    if (!Object.is(got[i], ref[i])) {
      expect(got[i], ctx(`${what}: element ${i}`)).toBe(ref[i]);
    }
  }
}

describe.each(BACKENDS)('Tensor on %s', (backend) => {
  describe('Runtime.tensor', () => {
    test.each([
      ['fp32', 4],
      ['fp16', 2],
      ['bf16', 2],
    ] as [DType, number][])('%s: shape, dtype, numel, byteLength', (dtype, bytes) => {
      const t = runtimeFor(backend).tensor([3, 5, 7], dtype);
      expect(t.shape).toEqual([3, 5, 7]);
      expect(t.dtype).toBe(dtype);
      expect(t.numel).toBe(105);
      expect(t.byteLength).toBe(105 * bytes);
      expect(t.disposed).toBe(false);
      t.dispose();
    });
  });

  describe('Tensor.write / readSync', () => {
    test('fp32 round trip is exact, specials included', () => {
      const data = randnArray(1000);
      data.set([0, -0, Infinity, -Infinity, NaN, 1.401298464324817e-45, 3.4028234663852886e38], 0);
      const t = runtimeFor(backend).fromArray(data, [10, 100], 'fp32');
      sameValues(t.readSync(), Array.from(data), 'fp32 round trip');
      t.dispose();
    });

    test.each(['fp16', 'bf16'] as const)('%s: Float32Array writes round to nearest even', (dtype) => {
      const data = roundingInputs(dtype);
      const t = runtimeFor(backend).tensor([data.length], dtype);
      t.write(data);
      const ref = Array.from(data, (x) => bitsToNumber(numberToBits(x, dtype), dtype));
      sameValues(t.readSync(), ref, `${dtype} conversion`);
      t.dispose();
    });

    test.each(['fp16', 'bf16'] as const)('%s: raw Uint16Array writes store every bit pattern', (dtype) => {
      const bits = new Uint16Array(65536).map((_x, i) => i);
      const t = runtimeFor(backend).fromArray(bits, [256, 256], dtype);
      const got = t.readSync();
      for (let i = 0; i < 65536; i++) {
        const ref = bitsToNumber(i, dtype);
        if (!Object.is(got[i], ref) && !(Number.isNaN(ref) && Number.isNaN(got[i]))) {
          expect(got[i], `bit pattern 0x${i.toString(16)}`).toBe(ref);
        }
      }
      t.dispose();
    });

    test.each(DTYPES)('%s: a second write replaces all values', (dtype) => {
      const t = runtimeFor(backend).tensor([64], dtype);
      t.write(new Float32Array(64).fill(NaN));
      t.write(new Float32Array(64).fill(0.5));
      expect(Array.from(t.readSync())).toEqual(new Array(64).fill(0.5));
      t.dispose();
    });

    test('an empty tensor reads as an empty array', () => {
      const t = runtimeFor(backend).tensor([0, 4], 'fp16');
      expect(t.numel).toBe(0);
      expect(t.readSync().length).toBe(0);
      t.dispose();
    });
  });

  describe('Tensor.read', () => {
    test.each(DTYPES)('%s: resolves to the same values as readSync', async (dtype) => {
      const t = runtimeFor(backend).fromArray(randnArray(333), [333], dtype);
      const a = await t.read();
      expect(Array.from(a)).toEqual(Array.from(t.readSync()));
      t.dispose();
    });
  });

  describe('Tensor.dispose', () => {
    test('is idempotent and makes later use fail with ERR_DISPOSED', () => {
      const t = runtimeFor(backend).tensor([4], 'fp32');
      t.dispose();
      t.dispose();
      expect(t.disposed).toBe(true);
      let err: unknown;
      try {
        t.readSync();
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(TrimKVError);
      expect((err as TrimKVError).code).toBe('ERR_DISPOSED');
      expect((err as TrimKVError).message).toMatch(/disposed/);
    });

    test('Symbol.dispose disposes', () => {
      const t = runtimeFor(backend).tensor([4], 'bf16');
      t[Symbol.dispose]();
      expect(t.disposed).toBe(true);
    });

    test('Runtime.dispose disposes the tensors it created', () => {
      const rt = openRuntime(backend);
      const t = rt.tensor([4], 'fp16');
      rt.dispose();
      expect(t.disposed).toBe(true);
    });
  });
});
