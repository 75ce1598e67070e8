/**
 * Reader of the zip archive `torch.save` writes (PyTorch >= 1.6):
 *
 *     <name>/data.pkl        the pickled object (here: a dict of tensors)
 *     <name>/data/<key>      the raw bytes of each storage, in the file's byte order
 *     <name>/byteorder       'little' or 'big' (absent in old files: little)
 *     <name>/version, <name>/.data/... bookkeeping we do not need
 *
 * The zip container is read by fflate; the pickle by our restricted unpickler. Entries are
 * only ever looked up by exact name inside the buffer, so nothing outside the archive is read.
 */
import { endianness } from 'node:os';
import { unzipSync, type UnzipFileInfo } from 'fflate';
import { types } from 'node:util';
import { TrimKVError } from '../errors.js';
import { DTYPE_BYTES } from '../constants.js';
import { invalid } from '../validate.js';
import type { DType, WeightArray } from '../types.js';
import { PyDict, TorchTensor, unpickle, type StorageRef } from './pickle.js';

/** Storage types and their dtype; the others torch knows are reported as ERR_CHECKPOINT_DTYPE. */
export const STORAGE_DTYPES: Readonly<Record<string, DType>> = {
  FloatStorage: 'fp32',
  HalfStorage: 'fp16',
  BFloat16Storage: 'bf16',
};


/** More entries than any state dict needs: guards against a central directory that lies. */
const MAX_ENTRIES = 1 << 20;
/** Deflate cannot expand beyond ~1032:1; torch never compresses, but re-zipped files may. */
const MAX_DEFLATE_RATIO = 1100;

/**
 * data.pkl may inflate to at most PICKLE_BASE + PICKLE_RATIO x its stored size (checked
 * before inflating): torch.save stores it uncompressed, and re-zipped state-dict pickles
 * deflate about 3:1, but a deflated run of one opcode would otherwise expand 1000-fold.
 */
const PICKLE_BASE = 1 << 20;
const PICKLE_RATIO = 64;

/** A state dict as read from the pickle: tensors stay unresolved until asked for. */
export interface TorchStateDict {
  /** Every string key of the top-level dict, in file order. */
  keys: string[];
  /** True when the value under `key` is a tensor. */
  isTensor(key: string): boolean;
  /** Shape of the tensor under `key` (read from the pickle, no data touched). */
  shape(key: string): number[];
  /** Materialises the tensor under `key` as a contiguous array in its stored dtype. */
  tensors(keys: readonly string[]): Map<string, WeightArray>;
}

/** True when the bytes start like a zip archive (local file header or an empty archive). */
function isZip(b: Uint8Array): boolean {
  return b.length >= 4 && b[0] === 0x50 && b[1] === 0x4b && (b[2] === 0x03 || b[2] === 0x05) && (b[3] === 0x04 || b[3] === 0x06);
}

function formatError(file: string, message: string): TrimKVError {
  return new TrimKVError('ERR_CHECKPOINT_FORMAT', `${file}: ${message}`);
}

/**
 * Unzips the entries `want` accepts, turning fflate's errors and lying size fields into ours.
 * `check` sees each accepted entry's sizes before it is inflated and may throw.
 */
function unzipEntries(
  bytes: Uint8Array,
  file: string,
  want: (name: string) => boolean,
  check?: (info: UnzipFileInfo) => void,
): Record<string, Uint8Array> {
  let count = 0;
  const sizes = new Map<string, number>();
  const filter = (info: UnzipFileInfo): boolean => {
    if (++count > MAX_ENTRIES) throw formatError(file, 'zip central directory lists too many entries');
    if (!want(info.name)) return false;
    if (info.compression !== 0 && info.compression !== 8) {
      throw formatError(file, `zip entry '${info.name}' uses unsupported compression method ${info.compression}`);
    }
    const limit = info.compression === 0 ? info.size : Math.min(info.size * MAX_DEFLATE_RATIO, 2 ** 32);
    if (info.originalSize > limit || info.size > bytes.length) {
      throw formatError(file, `zip entry '${info.name}' has inconsistent sizes (truncated or corrupt archive)`);
    }
    check?.(info);
    sizes.set(info.name, info.originalSize);
    return true;
  };
  let out: Record<string, Uint8Array>;
  try {
    out = unzipSync(bytes, { filter });
  } catch (e) {
    if (e instanceof TrimKVError) throw e;
    throw formatError(file, `not a readable zip archive (${(e as Error).message}); truncated or corrupt file?`);
  }
  for (const [name, size] of sizes) {
    // fflate silently cuts a stored entry that runs past the end of the buffer.
    if (out[name]?.length !== size) throw formatError(file, `zip entry '${name}' is truncated`);
  }
  return out;
}

