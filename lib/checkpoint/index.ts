/**
 * Loading the authors' released TRIM-KV checkpoints (SPEC section 3): a directory with a
 * Hugging Face `config.json` and the retention-gate weights alone, either as the PyTorch
 * state dict `trimkv_weights.pth` (read without Python and without executing anything) or
 * as a `.safetensors` file with the same keys.
 *
 * Error codes (all `TrimKVError`; every message names the file and, where there is one, the key):
 * - `ERR_CHECKPOINT_MISSING`: the directory, `config.json`, the weights file, a required key
 *   or an archive entry a tensor points to does not exist.
 * - `ERR_CHECKPOINT_FORMAT`: a file is not what it claims (wrong magic, truncated or corrupt
 *   zip, malformed pickle or safetensors header, a storage smaller than its tensor).
 * - `ERR_CHECKPOINT_UNSAFE`: the pickle asks for anything but plain data: a global outside
 *   the allowlist (e.g. `os.system`, `builtins.eval`), an object-instantiating opcode, a
 *   persistent id that is not a storage of the archive.
 * - `ERR_CHECKPOINT_DTYPE`: a gate tensor is not fp32, fp16 or bf16.
 * - `ERR_CHECKPOINT_SHAPE`: a gate tensor's shape disagrees with what config.json implies.
 * - `ERR_CHECKPOINT_CONFIG`: config.json is not valid JSON, lacks or has a bad value in a
 *   field the gate needs, names an unsupported gate or activation, or disagrees with the
 *   weights' structure (gate keys of another variant, layers beyond num_hidden_layers).
 * - `ERR_INVALID_ARGUMENT`: an argument of the wrong type (a `dir` that is not a string,
 *   `options` that is not an object, weights that are not a Uint8Array, ...).
 *
 * Untrusted files: cost is bounded by the bytes read, not by what a file declares (see
 * README.md, "Untrusted files"): the unpickler's limits (./checkpoint/pickle.ts
 * PICKLE_LIMITS), data.pkl inflating at most 1 MiB + 64x its stored size, every tensor view
 * within and no larger than its storage, every storage exactly its archive entry's size, all
 * checked before anything is inflated or allocated.
 */
import { readFile, readdir, stat } from 'node:fs/promises';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { types } from 'node:util';
import { ACTIVATIONS, GATE_KINDS, STRATEGIES } from '../constants.js';
import { TrimKVError } from '../errors.js';
import type { Activation, CacheConfig, GateKind, GateSpec, GluGateWeights, MlpGateWeights, Strategy, WeightArray } from '../types.js';
import { argObject, describe, invalid, oneOf } from '../validate.js';
import { readSafetensors } from './safetensors.js';
import { readTorchStateDict } from './torch.js';

export { encodeSafetensors, readSafetensors } from './safetensors.js';
export type { SafetensorsFile } from './safetensors.js';
export { readTorchStateDict } from './torch.js';
export type { TorchStateDict } from './torch.js';

/** Cache settings config.json carries, as `CacheConfig` fields (add `batch` to build a cache). */
export type CheckpointCacheDefaults = Partial<
  Pick<CacheConfig, 'layers' | 'qHeads' | 'kvHeads' | 'headDim' | 'memory' | 'buffer' | 'strategy' | 'floor'>
>;

/** What `loadCheckpoint` returns. */
export interface Checkpoint {
  /** config.json as parsed, untouched. */
  config: Record<string, unknown>;
  kind: GateKind;
  activation: Activation;
  /** One gate per layer (num_hidden_layers), weights in their stored dtype. */
  layers: GateSpec[];
  cacheDefaults: CheckpointCacheDefaults;
  /** config.json's `compress_strategy` as written (also when it is not a `Strategy`). */
  compressStrategy?: string;
  source: 'pth' | 'safetensors';
  /** Path of the weights file read. */
  file: string;
}

export interface LoadCheckpointOptions {
  /**
   * Which weights file to read: a file name inside the directory, or a format. Default:
   * `trimkv_weights.pth` if present, else `trimkv_weights.safetensors`, else the directory's
   * only `*.safetensors` file.
   */
  weights?: 'pth' | 'safetensors' | (string & {});
}

