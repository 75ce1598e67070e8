/**
 * lib/checkpoint: loading the authors' TRIM-KV checkpoints (config.json + trimkv_weights.pth
 * or .safetensors).
 *
 * - Synthetic checkpoints: archives laid out byte for byte like torch.save's (built here),
 *   for every gate kind x stored dtype x file format, with strided / offset / shared storages.
 * - Torch-written fixtures (test/fixtures/checkpoints/, made by
 *   scripts/make_checkpoint_fixtures.py): loaded weights reproduce the lam PyTorch computed,
 *   through a float64 oracle and through the runtime's gate.
 * - Malformed and hostile files, one test each, asserting class, code and message.
 */
import { existsSync, mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { unzipSync, zipSync, type Zippable } from 'fflate';
import { afterAll, describe, expect, test } from 'vitest';
import {
  encodeSafetensors,
  loadCheckpoint,
  loadCheckpointSync,
  parseCheckpoint,
  readSafetensors,
  type Checkpoint,
} from '../lib/checkpoint/index.js';
import { TrimKVError } from '../lib/errors.js';
import type { Activation, DType, GateKind, GateSpec, GluGateWeights, MlpGateWeights, WeightArray, WeightInput } from '../lib/types.js';
import { decodeBits, numberToBf16Bits, numberToFp16Bits } from './helpers.js';

const here = dirname(fileURLToPath(import.meta.url));
const FIXTURES = join(here, 'fixtures', 'checkpoints');
const tmpRoot = mkdtempSync(join(tmpdir(), 'trimkv-ckpt-'));
afterAll(() => rmSync(tmpRoot, { recursive: true, force: true }));
let dirCount = 0;
function freshDir(): string {
  const d = join(tmpRoot, `c${dirCount++}`);
  mkdirSync(d);
  return d;
}

/** Named tolerances (relative, on lam): the gate math is float32 whatever the weight dtype. */
const TOL_LAM: Readonly<Record<DType, number>> = { fp32: 1e-5, fp16: 1e-4, bf16: 1e-4 };

// ---------------------------------------------------------------------------------------------
// A pickle writer emitting exactly the opcodes torch.save uses (protocol 2), plus raw opcodes
// for hostile streams.
// ---------------------------------------------------------------------------------------------
class PickleWriter {
  private readonly out: number[] = [];
  op(...bytes: number[]): this {
    this.out.push(...bytes);
    return this;
  }
  proto(): this {
    return this.op(0x80, 2);
  }
  global(module: string, name: string): this {
    return this.op(0x63, ...Buffer.from(`${module}\n${name}\n`, 'latin1'));
  }
  str(s: string): this {
    const b = Buffer.from(s, 'utf8');
    return this.op(0x58, b.length & 0xff, (b.length >> 8) & 0xff, (b.length >> 16) & 0xff, b.length >>> 24, ...b);
  }
  int(n: number): this {
    if (n < 256) return this.op(0x4b, n);
    if (n < 65536) return this.op(0x4d, n & 0xff, n >> 8);
    return this.op(0x4a, n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >>> 24) & 0xff);
  }
  ints(v: readonly number[]): this {
    if (v.length === 0) return this.op(0x29);
    if (v.length > 3) this.op(0x28);
    for (const x of v) this.int(x);
    return this.op(v.length > 3 ? 0x74 : 0x84 + v.length);
  }
  mark(): this {
    return this.op(0x28);
  }
  put(i: number): this {
    return this.op(0x71, i);
  }
  get(i: number): this {
    return this.op(0x68, i);
  }
  bytes(): Uint8Array {
    return Uint8Array.from(this.out);
  }
}

/** One tensor of a synthetic state dict: a view of storage `storage`. */
interface TensorRef {
  key: string;
  storage: string;
  storageType: string;
  numel: number;
  offset: number;
  shape: number[];
  stride: number[];
}

/** The data.pkl torch.save writes for `{key: tensor}` (OrderedDict, optionally with `_metadata`). */
function stateDictPickle(refs: TensorRef[], opts: { ordered?: boolean; metadata?: boolean } = {}): Uint8Array {
  const p = new PickleWriter().proto();
  if (opts.ordered ?? true) p.global('collections', 'OrderedDict').put(0).op(0x29, 0x52).put(1);
  else p.op(0x7d).put(1);
  p.mark();
  for (const r of refs) {
    p.str(r.key).global('torch._utils', '_rebuild_tensor_v2').mark();
    p.mark().str('storage').global('torch', r.storageType).str(r.storage).str('cpu').int(r.numel).op(0x74).op(0x51);
    p.int(r.offset).ints(r.shape).ints(r.stride).op(0x89);
    if (opts.ordered ?? true) p.get(0);
    else p.global('collections', 'OrderedDict');
    p.op(0x29, 0x52).op(0x74).op(0x52);
  }
  p.op(0x75);
  if (opts.metadata) {
    // state = {'_metadata': OrderedDict({'': {'version': 1}})}, applied with BUILD
    p.op(0x7d).str('_metadata').global('collections', 'OrderedDict').op(0x29, 0x52);
    p.str('').op(0x7d).str('version').int(1).op(0x73).op(0x73).op(0x73).op(0x62);
  }
  return p.op(0x2e).bytes();
}

