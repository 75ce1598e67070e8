/**
 * Test helpers that need no native addon: a seeded random source, dtype bit codecs written
 * from the IEEE 754 / bfloat16 definitions (independent of lib/), tolerances of SPEC section 8
 * and the relative-error measure. Lib-dependent helpers (backends under test) live in
 * ./backends.ts so that the oracle's own tests run before the addon is built.
 */
import type { DType } from '../lib/types.js';

// ---------------------------------------------------------------------------------------------
// Random inputs: fresh on every run (seeded from the clock), reproducible with TRIMKV_SEED.
// ---------------------------------------------------------------------------------------------

/** Seed of this test file's random stream; every numeric failure message quotes it. */
export const SEED: number = (() => {
  const env = process.env.TRIMKV_SEED;
  const s = env !== undefined && env !== '' ? Number(env) : Date.now() % 0x7fffffff;
  return (s >>> 0) || 1;
})();

/** xorshift32 state; re-seeded through `reseed` when a test wants its own stream. */
let state = SEED;

export function reseed(seed: number): void {
  state = (seed >>> 0) || 1;
}

/** Uniform in [0, 1). */
export function rand(): number {
  let x = state;
  x ^= x << 13;
  x >>>= 0;
  x ^= x >>> 17;
  x ^= x << 5;
  x >>>= 0;
  state = x;
  return x / 4294967296;
}

/** Uniform in [lo, hi). */
export function uniform(lo: number, hi: number): number {
  return lo + (hi - lo) * rand();
}

/** Integer uniform in [lo, hi]. */
export function randInt(lo: number, hi: number): number {
  return lo + Math.floor(rand() * (hi - lo + 1));
}

/** Standard normal (Box-Muller). */
export function randn(): number {
  let u = rand();
  while (u === 0) u = rand();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
}

/** `n` normal values times `scale`, as exact float32 numbers. */
export function randnArray(n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = randn() * scale;
  return a;
}

/** Context string for failure messages. */
export function ctx(extra: string): string {
  return `[seed=${SEED} (rerun with TRIMKV_SEED=${SEED})] ${extra}`;
}

// ---------------------------------------------------------------------------------------------
// Tolerances (SPEC section 8): relative error ||out - ref|| / ||ref|| against float64.
// ---------------------------------------------------------------------------------------------

export const TOL_FP32 = 1e-5;
export const TOL_FP16 = 2e-3;
export const TOL_BF16 = 1e-2;
export const TOL: Readonly<Record<DType, number>> = { fp32: TOL_FP32, fp16: TOL_FP16, bf16: TOL_BF16 };

export const DTYPES: readonly DType[] = ['fp32', 'fp16', 'bf16'];

/**
 * ||out - ref|| / ||ref||. NaN or infinity anywhere in `out` gives +Infinity (NaN never passes);
 * an all-zero reference gives ||out|| (an absolute error).
 */
export function relError(out: ArrayLike<number>, ref: ArrayLike<number>): number {
  if (out.length !== ref.length) throw new Error(`relError: length ${out.length} vs ${ref.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < out.length; i++) {
    const o = out[i]!;
    const r = ref[i]!;
    if (!Number.isFinite(o)) return Infinity;
    const d = o - r;
    num += d * d;
    den += r * r;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 codecs (round to nearest, ties to even), straight from the format definitions.
// ---------------------------------------------------------------------------------------------

const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

/** IEEE half bits -> value. */
export function fp16BitsToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

/** bfloat16 bits -> value. */
export function bf16BitsToNumber(h: number): number {
  U32[0] = (h & 0xffff) << 16;
  return F32[0]!;
}

/** float32 value -> IEEE half bits, round to nearest even; overflow to infinity; NaN stays NaN. */
export function numberToFp16Bits(v: number): number {
  F32[0] = v;
  const x = U32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return mant !== 0 ? sign | 0x7e00 : sign | 0x7c00;
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    // Result is a half subnormal (or rounds up to the smallest normal, which the carry gives).
    if (e < -10) return sign; // |v| < 2^-25: below half the smallest subnormal
    const m = mant | 0x800000;
    const shift = 14 - e;
    let r = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (r & 1) === 1)) r++;
    return sign | r;
  }
  let r = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (r & 1) === 1)) r++; // a carry may reach infinity: correct
  return sign | r;
}

/** float32 value -> bfloat16 bits, round to nearest even; NaN stays (quiet) NaN. */
export function numberToBf16Bits(v: number): number {
  F32[0] = v;
  const x = U32[0]!;
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) return ((x >>> 16) | 0x40) & 0xffff;
  const lsb = (x >>> 16) & 1;
  return Math.floor((x + 0x7fff + lsb) / 65536) & 0xffff;
}

export function bitsToNumber(bits: number, dtype: 'fp16' | 'bf16'): number {
  return dtype === 'fp16' ? fp16BitsToNumber(bits) : bf16BitsToNumber(bits);
}

export function numberToBits(v: number, dtype: 'fp16' | 'bf16'): number {
  return dtype === 'fp16' ? numberToFp16Bits(v) : numberToBf16Bits(v);
}

/** Decodes a Uint16Array of fp16/bf16 bits to float64. */
export function decodeBits(bits: Uint16Array, dtype: 'fp16' | 'bf16'): Float64Array {
  const out = new Float64Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = bitsToNumber(bits[i]!, dtype);
  return out;
}

/** A value rounded to what a `dtype` storage holds. */
export interface Quantized {
  /** What to hand to Tensor.write: float32 values for fp32, raw bits for fp16/bf16. */
  data: Float32Array | Uint16Array;
  /** The stored values, exactly, for the oracle. */
  values: Float64Array;
}

/** Rounds float32 values to `dtype` with the helpers above (not with lib/). */
export function quantize(src: Float32Array, dtype: DType): Quantized {
  if (dtype === 'fp32') return { data: src, values: Float64Array.from(src) };
  const bits = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) bits[i] = numberToBits(src[i]!, dtype);
  return { data: bits, values: decodeBits(bits, dtype) };
}

/** Random normal data already representable in `dtype`. */
export function randomQuantized(n: number, dtype: DType, scale = 1): Quantized {
  return quantize(randnArray(n, scale), dtype);
}

// ---------------------------------------------------------------------------------------------
// Poison: every output must be written by the call under test.
// ---------------------------------------------------------------------------------------------

/** The part of a Tensor that `poison` needs (structural, so this file needs no addon). */
export interface Writable {
  readonly numel: number;
  readonly dtype: DType;
  write(data: Float32Array | Uint16Array): void;
}

/** Fills a tensor with NaN (raw quiet-NaN bits for fp16 / bf16, so no conversion is involved). */
export function poison(t: Writable): void {
  if (t.dtype === 'fp32') t.write(new Float32Array(t.numel).fill(NaN));
  else t.write(new Uint16Array(t.numel).fill(t.dtype === 'fp16' ? 0x7e00 : 0x7fc0));
}

/** True when any element is NaN. */
export function hasNaN(a: ArrayLike<number>): boolean {
  for (let i = 0; i < a.length; i++) if (Number.isNaN(a[i])) return true;
  return false;
}

/** Stable logsigmoid in float64: min(z, 0) - log1p(exp(-|z|)). */
export function logSigmoid(z: number): number {
  return Math.min(z, 0) - Math.log1p(Math.exp(-Math.abs(z)));
}

/** Random float32 lam = logsigmoid(z), z uniform in [zlo, zhi). */
export function randomLam(n: number, zlo = -3, zhi = 5): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = logSigmoid(uniform(zlo, zhi));
  return a;
}
