/**
 * Hostile input (issue 17): each defect found by fuzzing has its own test here. No input
 * aborts the process or throws anything but a TrimKVError with a documented code; sizes are
 * checked before anything is allocated; invalid arguments are refused, not reinterpreted;
 * small hostile checkpoints are refused fast and cheaply; a long-lived runtime stays flat.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { zipSync } from 'fflate';
import { afterAll, describe, expect, test } from 'vitest';
import {
  encodeSafetensors, loadCheckpoint, loadCheckpointSync, openRuntime, parseCheckpoint, readSafetensors, readTorchStateDict,
  TrimKVError, type ErrorCode,
} from '../lib/index.js';
import type { CacheConfig, WeightArray } from '../lib/types.js';

const tmpRoot = mkdtempSync(join(tmpdir(), 'trimkv-hostile-'));
afterAll(() => rmSync(tmpRoot, { recursive: true, force: true }));

function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  return undefined;
}

/** `fn` must throw a TrimKVError with `code` (and a message containing `message`). */
function expectError(fn: () => unknown, code: ErrorCode, message?: string): TrimKVError {
  const e = thrown(fn);
  expect(e, `expected a TrimKVError ${code}, got ${String(e)}`).toBeInstanceOf(TrimKVError);
  expect((e as TrimKVError).code).toBe(code);
  if (message !== undefined) expect((e as TrimKVError).message).toContain(message);
  return e as TrimKVError;
}

/** A cyclic array and one nested `depth` deep. */
function cyclic(): unknown[] {
  const a: unknown[] = [1];
  a.push(a);
  return a;
}
function deep(depth: number): unknown[] {
  let a: unknown[] = [1];
  for (let i = 0; i < depth; i++) a = [a];
  return a;
}

const CONFIG: CacheConfig = { layers: 1, batch: 2, qHeads: 2, kvHeads: 1, headDim: 8, memory: 4, dtype: 'fp32' };

function decodeInputs(rt: ReturnType<typeof openRuntime>, c: CacheConfig) {
  const { batch: B, qHeads: Hq, kvHeads: Hkv, headDim: D } = c;
  const dt = c.dtype ?? 'fp16';
  return {
    q: rt.fromArray(new Float32Array(B * Hq * D).fill(0.1), [B, Hq, D], dt),
    k: rt.fromArray(new Float32Array(B * Hkv * D).fill(0.2), [B, Hkv, D], dt),
    v: rt.fromArray(new Float32Array(B * Hkv * D).fill(0.3), [B, Hkv, D], dt),
    lam: rt.fromArray(new Float32Array(B * Hkv).fill(-0.1), [B, Hkv], 'fp32'),
    out: rt.tensor([B, Hq, D], dt),
  };
}

describe('1: a host copy that cannot be allocated', () => {
  test('readSync of a tensor larger than a typed array can hold throws ERR_OUT_OF_MEMORY', async () => {
    const rt = openRuntime('cpu');
    const t = rt.tensor([2 ** 33], 'fp16');
    expectError(() => t.readSync(), 'ERR_OUT_OF_MEMORY');
    await expect(t.read()).rejects.toMatchObject({ name: 'TrimKVError', code: 'ERR_OUT_OF_MEMORY' });
    rt.dispose();
  });
});

describe('2: sizes never wrap', () => {
  test.each([
    [[2 ** 32, 2 ** 32]],
    [[2 ** 21, 2 ** 21, 2 ** 21]],
    [[2 ** 40, 2]],
  ])('tensor(%j) is refused with ERR_RANGE', (shape) => {
    const rt = openRuntime('cpu');
    expectError(() => rt.tensor(shape, 'fp32'), 'ERR_RANGE', 'shape');
    rt.dispose();
  });

  test('a zero dimension makes any shape empty', () => {
    const rt = openRuntime('cpu');
    const t = rt.tensor([0, 2 ** 40, 2 ** 40], 'fp32');
    expect(t.numel).toBe(0);
    expect(t.readSync().length).toBe(0);
    rt.dispose();
  });
});