const CRC_TABLE = Uint32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(b: Uint8Array): number {
  let c = 0xffffffff;
  for (const x of b) c = CRC_TABLE[(c ^ x) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/**
 * A zip as PyTorch's writer (miniz with MZ_ZIP_FLAG_WRITE_ZIP64) lays it out: stored entries,
 * data aligned to 64 bytes through an 'FB' padding extra field, and, with `zip64`, sizes and
 * offsets moved to zip64 extra fields and a zip64 end-of-central-directory record + locator.
 */
function minizZip(entries: [string, Uint8Array][], zip64: boolean): Uint8Array {
  const parts: Uint8Array[] = [];
  const central: Uint8Array[] = [];
  let at = 0;
  const le = (size: number, v: number | bigint): Uint8Array => {
    const b = new Uint8Array(size);
    const d = new DataView(b.buffer);
    if (size === 2) d.setUint16(0, Number(v), true);
    else if (size === 4) d.setUint32(0, Number(v), true);
    else d.setBigUint64(0, BigInt(v), true);
    return b;
  };
  const cat = (...xs: Uint8Array[]): Uint8Array => {
    const out = new Uint8Array(xs.reduce((a, x) => a + x.length, 0));
    let o = 0;
    for (const x of xs) {
      out.set(x, o);
      o += x.length;
    }
    return out;
  };
  const FF = 0xffffffff;
  for (const [name, data] of entries) {
    const nameB = Buffer.from(name);
    const crc = crc32(data);
    const z64local = zip64 ? cat(le(2, 1), le(2, 16), le(8, data.length), le(8, data.length)) : new Uint8Array(0);
    const base = at + 30 + nameB.length + z64local.length + 4;
    const pad = (64 - (base % 64)) % 64;
    const extra = cat(z64local, le(2, 0x4246), le(2, pad), new Uint8Array(pad));
    const size32 = zip64 ? FF : data.length;
    parts.push(cat(le(4, 0x04034b50), le(2, zip64 ? 45 : 20), le(2, 0), le(2, 0), le(2, 0), le(2, 0x21), le(4, crc),
      le(4, size32), le(4, size32), le(2, nameB.length), le(2, extra.length), nameB, extra, data));
    const cext = zip64 ? cat(le(2, 1), le(2, 24), le(8, data.length), le(8, data.length), le(8, at)) : new Uint8Array(0);
    central.push(cat(le(4, 0x02014b50), le(2, 45), le(2, zip64 ? 45 : 20), le(2, 0), le(2, 0), le(2, 0), le(2, 0x21), le(4, crc),
      le(4, size32), le(4, size32), le(2, nameB.length), le(2, cext.length), le(2, 0), le(2, 0), le(2, 0), le(4, 0),
      le(4, zip64 ? FF : at), nameB, cext));
    at += parts[parts.length - 1]!.length;
  }
  const cd = cat(...central);
  const cdAt = at;
  const tail: Uint8Array[] = [];
  if (zip64) {
    const recAt = cdAt + cd.length;
    tail.push(cat(le(4, 0x06064b50), le(8, 44), le(2, 45), le(2, 45), le(4, 0), le(4, 0), le(8, entries.length), le(8, entries.length),
      le(8, cd.length), le(8, cdAt)));
    tail.push(cat(le(4, 0x07064b50), le(4, 0), le(8, recAt), le(4, 1)));
  }
  const n16 = zip64 ? 0xffff : entries.length;
  tail.push(cat(le(4, 0x06054b50), le(2, 0), le(2, 0), le(2, n16), le(2, n16), le(4, zip64 ? FF : cd.length), le(4, zip64 ? FF : cdAt), le(2, 0)));
  return cat(...parts, cd, ...tail);
}

type ZipFlavor = 'miniz-zip64' | 'miniz' | 'fflate';

/** A zip laid out like torch.save's: stored entries under one top-level directory. */
function torchZip(
  pkl: Uint8Array,
  storages: Record<string, Uint8Array>,
  opts: { prefix?: string; byteorder?: string; flavor?: ZipFlavor } = {},
): Uint8Array {
  const prefix = opts.prefix ?? 'trimkv_weights';
  const entries: [string, Uint8Array][] = [
    [`${prefix}/data.pkl`, pkl],
    [`${prefix}/.format_version`, Buffer.from('1')],
    [`${prefix}/.storage_alignment`, Buffer.from('64')],
    [`${prefix}/byteorder`, Buffer.from(opts.byteorder ?? 'little')],
  ];
  for (const [k, b] of Object.entries(storages)) entries.push([`${prefix}/data/${k}`, b]);
  entries.push([`${prefix}/version`, Buffer.from('3\n')], [`${prefix}/.data/serialization_id`, Buffer.from('0123456789')]);
  const flavor = opts.flavor ?? 'miniz-zip64';
  if (flavor !== 'fflate') return minizZip(entries, flavor === 'miniz-zip64');
  const files: Zippable = {};
  for (const [n, b] of entries) files[n] = [b, { level: 0 }];
  return zipSync(files);
}

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints
// ---------------------------------------------------------------------------------------------
const HIDDEN = 32;
const INTER = 16;
const KV = 2;
const HEAD_DIM = 8;
const LAYERS = 2;
const PARAMS: Record<GateKind, string[]> = {
  rg: ['linear1.weight', 'linear1.bias', 'linear2.weight', 'bias'],
  rg2: ['linear1.weight', 'linear1.bias', 'linear2.weight', 'bias'],
  rg3: ['gate_proj.weight', 'up_proj.weight', 'down_proj.weight', 'bias'],
};
const STORAGE_TYPE: Record<DType, string> = { fp32: 'FloatStorage', fp16: 'HalfStorage', bf16: 'BFloat16Storage' };
const key = (l: number, p: string): string => `model.layers.${l}.self_attn.retention_gate.${p}`;

function inputSizeOf(kind: GateKind): number {
  return kind === 'rg' ? HIDDEN : KV * 2 * HEAD_DIM;
}
function shapesOf(kind: GateKind): number[][] {
  const ins = inputSizeOf(kind);
  return kind === 'rg3' ? [[INTER, ins], [INTER, ins], [KV, INTER], [KV]] : [[INTER, ins], [INTER], [KV, INTER], [KV]];
}

function configOf(kind: GateKind, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    architectures: ['TrimKVQwen3ForCausalLM'],
    model_type: 'qwen3',
    hidden_size: HIDDEN,
    num_hidden_layers: LAYERS,
    num_attention_heads: 4,
    num_key_value_heads: KV,
    head_dim: HEAD_DIM,
    hidden_act: 'silu',
    retention_gate: kind,
    retention_gate_intermediate_size: INTER,
    memory_size: 24,
    buffer_size: 4,
    compress_strategy: 'alpha',
    floor_budget_ratio: 0.25,
    ...extra,
  };
}

let seed = 12345;
function rnd(): number {
  seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
  return seed / 2 ** 32;
}

/** Random weight values in `dtype`: raw bits for fp16 / bf16. */
function randomWeight(dtype: DType, shape: number[], scale: number, shift = 0): WeightArray {
  const n = shape.reduce((a, b) => a * b, 1);
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) f[i] = (rnd() * 2 - 1) * scale + shift;
  if (dtype === 'fp32') return { dtype, shape, data: f };
  const enc = dtype === 'fp16' ? numberToFp16Bits : numberToBf16Bits;
  return { dtype, shape, data: Uint16Array.from(f, enc) };
}

/** Element bits of a weight (Uint32 for fp32 so that copies are bit exact). */
function bitsOf(w: WeightArray): Uint32Array | Uint16Array {
  return w.data instanceof Float32Array ? new Uint32Array(w.data.buffer, w.data.byteOffset, w.data.length) : w.data;
}

