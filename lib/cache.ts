/** The memory-bounded KV cache of TRIM-KV for a batch of sequences (SPEC sections 4-7). */
import { native, TrimKVError } from './errors.js';
import { BACKEND_INDEX, loadAddon, type NativeCacheHandle } from './native.js';
import { DTYPE_BYTES, DTYPES, MAX_HEAD_DIM, SCOPES, STRATEGIES } from './constants.js';
import { checkTensor, expectTensor, released } from './tensor.js';
import { types } from 'node:util';
import type { BackendName, CacheConfig, DecodeInputs, DType, HeadSnapshot, PrefillBatchInputs, PrefillInputs } from './types.js';
import { argObject, arrayOf, integerIn, invalid, numberIn, oneOf } from './validate.js';

/** The smallest positive normal and the largest finite float32. */
const FLOAT32_MIN_NORMAL = 2 ** -126;
const FLOAT32_MAX = (2 - 2 ** -23) * 2 ** 127;

/** A cache configuration with every default filled in (`threshold: null` = none). */
export type ResolvedCacheConfig = Readonly<Required<Omit<CacheConfig, 'threshold'>> & { threshold: number | null }>;

/** Validates a configuration and fills in the defaults. @throws {TrimKVError} */
export function resolveCacheConfig(config: CacheConfig): ResolvedCacheConfig {
  const c = argObject(config, 'config', 'a CacheConfig object', ['layers', 'batch', 'qHeads', 'kvHeads', 'headDim', 'memory',
    'buffer', 'dtype', 'strategy', 'window', 'scope', 'floor', 'threshold', 'scale'] as const);
  const layers = integerIn(c.layers, 'layers', 1, 4096);
  const batch = integerIn(c.batch, 'batch', 1, 65536);
  const kvHeads = integerIn(c.kvHeads, 'kvHeads', 1, 1024);
  const qHeads = integerIn(c.qHeads, 'qHeads', 1, 65536);
  if (qHeads % kvHeads !== 0) invalid(`a multiple of kvHeads (${kvHeads})`, 'qHeads', qHeads, 'ERR_RANGE');
  const headDim = integerIn(c.headDim, 'headDim', 1, MAX_HEAD_DIM);
  const memory = integerIn(c.memory, 'memory', 1, 2 ** 30);
  const buffer = integerIn(c.buffer ?? 0, 'buffer', 0, 2 ** 30);
  const window = integerIn(c.window ?? 0, 'window', 0, 2 ** 31 - 1);
  const dtype = oneOf(c.dtype ?? 'fp16', 'dtype', DTYPES);
  const strategy = oneOf(c.strategy ?? 'alpha', 'strategy', STRATEGIES);
  const scope = oneOf(c.scope ?? 'head', 'scope', SCOPES);
  const floor = numberIn(c.floor ?? 0, 'floor', 0, 1, { maxOpen: true });
  const threshold = c.threshold === undefined || c.threshold === null
    ? null
    : numberIn(c.threshold, 'threshold', 0, 1, { minOpen: true });
  // The native side holds scale as a float32 (0 there means "the default"): a value outside
  // float32's normal range would silently become 0 or infinity, so it is refused.
  const scale = c.scale === undefined ? 1 / Math.sqrt(headDim) : numberIn(c.scale, 'scale', FLOAT32_MIN_NORMAL, FLOAT32_MAX);
  return Object.freeze({ layers, batch, qHeads, kvHeads, headDim, memory, buffer, dtype, strategy, window, scope, floor, threshold, scale });
}

/**
 * Why a backend cannot run a (valid) cache configuration, or null when it can. The CPU runs
 * every configuration; for CUDA the addon answers from the kernels' limits (the native support
 * query, csrc/ops/support.h): head dims that are multiples of 8 up to 256, the query groups the
 * decode kernels run, at most 1,024 pooled heads per sequence for scope 'global'.
 * @throws {TrimKVError} for an invalid configuration, as `resolveCacheConfig`
 */
export function cacheSupport(backend: BackendName, config: CacheConfig | ResolvedCacheConfig): string | null {
  oneOf(backend, 'backend', ['cpu', 'cuda'] as const);
  const c = resolveCacheConfig(config as CacheConfig);
  if (backend === 'cpu') return null;
  const r = native(() => loadAddon().cacheSupport(BACKEND_INDEX[backend], c));
  return r.ok ? null : (r.reason ?? 'unsupported');
}

let handleOfCache: (c: KVCache) => NativeCacheHandle;

/** @internal The native handle of a cache, for the model runner (lib/model/forward.ts). */
export function nativeCacheHandle(c: KVCache): NativeCacheHandle {
  return handleOfCache(c);
}

export class KVCache {
  static {
    handleOfCache = (c) => c.#h();
  }

