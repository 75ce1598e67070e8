/** The memory-bounded KV cache of TRIM-KV for a batch of sequences (SPEC sections 4-7). */
import { native, TrimKVError } from './errors.js';
import { BACKEND_INDEX, loadAddon, type NativeCacheHandle } from './native.js';
import { DTYPES, MAX_HEAD_DIM, SCOPES, STRATEGIES } from './constants.js';
import { expectTensor } from './tensor.js';
import type { BackendName, CacheConfig, DecodeInputs, DType, HeadSnapshot, PrefillBatchInputs, PrefillChunk, PrefillInputs } from './types.js';
import { integerIn, invalid, numberIn, oneOf } from './validate.js';

/** A cache configuration with every default filled in (`threshold: null` = none). */
export type ResolvedCacheConfig = Readonly<Required<Omit<CacheConfig, 'threshold'>> & { threshold: number | null }>;

/** Validates a configuration and fills in the defaults. @throws {TrimKVError} */
export function resolveCacheConfig(config: CacheConfig): ResolvedCacheConfig {
  if (config === null || typeof config !== 'object') invalid('a CacheConfig object', 'config', config);
  const c = config;
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
  const scale = c.scale === undefined ? 1 / Math.sqrt(headDim) : numberIn(c.scale, 'scale', 0, Number.MAX_VALUE, { minOpen: true });
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
  const c = resolveCacheConfig(config as CacheConfig);
  if (backend === 'cpu') return null;
  const r = native(() => loadAddon().cacheSupport(BACKEND_INDEX[backend], c));
  return r.ok ? null : (r.reason ?? 'unsupported');
}

export class KVCache {
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
    if (inputs === null || typeof inputs !== 'object') invalid('a DecodeInputs object', 'inputs', inputs);
    const { batch: B, dtype } = this.config;
    const [qShape, kvShape, lamShape] = this.#decodeShapes;
    const q = expectTensor(inputs.q, 'q', this.backend, dtype, qShape);
    const k = expectTensor(inputs.k, 'k', this.backend, dtype, kvShape);
    const v = expectTensor(inputs.v, 'v', this.backend, dtype, kvShape);
    const lam = expectTensor(inputs.lam, 'lam', this.backend, 'fp32', lamShape);
    const out = expectTensor(inputs.out, 'out', this.backend, dtype, qShape);
    const p = inputs.positions;
    if (!(p instanceof Int32Array) && !Array.isArray(p)) invalid('an Int32Array or number[]', 'positions', p);
    if (p.length !== B) invalid(`${B} positions`, 'positions', p, 'ERR_SHAPE');
    const positions = p instanceof Int32Array ? p : Int32Array.from(p.map((x, i) => integerIn(x, `positions[${i}]`, -1, 2 ** 31 - 2)));
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
    if (inputs === null || typeof inputs !== 'object') invalid('a PrefillInputs object', 'inputs', inputs);
    const q0 = inputs.q;
    const C = q0 && typeof q0 === 'object' && 'shape' in q0 ? (q0.shape[0] ?? 0) : 0;
    if (C < 1) invalid('a q tensor of shape [C >= 1, qHeads, headDim]', 'q', q0, 'ERR_SHAPE');
    const seq = integerIn(inputs.seq, 'seq', 0, this.config.batch - 1);
    const start = integerIn(inputs.start, 'start', 0, 2 ** 31 - 2);
    this.#prefill(layer, Int32Array.of(seq, start, C), C, inputs);
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
    if (inputs === null || typeof inputs !== 'object') invalid('a PrefillBatchInputs object', 'inputs', inputs);
    const list = inputs.chunks;
    if (!Array.isArray(list) || list.length < 1 || list.length > this.config.batch) {
      invalid(`an array of 1 to ${this.config.batch} chunks`, 'chunks', list);
    }
    const triples = new Int32Array(3 * list.length);
    let total = 0;
    list.forEach((c: PrefillChunk, i: number) => {
      if (c === null || typeof c !== 'object') invalid('a { seq, start, length } object', `chunks[${i}]`, c);
      triples[3 * i] = integerIn(c.seq, `chunks[${i}].seq`, 0, this.config.batch - 1);
      triples[3 * i + 1] = integerIn(c.start, `chunks[${i}].start`, 0, 2 ** 31 - 2);
      triples[3 * i + 2] = integerIn(c.length, `chunks[${i}].length`, 1, 2 ** 24);
      total += triples[3 * i + 2]!;
    });
    this.#prefill(layer, triples, total, inputs);
  }

  #prefill(layer: number, chunks: Int32Array, N: number, inputs: PrefillInputs | PrefillBatchInputs): void {
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
    const per = 2 * headDim * (dtype === 'fp32' ? 4 : 2);
    let tokens = 0;
    for (let b = 0; b < batch; b++) tokens += this.seen(b);
    return tokens * layers * kvHeads * per;
  }

  dispose(): void {
    this.#handle?.dispose();
    this.#handle = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
