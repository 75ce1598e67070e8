/**
 * Every error code of lib/API.md, each failure case its own test: the error is a TrimKVError
 * with the code and a message that says what and where. A rejected cache call changes
 * nothing: lengths, inspect, seen and the output tensor are as before, and the next valid
 * step still matches the oracle.
 */
import { describe, expect, test } from 'vitest';
import { cacheSupport, gateSupport, openRuntime, TrimKVError, type ErrorCode, type KVCache, type Tensor } from '../lib/index.js';
import { fromNative } from '../lib/errors.js';
import { Tensor as TensorClass } from '../lib/tensor.js';
import type { BackendName, CacheConfig, DecodeInputs, DType, GateSpec, PrefillInputs } from '../lib/types.js';
import { backendsUnderTest, cudaAvailable } from './backends.js';
import { CachePair, ioTensors, makeInputs, runtimeFor } from './harness.js';
import { hasNaN } from './helpers.js';

const BACKENDS = backendsUnderTest();

/** Runs `fn`, which must throw a TrimKVError with `code` and a message matching `message`. */
function expectError(fn: () => unknown, code: ErrorCode, message: RegExp | string): TrimKVError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, 'expected the call to throw').toBeInstanceOf(TrimKVError);
  const e = err as TrimKVError;
  expect(e.code).toBe(code);
  if (typeof message === 'string') expect(e.message).toContain(message);
  else expect(e.message).toMatch(message);
  return e;
}

const CONFIG: CacheConfig = { layers: 2, batch: 2, qHeads: 4, kvHeads: 2, headDim: 64, memory: 4, buffer: 1, dtype: 'fp16' };

/** Everything the cache reports, for before/after comparison. */
function snapshot(cache: KVCache) {
  const { batch, layers, kvHeads } = cache.config;
  const heads: unknown[] = [];
  for (let s = 0; s < batch; s++)
    for (let l = 0; l < layers; l++)
      for (let h = 0; h < kvHeads; h++) {
        const x = cache.inspect(s, l, h);
        heads.push([Array.from(x.positions), Array.from(x.scores)]);
      }
  return { lengths: Array.from(cache.lengths()), seen: Array.from({ length: batch }, (_v, s) => cache.seen(s)), heads };
}

/** A cache with some history: a prompt on slot 0, a shorter one on slot 1, a few decode steps. */
function warmPair(backend: BackendName, config: CacheConfig = CONFIG): CachePair {
  const pair = new CachePair(runtimeFor(backend), config);
  pair.prefillChunk(0, 0, 7);
  pair.prefillChunk(1, 0, 3);
  for (let i = 0; i < 3; i++) pair.decodeStep([pair.oracle.seen(0), pair.oracle.seen(1)]);
  return pair;
}

/** Valid decode tensors for `pair` (random data, poisoned out). */
function decodeInputs(pair: CachePair, dtype: DType = pair.dtype): DecodeInputs & { all: Tensor[] } {
  const { batch: B, qHeads: Hq, kvHeads: Hkv, headDim: D } = pair.cfg;
  const rt = pair.rt;
  const { q, k, v, lam, out } = ioTensors(rt, B, Hq, Hkv, D, dtype, makeInputs(B, Hq, Hkv, D, dtype, 0));
  return { q, k, v, lam, out, positions: [pair.oracle.seen(0), pair.oracle.seen(1)], all: [q, k, v, lam, out] };
}

/** Valid prefill tensors of C tokens. */
function prefillInputs(pair: CachePair, seq: number, start: number, C: number): PrefillInputs & { all: Tensor[] } {
  const { qHeads: Hq, kvHeads: Hkv, headDim: D } = pair.cfg;
  const rt = pair.rt;
  const { q, k, v, lam, out } = ioTensors(rt, C, Hq, Hkv, D, pair.dtype, makeInputs(C, Hq, Hkv, D, pair.dtype, 0));
  return { seq, start, q, k, v, lam, out, all: [q, k, v, lam, out] };
}

/**
 * `fn` is rejected with `code` / `message`; the cache is as before (native snapshot and the
 * oracle), `out` was not written, and the next full decode step still matches the oracle.
 */
