/**
 * The weights of a Hugging Face model directory in safetensors: one `model.safetensors`, or
 * shards listed by `model.safetensors.index.json`. Only the headers are read when opening;
 * tensors are read later with positional reads into a caller's buffer, so a shard larger than
 * Node's Buffer limit (4 GiB) works, and no whole shard is ever held in memory.
 *
 * Every header is checked before any tensor is read: its length against the file size (and a
 * 100 MB cap, the reference implementation's), each entry's dtype (BF16, F16 or F32), shape,
 * and `data_offsets` (inside the file, the size of shape x dtype, not overlapping another).
 *
 * Error codes (all `TrimKVError`; messages name the file and the tensor):
 * - `ERR_MODEL_MISSING`: the directory, the weights, a shard, or a tensor is absent.
 * - `ERR_MODEL_FORMAT`: a corrupt or truncated file, a bad header or index, offsets out of
 *   range or overlapping, an index that disagrees with its shards.
 * - `ERR_MODEL_DTYPE`: a tensor's dtype is not BF16, F16 or F32.
 * - `ERR_MODEL_SHAPE`: (checkModelTensors) a tensor's shape disagrees with config.json, or
 *   the weights hold tensors the architecture does not have.
 */
import { constants as bufferConstants } from 'node:buffer';
import { open, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { join } from 'node:path';
import { TrimKVError } from '../errors.js';
import { DTYPE_BYTES } from '../constants.js';
import { parseSafetensorsHeader } from '../checkpoint/safetensors.js';
import type { DType, WeightArray } from '../types.js';
import { argObject, invalid, invalidText } from '../validate.js';
import { expectModelConfig, type ModelConfig } from './config.js';
import { isFile, readJsonObject, requireDir, show } from './files.js';

/** The reference implementation's limit on a safetensors header. */
export const MAX_SAFETENSORS_HEADER_BYTES = 100_000_000;

const DTYPES: Readonly<Record<string, DType>> = { BF16: 'bf16', F16: 'fp16', F32: 'fp32' };
/** One positional read moves at most this much (fs caps a single read below 2 GiB). */
const READ_CHUNK = 1 << 30;

/** Where one tensor lies. */
export interface TensorInfo {
  name: string;
  /** Path of the shard holding it. */
  file: string;
  dtype: DType;
  shape: number[];
  /** Absolute byte offset of its data in `file`. */
  offset: number;
  /** Byte length of its data (shape x dtype size). */
  bytes: number;
}

/** The header of one safetensors file. */
export interface SafetensorsHeader {
  file: string;
  /** File size in bytes. */
  size: number;
  /** Offset of the first data byte (8 + header length). */
  dataStart: number;
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

/** The weights of a model directory, opened. */
export interface ModelWeights {
  dir: string;
  /** The shard paths, in index order (one for a single `model.safetensors`). */
  files: string[];
  /** Every tensor of every shard. */
  tensors: ReadonlyMap<string, TensorInfo>;
  /** The index's `metadata` (e.g. `total_size`), or the single file's `__metadata__`. */
  metadata: Record<string, unknown>;
  /**
   * Reads a tensor's raw little-endian bytes, or the byte range `[start, end)` of them, with
   * positional reads. Into `into` (from its byte 0; it must be large enough) or a fresh buffer.
   * @returns The bytes read (a view of `into` when given).
   * @throws {TrimKVError} `ERR_MODEL_MISSING` for an unknown name; `ERR_RANGE` for a bad
   *   range or an `into` too small; `ERR_MODEL_FORMAT` if the file shrank; `ERR_DISPOSED`
   *   after `close`.
   */
  read(name: string, into?: Uint8Array, range?: { start?: number; end?: number }): Promise<Uint8Array>;
  /**
   * Reads a whole tensor as a typed array (Uint16Array bits for bf16/fp16, Float32Array for fp32).
   * @throws {TrimKVError} as `read`.
   */
  readWeight(name: string): Promise<WeightArray>;
  /** Closes the open shard files; reads after it throw `ERR_DISPOSED`. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

function formatError(file: string, message: string): TrimKVError {
  return new TrimKVError('ERR_MODEL_FORMAT', `${file}: ${message}`);
}

/** Reads exactly `length` bytes at `position` into `into` from byte 0, in chunks. */
async function readFully(fh: FileHandle, file: string, into: Uint8Array, length: number, position: number): Promise<void> {
  let done = 0;
  while (done < length) {
    const n = Math.min(READ_CHUNK, length - done);
    const { bytesRead } = await fh.read(into, done, n, position + done);
    if (bytesRead === 0) throw formatError(file, `ends before byte ${position + length} (file truncated while open?)`);
    done += bytesRead;
  }
}

/**
 * Reads and checks the header of one safetensors file with positional reads.
 * @param file Path of the file.
 * @throws {TrimKVError} `ERR_MODEL_MISSING` if it does not exist; `ERR_MODEL_FORMAT` for a
 *   header length beyond the file or 100 MB, a header that is not a JSON object, a malformed
 *   entry, offsets outside the file, inconsistent with the shape, or overlapping;
 *   `ERR_MODEL_DTYPE` for a dtype other than BF16, F16 and F32.
 */
export async function readSafetensorsHeader(file: string): Promise<SafetensorsHeader> {
  let fh: FileHandle;
  try {
    fh = await open(file, 'r');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new TrimKVError('ERR_MODEL_MISSING', code === 'ENOENT' ? `${file}: does not exist` : `${file}: cannot open (${(e as Error).message})`);
  }
  try {
    const size = (await fh.stat()).size;
    if (size < 8) throw formatError(file, `${size} bytes: too short for a safetensors header; truncated?`);
    const head = new Uint8Array(8);
    await readFully(fh, file, head, 8, 0);
    const n = new DataView(head.buffer).getBigUint64(0, true);
    // Checked before allocating: a hostile length must never reach an allocation.
    if (n > BigInt(MAX_SAFETENSORS_HEADER_BYTES) || n > BigInt(size - 8) || n < 2n) {
      throw formatError(file, `header length ${n} does not fit the ${size}-byte file (limit ${MAX_SAFETENSORS_HEADER_BYTES}); not a safetensors file, or truncated`);
    }
    const headerLength = Number(n);
    const bytes = new Uint8Array(headerLength);
    await readFully(fh, file, bytes, headerLength, 8);
    const dataStart = 8 + headerLength;
    return { file, size, dataStart, ...parseHeader(bytes, file, dataStart, size) };
  } finally {
    await fh.close();
  }
}

function parseHeader(
  bytes: Uint8Array,
  file: string,
  dataStart: number,
  size: number,
): { tensors: Map<string, TensorInfo>; metadata: Record<string, string> } {
  if (bytes[0] !== 0x7b /* '{' */) throw formatError(file, 'header is not a JSON object; not a safetensors file');
  const { entries, metadata } = parseSafetensorsHeader(bytes, size - dataStart, (m) => formatError(file, m));
  const tensors = new Map<string, TensorInfo>();
  for (const [name, { dtype: written, shape, begin, end }] of entries) {
    const dtype = DTYPES[written];
    if (dtype === undefined) {
      throw new TrimKVError('ERR_MODEL_DTYPE', `${file}: tensor '${name}' has dtype ${show(written)}; supported are BF16, F16 and F32`);
    }
    let numel = 1;
    for (const d of shape as number[]) numel = numel * d > Number.MAX_SAFE_INTEGER ? Infinity : numel * d;
    const want = numel * DTYPE_BYTES[dtype];
    if (end - begin !== want) {
      throw formatError(file, `tensor '${name}' of shape [${shape.join(', ')}] ${written} needs ${want} bytes but data_offsets [${begin}, ${end}] span ${end - begin}`);
    }
    tensors.set(name, { name, file, dtype, shape: [...shape], offset: dataStart + begin, bytes: end - begin });
  }
  // No two tensors may share bytes (empty tensors occupy none).
  const spans = [...tensors.values()].filter((t) => t.bytes > 0).sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < spans.length; i++) {
    const a = spans[i - 1]!;
    const b = spans[i]!;
    if (a.offset + a.bytes > b.offset) throw formatError(file, `tensors '${a.name}' and '${b.name}' overlap`);
  }
  return { tensors, metadata };
}

const SHARD_NAME = /^[^/\\]+\.safetensors$/;

/**
 * Opens the weights of a model directory: `model.safetensors` if present (as transformers
 * prefers it), else the shards of `model.safetensors.index.json`. Reads only the headers.
 * @param dir A Hugging Face model directory.
 * @throws {TrimKVError} `ERR_MODEL_MISSING` if the directory, both weight layouts, a shard,
 *   or a tensor the index names is absent; `ERR_MODEL_FORMAT` for a bad index (not JSON,
 *   no weight_map, a shard name with a path in it) or shard (see `readSafetensorsHeader`), or
 *   a shard holding a tensor the index does not list; `ERR_MODEL_DTYPE` as
 *   `readSafetensorsHeader`.
 */
export async function openModelWeights(dir: string): Promise<ModelWeights> {
  await requireDir(dir, 'model');
  const single = join(dir, 'model.safetensors');
  const indexPath = join(dir, 'model.safetensors.index.json');
  const tensors = new Map<string, TensorInfo>();
  let files: string[];
  let metadata: Record<string, unknown>;
  if (await isFile(single)) {
    const h = await readSafetensorsHeader(single);
    files = [single];
    metadata = h.metadata;
    for (const [k, t] of h.tensors) tensors.set(k, t);
  } else if (await isFile(indexPath)) {
    const index = await readJsonObject(indexPath, 'the safetensors index', 'ERR_MODEL_FORMAT');
    const map = index.weight_map;
    if (typeof map !== 'object' || map === null || Array.isArray(map)) {
      throw formatError(indexPath, `expected an object of tensor name -> shard file for 'weight_map' but received ${show(map)}`);
    }
    const byShard = new Map<string, string[]>();
    for (const [name, shard] of Object.entries(map as Record<string, unknown>)) {
      // A plain file name: an index must not make us read outside the directory.
      if (typeof shard !== 'string' || !SHARD_NAME.test(shard) || shard.startsWith('..')) {
        throw formatError(indexPath, `tensor '${name}' maps to ${show(shard)}, not a .safetensors file name in the directory`);
      }
      byShard.set(shard, [...(byShard.get(shard) ?? []), name]);
    }
    if (byShard.size === 0) throw formatError(indexPath, "'weight_map' lists no tensors");
    files = [];
    for (const [shard, names] of byShard) {
      const path = join(dir, shard);
      if (!(await isFile(path))) {
        throw new TrimKVError('ERR_MODEL_MISSING', `${path}: shard does not exist (the index puts ${names.length} tensors in it, e.g. '${names[0]}')`);
      }
      const h = await readSafetensorsHeader(path);
      files.push(path);
      for (const name of names) {
        const t = h.tensors.get(name);
        if (t === undefined) throw new TrimKVError('ERR_MODEL_MISSING', `${path}: tensor '${name}' is missing (${indexPath} puts it in this shard)`);
        tensors.set(name, t);
      }
      for (const name of h.tensors.keys()) {
        if (!tensors.has(name) || tensors.get(name)!.file !== path) {
          throw formatError(path, `holds tensor '${name}', which ${indexPath} ${map[name as keyof typeof map] === undefined ? 'does not list' : `puts in ${show(map[name as keyof typeof map])}`}`);
        }
      }
    }
    metadata = typeof index.metadata === 'object' && index.metadata !== null ? (index.metadata as Record<string, unknown>) : {};
  } else {
    throw new TrimKVError(
      'ERR_MODEL_MISSING',
      `${dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read, not PyTorch .bin files)`,
    );
  }
  const w = new WeightsReader(dir, files, tensors, metadata);
  WEIGHTS.add(w);
  return w;
}

/** The readers openModelWeights made (a brand: checkModelTensors trusts their tensor tables). */
const WEIGHTS = new WeakSet<object>();

class WeightsReader implements ModelWeights {
  private handles = new Map<string, Promise<FileHandle>>();
  private closed = false;

  constructor(
    readonly dir: string,
    readonly files: string[],
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    readonly metadata: Record<string, unknown>,
  ) {}

  private handle(file: string): Promise<FileHandle> {
    let h = this.handles.get(file);
    if (h === undefined) {
      h = open(file, 'r').catch((e: unknown) => {
        this.handles.delete(file);
        throw new TrimKVError('ERR_MODEL_MISSING', `${file}: cannot open (${(e as Error).message})`);
      });
      this.handles.set(file, h);
    }
    return h;
  }

  private info(name: string): TensorInfo {
    if (this.closed) throw new TrimKVError('ERR_DISPOSED', `weights of ${this.dir} are closed`);
    const t = this.tensors.get(name);
    if (t === undefined) throw new TrimKVError('ERR_MODEL_MISSING', `${this.dir}: tensor '${name}' is not in the model's weights`);
    return t;
  }

  async read(name: string, into?: Uint8Array, range: { start?: number; end?: number } = {}): Promise<Uint8Array> {
    const t = this.info(name);
    const start = range.start ?? 0;
    const end = range.end ?? t.bytes;
    if (!Number.isSafeInteger(start) || start < 0 || start > t.bytes) invalid(`an integer in [0, ${t.bytes}]`, 'range.start', start, 'ERR_RANGE');
    if (!Number.isSafeInteger(end) || end < start || end > t.bytes) invalid(`an integer in [${start}, ${t.bytes}]`, 'range.end', end, 'ERR_RANGE');
    const length = end - start;
    if (into !== undefined) {
      if (!(into instanceof Uint8Array)) invalid('a Uint8Array', 'into', into);
      if (into.byteLength < length) invalidText(`a buffer of at least ${length} bytes (tensor '${name}')`, 'into', `${into.byteLength} bytes`, 'ERR_RANGE');
    } else if (length > bufferConstants.MAX_LENGTH) {
      invalidText(`a range of at most ${bufferConstants.MAX_LENGTH} bytes (Node's Buffer limit)`, 'range', `${length} bytes of '${name}'`, 'ERR_RANGE');
    }
    const out = into ?? new Uint8Array(length);
    await readFully(await this.handle(t.file), t.file, out, length, t.offset + start);
    return out.subarray(0, length);
  }

  async readWeight(name: string): Promise<WeightArray> {
    const t = this.info(name);
    const size = DTYPE_BYTES[t.dtype];
    const raw = new Uint8Array(t.bytes); // fresh, so aligned for the typed array
    await this.read(name, raw);
    if (endianness() !== 'LE') for (let i = 0; i < raw.length; i += size) raw.subarray(i, i + size).reverse();
    const data = size === 4 ? new Float32Array(raw.buffer) : new Uint16Array(raw.buffer);
    return { dtype: t.dtype, shape: [...t.shape], data };
  }

  async close(): Promise<void> {
    this.closed = true;
    const hs = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(hs.map(async (h) => (await h.catch(() => undefined))?.close()));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** What `checkModelTensors` found. */
export interface ModelTensorCheck {
  /** dtype of the embedding (the model's dtype). */
  dtype: DType;
  /** Every dtype among the checked tensors (norms are sometimes stored in fp32). */
  dtypes: DType[];
  /** The tensor the output projection reads: `lm_head.weight`, or the embedding when tied. */
  lmHead: string;
  /** Tensors present but not used (a tied model's `lm_head.weight`, rotary inv_freq buffers). */
  ignored: string[];
}

/** Names and shapes a model of `config` must have (MODELS.md's table). */
export function expectedModelTensors(config: ModelConfig): Map<string, number[]> {
  expectModelConfig(config);
  const { hiddenSize: D, layers: L, qHeads: Hq, kvHeads: Hkv, headDim: hd, intermediateSize: I, vocabSize: V } = config;
  const m = new Map<string, number[]>([['model.embed_tokens.weight', [V, D]]]);
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`;
    m.set(`${p}input_layernorm.weight`, [D]);
    if (config.architecture === 'phi3') {
      m.set(`${p}self_attn.qkv_proj.weight`, [(Hq + 2 * Hkv) * hd, D]); // q, then k, then v rows
    } else {
      m.set(`${p}self_attn.q_proj.weight`, [Hq * hd, D]);
      m.set(`${p}self_attn.k_proj.weight`, [Hkv * hd, D]);
      m.set(`${p}self_attn.v_proj.weight`, [Hkv * hd, D]);
    }
    m.set(`${p}self_attn.o_proj.weight`, [D, Hq * hd]);
    if (config.architecture === 'qwen3') {
      m.set(`${p}self_attn.q_norm.weight`, [hd]);
      m.set(`${p}self_attn.k_norm.weight`, [hd]);
    }
    m.set(`${p}post_attention_layernorm.weight`, [D]);
    if (config.architecture === 'phi3') m.set(`${p}mlp.gate_up_proj.weight`, [2 * I, D]); // gate rows, then up
    else {
      m.set(`${p}mlp.gate_proj.weight`, [I, D]);
      m.set(`${p}mlp.up_proj.weight`, [I, D]);
    }
    m.set(`${p}mlp.down_proj.weight`, [D, I]);
  }
  m.set('model.norm.weight', [D]);
  if (!config.tieWordEmbeddings) m.set('lm_head.weight', [V, D]);
  return m;
}

const HARMLESS = /(^|\.)rotary_emb\.inv_freq$/;
const MAX_LISTED = 8;

/**
 * Checks that the weights hold exactly the tensors of `config`'s architecture with the shapes
 * config.json implies.
 * @param options.allowExtra Accept tensors the architecture does not use (default false:
 *   extras usually mean another architecture, e.g. projection biases).
 * @throws {TrimKVError} `ERR_MODEL_MISSING` listing absent tensors; `ERR_MODEL_SHAPE` listing
 *   mis-shaped or unexpected tensors with their files.
 */
export function checkModelTensors(weights: Pick<ModelWeights, 'tensors' | 'dir'>, config: ModelConfig, options: { allowExtra?: boolean } = {}): ModelTensorCheck {
  if (!WEIGHTS.has(weights as object)) invalid('ModelWeights from openModelWeights', 'weights', weights);
  expectModelConfig(config);
  const { allowExtra } = argObject(options, 'options', 'a { allowExtra } object', ['allowExtra'] as const);
  if (allowExtra !== undefined && typeof allowExtra !== 'boolean') invalid('a boolean', 'options.allowExtra', allowExtra);
  const expected = expectedModelTensors(config);
  const list = (items: string[]): string =>
    items.slice(0, MAX_LISTED).join('; ') + (items.length > MAX_LISTED ? `; and ${items.length - MAX_LISTED} more` : '');
  const missing = [...expected.keys()].filter((n) => !weights.tensors.has(n));
  if (missing.length > 0) {
    const tied = missing.includes('lm_head.weight') ? ` (${config.file} has tie_word_embeddings false)` : '';
    throw new TrimKVError('ERR_MODEL_MISSING', `${weights.dir}: ${missing.length} tensors of a ${config.architecture} model are missing${tied}: ${list(missing.map((n) => `'${n}'`))}`);
  }
  const bad: string[] = [];
  for (const [name, shape] of expected) {
    const t = weights.tensors.get(name)!;
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      bad.push(`'${name}' in ${t.file} is [${t.shape.join(', ')}], expected [${shape.join(', ')}]`);
    }
  }
  if (bad.length > 0) throw new TrimKVError('ERR_MODEL_SHAPE', `${weights.dir}: tensors disagree with ${config.file}: ${list(bad)}`);
  const ignored: string[] = [];
  const extra: string[] = [];
  for (const [name, t] of weights.tensors) {
    if (expected.has(name)) continue;
    if (HARMLESS.test(name) || (config.tieWordEmbeddings && name === 'lm_head.weight') || allowExtra === true) ignored.push(name);
    else extra.push(`'${name}' in ${t.file}`);
  }
  if (extra.length > 0) {
    throw new TrimKVError('ERR_MODEL_SHAPE', `${weights.dir}: tensors a ${config.architecture} model of ${config.file} does not have: ${list(extra)}`);
  }
  const dtypes = [...new Set([...expected.keys()].map((n) => weights.tensors.get(n)!.dtype))];
  return {
    dtype: weights.tensors.get('model.embed_tokens.weight')!.dtype,
    dtypes,
    lmHead: config.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight',
    ignored,
  };
}
