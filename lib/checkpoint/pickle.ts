/**
 * A restricted unpickler for the `data.pkl` that `torch.save` writes for a state dict.
 *
 * It is an interpreter of data, never of code: it knows the opcodes that `torch.save` emits
 * (protocol 2, plus the harmless framing / short-string opcodes of protocols 3-5 so that
 * `pickle_protocol=4` files load too) and exactly five callables, each of which only builds
 * a value: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
 * `torch._utils._rebuild_parameter`, `torch._utils._rebuild_parameter_with_state`, and the
 * `torch.<Name>Storage` type markers that only ever appear inside a persistent id. Any other
 * global (`os.system`, `builtins.eval`, ...), any opcode that instantiates a class
 * (INST, OBJ, NEWOBJ, EXT*), and any persistent id that is not a storage reference naming a
 * plain archive entry is refused with `ERR_CHECKPOINT_UNSAFE` before anything is built.
 */
import { TrimKVError } from '../errors.js';

/** A Python tuple (kept apart from lists, which are plain arrays). */
export class PyTuple {
  constructor(readonly items: readonly PyValue[]) {}
}

/** A Python dict or collections.OrderedDict with primitive keys, in insertion order. */
export class PyDict {
  readonly map = new Map<string | number | boolean | null, PyValue>();
  constructor(readonly ordered: boolean) {}
}

/** A global that the allowlist admits, as the GLOBAL / STACK_GLOBAL opcodes named it. */
export class PyGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}
  get qualifiedName(): string {
    return `${this.module}.${this.name}`;
  }
}

/** A reference to `<archive>/data/<key>`, from the persistent id `('storage', type, key, location, numel)`. */
export class StorageRef {
  constructor(
    /** The storage type name, e.g. `FloatStorage`. */
    readonly typeName: string,
    readonly key: string,
    readonly location: string,
    /** Element count of the whole storage. */
    readonly numel: number,
  ) {}
}

/** A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage. */
export class TorchTensor {
  constructor(
    readonly storage: StorageRef,
    /** In elements. */
    readonly offset: number,
    readonly shape: readonly number[],
    /** In elements. */
    readonly stride: readonly number[],
  ) {}
}

export type PyValue =
  | null
  | boolean
  | number
  | string
  | PyTuple
  | PyValue[]
  | PyDict
  | PyGlobal
  | StorageRef
  | TorchTensor;

/** Storage types torch.save may name; the value is never called, only read as a dtype tag. */
const STORAGE_TYPE = /^[A-Z][A-Za-z0-9_]*Storage$/;

/** Callables that build values and are safe to "call" by interpretation. */
const CALLABLE_GLOBALS = new Set([
  'collections.OrderedDict',
  'torch._utils._rebuild_tensor_v2',
  'torch._utils._rebuild_parameter',
  'torch._utils._rebuild_parameter_with_state',
]);

/** Storage keys are the decimal (or identifier-like) names torch gives archive entries. */
const STORAGE_KEY = /^[A-Za-z0-9_]{1,64}$/;

/**
 * Limits that keep a hostile stream's cost proportional to its size (torch.save's pickles
 * nest MARKs 3 deep and hold at most ~2,000 values on the stack: SETITEMS batches 1,000
 * pairs). Every opcode reads at least one byte, so at most `data.length` opcodes run and
 * time and memory stay linear in the pickle's size.
 */
export const PICKLE_LIMITS = {
  /** MARKs open at once (a run of MARKs otherwise saved one stack per byte: 1 GB for 22 MB). */
  maxMarks: 64,
  /** Values on the stack, all MARK levels together. */
  maxStack: 1 << 16,
  /** Memo entries. */
  maxMemo: 1 << 20,
} as const;


/**
 * Unpickles `data` (the bytes of `data.pkl`).
 * @param file Path named in error messages.
 * @throws {TrimKVError} `ERR_CHECKPOINT_FORMAT` for a truncated or malformed stream,
 *   `ERR_CHECKPOINT_UNSAFE` for any global, opcode or persistent id outside the allowlist.
 */
export function unpickle(data: Uint8Array, file: string): PyValue {
  try {
    return new Unpickler(data, file).run();
  } catch (e) {
    if (e instanceof TrimKVError) throw e;
    // e.g. a RangeError from a stream built to exhaust memory: still a malformed file.
    throw new TrimKVError('ERR_CHECKPOINT_FORMAT', `${file}: cannot unpickle (${(e as Error).message})`);
  }
}

class Unpickler {
  private pos = 0;
  private stack: PyValue[] = [];
  /** Stack of saved stacks, one per MARK. */
  private marks: PyValue[][] = [];
  private memo = new Map<number, PyValue>();
  /** Values held by the stacks saved under the open MARKs. */
  private saved = 0;
  /** Opcodes left: one per byte of the pickle at most. */
  private opsLeft: number;
  private readonly view: DataView;

