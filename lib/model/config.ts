/**
 * A Hugging Face model directory's `config.json` and `generation_config.json`, read into
 * typed, checked, camelCase records for the three architectures trimkv runs (Qwen3, Llama,
 * Phi-3), the check that a TRIM-KV gate checkpoint belongs to the model, and the RoPE
 * frequency tables (default, `llama3`, `longrope`) as transformers computes them.
 *
 * Error codes (all `TrimKVError`; messages name the file and the field):
 * - `ERR_MODEL_MISSING`: the directory or config.json does not exist.
 * - `ERR_MODEL_CONFIG`: a file is not a JSON object, a field is missing or has a bad value,
 *   the architecture, activation or rope type is not supported, or a gate checkpoint
 *   disagrees with the model.
 */
import { dirname, join } from 'node:path';
import { isCheckpoint, type Checkpoint } from '../checkpoint/index.js';
import { types } from 'node:util';
import { TrimKVError } from '../errors.js';
import type { DType } from '../types.js';
import { argObject, arrayOf, invalid, isArgObject, readField } from '../validate.js';

/** Most positions one ropeCosSin call takes (its tables hold positions x headDim floats each). */
const MAX_ROPE_POSITIONS = 2 ** 20;
import { isFile, readJsonObject, requireDir, show } from './files.js';

/** The architectures (Hugging Face `model_type`) trimkv can run. */
export const MODEL_ARCHITECTURES = ['qwen3', 'llama', 'phi3'] as const;
export type ModelArchitecture = (typeof MODEL_ARCHITECTURES)[number];

/** RoPE frequency scaling, from config.json's `rope_scaling`. */
export type RopeScaling =
  | { type: 'default' }
  | {
      /** Llama 3.1's frequency-dependent interpolation (DeepSeek-R1-Distill-Llama). */
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    }
  | {
      /** Phi-3's LongRoPE (older configs call it `su`). */
      type: 'longrope';
      /** Per-frequency divisors (headDim / 2 each) used while a sequence fits the original window. */
      shortFactor: readonly number[];
      /** Those used for a sequence longer than `originalMaxPositionEmbeddings`. */
      longFactor: readonly number[];
      originalMaxPositionEmbeddings: number;
      /** Multiplies cos and sin, for short and long factors alike. */
      attentionFactor: number;
    };

/** config.json of a model, checked and normalised. */
export interface ModelConfig {
  architecture: ModelArchitecture;
  /** `architectures` as written (e.g. `["Qwen3ForCausalLM"]`), or empty. */
  architectures: string[];
  hiddenSize: number;
  layers: number;
  qHeads: number;
  kvHeads: number;
  /** `head_dim`, else Qwen3's class default 128, else hidden_size / num_attention_heads. */
  headDim: number;
  intermediateSize: number;
  /** Embedding rows (may exceed the tokenizer's vocabulary: the rest is padding). */
  vocabSize: number;
  maxPositionEmbeddings: number;
  rmsNormEps: number;
  ropeTheta: number;
  rope: RopeScaling;
  tieWordEmbeddings: boolean;
  hiddenAct: 'silu';
  /** `torch_dtype` (or `dtype`) as a trimkv dtype, when given. */
  dtype?: DType;
  /** Sliding-window size where the config enables one (Phi-3 writes one), else null. */
  slidingWindow: number | null;
  bosTokenId?: number;
  /** `eos_token_id` of config.json as a list (may be empty). */
  eosTokenIds: number[];
  /** config.json as parsed. */
  raw: Record<string, unknown>;
  /** Path named in error messages. */
  file: string;
}

/** generation_config.json, checked; every field optional. */
export interface GenerationConfig {
  bosTokenId?: number;
  /** `eos_token_id` as a list (a single id becomes one element). */
  eosTokenIds: number[];
  padTokenId?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  doSample?: boolean;
  maxNewTokens?: number;
  raw: Record<string, unknown>;
  file: string;
}

const DTYPE_NAMES: Readonly<Record<string, DType>> = {
  bfloat16: 'bf16',
  float16: 'fp16',
  half: 'fp16',
  float32: 'fp32',
  float: 'fp32',
};

/** The `head_dim` default of each config class when the field is absent. */
const QWEN3_DEFAULT_HEAD_DIM = 128;
/** The `rope_theta` default of all three config classes. */
const DEFAULT_ROPE_THETA = 10000;