type Layout = 'contiguous' | 'transposed' | 'offset' | 'stride2';

/** Lays `w` out in a storage the way a torch view would: returns the storage elements and view. */
function layOut(w: WeightArray, layout: Layout): { elems: Uint32Array | Uint16Array; offset: number; stride: number[] } {
  const src = bitsOf(w);
  const make = (n: number): Uint32Array | Uint16Array => (src instanceof Uint32Array ? new Uint32Array(n) : new Uint16Array(n));
  const [r, c] = [w.shape[0]!, w.shape[1] ?? 1];
  if (layout === 'transposed' && w.shape.length === 2) {
    const e = make(r * c);
    for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) e[j * r + i] = src[i * c + j]!;
    return { elems: e, offset: 0, stride: [1, r] };
  }
  if (layout === 'stride2' && w.shape.length === 2) {
    const e = make(r * c * 2).fill(0x3f80);
    for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) e[i * 2 * c + 2 * j] = src[i * c + j]!;
    return { elems: e, offset: 0, stride: [2 * c, 2] };
  }
  if (layout === 'offset') {
    const e = make(src.length + 8).fill(0x7fc0);
    e.set(src, 3);
    return { elems: e, offset: 3, stride: w.shape.map((_, i) => w.shape.slice(i + 1).reduce((a, b) => a * b, 1)) };
  }
  return { elems: make(src.length).fill(0).map((_, i) => src[i]!), offset: 0, stride: w.shape.map((_, i) => w.shape.slice(i + 1).reduce((a, b) => a * b, 1)) };
}

function storageBytes(elems: Uint32Array | Uint16Array, bigEndian = false): Uint8Array {
  const b = new Uint8Array(elems.buffer.slice(elems.byteOffset, elems.byteOffset + elems.byteLength));
  if (bigEndian) for (let i = 0; i < b.length; i += elems.BYTES_PER_ELEMENT) b.subarray(i, i + elems.BYTES_PER_ELEMENT).reverse();
  return b;
}

interface Synthetic {
  /** key -> weight as it must load (contiguous, stored dtype). */
  weights: Map<string, WeightArray>;
  refs: TensorRef[];
  storages: Record<string, Uint8Array>;
}

/**
 * Random gate weights for every layer; the last layer's tensors are non-contiguous views
 * (transposed, offset, stride 2) and its last two share one storage, as in the torch fixtures.
 */
function synthesize(kind: GateKind, dtype: DType, opts: { bigEndian?: boolean; layers?: number } = {}): Synthetic {
  const weights = new Map<string, WeightArray>();
  const refs: TensorRef[] = [];
  const storages: Record<string, Uint8Array> = {};
  const layers = opts.layers ?? LAYERS;
  const shapes = shapesOf(kind);
  let next = 0;
  for (let l = 0; l < layers; l++) {
    const ws = PARAMS[kind].map((p, i) => randomWeight(dtype, shapes[i]!, p === 'bias' ? 3 : 0.5, p === 'bias' ? 1 : 0));
    PARAMS[kind].forEach((p, i) => weights.set(key(l, p), ws[i]!));
    const last = l === layers - 1;
    const layouts: Layout[] = last ? ['transposed', kind === 'rg3' ? 'stride2' : 'offset', 'contiguous', 'contiguous'] : ['contiguous', 'contiguous', 'contiguous', 'contiguous'];
    for (let i = 0; i < 2; i++) {
      const { elems, offset, stride } = layOut(ws[i]!, layouts[i]!);
      const sk = String(next++);
      storages[sk] = storageBytes(elems, opts.bigEndian);
      refs.push({ key: key(l, PARAMS[kind][i]!), storage: sk, storageType: STORAGE_TYPE[dtype], numel: elems.length, offset, shape: ws[i]!.shape, stride });
    }
    // Weight 2 and bias: one shared storage in the last layer, with a gap between them.
    const w2 = bitsOf(ws[2]!);
    const b = bitsOf(ws[3]!);
    if (last) {
      const gap = 5;
      const e = w2 instanceof Uint32Array ? new Uint32Array(w2.length + gap + b.length) : new Uint16Array(w2.length + gap + b.length);
      e.set(w2, 0);
      e.set(b, w2.length + gap);
      const sk = String(next++);
      storages[sk] = storageBytes(e, opts.bigEndian);
      refs.push({ key: key(l, PARAMS[kind][2]!), storage: sk, storageType: STORAGE_TYPE[dtype], numel: e.length, offset: 0, shape: ws[2]!.shape, stride: [INTER, 1] });
      refs.push({ key: key(l, 'bias'), storage: sk, storageType: STORAGE_TYPE[dtype], numel: e.length, offset: w2.length + gap, shape: [KV], stride: [1] });
    } else {
      for (const i of [2, 3]) {
        const { elems, offset, stride } = layOut(ws[i]!, 'contiguous');
        const sk = String(next++);
        storages[sk] = storageBytes(elems, opts.bigEndian);
        refs.push({ key: key(l, PARAMS[kind][i]!), storage: sk, storageType: STORAGE_TYPE[dtype], numel: elems.length, offset, shape: ws[i]!.shape, stride });
      }
    }
  }
  return { weights, refs, storages };
}

function pthOf(s: Synthetic, opts: { ordered?: boolean; metadata?: boolean; byteorder?: string; flavor?: ZipFlavor } = {}): Uint8Array {
  const { ordered, metadata, ...zip } = opts;
  return torchZip(stateDictPickle(s.refs, { ordered: ordered ?? true, metadata: metadata ?? false }), s.storages, zip);
}

function writeCheckpoint(config: Record<string, unknown> | string | null, files: Record<string, Uint8Array>): string {
  const d = freshDir();
  if (config !== null) writeFileSync(join(d, 'config.json'), typeof config === 'string' ? config : JSON.stringify(config));
  for (const [n, b] of Object.entries(files)) writeFileSync(join(d, n), b);
  return d;
}

/** A valid synthetic rg checkpoint directory with the .pth replaced by `pth` (for malformed cases). */
function withPth(pth: Uint8Array, config: Record<string, unknown> = configOf('rg')): string {
  return writeCheckpoint(config, { 'trimkv_weights.pth': pth });
}