/**
 * Opens a `torch.save` archive of a state dict.
 * @param bytes The whole `.pth` file.
 * @param file Path named in error messages.
 * @throws {TrimKVError} `ERR_CHECKPOINT_FORMAT` (not a zip, legacy format, truncated,
 *   malformed pickle, top level not a dict), `ERR_CHECKPOINT_UNSAFE` (see ./pickle.ts).
 */
export function readTorchStateDict(bytes: Uint8Array, file: string): TorchStateDict {
  if (!types.isUint8Array(bytes)) invalid('a Uint8Array', 'bytes', bytes);
  if (typeof file !== 'string') invalid('a string', 'file', file);
  if (!isZip(bytes)) {
    // Legacy (pre-1.6, or _use_new_zipfile_serialization=False) files start with a pickled magic number.
    const legacy = bytes.length >= 2 && bytes[0] === 0x80 && bytes[1]! <= 5;
    throw formatError(
      file,
      legacy
        ? 'legacy (non-zip) torch.save format is not supported; re-save it with torch.save(obj, path) from PyTorch >= 1.6'
        : 'not a torch.save zip archive (wrong magic bytes)',
    );
  }
  const meta = unzipEntries(bytes, file, (n) => /^[^/]+\/(data\.pkl|byteorder)$/.test(n), (info) => {
    const limit = info.name.endsWith('/byteorder') ? 16 : PICKLE_BASE + PICKLE_RATIO * info.size;
    if (info.originalSize > limit) {
      throw formatError(file, `zip entry '${info.name}' inflates to ${info.originalSize} bytes from ${info.size}, more than the ${limit} allowed`);
    }
  });
  const pkls = Object.keys(meta).filter((n) => n.endsWith('/data.pkl'));
  if (pkls.length !== 1) {
    throw formatError(file, pkls.length === 0 ? 'archive has no <name>/data.pkl entry' : 'archive has more than one data.pkl');
  }
  const prefix = pkls[0]!.slice(0, -'data.pkl'.length);
  const order = meta[`${prefix}byteorder`];
  const byteorder = order === undefined ? 'little' : new TextDecoder().decode(order).trim();
  if (byteorder !== 'little' && byteorder !== 'big') throw formatError(file, `unknown byteorder '${byteorder}'`);
  const swap = (byteorder === 'little') !== (endianness() === 'LE');

  const root = unpickle(meta[pkls[0]!]!, `${file} (${pkls[0]})`);
  if (!(root instanceof PyDict)) throw formatError(file, 'the pickled object is not a dict (state dict) of tensors');
  const entries = new Map<string, unknown>();
  for (const [k, v] of root.map) if (typeof k === 'string') entries.set(k, v);

  return {
    keys: [...entries.keys()],
    isTensor: (key) => entries.get(key) instanceof TorchTensor,
    shape: (key) => [...(entries.get(key) as TorchTensor).shape],
    tensors(keys) {
      const refs = keys.map((k) => {
        const t = entries.get(k);
        if (!(t instanceof TorchTensor)) throw formatError(file, `value of key '${k}' is not a tensor`);
        return [k, t] as const;
      });
      // Check dtypes before reading any storage so that the error names the key.
      for (const [k, t] of refs) {
        if (STORAGE_DTYPES[t.storage.typeName] === undefined) {
          throw new TrimKVError(
            'ERR_CHECKPOINT_DTYPE',
            `${file}: tensor '${k}' is stored as torch.${t.storage.typeName}; supported are ` +
              'FloatStorage (fp32), HalfStorage (fp16) and BFloat16Storage (bf16)',
          );
        }
      }
      // Element counts come from the storages, never from the shapes alone: every view must fit
      // its storage, and every storage its archive entry, before anything is inflated or allocated.
      const storages = new Map<string, StorageRef>();
      const firstKey = new Map<string, string>();
      for (const [k, t] of refs) {
        checkView(t, file, k);
        const name = `${prefix}data/${t.storage.key}`;
        const prev = storages.get(name);
        if (prev !== undefined && (prev.typeName !== t.storage.typeName || prev.numel !== t.storage.numel)) {
          throw formatError(file, `storage '${t.storage.key}' is declared with two different types or sizes`);
        }
        storages.set(name, t.storage);
        if (!firstKey.has(name)) firstKey.set(name, k);
      }
      const blobs = unzipEntries(bytes, file, (n) => storages.has(n), (info) => {
        const st = storages.get(info.name)!;
        const want = st.numel * DTYPE_BYTES[STORAGE_DTYPES[st.typeName]!];
        if (info.originalSize !== want) {
          throw formatError(
            file,
            `storage '${st.key}' of tensor '${firstKey.get(info.name)}' has ${info.originalSize} bytes in the archive, ` +
              `expected ${st.numel} x ${DTYPE_BYTES[STORAGE_DTYPES[st.typeName]!]}`,
          );
        }
      });
      const out = new Map<string, WeightArray>();
      for (const [k, t] of refs) {
        const name = `${prefix}data/${t.storage.key}`;
        const blob = blobs[name];
        if (blob === undefined) {
          throw new TrimKVError('ERR_CHECKPOINT_MISSING', `${file}: archive entry '${name}' holding tensor '${k}' is missing`);
        }
        out.set(k, materialize(t, blob, swap, file, k));
      }
      return out;
    },
  };
}