describe('3: invalid arguments are refused, not reinterpreted', () => {
  test('a hole in positions is refused', () => {
    const rt = openRuntime('cpu');
    const cache = rt.createCache(CONFIG);
    const io = decodeInputs(rt, CONFIG);
    // eslint-disable-next-line no-sparse-arrays
    expectError(() => cache.decode(0, { ...io, positions: [, 5] as number[] }), 'ERR_INVALID_ARGUMENT', 'positions[0]');
    expect(cache.seen(0)).toBe(0);
    expect(cache.seen(1)).toBe(0);
    rt.dispose();
  });

  test('a hole in prefillBatch chunks is refused', () => {
    const rt = openRuntime('cpu');
    const cache = rt.createCache(CONFIG);
    const q = rt.tensor([1, 2, 8], 'fp32');
    // eslint-disable-next-line no-sparse-arrays
    const chunks = [, { seq: 1, start: 0, length: 1 }] as { seq: number; start: number; length: number }[];
    expectError(() => cache.prefillBatch(0, { chunks, q, k: q, v: q, lam: q, out: q }), 'ERR_INVALID_ARGUMENT', 'chunks[0]');
    rt.dispose();
  });

  test.each([1e-46, 1e-39, 1e39])('scale %d outside float32 range is ERR_RANGE', (scale) => {
    const rt = openRuntime('cpu');
    expectError(() => rt.createCache({ ...CONFIG, scale }), 'ERR_RANGE', 'scale');
    rt.dispose();
  });
});

