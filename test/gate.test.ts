/**
 * RetentionGate against the float64 oracle (SPEC section 3): every kind x activation x dtype,
 * lam written in full (poisoned output). lam is float32 storage computed in float32 from inputs
 * the oracle sees exactly, so the float32 tolerance applies (SPEC section 8).
 */
import { describe, expect, test } from 'vitest';
import type { Activation, DType, GateKind, GateSpec, WeightInput } from '../lib/types.js';
import { backendsUnderTest, cudaAvailable, cudaSkipReason } from './backends.js';
import { runtimeFor, tensorOf } from './harness.js';
import { ctx, poison, quantize, randnArray, relError, TOL_FP32, uniform } from './helpers.js';
import { gateForward } from './oracle.js';

const BACKENDS = backendsUnderTest();
const KINDS: GateKind[] = ['rg', 'rg2', 'rg3'];
const ACTS: Activation[] = ['silu', 'swish', 'gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu'];
const DT: DType[] = ['fp32', 'fp16', 'bf16'];

/** A weight of `n` normal values times `scale`, stored as `dtype` (plain Float32Array for fp32 when `plain`). */
function weight(n: number, shape: number[], dtype: DType, scale: number, plain = false): WeightInput {
  const q = quantize(randnArray(n, scale), dtype);
  if (dtype === 'fp32' && plain) return q.data as Float32Array;
  return { dtype, shape, data: q.data };
}

/** A random gate: z spreads over roughly [-5, 7] so lam covers both tails of logsigmoid. */
export function randomGateSpec(kind: GateKind, activation: Activation, dtype: DType, dims: { inputSize: number; intermediateSize: number; kvHeads: number }, plain = false): GateSpec {
  const { inputSize: In, intermediateSize: I, kvHeads: H } = dims;
  const bias = quantize(Float32Array.from({ length: H }, () => uniform(-2, 4)), dtype);
  const biasW: WeightInput = dtype === 'fp32' && plain ? (bias.data as Float32Array) : { dtype, shape: [H], data: bias.data };
  const weights =
    kind === 'rg3'
      ? {
          gateProj: weight(I * In, [I, In], dtype, 1 / Math.sqrt(In), plain),
          upProj: weight(I * In, [I, In], dtype, 1 / Math.sqrt(In), plain),
          downProj: weight(H * I, [H, I], dtype, 2 / Math.sqrt(I), plain),
          bias: biasW,
        }
      : {
          linear1Weight: weight(I * In, [I, In], dtype, 1 / Math.sqrt(In), plain),
          linear1Bias: weight(I, [I], dtype, 0.5, plain),
          linear2Weight: weight(H * I, [H, I], dtype, 3 / Math.sqrt(I), plain),
          bias: biasW,
        };
  return { kind, activation, inputSize: In, intermediateSize: I, kvHeads: H, weights };
}

interface GateCase {
  kind: GateKind;
  activation: Activation;
  dtype: DType;
}
const cases: GateCase[] = [];
for (const kind of KINDS) for (const activation of ACTS) for (const dtype of DT) cases.push({ kind, activation, dtype });

/** rg: a hidden state of Dm = 48; rg2 / rg3: [k_0; v_0; k_1; v_1] with Hkv = 2, D = 16. */
function dimsOf(kind: GateKind) {
  return kind === 'rg' ? { inputSize: 48, intermediateSize: 32, kvHeads: 4 } : { inputSize: 2 * 2 * 16, intermediateSize: 40, kvHeads: 2 };
}