function expectWeightsEqual(spec: GateSpec, weights: Map<string, WeightArray>, layer: number): void {
  const names = spec.kind === 'rg3' ? ['gateProj', 'upProj', 'downProj', 'bias'] : ['linear1Weight', 'linear1Bias', 'linear2Weight', 'bias'];
  names.forEach((n, i) => {
    const got = (spec.weights as unknown as Record<string, WeightArray>)[n]!;
    const want = weights.get(key(layer, PARAMS[spec.kind][i]!))!;
    expect(got.dtype, n).toBe(want.dtype);
    expect(got.shape, n).toEqual(want.shape);
    expect(got.data.constructor, n).toBe(want.data.constructor);
    expect(Array.from(bitsOf(got)), `${n} of layer ${layer}`).toEqual(Array.from(bitsOf(want)));
  });
}

/** Asserts a TrimKVError with `code` whose message contains every fragment. */
function expectCheckpointError(fn: () => unknown, code: string, ...fragments: string[]): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, 'expected a throw').toBeInstanceOf(TrimKVError);
  const e = err as TrimKVError;
  expect(e.code, e.message).toBe(code);
  for (const f of fragments) expect(e.message).toContain(f);
}

// ---------------------------------------------------------------------------------------------
// float64 oracle of SPEC section 3
// ---------------------------------------------------------------------------------------------
function decode(w: WeightInput): Float64Array {
  if (w instanceof Float32Array) return Float64Array.from(w);
  return w.data instanceof Float32Array ? Float64Array.from(w.data) : decodeBits(w.data, w.dtype as 'fp16' | 'bf16');
}

function act(name: Activation, u: number): number {
  switch (name) {
    case 'silu':
    case 'swish':
      return u / (1 + Math.exp(-u));
    case 'relu':
      return Math.max(u, 0);
    case 'gelu_new':
    case 'gelu_pytorch_tanh':
      return 0.5 * u * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (u + 0.044715 * u ** 3)));
    default:
      throw new Error(`oracle has no ${name}`);
  }
}

/** lam [n, kvHeads] of `spec` for x [n, inputSize], in float64. */
function oracleLam(spec: GateSpec, x: ArrayLike<number>, n: number): Float64Array {
  const { inputSize: D, intermediateSize: I, kvHeads: H } = spec;
  const mv = (W: Float64Array, rows: number, cols: number, v: ArrayLike<number>, vo: number): Float64Array => {
    const o = new Float64Array(rows);
    for (let r = 0; r < rows; r++) {
      let s = 0;
      for (let c = 0; c < cols; c++) s += W[r * cols + c]! * v[vo + c]!;
      o[r] = s;
    }
    return o;
  };
  const out = new Float64Array(n * H);
  for (let t = 0; t < n; t++) {
    let a: Float64Array;
    let W2: Float64Array;
    let b: Float64Array;
    if (spec.kind === 'rg3') {
      const w = spec.weights as GluGateWeights;
      const g = mv(decode(w.gateProj), I, D, x, t * D);
      const u = mv(decode(w.upProj), I, D, x, t * D);
      a = g.map((gi, i) => act(spec.activation, gi) * u[i]!);
      W2 = decode(w.downProj);
      b = decode(w.bias);
    } else {
      const w = spec.weights as MlpGateWeights;
      const b1 = decode(w.linear1Bias);
      a = mv(decode(w.linear1Weight), I, D, x, t * D).map((u, i) => act(spec.activation, u + b1[i]!));
      W2 = decode(w.linear2Weight);
      b = decode(w.bias);
    }
    const z = mv(W2, H, I, a, 0);
    for (let h = 0; h < H; h++) {
      const zh = z[h]! + b[h]!;
      out[t * H + h] = Math.min(zh, 0) - Math.log1p(Math.exp(-Math.abs(zh)));
    }
  }
  return out;
}

/** Largest |a - b| / max(|b|, 1e-6): lam is <= 0 and tends to 0 for large z. */
function maxRel(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < b.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!) / Math.max(Math.abs(b[i]!), 1e-6));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------
const KINDS: GateKind[] = ['rg', 'rg2', 'rg3'];
const WEIGHT_DTYPES: DType[] = ['fp32', 'fp16', 'bf16'];
const GRID = KINDS.flatMap((kind) => WEIGHT_DTYPES.flatMap((dtype) => (['pth', 'safetensors'] as const).map((format) => ({ kind, dtype, format }))));

