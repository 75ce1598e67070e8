/**
 * Public types of trimkv. Names follow ../SPEC (memory, buffer, lam, strategy, scope).
 * The string-literal types are derived from the value lists of constants.ts, which mirror the
 * native name parsers, so `lib/` rejects unsupported values before any native call.
 */
import type { Activation, BackendName, DType, GateKind, Scope, Strategy } from './constants.js';
import type { Tensor } from './tensor.js';

export type { Activation, BackendName, DType, GateKind, Scope, Strategy };

/** What `openRuntime` accepts: `'auto'` picks CUDA when usable, else the CPU. */
export type BackendRequest = BackendName | 'auto';

/** Availability of one backend, as `backends()` reports it. */
export interface BackendInfo {
  name: BackendName;
  available: boolean;
  /** Why the backend cannot be used (e.g. the CUDA driver's error), when `available` is false. */
  reason?: string;
  /** Devices (CUDA) or the host CPU. */
  devices: DeviceInfo[];
}

export interface DeviceInfo {
  index: number;
  name: string;
  /** Compute capability as 'major.minor' (CUDA only). */
  computeCapability?: string;
  totalMemory?: number;
  multiprocessors?: number;
}

/**
 * One weight matrix or vector in its stored dtype. `data` holds float32 values for `fp32`
 * and raw IEEE half / bfloat16 bit patterns (`Uint16Array`) for `fp16` / `bf16`.
 */
export interface WeightArray {
  dtype: DType;
  shape: number[];
  data: Float32Array | Uint16Array;
}

/** A weight given either in a stored dtype or as plain float32 values. */
export type WeightInput = WeightArray | Float32Array;

/** Weights of gates "rg" and "rg2": `z = W2 act(W1 x + b1) + bias`. */
export interface MlpGateWeights {
  /** [intermediateSize, inputSize] */
  linear1Weight: WeightInput;
  /** [intermediateSize] */
  linear1Bias: WeightInput;
  /** [kvHeads, intermediateSize] */
  linear2Weight: WeightInput;
  /** [kvHeads] */
  bias: WeightInput;
}

/** Weights of gate "rg3": `z = down(act(gate y) * (up y)) + bias`. */
export interface GluGateWeights {
  /** [intermediateSize, inputSize] */
  gateProj: WeightInput;
  /** [intermediateSize, inputSize] */
  upProj: WeightInput;
  /** [kvHeads, intermediateSize] */
  downProj: WeightInput;
  /** [kvHeads] */
  bias: WeightInput;
}

/** Everything needed to build one layer's retention gate. */
export interface GateSpec {
  kind: GateKind;
  activation: Activation;
  /** Dm for "rg"; kvHeads * 2 * headDim for "rg2" / "rg3". */
  inputSize: number;
  intermediateSize: number;
  kvHeads: number;
  weights: MlpGateWeights | GluGateWeights;
}

/** Configuration of a KV cache for a batch of sequences (SPEC sections 4, 5, 7). */
export interface CacheConfig {
  layers: number;
  /** Number of sequence slots. */
  batch: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** M: tokens kept per (sequence, layer, KV head) (per head on average for pooled scopes). */
  memory: number;
  /** B: eviction runs when a head holds M + B tokens. Default 0. */
  buffer?: number;
  /** Storage dtype of keys and values; q and out use it too. Default 'fp16'. */
  dtype?: DType;
  /** Default 'alpha'. */
  strategy?: Strategy;
  /** Sliding-window protection W >= 0: tokens with p >= T - W always stay. Default 0. */
  window?: number;
  /** Default 'head'. */
  scope?: Scope;
  /** Floor ratio f in [0, 1) for the 'layer' and 'global' scopes. Default 0. */
  floor?: number;
  /** Threshold tau in (0, 1]: also evict tokens with exp(score) < tau. Default: none. */
  threshold?: number;
  /** Softmax scale; default 1 / sqrt(headDim). */
  scale?: number;
}

/** Inputs of one decode step of one layer: one new token for every sequence slot. */
export interface DecodeInputs {
  /** [batch, qHeads, headDim], cache dtype */
  q: Tensor;
  /** [batch, kvHeads, headDim], cache dtype, already rotated */
  k: Tensor;
  /** [batch, kvHeads, headDim], cache dtype */
  v: Tensor;
  /** [batch, kvHeads] fp32 log-retention (<= 0) */
  lam: Tensor;
  /** Position of each slot's new token; -1 marks an inactive slot (skipped, output rows zeroed). */
  positions: Int32Array | readonly number[];
  /** [batch, qHeads, headDim], cache dtype: written by the call */
  out: Tensor;
}

/** Inputs of one prefill chunk of one sequence for one layer. */
export interface PrefillInputs {
  /** Sequence slot. */
  seq: number;
  /** Position of the chunk's first token. */
  start: number;
  /** [C, qHeads, headDim] */
  q: Tensor;
  /** [C, kvHeads, headDim] */
  k: Tensor;
  /** [C, kvHeads, headDim] */
  v: Tensor;
  /** [C, kvHeads] fp32 */
  lam: Tensor;
  /** [C, qHeads, headDim]: written by the call */
  out: Tensor;
}

/** One sequence's chunk in a `prefillBatch` call. */
export interface PrefillChunk {
  /** Sequence slot; each slot appears at most once in a call. */
  seq: number;
  /** Position of the chunk's first token. */
  start: number;
  /** Tokens in the chunk (>= 1). */
  length: number;
}

/**
 * Inputs of one prefill call over several sequences for one layer (varlen): the chunks' tokens
 * are packed one chunk after the other, N = the sum of the lengths.
 */
export interface PrefillBatchInputs {
  chunks: readonly PrefillChunk[];
  /** [N, qHeads, headDim] */
  q: Tensor;
  /** [N, kvHeads, headDim] */
  k: Tensor;
  /** [N, kvHeads, headDim] */
  v: Tensor;
  /** [N, kvHeads] fp32 */
  lam: Tensor;
  /** [N, qHeads, headDim]: written by the call */
  out: Tensor;
}

/** What `inspect` reports for one (sequence, layer, KV head): tokens sorted by position. */
export interface HeadSnapshot {
  positions: Int32Array;
  /** Current decayed score of each retained token (SPEC section 4, at the sequence's T). */
  scores: Float32Array;
}