describe.each(BACKENDS)('RetentionGate on %s', (backend) => {
  describe('run', () => {
    test.each(cases)('$kind $activation, weights and x in $dtype', ({ kind, activation, dtype }) => {
      const rt = runtimeFor(backend);
      const spec = randomGateSpec(kind, activation, dtype, dimsOf(kind), true);
      const gate = rt.createGate(spec);
      expect(gate.kind).toBe(kind);
      expect(gate.inputSize).toBe(spec.inputSize);
      expect(gate.kvHeads).toBe(spec.kvHeads);
      for (const n of [1, 7]) {
        const x = quantize(randnArray(n * spec.inputSize), dtype);
        const xt = tensorOf(rt, [n, spec.inputSize], dtype, x.data);
        const lam = rt.tensor([n, spec.kvHeads], 'fp32');
        poison(lam);
        gate.run(xt, lam);
        const got = lam.readSync();
        const ref = gateForward(spec, x.values, n);
        const err = relError(got, ref);
        expect(err, ctx(`${kind} ${activation} ${dtype} n=${n}: relative error ${err}`)).toBeLessThanOrEqual(TOL_FP32);
        expect(Array.from(got).every((l) => l <= 0), ctx('lam <= 0')).toBe(true);
        xt.dispose();
        lam.dispose();
      }
      gate.dispose();
    });

    // Decode sizes with an intermediate size that is not a multiple of the blocks' rows: on CUDA
    // the rows kernel (rg3, 16-bit, up to 4 tokens) and the one-pass kernel (otherwise).
    test.each([
      { kind: 'rg3' as GateKind, dtype: 'bf16' as DType },
      { kind: 'rg3' as GateKind, dtype: 'fp16' as DType },
      { kind: 'rg' as GateKind, dtype: 'bf16' as DType },
    ])('decode sizes: $kind $dtype, 1 to 8 tokens, intermediate size 520', ({ kind, dtype }) => {
      const rt = runtimeFor(backend);
      const dims = kind === 'rg' ? { inputSize: 384, intermediateSize: 520, kvHeads: 8 } : { inputSize: 2 * 2 * 64, intermediateSize: 520, kvHeads: 2 };
      const spec = randomGateSpec(kind, 'silu', dtype, dims);
      const gate = rt.createGate(spec);
      for (const n of [1, 2, 4, 5, 8]) {
        const x = quantize(randnArray(n * spec.inputSize), dtype);
        const xt = tensorOf(rt, [n, spec.inputSize], dtype, x.data);
        const lam = rt.tensor([n, spec.kvHeads], 'fp32');
        poison(lam);
        gate.run(xt, lam);
        const err = relError(lam.readSync(), gateForward(spec, x.values, n));
        expect(err, ctx(`${kind} ${dtype} n=${n}: relative error ${err}`)).toBeLessThanOrEqual(TOL_FP32);
        xt.dispose();
        lam.dispose();
      }
      gate.dispose();
    });

    test.each(DT)('weights given as fp32 WeightArray, x in %s (the x dtype is independent of the weights)', (xDtype) => {
      const rt = runtimeFor(backend);
      const spec = randomGateSpec('rg', 'silu', 'fp32', { inputSize: 64, intermediateSize: 48, kvHeads: 8 });
      const gate = rt.createGate(spec);
      const x = quantize(randnArray(5 * 64), xDtype);
      const xt = tensorOf(rt, [5, 64], xDtype, x.data);
      const lam = rt.tensor([5, 8], 'fp32');
      poison(lam);
      gate.run(xt, lam);
      const err = relError(lam.readSync(), gateForward(spec, x.values, 5));
      expect(err, ctx(`relative error ${err}`)).toBeLessThanOrEqual(TOL_FP32);
      gate.dispose();
      xt.dispose();
      lam.dispose();
    });

    test('reference-sized gate: I = 512, Dm = 256, Hkv = 8, bf16 weights, 33 tokens', () => {
      const rt = runtimeFor(backend);
      const spec = randomGateSpec('rg', 'silu', 'bf16', { inputSize: 256, intermediateSize: 512, kvHeads: 8 });
      const gate = rt.createGate(spec);
      const x = quantize(randnArray(33 * 256), 'bf16');
      const xt = tensorOf(rt, [33, 256], 'bf16', x.data);
      const lam = rt.tensor([33, 8], 'fp32');
      poison(lam);
      gate.run(xt, lam);
      const err = relError(lam.readSync(), gateForward(spec, x.values, 33));
      expect(err, ctx(`relative error ${err}`)).toBeLessThanOrEqual(TOL_FP32);
      gate.dispose();
      xt.dispose();
      lam.dispose();
    });

    test('the initial bias b = 10 gives beta close to 1 (lam = logsigmoid(10) with zero weights)', () => {
      const rt = runtimeFor(backend);
      const spec = randomGateSpec('rg', 'silu', 'fp32', { inputSize: 8, intermediateSize: 4, kvHeads: 2 });
      const w = spec.weights as { linear2Weight: WeightInput; bias: WeightInput };
      w.linear2Weight = new Float32Array(8);
      w.bias = Float32Array.from([10, 10]);
      const gate = rt.createGate(spec);
      const xt = tensorOf(rt, [1, 8], 'fp32', randnArray(8));
      const lam = rt.tensor([1, 2], 'fp32');
      poison(lam);
      gate.run(xt, lam);
      const ref = -Math.log1p(Math.exp(-10));
      expect(relError(lam.readSync(), [ref, ref])).toBeLessThanOrEqual(TOL_FP32);
      gate.dispose();
      xt.dispose();
      lam.dispose();
    });
  });

  describe('dispose', () => {
    test('marks the gate disposed', () => {
      const gate = runtimeFor(backend).createGate(randomGateSpec('rg3', 'relu', 'fp16', dimsOf('rg3')));
      gate.dispose();
      expect(gate.disposed).toBe(true);
    });
  });
});

describe.skipIf(!cudaAvailable)(`RetentionGate: cuda against cpu${cudaAvailable ? '' : ` (skipped: ${cudaSkipReason})`}`, () => {
  test.each(cases.filter((_c, i) => i % 2 === 0))('$kind $activation $dtype', ({ kind, activation, dtype }) => {
    const spec = randomGateSpec(kind, activation, dtype, dimsOf(kind));
    const x = quantize(randnArray(9 * spec.inputSize), dtype);
    const outs = (['cpu', 'cuda'] as const).map((b) => {
      const rt = runtimeFor(b);
      const gate = rt.createGate(spec);
      const xt = tensorOf(rt, [9, spec.inputSize], dtype, x.data);
      const lam = rt.tensor([9, spec.kvHeads], 'fp32');
      poison(lam);
      gate.run(xt, lam);
      const r = lam.readSync();
      gate.dispose();
      xt.dispose();
      lam.dispose();
      return r;
    });
    expect(relError(outs[1]!, Float64Array.from(outs[0]!)), ctx('cuda vs cpu')).toBeLessThanOrEqual(TOL_FP32);
  });
});