function expectRejected(pair: CachePair, fn: () => unknown, code: ErrorCode, message: RegExp | string, out?: Tensor) {
  const before = snapshot(pair.cache);
  expectError(fn, code, message);
  expect(snapshot(pair.cache)).toEqual(before);
  pair.checkState('after a rejected call');
  if (out && !out.disposed) expect(hasNaN(out.readSync()), 'a rejected call must not write out').toBe(true);
}

/** Finishes with one valid step, checked against the oracle. */
function stillWorks(pair: CachePair): void {
  pair.decodeStep([pair.oracle.seen(0), pair.oracle.seen(1)]);
  pair.dispose();
}

describe.each(BACKENDS)('errors on %s', (backend) => {
  // -------------------------------------------------------------------------------------------
  describe('ERR_INVALID_ARGUMENT', () => {
    test('openRuntime with an unknown backend name', () => {
      expectError(() => openRuntime('tpu' as never), 'ERR_INVALID_ARGUMENT', `Expected one of 'auto', 'cpu', 'cuda' for backend but received "tpu"`);
    });

    test('createCache with an unknown strategy', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, strategy: 'beta' as never }), 'ERR_INVALID_ARGUMENT', `for strategy but received "beta"`);
    });

    test('createCache with an unknown scope', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, scope: 'world' as never }), 'ERR_INVALID_ARGUMENT', `Expected one of 'head', 'layer', 'global' for scope but received "world"`);
    });

    test('createCache with a non-integer layer count', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, layers: 1.5 }), 'ERR_INVALID_ARGUMENT', 'Expected an integer for layers but received 1.5');
    });

    test('createGate with an unknown activation', () => {
      const spec: GateSpec = {
        kind: 'rg',
        activation: 'tanh' as never,
        inputSize: 2,
        intermediateSize: 2,
        kvHeads: 1,
        weights: { linear1Weight: new Float32Array(4), linear1Bias: new Float32Array(2), linear2Weight: new Float32Array(2), bias: new Float32Array(1) },
      };
      expectError(() => runtimeFor(backend).createGate(spec), 'ERR_INVALID_ARGUMENT', /for spec\.activation but received "tanh"/);
    });

    test('Tensor.write with a plain array', () => {
      const t = runtimeFor(backend).tensor([2], 'fp32');
      expectError(() => t.write([1, 2] as never), 'ERR_INVALID_ARGUMENT', 'Expected a Float32Array or Uint16Array for data but received [1, 2]');
      t.dispose();
    });

    test('decode with something that is not a Tensor for q', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, q: new Float32Array(512) as never }), 'ERR_INVALID_ARGUMENT', /Expected a Tensor for q but received Float32Array/, inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('decode and gate.run with objects posing as Tensors', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      // instanceof accepts both; neither was made by a Runtime, so neither has a native tensor.
      const forged = Object.create(TensorClass.prototype) as Tensor;
      const copied = Object.setPrototypeOf({ ...inp.k, shape: inp.k.shape, dtype: inp.k.dtype, backend: inp.k.backend }, TensorClass.prototype) as Tensor;
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, k: forged }), 'ERR_INVALID_ARGUMENT', /Expected a Tensor for k but received an object posing as one/, inp.out);
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, v: copied }), 'ERR_INVALID_ARGUMENT', /Expected a Tensor for v but received an object posing as one/, inp.out);
      const rt = runtimeFor(backend);
      const gate = rt.createGate({ kind: 'rg', activation: 'silu', inputSize: 8, intermediateSize: 4, kvHeads: 1,
        weights: { linear1Weight: new Float32Array(32), linear1Bias: new Float32Array(4), linear2Weight: new Float32Array(4), bias: new Float32Array(1) } });
      const lam = rt.tensor([1, 1], 'fp32');
      expectError(() => gate.run(forged, lam), 'ERR_INVALID_ARGUMENT', /Expected a Tensor for x but received an object posing as one/);
      gate.dispose();
      lam.dispose();
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });
  });

  // -------------------------------------------------------------------------------------------
  describe('ERR_SHAPE', () => {
    test('decode with q of the wrong head dim', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      const q = pair.rt.tensor([2, 4, 32], 'fp16');
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, q }), 'ERR_SHAPE', /Expected shape \[2, 4, 64\] for q but received "?shape \[2, 4, 32\]"?$/, inp.out);
      q.dispose();
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('decode with one position per slot missing', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, positions: Int32Array.from([pair.oracle.seen(0)]) }), 'ERR_SHAPE', /Expected 2 positions for positions but received Int32Array\(1\)/, inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('prefill with k of fewer rows than q', () => {
      const pair = warmPair(backend);
      const inp = prefillInputs(pair, 1, pair.oracle.seen(1), 4);
      const k = pair.rt.tensor([3, 2, 64], 'fp16');
      expectRejected(pair, () => pair.cache.prefill(0, { ...inp, k }), 'ERR_SHAPE', /Expected shape \[4, 2, 64\] for k but received "?shape \[3, 2, 64\]"?$/, inp.out);
      k.dispose();
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('Tensor.write with the wrong number of values', () => {
      const t = runtimeFor(backend).fromArray(Float32Array.from([1, 2, 3, 4, 5, 6]), [2, 3], 'bf16');
      expectError(() => t.write(new Float32Array(5)), 'ERR_SHAPE', 'Expected 6 values (shape [2, 3]) for data but received Float32Array(5)');
      expect(Array.from(t.readSync()), 'a rejected write changes nothing').toEqual([1, 2, 3, 4, 5, 6]);
      t.dispose();
    });

    test('RetentionGate.run with x of the wrong width', () => {
      const rt = runtimeFor(backend);
      const gate = rt.createGate({
        kind: 'rg',
        activation: 'silu',
        inputSize: 8,
        intermediateSize: 2,
        kvHeads: 1,
        weights: { linear1Weight: new Float32Array(16), linear1Bias: new Float32Array(2), linear2Weight: new Float32Array(2), bias: new Float32Array(1) },
      });
      const x = rt.tensor([3, 5], 'fp32');
      const lam = rt.tensor([3, 1], 'fp32');
      expectError(() => gate.run(x, lam), 'ERR_SHAPE', /^Expected shape \[n, 8\] for x but received "?shape \[3, 5\]"?$/);
      gate.dispose();
      x.dispose();
      lam.dispose();
    });
  });

  // -------------------------------------------------------------------------------------------
  describe('ERR_DTYPE', () => {
    test('decode with fp32 inputs into an fp16 cache', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      const bad = decodeInputs(pair, 'fp32');
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, q: bad.q }), 'ERR_DTYPE', /^Expected dtype fp16 for q but received "?fp32"?$/, inp.out);
      [...inp.all, ...bad.all].forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('decode with lam not in fp32', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      const lam = pair.rt.tensor([2, 2], 'fp16');
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, lam }), 'ERR_DTYPE', /^Expected dtype fp32 for lam but received "?fp16"?$/, inp.out);
      lam.dispose();
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('Tensor.write of raw 16-bit data into an fp32 tensor', () => {
      const t = runtimeFor(backend).tensor([4], 'fp32');
      expectError(() => t.write(new Uint16Array(4)), 'ERR_DTYPE', /Expected a Float32Array .* for data but received Uint16Array\(4\)/);
      t.dispose();
    });

    test('createGate with weights of mixed dtypes', () => {
      const spec: GateSpec = {
        kind: 'rg',
        activation: 'silu',
        inputSize: 2,
        intermediateSize: 2,
        kvHeads: 1,
        weights: {
          linear1Weight: { dtype: 'fp16', shape: [2, 2], data: new Uint16Array(4) },
          linear1Bias: new Float32Array(2),
          linear2Weight: new Float32Array(2),
          bias: new Float32Array(1),
        },
      };
      expectError(() => runtimeFor(backend).createGate(spec), 'ERR_DTYPE', /Expected dtype fp16 .* for spec\.weights\.linear1Bias but received fp32/);
    });
  });

  // -------------------------------------------------------------------------------------------
  describe('ERR_RANGE', () => {
    test('decode with layer >= layers', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      expectRejected(pair, () => pair.cache.decode(2, inp), 'ERR_RANGE', 'Expected an integer in [0, 1] for layer but received 2', inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('decode with a position the sequence has already seen', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      const seen = pair.oracle.seen(0);
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, positions: Int32Array.from([seen - 1, pair.oracle.seen(1)]) }), 'ERR_RANGE', `position ${seen - 1} of sequence 0 is not new: the sequence has already seen ${seen} tokens`, inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('decode with a position below -1', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      expectRejected(pair, () => pair.cache.decode(0, { ...inp, positions: [-2, pair.oracle.seen(1)] }), 'ERR_RANGE', 'Expected an integer in [-1, 2147483646] for positions[0] but received -2', inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('prefill starting before the end of the sequence', () => {
      const pair = warmPair(backend);
      const inp = prefillInputs(pair, 0, 2, 3);
      expectRejected(pair, () => pair.cache.prefill(0, inp), 'ERR_RANGE', `start 2 of sequence 0 is not new: the sequence has already seen ${pair.oracle.seen(0)} tokens`, inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('prefill of a sequence slot >= batch', () => {
      const pair = warmPair(backend);
      const inp = prefillInputs(pair, 2, 0, 3);
      expectRejected(pair, () => pair.cache.prefill(0, inp), 'ERR_RANGE', 'Expected an integer in [0, 1] for seq but received 2', inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    // Varlen prefill (prefillBatch): the packed inputs of N rows for the given chunks.
    const batchInputs = (pair: CachePair, chunks: { seq: number; start: number; length: number }[], rows?: number) => {
      const N = rows ?? chunks.reduce((n, c) => n + c.length, 0);
      const { seq: _s, start: _t, ...inp } = prefillInputs(pair, 0, 0, N);
      return { ...inp, chunks };
    };

    test('prefillBatch naming a sequence twice', () => {
      const pair = warmPair(backend);
      const s0 = pair.oracle.seen(0);
      const inp = batchInputs(pair, [{ seq: 0, start: s0, length: 3 }, { seq: 0, start: s0 + 3, length: 2 }]);
      expectRejected(pair, () => pair.cache.prefillBatch(0, inp), 'ERR_INVALID_ARGUMENT', 'sequence 0 has two chunks in one prefill call', inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('prefillBatch whose chunk lengths do not add up to the rows of q', () => {
      const pair = warmPair(backend);
      const inp = batchInputs(pair, [{ seq: 0, start: pair.oracle.seen(0), length: 3 }, { seq: 1, start: pair.oracle.seen(1), length: 2 }], 4);
      expectRejected(pair, () => pair.cache.prefillBatch(0, inp), 'ERR_SHAPE', /Expected shape \[5, 4, 64\] for q but received "?shape \[4, 4, 64\]"?$/, inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('prefillBatch with no chunks, or a chunk of length 0', () => {
      const pair = warmPair(backend);
      const inp = batchInputs(pair, [], 1);
      expectRejected(pair, () => pair.cache.prefillBatch(0, inp), 'ERR_INVALID_ARGUMENT', 'Expected an array of 1 to 2 chunks for chunks', inp.out);
      const zero = { ...inp, chunks: [{ seq: 0, start: pair.oracle.seen(0), length: 0 }] };
      expectRejected(pair, () => pair.cache.prefillBatch(0, zero), 'ERR_RANGE', 'Expected an integer in [1, 16777216] for chunks[0].length but received 0', inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('prefillBatch of layer 1 with other chunks than layer 0', () => {
      const pair = warmPair(backend);
      const chunks = [{ seq: 0, start: pair.oracle.seen(0), length: 3 }, { seq: 1, start: pair.oracle.seen(1), length: 2 }];
      const l0 = batchInputs(pair, chunks);
      pair.cache.prefillBatch(0, l0);
      const other = batchInputs(pair, [chunks[0]!, { ...chunks[1]!, length: 3 }]);
      expectError(() => pair.cache.prefillBatch(1, other), 'ERR_STATE', 'prefill chunks differ from those of layer 0 of this step');
      const l1 = batchInputs(pair, chunks);
      pair.cache.prefillBatch(1, l1);  // the step completes with the same chunks
      for (const t of [...l0.all, ...other.all, ...l1.all]) t.dispose();
    });

    test('inspect of a KV head >= kvHeads', () => {
      const pair = warmPair(backend);
      expectRejected(pair, () => pair.cache.inspect(0, 0, 2), 'ERR_RANGE', 'Expected an integer in [0, 1] for head but received 2');
      stillWorks(pair);
    });

    test('reset of a sequence slot >= batch', () => {
      const pair = warmPair(backend);
      expectRejected(pair, () => pair.cache.reset(5), 'ERR_RANGE', 'Expected an integer in [0, 1] for seq but received 5');
      stillWorks(pair);
    });

    test('createCache with memory < 1', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, memory: 0 }), 'ERR_RANGE', /Expected an integer in \[1, \d+\] for memory but received 0/);
    });

    test('createCache with qHeads not a multiple of kvHeads', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, qHeads: 3 }), 'ERR_RANGE', 'Expected a multiple of kvHeads (2) for qHeads but received 3');
    });

    test('createCache with floor = 1', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, scope: 'layer', floor: 1 }), 'ERR_RANGE', 'Expected a number in [0, 1) for floor but received 1');
    });

    test('createCache with threshold = 0', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, threshold: 0 }), 'ERR_RANGE', 'Expected a number in (0, 1] for threshold but received 0');
    });

    test('createCache with a negative window', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, window: -1 }), 'ERR_RANGE', /for window but received -1/);
    });
  });

  // -------------------------------------------------------------------------------------------
  describe('ERR_STATE', () => {
    test('decode of layer 1 before layer 0', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      expectRejected(pair, () => pair.cache.decode(1, inp), 'ERR_STATE', 'layer 1 called out of order: expected layer 0', inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('decode of layer 0 again while a step is in progress, then the step completes', () => {
      const pair = warmPair(backend);
      const positions = [pair.oracle.seen(0), pair.oracle.seen(1)];
      pair.runDecodeLayer(0, positions, makeInputs(2, 4, 2, 64, 'fp16', 0));
      const inp = decodeInputs(pair);
      expectError(() => pair.cache.decode(0, { ...inp, positions: positions.map((p) => p + 1) }), 'ERR_STATE', 'a step is in progress: layer 1 must be called next');
      expect(hasNaN(inp.out.readSync())).toBe(true);
      pair.runDecodeLayer(1, positions, makeInputs(2, 4, 2, 64, 'fp16', 1));
      pair.checkState('after the interrupted step completed');
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('decode of layer 1 with positions other than those of layer 0', () => {
      const pair = warmPair(backend);
      const positions = [pair.oracle.seen(0), pair.oracle.seen(1)];
      pair.runDecodeLayer(0, positions, makeInputs(2, 4, 2, 64, 'fp16', 0));
      const inp = decodeInputs(pair);
      expectError(() => pair.cache.decode(1, { ...inp, positions: [positions[0]!, -1] }), 'ERR_STATE', 'positions differ from those of layer 0 of this step');
      pair.runDecodeLayer(1, positions, makeInputs(2, 4, 2, 64, 'fp16', 1));
      pair.checkState('after the step completed');
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('prefill of layer 1 inside a decode step', () => {
      const pair = warmPair(backend);
      const positions = [pair.oracle.seen(0), pair.oracle.seen(1)];
      pair.runDecodeLayer(0, positions, makeInputs(2, 4, 2, 64, 'fp16', 0));
      const inp = prefillInputs(pair, 0, pair.oracle.seen(0), 2);
      expectError(() => pair.cache.prefill(1, inp), 'ERR_STATE', 'layer 1 of a decode step was called with prefill');
      pair.runDecodeLayer(1, positions, makeInputs(2, 4, 2, 64, 'fp16', 1));
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('reset while a step is in progress', () => {
      const pair = warmPair(backend);
      const positions = [pair.oracle.seen(0), pair.oracle.seen(1)];
      pair.runDecodeLayer(0, positions, makeInputs(2, 4, 2, 64, 'fp16', 0));
      const before = snapshot(pair.cache);
      expectError(() => pair.cache.reset(0), 'ERR_STATE', 'cannot reset a sequence while a step is in progress');
      expect(snapshot(pair.cache)).toEqual(before);
      pair.runDecodeLayer(1, positions, makeInputs(2, 4, 2, 64, 'fp16', 1));
      stillWorks(pair);
    });
  });

  // -------------------------------------------------------------------------------------------
  describe('ERR_DISPOSED', () => {
    test('decode on a disposed cache', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      pair.cache.dispose();
      expectError(() => pair.cache.decode(0, inp), 'ERR_DISPOSED', 'the KV cache has been disposed');
      expectError(() => pair.cache.seen(0), 'ERR_DISPOSED', 'the KV cache has been disposed');
      inp.all.forEach((t) => t.dispose());
    });

    test('decode with a disposed input tensor', () => {
      const pair = warmPair(backend);
      const inp = decodeInputs(pair);
      inp.v.dispose();
      expectRejected(pair, () => pair.cache.decode(0, inp), 'ERR_DISPOSED', 'v has been disposed', inp.out);
      inp.all.forEach((t) => t.dispose());
      stillWorks(pair);
    });

    test('run on a disposed gate', () => {
      const rt = runtimeFor(backend);
      const gate = rt.createGate({
        kind: 'rg',
        activation: 'relu',
        inputSize: 8,
        intermediateSize: 2,
        kvHeads: 1,
        weights: { linear1Weight: new Float32Array(16), linear1Bias: new Float32Array(2), linear2Weight: new Float32Array(2), bias: new Float32Array(1) },
      });
      const x = rt.tensor([1, 8], 'fp32');
      const lam = rt.tensor([1, 1], 'fp32');
      gate.dispose();
      expectError(() => gate.run(x, lam), 'ERR_DISPOSED', 'the retention gate has been disposed');
      x.dispose();
      lam.dispose();
    });

    test('tensor() on a disposed runtime', () => {
      const rt = openRuntime(backend);
      rt.dispose();
      expectError(() => rt.tensor([1], 'fp32'), 'ERR_DISPOSED', 'the runtime has been disposed');
    });
  });

  // -------------------------------------------------------------------------------------------
  describe('ERR_OUT_OF_MEMORY', () => {
    test('a 4 TiB tensor', () => {
      expectError(() => runtimeFor(backend).tensor([2 ** 20, 2 ** 20], 'fp32'), 'ERR_OUT_OF_MEMORY', /out of .*memory/);
    });

    test('a cache whose slots need terabytes', () => {
      expectError(() => runtimeFor(backend).createCache({ ...CONFIG, headDim: 256, memory: 2 ** 30, batch: 64 }), 'ERR_OUT_OF_MEMORY', /out of .*memory/);
    });
  });
});

describe.skipIf(!cudaAvailable)('ERR_INVALID_ARGUMENT across backends', () => {
  test('a cpu tensor handed to a cuda cache', () => {
    const cache = runtimeFor('cuda').createCache(CONFIG);
    const cpu = runtimeFor('cpu');
    const t = (shape: number[], dtype: DType) => cpu.tensor(shape, dtype);
    const inputs = { q: t([2, 4, 64], 'fp16'), k: t([2, 2, 64], 'fp16'), v: t([2, 2, 64], 'fp16'), lam: t([2, 2], 'fp32'), out: t([2, 4, 64], 'fp16'), positions: [0, 0] };
    expectError(() => cache.decode(0, inputs), 'ERR_INVALID_ARGUMENT', 'Expected a tensor on the cuda backend for q but received');
    expect(cache.seen(0)).toBe(0);
    cache.dispose();
  });
});

describe('ERR_BACKEND_UNAVAILABLE', () => {
  test.skipIf(cudaAvailable)("openRuntime('cuda') without a usable GPU", () => {
    expectError(() => openRuntime('cuda'), 'ERR_BACKEND_UNAVAILABLE', /^the CUDA backend is unavailable: .+/);
  });
});

describe('ERR_NATIVE', () => {
  // No public call fails natively on a healthy CPU backend (a CUDA error is the real case);
  // this pins the mapping every native call goes through.
  test('a native failure without a trimkv code becomes ERR_NATIVE with its message', () => {
    const e = fromNative(new Error('cudaErrorIllegalAddress: an illegal memory access was encountered'));
    expect(e).toBeInstanceOf(TrimKVError);
    expect(e.code).toBe('ERR_NATIVE');
    expect(e.message).toBe('cudaErrorIllegalAddress: an illegal memory access was encountered');
  });

  test('a native error with a code keeps it', () => {
    const e = fromNative(Object.assign(new Error('out of GPU memory allocating 8 bytes'), { code: 'ERR_OUT_OF_MEMORY' }));
    expect(e.code).toBe('ERR_OUT_OF_MEMORY');
  });
});

describe('ERR_UNSUPPORTED: valid configurations a backend cannot run', () => {
  test('cacheSupport names what the CUDA backend lacks and accepts everything on the CPU', () => {
    expect(cacheSupport('cpu', { ...CONFIG, scope: 'global', threshold: 0.5, headDim: 3 })).toBeNull();
    expect(cacheSupport('cuda', CONFIG)).toBeNull();
    expect(cacheSupport('cuda', { ...CONFIG, scope: 'layer', floor: 0.25, threshold: 0.5 })).toBeNull();
    expect(cacheSupport('cuda', { ...CONFIG, scope: 'global', layers: 128, kvHeads: 8, qHeads: 8 })).toBeNull();
    expect(cacheSupport('cuda', { ...CONFIG, scope: 'global', layers: 129, kvHeads: 8, qHeads: 8 })).toMatch(
      /scope 'global' on the CUDA backend pools at most 1024 heads per sequence \(layers x kvHeads\), got 1032/,
    );
    expect(cacheSupport('cuda', { ...CONFIG, headDim: 1024 })).toMatch(/headDim 1024 is not supported by the CUDA backend/);
    // Query-head groups: any up to 8 on tensor cores (fp16/bf16); fp32 needs one its lane groups divide.
    expect(cacheSupport('cuda', { ...CONFIG, qHeads: 6, kvHeads: 2, dtype: 'bf16' })).toBeNull();
    expect(cacheSupport('cuda', { ...CONFIG, qHeads: 16, kvHeads: 2, dtype: 'fp32' })).toBeNull();
    expect(cacheSupport('cuda', { ...CONFIG, qHeads: 6, kvHeads: 2, dtype: 'fp32' })).toMatch(
      /qHeads \/ kvHeads = 3 is not supported by the CUDA decode kernel for fp32 at headDim 64/);
    expect(cacheSupport('cuda', { ...CONFIG, qHeads: 24, kvHeads: 2, dtype: 'fp16', headDim: 128 })).toMatch(/= 12 is not supported/);
    expect(gateSupport('cuda', 12)).toMatch(/inputSize 12 is not supported by the CUDA gate/);
    expect(gateSupport('cpu', 12)).toBeNull();
  });

  test.skipIf(!cudaAvailable)('the CUDA backend refuses them with the reason', () => {
    const rt = runtimeFor('cuda');
    expectError(() => rt.createCache({ ...CONFIG, scope: 'global', layers: 129, kvHeads: 8, qHeads: 8 }), 'ERR_UNSUPPORTED',
      "scope 'global' on the CUDA backend pools at most 1024 heads");
    expectError(() => rt.createCache({ ...CONFIG, headDim: 12 }), 'ERR_UNSUPPORTED', 'headDim 12 is not supported by the CUDA backend');
    expectError(
      () => rt.createGate({ kind: 'rg', activation: 'silu', inputSize: 4, intermediateSize: 2, kvHeads: 1,
        weights: { linear1Weight: new Float32Array(8), linear1Bias: new Float32Array(2), linear2Weight: new Float32Array(2), bias: new Float32Array(1) } }),
      'ERR_UNSUPPORTED', 'inputSize 4 is not supported by the CUDA gate');
  });
});