describe('loadCheckpoint', () => {
  test.each(GRID)('$kind gate, $dtype weights, $format: every layer loads bit-exact in its stored dtype', async ({ kind, dtype, format }) => {
    const s = synthesize(kind, dtype);
    const file: Record<string, Uint8Array> =
      format === 'pth' ? { 'trimkv_weights.pth': pthOf(s) } : { 'trimkv_weights.safetensors': encodeSafetensors(s.weights) };
    const dir = writeCheckpoint(configOf(kind), file);
    const ck = await loadCheckpoint(dir);
    expect(ck.source).toBe(format);
    expect(ck.file).toBe(join(dir, Object.keys(file)[0]!));
    expect(ck.kind).toBe(kind);
    expect(ck.activation).toBe('silu');
    expect(ck.layers).toHaveLength(LAYERS);
    ck.layers.forEach((spec, l) => {
      expect(spec).toMatchObject({ kind, activation: 'silu', inputSize: inputSizeOf(kind), intermediateSize: INTER, kvHeads: KV });
      expectWeightsEqual(spec, s.weights, l);
    });
    expect(ck.cacheDefaults).toEqual({ layers: LAYERS, qHeads: 4, kvHeads: KV, headDim: HEAD_DIM, memory: 24, buffer: 4, strategy: 'alpha', floor: 0.25 });
    expect(ck.compressStrategy).toBe('alpha');
    expect(ck.config).toEqual(configOf(kind));
  });

  test('the state dict may be a plain dict or an OrderedDict carrying _metadata (BUILD)', async () => {
    const s = synthesize('rg', 'fp32');
    for (const opts of [{ ordered: false }, { ordered: true, metadata: true }]) {
      const ck = await loadCheckpoint(withPth(pthOf(s, opts)));
      ck.layers.forEach((spec, l) => expectWeightsEqual(spec, s.weights, l));
    }
  });

  test('a big-endian archive (byteorder "big") loads to the same values', async () => {
    const s = synthesize('rg2', 'bf16', { bigEndian: true });
    const ck = await loadCheckpoint(writeCheckpoint(configOf('rg2'), { 'trimkv_weights.pth': pthOf(s, { byteorder: 'big' }) }));
    ck.layers.forEach((spec, l) => expectWeightsEqual(spec, s.weights, l));
  });

  test.each(['miniz-zip64', 'miniz', 'fflate'] as const)('zip flavour %s (zip64 records, 64-byte aligned data) reads alike', async (flavor) => {
    const s = synthesize('rg3', 'fp16');
    const ck = await loadCheckpoint(writeCheckpoint(configOf('rg3'), { 'trimkv_weights.pth': pthOf(s, { flavor }) }));
    ck.layers.forEach((spec, l) => expectWeightsEqual(spec, s.weights, l));
  });

  test('the archive directory may have any name, as torch.save names it after the file', async () => {
    const s = synthesize('rg', 'fp32');
    const pth = torchZip(stateDictPickle(s.refs), s.storages, { prefix: 'archive' });
    const ck = await loadCheckpoint(withPth(pth));
    ck.layers.forEach((spec, l) => expectWeightsEqual(spec, s.weights, l));
  });

  test('keys other than retention-gate weights are ignored', async () => {
    const s = synthesize('rg', 'fp32');
    const extra: TensorRef = { key: 'model.embed_tokens.weight', storage: 'x9', storageType: 'DoubleStorage', numel: 4, offset: 0, shape: [2, 2], stride: [2, 1] };
    const pth = torchZip(stateDictPickle([...s.refs, extra]), { ...s.storages, x9: new Uint8Array(32) });
    expect((await loadCheckpoint(withPth(pth))).layers).toHaveLength(LAYERS);
  });

  test('pth is preferred; options.weights picks the format or a file', async () => {
    const s = synthesize('rg', 'fp32');
    const dir = writeCheckpoint(configOf('rg'), { 'trimkv_weights.pth': pthOf(s), 'gates.safetensors': encodeSafetensors(s.weights) });
    expect((await loadCheckpoint(dir)).source).toBe('pth');
    expect((await loadCheckpoint(dir, { weights: 'safetensors' })).source).toBe('safetensors');
    expect((await loadCheckpoint(dir, { weights: 'gates.safetensors' })).file).toBe(join(dir, 'gates.safetensors'));
  });

  test('Phi-3 / Llama style config without head_dim: head_dim = hidden_size / num_attention_heads', async () => {
    const s = synthesize('rg2', 'fp32');
    const cfg = configOf('rg2', { num_attention_heads: 4, hidden_size: 4 * HEAD_DIM, head_dim: undefined });
    const ck = await loadCheckpoint(writeCheckpoint(cfg, { 'trimkv_weights.pth': pthOf(s) }));
    expect(ck.layers[0]!.inputSize).toBe(KV * 2 * HEAD_DIM);
    expect(ck.cacheDefaults.headDim).toBe(HEAD_DIM);
  });

  test('retention_gate_intermediate_size missing: read from the weights; retention_gate missing: rg', async () => {
    const s = synthesize('rg', 'fp32');
    const cfg = configOf('rg', { retention_gate_intermediate_size: undefined, retention_gate: undefined });
    const ck = await loadCheckpoint(writeCheckpoint(cfg, { 'trimkv_weights.pth': pthOf(s) }));
    expect(ck.kind).toBe('rg');
    expect(ck.layers[0]!.intermediateSize).toBe(INTER);
  });

  test('compress_strategy: knorm_alpha maps to strategy; an unknown value is kept raw only', async () => {
    const s = synthesize('rg', 'fp32');
    const k = await loadCheckpoint(writeCheckpoint(configOf('rg', { compress_strategy: 'knorm_alpha' }), { 'trimkv_weights.pth': pthOf(s) }));
    expect(k.cacheDefaults.strategy).toBe('knorm_alpha');
    const o = await loadCheckpoint(writeCheckpoint(configOf('rg', { compress_strategy: 'lru' }), { 'trimkv_weights.pth': pthOf(s) }));
    expect(o.cacheDefaults.strategy).toBeUndefined();
    expect(o.compressStrategy).toBe('lru');
  });

  test('fields nested under text_config (multimodal configs) are found', async () => {
    const s = synthesize('rg', 'fp32');
    const { hidden_size, num_hidden_layers, num_key_value_heads, ...rest } = configOf('rg');
    const cfg = { ...rest, text_config: { hidden_size, num_hidden_layers, num_key_value_heads } };
    expect((await loadCheckpoint(writeCheckpoint(cfg, { 'trimkv_weights.pth': pthOf(s) }))).layers).toHaveLength(LAYERS);
  });
});

describe('loadCheckpointSync', () => {
  test('returns what loadCheckpoint returns', async () => {
    const s = synthesize('rg3', 'bf16');
    const dir = writeCheckpoint(configOf('rg3'), { 'trimkv_weights.pth': pthOf(s) });
    expect(loadCheckpointSync(dir)).toEqual(await loadCheckpoint(dir));
  });
});

describe('parseCheckpoint', () => {
  test('builds the checkpoint from bytes already in memory', () => {
    const s = synthesize('rg2', 'fp16');
    const ck = parseCheckpoint(configOf('rg2'), encodeSafetensors(s.weights), 'safetensors');
    ck.layers.forEach((spec, l) => expectWeightsEqual(spec, s.weights, l));
  });
});

describe('encodeSafetensors', () => {
  test('round-trips through readSafetensors with 8-byte aligned data and metadata', () => {
    const s = synthesize('rg3', 'fp32');
    const bytes = encodeSafetensors(s.weights, { format: 'pt' });
    const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    expect((8 + n) % 8).toBe(0);
    const f = readSafetensors(bytes, 'x.safetensors');
    expect(f.metadata).toEqual({ format: 'pt' });
    const back = f.tensors(f.keys);
    for (const [k, w] of s.weights) expect(Array.from(bitsOf(back.get(k)!))).toEqual(Array.from(bitsOf(w)));
  });
});

// ---------------------------------------------------------------------------------------------
// Torch-written fixtures
// ---------------------------------------------------------------------------------------------
const FIXTURE_NAMES = KINDS.flatMap((k) => (['fp32', 'bf16'] as const).map((d) => ({ kind: k, dtype: d, name: `${k}-${d}` })));
const fixturesPresent = FIXTURE_NAMES.every((f) => existsSync(join(FIXTURES, f.name, 'trimkv_weights.pth')));
if (!fixturesPresent) {
  console.warn(
    `\n[trimkv tests] torch-written checkpoint fixtures absent from ${FIXTURES}: their tests are skipped. ` +
      'Make them with: python3 scripts/make_checkpoint_fixtures.py test/fixtures/checkpoints (needs PyTorch)\n',
  );
}