/**
 * Refuses a view that reads outside its storage or holds more elements than it: a stride-0
 * (or otherwise overlapping) view would turn a 4-byte storage into a tensor of gigabytes.
 */
function checkView(t: TorchTensor, file: string, key: string): void {
  let numel = 1;
  let last = t.offset;
  for (let i = 0; i < t.shape.length; i++) {
    numel *= t.shape[i]!;
    last += (t.shape[i]! - 1) * t.stride[i]!;
  }
  const view = `(offset ${t.offset}, size [${t.shape.join(', ')}], stride [${t.stride.join(', ')}])`;
  if (numel > t.storage.numel) {
    throw formatError(
      file,
      `tensor '${key}' ${view} has ${numel} elements but its storage '${t.storage.key}' only ${t.storage.numel} ` +
        '(a stride-0 or overlapping view; save the tensor contiguous)',
    );
  }
  if (numel > 0 && last >= t.storage.numel) {
    throw formatError(file, `tensor '${key}' ${view} reads past the end of its storage of ${t.storage.numel} elements`);
  }
}

/** Copies the strided view `t` of `blob` into a fresh contiguous array of the stored dtype. */
function materialize(t: TorchTensor, blob: Uint8Array, swap: boolean, file: string, key: string): WeightArray {
  const dtype = STORAGE_DTYPES[t.storage.typeName]!;
  const size = DTYPE_BYTES[dtype];
  if (blob.length !== t.storage.numel * size) {
    throw formatError(
      file,
      `storage '${t.storage.key}' of tensor '${key}' has ${blob.length} bytes, expected ${t.storage.numel} x ${size}`,
    );
  }
  checkView(t, file, key);
  const numel = t.shape.reduce((a, b) => a * b, 1);
  // Integer views copy bit patterns exactly (NaN payloads included); fresh buffer keeps alignment.
  const raw = new Uint8Array(blob);
  if (swap) for (let i = 0; i < raw.length; i += size) raw.subarray(i, i + size).reverse();
  const src = size === 4 ? new Uint32Array(raw.buffer) : new Uint16Array(raw.buffer);
  const dst = size === 4 ? new Uint32Array(numel) : new Uint16Array(numel);
  if (numel > 0) gather(src, dst, t.offset, t.shape, t.stride);
  const data = size === 4 ? new Float32Array(dst.buffer) : (dst as Uint16Array);
  return { dtype, shape: [...t.shape], data };
}

/** dst[i0, i1, ...] = src[offset + sum(i_k * stride_k)], row-major over `shape`. */
function gather(
  src: Uint32Array | Uint16Array,
  dst: Uint32Array | Uint16Array,
  offset: number,
  shape: readonly number[],
  stride: readonly number[],
): void {
  const nd = shape.length;
  if (nd === 0) {
    dst[0] = src[offset]!;
    return;
  }
  const inner = shape[nd - 1]!;
  const innerStride = stride[nd - 1]!;
  const idx = new Array<number>(nd - 1).fill(0);
  let base = offset;
  let o = 0;
  for (;;) {
    for (let j = 0, s = base; j < inner; j++, s += innerStride) dst[o++] = src[s]!;
    // Odometer increment over the outer dimensions.
    let d = nd - 2;
    for (; d >= 0; d--) {
      base += stride[d]!;
      if (++idx[d]! < shape[d]!) break;
      base -= stride[d]! * shape[d]!;
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}
