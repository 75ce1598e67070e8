/**
 * The only module that loads the `.node` file. node-gyp-build looks for a prebuilt binary
 * (prebuilds/<platform>-<arch>/) first, then a local build (build/Release/).
 */
import { createRequire } from 'node:module';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { existsSync } from 'node:fs';
import { TrimKVError } from './errors.js';

export interface NativeCudaStatus {
  compiled: boolean;
  available: boolean;
  reason: string;
  archs: string;
  runtimeVersion: number;
  driverVersion: number;
  devices: { index: number; name: string; computeCapability: string; totalMemory: number; multiprocessors: number }[];
}

export interface NativeTensorHandle {
  write(data: Float32Array | Uint16Array): void;
  readSync(): Float32Array;
  read(): Promise<Float32Array>;
  dispose(): void;
}

export interface NativeGateHandle {
  run(x: NativeTensorHandle, lam: NativeTensorHandle): void;
  dispose(): void;
}

export interface NativeCacheHandle {
  decode(layer: number, q: NativeTensorHandle, k: NativeTensorHandle, v: NativeTensorHandle,
    lam: NativeTensorHandle, out: NativeTensorHandle, positions: Int32Array): void;
  /** chunks: (seq, start, length) triples; their tokens are packed in that order in q .. out. */
  prefill(layer: number, chunks: Int32Array, q: NativeTensorHandle, k: NativeTensorHandle,
    v: NativeTensorHandle, lam: NativeTensorHandle, out: NativeTensorHandle): void;
  reset(seq: number): void;
  seen(seq: number): number;
  length(seq: number, layer: number, head: number): number;
  lengths(): Int32Array;
  inspect(seq: number, layer: number, head: number): { positions: Int32Array; scores: Float32Array };
  memoryBytes(): { used: number; reserved: number };
  dispose(): void;
}

export interface NativeModelHandle {
  /** Runs tokens at positions [start, start + n); returns the fp32 logits of the last one. */
  forward(tokens: Int32Array, start: number, maxLength: number, lam?: readonly (Float32Array | undefined)[]): Float32Array;
  length(): number;
  dispose(): void;
}

export interface NativeAddon {
  cudaStatus(): NativeCudaStatus;
  synchronize(): Promise<void>;
  NativeTensor: new (backend: number, dtype: string, shape: number[]) => NativeTensorHandle;
  NativeGate: new (backend: number, spec: object, dtype: string, a: ArrayBufferView, b: ArrayBufferView,
    out: ArrayBufferView, bias: ArrayBufferView) => NativeGateHandle;
  NativeCache: new (backend: number, config: object) => NativeCacheHandle;
  /** The model forward (csrc/model/): config fields as lib/model/forward.ts passes them. */
  NativeModel: new (backend: number, config: object, weights: Record<string, NativeTensorHandle>,
    cache?: { cache: NativeCacheHandle; gates: NativeGateHandle[]; lamFp32: boolean }) => NativeModelHandle;
  /**
   * Per-call times (ms): CUDA events on the device (after a spin of spinMs), a steady clock on the
   * CPU. With group > 1, one value per run of `group` back-to-back calls (its time / group).
   */
  timeCalls(backend: number, n: number, spinMs: number, fn: (i: number) => void, group?: number): Float64Array;
  /** Host wall time of each call (us); on CUDA the device is drained (untimed) every `group` calls. */
  hostTimes(backend: number, n: number, group: number, fn: (i: number) => void): Float64Array;
  /** The CUDA runtime's own host cost per enqueue here (us, medians); clusterUs NaN before sm_90. */
  launchCost(iters: number): { kernelUs: number; clusterUs: number; streamKernelUs: number; eventUs: number; uploadUs: number };
  /** Device-to-device copy bandwidth in GB/s (read + write), median of iters. */
  copyBandwidth(bytes: number, iters: number): number;
  /**
   * Benchmark of the eviction's selection alone (csrc/bench/select_bench.cu): per-launch ms of
   * `rows` blocks each selecting the top k of n keys; keptMin / keptMax check the result.
   * ERR_UNSUPPORTED without CUDA.
   */
  selectBench(backend: number, options: { rows: number; n: number; k: number; threads: number; iters: number;
    warmup: number; keys: 'random' | 'scores'; seed: number }): { ms: Float64Array; keptMin: number; keptMax: number };
  /** Bytes in use on the GPU (cudaMemGetInfo: total - free). ERR_UNSUPPORTED without CUDA. */
  deviceMemoryUsed(backend: number): number;
  /**
   * Whether a backend runs a cache of this (resolved) configuration, from the kernels' limits
   * (csrc/common/limits.h, csrc/ops/support.h); no device needed.
   */
  cacheSupport(backend: number, config: { layers: number; qHeads: number; kvHeads: number; headDim: number;
    dtype: string; scope: string }): SupportResult;
  /** Whether a backend runs a gate of this input width (csrc/ops/support.h). */
  gateSupport(backend: number, inputSize: number): SupportResult;
}

/** The answer of the native support query: ok, or the reason why not. */
export interface SupportResult {
  ok: boolean;
  reason?: string;
}

/** Where the loaded binary came from, for `trimkv info`. */
export interface AddonOrigin {
  kind: 'prebuilt' | 'local build';
  path: string;
}

const here = dirname(fileURLToPath(import.meta.url));
/** The package root: lib/ (sources, under vitest) is one level down, dist/lib/ (published) two. */
export const packageRoot: string = join(here, basename(dirname(here)) === 'dist' ? '../..' : '..');

let addon: NativeAddon | undefined;
let origin: AddonOrigin | undefined;

/** Loads the addon once; throws ERR_ADDON_LOAD with the reason and the fix. */
export function loadAddon(): NativeAddon {
  if (addon) return addon;
  const require = createRequire(import.meta.url);
  try {
    const gypBuild = require('node-gyp-build') as { (dir: string): NativeAddon; resolve(dir: string): string };
    const path = gypBuild.resolve(packageRoot);
    addon = require(path) as NativeAddon;
    origin = { kind: path.includes(`${join('prebuilds', '')}`) ? 'prebuilt' : 'local build', path };
  } catch (e) {
    const built = existsSync(join(packageRoot, 'build', 'Release'));
    throw new TrimKVError(
      'ERR_ADDON_LOAD',
      `could not load the trimkv native addon: ${(e as Error).message}. ` +
        (built
          ? 'A local build exists but failed to load; rebuild it with `npm rebuild trimkv`.'
          : 'No prebuilt binary matches this platform and no local build exists; run `npm rebuild trimkv` ' +
            '(needs CMake and a C++17 compiler; nvcc enables CUDA).'),
      { cause: e },
    );
  }
  return addon;
}

export function addonOrigin(): AddonOrigin {
  loadAddon();
  return origin!;
}

/** Backend indices shared with csrc/common/enums.h. */
export const BACKEND_INDEX = { cpu: 0, cuda: 1 } as const;
