/**
 * Timing of the benchmark suite: every measurement is taken inside the addon (CUDA events, or
 * a steady clock on the CPU backend), warm, as medians of many calls over inputs larger than
 * the L2 cache (several layers, sequences or gates are cycled). The sections that use these
 * are in bench/cases/; the suite that sweeps them is bench/suite.ts (`trimkv bench`).
 */
import { native } from '../lib/errors.js';
import { BACKEND_INDEX, loadAddon } from '../lib/native.js';
import type { Runtime } from '../lib/runtime.js';

/** Bytes the inputs of one measured family should span so that L2 (50 MB on H100 / H200) cannot hold them. */
export const ROTATE_BYTES = 256 * 2 ** 20;
/** The same on the CPU backend: past the last-level cache of a typical server socket. */
export const CPU_ROTATE_BYTES = 32 * 2 ** 20;

export function defaultRotateBytes(rt: Runtime): number {
  return rt.backend === 'cuda' ? ROTATE_BYTES : CPU_ROTATE_BYTES;
}

/** Order statistics of timing samples (ms). Quantiles interpolate linearly between ranks. */
export interface Stats {
  median: number; p10: number; p90: number; n: number;
  mean: number; min: number; max: number;
  /** (p90 - p10) / median: the relative spread of the samples. */
  spread: number;
}

/**
 * Median, p10, p90, mean, min, max of the samples.
 * @throws {RangeError} when there are no samples or one is not finite
 */
export function stats(samples: ArrayLike<number>): Stats {
  const a = Array.from(samples).sort((x, y) => x - y);
  if (a.length === 0) throw new RangeError('Expected at least one sample for stats but received none');
  if (!a.every(Number.isFinite)) throw new RangeError('Expected finite samples for stats but received a NaN or infinity');
  const at = (q: number) => {
    const r = q * (a.length - 1), lo = Math.floor(r), hi = Math.ceil(r);
    return a[lo]! + (a[hi]! - a[lo]!) * (r - lo);
  };
  const median = at(0.5), p10 = at(0.1), p90 = at(0.9);
  const mean = a.reduce((s, x) => s + x, 0) / a.length;
  return { median, p10, p90, n: a.length, mean, min: a[0]!, max: a[a.length - 1]!, spread: median > 0 ? (p90 - p10) / median : 0 };
}

export interface BenchOptions {
  /** Bytes the rotated inputs span (default: ROTATE_BYTES on CUDA, CPU_ROTATE_BYTES on the CPU). */
  rotateBytes?: number;
  /** Upper bound on layers / sets cycled (default 64). */
  maxSets?: number;
}

/** How many layers / sets of `perSet` bytes to cycle so that the inputs span the rotation. */
export function setsFor(rt: Runtime, perSet: number, o: BenchOptions): number {
  return Math.max(1, Math.min(o.maxSets ?? 64, Math.ceil((o.rotateBytes ?? defaultRotateBytes(rt)) / perSet)));
}

/** Device copy bandwidth (GB/s, read + write) of a 1 GiB copy; NaN on the CPU backend. */
export function copyBandwidth(rt: Runtime, bytes = 2 ** 30, iters = 20): number {
  if (rt.backend !== 'cuda') return Number.NaN;
  return native(() => loadAddon().copyBandwidth(bytes, iters));
}

/**
 * Bytes in use on the GPU (cudaMemGetInfo: total - free, every allocation of the device), or
 * null where there is no such query (the CPU backend, a CPU-only build, an older addon).
 */
export function deviceMemoryUsed(rt: Runtime): number | null {
  if (rt.backend !== 'cuda') return null;
  return native(() => loadAddon().deviceMemoryUsed(BACKEND_INDEX[rt.backend]));
}

/**
 * Times `n` calls of fn(i) on the runtime's backend; per-call milliseconds. With group > 1, one
 * value per run of `group` back-to-back calls (its time / group): no events between the calls.
 */
export function timeCalls(rt: Runtime, n: number, fn: (i: number) => void, spinMs = 20, group = 1): Float64Array {
  return native(() => loadAddon().timeCalls(BACKEND_INDEX[rt.backend], n, spinMs, fn, group));
}

/**
 * Times `n` calls like `timeCalls`, in chunks whose enqueue time stays below the spin that
 * holds the GPU back, so no timed call waits for the host (the events then measure device
 * time, not launch gaps). `hostMs` is the host cost of one call, measured during warm-up.
 * group > 1: one value per run of `group` calls (n a multiple of group).
 */
export function timeMany(rt: Runtime, n: number, fn: (i: number) => void, hostMs: number, group = 1): Float64Array {
  if (!Number.isInteger(group) || group < 1 || n % group !== 0) {
    throw new RangeError(`Expected n (${n}) to be a multiple of group (${group})`);
  }
  if (rt.backend !== 'cuda') return timeCalls(rt, n, fn, 0, group);
  const per = Math.max(hostMs, 0.002);
  let chunk = Math.max(8, Math.min(n, Math.floor(60 / per)));
  chunk = Math.max(group, chunk - (chunk % group));
  const out = new Float64Array(n / group);
  for (let done = 0; done < n; done += chunk) {
    const m = Math.min(chunk, n - done);
    out.set(timeCalls(rt, m, (i) => fn(done + i), Math.min(250, 2 * m * per + 2), group), done / group);
  }
  return out;
}

/**
 * Back-to-back device time of calls: `runs` runs of `group` calls (at least 8 per run, whole
 * multiples of `unit`, e.g. the layers of a step), one event pair per run, ms per call.
 */
export function timeBursts(rt: Runtime, fn: (i: number) => void, hostMs: number, unit: number, calls: number): Stats {
  const group = unit * Math.ceil(8 / unit);
  const runs = Math.max(11, Math.ceil(calls / group));
  return stats(timeMany(rt, runs * group, fn, hostMs, group));
}

/**
 * Host cost of one call, microseconds: wall time of each call with the device drained (untimed)
 * between runs of whole multiples of `unit` calls, so the launch queue never fills and blocks
 * the host.
 */
export function hostCost(rt: Runtime, fn: (i: number) => void, unit: number, calls = 256): Stats {
  // Runs of at least 32 calls between drains: the first call after a drain pays a cold start
  // (about 2x), which the median leaves out, as a model's back-to-back calls never see it.
  const group = unit * Math.ceil(32 / unit);
  const n = group * Math.max(1, Math.ceil(calls / group));
  return stats(native(() => loadAddon().hostTimes(BACKEND_INDEX[rt.backend], n, group, fn)));
}

/** The CUDA runtime's own host cost per enqueue on this machine (us, medians); null on the CPU backend. */
export function launchCost(rt: Runtime, iters = 2000): { kernelUs: number; clusterUs: number | null; streamKernelUs: number; eventUs: number; uploadUs: number } | null {
  if (rt.backend !== 'cuda') return null;
  const c = native(() => loadAddon().launchCost(iters));
  return { ...c, clusterUs: Number.isFinite(c.clusterUs) ? c.clusterUs : null };
}

/** Runs `n` warm-up calls and returns the host wall time of one call (ms). */
export function warmUp(n: number, fn: (i: number) => void): number {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) fn(i);
  return (performance.now() - t0) / n;
}