interface FixtureIO {
  x: Float32Array;
  n: number;
  /** [layer] -> lam [n * kvHeads] */
  lam: Float64Array[];
  torch: string;
}
function readFixtureIO(name: string): FixtureIO {
  const inputs = JSON.parse(readFileSync(join(FIXTURES, name, 'inputs.json'), 'utf8')) as { shape: [number, number]; x: number[][] };
  const expected = JSON.parse(readFileSync(join(FIXTURES, name, 'expected.json'), 'utf8')) as { lam: number[][][]; torch: string };
  return {
    x: Float32Array.from(inputs.x.flat()),
    n: inputs.shape[0],
    lam: expected.lam.map((l) => Float64Array.from(l.flat())),
    torch: expected.torch,
  };
}

describe.skipIf(!fixturesPresent)('torch-written fixtures (test/fixtures/checkpoints)', () => {
  test.each(FIXTURE_NAMES)('$name: config and shapes load; weights reproduce PyTorch lam (float64 oracle)', async ({ kind, dtype, name }) => {
    const ck = await loadCheckpoint(join(FIXTURES, name));
    const io = readFixtureIO(name);
    expect(ck.source).toBe('pth');
    expect(ck.kind).toBe(kind);
    expect(ck.layers).toHaveLength(io.lam.length);
    ck.layers.forEach((spec, l) => {
      for (const w of Object.values(spec.weights) as WeightArray[]) expect(w.dtype).toBe(dtype);
      const err = maxRel(oracleLam(spec, io.x, io.n), io.lam[l]!);
      expect(err, `layer ${l}, torch ${io.torch}`).toBeLessThan(TOL_LAM[dtype]);
    });
    expect(ck.cacheDefaults.memory).toBe((ck.config as { memory_size: number }).memory_size);
  });

  test.each(FIXTURE_NAMES)('$name: the same tensors re-saved as safetensors load identically', async ({ name }) => {
    const ck = await loadCheckpoint(join(FIXTURES, name));
    const tensors = new Map<string, WeightArray>();
    ck.layers.forEach((spec, l) => {
      const ws = Object.values(spec.weights) as WeightArray[];
      PARAMS[spec.kind].forEach((p, i) => tensors.set(key(l, p), ws[i]!));
    });
    const dir = writeCheckpoint(ck.config, { 'trimkv_weights.safetensors': encodeSafetensors(tensors) });
    const back = await loadCheckpoint(dir);
    expect(back.layers).toEqual(ck.layers);
    // A safetensors file written by the Python package, where the fixture script had it.
    if (existsSync(join(FIXTURES, name, 'trimkv_weights.safetensors'))) {
      expect((await loadCheckpoint(join(FIXTURES, name), { weights: 'safetensors' })).layers).toEqual(ck.layers);
    }
  });
});

// The runtime's gate on the loaded weights. The addon is loaded lazily so that a missing build
// skips these tests (visibly) instead of failing the loader tests above.
let gateSkip = '';
let runGate: ((backend: 'cpu' | 'cuda', spec: GateSpec, x: Float32Array, n: number) => Float32Array) | undefined;
let gateBackends: ('cpu' | 'cuda')[] = [];
if (fixturesPresent) {
  try {
    const { openRuntime } = await import('../lib/index.js');
    const { backendsUnderTest } = await import('./backends.js');
    gateBackends = backendsUnderTest();
    runGate = (backend, spec, x, n) => {
      const rt = openRuntime(backend);
      try {
        const gate = rt.createGate(spec);
        const xt = rt.fromArray(x, [n, spec.inputSize], 'fp32');
        const lam = rt.tensor([n, spec.kvHeads], 'fp32');
        lam.write(new Float32Array(n * spec.kvHeads).fill(Number.NaN));
        gate.run(xt, lam);
        return lam.readSync();
      } finally {
        rt.dispose();
      }
    };
  } catch (e) {
    if (process.env.TRIMKV_REQUIRE_CUDA === '1') throw e;
    gateSkip = (e as Error).message;
    console.warn(`\n[trimkv tests] checkpoint gate-output tests skipped: the runtime cannot load (${gateSkip})\n`);
  }
}
const GATE_CASES = FIXTURE_NAMES.flatMap((f) => gateBackends.map((backend) => ({ ...f, backend })));

describe.skipIf(!fixturesPresent || runGate === undefined)('RetentionGate on loaded fixtures', () => {
  test.each(GATE_CASES)('$name on $backend: gate.run matches PyTorch lam', async ({ name, dtype, backend }) => {
    const ck = await loadCheckpoint(join(FIXTURES, name));
    const io = readFixtureIO(name);
    ck.layers.forEach((spec, l) => {
      const lam = runGate!(backend, spec, io.x, io.n);
      expect(lam.every(Number.isFinite), 'every lam written').toBe(true);
      expect(maxRel(lam, io.lam[l]!), `layer ${l}`).toBeLessThan(TOL_LAM[dtype]);
    });
  });
});

// ---------------------------------------------------------------------------------------------
// Malformed and hostile inputs
// ---------------------------------------------------------------------------------------------
describe('loadCheckpoint: missing files and keys (ERR_CHECKPOINT_MISSING)', () => {
  test('directory does not exist', async () => {
    await expect(loadCheckpoint(join(tmpRoot, 'nope'))).rejects.toMatchObject({ code: 'ERR_CHECKPOINT_MISSING', message: expect.stringContaining('nope') });
  });
  test('config.json does not exist', () => {
    const dir = writeCheckpoint(null, { 'trimkv_weights.pth': pthOf(synthesize('rg', 'fp32')) });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_MISSING', join(dir, 'config.json'));
  });
  test('no weights file', () => {
    const dir = writeCheckpoint(configOf('rg'), {});
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_MISSING', 'trimkv_weights.pth');
  });
  test('a gate key is missing (pth)', () => {
    const s = synthesize('rg', 'fp32');
    const dir = withPth(torchZip(stateDictPickle(s.refs.filter((r) => r.key !== key(1, 'linear1.bias'))), s.storages));
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_MISSING', 'trimkv_weights.pth', key(1, 'linear1.bias'));
  });
  test('a gate key is missing (safetensors)', () => {
    const s = synthesize('rg3', 'bf16');
    s.weights.delete(key(0, 'up_proj.weight'));
    const dir = writeCheckpoint(configOf('rg3'), { 'trimkv_weights.safetensors': encodeSafetensors(s.weights) });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_MISSING', 'trimkv_weights.safetensors', key(0, 'up_proj.weight'));
  });
  test('the archive lacks the data entry a tensor points to', () => {
    const s = synthesize('rg', 'fp32');
    const ref = s.refs.find((r) => r.key === key(0, 'linear2.weight'))!;
    const { [ref.storage]: _, ...rest } = s.storages;
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(stateDictPickle(s.refs), rest))), 'ERR_CHECKPOINT_MISSING', `data/${ref.storage}`, key(0, 'linear2.weight'));
  });
});