class Fields {
  constructor(
    readonly obj: Record<string, unknown>,
    readonly file: string,
    readonly prefix = '',
  ) {}

  has(field: string): boolean {
    return this.obj[field] !== undefined && this.obj[field] !== null;
  }

  error(field: string, expected: string, value: unknown = this.obj[field]): TrimKVError {
    return new TrimKVError('ERR_MODEL_CONFIG', `${this.file}: expected ${expected} for '${this.prefix}${field}' but received ${show(value)}`);
  }

  int(field: string, min: number, fallback?: number): number {
    const v = this.has(field) ? this.obj[field] : fallback;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw this.error(field, `an integer >= ${min}`);
    return v;
  }

  optionalInt(field: string, min: number): number | undefined {
    return this.has(field) ? this.int(field, min) : undefined;
  }

  positive(field: string, fallback?: number): number {
    const v = this.has(field) ? this.obj[field] : fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || !(v > 0)) throw this.error(field, 'a finite number > 0');
    return v;
  }

  bool(field: string, fallback: boolean): boolean {
    const v = this.has(field) ? this.obj[field] : fallback;
    if (typeof v !== 'boolean') throw this.error(field, 'true or false');
    return v;
  }

  /** An id or a list of ids (`eos_token_id`), as a list. */
  ids(field: string): number[] {
    if (!this.has(field)) return [];
    const v = this.obj[field];
    const list = Array.isArray(v) ? v : [v];
    if (!list.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0)) {
      throw this.error(field, 'a token id (integer >= 0) or a list of them');
    }
    return [...new Set(list as number[])];
  }

  factors(field: string, length: number): number[] {
    const v = this.obj[field];
    if (!Array.isArray(v) || v.length !== length || !v.every((x) => typeof x === 'number' && Number.isFinite(x) && x > 0)) {
      const got = Array.isArray(v) ? `a list of ${v.length} values${v.every((x) => typeof x === 'number') ? '' : ' (not all numbers)'}` : show(v);
      throw new TrimKVError(
        'ERR_MODEL_CONFIG',
        `${this.file}: expected a list of ${length} finite numbers > 0 (head_dim / 2) for '${this.prefix}${field}' but received ${got}`,
      );
    }
    return v as number[];
  }
}

/**
 * Reads `<dir>/config.json`.
 * @param dir A Hugging Face model directory.
 * @throws {TrimKVError} `ERR_MODEL_MISSING` if the directory or file is absent;
 *   `ERR_MODEL_CONFIG` for any bad or unsupported field (see `parseModelConfig`).
 */
export async function loadModelConfig(dir: string): Promise<ModelConfig> {
  await requireDir(dir, 'model');
  const file = join(dir, 'config.json');
  return parseModelConfig(await readJsonObject(file, 'config.json', 'ERR_MODEL_CONFIG'), file);
}

/**
 * Checks and normalises a parsed config.json.
 * @param json The parsed file.
 * @param file Path named in error messages.
 * @throws {TrimKVError} `ERR_MODEL_CONFIG` naming the field: an unknown `model_type`, a
 *   missing or non-positive size, `num_attention_heads` not a multiple of
 *   `num_key_value_heads`, an odd head_dim, an activation other than silu, biases, an
 *   unsupported or malformed `rope_scaling` (factor lists of the wrong length).
 */