  constructor(
    private readonly data: Uint8Array,
    private readonly file: string,
  ) {
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    this.opsLeft = data.length;
  }

  private format(message: string, at = this.pos): TrimKVError {
    return new TrimKVError('ERR_CHECKPOINT_FORMAT', `${this.file}: ${message} (pickle byte ${at})`);
  }

  private unsafe(message: string, at = this.pos): TrimKVError {
    return new TrimKVError(
      'ERR_CHECKPOINT_UNSAFE',
      `${this.file}: ${message} (pickle byte ${at}); only the objects torch.save writes for a ` +
        'state dict of tensors are accepted, and nothing in a checkpoint is ever executed',
    );
  }

  private need(n: number): number {
    if (n < 0 || this.pos + n > this.data.length) throw this.format('unexpected end of pickle data');
    const at = this.pos;
    this.pos += n;
    return at;
  }
  private u8(): number {
    return this.data[this.need(1)]!;
  }
  private u16(): number {
    return this.view.getUint16(this.need(2), true);
  }
  private u32(): number {
    return this.view.getUint32(this.need(4), true);
  }
  private i32(): number {
    return this.view.getInt32(this.need(4), true);
  }
  private u64(): number {
    const at = this.need(8);
    const v = this.view.getBigUint64(at, true);
    if (v > BigInt(this.data.length)) throw this.format('length field exceeds the pickle size', at);
    return Number(v);
  }
  private utf8(n: number): string {
    const at = this.need(n);
    try {
      return new TextDecoder('utf-8', { fatal: true }).decode(this.data.subarray(at, at + n));
    } catch {
      throw this.format('invalid UTF-8 in a string', at);
    }
  }
  /** A newline-terminated ASCII line (GLOBAL's operands). */
  private line(): string {
    const end = this.data.indexOf(0x0a, this.pos);
    if (end < 0 || end - this.pos > 256) throw this.format('unterminated GLOBAL operand');
    const s = String.fromCharCode(...this.data.subarray(this.pos, end));
    this.pos = end + 1;
    return s;
  }

  private push(v: PyValue): void {
    if (this.saved + this.stack.length >= PICKLE_LIMITS.maxStack) {
      throw this.format(`more than ${PICKLE_LIMITS.maxStack} values on the pickle stack`);
    }
    this.stack.push(v);
  }
  private remember(idx: number, v: PyValue): void {
    if (this.memo.size >= PICKLE_LIMITS.maxMemo && !this.memo.has(idx)) {
      throw this.format(`more than ${PICKLE_LIMITS.maxMemo} memo entries`);
    }
    this.memo.set(idx, v);
  }
  private pop(): PyValue {
    if (this.stack.length === 0) throw this.format('stack underflow');
    return this.stack.pop()!;
  }
  private top(): PyValue {
    const v = this.stack[this.stack.length - 1];
    if (v === undefined) throw this.format('stack underflow');
    return v;
  }
  private popMark(): PyValue[] {
    const items = this.stack;
    const saved = this.marks.pop();
    if (saved === undefined) throw this.format('no MARK to pop to');
    this.saved -= saved.length;
    this.stack = saved;
    return items;
  }

  private global(module: string, name: string, at: number): PyGlobal {
    const q = `${module}.${name}`;
    if (CALLABLE_GLOBALS.has(q) || (module === 'torch' && STORAGE_TYPE.test(name))) {
      return new PyGlobal(module, name);
    }
    throw this.unsafe(`global '${q}' is not allowed`, at);
  }

  private setItems(target: PyValue, kv: PyValue[], at: number): void {
    if (!(target instanceof PyDict)) throw this.format('SETITEM(S) on a value that is not a dict', at);
    if (kv.length % 2 !== 0) throw this.format('odd number of items for SETITEMS', at);
    for (let i = 0; i < kv.length; i += 2) {
      const k = kv[i]!;
      if (!(k === null || typeof k === 'string' || typeof k === 'number' || typeof k === 'boolean')) {
        throw this.format('dict key of an unsupported type', at);
      }
      target.map.set(k, kv[i + 1]!);
    }
  }