  readonly config: ResolvedCacheConfig;
  readonly backend: BackendName;
  #handle: NativeCacheHandle | undefined;

  /** @internal Use `Runtime.createCache`. @throws {TrimKVError} */
  constructor(backend: BackendName, config: CacheConfig) {
    this.backend = backend;
    this.config = resolveCacheConfig(config);
    const unsupported = cacheSupport(backend, this.config);
    if (unsupported) throw new TrimKVError('ERR_UNSUPPORTED', unsupported);
    const cfg = { ...this.config, threshold: this.config.threshold ?? 0 };
    this.#handle = native(() => new (loadAddon().NativeCache)(BACKEND_INDEX[backend], cfg));
    const { batch: B, qHeads: Hq, kvHeads: Hkv, headDim: D } = this.config;
    this.#decodeShapes = [[B, Hq, D], [B, Hkv, D], [B, Hkv]];
  }

  /** The shapes decode expects of q / out, k / v and lam (built once: decode is the hot path). */
  readonly #decodeShapes: readonly [readonly number[], readonly number[], readonly number[]];

  get disposed(): boolean {
    return this.#handle === undefined;
  }

  #h(): NativeCacheHandle {
    if (!this.#handle) throw new TrimKVError('ERR_DISPOSED', 'the KV cache has been disposed');
    return this.#handle;
  }

