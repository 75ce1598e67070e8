/** Tensors owned by a runtime: host memory on the CPU backend, device memory on CUDA. */
import { fromNative, native, TrimKVError } from './errors.js';
import { BACKEND_INDEX, loadAddon, type NativeTensorHandle } from './native.js';
import { DTYPE_BYTES, DTYPES, type BackendName, type DType } from './constants.js';
import { constants } from 'node:buffer';
import { types } from 'node:util';
import { invalid, invalidText, oneOf, shapeOf } from './validate.js';

/** The longest typed array this Node.js can make (2^32 on Node 20). */
const MAX_TYPED_ARRAY_LENGTH = constants.MAX_LENGTH;

/**
 * @internal What to do when an object is disposed: its runtime forgets it (Runtime keeps the
 * live objects only, so that a long-lived runtime does not grow with every object ever made).
 */
const releaseHooks = new WeakMap<object, () => void>();

/** @internal Calls `fn` once, when `x` is disposed. */
export function onRelease(x: object, fn: () => void): void {
  releaseHooks.set(x, fn);
}

/** @internal Runs and drops the hook of a disposed object. */
export function released(x: object): void {
  const fn = releaseHooks.get(x);
  if (fn === undefined) return;
  releaseHooks.delete(x);
  fn();
}

export class Tensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly backend: BackendName;
  readonly numel: number;
  readonly byteLength: number;
  #handle: NativeTensorHandle | undefined;

  /** @internal Use `Runtime.tensor` or `Runtime.fromArray`. @throws {TrimKVError} */
  constructor(backend: BackendName, shape: readonly number[], dtype: DType) {
    const { shape: dims, numel } = shapeOf(shape, 'shape');
    this.dtype = oneOf(dtype, 'dtype', DTYPES);
    this.shape = Object.freeze(dims);
    this.backend = backend;
    this.numel = numel;
    this.byteLength = this.numel * DTYPE_BYTES[dtype];
    this.#handle = native(() => new (loadAddon().NativeTensor)(BACKEND_INDEX[backend], dtype, dims));
  }

  get disposed(): boolean {
    return this.#handle === undefined;
  }

  /**
   * Whether `x` was made by this class (a brand check: `instanceof` also accepts an object
   * whose prototype merely points here, such as Object.create(Tensor.prototype)).
   */
  static isTensor(x: unknown): x is Tensor {
    return typeof x === 'object' && x !== null && #handle in x;
  }

  /** @internal The native handle; throws ERR_DISPOSED after dispose(). */
  handle(name = 'tensor'): NativeTensorHandle {
    if (!this.#handle) throw new TrimKVError('ERR_DISPOSED', `${name} has been disposed`);
    return this.#handle;
  }

  /**
   * Writes all elements. A Float32Array is converted to the storage dtype (round to nearest
   * even); a Uint16Array holds raw fp16 / bf16 bit patterns.
   * @throws {TrimKVError} ERR_INVALID_ARGUMENT, ERR_SHAPE (wrong length), ERR_DTYPE, ERR_DISPOSED
   */
  write(data: Float32Array | Uint16Array): this {
    const h = this.handle();
    // Brand checks, not instanceof: a Proxy around a typed array passes instanceof.
    if (!types.isFloat32Array(data) && !types.isUint16Array(data)) {
      invalid('a Float32Array or Uint16Array', 'data', data);
    }
    if (data.length !== this.numel) {
      invalid(`${this.numel} values (shape [${this.shape.join(', ')}])`, 'data', data, 'ERR_SHAPE');
    }
    if (types.isUint16Array(data) && this.dtype === 'fp32') {
      invalid('a Float32Array (raw 16-bit data needs an fp16 or bf16 tensor)', 'data', data, 'ERR_DTYPE');
    }
    native(() => h.write(data));
    return this;
  }

  /** Reads all elements as float32, without blocking the event loop. @throws {TrimKVError} */
  async read(): Promise<Float32Array> {
    const h = this.handle();
    this.#checkHostCopy();
    return native(() => h.read()).catch((e: unknown) => {
      throw fromNative(e);
    });
  }

  /** Reads all elements as float32, synchronously. @throws {TrimKVError} */
  readSync(): Float32Array {
    const h = this.handle();
    this.#checkHostCopy();
    return native(() => h.readSync());
  }

  /** A read returns one Float32Array: refuse before the addon tries to allocate more than one can hold. */
  #checkHostCopy(): void {
    if (this.numel > MAX_TYPED_ARRAY_LENGTH) {
      throw new TrimKVError(
        'ERR_OUT_OF_MEMORY',
        `out of host memory: reading ${this.toString()} needs a Float32Array of ${this.numel} elements, ` +
          `more than the ${MAX_TYPED_ARRAY_LENGTH} a typed array can hold`,
      );
    }
  }

  /** Frees the memory now (idempotent). Pending reads finish first. */
  dispose(): void {
    this.#handle?.dispose();
    this.#handle = undefined;
    released(this);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  toString(): string {
    return `Tensor(${this.dtype}[${this.shape.join(', ')}] on ${this.backend})`;
  }
}

/** @internal Checks that `t` is a live Tensor of this backend. */
export function checkTensor(t: unknown, name: string, backend: BackendName): Tensor {
  if (!Tensor.isTensor(t)) {
    // instanceof walks the prototype chain, where a Proxy's trap may throw (a revoked one always does).
    let posing = false;
    try {
      posing = t instanceof Tensor;
    } catch {
      /* not a Tensor either way */
    }
    if (posing) invalidText('a Tensor', name, 'an object posing as one (not made by a Runtime)');
    invalid('a Tensor', name, t);
  }
  if (t.disposed) throw new TrimKVError('ERR_DISPOSED', `${name} has been disposed`);
  if (t.backend !== backend) {
    invalidText(`a tensor on the ${backend} backend`, name, `a tensor on the ${t.backend} backend`);
  }
  return t;
}

/** @internal Checks dtype and shape of a tensor argument. */
export function expectTensor(t: unknown, name: string, backend: BackendName, dtype: DType, shape: readonly number[]): Tensor {
  const x = checkTensor(t, name, backend);
  if (x.dtype !== dtype) invalidText(`dtype ${dtype}`, name, x.dtype, 'ERR_DTYPE');
  // A plain loop: this runs five times per decode call, where a closure per check shows up.
  const xs = x.shape;
  let same = xs.length === shape.length;
  for (let i = 0; same && i < xs.length; i++) same = xs[i] === shape[i];
  if (!same) {
    invalidText(`shape [${shape.join(', ')}]`, name, `shape [${x.shape.join(', ')}]`, 'ERR_SHAPE');
  }
  return x;
}