describe('loadCheckpoint: config.json (ERR_CHECKPOINT_CONFIG)', () => {
  const pth = pthOf(synthesize('rg', 'fp32'));
  test('not valid JSON', () => {
    const dir = writeCheckpoint('{"hidden_size": 32,', { 'trimkv_weights.pth': pth });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_CONFIG', 'config.json', 'not valid JSON');
  });
  test('hidden_act missing', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(pth, configOf('rg', { hidden_act: undefined }))), 'ERR_CHECKPOINT_CONFIG', 'config.json', "'hidden_act'");
  });
  test('unsupported retention_gate (rg10 of DBTrimKV)', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(pth, configOf('rg', { retention_gate: 'rg10' }))), 'ERR_CHECKPOINT_CONFIG', "'retention_gate'", '"rg10"');
  });
  test('num_hidden_layers not a positive integer', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(pth, configOf('rg', { num_hidden_layers: 1.5 }))), 'ERR_CHECKPOINT_CONFIG', "'num_hidden_layers'");
  });
  test('floor_budget_ratio outside [0, 1)', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(pth, configOf('rg', { floor_budget_ratio: 1.5 }))), 'ERR_CHECKPOINT_CONFIG', "'floor_budget_ratio'");
  });
  test('weights hold more layers than num_hidden_layers', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(pth, configOf('rg', { num_hidden_layers: 1 }))), 'ERR_CHECKPOINT_CONFIG', key(1, 'linear1.weight'), 'num_hidden_layers 1');
  });
  test('weights of another gate variant than retention_gate says', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(pth, configOf('rg3'))), 'ERR_CHECKPOINT_CONFIG', 'trimkv_weights.pth', key(0, 'linear1.weight'), "retention_gate 'rg3'");
  });
});

describe('loadCheckpoint: shapes (ERR_CHECKPOINT_SHAPE)', () => {
  test('linear1.weight disagrees with hidden_size', () => {
    const s = synthesize('rg', 'fp32');
    expectCheckpointError(() => loadCheckpointSync(withPth(pthOf(s), configOf('rg', { hidden_size: 48 }))), 'ERR_CHECKPOINT_SHAPE', 'trimkv_weights.pth', key(0, 'linear1.weight'), '[16, 32]', '[16, 48]');
  });
  test('bias disagrees with num_key_value_heads (rg2, safetensors)', () => {
    const s = synthesize('rg2', 'fp32');
    s.weights.set(key(1, 'bias'), randomWeight('fp32', [3], 1));
    const dir = writeCheckpoint(configOf('rg2'), { 'trimkv_weights.safetensors': encodeSafetensors(s.weights) });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_SHAPE', key(1, 'bias'), '[3]', '[2]');
  });
});

describe('loadCheckpoint: dtypes (ERR_CHECKPOINT_DTYPE)', () => {
  test('a float64 storage (torch.DoubleStorage)', () => {
    const s = synthesize('rg', 'fp32');
    const refs = s.refs.map((r) => (r.key === key(0, 'bias') ? { ...r, storageType: 'DoubleStorage' } : r));
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(stateDictPickle(refs), s.storages))), 'ERR_CHECKPOINT_DTYPE', 'trimkv_weights.pth', key(0, 'bias'), 'DoubleStorage');
  });
  test('a safetensors F64 tensor', () => {
    const s = synthesize('rg', 'fp32');
    const bytes = encodeSafetensors(s.weights);
    // Same byte length: 'F32' -> 'F64' for the first tensor's header only.
    const text = Buffer.from(bytes).toString('latin1').replace('"F32"', '"F64"');
    const dir = writeCheckpoint(configOf('rg'), { 'trimkv_weights.safetensors': Buffer.from(text, 'latin1') });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_DTYPE', 'trimkv_weights.safetensors', key(0, 'linear1.weight'), 'F64');
  });
});

