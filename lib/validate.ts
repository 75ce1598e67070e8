/**
 * Argument validation for the public API. Messages read
 * "Expected <what> for <name> but received <value>"; the native layer re-checks as an
 * internal assertion.
 */
import { types } from 'node:util';
import { TrimKVError, type ErrorCode } from './errors.js';

/** How much of a value `describe` shows: hostile values (cyclic, deep, huge, Proxies) stay cheap. */
const DESCRIBE_DEPTH = 3;
const DESCRIBE_ITEMS = 8;

/** A short description of any value for error messages; bounded in depth and length, never throws. */
export function describe(value: unknown, depth = 0): string {
  try {
    if (typeof value === 'string') return JSON.stringify(value.length > 64 ? `${value.slice(0, 64)}...` : value);
    if (value === null || value === undefined) return String(value);
    if (typeof value === 'symbol') return value.toString();
    if (typeof value === 'function') return 'a function';
    if (typeof value !== 'object') return String(value);
    if (types.isProxy(value)) return 'a Proxy';
    if (Array.isArray(value)) {
      if (depth >= DESCRIBE_DEPTH) return `Array(${value.length})`;
      const n = Math.min(value.length, DESCRIBE_ITEMS);
      const items: string[] = [];
      for (let i = 0; i < n; i++) items.push(i in value ? describe(value[i], depth + 1) : '<hole>');
      if (value.length > n) items.push(`... ${value.length - n} more`);
      return `[${items.join(', ')}]`;
    }
    if (ArrayBuffer.isView(value)) return `${value.constructor.name}(${(value as unknown as { length: number }).length})`;
    const name = (value as object).constructor?.name;
    return typeof name === 'string' && name !== '' ? name : 'object';
  } catch {
    return 'a value that cannot be described';
  }
}

export function invalid(what: string, name: string, value: unknown, code: ErrorCode = 'ERR_INVALID_ARGUMENT'): never {
  return invalidText(what, name, describe(value), code);
}

/** As `invalid`, with the received value already described (e.g. "shape [2, 4]"). */
export function invalidText(what: string, name: string, received: string, code: ErrorCode = 'ERR_INVALID_ARGUMENT'): never {
  throw new TrimKVError(code, `Expected ${what} for ${name} but received ${received}`);
}

export function isInteger(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v);
}

/** An integer in [min, max]: a non-integer is ERR_INVALID_ARGUMENT, out of range ERR_RANGE. */
export function integerIn(v: unknown, name: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (!isInteger(v)) invalid(`an integer`, name, v);
  if (v < min || v > max) invalid(`an integer in [${min}, ${max}]`, name, v, 'ERR_RANGE');
  return v;
}

export function numberIn(v: unknown, name: string, min: number, max: number, opts: { minOpen?: boolean; maxOpen?: boolean } = {}): number {
  if (typeof v !== 'number' || Number.isNaN(v)) invalid('a number', name, v);
  const lo = opts.minOpen ? v > min : v >= min;
  const hi = opts.maxOpen ? v < max : v <= max;
  if (!lo || !hi) invalid(`a number in ${opts.minOpen ? '(' : '['}${min}, ${max}${opts.maxOpen ? ')' : ']'}`, name, v, 'ERR_RANGE');
  return v;
}

export function oneOf<T extends string>(v: unknown, name: string, allowed: readonly T[]): T {
  if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) {
    invalid(`one of ${allowed.map((a) => `'${a}'`).join(', ')}`, name, v);
  }
  return v as T;
}

/**
 * A plain argument object: not null, not a function, not a Proxy (whose traps could run
 * arbitrary code and throw anything).
 */
export function isArgObject(v: unknown): v is object {
  return v !== null && typeof v === 'object' && !types.isProxy(v);
}

/**
 * Reads `key` of an argument object once; a getter that throws becomes ERR_INVALID_ARGUMENT
 * (user code must not leak an arbitrary exception through the API).
 */
export function readField(v: object, key: string, name: string, sub?: string | number): unknown {
  try {
    return (v as Record<string, unknown>)[key];
  } catch (e) {
    // The label is built only here: this runs for every argument of every call.
    const label = sub === undefined ? name : typeof sub === 'number' ? `${name}[${sub}]` : `${name}.${sub}`;
    return invalidText('a readable value', label, `a getter that threw ${describe(e instanceof Error ? e.message : e)}`);
  }
}

/**
 * An argument object (see `isArgObject`, else ERR_INVALID_ARGUMENT with `what`), read once
 * into a snapshot of `keys` (all own enumerable keys when omitted): a throwing getter is an
 * ERR_INVALID_ARGUMENT, and later checks see the very values that were checked.
 */
export function argObject<K extends string>(v: unknown, name: string, what: string, keys?: readonly K[]): { [P in K]: unknown } {
  if (!isArgObject(v) || Array.isArray(v)) invalid(what, name, v);
  // A fixed key list fills an ordinary object (fast properties: this runs on every decode call);
  // arbitrary own keys go into a null-prototype one, where '__proto__' is just a key.
  const out: Record<string, unknown> = keys ? {} : Object.create(null);
  for (const k of keys ?? (Object.keys(v) as K[])) out[k] = readField(v, k, name, k);
  return out as { [P in K]: unknown };
}

/**
 * An array read index by index (holes are undefined, so they fail `item`); refuses Proxies,
 * whose traps could run arbitrary code, and arrays longer than `maxLength` before reading any
 * element. ERR_SHAPE for the length when `length` is given and differs.
 */
export function arrayOf<T>(v: unknown, name: string, what: string, item: (x: unknown, name: string) => T,
  opts: { maxLength?: number; length?: number } = {}): T[] {
  // isProxy first: Array.isArray throws on a revoked Proxy.
  if (types.isProxy(v) || !Array.isArray(v)) invalid(what, name, v);
  if (opts.length !== undefined && v.length !== opts.length) invalid(`${opts.length} entries`, name, v, 'ERR_SHAPE');
  const max = opts.maxLength ?? 64;
  if (v.length > max) invalid(`${what} of at most ${max} entries`, name, v, 'ERR_SHAPE');
  const out = new Array<T>(v.length);
  for (let i = 0; i < v.length; i++) out[i] = item(readField(v, String(i), name, i), `${name}[${i}]`);
  return out;
}

/** Largest element count of a tensor or weight shape (the native layer has the same bound). */
export const MAX_ELEMENTS = 2 ** 40;

/**
 * A shape: at most 16 dimensions, each an integer in [0, MAX_ELEMENTS], with at most
 * MAX_ELEMENTS elements in all (ERR_RANGE). Returns a copy and its element count.
 */
export function shapeOf(v: unknown, name: string): { shape: number[]; numel: number } {
  const shape = arrayOf(v, name, 'an array of dimensions', (d, n) => integerIn(d, n, 0, MAX_ELEMENTS), { maxLength: 16 });
  // A zero anywhere makes the tensor empty; otherwise every prefix product stays within the bound.
  let numel = shape.includes(0) ? 0 : 1;
  for (let i = 0; numel > 0 && i < shape.length; i++) {
    numel *= shape[i]!;
    if (numel > MAX_ELEMENTS) invalid(`at most ${MAX_ELEMENTS} elements`, name, v, 'ERR_RANGE');
  }
  return { shape, numel };
}