export function parseModelConfig(json: unknown, file = 'config.json'): ModelConfig {
  if (typeof file !== 'string') invalid('a string', 'file', file);
  const raw = jsonObject(json, file);
  const c = new Fields(raw, file);
  const modelType = raw.model_type;
  if (typeof modelType !== 'string' || !(MODEL_ARCHITECTURES as readonly string[]).includes(modelType)) {
    throw new TrimKVError(
      'ERR_MODEL_CONFIG',
      `${file}: unsupported architecture: expected 'model_type' one of ${MODEL_ARCHITECTURES.map((a) => `'${a}'`).join(', ')} but received ${show(modelType)}`,
    );
  }
  const architecture = modelType as ModelArchitecture;
  const architectures = raw.architectures;
  if (architectures !== undefined && architectures !== null && !(Array.isArray(architectures) && architectures.every((a) => typeof a === 'string'))) {
    throw c.error('architectures', 'a list of class names');
  }

  const hiddenSize = c.int('hidden_size', 1);
  const layers = c.int('num_hidden_layers', 1);
  const qHeads = c.int('num_attention_heads', 1);
  const kvHeads = c.int('num_key_value_heads', 1, qHeads);
  if (qHeads % kvHeads !== 0) {
    throw new TrimKVError(
      'ERR_MODEL_CONFIG',
      `${file}: 'num_attention_heads' ${qHeads} is not a multiple of 'num_key_value_heads' ${kvHeads}`,
    );
  }
  let headDim: number;
  if (c.has('head_dim')) headDim = c.int('head_dim', 1);
  else if (architecture === 'qwen3') headDim = QWEN3_DEFAULT_HEAD_DIM; // Qwen3Config's default, not hidden / heads
  else {
    if (hiddenSize % qHeads !== 0) {
      throw new TrimKVError(
        'ERR_MODEL_CONFIG',
        `${file}: no 'head_dim', and 'hidden_size' ${hiddenSize} is not a multiple of 'num_attention_heads' ${qHeads}`,
      );
    }
    headDim = hiddenSize / qHeads;
  }
  // RoPE rotates pairs (i, i + head_dim / 2).
  if (headDim % 2 !== 0) throw c.error('head_dim', 'an even head dimension (RoPE rotates pairs)', headDim);
  const intermediateSize = c.int('intermediate_size', 1);
  const vocabSize = c.int('vocab_size', 1);
  const maxPositionEmbeddings = c.int('max_position_embeddings', 1);
  const rmsNormEps = c.positive('rms_norm_eps');
  const hiddenAct = raw.hidden_act ?? 'silu';
  if (hiddenAct !== 'silu') throw c.error('hidden_act', "'silu' (the SwiGLU MLP of Qwen3, Llama and Phi-3)", hiddenAct);
  const tieWordEmbeddings = c.bool('tie_word_embeddings', false);
  for (const field of ['attention_bias', 'mlp_bias']) {
    if (c.bool(field, false)) throw c.error(field, 'false (projection biases are not supported)');
  }
  if (c.has('partial_rotary_factor') && raw.partial_rotary_factor !== 1) {
    throw c.error('partial_rotary_factor', '1 (partial rotary embeddings are not supported)');
  }

  let dtype: DType | undefined;
  const dtypeField = c.has('torch_dtype') ? 'torch_dtype' : 'dtype';
  if (c.has(dtypeField)) {
    dtype = DTYPE_NAMES[String(raw[dtypeField])];
    if (dtype === undefined || typeof raw[dtypeField] !== 'string') throw c.error(dtypeField, "'bfloat16', 'float16' or 'float32'");
  }

  let slidingWindow: number | null = null;
  if (architecture === 'qwen3') {
    if (c.bool('use_sliding_window', false)) throw c.error('use_sliding_window', 'false (sliding-window attention is not supported)');
  } else if (architecture === 'phi3') {
    slidingWindow = c.optionalInt('sliding_window', 1) ?? null;
  }

  // transformers 5 moves rope_theta and the scaling into `rope_parameters`.
  const ropeParams = c.has('rope_parameters') ? raw.rope_parameters : undefined;
  if (ropeParams !== undefined && (typeof ropeParams !== 'object' || Array.isArray(ropeParams))) {
    throw c.error('rope_parameters', 'an object');
  }
  const rp = ropeParams as Record<string, unknown> | undefined;
  const ropeTheta = c.has('rope_theta')
    ? c.positive('rope_theta')
    : rp?.rope_theta !== undefined
      ? new Fields(rp, file, 'rope_parameters.').positive('rope_theta')
      : DEFAULT_ROPE_THETA;
  const rope = parseRopeScaling(c, rp, headDim, maxPositionEmbeddings);

  const config: ModelConfig = {
    architecture,
    architectures: Array.isArray(architectures) ? [...(architectures as string[])] : [],
    hiddenSize,
    layers,
    qHeads,
    kvHeads,
    headDim,
    intermediateSize,
    vocabSize,
    maxPositionEmbeddings,
    rmsNormEps,
    ropeTheta,
    rope,
    tieWordEmbeddings,
    hiddenAct: 'silu',
    slidingWindow,
    eosTokenIds: c.ids('eos_token_id'),
    raw,
    file,
  };
  if (dtype !== undefined) config.dtype = dtype;
  const bos = c.ids('bos_token_id');
  if (bos.length > 1) throw c.error('bos_token_id', 'a single token id');
  if (bos.length === 1) config.bosTokenId = bos[0]!;
  // Frozen and branded: the functions that take a ModelConfig trust its fields.
  Object.freeze(config.rope);
  MODEL_CONFIGS.add(Object.freeze(config));
  return config;
}

