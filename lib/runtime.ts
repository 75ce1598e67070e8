/** Backends and the runtime that owns tensors, gates and caches on one of them. */
import { fromNative, native, TrimKVError } from './errors.js';
import { loadAddon, addonOrigin, type AddonOrigin } from './native.js';
import { DTYPES } from './constants.js';
import { KVCache } from './cache.js';
import { RetentionGate } from './gate.js';
import { onRelease, Tensor } from './tensor.js';
import type { BackendInfo, BackendName, BackendRequest, CacheConfig, DType, GateSpec } from './types.js';
import { oneOf } from './validate.js';
import { cpus } from 'node:os';

/** Set to 1 to make `'auto'` (and `backends()`) treat CUDA as unavailable. */
export const FORCE_CPU_ENV = 'TRIMKV_FORCE_CPU';

function forceCpu(): boolean {
  const v = process.env[FORCE_CPU_ENV];
  return v !== undefined && v !== '' && v !== '0' && v.toLowerCase() !== 'false';
}

/**
 * The backends and whether each can be used here, with the reason when not.
 * @throws {TrimKVError} ERR_ADDON_LOAD when the native addon cannot be loaded at all
 */
export function backends(): BackendInfo[] {
  const s = native(() => loadAddon().cudaStatus());
  const cpu = cpus();
  const cuda: BackendInfo = {
    name: 'cuda',
    available: s.available && !forceCpu(),
    devices: s.devices.map((d) => ({ ...d })),
  };
  if (!s.available) cuda.reason = s.reason;
  else if (forceCpu()) cuda.reason = `disabled by ${FORCE_CPU_ENV}=${process.env[FORCE_CPU_ENV]}`;
  return [
    { name: 'cpu', available: true, devices: [{ index: 0, name: `${cpu[0]?.model ?? 'CPU'} (${cpu.length} threads)` }] },
    cuda,
  ];
}

/** Build facts for `trimkv info`. */
export function buildInfo(): {
  addon: AddonOrigin; cudaCompiled: boolean; cudaArchs: string; cudaRuntime: string | null; cudaDriver: string | null;
} {
  const s = native(() => loadAddon().cudaStatus());
  const ver = (v: number) => (v > 0 ? `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}` : null);
  return {
    addon: addonOrigin(),
    cudaCompiled: s.compiled,
    cudaArchs: s.archs,
    cudaRuntime: s.compiled ? ver(s.runtimeVersion) : null,
    cudaDriver: ver(s.driverVersion),
  };
}

export class Runtime {
  readonly backend: BackendName;
  #disposed = false;
  readonly #owned = new Set<{ dispose(): void }>();

  /** @internal Use `openRuntime`. */
  constructor(backend: BackendName) {
    this.backend = backend;
  }

  #check(): void {
    if (this.#disposed) throw new TrimKVError('ERR_DISPOSED', 'the runtime has been disposed');
  }

  /** Keeps `x` until it is disposed (then forgets it) or the runtime is. */
  #own<T extends { dispose(): void }>(x: T): T {
    this.#owned.add(x);
    onRelease(x, () => this.#owned.delete(x));
    return x;
  }

  /** A new tensor; its contents are unspecified until written. @throws {TrimKVError} */
  tensor(shape: readonly number[], dtype: DType): Tensor {
    this.#check();
    return this.#own(new Tensor(this.backend, shape, oneOf(dtype, 'dtype', DTYPES)));
  }

  /** A new tensor holding `data` (Float32Array values, or raw fp16/bf16 bits). @throws {TrimKVError} */
  fromArray(data: Float32Array | Uint16Array, shape: readonly number[], dtype: DType): Tensor {
    const t = this.tensor(shape, dtype);
    try {
      return t.write(data);
    } catch (e) {
      t.dispose();
      throw e;
    }
  }

  /** A retention gate with its weights on this backend. @throws {TrimKVError} */
  createGate(spec: GateSpec): RetentionGate {
    this.#check();
    return this.#own(new RetentionGate(this.backend, spec));
  }

  /** A KV cache on this backend. @throws {TrimKVError} */
  createCache(config: CacheConfig): KVCache {
    this.#check();
    return this.#own(new KVCache(this.backend, config));
  }

  /** Resolves when all work queued on the device has finished. @throws {TrimKVError} */
  async synchronize(): Promise<void> {
    this.#check();
    if (this.backend === 'cpu') return;
    await native(() => loadAddon().synchronize()).catch((e: unknown) => {
      throw fromNative(e);
    });
  }

  /** Disposes every tensor, gate and cache this runtime created. */
  dispose(): void {
    for (const x of [...this.#owned]) x.dispose();
    this.#owned.clear();
    this.#disposed = true;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * Opens a runtime on a backend: `'auto'` is CUDA when usable, else the CPU.
 * @throws {TrimKVError} ERR_BACKEND_UNAVAILABLE (with the reason) for an unusable `'cuda'`,
 *   ERR_INVALID_ARGUMENT for an unknown name
 */
export function openRuntime(backend: BackendRequest = 'auto'): Runtime {
  const want = oneOf(backend, 'backend', ['auto', 'cpu', 'cuda'] as const);
  if (want === 'cpu') return new Runtime('cpu');
  const cuda = backends().find((b) => b.name === 'cuda')!;
  if (cuda.available) return new Runtime('cuda');
  if (want === 'cuda') throw new TrimKVError('ERR_BACKEND_UNAVAILABLE', `the CUDA backend is unavailable: ${cuda.reason}`);
  return new Runtime('cpu');
}