  private reduce(fn: PyValue, args: PyValue, at: number): PyValue {
    if (!(fn instanceof PyGlobal)) throw this.unsafe('REDUCE of a value that is not an allowed callable', at);
    if (!(args instanceof PyTuple)) throw this.format(`REDUCE of ${fn.qualifiedName} without an argument tuple`, at);
    const a = args.items;
    switch (fn.qualifiedName) {
      case 'collections.OrderedDict':
        // torch.save pickles OrderedDict as OrderedDict() followed by SETITEMS.
        if (a.length !== 0) throw this.format('collections.OrderedDict called with arguments', at);
        return new PyDict(true);
      case 'torch._utils._rebuild_tensor_v2':
        return this.rebuildTensor(a, at);
      case 'torch._utils._rebuild_parameter':
      case 'torch._utils._rebuild_parameter_with_state': {
        // (data, requires_grad, backward_hooks[, state]): a Parameter is its data here.
        const t = a[0];
        if (!(t instanceof TorchTensor) || a.length < 3 || a.length > 4) {
          throw this.format(`${fn.qualifiedName} called with unexpected arguments`, at);
        }
        return t;
      }
      default:
        throw this.unsafe(`calling '${fn.qualifiedName}' is not allowed`, at);
    }
  }

  /** `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])` */
  private rebuildTensor(a: readonly PyValue[], at: number): TorchTensor {
    const [storage, offset, size, stride] = a;
    if (a.length < 6 || a.length > 7 || !(storage instanceof StorageRef)) {
      throw this.format('torch._utils._rebuild_tensor_v2 called with unexpected arguments', at);
    }
    const shape = this.intTuple(size, 'size', at);
    const strides = this.intTuple(stride, 'stride', at);
    if (shape.length !== strides.length) throw this.format('tensor size and stride differ in length', at);
    if (!isCount(offset)) throw this.format('tensor storage offset is not a non-negative integer', at);
    return new TorchTensor(storage, offset, shape, strides);
  }

  private intTuple(v: PyValue | undefined, what: string, at: number): number[] {
    if (!(v instanceof PyTuple) || v.items.length > 16 || !v.items.every(isCount)) {
      throw this.format(`tensor ${what} is not a tuple of non-negative integers`, at);
    }
    return v.items as number[];
  }

  private persistentLoad(pid: PyValue, at: number): StorageRef {
    if (!(pid instanceof PyTuple) || pid.items[0] !== 'storage' || pid.items.length !== 5) {
      throw this.unsafe('persistent id that is not a storage reference', at);
    }
    const [, type, key, location, numel] = pid.items;
    if (!(type instanceof PyGlobal) || type.module !== 'torch' || !STORAGE_TYPE.test(type.name)) {
      throw this.unsafe('storage reference without a torch storage type', at);
    }
    if (typeof key !== 'string' || !STORAGE_KEY.test(key)) {
      throw this.unsafe(`storage key ${JSON.stringify(key)} does not name an entry inside the archive`, at);
    }
    if (typeof location !== 'string' || !isCount(numel)) {
      throw this.format(`storage '${key}' has a malformed location or element count`, at);
    }
    return new StorageRef(type.name, key, location, numel);
  }