/** Parameter names under `...layers.{l}.self_attn.retention_gate.` for each variant. */
const PARAMS = {
  rg: ['linear1.weight', 'linear1.bias', 'linear2.weight', 'bias'],
  rg2: ['linear1.weight', 'linear1.bias', 'linear2.weight', 'bias'],
  rg3: ['gate_proj.weight', 'up_proj.weight', 'down_proj.weight', 'bias'],
} as const satisfies Record<GateKind, readonly string[]>;

const GATE_KEY = /^(.*?)layers\.(\d+)\.self_attn\.retention_gate\.(.+)$/;

/** A reader of one weights file: its keys, and the tensors of some of them. */
interface WeightsReader {
  keys: string[];
  isTensor(key: string): boolean;
  shape(key: string): number[];
  tensors(keys: readonly string[]): Map<string, WeightArray>;
}

/**
 * Loads a TRIM-KV checkpoint directory.
 * @param dir Directory with `config.json` and `trimkv_weights.pth` or a `.safetensors` file.
 * @returns The gate of every layer and the cache defaults of config.json.
 * @throws {TrimKVError} `ERR_CHECKPOINT_*` (see the module documentation).
 */
export async function loadCheckpoint(dir: string, options: LoadCheckpointOptions = {}): Promise<Checkpoint> {
  checkLoadArguments(dir, options);
  await statDir(dir);
  const configPath = join(dir, 'config.json');
  const configText = await readOrMissing(configPath, 'config.json', (p) => readFile(p, 'utf8'));
  const config = parseConfig(configText, configPath);
  const { file, source } = pickWeights(dir, await readdir(dir), options);
  const bytes = await readOrMissing(file, 'the weights file', (p) => readFile(p));
  return buildCheckpoint(config, configPath, file, source, new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
}

/**
 * Synchronous `loadCheckpoint`.
 * @throws {TrimKVError} `ERR_CHECKPOINT_*` (see the module documentation).
 */
export function loadCheckpointSync(dir: string, options: LoadCheckpointOptions = {}): Checkpoint {
  checkLoadArguments(dir, options);
  statDirSync(dir);
  const configPath = join(dir, 'config.json');
  const configText = readOrMissingSync(configPath, 'config.json', (p) => readFileSync(p, 'utf8'));
  const config = parseConfig(configText, configPath);
  const { file, source } = pickWeights(dir, readdirSync(dir), options);
  const bytes = readOrMissingSync(file, 'the weights file', (p) => readFileSync(p));
  return buildCheckpoint(config, configPath, file, source, new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
}

/**
 * Builds the checkpoint from an already read config.json object and weights file.
 * @param config Parsed config.json.
 * @param weights Bytes of a `.pth` (torch.save zip) or `.safetensors` file.
 * @param source Format of `weights`.
 * @param file Name used in error messages.
 * @throws {TrimKVError} `ERR_CHECKPOINT_*` (see the module documentation).
 */
export function parseCheckpoint(
  config: Record<string, unknown>,
  weights: Uint8Array,
  source: 'pth' | 'safetensors',
  file = source === 'pth' ? 'trimkv_weights.pth' : 'trimkv_weights.safetensors',
): Checkpoint {
  config = argObject(config, 'config', 'a config.json object') as Record<string, unknown>;
  if (!types.isUint8Array(weights)) invalid('a Uint8Array', 'weights', weights);
  oneOf(source, 'source', ['pth', 'safetensors'] as const);
  if (typeof file !== 'string') invalid('a string', 'file', file);
  return buildCheckpoint(config, 'config.json', file, source, weights);
}

/** @throws {TrimKVError} ERR_INVALID_ARGUMENT */
function checkLoadArguments(dir: unknown, options: unknown): void {
  if (typeof dir !== 'string') invalid('a directory path (string)', 'dir', dir);
  const { weights: w } = argObject(options, 'options', 'a LoadCheckpointOptions object', ['weights'] as const);
  if (w !== undefined && (typeof w !== 'string' || w === '')) invalid("'pth', 'safetensors' or a file name", 'options.weights', w);
}

async function statDir(dir: string): Promise<void> {
  let isDir = false;
  try {
    isDir = (await stat(dir)).isDirectory();
  } catch {
    /* reported below */
  }
  if (!isDir) throw new TrimKVError('ERR_CHECKPOINT_MISSING', `${dir}: checkpoint directory does not exist`);
}

function statDirSync(dir: string): void {
  let isDir = false;
  try {
    isDir = statSync(dir).isDirectory();
  } catch {
    /* reported below */
  }
  if (!isDir) throw new TrimKVError('ERR_CHECKPOINT_MISSING', `${dir}: checkpoint directory does not exist`);
}

function missing(path: string, what: string, e: unknown): TrimKVError {
  const code = (e as NodeJS.ErrnoException).code;
  return new TrimKVError(
    'ERR_CHECKPOINT_MISSING',
    code === 'ENOENT' ? `${path}: ${what} does not exist` : `${path}: cannot read ${what} (${(e as Error).message})`,
  );
}

async function readOrMissing<T>(path: string, what: string, read: (p: string) => Promise<T>): Promise<T> {
  try {
    return await read(path);
  } catch (e) {
    throw missing(path, what, e);
  }
}

function readOrMissingSync<T>(path: string, what: string, read: (p: string) => T): T {
  try {
    return read(path);
  } catch (e) {
    throw missing(path, what, e);
  }
}

function parseConfig(text: string, path: string): Record<string, unknown> {
  let config: unknown;
  try {
    config = JSON.parse(text);
  } catch (e) {
    throw new TrimKVError('ERR_CHECKPOINT_CONFIG', `${path}: not valid JSON (${(e as Error).message})`);
  }
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw new TrimKVError('ERR_CHECKPOINT_CONFIG', `${path}: expected a JSON object`);
  }
  return config as Record<string, unknown>;
}

function pickWeights(dir: string, names: string[], options: LoadCheckpointOptions): { file: string; source: 'pth' | 'safetensors' } {
  const want = options.weights;
  const sourceOf = (n: string): 'pth' | 'safetensors' => (n.endsWith('.safetensors') ? 'safetensors' : 'pth');
  if (want !== undefined && want !== 'pth' && want !== 'safetensors') return { file: join(dir, want), source: sourceOf(want) };
  if (want !== 'safetensors' && (want === 'pth' || names.includes('trimkv_weights.pth'))) {
    return { file: join(dir, 'trimkv_weights.pth'), source: 'pth' };
  }
  if (names.includes('trimkv_weights.safetensors')) return { file: join(dir, 'trimkv_weights.safetensors'), source: 'safetensors' };
  const st = names.filter((n) => n.endsWith('.safetensors'));
  if (st.length === 1) return { file: join(dir, st[0]!), source: 'safetensors' };
  throw new TrimKVError(
    'ERR_CHECKPOINT_MISSING',
    st.length > 1
      ? `${dir}: several .safetensors files (${st.join(', ')}); name one with options.weights`
      : `${join(dir, want === 'safetensors' ? 'trimkv_weights.safetensors' : 'trimkv_weights.pth')}: ` +
          'weights file does not exist (expected trimkv_weights.pth or a .safetensors file)',
  );
}

/** Reads config fields, falling back to `text_config` (multimodal configs nest the LM there). */
class ConfigReader {
  constructor(
    private readonly config: Record<string, unknown>,
    private readonly path: string,
  ) {}

  get(field: string): unknown {
    if (field in this.config) return this.config[field];
    const text = this.config.text_config;
    if (typeof text === 'object' && text !== null && field in text) return (text as Record<string, unknown>)[field];
    return undefined;
  }

  error(field: string, expected: string, value: unknown): TrimKVError {
    // describe, not JSON.stringify: a value nested thousands deep would overflow the stack.
    return new TrimKVError(
      'ERR_CHECKPOINT_CONFIG',
      `${this.path}: expected ${expected} for '${field}' but received ${value === undefined ? 'nothing (field missing)' : describe(value)}`,
    );
  }

  int(field: string, min: number, fallback?: () => number | undefined): number {
    const v = this.get(field) ?? fallback?.();
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw this.error(field, `an integer >= ${min}`, v);
    return v;
  }

  optionalInt(field: string, min: number): number | undefined {
    return this.get(field) === undefined || this.get(field) === null ? undefined : this.int(field, min);
  }

  oneOf<T extends string>(field: string, values: readonly T[], fallback?: T): T {
    const v = this.get(field) ?? fallback;
    if (typeof v !== 'string' || !(values as readonly string[]).includes(v)) {
      throw this.error(field, `one of ${values.map((s) => `'${s}'`).join(', ')}`, v);
    }
    return v as T;
  }
}

function buildCheckpoint(
  config: Record<string, unknown>,
  configPath: string,
  file: string,
  source: 'pth' | 'safetensors',
  bytes: Uint8Array,
): Checkpoint {
  const c = new ConfigReader(config, configPath);
  // The reference's TrimKV*Config classes default retention_gate to 'rg'.
  const kind = c.oneOf('retention_gate', GATE_KINDS, 'rg');
  const activation = c.oneOf('hidden_act', ACTIVATIONS);
  const numLayers = c.int('num_hidden_layers', 1);
  const hiddenSize = c.int('hidden_size', 1);
  const qHeads = c.optionalInt('num_attention_heads', 1);
  const kvHeads = c.int('num_key_value_heads', 1, () => qHeads);
  // Llama / Phi-3 configs may lack head_dim: Hugging Face then uses hidden_size / heads.
  const headDim =
    kind === 'rg' && c.get('head_dim') === undefined && qHeads === undefined
      ? undefined
      : c.int('head_dim', 1, () => (qHeads !== undefined && hiddenSize % qHeads === 0 ? hiddenSize / qHeads : undefined));
  const inputSize = kind === 'rg' ? hiddenSize : kvHeads * 2 * headDim!;
  const cacheDefaults = readCacheDefaults(c, numLayers, qHeads, kvHeads, headDim);
  const rawStrategy = c.get('compress_strategy');

  const reader: WeightsReader = source === 'pth' ? readTorchStateDict(bytes, file) : readSafetensors(bytes, file);
  const wanted = gateKeys(reader, kind, numLayers, file, configPath);

  // retention_gate_intermediate_size defaults differ between model classes: read it from the weights if absent.
  const intermediateSize = c.int('retention_gate_intermediate_size', 1, () => reader.shape(wanted.get(0)![0]!)[0]);

  const expected: Record<string, number[]> =
    kind === 'rg3'
      ? {
          'gate_proj.weight': [intermediateSize, inputSize],
          'up_proj.weight': [intermediateSize, inputSize],
          'down_proj.weight': [kvHeads, intermediateSize],
          bias: [kvHeads],
        }
      : {
          'linear1.weight': [intermediateSize, inputSize],
          'linear1.bias': [intermediateSize],
          'linear2.weight': [kvHeads, intermediateSize],
          bias: [kvHeads],
        };
  const why =
    `(${kind === 'rg' ? `hidden_size ${hiddenSize}` : `num_key_value_heads ${kvHeads} x 2 x head_dim ${headDim}`}, ` +
    `retention_gate_intermediate_size ${intermediateSize}, num_key_value_heads ${kvHeads})`;
  // Shapes are checked before any data is read, so a hostile size never reaches an allocation.
  for (const keys of wanted.values()) {
    keys.forEach((key, i) => {
      const shape = reader.shape(key);
      const want = expected[PARAMS[kind][i]!]!;
      if (shape.length !== want.length || shape.some((d, j) => d !== want[j])) {
        throw new TrimKVError(
          'ERR_CHECKPOINT_SHAPE',
          `${file}: tensor '${key}' has shape [${shape.join(', ')}] but ${configPath} ${why} implies [${want.join(', ')}]`,
        );
      }
    });
  }
  const tensors = reader.tensors([...wanted.values()].flat());

  const layers: GateSpec[] = [];
  for (let l = 0; l < numLayers; l++) {
    const w = wanted.get(l)!.map((key) => tensors.get(key)!);
    const weights: MlpGateWeights | GluGateWeights =
      kind === 'rg3'
        ? { gateProj: w[0]!, upProj: w[1]!, downProj: w[2]!, bias: w[3]! }
        : { linear1Weight: w[0]!, linear1Bias: w[1]!, linear2Weight: w[2]!, bias: w[3]! };
    layers.push({ kind, activation, inputSize, intermediateSize, kvHeads, weights });
  }

  const result: Checkpoint = { config, kind, activation, layers, cacheDefaults, source, file };
  if (typeof rawStrategy === 'string') result.compressStrategy = rawStrategy;
  CHECKPOINTS.add(result);
  return result;
}

/** The checkpoints this module made (a brand: functions taking a Checkpoint check it). */
const CHECKPOINTS = new WeakSet<object>();

/** @internal Whether `v` is a Checkpoint made by loadCheckpoint / parseCheckpoint. */
export function isCheckpoint(v: unknown): v is Checkpoint {
  return typeof v === 'object' && v !== null && CHECKPOINTS.has(v);
}

function readCacheDefaults(
  c: ConfigReader,
  layers: number,
  qHeads: number | undefined,
  kvHeads: number,
  headDim: number | undefined,
): CheckpointCacheDefaults {
  const d: CheckpointCacheDefaults = { layers, kvHeads };
  if (qHeads !== undefined) d.qHeads = qHeads;
  if (headDim !== undefined) d.headDim = headDim;
  const memory = c.optionalInt('memory_size', 1);
  if (memory !== undefined) d.memory = memory;
  const buffer = c.optionalInt('buffer_size', 0);
  if (buffer !== undefined) d.buffer = buffer;
  const strategy = c.get('compress_strategy');
  if (strategy !== undefined && strategy !== null && typeof strategy !== 'string') {
    throw c.error('compress_strategy', 'a string', strategy);
  }
  if ((STRATEGIES as readonly unknown[]).includes(strategy)) d.strategy = strategy as Strategy;
  const floor = c.get('floor_budget_ratio');
  if (floor !== undefined && floor !== null) {
    if (typeof floor !== 'number' || !(floor >= 0 && floor < 1)) throw c.error('floor_budget_ratio', 'a number in [0, 1)', floor);
    d.floor = floor;
  }
  return d;
}

/** The gate keys of every layer, in PARAMS order, checked for presence, type and strays. */
function gateKeys(
  reader: WeightsReader,
  kind: GateKind,
  numLayers: number,
  file: string,
  configPath: string,
): Map<number, string[]> {
  const params: readonly string[] = PARAMS[kind];
  const found = new Map<string, string>(); // `${layer}/${param}` -> key
  for (const key of reader.keys) {
    const m = GATE_KEY.exec(key);
    if (m === null) continue; // not a gate weight: a full model state dict may hold others
    const layer = Number(m[2]);
    const param = m[3]!;
    if (!params.includes(param)) {
      throw new TrimKVError(
        'ERR_CHECKPOINT_CONFIG',
        `${file}: key '${key}' is not a parameter of retention_gate '${kind}' (${params.join(', ')}); ` +
          `does ${configPath}'s retention_gate match the weights?`,
      );
    }
    if (layer >= numLayers) {
      throw new TrimKVError(
        'ERR_CHECKPOINT_CONFIG',
        `${file}: key '${key}' names layer ${layer} but ${configPath} has num_hidden_layers ${numLayers}`,
      );
    }
    const slot = `${layer}/${param}`;
    const prev = found.get(slot);
    if (prev !== undefined) throw new TrimKVError('ERR_CHECKPOINT_FORMAT', `${file}: keys '${prev}' and '${key}' both hold layer ${layer}'s ${param}`);
    if (!reader.isTensor(key)) throw new TrimKVError('ERR_CHECKPOINT_FORMAT', `${file}: value of key '${key}' is not a tensor`);
    found.set(slot, key);
  }
  const prefix = [...found.values()][0]?.match(GATE_KEY)?.[1] ?? 'model.';
  const out = new Map<number, string[]>();
  for (let l = 0; l < numLayers; l++) {
    out.set(
      l,
      params.map((p) => {
        const key = found.get(`${l}/${p}`);
        if (key === undefined) {
          throw new TrimKVError('ERR_CHECKPOINT_MISSING', `${file}: key '${prefix}layers.${l}.self_attn.retention_gate.${p}' is missing`);
        }
        return key;
      }),
    );
  }
  return out;
}
