/**
 * The native forward pass of a model directory (csrc/model/): the CPU reference of issue 15.
 * Loads config.json and the safetensors weights with the readers of this folder, uploads every
 * tensor the architecture uses, and runs tokens of one sequence, returning the fp32 logits of
 * the last position. Attention runs over a TRIM-KV `KVCache` (sequence slot 0) with one
 * `RetentionGate` per layer when given, else over a plain full cache inside the model (no
 * eviction). The CUDA backend reports `ERR_UNSUPPORTED`.
 *
 * Error codes (all `TrimKVError`): those of `loadModelConfig`, `openModelWeights` and
 * `checkModelTensors`; `ERR_UNSUPPORTED` for the cuda backend; `ERR_RANGE` for a start
 * position past the sequence, a token outside the vocabulary or a length past
 * `maxPositionEmbeddings`; `ERR_STATE` when a later call's `maxLength` would switch longrope's
 * factors mid-sequence, or (with a cache) a start other than 0 or the length; `ERR_SHAPE` /
 * `ERR_DTYPE` for a cache or gates that do not fit the model; `ERR_DISPOSED` after `dispose`.
 */
import { BACKEND_INDEX, loadAddon, type NativeModelHandle, type NativeTensorHandle } from '../native.js';
import { nativeCacheHandle, type KVCache } from '../cache.js';
import { nativeGateHandle, type RetentionGate } from '../gate.js';
import { native, TrimKVError } from '../errors.js';
import type { DType } from '../types.js';
import { invalid } from '../validate.js';
import { loadModelConfig, ropeAttentionScaling, ropeInvFreq, type ModelConfig } from './config.js';
import { checkModelTensors, expectedModelTensors, openModelWeights } from './weights.js';

export interface ForwardModelOptions {
  /** Where the forward runs (default 'cpu'; 'cuda' is not implemented yet). */
  backend?: 'cpu' | 'cuda';
  /**
   * A TRIM-KV cache of this model's shape and dtype (the model runs its sequence slot 0; the
   * cache stays the caller's: `inspect` / `lengths` on it show what the forward kept). Needs
   * `gates`.
   */
  cache?: KVCache;
  /** One retention gate per layer (`Runtime.createGate` of each `Checkpoint.layers` entry). */
  gates?: readonly RetentionGate[];
  /** lam as the reference stores it: rounded to the model dtype ('model', default) or 'fp32'. */
  lamDtype?: 'model' | 'fp32';
}

export interface ForwardOptions {
  /**
   * The sequence's maximum length (prompt plus new tokens); longrope picks its short or long
   * factors from it once, at position 0. Default: `startPos + tokens.length`.
   */
  maxLength?: number;
  /**
   * Test only (teacher-forcing the cache bookkeeping against a reference whose gate numerics
   * differ by rounding): per layer, `undefined` (its gate computes lam) or the lam of this call's
   * tokens, `tokens.length * kvHeads` values ([token][kv head]), used instead of the gate's and
   * rounded and stored exactly as the gate's would be. Needs a model loaded with a cache.
   * @internal
   */
  lam?: readonly (Float32Array | undefined)[];
}

/** A model loaded for the native forward, holding one sequence. */
export interface ForwardModel {
  readonly config: ModelConfig;
  /** The activations' dtype (the embedding's). */
  readonly dtype: DType;
  /** Positions the sequence holds. */
  readonly length: number;
  /**
   * Runs `tokens` at positions `startPos ..`: the sequence is first cut to `startPos` positions
   * (`startPos <= length`), so `forward(prompt, 0)` starts a new one and
   * `forward([t], length)` decodes a token.
   * @returns The fp32 logits (vocabSize) of the last token.
   */
  forward(tokens: ArrayLike<number>, startPos: number, options?: ForwardOptions): Float32Array;
  dispose(): void;
  [Symbol.dispose](): void;
}

/**
 * Loads a Hugging Face model directory (Qwen3, Llama or Phi-3; bf16, fp16 or fp32) for the
 * native forward.
 * @throws {TrimKVError} see the module comment.
 */