describe('4: errors are TrimKVErrors, quickly', () => {
  const rt = openRuntime('cpu');
  afterAll(() => rt.dispose());
  const cache = rt.createCache(CONFIG);

  test.each([
    ['cyclic', cyclic()],
    ['deeply nested', deep(100_000)],
  ])('a %s shape is ERR_INVALID_ARGUMENT', (_, shape) => {
    expectError(() => rt.tensor(shape as number[], 'fp32'), 'ERR_INVALID_ARGUMENT', 'shape[');
  });

  test.each([
    ['cyclic', cyclic()],
    ['deeply nested', deep(100_000)],
  ])('%s positions are refused', (_, p) => {
    const io = decodeInputs(rt, CONFIG);
    const e = thrown(() => cache.decode(0, { ...io, positions: p as number[] }));
    expect(e).toBeInstanceOf(TrimKVError);
    expect(['ERR_INVALID_ARGUMENT', 'ERR_SHAPE']).toContain((e as TrimKVError).code);
  });

  test('a cyclic chunks array is refused', () => {
    const q = rt.tensor([1, 2, 8], 'fp32');
    const chunks = cyclic();
    expectError(() => cache.prefillBatch(0, { chunks: chunks as never, q, k: q, v: q, lam: q, out: q }), 'ERR_INVALID_ARGUMENT');
  });

  test('positions of length 2^32 - 1 are refused at once', () => {
    const io = decodeInputs(rt, CONFIG);
    const t0 = performance.now();
    expectError(() => cache.decode(0, { ...io, positions: new Array(2 ** 32 - 1) }), 'ERR_SHAPE', 'positions');
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  test.each([
    ['{}', {}],
    ['{ shape: null }', { shape: null }],
    ['{ shape: 5 }', { shape: 5 }],
    ['null', null],
  ])('prefill with q %s is ERR_INVALID_ARGUMENT', (_, q) => {
    expectError(() => cache.prefill(0, { seq: 0, start: 0, q, k: q, v: q, lam: q, out: q } as never), 'ERR_INVALID_ARGUMENT', 'q');
  });

  test('a Proxy around a typed array is refused by write() and as positions', () => {
    const t = rt.tensor([2], 'fp32');
    expectError(() => t.write(new Proxy(new Float32Array(2), {})), 'ERR_INVALID_ARGUMENT', 'data');
    const io = decodeInputs(rt, CONFIG);
    expectError(() => cache.decode(0, { ...io, positions: new Proxy(new Int32Array(2), {}) }), 'ERR_INVALID_ARGUMENT', 'positions');
    expectError(() => rt.tensor(new Proxy([2], {}), 'fp32'), 'ERR_INVALID_ARGUMENT', 'shape');
  });

  test('a Proxy whose traps throw is still a TrimKVError', () => {
    const evil = new Proxy([1], { get() { throw new Error('boom'); }, getPrototypeOf() { throw new Error('boom'); } });
    expectError(() => rt.tensor(evil, 'fp32'), 'ERR_INVALID_ARGUMENT', 'shape');
    expectError(() => rt.tensor([evil as unknown as number], 'fp32'), 'ERR_INVALID_ARGUMENT', 'shape[0]');
  });

  test('a getter that throws, or a revoked Proxy, in any argument is an ERR_INVALID_ARGUMENT', () => {
    const boom = (o: object, key: string) => Object.defineProperty({ ...o }, key, { get() { throw new Error('boom'); }, enumerable: true });
    const io = decodeInputs(rt, CONFIG);
    const before = cache.inspect(0, 0, 0);
    for (const key of ['q', 'k', 'v', 'lam', 'out', 'positions']) {
      expectError(() => cache.decode(0, boom(io, key) as never), 'ERR_INVALID_ARGUMENT', `inputs.${key}`);
    }
    const holey = [0, 0];
    Object.defineProperty(holey, 1, { get() { throw new Error('boom'); } });
    expectError(() => cache.decode(0, { ...io, positions: holey }), 'ERR_INVALID_ARGUMENT', 'positions[1]');
    expectError(() => cache.prefill(0, boom({ seq: 0, start: 0 }, 'q') as never), 'ERR_INVALID_ARGUMENT', 'inputs.q');
    expectError(() => cache.prefillBatch(0, boom({}, 'chunks') as never), 'ERR_INVALID_ARGUMENT', 'inputs.chunks');
    expectError(() => cache.prefillBatch(0, { ...io, chunks: [boom({ seq: 0, start: 0 }, 'length')] } as never),
      'ERR_INVALID_ARGUMENT', 'chunks[0].length');
    expect(cache.inspect(0, 0, 0)).toEqual(before);
    expectError(() => rt.createCache(boom(CONFIG, 'memory') as CacheConfig), 'ERR_INVALID_ARGUMENT', 'config.memory');
    expectError(() => rt.createGate(boom({ kind: 'rg' }, 'weights') as never), 'ERR_INVALID_ARGUMENT', 'spec.weights');
    expectError(() => encodeSafetensors(boom({}, 'w') as never), 'ERR_INVALID_ARGUMENT', 'tensors.w');
    expectError(() => encodeSafetensors({}, boom({}, 'k') as never), 'ERR_INVALID_ARGUMENT', 'metadata.k');
    expectError(() => parseCheckpoint(boom({}, 'hidden_size') as never, new Uint8Array(8), 'pth'), 'ERR_INVALID_ARGUMENT', 'config.hidden_size');
    expectError(() => loadCheckpointSync(tmpRoot, boom({}, 'weights') as never), 'ERR_INVALID_ARGUMENT', 'options.weights');
    const { proxy, revoke } = Proxy.revocable([2], {});
    revoke();
    expectError(() => rt.tensor(proxy, 'fp32'), 'ERR_INVALID_ARGUMENT', 'shape');
    expectError(() => cache.decode(0, { ...io, positions: proxy }), 'ERR_INVALID_ARGUMENT', 'positions');
    expectError(() => cache.prefillBatch(0, { ...io, chunks: proxy } as never), 'ERR_INVALID_ARGUMENT', 'chunks');
  });

  test('a weight shape that is not an array of integers is refused', () => {
    const w = { dtype: 'fp32' as const, shape: cyclic() as number[], data: new Float32Array(4) };
    const spec = {
      kind: 'rg' as const, activation: 'silu' as const, inputSize: 2, intermediateSize: 2, kvHeads: 1,
      weights: { linear1Weight: w, linear1Bias: new Float32Array(2), linear2Weight: new Float32Array(2), bias: new Float32Array(1) },
    };
    expectError(() => rt.createGate(spec), 'ERR_INVALID_ARGUMENT', 'spec.weights.linear1Weight.shape');
  });

  test.each([
    ['loadCheckpointSync(dir, null)', () => loadCheckpointSync(tmpRoot, null as never)],
    ['loadCheckpointSync(dir, { weights: 5 })', () => loadCheckpointSync(tmpRoot, { weights: 5 as never })],
    ['loadCheckpointSync(null)', () => loadCheckpointSync(null as never)],
    ['parseCheckpoint(null, ...)', () => parseCheckpoint(null as never, new Uint8Array(8), 'pth')],
    ['parseCheckpoint(config, null, ...)', () => parseCheckpoint({}, null as never, 'pth')],
    ['parseCheckpoint(config, bytes, "zip")', () => parseCheckpoint({}, new Uint8Array(8), 'zip' as never)],
    ['readSafetensors(null)', () => readSafetensors(null as never, 'x')],
    ['readTorchStateDict(null)', () => readTorchStateDict(null as never, 'x')],
    ['encodeSafetensors(null)', () => encodeSafetensors(null as never)],
    ['encodeSafetensors({ a: null })', () => encodeSafetensors({ a: null as never })],
    ['encodeSafetensors({ a: { shape: cyclic } })', () => encodeSafetensors({ a: { dtype: 'fp32', shape: cyclic() as never, data: new Float32Array(1) } })],
  ])('%s is ERR_INVALID_ARGUMENT', (_, fn) => {
    expectError(fn, 'ERR_INVALID_ARGUMENT');
  });

  test('loadCheckpoint(dir, null) rejects with ERR_INVALID_ARGUMENT', async () => {
    await expect(loadCheckpoint(tmpRoot, null as never)).rejects.toMatchObject({ name: 'TrimKVError', code: 'ERR_INVALID_ARGUMENT' });
  });

  test('a config.json field nested 100,000 deep is ERR_CHECKPOINT_CONFIG', () => {
    const config = { retention_gate: 'rg', hidden_act: deep(100_000) };
    expectError(() => parseCheckpoint(config, new Uint8Array(8), 'pth'), 'ERR_CHECKPOINT_CONFIG', 'hidden_act');
    const dir = mkdtempSync(join(tmpRoot, 'deep-'));
    writeFileSync(join(dir, 'config.json'), `{"hidden_act": ${'['.repeat(100_000)}${']'.repeat(100_000)}}`);
    writeFileSync(join(dir, 'trimkv_weights.pth'), new Uint8Array(8));
    expectError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_CONFIG');
  });
});

// ---------------------------------------------------------------------------------------------
// Hostile .pth files
// ---------------------------------------------------------------------------------------------

/** Opcodes torch.save uses, enough for a state dict of strided tensor views. */
class Pickle {
  readonly out: number[] = [0x80, 2];
  op(...b: number[]): this {
    for (const x of b) this.out.push(x);
    return this;
  }
  str(s: string): this {
    const b = Buffer.from(s);
    return this.op(0x58, b.length & 0xff, (b.length >> 8) & 0xff, 0, 0, ...b);
  }
  global(m: string, n: string): this {
    return this.op(0x63, ...Buffer.from(`${m}\n${n}\n`));
  }
  int(n: number): this {
    return this.op(0x4a, n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >>> 24) & 0xff);
  }
  tuple(v: number[]): this {
    this.op(0x28);
    for (const x of v) this.int(x);
    return this.op(0x74);
  }
  tensor(key: string, storage: string, numel: number, shape: number[], stride: number[]): this {
    this.str(key).global('torch._utils', '_rebuild_tensor_v2').op(0x28);
    this.op(0x28).str('storage').global('torch', 'FloatStorage').str(storage).str('cpu').int(numel).op(0x74, 0x51);
    this.int(0).tuple(shape).tuple(stride).op(0x89).op(0x7d).op(0x74, 0x52);
    return this;
  }
  bytes(): Uint8Array {
    return Uint8Array.from(this.out);
  }
}

function pth(pkl: Uint8Array, storages: Record<string, Uint8Array> = {}, level: 0 | 9 = 0): Uint8Array {
  const files: Record<string, [Uint8Array, { level: 0 | 9 }]> = { 'archive/data.pkl': [pkl, { level }] };
  for (const [k, b] of Object.entries(storages)) files[`archive/data/${k}`] = [b, { level }];
  return zipSync(files);
}

/** Runs `fn` and returns its wall time (ms) and RSS growth (bytes). */
function cost(fn: () => void): { ms: number; rss: number } {
  const rss0 = process.memoryUsage.rss();
  const t0 = performance.now();
  fn();
  return { ms: performance.now() - t0, rss: process.memoryUsage.rss() - rss0 };
}

describe('5: small hostile checkpoints are refused fast and cheaply', () => {
  test('a deflated run of MARK opcodes (22 KB) is ERR_CHECKPOINT_FORMAT within a second', () => {
    const pkl = new Uint8Array(22_000_000).fill(0x28);
    pkl[0] = 0x80;
    pkl[1] = 2;
    const file = pth(pkl, {}, 9);
    expect(file.length).toBeLessThan(64_000);
    const c = cost(() => expectError(() => readTorchStateDict(file, 'marks.pth'), 'ERR_CHECKPOINT_FORMAT'));
    expect(c.ms).toBeLessThan(1000);
    expect(c.rss).toBeLessThan(64 * 2 ** 20);
  });

  test('MARK nesting, stack and memo sizes are bounded in a stored (uncompressed) pickle', () => {
    for (const op of [0x28, 0x5d, 0x29]) {
      const body = new Uint8Array(2_000_000).fill(op);
      body[0] = 0x80;
      body[1] = 2;
      const c = cost(() => expectError(() => readTorchStateDict(pth(body), 'stack.pth'), 'ERR_CHECKPOINT_FORMAT'));
      expect(c.ms).toBeLessThan(1000);
    }
  });

  test('stride-0 views of a tiny storage inflated to [16384, 16384] are refused before allocation', () => {
    const S = 16_384;
    const key = (p: string) => `model.layers.0.self_attn.retention_gate.${p}`;
    const p = new Pickle().op(0x7d).op(0x28);
    p.tensor(key('linear1.weight'), '0', 1, [S, S], [0, 0]);
    p.tensor(key('linear1.bias'), '0', 1, [S], [0]);
    p.tensor(key('linear2.weight'), '0', 1, [1, S], [0, 0]);
    p.tensor(key('bias'), '0', 1, [1], [0]);
    p.op(0x75, 0x2e);
    const file = pth(p.bytes(), { '0': new Uint8Array(4) }, 9);
    expect(file.length).toBeLessThan(4096);
    const config = {
      retention_gate: 'rg', hidden_act: 'silu', num_hidden_layers: 1, hidden_size: S, num_attention_heads: 1,
      num_key_value_heads: 1, head_dim: S, retention_gate_intermediate_size: S,
    };
    const c = cost(() => expectError(() => parseCheckpoint(config, file, 'pth', 'stride0.pth'), 'ERR_CHECKPOINT_FORMAT', 'storage'));
    expect(c.ms).toBeLessThan(1000);
    expect(c.rss).toBeLessThan(64 * 2 ** 20);
  });

  test('a storage whose declared size disagrees with its archive entry is refused before inflating', () => {
    const key = (p: string) => `model.layers.0.self_attn.retention_gate.${p}`;
    const p = new Pickle().op(0x7d).op(0x28);
    p.tensor(key('linear1.weight'), '0', 2 ** 28, [2 ** 14, 2 ** 14], [2 ** 14, 1]);
    p.op(0x75, 0x2e);
    const sd = readTorchStateDict(pth(p.bytes(), { '0': new Uint8Array(4) }), 'declared.pth');
    expectError(() => sd.tensors([key('linear1.weight')]), 'ERR_CHECKPOINT_FORMAT', 'storage');
  });
});

describe('6: encodeSafetensors writes only what it can read back', () => {
  test.each([
    ['dtype int8', { a: { dtype: 'int8', shape: [2], data: new Uint16Array(2) } }, undefined, 'ERR_CHECKPOINT_DTYPE'],
    ['metadata { k: 5 }', { a: { dtype: 'fp32', shape: [1], data: new Float32Array(1) } }, { k: 5 }, 'ERR_INVALID_ARGUMENT'],
    ['fp16 data in a Uint8Array', { a: { dtype: 'fp16', shape: [2], data: new Uint8Array(2) } }, undefined, 'ERR_CHECKPOINT_SHAPE'],
    ['a tensor named __metadata__', { __metadata__: { dtype: 'fp32', shape: [1], data: new Float32Array(1) } }, undefined, 'ERR_INVALID_ARGUMENT'],
    ['a negative dimension', { a: { dtype: 'fp32', shape: [-1, -1], data: new Float32Array(1) } }, undefined, 'ERR_RANGE'],
  ])('%s is refused', (_, tensors, metadata, code) => {
    expectError(() => encodeSafetensors(tensors as never, metadata as never), code as ErrorCode);
  });

  test('what it writes reads back', () => {
    const w: WeightArray = { dtype: 'bf16', shape: [2, 1], data: Uint16Array.of(0x3f80, 0x4000) };
    const f = readSafetensors(encodeSafetensors({ w }, { format: 'pt' }), 'x.safetensors');
    expect(f.metadata).toEqual({ format: 'pt' });
    expect([...(f.tensors(['w']).get('w')!.data as Uint16Array)]).toEqual([0x3f80, 0x4000]);
  });
});

describe('7: a long-lived runtime does not keep what was disposed', () => {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;

  test('disposed tensors, gates and caches are collectable while the runtime lives', async () => {
    const rt = openRuntime('cpu');
    const refs: WeakRef<object>[] = [];
    // In a function of its own: the interpreter's registers would otherwise hold the last ones.
    const cycle = (): void => {
      const t = rt.tensor([4], 'fp32');
      const c = rt.createCache(CONFIG);
      const g = rt.createGate({
        kind: 'rg', activation: 'silu', inputSize: 2, intermediateSize: 2, kvHeads: 1,
        weights: { linear1Weight: new Float32Array(4), linear1Bias: new Float32Array(2), linear2Weight: new Float32Array(2), bias: new Float32Array(1) },
      });
      refs.push(new WeakRef(t), new WeakRef(c), new WeakRef(g));
      t.dispose();
      c.dispose();
      g[Symbol.dispose]();
    };
    for (let i = 0; i < 20; i++) cycle();
    await new Promise((r) => setTimeout(r, 0));
    gc();
    expect(refs.filter((r) => r.deref() !== undefined).map((r) => r.deref()!.constructor.name)).toEqual([]);
    // The runtime still disposes what is alive.
    const live = rt.tensor([4], 'fp32');
    rt.dispose();
    expect(live.disposed).toBe(true);
  });
});