describe('loadCheckpoint: malformed files (ERR_CHECKPOINT_FORMAT)', () => {
  const s = synthesize('rg', 'fp32');
  const good = pthOf(s);
  test('wrong magic (not a zip)', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(Buffer.from('hello, not a checkpoint'))), 'ERR_CHECKPOINT_FORMAT', 'trimkv_weights.pth', 'wrong magic');
  });
  test('legacy torch.save format (pickle stream, no zip)', () => {
    expectCheckpointError(() => loadCheckpointSync(withPth(Uint8Array.of(0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c))), 'ERR_CHECKPOINT_FORMAT', 'legacy');
  });
  test.each([0.5, 0.9, 0.999])('zip truncated to %d of its length', (frac) => {
    expectCheckpointError(() => loadCheckpointSync(withPth(good.subarray(0, Math.floor(good.length * frac)))), 'ERR_CHECKPOINT_FORMAT', 'trimkv_weights.pth');
  });
  test('a re-zipped archive with deflate-compressed entries still loads', () => {
    const files: Zippable = {};
    const plain = unzipSync(good);
    for (const [n, b] of Object.entries(plain)) files[n] = [b, { level: 6 }];
    expect(loadCheckpointSync(withPth(zipSync(files))).layers).toHaveLength(LAYERS);
  });
  test('a compressed entry claiming an absurd uncompressed size (zip bomb) is refused before inflating', () => {
    const files: Zippable = {};
    for (const [n, b] of Object.entries(unzipSync(good))) files[n] = [b, { level: 6 }];
    const z = zipSync(files);
    const dv = new DataView(z.buffer, z.byteOffset, z.byteLength);
    // Central directory header of the first entry (data.pkl): uncompressed size at +24.
    let cd = z.length - 22;
    cd = dv.getUint32(cd + 16, true);
    dv.setUint32(cd + 24, 0xfffffff0, true);
    expectCheckpointError(() => loadCheckpointSync(withPth(z)), 'ERR_CHECKPOINT_FORMAT', 'data.pkl', 'inconsistent sizes');
  });
  test('zip without data.pkl', () => {
    const z = zipSync({ 'a/version': [Buffer.from('3\n'), { level: 0 }] });
    expectCheckpointError(() => loadCheckpointSync(withPth(z)), 'ERR_CHECKPOINT_FORMAT', 'data.pkl');
  });
  test('truncated pickle stream', () => {
    const pkl = stateDictPickle(s.refs);
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(pkl.subarray(0, pkl.length - 40), s.storages))), 'ERR_CHECKPOINT_FORMAT', 'data.pkl');
  });
  test('the pickled object is not a dict', () => {
    const pkl = new PickleWriter().proto().int(7).op(0x2e).bytes();
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(pkl, {}))), 'ERR_CHECKPOINT_FORMAT', 'not a dict');
  });
  test('a storage with fewer bytes than its element count says', () => {
    const ref = s.refs.find((r) => r.key === key(0, 'linear1.bias'))!;
    const storages = { ...s.storages, [ref.storage]: s.storages[ref.storage]!.subarray(4) };
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(stateDictPickle(s.refs), storages))), 'ERR_CHECKPOINT_FORMAT', key(0, 'linear1.bias'));
  });
  test('a view reaching past the end of its storage (offset + strides)', () => {
    const refs = s.refs.map((r) => (r.key === key(0, 'linear1.bias') ? { ...r, offset: 1 } : r));
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(stateDictPickle(refs), s.storages))), 'ERR_CHECKPOINT_FORMAT', key(0, 'linear1.bias'), 'past the end');
  });
  test('a gate key whose value is not a tensor', () => {
    const p = new PickleWriter().proto().op(0x7d).str(key(0, 'bias')).int(3).op(0x73, 0x2e).bytes();
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(p, {}))), 'ERR_CHECKPOINT_FORMAT', key(0, 'bias'), 'not a tensor');
  });
  test('safetensors header length beyond the file', () => {
    const b = encodeSafetensors(s.weights);
    new DataView(b.buffer).setBigUint64(0, BigInt(b.length), true);
    const dir = writeCheckpoint(configOf('rg'), { 'trimkv_weights.safetensors': b });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_FORMAT', 'trimkv_weights.safetensors');
  });
  test('safetensors truncated (data offsets beyond the data)', () => {
    const b = encodeSafetensors(s.weights);
    const dir = writeCheckpoint(configOf('rg'), { 'trimkv_weights.safetensors': b.subarray(0, b.length - 10) });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_FORMAT', 'trimkv_weights.safetensors', 'truncated');
  });
  test('safetensors header not JSON', () => {
    const b = encodeSafetensors(s.weights);
    b[9] = 0x7b; // '{{'
    const dir = writeCheckpoint(configOf('rg'), { 'trimkv_weights.safetensors': b });
    expectCheckpointError(() => loadCheckpointSync(dir), 'ERR_CHECKPOINT_FORMAT', 'trimkv_weights.safetensors', 'JSON');
  });
});

describe('loadCheckpoint: hostile pickles are refused without running anything (ERR_CHECKPOINT_UNSAFE)', () => {
  const marker = join(tmpRoot, 'pwned');
  /** `GLOBAL module name; args; REDUCE` as the value of a gate key, torch-style archive. */
  function callingPickle(module: string, name: string, arg: string): Uint8Array {
    return new PickleWriter().proto().op(0x7d).str(key(0, 'bias')).global(module, name).str(arg).op(0x85, 0x52, 0x73, 0x2e).bytes();
  }
  const unsafe = (pkl: Uint8Array, ...fragments: string[]): void => {
    expectCheckpointError(() => loadCheckpointSync(withPth(torchZip(pkl, {}))), 'ERR_CHECKPOINT_UNSAFE', 'trimkv_weights.pth', ...fragments);
    expect(existsSync(marker), 'nothing was executed').toBe(false);
  };
  test('os.system', () => unsafe(callingPickle('os', 'system', `touch ${marker}`), "'os.system'"));
  test('posix.system', () => unsafe(callingPickle('posix', 'system', `touch ${marker}`), "'posix.system'"));
  test('builtins.eval', () => unsafe(callingPickle('builtins', 'eval', `open('${marker}','w')`), "'builtins.eval'"));
  test('builtins.exec via STACK_GLOBAL (protocol 4)', () => {
    const p = new PickleWriter().op(0x80, 4).op(0x7d).str(key(0, 'bias')).str('builtins').str('exec').op(0x93).str('1').op(0x85, 0x52, 0x73, 0x2e);
    unsafe(p.bytes(), "'builtins.exec'");
  });
  test('torch.load (a torch global outside the allowlist)', () => unsafe(callingPickle('torch', 'load', marker), "'torch.load'"));
  test('calling a storage type (torch.FloatStorage) instead of referencing it', () => unsafe(callingPickle('torch', 'FloatStorage', 'x'), 'torch.FloatStorage'));
  test('INST opcode', () => {
    const p = new PickleWriter().proto().op(0x7d).str(key(0, 'bias')).mark().str(`touch ${marker}`).op(0x69, ...Buffer.from('os\nsystem\n')).op(0x73, 0x2e);
    unsafe(p.bytes(), 'instantiation');
  });
  test('NEWOBJ opcode', () => {
    const p = new PickleWriter().proto().op(0x7d).str(key(0, 'bias')).global('collections', 'OrderedDict').op(0x29, 0x81, 0x73, 0x2e);
    unsafe(p.bytes(), 'instantiation');
  });
  test('a persistent id that is not a storage reference', () => {
    const p = new PickleWriter().proto().op(0x7d).str(key(0, 'bias')).mark().str('module').str('os').op(0x74, 0x51, 0x73, 0x2e);
    unsafe(p.bytes(), 'persistent id');
  });
  test('a storage key escaping the archive (../../etc/passwd)', () => {
    const s = synthesize('rg', 'fp32');
    const refs = s.refs.map((r) => (r.key === key(0, 'bias') ? { ...r, storage: '../../../etc/passwd' } : r));
    unsafe(stateDictPickle(refs), 'etc/passwd');
  });
  test('BUILD on something other than an OrderedDict', () => {
    const p = new PickleWriter().proto().op(0x7d).str(key(0, 'bias')).op(0x7d).op(0x7d).op(0x62, 0x73, 0x2e);
    unsafe(p.bytes(), 'BUILD');
  });
});

describe('loadCheckpoint: every gate variant yields a GateSpec a runtime accepts', () => {
  test.each(KINDS)('%s: weights object has the fields of its kind', (kind) => {
    const ck: Checkpoint = parseCheckpoint(configOf(kind), pthOf(synthesize(kind, 'bf16')), 'pth');
    const names = Object.keys(ck.layers[0]!.weights).sort();
    expect(names).toEqual(kind === 'rg3' ? ['bias', 'downProj', 'gateProj', 'upProj'] : ['bias', 'linear1Bias', 'linear1Weight', 'linear2Weight']);
  });
});