  #layer(layer: unknown): number {
    return integerIn(layer, 'layer', 0, this.config.layers - 1);
  }

  /**
   * One decode step of one layer for every sequence slot: appends each active slot's new
   * token, attends over the cache, then evicts (SPEC section 5). Call layers 0..L-1 in order.
   * @throws {TrimKVError} ERR_SHAPE, ERR_DTYPE, ERR_RANGE (layer, positions), ERR_STATE (layer
   *   order), ERR_DISPOSED, ERR_NATIVE. A rejected call leaves the cache as it was.
   */
  decode(layer: number, inputs: DecodeInputs): void {
    const h = this.#h();
    const l = this.#layer(layer);
    const a = argObject(inputs, 'inputs', 'a DecodeInputs object', ['q', 'k', 'v', 'lam', 'out', 'positions'] as const);
    const { batch: B, dtype } = this.config;
    const [qShape, kvShape, lamShape] = this.#decodeShapes;
    const q = expectTensor(a.q, 'q', this.backend, dtype, qShape);
    const k = expectTensor(a.k, 'k', this.backend, dtype, kvShape);
    const v = expectTensor(a.v, 'v', this.backend, dtype, kvShape);
    const lam = expectTensor(a.lam, 'lam', this.backend, 'fp32', lamShape);
    const out = expectTensor(a.out, 'out', this.backend, dtype, qShape);
    const p: unknown = a.positions;
    let positions: Int32Array;
    if (types.isInt32Array(p)) {
      if (p.length !== B) invalid(`${B} positions`, 'positions', p, 'ERR_SHAPE');
      positions = p;
    } else {
      if (types.isProxy(p) || !Array.isArray(p)) invalid('an Int32Array or number[]', 'positions', p);
      // Index by index: a hole is undefined and refused (map would skip it and leave a 0).
      positions = Int32Array.from(
        arrayOf(p, 'positions', 'an Int32Array or number[]', (x, n) => integerIn(x, n, -1, 2 ** 31 - 2), { length: B, maxLength: B }),
      );
    }
    native(() => h.decode(l, q.handle('q'), k.handle('k'), v.handle('v'), lam.handle('lam'), out.handle('out'), positions));
  }

  /**
   * One prefill chunk of one sequence for one layer: the chunk attends to the cache and
   * causally to itself, then the cache is evicted down to its budget. Call layers in order.
   * @throws {TrimKVError} as `decode`.
   */
  prefill(layer: number, inputs: PrefillInputs): void {
    this.#h();
    this.#layer(layer);
    const a = argObject(inputs, 'inputs', 'a PrefillInputs object', ['q', 'k', 'v', 'lam', 'out', 'seq', 'start'] as const);
    const C = checkTensor(a.q, 'q', this.backend).shape[0] ?? 0;
    if (C < 1) invalid('a q tensor of shape [C >= 1, qHeads, headDim]', 'q', a.q, 'ERR_SHAPE');
    const seq = integerIn(a.seq, 'seq', 0, this.config.batch - 1);
    const start = integerIn(a.start, 'start', 0, 2 ** 31 - 2);
    this.#prefill(layer, Int32Array.of(seq, start, C), C, a);
  }

  /**
   * One prefill call over several sequences for one layer (varlen, for continuous batching):
   * each chunk attends to its own sequence's cache and causally to itself, then each sequence
   * is evicted as by `prefill`; on CUDA all chunks run in one launch per kernel. The chunks'
   * tokens are packed in `q`, `k`, `v`, `lam` and `out` one chunk after the other. Call layers
   * in order with the same chunks.
   * @throws {TrimKVError} as `prefill`; ERR_INVALID_ARGUMENT for a sequence named twice.
   */
  prefillBatch(layer: number, inputs: PrefillBatchInputs): void {
    this.#h();
    this.#layer(layer);
    const a = argObject(inputs, 'inputs', 'a PrefillBatchInputs object', ['chunks', 'q', 'k', 'v', 'lam', 'out'] as const);
    const list: unknown = a.chunks;
    const what = `an array of 1 to ${this.config.batch} chunks`;
    if (types.isProxy(list) || !Array.isArray(list) || list.length < 1 || list.length > this.config.batch) invalid(what, 'chunks', list);
    const chunks = arrayOf(list, 'chunks', what, (c, name) => {
      const { seq, start, length } = argObject(c, name, 'a { seq, start, length } object', ['seq', 'start', 'length'] as const);
      return [
        integerIn(seq, `${name}.seq`, 0, this.config.batch - 1),
        integerIn(start, `${name}.start`, 0, 2 ** 31 - 2),
        integerIn(length, `${name}.length`, 1, 2 ** 24),
      ];
    }, { maxLength: this.config.batch });
    const triples = Int32Array.from(chunks.flat());
    const total = chunks.reduce((a, c) => a + c[2]!, 0);
    this.#prefill(layer, triples, total, a);
  }

  #prefill(layer: number, chunks: Int32Array, N: number, inputs: { [K in 'q' | 'k' | 'v' | 'lam' | 'out']: unknown }): void {
    const h = this.#h();
    const l = this.#layer(layer);
    const { qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = this.config;
    const q = expectTensor(inputs.q, 'q', this.backend, dtype, [N, Hq, D]);
    const k = expectTensor(inputs.k, 'k', this.backend, dtype, [N, Hkv, D]);
    const v = expectTensor(inputs.v, 'v', this.backend, dtype, [N, Hkv, D]);
    const lam = expectTensor(inputs.lam, 'lam', this.backend, 'fp32', [N, Hkv]);
    const out = expectTensor(inputs.out, 'out', this.backend, dtype, [N, Hq, D]);
    native(() => h.prefill(l, chunks, q.handle('q'), k.handle('k'), v.handle('v'), lam.handle('lam'), out.handle('out')));
  }

  /** Empties a sequence slot for reuse (T = 0). @throws {TrimKVError} ERR_RANGE, ERR_STATE */
  reset(seq: number): void {
    const h = this.#h();
    const s = integerIn(seq, 'seq', 0, this.config.batch - 1);
    native(() => h.reset(s));
  }

  /** T: the number of tokens the sequence has processed (last position + 1). */
  seen(seq: number): number {
    const h = this.#h();
    const s = integerIn(seq, 'seq', 0, this.config.batch - 1);
    return native(() => h.seen(s));
  }

  /** Tokens held by one (sequence, layer, KV head). */
  length(seq: number, layer: number, head: number): number {
    const h = this.#h();
    const s = integerIn(seq, 'seq', 0, this.config.batch - 1);
    const hd = integerIn(head, 'head', 0, this.config.kvHeads - 1);
    return native(() => h.length(s, this.#layer(layer), hd));
  }

  /** Tokens held per (sequence, layer, KV head), laid out [batch, layers, kvHeads]. */
  lengths(): Int32Array {
    const h = this.#h();
    return native(() => h.lengths());
  }

  /**
   * The retained tokens of one head, sorted by position, with their decayed score at the
   * sequence's current T (the window rule is not folded into the scores).
   */
  inspect(seq: number, layer: number, head: number): HeadSnapshot {
    const h = this.#h();
    const s = integerIn(seq, 'seq', 0, this.config.batch - 1);
    const hd = integerIn(head, 'head', 0, this.config.kvHeads - 1);
    return native(() => h.inspect(s, this.#layer(layer), hd));
  }

  /** Bytes of K/V and per-token metadata held (`used`) and allocated (`reserved`). */
  memoryBytes(): { used: number; reserved: number } {
    const h = this.#h();
    return native(() => h.memoryBytes());
  }

  /** Bytes a full (unbounded) cache would hold for the same tokens seen. */
  fullCacheBytes(): number {
    const { batch, layers, kvHeads, headDim, dtype } = this.config;
    const per = 2 * headDim * DTYPE_BYTES[dtype];
    let tokens = 0;
    for (let b = 0; b < batch; b++) tokens += this.seen(b);
    return tokens * layers * kvHeads * per;
  }

  dispose(): void {
    this.#handle?.dispose();
    this.#handle = undefined;
    released(this);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
