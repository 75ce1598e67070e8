/**
 * The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
 * header length N, N bytes of JSON `{ name: { dtype, shape, data_offsets: [begin, end] },
 * "__metadata__"?: { string: string } }`, then the tensors' bytes, little-endian, row-major,
 * offsets relative to the end of the header. Plain data: nothing to execute.
 */
import { endianness } from 'node:os';
import { types } from 'node:util';
import { TrimKVError } from '../errors.js';
import { DTYPE_BYTES } from '../constants.js';
import { argObject, describe, invalid, shapeOf } from '../validate.js';
import type { DType, WeightArray } from '../types.js';

const DTYPES: Readonly<Record<string, DType>> = { F32: 'fp32', F16: 'fp16', BF16: 'bf16' };
const NAMES: Readonly<Record<DType, string>> = { fp32: 'F32', fp16: 'F16', bf16: 'BF16' };
/** The reference implementation's limit on the header size. */
const MAX_HEADER = 100_000_000;

/** Header entry of one tensor, validated but not yet read. */
interface Entry {
  dtype: string;
  shape: number[];
  begin: number;
  end: number;
}

/** A safetensors file opened for reading. */
export interface SafetensorsFile {
  keys: string[];
  metadata: Record<string, string>;
  isTensor(key: string): boolean;
  /** Shape of the tensor under `key`, from the header. */
  shape(key: string): number[];
  /** Reads the tensors under `keys` into fresh arrays of their stored dtype. */
  tensors(keys: readonly string[]): Map<string, WeightArray>;
}

function formatError(file: string, message: string): TrimKVError {
  return new TrimKVError('ERR_CHECKPOINT_FORMAT', `${file}: ${message}`);
}

/** A safetensors header entry: its dtype name as written, shape, and byte span in the data. */
export interface SafetensorsEntry { dtype: string; shape: number[]; begin: number; end: number }

/**
 * @internal Parses and checks a safetensors header's JSON (the bytes after the 8-byte length),
 * for the checkpoint reader and the model-directory reader alike: a JSON object of entries
 * `{ dtype, shape, data_offsets }` within `dataLength` data bytes, and `__metadata__` a map of
 * strings. Dtypes are checked by the callers (their error codes differ).
 * @throws what `fail` makes of a message, for anything malformed.
 */
export function parseSafetensorsHeader(json: Uint8Array, dataLength: number, fail: (message: string) => Error):
  { entries: Map<string, SafetensorsEntry>; metadata: Record<string, string> } {
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(json));
  } catch (e) {
    throw fail(`safetensors header is not valid JSON (${(e as Error).message})`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) throw fail('safetensors header is not a JSON object');
  const entries = new Map<string, SafetensorsEntry>();
  let metadata: Record<string, string> = {};
  for (const [key, v] of Object.entries(header as Record<string, unknown>)) {
    if (key === '__metadata__') {
      if (typeof v !== 'object' || v === null || Array.isArray(v) || !Object.values(v).every((x) => typeof x === 'string')) {
        throw fail('__metadata__ is not a map of strings');
      }
      metadata = v as Record<string, string>;
      continue;
    }
    const e = v as Partial<Record<'dtype' | 'shape' | 'data_offsets', unknown>> | null;
    const shape = e?.shape;
    const offs = e?.data_offsets;
    if (
      typeof e?.dtype !== 'string' ||
      !Array.isArray(shape) ||
      shape.length > 16 ||
      !shape.every((d) => Number.isSafeInteger(d) && d >= 0) ||
      !Array.isArray(offs) ||
      offs.length !== 2 ||
      !offs.every((d) => Number.isSafeInteger(d) && d >= 0)
    ) {
      throw fail(`header entry of tensor '${key}' is malformed (${describe(v)})`);
    }
    const [begin, end] = offs as [number, number];
    if (begin > end || end > dataLength) {
      throw fail(`tensor '${key}' has data_offsets [${begin}, ${end}] outside the ${dataLength} data bytes; truncated?`);
    }
    entries.set(key, { dtype: e.dtype, shape: shape as number[], begin, end });
  }
  return { entries, metadata };
}

/**
 * Parses the header of a `.safetensors` file.
 * @param bytes The whole file.
 * @param file Path named in error messages.
 * @throws {TrimKVError} `ERR_CHECKPOINT_FORMAT` for a truncated file, a bad header or
 *   offsets outside the data; `ERR_CHECKPOINT_DTYPE` (from `tensors`) for dtypes other than
 *   F32, F16 and BF16.
 */