const MODEL_CONFIGS = new WeakSet<object>();

/**
 * @internal `v` as a ModelConfig that parseModelConfig / loadModelConfig made (else
 * ERR_INVALID_ARGUMENT): the functions taking one trust its fields.
 */
export function expectModelConfig(v: unknown, name = 'config'): ModelConfig {
  if (typeof v !== 'object' || v === null || !MODEL_CONFIGS.has(v)) invalid('a ModelConfig from parseModelConfig or loadModelConfig', name, v);
  return v as ModelConfig;
}

/** A JSON object argument read once (a Proxy or throwing getter cannot run later). */
function jsonObject(json: unknown, file: string): Record<string, unknown> {
  if (types.isProxy(json) || typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new TrimKVError('ERR_MODEL_CONFIG', `${file}: expected a JSON object but received ${show(json)}`);
  }
  return plainJson(json, file, 0, { nodes: 0 }) as Record<string, unknown>;
}

/**
 * A copy of `v` as plain JSON data, read once with every property through readField: a Proxy,
 * a function, a cycle or nesting past 64 levels is ERR_MODEL_CONFIG, a throwing getter
 * ERR_INVALID_ARGUMENT, and at most 2^20 values are copied, so nothing later can run user code.
 */
function plainJson(v: unknown, file: string, depth: number, budget: { nodes: number }): unknown {
  if (++budget.nodes > 2 ** 20) throw new TrimKVError('ERR_MODEL_CONFIG', `${file}: more than ${2 ** 20} values`);
  if (v === null || typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') return v;
  if (typeof v !== 'object' || types.isProxy(v) || depth > 64) {
    throw new TrimKVError('ERR_MODEL_CONFIG', `${file}: not JSON data (${depth > 64 ? 'nested over 64 levels' : show(v)})`);
  }
  if (Array.isArray(v)) {
    if (v.length > 2 ** 20) throw new TrimKVError('ERR_MODEL_CONFIG', `${file}: a list of ${v.length} values`);
    const out = new Array<unknown>(v.length);
    for (let i = 0; i < v.length; i++) out[i] = plainJson(readField(v, String(i), 'config', i), file, depth + 1, budget);
    return out;
  }
  const out: Record<string, unknown> = {};
  for (const k of Object.keys(v)) {
    // defineProperty: a key '__proto__' stays a key.
    Object.defineProperty(out, k, { value: plainJson(readField(v, k, 'config', k), file, depth + 1, budget), enumerable: true, writable: true, configurable: true });
  }
  return out;
}

function parseRopeScaling(
  c: Fields,
  ropeParams: Record<string, unknown> | undefined,
  headDim: number,
  maxPositionEmbeddings: number,
): RopeScaling {
  const field = c.has('rope_scaling') ? 'rope_scaling' : ropeParams !== undefined ? 'rope_parameters' : undefined;
  if (field === undefined) return { type: 'default' };
  const v = c.obj[field];
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw c.error(field, 'null or an object');
  const s = new Fields(v as Record<string, unknown>, c.file, `${field}.`);
  const type = s.obj.rope_type ?? s.obj.type ?? 'default';
  switch (type) {
    case 'default':
      return { type: 'default' };
    case 'llama3': {
      const lowFreqFactor = s.positive('low_freq_factor');
      const highFreqFactor = s.positive('high_freq_factor');
      // The blend divides by (high - low): equal factors would divide by zero.
      if (!(highFreqFactor > lowFreqFactor)) {
        throw s.error('high_freq_factor', `a number > low_freq_factor ${lowFreqFactor}`);
      }
      return {
        type: 'llama3',
        factor: s.positive('factor'),
        lowFreqFactor,
        highFreqFactor,
        originalMaxPositionEmbeddings: s.int('original_max_position_embeddings', 1),
      };
    }
    case 'longrope':
    case 'su': {
      // As transformers: Phi-3 writes original_max_position_embeddings at the top level, and
      // then factor = max_position_embeddings / original; otherwise rope_scaling's factor.
      let original: number;
      let factor: number;
      if (c.has('original_max_position_embeddings')) {
        original = c.int('original_max_position_embeddings', 1);
        factor = maxPositionEmbeddings / original;
      } else if (s.has('original_max_position_embeddings')) {
        original = s.int('original_max_position_embeddings', 1);
        factor = s.has('factor') ? s.positive('factor') : maxPositionEmbeddings / original;
      } else {
        original = maxPositionEmbeddings;
        factor = s.positive('factor');
      }
      const shortFactor = s.factors('short_factor', headDim / 2);
      const longFactor = s.factors('long_factor', headDim / 2);
      // The attention factor: sqrt(1 + ln(factor) / ln(original)), or 1 when not extended.
      const attentionFactor = s.has('attention_factor')
        ? s.positive('attention_factor')
        : factor <= 1
          ? 1
          : Math.sqrt(1 + Math.log(factor) / Math.log(original));
      return { type: 'longrope', shortFactor, longFactor, originalMaxPositionEmbeddings: original, attentionFactor };
    }
    default:
      throw new TrimKVError(
        'ERR_MODEL_CONFIG',
        `${c.file}: unsupported rope type: expected '${field}.rope_type' one of 'default', 'llama3', 'longrope' ('su') but received ${show(type)}`,
      );
  }
}

/**
 * Reads `<dir>/generation_config.json` if there is one.
 * @returns The checked config, or undefined when the file does not exist.
 * @throws {TrimKVError} `ERR_MODEL_CONFIG` for invalid JSON or a bad field.
 */
export async function loadGenerationConfig(dir: string): Promise<GenerationConfig | undefined> {
  const file = join(dir, 'generation_config.json');
  if (!(await isFile(file))) return undefined;
  return parseGenerationConfig(await readJsonObject(file, 'generation_config.json', 'ERR_MODEL_CONFIG'), file);
}

/**
 * Checks a parsed generation_config.json.
 * @throws {TrimKVError} `ERR_MODEL_CONFIG` naming the field: ids that are not integers >= 0,
 *   a negative temperature, top_p outside (0, 1], a negative or fractional top_k, a
 *   non-boolean do_sample.
 */
export function parseGenerationConfig(json: unknown, file = 'generation_config.json'): GenerationConfig {
  if (typeof file !== 'string') invalid('a string', 'file', file);
  const raw = jsonObject(json, file);
  const c = new Fields(raw, file);
  const g: GenerationConfig = { eosTokenIds: c.ids('eos_token_id'), raw, file };
  const one = (field: string): number | undefined => {
    const ids = c.ids(field);
    if (ids.length > 1) throw c.error(field, 'a single token id');
    return ids[0];
  };
  const bos = one('bos_token_id');
  if (bos !== undefined) g.bosTokenId = bos;
  const pad = one('pad_token_id');
  if (pad !== undefined) g.padTokenId = pad;
  if (c.has('temperature')) {
    const t = raw.temperature;
    if (typeof t !== 'number' || !Number.isFinite(t) || t < 0) throw c.error('temperature', 'a finite number >= 0');
    g.temperature = t;
  }
  if (c.has('top_p')) {
    const p = raw.top_p;
    if (typeof p !== 'number' || !(p > 0 && p <= 1)) throw c.error('top_p', 'a number in (0, 1]');
    g.topP = p;
  }
  const topK = c.optionalInt('top_k', 0);
  if (topK !== undefined) g.topK = topK;
  if (c.has('do_sample')) g.doSample = c.bool('do_sample', false);
  const maxNew = c.optionalInt('max_new_tokens', 1);
  if (maxNew !== undefined) g.maxNewTokens = maxNew;
  return g;
}

/**
 * Checks that a TRIM-KV gate checkpoint (as `loadCheckpoint` returns it) was trained for
 * this model: layer count, KV heads, query heads and head_dim where the gate config gives
 * them, hidden size, `model_type`, and the gate's input size (hidden size for "rg",
 * `kvHeads * 2 * headDim` for "rg2"/"rg3").
 * @throws {TrimKVError} `ERR_MODEL_CONFIG` listing every disagreement, naming the gate
 *   config's `base_model`.
 */
export function checkGatesAgainstModel(gates: Checkpoint, model: ModelConfig): void {
  if (!isCheckpoint(gates)) invalid('a Checkpoint from loadCheckpoint or parseCheckpoint', 'gates', gates);
  expectModelConfig(model, 'model');
  const diffs: string[] = [];
  const cmp = (what: string, gate: unknown, want: unknown): void => {
    if (gate !== undefined && gate !== null && gate !== want) diffs.push(`${what}: gates ${show(gate)}, model ${show(want)}`);
  };
  cmp('model_type', gates.config.model_type, model.architecture);
  cmp('num_hidden_layers', gates.layers.length, model.layers);
  cmp('num_key_value_heads', gates.cacheDefaults.kvHeads, model.kvHeads);
  cmp('num_attention_heads', gates.cacheDefaults.qHeads, model.qHeads);
  cmp('head_dim', gates.cacheDefaults.headDim, model.headDim);
  // config.json as given: a nested value may be anything, so it is read with care.
  const text = gates.config.text_config;
  const hidden = gates.config.hidden_size ?? (isArgObject(text) ? readField(text, 'hidden_size', 'gates.config.text_config.hidden_size') : undefined);
  cmp('hidden_size', hidden, model.hiddenSize);
  const input = gates.layers[0]?.inputSize;
  const wantInput = gates.kind === 'rg' ? model.hiddenSize : model.kvHeads * 2 * model.headDim;
  cmp(`gate input size (${gates.kind === 'rg' ? 'hidden_size' : 'kv heads x 2 x head_dim'})`, input, wantInput);
  if (diffs.length === 0) return;
  const base = typeof gates.config.base_model === 'string' ? `base_model ${JSON.stringify(gates.config.base_model)}` : 'no base_model';
  throw new TrimKVError(
    'ERR_MODEL_CONFIG',
    `gate checkpoint ${join(dirname(gates.file), 'config.json')} (${base}) does not fit the model of ${model.file}: ${diffs.join('; ')}`,
  );
}

// ---------------------------------------------------------------------------------------------
// RoPE. Every step is rounded to float32 as transformers computes the tables in fp32 tensors
// (Python scalars taking the tensor's dtype), so the tables match its bits, not just its values.
// ---------------------------------------------------------------------------------------------

const f32 = Math.fround;

function checkMaxLength(config: ModelConfig, maxLength: number | undefined, required: boolean): void {
  if (maxLength === undefined) {
    if (required) invalid("the sequence's maximum length (longrope picks its factors from it)", 'maxLength', maxLength);
    return;
  }
  if (typeof maxLength !== 'number' || !Number.isSafeInteger(maxLength)) invalid('an integer', 'maxLength', maxLength);
  if (maxLength < 1 || maxLength > config.maxPositionEmbeddings) {
    invalid(`an integer in [1, ${config.maxPositionEmbeddings}] (max_position_embeddings)`, 'maxLength', maxLength, 'ERR_RANGE');
  }
}

/**
 * Which longrope factors a sequence of `maxLength` positions uses (null for other rope types).
 * @throws {TrimKVError} `ERR_RANGE` when `maxLength` exceeds `maxPositionEmbeddings` (longrope).
 */
export function ropeFactorSet(config: ModelConfig, maxLength: number): 'short' | 'long' | null {
  expectModelConfig(config);
  if (config.rope.type !== 'longrope') return null;
  checkMaxLength(config, maxLength, true);
  // transformers' Phi-3: long factors once seq_len = max position + 1 exceeds the original window.
  return maxLength > config.rope.originalMaxPositionEmbeddings ? 'long' : 'short';
}

/**
 * The RoPE inverse frequencies, `headDim / 2` of them, pair `i` rotating dims `(i, i + headDim/2)`.
 * @param maxLength The sequence's maximum length (prompt plus new tokens). Required for
 *   longrope, which uses its long factors when it exceeds `originalMaxPositionEmbeddings`;
 *   fixed for the whole sequence, never switched mid-way.
 * @throws {TrimKVError} `ERR_INVALID_ARGUMENT` when longrope lacks `maxLength`; `ERR_RANGE`
 *   when it exceeds `maxPositionEmbeddings`.
 */
export function ropeInvFreq(config: ModelConfig, maxLength?: number): Float32Array {
  const rope = expectModelConfig(config).rope;
  checkMaxLength(config, maxLength, rope.type === 'longrope');
  const dim = config.headDim;
  const half = dim / 2;
  const theta = f32(config.ropeTheta);
  const out = new Float32Array(half);
  // transformers: arange(0, dim, 2).float() / dim, base ** that, then 1 / (ext * base ** ...).
  const power = (i: number): number => f32(Math.pow(theta, f32((2 * i) / dim)));
  if (rope.type === 'longrope') {
    const ext = ropeFactorSet(config, maxLength!) === 'long' ? rope.longFactor : rope.shortFactor;
    for (let i = 0; i < half; i++) out[i] = f32(1 / f32(f32(ext[i]!) * power(i)));
    return out;
  }
  for (let i = 0; i < half; i++) out[i] = f32(1 / power(i));
  if (rope.type === 'llama3') {
    const factor = f32(rope.factor);
    const low = f32(rope.lowFreqFactor);
    const old = f32(rope.originalMaxPositionEmbeddings);
    const lowWavelen = f32(rope.originalMaxPositionEmbeddings / rope.lowFreqFactor);
    const highWavelen = f32(rope.originalMaxPositionEmbeddings / rope.highFreqFactor);
    const span = f32(rope.highFreqFactor - rope.lowFreqFactor);
    const twoPi = f32(2 * Math.PI);
    for (let i = 0; i < half; i++) {
      const inv = out[i]!;
      const wavelen = f32(twoPi / inv);
      if (wavelen > lowWavelen) out[i] = f32(inv / factor); // low frequencies: interpolated
      else if (wavelen < highWavelen) out[i] = inv; // high frequencies: unchanged
      else {
        // In between, blend: (1 - s) * inv / factor + s * inv, s = (old / wavelen - low) / (high - low).
        const s = f32(f32(f32(old / wavelen) - low) / span);
        out[i] = f32(f32(f32(f32(1 - s) * inv) / factor) + f32(s * inv));
      }
    }
  }
  return out;
}

/**
 * The factor cos and sin are multiplied by: 1 for default and llama3, longrope's
 * `attentionFactor` (Phi-3-mini-128k: sqrt(1 + ln(131072/4096) / ln 4096) = 1.19024) for
 * short and long factors alike.
 * @param maxLength Optional; checked against `maxPositionEmbeddings` when given.
 * @throws {TrimKVError} `ERR_RANGE` when `maxLength` exceeds `maxPositionEmbeddings`.
 */
export function ropeAttentionScaling(config: ModelConfig, maxLength?: number): number {
  expectModelConfig(config);
  checkMaxLength(config, maxLength, false);
  return config.rope.type === 'longrope' ? f32(config.rope.attentionFactor) : 1;
}

/**
 * cos and sin tables `[positions.length, headDim]` for the given positions, in the
 * "rotate_half" layout (each of the `headDim / 2` angles duplicated at `i` and `i + headDim/2`),
 * scaled by `ropeAttentionScaling`. Angles are `fp32(position * invFreq)` as transformers'.
 * @throws {TrimKVError} as `ropeInvFreq`; `ERR_RANGE` for a position outside [0, maxLength).
 */
export function ropeCosSin(
  config: ModelConfig,
  positions: ArrayLike<number>,
  maxLength: number,
): { cos: Float32Array; sin: Float32Array } {
  const inv = ropeInvFreq(config, maxLength);
  const scale = ropeAttentionScaling(config, maxLength);
  const dim = config.headDim;
  const half = dim / 2;
  // Read once and bounded before anything is allocated: typed arrays as they are, arrays index by index.
  const list: ArrayLike<number> = types.isTypedArray(positions) && !types.isProxy(positions)
    ? (positions as unknown as ArrayLike<number>)
    : arrayOf(positions, 'positions', 'an array of positions', (x) => x as number, { maxLength: MAX_ROPE_POSITIONS });
  if (list.length > MAX_ROPE_POSITIONS) invalid(`at most ${MAX_ROPE_POSITIONS} positions`, 'positions', positions, 'ERR_RANGE');
  positions = list;
  const cos = new Float32Array(positions.length * dim);
  const sin = new Float32Array(positions.length * dim);
  for (let p = 0; p < positions.length; p++) {
    const pos = positions[p]!;
    if (!Number.isSafeInteger(pos) || pos < 0 || pos >= maxLength) {
      invalid(`an integer in [0, ${maxLength}) (maxLength)`, `positions[${p}]`, pos, 'ERR_RANGE');
    }
    for (let i = 0; i < half; i++) {
      const angle = f32(f32(pos) * inv[i]!);
      const c = f32(f32(Math.cos(angle)) * scale);
      const s = f32(f32(Math.sin(angle)) * scale);
      cos[p * dim + i] = c;
      cos[p * dim + i + half] = c;
      sin[p * dim + i] = s;
      sin[p * dim + i + half] = s;
    }
  }
  return { cos, sin };
}
