/** Random inputs of the benchmark cases, and the bytes a cached token takes. */
import { DTYPE_BYTES, type DType } from '../lib/constants.js';
import type { Runtime } from '../lib/runtime.js';

/** Bytes one cached token takes per head: K and V rows plus position (int32) and lam (fp32). */
export function slotBytes(headDim: number, dtype: DType): number {
  return 2 * headDim * DTYPE_BYTES[dtype] + 8;
}

// One pool of random values, sliced: filling hundreds of MB with Math.random per case would
// dominate the run time. Reuse is harmless: the kernels' cost does not depend on the values.
let pool = new Float32Array(0);
export function randomArray(n: number, scale = 1): Float32Array {
  if (pool.length < n) {
    const next = new Float32Array(Math.max(n, 2 * pool.length));
    next.set(pool);
    for (let i = pool.length; i < next.length; i++) next[i] = Math.random() * 2 - 1;
    pool = next;
  }
  const off = Math.floor(Math.random() * (pool.length - n + 1));
  const a = pool.subarray(off, off + n);
  return scale === 1 ? a : a.map((x) => x * scale);
}

export function randomLam(n: number): Float32Array {
  return Float32Array.from(randomArray(n), (x) => -Math.abs(x) * 0.05);
}

export function toBf16(a: Float32Array): Uint16Array {
  const u = new Uint16Array(a.length);
  const f = new Float32Array(1), b = new Uint32Array(f.buffer);
  for (let i = 0; i < a.length; i++) { f[0] = a[i]!; u[i] = (b[0]! + 0x7fff + ((b[0]! >>> 16) & 1)) >>> 16; }
  return u;
}

/** Random q, k, v and lam and an output tensor for `rows` tokens (a prefill chunk) or slots (a decode step). */
export function layerTensors(rt: Runtime, rows: number, sh: { qHeads: number; kvHeads: number; headDim: number; dtype: DType }) {
  const { qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = sh;
  return {
    q: rt.fromArray(randomArray(rows * Hq * D), [rows, Hq, D], dtype),
    k: rt.fromArray(randomArray(rows * Hkv * D), [rows, Hkv, D], dtype),
    v: rt.fromArray(randomArray(rows * Hkv * D), [rows, Hkv, D], dtype),
    lam: rt.fromArray(randomLam(rows * Hkv), [rows, Hkv], 'fp32'),
    out: rt.tensor([rows, Hq, D], dtype),
  };
}