export async function loadForwardModel(dir: string, options: ForwardModelOptions = {}): Promise<ForwardModel> {
  const backend = options.backend ?? 'cpu';
  if (backend !== 'cpu' && backend !== 'cuda') invalid("'cpu' or 'cuda'", 'options.backend', backend);
  if (options.lamDtype !== undefined && options.lamDtype !== 'model' && options.lamDtype !== 'fp32') {
    invalid("'model' or 'fp32'", 'options.lamDtype', options.lamDtype);
  }
  if ((options.cache === undefined) !== (options.gates === undefined)) {
    invalid('a cache and its gates together (or neither)', options.cache === undefined ? 'options.cache' : 'options.gates', undefined);
  }
  if (options.gates !== undefined && !Array.isArray(options.gates)) invalid('an array of RetentionGate', 'options.gates', options.gates);
  const cacheArg =
    options.cache === undefined
      ? undefined
      : { cache: nativeCacheHandle(options.cache), gates: [...options.gates!].map(nativeGateHandle), lamFp32: options.lamDtype === 'fp32' };
  const config = await loadModelConfig(dir);
  await using weights = await openModelWeights(dir);
  const check = checkModelTensors(weights, config);
  const addon = loadAddon();
  const tensors: Record<string, NativeTensorHandle> = {};
  const disposeAll = (): void => {
    for (const t of Object.values(tensors)) t.dispose();
  };
  try {
    for (const [name, shape] of expectedModelTensors(config)) {
      const w = await weights.readWeight(name);
      const t = native(() => new addon.NativeTensor(BACKEND_INDEX.cpu, w.dtype, shape));
      tensors[name] = t;
      native(() => t.write(w.data));
    }
    const rope = config.rope;
    let invFreq: Float32Array;
    let invFreqLong: Float32Array | undefined;
    let ropeOriginalMax = 0;
    if (rope.type === 'longrope') {
      ropeOriginalMax = rope.originalMaxPositionEmbeddings;
      invFreq = ropeInvFreq(config, Math.min(ropeOriginalMax, config.maxPositionEmbeddings));
      if (ropeOriginalMax < config.maxPositionEmbeddings) invFreqLong = ropeInvFreq(config, ropeOriginalMax + 1);
    } else {
      invFreq = ropeInvFreq(config);
    }
    const handle: NativeModelHandle = native(
      () =>
        new addon.NativeModel(
          BACKEND_INDEX[backend],
          {
            architecture: config.architecture,
            hiddenSize: config.hiddenSize,
            layers: config.layers,
            qHeads: config.qHeads,
            kvHeads: config.kvHeads,
            headDim: config.headDim,
            intermediateSize: config.intermediateSize,
            vocabSize: config.vocabSize,
            maxPositionEmbeddings: config.maxPositionEmbeddings,
            rmsNormEps: config.rmsNormEps,
            tieWordEmbeddings: config.tieWordEmbeddings,
            dtype: check.dtype,
            invFreq,
            invFreqLong,
            ropeOriginalMax,
            attentionFactor: ropeAttentionScaling(config),
          },
          tensors,
          cacheArg,
        ),
    );
    // The model holds its own references to the weights' buffers.
    disposeAll();
    return new NativeForwardModel(config, check.dtype, handle, cacheArg !== undefined);
  } catch (e) {
    disposeAll();
    throw e;
  }
}

class NativeForwardModel implements ForwardModel {
  private handle: NativeModelHandle | undefined;

  constructor(
    readonly config: ModelConfig,
    readonly dtype: DType,
    handle: NativeModelHandle,
    private readonly hasCache: boolean,
  ) {
    this.handle = handle;
  }

  private get native(): NativeModelHandle {
    if (this.handle === undefined) throw new TrimKVError('ERR_DISPOSED', 'the model has been disposed');
    return this.handle;
  }

  get length(): number {
    return this.native.length();
  }

  forward(tokens: ArrayLike<number>, startPos: number, options: ForwardOptions = {}): Float32Array {
    const h = this.native;
    const ids = Int32Array.from(tokens as ArrayLike<number>);
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      if (typeof t !== 'number' || !Number.isSafeInteger(t) || t < 0 || t >= this.config.vocabSize) {
        invalid(`a token id in [0, ${this.config.vocabSize})`, `tokens[${i}]`, t, 'ERR_RANGE');
      }
    }
    if (ids.length === 0) invalid('at least one token', 'tokens', tokens);
    if (!Number.isSafeInteger(startPos) || startPos < 0) invalid('an integer >= 0', 'startPos', startPos);
    const maxLength = options.maxLength ?? startPos + ids.length;
    if (!Number.isSafeInteger(maxLength)) invalid('an integer', 'options.maxLength', maxLength);
    const lam = options.lam;
    if (lam !== undefined) {
      if (!this.hasCache) invalid('a model loaded with a cache and gates', 'options.lam', lam);
      if (!Array.isArray(lam) || lam.length !== this.config.layers) invalid(`an array of ${this.config.layers} entries (one per layer)`, 'options.lam', lam);
      lam.forEach((a: unknown, l) => {
        if (a !== undefined && !(a instanceof Float32Array && a.length === ids.length * this.config.kvHeads)) {
          invalid(`undefined or a Float32Array of ${ids.length * this.config.kvHeads} values (tokens * kvHeads)`, `options.lam[${l}]`, a);
        }
      });
    }
    return native(() => h.forward(ids, startPos, maxLength, lam));
  }

  dispose(): void {
    this.handle?.dispose();
    this.handle = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
