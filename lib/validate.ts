/**
 * Argument validation for the public API. Messages read
 * "Expected <what> for <name> but received <value>"; the native layer re-checks as an
 * internal assertion.
 */
import { TrimKVError, type ErrorCode } from './errors.js';

export function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (value === null || value === undefined) return String(value);
  if (Array.isArray(value)) return `[${value.map(describe).join(', ')}]`;
  if (ArrayBuffer.isView(value)) return `${value.constructor.name}(${(value as unknown as { length: number }).length})`;
  if (typeof value === 'object') return (value as object).constructor?.name ?? 'object';
  return String(value);
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