export function readSafetensors(bytes: Uint8Array, file: string): SafetensorsFile {
  if (!types.isUint8Array(bytes)) invalid('a Uint8Array', 'bytes', bytes);
  if (typeof file !== 'string') invalid('a string', 'file', file);
  if (bytes.length < 8) throw formatError(file, 'too short for a safetensors header');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = view.getBigUint64(0, true);
  if (n > BigInt(Math.min(bytes.length - 8, MAX_HEADER)) || bytes[8] !== 0x7b /* '{' */) {
    throw formatError(file, 'not a safetensors file (bad header length or header not JSON); truncated?');
  }
  const dataStart = 8 + Number(n);
  const dataLength = bytes.length - dataStart;
  const { entries, metadata } = parseSafetensorsHeader(bytes.subarray(8, dataStart), dataLength, (m) => formatError(file, m));
  return {
    keys: [...entries.keys()],
    metadata,
    isTensor: (key) => entries.has(key),
    shape: (key) => [...entries.get(key)!.shape],
    tensors(keys) {
      const out = new Map<string, WeightArray>();
      for (const key of keys) {
        const e = entries.get(key);
        if (e === undefined) throw new TrimKVError('ERR_CHECKPOINT_MISSING', `${file}: tensor '${key}' is missing`);
        const dtype = DTYPES[e.dtype];
        if (dtype === undefined) {
          throw new TrimKVError('ERR_CHECKPOINT_DTYPE', `${file}: tensor '${key}' has dtype ${e.dtype}; supported are F32, F16 and BF16`);
        }
        const size = DTYPE_BYTES[dtype];
        const numel = e.shape.reduce((a, b) => a * b, 1);
        if (e.end - e.begin !== numel * size) {
          throw formatError(file, `tensor '${key}' of shape [${e.shape.join(', ')}] ${e.dtype} spans ${e.end - e.begin} bytes, expected ${numel * size}`);
        }
        // A copy: aligned, and independent of the file buffer.
        const raw = bytes.slice(dataStart + e.begin, dataStart + e.end);
        if (endianness() !== 'LE') for (let i = 0; i < raw.length; i += size) raw.subarray(i, i + size).reverse();
        const data = size === 4 ? new Float32Array(raw.buffer) : new Uint16Array(raw.buffer);
        out.set(key, { dtype, shape: [...e.shape], data });
      }
      return out;
    },
  };
}

/**
 * Serialises tensors to the safetensors format (8-byte aligned, keys in the given order).
 * Handy to convert a `.pth` checkpoint for engines that only read safetensors.
 * @param tensors Name -> contiguous weight in its stored dtype.
 * @param metadata Optional string map stored as `__metadata__`.
 * @throws {TrimKVError} `ERR_CHECKPOINT_SHAPE` if a weight's data length or array type disagrees
 *   with its shape and dtype, `ERR_CHECKPOINT_DTYPE` for a dtype other than fp32, fp16 and bf16,
 *   `ERR_INVALID_ARGUMENT` (or `ERR_RANGE` for a dimension) for anything else it could not read
 *   back: a tensor that is not a `{ dtype, shape, data }` weight, a key that is not a string or
 *   is `__metadata__`, metadata that is not a map of strings, a header over 100 MB.
 */
export function encodeSafetensors(
  tensors: ReadonlyMap<string, WeightArray> | Readonly<Record<string, WeightArray>>,
  metadata?: Readonly<Record<string, string>>,
): Uint8Array {
  // A Map is iterated as it is (its entries are data); anything else is read once, key by key.
  const list: [unknown, unknown][] = types.isMap(tensors) && !types.isProxy(tensors)
    ? [...(tensors as ReadonlyMap<unknown, unknown>)]
    : Object.entries(argObject(tensors, 'tensors', 'a Map or object of weights'));
  const header: Record<string, unknown> = {};
  if (metadata !== undefined) {
    const meta = argObject(metadata, 'metadata', 'a map of strings');
    for (const [k, v] of Object.entries(meta)) if (typeof v !== 'string') invalid('a string', `metadata.${k}`, v);
    header.__metadata__ = { ...meta };
  }
  let offset = 0;
  const weights: WeightArray[] = [];
  for (const [key, w] of list) {
    if (typeof key !== 'string' || key === '__metadata__') invalid('a tensor name other than __metadata__', 'tensors key', key);
    const { dtype, shape: rawShape, data } = argObject(w, `tensors['${key}']`, 'a { dtype, shape, data } weight', ['dtype', 'shape', 'data'] as const);
    if (typeof dtype !== 'string' || !(dtype in NAMES)) {
      throw new TrimKVError('ERR_CHECKPOINT_DTYPE', `tensor '${key}': dtype ${describe(dtype)} is not one of 'fp32', 'fp16', 'bf16'`);
    }
    const { shape, numel } = shapeOf(rawShape, `tensors['${key}'].shape`);
    const typed = dtype === 'fp32' ? types.isFloat32Array(data) : types.isUint16Array(data);
    if (!typed || (data as Float32Array | Uint16Array).length !== numel) {
      throw new TrimKVError('ERR_CHECKPOINT_SHAPE', `tensor '${key}': data does not match shape [${shape.join(', ')}] and dtype ${dtype}`);
    }
    const bytes = (data as Float32Array | Uint16Array).byteLength;
    weights.push({ dtype, shape, data } as WeightArray);
    header[key] = { dtype: NAMES[dtype as WeightArray['dtype']], shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  if (JSON.stringify(header).length > MAX_HEADER) invalid(`a header of at most ${MAX_HEADER} bytes`, 'tensors', tensors, 'ERR_RANGE');
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) json = new TextEncoder().encode(JSON.stringify(header) + ' '.repeat(padded - json.length));
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let at = 8 + json.length;
  for (const w of weights) {
    const b = new Uint8Array(w.data.buffer, w.data.byteOffset, w.data.byteLength).slice();
    if (endianness() !== 'LE') for (let i = 0; i < b.length; i += w.data.BYTES_PER_ELEMENT) b.subarray(i, i + w.data.BYTES_PER_ELEMENT).reverse();
    out.set(b, at);
    at += b.length;
  }
  return out;
}