  run(): PyValue {
    const d = this.data;
    for (;;) {
      const at = this.pos;
      if (--this.opsLeft < 0) throw this.format('more opcodes than bytes', at);
      const op = this.u8();
      switch (op) {
        case 0x80: {
          // PROTO
          const v = this.u8();
          if (v < 2 || v > 5) throw this.format(`unsupported pickle protocol ${v}`, at);
          break;
        }
        case 0x95: // FRAME: a length hint only
          this.need(8);
          break;
        case 0x2e: {
          // STOP
          if (this.stack.length !== 1 || this.marks.length !== 0) throw this.format('STOP with a stack of other than one value', at);
          return this.pop();
        }
        case 0x28: // MARK
          if (this.marks.length >= PICKLE_LIMITS.maxMarks) throw this.format(`MARKs nested more than ${PICKLE_LIMITS.maxMarks} deep`, at);
          this.marks.push(this.stack);
          this.saved += this.stack.length;
          this.stack = [];
          break;
        case 0x7d: // EMPTY_DICT
          this.push(new PyDict(false));
          break;
        case 0x5d: // EMPTY_LIST
          this.push([]);
          break;
        case 0x29: // EMPTY_TUPLE
          this.push(new PyTuple([]));
          break;
        case 0x74: // TUPLE
          this.push(new PyTuple(this.popMark()));
          break;
        case 0x85: // TUPLE1
          this.push(new PyTuple([this.pop()]));
          break;
        case 0x86: {
          // TUPLE2
          const b = this.pop();
          this.push(new PyTuple([this.pop(), b]));
          break;
        }
        case 0x87: {
          // TUPLE3
          const c = this.pop();
          const b = this.pop();
          this.push(new PyTuple([this.pop(), b, c]));
          break;
        }
        case 0x6c: // LIST
          this.push(this.popMark());
          break;
        case 0x64: {
          // DICT
          const dict = new PyDict(false);
          this.setItems(dict, this.popMark(), at);
          this.push(dict);
          break;
        }
        case 0x73: {
          // SETITEM
          const v = this.pop();
          const k = this.pop();
          this.setItems(this.top(), [k, v], at);
          break;
        }
        case 0x75: {
          // SETITEMS
          const kv = this.popMark();
          this.setItems(this.top(), kv, at);
          break;
        }
        case 0x61: {
          // APPEND
          const v = this.pop();
          const list = this.top();
          if (!Array.isArray(list)) throw this.format('APPEND to a value that is not a list', at);
          list.push(v);
          break;
        }
        case 0x65: {
          // APPENDS
          const items = this.popMark();
          const list = this.top();
          if (!Array.isArray(list)) throw this.format('APPENDS to a value that is not a list', at);
          for (const it of items) list.push(it);
          break;
        }
        case 0x71: // BINPUT
          this.remember(this.u8(), this.top());
          break;
        case 0x72: // LONG_BINPUT
          this.remember(this.u32(), this.top());
          break;
        case 0x94: // MEMOIZE
          this.remember(this.memo.size, this.top());
          break;
        case 0x68: // BINGET
        case 0x6a: {
          // LONG_BINGET
          const idx = op === 0x68 ? this.u8() : this.u32();
          const v = this.memo.get(idx);
          if (v === undefined) throw this.format(`memo entry ${idx} is not defined`, at);
          this.push(v);
          break;
        }
        case 0x30: // POP (of the value on top, or of an empty MARK)
          if (this.stack.length === 0 && this.marks.length > 0) this.popMark();
          else this.pop();
          break;
        case 0x31: // POP_MARK
          this.popMark();
          break;
        case 0x32: // DUP
          this.push(this.top());
          break;
        case 0x4e: // NONE
          this.push(null);
          break;
        case 0x88: // NEWTRUE
          this.push(true);
          break;
        case 0x89: // NEWFALSE
          this.push(false);
          break;
        case 0x4b: // BININT1
          this.push(this.u8());
          break;
        case 0x4d: // BININT2
          this.push(this.u16());
          break;
        case 0x4a: // BININT
          this.push(this.i32());
          break;
        case 0x8a: {
          // LONG1: little-endian two's complement of n <= 8 bytes
          const n = this.u8();
          if (n > 8) throw this.format('integer wider than 64 bits', at);
          const p = this.need(n);
          let v = 0n;
          for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(d[p + i]!);
          if (n > 0 && d[p + n - 1]! & 0x80) v -= 1n << BigInt(8 * n);
          if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
            throw this.format('integer out of the safe range', at);
          }
          this.push(Number(v));
          break;
        }
        case 0x47: // BINFLOAT (big-endian double)
          this.push(this.view.getFloat64(this.need(8), false));
          break;
        case 0x58: // BINUNICODE
          this.push(this.utf8(this.u32()));
          break;
        case 0x8c: // SHORT_BINUNICODE
          this.push(this.utf8(this.u8()));
          break;
        case 0x8d: // BINUNICODE8
          this.push(this.utf8(this.u64()));
          break;
        case 0x63: {
          // GLOBAL
          const module = this.line();
          const name = this.line();
          this.push(this.global(module, name, at));
          break;
        }
        case 0x93: {
          // STACK_GLOBAL
          const name = this.pop();
          const module = this.pop();
          if (typeof module !== 'string' || typeof name !== 'string') throw this.format('STACK_GLOBAL operands are not strings', at);
          this.push(this.global(module, name, at));
          break;
        }
        case 0x52: {
          // REDUCE
          const args = this.pop();
          const fn = this.pop();
          this.push(this.reduce(fn, args, at));
          break;
        }
        case 0x62: {
          // BUILD: only the `_metadata` attribute of a state dict's OrderedDict, which we drop.
          const state = this.pop();
          const obj = this.top();
          if (!(obj instanceof PyDict && obj.ordered) || !(state === null || state instanceof PyDict)) {
            throw this.unsafe('BUILD (setting object state) is only accepted on an OrderedDict', at);
          }
          break;
        }
        case 0x51: // BINPERSID
          this.push(this.persistentLoad(this.pop(), at));
          break;
        case 0x50: // PERSID (text form, never written by torch.save)
          throw this.unsafe('text persistent id (PERSID)', at);
        case 0x69: // INST
        case 0x6f: // OBJ
        case 0x81: // NEWOBJ
        case 0x92: // NEWOBJ_EX
        case 0x82: // EXT1
        case 0x83: // EXT2
        case 0x84: // EXT4
          throw this.unsafe(`opcode 0x${op.toString(16)} (object instantiation) is not allowed`, at);
        default:
          throw this.format(`unsupported pickle opcode 0x${op.toString(16).padStart(2, '0')}`, at);
      }
    }
  }
}

function isCount(v: PyValue | undefined): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}
